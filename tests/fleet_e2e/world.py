"""
The fleet the end-to-end tests of this package share, on loopback: moto as AWS, an IMDSv2
emulator, the enrollment service, the ENC socket, the lb role (front reconcile and master
health) on a private reactor in a thread, Debian's nginx, and one master: Debian's puppetserver
started from its jar on the files ``puppetha-enroll`` wrote.

One world and one puppetserver for the package (it takes half a minute or more to start): a
test module that changes what the others rely on puts it back when it is done.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.threads import blockingCallFromThread
from twisted.protocols.tls import TLSMemoryBIOFactory

from puppetha.aws.boto import Boto3Cloud
from puppetha.enc.service import Classifier, ENCSocketService
from puppetha.enroll.api import make_enrollment_site
from puppetha.enroll.listener import enrollment_endpoint, ensure_server_credentials
from puppetha.enroll.policy import EnrollmentPolicy
from puppetha.enroll.service import Enrollment
from puppetha.ha.front import FrontService, decide_front, discover_front
from puppetha.ha.health import HealthService, StatusProbe
from puppetha.ha.nginx import Backend, FrontSettings
from puppetha.instance import enroll as client
from puppetha.instance.puppetserver import (
    MasterSettings,
    master_config_files,
    master_files,
    master_ssl_files,
    material_from_ssldir,
    write_master_files,
)
from puppetha.pki.authority import LB_CA, CertificateAuthority
from puppetha.pki.certs import Usage
from puppetha.pki.keys import KeyType, private_key_pem
from puppetha.pki.vault import FileKeyVault
from puppetha.store.records import MasterRecord, Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.aws import DEFAULT_ACCOUNT, FakeAWSSigner
from puppetha.testing.imds import IMDSThread, InstanceMetadata
from puppetha.testing.moto import ROLE_TAG, TEST_CREDENTIALS, Fleet, MotoServer
from puppetha.testing.nginx import LOOPBACK, NginxUnderTest, free_port, loopback_ports
from puppetha.testing.puppetserver import PUPPET, TEST_MODULE, PuppetserverUnderTest
from puppetha.threads import Blocking, make_pool

REGION = "us-east-1"
#: The front's name: resolves to loopback everywhere, and is a DNS name (nginx checks the
#: masters' certificates against it, and agents check the lb node's).
FRONT_HOST = "localhost"
BIN = Path(sys.executable).parent


def eventually(check: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.2)


@attrs.define
class Node:
    instance_id: str
    directory: Path
    imds_url: str

    @property
    def ssldir(self) -> Path:
        return self.directory / "ssl"

    @property
    def puppet_conf(self) -> Path:
        return self.directory / "puppet.conf"

    @property
    def certificate(self) -> str:
        return str(self.ssldir / "certs" / f"{self.instance_id}.pem")

    @property
    def private_key(self) -> str:
        return str(self.ssldir / "private_keys" / f"{self.instance_id}.pem")


@attrs.define
class World:
    tmp: Path
    state: Path
    moto: MotoServer
    fleet: Fleet
    signer: FakeAWSSigner
    imds: IMDSThread
    store: SQLiteStore
    authority: CertificateAuthority
    nginx: NginxUnderTest
    settings: FrontSettings
    root_pin: str
    reactor: SelectReactor
    front: FrontService | None = None
    health: HealthService | None = None
    puppetserver: PuppetserverUnderTest | None = None
    master: Node | None = None
    stops: list[Callable[[], object]] = attrs.field(factory=list)

    @property
    def enroll_url(self) -> str:
        return f"https://{FRONT_HOST}:{self.settings.ports.enroll}"

    def launch(self, name: str, role: str | None, **kwargs: Any) -> Node:
        instance = self.fleet.launch(role, **kwargs)
        document, signature = self.signer.identity_for(instance)
        metadata = InstanceMetadata(instance.instance_id, document, signature, instance.private_ip)
        url = self.imds.serve(metadata)
        directory = self.tmp / name
        directory.mkdir()
        return Node(instance.instance_id, directory, url)

    def enroll(self, node: Node, role: str, *extra: str) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        code = client.run(
            [
                "--role", role,
                "--server", self.enroll_url,
                "--ca-fingerprint", self.root_pin,
                "--imds-url", node.imds_url,
                "--ssldir", str(node.ssldir),
                "--puppet-conf", str(node.puppet_conf),
                *extra,
            ],
            stdout=out,
            stderr=err,
        )
        return code, out.getvalue() + err.getvalue()

    def puppetha(self, *args: str) -> str:
        done = subprocess.run(
            [str(BIN / "puppetha"), "--state-dir", str(self.state), *args],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def agent_run(self, node: Node, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                PUPPET, "agent", "--test", "--config", str(node.puppet_conf),
                "--confdir", str(node.directory / "conf"), "--vardir", str(node.directory / "var"),
                "--logdir", str(node.directory / "log"), "--rundir", str(node.directory / "run"),
                "--codedir", str(node.directory / "code"), "--no-daemonize", "--color=false", *extra,
            ],
            capture_output=True, text=True, timeout=180, check=False,
        )

    def front_request(self, node: Node, path: str, headers: dict[str, str] | None = None) -> int:
        context = ssl.create_default_context(cafile=str(node.ssldir / "certs" / "ca.pem"))
        context.load_cert_chain(node.certificate, node.private_key)
        request = urllib.request.Request(
            f"https://{FRONT_HOST}:{self.settings.ports.front}{path}", headers=headers or {}
        )
        try:
            with urllib.request.urlopen(request, context=context, timeout=60) as response:  # noqa: S310
                return int(response.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    def on_reactor(self, f: Callable[..., Any], *args: Any) -> Any:
        return blockingCallFromThread(self.reactor, f, *args)


def issue_lb_certificate(authority: CertificateAuthority, directory: Path) -> tuple[str, str]:
    """
    The first lb node's certificate from the lb CA, as the enrollment service issues it to lb
    nodes: nginx has to run before anyone can enroll through it.
    """
    key = KeyType.EC_P256.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lb1")]))
        .sign(key, hashes.SHA256())
    )
    cert = authority.issue(LB_CA, csr, common_name="lb1", sans=[FRONT_HOST], usage=Usage.BOTH)
    directory.mkdir(parents=True)
    cert_path, key_path = directory / "lb1.pem", directory / "lb1.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_pem(key))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="package")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # Everything started is stopped, in reverse order, even when setting up fails half-way.
    with contextlib.ExitStack() as cleanup:
        yield from _world(tmp_path_factory.mktemp("e2e"), cleanup)


def _world(tmp: Path, cleanup: contextlib.ExitStack) -> Iterator[World]:
    state = tmp / "state"
    state.mkdir(mode=0o700)
    moto = MotoServer()
    moto.start()
    cleanup.callback(moto.stop)
    fleet = Fleet(moto.endpoint_url, REGION)
    signer = FakeAWSSigner.create(REGION)
    imds = IMDSThread().start()
    cleanup.callback(imds.stop)
    # The same files the `puppetha` command finds under --state-dir.
    store = SQLiteStore(str(state / "puppetha.sqlite"))
    cleanup.callback(store.close)
    records = Records(store)
    authority = CertificateAuthority(
        records,
        FileKeyVault.create(state / "ca-vault.key"),
        key_type=KeyType.EC_P256,
        now=time.time,
        ca_lifetime=timedelta(days=3650),
        cert_lifetime=timedelta(days=365),
        crl_lifetime=timedelta(days=7),
    )
    authority.ensure_root("puppetha e2e root")
    authority.ensure_ca(LB_CA)
    lb_cert, lb_key = issue_lb_certificate(authority, tmp / "lb")

    nginx = NginxUnderTest(tmp / "nginx")
    ports = loopback_ports(max_masters=2)
    settings = FrontSettings(
        certificate=lb_cert, private_key=lb_key, master_name=FRONT_HOST, ports=ports, runtime=nginx.runtime
    )
    enroll_port = free_port()
    backends = [Backend(LOOPBACK, enroll_port)]
    first = decide_front(settings, discover_front(store, settings), backends, [LB_CA])
    nginx.generations.install(first.files, nginx.control, reload=False)
    cleanup.callback(nginx.stop)
    nginx.start(wait_ports=(ports.front, ports.enroll))

    reactor = SelectReactor()
    thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
    pool = make_pool("e2e", 8)
    cloud = Boto3Cloud(
        moto.endpoint_url,
        access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
        secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"],
    )
    credentials = ensure_server_credentials(authority, tmp / "enroll", [FRONT_HOST], KeyType.EC_P256)
    world = World(
        tmp, state, moto, fleet, signer, imds, store, authority, nginx, settings,
        credentials.root_fingerprint, reactor,
    )
    policy = EnrollmentPolicy(
        accounts=[DEFAULT_ACCOUNT],
        max_age=3600.0,
        front=f"{FRONT_HOST}:{ports.front}",
        # Everything arrives from loopback here, not from the instances' private addresses.
        require_source_match=False,
        master_rules=(f"tag:{ROLE_TAG}=master",),
        lb_rules=(f"tag:{ROLE_TAG}=lb",),
    )
    enc_socket = str(tmp / "enc.sock")

    def start_services() -> Any:
        pool.start()
        enrollment = Enrollment(
            policy=policy,
            trust=signer.trust_store(),
            records=Blocking(reactor, pool, records),
            authority=Blocking(reactor, pool, authority),
            cloud=Blocking(reactor, pool, cloud),
            clock=reactor,
            front_ports=ports,
        )
        classifier = Classifier(
            reactor, Blocking(reactor, pool, records), Blocking(reactor, pool, cloud), ttl=1.0, store_ttl=0.5
        )
        enc = ENCSocketService(reactor, classifier, enc_socket)
        enc.startService()
        front = FrontService(
            clock=reactor,
            blocking=Blocking(reactor, pool, None),
            store=store,
            settings=settings,
            generations=nginx.generations,
            control=nginx.control,
            enroll_backends=backends,
            exclude_cas=[LB_CA],
            interval=1.0,
        )
        health = HealthService(
            clock=reactor,
            blocking=Blocking(reactor, pool, None),
            store=store,
            probe=StatusProbe(reactor, timeout=3.0),
            certificate=lb_cert,
            private_key=lb_key,
            interval=1.0,
            fall=2,
            rise=1,
            on_change=front.poke,
        )
        front.startService()
        health.startService()
        world.front, world.health = front, health
        world.stops += [health.stopService, front.stopService, enc.stopService]
        endpoint = enrollment_endpoint(
            TCP4ServerEndpoint(reactor, enroll_port, interface=LOOPBACK), proxy_from=[LOOPBACK]
        )
        # TLS batches small writes on a clock: this reactor's, not the (idle) global one.
        site = make_enrollment_site(enrollment, reactor)
        return endpoint.listen(TLSMemoryBIOFactory(credentials.tls_context(), False, site, clock=reactor))

    def stop_reactor() -> None:
        for stop in world.stops:
            with contextlib.suppress(Exception):
                world.on_reactor(stop)
        reactor.callFromThread(reactor.stop)
        thread.join(timeout=10)
        pool.stop()

    thread.start()
    cleanup.callback(stop_reactor)
    port = world.on_reactor(start_services)
    world.stops.insert(0, port.stopListening)
    cleanup.callback(lambda: world.puppetserver.stop() if world.puppetserver is not None else None)
    yield world


@pytest.fixture(scope="package")
def master(world: World) -> Node:
    """
    A master that enrolled through nginx's enrollment port, with its puppetserver running on
    the files ``puppetha-enroll`` wrote (plus the process-level ones a package would provide).
    """
    node = world.launch("master", "master")
    directory = world.tmp / "puppetserver"
    # Debian's services.d, whose ca.cfg turns the CA service on: the client must replace it.
    shutil.copytree("/etc/puppet/puppetserver/services.d", directory / "services.d")
    server = PuppetserverUnderTest(directory)
    # The record names the instance's private address; here puppetserver listens on loopback.
    port = free_port()
    settings = MasterSettings(
        listen_address=LOOPBACK,
        listen_port=port,
        # The default ENC command, as puppetha-enroll writes it: <python> -IS <script .pyc>.
        enc_socket=str(world.tmp / "enc.sock"),
    )
    # puppetserver reads puppet.conf from its server-conf-dir (the later --puppet-conf wins).
    puppet_conf = Path(server.layout.confdir) / "puppet.conf"
    code, output = world.enroll(
        node, "master", "--dns-alt-names", FRONT_HOST,
        "--puppetserver-confdir", str(directory), "--puppet-conf", str(puppet_conf),
        "--listen-address", LOOPBACK, "--listen-port", str(port),
        "--enc-script", settings.enc_command, "--enc-socket", settings.enc_socket,
    )  # fmt: skip
    assert code == 0, output
    records = Records(world.store)
    found = records.get(MasterRecord, node.instance_id)
    assert found is not None, "the enrollment did not register the master"
    records.replace(attrs.evolve(found.record, address=LOOPBACK, port=port), found.version)

    layout = attrs.evolve(server.layout, ssldir=str(node.ssldir))
    material = material_from_ssldir(
        node.ssldir, node.instance_id, (node.ssldir / "lb-ca.pem").read_text(),
        (node.ssldir / "lb-crl.pem").read_text(),
    )  # fmt: skip
    assert material.lb_ca_pem == world.authority.ca(LB_CA).certificate_pem
    # What the client wrote is what puppetha's own rules say, byte for byte.
    written = {**master_config_files(layout, material, settings), **master_ssl_files(layout, material)}
    for path, text in written.items():
        assert Path(path).read_text() == text, path
    assert "certificate-authority-service/" not in (directory / "services.d/ca.cfg").read_text()
    # The process-level files (Debian's package ships its own) for this temporary layout.
    conf = f"{layout.confdir}/puppet.conf"
    process = {
        path: text for path, text in master_files(layout, material, settings).items()
        if path not in written and path != conf
    }  # fmt: skip
    write_master_files(process, layout)
    for relative, text in TEST_MODULE.items():
        target = Path(layout.codedir) / "environments" / settings.environment / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    server.material, server.settings = material, settings
    world.puppetserver = server
    server.start(world.settings.certificate, world.settings.private_key)

    def healthy() -> bool:
        f = records.get(MasterRecord, node.instance_id)
        return f is not None and f.record.healthy

    # Probes failed while puppetserver started; the next good one brings the master back.
    eventually(healthy, "the master being healthy", 30)
    world.master = node
    return node


