"""
``twistd puppetha`` stops in bounded time: services stop in dependency order (listeners and the
lb role first, thread pools and the store last), and no stop waits for ever -- not even with a
round of the front stalled in a store that another process has locked.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from puppetha.testing.nginx import FrontPKI, loopback_ports, require_nginx
from tests.test_daemon_lb import TWISTD, eventually

#: Holds SQLite's WAL read locks (bytes 123..127 of the -shm file) from another process: every
#: read and write of the store then stalls for about ten seconds before it fails.
LOCK_HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1] + "-shm", os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX, 5, 123, os.SEEK_SET)
    print("held", flush=True)
    time.sleep(600)
""")


def lb_daemon(tmp_path: Path) -> tuple[list[str], FrontPKI]:
    pki = FrontPKI(tmp_path / "pki")
    pki.add_ca("lb")
    lb = pki.leaf("lb", "lb-1", sans=["puppet"], usage="both")
    ports = loopback_ports()
    (tmp_path / "nginx-temp").mkdir()
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
        "lb.nginx_dir": str(tmp_path / "nginx"),
        "lb.nginx_pid": str(tmp_path / "nginx.pid"),
        "lb.nginx_error_log": str(tmp_path / "nginx-error.log"),
        "lb.nginx_temp_dir": str(tmp_path / "nginx-temp"),
        "lb.nginx_access_log": "",
        "lb.nginx_user": "root",
        "lb.interval": "1s",
        "lb.health_interval": "1s",
        "enc.socket": str(tmp_path / "enc.sock"),
    }
    command = [TWISTD, "--nodaemon", "--pidfile=", "--logger", "puppetha.logs.json_observer",
               "puppetha", "--state-dir", str(tmp_path / "state")]
    for name, value in settings.items():
        command += ["--set", f"{name}={value}"]
    return command, pki


@pytest.mark.parametrize("store_comes_back", [True, False], ids=["store-comes-back", "store-stays-stalled"])
def test_the_lb_daemon_stops_with_a_round_stalled_in_a_locked_store(
    tmp_path: Path, store_comes_back: bool
) -> None:
    require_nginx()
    command, pki = lb_daemon(tmp_path)
    pki.close()
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    holder: subprocess.Popen[str] | None = None
    try:
        eventually((tmp_path / "nginx" / "live" / "nginx.conf").exists, "the first round", log)
        holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "pki" / "store.sqlite")],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        # Rounds come every second: let one start and stall in the store, then stop the daemon,
        # and let the store answer again while it stops: the round goes on to its next call.
        time.sleep(2.5)
        daemon.send_signal(signal.SIGTERM)
        if store_comes_back:
            time.sleep(1)
            holder.kill()
        # Generous: the stop is bounded well inside this; the daemon used to hang for ever.
        status = daemon.wait(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if holder is not None:
            holder.kill()
            holder.wait()
    assert status in (0, -signal.SIGTERM), log.read_text()
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    messages = [e["message"] for e in events]
    assert "Server Shut Down." in messages
    if store_comes_back:
        # The round in progress finished (its next call ran) before the thread pools stopped.
        assert not [e for e in events if e["level"] in ("error", "critical")
                    and "nginx" not in e["message"]], messages
    else:
        # The round was waited for until the store gave up, and the stop went on.
        assert "front reconcile failed" in messages
