"""
puppetha's lb nodes in a :class:`~puppetha.testing.netns.Rig`: ``twistd puppetha`` with the lb
role and failover on, and Debian's nginx, in each lb host; the store on DynamoDB with CA keys
sealed by KMS, both in moto on the AWS host; a stand-in for a master's puppetserver on a master
host; and a client outside that makes an agent's request through the Elastic IP.

The stand-in master answers every request with the address the request came from, which is the
lb node whose nginx proxied it: the client outside thus learns which node served it.  For whole
agent runs, :class:`RealMaster` is Debian's puppetserver on the master host instead, and
:class:`PuppetAgent` is Debian's puppet agent on a host of its own, whose ``puppet`` is the
Elastic IP.

Blocking code, for tests and benchmarks.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from attrs import frozen

from puppetha.ha.front import NGINX
from puppetha.testing.acting import windows
from puppetha.testing.moto import TEST_CREDENTIALS, client
from puppetha.testing.netns import Host
from puppetha.testing.nginx import IssuedFiles, require_nginx

TWISTD = str(Path(sys.executable).parent / "twistd")
REGION = "us-east-1"
#: The name agents use for the front; the masters' certificates carry it too.
FRONT_NAME = "puppet"
FRONT_PORT = 8140
ENROLL_PORT = 8080
FIRST_MASTER_PORT = 8141
MASTER_PORT = 8150
MASTER = "master-1"

AWS_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": TEST_CREDENTIALS["aws_access_key_id"],
    "AWS_SECRET_ACCESS_KEY": TEST_CREDENTIALS["aws_secret_access_key"],
    "AWS_DEFAULT_REGION": REGION,
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}


@frozen
class SharedStore:
    """What every lb node shares: the table, the KMS key, the AWS endpoint."""

    endpoint_url: str
    table: str
    kms_key_id: str

    def settings(self) -> dict[str, str]:
        return {
            "store.backend": "dynamodb",
            "store.table": self.table,
            "pki.vault": "kms",
            "pki.kms_key_id": self.kms_key_id,
            "aws.endpoint_url": self.endpoint_url,
            "aws.region": REGION,
        }


def _with_aws_environment() -> None:
    for name, value in AWS_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


class FleetPKI:
    """The shared store made ready: the table, the root CA, the lb CA, a master's CA, and leaves."""

    def __init__(self, endpoint_url: str, directory: Path) -> None:
        from puppetha.pki.authority import CertificateAuthority
        from puppetha.pki.keys import KeyType
        from puppetha.store.dynamodb import DynamoDBStore
        from puppetha.store.records import Records

        _with_aws_environment()
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        kms = client("kms", endpoint_url, REGION)
        self.shared = SharedStore(
            endpoint_url=endpoint_url,
            table=f"puppetha-{uuid.uuid4().hex[:8]}",
            kms_key_id=str(kms.create_key(Description="puppetha rig")["KeyMetadata"]["KeyId"]),
        )
        self.store = DynamoDBStore(table=self.shared.table, region=REGION, endpoint_url=endpoint_url)
        self.store.create_table()
        self.records = Records(self.store)
        from puppetha.aws.kms import KmsKeyVault

        self.authority = CertificateAuthority(
            self.records,
            KmsKeyVault(key_id=self.shared.kms_key_id, region=REGION, endpoint_url=endpoint_url),
            key_type=KeyType.EC_P256,
            now=time.time,
            ca_lifetime=timedelta(days=3650),
            cert_lifetime=timedelta(days=365),
            crl_lifetime=timedelta(days=7),
        )
        self.authority.init_root("puppetha rig root")
        self.authority.ensure_ca("lb")
        self.authority.create_master_ca(MASTER)

    def leaf(self, ca: str, certname: str, sans: Sequence[str] = (), usage: str = "both") -> IssuedFiles:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.serialization import Encoding
        from cryptography.x509.oid import NameOID

        from puppetha.pki.certs import Usage
        from puppetha.pki.keys import KeyType, private_key_pem

        key = KeyType.EC_P256.generate()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, certname)]))
            .sign(key, hashes.SHA256())
        )
        cert = self.authority.issue(ca, csr, common_name=certname, sans=sans, usage=Usage(usage))
        out = self.directory / "issued" / certname
        out.mkdir(parents=True, exist_ok=True)
        cert_path, key_path, chain_path = out / "cert.pem", out / "key.pem", out / "chain.pem"
        cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_key_pem(key))
        chain_path.write_bytes(self.authority.ca_chain_pem(ca))
        return IssuedFiles(certname, ca, cert.serial_number, str(cert_path), str(key_path), str(chain_path))

    def ca_pem(self, name: str) -> str:
        from puppetha.store.records import CARecord

        found = self.records.get(CARecord, name)
        assert found is not None  # noqa: S101 - made in __init__
        return found.record.certificate_pem

    def register_master(self, address: str, port: int) -> None:
        from puppetha.store.records import MasterRecord

        self.records.create(
            MasterRecord(certname=MASTER, address=address, port=port, ca=MASTER, registered_at=time.time())
        )

    def close(self) -> None:
        self.store.close()


