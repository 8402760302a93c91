"""
The metric families of ``GET /metrics`` (``docs/metrics.md``), each made by a pure function from
what a live service or the store holds at the time of the scrape.  Nothing here counts or keeps
anything: a family says what its source says, so it cannot drift from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from puppetha.ha.autoscale import ScaleActionRecord
from puppetha.ha.heartbeat import Peer
from puppetha.ha.scaling import MasterLoad, ScaleDecision
from puppetha.latency import Latencies
from puppetha.store.records import CRLRecord, LeaseRecord, MasterRecord

PREFIX = "puppetha_"


def enrollment_families(enrolled: Mapping[str, int], refused: Mapping[str, int]) -> list[Metric]:
    """Enrollments answered with a certificate by role, refusals by reason (the error code)."""
    done = CounterMetricFamily(f"{PREFIX}enrollments", "Enrollments answered with a certificate, "
                               "by role, since the daemon started.", labels=["role"])
    for role in ("agent", "master", "lb"):
        done.add_metric([role], enrolled.get(role, 0))
    no = CounterMetricFamily(f"{PREFIX}enrollment_refusals", "Enrollments refused, by reason "
                             "(the JSON error code), since the daemon started.", labels=["reason"])
    for reason, count in sorted(refused.items()):
        no.add_metric([reason], count)
    return [done, no]


def enc_families(answers: Mapping[str, int], latencies: Latencies) -> list[Metric]:
    """ENC calls by outcome (``ok`` or the ERR code) and how long the answered ones took."""
    calls = CounterMetricFamily(f"{PREFIX}enc_requests", "ENC calls answered, by outcome: ok, or "
                                "the code of the ERR answer (busy: refused at the door).",
                                labels=["outcome"])
    for outcome, count in sorted(answers.items()):
        calls.add_metric([outcome], count)
    seconds = HistogramMetricFamily(f"{PREFIX}enc_request_duration_seconds",
                                    "Time from an ENC connection to its answer.")
    seconds.add_metric([], [(_bound(b), n) for b, n in latencies.cumulative()], latencies.sum)
    return [calls, seconds]


def gc_families(collections: Sequence[int], pauses: Latencies, frozen: int) -> list[Metric]:
    """The cyclic collector's passes by generation, their pauses, what the settling froze."""
    passes = CounterMetricFamily(f"{PREFIX}gc_collections", "Passes of Python's cyclic garbage "
                                 "collector since the process started, by generation (2: a full "
                                 "pass).", labels=["generation"])
    for generation, count in enumerate(collections):
        passes.add_metric([str(generation)], count)
    seconds = HistogramMetricFamily(f"{PREFIX}gc_pause_seconds", "How long each pass of the "
                                    "collector stopped the daemon's threads, since it started.")
    seconds.add_metric([], [(_bound(b), n) for b, n in pauses.cumulative()], pauses.sum)
    settled = GaugeMetricFamily(f"{PREFIX}gc_settled_objects", "Objects the daemon held once "
                                "started and still holds, kept out of the collector's passes (0 "
                                "until then).")
    settled.add_metric([], frozen)
    return [passes, seconds, settled]


def crl_families(crls: Iterable[CRLRecord], now: float) -> list[Metric]:
    """Each CA's CRL in the store: how old it is and how long until its nextUpdate."""
    age = GaugeMetricFamily(f"{PREFIX}crl_age_seconds", "Seconds since the CA's current CRL was "
                            "signed (its thisUpdate, backdated a little like certificates).",
                            labels=["ca"])
    left = GaugeMetricFamily(f"{PREFIX}crl_next_update_seconds", "Seconds until the CA's current "
                             "CRL's nextUpdate; at 0 every host holding it refuses every handshake.",
                             labels=["ca"])
    number = GaugeMetricFamily(f"{PREFIX}crl_number", "The CRL number of the CA's current CRL.",
                               labels=["ca"])
    for crl in sorted(crls, key=lambda c: c.ca):
        age.add_metric([crl.ca], now - crl.this_update)
        left.add_metric([crl.ca], crl.next_update - now)
        number.add_metric([crl.ca], crl.number)
    return [age, left, number]


def heartbeat_families(peers: Mapping[str, Peer], monotonic_now: float) -> list[Metric]:
    """Seconds since this node last accepted an authentic heartbeat from each peer."""
    age = GaugeMetricFamily(f"{PREFIX}heartbeat_age_seconds", "Seconds since this lb node last "
                            "accepted an authentic heartbeat from the peer.", labels=["peer"])
    for node, peer in sorted(peers.items()):
        age.add_metric([node], max(0.0, monotonic_now - peer.heard))
    return [age]


def lease_families(lease: LeaseRecord | None, now: float) -> list[Metric]:
    """The failover lease as the store holds it: token, holder, and age of its last renewal."""
    token = GaugeMetricFamily(f"{PREFIX}lease_token", "The failover lease's fencing token "
                              "(it grows with every change of holder).")
    holder = InfoMetricFamily(f"{PREFIX}lease_holder", "Who holds the failover lease (empty: "
                              "released).")
    age = GaugeMetricFamily(f"{PREFIX}lease_renewed_age_seconds", "Seconds since the lease was "
                            "last renewed, by this host's clock against the holder's.")
    if lease is not None:
        token.add_metric([], lease.token)
        holder.add_metric([], {"holder": lease.holder})
        age.add_metric([], max(0.0, now - lease.renewed_at))
    return [token, holder, age]


