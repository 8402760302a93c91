"""``puppetha status``: the pure summary as a table, its text, and the command on a real store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import attrs
import pytest

from puppetha.cli import main
from puppetha.ha.autoscale import write_decision
from puppetha.ha.scaling import HOLD, LAUNCH, ScaleDecision
from puppetha.ha.status import STALE_AFTER, cluster_status, heard_age, render, stale
from puppetha.store.records import (
    LbNodeRecord,
    LeaseRecord,
    LoadReportRecord,
    MasterRecord,
    Records,
    Versioned,
)
from puppetha.store.sqlite import SQLiteStore

NOW = 1_764_000_100.0
A = LbNodeRecord("i-0aaa0aaa0aaa0aaa0", "10.0.0.1", 7946, 1.0, "primary", 3, "gen-1", NOW - 1.0,
                 {"i-0bbb0bbb0bbb0bbb0": 0.05})
B = LbNodeRecord("i-0bbb0bbb0bbb0bbb0", "10.0.0.2", 7946, 1.0, "standby", 3, "gen-1", NOW - 0.5,
                 {"i-0aaa0aaa0aaa0aaa0": 0.1})
LEASE = Versioned(LeaseRecord("lb-primary", A.node, 3, 0.8, NOW - 0.1), 40)
MASTER = MasterRecord("master-1", "10.0.1.5", 8140, "master-1", 1.0, healthy=False)


def test_heard_age_is_what_peers_reported_aged_by_their_report() -> None:
    assert heard_age(A.node, [A, B], NOW) == 0.6  # b heard a 0.1 s before its report, 0.5 s ago
    assert heard_age(B.node, [A, B], NOW) == 1.05
    assert heard_age(A.node, [A], NOW) is None  # nobody else: never heard


@pytest.mark.parametrize(
    ("reported_age", "heartbeat_age", "is_stale"),
    [
        (1.0, 0.1, False),  # alive
        (STALE_AFTER + 1, 0.1, False),  # its store writes stall, its peers still hear it
        (1.0, STALE_AFTER + 1, False),  # cut from its peers, still reporting
        (STALE_AFTER + 1, None, True),  # gone, and nobody else ever heard it
        (STALE_AFTER + 1, STALE_AFTER + 5, True),  # gone
        (STALE_AFTER, STALE_AFTER, False),  # not older than the bound
    ],
)
def test_stale(reported_age: float, heartbeat_age: float | None, is_stale: bool) -> None:
    assert stale(reported_age, heartbeat_age) is is_stale


def test_a_dead_node_s_last_report_is_shown_as_stale_not_as_its_state() -> None:
    dead = LbNodeRecord("i-0ccc0ccc0ccc0ccc0", "10.0.0.3", 7946, 1.0, "primary", 2, "gen-0", NOW - 3600.0,
                        {A.node: 0.1})
    a = LbNodeRecord(A.node, A.address, A.port, 1.0, "primary", 3, "gen-1", NOW - 1.0,
                     {B.node: 0.05, dead.node: 3599.0})
    status = cluster_status(now=NOW, nodes=[a, B, dead], lease=LEASE, elastic_ip="", owner=None,
                            owner_error=None, masters=[])
    assert [(n["node"], n["state"], n["stale"]) for n in status["lb_nodes"]] == [
        (A.node, "primary", False), (B.node, "standby", False), (dead.node, "primary", True)]
    text = render(status)
    assert f"{dead.node}  10.0.0.3:7946  STALE (last said primary)  token 2" in text
    assert f"{A.node}  10.0.0.1:7946  primary  token 3" in text


def test_status_says_who_is_primary_and_whether_aws_agrees() -> None:
    status = cluster_status(now=NOW, nodes=[B, A], lease=LEASE, elastic_ip="eipalloc-0123456789",
                            owner=A.node, owner_error=None, masters=[MASTER])
    assert status["primary"] == A.node
    assert status["lease"] == {"holder": A.node, "token": 3, "duration": 0.8, "age": 0.1}
    assert status["elastic_ip"]["agrees_with_lease"] is True
    assert [n["node"] for n in status["lb_nodes"]] == [A.node, B.node]
    assert status["lb_nodes"][0]["address"] == "10.0.0.1:7946"
    assert status["masters"] == [{"certname": "master-1", "address": "10.0.1.5:8140", "healthy": False,
                                  "draining": None, "load": None}]
    text = render(status)
    assert f"primary: {A.node} (token 3" in text
    assert f"elastic ip: eipalloc-0123456789 on {A.node}\n" in text
    assert "master-1  10.0.1.5:8140  UNHEALTHY" in text


def test_status_flags_an_address_away_from_the_lease_holder_and_aws_errors() -> None:
    away = cluster_status(now=NOW, nodes=[A, B], lease=LEASE, elastic_ip="eipalloc-0123456789",
                          owner=B.node, owner_error=None, masters=[])
    assert away["elastic_ip"]["agrees_with_lease"] is False
    assert "(NOT the lease holder)" in render(away)
    down = cluster_status(now=NOW, nodes=[], lease=None, elastic_ip="eipalloc-0123456789",
                          owner=None, owner_error="DescribeAddresses: timeout", masters=[])
    assert down["elastic_ip"]["agrees_with_lease"] is None
    assert "on an unknown instance: DescribeAddresses: timeout" in render(down)
    assert "primary: none (no lease yet)" in render(down)


def test_the_command_on_a_store_without_failover(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = SQLiteStore(str(path))
    Records(store).create(MASTER)
    Records(store).create(LeaseRecord("lb-primary", "", 2, 0.8, NOW - 5))
    store.close()
    conf = tmp_path / "puppetha.conf"
    conf.write_text(f"[store]\npath = {path}\n[pki]\nvault_key_file = {tmp_path}/vault.key\n")
    out, err = io.StringIO(), io.StringIO()
    assert main(["--config", str(conf), "status", "--json"], out=out, err=err, now=lambda: NOW) == 0
    result = json.loads(out.getvalue())
    assert result["primary"] is None
    assert result["lease"]["token"] == 2
    assert result["elastic_ip"]["allocation_id"] is None
    out = io.StringIO()
    assert main(["--config", str(conf), "status"], out=out, err=err, now=lambda: NOW) == 0
    assert out.getvalue().startswith("primary: none (lease released, token 2)\nelastic ip: not configured")


def test_the_command_shows_each_masters_load_and_the_last_decisions(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = SQLiteStore(str(path))
    records = Records(store)
    records.create(attrs.evolve(MASTER, healthy=True))
    records.create(MasterRecord("master-2", "10.0.1.6", 8140, "master-2", 1.0))
    # Two lb nodes' fresh reports add up; a dead node's stale one counts for nothing.
    for node, at, requests in [("i-lb1", NOW - 5, 30), ("i-lb2", NOW - 8, 10), ("i-dead", NOW - 600, 999)]:
        records.create(LoadReportRecord(node, at, 10.0, {"master-1": {
            "requests": requests, "in_flight": 2, "jruby_size": 4, "jruby_free": 1, "agents": 12}}))
    for at, decision in [(NOW - 70, ScaleDecision(LAUNCH, "busy 1.25 >= 0.8 for 60s", 1)),
                         (NOW - 10, ScaleDecision(HOLD, "1 masters starting or warming"))]:
        write_decision(records, "i-lb1", 4, at, decision)
    store.close()
    conf = tmp_path / "puppetha.conf"
    conf.write_text(f"[store]\npath = {path}\n[pki]\nvault_key_file = {tmp_path}/vault.key\n")
    out, err = io.StringIO(), io.StringIO()
    assert main(["--config", str(conf), "status", "--json"], out=out, err=err, now=lambda: NOW) == 0
    result = json.loads(out.getvalue())
    assert [m["load"] for m in result["masters"]] == [
        # busy: 3 of 4 JRubies in use, no request waiting for one.
        {"requests": 40, "in_flight": 4, "busy": 0.75, "unavailable": 0, "queue_limit_hits": 0,
         "jruby_free": 1, "jruby_size": 4, "agents": 12},
        None,
    ]
    assert result["scaling"] == {"enabled": False, "decisions": [
        {"at": NOW - 70, "age": 70.0, "node": "i-lb1", "token": 4, "action": LAUNCH,
         "reason": "busy 1.25 >= 0.8 for 60s", "count": 1, "master": None},
        {"at": NOW - 10, "age": 10.0, "node": "i-lb1", "token": 4, "action": HOLD,
         "reason": "1 masters starting or warming", "count": 0, "master": None},
    ]}
    out = io.StringIO()
    assert main(["--config", str(conf), "status"], out=out, err=err, now=lambda: NOW) == 0
    text = out.getvalue()
    assert ("  master-1  10.0.1.5:8140  healthy\n    load: 40 requests, 4 in flight, busy 0.75, 0 503s, "
            "JRuby 1/4 free, 12 agents\n") in text
    assert "  master-2  10.0.1.6:8140  healthy\n    load: no fresh report from any lb node\n" in text
    assert text.endswith("scaling: off\n"
                         "  10s ago  i-lb1  token 4  hold: 1 masters starting or warming\n"
                         "  70s ago  i-lb1  token 4  launch 1: busy 1.25 >= 0.8 for 60s\n")


def test_the_new_records_round_trip_and_have_kinds_of_their_own(tmp_path: Path) -> None:
    from puppetha.store.records import SealedSecret
    from puppetha.store.values import validate_kind

    store = SQLiteStore(str(tmp_path / "store.sqlite"))
    records = Records(store)
    secret = SealedSecret("heartbeat", "c2VhbGVk", NOW)
    for record in (A, secret):
        records.create(record)
    assert records.get(LbNodeRecord, A.node) == Versioned(A, 1)
    assert records.get(SealedSecret, "heartbeat") == Versioned(secret, 1)
    assert {validate_kind(LbNodeRecord.KIND), validate_kind(SealedSecret.KIND)} == {"lbnode", "secret"}
    assert not {"lbnode", "secret"} & {"ca", "crl", "revoked", "claim", "node", "master", "class", "lease"}
    store.close()


def test_the_command_shows_a_drain_in_progress_since_when_and_under_which_token(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = SQLiteStore(str(path))
    records = Records(store)
    records.create(attrs.evolve(MASTER, healthy=True))
    # Marked 40 s ago by the primary under token 4; another, under token 5, whose requests ended.
    records.create(MasterRecord("master-2", "10.0.1.6", 8140, "master-2", 1.0, draining_since=NOW - 40,
                                drain_token=4))
    records.create(MasterRecord("master-3", "10.0.1.7", 8140, "master-3", 1.0, draining_since=NOW - 90,
                                drain_token=5, drained_at=NOW - 2))
    store.close()
    conf = tmp_path / "puppetha.conf"
    conf.write_text(f"[store]\npath = {path}\n[pki]\nvault_key_file = {tmp_path}/vault.key\n")
    out, err = io.StringIO(), io.StringIO()
    assert main(["--config", str(conf), "status", "--json"], out=out, err=err, now=lambda: NOW) == 0
    result = json.loads(out.getvalue())
    assert [m["draining"] for m in result["masters"]] == [
        None,
        {"since": NOW - 40, "age": 40.0, "token": 4, "drained_at": None},
        {"since": NOW - 90, "age": 90.0, "token": 5, "drained_at": NOW - 2},
    ]
    out = io.StringIO()
    assert main(["--config", str(conf), "status"], out=out, err=err, now=lambda: NOW) == 0
    text = out.getvalue()
    assert "  master-1  10.0.1.5:8140  healthy\n    load:" in text
    assert ("  master-2  10.0.1.6:8140  healthy\n"
            "    draining for 40s under token 4: out of the upstream, its requests finishing\n") in text
    assert ("  master-3  10.0.1.7:8140  healthy\n"
            "    draining for 90s under token 5: drained, to be terminated\n") in text
