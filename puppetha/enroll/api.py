"""
The enrollment API over HTTP (``docs/api.md``): ``POST /v1/enroll``, ``GET /v1/ca``,
``GET /v1/crl``, ``GET /v1/health``.

The routes are a klein app (:class:`EnrollmentAPI`); what the URL map refuses, and any failure
nobody planned for, is answered by its error handlers.  Every answer but the PEM bundles is JSON,
refusals included.  The body of an enrollment is bounded before it is parsed, both by
:class:`BoundedRequest` (which stops storing a body past the limit as it arrives) and by the
route (which measures what it got), so the resource is safe under any
:class:`~twisted.web.server.Site`.  The source address is
``request.getClientAddress()``: the TCP peer, or the PROXY header's source behind nginx.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import IO, Any
from urllib.parse import unquote_to_bytes

from klein import Klein
from klein.resource import KleinResource
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from puppetha.aws.cloud import CloudError
from puppetha.enroll.framing import MAX_HEADERS, MAX_REQUEST_LINE, BadFraming, ChunkedBody, RequestHead
from puppetha.enroll.readiness import Readiness
from puppetha.enroll.service import Enrollment, EnrollmentRefused, EnrollmentRequest
from puppetha.store import StoreUnavailable

log = Logger()

#: Largest enrollment body accepted (64 KiB).
MAX_BODY = 64 * 1024

REQUIRED_FIELDS = ("role", "document", "signature", "csr")

PEM_TYPE = b"application/x-pem-file"


def client_source(request: Request) -> str | None:
    """The request's source IP address as text, or ``None`` when it is not an IP peer."""
    address = request.getClientAddress()
    if isinstance(address, IPv4Address | IPv6Address):
        return str(address.host)
    return None


def write_json(request: IRequest, status: int, body: dict[str, Any], retry_after: int | None = None) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    if retry_after is not None:
        request.setHeader(b"Retry-After", str(retry_after).encode("ascii"))
    return sized(request, json.dumps(body, indent=None, separators=(",", ":")).encode("utf-8") + b"\n")


def sized(request: IRequest, payload: bytes) -> bytes:
    """``payload``, its length announced: klein writes then finishes, which alone would chunk it."""
    request.setHeader(b"Content-Length", str(len(payload)).encode("ascii"))
    return payload


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": code, "message": message}


def parse_enrollment(body: bytes) -> EnrollmentRequest | tuple[str, str]:
    """The request, or ``(code, message)`` saying what is wrong with its shape."""
    try:
        fields = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "malformed-json", "the body is not UTF-8 JSON"
    if not isinstance(fields, dict):
        return "malformed-json", "the body is not a JSON object"
    for name in REQUIRED_FIELDS:
        if name not in fields:
            return "missing-field", f"{name} is missing"
        if not isinstance(fields[name], str) or not fields[name]:
            return "bad-field", f"{name} must be a non-empty string"
    role = fields["role"]
    if role not in ("agent", "master", "lb"):
        return "unknown-role", "role must be agent, master or lb"
    try:
        document = fields["document"].encode("utf-8")
        csr = fields["csr"].encode("ascii")
    except UnicodeEncodeError:
        # Lone surrogates in the document, or anything but ASCII in a PEM.
        return "bad-field", "document must be UTF-8 text and csr ASCII PEM"
    return EnrollmentRequest(role=role, document=document, signature=fields["signature"], csr=csr)


def failure_response(request: IRequest, failure: Failure) -> bytes:
    """The JSON answer for a failed enrollment or lookup."""
    error = failure.value
    if isinstance(error, EnrollmentRefused):
        return write_json(request, error.status, error_body(error.code, error.message), error.retry_after)
    if isinstance(error, StoreUnavailable):
        return write_json(
            request, 503, error_body("store-unavailable", "the store cannot be reached; try again later"),
            retry_after=RETRY_AFTER,
        )
    if isinstance(error, CloudError):
        return write_json(
            request, 503, error_body("aws-unavailable", "AWS cannot be asked; try again later"),
            retry_after=RETRY_AFTER,
        )
    log.failure("enrollment API request failed", failure)
    return write_json(request, 500, error_body("internal-error", "the server failed; see its log"))


#: Retry-After for 503s raised outside the enrollment (which carries its own).
RETRY_AFTER = 10


def _answer_later(work: Deferred[bytes]) -> Deferred[bytes]:
    """
    What klein waits on for ``work``'s answer.  klein cancels a handler's Deferred when its
    client hangs up; an enrollment under way must still finish (its claim and certificate are
    written once, whoever is listening), so the cancellation stops at this Deferred.
    """
    answer: Deferred[bytes] = Deferred()

    def settle(result: bytes | Failure) -> None:
        if not answer.called:
            answer.callback(result)  # a Failure goes down the errbacks

    work.addBoth(settle)
    return answer


