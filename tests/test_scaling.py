"""
The scaling policy as tables: single decisions, then a fleet simulated on ``task.Clock`` whose
masters start, warm, serve and drain as the policy says, under loads that oscillate, step and burst.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from attrs import evolve
from twisted.internet.task import Clock, LoopingCall

from puppetha.config import ConfigError, config_from_string
from puppetha.ha.scaling import (
    DRAIN,
    DRAINED,
    DRAINING,
    HOLD,
    LAUNCH,
    SERVING,
    STARTING,
    WARMING,
    Master,
    MasterLoad,
    Sample,
    ScaleDecision,
    ScaleSettings,
    decide,
    fleet_busy,
    held,
    next_state,
    settings_from_config,
)

ON = ScaleSettings(enabled=True)
POOL = 4  # JRubies per master


def load(busy: float, *, unavailable: int = 0, agents: int = 0) -> MasterLoad:
    """A master whose pool is ``busy`` (0..1+) in use."""
    in_flight = round(busy * POOL)
    return MasterLoad(
        requests=in_flight * 10,
        in_flight=in_flight,
        jruby_size=POOL,
        jruby_free=max(0, POOL - in_flight),
        unavailable=unavailable,
        agents=agents,
    )


def serving(*names: str, since: float = 0.0) -> list[Master]:
    return [Master(name, SERVING, since) for name in names]


def steady(busy: float, names: list[str], start: float, end: float, step: float = 10.0) -> list[Sample]:
    count = int((end - start) / step) + 1
    return [Sample(start + i * step, {n: load(busy) for n in names}) for i in range(count)]


# --- single decisions


@pytest.mark.parametrize(
    ("row", "settings", "masters", "history", "now", "last", "expected"),
    [
        ("off by default", ScaleSettings(), serving("m1"), steady(1.0, ["m1"], 0, 700), 700, None,
         ScaleDecision(HOLD, "scaling is off")),
        ("busy for the window: launch", ON, serving("m1"), steady(0.9, ["m1"], 0, 100), 100, None,
         (LAUNCH, 1)),
        ("busy, but not yet for the window", ON, serving("m1"), steady(0.9, ["m1"], 50, 100), 100, None,
         (HOLD, 0)),
        ("one quiet sample inside the window", ON, serving("m1"),
         [*steady(0.9, ["m1"], 0, 60), Sample(70, {"m1": load(0.1)}), *steady(0.9, ["m1"], 80, 100)],
         100, None, (HOLD, 0)),
        ("a 503 counts as busy", ON, serving("m1"),
         [Sample(t, {"m1": load(0.25, unavailable=1)}) for t in range(0, 101, 10)], 100, None, (LAUNCH, 1)),
        ("very busy: enough to reach the target, at most max_launches", ON, serving("m1", "m2"),
         steady(2.0, ["m1", "m2"], 0, 100), 100, None, (LAUNCH, 2)),
        ("cooldown", ON, serving("m1"), steady(0.9, ["m1"], 0, 400), 400, 200, (HOLD, 0)),
        ("after the cooldown, the window counts from the action", ON, serving("m1"),
         steady(0.9, ["m1"], 0, 530), 530, 500 - 300, (LAUNCH, 1)),
        ("quiet, but the last drain changed the fleet inside the window", ON, serving("m1", "m2", "m3"),
         steady(0.1, ["m1", "m2", "m3"], 0, 700), 700, 300, (HOLD, 0)),
        ("a master that entered service inside the window", ON, [*serving("m1"), *serving("m2", since=80)],
         steady(0.9, ["m1", "m2"], 0, 100), 100, None, (HOLD, 0)),
        ("stale samples", ON, serving("m1"), steady(0.9, ["m1"], 0, 100), 140, None, (HOLD, 0)),
        ("a master warming: hold", ON, [*serving("m1"), Master("m2", WARMING, 50)],
         steady(0.95, ["m1"], 0, 100), 100, None, (HOLD, 0)),
        ("at max_masters", ON, serving("m1", "m2", "m3", "m4"), steady(0.9, ["m1", "m2", "m3", "m4"], 0, 100),
         100, None, (HOLD, 0)),
        ("below min_masters: launch at once, cooldown or not", evolve(ON, min_masters=2), serving("m1"),
         [], 10, 5, (LAUNCH, 1)),
        ("below min_masters, already coming", evolve(ON, min_masters=2),
         [*serving("m1"), Master("m2", STARTING, 0)], [], 10, None, (HOLD, 0)),
        ("a starting master past launch_timeout is not capacity", evolve(ON, min_masters=2),
         [*serving("m1"), Master("m2", STARTING, 0)], [], 901, None, (LAUNCH, 1)),
        ("quiet for in_window: drain the master with fewest agents", ON,
         [Master("m1", SERVING, 0, agents=5), Master("m2", SERVING, 0, agents=2)],
         steady(0.1, ["m1", "m2"], 0, 600), 600, None, (DRAIN, "m2")),
        ("quiet, but not for in_window", ON, serving("m1", "m2"), steady(0.1, ["m1", "m2"], 100, 600), 600,
         None, (HOLD, 0)),
        ("quiet, but the rest would pass the target", evolve(ON, in_busy=0.5, target_busy=0.6, out_busy=0.9),
         serving("m1", "m2"), steady(0.5, ["m1", "m2"], 0, 600), 600, None, (HOLD, 0)),
        ("quiet at min_masters", ON, serving("m1"), steady(0.0, ["m1"], 0, 600), 600, None, (HOLD, 0)),
        ("quiet, min_masters 0: the last serving master is never drained", evolve(ON, min_masters=0),
         serving("m1"), steady(0.0, ["m1"], 0, 600), 600, None, (HOLD, 0)),
        ("over max_masters: drain", evolve(ON, max_masters=1), serving("m1", "m2"), [], 10, None,
         (DRAIN, "m1")),
        ("one drain at a time", ON, [*serving("m1", "m2", "m3"), Master("m4", DRAINING, 0)],
         steady(0.0, ["m1", "m2", "m3"], 0, 600), 600, None, (HOLD, 0)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_decide(row, settings, masters, history, now, last, expected) -> None:  # noqa: PLR0917 - a table
    decision = decide(settings, masters, history, now, last)
    assert decision.reason
    if isinstance(expected, ScaleDecision):
        assert decision == expected
    elif expected[0] == DRAIN:
        assert (decision.action, decision.master) == expected
    else:
        assert (decision.action, decision.count) == expected


@pytest.mark.parametrize(
    ("load_", "busy"),
    [
        (MasterLoad(jruby_size=4, jruby_free=4), 0.0),
        (MasterLoad(jruby_size=4, jruby_free=1, in_flight=3), 0.75),
        (MasterLoad(jruby_size=4, jruby_free=0, in_flight=6), 1.5),  # two borrows waiting
        (MasterLoad(in_flight=0), 0.0),  # no jruby-metrics: in flight, as if one JRuby
        (MasterLoad(in_flight=2), 2.0),
    ],
)
def test_busy_share(load_: MasterLoad, busy: float) -> None:
    assert load_.busy() == pytest.approx(busy)


def test_held_needs_a_sample_from_the_start_of_the_window() -> None:
    history = steady(1.0, ["m1"], 0, 100)
    always: Callable[[Sample], bool] = lambda s: True  # noqa: E731
    assert held(history, -math.inf, 100, 100, always)
    assert not held(history, -math.inf, 100, 101, always)
    assert not held(history, 10, 100, 100, always)  # the fleet changed inside the window
    assert not held(history, -math.inf, 100, 50, lambda s: s.at != 100)


@pytest.mark.parametrize(
    ("state", "age", "enrolled", "in_flight", "expected"),
    [
        (STARTING, 10, False, 0, STARTING),
        (STARTING, 10, True, 0, WARMING),
        (WARMING, 299, True, 0, WARMING),
        (WARMING, 300, True, 0, SERVING),
        (SERVING, 9999, True, 3, SERVING),
        (DRAINING, 10, True, 2, DRAINING),
        (DRAINING, 10, True, 0, DRAINED),
        (DRAINING, 120, True, 2, DRAINED),
    ],
)
def test_next_state(state: str, age: float, enrolled: bool, in_flight: int, expected: str) -> None:
    master = Master("m1", state, 1000)
    assert next_state(master, 1000 + age, ON, enrolled=enrolled, in_flight=in_flight) == expected


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="min_masters"):
        ScaleSettings(min_masters=3, max_masters=2)
    with pytest.raises(ValueError, match="max_launches"):
        ScaleSettings(max_launches=0)
    with pytest.raises(ValueError, match="target_busy"):
        ScaleSettings(in_busy=0.7, target_busy=0.6)


# --- a fleet on a clock


class SimulatedFleet:
    """
    Masters that enroll ``boot`` seconds after their launch and share ``demand(t)`` (in masters'
    worth of busy JRubies) evenly while serving; every ``interval`` the fleet is sampled, states
    advance and the policy decides, and its decisions are applied.
    """

    def __init__(self, settings: ScaleSettings, demand: Callable[[float], float], *, masters: int = 1,
                 boot: float = 90.0, interval: float = 10.0) -> None:
        self.settings = settings
        self.demand = demand
        self.boot = boot
        self.clock = Clock()
        self.masters = {f"m{i}": Master(f"m{i}", SERVING, 0.0) for i in range(1, masters + 1)}
        self.launched_at: dict[str, float] = {}
        self.history: list[Sample] = []
        self.last_action: float | None = None
        self.actions: list[tuple[float, ScaleDecision]] = []
        #: (time, masters starting or warming) at every tick.
        self.coming: list[tuple[float, int]] = []
        self.max_live = len(self.masters)
        self.min_serving = len(self.masters)
        self._next = masters + 1
        self.loop = LoopingCall(self.tick)
        self.loop.clock = self.clock

    def run(self, seconds: float) -> SimulatedFleet:
        self.loop.start(10.0, now=False)
        self.clock.pump([10.0] * int(seconds / 10.0))
        self.loop.stop()
        return self

    def tick(self) -> None:
        now = self.clock.seconds()
        names = [m.name for m in self.masters.values() if m.state in (SERVING, DRAINING)]
        share = self.demand(now) / max(1, len([m for m in self.masters.values() if m.state == SERVING]))
        loads = {
            name: load(share if self.masters[name].state == SERVING else 0.0,
                       unavailable=int(share > 1.5))
            for name in names
        }
        self.history = [s for s in self.history if s.at >= now - self.settings.in_window - 20]
        self.history.append(Sample(now, loads))
        for name, master in list(self.masters.items()):
            enrolled = now - self.launched_at.get(name, -math.inf) >= self.boot
            state = next_state(master, now, self.settings, enrolled=enrolled,
                               in_flight=loads.get(name, MasterLoad()).in_flight)
            if state == DRAINED:
                del self.masters[name]
            elif state != master.state:
                self.masters[name] = Master(name, state, now)
        decision = decide(self.settings, list(self.masters.values()), self.history, now, self.last_action)
        if decision.action == LAUNCH:
            for _ in range(decision.count):
                name = f"m{self._next}"
                self._next += 1
                self.masters[name] = Master(name, STARTING, now)
                self.launched_at[name] = now
        elif decision.action == DRAIN:
            assert decision.master is not None
            self.masters[decision.master] = Master(decision.master, DRAINING, now)
        if decision.action != HOLD:
            self.last_action = now
            self.actions.append((now, decision))
        states = [m.state for m in self.masters.values()]
        self.coming.append((now, states.count(STARTING) + states.count(WARMING)))
        self.max_live = max(self.max_live, len([s for s in states if s != DRAINING]))
        self.min_serving = min(self.min_serving, states.count(SERVING))

    def directions(self) -> list[str]:
        return [d.action for _, d in self.actions]


def square(low: float, high: float, half_period: float) -> Callable[[float], float]:
    return lambda t: high if int(t // half_period) % 2 == 0 else low


@pytest.mark.parametrize(
    ("low", "high", "half_period"),
    [
        (0.1, 1.2, 30),  # faster than the scale-out window
        (0.1, 0.95, 50),
        (0.2, 1.0, 200),  # slower than the scale-out window, faster than the scale-in window
        (1.0, 2.5, 20),  # between two busy levels
        (0.5, 1.0, 400),
    ],
)
def test_no_flapping_under_an_oscillating_load(low: float, high: float, half_period: float) -> None:
    fleet = SimulatedFleet(ON, square(low, high, half_period), masters=2).run(4 * 3600)
    moves = fleet.directions()
    # Never out, in and out again: a load that keeps returning never drains what it needs.
    changes = sum(1 for a, b in itertools.pairwise(moves) if a != b)
    assert changes <= 1, fleet.actions
    if DRAIN in moves:
        assert LAUNCH not in moves[moves.index(DRAIN):], fleet.actions


def test_the_oscillation_that_keeps_returning_is_not_drained() -> None:
    # Needing three masters half the time: launched once, and kept.
    fleet = SimulatedFleet(ON, square(0.2, 2.0, 400), masters=2).run(4 * 3600)
    assert set(fleet.directions()) == {LAUNCH}


def test_cooldown_after_every_action() -> None:
    # Demand that rises step by step and then falls away: launches and drains both.
    def demand(t: float) -> float:
        return min(6.0, 0.5 + t / 1200) if t < 3 * 3600 else 0.2

    fleet = SimulatedFleet(ON, demand).run(6 * 3600)
    times = [t for t, _ in fleet.actions]
    assert LAUNCH in fleet.directions()
    assert DRAIN in fleet.directions()
    assert all(b - a >= ON.cooldown for a, b in itertools.pairwise(times)), fleet.actions


def test_no_launch_while_a_master_warms() -> None:
    settings = evolve(ON, cooldown=30.0, warmup=600.0)
    fleet = SimulatedFleet(settings, lambda t: 3.0, boot=60.0).run(2 * 3600)
    launches = [t for t, d in fleet.actions if d.action == LAUNCH]
    assert len(launches) >= 2
    for first, second in itertools.pairwise(launches):
        # enrollment (boot) plus the warm-up, before the fleet's load is judged again
        assert second - first >= 60.0 + settings.warmup


@pytest.mark.parametrize(
    ("settings", "demand", "masters"),
    [
        (evolve(ON, max_masters=3), lambda t: 50.0, 1),
        (evolve(ON, min_masters=2), lambda t: 0.0, 4),
        (evolve(ON, min_masters=3, max_masters=5), lambda t: 0.0, 0),
        (evolve(ON, min_masters=1, max_masters=6), lambda t: 10.0 if (t // 3000) % 2 else 0.0, 1),
    ],
)
def test_bounds(settings: ScaleSettings, demand: Callable[[float], float], masters: int) -> None:
    fleet = SimulatedFleet(settings, demand, masters=masters).run(6 * 3600)
    assert fleet.max_live <= max(settings.max_masters, masters)
    final = [m for m in fleet.masters.values() if m.state == SERVING]
    assert settings.min_masters <= len(final) <= settings.max_masters
    if masters >= settings.min_masters:
        assert fleet.min_serving >= settings.min_masters


@pytest.mark.parametrize("max_launches", [1, 2, 3])
def test_a_burst_is_answered_by_at_most_n_launches(max_launches: int) -> None:
    settings = evolve(ON, max_launches=max_launches, max_masters=20)
    fleet = SimulatedFleet(settings, lambda t: 0.5 if t < 600 else 12.0).run(3 * 3600)
    launches = [d for _, d in fleet.actions if d.action == LAUNCH]
    assert launches[0].count == max_launches
    assert all(d.count <= max_launches for d in launches)
    assert max(coming for _, coming in fleet.coming) <= max_launches
    # The burst is met in the end, and the fleet stays as it is: the masters are under the threshold.
    busy, overloaded = fleet_busy(fleet.history[-1], [m.name for m in fleet.masters.values()])
    assert busy < settings.out_busy
    assert not overloaded
    assert fleet.actions[-1][0] < 3 * 3600 - settings.cooldown - settings.in_window


# --- [scale]


def test_scale_is_off_by_default_and_the_defaults_are_the_settings() -> None:
    settings = settings_from_config(config_from_string(""))
    assert settings == ScaleSettings()
    assert not settings.enabled


def test_scale_settings_from_the_file() -> None:
    config = config_from_string(
        "[scale]\nenabled = true\nlaunch_template = puppet-master\nmax_masters = 9\nout_busy = 0.9\n"
        "in_window = 30m\n"
    )
    settings = settings_from_config(config)
    assert settings == evolve(ScaleSettings(), enabled=True, max_masters=9, out_busy=0.9, in_window=1800.0)
    assert config[("scale", "launch_template")] == "puppet-master"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("enabled = true", r"\[scale\] launch_template: required when enabled"),
        ("min_masters = 5\nmax_masters = 4", r"\[scale\] min_masters: must be at most max_masters"),
        ("in_busy = 0.7", r"\[scale\] target_busy: must be above in_busy"),
        ("out_busy = 0.5", r"\[scale\] target_busy: .*below out_busy"),
        ("in_window = 1m", r"\[scale\] in_window: must be longer than out_window"),
        ("out_busy = lots", r"\[scale\] out_busy: not a number"),
        ("max_launches = 0", r"\[scale\] max_launches: 0 is outside"),
        # A report is up to an interval old when read, and the primary's round up to one later.
        ("enabled = true\nlaunch_template = t\ninterval = 20s",
         r"\[scale\] stale: must be at least twice interval"),
    ],
)
def test_bad_scale_settings_stop_the_start(content: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_string(f"[scale]\n{content}\n")


SOCKET = "load_socket = /run/puppetha/load.sock\n"
HA = "elastic_ip = eipalloc-0123456789abcdef0\ninstance_id = i-0123456789abcdef0\naddress = 10.0.0.1\n"


@pytest.mark.parametrize(
    ("lb", "ha", "message"),
    [
        (SOCKET, "", r"\[ha\] elastic_ip: required with \[scale\] enabled"),
        ("", HA, r"\[lb\] load_socket: required with \[scale\] enabled"),
        (SOCKET, HA, None),
    ],
)
def test_scaling_lb_nodes_need_the_lease_and_the_load_log(
    tmp_path: Path, lb: str, ha: str, message: str | None
) -> None:
    for name in ("lb.pem", "lb.key"):
        (tmp_path / name).write_text("")
    content = (f"[daemon]\nroles = lb\n[enroll]\nfront = puppet.test:8140\n[scale]\nenabled = true\n"
               f"launch_template = puppet-master\n[lb]\ncertificate = {tmp_path}/lb.pem\n"
               f"private_key = {tmp_path}/lb.key\n{lb}[ha]\n{ha}")
    if message is None:
        assert config_from_string(content)[("scale", "enabled")]
    else:
        with pytest.raises(ConfigError, match=message):
            config_from_string(content)
