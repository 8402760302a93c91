"""
The load monitor's senses, on every lb node, and the merge of what they report, on the primary.

Every sampling interval (``[scale] interval``) an lb node takes what nginx's load log counted
per master (:mod:`puppetha.ha.load`), asks every healthy master's puppetserver for its
jruby-metrics with the health probe's client certificate (:mod:`puppetha.ha.jruby`), counts the
agents each master signed from the store, and replaces its one ``loadreport`` record with the
result.  The primary merges the fresh reports (:func:`merge_reports`, pure) into the
:class:`puppetha.ha.scaling.Sample` its policy judges; a dead node's last report goes stale and
counts for nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pwd
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from attrs import evolve, fields, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime, IReactorUNIXDatagram
from twisted.logger import Logger
from twisted.python.failure import Failure

from puppetha.ha.front import RunsBlocking
from puppetha.ha.health import ProbeCredentials, StatusProbe, read_credentials
from puppetha.ha.jruby import JRUBY_METRICS_PATH, JRubyStatus, parse_jruby_metrics, with_jruby
from puppetha.ha.load import LoadCounter, LoadLogProtocol
from puppetha.ha.scaling import MasterLoad, Sample
from puppetha.repeat import Repeating, RepeatingService
from puppetha.store import AlreadyExists, IStore, Item, VersionConflict
from puppetha.store.records import LoadReportRecord, MasterRecord, NodeRecord, Records

log = Logger()

#: A report naming more masters than this is refused when read ([lb] max_masters' own bound).
MAX_REPORT_MASTERS = 1000
#: nginx's syslog lines are at most 4 KiB; one request's line is far shorter.
MAX_DATAGRAM = 8192
#: puppetserver's jruby-metrics answer at level debug is a few kilobytes; more is not it.
JRUBY_BODY_LIMIT = 256 * 1024
#: How often the agents per master are counted again (seconds): counting lists every ``node``
#: record, and the count only orders the masters a drain may choose, so a few minutes old is fine.
AGENT_COUNT_INTERVAL = 300.0

_INTEGER_FIELDS = frozenset(f.name for f in fields(MasterLoad) if f.type in ("int", int))
_LOAD_FIELDS = frozenset(f.name for f in fields(MasterLoad))


def report_loads(record: LoadReportRecord) -> dict[str, MasterLoad]:
    """
    The loads another lb node wrote, checked: ``ValueError`` for anything but a bounded map of
    certnames to non-negative, finite :class:`MasterLoad` fields.
    """
    if not isinstance(record.at, int | float) or not math.isfinite(record.at):
        raise ValueError("a report's time is not a number")
    if not isinstance(record.loads, dict) or len(record.loads) > MAX_REPORT_MASTERS:
        raise ValueError(f"a report holds a map of at most {MAX_REPORT_MASTERS} masters")
    loads = {}
    for certname, value in record.loads.items():
        if not isinstance(certname, str) or not 0 < len(certname) <= 255 or not isinstance(value, dict):
            raise ValueError("a report's master is not a certname with its load")
        unknown = set(value) - _LOAD_FIELDS
        if unknown:
            raise ValueError(f"{certname}: unknown load fields {sorted(unknown)}")
        for name, number in value.items():
            integer = name in _INTEGER_FIELDS
            if isinstance(number, bool) or not isinstance(number, int if integer else int | float) or (
                    not math.isfinite(number) or number < 0):
                kind = "count" if integer else "number"
                raise ValueError(f"{certname}: {name} is not a non-negative {kind}")
        loads[certname] = MasterLoad(**value)
    return loads


def load_value(load: MasterLoad) -> dict[str, Any]:
    """A load as a report holds it: only the fields that are not zero (reports stay small)."""
    return {f.name: getattr(load, f.name) for f in fields(MasterLoad) if getattr(load, f.name)}


@frozen
class LoadReport:
    """One lb node's checked report."""

    node: str
    at: float
    loads: Mapping[str, MasterLoad]


def fresh_reports(items: Iterable[Item], now: float, stale: float) -> list[LoadReport]:
    """
    The reports (the store's ``loadreport`` items) taken within ``stale`` of ``now`` (either
    way: another host's clock), checked; a report that fails its check, or is not a report at
    all, is logged and left out, as a stale one is.
    """
    reports = []
    for item in items:
        try:
            record = LoadReportRecord.from_value(item.value)
            loads = report_loads(record)
        except (ValueError, TypeError) as e:
            log.warn("load report {key} ignored: {error}", key=item.key, error=str(e))
            continue
        if abs(now - record.at) <= stale:
            reports.append(LoadReport(record.node, float(record.at), loads))
    return reports


