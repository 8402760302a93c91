"""
The bridge from the reactor to blocking code: bounded thread pools, an adapter that turns each
method of a synchronous object into one that returns a Deferred, and the deadline every call to
a dependency (AWS, the store) gets.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

log = Logger()

T = TypeVar("T")


def make_pool(name: str, size: int) -> ThreadPool:
    """A pool of at most ``size`` threads; start it and stop it with the service that owns it."""
    return ThreadPool(minthreads=0, maxthreads=size, name=name)


class Episodes:
    """
    Says once that a dependency stopped answering and once that it answers again, however many
    calls fail in between: an outage is one warning and one recovery in the log, not a line per
    request.

    The outage ends with the first answer at least ``quiet`` seconds after the last failure:
    a dependency can answer some calls and fail others (the store's reads carry on while its
    write lock is held), and an answer in between must not end the outage and start a new one.
    """

    def __init__(self, dependency: str, clock: IReactorTime, quiet: float = 0.0) -> None:
        self.dependency = dependency
        self._clock = clock
        self.quiet = quiet
        self._since: float | None = None
        self._last_failure = 0.0
        self._failures = 0
        self.reason = ""

    @property
    def failing(self) -> bool:
        return self._since is not None

    def failed(self, reason: str) -> None:
        self._failures += 1
        self.reason = reason
        self._last_failure = self._clock.seconds()
        if self._since is None:
            self._since = self._clock.seconds()
            log.warn("{dependency} unavailable: {reason}", dependency=self.dependency, reason=reason)

    def answered(self) -> None:
        if self._since is None or self._clock.seconds() - self._last_failure < self.quiet:
            return
        log.info("{dependency} answers again after {seconds:.1f}s and {failures} failed calls",
                 dependency=self.dependency, seconds=self._clock.seconds() - self._since,
                 failures=self._failures)
        self._since = None
        self._failures = 0
        self.reason = ""


class _Skipped(Exception):
    """A call whose deadline passed before a thread was free to start it: it never ran."""


class Blocking(Generic[T]):
    """
    Runs the methods of a blocking object on a bounded pool.

    ``Blocking(reactor, pool, store).call(store.get, "node", name)`` -- explicit at the call
    site, so a reader sees which calls leave the reactor thread.

    With a ``deadline`` (seconds) each call's Deferred fails with ``timed_out(deadline)`` once
    the deadline passes:

    - a call still queued for a thread then never runs (nothing half-done: safe for writes);
    - a call already running is waited for when ``abandon`` is false (the target's own
      timeouts bound it: SQLite's busy timeout, botocore's connect and read timeouts), or left
      to finish on its own when ``abandon`` is true (reads, whose late answer nobody needs).

    Failures that are an instance of ``unavailable`` (and deadlines) count against ``episodes``,
    and any answer ends the episode.  :meth:`must_run` ignores the deadline, for the calls that
    undo what a failed request did.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        pool: ThreadPool,
        target: T,
        *,
        deadline: float | None = None,
        timed_out: Callable[[float], Exception] | None = None,
        abandon: bool = False,
        unavailable: tuple[type[Exception], ...] = (),
        episodes: Episodes | None = None,
    ) -> None:
        self.reactor = reactor
        self.pool = pool
        self.target = target
        self.deadline = deadline
        self._timed_out = timed_out or (lambda seconds: TimeoutError(f"no answer within {seconds:g}s"))
        self.abandon = abandon
        self.unavailable = unavailable
        self.episodes = episodes

    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        if self.deadline is None:
            return self._observed(deferToThreadPool(self.reactor, self.pool, f, *args, **kwargs))
        return self._with_deadline(self.deadline, f, *args, **kwargs)

    def must_run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Like :meth:`call`, but the call runs however long it waits for a thread."""
        return self._observed(deferToThreadPool(self.reactor, self.pool, f, *args, **kwargs))

    def _observed(self, d: Deferred[Any]) -> Deferred[Any]:
        if self.episodes is None:
            return d

        def seen(result: Any) -> Any:
            self._count(result)
            return result

        return d.addBoth(seen)

    def _count(self, result: Any) -> None:
        if self.episodes is None:
            return
        if isinstance(result, Failure) and result.check(*self.unavailable) is not None:
            self.episodes.failed(result.getErrorMessage())
        else:
            self.episodes.answered()

    def _with_deadline(
        self, deadline: float, f: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Deferred[Any]:
        lock = threading.Lock()
        state = {"started": False, "expired": False}
        answer: Deferred[Any] = Deferred()

        def run() -> Any:
            with lock:
                if state["expired"]:
                    raise _Skipped()
                state["started"] = True
            return f(*args, **kwargs)

        def expire() -> None:
            with lock:
                state["expired"] = True
                started = state["started"]
            if started and not self.abandon:
                return  # bounded by the target's own timeouts; its answer is awaited
            error = self._timed_out(deadline)
            if self.episodes is not None:
                self.episodes.failed(str(error))
            answer.errback(error)

        timer = self.reactor.callLater(deadline, expire)  # type: ignore[attr-defined]

        def landed(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if answer.called:
                if not (isinstance(result, Failure) and result.check(_Skipped)):
                    # An abandoned call came back after all: the dependency answers again.
                    self._count(result)
                return
            self._count(result)
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)

        deferToThreadPool(self.reactor, self.pool, run).addBoth(landed)
        return answer
