"""
``puppetha-enroll`` against a metadata service and an enrollment server that speak the real
protocols over loopback: IMDSv2 over HTTP, the documented enrollment API over TLS, certificates
issued with puppetha's own PKI code.
"""

from __future__ import annotations

import io
import json
import os
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from puppetha.aws.cloud import InstanceInfo
from puppetha.enc.launcher import compiled_script
from puppetha.instance import enroll as client
from puppetha.instance.answer import REQUIRED_USAGE
from puppetha.instance.csr import make_csr, requested_alt_names
from puppetha.instance.failures import (
    EXIT_LOCAL,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_UNTRUSTED,
    Untrusted,
)
from puppetha.instance.install import MASTER_CA_FILE
from puppetha.instance.metadata import InstanceIdentity
from puppetha.instance.options import Options, ServerAddress, parse_host_port, parse_pin, parse_server_url
from puppetha.instance.server import exit_code_for_status, pinned_root
from puppetha.pki import certs
from puppetha.pki.crl import build_crl
from puppetha.pki.csr import CSRPolicy, CSRRefused, check_csr
from puppetha.pki.keys import KeyType, PrivateKey, private_key_pem
from puppetha.testing.aws import FakeAWSSigner

NOW = datetime.now(UTC)
INSTANCE_ID = "i-0123456789abcdef0"
PRIVATE_DNS = "ip-10-0-0-12.ec2.internal"
LIFETIME = timedelta(days=365)


# -- a small CA, as the daemon would run it ------------------------------------------------------


class TestCA:
    __test__ = False

    """A root, one master's intermediate, the lb CA, and the enrollment server's own certificate."""

    def __init__(self, name: str = "puppetha Root CA") -> None:
        self.root_key = KeyType.EC_P256.generate()
        self.root = certs.create_root_ca(self.root_key, name, NOW, LIFETIME * 10)
        self.master_key = KeyType.EC_P256.generate()
        self.master_ca = self.intermediate("master-1", self.master_key)
        self.lb_key = KeyType.EC_P256.generate()
        self.lb_ca = self.intermediate("lb", self.lb_key)

    def intermediate(self, certname: str, key: PrivateKey) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"puppetha CA {certname}")])
        return certs.create_intermediate_ca(
            key.public_key(),
            subject,
            issuer_cert=self.root,
            issuer_key=self.root_key,
            now=NOW,
            lifetime=LIFETIME,
        )

    def crl(self, ca: x509.Certificate, key: PrivateKey) -> x509.CertificateRevocationList:
        return build_crl(ca, key, [], number=1, now=NOW, lifetime=timedelta(days=7))

    def agent_leaf(self, certname: str) -> tuple[PrivateKey, x509.Certificate]:
        """A fresh key and a client certificate for it from the master's CA."""
        key = KeyType.EC_P256.generate()
        cert = certs.issue_leaf(
            make_csr(key, certname, ()),
            common_name=certname,
            sans=(),
            usage=certs.Usage.CLIENT,
            issuer_cert=self.master_ca,
            issuer_key=self.master_key,
            now=NOW,
            lifetime=LIFETIME,
        )
        return key, cert

    def server_credentials(
        self, directory: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1")
    ) -> Path:
        """A TLS key and certificate (then the root) for the enrollment server, as one PEM file."""
        key = KeyType.EC_P256.generate()
        csr = make_csr(key, "puppetha-enroll", ())
        cert = certs.issue_leaf(
            csr,
            common_name="puppetha-enroll",
            sans=names,
            usage=certs.Usage.SERVER,
            issuer_cert=self.root,
            issuer_key=self.root_key,
            now=NOW,
            lifetime=LIFETIME,
        )
        path = directory / f"server-{os.urandom(4).hex()}.pem"
        path.write_bytes(private_key_pem(key) + pem(cert) + pem(self.root))
        return path

    @property
    def pin(self) -> str:
        return certs.fingerprint(self.root)


