"""
Failover decisions: pure functions of what a node knows (the lease as last read, its own holding
or watch, the peers' heartbeats) and its local monotonic clock.

The services around them (:mod:`puppetha.ha.primary`) only read, decide and act.  The lease
decides who is primary; heartbeats only make a standby look at the lease sooner (suspicion) and
carry a graceful handover's news at once.
"""

from __future__ import annotations

import enum

from attrs import frozen

from puppetha.ha.lease import Holding, Watch
from puppetha.store.records import LeaseRecord, Versioned


class Action(enum.Enum):
    #: Nothing to do but look again later.
    WAIT = "wait"
    #: Take the lease (absent, released, or lapsed), then the address.
    TAKE_OVER = "take-over"
    #: Extend the held lease.
    RENEW = "renew"
    #: Stop acting as primary at once (deposed, or the safe window passed without a renewal).
    STEP_DOWN = "step-down"
    #: Stop acting, then hand the lease over (graceful stop).
    RELEASE = "release"


@frozen
class FailoverSettings:
    """The timings of ``[ha]`` (seconds); ``docs/ha.md`` explains the defaults."""

    lease_duration: float = 0.8
    lease_margin: float = 0.2
    #: How often the holder renews.
    renew_interval: float = 0.2
    #: How often a standby reads the lease while the primary's heartbeats arrive.
    standby_poll: float = 1.0
    #: How often a standby reads the lease while it suspects the primary.
    suspect_poll: float = 0.05
    heartbeat_interval: float = 0.1
    #: Heartbeat silence after which the holder is suspected.
    suspect_after: float = 0.2
    #: How often the primary checks with DescribeAddresses that the address is still its own.
    address_check: float = 2.0

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.lease_margin < self.lease_duration:
            raise ValueError("the lease margin must be shorter than the lease duration")
        if self.renew_interval >= self.lease_duration - self.lease_margin:
            raise ValueError("the renew interval must be shorter than the lease duration less the margin")


@frozen
class Situation:
    """What one node knows when it decides."""

    node: str
    #: Local monotonic time.
    now: float
    #: False when the store could not be read this time (``lease`` is then meaningless).
    lease_read: bool
    lease: Versioned[LeaseRecord] | None
    holding: Holding | None
    watch: Watch | None
    #: Local monotonic time of the last authentic heartbeat from the lease's holder (None: never).
    holder_heard: float | None = None
    #: The daemon is stopping.
    stopping: bool = False
    #: The version of this node's own last successful write of the lease in this run of the
    #: daemon (None: none).  A lease still at that version was last written by us, whatever the
    #: clocks say, so we may take it back at once after stepping down.
    own_version: int | None = None
    #: (version, local monotonic time) of the first authentic heartbeat from the lease's holder
    #: that named that version as written: it was in the store before that moment, so a watch
    #: of it may start there rather than at this node's first read of it (None: none heard).
    version_heard: tuple[int, float] | None = None


@frozen
class FailoverDecision:
    action: Action
    reason: str
    #: Seconds until the node should look again.
    next_check: float


def suspect(holder_heard: float | None, now: float, suspect_after: float) -> bool:
    """Whether the holder's heartbeats have been silent long enough to look at the lease closely."""
    return holder_heard is None or now - holder_heard >= suspect_after


def decide(situation: Situation, settings: FailoverSettings) -> FailoverDecision:
    s = situation
    holding = s.holding
    if s.stopping:
        if holding is not None:
            return FailoverDecision(Action.RELEASE, "stopping: hand the lease over", 0.0)
        return FailoverDecision(Action.WAIT, "stopping", settings.standby_poll)

    if holding is not None:
        if s.lease_read and not holding.matches(s.lease):
            return FailoverDecision(Action.STEP_DOWN, _deposed(s.lease), settings.renew_interval)
        if not holding.may_act(s.now):
            return FailoverDecision(
                Action.STEP_DOWN, "the lease's safe window passed without a renewal", settings.renew_interval
            )
        return FailoverDecision(Action.RENEW, "holding the lease", settings.renew_interval)

    if not s.lease_read:
        # Nobody can take a lease it cannot write; keep looking at the standby's pace.  A node
        # that wrote the lease in this life looks often: when the store answers again before a
        # lapse, it takes its own lease back before anyone else may.
        poll = settings.suspect_poll if s.own_version is not None else settings.suspect_poll * 4
        return FailoverDecision(Action.WAIT, "the store is unreachable", poll)
    lease = s.lease
    if lease is None:
        return FailoverDecision(Action.TAKE_OVER, "nobody holds the lease", 0.0)
    if lease.record.holder == "":
        return FailoverDecision(Action.TAKE_OVER, f"{_tok(lease)} was released", 0.0)
    if lease.record.holder == s.node and lease.version == s.own_version:
        # Nobody wrote it since our own last write: taking it is as safe as a renewal would be.
        return FailoverDecision(Action.TAKE_OVER, f"{_tok(lease)} is still as we last wrote it", 0.0)
    watch = _watch(s)
    if watch.lapsed(lease, s.now):
        return FailoverDecision(
            Action.TAKE_OVER,
            f"{lease.record.holder} left {_tok(lease)} unrenewed for {s.now - watch.since:.3f}s",
            0.0,
        )
    until_lapse = max(0.0, watch.lapses_at(lease) - s.now)
    if suspect(s.holder_heard, s.now, settings.suspect_after):
        poll = settings.suspect_poll
        reason = f"suspecting {lease.record.holder}: no heartbeat"
    else:
        poll = settings.standby_poll
        reason = f"{lease.record.holder} is primary"
    return FailoverDecision(Action.WAIT, reason, min(poll, until_lapse) if until_lapse > 0 else poll)


def next_watch(situation: Situation) -> Watch | None:
    """The watch a standby keeps after this look at the lease (unchanged when the read failed)."""
    if situation.holding is not None:
        return None
    if not situation.lease_read:
        return situation.watch
    return _watch(situation)


def _watch(s: Situation) -> Watch:
    """
    The watch of the lease as read: from the first read that saw its version, or from the
    first heartbeat of its holder that named that version, whichever came first.  Both moments
    are after the version landed in the store, which is all the lease's arithmetic needs.
    """
    watch = s.watch.update(s.lease, s.now) if s.watch is not None else Watch.of(s.lease, s.now)
    heard = s.version_heard
    if heard is not None and s.lease is not None and s.lease.version == heard[0] and heard[1] < watch.since:
        return Watch(heard[0], heard[1])
    return watch


def _tok(lease: Versioned[LeaseRecord]) -> str:
    return f"token {lease.record.token}"


def _deposed(lease: Versioned[LeaseRecord] | None) -> str:
    if lease is None:
        return "the lease is gone"
    if lease.record.holder == "":
        return f"{_tok(lease)} was released"
    return f"deposed: {lease.record.holder} holds {_tok(lease)}"