class StandInMaster:
    """
    A master's lb-only HTTPS listener in ``host``: only lb certificates get through; every request
    is answered 200 with the address it came from (the lb node that proxied it).
    """

    def __init__(self, host: Host, pki: FleetPKI, port: int = MASTER_PORT) -> None:
        issued = pki.leaf(MASTER, MASTER, sans=[MASTER, FRONT_NAME], usage="server")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(issued.certificate, issued.private_key)
        context.load_verify_locations(cadata=pki.ca_pem("lb"))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.verify_mode = ssl.CERT_REQUIRED

        class Answer(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = str(self.client_address[0]).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.address, self.port = host.address, port
        self.server = host.inside(lambda: _QuietServer((host.address, port), Answer))
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="stand-in-master")
        self.thread.start()
        pki.register_master(host.address, port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # nginx drops upstream connections whose client gave up (failover tests do, often).
        pass


class Agent:
    """An agent's client certificate, and requests through the front (the Elastic IP)."""

    def __init__(self, pki: FleetPKI, certname: str = "agent-1.test") -> None:
        issued = pki.leaf(MASTER, certname, usage="client")
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.load_cert_chain(issued.certificate, issued.private_key)
        self.context.load_verify_locations(cadata=pki.ca_pem("root"))

    def served_by(self, address: str, port: int = FRONT_PORT, timeout: float = 1.0,
                  path: str = "/puppet/v3/status/rig") -> str | None:
        """
        The lb address that proxied a request to ``address``, or None when it did not succeed
        (with a real master and another ``path``: the body of its answer, when 200).
        """
        connection = _FrontConnection(address, port, timeout=timeout, context=self.context)
        try:
            connection.request("GET", path, headers={"Host": FRONT_NAME, "Accept": "application/json"})
            answer = connection.getresponse()
            body = answer.read().decode()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            connection.close()
        return body if answer.status == 200 else None


class _FrontConnection(http.client.HTTPSConnection):
    """To an address, checking the certificate against the front's name, as an agent does."""

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=FRONT_NAME)  # type: ignore[attr-defined]


