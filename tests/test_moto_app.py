"""The moto runner applies requests one at a time, as AWS applies each call whole."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from puppetha.testing.moto import SETTLE_HEAP_PATH, Fleet, MotoServer
from puppetha.testing.moto_app import one_at_a_time


def test_requests_never_overlap() -> None:
    inside = 0
    most = 0
    guard = threading.Lock()

    def slow_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
        time.sleep(0.01)
        with guard:
            inside -= 1
        return [b"ok"]

    app = one_at_a_time(slow_app)
    answers: list[list[bytes]] = []
    threads = [threading.Thread(target=lambda: answers.append(list(app({}, lambda *a: None))))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [[b"ok"]] * 8
    assert most == 1


def test_a_lazy_body_is_produced_inside_the_lock() -> None:
    events: list[str] = []

    def lazy_app(environ: dict[str, Any], start_response: Any) -> Any:
        name = environ["name"]

        def body() -> Any:
            events.append(f"{name} starts")
            time.sleep(0.01)
            yield b"part"
            events.append(f"{name} ends")

        return body()

    app = one_at_a_time(lazy_app)
    threads = [threading.Thread(target=app, args=({"name": n}, lambda *a: None)) for n in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(events) == ["a ends", "a starts", "b ends", "b starts"]
    first = events[0].split()[0]
    assert events[:2] == [f"{first} starts", f"{first} ends"]


def test_the_rig_settles_moto_s_heap_and_moto_goes_on_answering() -> None:
    with MotoServer() as moto:
        fleet = Fleet(moto.endpoint_url, "us-east-1")
        launched = fleet.launch("agent")
        settled = moto.settle_heap()
        # moto's backends and the instance are held: well over a few thousand objects.
        assert settled > 10_000
        assert fleet.describe(launched.instance_id).state == "running"
        # Only POST settles; moto's own paths are untouched.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{moto.endpoint_url}{SETTLE_HEAP_PATH}", timeout=10)  # noqa: S310
        assert refused.value.code == 405
