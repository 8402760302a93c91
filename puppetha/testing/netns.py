"""
Several hosts on this one machine, for tests and benchmarks: each host a network namespace with
one veth into a bridge in the root namespace, on a private /24 chosen per rig.

The root namespace is "outside": it holds the bridge's own address (:attr:`Rig.gateway`), where
a test's clients live.  Every namespace, bridge and veth name starts with the rig's prefix
(``pha`` and a random id), so parallel runs and other users of namespaces never collide, and
:meth:`Rig.close` (or :func:`sweep`) removes everything that carries it.

Needs root, ``ip`` (iproute2) and, for partitions, ``iptables``; a missing part is an error,
never a skip.  Blocking code, for fixtures and benchmarks, never for the reactor thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

PREFIX_STEM = "pha"

#: Interface names are at most 15 bytes; the rig's longest is its prefix plus 4.
_IFNAME_MAX = 15

#: The one interface of a host, inside its namespace.
HOST_INTERFACE = "eth0"

#: Host addresses start at .10 of the rig's /24; spare ones (an Elastic IP) at .200.
_FIRST_HOST = 10
_FIRST_SPARE = 200

_HOST_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")

_CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class NetnsError(RuntimeError):
    """The rig could not be built or a command inside it failed."""


def require_netns() -> None:
    """Raises :class:`NetnsError` unless this process may build a rig (root, ``ip``, ``iptables``)."""
    if os.geteuid() != 0:
        raise NetnsError("network namespaces need root")
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            raise NetnsError(f"{tool} is not installed (apt-get install {package})")


def new_prefix() -> str:
    """``pha`` and five random characters: unique per run, short enough for interface names."""
    return PREFIX_STEM + secrets.token_hex(3)[:5]


def ip(*args: str, check: bool = True) -> str:
    """Runs ``ip ARGS`` and returns its output; a failure raises :class:`NetnsError` with ip's words."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise NetnsError(f"setns: {os.strerror(errno)}")


class Host:
    """One host of a :class:`Rig`: a namespace, its address on the rig's subnet, and ways to run in it."""

    def __init__(self, rig: Rig, name: str, index: int, address: str) -> None:
        self.rig = rig
        self.name = name
        self.index = index
        self.address = address
        self.namespace = f"{rig.prefix}-{name}"
        #: The veth's end in the root namespace, plugged into the bridge.
        self.outside_interface = f"{rig.prefix}h{index}"

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address} in {self.namespace}>"

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as a command that runs inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``argv`` inside the host and waits for it; output captured as text."""
        done = subprocess.run(
            self.command(argv), capture_output=True, text=True, check=False, timeout=timeout, **kwargs
        )
        if check and done.returncode != 0:
            raise NetnsError(
                f"{' '.join(argv)} on {self.name} exited {done.returncode}: {done.stderr.strip()[-400:]}"
            )
        return done

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Starts ``argv`` inside the host (``subprocess.Popen`` arguments pass through)."""
        return subprocess.Popen(self.command(argv), **kwargs)

    def ip(self, *args: str, check: bool = True) -> str:
        """``ip ARGS`` inside the host (``ip -n`` enters the namespace itself: no extra process)."""
        return ip("-n", self.namespace, *args, check=check)

    def inside(self, f: Callable[[], T]) -> T:
        """
        Calls ``f`` in a thread that has entered this host's namespace: sockets it makes belong
        to the host for good, wherever they are used afterwards.
        """
        outcome: list[T] = []
        failure: list[BaseException] = []

        def enter_and_call() -> None:
            try:
                with open(f"/run/netns/{self.namespace}", "rb") as namespace:
                    _setns(namespace.fileno())
                outcome.append(f())
            except BaseException as e:
                failure.append(e)

        # A thread of its own, which ends with the call: no thread is ever left in the wrong namespace.
        thread = threading.Thread(target=enter_and_call, name=f"netns-{self.name}")
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        return outcome[0]

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket in this host's network namespace."""
        return self.inside(lambda: socket.socket(family, kind))

    def pids(self) -> list[int]:
        """The processes running in this host's namespace."""
        return [int(pid) for pid in ip("netns", "pids", self.namespace, check=False).split()]

    def kill_all(self, sig: int = signal.SIGKILL) -> list[int]:
        """Sends ``sig`` to every process in the host; returns their ids."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def link_down(self) -> None:
        """Unplugs the host from the bridge, as a dead host or a pulled cable would be."""
        ip("link", "set", self.outside_interface, "down")

    def link_up(self) -> None:
        ip("link", "set", self.outside_interface, "up")

    def addresses(self) -> list[str]:
        """The IPv4 addresses on the host's interface (its own first, then any it was given)."""
        return _addresses(self.ip("-j", "-4", "addr", "show", "dev", HOST_INTERFACE))


