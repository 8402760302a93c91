"""
Slow and odd clients on the enrollment API: each is answered (400, 405, 408, 431, as JSON like
every other error) and closed, never held open unanswered, and nothing is stored.
"""

from __future__ import annotations

import json
import resource
import select
import signal
import socket as socketlib
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from puppetha.enc.service import Classifier, ENCFactory
from puppetha.enroll.api import REQUEST_DEADLINE, make_enrollment_site
from puppetha.enroll.listener import (
    CheckedProxyEndpoint,
    CheckedProxyFactory,
    TrustedPeersEndpoint,
    TrustedPeersFactory,
    enrollment_endpoint,
)
from puppetha.ha.nginx import ENROLL_CONNECTIONS_PER_CLIENT, ENROLL_ZONE_PER_CLIENT, Backend

pytest.register_assert_rewrite("tests.enroll_fixtures")

from tests.enroll_fixtures import World  # noqa: E402 - after the rewrite hook
from tests.test_daemon import free_port, twistd, wait_for  # noqa: E402
from tests.test_enroll_listener import ReactorThread  # noqa: E402
from tests.test_front_nginx import (  # noqa: E402
    LOOPBACK,
    Front,
    front,  # noqa: F401 - the fixture, for this module
)

pytest_plugins = ["tests.enroll_fixtures"]


class Client:
    """One connection to the real site (its channel, request and resources) in memory."""

    def __init__(self, world: World) -> None:
        site = make_enrollment_site(world.enrollment, world.clock)
        self.channel = site.buildProtocol(IPv4Address("TCP", "10.20.1.5", 50000))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def answer(self) -> tuple[int, dict[str, str]]:
        raw = self.transport.value()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        assert b"content-type: application/json" in head.lower(), raw[:300]
        return status, json.loads(body) if body else {}


def refused(world: World, raw: bytes) -> tuple[int, str]:
    before = world.state()
    client = Client(world)
    client.send(raw)
    status, body = client.answer()
    assert client.transport.disconnecting  # answered, then closed
    assert set(body) == {"error", "message"}
    assert world.state() == before
    return status, body["error"]


def test_a_client_sending_a_byte_every_few_seconds_is_cut_at_the_deadline(world: World) -> None:
    client = Client(world)
    request = b"POST /v1/enroll HTTP/1.1\r\nHost: puppet\r\nContent-Type: application/json\r\n"
    sent = 0
    # Each byte restarts the idle timeout; the deadline for the whole request does not move.
    while sent < len(request):
        client.send(request[sent:sent + 1])
        sent += 1
        world.clock.advance(3)
        if client.transport.disconnecting:
            break
    assert client.transport.disconnecting
    assert sent <= REQUEST_DEADLINE / 3 + 1
    message = f"the request did not arrive whole within {REQUEST_DEADLINE}s"
    assert client.answer() == (408, {"error": "too-slow", "message": message})


def test_a_connection_that_never_sends_is_cut_at_the_deadline(world: World) -> None:
    client = Client(world)
    world.clock.advance(REQUEST_DEADLINE - 0.5)
    assert not client.transport.disconnecting
    world.clock.advance(1)
    assert client.transport.disconnecting


