"""Failover decisions as tables: suspect, take over, renew, step down, release."""

from __future__ import annotations

import pytest

from puppetha.ha.failover import (
    Action,
    FailoverSettings,
    Situation,
    decide,
    next_watch,
    suspect,
)
from puppetha.ha.lease import RELEASED, Holding, Watch
from puppetha.store.records import LeaseRecord, Versioned

SETTINGS = FailoverSettings()
ME = "i-me"
OTHER = "i-other"


def lease(version: int, holder: str = OTHER, token: int = 4) -> Versioned[LeaseRecord]:
    return Versioned(LeaseRecord("lb-primary", holder, token, SETTINGS.lease_duration, 0.0), version)


def holding(token: int = 4, version: int = 7, started: float = 100.0) -> Holding:
    return Holding("lb-primary", ME, token, version, SETTINGS.lease_duration, SETTINGS.lease_margin, started)


def situation(
    now: float = 100.0,
    lease_: Versioned[LeaseRecord] | None = None,
    *,
    read: bool = True,
    held: Holding | None = None,
    watch: Watch | None = None,
    heard: float | None = None,
    stopping: bool = False,
    own: int | None = None,
    wrote: tuple[int, float] | None = None,
) -> Situation:
    return Situation(ME, now, read, lease_, held, watch, heard, stopping, own, wrote)


