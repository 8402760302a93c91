"""
The failover service of two lb nodes on one task.Clock: a real SQLite store between them (each
node's view of it can be cut), heartbeats over an in-memory wire (which can be cut too), and
an Elastic IP behind ICloud.  Checks the acting logs: never two nodes acting at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from zope.interface import implementer

from puppetha.aws.cloud import CloudError, ICloud, InstanceInfo
from puppetha.ha.failover import FailoverSettings
from puppetha.ha.heartbeat import HeartbeatProtocol
from puppetha.ha.lease import Lease
from puppetha.ha.primary import (
    OVERDUE,
    PRIMARY,
    STANDBY,
    ActingLog,
    ElasticIP,
    FailoverService,
    NotPrimary,
)
from puppetha.store import IStore, Item, StoreUnavailable, Value, Write
from puppetha.store.records import LbNodeRecord, LeaseRecord, Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.acting import overlaps, read_events, stray_associations, windows

SETTINGS = FailoverSettings()
ALLOCATION = "eipalloc-0123"
REGION = "us-east-1"
KEY = b"h" * 32


class Synchronous:
    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        try:
            return succeed(f(*args, **kwargs))
        except Exception:
            return fail()


@implementer(IStore)
class Reachable:
    """One node's way to the shared store, which a test can cut."""

    def __init__(self, store: IStore) -> None:
        self.store = store
        self.cut = False
        #: Writes land, but their answers are lost.
        self.lose_answers = False

    def _check(self) -> None:
        if self.cut:
            raise StoreUnavailable("cut off from the store")

    def get(self, kind: str, key: str) -> Item | None:
        self._check()
        return self.store.get(kind, key)

    def create(self, kind: str, key: str, value: Value) -> Item:
        self._check()
        return self.store.create(kind, key, value)

    def replace(self, kind: str, key: str, value: Value, expected_version: int) -> Item:
        self._check()
        item = self.store.replace(kind, key, value, expected_version)
        if self.lose_answers:
            raise StoreUnavailable("the answer was lost")
        return item

    def delete(self, kind: str, key: str, expected_version: int | None = None) -> bool:
        self._check()
        return self.store.delete(kind, key, expected_version)

    def list(self, kind: str, prefix: str = "") -> list[Item]:
        self._check()
        return self.store.list(kind, prefix)

    def transact(self, writes: Sequence[Write]) -> None:
        self._check()
        self.store.transact(writes)

    def close(self) -> None:
        pass


class ElasticIPs:
    """The Elastic IP as AWS keeps it; each node reaches it through its own :class:`CloudLink`."""

    def __init__(self) -> None:
        self.owner: str | None = None
        self.history: list[str] = []


@implementer(ICloud)
class CloudLink:
    """One node's way to AWS, which a test can cut or throttle."""

    def __init__(self, eips: ElasticIPs) -> None:
        self.eips = eips
        self.cut = False
        self.throttle = 0
        #: Every call made: its name and the test's clock then (set by the node).
        self.calls: list[tuple[str, float]] = []
        self.clock: Clock | None = None

    def _check(self, call: str = "AssociateAddress") -> None:
        self.calls.append((call, self.clock.seconds() if self.clock is not None else 0.0))
        if self.cut:
            raise CloudError("AssociateAddress: connect timeout")
        if self.throttle:
            self.throttle -= 1
            raise CloudError("AssociateAddress: RequestLimitExceeded")

    def describe_instances(self, region: str, instance_ids: Sequence[str]) -> dict[str, InstanceInfo]:
        raise NotImplementedError

    def associate_address(self, region: str, allocation_id: str, instance_id: str) -> str:
        self._check()
        self.eips.owner = instance_id
        self.eips.history.append(instance_id)
        return f"eipassoc-{len(self.eips.history)}"

    def describe_address(self, region: str, allocation_id: str) -> str | None:
        self._check("DescribeAddresses")
        return self.eips.owner

    def run_instances(
        self,
        region: str,
        launch_template: str,
        count: int,
        tags: Mapping[str, str] | None = None,
        client_token: str | None = None,
    ) -> list[str]:
        raise NotImplementedError

    def terminate_instances(self, region: str, instance_ids: Sequence[str]) -> dict[str, str]:
        raise NotImplementedError

    def find_instances(
        self, region: str, tags: Mapping[str, str], states: Sequence[str]
    ) -> dict[str, InstanceInfo]:
        raise NotImplementedError


