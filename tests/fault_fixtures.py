"""
The daemon under faults: ``twistd puppetha`` as a subprocess with the enroll and enc roles, its
AWS (a moto server) behind a :class:`~puppetha.testing.blackhole.BlackHoleProxy`, its SQLite
store in a temporary directory, and clients that give up when the real ones do
(``puppetha-enroll`` after 30 s, ``puppetha-enc`` after 15 s).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import define

from puppetha.aws.cloud import InstanceInfo
from puppetha.enc.script import TIMEOUT as ENC_CLIENT_TIMEOUT
from puppetha.enc.script import classify
from puppetha.instance.options import DEFAULT_TIMEOUT as ENROLL_CLIENT_TIMEOUT
from puppetha.store import IStore
from puppetha.store.records import NodeRecord, Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.aws import DEFAULT_ACCOUNT, FakeAWSSigner
from puppetha.testing.blackhole import BlackHoleProxy
from puppetha.testing.moto import ROLE_TAG, Fleet, MotoServer
from tests.aws_fixtures import boto_test_credentials
from tests.enroll_fixtures import make_csr

REGION = "us-east-1"
TWISTD = str(Path(sys.executable).parent / "twistd")
CLI = [sys.executable, "-m", "puppetha.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@define
class Reply:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def error(self) -> str:
        return str(self.body.get("error", ""))


class Daemon:
    """One ``twistd -n puppetha`` with the enroll and enc roles; JSON log in ``log``."""

    def __init__(self, tmp: Path, aws_url: str, signer: FakeAWSSigner, extra: str = "",
                 open_store: Callable[[], IStore] | None = None) -> None:
        """``extra``: more sections for the configuration; ``open_store``: the store as another
        process opens it (by default the daemon's SQLite file)."""
        self.tmp = tmp
        self.state = tmp / "state"
        self.store_path = self.state / "puppetha.sqlite"
        self.socket = tmp / "enc.sock"
        self.port = free_port()
        self.log = tmp / "daemon.log"
        trust = signer.write_trust_file(tmp / "trust")
        self.config = tmp / "puppetha.conf"
        self.config.write_text(
            f"[daemon]\nroles = enroll, enc\nstate_dir = {self.state}\n"
            f"[aws]\nendpoint_url = {aws_url}\naccounts = {DEFAULT_ACCOUNT}\nidentity_certs = {trust}\n"
            f"[enroll]\nlisten = tcp:{self.port}:interface=127.0.0.1\nrequire_source_match = false\n"
            f"master_policy = tag:{ROLE_TAG}=master\nhealth_interval = 1s\n"
            f"[enc]\nsocket = {self.socket}\ncache_ttl = 2s\n{extra}"
        )
        self.signer = signer
        self.open_store = open_store or (lambda: SQLiteStore(str(self.store_path)))
        self.process: subprocess.Popen[bytes] | None = None
        self.root_pem = ""

    def start(self) -> Daemon:
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [TWISTD, "--nodaemon", "--pidfile=", "--logger", "puppetha.logs.json_observer",
                 "puppetha", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT)
        try:
            self.wait_for_log("puppetha started")
            self.root_pem = subprocess.run([*CLI, "--config", str(self.config), "ca", "show", "--pem"],
                                           capture_output=True, text=True, check=True).stdout
        except BaseException:
            self.stop()  # never leave a daemon behind a failed start
            raise
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def messages(self, start: str) -> list[str]:
        return [e["message"] for e in self.events() if e["message"].startswith(start)]

    def wait_for_log(self, text: str, tries: int = 600) -> None:
        for _ in range(tries):
            if self.log.exists() and text in self.log.read_text():
                return
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never logged:\n{self.log.read_text()[-3000:]}")

    # -- clients, with the real clients' patience

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                timeout: float = ENROLL_CLIENT_TIMEOUT) -> Reply:
        context = ssl.create_default_context(cadata=self.root_pem)
        context.check_hostname = False
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if body is not None else {}
            connection.request(method, path, body=data, headers=headers)
            answer = connection.getresponse()
            payload = answer.read()
            return Reply(answer.status, {k.lower(): v for k, v in answer.getheaders()},
                         json.loads(payload) if payload.strip() else {})
        finally:
            connection.close()

    def enroll(self, instance: InstanceInfo, role: str = "agent") -> Reply:
        document, signature = self.signer.identity_for(instance)
        body = {"role": role, "document": document.decode(), "signature": signature,
                "csr": make_csr(instance.instance_id).decode()}
        return self.request("POST", "/v1/enroll", body)

    def health(self, timeout: float = 3.0) -> Reply:
        return self.request("GET", "/v1/health", timeout=timeout)

    def health_until(self, predicate: Any, tries: int = 40) -> Reply:
        """Probes (as a balancer does, once a second) until ``predicate(reply)``."""
        reply = self.health()
        for _ in range(tries):
            if predicate(reply):
                return reply
            time.sleep(0.5)
            reply = self.health()
        raise AssertionError(f"health never got there; last {reply}")

    def classify(self, certname: str) -> bytes:
        return classify(str(self.socket), certname, timeout=ENC_CLIENT_TIMEOUT)

    def records(self) -> tuple[IStore, Records]:
        store = self.open_store()
        return store, Records(store)

    def record_node(self, instance: InstanceInfo) -> str:
        """An agent enrolled earlier: its node record, written as another process would."""
        store, records = self.records()
        try:
            records.create(NodeRecord(
                certname=instance.instance_id, instance_id=instance.instance_id, role="agent",
                account=instance.account, region=REGION, private_ip=instance.private_ip, serial=1,
                issuer="root", certificate_pem="", enrolled_at=0.0, not_after=1e12))
        finally:
            store.close()
        return instance.instance_id

    def claims(self) -> dict[str, str]:
        store, _ = self.records()
        try:
            return {item.key: str(item.value.get("state")) for item in store.list("claim")}
        finally:
            store.close()


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with boto_test_credentials(), MotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def fleet(moto: MotoServer) -> Fleet:
    return Fleet(moto.endpoint_url, REGION)


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[BlackHoleProxy]:
    with BlackHoleProxy("127.0.0.1", moto.port) as p:
        yield p


@pytest.fixture(scope="module")
def signer() -> FakeAWSSigner:
    return FakeAWSSigner.create(REGION)


@pytest.fixture
def daemon(tmp_path: Path, proxy: BlackHoleProxy, signer: FakeAWSSigner) -> Iterator[Daemon]:
    with boto_test_credentials():
        d = Daemon(tmp_path, proxy.url, signer).start()
        try:
            yield d
        finally:
            d.stop()
