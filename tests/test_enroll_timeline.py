"""
An enrollment's timeline (``bench/enroll.py --timeline``): the daemon stamps each step of its
critical path on a recorder it is given, and stamps nothing without one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.timeline import CLIENT_END, CLIENT_START, Timeline
from puppetha.testing.aws import FakeAWSSigner

pytest.register_assert_rewrite("tests.enroll_fixtures")

from tests.enroll_fixtures import AWS, World, build_world  # noqa: E402 - after the rewrite hook

pytest_plugins = ["tests.enroll_fixtures"]


def enroll_master(world: World) -> None:
    answer = world.enroll(world.launch("master"), "master")
    assert answer.status == 200, answer.body


class Ticks:
    """A clock that moves one second a reading, so every stamp has its own moment."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def timed(enroll_aws: AWS, aws_signer: FakeAWSSigner, tmp_path: Path) -> Iterator[tuple[World, Timeline]]:
    timeline = Timeline(clock=Ticks())
    built = build_world(enroll_aws, aws_signer, tmp_path, timeline=timeline)
    enroll_master(built)
    yield built, timeline
    built.store.close()


def test_a_new_agent_is_stamped_step_by_step(timed: tuple[World, Timeline]) -> None:
    world, timeline = timed
    agent = world.launch()
    timeline.stamps.clear()
    assert world.enroll(agent).status == 200
    events = [event for source, _, event in timeline.stamps if source == agent.private_ip]
    # Two hops to the pool, DescribeInstances between them, and one store write.
    assert [e for e in events if e.endswith("sent to the pool")] == [
        "identity: sent to the pool", "describe: call sent to the pool", "sign and record: sent to the pool",
    ]
    for hop in ("identity", "sign and record"):
        at = events.index(f"{hop}: sent to the pool")
        assert events[at:at + 2] == [f"{hop}: sent to the pool", f"{hop}: started on a thread"]
        assert events.index(f"{hop}: ended") < events.index(f"{hop}: back on the reactor")
    assert events[0] == "request: parsed"
    assert events[-1] == "answer: written"
    assert [e for e in events if e.startswith("describe")] == [
        "describe: asked", "describe: call sent to the pool", "describe: call started on a thread",
        "describe: AWS answered", "describe: back on the reactor",
    ]
    assert [e for e in events if "write" in e and e != "answer: written"] == [
        "record: write begins", "record: write committed",
    ]
    write, hop = events.index("record: write begins"), "sign and record"
    assert events.index(f"{hop}: started on a thread") < write < events.index(f"{hop}: ended")


def test_no_timeline_no_stamps(enroll_aws: AWS, aws_signer: FakeAWSSigner, tmp_path: Path) -> None:
    world = build_world(enroll_aws, aws_signer, tmp_path)
    try:
        enroll_master(world)
        assert world.enrollment.timeline is None
        assert world.enrollment.batcher.timeline is None
    finally:
        world.store.close()


def test_segments_are_the_gaps_between_consecutive_stamps() -> None:
    ticks = iter([0.0, 0.010, 0.013, 0.020, 0.0, 0.004, 0.100, 0.5])
    timeline = Timeline(clock=lambda: next(ticks))
    for source in ("10.0.0.1", "10.0.0.2"):
        timeline.stamp(source, CLIENT_START)
        timeline.stamp(source, "request: parsed")
        if source == "10.0.0.1":
            timeline.stamp(source, "answer: written")
        timeline.stamp(source, CLIENT_END)
    timeline.stamp("10.0.0.9", CLIENT_START)  # never answered: left out
    segments = timeline.segments(["10.0.0.1", "10.0.0.2", "10.0.0.9"])
    assert segments == {
        (CLIENT_START, "request: parsed"): [pytest.approx(0.010), pytest.approx(0.004)],
        ("request: parsed", "answer: written"): [pytest.approx(0.003)],
        ("answer: written", CLIENT_END): [pytest.approx(0.007)],
        ("request: parsed", CLIENT_END): [pytest.approx(0.096)],
    }
    assert "| request: parsed → answer: written | 1 | 3.00 |" in timeline.report(["10.0.0.1", "10.0.0.2"])
