"""
The shared store on Amazon DynamoDB: one table, many daemons.

The table layout, its limits and the reasons for them are in ``docs/dynamodb.md``.  In short:
a head item per store item at ``pk = "<kind>#<shard>"``, ``sk = <key>``, where the shard is a
stable hash of the key; values too big for one DynamoDB item live zlib-compressed in immutable
chunk items at ``pk = "chunk#<generation>"``, written in the same transaction as their head.
The change counters of :class:`IGenerations` are items at ``pk = "gen"``, ``sk = <kind>``,
counted up in the transaction of every write of a counted kind.
"""

from __future__ import annotations

import builtins
import hashlib
import heapq
import random
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
from attrs import frozen
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from twisted.logger import Logger
from zope.interface import implementer

from puppetha.aws.boto import DEFAULT_DEADLINE, within_deadline
from puppetha.store import (
    COUNTED_KINDS,
    AlreadyExists,
    Check,
    Create,
    Delete,
    IBatchGet,
    IGenerations,
    IStore,
    Item,
    Replace,
    StoreError,
    StoreUnavailable,
    TransactionConflict,
    Value,
    VersionConflict,
    Write,
)
from puppetha.store.values import (
    decode_value,
    encode_value,
    validate_key,
    validate_kind,
    validate_prefix,
    validate_version,
    validate_writes,
    version_can_exist,
)

log = Logger()

#: Shards per kind.  Part of the table layout: changing a number strands the items already
#: written under the old one, so a change means a new table and ``puppetha store migrate``.
SHARDS: Mapping[str, int] = {"claim": 16, "node": 16, "revoked": 16}
DEFAULT_SHARDS = 1

#: JSON bytes kept inline in the head item; DynamoDB caps an item (names and values) at 400 KB
#: and the key attributes may take up to about 1.1 KB of it.
INLINE_LIMIT = 380_000
#: Compressed bytes per chunk item.
CHUNK_SIZE = 380_000
#: DynamoDB's limits on one TransactWriteItems call.
MAX_TRANSACTION_ACTIONS = 100
MAX_TRANSACTION_BYTES = 4_000_000
#: DynamoDB's limit on the keys of one BatchGetItem call.
MAX_BATCH_GET_KEYS = 100
#: The first and the longest wait before a BatchGetItem is sent again for the keys DynamoDB
#: left unprocessed (throttled, or past its 16 MB an answer); each wait is drawn at random up
#: to the bound, which doubles from the first to the longest.
FIRST_UNPROCESSED_BACKOFF = 0.05
LONGEST_UNPROCESSED_BACKOFF = 1.0

#: Error codes that mean "DynamoDB is there but will not serve us now" once botocore's own
#: retries are spent.
_UNAVAILABLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "LimitExceededException",
        "InternalServerError",
        "ServiceUnavailable",
        "RequestTimeout",
        "TransactionInProgressException",
    }
)
_DENIED_CODES = frozenset(
    {
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "MissingAuthenticationTokenException",
    }
)

# Backoff jitter (contended transactions, unprocessed keys); nothing secret depends on it.
_JITTER = random.Random()  # noqa: S311


class StoreAccessDenied(StoreError):
    """The AWS identity the daemon runs as may not do what was asked to the table."""


class TableMissing(StoreError):
    """The table does not exist (``puppetha store init`` creates it)."""


class TableMismatch(StoreError):
    """A table of that name exists with another key schema."""


def shard_of(kind: str, key: str) -> int:
    """The shard of a key: stable across processes and releases (part of the table layout)."""
    shards = SHARDS.get(kind, DEFAULT_SHARDS)
    if shards == 1:
        return 0
    # A cryptographic digest, not crc32: CRC is linear, so keys that differ only in a few
    # digits (agent-001, agent-002...) land on a handful of shards.
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def partition_key(kind: str, key: str) -> str:
    return f"{kind}#{shard_of(kind, key)}"


