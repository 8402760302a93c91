"""
The load monitor's senses: reports checked and merged as tables, an lb node's sampling round over
a real SQLite store, the jruby-metrics probe over real TLS, and the load socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorUNIXDatagram
from twisted.internet.pollreactor import PollReactor
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread
from zope.interface import implementer

from puppetha.ha.health import ProbeCredentials, StatusProbe, read_credentials
from puppetha.ha.jruby import JRubyStatus
from puppetha.ha.load import Attempt, LoadCounter, LoadLogProtocol
from puppetha.ha.monitor import (
    NO_REPORT,
    LoadMonitor,
    LoadReport,
    LoadSocketError,
    fresh_reports,
    listen_load_socket,
    load_socket_owner,
    merge_reports,
    probe_jruby,
    read_sample,
    report_loads,
)
from puppetha.ha.scaling import (
    HOLD,
    SERVING,
    Master,
    MasterLoad,
    Sample,
    ScaleDecision,
    ScaleSettings,
    decide,
)
from puppetha.pki.authority import LB_CA
from puppetha.store import IStore, Item, Value, Write
from puppetha.store.records import LoadReportRecord, MasterRecord, NodeRecord, Records
from puppetha.testing.nginx import LOOPBACK, FrontPKI, IssuedFiles, LbOnlyServer
from tests.test_front_health import ReactorThread
from tests.test_jruby_metrics import ANSWER

LINE = b"<190>Nov 27 14:30:00 puppetha_load: v1|"


def report(node: str, at: float, **loads: MasterLoad) -> LoadReport:
    return LoadReport(node, at, loads)


@pytest.mark.parametrize(
    ("reports", "expected"),
    [
        ([report("lb1", 100.0, m1=MasterLoad(requests=4, in_flight=2, upstream_time=0.5, agents=3))],
         {"m1": MasterLoad(requests=4, in_flight=2, upstream_time=0.5, agents=3)}),
        # What each nginx counted adds up; the upstream time is weighted by requests.
        ([report("lb1", 100.0, m1=MasterLoad(requests=3, in_flight=1, upstream_time=1.0, unavailable=1)),
          report("lb2", 101.0, m1=MasterLoad(requests=1, in_flight=2, upstream_time=3.0, unavailable=2))],
         {"m1": MasterLoad(requests=4, in_flight=3, upstream_time=1.5, unavailable=3)}),
        # puppetserver's pool is the newest report's; its interval counters the highest seen;
        # the agents (one store for all) the highest count, never the sum.
        ([report("lb2", 101.0, m1=MasterLoad(jruby_size=4, jruby_free=1, jruby_requested=5,
                                              queue_limit_hits=0, jruby_wait=0.2, jruby_borrow=0.7,
                                              agents=10)),
          report("lb1", 100.0, m1=MasterLoad(jruby_size=4, jruby_free=4, jruby_requested=9,
                                              queue_limit_hits=1, agents=10))],
         {"m1": MasterLoad(jruby_size=4, jruby_free=1, jruby_requested=9, queue_limit_hits=1, jruby_wait=0.2,
                           jruby_borrow=0.7, agents=10)}),
        # A node that could not reach puppetserver has no pool figures: the other's stand.
        ([report("lb1", 100.0, m1=MasterLoad(jruby_size=2, jruby_free=0)),
          report("lb2", 101.0, m1=MasterLoad(requests=2))],
         {"m1": MasterLoad(requests=2, jruby_size=2, jruby_free=0)}),
        # Masters only one node knows of yet are kept.
        ([report("lb1", 100.0, m1=MasterLoad(requests=1)), report("lb2", 100.0, m2=MasterLoad(requests=2))],
         {"m1": MasterLoad(requests=1), "m2": MasterLoad(requests=2)}),
    ],
)
def test_merge_reports(reports: list[LoadReport], expected: dict[str, MasterLoad]) -> None:
    assert merge_reports(reports, 105.0) == Sample(105.0, expected)


def test_no_report_is_no_fresh_sample() -> None:
    # Not a fleet at rest: the policy holds, it neither drains nor judges the window quiet.
    sample = merge_reports([], 105.0)
    assert sample == Sample(NO_REPORT, {})
    decision = decide(ScaleSettings(enabled=True), [Master("m1", SERVING, 0.0)], [sample], 105.0, None)
    assert decision == ScaleDecision(HOLD, "no fresh load sample")


def stored(node: str, at: float, loads: Any) -> Item:
    record = LoadReportRecord(node=node, at=at, interval=10.0, loads=loads)
    return Item(LoadReportRecord.KIND, node, record.to_value(), 1)


@pytest.mark.parametrize(
    ("loads", "error"),
    [
        ("m1", "a map of at most 1000"),
        ({"m1": {"requests": -1}}, "m1: requests is not a non-negative count"),
        ({"m1": {"requests": 1.5}}, "m1: requests is not a non-negative count"),
        ({"m1": {"requests": True}}, "m1: requests is not a non-negative count"),
        ({"m1": {"upstream_time": float("nan")}}, "m1: upstream_time is not a non-negative number"),
        ({"m1": {"upstream_time": "1"}}, "m1: upstream_time is not a non-negative number"),
        ({"m1": {"fork_bomb": 1}}, "unknown load fields"),
        ({"m1": []}, "not a certname with its load"),
        ({"": {}}, "not a certname with its load"),
        ({f"m{i}": {} for i in range(1001)}, "a map of at most 1000"),
    ],
)
def test_a_report_that_fails_its_check_is_left_out(loads: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        report_loads(LoadReportRecord.from_value(stored("lb1", 100.0, loads).value))
    assert fresh_reports([stored("lb1", 100.0, loads), stored("lb2", 100.0, {"m1": {"requests": 2}})],
                         now=100.0, stale=30.0) == [LoadReport("lb2", 100.0, {"m1": MasterLoad(requests=2)})]


def test_what_is_not_a_report_is_left_out() -> None:
    found = [Item(LoadReportRecord.KIND, "odd", {"node": "odd"}, 1),
             Item(LoadReportRecord.KIND, "noon", {"node": "noon", "at": "noon", "interval": 1, "loads": {}},
                  1),
             stored("lb1", 100.0, {"m1": {"requests": 2}})]
    assert [r.node for r in fresh_reports(found, now=100.0, stale=30.0)] == ["lb1"]


def test_only_fresh_reports_count() -> None:
    found = [stored("dead", 60.0, {"m1": {"requests": 100}}), stored("lb1", 75.0, {"m1": {"requests": 1}}),
             stored("ahead", 140.0, {"m1": {"requests": 100}})]
    assert [r.node for r in fresh_reports(found, now=100.0, stale=30.0)] == ["lb1"]


# --- an lb node's round, over a real store


class Synchronous:
    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        try:
            return succeed(f(*args, **kwargs))
        except Exception:
            return fail()


def status(free: int, requested: int, hits: int = 0) -> JRubyStatus:
    return JRubyStatus(size=2, free=free, requested_total=requested, queue_limit_hits_total=hits,
                       borrow_time=0.5, wait_time=0.1)


def agent(certname: str, issuer: str, revoked: bool = False) -> NodeRecord:
    return NodeRecord(certname=certname, instance_id=f"i-{certname}", role="agent", account="1", region="r",
                      private_ip="10.0.0.9", serial=len(certname), issuer=issuer, certificate_pem="",
                      enrolled_at=1.0, not_after=2.0, revoked_at=5.0 if revoked else None)


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[FrontPKI]:
    pki = FrontPKI(tmp_path / "pki")
    pki.add_ca(LB_CA)
    yield pki
    pki.close()


def test_a_round_publishes_the_nodes_sample(pki: FrontPKI) -> None:
    lb = pki.leaf(LB_CA, "lb1", sans=["puppet.test"])
    records = Records(pki.store)
    for certname, address, healthy in [("m1", "10.0.0.1", True), ("m2", "fd00::2", True),
                                       ("down", "10.0.0.3", False)]:
        records.create(MasterRecord(certname=certname, address=address, port=8140, ca=certname,
                                    registered_at=1.0, healthy=healthy))
    for record in [agent("a1", "m1"), agent("a2", "m1"), agent("a3", "m2"),
                   agent("gone", "m1", revoked=True)]:
        records.create(record)
    answers: dict[str, list[JRubyStatus | None]] = {"m1": [status(0, 100), status(1, 130, hits=2)],
                                                    "m2": [None, None]}
    broken = {"m2"}
    asked: list[tuple[str, bytes]] = []

    def jruby(master: MasterRecord, credentials: ProbeCredentials) -> Deferred[JRubyStatus | None]:
        asked.append((master.certname, credentials.certificate_pem))
        answer = answers[master.certname].pop(0)
        if master.certname in broken:
            # A probe that cannot even start: m2 has no figures, m1 keeps its own.
            raise ValueError("no such CA")
        return succeed(answer)

    clock = Clock()
    clock.advance(1000.0)
    counter = LoadCounter()
    nginx = LoadLogProtocol(counter)
    monitor = LoadMonitor(clock=clock, node="i-lb1", blocking=Synchronous(), store=pki.store, counter=counter,
                          jruby=jruby, certificate=lb.certificate, private_key=lb.private_key, interval=10.0)
    for _ in range(3):
        nginx.datagramReceived(LINE + b"10.0.0.1:8140|200|200|10.0|10.0", None)
    nginx.datagramReceived(LINE + b"[fd00::2]:8140|503|503|0.0|0.0", None)
    monitor.startService()
    # The unhealthy master is not asked; the probe presents the lb node's certificate.
    assert asked == [("m1", Path(lb.certificate).read_bytes()), ("m2", Path(lb.certificate).read_bytes())]
    first = Records(pki.store).get(LoadReportRecord, "i-lb1")
    assert first is not None
    assert (first.record.at, first.record.interval) == (1000.0, 10.0)
    assert report_loads(first.record) == {
        "m1": MasterLoad(requests=3, in_flight=3, upstream_time=10.0, jruby_size=2, jruby_free=0,
                         jruby_requested=100, jruby_borrow=0.5, jruby_wait=0.1, agents=2),
        "m2": MasterLoad(requests=1, unavailable=1, agents=1),
        "down": MasterLoad(),
    }
    # The next round: the counters of puppetserver as differences, nginx's counts afresh.
    clock.advance(10.0)
    second = Records(pki.store).get(LoadReportRecord, "i-lb1")
    assert second is not None
    assert second.version > first.version
    assert report_loads(second.record)["m1"] == MasterLoad(jruby_size=2, jruby_free=1, jruby_requested=30,
                                                           queue_limit_hits=2, jruby_borrow=0.5,
                                                           jruby_wait=0.1, agents=2)
    assert read_sample(pki.store, now=1015.0, stale=30.0).loads["m1"].queue_limit_hits == 2
    assert read_sample(pki.store, now=1050.0, stale=30.0) == Sample(NO_REPORT, {})
    monitor.stopService()


@implementer(IStore)
class ListingsCounted:
    """The real store, counting the listings of each kind."""

    def __init__(self, store: IStore) -> None:
        self.store = store
        self.listed: dict[str, int] = {}

    def get(self, kind: str, key: str) -> Item | None:
        return self.store.get(kind, key)

    def create(self, kind: str, key: str, value: Value) -> Item:
        return self.store.create(kind, key, value)

    def replace(self, kind: str, key: str, value: Value, expected_version: int) -> Item:
        return self.store.replace(kind, key, value, expected_version)

    def delete(self, kind: str, key: str, expected_version: int | None = None) -> bool:
        return self.store.delete(kind, key, expected_version)

    def list(self, kind: str, prefix: str = "") -> list[Item]:
        self.listed[kind] = self.listed.get(kind, 0) + 1
        return self.store.list(kind, prefix)

    def transact(self, writes: Sequence[Write]) -> None:
        self.store.transact(writes)

    def close(self) -> None:
        self.store.close()


def test_the_agents_are_counted_every_agents_interval_not_every_round(pki: FrontPKI) -> None:
    lb = pki.leaf(LB_CA, "lb1", sans=["puppet.test"])
    records = Records(pki.store)
    records.create(MasterRecord(certname="m1", address="10.0.0.1", port=8140, ca="m1", registered_at=1.0))
    records.create(agent("a1", "m1"))
    store = ListingsCounted(pki.store)
    clock = Clock()
    clock.advance(1000.0)
    monitor = LoadMonitor(clock=clock, node="i-lb1", blocking=Synchronous(), store=store,
                          counter=LoadCounter(), jruby=lambda master, credentials: succeed(None),
                          certificate=lb.certificate, private_key=lb.private_key, interval=10.0,
                          agents_interval=60.0)

    def reported() -> int:
        found = records.get(LoadReportRecord, "i-lb1")
        assert found is not None
        return report_loads(found.record)["m1"].agents

    monitor.startService()
    assert (store.listed[NodeRecord.KIND], reported()) == (1, 1)
    records.create(agent("a2", "m1"))
    # Every round reports the last count; the node records are listed again only after a minute.
    for _ in range(5):
        clock.advance(10.0)
        assert (store.listed[NodeRecord.KIND], reported()) == (1, 1)
    clock.advance(10.0)
    assert (store.listed[NodeRecord.KIND], reported()) == (2, 2)
    assert store.listed[MasterRecord.KIND] == 7
    monitor.stopService()
    # A clock set back does not keep the count for as long as it went back.
    clock.rightNow -= 3600.0
    monitor.round()
    assert store.listed[NodeRecord.KIND] == 3


# --- the jruby-metrics probe, over real TLS


class JRubyServer(LbOnlyServer):
    """Answers puppetserver's status API as ``body`` says, for lb certificates only."""

    def __init__(self, issued: IssuedFiles, lb_ca_pem: str, code: int, body: bytes) -> None:
        self.paths: list[str] = []
        paths = self.paths

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                paths.append(self.path)
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(issued, lb_ca_pem, Handler)


