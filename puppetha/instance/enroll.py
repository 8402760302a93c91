"""
``puppetha-enroll``: run once on a new instance to get its Puppet certificate.

It reads the instance identity document and its signature from the metadata service (IMDSv2),
makes a private key and a CSR here (the key never leaves the instance), pins the enrollment
server's root CA by fingerprint, posts the enrollment, checks what comes back, and puts a ready
ssldir and puppet.conf in place all at once.  Synchronous and stdlib-only (plus cryptography): it
runs once on a fresh host.  See docs/client.md.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import re
import socket
import ssl
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO
from urllib.parse import urlsplit

import attrs
from attrs import field, frozen
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from puppetha.enc.launcher import compile_script
from puppetha.instance.puppetserver import (
    MASTER_PORT,
    MasterMaterial,
    MasterSettings,
    PuppetserverLayout,
    master_config_files,
    server_settings,
)
from puppetha.instance.ssldir import (
    PUBLIC_FILE_MODE,
    AlreadyEnrolled,
    Changes,
    PuppetCredentials,
    check_not_enrolled,
    write_puppet_conf_sections,
    write_ssldir,
)
from puppetha.pki.certs import fingerprint
from puppetha.pki.keys import KeyType, PrivateKey, private_key_pem, same_public_key
from puppetha.pki.names import certname_problem, parse_san, san_text

EXIT_OK = 0
#: Something on this host: bad arguments, unwritable files, an ssldir already enrolled.
EXIT_LOCAL = 1
#: The server refused (4xx); retrying the same request will not help.
EXIT_REFUSED = 2
#: The server, one of its dependencies, or the metadata service is unavailable; retry later.
EXIT_UNAVAILABLE = 3
#: The server is not the one pinned, or answered something that does not verify.
EXIT_UNTRUSTED = 4

ROLES = ("agent", "master", "lb")
DEFAULT_IMDS_URL = "http://169.254.169.254"
#: Debian's puppet agent defaults (``puppet config print ssldir config``).
DEFAULT_SSLDIR = Path("/var/lib/puppet/ssl")
DEFAULT_PUPPET_CONF = Path("/etc/puppet/puppet.conf")
DEFAULT_TIMEOUT = 30.0
#: Where a master keeps its own intermediate CA certificate, under ``certs/``.
MASTER_CA_FILE = "master-ca.pem"
#: Debian's puppetserver keeps ``conf.d/`` and ``services.d/`` here, beside puppet.conf.
PUPPETSERVER_CONFDIR_NAME = "puppetserver"
#: The ENC script puppetserver runs for each node (``external_nodes``).
DEFAULT_ENC_SCRIPT = MasterSettings(listen_address="").enc_command

#: IMDSv2 session tokens need only outlive this run.
IMDS_TOKEN_TTL = 300
#: Far above any answer we expect (a CA bundle of many masters); refuse to buffer more.
MAX_ANSWER = 4 * 1024 * 1024

_PIN = re.compile(r"sha256:([0-9a-f]{64})")


#: Pauses between tries with ``--wait``: doubling from the first to the longest.
FIRST_PAUSE = 2.0
LONGEST_PAUSE = 30.0


class EnrollError(Exception):
    """A failure reported as one line; ``exit_code`` tells a caller whether to retry."""

    exit_code = EXIT_LOCAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LocalError(EnrollError):
    exit_code = EXIT_LOCAL


class WriteFailed(LocalError):
    """The answer checked out but the puppet files could not be written: the key is kept, and
    ``--wait`` tries again with it (the server answers again with the same certificate)."""


class Refused(EnrollError):
    exit_code = EXIT_REFUSED


class Unavailable(EnrollError):
    exit_code = EXIT_UNAVAILABLE


class Untrusted(EnrollError):
    exit_code = EXIT_UNTRUSTED


# -- options -------------------------------------------------------------------------------------


@frozen
class ServerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


#: Puppet's default ``runinterval``: an agent run fetches the CRLs at most this often, and an lb
#: node revoked is distrusted by agents within it.
DEFAULT_CRL_REFRESH_INTERVAL = "30m"
#: Puppet's own default (for agents that know the setting, from Puppet 7.28 and 8): the CA
#: bundle changes only when a CA is added.
CA_REFRESH_INTERVAL = "1d"


@frozen
class Options:
    role: str
    server: ServerAddress
    #: ``sha256:`` and 64 lowercase hex digits.
    ca_fingerprint: str
    imds_url: str = DEFAULT_IMDS_URL
    ssldir: Path = DEFAULT_SSLDIR
    puppet_conf: Path = DEFAULT_PUPPET_CONF
    #: puppet.conf section for our settings; ``None``: ``agent`` for agents, ``main`` otherwise.
    conf_section: str | None = None
    key_type: KeyType = KeyType.EC_P256
    certname: str | None = None
    #: SANs a master or lb node asks for; ``None``: its private DNS name and the server's host.
    dns_alt_names: tuple[str, ...] | None = None
    timeout: float = DEFAULT_TIMEOUT
    force: bool = False
    #: Masters: puppetserver's configuration (``conf.d``, ``services.d``); ``None``: the
    #: ``puppetserver`` directory beside puppet.conf (Debian's ``/etc/puppet/puppetserver``).
    puppetserver_confdir: Path | None = None
    enc_script: str = DEFAULT_ENC_SCRIPT
    #: The ENC's socket, passed to the script as ``--socket``; empty: the script's default.
    enc_socket: str = ""
    #: Masters: the address puppetserver listens on; ``None``: the instance's private IP.
    listen_address: str | None = None
    listen_port: int = MASTER_PORT
    #: Seconds to keep trying while the server or the metadata service is unavailable.
    wait: float = 0.0
    #: Puppet's ``crl_refresh_interval`` (a Puppet duration): how often the agent fetches every
    #: CA's CRL from the front.
    crl_refresh_interval: str = DEFAULT_CRL_REFRESH_INTERVAL

    @property
    def puppetserver_dir(self) -> Path:
        if self.puppetserver_confdir is not None:
            return self.puppetserver_confdir
        return self.puppet_conf.parent / PUPPETSERVER_CONFDIR_NAME

    @property
    def section(self) -> str:
        if self.conf_section is not None:
            return self.conf_section
        return "agent" if self.role == "agent" else "main"


def parse_pin(text: str) -> str:
    """
    Normalise a root CA pin to ``sha256:<64 lowercase hex>``; OpenSSL's colon-separated upper-case
    spelling is accepted too.  ``ValueError`` otherwise.
    """
    algorithm, sep, digest = text.strip().partition(":")
    normalised = "sha256:" + digest.replace(":", "").lower()
    if not sep or algorithm.lower() != "sha256" or _PIN.fullmatch(normalised) is None:
        raise ValueError(f"--ca-fingerprint must be sha256: and 64 hex digits, not {text!r}")
    return normalised


def parse_server_url(text: str) -> ServerAddress:
    """``https://HOST:PORT`` (port 8080 when omitted); ``ValueError`` for anything else."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"--server {text!r}: {e}") from None
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"--server must be https://HOST[:PORT], not {text!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"--server must be https://HOST[:PORT] with nothing after it, not {text!r}")
    return ServerAddress(parts.hostname, port or 8080)


