"""
CRLs that expire every minute, and a fleet that keeps running: the real puppetserver (a master
enrolled through nginx), the real nginx with the lb role's reconcile, and real ``puppet agent -t``
runs through the front (the package's world, :mod:`tests.fleet_e2e.world`).

Once the fleet is up, the CAs' CRL lifetime is cut to :data:`LIFETIME` and every CRL re-signed.
From then on each copy is kept fresh by what does it in production: the daemon's CRL refresher
re-signs them in the store, the lb role's reconcile puts them in nginx, the master's
:class:`~puppetha.pki.crlfiles.CRLFilesService` writes puppetserver's ``lb-crl.pem`` (which
puppetserver reloads by itself), and each agent fetches its own from the front's CA path
(``crl_refresh_interval``, written by ``puppetha-enroll``).  Real time has to pass here: OpenSSL
in nginx, Jetty and Ruby checks nextUpdate against the system clock.
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import time
import urllib.error
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from puppetha.pki.authority import LB_CA, CRLRefresher
from puppetha.pki.crlfiles import CRLFilesService, master_crl_files
from puppetha.store.records import CRLRecord, Records
from puppetha.threads import Blocking, make_pool
from tests.fleet_e2e.world import FRONT_HOST, Node, World, eventually

#: A CRL's lifetime once the fleet is up, and the margin at which the refresher re-signs it.
LIFETIME = timedelta(seconds=60)
MARGIN = timedelta(seconds=40)
#: How often the refresher looks, and how often the master's CRL files are compared.
REFRESH = timedelta(seconds=2)
MASTER_CRL_INTERVAL = 1.0
#: The agents' crl_refresh_interval: well inside what a fresh copy has left (MARGIN).
AGENT_REFRESH = "10s"
#: Each step of "eventually": a refresh round and the reload behind it, with room to spare.
WITHIN = 20.0

_BLOCK = re.compile(r"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)


def crls_of(path: Path) -> list[x509.CertificateRevocationList]:
    return [x509.load_pem_x509_crl(b.encode()) for b in _BLOCK.findall(path.read_text())]


def earliest_next_update(path: Path) -> float:
    return min(c.next_update_utc.timestamp() for c in crls_of(path) if c.next_update_utc is not None)


def crl_numbers(path: Path) -> dict[str, int]:
    numbers = {}
    for crl in crls_of(path):
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        numbers[crl.issuer.rfc4514_string()] = number
    return numbers


class ShortCRLs:
    """The fleet after the cut, with what keeps every copy fresh running on the world's reactor."""

    def __init__(self, world: World, master: Node, config: Path) -> None:
        self.world = world
        self.master = master
        self.config = config
        self.cut_at = 0.0

    def revoke(self, node: Node) -> None:
        # The operator's command, with the same short lifetimes as the daemon.
        self.world.puppetha("--config", str(self.config), "node", "revoke", node.instance_id)

    def enroll_agent(self, name: str) -> Node:
        agent = self.world.launch(name, "agent", security_groups=["web"])
        code, output = self.world.enroll(agent, "agent", "--crl-refresh-interval", AGENT_REFRESH)
        assert code == 0, output
        return agent

    def run_agent(self, agent: Node) -> str:
        run = self.world.agent_run(agent)
        said = run.stdout + run.stderr
        assert run.returncode in (0, 2), said
        return said


@pytest.fixture(scope="module")
def fleet(world: World, master: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShortCRLs]:
    config = tmp_path_factory.mktemp("crl") / "puppetha.conf"
    config.write_text(
        f"[pki]\ncrl_lifetime = {int(LIFETIME.total_seconds())}s\n"
        f"crl_refresh_margin = {int(MARGIN.total_seconds())}s\n"
    )
    pool = make_pool("e2e-crl", 2)
    authority = world.authority
    signing = Blocking(world.reactor, pool, authority)
    refresher = CRLRefresher(
        lambda m: signing.call(authority.refresh_crls, m), world.reactor, REFRESH, MARGIN
    )
    crl_files = CRLFilesService(
        clock=world.reactor,
        blocking=Blocking(world.reactor, pool, None),
        store=world.store,
        files=master_crl_files(str(master.ssldir)),
        interval=MASTER_CRL_INTERVAL,
    )

    def start() -> None:
        pool.start()
        refresher.startService()
        crl_files.startService()

    # The cut: every CRL re-signed now with the short lifetime.
    lifetime = authority.crl_lifetime
    authority.crl_lifetime = LIFETIME
    authority.refresh_crls(timedelta(days=365))

    def stop() -> object:
        return crl_files.stopService()

    world.on_reactor(start)
    short = ShortCRLs(world, master, config)
    short.cut_at = time.time()
    try:
        yield short
    finally:
        with contextlib.suppress(Exception):
            world.on_reactor(refresher.stopService)
        # The package's other modules run on this world: its CRLs go back to the lifetime they
        # had, and the master's copies with them (puppetserver would refuse nginx once its
        # lb-crl.pem expired), before what keeps the copies fresh stops.
        authority.crl_lifetime = lifetime
        authority.refresh_crls(timedelta(days=365))
        copies = [Path(f.path) for f in master_crl_files(str(master.ssldir))]
        eventually(
            lambda: all(earliest_next_update(p) > time.time() + 3600 for p in copies),
            "the master's CRL files back to the long lifetime",
            WITHIN,
        )
        with contextlib.suppress(Exception):
            world.on_reactor(stop)
        pool.stop()


