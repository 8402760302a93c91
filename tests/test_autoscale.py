"""Launching masters for a decision, against moto and a real SQLite store, behind a guard."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from puppetha.aws.boto import Boto3Cloud
from puppetha.aws.cloud import InstanceInfo
from puppetha.ha.autoscale import (
    KEPT_DECISIONS,
    LAUNCHED_BY_TAG,
    SCALE_LOG,
    FleetControl,
    Launcher,
    ScaleActionRecord,
    ScaleLogRecord,
    ScalingService,
    discover_fleet,
    fleet_masters,
    launched_masters,
    write_decision,
)
from puppetha.ha.lease import Holding
from puppetha.ha.primary import NotPrimary
from puppetha.ha.scaling import (
    DRAIN,
    HOLD,
    LAUNCH,
    SERVING,
    STARTING,
    WARMING,
    Master,
    MasterLoad,
    Sample,
    ScaleDecision,
    ScaleSettings,
)
from puppetha.store.records import MasterRecord, NodeRecord, Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.moto import ROLE_TAG, TEST_CREDENTIALS, Fleet, MotoServer

REGION = "us-east-1"


def registered(name: str, at: float, healthy: bool = True) -> MasterRecord:
    return MasterRecord(certname=name, address="10.0.0.1", port=8140, ca=name, registered_at=at,
                        healthy=healthy)


def launched(instance_id: str, at: float) -> InstanceInfo:
    return InstanceInfo(instance_id, "123456789012", REGION, "running", "", "", "", launch_time=at)


def test_fleet_masters() -> None:
    masters = fleet_masters(
        [registered("i-a", 0.0), registered("i-b", 900.0), registered("i-c", 0.0, healthy=False),
         # Enrolled, its puppetserver not answering yet: warming, not gone (else launched again).
         registered("i-e", 950.0, healthy=False)],
        enrolled_instances=["i-a", "i-b", "i-c", "i-e"],
        launched={"i-a": launched("i-a", 0.0), "i-d": launched("i-d", 950.0), "i-e": launched("i-e", 900.0)},
        now=1000.0,
        warmup=300.0,
    )
    assert masters == [Master("i-a", SERVING, 300.0), Master("i-b", WARMING, 900.0),
                       Master("i-e", WARMING, 950.0), Master("i-d", STARTING, 950.0)]


class Synchronous:
    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        try:
            return succeed(f(*args, **kwargs))
        except Exception:
            return fail()


class Guard:
    """Primary under ``token`` for ``passes`` more checks (None: for ever)."""

    def __init__(self, token: int = 7, passes: int | None = None) -> None:
        self.token = token
        self.passes = passes

    def __call__(self, token: int | None) -> Holding:
        if self.passes is not None:
            if self.passes <= 0:
                raise NotPrimary("this node does not hold the lease")
            self.passes -= 1
        if token is not None and token != self.token:
            raise NotPrimary(f"token {token} is no longer current")
        return Holding("lb-primary", "i-lb", self.token, 1, 0.8, 0.2, 0.0)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def fleet(moto: MotoServer) -> Fleet:
    moto.reset()
    fleet = Fleet(moto.endpoint_url, REGION)
    fleet.create_launch_template("puppet-master")
    return fleet


@pytest.fixture
def records(tmp_path: Path) -> Iterator[Records]:
    store = SQLiteStore(str(tmp_path / "puppetha.sqlite"))
    yield Records(store)
    store.close()


def launcher(moto: MotoServer, records: Records, guard: Guard) -> Launcher:
    clock = Clock()
    clock.advance(1000.0)
    cloud = Boto3Cloud(moto.endpoint_url, access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
                       secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"])
    control = FleetControl(clock=clock, guard=guard, records=records, blocking=Synchronous(), cloud=cloud,
                           aws=Synchronous(), region=REGION)
    return Launcher(control, launch_template="puppet-master")


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert len(out) == 1
    return out[0]


def instances(fleet: Fleet) -> list[dict[str, Any]]:
    return [i for r in fleet.ec2.describe_instances()["Reservations"] for i in r["Instances"]]


def test_a_launch_is_made_from_the_template_and_recorded_with_its_token(
    moto: MotoServer, fleet: Fleet, records: Records
) -> None:
    done = result(launcher(moto, records, Guard()).act(ScaleDecision(LAUNCH, "busy 0.93", 2), 7))
    assert isinstance(done, ScaleActionRecord)
    found = instances(fleet)
    assert sorted(i["InstanceId"] for i in found) == sorted(done.instances)
    for instance in found:
        tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
        # The template's role tag, for the master policy; the token, for whoever looks.
        assert tags[ROLE_TAG] == "master"
        assert tags[LAUNCHED_BY_TAG] == "7"
        assert instance["ClientToken"] == done.client_token
    stored = records.list(ScaleActionRecord)
    assert [v.record for v in stored] == [done]
    assert (done.action, done.token, done.count, done.reason, done.decided_at) == (LAUNCH, 7, 2, "busy 0.93",
                                                                                   1000.0)


@pytest.mark.parametrize("decision", [ScaleDecision(HOLD, "busy 0.5"),
                                      ScaleDecision(DRAIN, "quiet", master="m1")])
def test_other_decisions_launch_and_record_nothing(moto: MotoServer, fleet: Fleet, records: Records,
                                                   decision: ScaleDecision) -> None:
    assert result(launcher(moto, records, Guard()).act(decision, 7)) is None
    assert instances(fleet) == []
    assert records.list(ScaleActionRecord) == []


def test_a_refused_guard_launches_and_records_nothing(
    moto: MotoServer, fleet: Fleet, records: Records
) -> None:
    for guard, token in [(Guard(passes=0), 7), (Guard(token=8), 7)]:
        outcome = result(launcher(moto, records, guard).act(ScaleDecision(LAUNCH, "busy", 1), token))
        assert outcome.check(NotPrimary)
    assert instances(fleet) == []
    assert records.list(ScaleActionRecord) == []


def test_a_lease_lost_after_the_record_leaves_an_unfinished_launch_to_make_again(
    moto: MotoServer, fleet: Fleet, records: Records
) -> None:
    first = launcher(moto, records, Guard(passes=1))
    outcome = result(first.act(ScaleDecision(LAUNCH, "busy", 1), 7))
    assert outcome.check(NotPrimary)
    assert instances(fleet) == []
    (unfinished,) = first.unfinished()
    assert unfinished.instances == ()
    # Made again under the same token: the same client token, so EC2 would not launch twice.
    again = launcher(moto, records, Guard())
    done = result(again.launch(unfinished))
    assert len(done.instances) == 1
    assert instances(fleet)[0]["ClientToken"] == unfinished.client_token
    assert again.unfinished() == []


# --- the service: sample, decide, launch, on a clock


def busy_sample(now: float) -> Deferred[Sample]:
    return succeed(Sample(now, {"m1": MasterLoad(in_flight=4, jruby_size=4, jruby_free=0)}))


def run_service(moto: MotoServer, records: Records, guard: Guard, minutes: int) -> ScalingService:
    launch = launcher(moto, records, guard)
    clock = cast(Clock, launch.control.clock)

    def masters(now: float) -> Deferred[list[Master]]:
        # m1 serves; whatever was launched is starting (it never enrolls in this test).
        starting = [Master(i, STARTING, v.record.decided_at)
                    for v in records.list(ScaleActionRecord) for i in v.record.instances]
        return succeed([Master("m1", SERVING, 0.0), *starting])

    service = ScalingService(clock=clock, settings=ScaleSettings(enabled=True), interval=10.0, guard=guard,
                             sample=busy_sample, masters=masters, launcher=launch)
    service.startService()
    clock.pump([10.0] * (minutes * 6))
    service.stopService()
    return service


def test_a_busy_master_gets_one_more_and_the_starting_one_is_waited_for(
    moto: MotoServer, fleet: Fleet, records: Records
) -> None:
    service = run_service(moto, records, Guard(), minutes=10)
    # Busy from the first sample: launched once out_window (60 s) held, then held while it starts.
    (record,) = [v.record for v in records.list(ScaleActionRecord)]
    assert (record.decided_at - 1000.0, record.action, record.count, record.token) == (60.0, LAUNCH, 1, 7)
    assert {d.reason for _, d in service.decisions} == {"1 masters starting or warming"}
    assert [i["InstanceId"] for i in instances(fleet)] == list(record.instances)


def test_a_standby_samples_and_decides_nothing(moto: MotoServer, fleet: Fleet, records: Records) -> None:
    service = run_service(moto, records, Guard(passes=0), minutes=10)
    assert service.decisions == []
    assert service.history == []
    assert instances(fleet) == []
    assert records.list(ScaleActionRecord) == []


# --- what the daemon gives the service: the fleet, and the decisions kept for `puppetha status`


def test_decisions_are_kept_bounded_with_their_reasons(records: Records) -> None:
    write_decision(records, "i-lb1", 7, 10.0, ScaleDecision(HOLD, "busy 0.50"))
    write_decision(records, "i-lb1", 7, 20.0, ScaleDecision(HOLD, "busy 0.90"))
    # A hold replaces the hold before it: the latest stands for a run of them.
    kept = records.get(ScaleLogRecord, SCALE_LOG)
    assert kept is not None
    assert [(d["at"], d["reason"]) for d in kept.record.decisions] == [(20.0, "busy 0.90")]
    write_decision(records, "i-lb1", 7, 30.0, ScaleDecision(LAUNCH, "busy 0.95 >= 0.8 for 60s", 2))
    write_decision(records, "i-lb2", 8, 40.0, ScaleDecision(HOLD, "2 masters starting or warming"))
    kept = records.get(ScaleLogRecord, SCALE_LOG)
    assert kept is not None
    assert kept.record.decisions == (
        {"at": 20.0, "node": "i-lb1", "token": 7, "action": HOLD, "reason": "busy 0.90", "count": 0,
         "master": None},
        {"at": 30.0, "node": "i-lb1", "token": 7, "action": LAUNCH, "reason": "busy 0.95 >= 0.8 for 60s",
         "count": 2, "master": None},
        {"at": 40.0, "node": "i-lb2", "token": 8, "action": HOLD, "reason": "2 masters starting or warming",
         "count": 0, "master": None},
    )
    for i in range(2 * KEPT_DECISIONS):
        write_decision(records, "i-lb2", 8, 50.0 + i, ScaleDecision(DRAIN, f"quiet {i}", master="m1"))
    kept = records.get(ScaleLogRecord, SCALE_LOG)
    assert kept is not None
    assert len(kept.record.decisions) == KEPT_DECISIONS
    assert kept.record.decisions[-1]["reason"] == f"quiet {2 * KEPT_DECISIONS - 1}"


def test_the_fleet_from_the_store_and_ec2(moto: MotoServer, fleet: Fleet, records: Records) -> None:
    launch = launcher(moto, records, Guard())
    done = result(launch.act(ScaleDecision(LAUNCH, "busy", 2), 7))
    first, second = done.instances
    records.create(registered("m1", 0.0))
    # The first launched instance enrolled and registered as master m2 (its certname).
    records.create(registered("m2", 990.0))
    records.create(NodeRecord(certname="m2", instance_id=first, role="master", account="1", region=REGION,
                              private_ip="10.0.0.2", serial=2, issuer="root", certificate_pem="",
                              enrolled_at=990.0, not_after=2000.0))
    settings = ScaleSettings(enabled=True, warmup=300.0)

    def masters(now: float) -> list[Master]:
        found: list[Master] = result(discover_fleet(
            records=records, blocking=Synchronous(), cloud=launch.control.cloud, aws=Synchronous(),
            region=REGION, now=now, settings=settings))
        return found

    # EC2's launch time is the wall clock's; the test's clock is its own.
    assert [(m.name, m.state) for m in masters(1000.0)] == [("m1", SERVING), ("m2", WARMING),
                                                            (second, STARTING)]
    # Terminated, it is not coming any more; after launch_timeout nothing is looked up at all.
    fleet.ec2.terminate_instances(InstanceIds=[second])
    assert [(m.name, m.state) for m in masters(1000.0)] == [("m1", SERVING), ("m2", WARMING)]
    assert launched_masters(records, 1000.0 + settings.launch_timeout, settings.launch_timeout) == []


def test_the_service_keeps_each_decision_under_its_token(
    moto: MotoServer, fleet: Fleet, records: Records
) -> None:
    launch = launcher(moto, records, Guard())
    clock = cast(Clock, launch.control.clock)
    kept: list[tuple[float, str, int]] = []

    def publish(at: float, decision: ScaleDecision, token: int) -> Deferred[None]:
        kept.append((at, decision.action, token))
        return succeed(None)

    service = ScalingService(clock=clock, settings=ScaleSettings(enabled=True), interval=10.0, guard=Guard(),
                             sample=busy_sample, masters=lambda now: succeed([Master("m1", SERVING, 0.0)]),
                             launcher=launch, publish=publish)
    service.startService()
    clock.pump([10.0] * 6)
    service.stopService()
    assert kept == [(1000.0 + 10 * i, HOLD, 7) for i in range(6)] + [(1060.0, LAUNCH, 7)]
