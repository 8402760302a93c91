"""
The embedded store: one SQLite file in WAL mode, shared by every process on the box.

Several daemons and the admin CLI may open the same file at once: every write runs in a
``BEGIN IMMEDIATE`` transaction, so writers queue on SQLite's own file lock (waiting up to
``busy_timeout``) and a check followed by a write can never interleave with another writer.
Readers never wait for writers (WAL).

Threads: each thread gets its own connection (``threading.local``), so reads run in parallel
with a write.  The process's own writes queue up, and one writer at a time commits every
write queued by then in one transaction (group commit, each write in a savepoint of its own so
a refusal undoes it alone): SQLite's busy handler polls in growing sleeps, which under load
wastes more time than the commits take, and each commit is an fsync, so only one writer per
process ever waits on the file lock, for other processes, and concurrent writes share their
fsync.  Both waits together stay inside ``busy_timeout``: a write either starts within it or
fails with :class:`StoreUnavailable`, having changed nothing.

A connection that failed with anything but "busy" is dropped and the next call opens a new
one: SQLite opens a database it may not write (a read-only file, a full or failing disk) read-only
and would stay so after the fault is gone.  The connection of a thread that ends is closed when
the garbage collector frees it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, TypeVar, cast

from twisted.logger import Logger
from zope.interface import implementer

from puppetha.store import (
    AlreadyExists,
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

T = TypeVar("T")

#: SQLite's primary result codes for "another connection holds the lock".
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6

#: What ``PRAGMA user_version`` says once every migration below has run.
SCHEMA_VERSION = 2

#: Statements that take the schema from version ``n - 1`` to ``n``, by ``n``.
MIGRATIONS: Mapping[int, Sequence[str]] = {
    1: (
        # A rowid table (not WITHOUT ROWID): values can be hundreds of kilobytes (CRLs),
        # which WITHOUT ROWID tables store badly.  The primary key is the lookup index.
        """
        CREATE TABLE items (
            kind TEXT NOT NULL,
            key TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            value TEXT NOT NULL,
            PRIMARY KEY (kind, key)
        )
        """,
    ),
    # The change counters of IGenerations (COUNTED_KINDS as this step made them: a migration
    # never changes), kept by triggers so that every writer counts, whatever code path or
    # process it comes from, inside the transaction of its write.
    2: (
        "CREATE TABLE generations (kind TEXT PRIMARY KEY, n INTEGER NOT NULL)",
        "INSERT INTO generations (kind, n) VALUES ('ca', 0), ('crl', 0), ('master', 0)",
        """
        CREATE TRIGGER count_insert AFTER INSERT ON items WHEN NEW.kind IN ('ca', 'crl', 'master')
        BEGIN UPDATE generations SET n = n + 1 WHERE kind = NEW.kind; END
        """,
        """
        CREATE TRIGGER count_update AFTER UPDATE ON items WHEN NEW.kind IN ('ca', 'crl', 'master')
        BEGIN UPDATE generations SET n = n + 1 WHERE kind = NEW.kind; END
        """,
        """
        CREATE TRIGGER count_delete AFTER DELETE ON items WHEN OLD.kind IN ('ca', 'crl', 'master')
        BEGIN UPDATE generations SET n = n + 1 WHERE kind = OLD.kind; END
        """,
    ),
}

def _prefix_bound(prefix: str) -> str | None:
    """
    The smallest string greater than every string that starts with ``prefix``, or ``None``
    when there is none.  Keys are ordered by code point (= UTF-8 bytes, SQLite's BINARY
    collation), so ``prefix <= key < bound`` is exactly ``key.startswith(prefix)``; a range
    also treats ``%`` and ``_`` as the plain characters they are, unlike LIKE.
    """
    while prefix:
        last = ord(prefix[-1]) + 1
        if 0xD800 <= last <= 0xDFFF:
            last = 0xE000  # surrogates never occur in valid keys
        if last <= 0x10FFFF:
            return prefix[:-1] + chr(last)
        prefix = prefix[:-1]
    return None


#: Writes of this process committed together at most (one transaction, one fsync).
MAX_GROUP = 64


class _WriteRequest:
    """One write waiting for a group commit, and then what it returned or raised."""

    def __init__(self, work: Callable[[_Connection], Any]) -> None:
        self.work = work
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


def _forget_writers(store: SQLiteStore | None) -> None:
    if store is not None:
        store._writers = threading.Lock()
        store._queue = []
        store._queue_lock = threading.Lock()


class _Connection(sqlite3.Connection):
    """A connection that can be weakly referenced (the base class cannot)."""

    #: Whether the database and its WAL could be written when it was opened: SQLite opens a
    #: file it may not write read-only, and the connection stays so after the fault ends.
    opened_writable = True
    #: The busy timeout last set on it, in milliseconds.
    busy_ms = 0


def _ensure_private_file(path: str) -> None:
    """
    Create the database file owner-only, or take group and other access off an existing one.

    An existing file is changed by its path, never opened: closing any descriptor of a file
    drops every POSIX lock this process holds on it, those of SQLite's connections included
    (another store of the same file, in this process), and SQLite's locks are what keep
    another process from, say, taking a live database out of WAL mode.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise StoreUnavailable(f"cannot open store {path}: {e.strerror}") from None
    else:
        # A file this call made: nobody holds a lock on it yet.
        os.close(fd)
        return
    try:
        found = os.stat(path)
        if not stat.S_ISREG(found.st_mode):
            raise StoreUnavailable(f"cannot open store {path}: not a regular file")
        mode = stat.S_IMODE(found.st_mode)
        if mode & 0o077:
            # It holds sealed CA keys and node records: nobody but the owner reads it.
            os.chmod(path, mode & 0o700)
            log.warn(
                "store file {path} was mode {mode:o}; made it owner-only",
                path=path,
                mode=mode,
            )
    except OSError as e:
        raise StoreUnavailable(f"cannot open store {path}: {e.strerror}") from None


