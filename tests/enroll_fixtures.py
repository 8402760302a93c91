"""
The enrollment service assembled from real parts for tests: a moto server as AWS, the test
"AWS" signer, a SQLite store in a temporary directory, the real certificate authority with a
file vault, and the HTTP resource driven in memory with ``treq.testing.StubTreq``.

Blocking calls run inline (:class:`InlinePool`), so a test is deterministic and never needs a
running reactor; the turn that gathers a DescribeInstances batch ends on a ``task.Clock``.  The real thread
pool and network are exercised by ``tests/test_enroll_listener.py``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from attrs import define, field
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from zope.interface import implementer

from puppetha.aws.boto import Boto3Cloud
from puppetha.aws.cloud import InstanceInfo
from puppetha.enroll.api import enrollment_resource
from puppetha.enroll.policy import EnrollmentPolicy
from puppetha.enroll.service import Enrollment, EnrollmentTimeline
from puppetha.ha.nginx import FrontPorts
from puppetha.pki.authority import CertificateAuthority
from puppetha.pki.keys import KeyType
from puppetha.pki.vault import FileKeyVault
from puppetha.store import IStore, StoreUnavailable
from puppetha.store.records import Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.aws import DEFAULT_ACCOUNT, FakeAWSSigner
from puppetha.testing.moto import ROLE_TAG, TEST_CREDENTIALS, Fleet, MotoServer
from puppetha.threads import Blocking

REGION = "us-east-1"
FRONT = "puppet.example.net:8140"
KINDS = ("ca", "crl", "revoked", "claim", "node", "master", "class", "lease")
MASTER_RULE = f"tag:{ROLE_TAG}=master"
LB_RULE = "sg:lb-nodes"


# -- running blocking calls inline --------------------------------------------------------


class InlinePool(ThreadPool):
    """A "pool" that runs each call at once on the calling thread."""

    def callInThreadWithCallback(self, onResult, func, *args, **kwargs):
        try:
            result = func(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


@implementer(IReactorFromThreads)
class InlineReactor:
    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        callable(*args, **kwargs)


def inline(target: Any) -> Blocking[Any]:
    return Blocking(InlineReactor(), InlinePool(), target)


# -- counting what is issued ----------------------------------------------------------------


class CountingAuthority(CertificateAuthority):
    """The real authority, counting the certificates it signs (for "nothing was issued")."""

    issued = 0

    def issue(self, *args: Any, **kwargs: Any) -> x509.Certificate:
        cert = super().issue(*args, **kwargs)
        self.issued += 1
        return cert


def make_authority(records: Records, directory: Path, clock: Clock) -> CountingAuthority:
    authority = CountingAuthority(
        records,
        FileKeyVault.create(directory / "vault.key"),
        key_type=KeyType.EC_P256,
        now=clock.seconds,
        ca_lifetime=timedelta(days=3650),
        cert_lifetime=timedelta(days=365),
        crl_lifetime=timedelta(days=7),
    )
    authority.ensure_root("puppetha test root")
    return authority


@implementer(IStore)
class SwitchableStore:
    """The real store, behind a switch that makes every call fail as an unreachable backend would."""

    def __init__(self, inner: IStore) -> None:
        self.inner = inner
        self.down = False

    @classmethod
    def wrapping(cls, inner: IStore) -> SwitchableStore:
        return cls(inner)

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("the store is switched off")

    def get(self, kind: str, key: str) -> Any:
        self._check()
        return self.inner.get(kind, key)

    def create(self, kind: str, key: str, value: Any) -> Any:
        self._check()
        return self.inner.create(kind, key, value)

    def replace(self, kind: str, key: str, value: Any, expected_version: int) -> Any:
        self._check()
        return self.inner.replace(kind, key, value, expected_version)

    def delete(self, kind: str, key: str, expected_version: int | None = None) -> bool:
        self._check()
        return self.inner.delete(kind, key, expected_version)

    def list(self, kind: str, prefix: str = "") -> Any:
        self._check()
        return self.inner.list(kind, prefix)

    def transact(self, writes: Any) -> None:
        self._check()
        self.inner.transact(writes)

    def close(self) -> None:
        self.inner.close()


def snapshot(store: IStore) -> dict[str, list[tuple[str, int]]]:
    """Every item of every kind, by key and version."""
    return {kind: [(i.key, i.version) for i in store.list(kind)] for kind in KINDS}


# -- a source address for in-memory requests ------------------------------------------------


class FromSource(Resource):
    """Gives every request the client address ``source[0]`` (StubTreq's peer is 127.0.0.1)."""

    def __init__(self, inner: IResource, source: list[str]) -> None:
        super().__init__()
        self.inner = inner
        self.source = source

    isLeaf = True

    def render(self, request: Request) -> Any:
        request.client = IPv4Address("TCP", self.source[0], 40123)
        return self.inner.render(request)


# -- keys, CSRs -----------------------------------------------------------------------------


def make_csr(
    certname: str,
    key: Any = None,
    sans: Sequence[x509.GeneralName] = (),
    ca: bool = False,
    extensions: Sequence[x509.ExtensionType] = (),
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, certname)])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def weak_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point


