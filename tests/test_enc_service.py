"""
The ENC service: the classifier against a real SQLite store and a real moto server (through
Boto3Cloud), the caches, and the socket protocol over memory transports.  Time is a Clock.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import yaml
from attrs import evolve
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure

from puppetha.aws.boto import Boto3Cloud
from puppetha.aws.cloud import CloudError
from puppetha.enc.service import (
    BatchedCache,
    Classifier,
    ENCFactory,
    ENCProtocol,
    ReadOnce,
    Refused,
    SocketInUse,
    _parse_node,
    prepare_socket,
    secure_socket,
)
from puppetha.store.records import Classification, NodeRecord, Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.moto import TEST_CREDENTIALS, Fleet, MotoServer
from puppetha.threads import Blocking

T = TypeVar("T")

REGION = "us-east-1"
TTL = 60.0
STORE_TTL = 5.0
STALE = 600.0


class ImmediateBlocking(Blocking[Any]):
    """Runs each call at once on the caller's thread: unit tests have no reactor and no pool."""

    def __init__(self, target: Any) -> None:
        super().__init__(None, None, target)  # type: ignore[arg-type]

    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        return maybeDeferred(f, *args, **kwargs)


class HeldBlocking(Blocking[Any]):
    """Holds each call until the test lets it run, to see what waits and what is batched."""

    def __init__(self, target: Any) -> None:
        super().__init__(None, None, target)  # type: ignore[arg-type]
        self.held: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.held.append((f, args, d))
        return d

    def run_all(self) -> None:
        while self.held:
            f, args, d = self.held.pop(0)
            maybeDeferred(f, *args).chainDeferred(d)


class SwitchableCloud:
    """Delegates to one of two real clouds: the moto server, or an endpoint where nothing listens."""

    def __init__(self, up: Boto3Cloud, down: Boto3Cloud) -> None:
        self.up, self.down = up, down
        self.current = up

    def describe_instances(self, region: str, ids: Any) -> Any:
        return self.current.describe_instances(region, ids)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def boto(endpoint: str) -> Boto3Cloud:
    return Boto3Cloud(endpoint, access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
                      secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"],
                      deadline=1.0)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def fleet(moto: MotoServer) -> Fleet:
    # One VPC for the module (moto takes seconds to make one); each test launches its own
    # instances and has its own store, so tests do not see each other's nodes.
    return Fleet(moto.endpoint_url, REGION)


@pytest.fixture
def cloud(moto: MotoServer) -> SwitchableCloud:
    return SwitchableCloud(boto(moto.endpoint_url), boto(f"http://127.0.0.1:{closed_port()}"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "store.sqlite"))
    yield s
    s.close()


@pytest.fixture
def records(store: SQLiteStore) -> Records:
    return Records(store)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def enroll(records: Records, fleet: Fleet, certname: str, *, groups: tuple[str, ...] = ("web",),
           tags: dict[str, str] | None = None, account: str = "123456789012") -> str:
    info = fleet.launch("agent", tags=tags or {"role": "web"}, security_groups=groups)
    records.create(NodeRecord(
        certname=certname, instance_id=info.instance_id, role="agent", account=account,
        region=REGION, private_ip=info.private_ip, serial=1, issuer="root", certificate_pem="",
        enrolled_at=0.0, not_after=1e12))
    return info.instance_id


def classifier(clock: Clock, records: Records, cloud: Any, store_blocking: Any = None,
               cloud_blocking: Any = None) -> Classifier:
    return Classifier(clock, store_blocking or ImmediateBlocking(records),
                      cloud_blocking or ImmediateBlocking(cloud),
                      ttl=TTL, store_ttl=STORE_TTL, stale_limit=STALE)


def answer(d: Deferred[T]) -> T | Failure:
    results: list[T | Failure] = []
    d.addBoth(results.append)
    assert results, "the classifier did not answer at once"
    return results[0]


def refusal(d: Deferred[str]) -> Refused:
    result = answer(d)
    assert isinstance(result, Failure), result
    assert isinstance(result.value, Refused), result
    return result.value


def document(d: Deferred[str]) -> dict[str, Any]:
    result = answer(d)
    assert isinstance(result, str), result
    loaded: dict[str, Any] = yaml.safe_load(result)
    return loaded


# -- deciding ---------------------------------------------------------------------------------


