"""
End to end with the real parts, on loopback: moto as AWS, an IMDSv2 emulator, the enrollment
service, the ENC socket, the lb role (front reconcile and master health) on a private reactor in a
thread, Debian's nginx, Debian's puppetserver started from its jar, and Debian's puppet agent.

A master enrolls through nginx's enrollment port, ``puppetha-enroll`` writes its puppetserver's
listener, authorization, services and ENC settings, and puppetserver starts with them; a second
lb node enrolls and its certificate (from the lb CA) is the kind the master accepts; an agent
enrolls through the front and gets a catalog, through nginx, whose
class and parameter were set with ``puppetha classify``; a revoked agent is refused; an agent
forging another node's identity gets nothing.

The world and its master are the package's (``world.py``).
"""

from __future__ import annotations

import ssl
import urllib.error

import attrs
import pytest
from cryptography import x509

from puppetha.pki.authority import LB_CA
from puppetha.store.records import MasterRecord, Records
from puppetha.testing.nginx import free_port
from tests.fleet_e2e.world import FRONT_HOST, Node, World, eventually


def test_an_enrolled_lb_nodes_certificate_is_what_masters_accept(world: World, master: Node) -> None:
    lb = world.launch("lb2", "lb")
    code, output = world.enroll(lb, "lb", "--dns-alt-names", FRONT_HOST)
    assert code == 0, output
    chain = x509.load_pem_x509_certificates((lb.ssldir / "certs" / "ca.pem").read_bytes())
    assert chain[0] == world.authority.certificate(LB_CA)
    server = world.puppetserver
    assert server is not None
    assert server.status(lb.certificate, lb.private_key) == 200


def test_master_puppetserver_accepts_only_lb_certificates(world: World, master: Node) -> None:
    server = world.puppetserver
    assert server is not None
    assert server.status(world.settings.certificate, world.settings.private_key) == 200
    # The master's own certificate, from a CA nginx trusts, is not an lb certificate.
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        server.status(master.certificate, master.private_key)
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        server.status(None, None)


def test_agent_enrolls_through_the_front_and_gets_its_classified_catalog(world: World, master: Node) -> None:
    world.puppetha(
        "classify", "set", "sg:web",
        "--class-param", 'puppetha_test.greeting="hello from sg web"',
        "--param", 'role="webserver"',
    )
    agent = world.launch("agent1", "agent", security_groups=["web"])
    code, output = world.enroll(agent, "agent")
    assert code == 0, output
    conf = agent.puppet_conf.read_text()
    assert f"server = {FRONT_HOST}" in conf
    assert f"serverport = {world.settings.ports.front}" in conf

    # The master is in nginx's upstream once health and the front have caught up.
    eventually(lambda: world.front_request(agent, "/status/v1/simple") == 200, "the front serving")
    run = world.agent_run(agent)
    assert run.returncode in (0, 2), run.stdout + run.stderr
    assert f"hello from sg web ({agent.instance_id}, role webserver)" in run.stdout + run.stderr
    # The first run the client printed: nginx's own port for the master that issued the agent.
    first_master = world.settings.ports.first_master
    assert f"first run: puppet agent --test --server {FRONT_HOST} --serverport {first_master}" in output
    run = world.agent_run(agent, "--serverport", str(first_master))
    assert run.returncode in (0, 2), run.stdout + run.stderr
    assert f"hello from sg web ({agent.instance_id}, role webserver)" in run.stdout + run.stderr


def test_revoked_agent_is_refused(world: World, master: Node) -> None:
    agent = world.launch("agent2", "agent", security_groups=["web"])
    code, output = world.enroll(agent, "agent")
    assert code == 0, output
    eventually(lambda: world.front_request(agent, "/status/v1/simple") == 200, "the front serving")
    world.puppetha("node", "revoke", agent.instance_id)
    # The CRL reaches nginx with the next reconcile.
    eventually(lambda: world.front_request(agent, "/status/v1/simple") == 400, "nginx refusing", 30)
    run = world.agent_run(agent)
    said = run.stdout + run.stderr
    assert run.returncode == 1
    assert "The SSL certificate error" in said
    assert "Could not retrieve catalog; skipping run" in said


def test_agent_forging_another_nodes_identity_gets_nothing(world: World, master: Node) -> None:
    victim = world.launch("victim", "agent", security_groups=["web"])
    forger = world.launch("forger", "agent")
    for node in (victim, forger):
        code, output = world.enroll(node, "agent")
        assert code == 0, output
    eventually(lambda: world.front_request(forger, "/status/v1/simple") == 200, "the front serving")
    forged = {
        "X-Client-DN": f"CN={victim.instance_id}",
        "X-Client-Verify": "SUCCESS",
        "Accept": "application/json",
    }
    # nginx replaces the headers with the forger's own identity: Puppet's auth refuses.
    query = "?environment=production"
    assert world.front_request(forger, f"/puppet/v3/node/{victim.instance_id}{query}", forged) == 403
    assert world.front_request(forger, f"/puppet/v3/node/{forger.instance_id}{query}", forged) == 200
    # Going around nginx does not work either: the master completes no handshake with an agent.
    server = world.puppetserver
    assert server is not None
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        server.status(forger.certificate, forger.private_key)


def test_an_unhealthy_master_leaves_the_front_and_returns(world: World, master: Node) -> None:
    records = Records(world.store)
    agent = world.launch("agent3", "agent")
    code, output = world.enroll(agent, "agent")
    assert code == 0, output
    eventually(lambda: world.front_request(agent, "/status/v1/simple") == 200, "the front serving")
    # Point the record at a closed port: probes fail, the master goes down, the front answers 503.
    found = records.get(MasterRecord, master.instance_id)
    assert found is not None
    good_port = found.record.port
    closed = free_port()
    records.replace(attrs.evolve(found.record, port=closed), found.version)

    def healthy() -> bool:
        f = records.get(MasterRecord, master.instance_id)
        return f is not None and f.record.healthy

    eventually(lambda: not healthy(), "the master going down", 30)
    eventually(lambda: world.front_request(agent, "/status/v1/simple") == 503, "the front answering 503", 30)
    found = records.get(MasterRecord, master.instance_id)
    assert found is not None
    records.replace(attrs.evolve(found.record, port=good_port), found.version)
    eventually(healthy, "the master coming back", 30)
    eventually(lambda: world.front_request(agent, "/status/v1/simple") == 200, "the front serving again", 30)
