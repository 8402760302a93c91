"""
The front against the real nginx: rendered from a real store and CA, checked with ``nginx -t``,
reloaded, and exercised with real TLS clients.  The masters here are small TLS servers that,
like puppetserver's lb-only listener, accept only certificates of the lb CA.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher

from puppetha.ha.front import (
    Applied,
    FrontService,
    Generations,
    NginxControl,
    NginxRefused,
    decide_front,
    discover_front,
    unreachable_for,
)
from puppetha.ha.nginx import CA_PATHS, Backend, FrontSettings
from puppetha.store.records import MasterRecord, Records
from puppetha.testing.nginx import (
    LOOPBACK,
    FrontPKI,
    IssuedFiles,
    LbOnlyServer,
    NginxUnderTest,
    loopback_ports,
)

FRONT_NAME = "puppet.test"
LB_CA = "lb"


class Synchronous:
    """Runs 'blocking' calls at once: the service's rounds finish before poke() returns."""

    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        try:
            return succeed(f(*args, **kwargs))
        except Exception:
            return fail()


class FakeMaster(LbOnlyServer):
    """A TLS server standing in for puppetserver's lb-only listener."""

    def __init__(self, name: str, issued: IssuedFiles, lb_ca_pem: str) -> None:
        self.name = name
        self.release = threading.Event()
        self.slow_started = threading.Event()
        master = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                # As puppetserver's Jetty does: Host must be a name of the certificate presented.
                if self.headers.get("Host") not in (FRONT_NAME, master.name):
                    self.send_error(400, "Host does not match SNI")
                    return
                if self.path == "/slow":
                    master.slow_started.set()
                    master.release.wait(timeout=60)
                body = json.dumps(
                    {
                        "master": master.name,
                        "peer": self.connection.getpeercert()["subject"][0][0][1],
                        "verify": self.headers.get("X-Client-Verify"),
                        "dn": self.headers.get("X-Client-DN"),
                        "dn_headers": self.headers.get_all("X-Client-DN"),
                        "cert": bool(self.headers.get("X-Client-Cert")),
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(issued, lb_ca_pem, Handler)

    def stop(self) -> None:
        self.release.set()
        super().stop()


@attrs.define
class Front:
    pki: FrontPKI
    nginx: NginxUnderTest
    service: FrontService
    settings: FrontSettings
    masters: dict[str, FakeMaster]
    agent: IssuedFiles
    lb: IssuedFiles
    enroll_port: int

    def add_master(self, name: str, registered_at: float) -> FakeMaster:
        self.pki.add_ca(name)
        issued = self.pki.leaf(name, name, sans=[FRONT_NAME, LOOPBACK])
        lb_ca = self.pki.authority.ca(LB_CA).certificate_pem
        master = FakeMaster(name, issued, lb_ca)
        self.masters[name] = master
        Records(self.pki.store).create(
            MasterRecord(
                certname=name, address=LOOPBACK, port=master.port, ca=name, registered_at=registered_at
            )
        )
        return master

    def remove_master(self, name: str) -> None:
        self.pki.store.delete(MasterRecord.KIND, name)

    def reconcile(self) -> Applied:
        result: list[Applied | None] = []
        self.service.poke().addCallback(result.append)
        assert result, "the round did not finish synchronously"
        assert result[0] is not None, "the round failed (see the log)"
        return result[0]

    def client_context(self, issued: IssuedFiles | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(Path(self.pki.directory) / "root.pem"))
        if issued is not None:
            context.load_cert_chain(issued.certificate, issued.private_key)
        return context

    def get(
        self,
        port: int,
        path: str = "/",
        issued: IssuedFiles | None = None,
        headers: dict[str, str] | None = None,
        method: str = "GET",
    ) -> tuple[int, Any]:
        connection = http.client.HTTPSConnection(
            FRONT_NAME, port, context=self.client_context(issued), timeout=30
        )
        # Resolve the front name to loopback without touching /etc/hosts.
        connection.sock = socket.create_connection((LOOPBACK, port), timeout=30)
        connection.sock = connection._context.wrap_socket(  # type: ignore[attr-defined]
            connection.sock, server_hostname=FRONT_NAME
        )
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        if response.getheader("Content-Type") == "application/json":
            return response.status, json.loads(body)
        return response.status, body.decode(errors="replace")

    def agent_get(self, path: str = "/", **kwargs: Any) -> tuple[int, Any]:
        return self.get(self.settings.ports.front, path, issued=self.agent, **kwargs)

    def eventually(self, check: Callable[[], bool], what: str, attempts: int = 200) -> None:
        """nginx reloads asynchronously: wait for the new behaviour, bounded by attempts."""
        for _ in range(attempts):
            if check():
                return
            time.sleep(0.05)
        raise AssertionError(f"{what} never happened; nginx said:\n{self.nginx.log_tail()}")


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Front]:
    pki = FrontPKI(tmp_path / "pki")
    (tmp_path / "pki" / "root.pem").write_text(pki.authority.root().certificate_pem)
    pki.add_ca(LB_CA)
    lb = pki.leaf(LB_CA, "lb1", sans=[FRONT_NAME, LOOPBACK])
    nginx = NginxUnderTest(tmp_path / "nginx")
    ports = loopback_ports(max_masters=4)
    settings = FrontSettings(
        certificate=lb.certificate,
        private_key=lb.private_key,
        master_name=FRONT_NAME,
        ports=ports,
        runtime=nginx.runtime,
    )
    service = FrontService(
        clock=Clock(),
        blocking=Synchronous(),
        store=pki.store,
        settings=settings,
        generations=nginx.generations,
        control=nginx.control,
        enroll_backends=[],
        exclude_cas=[LB_CA],
    )
    f = Front(pki, nginx, service, settings, {}, lb=lb, agent=lb, enroll_port=ports.enroll)
    f.add_master("m1", registered_at=1.0)
    pki.add_ca("m9")
    f.agent = pki.leaf("m9", "agent1", usage="client")
    # First generation written before nginx runs, as an lb node's first boot does.
    first = decide_front(settings, discover_front(pki.store, settings), [], [LB_CA])
    nginx.generations.install(first.files, nginx.control, reload=False)
    nginx.start(wait_ports=(ports.front,))
    try:
        yield f
    finally:
        nginx.stop()
        for master in f.masters.values():
            master.stop()
        pki.close()


def test_agent_certificate_from_our_ca_is_accepted_and_identified(front: Front) -> None:
    status, body = front.agent_get("/puppet/v3/catalog/agent1")
    assert status == 200
    assert body["master"] == "m1"
    # The master saw nginx's lb certificate, and the agent's identity only in nginx's headers.
    assert body["peer"] == "lb1"
    assert body["verify"] == "SUCCESS"
    assert body["dn"] == "CN=agent1"
    assert body["cert"] is True


def test_forged_identity_headers_are_overwritten(front: Front) -> None:
    status, body = front.agent_get(
        "/", headers={"X-Client-DN": "CN=m1", "X-Client-Verify": "SUCCESS", "x-client-cert": "forged"}
    )
    assert status == 200
    assert body["dn_headers"] == ["CN=agent1"]


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/status/v1/simple",
        "/puppet/v3/catalog/agent1?environment=production",
        # Near misses of the two CA paths.
        "/puppet-ca/v1/certificate_revocation_list/ca/",
        "/puppet-ca/v1/certificate/ca.pem",
    ],
)
def test_client_without_certificate_is_refused_everywhere_but_the_ca_paths(front: Front, path: str) -> None:
    status, body = front.get(front.settings.ports.front, path)
    assert status in (400, 403)
    assert body["error"] in ("certificate-required", "forbidden")
    # Forged identity headers do not stand in for a certificate either.
    forged = {"X-Client-Verify": "SUCCESS", "X-Client-DN": "CN=agent1"}
    assert front.get(front.settings.ports.front, path, headers=forged)[0] in (400, 403)
    # The masters' own ports still demand a certificate in the handshake.
    status, body = front.get(front.settings.ports.first_master, path)
    assert status == 400
    assert "No required SSL certificate" in body


