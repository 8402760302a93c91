"""
The Debian package (docs/debian.md), built by ``scripts/build-deb`` and installed with apt into
a clean root: a mount namespace where ``/etc``, ``/opt``, ``/usr``, ``/var`` and ``/run`` are
overlays on this machine's (writes stay in the test's directory; the machine has no puppetha).
There the daemon runs from the unit's ``ExecStart`` as the unit's user
(:mod:`puppetha.testing.systemd` plays systemd), an instance enrolls against it with the
packaged ``puppetha-enroll`` (moto as AWS, the IMDS emulator), and apt removes, then purges it.
The package is built once per session (:mod:`tests.deb_fixtures`).
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from puppetha.testing.aws import FakeAWSSigner
from puppetha.testing.imds import IMDSThread, InstanceMetadata
from puppetha.testing.moto import TEST_CREDENTIALS, Fleet, MotoServer

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
REGION = "us-east-1"
ACCOUNT = "123456789012"
OVERLAID = ("etc", "opt", "usr", "var", "run")

pytest_plugins = ["tests.deb_fixtures"]


class CleanRoot:
    """One mount namespace with this machine's top directories overlaid, and commands run in it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.anchor = directory / "ns"
        self.anchor.mkdir()
        # A namespace is kept by a bind mount of its file, which needs a private parent mount.
        subprocess.run(["mount", "--bind", str(self.anchor), str(self.anchor)], check=True)
        subprocess.run(["mount", "--make-private", str(self.anchor)], check=True)
        self.namespace = self.anchor / "root"
        self.namespace.touch()
        mounts = []
        for name in OVERLAID:
            base = directory / "layers" / name
            (base / "upper").mkdir(parents=True)
            (base / "work").mkdir()
            mounts.append(f"mount -t overlay overlay -o lowerdir=/{name},upperdir={base}/upper,"
                          f"workdir={base}/work,redirect_dir=on /{name}")
        subprocess.run(["unshare", f"--mount={self.namespace}", "--propagation", "private", "sh", "-ec",
                        "; ".join(mounts)], check=True, capture_output=True, text=True)

    def environment(self) -> dict[str, str]:
        return {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
            # An instance profile's credentials, as the SDK would find them (the daemon's AWS).
            "AWS_ACCESS_KEY_ID": TEST_CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": TEST_CREDENTIALS["aws_secret_access_key"],
        }

    def run(self, script: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["nsenter", f"--mount={self.namespace}", "--", "bash", "-e", "-o", "pipefail",
                               "-c", script], capture_output=True, text=True, env=self.environment(),
                              timeout=600, check=False)
        if check and done.returncode != 0:
            output = done.stdout + done.stderr
            raise AssertionError(f"exit {done.returncode}:\n{script}\n{output}\n{self.logs()}")
        return done

    def out(self, script: str) -> str:
        return self.run(script).stdout

    def logs(self) -> str:
        log = self.directory / "layers/var/upper/log/puppetha-test-systemd/puppetha.log"
        with contextlib.suppress(OSError):
            return "=== the daemon's output\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        return ""

    def close(self) -> None:
        # The daemon, if a failure left it running in here.
        pid_file = self.directory / "layers/run/upper/puppetha-test-systemd/puppetha.pid"
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int(pid_file.read_text()), 9)
        subprocess.run(["umount", str(self.namespace)], check=False, capture_output=True)
        subprocess.run(["umount", str(self.anchor)], check=False, capture_output=True)


@pytest.fixture
def clean_root(tmp_path: Path) -> Iterator[CleanRoot]:
    # The machine itself must not have what the package brings, or the root would not be clean.
    for path in ("/opt/puppetha", "/etc/puppetha", "/usr/bin/puppetha"):
        assert not os.path.lexists(path), f"{path} exists on this machine: the root would not be clean"
    root = CleanRoot(tmp_path)
    try:
        yield root
    finally:
        root.close()


def free_port() -> int:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, root: CleanRoot) -> None:
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        assert time.monotonic() < deadline, f"the daemon never listened on {port}\n{root.logs()}"
        time.sleep(0.2)


def mode_and_owner(root: CleanRoot, *paths: str) -> dict[str, str]:
    lines = root.out("stat -c '%n %a %U:%G' " + " ".join(paths)).splitlines()
    return {line.split()[0]: " ".join(line.split()[1:]) for line in lines}