def parse_host_port(text: str) -> ServerAddress:
    """
    ``host:port`` or ``[v6]:port`` as the server writes ``server``, whose host is a DNS name or IP
    address (the rule the server holds ``[enroll] front`` to); ``ValueError`` otherwise.  The host
    goes into puppet.conf and onto the terminal, so nothing else is let through.
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    if not (_is_ip(host) if ":" in host else _is_name(host)):
        raise ValueError(f"{text!r} is not host:port")
    return ServerAddress(host, int(port))


def _is_name(text: str) -> bool:
    try:
        parse_san(text)
    except ValueError:
        return False
    return True


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class _Parser(argparse.ArgumentParser):
    # argparse exits 2 on a usage error, which is our "refused" code.
    def error(self, message: str) -> NoReturn:
        raise LocalError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="puppetha-enroll",
        description="Enroll this EC2 instance with puppetha and write its puppet ssldir and puppet.conf.",
    )
    parser.add_argument("--role", required=True, choices=ROLES)
    parser.add_argument("--server", required=True, help="the enrollment service, https://HOST[:8080]")
    parser.add_argument(
        "--ca-fingerprint", required=True, help="sha256:HEX of puppetha's root CA certificate (DER)"
    )
    parser.add_argument("--imds-url", default=DEFAULT_IMDS_URL, help="the instance metadata service")
    parser.add_argument("--ssldir", type=Path, default=DEFAULT_SSLDIR)
    parser.add_argument("--puppet-conf", type=Path, default=DEFAULT_PUPPET_CONF)
    parser.add_argument(
        "--conf-section", help="puppet.conf section to write (default: agent for agents, main otherwise)"
    )
    parser.add_argument("--key-type", choices=[t.value for t in KeyType], default=KeyType.EC_P256.value)
    parser.add_argument("--certname", help="default: the instance ID, the server's default template")
    parser.add_argument(
        "--dns-alt-names",
        help="masters and lb nodes: comma-separated names for the CSR "
        "(default: the private DNS name and the --server host; name the front when --server is "
        "not the front, as for the first lb node)",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per request")
    parser.add_argument("--force", action="store_true", help="replace an existing certificate")
    parser.add_argument(
        "--crl-refresh-interval", default=DEFAULT_CRL_REFRESH_INTERVAL,
        help="how often puppet fetches every CA's CRL from the front "
        f"(a Puppet duration; default: {DEFAULT_CRL_REFRESH_INTERVAL})",
    )
    parser.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS",
        help="keep trying for this long while the server or the metadata service is unavailable "
        "(exit 3 cases), e.g. while the fleet's first master is still coming up (default: 0)",
    )
    master = parser.add_argument_group("masters", "where puppetserver's files go (--role master only)")
    master.add_argument(
        "--puppetserver-confdir", type=Path,
        help=f"puppetserver's conf.d and services.d are here (default: {PUPPETSERVER_CONFDIR_NAME}/ "
        "beside --puppet-conf, Debian's /etc/puppet/puppetserver)",
    )  # fmt: skip
    master.add_argument("--enc-script", help=f"the ENC puppetserver runs (default: {DEFAULT_ENC_SCRIPT})")
    master.add_argument("--enc-socket", help="the ENC's socket (default: the script's own default)")
    master.add_argument(
        "--listen-address", help="puppetserver's private listening address (default: the private IP)"
    )
    master.add_argument("--listen-port", type=int, help=f"puppetserver's port (default: {MASTER_PORT})")
    return parser


_MASTER_ONLY = ("puppetserver_confdir", "enc_script", "enc_socket", "listen_address", "listen_port")


def parse_options(argv: Sequence[str]) -> Options:
    """The command line as :class:`Options`; :class:`LocalError` for anything wrong with it."""
    args = _parser().parse_args(list(argv))
    try:
        server = parse_server_url(args.server)
        pin = parse_pin(args.ca_fingerprint)
        imds = urlsplit(args.imds_url)
        if imds.scheme != "http" or not imds.hostname or imds.path not in ("", "/"):
            raise ValueError(f"--imds-url must be http://HOST[:PORT], not {args.imds_url!r}")
        if args.certname is not None and (problem := certname_problem(args.certname)) is not None:
            raise ValueError(f"--certname: {problem}")
        if args.conf_section is not None and not re.fullmatch(r"[a-z]+", args.conf_section):
            raise ValueError(f"--conf-section {args.conf_section!r} is not a puppet.conf section")
        alt_names = None
        if args.dns_alt_names is not None:
            if args.role == "agent":
                raise ValueError("--dns-alt-names is for masters and lb nodes; agents get none")
            alt_names = tuple(n.strip() for n in args.dns_alt_names.split(",") if n.strip())
            for name in alt_names:
                parse_san(name)
        if not 0 < args.timeout <= 3600:
            raise ValueError("--timeout must be between 0 and 3600 seconds")
        if not 0 <= args.wait <= 86400:
            raise ValueError("--wait must be between 0 and 86400 seconds")
        if not re.fullmatch(r"[1-9][0-9]{0,8}[smhdy]?", args.crl_refresh_interval):
            raise ValueError(
                f"--crl-refresh-interval must be a Puppet duration (30m, 1h, 3600), "
                f"not {args.crl_refresh_interval!r}"
            )
        given = [name for name in _MASTER_ONLY if getattr(args, name) is not None]
        if given and args.role != "master":
            raise ValueError(f"--{given[0].replace('_', '-')} is for masters only")
        if args.enc_script is not None and not args.enc_script.startswith("/"):
            raise ValueError("--enc-script must be an absolute path")
        if args.listen_address is not None and not _is_ip(args.listen_address):
            raise ValueError(f"--listen-address must be an IP address, not {args.listen_address!r}")
        if args.listen_port is not None and not 0 < args.listen_port < 65536:
            raise ValueError(f"--listen-port {args.listen_port} is not a TCP port")
    except ValueError as e:
        raise LocalError(str(e)) from None
    return Options(
        role=args.role,
        server=server,
        ca_fingerprint=pin,
        imds_url=args.imds_url.rstrip("/"),
        ssldir=args.ssldir,
        puppet_conf=args.puppet_conf,
        conf_section=args.conf_section,
        key_type=KeyType(args.key_type),
        certname=args.certname,
        dns_alt_names=alt_names,
        timeout=args.timeout,
        force=args.force,
        puppetserver_confdir=args.puppetserver_confdir,
        enc_script=args.enc_script or DEFAULT_ENC_SCRIPT,
        enc_socket=args.enc_socket or "",
        listen_address=args.listen_address,
        listen_port=args.listen_port or MASTER_PORT,
        wait=args.wait,
        crl_refresh_interval=args.crl_refresh_interval,
    )


# -- the metadata service ------------------------------------------------------------------------


@frozen
class InstanceIdentity:
    #: The exact bytes the metadata service served: the server verifies the signature over them.
    document: bytes
    signature: str
    instance_id: str
    #: The private DNS name (``local-hostname``), read for masters and lb nodes only.
    private_dns: str | None = None
    #: The document's ``privateIp`` (where a master's puppetserver listens by default).
    private_ip: str | None = None


class MetadataService:
    """IMDSv2: a session token from ``PUT /latest/api/token``, then GETs that present it."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.hostname is None:
            raise LocalError(f"bad metadata service address {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout = timeout

    def _request(
        self, method: str, path: str, headers: Mapping[str, str], missing_ok: bool = False
    ) -> bytes | None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request(method, path, headers=dict(headers))
            response = connection.getresponse()
            body = _read_limited(response)
        except (OSError, http.client.HTTPException) as e:
            raise Unavailable(
                f"the metadata service at {self.url} is not answering ({_describe(e)})"
            ) from None
        finally:
            connection.close()
        if response.status == 200:
            return body
        if response.status == 404 and missing_ok:
            return None
        if response.status >= 500:
            raise Unavailable(f"the metadata service answered {method} {path} with {response.status}")
        raise LocalError(f"the metadata service answered {method} {path} with {response.status}")

    def token(self) -> str:
        token = self._request(
            "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": str(IMDS_TOKEN_TTL)}
        )
        return (token or b"").decode("ascii", "replace").strip()

    def get(self, path: str, token: str) -> bytes:
        return self._request("GET", path, {"X-aws-ec2-metadata-token": token}) or b""

    def get_optional(self, path: str, token: str) -> bytes | None:
        """Like :meth:`get`, but ``None`` when the service has no such path (404)."""
        return self._request("GET", path, {"X-aws-ec2-metadata-token": token}, missing_ok=True)


