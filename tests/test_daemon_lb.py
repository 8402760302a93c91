"""
``twistd puppetha`` with the lb role, on real nginx: the daemon renders nginx's configuration
from the store, and a master registered in the store reaches the running nginx by itself.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from puppetha.store.records import MasterRecord
from puppetha.testing.nginx import NGINX, FrontPKI, free_port, loopback_ports, require_nginx

TWISTD = str(Path(sys.executable).parent / "twistd")


def eventually(check: Callable[[], bool], what: str, log: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen; daemon log:\n{log.read_text()}")
        time.sleep(0.2)


def test_the_lb_role_keeps_a_running_nginx_in_step_with_the_store(tmp_path: Path) -> None:
    require_nginx()
    pki = FrontPKI(tmp_path / "pki")
    pki.add_ca("lb")
    lb = pki.leaf("lb", "lb-1", sans=["puppet"], usage="both")
    ports = loopback_ports()
    nginx_dir = tmp_path / "nginx"
    (tmp_path / "nginx-temp").mkdir()
    error_log = tmp_path / "nginx-error.log"
    settings = {
        "daemon.roles": "lb",
        "store.path": str(tmp_path / "pki" / "store.sqlite"),
        "pki.vault_key_file": str(tmp_path / "pki" / "vault.key"),
        "enroll.front": "puppet:8140",
        "lb.certificate": lb.certificate,
        "lb.private_key": lb.private_key,
        "lb.listen_address": "127.0.0.1",
        "lb.front_port": str(ports.front),
        "lb.enroll_port": str(ports.enroll),
        "lb.first_master_port": str(ports.first_master),
        "lb.max_masters": str(ports.max_masters),
        "lb.nginx_dir": str(nginx_dir),
        "lb.nginx_pid": str(tmp_path / "nginx.pid"),
        "lb.nginx_error_log": str(error_log),
        "lb.nginx_temp_dir": str(tmp_path / "nginx-temp"),
        "lb.nginx_access_log": str(tmp_path / "nginx-access.log"),
        "lb.nginx_user": "root",
        "lb.interval": "1s",
        "lb.health_interval": "1s",
        "enc.socket": str(tmp_path / "enc.sock"),
    }
    command = [TWISTD, "--nodaemon", "--pidfile=", "puppetha", "--state-dir", str(tmp_path / "state")]
    for name, value in settings.items():
        command += ["--set", f"{name}={value}"]
    log = tmp_path / "daemon.log"
    live = nginx_dir / "live" / "nginx.conf"
    nginx: subprocess.Popen[bytes] | None = None
    with log.open("w") as out:
        daemon = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        eventually(live.exists, "the first nginx configuration", log)
        assert subprocess.run([NGINX, "-e", str(error_log), "-t", "-q", "-c", str(live)],
                              capture_output=True, check=False).returncode == 0
        nginx = subprocess.Popen([NGINX, "-e", str(error_log), "-c", str(live), "-g", "daemon off;"])
        eventually((tmp_path / "nginx.pid").exists, "nginx's start", log)
        before = live.resolve()

        # A master registers (as the enrollment service does, on any host sharing the store).
        pki.add_ca("master-1")
        master_port = free_port()
        pki.records.create(MasterRecord(certname="master-1", address="127.0.0.1", port=master_port,
                                        ca="master-1", registered_at=time.time()))
        eventually(lambda: f"127.0.0.1:{master_port}" in live.read_text(), "the master in the upstream", log)
        assert live.resolve() != before  # a new generation went live
        eventually(lambda: "reconfiguring" in error_log.read_text(), "nginx's reload", log)
        assert nginx.poll() is None
        # Nothing listens on the master's port, so the health checker takes it out again.
        eventually(lambda: not pki.records.get(MasterRecord, "master-1").record.healthy,  # type: ignore[union-attr]
                   "the dead master marked unhealthy", log)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        if nginx is not None:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(timeout=30)
        pki.close()
    assert "Traceback" not in log.read_text()