class Wire:
    """UDP between the nodes, in memory: every datagram reaches its addressee unless cut."""

    def __init__(self) -> None:
        self.nodes: dict[tuple[str, int], HeartbeatProtocol] = {}
        self.cut: set[str] = set()

    def transport(self, source: tuple[str, int]) -> Any:
        wire = self

        class Transport:
            def write(self, datagram: bytes, addr: tuple[str, int]) -> None:
                target = wire.nodes.get(addr)
                if target is None or target.node in wire.cut or wire.nodes[source].node in wire.cut:
                    return
                target.datagramReceived(datagram, source)

        return Transport()


class Node:
    """
    One lb node.  Its monotonic clock runs at ``rate`` from ``offset`` (its own, unlike any
    other's), and its wall clock is off by ``wall_offset``; the reactor is the test's clock.
    """

    def __init__(self, name: str, address: str, *, clock: Clock, store: IStore, wire: Wire,
                 eips: ElasticIPs, log_path: Path, rate: float = 1.0, offset: float = 0.0,
                 wall_offset: float = 0.0) -> None:
        self.name = name
        self.rate = rate
        self.offset = offset

        def monotonic() -> float:
            return rate * clock.seconds() + offset

        def wall() -> float:
            return 1_764_000_000 + clock.seconds() + wall_offset

        self.reach = Reachable(store)
        self.cloud = CloudLink(eips)
        self.cloud.clock = clock
        records = Records(self.reach)
        heartbeat = HeartbeatProtocol(node=name, key=KEY, port=7946, monotonic=monotonic, wall=wall)
        wire.nodes[(address, 7946)] = heartbeat
        heartbeat.makeConnection(wire.transport((address, 7946)))
        self.fronts = 0
        #: How long a front round takes (on the test's clock), and when each began and ended.
        self.front_seconds = 0.0
        self.front_rounds: list[tuple[float, float]] = []
        self.clock = clock
        self.service = FailoverService(
            reactor=clock,
            udp=None,
            monotonic=monotonic,
            wall=wall,
            blocking=Synchronous(),
            aws=Synchronous(),
            lease=Lease(records, name, duration=SETTINGS.lease_duration, margin=SETTINGS.lease_margin,
                        monotonic=monotonic, wall=wall),
            records=records,
            settings=SETTINGS,
            heartbeat=heartbeat,
            listen=(address, 7946),
            advertise=address,
            address=ElasticIP(REGION, ALLOCATION, name),
            cloud=self.cloud,
            ensure_front=self._front,
            generation=lambda: "gen-1",
            acting_log=ActingLog(str(log_path), name),
            status_interval=0.5,
        )

    def _front(self) -> Deferred[None]:
        self.fronts += 1
        began = self.clock.seconds()
        if not self.front_seconds:
            self.front_rounds.append((began, began))
            return succeed(None)

        def done() -> None:
            self.front_rounds.append((began, self.clock.seconds()))

        return deferLater(self.clock, self.front_seconds, done)


class Cluster:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.store = SQLiteStore(str(tmp_path / "store.sqlite"))
        self.wire = Wire()
        self.eips = ElasticIPs()
        self.log_path = tmp_path / "acting.jsonl"
        self.nodes: dict[str, Node] = {}

    def add(self, name: str, address: str, **clocks: float) -> Node:
        node = Node(name, address, clock=self.clock, store=self.store, wire=self.wire, eips=self.eips,
                    log_path=self.log_path, **clocks)
        self.nodes[name] = node
        return node

    def run(self, seconds: float, step: float = 0.01) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.log_path)

    def on_test_clock(self, event: dict[str, Any]) -> dict[str, Any]:
        node = self.nodes[event["node"]]
        return {k: (v - node.offset) / node.rate if k in ("start", "until", "at", "done") else v
                for k, v in event.items()}

    def assert_never_two_primaries(self) -> None:
        """On the test's clock: each node's own monotonic readings mapped back to it."""
        events = [self.on_test_clock(e) for e in self.events()]
        assert overlaps(windows(events)) == []
        assert stray_associations(events) == []


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.store.close()


