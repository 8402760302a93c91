"""
Enrollment end to end in memory: real moto as AWS, the test AWS signer, the SQLite store and
the real certificate authority, through the HTTP resource.  Every refusal also shows that
nothing was stored or issued.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, cast

import pytest
from attrs import evolve
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, globalLogPublisher

from puppetha.aws.boto import Boto3Cloud
from puppetha.enroll.service import (
    Enrollment,
    EnrollmentRequest,
    IssuedEnrollment,
    public_key_id,
    reset_enrollment,
    revoke_identity,
)
from puppetha.ha.nginx import FrontPorts
from puppetha.instance.puppetserver import check_lb_ca
from puppetha.pki.authority import LB_CA, ROOT
from puppetha.pki.certs import PP_INSTANCE_ID, puppet_extension
from puppetha.store import IStore, StoreUnavailable
from puppetha.store.dynamodb import DynamoDBStore
from puppetha.store.records import EnrollmentClaim, LbNodeRecord, MasterRecord, NodeRecord
from puppetha.testing.aws import FakeAWSSigner, make_document
from puppetha.threads import Blocking
from tests.aws_fixtures import boto_test_credentials

pytest.register_assert_rewrite("tests.enroll_fixtures")

from tests.enroll_fixtures import (  # noqa: E402 - after the rewrite hook
    FRONT,
    LB_RULE,
    InlinePool,
    InlineReactor,
    SwitchableStore,
    World,
    build_world,
    inline,
    make_csr,
    make_policy,
    weak_rsa_key,
)

pytest_plugins = ["tests.enroll_fixtures"]


NOT_A_CSR = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"


def load(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def sans_of(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in ext]


def enroll_master(world: World):
    master = world.launch("master")
    answer = world.enroll(master, "master")
    assert answer.status == 200, answer.body
    return master, answer


# -- happy paths ---------------------------------------------------------------------------


def test_master_enrolls_gets_its_own_ca_and_is_registered(world: World) -> None:
    master = world.launch("master")
    granted = [x509.DNSName(master.private_dns), x509.DNSName("puppet.example.net")]
    csr = make_csr(master.instance_id, sans=granted)
    answer = world.enroll(master, "master", csr=csr)
    assert answer.status == 200, answer.body
    body = answer.json
    assert body["certname"] == master.instance_id
    assert body["role"] == "master"
    assert body["server"] == FRONT
    assert body["test_server"] == FRONT

    cert = load(body["certificate"])
    intermediate = load(body["ca_certificate"])
    chain = x509.load_pem_x509_certificates(body["ca_chain"].encode())
    assert chain[0] == intermediate
    assert cert.issuer == intermediate.subject
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert sans_of(cert) == [master.instance_id, master.private_dns, "puppet.example.net"]
    assert "OK" in world.verify(body)
    # Every CA's CRL is in the chain: the root, the new intermediate and the lb CA.
    assert body["crl_chain"].count("-----BEGIN X509 CRL-----") == 3
    # What its puppetserver trusts: the lb CA (chained to the root) and its CRL.
    lb_chain = x509.load_pem_x509_certificates(body["lb_ca_chain"].encode())
    assert lb_chain == [world.authority.certificate(LB_CA), world.authority.certificate(ROOT)]
    check_lb_ca(body["lb_ca_chain"].split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")
    lb_crl = x509.load_pem_x509_crl(body["lb_crl"].encode())
    assert lb_crl.issuer == lb_chain[0].subject
    assert lb_crl.is_signature_valid(lb_chain[0].public_key())  # type: ignore[arg-type]
    assert "PRIVATE KEY" not in answer.body.decode()

    registered = world.records.get(MasterRecord, master.instance_id)
    assert registered is not None
    assert (registered.record.address, registered.record.port, registered.record.healthy,
            registered.record.ca) == (master.private_ip, 8140, True, master.instance_id)
    node = world.records.get(NodeRecord, master.instance_id)
    assert node is not None
    assert node.record.role == "master"
    assert node.record.serial == cert.serial_number
    claim = world.records.get(EnrollmentClaim, f"{master.instance_id}/master")
    assert claim is not None
    assert claim.record.state == "issued"


def test_agent_enrolls_signed_by_a_healthy_master(world: World) -> None:
    master, _ = enroll_master(world)
    agent = world.launch("agent")
    answer = world.enroll(agent)
    assert answer.status == 200, answer.body
    body = answer.json
    assert set(body) == {"certname", "role", "certificate", "ca_chain", "crl_chain", "server", "test_server"}
    # The first run goes through the front's own port for the issuing master (the first one).
    assert body["test_server"] == "puppet.example.net:8141"
    cert = load(body["certificate"])
    chain = x509.load_pem_x509_certificates(body["ca_chain"].encode())
    assert len(chain) == 2
    assert cert.issuer == chain[0].subject
    assert f"CN={master.instance_id}" in chain[0].subject.rfc4514_string()
    assert cert.subject.rfc4514_string() == f"CN={agent.instance_id}"
    assert sans_of(cert) == [agent.instance_id]
    instance_id = cert.extensions.get_extension_for_oid(PP_INSTANCE_ID).value
    assert instance_id == puppet_extension(PP_INSTANCE_ID, agent.instance_id)
    assert "OK" in world.verify(body)

    node = world.records.get(NodeRecord, agent.instance_id)
    assert node is not None
    assert (node.record.role, node.record.issuer, node.record.private_ip, node.record.account) == (
        "agent", master.instance_id, agent.private_ip, agent.account)


def test_lb_node_enrolls_with_a_certificate_from_the_lb_ca(world: World) -> None:
    lb = world.launch("lb", security_groups=["lb-nodes"])
    answer = world.enroll(lb, "lb")
    assert answer.status == 200, answer.body
    body = answer.json
    chain = x509.load_pem_x509_certificates(body["ca_chain"].encode())
    # The lb CA, made on demand under the root, signs lb nodes and nothing else.
    assert chain == [world.authority.certificate(LB_CA), world.authority.certificate(ROOT)]
    assert world.authority.ca(LB_CA).parent == ROOT
    assert "lb_ca_chain" not in body
    cert = load(body["certificate"])
    assert cert.issuer == chain[0].subject
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {u.dotted_string for u in usages} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    assert sans_of(cert) == [lb.instance_id, lb.private_dns, "puppet.example.net"]
    assert "OK" in world.verify(body)
    assert world.records.get(MasterRecord, lb.instance_id) is None


def test_agents_first_run_goes_to_their_masters_own_port_on_the_front(world: World) -> None:
    masters = [enroll_master(world)[0] for _ in range(3)]
    records = {m.instance_id: world.records.get(MasterRecord, m.instance_id) for m in masters}
    # The lb nodes' rule: registration order, then certname, from first_master.
    ordered = sorted(
        (v.record for v in records.values() if v is not None), key=lambda r: (r.registered_at, r.certname)
    )
    ports = {r.certname: 8141 + i for i, r in enumerate(ordered)}
    seen = {}
    for _ in range(3):
        agent = world.launch("agent")
        answer = world.enroll(agent)
        assert answer.status == 200, answer.body
        node = world.records.get(NodeRecord, agent.instance_id)
        assert node is not None
        seen[node.record.issuer] = answer.json["test_server"]
    assert seen == {name: f"puppet.example.net:{port}" for name, port in ports.items()}


def test_a_master_enrolling_again_keeps_its_place_and_port(world: World) -> None:
    first, _ = enroll_master(world)
    enroll_master(world)
    before = world.records.get(MasterRecord, first.instance_id)
    assert before is not None
    world.clock.advance(600)
    reset_enrollment(world.records, first.instance_id)
    assert world.enroll(first, "master").status == 200
    after = world.records.get(MasterRecord, first.instance_id)
    assert after is not None
    assert after.record.registered_at == before.record.registered_at


def test_a_draining_master_gets_no_agents_and_enrolling_again_does_not_end_its_drain(world: World) -> None:
    draining, _ = enroll_master(world)
    other, _ = enroll_master(world)
    found = world.records.get(MasterRecord, draining.instance_id)
    assert found is not None
    marked_at = world.clock.seconds()
    world.records.replace(evolve(found.record, draining_since=marked_at, drain_token=7), found.version)
    # The draining master enrolls again (a reset identity, or its own host asking anew): its
    # registration keeps the drain, so it cannot win agents back by enrolling.
    world.clock.advance(600)
    reset_enrollment(world.records, draining.instance_id)
    assert world.enroll(draining, "master").status == 200
    after = world.records.get(MasterRecord, draining.instance_id)
    assert after is not None
    assert (after.record.draining_since, after.record.drain_token) == (marked_at, 7)
    issuers = set()
    for _ in range(3):
        agent = world.launch("agent")
        answer = world.enroll(agent)
        assert answer.status == 200, answer.body
        node = world.records.get(NodeRecord, agent.instance_id)
        assert node is not None
        issuers.add(node.record.issuer)
    assert issuers == {other.instance_id}


def test_masters_beyond_the_reserved_ports_send_agents_to_the_front(
    enroll_aws, aws_signer, tmp_path: Path
) -> None:
    ports = FrontPorts(first_master=9000, max_masters=1)
    world = build_world(enroll_aws, aws_signer, tmp_path, front_ports=ports)
    try:
        enroll_master(world)
        enroll_master(world)
        answers = []
        for _ in range(2):
            answer = world.enroll(world.launch("agent"))
            assert answer.status == 200, answer.body
            answers.append(answer.json["test_server"])
        assert sorted(answers) == [FRONT, "puppet.example.net:9000"]
    finally:
        world.store.close()


def test_agents_are_spread_over_healthy_masters(world: World) -> None:
    first, _ = enroll_master(world)
    second, _ = enroll_master(world)
    # An unhealthy master is never chosen.
    third, _ = enroll_master(world)
    record = world.records.get(MasterRecord, third.instance_id)
    assert record is not None
    world.records.replace(evolve(record.record, healthy=False), record.version)

    issuers = []
    for _ in range(4):
        agent = world.launch("agent")
        assert world.enroll(agent).status == 200
        node = world.records.get(NodeRecord, agent.instance_id)
        assert node is not None
        issuers.append(node.record.issuer)
    assert sorted(issuers) == sorted([first.instance_id, second.instance_id] * 2)
    assert issuers[0] != issuers[1]


def test_agent_without_any_master_is_asked_to_retry(world: World) -> None:
    agent = world.launch("agent")
    before = world.state()
    answer = world.enroll(agent)
    assert answer.status == 503
    assert answer.error == "no-master"
    assert int(answer.headers["retry-after"]) > 0
    assert world.state() == before
    # Once a master is there, the same instance enrolls.
    enroll_master(world)
    assert world.enroll(agent).status == 200


def test_answers_are_counted_by_role_and_refusals_by_code(world: World) -> None:
    agent = world.launch("agent")
    assert world.enroll(agent).error == "no-master"
    enroll_master(world)
    assert world.enroll(agent).status == 200
    assert world.enroll(agent, csr=make_csr(agent.instance_id)).error == "already-enrolled"
    # Refused for its shape by the API, before the enrollment: counted with the others.
    assert world.call("/v1/enroll", b"{not json").error == "malformed-json"
    assert world.enrollment.enrolled == {"master": 1, "agent": 1}
    assert world.enrollment.refused == {"no-master": 1, "already-enrolled": 1, "malformed-json": 1}


# -- identity refusals ------------------------------------------------------------------------


def refused(world: World, answer, status: int, code: str, before) -> None:
    assert (answer.status, answer.error) == (status, code), answer.body
    assert answer.json["message"]
    assert world.state() == before, "a refusal stored or issued something"


@pytest.fixture
def ready(world: World) -> World:
    """A world with one enrolled master, so agents could be issued."""
    enroll_master(world)
    return world


def test_forged_signature_random_bytes(ready: World) -> None:
    agent = ready.launch()
    before = ready.state()
    answer = ready.enroll(agent, signature=base64.b64encode(os.urandom(1200)).decode())
    refused(ready, answer, 403, "identity-malformed", before)


def test_signature_from_an_untrusted_key(ready: World) -> None:
    agent = ready.launch()
    impostor = FakeAWSSigner.create("us-east-1")
    document, signature = impostor.identity_for(agent)
    before = ready.state()
    answer = ready.enroll(agent, document=document, signature=signature)
    refused(ready, answer, 403, "identity-bad-signature", before)


def test_untrusted_key_with_its_certificate_embedded(ready: World) -> None:
    agent = ready.launch()
    impostor = FakeAWSSigner.create("us-east-1")
    document = make_document(agent)
    signature = impostor.sign(document, embed_certificate=True)
    before = ready.state()
    answer = ready.enroll(agent, document=document, signature=signature)
    refused(ready, answer, 403, "identity-bad-signature", before)


def test_document_edited_after_signing(ready: World) -> None:
    agent = ready.launch()
    document, signature = ready.signer.identity_for(agent)
    edited = document.replace(b'"t3.micro"', b'"m5.large"')
    assert edited != document
    before = ready.state()
    answer = ready.enroll(agent, document=edited, signature=signature)
    refused(ready, answer, 403, "identity-document-mismatch", before)


def test_region_without_a_trusted_certificate(ready: World) -> None:
    agent = ready.launch()
    other = FakeAWSSigner.create("eu-west-1")
    document = make_document(evolve(agent, region="eu-west-1"))
    before = ready.state()
    answer = ready.enroll(agent, document=document, signature=other.sign(document))
    refused(ready, answer, 403, "identity-untrusted-region", before)


def test_other_account(ready: World) -> None:
    agent = ready.launch()
    document = make_document(evolve(agent, account="210987654321"))
    before = ready.state()
    calls = ready.enrollment.batcher.calls
    answer = ready.enroll(agent, document=document)
    refused(ready, answer, 403, "account-not-allowed", before)
    assert ready.enrollment.batcher.calls == calls, "AWS was asked about a stranger"


def test_unknown_instance(ready: World) -> None:
    agent = ready.launch()
    document = make_document(evolve(agent, instance_id="i-0badbadbadbadbad0"))
    before = ready.state()
    answer = ready.enroll(agent, document=document)
    refused(ready, answer, 403, "unknown-instance", before)


def test_stopped_instance(ready: World) -> None:
    agent = ready.launch()
    ready.fleet.stop(agent.instance_id)
    before = ready.state()
    answer = ready.enroll(agent)
    refused(ready, answer, 403, "instance-not-running", before)


def test_private_ip_mismatch(ready: World) -> None:
    agent = ready.launch()
    document = make_document(evolve(agent, private_ip="10.20.1.250"))
    before = ready.state()
    answer = ready.enroll(agent, document=document, source="10.20.1.250")
    refused(ready, answer, 403, "private-ip-mismatch", before)


def test_source_address_mismatch(ready: World) -> None:
    agent = ready.launch()
    before = ready.state()
    answer = ready.enroll(agent, source="10.20.1.99")
    refused(ready, answer, 403, "source-mismatch", before)


def test_too_old(ready: World) -> None:
    agent = ready.launch()
    ready.clock.advance(3600 + 1)
    before = ready.state()
    answer = ready.enroll(agent)
    refused(ready, answer, 403, "too-old", before)


def test_master_not_permitted(ready: World) -> None:
    impostor = ready.launch("agent")  # no master tag
    before = ready.state()
    answer = ready.enroll(impostor, "master")
    refused(ready, answer, 403, "role-not-permitted", before)


# -- one enrollment per instance and role -----------------------------------------------------


def test_a_replay_with_the_same_key_gets_the_same_certificate_and_issues_nothing(ready: World) -> None:
    """The answer was lost (timeout, crash, a failed write): the holder of the key asks again."""
    agent = ready.launch()
    body = json.dumps(ready.body_for(agent)).encode()
    first = ready.call("/v1/enroll", body, source=agent.private_ip)
    assert first.status == 200
    before = ready.state()
    again = ready.call("/v1/enroll", body, source=agent.private_ip)
    assert again.status == 200, again.body
    assert again.json == first.json
    assert ready.state() == before


def test_another_key_is_refused_after_the_enrollment(ready: World) -> None:
    agent = ready.launch()
    assert ready.enroll(agent).status == 200
    before = ready.state()  # before the request: what it signs counts too
    refused(ready, ready.enroll(agent), 409, "already-enrolled", before)


def test_race_of_two_enrollments_exactly_one_wins(ready: World) -> None:
    agent = ready.launch()
    calls = ready.enrollment.batcher.calls
    bodies = [json.dumps(ready.body_for(agent)).encode() for _ in range(2)]
    issued = ready.issued()
    pending = [ready.start("/v1/enroll", b, source=agent.private_ip) for b in bodies]
    answers = ready.finish(*pending)
    assert sorted(a.status for a in answers) == [200, 409]
    assert ready.issued() == issued + 1
    # Both lookups went to AWS in one DescribeInstances call.
    assert ready.enrollment.batcher.calls == calls + 1
    winner = next(a for a in answers if a.status == 200)
    node = ready.records.get(NodeRecord, agent.instance_id)
    assert node is not None
    assert node.record.certificate_pem == winner.json["certificate"]


def test_reset_allows_a_new_enrollment(ready: World) -> None:
    agent = ready.launch()
    assert ready.enroll(agent).status == 200
    assert ready.enroll(agent).status == 409
    assert reset_enrollment(ready.records, agent.instance_id) == [f"{agent.instance_id}/agent"]
    again = ready.enroll(agent)
    assert again.status == 200
    node = ready.records.get(NodeRecord, agent.instance_id)
    assert node is not None
    assert node.record.certificate_pem == again.json["certificate"]
    # By certname, too (the same here), and only the role named.
    assert reset_enrollment(ready.records, agent.instance_id, role="master") == []


def test_a_second_role_is_refused_and_changes_nothing(ready: World) -> None:
    """One instance, one identity: an lb node may not also become an agent unless allowed."""
    lb = ready.launch("lb", security_groups=["lb-nodes"])
    assert ready.enroll(lb, "lb").status == 200
    assert ready.enroll(lb, "lb").status == 409
    before = ready.state()  # before the request: what it signs counts too
    refused(ready, ready.enroll(lb, "agent"), 409, "another-role", before)
    node = ready.records.get(NodeRecord, lb.instance_id)
    assert node is not None
    assert node.record.roles == ("lb",)


def test_the_privileged_role_is_refused_after_the_agent_one_too(ready: World) -> None:
    master = ready.launch("master")
    assert ready.enroll(master, "agent").status == 200
    before = ready.state()  # before the request: what it signs counts too
    refused(ready, ready.enroll(master, "master"), 409, "another-role", before)


# -- CSR refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("what", "csr", "code"),
    [
        ("another name", lambda i: make_csr("i-0fffffffffffffff0"), "csr-subject"),
        ("extra SAN", lambda i: make_csr(i.instance_id, sans=[x509.DNSName("puppet.example.net")]),
         "csr-san"),
        ("IP SAN", lambda i: make_csr(i.instance_id, sans=[x509.IPAddress(IPv4Address("10.0.0.1"))]),
         "csr-san"),
        ("CA rights", lambda i: make_csr(i.instance_id, ca=True), "csr-ca-request"),
        ("weak key", lambda i: make_csr(i.instance_id, key=weak_rsa_key()), "csr-weak-key"),
        ("other curve", lambda i: make_csr(i.instance_id, key=ec.generate_private_key(ec.SECP384R1())),
         "csr-key-type"),
        ("another instance id", lambda i: make_csr(
            i.instance_id, extensions=[puppet_extension(PP_INSTANCE_ID, "i-0fffffffffffffff0")]),
         "csr-extension"),
        ("not a CSR", lambda i: NOT_A_CSR, "csr-malformed"),
    ],
)
def test_csr_against_policy_is_refused_and_the_claim_released(ready: World, what, csr, code) -> None:
    agent = ready.launch()
    before = ready.state()
    answer = ready.enroll(agent, csr=csr(agent))
    refused(ready, answer, 400, code, before)
    # The claim was released: a corrected request succeeds.
    assert ready.enroll(agent).status == 200


def test_master_csr_refused_leaves_no_ca_behind(world: World) -> None:
    master = world.launch("master")
    before = world.state()
    answer = world.enroll(master, "master", csr=make_csr(master.instance_id, ca=True))
    refused(world, answer, 400, "csr-ca-request", before)
    assert world.enroll(master, "master").status == 200


def test_master_may_not_ask_for_names_beyond_its_grant(world: World) -> None:
    master = world.launch("master")
    before = world.state()
    csr = make_csr(master.instance_id, sans=[x509.DNSName("evil.example.net")])
    answer = world.enroll(master, "master", csr=csr)
    refused(world, answer, 400, "csr-san", before)


# -- dependencies down ------------------------------------------------------------------------


def test_aws_down_is_503_and_stores_nothing(enroll_aws, aws_signer, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = Boto3Cloud(f"http://127.0.0.1:{port}", access_key_id="testing", secret_access_key="testing",
                      deadline=1.0)
    world = build_world(enroll_aws, aws_signer, tmp_path, cloud=dead)
    try:
        agent = world.launch()
        before = world.state()
        answer = world.enroll(agent)
        refused(world, answer, 503, "aws-unavailable", before)
        assert int(answer.headers["retry-after"]) > 0
    finally:
        world.store.close()


def test_store_down_is_503(enroll_aws, aws_signer, tmp_path: Path) -> None:
    switch = SwitchableStore.wrapping
    world = build_world(enroll_aws, aws_signer, tmp_path, store_wrapper=switch)
    try:
        enroll_master(world)
        agent = world.launch()
        store = world.records.store
        assert isinstance(store, SwitchableStore)
        store.down = True
        answer = world.enroll(agent)
        assert (answer.status, answer.error) == (503, "store-unavailable")
        assert int(answer.headers["retry-after"]) > 0
        store.down = False
        assert world.enroll(agent).status == 200
    finally:
        world.store.close()


def test_lb_policy_is_configurable(enroll_aws, aws_signer, tmp_path: Path) -> None:
    world = build_world(enroll_aws, aws_signer, tmp_path, policy=make_policy(lb_rules=()))
    try:
        lb = world.launch("lb", security_groups=["lb-nodes"])
        before = world.state()
        refused(world, world.enroll(lb, "lb"), 403, "role-not-permitted", before)
        assert LB_RULE  # the default world permits it: see the lb happy path
    finally:
        world.store.close()


def test_a_registered_master_is_announced_at_once(world: World) -> None:
    announced: list[str] = []
    world.enrollment.on_master = lambda: announced.append("master")
    enroll_master(world)
    assert announced == ["master"]
    agent = world.launch("agent")
    assert world.enroll(agent).status == 200
    refused_again = world.enroll(world.launch("master"), "master", signature="AAAA")
    assert refused_again.status == 403
    assert announced == ["master"]  # agents and refusals announce nothing


def test_a_failing_announcement_does_not_lose_a_recorded_enrollment(world: World) -> None:
    """The master is recorded (a retry would be 409): its answer must reach it all the same."""

    def announce() -> None:
        raise RuntimeError("the front could not be poked")

    world.enrollment.on_master = announce
    master, answer = enroll_master(world)
    assert load(answer.json["certificate"]).subject.rfc4514_string() == f"CN={master.instance_id}"
    assert world.records.get(MasterRecord, master.instance_id) is not None


def test_after_the_operators_reset_a_node_enrolls_again_with_a_new_certificate(world: World) -> None:
    """What `puppetha node reset` does: revoke, forget the claim and the node record."""
    master, _ = enroll_master(world)
    agent = world.launch("agent")
    first = world.enroll(agent)
    assert first.status == 200
    for instance, role in ((agent, "agent"), (master, "master")):
        node = world.records.get(NodeRecord, instance.instance_id)
        assert node is not None
        world.authority.revoke(node.record.issuer, node.record.serial, node.record.certname,
                               "superseded", not_after=node.record.not_after)
        world.store.delete(EnrollmentClaim.KIND, f"{instance.instance_id}/{role}")
        world.store.delete(NodeRecord.KIND, instance.instance_id)
    world.clock.advance(60)
    assert world.enroll(master, "master").status == 200
    again = world.enroll(agent)
    assert again.status == 200, again.body
    assert again.json["certificate"] != first.json["certificate"]
    assert "OK" in world.verify(again.json)


# -- one instance, one identity: revocation covers every certificate --------------------------


@pytest.fixture(params=["sqlite", "dynamodb"])
def second_roles(request: pytest.FixtureRequest, enroll_aws, aws_signer, tmp_path: Path) -> Iterator[World]:
    """A world whose operator allows second roles, on each store backend."""
    make_store = None
    if request.param == "dynamodb":
        credentials = request.getfixturevalue("dynamodb_credentials")
        assert credentials is not None

        def make_store(tmp: Path) -> IStore:
            table = f"puppetha-{tmp.name}"[:200]
            store = DynamoDBStore(table, "us-east-1", enroll_aws.moto.endpoint_url)
            store.create_table(deletion_protection=False)
            return store

    built = build_world(enroll_aws, aws_signer, tmp_path, policy=make_policy(allow_second_role=True),
                        make_store=make_store)
    yield built
    built.store.close()


@pytest.fixture
def dynamodb_credentials() -> Iterator[object]:
    with boto_test_credentials() as env:
        yield env


def test_role_switch_then_revoke_leaves_no_certificate_of_the_instance_verifying(second_roles: World) -> None:
    world = second_roles
    master, as_master = enroll_master(world)
    as_agent = world.enroll(master, "agent")
    assert as_agent.status == 200, as_agent.body
    node = world.records.get(NodeRecord, master.instance_id)
    assert node is not None
    assert node.record.roles == ("master", "agent")
    assert {c.serial for c in node.record.certificates} == {
        load(as_master.json["certificate"]).serial_number, load(as_agent.json["certificate"]).serial_number}
    for answer in (as_master, as_agent):
        assert "OK" in world.verify(answer.json)

    done = revoke_identity(world.records, world.authority, master.instance_id, "keyCompromise",
                           world.clock.seconds)
    assert done is not None
    assert done.deregistered == (master.instance_id,)
    crls = world.authority.crl_chain_pem().decode()
    for answer in (as_master, as_agent):
        verdict = world.verify({**answer.json, "crl_chain": crls})
        assert "certificate revoked" in verdict, verdict
    after = world.records.get(NodeRecord, master.instance_id)
    assert after is not None
    assert after.record.revoked
    # Gone from the registry in the same transaction: no new agents are sent to it.
    assert world.records.get(MasterRecord, master.instance_id) is None
    assert world.enroll(world.launch("agent")).error == "no-master"
    before = world.state()  # before the request: what it signs counts too
    refused(world, world.enroll(master, "master"), 409, "already-enrolled", before)


def test_revoking_an_lb_node_deregisters_it_from_the_lb_nodes_in_the_same_transaction(ready: World) -> None:
    lb = ready.launch("lb", security_groups=["lb-nodes"])
    answer = ready.enroll(lb, "lb")
    assert answer.status == 200, answer.body
    # Its daemon registers itself for heartbeats and `puppetha status`.
    ready.records.create(LbNodeRecord(node=lb.instance_id, address=lb.private_ip, port=7946,
                                      registered_at=1.0))
    done = revoke_identity(ready.records, ready.authority, lb.instance_id, "keyCompromise",
                           ready.clock.seconds)
    assert done is not None
    assert done.deregistered_lb == (lb.instance_id,)
    assert ready.records.get(LbNodeRecord, lb.instance_id) is None
    verdict = ready.verify({**answer.json, "crl_chain": ready.authority.crl_chain_pem().decode()})
    assert "certificate revoked" in verdict, verdict


def test_a_new_role_on_a_revoked_identity_is_refused(second_roles: World) -> None:
    world = second_roles
    both = world.launch("master", security_groups=["lb-nodes"])
    assert world.enroll(both, "master").status == 200
    assert revoke_identity(world.records, world.authority, both.instance_id, "unspecified",
                           world.clock.seconds) is not None
    before = world.state()  # before the request: the certificates signed count too
    refused(world, world.enroll(both, "lb"), 409, "revoked", before)


# -- idempotent per key: a crash or a lost answer does not strand an instance ------------------


def _key_id(csr_pem: bytes) -> str:
    return public_key_id(x509.load_pem_x509_csr(csr_pem))


def test_an_unfinished_claim_is_resumed_at_once_by_the_same_key(ready: World) -> None:
    """What a daemon killed between claim and record leaves: the same key goes on, no waiting."""
    agent = ready.launch()
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(agent.instance_id, key=key)
    ready.records.create(EnrollmentClaim(agent.instance_id, "agent", agent.instance_id,
                                         ready.clock.seconds(), public_key=_key_id(csr)))
    before = ready.state()
    refused(ready, ready.enroll(agent), 409, "already-enrolled", before)  # another key
    answer = ready.enroll(agent, csr=make_csr(agent.instance_id, key=key))  # same key, new CSR
    assert answer.status == 200, answer.body
    assert "OK" in ready.verify(answer.json)
    claim = ready.records.get(EnrollmentClaim, f"{agent.instance_id}/agent")
    assert claim is not None
    assert (claim.record.state, claim.record.certificate_pem) == ("issued", answer.json["certificate"])


def test_a_master_asking_again_with_its_key_gets_its_whole_answer_again(world: World) -> None:
    master = world.launch("master")
    key = ec.generate_private_key(ec.SECP256R1())
    first = world.enroll(master, "master", csr=make_csr(master.instance_id, key=key, sans=[
        x509.DNSName(master.private_dns), x509.DNSName("puppet.example.net")]))
    assert first.status == 200, first.body
    before = world.state()
    again = world.enroll(master, "master", csr=make_csr(master.instance_id, key=key))
    assert again.status == 200, again.body
    assert again.json == first.json
    assert again.json["ca_certificate"]
    assert world.state() == before


def test_a_revoked_node_asking_again_with_its_key_is_refused(ready: World) -> None:
    agent = ready.launch()
    body = json.dumps(ready.body_for(agent)).encode()
    assert ready.call("/v1/enroll", body, source=agent.private_ip).status == 200
    assert revoke_identity(ready.records, ready.authority, agent.instance_id, "keyCompromise",
                           ready.clock.seconds) is not None
    before = ready.state()  # before the request: what it signs counts too
    refused(ready, ready.call("/v1/enroll", body, source=agent.private_ip), 409, "revoked", before)


def test_a_master_whose_node_is_revoked_gets_no_new_agents_even_if_still_registered(world: World) -> None:
    """A registration left over from a revocation made before masters were deregistered with it."""
    master, _ = enroll_master(world)
    node = world.records.get(NodeRecord, master.instance_id)
    assert node is not None
    world.authority.revoke(node.record.issuer, node.record.serial, node.record.certname)
    world.records.replace(NodeRecord.from_value({**node.record.to_value(), "revoked_at": 1.0}), node.version)
    assert world.records.get(MasterRecord, master.instance_id) is not None
    before = world.state()  # before the request: what it signs counts too
    refused(world, world.enroll(world.launch("agent")), 503, "no-master", before)


class TakenOverOnce(SwitchableStore):
    """
    Before the first recording transaction, another attempt with the same key takes the claim
    (an agent's claim is made in that transaction: then the other attempt makes it, unfinished,
    as a daemon that claims before signing would).
    """

    armed = False

    def transact(self, writes: Any) -> None:
        if self.armed and any(getattr(w, "kind", "") == "claim" for w in writes):
            self.armed = False
            claim = next(w for w in writes if getattr(w, "kind", "") == "claim")
            current = self.inner.get("claim", claim.key)
            if current is None:
                unfinished = {**claim.value, "state": "claimed", "certificate_pem": "", "issuer": ""}
                self.inner.create("claim", claim.key, unfinished)
            else:
                self.inner.replace("claim", claim.key, {**current.value, "claimed_at": 1.0}, current.version)
        self.inner.transact(writes)


class RaceBeforeRecording(SwitchableStore):
    """Runs ``hook`` once, just before the next transaction that writes a claim (a racing attempt)."""

    hook: Callable[[], object] | None = None

    def transact(self, writes: Any) -> None:
        hook = self.hook
        if hook is not None and any(getattr(w, "kind", "") == "claim" for w in writes):
            self.hook = None
            hook()
        self.inner.transact(writes)


def test_an_attempt_whose_claim_was_taken_over_by_its_own_key_is_told_to_ask_again(
    enroll_aws, aws_signer, tmp_path: Path
) -> None:
    world = build_world(enroll_aws, aws_signer, tmp_path, store_wrapper=TakenOverOnce)
    try:
        enroll_master(world)
        store = world.records.store
        assert isinstance(store, TakenOverOnce)
        store.armed = True
        agent = world.launch()
        key = ec.generate_private_key(ec.SECP256R1())
        first = world.enroll(agent, csr=make_csr(agent.instance_id, key=key))
        assert (first.status, first.error) == (503, "in-progress"), first.body
        assert first.headers["retry-after"] == "2"
        assert world.records.get(NodeRecord, agent.instance_id) is None
        again = world.enroll(agent, csr=make_csr(agent.instance_id, key=key))
        assert again.status == 200, again.body
        assert "OK" in world.verify(again.json)
    finally:
        world.store.close()


class HeldPool(InlinePool):
    """Signing "threads" that run only when the test lets them, the first call of a given name."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[str, Any, Any, tuple[Any, ...], dict[str, Any]]] = []

    def callInThreadWithCallback(self, onResult, func, *args, **kwargs):
        self.held.append((getattr(func, "__name__", ""), onResult, func, args, kwargs))

    def release(self, name: str) -> None:
        index = next(i for i, held in enumerate(self.held) if held[0] == name)
        _, on_result, func, args, kwargs = self.held.pop(index)
        super().callInThreadWithCallback(on_result, func, *args, **kwargs)

    def names(self) -> list[str]:
        return [held[0] for held in self.held]