def _addresses(ip_json: str) -> list[str]:
    return [
        info["local"]
        for link in json.loads(ip_json or "[]")
        for info in link.get("addr_info", [])
        if info.get("family") == "inet"
    ]


class Rig:
    """
    A bridge in the root namespace and hosts plugged into it.  ``with Rig(["lb1", "lb2"]) as rig:``
    builds it; leaving the block removes every namespace, veth and bridge it made and ends the
    processes still running in its hosts, even after a failure half-way through building.
    """

    def __init__(self, hosts: Iterable[str] = (), prefix: str | None = None) -> None:
        self.prefix = prefix or new_prefix()
        if not re.fullmatch(r"[a-z][a-z0-9]{2,9}", self.prefix):
            raise NetnsError(f"prefix {self.prefix!r}: 3 to 10 lower-case letters and digits")
        self.bridge = f"{self.prefix}br"
        self.subnet: ipaddress.IPv4Network | None = None
        self.hosts: dict[str, Host] = {}
        self._initial_hosts = list(hosts)
        self._started = False

    @property
    def gateway(self) -> str:
        """The bridge's own address: the root namespace, "outside" every host."""
        return str(self._subnet()[1])

    def spare_address(self, index: int = 0) -> str:
        """An address of the subnet that belongs to no host (``index`` 0..49), e.g. for an Elastic IP."""
        if not 0 <= index < 50:
            raise NetnsError(f"spare address index {index} out of 0..49")
        return str(self._subnet()[_FIRST_SPARE + index])

    @property
    def prefixlen(self) -> int:
        return self._subnet().prefixlen

    def _subnet(self) -> ipaddress.IPv4Network:
        if self.subnet is None:
            raise NetnsError("the rig is not started")
        return self.subnet

    def start(self) -> Rig:
        if self._started:
            return self
        require_netns()
        self._started = True
        try:
            self._make_bridge()
            for name in self._initial_hosts:
                self.add_host(name)
        except BaseException:
            self.close()
            raise
        return self

    def _make_bridge(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        # A bridge forwards only once its ports have learned; no forwarding delay on a test bridge.
        ip("link", "set", self.bridge, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        for _attempt in range(20):
            subnet = _unused_subnet()
            ip("addr", "add", f"{subnet[1]}/{subnet.prefixlen}", "dev", self.bridge)
            # Another rig may have picked the same /24 at the same moment: check after claiming it.
            if _owners_of(subnet) == [self.bridge]:
                self.subnet = subnet
                break
            ip("addr", "del", f"{subnet[1]}/{subnet.prefixlen}", "dev", self.bridge, check=False)
        else:
            raise NetnsError("no free private /24 for the rig")
        ip("link", "set", self.bridge, "up")

    def add_host(self, name: str) -> Host:
        """A new namespace ``PREFIX-name`` with ``eth0`` on the bridge, at the next host address."""
        if not self._started:
            raise NetnsError("start the rig before adding hosts")
        if not _HOST_NAME.fullmatch(name):
            raise NetnsError(f"host name {name!r}: a letter, then up to 11 lower-case letters and digits")
        if name in self.hosts:
            raise NetnsError(f"host {name} exists")
        index = len(self.hosts)
        address = str(self._subnet()[_FIRST_HOST + index])
        host = Host(self, name, index, address)
        inside_interface = f"{self.prefix}n{index}"
        if max(len(host.outside_interface), len(inside_interface)) > _IFNAME_MAX:
            raise NetnsError(f"interface names of {self.prefix} would be longer than {_IFNAME_MAX}")
        self.hosts[name] = host
        ip("netns", "add", host.namespace)
        ip("link", "add", host.outside_interface, "type", "veth", "peer", "name", inside_interface)
        ip("link", "set", host.outside_interface, "master", self.bridge)
        ip("link", "set", host.outside_interface, "up")
        ip("link", "set", inside_interface, "netns", host.namespace)
        host.ip("link", "set", inside_interface, "name", HOST_INTERFACE)
        host.ip("addr", "add", f"{address}/{self.prefixlen}", "dev", HOST_INTERFACE)
        host.ip("link", "set", HOST_INTERFACE, "up")
        host.ip("link", "set", "lo", "up")
        return host

    def host(self, name: str) -> Host:
        return self.hosts[name]

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def close(self) -> None:
        """Ends the hosts' processes and removes everything carrying the prefix.  Safe to call twice."""
        if not self._started:
            return
        self._started = False
        problems = sweep(self.prefix)
        self.hosts = {}
        if problems:
            raise NetnsError("; ".join(problems))

    def leftovers(self) -> list[str]:
        """Namespaces and interfaces with this rig's prefix that still exist (none after :meth:`close`)."""
        return leftovers(self.prefix)

    def __enter__(self) -> Rig:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _unused_subnet() -> ipaddress.IPv4Network:
    """A random 10.X.Y.0/24 that no address or route of the root namespace touches."""
    used = [
        ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False)
        for link in json.loads(ip("-j", "-4", "addr") or "[]")
        for info in link.get("addr_info", [])
    ]
    for route in json.loads(ip("-j", "-4", "route") or "[]"):
        if route.get("dst", "default") != "default":
            used.append(ipaddress.ip_network(route["dst"] if "/" in route["dst"] else route["dst"] + "/32"))
    for _attempt in range(1000):
        candidate = ipaddress.IPv4Network(f"10.{100 + secrets.randbelow(150)}.{secrets.randbelow(256)}.0/24")
        if not any(candidate.overlaps(other) for other in used):
            return candidate
    raise NetnsError("no unused 10.X.Y.0/24 found")


def _owners_of(subnet: ipaddress.IPv4Network) -> list[str]:
    """The root namespace's interfaces with an address inside ``subnet``."""
    return [
        link["ifname"]
        for link in json.loads(ip("-j", "-4", "addr") or "[]")
        for info in link.get("addr_info", [])
        if ipaddress.ip_address(info["local"]) in subnet
    ]


def leftovers(prefix: str) -> list[str]:
    """Namespaces and root-namespace interfaces whose names start with ``prefix``."""
    namespaces = [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
    links = [link["ifname"] for link in json.loads(ip("-j", "link") or "[]")]
    return sorted(name for name in namespaces + links if name.startswith(prefix))


def sweep(prefix: str) -> list[str]:
    """
    Kills every process in the namespaces named ``prefix*``, deletes those namespaces (their veths
    go with them) and the interfaces named ``prefix*``.  Returns what could not be removed.
    """
    if len(prefix) < len(PREFIX_STEM) + 3:
        raise NetnsError(f"refusing to sweep the short prefix {prefix!r}")
    problems: list[str] = []
    namespaces = [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
    for namespace in namespaces:
        if not namespace.startswith(prefix):
            continue
        for pid in ip("netns", "pids", namespace, check=False).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        try:
            ip("netns", "del", namespace)
        except NetnsError as e:
            problems.append(str(e))
    for link in json.loads(ip("-j", "link") or "[]"):
        name = link["ifname"]
        if name.startswith(prefix):
            try:
                ip("link", "del", name)
            except NetnsError as e:
                # A veth whose peer's namespace just went is deleted with it.
                if name in {lk["ifname"] for lk in json.loads(ip("-j", "link") or "[]")}:
                    problems.append(str(e))
    return problems