def lease_of(cluster: Cluster) -> LeaseRecord:
    stored = Records(cluster.store).get(LeaseRecord, "lb-primary")
    assert stored is not None
    return stored.record


def test_the_first_node_takes_over_and_keeps_it(cluster: Cluster) -> None:
    a = cluster.add("i-a", "10.0.0.1")
    a.service.startService()
    cluster.run(0.5)
    assert a.service.state == PRIMARY
    assert cluster.eips.owner == "i-a"
    assert a.fronts == 1  # nginx made current before the address came
    b = cluster.add("i-b", "10.0.0.2")
    b.service.startService()
    cluster.run(20)
    assert (a.service.state, b.service.state) == (PRIMARY, STANDBY)
    assert cluster.eips.history == ["i-a"]
    assert lease_of(cluster).token == 1
    # Both registered; each hears the other.
    assert {v.record.node for v in Records(cluster.store).list(LbNodeRecord)} == {"i-a", "i-b"}
    assert b.service.heartbeat.heard("i-a") is not None
    cluster.assert_never_two_primaries()


def test_a_primary_cut_off_from_everything_steps_down_before_the_standby_takes_over(cluster: Cluster) -> None:
    a, b = cluster.add("i-a", "10.0.0.1"), cluster.add("i-b", "10.0.0.2")
    a.service.startService()
    cluster.run(0.5)
    b.service.startService()
    cluster.run(3)
    cut_at = cluster.clock.seconds()
    a.reach.cut = True
    a.cloud.cut = True
    cluster.wire.cut.add("i-a")
    cluster.run(0.75)
    # Inside duration - margin of its last renewal's start: no longer acting.
    assert a.service.holding is None
    with pytest.raises(NotPrimary):
        a.service.guard()
    cluster.run(2)
    assert b.service.state == PRIMARY
    assert cluster.eips.owner == "i-b"
    assert lease_of(cluster).token == 2
    took = next(e for e in cluster.events() if e["event"] == "associate" and e["node"] == "i-b")
    # Taken a full lease duration after the last renewal it saw, and about a second after the cut.
    assert took["at"] - cut_at >= SETTINGS.lease_duration - SETTINGS.renew_interval
    assert took["at"] - cut_at <= SETTINGS.suspect_after + SETTINGS.lease_duration + 0.2
    # Healing: the old primary finds itself deposed and never moves the address back.
    a.reach.cut = False
    a.cloud.cut = False
    cluster.wire.cut.clear()
    cluster.run(10)
    assert (a.service.state, b.service.state) == (STANDBY, PRIMARY)
    assert cluster.eips.history == ["i-a", "i-b"]
    cluster.assert_never_two_primaries()


def test_a_primary_cut_from_the_store_only_stops_acting_and_the_standby_takes_over(cluster: Cluster) -> None:
    """The heartbeats still arrive, but the lease decides."""
    a, b = cluster.add("i-a", "10.0.0.1"), cluster.add("i-b", "10.0.0.2")
    a.service.startService()
    cluster.run(0.5)
    b.service.startService()
    cluster.run(3)
    a.reach.cut = True
    cluster.run(5)
    assert a.service.holding is None
    assert b.service.state == PRIMARY
    assert cluster.eips.history == ["i-a", "i-b"]
    cluster.assert_never_two_primaries()


def test_a_graceful_stop_hands_over_at_once(cluster: Cluster) -> None:
    a, b = cluster.add("i-a", "10.0.0.1"), cluster.add("i-b", "10.0.0.2")
    a.service.startService()
    cluster.run(0.5)
    b.service.startService()
    cluster.run(3)
    stopped_at = cluster.clock.seconds()
    done = a.service.stopService()
    assert done.called
    cluster.run(0.1)
    assert b.service.state == PRIMARY
    assert cluster.eips.owner == "i-b"
    took = next(e for e in cluster.events() if e["event"] == "associate" and e["node"] == "i-b")
    assert took["at"] - stopped_at < SETTINGS.lease_duration / 4  # far quicker than a lapse
    assert lease_of(cluster).token == 2
    cluster.assert_never_two_primaries()


