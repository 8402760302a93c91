"""
Heartbeats: what the wire carries, and the attacker's tests (forged, replayed, stale and
malformed datagrams are ignored and change nothing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from attrs import evolve
from twisted.internet.task import Clock

from puppetha.ha.heartbeat import (
    MAGIC,
    BadHeartbeat,
    Heartbeat,
    HeartbeatProtocol,
    decode,
    encode,
    ensure_heartbeat_key,
)
from puppetha.pki.vault import FileKeyVault, VaultError
from puppetha.store.records import Records, SealedSecret
from puppetha.store.sqlite import SQLiteStore

KEY = b"k" * 32
OTHER_KEY = b"x" * 32
WALL = 1_764_000_000.0
PEER = ("10.0.0.2", 7946)


class Wire:
    """A datagram transport that keeps what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, datagram: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((datagram, addr))


def node(
    name: str, clock: Clock, key: bytes = KEY, boot: int = 1
) -> tuple[HeartbeatProtocol, Wire, list[Heartbeat]]:
    heard: list[Heartbeat] = []
    protocol = HeartbeatProtocol(node=name, key=key, port=7946, monotonic=clock.seconds,
                                 wall=lambda: WALL + clock.seconds(), on_heartbeat=heard.append, boot=boot)
    wire = Wire()
    protocol.makeConnection(wire)  # type: ignore[arg-type]
    return protocol, wire, heard


def beat(**changes: Any) -> Heartbeat:
    return evolve(Heartbeat("i-b", 1, 1, WALL, "primary", 7, "gen-abc", 7946), **changes)


def test_round_trip_and_delivery() -> None:
    clock = Clock()
    a, wire, _ = node("i-a", clock)
    b, _, heard = node("i-b", clock)
    a.send([PEER, ("10.0.0.3", 7946)], state="primary", token=7, generation="gen-1")
    assert [addr for _, addr in wire.sent] == [PEER, ("10.0.0.3", 7946)]
    clock.advance(2)
    b.datagramReceived(wire.sent[0][0], ("10.0.0.1", 7946))
    assert [(h.node, h.state, h.token, h.generation, h.seq) for h in heard] == [
        ("i-a", "primary", 7, "gen-1", 1)
    ]
    assert b.heard("i-a") == 2.0
    assert b.peers["i-a"].address == "10.0.0.1"


def test_the_holder_says_which_version_of_the_lease_it_wrote_last() -> None:
    clock = Clock()
    a, wire, _ = node("i-a", clock)
    b, _, heard = node("i-b", clock)
    a.send([PEER], state="primary", token=7, generation="gen-1", lease=1203)
    a.send([PEER], state="standby", token=7, generation="gen-1")
    for datagram, _ in wire.sent:
        b.datagramReceived(datagram, ("10.0.0.1", 7946))
    assert [h.lease for h in heard] == [1203, None]
    assert b.lease_version_heard("i-a") is None  # it holds none now
    # A node that holds no lease sends the body every earlier version sends, and reads theirs.
    assert b"lease" not in wire.sent[1][0]
    assert decode(KEY, encode(KEY, beat())).lease is None


def test_a_lease_version_counts_from_the_first_heartbeat_that_named_it() -> None:
    clock = Clock()
    a, wire, _ = node("i-a", clock)
    b, _, _ = node("i-b", clock)

    def hear(lease: int | None) -> None:
        a.send([PEER], state="primary", token=7, generation="gen-1", lease=lease)
        b.datagramReceived(wire.sent[-1][0], ("10.0.0.1", 7946))
        clock.advance(0.1)

    assert b.lease_version_heard("i-a") is None
    hear(5)
    hear(5)
    assert b.lease_version_heard("i-a") == (5, 0.0)
    hear(6)
    assert b.lease_version_heard("i-a") == (6, 0.2)
    hear(None)
    hear(6)
    assert b.lease_version_heard("i-a") == (6, 0.4)  # not from before the gap


def test_forged_heartbeats_are_ignored() -> None:
    clock = Clock()
    b, _, heard = node("i-b", clock)
    forged = encode(OTHER_KEY, beat(node="i-a"))
    b.datagramReceived(forged, ("10.0.0.66", 7946))
    # A real datagram with its body changed after signing ("released" by an attacker).
    real = encode(KEY, beat(node="i-a", state="primary"))
    tampered = real.replace(b'"primary"', b'"stopped"')
    assert tampered != real
    b.datagramReceived(tampered, ("10.0.0.66", 7946))
    assert heard == []
    assert b.peers == {}
    assert b.dropped == {"bad HMAC": 2}