#: The time of a sample merged from no report at all.
NO_REPORT = -math.inf


def merge_reports(reports: Iterable[LoadReport], now: float) -> Sample:
    """
    The masters' load as the lb nodes saw it, merged into one sample at ``now``.  What each node
    counted in its own nginx adds up (requests, mean requests in flight, 503s; the upstream time
    as a mean weighted by requests).  What every node reads from the same place does not:
    puppetserver's pool is the newest report's, its interval counters (requests, queue-limit
    hits) the highest any node saw, the agents the highest count.
    """
    reports = sorted(reports, key=lambda r: (r.at, r.node))
    if not reports:
        # No node saw anything: a sample of no time, which the policy never finds fresh.  An
        # empty sample at ``now`` would read as a fleet at rest.
        return Sample(NO_REPORT, {})
    merged: dict[str, MasterLoad] = {}
    for report in reports:
        for certname, load in report.loads.items():
            before = merged.get(certname)
            if before is None:
                merged[certname] = load
                continue
            requests = before.requests + load.requests
            total = before.upstream_time * before.requests + load.upstream_time * load.requests
            upstream = total / requests if requests else 0.0
            combined = evolve(
                before,
                requests=requests,
                in_flight=before.in_flight + load.in_flight,
                upstream_time=upstream,
                unavailable=before.unavailable + load.unavailable,
                jruby_requested=max(before.jruby_requested, load.jruby_requested),
                queue_limit_hits=max(before.queue_limit_hits, load.queue_limit_hits),
                agents=max(before.agents, load.agents),
            )
            if load.jruby_size:
                # Sorted by time: this report's pool is the newest so far.
                combined = evolve(combined, jruby_size=load.jruby_size, jruby_free=load.jruby_free,
                                  jruby_wait=load.jruby_wait, jruby_borrow=load.jruby_borrow)
            merged[certname] = combined
    return Sample(now, merged)


def agents_per_master(nodes: Iterable[NodeRecord]) -> dict[str, int]:
    """The agents each master's CA signed (its certname), revoked ones left out."""
    counts: dict[str, int] = {}
    for node in nodes:
        if node.role == "agent" and not node.revoked:
            counts[node.issuer] = counts.get(node.issuer, 0) + 1
    return counts


def upstream_address(master: MasterRecord) -> str:
    """The master as nginx's ``$upstream_addr`` names it."""
    if ":" in master.address and not master.address.startswith("["):
        return f"[{master.address}]:{master.port}"
    return f"{master.address}:{master.port}"


def probe_jruby(
    probe: StatusProbe, master: MasterRecord, credentials: ProbeCredentials
) -> Deferred[JRubyStatus | None]:
    """
    One master's jruby-metrics, asked as the health probe asks (its certificate, its strict
    TLS); None when the master does not answer them (no figures from it this interval).
    """
    d = probe.fetch(master, credentials, JRUBY_METRICS_PATH, limit=JRUBY_BODY_LIMIT)

    def answered(answer: tuple[int, bytes]) -> JRubyStatus | None:
        code, body = answer
        if code != 200:
            log.debug("jruby-metrics of {certname}: HTTP {code}", certname=master.certname, code=code)
            return None
        return parse_jruby_metrics(json.loads(body))

    def failed(failure: Failure) -> None:
        log.debug("jruby-metrics of {certname}: {error}", certname=master.certname, error=failure.value)

    return d.addCallback(answered).addErrback(failed)


JRubyProbe = Callable[[MasterRecord, ProbeCredentials], Deferred["JRubyStatus | None"]]
#: The masters, the probe's credentials, and the agents per master when counted this round.
_Discovered = tuple[list[MasterRecord], ProbeCredentials, "dict[str, int] | None"]


