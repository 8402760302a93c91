"""
The life cycle sweep through a real nginx: an agent terminated in moto is on the CRL nginx
serves, and refused by nginx, after one sweep and one front round.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from puppetha.aws.boto import Boto3Cloud
from puppetha.enroll.service import revoke_identity
from puppetha.ha.lifecycle import REVOKE, LifecycleSettings, LifecycleSweep
from puppetha.ha.nginx import CA_PATHS
from puppetha.store.records import NodeRecord
from puppetha.testing.moto import TEST_CREDENTIALS, Fleet, MotoServer
from tests.test_front_nginx import Front, Synchronous
from tests.test_front_nginx import front as front  # noqa: PLC0414 - the fixture, by its name
from tests.test_lifecycle import Guard, sweep

REGION = "us-east-1"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def served_revocations(front: Front) -> set[int]:
    status, body = front.get(front.settings.ports.front, CA_PATHS[1][0])
    assert status == 200
    blocks = re.findall(r"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", body, re.S)
    return {entry.serial_number for b in blocks for entry in x509.load_pem_x509_crl(b.encode())}


def test_a_terminated_agent_is_refused_by_nginx_after_one_sweep_and_one_front_round(
    front: Front, moto: MotoServer, tmp_path: Path
) -> None:
    fleet = Fleet(moto.endpoint_url, REGION)
    instance = fleet.launch(role="agent")
    certificate = x509.load_pem_x509_certificate(Path(front.agent.certificate).read_bytes())
    # The agent's identity, as enrollment stores it.
    front.pki.records.create(NodeRecord(
        certname=front.agent.certname, instance_id=instance.instance_id, role="agent",
        account=instance.account, region=REGION, private_ip=instance.private_ip,
        serial=front.agent.serial, issuer=front.agent.ca,
        certificate_pem=Path(front.agent.certificate).read_text(), enrolled_at=time.time(),
        not_after=certificate.not_valid_after_utc.timestamp(),
    ))
    assert front.agent_get()[0] == 200
    assert front.agent.serial not in served_revocations(front)

    fleet.terminate(instance.instance_id)
    cloud = Boto3Cloud(moto.endpoint_url, access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
                       secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"])
    sweeper = LifecycleSweep(
        clock=front.service.clock, settings=LifecycleSettings(), guard=Guard(), records=front.pki.records,
        blocking=Synchronous(), cloud=cloud, aws=Synchronous(),
        revoke=functools.partial(revoke_identity, front.pki.records, front.pki.authority, now=time.time),
    )
    assert [(r.instance_id, r.action) for r in sweep(sweeper)] == [(instance.instance_id, REVOKE)]
    front.reconcile()  # one front round
    front.eventually(lambda: front.agent_get()[0] == 400, "nginx refusing the terminated agent")
    assert front.agent.serial in served_revocations(front)
