"""
docs/deployment.md, followed literally: its ``sh`` blocks run in order, as root, on the hosts
their headings name.  Each host is a network namespace on a bridge (:mod:`puppetha.testing.netns`)
and a mount namespace of its own, where ``/etc``, ``/opt``, ``/srv``, ``/usr``, ``/var`` and
``/run`` are overlays on this machine's (writes stay in the test's directory).  Real nginx,
puppetserver and puppet agent; moto as AWS; an IMDS emulator per host; systemd played by
:mod:`puppetha.testing.systemd`.  Only what the guide's "How this page is tested" names differs
from the text.  It ends with the agent's runs applying their catalogs through nginx; then, as
the guide's operator would, it revokes the agent and sees every host follow: nginx refuses it,
the master's CRL files follow the store, and the agent's own CRL copy is refreshed through the
front.  Step 0's build is the session's (:mod:`tests.deb_fixtures`): the package
``tests/test_deb.py`` installs too, made by the command the guide gives.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from puppetha.aws.boto import instance_info
from puppetha.aws.cloud import InstanceInfo
from puppetha.testing.aws import FakeAWSSigner
from puppetha.testing.moto import TEST_CREDENTIALS, client
from puppetha.testing.netns import Host, Rig, new_prefix, require_netns

pytest.register_assert_rewrite("tests.deb_fixtures")

from tests.deb_fixtures import BUILD_COMMAND  # noqa: E402 - after the rewrite hook

pytest_plugins = ["tests.deb_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "deployment.md"
PYTHON = sys.executable
HOSTS = ("enroll1", "lb1", "master1", "agent1")
BUILD = "build"
#: The guide's example addresses, replaced by the hosts' own.
EXAMPLE_ADDRESSES = {
    "enroll1": "10.0.1.10", "lb1": "10.0.1.20", "master1": "10.0.1.30", "agent1": "10.0.1.40",
}
EXAMPLE_KMS_KEY = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
PIN = "sha256:ROOT_FINGERPRINT"
REGION = "eu-west-1"
#: The trust file of the test key that signs the hosts' identity documents, in /srv/puppetha.
TEST_TRUST = "/srv/puppetha/test-identity-certs.ini"
FRONT = "puppet.example.net"
OVERLAID = ("etc", "opt", "srv", "usr", "var", "run")
IMDS_ADDRESS = "169.254.169.254"
TOOLS = {
    "/usr/sbin/nginx": "nginx", "/usr/share/puppetserver/puppetserver.jar": "puppetserver",
    "/usr/bin/puppet": "puppet-agent", "/usr/bin/nsenter": "util-linux", "/usr/bin/unshare": "util-linux",
}

# One instance's metadata service, inside its host's namespace, where the real one is.
IMDS_SERVER = """
import json, sys
from twisted.internet import reactor
from puppetha.testing.imds import IMDSEmulator, InstanceMetadata
m = json.load(open(sys.argv[1]))
metadata = InstanceMetadata(m["instance_id"], m["document"].encode(), m["signature"],
                            m["private_ip"], m["local_hostname"])
