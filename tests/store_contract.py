"""
The contract every :class:`puppetha.store.IStore` implementation passes.

How to use it: subclass :class:`StoreContract` in a ``test_*.py`` module, name the subclass
``Test...`` so pytest collects it, and override the ``make_store`` fixture::

    from tests.store_contract import StoreContract, StoreFactory

    class TestSQLiteStore(StoreContract):
        @pytest.fixture
        def make_store(self, tmp_path: Path) -> StoreFactory:
            path = str(tmp_path / "store.sqlite")
            return lambda: SQLiteStore(path)

``make_store`` returns a factory.  Every call of the factory within one test returns a *new*
store object over the *same* data (the same file, the same table): that is how the suite plays
several daemons sharing one store.  The data starts empty for each test.  The suite closes every
store it makes.

The ``store`` fixture is the first store of the test; tests that need more call ``stores()``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from puppetha.store import (
    COUNTED_KINDS,
    MAX_TRANSACTION_WRITES,
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
    VersionConflict,
    Write,
)

StoreFactory = Callable[[], IStore]

#: Threads in each race; enough to collide on a 2-core box, few enough for a remote backend.
RACERS = 8
#: Guards against a hang, never a measure of speed.
BARRIER_TIMEOUT = 60.0

#: Keys that trip naive prefix matching (LIKE wildcards, escapes) and byte-order assumptions.
AWKWARD_KEYS = [
    "a",
    "a%",
    "a%b",
    "a_",
    "a_b",
    "ab",
    "a/b",
    "a/b/c",
    "a\\b",
    "a[b]",
    "a*",
    "a'b",
    'a"b',
    "a b",
    "aé",
    "a日本",
    "a😀",
    "a\uffff",
    "a\U0010ffff",
    "b",
    "%",
    "_",
    "/",
    "Z",
    "é",
]


def refused() -> AbstractContextManager[Any]:
    """Expects the store's refusal of bad input; each backend words its messages its own way."""
    return pytest.raises(ValueError)  # noqa: PT011


