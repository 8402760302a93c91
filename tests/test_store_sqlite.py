"""SQLiteStore: the store contract, plus what only the SQLite file has."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from puppetha.store import (
    AlreadyExists,
    Create,
    Delete,
    Item,
    Replace,
    StoreError,
    StoreUnavailable,
    TransactionConflict,
    VersionConflict,
    Write,
)
from puppetha.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteStore
from tests.store_contract import BARRIER_TIMEOUT, StoreContract, StoreFactory, increment


class TestSQLiteStoreContract(StoreContract):
    @pytest.fixture
    def make_store(self, tmp_path: Path) -> StoreFactory:
        path = str(tmp_path / "store.sqlite")
        return lambda: SQLiteStore(path)


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "store.sqlite")


@pytest.fixture
def store(path: str) -> Iterator[SQLiteStore]:
    store = SQLiteStore(path)
    yield store
    store.close()


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- the file


def test_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    path = str(tmp_path / "store.sqlite")
    old = os.umask(0)
    try:
        store = SQLiteStore(path)
        store.create("ca", "root", {"sealed_key": "..."})
        # The WAL files are open while a connection is.
        for name in (path, path + "-wal", path + "-shm"):
            assert mode(name) == 0o600, name
        store.close()
    finally:
        os.umask(old)


def test_open_file_is_made_private(path: str) -> None:
    SQLiteStore(path).create("node", "n1", {"kept": True})
    os.chmod(path, 0o644)
    store = SQLiteStore(path)
    assert mode(path) == 0o600
    assert store.get("node", "n1") == Item("node", "n1", {"kept": True}, 1)
    store.close()


# Tries to take the database out of WAL mode, which needs every other connection gone.
SWITCH_OUT_OF_WAL = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], timeout=0.2, isolation_level=None)
try:
    print(connection.execute("PRAGMA journal_mode = DELETE").fetchone()[0])
except sqlite3.OperationalError as e:
    print(e)
connection.close()
"""


def test_a_second_store_of_the_file_keeps_the_first_ones_locks(path: str) -> None:
    first = SQLiteStore(path)
    first.create("node", "n1", {"v": 1})
    second = SQLiteStore(path)  # the same file, in the same process
    second.create("node", "n2", {"v": 2})
    other = subprocess.run([sys.executable, "-c", SWITCH_OUT_OF_WAL, path],
                           capture_output=True, text=True, check=True)
    # Another process still sees the file in use: it may neither switch it out of WAL mode nor,
    # closing as if it were the last connection, remove the WAL from under the open stores.
    assert other.stdout.strip() == "database is locked"
    assert os.path.exists(path + "-wal")
    assert os.path.exists(path + "-shm")
    assert first.replace("node", "n2", {"v": 3}, 1).version == 2
    assert second.get("node", "n2") == Item("node", "n2", {"v": 3}, 2)
    assert first.journal_mode() == second.journal_mode() == "wal"
    first.close()
    second.close()


