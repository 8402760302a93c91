"""
The records every enrollment needs (CAs, CRLs, masters) kept in memory by their store change
counters: an enrollment reads them again only when they changed, and a master revoked, marked
unhealthy or removed, here or by another daemon, leaves the choice at once.  On both stores.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import boto3
import pytest
from attrs import evolve
from zope.interface import implementer

from puppetha.enroll.service import revoke_identity
from puppetha.store import IGenerations, IStore, Item, Value, Write
from puppetha.store.dynamodb import DynamoDBStore, partition_key
from puppetha.store.records import MAX_HELD, MasterRecord, NodeRecord, Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.aws import FakeAWSSigner
from tests.aws_fixtures import boto_test_credentials

pytest.register_assert_rewrite("tests.enroll_fixtures")

from tests.enroll_fixtures import AWS, World, build_world  # noqa: E402 - after the rewrite hook

pytest_plugins = ["tests.enroll_fixtures"]


@implementer(IStore, IGenerations)
class CountingStore:
    """The real store, counting the listings of each kind and the counter reads."""

    def __init__(self, inner: IStore) -> None:
        self.inner = inner
        self.listed: Counter[str] = Counter()
        self.counter_reads = 0

    def get(self, kind: str, key: str) -> Item | None:
        return self.inner.get(kind, key)

    def create(self, kind: str, key: str, value: Value) -> Item:
        return self.inner.create(kind, key, value)

    def replace(self, kind: str, key: str, value: Value, expected_version: int) -> Item:
        return self.inner.replace(kind, key, value, expected_version)

    def delete(self, kind: str, key: str, expected_version: int | None = None) -> bool:
        return self.inner.delete(kind, key, expected_version)

    def list(self, kind: str, prefix: str = "") -> list[Item]:
        self.listed[kind] += 1
        return self.inner.list(kind, prefix)

    def transact(self, writes: Sequence[Write]) -> None:
        self.inner.transact(writes)

    def generations(self) -> Mapping[str, int]:
        self.counter_reads += 1
        return IGenerations(self.inner).generations()

    def close(self) -> None:
        self.inner.close()


class Other:
    """Another daemon on the same store: for SQLite a process of its own, for DynamoDB its own client."""

    def __init__(self, backend: str, world: World) -> None:
        self.backend = backend
        self.world = world

    def mark_unhealthy(self, certname: str) -> None:
        self._run(
            "m = r.get(MasterRecord, name); r.replace(evolve(m.record, healthy=False), m.version)", certname
        )

    def remove(self, certname: str) -> None:
        self._run("m = r.get(MasterRecord, name); r.store.delete('master', name, m.version)", certname)

    def _run(self, code: str, certname: str) -> None:
        prelude = (
            "import sys\nfrom attrs import evolve\nfrom puppetha.store.records import MasterRecord, Records\n"
        )
        inner = self.world.store
        if self.backend == "sqlite":
            assert isinstance(inner, SQLiteStore)
            script = (
                f"{prelude}from puppetha.store.sqlite import SQLiteStore\n"
                f"r = Records(SQLiteStore(sys.argv[1])); name = sys.argv[2]\n{code}\n"
            )
            subprocess.run([sys.executable, "-c", script, inner.path, certname], check=True)
            return
        assert isinstance(inner, DynamoDBStore)
        other = DynamoDBStore(inner.table, inner.region, self.world.moto.endpoint_url)
        try:
            namespace = {"r": Records(other), "name": certname, "evolve": evolve,
                         "MasterRecord": MasterRecord}
            exec(code, namespace)  # noqa: S102 - the test's own two statements, run as the other daemon
        finally:
            other.close()


@pytest.fixture(params=["sqlite", "dynamodb"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "dynamodb":
        with boto_test_credentials():
            yield request.param
    else:
        yield request.param


@pytest.fixture
def cached(backend: str, enroll_aws: AWS, aws_signer: FakeAWSSigner, tmp_path: Path) -> Iterator[World]:
    make_store = None
    if backend == "dynamodb":

        def make_store(tmp: Path) -> IStore:
            store = DynamoDBStore(f"puppetha-{tmp.name}"[:200], "us-east-1", enroll_aws.moto.endpoint_url)
            store.create_table(deletion_protection=False)
            return store

    built = build_world(enroll_aws, aws_signer, tmp_path, store_wrapper=CountingStore, make_store=make_store)
    yield built
    built.store.close()


def counting(world: World) -> CountingStore:
    store = world.records.store
    assert isinstance(store, CountingStore)
    return store


def enroll(world: World, role: str = "agent") -> str:
    """Enrolls a new instance as ``role``; its certname, or for an agent its issuer."""
    instance = world.launch(role)
    answer = world.enroll(instance, role)
    assert answer.status == 200, answer.body
    node = world.records.get(NodeRecord, instance.instance_id)
    assert node is not None
    return node.record.issuer if role == "agent" else instance.instance_id


def test_an_enrollment_reads_cas_crls_and_masters_only_once_they_changed(cached: World, backend: str) -> None:
    store = counting(cached)
    first = enroll(cached, "master")
    enroll(cached)  # reads what the first master's enrollment changed
    store.listed.clear()
    reads = store.counter_reads
    assert enroll(cached) == first
    # Not one listing of CAs, CRLs or masters: the counters said nothing changed.
    assert not {"ca", "crl", "master"} & set(store.listed), store.listed
    assert store.counter_reads > reads
    # A master marked unhealthy by another daemon is read again, once, and no longer chosen.
    second = enroll(cached, "master")
    Other(backend, cached).mark_unhealthy(first)
    store.listed.clear()
    assert enroll(cached) == second
    assert store.listed["master"] == 1, store.listed


def test_a_master_revoked_here_leaves_the_choice_at_once(cached: World) -> None:
    first = enroll(cached, "master")
    second = enroll(cached, "master")
    assert sorted(enroll(cached) for _ in range(2)) == sorted([first, second])
    assert revoke_identity(cached.records, cached.authority, first, "keyCompromise", cached.clock.seconds)
    issuers = {enroll(cached) for _ in range(3)}
    assert issuers == {second}
    # And the CRLs an agent is given are the ones just published, listing the revocation.
    agent = cached.launch("agent")
    answer = cached.enroll(agent)
    assert answer.status == 200, answer.body
    assert answer.json["crl_chain"] == fresh_crl_chain(cached)


def fresh_crl_chain(world: World) -> str:
    """Every CRL, root first, read from the store itself (not through any cache)."""
    crls = {item.key: str(item.value["crl_pem"]) for item in world.store.list("crl")}
    return "".join(crls[name] for name in sorted(crls, key=lambda n: (n != "root", n)))


@pytest.mark.parametrize("change", ["unhealthy", "removed"])
def test_a_master_dropped_by_another_daemon_leaves_the_choice_at_its_next_enrollment(
    cached: World, backend: str, change: str
) -> None:
    first = enroll(cached, "master")
    second = enroll(cached, "master")
    assert sorted(enroll(cached) for _ in range(2)) == sorted([first, second])
    other = Other(backend, cached)
    if change == "unhealthy":
        other.mark_unhealthy(first)
    else:
        other.remove(first)
    assert {enroll(cached) for _ in range(3)} == {second}


def test_a_change_the_counters_miss_is_read_within_max_held(cached: World, backend: str) -> None:
    """A writer that does not count (a daemon of the release before, during an upgrade)."""
    now = [0.0]
    records = Records(cached.store, now=lambda: now[0])
    first = enroll(cached, "master")
    held = records.current_get(MasterRecord, first)
    assert held is not None
    assert held.record.healthy
    unhealthy = evolve(held.record, healthy=False).to_value()
    if backend == "sqlite":
        assert isinstance(cached.store, SQLiteStore)
        with sqlite3.connect(cached.store.path) as old:
            for trigger in ("count_insert", "count_update", "count_delete"):
                old.execute(f"DROP TRIGGER {trigger}")
        cached.store.replace("master", first, unhealthy, held.version)
    else:
        assert isinstance(cached.store, DynamoDBStore)
        client = boto3.client("dynamodb", region_name="us-east-1", endpoint_url=cached.moto.endpoint_url)
        client.put_item(TableName=cached.store.table, Item={
            "pk": {"S": partition_key("master", first)}, "sk": {"S": first},
            "v": {"N": str(held.version + 1)}, "w": {"S": "an-earlier-release"},
            "value": {"S": json.dumps(unhealthy)},
        })  # fmt: skip
    now[0] += MAX_HELD - 0.1
    still = records.current_get(MasterRecord, first)
    assert still is not None
    assert still.record.healthy  # the counter did not move: held as read
    now[0] += 0.2
    seen = records.current_get(MasterRecord, first)
    assert seen is not None
    assert not seen.record.healthy
    assert seen.version == held.version + 1