@pytest.mark.parametrize("same_key", [True, False], ids=["same key", "another key"])
def test_asking_while_this_daemon_signs_for_the_instance(
    enroll_aws, aws_signer, tmp_path: Path, same_key: bool
) -> None:
    """The same key is told to ask again (503 in-progress), another key is refused (409)."""
    world = build_world(enroll_aws, aws_signer, tmp_path, store_wrapper=RaceBeforeRecording)
    try:
        enroll_master(world)
        store = world.records.store
        assert isinstance(store, RaceBeforeRecording)
        agent = world.launch()
        body = json.dumps(world.body_for(agent)).encode()
        other = body if same_key else json.dumps(world.body_for(agent)).encode()
        pool = HeldPool()
        world.enrollment.records = Blocking(InlineReactor(), pool, world.records)
        first = world.start("/v1/enroll", body, source=agent.private_ip)
        world.clock.advance(0.1)  # DescribeInstances
        second = world.start("/v1/enroll", other, source=agent.private_ip)
        world.clock.advance(0.1)
        assert pool.names() == ["_sign_and_record", "_sign_and_record"]
        issued = world.authority.issued
        # The second runs on another thread while the first records what it signed.
        store.hook = lambda: pool.release("_sign_and_record")
        pool.release("_sign_and_record")
        one, two = world.finish(first, second)
        assert one.status == 200, one.body
        if same_key:
            assert (two.status, two.error, two.headers["retry-after"]) == (503, "in-progress", "2"), two.body
        else:
            assert (two.status, two.error) == (409, "already-enrolled"), two.body
        assert world.authority.issued == issued + 1  # the second signed nothing
        world.enrollment.records = inline(world.records)
        again = world.call("/v1/enroll", body, source=agent.private_ip)
        assert again.status == 200
        assert again.json["certificate"] == one.json["certificate"]
    finally:
        world.store.close()