def primary_families(primary: bool, state: str) -> list[Metric]:
    """Whether this lb node acts as the primary, and its failover state."""
    is_primary = GaugeMetricFamily(f"{PREFIX}primary", "1 while this lb node is the primary "
                                   "(holds the lease and the Elastic IP is confirmed on it).")
    is_primary.add_metric([], 1 if primary else 0)
    info = InfoMetricFamily(f"{PREFIX}failover_state", "This lb node's failover state.")
    info.add_metric([], {"state": state})
    return [is_primary, info]


def master_families(masters: Iterable[MasterRecord]) -> list[Metric]:
    """Each registered master's health as the lb nodes last judged it, and whether it is draining."""
    healthy = GaugeMetricFamily(f"{PREFIX}master_healthy", "1 if the master passes the lb nodes' "
                                "health probe (it is in nginx's upstream), else 0.", labels=["master"])
    draining = GaugeMetricFamily(f"{PREFIX}master_draining", "1 while the primary drains the master "
                                 "(no new agents or requests; terminated once its requests end), "
                                 "else 0.", labels=["master"])
    for master in sorted(masters, key=lambda m: m.certname):
        healthy.add_metric([master.certname], 1 if master.healthy else 0)
        draining.add_metric([master.certname], 1 if master.draining else 0)
    return [healthy, draining]


#: Per-master load gauges: (name, help, the MasterLoad field).
_LOAD = (
    ("master_requests", "Requests nginx proxied to the master in the last sampling interval.",
     "requests"),
    ("master_in_flight_requests", "Requests open at the master (nginx's view).", "in_flight"),
    ("master_upstream_time_seconds", "Mean upstream response time of the interval's requests.",
     "upstream_time"),
    ("master_unavailable_responses", "Answers 503 (JRuby queue full) in the interval.",
     "unavailable"),
    ("master_jruby_free", "JRuby instances free (puppetserver's jruby-metrics).", "jruby_free"),
    ("master_jruby_size", "JRuby instances in the pool.", "jruby_size"),
    ("master_jruby_wait_seconds", "Mean time a borrow waited for a JRuby.", "jruby_wait"),
    ("master_queue_limit_hits", "Requests refused at the JRuby queue limit in the interval.",
     "queue_limit_hits"),
    ("master_agents", "Agents assigned to the master.", "agents"),
)


def load_families(loads: Mapping[str, MasterLoad]) -> list[Metric]:
    """The masters' load of the last sampling interval, as the load sampler gives it."""
    families: list[Metric] = []
    for name, doc, attribute in _LOAD:
        family = GaugeMetricFamily(f"{PREFIX}{name}", doc, labels=["master"])
        for master, load in sorted(loads.items()):
            family.add_metric([master], getattr(load, attribute))
        families.append(family)
    busy = GaugeMetricFamily(f"{PREFIX}master_busy_ratio", "JRubies in use plus borrows waiting, "
                             "as a share of the pool: what the scaling policy compares with its "
                             "thresholds.", labels=["master"])
    for master, load in sorted(loads.items()):
        busy.add_metric([master], load.busy())
    families.append(busy)
    return families


def scale_action_families(actions: Iterable[ScaleActionRecord]) -> list[Metric]:
    """The scaling actions recorded in the store (by every primary, under its token)."""
    actions = list(actions)
    total = CounterMetricFamily(f"{PREFIX}scale_actions", "Scaling actions recorded in the store, "
                                "by action.", labels=["action"])
    instances = CounterMetricFamily(f"{PREFIX}scale_instances", "Instances the recorded actions "
                                    "launched (or acted on), by action.", labels=["action"])
    unfinished = GaugeMetricFamily(f"{PREFIX}scale_actions_unfinished", "Recorded launches "
                                   "still without their instances (RunInstances not answered).")
    last = GaugeMetricFamily(f"{PREFIX}scale_last_action_timestamp_seconds", "When the last "
                             "recorded action of each kind was decided (Unix time).",
                             labels=["action"])
    by_action: dict[str, list[ScaleActionRecord]] = {}
    for record in actions:
        by_action.setdefault(record.action, []).append(record)
    for action, records in sorted(by_action.items()):
        total.add_metric([action], len(records))
        instances.add_metric([action], sum(len(r.instances) for r in records))
        last.add_metric([action], max(r.decided_at for r in records))
    unfinished.add_metric([], sum(1 for r in actions if not r.instances))
    return [total, instances, unfinished, last]


def scale_decision_families(decisions: Sequence[tuple[float, ScaleDecision]]) -> list[Metric]:
    """The scaling loop's latest decision (only on the node whose loop runs it: the primary)."""
    latest = InfoMetricFamily(f"{PREFIX}scale_decision", "The scaling policy's latest decision and "
                              "its reason.")
    at = GaugeMetricFamily(f"{PREFIX}scale_decision_timestamp_seconds", "When the latest decision "
                           "was made (Unix time).")
    if decisions:
        when, decision = decisions[-1]
        latest.add_metric([], {"action": decision.action, "reason": decision.reason})
        at.add_metric([], when)
    return [latest, at]


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)
