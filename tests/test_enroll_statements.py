"""
What a new agent's enrollment costs the SQLite store, in statements: each is a round through
SQLite and a release of the GIL, and the count should only fall.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from puppetha.store.sqlite import SQLiteStore, _Connection

pytest.register_assert_rewrite("tests.enroll_fixtures")

from tests.enroll_fixtures import AWS, World, build_world  # noqa: E402 - after the rewrite hook

pytest_plugins = ["tests.enroll_fixtures"]


class CountedConnection(_Connection):
    """A connection that keeps the text of every statement it executes."""

    statements: list[str]

    def execute(self, sql: str, *args: Any) -> Any:
        self.statements.append(" ".join(sql.split()))
        return super().execute(sql, *args)


def counting_store(directory: Path, statements: list[str]) -> SQLiteStore:
    connection_class = type("Counted", (CountedConnection,), {"statements": statements})
    store: type[SQLiteStore] = type("CountingStore", (SQLiteStore,), {"connection_class": connection_class})
    return store(str(directory / "puppetha.sqlite"))


@pytest.fixture
def counted(enroll_aws: AWS, aws_signer: Any, tmp_path: Path) -> Iterator[tuple[World, list[str]]]:
    statements: list[str] = []
    world = build_world(enroll_aws, aws_signer, tmp_path, make_store=lambda t: counting_store(t, statements))
    assert world.enroll(world.launch("master"), "master").status == 200
    assert world.enroll(world.launch()).status == 200  # the first agent made the lb CA
    statements.clear()
    yield world, statements
    world.store.close()


def test_a_new_agent_costs_the_store_seventeen_statements(counted: tuple[World, list[str]]) -> None:
    world, statements = counted
    assert world.enroll(world.launch()).status == 200
    listing = "\n".join(statements)
    # The claims of its roles, the healthy masters (the change counters of masters and CAs, the
    # master's node record), the change counters read by the five uses of CAs, CRLs and
    # masters, the node record read for the upsert, and the one recording transaction.
    assert len(statements) <= 17, listing
    writes = [s for s in statements if s.split()[0] in {"INSERT", "UPDATE", "DELETE"}]
    assert len(writes) == 2, listing  # the claim, created issued, and the node record
    # A transaction alone needs no savepoint, its conditions are checked by its writes, and the
    # busy timeout is not set again while it stands.
    assert not [s for s in statements if s.startswith(("SAVEPOINT", "RELEASE", "PRAGMA"))], listing
    assert statements.count("BEGIN IMMEDIATE") == statements.count("COMMIT") == 1, listing