def test_a_running_node_gets_its_merged_classification(clock, records, fleet, cloud) -> None:
    instance_id = enroll(records, fleet, "web1.example.com", tags={"role": "web", "env": "prod"})
    records.create(Classification("default", {"ntp": {}}, {"dc": "eu1"}, "production"))
    records.create(Classification("sg:web", {"apache": {"port": 80}}))
    records.create(Classification("tag:role=web", {"apache": {"port": 8080}}))
    records.create(Classification("tag:role=db", {"mysql": {}}))
    records.create(Classification("node:web1.example.com", parameters={"dc": "eu2"}))
    doc = document(classifier(clock, records, cloud).classify("web1.example.com"))
    assert doc["classes"] == {"ntp": {}, "apache": {"port": 8080}}
    assert doc["environment"] == "production"
    assert doc["parameters"]["dc"] == "eu2"
    assert doc["parameters"]["puppetha"]["instance_id"] == instance_id
    assert doc["parameters"]["puppetha"]["security_groups"] == ["web"]
    assert doc["parameters"]["puppetha"]["role"] == "agent"


@pytest.mark.parametrize(("case", "code"), [
    ("unknown", "unknown-node"),
    ("revoked", "revoked"),
    ("terminated", "not-running"),
    ("stopped", "not-running"),
    ("vanished", "not-running"),
    ("other-account", "not-running"),
    ("bad-name", "bad-request"),
    ("invalid-classification", "invalid-classification"),
])
def test_refusals(case: str, code: str, clock, records, fleet, cloud, store) -> None:  # noqa: PLR0917
    name = "web1.example.com"
    if case != "unknown":
        instance_id = enroll(records, fleet, name,
                             account="210987654321" if case == "other-account" else "123456789012")
    if case == "revoked":
        found = records.get(NodeRecord, name)
        assert found is not None
        records.replace(evolve(found.record, revoked_at=5.0), found.version)
    if case == "terminated":
        fleet.terminate(instance_id)
    if case == "stopped":
        fleet.stop(instance_id)
    if case == "vanished":
        found = records.get(NodeRecord, name)
        assert found is not None
        records.replace(evolve(found.record, instance_id="i-0fffffffffffffff0"),
                        found.version)
    if case == "invalid-classification":
        store.create("class", "sg:web", {"scope": "sg:web", "classes": {"Bad-Name": {}}})
    certname = "WEB1" if case == "bad-name" else name
    assert refusal(classifier(clock, records, cloud).classify(certname)).code == code


def test_a_terminated_instance_is_refused_once_its_cache_entry_expires(clock, records, fleet,
                                                                         cloud) -> None:
    instance_id = enroll(records, fleet, "web1.example.com")
    c = classifier(clock, records, cloud)
    document(c.classify("web1.example.com"))
    fleet.terminate(instance_id)
    clock.advance(TTL - 1)
    document(c.classify("web1.example.com"))  # within the TTL the cached state is trusted
    clock.advance(2)
    assert refusal(c.classify("web1.example.com")).code == "not-running"


def test_revocation_takes_effect_within_the_store_ttl(clock, records, fleet, cloud) -> None:
    enroll(records, fleet, "web1.example.com")
    c = classifier(clock, records, cloud)
    document(c.classify("web1.example.com"))
    found = records.get(NodeRecord, "web1.example.com")
    assert found is not None
    records.replace(evolve(found.record, revoked_at=1.0), found.version)
    clock.advance(STORE_TTL)
    assert refusal(c.classify("web1.example.com")).code == "revoked"


def test_classification_changes_take_effect_within_the_store_ttl(clock, records, fleet, cloud) -> None:
    enroll(records, fleet, "web1.example.com")
    c = classifier(clock, records, cloud)
    assert document(c.classify("web1.example.com"))["classes"] == {}
    records.create(Classification("default", {"ntp": {}}))
    clock.advance(STORE_TTL)
    assert document(c.classify("web1.example.com"))["classes"] == {"ntp": {}}


# -- caching ----------------------------------------------------------------------------------


def test_aws_is_asked_once_per_ttl(clock, records, fleet, cloud) -> None:
    enroll(records, fleet, "web1.example.com")
    c = classifier(clock, records, cloud)
    for _ in range(5):
        document(c.classify("web1.example.com"))
        clock.advance(TTL / 10)
    assert c.instances.fetches == 1
    clock.advance(TTL)
    document(c.classify("web1.example.com"))
    assert c.instances.fetches == 2


def test_a_hot_node_never_waits_for_aws(clock, records, fleet, cloud) -> None:
    enroll(records, fleet, "web1.example.com")
    aws = HeldBlocking(cloud)
    c = classifier(clock, records, cloud, cloud_blocking=aws)
    c.start()
    first = c.classify("web1.example.com")
    assert not first.called
    aws.run_all()
    document(first)
    for _ in range(20):  # ten TTLs, one request per half TTL
        clock.advance(TTL / 8)
        aws.run_all()  # the background refreshes
        clock.advance(TTL / 8)
        aws.run_all()
        assert not aws.held
        document(c.classify("web1.example.com"))
        assert not aws.held  # answered from the cache: nothing was waited for
    assert c.instances.fetches > 5
    c.stop()


