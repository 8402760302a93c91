"""
``GET /metrics`` in Prometheus's text format (``docs/metrics.md``), on ``[metrics] listen``.

A scrape asks every source for its families at that moment: the live services' own counts
(read on the reactor thread, where they change) and the store's records (read on the read pool,
never on the reactor).  A source that fails is left out with a log line; the others are served.
The text is rendered by ``prometheus_client`` from a collector of the scrape's own, never from
the library's global registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from klein import Klein
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from puppetha.enroll.api import IDLE_TIMEOUT, JSONRefusingResource, error_body, sized, write_json
from puppetha.enroll.listener import CannotListen
from puppetha.services import OpenedListener

log = Logger()

#: The text format every Prometheus server reads (0.0.4).
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: One source of families: called at each scrape, answers at once or with a Deferred.
Source = Callable[[], "list[Metric] | Deferred[list[Metric]]"]


class _Scraped:
    """A collector holding one scrape's families (``generate_latest`` takes any collector)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class Scrape:
    """
    The named sources of the daemon's families, asked together at each scrape: those in
    ``sources`` at the time (the daemon's wiring may add some after the listener opened).
    """

    def __init__(self, sources: Mapping[str, Source]) -> None:
        self.sources = sources

    def families(self) -> Deferred[list[Metric]]:
        """Every source's families; a failing source is logged and left out."""
        names = sorted(self.sources)
        asked = [maybeDeferred(self.sources[name]) for name in names]

        def gathered(results: list[tuple[bool, Any]]) -> list[Metric]:
            families: list[Metric] = []
            for name, (ok, result) in zip(names, results, strict=True):
                if ok:
                    families.extend(result)
                else:
                    log.warn("metrics: {source} left out of this scrape: {error}", source=name,
                             error=_reason(result))
            return families

        return DeferredList(asked, consumeErrors=True).addCallback(gathered)

    def render(self) -> Deferred[bytes]:
        return self.families().addCallback(lambda families: generate_latest(_Scraped(families)))


def _reason(failure: Failure) -> str:
    return str(failure.value) or type(failure.value).__name__


class MetricsAPI:
    """``GET /metrics``; anything else is a JSON error (404, or 405 for another method)."""

    app = Klein()

    def __init__(self, scrape: Scrape) -> None:
        self.scrape = scrape

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: Request) -> Deferred[bytes]:
        def rendered(text: bytes) -> bytes:
            request.setHeader(b"Content-Type", CONTENT_TYPE)
            request.setHeader(b"Cache-Control", b"no-store")
            return sized(request, text)

        return self.scrape.render().addCallback(rendered)

    @app.handle_errors(HTTPException)
    def routing_refused(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        if isinstance(error, MethodNotAllowed):
            request.setHeader(b"Allow", b"GET, HEAD")
            return write_json(request, 405, error_body("method-not-allowed", "use GET here"))
        return write_json(request, 404, error_body("not-found", "no such resource; try /metrics"))

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("metrics request failed", failure)
        return write_json(request, 500, error_body("internal-error", "the server failed; see its log"))


def metrics_resource(scrape: Scrape) -> IResource:
    return JSONRefusingResource(MetricsAPI(scrape).app)


def make_metrics_site(scrape: Scrape, reactor: IReactorTime) -> Site:
    site = Site(metrics_resource(scrape), reactor=reactor, timeout=IDLE_TIMEOUT)
    site.displayTracebacks = False
    return site


def open_metrics_listener(reactor: Any, listen: str, site: Site) -> OpenedListener:
    """
    The metrics listener, already listening (like the enrollment API's): a port in use or an
    address this host does not have stops the start with :class:`CannotListen`.
    """
    try:
        endpoint = serverFromString(reactor, listen)
    except (ValueError, TypeError, KeyError) as e:
        raise CannotListen(f"[metrics] listen: {listen!r}: {e}") from None
    outcome: list[IListeningPort | Failure] = []
    endpoint.listen(site).addBoth(outcome.append)
    if not outcome:
        raise CannotListen(f"[metrics] listen: {listen}: the listener did not open at once")
    if isinstance(outcome[0], Failure):
        error = outcome[0].value
        reason = getattr(getattr(error, "socketError", None), "strerror", None) or str(error)
        raise CannotListen(f"[metrics] listen: cannot listen on {listen}: {reason}")
    return OpenedListener("metrics-listener", outcome[0])
