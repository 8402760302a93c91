"""The HTTP surface of the enrollment API: request shapes, sizes, media types, bundles, health."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure

from puppetha.enroll.api import (
    IDLE_TIMEOUT,
    MAX_BODY,
    REQUEST_DEADLINE,
    enrollment_resource,
    make_enrollment_site,
    parse_enrollment,
)
from puppetha.enroll.service import EnrollmentRequest

pytest.register_assert_rewrite("tests.enroll_fixtures")

from tests.enroll_fixtures import (  # noqa: E402 - after the rewrite hook
    AWS,
    SwitchableStore,
    World,
    build_world,
)

pytest_plugins = ["tests.enroll_fixtures"]


@pytest.fixture
def agent_body(world: World) -> dict[str, str]:
    agent = world.launch()
    return world.body_for(agent)


def assert_refused(world: World, answer, status: int, code: str, before) -> None:
    assert (answer.status, answer.error) == (status, code), answer.body
    assert answer.headers["content-type"] == "application/json"
    assert answer.json["message"]
    assert world.state() == before


def test_oversize_body_is_413_before_parsing(world: World, agent_body: dict[str, str]) -> None:
    body = json.dumps({**agent_body, "padding": "x" * MAX_BODY}).encode()
    before = world.state()
    answer = world.call("/v1/enroll", body)
    assert_refused(world, answer, 413, "too-large", before)


def test_oversize_garbage_is_413_not_400(world: World) -> None:
    before = world.state()
    answer = world.call("/v1/enroll", b"{" * (MAX_BODY + 1))
    assert_refused(world, answer, 413, "too-large", before)


def test_body_at_the_limit_is_parsed(world: World) -> None:
    body = b" " * (MAX_BODY - 2) + b"[]"
    assert len(body) == MAX_BODY
    answer = world.call("/v1/enroll", body)
    assert (answer.status, answer.error) == (400, "malformed-json")


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/jsonx"]
)
def test_other_media_types_are_415(world: World, agent_body: dict[str, str], content_type: str) -> None:
    before = world.state()
    answer = world.call("/v1/enroll", json.dumps(agent_body).encode(), headers={"Content-Type": content_type})
    assert_refused(world, answer, 415, "not-json", before)


def test_json_with_a_charset_is_accepted(world: World) -> None:
    answer = world.call("/v1/enroll", b"[]", headers={"Content-Type": "application/json; charset=utf-8"})
    assert (answer.status, answer.error) == (400, "malformed-json")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "malformed-json"),
        (b"{not json", "malformed-json"),
        (b"\xff\xfe{}", "malformed-json"),
        (b"[1, 2]", "malformed-json"),
        (b'"a string"', "malformed-json"),
        (b"[" * 5000 + b"]" * 5000, "malformed-json"),
        (b'{"document": "d", "signature": "s", "csr": "c"}', "missing-field"),
        (b'{"role": "agent", "signature": "s", "csr": "c"}', "missing-field"),
        (b'{"role": "agent", "document": "d", "signature": "s"}', "missing-field"),
        (b'{"role": 1, "document": "d", "signature": "s", "csr": "c"}', "bad-field"),
        (b'{"role": "agent", "document": {}, "signature": "s", "csr": "c"}', "bad-field"),
        (b'{"role": "agent", "document": "d", "signature": null, "csr": "c"}', "bad-field"),
        (b'{"role": "agent", "document": "", "signature": "s", "csr": "c"}', "bad-field"),
        (b'{"role": "agent", "document": "d", "signature": "s", "csr": "\\u00e9"}', "bad-field"),
        (b'{"role": "agent", "document": "\\ud800", "signature": "s", "csr": "c"}', "bad-field"),
        (b'{"role": "admin", "document": "d", "signature": "s", "csr": "c"}', "unknown-role"),
        (b'{"role": "Agent", "document": "d", "signature": "s", "csr": "c"}', "unknown-role"),
    ],
)
def test_malformed_requests_are_400(world: World, body: bytes, code: str) -> None:
    before = world.state()
    answer = world.call("/v1/enroll", body)
    assert_refused(world, answer, 400, code, before)


def test_parse_keeps_the_exact_document_bytes() -> None:
    document = '{\n  "accountId" : "123456789012"\n}'
    parsed = parse_enrollment(
        json.dumps({"role": "lb", "document": document, "signature": "c2ln", "csr": "pem", "x": 1}).encode()
    )
    assert parsed == EnrollmentRequest(role="lb", document=document.encode(), signature="c2ln", csr=b"pem")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/enroll"), ("PUT", "/v1/enroll"), ("POST", "/v1/ca"), ("DELETE", "/v1/health")],
)
def test_wrong_method_is_405_json(world: World, method: str, path: str) -> None:
    answer = world.call(path, None, method=method)
    assert (answer.status, answer.error) == (405, "method-not-allowed")
    assert answer.headers["allow"]


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/", "/v2/enroll", "/v1/enroll/extra", "/v1/nothing"])
def test_unknown_paths_are_404_json(world: World, path: str) -> None:
    answer = world.call(path, None, method="GET")
    assert (answer.status, answer.error) == (404, "not-found")


def test_ca_bundle_holds_every_ca_root_first(world: World) -> None:
    master = world.launch("master")
    assert world.enroll(master, "master").status == 200
    answer = world.call("/v1/ca", None, method="GET")
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/x-pem-file"
    certs = x509.load_pem_x509_certificates(answer.body)
    # The root, then the lb CA and the master's CA (both made by the master's enrollment).
    assert len(certs) == 3
    assert certs[0].subject == certs[0].issuer
    assert all(c.issuer == certs[0].subject for c in certs[1:])


def test_crl_bundle_holds_a_crl_per_ca(world: World) -> None:
    master = world.launch("master")
    assert world.enroll(master, "master").status == 200
    answer = world.call("/v1/crl", None, method="GET")
    assert answer.status == 200
    assert answer.body.count(b"-----BEGIN X509 CRL-----") == 3  # root, lb CA, the master's CA
    for pem in answer.body.split(b"-----END X509 CRL-----")[:-1]:
        x509.load_pem_x509_crl(pem + b"-----END X509 CRL-----\n")


def test_health(world: World) -> None:
    answer = world.call("/v1/health", None, method="GET")
    assert (answer.status, answer.json) == (200, {"status": "ok"})


def test_store_down_is_503_with_retry_after_everywhere(enroll_aws: AWS, aws_signer, tmp_path: Path) -> None:
    world = build_world(enroll_aws, aws_signer, tmp_path, store_wrapper=SwitchableStore.wrapping)
    try:
        store = world.records.store
        assert isinstance(store, SwitchableStore)
        store.down = True
        for path in ("/v1/health", "/v1/ca", "/v1/crl"):
            answer = world.call(path, None, method="GET")
            assert (answer.status, answer.error) == (503, "store-unavailable"), path
            assert int(answer.headers["retry-after"]) > 0
    finally:
        world.store.close()


def exchange(world: World, raw: bytes) -> bytes:
    """Feed raw HTTP to the real site (with its BoundedRequest) and return what it answered."""
    site = make_enrollment_site(world.enrollment, world.clock)
    channel = site.buildProtocol(IPv4Address("TCP", "10.20.1.5", 50000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    world.clock.advance(1)
    answer: bytes = transport.value()
    return answer


def test_site_refuses_a_large_chunked_body_without_storing_it(world: World) -> None:
    head = (b"POST /v1/enroll HTTP/1.1\r\nHost: puppet\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 4096
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(40)) + b"0\r\n\r\n"
    before = world.state()
    answer = exchange(world, head + body)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'"too-large"' in answer
    assert world.state() == before


def test_site_refuses_an_announced_large_body(world: World) -> None:
    raw = (b"POST /v1/enroll HTTP/1.1\r\nHost: puppet\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)) + b"{" * (MAX_BODY + 1)
    answer = exchange(world, raw)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


def test_an_idle_connection_is_cut_off(world: World) -> None:
    site = make_enrollment_site(world.enrollment, world.clock)
    channel = site.buildProtocol(IPv4Address("TCP", "10.20.1.5", 50000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"POST /v1/enroll HTTP/1.1\r\nHost: puppet\r\n")
    world.clock.advance(min(IDLE_TIMEOUT, REQUEST_DEADLINE) + 1)
    assert transport.disconnecting


@pytest.mark.parametrize(
    ("path", "allowed"), [("/v1/enroll", "POST"), ("/v1/ca", "GET"), ("/v1/health", "GET")]
)
def test_allow_names_the_methods_a_path_takes(world: World, path: str, allowed: str) -> None:
    answer = world.call(path, None, method="PATCH")
    assert (answer.status, answer.error, answer.headers["allow"]) == (405, "method-not-allowed", allowed)


@pytest.mark.parametrize(("path", "content_type"), [("/v1/health", "application/json"),
                                                    ("/v1/ca", "application/x-pem-file"),
                                                    ("/v1/crl", "application/x-pem-file")])
def test_head_answers_like_get_without_a_body(world: World, path: str, content_type: str) -> None:
    master = world.launch("master")
    assert world.enroll(master, "master").status == 200
    answer = world.call(path, None, method="HEAD")
    assert (answer.status, answer.headers["content-type"], answer.body) == (200, content_type, b"")
    assert int(answer.headers["content-length"]) == len(world.call(path, None, method="GET").body)


def test_head_of_enroll_is_405_not_500(world: World) -> None:
    answer = world.call("/v1/enroll", None, method="HEAD")
    assert (answer.status, answer.headers["allow"]) == (405, "POST")


def test_a_path_that_is_not_utf8_is_400_json(world: World) -> None:
    answer = exchange(world, b"GET /v1/%FF HTTP/1.1\r\nHost: puppet\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"Content-Type: application/json" in head
    assert json.loads(body)["error"] == "bad-url"


def test_an_enrollment_finishes_when_its_client_hangs_up(world: World) -> None:
    # The DescribeInstances batch window holds the enrollment until the clock moves; the
    # client leaves meanwhile.  Its claim and certificate are written all the same, once.
    master = world.launch("master")
    assert world.enroll(master, "master").status == 200
    agent = world.launch()
    body = json.dumps(world.body_for(agent)).encode()
    site = make_enrollment_site(world.enrollment, world.clock)
    peer = IPv4Address("TCP", agent.private_ip, 50000)
    channel = site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    channel.makeConnection(transport)
    channel.dataReceived(b"POST /v1/enroll HTTP/1.1\r\nHost: puppet\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    issued = world.issued()
    channel.connectionLost(Failure(ConnectionDone()))
    for _ in range(5):
        world.clock.advance(0.1)
    assert world.issued() == issued + 1
    assert b"HTTP/1.1" not in transport.value()


class BrokenEnrollment:
    """An enrollment whose health check fails in a way nobody planned for."""

    def health(self) -> Deferred[None]:
        return fail(RuntimeError("a bug"))


def test_an_unplanned_failure_is_500_json_and_logged() -> None:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        api: Any = StubTreq(enrollment_resource(BrokenEnrollment()))  # type: ignore[arg-type]
        response = api.get("https://puppet/v1/health")
        answered: list[Any] = []
        response.addCallback(answered.append)
        body: list[bytes] = []
        api.content(answered[0]).addCallback(body.append)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert answered[0].code == 500
    assert json.loads(body[0])["error"] == "internal-error"
    assert any("a bug" in str(e.get("log_failure", "")) for e in events)
