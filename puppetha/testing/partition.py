"""
Network partitions between the hosts of a :class:`~puppetha.testing.netns.Rig`.

A cut between two hosts drops, in each host's own namespace, every packet arriving from the
other (iptables ``INPUT``, in a chain of the rig's own).  Sending still succeeds and nothing
answers, as when a real network loses the path: no refusal or error tells either side what
happened, so the daemons see timeouts, as they would on AWS.  ARP is untouched.
"""

from __future__ import annotations

from collections.abc import Iterable

from puppetha.testing.netns import Host, NetnsError

#: The chain, in each host's namespace, that holds the host's cuts.
CHAIN = "PHA-CUT"


def _iptables(host: Host, *args: str, check: bool = True) -> str:
    return host.run(["iptables", "-w", *args], check=check).stdout


def _ensure_chain(host: Host) -> None:
    if _iptables(host, "-n", "-L", CHAIN, check=False) == "":
        _iptables(host, "-N", CHAIN)
        _iptables(host, "-I", "INPUT", "-j", CHAIN)


def _drop_from(host: Host, address: str) -> None:
    _ensure_chain(host)
    if not _has_rule(host, address):
        _iptables(host, "-A", CHAIN, "-s", address, "-j", "DROP")


def _has_rule(host: Host, address: str) -> bool:
    return host.run(["iptables", "-w", "-C", CHAIN, "-s", address, "-j", "DROP"], check=False).returncode == 0


def cut(host: Host, *others: Host) -> None:
    """Cuts ``host`` from each of ``others``, both ways; other paths stay as they are."""
    for other in others:
        if other is host:
            raise NetnsError(f"cannot cut {host.name} from itself")
        _drop_from(host, other.address)
        _drop_from(other, host.address)


def cut_off(host: Host) -> None:
    """Cuts ``host`` from every other host of its rig and from the outside (the bridge's address)."""
    cut(host, *(other for other in host.rig.hosts.values() if other is not host))
    _drop_from(host, host.rig.gateway)


def heal(host: Host) -> None:
    """Removes every cut that involves ``host``, on its side and on the others'."""
    for other in host.rig.hosts.values():
        if other is host:
            _flush(host)
        elif _has_rule(other, host.address):
            _iptables(other, "-D", CHAIN, "-s", host.address, "-j", "DROP")


def heal_all(hosts: Iterable[Host]) -> None:
    for host in hosts:
        _flush(host)


def _flush(host: Host) -> None:
    if _iptables(host, "-n", "-L", CHAIN, check=False) != "":
        _iptables(host, "-F", CHAIN)


def cut_from(host: Host) -> list[str]:
    """The addresses ``host`` drops packets from."""
    if _iptables(host, "-n", "-L", CHAIN, check=False) == "":
        return []
    rules = _iptables(host, "-S", CHAIN).splitlines()
    return [rule.split()[3].removesuffix("/32") for rule in rules if rule.startswith(f"-A {CHAIN} -s ")]
