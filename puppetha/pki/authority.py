"""
The stateful certificate authority: the root, one intermediate per master, their CRLs, all in
the store, with every CA key sealed by the vault.

:class:`CertificateAuthority` is synchronous (store and crypto block): callers run it on a
thread pool.  Writes that must agree with each other go through compare-and-set or one store
transaction, so any number of daemons can share a store:

- a CA and its first CRL are created together, create-if-absent;
- a revocation record and the CRL that lists it are written in one transaction that also
  checks the CRL is still at the version read, so CRL numbers never repeat or go backwards;
- re-signing a CRL that is about to expire is a compare-and-set on the ``crl`` record.

:class:`CRLRefresher` is the timer that keeps every CRL well inside its ``nextUpdate``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from puppetha.pki import bundles
from puppetha.pki.certs import Usage, create_intermediate_ca, create_root_ca, issue_leaf
from puppetha.pki.crl import Revocation, build_crl, check_reason
from puppetha.pki.keys import KeyType, PrivateKey, load_private_key, private_key_pem, same_public_key
from puppetha.pki.names import check_certname
from puppetha.pki.vault import IKeyVault
from puppetha.repeat import Repeating, RepeatingService
from puppetha.store import Create, Replace, TransactionConflict, VersionConflict, Write
from puppetha.store.records import (
    CARecord,
    CRLRecord,
    Records,
    RevokedRecord,
    Versioned,
    b64,
    unb64,
)

log = Logger()

#: The root CA's record name (a master can therefore never be called ``root``).
ROOT = "root"
#: The intermediate CA that signs lb nodes' certificates and nothing else: the one CA a
#: master's puppetserver trusts (docs/front.md).  Reserved like :data:`ROOT`.
LB_CA = "lb"
#: CA names no master may take.
RESERVED_CA_NAMES = frozenset({ROOT, LB_CA})

_MAX_SERIAL = 1 << 159


class AuthorityError(Exception):
    """Base of the authority's refusals."""


class UnknownCA(AuthorityError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no CA named {name!r}")
        self.name = name


class CAExists(AuthorityError):
    def __init__(self, name: str) -> None:
        super().__init__(f"CA {name!r} already exists")
        self.name = name


class StoreContention(AuthorityError):
    """Concurrent writers kept changing a CRL faster than this one could follow."""


@frozen
class ToRevoke:
    """A certificate to revoke: its issuing CA and serial (and, for the records, whose it is)."""

    ca: str
    serial: int
    certname: str = ""
    #: When the certificate expires (None: unknown, listed for ever).
    not_after: float | None = None


#: Parsed CA certificates kept at most (a fleet has one CA per master, and a few more).
_MAX_PARSED = 4096


def crls_due(crls: Iterable[CRLRecord], now: float, margin: timedelta) -> list[str]:
    """Names of the CAs whose CRL's ``next_update`` is within ``margin`` of ``now`` (or past)."""
    limit = now + margin.total_seconds()
    return sorted(crl.ca for crl in crls if crl.next_update <= limit)


def still_listed(
    revoked: Iterable[RevokedRecord], now: float, crl_lifetime: timedelta
) -> list[RevokedRecord]:
    """
    The revocations a CRL signed at ``now`` lists: all but those whose certificate expired more
    than one CRL period ago, so each still appears on a CRL issued after its expiry and CRLs do
    not grow for ever.
    """
    horizon = now - crl_lifetime.total_seconds()
    return [r for r in revoked if r.not_after is None or r.not_after > horizon]


def master_ca_subject(certname: str) -> x509.Name:
    # Distinct from the master's own server certificate (CN=certname alone), so no chain
    # builder mistakes one for the other.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Puppet CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, certname),
        ]
    )