@implementer(IStore, IGenerations, IBatchGet)
class SQLiteStore:
    """
    :class:`IStore` over one SQLite file.  Blocking: call it from a thread pool.

    ``busy_timeout`` is how long, in seconds, a write waits for other writers (in this or
    another process) before giving up with :class:`StoreUnavailable`: the store's deadline
    (``[store] timeout``).
    """

    #: What :meth:`_connect` opens (tests count the statements through a subclass).
    connection_class: type[_Connection] = _Connection

    def __init__(self, path: str, busy_timeout: float = 10.0) -> None:
        if path == ":memory:" or not path:
            # Each thread's connection would get a database of its own.
            raise ValueError("SQLiteStore needs a file path")
        self.path = path
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._writers = threading.Lock()
        # Writes waiting for the next group commit (see _write), oldest first.
        self._queue: list[_WriteRequest] = []
        self._queue_lock = threading.Lock()
        #: Write transactions committed by this object (for tests and benchmarks).
        self.commits = 0
        # A child forked while a thread of the parent wrote must neither wait for the parent's
        # locks nor commit the parent's queued writes (it has none of its threads).
        forgetful = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_writers(forgetful()))
        self._closed = False
        _ensure_private_file(path)
        self._unavailable(self._open_schema)

    # -- connections and transactions

    def _connect(self) -> _Connection:
        try:
            connection = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                # Transactions are begun and ended explicitly below.
                isolation_level=None,
                # Only so close() may close every thread's connection; each is used by one thread.
                check_same_thread=False,
                factory=self.connection_class,
            )
        except sqlite3.Error as e:
            raise StoreUnavailable(f"cannot open store {self.path}: {e}") from e
        if not isinstance(connection, _Connection):  # pragma: no cover - sqlite3 honours factory
            raise TypeError("sqlite3 ignored the connection factory")
        connection.opened_writable = self._writable()
        try:
            connection.busy_ms = int(self.busy_timeout * 1000)
            connection.execute(f"PRAGMA busy_timeout = {connection.busy_ms}")
            # A commit acknowledged is a commit kept, even across a power cut: claims, serials
            # and CRL numbers must never be handed out twice.
            connection.execute("PRAGMA synchronous = FULL")
            connection.execute("PRAGMA trusted_schema = OFF")
        except sqlite3.Error:
            connection.close()
            raise
        return connection

    def _writable(self) -> bool:
        wal = self.path + "-wal"
        return os.access(self.path, os.W_OK) and (not os.path.exists(wal) or os.access(wal, os.W_OK))

    def _connection(self) -> _Connection:
        if self._closed:
            raise StoreUnavailable(f"store {self.path} is closed")
        pid = os.getpid()
        held: tuple[int, _Connection] | None = getattr(self._local, "held", None)
        # A connection inherited across fork() must not be used by the child.
        if held is not None and held[0] == pid:
            return held[1]
        connection = self._connect()
        with self._lock:
            if self._closed:
                connection.close()
                raise StoreUnavailable(f"store {self.path} is closed")
            self._connections.add(connection)
        self._local.held = (pid, connection)
        return connection

    @contextmanager
    def _writing(self) -> Iterator[_Connection]:
        """A write transaction holding SQLite's write lock from its first statement."""
        connection = self._connection()
        if not connection.opened_writable:
            # Opened during a fault that made the file read-only; open anew (still read-only
            # if the fault goes on, and the write fails as it should).
            self._drop()
            connection = self._connection()
        deadline = time.monotonic() + self.busy_timeout
        if not self._writers.acquire(timeout=self.busy_timeout):
            raise StoreUnavailable(
                f"store {self.path}: no write lock within {self.busy_timeout:g}s (this process's writers)"
            )
        try:
            self._wait_for_others(connection, deadline)
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back by itself (I/O errors, a full disk).
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        finally:
            self._writers.release()

    def _write(self, work: Callable[[_Connection], T]) -> T:
        """
        Runs ``work`` in a write transaction and returns what it returned once that transaction
        is committed, or raises what it raised with nothing of it written.

        Group commit: the writes of this process queue up, and whichever writer takes the
        process's write lock commits every write queued by then (at most :data:`MAX_GROUP`) in
        one transaction, each inside a savepoint of its own: a write that is refused (its
        ``work`` raises) is rolled back alone, the others stay.  One ``BEGIN IMMEDIATE`` and one
        fsync serve them all, where each write used to wait its turn for a commit of its own.
        A writer returns only after the commit that holds its write; if that commit fails, so
        does every write in it, and none is kept.
        """
        request = _WriteRequest(work)
        deadline = time.monotonic() + self.busy_timeout
        with self._queue_lock:
            self._queue.append(request)
        while not request.done.is_set():
            if self._writers.acquire(timeout=max(deadline - time.monotonic(), 0)):
                try:
                    if not request.done.is_set():
                        self._commit_queued(deadline)
                finally:
                    self._writers.release()
                continue
            with self._queue_lock:
                waiting = request in self._queue
                if waiting:
                    self._queue.remove(request)
            if waiting:
                raise StoreUnavailable(
                    f"store {self.path}: no write lock within {self.busy_timeout:g}s (this process's writers)"
                )
            # Another writer took it into the transaction it is committing now.
            request.done.wait()
        if request.error is not None:
            raise request.error
        return cast(T, request.result)

    def _commit_queued(self, deadline: float) -> None:
        """With this process's write lock held: commit the queued writes (see :meth:`_write`)."""
        with self._queue_lock:
            group = self._queue[:MAX_GROUP]
            del self._queue[:MAX_GROUP]
        try:
            connection = self._connection()
            if not connection.opened_writable:
                # Opened during a fault that made the file read-only; open anew (still read-only
                # if the fault goes on, and the write fails as it should).
                self._drop()
                connection = self._connection()
            self._wait_for_others(connection, deadline)
            connection.execute("BEGIN IMMEDIATE")
            try:
                if len(group) == 1:
                    self._commit_alone(connection, group[0])
                    return
                for request in group:
                    connection.execute("SAVEPOINT write")
                    try:
                        request.result = request.work(connection)
                    except Exception as e:
                        if not connection.in_transaction:
                            # SQLite rolled the whole transaction back (an I/O error, a full
                            # disk): every write of the group fails.
                            raise
                        # A refusal, or a statement SQLite refused alone: undo this write only.
                        connection.execute("ROLLBACK TO write")
                        request.error = e
                    connection.execute("RELEASE write")
                connection.execute("COMMIT")
                self.commits += 1
            except BaseException:
                # SQLite may already have rolled back by itself (I/O errors, a full disk).
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        except BaseException as e:
            for request in group:
                request.result = None
                request.error = e
            if isinstance(e, sqlite3.Error):
                self._drop_after(e)  # this thread's connection failed (its own write may wait)
        finally:
            for request in group:
                request.done.set()

    def _commit_alone(self, connection: _Connection, request: _WriteRequest) -> None:
        """A group of one write: its transaction, not a savepoint, undoes a refusal."""
        try:
            request.result = request.work(connection)
        except Exception as e:
            if not connection.in_transaction:
                raise  # SQLite rolled back by itself: a failure, not a refusal
            connection.execute("ROLLBACK")
            request.error = e
            return
        connection.execute("COMMIT")
        self.commits += 1

    @staticmethod
    def _wait_for_others(connection: _Connection, deadline: float) -> None:
        """
        Let ``BEGIN IMMEDIATE`` wait for other processes' writers whatever the wait for this
        process's writers left of the deadline: never longer, and at most 0.1 s shorter, so
        that the busy timeout is set again only when the wait took a tenth of a second more.
        """
        remaining = max(int((deadline - time.monotonic()) * 1000), 1)
        if remaining > 100:
            remaining -= remaining % 100
        if remaining != connection.busy_ms:
            connection.execute(f"PRAGMA busy_timeout = {remaining}")
            connection.busy_ms = remaining

    def _unavailable(self, f: Callable[[], T]) -> T:
        try:
            return f()
        except sqlite3.OperationalError as e:
            # "database is locked" after busy_timeout, I/O errors, a full disk, a read-only file.
            self._drop_after(e)
            raise StoreUnavailable(f"store {self.path}: {e}") from e
        except sqlite3.DatabaseError as e:
            self._drop_after(e)
            raise StoreError(f"store {self.path} is not a usable database: {e}") from e

    def _drop_after(self, error: sqlite3.Error) -> None:
        """Forget this thread's connection after any failure but "busy", so the next call reopens."""
        if getattr(error, "sqlite_errorcode", 0) & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED):
            return
        self._drop()

    def _drop(self) -> None:
        held: tuple[int, _Connection] | None = getattr(self._local, "held", None)
        self._local.held = None
        if held is None:
            return
        with self._lock:
            self._connections.discard(held[1])
        with suppress(sqlite3.Error):
            held[1].close()

    def _open_schema(self) -> None:
        connection = self._connection()
        # Persistent in the file; a no-op once set.  Changing it needs the file to itself,
        # which the busy timeout waits for when several processes open at once.
        mode = self._switch_to_wal(connection)
        if mode != "wal":
            raise StoreError(f"store {self.path} cannot use WAL (journal mode {mode})")
        with self._writing() as connection:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path} has schema {version}, newer than this puppetha ({SCHEMA_VERSION})"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    connection.execute(statement)
                # PRAGMA takes no parameters; step is an int from this module.
                connection.execute(f"PRAGMA user_version = {step}")
                log.info("store {path} schema now at version {step}", path=self.path, step=step)

    def _switch_to_wal(self, connection: _Connection) -> str:
        # SQLite answers "database is locked" at once, without its busy handler, when another
        # process is switching the same new file to WAL: wait for it here, up to busy_timeout.
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                return str(connection.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def schema_version(self) -> int:
        return self._unavailable(lambda: int(self._connection().execute("PRAGMA user_version").fetchone()[0]))

    def journal_mode(self) -> str:
        return self._unavailable(lambda: str(self._connection().execute("PRAGMA journal_mode").fetchone()[0]))

    # -- IStore

    def get(self, kind: str, key: str) -> Item | None:
        validate_kind(kind)
        validate_key(key)

        def read() -> Item | None:
            row = (
                self._connection()
                .execute("SELECT version, value FROM items WHERE kind = ? AND key = ?", (kind, key))
                .fetchone()
            )
            if row is None:
                return None
            return Item(kind, key, decode_value(row[1]), row[0])

        return self._unavailable(read)

    def create(self, kind: str, key: str, value: Value) -> Item:
        validate_kind(kind)
        validate_key(key)
        text = encode_value(value)

        def write(connection: _Connection) -> None:
            cursor = connection.execute(
                "INSERT INTO items (kind, key, version, value) VALUES (?, ?, 1, ?)"
                " ON CONFLICT (kind, key) DO NOTHING",
                (kind, key, text),
            )
            if cursor.rowcount != 1:
                raise AlreadyExists(kind, key)

        self._unavailable(lambda: self._write(write))
        return Item(kind, key, decode_value(text), 1)

    def replace(self, kind: str, key: str, value: Value, expected_version: int) -> Item:
        validate_kind(kind)
        validate_key(key)
        validate_version(expected_version)
        text = encode_value(value)
        if not version_can_exist(expected_version):
            raise VersionConflict(kind, key, expected_version)

        def write(connection: _Connection) -> None:
            cursor = connection.execute(
                "UPDATE items SET value = ?, version = version + 1"
                " WHERE kind = ? AND key = ? AND version = ?",
                (text, kind, key, expected_version),
            )
            if cursor.rowcount != 1:
                raise VersionConflict(kind, key, expected_version)

        self._unavailable(lambda: self._write(write))
        return Item(kind, key, decode_value(text), expected_version + 1)

    def delete(self, kind: str, key: str, expected_version: int | None = None) -> bool:
        validate_kind(kind)
        validate_key(key)
        if expected_version is not None:
            validate_version(expected_version)
            if not version_can_exist(expected_version):
                raise VersionConflict(kind, key, expected_version)

        def write(connection: _Connection) -> bool:
            if expected_version is None:
                cursor = connection.execute("DELETE FROM items WHERE kind = ? AND key = ?", (kind, key))
                return cursor.rowcount == 1
            cursor = connection.execute(
                "DELETE FROM items WHERE kind = ? AND key = ? AND version = ?",
                (kind, key, expected_version),
            )
            if cursor.rowcount != 1:
                raise VersionConflict(kind, key, expected_version)
            return True

        return self._unavailable(lambda: self._write(write))

    def get_many(self, kind: str, keys: Sequence[str]) -> dict[str, Item]:
        validate_kind(kind)
        # The keys go in as one JSON array parameter: one statement, whatever their number.
        wanted = json.dumps([validate_key(key) for key in keys])

        def read() -> dict[str, Item]:
            rows = self._connection().execute(
                "SELECT key, version, value FROM items"
                " WHERE kind = ? AND key IN (SELECT value FROM json_each(?))",
                (kind, wanted),
            )
            return {key: Item(kind, key, decode_value(value), version) for key, version, value in rows}

        return self._unavailable(read)

    def list(self, kind: str, prefix: str = "") -> list[Item]:
        validate_kind(kind)
        validate_prefix(prefix)
        bound = _prefix_bound(prefix)

        def read() -> list[Item]:
            connection = self._connection()
            if bound is None:
                rows = connection.execute(
                    "SELECT key, version, value FROM items WHERE kind = ? AND key >= ? ORDER BY key",
                    (kind, prefix),
                )
            else:
                rows = connection.execute(
                    "SELECT key, version, value FROM items"
                    " WHERE kind = ? AND key >= ? AND key < ? ORDER BY key",
                    (kind, prefix, bound),
                )
            return [Item(kind, key, decode_value(value), version) for key, version, value in rows]

        return self._unavailable(read)

    def generations(self) -> dict[str, int]:
        return self._unavailable(
            lambda: dict(self._connection().execute("SELECT kind, n FROM generations").fetchall())
        )

    def transact(self, writes: Sequence[Write]) -> None:
        writes = list(writes)
        texts = validate_writes(writes)
        if not writes:
            return

        def apply(connection: _Connection) -> None:
            # Each write checks its own condition as it is made (one statement, not a read and a
            # write); at the first refused, the reasons of it and of the writes after it are read
            # (those before it were not refused, and no two touch one item), and raising undoes
            # whatever was applied.
            for i, write in enumerate(writes):
                if not self._applied(connection, write, texts.get(i, "")):
                    reasons = [
                        reason
                        for reason in (self._refusal(connection, later) for later in writes[i:])
                        if reason is not None
                    ]
                    raise TransactionConflict(reasons)

        self._unavailable(lambda: self._write(apply))

    def _refusal(self, connection: sqlite3.Connection, write: Write) -> StoreError | None:
        """Why ``write`` cannot be applied now, or ``None`` if it can."""
        row = connection.execute(
            "SELECT version FROM items WHERE kind = ? AND key = ?", (write.kind, write.key)
        ).fetchone()
        version: int | None = None if row is None else row[0]
        if isinstance(write, Create):
            return None if version is None else AlreadyExists(write.kind, write.key)
        expected = write.expected_version
        if expected is None or version == expected:
            return None
        return VersionConflict(write.kind, write.key, expected)

    def _applied(self, connection: sqlite3.Connection, write: Write, text: str) -> bool:
        """Make ``write`` if its condition holds; whether it did (a refused write changes nothing)."""
        expected = getattr(write, "expected_version", None)
        if expected is not None and not version_can_exist(expected):
            return False  # never bound: SQLite's integers end below some Python ones
        if isinstance(write, Create):
            cursor = connection.execute(
                "INSERT INTO items (kind, key, version, value) VALUES (?, ?, 1, ?)"
                " ON CONFLICT (kind, key) DO NOTHING",
                (write.kind, write.key, text),
            )
        elif isinstance(write, Replace):
            cursor = connection.execute(
                "UPDATE items SET value = ?, version = version + 1"
                " WHERE kind = ? AND key = ? AND version = ?",
                (text, write.kind, write.key, write.expected_version),
            )
        elif isinstance(write, Delete):
            if write.expected_version is None:
                connection.execute("DELETE FROM items WHERE kind = ? AND key = ?", (write.kind, write.key))
                return True
            cursor = connection.execute(
                "DELETE FROM items WHERE kind = ? AND key = ? AND version = ?",
                (write.kind, write.key, write.expected_version),
            )
        else:
            return self._refusal(connection, write) is None
        return cursor.rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self._connections)
            self._connections = weakref.WeakSet()
        for connection in connections:
            connection.close()
