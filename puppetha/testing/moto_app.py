"""
moto's server, with every request applied whole before the next one starts.

AWS applies each API call atomically: two conditional writes to one DynamoDB item never both
succeed.  moto's threaded server checks a condition and writes without a lock, so under load two
racing writers can both win, which is not how the service behaves.  This runner serves moto's own
application through one lock, so the races our tests run are decided the way AWS decides them.

``python -m puppetha.testing.moto_app -H 127.0.0.1 -p PORT`` (what :class:`MotoServer` runs).

``POST /puppetha-rig/settle-heap`` moves what moto holds then (a benchmark's fleet, launched
before its waves) out of the cyclic collector's passes, as the daemon settles its own heap
(puppetha/heap.py): a full pass over a few hundred instances stops this one-at-a-time server
for 100 to 180 ms, a pause of the stand-in that AWS's own service does not have.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple

from puppetha.testing.moto import SETTLE_HEAP_PATH

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def one_at_a_time(app: WSGIApp) -> WSGIApp:
    lock = threading.Lock()

    def atomic(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with lock:
            # The body is produced inside the lock too: moto may compute it lazily.
            return list(app(environ, start_response))

    return atomic


def with_settle_heap(app: WSGIApp) -> WSGIApp:
    """``app``, and ``POST`` :data:`SETTLE_HEAP_PATH`: collect, then freeze what is left."""

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != SETTLE_HEAP_PATH:
            return app(environ, start_response)
        if environ.get("REQUEST_METHOD") != "POST":
            start_response("405 Method Not Allowed", [("Allow", "POST")])
            return [b""]
        gc.collect()
        gc.freeze()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"settled": gc.get_freeze_count()}).encode()]

    return serve


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moto_app")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = one_at_a_time(with_settle_heap(DomainDispatcherApplication(create_backend_app)))
    run_simple(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
