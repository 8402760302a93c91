"""
Reading the lb nodes' acting logs (``[ha] acting_log``): when each node acted as primary, under
which token, and every AssociateAddress it made, all on the machine's monotonic clock.  For test
rigs that check that no two nodes ever acted at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

Window = tuple[float, float]


def read_events(*paths: str | Path) -> list[dict[str, Any]]:
    """Every event of the logs, each file in its own order, files one after another."""
    events: list[dict[str, Any]] = []
    for path in paths:
        p = Path(path)
        if p.exists():
            events += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return events


def windows(events: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], Window]:
    """
    (node, token) -> (acted from, acted until).  Within one node's log the last ``acting`` or
    ``stopped`` event of a token wins: a ``stopped`` ends the window early, and a node killed
    with -9 ends at the ``until`` of its last renewal (the latest it may have acted).
    """
    found: dict[tuple[str, int], Window] = {}
    for event in events:
        if event["event"] in ("acting", "stopped"):
            found[(event["node"], event["token"])] = (event["start"], event["until"])
    return found


def overlaps(found: Mapping[tuple[str, int], Window]) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """Every pair of windows of different nodes that overlap (empty when failover is safe)."""
    pairs = []
    items = sorted(found.items(), key=lambda kv: kv[1][0])
    for i, (one, (_, until)) in enumerate(items):
        for other, (other_start, _) in items[i + 1 :]:
            if other_start >= until:
                break
            if other[0] != one[0]:
                pairs.append((one, other))
    return pairs


def stray_associations(events: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """AssociateAddress calls made outside the window of the token that made them."""
    events = list(events)
    found = windows(events)
    stray = []
    for event in events:
        if event["event"] != "associate":
            continue
        window = found.get((event["node"], event["token"]))
        if window is None or not window[0] <= event["at"] < window[1]:
            stray.append(event)
    return stray
