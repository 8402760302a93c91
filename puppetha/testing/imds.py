"""
An EC2 instance metadata service (IMDSv2, tokens required) for tests and the local demo.

Each emulated instance gets its own listening port, so a client is pointed at it exactly as at the
real service, with a base URL: ``puppetha-enroll agent --imds-url http://127.0.0.1:PORT``.

On a reactor the caller runs (tests)::

    imds = IMDSEmulator(reactor, clock)
    url = imds.serve(InstanceMetadata(instance_id, document, signature))

From blocking code (the demo), on a private reactor in a thread::

    with IMDSThread() as imds:
        url = imds.serve(InstanceMetadata(instance_id, document, signature))
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

log = Logger()

TOKEN_PATH = b"/latest/api/token"
TTL_HEADER = b"X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = b"X-aws-ec2-metadata-token"
#: The real service's bounds for a token's lifetime, in seconds.
MIN_TTL = 1
MAX_TTL = 21600
#: Tokens kept at once per instance; the oldest are forgotten beyond this.
MAX_TOKENS = 1000


@frozen
class InstanceMetadata:
    """What one instance's metadata service answers."""

    instance_id: str
    #: The identity document, exactly as signed.
    document: bytes
    #: The ``rsa2048`` text: base64 of the PKCS7 signature.
    signature: str
    private_ip: str = ""
    #: The private DNS name (``ip-10-0-0-5.ec2.internal``), served as ``local-hostname``.
    local_hostname: str = ""


class MetadataService(Resource):
    """
    One instance's IMDSv2, rooted at ``/``: ``PUT /latest/api/token`` hands out tokens, and
    every ``GET`` needs a live one in ``X-aws-ec2-metadata-token`` (401 otherwise).
    """

    isLeaf = True

    def __init__(self, metadata: InstanceMetadata, clock: IReactorTime) -> None:
        super().__init__()
        self.metadata = metadata
        self.clock = clock
        self._tokens: dict[str, float] = {}

    def _paths(self) -> dict[bytes, bytes]:
        m = self.metadata
        paths = {
            b"/latest/dynamic/instance-identity/document": m.document,
            b"/latest/dynamic/instance-identity/rsa2048": m.signature.encode("ascii"),
            b"/latest/meta-data/instance-id": m.instance_id.encode("ascii"),
        }
        if m.private_ip:
            paths[b"/latest/meta-data/local-ipv4"] = m.private_ip.encode("ascii")
        if m.local_hostname:
            paths[b"/latest/meta-data/local-hostname"] = m.local_hostname.encode("ascii")
        return paths

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"PUT"):
            request.setHeader(b"Allow", b"GET, PUT")
            return _answer(request, 405, b"Method Not Allowed")
        body: bytes = super().render(request)
        return body

    def render_PUT(self, request: Request) -> bytes:
        if request.path != TOKEN_PATH:
            return _answer(request, 404, b"Not Found")
        # Like AWS: a request that went through a proxy does not get a token.
        if request.getHeader(b"X-Forwarded-For") is not None:
            return _answer(request, 403, b"Forbidden")
        ttl = _ttl(request.getHeader(TTL_HEADER))
        if ttl is None:
            return _answer(request, 400, b"Bad Request")
        now = self.clock.seconds()
        self._forget_expired(now)
        token = secrets.token_urlsafe(32)
        self._tokens[token] = now + ttl
        request.setHeader(TTL_HEADER, str(ttl).encode("ascii"))
        return _answer(request, 200, token.encode("ascii"))

    def render_GET(self, request: Request) -> bytes:
        token = request.getHeader(TOKEN_HEADER)
        expiry = self._tokens.get(token.decode("ascii", "replace")) if token else None
        if expiry is None or expiry <= self.clock.seconds():
            return _answer(request, 401, b"Unauthorized")
        body = self._paths().get(request.path)
        if body is None:
            return _answer(request, 404, b"Not Found")
        return _answer(request, 200, body)

    def _forget_expired(self, now: float) -> None:
        self._tokens = {t: e for t, e in self._tokens.items() if e > now}
        while len(self._tokens) >= MAX_TOKENS:
            del self._tokens[next(iter(self._tokens))]