IMDSEmulator(reactor, reactor, interface=sys.argv[2]).serve(metadata, port=80)
reactor.run()
"""


@attrs.frozen
class Step:
    """One ``sh`` block of the guide and the hosts it runs on."""

    hosts: tuple[str, ...]
    script: str
    line: int


def hosts_of(heading: str) -> tuple[str, ...]:
    if "build machine" in heading:
        return (BUILD,)
    if "every host" in heading:
        return HOSTS
    named = tuple(h for h in HOSTS if re.search(rf"\b{h}\b", heading))
    if not named:
        raise ValueError(f"heading {heading!r} names no host")
    return named


def guide_steps(text: str) -> list[Step]:
    """The ``sh`` blocks in order; each must sit under an ``On HOST`` heading."""
    steps: list[Step] = []
    hosts: tuple[str, ...] | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = re.match(r"^#{1,6} (.*)$", line)
        if heading:
            title = heading.group(1)
            hosts = hosts_of(title) if title.startswith("On ") else None
        elif line.startswith("```"):
            language = line[3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if language == "sh":
                if hosts is None:
                    raise ValueError(f"docs/deployment.md:{i + 1}: an sh block under no 'On HOST' heading")
                steps.append(Step(hosts, "\n".join(lines[i + 1:end]) + "\n", i + 1))
            i = end
        i += 1
    return steps


def test_the_guide_is_a_sequence_of_commands_for_named_hosts() -> None:
    steps = guide_steps(GUIDE.read_text())
    assert steps[0].hosts == (BUILD,)
    assert {h for s in steps for h in s.hosts} == {BUILD, *HOSTS}
    # Installed before configured, configured before started, on every daemon host.
    order = [s.script for s in steps]
    install = next(i for i, s in enumerate(order) if "apt-get install -y /srv/puppetha/puppetha_" in s)
    configure = next(i for i, s in enumerate(order) if "cat > /etc/puppetha/puppetha.conf" in s)
    start = next(i for i, s in enumerate(order) if "systemctl start puppetha" in s)
    assert install < configure < start
    assert "enable --now puppetha" not in "".join(order)


def test_every_twistd_command_in_the_docs_writes_no_pid_file_in_its_working_directory() -> None:
    # As the daemon's user in `/` (systemd's working directory), twistd cannot write twistd.pid.
    unit = (ROOT / "etc" / "puppetha.service").read_text()
    commands = [line.replace("\\\n", " ") for line in re.findall(r"^ExecStart=(?:.*\\\n)*.*$", unit, re.M)]
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        for block in re.findall(r"```sh\n(.*?)```", text, re.S):
            commands += [line for line in block.splitlines() if re.search(r"\btwistd\b", line)
                         and "--help" not in line]
        # Inline: `twistd -n puppetha ...` in a sentence is a command line too.
        commands += [span for span in re.findall(r"`([^`\n]*\btwistd\b[^`\n]*)`", text)
                     if re.search(r"(^|\s)(-n|--nodaemon)(\s|$)", span)]
    assert commands
    for command in commands:
        assert "--pidfile" in command, command


def test_the_unit_starts_only_once_configured() -> None:
    unit = (ROOT / "etc" / "puppetha.service").read_text()
    assert "ConditionPathExists=/etc/puppetha/puppetha.conf" in unit
    assert "--config /etc/puppetha/puppetha.conf" in unit


# A unit with the puppetha unit's sandboxing, run by the stand-in in a private mount namespace
# where every path it touches is a tmpfs of its own (nothing reaches this machine even where the
# sandbox failed): what the walk's drop-ins are checked against.
SANDBOXED_UNIT = """
set -e
for scratch in /etc/systemd/system /run /var/log /tmp; do mount -t tmpfs tmpfs $scratch; done
mkdir /var/log/opened
cat > /run/probe <<'PROBE'
for f in /etc/systemd/system/x /var/log/x /var/log/opened/x /tmp/x /run/sandboxed/x; do
    touch $f 2>/dev/null && echo $f writable || echo $f read-only
done
grep NoNewPrivs /proc/self/status
echo done
sleep 60
PROBE
unit() {
    cat > /etc/systemd/system/$1.service <<UNIT
[Service]
ProtectSystem=strict
PrivateTmp=true
NoNewPrivileges=true
RuntimeDirectory=$1
ReadWritePaths=$2
ExecStart=/bin/sh /run/probe
UNIT
}
unit sandboxed "/var/log/opened -/var/log/optional"
unit missing /var/log/missing
PYTHON -m puppetha.testing.systemd start sandboxed
until grep -q done /var/log/puppetha-test-systemd/sandboxed.log; do sleep 0.1; done
cat /var/log/puppetha-test-systemd/sandboxed.log
PYTHON -m puppetha.testing.systemd stop sandboxed
PYTHON -m puppetha.testing.systemd start missing || echo "missing: exit $?"
"""


def test_the_systemd_stand_in_applies_the_units_sandbox() -> None:
    require_netns()  # root, as for the walk
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           SANDBOXED_UNIT.replace("PYTHON", PYTHON)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Read-only everywhere but ReadWritePaths, the runtime directory and a private /tmp.
    for path, state in [("/etc/systemd/system/x", "read-only"), ("/var/log/x", "read-only"),
                        ("/var/log/opened/x", "writable"), ("/tmp/x", "writable"),
                        ("/run/sandboxed/x", "writable")]:
        assert f"{path} {state}" in output, output
    assert "NoNewPrivs:\t1" in output, output
    # A ReadWritePaths entry that does not exist fails the start (systemd: 226/NAMESPACE).
    assert "/var/log/missing does not exist" in output, output
    assert "missing: exit 1" in output, output


# -- the hosts -------------------------------------------------------------------------------


def crls_in(pem: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL of a PEM bundle (``openssl crl`` would read only the first)."""
    blocks = re.findall(rb"-----BEGIN X509 CRL-----.*?-----END X509 CRL-----\n?", pem, re.S)
    return [x509.load_pem_x509_crl(block) for block in blocks]