# -- the world --------------------------------------------------------------------------------


@define
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        return str(self.json["error"])


@define
class World:
    moto: MotoServer
    fleet: Fleet
    signer: FakeAWSSigner
    store: IStore
    records: Records
    authority: CountingAuthority
    clock: Clock
    policy: EnrollmentPolicy
    enrollment: Enrollment
    source: list[str]
    treq: StubTreq
    tmp: Path
    cloud: Boto3Cloud
    launched: list[InstanceInfo] = field(factory=list)

    def launch(self, role: str = "agent", **kwargs: Any) -> InstanceInfo:
        instance = self.fleet.launch(role=role, **kwargs)
        self.launched.append(instance)
        # "now" is shortly after the launch, as when an instance enrolls from its first boot.
        if self.clock.seconds() < instance.launch_time + 30:
            self.clock.advance(instance.launch_time + 30 - self.clock.seconds())
        return instance

    def body_for(
        self,
        instance: InstanceInfo,
        role: str = "agent",
        csr: bytes | None = None,
        document: bytes | None = None,
        signature: str | None = None,
        **document_options: Any,
    ) -> dict[str, str]:
        if document is None:
            document, signed = self.signer.identity_for(instance, **document_options)
            signature = signature if signature is not None else signed
        elif signature is None:
            signature = self.signer.sign(document)
        certname = self.policy.certname_template.format(
            instance_id=instance.instance_id,
            account=instance.account,
            region=instance.region,
            private_ip_dashed=instance.private_ip.replace(".", "-"),
            private_dns=instance.private_dns,
        )
        return {
            "role": role,
            "document": document.decode("utf-8"),
            "signature": signature,
            "csr": (csr if csr is not None else make_csr(certname)).decode("ascii"),
        }

    def start(
        self,
        path: str,
        body: bytes | None = None,
        method: str = "POST",
        headers: dict[str, str] | None = None,
        source: str = "127.0.0.1",
    ) -> Deferred[Answer]:
        """Send a request; it may wait on the clock (the turn gathering a DescribeInstances batch)."""
        self.source[0] = source
        all_headers = {"Content-Type": "application/json"} if body is not None else {}
        all_headers.update(headers or {})
        stub: Any = self.treq
        d: Deferred[Any] = stub.request(
            method, f"https://puppet.example.net:8080{path}", data=body, headers=all_headers
        )

        async def read(response: Any) -> Answer:
            content = await stub.content(response)
            flat = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
            return Answer(response.code, flat, content)

        answer: Deferred[Answer] = d.addCallback(lambda r: Deferred.fromCoroutine(read(r)))
        return answer

    def finish(self, *pending: Deferred[Answer]) -> list[Answer]:
        """Let the batch window pass and every answer arrive."""
        for _ in range(5):
            self.clock.advance(0.1)
            self.treq.flush()
        results: list[Any] = []
        for d in pending:
            d.addBoth(results.append)
        for result in results:
            if isinstance(result, Failure):
                result.raiseException()
        assert len(results) == len(pending), "a request never finished"
        return results

    def call(self, path: str, body: bytes | None = None, **kwargs: Any) -> Answer:
        return self.finish(self.start(path, body, **kwargs))[0]

    def enroll(self, instance: InstanceInfo, role: str = "agent", source: str | None = None,
               **body_options: Any) -> Answer:
        body = json.dumps(self.body_for(instance, role, **body_options)).encode()
        return self.call("/v1/enroll", body, source=source or instance.private_ip)

    def verify(self, answer: dict[str, str]) -> str:
        """openssl's verdict on an enrollment's certificate, a minute after the test clock's now."""
        directory = self.tmp / "verify"
        directory.mkdir(exist_ok=True)
        return openssl_verify(
            directory, answer["certificate"], answer["ca_chain"], answer["crl_chain"],
            at=self.clock.seconds() + 60,
        )

    def issued(self) -> int:
        return self.authority.issued

    def state(self) -> tuple[dict[str, list[tuple[str, int]]], int]:
        return snapshot(self.store), self.authority.issued


