"""
The failover lease on both stores (SQLite, and DynamoDB on a real moto server): compare-and-set
on its version, the token as a fencing epoch, and the two clock rules as tables.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from puppetha.ha.lease import RELEASED, Holding, Lease, LeaseLost, Watch
from puppetha.store import IStore, Item
from puppetha.store.dynamodb import DynamoDBStore
from puppetha.store.records import LeaseRecord, Record, Records, Versioned
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.moto import MotoServer
from tests.aws_fixtures import moto_with_test_credentials

REGION = "us-east-1"
DURATION = 0.8
MARGIN = 0.2

_tables = iter(range(1_000_000))


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with moto_with_test_credentials() as server:
        yield server


@pytest.fixture(params=["sqlite", "dynamodb"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], IStore]]:
    """New store objects over the same data: one per daemon."""
    made: list[IStore] = []
    if request.param == "sqlite":
        path = str(tmp_path / "store.sqlite")

        def factory() -> IStore:
            made.append(SQLiteStore(path))
            return made[-1]
    else:
        moto: MotoServer = request.getfixturevalue("moto")
        table = f"lease-{next(_tables)}"
        first = DynamoDBStore(table, REGION, moto.endpoint_url)
        first.create_table(deletion_protection=False)
        made.append(first)

        def factory() -> IStore:
            made.append(DynamoDBStore(table, REGION, moto.endpoint_url))
            return made[-1]
    yield factory
    for store in made:
        store.close()


def lease_for(node: str, store: IStore, clock: Clock) -> Lease:
    return Lease(Records(store), node, duration=DURATION, margin=MARGIN,
                 monotonic=clock.seconds, wall=lambda: 1_700_000_000.0 + clock.seconds())


def test_first_take_creates_token_one_and_renewals_keep_it(make_store: Callable[[], IStore]) -> None:
    clock = Clock()
    lease = lease_for("i-a", make_store(), clock)
    assert lease.read() is None
    clock.advance(5)
    held = lease.take(None)
    assert (held.token, held.version, held.renew_started) == (1, 1, 5.0)
    assert held.acting_until == pytest.approx(5 + DURATION - MARGIN)
    clock.advance(0.2)
    renewed = lease.renew(held)
    assert (renewed.token, renewed.version, renewed.renew_started) == (1, 2, 5.2)
    stored = lease.read()
    assert stored is not None
    assert (stored.record.holder, stored.record.token, stored.version) == ("i-a", 1, 2)


def test_taking_from_another_holder_increments_the_token_and_deposes_it(
    make_store: Callable[[], IStore],
) -> None:
    clock = Clock()
    a, b = lease_for("i-a", make_store(), clock), lease_for("i-b", make_store(), clock)
    held = a.take(None)
    seen = b.read()
    taken = b.take(seen)
    assert (taken.holder, taken.token) == ("i-b", 2)
    # The old holder's renewal is a compare-and-set on a version that is gone.
    with pytest.raises(LeaseLost):
        a.renew(held)
    with pytest.raises(LeaseLost):
        a.release(held)
    stored = b.read()
    assert stored is not None
    assert (stored.record.holder, stored.record.token) == ("i-b", 2)


def test_a_take_on_a_stale_read_is_refused(make_store: Callable[[], IStore]) -> None:
    clock = Clock()
    a, b = lease_for("i-a", make_store(), clock), lease_for("i-b", make_store(), clock)
    held = a.take(None)
    seen = b.read()
    a.renew(held)  # the holder renewed after b looked
    with pytest.raises(LeaseLost):
        b.take(seen)
    with pytest.raises(LeaseLost):
        b.take(None)  # "absent" is stale too


def test_racing_contenders_one_wins(make_store: Callable[[], IStore]) -> None:
    clock = Clock()
    first = lease_for("i-0", make_store(), clock)
    first.take(None)
    observed = first.read()
    contenders = [lease_for(f"i-{n}", make_store(), clock) for n in range(1, 7)]
    barrier = threading.Barrier(len(contenders), timeout=60)
    won: list[Holding] = []
    lost: list[str] = []

    def run(lease: Lease) -> None:
        barrier.wait()
        try:
            won.append(lease.take(observed))
        except LeaseLost:
            lost.append(lease.node)

    threads = [threading.Thread(target=run, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1
    assert len(lost) == len(contenders) - 1
    stored = first.read()
    assert stored is not None
    assert (stored.record.holder, stored.record.token) == (won[0].holder, 2)


def test_release_hands_over_at_once_and_the_next_token_is_higher(make_store: Callable[[], IStore]) -> None:
    clock = Clock()
    a, b = lease_for("i-a", make_store(), clock), lease_for("i-b", make_store(), clock)
    held = a.renew(a.take(None))
    a.release(held)
    released = b.read()
    assert released is not None
    assert (released.record.holder, released.record.token) == (RELEASED, 1)
    assert Watch.of(released, clock.seconds()).lapsed(released, clock.seconds())
    assert b.take(released).token == 2


class SlowRecords(Records):
    """Records whose writes take ``seconds`` of the clock: a store answering slowly."""

    def __init__(self, store: IStore, clock: Clock, seconds: float) -> None:
        super().__init__(store)
        self.clock = clock
        self.seconds = seconds

    def create(self, record: Record) -> Item:
        self.clock.advance(self.seconds)
        return super().create(record)

    def replace(self, record: Record, expected_version: int) -> Item:
        self.clock.advance(self.seconds)
        return super().replace(record, expected_version)


def test_the_window_counts_from_the_start_of_the_write(make_store: Callable[[], IStore]) -> None:
    """A renewal that took 0.5 s buys a window from when it was sent, not from when it returned."""
    clock = Clock()
    lease = Lease(SlowRecords(make_store(), clock, 0.5), "i-a", duration=DURATION, margin=MARGIN,
                  monotonic=clock.seconds, wall=clock.seconds)
    held = lease.take(None)
    assert held.renew_started == 0.0
    assert clock.seconds() == 0.5
    assert held.acting_until == pytest.approx(DURATION - MARGIN)
    assert held.may_act(0.59)
    assert not held.may_act(0.61)


def test_lease_settings_are_checked() -> None:
    store: Any = None
    with pytest.raises(ValueError, match="margin"):
        Lease(Records(store), "i-a", duration=1.0, margin=1.0, monotonic=float, wall=float)
    with pytest.raises(ValueError, match="name"):
        Lease(Records(store), "", duration=1.0, margin=0.1, monotonic=float, wall=float)


def versioned(
    version: int, holder: str = "i-a", token: int = 3, duration: float = DURATION
) -> Versioned[LeaseRecord]:
    return Versioned(LeaseRecord("lb-primary", holder, token, duration, 0.0), version)


@pytest.mark.parametrize(
    ("watch", "lease", "now", "lapsed"),
    [
        (Watch(4, 10.0), versioned(4), 10.0, False),
        (Watch(4, 10.0), versioned(4), 10.79, False),
        (Watch(4, 10.0), versioned(4), 10.81, True),  # unchanged for a full duration
        (Watch(4, 10.0), versioned(5), 99.0, False),  # renewed since: a new watch is needed
        (Watch(4, 10.0), versioned(4, duration=5.0), 14.0, False),  # the holder's own duration counts
        (Watch(4, 10.0), versioned(4, holder=RELEASED), 10.0, True),  # released: at once
        (Watch(None, 10.0), None, 10.0, True),  # nobody ever held it
    ],
)
def test_watch_lapses_only_after_a_full_duration_unchanged(
    watch: Watch, lease: Versioned[LeaseRecord] | None, now: float, lapsed: bool
) -> None:
    assert watch.lapsed(lease, now) is lapsed


def test_watch_restarts_when_the_version_changes() -> None:
    watch = Watch.of(versioned(4), 10.0)
    assert watch.update(versioned(4), 10.5) is watch
    again = watch.update(versioned(5), 10.6)
    assert again == Watch(5, 10.6)
    assert again.lapses_at(versioned(5)) == pytest.approx(10.6 + DURATION)


def test_holding_matches_only_its_own_holder_and_token() -> None:
    held = Holding("lb-primary", "i-a", 3, 9, DURATION, MARGIN, 1.0)
    assert held.matches(versioned(9))
    assert held.matches(versioned(12))  # a renewal whose answer was lost still matches
    assert not held.matches(versioned(12, holder="i-b", token=4))
    assert not held.matches(versioned(12, token=4))
    assert not held.matches(versioned(12, holder=RELEASED))
    assert not held.matches(None)