@pytest.mark.parametrize(
    ("code", "body", "expected"),
    [
        (200, json.dumps(ANSWER).encode(), JRubyStatus(size=4, free=1, requested_total=120,
                                                       queue_limit_hits_total=3, borrow_time=0.85,
                                                       wait_time=0.0405)),
        (404, b"no", None),
        (200, b"{not json", None),
        (200, json.dumps({"status": {}}).encode(), None),  # level info: no figures
        # puppetserver's figures, but longer than any answer of puppetserver's
        (200, json.dumps({**ANSWER, "padding": "x" * 300_000}).encode(), None),
    ],
)
def test_jruby_probe_over_real_tls(
    pki: FrontPKI, code: int, body: bytes, expected: JRubyStatus | None
) -> None:
    runner = ReactorThread()
    server = None
    try:
        lb = pki.leaf(LB_CA, "lb1", sans=["puppet.test"])
        pki.add_ca("m1")
        issued = pki.leaf("m1", "m1", sans=["m1", "puppet.test"], usage="server")
        server = JRubyServer(issued, pki.authority.ca(LB_CA).certificate_pem, code, body)
        credentials = read_credentials(lb.certificate, lb.private_key, pki.store)
        master = MasterRecord(certname="m1", address=LOOPBACK, port=server.port, ca="m1", registered_at=1)
        probe = StatusProbe(runner.reactor, timeout=10, master_name="puppet.test")
        run: Callable[[], Any] = lambda: probe_jruby(probe, master, credentials)  # noqa: E731
        assert blockingCallFromThread(runner.reactor, run) == expected
        assert server.paths == ["/status/v1/services/jruby-metrics?level=debug"]
    finally:
        if server is not None:
            server.stop()
        runner.stop()


