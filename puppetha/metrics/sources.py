"""
The sources of the metrics endpoint, one per live part of the daemon: each is called at a scrape
and reads the part as it is then.  Store reads go to the read pool (a scrape never blocks the
reactor); the services' own counts are read on the reactor thread, where they change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client.core import Metric
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from puppetha.enc.service import ENCFactory
from puppetha.enroll.service import Enrollment
from puppetha.ha.autoscale import ScaleActionRecord
from puppetha.ha.lease import FAILOVER_LEASE
from puppetha.ha.primary import PRIMARY, FailoverService
from puppetha.ha.scaling import MasterLoad, ScaleDecision
from puppetha.heap import SettledHeap
from puppetha.metrics import families
from puppetha.metrics.endpoint import Source
from puppetha.store.records import CRLRecord, LeaseRecord, MasterRecord, Records
from puppetha.threads import Blocking


def enrollment_source(enrollment: Enrollment) -> Source:
    return lambda: families.enrollment_families(enrollment.enrolled, enrollment.refused)


def heap_source(heap: SettledHeap) -> Source:
    return lambda: families.gc_families(heap.collections(), heap.pauses, heap.frozen())


def enc_source(factory: ENCFactory) -> Source:
    return lambda: families.enc_families(factory.answers, factory.latencies)


def store_sources(reads: Blocking[Records], clock: IReactorTime) -> dict[str, Source]:
    """The families read from the store: CRLs, the lease, the masters, the scaling actions."""
    records = reads.target

    def crls() -> Deferred[list[Metric]]:
        return reads.call(lambda: [v.record for v in records.list(CRLRecord)]).addCallback(
            lambda found: families.crl_families(found, clock.seconds()))

    def lease() -> Deferred[list[Metric]]:
        return reads.call(records.get, LeaseRecord, FAILOVER_LEASE).addCallback(
            lambda found: families.lease_families(None if found is None else found.record, clock.seconds()))

    def masters() -> Deferred[list[Metric]]:
        return reads.call(lambda: [v.record for v in records.list(MasterRecord)]).addCallback(
            families.master_families)

    def scale_actions() -> Deferred[list[Metric]]:
        return reads.call(lambda: [v.record for v in records.list(ScaleActionRecord)]).addCallback(
            families.scale_action_families)

    return {"crl": crls, "lease": lease, "masters": masters, "scale actions": scale_actions}


def failover_sources(failover: FailoverService) -> dict[str, Source]:
    """This lb node's view: the heartbeats it hears, whether it is primary."""
    heartbeat = failover.heartbeat

    def heartbeats() -> list[Metric]:
        return families.heartbeat_families(heartbeat.peers, heartbeat.monotonic())

    def primary() -> list[Metric]:
        return families.primary_families(failover.state == PRIMARY, failover.state)

    return {"heartbeats": heartbeats, "primary": primary}


Loads = Mapping[str, MasterLoad]


def load_source(latest: Callable[[], Loads | Deferred[Loads]]) -> Source:
    """The masters' load from the sampler that provides it (``latest``: certname -> load)."""

    def collect() -> Any:
        answer = latest()
        if isinstance(answer, Deferred):
            return answer.addCallback(families.load_families)
        return families.load_families(answer)

    return collect


def scale_decision_source(decisions: Callable[[], Sequence[tuple[float, ScaleDecision]]]) -> Source:
    """The scaling loop's decisions, newest last (``ScalingService.decisions``)."""
    return lambda: families.scale_decision_families(decisions())