class EnrollmentAPI:
    """The routes of the enrollment API, over ``enrollment`` and ``readiness``."""

    app = Klein()

    def __init__(self, enrollment: Enrollment, readiness: Callable[[], Readiness] | None = None) -> None:
        self.enrollment = enrollment
        #: The last background check (:mod:`puppetha.enroll.readiness`); without it, ``/v1/health``
        #: asks the store for a read.
        self.readiness = readiness

    @app.route("/v1/enroll", methods=["POST"])
    def enroll(self, request: Request) -> bytes | Deferred[bytes]:
        if _too_large(request):
            return self._refuse(request, 413, "too-large", f"the body is larger than {MAX_BODY} bytes")
        if not _is_json(request):
            return self._refuse(request, 415, "not-json", "Content-Type must be application/json")
        parsed = parse_enrollment(_body(request))
        if isinstance(parsed, tuple):
            code, message = parsed
            return self._refuse(request, 400, code, message)
        source = client_source(request)
        timeline = self.enrollment.timeline
        if timeline is not None:
            timeline.stamp(source, "request: parsed")
            request.notifyFinish().addBoth(lambda _: timeline.stamp(source, "answer: written"))
        answer = self.enrollment.enroll(parsed, source).addCallbacks(
            lambda issued: write_json(request, 200, issued.to_json()),
            lambda failure: failure_response(request, failure),
        )
        return _answer_later(answer)

    def _refuse(self, request: Request, status: int, code: str, message: str) -> bytes:
        """A request refused for its shape, before the enrollment: counted with its refusals."""
        self.enrollment.refused[code] += 1
        return write_json(request, status, error_body(code, message))

    @app.route("/v1/ca", methods=["GET"])
    def ca(self, request: Request) -> Deferred[bytes]:
        return self._bundle(request, self.enrollment.ca_bundle)

    @app.route("/v1/crl", methods=["GET"])
    def crl(self, request: Request) -> Deferred[bytes]:
        return self._bundle(request, self.enrollment.crl_bundle)

    @app.route("/v1/health", methods=["GET"])
    def health(self, request: Request) -> bytes | Deferred[bytes]:
        """Whether this daemon can enroll now: the last readiness check, answered at once."""
        if self.readiness is not None:
            now = self.readiness()
            if now.ready:
                return write_json(request, 200, now.to_json())
            return write_json(request, 503, now.to_json(), retry_after=RETRY_AFTER)
        answer = self.enrollment.health().addCallbacks(
            lambda _: write_json(request, 200, {"status": "ok"}),
            lambda failure: failure_response(request, failure),
        )
        return _answer_later(answer)

    def _bundle(self, request: Request, bundle: Callable[[], Deferred[bytes]]) -> Deferred[bytes]:
        def found(pem: bytes) -> bytes:
            request.setHeader(b"Content-Type", PEM_TYPE)
            return sized(request, pem)

        return _answer_later(bundle().addCallbacks(found, lambda failure: failure_response(request, failure)))

    @app.handle_errors(HTTPException)
    def routing_refused(self, request: IRequest, failure: Failure) -> bytes:
        # What the URL map refuses: a known path with another method is 405, anything else
        # (an unknown path, or one werkzeug would redirect to a cleaner spelling) is 404.
        error = failure.value
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            methods = sorted({m for m in error.valid_methods if m != "HEAD"})
            allowed = ", ".join(methods)
            request.setHeader(b"Allow", allowed.encode("ascii"))
            return write_json(request, 405, error_body("method-not-allowed", f"use {allowed} here"))
        return write_json(request, 404, error_body("not-found", "no such resource"))

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("enrollment API request failed", failure)
        return write_json(request, 500, error_body("internal-error", "the server failed; see its log"))


class JSONRefusingResource(KleinResource):
    """
    klein's resource, which answers a URL that is not UTF-8 with JSON too (klein's own answer
    is a plain-text 400, before any route or error handler sees the request).
    """

    def render(self, request: IRequest) -> Any:
        try:
            unquote_to_bytes(request.path).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            return write_json(request, 400, error_body("bad-url", "the path and Host must be UTF-8"))
        return super().render(request)


def enrollment_resource(
    enrollment: Enrollment, readiness: Callable[[], Readiness] | None = None
) -> IResource:
    """The root resource of the enrollment API."""
    return JSONRefusingResource(EnrollmentAPI(enrollment, readiness).app)


class BoundedRequest(Request):
    """A request that stops storing its body once it passes :data:`MAX_BODY`."""

    body_too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_BODY:
            self.body_too_large = True
        if not self.body_too_large:
            super().handleContentChunk(data)


#: Seconds a connection may sit idle (Twisted's default is 12 hours): an enrollment is one short
#: request, and a client that trickles bytes must not hold a connection for long.
IDLE_TIMEOUT = 30

#: Seconds a client has for a whole request, headers and body, from its first byte (or from the
#: connection, for the first request).  The idle timeout restarts on every byte, so without this
#: a client sending a byte every few seconds would hold its connection for ever.
REQUEST_DEADLINE = 10