def test_jruby_probe_refuses_a_master_with_the_wrong_name(pki: FrontPKI) -> None:
    runner = ReactorThread()
    server = None
    try:
        lb = pki.leaf(LB_CA, "lb1", sans=["puppet.test"])
        pki.add_ca("m1")
        issued = pki.leaf("m1", "m1", sans=["m1"], usage="server")
        answer = json.dumps(ANSWER).encode()
        server = JRubyServer(issued, pki.authority.ca(LB_CA).certificate_pem, 200, answer)
        credentials = read_credentials(lb.certificate, lb.private_key, pki.store)
        master = MasterRecord(certname="m1", address=LOOPBACK, port=server.port, ca="m1", registered_at=1)
        probe = StatusProbe(runner.reactor, timeout=10, master_name="puppet.test")
        run: Callable[[], Any] = lambda: probe_jruby(probe, master, credentials)  # noqa: E731
        assert blockingCallFromThread(runner.reactor, run) is None
        assert server.paths == []
    finally:
        if server is not None:
            server.stop()
        runner.stop()


# --- the load socket


class SignallingCounter(LoadCounter):
    def __init__(self) -> None:
        super().__init__()
        self.received = threading.Event()

    def add(self, attempts: list[Attempt]) -> None:
        super().add(attempts)
        self.received.set()


