"""
A TCP proxy that can black-hole its upstream: the fault of a dependency that hangs instead of
refusing.  Put it in front of a moto server (or anything on TCP) and point the code under test
at :attr:`BlackHoleProxy.url`.

While :attr:`BlackHoleProxy.black_holed` is set, new connections are accepted and then never
answered (nothing is read, nothing forwarded), as with a firewall that drops replies or a
server stuck after ``accept``; connections already forwarding stall too.  Clear it and new
connections are forwarded again; the stalled ones stay stalled until the client gives up, as
they would in the real fault.

Blocking code on its own threads, for tests and command-line tools, never for the reactor thread.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from types import TracebackType


class BlackHoleProxy:
    """``with BlackHoleProxy("127.0.0.1", moto.port) as proxy: ...; proxy.black_holed = True``"""

    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server((host, 0))
        self.host = host
        self.port = int(self._listener.getsockname()[1])
        self._black_holed = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        #: Connections accepted while black-holed, and all connections (for tests).
        self.swallowed = 0
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, name=f"blackhole-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def black_holed(self) -> bool:
        return self._black_holed.is_set()

    @black_holed.setter
    def black_holed(self, value: bool) -> None:
        if value:
            self._black_holed.set()
        else:
            self._black_holed.clear()

    def start(self) -> BlackHoleProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> BlackHoleProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def _keep(self, s: socket.socket) -> None:
        with self._lock:
            if self._stopping.is_set():
                s.close()
                return
            self._sockets.add(s)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._keep(client)
            if self.black_holed:
                self.swallowed += 1  # held open, never read: the client waits for its own timeout
                continue
            threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            with contextlib.suppress(OSError):
                client.close()
            return
        self._keep(upstream)
        pair = {client: upstream, upstream: client}
        try:
            while not self._stopping.is_set():
                if self.black_holed:
                    # Stall mid-stream too: stop reading and forwarding until the fault ends.
                    self._stopping.wait(0.05)
                    continue
                readable, _, _ = select.select(list(pair), [], [], 0.05)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    pair[s].sendall(data)
        except OSError:
            return
        finally:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.close()
