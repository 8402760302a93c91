"""
An enrollment's critical path, step by step: the recorder ``bench/enroll.py --timeline`` gives
the daemon (:class:`puppetha.enroll.service.EnrollmentTimeline`), and the table of its segments.

The daemon stamps each step's moments under the request's source address (the bench gives every
agent its own): the request parsed, each hop to the pool sent, started on a thread, ended and back
on the reactor, DescribeInstances asked, sent, started and answered, each store write begun and
committed, the answer written.  The bench's client stamps its own start (before the TCP connect)
and end (the answer read).  All stamps come from one monotonic clock (``time.perf_counter``): the
clients and the daemon share the process.

A segment is the time between two consecutive stamps of one enrollment, named by both: "CSR
check: sent to the pool → CSR check: started on a thread" is the wait for a pool thread, "…:
ended → …: back on the reactor" the wait for the reactor, "describe: asked → describe: call sent
to the pool" the wait for the DescribeInstances call in flight, "record: write begins → record:
write committed" the wait for the commit in progress and then this write's own.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

#: What the bench's clients stamp around each enrollment.
CLIENT_START = "client: connect"
CLIENT_END = "client: answer read"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


class Timeline:
    """Stamps by source, from any thread (a list's append is atomic under the GIL)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.stamps: list[tuple[str | None, float, str]] = []

    def stamp(self, source: str | None, event: str) -> None:
        self.stamps.append((source, self.clock(), event))

    def enrollments(self, sources: Iterable[str]) -> dict[str, list[tuple[float, str]]]:
        """Each of ``sources``' stamps in time order; only those that reached the client's end."""
        wanted = set(sources)
        found: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for source, at, event in list(self.stamps):
            if source in wanted:
                found[source].append((at, event))
        return {
            source: sorted(stamps) for source, stamps in found.items()
            if any(event == CLIENT_END for _, event in stamps)
        }

    def segments(self, sources: Iterable[str]) -> dict[tuple[str, str], list[float]]:
        """The seconds of each segment (two consecutive stamps) over the enrollments."""
        found: dict[tuple[str, str], list[float]] = defaultdict(list)
        for stamps in self.enrollments(sources).values():
            for (at, event), (then, following) in itertools.pairwise(stamps):
                found[(event, following)].append(then - at)
        return found

    def report(self, sources: Iterable[str]) -> str:
        """A markdown table: each segment's p50, p99, mean (ms) and share of the mean enrollment."""
        chosen = list(sources)
        enrollments = self.enrollments(chosen)
        if not enrollments:
            return "no enrollment was stamped"
        segments = self.segments(chosen)
        # Segments in the order they come in the typical enrollment: by their mean start offset.
        offsets: dict[tuple[str, str], list[float]] = defaultdict(list)
        for stamps in enrollments.values():
            start = stamps[0][0]
            for (at, event), (_, following) in itertools.pairwise(stamps):
                offsets[(event, following)].append(at - start)
        totals = [stamps[-1][0] - stamps[0][0] for stamps in enrollments.values()]
        mean_total = sum(totals) / len(totals)
        lines = [
            f"{len(enrollments)} enrollments; client connect to answer read: "
            f"p50 {1000 * percentile(totals, 0.5):.1f} ms, p99 {1000 * percentile(totals, 0.99):.1f} ms, "
            f"mean {1000 * mean_total:.1f} ms",
            "",
            "| segment | n | p50 ms | p99 ms | mean ms | share of the mean |",
            "|---|---|---|---|---|---|",
        ]
        order = sorted(segments, key=lambda k: sum(offsets[k]) / len(offsets[k]))
        for key in order:
            values = segments[key]
            # Summed over every enrollment, as a share of the summed totals: rare segments weigh less.
            share = sum(values) / (mean_total * len(enrollments)) if mean_total else 0.0
            lines.append(
                f"| {key[0]} → {key[1]} | {len(values)} | {1000 * percentile(values, 0.5):.2f} | "
                f"{1000 * percentile(values, 0.99):.2f} | {1000 * sum(values) / len(values):.2f} | "
                f"{100 * share:.1f} % |"
            )
        return "\n".join(lines)