def test_wal_mode(path: str, store: SQLiteStore) -> None:
    assert store.journal_mode() == "wal"
    with sqlite3.connect(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_schema_version(path: str, store: SQLiteStore) -> None:
    assert store.schema_version() == SCHEMA_VERSION == 2
    with sqlite3.connect(path) as other:
        assert other.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        tables = other.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        assert [r[0] for r in tables] == ["generations", "items"]


def test_a_store_of_schema_1_is_migrated_and_counts(path: str) -> None:
    # A file made by the previous release: items only, no counters.
    with sqlite3.connect(path) as old:
        for statement in MIGRATIONS[1]:
            old.execute(statement)
        old.execute("PRAGMA user_version = 1")
        old.execute("INSERT INTO items (kind, key, version, value) VALUES ('master', 'm1', 1, '{}')")
    os.chmod(path, 0o600)
    store = SQLiteStore(path)
    assert store.schema_version() == 2
    assert store.generations() == {"ca": 0, "crl": 0, "master": 0}
    assert store.get("master", "m1") == Item("master", "m1", {}, 1)
    store.delete("master", "m1")
    assert store.generations()["master"] == 1
    store.close()


def test_a_write_by_another_process_moves_the_counter(path: str, store: SQLiteStore) -> None:
    before = store.generations()
    subprocess.run(
        [sys.executable, "-c",
         "import sys; from puppetha.store.sqlite import SQLiteStore;"
         " SQLiteStore(sys.argv[1]).create('master', 'm1', {'healthy': True})", path],
        check=True,
    )  # fmt: skip
    assert store.generations() == {**before, "master": before["master"] + 1}


def test_reopening_keeps_data(path: str) -> None:
    store = SQLiteStore(path)
    store.create("node", "n1", {"v": 1})
    store.replace("node", "n1", {"v": 2}, 1)
    store.close()
    again = SQLiteStore(path)
    assert again.get("node", "n1") == Item("node", "n1", {"v": 2}, 2)
    assert again.schema_version() == SCHEMA_VERSION
    again.close()


def test_newer_schema_is_refused(path: str) -> None:
    SQLiteStore(path).create("node", "n1", {})
    other = sqlite3.connect(path)
    other.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    other.close()
    with pytest.raises(StoreError, match="newer"):
        SQLiteStore(path)


def test_not_a_database_is_refused_and_left_alone(path: str) -> None:
    junk = b"this is not SQLite, it is somebody's file\n" * 100
    Path(path).write_bytes(junk)
    os.chmod(path, 0o600)
    with pytest.raises(StoreError):
        SQLiteStore(path)
    assert Path(path).read_bytes() == junk


@pytest.mark.parametrize(
    "stored",
    ['["not", "an", "object"]', "{not json", '{"nan": NaN}', '{"inf": -Infinity}'],
    ids=["list", "broken", "nan", "infinity"],
)
def test_stored_value_that_is_not_a_json_object_is_a_store_error(
    path: str, store: SQLiteStore, stored: str
) -> None:
    # Corrupt storage is the store's fault: a StoreError, never the ValueError of bad input.
    with sqlite3.connect(path) as other:
        other.execute("INSERT INTO items (kind, key, version, value) VALUES ('node', 'n1', 1, ?)", (stored,))
    with pytest.raises(StoreError, match="stored value") as refused:
        store.get("node", "n1")
    assert not isinstance(refused.value, ValueError)
    with pytest.raises(StoreError, match="stored value"):
        store.list("node")


def test_values_are_stored_as_canonical_utf8_json(path: str, store: SQLiteStore) -> None:
    store.create("node", "n1", {"b": "é日😀", "a": [1, 2.5, None, True]})
    with sqlite3.connect(path) as other:
        (text,) = other.execute("SELECT value FROM items WHERE kind = 'node' AND key = 'n1'").fetchone()
    assert text == '{"a":[1,2.5,null,true],"b":"é日😀"}'


@pytest.mark.parametrize("where", ["missing/store.sqlite", "."], ids=["no directory", "a directory"])
def test_unopenable_path_is_a_store_error(tmp_path: Path, where: str) -> None:
    with pytest.raises(StoreUnavailable, match="cannot open store"):
        SQLiteStore(str(tmp_path / where))
    assert not (tmp_path / "missing").exists()


def test_memory_is_refused() -> None:
    with pytest.raises(ValueError, match="file path"):
        SQLiteStore(":memory:")


def test_lookups_use_the_primary_key(path: str, store: SQLiteStore) -> None:
    with sqlite3.connect(path) as other:
        for query, args in [
            ("SELECT version, value FROM items WHERE kind = ? AND key = ?", ("node", "n1")),
            (
                "SELECT key, version, value FROM items WHERE kind = ? AND key >= ? AND key < ? ORDER BY key",
                ("node", "a", "b"),
            ),
            (
                "SELECT key, version, value FROM items"
                " WHERE kind = ? AND key IN (SELECT value FROM json_each(?))",
                ("node", '["n1", "n2"]'),
            ),
        ]:
            plan = " ".join(str(row[-1]) for row in other.execute("EXPLAIN QUERY PLAN " + query, args))
            assert "USING INDEX sqlite_autoindex_items_1 (kind=? AND key" in plan, plan
            assert "TEMP B-TREE" not in plan, plan


def test_get_many_reads_what_get_reads(store: SQLiteStore) -> None:
    keys = [f"n{i:04d}" for i in range(1200)]
    for start in range(0, len(keys), 100):
        store.transact([Create("node", key, {"i": key}) for key in keys[start : start + 100]])
    store.replace("node", "n0007", {"i": "again"}, 1)
    store.create("class", "n0001", {"other": "kind"})
    wanted = [*keys[::2], "absent", "n0007", "quote'\"] ["]
    found = store.get_many("node", wanted)
    assert found == {key: store.get("node", key) for key in wanted if store.get("node", key)}
    assert len(found) == 601
    assert found["n0007"].version == 2
    assert store.get_many("node", []) == {}
    with pytest.raises(ValueError, match="key"):
        store.get_many("node", ["n1", ""])


# -- connections


def test_closed_store_is_unavailable(store: SQLiteStore) -> None:
    store.create("node", "n1", {})
    store.close()
    with pytest.raises(StoreUnavailable):
        store.get("node", "n1")
    errors: list[Exception] = []

    def elsewhere() -> None:
        try:
            store.create("node", "n2", {})
        except StoreUnavailable as e:
            errors.append(e)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert len(errors) == 1


def test_writer_waits_then_gives_up_while_readers_carry_on(path: str) -> None:
    store = SQLiteStore(path, busy_timeout=0.05)
    store.create("node", "n1", {"v": 1})
    # Another process's writer, holding the write lock.
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE items SET value = '{}' WHERE key = 'n1'")
    with pytest.raises(StoreUnavailable, match="locked"):
        store.replace("node", "n1", {"v": 2}, 1)
    with pytest.raises(StoreUnavailable):
        store.transact([Create("node", "n2", {})])
    # WAL: readers see the last commit while a write is under way.
    assert store.get("node", "n1") == Item("node", "n1", {"v": 1}, 1)
    holder.execute("ROLLBACK")
    holder.close()
    assert store.replace("node", "n1", {"v": 2}, 1).version == 2
    assert store.get("node", "n2") is None
    store.close()


def test_writer_waiting_for_another_process_goes_on_once_it_commits(path: str, store: SQLiteStore) -> None:
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO items (kind, key, version, value) VALUES ('node', 'first', 1, '{}')")
    holding = threading.Event()
    outcome: list[object] = []

    def write() -> None:
        holding.set()
        outcome.append(store.create("node", "second", {}))

    writer = threading.Thread(target=write)
    writer.start()
    holding.wait(BARRIER_TIMEOUT)
    time.sleep(0.05)  # the writer has tried BEGIN IMMEDIATE by now, and waits
    holder.execute("COMMIT")
    holder.close()
    writer.join(BARRIER_TIMEOUT)
    assert outcome == [Item("node", "second", {}, 1)]
    assert [i.key for i in store.list("node")] == ["first", "second"]


@contextmanager
def immutable(*paths: str) -> Iterator[None]:
    """The files made immutable (``chattr +i``): even root cannot write them.  Needs root."""
    subprocess.run(["chattr", "+i", *paths], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *paths], check=True)


