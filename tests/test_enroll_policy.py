"""The enrollment decision, as tables: facts in, Admit or Refuse out."""

from __future__ import annotations

from typing import Any

import pytest
from attrs import evolve

from puppetha.aws.cloud import InstanceInfo, SecurityGroup
from puppetha.aws.identity import IdentityDocument
from puppetha.enroll.policy import (
    Admit,
    EnrollmentPolicy,
    Refuse,
    RoleRule,
    certname_for,
    decide,
    same_address,
)
from puppetha.pki.certs import Usage

NOW = 1_800_000_000.0
ACCOUNT = "123456789012"

IDENTITY = IdentityDocument(
    instance_id="i-0123456789abcdef0",
    account_id=ACCOUNT,
    region="eu-west-1",
    availability_zone="eu-west-1a",
    private_ip="10.1.2.3",
    image_id="ami-0123456789abcdef0",
    instance_type="t3.micro",
    pending_time=NOW - 60,
    architecture="x86_64",
    raw=b"{}",
)

INSTANCE = InstanceInfo(
    instance_id="i-0123456789abcdef0",
    account=ACCOUNT,
    region="eu-west-1",
    state="running",
    private_ip="10.1.2.3",
    private_dns="ip-10-1-2-3.eu-west-1.compute.internal",
    instance_profile_arn="arn:aws:iam::123456789012:instance-profile/puppet-master",
    security_groups=(SecurityGroup("sg-0aaa", "masters"), SecurityGroup("sg-0bbb", "lb-nodes")),
    tags={"Role": "master", "puppetha:role": "lb"},
    launch_time=NOW - 60,
)

POLICY = EnrollmentPolicy(
    accounts=[ACCOUNT],
    max_age=3600,
    front="puppet.example.net:8140",
    master_rules=("tag:Role=master",),
    lb_rules=("sg:lb-nodes",),
)


def run(role: str = "agent", *, identity: Any = None, instance: Any = INSTANCE, source: Any = "10.1.2.3",
        now: float = NOW, policy: EnrollmentPolicy = POLICY) -> Admit | Refuse:
    return decide(role, identity or IDENTITY, instance, source=source, now=now, policy=policy)


REFUSALS = [
    # (what, arguments, status, code)
    ("other account", {"identity": evolve(IDENTITY, account_id="210987654321")}, 403, "account-not-allowed"),
    ("no accounts allowed", {"policy": evolve(POLICY, accounts=[])}, 403, "account-not-allowed"),
    ("too old", {"now": IDENTITY.pending_time + 3601}, 403, "too-old"),
    ("unknown instance", {"instance": None}, 403, "unknown-instance"),
    ("another instance answered", {"instance": evolve(INSTANCE, instance_id="i-0fffffffffffffff0")},
     403, "unknown-instance"),
    ("instance of another account", {"instance": evolve(INSTANCE, account="210987654321")},
     403, "unknown-instance"),
    ("instance in another region", {"instance": evolve(INSTANCE, region="us-east-1")},
     403, "unknown-instance"),
    ("stopped", {"instance": evolve(INSTANCE, state="stopped")}, 403, "instance-not-running"),
    ("pending", {"instance": evolve(INSTANCE, state="pending")}, 403, "instance-not-running"),
    ("terminated", {"instance": evolve(INSTANCE, state="terminated")}, 403, "instance-not-running"),
    ("private IP differs", {"instance": evolve(INSTANCE, private_ip="10.1.2.4")}, 403, "private-ip-mismatch"),
    ("source differs", {"source": "10.9.9.9"}, 403, "source-mismatch"),
    ("source unknown", {"source": None}, 403, "source-mismatch"),
    ("source not an address", {"source": "somewhere"}, 403, "source-mismatch"),
    ("master without a matching rule", {"role": "master", "instance": evolve(INSTANCE, tags={})},
     403, "role-not-permitted"),
    ("master with an empty policy", {"role": "master", "policy": evolve(POLICY, master_rules=())},
     403, "role-not-permitted"),
    ("lb without a matching group", {"role": "lb", "instance": evolve(INSTANCE, security_groups=())},
     403, "role-not-permitted"),
    ("lb with an empty policy", {"role": "lb", "policy": evolve(POLICY, lb_rules=())},
     403, "role-not-permitted"),
    ("tag value differs", {"role": "master", "instance": evolve(INSTANCE, tags={"Role": "masterx"})},
     403, "role-not-permitted"),
    ("unknown role", {"role": "admin"}, 400, "unknown-role"),
    ("template without a DNS name", {
        "instance": evolve(INSTANCE, private_dns=""),
        "policy": evolve(POLICY, certname_template="{private_dns}.{instance_id}"),
    }, 403, "bad-certname"),
    ("master named like the lb CA", {
        "role": "master", "identity": evolve(IDENTITY, instance_id="lb"),
        "instance": evolve(INSTANCE, instance_id="lb"),
    }, 403, "bad-certname"),
    ("master named like the root CA", {
        "role": "master", "identity": evolve(IDENTITY, instance_id="root"),
        "instance": evolve(INSTANCE, instance_id="root"),
    }, 403, "bad-certname"),
]


