"""
Copying everything puppetha keeps from one store to another (SQLite to DynamoDB when a one-box
setup grows into a fleet of daemons).

Values are copied; versions are not: every copied item starts again at version 1 in the
target, since ``create`` is the only way in and versions only mean something within one store.
Nothing that matters depends on a version number surviving (CRL numbers and lease fencing
tokens live in the values).  Run it with the daemons stopped.

A re-run is safe: items already in the target with the same value are skipped, and if any
target item differs from its source, nothing is written and :class:`MigrationConflict` lists
them.  After copying, the target is read back and compared with the source, so a record lost on
the way is an error, not a surprise.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

from attrs import frozen
from twisted.logger import Logger

from puppetha.store import MAX_TRANSACTION_WRITES, Create, IStore, Item, StoreError

log = Logger()

#: Every kind puppetha keeps (see :mod:`puppetha.store.records`).
KINDS = ("ca", "crl", "revoked", "claim", "node", "master", "class", "lease")

#: JSON bytes per copy transaction: well inside DynamoDB's 4 MB per transaction.
BATCH_BYTES = 1_000_000


class MigrationConflict(StoreError):
    """The target already holds some of the items, with other values; nothing was written."""

    def __init__(self, conflicts: Sequence[tuple[str, str]]) -> None:
        shown = ", ".join(f"{kind} {key!r}" for kind, key in conflicts[:10])
        more = f" and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
        super().__init__(f"the target holds other values for {shown}{more}")
        self.conflicts = tuple(conflicts)


class MigrationIncomplete(StoreError):
    """After copying, the target does not hold every source item as it is in the source."""


@frozen
class KindCount:
    copied: int
    unchanged: int


@frozen
class KindPlan:
    """What a migration does for one kind (a pure function of what both stores hold)."""

    kind: str
    copy: tuple[Item, ...]
    unchanged: tuple[str, ...]
    conflicts: tuple[str, ...]


def plan_kind(kind: str, source: Iterable[Item], target: Iterable[Item]) -> KindPlan:
    """Source items absent from the target are copied, equal ones skipped, others conflicts."""
    present = {item.key: item.value for item in target}
    copy: list[Item] = []
    unchanged: list[str] = []
    conflicts: list[str] = []
    for item in source:
        if item.key not in present:
            copy.append(item)
        elif _same(present[item.key], item.value):
            unchanged.append(item.key)
        else:
            conflicts.append(item.key)
    return KindPlan(kind, tuple(copy), tuple(unchanged), tuple(conflicts))


def batches(items: Sequence[Item], max_writes: int, max_bytes: int) -> list[list[Item]]:
    """Consecutive groups of at most ``max_writes`` items and about ``max_bytes`` of JSON."""
    groups: list[list[Item]] = []
    current: list[Item] = []
    size = 0
    for item in items:
        item_size = len(json.dumps(item.value)) + len(item.key)
        if current and (len(current) >= max_writes or size + item_size > max_bytes):
            groups.append(current)
            current, size = [], 0
        current.append(item)
        size += item_size
    if current:
        groups.append(current)
    return groups


def migrate(
    source: IStore,
    target: IStore,
    kinds: Iterable[str] = KINDS,
    *,
    batch_writes: int = 25,
    batch_bytes: int = BATCH_BYTES,
) -> dict[str, KindCount]:
    """
    Copy every item of ``kinds`` from ``source`` to ``target``; returns counts per kind.
    Raises :class:`MigrationConflict` (before writing anything) or :class:`MigrationIncomplete`.
    """
    if not 1 <= batch_writes <= MAX_TRANSACTION_WRITES:
        raise ValueError(f"batch_writes must be between 1 and {MAX_TRANSACTION_WRITES}")
    kinds = tuple(dict.fromkeys(kinds))
    sources = {kind: source.list(kind) for kind in kinds}
    plans = [plan_kind(kind, sources[kind], target.list(kind)) for kind in kinds]
    conflicts = [(plan.kind, key) for plan in plans for key in plan.conflicts]
    if conflicts:
        raise MigrationConflict(conflicts)

    for plan in plans:
        for group in batches(plan.copy, batch_writes, batch_bytes):
            if len(group) == 1:
                # One big value (a CRL) travels alone; the store chunks it if it must.
                target.create(plan.kind, group[0].key, group[0].value)
            else:
                target.transact([Create(plan.kind, item.key, item.value) for item in group])
        log.info(
            "migrated {kind}: {copied} copied, {unchanged} already there",
            kind=plan.kind,
            copied=len(plan.copy),
            unchanged=len(plan.unchanged),
        )

    for kind in kinds:
        _verify(kind, sources[kind], target.list(kind))
    return {plan.kind: KindCount(len(plan.copy), len(plan.unchanged)) for plan in plans}


def _verify(kind: str, source: Sequence[Item], target: Sequence[Item]) -> None:
    copied = {item.key: item.value for item in target}
    missing = [item.key for item in source if item.key not in copied]
    different = [
        item.key for item in source if item.key in copied and not _same(copied[item.key], item.value)
    ]
    if missing or different:
        raise MigrationIncomplete(
            f"{kind}: {len(missing)} missing, {len(different)} different after copying "
            f"(first: {(missing + different)[:3]})"
        )


def _same(a: object, b: object) -> bool:
    """JSON equality that tells ``True`` from ``1`` but not ``2`` from ``2.0`` (backends may)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b
