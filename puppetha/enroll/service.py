"""
The enrollment orchestrator: prove the instance's identity, decide, claim, sign, record.

Order matters for the security of the whole fleet:

1. verify the identity document (CPU, on the pool) and refuse strangers before any AWS call;
2. DescribeInstances (on the pool, batched per region by :class:`DescribeBatcher`);
3. decide with the pure :func:`puppetha.enroll.policy.decide`;
4. create the :class:`EnrollmentClaim` (create-if-absent) *before anything is signed*, so of two
   racing requests exactly one goes on;
5. check the CSR, sign, and record the node (and a master's registration) while marking the
   claim issued, in one store transaction.

If anything fails after step 4 the claim (and a master CA made for it) is removed again, so a
corrected retry can succeed and nothing stays issued or stored.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from puppetha.aws.cloud import CloudError, ICloud, InstanceInfo
from puppetha.aws.identity import IdentityDocument, IdentityRefused, TrustStore, verify_identity
from puppetha.enroll.policy import (
    MASTER_PORT,
    ROLES,
    Admit,
    EnrollmentPolicy,
    Refuse,
    decide,
    precheck,
)
from puppetha.ha.nginx import FrontPorts, MasterBackend, master_ports
from puppetha.pki.authority import LB_CA, RESERVED_CA_NAMES, ROOT, CertificateAuthority
from puppetha.pki.certs import PP_INSTANCE_ID, puppet_extension
from puppetha.pki.csr import CSRPolicy, CSRRefused, check_csr
from puppetha.pki.keys import KeyType
from puppetha.store import (
    AlreadyExists,
    Create,
    Delete,
    Replace,
    StoreError,
    StoreUnavailable,
    TransactionConflict,
    VersionConflict,
    Write,
)
from puppetha.store.records import CARecord, CRLRecord, EnrollmentClaim, MasterRecord, NodeRecord, Records
from puppetha.threads import Blocking

log = Logger()

#: Seconds a client is told to wait before retrying a 503.
DEFAULT_RETRY_AFTER = 10

#: A claim still ``claimed`` this long after it was made belongs to an attempt that died
#: (daemon killed mid-way); a new attempt may take it over (compare-and-set on its version).
DEFAULT_STALE_CLAIM = 600.0


class EnrollmentRefused(Exception):
    """An enrollment refused with an HTTP status and the API's error code (``docs/api.md``)."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @classmethod
    def of(cls, refusal: Refuse) -> EnrollmentRefused:
        return cls(refusal.status, refusal.code, refusal.message)


@frozen
class EnrollmentRequest:
    """What an instance sends, already checked for shape (not for truth)."""

    role: str
    document: bytes
    signature: str
    csr: bytes


@frozen
class IssuedEnrollment:
    """What an admitted instance gets back (the 200 answer of ``POST /v1/enroll``)."""

    certname: str
    role: str
    certificate: str
    ca_chain: str
    crl_chain: str
    server: str
    test_server: str
    #: A master's own intermediate CA certificate; empty for other roles.
    ca_certificate: str = ""
    #: Masters only: the lb CA then the root (the lb CA is puppetserver's ``ssl-ca-cert``) ...
    lb_ca_chain: str = ""
    #: ... and the lb CA's CRL (puppetserver's ``ssl-crl-path``).
    lb_crl: str = ""

    def to_json(self) -> dict[str, str]:
        answer = {
            "certname": self.certname,
            "role": self.role,
            "certificate": self.certificate,
            "ca_chain": self.ca_chain,
            "crl_chain": self.crl_chain,
            "server": self.server,
            "test_server": self.test_server,
        }
        if self.ca_certificate:
            answer["ca_certificate"] = self.ca_certificate
        if self.lb_ca_chain:
            answer["lb_ca_chain"] = self.lb_ca_chain
            answer["lb_crl"] = self.lb_crl
        return answer