def lists(crls: list[x509.CertificateRevocationList], serial: int) -> bool:
    return any(crl.get_revoked_certificate_by_serial_number(serial) is not None for crl in crls)


def require_parts() -> None:
    require_netns()
    for path, package in TOOLS.items():
        if not os.path.exists(path):
            raise RuntimeError(f"{path} is missing (apt-get install {package})")


class MountNamespaces:
    """One persistent mount namespace per host, with this machine's directories overlaid."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.anchor = directory / "ns"
        self.anchor.mkdir(parents=True)
        # A namespace is kept by a bind mount of its file, which needs a private parent mount.
        subprocess.run(["mount", "--bind", str(self.anchor), str(self.anchor)], check=True)
        subprocess.run(["mount", "--make-private", str(self.anchor)], check=True)
        self.made: list[Path] = []

    def layer(self, host: str, name: str) -> Path:
        return self.directory / "hosts" / host / name / "upper"

    def make(self, host: str, overlaid: tuple[str, ...], lower: dict[str, list[Path]]) -> Path:
        mounts = []
        for name in overlaid:
            base = self.directory / "hosts" / host / name
            (base / "upper").mkdir(parents=True, exist_ok=True)
            (base / "work").mkdir(parents=True, exist_ok=True)
            layers = ":".join(str(p) for p in [*lower.get(name, []), Path("/") / name])
            # Without redirect_dir, as on many instances' disks: renaming a directory of a lower
            # layer answers EXDEV, which puppetha-enroll's ssldir writes must not meet.
            mounts.append(f"mount -t overlay overlay -o lowerdir={layers},upperdir={base}/upper,"
                          f"workdir={base}/work /{name}")
        namespace = self.anchor / host
        namespace.touch()
        subprocess.run(["unshare", f"--mount={namespace}", "--propagation", "private", "sh", "-ec",
                        "; ".join(mounts)], check=True, capture_output=True, text=True)
        self.made.append(namespace)
        return namespace

    def close(self) -> None:
        for namespace in self.made:
            subprocess.run(["umount", str(namespace)], check=False, capture_output=True)
        subprocess.run(["umount", str(self.anchor)], check=False, capture_output=True)


@attrs.define
class Fleet:
    """Everything the guide's environment provides, and how to run a step on a host."""

    directory: Path
    rig: Rig
    mounts: MountNamespaces
    moto_url: str
    kms_key_arn: str
    signer: FakeAWSSigner
    instances: dict[str, InstanceInfo] = attrs.field(factory=dict)
    namespaces: dict[str, Path] = attrs.field(factory=dict)
    fingerprint: str | None = None
    transcript: list[str] = attrs.field(factory=list)

    def environment(self) -> dict[str, str]:
        bin_dir = self.directory / "bin"
        return {
            "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive",
            # An instance profile's credentials, as the SDK would find them.
            "AWS_ACCESS_KEY_ID": TEST_CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": TEST_CREDENTIALS["aws_secret_access_key"],
        }

    def substitute(self, script: str, host: str) -> str:
        for name, example in EXAMPLE_ADDRESSES.items():
            script = script.replace(example, self.rig[name].address)
        script = script.replace(EXAMPLE_KMS_KEY, self.kms_key_arn)
        script = script.replace("/path/to/puppetha", str(ROOT))
        endpoint = f"region = {REGION}\nendpoint_url = {self.moto_url}\nidentity_certs = {TEST_TRUST}\n"
        script = script.replace(f"region = {REGION}\n", endpoint)
        if PIN in script:
            assert self.fingerprint is not None, "the guide uses the pin before `puppetha ca show` printed it"
            script = script.replace(PIN, self.fingerprint)
        return script

    def command(self, host: str, script: str) -> list[str]:
        namespace = self.namespaces[host]
        enter = ["nsenter", f"--mount={namespace}"]
        if host != BUILD:
            enter.append(f"--net=/run/netns/{self.rig[host].namespace}")
        return [*enter, "--", "bash", "-e", "-o", "pipefail", "-c", script]

    def run(self, host: str, script: str, timeout: float = 900) -> str:
        self.transcript.append(f"--- {host}\n{script}")
        done = subprocess.run(self.command(host, script), capture_output=True, text=True,
                              env=self.environment(), timeout=timeout, check=False)
        output = done.stdout + done.stderr
        self.transcript.append(output)
        if done.returncode != 0:
            raise AssertionError(f"on {host}, exit {done.returncode}:\n{script}\n{output}\n{self.logs()}")
        return output

    def logs(self) -> str:
        """The services' output on every host (journald's stand-in), for a failure's report."""
        out = []
        for host in HOSTS:
            for log in sorted(self.mounts.layer(host, "var").glob("log/puppetha-test-systemd/*.log")):
                lines = log.read_text(errors="replace").splitlines()[-25:]
                out.append(f"=== {host}: {log.name}\n" + "\n".join(lines))
        return "\n".join(out)


