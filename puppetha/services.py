"""
How the daemon's services start and stop as a whole.

:class:`OrderedServices` stops its children one at a time, last started first, so that a
service still finishing a round has the thread pools and the store it needs until it is done;
every wait is bounded, so that one stalled call never keeps the daemon from stopping.
:class:`BlockingStop` runs a stop that blocks (joining a thread pool, closing a store) off the
reactor thread, bounded the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: Seconds the whole stop may take: inside the unit's TimeoutStopSec (etc/puppetha.service).
STOP_BUDGET = 15.0


def bounded(d: Deferred[Any], clock: IReactorTime, seconds: float) -> Deferred[bool]:
    """
    Fires with True when ``d`` fires within ``seconds``, else with False at the deadline.
    ``d`` is left alone (never cancelled): what it waits for may still finish on its own.
    """
    result: Deferred[bool] = Deferred()

    def done(outcome: object) -> object:
        if not result.called:
            timer.cancel()
            result.callback(True)
        return None if isinstance(outcome, Failure) else outcome

    def late() -> None:
        if not result.called:
            result.callback(False)

    timer = clock.callLater(max(seconds, 0.0), late)
    d.addBoth(done)
    return result


class OrderedServices(MultiService):
    """
    Starts its children in the order they were added and stops them in the reverse order, each
    after the one before it has finished stopping.  The whole stop takes at most ``budget``
    seconds: a child that has not stopped in the time left is named in the log and the next one
    is stopped anyway.
    """

    def __init__(self, clock: IReactorTime, budget: float = STOP_BUDGET) -> None:
        super().__init__()
        self.clock = clock
        self.budget = budget

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order(list(self)[::-1]))

    async def _stop_in_order(self, services: list[IService]) -> None:
        deadline = self.clock.seconds() + self.budget
        for service in services:
            if not service.running:
                continue
            stopping = maybeDeferred(service.stopService)
            stopping.addErrback(_log_failed_stop, _name(service))
            left = deadline - self.clock.seconds()
            if not await bounded(stopping, self.clock, left):
                log.warn("{service} did not stop within {seconds:.0f}s; stopping the rest",
                         service=_name(service), seconds=self.budget)


class BlockingStop(Service):
    """
    Runs ``stop`` (a call that may block: joining a pool's threads, closing a store) in a
    thread of its own when the service stops; the stop fires when it returns, or after
    ``seconds``, whichever comes first.
    """

    def __init__(self, name: str, stop: Callable[[], object], reactor: IReactorFromThreads,
                 seconds: float) -> None:
        self.setName(name)
        self._stop = stop
        self._reactor = reactor
        self._seconds = seconds

    def stopService(self) -> Deferred[None]:
        super().stopService()
        finished: Deferred[None] = Deferred()

        def run() -> None:
            try:
                self._stop()
            except Exception:
                failure = Failure()
                self._reactor.callFromThread(finished.errback, failure)
            else:
                self._reactor.callFromThread(finished.callback, None)

        # A daemon thread: when the call never returns, the process may still exit.
        threading.Thread(target=run, name=f"stop-{self.name}", daemon=True).start()
        finished.addErrback(lambda f: log.failure("stopping {service} failed", f, service=self.name))
        clock: IReactorTime = self._reactor  # type: ignore[assignment]
        waited = bounded(finished, clock, self._seconds)

        def said(in_time: bool) -> None:
            if not in_time:
                log.warn("{service} did not stop within {seconds:.0f}s: a call is still running",
                         service=self.name, seconds=self._seconds)

        return waited.addCallback(said)


class OpenedListener(Service):
    """A listening port opened before the daemon starts (so a failure stops the start); stopping
    the service closes it."""

    def __init__(self, name: str, port: IListeningPort) -> None:
        self.setName(name)
        self.port = port

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        return self.port.stopListening()


def _log_failed_stop(failure: Failure, name: str) -> None:
    log.failure("stopping {service} failed", failure, service=name)


def _name(service: IService) -> str:
    return service.name or type(service).__name__
