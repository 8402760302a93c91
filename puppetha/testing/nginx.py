"""
The real nginx for tests: Debian's binary started in a temporary directory, listening on
loopback only, with the same :class:`~puppetha.ha.front.Generations` layout an lb node uses.

A missing nginx or stream module is an error, never a skip.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from attrs import frozen

from puppetha.ha.front import NGINX, Generations, NginxControl
from puppetha.ha.nginx import STREAM_MODULE, FrontPorts, NginxRuntime

if TYPE_CHECKING:
    from puppetha.pki.vault import IKeyVault
    from puppetha.store import IStore

LOOPBACK = "127.0.0.1"


class NginxMissing(RuntimeError):
    pass


def require_nginx(binary: str = NGINX, stream_module: str = STREAM_MODULE) -> None:
    if not os.access(binary, os.X_OK):
        raise NginxMissing(f"{binary} is not installed (apt-get install nginx)")
    if not os.path.exists(stream_module):
        raise NginxMissing(f"{stream_module} is missing (apt-get install libnginx-mod-stream)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def free_port_block(count: int, attempts: int = 200) -> int:
    """
    The first of ``count`` consecutive free loopback ports, below the kernel's ephemeral range
    (where outgoing connections of a busy test run leave thousands of ports in TIME-WAIT).
    """
    chooser = random.Random()  # noqa: S311 - spreading test ports, not secrets
    for _ in range(attempts):
        first = chooser.randrange(20000, 32000 - count)
        if all(_is_free(p) for p in range(first, first + count)):
            return first
    raise RuntimeError(f"no block of {count} free ports found")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        # As nginx binds: a port whose old connections linger in TIME-WAIT is free to listen on.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def wait_for_port(port: int, timeout: float = 10.0, host: str = LOOPBACK) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def loopback_ports(max_masters: int = 4) -> FrontPorts:
    """Free loopback ports for the front, ``max_masters`` master routes and the enrollment port."""
    first = free_port_block(max_masters + 2)
    return FrontPorts(
        address=LOOPBACK,
        front=first,
        enroll=first + 1,
        first_master=first + 2,
        max_masters=max_masters,
    )


class NginxUnderTest:
    """
    nginx with everything under ``directory``: ``front/`` (the generations), ``logs/``, ``temp/``.
    Call :meth:`start` once a generation is live (``generations.install(..., reload=False)``).
    """

    def __init__(self, directory: Path, binary: str = NGINX) -> None:
        require_nginx(binary)
        self.directory = directory
        self.binary = binary
        (directory / "logs").mkdir(parents=True, exist_ok=True)
        (directory / "temp").mkdir(parents=True, exist_ok=True)
        self.error_log = str(directory / "logs" / "error.log")
        self.runtime = NginxRuntime(
            pid_path=str(directory / "nginx.pid"),
            error_log=self.error_log,
            temp_dir=str(directory / "temp"),
            access_log=str(directory / "logs" / "access.log"),
            # The temporary directory is root's alone; workers buffer bodies there.
            user="root",
            worker_processes="1",
            worker_shutdown_timeout=60,
        )
        self.generations = Generations(directory / "front")
        self.control = NginxControl(binary, error_log=self.error_log)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_ports: tuple[int, ...] = ()) -> None:
        if self.generations.live() is None:
            raise RuntimeError("install a generation before starting nginx")
        self.process = subprocess.Popen(
            [self.binary, "-e", self.error_log, "-c", self.generations.config_path, "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
        )
        for port in wait_ports:
            try:
                wait_for_port(port)
            except TimeoutError:
                self.stop()
                raise RuntimeError(f"nginx did not come up:\n{self.log_tail()}") from None

    def master_pid(self) -> int:
        return int(Path(self.runtime.pid_path).read_text().strip())

    def worker_pids(self) -> set[int]:
        """The master's current children (old workers still draining included)."""
        master = self.master_pid()
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        return {int(pid) for pid in children}

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(Path(self.error_log).read_text().splitlines()[-lines:])
        except OSError:
            return "(no error log)"

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class FrontPKI:
    """
    puppetha's real CA over a real SQLite store, for front tests: the root, masters' CAs, the lb
    CA, and leaf certificates written out as PEM files (keys 0600).
    """

    def __init__(self, directory: Path, now: Callable[[], float] = time.time, *,
                 store: IStore | None = None, vault: IKeyVault | None = None) -> None:
        """By default a new SQLite store and key file in ``directory``; or the given ones."""
        from datetime import timedelta

        from puppetha.pki.authority import CertificateAuthority
        from puppetha.pki.keys import KeyType
        from puppetha.pki.vault import FileKeyVault
        from puppetha.store.records import Records
        from puppetha.store.sqlite import SQLiteStore

        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.store = store if store is not None else SQLiteStore(str(directory / "store.sqlite"))
        self.records = Records(self.store)
        self.authority = CertificateAuthority(
            self.records,
            vault if vault is not None else FileKeyVault.create(directory / "vault.key"),
            key_type=KeyType.EC_P256,
            now=now,
            ca_lifetime=timedelta(days=3650),
            cert_lifetime=timedelta(days=365),
            crl_lifetime=timedelta(days=7),
        )
        self.authority.init_root("puppetha test root")

    def add_ca(self, name: str) -> None:
        """An intermediate under the root (a master's, or the lb CA)."""
        from puppetha.pki.authority import RESERVED_CA_NAMES

        if name in RESERVED_CA_NAMES:
            self.authority.ensure_ca(name)
        else:
            self.authority.create_master_ca(name)

    def leaf(
        self, ca: str, certname: str, sans: Sequence[str] = (), usage: str = "both"
    ) -> IssuedFiles:
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
        cert_path = out / "cert.pem"
        key_path = out / "key.pem"
        cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_key_pem(key))
        chain_path = out / "chain.pem"
        chain_path.write_bytes(self.authority.ca_chain_pem(ca))
        return IssuedFiles(certname, ca, cert.serial_number, str(cert_path), str(key_path), str(chain_path))

    def revoke(self, issued: IssuedFiles) -> None:
        self.authority.revoke(issued.ca, issued.serial, certname=issued.certname)

    def close(self) -> None:
        self.store.close()


@frozen
class IssuedFiles:
    certname: str
    ca: str
    serial: int
    certificate: str
    private_key: str
    #: The issuing CA up to the root.
    chain: str


class LbOnlyServer:
    """
    An HTTPS server on loopback that, like a master's puppetserver, completes a handshake only
    with a client certificate from the lb CA; ``handler`` answers the requests.
    """

    def __init__(self, issued: IssuedFiles, lb_ca_pem: str, handler: type[BaseHTTPRequestHandler]) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(issued.certificate, issued.private_key)
        # Only the lb CA: agents' certificates must never get through directly.
        context.load_verify_locations(cadata=lb_ca_pem)
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.verify_mode = ssl.CERT_REQUIRED
        self.server = ThreadingHTTPServer((LOOPBACK, 0), handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
