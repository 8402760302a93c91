"""puppetserver's jruby-metrics, reduced and merged into a master's load, as tables."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from puppetha.ha.jruby import JRubyStatus, parse_jruby_metrics, with_jruby
from puppetha.ha.scaling import MasterLoad

#: The shape puppetserver 7.9.5 answers (jruby_metrics_core.clj, level debug), trimmed of the
#: per-instance lists this code does not read.
ANSWER: dict[str, Any] = {
    "service_version": "7.9.5",
    "service_status_version": 1,
    "detail_level": "debug",
    "state": "running",
    "status": {
        "experimental": {
            "jruby-pool-lock-status": {"current-state": ":not-in-use",
                                       "last-change-time": "2026-11-27T14:00:00Z"},
            "metrics": {
                "num-jrubies": 4,
                "num-free-jrubies": 1,
                "requested-count": 120,
                "borrow-count": 117,
                "borrow-timeout-count": 0,
                "borrow-retry-count": 0,
                "return-count": 116,
                "average-requested-jrubies": 2.5,
                "average-free-jrubies": 1.4,
                "average-borrow-time": 850,
                "average-wait-time": 40.5,
                "borrow-timers": {},
                "requested-instances": [],
                "borrowed-instances": [],
                "num-pool-locks": 0,
                "average-lock-wait-time": 0,
                "average-lock-held-time": 0,
                "queue-limit-hit-count": 3,
                "queue-limit-hit-rate": 0.01,
            },
        }
    },
}


def test_parse() -> None:
    assert parse_jruby_metrics(ANSWER) == JRubyStatus(size=4, free=1, requested_total=120,
                                                      queue_limit_hits_total=3, borrow_time=0.85,
                                                      wait_time=0.0405)


def changed(path: list[str], value: object) -> dict[str, Any]:
    answer = copy.deepcopy(ANSWER)
    target = answer
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return answer


METRICS = ["status", "experimental", "metrics"]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (changed(["status", "experimental"], KeyError), "missing 'experimental'"),  # level info
        (changed([*METRICS, "num-free-jrubies"], KeyError), "missing 'num-free-jrubies'"),
        (changed([*METRICS, "num-jrubies"], "4"), "not a count"),
        (changed([*METRICS, "requested-count"], -1), "not a count"),
        (changed([*METRICS, "queue-limit-hit-count"], True), "not a count"),
        (changed([*METRICS, "average-wait-time"], None), "not a duration"),
        (changed([*METRICS, "num-free-jrubies"], 5), "5 free JRubies of 4"),
        (changed(["status"], []), "missing"),
        ({}, "missing 'status'"),
    ],
)
def test_what_is_not_puppetserver_s_answer_is_refused(answer: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_jruby_metrics(answer)


NGINX = MasterLoad(requests=50, in_flight=3, upstream_time=0.9, unavailable=1, agents=7)
NOW = JRubyStatus(size=4, free=1, requested_total=120, queue_limit_hits_total=3, borrow_time=0.85,
                  wait_time=0.04)


@pytest.mark.parametrize(
    ("previous", "requested", "hits"),
    [
        (None, 120, 3),  # the first probe: everything so far
        (JRubyStatus(4, 4, 100, 3, 0.5, 0.0), 20, 0),  # the interval's share
        (JRubyStatus(4, 4, 5000, 9, 0.5, 0.0), 120, 3),  # counters went down: puppetserver restarted
    ],
)
def test_merged_into_nginx_s_view(previous: JRubyStatus | None, requested: int, hits: int) -> None:
    load = with_jruby(NGINX, NOW, previous)
    assert load == MasterLoad(requests=50, in_flight=3, upstream_time=0.9, unavailable=1, agents=7,
                              jruby_size=4, jruby_free=1, jruby_requested=requested, queue_limit_hits=hits,
                              jruby_borrow=0.85, jruby_wait=0.04)


def test_queue_limit_hits_make_a_master_overloaded() -> None:
    quiet = MasterLoad(jruby_size=4, jruby_free=4)
    assert not quiet.overloaded
    assert with_jruby(quiet, NOW, JRubyStatus(4, 4, 100, 2, 0.5, 0.0)).overloaded
    assert not with_jruby(quiet, NOW, JRubyStatus(4, 4, 100, 3, 0.5, 0.0)).overloaded
    # three of four JRubies busy
    assert with_jruby(quiet, NOW, None).busy() == pytest.approx(0.75)