def second_daemon(world: World) -> Enrollment:
    """Another daemon on the same store and CA (its own claims in flight, its own batcher)."""
    return Enrollment(
        policy=world.policy, trust=world.signer.trust_store(), records=inline(world.records),
        authority=inline(world.authority), cloud=inline(world.cloud), clock=world.clock,
        choose=lambda cas: cas[0],
    )


def enroll_on(daemon: Enrollment, world: World, body: dict[str, str], source: str) -> list[Any]:
    """``daemon``'s answer to ``body`` (an IssuedEnrollment or a Failure), once the clock moved."""
    answers: list[Any] = []
    request = EnrollmentRequest(role=body["role"], document=body["document"].encode(),
                                signature=body["signature"], csr=body["csr"].encode())
    daemon.enroll(request, source).addBoth(answers.append)
    world.clock.advance(0.1)  # DescribeInstances
    assert answers, "the other daemon's enrollment never finished"
    return answers


@pytest.fixture(params=["sqlite", "dynamodb"])
def racing(request: pytest.FixtureRequest, enroll_aws, aws_signer, tmp_path: Path) -> World:
    """A world whose store runs a racing attempt before a chosen transaction, on each backend."""
    make_store = None
    if request.param == "dynamodb":
        assert request.getfixturevalue("dynamodb_credentials") is not None

        def make_store(tmp: Path) -> IStore:
            store = DynamoDBStore(f"puppetha-{tmp.name}"[:200], "us-east-1", enroll_aws.moto.endpoint_url)
            store.create_table(deletion_protection=False)
            return store

    return build_world(enroll_aws, aws_signer, tmp_path, store_wrapper=RaceBeforeRecording,
                       make_store=make_store)


