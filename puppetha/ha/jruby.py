"""
puppetserver's own view of its load: the JRuby pool, from
``GET /status/v1/services/jruby-metrics?level=debug`` (the ``experimental.metrics`` map of
puppetserver's ``jruby_metrics_core.clj``).  Pure: the probe that fetches it (with the health
probe's client certificate) hands the decoded JSON here.

Its counters (requests, queue-limit hits) count since puppetserver started, so one interval's
share is the difference of two probes; a counter that went down means puppetserver restarted,
and the new value is the interval's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attrs import evolve, frozen

from puppetha.ha.scaling import MasterLoad

#: The status service's name for these metrics.
JRUBY_METRICS_PATH = "/status/v1/services/jruby-metrics?level=debug"


@frozen
class JRubyStatus:
    size: int
    free: int
    #: Counters since puppetserver started.
    requested_total: int
    queue_limit_hits_total: int
    #: Recent means, seconds (puppetserver reports milliseconds).
    borrow_time: float
    wait_time: float


def parse_jruby_metrics(answer: Mapping[str, Any]) -> JRubyStatus:
    """The status API's answer, reduced; ``ValueError`` when it is not what puppetserver sends."""
    try:
        metrics = answer["status"]["experimental"]["metrics"]
        status = JRubyStatus(
            size=_count(metrics["num-jrubies"]),
            free=_count(metrics["num-free-jrubies"]),
            requested_total=_count(metrics["requested-count"]),
            queue_limit_hits_total=_count(metrics["queue-limit-hit-count"]),
            borrow_time=_seconds(metrics["average-borrow-time"]),
            wait_time=_seconds(metrics["average-wait-time"]),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"not puppetserver's jruby-metrics at level debug: missing {e}") from None
    if status.free > status.size:
        raise ValueError(f"{status.free} free JRubies of {status.size}")
    return status


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a count: {value!r}")
    return value


def _seconds(milliseconds: object) -> float:
    if isinstance(milliseconds, bool) or not isinstance(milliseconds, int | float) or milliseconds < 0:
        raise ValueError(f"not a duration in milliseconds: {milliseconds!r}")
    return float(milliseconds) / 1000


def _since(previous: int | None, current: int) -> int:
    if previous is None or current < previous:
        return current
    return current - previous


def with_jruby(load: MasterLoad, current: JRubyStatus, previous: JRubyStatus | None) -> MasterLoad:
    """``load`` (nginx's view of one interval) with puppetserver's view of the same interval."""
    return evolve(
        load,
        jruby_size=current.size,
        jruby_free=current.free,
        jruby_requested=_since(previous.requested_total if previous else None, current.requested_total),
        queue_limit_hits=_since(previous.queue_limit_hits_total if previous else None,
                                current.queue_limit_hits_total),
        jruby_borrow=current.borrow_time,
        jruby_wait=current.wait_time,
    )
