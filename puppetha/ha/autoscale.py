"""
The acting side of scaling, on the primary only: which masters the fleet has (registered ones
from the store, launched-not-enrolled ones from EC2), and launching masters from the launch
template, each launch recorded in the store under the lease token that made it.

A launch is recorded before it is made: the record's name (token and sequence) gives the
RunInstances client token, so a launch retried after a lost answer or a crash, under the same
token, gets the same instances from EC2 instead of new ones.  Draining is not built yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from attrs import evolve, field, frozen
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from puppetha.aws.cloud import ICloud, InstanceInfo
from puppetha.ha.front import RunsBlocking
from puppetha.ha.lease import Holding
from puppetha.ha.scaling import LAUNCH, SERVING, STARTING, WARMING, Master, ScaleDecision
from puppetha.store.records import MasterRecord, Record, Records

log = Logger()

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
    #: The instances launched; empty until RunInstances answered.
    instances: tuple[str, ...] = field(default=(), converter=_names)

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


def fleet_masters(
    registered: Iterable[MasterRecord],
    enrolled_instances: Iterable[str],
    launched: Mapping[str, InstanceInfo],
    now: float,
    warmup: float,
) -> list[Master]:
    """
    The masters as the policy sees them: a registered, healthy master warms for ``warmup`` after
    its registration and then serves; an instance launched as a master that has not enrolled is
    starting.  Unhealthy masters are out of the upstream: they count for nothing.
    """
    masters = []
    for record in registered:
        if not record.healthy:
            continue
        ready = record.registered_at + warmup
        if now < ready:
            masters.append(Master(record.certname, WARMING, record.registered_at))
        else:
            masters.append(Master(record.certname, SERVING, ready))
    enrolled = set(enrolled_instances)
    for instance_id, info in sorted(launched.items()):
        if instance_id not in enrolled:
            masters.append(Master(instance_id, STARTING, info.launch_time))
    return masters


class Launcher:
    """Launches masters for a decision, behind the failover guard, recorded in the store."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        guard: Callable[[int | None], Holding],
        records: Records,
        blocking: RunsBlocking,
        cloud: ICloud,
        aws: RunsBlocking,
        region: str,
        launch_template: str,
    ) -> None:
        self.clock = clock
        self.guard = guard
        self.records = records
        self.blocking = blocking
        self.cloud = cloud
        self.aws = aws
        self.region = region
        self.launch_template = launch_template
        self._sequence = 0

    @inlineCallbacks
    def act(self, decision: ScaleDecision, token: int) -> Any:
        """
        Fires with the :class:`ScaleActionRecord` of a launch, or None for any other decision.
        Raises :class:`puppetha.ha.primary.NotPrimary` (nothing recorded, nothing launched) when
        the guard refuses, before the record and again before RunInstances.
        """
        if decision.action != LAUNCH:
            return None
        self.guard(token)
        self._sequence += 1
        record = ScaleActionRecord(action_name(token, self._sequence), LAUNCH, token,
                                   self.clock.seconds(), decision.reason, decision.count)
        yield self.blocking.call(self.records.create, record)
        done = yield self.launch(record)
        return done

    @inlineCallbacks
    def launch(self, record: ScaleActionRecord) -> Any:
        """Make (or make again, with the same client token) the launch ``record`` describes."""
        self.guard(record.token)
        ids = yield self.aws.call(
            self.cloud.run_instances, self.region, self.launch_template, record.count,
            tags={LAUNCHED_BY_TAG: str(record.token)}, client_token=record.client_token,
        )
        current = yield self.blocking.call(self.records.get, ScaleActionRecord, record.name)
        done = evolve(record, instances=tuple(ids))
        yield self.blocking.call(self.records.replace, done, current.version)
        log.info("scaling: launched {count} masters ({reason}) under token {token}: {instances}",
                 count=len(ids), reason=record.reason, token=record.token, instances=" ".join(ids))
        return done

    def unfinished(self) -> list[ScaleActionRecord]:
        """Blocking: recorded launches that never got their instances (to :meth:`launch` again)."""
        return [v.record for v in self.records.list(ScaleActionRecord)
                if v.record.action == LAUNCH and not v.record.instances]