def test_throttled_associate_is_retried_with_backoff_inside_the_window(cluster: Cluster) -> None:
    a = cluster.add("i-a", "10.0.0.1")
    a.cloud.throttle = 4  # the DescribeAddresses made at the start, then three AssociateAddress
    a.service.startService()
    cluster.run(2)
    assert a.service.state == PRIMARY
    failed = [e for e in cluster.events() if e["event"] == "associate-failed"]
    assert len(failed) == 3
    gaps = [b["at"] - x["at"] for x, b in itertools.pairwise(failed)]
    assert gaps[1] > gaps[0]  # backing off
    cluster.assert_never_two_primaries()


def test_a_node_that_cannot_reach_aws_never_reports_primary(cluster: Cluster) -> None:
    a = cluster.add("i-a", "10.0.0.1")
    a.cloud.cut = True
    a.service.startService()
    cluster.run(3)
    assert a.service.holding is not None  # it holds the lease ...
    assert a.service.state != PRIMARY  # ... but the address is not confirmed
    assert cluster.eips.owner is None


def test_the_primary_takes_back_an_address_moved_behind_its_back(cluster: Cluster) -> None:
    """An operator's move, or a deposed node's AssociateAddress that AWS served late."""
    a = cluster.add("i-a", "10.0.0.1")
    a.service.startService()
    cluster.run(1)
    cluster.eips.owner = "i-elsewhere"
    cluster.run(SETTINGS.address_check + 0.5)
    assert cluster.eips.owner == "i-a"
    assert a.service.state == PRIMARY
    assert [e["token"] for e in cluster.events() if e["event"] == "associate"] == [1, 1]
    cluster.assert_never_two_primaries()


@pytest.mark.parametrize(
    ("a_clocks", "b_clocks"),
    [
        ({"offset": 5_000.0, "wall_offset": -3.0}, {"offset": 17.0, "wall_offset": 2.0}),
        # Monotonic clocks 1% apart in rate (thousands of times real drift).
        ({"rate": 1.01, "offset": 100.0}, {"rate": 0.99, "offset": 90_000.0}),
        # Wall clocks far apart: every heartbeat is stale to its receiver, the lease still decides.
        ({"wall_offset": -60.0}, {"wall_offset": 60.0}),
    ],
    ids=["offsets", "rates", "walls-apart"],
)
def test_no_two_primaries_whatever_the_clocks_say(
    cluster: Cluster, a_clocks: dict[str, float], b_clocks: dict[str, float]
) -> None:
    a, b = cluster.add("i-a", "10.0.0.1", **a_clocks), cluster.add("i-b", "10.0.0.2", **b_clocks)
    a.service.startService()
    cluster.run(0.5)
    b.service.startService()
    cluster.run(5)
    assert (a.service.state, b.service.state) == (PRIMARY, STANDBY)
    for _ in range(3):  # cut the primary off, heal, and again the other way
        primary = a if a.service.holding is not None else b
        primary.reach.cut = True
        primary.cloud.cut = True
        cluster.wire.cut.add(primary.name)  # the standby suspects at once and looks closely
        cluster.run(3)
        primary.reach.cut = False
        primary.cloud.cut = False
        cluster.wire.cut.clear()
        cluster.run(3)
    holders = [n for n in (a, b) if n.service.holding is not None]
    assert len(holders) == 1
    assert lease_of(cluster).token == 4
    cluster.assert_never_two_primaries()


