"""
The life cycle sweep: the plan as a table, then the sweep against moto with the real enrollment,
authority and store, judged by openssl with the CA and CRL bundles nginx would be given.
"""

from __future__ import annotations

import functools
import socket
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from puppetha import build
from puppetha.aws.boto import Boto3Cloud
from puppetha.aws.cloud import InstanceInfo
from puppetha.config import config_from_string
from puppetha.enroll.service import revoke_identity
from puppetha.ha.front import decide_trust
from puppetha.ha.lease import Holding
from puppetha.ha.lifecycle import (
    DEREGISTER,
    DEREGISTER_ATTEMPTS,
    KEEP,
    REVOKE,
    LifecycleSettings,
    LifecycleSweep,
    Retirement,
    deregister_masters,
    plan_lbnode_removals,
    plan_sweep,
)
from puppetha.ha.primary import FailoverService, NotPrimary
from puppetha.store import VersionConflict
from puppetha.store.records import CARecord, CRLRecord, LbNodeRecord, MasterRecord, NodeRecord, Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.tap import failover_service
from tests.test_drain import HealthWritesFirst

pytest.register_assert_rewrite("tests.enroll_fixtures")

from tests.enroll_fixtures import World, inline, openssl_verify  # noqa: E402 - after the rewrite hook

pytest_plugins = ["tests.enroll_fixtures"]

SETTINGS = LifecycleSettings()
NOW = 10_000.0


def node(instance_id: str, *, role: str = "agent", region: str = "us-east-1", enrolled_at: float = 0.0,
         revoked: bool = False, certname: str | None = None) -> NodeRecord:
    return NodeRecord(certname=certname or instance_id, instance_id=instance_id, role=role,
                      account="123456789012", region=region, private_ip="10.0.0.1", serial=1, issuer="ca",
                      certificate_pem="",
                      enrolled_at=enrolled_at, not_after=NOW * 10, revoked_at=1.0 if revoked else None)


def info(instance_id: str, state: str, region: str = "us-east-1") -> InstanceInfo:
    return InstanceInfo(instance_id, "123456789012", region, state, "10.0.0.1", "ip-10-0-0-1", "")


