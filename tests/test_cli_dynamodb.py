"""
The operator's path to the shared store, on a moto server: `store init`, `ca init` with the CA
key sealed by KMS, `store migrate` from a one-box SQLite install, and the daemon on DynamoDB.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from puppetha.cli import main
from puppetha.testing.moto import MotoServer
from tests.test_cli import NOW, cli, enroll_by_hand

REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": REGION}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with pytest.MonkeyPatch.context() as env:
        for name, value in CREDENTIALS.items():
            env.setenv(name, value)
        with MotoServer() as server:
            yield server


@pytest.fixture
def kms_key(moto: MotoServer) -> str:
    kms = boto3.client("kms", region_name=REGION, endpoint_url=moto.endpoint_url)
    return str(kms.create_key(Description="puppetha test")["KeyMetadata"]["KeyId"])


@pytest.fixture
def shared_conf(tmp_path: Path, moto: MotoServer, kms_key: str) -> Path:
    conf = tmp_path / "shared.conf"
    conf.write_text(
        f"[daemon]\nstate_dir = {tmp_path}/shared\n"
        f"[store]\nbackend = dynamodb\ntable = puppetha-{uuid.uuid4().hex[:8]}\n"
        f"[pki]\nvault = kms\nkms_key_id = {kms_key}\n"
        f"[aws]\nendpoint_url = {moto.endpoint_url}\n"
        f"[enc]\nsocket = {tmp_path}/enc.sock\n"
        "[enroll]\nlisten = tcp:0:interface=127.0.0.1\n"
    )
    return conf


def run(conf: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(["--config", str(conf), *args], out=out, err=err, now=lambda: NOW)
    return status, out.getvalue(), err.getvalue()


def test_store_init_is_idempotent(shared_conf: Path) -> None:
    assert run(shared_conf, "store", "init")[:2] == (0, f"created DynamoDB table {table_of(shared_conf)}\n")
    status, out, _ = run(shared_conf, "store", "init")
    assert (status, out) == (0, f"already there: DynamoDB table {table_of(shared_conf)}\n")


def test_commands_before_store_init_say_so(shared_conf: Path) -> None:
    status, _, err = run(shared_conf, "node", "list")
    assert status == 1
    assert "puppetha store init" in err
    assert err.count("\n") == 1


def test_ca_on_dynamodb_with_kms(shared_conf: Path, moto: MotoServer) -> None:
    run(shared_conf, "store", "init")
    status, out, err = run(shared_conf, "ca", "init")
    assert status == 0, err
    fingerprint = out.split("fingerprint ")[1].strip()
    assert fingerprint in run(shared_conf, "ca", "show")[1]
    # No key file on this host: the CA key is sealed by KMS inside the shared table.
    assert not (shared_conf.parent / "shared" / "ca-vault.key").exists()
    dynamodb = boto3.client("dynamodb", region_name=REGION, endpoint_url=moto.endpoint_url)
    items = dynamodb.scan(TableName=table_of(shared_conf))["Items"]
    assert items
    assert not [i for i in items if "PRIVATE KEY" in str(i)]


def test_migrate_a_one_box_install_into_dynamodb(shared_conf: Path, tmp_path: Path) -> None:
    one_box = tmp_path / "one-box"
    cli(one_box, "ca", "init")
    node = enroll_by_hand(one_box)
    cli(one_box, "classify", "set", "default", "--class", "ntp")
    run(shared_conf, "store", "init")
    status, out, err = run(shared_conf, "store", "migrate", "--from", f"sqlite:{one_box}/puppetha.sqlite",
                           "--to", f"dynamodb:{table_of(shared_conf)}")
    assert status == 0, err
    assert out.startswith("copied ")
    listed = run(shared_conf, "node", "list", "--json")[1]
    assert node.certname in listed
    assert cli(one_box, "node", "list", "--json").out == listed
    shown = cli(one_box, "classify", "show", "default").out
    assert run(shared_conf, "classify", "show", "default")[1] == shown
    # Again: nothing new to copy, nothing lost.
    status, out, _ = run(shared_conf, "store", "migrate", "--from", f"sqlite:{one_box}/puppetha.sqlite",
                         "--to", f"dynamodb:{table_of(shared_conf)}")
    assert status == 0
    assert out.startswith("copied 0 records")


def test_migrate_from_a_missing_file_changes_nothing(shared_conf: Path, tmp_path: Path) -> None:
    status, _, err = run(shared_conf, "store", "migrate", "--from", f"sqlite:{tmp_path}/nope.sqlite",
                         "--to", f"dynamodb:{table_of(shared_conf)}")
    assert (status, err) == (2, f"puppetha: no SQLite store at {tmp_path}/nope.sqlite\n")
    assert not (tmp_path / "nope.sqlite").exists()


def test_the_daemon_runs_on_the_shared_store(shared_conf: Path, tmp_path: Path) -> None:
    run(shared_conf, "store", "init")
    log = tmp_path / "daemon.log"
    twistd = str(Path(sys.executable).parent / "twistd")
    with log.open("w") as out:
        daemon = subprocess.Popen(
            [twistd, "--nodaemon", "--pidfile=", "puppetha", "--config", str(shared_conf)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **CREDENTIALS})
    try:
        deadline = time.monotonic() + 60
        while "puppetha started" not in log.read_text():
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    # The root CA the daemon created is in the shared table, for every other daemon to use.
    assert "CN=puppetha Root CA" in run(shared_conf, "ca", "show")[1]


def table_of(conf: Path) -> str:
    return conf.read_text().split("table = ")[1].split()[0]