def test_the_deadline_ends_with_the_request_and_starts_again_with_the_next(world: World) -> None:
    client = Client(world)
    client.send(b"GET /v1/ca HTTP/1.1\r\nHost: puppet\r\n\r\n")
    world.clock.advance(REQUEST_DEADLINE + 1)
    # Answered and kept alive: the deadline is for receiving a request, not for idling after one.
    assert client.transport.value().startswith(b"HTTP/1.1 200 ")
    assert not client.transport.disconnecting
    client.send(b"GET /v1/ca HTTP/1.1\r\n")
    world.clock.advance(REQUEST_DEADLINE + 1)
    assert client.transport.disconnecting
    assert b'"too-slow"' in client.transport.value()


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: puppet\r\n\r\n", 400, "request-line-too-long"),
        (b"GET /v1/ca HTTP/1.1\r\nHost: puppet\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
         431, "headers-too-large"),
        (b"GET /v1/ca HTTP/1.1\r\nHost: puppet\r\n" + b"X-Pad: " + b"a" * 4000 + b"\r\n" * 1
         + b"X-Pad2: " + b"a" * 7000 + b"\r\nX-Pad3: " + b"a" * 7000 + b"\r\n\r\n", 431, "headers-too-large"),
        (b"GET /v1/ca HTTP/1.1\r\nHost: puppet\r\n" + b"X-A: 1\r\n" * 2000 + b"\r\n",
         431, "headers-too-large"),
        (b"GET /v1/ca HTTP/1.1\nHost: puppet\n\n", 400, "bad-framing"),
        (b"GET /v1/ca HTTP/1.1\r\nHost: puppet\n\r\n", 400, "bad-framing"),
        (b"GARBAGE\r\n\r\n", 400, "bad-framing"),
        (b"POST /v1/enroll HTTP/1.1\r\nHost: puppet\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
         400, "bad-framing"),
        (b"POST /v1/enroll HTTP/1.1\r\nHost: puppet\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
         400, "bad-framing"),
    ],
    ids=["20KB-request-line", "200KB-header", "16KB-of-headers", "2000-headers", "LF-only", "one-bare-LF",
         "garbage", "two-lengths", "bad-chunk"],
)
def test_odd_framing_is_answered_in_json_and_closed(world: World, raw: bytes, status: int, code: str) -> None:
    assert refused(world, raw) == (status, code)


@pytest.mark.parametrize(
    "reads",
    [
        [b"GET /v1/health HTTP/1.1\r\nHost: puppet", b"\nX: y\r\n\r\n"],
        [b"GET /v1/health HTTP/1.1\r\nHost: puppet\r\n", b"X: y\n", b"\r\n"],
        [b"GET /v1/health HTTP/1.1\r\n\r\nGET /v1/health HTTP/1.1\r\n", b"Host: puppet\n\r\n"],
    ],
    ids=["LF-starts-a-read", "LF-ends-a-read", "LF-in-the-next-request"],
)
def test_a_bare_line_feed_is_found_across_reads(world: World, reads: list[bytes]) -> None:
    client = Client(world)
    for data in reads:
        client.send(data)
    raw = client.transport.value()
    assert b"HTTP/1.1 400 Bad Request" in raw, raw[-300:]
    assert raw.endswith(b'{"error":"bad-framing","message":"lines must end with CRLF"}\n')
    assert client.transport.disconnecting


def test_a_body_may_hold_bare_line_feeds(world: World) -> None:
    body = b'{\n"role": "agent"\n}'
    client = Client(world)
    client.send(b"POST /v1/enroll HTTP/1.1\r\nHost: puppet\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert client.answer() == (400, {"error": "missing-field", "message": "document is missing"})


def test_head_on_the_enrollment_is_405(world: World) -> None:
    client = Client(world)
    client.send(b"HEAD /v1/enroll HTTP/1.1\r\nHost: puppet\r\n\r\n")
    raw = client.transport.value()
    assert raw.startswith(b"HTTP/1.1 405 "), raw[:200]
    assert b"Allow: POST\r\n" in raw


def test_head_on_a_bundle_still_answers(world: World) -> None:
    client = Client(world)
    client.send(b"HEAD /v1/ca HTTP/1.1\r\nHost: puppet\r\n\r\n")
    assert client.transport.value().startswith(b"HTTP/1.1 200 ")


# -- PROXY headers from the trusted peer ------------------------------------------------------


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def v2_header(family: int, addresses: bytes) -> bytes:
    # Signature, version 2 / PROXY command, family and transport, length, addresses.
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, family]) + struct.pack("!H", len(addresses))
            + addresses)


