"""
The scaling policy, pure: the masters' load samples, their states and the time in, one decision
out (hold, launch N, drain one).  No I/O and no clock of its own, so it is tested as a table on
:class:`twisted.internet.task.Clock`; the service that samples and acts calls :func:`decide`.

docs/scaling.md describes the policy and every ``[scale]`` setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from attrs import fields, frozen


class Options(Protocol):
    """What the policy reads of a configuration (:class:`puppetha.config.Config` is one):
    typed by shape, so that the configuration may check ``[scale]`` with this module."""

    def __getitem__(self, key: tuple[str, str]) -> Any: ...

#: Launched, not yet enrolled (no certificate, so not in the upstream).
STARTING = "starting"
#: Enrolled; puppetserver starts its JRubies.  Its load is not judged yet.
WARMING = "warming"
#: In the upstream, judged by its load.
SERVING = "serving"
#: No new agents; leaves the upstream when its requests end, then is terminated.
DRAINING = "draining"
#: Drained: out of the upstream, to be terminated.
DRAINED = "drained"
STATES = (STARTING, WARMING, SERVING, DRAINING, DRAINED)

HOLD = "hold"
LAUNCH = "launch"
DRAIN = "drain"


@frozen
class MasterLoad:
    """One master's load over one sampling interval, as the lb nodes saw it, merged."""

    #: Requests proxied to it in the interval.
    requests: int = 0
    #: Requests open at the end of the interval (nginx's view).
    in_flight: int = 0
    #: Mean upstream response time of the interval's requests, seconds.
    upstream_time: float = 0.0
    #: Answers 503 (puppetserver's JRuby queue was full) in the interval.
    unavailable: int = 0
    #: JRuby instances free and the pool's size (puppetserver's jruby-metrics).
    jruby_free: int = 0
    jruby_size: int = 0
    #: JRubies requested in the interval, and the mean time a borrow waited for one, seconds.
    jruby_requested: int = 0
    jruby_wait: float = 0.0
    #: Mean time a JRuby was held (borrowed), seconds.
    jruby_borrow: float = 0.0
    #: Requests refused because the JRuby queue was at its limit, in the interval.
    queue_limit_hits: int = 0
    #: Agents assigned to it (from the store).
    agents: int = 0

    @property
    def overloaded(self) -> bool:
        """Puppet refused work: nothing else says so as plainly."""
        return self.unavailable > 0 or self.queue_limit_hits > 0

    def busy(self) -> float:
        """
        JRubies in use plus borrows waiting, as a fraction of the pool (may exceed 1).  Without
        jruby-metrics, nginx's in-flight count, as if the pool had one JRuby (scaling out early
        rather than late).
        """
        if self.jruby_size <= 0:
            return float(self.in_flight)
        used = self.jruby_size - self.jruby_free
        waiting = max(0, self.in_flight - self.jruby_size)
        return (used + waiting) / self.jruby_size


@frozen
class Sample:
    """The merged load of every master at one moment (``at``, seconds on the deciding clock)."""

    at: float
    loads: Mapping[str, MasterLoad]


@frozen
class Master:
    """A master as the policy sees it: ``since`` is when it entered ``state``."""

    name: str
    state: str
    since: float
    agents: int = 0


@frozen
class ScaleSettings:
    """``[scale]``: see docs/scaling.md.  Off unless ``enabled``."""

    enabled: bool = False
    min_masters: int = 1
    max_masters: int = 4
    #: At most this many masters launched by one decision (and starting or warming at once).
    max_launches: int = 2
    #: Scale out when the serving masters' mean busy fraction stays at or above this...
    out_busy: float = 0.8
    #: ... for this long (any 503 or queue-limit hit counts as busy).
    out_window: float = 60.0
    #: Scale in when it stays at or below this, with no 503 ...
    in_busy: float = 0.3
    #: ... for this long.
    in_window: float = 600.0
    #: No action for this long after any action.
    cooldown: float = 300.0
    #: A warming master is not judged, and no other launch is made, for this long.
    warmup: float = 300.0
    #: A master starting for longer than this no longer counts as coming capacity.
    launch_timeout: float = 900.0
    #: A draining master leaves the upstream when its last request ends, or after this long.
    drain_timeout: float = 120.0
    #: The busy fraction a launch or a drain aims the fleet at.
    target_busy: float = 0.6
    #: The newest sample must be younger than this, or the policy holds.
    stale: float = 30.0

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.min_masters <= self.max_masters:
            raise ValueError("min_masters: must be at most max_masters")
        if self.max_launches < 1:
            raise ValueError("max_launches: must be at least 1")
        if not 0 <= self.in_busy < self.target_busy < self.out_busy:
            raise ValueError("target_busy: must be above in_busy and below out_busy")
        if self.in_window <= self.out_window:
            # Scaling in must be the slower: else a dip drains what the next peak launches again.
            raise ValueError("in_window: must be longer than out_window")


def settings_from_config(config: Options) -> ScaleSettings:
    """``[scale]``, every option but the launch template (which the acting side uses)."""
    return ScaleSettings(**{f.name: config[("scale", f.name)] for f in fields(ScaleSettings)})


@frozen
class ScaleDecision:
    action: str
    reason: str
    count: int = 0
    #: The master to drain.
    master: str | None = None


def next_state(master: Master, now: float, settings: ScaleSettings, *, enrolled: bool, in_flight: int) -> str:
    """
    Where a master's life goes next: enrolled, a starting master warms; after ``warmup`` it
    serves; a draining master is drained when its last request ends or ``drain_timeout`` passed.
    """
    if master.state == STARTING and enrolled:
        return WARMING
    if master.state == WARMING and now - master.since >= settings.warmup:
        return SERVING
    if master.state == DRAINING and (in_flight == 0 or now - master.since >= settings.drain_timeout):
        return DRAINED
    return master.state


