"""
A crash cannot strand an instance: a real ``twistd puppetha`` is killed with SIGKILL in the middle
of a burst of enrollments (moto as AWS; the SQLite store, and DynamoDB on moto), started again, and then every
instance that has no certificate yet enrolls on its first retry, with the key it asked with.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from puppetha.aws.cloud import InstanceInfo
from puppetha.store import IStore
from puppetha.store.dynamodb import DynamoDBStore
from puppetha.store.records import EnrollmentClaim, NodeRecord, Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.aws import DEFAULT_ACCOUNT, FakeAWSSigner
from puppetha.testing.moto import ROLE_TAG, Fleet, MotoServer, client

BIN = Path(sys.executable).parent
REGION = "us-east-1"
AGENTS = 120
#: Enrollments in flight at once during the burst.
CONCURRENCY = 24
#: The daemon is killed once this many agents have their answer.
KILL_AFTER = 30
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Instance:
    """One instance's side: its key, kept for every try, and what it got."""

    def __init__(self, info: InstanceInfo, role: str, signer: FakeAWSSigner) -> None:
        self.info = info
        self.role = role
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.document, self.signature = signer.identity_for(info)
        self.certificate: x509.Certificate | None = None

    def body(self) -> bytes:
        # A new CSR on every try, as puppetha-enroll makes one: only the key stays.
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.info.instance_id)]))
               .sign(self.key, hashes.SHA256()))
        return json.dumps({
            "role": self.role, "document": self.document.decode(), "signature": self.signature,
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
        }).encode()


