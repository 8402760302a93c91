"""
AWS for a :class:`~puppetha.testing.netns.Rig`: moto's server in a host of its own, so every
host reaches it at one address and a partition can cut a host from it.

The server is moto's application served one request at a time (:mod:`puppetha.testing.moto_app`),
or, given the socket of an :class:`~puppetha.testing.eip.ElasticIPEmulator`, the same with
Elastic IP moves announced (:mod:`puppetha.testing.eip`).  The host is a namespace of its own,
so the port is always free.  Blocking code, for fixtures and benchmarks.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from puppetha.testing.moto import MotoServerError
from puppetha.testing.netns import Host

MOTO_PORT = 5000

# Straight to the rig's address, whatever proxy the environment names.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class MotoInRig:
    """``with MotoInRig(rig["aws"]) as moto: moto.endpoint_url`` — moto answering on the host's address."""

    def __init__(
        self,
        host: Host,
        associations_socket: str | Path | None = None,
        log_dir: str | Path | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.associations_socket = associations_socket
        self.startup_timeout = startup_timeout
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host.address}:{MOTO_PORT}"

    def start(self) -> MotoInRig:
        if self._process is not None:
            return self
        if self.associations_socket is not None:
            program = ["-m", "puppetha.testing.eip", "--associations", str(self.associations_socket)]
        else:
            program = ["-m", "puppetha.testing.moto_app"]
        log_dir = self._log_dir or Path(tempfile.mkdtemp(prefix="puppetha-moto-"))
        self.log_path = log_dir / f"moto-{self.host.namespace}.log"
        with self.log_path.open("wb") as log:
            self._process = self.host.popen(
                [sys.executable, *program, "-H", self.host.address, "-p", str(MOTO_PORT)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                with _direct.open(f"{self.endpoint_url}/moto-api/data.json", timeout=1) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        tail = self.log_path.read_bytes()[-400:].decode("utf-8", "replace")
        raise MotoServerError(f"moto would not start in {self.host.name}: {' '.join(tail.split())}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> MotoInRig:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
