"""The IMDSv2 emulator: in memory through StubTreq, and on real sockets in its own thread."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor

from puppetha.aws.cloud import InstanceInfo
from puppetha.aws.identity import verify_identity
from puppetha.testing.aws import FakeAWSSigner
from puppetha.testing.imds import (
    MAX_TOKENS,
    IMDSEmulator,
    IMDSThread,
    InstanceMetadata,
    MetadataService,
)

BASE = "http://169.254.169.254"
TTL = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}


def instance(instance_id: str = "i-0123456789abcdef0", private_ip: str = "10.20.1.4") -> InstanceInfo:
    return InstanceInfo(
        instance_id=instance_id,
        account="123456789012",
        region="us-east-1",
        state="running",
        private_ip=private_ip,
        private_dns="",
        instance_profile_arn="",
        launch_time=1795000000.0,
    )


@pytest.fixture(scope="module")
def aws() -> FakeAWSSigner:
    return FakeAWSSigner.create("us-east-1")


def metadata_for(aws: FakeAWSSigner, info: InstanceInfo) -> InstanceMetadata:
    document, signature = aws.identity_for(info)
    return InstanceMetadata(info.instance_id, document, signature, info.private_ip)


def result(d: Deferred[Any]) -> Any:
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "the request did not finish"
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    return outcome[0]


class Client:
    """Talks to a MetadataService in memory."""

    def __init__(self, service: MetadataService) -> None:
        # StubTreq makes its treq-like methods at run time.
        self.http: Any = StubTreq(service)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        d = self.http.request(method, BASE + path, headers=headers or {})
        self.http.flush()
        response = result(d)
        body = result(self.http.content(response))
        return response.code, body

    def token(self, ttl: str = "60") -> str:
        code, body = self.request("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": ttl})
        assert code == 200
        return body.decode()

    def get(self, path: str, token: str | None) -> tuple[int, bytes]:
        headers = {"X-aws-ec2-metadata-token": token} if token is not None else {}
        return self.request("GET", path, headers)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(aws: FakeAWSSigner, clock: Clock) -> MetadataService:
    return MetadataService(metadata_for(aws, instance()), clock)


@pytest.fixture
def client(service: MetadataService) -> Client:
    return Client(service)


def test_token_then_identity(client: Client, service: MetadataService, aws: FakeAWSSigner) -> None:
    token = client.token()
    assert client.get("/latest/dynamic/instance-identity/document", token) == (200, service.metadata.document)
    code, signature = client.get("/latest/dynamic/instance-identity/rsa2048", token)
    assert code == 200
    assert client.get("/latest/meta-data/instance-id", token) == (200, b"i-0123456789abcdef0")
    assert client.get("/latest/meta-data/local-ipv4", token) == (200, b"10.20.1.4")
    # What it serves is what the enrollment service verifies.
    identity = verify_identity(service.metadata.document, signature.decode(), aws.trust_store())
    assert identity.instance_id == "i-0123456789abcdef0"


def test_token_answer_echoes_its_ttl(client: Client) -> None:
    response = result(client.http.put(BASE + "/latest/api/token", headers={**TTL}))
    assert response.code == 200
    assert response.headers.getRawHeaders("X-aws-ec2-metadata-token-ttl-seconds") == ["60"]


@pytest.mark.parametrize(
    "path",
    [
        "/latest/dynamic/instance-identity/document",
        "/latest/dynamic/instance-identity/rsa2048",
        "/latest/meta-data/instance-id",
    ],
)
@pytest.mark.parametrize("token", [None, "", "not-a-token", "\u00e9t\u00e9"])
def test_get_without_a_valid_token_is_unauthorized(client: Client, path: str, token: str | None) -> None:
    client.token()
    assert client.get(path, token)[0] == 401


@pytest.mark.parametrize("ttl", [None, "", "0", "21601", "-5", "abc", "1e3", "99999999999"])
def test_bad_ttl_is_refused(client: Client, ttl: str | None) -> None:
    headers = {} if ttl is None else {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
    assert client.request("PUT", "/latest/api/token", headers)[0] == 400


@pytest.mark.parametrize("ttl", ["1", "21600"])
def test_ttl_bounds_are_accepted(client: Client, ttl: str) -> None:
    assert client.token(ttl)


def test_proxied_token_request_is_forbidden(client: Client) -> None:
    headers = {**TTL, "X-Forwarded-For": "10.0.0.9"}
    assert client.request("PUT", "/latest/api/token", headers)[0] == 403


def test_token_expires_on_the_clock(client: Client, clock: Clock) -> None:
    token = client.token("60")
    clock.advance(59)
    assert client.get("/latest/meta-data/instance-id", token)[0] == 200
    clock.advance(1)
    assert client.get("/latest/meta-data/instance-id", token)[0] == 401
    assert client.get("/latest/meta-data/instance-id", client.token())[0] == 200


def test_tokens_are_distinct_and_all_valid(client: Client) -> None:
    tokens = {client.token() for _ in range(5)}
    assert len(tokens) == 5
    assert all(client.get("/latest/meta-data/instance-id", t)[0] == 200 for t in tokens)


def test_oldest_tokens_are_forgotten_beyond_the_cap(client: Client) -> None:
    first = client.token()
    for _ in range(MAX_TOKENS):
        client.token()
    assert client.get("/latest/meta-data/instance-id", first)[0] == 401


def test_unknown_paths_and_methods(client: Client) -> None:
    token = client.token()
    assert client.get("/latest/meta-data/iam/security-credentials/", token)[0] == 404
    assert client.request("PUT", "/latest/meta-data/instance-id", TTL)[0] == 404
    assert client.request("POST", "/latest/api/token", TTL)[0] == 405


def test_no_private_ip_no_local_ipv4(aws: FakeAWSSigner, clock: Clock) -> None:
    metadata = metadata_for(aws, instance(private_ip=""))
    client = Client(MetadataService(metadata, clock))
    assert client.get("/latest/meta-data/local-ipv4", client.token())[0] == 404


# --- listening


def test_emulator_listens_on_loopback_one_port_per_instance(aws: FakeAWSSigner) -> None:
    reactor = MemoryReactor()
    emulator = IMDSEmulator(reactor, Clock())
    emulator.serve(metadata_for(aws, instance("i-0123456789abcdef0")))
    emulator.serve(metadata_for(aws, instance("i-0123456789abcdef1")), port=8111)
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (0, "127.0.0.1"),
        (8111, "127.0.0.1"),
    ]
    assert emulator.service("i-0123456789abcdef1").metadata.instance_id == "i-0123456789abcdef1"
    with pytest.raises(ValueError, match="already served"):
        emulator.serve(metadata_for(aws, instance("i-0123456789abcdef0")))


def http(method: str, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, headers=headers)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310 - loopback
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def imds_thread() -> Iterator[IMDSThread]:
    with IMDSThread() as imds:
        yield imds


def test_thread_serves_instances_over_tcp(imds_thread: IMDSThread, aws: FakeAWSSigner) -> None:
    first = metadata_for(aws, instance("i-0123456789abcdef0"))
    second = metadata_for(aws, instance("i-0123456789abcdef1", "10.20.1.5"))
    urls = [imds_thread.serve(first), imds_thread.serve(second)]
    assert len(set(urls)) == 2
    assert all(url.startswith("http://127.0.0.1:") for url in urls)
    for url, metadata in zip(urls, [first, second], strict=True):
        code, token = http("PUT", url + "/latest/api/token", TTL)
        assert code == 200
        assert http("GET", url + "/latest/meta-data/instance-id", {}) == (401, b"Unauthorized")
        headers = {"X-aws-ec2-metadata-token": token.decode()}
        assert http("GET", url + "/latest/dynamic/instance-identity/document", headers) == (
            200,
            metadata.document,
        )
    imds_thread.remove("i-0123456789abcdef0")
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(urls[0] + "/latest/api/token", timeout=5)  # noqa: S310 - loopback


def test_thread_stop_and_restart(aws: FakeAWSSigner) -> None:
    imds = IMDSThread().start()
    url = imds.serve(metadata_for(aws, instance()))
    imds.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/latest/api/token", timeout=5)  # noqa: S310 - loopback
    with pytest.raises(RuntimeError, match="not running"):
        imds.serve(metadata_for(aws, instance()))
    with imds:
        url = imds.serve(metadata_for(aws, instance()))
        assert http("PUT", url + "/latest/api/token", TTL)[0] == 200


def test_local_hostname_when_the_instance_has_one(aws: FakeAWSSigner, clock: Clock) -> None:
    name = b"ip-10-20-1-4.ec2.internal"
    metadata = attrs.evolve(metadata_for(aws, instance()), local_hostname=name.decode())
    client = Client(MetadataService(metadata, clock))
    assert client.get("/latest/meta-data/local-hostname", client.token()) == (200, name)
    bare = Client(MetadataService(metadata_for(aws, instance()), clock))
    assert bare.get("/latest/meta-data/local-hostname", bare.token())[0] == 404