def _ttl(header: bytes | None) -> int | None:
    if header is None or not header.isdigit() or len(header) > 6:
        return None
    ttl = int(header)
    return ttl if MIN_TTL <= ttl <= MAX_TTL else None


def _answer(request: Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain")
    return body


class IMDSEmulator:
    """Metadata services for many instances, one listening port each, on ``reactor``."""

    def __init__(self, reactor: IReactorTCP, clock: IReactorTime, interface: str = "127.0.0.1") -> None:
        self.reactor = reactor
        self.clock = clock
        self.interface = interface
        self._served: dict[str, tuple[MetadataService, IListeningPort]] = {}

    def serve(self, metadata: InstanceMetadata, port: int = 0) -> str:
        """Starts serving ``metadata`` (on a free port by default); returns its base URL."""
        if metadata.instance_id in self._served:
            raise ValueError(f"{metadata.instance_id} is already served")
        service = MetadataService(metadata, self.clock)
        # The site's own timers (idle connections) run on the clock too.
        site = Site(service, reactor=self.clock)
        site.noisy = False
        # Site is a ServerFactory of HTTP channels; Twisted's own annotations cannot say so.
        listening = self.reactor.listenTCP(port, site, interface=self.interface)  # type: ignore[arg-type]
        self._served[metadata.instance_id] = (service, listening)
        url = self.url(metadata.instance_id)
        log.info("metadata of {instance_id} served at {url}", instance_id=metadata.instance_id, url=url)
        return url

    def url(self, instance_id: str) -> str:
        address = self._served[instance_id][1].getHost()
        return f"http://{address.host}:{address.port}"  # type: ignore[attr-defined]

    def service(self, instance_id: str) -> MetadataService:
        return self._served[instance_id][0]

    def remove(self, instance_id: str) -> Deferred[None]:
        _, listening = self._served.pop(instance_id)
        return maybeDeferred(listening.stopListening).addCallback(lambda _: None)

    def stop(self) -> Deferred[None]:
        stopping = [self.remove(i) for i in list(self._served)]
        done: Deferred[None] = DeferredList(stopping, consumeErrors=True).addCallback(lambda _: None)
        return done


class IMDSThread:
    """
    An :class:`IMDSEmulator` on a private reactor in a daemon thread, for blocking callers
    (the demo).  The process's global reactor is not touched.
    """

    def __init__(self, interface: str = "127.0.0.1") -> None:
        self.interface = interface
        self._reactor: SelectReactor | None = None
        self._thread: threading.Thread | None = None
        self._emulator: IMDSEmulator | None = None

    def start(self) -> IMDSThread:
        if self._reactor is not None:
            return self
        reactor = SelectReactor()
        self._emulator = IMDSEmulator(reactor, reactor, self.interface)
        self._thread = threading.Thread(
            target=reactor.run, kwargs={"installSignalHandlers": False}, name="imds", daemon=True
        )
        self._reactor = reactor
        self._thread.start()
        return self

    def _running(self) -> tuple[SelectReactor, IMDSEmulator]:
        if self._reactor is None or self._emulator is None:
            raise RuntimeError("the metadata service thread is not running")
        return self._reactor, self._emulator

    def serve(self, metadata: InstanceMetadata, port: int = 0) -> str:
        reactor, emulator = self._running()
        return str(blockingCallFromThread(reactor, emulator.serve, metadata, port))

    def remove(self, instance_id: str) -> None:
        reactor, emulator = self._running()
        blockingCallFromThread(reactor, _waitable(emulator.remove), instance_id)

    def stop(self) -> None:
        if self._reactor is None:
            return
        reactor, emulator = self._running()
        blockingCallFromThread(reactor, _waitable(emulator.stop))
        reactor.callFromThread(reactor.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._reactor = self._emulator = self._thread = None

    def __enter__(self) -> IMDSThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _waitable(f: Callable[..., Deferred[None]]) -> Callable[..., Any]:
    # blockingCallFromThread's annotations cannot infer a result from a Deferred[None].
    return f
