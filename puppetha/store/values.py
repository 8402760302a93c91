"""
What every store accepts: kinds, keys, prefixes, expected versions, JSON values and transactions.

These rules belong to the :class:`~puppetha.store.IStore` interface, not to a backend.  Each
backend calls them before it touches its storage, so bad input gets the same ``ValueError``
everywhere and changes nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from puppetha.store import MAX_TRANSACTION_WRITES, Check, Create, Delete, Replace, StoreError, Write

#: Longest key, in bytes of UTF-8 (DynamoDB's limit on a sort key).
MAX_KEY_BYTES = 1024
KIND_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")


def validate_kind(kind: object) -> str:
    """``kind`` if it is a short lowercase word, else ``ValueError``."""
    if not isinstance(kind, str) or KIND_PATTERN.fullmatch(kind) is None:
        raise ValueError(f"kind must match [a-z][a-z0-9_]{{0,31}}, not {kind!r}")
    return kind


def _utf8_size(text: str, what: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not encodable as UTF-8 (lone surrogate)") from None


def validate_key(key: object) -> str:
    """``key`` if it is a non-empty string of at most :data:`MAX_KEY_BYTES`, else ``ValueError``."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string, not {key!r}")
    size = _utf8_size(key, "key")
    if size > MAX_KEY_BYTES:
        raise ValueError(f"key is {size} bytes of UTF-8, more than {MAX_KEY_BYTES}")
    return key


def validate_prefix(prefix: object) -> str:
    """``prefix`` if it is a string UTF-8 can carry (empty included), else ``ValueError``."""
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a string, not {prefix!r}")
    _utf8_size(prefix, "prefix")
    return prefix


def validate_version(version: object) -> int:
    """``version`` if it is an integer (not a bool), else ``ValueError``."""
    # Any integer is a fair question; one below 1 simply never matches.
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"expected version must be an integer, not {version!r}")
    return version


#: Highest version an item can reach (SQLite's INTEGER); DynamoDB numbers hold 38 digits.
MAX_VERSION = 2**63 - 1


def version_can_exist(version: int) -> bool:
    """Whether an item can be at ``version``; one that cannot is a conflict, never sent."""
    return 1 <= version <= MAX_VERSION


def check_json(value: object, path: str = "value") -> None:
    """
    Refuse what JSON would not give back as it was: ``json.dumps`` alone quietly turns int keys
    into strings and tuples into lists, writes NaN, and lets lone surrogates through.
    """
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, str):
        _utf8_size(value, path)
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path} is {value!r}, which JSON cannot hold")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path} has a non-string key {k!r}")
            _utf8_size(k, f"a key of {path}")
            check_json(v, f"{path}.{k}")
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            check_json(v, f"{path}[{i}]")
        return
    raise ValueError(f"{path} is a {type(value).__name__}, which is not JSON")


def encode_value(value: object) -> str:
    """The JSON text stored for ``value``, keys sorted; ``ValueError`` unless it is a JSON object."""
    if not isinstance(value, Mapping):
        raise ValueError(f"value must be a mapping, not {type(value).__name__}")
    try:
        check_json(value)
        return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except RecursionError:
        raise ValueError("value is nested too deeply") from None


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def decode_value(text: str | bytes) -> dict[str, Any]:
    """The value stored as ``text``; :class:`StoreError` if that is anything but a JSON object."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        # Corrupt storage is the store's fault, not the caller's bad input.
        raise StoreError(f"stored value is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise StoreError("stored value is not a JSON object")
    return value


def validate_writes(writes: Sequence[Write]) -> dict[int, str]:
    """
    Refuse, before anything is written, a transaction the interface does not allow: more than
    :data:`MAX_TRANSACTION_WRITES` writes (checks included), two writes to one item, a bad
    kind, key, expected version or value.  Returns the JSON text of each Create and Replace,
    by position.
    """
    if len(writes) > MAX_TRANSACTION_WRITES:
        raise ValueError(f"a transaction holds at most {MAX_TRANSACTION_WRITES} writes, not {len(writes)}")
    texts: dict[int, str] = {}
    seen: set[tuple[str, str]] = set()
    for i, write in enumerate(writes):
        if not isinstance(write, (Create, Replace, Delete, Check)):
            raise ValueError(f"not a store write: {write!r}")
        validate_kind(write.kind)
        validate_key(write.key)
        if (write.kind, write.key) in seen:
            raise ValueError(f"{write.kind} {write.key!r} is written twice in one transaction")
        seen.add((write.kind, write.key))
        if isinstance(write, (Replace, Check)) or (
            isinstance(write, Delete) and write.expected_version is not None
        ):
            validate_version(write.expected_version)
        if isinstance(write, (Create, Replace)):
            try:
                texts[i] = encode_value(write.value)
            except ValueError as e:
                raise ValueError(f"{write.kind} {write.key!r}: {e}") from None
    return texts
