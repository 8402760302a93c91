"""
What puppetha keeps, as typed records over the versioned items of :class:`IStore`.

Kinds and keys (the same on every backend; ``docs/store.md`` lists them):

==============  ==============================  =============================================
kind            key                             record
==============  ==============================  =============================================
``ca``          CA name (``root``, a certname)  :class:`CARecord` (certificate, sealed key)
``crl``         CA name                         :class:`CRLRecord` (number, signed CRL)
``revoked``     ``<ca>/<serial hex>``           :class:`RevokedRecord`
``claim``       ``<instance id>/<role>``        :class:`EnrollmentClaim`
``node``        certname                        :class:`NodeRecord` (the instance's identity)
``master``      certname                        :class:`MasterRecord`
``class``       scope (``default``, ``sg:..``)  :class:`Classification`
``lease``       lease name                      :class:`LeaseRecord`
``lbnode``      node id (instance id)           :class:`LbNodeRecord`
``secret``      secret name (``heartbeat``)     :class:`SealedSecret`
``loadreport``  node id (instance id)           :class:`LoadReportRecord`
``scale``       ``<token>-<sequence>``          :class:`puppetha.ha.autoscale.ScaleActionRecord`
``scalelog``    ``decisions``                   :class:`puppetha.ha.autoscale.ScaleLogRecord`
==============  ==============================  =============================================
"""

from __future__ import annotations

import base64
import builtins
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

from attrs import asdict, field, fields, frozen

from puppetha.store import COUNTED_KINDS, IGenerations, IStore, Item

R = TypeVar("R", bound="Record")

#: Seconds :meth:`Records.current` keeps records at most, whatever the change counters say.
MAX_HELD = 5.0
T = TypeVar("T")


class Record:
    """Base of the typed records: each knows its kind and how to become an item value."""

    KIND: ClassVar[str]

    def key(self) -> str:
        raise NotImplementedError

    def to_value(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_value(cls: type[R], value: Mapping[str, Any]) -> R:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in value.items() if k in names})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


@frozen
class CARecord(Record):
    """A certificate authority: the root, or a master's intermediate (named by its certname)."""

    KIND: ClassVar[str] = "ca"
    name: str
    certificate_pem: str
    #: The private key as sealed by the configured :class:`puppetha.pki.vault.IKeyVault`,
    #: base64.  Never the clear key.
    sealed_key: str
    #: Name of the issuing CA; the root names itself.
    parent: str
    created_at: float

    def key(self) -> str:
        return self.name


@frozen
class CRLRecord(Record):
    KIND: ClassVar[str] = "crl"
    ca: str
    number: int
    crl_pem: str
    this_update: float
    next_update: float

    def key(self) -> str:
        return self.ca


@frozen
class RevokedRecord(Record):
    KIND: ClassVar[str] = "revoked"
    ca: str
    serial: int
    revoked_at: float
    certname: str = ""
    reason: str = "unspecified"
    #: When the revoked certificate expires (None: unknown, listed for ever).  Once it has
    #: expired and one more CRL period has passed, CRLs no longer list it (RFC 5280, 3.3).
    not_after: float | None = None

    def key(self) -> str:
        return f"{self.ca}/{self.serial:032x}"

    def to_value(self) -> dict[str, Any]:
        # Serials are 128-bit: beyond what JSON numbers keep exactly in every backend.
        value = asdict(self)
        value["serial"] = f"{self.serial:x}"
        return value

    @classmethod
    def from_value(cls, value: Mapping[str, Any]) -> RevokedRecord:
        value = dict(value)
        value["serial"] = int(value["serial"], 16)
        return super().from_value(value)


@frozen
class EnrollmentClaim(Record):
    """
    Written with create-if-absent before any certificate leaves the daemon (an agent's or lb
    node's already issued, in the transaction that records it; a master's before it is signed):
    one enrollment per instance and role, and per key (the holder of the key it names may ask again).
    """

    KIND: ClassVar[str] = "claim"
    instance_id: str
    role: str
    certname: str
    claimed_at: float
    #: ``claimed`` while signing, ``issued`` once the node record exists.
    state: str = "claimed"
    #: SHA-256 (hex) of the CSR's public key (SubjectPublicKeyInfo, DER): the same instance and
    #: role asking again with this key resumes the claim, or gets the same certificate again.
    public_key: str = ""
    #: Once issued: the certificate and its issuing CA, to answer again.
    certificate_pem: str = ""
    issuer: str = ""

    def key(self) -> str:
        return f"{self.instance_id}/{self.role}"


