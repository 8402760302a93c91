"""
Draining a master and terminating it, on the primary only, each step recorded before it is taken
and behind the failover guard under the lease token (as :class:`puppetha.ha.autoscale.Launcher`
launches).

A drain goes, one store write at a time, so that a crash or a lost lease at any point leaves
what the next primary needs to go on (:meth:`Drainer.advance`):

1. a ``scale`` record (action ``drain``, the master, its instance, the token);
2. the master marked draining (``MasterRecord.draining_since``): enrollment gives it no new
   agents and the front takes it out of the upstream; nginx's reload leaves the old workers to
   finish the requests they had sent it;
3. at a later round, once nothing is in flight (``in_flight``, e.g. :class:`ShuttingDownWorkers`)
   or ``drain_timeout`` has passed, the master marked drained (``drained_at``);
4. TerminateInstances (terminating twice is not an error);
5. the master deregistered as the life cycle does it (its CA stays, with its CRL, for the agents
   it signed), and the record finished.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from puppetha.ha.autoscale import FleetControl, ScaleActionRecord, next_action_name
from puppetha.ha.lifecycle import deregister_masters
from puppetha.ha.scaling import DRAIN, DRAINED, DRAINING, Master, ScaleDecision, ScaleSettings, next_state
from puppetha.store import VersionConflict
from puppetha.store.records import MasterRecord, NodeRecord

log = Logger()

#: How many times one step reads a master's record again after another writer changed it
#: between the step's read and its write (the health loop writes the same record).
MARK_ATTEMPTS = 5


class DrainRefused(Exception):
    """
    Nothing drained: the decision names no registered master (it left since the masters were
    read), or the master is the last one in service (healthy, not draining).
    """


#: nginx's title for a worker that finishes its requests after a reload, then exits.
SHUTTING_DOWN_TITLE = b"nginx: worker process is shutting down"


class ShuttingDownWorkers:
    """
    Blocking: how many of the local nginx's workers are still finishing requests after a reload
    (the primary's nginx is the front that carries the traffic).  Counted for every master, not
    only the draining one: a drain waits for a little too long rather than too little, and never
    beyond ``drain_timeout``.
    """

    def __init__(self, pid_path: str, proc: str = "/proc") -> None:
        self.pid_path = pid_path
        self.proc = Path(proc)

    def __call__(self, certname: str) -> int:
        try:
            master = int(Path(self.pid_path).read_text().strip())
        except (OSError, ValueError):
            # No nginx running here: nothing of ours is in flight through it.
            return 0
        count = 0
        for entry in self.proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            # The parent pid is the second field after the command's closing parenthesis.
            if int(stat.rsplit(")", 1)[1].split()[1]) == master and cmdline.startswith(SHUTTING_DOWN_TITLE):
                count += 1
        return count


class Drainer:
    """
    Drains a master for a decision, and carries drains in progress to their end, behind the
    failover guard, recorded in the store.  ``in_flight(certname)`` is blocking (it runs on
    ``blocking``); without it a drain waits the whole ``drain_timeout``.  ``poke()`` asks the
    front for a round now (:meth:`puppetha.ha.front.FrontService.poke`).
    """

    def __init__(
        self,
        control: FleetControl,
        *,
        settings: ScaleSettings,
        in_flight: Callable[[str], int] | None = None,
        poke: Callable[[], object] | None = None,
    ) -> None:
        self.control = control
        self.settings = settings
        self.in_flight = in_flight
        self.poke = poke

    @inlineCallbacks
    def act(self, decision: ScaleDecision, token: int) -> Any:
        """
        Fires with the drain's :class:`ScaleActionRecord` once its master is marked draining, or
        None for any other decision.  Raises :class:`puppetha.ha.primary.NotPrimary` when the
        guard refuses (before the record: nothing recorded, nothing marked), and
        :class:`DrainRefused` (nothing recorded) when the master is not registered or is the
        last one in service.
        """
        if decision.action != DRAIN or decision.master is None:
            return None
        self.control.guard(token)
        record = yield self.control.blocking.call(self._record, decision, token, self.control.clock.seconds())
        done = yield self.step(record, token)
        return done

    def _record(self, decision: ScaleDecision, token: int, now: float) -> ScaleActionRecord:
        certname = decision.master or ""
        records = self.control.records
        master = records.get(MasterRecord, certname)
        if master is None:
            raise DrainRefused(f"master {certname} is not registered")
        for v in records.list(ScaleActionRecord):
            if v.record.action == DRAIN and v.record.master == certname and v.record.finished_at is None:
                return v.record
        others = [v.record for v in records.list(MasterRecord)
                  if v.record.certname != certname and v.record.healthy and not v.record.draining]
        if not others:
            # Whatever the decision said: its agents would have no master to go to.
            raise DrainRefused(f"master {certname} is the last one in service")
        node = records.get(NodeRecord, certname)
        instance = node.record.instance_id if node is not None else certname
        region = node.record.region if node is not None else self.control.region
        record = ScaleActionRecord(next_action_name(records, token), DRAIN, token, now, decision.reason,
                                   1, instances=(instance,), master=certname, region=region)
        records.create(record)
        return record

    def unfinished(self) -> list[ScaleActionRecord]:
        """Blocking: recorded drains not done yet, oldest first."""
        return [v.record for v in self.control.records.list(ScaleActionRecord)
                if v.record.action == DRAIN and v.record.finished_at is None]

    @inlineCallbacks
    def advance(self, token: int) -> Any:
        """Take every drain in progress (made under any token) one step on; fires with them."""
        drains = yield self.control.blocking.call(self.unfinished)
        stepped = []
        for record in drains:
            stepped.append((yield self.step(record, token)))
        return stepped

    @inlineCallbacks
    def step(self, record: ScaleActionRecord, token: int) -> Any:
        """
        Take the drain ``record`` describes as far as it can go now, each write behind the guard
        under ``token``; fires with the record (``finished_at`` set once it is done).  A write
        to the master's record that another writer beat (the health loop marks the same
        record) is read and tried again at once, up to :data:`MARK_ATTEMPTS` times; past that the
        next round goes on.
        """
        control = self.control
        certname = record.master
        for _ in range(MARK_ATTEMPTS):
            try:
                drained = yield self._mark(record, token)
            except VersionConflict:
                log.info("scaling: master {certname} changed while its drain marked it; read again",
                         certname=certname)
                continue
            break
        else:
            log.warn("scaling: master {certname} changed under its drain {attempts} times in a row; the next "
                     "round goes on", certname=certname, attempts=MARK_ATTEMPTS)
            return record
        if not drained:
            return record
        control.guard(token)
        states = yield control.aws.call(control.cloud.terminate_instances, record.region or control.region,
                                        list(record.instances))
        control.guard(token)
        yield control.blocking.call(deregister_masters, control.records, [certname])
        current = yield control.blocking.call(control.records.get, ScaleActionRecord, record.name)
        done = evolve(record, finished_at=control.clock.seconds())
        yield control.blocking.call(control.records.replace, done, current.version)
        log.info("scaling: terminated master {certname} ({instances}: {states}) and deregistered it under "
                 "token {token}", certname=certname, instances=" ".join(record.instances),
                 states=" ".join(f"{k}={v}" for k, v in sorted(states.items())), token=token)
        yield self._poke()
        return done

    @inlineCallbacks
    def _mark(self, record: ScaleActionRecord, token: int) -> Any:
        """
        The master's record read, and marked draining, or drained once its requests ended or
        ``drain_timeout`` passed; fires with whether it may be terminated now (drained, or no
        longer registered).  Raises ``VersionConflict`` when another writer changed the record
        since it was read.
        """
        control = self.control
        certname = record.master
        found = yield control.blocking.call(control.records.get, MasterRecord, certname)
        if found is None:
            return True
        if not found.record.draining:
            control.guard(token)
            now = control.clock.seconds()
            marked = evolve(found.record, draining_since=now, drain_token=token)
            yield control.blocking.call(control.records.replace, marked, found.version)
            log.info("scaling: draining master {certname} ({reason}) under token {token}: no new agents or "
                     "requests; those in flight finish", certname=certname, reason=record.reason, token=token)
            yield self._poke()
            # Drained at a later round only: the front's reload must have begun first.
            return False
        if found.record.drained_at is not None:
            return True
        in_flight = 1
        if self.in_flight is not None:
            in_flight = yield control.blocking.call(self.in_flight, certname)
        since = found.record.draining_since or 0.0
        now = control.clock.seconds()
        state = next_state(Master(certname, DRAINING, since), now, self.settings,
                           enrolled=True, in_flight=in_flight)
        if state != DRAINED:
            return False
        control.guard(token)
        drained = evolve(found.record, drained_at=now)
        yield control.blocking.call(control.records.replace, drained, found.version)
        log.info("scaling: master {certname} drained ({why}) under token {token}", certname=certname,
                 why="no request in flight" if in_flight == 0 else "drain_timeout passed", token=token)
        return True

    def _poke(self) -> Deferred[Any] | None:
        if self.poke is None:
            return None
        result = self.poke()
        return result if isinstance(result, Deferred) else None