def read_identity(imds: MetadataService, *, with_private_dns: bool) -> InstanceIdentity:
    token = imds.token()
    document = imds.get("/latest/dynamic/instance-identity/document", token)
    signature = imds.get("/latest/dynamic/instance-identity/rsa2048", token)
    try:
        fields = json.loads(document)
        instance_id = fields["instanceId"]
        private_ip = fields.get("privateIp")
        signature_text = signature.decode("ascii")
    except (ValueError, KeyError, TypeError) as e:
        raise LocalError(
            f"the metadata service served an unreadable identity document ({_describe(e)})"
        ) from None
    if not isinstance(instance_id, str) or not instance_id:
        raise LocalError("the identity document has no instanceId")
    private_dns = None
    if with_private_dns:
        # Optional: without it the CSR asks only for the other names.
        hostname = imds.get_optional("/latest/meta-data/local-hostname", token) or b""
        private_dns = hostname.decode("ascii", "replace").strip()
    if not isinstance(private_ip, str) or not _is_ip(private_ip):
        private_ip = None
    return InstanceIdentity(document, signature_text, instance_id, private_dns or None, private_ip)


# -- key and CSR ---------------------------------------------------------------------------------


def requested_alt_names(options: Options, identity: InstanceIdentity) -> tuple[str, ...]:
    """The SANs to ask for: none for agents; the private DNS name and front host otherwise."""
    if options.role == "agent":
        return ()
    if options.dns_alt_names is not None:
        return options.dns_alt_names
    names = [identity.private_dns] if identity.private_dns else []
    if not _is_ip(options.server.host):
        names.append(options.server.host)
    return tuple(dict.fromkeys(n.lower() for n in names))