class LbDaemon:
    """``twistd puppetha`` (lb role, failover on) and nginx in ``host``."""

    def __init__(
        self,
        host: Host,
        *,
        shared: SharedStore,
        lb_files: IssuedFiles,
        allocation_id: str,
        instance_id: str,
        directory: Path,
        ha: Mapping[str, str] | None = None,
    ) -> None:
        require_nginx()
        self.host = host
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "nginx-temp").mkdir(exist_ok=True)
        self.log_path = self.dir / "daemon.log"
        self.acting_log = self.dir / "acting.log"
        self.error_log = self.dir / "nginx-error.log"
        self.live = self.dir / "nginx" / "live" / "nginx.conf"
        self.settings = {
            **shared.settings(),
            "daemon.roles": "lb",
            "enroll.front": f"{FRONT_NAME}:{FRONT_PORT}",
            "lb.certificate": lb_files.certificate,
            "lb.private_key": lb_files.private_key,
            # Every address of the host: its own and the Elastic IP when it holds it.
            "lb.listen_address": "0.0.0.0",  # noqa: S104
            "lb.front_port": str(FRONT_PORT),
            "lb.enroll_port": str(ENROLL_PORT),
            "lb.first_master_port": str(FIRST_MASTER_PORT),
            "lb.max_masters": "4",
            "lb.nginx_dir": str(self.dir / "nginx"),
            "lb.nginx_pid": str(self.dir / "nginx.pid"),
            "lb.nginx_error_log": str(self.error_log),
            "lb.nginx_temp_dir": str(self.dir / "nginx-temp"),
            "lb.nginx_access_log": str(self.dir / "nginx-access.log"),
            "lb.nginx_user": "root",
            "lb.interval": "1s",
            "lb.health_interval": "1s",
            "enc.socket": str(self.dir / "enc.sock"),
            "ha.elastic_ip": allocation_id,
            "ha.instance_id": instance_id,
            "ha.address": host.address,
            "ha.acting_log": str(self.acting_log),
            **{f"ha.{name}": value for name, value in (ha or {}).items()},
        }
        self.daemon: subprocess.Popen[bytes] | None = None
        self.nginx: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        command = [TWISTD, "--nodaemon", "--pidfile=", "puppetha", "--state-dir", str(self.dir / "state")]
        for name, value in self.settings.items():
            command += ["--set", f"{name}={value}"]
        return command

    @property
    def running(self) -> bool:
        return self.daemon is not None and self.daemon.poll() is None

    def start(self, timeout: float = 60.0) -> LbDaemon:
        """Starts the daemon, then nginx once the daemon has rendered a configuration."""
        if self.daemon is not None:
            # Still stopping (see stop(wait=False)): the new one starts once the old one is gone.
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
            self.daemon = None
        environment = {**os.environ, **AWS_ENVIRONMENT}
        with self.log_path.open("ab") as log:
            self.daemon = self.host.popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
            )
        deadline = time.monotonic() + timeout
        while not self.live.exists():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.host.name}: no nginx configuration; daemon log:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self.start_nginx()
        return self

    def start_nginx(self) -> None:
        if self.nginx is not None and self.nginx.poll() is None:
            return
        self.nginx = self.host.popen(
            [NGINX, "-e", str(self.error_log), "-c", str(self.live), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self, timeout: float = 30.0, wait: bool = True) -> None:
        """
        SIGTERM to the daemon (a graceful stop: it releases the lease); nginx keeps running.
        ``wait=False`` only sends the signal.
        """
        if self.daemon is None:
            return
        if self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            if not wait:
                return
            try:
                self.daemon.wait(timeout)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        self.daemon = None

    def kill(self) -> None:
        """``kill -9`` of the daemon and nginx."""
        for process in (self.daemon, self.nginx):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        self.daemon = self.nginx = None

    def stop_all(self) -> None:
        self.stop()
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGQUIT)
            try:
                self.nginx.wait(10)
            except subprocess.TimeoutExpired:
                self.nginx.kill()
                self.nginx.wait()
        self.nginx = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def acting(self) -> list[dict[str, Any]]:
        """The acting log's entries (JSON lines), in order."""
        try:
            lines = self.acting_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def acted(self) -> list[tuple[int, float, float]]:
        """(token, from, until) for each window this node acted as primary, on the monotonic clock."""
        found = windows(self.acting())
        return sorted(
            ((token, start, until) for (_, token), (start, until) in found.items()), key=lambda w: w[1]
        )

    def associations(self) -> list[dict[str, Any]]:
        return [entry for entry in self.acting() if entry["event"] == "associate"]


#: What the real master's ENC says of every node: the test module, with a greeting to find in the run.
RIG_GREETING = "served through the Elastic IP"
RIG_ENC = f"""#!/bin/sh
cat <<'END'
environment: production
classes:
  puppetha_test:
    greeting: {RIG_GREETING}
parameters:
  role: agent
END
"""