class DescribeBatcher:
    """
    Gathers the DescribeInstances lookups of concurrent enrollments in one region for
    ``window`` seconds (or until ``max_batch`` ids) and asks AWS once for all of them.
    """

    def __init__(
        self,
        cloud: Blocking[ICloud],
        clock: IReactorTime,
        window: float = 0.01,
        max_batch: int = 100,
    ) -> None:
        if window < 0 or max_batch < 1:
            raise ValueError("window must be >= 0 and max_batch >= 1")
        self.cloud = cloud
        self.clock = clock
        self.window = window
        self.max_batch = max_batch
        self._waiting: dict[str, dict[str, list[Deferred[InstanceInfo | None]]]] = {}
        self._timers: dict[str, IDelayedCall] = {}
        #: How many DescribeInstances calls were made (for tests and the benchmark).
        self.calls = 0

    def describe(self, region: str, instance_id: str) -> Deferred[InstanceInfo | None]:
        d: Deferred[InstanceInfo | None] = Deferred()
        batch = self._waiting.setdefault(region, {})
        batch.setdefault(instance_id, []).append(d)
        if len(batch) >= self.max_batch:
            self._flush(region)
        elif region not in self._timers:
            self._timers[region] = self.clock.callLater(self.window, self._flush, region)
        return d

    def _flush(self, region: str) -> None:
        timer = self._timers.pop(region, None)
        if timer is not None and timer.active():
            timer.cancel()
        batch = self._waiting.pop(region, {})
        if not batch:
            return
        self.calls += 1
        asked = self.cloud.call(self.cloud.target.describe_instances, region, sorted(batch))

        def answered(found: dict[str, InstanceInfo]) -> None:
            for instance_id, waiters in batch.items():
                for waiter in waiters:
                    waiter.callback(found.get(instance_id))

        def failed(failure: Failure) -> None:
            for waiters in batch.values():
                for waiter in waiters:
                    waiter.errback(failure)

        asked.addCallbacks(answered, failed)


@frozen
class _Outcome:
    """What the signing step made, so a failure after it can be undone."""

    issued: IssuedEnrollment
    serial: int
    issuer: str