@pytest.mark.parametrize(
    ("row", "nodes", "masters", "described", "settings", "expected"),
    [
        ("running: nothing", [node("i-1")], [], {"us-east-1": {"i-1": info("i-1", "running")}}, SETTINGS, []),
        ("stopped: nothing (it may start again)", [node("i-1")], [],
         {"us-east-1": {"i-1": info("i-1", "stopped")}}, SETTINGS, []),
        ("terminated agent: revoked", [node("i-1")], [], {"us-east-1": {"i-1": info("i-1", "terminated")}},
         SETTINGS, [Retirement("i-1", ("i-1",), "terminated", REVOKE)]),
        ("shutting down master: revoked, and it was a master", [node("i-1", role="master")], ["i-1"],
         {"us-east-1": {"i-1": info("i-1", "shutting-down")}}, SETTINGS,
         [Retirement("i-1", ("i-1",), "shutting-down", REVOKE, ("i-1",))]),
        ("unknown to AWS long after enrolling: gone", [node("i-1")], [], {"us-east-1": {}}, SETTINGS,
         [Retirement("i-1", ("i-1",), "unknown to AWS", REVOKE)]),
        ("unknown to AWS just after enrolling: not yet (eventual consistency)",
         [node("i-1", enrolled_at=NOW - 60)], [], {"us-east-1": {}}, SETTINGS, []),
        ("its region could not be asked: nothing", [node("i-1")], [], {}, SETTINGS, []),
        ("already revoked: nothing", [node("i-1", revoked=True)], [],
         {"us-east-1": {"i-1": info("i-1", "terminated")}}, SETTINGS, []),
        ("policy off, agent: kept", [node("i-1")], [], {"us-east-1": {"i-1": info("i-1", "terminated")}},
         LifecycleSettings(revoke_terminated=False), [Retirement("i-1", ("i-1",), "terminated", KEEP)]),
        ("policy off, master: deregistered all the same", [node("i-1", role="master")], ["i-1"],
         {"us-east-1": {"i-1": info("i-1", "terminated")}}, LifecycleSettings(revoke_terminated=False),
         [Retirement("i-1", ("i-1",), "terminated", DEREGISTER, ("i-1",))]),
        ("one identity, two roles: one retirement", [node("i-1", certname="a"), node("i-1", certname="b")],
         ["b"], {"us-east-1": {"i-1": info("i-1", "terminated")}}, SETTINGS,
         [Retirement("i-1", ("a", "b"), "terminated", REVOKE, ("b",))]),
        ("regions apart", [node("i-1"), node("i-2", region="eu-west-1")], [],
         {"eu-west-1": {"i-2": info("i-2", "terminated", "eu-west-1")}}, SETTINGS,
         [Retirement("i-2", ("i-2",), "terminated", REVOKE)]),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_plan_sweep(row, nodes, masters, described, settings, expected) -> None:  # noqa: PLR0917 - a table
    assert plan_sweep(nodes, masters, described, NOW, settings) == expected


# --- the sweep against moto


class Guard:
    """The failover guard: primary under ``token`` until ``lose_after`` more checks pass."""

    def __init__(self, token: int | None = 7, lose_after: int | None = None) -> None:
        self.token = token
        self.lose_after = lose_after
        self.checks: list[int | None] = []

    def __call__(self, token: int | None) -> Holding:
        self.checks.append(token)
        if self.lose_after is not None:
            if self.lose_after == 0:
                self.token = None
            self.lose_after -= 1
        if self.token is None:
            raise NotPrimary("this node does not hold the lease")
        if token is not None and token != self.token:
            raise NotPrimary(f"token {token} is no longer current")
        return Holding("lb-primary", "i-lb", self.token, 1, 0.8, 0.2, 0.0)


def sweeper(world: World, guard: Guard, settings: LifecycleSettings = SETTINGS,
            cloud: Any = None, lb_region: str | None = None) -> LifecycleSweep:
    return LifecycleSweep(
        clock=world.clock,
        settings=settings,
        guard=guard,
        records=world.records,
        blocking=inline(None),
        cloud=cloud or world.cloud,
        aws=inline(None),
        revoke=functools.partial(revoke_identity, world.records, world.authority, now=world.clock.seconds),
        lb_region=lb_region,
    )


def sweep(s: LifecycleSweep) -> list[Retirement]:
    d: Deferred[list[Retirement]] = s.sweep()
    results: list[Any] = []
    d.addBoth(results.append)
    assert len(results) == 1
    if not isinstance(results[0], list):
        results[0].raiseException()
    done: list[Retirement] = results[0]
    return done


def bundles(world: World) -> tuple[str, str, tuple[str, ...]]:
    """What a front round gives nginx: the CA bundle, the CRL bundle, the trusted CAs."""
    trust = decide_trust([v.record for v in world.records.list(CARecord)],
                         [v.record for v in world.records.list(CRLRecord)])
    return trust.ca_pem.decode(), trust.crl_pem.decode(), trust.trusted


def verdict(world: World, tmp: Path, certificate: str) -> str:
    ca_pem, crl_pem, _ = bundles(world)
    tmp.mkdir(exist_ok=True)
    return openssl_verify(tmp, certificate, ca_pem, crl_pem, at=world.clock.seconds() + 60)


def enrolled(world: World, role: str = "agent") -> tuple[InstanceInfo, str]:
    instance = world.launch(role)
    answer = world.enroll(instance, role)
    assert answer.status == 200, answer.body
    return instance, answer.json["certificate"]


def test_a_terminated_agent_is_revoked_and_nginx_s_crl_carries_it(world: World, tmp_path: Path) -> None:
    enrolled(world, "master")
    agent, certificate = enrolled(world)
    _, neighbours_certificate = enrolled(world)
    assert "OK" in verdict(world, tmp_path / "before", certificate)

    world.fleet.terminate(agent.instance_id)
    guard = Guard()
    done = sweep(sweeper(world, guard))
    assert [(r.instance_id, r.action) for r in done] == [(agent.instance_id, REVOKE)]
    # Every action was checked under the token the sweep began with.
    assert guard.checks == [None, 7]
    stored = world.records.get(NodeRecord, agent.instance_id)
    assert stored is not None
    assert stored.record.revoked
    assert "certificate revoked" in verdict(world, tmp_path / "after", certificate)
    assert "OK" in verdict(world, tmp_path / "neighbour", neighbours_certificate)
    # Done once: the next sweep finds nothing to do.
    assert sweep(sweeper(world, Guard())) == []


def test_a_terminated_master_leaves_the_upstream_and_its_ca_stays(world: World, tmp_path: Path) -> None:
    master, _ = enrolled(world, "master")
    _, agents_certificate = enrolled(world)  # signed by the master's CA
    other, _ = enrolled(world, "master")
    _, _, trusted_before = bundles(world)

    world.fleet.terminate(master.instance_id)
    done = sweep(sweeper(world, Guard()))
    assert [(r.instance_id, r.masters) for r in done] == [(master.instance_id, (master.instance_id,))]
    assert world.records.get(MasterRecord, master.instance_id) is None
    assert world.records.get(MasterRecord, other.instance_id) is not None
    # Its CA stays in nginx's bundle with its CRL, so the agents it signed keep working.
    _, _, trusted_after = bundles(world)
    assert trusted_after == trusted_before
    assert "OK" in verdict(world, tmp_path / "agent", agents_certificate)
    # New agents are signed by the master that is left.
    _, new_certificate = enrolled(world)
    assert "OK" in verdict(world, tmp_path / "new", new_certificate)


def test_with_the_policy_off_an_agent_keeps_its_certificate_and_a_master_still_leaves(
    world: World, tmp_path: Path
) -> None:
    master, _ = enrolled(world, "master")
    agent, certificate = enrolled(world)
    world.fleet.terminate(agent.instance_id, master.instance_id)
    done = sweep(sweeper(world, Guard(), LifecycleSettings(revoke_terminated=False)))
    assert {r.instance_id: r.action for r in done} == {master.instance_id: DEREGISTER}
    assert world.records.get(MasterRecord, master.instance_id) is None
    for instance in (agent, master):
        stored = world.records.get(NodeRecord, instance.instance_id)
        assert stored is not None
        assert not stored.record.revoked
    assert "OK" in verdict(world, tmp_path / "agent", certificate)


def test_a_standby_does_nothing(world: World) -> None:
    enrolled(world, "master")
    agent, _ = enrolled(world)
    world.fleet.terminate(agent.instance_id)
    before = world.state()
    assert sweep(sweeper(world, Guard(token=None))) == []
    assert world.state() == before


def test_losing_the_lease_mid_sweep_stops_before_acting(world: World) -> None:
    enrolled(world, "master")
    agent, _ = enrolled(world)
    world.fleet.terminate(agent.instance_id)
    before = world.state()
    guard = Guard(lose_after=1)  # the first check passes, the one before the revocation does not
    assert sweep(sweeper(world, guard)) == []
    assert guard.checks == [None, 7]
    assert world.state() == before


def lbnode(instance_id: str, updated_at: float = NOW) -> LbNodeRecord:
    return LbNodeRecord(instance_id, "10.0.0.9", 7946, 1.0, "standby", 3, "gen-1", updated_at)


@pytest.mark.parametrize(
    ("row", "described", "expected"),
    [
        ("running: kept", {"i-b": info("i-b", "running")}, []),
        ("terminated: removed", {"i-b": info("i-b", "terminated")}, ["i-b"]),
        ("shutting down: removed", {"i-b": info("i-b", "shutting-down")}, ["i-b"]),
        ("stopped: kept (it may start again)", {"i-b": info("i-b", "stopped")}, []),
        ("unknown to AWS, reported within the grace: kept", {}, []),
        ("AWS could not be asked: nothing decided", None, []),
        ("the sweeping primary itself is never removed", {"i-a": info("i-a", "terminated")}, []),
    ],
)
def test_plan_lbnode_removals(
    row: str, described: dict[str, InstanceInfo] | None, expected: list[str]
) -> None:
    lbnodes = [lbnode("i-a"), lbnode("i-b", updated_at=NOW - 60)]
    assert plan_lbnode_removals(lbnodes, described, NOW, SETTINGS, own="i-a") == expected


def test_plan_lbnode_removals_forgets_a_node_aws_forgot_long_ago() -> None:
    old = lbnode("i-b", updated_at=NOW - SETTINGS.grace)
    assert plan_lbnode_removals([old], {}, NOW, SETTINGS, own="i-a") == ["i-b"]
    assert plan_lbnode_removals([old], {}, NOW - 1, SETTINGS, own="i-a") == []


def test_the_primary_removes_the_registrations_of_terminated_lb_nodes(world: World) -> None:
    alive, dead = world.launch("lb"), world.launch("lb")
    for instance in (alive, dead):
        world.records.create(lbnode(instance.instance_id, updated_at=world.clock.seconds()))
    world.fleet.terminate(dead.instance_id)
    region = dead.region
    # A standby, or a sweep not told the lb nodes' region, removes nothing.
    before = world.state()
    assert sweep(sweeper(world, Guard(token=None), lb_region=region)) == []
    sweep(sweeper(world, Guard()))
    assert world.state() == before
    guard = Guard()
    sweep(sweeper(world, guard, lb_region=region))
    assert guard.checks == [None, 7]  # removed under the token the sweep began with
    assert world.records.get(LbNodeRecord, dead.instance_id) is None
    assert world.records.get(LbNodeRecord, alive.instance_id) is not None


def test_an_lb_node_that_wrote_its_record_during_the_sweep_keeps_it(world: World) -> None:
    dead = world.launch("lb")
    world.records.create(lbnode(dead.instance_id, updated_at=world.clock.seconds()))
    world.fleet.terminate(dead.instance_id)

    class Rewrites(Guard):
        """The node writes its record between the sweep's read and its removal."""

        def __call__(self, token: int | None) -> Holding:
            if token is not None:
                current = world.records.get(LbNodeRecord, dead.instance_id)
                assert current is not None
                world.records.replace(current.record, current.version)
            return super().__call__(token)

    sweep(sweeper(world, Rewrites(), lb_region=dead.region))
    assert world.records.get(LbNodeRecord, dead.instance_id) is not None


def test_losing_the_lease_before_removing_lb_nodes_removes_none(world: World) -> None:
    dead = world.launch("lb")
    world.records.create(lbnode(dead.instance_id, updated_at=world.clock.seconds()))
    world.fleet.terminate(dead.instance_id)
    sweep(sweeper(world, Guard(lose_after=1), lb_region=dead.region))
    assert world.records.get(LbNodeRecord, dead.instance_id) is not None


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_aws_down_decides_nothing(world: World) -> None:
    enrolled(world, "master")
    agent, _ = enrolled(world)
    world.fleet.terminate(agent.instance_id)
    # Long past the grace: were the failed answer read as "unknown", the agent would be revoked.
    world.clock.advance(SETTINGS.grace * 10)
    down = Boto3Cloud(f"http://127.0.0.1:{closed_port()}", access_key_id="testing",
                      secret_access_key="testing", deadline=1.0)
    before = world.state()
    assert sweep(sweeper(world, Guard(), cloud=down)) == []
    assert world.state() == before


# --- the daemon's wiring


class StubFront(Service):
    """What failover_service reads of the front service."""

    name = "front"
    reloaded = None

    def poke(self) -> Deferred[None]:
        return Deferred()


def test_the_sweep_runs_beside_failover_behind_its_guard(tmp_path: Path) -> None:
    config = config_from_string(
        f"[daemon]\nstate_dir = {tmp_path}\n"
        "[ha]\nelastic_ip = eipalloc-0123456789abcdef0\ninstance_id = i-0123456789abcdef0\n"
        "address = 127.0.0.1\n"
        "[lifecycle]\ninterval = 30s\nrevoke_terminated = false\ngrace = 1h\n"
    )
    clock = Clock()
    store = SQLiteStore(str(tmp_path / "puppetha.sqlite"))
    try:
        records = Records(store)
        vault = build.open_vault(config, create=True)
        authority = build.make_authority(config, records, vault, clock.seconds)
        front = MultiService()
        StubFront().setServiceParent(front)
        services = failover_service(config, clock, records=records, vault=vault, cloud=cast(Any, None),
                                    aws=cast(Any, None), front=front, authority=authority,
                                    signing=cast(Any, None))
        children = list(cast(MultiService, services))
        failover = next(s for s in children if isinstance(s, FailoverService))
        sweep = next(s for s in children if isinstance(s, LifecycleSweep))
        # Started after failover, so stopped before it.
        assert children.index(sweep) > children.index(failover)
        assert sweep.guard == failover.guard
        assert sweep.settings == LifecycleSettings(interval=30.0, revoke_terminated=False, grace=3600.0)
        assert sweep.lb_region == config[("aws", "region")]
    finally:
        store.close()


def registration(certname: str) -> MasterRecord:
    return MasterRecord(certname=certname, address="10.0.0.9", port=8140, ca=certname, registered_at=1.0)


@pytest.mark.parametrize(
    ("health_writes", "removed"),
    [
        (0, ["m1", "m2"]),
        # The health loop marked m1 between the read and the delete: read again, deleted.
        (1, ["m1", "m2"]),
        (DEREGISTER_ATTEMPTS - 1, ["m1", "m2"]),
    ],
)
def test_a_registration_written_during_its_deregistration_is_read_again_and_removed(
    tmp_path: Path, health_writes: int, removed: list[str]
) -> None:
    store = SQLiteStore(str(tmp_path / "puppetha.sqlite"))
    try:
        records = Records(store)
        for certname in ("m1", "m2", "m3"):
            records.create(registration(certname))
        interleaved = HealthWritesFirst(store, "m1", times=health_writes)
        assert deregister_masters(Records(interleaved), ["m1", "m2", "gone"]) == removed
        assert interleaved.written == health_writes
        assert [v.record.certname for v in records.list(MasterRecord)] == ["m3"]
    finally:
        store.close()


def test_a_registration_written_under_every_try_stays_and_says_so(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "puppetha.sqlite"))
    try:
        records = Records(store)
        records.create(registration("m1"))
        interleaved = HealthWritesFirst(store, "m1", times=DEREGISTER_ATTEMPTS)
        with pytest.raises(VersionConflict):
            deregister_masters(Records(interleaved), ["m1"])
        # The sweep's round fails and the next one deregisters it.
        assert records.get(MasterRecord, "m1") is not None
        assert deregister_masters(Records(interleaved), ["m1"]) == ["m1"]
    finally:
        store.close()