def test_the_package_installs_runs_the_unit_enrolls_and_purges_cleanly(
    package: Path, clean_root: CleanRoot, tmp_path: Path
) -> None:
    root = clean_root
    systemctl = f"{PYTHON} -m puppetha.testing.systemd"
    root.run(f"apt-get install -y -q --no-install-recommends {package}")

    # What the package set up: the user, the modes in /etc, the commands on PATH, the unit.
    assert root.out("getent passwd puppetha").split(":")[5] == "/var/lib/puppetha"
    example = "/etc/puppetha/puppetha.conf.example"
    assert mode_and_owner(root, "/etc/puppetha", example, "/var/lib/puppetha") == {
        "/etc/puppetha": "750 root:puppetha",
        example: "640 root:puppetha",
        "/var/lib/puppetha": "700 puppetha:puppetha",
    }
    assert root.out("dpkg-query -W -f='${Conffiles}' puppetha").split()[0] == example
    for command in ("puppetha", "puppetha-enroll", "puppetha-enc"):
        assert root.out(f"command -v {command}").strip() == f"/usr/bin/{command}"
        assert root.out(f"readlink -f /usr/bin/{command}").strip() == f"/opt/puppetha/bin/{command}"
    unit = root.out("cat /lib/systemd/system/puppetha.service")
    assert unit == (ROOT / "etc" / "puppetha.service").read_text()
    # The ENC command puppetha-enroll writes for masters names bytecode that is there, current, and
    # readable by puppetserver's user (docs/enc.md).
    enc = root.out("/opt/puppetha/bin/python -c 'from puppetha.enc.launcher import fast_command; "
                   "print(fast_command())'").split()
    assert enc[:2] == ["/opt/puppetha/bin/python", "-IS"], enc
    assert root.out(f"stat -c %a {enc[2]}").strip() == "644"
    root.run(f"runuser -u nobody -- cat {enc[2]} > /dev/null")
    before = root.out(f"stat -c %Y {enc[2]}")
    root.run("/opt/puppetha/bin/python -c 'from puppetha.enc import launcher; launcher.compile_script()'")
    assert root.out(f"stat -c %Y {enc[2]}") == before, "the packaged bytecode was stale"

    # The postinst again changes nothing (upgrades and reconfigurations run it).
    root.run("/var/lib/dpkg/info/puppetha.postinst configure 0.1.0-1")
    assert root.out("getent passwd puppetha | wc -l").strip() == "1"
    assert root.out("dpkg-statoverride --list | grep -c puppetha").strip() == "2"

    # Installed, not configured: the unit does not start.
    started = root.run(f"{systemctl} start puppetha; {systemctl} is-active puppetha", check=False)
    assert started.stdout.strip() == "inactive", started.stdout + started.stderr
    assert "ConditionPathExists=/etc/puppetha/puppetha.conf" in started.stderr

    with MotoServer() as moto, IMDSThread() as imds:
        signer = FakeAWSSigner.create(REGION, directory=tmp_path / "aws")
        port = free_port()
        conf = tmp_path / "puppetha.conf"
        conf.write_text(
            f"[daemon]\nroles = enroll\n\n"
            f"[aws]\nregion = {REGION}\nendpoint_url = {moto.endpoint_url}\naccounts = {ACCOUNT}\n"
            f"identity_certs = /etc/puppetha/aws-identity-certs.ini\n\n"
            f"[enroll]\nlisten = tcp:{port}:interface=127.0.0.1\nserver_names = 127.0.0.1\n"
            # Every instance "connects" from 127.0.0.1 here, not from its private IP.
            f"require_source_match = false\nmaster_policy = tag:puppetha:role=master\n"
        )
        root.run(
            "umask 027\n"
            f"install -m 0640 -g puppetha {conf} /etc/puppetha/puppetha.conf\n"
            f"install -m 0640 -g puppetha {tmp_path}/aws/* /etc/puppetha/\n"
            "runuser -u puppetha -- puppetha ca init\n"
        )
        shown = root.out("runuser -u puppetha -- puppetha ca show")
        pin = re.findall(r"fingerprint\s+(sha256:[0-9a-f]{64})", shown)[0]

        root.run(f"{systemctl} start puppetha")
        wait_for_port(port, root)
        # The unit's command line, as the unit's user.
        pid = root.out("cat /run/puppetha-test-systemd/puppetha.pid").strip()
        argv = root.out(f"tr '\\0' ' ' < /proc/{pid}/cmdline").split()
        assert argv[:2] == ["/opt/puppetha/bin/python", "/opt/puppetha/bin/twistd"]
        assert argv[-3:] == ["puppetha", "--config", "/etc/puppetha/puppetha.conf"]
        assert root.out(f"stat -c %U /proc/{pid}").strip() == "puppetha"

        # A master: the first of a fleet, and the one role that writes the ENC's command.
        instance = Fleet(moto.endpoint_url, REGION).launch(role="master")
        document, signature = signer.identity_for(instance)
        url = imds.serve(InstanceMetadata(instance.instance_id, document, signature, instance.private_ip))
        host = tmp_path / "instance"
        enrolled = root.run(
            f"puppetha-enroll --role master --server https://127.0.0.1:{port} --ca-fingerprint {pin} "
            f"--imds-url {url} --ssldir {host}/ssl --puppet-conf {host}/puppet.conf --timeout 30",
            check=False,
        )
        assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr + root.logs()
        assert (host / "ssl" / "certs" / f"{instance.instance_id}.pem").is_file()
        assert instance.instance_id in root.out("runuser -u puppetha -- puppetha node list")
        assert f"external_nodes = {' '.join(enc)}\n" in (host / "puppet.conf").read_text()
        assert root.out(f"stat -c %Y {enc[2]}") == before, "puppetha-enroll found the bytecode stale"
        root.run(f"{systemctl} stop puppetha")

    # An upgrade (here a reinstall: prerm upgrade, then postinst configure) leaves the ENC's
    # bytecode in place and current, or every catalog on the masters would fail.
    root.run(f"apt-get install -y -q --no-install-recommends --reinstall {package}")
    root.run(f"runuser -u nobody -- cat {enc[2]} > /dev/null")
    reinstalled = root.out(f"stat -c %Y {enc[2]}")
    root.run("/opt/puppetha/bin/python -c 'from puppetha.enc import launcher; launcher.compile_script()'")
    assert root.out(f"stat -c %Y {enc[2]}") == reinstalled, "the bytecode was stale after the upgrade"

    # remove: the program goes, every byte of it (bytecode, twistd's plugin cache); conffiles stay.
    root.run("apt-get remove -y -q puppetha")
    assert root.run("test -e /opt/puppetha || test -e /usr/bin/puppetha", check=False).returncode == 1
    assert root.out("ls /etc/puppetha").split() == [
        "aws-identity-certs.ini", "aws-us-east-1.pem", "puppetha.conf", "puppetha.conf.example"]
    assert root.out("dpkg-query -W -f='${db:Status-Abbrev}' puppetha").strip() == "rc"

    # purge: the configuration and its mode overrides go; the state (a CA) and its owner stay.
    root.run("apt-get purge -y -q puppetha")
    assert root.run("test -e /etc/puppetha", check=False).returncode == 1
    assert "puppetha" not in root.out("dpkg-statoverride --list")
    assert root.run("dpkg-query -W puppetha", check=False).returncode != 0
    assert root.out("getent passwd puppetha").startswith("puppetha:")
    assert "puppetha.sqlite" in root.out("ls /var/lib/puppetha")
    # Nothing of it is left on the machine itself: every write went to the overlays.
    assert not shutil.which("puppetha-enroll", path="/usr/bin")


def _setup_keyword(name: str) -> str:
    call = next(node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    value = next(keyword.value for keyword in call.keywords if keyword.arg == name)
    assert isinstance(value, ast.Constant)
    return str(value.value)


def test_the_package_is_maintained_by_the_projects_author() -> None:
    maintainer = f"{_setup_keyword('author')} <{_setup_keyword('author_email')}>"
    control = (ROOT / "debian" / "control").read_text()
    assert re.search(r"^Maintainer: (.*)$", control, re.M)[1] == maintainer  # type: ignore[index]
    # Every changelog entry is signed by it, and nothing names a placeholder on localhost.
    changelog = (ROOT / "debian" / "changelog").read_text()
    signatures = re.findall(r"^ -- (.*?)  ", changelog, re.M)
    assert signatures
    assert set(signatures) == {maintainer}
    assert "localhost" not in control + changelog
