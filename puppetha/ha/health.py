"""
Master health, as the lb nodes see it: each round probes every registered master's
puppetserver status API (``GET /status/v1/simple`` over TLS, with the lb node's certificate, the
only kind the masters accept) and moves ``MasterRecord.healthy`` with compare-and-set once
:func:`next_health` says so.  Unhealthy masters leave nginx's upstream and the enrollment
service's choice of signing CA; they come back after enough good probes.

Every lb node probes and writes: a master they all see down goes down once (the others' writes
find it already down); a master only one lb node cannot reach flaps at most once per rise/fall
window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from attrs import frozen
from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity.cryptography import verify_certificate_hostname
from treq import collect
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from puppetha.ha.front import RunsBlocking
from puppetha.repeat import Repeating, RepeatingService
from puppetha.store import IStore, VersionConflict
from puppetha.store.records import CARecord, CRLRecord, MasterRecord, Records, Versioned

log = Logger()


@frozen
class Health:
    """One master's health and the run of probe results that has not changed it yet."""

    healthy: bool
    successes: int = 0
    failures: int = 0


def next_health(current: Health, ok: bool, fall: int = 3, rise: int = 2) -> Health:
    """
    ``fall`` failures in a row take a healthy master down; ``rise`` successes in a row bring
    an unhealthy one back.  A result of the other kind resets the run.
    """
    if ok:
        successes = current.successes + 1
        if not current.healthy and successes >= rise:
            return Health(True)
        return Health(current.healthy, successes=successes if not current.healthy else 0)
    failures = current.failures + 1
    if current.healthy and failures >= fall:
        return Health(False)
    return Health(current.healthy, failures=failures if current.healthy else 0)


@frozen
class ProbeCredentials:
    """What a probe presents and trusts, read from files on the pool."""

    certificate_pem: bytes
    private_key_pem: bytes
    ca_pems: tuple[bytes, ...]
    #: Every CA's CRL: a master whose certificate is revoked is down, as nginx would refuse it.
    crl_pems: tuple[bytes, ...] = ()


@implementer(IOpenSSLClientConnectionCreator)
class _MasterTLS:
    """
    TLS towards one master: its chain checked against puppetha's CAs and its certificate for
    its certname, whatever address it was reached at.  Not ``optionsForClientTLS``: that runs
    the name through IDNA, which refuses the ``_`` Puppet allows in certnames.
    """

    def __init__(self, certname: str, options: ssl.CertificateOptions) -> None:
        self.certname = certname
        self.context = options.getContext()

    def clientConnectionForTLS(self, tls: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tls)
        # The name nginx sends too (proxy_ssl_server_name), so a probe sees what nginx sees.
        connection.set_tlsext_host_name(self.certname.encode("ascii"))
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        return connection

    def _verify(self, connection: SSL.Connection, certificate: Any, error: int, depth: int, ok: int) -> bool:
        if not ok:
            return False
        if depth > 0:
            return True
        try:
            verify_certificate_hostname(certificate.to_cryptography(), self.certname)
        except Exception:  # an exception raised in OpenSSL's callback would be lost
            return False
        return True


def _connection_creator(certname: str, credentials: ProbeCredentials) -> _MasterTLS:
    trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem) for pem in credentials.ca_pems])
    client = ssl.PrivateCertificate.loadPEM(credentials.certificate_pem + b"\n" + credentials.private_key_pem)
    options = ssl.CertificateOptions(
        privateKey=client.privateKey.original, certificate=client.original, trustRoot=trust
    )
    creator = _MasterTLS(certname, options)
    store = creator.context.get_cert_store()
    if credentials.crl_pems and store is not None:
        for pem in credentials.crl_pems:
            store.add_crl(x509.load_pem_x509_crl(pem))
        # Every CA of the master's chain, as nginx checks it (ssl_crl with every CA's CRL).
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL)
    return creator


