"""
The failover service of an lb node: read the lease, decide (:func:`puppetha.ha.failover.decide`),
act; heartbeats to and from the peers; and, once it holds the lease, the Elastic IP.

Taking over is: take the lease (a compare-and-set that increments the token), make sure nginx
serves the store's current config (a front round), AssociateAddress (retried with backoff),
confirm with DescribeAddresses, and only then say ``primary``.  The front round is started
early, when the holder falls silent or at the latest as the take is decided, so the address does
not wait for a whole round after the lease is ours (see :meth:`FailoverService._front_since`).
Every primary-only action passes :meth:`FailoverService.guard` first, which refuses unless the
token is still ours and the lease is inside its safe window on the local monotonic clock.  A
node that loses the lease, or cannot renew it in time, stops acting at once (a timer, not the
next round, ends its window).

Each node appends what it did as primary to its *acting log* (JSON lines, monotonic clock):
``acting`` (token, from, until) at every renewal, ``stopped`` (token, from, until) when it stops,
and ``associate`` (token, at, done) for every AssociateAddress, so a test rig can check that no
two nodes ever acted at once and that no address was moved under a stale token; and, once the
address is confirmed after a takeover, ``takeover``: when each step of it happened (suspicion,
the watch's start, the take, the front round, AssociateAddress, the confirmation), so a
benchmark can say where the time went.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from typing import IO, Any, cast

from attrs import evolve, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorCore, IReactorTime, IReactorUDP
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from puppetha.aws.cloud import CloudError, ICloud
from puppetha.ha.failover import Action, FailoverSettings, Situation, decide, next_watch, suspect
from puppetha.ha.front import RunsBlocking
from puppetha.ha.heartbeat import Heartbeat, HeartbeatProtocol
from puppetha.ha.lease import Holding, Lease, LeaseLost, Watch
from puppetha.store import StoreError
from puppetha.store.records import LbNodeRecord, LeaseRecord, Records, Versioned

log = Logger()

STANDBY = "standby"
TAKING_OVER = "taking-over"
PRIMARY = "primary"
#: Said once, in a heartbeat, by a primary whose daemon begins to stop (see announce_stopping).
STOPPING = "stopping"
STOPPED = "stopped"


#: A standby reads the lease when the holder's heartbeats have named no new version for this many
#: renewal intervals: a renewal whose answer was lost with the holder landed unheard of, and
#: the watch of that version starts only at this node's first read of it.
OVERDUE = 1.25


class NotPrimary(Exception):
    """The guard refused a primary-only action."""


@frozen
class ElasticIP:
    region: str
    allocation_id: str
    #: This node's instance: where the address goes when it takes over.
    instance_id: str


class ActingLog:
    """Append-only JSON lines of what this node did as primary; ``None`` path: nothing written."""

    def __init__(self, path: str | None, node: str) -> None:
        self.node = node
        self._file: IO[str] | None = None
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._file = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({"event": event, "node": self.node, **fields}, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def backoff(attempt: int, first: float = 0.05, cap: float = 1.0) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...) of an AWS call: doubling from ``first``."""
    return float(min(cap, first * 2 ** (attempt - 1)))