def make_csr(key: PrivateKey, certname: str, alt_names: Sequence[str]) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, certname)])
    )
    if alt_names:
        names = [parse_san(n) for n in (certname, *alt_names)]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256())


# -- pinning and the server ----------------------------------------------------------------------


def pinned_root(bundle: bytes, pin: str) -> x509.Certificate:
    """The self-signed certificate of ``bundle`` whose fingerprint is ``pin``; :class:`Untrusted` if none."""
    try:
        certificates = x509.load_pem_x509_certificates(bundle)
    except ValueError:
        raise Untrusted("the server's CA bundle (GET /v1/ca) holds no readable certificate") from None
    for certificate in certificates:
        if fingerprint(certificate) == pin and _self_signed(certificate):
            return certificate
    raise Untrusted(f"the server's CA bundle has no root CA with fingerprint {pin}; refusing to trust it")


def _self_signed(certificate: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def exit_code_for_status(status: int) -> int:
    """What a non-200 answer means for whoever runs us (retry on 3, give up on 2)."""
    if 400 <= status < 500:
        return EXIT_REFUSED
    return EXIT_UNAVAILABLE


def refusal_line(status: int, body: bytes) -> str:
    """One line from a refusal: the server's ``error: message``, or its status."""
    try:
        answer = json.loads(body)
        text = f"{answer['error']}: {answer['message']}"
    except (ValueError, KeyError, TypeError):
        text = f"HTTP {status}"
    # Never let a server paint the terminal or span lines.
    return "".join(c if c.isprintable() else " " for c in text)[:500]


#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = (62, 64)


class EnrollmentServer:
    """The enrollment API at one address, trusted only through the pinned root."""

    def __init__(self, address: ServerAddress, timeout: float) -> None:
        self.address = address
        self.timeout = timeout

    def _exchange(
        self,
        context: ssl.SSLContext,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        connection = http.client.HTTPSConnection(
            self.address.host, self.address.port, timeout=self.timeout, context=context
        )
        try:
            connection.request(method, path, body=body, headers=dict(headers or {}))
            response = connection.getresponse()
            return response.status, _read_limited(response)
        except ssl.SSLCertVerificationError as e:
            hint = ""
            if e.verify_code in _NAME_MISMATCH:
                # The usual cause is the server's configuration, not an attack: say where to look.
                hint = (f"; its certificate does not name {self.address.host}: the server's "
                        "[enroll] server_names must list it")
            raise Untrusted(
                f"the server at {self.address} is not verified by the pinned root CA ({e.verify_message})"
                + hint
            ) from None
        except (OSError, http.client.HTTPException) as e:
            raise Unavailable(
                f"cannot reach the enrollment server at {self.address} ({_describe(e)})"
            ) from None
        finally:
            connection.close()

    def ca_bundle(self) -> bytes:
        """``GET /v1/ca`` without verification: its content is trusted only by the pin."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        status, body = self._exchange(context, "GET", "/v1/ca")
        if status != 200:
            raise _refusal("GET /v1/ca", status, body)
        return body

    def enroll(self, root: x509.Certificate, request: Mapping[str, str]) -> Mapping[str, Any]:
        """``POST /v1/enroll``, verifying the server (and its name) against ``root`` alone."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(cadata=root.public_bytes(serialization.Encoding.PEM).decode("ascii"))
        status, body = self._exchange(
            context,
            "POST",
            "/v1/enroll",
            json.dumps(request).encode("utf-8"),
            {"Content-Type": "application/json", "Accept": "application/json"},
        )
        if status != 200:
            raise _refusal("enrollment", status, body)
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise Untrusted("the server's answer to the enrollment is not a JSON object")
        return answer


def _refusal(what: str, status: int, body: bytes) -> EnrollError:
    line = f"{what} refused: {refusal_line(status, body)}"
    return Refused(line) if exit_code_for_status(status) == EXIT_REFUSED else Unavailable(line)


def _read_limited(response: http.client.HTTPResponse) -> bytes:
    body = response.read(MAX_ANSWER + 1)
    if len(body) > MAX_ANSWER:
        raise http.client.HTTPException(f"answer larger than {MAX_ANSWER} bytes")
    return body


def _describe(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    text = str(e) or type(e).__name__
    return " ".join(text.split())


# -- checking the answer -------------------------------------------------------------------------


@frozen
class Enrollment:
    """An enrollment answer that checked out, ready to be written."""

    certname: str
    role: str
    certificate: x509.Certificate
    ca_chain: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...] = field(repr=False)
    server: ServerAddress
    test_server: ServerAddress
    master_ca: x509.Certificate | None = None
    #: Masters: the CA of the lb nodes, the only clients their puppetserver accepts, and its CRL.
    lb_ca: x509.Certificate | None = None
    lb_crl: x509.CertificateRevocationList | None = field(default=None, repr=False)


#: The extended key usage each role's certificate must carry, as docs/api.md promises.
REQUIRED_USAGE = {
    "agent": ExtendedKeyUsageOID.CLIENT_AUTH,
    "master": ExtendedKeyUsageOID.SERVER_AUTH,
    "lb": ExtendedKeyUsageOID.SERVER_AUTH,
}


_USAGE_NAMES = {ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth", ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth"}


def check_enrollment(
    answer: Mapping[str, Any],
    *,
    role: str,
    certname: str,
    key: PrivateKey,
    root: x509.Certificate,
    now: datetime,
) -> Enrollment:
    """
    The answer as an :class:`Enrollment` if it is what we asked for: our certname, a certificate
    for our key that chains to the pinned ``root`` through ``ca_chain``, a CRL from every CA of the
    chain, usable addresses.  :class:`Untrusted` naming the first thing wrong otherwise.
    """

    def text(name: str) -> str:
        value = answer.get(name)
        if not isinstance(value, str) or not value:
            raise Untrusted(f"the server's answer has no {name}")
        return value

    def certificates(name: str) -> list[x509.Certificate]:
        try:
            return x509.load_pem_x509_certificates(text(name).encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise Untrusted(f"the server's {name} is not PEM certificates") from None

    if text("certname") != certname:
        raise Untrusted(f"the server issued for {answer['certname']!r}, not our certname {certname!r}")
    issued = certificates("certificate")
    if len(issued) != 1:
        raise Untrusted("the server's certificate is not exactly one PEM certificate")
    certificate = issued[0]
    chain = certificates("ca_chain")
    if chain[-1] != root:
        raise Untrusted("the server's ca_chain does not end with the pinned root CA")
    if not same_public_key(certificate.public_key(), key.public_key()):  # type: ignore[arg-type]
        raise Untrusted("the issued certificate is not for our key")
    subject = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in subject] != [certname]:
        raise Untrusted(f"the issued certificate's subject is not CN={certname}")
    _verify_chain(certificate, chain, root, role, now)
    crls = _check_crls(text("crl_chain"), chain, now)
    try:
        server = parse_host_port(text("server"))
        test_server = parse_host_port(text("test_server") if "test_server" in answer else text("server"))
    except ValueError as e:
        raise Untrusted(f"the server's answer has a bad address: {e}") from None
    master_ca = None
    if role == "master":
        own = certificates("ca_certificate")
        if len(own) != 1 or own[0] != chain[0] or own[0].subject != certificate.issuer:
            raise Untrusted("the server's ca_certificate is not the CA that issued this master's certificate")
        master_ca = own[0]
        lb_ca, lb_crl = _check_lb_ca(certificates("lb_ca_chain"), text("lb_crl"), root, now)
        return Enrollment(
            certname, role, certificate, tuple(chain), crls, server, test_server, master_ca, lb_ca, lb_crl
        )
    return Enrollment(certname, role, certificate, tuple(chain), crls, server, test_server, master_ca)


def _check_lb_ca(
    chain: Sequence[x509.Certificate], crl_pem: str, root: x509.Certificate, now: datetime
) -> tuple[x509.Certificate, x509.CertificateRevocationList]:
    """The lb CA of a master's answer: a CA issued by the pinned root itself, with its CRL."""
    if len(chain) != 2 or chain[-1] != root:
        raise Untrusted("the server's lb_ca_chain is not the lb CA and the pinned root CA")
    lb_ca = chain[0]
    try:
        lb_ca.verify_directly_issued_by(root)
        constraints = lb_ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        raise Untrusted("the server's lb CA is not issued by the pinned root CA") from None
    if not constraints.ca or lb_ca.subject == root.subject:
        raise Untrusted("the server's lb CA is not an intermediate CA")
    if not lb_ca.not_valid_before_utc <= now <= lb_ca.not_valid_after_utc:
        raise Untrusted("the server's lb CA is not valid now")
    crls = _check_crls(crl_pem, [lb_ca], now)
    if len(crls) != 1:
        raise Untrusted("the server's lb_crl is not exactly one CRL")
    return lb_ca, crls[0]


def _verify_chain(
    certificate: x509.Certificate,
    chain: Sequence[x509.Certificate],
    root: x509.Certificate,
    role: str,
    now: datetime,
) -> None:
    # Extended key usage is checked below per role; the chain's CAs get the full WebPKI rules.
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([root]))
        .time(now)
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=verification.ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(certificate, list(chain[:-1]))
    except verification.VerificationError as e:
        raise Untrusted(f"the issued certificate does not verify against the pinned root CA: {e}") from None
    if list(verified.chain[1:]) != list(chain):
        raise Untrusted("the server's ca_chain is not the issued certificate's chain")
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = x509.ExtendedKeyUsage([])
    if REQUIRED_USAGE[role] not in usages:
        raise Untrusted(
            f"the issued certificate lacks the extended key usage {_USAGE_NAMES[REQUIRED_USAGE[role]]} "
            f"that the {role} role needs"
        )


def _check_crls(
    pem: str, chain: Sequence[x509.Certificate], now: datetime
) -> tuple[x509.CertificateRevocationList, ...]:
    # Puppet checks revocation along the whole chain and fails without a CRL for every CA.
    blocks = re.findall(r"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", pem, re.S)
    if not blocks or len(blocks) != pem.count("-----BEGIN"):
        raise Untrusted("the server's crl_chain is not PEM CRLs")
    try:
        crls = tuple(x509.load_pem_x509_crl(b.encode("ascii")) for b in blocks)
    except (ValueError, UnicodeEncodeError):
        raise Untrusted("the server's crl_chain holds an unreadable CRL") from None
    for ca in chain:
        if not any(
            crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
            for crl in crls
        ):
            raise Untrusted(f"the server's crl_chain has no CRL signed by {ca.subject.rfc4514_string()}")
    return crls


# -- writing -------------------------------------------------------------------------------------


def puppet_settings(options: Options, enrollment: Enrollment) -> dict[str, str]:
    return {
        "certname": enrollment.certname,
        "server": enrollment.server.host,
        "serverport": str(enrollment.server.port),
        "ssldir": str(options.ssldir.absolute()),
        # Puppet refreshes its CRLs (and, from 7.28, its CA bundle) from the CA API; the front
        # serves those two paths and nothing else of it (docs/front.md).  Without these the
        # agent keeps the CRLs written here until they expire, and then stops.
        "ca_server": enrollment.server.host,
        "ca_port": str(enrollment.server.port),
        "crl_refresh_interval": options.crl_refresh_interval,
        "ca_refresh_interval": CA_REFRESH_INTERVAL,
    }


def credentials(enrollment: Enrollment, key: PrivateKey) -> PuppetCredentials:
    pem = serialization.Encoding.PEM
    extra = {}
    if enrollment.master_ca is not None:
        extra[MASTER_CA_FILE] = enrollment.master_ca.public_bytes(pem)
    return PuppetCredentials(
        certname=enrollment.certname,
        private_key=private_key_pem(key),
        public_key=key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo),
        certificate=enrollment.certificate.public_bytes(pem),
        ca_chain=b"".join(c.public_bytes(pem) for c in enrollment.ca_chain),
        crl_chain=b"".join(c.public_bytes(pem) for c in enrollment.crls),
        extra_certificates=extra,
    )


