"""
A drain through a real nginx: a slow request in flight to the draining master completes, new
requests go to the other master, none fails, and the instance is terminated in moto only once
nginx's old worker has finished the request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock

from puppetha.aws.boto import Boto3Cloud
from puppetha.ha.autoscale import FleetControl
from puppetha.ha.drain import Drainer, ShuttingDownWorkers
from puppetha.ha.scaling import DRAIN, ScaleDecision, ScaleSettings
from puppetha.store.records import CARecord, MasterRecord, NodeRecord
from puppetha.testing.moto import TEST_CREDENTIALS, Fleet, MotoServer
from tests.test_autoscale import Guard, result
from tests.test_front_nginx import Front, Synchronous
from tests.test_front_nginx import front as front  # noqa: PLC0414 - the fixture, by its name

REGION = "us-east-1"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


class Traffic:
    """An agent asking the front again and again, every answer kept, until stopped."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.answers: list[tuple[int, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append(self.front.agent_get("/puppet/v3/catalog/agent1"))
            except OSError as e:
                self.answers.append((0, repr(e)))
            time.sleep(0.02)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_a_drain_fails_no_request_and_terminates_once_the_slow_one_ended(
    front: Front, moto: MotoServer
) -> None:
    moto.reset()
    fleet = Fleet(moto.endpoint_url, REGION)
    instance = fleet.launch(role="master")
    front.pki.records.create(NodeRecord(
        certname="m1", instance_id=instance.instance_id, role="master", account=instance.account,
        region=REGION, private_ip=instance.private_ip, serial=1, issuer="m1", certificate_pem="",
        enrolled_at=time.time(), not_after=time.time() + 86400))
    m1 = front.masters["m1"]
    # A slow request (a long catalog compile) lands on m1 while it is the only master.
    slow: list[tuple[int, Any]] = []
    slow_thread = threading.Thread(target=lambda: slow.append(front.agent_get("/slow")))
    slow_thread.start()
    assert m1.slow_started.wait(timeout=30)
    front.add_master("m2", registered_at=2.0)
    front.reconcile()
    front.eventually(lambda: {front.agent_get()[1]["master"] for _ in range(6)} == {"m1", "m2"},
                     "m2 joining the upstream")

    clock = Clock()
    clock.advance(1000.0)
    cloud = Boto3Cloud(moto.endpoint_url, access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
                       secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"])
    in_flight = ShuttingDownWorkers(front.nginx.runtime.pid_path)
    control = FleetControl(clock=clock, guard=Guard(), records=front.pki.records, blocking=Synchronous(),
                           cloud=cloud, aws=Synchronous(), region=REGION)
    drainer = Drainer(control, settings=ScaleSettings(enabled=True, drain_timeout=120.0), in_flight=in_flight,
                      poke=front.service.poke)
    with Traffic(front) as traffic:
        # The decision: m1 is marked draining and the front (poked) takes it out of the upstream.
        result(drainer.act(ScaleDecision(DRAIN, "quiet", master="m1"), 7))
        front.eventually(lambda: {front.agent_get()[1]["master"] for _ in range(6)} == {"m2"},
                         "new requests going to m2 only")
        # The slow request holds nginx's old worker: the drain waits, the instance runs.
        assert in_flight("m1") >= 1
        for _ in range(3):
            clock.advance(10.0)
            result(drainer.advance(7))
        assert slow_thread.is_alive()
        assert fleet.describe(instance.instance_id).state == "running"
        found = front.pki.records.get(MasterRecord, "m1")
        assert found is not None
        assert found.record.drained_at is None

        m1.release.set()
        slow_thread.join(timeout=30)
        front.eventually(lambda: in_flight("m1") == 0, "nginx's old worker exiting")
        clock.advance(10.0)
        (done,) = result(drainer.advance(7))
    # The slow request completed at m1; every other answer during the drain was a success.
    assert [(status, body["master"]) for status, body in slow] == [(200, "m1")]
    assert traffic.answers
    assert [a for a in traffic.answers if a[0] != 200] == []
    # Terminated once drained, before drain_timeout; deregistered, its CA kept for its agents.
    assert done.finished_at == 1040.0
    assert fleet.describe(instance.instance_id).state in {"shutting-down", "terminated"}
    assert front.pki.records.get(MasterRecord, "m1") is None
    assert front.pki.records.get(CARecord, "m1") is not None
    assert {front.agent_get()[1]["master"] for _ in range(4)} == {"m2"}
