"""
``puppetha-enroll``'s command line, checked completely before anything is asked or written.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

from attrs import frozen

from puppetha.instance.failures import LocalError
from puppetha.instance.puppetserver import MASTER_PORT, MasterSettings
from puppetha.pki.keys import KeyType
from puppetha.pki.names import certname_problem, parse_san

ROLES = ("agent", "master", "lb")
DEFAULT_IMDS_URL = "http://169.254.169.254"
#: Debian's puppet agent defaults (``puppet config print ssldir config``).
DEFAULT_SSLDIR = Path("/var/lib/puppet/ssl")
DEFAULT_PUPPET_CONF = Path("/etc/puppet/puppet.conf")
DEFAULT_TIMEOUT = 30.0
#: Debian's puppetserver keeps ``conf.d/`` and ``services.d/`` here, beside puppet.conf.
PUPPETSERVER_CONFDIR_NAME = "puppetserver"
#: The ENC script puppetserver runs for each node (``external_nodes``).
DEFAULT_ENC_SCRIPT = MasterSettings(listen_address="").enc_command


_PIN = re.compile(r"sha256:([0-9a-f]{64})")


@frozen
class ServerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


#: Puppet's default ``runinterval``: an agent run fetches the CRLs at most this often, and an lb
#: node revoked is distrusted by agents within it.
DEFAULT_CRL_REFRESH_INTERVAL = "30m"


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
    if not (is_ip(host) if ":" in host else _is_name(host)):
        raise ValueError(f"{text!r} is not host:port")
    return ServerAddress(host, int(port))


def _is_name(text: str) -> bool:
    try:
        parse_san(text)
    except ValueError:
        return False
    return True


def is_ip(text: str) -> bool:
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
        if args.listen_address is not None and not is_ip(args.listen_address):
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