_STATUS_TEXT = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class EnrollmentChannel(HTTPChannel):
    """
    Twisted's HTTP channel, strict about framing: a request must arrive whole within
    :data:`REQUEST_DEADLINE`; an over-long request line, too many header bytes or lines, lines
    ended by a bare LF, and any malformed request line, header or chunk are answered with a JSON
    error (400, 408 or 431) and the connection is closed, never held open unanswered.

    Each line of a head and each byte of a chunked body is checked (:mod:`.framing`) before
    Twisted's parser sees it, so Twisted never has to refuse anything itself: its refusal is a
    bare plain-text 400 with no public way to change it.
    """

    MAX_LENGTH = MAX_REQUEST_LINE
    totalHeadersSize = MAX_HEADERS
    request_deadline: float = REQUEST_DEADLINE

    _deadline: IDelayedCall | None = None
    _refused = False
    _head_bytes = b""  # the bytes of the head being read, until its blank line
    _chunks: ChunkedBody | None = None  # the chunked body being read

    def connectionMade(self) -> None:
        self._request_head = RequestHead()
        super().connectionMade()
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self.line_mode:
            if self._deadline is None:
                self._arm()
            # Only the head of a request is lines; a body may hold any bytes.  The head is kept
            # here (at most the header limit, past which the request is refused anyway) so a
            # line split across reads is judged whole.
            self._head_bytes += data
            end = self._head_bytes.find(b"\r\n\r\n")
            head = self._head_bytes if end < 0 else self._head_bytes[: end + 4]
            if _BARE_LF.search(head):
                self._refuse(BadFraming(400, "bad-framing", "lines must end with CRLF"))
                return
            self._head_bytes = b"" if end >= 0 else self._head_bytes[-(MAX_HEADERS + 4):]
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:  # lines already read past the refused one
            return
        if not self.persistent:
            # After a request that closes the connection, Twisted drops whatever follows.
            super().lineReceived(line)
            return
        try:
            self._request_head.line(line)
        except BadFraming as refusal:
            self._refuse(refusal)
            return
        if self._request_head.done and self._request_head.chunked:
            self._chunks = ChunkedBody()
        super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        # Raw data is a request's body, or (while a request is answered) the next requests,
        # which Twisted keeps and hands back as lines later.  Only a chunked body is framed.
        if self._refused:
            return
        if self._chunks is not None:
            try:
                if self._chunks.feed(data) is not None:
                    self._chunks = None
            except BadFraming as refusal:
                self._refuse(refusal)
                return
        super().rawDataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        if not self._request_head.started:
            self._refuse(BadFraming(400, "request-line-too-long",
                                    f"the request line passes {MAX_REQUEST_LINE} bytes"))
        else:
            self._refuse(BadFraming(431, "headers-too-large",
                                    f"a header line passes {MAX_REQUEST_LINE} bytes"))

    def allContentReceived(self) -> None:
        # The request is whole: its answer may take longer (AWS, the store), which is not the
        # client's doing.  The next request on this connection gets a deadline of its own.
        self._disarm()
        self._request_head = RequestHead()
        self._chunks = None
        super().allContentReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        super().connectionLost(reason)

    def _arm(self) -> None:
        self._deadline = self.callLater(self.request_deadline, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self._refuse(BadFraming(408, "too-slow",
                                f"the request did not arrive whole within {self.request_deadline:g}s"))

    def _refuse(self, refusal: BadFraming) -> None:
        if self._refused:
            return
        self._refused = True
        self._disarm()
        answer = error_body(refusal.code, refusal.message)
        body = json.dumps(answer, separators=(",", ":")).encode("utf-8") + b"\n"
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (refusal.status, _STATUS_TEXT[refusal.status], len(body), body)
            )
        self.loseConnection()


_BARE_LF = re.compile(rb"(?<!\r)\n")


def make_enrollment_site(enrollment: Enrollment, reactor: IReactorTime,
                         readiness: Callable[[], Readiness] | None = None) -> Site:
    """The HTTP site of the enrollment API (wrap it in TLS: see :mod:`puppetha.enroll.listener`)."""
    # Never parse form uploads: the API takes JSON only.
    site = Site(enrollment_resource(enrollment, readiness), parsePOSTFormSubmission=False, reactor=reactor,
                timeout=IDLE_TIMEOUT)
    site.requestFactory = BoundedRequest
    site.protocol = EnrollmentChannel  # type: ignore[assignment]
    site.displayTracebacks = False
    return site


def _too_large(request: Request) -> bool:
    if getattr(request, "body_too_large", False):
        return True
    declared = request.getHeader(b"Content-Length")
    if declared is not None:
        try:
            if int(declared) > MAX_BODY:
                return True
        except ValueError:
            return True
    content: IO[bytes] | None = request.content
    if content is None:
        return False
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    return size > MAX_BODY


def _is_json(request: Request) -> bool:
    value = request.getHeader(b"Content-Type")
    if value is None:
        return False
    media = value.split(b";", 1)[0].strip().lower()
    return media == b"application/json"


def _body(request: Request) -> bytes:
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    body: bytes = content.read(MAX_BODY + 1)
    return body
