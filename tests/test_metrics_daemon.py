"""
``GET /metrics`` of a running ``twistd puppetha`` (enroll and enc roles, its SQLite store, a moto
server as AWS), scraped over HTTP after real enrollments and ENC calls and parsed with
Prometheus's own parser; and the daemon refusing a bad ``[metrics] listen`` in one line.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from puppetha.ha.autoscale import ScaleActionRecord
from puppetha.store.records import LeaseRecord, Records
from puppetha.testing.aws import FakeAWSSigner
from puppetha.testing.lb_daemon import LbNode, eventually
from puppetha.testing.moto import TEST_CREDENTIALS, Fleet, MotoServer
from puppetha.testing.nginx import FrontPKI, require_nginx

# The fixtures' own assertions are rewritten wherever they are first imported.
pytest.register_assert_rewrite("tests.fault_fixtures", "tests.enroll_fixtures")

from tests.aws_fixtures import boto_test_credentials  # noqa: E402
from tests.fault_fixtures import TWISTD, Daemon, fleet, free_port, moto, signer  # noqa: E402, F401 - fixtures


@pytest.fixture
def daemon(tmp_path: Path, moto: MotoServer, signer: FakeAWSSigner) -> Iterator[Daemon]:  # noqa: F811
    port = free_port()
    with boto_test_credentials():
        d = Daemon(tmp_path, moto.endpoint_url, signer,
                   extra=f"[metrics]\nlisten = tcp:{port}:interface=127.0.0.1\n")
        d.metrics_port = port  # type: ignore[attr-defined]
        d.start()
        try:
            yield d
        finally:
            d.stop()


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path)
        answer = connection.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        connection.close()


def scrape(port: int) -> dict[str, Any]:
    """Family name -> {labels as a sorted tuple -> value}, sample by sample."""
    status, headers, body = get(port, "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    found: dict[str, Any] = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.documentation, f"{family.name} has no HELP"
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_a_scrape_after_real_enrollments_and_enc_calls(daemon: Daemon, fleet: Fleet) -> None:  # noqa: F811
    port: int = daemon.metrics_port  # type: ignore[attr-defined]
    master = fleet.launch("master")
    agents = [fleet.launch("agent") for _ in range(3)]
    assert daemon.enroll(agents[0]).error == "no-master"
    assert daemon.enroll(master, role="master").status == 200
    for agent in agents:
        assert daemon.enroll(agent).status == 200
    assert daemon.enroll(agents[0]).error == "already-enrolled"  # another key for the same claim
    assert daemon.request("POST", "/v1/enroll", {"role": "agent"}).error == "missing-field"
    for agent in agents:
        assert daemon.classify(agent.instance_id).startswith(b"OK ")
    assert daemon.classify("i-0000000000000dead").startswith(b"ERR unknown-node ")
    # What a primary and its scaling would have written (another process, the same store).
    store, records = daemon.records()
    try:
        records.create(LeaseRecord("lb-primary", "i-0aaaaaaaaaaaaaaa1", token=7, duration=0.8,
                                   renewed_at=1.0))
        records.create(ScaleActionRecord("000000000007-000001", "launch", 7, 1.0, "busy", 2,
                                         ("i-0bbbbbbbbbbbbbbb1", "i-0bbbbbbbbbbbbbbb2")))
    finally:
        store.close()

    found = scrape(port)
    assert found["puppetha_enrollments_total"] == {
        (("role", "agent"),): 3, (("role", "master"),): 1, (("role", "lb"),): 0}
    assert found["puppetha_enrollment_refusals_total"] == {
        (("reason", "already-enrolled"),): 1, (("reason", "missing-field"),): 1,
        (("reason", "no-master"),): 1}
    assert found["puppetha_enc_requests_total"] == {(("outcome", "ok"),): 3,
                                                    (("outcome", "unknown-node"),): 1}
    assert found["puppetha_enc_request_duration_seconds_count"][()] == 4
    assert found["puppetha_enc_request_duration_seconds_bucket"][(("le", "+Inf"),)] == 4
    # Each within the client's patience (15 s).
    assert 0 < found["puppetha_enc_request_duration_seconds_sum"][()] < 4 * 15
    # A CRL for the root and for the master's CA, each fresh and good for years.
    ages = found["puppetha_crl_age_seconds"]
    assert {labels[0][1] for labels in ages} >= {"root", master.instance_id}
    for labels, age in ages.items():
        assert 0 <= age < 3600, labels
        assert found["puppetha_crl_next_update_seconds"][labels] > 365 * 86400
    assert found["puppetha_master_healthy"] == {(("master", master.instance_id),): 1}
    assert found["puppetha_lease_token"] == {(): 7}
    assert found["puppetha_lease_holder_info"] == {(("holder", "i-0aaaaaaaaaaaaaaa1"),): 1}
    assert found["puppetha_scale_actions_total"] == {(("action", "launch"),): 1}
    assert found["puppetha_scale_instances_total"] == {(("action", "launch"),): 2}
    # The heap the daemon held once started is out of the collector's passes (puppetha/heap.py);
    # the settling's own full pass is the first of the pauses.
    assert found["puppetha_gc_settled_objects"][()] > 10_000
    assert found["puppetha_gc_collections_total"][(("generation", "2"),)] >= 1
    assert found["puppetha_gc_pause_seconds_count"][()] >= 1
    # No load sampler and no failover on this daemon: those families are not there.
    assert not {"puppetha_master_requests", "puppetha_heartbeat_age_seconds",
                "puppetha_primary"} & set(found)
    # The figures come from the live services: a second scrape sees a new ENC answer.
    assert daemon.classify(agents[0].instance_id).startswith(b"OK ")
    assert scrape(port)["puppetha_enc_requests_total"][(("outcome", "ok"),)] == 4


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/", 404, "not-found"),
    ("GET", "/v1/health", 404, "not-found"),
    ("POST", "/metrics", 405, "method-not-allowed"),
    ("PUT", "/metrics", 405, "method-not-allowed"),
])
def test_other_paths_and_methods_get_json_errors(daemon: Daemon, method: str, path: str, status: int,
                                                 code: str) -> None:
    answer, headers, body = get(daemon.metrics_port, path, method)  # type: ignore[attr-defined]
    assert (answer, headers["content-type"]) == (status, "application/json")
    assert json.loads(body)["error"] == code


def start_refused(tmp_path: Path, listen: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "puppetha", "--state-dir", str(tmp_path / "state"),
         "--set", f"enc.socket={tmp_path}/enc.sock",
         "--set", f"enroll.listen=tcp:{free_port()}:interface=127.0.0.1",
         "--set", f"metrics.listen={listen}"],
        capture_output=True, text=True, timeout=60, check=False)


def test_a_listen_without_an_interface_stops_the_daemon_in_one_line(tmp_path: Path) -> None:
    run = start_refused(tmp_path, "tcp:9464")
    assert run.returncode != 0
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert lines == ["puppetha: <embedded defaults>: [metrics] listen: 'tcp:9464': name the interface "
                     "(interface=127.0.0.1 for this host only): the figures describe the fleet, and "
                     "without one every address listens"], run.stdout + run.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was made


def test_a_port_in_use_stops_the_daemon_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = start_refused(tmp_path, f"tcp:{port}:interface=127.0.0.1")
    assert run.returncode != 0
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert lines[-1] == (f"puppetha: [metrics] listen: cannot listen on tcp:{port}:interface=127.0.0.1: "
                         "Address already in use"), run.stdout + run.stderr
    assert not any("Traceback" in line for line in lines)
    assert not (tmp_path / "enc.sock").exists()  # the ENC socket opened before it is closed again


def test_two_lb_nodes_report_the_primary_the_lease_and_each_others_heartbeats(
    tmp_path: Path, moto: MotoServer, fleet: Fleet  # noqa: F811
) -> None:
    require_nginx()
    allocation = fleet.allocate_address()
    instances = [fleet.launch("lb").instance_id for _ in range(2)]
    pki = FrontPKI(tmp_path / "pki")
    pki.add_ca("lb")
    common = {
        "daemon.roles": "lb",
        "store.path": str(tmp_path / "pki" / "store.sqlite"),
        "pki.vault_key_file": str(tmp_path / "pki" / "vault.key"),
        "enroll.front": "puppet:8140",
        "aws.endpoint_url": moto.endpoint_url,
        "aws.region": "us-east-1",
        "lb.interval": "1s",
        "lb.health_interval": "1s",
        "ha.elastic_ip": allocation,
    }
    env = {**os.environ, "AWS_ACCESS_KEY_ID": TEST_CREDENTIALS["aws_access_key_id"],
           "AWS_SECRET_ACCESS_KEY": TEST_CREDENTIALS["aws_secret_access_key"]}
    nodes = []
    for name, instance_id in zip(("lb-a", "lb-b"), instances, strict=True):
        issued = pki.leaf("lb", name, sans=["puppet"], usage="both")
        node = LbNode(name, instance_id, tmp_path, common, certificate=issued.certificate,
                      private_key=issued.private_key, env=env)
        node.settings["metrics.listen"] = f"tcp:{free_port()}:interface=127.0.0.1"
        nodes.append(node)
    a, b = nodes
    logs = [a.log, b.log]

    def port(node: LbNode) -> int:
        return int(node.settings["metrics.listen"].split(":")[1])

    def figures(node: LbNode) -> dict[str, Any]:
        try:
            return scrape(port(node))
        except ConnectionRefusedError:  # not listening yet
            return {}

    try:
        a.start()
        a.start_nginx()
        eventually(lambda: figures(a).get("puppetha_primary") == {(): 1}, "the first node primary", logs)
        b.start()
        b.start_nginx()
        peer_b, peer_a = (("peer", b.instance_id),), (("peer", a.instance_id),)
        eventually(lambda: peer_a in figures(b).get("puppetha_heartbeat_age_seconds", {})
                   and peer_b in figures(a).get("puppetha_heartbeat_age_seconds", {}),
                   "each node hearing the other", logs)
        on_a, on_b = figures(a), figures(b)
        stored = Records(pki.store).get(LeaseRecord, "lb-primary")
        assert stored is not None
    finally:
        a.stop_all()
        b.stop_all()
        pki.close()
    assert on_a["puppetha_primary"] == {(): 1}
    assert on_b["puppetha_primary"] == {(): 0}
    assert on_b["puppetha_failover_state_info"] == {(("state", "standby"),): 1}
    # Heartbeats every 0.1 s: heard well within a second (a loaded machine may lag a little).
    assert 0 <= on_a["puppetha_heartbeat_age_seconds"][peer_b] < 2
    assert 0 <= on_b["puppetha_heartbeat_age_seconds"][peer_a] < 2
    # Both read the one lease from the store: the primary holds it, under the stored token.
    for seen in (on_a, on_b):
        assert seen["puppetha_lease_holder_info"] == {(("holder", a.instance_id),): 1}
        assert seen["puppetha_lease_token"] == {(): stored.record.token}
        assert 0 <= seen["puppetha_lease_renewed_age_seconds"][()] < 5
    for log in logs:
        assert "Traceback" not in log.read_text()