class LoadMonitor(RepeatingService):
    """
    An lb node's senses: every ``interval``, the load nginx's log counted, the healthy masters'
    jruby-metrics and the agents per master (counted every ``agents_interval``, the last count
    reported in between), published as the node's ``loadreport``.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        node: str,
        blocking: RunsBlocking,
        store: IStore,
        counter: LoadCounter,
        jruby: JRubyProbe,
        certificate: str,
        private_key: str,
        interval: float,
        agents_interval: float = AGENT_COUNT_INTERVAL,
    ) -> None:
        self.clock = clock
        self.node = node
        self.blocking = blocking
        self.store = store
        self.counter = counter
        self.jruby = jruby
        self.certificate = certificate
        self.private_key = private_key
        self.interval = interval
        self.agents_interval = agents_interval
        self._previous: dict[str, JRubyStatus] = {}
        self._taken: float | None = None
        self._agents: dict[str, int] = {}
        self._agents_counted: float | None = None
        self._repeating = Repeating(self._round, clock, interval)

    def _round(self) -> Deferred[Any]:
        def failed(failure: Failure) -> None:
            log.failure("a load sampling round failed; the next one tries again", failure)

        return self.round().addErrback(failed)

    def round(self) -> Deferred[LoadReportRecord]:
        """One sample, published; fires with the report as written."""
        started = self.clock.seconds()
        # Either way: a clock set back counts again rather than keep a count for hours.
        count = self._agents_counted is None or abs(started - self._agents_counted) >= self.agents_interval
        d = self.blocking.call(self._discover, count)
        d.addCallback(self._sample, started)
        d.addCallback(lambda report: self.blocking.call(publish_report, self.store, report))
        return d

    def _discover(self, count_agents: bool) -> _Discovered:
        records = Records(self.store)
        masters = [v.record for v in records.list(MasterRecord)]
        agents = agents_per_master(v.record for v in records.list(NodeRecord)) if count_agents else None
        return masters, read_credentials(self.certificate, self.private_key, self.store), agents

    def _sample(self, discovered: _Discovered, started: float) -> Deferred[LoadReportRecord]:
        masters, credentials, counted = discovered
        if counted is not None:
            self._agents, self._agents_counted = counted, started
        agents = self._agents
        now = self.clock.seconds()
        interval = now - self._taken if self._taken is not None else self.interval
        self._taken = now
        loads = self.counter.take({upstream_address(m): m.certname for m in masters}, interval)
        # Only masters in the upstream: a master that is down has no pool to ask about.
        healthy = [m for m in masters if m.healthy]
        # A probe that cannot even start (a CA that does not load) costs its master's figures only.
        probes = [maybeDeferred(self.jruby, m, credentials) for m in healthy]
        d: Deferred[Any] = DeferredList(probes, consumeErrors=True)

        def merged(results: list[tuple[bool, Any]]) -> LoadReportRecord:
            known = {m.certname for m in masters}
            for gone in set(self._previous) - known:
                del self._previous[gone]
            for master, (ok, status) in zip(healthy, results, strict=True):
                if ok and status is not None:
                    loads[master.certname] = with_jruby(loads[master.certname], status,
                                                        self._previous.get(master.certname))
                    self._previous[master.certname] = status
            return LoadReportRecord(
                node=self.node, at=now, interval=interval,
                loads={name: load_value(evolve(load, agents=agents.get(name, 0)))
                       for name, load in sorted(loads.items())},
            )

        return d.addCallback(merged)


def publish_report(store: IStore, report: LoadReportRecord) -> LoadReportRecord:
    """Blocking: the node's report replaces its last one (only its own daemon writes it)."""
    records = Records(store)
    found = records.get(LoadReportRecord, report.node)
    try:
        if found is None:
            records.create(report)
        else:
            records.replace(report, found.version)
    except (AlreadyExists, VersionConflict):
        # Two writers for one node (a second daemon with the same instance id): the next round
        # writes again.
        log.warn("load report of {node}: written by another process meanwhile", node=report.node)
    return report


def read_sample(store: IStore, now: float, stale: float) -> Sample:
    """Blocking: the fresh reports in the store, merged (what the primary's policy judges)."""
    return merge_reports(fresh_reports(store.list(LoadReportRecord.KIND), now, stale), now)


class LoadSocketError(Exception):
    """The load socket cannot be opened (the message names the path, and why)."""