@pytest.mark.parametrize("same_key", [True, False], ids=["same key", "another key"])
def test_two_daemons_racing_for_one_instance_issue_one_certificate(racing: World, same_key: bool) -> None:
    """
    Another daemon records the instance while this one signs.  With another key this attempt is
    refused and leaves nothing (its certificate never left the process); with the same key it
    answers with the other daemon's certificate.  On each store backend.
    """
    world = racing
    try:
        enroll_master(world)
        store = world.records.store
        assert isinstance(store, RaceBeforeRecording)
        agent = world.launch()
        key = ec.generate_private_key(ec.SECP256R1())
        mine = world.body_for(agent, csr=make_csr(agent.instance_id, key=key))
        theirs = mine if same_key else world.body_for(agent)
        won: list[Any] = []
        store.hook = lambda: won.extend(enroll_on(second_daemon(world), world, theirs, agent.private_ip))
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        try:
            answer = world.call("/v1/enroll", json.dumps(mine).encode(), source=agent.private_ip)
        finally:
            globalLogPublisher.removeObserver(observer)
        # The certificate signed and dropped is told apart in the log from the one issued.
        assert [e["certname"] for e in events if "dropped the certificate" in e.get("log_format", "")] == [
            agent.instance_id
        ]
        (winner,) = won
        assert isinstance(winner, IssuedEnrollment), winner
        node = world.records.get(NodeRecord, agent.instance_id)
        claim = world.records.get(EnrollmentClaim, f"{agent.instance_id}/agent")
        assert node is not None
        assert claim is not None
        recorded = x509.load_pem_x509_certificate(winner.certificate.encode())
        assert [c.serial for c in node.record.certificates] == [recorded.serial_number]
        assert claim.record.certificate_pem == winner.certificate
        if same_key:
            assert answer.status == 200, answer.body
            assert answer.json["certificate"] == winner.certificate
        else:
            assert (answer.status, answer.error) == (409, "already-enrolled"), answer.body
            assert "certificate" not in answer.json
            assert claim.record.public_key != public_key_id(
                x509.load_pem_x509_csr(mine["csr"].encode())
            )
            # The loser asking again is still refused; the winner's key is answered again.
            assert world.call("/v1/enroll", json.dumps(mine).encode(), source=agent.private_ip).status == 409
        again = world.call("/v1/enroll", json.dumps(theirs).encode(), source=agent.private_ip)
        assert again.status == 200
        assert again.json["certificate"] == winner.certificate
    finally:
        world.store.close()


