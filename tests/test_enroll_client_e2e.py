"""
End to end: ``puppetha-enroll`` against the real enrollment service over TLS on loopback, with a
moto server as AWS, the IMDSv2 emulator, the real certificate authority on a SQLite store, and
Debian's puppet agent judging the ssldir that comes out.

The service runs on a private reactor in a thread (the global reactor is not touched); the
client is blocking and runs in the test's own thread, as it runs on an instance.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.threads import blockingCallFromThread
from twisted.protocols.tls import TLSMemoryBIOFactory

from puppetha.aws.boto import Boto3Cloud
from puppetha.aws.cloud import InstanceInfo
from puppetha.enc.launcher import fast_command
from puppetha.enroll.api import make_enrollment_site
from puppetha.enroll.listener import enrollment_endpoint, ensure_server_credentials
from puppetha.enroll.policy import EnrollmentPolicy
from puppetha.enroll.service import Enrollment
from puppetha.instance import enroll as client
from puppetha.instance.failures import EXIT_OK, EXIT_REFUSED, EXIT_UNTRUSTED
from puppetha.instance.install import MASTER_CA_FILE
from puppetha.pki.authority import LB_CA, ROOT, CertificateAuthority
from puppetha.pki.certs import fingerprint
from puppetha.pki.keys import KeyType
from puppetha.pki.vault import FileKeyVault
from puppetha.store.records import Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.aws import FakeAWSSigner
from puppetha.testing.imds import IMDSThread, InstanceMetadata
from puppetha.testing.moto import ROLE_TAG, TEST_CREDENTIALS, Fleet, MotoServer
from puppetha.threads import Blocking, make_pool

REGION = "us-east-1"
ACCOUNT = "123456789012"
FRONT = "localhost:8140"


class LiveEnrollmentServer:
    """The enrollment service and its TLS listener on a private reactor in a thread."""

    def __init__(self, moto: MotoServer, signer: FakeAWSSigner, directory: Path) -> None:
        self.reactor = SelectReactor()
        directory.mkdir()
        self.store = SQLiteStore(str(directory / "puppetha.sqlite"))
        records = Records(self.store)
        self.authority = CertificateAuthority(
            records,
            FileKeyVault.create(directory / "vault.key"),
            key_type=KeyType.EC_P256,
            now=self.reactor.seconds,
            ca_lifetime=timedelta(days=3650),
            cert_lifetime=timedelta(days=365),
            crl_lifetime=timedelta(days=7),
        )
        self.authority.ensure_root("puppetha e2e root")
        credentials = ensure_server_credentials(
            self.authority, directory / "server", ["localhost", "127.0.0.1"], KeyType.EC_P256
        )
        self.pin = credentials.root_fingerprint
        cloud = Boto3Cloud(
            moto.endpoint_url,
            access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
            secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"],
        )
        self.pool = make_pool("enroll-e2e", 4)
        policy = EnrollmentPolicy(
            accounts=[ACCOUNT],
            max_age=3600.0,
            front=FRONT,
            # Every instance "connects" from 127.0.0.1 here, not from its private IP.
            require_source_match=False,
            master_rules=(f"tag:{ROLE_TAG}=master",),
        )
        enrollment = Enrollment(
            policy=policy,
            trust=signer.trust_store(),
            records=Blocking(self.reactor, self.pool, records),
            authority=Blocking(self.reactor, self.pool, self.authority),
            cloud=Blocking(self.reactor, self.pool, cloud),
            clock=self.reactor,
        )
        site = make_enrollment_site(enrollment, self.reactor)
        self.thread = threading.Thread(
            target=self.reactor.run, kwargs={"installSignalHandlers": False}, name="enroll-e2e", daemon=True
        )
        self.reactor.callWhenRunning(self.pool.start)
        self.thread.start()
        endpoint = enrollment_endpoint(TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1"))
        # The TLS factory's clock defaults to the global reactor, which never runs here.
        tls = TLSMemoryBIOFactory(credentials.tls_context(), False, site, clock=self.reactor)
        listen: Callable[[IProtocolFactory], Any] = endpoint.listen
        self.port: IListeningPort = blockingCallFromThread(self.reactor, listen, tls)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port.getHost().port}"  # type: ignore[attr-defined]

    def stop(self) -> None:
        blockingCallFromThread(self.reactor, self.port.stopListening)
        self.reactor.callFromThread(self.pool.stop)
        self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(timeout=30)
        self.store.close()


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def signer() -> FakeAWSSigner:
    return FakeAWSSigner.create(REGION)


@pytest.fixture
def service(moto: MotoServer, signer: FakeAWSSigner, tmp_path: Path) -> Iterator[LiveEnrollmentServer]:
    server = LiveEnrollmentServer(moto, signer, tmp_path / "daemon")
    yield server
    server.stop()


@pytest.fixture
def imds() -> Iterator[IMDSThread]:
    with IMDSThread() as emulator:
        yield emulator


def _enroll(  # noqa: PLR0917
    service: LiveEnrollmentServer,
    imds: IMDSThread,
    signer: FakeAWSSigner,
    instance: InstanceInfo,
    role: str,
    host: Path,
    *extra: str,
) -> tuple[int, str, str]:
    document, signature = signer.identity_for(instance)
    url = imds.serve(InstanceMetadata(instance.instance_id, document, signature, instance.private_ip))
    stdout, stderr = io.StringIO(), io.StringIO()
    code = client.run(
        [
            "--role", role, "--server", service.url, "--ca-fingerprint", service.pin, "--imds-url", url,
            "--ssldir", str(host / "ssl"), "--puppet-conf", str(host / "puppet.conf"), "--timeout", "30",
            *extra,
        ],
        stdout=stdout,
        stderr=stderr,
    )  # fmt: skip
    return code, stdout.getvalue(), stderr.getvalue()


def test_a_master_then_an_agent_enroll_and_puppet_accepts_the_agent(
    service: LiveEnrollmentServer, imds: IMDSThread, signer: FakeAWSSigner, moto: MotoServer, tmp_path: Path
) -> None:
    fleet = Fleet(moto.endpoint_url, REGION)
    master = fleet.launch(role="master")
    agent = fleet.launch(role="agent")

    master_host = tmp_path / "master"
    code, out, err = _enroll(service, imds, signer, master, "master", master_host)
    assert code == EXIT_OK, err
    assert err == ""
    assert f"enrolled {master.instance_id} as master" in out
    master_ca = x509.load_pem_x509_certificate(
        (master_host / "ssl/certs" / MASTER_CA_FILE).read_bytes()
    )
    master_chain = x509.load_pem_x509_certificates((master_host / "ssl/certs/ca.pem").read_bytes())
    root = service.authority.certificate(ROOT)
    assert master_chain == [master_ca, root]
    assert fingerprint(root) == service.pin
    # Its puppetserver: the lb CA alone as the listener's client CA, header trust, our ENC, no CA.
    lb_ca = service.authority.certificate(LB_CA)
    assert x509.load_pem_x509_certificate((master_host / "ssl/lb-ca.pem").read_bytes()) == lb_ca
    lb_crl = x509.load_pem_x509_crl((master_host / "ssl/lb-crl.pem").read_bytes())
    assert lb_crl.issuer == lb_ca.subject
    confdir = master_host / "puppetserver"
    webserver = (confdir / "conf.d/webserver.conf").read_text()
    assert f'ssl-host: "{master.private_ip}"' in webserver
    assert f'ssl-ca-cert: "{master_host / "ssl/lb-ca.pem"}"' in webserver
    assert "client-auth: need" in webserver
    assert "allow-header-cert-info: true" in (confdir / "conf.d/auth.conf").read_text()
    assert "certificate-authority-disabled-service" in (confdir / "services.d/ca.cfg").read_text()
    assert (master_host / "puppet.conf").read_text().endswith(
        f"[server]\nnode_terminus = exec\nexternal_nodes = {fast_command()}\n"
    )

    agent_host = tmp_path / "agent"
    code, out, err = _enroll(service, imds, signer, agent, "agent", agent_host)
    assert (code, err) == (EXIT_OK, "")
    # The agent is issued by the only healthy master's CA, which the master just got.
    agent_chain = x509.load_pem_x509_certificates((agent_host / "ssl/certs/ca.pem").read_bytes())
    assert agent_chain == [master_ca, root]
    # The agent checks the lb nodes' chain too: the lb CA's CRL is in its crl.pem.
    end = b"-----END X509 CRL-----\n"
    agent_crls = [
        x509.load_pem_x509_crl(block + end)
        for block in (agent_host / "ssl/crl.pem").read_bytes().split(end) if block.strip()
    ]
    assert {c.issuer for c in agent_crls} == {root.subject, master_ca.subject, lb_ca.subject}
    conf = (agent_host / "puppet.conf").read_text()
    assert conf == (
        f"[agent]\ncertname = {agent.instance_id}\nserver = localhost\nserverport = 8140\n"
        f"ssldir = {agent_host / 'ssl'}\n"
        "ca_server = localhost\nca_port = 8140\ncrl_refresh_interval = 30m\nca_refresh_interval = 1d\n"
    )

    # Debian's puppet agent checks the key, certificate, chain and every CA's CRL with its own code.
    puppet = shutil.which("puppet")
    assert puppet is not None, "Debian's puppet agent must be installed"
    dirs = [f"--{name}={tmp_path / 'puppet' / name}" for name in ("vardir", "logdir", "rundir", "codedir")]
    done = subprocess.run(
        [puppet, "ssl", "verify", f"--config={agent_host / 'puppet.conf'}", "--color=false", *dirs],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Verified client certificate 'CN={agent.instance_id}'" in done.stdout

    # The server grants one enrollment per instance and role: a second try with --force is refused.
    imds.remove(agent.instance_id)
    code, out, err = _enroll(service, imds, signer, agent, "agent", agent_host, "--force")
    assert code == EXIT_REFUSED
    assert err.startswith("puppetha-enroll: enrollment refused: already-enrolled: ")
    assert agent_chain == x509.load_pem_x509_certificates((agent_host / "ssl/certs/ca.pem").read_bytes())


def test_an_instance_of_another_account_is_refused_and_nothing_is_written(
    service: LiveEnrollmentServer, imds: IMDSThread, signer: FakeAWSSigner, moto: MotoServer, tmp_path: Path
) -> None:
    fleet = Fleet(moto.endpoint_url, REGION)
    stranger = fleet.launch(role="agent")
    forged: dict[str, Any] = {"account": "999999999999"}
    instance = InstanceInfo(**{**_fields(stranger), **forged})
    code, out, err = _enroll(service, imds, signer, instance, "agent", tmp_path / "host")
    assert (code, out) == (EXIT_REFUSED, "")
    assert err.startswith("puppetha-enroll: enrollment refused: account-not-allowed: ")
    assert not (tmp_path / "host").exists()


def test_a_wrong_pin_sends_nothing(
    service: LiveEnrollmentServer, imds: IMDSThread, signer: FakeAWSSigner, moto: MotoServer, tmp_path: Path
) -> None:
    fleet = Fleet(moto.endpoint_url, REGION)
    assert _enroll(service, imds, signer, fleet.launch(role="master"), "master", tmp_path / "m")[0] == 0
    instance = fleet.launch(role="agent")
    host = tmp_path / "agent"
    code, out, err = _enroll(
        service, imds, signer, instance, "agent", host, "--ca-fingerprint", "sha256:" + "00" * 32
    )
    assert (code, out) == (EXIT_UNTRUSTED, "")
    assert "no root CA with fingerprint sha256:0000" in err
    assert not host.exists()
    # The service saw no enrollment: the same instance enrolls once the pin is right.
    imds.remove(instance.instance_id)
    code, out, err = _enroll(service, imds, signer, instance, "agent", host)
    assert (code, err) == (EXIT_OK, "")
    assert out.startswith(f"enrolled {instance.instance_id} as agent")


def _fields(instance: InstanceInfo) -> dict[str, Any]:
    return {
        name: getattr(instance, name)
        for name in (
            "instance_id", "account", "region", "state", "private_ip", "private_dns",
            "instance_profile_arn", "security_groups", "tags", "launch_time",
        )
    }  # fmt: skip