def test_agents_fetch_every_ca_and_every_crl_without_a_certificate(front: Front) -> None:
    (ca_path, _), (crl_path, _) = CA_PATHS
    status, body = front.get(front.settings.ports.front, crl_path)
    assert status == 200
    blocks = re.findall(r"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", body, re.S)
    crls = [x509.load_pem_x509_crl(b.encode()) for b in blocks]
    authority = front.pki.authority
    # Every CA's, the lb CA's included: agents check the lb node's chain with it.
    expected = {authority.crl(name).crl_pem.strip() for name in ("root", "m1", "m9", LB_CA)}
    assert {c.public_bytes(Encoding.PEM).decode().strip() for c in crls} == expected
    status, body = front.get(front.settings.ports.front, ca_path)
    assert status == 200
    served = {c.subject for c in x509.load_pem_x509_certificates(body.encode())}
    assert served == {authority.certificate(name).subject for name in ("root", "m1", "m9", LB_CA)}
    # The same with a certificate: an agent's regular connection.
    assert front.get(front.settings.ports.front, crl_path, issued=front.agent)[0] == 200


def test_the_crl_path_honours_if_modified_since(front: Front) -> None:
    crl_path = CA_PATHS[1][0]
    later = email.utils.formatdate(time.time() + 3600, usegmt=True)
    assert front.get(front.settings.ports.front, crl_path, headers={"If-Modified-Since": later})[0] == 304
    # An agent that refreshed before the last change (even one whose clock runs a few minutes
    # ahead of this node's) gets the new bundle.
    before_change = email.utils.formatdate(time.time() + 60, usegmt=True)
    front.pki.revoke(front.pki.leaf("m9", "agent2", usage="client"))
    front.reconcile()

    def fresh() -> bool:
        status, body = front.get(
            front.settings.ports.front, crl_path, headers={"If-Modified-Since": before_change}
        )
        return status == 200 and front.pki.authority.crl("m9").crl_pem.strip() in body

    front.eventually(fresh, "the new CRL served to an agent that refreshed before it")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_the_ca_paths_are_read_only(front: Front, method: str) -> None:
    for path, _ in CA_PATHS:
        assert front.get(front.settings.ports.front, path, issued=front.agent, method=method)[0] == 403


