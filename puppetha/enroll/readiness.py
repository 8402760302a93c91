"""
Whether this daemon can enroll right now: what ``GET /v1/health`` says, so that a balancer
probing it takes a host out that would only answer 503.

A background check (every ``[enroll] health_interval``) writes a probe item to the store, asks
AWS a DescribeInstances that names no instance, and reads whether a healthy master is
registered, each within its dependency's deadline; the answer to a probe is made from the last
check's results at once, never by blocking calls per request.  :func:`assess` decides (pure).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from puppetha.aws.cloud import ICloud
from puppetha.pki.authority import RESERVED_CA_NAMES
from puppetha.repeat import Repeating, RepeatingService
from puppetha.store import AlreadyExists, VersionConflict
from puppetha.store.records import CARecord, MasterRecord, Records
from puppetha.threads import Blocking

log = Logger()

#: The store kind of the probe items, one per daemon (host name): written on every check.
PROBE_KIND = "probe"

#: An instance id that is well formed but never names an instance: asking for it is a real
#: DescribeInstances round trip that reads nothing.
PROBE_INSTANCE_ID = "i-00000000000000000"

#: A check older than this many intervals is not believed: the checker itself is stuck.
STALE_CHECKS = 3


@frozen
class CheckResult:
    """One background check: ``""`` for a dependency that answered, else why it did not."""

    at: float
    store: str
    aws: str
    #: Healthy masters registered; ``None`` when the store could not say.
    masters: int | None


@frozen
class Readiness:
    """What ``/v1/health`` answers: ``reason`` is empty when the daemon can enroll."""

    reason: str
    message: str
    checks: Mapping[str, str]

    @property
    def ready(self) -> bool:
        return not self.reason

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = (
            {"status": "ok"} if self.ready else {"error": self.reason, "message": self.message}
        )
        body["checks"] = dict(self.checks)
        return body


def assess(last: CheckResult | None, now: float, interval: float) -> Readiness:
    """The readiness the last check shows at ``now`` (pure: tested as a table)."""
    if last is None:
        return Readiness("starting", "the first health check has not finished yet", {})
    checks = {
        "store": last.store or "ok",
        "aws": last.aws or "ok",
        "master": "unknown" if last.masters is None else ("ok" if last.masters else "none"),
    }
    age = now - last.at
    if age > STALE_CHECKS * interval:
        return Readiness("check-stale", f"the last health check finished {age:.0f}s ago", checks)
    if last.store:
        return Readiness("store-unavailable", f"the store cannot be written: {last.store}", checks)
    if last.aws:
        return Readiness("aws-unavailable", f"AWS cannot be asked: {last.aws}", checks)
    if not last.masters:
        return Readiness("no-master", "no healthy master is registered: agents cannot enroll", checks)
    return Readiness("", "", checks)


def write_probe(records: Records, name: str, now: float) -> None:
    """Blocking: write this daemon's probe item (another daemon's write in between also proves it)."""
    store = records.store
    value = {"checked_at": now}
    found = store.get(PROBE_KIND, name)
    try:
        if found is None:
            store.create(PROBE_KIND, name, value)
        else:
            store.replace(PROBE_KIND, name, value, found.version)
    except (AlreadyExists, VersionConflict):
        pass  # the store took a write lock and answered: it is writable


def healthy_masters(records: Records) -> int:
    """Blocking: how many healthy masters have a CA that can sign agents."""
    cas = {c.record.name for c in records.list(CARecord)}
    return sum(
        1 for m in records.list(MasterRecord)
        if m.record.healthy and m.record.ca in cas and m.record.ca not in RESERVED_CA_NAMES
    )


class ReadinessService(RepeatingService):
    """
    Runs the check every ``interval`` seconds.  ``writes`` is the store's write pool (a write
    stuck behind a held lock shows here as it would for an enrollment), ``reads`` its read pool,
    ``cloud`` the AWS pool; each has its dependency's deadline, so a check always ends.
    """

    def __init__(self, clock: IReactorTime, *, writes: Blocking[Records], reads: Blocking[Records],
                 cloud: Blocking[ICloud], region: str, interval: float, name: str | None = None) -> None:
        self.clock = clock
        self.writes = writes
        self.reads = reads
        self.cloud = cloud
        self.region = region
        self.interval = interval
        self.name = name or socket.gethostname() or "puppetha"
        self.last: CheckResult | None = None
        self._reported = ""
        self._repeating = Repeating(self.check, clock, interval)

    def readiness(self) -> Readiness:
        return assess(self.last, self.clock.seconds(), self.interval)

    def check(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._check())

    async def _check(self) -> None:
        records = self.writes.target
        # All three at once, so a check takes as long as the slowest deadline, not their sum.
        writing = _reason(self.writes.call(write_probe, records, self.name, self.clock.seconds()))
        # A DescribeInstances naming only an impossible id: a real round trip, nothing read.
        asking = _reason(self.cloud.call(self.cloud.target.describe_instances, self.region,
                                         [PROBE_INSTANCE_ID]))
        counting = self.reads.call(healthy_masters, records)
        store = await writing
        aws = await asking
        masters: int | None = None
        try:
            masters = await counting
        except Exception as e:  # any failure is "unknown", and said in the answer
            store = store or _message(e)
        self.last = CheckResult(self.clock.seconds(), store, aws, masters)
        readiness = self.readiness()
        if readiness.reason != self._reported:
            # Said once per change, not per check.
            if readiness.ready:
                log.info("ready to enroll again")
            else:
                log.warn("not ready to enroll: {reason}: {message}", reason=readiness.reason,
                         message=readiness.message)
            self._reported = readiness.reason


def _reason(d: Deferred[Any]) -> Deferred[str]:
    """``""`` when the call answered, else a short reason."""
    return d.addCallbacks(lambda _: "", lambda f: _message(f.value))


def _message(error: BaseException) -> str:
    return (" ".join(str(error).split()) or type(error).__name__)[:200]