@implementer(IStreamClientEndpoint)
class _MasterEndpoint:
    """TLS over TCP to one master, on the injected reactor (TLS write batching included)."""

    def __init__(self, reactor: Any, address: str, port: int, creator: Any, timeout: float) -> None:
        self.reactor = reactor
        self.address = address
        self.port = port
        self.creator = creator
        self.timeout = timeout

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        # Every probe is a new connection; the HTTP client's "Starting factory" twice a probe
        # would drown the log.
        if isinstance(factory, Factory):
            factory.noisy = False
        tls = TLSMemoryBIOFactory(self.creator, True, factory, clock=self.reactor)
        tcp = HostnameEndpoint(self.reactor, self.address.encode("ascii"), self.port, timeout=self.timeout)
        d: Deferred[Any] = tcp.connect(tls)
        return d.addCallback(lambda protocol: protocol.wrappedProtocol)


@implementer(IAgentEndpointFactory)
class _ToMaster:
    def __init__(self, endpoint: _MasterEndpoint) -> None:
        self.endpoint = endpoint

    def endpointForURI(self, uri: Any) -> _MasterEndpoint:
        return self.endpoint


class StatusProbe:
    """
    Asks one master's puppetserver whether it is running.  ``master_name`` is the name nginx
    checks in every master's certificate (``proxy_ssl_name``, ``[lb] master_name``): a master
    whose certificate lacks it gets 502 from nginx, so the probe must find it down too.
    Without it the probe checks the master's certname.
    """

    def __init__(self, reactor: Any, timeout: float = 5.0, master_name: str | None = None) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.master_name = master_name

    def __call__(self, master: MasterRecord, credentials: ProbeCredentials) -> Deferred[bool]:
        d = self.fetch(master, credentials, "/status/v1/simple", limit=STATUS_BODY_LIMIT)

        def failed(failure: Failure) -> bool:
            log.debug("probe of {certname} failed: {error}", certname=master.certname, error=failure.value)
            return False

        return d.addCallbacks(lambda answer: answer[0] == 200, failed)

    def fetch(
        self, master: MasterRecord, credentials: ProbeCredentials, path: str, limit: int
    ) -> Deferred[tuple[int, bytes]]:
        """
        ``GET path`` from one master, as the health probe asks: fires with the status and the
        body (at most ``limit`` bytes, or :class:`BodyTooLong`), within the probe's deadline.
        """
        endpoint = _MasterEndpoint(
            self.reactor,
            master.address,
            master.port,
            _connection_creator(self.master_name or master.certname, credentials),
            self.timeout,
        )
        # One connection a probe, never kept: a master that restarts is probed afresh.
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        http = HTTPClient(Agent.usingEndpointFactory(self.reactor, _ToMaster(endpoint), pool=pool))
        # The endpoint decides where to connect; the URL only names the resource, and the Host
        # header names the master as the TLS server name does (in a header, since a certname's
        # '_' is no URL host to treq): puppetserver's Jetty answers 400 to a Host that is not in
        # the certificate it chose by that name, and nginx asks the same way.
        # The deadline is ours, on the injected reactor (treq's ``timeout=`` uses the global one).
        host = f"{self.master_name or master.certname}:{master.port}".encode("ascii")
        d: Deferred[Any] = http.get(
            f"https://master{path}", headers=Headers({b"Host": [host]}), unbuffered=True
        )

        def read(response: Any) -> Deferred[tuple[int, bytes]]:
            # The body is read within the same deadline, so the connection ends.
            body = _Body(limit)
            return collect(response, body.add).addCallback(lambda _: (response.code, body.data()))

        d.addCallback(read)
        timer = self.reactor.callLater(self.timeout, d.cancel)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)


#: What a ``/status/v1/simple`` answer may hold (``running``, or a few words more).
STATUS_BODY_LIMIT = 4096


class BodyTooLong(Exception):
    """A master's answer was longer than its reader allows."""


class _Body:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            # Raised in treq's collector: the response's transport is stopped, the Deferred fails.
            raise BodyTooLong(f"more than {self.limit} bytes")
        self.parts.append(data)

    def data(self) -> bytes:
        return b"".join(self.parts)


Probe = Callable[[MasterRecord, ProbeCredentials], Deferred[bool]]
#: Masters whose flag a round wants to write: certname -> (record as read, new flag).
Writes = Mapping[str, tuple[Versioned[MasterRecord], bool]]
Discovered = tuple[list[Versioned[MasterRecord]], ProbeCredentials]