@pytest.mark.parametrize(
    "path",
    [
        "/puppet-ca/v1/certificate_status/agent1",
        "/puppet-ca/v1/certificate_request/agent1",
        "/puppet-ca/v1/certificate/agent1",
        "/puppet-ca;x/v1/certificate_status/agent1",
        "/status/../puppet-ca/v1/certificate_status/agent1",
        "/puppet-ca%2Fv1/certificate_status/agent1",
    ],
)
def test_nothing_else_of_the_ca_api_reaches_a_master(front: Front, path: str) -> None:
    for port in (front.settings.ports.front, front.settings.ports.first_master):
        status, body = front.get(port, path, issued=front.agent)
        assert status == 403, (port, body)
        assert body["error"] == "forbidden"


def test_a_revoked_certificate_is_refused_even_on_the_ca_paths(front: Front) -> None:
    crl_path = CA_PATHS[1][0]
    assert front.get(front.settings.ports.front, crl_path, issued=front.agent)[0] == 200
    before = front.nginx.worker_pids()
    front.pki.revoke(front.agent)
    front.reconcile()
    # Until the old worker has gone, a new connection may still reach it: nginx's reload starts
    # the new worker before it tells the old one to stop listening. Wait for it to go.
    front.eventually(lambda: not (front.nginx.worker_pids() & before), "the old worker gone")
    assert front.get(front.settings.ports.front, crl_path, issued=front.agent)[0] == 400
    assert front.agent_get("/")[0] == 400


def test_certificate_of_a_foreign_ca_is_refused(front: Front, tmp_path: Path) -> None:
    stranger = FrontPKI(tmp_path / "stranger")
    try:
        stranger.add_ca("m9")
        forged = stranger.leaf("m9", "agent1", usage="client")
        status, _ = front.get(front.settings.ports.front, "/", issued=forged)
        assert status == 400
    finally:
        stranger.close()


def test_revoked_certificate_is_refused_after_crl_update_and_reload(front: Front) -> None:
    assert front.agent_get()[0] == 200
    before = front.nginx.generations.live()
    front.pki.revoke(front.agent)
    applied = front.reconcile()
    assert applied.changed
    assert applied.generation != before
    front.eventually(lambda: front.agent_get()[0] == 400, "refusing the revoked agent")
    # Nothing changed since: the next round writes nothing and does not reload.
    assert front.reconcile() == Applied(applied.generation, changed=False)