def proxied(raw: bytes, clock: Clock | None = None) -> tuple[StringTransport, Recorder, Any]:
    recorder = Recorder()
    endpoint = enrollment_endpoint(TCP4ServerEndpoint(Clock(), 0), ["10.0.0.5"], clock or Clock())
    assert isinstance(endpoint, CheckedProxyEndpoint)
    factory = CheckedProxyFactory(Factory.forProtocol(lambda: recorder), endpoint.warning)
    protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.5", 40000))
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    return transport, recorder, protocol


GOOD_V2 = v2_header(0x11, socketlib.inet_aton("10.20.1.5") + socketlib.inet_aton("10.0.0.9")
                    + struct.pack("!HH", 40000, 8080))


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 999.1.1.1 10.0.0.9 40000 8080\r\n",
        b"PROXY TCP4 ::1 10.0.0.9 40000 8080\r\n",
        b"PROXY TCP4 10.20.1.5 10.0.0.9 99999 8080\r\n",
        b"PROXY TCP4 10.20.1.5 10.0.0.9 0 8080\r\n",
        b"PROXY TCP6 10.20.1.5 ::1 40000 8080\r\n",
        b"PROXY TCP4 0.0.0.0 10.0.0.9 40000 8080\r\n",
        b"PROXY UNKNOWN\r\n",
        v2_header(0x11, b"\x00" * 4 + socketlib.inet_aton("10.0.0.9") + struct.pack("!HH", 40000, 8080)),
        v2_header(0x11, b"garbage"),
        v2_header(0x31, b"/tmp/x".ljust(216, b"\x00")),
    ],
    ids=["999.1.1.1", "v6-in-TCP4", "port-99999", "port-0", "v4-in-TCP6", "unspecified", "unknown",
         "v2-zero-source", "v2-garbage", "v2-unix"],
)
def test_an_impossible_proxy_header_is_refused_as_malformed(header: bytes) -> None:
    with capturedLogs() as events:
        transport, recorder, _ = proxied(header + b"GET /v1/ca HTTP/1.1\r\n\r\n")
    assert transport.disconnecting
    assert recorder.received == b""  # nothing reached TLS or HTTP
    assert next(e["reason"] for e in events if "reason" in e).startswith("a malformed PROXY header")


@pytest.mark.parametrize("header", [b"PROXY TCP4 10.20.1.5 10.0.0.9 40000 8080\r\n", GOOD_V2],
                         ids=["v1", "v2"])
def test_a_good_proxy_header_passes_with_its_source(header: bytes) -> None:
    transport, recorder, protocol = proxied(header + b"hello")
    assert not transport.disconnecting
    assert recorder.received == b"hello"
    assert protocol.getPeer() == IPv4Address("TCP", "10.20.1.5", 40000)


def test_a_proxy_header_in_pieces_passes_with_its_source() -> None:
    header = b"PROXY TCP4 10.20.1.5 10.0.0.9 40000 8080\r\n"
    transport, recorder, protocol = proxied(header[:1])
    for byte in header[1:]:
        assert recorder.received == b""
        protocol.dataReceived(bytes([byte]))
    protocol.dataReceived(b"hello")
    assert not transport.disconnecting
    assert recorder.received == b"hello"
    assert protocol.getPeer() == IPv4Address("TCP", "10.20.1.5", 40000)


def test_connections_dropped_for_lacking_a_header_are_logged_rate_limited() -> None:
    clock = Clock()
    endpoint = enrollment_endpoint(TCP4ServerEndpoint(clock, 0), ["10.0.0.5"], clock)
    assert isinstance(endpoint, CheckedProxyEndpoint)
    factory = CheckedProxyFactory(Factory.forProtocol(Recorder), endpoint.warning)
    with capturedLogs() as events:
        for _ in range(50):
            protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", 40000))
            transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.5", 40000))
            protocol.makeConnection(transport)
            protocol.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a bare ClientHello
            assert transport.disconnecting
        clock.advance(11)
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", 40000))
        protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.5", 40000)))
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
    drops = [e for e in events if e.get("reason") == "no PROXY header"]
    assert [e["held"] for e in drops] == [0, 49]
    assert "10.0.0.5" in drops[0]["peer"]


