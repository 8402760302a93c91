"""
Log output for journald and log shippers: one JSON object per line.

Use it with twistd's own switch: ``twistd --logger puppetha.logs.json_observer -n puppetha``.
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import FileLogObserver, ILogObserver, eventAsJSON


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """An observer writing each event as a JSON object on its own line."""
    return FileLogObserver(out or sys.stdout, lambda event: eventAsJSON(event) + "\n")