class Enrollment:
    """
    The enrollment service.  Blocking collaborators arrive wrapped in
    :class:`puppetha.threads.Blocking` (bounded pools); ``clock`` gives the time and runs the
    DescribeInstances batch timer.  ``allowed_keys`` are the key types a CSR may carry.
    ``front_ports`` are the lb nodes' ports (``[lb]``): an agent's ``test_server`` is its
    issuing master's own port on the front, numbered as the lb nodes number them.
    """

    def __init__(
        self,
        *,
        policy: EnrollmentPolicy,
        trust: TrustStore,
        records: Blocking[Records],
        authority: Blocking[CertificateAuthority],
        cloud: Blocking[ICloud],
        clock: IReactorTime,
        allowed_keys: Iterable[KeyType] = tuple(KeyType),
        batch_window: float = 0.01,
        retry_after: int = DEFAULT_RETRY_AFTER,
        stale_claim: float = DEFAULT_STALE_CLAIM,
        choose: Callable[[Sequence[str]], str] | None = None,
        on_master: Callable[[], object] = lambda: None,
        front_ports: FrontPorts | None = None,
    ) -> None:
        self.policy = policy
        self.trust = trust
        self.records = records
        self.authority = authority
        self.clock = clock
        self.allowed_keys = frozenset(allowed_keys)
        self.retry_after = retry_after
        self.stale_claim = stale_claim
        self.batcher = DescribeBatcher(cloud, clock, batch_window)
        self.front_ports = front_ports or FrontPorts()
        # Least-recently-used spread over masters; ties broken at random unless a test chooses.
        self._choose = choose or random.choice
        # Called once a master is registered: an lb role on this host re-renders nginx at once.
        self.on_master = on_master
        self._last_used: dict[str, int] = {}
        self._uses = 0

    # -- the enrollment

    def enroll(self, request: EnrollmentRequest, source: str | None) -> Deferred[IssuedEnrollment]:
        """The issued enrollment, or a failure with :class:`EnrollmentRefused`."""
        return Deferred.fromCoroutine(self._enroll(request, source))

    async def _enroll(self, request: EnrollmentRequest, source: str | None) -> IssuedEnrollment:
        try:
            return await self._admit_and_issue(request, source)
        except EnrollmentRefused as refusal:
            log.info(
                "refused enrollment as {role} from {source}: {code}: {reason}",
                role=request.role,
                source=source,
                code=refusal.code,
                reason=refusal.message,
            )
            raise
        except StoreUnavailable as e:
            log.warn("enrollment failed, store unavailable: {error}", error=str(e))
            raise self._unavailable("store-unavailable", "the store cannot be reached") from e
        except CloudError as e:
            log.warn("enrollment failed, AWS unavailable: {error}", error=str(e))
            raise self._unavailable("aws-unavailable", "AWS cannot be asked about the instance") from e

    def _unavailable(self, code: str, message: str) -> EnrollmentRefused:
        return EnrollmentRefused(503, code, f"{message}; try again later", retry_after=self.retry_after)

    async def _admit_and_issue(self, request: EnrollmentRequest, source: str | None) -> IssuedEnrollment:
        if request.role not in ROLES:
            raise EnrollmentRefused(400, "unknown-role", f"role must be one of {', '.join(ROLES)}")
        identity = await self._verify(request)
        early = precheck(identity, self.clock.seconds(), self.policy)
        if early is not None:
            raise EnrollmentRefused.of(early)
        instance = await self.batcher.describe(identity.region, identity.instance_id)
        decision = decide(
            request.role, identity, instance, source=source, now=self.clock.seconds(), policy=self.policy
        )
        if isinstance(decision, Refuse):
            raise EnrollmentRefused.of(decision)
        issuer = await self._issuer_for(decision)
        claim = await self.records.call(self._claim, decision)
        try:
            outcome: _Outcome = await self.authority.call(self._issue, decision, request.csr, issuer, claim)
        except BaseException:
            failure = Failure()
            await self._compensate(decision, claim, issuer)
            failure.raiseException()
        log.info(
            "enrolled {certname} as {role}: instance {instance_id}, account {account}, {region}, "
            "issued by {issuer}, serial {serial:x}",
            certname=decision.certname,
            role=decision.role,
            instance_id=decision.instance_id,
            account=decision.account,
            region=decision.region,
            issuer=outcome.issuer,
            serial=outcome.serial,
        )
        if decision.role == "master":
            # The master is recorded now: a failed announcement must not cost it its answer (a
            # retry would be 409); the lb nodes still find it on their next round.
            maybeDeferred(self.on_master).addErrback(
                lambda failure: log.failure(
                    "could not announce the new master {certname}", failure, certname=decision.certname
                )
            )
        return outcome.issued

    async def _verify(self, request: EnrollmentRequest) -> IdentityDocument:
        try:
            identity: IdentityDocument = await self.authority.call(
                verify_identity, request.document, request.signature, self.trust
            )
        except IdentityRefused as e:
            raise EnrollmentRefused(403, f"identity-{e.code}", e.message) from None
        return identity

    async def _issuer_for(self, admit: Admit) -> str:
        """The CA that signs: a healthy master's for agents, a new one for masters, the lb CA for lb."""
        if admit.role == "master":
            return admit.certname
        if admit.role == "lb":
            return LB_CA
        healthy: list[str] = await self.records.call(_healthy_master_cas, self.records.target)
        if not healthy:
            raise EnrollmentRefused(
                503, "no-master", "no healthy master is registered yet; try again later",
                retry_after=self.retry_after,
            )
        return self._spread(healthy)

    def _spread(self, cas: Sequence[str]) -> str:
        oldest = min(self._last_used.get(ca, 0) for ca in cas)
        chosen = self._choose(sorted(ca for ca in cas if self._last_used.get(ca, 0) == oldest))
        self._uses += 1
        self._last_used[chosen] = self._uses
        return chosen

    # -- blocking steps (on the pool)

    def _claim(self, admit: Admit) -> int:
        """Create the claim; returns its version.  ``EnrollmentRefused`` 409 if it exists."""
        records = self.records.target
        now = self.clock.seconds()
        claim = EnrollmentClaim(
            instance_id=admit.instance_id, role=admit.role, certname=admit.certname, claimed_at=now
        )
        try:
            return records.create(claim).version
        except AlreadyExists:
            pass
        existing = records.get(EnrollmentClaim, claim.key())
        if (
            existing is not None
            and existing.record.state == "claimed"
            and now - existing.record.claimed_at > self.stale_claim
        ):
            try:
                version = records.replace(claim, existing.version).version
            except VersionConflict:
                pass
            else:
                log.warn("took over the stale enrollment claim {claim}", claim=claim.key())
                return version
        raise EnrollmentRefused(
            409, "already-enrolled",
            f"instance {admit.instance_id} has already enrolled as {admit.role} "
            "(an operator can allow a new enrollment with `puppetha node reset`)",
        )

    def _issue(self, admit: Admit, csr_pem: bytes, issuer: str, claim_version: int) -> _Outcome:
        try:
            csr = check_csr(
                csr_pem,
                CSRPolicy(
                    certname=admit.certname,
                    allowed_sans=frozenset(admit.sans),
                    key_types=self.allowed_keys,
                    expected_extensions={PP_INSTANCE_ID.dotted_string: admit.instance_id},
                ),
            )
        except CSRRefused as e:
            raise EnrollmentRefused(400, f"csr-{e.code}", e.message) from None
        authority = self.authority.target
        records = self.records.target
        # Made by the first enrollment of any kind (once; racing daemons agree), so that every
        # crl_chain below holds its CRL: agents check it on the lb node's chain, masters trust it.
        authority.ensure_ca(LB_CA)
        ca_certificate = ""
        if admit.role == "master":
            # A master enrolling again (after a reset) keeps its CA: the agents it signed stay valid.
            existing = records.get(CARecord, admit.certname)
            ca = existing.record if existing is not None else authority.create_master_ca(admit.certname)
            ca_certificate = ca.certificate_pem
        cert = authority.issue(
            issuer,
            csr,
            common_name=admit.certname,
            sans=admit.sans,
            usage=admit.usage,
            extensions=[puppet_extension(PP_INSTANCE_ID, admit.instance_id)],
        )
        certificate_pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        test_server = self.policy.front
        if admit.role == "agent":
            test_server = self._first_run_server(records, issuer)
        lb_ca_chain = lb_crl = ""
        if admit.role == "master":
            lb_ca_chain = authority.ca_chain_pem(LB_CA).decode("ascii")
            lb_crl = authority.crl(LB_CA).crl_pem
        # Everything the answer needs is read before the transaction, so that once the node is
        # recorded nothing can fail and leave an issued enrollment its client never received.
        issued = IssuedEnrollment(
            certname=admit.certname,
            role=admit.role,
            certificate=certificate_pem,
            ca_chain=authority.ca_chain_pem(issuer).decode("ascii"),
            crl_chain=authority.crl_chain_pem().decode("ascii"),
            server=self.policy.front,
            test_server=test_server,
            ca_certificate=ca_certificate,
            lb_ca_chain=lb_ca_chain,
            lb_crl=lb_crl,
        )
        now = self.clock.seconds()
        writes = self._record_writes(
            records, admit, cert=cert, certificate_pem=certificate_pem, issuer=issuer,
            claim_version=claim_version, now=now,
        )
        try:
            records.store.transact(writes)
        except TransactionConflict as e:
            raise EnrollmentRefused(
                409, "already-enrolled",
                f"the enrollment of {admit.certname} changed while it was being signed",
            ) from e
        return _Outcome(issued, cert.serial_number, issuer)

    def _first_run_server(self, records: Records, issuer: str) -> str:
        """
        The issuing master's own port on the front (``host:port``), computed now from the
        registered masters by the rule the lb nodes use (:func:`puppetha.ha.nginx.master_ports`).
        Not stored: removing a master shifts the ports of those registered after it.  The front
        itself when the master has no port of its own (beyond ``max_masters``).
        """
        backends = [
            MasterBackend(m.record.certname, m.record.address, m.record.port, m.record.healthy,
                          m.record.registered_at)
            for m in records.list(MasterRecord)
        ]  # fmt: skip
        port = master_ports(backends, self.front_ports).get(issuer)
        if port is None:
            return self.policy.front
        host = self.policy.front_host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _record_writes(
        self,
        records: Records,
        admit: Admit,
        *,
        cert: x509.Certificate,
        certificate_pem: str,
        issuer: str,
        claim_version: int,
        now: float,
    ) -> list[Write]:
        claim = EnrollmentClaim(
            instance_id=admit.instance_id,
            role=admit.role,
            certname=admit.certname,
            claimed_at=now,
            state="issued",
        )
        node = NodeRecord(
            certname=admit.certname,
            instance_id=admit.instance_id,
            role=admit.role,
            account=admit.account,
            region=admit.region,
            private_ip=admit.private_ip,
            serial=cert.serial_number,
            issuer=issuer,
            certificate_pem=certificate_pem,
            enrolled_at=now,
            not_after=cert.not_valid_after_utc.timestamp(),
        )
        writes: list[Write] = [
            Replace(EnrollmentClaim.KIND, claim.key(), claim.to_value(), claim_version),
            _upsert(records, node, same_owner=lambda old: old.get("instance_id") == admit.instance_id),
        ]
        if admit.role == "master":
            # A master enrolling again keeps its place in the registration order, and with it
            # its port on the front and every other master's.
            known = records.get(MasterRecord, admit.certname)
            master = MasterRecord(
                certname=admit.certname,
                address=admit.private_ip,
                port=MASTER_PORT,
                ca=admit.certname,
                registered_at=known.record.registered_at if known is not None else now,
                healthy=True,
            )
            writes.append(_upsert(records, master, same_owner=lambda old: True))
        return writes

    async def _compensate(self, admit: Admit, claim_version: int, issuer: str) -> None:
        try:
            # Past any deadline: a claim left behind would refuse the instance's retry.
            await self.records.must_run(self._undo, admit, claim_version, issuer)
        except Exception:
            log.failure(
                "could not remove the claim of {certname} after a failed enrollment; "
                "it is taken over after the stale-claim time, or by `puppetha node reset`",
                certname=admit.certname,
            )

    def _undo(self, admit: Admit, claim_version: int, issuer: str) -> None:
        records = self.records.target
        claim_key = f"{admit.instance_id}/{admit.role}"
        try:
            records.store.delete(EnrollmentClaim.KIND, claim_key, expected_version=claim_version)
        except VersionConflict:
            return  # another attempt owns the claim now, and so whatever it made
        if admit.role == "master":
            # A CA made for this attempt is removed; one that predates it (and no master or
            # node refers to it otherwise) is left alone.
            ca = records.get(CARecord, issuer)
            if ca is not None and records.get(MasterRecord, issuer) is None and records.get(
                NodeRecord, issuer
            ) is None:
                crl = records.get(CRLRecord, issuer)
                writes: list[Write] = [Delete(CARecord.KIND, issuer, ca.version)]
                if crl is not None:
                    writes.append(Delete(CRLRecord.KIND, issuer, crl.version))
                try:
                    records.store.transact(writes)
                except StoreError:
                    log.warn("could not remove the CA made for {certname}", certname=issuer)

    # -- the other endpoints

    def ca_bundle(self) -> Deferred[bytes]:
        return self.authority.call(self.authority.target.ca_bundle_pem)

    def crl_bundle(self) -> Deferred[bytes]:
        return self.authority.call(self.authority.target.crl_chain_pem)

    def health(self) -> Deferred[None]:
        """Fires when the store answers; fails with :class:`StoreUnavailable` otherwise."""
        store = self.records.target.store
        return self.records.call(store.get, CARecord.KIND, ROOT).addCallback(lambda _: None)