@pytest.mark.parametrize(("what", "arguments", "status", "code"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(what: str, arguments: dict[str, Any], status: int, code: str) -> None:
    decision = run(**arguments)
    assert isinstance(decision, Refuse), what
    assert (decision.status, decision.code) == (status, code)
    assert decision.message


ADMISSIONS = [
    # (what, arguments, certname, sans, usage)
    ("agent", {}, "i-0123456789abcdef0", (), Usage.CLIENT),
    ("agent, source check off", {"source": "10.9.9.9", "policy": evolve(POLICY, require_source_match=False)},
     "i-0123456789abcdef0", (), Usage.CLIENT),
    ("agent, IPv4-mapped source", {"source": "::ffff:10.1.2.3"}, "i-0123456789abcdef0", (), Usage.CLIENT),
    ("master by tag", {"role": "master"}, "i-0123456789abcdef0",
     ("ip-10-1-2-3.eu-west-1.compute.internal", "puppet.example.net"), Usage.BOTH),
    ("master by profile", {"role": "master", "policy": evolve(POLICY, master_rules=(
        "profile:arn:aws:iam::123456789012:instance-profile/puppet-master",))},
     "i-0123456789abcdef0", ("ip-10-1-2-3.eu-west-1.compute.internal", "puppet.example.net"), Usage.BOTH),
    ("master by group id", {"role": "master", "policy": evolve(POLICY, master_rules=("sg:sg-0aaa",))},
     "i-0123456789abcdef0", ("ip-10-1-2-3.eu-west-1.compute.internal", "puppet.example.net"), Usage.BOTH),
    ("lb by group name", {"role": "lb"}, "i-0123456789abcdef0",
     ("ip-10-1-2-3.eu-west-1.compute.internal", "puppet.example.net"), Usage.BOTH),
    ("lb by tag with a colon", {"role": "lb", "policy": evolve(POLICY, lb_rules=("tag:puppetha:role=lb",))},
     "i-0123456789abcdef0", ("ip-10-1-2-3.eu-west-1.compute.internal", "puppet.example.net"), Usage.BOTH),
    ("templated certname", {"policy": evolve(
        POLICY, certname_template="{instance_id}.{region}.{account}")},
     "i-0123456789abcdef0.eu-west-1.123456789012", (), Usage.CLIENT),
    ("certname from the private IP", {"policy": evolve(
        POLICY, certname_template="node-{private_ip_dashed}-{instance_id}")},
     "node-10-1-2-3-i-0123456789abcdef0", (), Usage.CLIENT),
    ("master on an IP front", {"role": "master", "policy": evolve(POLICY, front="10.0.0.10:8140")},
     "i-0123456789abcdef0", ("ip-10-1-2-3.eu-west-1.compute.internal", "10.0.0.10"), Usage.BOTH),
    ("master without a private DNS name", {"role": "master", "instance": evolve(INSTANCE, private_dns="")},
     "i-0123456789abcdef0", ("puppet.example.net",), Usage.BOTH),
    ("at exactly the maximum age", {"now": IDENTITY.pending_time + 3600}, "i-0123456789abcdef0", (),
     Usage.CLIENT),
]


@pytest.mark.parametrize(
    ("what", "arguments", "certname", "sans", "usage"), ADMISSIONS, ids=[a[0] for a in ADMISSIONS]
)
def test_admissions(what: str, arguments: dict[str, Any], certname: str, sans: tuple[str, ...],
                    usage: Usage) -> None:
    decision = run(**arguments)
    assert isinstance(decision, Admit), decision
    assert decision.certname == certname
    assert decision.sans == sans
    assert decision.usage is usage
    assert (decision.instance_id, decision.account, decision.region, decision.private_ip) == (
        "i-0123456789abcdef0", ACCOUNT, "eu-west-1", "10.1.2.3")


def test_the_first_failing_check_answers() -> None:
    # Another account *and* stopped *and* wrong source: the account is refused first, before
    # anything about the instance is revealed.
    decision = run(
        identity=evolve(IDENTITY, account_id="210987654321"),
        instance=evolve(INSTANCE, state="stopped"),
        source="10.9.9.9",
    )
    assert isinstance(decision, Refuse)
    assert decision.code == "account-not-allowed"


RULES = [
    ("tag:Role=master", RoleRule("tag", "Role", "master")),
    ("tag:puppetha:role=lb", RoleRule("tag", "puppetha:role", "lb")),
    ("tag:Empty=", RoleRule("tag", "Empty", "")),
    ("profile:arn:aws:iam::1:instance-profile/x", RoleRule("profile", "arn:aws:iam::1:instance-profile/x")),
    ("sg:sg-0aaa", RoleRule("sg", "sg-0aaa")),
]


@pytest.mark.parametrize(("text", "rule"), RULES)
def test_rule_parsing(text: str, rule: RoleRule) -> None:
    assert RoleRule.parse(text) == rule
    assert str(rule) == text


@pytest.mark.parametrize("text", ["tag:Role", "tag:=x", "profile:name", "sg:", "owner:me", "Role=master"])
def test_bad_rules_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="rule"):
        RoleRule.parse(text)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("certname_template", "{hostname}"),
        ("certname_template", "{account}"),
        ("front", "puppet"),
        ("front", "puppet:0"),
        ("front", "bad name!:8140"),
        ("master_rules", ("owner:me",)),
    ],
)
def test_bad_policy_settings_are_refused(setting: str, value: Any) -> None:
    arguments: dict[str, Any] = {"accounts": [ACCOUNT], "max_age": 60, "front": "puppet:8140", setting: value}
    with pytest.raises(ValueError):  # noqa: PT011 - each message is checked where it is made
        EnrollmentPolicy(**arguments)


def test_profile_rule_never_matches_an_instance_without_a_profile() -> None:
    rule = RoleRule("profile", "")
    assert not rule.matches(evolve(INSTANCE, instance_profile_arn=""))


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("10.0.0.1", "10.0.0.1", True),
        ("::ffff:10.0.0.1", "10.0.0.1", True),
        ("10.0.0.1", "10.0.0.2", False),
        ("fd00::1", "fd00:0::1", True),
        ("not-an-ip", "not-an-ip", False),
    ],
)
def test_same_address(a: str, b: str, same: bool) -> None:
    assert same_address(a, b) is same


def test_certname_template_fields() -> None:
    name = certname_for(
        "{instance_id}-{account}-{region}-{private_ip_dashed}-{private_dns}", IDENTITY, INSTANCE
    )
    assert name == (
        "i-0123456789abcdef0-123456789012-eu-west-1-10-1-2-3-ip-10-1-2-3.eu-west-1.compute.internal"
    )