def test_a_revoked_lb_node_is_refused_by_the_master_without_a_restart(fleet: ShortCRLs) -> None:
    world = fleet.world
    server = world.puppetserver
    assert server is not None
    assert server.process is not None
    pid = server.process.pid
    lb = world.launch("lb-revoked", "lb")
    code, output = world.enroll(lb, "lb", "--dns-alt-names", FRONT_HOST)
    assert code == 0, output
    assert server.status(lb.certificate, lb.private_key) == 200

    fleet.revoke(lb)
    lb_crl = fleet.master.ssldir / "lb-crl.pem"

    def master_refuses() -> bool:
        try:
            server.status(lb.certificate, lb.private_key)
        except (ssl.SSLError, urllib.error.URLError, ConnectionError):
            return True
        return False

    # The daemon on the master writes the new lb CRL; puppetserver reloads it by itself.
    eventually(
        lambda: world.authority.crl(LB_CA).crl_pem == lb_crl.read_text(), "lb-crl.pem rewritten", WITHIN
    )
    eventually(master_refuses, "puppetserver refusing the revoked lb node", WITHIN)
    assert server.process is not None
    assert server.process.pid == pid, "puppetserver was restarted"
    # The lb node nginx runs as is still welcome.
    assert server.status(world.settings.certificate, world.settings.private_key) == 200


def test_a_revoked_agent_is_refused_at_the_front(fleet: ShortCRLs) -> None:
    world = fleet.world
    agent = fleet.enroll_agent("agent-revoked")
    eventually(lambda: world.front_request(agent, "/status/v1/simple") == 200, "the front serving", 120)
    fleet.revoke(agent)
    eventually(lambda: world.front_request(agent, "/status/v1/simple") == 400, "nginx refusing", WITHIN)
    run = world.agent_run(agent)
    assert run.returncode == 1
    assert "Could not retrieve catalog; skipping run" in run.stdout + run.stderr


def test_agents_keep_running_through_nginx_across_three_crl_lifetimes(fleet: ShortCRLs) -> None:
    world = fleet.world
    records = Records(world.store)
    steady = fleet.enroll_agent("agent-steady")
    stopped = fleet.enroll_agent("agent-stopped")
    eventually(lambda: world.front_request(steady, "/status/v1/simple") == 200, "the front serving", 120)
    first_numbers = crl_numbers(steady.ssldir / "crl.pem")

    # An instance that runs once, then stays stopped: its copy of the CRLs as it was.
    fleet.run_agent(stopped)
    stopped_crl = stopped.ssldir / "crl.pem"
    kept, kept_at = stopped_crl.read_bytes(), stopped_crl.stat().st_mtime
    kept_expires = earliest_next_update(stopped_crl)
    kept_numbers = crl_numbers(stopped_crl)

    def superseded() -> bool:
        """The store has re-signed a CRL since the stopped agent's copy."""
        for found in records.list(CRLRecord):
            crl = x509.load_pem_x509_crl(found.record.crl_pem.encode())
            issuer = crl.issuer.rfc4514_string()
            if issuer in kept_numbers and found.record.number > kept_numbers[issuer]:
                return True
        return False

    refreshed = 0
    started_again = False
    end = fleet.cut_at + 3 * LIFETIME.total_seconds() + 10
    while time.time() < end:
        if not started_again and superseded():
            # Its copy is old but not expired: it starts again, refreshes from the front, runs.
            assert time.time() < kept_expires - 5, "the stopped agent's copy is too close to expiring"
            stopped_crl.write_bytes(kept)
            os.utime(stopped_crl, (kept_at, kept_at))
            said = fleet.run_agent(stopped)
            assert "Refreshing CRL" in said
            assert stopped_crl.read_bytes() != kept
            started_again = True
        said = fleet.run_agent(steady)
        refreshed += "Refreshing CRL" in said
        assert earliest_next_update(steady.ssldir / "crl.pem") > time.time()
        time.sleep(2)

    assert started_again
    assert refreshed >= 3
    # Every CA's CRL the agent holds was replaced, several times over, from the front.
    last_numbers = crl_numbers(steady.ssldir / "crl.pem")
    assert set(last_numbers) == set(first_numbers)
    assert all(last_numbers[issuer] >= first_numbers[issuer] + 3 for issuer in first_numbers), (
        first_numbers, last_numbers,
    )
    # The master was never marked down: puppetserver kept accepting nginx across the lifetimes.
    assert world.front_request(steady, "/status/v1/simple") == 200

    # The failure the lifetimes are chosen against: a copy that has expired cannot even be
    # refreshed, and every run stops.
    assert time.time() > kept_expires
    stopped_crl.write_bytes(kept)
    os.utime(stopped_crl, (kept_at, kept_at))
    run = world.agent_run(stopped)
    said = run.stdout + run.stderr
    assert run.returncode == 1, said
    assert "has expired" in said