def _healthy_master_cas(records: Records) -> list[str]:
    masters = [m.record for m in records.list(MasterRecord) if m.record.healthy]
    cas = {c.record.name for c in records.list(CARecord)}
    return sorted({m.ca for m in masters if m.ca in cas and m.ca not in RESERVED_CA_NAMES})


def _upsert(records: Records, record: NodeRecord | MasterRecord, same_owner: Callable[[Any], bool]) -> Write:
    """Create, or replace at the version read now (the transaction checks it has not moved)."""
    current = records.store.get(record.KIND, record.key())
    if current is None:
        return Create(record.KIND, record.key(), record.to_value())
    if not same_owner(current.value):
        raise EnrollmentRefused(
            409, "already-enrolled", f"the certname {record.key()} belongs to another instance"
        )
    return Replace(record.KIND, record.key(), record.to_value(), current.version)


def reset_enrollment(records: Records, name: str, role: str | None = None) -> list[str]:
    """
    ``puppetha node reset``: remove the enrollment claims of a node (by certname or instance
    id; one ``role`` or all), so the instance may enroll again.  Returns the claims removed.
    Its node record and certificate stay until the new enrollment replaces them; revoke the
    old certificate separately if it must stop working.  Blocking.
    """
    instance_id = name
    node = records.get(NodeRecord, name)
    if node is not None:
        instance_id = node.record.instance_id
    removed = []
    for claim in records.list(EnrollmentClaim, prefix=f"{instance_id}/"):
        if role is not None and claim.record.role != role:
            continue
        try:
            records.store.delete(EnrollmentClaim.KIND, claim.record.key(), expected_version=claim.version)
        except VersionConflict:
            continue
        removed.append(claim.record.key())
    if removed:
        log.info("reset enrollment claims {claims}", claims=removed)
    return removed


