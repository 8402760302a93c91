"""
The life cycle with real agents: moto as AWS, the real nginx with the lb role's reconcile and
health checks, one real puppetserver, and real ``puppet agent -t`` runs through the front (the
package's world, :mod:`tests.fleet_e2e.world`).

A terminated agent: one sweep, and its serial is on the CRL nginx serves and its next run is
refused.  A terminated master (enrolled, registered and healthy; its puppetserver is the real
one behind a port forwarder of its own, so that it is one more server in nginx's upstream): one
sweep, and it leaves the upstream while its CA stays, and its agents' next run succeeds through
the front at the remaining master.
"""

from __future__ import annotations

import functools
import re
import shutil
import ssl
import time
import urllib.request
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from twisted.protocols.portforward import ProxyFactory

from puppetha.aws.boto import Boto3Cloud
from puppetha.enroll.service import revoke_identity
from puppetha.ha.lifecycle import REVOKE, LifecycleSettings, LifecycleSweep
from puppetha.ha.nginx import CA_PATHS, MASTERS_UPSTREAM
from puppetha.store.records import CARecord, MasterRecord, NodeRecord, Records
from puppetha.testing.moto import TEST_CREDENTIALS
from puppetha.testing.nginx import LOOPBACK
from tests.fleet_e2e.world import FRONT_HOST, Node, World, eventually
from tests.test_front_nginx import Synchronous
from tests.test_front_render import upstream_servers
from tests.test_lifecycle import Guard, sweep

#: A front round (1 s) and nginx's reload behind it, with room to spare.
WITHIN = 30.0


def sweeper(world: World) -> LifecycleSweep:
    cloud = Boto3Cloud(world.moto.endpoint_url, access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
                       secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"])
    return LifecycleSweep(
        clock=world.reactor, settings=LifecycleSettings(), guard=Guard(), records=Records(world.store),
        blocking=Synchronous(), cloud=cloud, aws=Synchronous(),
        revoke=functools.partial(revoke_identity, Records(world.store), world.authority, now=time.time),
    )


def served_revocations(world: World, agent: Node) -> set[int]:
    """The serials on the CRLs nginx serves agents (the path their CRL refresh asks)."""
    context = ssl.create_default_context(cafile=str(agent.ssldir / "certs" / "ca.pem"))
    url = f"https://{FRONT_HOST}:{world.settings.ports.front}{CA_PATHS[1][0]}"
    with urllib.request.urlopen(url, context=context, timeout=30) as response:
        body = response.read().decode()
    blocks = re.findall(r"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", body, re.S)
    return {entry.serial_number for b in blocks for entry in x509.load_pem_x509_crl(b.encode())}


def serial_of(node: Node) -> int:
    return x509.load_pem_x509_certificate(Path(node.certificate).read_bytes()).serial_number


def ran(world: World, agent: Node) -> str:
    run = world.agent_run(agent)
    said = run.stdout + run.stderr
    assert run.returncode in (0, 2), said
    return said


def live_upstream(world: World) -> list[str]:
    return upstream_servers(Path(world.nginx.generations.config_path).read_text(), MASTERS_UPSTREAM)


def test_a_terminated_agent_is_on_the_crl_nginx_serves_and_its_run_is_refused(
    world: World, master: Node
) -> None:
    agent = world.launch("agent-gone", "agent")
    code, output = world.enroll(agent, "agent")
    assert code == 0, output
    eventually(lambda: world.front_request(agent, "/status/v1/simple") == 200, "the front serving", WITHIN)
    ran(world, agent)
    assert serial_of(agent) not in served_revocations(world, agent)

    world.fleet.terminate(agent.instance_id)
    assert [(r.instance_id, r.action) for r in sweep(sweeper(world))] == [(agent.instance_id, REVOKE)]
    # The next front round puts the new CRL in nginx's bundle, served and enforced.
    eventually(lambda: serial_of(agent) in served_revocations(world, agent), "the serial served", WITHIN)
    eventually(lambda: world.front_request(agent, "/status/v1/simple") == 400, "nginx refusing", WITHIN)
    run = world.agent_run(agent)
    said = run.stdout + run.stderr
    assert run.returncode == 1, said
    assert "Could not retrieve catalog; skipping run" in said


def enroll_second_master(world: World, master: Node) -> tuple[Node, Any]:
    """
    A second master, enrolled for real (its CA, identity and registration), whose registration
    points at a port forwarder to the one real puppetserver: a server of its own in the upstream.
    """
    node = world.launch("master2", "master")
    directory = world.tmp / "puppetserver2"
    shutil.copytree("/etc/puppet/puppetserver/services.d", directory / "services.d")
    server = world.puppetserver
    assert server is not None
    assert server.settings is not None
    real_port = server.settings.listen_port
    code, output = world.enroll(
        node, "master", "--dns-alt-names", FRONT_HOST,
        "--puppetserver-confdir", str(directory), "--puppet-conf", str(directory / "puppet.conf"),
        "--listen-address", LOOPBACK, "--listen-port", str(real_port),
        "--enc-script", server.settings.enc_command, "--enc-socket", server.settings.enc_socket,
    )  # fmt: skip
    assert code == 0, output
    forwarder = world.on_reactor(
        lambda: world.reactor.listenTCP(0, ProxyFactory(LOOPBACK, real_port), interface=LOOPBACK))
    records = Records(world.store)
    found = records.get(MasterRecord, node.instance_id)
    assert found is not None
    moved = attrs.evolve(found.record, address=LOOPBACK, port=forwarder.getHost().port)
    records.replace(moved, found.version)
    return node, forwarder


def test_a_terminated_master_leaves_the_upstream_and_its_agents_run_at_the_other(
    world: World, master: Node
) -> None:
    records = Records(world.store)
    second, forwarder = enroll_second_master(world, master)
    world.stops.insert(0, forwarder.stopListening)
    forwarded = f"{LOOPBACK}:{forwarder.getHost().port}"

    def healthy(certname: str) -> bool:
        found = records.get(MasterRecord, certname)
        return found is not None and found.record.healthy

    eventually(lambda: healthy(second.instance_id), "the second master healthy", WITHIN)
    eventually(lambda: forwarded in live_upstream(world), "the second master in the upstream", WITHIN)
    # Agents are spread over the masters' CAs: enroll until one is the second master's.
    agent = None
    for i in range(4):
        candidate = world.launch(f"agent-of-m2-{i}", "agent")
        code, output = world.enroll(candidate, "agent")
        assert code == 0, output
        node = records.get(NodeRecord, candidate.instance_id)
        assert node is not None
        if node.record.issuer == second.instance_id:
            agent = candidate
            break
    assert agent is not None, "no agent was issued by the second master"
    eventually(lambda: world.front_request(agent, "/status/v1/simple") == 200, "the front serving", WITHIN)

    world.fleet.terminate(second.instance_id)
    done = sweep(sweeper(world))
    assert [(r.instance_id, r.masters) for r in done] == [(second.instance_id, (second.instance_id,))]
    assert records.get(MasterRecord, second.instance_id) is None
    eventually(lambda: forwarded not in live_upstream(world), "the master leaving the upstream", WITHIN)
    assert live_upstream(world) == [f"{LOOPBACK}:{world.puppetserver.settings.listen_port}"]  # type: ignore[union-attr]
    # Its CA stays, and the agents it signed are not revoked: their next run succeeds, through
    # the front, at the remaining master.
    assert records.get(CARecord, second.instance_id) is not None
    assert serial_of(agent) not in served_revocations(world, agent)
    said = ran(world, agent)
    assert "Could not retrieve catalog" not in said
    assert "Applied catalog" in said
