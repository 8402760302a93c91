"""
End to end: the installed ``puppetha-enc`` script, as puppetserver runs it, against the ENC
service on a real UNIX socket (a subprocess with the real reactor, thread pool, SQLite store and
moto server), and its YAML read by Ruby's Psych the way Puppet's exec terminus reads it.

Run as a script, this module is that server: ``python tests/test_enc_e2e.py SOCKET STORE URL``.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from puppetha.aws.boto import Boto3Cloud
from puppetha.store.records import Classification, NodeRecord, Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.moto import TEST_CREDENTIALS, Fleet, MotoServer

REGION = "us-east-1"
SCRIPT = Path(sys.executable).parent / "puppetha-enc"
# What Puppet::Node::Exec does with the script's output (Puppet::Util::Yaml.safe_load), then
# the shape it needs.
RUBY_CHECK = """
require 'yaml'
d = YAML.safe_load(STDIN.read, permitted_classes: [Symbol], aliases: true)
raise 'classes' unless d['classes'].is_a?(Hash)
raise 'parameters' unless d['parameters'].is_a?(Hash)
d['classes'].each { |k, v| raise k unless k =~ /\\A[a-z][a-z0-9_]*(::[a-z][a-z0-9_]*)*\\z/ && v.is_a?(Hash) }
facts = d['parameters']['puppetha']
puts [d['environment'], d['classes'].keys.sort.join(','), facts['instance_id']].join(' ')
"""


def serve(socket_path: str, store_path: str, endpoint_url: str) -> None:
    from twisted.internet import reactor

    from puppetha.enc.service import Classifier, ENCSocketService
    from puppetha.threads import Blocking, make_pool

    records = Records(SQLiteStore(store_path))
    cloud = Boto3Cloud(endpoint_url, access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
                       secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"], deadline=5.0)
    pool = make_pool("enc", 4)
    pool.start()
    classifier = Classifier(reactor, Blocking(reactor, pool, records),  # type: ignore[arg-type]
                            Blocking(reactor, pool, cloud),  # type: ignore[arg-type]
                            ttl=0.5, store_ttl=0.2, stale_limit=60.0)
    service = ENCSocketService(reactor, classifier, socket_path)  # type: ignore[arg-type]
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.addSystemEventTrigger("after", "shutdown", pool.stop)
    print("ready", flush=True)
    reactor.run()


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def run_enc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})}, check=False)


def test_puppetha_enc_against_the_service(tmp_path: Path, moto: MotoServer) -> None:
    assert SCRIPT.exists(), f"{SCRIPT} missing: pip install -e ."
    ruby = shutil.which("ruby")
    assert ruby, "ruby (puppet's) is needed to read the YAML as Puppet does"
    fleet = Fleet(moto.endpoint_url, REGION)
    web = fleet.launch("agent", tags={"role": "web"}, security_groups=["web"])
    store_path = str(tmp_path / "store.sqlite")
    records = Records(SQLiteStore(store_path))
    records.create(NodeRecord("web1.example.com", web.instance_id, "agent", web.account, REGION,
                              web.private_ip, 1, "root", "", 0.0, 1e12))
    records.create(Classification("default", {"ntp": {}}, {}, "production"))
    records.create(Classification("tag:role=web", {"apache::vhost": {"port": 8080}}))

    socket_path = str(tmp_path / "run" / "enc.sock")
    server = subprocess.Popen([sys.executable, __file__, socket_path, store_path, moto.endpoint_url],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o660

        ok = run_enc("--socket", socket_path, "web1.example.com")
        assert ok.returncode == 0, ok.stderr
        assert ok.stderr == ""
        checked = subprocess.run([ruby, "-e", RUBY_CHECK], input=ok.stdout, capture_output=True,
                                 text=True, timeout=60, check=False)
        assert checked.returncode == 0, checked.stderr
        assert checked.stdout.split() == ["production", "apache::vhost,ntp", web.instance_id]

        by_env = run_enc("web1.example.com", env={"PUPPETHA_ENC_SOCKET": socket_path})
        assert by_env.returncode == 0
        assert by_env.stdout == ok.stdout

        unknown = run_enc("--socket", socket_path, "nobody.example.com")
        assert unknown.returncode == 1
        assert unknown.stdout == ""
        assert unknown.stderr == ("puppetha-enc: nobody.example.com: nobody.example.com is not "
                                  "enrolled (unknown-node)\n")

        bad = run_enc("--socket", socket_path, "web1\nexample")
        assert bad.returncode == 1
        assert bad.stderr.count("\n") == 1

        fleet.terminate(web.instance_id)
        deadline = time.monotonic() + 20
        while True:
            gone = run_enc("--socket", socket_path, "web1.example.com")
            if gone.returncode != 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert gone.returncode == 1
        assert "(not-running)" in gone.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)

    nobody_home = run_enc("--socket", socket_path, "web1.example.com")
    assert nobody_home.returncode == 1
    assert "cannot ask the daemon" in nobody_home.stderr


def test_the_script_imports_nothing_heavy() -> None:
    probe = ("import sys; import puppetha.enc.script; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('twisted', 'yaml', 'attrs', 'zope', 'boto3') or m.startswith('puppetha.') "
             "and m not in ('puppetha.enc', 'puppetha.enc.script')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


if __name__ == "__main__":
    serve(*sys.argv[1:4])


def answer_once(path: Path, answer: bytes) -> threading.Thread:
    """A daemon stand-in on ``path`` that reads one request and answers ``answer`` raw."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                conn.recv(512)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


YAML = b"classes:\n  ntp: {}\n"


@pytest.mark.parametrize(
    ("answer", "status", "stdout"),
    [
        (b"OK %d\n" % len(YAML) + YAML, 0, YAML),
        # The daemon stopped mid-answer: what arrived is no classification.
        (b"OK %d\n" % (len(YAML) + 100) + YAML, 1, b""),
        (b"OK\n" + YAML, 1, b""),
    ],
)
def test_the_script_prints_only_whole_answers(tmp_path: Path, answer: bytes, status: int,
                                              stdout: bytes) -> None:
    path = tmp_path / "enc.sock"
    thread = answer_once(path, answer)
    run = subprocess.run([str(SCRIPT), "--socket", str(path), "web1.example.com"],
                         capture_output=True, timeout=30, check=False)
    thread.join(timeout=10)
    assert (run.returncode, run.stdout) == (status, stdout)
    if status:
        assert run.stderr.count(b"\n") == 1