def classify_error(error: Exception, table: str, operation: str) -> StoreError:
    """The store error a boto3/botocore failure stands for (after botocore's retries)."""
    if isinstance(error, NoCredentialsError):
        return StoreAccessDenied(f"no AWS credentials to reach DynamoDB table {table!r}")
    if isinstance(error, BotoCoreError):
        return StoreUnavailable(f"DynamoDB unreachable ({operation} on {table!r}): {error}")
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        message = error.response.get("Error", {}).get("Message", "") or code
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _DENIED_CODES or status == 403:
            return StoreAccessDenied(f"access denied: dynamodb:{operation} on table {table!r} ({code})")
        if code == "ResourceNotFoundException":
            return TableMissing(f"DynamoDB table {table!r} does not exist; run `puppetha store init`")
        if code in _UNAVAILABLE_CODES:
            return StoreUnavailable(f"DynamoDB refused {operation} on {table!r}: {code}")
        if status >= 500:
            return StoreUnavailable(f"DynamoDB failed {operation} on {table!r}: {code} {message}")
        return StoreError(f"DynamoDB refused {operation} on {table!r}: {code}: {message}")
    return StoreError(f"{operation} on {table!r} failed: {error}")


@frozen
class _Encoded:
    """A value as it will be written: the head's attributes and its chunk items, if any."""

    value: dict[str, Any]
    head: dict[str, Any]
    chunks: tuple[dict[str, Any], ...]
    size: int


def _encode(kind: str, key: str, text: str, version: int, write_id: str) -> _Encoded:
    """The head and chunks that hold ``text`` (from :func:`encode_value`) at ``version``."""
    data = text.encode("utf-8")
    head: dict[str, Any] = {
        "pk": {"S": partition_key(kind, key)},
        "sk": {"S": key},
        "v": {"N": str(version)},
        "w": {"S": write_id},
    }
    chunks: list[dict[str, Any]] = []
    if len(data) <= INLINE_LIMIT:
        head["value"] = {"S": text}
        size = len(data) + len(key) + 100
    else:
        packed = zlib.compress(data, 6)
        generation = uuid.uuid4().hex
        pieces = [packed[i : i + CHUNK_SIZE] for i in range(0, len(packed), CHUNK_SIZE)]
        head["gen"] = {"S": generation}
        head["chunks"] = {"N": str(len(pieces))}
        for index, piece in enumerate(pieces):
            chunks.append(
                {
                    "pk": {"S": f"chunk#{generation}"},
                    "sk": {"S": f"{index:06d}"},
                    "data": {"B": piece},
                }
            )
        size = len(packed) + (len(pieces) + 1) * 200 + len(key)
    return _Encoded(decode_value(text), head, tuple(chunks), size)


#: Partition of the change counters (no kind's partition has this name: theirs hold a ``#``).
GENERATIONS_PK = "gen"


