"""
The bridge from the reactor to blocking code: a bounded thread pool and an adapter that turns
each method of a synchronous object into one that returns a Deferred.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


def make_pool(name: str, size: int) -> ThreadPool:
    """A pool of at most ``size`` threads; start it and stop it with the service that owns it."""
    return ThreadPool(minthreads=0, maxthreads=size, name=name)


class Blocking(Generic[T]):
    """
    Runs the methods of a blocking object on a bounded pool.

    ``Blocking(reactor, pool, store).call(store.get, "node", name)`` -- explicit at the call
    site, so a reader sees which calls leave the reactor thread.
    """

    def __init__(self, reactor: IReactorFromThreads, pool: ThreadPool, target: T) -> None:
        self.reactor = reactor
        self.pool = pool
        self.target = target

    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, f, *args, **kwargs)