class RealMaster:
    """
    Debian's puppetserver in ``host``, configured as :mod:`puppetha.instance.puppetserver` writes a
    master (lb certificates only, the agent's identity from nginx's headers), with a master
    certificate from the fleet's CAs, and registered in the store for the lb nodes' fronts.
    Its ENC is a script that classifies every node alike.
    """

    def __init__(self, host: Host, pki: FleetPKI, directory: Path, port: int = MASTER_PORT) -> None:
        import shutil

        from puppetha.instance.puppetserver import MasterMaterial, MasterSettings
        from puppetha.testing.puppetserver import TEST_MODULE, PuppetserverUnderTest

        directory.mkdir(parents=True, exist_ok=True)
        issued = pki.leaf(MASTER, MASTER, sans=[MASTER, FRONT_NAME], usage="server")
        authority = pki.authority
        material = MasterMaterial(
            certname=MASTER,
            certificate_pem=Path(issued.certificate).read_text(),
            private_key_pem=Path(issued.private_key).read_text(),
            ca_chain_pem=authority.ca_bundle_pem().decode("ascii"),
            crl_chain_pem=authority.crl_chain_pem().decode("ascii"),
            lb_ca_pem=pki.ca_pem("lb"),
            lb_crl_pem=authority.crl("lb").crl_pem,
        )
        enc = directory / "enc"
        enc.write_text(RIG_ENC)
        enc.chmod(0o755)
        # Debian's services.d, whose ca.cfg the master's files replace (no CA on a master).
        shutil.copytree("/etc/puppet/puppetserver/services.d", directory / "services.d", dirs_exist_ok=True)
        self.server = PuppetserverUnderTest(directory, popen=host.popen)
        settings = MasterSettings(listen_address=host.address, listen_port=port, enc_command=str(enc))
        self.server.configure(material, settings, TEST_MODULE)
        probe = pki.leaf("lb", "probe.lb.test", usage="client")
        self.server.start(probe.certificate, probe.private_key)
        pki.register_master(host.address, port)

    def log_tail(self, lines: int = 60) -> str:
        return self.server.log_tail(lines)

    def stop(self) -> None:
        self.server.stop()


class PuppetAgent:
    """
    Debian's puppet agent in ``host``, with a certificate from the master's CA, the fleet's CA
    bundle and CRLs in its ssldir, and ``server = puppet``, which the host's own ``/etc/hosts``
    (``/etc/netns/NAMESPACE/hosts``, which ``ip netns exec`` mounts) resolves to the Elastic IP.
    """

    def __init__(self, host: Host, pki: FleetPKI, directory: Path, front_address: str,
                 certname: str = "agent-eip.test", *, http_read_timeout: str | None = None) -> None:
        from puppetha.testing.puppetserver import require_puppetserver

        require_puppetserver()
        self.host = host
        self.directory = directory
        ssldir = directory / "ssl"
        for sub in ("certs", "private_keys"):
            (ssldir / sub).mkdir(parents=True, exist_ok=True)
        issued = pki.leaf(MASTER, certname, usage="client")
        (ssldir / "certs" / f"{certname}.pem").write_bytes(Path(issued.certificate).read_bytes())
        key = ssldir / "private_keys" / f"{certname}.pem"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Path(issued.private_key).read_bytes())
        (ssldir / "certs" / "ca.pem").write_bytes(pki.authority.ca_bundle_pem())
        (ssldir / "crl.pem").write_bytes(pki.authority.crl_chain_pem())
        self.conf = directory / "puppet.conf"
        self.conf.write_text(
            "[main]\n"
            f"certname = {certname}\n"
            f"server = {FRONT_NAME}\n"
            f"serverport = {FRONT_PORT}\n"
            f"ca_server = {FRONT_NAME}\n"
            f"ca_port = {FRONT_PORT}\n"
            f"ssldir = {ssldir}\n"
            + (f"http_read_timeout = {http_read_timeout}\n" if http_read_timeout else "")
        )
        self.etc = Path("/etc/netns") / host.namespace
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / "hosts").write_text(f"127.0.0.1 localhost\n{front_address} {FRONT_NAME}\n")

    def command(self) -> list[str]:
        from puppetha.testing.puppetserver import PUPPET

        d = self.directory
        return [
            PUPPET, "agent", "--test", "--config", str(self.conf), "--confdir", str(d / "conf"),
            "--vardir", str(d / "var"), "--logdir", str(d / "log"), "--rundir", str(d / "run"),
            "--codedir", str(d / "code"), "--no-daemonize", "--color=false",
        ]  # fmt: skip

    def start(self) -> subprocess.Popen[str]:
        """``puppet agent --test``, under way: read its output with ``communicate``."""
        return self.host.popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.etc, ignore_errors=True)