@frozen
class IssuedCertificate:
    """One certificate issued to an instance: what revoking the instance must revoke."""

    serial: int
    #: Name of the issuing CA.
    issuer: str
    role: str
    certname: str
    issued_at: float
    not_after: float

    def to_value(self) -> dict[str, Any]:
        value = asdict(self)
        value["serial"] = f"{self.serial:x}"
        return value

    @classmethod
    def from_value(cls, value: Mapping[str, Any]) -> IssuedCertificate:
        names = {f.name for f in fields(cls)}
        found = {k: v for k, v in value.items() if k in names}
        found["serial"] = int(found["serial"], 16)
        return cls(**found)


def _certificates(value: object) -> tuple[IssuedCertificate, ...]:
    if not isinstance(value, tuple | list):
        raise TypeError("certificates are a sequence")
    return tuple(c if isinstance(c, IssuedCertificate) else IssuedCertificate.from_value(c) for c in value)


@frozen
class NodeRecord(Record):
    """
    An instance's one identity, under its certname.  The top-level fields describe its latest
    certificate; ``certificates`` holds every certificate ever issued to it, in every role,
    so that revoking the instance revokes them all.
    """

    KIND: ClassVar[str] = "node"
    certname: str
    instance_id: str
    role: str
    account: str
    region: str
    private_ip: str
    serial: int
    issuer: str
    certificate_pem: str
    enrolled_at: float
    not_after: float
    revoked_at: float | None = None
    certificates: tuple[IssuedCertificate, ...] = field(default=(), converter=_certificates)

    def __attrs_post_init__(self) -> None:
        # Records of the older shape held only the latest certificate: that one, at least,
        # belongs to the history.
        if not any(c.serial == self.serial and c.issuer == self.issuer for c in self.certificates):
            latest = IssuedCertificate(self.serial, self.issuer, self.role, self.certname,
                                       self.enrolled_at, self.not_after)
            object.__setattr__(self, "certificates", (*self.certificates, latest))

    def key(self) -> str:
        return self.certname

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def roles(self) -> tuple[str, ...]:
        """Every role the instance has held a certificate for, in the order they were issued."""
        return tuple(dict.fromkeys(c.role for c in self.certificates))

    def to_value(self) -> dict[str, Any]:
        value = asdict(self, recurse=False)
        value["serial"] = f"{self.serial:x}"
        value["certificates"] = [c.to_value() for c in self.certificates]
        return value

    @classmethod
    def from_value(cls, value: Mapping[str, Any]) -> NodeRecord:
        value = dict(value)
        value["serial"] = int(value["serial"], 16)
        return super().from_value(value)


@frozen
class MasterRecord(Record):
    KIND: ClassVar[str] = "master"
    certname: str
    address: str
    #: puppetserver's port for the nginx nodes (header-trusting, lb-only).
    port: int
    #: Name of the master's intermediate CA (its certname).
    ca: str
    registered_at: float
    healthy: bool = True
    #: When the primary began to drain it (None: not draining): it gets no new agents and is
    #: out of the upstream; the requests nginx had sent it finish (docs/scaling.md).
    draining_since: float | None = None
    #: The lease token of the drain.
    drain_token: int | None = None
    #: When its requests had ended, or ``drain_timeout`` passed: it is to be terminated.
    drained_at: float | None = None

    def key(self) -> str:
        return self.certname

    @property
    def draining(self) -> bool:
        return self.draining_since is not None


@frozen
class Classification(Record):
    """
    What the ENC answers for one scope: ``default``, ``sg:<group name or id>``,
    ``tag:<key>=<value>`` or ``node:<certname>``.
    """

    KIND: ClassVar[str] = "class"
    scope: str
    classes: dict[str, dict[str, Any]] = field(factory=dict)
    parameters: dict[str, Any] = field(factory=dict)
    environment: str | None = None

    def key(self) -> str:
        return self.scope


@frozen
class LeaseRecord(Record):
    """
    A lease with a fencing token: every change of holder increments ``token``, and anyone
    acting for the lease presents the token so stale holders can be refused.
    """

    KIND: ClassVar[str] = "lease"
    name: str
    holder: str
    token: int
    #: Seconds the holder may act after its last renewal, measured on the holder's own clock.
    duration: float
    renewed_at: float

    def key(self) -> str:
        return self.name


@frozen
class Versioned(Generic[T]):
    """A record together with the version it was read at, for compare-and-set."""

    record: T
    version: int


@frozen
class _Held:
    """Every record of one counted kind, as read at a generation."""

    generation: int
    records: tuple[Versioned[Any], ...]
    by_key: Mapping[str, Versioned[Any]]
    #: When they were read (``Records.now``).
    read_at: float


