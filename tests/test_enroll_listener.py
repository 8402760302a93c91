"""
The TLS listener with the PROXY protocol: the peer filter in memory, the server certificate
helper, and the whole stack on a real loopback socket.

The network tests run a reactor *instance* (never the global one) in a thread, with a real
thread pool, the SQLite store, the real CA and moto as AWS; the client side is the standard
library's ssl over a plain socket, which sends the PROXY header itself.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from attrs import define
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.threads import blockingCallFromThread
from twisted.python.threadpool import ThreadPool

from puppetha.enroll.api import make_enrollment_site
from puppetha.enroll.listener import (
    SERVER_KEY_FILE,
    TrustedPeersFactory,
    ensure_server_credentials,
    listen_enrollment,
)
from puppetha.enroll.service import Enrollment
from puppetha.pki.authority import CertificateAuthority
from puppetha.pki.certs import fingerprint
from puppetha.pki.keys import KeyType
from puppetha.pki.vault import FileKeyVault
from puppetha.store.records import Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.threads import Blocking

pytest.register_assert_rewrite("tests.enroll_fixtures")

from tests.enroll_fixtures import AWS, KINDS, make_csr, make_policy, snapshot  # noqa: E402

pytest_plugins = ["tests.enroll_fixtures"]

T = TypeVar("T")


# -- the peer filter, in memory ---------------------------------------------------------------


class Echo(Protocol):
    pass


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        (IPv4Address("TCP", "10.0.0.5", 40000), True),
        (IPv4Address("TCP", "10.0.0.6", 40000), False),
        (IPv6Address("TCP", "::ffff:10.0.0.5", 40000), True),
        (IPv6Address("TCP", "fd00::5", 40000), True),
        (IPv6Address("TCP", "fd00::6", 40000), False),
        (UNIXAddress(b"/run/x.sock"), False),
    ],
)
def test_only_configured_proxies_get_a_protocol(peer: Any, trusted: bool) -> None:
    factory = TrustedPeersFactory(Factory.forProtocol(Echo), ["10.0.0.5", "fd00::5"])
    built = factory.buildProtocol(peer)
    assert (built is not None) is trusted
    if trusted:
        assert isinstance(built, Echo)


def test_no_proxies_trusts_nobody() -> None:
    factory = TrustedPeersFactory(Factory.forProtocol(Echo), [])
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)) is None


# -- the server's certificate -----------------------------------------------------------------


@pytest.fixture
def authority(tmp_path: Path) -> Iterator[CertificateAuthority]:
    store = SQLiteStore(str(tmp_path / "puppetha.sqlite"))
    ca = CertificateAuthority(
        Records(store),
        FileKeyVault.create(tmp_path / "vault.key"),
        key_type=KeyType.EC_P256,
        now=time.time,
        ca_lifetime=timedelta(days=3650),
        cert_lifetime=timedelta(days=365),
        crl_lifetime=timedelta(days=7),
    )
    ca.ensure_root("puppetha test root")
    yield ca
    store.close()


def test_server_credentials_are_issued_once_and_kept_private(authority: CertificateAuthority,
                                                               tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = ensure_server_credentials(authority, state, ["puppet", "puppet.example.net", "10.0.0.10"],
                                      KeyType.EC_P256)
    assert stat.S_IMODE((state / SERVER_KEY_FILE).stat().st_mode) == 0o600
    names = first.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in names] == ["puppet", "puppet.example.net", "10.0.0.10"]
    assert first.certificate.issuer == authority.certificate("root").subject
    assert first.root_fingerprint == fingerprint(authority.certificate("root"))

    again = ensure_server_credentials(authority, state, ["puppet", "10.0.0.10"], KeyType.EC_P256)
    assert again.certificate.serial_number == first.certificate.serial_number

    renamed = ensure_server_credentials(authority, state, ["enroll.example.net"], KeyType.EC_P256)
    assert renamed.certificate.serial_number != first.certificate.serial_number
    assert stat.S_IMODE((state / SERVER_KEY_FILE).stat().st_mode) == 0o600


def test_server_credentials_are_renewed_near_their_end(
    authority: CertificateAuthority, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = ensure_server_credentials(authority, state, ["puppet"], KeyType.EC_P256)
    renewed = ensure_server_credentials(authority, state, ["puppet"], KeyType.EC_P256,
                                        renew_before=timedelta(days=400))
    assert renewed.certificate.serial_number != first.certificate.serial_number


def test_a_loosened_key_file_is_tightened(authority: CertificateAuthority, tmp_path: Path) -> None:
    state = tmp_path / "state"
    ensure_server_credentials(authority, state, ["puppet"], KeyType.EC_P256)
    os.chmod(state / SERVER_KEY_FILE, 0o644)
    ensure_server_credentials(authority, state, ["puppet"], KeyType.EC_P256)
    assert stat.S_IMODE((state / SERVER_KEY_FILE).stat().st_mode) == 0o600


# -- the real network -------------------------------------------------------------------------


class ReactorThread:
    """A private reactor running in a thread (the global reactor is never touched)."""

    def __init__(self) -> None:
        self.reactor = SelectReactor()
        self.thread = threading.Thread(
            target=self.reactor.run, kwargs={"installSignalHandlers": False}, daemon=True
        )
        self.thread.start()

    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return blockingCallFromThread(self.reactor, f, *args, **kwargs)

    def stop(self) -> None:
        self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(timeout=10)


@define
class Served:
    aws: AWS
    signer: Any
    store: SQLiteStore
    authority: CertificateAuthority
    root_pem: Path
    port: int
    fleet: Any

    def state(self) -> dict[str, list[tuple[str, int]]]:
        return snapshot(self.store)


def serve(aws: AWS, signer: Any, tmp_path: Path, proxy_from: list[str]) -> Iterator[Served]:
    runner = ReactorThread()
    pool = ThreadPool(minthreads=0, maxthreads=4, name="enroll-test")
    pool.start()
    store = SQLiteStore(str(tmp_path / "puppetha.sqlite"))
    records = Records(store)
    authority = CertificateAuthority(
        records,
        FileKeyVault.create(tmp_path / "vault.key"),
        key_type=KeyType.EC_P256,
        now=runner.reactor.seconds,
        ca_lifetime=timedelta(days=3650),
        cert_lifetime=timedelta(days=365),
        crl_lifetime=timedelta(days=7),
    )
    authority.ensure_root("puppetha test root")
    enrollment = Enrollment(
        policy=make_policy(),
        trust=signer.trust_store(),
        records=Blocking(runner.reactor, pool, records),
        authority=Blocking(runner.reactor, pool, authority),
        cloud=Blocking(runner.reactor, pool, aws.cloud),
        clock=runner.reactor,
    )
    credentials = ensure_server_credentials(authority, tmp_path / "state", ["puppet"], KeyType.EC_P256)
    root_pem = tmp_path / "root.pem"
    root_pem.write_bytes(credentials.root.public_bytes(serialization.Encoding.PEM))
    site = make_enrollment_site(enrollment, runner.reactor)
    endpoint = TCP4ServerEndpoint(runner.reactor, 0, interface="127.0.0.1")
    port = runner.call(listen_enrollment, endpoint, site, credentials.tls_context(), proxy_from,
                       clock=runner.reactor)
    try:
        yield Served(aws, signer, store, authority, root_pem, port.getHost().port, aws.fleet)
    finally:
        runner.call(port.stopListening)
        runner.stop()
        pool.stop()
        store.close()


@pytest.fixture
def behind_proxy(enroll_aws: AWS, aws_signer: Any, tmp_path: Path) -> Iterator[Served]:
    yield from serve(enroll_aws, aws_signer, tmp_path, proxy_from=["127.0.0.1"])


@pytest.fixture
def proxy_elsewhere(enroll_aws: AWS, aws_signer: Any, tmp_path: Path) -> Iterator[Served]:
    yield from serve(enroll_aws, aws_signer, tmp_path, proxy_from=["10.255.255.1"])


@pytest.fixture
def direct(enroll_aws: AWS, aws_signer: Any, tmp_path: Path) -> Iterator[Served]:
    yield from serve(enroll_aws, aws_signer, tmp_path, proxy_from=[])


def proxy_v1(source: str, port: int) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 41000 {port}\r\n".encode()


def https(
    served: Served, method: str, path: str, body: bytes = b"", header: bytes = b""
) -> tuple[int, bytes]:
    """One request over TLS (after ``header`` in clear), trusting only the root CA."""
    context = ssl.create_default_context(cafile=str(served.root_pem))
    with socket.create_connection(("127.0.0.1", served.port), timeout=20) as raw:
        if header:
            raw.sendall(header)
        with context.wrap_socket(raw, server_hostname="puppet") as tls:
            request = (
                f"{method} {path} HTTP/1.1\r\nHost: puppet:8080\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            tls.sendall(request)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    head, _, content = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        content = dechunk(content)
    return status, content


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def enroll_body(served: Served, instance: Any, role: str) -> bytes:
    document, signature = served.signer.identity_for(instance)
    return json.dumps({
        "role": role,
        "document": document.decode(),
        "signature": signature,
        "csr": make_csr(instance.instance_id).decode(),
    }).encode()


def test_enrollment_through_the_proxy_protocol_and_tls(behind_proxy: Served) -> None:
    served = behind_proxy
    master = served.fleet.launch(role="master")
    status, body = https(served, "POST", "/v1/enroll", enroll_body(served, master, "master"),
                         header=proxy_v1(master.private_ip, served.port))
    assert status == 200, body
    assert json.loads(body)["certname"] == master.instance_id

    # Racing agents on real threads: one enrollment each, every one issued once.
    agents = [served.fleet.launch(role="agent") for _ in range(3)]
    results: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def attempt(agent: Any) -> None:
        answer = https(served, "POST", "/v1/enroll", enroll_body(served, agent, "agent"),
                       header=proxy_v1(agent.private_ip, served.port))
        with lock:
            results.append(answer)

    threads = [threading.Thread(target=attempt, args=(a,)) for a in agents for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(s for s, _ in results) == [200] * 3 + [409] * 3
    assert len(served.state()["node"]) == 4


def test_source_from_the_proxy_header_is_checked(behind_proxy: Served) -> None:
    served = behind_proxy
    master = served.fleet.launch(role="master")
    before = served.state()
    status, body = https(served, "POST", "/v1/enroll", enroll_body(served, master, "master"),
                         header=proxy_v1("10.20.1.254", served.port))
    assert (status, json.loads(body)["error"]) == (403, "source-mismatch")
    assert served.state() == before


def test_proxy_header_from_an_untrusted_address_is_dropped(proxy_elsewhere: Served) -> None:
    served = proxy_elsewhere
    master = served.fleet.launch(role="master")
    before = served.state()
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        https(served, "POST", "/v1/enroll", enroll_body(served, master, "master"),
              header=proxy_v1(master.private_ip, served.port))
    assert served.state() == before
    assert all(served.state()[kind] == before[kind] for kind in KINDS)


def test_trusted_proxy_without_a_header_is_dropped(behind_proxy: Served) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        https(behind_proxy, "GET", "/v1/health")


def test_direct_tls_sends_the_chain_and_serves_bundles(direct: Served) -> None:
    status, body = https(direct, "GET", "/v1/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, body = https(direct, "GET", "/v1/ca")
    assert status == 200
    assert x509.load_pem_x509_certificates(body)[0] == direct.authority.certificate("root")

    # The handshake carries the server certificate and then the root, for pinning.
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    with socket.create_connection(("127.0.0.1", direct.port), timeout=20) as raw:
        # pyOpenSSL needs a blocking socket (a timeout makes it non-blocking underneath).
        raw.settimeout(None)
        connection = SSL.Connection(context, raw)
        connection.set_tlsext_host_name(b"puppet")
        connection.set_connect_state()
        connection.do_handshake()
        chain = connection.get_peer_cert_chain(as_cryptography=True)
        version = connection.get_protocol_version_name()
    assert chain is not None
    assert len(chain) == 2
    assert chain[1] == direct.authority.certificate("root")
    assert version in ("TLSv1.2", "TLSv1.3")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_below_1_2_is_refused(direct: Served) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", direct.port), timeout=20) as raw, \
            pytest.raises((ssl.SSLError, ConnectionError, OSError)), \
            context.wrap_socket(raw, server_hostname="puppet"):
        pass