def _at(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


class CertificateAuthority:
    """
    The CAs in ``records``.  ``key_type`` is used for every new CA key; ``now`` returns POSIX
    seconds.  ``ca_lifetime`` bounds the root and each intermediate, ``cert_lifetime`` each leaf
    (never beyond its CA), ``crl_lifetime`` each CRL from the time it is signed.
    """

    def __init__(
        self,
        records: Records,
        vault: IKeyVault,
        *,
        key_type: KeyType,
        now: Callable[[], float],
        ca_lifetime: timedelta,
        cert_lifetime: timedelta,
        crl_lifetime: timedelta,
        max_attempts: int = 20,
    ) -> None:
        self.records = records
        self.vault = vault
        self.key_type = key_type
        self.now = now
        self.ca_lifetime = ca_lifetime
        self.cert_lifetime = cert_lifetime
        self.crl_lifetime = crl_lifetime
        self.max_attempts = max_attempts
        # Opened CA keys, by CA name; the clear keys exist only here, in memory.
        self._keys: dict[str, PrivateKey] = {}
        self._keys_lock = threading.Lock()
        # Parsed CA certificates, by their PEM: every enrollment reads the chain of its issuer,
        # and a record that changes brings another PEM, so an entry can never be stale.
        self._parsed: dict[str, x509.Certificate] = {}

    # -- reading

    # CA and CRL records are read through Records.current*: from memory while the store's change
    # counter of their kind stands still, so an enrollment reads what changed, not everything.

    def ca(self, name: str) -> CARecord:
        found = self.records.current_get(CARecord, name)
        if found is None:
            raise UnknownCA(name)
        return found.record

    def root(self) -> CARecord:
        return self.ca(ROOT)

    def certificate(self, name: str) -> x509.Certificate:
        return self._parse(self.ca(name).certificate_pem)

    def crl(self, name: str) -> CRLRecord:
        found = self.records.current_get(CRLRecord, name)
        if found is None:
            raise UnknownCA(name)
        return found.record

    def ca_chain_pem(self, ca_name: str) -> bytes:
        """``ca_name``'s certificate, then its issuers up to the root."""
        return bundles.certificates_pem(self._chain(ca_name))

    def crl_chain_pem(self, ca_names: Sequence[str] | None = None) -> bytes:
        """The CRLs of ``ca_names`` (default: every CA, root included), root first."""
        crls = {v.record.ca: v.record for v in self.records.current(CRLRecord)}
        names = sorted(crls, key=lambda n: (n != ROOT, n)) if ca_names is None else list(ca_names)
        missing = [name for name in names if name not in crls]
        if missing:
            raise UnknownCA(missing[0])
        return "".join(crls[name].crl_pem for name in names).encode("ascii")

    def ca_bundle_pem(self) -> bytes:
        """Every CA certificate, root first: what nginx trusts for client certificates."""
        cas = sorted(
            (v.record for v in self.records.current(CARecord)), key=lambda r: (r.name != ROOT, r.name)
        )
        return "".join(ca.certificate_pem for ca in cas).encode("ascii")

    # -- creating CAs

    def init_root(self, common_name: str) -> CARecord:
        """Create the root CA and its first CRL; :class:`CAExists` if there is one."""
        key = self.key_type.generate()
        cert = create_root_ca(key, common_name, _at(self.now()), self.ca_lifetime)
        record = self._create_ca(ROOT, cert, key, parent=ROOT)
        log.info("created root CA {common_name}", common_name=common_name)
        return record

    def ensure_root(self, common_name: str) -> CARecord:
        """The root CA, created first if the store has none (safe to race with other daemons)."""
        found = self.records.current_get(CARecord, ROOT)
        if found is not None:
            return found.record
        try:
            return self.init_root(common_name)
        except CAExists:
            return self.root()

    def create_master_ca(self, certname: str) -> CARecord:
        """A new intermediate CA for master ``certname``, signed by the root, with its first CRL."""
        check_certname(certname)
        if certname in RESERVED_CA_NAMES:
            raise AuthorityError(f"a master cannot be called {certname!r}")
        record = self._create_intermediate(certname)
        log.info("created CA for master {certname}", certname=certname)
        return record

    def ensure_ca(self, name: str) -> CARecord:
        """
        Intermediate CA ``name`` under the root, created first (with its first CRL) if the store
        has none; safe to race with other daemons: the loser reads the winner's.
        """
        check_certname(name)
        if name == ROOT:
            raise AuthorityError("the root is made with init_root, not ensure_ca")
        found = self.records.current_get(CARecord, name)
        if found is not None:
            return found.record
        try:
            record = self._create_intermediate(name)
        except CAExists:
            return self.ca(name)
        log.info("created CA {name}", name=name)
        return record

    def _create_intermediate(self, name: str) -> CARecord:
        key = self.key_type.generate()
        cert = create_intermediate_ca(
            key.public_key(),
            master_ca_subject(name),
            issuer_cert=self.certificate(ROOT),
            issuer_key=self._key(ROOT),
            now=_at(self.now()),
            lifetime=self.ca_lifetime,
        )
        return self._create_ca(name, cert, key, parent=ROOT)

    def _create_ca(self, name: str, cert: x509.Certificate, key: PrivateKey, parent: str) -> CARecord:
        record = CARecord(
            name=name,
            certificate_pem=_pem(cert),
            sealed_key=b64(self.vault.seal(private_key_pem(key), name)),
            parent=parent,
            created_at=self.now(),
        )
        crl = self._sign_crl(name, cert, key, [], number=1)
        try:
            self.records.store.transact(
                [
                    Create(CARecord.KIND, record.key(), record.to_value()),
                    Create(CRLRecord.KIND, crl.key(), crl.to_value()),
                ]
            )
        except TransactionConflict:
            raise CAExists(name) from None
        with self._keys_lock:
            self._keys[name] = key
        return record

    # -- issuing and revoking

    def issue(
        self,
        ca_name: str,
        csr: x509.CertificateSigningRequest,
        *,
        common_name: str,
        sans: Sequence[str] = (),
        usage: Usage = Usage.CLIENT,
        extensions: Sequence[x509.UnrecognizedExtension] = (),
    ) -> x509.Certificate:
        """
        Sign a leaf with CA ``ca_name`` for the public key of ``csr`` (which the caller has
        already put through :func:`puppetha.pki.csr.check_csr`).
        """
        cert = issue_leaf(
            csr,
            common_name=common_name,
            sans=sans,
            usage=usage,
            issuer_cert=self.certificate(ca_name),
            issuer_key=self._key(ca_name),
            now=_at(self.now()),
            lifetime=self.cert_lifetime,
            extensions=extensions,
        )
        log.info(
            "issued {usage} certificate for {certname} by {ca}, serial {serial:x}",
            usage=usage.value,
            certname=common_name,
            ca=ca_name,
            serial=cert.serial_number,
        )
        return cert

    def revoke(
        self,
        ca_name: str,
        serial: int,
        certname: str = "",
        reason: str = "unspecified",
        not_after: float | None = None,
    ) -> CRLRecord:
        """
        Record ``serial`` (issued by ``ca_name``) as revoked and publish the CA's next CRL.
        Revoking a serial again keeps the first record and still re-signs.  Returns the new CRL.
        """
        crls = self.revoke_all([ToRevoke(ca_name, serial, certname, not_after)], reason)
        return crls[ca_name]

    def revoke_all(
        self,
        revocations: Sequence[ToRevoke],
        reason: str = "unspecified",
        also: Callable[[], Sequence[Write]] = lambda: (),
    ) -> dict[str, CRLRecord]:
        """
        Record every one of ``revocations`` and publish the next CRL of each CA concerned, with
        the writes ``also`` returns (read again on each attempt), all in one store transaction:
        either every certificate is revoked and the rest written, or nothing is.  Returns the new
        CRLs by CA name.
        """
        check_reason(reason)
        by_ca: dict[str, list[ToRevoke]] = {}
        for r in revocations:
            if not 0 < r.serial < _MAX_SERIAL:
                raise ValueError(f"{r.serial} is not a certificate serial number")
            by_ca.setdefault(r.ca, []).append(r)
        signers = {name: (self.certificate(name), self._key(name)) for name in by_ca}
        for _ in range(self.max_attempts):
            now = self.now()
            writes: list[Write] = []
            crls: dict[str, CRLRecord] = {}
            for name, wanted in sorted(by_ca.items()):
                current = self._crl_record(name)
                revoked = self._revoked(name)
                for r in wanted:
                    if any(known.serial == r.serial for known in revoked):
                        continue
                    record = RevokedRecord(
                        ca=name, serial=r.serial, revoked_at=now, certname=r.certname, reason=reason,
                        not_after=r.not_after,
                    )
                    revoked.append(record)
                    writes.append(Create(RevokedRecord.KIND, record.key(), record.to_value()))
                cert, key = signers[name]
                crl = self._sign_crl(name, cert, key, revoked, number=current.record.number + 1)
                writes.append(Replace(CRLRecord.KIND, crl.key(), crl.to_value(), current.version))
                crls[name] = crl
            writes.extend(also())
            try:
                self.records.store.transact(writes)
            except TransactionConflict:
                continue
            for r in revocations:
                log.info(
                    "revoked serial {serial:x} ({certname}) of {ca}, CRL {number}",
                    serial=r.serial,
                    certname=r.certname,
                    ca=r.ca,
                    number=crls[r.ca].number,
                )
            return crls
        raise StoreContention(
            f"could not publish the CRLs of {', '.join(sorted(by_ca))} after {self.max_attempts} tries"
        )

    def refresh_crls(self, margin: timedelta) -> list[str]:
        """
        Re-sign, with the next number, every CRL whose ``next_update`` is within ``margin`` of
        now.  Returns the CAs whose CRL this call re-signed (another daemon may have done some).
        """
        re_signed = []
        for name in crls_due((v.record for v in self.records.list(CRLRecord)), self.now(), margin):
            if self._refresh_crl(name, margin):
                re_signed.append(name)
        return re_signed

    def _refresh_crl(self, name: str, margin: timedelta) -> bool:
        cert = self.certificate(name)
        key = self._key(name)
        for _ in range(self.max_attempts):
            current = self._crl_record(name)
            if not crls_due([current.record], self.now(), margin):
                return False
            crl = self._sign_crl(name, cert, key, self._revoked(name), number=current.record.number + 1)
            try:
                self.records.replace(crl, current.version)
            except VersionConflict:
                continue
            log.info("re-signed CRL {number} of {ca}", number=crl.number, ca=name)
            return True
        raise StoreContention(f"could not re-sign the CRL of {name!r} after {self.max_attempts} tries")

    # -- helpers

    def _chain(self, ca_name: str) -> list[x509.Certificate]:
        cas = {v.record.name: v.record for v in self.records.current(CARecord)}
        if ca_name not in cas:
            raise UnknownCA(ca_name)
        names = bundles.chain_names(ca_name, {name: ca.parent for name, ca in cas.items()})
        return [self._parse(cas[name].certificate_pem) for name in names]

    def _parse(self, pem: str) -> x509.Certificate:
        cert = self._parsed.get(pem)
        if cert is None:
            cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
            if len(self._parsed) >= _MAX_PARSED:
                self._parsed.clear()  # CAs removed over a long life; the ones in use come back
            self._parsed[pem] = cert
        return cert

    def _crl_record(self, name: str) -> Versioned[CRLRecord]:
        found = self.records.get(CRLRecord, name)
        if found is None:
            raise UnknownCA(name)
        return found

    def _revoked(self, ca_name: str) -> list[RevokedRecord]:
        return [v.record for v in self.records.list(RevokedRecord, prefix=f"{ca_name}/")]

    def _sign_crl(
        self,
        name: str,
        cert: x509.Certificate,
        key: PrivateKey,
        revoked: Sequence[RevokedRecord],
        number: int,
    ) -> CRLRecord:
        crl = build_crl(
            cert,
            key,
            [
                Revocation(r.serial, _at(r.revoked_at), r.reason)
                for r in still_listed(revoked, self.now(), self.crl_lifetime)
            ],
            number=number,
            now=_at(self.now()),
            lifetime=self.crl_lifetime,
        )
        return CRLRecord(
            ca=name,
            number=number,
            crl_pem=crl.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            this_update=crl.last_update_utc.timestamp(),
            next_update=crl.next_update_utc.timestamp() if crl.next_update_utc else 0.0,
        )

    def check_key(self, name: str = ROOT) -> None:
        """
        Open CA ``name``'s sealed key now (and keep it in memory): a daemon with the wrong vault
        key learns it at start-up, not at its first enrollment.  Raises :class:`VaultError` or
        :class:`AuthorityError`.
        """
        self._key(name)

    def _key(self, name: str) -> PrivateKey:
        with self._keys_lock:
            cached = self._keys.get(name)
        if cached is not None:
            return cached
        record = self.ca(name)
        key = load_private_key(self.vault.open(unb64(record.sealed_key), name))
        cert = self._parse(record.certificate_pem)
        if not same_public_key(key.public_key(), cert.public_key()):  # type: ignore[arg-type]
            raise AuthorityError(f"the sealed key of CA {name!r} does not match its certificate")
        with self._keys_lock:
            self._keys[name] = key
        return key


class CRLRefresher(RepeatingService):
    """
    Every ``interval``, asks the authority (through ``authority_call``, which returns a
    Deferred so it can run on a thread pool) to re-sign the CRLs that expire within
    ``margin``.  ``interval`` must be shorter than ``margin`` so no CRL can lapse between two
    runs; a failed run is logged and the next one tries again.
    """

    def __init__(
        self,
        authority_call: Callable[[timedelta], Deferred[list[str]]],
        clock: IReactorTime,
        interval: timedelta,
        margin: timedelta,
    ) -> None:
        if not timedelta(0) < interval < margin:
            raise ValueError("the CRL refresh interval must be positive and shorter than the margin")
        self.authority_call = authority_call
        self.clock = clock
        self.interval = interval
        self.margin = margin
        self._repeating = Repeating(self._refresh, clock, interval.total_seconds())

    def _refresh(self) -> Deferred[None]:
        d = maybeDeferred(self.authority_call, self.margin)

        def done(names: list[str]) -> None:
            if names:
                log.info("re-signed CRLs of {cas}", cas=names)

        def failed(failure: Failure) -> None:
            log.failure("CRL refresh failed", failure)

        return d.addCallbacks(done, failed)