def make_policy(**overrides: Any) -> EnrollmentPolicy:
    settings: dict[str, Any] = {
        "accounts": [DEFAULT_ACCOUNT],
        "max_age": 3600.0,
        "front": FRONT,
        "require_source_match": True,
        "certname_template": "{instance_id}",
        "master_rules": (MASTER_RULE,),
        "lb_rules": (LB_RULE,),
    }
    settings.update(overrides)
    return EnrollmentPolicy(**settings)


@define
class AWS:
    """One moto server for the session, with its fleet and an EC2 client over it."""

    moto: MotoServer
    fleet: Fleet
    cloud: Boto3Cloud

    @classmethod
    def on(cls, moto: MotoServer) -> AWS:
        cloud = Boto3Cloud(
            moto.endpoint_url,
            access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
            secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"],
        )
        return cls(moto, Fleet(moto.endpoint_url, REGION), cloud)


def build_world(
    aws: AWS,
    signer: FakeAWSSigner,
    tmp: Path,
    *,
    policy: EnrollmentPolicy | None = None,
    store_wrapper: Callable[[IStore], IStore] | None = None,
    cloud: Boto3Cloud | None = None,
    front_ports: FrontPorts | None = None,
    make_store: Callable[[Path], IStore] | None = None,
    timeline: EnrollmentTimeline | None = None,
) -> World:
    # moto is not reset between tests (reloading its EC2 backend costs seconds): every test
    # launches its own instances, whose ids never repeat.
    clock = Clock()
    # Start near the real time: moto stamps launches with it, and openssl verifies with it.
    clock.advance(time.time())
    store: IStore = make_store(tmp) if make_store else SQLiteStore(str(tmp / "puppetha.sqlite"))
    records = Records(store_wrapper(store) if store_wrapper else store)
    authority = make_authority(records, tmp, clock)
    policy = policy or make_policy()
    cloud = cloud or aws.cloud
    enrollment = Enrollment(
        policy=policy,
        trust=signer.trust_store(),
        records=inline(records),
        authority=inline(authority),
        cloud=inline(cloud),
        clock=clock,
        choose=lambda cas: cas[0],
        front_ports=front_ports,
        timeline=timeline,
    )
    source = ["127.0.0.1"]
    resource = FromSource(enrollment_resource(enrollment), source)
    return World(
        moto=aws.moto,
        fleet=aws.fleet,
        signer=signer,
        store=store,
        records=records,
        authority=authority,
        clock=clock,
        policy=policy,
        enrollment=enrollment,
        source=source,
        treq=StubTreq(resource),
        tmp=tmp,
        cloud=cloud,
    )


# -- openssl, the independent judge ---------------------------------------------------------


def openssl_verify(tmp: Path, certificate: str, ca_chain: str, crl_chain: str, at: float) -> str:
    """
    ``openssl verify -crl_check_all`` at the time ``at`` (the test clock's): the root (last of
    the chain) trusted, the rest untrusted.
    """
    chain = x509.load_pem_x509_certificates(ca_chain.encode())
    root, intermediates = chain[-1], chain[:-1]
    (tmp / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    (tmp / "untrusted.pem").write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in intermediates)
    )
    (tmp / "crls.pem").write_text(crl_chain)
    (tmp / "leaf.pem").write_text(certificate)
    command = [
        "openssl", "verify", "-crl_check_all",
        "-CAfile", str(tmp / "root.pem"),
        "-CRLfile", str(tmp / "crls.pem"),
    ]
    if intermediates:
        command += ["-untrusted", str(tmp / "untrusted.pem")]
    done = subprocess.run([*command, str(tmp / "leaf.pem")], capture_output=True, text=True, check=False)
    return done.stdout + done.stderr


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def enroll_aws() -> Iterator[AWS]:
    with MotoServer() as server:
        yield AWS.on(server)


@pytest.fixture(scope="session")
def aws_signer() -> FakeAWSSigner:
    return FakeAWSSigner.create(REGION)


@pytest.fixture
def world(enroll_aws: AWS, aws_signer: FakeAWSSigner, tmp_path: Path) -> Iterator[World]:
    built = build_world(enroll_aws, aws_signer, tmp_path)
    yield built
    built.store.close()