def master_layout(options: Options) -> PuppetserverLayout:
    """Debian's puppetserver, with the directories the options name."""
    confdir = options.puppetserver_dir.absolute()
    return attrs.evolve(
        PuppetserverLayout.debian(),
        conf_d=str(confdir / "conf.d"),
        services_d=str(confdir / "services.d"),
        confdir=str(options.puppet_conf.absolute().parent),
        ssldir=str(options.ssldir.absolute()),
    )


def master_material(enrollment: Enrollment, key: PrivateKey) -> MasterMaterial:
    if enrollment.lb_ca is None or enrollment.lb_crl is None:
        raise LocalError("a master's enrollment must carry the lb CA")
    pem = serialization.Encoding.PEM
    return MasterMaterial(
        certname=enrollment.certname,
        certificate_pem=enrollment.certificate.public_bytes(pem).decode("ascii"),
        private_key_pem=private_key_pem(key).decode("ascii"),
        ca_chain_pem=b"".join(c.public_bytes(pem) for c in enrollment.ca_chain).decode("ascii"),
        crl_chain_pem=b"".join(c.public_bytes(pem) for c in enrollment.crls).decode("ascii"),
        lb_ca_pem=enrollment.lb_ca.public_bytes(pem).decode("ascii"),
        lb_crl_pem=enrollment.lb_crl.public_bytes(pem).decode("ascii"),
    )