def _uid_of(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def load_socket_owner(nginx_user: str | None, euid: int, uid_of: Callable[[str], int | None]) -> int:
    """
    The uid that owns the load socket, mode 0600: the only sender is nginx's workers, who run as
    ``[lb] nginx_user`` (``uid_of`` finds a user's uid).  A daemon running as root gives the socket
    to that user; any other daemon keeps it, and so works only beside an nginx whose workers run
    as the daemon's own user (an nginx started by that user runs its workers as that user,
    whatever its ``user`` line).  :class:`LoadSocketError` when no sender would be allowed.
    """
    if nginx_user is None:
        if euid == 0:
            raise LoadSocketError(
                "[lb] nginx_user is empty: the daemon runs as root and cannot tell which user "
                "nginx's workers send as; set it")
        return euid
    uid = uid_of(nginx_user)
    if uid is None:
        raise LoadSocketError(f"[lb] nginx_user: no user {nginx_user} on this host")
    if euid not in (0, uid):
        raise LoadSocketError(
            f"[lb] nginx_user is {nginx_user} (uid {uid}), but only the daemon's own user "
            f"(uid {euid}) may send to it: run nginx as the daemon's user and name that user "
            f"in [lb] nginx_user, or run the daemon as root")
    return uid


#: The longest path a UNIX socket may be bound at, in bytes (Linux's ``sun_path``, 108 with its NUL).
_UNIX_PATH_MAX = 107


def listen_load_socket(
    reactor: IReactorUNIXDatagram, path: str, counter: LoadCounter, nginx_user: str | None
) -> Any:
    """
    Opens the UNIX datagram socket nginx sends its load log to, feeding ``counter``; only
    ``nginx_user`` may send to it (:func:`load_socket_owner`).  A socket left by a daemon that
    died is replaced; anything else at ``path`` is left alone, and :class:`LoadSocketError` says
    why the socket cannot be opened.
    """
    owner = load_socket_owner(nginx_user, os.geteuid(), _uid_of)
    directory = os.path.dirname(path)
    if directory:
        try:
            # Traversable by nginx's workers, writable only by the daemon.
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as e:
            raise LoadSocketError(f"{path}: cannot make its directory: {e.strerror}") from None
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise LoadSocketError(f"{path}: cannot open it: {e.strerror}") from None
    else:
        if not stat.S_ISSOCK(found.st_mode):
            raise LoadSocketError(f"{path} exists and is not a socket")
        os.unlink(path)
    # Only its owner may send: a local user who could send would feed the policy false load (and
    # so launch or drain masters).  bind() makes the socket with the process's umask, and a user
    # who connects before the chmod keeps sending afterwards (a connected datagram socket's sends
    # are not checked again), so it is bound in a directory of the daemon's alone, given its
    # owner and mode there, and only then moved to its path.
    longest = _UNIX_PATH_MAX - len("/.12345678/s")  # what mkdtemp and the socket's name add
    if len(os.fsencode(directory or ".")) > longest:
        raise LoadSocketError(
            f"{path}: cannot open it: its directory's path is too long for a UNIX socket "
            f"(at most {longest} bytes: the socket is bound in a directory inside it first)")
    try:
        private = tempfile.mkdtemp(prefix=".", dir=directory or ".")
    except OSError as e:
        raise LoadSocketError(f"{path}: cannot open it: {e.strerror}") from None
    staged = os.path.join(private, "s")
    port = None
    try:
        port = reactor.listenUNIXDatagram(staged, LoadLogProtocol(counter), maxPacketSize=MAX_DATAGRAM,
                                          mode=0o600)
        os.chmod(staged, 0o600)  # whatever the reactor made of its mode
        if owner != os.geteuid():
            os.chown(staged, owner, -1)
        os.rename(staged, path)
    except CannotListenError as e:
        raise LoadSocketError(f"{path}: cannot open it: {e.socketError}") from None
    except OSError as e:
        if port is not None:
            port.stopListening()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)
        raise LoadSocketError(f"{path}: cannot open it: {e.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(private)
    return port


class LoadSocket(Service):
    """
    The load socket as a service: :meth:`open` at once (a path that cannot be bound stops the
    daemon's start with one line), closed and removed when the daemon stops.
    """

    def __init__(self, reactor: IReactorUNIXDatagram, path: str, counter: LoadCounter,
                 nginx_user: str | None) -> None:
        self.reactor = reactor
        self.path = path
        self.counter = counter
        self.nginx_user = nginx_user
        self._port: Any = None

    def open(self) -> None:
        self._port = listen_load_socket(self.reactor, self.path, self.counter, self.nginx_user)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self._port = self._port, None
        if port is None:
            return None
        d: Deferred[None] = maybeDeferred(port.stopListening)

        def removed(_: object) -> None:
            # Twisted leaves a datagram socket's file behind.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

        return d.addCallback(removed)
