"""
The lb reconcile loop without nginx: rounds on an injected clock, pokes coalescing, reload only
on change.  nginx's command line is replaced by a recorder passed in as the control.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from attrs import evolve
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher

from puppetha.enroll.service import revoke_identity
from puppetha.ha.front import (
    Applied,
    FrontService,
    Generations,
    NginxControl,
    NginxRefused,
    NginxReloadFailed,
)
from puppetha.ha.nginx import MASTERS_UPSTREAM, FrontSettings
from puppetha.store.records import MasterRecord, NodeRecord, Records
from puppetha.testing.nginx import FrontPKI
from tests.test_front_render import upstream_servers


class RecordingControl(NginxControl):
    def __init__(self) -> None:
        super().__init__("/nonexistent/nginx")
        self.calls: list[str] = []
        self.refuse = False
        self.running = True

    def test(self, config: str, generation: str = "") -> None:
        self.calls.append("test")
        if self.refuse:
            raise NginxRefused(generation, "nginx: [emerg] no")

    def reload(self, config: str) -> None:
        self.calls.append("reload")
        if not self.running:
            raise NginxReloadFailed("nginx: [error] open() \"/run/nginx.pid\" failed (2: No such file)")


class Held:
    """Blocking calls wait until the test releases them, one at a time, in order."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((lambda: f(*args, **kwargs), d))
        return d

    def run_one(self) -> None:
        f, d = self.pending.pop(0)
        try:
            result = f()
        except Exception:
            fail().chainDeferred(d)
        else:
            succeed(result).chainDeferred(d)

    def run_all(self) -> None:
        while self.pending:
            self.run_one()


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[FrontPKI]:
    pki = FrontPKI(tmp_path / "pki")
    pki.add_ca("lb")
    pki.add_ca("m1")
    yield pki
    pki.close()


def make_service(
    tmp_path: Path, pki: FrontPKI, blocking: Any
) -> tuple[FrontService, RecordingControl, Clock]:
    lb = pki.leaf("lb", "lb1", sans=["puppet.test"])
    control = RecordingControl()
    clock = Clock()
    service = FrontService(
        clock=clock,
        blocking=blocking,
        store=pki.store,
        settings=FrontSettings(
            certificate=lb.certificate, private_key=lb.private_key, master_name="puppet.test"
        ),
        generations=Generations(tmp_path / "front"),
        control=control,
        exclude_cas=["lb"],
        interval=10.0,
    )
    return service, control, clock


def test_pokes_during_a_round_coalesce_into_one_more(tmp_path: Path, pki: FrontPKI) -> None:
    held = Held()
    service, control, _ = make_service(tmp_path, pki, held)
    results: list[Any] = []
    service.poke().addCallback(results.append)
    held.run_one()  # the first round has read the store and is now writing
    # A change, and two pokes about it, while the first round is still busy.
    master = MasterRecord(certname="m1", address="10.0.0.1", port=8140, ca="m1", registered_at=1)
    Records(pki.store).create(master)
    second = service.poke()
    third = service.poke()
    held.run_all()
    later: list[Any] = []
    second.addCallback(later.append)
    third.addCallback(later.append)
    assert len(results) == 1
    assert isinstance(results[0], Applied)
    assert len(later) == 2
    assert later[0] == later[1]  # both pokes were answered by the same, single extra round
    assert held.pending == []
    # Two rounds; the first wrote and reloaded, the second too (it saw the new master).
    assert control.calls == ["test", "reload", "test", "reload"]


def test_rounds_follow_the_clock_and_unchanged_state_does_not_reload(tmp_path: Path, pki: FrontPKI) -> None:
    service, control, clock = make_service(tmp_path, pki, Synchronous())
    service.startService()
    assert control.calls == ["test", "reload"]
    clock.advance(10)
    clock.advance(10)
    assert control.calls == ["test", "reload"]
    pki.revoke(pki.leaf("m1", "agent1", usage="client"))
    clock.advance(10)
    assert control.calls == ["test", "reload", "test", "reload"]
    service.stopService()


def test_a_refused_generation_is_not_made_live(tmp_path: Path, pki: FrontPKI) -> None:
    service, control, _ = make_service(tmp_path, pki, Synchronous())
    result: list[Any] = []
    service.poke().addCallback(result.append)
    live = service.generations.live()
    assert live is not None
    control.refuse = True
    pki.revoke(pki.leaf("m1", "agent1", usage="client"))
    service.poke().addCallback(result.append)
    assert result[1] is None
    assert service.generations.live() == live
    assert control.calls == ["test", "reload", "test"]