class Daemon:
    def __init__(self, state: Path, moto: MotoServer, trust_file: Path, backend: str) -> None:
        self.state = state
        self.port = free_port()
        self.log = state / "daemon.log"
        self.backend = backend
        self.table = f"puppetha-crash-{os.getpid()}-{self.port}"
        self.endpoint_url = moto.endpoint_url
        self.conf = state / "puppetha.conf"
        vault = ""
        if backend == "dynamodb":
            # A shared store holds CA keys sealed by KMS only.
            kms = client("kms", moto.endpoint_url, REGION)
            vault = f"vault = kms\nkms_key_id = {kms.create_key()['KeyMetadata']['KeyId']}\n"
        self.conf.write_text(
            f"[pki]\n{vault}"
            f"[daemon]\nstate_dir = {state / 'daemon'}\nroles = enroll\n"
            f"[store]\nbackend = {backend}\ntable = {self.table}\n"
            f"[aws]\nendpoint_url = {moto.endpoint_url}\naccounts = {DEFAULT_ACCOUNT}\n"
            f"identity_certs = {trust_file}\n"
            f"[enroll]\nlisten = tcp:{self.port}:interface=127.0.0.1\nserver_names = 127.0.0.1\n"
            f"front = puppet.example.net:8140\nmaster_policy = tag:{ROLE_TAG}=master\n"
            # Every instance here connects from 127.0.0.1, not from its private IP in moto's VPC.
            "require_source_match = false\n"
            f"[enc]\nsocket = {state / 'enc.sock'}\n"
        )
        self.command = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile", str(self.log),
                        "puppetha", "--config", str(self.conf)]
        self.process: subprocess.Popen[bytes] | None = None
        if backend == "dynamodb":
            subprocess.run([str(BIN / "puppetha"), "--config", str(self.conf), "store", "init"],
                           env={**os.environ, **MOTO_ENV}, check=True, capture_output=True)

    def open_store(self) -> IStore:
        if self.backend == "dynamodb":
            return DynamoDBStore(self.table, REGION, self.endpoint_url)
        return SQLiteStore(str(self.state / "daemon" / "puppetha.sqlite"))

    def start(self) -> None:
        self.log.unlink(missing_ok=True)
        self.process = subprocess.Popen(self.command, env={**os.environ, **MOTO_ENV})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.log.exists() and "puppetha started" in self.log.read_text():
                return
            assert self.process.poll() is None, f"the daemon stopped: {self.log.read_text()}"
            time.sleep(0.1)
        raise AssertionError(f"the daemon did not start: {self.log.read_text()}")

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def root(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as raw, \
                context.wrap_socket(raw) as tls:
            tls.sendall(b"GET /v1/ca HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = _read_all(tls)
        bundle = answer.split(b"\r\n\r\n", 1)[1]
        pinned = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.load_verify_locations(cadata=bundle.decode())
        return pinned

    def enroll(self, context: ssl.SSLContext, instance: Instance) -> tuple[int, dict[str, str]]:
        body = instance.body()
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(
                b"POST /v1/enroll HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            answer = _read_all(tls)
        head, _, content = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"chunked" in head.lower():
            content = _unchunk(content)
        return status, json.loads(content)


def _read_all(tls: ssl.SSLSocket) -> bytes:
    answer = b""
    while chunk := tls.recv(65536):
        answer += chunk
    return answer


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            break
        out += rest[:length]
        data = rest[length + 2:]
    return out


def launch_agents(fleet: Fleet, count: int) -> list[InstanceInfo]:
    from puppetha.aws.boto import Boto3Cloud

    ids: list[str] = []
    while len(ids) < count:
        batch = min(100, count - len(ids))
        answer = fleet.ec2.run_instances(
            ImageId="ami-0123456789abcdef0", InstanceType="t3.micro", MinCount=batch, MaxCount=batch,
            SubnetId=fleet.subnet_id,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": ROLE_TAG, "Value": "agent"}]}],
        )
        ids += [i["InstanceId"] for i in answer["Instances"]]
    # The test's own look-up of a whole burst, not the daemon's: it may take its time on a busy box.
    cloud = Boto3Cloud(fleet.endpoint_url, access_key_id="testing", secret_access_key="testing", deadline=60)
    found = cloud.describe_instances(REGION, ids)
    return [found[i] for i in ids]


@pytest.fixture(params=["sqlite", "dynamodb"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Daemon, Fleet, FakeAWSSigner]]:
    with pytest.MonkeyPatch.context() as env:
        for name, value in MOTO_ENV.items():
            env.setenv(name, value)
        with MotoServer() as moto:
            signer = FakeAWSSigner.create(REGION)
            daemon = Daemon(tmp_path, moto, signer.write_trust_file(tmp_path / "aws"), request.param)
            try:
                yield daemon, Fleet(moto.endpoint_url, REGION), signer
            finally:
                daemon.stop()


def certificate_for(instance: Instance, answer: dict[str, str]) -> x509.Certificate:
    certificate = x509.load_pem_x509_certificate(answer["certificate"].encode())
    assert certificate.public_key() == instance.key.public_key()
    return certificate


def test_after_a_kill_9_in_a_burst_every_instance_enrolls_on_its_first_retry(world) -> None:
    daemon, fleet, signer = world
    daemon.start()
    master = Instance(fleet.launch("master"), "master", signer)
    agents = [Instance(info, "agent", signer) for info in launch_agents(fleet, AGENTS)]
    context = daemon.root()
    status, answer = daemon.enroll(context, master)
    assert status == 200, answer

    answered = 0
    lock = threading.Lock()
    killed = threading.Event()

    def burst(instance: Instance) -> None:
        nonlocal answered
        if killed.is_set():
            return
        try:
            status, answer = daemon.enroll(context, instance)
        except (OSError, ValueError, IndexError):
            return  # the daemon died under this request: its answer is lost
        if status == 200:
            instance.certificate = certificate_for(instance, answer)
            with lock:
                answered += 1
                if answered == KILL_AFTER and not killed.is_set():
                    killed.set()
                    daemon.kill()

    with ThreadPoolExecutor(max_workers=CONCURRENCY) as clients:
        list(clients.map(burst, agents))
    assert killed.is_set(), "the daemon was not killed during the burst"
    stranded = [a for a in agents if a.certificate is None]

    # What the kill left behind: claims without an answer that reached their instance.
    store = daemon.open_store()
    try:
        records = Records(store)
        claims = {c.record.instance_id: c.record for c in records.list(EnrollmentClaim)}
        lost = [a for a in stranded if a.info.instance_id in claims]
        unfinished = [a for a in lost if claims[a.info.instance_id].state == "claimed"]
    finally:
        store.close()
    assert stranded, "the kill left every instance with its answer: the burst proved nothing"
    # An agent's claim is created already issued, in the transaction that records it: a kill
    # leaves either nothing or an issued claim, never one left claimed.
    assert not unfinished, f"the kill left {len(unfinished)} agent claims unfinished"

    daemon.start()
    first_retry = {a.info.instance_id: daemon.enroll(context, a) for a in stranded}
    refused = {i: (s, a) for i, (s, a) in first_retry.items() if s != 200}
    assert not refused, (
        f"{len(refused)} of {len(stranded)} instances were refused on their first retry "
        f"({len(lost)} with a claim left by the kill, {len(unfinished)} of them unfinished): "
        f"{list(refused.values())[:3]}"
    )
    for agent in stranded:
        agent.certificate = certificate_for(agent, first_retry[agent.info.instance_id][1])
    # Those that had their answer get the same certificate again; nothing was issued twice.
    for agent in agents[:5]:
        if agent not in stranded:
            status, answer = daemon.enroll(context, agent)
            assert status == 200
            assert certificate_for(agent, answer) == agent.certificate
    store = daemon.open_store()
    try:
        nodes = {n.record.instance_id: n.record for n in Records(store).list(NodeRecord)}
    finally:
        store.close()
    for agent in agents:
        assert agent.certificate is not None
        assert nodes[agent.info.instance_id].serial == agent.certificate.serial_number
        assert len(nodes[agent.info.instance_id].certificates) == 1
    print(f"{daemon.backend}: burst of {AGENTS}: killed after {KILL_AFTER} answers; "
          f"{len(stranded)} without an answer, "
          f"{len(lost)} of them with a claim ({len(unfinished)} unfinished); all enrolled on the first retry")
