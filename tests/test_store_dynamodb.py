"""
The DynamoDB store against a real moto server: the store contract, then what is DynamoDB's own
(chunked values, sharded listing, table creation, errors).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from twisted.internet.task import Clock

from puppetha.store import (
    AlreadyExists,
    Create,
    Delete,
    IStore,
    Item,
    Replace,
    StoreError,
    StoreUnavailable,
    TransactionConflict,
    VersionConflict,
)
from puppetha.store.dynamodb import (
    CHUNK_SIZE,
    GENERATIONS_PK,
    LONGEST_UNPROCESSED_BACKOFF,
    SHARDS,
    DynamoDBStore,
    StoreAccessDenied,
    TableMismatch,
    TableMissing,
    classify_error,
    partition_key,
)
from puppetha.store.migrate import KINDS, KindCount, MigrationConflict, batches, migrate, plan_kind
from puppetha.store.records import (
    CARecord,
    Classification,
    CRLRecord,
    EnrollmentClaim,
    MasterRecord,
    NodeRecord,
    Records,
    RevokedRecord,
)
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.moto import MotoServer, client
from tests.aws_fixtures import boto_test_credentials
from tests.store_contract import StoreContract, StoreFactory, assert_same_json

REGION = "us-east-1"
_tables = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def aws_credentials() -> Iterator[None]:
    """The store finds credentials the way the daemon does (boto3's chain): test ones here."""
    with boto_test_credentials():
        yield


@pytest.fixture(scope="session")
def moto(aws_credentials: None) -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def new_table(moto: MotoServer) -> str:
    """A fresh, created table: each test starts empty."""
    name = f"puppetha-{os.getpid()}-{next(_tables)}"
    store = DynamoDBStore(name, REGION, moto.endpoint_url)
    store.create_table(deletion_protection=False)
    store.close()
    return name


class TestDynamoDBStore(StoreContract):
    @pytest.fixture
    def make_store(self, moto: MotoServer) -> StoreFactory:
        table = new_table(moto)
        return lambda: DynamoDBStore(table, REGION, moto.endpoint_url)


@pytest.fixture
def table(moto: MotoServer) -> str:
    return new_table(moto)


@pytest.fixture
def store(moto: MotoServer, table: str) -> Iterator[DynamoDBStore]:
    store = DynamoDBStore(table, REGION, moto.endpoint_url)
    yield store
    store.close()


def raw_items(moto: MotoServer, table: str) -> list[dict[str, Any]]:
    """
    Every item of the table as DynamoDB holds it (a full scan), but the change counters (the
    contract's tests check those).
    """
    dynamodb = client("dynamodb", moto.endpoint_url, REGION)
    items: list[dict[str, Any]] = []
    arguments: dict[str, Any] = {"TableName": table}
    while True:
        answer = dynamodb.scan(**arguments)
        items.extend(i for i in answer["Items"] if i["pk"]["S"] != GENERATIONS_PK)
        if "LastEvaluatedKey" not in answer:
            return items
        arguments["ExclusiveStartKey"] = answer["LastEvaluatedKey"]


def chunk_items(moto: MotoServer, table: str) -> list[dict[str, Any]]:
    return [i for i in raw_items(moto, table) if i["pk"]["S"].startswith("chunk#")]


def incompressible(size: int) -> str:
    """Text that zlib cannot shrink much, so it really needs several chunks."""
    return base64.b64encode(os.urandom(size * 3 // 4)).decode("ascii")


# -- values bigger than one DynamoDB item


def test_big_value_is_chunked_and_reassembled(moto: MotoServer, table: str, store: DynamoDBStore) -> None:
    crl = incompressible(1_500_000)
    created = store.create("crl", "root", {"number": 1, "crl_pem": crl})
    assert created == Item("crl", "root", {"number": 1, "crl_pem": crl}, 1)
    chunks = chunk_items(moto, table)
    assert len(chunks) >= 1_500_000 // CHUNK_SIZE
    assert all(len(c["data"]["B"]) <= CHUNK_SIZE for c in chunks)
    other = DynamoDBStore(table, REGION, moto.endpoint_url)
    assert other.get("crl", "root") == created
    assert other.list("crl") == [created]
    assert other.get_many("crl", ["root", "absent"]) == {"root": created}
    other.close()


def test_replacing_a_big_value_removes_its_chunks(moto: MotoServer, table: str, store: DynamoDBStore) -> None:
    store.create("crl", "root", {"crl_pem": incompressible(900_000)})
    second = incompressible(900_000)
    store.replace("crl", "root", {"crl_pem": second}, 1)
    generation = next(
        i["gen"]["S"] for i in raw_items(moto, table) if i["pk"]["S"] == partition_key("crl", "root")
    )
    assert {c["pk"]["S"] for c in chunk_items(moto, table)} == {f"chunk#{generation}"}
    store.replace("crl", "root", {"crl_pem": "small"}, 2)
    assert chunk_items(moto, table) == []
    assert store.get("crl", "root") == Item("crl", "root", {"crl_pem": "small"}, 3)


def test_deleting_a_big_value_removes_its_chunks(moto: MotoServer, table: str, store: DynamoDBStore) -> None:
    store.create("crl", "root", {"crl_pem": incompressible(900_000)})
    assert store.delete("crl", "root", 1) is True
    assert raw_items(moto, table) == []


def test_big_value_refusals_change_nothing(moto: MotoServer, table: str, store: DynamoDBStore) -> None:
    first = {"crl_pem": incompressible(500_000)}
    store.create("crl", "root", first)
    before = raw_items(moto, table)
    with pytest.raises(AlreadyExists):
        store.create("crl", "root", {"crl_pem": incompressible(500_000)})
    with pytest.raises(VersionConflict):
        store.replace("crl", "root", {"crl_pem": incompressible(500_000)}, 7)
    assert sorted(map(repr, raw_items(moto, table))) == sorted(map(repr, before))
    assert store.get("crl", "root") == Item("crl", "root", first, 1)


def test_big_values_in_a_transaction(moto: MotoServer, table: str, store: DynamoDBStore) -> None:
    store.create("crl", "root", {"number": 1, "crl_pem": incompressible(600_000)})
    crl = incompressible(600_000)
    store.transact(
        [
            Replace("crl", "root", {"number": 2, "crl_pem": crl}, 1),
            Create("revoked", "root/01", {"serial": "1"}),
        ]
    )
    assert store.get("crl", "root") == Item("crl", "root", {"number": 2, "crl_pem": crl}, 2)
    with pytest.raises(TransactionConflict) as refused:
        store.transact(
            [
                Replace("crl", "root", {"number": 3, "crl_pem": incompressible(600_000)}, 2),
                Create("revoked", "root/01", {"serial": "1"}),
            ]
        )
    assert [type(r) for r in refused.value.reasons] == [AlreadyExists]
    assert store.get("crl", "root") == Item("crl", "root", {"number": 2, "crl_pem": crl}, 2)
    store.transact([Delete("crl", "root")])
    assert [i["sk"]["S"] for i in raw_items(moto, table)] == ["root/01"]


def test_value_beyond_a_transaction_is_refused(moto: MotoServer, table: str, store: DynamoDBStore) -> None:
    with pytest.raises(ValueError, match="too large"):
        store.create("crl", "root", {"crl_pem": incompressible(7_000_000)})
    assert raw_items(moto, table) == []


# -- layout


def test_kinds_of_many_items_are_sharded_and_listed_in_order(
    moto: MotoServer, table: str, store: DynamoDBStore
) -> None:
    names = [f"agent-{n:03d}.example.com" for n in range(60)]
    for name in reversed(names):
        store.create("node", name, {"certname": name})
    partitions = {i["pk"]["S"] for i in raw_items(moto, table)}
    assert len(partitions) > SHARDS["node"] // 2
    assert [i.key for i in store.list("node")] == names
    assert [i.key for i in store.list("node", "agent-01")] == names[10:20]


def test_create_table_is_idempotent(moto: MotoServer) -> None:
    store = DynamoDBStore(f"idempotent-{os.getpid()}", REGION, moto.endpoint_url)
    assert store.create_table(deletion_protection=False) is True
    store.create("node", "n1", {"a": 1})
    assert store.create_table(deletion_protection=False) is False
    assert store.get("node", "n1") == Item("node", "n1", {"a": 1}, 1)
    description = client("dynamodb", moto.endpoint_url, REGION).describe_table(TableName=store.table)["Table"]
    assert description["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    store.close()


def test_create_table_refuses_a_foreign_table(moto: MotoServer) -> None:
    name = f"foreign-{os.getpid()}"
    client("dynamodb", moto.endpoint_url, REGION).create_table(
        TableName=name,
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    store = DynamoDBStore(name, REGION, moto.endpoint_url)
    with pytest.raises(TableMismatch):
        store.create_table()
    store.close()


def test_missing_table(moto: MotoServer) -> None:
    store = DynamoDBStore("never-created", REGION, moto.endpoint_url)
    with pytest.raises(TableMissing, match="store init"):
        store.get("node", "n1")
    with pytest.raises(TableMissing):
        store.create("node", "n1", {})
    with pytest.raises(TableMissing, match="store init"):
        store.get_many("node", ["n1", "n2"])
    store.close()


def test_missing_permission_is_one_line(monkeypatch: pytest.MonkeyPatch, aws_credentials: None) -> None:
    # moto enforces IAM once its first (setup) calls are spent: a user who may only read.
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "3")
    with MotoServer() as strict:
        iam = client("iam", strict.endpoint_url, REGION)
        iam.create_user(UserName="reader")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["dynamodb:GetItem"], "Resource": "*"}],
        }
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        store = DynamoDBStore("puppetha", REGION, strict.endpoint_url)
        with pytest.raises(StoreAccessDenied) as denied:
            store.create_table()
        assert str(denied.value) == "access denied: dynamodb:CreateTable on table 'puppetha' (403)"
        store.close()


# -- failures of the endpoint


def test_closed_store_is_unavailable(store: DynamoDBStore) -> None:
    store.create("node", "n1", {})
    store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.get("node", "n1")


def test_unreachable_endpoint_is_unavailable(aws_credentials: None) -> None:
    store = DynamoDBStore(
        "t",
        REGION,
        f"http://127.0.0.1:{_free_port()}",
        deadline=1.0,
    )
    for call in (
        lambda: store.get("node", "n1"),
        lambda: store.create("node", "n1", {}),
        lambda: store.list("node"),
        lambda: store.transact([Create("node", "n1", {})]),
        lambda: store.get_many("node", ["n1", "n2"]),
    ):
        with pytest.raises(StoreUnavailable):
            call()
    store.close()


def test_no_credentials_is_access_denied(
    moto: MotoServer, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = DynamoDBStore(table, REGION, moto.endpoint_url)
    with pytest.raises(StoreAccessDenied, match="no AWS credentials"):
        store.get("node", "n1")
    store.close()


class Throttling(BaseHTTPRequestHandler):
    """Answers every DynamoDB call as DynamoDB does when it throttles."""

    requests: list[str] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.requests.append(self.headers["X-Amz-Target"])
        body = json.dumps(
            {
                "__type": "com.amazonaws.dynamodb.v20120810#ThrottlingException",
                "message": "Rate of requests exceeds the allowed throughput.",
            }
        ).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/x-amz-json-1.0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_throttled_past_retries_is_unavailable(aws_credentials: None) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Throttling)
    Throttling.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        store = DynamoDBStore("t", REGION, f"http://127.0.0.1:{server.server_address[1]}", deadline=5.0)
        with pytest.raises(StoreUnavailable, match="ThrottlingException"):
            store.get("node", "n1")
        with pytest.raises(StoreUnavailable, match="ThrottlingException"):
            store.get_many("node", ["n1", "n2"])
        store.close()
    finally:
        server.shutdown()
        server.server_close()
    # botocore's own retries happened before the store gave up.
    assert Throttling.requests == ["DynamoDB_20120810.GetItem"] * 2 + ["DynamoDB_20120810.BatchGetItem"] * 2



def forward(upstream: str, headers: Any, body: bytes) -> tuple[int, bytes, str]:
    """A proxy's call passed on to moto: its status, body and content type."""
    passed = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length")}
    request = urllib.request.Request(upstream, data=body, headers=passed, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - moto on loopback
            return answer.status, answer.read(), answer.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers["Content-Type"]


class MotoProxy(BaseHTTPRequestHandler):
    """What the proxies in front of moto below share: where they forward, how they answer."""

    upstream = ""

    def answer(self, status: int, reply: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class LosesFirstAnswers(MotoProxy):
    """
    Forwards DynamoDB calls to moto, but drops the connection instead of answering the first
    call of each operation in ``lose``: the write happened, its answer never arrives.
    """

    upstream = ""
    lose: set[str] = set()
    seen: list[str] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        target = self.headers["X-Amz-Target"].rsplit(".", 1)[-1]
        self.seen.append(target)
        status, reply, kind = forward(self.upstream, self.headers, body)
        if target in self.lose:
            self.lose.discard(target)
            self.close_connection = True
            return
        self.answer(status, reply, kind)


def test_a_retried_write_recognises_its_own_first_attempt(moto: MotoServer, table: str) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), LosesFirstAnswers)
    LosesFirstAnswers.upstream = moto.endpoint_url
    LosesFirstAnswers.lose = {"PutItem"}
    LosesFirstAnswers.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        store = DynamoDBStore(table, REGION, f"http://127.0.0.1:{server.server_address[1]}")
        assert store.create("claim", "i-0abc/agent", {"by": 1}) == Item("claim", "i-0abc/agent", {"by": 1}, 1)
        LosesFirstAnswers.lose = {"PutItem", "DeleteItem"}
        assert store.replace("claim", "i-0abc/agent", {"by": 2}, 1).version == 2
        assert store.delete("claim", "i-0abc/agent", 2) is True
        store.close()
    finally:
        server.shutdown()
        server.server_close()
    # Each write was sent twice: the first attempt applied, its answer lost, then the retry.
    assert LosesFirstAnswers.seen == ["PutItem"] * 4 + ["DeleteItem"] * 2
    assert raw_items(moto, table) == []


class HoldsBackKeys(MotoProxy):
    """
    Forwards DynamoDB calls to moto, but the n-th BatchGetItem only with its first
    ``answered[n]`` keys (the last number for every call after): the others come back in
    ``UnprocessedKeys``, as DynamoDB leaves keys when it throttles a read or its answer would
    pass 16 MB.  ``asked`` holds the number of keys of each such call.
    """

    upstream = ""
    answered: list[int] = [0]
    asked: list[int] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        target = self.headers["X-Amz-Target"].rsplit(".", 1)[-1]
        held: dict[str, Any] = {}
        if target == "BatchGetItem":
            request = json.loads(body)
            [(table, asked)] = request["RequestItems"].items()
            answered = self.answered[min(len(self.asked), len(self.answered) - 1)]
            self.asked.append(len(asked["Keys"]))
            keys, kept = asked["Keys"][:answered], asked["Keys"][answered:]
            if kept:
                held = {table: {**asked, "Keys": kept}}
            request["RequestItems"] = {table: {**asked, "Keys": keys}} if keys else {}
            body = json.dumps(request).encode()
        if target == "BatchGetItem" and not request["RequestItems"]:
            status, kind = 200, "application/x-amz-json-1.0"
            reply = b'{"Responses": {}, "UnprocessedKeys": {}}'
        else:
            status, reply, kind = forward(self.upstream, self.headers, body)
        if held and status == 200:
            reply = json.dumps({**json.loads(reply), "UnprocessedKeys": held}).encode()
        self.answer(status, reply, kind)


@pytest.fixture
def holds_back_keys(moto: MotoServer) -> Iterator[str]:
    """The endpoint of a :class:`HoldsBackKeys` in front of moto."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), HoldsBackKeys)
    HoldsBackKeys.upstream = moto.endpoint_url
    HoldsBackKeys.answered = [0]
    HoldsBackKeys.asked = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_get_many_asks_again_for_unprocessed_keys(
    table: str, store: DynamoDBStore, holds_back_keys: str
) -> None:
    keys = [f"n{i:03d}" for i in range(150)]
    for start in range(0, len(keys), 100):
        store.transact([Create("node", key, {"i": key}) for key in keys[start : start + 100]])
    waits: list[float] = []
    through = DynamoDBStore(table, REGION, holds_back_keys, sleep=waits.append)
    HoldsBackKeys.answered = [40]
    wanted = [*keys, "absent", *keys[:10]]
    assert through.get_many("node", wanted) == store.get_many("node", wanted)
    through.close()
    # 151 distinct keys: 100 and 51 in the first calls (in parallel), then what each answer
    # left; every call but the last of each was followed by a wait, each one bounded.
    assert sorted(HoldsBackKeys.asked) == [11, 20, 51, 60, 100]
    assert len(waits) == 3
    assert all(0 <= wait <= LONGEST_UNPROCESSED_BACKOFF for wait in waits)


def test_get_many_gives_up_on_keys_left_unprocessed(
    table: str, store: DynamoDBStore, holds_back_keys: str
) -> None:
    store.create("node", "n1", {})
    clock = Clock()  # the store's time: each wait moves it on, nothing sleeps
    through = DynamoDBStore(
        table, REGION, holds_back_keys, deadline=5.0, monotonic=clock.seconds, sleep=clock.advance
    )
    HoldsBackKeys.answered = [1, 0]  # n1 answered, then nothing
    with pytest.raises(StoreUnavailable) as raised:
        through.get_many("node", ["n1", "n2", "n3"])
    through.close()
    calls = len(HoldsBackKeys.asked)
    assert str(raised.value) == (
        f"DynamoDB left 2 of 3 node items unread on {table!r} "
        f"after {calls} BatchGetItem calls within the store's 5 s"
    )
    # It asked again for the two, waiting between calls, and stopped at the deadline rather
    # than answer with n1 alone.
    assert HoldsBackKeys.asked == [3] + [2] * (calls - 1)
    assert calls > 3
    assert 0 < clock.seconds() <= 5.0


def _client_error(code: str, status: int = 400) -> ClientError:
    response: Any = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "PutItem")


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("AccessDeniedException", 400, StoreAccessDenied),
        ("UnrecognizedClientException", 400, StoreAccessDenied),
        ("ExpiredTokenException", 400, StoreAccessDenied),
        ("403", 403, StoreAccessDenied),
        ("ResourceNotFoundException", 400, TableMissing),
        ("ProvisionedThroughputExceededException", 400, StoreUnavailable),
        ("ThrottlingException", 400, StoreUnavailable),
        ("RequestLimitExceeded", 400, StoreUnavailable),
        ("InternalServerError", 500, StoreUnavailable),
        ("SomethingNew", 503, StoreUnavailable),
        ("ValidationException", 400, StoreError),
    ],
)
def test_classify_error(code: str, status: int, expected: type[StoreError]) -> None:
    error = classify_error(_client_error(code, status), "puppetha", "PutItem")
    assert type(error) is expected
    assert "\n" not in str(error)
    assert "puppetha" in str(error)


# -- migration from SQLite


def _fill_sqlite(path: str) -> SQLiteStore:
    """A small but complete one-box store: every kind, a chunk-sized CRL, replaced items."""
    store = SQLiteStore(path)
    records = Records(store)
    records.create(CARecord("root", "CERT", "c2VhbGVk", "root", 1.0))
    records.create(CRLRecord("root", 7, incompressible(700_000), 1.0, 2.0))
    for n in range(130):
        name = f"agent-{n:03d}.example.com"
        records.create(EnrollmentClaim(f"i-{n:017x}", "agent", name, 1.0, "issued"))
        records.create(
            NodeRecord(
                name, f"i-{n:017x}", "agent", "123456789012", REGION, "10.0.0.1", n + 1, "m1", "PEM", 1.0, 2.0
            )
        )
        records.create(RevokedRecord("root", 2**120 + n, 3.0, name))
    records.create(MasterRecord("m1.example.com", "10.0.0.9", 8141, "m1.example.com", 1.0))
    records.create(Classification("default", {"ntp": {"servers": ["a", "b"]}}, {"x": True}, "production"))
    store.create("lease", "front", {"holder": "lb-1", "token": 3})
    store.replace("lease", "front", {"holder": "lb-2", "token": 4, "flag": True, "n": 2.0}, 1)
    return store


def _everything(store: IStore) -> dict[tuple[str, str], Any]:
    return {(i.kind, i.key): i.value for kind in KINDS for i in store.list(kind)}


def test_migrate_sqlite_to_dynamodb(tmp_path: Path, moto: MotoServer, table: str) -> None:
    source = _fill_sqlite(str(tmp_path / "store.sqlite"))
    target = DynamoDBStore(table, REGION, moto.endpoint_url)
    counts = migrate(source, target)
    assert counts["node"] == KindCount(copied=130, unchanged=0)
    assert counts["revoked"] == KindCount(copied=130, unchanged=0)
    assert sum(c.copied for c in counts.values()) == 3 + 130 * 3 + 2
    want = _everything(source)
    got = _everything(DynamoDBStore(table, REGION, moto.endpoint_url))
    assert got.keys() == want.keys()
    for where, value in want.items():
        assert_same_json(got[where], value, str(where))
    # Versions start again at 1; what matters lives in the values.
    lease = target.get("lease", "front")
    assert lease is not None
    assert lease.version == 1
    assert lease.value["token"] == 4

    # A re-run copies nothing and changes nothing.
    again = migrate(source, target)
    assert all(c.copied == 0 for c in again.values())
    assert again["node"] == KindCount(copied=0, unchanged=130)
    assert target.get("lease", "front") == lease
    source.close()
    target.close()


def test_migrate_refuses_a_target_with_other_values(tmp_path: Path, moto: MotoServer, table: str) -> None:
    source = _fill_sqlite(str(tmp_path / "store.sqlite"))
    target = DynamoDBStore(table, REGION, moto.endpoint_url)
    target.create("node", "agent-005.example.com", {"certname": "someone else"})
    with pytest.raises(MigrationConflict, match="agent-005"):
        migrate(source, target)
    assert [i.key for kind in KINDS for i in target.list(kind)] == ["agent-005.example.com"]
    source.close()
    target.close()


def test_migrate_finishes_an_interrupted_copy(tmp_path: Path, moto: MotoServer, table: str) -> None:
    source = _fill_sqlite(str(tmp_path / "store.sqlite"))
    target = DynamoDBStore(table, REGION, moto.endpoint_url)
    migrate(source, target, kinds=["ca", "node"])
    counts = migrate(source, target)
    assert counts["node"] == KindCount(copied=0, unchanged=130)
    assert counts["claim"] == KindCount(copied=130, unchanged=0)
    assert _everything(target).keys() == _everything(source).keys()
    source.close()
    target.close()


@pytest.mark.parametrize(
    ("source", "target", "copy", "unchanged", "conflicts"),
    [
        ({}, {}, [], [], []),
        ({"a": {"x": 1}}, {}, ["a"], [], []),
        ({"a": {"x": 1}}, {"a": {"x": 1}}, [], ["a"], []),
        ({"a": {"x": 1}}, {"a": {"x": 1.0}}, [], ["a"], []),
        ({"a": {"x": 1}}, {"a": {"x": True}}, [], [], ["a"]),
        ({"a": {"x": 1}}, {"a": {"x": 2}}, [], [], ["a"]),
        ({"a": {"x": [1]}}, {"a": {"x": [1, 2]}}, [], [], ["a"]),
        ({"a": {}, "b": {}}, {"b": {}, "c": {}}, ["a"], ["b"], []),
    ],
)
def test_plan_kind(
    source: dict[str, Any],
    target: dict[str, Any],
    copy: list[str],
    unchanged: list[str],
    conflicts: list[str],
) -> None:
    plan = plan_kind(
        "node",
        [Item("node", k, v, 1) for k, v in source.items()],
        [Item("node", k, v, 3) for k, v in target.items()],
    )
    assert [i.key for i in plan.copy] == copy
    assert list(plan.unchanged) == unchanged
    assert list(plan.conflicts) == conflicts


def test_batches_respect_writes_and_bytes() -> None:
    items = [Item("node", f"n{i}", {"pad": "x" * 100}, 1) for i in range(10)]
    assert [len(b) for b in batches(items, 4, 10_000)] == [4, 4, 2]
    assert [len(b) for b in batches(items, 100, 350)] == [3, 3, 3, 1]
    big = [Item("crl", "root", {"pem": "x" * 5000}, 1), *items[:2]]
    assert [len(b) for b in batches(big, 100, 1000)] == [1, 2]
