"""
The smallest service a failover rig can put behind its Elastic IP: every TCP connection, to any
address of the host, gets the host's name and is closed.  A client outside then knows which node
answered it through the address.

``python -m puppetha.testing.name_service NAME PORT`` (run inside a rig host).
"""

from __future__ import annotations

import signal
import socket
import socketserver
import sys
from collections.abc import Sequence


class _Answer(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(self.server.name)  # type: ignore[attr-defined]


class NameServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str, port: int) -> None:
        super().__init__(("0.0.0.0", port), _Answer)  # noqa: S104 - every address: the EIP too
        self.name = name.encode()


def who_answers(address: str, port: int, timeout: float = 1.0) -> str | None:
    """The name the service at ``address`` gives, or None when nothing answers within ``timeout``."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as connection:
            answer = connection.recv(100)
    except OSError:
        return None
    return answer.decode() or None


def main(argv: Sequence[str] | None = None) -> None:
    name, port = (argv if argv is not None else sys.argv[1:])[:2]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with NameServer(name, int(port)) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
