"""
Who may enroll, as what, under which name: pure decisions over verified facts.

:func:`decide` takes the verified identity document, what DescribeInstances says of the
instance, the connection's source address and the time, and answers :class:`Admit` or
:class:`Refuse`.  Anything not proven is refused (deny by default).  No I/O, no clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from attrs import field, frozen

from puppetha.aws.cloud import InstanceInfo
from puppetha.aws.identity import IdentityDocument
from puppetha.pki.authority import RESERVED_CA_NAMES
from puppetha.pki.certs import Usage
from puppetha.pki.names import certname_problem, check_certname_template, check_host_port, parse_san

ROLES = ("agent", "master", "lb")

#: Fields a certname template may use.

#: The port a master's puppetserver listens on for the nginx nodes.
MASTER_PORT = 8140


@frozen
class RoleRule:
    """One way to be allowed a role: ``tag:KEY=VALUE``, ``profile:ARN`` or ``sg:ID-or-name``."""

    kind: str
    name: str
    value: str = ""

    @classmethod
    def parse(cls, text: str) -> RoleRule:
        kind, sep, rest = text.partition(":")
        if not sep or not rest:
            raise ValueError(f"not a rule (tag:KEY=VALUE, profile:ARN or sg:GROUP): {text!r}")
        if kind == "tag":
            key, eq, value = rest.partition("=")
            if not eq or not key:
                raise ValueError(f"a tag rule is tag:KEY=VALUE: {text!r}")
            return cls("tag", key, value)
        if kind == "profile":
            if not rest.startswith("arn:"):
                raise ValueError(f"a profile rule names the instance profile's ARN: {text!r}")
            return cls("profile", rest)
        if kind == "sg":
            return cls("sg", rest)
        raise ValueError(f"not a rule (tag:KEY=VALUE, profile:ARN or sg:GROUP): {text!r}")

    def matches(self, instance: InstanceInfo) -> bool:
        if self.kind == "tag":
            return instance.tags.get(self.name) == self.value
        if self.kind == "profile":
            return bool(instance.instance_profile_arn) and instance.instance_profile_arn == self.name
        if self.kind == "sg":
            return any(self.name in (g.group_id, g.group_name) for g in instance.security_groups)
        return False

    def __str__(self) -> str:
        if self.kind == "tag":
            return f"tag:{self.name}={self.value}"
        return f"{self.kind}:{self.name}"


def _accounts(accounts: Iterable[str]) -> frozenset[str]:
    if isinstance(accounts, str):
        raise TypeError("accounts are a sequence of account ids")
    return frozenset(accounts)


def _rules(rules: object) -> tuple[RoleRule, ...]:
    if not isinstance(rules, tuple | list):
        raise TypeError("role rules are a sequence")
    return tuple(r if isinstance(r, RoleRule) else RoleRule.parse(str(r)) for r in rules)


@frozen
class EnrollmentPolicy:
    """The ``[aws]`` and ``[enroll]`` options that decide an enrollment."""

    #: AWS accounts whose instances may enroll; empty: nobody.
    accounts: frozenset[str] = field(converter=_accounts)
    #: Seconds after ``pendingTime`` an instance may still enroll.
    max_age: float
    #: Where agents reach the masters for good (``host:port``).
    front: str = field(validator=lambda _i, _a, v: check_host_port(v))
    require_source_match: bool = True
    certname_template: str = field(default="{instance_id}", converter=check_certname_template)
    master_rules: tuple[RoleRule, ...] = field(default=(), converter=_rules)
    lb_rules: tuple[RoleRule, ...] = field(default=(), converter=_rules)
    #: Whether an instance holding a certificate for one role may enroll in another as well.
    allow_second_role: bool = False

    @property
    def front_host(self) -> str:
        return self.front.rpartition(":")[0].strip("[]")

    def rules_for(self, role: str) -> tuple[RoleRule, ...]:
        return {"master": self.master_rules, "lb": self.lb_rules}.get(role, ())


@frozen
class Admit:
    """The enrollment may go ahead: what to issue and to whom."""

    role: str
    certname: str
    instance_id: str
    account: str
    region: str
    private_ip: str
    #: Further names the certificate carries (and the CSR may ask for), beyond the certname.
    sans: tuple[str, ...]
    usage: Usage


@frozen
class Refuse:
    """The enrollment is refused: the HTTP status and the API's error code."""

    status: int
    code: str
    message: str


Decision = Admit | Refuse


def certname_for(template: str, identity: IdentityDocument, instance: InstanceInfo) -> str:
    """The certname ``template`` gives for this instance (not yet validated)."""
    return template.format(
        instance_id=identity.instance_id,
        account=identity.account_id,
        region=identity.region,
        private_ip_dashed=identity.private_ip.replace(".", "-").replace(":", "-"),
        private_dns=instance.private_dns.lower(),
    )


