"""
Scaling out and in against the real parts: a real ``twistd puppetha`` daemon (the lb and
enrollment roles, primary through the Elastic IP in moto) with its real nginx, in front of
Debian's puppetserver as the one master.

A bounded load generator holding an agent's certificate sends concurrent catalog requests
through nginx; the daemon's load monitor reads them from nginx's load log and puppetserver's
jruby-metrics, the primary's policy sees the master busy for the (lowered) window, and launches
one master from the launch template in moto, recorded under its lease token.  That instance
enrolls as a master for real (its own identity, signed as AWS signs, through the enrollment API);
its registration points at a port forwarder to the same puppetserver, a server of its own in
nginx's upstream.  Once it serves, the load runs across both masters; then it falls to cheap
requests, the policy drains one master after the (lowered) quiet window, a request held open at
nginx's old worker keeps the drain waiting (``puppetha status``, in its own process, shows it in
progress), and once that request is answered moto terminates the master, the drain recorded under
the same token.  Every request of the load generator through all of it is answered 200, and
``puppetha status`` shows both decisions with their reasons.

One puppetserver (half a minute or more to start).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from puppetha.ha.autoscale import LAUNCHED_BY_TAG, ScaleActionRecord
from puppetha.ha.lease import FAILOVER_LEASE
from puppetha.ha.nginx import MASTERS_UPSTREAM
from puppetha.instance import enroll as client
from puppetha.instance.puppetserver import MasterMaterial, MasterSettings
from puppetha.pki.authority import LB_CA, ROOT
from puppetha.pki.certs import fingerprint
from puppetha.store.records import LeaseRecord, LoadReportRecord, MasterRecord, Records
from puppetha.testing.aws import DEFAULT_ACCOUNT, FakeAWSSigner
from puppetha.testing.imds import IMDSThread, InstanceMetadata
from puppetha.testing.lb_daemon import LbNode, eventually
from puppetha.testing.lb_rig import RIG_ENC
from puppetha.testing.moto import ROLE_TAG, TEST_CREDENTIALS, Fleet, MotoServer
from puppetha.testing.nginx import LOOPBACK, FrontPKI, IssuedFiles, free_port, require_nginx
from puppetha.testing.puppetserver import TEST_MODULE, PuppetserverUnderTest
from tests.aws_fixtures import moto_with_test_credentials
from tests.test_front_render import upstream_servers

REGION = "us-east-1"
#: The front's name: resolves to loopback, and is in the masters' and the lb node's certificates.
FRONT = "localhost"
MASTER = "master-1.test"
AGENT = "agent-1.test"
TEMPLATE = "puppet-master"
#: Concurrent catalog requests of the load generator: several per JRuby (the master has one).
WORKERS = 6


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with moto_with_test_credentials() as server:
        yield server


def start_master(pki: FrontPKI, directory: Path, probe: IssuedFiles) -> PuppetserverUnderTest:
    """Debian's puppetserver as puppetha configures a master, on loopback, registered in the store."""
    issued = pki.leaf(MASTER, MASTER, sans=[MASTER, FRONT], usage="server")
    authority = pki.authority
    material = MasterMaterial(
        certname=MASTER,
        certificate_pem=Path(issued.certificate).read_text(),
        private_key_pem=Path(issued.private_key).read_text(),
        ca_chain_pem=authority.ca_bundle_pem().decode("ascii"),
        crl_chain_pem=authority.crl_chain_pem().decode("ascii"),
        lb_ca_pem=authority.ca(LB_CA).certificate_pem,
        lb_crl_pem=authority.crl(LB_CA).crl_pem,
    )
    directory.mkdir()
    enc = directory / "enc"
    enc.write_text(RIG_ENC)
    enc.chmod(0o755)
    shutil.copytree("/etc/puppet/puppetserver/services.d", directory / "services.d")
    server = PuppetserverUnderTest(directory)
    port = free_port()
    settings = MasterSettings(listen_address=LOOPBACK, listen_port=port, enc_command=str(enc))
    server.configure(material, settings, TEST_MODULE)
    server.start(probe.certificate, probe.private_key)
    # Registered an hour ago: it has served for longer than the warm-up.
    pki.records.create(MasterRecord(certname=MASTER, address=LOOPBACK, port=port, ca=MASTER,
                                    registered_at=time.time() - 3600))
    return server


