"""
The enrollment listener: TLS with the enrollment server's own certificate, and behind the nginx
nodes the PROXY protocol *outside* TLS (nginx's stream proxy sends the header in clear before
the ClientHello).

The PROXY wrapper believes whoever sends a header, so with ``proxy_from`` set the listening
factory refuses every TCP peer that is not a configured proxy, in ``buildProtocol`` where the
real peer address is still known, before a byte is read::

    TCP endpoint  ->  TrustedPeersFactory  ->  PROXY wrapper  ->  TLS  ->  HTTP site

Without ``proxy_from`` it is plain TLS and the source address is the TCP peer.

The server certificate is issued by the root CA for ``[enroll] server_names`` and sent with the
root, so a new instance can pin the root by fingerprint.  :func:`ensure_server_credentials`
issues it at start-up, or renews it when it is near its end, names other hosts, or was issued by
another root.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.address import IPv4Address as TwistedIPv4Address
from twisted.internet.address import IPv6Address as TwistedIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorCore,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface import implementer

from puppetha.enroll.proxyheader import ProxyHeader, ProxyHeaderError, may_be_proxy_header, parse_proxy_header
from puppetha.pki.authority import ROOT, CertificateAuthority
from puppetha.pki.certs import Usage, fingerprint
from puppetha.pki.keys import KeyType, load_private_key, private_key_pem, same_public_key
from puppetha.pki.names import certname_problem, parse_san, san_text
from puppetha.services import ConnectionCapEndpoint, OpenedListener

log = Logger()

SERVER_KEY_FILE = "enroll-server.key"
SERVER_CERT_FILE = "enroll-server.pem"

#: Common name when no server name is a usable certname.
DEFAULT_SERVER_CN = "puppetha-enroll"

#: A server certificate closer than this to its end is renewed at start-up.
DEFAULT_RENEW_BEFORE = timedelta(days=30)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@implementer(IProtocolFactory)
class TrustedPeersFactory:
    """Builds a protocol only for connections from ``allowed`` addresses; drops the others."""

    def __init__(self, wrapped: IProtocolFactory, allowed: Iterable[str],
                 warn: Callable[..., None] | None = None) -> None:
        self.wrapped = wrapped
        self.allowed = frozenset(_ip(a) for a in allowed)
        self._warn = warn or log.warn

    def trusts(self, peer: IAddress) -> bool:
        host = getattr(peer, "host", None)
        if not isinstance(host, str):
            return False
        try:
            return _ip(host) in self.allowed
        except ValueError:
            return False

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        if not self.trusts(addr):
            self._warn("refused a connection from {peer}: not a configured proxy", peer=str(addr))
            return None
        return self.wrapped.buildProtocol(addr)

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()


@implementer(IStreamServerEndpoint)
class TrustedPeersEndpoint:
    """An endpoint whose connections come only from ``allowed`` peers."""

    def __init__(self, wrapped: IStreamServerEndpoint, allowed: Iterable[str],
                 warn: Callable[..., None] | None = None) -> None:
        self.wrapped = wrapped
        self.allowed = tuple(allowed)
        self.warn = warn

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.wrapped.listen(TrustedPeersFactory(protocolFactory, self.allowed, self.warn))


class RateLimitedWarning:
    """
    A warning logged at most once every ``interval`` seconds on ``clock`` (every time without a
    clock); the next one says how many were held back, so a flood cannot flood the log.
    """

    def __init__(self, clock: IReactorTime | None, interval: float = 10.0) -> None:
        self.clock = clock
        self.interval = interval
        self._next = float("-inf")
        self._held = 0

    def warn(self, message: str, **fields: object) -> None:
        now = self.clock.seconds() if self.clock is not None else float("inf")
        if self.clock is not None and now < self._next:
            self._held += 1
            return
        log.warn(message + " ({held} more like it held back)", held=self._held, **fields)
        self._held = 0
        self._next = now + self.interval


def proxy_source_problem(info: ProxyHeader) -> str | None:
    """
    What makes the addresses of a parsed PROXY header impossible, or None: the parser checks
    the shape (an IPv4 address in ``TCP4``, a port of five digits at most), this what no
    connection can come from (``0.0.0.0``, multicast, port 0 or past 65535).
    """
    if info.source is None:
        return "no source address (UNKNOWN or LOCAL)"
    for role, address in (("source", info.source), ("destination", info.destination)):
        if address is None:
            continue
        if not isinstance(address, TwistedIPv4Address | TwistedIPv6Address):
            return f"the {role} is not an IP address"
        kind = ipaddress.IPv4Address if isinstance(address, TwistedIPv4Address) else ipaddress.IPv6Address
        try:
            ip = kind(address.host)
        except ValueError:
            version = 4 if kind is ipaddress.IPv4Address else 6
            return f"the {role} {address.host!r} is not an IPv{version} address"
        if ip.is_unspecified or ip.is_multicast:
            return f"the {role} {ip} cannot open a connection"
        if not 0 < address.port <= 65535:
            return f"the {role} port {address.port} is impossible"
    return None


class CheckedProxyProtocol(ProtocolWrapper):
    """
    Reads the PROXY header (:mod:`puppetha.enroll.proxyheader`) before anything reaches the
    wrapped protocol, refuses one whose addresses are impossible, and says in the log
    (rate-limited) why a connection was dropped.  After the header, ``getPeer()`` is its source.
    """

    factory: CheckedProxyFactory
    header: ProxyHeader | None = None
    dropped = False
    pending = b""

    def dataReceived(self, data: bytes) -> None:
        if self.header is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.dropped:
            return
        self.pending += data
        try:
            parsed = parse_proxy_header(self.pending)
        except ProxyHeaderError as e:
            self.drop("no PROXY header" if not may_be_proxy_header(self.pending)
                      else f"a malformed PROXY header: {e}")
            return
        if parsed is None:
            return  # the header is not whole yet
        header, remaining = parsed
        problem = proxy_source_problem(header)
        if problem is not None:
            self.drop(f"a malformed PROXY header: {problem}")
            return
        self.header, self.pending = header, b""
        if remaining:
            self.wrappedProtocol.dataReceived(remaining)

    def getPeer(self) -> IAddress:
        if self.header is not None and self.header.source is not None:
            return self.header.source
        peer: IAddress = super().getPeer()
        return peer

    def getHost(self) -> IAddress:
        if self.header is not None and self.header.destination is not None:
            return self.header.destination
        host: IAddress = super().getHost()
        return host

    def drop(self, reason: str) -> None:
        self.dropped = True
        self.pending = b""
        peer = self.transport.getPeer() if self.transport is not None else None
        self.factory.warning.warn("dropped a connection from {peer}: {reason}", peer=str(peer), reason=reason)
        self.loseConnection()


class CheckedProxyFactory(WrappingFactory):
    protocol = CheckedProxyProtocol

    def __init__(self, wrappedFactory: IProtocolFactory, warning: RateLimitedWarning) -> None:
        super().__init__(wrappedFactory)
        self.warning = warning


@implementer(IStreamServerEndpoint)
class CheckedProxyEndpoint:
    """Connections on ``wrapped`` start with a PROXY header whose addresses are possible."""

    def __init__(self, wrapped: IStreamServerEndpoint, warning: RateLimitedWarning) -> None:
        self.wrapped = wrapped
        self.warning = warning

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.wrapped.listen(CheckedProxyFactory(protocolFactory, self.warning))


def enrollment_endpoint(
    transport: IStreamServerEndpoint, proxy_from: Iterable[str] = (), clock: IReactorTime | None = None
) -> IStreamServerEndpoint:
    """
    ``transport`` (a TCP endpoint), with the PROXY protocol accepted only from ``proxy_from``
    when it names any address.  TLS goes inside: :func:`enrollment_factory`.  ``clock``
    rate-limits the warnings for dropped connections.
    """
    proxies = tuple(proxy_from)
    if not proxies:
        return transport
    # One rate limit for every connection this listener drops, whatever the reason.
    warning = RateLimitedWarning(clock)
    return CheckedProxyEndpoint(TrustedPeersEndpoint(transport, proxies, warning.warn), warning)


def enrollment_factory(
    context: ssl.CertificateOptions, site: Site, clock: IReactorTime
) -> TLSMemoryBIOFactory:
    """
    The TLS server factory around the HTTP site.  ``clock`` is the reactor the listener runs
    on: without it TLS schedules its writes on the global reactor, and on any other reactor the
    answers would never leave.
    """
    return TLSMemoryBIOFactory(context, False, site, clock=clock)


def listen_enrollment(
    transport: IStreamServerEndpoint,
    site: Site,
    context: ssl.CertificateOptions,
    proxy_from: Iterable[str] = (),
    *,
    clock: IReactorTime,
) -> Deferred[IListeningPort]:
    """Start listening; the Deferred fires with the :class:`IListeningPort`."""
    return enrollment_endpoint(transport, proxy_from, clock).listen(enrollment_factory(context, site, clock))


class CannotListen(Exception):
    """The listener cannot open: one line naming the endpoint and why."""


def open_enrollment_listener(
    reactor: IReactorCore,
    listen: str,
    site: Site,
    context: ssl.CertificateOptions,
    proxy_from: Iterable[str] = (),
    *,
    max_connections: int | None = None,
) -> OpenedListener:
    """
    The listener for the daemon, already listening: ``listen`` is ``[enroll] listen`` (an
    endpoint description such as ``tcp:8080:interface=10.0.0.5``).  Opened before the daemon
    starts, so that a port in use or an address this host does not have stops the start with
    :class:`CannotListen` instead of leaving a daemon without its listener.  With
    ``max_connections`` a connection past that many open ones is closed at once.
    """
    try:
        transport = serverFromString(reactor, listen)
    except (ValueError, TypeError, KeyError) as e:
        raise CannotListen(f"[enroll] listen: {listen!r}: {e}") from None
    if max_connections is not None:
        full = RateLimitedWarning(reactor)  # type: ignore[arg-type]
        transport = ConnectionCapEndpoint(transport, max_connections, full.warn)
    listening = enrollment_endpoint(transport, proxy_from, reactor).listen(  # type: ignore[arg-type]
        enrollment_factory(context, site, reactor)  # type: ignore[arg-type]
    )
    outcome: list[IListeningPort | Failure] = []
    listening.addBoth(outcome.append)
    # Stream endpoints on a real reactor listen at once; anything else is not ours to wait for.
    if not outcome:
        raise CannotListen(f"[enroll] listen: {listen}: the listener did not open at once")
    if isinstance(outcome[0], Failure):
        error = outcome[0].value
        reason = getattr(getattr(error, "socketError", None), "strerror", None) or str(error)
        raise CannotListen(f"[enroll] listen: cannot listen on {listen}: {reason}")
    return OpenedListener("enroll-listener", outcome[0])


# -- the server's own certificate ------------------------------------------------------------


@frozen
class ServerCredentials:
    """The enrollment server's certificate, its key, and the root that issued it."""

    certificate: x509.Certificate
    key_pem: bytes
    root: x509.Certificate

    @property
    def root_fingerprint(self) -> str:
        return fingerprint(self.root)

    def tls_context(self) -> ssl.CertificateOptions:
        """TLS 1.2 or newer, sending the chain (server certificate, then the root)."""
        # cryptography's own objects: pyOpenSSL deprecates its wrappers and takes these, while
        # Twisted's annotations still name the wrappers.
        return ssl.CertificateOptions(
            privateKey=load_private_key(self.key_pem),  # type: ignore[arg-type]
            certificate=self.certificate,  # type: ignore[arg-type]
            extraCertChain=[self.root],  # type: ignore[list-item]
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )


def _canonical_names(server_names: Iterable[str]) -> list[str]:
    names = []
    for name in server_names:
        text = san_text(parse_san(name))
        if text not in names:
            names.append(text)
    if not names:
        raise ValueError("the enrollment server needs at least one name")
    return names


def server_common_name(server_names: Iterable[str]) -> str:
    """The first server name that is a DNS name and a valid certname, else a fixed name."""
    for text in _canonical_names(server_names):
        kind, _, value = text.partition(":")
        if kind == "DNS" and certname_problem(value) is None:
            return value
    return DEFAULT_SERVER_CN


def _names_of(cert: x509.Certificate) -> set[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {san_text(name) for name in sans}


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    public = issuer.public_key()
    algorithm = cert.signature_hash_algorithm
    if algorithm is None:
        return False
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
        else:
            return False
    except Exception:
        return False
    return True


def _still_good(
    cert: x509.Certificate,
    key_pem: bytes,
    root: x509.Certificate,
    *,
    names: list[str],
    now: datetime,
    renew_before: timedelta,
) -> bool:
    try:
        key = load_private_key(key_pem)
    except ValueError:
        return False
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return False
    return (
        same_public_key(key.public_key(), public)
        and _signed_by(cert, root)
        and cert.not_valid_before_utc <= now
        and cert.not_valid_after_utc - renew_before > now
        and set(names) <= _names_of(cert)
    )


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically, created with ``mode`` (never wider, whatever the umask)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def ensure_server_credentials(
    authority: CertificateAuthority,
    directory: str | os.PathLike[str],
    server_names: Iterable[str],
    key_type: KeyType,
    renew_before: timedelta = DEFAULT_RENEW_BEFORE,
) -> ServerCredentials:
    """
    The enrollment server's credentials from ``directory`` (``enroll-server.key``, mode 0600,
    and ``enroll-server.pem``), issued through ``authority`` by the root first when they are
    missing, near their end, for other names or from another root.  Blocking: run it on the
    pool, or before the reactor starts.
    """
    names = _canonical_names(server_names)
    directory = Path(directory)
    key_path, cert_path = directory / SERVER_KEY_FILE, directory / SERVER_CERT_FILE
    root = authority.certificate(ROOT)
    now = datetime.fromtimestamp(authority.now(), UTC)
    try:
        key_pem = key_path.read_bytes()
        cert = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        pass
    else:
        if key_path.stat().st_mode & 0o077:
            os.chmod(key_path, 0o600)
        if _still_good(cert, key_pem, root, names=names, now=now, renew_before=renew_before):
            return ServerCredentials(cert, key_pem, root)

    common_name = server_common_name(names)
    key = key_type.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    cert = authority.issue(ROOT, csr, common_name=common_name, sans=names, usage=Usage.SERVER)
    key_pem = private_key_pem(key)
    directory.mkdir(parents=True, exist_ok=True)
    _write_private(key_path, key_pem, 0o600)
    chain = cert.public_bytes(serialization.Encoding.PEM) + root.public_bytes(serialization.Encoding.PEM)
    _write_private(cert_path, chain, 0o644)
    log.info(
        "issued the enrollment server certificate for {names}, serial {serial:x}; root {fingerprint}",
        names=names,
        serial=cert.serial_number,
        fingerprint=fingerprint(root),
    )
    return ServerCredentials(cert, key_pem, root)