@pytest.mark.parametrize(
    ("name", "given", "action"),
    [
        # standby
        ("nobody ever held it", situation(lease_=None), Action.TAKE_OVER),
        ("released by a graceful stop", situation(lease_=lease(3, holder=RELEASED)), Action.TAKE_OVER),
        ("first look at a held lease", situation(lease_=lease(3), heard=99.95), Action.WAIT),
        ("watched unchanged, not a full duration", situation(100.79, lease(3), watch=Watch(3, 100.0)),
         Action.WAIT),
        ("watched unchanged a full duration", situation(100.81, lease(3), watch=Watch(3, 100.0)),
         Action.TAKE_OVER),
        ("renewed since the watch began", situation(150.0, lease(4), watch=Watch(3, 100.0)), Action.WAIT),
        ("store unreachable: never take what cannot be written",
         situation(150.0, None, read=False, watch=Watch(3, 100.0)), Action.WAIT),
        ("a lease in my name from a past life is not mine", situation(100.0, lease(3, holder=ME)),
         Action.WAIT),
        ("my lease, still at my own last write, after I stepped down",
         situation(100.0, lease(3, holder=ME), own=3), Action.TAKE_OVER),
        ("my lease, written since my last write (a lost answer): wait a lapse",
         situation(100.0, lease(4, holder=ME), own=3), Action.WAIT),
        ("someone else's lease at the version I once wrote is impossible, but never taken early",
         situation(100.0, lease(3), own=3), Action.WAIT),
        # the holder's heartbeat named the version before this node read it
        ("heard of the version a full duration ago, read it only now",
         situation(100.81, lease(3), watch=Watch(3, 100.6), wrote=(3, 100.0)), Action.TAKE_OVER),
        ("heard of the version, not a full duration ago",
         situation(100.79, lease(3), watch=Watch(3, 100.6), wrote=(3, 100.0)), Action.WAIT),
        ("first read, of a version heard of a full duration ago",
         situation(100.81, lease(3), wrote=(3, 100.0)), Action.TAKE_OVER),
        ("heard of another version than the one read: the read's watch counts",
         situation(100.81, lease(4), watch=Watch(4, 100.6), wrote=(3, 100.0)), Action.WAIT),
        ("renewed since the heartbeat named a version", situation(100.81, lease(4), wrote=(3, 99.0)),
         Action.WAIT),
        # holder
        ("holding, inside the window", situation(100.5, lease(7, holder=ME), held=holding()), Action.RENEW),
        ("holding, store unreachable, inside the window", situation(100.5, None, read=False, held=holding()),
         Action.RENEW),
        ("holding, store unreachable, window over", situation(100.6, None, read=False, held=holding()),
         Action.STEP_DOWN),
        ("deposed by a higher token", situation(100.1, lease(8, holder=OTHER, token=5), held=holding()),
         Action.STEP_DOWN),
        ("the lease was deleted", situation(100.1, None, held=holding()), Action.STEP_DOWN),
        ("released by someone else", situation(100.1, lease(8, holder=RELEASED), held=holding()),
         Action.STEP_DOWN),
        # stopping
        ("stopping while holding", situation(100.1, lease(7, holder=ME), held=holding(), stopping=True),
         Action.RELEASE),
        ("stopping as standby", situation(100.1, lease(7), stopping=True), Action.WAIT),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_decide(name: str, given: Situation, action: Action) -> None:
    assert decide(given, SETTINGS).action is action


def test_a_standby_that_hears_the_primary_looks_slowly_but_never_past_the_lapse() -> None:
    heard = decide(situation(100.0, lease(3), watch=Watch(3, 100.0), heard=99.95), SETTINGS)
    assert heard.action is Action.WAIT
    assert heard.next_check == pytest.approx(SETTINGS.lease_duration)
    slow = FailoverSettings(standby_poll=0.5)
    assert decide(situation(100.0, lease(3), watch=Watch(3, 100.0), heard=99.95), slow).next_check == 0.5


def test_a_node_that_wrote_the_lease_looks_often_while_the_store_is_unreachable() -> None:
    mine = decide(situation(100.0, None, read=False, own=7), SETTINGS)
    never = decide(situation(100.0, None, read=False), SETTINGS)
    assert (mine.action, never.action) == (Action.WAIT, Action.WAIT)
    assert mine.next_check == SETTINGS.suspect_poll < never.next_check


def test_a_suspecting_standby_looks_often() -> None:
    silent = decide(situation(100.0, lease(3), watch=Watch(3, 99.5), heard=99.6), SETTINGS)
    assert "suspecting" in silent.reason
    assert silent.next_check == SETTINGS.suspect_poll


@pytest.mark.parametrize(
    ("heard", "now", "suspected"),
    [(None, 5.0, True), (4.0, 4.19, False), (4.0, 4.21, True), (4.0, 9.0, True)],
)
def test_suspect(heard: float | None, now: float, suspected: bool) -> None:
    assert suspect(heard, now, SETTINGS.suspect_after) is suspected


def test_next_watch_keeps_its_start_while_the_version_holds_and_survives_a_failed_read() -> None:
    first = next_watch(situation(1.0, lease(3)))
    assert first == Watch(3, 1.0)
    assert next_watch(situation(1.5, lease(3), watch=first)) == first
    assert next_watch(situation(1.6, None, read=False, watch=first)) == first
    assert next_watch(situation(1.7, lease(4), watch=first)) == Watch(4, 1.7)
    assert next_watch(situation(1.8, lease(4, holder=ME), held=holding())) is None


def test_a_watch_starts_at_the_first_news_of_its_version_whether_read_or_heard() -> None:
    # Heard before the read: the heartbeat's moment.
    assert next_watch(situation(1.0, lease(3), wrote=(3, 0.7))) == Watch(3, 0.7)
    # Read before the heartbeat came: the read's moment stays.
    assert next_watch(situation(1.0, lease(3), watch=Watch(3, 0.5), wrote=(3, 0.7))) == Watch(3, 0.5)
    # The heartbeat named a version the store no longer has: it says nothing of this one.
    assert next_watch(situation(1.0, lease(4), wrote=(3, 0.2))) == Watch(4, 1.0)
    lapse = decide(situation(1.0, lease(3), wrote=(3, 0.7), heard=0.95), SETTINGS)
    assert lapse.next_check == pytest.approx(0.7 + SETTINGS.lease_duration - 1.0)


def test_settings_refuse_a_renewal_slower_than_the_window() -> None:
    with pytest.raises(ValueError, match="renew"):
        FailoverSettings(lease_duration=1.0, lease_margin=0.3, renew_interval=0.7)
    with pytest.raises(ValueError, match="margin"):
        FailoverSettings(lease_duration=1.0, lease_margin=1.0)
