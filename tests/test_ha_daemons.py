"""
Two real ``twistd puppetha`` lb daemons on loopback, each with its own real nginx, sharing one
store, with a moto server as AWS: kill -9 the primary and the standby takes the lease and the
Elastic IP (as moto says); SIGTERM the new primary and the restarted node takes over at once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from puppetha.aws.kms import KmsKeyVault
from puppetha.ha.heartbeat import Heartbeat, encode
from puppetha.store.dynamodb import DynamoDBStore
from puppetha.store.records import LbNodeRecord, LeaseRecord, Records
from puppetha.testing.acting import overlaps, read_events, stray_associations, windows
from puppetha.testing.lb_daemon import LbNode, eventually
from puppetha.testing.moto import TEST_CREDENTIALS, Fleet, MotoServer, client
from puppetha.testing.nginx import FrontPKI, require_nginx
from tests.aws_fixtures import moto_with_test_credentials

REGION = "us-east-1"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with moto_with_test_credentials() as server:
        yield server


@pytest.mark.parametrize("backend", ["sqlite", "dynamodb"])
def test_kill_9_moves_the_address_and_sigterm_hands_over_at_once(
    tmp_path: Path, moto: MotoServer, backend: str
) -> None:
    require_nginx()
    fleet = Fleet(moto.endpoint_url, REGION)
    allocation = fleet.allocate_address()
    instances = [fleet.launch("lb").instance_id for _ in range(2)]
    if backend == "sqlite":
        pki = FrontPKI(tmp_path / "pki")
        shared = {"store.path": str(tmp_path / "pki" / "store.sqlite"),
                  "pki.vault_key_file": str(tmp_path / "pki" / "vault.key")}
    else:
        table = f"puppetha-ha-{uuid.uuid4().hex[:8]}"
        store = DynamoDBStore(table, REGION, moto.endpoint_url)
        store.create_table(deletion_protection=False)
        key_id = str(client("kms", moto.endpoint_url, REGION).create_key()["KeyMetadata"]["KeyId"])
        pki = FrontPKI(tmp_path / "pki", store=store,
                       vault=KmsKeyVault(key_id=key_id, region=REGION, endpoint_url=moto.endpoint_url))
        shared = {"store.backend": "dynamodb", "store.table": table, "pki.vault": "kms",
                  "pki.kms_key_id": key_id}
    pki.add_ca("lb")
    common = {
        "daemon.roles": "lb",
        **shared,
        "enroll.front": "puppet:8140",
        "aws.endpoint_url": moto.endpoint_url,
        "aws.region": REGION,
        "lb.interval": "1s",
        "lb.health_interval": "1s",
        "ha.elastic_ip": allocation,
    }
    env = {**os.environ, "AWS_ACCESS_KEY_ID": TEST_CREDENTIALS["aws_access_key_id"],
           "AWS_SECRET_ACCESS_KEY": TEST_CREDENTIALS["aws_secret_access_key"]}

    def lb_node(name: str, instance_id: str) -> LbNode:
        issued = pki.leaf("lb", name, sans=["puppet"], usage="both")
        return LbNode(name, instance_id, tmp_path, common, certificate=issued.certificate,
                      private_key=issued.private_key, env=env)

    a = lb_node("lb-a", instances[0])
    b = lb_node("lb-b", instances[1])
    logs = [a.log, b.log]

    def owner() -> str | None:
        found = fleet.ec2.describe_addresses(AllocationIds=[allocation])["Addresses"][0]
        return str(found["InstanceId"]) if found.get("InstanceId") else None

    def lease() -> LeaseRecord:
        stored = Records(pki.store).get(LeaseRecord, "lb-primary")
        assert stored is not None
        return stored.record

    conf = tmp_path / "cli.conf"
    sections: dict[str, list[str]] = {}
    for name, value in {**shared, "aws.endpoint_url": moto.endpoint_url, "aws.region": REGION,
                        "ha.elastic_ip": allocation}.items():
        section, option = name.split(".")
        sections.setdefault(section, []).append(f"{option} = {value}")
    conf.write_text("".join(f"[{section}]\n" + "\n".join(lines) + "\n"
                            for section, lines in sections.items()))

    def status() -> dict[str, Any]:
        # Its own process, as an operator runs it.  (A second SQLiteStore in this process would
        # open and close the file beside the first one's connection, and POSIX drops every lock
        # this process holds on a file when any descriptor of it closes.)
        command = [sys.executable, "-m", "puppetha.cli", "--config", str(conf), "status", "--json"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def states() -> dict[str, str]:
        return {n["node"]: n["state"] for n in status()["lb_nodes"]}

    try:
        a.start()
        a.start_nginx()
        eventually(lambda: owner() == a.instance_id, "the first node holding the address", logs)
        b.start()
        b.start_nginx()
        # The standby hears the primary: its record says so.
        def hears(node: LbNode, other: LbNode, since: float = 0.0) -> bool:
            stored = Records(pki.store).get(LbNodeRecord, node.instance_id)
            return (stored is not None and stored.record.updated_at > since
                    and other.instance_id in stored.record.heard)
        eventually(lambda: hears(b, a), "the standby hearing the primary", logs)
        time.sleep(2)  # a few renewals: the standby must not take over from a live primary
        # (Token numbers are not asserted exactly: on a loaded machine a primary may miss its
        # window and take its own lease back under the next token.  Who holds it is asserted.)
        assert owner() == a.instance_id
        assert lease().holder == a.instance_id
        eventually(lambda: states() == {a.instance_id: "primary", b.instance_id: "standby"},
                   "status showing a primary and a standby", logs)
        before = status()
        assert before["primary"] == a.instance_id
        assert before["elastic_ip"]["owner"] == a.instance_id
        assert before["elastic_ip"]["agrees_with_lease"] is True
        assert [n["node"] for n in before["lb_nodes"]] == sorted([a.instance_id, b.instance_id])
        assert all(n["heartbeat_age"] is not None for n in before["lb_nodes"])

        # An attacker on the network forges the primary's "stopped" (wrong key) and sends garbage
        # to the standby: both are dropped and logged, and nothing changes hands.  (Even a
        # heartbeat it believed would only make it look at the lease: the lease decides.)
        forged = encode(b"not the fleet's key, guessed....", Heartbeat(
            a.instance_id, time.time_ns(), 1, time.time(), "stopped", 99, "", 7946))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            for datagram in (forged, b"\x00" * 64, b"PHA1" + b"x" * 40):
                attacker.sendto(datagram, ("127.0.0.1", int(b.settings["ha.heartbeat_port"])))
        eventually(lambda: "ignored a heartbeat from 127.0.0.1: bad HMAC" in b.log.read_text(),
                   "the forged heartbeat refused", logs)
        time.sleep(1.5)  # longer than a lapse
        assert lease().holder == a.instance_id
        assert owner() == a.instance_id

        a_tokens = {t for (node, t) in windows(a.events()) if node == a.instance_id}
        a.signal(signal.SIGKILL)
        eventually(lambda: owner() == b.instance_id, "the standby taking the address after kill -9", logs)
        assert lease().holder == b.instance_id
        b_associated = [e["token"] for e in b.events() if e["event"] == "associate"]
        assert b_associated
        assert min(b_associated) > max(a_tokens)  # fenced: a newer token than any the dead node had

        # The killed node comes back as a standby and leaves the address where it is.
        restarted = time.time()
        a.start()
        # Its record from before the kill still says it heard b: wait for a fresh one.
        eventually(lambda: hears(a, b, since=restarted), "the restarted node hearing the primary", logs)
        assert owner() == b.instance_id

        assert b.signal(signal.SIGTERM) in (0, -signal.SIGTERM)  # twistd re-raises it once stopped
        released = re.findall(r"released the lease \(token (\d+)\)", b.log.read_text())
        assert released, b.log.read_text()
        eventually(lambda: owner() == a.instance_id, "the handover after SIGTERM", logs)
        # Taken because it was released, not because it lapsed: the handover is immediate.
        assert f"token {released[-1]} was released" in a.log.read_text()
        assert lease().holder == a.instance_id
        assert lease().token > int(released[-1])
        eventually(lambda: states() == {a.instance_id: "primary", b.instance_id: "stopped"},
                   "status after the handover", logs)
        after = status()
        assert after["primary"] == a.instance_id
        assert after["elastic_ip"]["owner"] == a.instance_id
    finally:
        a.stop_all()
        b.stop_all()
        pki.close()
    for log in logs:
        assert "Traceback" not in log.read_text()
    # Neither node acted outside its windows, and the windows never overlapped.
    events = read_events(a.acting_log, b.acting_log)
    assert {node for node, _ in windows(events)} == {a.instance_id, b.instance_id}
    assert overlaps(windows(events)) == []
    assert stray_associations(events) == []