def test_master_added_and_removed_without_dropping_requests_in_flight(front: Front) -> None:
    m1 = front.masters["m1"]
    results: list[tuple[int, Any]] = []
    slow = threading.Thread(target=lambda: results.append(front.agent_get("/slow")))
    slow.start()
    assert m1.slow_started.wait(timeout=30)

    front.add_master("m2", registered_at=2.0)
    front.reconcile()

    def both_serve() -> bool:
        seen = {front.agent_get()[1]["master"] for _ in range(6)}
        return seen == {"m1", "m2"}

    front.eventually(both_serve, "m2 joining the upstream")
    front.remove_master("m1")
    front.reconcile()
    front.eventually(
        lambda: {front.agent_get()[1]["master"] for _ in range(6)} == {"m2"}, "m1 leaving the upstream"
    )
    # The request that started before both reloads is still being served by m1; let it finish.
    assert slow.is_alive()
    m1.release.set()
    slow.join(timeout=30)
    assert results == [(200, results[0][1])]
    assert results[0][1]["master"] == "m1"


def test_each_master_has_its_own_port(front: Front) -> None:
    front.add_master("m2", registered_at=2.0)
    front.reconcile()
    first = front.settings.ports.first_master

    def routed() -> bool:
        try:
            return bool(front.get(first + 1, "/", issued=front.agent)[1]["master"] == "m2")
        except OSError:
            return False

    front.eventually(routed, "m2's own port")
    for _ in range(4):
        assert front.get(first, "/", issued=front.agent)[1]["master"] == "m1"


def test_unhealthy_master_leaves_the_upstream(front: Front) -> None:
    front.add_master("m2", registered_at=2.0)
    records = Records(front.pki.store)
    found = records.get(MasterRecord, "m1")
    assert found is not None
    records.replace(attrs.evolve(found.record, healthy=False), found.version)
    front.reconcile()
    front.eventually(
        lambda: {front.agent_get()[1]["master"] for _ in range(6)} == {"m2"}, "m1 leaving the upstream"
    )


def test_a_draining_master_s_own_port_sends_agents_to_the_masters_in_service(front: Front) -> None:
    front.add_master("m2", registered_at=2.0)
    front.reconcile()
    first = front.settings.ports.first_master
    front.eventually(lambda: front.get(first, "/", issued=front.agent)[1]["master"] == "m1", "m1's own port")
    records = Records(front.pki.store)
    found = records.get(MasterRecord, "m1")
    assert found is not None
    records.replace(attrs.evolve(found.record, draining_since=1.0, drain_token=7), found.version)
    front.reconcile()

    def sent_to() -> set[str]:
        return {front.get(first, "/", issued=front.agent)[1]["master"] for _ in range(6)}

    front.eventually(lambda: sent_to() == {"m2"}, "m1's port sending to m2")
    # m2's own port did not move.
    assert front.get(first + 1, "/", issued=front.agent)[1]["master"] == "m2"


def test_a_configuration_nginx_refuses_is_not_applied(front: Front) -> None:
    live = front.nginx.generations.live()
    bad = attrs.evolve(front.settings, private_key="/nonexistent/key.pem")
    decision = decide_front(bad, discover_front(front.pki.store, bad), [], [LB_CA])
    with pytest.raises(NginxRefused) as refused:
        front.nginx.generations.install(decision.files, front.nginx.control)
    assert "/nonexistent/key.pem" in refused.value.output
    assert front.nginx.generations.live() == live
    generations = front.nginx.generations.directory.iterdir()
    assert sorted(p.name for p in generations if p.name.startswith("gen-")) == [live]
    assert front.agent_get()[0] == 200


def test_the_service_reports_a_refused_configuration_and_keeps_serving(front: Front) -> None:
    live = front.nginx.generations.live()
    front.service.settings = attrs.evolve(front.settings, private_key="/nonexistent/key.pem")
    front.pki.revoke(front.agent)  # a change that would otherwise be applied
    result: list[Any] = []
    front.service.poke().addCallback(result.append)
    assert result == [None]
    assert front.nginx.generations.live() == live
    assert front.agent_get()[0] == 200