def test_a_primary_that_could_not_renew_in_time_takes_its_own_lease_back_at_once(cluster: Cluster) -> None:
    """
    A store that stalls for longer than the window, but not for a lapse: no failover, no flap.
    The lapse counts from the last renewal, which the standby heard of at once from the holder's
    heartbeat: the stall begins right after one.
    """
    a, b = cluster.add("i-a", "10.0.0.1"), cluster.add("i-b", "10.0.0.2")
    a.service.startService()
    cluster.run(0.5)
    b.service.startService()
    cluster.run(3)
    held = a.service.holding
    assert held is not None
    while a.service.holding is held:
        cluster.run(0.01)
    a.reach.cut = True
    cluster.run(0.65)
    assert a.service.holding is None  # the window passed: it stopped acting
    a.reach.cut = False
    cluster.run(3)
    assert (a.service.state, b.service.state) == (PRIMARY, STANDBY)
    assert lease_of(cluster).holder == "i-a"
    assert lease_of(cluster).token == 2  # taken back under a new token, without waiting a lapse
    assert cluster.eips.history == ["i-a"]  # the address was still there: no remap
    assert set(windows(cluster.events())) == {("i-a", 1), ("i-a", 2)}
    cluster.assert_never_two_primaries()


def crash(cluster: Cluster, node: Node) -> None:
    """Cut from everything, as a dead host is."""
    node.reach.cut = True
    node.cloud.cut = True
    cluster.wire.cut.add(node.name)


def associated(cluster: Cluster, node: str) -> dict[str, Any]:
    return next(e for e in cluster.events() if e["event"] == "associate" and e["node"] == node)


def took_lease(cluster: Cluster, node: str, token: int) -> float:
    return float(next(e["start"] for e in cluster.events()
                      if e["event"] == "acting" and e["node"] == node and e["token"] == token))


def test_after_a_crash_the_front_round_runs_while_the_lease_lapses_not_after(cluster: Cluster) -> None:
    """A round started when the holder fell silent is done by the take: the address follows at once."""
    a, b = cluster.add("i-a", "10.0.0.1"), cluster.add("i-b", "10.0.0.2")
    a.service.startService()
    cluster.run(0.5)
    b.service.startService()
    cluster.run(3)
    b.front_seconds = 0.4  # a slow store: a round takes half a lease
    rounds_before = len(b.front_rounds)
    crash(cluster, a)
    cluster.run(3)
    assert b.service.state == PRIMARY
    taken = took_lease(cluster, "i-b", 2)
    assert associated(cluster, "i-b")["at"] - taken < 0.05  # not a whole round after the take
    _began, ended = b.front_rounds[rounds_before]
    assert ended <= taken  # nginx was made current before the address came
    # And one more round after the address moved catches a store change the early one missed.
    assert any(start >= taken for start, _ in b.front_rounds[rounds_before + 1:])
    cluster.assert_never_two_primaries()


def test_a_graceful_handover_writes_the_lease_and_renders_nginx_together(cluster: Cluster) -> None:
    """No early round to use (nobody was silent): one round, begun with the take, done before the address."""
    a, b = cluster.add("i-a", "10.0.0.1"), cluster.add("i-b", "10.0.0.2")
    a.service.startService()
    cluster.run(0.5)
    b.service.startService()
    cluster.run(3)
    b.front_seconds = 0.1
    rounds_before = b.fronts
    a.service.stopService()
    cluster.run(1)
    assert b.service.state == PRIMARY
    assert b.fronts == rounds_before + 1  # one round for the takeover, not one per step
    began, ended = b.front_rounds[-1]
    took = associated(cluster, "i-b")
    assert began <= took_lease(cluster, "i-b", 2)  # started no later than the lease's write
    assert ended <= took["at"]
    cluster.assert_never_two_primaries()


def test_a_round_from_long_before_the_take_does_not_count(cluster: Cluster) -> None:
    """
    Suspicion that lasted (the peers cut apart while the holder still renews) started its round
    long ago: when the holder does die, a fresh round is waited for before the address moves.
    """
    a, b = cluster.add("i-a", "10.0.0.1"), cluster.add("i-b", "10.0.0.2")
    a.service.startService()
    cluster.run(0.5)
    b.service.startService()
    cluster.run(3)
    b.front_seconds = 0.3
    cluster.wire.cut.add("i-a")  # heartbeats lost; the lease still renewed
    cluster.run(5)
    assert b.service.state == STANDBY
    rounds_before = len(b.front_rounds)
    a.reach.cut = a.cloud.cut = True
    cluster.run(3)
    assert b.service.state == PRIMARY
    taken = took_lease(cluster, "i-b", 2)
    took = associated(cluster, "i-b")
    fresh = [(start, end) for start, end in b.front_rounds[rounds_before:] if end <= took["at"]]
    assert fresh
    assert fresh[-1][0] >= taken - SETTINGS.lease_duration * 2
    assert took["at"] - fresh[-1][0] >= b.front_seconds
    cluster.assert_never_two_primaries()


