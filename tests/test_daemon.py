"""``twistd puppetha`` as an operator runs it: starts on the embedded defaults, stops on SIGTERM."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket as socketlib
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.python.usage import UsageError

from puppetha.tap import Options

TWISTD = [str(Path(sys.executable).parent / "twistd")]
CLI = [sys.executable, "-m", "puppetha.cli"]
LOOPBACK = "enroll.listen=tcp:0:interface=127.0.0.1"


def free_port() -> int:
    with contextlib.closing(socketlib.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_pinned(port: int, path: str, root_pem: str) -> tuple[int, bytes]:
    """GET over TLS, trusting only puppetha's root (the server's name is not ours to check here)."""
    context = ssl.create_default_context(cadata=root_pem)
    context.check_hostname = False
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def twistd(*args: str) -> list[str]:
    return [*TWISTD, "--nodaemon", "--pidfile=", *args]


def wait_for(path: Path, what: str, seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if what in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{what!r} never appeared in {path}:\n{path.read_text()}")


def test_starts_on_the_embedded_defaults_and_stops_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    state = tmp_path / "state"
    port = free_port()
    with log.open("w") as out:
        daemon = subprocess.Popen(
            twistd("--logger", "puppetha.logs.json_observer", "puppetha", "--state-dir", str(state),
                   "--set", f"enc.socket={tmp_path}/enc.sock",
                   "--set", f"enroll.listen=tcp:{port}:interface=127.0.0.1",
                   # Nothing listens there: the health check must not ask the real AWS.
                   "--set", f"aws.endpoint_url=http://127.0.0.1:{free_port()}"),
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(log, "puppetha started")
        socket = tmp_path / "enc.sock"
        assert socket.stat().st_mode & 0o777 == 0o660
        # The ENC answers, and a node nobody enrolled gets nothing.
        enc = subprocess.run([str(Path(sys.executable).parent / "puppetha-enc"), "--socket", str(socket),
                              "i-0123456789abcdef0"], capture_output=True, text=True, timeout=30, check=False)
        assert enc.returncode == 1
        assert enc.stdout == ""
        assert "i-0123456789abcdef0" in enc.stderr
        # The enrollment API answers over TLS with a certificate from the root CA.
        root = subprocess.run([*CLI, "--state-dir", str(state), "ca", "show", "--pem"],
                              capture_output=True, text=True, check=True).stdout
        # Health tells the truth: no AWS to ask and no master, so this daemon cannot enroll.
        wait_for(log, "not ready to enroll")
        status, body = get_pinned(port, "/v1/health", root)
        assert status == 503
        assert json.loads(body)["error"] == "aws-unavailable"
        assert json.loads(body)["checks"]["master"] == "none"
        status, body = get_pinned(port, "/v1/ca", root)
        assert (status, body.decode()) == (200, root)
    finally:
        daemon.send_signal(signal.SIGTERM)
        status = daemon.wait(timeout=30)
    # twistd ends by re-raising the signal it stopped on, as a well-behaved Unix daemon does.
    assert status in (0, -signal.SIGTERM), log.read_text()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    root_events = [e for e in events if e["message"].startswith("root CA root, sha256:")]
    assert root_events
    assert root_events[0]["namespace"] == "puppetha.tap"
    assert root_events[0]["fingerprint"].startswith("sha256:")
    assert any(e["message"] == "Server Shut Down." for e in events)
    assert not [e for e in events if e["level"] in ("error", "critical")]
    assert not socket.exists()  # removed on a clean stop
    # The state is owner-only: it holds the sealed CA key and the vault key.
    assert (state / "ca-vault.key").stat().st_mode & 0o777 == 0o600
    assert (state / "puppetha.sqlite").stat().st_mode & 0o077 == 0


def test_a_second_start_keeps_the_same_root_ca(tmp_path: Path) -> None:
    def root_fingerprint() -> str:
        run = subprocess.run([*CLI, "--state-dir", str(tmp_path), "ca", "show"],
                             capture_output=True, text=True, check=True)
        return run.stdout.split("fingerprint")[1].split()[0]

    subprocess.run([*CLI, "--state-dir", str(tmp_path), "ca", "init"],
                   check=True, capture_output=True)
    before = root_fingerprint()
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(
            twistd("puppetha", "--state-dir", str(tmp_path), "--set", f"enc.socket={tmp_path}/enc.sock",
                   "--set", LOOPBACK),
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(log, "puppetha started")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    assert before in log.read_text()
    assert root_fingerprint() == before


def test_a_bad_configuration_stops_it_with_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "puppetha.conf"
    conf.write_text("[pki]\nkey_type = dsa\n")
    run = subprocess.run(twistd("puppetha", "--config", str(conf)),
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode != 0
    assert f"puppetha: {conf}: [pki] key_type: 'dsa' is not one of" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_missing_configuration_file_is_named(tmp_path: Path) -> None:
    run = subprocess.run(twistd("puppetha", "--config", str(tmp_path / "none.conf")),
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode != 0
    assert "none.conf: cannot read the configuration" in run.stderr


def test_the_daemon_reads_puppetha_config_when_no_flag_names_a_file(tmp_path: Path) -> None:
    conf = tmp_path / "env.conf"
    conf.write_text("[store]\nbackend = postgres\n")
    run = subprocess.run(twistd("puppetha"), env={**os.environ, "PUPPETHA_CONFIG": str(conf)},
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode != 0
    assert f"{conf}: [store] backend: 'postgres' is not one of" in run.stderr


def test_without_a_flag_the_daemon_reads_the_fleet_file_if_there_is_one(tmp_path: Path) -> None:
    fleet = tmp_path / "puppetha.conf"
    fleet.write_text("")
    assert Options(environ={}, default_config=str(fleet)).config_path() == str(fleet)
    # No file at all: the embedded defaults (the README's demo runs so).
    assert Options(environ={}, default_config=str(tmp_path / "none.conf")).config_path() is None
    named = Options(environ={"PUPPETHA_CONFIG": str(fleet)}, default_config=str(tmp_path / "none.conf"))
    named.parseOptions(["--config", str(tmp_path / "given.conf")])
    assert named.config_path() == str(tmp_path / "given.conf")


def test_set_refuses_unknown_options() -> None:
    with pytest.raises(UsageError, match=r"unknown option \[pki\] colour"):
        Options().parseOptions(["--set", "pki.colour=blue"])


def start_refused(state: Path, tmp_path: Path) -> str:
    command = twistd("puppetha", "--state-dir", str(state), "--set", f"enc.socket={tmp_path}/enc.sock",
                     "--set", LOOPBACK)
    run = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    return run.stderr


def test_a_lost_vault_key_stops_the_daemon_instead_of_making_a_new_one(tmp_path: Path) -> None:
    state = tmp_path / "state"
    subprocess.run([*CLI, "--state-dir", str(state), "ca", "init"], check=True, capture_output=True)
    (state / "ca-vault.key").unlink()
    assert "vault key file" in start_refused(state, tmp_path)
    assert not (state / "ca-vault.key").exists()


def test_a_wrong_vault_key_stops_the_daemon_at_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    subprocess.run([*CLI, "--state-dir", str(state), "ca", "init"], check=True, capture_output=True)
    key = state / "ca-vault.key"
    key.write_bytes(bytes(32))  # another key, same size and mode
    assert start_refused(state, tmp_path).startswith("puppetha: ")


def test_on_a_master_the_daemon_keeps_puppetservers_crl_file_in_step_with_the_store(tmp_path: Path) -> None:
    state, ssldir = tmp_path / "state", tmp_path / "ssl"
    ssldir.mkdir()
    (ssldir / "crl.pem").write_text("written at enrollment, since re-signed\n")
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(
            twistd("puppetha", "--state-dir", str(state), "--set", "daemon.roles=enc",
                   "--set", f"enc.socket={tmp_path}/enc.sock",
                   "--set", f"master.ssldir={ssldir}", "--set", "master.crl_interval=1s"),
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(log, f"wrote the store's CRLs to {ssldir}/crl.pem")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    crls = subprocess.run([*CLI, "--state-dir", str(state), "crl", "show", "--pem"],
                          capture_output=True, text=True, check=True).stdout
    assert (ssldir / "crl.pem").read_text() == crls
