"""
Store hot paths, on SQLite and on DynamoDB (a local moto server), at two fleet sizes.

    .venv/bin/python bench/store.py                 # 1,000 and 100,000 nodes
    .venv/bin/python bench/store.py --quick         # CI smoke run: a few seconds
    .venv/bin/python bench/store.py --sizes 1000,20000 --backends dynamodb --ops 500
    .venv/bin/python bench/store.py --batch 200 --sizes 1000 --backends dynamodb
    .venv/bin/python bench/store.py --batch 500 --sizes 2000 --backends dynamodb --delay-ms 5

Paths measured, one call at a time from one thread (latency as a caller sees it):

- ``enroll``: the enrollment record, ``create`` of a new ``claim``;
- ``node``: a node lookup, ``get`` of a random ``node``;
- ``classify``: a classification read, ``get`` of a random ``class`` scope.

Each figure is printed beside the same path at 1,000 nodes in the same run, as a ratio.

With ``--batch N`` it measures instead the ENC's refresh read (``puppetha.enc.service.ReadOnce``)
of N distinct random nodes: ``get`` key by key against one ``get_many``, alternated for
``--rounds`` rounds (which goes first alternates too), each round's two times and their ratio.
``--delay-ms`` puts a proxy in front of moto that holds each call that long before passing it
on: the network between a daemon and DynamoDB, which moto on loopback does not have.

Populating is the bench's shortcut, not the daemon's way: SQLite through ``transact`` batches of
100 creates; DynamoDB with ``batch_write_item`` straight into the table layout of
:mod:`puppetha.store.dynamodb` (the items ``create`` would write, at version 1).  moto keeps
everything in one Python process, so its absolute figures say little about DynamoDB itself
(single-digit milliseconds per call there); the ratios between sizes are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from attrs import frozen

from puppetha.store import Create, IBatchGet, IStore, Item
from puppetha.store.dynamodb import DynamoDBStore, partition_key

REGION = "us-east-1"
#: The size every figure is compared with.
BASELINE = 1000
#: One classification scope per this many nodes (security groups, tags, some node: scopes).
NODES_PER_SCOPE = 10


@frozen
class Result:
    backend: str
    size: int
    path: str
    ops: int
    ops_per_second: float
    p99_ms: float


def certname(n: int) -> str:
    return f"i-{n:017x}.eu-west-1.compute.internal"


def node_value(n: int) -> dict[str, Any]:
    # The shape and about the size of a NodeRecord (the certificate dominates).
    return {
        "certname": certname(n),
        "instance_id": f"i-{n:017x}",
        "role": "agent",
        "account": "123456789012",
        "region": "eu-west-1",
        "private_ip": f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}",
        "serial": f"{(n + 1) * 7919:x}",
        "issuer": "master-1.example.com",
        "certificate_pem": "-----BEGIN CERTIFICATE-----\n" + "A" * 900 + "\n-----END CERTIFICATE-----\n",
        "enrolled_at": 1_732_450_000.0 + n,
        "not_after": 1_890_000_000.0,
        "revoked_at": None,
    }


def scope(n: int) -> str:
    return f"sg:sg-{n:017x}"


def class_value(n: int) -> dict[str, Any]:
    return {
        "scope": scope(n),
        "classes": {"profile::base": {}, f"role::app{n % 50}": {"port": 8000 + n % 100}},
        "parameters": {"tier": "web", "datacenter": "eu-west-1a"},
        "environment": "production",
    }


def population(size: int) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for n in range(size):
        yield "node", certname(n), node_value(n)
    for n in range(max(1, size // NODES_PER_SCOPE)):
        yield "class", scope(n), class_value(n)


def populate_sqlite(store: IStore, size: int) -> None:
    batch: list[Create] = []
    for kind, key, value in population(size):
        batch.append(Create(kind, key, value))
        if len(batch) == 100:
            store.transact(batch)
            batch = []
    if batch:
        store.transact(batch)


def populate_dynamodb(client: Any, table: str, size: int, threads: int = 8) -> None:
    def item(kind: str, key: str, value: dict[str, Any]) -> dict[str, Any]:
        return {
            "pk": {"S": partition_key(kind, key)},
            "sk": {"S": key},
            "v": {"N": "1"},
            "w": {"S": uuid.uuid4().hex},
            "value": {"S": json.dumps(value, sort_keys=True, separators=(",", ":"))},
        }

    def write(batch: list[dict[str, Any]]) -> None:
        pending: dict[str, Any] = {table: [{"PutRequest": {"Item": i}} for i in batch]}
        while pending:
            pending = client.batch_write_item(RequestItems=pending).get("UnprocessedItems") or {}

    batches: list[list[dict[str, Any]]] = [[]]
    for kind, key, value in population(size):
        if len(batches[-1]) == 25:
            batches.append([])
        batches[-1].append(item(kind, key, value))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, batches))


def measure(operation: Callable[[int], object], ops: int) -> tuple[float, float]:
    """Calls per second and the 99th percentile latency in ms, after a short warm-up."""
    for i in range(ops, ops + min(50, ops // 10)):
        operation(i)
    latencies = []
    started = time.perf_counter()
    for i in range(ops):
        t = time.perf_counter()
        operation(i)
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return ops / elapsed, p99 * 1000


def hot_paths(store: IStore, backend: str, size: int, ops: int, rng: random.Random) -> list[Result]:
    scopes = max(1, size // NODES_PER_SCOPE)
    run = uuid.uuid4().hex[:8]
    paths: dict[str, Callable[[int], object]] = {
        "enroll": lambda i: store.create(
            "claim",
            f"i-{run}{i:09x}/agent",
            {"instance_id": f"i-{run}{i:09x}", "role": "agent", "certname": "x", "claimed_at": 1.0},
        ),
        "node": lambda i: _found(store.get("node", certname(rng.randrange(size)))),
        "classify": lambda i: _found(store.get("class", scope(rng.randrange(scopes)))),
    }
    results = []
    for path, operation in paths.items():
        rate, p99 = measure(operation, ops)
        results.append(Result(backend, size, path, ops, rate, p99))
    return results


@frozen
class BatchRound:
    backend: str
    keys: int
    one_by_one_ms: float
    get_many_ms: float


def batch_rounds(
    store: IStore, backend: str, size: int, *, keys: int, rounds: int, rng: random.Random
) -> list[BatchRound]:
    """``rounds`` alternated reads of ``keys`` random nodes, key by key and with ``get_many``."""
    if not IBatchGet.providedBy(store):
        raise RuntimeError(f"the {backend} store has no get_many")
    batch: IBatchGet = store

    def one_by_one(wanted: list[str]) -> dict[str, Item]:
        return {key: item for key in wanted if (item := store.get("node", key)) is not None}

    def many(wanted: list[str]) -> dict[str, Item]:
        return dict(batch.get_many("node", wanted))

    def timed(
        read: Callable[[list[str]], dict[str, Item]], wanted: list[str]
    ) -> tuple[float, dict[str, Item]]:
        started = time.perf_counter()
        found = read(wanted)
        return (time.perf_counter() - started) * 1000, found

    warm = [certname(n) for n in rng.sample(range(size), min(size, keys))]
    one_by_one(warm)
    many(warm)
    results = []
    for round_ in range(rounds):
        wanted = [certname(n) for n in rng.sample(range(size), min(size, keys))]
        if round_ % 2 == 0:
            one_ms, one = timed(one_by_one, wanted)
            many_ms, found = timed(many, wanted)
        else:
            many_ms, found = timed(many, wanted)
            one_ms, one = timed(one_by_one, wanted)
        if found != one or len(found) != len(wanted):
            raise RuntimeError("get_many and get disagree")
        results.append(BatchRound(backend, len(wanted), one_ms, many_ms))
    return results


def batch_report(rounds: Sequence[BatchRound]) -> list[str]:
    lines = [
        f"{'backend':<9} {'round':>5} {'keys':>5} {'get each ms':>12} {'get_many ms':>12} {'x faster':>9}"
    ]
    numbers: dict[str, int] = {}
    for r in rounds:
        number = numbers[r.backend] = numbers.get(r.backend, 0) + 1
        lines.append(
            f"{r.backend:<9} {number:>5} {r.keys:>5} {r.one_by_one_ms:>12.1f} {r.get_many_ms:>12.1f} "
            f"{r.one_by_one_ms / r.get_many_ms:>9.1f}"
        )
    for backend in sorted({r.backend for r in rounds}):
        ratios = sorted(r.one_by_one_ms / r.get_many_ms for r in rounds if r.backend == backend)
        lines.append(f"# {backend}: get_many x{ratios[len(ratios) // 2]:.1f} faster (median of "
                     f"{len(ratios)} rounds, range x{ratios[0]:.1f} to x{ratios[-1]:.1f})")
    return lines


class _Delayed(BaseHTTPRequestHandler):
    """Passes each call on to ``upstream`` after ``delay`` seconds (one round trip's latency)."""

    protocol_version = "HTTP/1.1"
    upstream = ""
    delay = 0.0

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in two writes: without this, Nagle's algorithm and the client's
        # delayed ACK would add 40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.delay)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        request = urllib.request.Request(self.upstream, data=body, headers=headers, method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 - moto on loopback
                status, reply, passed = answer.status, answer.read(), answer.headers
        except urllib.error.HTTPError as error:
            status, reply, passed = error.code, error.read(), error.headers
        self.send_response(status)
        for name in ("Content-Type", "x-amz-crc32"):
            if passed.get(name):
                self.send_header(name, passed[name])
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def delayed(upstream: str, delay: float) -> ThreadingHTTPServer:
    """A :class:`_Delayed` proxy to ``upstream``, serving on its own thread."""
    _Delayed.upstream = upstream
    _Delayed.delay = delay
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Delayed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _found(item: object) -> object:
    if item is None:
        raise RuntimeError("a populated item is missing")
    return item


Work = Callable[[IStore, str, int], Sequence[Any]]


def bench_sqlite(size: int, work: Work) -> tuple[Sequence[Any], float]:
    with tempfile.TemporaryDirectory(prefix="puppetha-bench-") as directory:
        from puppetha.store.sqlite import SQLiteStore

        store = SQLiteStore(str(Path(directory) / "store.sqlite"))
        started = time.perf_counter()
        populate_sqlite(store, size)
        populated = time.perf_counter() - started
        results = work(store, "sqlite", size)
        store.close()
    return results, populated


def bench_dynamodb(endpoint: str, size: int, work: Work) -> tuple[Sequence[Any], float]:
    table = f"bench-{size}-{uuid.uuid4().hex[:8]}"
    store = DynamoDBStore(table, REGION, endpoint)
    store.create_table(deletion_protection=False, point_in_time_recovery=False)
    import boto3

    session: Any = boto3.session.Session()
    client = session.client("dynamodb", region_name=REGION, endpoint_url=endpoint)
    started = time.perf_counter()
    populate_dynamodb(client, table, size)
    populated = time.perf_counter() - started
    results = work(store, "dynamodb", size)
    client.delete_table(TableName=table)
    store.close()
    return results, populated


def report(results: Sequence[Result]) -> list[str]:
    """Each figure beside the same backend and path at 1,000 nodes (or the run's smallest size)."""
    sizes = {r.size for r in results}
    baseline = BASELINE if BASELINE in sizes else min(sizes)
    base = {(r.backend, r.path): r for r in results if r.size == baseline}
    lines = [
        f"{'backend':<9} {'nodes':>8} {'path':<9} {'ops':>6} {'ops/s':>9} {'x base':>7} "
        f"{'p99 ms':>8} {'x base':>7}"
    ]
    for r in results:
        b = base[(r.backend, r.path)]
        lines.append(
            f"{r.backend:<9} {r.size:>8,} {r.path:<9} {r.ops:>6} {r.ops_per_second:>9.0f} "
            f"{r.ops_per_second / b.ops_per_second:>7.2f} {r.p99_ms:>8.2f} {r.p99_ms / b.p99_ms:>7.2f}"
        )
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="CI smoke run: small sizes, few ops")
    parser.add_argument("--sizes", default="1000,100000", help="comma-separated node counts")
    parser.add_argument("--backends", default="sqlite,dynamodb")
    parser.add_argument(
        "--ops", type=int, default=0, help="calls per path (default 2000 sqlite, 500 dynamodb)"
    )
    parser.add_argument("--endpoint-url", default="", help="an existing moto server (default: start one)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=0,
                        help="measure the ENC's read of this many nodes: get each against get_many")
    parser.add_argument("--rounds", type=int, default=7, help="alternated rounds of --batch")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="hold each DynamoDB call this long in a proxy in front of moto")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    options = parser.parse_args(argv)

    sizes = [1000, 3000] if options.quick else [int(s) for s in options.sizes.split(",")]
    backends = [b.strip() for b in options.backends.split(",") if b.strip()]
    rng = random.Random(options.seed)
    results: list[Result] = []
    rounds: list[BatchRound] = []
    moto = None
    if "dynamodb" in backends:
        # moto takes any credentials; these reach nothing else.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        endpoint = options.endpoint_url
        if not endpoint:
            from puppetha.testing.moto import MotoServer

            moto = MotoServer().start()
            endpoint = moto.endpoint_url
    proxy = None
    if "dynamodb" in backends and options.delay_ms > 0:
        proxy = delayed(endpoint, options.delay_ms / 1000)
        endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
    try:
        for backend in backends:
            ops = options.ops or (100 if options.quick else 2000 if backend == "sqlite" else 500)

            def work(store: IStore, backend: str, size: int, ops: int = ops) -> Sequence[Any]:
                if options.batch:
                    return batch_rounds(
                        store, backend, size, keys=options.batch, rounds=options.rounds, rng=rng
                    )
                return hot_paths(store, backend, size, ops, rng)

            for size in sizes:
                if backend == "sqlite":
                    found, populated = bench_sqlite(size, work)
                elif backend == "dynamodb":
                    found, populated = bench_dynamodb(endpoint, size, work)
                else:
                    parser.error(f"unknown backend {backend!r}")
                print(f"# {backend}: populated {size:,} nodes in {populated:.1f} s", flush=True)
                if options.batch:
                    rounds.extend(found)
                else:
                    results.extend(found)
    finally:
        if proxy is not None:
            proxy.shutdown()
            proxy.server_close()
        if moto is not None:
            moto.stop()
    print("\n".join(batch_report(rounds) if options.batch else report(results)))
    print(" ".join(["# rerun: .venv/bin/python bench/store.py", *(sys.argv[1:] if argv is None else argv)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
