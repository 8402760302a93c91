"""
The fast form of the ENC script: ``<python> -IS <script.pyc>``, as puppetserver runs it from
``external_nodes`` (split on whitespace by Puppet's exec node terminus).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from puppetha.enc import launcher
from puppetha.enc.launcher import SCRIPT, compile_script, compiled_script, fast_command
from puppetha.instance.puppetserver import LayoutError, MasterSettings, server_settings

YAML = b"---\nclasses:\n  ntp: {}\nparameters: {}\n"


def answer_once(path: Path, answer: bytes) -> tuple[threading.Thread, list[bytes]]:
    """A daemon stand-in on ``path``: reads one request, answers ``answer``; keeps the request."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    requests: list[bytes] = []

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                requests.append(conn.recv(512))
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, requests


def test_the_command_is_the_interpreter_isolated_on_the_scripts_bytecode() -> None:
    words = fast_command().split()
    assert words == [sys.executable, "-IS", str(compiled_script())]
    assert compiled_script() == Path(importlib.util.cache_from_source(str(SCRIPT)))
    # What puppet.conf gets: the words as they are, the socket after them.
    settings = MasterSettings(listen_address="10.0.0.5", enc_socket="/run/p/enc.sock")
    assert server_settings(settings)["external_nodes"] == f"{fast_command()} --socket=/run/p/enc.sock"


@pytest.mark.parametrize("command", [
    "/usr/bin/python3  -IS /x.pyc",  # an empty word
    " /usr/bin/python3",
    "/usr/bin/python3\t-IS /x.pyc",
    "/usr/bin/python3 -IS /x.pyc\nreports = none",
    "/usr/bin/python3 -IS '/x.pyc'",
    "/usr/bin/python3 -IS /x.pyc;id",
])
def test_an_enc_command_that_puppet_conf_cannot_hold_is_refused(command: str) -> None:
    with pytest.raises(LayoutError, match="ENC command"):
        server_settings(MasterSettings(listen_address="10.0.0.5", enc_command=command))


def test_the_fast_command_answers_as_the_console_script_does(tmp_path: Path) -> None:
    compile_script()
    path = tmp_path / "enc.sock"
    thread, requests = answer_once(path, b"OK %d\n" % len(YAML) + YAML)
    run = subprocess.run([*fast_command().split(), "--socket", str(path), "web1.example.com"],
                         capture_output=True, timeout=30, check=False, env={})
    thread.join(timeout=10)
    assert (run.returncode, run.stdout, run.stderr) == (0, YAML, b"")
    assert requests == [b"web1.example.com\n"]


def test_the_fast_command_reads_the_socket_from_the_environment(tmp_path: Path) -> None:
    # -I ignores PYTHON* variables only; the script's own variable still counts.
    compile_script()
    path = tmp_path / "enc.sock"
    thread, _ = answer_once(path, b"ERR unknown-node web2.example.com is not enrolled\n")
    run = subprocess.run([*fast_command().split(), "web2.example.com"], capture_output=True,
                         timeout=30, check=False, env={"PUPPETHA_ENC_SOCKET": str(path)})
    thread.join(timeout=10)
    assert run.returncode == 1
    assert run.stderr == (b"puppetha-enc: web2.example.com: web2.example.com is not enrolled "
                          b"(unknown-node)\n")


def _imported(argv: list[str]) -> set[str]:
    run = subprocess.run([*argv[:1], "-X", "importtime", *argv[1:]], capture_output=True,
                         text=True, timeout=30, check=False)
    return {m.group(1) for m in re.finditer(r"^import time:.*\|\s*(\S+)$", run.stderr, re.MULTILINE)}


def test_the_compiled_script_imports_nothing_the_bare_interpreter_does_not(tmp_path: Path) -> None:
    compile_script()
    bare = _imported([sys.executable, "-I", "-S", "-c", "pass"])
    script = _imported([*fast_command().split(), "--socket", str(tmp_path / "absent.sock"), "x.example"])
    assert "io" in bare  # the probe sees imports at all
    assert script - bare <= ({"_socket"} if "_socket" in sys.builtin_module_names else set())


def test_compiling_writes_missing_or_stale_bytecode_and_leaves_fresh_bytecode(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    shutil.copy(SCRIPT, script)
    compiled = compiled_script(script)
    assert not compiled.exists()
    assert compile_script(script) == compiled
    first = compiled.stat()
    assert compile_script(script) == compiled
    assert compiled.stat().st_mtime_ns == first.st_mtime_ns  # fresh: not written again
    # The script changes (an upgrade without bytecode, an editable install): compiled again.
    script.write_text(script.read_text() + "\n# changed\n")
    os.utime(script, (first.st_mtime + 10, first.st_mtime + 10))
    compile_script(script)
    assert compiled.read_bytes()[12:16] == script.stat().st_size.to_bytes(4, "little")
    assert not launcher._stale(script, compiled)


def test_bytecode_from_another_interpreter_is_stale(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    shutil.copy(SCRIPT, script)
    compiled = compile_script(script)
    data = bytearray(compiled.read_bytes())
    data[0] ^= 0xFF
    compiled.write_bytes(bytes(data))
    assert launcher._stale(script, compiled)
    compile_script(script)
    assert compiled.read_bytes()[:4] == importlib.util.MAGIC_NUMBER