def install(
    options: Options, enrollment: Enrollment, key: PrivateKey, listen_address: str | None = None
) -> None:
    """
    The ssldir and puppet.conf, and for a master puppetserver's files too: all or nothing.
    ``listen_address``: a master's puppetserver's (``--listen-address`` wins).
    """
    try:
        with Changes() as changes:
            owned = credentials(enrollment, key)
            sections: dict[str, dict[str, str]] = {options.section: puppet_settings(options, enrollment)}
            config: dict[str, str] = {}
            if enrollment.role == "master":
                address = options.listen_address or listen_address
                if not address:
                    raise LocalError("no address for puppetserver; name one with --listen-address")
                layout = master_layout(options)
                material = master_material(enrollment, key)
                settings = MasterSettings(
                    listen_address=address, listen_port=options.listen_port,
                    enc_command=options.enc_script, enc_socket=options.enc_socket,
                )  # fmt: skip
                config = master_config_files(layout, material, settings)
                if options.enc_script == DEFAULT_ENC_SCRIPT:
                    compile_script()  # the default command runs the script's bytecode
                owned = attrs.evolve(owned, extra_files={
                    Path(layout.lb_ca).name: material.lb_ca_pem.encode("ascii"),
                    Path(layout.lb_crl).name: material.lb_crl_pem.encode("ascii"),
                })  # fmt: skip
                sections.setdefault("server", {}).update(server_settings(settings))
            write_ssldir(changes, options.ssldir, owned, force=options.force)
            for path, text in sorted(config.items()):
                changes.stage_file(Path(path), text.encode("utf-8"), PUBLIC_FILE_MODE)
            write_puppet_conf_sections(changes, options.puppet_conf, sections)
            changes.commit()
    except AlreadyEnrolled as e:
        raise LocalError(str(e)) from None
    except OSError as e:
        raise WriteFailed(f"cannot write the puppet files: {_describe(e)}") from None
    except ValueError as e:
        raise LocalError(f"cannot write the puppet files: {_describe(e)}") from None


