"""Draining a master and terminating it, against moto and a real SQLite store, behind a guard."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from attrs import evolve
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from puppetha.aws.boto import Boto3Cloud
from puppetha.enroll.service import _healthy_master_cas
from puppetha.ha.autoscale import FleetControl, ScaleActionRecord, ScalingService, fleet_masters
from puppetha.ha.drain import MARK_ATTEMPTS, SHUTTING_DOWN_TITLE, Drainer, DrainRefused, ShuttingDownWorkers
from puppetha.ha.health import set_health
from puppetha.ha.primary import NotPrimary
from puppetha.ha.scaling import (
    DRAIN,
    DRAINED,
    DRAINING,
    HOLD,
    SERVING,
    Master,
    MasterLoad,
    Sample,
    ScaleDecision,
    ScaleSettings,
)
from puppetha.store import IStore, Item, Value, Write
from puppetha.store.records import CARecord, MasterRecord, NodeRecord, Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.moto import TEST_CREDENTIALS, Fleet, MotoServer
from tests.test_autoscale import Guard, Synchronous, registered, result

REGION = "us-east-1"
SETTINGS = ScaleSettings(enabled=True, drain_timeout=120.0)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def fleet(moto: MotoServer) -> Fleet:
    moto.reset()
    return Fleet(moto.endpoint_url, REGION)


@pytest.fixture
def records(tmp_path: Path) -> Iterator[Records]:
    store = SQLiteStore(str(tmp_path / "puppetha.sqlite"))
    yield Records(store)
    store.close()


def enrolled_master(records: Records, fleet: Fleet, certname: str) -> str:
    """A running master instance, enrolled (node record, CA, registration); its instance id."""
    info = fleet.launch("master")
    records.create(NodeRecord(certname=certname, instance_id=info.instance_id, role="master",
                              account="123456789012", region=REGION, private_ip=info.private_ip, serial=1,
                              issuer="root", certificate_pem="", enrolled_at=0.0, not_after=1e10))
    records.create(CARecord(name=certname, certificate_pem="", sealed_key="", parent="root", created_at=0.0))
    records.create(MasterRecord(certname=certname, address=info.private_ip, port=8140, ca=certname,
                                registered_at=0.0))
    return info.instance_id


def beside_another(records: Records, fleet: Fleet, certname: str) -> str:
    """``certname`` enrolled with another master in service (so that it may be drained)."""
    enrolled_master(records, fleet, "other")
    return enrolled_master(records, fleet, certname)


def drainer(moto: MotoServer, records: Records, guard: Guard, clock: Clock, *,
            in_flight: Any = None, pokes: list[str] | None = None) -> Drainer:
    cloud = Boto3Cloud(moto.endpoint_url, access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
                       secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"])
    control = FleetControl(clock=clock, guard=guard, records=records, blocking=Synchronous(), cloud=cloud,
                           aws=Synchronous(), region=REGION)
    return Drainer(control, settings=SETTINGS, in_flight=in_flight,
                   poke=(lambda: pokes.append("poke")) if pokes is not None else None)


def master(records: Records, certname: str) -> MasterRecord:
    found = records.get(MasterRecord, certname)
    assert found is not None
    return found.record


def state(fleet: Fleet, instance_id: str) -> str:
    return fleet.describe(instance_id).state


def started_clock() -> Clock:
    clock = Clock()
    clock.advance(1000.0)
    return clock


DRAIN_M1 = ScaleDecision(DRAIN, "busy 0.10 <= 0.3 for 600s", master="m1")


def test_fleet_masters_reports_draining_and_drained() -> None:
    masters = fleet_masters(
        [registered("m1", 0.0),
         MasterRecord("m2", "10.0.0.2", 8140, "m2", 0.0, draining_since=950.0, drain_token=7),
         # Unhealthy while draining: still on its way out, and still counted as such.
         MasterRecord("m3", "10.0.0.3", 8140, "m3", 0.0, healthy=False, draining_since=800.0,
                      drain_token=7, drained_at=900.0)],
        enrolled_instances=["m1", "m2", "m3"], launched={}, now=1000.0, warmup=300.0)
    assert masters == [Master("m1", SERVING, 300.0), Master("m2", DRAINING, 950.0),
                       Master("m3", DRAINED, 900.0)]


def test_an_old_master_record_without_drain_fields_reads_as_not_draining(records: Records) -> None:
    records.store.create("master", "m1", {"certname": "m1", "address": "10.0.0.1", "port": 8140, "ca": "m1",
                                           "registered_at": 0.0, "healthy": True})
    found = records.get(MasterRecord, "m1")
    assert found is not None
    assert (found.record.draining, found.record.drain_token, found.record.drained_at) == (False, None, None)


def test_a_draining_master_gets_no_new_agents(moto: MotoServer, fleet: Fleet, records: Records) -> None:
    enrolled_master(records, fleet, "m1")
    enrolled_master(records, fleet, "m2")
    assert _healthy_master_cas(records) == ["m1", "m2"]
    result(drainer(moto, records, Guard(), started_clock()).act(DRAIN_M1, 7))
    assert _healthy_master_cas(records) == ["m2"]


# Rounds every 10 s after the decision at t=1000 s; ``in_flight`` is what the front says at
# each later round (None: no signal).  When the instance is terminated, and why.
@pytest.mark.parametrize(("in_flight", "terminated_at"), [
    pytest.param([0], 1010.0, id="nothing in flight: terminated at the round after the mark"),
    pytest.param([3, 2, 1, 0], 1040.0, id="requests end after 30 s"),
    pytest.param([5], 1120.0, id="requests never end: drain_timeout"),
    pytest.param(None, 1120.0, id="no signal of requests: drain_timeout"),
])
def test_a_drain_terminates_once_nothing_is_in_flight_or_after_drain_timeout(
    moto: MotoServer, fleet: Fleet, records: Records, in_flight: list[int] | None, terminated_at: float,
) -> None:
    instance = beside_another(records, fleet, "m1")
    clock = started_clock()
    answers = list(in_flight or [])
    asked: list[str] = []

    def front_in_flight(certname: str) -> int:
        asked.append(certname)
        return answers.pop(0) if len(answers) > 1 else answers[0]

    pokes: list[str] = []
    drain = drainer(moto, records, Guard(), clock,
                    in_flight=front_in_flight if in_flight is not None else None, pokes=pokes)
    record = result(drain.act(DRAIN_M1, 7))
    # Recorded with its token and instance, then the master marked; the front poked; nothing ended.
    assert (record.action, record.token, record.master, record.instances, record.finished_at) == (
        DRAIN, 7, "m1", (instance,), None)
    marked = master(records, "m1")
    assert (marked.draining_since, marked.drain_token, marked.drained_at) == (1000.0, 7, None)
    assert pokes == ["poke"]
    assert state(fleet, instance) == "running"
    while drain.unfinished():
        clock.advance(10.0)
        assert clock.seconds() <= 1200.0
        result(drain.advance(7))
        if drain.unfinished():
            assert state(fleet, instance) == "running"
    assert clock.seconds() == terminated_at
    assert state(fleet, instance) in {"shutting-down", "terminated"}
    # Deregistered as the life cycle does it: the registration goes, the CA stays.
    assert records.get(MasterRecord, "m1") is None
    assert records.get(CARecord, "m1") is not None
    (done,) = [v.record for v in records.list(ScaleActionRecord)]
    assert done.finished_at == terminated_at
    assert pokes == ["poke", "poke"]
    assert set(asked) <= {"m1"}


def test_an_unknown_master_is_not_drained(moto: MotoServer, fleet: Fleet, records: Records) -> None:
    outcome = result(drainer(moto, records, Guard(), started_clock()).act(DRAIN_M1, 7))
    assert outcome.check(DrainRefused)
    assert records.list(ScaleActionRecord) == []


def test_the_last_master_in_service_is_not_drained(moto: MotoServer, fleet: Fleet, records: Records) -> None:
    instance = enrolled_master(records, fleet, "m1")
    enrolled_master(records, fleet, "m2")
    enrolled_master(records, fleet, "m3")
    down = records.get(MasterRecord, "m2")
    draining = records.get(MasterRecord, "m3")
    assert down is not None
    assert draining is not None
    records.replace(evolve(down.record, healthy=False), down.version)
    records.replace(evolve(draining.record, draining_since=900.0, drain_token=7), draining.version)
    # Whatever decided it (a policy bug, a bound): m2 is down and m3 draining, m1 stays.
    outcome = result(drainer(moto, records, Guard(), started_clock()).act(DRAIN_M1, 7))
    assert outcome.check(DrainRefused)
    assert "last one in service" in str(outcome.value)
    assert records.list(ScaleActionRecord) == []
    assert not master(records, "m1").draining
    assert state(fleet, instance) == "running"


def test_a_drain_decided_twice_is_one_drain(moto: MotoServer, fleet: Fleet, records: Records) -> None:
    beside_another(records, fleet, "m1")
    drain = drainer(moto, records, Guard(), started_clock())
    first = result(drain.act(DRAIN_M1, 7))
    again = result(drain.act(DRAIN_M1, 7))
    assert first == again
    assert len(records.list(ScaleActionRecord)) == 1


# --- the deposed primary and the lost lease


def test_a_refused_guard_records_marks_and_terminates_nothing(
    moto: MotoServer, fleet: Fleet, records: Records
) -> None:
    instance = beside_another(records, fleet, "m1")
    for guard, token in [(Guard(passes=0), 7), (Guard(token=8), 7)]:
        outcome = result(drainer(moto, records, guard, started_clock()).act(DRAIN_M1, token))
        assert outcome.check(NotPrimary)
    assert records.list(ScaleActionRecord) == []
    found = master(records, "m1")
    assert not found.draining
    assert state(fleet, instance) == "running"


def test_a_lease_lost_after_the_record_is_resumed_by_the_next_primary(
    moto: MotoServer, fleet: Fleet, records: Records
) -> None:
    instance = beside_another(records, fleet, "m1")
    clock = started_clock()
    # The guard passes once (before the record), then the lease is gone: nothing marked.
    outcome = result(drainer(moto, records, Guard(passes=1), clock).act(DRAIN_M1, 7))
    assert outcome.check(NotPrimary)
    found = master(records, "m1")
    assert not found.draining
    # The next primary (token 8) finds the drain and carries it through under its own token.
    successor = drainer(moto, records, Guard(token=8), clock, in_flight=lambda certname: 0)
    (unfinished,) = successor.unfinished()
    assert unfinished.token == 7
    result(successor.advance(8))
    found = master(records, "m1")
    assert found.drain_token == 8
    clock.advance(10.0)
    result(successor.advance(8))
    assert successor.unfinished() == []
    assert state(fleet, instance) in {"shutting-down", "terminated"}


def test_a_deposed_primary_cannot_terminate_a_drained_master(
    moto: MotoServer, fleet: Fleet, records: Records
) -> None:
    instance = beside_another(records, fleet, "m1")
    clock = started_clock()
    result(drainer(moto, records, Guard(), clock).act(DRAIN_M1, 7))
    clock.advance(200.0)
    # Another node took the lease (token 8): the old primary's next step is refused before it
    # marks the master drained, and before TerminateInstances.
    deposed = drainer(moto, records, Guard(token=8), clock, in_flight=lambda certname: 0)
    outcome = result(deposed.advance(7))
    assert outcome.check(NotPrimary)
    assert state(fleet, instance) == "running"
    found = master(records, "m1")
    assert found.drained_at is None


def test_a_crash_after_termination_is_finished_by_the_next_round(
    moto: MotoServer, fleet: Fleet, records: Records
) -> None:
    instance = beside_another(records, fleet, "m1")
    clock = started_clock()
    result(drainer(moto, records, Guard(), clock).act(DRAIN_M1, 7))
    clock.advance(10.0)
    # Two guard checks pass (before marking it drained, before TerminateInstances) and the third,
    # before the deregistration, does not: the instance is terminated, its master still registered.
    outcome = result(drainer(moto, records, Guard(passes=2), clock, in_flight=lambda certname: 0).advance(7))
    assert outcome.check(NotPrimary)
    assert state(fleet, instance) in {"shutting-down", "terminated"}
    assert records.get(MasterRecord, "m1") is not None
    again = drainer(moto, records, Guard(), clock, in_flight=lambda certname: 0)
    (done,) = result(again.advance(7))
    assert done.finished_at == 1010.0
    assert records.get(MasterRecord, "m1") is None
    assert again.unfinished() == []


def test_a_master_retired_by_the_life_cycle_mid_drain_finishes_the_drain(
    moto: MotoServer, fleet: Fleet, records: Records
) -> None:
    instance = beside_another(records, fleet, "m1")
    clock = started_clock()
    drain = drainer(moto, records, Guard(), clock, in_flight=lambda certname: 3)
    result(drain.act(DRAIN_M1, 7))
    # Its instance died and the sweep deregistered it before its requests were said to end.
    fleet.terminate(instance)
    records.store.delete(MasterRecord.KIND, "m1")
    clock.advance(10.0)
    (done,) = result(drain.advance(7))
    assert done.finished_at == 1010.0
    assert drain.unfinished() == []
    assert master(records, "other").healthy


# --- another writer between a step's read and its write


@implementer(IStore)
class HealthWritesFirst:
    """
    The real store, where the health loop marks ``certname`` unhealthy just before each of the
    next ``times`` writes (replace or delete) of that master's record: the writer that read it
    finds another version.
    """

    def __init__(self, store: IStore, certname: str, times: int) -> None:
        self.store = store
        self.certname = certname
        self.times = times
        self.written = 0

    def _health_writes(self, kind: str, key: str) -> None:
        if kind == MasterRecord.KIND and key == self.certname and self.times:
            self.times -= 1
            records = Records(self.store)
            found = records.get(MasterRecord, key)
            assert found is not None
            assert set_health(self.store, found, False)
            self.written += 1

    def get(self, kind: str, key: str) -> Item | None:
        return self.store.get(kind, key)

    def create(self, kind: str, key: str, value: Value) -> Item:
        return self.store.create(kind, key, value)

    def replace(self, kind: str, key: str, value: Value, expected_version: int) -> Item:
        self._health_writes(kind, key)
        return self.store.replace(kind, key, value, expected_version)

    def delete(self, kind: str, key: str, expected_version: int | None = None) -> bool:
        self._health_writes(kind, key)
        return self.store.delete(kind, key, expected_version)

    def list(self, kind: str, prefix: str = "") -> list[Item]:
        return self.store.list(kind, prefix)

    def transact(self, writes: Sequence[Write]) -> None:
        self.store.transact(writes)

    def close(self) -> None:
        self.store.close()


def test_a_health_write_before_the_drain_marks_its_master_is_read_again_at_once(
    moto: MotoServer, fleet: Fleet, records: Records
) -> None:
    beside_another(records, fleet, "m1")
    clock = started_clock()
    interleaved = HealthWritesFirst(records.store, "m1", times=2)
    pokes: list[str] = []
    drain = drainer(moto, Records(interleaved), Guard(), clock, in_flight=lambda certname: 0, pokes=pokes)
    result(drain.act(DRAIN_M1, 7))
    # Marked draining in the same step, over the health loop's writes, which stand.
    marked = master(records, "m1")
    assert interleaved.written == 2
    assert (marked.draining_since, marked.drain_token, marked.healthy) == (1000.0, 7, False)
    assert pokes == ["poke"]


def test_a_health_write_before_the_drain_marks_its_master_drained_is_read_again_at_once(
    moto: MotoServer, fleet: Fleet, records: Records
) -> None:
    instance = beside_another(records, fleet, "m1")
    clock = started_clock()
    interleaved = HealthWritesFirst(records.store, "m1", times=0)
    drain = drainer(moto, Records(interleaved), Guard(), clock, in_flight=lambda certname: 0)
    result(drain.act(DRAIN_M1, 7))
    clock.advance(10.0)
    # Between the step's read and its drained mark.
    interleaved.times = 1
    (done,) = result(drain.advance(7))
    assert interleaved.written == 1
    assert done.finished_at == 1010.0
    assert state(fleet, instance) in {"shutting-down", "terminated"}
    assert records.get(MasterRecord, "m1") is None


def test_a_master_written_under_every_try_is_drained_at_the_next_round(
    moto: MotoServer, fleet: Fleet, records: Records
) -> None:
    beside_another(records, fleet, "m1")
    clock = started_clock()
    interleaved = HealthWritesFirst(records.store, "m1", times=MARK_ATTEMPTS)
    drain = drainer(moto, Records(interleaved), Guard(), clock)
    recorded = result(drain.act(DRAIN_M1, 7))
    # Bounded: every try lost, the drain is recorded and its master not yet marked.
    assert interleaved.written == MARK_ATTEMPTS
    assert not master(records, "m1").draining
    assert [r.name for r in drain.unfinished()] == [recorded.name]
    clock.advance(10.0)
    result(drain.advance(7))
    assert master(records, "m1").draining_since == 1010.0


# --- the service acts on drain decisions


def test_the_scaling_service_drains_a_quiet_extra_master(
    moto: MotoServer, fleet: Fleet, records: Records
) -> None:
    m1 = enrolled_master(records, fleet, "m1")
    m2 = enrolled_master(records, fleet, "m2")
    clock = started_clock()
    drain = drainer(moto, records, Guard(), clock, in_flight=lambda certname: 0)

    def sample(now: float) -> Deferred[Sample]:
        quiet = MasterLoad(in_flight=0, jruby_size=4, jruby_free=4)
        return succeed(Sample(now, {"m1": quiet, "m2": quiet}))

    def masters(now: float) -> Deferred[list[Master]]:
        return succeed(fleet_masters([v.record for v in records.list(MasterRecord)], ["m1", "m2"], {},
                                     now, SETTINGS.warmup))

    settings = ScaleSettings(enabled=True, min_masters=1)
    service = ScalingService(clock=clock, settings=settings, interval=10.0, guard=Guard(), sample=sample,
                             masters=masters, launcher=None, drainer=drain)  # type: ignore[arg-type]
    service.startService()
    clock.pump([10.0] * 6 * 15)
    service.stopService()
    # Quiet for in_window (600 s): one drain, of the first by name (equal agents and load), carried
    # to its end at the next round; nothing else.
    (done,) = [v.record for v in records.list(ScaleActionRecord)]
    assert (done.action, done.master, done.token, done.decided_at) == (DRAIN, "m1", 7, 1600.0)
    assert done.finished_at == 1610.0
    assert {d.action for _, d in service.decisions} == {HOLD}
    assert state(fleet, m1) in {"shutting-down", "terminated"}
    assert state(fleet, m2) == "running"
    assert [v.record.certname for v in records.list(MasterRecord)] == ["m2"]


# --- the front's signal: nginx's old workers


def test_shutting_down_workers_counts_the_nginx_masters_old_workers(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid, ppid, title in [(100, 1, b"nginx: master process"), (101, 100, b"nginx: worker process"),
                             (102, 100, SHUTTING_DOWN_TITLE), (103, 100, SHUTTING_DOWN_TITLE),
                             (104, 55, SHUTTING_DOWN_TITLE)]:
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "stat").write_text(f"{pid} (nginx) S {ppid} 1 1")
        (proc / str(pid) / "cmdline").write_bytes(title + b"\0")
    (tmp_path / "nginx.pid").write_text("100\n")
    assert ShuttingDownWorkers(str(tmp_path / "nginx.pid"), str(proc))("m1") == 2
    assert ShuttingDownWorkers(str(tmp_path / "absent.pid"), str(proc))("m1") == 0