# -- the ENC at its connection limit ----------------------------------------------------------


def test_the_enc_says_busy_before_it_closes_every_time(tmp_path: Path) -> None:
    """Real UNIX sockets: closing with the client's line unread used to reset the connection."""
    runner = ReactorThread()
    path = str(tmp_path / "enc.sock")
    # No classifier is ever asked: every connection past the held ones is busy.
    factory = ENCFactory(cast(Classifier, None), runner.reactor, timeout=60, max_connections=4)
    port = runner.call(runner.reactor.listenUNIX, path, factory, backlog=1024)
    held = []
    try:
        for _ in range(4):
            connection = socketlib.socket(socketlib.AF_UNIX)
            connection.connect(path)
            held.append(connection)
        outcomes: dict[str, int] = {}
        for _ in range(200):
            with socketlib.socket(socketlib.AF_UNIX) as client:
                client.settimeout(10)
                client.connect(path)
                # As puppetha-enc does: the line, end of input, then read to the end.
                try:
                    client.sendall(b"web1.example.com\n")
                    client.shutdown(socketlib.SHUT_WR)
                    answer = b""
                    while chunk := client.recv(4096):
                        answer += chunk
                    outcome = answer.decode()
                except OSError as e:
                    outcome = type(e).__name__
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert outcomes == {"ERR busy too many connections, try again\n": 200}
    finally:
        for connection in held:
            connection.close()
        runner.call(port.stopListening)
        runner.stop()


# -- nginx in front of the enrollment services --------------------------------------------------


def test_nginx_limits_the_connections_one_address_holds_on_the_enrollment_port(
    front: Front,  # noqa: F811 - the fixture
) -> None:
    listener = socketlib.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(64)
    listener.settimeout(5)
    front.service.enroll_backends = (Backend(LOOPBACK, listener.getsockname()[1]),)
    front.reconcile()
    text = Path(front.nginx.generations.config_path).read_text()
    assert f"limit_conn {ENROLL_ZONE_PER_CLIENT} {ENROLL_CONNECTIONS_PER_CLIENT};" in text
    assert "proxy_timeout 30s;" in text

    def proxied(client: socketlib.socket) -> bool:
        """nginx connected this client through: its PROXY header reached the backend."""
        try:
            client.sendall(b"x")
            # Either nginx passes the connection on, or it closes the client.
            ready, _, _ = select.select([listener, client], [], [], 5)
            if listener not in ready:
                return False
            backend, _ = listener.accept()
        except OSError:  # reset by nginx
            return False
        backend.settimeout(5)
        data = b""
        while not data.endswith(b"x"):
            chunk = backend.recv(1024)
            if not chunk:
                break
            data += chunk
        held_backends.append(backend)
        return data.startswith(b"PROXY TCP4 ")

    held: list[socketlib.socket] = []
    held_backends: list[socketlib.socket] = []

    def up() -> bool:
        try:
            probe = socketlib.create_connection((LOOPBACK, front.enroll_port), timeout=5)
        except OSError:
            return False
        held.append(probe)
        return proxied(probe)

    try:
        front.eventually(up, "the enrollment port")
        for _ in range(ENROLL_CONNECTIONS_PER_CLIENT - 1):
            client = socketlib.create_connection((LOOPBACK, front.enroll_port), timeout=5)
            held.append(client)
            assert proxied(client)
        # One more from the same address: nginx closes it without passing it on.
        extra = socketlib.create_connection((LOOPBACK, front.enroll_port), timeout=5)
        held.append(extra)
        try:
            extra.sendall(b"x")
            closed = extra.recv(1024) == b""
        except ConnectionResetError:
            closed = True
        assert closed
        # Another closes: the address may connect again (once nginx has seen the close).
        held.pop(0).close()
        front.eventually(up, "a connection after one was closed", attempts=20)
    finally:
        for s in held + held_backends:
            s.close()
        listener.close()