def read_credentials(certificate: str, private_key: str, store: IStore) -> ProbeCredentials:
    """Blocking: the lb node's certificate and key, and every CA a master's chain may use."""
    return ProbeCredentials(
        certificate_pem=Path(certificate).read_bytes(),
        private_key_pem=Path(private_key).read_bytes(),
        ca_pems=tuple(v.record.certificate_pem.encode("ascii") for v in Records(store).list(CARecord)),
        crl_pems=tuple(v.record.crl_pem.encode("ascii") for v in Records(store).list(CRLRecord)),
    )


def set_health(store: IStore, found: Versioned[MasterRecord], healthy: bool) -> bool:
    """Blocking compare-and-set of one master's flag; False when another writer got there first."""
    try:
        Records(store).replace(attrs.evolve(found.record, healthy=healthy), found.version)
    except VersionConflict:
        return False
    return True


class HealthService(RepeatingService):
    """Probes every ``interval`` seconds; calls ``on_change`` after it changed any master."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        blocking: RunsBlocking,
        store: IStore,
        probe: Probe,
        certificate: str,
        private_key: str,
        interval: float = 5.0,
        fall: int = 3,
        rise: int = 2,
        on_change: Callable[[], object] = lambda: None,
    ) -> None:
        self.clock = clock
        self.blocking = blocking
        self.store = store
        self.probe = probe
        self.certificate = certificate
        self.private_key = private_key
        self.interval = interval
        self.fall = fall
        self.rise = rise
        self.on_change = on_change
        self.health: dict[str, Health] = {}
        self._repeating = Repeating(self.round, clock, interval)

    def round(self) -> Deferred[list[str]]:
        """One probe of every master; fires with the certnames whose flag this round changed."""
        d = self.blocking.call(self._discover)
        d.addCallback(self._probe_all)
        d.addErrback(self._failed)
        return d

    def _discover(self) -> Discovered:
        return Records(self.store).list(MasterRecord), read_credentials(
            self.certificate, self.private_key, self.store
        )

    def _probe_all(self, found: Discovered) -> Deferred[list[str]]:
        masters, credentials = found
        known = {m.record.certname for m in masters}
        for gone in set(self.health) - known:
            del self.health[gone]
        probes = [self._probe_one(m.record, credentials) for m in masters]
        d: Deferred[Any] = DeferredList(probes, consumeErrors=True)
        d.addCallback(lambda results: self._decide(masters, [ok and bool(r) for ok, r in results]))
        return d

    def _probe_one(self, master: MasterRecord, credentials: ProbeCredentials) -> Deferred[bool]:
        # A probe that cannot even start fails its own master, never the whole round.
        d: Deferred[bool] = maybeDeferred(self.probe, master, credentials)

        def failed(failure: Failure) -> bool:
            log.warn("cannot probe master {certname}: {error}", certname=master.certname, error=failure.value)
            return False

        return d.addErrback(failed)

    def _decide(
        self, masters: Sequence[Versioned[MasterRecord]], results: Sequence[bool]
    ) -> Deferred[list[str]]:
        to_write: dict[str, tuple[Versioned[MasterRecord], bool]] = {}
        for found, ok in zip(masters, results, strict=True):
            record = found.record
            current = self.health.get(record.certname, Health(record.healthy))
            if current.healthy != record.healthy:
                # Another lb node moved the flag: start again from the store's view.
                current = Health(record.healthy)
            new = next_health(current, ok, self.fall, self.rise)
            self.health[record.certname] = new
            if new.healthy != record.healthy:
                to_write[record.certname] = (found, new.healthy)
        if not to_write:
            return Deferred.fromCoroutine(_nothing())
        d = self.blocking.call(self._write, to_write)
        d.addCallback(self._written, to_write)
        return d

    def _write(self, to_write: Writes) -> list[str]:
        return [name for name, (found, up) in sorted(to_write.items()) if set_health(self.store, found, up)]

    def _written(self, changed: list[str], to_write: Writes) -> list[str]:
        for name in changed:
            if to_write[name][1]:
                log.info("master {certname} is healthy again", certname=name)
            else:
                log.warn("master {certname} is down: out of the front and of enrollment", certname=name)
        if changed:
            self.on_change()
        return changed

    def _failed(self, failure: Failure) -> list[str]:
        log.failure("health round failed", failure)
        return []


async def _nothing() -> list[str]:
    return []