def test_a_cold_node_is_forgotten(clock, records, fleet, cloud) -> None:
    enroll(records, fleet, "web1.example.com")
    c = Classifier(clock, ImmediateBlocking(records), ImmediateBlocking(cloud), ttl=TTL,
                   store_ttl=STORE_TTL, stale_limit=STALE, hot_window=100.0, store_hot_window=10.0)
    c.start()
    document(c.classify("web1.example.com"))
    assert len(c.instances) == 1
    fetches = c.instances.fetches
    clock.pump([TTL / 4] * 40)
    assert len(c.instances) == 0
    assert len(c.nodes) == 0
    assert len(c.read_nodes) == 0  # nor is its parsed record kept
    assert c.instances.fetches - fetches <= 4  # refreshed while hot, then left alone
    c.stop()


# -- parsing once per stored value ------------------------------------------------------------


def test_a_record_read_again_unchanged_is_not_parsed_again(clock, records, fleet, cloud) -> None:
    enroll(records, fleet, "web1.example.com")
    records.create(Classification("default", {"ntp": {}}))
    c = classifier(clock, records, cloud)
    c.start()
    document(c.classify("web1.example.com"))
    nodes, scopes = c.read_nodes.parsed, c.read_scopes.parsed
    fetches = c.nodes.fetches + c.scopes.fetches
    clock.pump([0.5] * int(STORE_TTL * 4))
    assert document(c.classify("web1.example.com"))["classes"] == {"ntp": {}}
    assert c.nodes.fetches + c.scopes.fetches > fetches  # read again in the background...
    assert (c.read_nodes.parsed, c.read_scopes.parsed) == (nodes, scopes)  # ...not parsed again
    c.stop()