class Synchronous:
    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        try:
            return succeed(f(*args, **kwargs))
        except Exception:
            return fail()


def test_leftovers_of_a_crashed_install_are_cleared(tmp_path: Path) -> None:
    generations = Generations(tmp_path / "front")
    control = RecordingControl()
    generations.install({"nginx.conf": b"one"}, control)
    staging = tmp_path / "front" / ".staging-crashed"
    staging.mkdir()
    (staging / "nginx.conf").write_bytes(b"half")
    spare_link = tmp_path / "front" / ".live-999999"
    spare_link.symlink_to("gen-gone")
    generations.install({"nginx.conf": b"two"}, control)
    assert not staging.exists()
    assert not spare_link.is_symlink()
    assert (tmp_path / "front" / "live" / "nginx.conf").read_bytes() == b"two"


def test_nginx_not_running_yet_is_said_once_then_when_it_is_reached(tmp_path: Path, pki: FrontPKI) -> None:
    service, control, clock = make_service(tmp_path, pki, Synchronous())
    control.running = False
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        service.startService()
        for _ in range(5):
            clock.advance(10)
        errors = [e for e in events if e["log_level"] == LogLevel.error]
        assert len(errors) == 1
        assert "nginx could not be reloaded" in formatEvent(errors[0])
        assert control.calls.count("reload") == 6  # still tried every round
        control.running = True
        clock.advance(10)
        reached = [formatEvent(e) for e in events if "nginx reached" in formatEvent(e)]
        assert len(reached) == 1
        assert service.reloaded == service.generations.live()
        # A second episode is said again.
        control.running = False
        pki.revoke(pki.leaf("m1", "agent1", usage="client"))
        clock.advance(10)
        clock.advance(10)
        assert len([e for e in events if e["log_level"] == LogLevel.error]) == 2
    finally:
        globalLogPublisher.removeObserver(observer)
        service.stopService()


def test_a_revoked_master_leaves_the_front_within_one_round(tmp_path: Path, pki: FrontPKI) -> None:
    """`node revoke` deregisters the master in its own transaction: the next round drops it."""
    issued = pki.leaf("m1", "m1", sans=["puppet.test"], usage="server")
    certificate = Path(issued.certificate).read_text()
    Records(pki.store).create(NodeRecord(
        certname="m1", instance_id="i-0m1", role="master", account="123456789012", region="us-east-1",
        private_ip="10.0.0.1", serial=issued.serial, issuer="m1", certificate_pem=certificate,
        enrolled_at=1.0, not_after=2e9))
    Records(pki.store).create(
        MasterRecord(certname="m1", address="10.0.0.1", port=8140, ca="m1", registered_at=1))
    service, _, clock = make_service(tmp_path, pki, Synchronous())
    service.startService()
    nginx_conf = tmp_path / "front" / "live" / "nginx.conf"
    assert "10.0.0.1:8140" in nginx_conf.read_text()
    assert revoke_identity(pki.records, pki.authority, "m1", "keyCompromise", clock.seconds) is not None
    clock.advance(10)
    assert "10.0.0.1:8140" not in nginx_conf.read_text()
    service.stopService()


def test_a_draining_master_leaves_the_upstream_at_the_next_round_and_its_ca_stays(
    tmp_path: Path, pki: FrontPKI
) -> None:
    pki.add_ca("m2")
    records = Records(pki.store)
    records.create(MasterRecord(certname="m1", address="10.0.0.1", port=8140, ca="m1", registered_at=1))
    records.create(MasterRecord(certname="m2", address="10.0.0.2", port=8140, ca="m2", registered_at=2))
    service, _, clock = make_service(tmp_path, pki, Synchronous())
    service.startService()
    live = tmp_path / "front" / "live"
    assert upstream_servers((live / "nginx.conf").read_text(), MASTERS_UPSTREAM) == ["10.0.0.1:8140",
                                                                                     "10.0.0.2:8140"]
    ca_before = (live / "ca.pem").read_bytes()
    found = records.get(MasterRecord, "m1")
    assert found is not None
    records.replace(evolve(found.record, draining_since=clock.seconds(), drain_token=7), found.version)
    clock.advance(10)
    assert upstream_servers((live / "nginx.conf").read_text(), MASTERS_UPSTREAM) == ["10.0.0.2:8140"]
    # Not through its own port either: no new agent's first test run reaches it.
    assert "10.0.0.1:8140" not in (live / "nginx.conf").read_text()
    # Its agents' certificates still verify, through the other master.
    assert (live / "ca.pem").read_bytes() == ca_before
    service.stopService()