def test_connections_opened_during_a_read_only_fault_are_replaced_after_it(path: str,
                                                                          store: SQLiteStore) -> None:
    store.create("node", "n0", {})  # this thread's connection, opened before the fault
    with ThreadPoolExecutor(1) as other:  # one more thread, whose connection opens during it
        with immutable(path, path + "-wal"):
            for on in (store.create, lambda *a: other.submit(store.create, *a).result()):
                with pytest.raises(StoreUnavailable):
                    on("node", "n1", {})
            assert store.get("node", "n0") is not None  # reads carry on
        # SQLite opened the other thread's connection read-only: it must not stay so.
        assert other.submit(store.create, "node", "n1", {}).result().version == 1
    assert store.create("node", "n2", {}).version == 1
    assert [i.key for i in store.list("node")] == ["n0", "n1", "n2"]


def test_failed_write_leaves_no_transaction_open(store: SQLiteStore) -> None:
    store.create("node", "n1", {})
    with pytest.raises(AlreadyExists):
        store.create("node", "n1", {})
    with pytest.raises(VersionConflict):
        store.replace("node", "n1", {}, 7)
    # Were a transaction left open on this thread's connection, BEGIN would fail here.
    store.create("node", "n2", {})
    assert [i.key for i in store.list("node")] == ["n1", "n2"]


# -- several processes on one file

PROCESSES = 4
WON = 10
LOST = 11


def _race_create(path: str, start: Barrier, i: int) -> int:
    # Open after the barrier: the processes also race to create the file's schema.
    start.wait(BARRIER_TIMEOUT)
    store = SQLiteStore(path)
    try:
        store.create("claim", "i-0abc/master", {"by": i})
    except AlreadyExists:
        return LOST
    finally:
        store.close()
    return WON


def _count(path: str, start: Barrier, times: int) -> int:
    store = SQLiteStore(path)
    start.wait(BARRIER_TIMEOUT)
    for _ in range(times):
        increment(store, "counter", "serial")
    store.close()
    return WON


