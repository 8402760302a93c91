"""
The store: everything the daemon keeps, behind one small synchronous interface.

The interface is a versioned key/value space split into *kinds* (``node``, ``ca``, ...).
Every item carries a version that starts at 1 and grows by one on every write, which makes
create-if-absent and compare-and-set the first-class operations that every invariant of
puppetha is built on (one enrollment per instance and role, CRL numbers, leases).

Implementations are blocking; the reactor reaches them only through
:class:`puppetha.threads.Blocking` (a bounded thread pool).  The typed records that live on top of the
items are in :mod:`puppetha.store.records`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from attrs import frozen
from zope.interface import Interface

#: JSON-compatible mapping: what an item holds.
Value = Mapping[str, Any]


@frozen
class Item:
    kind: str
    key: str
    value: Value
    version: int


class StoreError(Exception):
    """Base class of the store's refusals."""


class AlreadyExists(StoreError):
    """A create found the key already present."""

    def __init__(self, kind: str, key: str) -> None:
        super().__init__(f"{kind} {key!r} already exists")
        self.kind = kind
        self.key = key


class VersionConflict(StoreError):
    """A compare-and-set or conditional delete found another version (or no item)."""

    def __init__(self, kind: str, key: str, expected: int | None) -> None:
        super().__init__(f"{kind} {key!r} is not at version {expected}")
        self.kind = kind
        self.key = key
        self.expected = expected


class TransactionConflict(StoreError):
    """A transaction was refused as a whole; ``reasons`` says which write failed."""

    def __init__(self, reasons: Sequence[StoreError]) -> None:
        super().__init__("; ".join(str(r) for r in reasons) or "transaction refused")
        self.reasons = tuple(reasons)


class StoreUnavailable(StoreError):
    """The backend could not be reached (after its own retries)."""


@frozen
class Create:
    """Write ``value`` at version 1; fails if the key exists."""

    kind: str
    key: str
    value: Value


@frozen
class Replace:
    """Write ``value`` at ``expected_version + 1``; fails unless the item is at ``expected_version``."""

    kind: str
    key: str
    value: Value
    expected_version: int


@frozen
class Delete:
    """Remove the item; with ``expected_version`` only if it is at that version."""

    kind: str
    key: str
    expected_version: int | None = None


@frozen
class Check:
    """Write nothing, but fail the transaction unless the item is at ``expected_version``."""

    kind: str
    key: str
    expected_version: int


Write = Create | Replace | Delete | Check

#: Largest transaction every backend accepts (DynamoDB's own limit).
MAX_TRANSACTION_WRITES = 100


class IStore(Interface):
    """
    A versioned key/value store.  Keys are non-empty strings of at most 1024 UTF-8 bytes;
    kinds are short lowercase words.  Values are JSON-compatible mappings.
    """

    def get(kind: str, key: str) -> Item | None:
        """The item, or ``None``."""

    def create(kind: str, key: str, value: Value) -> Item:
        """Create at version 1.  Raises :class:`AlreadyExists`."""

    def replace(kind: str, key: str, value: Value, expected_version: int) -> Item:
        """Compare-and-set.  Raises :class:`VersionConflict` (also when the item is absent)."""

    def delete(kind: str, key: str, expected_version: int | None = None) -> bool:
        """
        Remove the item; returns whether it existed.  With ``expected_version`` raises
        :class:`VersionConflict` unless the item is at that version.
        """

    def list(kind: str, prefix: str = "") -> list[Item]:
        """Every item of ``kind`` whose key starts with ``prefix``, ordered by key."""

    def transact(writes: Sequence[Write]) -> None:
        """
        Apply all writes or none (at most :data:`MAX_TRANSACTION_WRITES`, one per key).
        Raises :class:`TransactionConflict`.
        """

    def close() -> None:
        """Release connections; the store is unusable afterwards."""


class IBatchGet(Interface):
    """A store that reads many items of one kind in one round trip (the ENC's refresh)."""

    def get_many(kind: str, keys: Sequence[str]) -> Mapping[str, Item]:
        """
        The items of ``kind`` at ``keys``, as :meth:`IStore.get` reads them; absent ones left
        out, a key given twice read once.  Every key is read or the call raises (a store that
        cannot read some of them raises :class:`StoreUnavailable`, never answers without them).
        """


#: The kinds whose every change the store counts (:class:`IGenerations`): few records, read by
#: every enrollment, written rarely (a new CA, a CRL signed, a master registered or gone).
COUNTED_KINDS = ("ca", "crl", "master")


class IGenerations(Interface):
    """
    A store that counts the changes of :data:`COUNTED_KINDS`: each committed write (create,
    replace, delete; in a transaction or alone) of an item of such a kind makes that kind's
    generation grow, whichever process or daemon made it, and a refused write changes nothing.
    A reader holding the records of a kind at a generation knows they are still current while
    the generation is the same, and asks for one small read instead of every record.
    """

    def generations() -> Mapping[str, int]:
        """The generation of each of :data:`COUNTED_KINDS`, read now (one round trip)."""
