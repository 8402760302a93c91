"""
Deadlines on blocking calls (:class:`puppetha.threads.Blocking`) and outages logged once
(:class:`puppetha.threads.Episodes`), on a real thread pool with the time on a Clock.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from puppetha.store import StoreUnavailable
from puppetha.threads import Blocking, Episodes


class ThreadedClock(Clock):
    """A Clock whose calls from threads wait in a queue until the test runs them."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.from_threads.put((f, args))

    def run_one(self) -> None:
        f, args = self.from_threads.get(timeout=10)
        f(*args)


@pytest.fixture
def clock() -> ThreadedClock:
    return ThreadedClock()


@pytest.fixture
def pool() -> Iterator[ThreadPool]:
    p = ThreadPool(minthreads=1, maxthreads=1, name="test")
    p.start()
    yield p
    p.stop()


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def results(d: Any) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


class Held:
    """A blocking call that runs until the test lets it go."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.gate = threading.Event()

    def __call__(self) -> bool:
        self.started.set()
        return self.gate.wait(10)

    def running(self) -> None:
        assert self.started.wait(10)


def unavailable(seconds: float) -> Exception:
    return StoreUnavailable(f"no answer within {seconds:g}s")


def test_a_call_still_queued_at_its_deadline_never_runs(clock: ThreadedClock, pool: ThreadPool) -> None:
    blocking = Blocking(clock, pool, None, deadline=5.0, timed_out=unavailable)  # type: ignore[arg-type]
    held = Held()
    ran: list[int] = []
    first = results(blocking.call(held))
    second = results(blocking.call(ran.append, 1))
    held.running()
    clock.advance(5)
    # The first call is running: its own timeout bounds it, and it is waited for.
    assert first == []
    assert len(second) == 1
    assert isinstance(second[0], Failure)
    assert second[0].check(StoreUnavailable)
    held.gate.set()
    clock.run_one()
    assert first == [True]
    clock.run_one()  # the second call's turn: it is skipped, not run late
    assert ran == []
    assert len(second) == 1


def test_an_abandoned_call_fails_at_its_deadline_and_its_late_answer_ends_the_episode(
    clock: ThreadedClock, pool: ThreadPool, logged: list[LogEvent]
) -> None:
    episodes = Episodes("AWS", clock)
    blocking = Blocking(clock, pool, None, deadline=2.0, abandon=True,  # type: ignore[arg-type]
                        timed_out=unavailable, episodes=episodes)
    held = Held()
    answer = results(blocking.call(held))
    held.running()
    clock.advance(2)
    assert len(answer) == 1
    assert answer[0].check(StoreUnavailable)
    assert episodes.failing
    held.gate.set()
    clock.run_one()
    assert not episodes.failing
    assert len(answer) == 1


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    clock: ThreadedClock, pool: ThreadPool, logged: list[LogEvent]
) -> None:
    episodes = Episodes("store", clock)
    blocking = Blocking(clock, pool, None, unavailable=(StoreUnavailable,),  # type: ignore[arg-type]
                        episodes=episodes)

    def down() -> None:
        raise StoreUnavailable("database is locked")

    for _ in range(5):
        failed = results(blocking.call(down))
        clock.run_one()
        assert failed[0].check(StoreUnavailable)
    clock.advance(7)
    for _ in range(3):
        results(blocking.call(lambda: None))
        clock.run_one()
    messages = [e["log_format"] for e in logged if e.get("dependency") == "store"]
    assert messages == ["{dependency} unavailable: {reason}",
                        "{dependency} answers again after {seconds:.1f}s and {failures} failed calls"]
    recovered = [e for e in logged if e.get("dependency") == "store"][1]
    assert (recovered["seconds"], recovered["failures"]) == (7.0, 5)


def test_other_failures_are_answers(clock: ThreadedClock, pool: ThreadPool) -> None:
    episodes = Episodes("store", clock)
    episodes.failed("down")
    blocking = Blocking(clock, pool, None, unavailable=(StoreUnavailable,),  # type: ignore[arg-type]
                        episodes=episodes)

    def refused() -> None:
        raise KeyError("no such thing")  # the store answered: the item is not there

    failed = results(blocking.call(refused))
    clock.run_one()
    assert failed[0].check(KeyError)
    assert not episodes.failing


def test_must_run_ignores_the_deadline(clock: ThreadedClock, pool: ThreadPool) -> None:
    blocking = Blocking(clock, pool, None, deadline=1.0, timed_out=unavailable)  # type: ignore[arg-type]
    held = Held()
    ran: list[int] = []
    results(blocking.call(held))
    undone = results(blocking.must_run(ran.append, 1))
    held.running()
    clock.advance(5)
    held.gate.set()
    clock.run_one()
    clock.run_one()
    assert ran == [1]
    assert undone == [None]


def test_answers_between_failures_do_not_end_an_outage(clock: ThreadedClock,
                                                       logged: list[LogEvent]) -> None:
    episodes = Episodes("store", clock, quiet=5.0)
    for _ in range(3):  # reads answer while writes keep failing
        episodes.failed("database is locked")
        clock.advance(1)
        episodes.answered()
    assert episodes.failing
    clock.advance(5)
    episodes.answered()
    assert not episodes.failing
    assert [e["log_format"].split(":")[0] for e in logged if e.get("dependency") == "store"] == [
        "{dependency} unavailable", "{dependency} answers again after {seconds"]
