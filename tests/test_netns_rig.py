"""
The rig of several hosts on this machine: namespaces on a bridge reach each other and nothing
else, processes run inside a host, and closing the rig leaves nothing behind.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from puppetha.testing.netns import Host, NetnsError, Rig, leftovers, new_prefix, sweep
from puppetha.testing.partition import cut, cut_from, cut_off, heal


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig(["lb1", "lb2"]) as rig:
        yield rig
    assert rig.leftovers() == []


def echo_once(server: socket.socket) -> threading.Thread:
    """Answers one connection with its own first line, prefixed."""

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            connection.sendall(b"echo " + connection.recv(100))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_hosts_have_names_addresses_and_namespaces_carrying_the_prefix(rig: Rig) -> None:
    lb1, lb2 = rig["lb1"], rig["lb2"]
    assert rig.prefix.startswith("pha")
    assert len(rig.prefix) == 8
    assert lb1.namespace == f"{rig.prefix}-lb1"
    assert {lb1.address, lb2.address, rig.gateway} <= set(map(str, rig.subnet or []))
    assert len({lb1.address, lb2.address, rig.gateway, rig.spare_address()}) == 4
    assert lb1.addresses() == [lb1.address]
    assert sorted(rig.leftovers()) == sorted(
        [lb1.namespace, lb2.namespace, rig.bridge, lb1.outside_interface, lb2.outside_interface]
    )
    assert all(len(name) <= 15 for name in [rig.bridge, lb1.outside_interface])


def test_two_hosts_ping_each_other_and_the_outside(rig: Rig) -> None:
    lb1, lb2 = rig["lb1"], rig["lb2"]
    lb1.run(["ping", "-c", "1", "-W", "2", lb2.address])
    lb2.run(["ping", "-c", "1", "-W", "2", lb1.address])
    lb1.run(["ping", "-c", "1", "-W", "2", rig.gateway])
    subprocess.run(["ping", "-c", "1", "-W", "2", lb2.address], check=True, capture_output=True)


def test_tcp_from_one_host_to_the_other(rig: Rig) -> None:
    lb1, lb2 = rig["lb1"], rig["lb2"]
    server = lb1.socket()
    with server:
        server.bind((lb1.address, 7000))
        server.listen()
        served = echo_once(server)
        with lb2.socket() as client:
            client.settimeout(5)
            client.connect((lb1.address, 7000))
            client.sendall(b"hello")
            assert client.recv(100) == b"echo hello"
            # The connection really came from lb2's namespace.
            assert client.getsockname()[0] == lb2.address
        served.join(5)


def test_a_socket_of_a_host_sees_only_that_host(rig: Rig) -> None:
    lb1 = rig["lb1"]
    with lb1.socket() as s, pytest.raises(OSError, match="assign requested address"):
        # The gateway is the root namespace's address: it is not lb1's to bind.
        s.bind((rig.gateway, 0))
    with rig["lb2"].socket() as s, pytest.raises(OSError, match="assign requested address"):
        s.bind((lb1.address, 0))


def test_a_process_runs_inside_its_host_and_is_ended_with_the_rig() -> None:
    with Rig(["lb1"]) as rig:
        lb1 = rig["lb1"]
        shown = lb1.run(["ip", "-4", "-o", "addr", "show"]).stdout
        assert f"inet {lb1.address}/" in shown
        assert f"inet {rig.gateway}/" not in shown
        sleeper = lb1.popen([sys.executable, "-c", "import time; time.sleep(300)"])
        # ip netns exec enters the namespace, then replaces itself with the command.
        deadline = time.monotonic() + 10
        while sleeper.pid not in lb1.pids():
            assert time.monotonic() < deadline, "the process never appeared in lb1"
            time.sleep(0.01)
    assert sleeper.wait(timeout=10) == -9
    assert leftovers(rig.prefix) == []


def test_link_down_cuts_a_host_off_and_link_up_plugs_it_back(rig: Rig) -> None:
    lb1, lb2 = rig["lb1"], rig["lb2"]
    lb1.link_down()
    assert lb2.run(["ping", "-c", "1", "-W", "1", lb1.address], check=False).returncode != 0
    lb1.link_up()
    lb2.run(["ping", "-c", "1", "-W", "2", lb1.address])


def test_two_rigs_at_once_do_not_collide_or_reach_each_other() -> None:
    with Rig(["lb1"]) as one, Rig(["lb1"]) as other:
        assert one.prefix != other.prefix
        assert one.subnet is not None
        assert other.subnet is not None
        assert not one.subnet.overlaps(other.subnet)
        unreachable = one["lb1"].run(["ping", "-c", "1", "-W", "1", other["lb1"].address], check=False)
        assert unreachable.returncode != 0
    assert leftovers(one.prefix) == []
    assert leftovers(other.prefix) == []


def test_a_rig_that_fails_half_way_through_building_leaves_nothing() -> None:
    prefix = new_prefix()
    with pytest.raises(NetnsError, match="exists"):
        Rig(["lb1", "lb1"], prefix=prefix).start()
    assert leftovers(prefix) == []


def test_bad_names_are_refused_before_anything_is_made() -> None:
    with pytest.raises(NetnsError, match="prefix"):
        Rig(prefix="PHA!")
    with Rig() as rig, pytest.raises(NetnsError, match="host name"):
        rig.add_host("lb-1-with-a-long-name")
    with pytest.raises(NetnsError, match="short prefix"):
        sweep("pha")


@pytest.fixture
def three() -> Iterator[tuple[Rig, dict[str, socket.socket]]]:
    """lb1, lb2 and aws, each listening on port 7000 (the kernel completes handshakes)."""
    with Rig(["lb1", "lb2", "aws"]) as rig:
        listeners = {}
        for host in rig.hosts.values():
            listener = host.socket()
            listener.bind((host.address, 7000))
            listener.listen(50)
            listeners[host.name] = listener
        yield rig, listeners
        for listener in listeners.values():
            listener.close()
    assert rig.leftovers() == []


def reaches(source: Host | None, address: str) -> bool:
    """Whether a TCP connection from ``source`` (None: outside) to ``address`` completes; a refusal fails."""
    client = source.socket() if source is not None else socket.socket()
    with client:
        client.settimeout(0.5)
        try:
            client.connect((address, 7000))
        except TimeoutError:
            return False
        return True


def test_a_cut_black_holes_both_ways_and_leaves_other_paths(three) -> None:
    rig, _ = three
    lb1, lb2, aws = rig["lb1"], rig["lb2"], rig["aws"]
    cut(lb1, lb2)
    assert not reaches(lb1, lb2.address)
    assert not reaches(lb2, lb1.address)
    assert reaches(lb1, aws.address)
    assert reaches(lb2, aws.address)
    assert reaches(None, lb1.address)
    assert cut_from(lb1) == [lb2.address]
    assert cut_from(lb2) == [lb1.address]
    heal(lb1)
    assert cut_from(lb1) == cut_from(lb2) == []
    assert reaches(lb1, lb2.address)
    assert reaches(lb2, lb1.address)


def test_a_host_cut_from_the_store_still_hears_its_peers(three) -> None:
    rig, _ = three
    lb1, lb2, aws = rig["lb1"], rig["lb2"], rig["aws"]
    cut(lb1, aws)
    cut(lb1, aws)  # twice is once
    assert cut_from(lb1) == [aws.address]
    assert not reaches(lb1, aws.address)
    assert not reaches(aws, lb1.address)
    assert reaches(lb1, lb2.address)
    heal(lb1)
    assert reaches(lb1, aws.address)


def test_a_host_cut_off_reaches_nobody_and_nobody_reaches_it_until_healed(three) -> None:
    rig, _ = three
    lb1, lb2, aws = rig["lb1"], rig["lb2"], rig["aws"]
    cut_off(lb1)
    assert not reaches(lb1, lb2.address)
    assert not reaches(lb1, aws.address)
    assert not reaches(lb2, lb1.address)
    assert not reaches(None, lb1.address)
    assert reaches(lb2, aws.address)
    heal(lb1)
    assert reaches(None, lb1.address)
    assert reaches(lb2, lb1.address)
    assert reaches(lb1, aws.address)


def test_a_host_cannot_be_cut_from_itself(three) -> None:
    rig, _ = three
    with pytest.raises(NetnsError, match="itself"):
        cut(rig["lb1"], rig["lb1"])