class LoadGenerator:
    """
    ``WORKERS`` threads asking the front for the agent's catalog, one request at a time each;
    once ``calm`` is set, each asks for puppetserver's simple status a few times a second instead
    (answered by the masters without a JRuby: the load falls, the requests go on).
    """

    def __init__(self, port: int, agent: IssuedFiles, ca_bundle: Path) -> None:
        self.context = ssl.create_default_context(cafile=str(ca_bundle))
        self.context.load_cert_chain(agent.certificate, agent.private_key)
        self.url = f"https://{FRONT}:{port}/puppet/v3/catalog/{AGENT}?environment=production"
        self.status_url = f"https://{FRONT}:{port}/status/v1/simple"
        # What puppet agent posts: its facts, which the catalog is compiled with.
        facts = {"name": AGENT, "values": {"clientcert": AGENT, "fqdn": AGENT}}
        self.body = urllib.parse.urlencode({"environment": "production", "facts_format": "application/json",
                                            "facts": json.dumps(facts)}).encode()
        #: The first refusal's body, to say what went wrong.
        self.refusal = b""
        self.stopping = threading.Event()
        self.calm = threading.Event()
        self.lock = threading.Lock()
        #: HTTP status (or the error's class name: a failed connection is a failed request too)
        #: -> how many answers.
        self.answers: dict[int | str, int] = {}
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(WORKERS)]

    def one(self, calm: bool = False) -> int | str:
        try:
            if calm:
                request = urllib.request.Request(self.status_url)  # noqa: S310 -- our own https URL
            else:
                request = urllib.request.Request(  # noqa: S310
                    self.url, data=self.body, method="POST", headers={"Accept": "application/json"})
            with urllib.request.urlopen(request, context=self.context, timeout=60) as response:  # noqa: S310
                response.read()
                return int(response.status)
        except urllib.error.HTTPError as e:
            if not self.refusal:
                self.refusal = e.read()
            return int(e.code)
        except OSError as e:
            if not self.refusal:
                self.refusal = repr(e).encode()
            return type(e).__name__

    def answered(self) -> int:
        with self.lock:
            return sum(self.answers.values())

    def _work(self) -> None:
        while not self.stopping.is_set():
            calm = self.calm.is_set()
            code = self.one(calm)
            with self.lock:
                self.answers[code] = self.answers.get(code, 0) + 1
            if calm:
                self.stopping.wait(0.25)

    def __enter__(self) -> LoadGenerator:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=90)


class HeldRequest:
    """
    A catalog request through the front whose body's last byte is held back: nginx's worker has
    it open (it reads the whole body before it proxies), so after a reload that worker shuts
    down only once the request is finished and answered.
    """

    def __init__(self, load: LoadGenerator, port: int) -> None:
        url = urllib.parse.urlsplit(load.url)
        self.body = load.body
        raw = socket.create_connection((LOOPBACK, port), timeout=60)
        self.tls = load.context.wrap_socket(raw, server_hostname=FRONT)
        head = (f"POST {url.path}?{url.query} HTTP/1.1\r\nHost: {FRONT}\r\nAccept: application/json\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {len(self.body)}\r\nConnection: close\r\n\r\n")
        self.tls.sendall(head.encode("ascii") + self.body[:-1])

    def finish(self) -> int:
        """Send the last byte; the answer's status."""
        self.tls.sendall(self.body[-1:])
        answer = b""
        while chunk := self.tls.recv(65536):
            answer += chunk
        self.tls.close()
        return int(answer.split(b" ", 2)[1])


