"""A task repeated on an injected clock, whose stop waits for the run in progress."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall


class Repeating:
    """
    Runs ``f`` every ``seconds`` on ``clock``, the first time at :meth:`start`.  A run that
    returns a Deferred is waited for before the next is scheduled, and :meth:`stop` fires only
    once it has finished, so a service that stops before the store closes never leaves a write
    half-done.  ``f`` handles its own failures (a failure would end the repetition).
    """

    def __init__(self, f: Callable[[], Any], clock: IReactorTime, seconds: float) -> None:
        self._loop = LoopingCall(f)
        self._loop.clock = clock
        self.seconds = seconds
        self._finished: Deferred[LoopingCall] | None = None

    def start(self) -> None:
        self._finished = self._loop.start(self.seconds, now=True)

    def stop(self) -> Deferred[None] | None:
        finished, self._finished = self._finished, None
        if finished is None:
            return None
        if self._loop.running:
            self._loop.stop()
        return finished.addCallback(lambda _: None)


class RepeatingService(Service):
    """
    A service whose work is one round repeated by :class:`Repeating`: started with the service,
    and stopped only once the round in progress has finished (so the store, stopped after it,
    never closes under a write).  Subclasses set ``_repeating``.
    """

    _repeating: Repeating

    def startService(self) -> None:
        super().startService()
        self._repeating.start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        return self._repeating.stop()