def pem(item: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return item.public_bytes(serialization.Encoding.PEM)


# -- IMDSv2 --------------------------------------------------------------------------------------


class _Loopback:
    """A stdlib HTTP(S) server on 127.0.0.1 in a thread, for one test."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], context: ssl.SSLContext | None = None) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def owner(self) -> Any:
        return self.server.owner  # type: ignore[attr-defined]

    def answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _IMDSHandler(_Handler):
    def do_PUT(self) -> None:
        imds = self.owner
        imds.requests.append(("PUT", self.path, dict(self.headers)))
        if self.path != "/latest/api/token" or "X-aws-ec2-metadata-token-ttl-seconds" not in self.headers:
            self.answer(400, b"")
            return
        self.answer(200, imds.token.encode(), "text/plain")

    def do_GET(self) -> None:
        imds = self.owner
        imds.requests.append(("GET", self.path, dict(self.headers)))
        if self.headers.get("X-aws-ec2-metadata-token") != imds.token:
            self.answer(401, b"")
            return
        body = imds.paths.get(self.path)
        if body is None:
            self.answer(404, b"")
            return
        self.answer(200, body, "text/plain")


class FakeIMDS(_Loopback):
    """The metadata service of one instance, IMDSv2 only (a GET without the token gets 401)."""

    def __init__(self, document: bytes, signature: str, private_dns: str = PRIVATE_DNS) -> None:
        self.token = "AQAEAtest-token=="
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.paths = {
            "/latest/dynamic/instance-identity/document": document,
            "/latest/dynamic/instance-identity/rsa2048": signature.encode(),
            "/latest/meta-data/local-hostname": private_dns.encode(),
        }
        super().__init__(_IMDSHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# -- the enrollment API --------------------------------------------------------------------------

Responder = Callable[[dict[str, Any]], tuple[int, bytes]]


class _EnrollHandler(_Handler):
    def do_GET(self) -> None:
        if self.path == "/v1/ca":
            self.answer(200, self.owner.ca_bundle(), "application/x-pem-file")
        else:
            self.answer(404, json.dumps({"error": "not-found", "message": "no such path"}).encode())

    def do_POST(self) -> None:
        server = self.owner
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        server.posts.append(body)
        if self.path != "/v1/enroll":
            self.answer(404, b"{}")
            return
        status, answer = server.responder(json.loads(body))
        self.answer(status, answer)


class FakeEnrollServer(_Loopback):
    """
    The documented enrollment API (docs/api.md) with puppetha's PKI behind it, minus the AWS
    checks; ``responder`` replaces the issuing to play a failing or lying server.
    """

    def __init__(
        self, ca: TestCA, credentials: Path, certname: str = INSTANCE_ID, front: str = "puppet:8140"
    ):
        self.ca = ca
        self.certname = certname
        self.front = front
        self.posts: list[bytes] = []
        self.responder: Responder = self.issue
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(credentials)
        super().__init__(_EnrollHandler, context)

    def url(self, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}"

    def ca_bundle(self) -> bytes:
        return pem(self.ca.root) + pem(self.ca.master_ca) + pem(self.ca.lb_ca)

    def issue(self, request: dict[str, Any]) -> tuple[int, bytes]:
        ca, role = self.ca, request["role"]
        granted = () if role == "agent" else (PRIVATE_DNS, self.front.rpartition(":")[0])
        try:
            csr = check_csr(request["csr"].encode(), CSRPolicy(self.certname, frozenset(granted)))
        except CSRRefused as e:
            return refusal(400, f"csr-{e.code}", e.message)
        extensions = [certs.puppet_extension(certs.PP_INSTANCE_ID, INSTANCE_ID)]
        answer: dict[str, Any] = {"certname": self.certname, "role": role, "server": self.front}
        crls = [
            ca.crl(ca.root, ca.root_key), ca.crl(ca.master_ca, ca.master_key), ca.crl(ca.lb_ca, ca.lb_key)
        ]
        if role == "agent":
            issuer, issuer_key, chain, usage = (
                ca.master_ca,
                ca.master_key,
                [ca.master_ca, ca.root],
                certs.Usage.CLIENT,
            )
            answer["test_server"] = "master-1.internal:8141"
        elif role == "master":
            issuer_key = KeyType.EC_P256.generate()
            issuer = ca.intermediate(self.certname, issuer_key)
            chain, usage = [issuer, ca.root], certs.Usage.BOTH
            crls.append(ca.crl(issuer, issuer_key))
            answer["ca_certificate"] = pem(issuer).decode()
            answer["test_server"] = self.front
            answer["lb_ca_chain"] = (pem(ca.lb_ca) + pem(ca.root)).decode()
            answer["lb_crl"] = pem(ca.crl(ca.lb_ca, ca.lb_key)).decode()
        else:
            issuer, issuer_key, chain, usage = ca.lb_ca, ca.lb_key, [ca.lb_ca, ca.root], certs.Usage.BOTH
            answer["test_server"] = self.front
        cert = certs.issue_leaf(
            csr,
            common_name=self.certname,
            sans=granted,
            usage=usage,
            issuer_cert=issuer,
            issuer_key=issuer_key,
            now=NOW,
            lifetime=LIFETIME,
            extensions=extensions,
        )
        answer["certificate"] = pem(cert).decode()
        answer["ca_chain"] = b"".join(pem(c) for c in chain).decode()
        answer["crl_chain"] = b"".join(pem(c) for c in crls).decode()
        return 200, json.dumps(answer).encode()


def refusal(status: int, code: str, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error": code, "message": message}).encode()


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def aws() -> FakeAWSSigner:
    return FakeAWSSigner.create("us-east-1")


@pytest.fixture
def identity(aws: FakeAWSSigner) -> tuple[bytes, str]:
    instance = InstanceInfo(
        instance_id=INSTANCE_ID,
        account="123456789012",
        region="us-east-1",
        state="running",
        private_ip="10.0.0.12",
        private_dns=PRIVATE_DNS,
        instance_profile_arn="",
        launch_time=NOW.timestamp(),
    )
    return aws.identity_for(instance)


@pytest.fixture
def imds(identity: tuple[bytes, str]) -> Iterator[FakeIMDS]:
    server = FakeIMDS(*identity)
    yield server
    server.close()


@pytest.fixture
def enroll_server(ca: TestCA, tmp_path: Path) -> Iterator[FakeEnrollServer]:
    server = FakeEnrollServer(ca, ca.server_credentials(tmp_path))
    yield server
    server.close()


class Host:
    """The instance's filesystem: where the client writes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ssldir = root / "var/lib/puppet/ssl"
        self.puppet_conf = root / "etc/puppet/puppet.conf"

    def args(self) -> list[str]:
        return ["--ssldir", str(self.ssldir), "--puppet-conf", str(self.puppet_conf)]

    def snapshot(self) -> dict[str, tuple[int, bytes]]:
        """Every file and directory under the host root with its mode and content."""
        found: dict[str, tuple[int, bytes]] = {}
        for path in sorted(self.root.rglob("*")):
            mode = path.lstat().st_mode
            content = path.read_bytes() if path.is_file() else b""
            found[str(path.relative_to(self.root))] = (stat.S_IMODE(mode), content)
        return found


@pytest.fixture
def host(tmp_path: Path) -> Host:
    root = tmp_path / "host"
    root.mkdir()
    return Host(root)


def run(
    imds: FakeIMDS,
    server: FakeEnrollServer | _Stub,
    host: Host,
    *extra: str,
    role: str = "agent",
    pin: str | None = None,
    server_url: str | None = None,
) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = [
        "--role", role,
        "--server", server_url or server.url(),
        "--ca-fingerprint", pin or server.ca.pin,
        "--imds-url", imds.url,
        "--timeout", "10",
        *host.args(),
        *extra,
    ]  # fmt: skip
    code = client.run(argv, stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- happy paths ---------------------------------------------------------------------------------


def test_agent_enrolls_and_gets_a_ready_ssldir(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    code, out, err = run(imds, enroll_server, host)
    assert (code, err) == (EXIT_OK, "")
    assert f"enrolled {INSTANCE_ID} as agent" in out
    assert "puppet agent --test --server master-1.internal --serverport 8141" in out

    ssl_dir = host.ssldir
    key_path = ssl_dir / "private_keys" / f"{INSTANCE_ID}.pem"
    cert_path = ssl_dir / "certs" / f"{INSTANCE_ID}.pem"
    assert mode(key_path) == 0o600
    assert mode(key_path.parent) == 0o750
    assert mode(ssl_dir) == 0o771
    assert mode(cert_path) == 0o644
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.public_key() == key.public_key()
    assert (ssl_dir / "public_keys" / f"{INSTANCE_ID}.pem").read_bytes() == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ca = enroll_server.ca
    assert x509.load_pem_x509_certificates((ssl_dir / "certs/ca.pem").read_bytes()) == [ca.master_ca, ca.root]
    crls = (ssl_dir / "crl.pem").read_bytes()
    assert crls.count(b"BEGIN X509 CRL") == 3  # root, the master's CA, the lb CA

    assert host.puppet_conf.read_text() == (
        f"[agent]\ncertname = {INSTANCE_ID}\nserver = puppet\nserverport = 8140\nssldir = {ssl_dir}\n"
        # The agent refreshes its CRLs (and CA bundle) from the front's CA paths.
        "ca_server = puppet\nca_port = 8140\ncrl_refresh_interval = 30m\nca_refresh_interval = 1d\n"
    )
    # Nothing left staged beside the targets.
    assert sorted(p.name for p in ssl_dir.parent.iterdir()) == ["ssl"]
    assert sorted(p.name for p in host.puppet_conf.parent.iterdir()) == ["puppet.conf"]


def test_metadata_is_read_with_imdsv2_and_sent_byte_for_byte(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host, identity: tuple[bytes, str]
) -> None:
    assert run(imds, enroll_server, host)[0] == EXIT_OK
    method, path, headers = imds.requests[0]
    assert (method, path) == ("PUT", "/latest/api/token")
    assert 0 < int(headers["X-aws-ec2-metadata-token-ttl-seconds"]) <= 21600
    assert all(h.get("X-aws-ec2-metadata-token") == imds.token for m, _, h in imds.requests[1:])
    # An agent asks for no private DNS name.
    assert [p for _, p, _ in imds.requests[1:]] == [
        "/latest/dynamic/instance-identity/document",
        "/latest/dynamic/instance-identity/rsa2048",
    ]
    [body] = enroll_server.posts
    request = json.loads(body)
    assert set(request) == {"role", "document", "signature", "csr"}
    assert request["document"].encode() == identity[0]
    assert request["signature"] == identity[1]
    csr = x509.load_pem_x509_csr(request["csr"].encode())
    assert csr.subject.rfc4514_string() == f"CN={INSTANCE_ID}"
    assert list(csr.extensions) == []


def test_private_key_never_leaves_the_host(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    assert run(imds, enroll_server, host)[0] == EXIT_OK
    key = serialization.load_pem_private_key(
        (host.ssldir / "private_keys" / f"{INSTANCE_ID}.pem").read_bytes(), None
    )
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    [body] = enroll_server.posts
    assert b"PRIVATE KEY" not in body
    assert der.hex() not in body.decode()
    assert private_key_pem(key).decode() not in body.decode()  # type: ignore[arg-type]


@pytest.mark.parametrize("key_type", ["rsa-2048", "ec-p256"])
def test_key_type_is_chosen(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host, key_type: str
) -> None:
    assert run(imds, enroll_server, host, "--key-type", key_type)[0] == EXIT_OK
    key = serialization.load_pem_private_key(
        (host.ssldir / "private_keys" / f"{INSTANCE_ID}.pem").read_bytes(), None
    )
    assert KeyType.of(key) == KeyType(key_type)  # type: ignore[arg-type]


def test_certname_override_goes_into_csr_and_files(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    enroll_server.certname = "web-1.example"
    code, _, err = run(imds, enroll_server, host, "--certname", "web-1.example")
    assert (code, err) == (EXIT_OK, "")
    assert (host.ssldir / "certs/web-1.example.pem").exists()
    assert "certname = web-1.example" in host.puppet_conf.read_text()


def test_master_asks_for_its_names_and_keeps_its_ca(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    enroll_server.front = "localhost:8140"
    code, out, err = run(imds, enroll_server, host, role="master", server_url=enroll_server.url("localhost"))
    assert (code, err) == (EXIT_OK, "")
    assert f"DNS:{PRIVATE_DNS}, DNS:localhost" in out
    request = json.loads(enroll_server.posts[0])
    csr = x509.load_pem_x509_csr(request["csr"].encode())
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [INSTANCE_ID, PRIVATE_DNS, "localhost"]
    master_ca = x509.load_pem_x509_certificate((host.ssldir / "certs" / MASTER_CA_FILE).read_bytes())
    chain = x509.load_pem_x509_certificates((host.ssldir / "certs/ca.pem").read_bytes())
    assert chain == [master_ca, enroll_server.ca.root]
    assert (host.ssldir / "crl.pem").read_bytes().count(b"BEGIN X509 CRL") == 4
    # Everything on a master (puppetserver included) reads [main].
    assert host.puppet_conf.read_text().startswith("[main]\ncertname = ")


def test_master_without_private_dns_in_metadata_asks_for_the_front_name(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    del imds.paths["/latest/meta-data/local-hostname"]
    enroll_server.front = "localhost:8140"
    code, _, err = run(imds, enroll_server, host, role="master", server_url=enroll_server.url("localhost"))
    assert (code, err) == (EXIT_OK, "")
    csr = x509.load_pem_x509_csr(json.loads(enroll_server.posts[0])["csr"].encode())
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [INSTANCE_ID, "localhost"]


def test_lb_node_certificate_comes_from_the_lb_ca(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    code, _, err = run(imds, enroll_server, host, "--dns-alt-names", PRIVATE_DNS + ",puppet", role="lb")
    assert (code, err) == (EXIT_OK, "")
    chain = x509.load_pem_x509_certificates((host.ssldir / "certs/ca.pem").read_bytes())
    assert chain == [enroll_server.ca.lb_ca, enroll_server.ca.root]
    assert not (host.puppet_conf.parent / "puppetserver").exists()


# -- a master's puppetserver ---------------------------------------------------------------------


def _master(imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host, *extra: str) -> tuple[int, str, str]:
    return run(imds, enroll_server, host, "--dns-alt-names", PRIVATE_DNS, *extra, role="master")


def test_master_gets_puppetservers_files_with_debians_defaults(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    code, out, err = _master(imds, enroll_server, host)
    assert (code, err) == (EXIT_OK, "")
    confdir = host.puppet_conf.parent / "puppetserver"  # Debian's /etc/puppet/puppetserver
    assert f"puppetserver {confdir}, " in out
    ca = enroll_server.ca
    ssldir = host.ssldir.absolute()
    assert x509.load_pem_x509_certificate((host.ssldir / "lb-ca.pem").read_bytes()) == ca.lb_ca
    lb_crl = x509.load_pem_x509_crl((host.ssldir / "lb-crl.pem").read_bytes())
    assert lb_crl.issuer == ca.lb_ca.subject
    webserver = (confdir / "conf.d/webserver.conf").read_text()
    # Only lb nodes get through: their CA alone, a client certificate required, on the private IP.
    for line in (
        'ssl-host: "10.0.0.12"', "ssl-port: 8140", "client-auth: need",
        f'ssl-ca-cert: "{ssldir}/lb-ca.pem"', f'ssl-crl-path: "{ssldir}/lb-crl.pem"',
        f'ssl-cert: "{ssldir}/certs/{INSTANCE_ID}.pem"',
        f'ssl-key: "{ssldir}/private_keys/{INSTANCE_ID}.pem"',
    ):  # fmt: skip
        assert line in webserver
    assert "allow-header-cert-info: true" in (confdir / "conf.d/auth.conf").read_text()
    services = "".join((confdir / "services.d" / n).read_text() for n in ("bootstrap.cfg", "ca.cfg"))
    assert "certificate-authority-disabled-service/certificate-authority-disabled-service" in services
    assert "certificate-authority-service/certificate-authority-service" not in services
    assert host.puppet_conf.read_text() == (
        f"[main]\ncertname = {INSTANCE_ID}\nserver = localhost\nserverport = 8140\nssldir = {ssldir}\n"
        "ca_server = localhost\nca_port = 8140\ncrl_refresh_interval = 30m\nca_refresh_interval = 1d\n"
        "\n[server]\nnode_terminus = exec\n"
    ).replace("localhost", enroll_server.front.rpartition(":")[0]) + (
        # By default puppetserver runs the script's bytecode, which enrolling made sure exists.
        f"external_nodes = {sys.executable} -IS {compiled_script()}\n"
    )
    assert compiled_script().is_file()
    for path in (confdir / "conf.d/webserver.conf", confdir / "services.d/ca.cfg"):
        assert mode(path) == 0o644


def test_master_options_and_debians_own_files(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host, tmp_path: Path
) -> None:
    confdir = tmp_path / "ps"
    (confdir / "services.d").mkdir(parents=True)
    (confdir / "conf.d").mkdir()
    (confdir / "services.d/ca.cfg").write_text(
        "puppetlabs.services.ca.certificate-authority-service/certificate-authority-service\n"
    )
    (confdir / "conf.d/global.conf").write_text("global: { logging-config: /etc/x.xml }\n")
    host.puppet_conf.parent.mkdir(parents=True)
    host.puppet_conf.write_text("[server]\nvardir = /var/lib/puppetserver\nnode_terminus = plain\n")
    code, _, err = _master(
        imds, enroll_server, host, "--puppetserver-confdir", str(confdir), "--enc-script", "/opt/bin/enc",
        "--enc-socket", "/run/p/enc.sock", "--listen-address", "10.9.8.7", "--listen-port", "8150",
    )  # fmt: skip
    assert (code, err) == (EXIT_OK, "")
    webserver = (confdir / "conf.d/webserver.conf").read_text()
    assert 'ssl-host: "10.9.8.7"' in webserver
    assert "ssl-port: 8150" in webserver
    # Debian's CA service is replaced; its other files are left alone.
    assert "certificate-authority-service/certificate" not in (confdir / "services.d/ca.cfg").read_text()
    assert (confdir / "conf.d/global.conf").read_text() == "global: { logging-config: /etc/x.xml }\n"
    conf = host.puppet_conf.read_text()
    assert conf.startswith(
        "[server]\nvardir = /var/lib/puppetserver\nnode_terminus = exec\n"
        "external_nodes = /opt/bin/enc --socket=/run/p/enc.sock\n"
    )
    assert not (host.puppet_conf.parent / "puppetserver").exists()


def test_master_files_are_all_or_nothing(imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host) -> None:
    confdir = host.puppet_conf.parent / "puppetserver"
    (confdir / "conf.d").mkdir(parents=True)
    (confdir / "conf.d/webserver.conf").write_text("webserver: { ssl-port: 8140 }\n")
    (confdir / "services.d").write_text("not a directory")  # services.d/*.cfg cannot be written
    host.ssldir.parent.mkdir(parents=True)
    before = host.snapshot()
    code, _, err = _master(imds, enroll_server, host)
    assert code == EXIT_LOCAL
    assert err.startswith("puppetha-enroll: cannot write the puppet files: ")
    assert host.snapshot() == before


LB_TAMPERING: dict[str, Callable[[TestCA, dict[str, Any]], None]] = {
    "no lb CA": lambda ca, a: a.pop("lb_ca_chain"),
    "no lb CRL": lambda ca, a: a.pop("lb_crl"),
    "the root as the lb CA": lambda ca, a: a.update(lb_ca_chain=(pem(ca.root) + pem(ca.root)).decode()),
    "the lb CA alone": lambda ca, a: a.update(lb_ca_chain=pem(ca.lb_ca).decode()),
    "an lb CA of another root": lambda ca, a: a.update(
        lb_ca_chain=(pem(TestCA().lb_ca) + pem(ca.root)).decode()),
    "the lb CRL of another CA": lambda ca, a: a.update(
        lb_crl=pem(ca.crl(ca.master_ca, ca.master_key)).decode()),
}  # fmt: skip


@pytest.mark.parametrize("tampering", sorted(LB_TAMPERING))
def test_master_answer_without_a_good_lb_ca_writes_nothing(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host, tampering: str
) -> None:
    _tamper(enroll_server, lambda a: LB_TAMPERING[tampering](enroll_server.ca, a))
    code, out, err = _master(imds, enroll_server, host)
    assert (code, out) == (EXIT_UNTRUSTED, "")
    assert "lb" in err
    assert host.snapshot() == {}
    assert not (host.ssldir / "certs" / MASTER_CA_FILE).exists()


def test_the_crl_refresh_interval_is_the_operators_choice(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    assert run(imds, enroll_server, host, "--crl-refresh-interval", "5m")[0] == EXIT_OK
    assert "\ncrl_refresh_interval = 5m\n" in host.puppet_conf.read_text()


def test_existing_puppet_conf_and_ssldir_content_are_kept(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    host.puppet_conf.parent.mkdir(parents=True)
    host.puppet_conf.write_text(
        "# site settings\n[main]\nlogdir = /var/log/puppet\n\n[agent]\nserver = old\nruninterval = 1h\n"
    )
    os.chmod(host.puppet_conf, 0o640)
    (host.ssldir / "certs").mkdir(parents=True)
    (host.ssldir / "certs/other.pem").write_text("kept")
    assert run(imds, enroll_server, host)[0] == EXIT_OK
    assert host.puppet_conf.read_text() == (
        "# site settings\n[main]\nlogdir = /var/log/puppet\n\n[agent]\nserver = puppet\nruninterval = 1h\n"
        f"certname = {INSTANCE_ID}\nserverport = 8140\nssldir = {host.ssldir}\n"
        "ca_server = puppet\nca_port = 8140\ncrl_refresh_interval = 30m\nca_refresh_interval = 1d\n"
    )
    assert mode(host.puppet_conf) == 0o640
    assert (host.ssldir / "certs/other.pem").read_text() == "kept"


# -- trust -------------------------------------------------------------------------------------


def test_wrong_fingerprint_is_refused_before_anything_is_sent(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    before = host.snapshot()
    code, out, err = run(imds, enroll_server, host, pin="sha256:" + "ab" * 32)
    assert code == EXIT_UNTRUSTED
    pin = "sha256:" + "ab" * 32
    refused = f"the server's CA bundle has no root CA with fingerprint {pin}; refusing to trust it"
    assert err == f"puppetha-enroll: {refused}\n"
    assert out == ""
    assert enroll_server.posts == []
    assert host.snapshot() == before


def test_pinning_an_intermediate_is_refused(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    code, _, err = run(imds, enroll_server, host, pin=certs.fingerprint(enroll_server.ca.master_ca))
    assert code == EXIT_UNTRUSTED
    assert "no root CA with fingerprint" in err
    assert enroll_server.posts == []


def test_server_certificate_from_another_ca_is_refused(
    imds: FakeIMDS, ca: TestCA, host: Host, tmp_path: Path
) -> None:
    # A server that hands out the genuine CA bundle but cannot prove it holds a key the root vouches for.
    impostor = FakeEnrollServer(ca, TestCA("impostor").server_credentials(tmp_path))
    try:
        before = host.snapshot()
        code, _, err = run(imds, impostor, host)
    finally:
        impostor.close()
    assert code == EXIT_UNTRUSTED
    assert "is not verified by the pinned root CA" in err
    assert impostor.posts == []
    assert host.snapshot() == before


def test_server_name_is_checked(imds: FakeIMDS, ca: TestCA, host: Host, tmp_path: Path) -> None:
    other_name = FakeEnrollServer(ca, ca.server_credentials(tmp_path, names=("enroll.example",)))
    try:
        code, _, err = run(imds, other_name, host)
    finally:
        other_name.close()
    assert code == EXIT_UNTRUSTED
    assert "IP address mismatch" in err
    # The operator is told where the name is missing.
    assert "its certificate does not name 127.0.0.1: the server's [enroll] server_names must list it" in err
    assert other_name.posts == []


# -- refusals and outages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "answer", "code", "line"),
    [
        (400, {"error": "csr-san", "message": "DNS:x is not an allowed alternative name"}, EXIT_REFUSED,
         "enrollment refused: csr-san: DNS:x is not an allowed alternative name"),
        (403, {"error": "identity-bad-signature", "message": "not AWS's"}, EXIT_REFUSED,
         "enrollment refused: identity-bad-signature: not AWS's"),
        (409, {"error": "already-enrolled", "message": "i-0 has enrolled as agent"}, EXIT_REFUSED,
         "enrollment refused: already-enrolled: i-0 has enrolled as agent"),
        (503, {"error": "aws-unavailable", "message": "try again"}, EXIT_UNAVAILABLE,
         "enrollment refused: aws-unavailable: try again"),
        (500, {"error": "internal-error", "message": "a bug\nsecond line"}, EXIT_UNAVAILABLE,
         "enrollment refused: internal-error: a bug second line"),
        (502, "<html>bad gateway</html>", EXIT_UNAVAILABLE, "enrollment refused: HTTP 502"),
    ],
)  # fmt: skip
def test_refusals_are_one_line_and_an_exit_code(  # noqa: PLR0917
    imds: FakeIMDS,
    enroll_server: FakeEnrollServer,
    host: Host,
    status: int,
    answer: Any,
    code: int,
    line: str,
) -> None:
    body = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
    enroll_server.responder = lambda request: (status, body)
    before = host.snapshot()
    assert run(imds, enroll_server, host) == (code, "", f"puppetha-enroll: {line}\n")
    assert host.snapshot() == before


def test_no_enrollment_server(imds: FakeIMDS, ca: TestCA, host: Host) -> None:
    with_nothing = _closed_port()
    code, _, err = run(imds, _Stub(ca), host, server_url=f"https://127.0.0.1:{with_nothing}")
    assert code == EXIT_UNAVAILABLE
    assert err.startswith(
        f"puppetha-enroll: cannot reach the enrollment server at 127.0.0.1:{with_nothing} ("
    )
    assert host.snapshot() == {}


def test_no_metadata_service(enroll_server: FakeEnrollServer, host: Host) -> None:
    imds_port = _closed_port()
    argv = [
        "--role", "agent", "--server", enroll_server.url(), "--ca-fingerprint", enroll_server.ca.pin,
        "--imds-url", f"http://127.0.0.1:{imds_port}", *host.args(),
    ]  # fmt: skip
    stderr = io.StringIO()
    assert client.run(argv, stdout=io.StringIO(), stderr=stderr) == EXIT_UNAVAILABLE
    assert stderr.getvalue().startswith(
        f"puppetha-enroll: the metadata service at http://127.0.0.1:{imds_port} is not answering ("
    )
    assert enroll_server.posts == []
    assert host.snapshot() == {}


def test_metadata_without_identity_is_a_local_error(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    del imds.paths["/latest/dynamic/instance-identity/rsa2048"]
    code, _, err = run(imds, enroll_server, host)
    assert (code, err) == (
        EXIT_LOCAL,
        "puppetha-enroll: the metadata service answered GET "
        "/latest/dynamic/instance-identity/rsa2048 with 404\n",
    )
    assert enroll_server.posts == []


# -- answers that must not be believed -----------------------------------------------------------


def _tamper(server: FakeEnrollServer, change: Callable[[dict[str, Any]], None]) -> None:
    def responder(request: dict[str, Any]) -> tuple[int, bytes]:
        status, body = server.issue(request)
        answer = json.loads(body)
        change(answer)
        return status, json.dumps(answer).encode()

    server.responder = responder


def _other_key_certificate(ca: TestCA) -> str:
    _, cert = ca.agent_leaf(INSTANCE_ID)
    return pem(cert).decode()


def _foreign_chain(answer: dict[str, Any]) -> None:
    other = TestCA("puppetha Root CA")
    answer["certificate"] = _other_key_certificate(other)
    answer["ca_chain"] = (pem(other.master_ca) + pem(other.root)).decode()


def _first_pem(bundle: str, label: str) -> str:
    end = f"-----END {label}-----"
    return bundle.split(end, 1)[0] + end + "\n"


TAMPERING: dict[str, Callable[[dict[str, Any]], None]] = {
    "certname": lambda a: a.update(certname="i-someoneelse"),
    "truncated certificate": lambda a: a.update(certificate=a["certificate"][:200]),
    "no certificate": lambda a: a.pop("certificate"),
    "certificate for another key": lambda a: a.update(certificate=_other_key_certificate(TestCA())),
    "chain to another root": _foreign_chain,
    "chain without the root": lambda a: a.update(ca_chain=_first_pem(a["ca_chain"], "CERTIFICATE")),
    "no CRL for the issuing CA": lambda a: a.update(crl_chain=_first_pem(a["crl_chain"], "X509 CRL")),
    "garbage CRLs": lambda a: a.update(crl_chain="-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"),
    "bad server address": lambda a: a.update(server="puppet"),
    "test_server not a string": lambda a: a.update(test_server=["puppet:8140"]),
    "server host with a terminal escape": lambda a: a.update(server="pup\x1b[2Jpet:8140"),
    "server host puppet.conf would interpolate": lambda a: a.update(server="$vardir:8140"),
}  # fmt: skip


@pytest.mark.parametrize("tampering", sorted(TAMPERING))
def test_an_answer_that_does_not_verify_writes_nothing(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host, tampering: str
) -> None:
    _tamper(enroll_server, TAMPERING[tampering])
    host.puppet_conf.parent.mkdir(parents=True)
    host.puppet_conf.write_text("[main]\nlogdir = /x\n")
    before = host.snapshot()
    code, out, err = run(imds, enroll_server, host)
    assert code == EXIT_UNTRUSTED, err
    assert err.startswith("puppetha-enroll: the ")
    assert err.count("\n") == 1
    assert out == ""
    assert host.snapshot() == before


def test_a_non_json_success_writes_nothing(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    enroll_server.responder = lambda request: (200, b'{"certname": "' + INSTANCE_ID.encode())
    assert run(imds, enroll_server, host) == (
        EXIT_UNTRUSTED,
        "",
        "puppetha-enroll: the server's answer to the enrollment is not a JSON object\n",
    )
    assert host.snapshot() == {}


def test_master_ca_must_be_the_issuer(imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host) -> None:
    _tamper(enroll_server, lambda a: a.update(ca_certificate=pem(enroll_server.ca.master_ca).decode()))
    code, _, err = run(imds, enroll_server, host, "--dns-alt-names", PRIVATE_DNS, role="master")
    assert code == EXIT_UNTRUSTED
    assert "ca_certificate is not the CA that issued" in err
    assert host.snapshot() == {}


def test_agent_certificate_needs_client_auth(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    ca = enroll_server.ca

    def server_only(request: dict[str, Any]) -> tuple[int, bytes]:
        status, body = enroll_server.issue(request)
        answer = json.loads(body)
        cert = certs.issue_leaf(
            x509.load_pem_x509_csr(request["csr"].encode()), common_name=INSTANCE_ID, sans=(),
            usage=certs.Usage.SERVER, issuer_cert=ca.master_ca, issuer_key=ca.master_key, now=NOW,
            lifetime=LIFETIME,
        )  # fmt: skip
        answer["certificate"] = pem(cert).decode()
        return status, json.dumps(answer).encode()

    enroll_server.responder = server_only
    assert run(imds, enroll_server, host) == (
        EXIT_UNTRUSTED,
        "",
        "puppetha-enroll: the issued certificate lacks the extended key usage clientAuth "
        "that the agent role needs\n",
    )
    assert host.snapshot() == {}


# -- local state ---------------------------------------------------------------------------------


def test_already_enrolled_is_refused_before_asking(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    (host.ssldir / "certs").mkdir(parents=True)
    (host.ssldir / "certs" / f"{INSTANCE_ID}.pem").write_text("old")
    before = host.snapshot()
    code, _, err = run(imds, enroll_server, host)
    assert code == EXIT_LOCAL
    assert "already exists (use --force" in err
    assert enroll_server.posts == []
    assert host.snapshot() == before


def test_force_replaces_the_old_certificate(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    (host.ssldir / "certs").mkdir(parents=True)
    (host.ssldir / "certs" / f"{INSTANCE_ID}.pem").write_text("old")
    (host.ssldir / "certificate_requests").mkdir()
    (host.ssldir / "certificate_requests" / f"{INSTANCE_ID}.pem").write_text("stale request")
    assert run(imds, enroll_server, host, "--force")[0] == EXIT_OK
    x509.load_pem_x509_certificate((host.ssldir / "certs" / f"{INSTANCE_ID}.pem").read_bytes())
    assert not (host.ssldir / "certificate_requests" / f"{INSTANCE_ID}.pem").exists()


def test_failure_writing_puppet_conf_leaves_the_ssldir_as_it_was(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    (host.ssldir / "certs").mkdir(parents=True)
    (host.ssldir / "certs/other.pem").write_text("kept")
    host.puppet_conf.mkdir(parents=True)  # a directory where puppet.conf should be
    before = host.snapshot()
    code, _, err = run(imds, enroll_server, host)
    assert code == EXIT_LOCAL
    assert err.startswith("puppetha-enroll: cannot write the puppet files: ")
    assert host.snapshot() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--role", "king"], "argument --role: invalid choice"),
        (["--server", "http://x:8080"], "--server must be https://HOST[:PORT]"),
        (["--ca-fingerprint", "sha1:abcd"], "--ca-fingerprint must be sha256: and 64 hex digits"),
        (["--certname", "Bad Name"], "--certname: certname 'Bad Name' must be lowercase"),
        (["--dns-alt-names", "x.example"], "--dns-alt-names is for masters and lb nodes"),
        (["--timeout", "0"], "--timeout must be between"),
        (["--listen-address", "10.0.0.1"], "--listen-address is for masters only"),
        (["--puppetserver-confdir", "/x"], "--puppetserver-confdir is for masters only"),
        (["--role", "master", "--listen-address", "master.internal"], "--listen-address must be an IP"),
        (["--role", "master", "--enc-script", "puppetha-enc"], "--enc-script must be an absolute path"),
        (["--role", "master", "--listen-port", "0"], "--listen-port 0 is not a TCP port"),
        (["--crl-refresh-interval", "never"], "--crl-refresh-interval must be a Puppet duration"),
        (["--crl-refresh-interval", "0"], "--crl-refresh-interval must be a Puppet duration"),
        (["--crl-refresh-interval", "30m\nserver = evil"], "--crl-refresh-interval must be a Puppet"),
    ],
)
def test_bad_arguments_are_local_errors(argv: list[str], message: str, host: Host) -> None:
    base = {"--role": "agent", "--server": "https://puppet:8080", "--ca-fingerprint": "sha256:" + "0" * 64}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        base[flag] = value
    stderr = io.StringIO()
    code = client.run(
        [x for kv in base.items() for x in kv] + host.args(), stdout=io.StringIO(), stderr=stderr
    )
    assert code == EXIT_LOCAL
    assert message in stderr.getvalue()
    assert stderr.getvalue().count("\n") == 1
    assert host.snapshot() == {}


def test_console_script_exit_code(imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host) -> None:
    """``main()`` as a process: the exit code and the one line on stderr."""
    enroll_server.responder = lambda request: refusal(
        403, "account-not-allowed", "account 123456789012 may not enroll"
    )
    argv = [
        sys.executable, "-m", "puppetha.instance.enroll", "--role", "agent", "--server", enroll_server.url(),
        "--ca-fingerprint", enroll_server.ca.pin, "--imds-url", imds.url, *host.args(),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout) == (EXIT_REFUSED, "")
    assert (
        done.stderr
        == "puppetha-enroll: enrollment refused: account-not-allowed: account 123456789012 may not enroll\n"
    )


# -- pure parts, as tables -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pin"),
    [
        ("sha256:" + "ab" * 32, "sha256:" + "ab" * 32),
        ("SHA256:" + "AB" * 32, "sha256:" + "ab" * 32),
        ("sha256:" + ":".join(["AB"] * 32), "sha256:" + "ab" * 32),
        (" sha256:" + "0f" * 32 + "\n", "sha256:" + "0f" * 32),
        ("ab" * 32, None),
        ("sha256:" + "ab" * 31, None),
        ("sha256:" + "ab" * 33, None),
        ("sha256:" + "zz" * 32, None),
        ("sha1:" + "ab" * 20, None),
    ],
)
def test_parse_pin(text: str, pin: str | None) -> None:
    if pin is None:
        with pytest.raises(ValueError, match="64 hex digits"):
            parse_pin(text)
    else:
        assert parse_pin(text) == pin


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("https://puppet:8080", ("puppet", 8080)),
        ("https://puppet", ("puppet", 8080)),
        ("https://10.0.0.5:9000/", ("10.0.0.5", 9000)),
        ("https://[fd00::1]:8080", ("fd00::1", 8080)),
        ("http://puppet:8080", None),
        ("https://puppet:8080/v1/enroll", None),
        ("https://user@puppet:8080", None),
        ("https://puppet:99999", None),
        ("puppet:8080", None),
    ],
)
def test_parse_server_url(text: str, address: tuple[str, int] | None) -> None:
    if address is None:
        with pytest.raises(ValueError, match="--server"):
            parse_server_url(text)
    else:
        assert parse_server_url(text) == ServerAddress(*address)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("puppet:8140", ("puppet", 8140)),
        ("10.0.0.5:8141", ("10.0.0.5", 8141)),
        ("[fd00::1]:8140", ("fd00::1", 8140)),
        ("puppet", None),
        ("puppet:0", None),
        ("puppet:x", None),
        (":8140", None),
        ("pup pet:8140", None),
        ("a:b:8140", None),
        ("pup\x1bpet:8140", None),
        ("$vardir:8140", None),
        ("IP:10.0.0.5:8140", None),
        ("fd00::1:8140", ("fd00::1", 8140)),
    ],
)
def test_parse_host_port(text: str, address: tuple[str, int] | None) -> None:
    if address is None:
        with pytest.raises(ValueError, match="host:port"):
            parse_host_port(text)
    else:
        assert parse_host_port(text) == ServerAddress(*address)


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, EXIT_REFUSED), (403, EXIT_REFUSED), (409, EXIT_REFUSED), (413, EXIT_REFUSED), (415, EXIT_REFUSED),
     (500, EXIT_UNAVAILABLE), (502, EXIT_UNAVAILABLE), (503, EXIT_UNAVAILABLE), (302, EXIT_UNAVAILABLE)],
)  # fmt: skip
def test_exit_code_for_status(status: int, code: int) -> None:
    assert exit_code_for_status(status) == code


@pytest.mark.parametrize(
    ("role", "server", "alt_names", "private_dns", "expected"),
    [
        ("agent", "puppet", None, PRIVATE_DNS, ()),
        ("master", "puppet", None, PRIVATE_DNS, (PRIVATE_DNS, "puppet")),
        ("master", "10.0.0.9", None, PRIVATE_DNS, (PRIVATE_DNS,)),
        ("lb", "Puppet.Example", None, None, ("puppet.example",)),
        ("master", "puppet", ("front.example",), PRIVATE_DNS, ("front.example",)),
        ("master", PRIVATE_DNS, None, PRIVATE_DNS, (PRIVATE_DNS,)),
    ],
)
def test_requested_alt_names(
    role: str,
    server: str,
    alt_names: tuple[str, ...] | None,
    private_dns: str | None,
    expected: tuple[str, ...],
) -> None:
    options = Options(
        role=role, server=ServerAddress(server, 8080), ca_fingerprint="sha256:" + "0" * 64,
        dns_alt_names=alt_names,
    )  # fmt: skip
    identity = InstanceIdentity(b"{}", "sig", INSTANCE_ID, private_dns)
    assert requested_alt_names(options, identity) == expected


def test_pinned_root_ignores_lookalikes(ca: TestCA) -> None:
    lookalike = TestCA("puppetha Root CA")
    bundle = pem(lookalike.root) + pem(ca.master_ca) + pem(ca.root)
    assert pinned_root(bundle, ca.pin) == ca.root
    with pytest.raises(Untrusted):
        pinned_root(pem(lookalike.root), ca.pin)
    with pytest.raises(Untrusted, match="no readable certificate"):
        pinned_root(b"not pem", ca.pin)


def test_required_usages_match_the_api() -> None:
    assert REQUIRED_USAGE == {
        "agent": ExtendedKeyUsageOID.CLIENT_AUTH,
        "master": ExtendedKeyUsageOID.SERVER_AUTH,
        "lb": ExtendedKeyUsageOID.SERVER_AUTH,
    }


# -- helpers -------------------------------------------------------------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Stub:
    """An enrollment "server" that is not there (only its CA is known)."""

    def __init__(self, ca: TestCA) -> None:
        self.ca = ca
        self.posts: list[bytes] = []

    def url(self, host: str = "127.0.0.1") -> str:
        raise AssertionError("no server")


class FakeTime:
    """The client's clock and sleep, so waiting tests take no time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


def run_waiting(imds: FakeIMDS, server: FakeEnrollServer, host: Host, wait: str,
                clock: FakeTime) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = [
        "--role", "agent", "--server", server.url(), "--ca-fingerprint", server.ca.pin,
        "--imds-url", imds.url, "--timeout", "10", "--wait", wait, *host.args(),
    ]  # fmt: skip
    code = client.run(argv, stdout=stdout, stderr=stderr, sleep=clock.sleep, monotonic=clock.monotonic)
    return code, stdout.getvalue(), stderr.getvalue()


def test_wait_tries_again_while_the_server_is_unavailable(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    answers = [(503, json.dumps({"error": "no-master", "message": "no healthy master yet"}).encode())] * 3
    enroll_server.responder = lambda request: answers.pop() if answers else enroll_server.issue(request)
    clock = FakeTime()
    code, out, err = run_waiting(imds, enroll_server, host, "60", clock)
    assert code == EXIT_OK, err
    assert out.startswith(f"enrolled {INSTANCE_ID} as agent")
    assert clock.slept == [2.0, 4.0, 8.0]
    assert err.count("trying again") == 3
    assert len(enroll_server.posts) == 4


def test_wait_gives_up_at_its_deadline(imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host) -> None:
    enroll_server.responder = lambda request: (503, b'{"error": "aws-unavailable", "message": "down"}')
    clock = FakeTime()
    before = host.snapshot()
    code, _, err = run_waiting(imds, enroll_server, host, "10", clock)
    assert code == EXIT_UNAVAILABLE
    assert clock.slept == [2.0, 4.0]  # a third pause (8 s) would end past the 10 s
    assert err.splitlines()[-1] == "puppetha-enroll: enrollment refused: aws-unavailable: down"
    assert host.snapshot() == before


def test_wait_never_retries_a_refusal(imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host) -> None:
    enroll_server.responder = lambda request: (409, b'{"error": "already-enrolled", "message": "once"}')
    clock = FakeTime()
    code, _, _ = run_waiting(imds, enroll_server, host, "600", clock)
    assert code == EXIT_REFUSED
    assert clock.slept == []
    assert len(enroll_server.posts) == 1


def test_wait_asks_again_about_an_enrollment_in_progress_with_the_same_key(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    """The server resumes a claim, or answers again, only for the key it was made with."""
    in_progress = (503, json.dumps({"error": "in-progress", "message": "ask again"}).encode())
    answers = [in_progress] * 2
    enroll_server.responder = lambda request: answers.pop() if answers else enroll_server.issue(request)
    clock = FakeTime()
    code, _, err = run_waiting(imds, enroll_server, host, "60", clock)
    assert code == EXIT_OK, err
    assert len(enroll_server.posts) == 3
    keys = {
        x509.load_pem_x509_csr(json.loads(post)["csr"].encode()).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for post in enroll_server.posts
    }
    assert len(keys) == 1


def test_wait_writes_again_with_the_same_key_after_a_failed_write(
    imds: FakeIMDS, enroll_server: FakeEnrollServer, host: Host
) -> None:
    """A write that failed on the instance loses the answer: the retry asks with the same key."""
    host.puppet_conf.mkdir(parents=True)  # in the way: puppet.conf cannot be read or replaced

    class Clearing(FakeTime):
        def sleep(self, seconds: float) -> None:
            super().sleep(seconds)
            host.puppet_conf.rmdir()

    clock = Clearing()
    code, _, err = run_waiting(imds, enroll_server, host, "60", clock)
    assert code == EXIT_OK, err
    assert "cannot write the puppet files" in err
    assert len(enroll_server.posts) == 2
    keys = {
        x509.load_pem_x509_csr(json.loads(post)["csr"].encode()).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for post in enroll_server.posts
    }
    assert len(keys) == 1
    assert host.puppet_conf.is_file()


# -- what the instance's side imports ------------------------------------------------------------

#: Imports every module of a package in a fresh interpreter and prints every module then loaded.
_MODULES_LOADED = """
import importlib, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(module.name)
print(" ".join(sorted(sys.modules)))
"""

#: What the instance's side may use of puppetha outside its own package: shared PKI helpers and
#: the ENC's launcher (a master's puppetserver runs the ENC script with its command).
INSTANCE_MAY_USE = {
    "puppetha", "puppetha.pki", "puppetha.pki.certs", "puppetha.pki.keys", "puppetha.pki.names",
    "puppetha.enc", "puppetha.enc.launcher",
}  # fmt: skip


def modules_loaded_by(package: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", _MODULES_LOADED, package],
                          capture_output=True, text=True, timeout=60, check=True)
    return set(done.stdout.split())


def twisted(modules: set[str]) -> set[str]:
    return {name for name in modules if name == "twisted" or name.startswith("twisted.")}


def test_instance_side_imports_no_twisted_and_nothing_of_the_server() -> None:
    """``puppetha-enroll`` runs on a fresh host with cryptography and the stdlib: none of its
    modules, nor anything they import, may pull in Twisted or the server's code."""
    loaded = modules_loaded_by("puppetha.instance")
    assert twisted(loaded) == set()
    ours = {name for name in loaded if name.split(".")[0] == "puppetha"}
    assert {name for name in ours if not name.startswith("puppetha.instance")} <= INSTANCE_MAY_USE
    assert "puppetha.instance.enroll" in ours


def test_import_check_sees_the_server_side() -> None:
    """The check above can fail: the server's enrollment package loads Twisted and the store."""
    loaded = modules_loaded_by("puppetha.enroll")
    assert "twisted.internet" in twisted(loaded)
    assert "puppetha.store" in loaded


def test_a_master_listens_where_the_server_registers_it() -> None:
    """The two sides name Puppet's port apart (the client imports nothing of the server's); the
    server registers every master at its own, so the client's default must be the same."""
    from puppetha.enroll.policy import MASTER_PORT as REGISTERED_PORT
    from puppetha.instance.options import parse_options
    from puppetha.instance.puppetserver import MASTER_PORT, MasterSettings

    options = parse_options(["--role", "master", "--server", "https://enroll.example.net",
                             "--ca-fingerprint", "sha256:" + "ab" * 32])
    assert options.listen_port == MasterSettings(listen_address="10.0.0.5").listen_port == MASTER_PORT
    assert MASTER_PORT == REGISTERED_PORT
