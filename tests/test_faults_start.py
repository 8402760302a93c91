"""
``twistd puppetha`` starts whole or not at all: every listener, socket, file and credential is
checked or opened before it says it started, and any failure is one line on stderr and a
non-zero exit -- never a traceback, never a process left half-started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket as socketlib
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from puppetha.services import TooFewDescriptors, descriptor_budget
from tests.test_daemon import twistd

LOOPBACK = "enroll.listen=tcp:0:interface=127.0.0.1"


def refused(tmp_path: Path, *args: str, state: Path | None = None, enc: Path | None = None,
            config: str = "", user: list[str] | None = None) -> str:
    """Run the daemon, which must exit by itself non-zero; return its one line."""
    conf = tmp_path / "puppetha.conf"
    conf.write_text(config)
    command = twistd("puppetha", "--config", str(conf),
                     "--state-dir", str(state or tmp_path / "state"),
                     "--set", f"enc.socket={enc or tmp_path / 'enc.sock'}", *args)
    env = dict(os.environ)
    if user:
        # Coverage follows subprocesses into a data file beside the checkout, which another user
        # cannot write: its complaint at exit would be a second line that is not the daemon's.
        env = {k: v for k, v in env.items() if not k.startswith("COVERAGE_")}
    run = subprocess.run([*(user or []), *command], capture_output=True, text=True, timeout=60,
                         check=False, cwd=tmp_path, env=env)
    assert run.returncode != 0, run.stdout + run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert run.stdout == ""
    assert lines[0].startswith("puppetha: ")
    return lines[0]


@contextlib.contextmanager
def held_tcp_port() -> Iterator[int]:
    with contextlib.closing(socketlib.socket()) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield int(held.getsockname()[1])


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("enroll.listen=tcp:99999", "[enroll] listen: 'tcp:99999': the port must be a number from 0"),
        ("enroll.listen=tcp:http-alt", "the port must be a number from 0 to 65535, not 'http-alt'"),
        ("enroll.listen=tcp:8080:colour=blue", "[enroll] listen: 'tcp:8080:colour=blue': unknown keyword"),
        ("enroll.listen=tcp:8080:interface=eth0", "the interface must be an IP address, not 'eth0'"),
        ("enroll.server_names=", "[enroll] server_names: name at least one DNS name or IP address"),
        ("enroll.server_names=puppet, bad..name!", "[enroll] server_names: 'bad..name!' is not"),
        ("daemon.roles=", "[daemon] roles: name at least one of enroll, enc, lb"),
        ("enc.socket_owner=no-such-user", "[enc] socket_owner: no such user: 'no-such-user'"),
        ("enc.socket_group=no-such-group", "[enc] socket_group: no such group: 'no-such-group'"),
    ],
)
def test_a_bad_setting_stops_the_start_with_one_line(tmp_path: Path, setting: str, expected: str) -> None:
    extra = () if setting.startswith("enroll.listen") else ("--set", LOOPBACK)
    assert expected in refused(tmp_path, "--set", setting, *extra)
    # Nothing was made for a start that was refused.
    assert not (tmp_path / "enc.sock").exists()


def test_a_listen_port_in_use_stops_the_start(tmp_path: Path) -> None:
    with held_tcp_port() as port:
        line = refused(tmp_path, "--set", f"enroll.listen=tcp:{port}:interface=127.0.0.1")
    assert line == (f"puppetha: [enroll] listen: cannot listen on tcp:{port}:interface=127.0.0.1: "
                    "Address already in use")


def test_an_address_this_host_does_not_have_stops_the_start(tmp_path: Path) -> None:
    # TEST-NET-1: never assigned to this machine.
    line = refused(tmp_path, "--set", "enroll.listen=tcp:0:interface=192.0.2.1")
    assert "cannot listen on tcp:0:interface=192.0.2.1: Cannot assign requested address" in line


def test_an_enc_socket_held_by_another_process_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "enc.sock"
    with contextlib.closing(socketlib.socket(socketlib.AF_UNIX)) as held:
        held.bind(str(path))
        held.listen()
        with held_tcp_port() as enroll_port:
            pass
        line = refused(tmp_path, "--set", f"enroll.listen=tcp:{enroll_port}:interface=127.0.0.1")
        # The enrollment port it had already opened went with it: no half-started daemon.
        with contextlib.closing(socketlib.socket()) as probe:
            assert probe.connect_ex(("127.0.0.1", enroll_port)) != 0
    assert line == f"puppetha: [enc] socket: another process is listening on {path}"


def test_an_enc_socket_path_that_is_a_file_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "enc.sock"
    path.write_text("not a socket")
    line = refused(tmp_path, "--set", LOOPBACK)
    assert line == f"puppetha: [enc] socket: {path} exists and is not a socket"
    assert path.read_text() == "not a socket"


def test_an_enc_socket_under_a_file_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("a file")
    line = refused(tmp_path, "--set", LOOPBACK, enc=tmp_path / "run" / "enc.sock")
    assert line.startswith(f"puppetha: [enc] socket: {tmp_path}/run/enc.sock: cannot make its directory")


def test_a_state_dir_that_is_a_file_stops_the_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("a file")
    line = refused(tmp_path, "--set", LOOPBACK, state=state)
    assert line.endswith(f"[daemon] state_dir: {state} is not a directory")


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_state_dir_stops_the_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with immutable(state):  # read-only even for root
        line = refused(tmp_path, "--set", LOOPBACK, state=state)
    assert line.endswith(f"[daemon] state_dir: cannot write in {state}: Operation not permitted")
    assert list(state.iterdir()) == []


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    # pytest's tmp_path is root's alone; the daemon's user must reach its config and socket.
    directory = Path(tempfile.mkdtemp(prefix="puppetha-faults-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


def test_a_state_dir_the_daemons_user_cannot_write_stops_the_start(world_readable_dir: Path) -> None:
    state = world_readable_dir / "state"
    state.mkdir(mode=0o755)  # root's
    sockets = world_readable_dir / "run"
    sockets.mkdir()
    os.chown(sockets, 65534, 65534)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    line = refused(world_readable_dir, "--set", LOOPBACK, state=state, enc=sockets / "enc.sock",
                   user=nobody)
    assert line.endswith(f"[daemon] state_dir: cannot write in {state}: Permission denied")


def test_a_vault_key_file_under_a_file_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("a file")
    line = refused(tmp_path, "--set", LOOPBACK, "--set", f"pki.vault_key_file={tmp_path}/keys/vault.key")
    assert line == f"puppetha: [pki] vault_key_file: {tmp_path}/keys is not a directory (on the way to " \
                   f"{tmp_path}/keys/vault.key)"


def self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lb-1")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


LB_CASES: list[tuple[str, Callable[[], tuple[bytes, bytes]], str]] = [
    ("garbage certificate", lambda: (b"garbage\n", self_signed()[1]),
     "[lb] certificate: {cert} is not a PEM certificate"),
    ("garbage key", lambda: (self_signed()[0], b"-----BEGIN PRIVATE KEY-----\ngarbage\n"),
     "[lb] private_key: {key} is not an unencrypted PEM private key"),
    ("another key", lambda: (self_signed()[0], self_signed()[1]),
     "[lb] private_key: {key} does not belong to the certificate {cert}"),
]


@pytest.mark.parametrize(("case", "make", "expected"), LB_CASES, ids=[c[0] for c in LB_CASES])
def test_the_lb_role_with_bad_credentials_stops_the_start(
    tmp_path: Path, case: str, make: Callable[[], tuple[bytes, bytes]], expected: str
) -> None:
    cert, key = tmp_path / "lb.pem", tmp_path / "lb.key"
    cert_pem, key_pem = make()
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    key.chmod(0o600)
    line = refused(tmp_path, config=f"[daemon]\nroles = lb\n[lb]\nmaster_name = puppet.test\n"
                   f"certificate = {cert}\nprivate_key = {key}\n"
                   f"nginx_dir = {tmp_path}/nginx\n")
    assert expected.format(cert=cert, key=key) in line
    assert b"garbage" not in line.encode()  # names the file, never its content
    assert not (tmp_path / "nginx").exists()


@pytest.mark.parametrize(
    ("limits", "enc", "connections"),
    [
        ((1024, 1024), True, 1024 - 128 - 576),
        ((1024, 1024), False, 1024 - 128),
        ((65536, 65536), True, 65536 - 128 - 576),
        ((720, 720), True, 16),
        ((719, 719), True, None),
        ((100, 100), False, None),
    ],
)
def test_descriptors_are_shared_so_the_enc_keeps_its_own(
    limits: tuple[int, int], enc: bool, connections: int | None
) -> None:
    if connections is None:
        with pytest.raises(TooFewDescriptors, match=rf"the open-file limit is {limits[0]}: the listeners"):
            descriptor_budget(enc, limits)
    else:
        assert descriptor_budget(enc, limits) == connections


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("nginx={tmp}/no-nginx", "[lb] nginx: {tmp}/no-nginx is not an executable file"),
        ("nginx_dir={tmp}/a-file/nginx", "[lb] nginx_dir: {tmp}/a-file is not a directory"),
    ],
)
def test_the_lb_role_without_its_nginx_stops_the_start(tmp_path: Path, setting: str, expected: str) -> None:
    (tmp_path / "a-file").write_text("a file")
    cert, key = tmp_path / "lb.pem", tmp_path / "lb.key"
    cert_pem, key_pem = self_signed()
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    nginx_dir = "" if setting.startswith("nginx_dir") else f"nginx_dir = {tmp_path}/nginx\n"
    line = refused(tmp_path, config=f"[daemon]\nroles = lb\n[lb]\nmaster_name = puppet.test\n"
                   f"certificate = {cert}\nprivate_key = {key}\n"
                   f"{nginx_dir}{setting.format(tmp=tmp_path)}\n")
    assert expected.format(tmp=tmp_path) in line


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("{tmp}/a-file/load.sock",
         "[lb] load_socket: {tmp}/a-file/load.sock: cannot make its directory: File exists"),
        # Never removed: only a socket left by a daemon that died is replaced.
        ("{tmp}/a-file", "[lb] load_socket: {tmp}/a-file exists and is not a socket"),
    ],
)
def test_a_load_socket_that_cannot_be_opened_stops_the_start(
    tmp_path: Path, path: str, expected: str
) -> None:
    (tmp_path / "a-file").write_text("a file")
    cert, key = tmp_path / "lb.pem", tmp_path / "lb.key"
    cert_pem, key_pem = self_signed()
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    line = refused(tmp_path, config=f"[daemon]\nroles = lb\n[lb]\nmaster_name = puppet.test\n"
                   f"certificate = {cert}\nprivate_key = {key}\nnginx_dir = {tmp_path}/nginx\n"
                   f"nginx = /bin/true\nload_socket = {path.format(tmp=tmp_path)}\n")
    assert line == "puppetha: " + expected.format(tmp=tmp_path)
    assert (tmp_path / "a-file").read_text() == "a file"


def test_a_load_socket_nginx_could_not_send_to_stops_the_start(tmp_path: Path) -> None:
    cert, key = tmp_path / "lb.pem", tmp_path / "lb.key"
    cert_pem, key_pem = self_signed()
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    line = refused(tmp_path, config=f"[daemon]\nroles = lb\n[lb]\nmaster_name = puppet.test\n"
                   f"certificate = {cert}\nprivate_key = {key}\nnginx_dir = {tmp_path}/nginx\n"
                   f"nginx = /bin/true\nnginx_user = nobody-here\n"
                   f"load_socket = {tmp_path}/run/load.sock\n")
    assert line == "puppetha: [lb] load_socket: [lb] nginx_user: no user nobody-here on this host"
    assert not (tmp_path / "run").exists()