class OneByOne:
    """A store that reads one item at a time (no IBatchGet), over the SQLite store."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.gets = 0

    def get(self, kind: str, key: str) -> Any:
        self.gets += 1
        return self.store.get(kind, key)


def test_a_store_without_batch_reads_is_read_key_by_key(records, fleet, store) -> None:
    for name in ("web1.example.com", "web2.example.com"):
        enroll(records, fleet, name)
    names = ["web1.example.com", "absent.example.com", "web2.example.com"]
    batched = ReadOnce(NodeRecord.KIND, _parse_node)(records, names)
    one = OneByOne(store)
    assert ReadOnce(NodeRecord.KIND, _parse_node)(Records(one), names) == batched  # type: ignore[arg-type]
    assert sorted(batched) == ["web1.example.com", "web2.example.com"]
    assert one.gets == 3


def test_a_changed_record_is_parsed_again(clock, records, fleet, cloud) -> None:
    enroll(records, fleet, "web1.example.com")
    records.create(Classification("default", {"ntp": {}}))
    c = classifier(clock, records, cloud)
    document(c.classify("web1.example.com"))
    found = records.get(Classification, "default")
    assert found is not None
    records.replace(Classification("default", {"ssh": {}}), found.version)
    clock.advance(STORE_TTL)
    assert document(c.classify("web1.example.com"))["classes"] == {"ssh": {}}


def test_a_node_removed_and_enrolled_again_revoked_is_refused(clock, records, fleet, cloud,
                                                              store) -> None:
    # The attacker's case for parsing once per version: delete and create start an item again at
    # version 1, so a version alone would keep giving the record from before, not revoked.
    enroll(records, fleet, "web1.example.com")
    c = classifier(clock, records, cloud)
    document(c.classify("web1.example.com"))
    found = records.get(NodeRecord, "web1.example.com")
    assert found is not None
    store.delete("node", "web1.example.com")
    records.create(evolve(found.record, revoked_at=1.0))
    again = records.get(NodeRecord, "web1.example.com")
    assert again is not None
    assert again.version == found.version  # the same version, another value
    clock.advance(STORE_TTL)
    assert refusal(c.classify("web1.example.com")).code == "revoked"


def test_an_unchanged_node_gets_its_answer_made_once(clock, records, fleet, cloud) -> None:
    enroll(records, fleet, "web1.example.com")
    records.create(Classification("default", {"ntp": {}}))
    c = classifier(clock, records, cloud)
    c.start()
    first = answer(c.classify("web1.example.com"))
    clock.pump([0.5] * int(STORE_TTL * 4))  # the store read again, AWS not yet
    assert answer(c.classify("web1.example.com")) is first
    clock.pump([1.0] * int(TTL + 1))  # AWS read again: equal, not the same object
    assert answer(c.classify("web1.example.com")) is first
    c.stop()


def test_an_answer_is_made_again_when_the_instance_tags_change(clock, records, fleet, cloud) -> None:
    instance_id = enroll(records, fleet, "web1.example.com", tags={"role": "web"})
    records.create(Classification("tag:role=web", {"apache": {}}))
    records.create(Classification("tag:role=db", {"mysql": {}}))
    c = classifier(clock, records, cloud)
    assert document(c.classify("web1.example.com"))["classes"] == {"apache": {}}
    fleet.ec2.create_tags(Resources=[instance_id], Tags=[{"Key": "role", "Value": "db"}])
    clock.advance(TTL)
    assert document(c.classify("web1.example.com"))["classes"] == {"mysql": {}}


def test_a_node_moved_to_another_instance_is_refused_despite_its_held_answer(
        clock, records, fleet, cloud) -> None:
    enroll(records, fleet, "web1.example.com")
    c = classifier(clock, records, cloud)
    document(c.classify("web1.example.com"))
    found = records.get(NodeRecord, "web1.example.com")
    assert found is not None
    records.replace(evolve(found.record, instance_id="i-0fffffffffffffff0"), found.version)
    clock.advance(STORE_TTL)
    assert refusal(c.classify("web1.example.com")).code == "not-running"


@pytest.mark.parametrize("change", ["revoked", "removed"])
def test_a_node_asking_all_the_time_is_refused_within_the_store_ttl(  # noqa: PLR0917
        change: str, clock, records, fleet, cloud, store) -> None:
    # Its record, its parsed record and its answer are all held and refreshed in the background:
    # none of them may keep answering it past the bound.
    enroll(records, fleet, "web1.example.com")
    c = classifier(clock, records, cloud)
    c.start()
    for _ in range(20):
        document(c.classify("web1.example.com"))
        clock.advance(0.5)
    found = records.get(NodeRecord, "web1.example.com")
    assert found is not None
    if change == "revoked":
        records.replace(evolve(found.record, revoked_at=1.0), found.version)
    else:
        store.delete("node", "web1.example.com")
    changed_at = clock.seconds()
    outcomes: list[tuple[float, str]] = []
    while clock.seconds() < changed_at + 3 * STORE_TTL:
        result = answer(c.classify("web1.example.com"))
        outcomes.append((clock.seconds() - changed_at,
                         result.value.code if isinstance(result, Failure) else "ok"))  # type: ignore[union-attr]
        clock.advance(0.5)
    expected = "revoked" if change == "revoked" else "unknown-node"
    assert all(code == expected for at, code in outcomes if at >= STORE_TTL), outcomes
    c.stop()


def test_a_classification_made_invalid_under_the_same_version_is_refused(
        clock, records, fleet, cloud, store) -> None:
    enroll(records, fleet, "web1.example.com")
    records.create(Classification("sg:web", {"apache": {}}))
    c = classifier(clock, records, cloud)
    assert document(c.classify("web1.example.com"))["classes"] == {"apache": {}}
    store.delete("class", "sg:web")
    store.create("class", "sg:web", {"scope": "sg:web", "classes": {"Bad-Name": {}}})
    clock.advance(STORE_TTL)
    assert refusal(c.classify("web1.example.com")).code == "invalid-classification"


def test_misses_are_batched_and_never_fetched_twice(clock) -> None:
    batches: list[list[str]] = []
    pending: list[Deferred[Mapping[str, int]]] = []

    def fetch(keys: list[str]) -> Deferred[Mapping[str, int]]:
        batches.append(keys)
        d: Deferred[Mapping[str, int]] = Deferred()
        pending.append(d)
        return d

    cache: BatchedCache[str, int] = BatchedCache("test", clock, fetch, ttl=10, hot_window=10,
                                                 forget_after=10, max_in_flight=1)
    a = cache.get_many(["a"])
    b = cache.get_many(["b", "a"])
    c = cache.get_many(["c"])
    assert batches == [["a"]]
    pending.pop(0).callback({"a": 1})
    assert answer(a) == {"a": 1}
    assert not b.called
    assert batches == [["a"], ["b", "c"]]
    pending.pop(0).callback({"b": 2})  # c does not exist
    assert answer(b) == {"b": 2, "a": 1}
    assert answer(c) == {"c": None}
    assert answer(cache.get_many(["a", "b", "c"])) == {"a": 1, "b": 2, "c": None}
    assert len(batches) == 2


def test_a_failed_fetch_fails_its_waiters_and_keeps_old_entries(clock) -> None:
    results: list[Any] = [succeed({"a": 1}), fail(CloudError("down"))]
    cache: BatchedCache[str, int] = BatchedCache("test", clock, lambda keys: results.pop(0), ttl=10,
                                                 hot_window=10, forget_after=100)
    assert answer(cache.get_many(["a"])) == {"a": 1}
    clock.advance(11)
    result = answer(cache.get_many(["a"]))
    assert isinstance(result, Failure)
    assert result.check(CloudError)
    assert len(cache) == 1


def test_an_expired_entry_is_answered_at_once_while_its_refresh_runs_behind(clock) -> None:
    pending: list[Deferred[Mapping[str, int]]] = []

    def fetch(keys: list[str]) -> Deferred[Mapping[str, int]]:
        pending.append(Deferred())
        return pending[-1]

    cache: BatchedCache[str, int] = BatchedCache("test", clock, fetch, ttl=10, hot_window=10,
                                                 forget_after=100, serve_stale=60)
    first = cache.get_many(["a"])
    pending.pop(0).callback({"a": 1})
    assert answer(first) == {"a": 1}
    clock.advance(11)
    assert answer(cache.get_many(["a"])) == {"a": 1}  # not waiting for the refresh it started
    assert answer(cache.get_many(["a"])) == {"a": 1}
    assert len(pending) == 1  # one refresh, not one per request
    pending.pop(0).callback({"a": 2})
    assert answer(cache.get_many(["a"])) == {"a": 2}
    clock.advance(61)
    waiting = cache.get_many(["a"])  # too old to serve: this one waits
    assert not waiting.called
    pending.pop(0).callback({"a": 3})
    assert answer(waiting) == {"a": 3}


def test_fetch_failures_are_logged_once_per_outage(clock, logged) -> None:
    results: list[Any] = [succeed({"a": 1}), fail(CloudError("down")), fail(CloudError("down")),
                          fail(CloudError("down")), succeed({"a": 2})]
    cache: BatchedCache[str, int] = BatchedCache("instances", clock, lambda keys: results.pop(0),
                                                 ttl=10, hot_window=100, forget_after=100)
    answer(cache.get_many(["a"]))
    for _ in range(4):
        clock.advance(11)
        cache.refresh()
    said = [e["log_format"] for e in logged if e.get("cache") == "instances"]
    assert said == ["reading {cache} failed: {error}; answering from the cache while it fails",
                    "reading {cache} works again"]


def test_names_that_are_not_enrolled_do_not_fill_the_cache(clock, records, fleet, cloud) -> None:
    enroll(records, fleet, "web1.example.com")
    c = classifier(clock, records, cloud)
    for i in range(2000):  # a local client asking for made-up names
        assert refusal(c.classify(f"nobody-{i}.example.com")).code == "unknown-node"
    document(c.classify("web1.example.com"))
    assert len(c.nodes) == 1


def test_a_node_removed_from_the_store_is_remembered_as_absent(clock, records, fleet, cloud,
                                                               store) -> None:
    enroll(records, fleet, "web1.example.com")
    c = classifier(clock, records, cloud)
    c.start()
    answer(c.classify("web1.example.com"))
    store.delete("node", "web1.example.com")
    clock.pump([0.5] * int(STORE_TTL))  # a background refresh finds it gone
    store.close()
    clock.pump([0.5] * int(STORE_TTL * 2 + 2))
    assert refusal(c.classify("web1.example.com")).code == "unknown-node"
    c.stop()


# -- stale while error ------------------------------------------------------------------------


def test_a_known_node_never_waits_for_a_hung_aws(clock, records, fleet, cloud) -> None:
    enroll(records, fleet, "web1.example.com")
    aws = HeldBlocking(cloud)
    c = classifier(clock, records, cloud, cloud_blocking=aws)
    first = c.classify("web1.example.com")
    aws.run_all()
    good = answer(first)
    clock.advance(TTL + 1)  # past the TTL, and AWS does not answer
    assert answer(c.classify("web1.example.com")) == good
    assert len(aws.held) == 1  # the refresh, behind the answer
    aws.run_all()
    assert answer(c.classify("web1.example.com")) == good


def test_a_known_node_waits_at_most_the_patience_for_a_hung_store(clock, records, fleet,
                                                                     cloud) -> None:
    enroll(records, fleet, "web1.example.com")
    store = HeldBlocking(records)
    c = Classifier(clock, store, ImmediateBlocking(cloud), ttl=TTL, store_ttl=STORE_TTL,
                   stale_limit=STALE, store_hot_window=1.0, patience=2.0)
    first = c.classify("web1.example.com")
    while store.held:
        store.run_all()
    good = answer(first)
    clock.advance(STORE_TTL * 2)
    c.refresh()  # nobody asked for a while: the node's store entries are forgotten
    assert len(c.nodes) == 0
    slow = c.classify("web1.example.com")  # must read the store, which hangs
    assert not slow.called
    clock.advance(2)
    assert answer(slow) == good  # its last good answer, after the patience
    store.run_all()  # the store answers at last; nothing more happens to the request
    assert len(c.nodes) == 1



def test_aws_down_serves_the_last_good_answer_up_to_the_stale_limit(clock, records, fleet, cloud,
                                                                      logged) -> None:
    enroll(records, fleet, "web1.example.com")
    records.create(Classification("default", {"ntp": {}}))
    c = classifier(clock, records, cloud)
    good = answer(c.classify("web1.example.com"))
    cloud.current = cloud.down
    clock.advance(TTL + 1)
    for _ in range(5):
        assert answer(c.classify("web1.example.com")) == good
    said = [e for e in logged if "serving" in str(e.get("log_format"))]
    assert [e["certname"] for e in said] == ["web1.example.com"]  # once, not once per request
    clock.advance(STALE)
    assert refusal(c.classify("web1.example.com")).code == "unavailable"
    cloud.current = cloud.up
    assert answer(c.classify("web1.example.com")) == good  # and back once AWS answers


def test_store_down_serves_the_last_good_answer(clock, records, fleet, cloud, store) -> None:
    enroll(records, fleet, "web1.example.com")
    c = classifier(clock, records, cloud)
    good = answer(c.classify("web1.example.com"))
    store.close()
    clock.advance(STORE_TTL + 1)
    assert answer(c.classify("web1.example.com")) == good
    clock.advance(STALE)
    assert refusal(c.classify("web1.example.com")).code == "unavailable"


def test_a_node_never_seen_is_refused_while_aws_is_down(clock, records, fleet, cloud) -> None:
    enroll(records, fleet, "web1.example.com")
    cloud.current = cloud.down
    assert refusal(classifier(clock, records, cloud).classify("web1.example.com")).code == "unavailable"


def test_a_refusal_forgets_the_last_good_answer(clock, records, fleet, cloud) -> None:
    instance_id = enroll(records, fleet, "web1.example.com")
    c = classifier(clock, records, cloud)
    answer(c.classify("web1.example.com"))
    fleet.terminate(instance_id)
    clock.advance(TTL + 1)
    assert refusal(c.classify("web1.example.com")).code == "not-running"
    cloud.current = cloud.down
    clock.advance(TTL + 1)
    assert refusal(c.classify("web1.example.com")).code == "unavailable"


def test_a_termination_seen_in_the_background_is_never_served_stale(clock, records, fleet,
                                                                       cloud) -> None:
    instance_id = enroll(records, fleet, "web1.example.com")
    c = classifier(clock, records, cloud)
    c.start()
    answer(c.classify("web1.example.com"))
    fleet.terminate(instance_id)
    clock.pump([1.0] * int(TTL / 2 + 5))  # a background refresh learns of the termination
    cloud.current = cloud.down
    clock.pump([1.0] * int(TTL))
    assert refusal(c.classify("web1.example.com")).code == "not-running"
    c.stop()


def test_a_revocation_seen_in_the_background_is_never_served_stale(clock, records, fleet, cloud,
                                                                     store) -> None:
    enroll(records, fleet, "web1.example.com")
    c = classifier(clock, records, cloud)
    c.start()
    answer(c.classify("web1.example.com"))
    found = records.get(NodeRecord, "web1.example.com")
    assert found is not None
    records.replace(evolve(found.record, revoked_at=1.0), found.version)
    clock.pump([0.5] * int(STORE_TTL))  # a background refresh learns of the revocation
    store.close()
    clock.pump([0.5] * int(STORE_TTL * 2 + 2))
    assert refusal(c.classify("web1.example.com")).code == "revoked"
    c.stop()


def test_an_answer_finished_after_a_revocation_is_never_served_stale(clock, records, fleet, cloud,
                                                                      store) -> None:
    enroll(records, fleet, "web1.example.com")
    aws = HeldBlocking(cloud)
    c = classifier(clock, records, cloud, cloud_blocking=aws)
    slow = c.classify("web1.example.com")  # read the node record, waits for AWS
    found = records.get(NodeRecord, "web1.example.com")
    assert found is not None
    records.replace(evolve(found.record, revoked_at=1.0), found.version)
    clock.advance(STORE_TTL)
    assert refusal(c.classify("web1.example.com")).code == "revoked"
    aws.run_all()
    assert refusal(slow).code == "revoked"  # asked before the revocation, answered after it
    store.close()
    clock.advance(STORE_TTL)
    assert refusal(c.classify("web1.example.com")).code == "unavailable"  # nothing to serve


# -- the socket protocol ----------------------------------------------------------------------


@pytest.fixture
def served(clock, records, fleet, cloud) -> Classifier:
    enroll(records, fleet, "web1.example.com")
    return classifier(clock, records, cloud)


def connect(factory: ENCFactory, half_close: bool = True) -> tuple[ENCProtocol, StringTransport]:
    protocol = factory.buildProtocol(None)
    assert isinstance(protocol, ENCProtocol)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_a_request_is_answered_and_closed(served, clock) -> None:
    protocol, transport = connect(ENCFactory(served, clock))
    protocol.dataReceived(b"web1.exa")
    assert transport.value() == b""
    protocol.dataReceived(b"mple.com\n")
    head, _, body = transport.value().partition(b"\n")
    assert head == b"OK %d" % len(body)
    assert yaml.safe_load(body)["parameters"]["puppetha"]["role"] == "agent"
    assert transport.disconnecting


def test_the_scripts_half_close_after_the_request_is_fine(served, clock) -> None:
    protocol, transport = connect(ENCFactory(served, clock))
    protocol.dataReceived(b"web1.example.com\r\n")
    protocol.readConnectionLost()
    assert transport.value().startswith(b"OK ")


@pytest.mark.parametrize(("data", "code"), [
    (b"WEB1.example.com\n", b"bad-request"),
    (b"\xff\xfe\x00garbage\n", b"bad-request"),
    (b"GET / HTTP/1.1\r\n", b"bad-request"),
    (b"\n", b"bad-request"),
    (b"a" * 256 + b"\n", b"bad-request"),
    (b"x" * 100000, b"bad-request"),
    (b"nobody.example.com\n", b"unknown-node"),
])
def test_bad_requests_are_refused_in_one_line(served, clock, data: bytes, code: bytes) -> None:
    protocol, transport = connect(ENCFactory(served, clock))
    for i in range(0, len(data), 1000):
        protocol.dataReceived(data[i : i + 1000])
    line = transport.value()
    assert line.startswith(b"ERR " + code + b" ")
    assert line.count(b"\n") == 1
    assert line.endswith(b"\n")
    assert transport.disconnecting


def test_end_of_input_before_a_newline_is_refused(served, clock) -> None:
    protocol, transport = connect(ENCFactory(served, clock))
    protocol.dataReceived(b"web1.example.com")
    protocol.readConnectionLost()
    assert transport.value().startswith(b"ERR bad-request ")
    assert served.nodes.fetches == 0


def test_only_the_first_line_counts(served, clock) -> None:
    protocol, transport = connect(ENCFactory(served, clock))
    protocol.dataReceived(b"web1.example.com\nnobody\nmore garbage" + b"z" * 10000)
    assert transport.value().startswith(b"OK ")
    assert transport.value().count(b"ERR") == 0


def test_an_idle_client_is_answered_then_dropped(served, clock) -> None:
    protocol, transport = connect(ENCFactory(served, clock, timeout=10))
    protocol.dataReceived(b"web1.exa")
    clock.advance(10)
    assert transport.value() == b"ERR timeout no answer within 10s\n"
    assert transport.disconnecting
    assert not transport.disconnected
    clock.advance(10)  # it does not read either
    assert transport.disconnected  # StringTransport's mark of abortConnection


def test_a_slow_answer_times_out_once(clock, records, fleet, cloud) -> None:
    enroll(records, fleet, "web1.example.com")
    aws = HeldBlocking(cloud)
    slow = classifier(clock, records, cloud, cloud_blocking=aws)
    protocol, transport = connect(ENCFactory(slow, clock, timeout=10))
    protocol.dataReceived(b"web1.example.com\n")
    clock.advance(10)
    assert transport.value().startswith(b"ERR timeout ")
    aws.run_all()  # the answer arrives late: nothing more is written
    assert transport.value().count(b"\n") == 1


def test_timeouts_are_logged_once_per_outage(clock, records, fleet, cloud, logged) -> None:
    enroll(records, fleet, "web1.example.com")
    aws = HeldBlocking(cloud)
    factory = ENCFactory(classifier(clock, records, cloud, cloud_blocking=aws), clock, timeout=10)
    for _ in range(3):
        protocol, transport = connect(factory)
        protocol.dataReceived(b"web1.example.com\n")
        clock.advance(10)
        assert transport.value().startswith(b"ERR timeout ")
    aws.run_all()
    clock.advance(10)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"web1.example.com\n")
    assert transport.value().startswith(b"OK ")
    said = [e["log_format"] for e in logged if e.get("dependency") == "ENC answers"]
    assert said == ["{dependency} unavailable: {reason}",
                    "{dependency} answers again after {seconds:.1f}s and {failures} failed calls"]


def test_a_client_gone_before_the_answer_is_not_written_to(clock, records, fleet, cloud) -> None:
    enroll(records, fleet, "web1.example.com")
    aws = HeldBlocking(cloud)
    slow = classifier(clock, records, cloud, cloud_blocking=aws)
    factory = ENCFactory(slow, clock)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"web1.example.com\n")
    protocol.connectionLost(Failure(ConnectionResetError()))
    aws.run_all()
    assert transport.value() == b""
    assert factory.connections == 0
    assert not clock.getDelayedCalls()


def test_too_many_connections_are_told_so(served, clock) -> None:
    factory = ENCFactory(served, clock, max_connections=1)
    first, _ = connect(factory)
    second, transport = connect(factory)
    assert transport.value() == b"ERR busy too many connections, try again\n"
    second.connectionLost(Failure(ConnectionResetError()))
    first.connectionLost(Failure(ConnectionResetError()))
    assert factory.connections == 0
    third, transport = connect(factory)
    third.dataReceived(b"web1.example.com\n")
    assert transport.value().startswith(b"OK ")


# -- the socket file --------------------------------------------------------------------------


def test_prepare_socket_makes_the_directory_and_removes_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "run" / "enc.sock"
    prepare_socket(str(path))
    assert (tmp_path / "run").is_dir()
    assert oct((tmp_path / "run").stat().st_mode & 0o777) == oct(0o750)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # bound, never listening: what a killed daemon leaves
    prepare_socket(str(path))
    assert not path.exists()


def test_prepare_socket_refuses_a_live_socket_or_another_file(tmp_path: Path) -> None:
    path = tmp_path / "enc.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen(1)
        with pytest.raises(SocketInUse, match="another process"):
            prepare_socket(str(path))
    other = tmp_path / "file"
    other.write_text("x")
    with pytest.raises(SocketInUse, match="not a socket"):
        prepare_socket(str(other))
    assert other.exists()


def test_secure_socket_sets_mode_and_owner(tmp_path: Path) -> None:
    path = tmp_path / "enc.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        secure_socket(str(path), str(os.getuid()), "nogroup", 0o660)
        st = path.stat()
        assert st.st_mode & 0o777 == 0o660
        assert st.st_uid == os.getuid()
        import grp

        assert st.st_gid == grp.getgrnam("nogroup").gr_gid
        with pytest.raises(ValueError, match="no such user"):
            secure_socket(str(path), "no-such-user-here")


def test_answers_are_counted_by_outcome_with_their_latency(served, clock) -> None:
    factory = ENCFactory(served, clock)
    protocol, transport = connect(factory)
    clock.advance(0.3)  # the client takes its time to send the line
    protocol.dataReceived(b"web1.example.com\n")
    assert transport.value().startswith(b"OK ")
    protocol, transport = connect(factory)
    protocol.dataReceived(b"nobody.example.com\n")
    assert transport.value().startswith(b"ERR unknown-node ")
    assert factory.answers == {"ok": 1, "unknown-node": 1}
    assert factory.latencies.count == 2
    assert factory.latencies.sum == pytest.approx(0.3)
    assert dict(factory.latencies.cumulative())[0.25] == 1  # the quick refusal
    assert dict(factory.latencies.cumulative())[0.5] == 2


def test_a_busy_refusal_and_a_timeout_are_counted_once(served, clock) -> None:
    factory = ENCFactory(served, clock, timeout=1.0, max_connections=1)
    connect(factory)  # holds the one place, says nothing
    _, refused = connect(factory)
    assert refused.value().startswith(b"ERR busy ")
    clock.advance(1.0)
    assert factory.answers == {"busy": 1, "timeout": 1}
    assert factory.latencies.count == 1  # the timeout's; the busy refusal waited for nothing


def test_the_daemon_keeps_node_records_fresh_for_enc_store_hot_window(records, cloud, tmp_path: Path) -> None:
    from twisted.internet import reactor

    from puppetha.config import config_from_string
    from puppetha.enc.service import ENCSocketService
    from puppetha.tap import enc_service

    config = config_from_string(f"[enc]\nsocket = {tmp_path / 'enc.sock'}\nstore_hot_window = 7s\n")
    service = enc_service(config, reactor, cast(Any, ImmediateBlocking(records)),
                          cast(Any, ImmediateBlocking(cloud)), {})
    try:
        assert isinstance(service, ENCSocketService)
        assert service.classifier.store_hot_window == 7.0
    finally:
        service.stopService()