def test_an_agent_asking_again_is_answered_while_no_master_is_healthy(ready: World) -> None:
    agent = ready.launch()
    body = json.dumps(ready.body_for(agent)).encode()
    first = ready.call("/v1/enroll", body, source=agent.private_ip)
    assert first.status == 200
    for master in ready.records.list(MasterRecord):
        ready.records.replace(evolve(master.record, healthy=False), master.version)
    assert ready.enroll(ready.launch()).error == "no-master"
    again = ready.call("/v1/enroll", body, source=agent.private_ip)
    assert again.status == 200, again.body
    assert again.json["certificate"] == first.json["certificate"]


class CountingCalls(Blocking[Any]):
    """The inline pool, counting the blocking calls (hops to a thread) made through it."""

    def __init__(self, inner: Blocking[Any], hops: list[str], name: str) -> None:
        super().__init__(inner.reactor, inner.pool, inner.target)
        self.hops = hops
        self.name = name

    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.hops.append(f"{self.name}:{getattr(f, '__name__', f)}")
        return super().call(f, *args, **kwargs)


def test_a_new_agent_costs_three_hops_to_a_thread(ready: World) -> None:
    """Identity, DescribeInstances, then the CSR check, the claim's and masters' reads, signing
    and the one recording transaction in one hop."""
    hops: list[str] = []
    enrollment = ready.enrollment
    enrollment.records = CountingCalls(enrollment.records, hops, "records")
    enrollment.authority = CountingCalls(enrollment.authority, hops, "authority")
    enrollment.batcher.cloud = CountingCalls(enrollment.batcher.cloud, hops, "cloud")
    assert ready.enroll(ready.launch()).status == 200
    assert hops == ["authority:verify_identity", "cloud:describe_instances", "records:_sign_and_record"]


class MastersUnreadable(SwitchableStore):
    """Right after the claim is read, the next listing (of the masters) fails as a lost store would."""

    after_claim = False
    armed = False

    def get(self, kind: str, key: str) -> Any:
        found = super().get(kind, key)
        self.armed = self.armed or (self.after_claim and kind == EnrollmentClaim.KIND)
        return found

    def list(self, kind: str, prefix: str = "") -> Any:
        if self.armed:
            self.armed = False
            raise StoreUnavailable("the store went away")
        return super().list(kind, prefix)


def test_masters_unreadable_after_the_claim_leaves_no_claim(enroll_aws, aws_signer, tmp_path: Path) -> None:
    world = build_world(enroll_aws, aws_signer, tmp_path, store_wrapper=MastersUnreadable)
    try:
        enroll_master(world)
        agent = world.launch()
        before = world.state()
        store = world.records.store
        assert isinstance(store, MastersUnreadable)
        store.after_claim = True
        answer = world.enroll(agent)
        store.after_claim = False
        assert (answer.status, answer.error) == (503, "store-unavailable")
        assert world.records.get(EnrollmentClaim, f"{agent.instance_id}/agent") is None
        assert world.state() == before
        assert world.enroll(agent).status == 200
    finally:
        world.store.close()