# -- the whole run -------------------------------------------------------------------------------


def enroll(
    options: Options,
    *,
    imds: MetadataService,
    server: EnrollmentServer,
    now: Callable[[], datetime],
    key: PrivateKey | None = None,
) -> Enrollment:
    """
    One attempt.  ``key``: the private key to ask with; a retry passes the same one, so the
    server resumes its claim or answers again with the certificate it issued for that key.
    """
    identity = read_identity(imds, with_private_dns=options.role != "agent")
    certname = options.certname or identity.instance_id
    if (problem := certname_problem(certname)) is not None:
        raise LocalError(f"{problem}; name one with --certname")
    # Before asking: the server grants one enrollment per instance and role.
    if not options.force:
        try:
            check_not_enrolled(options.ssldir, certname)
        except AlreadyEnrolled as e:
            raise LocalError(str(e)) from None
    try:
        alt_names = requested_alt_names(options, identity)
        for name in alt_names:
            parse_san(name)
    except ValueError as e:
        raise LocalError(f"cannot ask for that name: {e}; name others with --dns-alt-names") from None
    root = pinned_root(server.ca_bundle(), options.ca_fingerprint)
    key = key or options.key_type.generate()
    csr = make_csr(key, certname, alt_names)
    answer = server.enroll(
        root,
        {
            "role": options.role,
            "document": _document_text(identity.document),
            "signature": identity.signature,
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        },
    )
    enrollment = check_enrollment(answer, role=options.role, certname=certname, key=key, root=root, now=now())
    install(options, enrollment, key, listen_address=identity.private_ip)
    return enrollment