def test_replayed_heartbeats_are_ignored() -> None:
    clock = Clock()
    b, _, heard = node("i-b", clock)
    first, second = encode(KEY, beat(node="i-a", seq=1)), encode(KEY, beat(node="i-a", seq=2))
    b.datagramReceived(first, PEER)
    b.datagramReceived(second, PEER)
    clock.advance(1)
    b.datagramReceived(first, PEER)  # replayed after a later one
    b.datagramReceived(second, PEER)  # replayed as is
    assert [h.seq for h in heard] == [1, 2]
    assert b.heard("i-a") == 0.0  # the replays did not refresh the peer
    assert b.dropped == {"replayed": 2}
    # A new incarnation of the peer starts its numbers again, under a later boot.
    b.datagramReceived(encode(KEY, beat(node="i-a", boot=2, seq=1)), PEER)
    assert [(h.boot, h.seq) for h in heard][-1] == (2, 1)
    # ... and the old incarnation's datagrams are replays from then on.
    b.datagramReceived(encode(KEY, beat(node="i-a", boot=1, seq=99)), PEER)
    assert len(heard) == 3


def test_stale_heartbeats_are_ignored_even_by_a_receiver_that_just_started() -> None:
    clock = Clock()
    b, _, heard = node("i-b", clock)
    b.datagramReceived(encode(KEY, beat(node="i-a", sent=WALL - 60)), PEER)
    b.datagramReceived(encode(KEY, beat(node="i-a", sent=WALL + 60)), PEER)
    assert heard == []
    assert b.dropped == {"stale": 2}
    b.datagramReceived(encode(KEY, beat(node="i-a", sent=WALL - 1)), PEER)
    assert len(heard) == 1


def test_own_node_id_is_ignored() -> None:
    """Someone replaying our own datagrams at us must not make us a peer of ourselves."""
    clock = Clock()
    b, wire, heard = node("i-b", clock)
    b.send([PEER], state="primary", token=1, generation="")
    b.datagramReceived(wire.sent[0][0], PEER)
    assert heard == []
    assert b.dropped == {"own node id": 1}


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"PHA1",
        b"GET / HTTP/1.1\r\n\r\n" + b"x" * 40,
        MAGIC + b"\0" * 32 + b"{}",
        b"x" * 5000,
    ],
)
def test_garbage_is_refused(datagram: bytes) -> None:
    with pytest.raises(BadHeartbeat):
        decode(KEY, datagram)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"node": "i-a"},
        dict(json.loads(encode(KEY, beat())[36:]), state="emperor"),
        dict(json.loads(encode(KEY, beat())[36:]), seq="1"),
        dict(json.loads(encode(KEY, beat())[36:]), token=True),
        dict(json.loads(encode(KEY, beat())[36:]), port=0),
        dict(json.loads(encode(KEY, beat())[36:]), node=""),
        dict(json.loads(encode(KEY, beat())[36:]), lease="12"),
        dict(json.loads(encode(KEY, beat())[36:]), lease=0),
        dict(json.loads(encode(KEY, beat())[36:]), lease=True),
        [1, 2],
    ],
)
def test_authentic_but_malformed_is_refused(body: Any) -> None:
    """Even a holder of the key cannot crash a peer with a strange body."""
    import hashlib
    import hmac

    raw = json.dumps(body).encode()
    with pytest.raises(BadHeartbeat, match="malformed"):
        decode(KEY, MAGIC + hmac.new(KEY, raw, hashlib.sha256).digest() + raw)


def test_the_key_is_made_once_sealed_and_shared(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "store.sqlite"))
    vault = FileKeyVault.create(tmp_path / "vault.key")
    records = Records(store)
    key = ensure_heartbeat_key(records, vault, 5.0)
    assert len(key) == 32
    assert ensure_heartbeat_key(records, vault, 6.0) == key  # a second node opens the same key
    stored = records.get(SealedSecret, "heartbeat")
    assert stored is not None
    assert key not in stored.record.sealed.encode()
    assert stored.version == 1
    # Another vault cannot open it: the key is only as available as the vault.
    with pytest.raises(VaultError):
        ensure_heartbeat_key(records, FileKeyVault.create(tmp_path / "other.key"), 7.0)
    store.close()
