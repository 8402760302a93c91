"""
The DescribeInstances batcher's rule, on a ``task.Clock``: one call in flight per region, the
lookups that arrive meanwhile form the next call, and a lone lookup waits for nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from puppetha.aws.cloud import CloudError, ICloud, InstanceInfo
from puppetha.enroll.service import DescribeBatcher
from puppetha.threads import Blocking


class HeldCalls:
    """Stands in for ``Blocking[ICloud]``: each call waits until the test answers it."""

    def __init__(self) -> None:
        self.target = self
        self.asked: list[tuple[str, list[str], Deferred[dict[str, Any]]]] = []

    def describe_instances(self, region: str, instance_ids: Sequence[str]) -> dict[str, Any]:
        raise AssertionError("only called through call()")

    def call(self, f: Any, region: str, instance_ids: list[str]) -> Deferred[dict[str, Any]]:
        assert f == self.describe_instances
        d: Deferred[dict[str, Any]] = Deferred()
        self.asked.append((region, instance_ids, d))
        return d

    def in_flight(self) -> list[tuple[str, list[str]]]:
        return [(region, ids) for region, ids, d in self.asked if not d.called]

    def answer(self, index: int) -> None:
        _, ids, d = self.asked[index]
        d.callback({i: cast(InstanceInfo, f"info of {i}") for i in ids if not i.startswith("i-gone")})


def batcher(max_batch: int = 100, max_in_flight: int = 1) -> tuple[DescribeBatcher, HeldCalls, Clock]:
    cloud, clock = HeldCalls(), Clock()
    made = DescribeBatcher(
        cast(Blocking[ICloud], cloud), clock, max_batch=max_batch, max_in_flight=max_in_flight
    )
    return made, cloud, clock


# Each step: ("ask", region, id) or ("turn",) (the reactor's turn ends) or ("answer", n) (the
# n-th call made so far answers); then the calls in flight, as (region, ids).
CASES: dict[str, tuple[list[tuple[Any, ...]], list[list[tuple[str, list[str]]]]]] = {
    "a lone lookup goes out at the end of the turn": (
        [("ask", "r1", "i-1"), ("turn",)],
        [[], [("r1", ["i-1"])]],
    ),
    "lookups of one turn go out together": (
        [("ask", "r1", "i-2"), ("ask", "r1", "i-1"), ("turn",)],
        [[], [], [("r1", ["i-1", "i-2"])]],
    ),
    "lookups arriving during a call wait for it, then go out as one": (
        [("ask", "r1", "i-1"), ("turn",), ("ask", "r1", "i-2"), ("turn",), ("ask", "r1", "i-3"),
         ("answer", 0)],
        [[], [("r1", ["i-1"])], [("r1", ["i-1"])], [("r1", ["i-1"])], [("r1", ["i-1"])],
         [("r1", ["i-2", "i-3"])]],
    ),
    "regions do not wait for each other": (
        [("ask", "r1", "i-1"), ("turn",), ("ask", "r2", "i-2"), ("turn",)],
        [[], [("r1", ["i-1"])], [("r1", ["i-1"])], [("r1", ["i-1"]), ("r2", ["i-2"])]],
    ),
    "the same id twice is asked about once": (
        [("ask", "r1", "i-1"), ("ask", "r1", "i-1"), ("turn",)],
        [[], [], [("r1", ["i-1"])]],
    ),
    "an id asked about again during its call is asked about again after it": (
        [("ask", "r1", "i-1"), ("turn",), ("ask", "r1", "i-1"), ("answer", 0)],
        [[], [("r1", ["i-1"])], [("r1", ["i-1"])], [("r1", ["i-1"])]],
    ),
    "nothing waiting: no call after an answer": (
        [("ask", "r1", "i-1"), ("turn",), ("answer", 0), ("turn",)],
        [[], [("r1", ["i-1"])], [], []],
    ),
}


# The same steps with two calls allowed in flight per region.
TWO_IN_FLIGHT: dict[str, tuple[list[tuple[Any, ...]], list[list[tuple[str, list[str]]]]]] = {
    "lookups of one turn still go out together": (
        [("ask", "r1", "i-2"), ("ask", "r1", "i-1"), ("turn",)],
        [[], [], [("r1", ["i-1", "i-2"])]],
    ),
    "a lookup during a call goes out at the end of its turn": (
        [("ask", "r1", "i-1"), ("turn",), ("ask", "r1", "i-2"), ("turn",)],
        [[], [("r1", ["i-1"])], [("r1", ["i-1"])], [("r1", ["i-1"]), ("r1", ["i-2"])]],
    ),
    "with both calls in flight, the next lookups wait for the first answer, together": (
        [("ask", "r1", "i-1"), ("turn",), ("ask", "r1", "i-2"), ("turn",), ("ask", "r1", "i-3"),
         ("turn",), ("ask", "r1", "i-4"), ("answer", 1)],
        [[], [("r1", ["i-1"])], [("r1", ["i-1"])], [("r1", ["i-1"]), ("r1", ["i-2"])],
         [("r1", ["i-1"]), ("r1", ["i-2"])], [("r1", ["i-1"]), ("r1", ["i-2"])],
         [("r1", ["i-1"]), ("r1", ["i-2"])], [("r1", ["i-1"]), ("r1", ["i-3", "i-4"])]],
    ),
    "nothing waiting: the region is free again after both answers": (
        [("ask", "r1", "i-1"), ("turn",), ("ask", "r1", "i-2"), ("turn",), ("answer", 0), ("answer", 1),
         ("turn",), ("ask", "r1", "i-3"), ("turn",)],
        [[], [("r1", ["i-1"])], [("r1", ["i-1"])], [("r1", ["i-1"]), ("r1", ["i-2"])], [("r1", ["i-2"])],
         [], [], [], [("r1", ["i-3"])]],
    ),
}


@pytest.mark.parametrize(
    ("steps", "expected", "in_flight"),
    [(*case, 1) for case in CASES.values()] + [(*case, 2) for case in TWO_IN_FLIGHT.values()],
    ids=list(CASES) + [f"two in flight: {name}" for name in TWO_IN_FLIGHT],
)
def test_batching(
    steps: list[tuple[Any, ...]], expected: list[list[tuple[str, list[str]]]], in_flight: int
) -> None:
    b, cloud, clock = batcher(max_in_flight=in_flight)
    seen = []
    for step in steps:
        if step[0] == "ask":
            b.describe(step[1], step[2])
        elif step[0] == "turn":
            clock.advance(0)
        else:
            cloud.answer(step[1])
        seen.append(cloud.in_flight())
    assert seen == expected
    assert b.calls == len(cloud.asked)


def test_each_waiter_gets_its_own_instance_and_unknown_ids_get_none() -> None:
    b, cloud, clock = batcher()
    first, again, gone = b.describe("r1", "i-1"), b.describe("r1", "i-1"), b.describe("r1", "i-gone")
    clock.advance(0)
    got: list[Any] = []
    for d in (first, again, gone):
        d.addCallback(got.append)
    assert got == []
    cloud.answer(0)
    assert got == ["info of i-1", "info of i-1", None]


def test_a_full_batch_leaves_the_rest_for_the_next_call() -> None:
    b, cloud, clock = batcher(max_batch=2)
    for i in ("i-1", "i-2", "i-3"):
        b.describe("r1", i)
    clock.advance(0)
    assert cloud.in_flight() == [("r1", ["i-1", "i-2"])]
    cloud.answer(0)
    assert cloud.in_flight() == [("r1", ["i-3"])]


def test_a_failed_call_fails_its_waiters_only_and_the_next_batch_still_goes() -> None:
    b, cloud, clock = batcher()
    first = b.describe("r1", "i-1")
    clock.advance(0)
    later = b.describe("r1", "i-2")
    failures: list[Failure] = []
    first.addErrback(failures.append)
    cloud.asked[0][2].errback(CloudError("throttled"))
    assert [f.check(CloudError) for f in failures] == [CloudError]
    assert cloud.in_flight() == [("r1", ["i-2"])]
    got: list[Any] = []
    later.addCallback(got.append)
    cloud.answer(1)
    assert got == ["info of i-2"]


def test_a_call_that_cannot_start_fails_its_waiters_and_frees_the_region() -> None:
    class Refusing(HeldCalls):
        def call(self, f: Any, region: str, instance_ids: list[str]) -> Deferred[dict[str, Any]]:
            raise RuntimeError("the pool is stopped")

    cloud, clock = Refusing(), Clock()
    b = DescribeBatcher(cast(Blocking[ICloud], cloud), clock)
    failures: list[Failure] = []
    b.describe("r1", "i-1").addErrback(failures.append)
    clock.advance(0)
    assert [f.check(RuntimeError) for f in failures] == [RuntimeError]
    b.describe("r1", "i-2").addErrback(failures.append)
    clock.advance(0)
    assert len(failures) == 2
    assert b.calls == 2


@pytest.mark.parametrize(("content", "in_flight"), [("", 1), ("[enroll]\ndescribe_in_flight = 3\n", 3)])
def test_the_daemon_keeps_enroll_describe_in_flight_calls_per_region(content: str, in_flight: int) -> None:
    from puppetha.config import config_from_string
    from puppetha.tap import make_enrollment

    def unused(*args: Any) -> Any:
        raise AssertionError("nothing is called while the service is made")

    blocking = cast(Any, HeldCalls())
    enrollment = make_enrollment(config_from_string(content), Clock(), signing=blocking,
                                 store_calls=blocking, aws=blocking, on_master=unused)
    assert enrollment.batcher.max_in_flight == in_flight
    b = enrollment.batcher
    for i in range(in_flight + 1):
        b.describe("us-east-1", f"i-{i}")
        b.clock.advance(0)  # type: ignore[attr-defined]
    # One call per instance while calls are free, the last waits for the next call.
    assert len(blocking.in_flight()) == in_flight