def _document_text(document: bytes) -> str:
    try:
        return document.decode("utf-8")
    except UnicodeDecodeError:
        raise LocalError("the identity document is not UTF-8") from None


def summary(options: Options, enrollment: Enrollment) -> str:
    test = enrollment.test_server
    first_run = f"puppet agent --test --server {test.host} --serverport {test.port}"
    alt = ", ".join(
        san_text(n) for n in _sans(enrollment.certificate) if san_text(n) != f"DNS:{enrollment.certname}"
    )
    return (
        f"enrolled {enrollment.certname} as {enrollment.role}"
        + (f" ({alt})" if alt else "")
        + f": ssldir {options.ssldir}, puppet.conf {options.puppet_conf} [{options.section}], "
        + (f"puppetserver {options.puppetserver_dir}, " if enrollment.role == "master" else "")
        + f"server {enrollment.server}; first run: {first_run}"
    )


def _sans(certificate: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def run(
    argv: Sequence[str],
    *,
    stdout: TextIO,
    stderr: TextIO,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> int:
    """The command, without touching the process: returns the exit code."""
    try:
        options = parse_options(argv)
        deadline = monotonic() + options.wait
        pause = FIRST_PAUSE
        # One key for every try: a lost answer or an enrollment still in progress on the server
        # (503 in-progress) is picked up again with it, never refused as another enrollment.
        key = options.key_type.generate()
        while True:
            try:
                enrollment = enroll(
                    options,
                    imds=MetadataService(options.imds_url, options.timeout),
                    server=EnrollmentServer(options.server, options.timeout),
                    now=now,
                    key=key,
                )
                break
            except (Unavailable, WriteFailed) as e:
                # Only what may pass: a refusal or an untrusted server never gets better.
                if monotonic() + pause > deadline:
                    raise
                print(f"puppetha-enroll: {e.message}; trying again in {pause:.0f}s", file=stderr)
                sleep(pause)
                pause = min(pause * 2, LONGEST_PAUSE)
    except EnrollError as e:
        print(f"puppetha-enroll: {e.message}", file=stderr)
        return e.exit_code
    print(summary(options, enrollment), file=stdout)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> NoReturn:
    sys.exit(run(sys.argv[1:] if argv is None else argv, stdout=sys.stdout, stderr=sys.stderr))


if __name__ == "__main__":
    main()
