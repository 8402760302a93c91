"""
The settled heap (puppetha/heap.py): once the daemon has started, what it holds is moved out of
the cyclic collector's passes, and the passes are timed for GET /metrics.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import cast

import pytest
from prometheus_client.exposition import generate_latest
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher

from puppetha.heap import SettledHeap
from puppetha.metrics.endpoint import _Scraped
from puppetha.metrics.sources import heap_source


class Kept:
    """An object with a cycle, as the daemon's long-lived objects have (tracked by the collector)."""

    def __init__(self) -> None:
        self.me = self


def tracked(obj: object) -> bool:
    """Whether a pass of the collector would walk ``obj`` (frozen objects are in none)."""
    return any(o is obj for o in gc.get_objects())


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    seen: list[LogEvent] = []
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def heap() -> Iterator[SettledHeap]:
    assert gc.get_freeze_count() == 0, "something else froze this process's heap"
    service = SettledHeap(Clock())
    yield service
    if service.running:
        service.stopService()
    assert gc.get_freeze_count() == 0


def test_the_heap_is_settled_at_the_end_of_the_first_turn_and_given_back_at_stop(
    heap: SettledHeap, events: list[LogEvent]
) -> None:
    clock = heap.clock
    assert isinstance(clock, Clock)
    kept = Kept()
    heap.startService()
    # Not during the start: the services started before it may still be making what they keep.
    assert heap.settled == 0
    assert tracked(kept)
    clock.advance(0)
    assert not tracked(kept), "an object held at the settling is still walked by the collector"
    assert heap.settled > 1000
    assert 0 < heap.frozen() == gc.get_freeze_count() <= heap.settled
    settled = [e for e in events if e.get("log_format", "").startswith("heap settled")]
    assert len(settled) == 1
    assert settled[0]["objects"] == heap.settled
    made_after = Kept()
    assert tracked(made_after), "an object made after the settling must still be collected"
    heap.stopService()
    assert heap.settled == heap.frozen() == gc.get_freeze_count() == 0
    assert tracked(kept)


def test_garbage_is_collected_before_the_heap_is_settled(heap: SettledHeap) -> None:
    gone = Kept()
    alive = id(gone)
    del gone  # a cycle: only the collector frees it
    assert any(id(o) == alive for o in gc.get_objects())
    heap.startService()
    heap.clock.advance(0)  # type: ignore[attr-defined]
    assert not any(id(o) == alive for o in gc.get_objects())


def test_a_stop_before_the_first_turn_settles_nothing(heap: SettledHeap) -> None:
    heap.startService()
    heap.stopService()
    heap.clock.advance(1)  # type: ignore[attr-defined]
    assert heap.settled == 0
    assert gc.get_freeze_count() == 0


def test_each_pass_of_the_collector_is_timed_while_running(heap: SettledHeap) -> None:
    ticks = iter(range(0, 1000, 3))
    heap.monotonic = lambda: next(ticks) / 1000  # each pass "takes" 3 ms
    heap.startService()
    before = heap.collections()
    gc.collect(0)
    gc.collect(2)
    assert heap.pauses.count == 2
    assert heap.pauses.sum == pytest.approx(0.006)
    after = heap.collections()
    assert after[0] > before[0]
    assert after[2] > before[2]
    heap.stopService()
    gc.collect(0)
    assert heap.pauses.count == 2, "a stopped heap still times the collector"


def test_the_metrics_families(heap: SettledHeap) -> None:
    heap.startService()
    heap.clock.advance(0)  # type: ignore[attr-defined]
    text = generate_latest(_Scraped(heap_source(heap)())).decode()  # type: ignore[arg-type]
    settled = [line for line in text.splitlines() if line.startswith("puppetha_gc_settled_objects ")]
    assert len(settled) == 1
    assert 1000 < float(settled[0].split()[1]) <= heap.settled
    assert 'puppetha_gc_collections_total{generation="2"}' in text
    # The settling's own full pass is the first pause.
    assert "puppetha_gc_pause_seconds_count 1.0" in text
