"""
The metrics endpoint in memory: the families as tables of what their sources hold, a scrape
through klein (parsed with Prometheus's own parser), a failing source left out, JSON errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, cast

import pytest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher

from puppetha.config import ConfigError, config_from_string
from puppetha.ha.autoscale import ScaleActionRecord
from puppetha.ha.heartbeat import Heartbeat, Peer
from puppetha.ha.scaling import MasterLoad, ScaleDecision
from puppetha.latency import Latencies
from puppetha.metrics import families
from puppetha.metrics.endpoint import Scrape, Source, metrics_resource
from puppetha.metrics.sources import load_source, scale_decision_source, store_sources
from puppetha.store import StoreUnavailable
from puppetha.store.records import CRLRecord, LeaseRecord, MasterRecord, Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.threads import Blocking

# The fixtures' own assertions are rewritten wherever they are first imported.
pytest.register_assert_rewrite("tests.enroll_fixtures")

from tests.enroll_fixtures import InlinePool, InlineReactor  # noqa: E402


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def samples(metrics: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in metrics for s in m.samples}


def scrape(sources: dict[str, Source], method: str = "GET",
           path: str = "/metrics") -> tuple[int, dict[str, str], bytes]:
    api: Any = StubTreq(metrics_resource(Scrape(sources)))
    answered: list[Any] = []
    api.request(method, f"http://127.0.0.1:9464{path}").addCallback(answered.append)
    assert answered, "the scrape never answered"
    body: list[bytes] = []
    api.content(answered[0]).addCallback(body.append)
    headers = {k.decode().lower(): v[0].decode() for k, v in answered[0].headers.getAllRawHeaders()}
    return answered[0].code, headers, body[0]


# -- the families, as tables ------------------------------------------------------------------


def test_crl_ages_and_time_to_next_update() -> None:
    crls = [CRLRecord("root", 3, "", this_update=1000.0, next_update=5000.0),
            CRLRecord("master-1", 7, "", this_update=1900.0, next_update=2100.0)]
    got = samples(families.crl_families(crls, now=2000.0))
    assert got[("puppetha_crl_age_seconds", (("ca", "root"),))] == 1000.0
    assert got[("puppetha_crl_next_update_seconds", (("ca", "root"),))] == 3000.0
    assert got[("puppetha_crl_age_seconds", (("ca", "master-1"),))] == 100.0
    assert got[("puppetha_crl_next_update_seconds", (("ca", "master-1"),))] == 100.0
    assert got[("puppetha_crl_number", (("ca", "master-1"),))] == 7


def test_heartbeat_age_per_peer_on_the_monotonic_clock() -> None:
    beat = Heartbeat(node="i-b", boot=1, seq=1, sent=0.0, state="standby", token=1, generation="g", port=7946)
    peers = {"i-b": Peer(beat, "10.0.0.2", heard=50.0), "i-c": Peer(beat, "10.0.0.3", heard=59.5)}
    got = samples(families.heartbeat_families(peers, monotonic_now=60.0))
    assert got == {("puppetha_heartbeat_age_seconds", (("peer", "i-b"),)): 10.0,
                   ("puppetha_heartbeat_age_seconds", (("peer", "i-c"),)): 0.5}


@pytest.mark.parametrize(("lease", "expected"), [
    (None, {}),
    (LeaseRecord("lb-primary", "i-a", token=4, duration=0.8, renewed_at=99.5),
     {("puppetha_lease_token", ()): 4, ("puppetha_lease_holder_info", (("holder", "i-a"),)): 1,
      ("puppetha_lease_renewed_age_seconds", ()): 0.5}),
    (LeaseRecord("lb-primary", "", token=5, duration=0.8, renewed_at=90.0),
     {("puppetha_lease_token", ()): 5, ("puppetha_lease_holder_info", (("holder", ""),)): 1,
      ("puppetha_lease_renewed_age_seconds", ()): 10.0}),
])
def test_the_lease(lease: LeaseRecord | None, expected: dict[Any, float]) -> None:
    assert samples(families.lease_families(lease, now=100.0)) == expected


def test_primary_and_masters() -> None:
    assert samples(families.primary_families(True, "primary"))[("puppetha_primary", ())] == 1
    assert samples(families.primary_families(False, "standby"))[("puppetha_primary", ())] == 0
    masters = [MasterRecord("m-1", "10.0.0.5", 8140, "m-1", 0.0, healthy=True),
               MasterRecord("m-2", "10.0.0.6", 8140, "m-2", 0.0, healthy=False),
               # Marked by the primary: healthy still, out of the upstream.
               MasterRecord("m-3", "10.0.0.7", 8140, "m-3", 0.0, healthy=True, draining_since=90.0,
                            drain_token=4)]
    assert samples(families.master_families(masters)) == {
        ("puppetha_master_healthy", (("master", "m-1"),)): 1,
        ("puppetha_master_healthy", (("master", "m-2"),)): 0,
        ("puppetha_master_healthy", (("master", "m-3"),)): 1,
        ("puppetha_master_draining", (("master", "m-1"),)): 0,
        ("puppetha_master_draining", (("master", "m-2"),)): 0,
        ("puppetha_master_draining", (("master", "m-3"),)): 1,
    }


def test_scale_actions_from_the_records() -> None:
    actions = [ScaleActionRecord("000000000003-000001", "launch", 3, 100.0, "busy", 2, ("i-1", "i-2")),
               ScaleActionRecord("000000000003-000002", "launch", 3, 200.0, "busy", 1, ()),
               ScaleActionRecord("000000000004-000001", "drain", 4, 300.0, "idle", 1, ("i-1",))]
    got = samples(families.scale_action_families(actions))
    assert got[("puppetha_scale_actions_total", (("action", "launch"),))] == 2
    assert got[("puppetha_scale_actions_total", (("action", "drain"),))] == 1
    assert got[("puppetha_scale_instances_total", (("action", "launch"),))] == 2
    assert got[("puppetha_scale_actions_unfinished", ())] == 1
    assert got[("puppetha_scale_last_action_timestamp_seconds", (("action", "launch"),))] == 200.0


def test_enc_latency_histogram_is_cumulative() -> None:
    latencies = Latencies((0.01, 0.1, 1.0))
    for seconds in (0.005, 0.01, 0.05, 0.5, 3.0):
        latencies.observe(seconds)
    got = samples(families.enc_families({"ok": 4, "unknown-node": 1}, latencies))
    bucket = "puppetha_enc_request_duration_seconds_bucket"
    assert [got[(bucket, (("le", le),))] for le in ("0.01", "0.1", "1.0", "+Inf")] == [2, 3, 4, 5]
    assert got[("puppetha_enc_request_duration_seconds_count", ())] == 5
    assert got[("puppetha_enc_request_duration_seconds_sum", ())] == pytest.approx(3.565)
    assert got[("puppetha_enc_requests_total", (("outcome", "unknown-node"),))] == 1


def test_load_comes_from_the_provider_and_decisions_from_the_loop() -> None:
    loads = {"m-1": MasterLoad(requests=30, in_flight=2, jruby_free=1, jruby_size=4)}
    got = samples(load_source(lambda: loads)())  # type: ignore[arg-type]
    assert got[("puppetha_master_requests", (("master", "m-1"),))] == 30
    assert got[("puppetha_master_jruby_size", (("master", "m-1"),))] == 4
    assert got[("puppetha_master_busy_ratio", (("master", "m-1"),))] == loads["m-1"].busy()
    decided = scale_decision_source(lambda: [(5.0, ScaleDecision("hold", "calm")),
                                             (9.0, ScaleDecision("launch", "busy 0.9", 1))])()
    got = samples(decided)  # type: ignore[arg-type]
    assert got[("puppetha_scale_decision_info", (("action", "launch"), ("reason", "busy 0.9")))] == 1
    assert got[("puppetha_scale_decision_timestamp_seconds", ())] == 9.0


# -- the store's families, read on a pool -----------------------------------------------------


def test_store_sources_read_the_store_on_the_pool(tmp_path: Any) -> None:
    store = SQLiteStore(str(tmp_path / "store.sqlite"))
    records = Records(store)
    records.create(CRLRecord("root", 1, "", this_update=10.0, next_update=110.0))
    records.create(MasterRecord("m-1", "10.0.0.5", 8140, "m-1", 0.0))
    records.create(LeaseRecord("lb-primary", "i-a", 2, 0.8, 49.0))
    calls: list[str] = []

    class CountingPool(InlinePool):
        def callInThreadWithCallback(self, *args: Any, **kwargs: Any) -> None:
            calls.append("pool")
            super().callInThreadWithCallback(*args, **kwargs)

    clock = Clock()
    clock.advance(50.0)
    reads = Blocking(cast(Any, InlineReactor()), CountingPool(), records)
    code, _, body = scrape(store_sources(reads, clock))
    store.close()
    assert code == 200
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert got[("puppetha_crl_age_seconds", (("ca", "root"),))] == 40.0
    assert got[("puppetha_master_healthy", (("master", "m-1"),))] == 1
    assert got[("puppetha_lease_token", ())] == 2
    assert calls == ["pool"] * 4  # every store read went to the pool


# -- the endpoint ---------------------------------------------------------------------------


def test_a_scrape_is_prometheus_text_with_help_and_type() -> None:
    code, headers, body = scrape({"enrollment": lambda: families.enrollment_families(
        {"agent": 3, "master": 1}, {"identity-bad-signature": 2})})
    assert code == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    assert "# HELP puppetha_enrollments_total " in text
    assert "# TYPE puppetha_enrollments_total counter" in text
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert parsed["puppetha_enrollments"].type == "counter"
    values = {s.labels["role"]: s.value for s in parsed["puppetha_enrollments"].samples}
    assert values == {"agent": 3, "master": 1, "lb": 0}
    refusals = parsed["puppetha_enrollment_refusals"].samples
    assert [(s.labels["reason"], s.value) for s in refusals] == [("identity-bad-signature", 2)]


def test_a_failing_source_is_left_out_with_a_log_line_and_the_rest_served(logged: list[LogEvent]) -> None:
    def broken() -> Deferred[list[Metric]]:
        return fail(StoreUnavailable("the store did not answer within 5s"))

    def also_broken() -> list[Metric]:
        raise RuntimeError("a bug")

    code, _, body = scrape({
        "crl": broken,
        "heartbeats": also_broken,
        "primary": lambda: succeed(families.primary_families(True, "primary")),
    })
    assert code == 200
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert names == {"puppetha_primary", "puppetha_failover_state_info"}
    lines = [formatEvent(e) for e in logged if e.get("log_namespace") == "puppetha.metrics.endpoint"]
    assert "metrics: crl left out of this scrape: the store did not answer within 5s" in lines
    assert "metrics: heartbeats left out of this scrape: a bug" in lines


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/", 404, "not-found"),
    ("GET", "/metrics/", 404, "not-found"),
    ("GET", "/v1/enroll", 404, "not-found"),
    ("POST", "/metrics", 405, "method-not-allowed"),
    ("DELETE", "/metrics", 405, "method-not-allowed"),
    ("GET", "/%ff", 400, "bad-url"),
])
def test_other_paths_and_methods_get_json_errors(method: str, path: str, status: int, code: str) -> None:
    answered, headers, body = scrape({}, method, path)
    assert answered == status
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == code
    if status == 405:
        assert headers["allow"] == "GET, HEAD"


# -- the option -----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "error"), [
    ("tcp:9464", "name the interface"),
    ("tcp:9464:interface=localhost", "the interface must be an IP address"),
    ("tcp:99999:interface=127.0.0.1", "the port must be a number from 0 to 65535"),
    ("udp:9464", "not a tcp: or unix: endpoint description"),
    ("unix:metrics.sock", "the socket must be an absolute path"),
    ("tcp:9464:interface=127.0.0.1:color=red", "unknown keyword 'color'"),
])
def test_a_bad_listen_is_refused_in_one_line(value: str, error: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_string(f"[metrics]\nlisten = {value}\n", "puppetha.conf")
    message = str(refused.value)
    assert message.startswith("puppetha.conf: [metrics] listen: ")
    assert error in message
    assert "\n" not in message


@pytest.mark.parametrize("value", ["", "tcp:9464:interface=127.0.0.1", "tcp6:9464:interface=\\:\\:1",
                                   "unix:/run/puppetha/metrics.sock:mode=600"])
def test_good_listens(value: str) -> None:
    config = config_from_string(f"[metrics]\nlisten = {value}\n")
    assert config[("metrics", "listen")] == value
