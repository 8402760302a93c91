"""
Scaling out against the real parts: a real ``twistd puppetha`` lb daemon (primary through the
Elastic IP in moto) with its real nginx, in front of Debian's puppetserver as the one master.
A bounded load generator holding an agent's certificate sends concurrent catalog requests
through nginx; the daemon's load monitor reads them from nginx's load log and puppetserver's
jruby-metrics, the primary's policy sees the master busy for the (lowered) window, and launches
one master from the launch template in moto, recorded under its lease token.  ``puppetha
status`` then shows the master's load and the decision.

One puppetserver (half a minute or more to start).
"""

from __future__ import annotations

import json
import os
import shutil
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

import pytest

from puppetha.ha.autoscale import LAUNCHED_BY_TAG, ScaleActionRecord
from puppetha.ha.lease import FAILOVER_LEASE
from puppetha.instance.puppetserver import MasterMaterial, MasterSettings
from puppetha.pki.authority import LB_CA
from puppetha.store.records import LeaseRecord, LoadReportRecord, MasterRecord, Records
from puppetha.testing.lb_daemon import LbNode, eventually
from puppetha.testing.lb_rig import RIG_ENC
from puppetha.testing.moto import ROLE_TAG, TEST_CREDENTIALS, Fleet, MotoServer
from puppetha.testing.nginx import LOOPBACK, FrontPKI, IssuedFiles, free_port, require_nginx
from puppetha.testing.puppetserver import TEST_MODULE, PuppetserverUnderTest
from tests.aws_fixtures import moto_with_test_credentials

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
    """``WORKERS`` threads asking the front for the agent's catalog, one request at a time each."""

    def __init__(self, port: int, agent: IssuedFiles, ca_bundle: Path) -> None:
        self.context = ssl.create_default_context(cafile=str(ca_bundle))
        self.context.load_cert_chain(agent.certificate, agent.private_key)
        self.url = f"https://{FRONT}:{port}/puppet/v3/catalog/{AGENT}?environment=production"
        # What puppet agent posts: its facts, which the catalog is compiled with.
        facts = {"name": AGENT, "values": {"clientcert": AGENT, "fqdn": AGENT}}
        self.body = urllib.parse.urlencode({"environment": "production", "facts_format": "application/json",
                                            "facts": json.dumps(facts)}).encode()
        #: The first refusal's body, to say what went wrong.
        self.refusal = b""
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        #: HTTP status -> how many answers.
        self.answers: dict[int, int] = {}
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(WORKERS)]

    def one(self) -> int:
        try:
            request = urllib.request.Request(  # noqa: S310 -- our own https URL
                self.url, data=self.body, method="POST", headers={"Accept": "application/json"})
            with urllib.request.urlopen(request, context=self.context, timeout=60) as response:  # noqa: S310
                response.read()
                return int(response.status)
        except urllib.error.HTTPError as e:
            if not self.refusal:
                self.refusal = e.read()
            return int(e.code)

    def _work(self) -> None:
        while not self.stopping.is_set():
            code = self.one()
            with self.lock:
                self.answers[code] = self.answers.get(code, 0) + 1

    def __enter__(self) -> LoadGenerator:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=90)


def test_load_through_nginx_launches_a_master_from_the_template(tmp_path: Path, moto: MotoServer) -> None:
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
    shared = {"store.path": str(tmp_path / "pki" / "store.sqlite"),
              "pki.vault_key_file": str(tmp_path / "pki" / "vault.key"),
              "aws.endpoint_url": moto.endpoint_url, "aws.region": REGION, "ha.elastic_ip": allocation,
              "scale.enabled": "true", "scale.launch_template": TEMPLATE,
              # Lowered for a test: one sample a second, busy for 4 s launches.
              "scale.interval": "1s", "scale.stale": "3s", "scale.out_window": "4s", "scale.in_window": "60s",
              # min_masters 0: the master is down while puppetserver starts, which would launch at once.
              "scale.warmup": "1s", "scale.cooldown": "60s", "scale.min_masters": "0",
              "scale.max_masters": "2", "scale.max_launches": "1"}
    common = {"daemon.roles": "lb", **shared, "enroll.front": f"{FRONT}:8140", "lb.interval": "1s",
              "lb.health_interval": "1s"}
    env = {**os.environ, "AWS_ACCESS_KEY_ID": TEST_CREDENTIALS["aws_access_key_id"],
           "AWS_SECRET_ACCESS_KEY": TEST_CREDENTIALS["aws_secret_access_key"]}
    node = LbNode("lb-1", lb_instance, tmp_path, common, certificate=lb.certificate,
                  private_key=lb.private_key, env=env)
    node.settings["lb.load_socket"] = str(node.dir / "run" / "load.sock")
    logs = [node.log]
    server = None
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

        def launched() -> list[ScaleActionRecord]:
            return [v.record for v in records.list(ScaleActionRecord) if v.record.instances]

        load = LoadGenerator(node.ports.front, agent, ca_bundle)
        # The health round's change reaches nginx at once; one answer says it went live.
        eventually(lambda: load.one() == 200, "a catalog through nginx", logs, seconds=90)
        load.refusal = b""
        with load:
            eventually(lambda: bool(launched()), "a launch", logs, seconds=60)
        # The load went through nginx to puppetserver, and nothing refused it.
        assert set(load.answers) == {200}, (load.answers, load.refusal)
        (action,) = launched()
        lease = records.get(LeaseRecord, FAILOVER_LEASE)
        assert lease is not None
        assert (action.action, action.count, action.token) == ("launch", 1, lease.record.token)
        assert action.reason.startswith("busy ")
        # One instance, from the template (its role tag lets it enroll as a master), with the token.
        found = fleet.ec2.describe_instances(InstanceIds=list(action.instances))["Reservations"]
        (instance,) = [i for r in found for i in r["Instances"]]
        tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
        assert (tags[ROLE_TAG], tags[LAUNCHED_BY_TAG]) == ("master", str(lease.record.token))
        assert instance["ClientToken"] == action.client_token

        # What the policy judged: nginx's requests and puppetserver's own pool, from the lb node.
        report = records.get(LoadReportRecord, lb_instance)
        assert report is not None
        assert report.record.loads[MASTER]["jruby_size"] == 1

        conf = tmp_path / "cli.conf"
        sections: dict[str, list[str]] = {}
        for name, value in shared.items():
            section, option = name.split(".")
            sections.setdefault(section, []).append(f"{option} = {value}")
        conf.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items()))
        # Its own process, as an operator runs it.
        command = [sys.executable, "-m", "puppetha.cli", "--config", str(conf), "status", "--json"]
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        assert done.returncode == 0, done.stderr
        status: dict[str, Any] = json.loads(done.stdout)
        assert status["scaling"]["enabled"] is True
        (decided,) = [d for d in status["scaling"]["decisions"] if d["action"] == "launch"]
        assert (decided["reason"], decided["token"]) == (action.reason, action.token)
        assert decided["node"] == lb_instance
        (master,) = status["masters"]
        # The lb node keeps reporting while the launched master starts (it never enrolls here).
        assert master["certname"] == MASTER
        assert master["load"] is not None
        assert master["load"]["jruby_size"] == 1
    finally:
        node.stop_all()
        if server is not None:
            server.stop()
        pki.close()
    assert "Traceback" not in node.log.read_text()
