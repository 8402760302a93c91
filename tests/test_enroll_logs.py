"""
What the enrollment service logs: enough for an operator to follow, nothing a reader of the log
could enroll or impersonate with (no signature, no document, no CSR, no key, no certificate).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import implementer

from puppetha.logs import event_as_line

pytest.register_assert_rewrite("tests.enroll_fixtures")

from tests.enroll_fixtures import World  # noqa: E402 - after the rewrite hook

pytest_plugins = ["tests.enroll_fixtures"]


@implementer(ILogObserver)
class Recorder(list[LogEvent]):
    def __call__(self, event: LogEvent) -> None:
        self.append(event)


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events = Recorder()
    globalLogPublisher.addObserver(events)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events)


def secrets_of(body: dict[str, Any]) -> list[str]:
    """Pieces of a request that must never reach a log, as they would appear there."""
    signature = body["signature"].replace("\n", "")
    document = json.loads(body["document"])
    csr_lines = [line for line in body["csr"].splitlines() if "-----" not in line]
    return [signature[:40], signature[-40:], body["document"][:60], *csr_lines[:2],
            f'"pendingTime" : "{document["pendingTime"]}"']


def every_line(events: list[LogEvent]) -> str:
    # Both renderings: the text an operator reads and the JSON lines journald gets.
    return "\n".join(formatEvent(e) + "\n" + event_as_line(e) for e in events)


def test_enrollments_log_names_not_secrets(world: World, logged: list[LogEvent]) -> None:
    master = world.launch("master")
    master_body = world.body_for(master, "master")
    assert world.call("/v1/enroll", json.dumps(master_body).encode(), source=master.private_ip).status == 200
    agent = world.launch("agent")
    body = world.body_for(agent)
    answer = world.call("/v1/enroll", json.dumps(body).encode(), source=agent.private_ip)
    assert answer.status == 200
    # A replay gets the same certificate again; another key and a forged request are refused,
    # and logged as such.
    assert world.call("/v1/enroll", json.dumps(body).encode(), source=agent.private_ip).status == 200
    other_key = world.body_for(agent)
    assert world.call("/v1/enroll", json.dumps(other_key).encode(), source=agent.private_ip).status == 409
    forged = {**body, "signature": body["signature"][:-8] + "AAAAAAA="}
    assert world.call("/v1/enroll", json.dumps(forged).encode(), source=agent.private_ip).status == 403

    text = every_line(logged)
    assert agent.instance_id in text  # the operator can follow who enrolled
    assert "refused" in text
    assert "again" in text
    for secret in secrets_of(body) + secrets_of(other_key) + secrets_of(master_body):
        assert secret not in text, f"logged: {secret[:30]}..."
    issued = answer.json["certificate"].splitlines()[1]
    assert issued not in text
    assert "PRIVATE KEY" not in text
    assert "BEGIN CERTIFICATE" not in text
