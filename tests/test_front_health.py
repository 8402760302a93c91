"""Master health: the pure rise/fall rule as a table, and the service over a real SQLite store."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import ILogObserver, globalLogPublisher

from puppetha.ha.health import (
    Health,
    HealthService,
    ProbeCredentials,
    StatusProbe,
    next_health,
    read_credentials,
)
from puppetha.store.records import CARecord, MasterRecord, Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.nginx import LOOPBACK, FrontPKI, IssuedFiles, LbOnlyServer

LB_CA = "lb"

UP = Health(True)
DOWN = Health(False)


@pytest.mark.parametrize(
    ("current", "ok", "expected"),
    [
        (UP, True, UP),
        (UP, False, Health(True, failures=1)),
        (Health(True, failures=1), False, Health(True, failures=2)),
        (Health(True, failures=2), False, DOWN),  # third failure in a row
        (Health(True, failures=2), True, UP),  # a success resets the run
        (DOWN, False, DOWN),
        (DOWN, True, Health(False, successes=1)),
        (Health(False, successes=1), True, UP),  # second success in a row
        (Health(False, successes=1), False, DOWN),
    ],
)
def test_next_health(current: Health, ok: bool, expected: Health) -> None:
    assert next_health(current, ok, fall=3, rise=2) == expected


def test_fall_of_one_takes_down_at_once() -> None:
    assert next_health(UP, False, fall=1, rise=1) == DOWN
    assert next_health(DOWN, True, fall=1, rise=1) == UP


class Synchronous:
    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        try:
            return succeed(f(*args, **kwargs))
        except Exception:
            return fail()


class Probes:
    """Probe results chosen by the test, per master."""

    def __init__(self) -> None:
        self.up: dict[str, bool] = {}
        self.seen: list[ProbeCredentials] = []

    def __call__(self, master: MasterRecord, credentials: ProbeCredentials) -> Deferred[bool]:
        self.seen.append(credentials)
        if master.certname == "broken":
            return fail(ConnectionRefusedError())
        return succeed(self.up.get(master.certname, True))


@attrs.define
class World:
    store: SQLiteStore
    records: Records
    probes: Probes
    service: HealthService
    pokes: list[int]

    def healthy(self, name: str) -> bool:
        found = self.records.get(MasterRecord, name)
        assert found is not None
        return found.record.healthy

    def round(self) -> list[str]:
        result: list[list[str]] = []
        self.service.round().addCallback(result.append)
        assert result
        return result[0]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    store = SQLiteStore(str(tmp_path / "store.sqlite"))
    records = Records(store)
    (tmp_path / "cert.pem").write_bytes(b"CERT")
    (tmp_path / "key.pem").write_bytes(b"KEY")
    records.create(CARecord(name="root", certificate_pem="ROOT", sealed_key="", parent="root", created_at=0))
    for i, name in enumerate(("m1", "m2", "broken")):
        records.create(MasterRecord(certname=name, address="10.0.0.1", port=8140, ca=name, registered_at=i))
    probes = Probes()
    pokes: list[int] = []
    service = HealthService(
        clock=Clock(),
        blocking=Synchronous(),
        store=store,
        probe=probes,
        certificate=str(tmp_path / "cert.pem"),
        private_key=str(tmp_path / "key.pem"),
        fall=2,
        rise=2,
        on_change=lambda: pokes.append(1),
    )
    yield World(store, records, probes, service, pokes)
    store.close()


def test_probes_present_the_lb_certificate_and_trust_every_ca(world: World) -> None:
    world.round()
    assert world.probes.seen[0] == ProbeCredentials(b"CERT", b"KEY", (b"ROOT",))


def test_a_master_goes_down_after_fall_failures_and_comes_back_after_rise(world: World) -> None:
    world.probes.up["m1"] = False
    assert world.round() == []
    assert world.healthy("m1")
    assert world.round() == ["broken", "m1"]
    assert not world.healthy("m1")
    assert not world.healthy("broken")
    assert world.healthy("m2")
    assert world.pokes == [1]

    world.probes.up["m1"] = True
    assert world.round() == []
    assert world.round() == ["m1"]
    assert world.healthy("m1")
    assert world.pokes == [1, 1]
    # Steady state writes nothing and pokes nobody.
    assert world.round() == []
    assert world.pokes == [1, 1]


def test_another_writer_moving_the_flag_wins_and_resets_the_run(world: World) -> None:
    world.probes.up["m1"] = False
    world.round()  # one failure counted
    found = world.records.get(MasterRecord, "m1")
    assert found is not None
    # Another lb node took it down already.
    world.records.replace(attrs.evolve(found.record, healthy=False), found.version)
    world.probes.up["m1"] = True
    assert "m1" not in world.round()
    assert world.round() == ["m1"]


def test_the_loop_runs_on_the_injected_clock(world: World) -> None:
    clock = world.service.clock
    assert isinstance(clock, Clock)
    world.probes.up["m2"] = False
    world.service.startService()
    assert world.healthy("m2")  # first round at start: one failure
    clock.advance(world.service.interval)
    assert not world.healthy("m2")
    world.service.stopService()


def test_a_probe_that_raises_counts_against_its_master_alone(world: World) -> None:
    world.records.create(
        MasterRecord(certname="odd", address="10.0.0.9", port=8140, ca="odd", registered_at=9)
    )
    probes = world.probes

    def probe(master: MasterRecord, credentials: ProbeCredentials) -> Deferred[bool]:
        if master.certname == "odd":
            raise ValueError("cannot even start a probe of this one")
        return probes(master, credentials)

    world.service.probe = probe
    world.probes.up["m1"] = False
    world.round()
    # The other masters' health still moves: m1 and broken go down, odd with them.
    assert world.round() == ["broken", "m1", "odd"]
    assert world.healthy("m2")


class StatusServer(LbOnlyServer):
    """A TLS server answering like puppetserver's status API, for lb certificates only."""

    def __init__(self, issued: IssuedFiles, lb_ca_pem: str) -> None:
        #: The Host header of every request, in order.
        self.hosts: list[str | None] = []
        hosts = self.hosts

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                hosts.append(self.headers.get("Host"))
                body = b"running" if self.path == "/status/v1/simple" else b"no"
                self.send_response(200 if self.path == "/status/v1/simple" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(issued, lb_ca_pem, Handler)


@pytest.mark.parametrize(
    ("certname", "probed_as", "up"),
    [
        ("m1", "m1", True),
        # Puppet's certnames may hold '_', which IDNA (and so Twisted's optionsForClientTLS) refuses.
        ("master_1", "master_1", True),
        # The master's certificate is checked for the certname the store names.
        ("m1", "m2", False),
    ],
)
def test_status_probe_over_real_tls(tmp_path: Path, certname: str, probed_as: str, up: bool) -> None:
    pki = FrontPKI(tmp_path / "pki")
    runner = ReactorThread()
    server = None
    try:
        pki.add_ca(LB_CA)
        lb = pki.leaf(LB_CA, "lb1", sans=["puppet.test"])
        pki.add_ca(certname)
        issued = pki.leaf(certname, certname, sans=[certname, "puppet.test"], usage="server")
        server = StatusServer(issued, pki.authority.ca(LB_CA).certificate_pem)
        credentials = read_credentials(lb.certificate, lb.private_key, pki.store)
        master = MasterRecord(certname=probed_as, address=LOOPBACK, port=server.port, ca=certname,
                              registered_at=1)
        probe = StatusProbe(runner.reactor, timeout=10)
        run: Callable[[], Any] = lambda: probe(master, credentials)  # noqa: E731
        answer = blockingCallFromThread(runner.reactor, run)
        assert answer is up
    finally:
        if server is not None:
            server.stop()
        runner.stop()
        pki.close()


@pytest.mark.parametrize(
    ("master_name", "up"),
    [
        ("puppet.test", True),
        # nginx checks the masters for [lb] master_name; a certificate without it gets 502 there,
        # so the probe must not call that master healthy.
        ("puppet", False),
    ],
)
def test_status_probe_checks_the_name_nginx_checks(tmp_path: Path, master_name: str, up: bool) -> None:
    pki = FrontPKI(tmp_path / "pki")
    runner = ReactorThread()
    server = None
    try:
        pki.add_ca(LB_CA)
        lb = pki.leaf(LB_CA, "lb1", sans=["puppet.test"])
        pki.add_ca("m1")
        issued = pki.leaf("m1", "m1", sans=["m1", "puppet.test"], usage="server")
        server = StatusServer(issued, pki.authority.ca(LB_CA).certificate_pem)
        credentials = read_credentials(lb.certificate, lb.private_key, pki.store)
        master = MasterRecord(certname="m1", address=LOOPBACK, port=server.port, ca="m1", registered_at=1)
        probe = StatusProbe(runner.reactor, timeout=10, master_name=master_name)
        run: Callable[[], Any] = lambda: probe(master, credentials)  # noqa: E731
        assert blockingCallFromThread(runner.reactor, run) is up
        if up:
            # Host names the master as the server name did, as nginx's requests do: Jetty refuses
            # (400) a Host that is not in the certificate it chose by that name.
            assert server.hosts == [f"{master_name}:{server.port}"]
    finally:
        if server is not None:
            server.stop()
        runner.stop()
        pki.close()


class ReactorThread:
    """A private reactor running in a thread (the global reactor is never touched)."""

    def __init__(self) -> None:
        self.reactor = SelectReactor()
        self.thread = threading.Thread(
            target=self.reactor.run, kwargs={"installSignalHandlers": False}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(timeout=10)


def test_stopping_waits_for_the_round_in_progress(world: World) -> None:
    pending: list[Deferred[bool]] = []

    def slow_probe(master: MasterRecord, credentials: ProbeCredentials) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        pending.append(d)
        return d

    world.service.probe = slow_probe
    world.service.startService()
    assert pending  # the first round is waiting on its probes
    stopped: list[object] = []
    result = world.service.stopService()
    assert result is not None
    result.addCallback(stopped.append)
    assert stopped == []
    for d in pending:
        d.callback(True)
    assert stopped == [None]


def test_status_probe_finds_a_master_with_a_revoked_certificate_down(tmp_path: Path) -> None:
    """nginx checks every CA's CRL (ssl_crl): so does the probe, or health says up while nginx says 502."""
    pki = FrontPKI(tmp_path / "pki")
    runner = ReactorThread()
    server = None
    try:
        pki.add_ca(LB_CA)
        lb = pki.leaf(LB_CA, "lb1", sans=["puppet.test"])
        pki.add_ca("m1")
        issued = pki.leaf("m1", "m1", sans=["m1", "puppet.test"], usage="server")
        server = StatusServer(issued, pki.authority.ca(LB_CA).certificate_pem)
        master = MasterRecord(certname="m1", address=LOOPBACK, port=server.port, ca="m1", registered_at=1)
        probe = StatusProbe(runner.reactor, timeout=10)

        def probed() -> Any:
            credentials = read_credentials(lb.certificate, lb.private_key, pki.store)
            run: Callable[[], Any] = lambda: probe(master, credentials)  # noqa: E731
            return blockingCallFromThread(runner.reactor, run)

        assert probed() is True
        pki.revoke(issued)
        assert probed() is False
    finally:
        if server is not None:
            server.stop()
        runner.stop()
        pki.close()


def test_a_probe_names_the_master_and_logs_no_connection_chatter(tmp_path: Path) -> None:
    """A probe is a connection every few seconds per master: Twisted's factory lines would drown the log."""
    pki = FrontPKI(tmp_path / "pki")
    runner = ReactorThread()
    server = None
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        pki.add_ca(LB_CA)
        lb = pki.leaf(LB_CA, "lb1", sans=["puppet.test"])
        pki.add_ca("master_1")
        issued = pki.leaf("master_1", "master_1", sans=["master_1"], usage="server")
        server = StatusServer(issued, pki.authority.ca(LB_CA).certificate_pem)
        credentials = read_credentials(lb.certificate, lb.private_key, pki.store)
        master = MasterRecord(certname="master_1", address=LOOPBACK, port=server.port, ca="master_1",
                              registered_at=1)
        probe = StatusProbe(runner.reactor, timeout=10)
        run: Callable[[], Any] = lambda: probe(master, credentials)  # noqa: E731
        assert blockingCallFromThread(runner.reactor, run) is True
        assert server.hosts == [f"master_1:{server.port}"]
    finally:
        globalLogPublisher.removeObserver(observer)
        if server is not None:
            server.stop()
        runner.stop()
        pki.close()
    chatter = [e for e in events if "factory" in str(e.get("log_format", "")).lower()]
    assert chatter == []


class StalledStatusServer(LbOnlyServer):
    """Answers 200 and then never finishes the body it announced, until ``release`` is set."""

    def __init__(self, issued: IssuedFiles, lb_ca_pem: str) -> None:
        self.release = threading.Event()
        release = self.release

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                self.wfile.write(b"run")
                self.wfile.flush()
                release.wait(30)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(issued, lb_ca_pem, Handler)


def test_a_master_that_never_finishes_its_answer_is_down(tmp_path: Path) -> None:
    pki = FrontPKI(tmp_path / "pki")
    runner = ReactorThread()
    server = None
    try:
        pki.add_ca(LB_CA)
        lb = pki.leaf(LB_CA, "lb1", sans=["puppet.test"])
        pki.add_ca("m1")
        issued = pki.leaf("m1", "m1", sans=["m1"], usage="server")
        server = StalledStatusServer(issued, pki.authority.ca(LB_CA).certificate_pem)
        credentials = read_credentials(lb.certificate, lb.private_key, pki.store)
        master = MasterRecord(certname="m1", address=LOOPBACK, port=server.port, ca="m1", registered_at=1)
        probe = StatusProbe(runner.reactor, timeout=1)
        run: Callable[[], Any] = lambda: probe(master, credentials)  # noqa: E731
        assert blockingCallFromThread(runner.reactor, run) is False
    finally:
        if server is not None:
            server.release.set()
            server.stop()
        runner.stop()
        pki.close()