# -- a flood on the enrollment port, on the real daemon -----------------------------------------


def lowered_descriptors() -> None:
    # The default limit of many systems, soft and hard: the daemon cannot raise it.
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def test_a_flood_on_the_enrollment_port_never_takes_the_enc_with_it(tmp_path: Path) -> None:
    port = free_port()
    socket_path = tmp_path / "enc.sock"
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(
            twistd("puppetha", "--state-dir", str(tmp_path / "state"), "--set", f"enc.socket={socket_path}",
                   "--set", f"enroll.listen=tcp:{port}:interface=127.0.0.1"),
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=lowered_descriptors)  # noqa: PLW1509
    flood: list[socketlib.socket] = []
    try:
        wait_for(log, "puppetha started")
        # More connections than the daemon has descriptors, held open without a byte.
        for _ in range(1100):
            connection = socketlib.socket()
            connection.settimeout(2)
            flood.append(connection)
            if connection.connect_ex(("127.0.0.1", port)) != 0:
                break  # the backlog is full: nothing more gets in
        time.sleep(1)  # the daemon takes in what got through
        enc = subprocess.run([str(Path(sys.executable).parent / "puppetha-enc"), "--socket", str(socket_path),
                              "i-0123456789abcdef0"], capture_output=True, text=True, timeout=60, check=False)
        # The ENC answered: the node is unknown (not a connection failure or a timeout).
        assert enc.returncode == 1, enc.stderr
        assert "not enrolled" in enc.stderr, enc.stderr
        wait_for(log, "connections already open")  # the enrollment listener took only its share
    finally:
        for connection in flood:
            connection.close()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    assert "Too many open files" not in log.read_text()


def test_connections_from_untrusted_peers_are_logged_rate_limited() -> None:
    clock = Clock()
    endpoint = enrollment_endpoint(TCP4ServerEndpoint(clock, 0), ["10.0.0.5"], clock)
    assert isinstance(endpoint, CheckedProxyEndpoint)
    trusted = endpoint.wrapped
    assert isinstance(trusted, TrustedPeersEndpoint)
    factory = TrustedPeersFactory(Factory.forProtocol(Recorder), trusted.allowed, trusted.warn)
    with capturedLogs() as events:
        for _ in range(30):
            assert factory.buildProtocol(IPv4Address("TCP", "10.0.0.6", 40000)) is None
        clock.advance(11)
        assert factory.buildProtocol(IPv4Address("TCP", "10.0.0.6", 40000)) is None
    assert [e["held"] for e in events if "not a configured proxy" in e["log_format"]] == [0, 29]


def test_a_trickling_client_is_cut_on_the_real_daemon_through_tls(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(
            twistd("puppetha", "--state-dir", str(tmp_path / "state"),
                   "--set", f"enc.socket={tmp_path}/enc.sock",
                   "--set", f"enroll.listen=tcp:{port}:interface=127.0.0.1"),
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(log, "puppetha started")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # what is checked here is the deadline, not the name
        with socketlib.create_connection(("127.0.0.1", port), timeout=30) as raw, \
                context.wrap_socket(raw) as client:
            client.sendall(b"POST /v1/enroll HTTP/1.1\r\nHost: puppet\r\n")
            sent = 0
            answer = b""
            for byte in b"X-Trickle: " + b"a" * 100:
                try:
                    client.sendall(bytes([byte]))
                except OSError:
                    break
                sent += 1
                # A byte every 2 s: the idle timeout (30 s) never fires, the request deadline does.
                readable, _, _ = select.select([client], [], [], 2)
                if readable:
                    answer = client.recv(4096)
                    break
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b'"too-slow"' in answer
        assert sent <= REQUEST_DEADLINE // 2 + 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