@implementer(IStore, IBatchGet, IGenerations)
class DynamoDBStore:
    """
    :class:`IStore` on one DynamoDB table.  Blocking and thread-safe: the daemon calls it from
    a bounded thread pool (one boto3 client, which is thread-safe, shared by all threads).

    ``monotonic`` and ``sleep`` are the clock and the wait of the backoff between BatchGetItem
    calls for unprocessed keys, which stops once ``deadline`` has passed since the read began.
    """

    def __init__(
        self,
        table: str,
        region: str,
        endpoint_url: str | None,
        client: Any = None,
        *,
        deadline: float = DEFAULT_DEADLINE,
        max_connections: int = 32,
        list_parallelism: int = 8,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.table = table
        self.region = region
        self._deadline = deadline
        self._monotonic = monotonic
        self._sleep = sleep
        if client is None:
            # Each API call ends within the store's deadline ([store] timeout), retries included.
            config = within_deadline(deadline, region_name=region, max_pool_connections=max_connections)
            # A session per store: boto3's default session is not thread-safe to build clients from.
            session = boto3.session.Session()
            client = session.client("dynamodb", endpoint_url=endpoint_url, config=config)
        self._client = client
        self._closed = False
        self._lister = ThreadPoolExecutor(max_workers=list_parallelism, thread_name_prefix="dynamodb-list")

    # -- the interface ---------------------------------------------------------------------

    def get(self, kind: str, key: str) -> Item | None:
        validate_kind(kind)
        validate_key(key)
        for _ in range(5):
            head = self._get_head(kind, key)
            if head is None:
                return None
            item = self._decode(kind, head)
            if item is not None:
                return item
            # The chunks went away under us: a newer write replaced them.  Read the head again.
        raise StoreUnavailable(f"{kind} {key!r} kept changing while being read")

    def get_many(self, kind: str, keys: Sequence[str]) -> dict[str, Item]:
        validate_kind(kind)
        # Once each: DynamoDB refuses a BatchGetItem that names a key twice.
        wanted = builtins.list(dict.fromkeys(validate_key(key) for key in keys))
        heads = self._get_heads([self._key(kind, key) for key in wanted], what=f"{kind} items")
        found: dict[str, Item] = {}
        for head in heads:
            key = head["sk"]["S"]
            item = self._decode(kind, head)
            if item is None:
                # Its chunks went away under us: a newer write replaced them.
                item = self.get(kind, key)
            if item is not None:
                found[key] = item
        return found

    def create(self, kind: str, key: str, value: Value) -> Item:
        validate_kind(kind)
        validate_key(key)
        write_id = uuid.uuid4().hex
        encoded = _encode(kind, key, encode_value(value), 1, write_id)
        if encoded.chunks or kind in COUNTED_KINDS:
            # A transaction: it counts the change in the same write.
            self._single(Create(kind, key, value), encoded)
            return Item(kind, key, encoded.value, 1)
        try:
            self._call(
                "put_item",
                TableName=self.table,
                Item=encoded.head,
                ConditionExpression="attribute_not_exists(pk)",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as e:
            if not _is_our_write(e, write_id):
                raise AlreadyExists(kind, key) from None
        return Item(kind, key, encoded.value, 1)

    def replace(self, kind: str, key: str, value: Value, expected_version: int) -> Item:
        validate_kind(kind)
        validate_key(key)
        validate_version(expected_version)
        write_id = uuid.uuid4().hex
        encoded = _encode(kind, key, encode_value(value), expected_version + 1, write_id)
        if not version_can_exist(expected_version):
            raise VersionConflict(kind, key, expected_version)
        if encoded.chunks or kind in COUNTED_KINDS:
            self._single(Replace(kind, key, value, expected_version), encoded)
            return Item(kind, key, encoded.value, expected_version + 1)
        try:
            answer = self._call(
                "put_item",
                TableName=self.table,
                Item=encoded.head,
                ConditionExpression="#v = :expected",
                ExpressionAttributeNames={"#v": "v"},
                ExpressionAttributeValues={":expected": {"N": str(expected_version)}},
                ReturnValues="ALL_OLD",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as e:
            if not _is_our_write(e, write_id):
                raise VersionConflict(kind, key, expected_version) from None
        else:
            self._drop_chunks_of(answer.get("Attributes"))
        return Item(kind, key, encoded.value, expected_version + 1)

    def delete(self, kind: str, key: str, expected_version: int | None = None) -> bool:
        validate_kind(kind)
        validate_key(key)
        if kind in COUNTED_KINDS:
            return self._delete_counted(kind, key, expected_version)
        arguments: dict[str, Any] = {
            "TableName": self.table,
            "Key": self._key(kind, key),
            "ReturnValues": "ALL_OLD",
        }
        if expected_version is not None:
            validate_version(expected_version)
            if not version_can_exist(expected_version):
                raise VersionConflict(kind, key, expected_version)
            arguments.update(
                ConditionExpression="#v = :expected",
                ExpressionAttributeNames={"#v": "v"},
                ExpressionAttributeValues={":expected": {"N": str(expected_version)}},
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        try:
            answer = self._call("delete_item", **arguments)
        except ClientError as e:
            # Gone, after botocore retried: our own first attempt may have deleted it.
            if "Item" not in e.response and _retried(e.response):
                return True
            raise VersionConflict(kind, key, expected_version) from None
        old = answer.get("Attributes")
        self._drop_chunks_of(old)
        return bool(old)

    def _delete_counted(self, kind: str, key: str, expected_version: int | None) -> bool:
        """A delete of a counted kind, in a transaction with its count; whether the item existed."""
        if expected_version is not None:
            validate_version(expected_version)
            if not version_can_exist(expected_version):
                raise VersionConflict(kind, key, expected_version)
            self._single(Delete(kind, key, expected_version), None)
            return True
        for _ in range(5):
            head = self._get_head(kind, key)
            if head is None:
                return False
            try:
                # At the version just read, so "it existed" is true of the item deleted.
                self._single(Delete(kind, key, int(head["v"]["N"])), None)
            except VersionConflict:
                continue
            return True
        raise StoreUnavailable(f"{kind} {key!r} kept changing while being deleted")

    def generations(self) -> dict[str, int]:
        found = dict.fromkeys(COUNTED_KINDS, 0)
        for counter in self._query(GENERATIONS_PK, ""):
            if counter["sk"]["S"] in found:
                found[counter["sk"]["S"]] = int(counter["n"]["N"])
        return found

    def list(self, kind: str, prefix: str = "") -> list[Item]:
        validate_kind(kind)
        validate_prefix(prefix)
        shards = SHARDS.get(kind, DEFAULT_SHARDS)
        if shards == 1:
            return self._list_shard(kind, 0, prefix)
        try:
            parts = list(self._lister.map(lambda s: self._list_shard(kind, s, prefix), range(shards)))
        except RuntimeError:
            if self._closed:  # the lister pool is shut down with the store
                raise StoreUnavailable(f"store on DynamoDB table {self.table!r} is closed") from None
            raise
        return list(heapq.merge(*parts, key=lambda item: item.key))

    def transact(self, writes: Sequence[Write]) -> None:
        writes = list(writes)
        texts = validate_writes(writes)
        if not writes:
            return
        # DynamoDB would refuse the number itself (a ValidationException), not the condition.
        impossible = [
            VersionConflict(w.kind, w.key, w.expected_version)
            for w in writes
            if not isinstance(w, Create)
            and w.expected_version is not None
            and not version_can_exist(w.expected_version)
        ]
        if impossible:
            raise TransactionConflict(impossible)
        encoded: dict[int, _Encoded] = {}
        for index, text in texts.items():
            write = writes[index]
            version = write.expected_version + 1 if isinstance(write, Replace) else 1
            encoded[index] = _encode(write.kind, write.key, text, version, uuid.uuid4().hex)
        self._commit(writes, encoded)

    def close(self) -> None:
        self._closed = True
        self._lister.shutdown(wait=True)
        self._client.close()

    # -- table management ------------------------------------------------------------------

    def create_table(
        self,
        *,
        wait: bool = True,
        deletion_protection: bool = True,
        point_in_time_recovery: bool = True,
    ) -> bool:
        """
        Create the table if it is not there; returns whether it was created.  An existing
        table with the same key schema is accepted as it is (so ``store init`` can be re-run).
        """
        try:
            self._call(
                "create_table",
                TableName=self.table,
                AttributeDefinitions=[
                    {"AttributeName": "pk", "AttributeType": "S"},
                    {"AttributeName": "sk", "AttributeType": "S"},
                ],
                KeySchema=[
                    {"AttributeName": "pk", "KeyType": "HASH"},
                    {"AttributeName": "sk", "KeyType": "RANGE"},
                ],
                BillingMode="PAY_PER_REQUEST",
                DeletionProtectionEnabled=deletion_protection,
                Tags=[{"Key": "puppetha:layout", "Value": "1"}],
            )
        except StoreError as e:
            cause = e.__cause__
            if not (isinstance(cause, ClientError) and _code(cause) == "ResourceInUseException"):
                raise
            self._check_schema()
            log.info("store table {table} already exists", table=self.table)
            return False
        if wait:
            self._client.get_waiter("table_exists").wait(
                TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 120}
            )
        if point_in_time_recovery:
            self._call(
                "update_continuous_backups",
                TableName=self.table,
                PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True},
            )
        log.info("created store table {table}", table=self.table)
        return True

    def _check_schema(self) -> None:
        described = self._call("describe_table", TableName=self.table)["Table"]
        schema = {(k["AttributeName"], k["KeyType"]) for k in described["KeySchema"]}
        if schema != {("pk", "HASH"), ("sk", "RANGE")}:
            raise TableMismatch(
                f"DynamoDB table {self.table!r} exists with another key schema: {sorted(schema)}"
            )

    # -- internals -------------------------------------------------------------------------

    def _call(self, operation: str, **arguments: Any) -> Any:
        """One API call; condition failures pass through, everything else becomes a StoreError."""
        if self._closed:
            raise StoreUnavailable(f"store on DynamoDB table {self.table!r} is closed")
        try:
            return getattr(self._client, operation)(**arguments)
        except ClientError as e:
            if _code(e) in ("ConditionalCheckFailedException", "TransactionCanceledException"):
                raise
            raise classify_error(e, self.table, _operation_name(operation)) from e
        except BotoCoreError as e:
            raise classify_error(e, self.table, _operation_name(operation)) from e

    def _key(self, kind: str, key: str) -> dict[str, Any]:
        return {"pk": {"S": partition_key(kind, key)}, "sk": {"S": key}}

    def _get_head(self, kind: str, key: str) -> dict[str, Any] | None:
        answer = self._call("get_item", TableName=self.table, Key=self._key(kind, key), ConsistentRead=True)
        head: dict[str, Any] | None = answer.get("Item")
        return head

    def _decode(self, kind: str, head: Mapping[str, Any]) -> Item | None:
        """The item a head stands for, or ``None`` if its chunks are gone (it was replaced)."""
        key = head["sk"]["S"]
        version = int(head["v"]["N"])
        if "value" in head:
            return Item(kind, key, decode_value(head["value"]["S"]), version)
        count = int(head["chunks"]["N"])
        pieces = [bytes(chunk["data"]["B"]) for chunk in self._query(f"chunk#{head['gen']['S']}", "")]
        if len(pieces) != count:
            return None
        return Item(kind, key, decode_value(zlib.decompress(b"".join(pieces))), version)

    def _query(self, pk: str, prefix: str) -> Iterator[dict[str, Any]]:
        arguments: dict[str, Any] = {
            "TableName": self.table,
            "ConsistentRead": True,
            "ExpressionAttributeValues": {":pk": {"S": pk}},
        }
        if prefix:
            arguments["KeyConditionExpression"] = "pk = :pk AND begins_with(sk, :prefix)"
            arguments["ExpressionAttributeValues"][":prefix"] = {"S": prefix}
        else:
            arguments["KeyConditionExpression"] = "pk = :pk"
        while True:
            answer = self._call("query", **arguments)
            yield from answer.get("Items", [])
            last = answer.get("LastEvaluatedKey")
            if not last:
                return
            arguments["ExclusiveStartKey"] = last

    def _list_shard(self, kind: str, shard: int, prefix: str) -> builtins.list[Item]:
        items = []
        for head in self._query(f"{kind}#{shard}", prefix):
            item = self._decode(kind, head)
            if item is None:
                item = self.get(kind, head["sk"]["S"])
            if item is not None:
                items.append(item)
        return items

    def _single(self, write: Write, encoded: _Encoded | None) -> None:
        """A single write done as a transaction; its refusal is the write's own error."""
        try:
            self._commit([write], {} if encoded is None else {0: encoded})
        except TransactionConflict as e:
            raise e.reasons[0] from None

    def _commit(self, writes: Sequence[Write], encoded: Mapping[int, _Encoded]) -> None:
        """Write validated ``writes`` in one transaction; ``encoded`` holds each value, by position."""
        actions = [self._action(write, encoded.get(i)) for i, write in enumerate(writes)]
        for e in encoded.values():
            actions.extend(
                {
                    "Put": {
                        "TableName": self.table,
                        "Item": chunk,
                        "ConditionExpression": "attribute_not_exists(pk)",
                    }
                }
                for chunk in e.chunks
            )
        # Each counted kind written is counted once (one action per item in a transaction).
        counted = sorted({w.kind for w in writes if w.kind in COUNTED_KINDS and not isinstance(w, Check)})
        actions.extend(
            {
                "Update": {
                    "TableName": self.table,
                    "Key": {"pk": {"S": GENERATIONS_PK}, "sk": {"S": kind}},
                    "UpdateExpression": "ADD #n :one",
                    "ExpressionAttributeNames": {"#n": "n"},
                    "ExpressionAttributeValues": {":one": {"N": "1"}},
                }
            }
            for kind in counted
        )
        if len(actions) > MAX_TRANSACTION_ACTIONS:
            raise ValueError(
                f"transaction needs {len(actions)} DynamoDB writes with its value chunks, "
                f"at most {MAX_TRANSACTION_ACTIONS}"
            )
        size = sum(e.size for e in encoded.values())
        if size > MAX_TRANSACTION_BYTES:
            raise ValueError(
                f"transaction too large for DynamoDB: about {size} bytes (compressed), "
                f"at most {MAX_TRANSACTION_BYTES}"
            )
        # Chunks of the values about to be replaced or deleted, to remove once we have won.
        replaced = self._generations([w for w in writes if isinstance(w, (Replace, Delete))])
        for attempt in range(5):
            try:
                self._call("transact_write_items", TransactItems=actions)
                break
            except ClientError as e:
                codes = [r.get("Code", "None") for r in e.response.get("CancellationReasons", [])]
                failed = [
                    _refusal(writes[i])
                    for i, code in enumerate(codes[: len(writes)])
                    if code == "ConditionalCheckFailed"
                ]
                if failed:
                    raise TransactionConflict(failed) from None
                if "TransactionConflict" in codes and attempt < 4:
                    # Another transaction held one of our items; ours did nothing.  Try again.
                    time.sleep(_JITTER.uniform(0.005, 0.05) * (attempt + 1))
                    continue
                if "TransactionConflict" in codes:
                    raise TransactionConflict(
                        [
                            StoreError(f"{writes[i].kind} {writes[i].key!r} is contended")
                            for i, code in enumerate(codes[: len(writes)])
                            if code == "TransactionConflict"
                        ]
                    ) from None
                if any(c in ("ThrottlingError", "ProvisionedThroughputExceeded") for c in codes):
                    raise StoreUnavailable(f"DynamoDB throttled a transaction: {codes}") from e
                raise StoreError(f"DynamoDB refused a transaction: {codes or e}") from e
        for generation, count in replaced:
            self._drop_chunks(generation, count)

    def _action(self, write: Write, encoded: _Encoded | None) -> dict[str, Any]:
        key = self._key(write.kind, write.key)
        if isinstance(write, Create):
            if encoded is None:
                raise TypeError(f"{write!r} has no encoded value")
            return {
                "Put": {
                    "TableName": self.table,
                    "Item": encoded.head,
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            }
        if isinstance(write, Delete) and write.expected_version is None:
            return {"Delete": {"TableName": self.table, "Key": key}}
        condition = {
            "TableName": self.table,
            "ConditionExpression": "#v = :expected",
            "ExpressionAttributeNames": {"#v": "v"},
            "ExpressionAttributeValues": {":expected": {"N": str(write.expected_version)}},
        }
        if isinstance(write, Replace):
            if encoded is None:
                raise TypeError(f"{write!r} has no encoded value")
            return {"Put": {"Item": encoded.head, **condition}}
        if isinstance(write, Delete):
            return {"Delete": {"Key": key, **condition}}
        return {"ConditionCheck": {"Key": key, **condition}}

    def _generations(self, writes: Sequence[Write]) -> builtins.list[tuple[str, int]]:
        """Chunk generations of the heads the writes will replace (consistent batch read)."""
        heads = self._get_heads(
            [self._key(w.kind, w.key) for w in writes], what="replaced values", projection="gen, chunks"
        )
        return [(head["gen"]["S"], int(head["chunks"]["N"])) for head in heads if "gen" in head]

    def _get_heads(
        self, keys: Sequence[Mapping[str, Any]], *, what: str, projection: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        """
        The heads at distinct ``keys`` that exist, read strongly consistent by BatchGetItem
        (:data:`MAX_BATCH_GET_KEYS` to a call, the calls of more keys in parallel on the
        listing's threads).  Keys DynamoDB leaves unprocessed are asked again after a backoff
        while the store's deadline allows, then :class:`StoreUnavailable`: never an answer that
        leaves out a key it did not read.
        """
        started = self._monotonic()
        batches = [keys[i : i + MAX_BATCH_GET_KEYS] for i in range(0, len(keys), MAX_BATCH_GET_KEYS)]
        if len(batches) <= 1:
            return [head for batch in batches for head in self._get_batch(batch, started, what, projection)]
        try:
            parts = builtins.list(
                self._lister.map(lambda batch: self._get_batch(batch, started, what, projection), batches)
            )
        except RuntimeError:
            if self._closed:  # the lister pool is shut down with the store
                raise StoreUnavailable(f"store on DynamoDB table {self.table!r} is closed") from None
            raise
        return [head for part in parts for head in part]

    def _get_batch(
        self, keys: Sequence[Mapping[str, Any]], started: float, what: str, projection: str | None
    ) -> builtins.list[dict[str, Any]]:
        """One BatchGetItem's heads, its unprocessed keys asked again until ``started`` + deadline."""
        asked: dict[str, Any] = {"Keys": builtins.list(keys), "ConsistentRead": True}
        if projection is not None:
            asked["ProjectionExpression"] = projection
        request: dict[str, Any] = {self.table: asked}
        heads: builtins.list[dict[str, Any]] = []
        backoff = FIRST_UNPROCESSED_BACKOFF
        calls = 0
        while True:
            answer = self._call("batch_get_item", RequestItems=request)
            calls += 1
            heads.extend(answer.get("Responses", {}).get(self.table, []))
            request = answer.get("UnprocessedKeys") or {}
            if not request:
                return heads
            wait = _JITTER.uniform(0, backoff)
            backoff = min(LONGEST_UNPROCESSED_BACKOFF, backoff * 2)
            if self._monotonic() + wait - started > self._deadline:
                raise StoreUnavailable(
                    f"DynamoDB left {len(request[self.table]['Keys'])} of {len(keys)} {what} unread "
                    f"on {self.table!r} after {calls} BatchGetItem calls within the store's "
                    f"{self._deadline:g} s"
                )
            self._sleep(wait)

    def _drop_chunks_of(self, head: Mapping[str, Any] | None) -> None:
        if head and "gen" in head:
            self._drop_chunks(head["gen"]["S"], int(head["chunks"]["N"]))

    def _drop_chunks(self, generation: str, count: int) -> None:
        """Remove a replaced value's chunks.  Best effort: no reader can reach them any more."""
        requests = [
            {"DeleteRequest": {"Key": {"pk": {"S": f"chunk#{generation}"}, "sk": {"S": f"{i:06d}"}}}}
            for i in range(count)
        ]
        try:
            for batch in _batches(requests, 25):
                pending: dict[str, Any] = {self.table: batch}
                while pending:
                    answer = self._call("batch_write_item", RequestItems=pending)
                    pending = answer.get("UnprocessedItems") or {}
        except StoreError:
            log.failure("could not remove chunks {generation}", generation=generation)


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _code(error: ClientError) -> str:
    code: str = error.response.get("Error", {}).get("Code", "")
    return code


def _retried(response: Mapping[str, Any]) -> bool:
    return int(response.get("ResponseMetadata", {}).get("RetryAttempts", 0)) > 0


def _is_our_write(error: ClientError, write_id: str) -> bool:
    """
    Whether a failed condition met our own write: botocore retried a request whose first
    attempt had in fact been applied (a timeout after DynamoDB wrote).
    """
    old: Mapping[str, Any] = error.response.get("Item") or {}  # type: ignore[assignment]
    return bool(old) and old.get("w", {}).get("S") == write_id


def _refusal(write: Write) -> StoreError:
    if isinstance(write, Create):
        return AlreadyExists(write.kind, write.key)
    return VersionConflict(write.kind, write.key, write.expected_version)


def _operation_name(operation: str) -> str:
    return "".join(part.capitalize() for part in operation.split("_"))
