"""
Heartbeats between the lb daemons: small UDP datagrams, authenticated with HMAC-SHA256 under a
key every lb node shares (kept in the store, sealed by the vault), numbered against replay.

A datagram is ``PHA1`` + 32 bytes of HMAC over the rest + a JSON body::

    {"node": "i-0abc", "boot": 1764250000123456789, "seq": 42, "sent": 1764250001.5,
     "state": "primary", "token": 7, "lease": 1203, "generation": "gen-...", "port": 7946}

``boot`` names the sender's incarnation (its wall clock in nanoseconds when it started) and
``seq`` grows by one per datagram within it: a receiver accepts only a (boot, seq) above the last
it accepted from that node, so a replayed datagram is dropped.  ``sent`` must be within
``stale_after`` of the receiver's wall clock, so a datagram recorded long ago is dropped even by a
receiver that has just restarted.  Forged datagrams fail the HMAC.  None of this decides who is
primary (the lease does): heartbeats make failover fast, and carry a graceful handover at once.

``lease`` (absent when the sender holds no lease) is the store's version of the lease after the
sender's last write of it that it saw succeed: a receiver then knows that version was in the
store before the moment it heard of it, which is all a contender's watch needs (docs/ha.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from attrs import frozen
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from puppetha.pki.vault import IKeyVault
from puppetha.store import AlreadyExists
from puppetha.store.records import Records, SealedSecret, b64, unb64

log = Logger()

MAGIC = b"PHA1"
TAG_BYTES = 32
#: Far above a heartbeat's size, far below a fragmented datagram.
MAX_DATAGRAM = 1200
KEY_BYTES = 32
HEARTBEAT_KEY = "heartbeat"
_KEY_CONTEXT = "puppetha heartbeat key"

#: ``stopping`` is said once, by a primary whose daemon begins to stop, before its services do.
STATES = ("standby", "taking-over", "primary", "stopping", "stopped")


class BadHeartbeat(ValueError):
    """A datagram that is not an authentic, well-formed heartbeat."""


@frozen
class Heartbeat:
    node: str
    boot: int
    seq: int
    #: The sender's wall clock when it sent (staleness only; never decides the lease).
    sent: float
    state: str
    #: The lease token the sender holds or has last seen.
    token: int
    #: The nginx generation the sender serves.
    generation: str
    #: The sender's heartbeat port (its address is the datagram's source).
    port: int
    #: The lease's version after the sender's last successful write of it (None: holds none).
    lease: int | None = None


def encode(key: bytes, heartbeat: Heartbeat) -> bytes:
    fields: dict[str, Any] = {
        "node": heartbeat.node,
        "boot": heartbeat.boot,
        "seq": heartbeat.seq,
        "sent": heartbeat.sent,
        "state": heartbeat.state,
        "token": heartbeat.token,
        "generation": heartbeat.generation,
        "port": heartbeat.port,
    }
    if heartbeat.lease is not None:
        fields["lease"] = heartbeat.lease
    body = json.dumps(
        fields,
        separators=(",", ":"),
        sort_keys=True,
    ).encode("utf-8")
    return MAGIC + hmac.new(key, body, hashlib.sha256).digest() + body


def decode(key: bytes, data: bytes) -> Heartbeat:
    """The authentic heartbeat in ``data``; :class:`BadHeartbeat` otherwise."""
    if len(data) > MAX_DATAGRAM or len(data) < len(MAGIC) + TAG_BYTES + 2:
        raise BadHeartbeat("wrong size")
    if data[: len(MAGIC)] != MAGIC:
        raise BadHeartbeat("not a puppetha heartbeat")
    tag, body = data[len(MAGIC) : len(MAGIC) + TAG_BYTES], data[len(MAGIC) + TAG_BYTES :]
    # Authenticate before parsing anything.
    if not hmac.compare_digest(tag, hmac.new(key, body, hashlib.sha256).digest()):
        raise BadHeartbeat("bad HMAC")
    try:
        value = json.loads(body)
        heartbeat = Heartbeat(
            node=_field(value, "node", str),
            boot=_field(value, "boot", int),
            seq=_field(value, "seq", int),
            sent=float(_field(value, "sent", (int, float))),
            state=_field(value, "state", str),
            token=_field(value, "token", int),
            generation=_field(value, "generation", str),
            port=_field(value, "port", int),
            # Absent from a node that holds no lease, and from versions before it was sent.
            lease=_field(value, "lease", int) if isinstance(value, dict) and "lease" in value else None,
        )
    except (ValueError, TypeError) as e:
        raise BadHeartbeat(f"malformed: {e}") from None
    if heartbeat.state not in STATES or not heartbeat.node or not 0 < heartbeat.port < 65536:
        raise BadHeartbeat("malformed: bad state, node or port")
    if heartbeat.lease is not None and heartbeat.lease < 1:
        raise BadHeartbeat("malformed: bad lease version")
    return heartbeat


def _field(value: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, dict) or name not in value:
        raise ValueError(f"no {name}")
    item = value[name]
    if not isinstance(item, kind) or isinstance(item, bool):
        raise ValueError(f"bad {name}")
    return item


@frozen
class Peer:
    """What a node knows of a peer from its last accepted heartbeat."""

    heartbeat: Heartbeat
    address: str
    #: Receiver's monotonic time of that heartbeat.
    heard: float
    #: Receiver's monotonic time of the first heartbeat that named the same ``lease`` version.
    lease_heard: float | None = None


def verdict(previous: Peer | None, heartbeat: Heartbeat, wall_now: float, stale_after: float) -> str | None:
    """Why an authentic heartbeat is ignored (``None``: accept it).  Pure."""
    if abs(wall_now - heartbeat.sent) > stale_after:
        return "stale"
    if previous is not None:
        before = previous.heartbeat
        if (heartbeat.boot, heartbeat.seq) <= (before.boot, before.seq):
            return "replayed"
    return None


class HeartbeatProtocol(DatagramProtocol):
    """
    Sends this node's heartbeat to its peers and keeps the last authentic one of each.
    ``on_heartbeat`` is called with each accepted heartbeat (the failover service listens for a
    holder that says it released the lease).
    """

    def __init__(
        self,
        *,
        node: str,
        key: bytes,
        port: int,
        monotonic: Callable[[], float],
        wall: Callable[[], float],
        stale_after: float = 5.0,
        on_heartbeat: Callable[[Heartbeat], object] = lambda heartbeat: None,
        boot: int | None = None,
    ) -> None:
        if len(key) < 16:
            raise ValueError("the heartbeat key is too short")
        self.node = node
        self._key = key
        self.port = port
        self.monotonic = monotonic
        self.wall = wall
        self.stale_after = stale_after
        self.on_heartbeat = on_heartbeat
        self.boot = boot if boot is not None else int(wall() * 1e9)
        self._seq = 0
        self.peers: dict[str, Peer] = {}
        #: Datagrams dropped, by reason (for tests and status).
        self.dropped: dict[str, int] = {}

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            heartbeat = decode(self._key, datagram)
        except BadHeartbeat as e:
            self._drop(str(e).partition(":")[0], addr)
            return
        if heartbeat.node == self.node:
            self._drop("own node id", addr)
            return
        reason = verdict(self.peers.get(heartbeat.node), heartbeat, self.wall(), self.stale_after)
        if reason is not None:
            self._drop(reason, addr)
            return
        now = self.monotonic()
        previous = self.peers.get(heartbeat.node)
        lease_heard = None if heartbeat.lease is None else now
        same_version = previous is not None and previous.heartbeat.lease == heartbeat.lease
        if same_version and previous is not None and heartbeat.lease is not None:
            lease_heard = previous.lease_heard
        self.peers[heartbeat.node] = Peer(heartbeat, str(addr[0]), now, lease_heard)
        self.on_heartbeat(heartbeat)

    def _drop(self, reason: str, addr: Any) -> None:
        count = self.dropped.get(reason, 0)
        self.dropped[reason] = count + 1
        # Once per reason, then every thousandth: a flood must not flood the log too.
        if count % 1000 == 0:
            log.warn("ignored a heartbeat from {source}: {reason}", source=str(addr[0]), reason=reason)

    def heard(self, node: str) -> float | None:
        peer = self.peers.get(node)
        return None if peer is None else peer.heard

    def lease_version_heard(self, node: str) -> tuple[int, float] | None:
        """
        The lease version ``node`` last said it wrote, and when that was first heard (local
        monotonic clock): the version was in the store before then.  None: it named none.
        """
        peer = self.peers.get(node)
        if peer is None or peer.heartbeat.lease is None or peer.lease_heard is None:
            return None
        return peer.heartbeat.lease, peer.lease_heard

    def send(self, targets: Iterable[tuple[str, int]], *, state: str, token: int, generation: str,
             lease: int | None = None) -> None:
        if self.transport is None:
            return
        self._seq += 1
        datagram = encode(
            self._key,
            Heartbeat(
                self.node, self.boot, self._seq, self.wall(), state, token, generation, self.port, lease
            ),
        )
        for host, port in targets:
            try:
                self.transport.write(datagram, (host, port))
            except OSError as e:
                # An unreachable peer is what failover is for; never stop the others' heartbeats.
                log.debug("heartbeat to {host}:{port} failed: {error}", host=host, port=port, error=str(e))


def ensure_heartbeat_key(records: Records, vault: IKeyVault, now: float) -> bytes:
    """
    The fleet's heartbeat key: made, sealed and stored by the first lb node that starts (a
    create-if-absent, so concurrent first starts agree), opened by every later one.  Blocking.
    """
    existing = records.get(SealedSecret, HEARTBEAT_KEY)
    if existing is None:
        key = os.urandom(KEY_BYTES)
        try:
            records.create(SealedSecret(HEARTBEAT_KEY, b64(vault.seal(key, _KEY_CONTEXT)), now))
            return key
        except AlreadyExists:
            existing = records.get(SealedSecret, HEARTBEAT_KEY)
            if existing is None:  # pragma: no cover - created and deleted between two reads
                raise
    return vault.open(unb64(existing.record.sealed), _KEY_CONTEXT)