def _hold(reason: str) -> ScaleDecision:
    return ScaleDecision(HOLD, reason)


def fleet_busy(sample: Sample, serving: Sequence[str]) -> tuple[float, bool]:
    """The serving masters' mean busy fraction in ``sample``, and whether any was overloaded."""
    loads = [sample.loads.get(name, MasterLoad()) for name in serving]
    if not loads:
        return 0.0, False
    return sum(load.busy() for load in loads) / len(loads), any(load.overloaded for load in loads)


def held(
    history: Sequence[Sample], since: float, now: float, window: float, condition: Callable[[Sample], bool]
) -> bool:
    """
    ``condition`` held for the whole of the last ``window`` seconds: the last sample taken at or
    before ``now - window`` and every later one satisfy it, and none of them is from before
    ``since`` (the last action, which changed the fleet the samples measured).
    """
    start = now - window
    if start < since:
        return False
    ordered = sorted(history, key=lambda s: s.at)
    first = None
    for i, sample in enumerate(ordered):
        if sample.at <= start:
            first = i
    if first is None or ordered[first].at < since:
        return False
    return all(condition(sample) for sample in ordered[first:] if sample.at <= now)


def decide(
    settings: ScaleSettings,
    masters: Sequence[Master],
    history: Sequence[Sample],
    now: float,
    last_action: float | None,
) -> ScaleDecision:
    """
    What the fleet needs now.  ``history`` holds at least the last ``in_window`` of samples;
    ``last_action`` is when the last launch or drain was decided (None: never).
    """
    if not settings.enabled:
        return _hold("scaling is off")
    serving = sorted(m.name for m in masters if m.state == SERVING)
    coming = [
        m for m in masters
        if m.state == WARMING or (m.state == STARTING and now - m.since < settings.launch_timeout)
    ]
    draining = [m for m in masters if m.state == DRAINING]
    live = len(serving) + len(coming)

    # Bounds first: they need no load, and no window.
    if live < settings.min_masters:
        count = min(settings.min_masters - live, settings.max_launches - len(coming))
        if count > 0:
            return ScaleDecision(
                LAUNCH, f"{live} masters, fewer than min_masters {settings.min_masters}", count)
        return _hold(f"below min_masters, {len(coming)} masters already coming")
    if len(serving) > settings.max_masters and not draining:
        return ScaleDecision(DRAIN, f"{len(serving)} serving masters, more than max_masters "
                             f"{settings.max_masters}", master=_least_loaded(masters, history))

    if last_action is not None and now < last_action + settings.cooldown:
        return _hold(f"cooling down until {last_action + settings.cooldown:.0f}")
    if coming:
        # Their capacity is on its way: judging the old fleet's load now would launch twice.
        return _hold(f"{len(coming)} masters starting or warming")
    if not history or now - max(s.at for s in history) > settings.stale:
        return _hold("no fresh load sample")
    if not serving:
        return _hold("no serving master to judge")
    # Samples from before the fleet last changed (an action, a master entering service) measured
    # another fleet: the windows start after it.
    since = max([last_action if last_action is not None else -math.inf,
                 *(m.since for m in masters if m.state == SERVING)])

    def busy_out(sample: Sample) -> bool:
        busy, overloaded = fleet_busy(sample, serving)
        return overloaded or busy >= settings.out_busy

    def quiet(sample: Sample) -> bool:
        busy, overloaded = fleet_busy(sample, serving)
        return not overloaded and busy <= settings.in_busy

    latest = max(history, key=lambda s: s.at)
    busy_now, _ = fleet_busy(latest, serving)
    if held(history, since, now, settings.out_window, busy_out):
        room = settings.max_masters - live
        if room <= 0:
            return _hold(f"busy, but at max_masters {settings.max_masters}")
        # Enough masters to bring the mean down to the target, at least one, at most max_launches.
        wanted = math.ceil(len(serving) * max(busy_now, settings.out_busy) / settings.target_busy)
        count = max(1, min(wanted - len(serving), settings.max_launches, room))
        return ScaleDecision(LAUNCH, f"busy {busy_now:.2f} >= {settings.out_busy} for "
                             f"{settings.out_window:.0f}s", count)
    if draining:
        return _hold(f"{len(draining)} masters draining")
    if held(history, since, now, settings.in_window, quiet):
        if len(serving) <= settings.min_masters:
            return _hold(f"quiet, but at min_masters {settings.min_masters}")
        if len(serving) == 1:
            # min_masters 0 lets the fleet shrink to none only by an operator's hand: a drain
            # of the last serving master would leave every agent without one.
            return _hold("quiet, but the last serving master")
        # Only when the rest would stay under the target: otherwise the next window launches again.
        after = busy_now * len(serving) / (len(serving) - 1)
        if after > settings.target_busy:
            return _hold(f"quiet, but {len(serving) - 1} masters would be at {after:.2f}")
        return ScaleDecision(DRAIN, f"busy {busy_now:.2f} <= {settings.in_busy} for "
                             f"{settings.in_window:.0f}s", master=_least_loaded(masters, history))
    return _hold(f"busy {busy_now:.2f}")


def _least_loaded(masters: Sequence[Master], history: Sequence[Sample]) -> str:
    """The serving master to drain: fewest agents, then fewest requests in flight, then name."""
    latest = max(history, key=lambda s: s.at).loads if history else {}
    serving = [m for m in masters if m.state == SERVING]
    return min(
        serving,
        key=lambda m: (m.agents, latest.get(m.name, MasterLoad()).in_flight, m.name),
    ).name