def assert_same_json(got: object, want: object, path: str = "value") -> None:
    """
    Equality that also tells ``True`` from ``1`` and ``None`` from missing.  Numbers compare by
    value only: a backend may give ``2`` back for ``2.0``.
    """
    if isinstance(want, bool) or want is None or isinstance(want, str):
        assert type(got) is type(want), f"{path}: {got!r} is not {want!r}"
        assert got == want, f"{path}: {got!r} != {want!r}"
    elif isinstance(want, (int, float)):
        assert isinstance(got, (int, float)), f"{path}: {got!r} is not a number"
        assert not isinstance(got, bool), f"{path}: {got!r} is not a number"
        assert got == want, f"{path}: {got!r} != {want!r}"
    elif isinstance(want, dict):
        assert isinstance(got, dict), f"{path}: {got!r} is not an object"
        assert sorted(got) == sorted(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_same_json(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list), f"{path}: {got!r} is not a list"
        assert len(got) == len(want), f"{path}: {len(got)} items, not {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_json(g, w, f"{path}[{i}]")
    else:  # pragma: no cover - the tables below hold JSON only
        raise TypeError(want)


VALUES: dict[str, dict[str, Any]] = {
    "empty": {},
    "flat": {"name": "agent-1.example.com", "port": 8140, "healthy": True},
    "nested": {"a": {"b": {"c": {"d": [1, {"e": "f"}]}}}},
    "lists": {"empty": [], "mixed": [1, "two", 3.5, None, True, False, [], {}]},
    "unicode": {"日本": "語", "emoji": "😀", "accent": "café", "nul-free \u2028": "line\nbreak\ttab"},
    "booleans": {"yes": True, "no": False},
    "none": {"nothing": None, "inside": [None]},
    "large int as string": {"serial": str(2**128 - 1), "hex": f"{2**127:x}"},
    "ints": {"zero": 0, "negative": -42, "safe": 2**53 - 1, "unsafe_negative": -(2**53 - 1)},
    "floats": {"tenth": 0.1, "small": 1.5e-7, "negative": -2.25, "epoch": 1732450000.123456, "whole": 2.0},
    "empty strings": {"": "", "blank": ""},
    "awkward keys": {"%": 1, "_": 2, "a.b": 3, "$x": 4, "with space": 5},
}


class StoreContract:
    """Tests every :class:`IStore` passes; subclass and override :meth:`make_store`."""

    @pytest.fixture
    def make_store(self) -> StoreFactory:
        raise NotImplementedError("override make_store in the implementation's test class")

    @pytest.fixture
    def stores(self, make_store: StoreFactory) -> Iterator[StoreFactory]:
        made: list[IStore] = []

        def new() -> IStore:
            store = make_store()
            made.append(store)
            return store

        yield new
        for store in made:
            store.close()

    @pytest.fixture
    def store(self, stores: StoreFactory) -> IStore:
        return stores()

    # -- single items

    def test_get_missing(self, store: IStore) -> None:
        assert store.get("node", "absent") is None

    def test_create_starts_at_version_1(self, store: IStore) -> None:
        item = store.create("node", "n1", {"a": 1})
        assert item == Item("node", "n1", {"a": 1}, 1)
        assert store.get("node", "n1") == Item("node", "n1", {"a": 1}, 1)

    def test_create_twice_keeps_the_first(self, store: IStore) -> None:
        store.create("node", "n1", {"first": True})
        with pytest.raises(AlreadyExists) as caught:
            store.create("node", "n1", {"second": True})
        assert (caught.value.kind, caught.value.key) == ("node", "n1")
        assert store.get("node", "n1") == Item("node", "n1", {"first": True}, 1)

    def test_replace_at_the_right_version(self, store: IStore) -> None:
        store.create("node", "n1", {"v": 1})
        assert store.replace("node", "n1", {"v": 2}, 1) == Item("node", "n1", {"v": 2}, 2)
        assert store.replace("node", "n1", {"v": 3}, 2) == Item("node", "n1", {"v": 3}, 3)
        assert store.get("node", "n1") == Item("node", "n1", {"v": 3}, 3)

    @pytest.mark.parametrize("wrong", [0, 2, 3, -1])
    def test_replace_at_a_wrong_version_changes_nothing(self, store: IStore, wrong: int) -> None:
        store.create("node", "n1", {"v": 1})
        with pytest.raises(VersionConflict) as caught:
            store.replace("node", "n1", {"v": 2}, wrong)
        assert (caught.value.kind, caught.value.key, caught.value.expected) == ("node", "n1", wrong)
        assert store.get("node", "n1") == Item("node", "n1", {"v": 1}, 1)

    def test_replace_absent_is_a_conflict(self, store: IStore) -> None:
        with pytest.raises(VersionConflict):
            store.replace("node", "n1", {"v": 2}, 1)
        assert store.get("node", "n1") is None

    def test_delete_without_version(self, store: IStore) -> None:
        store.create("node", "n1", {})
        assert store.delete("node", "n1") is True
        assert store.get("node", "n1") is None
        assert store.delete("node", "n1") is False

    def test_delete_at_the_right_version(self, store: IStore) -> None:
        store.create("node", "n1", {})
        store.replace("node", "n1", {"v": 2}, 1)
        assert store.delete("node", "n1", expected_version=2) is True
        assert store.get("node", "n1") is None

    def test_delete_at_a_wrong_version_changes_nothing(self, store: IStore) -> None:
        store.create("node", "n1", {"v": 1})
        with pytest.raises(VersionConflict):
            store.delete("node", "n1", expected_version=2)
        assert store.get("node", "n1") == Item("node", "n1", {"v": 1}, 1)

    def test_delete_absent_with_version_is_a_conflict(self, store: IStore) -> None:
        with pytest.raises(VersionConflict):
            store.delete("node", "n1", expected_version=1)

    @pytest.mark.parametrize("impossible", [2**63, 2**64, 10**40, 2**200, -(2**200)])
    def test_versions_no_item_can_reach_are_conflicts(self, store: IStore, impossible: int) -> None:
        store.create("node", "n1", {"v": 1})
        with pytest.raises(VersionConflict):
            store.replace("node", "n1", {"v": 2}, impossible)
        with pytest.raises(VersionConflict):
            store.delete("node", "n1", expected_version=impossible)
        for write in (Replace("node", "n1", {"v": 2}, impossible),
                      Delete("node", "n1", expected_version=impossible),
                      Check("node", "n1", impossible)):
            with pytest.raises(TransactionConflict) as caught:
                store.transact([write, Create("node", "n2", {})])
            assert [type(r) for r in caught.value.reasons] == [VersionConflict]
        assert store.get("node", "n1") == Item("node", "n1", {"v": 1}, 1)
        assert store.get("node", "n2") is None

    def test_a_closed_store_is_unavailable(self, stores: StoreFactory) -> None:
        store = stores()
        store.create("node", "n1", {})
        store.close()
        calls: list[Callable[[], object]] = [
            lambda: store.get("node", "n1"),
            lambda: store.create("node", "n2", {}),
            lambda: store.replace("node", "n1", {}, 1),
            lambda: store.delete("node", "n1"),
            lambda: store.list("node"),
            lambda: store.list("ca"),
            lambda: store.transact([Create("node", "n2", {})]),
        ]
        if IBatchGet.providedBy(store):
            calls.append(lambda: store.get_many("node", ["n1", "n2"]))
            calls.append(lambda: store.get_many("node", [f"n{i}" for i in range(250)]))
        for call in calls:
            with pytest.raises(StoreUnavailable):
                call()
        assert stores().get("node", "n1") == Item("node", "n1", {}, 1)

    def test_create_after_delete_starts_again(self, store: IStore) -> None:
        store.create("node", "n1", {"v": 1})
        store.replace("node", "n1", {"v": 2}, 1)
        store.delete("node", "n1")
        assert store.create("node", "n1", {"v": 3}).version == 1

    def test_stores_share_the_data(self, stores: StoreFactory) -> None:
        one, two = stores(), stores()
        one.create("lease", "front", {"holder": "a"})
        assert two.get("lease", "front") == Item("lease", "front", {"holder": "a"}, 1)
        two.replace("lease", "front", {"holder": "b"}, 1)
        with pytest.raises(VersionConflict):
            one.replace("lease", "front", {"holder": "a"}, 1)
        assert one.get("lease", "front") == Item("lease", "front", {"holder": "b"}, 2)

    # -- kinds

    def test_kinds_are_separate(self, store: IStore) -> None:
        store.create("node", "same", {"kind": "node"})
        store.create("master", "same", {"kind": "master"})
        assert store.get("node", "same") == Item("node", "same", {"kind": "node"}, 1)
        assert [i.value for i in store.list("master")] == [{"kind": "master"}]
        assert store.delete("node", "same") is True
        assert store.get("master", "same") == Item("master", "same", {"kind": "master"}, 1)
        assert store.list("node") == []
        # Kinds that are prefixes of each other stay apart too.
        store.create("ca", "x", {})
        store.create("ca_old", "x", {})
        assert [i.kind for i in store.list("ca")] == ["ca"]

    # -- values

    @pytest.mark.parametrize("name", sorted(VALUES))
    def test_values_round_trip(self, stores: StoreFactory, name: str) -> None:
        value = VALUES[name]
        store = stores()
        created = store.create("node", "n1", value)
        assert_same_json(created.value, value)
        # Read back through another store object, so nothing comes from a cache.
        got = stores().get("node", "n1")
        assert got is not None
        assert_same_json(got.value, value)
        replaced = store.replace("node", "n1", {"wrapped": value}, 1)
        assert_same_json(replaced.value, {"wrapped": value})
        [listed] = stores().list("node")
        assert_same_json(listed.value, {"wrapped": value})

    def test_large_value(self, stores: StoreFactory) -> None:
        # A CRL of a few thousand revoked serials, PEM-encoded.
        crl = "-----BEGIN X509 CRL-----\n" + ("A" * 64 + "\n") * 5400 + "-----END X509 CRL-----\n"
        assert 340_000 < len(crl) < 360_000
        store = stores()
        store.create("crl", "root", {"number": 1, "crl_pem": crl})
        store.replace("crl", "root", {"number": 2, "crl_pem": crl[::-1]}, 1)
        got = stores().get("crl", "root")
        assert got == Item("crl", "root", {"number": 2, "crl_pem": crl[::-1]}, 2)
        other = stores()
        if IBatchGet.providedBy(other):
            assert other.get_many("crl", ["root", "absent"]) == {"root": got}

    @pytest.mark.parametrize(
        "value",
        [
            ["not", "a", "mapping"],
            "text",
            None,
            {"nan": float("nan")},
            {"inf": float("inf")},
            {"set": {1, 2}},
            {"bytes": b"raw"},
            {1: "int key"},
            {"nested": {2: "int key"}},
            {"object": object()},
            {"tuple": (1, 2)},
            {"surrogate": "\ud800"},
            {"\udc00": "surrogate key"},
            {"deep": [{"inside": "\udfff"}]},
        ],
        ids=repr,
    )
    def test_non_json_values_are_refused(self, store: IStore, value: Any) -> None:
        with refused():
            store.create("node", "n1", value)
        assert store.get("node", "n1") is None
        store.create("node", "n1", {"ok": True})
        with refused():
            store.replace("node", "n1", value, 1)
        assert store.get("node", "n1") == Item("node", "n1", {"ok": True}, 1)

    # -- kinds and keys that are refused

    @pytest.mark.parametrize(
        "kind", ["", "Node", "1node", "_node", "node-x", "no de", "n" * 33, "nöde", "node\n", None, 7]
    )
    def test_bad_kinds_are_refused(self, store: IStore, kind: Any) -> None:
        with refused():
            store.create(kind, "k", {})
        with refused():
            store.get(kind, "k")
        with refused():
            store.list(kind)
        with refused():
            store.delete(kind, "k")
        with refused():
            store.replace(kind, "k", {}, 1)

    def test_longest_kind_is_accepted(self, store: IStore) -> None:
        kind = "k" + "0_a" * 10 + "z"
        assert len(kind) == 32
        store.create(kind, "k", {})
        assert store.get(kind, "k") == Item(kind, "k", {}, 1)

    @pytest.mark.parametrize(
        "key",
        ["", "x" * 1025, "é" * 513, "😀" * 257, "\ud800", None, 5, b"bytes"],
        ids=["empty", "1025 ascii", "1026 bytes", "1028 bytes", "surrogate", "none", "int", "bytes"],
    )
    def test_bad_keys_are_refused(self, store: IStore, key: Any) -> None:
        with refused():
            store.create("node", key, {})
        with refused():
            store.get("node", key)
        with refused():
            store.delete("node", key)
        with refused():
            store.replace("node", key, {}, 1)
        assert store.list("node") == []

    @pytest.mark.parametrize("key", ["x" * 1024, "é" * 512, "😀" * 256, "a" + "😀" * 255 + "bcd"])
    def test_longest_keys_are_accepted(self, store: IStore, key: str) -> None:
        assert len(key.encode("utf-8")) == 1024
        store.create("node", key, {"k": key})
        assert store.get("node", key) == Item("node", key, {"k": key}, 1)
        assert [i.key for i in store.list("node", key)] == [key]

    # -- many keys at once (IBatchGet)

    @pytest.fixture
    def batch(self, store: IStore) -> IBatchGet:
        assert IBatchGet.providedBy(store), "every store reads many keys in one round trip"
        reader: IBatchGet = store
        return reader

    def test_get_many_reads_what_get_reads(self, store: IStore, batch: IBatchGet) -> None:
        # More keys than one DynamoDB call takes (100), some absent, some asked twice, some of
        # another kind only, one replaced since its creation.
        keys = [f"n{i:04d}" for i in range(240)]
        step = MAX_TRANSACTION_WRITES
        for start in range(0, len(keys), step):
            store.transact([Create("node", key, {"i": key}) for key in keys[start : start + step]])
        store.replace("node", "n0007", {"i": "again"}, 1)
        store.create("class", "c1", {"other": "kind"})
        wanted = [*keys[::-2], "absent", "c1", "n0007", "n0007", *keys[:20], "n0101"]
        found = batch.get_many("node", wanted)
        assert found == {key: item for key in wanted if (item := store.get("node", key)) is not None}
        assert sorted(found) == sorted({*keys[1::2], *keys[:20], "n0007"})
        assert found["n0007"] == Item("node", "n0007", {"i": "again"}, 2)
        assert batch.get_many("class", ["c1", "n0001"]) == {"c1": Item("class", "c1", {"other": "kind"}, 1)}

    def test_get_many_of_nothing(self, store: IStore, batch: IBatchGet) -> None:
        store.create("node", "n1", {})
        assert batch.get_many("node", []) == {}
        assert batch.get_many("node", ["absent", "absent"]) == {}

    def test_get_many_awkward_keys(self, store: IStore, batch: IBatchGet) -> None:
        for i, key in enumerate(AWKWARD_KEYS):
            store.create("node", key, {"i": i})
        found = batch.get_many("node", [*AWKWARD_KEYS, "a%%", "a\\b"])
        assert found == {key: Item("node", key, {"i": i}, 1) for i, key in enumerate(AWKWARD_KEYS)}

    @pytest.mark.parametrize("keys", [["n1", ""], ["n1", None], ["n1", 7], ["n1", "é" * 513]], ids=repr)
    def test_get_many_refuses_bad_keys(self, store: IStore, batch: IBatchGet, keys: list[Any]) -> None:
        store.create("node", "n1", {})
        with refused():
            batch.get_many("node", keys)
        with refused():
            batch.get_many("Node", ["n1"])

    # -- listing

    def test_list_orders_by_key(self, store: IStore) -> None:
        for i, key in enumerate(reversed(AWKWARD_KEYS)):
            store.create("node", key, {"i": i})
        assert [i.key for i in store.list("node")] == sorted(AWKWARD_KEYS)
        assert all(i.version == 1 and i.kind == "node" for i in store.list("node"))

    @pytest.mark.parametrize(
        "prefix",
        [
            "",
            "a",
            "a%",
            "a_",
            "a/",
            "a/b",
            "a\\",
            "a[",
            "a*",
            "aé",
            "a日",
            "a😀",
            "a\U0010ffff",
            "%",
            "_",
            "é",
            "q",
        ],
    )
    def test_list_prefix_is_literal(self, store: IStore, prefix: str) -> None:
        for key in AWKWARD_KEYS:
            store.create("node", key, {"key": key})
        listed = store.list("node", prefix)
        want = sorted(k for k in AWKWARD_KEYS if k.startswith(prefix))
        assert [i.key for i in listed] == want
        assert [i.value for i in listed] == [{"key": k} for k in want]

    def test_list_prefix_equal_to_a_key_includes_it(self, store: IStore) -> None:
        for key in ["root", "root/01", "root/02", "rooted", "roos", "rop"]:
            store.create("revoked", key, {})
        assert [i.key for i in store.list("revoked", "root/")] == ["root/01", "root/02"]
        assert [i.key for i in store.list("revoked", "root")] == ["root", "root/01", "root/02", "rooted"]

    @pytest.mark.parametrize(
        "prefix",
        [None, 7, b"a", "\ud800", "a\udfff"],
        ids=["none", "int", "bytes", "surrogate", "trailing surrogate"],
    )
    def test_bad_prefixes_are_refused(self, store: IStore, prefix: Any) -> None:
        store.create("node", "x", {})
        with refused():
            store.list("node", prefix)

    def test_list_empty_kind(self, store: IStore) -> None:
        assert store.list("node") == []
        assert store.list("node", "x") == []

    @given(data=st.data())
    @settings(
        max_examples=40,
        deadline=None,
        # Each backend's subclass runs it: the store lives across examples, and the executors differ.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors],
    )
    def test_list_prefix_property(self, store: IStore, data: st.DataObject) -> None:
        # Each example writes under a namespace of its own: the store outlives the examples.
        namespace = f"{next(_namespaces):06d}|"
        char = st.one_of(
            st.sampled_from(["a", "b", "%", "_", "/", "\\", "é", "日", "😀", "\uffff", "\U0010ffff"]),
            st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
        )
        suffixes = data.draw(st.lists(st.text(char, max_size=6), max_size=8, unique=True))
        for suffix in suffixes:
            store.create("prop", namespace + suffix, {})
        if suffixes:
            chosen = data.draw(st.sampled_from(suffixes))
            prefix = chosen[: data.draw(st.integers(0, len(chosen)))]
        else:
            prefix = data.draw(st.text(char, max_size=3))
        want = sorted(namespace + s for s in suffixes if s.startswith(prefix))
        assert [i.key for i in store.list("prop", namespace + prefix)] == want

    # -- transactions

    def test_transact_applies_everything(self, store: IStore) -> None:
        store.create("node", "replaced", {"v": 1})
        store.create("node", "deleted", {})
        store.create("node", "deleted-at-version", {})
        store.create("ca", "checked", {"ca": True})
        store.transact(
            [
                Create("node", "created", {"v": 1}),
                Replace("node", "replaced", {"v": 2}, 1),
                Delete("node", "deleted"),
                Delete("node", "deleted-at-version", expected_version=1),
                Delete("node", "never-there"),
                Check("ca", "checked", 1),
            ]
        )
        assert store.get("node", "created") == Item("node", "created", {"v": 1}, 1)
        assert store.get("node", "replaced") == Item("node", "replaced", {"v": 2}, 2)
        assert store.get("node", "deleted") is None
        assert store.get("node", "deleted-at-version") is None
        assert store.get("ca", "checked") == Item("ca", "checked", {"ca": True}, 1)

    def test_transact_nothing(self, store: IStore) -> None:
        store.transact([])
        assert store.list("node") == []

    @pytest.mark.parametrize(
        ("failing", "reason"),
        [
            (Create("node", "present", {"new": True}), AlreadyExists),
            (Replace("node", "present", {"new": True}, 2), VersionConflict),
            (Replace("node", "absent", {"new": True}, 1), VersionConflict),
            (Delete("node", "present", expected_version=2), VersionConflict),
            (Delete("node", "absent", expected_version=1), VersionConflict),
            (Check("node", "present", 2), VersionConflict),
            (Check("node", "absent", 1), VersionConflict),
        ],
        ids=repr,
    )
    def test_transact_one_refusal_refuses_all(
        self, store: IStore, failing: Write, reason: type[StoreError]
    ) -> None:
        store.create("node", "present", {"old": True})
        store.create("node", "other", {"old": True})
        store.create("node", "doomed", {"old": True})
        writes: list[Write] = [
            Create("node", "fresh", {"new": True}),
            Replace("node", "other", {"new": True}, 1),
            Delete("node", "doomed"),
            failing,
        ]
        for order in (writes, writes[::-1]):
            with pytest.raises(TransactionConflict) as caught:
                store.transact(order)
            # Backends may name only the writes that failed: here, exactly one.
            named = [
                (type(r), getattr(r, "kind", None), getattr(r, "key", None)) for r in caught.value.reasons
            ]
            assert named == [(reason, failing.kind, failing.key)]
            assert store.get("node", "fresh") is None
            assert store.get("node", "other") == Item("node", "other", {"old": True}, 1)
            assert store.get("node", "doomed") == Item("node", "doomed", {"old": True}, 1)
            assert store.get("node", "present") == Item("node", "present", {"old": True}, 1)
            assert store.get("node", "absent") is None

    def test_transact_at_most_the_limit(self, store: IStore) -> None:
        store.transact([Create("node", f"n{i:03d}", {"i": i}) for i in range(MAX_TRANSACTION_WRITES)])
        assert len(store.list("node")) == MAX_TRANSACTION_WRITES
        with refused():
            store.transact([Create("ca", f"n{i:03d}", {}) for i in range(MAX_TRANSACTION_WRITES + 1)])
        assert store.list("ca") == []

    @pytest.mark.parametrize(
        "second",
        [
            Create("node", "k", {}),
            Replace("node", "k", {}, 1),
            Delete("node", "k"),
            Check("node", "k", 1),
        ],
        ids=repr,
    )
    def test_transact_one_write_per_key(self, store: IStore, second: Write) -> None:
        with refused():
            store.transact([Create("node", "k", {}), Create("node", "other", {}), second])
        assert store.list("node") == []
        # The same key under another kind is another item.
        store.transact([Create("node", "k", {}), Create("master", "k", {})])

    @pytest.mark.parametrize(
        "bad",
        [
            Create("Node", "k", {}),
            Create("node", "", {}),
            Create("node", "k", {"nan": float("nan")}),
            Replace("node", "k", ["list"], 1),  # type: ignore[arg-type]
            Check("node", "x" * 1025, 1),
            Check("node", "k", None),  # type: ignore[arg-type]
            Replace("node", "k", {}, True),
            Delete("node", "k", "1"),  # type: ignore[arg-type]
            Create("node", "k", {"surrogate": "\ud800"}),
        ],
        ids=repr,
    )
    def test_transact_bad_input_changes_nothing(self, store: IStore, bad: Write) -> None:
        with refused():
            store.transact([Create("node", "fresh", {}), bad])
        assert store.list("node") == []

    # -- races

    @staticmethod
    def _race(stores: StoreFactory, shared: bool, run: Callable[[IStore, int], object]) -> list[object]:
        """Runs ``run(store, i)`` in :data:`RACERS` threads released at once; results or errors."""
        one = stores()
        racers = [one if shared else stores() for _ in range(RACERS)]
        start = threading.Barrier(RACERS)

        def racer(i: int) -> object:
            start.wait(BARRIER_TIMEOUT)
            try:
                return run(racers[i], i)
            except StoreError as e:
                return e

        with ThreadPoolExecutor(RACERS) as pool:
            return list(pool.map(racer, range(RACERS)))

    @pytest.mark.parametrize("shared", [True, False], ids=["one store", "a store each"])
    def test_race_create(self, stores: StoreFactory, shared: bool) -> None:
        results = self._race(stores, shared, lambda s, i: s.create("claim", "i-0abc/agent", {"by": i}))
        winners = [r for r in results if isinstance(r, Item)]
        assert len(winners) == 1
        assert all(isinstance(r, AlreadyExists) for r in results if r not in winners)
        assert stores().get("claim", "i-0abc/agent") == winners[0]

    @pytest.mark.parametrize("shared", [True, False], ids=["one store", "a store each"])
    def test_race_compare_and_set(self, stores: StoreFactory, shared: bool) -> None:
        stores().create("lease", "front", {"holder": None})
        results = self._race(stores, shared, lambda s, i: s.replace("lease", "front", {"holder": i}, 1))
        winners = [r for r in results if isinstance(r, Item)]
        assert len(winners) == 1
        assert all(isinstance(r, VersionConflict) for r in results if r not in winners)
        assert stores().get("lease", "front") == winners[0]
        assert winners[0].version == 2

    @pytest.mark.parametrize("shared", [True, False], ids=["one store", "a store each"])
    def test_race_transactions(self, stores: StoreFactory, shared: bool) -> None:
        stores().create("crl", "root", {"number": 1})

        def bump(store: IStore, i: int) -> object:
            store.transact(
                [
                    Replace("crl", "root", {"number": 2, "by": i}, 1),
                    Create("revoked", f"root/{i:02x}", {}),
                ]
            )
            return i

        results = self._race(stores, shared, bump)
        winners = [r for r in results if isinstance(r, int)]
        assert len(winners) == 1
        assert all(isinstance(r, TransactionConflict) for r in results if r not in winners)
        assert [i.key for i in stores().list("revoked")] == [f"root/{winners[0]:02x}"]
        crl = stores().get("crl", "root")
        assert crl is not None
        assert crl.value == {"number": 2, "by": winners[0]}

    @pytest.mark.parametrize("shared", [True, False], ids=["one store", "a store each"])
    def test_race_counter(self, stores: StoreFactory, shared: bool) -> None:
        increments = 12
        stores().create("counter", "serial", {"n": 0})

        def count(store: IStore, i: int) -> object:
            for _ in range(increments):
                increment(store, "counter", "serial")
            return i

        results = self._race(stores, shared, count)
        assert results == list(range(RACERS))
        final = stores().get("counter", "serial")
        assert final is not None
        assert final.value == {"n": RACERS * increments}, final
        assert final.version == 1 + RACERS * increments, final


    # -- change counters (IGenerations)

    def test_counted_writes_move_their_kind_only(self, stores: StoreFactory) -> None:
        store, other = stores(), stores()
        assert IGenerations.providedBy(store)
        counters: IGenerations = store
        start = dict(counters.generations())
        assert sorted(start) == sorted(COUNTED_KINDS)

        def moved() -> dict[str, int]:
            now = counters.generations()
            return {kind: now[kind] - start[kind] for kind in now if now[kind] != start[kind]}

        # Other kinds never count.
        store.create("node", "n1", {})
        store.transact([Create("claim", "i-1/agent", {}), Delete("node", "n1")])
        assert moved() == {}
        # Every committed write of a counted kind does, whoever made it (another daemon here).
        other.create("master", "m1", {"healthy": True})
        assert moved() == {"master": 1}
        other.replace("master", "m1", {"healthy": False}, 1)
        assert moved()["master"] == 2
        other.transact([Create("ca", "c1", {}), Create("crl", "c1", {})])
        assert moved() == {"master": 2, "ca": 1, "crl": 1}
        assert other.delete("master", "m1")
        assert moved()["master"] == 3
        other.create("master", "m2", {})
        assert other.delete("master", "m2", expected_version=1)
        assert moved()["master"] == 5

    def test_refused_writes_do_not_count(self, store: IStore) -> None:
        assert IGenerations.providedBy(store)
        counters: IGenerations = store
        store.create("master", "m1", {})
        store.create("ca", "c1", {})
        before = dict(counters.generations())
        with pytest.raises(AlreadyExists):
            store.create("master", "m1", {})
        with pytest.raises(VersionConflict):
            store.replace("master", "m1", {}, 7)
        with pytest.raises(VersionConflict):
            store.delete("master", "m1", expected_version=7)
        assert not store.delete("master", "absent")
        with pytest.raises(TransactionConflict):
            store.transact([Delete("ca", "c1"), Create("master", "m1", {})])
        # A Check writes nothing, so it counts nothing.
        store.transact([Check("master", "m1", 1), Create("node", "n1", {})])
        assert counters.generations() == before
        assert store.get("ca", "c1") is not None


_namespaces = itertools.count()


def increment(store: IStore, kind: str, key: str) -> int:
    """Read, add one, compare-and-set; again on conflict.  Returns the new count."""
    while True:
        item = store.get(kind, key)
        assert item is not None
        n = int(item.value["n"]) + 1
        try:
            store.replace(kind, key, {"n": n}, item.version)
        except VersionConflict:
            continue
        return n
