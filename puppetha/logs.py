"""
Log output for journald and log shippers: one JSON object per line.

Use it with twistd's own switch: ``twistd --logger puppetha.logs.json_observer -n puppetha``.
Each line has ``time``, ``level``, ``namespace``, ``message`` (the formatted text) and the
event's own fields (``certname``, ``instance_id``, ...), so lines can be filtered by field.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, LogEvent, formatEvent

#: Twisted's own bookkeeping keys, left out of the line.
_INTERNAL = ("log_", "format", "message", "isError", "system", "time")


def _json_safe(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return repr(value)


def event_as_line(event: LogEvent) -> str:
    level = event.get("log_level")
    line: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(timespec="milliseconds"),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        line["failure"] = failure.getTraceback()
    for key, value in event.items():
        if not key.startswith(_INTERNAL) and key not in line:
            line[key] = _json_safe(value)
    return json.dumps(line, sort_keys=False) + "\n"


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """An observer writing each event as a JSON object on its own line."""
    return FileLogObserver(out or sys.stdout, event_as_line)