@pytest.mark.parametrize("offset", [n / 100 for n in range(10)])
def test_a_standby_suspects_the_holder_as_soon_as_it_falls_silent(cluster: Cluster, offset: float) -> None:
    """Not up to one heartbeat interval later, at its own next beat: at suspect_after, whatever the phase."""
    a, b = cluster.add("i-a", "10.0.0.1"), cluster.add("i-b", "10.0.0.2")
    a.service.startService()
    cluster.run(0.5)
    b.service.startService()
    cluster.run(3 + offset)
    cluster.wire.cut.add("i-a")  # silent; still renewing, so nobody takes over
    last_heard = b.service.heartbeat.heard("i-a")
    assert last_heard is not None
    cluster.run(0.5)
    assert b.service._suspected_at is not None
    assert b.service._suspected_at - last_heard <= SETTINGS.suspect_after + 0.015
    assert b.service.state == STANDBY


@pytest.mark.parametrize("phase", [n / 100 for n in range(0, 20, 3)])
def test_after_a_crash_the_lease_is_taken_a_duration_after_the_last_renewal_was_heard_of(
    cluster: Cluster, phase: float
) -> None:
    """
    The holder's heartbeat names each version as soon as its renewal lands: the standby's watch
    starts then, not at its own first read after suspecting (which came up to suspect_after
    plus a renewal interval later), and the take follows a full duration later, never sooner.
    """
    a, b = cluster.add("i-a", "10.0.0.1"), cluster.add("i-b", "10.0.0.2")
    a.service.startService()
    cluster.run(0.5)
    b.service.startService()
    cluster.run(3 + phase)
    last = a.service.holding
    assert last is not None
    crash(cluster, a)
    crashed_at = cluster.clock.seconds()
    cluster.run(3)
    assert b.service.state == PRIMARY
    taken = took_lease(cluster, "i-b", 2)
    # a's last renewal began (and, on this store, landed) at renew_started: b waited a duration.
    # These are moments of the cluster's task.Clock, not of the wall: the rule under test is the
    # lease arithmetic, and the slack is two of the simulation's 10 ms steps.
    assert SETTINGS.lease_duration <= taken - last.renew_started <= SETTINGS.lease_duration + 0.02
    assert taken - crashed_at < SETTINGS.suspect_after + SETTINGS.lease_duration
    # The takeover's moments, in the order they came, for a benchmark to read.
    (timeline,) = [e for e in cluster.events() if e["event"] == "takeover" and e["node"] == "i-b"]
    assert timeline["token"] == 2
    assert timeline["watch_since"] == pytest.approx(last.renew_started)
    order = ["watch_since", "suspected", "decided", "taken", "written", "front", "associate", "associated",
             "confirmed"]
    moments = [timeline[name] for name in order]
    assert moments == sorted(moments)
    cluster.assert_never_two_primaries()


def test_a_standby_asks_aws_ahead_of_a_takeover_so_associate_address_pays_no_first_call(
    cluster: Cluster,
) -> None:
    """
    At its start and when it suspects the holder, a standby makes one read-only DescribeAddresses:
    boto3 makes its client and its connection then, not on the AssociateAddress of a takeover.
    """
    a, b = cluster.add("i-a", "10.0.0.1"), cluster.add("i-b", "10.0.0.2")
    a.service.startService()
    cluster.run(0.5)
    b.service.startService()
    cluster.run(0.1)
    assert [name for name, _ in b.cloud.calls] == ["DescribeAddresses"]
    cluster.run(3)
    assert len(b.cloud.calls) == 1  # a calm standby asks nothing more
    crash(cluster, a)
    crashed_at = cluster.clock.seconds()
    cluster.run(3)
    assert b.service.state == PRIMARY
    after = [(name, at) for name, at in b.cloud.calls if at >= crashed_at]
    assert after[0][0] == "DescribeAddresses"
    assert after[1][0] == "AssociateAddress"
    assert after[0][1] < took_lease(cluster, "i-b", 2)
    cluster.assert_never_two_primaries()


