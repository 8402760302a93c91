"""
The fleet's life cycle: a periodic sweep, on the primary lb node only, of the enrolled instances
against DescribeInstances.  An instance that AWS says is terminated (or no longer knows, well
after it enrolled) has its identity revoked (``[lifecycle] revoke_terminated``, on by default),
so the CRLs that nginx serves carry its certificates at the front's next round; a master among
them leaves the upstream and enrollment's choice of issuer with its registration, while its CA
stays in nginx's bundle (the CRL refresher keeps every CA's CRL fresh) for the agents it signed.
The registrations of lb nodes (``lbnode`` records, which ``puppetha status`` and the heartbeats
read) whose instances are gone are removed the same way (:func:`plan_lbnode_removals`).

discover (store, AWS) -> :func:`plan_sweep` and :func:`plan_lbnode_removals` (pure) -> act
(revoke, deregister or remove, each behind the failover guard under the token the sweep began
with).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from puppetha.aws.cloud import CloudError, ICloud, InstanceInfo
from puppetha.enroll.service import RevokedIdentity
from puppetha.ha.front import RunsBlocking
from puppetha.ha.lease import Holding
from puppetha.ha.primary import NotPrimary
from puppetha.repeat import Repeating, RepeatingService
from puppetha.store import VersionConflict
from puppetha.store.records import LbNodeRecord, MasterRecord, NodeRecord, Records, Versioned

log = Logger()

#: DescribeInstances states after which an instance never runs again.
GONE_STATES = frozenset({"shutting-down", "terminated"})
#: Why a gone instance's certificates are revoked (RFC 5280).
REVOCATION_REASON = "cessationOfOperation"

#: How many times a master's registration is read again to be removed after another writer
#: changed it between the read and the delete.
DEREGISTER_ATTEMPTS = 5

REVOKE = "revoke"
DEREGISTER = "deregister"
KEEP = "keep"


@frozen
class LifecycleSettings:
    """``[lifecycle]``."""

    interval: float = 60.0
    revoke_terminated: bool = True
    #: An enrolled instance DescribeInstances does not know counts as gone only after this long:
    #: EC2's reads are eventually consistent, and AWS forgets terminated instances after an hour.
    grace: float = 600.0


@frozen
class Retirement:
    """What the sweep does about one gone instance."""

    instance_id: str
    certnames: tuple[str, ...]
    #: ``terminated``, ``shutting-down`` or ``unknown to AWS``.
    why: str
    action: str
    #: Its registered masters (left the upstream by either action).
    masters: tuple[str, ...] = ()


def plan_sweep(
    nodes: Sequence[NodeRecord],
    masters: Collection[str],
    described: Mapping[str, Mapping[str, InstanceInfo]],
    now: float,
    settings: LifecycleSettings,
) -> list[Retirement]:
    """
    The gone instances among ``nodes`` (not yet revoked), and what to do about each.
    ``described`` holds DescribeInstances' answer per region; a region missing from it (AWS
    could not be asked) decides nothing.  ``masters`` are the registered masters' certnames.
    """
    by_instance: dict[str, list[NodeRecord]] = {}
    for node in nodes:
        if not node.revoked:
            by_instance.setdefault(node.instance_id, []).append(node)
    plan: list[Retirement] = []
    for instance_id, records in sorted(by_instance.items()):
        region = records[0].region
        if region not in described:
            continue
        info = described[region].get(instance_id)
        if info is not None:
            if info.state not in GONE_STATES:
                continue
            why = info.state
        elif now - max(r.enrolled_at for r in records) >= settings.grace:
            why = "unknown to AWS"
        else:
            continue
        certnames = tuple(sorted(r.certname for r in records))
        registered = tuple(c for c in certnames if c in masters)
        if settings.revoke_terminated:
            action = REVOKE
        elif registered:
            action = DEREGISTER
        else:
            action = KEEP
        plan.append(Retirement(instance_id, certnames, why, action, registered))
    return plan


def plan_lbnode_removals(
    lbnodes: Sequence[LbNodeRecord],
    described: Mapping[str, InstanceInfo] | None,
    now: float,
    settings: LifecycleSettings,
    own: str,
) -> list[str]:
    """
    The lb nodes whose registrations should go: AWS says their instance is gone, or has not
    known it for ``grace`` since the node last wrote its record.  ``described`` is
    DescribeInstances' answer for the lb nodes' region (None: AWS could not be asked, nothing
    is decided); ``own`` (the sweeping primary) is never removed.
    """
    if described is None:
        return []
    gone = []
    for lbnode in sorted(lbnodes, key=lambda n: n.node):
        if lbnode.node == own:
            continue
        info = described.get(lbnode.node)
        unknown_long = info is None and now - lbnode.updated_at >= settings.grace
        if unknown_long or (info is not None and info.state in GONE_STATES):
            gone.append(lbnode.node)
    return gone


def remove_lbnodes(records: Records, lbnodes: Mapping[str, Versioned[LbNodeRecord]],
                   names: Sequence[str]) -> list[str]:
    """
    Delete the lb nodes' records at the versions read: a node that wrote its record since (it
    is alive after all) keeps it.  Blocking.
    """
    removed = []
    for name in names:
        try:
            if records.store.delete(LbNodeRecord.KIND, name, lbnodes[name].version):
                removed.append(name)
        except VersionConflict:
            log.info("life cycle: lb node {node} wrote its record during the sweep; kept", node=name)
    return removed


def deregister_masters(records: Records, certnames: Sequence[str]) -> list[str]:
    """
    Remove the masters' registrations (they leave the upstream and enrollment's choice); the
    ones removed.  Blocking.  Each delete is at the version just read: when another writer
    changed the registration between the read and the delete (the health loop marks it), it is
    read and deleted again, up to :data:`DEREGISTER_ATTEMPTS` times, then ``VersionConflict``.
    """
    removed = []
    for certname in certnames:
        for attempt in range(1, DEREGISTER_ATTEMPTS + 1):
            current = records.get(MasterRecord, certname)
            if current is None:
                break
            try:
                if records.store.delete(MasterRecord.KIND, certname, current.version):
                    removed.append(certname)
                break
            except VersionConflict:
                if attempt == DEREGISTER_ATTEMPTS:
                    raise
                log.info("life cycle: master {certname} changed while it was deregistered; read again",
                         certname=certname)
    return removed


class LifecycleSweep(RepeatingService):
    """
    Every ``interval``, on the primary only: read the enrolled instances, ask AWS about them, and
    retire the gone ones.  ``revoke(instance_id, reason)`` is
    :func:`puppetha.enroll.service.revoke_identity` bound to the store and the authority
    (called with a certname; it returns what it revoked, or None);
    ``guard(token)`` is :meth:`puppetha.ha.primary.FailoverService.guard`.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        settings: LifecycleSettings,
        guard: Callable[[int | None], Holding],
        records: Records,
        blocking: RunsBlocking,
        cloud: ICloud,
        aws: RunsBlocking,
        revoke: Callable[[str, str], RevokedIdentity | None],
        lb_region: str | None = None,
    ) -> None:
        """``lb_region``: where the lb nodes run (None: their registrations are not swept)."""
        self.clock = clock
        self.settings = settings
        self.guard = guard
        self.records = records
        self.blocking = blocking
        self.cloud = cloud
        self.aws = aws
        self.revoke = revoke
        self.lb_region = lb_region
        self._repeating = Repeating(self._round, clock, settings.interval)

    def _round(self) -> Deferred[Any]:
        def failed(failure: Failure) -> None:
            log.failure("the life cycle sweep failed; the next one tries again", failure)

        return self.sweep().addErrback(failed)

    @inlineCallbacks
    def sweep(self) -> Any:
        """One sweep; fires with the retirements acted on ([] on a standby)."""
        try:
            holding = self.guard(None)
        except NotPrimary:
            return []
        token = holding.token
        nodes = [v.record for v in (yield self.blocking.call(self.records.list, NodeRecord))]
        masters = {v.record.certname for v in (yield self.blocking.call(self.records.list, MasterRecord))}
        lbnodes: dict[str, Versioned[LbNodeRecord]] = {}
        if self.lb_region is not None:
            lbnodes = {v.record.node: v for v in (yield self.blocking.call(self.records.list, LbNodeRecord))}
        wanted: dict[str, list[str]] = {}
        for node in nodes:
            if not node.revoked:
                wanted.setdefault(node.region, []).append(node.instance_id)
        if self.lb_region is not None and lbnodes:
            wanted.setdefault(self.lb_region, []).extend(lbnodes)
        described: dict[str, Mapping[str, InstanceInfo]] = {}
        for region, ids in sorted(wanted.items()):
            try:
                described[region] = yield self.aws.call(self.cloud.describe_instances, region, ids)
            except CloudError as e:
                log.warn("life cycle: cannot ask AWS about {region}, nothing decided there: {error}",
                         region=region, error=str(e))
        plan = plan_sweep(nodes, masters, described, self.clock.seconds(), self.settings)
        done: list[Retirement] = []
        for retirement in plan:
            if retirement.action == KEEP:
                log.info("life cycle: {instance_id} ({certnames}) is {why}; its certificates stay valid "
                         "([lifecycle] revoke_terminated is off)", instance_id=retirement.instance_id,
                         certnames=" ".join(retirement.certnames), why=retirement.why)
                continue
            try:
                self.guard(token)
            except NotPrimary as e:
                log.info("life cycle: stopped, {reason}", reason=str(e))
                break
            if retirement.action == REVOKE:
                # By certname: one revocation covers every record the instance's claims name,
                # and a certname finds its record even where no claim names it.
                remaining = list(retirement.certnames)
                while remaining:
                    revoked = yield self.blocking.call(self.revoke, remaining.pop(0), REVOCATION_REASON)
                    if revoked is not None:
                        covered = {n.certname for n in revoked.nodes}
                        remaining = [c for c in remaining if c not in covered]
                log.info("life cycle: {instance_id} is {why}: revoked {certnames} under token {token}",
                         instance_id=retirement.instance_id, why=retirement.why,
                         certnames=" ".join(retirement.certnames), token=token)
            else:
                yield self.blocking.call(deregister_masters, self.records, retirement.masters)
                log.info("life cycle: master {instance_id} is {why}: deregistered under token {token}",
                         instance_id=retirement.instance_id, why=retirement.why, token=token)
            done.append(retirement)
        yield self._remove_lbnodes(lbnodes, described, token, holding.holder)
        return done

    @inlineCallbacks
    def _remove_lbnodes(self, lbnodes: Mapping[str, Versioned[LbNodeRecord]],
                        described: Mapping[str, Mapping[str, InstanceInfo]], token: int, own: str) -> Any:
        if self.lb_region is None:
            return
        gone = plan_lbnode_removals([v.record for v in lbnodes.values()], described.get(self.lb_region),
                                    self.clock.seconds(), self.settings, own)
        if not gone:
            return
        try:
            self.guard(token)
        except NotPrimary as e:
            log.info("life cycle: lb nodes left alone, {reason}", reason=str(e))
            return
        removed = yield self.blocking.call(remove_lbnodes, self.records, lbnodes, gone)
        if removed:
            log.info("life cycle: lb node(s) {nodes} gone from AWS: registration removed under token {token}",
                     nodes=" ".join(removed), token=token)
