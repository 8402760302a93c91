"""The daemon's service tree stops in order, each stop after the one before, within one budget."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from puppetha.services import OrderedServices


class Recorded(Service):
    """A service whose stop fires when the test says so (or at once with ``instant``)."""

    def __init__(self, name: str, log: list[str], instant: bool = False) -> None:
        self.setName(name)
        self.log = log
        self.instant = instant
        self.stopping: Deferred[None] | None = None

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.log.append(f"stop {self.name}")
        if self.instant:
            return None
        self.stopping = Deferred()
        return self.stopping


def tree(clock: Clock, log: list[str], budget: float = 15) -> tuple[OrderedServices, dict[str, Recorded]]:
    root = OrderedServices(clock, budget)
    services = {
        "store": Recorded("store", log, instant=True),
        "pool": Recorded("pool", log),
        "front": Recorded("front", log),
        "listener": Recorded("listener", log, instant=True),
    }
    for service in services.values():
        service.setServiceParent(root)
    root.startService()
    return root, services


def test_each_stop_waits_for_the_one_after_it_in_start_order() -> None:
    clock, log = Clock(), list[str]()
    root, services = tree(clock, log)
    done: list[object] = []
    root.stopService().addCallback(done.append)
    # The listener stopped at once, the front's round is still running: the pool waits for it.
    assert log == ["stop listener", "stop front"]
    assert services["front"].stopping is not None
    services["front"].stopping.callback(None)
    assert log == ["stop listener", "stop front", "stop pool"]
    assert services["pool"].stopping is not None
    services["pool"].stopping.callback(None)
    assert log == ["stop listener", "stop front", "stop pool", "stop store"]
    assert done == [None]
    assert not clock.getDelayedCalls()


def test_a_stop_that_never_ends_costs_the_budget_and_no_more() -> None:
    clock, log = Clock(), list[str]()
    root, services = tree(clock, log, budget=15)
    done: list[object] = []
    with capturedLogs() as events:
        root.stopService().addCallback(done.append)
        clock.advance(14)
        assert log == ["stop listener", "stop front"]
        clock.advance(1)
        # The budget is spent: the rest stop without being waited for.
        assert log == ["stop listener", "stop front", "stop pool", "stop store"]
        assert done == [None]
    assert [e["service"] for e in events if "did not stop" in e["log_format"]] == ["front", "pool"]
    # A late end of the stalled stop changes nothing.
    assert services["front"].stopping is not None
    services["front"].stopping.callback(None)
    assert done == [None]


def test_a_failed_stop_is_logged_and_the_rest_still_stop() -> None:
    clock, log = Clock(), list[str]()
    root, services = tree(clock, log)
    done: list[object] = []
    with capturedLogs() as events:
        root.stopService().addCallback(done.append)
        assert services["front"].stopping is not None
        services["front"].stopping.errback(RuntimeError("the round failed"))
        assert services["pool"].stopping is not None
        services["pool"].stopping.callback(None)
    assert done == [None]
    assert log[-1] == "stop store"
    assert any(e.get("service") == "front" and "log_failure" in e for e in events)