class Forwarder:
    """Twisted's port forwarder in its own process: ``port`` on loopback to ``destination``."""

    def __init__(self, destination: int, log: Path) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "twisted", "portforward", "-p",
                   f"tcp:{self.port}:interface={LOOPBACK}", "-h", LOOPBACK, "-d", str(destination)]
        with log.open("a") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def listening(self) -> bool:
        try:
            socket.create_connection((LOOPBACK, self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)


def enroll_launched_master(
    *, fleet: Fleet, signer: FakeAWSSigner, imds: IMDSThread, instance_id: str, enroll_url: str,
    root_pin: str, server: PuppetserverUnderTest, directory: Path,
) -> str:
    """
    ``puppetha-enroll --role master`` on the launched instance, with its own identity document
    signed as AWS signs it; its puppetserver settings are written to ``directory`` and not used
    (the one real puppetserver serves it through a forwarder).  Returns what the client said.
    """
    instance = fleet.describe(instance_id)
    document, signature = signer.identity_for(instance)
    url = imds.serve(InstanceMetadata(instance.instance_id, document, signature, instance.private_ip))
    directory.mkdir()
    shutil.copytree("/etc/puppet/puppetserver/services.d", directory / "services.d")
    assert server.settings is not None
    out, err = io.StringIO(), io.StringIO()
    code = client.run([
        "--role", "master", "--server", enroll_url, "--ca-fingerprint", root_pin, "--imds-url", url,
        "--ssldir", str(directory / "ssl"), "--puppet-conf", str(directory / "puppet.conf"),
        "--dns-alt-names", FRONT, "--puppetserver-confdir", str(directory),
        "--listen-address", LOOPBACK, "--listen-port", str(server.settings.listen_port),
        "--enc-script", server.settings.enc_command, "--enc-socket", server.settings.enc_socket,
    ], stdout=out, stderr=err)  # fmt: skip
    said = out.getvalue() + err.getvalue()
    assert code == 0, said
    return said


def test_load_launches_a_master_that_enrolls_serves_and_is_drained_and_terminated_when_load_falls(
    tmp_path: Path, moto: MotoServer
) -> None:
    require_nginx()
    fleet = Fleet(moto.endpoint_url, REGION)
    fleet.create_launch_template(TEMPLATE)
    allocation = fleet.allocate_address()
    lb_instance = fleet.launch("lb").instance_id
    pki = FrontPKI(tmp_path / "pki")
    pki.add_ca(LB_CA)
    pki.add_ca(MASTER)
    lb = pki.leaf(LB_CA, "lb-1", sans=[FRONT], usage="both")
    agent = pki.leaf(MASTER, AGENT, usage="client")
    ca_bundle = tmp_path / "ca.pem"
    ca_bundle.write_bytes(pki.authority.ca_bundle_pem())
    signer = FakeAWSSigner.create(REGION)
    trust = signer.write_trust_file(tmp_path / "aws")
    shared = {"store.path": str(tmp_path / "pki" / "store.sqlite"),
              "pki.vault_key_file": str(tmp_path / "pki" / "vault.key"),
              "aws.endpoint_url": moto.endpoint_url, "aws.region": REGION, "ha.elastic_ip": allocation,
              "scale.enabled": "true", "scale.launch_template": TEMPLATE,
              # Lowered for a test: one sample a second, busy for 4 s launches, quiet for 6 s
              # drains, and the drain waits for nginx's old workers at most 20 s.
              "scale.interval": "1s", "scale.stale": "3s", "scale.out_window": "4s", "scale.in_window": "6s",
              # min_masters 0: the master is down while puppetserver starts, which would launch at once.
              "scale.warmup": "1s", "scale.cooldown": "5s", "scale.min_masters": "0",
              "scale.max_masters": "2", "scale.max_launches": "1", "scale.drain_timeout": "20s"}
    enroll_port = free_port()
    common = {**shared, "enroll.front": f"{FRONT}:8140", "lb.interval": "1s",
              "lb.health_interval": "1s",
              # The launched master enrolls at this daemon, as AWS's signature and its tag allow.
              "enroll.listen": f"tcp:{enroll_port}:interface={LOOPBACK}", "enroll.server_names": FRONT,
              "enroll.master_policy": f"tag:{ROLE_TAG}=master", "aws.accounts": DEFAULT_ACCOUNT,
              "aws.identity_certs": str(trust),
              # Everything connects from loopback here, not from the instances' private addresses.
              "enroll.require_source_match": "false"}
    env = {**os.environ, "AWS_ACCESS_KEY_ID": TEST_CREDENTIALS["aws_access_key_id"],
           "AWS_SECRET_ACCESS_KEY": TEST_CREDENTIALS["aws_secret_access_key"]}
    node = LbNode("lb-1", lb_instance, tmp_path, common, certificate=lb.certificate,
                  private_key=lb.private_key, env=env)
    node.settings["lb.load_socket"] = str(node.dir / "run" / "load.sock")
    node.settings["daemon.roles"] = "enroll, lb"
    logs = [node.log]
    server = None
    forwarder = None
    imds = IMDSThread().start()
    try:
        # The daemon and nginx start while puppetserver does; the master joins nginx once registered.
        node.start()
        node.start_nginx()
        probe = pki.leaf(LB_CA, "probe.lb.test", usage="client")
        server = start_master(pki, tmp_path / "puppetserver", probe)
        records = Records(pki.store)

        def primary() -> bool:
            lease = records.get(LeaseRecord, FAILOVER_LEASE)
            return lease is not None and lease.record.holder == lb_instance

        eventually(primary, "the lb node becoming primary", logs)
        # Probed down while puppetserver started, it comes back once it answers.
        def serving() -> bool:
            found = records.get(MasterRecord, MASTER)
            return (found is not None and found.record.healthy
                    and "syslog:server=unix:" in node.live.read_text())

        eventually(serving, "the master healthy behind nginx", logs)

        conf = tmp_path / "cli.conf"
        sections: dict[str, list[str]] = {}
        for name, value in shared.items():
            section, option = name.split(".")
            sections.setdefault(section, []).append(f"{option} = {value}")
        conf.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items()))

        def status_json() -> dict[str, Any]:
            """``puppetha status --json`` in its own process, as an operator runs it."""
            command = [sys.executable, "-m", "puppetha.cli", "--config", str(conf), "status", "--json"]
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
            assert done.returncode == 0, done.stderr
            result: dict[str, Any] = json.loads(done.stdout)
            return result

        def actions(kind: str) -> list[ScaleActionRecord]:
            return [v.record for v in records.list(ScaleActionRecord) if v.record.action == kind]

        load = LoadGenerator(node.ports.front, agent, ca_bundle)
        # The health round's change reaches nginx at once; one answer says it went live.
        eventually(lambda: load.one() == 200, "a catalog through nginx", logs, seconds=90)
        load.refusal = b""
        with load:
            # 1. Busy for the window: one launch, from the template, under the lease token.
            eventually(lambda: any(a.instances for a in actions("launch")), "a launch", logs, seconds=60)
            (action,) = actions("launch")
            lease = records.get(LeaseRecord, FAILOVER_LEASE)
            assert lease is not None
            token = lease.record.token
            assert (action.action, action.count, action.token) == ("launch", 1, token)
            assert action.reason.startswith("busy ")
            # One instance, from the template (its role tag lets it enroll as a master), with the token.
            found = fleet.ec2.describe_instances(InstanceIds=list(action.instances))["Reservations"]
            (instance,) = [i for r in found for i in r["Instances"]]
            tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
            assert (tags[ROLE_TAG], tags[LAUNCHED_BY_TAG]) == ("master", str(token))
            assert instance["ClientToken"] == action.client_token
            # What the policy judged: nginx's requests and puppetserver's own pool, from the lb node.
            report = records.get(LoadReportRecord, lb_instance)
            assert report is not None
            assert report.record.loads[MASTER]["jruby_size"] == 1

            # 2. The instance enrolls as a master, and its registration is moved to a forwarder
            # to the one puppetserver: a second server in nginx's upstream.
            launched = instance["InstanceId"]
            # Its certname, by the default template.
            certname = launched
            forwarder = Forwarder(server.settings.listen_port, tmp_path / "forwarder.log")  # type: ignore[union-attr]
            eventually(forwarder.listening, "the forwarder listening", logs)
            root_pin = fingerprint(pki.authority.certificate(ROOT))
            enroll_launched_master(
                fleet=fleet, signer=signer, imds=imds, instance_id=launched,
                enroll_url=f"https://{FRONT}:{enroll_port}", root_pin=root_pin, server=server,
                directory=tmp_path / "launched")
            registered = records.get(MasterRecord, certname)
            assert registered is not None
            records.replace(attrs.evolve(registered.record, address=LOOPBACK, port=forwarder.port),
                            registered.version)
            forwarded = f"{LOOPBACK}:{forwarder.port}"

            def upstream() -> list[str]:
                return upstream_servers(node.live.read_text(), MASTERS_UPSTREAM)

            eventually(lambda: forwarded in upstream(), "the launched master in the upstream", logs)

            # 3. The load runs across both masters (nginx's load log counts the second's requests).
            def served_by_launched() -> bool:
                report = records.get(LoadReportRecord, lb_instance)
                return report is not None and report.record.loads.get(certname, {}).get("requests", 0) > 0

            eventually(served_by_launched, "requests served by the launched master", logs)
            # Then it falls: cheap requests go on through the drain, and one catalog request,
            # begun now, is held open at nginx's worker, which keeps the drain waiting.
            load.calm.set()
            held = HeldRequest(load, node.ports.front)
            eventually(lambda: bool(actions("drain")), "a drain", logs, seconds=60)
            begun = load.answered()
            eventually(lambda: forwarded not in upstream(), "the draining master leaving the upstream", logs)
            # puppetha status, in its own process as an operator runs it, shows the drain in progress.
            during = status_json()
            (shown,) = [m for m in during["masters"] if m["certname"] == certname]
            assert shown["draining"] is not None
            assert (shown["draining"]["token"], shown["draining"]["drained_at"]) == (token, None)
            assert actions("drain")[0].finished_at is None
            # The held request ends (answered by a master, whichever nginx's old worker chose), and
            # with it the old worker: the drain goes on.
            assert held.finish() == 200
            eventually(lambda: actions("drain")[0].finished_at is not None, "the drain's end", logs,
                       seconds=60)
            (drain,) = actions("drain")
            # Requests kept coming while the master drained.
            assert load.answered() > begun
        # Every request, heavy or cheap, before, during and after the drain: 200.
        assert set(load.answers) == {200}, (load.answers, load.refusal)

        # The drained master is the launched one (fewest agents, then in flight, then name), under the
        # same token, terminated in moto, out of the upstream and deregistered.
        assert (drain.master, drain.instances, drain.token) == (certname, (launched,), token)
        assert drain.reason.startswith("busy ")
        (reservation,) = fleet.ec2.describe_instances(InstanceIds=[launched])["Reservations"]
        assert reservation["Instances"][0]["State"]["Name"] in ("shutting-down", "terminated")
        assert records.get(MasterRecord, certname) is None
        eventually(lambda: upstream() == [f"{LOOPBACK}:{server.settings.listen_port}"],  # type: ignore[union-attr]
                   "only the first master in the upstream", logs)

        # 4. puppetha status again: both decisions, with their reasons, and the drain over.
        status = status_json()
        assert status["scaling"]["enabled"] is True
        decided = {d["action"]: d for d in status["scaling"]["decisions"] if d["action"] != "hold"}
        assert set(decided) == {"launch", "drain"}
        for kind, record in (("launch", action), ("drain", drain)):
            assert (decided[kind]["reason"], decided[kind]["token"]) == (record.reason, token)
            assert decided[kind]["node"] == lb_instance
        (master,) = status["masters"]
        assert master["certname"] == MASTER
        assert master["load"] is not None
        assert master["load"]["jruby_size"] == 1
    finally:
        node.stop_all()
        if forwarder is not None:
            forwarder.stop()
        if server is not None:
            server.stop()
        imds.stop()
        pki.close()
    assert "Traceback" not in node.log.read_text()
