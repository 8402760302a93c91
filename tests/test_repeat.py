"""Repeating: runs on the injected clock, and stopping waits for the run in progress."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from puppetha.repeat import Repeating


def test_runs_at_start_then_every_period() -> None:
    clock = Clock()
    runs: list[float] = []
    repeating = Repeating(lambda: runs.append(clock.seconds()), clock, 5)
    repeating.start()
    clock.advance(4)
    assert runs == [0]
    clock.advance(1)
    clock.advance(5)
    assert runs == [0, 5, 10]
    done: list[object] = []
    stopped = repeating.stop()
    assert stopped is not None
    stopped.addCallback(done.append)
    assert done == [None]
    clock.advance(60)
    assert runs == [0, 5, 10]


def test_stopping_waits_for_the_run_in_progress_and_no_next_run_starts() -> None:
    clock = Clock()
    pending: list[Deferred[None]] = []

    def run() -> Deferred[None]:
        d: Deferred[None] = Deferred()
        pending.append(d)
        return d

    repeating = Repeating(run, clock, 5)
    repeating.start()
    done: list[object] = []
    stopped = repeating.stop()
    assert stopped is not None
    stopped.addCallback(done.append)
    assert done == []
    pending[0].callback(None)
    assert done == [None]
    clock.advance(60)
    assert len(pending) == 1


def test_stop_before_start_is_nothing_to_wait_for() -> None:
    assert Repeating(lambda: None, Clock(), 5).stop() is None
