"""
An Elastic IP for a :class:`~puppetha.testing.netns.Rig`: an address of the rig's subnet that
sits in the namespace of whichever instance moto says holds the Elastic IP, so a client outside
that talks to this one address reaches the holder's service, as on AWS.

Two halves.  Inside moto's process (``python -m puppetha.testing.eip``, moto's application
served one request at a time as in :mod:`puppetha.testing.moto_app`), every EC2 call that changes
which instance holds an address sends, before its answer leaves and still inside the request
lock, a datagram with every address's holder and the time on the machine's monotonic clock.
In the test's process, :class:`ElasticIPEmulator` receives those datagrams on a UNIX socket and
moves the address: out of the old holder's namespace, into the new one's, and out of every
neighbour cache on the bridge (AWS's network knows the new holder at once; ours must forget
the old MAC).  It records each move with moto's time and the time the address was in place.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from attrs import frozen

from puppetha.testing.moto_app import WSGIApp, one_at_a_time
from puppetha.testing.netns import HOST_INTERFACE, Host, Rig
from puppetha.testing.rtnetlink import RouteSocket

#: EC2 calls after which the holders of addresses are compared and, if changed, announced.
_CHANGING_ACTIONS = frozenset(
    {
        "AssociateAddress",
        "DisassociateAddress",
        "ReleaseAddress",
        "TerminateInstances",
        "StopInstances",
    }
)


def _holders() -> dict[str, str]:
    """Allocation id → instance id (``""`` when unassociated) for every address moto holds."""
    from moto.ec2.models import ec2_backends

    holders: dict[str, str] = {}
    backend: Any
    for _account, _region, backend in ec2_backends.iter_backends():
        for address in backend.addresses:
            instance_id = address.instance_id
            if not instance_id and address.eni is not None and getattr(address.eni, "instance", None):
                instance_id = address.eni.instance.id
            holders[address.allocation_id or address.public_ip] = instance_id or ""
    return holders


def announcing_associations(app: WSGIApp, socket_path: str) -> WSGIApp:
    """
    ``app``, announcing to the UNIX datagram socket ``socket_path`` every change of the addresses'
    holders, after the call that made it and before its answer.  Run it inside the request lock:
    the announcements are then in the order AWS applied the calls.
    """
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    last: dict[str, str] = {}
    sequence = 0

    def hooked(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        nonlocal last, sequence
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        query = urllib.parse.parse_qs(body.decode("latin-1")) if b"Action=" in body else {}
        query.update(urllib.parse.parse_qs(environ.get("QUERY_STRING", "")))
        answer = list(app(environ, start_response))
        if query.get("Action", [""])[0] in _CHANGING_ACTIONS:
            holders = _holders()
            if holders != last:
                last, sequence = holders, sequence + 1
                message = {"seq": sequence, "at": time.monotonic(), "holders": holders}
                # Nobody listening (no emulator running) changes nothing: the call still stands.
                with contextlib.suppress(OSError):
                    sender.sendto(json.dumps(message).encode(), socket_path)
        return answer

    return hooked


def main(argv: Sequence[str] | None = None) -> None:
    """moto's server with every request applied whole, announcing address moves to ``--associations``."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    parser = argparse.ArgumentParser(prog="puppetha.testing.eip")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    parser.add_argument("--associations", required=True, help="UNIX datagram socket to announce moves to")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    moto = DomainDispatcherApplication(create_backend_app)
    app = one_at_a_time(announcing_associations(moto, args.associations))
    run_simple(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)


@frozen
class Move:
    """One change of the Elastic IP's holder."""

    sequence: int
    instance_id: str  # "" when the address was disassociated
    host: str | None  # the rig host it now sits in, None when nobody (or an unknown instance) holds it
    associated_at: float  # moto's time.monotonic() when the call was applied
    placed_at: float  # the emulator's time.monotonic() when the address sat in its new place