def same_address(a: str, b: str) -> bool:
    """Whether two textual IP addresses are the same host (IPv4-mapped IPv6 included)."""
    try:
        x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    if isinstance(x, ipaddress.IPv6Address) and x.ipv4_mapped is not None:
        x = x.ipv4_mapped
    if isinstance(y, ipaddress.IPv6Address) and y.ipv4_mapped is not None:
        y = y.ipv4_mapped
    return x == y


def precheck(identity: IdentityDocument, now: float, policy: EnrollmentPolicy) -> Refuse | None:
    """The refusals that need no AWS call: checked first, so strangers cost nothing."""
    if identity.account_id not in policy.accounts:
        return Refuse(403, "account-not-allowed", f"account {identity.account_id} may not enroll")
    age = now - identity.pending_time
    if age > policy.max_age:
        return Refuse(
            403, "too-old",
            f"the instance was launched {age:.0f}s ago; enrollment is allowed for {policy.max_age:.0f}s",
        )
    return None


def decide(
    role: str,
    identity: IdentityDocument,
    instance: InstanceInfo | None,
    *,
    source: str | None,
    now: float,
    policy: EnrollmentPolicy,
) -> Decision:
    """
    Admit or refuse ``identity`` (already verified) enrolling as ``role``.  ``instance`` is what
    DescribeInstances found for it in its region (``None``: nothing); ``source`` is the
    connection's source address (``None``: unknown).
    """
    early = precheck(identity, now, policy)
    if early is not None:
        return early
    if role not in ROLES:
        return Refuse(400, "unknown-role", f"role must be one of {', '.join(ROLES)}")
    if (
        instance is None
        or instance.instance_id != identity.instance_id
        or instance.account != identity.account_id
        or instance.region != identity.region
    ):
        return Refuse(
            403, "unknown-instance",
            f"no instance {identity.instance_id} in account {identity.account_id}, {identity.region}",
        )
    if instance.state != "running":
        return Refuse(403, "instance-not-running", f"instance {instance.instance_id} is {instance.state}")
    if not same_address(instance.private_ip, identity.private_ip):
        return Refuse(
            403, "private-ip-mismatch",
            f"instance {instance.instance_id} has private IP {instance.private_ip}, "
            f"not {identity.private_ip}",
        )
    if policy.require_source_match and (source is None or not same_address(source, instance.private_ip)):
        return Refuse(
            403, "source-mismatch",
            f"the request comes from {source or 'an unknown address'}, "
            f"not from the instance's private IP {instance.private_ip}",
        )
    if role != "agent" and not any(rule.matches(instance) for rule in policy.rules_for(role)):
        return Refuse(403, "role-not-permitted", f"instance {instance.instance_id} may not be a {role}")
    certname = certname_for(policy.certname_template, identity, instance)
    problem = certname_problem(certname)
    if problem is not None:
        return Refuse(403, "bad-certname", f"the certname template gives no valid name: {problem}")
    if role == "master" and certname in RESERVED_CA_NAMES:
        # A master's CA is named after it; these names belong to puppetha's own CAs.
        return Refuse(
            403, "bad-certname", f"a master cannot be called {certname!r}: a puppetha CA has that name"
        )
    return Admit(
        role=role,
        certname=certname,
        instance_id=identity.instance_id,
        account=identity.account_id,
        region=identity.region,
        private_ip=instance.private_ip,
        sans=granted_sans(role, certname, instance, policy),
        usage=USAGES[role],
    )


def role_conflict(
    instance_id: str, role: str, held: Iterable[str], policy: EnrollmentPolicy
) -> Refuse | None:
    """
    Refuse ``role`` to an instance that already holds (or is being issued) a certificate for
    another role, unless the operator allows second roles.  One instance is one identity:
    revoking it revokes every certificate it holds, whatever the role.
    """
    others = sorted(set(held) - {role})
    if not others or policy.allow_second_role:
        return None
    return Refuse(
        409, "another-role",
        f"instance {instance_id} has already enrolled as {others[0]}; a second role needs "
        "[enroll] allow_second_role, or `puppetha node reset` of the instance first",
    )


#: Agents are clients only; masters and lb nodes serve TLS and are clients of each other.
USAGES: Mapping[str, Usage] = {"agent": Usage.CLIENT, "master": Usage.BOTH, "lb": Usage.BOTH}


def granted_sans(
    role: str, certname: str, instance: InstanceInfo, policy: EnrollmentPolicy
) -> tuple[str, ...]:
    """Agents: none.  Masters and lb nodes: their private DNS name and the front host."""
    if role == "agent":
        return ()
    names: list[str] = []
    for name in (instance.private_dns.lower(), policy.front_host.lower()):
        if not name or name == certname:
            continue
        try:
            parse_san(name)
        except ValueError:
            continue  # a name no certificate can carry is simply not granted
        if name not in names:
            names.append(name)
    return tuple(names)
