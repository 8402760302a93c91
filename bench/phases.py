"""
Where an enrollment's time goes, by phase: a sampler that looks at the daemon's threads
(``sys._current_frames``) every millisecond during a wave and files each sample under the
phase of the innermost frame it recognises.  For the benchmarks only.

What it counts is *wall time of the threads*, not CPU: a pool thread waiting for the GIL, or
for SQLite's lock, counts under the phase it waits in.  The sampler itself needs the GIL to
take a sample, so samples fall where threads let the GIL go; with one thread per enrollment
step, that is still where they spend their time.
"""

from __future__ import annotations

import linecache
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from types import FrameType

#: (file suffix, function or "*", phase), looked up from the innermost frame outwards; the first
#: frame that matches names the phase.
PHASES: Sequence[tuple[str, str, str]] = (
    # pool threads
    ("puppetha/pki/authority.py", "issue", "sign the certificate"),
    ("puppetha/store/sqlite.py", "transact", "store: the recording transaction"),
    ("puppetha/enroll/service.py", "_record_writes", "store: reads before the transaction"),
    ("puppetha/enroll/service.py", "_answer", "answer: CA chain, CRLs, first-run port"),
    ("puppetha/pki/authority.py", "ensure_ca", "answer: CA chain, CRLs, first-run port"),
    ("puppetha/enroll/service.py", "_healthy_master_cas", "healthy masters"),
    ("puppetha/enroll/service.py", "_revoked_node", "healthy masters"),
    ("puppetha/enroll/service.py", "_claim", "claim"),
    ("puppetha/enroll/service.py", "_claim_to_take", "claim"),
    ("puppetha/enroll/service.py", "_after_lost_race", "claim"),
    ("puppetha/enroll/service.py", "_check_csr", "CSR check"),
    ("puppetha/aws/identity.py", "verify_identity", "identity verify"),
    ("puppetha/aws/boto.py", "describe_instances", "DescribeInstances"),
    ("concurrent/futures/thread.py", "_worker", "idle"),
    ("twisted/_threads/_threadworker.py", "work", "idle"),
    ("twisted/python/threadpool.py", "*", "idle"),
    ("python3.11/threading.py", "wait", "idle"),
    # the reactor thread
    ("puppetha/enroll/api.py", "*", "request: parse, refuse, answer (api)"),
    ("twisted/web/http.py", "*", "request: HTTP parse and write"),
    ("twisted/web/server.py", "*", "request: HTTP parse and write"),
    ("puppetha/enroll/proxyheader.py", "*", "PROXY header"),
    ("twisted/protocols/tls.py", "*", "TLS (handshake, records)"),
    ("puppetha/enroll/service.py", "*", "other enrollment steps"),
    ("twisted/internet/selectreactor.py", "doSelect", "idle"),
    ("twisted/internet/epollreactor.py", "doPoll", "idle"),
    ("twisted/internet/tcp.py", "*", "TCP accept, read, write, close"),
    ("twisted/internet/defer.py", "*", "Deferreds and coroutines"),
    ("twisted/logger/", "*", "logging"),
)


def _store_detail(frame: FrameType) -> str | None:
    """What a thread inside the SQLite store is doing, from the line it is on."""
    if not frame.f_code.co_filename.endswith("puppetha/store/sqlite.py"):
        return None
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    if "_writers.acquire" in line:
        return "store: waiting for this process's other writer"
    if "BEGIN IMMEDIATE" in line:
        return "store: BEGIN IMMEDIATE"
    if '"COMMIT"' in line:
        return "store: COMMIT (fsync)"
    return "store: SQL"


def phase_of(frame: FrameType | None) -> str:
    innermost = frame
    detail = None if frame is None else _store_detail(frame)
    while frame is not None:
        code = frame.f_code
        if code.co_name.startswith("<"):
            # A comprehension or lambda: the function around it names the phase.
            frame = frame.f_back
            continue
        for suffix, function, phase in PHASES:
            if function in ("*", code.co_name) and code.co_filename.endswith(suffix):
                return phase if detail is None or phase == detail else f"{phase}; {detail}"
        frame = frame.f_back
    if detail is not None:
        return detail
    if innermost is None:
        return "other"
    return f"other: {innermost.f_code.co_filename.rsplit('/', 2)[-1]}:{innermost.f_code.co_name}"


class Sampler:
    """Samples the threads ``watched()`` names (their idents), every ``interval`` seconds."""

    def __init__(self, watched: Callable[[], dict[int, str]], interval: float = 0.001) -> None:
        self.watched = watched
        self.interval = interval
        #: Samples by (thread kind, phase).
        self.samples: Counter[tuple[str, str]] = Counter()
        self.rounds = 0
        self.elapsed = 0.0
        self._started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="phase-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.elapsed = time.perf_counter() - self._started

    def _run(self) -> None:
        while not self._stop.is_set():
            kinds = self.watched()
            for ident, frame in sys._current_frames().items():
                kind = kinds.get(ident)
                if kind is not None:
                    self.samples[(kind, phase_of(frame))] += 1
            self.rounds += 1
            time.sleep(self.interval)

    def report(self, enrollments: int) -> str:
        """A table per thread kind: share of its samples, and thread-milliseconds per enrollment."""
        # Seconds between two samples of one thread, as they came (the sleep, the GIL).
        seconds_per_sample = self.elapsed / max(self.rounds, 1)
        lines = [f"{self.rounds} sampling rounds in {self.elapsed:.1f} s "
                 f"({1000 * seconds_per_sample:.2f} ms apart), {enrollments} enrollments"]
        for kind in sorted({k for k, _ in self.samples}):
            mine = {phase: n for (k, phase), n in self.samples.items() if k == kind}
            total = sum(mine.values())
            busy = sum(n for phase, n in mine.items() if phase != "idle") or 1
            lines.append(f"\n{kind} threads: {total} samples, {100 * busy / total:.0f} % not idle")
            lines.append("| phase | share of samples | share of the not idle | thread-ms per enrollment |")
            lines.append("|---|---|---|---|")
            for phase, n in sorted(mine.items(), key=lambda pn: -pn[1])[:16]:
                busy_share = "" if phase == "idle" else f"{100 * n / busy:.1f} %"
                per = 1000 * n * seconds_per_sample / max(enrollments, 1)
                lines.append(f"| {phase} | {100 * n / total:.1f} % | {busy_share} | {per:.2f} |")
        return "\n".join(lines)