def _exit_with(f: Callable[..., int], *args: object) -> None:
    # The exit code carries each racer's outcome back; a crash exits 1, which is neither.
    sys.exit(f(*args))


def _run_processes(target: Callable[..., int], args: list[tuple[object, ...]]) -> list[int | None]:
    spawn = multiprocessing.get_context("spawn")
    processes = [spawn.Process(target=_exit_with, args=(target, *a)) for a in args]
    for p in processes:
        p.start()
    for p in processes:
        p.join(BARRIER_TIMEOUT * 2)
    return [p.exitcode for p in processes]


def test_race_create_across_processes(path: str) -> None:
    start = multiprocessing.get_context("spawn").Barrier(PROCESSES)
    codes = _run_processes(_race_create, [(path, start, i) for i in range(PROCESSES)])
    assert sorted(codes) == [WON] + [LOST] * (PROCESSES - 1)  # type: ignore[type-var]
    store = SQLiteStore(path)
    item = store.get("claim", "i-0abc/master")
    assert item is not None
    assert item.version == 1
    assert codes[item.value["by"]] == WON
    store.close()


def test_counter_across_processes(path: str) -> None:
    times = 25
    store = SQLiteStore(path)
    store.create("counter", "serial", {"n": 0})
    start = multiprocessing.get_context("spawn").Barrier(PROCESSES)
    codes = _run_processes(_count, [(path, start, times) for _ in range(PROCESSES)])
    assert codes == [WON] * PROCESSES
    assert store.get("counter", "serial") == Item(
        "counter", "serial", {"n": PROCESSES * times}, 1 + PROCESSES * times
    )
    store.close()


# -- group commit ----------------------------------------------------------------------------


def writes_in_one_group(store: SQLiteStore, writes: dict[str, Callable[[], object]]) -> dict[str, object]:
    """
    Starts each of ``writes`` in a thread of its own while the test holds the process's write
    lock, releases it once all are queued, and returns what each returned or raised.
    """
    outcomes: dict[str, object] = {}

    def run(name: str, write: Callable[[], object]) -> None:
        try:
            outcomes[name] = write()
        except Exception as e:
            outcomes[name] = e

    assert store._writers.acquire(timeout=BARRIER_TIMEOUT)
    threads = [threading.Thread(target=run, args=item) for item in writes.items()]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + BARRIER_TIMEOUT
        while len(store._queue) < len(writes):
            assert time.monotonic() < deadline, "the writes never queued"
            time.sleep(0.001)
    finally:
        store._writers.release()
    for thread in threads:
        thread.join(BARRIER_TIMEOUT)
    return outcomes


def test_queued_writes_share_one_commit_and_a_refusal_undoes_only_its_own(store: SQLiteStore) -> None:
    store.create("node", "taken", {"first": True})
    store.create("node", "counter", {"n": 1})
    commits = store.commits
    outcomes = writes_in_one_group(store, {
        "create": lambda: store.create("node", "new", {}),
        "taken": lambda: store.create("node", "taken", {"second": True}),
        "stale": lambda: store.replace("node", "counter", {"n": 7}, 5),
        "replace": lambda: store.replace("node", "counter", {"n": 2}, 1),
        "transaction": lambda: store.transact([Create("node", "t1", {}), Create("node", "taken", {})]),
        "delete": lambda: store.delete("node", "taken-not"),
    })  # fmt: skip
    assert store.commits == commits + 1
    assert outcomes["create"] == Item("node", "new", {}, 1)
    assert isinstance(outcomes["taken"], AlreadyExists)
    assert isinstance(outcomes["stale"], VersionConflict)
    assert outcomes["replace"] == Item("node", "counter", {"n": 2}, 2)
    assert isinstance(outcomes["transaction"], TransactionConflict)
    assert outcomes["delete"] is False
    # What was refused left nothing; what was not is there, committed.
    assert store.get("node", "taken") == Item("node", "taken", {"first": True}, 1)
    assert store.get("node", "t1") is None
    assert store.get("node", "counter") == Item("node", "counter", {"n": 2}, 2)
    with sqlite3.connect(store.path) as other:
        assert other.execute("SELECT key FROM items WHERE kind = 'node' ORDER BY key").fetchall() == [
            ("counter",), ("new",), ("taken",)
        ]