class ElasticIPEmulator:
    """
    Keeps ``address`` (a spare address of ``rig``) in the namespace of the instance holding
    ``allocation_id``, per the datagrams on :attr:`socket_path`.  ``instances`` maps instance ids
    to the rig's hosts; add more with :meth:`map_instance`.
    """

    def __init__(
        self,
        rig: Rig,
        allocation_id: str,
        address: str,
        socket_path: str | Path,
        instances: Mapping[str, Host] | None = None,
    ) -> None:
        self.rig = rig
        self.allocation_id = allocation_id
        self.address = address
        self.socket_path = str(socket_path)
        self._instances = dict(instances or {})
        self._holder: Host | None = None
        self._instance_id = ""
        self._sequence = 0
        self.history: list[Move] = []
        self._changed = threading.Condition()
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._routes: dict[str, RouteSocket] = {}

    def map_instance(self, instance_id: str, host: Host) -> None:
        self._instances[instance_id] = host

    @property
    def holder(self) -> Host | None:
        """The host the address sits in now."""
        return self._holder

    def start(self) -> ElasticIPEmulator:
        if self._socket is not None:
            return self
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(self.socket_path)
        self._thread = threading.Thread(target=self._receive, name="eip-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        receiver, self._socket = self._socket, None
        if receiver is None:
            return
        # A datagram to itself wakes the receiving thread, which then sees it must stop.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"", self.socket_path)
        if self._thread is not None:
            self._thread.join(10)
        receiver.close()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self._move(None)
        self._holder = None
        for route in self._routes.values():
            route.close()
        self._routes = {}

    def _receive(self) -> None:
        receiver = self._socket
        assert receiver is not None  # noqa: S101 - set before the thread starts
        while self._socket is not None:
            datagram = receiver.recv(65536)
            if not datagram:
                continue
            message = json.loads(datagram)
            if message["seq"] <= self._sequence:
                continue
            self._sequence = message["seq"]
            instance_id = message["holders"].get(self.allocation_id, "")
            if instance_id == self._instance_id:
                continue
            self._instance_id = instance_id
            host = self._instances.get(instance_id) if instance_id else None
            self._move(host)
            with self._changed:
                self._holder = host
                self.history.append(
                    Move(
                        sequence=message["seq"],
                        instance_id=instance_id,
                        host=host.name if host is not None else None,
                        associated_at=float(message["at"]),
                        placed_at=time.monotonic(),
                    )
                )
                self._changed.notify_all()

    def _route(self, host: Host | None) -> RouteSocket:
        """The rtnetlink socket of ``host`` (None: the root namespace, on the bridge), made once."""
        key = host.name if host is not None else ""
        if key not in self._routes:
            if host is None:
                self._routes[key] = RouteSocket(self.rig.bridge)
            else:
                self._routes[key] = host.inside(lambda: RouteSocket(HOST_INTERFACE))
        return self._routes[key]

    def _move(self, host: Host | None) -> None:
        old = self._holder
        if old is host:
            return
        # Out of the old place first: two hosts answering ARP for one address would split the clients.
        if old is not None:
            self._route(old).delete_address(self.address)
        if host is not None:
            self._route(host).add_address(self.address)
        # AWS's network knows the new holder at once; ours must forget the old MAC everywhere.
        self._route(None).forget_neighbour(self.address)
        for other in self.rig.hosts.values():
            self._route(other).forget_neighbour(self.address)

    def wait_for(self, host: Host | None, timeout: float = 10.0) -> Move:
        """Waits until the address sits in ``host`` (None: nowhere); returns the move that put it there."""
        return self.wait_for_any([host], timeout)

    def wait_for_any(self, hosts: Collection[Host | None], timeout: float = 10.0) -> Move:
        """Waits until the address sits in one of ``hosts``; returns the move that put it there."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (self.history and any(self._holder is host for host in hosts)):
                left = deadline - time.monotonic()
                if left <= 0:
                    where = self._holder.name if self._holder else "nowhere"
                    wanted = ", ".join(host.name if host else "nowhere" for host in hosts)
                    raise TimeoutError(f"the Elastic IP is in {where}, not in {wanted}, after {timeout}s")
                self._changed.wait(left)
            return self.history[-1]

    def moves_after(self, index: int) -> list[Move]:
        with self._changed:
            return list(self.history[index:])

    def __enter__(self) -> ElasticIPEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":
    main()