@pytest.mark.parametrize("nginx_user", ["root", "www-data"])
def test_the_load_socket_counts_what_nginx_sends(tmp_path: Path, nginx_user: str) -> None:
    assert os.geteuid() == 0, "these tests run as root"
    runner = ReactorThread()
    path = str(tmp_path / "run" / "load.sock")
    # A socket left by a daemon that died is replaced.
    os.makedirs(os.path.dirname(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dead:
        dead.bind(path)
    counter = SignallingCounter()
    try:
        port = blockingCallFromThread(runner.reactor, listen_load_socket, runner.reactor, path, counter,
                                      nginx_user)
        mode = os.stat(path)
        # Only nginx's workers may send.
        assert (mode.st_uid, stat.S_IMODE(mode.st_mode)) == (pwd.getpwnam(nginx_user).pw_uid, 0o600)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(LINE + b"10.0.0.1:8140|200|200|1.0|1.0", path)

        assert counter.received.wait(timeout=10)

        def took() -> dict[str, MasterLoad]:
            return counter.take({"10.0.0.1:8140": "m1"}, 1.0)

        loads = blockingCallFromThread(runner.reactor, took)
        assert loads["m1"] == MasterLoad(requests=1, in_flight=1, upstream_time=1.0)
        blockingCallFromThread(runner.reactor, port.stopListening)
    finally:
        runner.stop()


USERS = {"root": 0, "www-data": 33, "puppetha": 990}


@pytest.mark.parametrize(
    ("nginx_user", "euid", "owner"),
    [
        # As root: the socket is given to nginx's workers.
        ("www-data", 0, 33),
        ("root", 0, 0),
        # Not as root: the daemon keeps it, beside an nginx run as the daemon's own user.
        ("puppetha", 990, 990),
        (None, 990, 990),
    ],
)
def test_the_load_socket_belongs_to_nginx_s_workers(nginx_user: str | None, euid: int, owner: int) -> None:
    assert load_socket_owner(nginx_user, euid, USERS.get) == owner


@pytest.mark.parametrize(
    ("nginx_user", "euid", "message"),
    [
        # The daemon cannot hand it to nginx's workers: they could not send, and no one else may.
        ("www-data", 990, "[lb] nginx_user is www-data (uid 33), but only the daemon's own user "
                          "(uid 990) may send to it: run nginx as the daemon's user and name that "
                          "user in [lb] nginx_user, or run the daemon as root"),
        ("nobody-here", 0, "[lb] nginx_user: no user nobody-here on this host"),
        ("nobody-here", 990, "[lb] nginx_user: no user nobody-here on this host"),
        (None, 0, "[lb] nginx_user is empty: the daemon runs as root and cannot tell which user "
                  "nginx's workers send as; set it"),
    ],
)
def test_a_load_socket_no_one_but_nginx_could_send_to_is_refused(
    nginx_user: str | None, euid: int, message: str
) -> None:
    with pytest.raises(LoadSocketError) as raised:
        load_socket_owner(nginx_user, euid, USERS.get)
    assert str(raised.value) == message


def _fork_as(uid: int, action: Callable[[], None]) -> int:
    """Runs ``action`` in a forked child under ``uid`` (all three ids); the child's pid."""
    gid = pwd.getpwuid(uid).pw_gid  # before the fork: the child makes system calls only
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            action()
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    return pid


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _in_child_as(uid: int, action: Callable[[], None]) -> int:
    """Runs ``action`` in a forked child under ``uid``; its exit status (13: permission denied)."""
    return _exit_code(_fork_as(uid, action))


def _sender(path: str) -> Callable[[], None]:
    def send() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(LINE + b"10.0.0.1:8140|200|200|1.0|1.0", path)

    return send


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every local user may enter (pytest's own are its user's alone)."""
    with tempfile.TemporaryDirectory(prefix="puppetha-load-") as directory:
        os.chmod(directory, 0o755)  # noqa: S103 (nginx's workers and the attacker must reach it)
        yield Path(directory)


def test_another_user_cannot_send_a_load_sample(shared_dir: Path) -> None:
    assert os.geteuid() == 0, "these tests run as root"
    runner = ReactorThread()
    path = str(shared_dir / "run" / "load.sock")
    counter = SignallingCounter()
    try:
        port = blockingCallFromThread(runner.reactor, listen_load_socket, runner.reactor, path, counter,
                                      "www-data")
        nobody = pwd.getpwnam("nobody").pw_uid
        assert _in_child_as(nobody, _sender(path)) == 13
        assert not counter.received.wait(timeout=0.5)
        # nginx's workers may.
        assert _in_child_as(pwd.getpwnam("www-data").pw_uid, _sender(path)) == 0
        assert counter.received.wait(timeout=10)
        blockingCallFromThread(runner.reactor, port.stopListening)
    finally:
        runner.stop()


#: A load line naming a master only the attacker sends about.
FORGED = b"10.0.0.66:8140|200|200|1.0|1.0"


class Heard(LoadCounter):
    """Keeps the addresses of every attempt it is given; ``nginx`` is set once 10.0.0.1 is heard."""

    def __init__(self) -> None:
        super().__init__()
        self.addresses: list[str] = []
        self.nginx = threading.Event()

    def add(self, attempts: list[Attempt]) -> None:
        super().add(attempts)
        self.addresses.extend(a.address for a in attempts)
        if any(a.address == "10.0.0.1:8140" for a in attempts):
            self.nginx.set()


@implementer(IReactorUNIXDatagram)
class ConnectsAtBind:
    """
    A reactor that binds as the real one does, but leaves the socket with every permission (the
    mode bind() gives it under a umask of 0, before anyone's chmod) and, at the moment the bind
    returns, has ``attacker`` connect a datagram socket to it in a child process.  The child
    keeps what it connected and sends on it when told to (a connected datagram socket's sends
    are not checked again).
    """

    def __init__(self, reactor: Any, attacker: int) -> None:
        self.reactor = reactor
        self.attacker = attacker
        self.bound: list[str] = []
        self.connected: bool | None = None
        self.child = 0
        self._send_w = -1

    def listenUNIXDatagram(self, address: str, protocol: Any, maxPacketSize: int = 8192,
                           mode: int = 0o666) -> Any:
        port = self.reactor.listenUNIXDatagram(address, protocol, maxPacketSize=maxPacketSize,
                                               mode=0o777)
        self.bound.append(address)
        connected_r, connected_w = os.pipe()
        send_r, self._send_w = os.pipe()

        def attack() -> None:
            os.close(connected_r)
            os.close(self._send_w)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
                try:
                    sender.connect(address)
                except OSError:
                    os.write(connected_w, b"n")
                    raise
                os.write(connected_w, b"y")
                os.read(send_r, 1)
                sender.send(LINE + FORGED)

        self.child = _fork_as(self.attacker, attack)
        os.close(connected_w)
        os.close(send_r)
        self.connected = os.read(connected_r, 1) == b"y"
        os.close(connected_r)
        return port

    def connectUNIXDatagram(self, address: str, protocol: Any, maxPacketSize: int = 8192,
                            mode: int = 0o666, bindAddress: Any = None) -> Any:
        return self.reactor.connectUNIXDatagram(address, protocol, maxPacketSize, mode, bindAddress)

    def attack(self) -> int:
        """Tells the child to send if it connected; its exit status (13: it could not)."""
        with contextlib.suppress(BrokenPipeError):  # a child that could not connect has left
            os.write(self._send_w, b"1")
        os.close(self._send_w)
        return _exit_code(self.child)


def test_no_one_can_connect_to_the_load_socket_before_its_mode_is_set(shared_dir: Path) -> None:
    assert os.geteuid() == 0, "these tests run as root"
    runner = ReactorThread()
    path = str(shared_dir / "run" / "load.sock")
    counter = Heard()
    attacker = ConnectsAtBind(runner.reactor, pwd.getpwnam("nobody").pw_uid)
    try:
        port = blockingCallFromThread(runner.reactor, listen_load_socket, attacker, path, counter,
                                      "www-data")
        assert attacker.bound, "the socket was bound through the reactor given"
        # The socket open and given to nginx's workers: the attacker, had it connected, sends now.
        assert (attacker.connected, attacker.attack()) == (False, 13)
        mode = os.stat(path)
        assert (mode.st_uid, stat.S_IMODE(mode.st_mode)) == (pwd.getpwnam("www-data").pw_uid, 0o600)
        # Nothing of it is left beside the socket, and nginx's workers send as before; what the
        # socket heard before their line (datagrams are read in order) is theirs alone.
        assert sorted(os.listdir(shared_dir / "run")) == ["load.sock"]
        assert _in_child_as(pwd.getpwnam("www-data").pw_uid, _sender(path)) == 0
        assert counter.nginx.wait(timeout=10)
        assert blockingCallFromThread(runner.reactor, lambda: list(counter.addresses)) == ["10.0.0.1:8140"]
        blockingCallFromThread(runner.reactor, port.stopListening)
    finally:
        runner.stop()


def test_a_load_socket_whose_directory_is_too_long_is_refused(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "these tests run as root"
    fits, too_long = (tmp_path / ("d" * (95 - len(str(tmp_path)) - 1 + extra)) for extra in (0, 1))
    assert (len(str(fits)), len(str(too_long))) == (95, 96)
    reactor = PollReactor()  # never run: the socket exists once bound
    port = listen_load_socket(reactor, str(fits / "load.sock"), LoadCounter(), "root")
    assert stat.S_ISSOCK(os.stat(fits / "load.sock").st_mode)
    port.stopListening()
    with pytest.raises(LoadSocketError) as raised:
        listen_load_socket(reactor, str(too_long / "load.sock"), LoadCounter(), "root")
    assert str(raised.value) == (
        f"{too_long}/load.sock: cannot open it: its directory's path is too long for a UNIX socket "
        "(at most 95 bytes: the socket is bound in a directory inside it first)")
    assert os.listdir(too_long) == []


def test_a_daemon_not_root_keeps_the_load_socket_to_itself(shared_dir: Path) -> None:
    assert os.geteuid() == 0, "these tests run as root"
    daemon, other = pwd.getpwnam("www-data").pw_uid, pwd.getpwnam("nobody").pw_uid
    run = shared_dir / "run"
    run.mkdir()
    os.chown(run, daemon, -1)
    path = str(run / "load.sock")
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()

    def listen() -> None:
        os.close(ready_r)
        os.close(done_w)
        # A reactor of the child's own, never run: the socket exists once bound.
        listen_load_socket(PollReactor(), path, LoadCounter(), None)
        _sender(path)()  # the daemon's own user (nginx run as it) may send
        os.write(ready_w, b"1")
        os.read(done_r, 1)

    pid = _fork_as(daemon, listen)
    os.close(ready_w)
    os.close(done_r)
    try:
        assert os.read(ready_r, 1) == b"1"
        mode = os.stat(path)
        assert (mode.st_uid, stat.S_IMODE(mode.st_mode)) == (daemon, 0o600)
        assert _in_child_as(other, _sender(path)) == 13
    finally:
        os.write(done_w, b"1")
    assert _exit_code(pid) == 0