def start_moto(rig: Rig, directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    """moto on the bridge's address, where every host reaches it (AWS's endpoint)."""
    with contextlib.closing(socket.socket()) as probe:
        probe.bind((rig.gateway, 0))
        port = probe.getsockname()[1]
    url = f"http://{rig.gateway}:{port}"
    with (directory / "moto.log").open("wb") as log:
        process = subprocess.Popen(
            [PYTHON, "-m", "puppetha.testing.moto_app", "-H", rig.gateway, "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto exited: {(directory / 'moto.log').read_text()[-400:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(  # noqa: S310 - our moto
            f"{url}/moto-api/data.json", timeout=1
        ):
            return process, url
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto did not start")


def launch_instances(fleet: Fleet) -> None:
    """The guide's instances, at the hosts' addresses, with the tag and profile it names."""
    rig = fleet.rig
    ec2 = client("ec2", fleet.moto_url, REGION)
    iam = client("iam", fleet.moto_url, REGION)
    cidr = f"{rig.subnet}"
    vpc = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr)["Subnet"]["SubnetId"]
    profile = iam.create_instance_profile(InstanceProfileName="puppet-lb")["InstanceProfile"]["Arn"]
    for name in HOSTS:
        arguments: dict[str, object] = {
            "ImageId": "ami-0123456789abcdef0", "InstanceType": "t3.small", "MinCount": 1, "MaxCount": 1,
            "SubnetId": subnet, "PrivateIpAddress": rig[name].address,
        }
        if name == "master1":
            arguments["TagSpecifications"] = [
                {"ResourceType": "instance", "Tags": [{"Key": "puppetha:role", "Value": "master"}]}]
        if name == "lb1":
            arguments["IamInstanceProfile"] = {"Arn": profile}
        launched = ec2.run_instances(**arguments)["Instances"][0]
        found = ec2.describe_instances(InstanceIds=[launched["InstanceId"]])["Reservations"][0]
        info = instance_info(found["Instances"][0], found.get("OwnerId", "123456789012"), REGION)
        assert info.private_ip == rig[name].address, "moto did not keep the instance's address"
        fleet.instances[name] = info


def serve_metadata(fleet: Fleet, name: str) -> None:
    host: Host = fleet.rig[name]
    info = fleet.instances[name]
    document, signature = fleet.signer.identity_for(info)
    spec = fleet.directory / f"imds-{name}.json"
    spec.write_text(json.dumps({"instance_id": info.instance_id, "document": document.decode(),
                                "signature": signature, "private_ip": info.private_ip,
                                "local_hostname": info.private_dns}))
    host.ip("addr", "add", f"{IMDS_ADDRESS}/32", "dev", "lo")
    with (fleet.directory / f"imds-{name}.log").open("wb") as log:
        host.popen([PYTHON, "-c", IMDS_SERVER, str(spec), IMDS_ADDRESS], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while host.run(["bash", "-c", f"exec 3<>/dev/tcp/{IMDS_ADDRESS}/80"], check=False).returncode != 0:
        assert time.monotonic() < deadline, (fleet.directory / f"imds-{name}.log").read_text()
        time.sleep(0.2)


def host_namespace(fleet: Fleet, name: str) -> Path:
    """A host's mount namespace, made on its first step (after the build, whose /srv it sees)."""
    if name in fleet.namespaces:
        return fleet.namespaces[name]
    if name == BUILD:
        made = fleet.mounts.make(BUILD, ("srv",), {})
    else:
        etc = fleet.mounts.layer(name, "etc")
        etc.mkdir(parents=True, exist_ok=True)
        hosts = Path("/etc/hosts").read_text().rstrip("\n")
        (etc / "hosts").write_text(f"{hosts}\n{fleet.rig['lb1'].address} {FRONT}\n")
        extra = fleet.directory / "release-extra"
        made = fleet.mounts.make(name, OVERLAID, {"srv": [extra, fleet.mounts.layer(BUILD, "srv")]})
    fleet.namespaces[name] = made
    return made


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    require_parts()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(f"#!/bin/sh\nexec {PYTHON} -m puppetha.testing.systemd \"$@\"\n")
    systemctl.chmod(0o755)
    signer = FakeAWSSigner.create(REGION)
    extra = tmp_path / "release-extra" / "puppetha" / "aws-certs"
    extra.mkdir(parents=True)
    certificate = signer.signers[REGION].certificate
    (extra / f"{REGION}-rsa2048.pem").write_bytes(certificate.public_bytes(Encoding.PEM))
    # The hosts' /srv/puppetha holds it: the identity documents here are signed by a test key.
    (extra.parent / Path(TEST_TRUST).name).write_text(
        f"[{REGION}]\ncertificate = /srv/puppetha/aws-certs/{REGION}-rsa2048.pem\n")
    rig = Rig(HOSTS, prefix="guide" + new_prefix()[-4:])
    mounts: MountNamespaces | None = None
    moto: subprocess.Popen[bytes] | None = None
    try:
        rig.start()
        mounts = MountNamespaces(tmp_path)
        moto, url = start_moto(rig, tmp_path)
        kms = client("kms", url, REGION)
        key = kms.create_key(Description="puppetha CA keys")["KeyMetadata"]["Arn"]
        fleet = Fleet(tmp_path, rig, mounts, url, key, signer)
        launch_instances(fleet)
        for name in HOSTS:
            serve_metadata(fleet, name)
        yield fleet
    finally:
        rig.close()  # ends every process in the hosts: daemons, nginx, puppetserver, agents
        if moto is not None:
            moto.kill()
            moto.wait()
        if mounts is not None:
            mounts.close()


def test_the_guide_followed_literally_ends_with_agents_applying_catalogs(fleet: Fleet, package: Path) -> None:
    steps = guide_steps(GUIDE.read_text())
    outputs: list[tuple[Step, str, str]] = []
    for step in steps:
        if step.hosts == (BUILD,):
            # The build, once per session: the guide's command is the one the package was built by.
            assert step.script == f"cd /path/to/puppetha\n{BUILD_COMMAND} /srv/puppetha\n", step.script
            host_namespace(fleet, BUILD)
            fleet.run(BUILD, f"install -D -m 0644 {package} /srv/puppetha/{package.name}")
            continue
        for host in step.hosts:
            host_namespace(fleet, host)
            output = fleet.run(host, fleet.substitute(step.script, host))
            outputs.append((step, host, output))
            if "puppetha ca show" in step.script:
                fleet.fingerprint = re.findall(r"fingerprint\s+(sha256:[0-9a-f]{64})", output)[0]
            if "apt-get install -y /srv/puppetha/puppetha_" in step.script:
                # Installed, not configured: the unit does not start, whatever asks it to.
                started = fleet.run(host, "systemctl start puppetha; systemctl is-active puppetha || true")
                assert "inactive" in started

    # The agent's two runs (the master's own port, then the front) applied the ENC's classification.
    runs = [o for s, h, o in outputs if h == "agent1" and "puppet agent --test" in s.script]
    assert len(runs) == 1, "the guide's agent block runs puppet agent"
    certname = fleet.instances["agent1"].instance_id
    assert runs[0].count("Applied catalog") == 2, runs[0]
    assert runs[0].count(f"Notice: managed by puppetha ({certname})") == 2, runs[0]

    # The configuration is readable by the daemon's user and nobody else.
    enroll1 = "enroll1"
    listing = fleet.run(enroll1, "stat -c '%a %U %G' /etc/puppetha /etc/puppetha/puppetha.conf")
    assert listing.split("\n")[:2] == ["750 root puppetha", "640 root puppetha"]
    fleet.run(enroll1, "setpriv --reuid puppetha --regid puppetha --init-groups "
                       "cat /etc/puppetha/puppetha.conf")
    nobody = fleet.run(enroll1, "setpriv --reuid nobody --regid nogroup --clear-groups "
                                "cat /etc/puppetha/puppetha.conf 2>&1 || echo refused")
    assert "refused" in nobody
    # The daemon runs as its own user, in /, with no pid file of twistd's.
    owner = fleet.run(enroll1, "ps -o user= -p $(cat /run/puppetha-test-systemd/puppetha.pid)")
    assert owner.strip() == "puppetha"
    # On lb1 the daemon started before nginx: one error for the whole wait, one line once reached.
    lb_log = (fleet.mounts.layer("lb1", "var") / "log" / "puppetha-test-systemd" / "puppetha.log").read_text()
    assert lb_log.count("nginx could not be reloaded") == 1, lb_log[-3000:]
    assert lb_log.count("nginx reached") == 1, lb_log[-3000:]
    # nginx's workers reach the agent bundles: the daemon found no directory in their way.
    assert "cannot enter" not in lb_log, lb_log[-3000:]
    shutil.rmtree(fleet.directory / "hosts" / BUILD, ignore_errors=True)

    # The ENC puppetserver ran is the one the guide names, and its user reads it.
    puppet_conf = fleet.run("master1", "cat /etc/puppet/puppet.conf")
    enc = re.search(r"^external_nodes = (.*)$", puppet_conf, re.M)
    assert enc is not None, puppet_conf
    assert f"`external_nodes = {enc.group(1)}`" in " ".join(GUIDE.read_text().split()), enc.group(1)
    interpreter, isolated, bytecode = enc.group(1).split()[:3]
    assert (interpreter, isolated) == ("/opt/puppetha/bin/python", "-IS"), enc.group(1)
    fleet.run("master1", f"setpriv --reuid puppet --regid puppet --init-groups test -r {bytecode}")

    revocation_is_followed_everywhere(fleet, certname)


#: On enroll1: every CA's CRL re-signed now, as the daemons do once one nears its end
#: (``[pki] crl_refresh_margin``, years away in the walk).
RESIGN_CRLS = """/opt/puppetha/bin/python -c '
import sys, time
from datetime import timedelta
from puppetha.context import Context
from puppetha.config import DEFAULT_CONFIG_PATH
context = Context(DEFAULT_CONFIG_PATH, {}, sys.stdout, time.time)
print("re-signed", *context.authority.refresh_crls(timedelta(days=36500)))
context.close()
'"""


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def revocation_is_followed_everywhere(fleet: Fleet, certname: str) -> None:
    """`puppetha node revoke`, and what the guide says follows it on each host."""
    agent_ssl = fleet.mounts.layer("agent1", "var") / "lib" / "puppet" / "ssl"
    certificate = x509.load_pem_x509_certificate((agent_ssl / "certs" / f"{certname}.pem").read_bytes())
    serial = certificate.serial_number
    master_ssl = fleet.mounts.layer("master1", "var") / "lib" / "puppet" / "ssl"
    assert not lists(crls_in((master_ssl / "crl.pem").read_bytes()), serial)

    # The lb CA's CRL re-signed: the master's daemon rewrites lb-crl.pem, puppetserver reloads it
    # and still lets lb1 in (the agent's run through the front applies its catalog).
    (lb_before,) = crls_in((master_ssl / "lb-crl.pem").read_bytes())
    assert " lb" in fleet.run("enroll1", RESIGN_CRLS)
    deadline = time.monotonic() + 60
    while crl_number(crls_in((master_ssl / "lb-crl.pem").read_bytes())[0]) <= crl_number(lb_before):
        assert time.monotonic() < deadline, fleet.logs()
        time.sleep(1)
    master_log = (fleet.mounts.layer("master1", "var") / "log" / "puppetha-test-systemd" / "puppetha.log")
    assert "wrote the store's CRLs to /var/lib/puppet/ssl/lb-crl.pem" in master_log.read_text()
    time.sleep(5)  # puppetserver's filesystem watcher reloads its SSL context a moment later
    still = fleet.run("agent1", "puppet agent --test || [ $? -eq 2 ]")
    assert f"Notice: managed by puppetha ({certname})" in still, still

    fleet.run("enroll1", f"puppetha node revoke {certname}")
    store = fleet.run("enroll1", "puppetha crl show --pem 2>/dev/null")
    assert lists(crls_in(store.encode()), serial)

    # The master's daemon (user puppetha, sandboxed) rewrites puppetserver's CRL files from the
    # store within [master] crl_interval (10 s): every CA's in crl.pem, the lb CA's in lb-crl.pem.
    stored = {crl.public_bytes(Encoding.PEM) for crl in crls_in(store.encode())}
    deadline = time.monotonic() + 60
    while {c.public_bytes(Encoding.PEM) for c in crls_in((master_ssl / "crl.pem").read_bytes())} != stored:
        assert time.monotonic() < deadline, fleet.logs()
        time.sleep(1)
    (lb_crl,) = crls_in((master_ssl / "lb-crl.pem").read_bytes())
    assert lb_crl.public_bytes(Encoding.PEM) in stored
    lb_ca = x509.load_pem_x509_certificate((master_ssl / "lb-ca.pem").read_bytes())
    assert lb_crl.issuer == lb_ca.subject
    assert "wrote the store's CRLs to /var/lib/puppet/ssl/crl.pem" in master_log.read_text()
    # Still puppet's to read, and 0644 as puppetha-enroll wrote it.
    modes = fleet.run("master1", "stat -c '%a %G' /var/lib/puppet/ssl/crl.pem /var/lib/puppet/ssl/lb-crl.pem")
    assert modes.split("\n")[:2] == ["644 puppet", "644 puppet"], modes

    # The agent's next run once its crl_refresh_interval has passed (the file's age is how Puppet
    # tells): it fetches every CA's CRL through the front, without its certificate, finds itself
    # revoked and stops.
    fleet.run("agent1", "touch -d '1 day ago' /var/lib/puppet/ssl/crl.pem")
    refused = fleet.run("agent1", "puppet agent --test || echo exit=$?")
    assert "exit=1" in refused, refused
    assert lists(crls_in((agent_ssl / "crl.pem").read_bytes()), serial), refused
    access_path = fleet.mounts.layer("lb1", "var") / "log" / "nginx" / "puppetha-access.log"
    access_log = access_path.read_text()
    agent = re.escape(fleet.rig["agent1"].address)
    assert re.search(rf'^{agent} .*"GET /puppet-ca/v1/certificate_revocation_list/ca\S* HTTP/[\d.]+" 200 ',
                     access_log, re.M), access_log[-3000:]
    # nginx refuses the revoked certificate itself, even from an agent that does not check it.
    before = len(access_log)
    unchecked = fleet.run("agent1", "puppet agent --test --certificate_revocation false || echo exit=$?")
    assert "exit=1" in unchecked, unchecked
    access_log = access_path.read_text()[before:]
    assert re.search(rf'^{agent} .*"\w+ /puppet/v3/\S* HTTP/[\d.]+" 400 ', access_log, re.M), access_log
    assert not re.search(rf'^{agent} .*"\w+ /puppet/v3/\S* HTTP/[\d.]+" 200 ', access_log, re.M), access_log