class FailoverService(Service):
    """One lb node's part in failover.  Off unless an Elastic IP is configured (``[ha]``)."""

    #: Local time at which the holder last said it was stopping (None: never): like the moment
    #: it falls silent, a front round begun then may serve the takeover that follows.
    _holder_stopping: float | None = None
    #: Whether announce_stopping is registered to run when the reactor begins to shut down.
    _announces = False
    #: When the holder's heartbeats will have named no new lease version for OVERDUE renewals.
    _overdue: IDelayedCall | None = None

    def __init__(
        self,
        *,
        reactor: IReactorTime,
        udp: IReactorUDP | None,
        monotonic: Callable[[], float],
        wall: Callable[[], float],
        blocking: RunsBlocking,
        aws: RunsBlocking,
        lease: Lease,
        records: Records,
        settings: FailoverSettings,
        heartbeat: HeartbeatProtocol,
        listen: tuple[str, int],
        advertise: str,
        address: ElasticIP,
        cloud: ICloud,
        ensure_front: Callable[[], Deferred[Any]],
        generation: Callable[[], str | None] = lambda: None,
        acting_log: ActingLog | None = None,
        status_interval: float = 2.0,
    ) -> None:
        self.reactor = reactor
        self.udp = udp
        self.monotonic = monotonic
        self.wall = wall
        self.blocking = blocking
        self.aws = aws
        self.lease = lease
        self.records = records
        self.settings = settings
        self.heartbeat = heartbeat
        self.listen = listen
        self.advertise = advertise
        self.address = address
        self.cloud = cloud
        self.ensure_front = ensure_front
        self.generation = generation
        self.acting_log = acting_log or ActingLog(None, lease.node)
        self.status_interval = status_interval
        self.node = lease.node
        heartbeat.on_heartbeat = self._heard

        self.state = STANDBY
        self.holding: Holding | None = None
        self.watch: Watch | None = None
        self.last_lease: Versioned[LeaseRecord] | None = None
        #: The highest token this node has held or seen.
        self.token_seen = 0
        #: The token under which the address was last confirmed ours.
        self.confirmed: int | None = None
        self._acting_from: float | None = None
        self._stopping = False
        self._suspecting = False
        self._round: Deferred[None] | None = None
        self._again = False
        self._next: IDelayedCall | None = None
        self._window: IDelayedCall | None = None
        self._moving: int | None = None
        #: When the primary last checked where the address is, and whether a check is under way.
        self._checked, self._checking = 0.0, False
        self._own_version: int | None = None
        #: The address was ours when we last knew, and no other holder has appeared since.
        self._address_was_ours = False
        #: The oldest start of a front round that the address of the takeover under way may follow.
        self._take_front_since: float | None = None
        self._take_decided = 0.0
        self._port: IListeningPort | None = None
        #: Local time at which the holder fell silent (None: not suspecting it).
        self._suspected_at: float | None = None
        #: The start of this node's latest finished front round, and of the one under way.
        self._front_done: float | None = None
        self._front_started: float | None = None
        self._front_waiters: list[tuple[float, Deferred[None]]] = []
        self._beats: LoopingCall | None = None
        #: When the lease holder's heartbeats will have been silent for suspect_after.
        self._silence: IDelayedCall | None = None
        self._registry: LoopingCall | None = None
        self.peers: list[tuple[str, int]] = []
        #: The moments of the takeover under way (local monotonic clock), for the acting log.
        self._timeline: dict[str, float | None] = {}
        #: When this node last asked AWS ahead of a takeover (see _warm_aws).
        self._warmed: float | None = None

    # -- lifecycle

    def startService(self) -> None:
        super().startService()
        if self.udp is not None:
            self._port = self.udp.listenUDP(self.listen[1], self.heartbeat, interface=self.listen[0],
                                            maxPacketSize=8192)
        self._beats = LoopingCall(self._beat)
        self._beats.clock = self.reactor
        self._beats.start(self.settings.heartbeat_interval, now=True)
        self._registry = LoopingCall(self._register)
        self._registry.clock = self.reactor
        self._registry.start(self.status_interval, now=True)
        self._warm_aws("the daemon started")
        if IReactorCore.providedBy(self.reactor) and not self._announces:
            self._announces = True
            # Before any service stops: the daemon's other services stop first, one after another,
            # and the lease is released only once they have (see stopService).
            core = cast(IReactorCore, self.reactor)
            core.addSystemEventTrigger("before", "shutdown", self.announce_stopping)
        self.poke()

    def announce_stopping(self) -> None:
        """
        A primary whose daemon begins to stop says so at once, in one heartbeat: a standby that
        hears it makes nginx current and its way to AWS ready while this daemon's services stop,
        so the takeover that follows the release waits for neither.  It decides nothing.
        """
        if self.holding is not None and not self._stopping:
            self.heartbeat.send(self.peers, state=STOPPING, token=self.holding.token,
                                generation=self.generation() or "", lease=self.holding.version)

    @inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        self._stopping = True
        for loop in (self._beats, self._registry):
            if loop is not None and loop.running:
                loop.stop()
        for call in (self._next, self._silence, self._overdue):
            if call is not None and call.active():
                call.cancel()
        if self._round is not None:
            yield self._round
        holding = self.holding
        self._stop_acting("the daemon is stopping")
        self.state = STOPPED
        if holding is not None:
            try:
                yield self.blocking.call(self.lease.release, holding)
                log.info("released the lease (token {token})", token=holding.token)
            except (LeaseLost, StoreError) as e:
                log.warn("could not release the lease (token {token}): {error}", token=holding.token,
                         error=str(e))
        # Said last, after the release: a standby that hears it finds the lease free.
        self._send_heartbeat()
        with contextlib.suppress(StoreError):
            yield self.blocking.call(self._write_record, self._record())
        if self._port is not None:
            yield self._port.stopListening()
        self.acting_log.close()

    # -- the rounds: read, decide, act

    def poke(self) -> None:
        """Look at the lease now (or right after the round in progress)."""
        if self._stopping:
            return
        if self._round is not None:
            self._again = True
            return
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        self._round = self._run_round()
        self._round.addErrback(lambda f: log.failure("failover round failed", f))
        self._round.addBoth(self._round_done)

    def _round_done(self, _: object) -> None:
        self._round = None
        if self._again:
            self._again = False
            self.poke()

    def _schedule(self, delay: float) -> None:
        if self._stopping or self._again:
            return
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = self.reactor.callLater(max(0.0, delay), self.poke)

    @inlineCallbacks
    def _run_round(self) -> Any:
        started = self.monotonic()
        read = True
        lease: Versioned[LeaseRecord] | None = None
        try:
            lease = yield self.blocking.call(self.lease.read)
        except StoreError as e:
            read = False
            log.debug("cannot read the lease: {error}", error=str(e))
        if read:
            self.last_lease = lease
            if lease is not None:
                self.token_seen = max(self.token_seen, lease.record.token)
                if lease.record.holder not in ("", self.node):
                    self._address_was_ours = False
        now = self.monotonic()
        holder = lease.record.holder if lease is not None else ""
        situation = Situation(
            node=self.node,
            now=now,
            lease_read=read,
            lease=lease,
            holding=self.holding,
            watch=self.watch,
            holder_heard=self.heartbeat.heard(holder) if holder else None,
            own_version=self._own_version,
            version_heard=self.heartbeat.lease_version_heard(holder) if holder else None,
        )
        decision = decide(situation, self.settings)
        self.watch = next_watch(situation)
        if decision.action is Action.TAKE_OVER:
            self._timeline = {
                "suspected": self._suspected_at,
                "watch_since": self.watch.since if self.watch is not None else None,
                "decided": now,
            }
            # nginx is made current while the lease is being written, not after.
            since = self._front_since(now)
            self._front_round(since)
            self._take_front_since, self._take_decided = since, now
            yield self._take(lease, decision.reason)
        elif decision.action is Action.RENEW:
            yield self._renew(lease if read else None)
        elif decision.action is Action.STEP_DOWN:
            self._stop_acting(decision.reason)
        self._maybe_move()
        self._take_front_since = None
        self._maybe_check_address()
        self._schedule(decision.next_check - (self.monotonic() - started))

    @inlineCallbacks
    def _take(self, lease: Versioned[LeaseRecord] | None, reason: str) -> Any:
        try:
            holding = yield self.blocking.call(self.lease.take, lease)
        except LeaseLost:
            log.info("another node took the lease first")
            self._timeline = {}
            return
        except StoreError as e:
            log.warn("could not take the lease: {error}", error=str(e))
            self._timeline = {}
            return
        self._own_version = holding.version
        if not holding.may_act(self.monotonic()):
            log.warn("took the lease (token {token}) but the write took the whole window",
                     token=holding.token)
            return
        self.holding = holding
        self.watch = None
        self.token_seen = max(self.token_seen, holding.token)
        self._acting_from = holding.renew_started
        self._mark(taken=holding.renew_started, written=self.monotonic())
        self.state = TAKING_OVER
        log.info("took the lease with token {token}: {reason}", token=holding.token, reason=reason,
                 acted_from=holding.renew_started)
        self._acting(holding)
        self._send_heartbeat()

    @inlineCallbacks
    def _renew(self, lease: Versioned[LeaseRecord] | None) -> Any:
        holding = self.holding
        if holding is None:
            return
        if lease is not None and holding.matches(lease) and lease.version != holding.version:
            # A renewal whose answer was lost did land; go on from its version, but keep the
            # older start (the window only ever errs short).
            holding = evolve(holding, version=lease.version)
        try:
            renewed = yield self.blocking.call(self.lease.renew, holding)
        except LeaseLost:
            self._stop_acting(f"lost the lease (token {holding.token}) to another node")
            return
        except StoreError as e:
            log.debug("could not renew the lease: {error}", error=str(e))
            return
        self._own_version = renewed.version
        if self.holding is None or self.holding.token != renewed.token:
            return  # stopped acting while the write was in flight: its window is not ours to use
        if not renewed.may_act(self.monotonic()):
            return
        self.holding = renewed
        self._acting(renewed)
        # At once, not at the next beat: a standby's watch of this version may start when it hears.
        self._send_heartbeat()

    def _acting(self, holding: Holding) -> None:
        """Arm the end of the window and say, in the acting log, until when we may act."""
        if self._window is not None and self._window.active():
            self._window.cancel()
        delay = holding.acting_until - self.monotonic()
        self._window = self.reactor.callLater(max(0.0, delay), self._window_over, holding.token)
        self.acting_log.write("acting", token=holding.token, start=self._acting_from,
                              until=holding.acting_until)

    def _window_over(self, token: int) -> None:
        holding = self.holding
        if holding is not None and holding.token == token and not holding.may_act(self.monotonic()):
            self._stop_acting("the lease's safe window passed without a renewal")
            self.poke()

    def _stop_acting(self, reason: str) -> None:
        holding, self.holding = self.holding, None
        if self._window is not None and self._window.active():
            self._window.cancel()
        self._window = None
        if holding is None:
            return
        until = min(self.monotonic(), holding.acting_until)
        self.acting_log.write("stopped", token=holding.token, start=self._acting_from, until=until)
        start = self._acting_from if self._acting_from is not None else until
        log.info("stopped acting as primary (token {token}, acted {acted:.3f}s): {reason}",
                 token=holding.token, acted=until - start, reason=reason, acted_from=start, acted_until=until)
        self._acting_from = None
        self.confirmed = None
        self.state = STANDBY if not self._stopping else STOPPED
        self._send_heartbeat()

    # -- the guard and the address

    def guard(self, token: int | None = None) -> Holding:
        """
        The one check before every primary-only action: we hold the lease (under ``token``, when
        given) and are inside its safe window.  Raises :class:`NotPrimary` otherwise.
        """
        holding = self.holding
        now = self.monotonic()
        if holding is None:
            raise NotPrimary("this node does not hold the lease")
        if token is not None and holding.token != token:
            raise NotPrimary(f"token {token} is no longer current (now {holding.token})")
        if not holding.may_act(now):
            raise NotPrimary(f"token {holding.token}'s safe window is over")
        return holding

    def _maybe_move(self) -> None:
        holding = self.holding
        if holding is None or holding.token in (self.confirmed, self._moving):
            return
        self._moving = holding.token
        since, self._take_front_since = self._take_front_since, None
        d = self._move_address(holding.token, check_first=self._address_was_ours, front_since=since,
                               catch_up=since is not None and since < self._take_decided)
        d.addErrback(self._move_failed, holding.token)

    def _move_failed(self, failure: Failure, token: int) -> None:
        if failure.check(NotPrimary):
            log.info("gave up moving the address: {reason}", reason=str(failure.value))
        else:
            log.failure("moving the address failed", failure)
        if self._moving == token:
            self._moving = None

    def _maybe_check_address(self) -> None:
        holding = self.holding
        if (holding is None or self.confirmed != holding.token or self._checking
                or self.monotonic() - self._checked < self.settings.address_check):
            return
        self._checking = True
        d = self._check_address(holding.token)
        d.addErrback(lambda f: log.warn("checking the address failed: {error}", error=str(f.value)))
        d.addBoth(self._checked_address)

    def _checked_address(self, _: object) -> None:
        self._checking = False
        self._checked = self.monotonic()

    @inlineCallbacks
    def _check_address(self, token: int) -> Any:
        """
        The primary's own look at DescribeAddresses: an AssociateAddress by someone else (an
        operator, or a deposed node's call that AWS served late) is undone under our token.
        """
        eip = self.address
        owner = yield self.aws.call(self.cloud.describe_address, eip.region, eip.allocation_id)
        if owner == eip.instance_id or self.holding is None or self.holding.token != token:
            return
        log.warn("{allocation_id} is on {owner}, not on this primary; taking it back under token {token}",
                 allocation_id=eip.allocation_id, owner=owner, token=token)
        self.confirmed = None
        self.state = TAKING_OVER
        self._maybe_move()

    def _warm_aws(self, why: str) -> Deferred[None]:
        """
        One DescribeAddresses, read-only and allowed to anyone, ahead of a takeover: boto3 makes
        its EC2 client on the first call (a third of a second on a loaded host, spent on the
        service's model) and keeps the connection it opens, so AssociateAddress, when it comes,
        pays neither.  Its answer is only logged.  Not again within ``address_check`` of the last
        one (a standby that starts also suspects the holder it has not heard yet).
        """
        now = self.monotonic()
        if self._warmed is not None and now - self._warmed < self.settings.address_check:
            return succeed(None)
        self._warmed = now
        eip = self.address
        d = self.aws.call(self.cloud.describe_address, eip.region, eip.allocation_id)

        def seen(owner: str | None) -> None:
            log.info("{allocation_id} is on {owner} ({why})", allocation_id=eip.allocation_id,
                     owner=owner or "no instance", why=why)

        d.addCallbacks(seen, lambda f: log.warn("cannot ask AWS where {allocation_id} is ({why}): {error}",
                                                allocation_id=eip.allocation_id, why=why, error=str(f.value)))
        return d

    # -- the front before the address

    def _front_since(self, now: float) -> float:
        """
        The oldest start of a front round whose result a takeover decided at ``now`` may use: one
        started since the holder fell silent, if that is at most two lease durations ago (the
        time a contender needs to be sure the holder is gone), else one started now.  A store
        change that a round started this early missed is picked up by the round that follows
        the takeover at once.
        """
        silent = self._suspected_at if self._suspected_at is not None else self._holder_stopping
        if silent is not None and now - silent <= 2 * self.settings.lease_duration:
            return silent
        return now

    def _front_round(self, since: float) -> Deferred[None]:
        """
        Fires once a front round that started at or after ``since`` has finished (failed rounds
        count: they are logged and the old configuration keeps serving); starts one if needed.
        """
        if self._front_done is not None and self._front_done >= since:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._front_waiters.append((since, waiter))
        if self._front_started is None or self._front_started < since:
            self._start_front_round()
        return waiter

    def _start_front_round(self) -> None:
        started = self.monotonic()
        self._front_started = started
        d = maybeDeferred(self.ensure_front)
        d.addErrback(lambda f: log.failure("front round before taking the address failed", f))
        d.addBoth(self._front_round_done, started)

    def _front_round_done(self, _: object, started: float) -> None:
        if self._front_done is None or started > self._front_done:
            self._front_done = started
        if self._front_started == started:
            self._front_started = None
        ready = [w for since, w in self._front_waiters if since <= started]
        self._front_waiters = [(since, w) for since, w in self._front_waiters if since > started]
        if self._front_waiters and self._front_started is None:
            self._start_front_round()
        for waiter in ready:
            waiter.callback(None)

    @inlineCallbacks
    def _move_address(self, token: int, check_first: bool = False, front_since: float | None = None,
                      catch_up: bool = False) -> Any:
        """
        ``front_since``: the oldest front round the address may follow (None: one started now);
        ``catch_up``: that round may be from before the take, so run one more once the address
        is ours, for a store change it missed.
        """
        # nginx first: the address must reach a front serving the store's current config.
        yield self._front_round(self.monotonic() if front_since is None else front_since)
        self._mark(front=self.monotonic())
        eip = self.address
        attempt = 0
        if check_first:
            # Taking back our own lease: the address is most likely still here, and AWS may
            # charge for every remap, even to the same instance.
            try:
                owner = yield self.aws.call(self.cloud.describe_address, eip.region, eip.allocation_id)
            except CloudError:
                owner = None
            if owner == eip.instance_id:
                self._confirm(token)
                if catch_up:
                    self._front_round(self.monotonic())
                return
        while True:
            self.guard(token)
            attempt += 1
            at = self.monotonic()
            try:
                association = yield self.aws.call(
                    self.cloud.associate_address, eip.region, eip.allocation_id, eip.instance_id
                )
                done = self.monotonic()
                self.acting_log.write("associate", token=token, at=at, done=done,
                                      allocation_id=eip.allocation_id, instance_id=eip.instance_id,
                                      association_id=association)
                self._mark(associate=at, associated=done)
                owner = yield self.aws.call(self.cloud.describe_address, eip.region, eip.allocation_id)
            except CloudError as e:
                self.acting_log.write("associate-failed", token=token, at=at, done=self.monotonic(),
                                      error=str(e))
                delay = backoff(attempt)
                log.warn("moving {allocation_id} failed (attempt {attempt}, again in {delay}s): {error}",
                         allocation_id=eip.allocation_id, attempt=attempt, delay=delay, error=str(e))
                yield deferLater(self.reactor, delay, lambda: None)
                continue
            if owner == eip.instance_id:
                break
            log.warn("{allocation_id} is on {owner} after associating it with {instance_id}; again",
                     allocation_id=eip.allocation_id, owner=owner, instance_id=eip.instance_id)
            yield deferLater(self.reactor, backoff(attempt), lambda: None)
        self._confirm(token)
        if catch_up:
            self._front_round(self.monotonic())

    def _mark(self, **moments: float) -> None:
        """Notes moments of the takeover under way (none under way: nothing)."""
        if self._timeline:
            self._timeline.update(moments)

    def _confirm(self, token: int) -> None:
        self.guard(token)
        self.confirmed = token
        self._address_was_ours = True
        self._moving = None
        self.state = PRIMARY
        if self._timeline:
            self.acting_log.write("takeover", token=token, confirmed=self.monotonic(), **self._timeline)
            self._timeline = {}
        log.info("primary with token {token}: {allocation_id} is on {instance_id}",
                 token=token, allocation_id=self.address.allocation_id, instance_id=self.address.instance_id)
        self._send_heartbeat()

    # -- heartbeats and the registry of lb nodes

    def _heard(self, heartbeat: Heartbeat) -> None:
        if heartbeat.token > self.token_seen:
            self.token_seen = heartbeat.token
            self.poke()
        elif heartbeat.state == STOPPED and self.holding is None:
            # A graceful stop: the holder released the lease before saying so.
            self.poke()
        lease = self.last_lease
        if (heartbeat.state == STOPPING and self.holding is None and lease is not None
                and heartbeat.node == lease.record.holder):
            log.info("{holder} says it is stopping", holder=heartbeat.node)
            self._holder_stopping = self.monotonic()
            self._front_round(self._holder_stopping)
            self._warm_aws(f"{heartbeat.node} is stopping")
        if self.holding is None and lease is not None and heartbeat.node == lease.record.holder:
            named = self.heartbeat.lease_version_heard(heartbeat.node)
            if named is not None and named[1] == self.heartbeat.heard(heartbeat.node):
                # A new version: the next is due a renewal interval from now.
                self._rearm("_overdue", self.settings.renew_interval * OVERDUE, self._renewal_overdue)
            # Look for silence the moment it would begin, not at the next beat (up to one
            # heartbeat_interval later).  A hair late, so the look never comes before it.
            self._rearm("_silence", self.settings.suspect_after + 0.001, self._look_for_silence)

    def _rearm(self, name: str, delay: float, f: Callable[[], object]) -> None:
        """(Re)sets the timer kept in attribute ``name`` to call ``f`` after ``delay``."""
        call: IDelayedCall | None = getattr(self, name)
        if call is not None and call.active():
            call.reset(delay)
        else:
            setattr(self, name, self.reactor.callLater(delay, f))

    def _renewal_overdue(self) -> None:
        # Still alive, the holder is only late; dead, it may have written a version nobody heard
        # of: read it now, so the watch of it starts now, not at suspicion.
        if self.holding is None:
            self.poke()

    def _beat(self) -> None:
        self._send_heartbeat()
        self._look_for_silence()

    def _look_for_silence(self) -> None:
        # A standby looks at the lease as soon as the holder falls silent, not at its next
        # unhurried look: that is what makes detection fast.
        lease = self.last_lease
        if self.holding is not None or lease is None or lease.record.holder in ("", self.node):
            self._suspecting = False
            self._suspected_at = None
            return
        silent = suspect(self.heartbeat.heard(lease.record.holder), self.monotonic(),
                         self.settings.suspect_after)
        if silent and not self._suspecting:
            log.info("suspecting {holder}: no heartbeat for {seconds}s", holder=lease.record.holder,
                     seconds=self.settings.suspect_after)
            self._suspected_at = self.monotonic()
            # If the holder is gone, nginx will be current before the lease lapses, and so
            # will the way to AWS.
            self._front_round(self._suspected_at)
            self._warm_aws(f"suspecting {lease.record.holder}")
            self.poke()
        if not silent:
            self._suspected_at = None
        self._suspecting = silent

    def _send_heartbeat(self) -> None:
        holding = self.holding
        self.heartbeat.send(
            self.peers,
            state=self.state,
            token=holding.token if holding is not None else self.token_seen,
            generation=self.generation() or "",
            lease=holding.version if holding is not None else None,
        )

    def _register(self) -> Deferred[None]:
        d = self.blocking.call(self._write_record, self._record())
        d.addCallback(self._got_peers)
        d.addErrback(lambda f: log.debug("lb node registry: {error}", error=str(f.value)))
        return d

    def _record(self) -> LbNodeRecord:
        """This node as ``puppetha status`` shows it (built on the reactor thread)."""
        now = self.monotonic()
        return LbNodeRecord(
            node=self.node,
            address=self.advertise,
            port=self.heartbeat.port,
            registered_at=self.wall(),
            state=self.state,
            token=self.holding.token if self.holding is not None else self.token_seen,
            generation=self.generation() or "",
            updated_at=self.wall(),
            heard={n: round(now - p.heard, 3) for n, p in self.heartbeat.peers.items()},
        )

    def _write_record(self, record: LbNodeRecord) -> list[LbNodeRecord]:
        """Blocking: write this node's record, read every other one."""
        existing = self.records.get(LbNodeRecord, self.node)
        if existing is None:
            self.records.create(record)
        else:
            record = evolve(record, registered_at=existing.record.registered_at)
            self.records.replace(record, existing.version)
        return [v.record for v in self.records.list(LbNodeRecord) if v.record.node != self.node]

    def _got_peers(self, others: Iterable[LbNodeRecord]) -> None:
        self.peers = sorted((o.address, o.port) for o in others)
