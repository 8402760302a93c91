"""
The failover lease: one :class:`LeaseRecord` in the store, changed only by compare-and-set on its
version, with a fencing token that grows by one every time the lease changes hands.

Nothing here trusts another host's clock.  Two rules, each on the local monotonic clock
(``docs/ha.md`` has the arithmetic):

- the **holder** may act until ``duration - margin`` after the *start* of its last successful
  renewal (:attr:`Holding.acting_until`);
- a **contender** may take the lease from another holder only after it has itself watched the
  record stay at one version for a full ``duration`` (:class:`Watch`), or at once when the
  holder released it.

:class:`Lease` does the store's part (blocking: call it from the thread pool); :class:`Holding`
and :class:`Watch` are the pure arithmetic on top.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import evolve, frozen

from puppetha.store import AlreadyExists, VersionConflict
from puppetha.store.records import LeaseRecord, Records, Versioned

#: The name of the lb nodes' lease (one per fleet).
FAILOVER_LEASE = "lb-primary"

#: ``holder`` of a released lease: anyone may take it at once.
RELEASED = ""


class LeaseLost(Exception):
    """A compare-and-set on the lease found another version: someone else changed it."""


@frozen
class Holding:
    """What a holder knows of the lease it holds, on its own monotonic clock."""

    name: str
    holder: str
    token: int
    #: The store's version after our last write; the next renewal is a compare-and-set on it.
    version: int
    duration: float
    margin: float
    #: Local monotonic time at which the last successful write *began*.
    renew_started: float

    @property
    def acting_until(self) -> float:
        """The end of the safe window: the holder does nothing as primary from then on."""
        return self.renew_started + self.duration - self.margin

    def may_act(self, now: float) -> bool:
        return now < self.acting_until

    def matches(self, lease: Versioned[LeaseRecord] | None) -> bool:
        """Whether the store still says we hold it (same holder and token)."""
        return (
            lease is not None
            and lease.record.holder == self.holder
            and lease.record.token == self.token
        )


@frozen
class Watch:
    """A contender's view of someone else's lease: the version it saw, since when (local clock)."""

    #: ``None`` when the lease did not exist.
    version: int | None
    since: float

    @classmethod
    def of(cls, lease: Versioned[LeaseRecord] | None, now: float) -> Watch:
        return cls(None if lease is None else lease.version, now)

    def update(self, lease: Versioned[LeaseRecord] | None, now: float) -> Watch:
        """The same watch while the version is unchanged; a new one from ``now`` otherwise."""
        version = None if lease is None else lease.version
        return self if version == self.version else Watch(version, now)

    def lapsed(self, lease: Versioned[LeaseRecord] | None, now: float) -> bool:
        """
        Whether ``lease`` may be taken now: absent, released, or seen unchanged by this watch for
        at least the lease's own ``duration``.
        """
        if lease is None or lease.record.holder == RELEASED:
            return True
        if lease.version != self.version:
            return False
        return now - self.since >= lease.record.duration

    def lapses_at(self, lease: Versioned[LeaseRecord] | None) -> float:
        """When :meth:`lapsed` turns true if nothing changes (now or earlier: at once)."""
        if lease is None or lease.record.holder == RELEASED:
            return self.since
        return self.since + lease.record.duration


class Lease:
    """
    The store's side of one lease, for one node.  Blocking: run on the thread pool.

    ``monotonic`` is the local monotonic clock (windows and watches); ``wall`` only fills
    ``renewed_at``, which is for people reading the store and never decides anything.
    """

    def __init__(
        self,
        records: Records,
        node: str,
        *,
        duration: float,
        margin: float,
        monotonic: Callable[[], float],
        wall: Callable[[], float],
        name: str = FAILOVER_LEASE,
    ) -> None:
        if not 0 <= margin < duration:
            raise ValueError(f"the margin ({margin}) must be at least 0 and shorter than the duration "
                             f"({duration})")
        if not node:
            raise ValueError("a lease holder needs a name")
        self.records = records
        self.node = node
        self.duration = duration
        self.margin = margin
        self.monotonic = monotonic
        self.wall = wall
        self.name = name

    def read(self) -> Versioned[LeaseRecord] | None:
        return self.records.get(LeaseRecord, self.name)

    def take(self, observed: Versioned[LeaseRecord] | None) -> Holding:
        """
        Take the lease as ``observed`` (absent, released, or lapsed by the caller's watch), with
        the next token.  Raises :class:`LeaseLost` when it changed since.
        """
        token = 1 if observed is None else observed.record.token + 1
        record = LeaseRecord(
            name=self.name, holder=self.node, token=token, duration=self.duration, renewed_at=self.wall()
        )
        started = self.monotonic()
        try:
            if observed is None:
                item = self.records.create(record)
            else:
                item = self.records.replace(record, observed.version)
        except (AlreadyExists, VersionConflict) as e:
            raise LeaseLost(str(e)) from None
        return Holding(self.name, self.node, token, item.version, self.duration, self.margin, started)

    def renew(self, holding: Holding) -> Holding:
        """Extend our window; raises :class:`LeaseLost` when someone else wrote the lease."""
        record = LeaseRecord(
            name=self.name, holder=self.node, token=holding.token, duration=self.duration,
            renewed_at=self.wall(),
        )
        started = self.monotonic()
        try:
            item = self.records.replace(record, holding.version)
        except VersionConflict as e:
            raise LeaseLost(str(e)) from None
        return evolve(holding, version=item.version, renew_started=started, duration=self.duration)

    def release(self, holding: Holding) -> None:
        """
        Give the lease up at once (a graceful stop): the token stays, so the next holder's is
        still higher.  Raises :class:`LeaseLost` when it was no longer ours.
        """
        record = LeaseRecord(
            name=self.name, holder=RELEASED, token=holding.token, duration=self.duration,
            renewed_at=self.wall(),
        )
        try:
            self.records.replace(record, holding.version)
        except VersionConflict as e:
            raise LeaseLost(str(e)) from None