def test_enrollment_passes_through_with_the_proxy_protocol(front: Front) -> None:
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    backend = listener.getsockname()[1]
    front.service.enroll_backends = (Backend(LOOPBACK, backend),)
    front.reconcile()

    def connected() -> bool:
        try:
            client = socket.create_connection((LOOPBACK, front.enroll_port), timeout=5)
        except OSError:
            return False
        source_port = client.getsockname()[1]
        client.sendall(b"hello")
        conn, _ = listener.accept()
        data = b""
        while b"hello" not in data:
            chunk = conn.recv(1024)
            if not chunk:
                break
            data += chunk
        conn.close()
        client.close()
        header = data.split(b"\r\n", 1)[0].decode()
        assert header.startswith(f"PROXY TCP4 {LOOPBACK} {LOOPBACK} {source_port} ")
        return True

    front.eventually(connected, "the enrollment port")
    listener.close()


class NoNginx(NginxControl):
    def test(self, config: str, generation: str = "") -> None:
        pass

    def reload(self, config: str) -> None:
        pass


def test_the_generations_directory_is_made_enterable_whatever_the_umask(tmp_path: Path) -> None:
    generations = Generations(tmp_path / "front")
    previous = os.umask(0o077)  # the systemd unit's
    try:
        generations.install({"nginx.conf": b"", "agents-crl.pem": b"CRL"}, NoNginx())
    finally:
        os.umask(previous)
    assert (tmp_path / "front").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "front" / "live" / "agents-crl.pem").stat().st_mode & 0o777 == 0o644


def test_workers_that_are_not_root_serve_the_ca_paths_from_a_reachable_directory(tmp_path: Path) -> None:
    """
    nginx's workers (www-data on Debian) open the bundles themselves: the generations must sit
    where that user may enter, and the front tells, at start, when they do not.
    """
    top = Path(tempfile.mkdtemp(prefix="front-"))  # pytest's tmp_path is root's alone
    try:
        os.chmod(top, 0o755)  # noqa: S103 -- nginx's workers must reach the bundles
        pki = FrontPKI(tmp_path / "pki")
        pki.add_ca(LB_CA)
        lb = pki.leaf(LB_CA, "lb1", sans=[FRONT_NAME, LOOPBACK])
        (tmp_path / "pki" / "root.pem").write_text(pki.authority.root().certificate_pem)
        nginx = NginxUnderTest(top / "nginx")
        nginx.runtime = attrs.evolve(nginx.runtime, user="www-data")
        settings = FrontSettings(
            certificate=lb.certificate, private_key=lb.private_key, master_name=FRONT_NAME,
            ports=loopback_ports(max_masters=1), runtime=nginx.runtime,
        )  # fmt: skip
        assert unreachable_for(Path(nginx.runtime.live_dir), "www-data") is None
        first = decide_front(settings, discover_front(pki.store, settings), [], [LB_CA])
        nginx.generations.install(first.files, nginx.control, reload=False)
        nginx.start(wait_ports=(settings.ports.front,))
        try:
            front = Front(pki, nginx, None, settings, {}, lb, lb, settings.ports.enroll)  # type: ignore[arg-type]
            status, body = front.get(settings.ports.front, CA_PATHS[1][0])
            assert status == 200
            assert pki.authority.crl(LB_CA).crl_pem.strip() in body
            # The same generations under a directory only root may enter: www-data gets nothing,
            # and the check says which directory is in the way.
            os.chmod(top, 0o700)
            assert unreachable_for(Path(nginx.runtime.live_dir), "www-data") == str(top)
            assert front.get(settings.ports.front, CA_PATHS[1][0])[0] == 403
            events: list[LogEvent] = []
            observer = cast(ILogObserver, events.append)
            globalLogPublisher.addObserver(observer)
            service = FrontService(
                clock=Clock(), blocking=Synchronous(), store=pki.store, settings=settings,
                generations=nginx.generations, control=nginx.control,
            )  # fmt: skip
            try:
                service.startService()
                service.stopService()
            finally:
                globalLogPublisher.removeObserver(observer)
            said = [e for e in events if e.get("log_level") == LogLevel.error]
            assert [e["directory"] for e in said] == [str(top)]
        finally:
            nginx.stop()
            pki.close()
    finally:
        shutil.rmtree(top)
