"""
The load log: nginx's per-request datagrams parsed and counted per master, as a table, and from
a real nginx rendered with a load socket, proxying to a stand-in master.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from twisted.internet.task import Clock

from puppetha.ha.front import FrontService, decide_front, discover_front
from puppetha.ha.load import Attempt, LoadCounter, LoadLogProtocol, parse_datagram
from puppetha.ha.nginx import FrontSettings, NginxRuntime, RenderError, render
from puppetha.ha.scaling import MasterLoad
from puppetha.pki.authority import LB_CA
from puppetha.testing.nginx import FrontPKI, NginxUnderTest, loopback_ports
from tests.test_front_nginx import FRONT_NAME, Front, Synchronous

LINE = b"<190>Nov 27 14:30:00 puppetha_load: v1|"


@pytest.mark.parametrize(
    ("datagram", "expected"),
    [
        (LINE + b"10.0.1.5:8140|200|200|0.120|0.118",
         [Attempt("10.0.1.5:8140", 200, 0.118)]),
        (LINE + b"10.0.1.5:8140|503|503|0.002|0.002", [Attempt("10.0.1.5:8140", 503, 0.002)]),
        # nginx tried a second master after the first failed
        (LINE + b"10.0.1.5:8140, 10.0.1.6:8140|200|502, 200|1.5|1.000, 0.400",
         [Attempt("10.0.1.5:8140", 502, 1.0), Attempt("10.0.1.6:8140", 200, 0.4)]),
        (LINE + b"10.0.1.5:8140 : 10.0.1.6:8140|200|404 : 200|0.2|0.1 : 0.05",
         [Attempt("10.0.1.5:8140", 404, 0.1), Attempt("10.0.1.6:8140", 200, 0.05)]),
        (LINE + b"10.0.1.5:8140|504|-|60.0|-", []),  # no answer from it: no status to count
        (LINE + b"10.0.1.5:8140|502|502|0.001|-", [Attempt("10.0.1.5:8140", 502, 0.0)]),
        (LINE + b"-|200|-|0.000|-", []),  # answered by nginx itself (the CA paths)
        (LINE + b"10.0.1.5:8140|200|200", []),  # truncated
        (b"<190>Nov 27 14:30:00 other: v1|10.0.1.5:8140|200|200|0.1|0.1", []),
        (b"\xff\xfe garbage", []),
        (b"", []),
    ],
)
def test_parse_datagram(datagram: bytes, expected: list[Attempt]) -> None:
    assert parse_datagram(datagram) == expected


def test_counts_per_master_over_an_interval() -> None:
    counter = LoadCounter()
    protocol = LoadLogProtocol(counter)
    for _ in range(10):
        protocol.datagramReceived(LINE + b"10.0.1.5:8140|200|200|2.0|2.0", None)
    protocol.datagramReceived(LINE + b"10.0.1.5:8140|503|503|0.0|0.0", None)
    protocol.datagramReceived(LINE + b"10.0.1.9:8140|200|200|1.0|1.0", None)  # no master of ours
    loads = counter.take({"10.0.1.5:8140": "m1", "10.0.1.6:8140": "m2"}, interval=10.0)
    # 20 s of upstream time in 10 s: two requests in flight on average.
    assert loads == {
        "m1": MasterLoad(requests=11, in_flight=2, upstream_time=20.0 / 11, unavailable=1),
        "m2": MasterLoad(),
    }
    assert counter.take({"10.0.1.5:8140": "m1"}, interval=10.0) == {"m1": MasterLoad()}


def test_the_load_socket_is_rendered_only_when_set(tmp_path: Path) -> None:
    pki = FrontPKI(tmp_path / "pki")
    try:
        pki.add_ca(LB_CA)
        lb = pki.leaf(LB_CA, "lb1", sans=[FRONT_NAME])
        settings = FrontSettings(certificate=lb.certificate, private_key=lb.private_key,
                                 master_name=FRONT_NAME, ports=loopback_ports(),
                                 runtime=NginxRuntime(access_log=None))
        state = decide_front(settings, discover_front(pki.store, settings), [], [LB_CA]).state
        assert "syslog:" not in render(state)
        assert "access_log off;" in render(state)
        with_load = attrs.evolve(state, settings=attrs.evolve(
            settings, runtime=NginxRuntime(access_log=None, load_socket="/run/puppetha/load.sock")))
        text = render(with_load)
        assert "access_log syslog:server=unix:/run/puppetha/load.sock,nohostname,tag=puppetha_load " in text
        assert "access_log off;" not in text  # it would silence the load log too
        bad = attrs.evolve(state, settings=attrs.evolve(
            settings, runtime=NginxRuntime(load_socket="/run/x.sock; evil")))
        with pytest.raises(RenderError, match="load socket"):
            render(bad)
    finally:
        pki.close()


@pytest.fixture
def loaded_front(tmp_path: Path) -> Iterator[tuple[Front, socket.socket]]:
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(tmp_path / "load.sock"))
    sink.settimeout(10)
    pki = FrontPKI(tmp_path / "pki")
    (tmp_path / "pki" / "root.pem").write_text(pki.authority.root().certificate_pem)
    pki.add_ca(LB_CA)
    lb = pki.leaf(LB_CA, "lb1", sans=[FRONT_NAME, "127.0.0.1"])
    nginx = NginxUnderTest(tmp_path / "nginx")
    ports = loopback_ports(max_masters=4)
    runtime = attrs.evolve(nginx.runtime, load_socket=str(tmp_path / "load.sock"))
    settings = FrontSettings(certificate=lb.certificate, private_key=lb.private_key, master_name=FRONT_NAME,
                             ports=ports, runtime=runtime)
    service = FrontService(clock=Clock(), blocking=Synchronous(), store=pki.store, settings=settings,
                           generations=nginx.generations, control=nginx.control, enroll_backends=[],
                           exclude_cas=[LB_CA])
    front = Front(pki, nginx, service, settings, {}, lb=lb, agent=lb, enroll_port=ports.enroll)
    front.add_master("m1", registered_at=1.0)
    pki.add_ca("m9")
    front.agent = pki.leaf("m9", "agent1", usage="client")
    first = decide_front(settings, discover_front(pki.store, settings), [], [LB_CA])
    nginx.generations.install(first.files, nginx.control, reload=False)
    nginx.start(wait_ports=(ports.front,))
    try:
        yield front, sink
    finally:
        nginx.stop()
        for master in front.masters.values():
            master.stop()
        pki.close()
        sink.close()


def test_real_nginx_sends_one_datagram_per_request_to_the_load_socket(
    loaded_front: tuple[Front, socket.socket],
) -> None:
    front, sink = loaded_front
    master = f"127.0.0.1:{front.masters['m1'].port}"
    for _ in range(5):
        assert front.agent_get("/puppet/v3/catalog/agent1")[0] == 200
    # Answered by nginx itself: a datagram, but no attempt on a master.
    assert front.get(front.settings.ports.front, "/puppet-ca/v1/certificate/ca")[0] == 200
    counter = LoadCounter()
    datagrams = [sink.recv(65536) for _ in range(6)]
    for datagram in datagrams:
        counter.add(parse_datagram(datagram))
    assert sum(1 for d in datagrams if parse_datagram(d)) == 5, datagrams
    loads = counter.take({master: "m1"}, interval=10.0)
    assert loads["m1"].requests == 5
    assert loads["m1"].unavailable == 0