def test_a_primary_that_begins_to_stop_says_so_and_its_standby_gets_ready_meanwhile(cluster: Cluster) -> None:
    """
    The daemon's other services stop before the lease is released: the standby that hears the
    holder say it is stopping renders nginx and asks AWS meanwhile, and decides nothing.  The
    address then follows the take at once, not a front round later.
    """
    a, b = cluster.add("i-a", "10.0.0.1"), cluster.add("i-b", "10.0.0.2")
    a.service.startService()
    cluster.run(0.5)
    b.service.startService()
    cluster.run(3)
    b.front_seconds = 0.1
    rounds_before, calls_before = len(b.front_rounds), len(b.cloud.calls)
    a.service.announce_stopping()
    cluster.run(0.3)  # a's other services stopping
    assert (a.service.state, b.service.state) == (PRIMARY, STANDBY)
    assert len(b.front_rounds) == rounds_before + 1
    assert [name for name, _ in b.cloud.calls[calls_before:]] == ["DescribeAddresses"]
    a.service.stopService()
    cluster.run(1)
    assert b.service.state == PRIMARY
    taken = took_lease(cluster, "i-b", 2)
    assert associated(cluster, "i-b")["at"] - taken < b.front_seconds  # no round between them
    assert b.front_rounds[rounds_before][1] <= taken
    # The round after the address catches what the early one missed.
    assert any(start >= taken for start, _ in b.front_rounds[rounds_before + 1:])
    cluster.assert_never_two_primaries()


def test_only_the_holder_saying_it_stops_gets_a_standby_ready(cluster: Cluster) -> None:
    a, b, c = cluster.add("i-a", "10.0.0.1"), cluster.add("i-b", "10.0.0.2"), cluster.add("i-c", "10.0.0.3")
    for node in (a, b, c):
        node.service.startService()
        cluster.run(0.5)
    cluster.run(3)
    rounds_before = len(c.front_rounds)
    b.service.announce_stopping()  # a standby: says nothing
    a.service.heartbeat.send(a.service.peers, state="stopping", token=1, generation="gen-1")
    cluster.run(0.3)
    assert len(c.front_rounds) == rounds_before + 1  # from a, the holder, only


def test_a_renewal_that_landed_unheard_of_is_read_when_the_next_is_overdue(cluster: Cluster) -> None:
    """
    The holder dies with a renewal in flight: the write lands, its answer and heartbeat are lost.
    The standby reads the lease once the holder's heartbeats have named no new version for
    OVERDUE renewal intervals, not only when it suspects the holder (up to suspect_after after
    its last heartbeat): the watch of the unheard version starts then.
    """
    a, b = cluster.add("i-a", "10.0.0.1"), cluster.add("i-b", "10.0.0.2")
    a.service.startService()
    cluster.run(0.5)
    b.service.startService()
    cluster.run(3)
    held = a.service.holding
    assert held is not None
    while a.service.holding is held:  # just after a renewal, heard of by b
        cluster.run(0.01)
    a.reach.lose_answers = True
    version = lease_version(cluster)
    while lease_version(cluster) == version:  # the next renewal lands; a never learns it did
        cluster.run(0.01)
    landed = cluster.clock.seconds()
    crash(cluster, a)
    cluster.run(3)
    assert b.service.state == PRIMARY
    taken = took_lease(cluster, "i-b", 2)
    overdue = SETTINGS.renew_interval * (OVERDUE - 1)
    assert taken - landed <= SETTINGS.lease_duration + overdue + 0.03
    assert taken - landed >= SETTINGS.lease_duration
    cluster.assert_never_two_primaries()


def lease_version(cluster: Cluster) -> int:
    stored = Records(cluster.store).get(LeaseRecord, "lb-primary")
    assert stored is not None
    return stored.version
