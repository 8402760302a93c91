"""
Dependencies that hang instead of refusing, and faults that must heal without a restart, made
real against the running daemon: AWS (a moto server) black-holed by a proxy that accepts and
never answers, the SQLite write lock held by another process, the store's files made immutable.
Every client here gives up when the real one does; what is checked is that the daemon answers
before that, truthfully, and is whole again once the fault ends.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from puppetha.store.dynamodb import DynamoDBStore
from puppetha.testing.aws import FakeAWSSigner
from puppetha.testing.blackhole import BlackHoleProxy
from puppetha.testing.moto import Fleet, MotoServer
from puppetha.testing.moto import client as moto_client
from tests.aws_fixtures import boto_test_credentials

pytest.register_assert_rewrite("tests.fault_fixtures")

from tests.fault_fixtures import REGION, Daemon  # noqa: E402 - after the rewrite hook

pytest_plugins = ["tests.fault_fixtures"]


def test_aws_black_holed(daemon: Daemon, proxy: BlackHoleProxy, fleet: Fleet) -> None:
    known = daemon.record_node(fleet.launch("agent"))
    assert daemon.classify(known).startswith(b"OK ")
    master = fleet.launch("master")
    daemon.health_until(lambda r: r.error == "no-master")  # AWS and the store answer

    proxy.black_holed = True
    time.sleep(2.5)  # past [enc] cache_ttl: every cached instance state is stale now
    # A known node is answered from what the daemon knows, never made to wait for AWS.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(daemon.classify, [known] * 40))
    assert [a[:3] for a in answers] == [b"OK "] * 40, answers
    # Enrollment answers 503 before puppetha-enroll gives up, and says when to come back.
    refused = daemon.enroll(master, "master")
    assert (refused.status, refused.error) == (503, "aws-unavailable")
    assert int(refused.headers["retry-after"]) > 0
    # /v1/health tells the balancer.
    down = daemon.health_until(lambda r: r.status == 503 and r.error == "aws-unavailable")
    assert down.body["checks"]["aws"] != "ok"
    assert int(down.headers["retry-after"]) > 0
    assert proxy.swallowed > 0  # the calls really went into the hole

    proxy.black_holed = False
    daemon.health_until(lambda r: r.error == "no-master")
    enrolled = daemon.enroll(master, "master")
    assert enrolled.status == 200, enrolled
    up = daemon.health_until(lambda r: r.status == 200)
    assert up.body["status"] == "ok"
    # One outage: said once when it started and once when it ended (the health checks go on).
    daemon.wait_for_log("AWS answers again")
    assert len(daemon.messages("AWS unavailable")) == 1, daemon.messages("AWS")
    assert len(daemon.messages("AWS answers again")) == 1, daemon.messages("AWS")


HOLD_LOCK = """
import sqlite3, sys, time
held = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
held.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
held.execute("ROLLBACK")
"""


def test_sqlite_write_lock_held_by_another_process(daemon: Daemon, fleet: Fleet) -> None:
    known = daemon.record_node(fleet.launch("agent"))
    assert daemon.classify(known).startswith(b"OK ")
    masters = [fleet.launch("master") for _ in range(20)]
    daemon.health_until(lambda r: r.error == "no-master")

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(daemon.store_path), "20"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        with ThreadPoolExecutor(28) as pool:
            enrolling = [pool.submit(daemon.enroll, m, "master") for m in masters]
            time.sleep(6)  # the enrollments' writes wait for the lock; known nodes' cache entries expire
            # Reads the ENC needs never queue behind the writers, and health answers at once.
            answers = list(pool.map(daemon.classify, [known] * 40))
            assert [a[:3] for a in answers] == [b"OK "] * 40, answers
            down = daemon.health_until(lambda r: r.error == "store-unavailable")
            assert down.status == 503
            refused = [f.result() for f in enrolling]
        assert {(r.status, r.error) for r in refused} == {(503, "store-unavailable")}, refused
    finally:
        holder.wait(timeout=30)
    # Nothing was claimed by the refused enrollments: each may enroll now.
    daemon.health_until(lambda r: r.error == "no-master")
    assert daemon.claims() == {}
    assert [daemon.enroll(m, "master").status for m in masters[:3]] == [200] * 3
    daemon.wait_for_log("store answers again")
    assert len(daemon.messages("store unavailable")) == 1, daemon.messages("store")
    assert len(daemon.messages("store answers again")) == 1, daemon.messages("store")


def test_store_made_read_only_heals_without_a_restart(daemon: Daemon, fleet: Fleet) -> None:
    masters = [fleet.launch("master") for _ in range(6)]
    daemon.health_until(lambda r: r.error == "no-master")
    files = [str(daemon.store_path), f"{daemon.store_path}-wal"]
    subprocess.run(["chattr", "+i", *files], check=True)
    try:
        with ThreadPoolExecutor(6) as pool:
            refused = list(pool.map(lambda m: daemon.enroll(m, "master"), masters))
        assert {(r.status, r.error) for r in refused} == {(503, "store-unavailable")}, refused
        daemon.health_until(lambda r: r.error == "store-unavailable")
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)
    daemon.health_until(lambda r: r.error == "no-master")
    # The refused enrollments left no claim behind, and every connection can write again.
    assert daemon.claims() == {}
    with ThreadPoolExecutor(6) as pool:
        enrolled = list(pool.map(lambda m: daemon.enroll(m, "master"), masters))
    assert [r.status for r in enrolled] == [200] * 6, enrolled
    assert daemon.health_until(lambda r: r.status == 200).body["status"] == "ok"


@pytest.fixture
def dynamodb_daemon(tmp_path: Path, moto: MotoServer, proxy: BlackHoleProxy,
                    signer: FakeAWSSigner) -> Iterator[Daemon]:
    """The daemon on DynamoDB with CA keys sealed by KMS, all of AWS behind the proxy."""
    table = f"faults-{proxy.port}"
    with boto_test_credentials():
        DynamoDBStore(table, REGION, moto.endpoint_url).create_table(point_in_time_recovery=False)
        key_id = moto_client("kms", moto.endpoint_url, REGION).create_key()["KeyMetadata"]["KeyId"]
        d = Daemon(tmp_path, proxy.url, signer,
                   extra=f"[store]\nbackend = dynamodb\ntable = {table}\n"
                         f"[pki]\nvault = kms\nkms_key_id = {key_id}\n",
                   open_store=lambda: DynamoDBStore(table, REGION, moto.endpoint_url))
        d.start()
        try:
            yield d
        finally:
            d.stop()


def test_dynamodb_and_kms_black_holed(dynamodb_daemon: Daemon, proxy: BlackHoleProxy,
                                      fleet: Fleet) -> None:
    daemon = dynamodb_daemon
    known = [daemon.record_node(fleet.launch("agent")) for _ in range(3)]
    assert [daemon.classify(k)[:3] for k in known] == [b"OK "] * 3
    master = fleet.launch("master")
    daemon.health_until(lambda r: r.error == "no-master")

    proxy.black_holed = True
    time.sleep(6)  # past the store's 5 s cache and [enc] cache_ttl
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(daemon.classify, known * 20))
    assert [a[:3] for a in answers] == [b"OK "] * 60, answers
    refused = daemon.enroll(master, "master")
    assert refused.status == 503, refused
    assert refused.error in ("store-unavailable", "aws-unavailable")
    down = daemon.health_until(lambda r: r.error == "store-unavailable")
    assert down.body["checks"]["aws"] != "ok"

    proxy.black_holed = False
    daemon.health_until(lambda r: r.error == "no-master")
    assert daemon.enroll(master, "master").status == 200
    assert daemon.health_until(lambda r: r.status == 200).body["checks"] == {
        "store": "ok", "aws": "ok", "master": "ok"}
