"""
A real ``twistd puppetha`` lb daemon on loopback with its own real nginx: its settings, process and
nginx, started and killed from outside (as the daemon tests and the demo do).  Several share one
store and one Elastic IP; each listens on its own free ports.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from puppetha.testing.acting import read_events
from puppetha.testing.nginx import NGINX, loopback_ports

TWISTD = str(Path(sys.executable).parent / "twistd")


def eventually(check: Callable[[], bool], what: str, logs: list[Path], seconds: float = 30) -> None:
    """Wait for ``check``; on a timeout, an AssertionError carrying the daemons' logs."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            text = "\n".join(f"--- {log}\n{log.read_text()}" for log in logs if log.exists())
            raise AssertionError(f"{what} did not happen; daemon logs:\n{text}")
        time.sleep(0.05)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LbNode:
    """One lb daemon's settings, process and nginx; started and killed by its owner."""

    def __init__(self, name: str, instance_id: str, parent: Path, common: Mapping[str, str], *,
                 certificate: str, private_key: str, env: Mapping[str, str]) -> None:
        """
        ``common``: the settings every node shares (store, AWS, ``ha.elastic_ip``...); ``env``:
        the daemon's environment (its AWS credentials).  Everything else is the node's own,
        under ``parent / name``.
        """
        self.name = name
        self.instance_id = instance_id
        self.dir = parent / name
        self.dir.mkdir()
        (self.dir / "nginx-temp").mkdir()
        self.env = dict(env)
        self.ports = loopback_ports()
        self.error_log = self.dir / "nginx-error.log"
        self.live = self.dir / "nginx" / "live" / "nginx.conf"
        self.acting_log = self.dir / "acting.jsonl"
        self.log = self.dir / "daemon.log"
        self.settings = {
            **common,
            "daemon.roles": "lb",
            "lb.certificate": certificate,
            "lb.private_key": private_key,
            "lb.listen_address": "127.0.0.1",
            "lb.front_port": str(self.ports.front),
            "lb.enroll_port": str(self.ports.enroll),
            "lb.first_master_port": str(self.ports.first_master),
            "lb.max_masters": str(self.ports.max_masters),
            "lb.nginx_dir": str(self.dir / "nginx"),
            "lb.nginx_pid": str(self.dir / "nginx.pid"),
            "lb.nginx_error_log": str(self.error_log),
            "lb.nginx_temp_dir": str(self.dir / "nginx-temp"),
            "lb.nginx_access_log": str(self.dir / "nginx-access.log"),
            "lb.nginx_user": "root",
            "enc.socket": str(self.dir / "enc.sock"),
            "ha.instance_id": instance_id,
            "ha.address": "127.0.0.1",
            "ha.heartbeat_listen": "127.0.0.1",
            "ha.heartbeat_port": str(free_udp_port()),
            "ha.acting_log": str(self.acting_log),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.nginx: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [TWISTD, "--nodaemon", "--pidfile=", "puppetha", "--state-dir", str(self.dir / "state")]
        for name, value in self.settings.items():
            command += ["--set", f"{name}={value}"]
        with self.log.open("a") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env)

    def start_nginx(self) -> None:
        """nginx on the first configuration the daemon wrote; the daemon reloads it after."""
        eventually(self.live.exists, f"{self.name}'s first nginx configuration", [self.log])
        self.nginx = subprocess.Popen(
            [NGINX, "-e", str(self.error_log), "-c", str(self.live), "-g", "daemon off;"])

    def signal(self, number: int) -> int:
        """Send ``number`` to the daemon and wait for it to end; its exit status."""
        if self.process is None:
            raise RuntimeError(f"{self.name} is not running")
        self.process.send_signal(number)
        status = self.process.wait(timeout=30)
        self.process = None
        return status

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.acting_log)

    def stop_all(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None
        if self.nginx is not None:
            self.nginx.send_signal(signal.SIGQUIT)
            self.nginx.wait(timeout=30)
            self.nginx = None