class Records:
    """
    Typed reads and writes over an :class:`IStore` (synchronous, like the store).

    The few records every enrollment needs (:data:`puppetha.store.COUNTED_KINDS`: CAs, CRLs,
    masters) are kept in memory by :meth:`current` and :meth:`current_get`, read again only
    when the store's change counter of their kind says they changed (one small read instead of
    every record).  A store without counters (:class:`IGenerations`) is simply read every time.
    Whatever the counters say, records held ``max_held`` seconds are read again: a writer that
    does not count (a daemon of an earlier release on a shared DynamoDB table, during an
    upgrade) is seen within that bound.
    """

    def __init__(
        self, store: IStore, *, max_held: float = MAX_HELD, now: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.max_held = max_held
        self.now = now
        self._counted = IGenerations.providedBy(store)
        self._held: dict[str, _Held] = {}
        self._held_lock = threading.Lock()

    def get(self, cls: type[R], key: str) -> Versioned[R] | None:
        item = self.store.get(cls.KIND, key)
        if item is None:
            return None
        return Versioned(cls.from_value(item.value), item.version)

    def list(self, cls: type[R], prefix: str = "") -> list[Versioned[R]]:
        return [
            Versioned(cls.from_value(item.value), item.version)
            for item in self.store.list(cls.KIND, prefix)
        ]

    def current(self, cls: type[R]) -> builtins.list[Versioned[R]]:
        """
        Every record of ``cls``, ordered by key, as :meth:`list` would read it now: of a counted
        kind, from memory unless the kind's generation moved since it was read.
        """
        return list(self._current(cls).records)

    def current_get(self, cls: type[R], key: str) -> Versioned[R] | None:
        """The record ``key`` of ``cls`` as :meth:`get` would read it now (see :meth:`current`)."""
        return self._current(cls).by_key.get(key)

    def _current(self, cls: type[R]) -> _Held:
        if not self._counted or cls.KIND not in COUNTED_KINDS:
            return _hold(0, self.list(cls), 0.0)
        # The generation first, the records after: a write landing between the two leaves
        # newer records under the older generation, which only costs the next call a read.
        # The other order could keep stale records under a current generation.
        generation = self.store.generations()[cls.KIND]  # type: ignore[attr-defined]
        with self._held_lock:
            held = self._held.get(cls.KIND)
        read_at = self.now()
        if held is not None and held.generation == generation and read_at - held.read_at < self.max_held:
            return held
        held = _hold(generation, self.list(cls), read_at)
        with self._held_lock:
            kept = self._held.get(cls.KIND)
            if kept is None or (kept.generation, kept.read_at) <= (generation, read_at):
                self._held[cls.KIND] = held
        return held

    def create(self, record: Record) -> Item:
        return self.store.create(record.KIND, record.key(), record.to_value())

    def replace(self, record: Record, expected_version: int) -> Item:
        return self.store.replace(record.KIND, record.key(), record.to_value(), expected_version)


def _hold(generation: int, records: builtins.list[Versioned[Any]], read_at: float) -> _Held:
    return _Held(generation, tuple(records), {v.record.key(): v for v in records}, read_at)


@frozen
class LbNodeRecord(Record):
    """
    An lb node, registered by its own daemon: where its heartbeats go, and what it last said of
    itself (for ``puppetha status``; the lease, not this record, says who is primary).
    """

    KIND: ClassVar[str] = "lbnode"
    #: The node's EC2 instance id: the target of AssociateAddress when it takes over.
    node: str
    #: Heartbeat address and UDP port.
    address: str
    port: int
    registered_at: float
    #: ``standby``, ``taking-over``, ``primary`` or ``stopped``.
    state: str = "standby"
    #: The highest lease token the node holds or has seen.
    token: int = 0
    #: The nginx generation it serves ("" before its first round).
    generation: str = ""
    #: Its own wall clock when it last wrote this record.
    updated_at: float = 0.0
    #: Seconds since it last heard each peer, by node id, as of ``updated_at``.
    heard: dict[str, float] = field(factory=dict)

    def key(self) -> str:
        return self.node


@frozen
class SealedSecret(Record):
    """A shared secret of the daemons (the heartbeat key), sealed by the vault, base64."""

    KIND: ClassVar[str] = "secret"
    name: str
    sealed: str
    created_at: float

    def key(self) -> str:
        return self.name


@frozen
class LoadReportRecord(Record):
    """
    An lb node's latest view of the masters' load, replaced every sampling interval (``[scale]
    interval``) by its own daemon: the primary merges the fresh ones.  ``loads`` is certname ->
    the fields of :class:`puppetha.ha.scaling.MasterLoad`; readers validate it
    (:func:`puppetha.ha.monitor.report_loads`): another node wrote it.
    """

    KIND: ClassVar[str] = "loadreport"
    node: str
    #: The node's wall clock when it took the sample, and the interval the sample covers.
    at: float
    interval: float
    loads: dict[str, dict[str, Any]] = field(factory=dict)

    def key(self) -> str:
        return self.node
