"""
Where an enrollment's *CPU* goes, by function and by thread kind: yappi with its CPU clock
around a wave, its figures kept only for the daemon's threads (its reactor and its pool), so
that the clients sharing the process are left out.  For the benchmarks only (``pip install
yappi``; not a dependency of puppetha).

Unlike :mod:`bench.phases` (wall time, sampled), this counts the CPU each thread itself used in
each function: a thread waiting for the GIL, a lock or moto counts nothing.  yappi's hooks cost
CPU of their own (each call is timed), so the totals are larger than without it; the order and
the shares are what to read.
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

_TOP = str(Path(__file__).resolve().parents[1]) + "/"


class CPUProfile:
    """yappi (CPU clock) around a ``with`` block; :meth:`report` keeps the threads ``watched()``
    names (ident → kind) when the block ends."""

    def __init__(self, watched: Callable[[], dict[int, str]]) -> None:
        # Imported by name: a tool of the bench, not a dependency (and without type hints).
        self.yappi: Any = importlib.import_module("yappi")
        self.watched = watched
        self.kinds: dict[int, str] = {}

    def __enter__(self) -> CPUProfile:
        self.yappi.set_clock_type("cpu")
        self.yappi.clear_stats()
        self.yappi.start(builtins=True, profile_threads=True)
        return self

    def __exit__(self, *_: object) -> None:
        self.kinds = self.watched()
        self.yappi.stop()

    def save(self, path: str) -> None:
        """The watched threads' figures together, as one pstats file (callers included)."""
        import pstats
        import tempfile

        contexts = sorted(t.id for t in self.yappi.get_thread_stats() if t.tid in self.kinds)
        with tempfile.TemporaryDirectory() as tmp:
            parts = []
            for context in contexts:
                part = f"{tmp}/{context}.pstat"
                self.yappi.get_func_stats(filter={"ctx_id": context}).save(part, type="pstat")
                parts.append(part)
            pstats.Stats(*parts).dump_stats(path)

    def report(self, enrollments: int, top: int = 25) -> str:
        per = max(enrollments, 1)
        contexts: dict[str, list[int]] = defaultdict(list)
        thread_cpu: dict[str, float] = defaultdict(float)
        for thread in self.yappi.get_thread_stats():
            kind = self.kinds.get(thread.tid)
            if kind is not None:
                contexts[kind].append(thread.id)
                thread_cpu[kind] += thread.ttot
        lines = [f"CPU by thread kind (yappi, CPU clock), {enrollments} enrollments:"]
        for kind in sorted(contexts):
            lines.append(f"  {kind}: {1000 * thread_cpu[kind] / per:.2f} ms per enrollment "
                         f"({len(contexts[kind])} threads)")
        for kind in sorted(contexts):
            own: dict[str, float] = defaultdict(float)
            cumulative: dict[str, float] = defaultdict(float)
            calls: dict[str, int] = defaultdict(int)
            for context in contexts[kind]:
                for stat in self.yappi.get_func_stats(filter={"ctx_id": context}):
                    name = _name(stat)
                    own[name] += stat.tsub
                    # Recursive functions count once at their outermost call in yappi's ttot.
                    cumulative[name] += stat.ttot
                    calls[name] += stat.ncall
            for title, figures in (("own", own), ("cumulative", cumulative)):
                lines.append(f"\n{kind} threads, top {top} by {title} CPU "
                             f"(ms per enrollment; calls per enrollment):")
                lines.append(f"| function | {title} CPU, ms | share of the kind | calls |")
                lines.append("|---|---|---|---|")
                total = thread_cpu[kind] or 1.0
                for name, seconds in sorted(figures.items(), key=lambda nf: -nf[1])[:top]:
                    lines.append(f"| {name} | {1000 * seconds / per:.3f} | "
                                 f"{100 * seconds / total:.1f} % | {calls[name] / per:.1f} |")
        return "\n".join(lines)


def _name(stat: Any) -> str:
    module = str(stat.module)
    if module.startswith(_TOP):
        module = module[len(_TOP):]
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in module:
            module = module.split(marker, 1)[1]
            break
    return f"{module}:{stat.lineno} {stat.name}"
