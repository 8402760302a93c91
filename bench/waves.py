"""
A wave of clients against server processes, shared by the enrollment benchmarks: each job is
one agent and returns its latency; the wave runs them ``concurrency`` at a time, in threads of
this process or spread over several client processes, and counts the CPU of the servers (from
``/proc``) and of the clients themselves, so that a reader sees which side was the limit.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from puppetha.testing.moto import MotoServer

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: One agent: does its work and returns its latency in seconds (raises when it failed).  A wave
#: over several client processes needs jobs that pickle (``functools.partial`` of a function).
Job = Callable[[], float]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of ``pid`` and its reaped children, from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command: state is field 3, utime 14, stime 15, cutime 16, cstime 17.
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLOCK_TICKS


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def own_cpu_seconds() -> float:
    """CPU of this process, every thread of it."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Figures:
    """One setup's results over all its waves."""

    name: str
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    #: Server CPU (the processes named to :func:`wave`), seconds.
    cpu: float = 0.0
    #: The clients' own CPU, seconds.
    client_cpu: float = 0.0
    #: AWS's CPU (moto's process, when it is named to :func:`wave`), seconds.
    aws_cpu: float = 0.0
    done: int = 0
    failures: list[str] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    peak_rss: float = 0.0

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed else 0.0

    @property
    def cpu_per_cert_ms(self) -> float:
        return 1000 * self.cpu / self.done if self.done else 0.0

    @property
    def client_cpu_per_cert_ms(self) -> float:
        return 1000 * self.client_cpu / self.done if self.done else 0.0

    @property
    def aws_cpu_per_cert_ms(self) -> float:
        return 1000 * self.aws_cpu / self.done if self.done else 0.0

    def cores(self, cpu: float) -> float:
        """``cpu`` seconds as the number of cores kept busy during the waves."""
        return cpu / self.elapsed if self.elapsed else 0.0

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return 0.0
        return 1000 * ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def _run(jobs: Sequence[Job], concurrency: int) -> tuple[list[float], list[str], float]:
    """Runs ``jobs`` in ``concurrency`` threads; their latencies, failures, and this process's CPU."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def one(job: Job) -> None:
        try:
            took = job()
        except Exception as e:  # one line per failed agent; the wave goes on
            with lock:
                failures.append(str(e)[:200])
            return
        with lock:
            latencies.append(took)

    cpu = own_cpu_seconds()
    with ThreadPoolExecutor(max_workers=concurrency) as clients:
        list(clients.map(one, jobs))
    return latencies, failures, own_cpu_seconds() - cpu


def _started(_: int) -> int:
    return os.getpid()


class Clients:
    """
    Where a wave's clients run: threads of this process (``processes = 1``), or as many forked
    processes each with its share of the threads, started before any wave so that no start-up
    is timed.  Several processes let the clients use more than one core (one Python process
    is one core at most, for its GIL), and show whether one process was the limit.
    """

    def __init__(self, processes: int = 1) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        if processes > 1:
            self._pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"))
            # Every worker forked now, not during the first wave.
            list(self._pool.map(_started, range(processes)))

    def run(self, jobs: Sequence[Job], concurrency: int) -> tuple[list[float], list[str], float]:
        if self._pool is None:
            return _run(jobs, concurrency)
        shares = [list(jobs[i :: self.processes]) for i in range(self.processes)]
        threads = max(1, concurrency // self.processes)
        latencies: list[float] = []
        failures: list[str] = []
        cpu = 0.0
        for done, failed, used in self._pool.map(_run, shares, [threads] * self.processes):
            latencies += done
            failures += failed
            cpu += used
        return latencies, failures, cpu

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def wave(
    figures: Figures,
    pids: Sequence[int],
    jobs: Sequence[Job],
    concurrency: int,
    *,
    clients: Clients | None = None,
    aws_pids: Sequence[int] = (),
) -> None:
    """
    Runs ``jobs`` ``concurrency`` at a time; the CPU of the servers ``pids``, of the clients and
    of AWS (``aws_pids``: moto's process) goes to ``figures``.
    """
    clients = clients or Clients()
    cpu_before = sum(cpu_seconds(p) for p in pids)
    aws_before = sum(cpu_seconds(p) for p in aws_pids)
    start = time.perf_counter()
    latencies, failures, client_cpu = clients.run(jobs, concurrency)
    elapsed = time.perf_counter() - start
    figures.cpu += sum(cpu_seconds(p) for p in pids) - cpu_before
    figures.aws_cpu += sum(cpu_seconds(p) for p in aws_pids) - aws_before
    figures.client_cpu += client_cpu
    figures.elapsed += elapsed
    figures.done += len(latencies)
    figures.latencies += latencies
    figures.failures += failures
    figures.rates.append(len(latencies) / elapsed)


def settle_rig(moto: MotoServer) -> None:
    """
    What moto and this process hold once a benchmark's fleet is launched and its requests are
    made is left out of their collectors' passes, as the daemon settles its own heap
    (puppetha/heap.py): a full pass paused moto for 100 to 180 ms and this process's clients
    for 120 ms, a pause that lands on whichever server is being timed (docs/performance.md).
    """
    moto.settle_heap()
    gc.collect()
    gc.freeze()