def test_a_statement_the_database_refuses_fails_its_write_alone(path: str, store: SQLiteStore) -> None:
    with sqlite3.connect(path) as other:
        other.execute("CREATE TRIGGER refuse BEFORE INSERT ON items WHEN NEW.key = 'refused'"
                      " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    outcomes = writes_in_one_group(store, {
        "before": lambda: store.create("node", "before", {}),
        "refused": lambda: store.create("node", "refused", {}),
        "after": lambda: store.create("node", "after", {}),
    })  # fmt: skip
    assert isinstance(outcomes["refused"], StoreError)
    assert outcomes["before"] == Item("node", "before", {}, 1)
    assert outcomes["after"] == Item("node", "after", {}, 1)
    assert [i.key for i in store.list("node")] == ["after", "before"]


def test_a_write_still_queued_at_its_deadline_is_refused_and_never_written(path: str) -> None:
    store = SQLiteStore(path, busy_timeout=0.2)
    assert store._writers.acquire()
    try:
        with pytest.raises(StoreUnavailable, match="this process's writers"):
            store.create("node", "late", {})
        assert store._queue == []
    finally:
        store._writers.release()
    store.create("node", "next", {})
    assert store.get("node", "late") is None
    store.close()


def test_a_child_forked_during_a_write_neither_waits_for_nor_commits_the_parents(store: SQLiteStore) -> None:
    outcome: list[object] = []
    assert store._writers.acquire(timeout=BARRIER_TIMEOUT)
    try:
        writer = threading.Thread(target=lambda: outcome.append(store.create("node", "parent", {})))
        writer.start()
        deadline = time.monotonic() + BARRIER_TIMEOUT
        while not store._queue:
            assert time.monotonic() < deadline, "the parent's write never queued"
            time.sleep(0.001)
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports by its exit code
            code = 4  # its own write failed
            try:
                store.create("node", "child", {})
                code = 0 if store.get("node", "parent") is None else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        store._writers.release()
    writer.join(BARRIER_TIMEOUT)
    # The parent's write was the parent's alone: committed once, by the parent.
    assert outcome == [Item("node", "parent", {}, 1)]
    assert [i.key for i in store.list("node")] == ["child", "parent"]


# -- statements a write costs ----------------------------------------------------------------


def test_a_transaction_names_every_refused_write_and_keeps_none(store: SQLiteStore) -> None:
    store.create("node", "taken", {})
    store.create("node", "counter", {"n": 1})
    writes: list[Write] = [
        Create("node", "fresh", {}),  # made before the first refusal, and undone
        Replace("node", "counter", {"n": 9}, 7),
        Delete("node", "counter-not", expected_version=1),
        Create("node", "taken", {"again": True}),
    ]
    with pytest.raises(TransactionConflict) as caught:
        store.transact(writes)
    assert [(type(r), r.key) for r in caught.value.reasons] == [  # type: ignore[attr-defined]
        (VersionConflict, "counter"), (VersionConflict, "counter-not"), (AlreadyExists, "taken"),
    ]
    assert store.get("node", "fresh") is None
    assert store.get("node", "counter") == Item("node", "counter", {"n": 1}, 1)
    assert store.get("node", "taken") == Item("node", "taken", {}, 1)


@pytest.mark.parametrize(
    ("left", "set_to"),
    [
        (10.0, 9900),  # a write that did not wait: a tenth of a second under, once
        (9.95, 9900),
        (9.85, 9800),  # waited a tenth of a second for this process's writers
        (0.15, 100),
    ],
)
def test_the_busy_timeout_is_what_the_deadline_leaves_and_set_only_when_it_changes(
    store: SQLiteStore, left: float, set_to: int
) -> None:
    connection = store._connection()
    settings: list[str] = []
    connection.set_trace_callback(lambda s: settings.append(s) if s.startswith("PRAGMA") else None)
    try:
        store._wait_for_others(connection, time.monotonic() + left)
        store._wait_for_others(connection, time.monotonic() + left)
    finally:
        connection.set_trace_callback(None)
    assert connection.busy_ms == set_to
    assert connection.execute("PRAGMA busy_timeout").fetchone()[0] == set_to
    assert len(settings) <= 1  # the second call left it as it was


def test_under_a_tenth_of_a_second_left_the_busy_timeout_is_what_is_left(store: SQLiteStore) -> None:
    connection = store._connection()
    store._wait_for_others(connection, time.monotonic() + 0.08)
    assert 1 <= connection.busy_ms <= 80
    store._wait_for_others(connection, time.monotonic() - 1)  # past the deadline: the least
    assert connection.busy_ms == 1
    assert connection.execute("PRAGMA busy_timeout").fetchone()[0] == 1
