"""
The daemon's heap and Python's cyclic garbage collector.

At start the daemon holds about 130,000 objects for its whole life: botocore's EC2 model and
client, Twisted, the CA's certificates, the configuration.  Each full pass of the collector
walks all of them, and stops every thread while it does: 60 to 80 ms on the machines of
docs/performance.md, a pause for every enrollment, ENC answer and heartbeat in flight.  Once
the daemon has started, :class:`SettledHeap` collects once and moves what is then alive out of
the collector's passes (``gc.freeze``), so that a full pass walks only what the daemon made
since.  Objects frozen are still freed when their last reference goes; only a cycle among them
that becomes garbage later is kept, once, for the daemon's life.

It also times the collector's passes, for ``GET /metrics``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from puppetha.latency import Latencies

log = Logger()

#: Upper bounds in seconds of a collector's pause: a young pass takes well under a millisecond,
#: a full pass over an unsettled heap tens of milliseconds.
PAUSE_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class SettledHeap(Service):
    """
    Started last: once the reactor has run the other services' start, collects and freezes the
    heap, then watches the collector's pauses.  Stopping unfreezes, so that a process that
    goes on (a test) gets its ordinary collector back.
    """

    def __init__(
        self, clock: IReactorTime, monotonic: Callable[[], float] = time.perf_counter
    ) -> None:
        self.clock = clock
        self.monotonic = monotonic
        #: The collector's pauses since the start, every generation.
        self.pauses = Latencies(PAUSE_BOUNDS)
        #: How many objects the settling moved out of the collector's passes (0 before).
        self.settled = 0
        self._call: IDelayedCall | None = None
        self._began: float | None = None

    def startService(self) -> None:
        super().startService()
        gc.callbacks.append(self._timed)
        # At the end of the reactor's first turn: the services started before this one have
        # made what they keep (listeners, clients, caches of the CA).
        self._call = self.clock.callLater(0, self.settle)

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._timed in gc.callbacks:
            gc.callbacks.remove(self._timed)
        if self.settled:
            gc.unfreeze()
            self.settled = 0

    def settle(self) -> None:
        self._call = None
        began = self.monotonic()
        found = gc.collect()
        gc.freeze()
        self.settled = gc.get_freeze_count()
        log.info("heap settled: {objects} objects out of the collector's passes "
                 "({garbage} garbage collected first, in {ms:.0f} ms)",
                 objects=self.settled, garbage=found, ms=1000 * (self.monotonic() - began))

    def _timed(self, phase: str, info: dict[str, int]) -> None:
        # The collector runs one pass at a time, each start and stop on one thread: no lock.
        if phase == "start":
            self._began = self.monotonic()
        elif self._began is not None:
            self.pauses.observe(self.monotonic() - self._began)
            self._began = None

    def frozen(self) -> int:
        """The settled objects still alive (they are freed as ever when unreferenced)."""
        return gc.get_freeze_count() if self.settled else 0

    def collections(self) -> list[int]:
        """The collector's passes since the process started, by generation (2: a full pass)."""
        return [stats["collections"] for stats in gc.get_stats()]
