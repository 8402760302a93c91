"""
The enrollment orchestrator: prove the instance's identity, decide, sign, record.

Order matters for the security of the whole fleet:

1. verify the identity document (CPU, on the pool) and refuse strangers before any AWS call;
2. DescribeInstances (on the pool, batched per region by :class:`DescribeBatcher`);
3. decide with the pure :func:`puppetha.enroll.policy.decide`;
4. for an agent or lb node, in one hop to the pool: check the CSR, read the claim (an issued one
   answers its own key again and refuses any other), sign in memory, and record in one store
   transaction that *creates* the :class:`EnrollmentClaim` already issued, with the node record.
   Of two racing attempts the create-if-absent lets exactly one commit; the loser's certificate
   never left the process and is dropped, and nothing of it is stored;
5. for a master, whose own CA is created before its certificate is signed, the claim is created
   first (create-if-absent) and marked issued in the recording transaction; if anything fails
   after the claim the claim (and a CA made for it) is removed again.

So a refusal stores and issues nothing, and a crash at any point leaves either nothing or an
issued claim that its key can ask for again.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, Protocol, TypeVar

from attrs import evolve, frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
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
    role_conflict,
)
from puppetha.ha.nginx import FrontPorts, MasterBackend, master_ports
from puppetha.pki.authority import LB_CA, RESERVED_CA_NAMES, ROOT, CertificateAuthority, ToRevoke
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
from puppetha.store.records import (
    CARecord,
    CRLRecord,
    EnrollmentClaim,
    IssuedCertificate,
    LbNodeRecord,
    MasterRecord,
    NodeRecord,
    Records,
    Versioned,
)
from puppetha.threads import Blocking

log = Logger()

#: Seconds a client is told to wait before retrying a 503.
DEFAULT_RETRY_AFTER = 10

#: Seconds a client is told to wait before asking again about an enrollment in progress.
IN_PROGRESS_RETRY_AFTER = 2

#: A claim still ``claimed`` this long after it was made belongs to an attempt that died
#: (daemon killed mid-way); a new attempt may take it over (compare-and-set on its version).
DEFAULT_STALE_CLAIM = 600.0


class EnrollmentTimeline(Protocol):
    """
    Where a benchmark learns an enrollment's critical path: each step's moments, stamped as
    they happen (on the reactor or a pool thread) under the request's source address
    (``bench/timeline.py``).  Without one, nothing is stamped.
    """

    def stamp(self, source: str | None, event: str) -> None: ...


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
    Asks AWS about the instances of concurrent enrollments with as few DescribeInstances
    calls as the load allows, and no waiting when there is no load.

    One call at a time per region: a lookup that finds no call in flight goes out at the end
    of the reactor's current turn (with any others that arrived in that turn); the lookups
    that arrive while a call is in flight wait for it and then go out together as the next
    call, at most ``max_batch`` ids each.  A fixed window would delay a lone enrollment for
    nothing and still split a busy wave into many calls; this way the batches grow with the
    load, and botocore builds and parses one call per round trip instead of one per window.

    ``max_in_flight`` above 1 lets that many calls be in flight per region (``[enroll]
    describe_in_flight``, 1 by default): a lookup that arrives during a call goes out at the end
    of its turn while a call is free.  It pays where AWS's round trip sets the wait, at the cost
    of more calls against the account's request budget (docs/performance.md).
    """

    def __init__(
        self,
        cloud: Blocking[ICloud],
        clock: IReactorTime,
        max_batch: int = 100,
        timeline: EnrollmentTimeline | None = None,
        max_in_flight: int = 1,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be >= 1")
        self.cloud = cloud
        self.clock = clock
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.timeline = timeline
        #: By region and instance id, each lookup's Deferred and the enrollment's source (for the
        #: timeline).
        self._waiting: dict[str, dict[str, list[tuple[Deferred[InstanceInfo | None], str | None]]]] = {}
        #: By region, the calls in flight or due at the end of this turn.
        self._busy: dict[str, int] = {}
        #: How many DescribeInstances calls were made (for tests and the benchmark).
        self.calls = 0

    def describe(
        self, region: str, instance_id: str, source: str | None = None
    ) -> Deferred[InstanceInfo | None]:
        d: Deferred[InstanceInfo | None] = Deferred()
        self._waiting.setdefault(region, {}).setdefault(instance_id, []).append((d, source))
        if self._busy.get(region, 0) < self.max_in_flight:
            self._busy[region] = self._busy.get(region, 0) + 1
            self.clock.callLater(0, self._ask, region)
        return d

    def _ask(self, region: str) -> None:
        waiting = self._waiting.get(region, {})
        if not waiting:
            # This call's turn ends; the region is free once none is in flight.
            self._busy[region] -= 1
            if not self._busy[region]:
                del self._busy[region]
                self._waiting.pop(region, None)
            return
        # The oldest lookups first (dicts keep their insertion order).
        batch = {i: waiting.pop(i) for i in list(waiting)[: self.max_batch]}
        self.calls += 1
        describe: Callable[..., dict[str, InstanceInfo]] = self.cloud.target.describe_instances
        if self.timeline is not None:
            sources = [source for waiters in batch.values() for _, source in waiters]
            describe = _stamped(self.timeline, describe, sources)
        try:
            asked = self.cloud.call(describe, region, sorted(batch))
        except Exception:
            asked = fail()

        def answered(found: dict[str, InstanceInfo]) -> None:
            # The next batch goes out before these waiters go on, so none of them waits for it.
            self._ask(region)
            for instance_id, waiters in batch.items():
                for waiter, _ in waiters:
                    waiter.callback(found.get(instance_id))

        def failed(failure: Failure) -> None:
            self._ask(region)
            for waiters in batch.values():
                for waiter, _ in waiters:
                    waiter.errback(failure)

        asked.addCallbacks(answered, failed)

def _stamped(
    timeline: EnrollmentTimeline, describe: Callable[..., dict[str, InstanceInfo]], sources: list[str | None]
) -> Callable[..., dict[str, InstanceInfo]]:
    """``describe``, its moments stamped on ``timeline`` for each of the batch's enrollments."""
    for source in sources:
        timeline.stamp(source, "describe: call sent to the pool")

    def run(region: str, ids: list[str]) -> dict[str, InstanceInfo]:
        for source in sources:
            timeline.stamp(source, "describe: call started on a thread")
        try:
            return describe(region, ids)
        finally:
            for source in sources:
                timeline.stamp(source, "describe: AWS answered")

    return run


@frozen
class _Outcome:
    """What the signing step made, so a failure after it can be undone."""

    issued: IssuedEnrollment
    serial: int
    issuer: str


#: What an enrollment that lost the race to record answers instead (or ``NoReturn``: it refuses).
_Lost = TypeVar("_Lost")


class Enrollment:
    """
    The enrollment service.  Blocking collaborators arrive wrapped in
    :class:`puppetha.threads.Blocking` (bounded pools); ``clock`` gives the time and ends the
    reactor turn that gathers a DescribeInstances batch.  ``allowed_keys`` are the key types a
    CSR may carry.  ``front_ports`` are the lb nodes' ports (``[lb]``): an agent's ``test_server`` is its
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
        retry_after: int = DEFAULT_RETRY_AFTER,
        stale_claim: float = DEFAULT_STALE_CLAIM,
        choose: Callable[[Sequence[str]], str] | None = None,
        on_master: Callable[[], object] = lambda: None,
        front_ports: FrontPorts | None = None,
        timeline: EnrollmentTimeline | None = None,
        describe_in_flight: int = 1,
    ) -> None:
        self.policy = policy
        self.timeline = timeline
        self.trust = trust
        self.records = records
        self.authority = authority
        self.clock = clock
        self.allowed_keys = frozenset(allowed_keys)
        self.retry_after = retry_after
        self.stale_claim = stale_claim
        self.batcher = DescribeBatcher(cloud, clock, timeline=timeline, max_in_flight=describe_in_flight)
        self.front_ports = front_ports or FrontPorts()
        # Least-recently-used spread over masters; ties broken at random unless a test chooses.
        self._choose = choose or random.choice
        # Called once a master is registered: an lb role on this host re-renders nginx at once.
        self.on_master = on_master
        self._last_used: dict[str, int] = {}
        self._uses = 0
        # Claims this daemon is working on, with the key they are for, and the lock that guards
        # them and the spread over masters (both are used on the pool's threads).
        self._in_flight: dict[str, str] = {}
        self._lock = threading.Lock()
        #: Enrollments answered with a certificate, by role, and refusals by code, since the
        #: start (the metrics endpoint reads these; the API adds the refusals of its own).
        self.enrolled: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    # -- the enrollment

    def enroll(self, request: EnrollmentRequest, source: str | None) -> Deferred[IssuedEnrollment]:
        """The issued enrollment, or a failure with :class:`EnrollmentRefused`."""
        return Deferred.fromCoroutine(self._enroll(request, source))

    async def _enroll(self, request: EnrollmentRequest, source: str | None) -> IssuedEnrollment:
        try:
            issued = await self._admit_and_issue(request, source)
        except EnrollmentRefused as refusal:
            self.refused[refusal.code] += 1
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
            self.refused["store-unavailable"] += 1
            raise self._unavailable("store-unavailable", "the store cannot be reached") from e
        except CloudError as e:
            log.warn("enrollment failed, AWS unavailable: {error}", error=str(e))
            self.refused["aws-unavailable"] += 1
            raise self._unavailable("aws-unavailable", "AWS cannot be asked about the instance") from e
        self.enrolled[request.role] += 1
        return issued

    def _hop(
        self, on: Blocking[Any], step: str, source: str | None, f: Callable[..., Any],
        *args: Any, **kwargs: Any,
    ) -> Deferred[Any]:
        """``on.call(f, *args)``, its moments stamped on the timeline when there is one."""
        timeline = self.timeline
        if timeline is None:
            return on.call(f, *args, **kwargs)
        timeline.stamp(source, f"{step}: sent to the pool")

        def run(*args: Any, **kwargs: Any) -> Any:
            timeline.stamp(source, f"{step}: started on a thread")
            try:
                return f(*args, **kwargs)
            finally:
                timeline.stamp(source, f"{step}: ended")

        def back(result: Any) -> Any:
            timeline.stamp(source, f"{step}: back on the reactor")
            return result

        return on.call(run, *args, **kwargs).addBoth(back)

    def _stamp(self, source: str | None, event: str) -> None:
        if self.timeline is not None:
            self.timeline.stamp(source, event)

    def _unavailable(self, code: str, message: str) -> EnrollmentRefused:
        return EnrollmentRefused(503, code, f"{message}; try again later", retry_after=self.retry_after)

    def _in_progress(self, admit: Admit) -> EnrollmentRefused:
        return EnrollmentRefused(
            503, "in-progress",
            f"the enrollment of {admit.instance_id} as {admit.role} with this key is in progress; "
            "ask again with the same key",
            retry_after=IN_PROGRESS_RETRY_AFTER,
        )

    async def _admit_and_issue(self, request: EnrollmentRequest, source: str | None) -> IssuedEnrollment:
        if request.role not in ROLES:
            raise EnrollmentRefused(400, "unknown-role", f"role must be one of {', '.join(ROLES)}")
        identity = await self._verify(request, source)
        early = precheck(identity, self.clock.seconds(), self.policy)
        if early is not None:
            raise EnrollmentRefused.of(early)
        self._stamp(source, "describe: asked")
        instance = await self.batcher.describe(identity.region, identity.instance_id, source)
        self._stamp(source, "describe: back on the reactor")
        decision = decide(
            request.role, identity, instance, source=source, now=self.clock.seconds(), policy=self.policy
        )
        if isinstance(decision, Refuse):
            raise EnrollmentRefused.of(decision)
        made: _Outcome | IssuedEnrollment
        if decision.role == "master":
            made = await self._claim_then_issue(request, decision, source)
        else:
            # One hop and one durable write: the CSR check, the claim's reads, signing and the
            # transaction that creates the claim already issued with the record.
            made = await self._hop(
                self.records, "sign and record", source, self._sign_and_record, decision, request.csr, source
            )
        if isinstance(made, IssuedEnrollment):
            log.info(
                "answered {certname} as {role} again with its certificate (same key): "
                "instance {instance_id}",
                certname=decision.certname, role=decision.role, instance_id=decision.instance_id,
            )
            return made
        outcome = made
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

    async def _claim_then_issue(
        self, request: EnrollmentRequest, decision: Admit, source: str | None
    ) -> _Outcome | IssuedEnrollment:
        """
        A master's enrollment: the claim is made (a durable write) before its CA is created and
        its certificate signed, and removed again with that CA when a later step fails.
        """
        csr: x509.CertificateSigningRequest = await self._hop(
            self.authority, "CSR check", source, self._check_csr, decision, request.csr
        )
        key_id = public_key_id(csr)
        claim_key = f"{decision.instance_id}/{decision.role}"
        self._enter_flight(decision, key_id)
        try:
            claimed = await self._hop(self.records, "claim", source, self._claim, decision, key_id, source)
            if isinstance(claimed, EnrollmentClaim):
                again: IssuedEnrollment = await self.authority.call(self._answer_again, decision, claimed)
                return again
            claim: int = claimed
            # A master is signed by its own CA, made for it once the claim is held.
            issuer = decision.certname
            try:
                outcome: _Outcome = await self._hop(
                    self.authority, "sign and record", source, self._issue, decision, csr, key_id, issuer,
                    claim, origin=source,
                )
            except BaseException:
                failure = Failure()
                await self._compensate(decision, claim, issuer)
                failure.raiseException()
        finally:
            self._leave_flight(claim_key)
        return outcome

    def _enter_flight(self, admit: Admit, key_id: str) -> None:
        """
        Mark the claim as being worked on by this daemon (from any thread).  If it already is, the
        same key is told to come back (it then resumes, or gets the certificate), another key is
        refused as ever.
        """
        claim_key = f"{admit.instance_id}/{admit.role}"
        with self._lock:
            working = self._in_flight.get(claim_key)
            if working is None:
                self._in_flight[claim_key] = key_id
                return
        if working == key_id:
            raise self._in_progress(admit)
        raise _already_enrolled(admit)

    def _leave_flight(self, claim_key: str) -> None:
        with self._lock:
            self._in_flight.pop(claim_key, None)

    async def _verify(self, request: EnrollmentRequest, source: str | None) -> IdentityDocument:
        try:
            identity: IdentityDocument = await self._hop(
                self.authority, "identity", source, verify_identity, request.document, request.signature,
                self.trust,
            )
        except IdentityRefused as e:
            raise EnrollmentRefused(403, f"identity-{e.code}", e.message) from None
        return identity

    def _issuer_for(self, admit: Admit, masters: list[str] | None) -> str:
        """
        The CA that signs: a healthy master's for agents (``masters``), a new one for masters,
        the lb CA for lb.
        """
        if admit.role == "master":
            return admit.certname
        if admit.role == "lb":
            return LB_CA
        if not masters:
            raise EnrollmentRefused(
                503, "no-master", "no healthy master is registered yet; try again later",
                retry_after=self.retry_after,
            )
        return self._spread(masters)

    def _spread(self, cas: Sequence[str]) -> str:
        with self._lock:
            oldest = min(self._last_used.get(ca, 0) for ca in cas)
            chosen = self._choose(sorted(ca for ca in cas if self._last_used.get(ca, 0) == oldest))
            self._uses += 1
            self._last_used[chosen] = self._uses
            return chosen

    # -- blocking steps (on the pool)

    def _claim(self, admit: Admit, key_id: str, source: str | None = None) -> int | EnrollmentClaim:
        """
        Create the claim for the key ``key_id``; returns its version, or the claim already issued
        to that key (to answer again).  A claim left ``claimed`` with the same key (its attempt
        died, or its answer was lost) is taken over at once; with another key only once stale.
        ``EnrollmentRefused`` 409 otherwise.
        """
        records = self.records.target
        now = self.clock.seconds()
        self._refuse_another_role(records, admit)
        claim = EnrollmentClaim(
            instance_id=admit.instance_id, role=admit.role, certname=admit.certname, claimed_at=now,
            public_key=key_id,
        )
        try:
            self._stamp(source, "claim: write begins")
            return records.create(claim).version
        except AlreadyExists:
            pass
        finally:
            self._stamp(source, "claim: write committed")
        existing = records.get(EnrollmentClaim, claim.key())
        if existing is None:
            raise _already_enrolled(admit)  # reset meanwhile: the client may simply ask again
        found = self._existing_claim(admit, existing, key_id, now)
        if isinstance(found, EnrollmentClaim):
            return found
        try:
            version = records.replace(claim, found).version
        except VersionConflict:
            raise _already_enrolled(admit) from None
        log.warn(
            "took over the {how} enrollment claim {claim}",
            how="unfinished" if existing.record.public_key == key_id else "stale", claim=claim.key(),
        )
        return version

    def _sign_and_record(
        self, admit: Admit, csr_pem: bytes, source: str | None
    ) -> _Outcome | IssuedEnrollment:
        """
        An agent's or lb node's enrollment in one hop with one durable write: check the CSR,
        read the claim (answering again from an issued one), sign in memory, and create the claim
        already issued together with the record in one transaction.  Of two racing attempts the
        transaction lets one win; the loser's certificate never leaves this process.
        """
        csr = self._check_csr(admit, csr_pem)
        key_id = public_key_id(csr)
        self._enter_flight(admit, key_id)
        try:
            return self._signed_then_recorded(admit, csr, key_id, source)
        finally:
            self._leave_flight(f"{admit.instance_id}/{admit.role}")

    def _signed_then_recorded(
        self, admit: Admit, csr: x509.CertificateSigningRequest, key_id: str, source: str | None
    ) -> _Outcome | IssuedEnrollment:
        records = self.records.target
        authority = self.authority.target
        now = self.clock.seconds()
        taken = self._claim_to_take(admit, key_id, now)
        if isinstance(taken, EnrollmentClaim):
            return self._answer_again(admit, taken)
        self._check_known_node(records, admit)
        issuer = self._issuer_for(admit, _healthy_master_cas(records) if admit.role == "agent" else None)
        # Made by the first enrollment of any kind (once; racing daemons agree): an agent's issuing
        # master enrolled before it, so only a first lb node can find it missing.
        authority.ensure_ca(LB_CA)
        made = self._sign_then_record(
            admit, csr, key_id, issuer, claim_version=taken, now=now, origin=source,
            lost=lambda conflict: self._after_lost_race(admit, key_id, conflict),
        )
        if taken is not None and isinstance(made, _Outcome):
            # A claim left ``claimed`` by an attempt that died, or by a daemon that claims first.
            log.warn("took over the unfinished enrollment claim {claim}",
                     claim=f"{admit.instance_id}/{admit.role}")
        return made

    def _refuse_another_role(self, records: Records, admit: Admit) -> None:
        """``EnrollmentRefused`` if the instance holds a claim for another role it may not add."""
        # Direct reads of the other roles' claims: a prefix listing would cost a query per shard.
        held = [] if self.policy.allow_second_role else [
            role for role in ROLES
            if role != admit.role and records.get(EnrollmentClaim, f"{admit.instance_id}/{role}") is not None
        ]
        conflict = role_conflict(admit.instance_id, admit.role, held, self.policy)
        if conflict is not None:
            raise EnrollmentRefused.of(conflict)

    def _claim_to_take(self, admit: Admit, key_id: str, now: float) -> int | EnrollmentClaim | None:
        """
        What the recording transaction does with the claim: ``None`` to create it, the version of
        an unfinished claim to take over (same key at once, another key once stale), or the claim
        already issued to this key (to answer again).  ``EnrollmentRefused`` 409 otherwise.
        """
        records = self.records.target
        self._refuse_another_role(records, admit)
        existing = records.get(EnrollmentClaim, f"{admit.instance_id}/{admit.role}")
        if existing is None:
            return None
        return self._existing_claim(admit, existing, key_id, now)

    def _existing_claim(
        self, admit: Admit, existing: Versioned[EnrollmentClaim], key_id: str, now: float
    ) -> int | EnrollmentClaim:
        """
        What an attempt with ``key_id`` may do with the claim it found: the claim already issued
        to this key (to answer again), or the version of an unfinished claim to take over (this
        key at once, another key once stale).  ``EnrollmentRefused`` 409 otherwise.
        """
        same_key = existing.record.public_key == key_id
        if existing.record.state == "issued":
            if same_key and existing.record.certificate_pem:
                return existing.record
            raise _already_enrolled(admit)
        if same_key or now - existing.record.claimed_at > self.stale_claim:
            return existing.version
        raise _already_enrolled(admit)

    def _after_lost_race(self, admit: Admit, key_id: str, conflict: TransactionConflict) -> IssuedEnrollment:
        """The answer when the recording transaction was refused: the winner's, if it is this key's."""
        records = self.records.target
        claim = records.get(EnrollmentClaim, f"{admit.instance_id}/{admit.role}")
        if claim is None or claim.record.public_key != key_id:
            if claim is not None:
                raise _already_enrolled(admit) from conflict
            raise EnrollmentRefused(
                409, "already-enrolled",
                f"the enrollment of {admit.certname} changed while it was being signed",
            ) from conflict
        if claim.record.state == "issued" and claim.record.certificate_pem:
            # The same key won elsewhere (another daemon, a retry): its certificate is the answer.
            return self._answer_again(admit, claim.record)
        raise self._in_progress(admit) from conflict

    def _check_csr(self, admit: Admit, csr_pem: bytes) -> x509.CertificateSigningRequest:
        try:
            return check_csr(
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

    def _answer_again(self, admit: Admit, claim: EnrollmentClaim) -> IssuedEnrollment:
        """The answer for the certificate ``claim`` already holds (the client lost the first)."""
        records = self.records.target
        node = records.get(NodeRecord, claim.certname)
        cert = x509.load_pem_x509_certificate(claim.certificate_pem.encode("ascii"))
        if node is None or node.record.instance_id != admit.instance_id or all(
            c.serial != cert.serial_number for c in node.record.certificates
        ):
            raise _already_enrolled(admit)
        if node.record.revoked:
            raise EnrollmentRefused(
                409, "revoked",
                f"{claim.certname} was revoked; an operator can allow a new enrollment with "
                "`puppetha node reset`",
            )
        return self._answer(records, admit, claim.issuer, claim.certificate_pem)

    def _answer(self, records: Records, admit: Admit, issuer: str, certificate_pem: str) -> IssuedEnrollment:
        authority = self.authority.target
        ca_certificate = lb_ca_chain = lb_crl = ""
        if admit.role == "master":
            ca_certificate = authority.ca(admit.certname).certificate_pem
            lb_ca_chain = authority.ca_chain_pem(LB_CA).decode("ascii")
            lb_crl = authority.crl(LB_CA).crl_pem
        test_server = self.policy.front
        if admit.role == "agent":
            test_server = self._first_run_server(records, issuer)
        return IssuedEnrollment(
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

    def _issue(
        self, admit: Admit, csr: x509.CertificateSigningRequest, key_id: str, issuer: str, claim_version: int,
        *, origin: str | None = None,
    ) -> _Outcome:
        authority = self.authority.target
        records = self.records.target
        self._check_known_node(records, admit)
        # Made by the first enrollment of any kind (once; racing daemons agree), so that every
        # crl_chain below holds its CRL: agents check it on the lb node's chain, masters trust it.
        authority.ensure_ca(LB_CA)
        if admit.role == "master" and records.get(CARecord, admit.certname) is None:
            # A master enrolling again (after a reset) keeps its CA: the agents it signed stay valid.
            authority.create_master_ca(admit.certname)
        # A master's claim was held by this attempt: a lost race is refused, never answered.
        return self._sign_then_record(
            admit, csr, key_id, issuer, claim_version=claim_version, now=self.clock.seconds(),
            origin=origin, lost=lambda conflict: self._master_lost_race(admit, key_id, conflict),
        )

    def _master_lost_race(self, admit: Admit, key_id: str, conflict: TransactionConflict) -> NoReturn:
        claim = self.records.target.get(EnrollmentClaim, f"{admit.instance_id}/{admit.role}")
        if claim is not None and claim.record.public_key == key_id:
            # Another attempt with this key (a retry, another daemon) took the claim over.
            raise self._in_progress(admit) from conflict
        raise EnrollmentRefused(
            409, "already-enrolled",
            f"the enrollment of {admit.certname} changed while it was being signed",
        ) from conflict

    def _sign_then_record(
        self, admit: Admit, csr: x509.CertificateSigningRequest, key_id: str, issuer: str, *,
        claim_version: int | None, now: float, origin: str | None,
        lost: Callable[[TransactionConflict], _Lost],
    ) -> _Outcome | _Lost:
        """
        Sign ``csr`` by ``issuer`` in memory and record it, with the claim issued, in one
        transaction.  If a racing attempt changed the claim, the transaction is refused whole and
        the certificate dropped (it never left this process); ``lost`` then answers or refuses.
        """
        records = self.records.target
        cert = self.authority.target.issue(
            issuer,
            csr,
            common_name=admit.certname,
            sans=admit.sans,
            usage=admit.usage,
            extensions=[puppet_extension(PP_INSTANCE_ID, admit.instance_id)],
        )
        certificate_pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        # Everything the answer needs is read before the transaction, so that once the node is
        # recorded nothing can fail and leave an issued enrollment its client never received.
        issued = self._answer(records, admit, issuer, certificate_pem)
        writes = self._record_writes(
            records, admit, cert=cert, certificate_pem=certificate_pem, issuer=issuer,
            key_id=key_id, claim_version=claim_version, now=now,
        )
        try:
            self._stamp(origin, "record: write begins")
            records.store.transact(writes)
        except TransactionConflict as e:
            log.info(
                "dropped the certificate signed for {certname}, serial {serial:x}: its enrollment "
                "changed while it was being signed",
                certname=admit.certname, serial=cert.serial_number,
            )
            return lost(e)
        finally:
            self._stamp(origin, "record: write committed")
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
            for m in records.current(MasterRecord)
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
        key_id: str,
        claim_version: int | None,
        now: float,
    ) -> list[Write]:
        claim = EnrollmentClaim(
            instance_id=admit.instance_id,
            role=admit.role,
            certname=admit.certname,
            claimed_at=now,
            state="issued",
            public_key=key_id,
            certificate_pem=certificate_pem,
            issuer=issuer,
        )
        issued = IssuedCertificate(
            serial=cert.serial_number,
            issuer=issuer,
            role=admit.role,
            certname=admit.certname,
            issued_at=now,
            not_after=cert.not_valid_after_utc.timestamp(),
        )
        known_node = records.get(NodeRecord, admit.certname)
        history: tuple[IssuedCertificate, ...] = ()
        if known_node is not None:
            history = self._history(admit, known_node.record)
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
            not_after=issued.not_after,
            certificates=(*history, issued),
        )
        # The transaction checks the node is still at the version read: of two roles racing
        # onto one identity, the second sees the first (and its role) or fails.
        node_write: Write = (
            Create(NodeRecord.KIND, node.key(), node.to_value())
            if known_node is None
            else Replace(NodeRecord.KIND, node.key(), node.to_value(), known_node.version)
        )
        # A claim made in this transaction (``claim_version`` None) is created already issued: of
        # two racing attempts the store lets one create it.
        claim_write: Write = (
            Create(EnrollmentClaim.KIND, claim.key(), claim.to_value())
            if claim_version is None
            else Replace(EnrollmentClaim.KIND, claim.key(), claim.to_value(), claim_version)
        )
        writes: list[Write] = [claim_write, node_write]
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
            if known is not None:
                # Enrolling again does not end a drain the primary began.
                master = evolve(master, draining_since=known.record.draining_since,
                                drain_token=known.record.drain_token, drained_at=known.record.drained_at)
            writes.append(_upsert(records, master, same_owner=lambda old: True))
        return writes

    def _check_known_node(self, records: Records, admit: Admit) -> None:
        """
        Refuse before anything is signed or made what the recording transaction would refuse of
        the node already recorded under the certname (another instance's, revoked, another role);
        the transaction checks that record again at the version it reads.
        """
        known = records.get(NodeRecord, admit.certname)
        if known is not None:
            self._history(admit, known.record)

    def _history(self, admit: Admit, known: NodeRecord) -> tuple[IssuedCertificate, ...]:
        """The certificates the identity already holds, or a refusal to add one more."""
        if known.instance_id != admit.instance_id:
            raise EnrollmentRefused(
                409, "already-enrolled", f"the certname {admit.certname} belongs to another instance"
            )
        if known.revoked:
            raise EnrollmentRefused(
                409, "revoked",
                f"{admit.certname} was revoked; an operator can allow a new enrollment with "
                "`puppetha node reset`",
            )
        conflict = role_conflict(admit.instance_id, admit.role, known.roles, self.policy)
        if conflict is not None:
            raise EnrollmentRefused.of(conflict)
        return known.certificates

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


def public_key_id(csr: x509.CertificateSigningRequest) -> str:
    """SHA-256 (hex) of the CSR's SubjectPublicKeyInfo (DER): what a claim remembers of the key."""
    spki = csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _already_enrolled(admit: Admit) -> EnrollmentRefused:
    return EnrollmentRefused(
        409, "already-enrolled",
        f"instance {admit.instance_id} has already enrolled as {admit.role} "
        "(an operator can allow a new enrollment with `puppetha node reset`)",
    )


def _healthy_master_cas(records: Records) -> list[str]:
    # Both from memory while the store's change counters of masters and CAs stand still: a master
    # deregistered, marked unhealthy or draining, or removed (by any daemon) moves the counter with
    # its write.  A draining master gets no new agents: they would lose it within drain_timeout.
    masters = [m.record for m in records.current(MasterRecord) if m.record.healthy and not m.record.draining]
    cas = {c.record.name for c in records.current(CARecord)}
    return sorted({
        m.ca for m in masters
        if m.ca in cas and m.ca not in RESERVED_CA_NAMES and not _revoked_node(records, m.certname)
    })


def _revoked_node(records: Records, certname: str) -> bool:
    # `node revoke` deregisters a master with its revocation; a registration left from before
    # that (or written by an older daemon) must not get new agents either.
    node = records.get(NodeRecord, certname)
    return node is not None and node.record.revoked


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


class IdentityChanged(Exception):
    """The instance was issued another certificate while it was being revoked: plan again."""


@frozen
class RevokedIdentity:
    """What :func:`revoke_identity` did."""

    instance_id: str
    #: The instance's node records, as now stored (revoked).
    nodes: tuple[NodeRecord, ...]
    #: Every certificate of the instance, each now on its issuer's CRL.
    certificates: tuple[IssuedCertificate, ...]
    #: The CRLs published, by CA name.
    crls: dict[str, CRLRecord]
    #: Masters removed from the registry (no new agents, off the front).
    deregistered: tuple[str, ...]
    #: lb nodes (instance ids) removed from the lb nodes' registry (no heartbeats sent to them,
    #: gone from ``puppetha status``).
    deregistered_lb: tuple[str, ...] = ()


def identity_of(records: Records, name: str) -> tuple[str, list[Versioned[NodeRecord]]]:
    """
    The instance named by ``name`` (a certname or an instance id) and every node record it
    holds: the one under ``name`` and those its enrollment claims name (a certname template
    changed between two enrollments gives one instance two certnames).  Blocking.
    """
    node = records.get(NodeRecord, name)
    instance_id = node.record.instance_id if node is not None else name
    certnames = {c.record.certname for c in records.list(EnrollmentClaim, prefix=f"{instance_id}/")}
    if node is not None:
        certnames.add(name)
    found = []
    for certname in sorted(certnames):
        current = node if node is not None and certname == name else records.get(NodeRecord, certname)
        if current is not None and current.record.instance_id == instance_id:
            found.append(current)
    return instance_id, found


def revoke_identity(
    records: Records, authority: CertificateAuthority, name: str, reason: str, now: Callable[[], float]
) -> RevokedIdentity | None:
    """
    ``puppetha node revoke``: revoke every certificate the instance named by ``name`` was ever
    issued, in every role, mark its node records revoked and deregister it as a master, all in
    one store transaction.  ``None`` when no node has that name.  Blocking.
    """
    for _ in range(10):
        instance_id, nodes = identity_of(records, name)
        if not nodes:
            return None
        plan = _IdentityRevocation(records, {n.record.certname: n.record.certificates for n in nodes}, now)
        certificates = tuple(dict.fromkeys(c for n in nodes for c in n.record.certificates))
        try:
            crls = authority.revoke_all(
                [ToRevoke(c.issuer, c.serial, c.certname, c.not_after) for c in certificates],
                reason,
                plan.writes,
            )
        except IdentityChanged:
            continue
        for certname in plan.deregistered:
            log.info("deregistered the revoked master {certname}", certname=certname)
        for node in plan.deregistered_lb:
            log.info("deregistered the revoked lb node {node}", node=node)
        return RevokedIdentity(instance_id, tuple(plan.stored), certificates, crls, tuple(plan.deregistered),
                               tuple(plan.deregistered_lb))
    raise StoreError(f"the records of {name} kept changing while it was being revoked; try again")


class _IdentityRevocation:
    """The writes beside the CRLs of one revocation, read again on every attempt."""

    def __init__(
        self, records: Records, planned: dict[str, tuple[IssuedCertificate, ...]], now: Callable[[], float]
    ) -> None:
        self.records = records
        self.planned = planned
        self.now = now
        self.stored: list[NodeRecord] = []
        self.deregistered: list[str] = []
        self.deregistered_lb: list[str] = []

    def writes(self) -> list[Write]:
        self.stored.clear()
        self.deregistered.clear()
        self.deregistered_lb.clear()
        writes: list[Write] = []
        for certname, certs in self.planned.items():
            current = self.records.get(NodeRecord, certname)
            if current is None or current.record.certificates != certs:
                raise IdentityChanged(certname)
            node = current.record
            if not node.revoked:
                node = NodeRecord.from_value({**node.to_value(), "revoked_at": self.now()})
                writes.append(Replace(NodeRecord.KIND, certname, node.to_value(), current.version))
            self.stored.append(node)
            master = self.records.get(MasterRecord, certname)
            if master is not None:
                writes.append(Delete(MasterRecord.KIND, certname, master.version))
                self.deregistered.append(certname)
            # lb nodes register under their instance id (the Elastic IP's target).
            lb = self.records.get(LbNodeRecord, node.instance_id)
            if lb is not None and node.instance_id not in self.deregistered_lb:
                writes.append(Delete(LbNodeRecord.KIND, node.instance_id, lb.version))
                self.deregistered_lb.append(node.instance_id)
        return writes


def reset_enrollment(records: Records, name: str, role: str | None = None) -> list[str]:
    """
    Remove the enrollment claims of a node (by certname or instance id; one ``role`` or all),
    so the instance may enroll again.  Returns the claims removed.  ``puppetha node reset``
    revokes the instance first (:func:`revoke_identity`) and removes its node records too.
    Blocking.
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
