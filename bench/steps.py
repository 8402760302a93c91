"""
The CPU of each step an enrollment runs on the daemon's pool (identity, DescribeInstances, CSR,
claim, issue), timed by the thread that runs it (``time.thread_time`` around the call).  Unlike
:mod:`bench.cpuprofile`, it hooks nothing inside a step, so the figures are what the steps cost
in the wave; unlike the pool's total, it says which step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from puppetha.threads import Blocking


class StepCPU:
    """CPU seconds and calls by step name, from every thread of the pool."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.steps: dict[str, tuple[int, float]] = {}

    def clear(self) -> None:
        with self._lock:
            self.steps = {}

    def timed(self, f: Callable[..., Any]) -> Callable[..., Any]:
        name = getattr(f, "__name__", repr(f))

        def step(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return f(*args, **kwargs)
            finally:
                used = time.thread_time() - start
                with self._lock:
                    calls, total = self.steps.get(name, (0, 0.0))
                    self.steps[name] = (calls + 1, total + used)

        return step

    def report(self, enrollments: int) -> str:
        lines = [f"  {'step':<22} {'calls':>6} {'ms per call':>12} {'ms per enrollment':>18}"]
        for name, (calls, total) in sorted(self.steps.items(), key=lambda s: -s[1][1]):
            lines.append(f"  {name:<22} {calls:>6} {1000 * total / calls:>12.3f} "
                         f"{1000 * total / max(enrollments, 1):>18.3f}")
        total = sum(t for _, t in self.steps.values())
        lines.append(f"  {'all steps':<22} {'':>6} {'':>12} {1000 * total / max(enrollments, 1):>18.3f}")
        return "\n".join(lines)


class TimedBlocking(Blocking[Any]):
    """:class:`Blocking` whose calls are timed into ``steps``."""

    def __init__(self, steps: StepCPU, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps = steps

    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        return super().call(self.steps.timed(f), *args, **kwargs)
