"""
The acting side of scaling, on the primary only: which masters the fleet has (registered ones
from the store, launched-not-enrolled ones from EC2), and launching masters from the launch
template, each launch recorded in the store under the lease token that made it.

A launch is recorded before it is made: the record's name (token and sequence) gives the
RunInstances client token, so a launch retried after a lost answer or a crash, under the same
token, gets the same instances from EC2 instead of new ones.  Draining, recorded the same way,
is :mod:`puppetha.ha.drain`.

The primary keeps its last decisions, with their reasons, in one ``scalelog`` record, so that
``puppetha status`` (another process) shows them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol

from attrs import evolve, field, frozen
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from puppetha.aws.cloud import ICloud, InstanceInfo
from puppetha.ha.front import RunsBlocking
from puppetha.ha.lease import Holding
from puppetha.ha.primary import NotPrimary
from puppetha.ha.scaling import (
    DRAIN,
    DRAINED,
    DRAINING,
    HOLD,
    LAUNCH,
    SERVING,
    STARTING,
    WARMING,
    Master,
    Sample,
    ScaleDecision,
    ScaleSettings,
    decide,
)
from puppetha.repeat import Repeating, RepeatingService
from puppetha.store import AlreadyExists, VersionConflict
from puppetha.store.records import MasterRecord, NodeRecord, Record, Records

log = Logger()


class Drains(Protocol):
    """What the service asks of :class:`puppetha.ha.drain.Drainer` (which imports this module)."""

    def act(self, decision: ScaleDecision, token: int) -> Deferred[Any]: ...

    def advance(self, token: int) -> Deferred[Any]: ...

#: The tag EC2 puts on a launched master: the lease token of the launch.
LAUNCHED_BY_TAG = "puppetha:launched-by-token"


def _names(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@frozen
class ScaleActionRecord(Record):
    """One scaling action, as decided and as done (``kind`` ``scale``)."""

    KIND: ClassVar[str] = "scale"
    #: ``<token>-<sequence>``, zero-padded so that the store lists actions in order.
    name: str
    action: str
    token: int
    decided_at: float
    reason: str
    count: int = 0
    #: The instances launched (empty until RunInstances answered), or the one drained.
    instances: tuple[str, ...] = field(default=(), converter=_names)
    #: A drain's master (certname) and its instance's region.
    master: str = ""
    region: str = ""
    #: When a drain was done: the instance terminated and the master deregistered.
    finished_at: float | None = None

    def key(self) -> str:
        return self.name

    def to_value(self) -> dict[str, Any]:
        value = super().to_value()
        value["instances"] = list(self.instances)
        return value

    @property
    def client_token(self) -> str:
        return f"puppetha-scale-{self.name}"


def action_name(token: int, sequence: int) -> str:
    return f"{token:012d}-{sequence:06d}"


def next_action_name(records: Records, token: int) -> str:
    """
    Blocking: the name of the next action under ``token``, after those in the store (a launch
    and a drain share the sequence, and a restarted daemon holding the same token goes on).
    """
    prefix = f"{token:012d}-"
    used = [int(v.record.name[len(prefix):]) for v in records.list(ScaleActionRecord, prefix)]
    return action_name(token, max(used, default=0) + 1)


#: How many decisions the ``scalelog`` record keeps, newest last.
KEPT_DECISIONS = 20
#: The one ``scalelog`` record: the decisions of whichever node is primary.
SCALE_LOG = "decisions"


def _decisions(value: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Any], ...]:
    return tuple(dict(d) for d in value)


@frozen
class ScaleLogRecord(Record):
    """
    The primaries' last decisions, newest last (``kind`` ``scalelog``, key ``decisions``): each
    ``{"at", "node", "token", "action", "reason", "count", "master"}``, at most
    :data:`KEPT_DECISIONS`.
    """

    KIND: ClassVar[str] = "scalelog"
    name: str
    decisions: tuple[dict[str, Any], ...] = field(default=(), converter=_decisions)

    def key(self) -> str:
        return self.name

    def to_value(self) -> dict[str, Any]:
        return {"name": self.name, "decisions": list(self.decisions)}


def write_decision(
    records: Records, node: str, token: int, at: float, decision: ScaleDecision
) -> ScaleLogRecord:
    """
    Blocking: one decision added to those kept, the oldest dropped past :data:`KEPT_DECISIONS`;
    a hold replaces a hold just before it.
    """
    entry = {"at": at, "node": node, "token": token, "action": decision.action, "reason": decision.reason,
             "count": decision.count, "master": decision.master}
    for _ in range(3):
        found = records.get(ScaleLogRecord, SCALE_LOG)
        kept = found.record.decisions if found is not None else ()
        if kept and kept[-1].get("action") == HOLD and decision.action == HOLD:
            # Holds follow one another every round: the latest stands for them all, and the
            # actions before it stay.
            kept = kept[:-1]
        record = ScaleLogRecord(SCALE_LOG, (*kept, entry)[-KEPT_DECISIONS:])
        try:
            if found is None:
                records.create(record)
            else:
                records.replace(record, found.version)
            return record
        except (AlreadyExists, VersionConflict):
            # Another node wrote meanwhile (a former primary's last round): read it again.
            continue
    log.info("scaling: decision not kept, the log kept changing: {reason}", reason=decision.reason)
    return record


def launched_masters(records: Records, now: float, launch_timeout: float) -> list[str]:
    """Blocking: the instances launched as masters within ``launch_timeout`` (only they may be starting)."""
    return sorted({instance for v in records.list(ScaleActionRecord)
                   if v.record.action == LAUNCH and now - v.record.decided_at < launch_timeout
                   for instance in v.record.instances})


def enrolled_masters(records: Records) -> tuple[list[MasterRecord], list[str]]:
    """Blocking: the registered masters, and the instances that ever enrolled as a master."""
    return ([v.record for v in records.list(MasterRecord)],
            [v.record.instance_id for v in records.list(NodeRecord) if "master" in v.record.roles])


#: States in which a launched instance may still come to enroll.
_COMING = ("pending", "running")


@inlineCallbacks
def discover_fleet(
    *, records: Records, blocking: RunsBlocking, cloud: ICloud, aws: RunsBlocking, region: str,
    now: float, settings: ScaleSettings,
) -> Any:
    """Fires with :func:`fleet_masters` of the store and of what EC2 says of the launched instances."""
    registered, enrolled = yield blocking.call(enrolled_masters, records)
    ids = yield blocking.call(launched_masters, records, now, settings.launch_timeout)
    launched: dict[str, InstanceInfo] = {}
    if ids:
        found = yield aws.call(cloud.describe_instances, region, ids)
        launched = {i: info for i, info in found.items() if info.state in _COMING}
    return fleet_masters(registered, enrolled, launched, now, settings.warmup)


def fleet_masters(
    registered: Iterable[MasterRecord],
    enrolled_instances: Iterable[str],
    launched: Mapping[str, InstanceInfo],
    now: float,
    warmup: float,
) -> list[Master]:
    """
    The masters as the policy sees them: a registered master warms for ``warmup`` after its
    registration and then serves; an instance launched as a master that has not enrolled is
    starting; a master the primary drains is draining, then drained (healthy or not: it is on
    its way out either way).  A master unhealthy after its warm-up is out of the upstream and
    counts for nothing; within it, it is warming whatever its health says (puppetserver is
    still starting its JRubies), so that it is not launched again.
    """
    masters = []
    for record in registered:
        if record.drained_at is not None:
            masters.append(Master(record.certname, DRAINED, record.drained_at))
            continue
        if record.draining_since is not None:
            masters.append(Master(record.certname, DRAINING, record.draining_since))
            continue
        ready = record.registered_at + warmup
        if not record.healthy and now >= ready:
            continue
        if now < ready:
            masters.append(Master(record.certname, WARMING, record.registered_at))
        else:
            masters.append(Master(record.certname, SERVING, ready))
    enrolled = set(enrolled_instances)
    for instance_id, info in sorted(launched.items()):
        if instance_id not in enrolled:
            masters.append(Master(instance_id, STARTING, info.launch_time))
    return masters


@frozen
class FleetControl:
    """
    What the primary launches and drains masters through: the failover guard (which refuses
    once the lease token is not this node's), the store where each step is recorded before it is
    taken, EC2 in ``region``, the pools that reach them, and the clock.
    """

    clock: IReactorTime
    guard: Callable[[int | None], Holding]
    records: Records
    blocking: RunsBlocking
    cloud: ICloud
    aws: RunsBlocking
    region: str


class Launcher:
    """Launches masters for a decision, behind the failover guard, recorded in the store."""

    def __init__(self, control: FleetControl, *, launch_template: str) -> None:
        self.control = control
        self.launch_template = launch_template

    @inlineCallbacks
    def act(self, decision: ScaleDecision, token: int) -> Any:
        """
        Fires with the :class:`ScaleActionRecord` of a launch, or None for any other decision.
        Raises :class:`puppetha.ha.primary.NotPrimary` (nothing recorded, nothing launched) when
        the guard refuses, before the record and again before RunInstances.
        """
        if decision.action != LAUNCH:
            return None
        control = self.control
        control.guard(token)
        name = yield control.blocking.call(next_action_name, control.records, token)
        record = ScaleActionRecord(name, LAUNCH, token, control.clock.seconds(), decision.reason,
                                   decision.count)
        yield control.blocking.call(control.records.create, record)
        done = yield self.launch(record)
        return done

    @inlineCallbacks
    def launch(self, record: ScaleActionRecord) -> Any:
        """Make (or make again, with the same client token) the launch ``record`` describes."""
        control = self.control
        control.guard(record.token)
        ids = yield control.aws.call(
            control.cloud.run_instances, control.region, self.launch_template, record.count,
            tags={LAUNCHED_BY_TAG: str(record.token)}, client_token=record.client_token,
        )
        current = yield control.blocking.call(control.records.get, ScaleActionRecord, record.name)
        done = evolve(record, instances=tuple(ids))
        yield control.blocking.call(control.records.replace, done, current.version)
        log.info("scaling: launched {count} masters ({reason}) under token {token}: {instances}",
                 count=len(ids), reason=record.reason, token=record.token, instances=" ".join(ids))
        return done

    def unfinished(self) -> list[ScaleActionRecord]:
        """Blocking: recorded launches that never got their instances (to :meth:`launch` again)."""
        return [v.record for v in self.control.records.list(ScaleActionRecord)
                if v.record.action == LAUNCH and not v.record.instances]


class ScalingService(RepeatingService):
    """
    Every ``interval``, on the primary only: carry on the drains in progress (``drainer``), sample
    the masters' load, tell which masters there are, decide (:func:`puppetha.ha.scaling.decide`),
    and launch or begin a drain (without a ``drainer``, drain decisions are only logged).
    ``sample(now)`` and
    ``masters(now)`` fire with the :class:`Sample` and the list of :class:`Master`.  A node
    that is not primary keeps no history: the one that becomes primary starts its windows anew.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        settings: ScaleSettings,
        interval: float,
        guard: Callable[[int | None], Holding],
        sample: Callable[[float], Deferred[Sample]],
        masters: Callable[[float], Deferred[list[Master]]],
        launcher: Launcher,
        drainer: Drains | None = None,
        publish: Callable[[float, ScaleDecision, int], Deferred[Any]] | None = None,
    ) -> None:
        self.clock = clock
        self.settings = settings
        self.interval = interval
        self.guard = guard
        self.sample = sample
        self.masters = masters
        self.launcher = launcher
        self.drainer = drainer
        #: Keeps the decisions where ``puppetha status`` reads them (under the round's token).
        self.publish = publish
        self.history: list[Sample] = []
        self.last_action: float | None = None
        #: The last decisions with their reasons, newest last.
        self.decisions: list[tuple[float, ScaleDecision]] = []
        self._repeating = Repeating(self._round, clock, interval)

    def _round(self) -> Deferred[Any]:
        def failed(failure: Failure) -> None:
            if failure.check(NotPrimary):
                log.info("scaling: stopped, {reason}", reason=str(failure.value))
            else:
                log.failure("a scaling round failed; the next one tries again", failure)

        return self.once().addErrback(failed)

    @inlineCallbacks
    def once(self) -> Any:
        """One round; fires with its decision (None on a standby)."""
        try:
            token = self.guard(None).token
        except NotPrimary:
            self.history.clear()
            return None
        if self.drainer is not None:
            yield self.drainer.advance(token)
        now = self.clock.seconds()
        sample = yield self.sample(now)
        self.history = [s for s in self.history
                        if s.at >= now - self.settings.in_window - 2 * self.interval]
        self.history.append(sample)
        masters = yield self.masters(now)
        decision = decide(self.settings, masters, self.history, now, self.last_action)
        self.decisions = [*self.decisions[-(KEPT_DECISIONS - 1):], (now, decision)]
        if decision.action == LAUNCH:
            self.last_action = now
            yield self.launcher.act(decision, token)
        elif decision.action == DRAIN and self.drainer is not None:
            self.last_action = now
            yield self.drainer.act(decision, token)
        elif decision.action != HOLD:
            log.info("scaling: {action} {master} decided, and this daemon has no drainer ({reason})",
                     action=decision.action, master=decision.master, reason=decision.reason)
        if self.publish is not None:
            yield self.publish(now, decision, token)
        return decision
