"""
``/v1/health``: the pure decision as a table, the background check on a Clock with calls held
until the test lets them answer, and the resource answering from the last check at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock

from puppetha.aws.cloud import CloudError
from puppetha.enroll.api import enrollment_resource
from puppetha.enroll.readiness import STALE_CHECKS, CheckResult, ReadinessService, assess
from puppetha.store import StoreUnavailable
from puppetha.threads import Blocking

INTERVAL = 5.0


@pytest.mark.parametrize(("last", "now", "reason"), [
    (None, 0.0, "starting"),
    (CheckResult(100.0, "", "", 1), 100.0, ""),
    (CheckResult(100.0, "", "", 3), 100.0 + STALE_CHECKS * INTERVAL, ""),
    (CheckResult(100.0, "", "", 1), 100.1 + STALE_CHECKS * INTERVAL, "check-stale"),
    (CheckResult(100.0, "locked", "", 1), 100.0, "store-unavailable"),
    (CheckResult(100.0, "locked", "", None), 100.0, "store-unavailable"),
    (CheckResult(100.0, "", "read timeout", 1), 100.0, "aws-unavailable"),
    (CheckResult(100.0, "locked", "read timeout", 1), 100.0, "store-unavailable"),
    (CheckResult(100.0, "", "", 0), 100.0, "no-master"),
    (CheckResult(100.0, "", "read timeout", 0), 100.0, "aws-unavailable"),
])
def test_assess(last: CheckResult | None, now: float, reason: str) -> None:
    readiness = assess(last, now, INTERVAL)
    assert readiness.reason == reason
    assert readiness.ready == (reason == "")
    assert ("status" in readiness.to_json()) == readiness.ready


def test_checks_say_what_failed() -> None:
    assert assess(CheckResult(0.0, "", "read timeout", None), 0.0, INTERVAL).checks == {
        "store": "ok", "aws": "read timeout", "master": "unknown"}


class Scripted(Blocking[Any]):
    """Answers each call with the next scripted outcome: a value, an exception, or held."""

    def __init__(self, target: Any, outcomes: list[Any]) -> None:
        super().__init__(None, None, target)  # type: ignore[arg-type]
        self.outcomes = outcomes
        self.held: list[Deferred[Any]] = []

    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        outcome = self.outcomes.pop(0)
        if outcome == "held":
            self.held.append(Deferred())
            return self.held[-1]
        if isinstance(outcome, Exception):
            return fail(outcome)
        return succeed(outcome)


class Cloud:
    def describe_instances(self, region: str, ids: Any) -> dict[str, Any]:
        return {}


def test_the_check_keeps_state_and_the_probe_never_waits() -> None:
    clock = Clock()
    clock.advance(1000)
    writes = Scripted(object(), [None, StoreUnavailable("database is locked"), "held"])
    reads = Scripted(object(), [1, 1, 1])
    cloud = Scripted(Cloud(), [{}, {}, {}])
    service = ReadinessService(clock, writes=writes, reads=reads, cloud=cloud, region="us-east-1",
                               interval=INTERVAL, name="host")
    assert service.readiness().reason == "starting"
    service.startService()
    assert service.readiness().ready
    clock.advance(INTERVAL)
    assert service.readiness().reason == "store-unavailable"
    clock.advance(INTERVAL)  # this check's write hangs: the last result stands, then goes stale
    assert service.readiness().reason == "store-unavailable"
    health: Any = StubTreq(enrollment_resource(None, service.readiness))  # type: ignore[arg-type]
    answer: list[Any] = []
    health.get("https://x/v1/health").addCallback(answer.append)
    assert answer, "the probe waited"
    assert answer[0].code == 503
    body: list[bytes] = []
    health.content(answer[0]).addCallback(body.append)
    assert json.loads(body[0])["error"] == "store-unavailable"
    clock.advance(STALE_CHECKS * INTERVAL)
    assert service.readiness().reason == "check-stale"
    writes.held[0].callback(None)
    assert service.readiness().ready
    maybeDeferred(service.stopService)


def test_aws_failing_is_said_with_its_reason() -> None:
    clock = Clock()
    service = ReadinessService(
        clock, writes=Scripted(object(), [None]), reads=Scripted(object(), [2]),
        cloud=Scripted(Cloud(), [CloudError("AWS did not answer within 8s")]),
        region="us-east-1", interval=INTERVAL, name="host")
    service.startService()
    readiness = service.readiness()
    assert readiness.reason == "aws-unavailable"
    assert readiness.checks["aws"] == "AWS did not answer within 8s"
    assert readiness.checks["master"] == "ok"
    service.stopService()
