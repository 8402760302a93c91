"""
How the daemon's services start and stop as a whole.

:class:`OrderedServices` stops its children one at a time, last started first, so that a
service still finishing a round has the thread pools and the store it needs until it is done;
every wait is bounded, so that one stalled call never keeps the daemon from stopping.
:class:`BlockingStop` runs a stop that blocks (joining a thread pool, closing a store) off the
reactor thread, bounded the same way.
"""

from __future__ import annotations

import contextlib
import resource
import threading
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IReactorFromThreads,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

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


# -- descriptors --------------------------------------------------------------------------------

#: Descriptors kept for everything but client connections: the store, logs, AWS and KMS
#: sockets of the thread pools, nginx's pipes, TLS files.
RESERVED_DESCRIPTORS = 128
#: The ENC's connection limit (ENCFactory) and a margin for the connections it answers busy.
ENC_DESCRIPTORS = 512 + 64
#: Most descriptors asked for when the hard limit is unlimited.
MOST_DESCRIPTORS = 65536


class TooFewDescriptors(Exception):
    """RLIMIT_NOFILE leaves too little room for the listeners: one line."""


def descriptor_budget(enc: bool, limits: tuple[int, int] | None = None) -> int:
    """
    Raise this process's soft RLIMIT_NOFILE to its hard limit, and return how many connections
    the enrollment listener may hold so that, whatever a flood on it does, the ENC (when
    ``enc``) and the daemon's own files still have descriptors.  ``limits`` (soft, hard) is for
    tests; without it the process's own limits are read and raised.
    """
    if limits is None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = MOST_DESCRIPTORS if hard == resource.RLIM_INFINITY else hard
        if soft != resource.RLIM_INFINITY and soft < wanted:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    else:
        soft, hard = limits
    limit = MOST_DESCRIPTORS if soft == resource.RLIM_INFINITY else soft
    available = limit - RESERVED_DESCRIPTORS - (ENC_DESCRIPTORS if enc else 0)
    if available < 16:
        need = RESERVED_DESCRIPTORS + (ENC_DESCRIPTORS if enc else 0) + 16
        raise TooFewDescriptors(f"the open-file limit is {limit}: the listeners need at least {need} "
                                "(raise LimitNOFILE, or ulimit -n)")
    return available


class ConnectionCapFactory(WrappingFactory):
    """
    Holds at most ``cap`` connections at once; past it a new connection is closed at once,
    before any protocol runs (and a warning logged, rate-limited by ``warn``).
    """

    noisy = False

    def __init__(self, wrappedFactory: IProtocolFactory, cap: int,
                 warn: Callable[..., None]) -> None:
        super().__init__(wrappedFactory)
        self.cap = cap
        self._warn = warn

    def buildProtocol(self, addr: IAddress | None) -> ProtocolWrapper:
        # None closes the connection at once (Twisted's factories may refuse this way).
        if len(self.protocols) >= self.cap:
            self._warn("refused a connection from {peer}: {cap} connections already open",
                       peer=str(addr), cap=self.cap)
            return None  # type: ignore[return-value]
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None  # type: ignore[return-value]
        return self.protocol(self, inner)


@implementer(IStreamServerEndpoint)
class ConnectionCapEndpoint:
    """``wrapped``, with at most ``cap`` connections open at once."""

    def __init__(self, wrapped: IStreamServerEndpoint, cap: int, warn: Callable[..., None]) -> None:
        self.wrapped = wrapped
        self.cap = cap
        self.warn = warn

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.wrapped.listen(ConnectionCapFactory(protocolFactory, self.cap, self.warn))
