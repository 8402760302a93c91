"""
More than one core: several ``twistd puppetha`` processes with the enroll role on one host,
sharing one store (the SQLite file in one state directory, with its CA vault), each on its own
port of ``[enroll] listen``, as nginx's enrollment upstream (``[lb] enroll_backends``) spreads
them (docs/performance.md).  Enrollments spread over both are all answered, and one instance
enrolling at both at once is issued one certificate.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from puppetha.aws.cloud import InstanceInfo
from puppetha.store.records import NodeRecord
from puppetha.testing.aws import FakeAWSSigner
from puppetha.testing.moto import Fleet, MotoServer
from tests.aws_fixtures import boto_test_credentials

# The fixtures' own assertions are rewritten wherever they are first imported.
pytest.register_assert_rewrite("tests.fault_fixtures")

from tests.fault_fixtures import Daemon, Reply, fleet, moto, signer  # noqa: E402, F401 - fixtures

pytestmark = pytest.mark.usefixtures("moto")


@pytest.fixture
def two_daemons(tmp_path: Path, moto: MotoServer, signer: FakeAWSSigner) -> Iterator[tuple[Daemon, Daemon]]:  # noqa: F811
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Daemon(tmp_path / "a", moto.endpoint_url, signer)
    second = Daemon(tmp_path / "b", moto.endpoint_url, signer)
    # The second: the enroll role only, on the first one's state directory (its store, its CA
    # vault and key, its TLS credentials); only its port differs.
    config = second.config.read_text()
    config = re.sub(r"roles = .*", "roles = enroll", config)
    config = re.sub(r"state_dir = .*", f"state_dir = {first.state}", config)
    config = re.sub(r"\[enc\]\n(.*\n)*", "", config)
    second.config.write_text(config)
    second.store_path = first.store_path
    second.open_store = first.open_store
    with boto_test_credentials():
        first.start()
        try:
            second.start()  # after the first made the root CA: they are started in turn
            try:
                yield first, second
            finally:
                second.stop()
        finally:
            first.stop()


def test_enrollments_spread_over_two_daemons_on_one_store(
    two_daemons: tuple[Daemon, Daemon], fleet: Fleet  # noqa: F811
) -> None:
    first, second = two_daemons
    assert first.root_pem == second.root_pem
    agents = [fleet.launch("agent") for _ in range(24)]
    # A master first, so that agents have a CA to be issued by.
    master = fleet.launch("master")
    assert first.enroll(master, role="master").status == 200

    def enroll(job: tuple[int, InstanceInfo]) -> Reply:
        i, agent = job
        return (first, second)[i % 2].enroll(agent)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(enroll, enumerate(agents)))
    assert [a.status for a in answers] == [200] * len(agents), [a.body for a in answers if a.status != 200]
    # Each daemon did its half: the two processes really shared the work.
    assert len(first.messages("enrolled ")) == 1 + 12
    assert len(second.messages("enrolled ")) == 12

    store, records = first.records()
    try:
        nodes = {n.record.certname: n.record for n in records.list(NodeRecord)}
    finally:
        store.close()
    assert set(nodes) >= {a.instance_id for a in agents}
    serials = [(n.issuer, n.serial) for n in nodes.values()]
    assert len(set(serials)) == len(serials), "one serial issued twice"
    issued = {a.body["certificate"] for a in answers}
    assert len(issued) == len(agents)


def test_one_instance_at_both_daemons_at_once_gets_one_certificate(
    two_daemons: tuple[Daemon, Daemon], fleet: Fleet  # noqa: F811
) -> None:
    first, second = two_daemons
    master = fleet.launch("master")
    assert first.enroll(master, role="master").status == 200
    agents = [fleet.launch("agent") for _ in range(6)]
    with ThreadPoolExecutor(12) as pool:
        racing = [(pool.submit(first.enroll, a), pool.submit(second.enroll, a)) for a in agents]
        answers = [(x.result(), y.result()) for x, y in racing]
    for a, b in answers:
        # Each request brings its own key: of the two, one is issued, the other refused
        # (already enrolled, or told the enrollment is in progress with another key).
        statuses = sorted([a.status, b.status])
        assert statuses[0] == 200, (a, b)
        assert statuses[1] in (409, 503), (a, b)
    store, records = first.records()
    try:
        for agent in agents:
            node = records.get(NodeRecord, agent.instance_id)
            assert node is not None
            assert len(node.record.certificates) == 1
    finally:
        store.close()
