"""
The ENC service: answers ``puppetha-enc`` over a local UNIX socket.

Protocol (``docs/enc.md``): the client sends one line, the certname (at most 255 bytes, ended
by ``\\n``).  The server answers ``OK\\n`` followed by the ENC YAML, or one line
``ERR <code> <message>\\n``, and closes.  Anything else (no newline before end of input, an
over-long line, bytes that are not a certname, silence) gets an ``ERR`` and a close.

The :class:`Classifier` decides: the node must be enrolled and not revoked, and its instance
running.  Store and AWS reads go through :class:`BatchedCache` (bounded thread pools, batched,
refreshed ahead of expiry for nodes that keep asking); when a read fails, a node's last good
answer is served for at most ``stale_limit`` seconds.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from attrs import define, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, FirstError, gatherResults, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTime,
    IReactorUNIX,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from puppetha.aws.cloud import InstanceInfo
from puppetha.enc.classify import (
    MAX_CERTNAME_BYTES,
    ClassificationError,
    NodeFacts,
    check_certname,
    check_classification,
    merge,
    scopes_for,
    to_enc_yaml,
)
from puppetha.latency import Latencies
from puppetha.store import IBatchGet, Item
from puppetha.store.records import Classification, NodeRecord, Records
from puppetha.threads import Blocking, Episodes

log = Logger()

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Instance ids per DescribeInstances call (the API's filter limit).
DESCRIBE_BATCH = 200


class Refused(Exception):
    """A definite answer that the node gets no classification; ``code`` is one protocol word."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# -- caching ----------------------------------------------------------------------------------


@define
class _Entry(Generic[V]):
    value: V | None
    fetched_at: float
    requested_at: float


class BatchedCache(Generic[K, V]):
    """
    A TTL cache in front of a batched, asynchronous ``fetch(keys) -> {key: value}`` (absent keys
    are cached as ``None``; with ``cache_absent=False`` only keys that were present before, so
    keys a client makes up never take room).  Misses that arrive while ``max_in_flight`` fetches are running
    wait and leave together in the next batch; a key already being fetched is not fetched twice.

    :meth:`refresh` (run every ``ttl / 4`` by :class:`Classifier`) re-fetches, in the background,
    entries past half their TTL that were asked for within ``hot_window``, so a node that keeps
    asking never waits; and forgets entries nobody asked for within ``forget_after``.  A failed
    fetch leaves old entries in place and fails the requests that waited on it.

    With ``serve_stale`` an entry past its TTL but younger than ``serve_stale`` is answered at
    once while its refresh runs behind (a refresh that answers at once, or fails at once, is
    used as it is): a slow or hung dependency never makes a request wait for data it already
    has.  Fetch failures are logged once when they start and once when fetches answer again.
    """

    def __init__(self, name: str, clock: IReactorTime,
                 fetch: Callable[[list[K]], Deferred[Mapping[K, V]]], *, ttl: float,
                 hot_window: float, forget_after: float, max_batch: int = 500,
                 max_in_flight: int = 4, cache_absent: bool = True, serve_stale: float = 0.0) -> None:
        self.name = name
        self.ttl = ttl
        self.serve_stale = serve_stale
        self._failing = False
        self._clock = clock
        self._fetch = fetch
        self._hot_window = hot_window
        self._forget_after = max(forget_after, ttl)
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._cache_absent = cache_absent
        self._entries: dict[K, _Entry[V]] = {}
        self._waiters: dict[K, list[Deferred[V | None]]] = {}
        self._queue: dict[K, None] = {}
        self._fetching: set[K] = set()
        self._in_flight = 0
        #: Number of fetches started, for tests and the benchmark.
        self.fetches = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def peek(self, key: K) -> tuple[bool, V | None]:
        """``(known, value)``: the last value fetched for ``key``, however old; asks nothing."""
        entry = self._entries.get(key)
        return (False, None) if entry is None else (True, entry.value)

    def get_many(self, keys: Iterable[K]) -> Deferred[dict[K, V | None]]:
        now = self._clock.seconds()
        found: dict[K, V | None] = {}
        missing: list[K] = []
        stale: dict[K, Deferred[V | None]] = {}
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                entry.requested_at = now
                age = now - entry.fetched_at
                if age < self.ttl:
                    found[key] = entry.value
                    continue
                if age < self.serve_stale:
                    stale[key] = self._wait(key)
                    continue
            missing.append(key)
        if not missing and not stale:
            return succeed(found)
        waits = [self._wait(key) for key in missing]
        self._pump()
        for key, refreshed in stale.items():
            outcome: list[V | Failure | None] = []
            refreshed.addBoth(outcome.append)
            if not outcome:
                # Still on its way: answer with what we have; the refresh lands in the cache.
                found[key] = self._entries[key].value
                continue
            result = outcome[0]
            if isinstance(result, Failure):
                for waiting in waits:
                    waiting.addErrback(lambda _: None)  # this request fails already
                failed: Deferred[dict[K, V | None]] = Deferred()
                failed.errback(result)
                return failed
            found[key] = result
        if not missing:
            return succeed(found)

        def landed(values: list[V | None]) -> dict[K, V | None]:
            found.update(zip(missing, values, strict=True))
            return found

        def first_error(f: Failure) -> Failure:
            first: FirstError = f.value  # type: ignore[assignment]
            return first.subFailure

        return gatherResults(waits, consumeErrors=True).addCallbacks(landed, first_error)

    def refresh(self) -> None:
        # Runs over every entry every ttl / 4: the cheap tests first, the set lookups last.
        now = self._clock.seconds()
        forget_after, hot_window, half_ttl = self._forget_after, self._hot_window, self.ttl / 2
        busy, queue = self._fetching, self._queue
        forgotten = []
        for key, entry in self._entries.items():
            asked = now - entry.requested_at
            if asked > forget_after:
                if key not in busy and key not in queue:
                    forgotten.append(key)
            elif asked <= hot_window and now - entry.fetched_at >= half_ttl and key not in busy:
                queue[key] = None
        for key in forgotten:
            del self._entries[key]
        self._pump()

    def _wait(self, key: K) -> Deferred[V | None]:
        d: Deferred[V | None] = Deferred()
        self._waiters.setdefault(key, []).append(d)
        if key not in self._fetching:
            self._queue[key] = None
        return d

    def _pump(self) -> None:
        while self._queue and self._in_flight < self._max_in_flight:
            batch = list(self._queue)[: self._max_batch]
            for key in batch:
                del self._queue[key]
            self._fetching.update(batch)
            self._in_flight += 1
            self.fetches += 1
            started = self._clock.seconds()
            maybeDeferred(self._fetch, batch).addBoth(self._landed, batch, started)

    def _landed(self, result: Mapping[K, V] | Failure, batch: list[K], started: float) -> None:
        self._in_flight -= 1
        self._fetching.difference_update(batch)
        waiters = [(key, self._waiters.pop(key, [])) for key in batch]
        if isinstance(result, Failure):
            if not self._failing:
                self._failing = True
                log.warn("reading {cache} failed: {error}; answering from the cache while it fails",
                         cache=self.name, error=result.getErrorMessage())
            for _, ws in waiters:
                for d in ws:
                    d.errback(result)
        else:
            if self._failing:
                self._failing = False
                log.info("reading {cache} works again", cache=self.name)
            for key, ws in waiters:
                value = result.get(key)
                old = self._entries.get(key)
                if value is not None or old is not None or self._cache_absent:
                    self._entries[key] = _Entry(value, started, old.requested_at if old else started)
                for d in ws:
                    d.callback(value)
        self._pump()


# -- reading the store and AWS (run on the thread pools) ------------------------------------


@frozen
class InvalidClassification:
    """A stored classification that does not validate: the nodes it applies to are refused."""

    scope: str
    reason: str


class ReadOnce(Generic[V]):
    """
    Reads items of one kind by key, and parses (and checks) each stored value once: the parsed
    record is kept with the version and the value it was made from, and given again while the
    store holds that same value.  The background refresh reads every hot node record and scope
    every ``store_ttl / 2``; nearly always nothing changed, and parsing and validating was half
    the cost of each read.  A store that reads many keys in one round trip (:class:`IBatchGet`)
    is asked once per batch.  The value is compared, not only the version: an item deleted and
    created again starts again at version 1.  Runs on pool threads: a race between two reads
    of one key only costs a parse.
    """

    def __init__(self, kind: str, parse: Callable[[str, Mapping[str, Any]], V]) -> None:
        self.kind = kind
        self._parse = parse
        self._held: dict[str, tuple[int, Mapping[str, Any], V]] = {}
        #: Values parsed (not given again), for tests and the benchmark.
        self.parsed = 0

    def __len__(self) -> int:
        return len(self._held)

    def __call__(self, records: Records, keys: Sequence[str]) -> dict[str, V]:
        out: dict[str, V] = {}
        store = records.store
        found: Mapping[str, Item | None]
        if len(keys) > 1 and IBatchGet.providedBy(store):  # for one key, get is cheaper
            found = store.get_many(self.kind, keys)
        else:
            found = {key: store.get(self.kind, key) for key in keys}
        for key in keys:
            item = found.get(key)
            if item is None:
                self._held.pop(key, None)
                continue
            held = self._held.get(key)
            if held is not None and held[0] == item.version and held[1] == item.value:
                out[key] = held[2]
                continue
            parsed = self._parse(key, item.value)
            self.parsed += 1
            self._held[key] = (item.version, item.value, parsed)
            out[key] = parsed
        return out

    def forget(self, keep: Callable[[str], bool]) -> None:
        """Drops what is held for keys ``keep`` says no to (run on the reactor thread)."""
        for key in [k for k in self._held if not keep(k)]:
            self._held.pop(key, None)


def _parse_node(key: str, value: Mapping[str, Any]) -> NodeRecord:
    return NodeRecord.from_value(value)


def _parse_classification(scope: str, value: Mapping[str, Any]) -> Classification | InvalidClassification:
    try:
        return check_classification(Classification.from_value(value))
    except (ClassificationError, TypeError, KeyError) as e:
        return InvalidClassification(scope, str(e))


def describe(cloud: Any, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], InstanceInfo]:
    """``cloud`` is an :class:`puppetha.aws.cloud.ICloud`; keys are ``(region, instance id)``."""
    by_region: dict[str, list[str]] = {}
    for region, instance_id in keys:
        by_region.setdefault(region, []).append(instance_id)
    out: dict[tuple[str, str], InstanceInfo] = {}
    for region, ids in sorted(by_region.items()):
        for i in range(0, len(ids), DESCRIBE_BATCH):
            found = cloud.describe_instances(region, ids[i : i + DESCRIBE_BATCH])
            out.update(((region, iid), info) for iid, info in found.items())
    return out


# -- the classifier ---------------------------------------------------------------------------


@define
class _LastGood:
    answer: str
    at: float
    node: NodeRecord
    #: Whether serving it stale was logged: once per node and outage, not once per request.
    said_stale: bool = False


class Classifier:
    """
    Answers a certname with its ENC YAML, or :class:`Refused`.

    ``store`` runs :class:`Records` calls on the store's pool; ``cloud`` runs
    :class:`~puppetha.aws.cloud.ICloud` calls on the AWS pool.  ``ttl`` bounds how old
    instance state, security groups and tags may be; ``store_ttl`` how old node records and
    classifications may be (short: a revocation takes effect within it); ``stale_limit`` how
    long a node's last good answer is served while the store or AWS fails.  Instances asked
    for within ``hot_window`` (default: Puppet's 30-minute run interval) are refreshed ahead of
    their expiry, so a node that runs on schedule never waits for AWS.

    Never waiting on a slow dependency for what is already known: cached data past its TTL
    (within ``stale_limit``) is answered at once while its refresh runs behind, and a node with
    a good answer within ``stale_limit`` waits at most ``patience`` seconds for a new one
    before it gets the last one (the new one still lands in the caches).
    """

    def __init__(self, clock: IReactorTime, store: Blocking[Records], cloud: Blocking[Any], *,
                 ttl: float = 60.0, store_ttl: float = 5.0, stale_limit: float = 3600.0,
                 hot_window: float = 1800.0, store_hot_window: float = 60.0,
                 patience: float = 2.0) -> None:
        self._clock = clock
        self.stale_limit = stale_limit
        self.patience = patience
        self.store_hot_window = store_hot_window
        hot = hot_window
        records = store.target
        # Store reads are cheap: refresh ahead only what is asked for often (the shared
        # scopes), and let a node's own record be read again when it comes back.  Any local
        # client can ask for any name: only enrolled nodes get an entry.
        # Each record parsed and checked once per stored value, however often it is read again.
        self.read_nodes = ReadOnce(NodeRecord.KIND, _parse_node)
        self.read_scopes = ReadOnce(Classification.KIND, _parse_classification)
        self.nodes: BatchedCache[str, NodeRecord] = BatchedCache(
            "nodes", clock,
            lambda names: store.call(self.read_nodes, records, names),
            ttl=store_ttl, hot_window=store_hot_window, forget_after=store_hot_window,
            cache_absent=False, serve_stale=stale_limit)
        self.scopes: BatchedCache[str, Classification | InvalidClassification] = BatchedCache(
            "classifications", clock,
            lambda scopes: store.call(self.read_scopes, records, scopes),
            ttl=store_ttl, hot_window=store_hot_window, forget_after=store_hot_window,
            serve_stale=stale_limit)
        self.instances: BatchedCache[tuple[str, str], InstanceInfo] = BatchedCache(
            "instances", clock, lambda keys: cloud.call(describe, cloud.target, keys),
            ttl=ttl, hot_window=hot, forget_after=hot, max_batch=1000, max_in_flight=2,
            serve_stale=stale_limit)
        self._last_good: dict[str, _LastGood] = {}
        self._made: dict[str, _Made] = {}
        self._refresher = LoopingCall(self.refresh)
        self._refresher.clock = clock
        self._refresh_interval = max(min(ttl, store_ttl) / 4, 0.05)

    def start(self) -> None:
        self._refresher.start(self._refresh_interval, now=False)

    def stop(self) -> None:
        if self._refresher.running:
            self._refresher.stop()

    def refresh(self) -> None:
        for cache in (self.nodes, self.scopes, self.instances):
            cache.refresh()
        for read, cache in ((self.read_nodes, self.nodes), (self.read_scopes, self.scopes)):
            if len(read) > len(cache):  # the cache forgot some: so does the reader
                read.forget(cache.__contains__)
        if len(self._made) > len(self.nodes):
            for name in [n for n in self._made if n not in self.nodes]:
                del self._made[name]
        now = self._clock.seconds()
        for name in [n for n, g in self._last_good.items() if now - g.at > self.stale_limit]:
            del self._last_good[name]

    def classify(self, certname: str) -> Deferred[str]:
        return Deferred.fromCoroutine(self._classify(certname))

    async def _classify(self, certname: str) -> str:
        try:
            check_certname(certname)
        except ClassificationError as e:
            raise Refused("bad-request", str(e)) from None
        fresh = Deferred.fromCoroutine(self._fresh(certname))
        last = self._last_good.get(certname)
        if last is not None and self._clock.seconds() - last.at <= self.stale_limit:
            fresh = _within(fresh, self._clock, self.patience)
        try:
            return await fresh
        except Refused:
            raise
        except Exception as e:
            return self._stale_answer(certname, e)

    async def _fresh(self, certname: str) -> str:
        """A new answer from the caches (which may wait for the store and AWS)."""
        try:
            node, answer = await self._answer(certname)
            # The caches may have learnt of a refusal while this answer was being made.
            self._check_last_known(certname, node)
        except Refused as refusal:
            self._last_good.pop(certname, None)
            log.info("refused {certname}: {code} {message}", certname=certname,
                     code=refusal.code, message=refusal.message)
            raise
        self._last_good[certname] = _LastGood(answer, self._clock.seconds(), node)
        return answer

    def _check_last_known(self, certname: str, node: NodeRecord) -> None:
        """
        Raises :class:`Refused` when the latest state the caches hold, however old (a
        background refresh may have seen it after the node's last answer), refuses the node.
        """
        known, latest = self.nodes.peek(certname)
        if known:
            node = _check_node(certname, latest)
        known, info = self.instances.peek((node.region, node.instance_id))
        if known:
            _check_instance(certname, node, info)

    def _stale_answer(self, certname: str, error: Exception) -> str:
        last = self._last_good.get(certname)
        if last is not None:
            self._check_last_known(certname, last.node)
        age = None if last is None else self._clock.seconds() - last.at
        if last is None or age is None or age > self.stale_limit:
            log.error("cannot classify {certname}: {error}; no good answer within {limit}s",
                      certname=certname, error=str(error) or repr(error), limit=self.stale_limit)
            raise Refused("unavailable", "store or AWS unreachable and no recent classification")
        if not last.said_stale:
            last.said_stale = True
            log.warn("serving {certname} its classification of {age:.0f}s ago (and until it can "
                     "be classified anew): {error}", certname=certname, age=age,
                     error=str(error) or repr(error))
        return last.answer

    async def _answer(self, certname: str) -> tuple[NodeRecord, str]:
        node = _check_node(certname, (await self.nodes.get_many([certname]))[certname])
        key = (node.region, node.instance_id)
        info = _check_instance(certname, node, (await self.instances.get_many([key]))[key])
        made = self._made.get(certname)
        if made is None or made.node is not node or not (made.info is info or made.info == info):
            facts = NodeFacts(certname, node.instance_id, node.account, node.region, node.role,
                              info.security_groups, info.tags)
            made = _Made(node, info, tuple(scopes_for(facts)), facts)
        found = await self.scopes.get_many(made.scopes)
        stored: dict[str, Classification] = {}
        for scope, c in found.items():
            if isinstance(c, InvalidClassification):
                raise Refused("invalid-classification", f"stored {scope} is invalid: {c.reason}")
            if c is not None:
                stored[scope] = c
        if made.answer is not None and made.made_from(stored):
            return node, made.answer
        # The merge and its YAML are a function of the facts and the classifications, each held
        # once per stored value by the readers: the same objects make the same answer.
        answer = to_enc_yaml(merge(made.facts, stored))
        self._made[certname] = _Made(made.node, made.info, made.scopes, made.facts, stored, answer)
        return node, answer


@define
class _Made:
    """A node's last answer with the inputs it was made from (the answer is ``None`` until made)."""

    node: NodeRecord
    info: InstanceInfo
    scopes: tuple[str, ...]
    facts: NodeFacts
    stored: dict[str, Classification] | None = None
    answer: str | None = None

    def made_from(self, stored: dict[str, Classification]) -> bool:
        held = self.stored
        return (held is not None and len(held) == len(stored)
                and all(held.get(scope) is c for scope, c in stored.items()))


class _Slow(Exception):
    """A new answer did not come within the classifier's patience."""


def _within(d: Deferred[str], clock: IReactorTime, seconds: float) -> Deferred[str]:
    """``d``'s result, or :class:`_Slow` after ``seconds``; ``d`` goes on either way."""
    if d.called:
        return d
    out: Deferred[str] = Deferred()
    timer = clock.callLater(seconds, lambda: out.errback(_Slow(f"no new answer within {seconds:g}s")))

    def landed(result: str | Failure) -> None:
        if timer.active():
            timer.cancel()
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
        # Too late for this request; a refusal was logged and the answer cached by _fresh.

    d.addBoth(landed)
    return out


def _check_node(certname: str, node: NodeRecord | None) -> NodeRecord:
    if node is None:
        raise Refused("unknown-node", f"{certname} is not enrolled")
    if node.revoked:
        raise Refused("revoked", f"{certname} was revoked")
    return node


def _check_instance(certname: str, node: NodeRecord, info: InstanceInfo | None) -> InstanceInfo:
    if info is None:
        raise Refused("not-running", f"instance {node.instance_id} of {certname} does not exist")
    if info.state != "running":
        raise Refused("not-running", f"instance {node.instance_id} of {certname} is {info.state}")
    if info.account and info.account != node.account:
        raise Refused("not-running",
                      f"instance {node.instance_id} belongs to another account than {certname}")
    return info


class ClassifierService(Service):
    """Runs the classifier's background refresh while the daemon runs."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier

    @override
    def startService(self) -> None:
        super().startService()
        self.classifier.start()

    @override
    def stopService(self) -> None:
        self.classifier.stop()
        super().stopService()


# -- the socket protocol ----------------------------------------------------------------------


def _err_line(code: str, message: str) -> bytes:
    text = " ".join(message.split())[:400]
    return f"ERR {code} {text}\n".encode("ascii", "backslashreplace")


@implementer(IHalfCloseableProtocol)
class ENCProtocol(Protocol):
    """One request, one answer, then close."""

    def __init__(self, classifier: Classifier, clock: IReactorTime, timeout: float,
                 busy: bool = False) -> None:
        self._classifier = classifier
        self._clock = clock
        self._timeout = timeout
        self._busy = busy
        self._buffer = b""
        self._started = False
        self._answered = False
        self._gone = False
        self._timer: IDelayedCall | None = None

    @override
    def connectionMade(self) -> None:
        if self._busy:
            # Answer at once, but close only once the client's line has been read: closing a
            # socket with unread data resets it, and the client then loses the answer (or
            # cannot even send its line).  Half-close now; the read side drains the request.
            self._answered = True
            if self.transport is not None:
                self.transport.write(_err_line("busy", "too many connections, try again"))
                half_close = getattr(self.transport, "loseWriteConnection", None)
                if half_close is not None:  # stream sockets can; test transports may not
                    half_close()
            self._timer = self._clock.callLater(self._timeout, self._abort)
            return
        self._timer = self._clock.callLater(self._timeout, self._timed_out)

    @override
    def dataReceived(self, data: bytes) -> None:
        if self._busy:
            self._buffer += data
            if b"\n" in self._buffer or len(self._buffer) > MAX_CERTNAME_BYTES + 1:
                self._close_drained()
            return
        if self._started or self._answered:
            return  # one request per connection; anything after it is ignored
        self._buffer += data
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_CERTNAME_BYTES + 1:
                self._refuse("bad-request", f"request longer than {MAX_CERTNAME_BYTES} bytes")
            return
        line = self._buffer[:end].removesuffix(b"\r")
        self._buffer = b""
        if len(line) > MAX_CERTNAME_BYTES:
            self._refuse("bad-request", f"request longer than {MAX_CERTNAME_BYTES} bytes")
            return
        try:
            certname = line.decode("ascii")
        except UnicodeDecodeError:
            self._refuse("bad-request", "certname is not ASCII")
            return
        self._started = True
        self._classifier.classify(certname).addCallbacks(self._classified, self._failed)

    def readConnectionLost(self) -> None:
        if self._busy:
            self._close_drained()
            return
        if not self._started and not self._answered:
            self._refuse("bad-request", "end of input before a newline")

    def _close_drained(self) -> None:
        self._buffer = b""
        if not self._gone and self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self._gone = True

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        self._cancel_timer()

    def _classified(self, answer: str) -> None:
        # The length lets the script tell a whole answer from one cut short, which must never
        # reach puppetserver as a classification with classes missing.
        data = answer.encode("utf-8")
        self._answer(b"OK %d\n" % len(data) + data)

    def _failed(self, failure: Failure) -> None:
        if failure.check(Refused):
            refusal: Refused = failure.value  # type: ignore[assignment]
            self._refuse(refusal.code, refusal.message)
            return
        log.failure("classifying failed", failure)
        self._refuse("internal", "internal error, see the daemon's log")

    def _refuse(self, code: str, message: str) -> None:
        self._answer(_err_line(code, message))

    def _answer(self, data: bytes) -> None:
        if self._answered:
            return
        self._answered = True
        self._cancel_timer()
        if self._gone or self.transport is None:
            return
        self.transport.write(data)
        self.transport.loseConnection()
        # A client that never reads would keep the connection (and its buffer) forever.
        self._timer = self._clock.callLater(self._timeout, self._abort)

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse("timeout", f"no answer within {self._timeout:g}s")
        self._said_timeout()

    def _said_timeout(self) -> None:
        """A hook: the factory's protocol counts timeouts (logged once per outage)."""

    def _abort(self) -> None:
        self._timer = None
        if not self._gone and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class ENCFactory(Factory):
    """
    The factory for the ENC listener: ``serverFromString(reactor, "unix:...:mode=660")
    .listen(ENCFactory(classifier, reactor))``.  ``timeout`` bounds a whole exchange.
    """

    noisy = False

    def __init__(self, classifier: Classifier, clock: IReactorTime, timeout: float = 10.0,
                 max_connections: int = 512) -> None:
        self.classifier = classifier
        self.clock = clock
        self.timeout = timeout
        self.max_connections = max_connections
        self.connections = 0
        # ERR timeout answers, logged once when they start and once when answers come again.
        self.timeouts = Episodes("ENC answers", clock, quiet=timeout)
        #: Every call answered, by outcome: ``ok``, an ERR code, or ``busy`` (the metrics read these).
        self.answers: Counter[str] = Counter()
        #: How long the answered calls took, from the connection to the answer (``busy`` aside).
        self.latencies = Latencies()

    @override
    def buildProtocol(self, addr: Any) -> Protocol:
        return _CountedENCProtocol(self, busy=self.connections >= self.max_connections)


class _CountedENCProtocol(ENCProtocol):
    def __init__(self, factory: ENCFactory, busy: bool) -> None:
        super().__init__(factory.classifier, factory.clock, factory.timeout, busy)
        self._owner = factory
        self._counted = True
        self._began = factory.clock.seconds()
        factory.connections += 1

    @override
    def connectionMade(self) -> None:
        if self._busy:
            self._owner.answers["busy"] += 1
        super().connectionMade()

    @override
    def _answer(self, data: bytes) -> None:
        if not self._answered:
            outcome = "ok" if data.startswith(b"OK ") else data.split(b" ", 2)[1].decode("ascii")
            self._owner.answers[outcome] += 1
            self._owner.latencies.observe(self._owner.clock.seconds() - self._began)
        super()._answer(data)

    @override
    def _said_timeout(self) -> None:
        self._owner.timeouts.failed(f"no answer within {self._owner.timeout:g}s")

    @override
    def _classified(self, answer: str) -> None:
        self._owner.timeouts.answered()
        super()._classified(answer)

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._counted:
            self._counted = False
            self._owner.connections -= 1
        super().connectionLost(reason)


# -- the socket file --------------------------------------------------------------------------


class ENCSocketService(Service):
    """
    The ENC listener with its socket file: removes a stale socket, listens with ``mode``, sets
    the owner and group, and runs the classifier's background refresh.
    """

    def __init__(self, reactor: IReactorUNIX, classifier: Classifier, path: str, *, owner: str = "",
                 group: str = "", mode: int = 0o660, timeout: float = 10.0,
                 backlog: int = 1024) -> None:
        self.reactor = reactor
        self.backlog = backlog
        self.classifier = classifier
        self.path = path
        self.owner = owner
        self.group = group
        self.mode = mode
        self.factory = ENCFactory(classifier, reactor, timeout)  # type: ignore[arg-type]
        self._port: Any = None

    def open(self) -> None:
        """
        Check the owner and group, prepare the directory and listen, before the daemon starts:
        any failure raises :class:`ENCSocketError` (one line) and leaves nothing listening.
        """
        if self._port is not None:
            return
        try:
            _ids(self.owner, self.group)
            prepare_socket(self.path, self.owner, self.group)
        except ValueError as e:
            raise ENCSocketError(str(e)) from None
        except OSError as e:
            raise ENCSocketError(f"[enc] socket: {self.path}: cannot make its directory "
                                 f"{e.filename}: {e.strerror}") from None
        # A deep backlog: on Linux a full one makes a UNIX connect fail at once (EAGAIN), and
        # puppetserver may start many ENC scripts together.
        try:
            port = self.reactor.listenUNIX(self.path, self.factory, mode=self.mode,
                                           backlog=self.backlog)
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            raise ENCSocketError(f"[enc] socket: cannot listen on {self.path}: {reason}") from None
        try:
            secure_socket(self.path, self.owner, self.group, self.mode)
        except OSError as e:
            port.stopListening()
            raise ENCSocketError(f"[enc] socket: {self.path}: {e.strerror}") from None
        self._port = port

    @override
    def startService(self) -> None:
        super().startService()
        self.open()
        log.info("ENC listening on {path}", path=self.path)
        self.classifier.start()

    @override
    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.classifier.stop()
        port, self._port = self._port, None
        if port is None:
            return None
        stopped: Deferred[None] = port.stopListening()
        return stopped


class ENCSocketError(Exception):
    """The ENC socket cannot be opened as configured: one line naming the option."""


class SocketInUse(ENCSocketError):
    """Another process answers on the socket path, or the path is not a socket."""


def prepare_socket(path: str, owner: str = "", group: str = "") -> None:
    """
    Before listening: make the socket's directory (0750, owned by ``owner``/``group`` when
    given, so the group can reach the socket) and remove a stale socket left by a dead daemon.
    Refuses when something answers on ``path`` or ``path`` is not a socket.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o750, exist_ok=True)
        uid, gid = _ids(owner, group)
        os.chown(directory, uid, gid)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"[enc] socket: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError as e:
        raise SocketInUse(f"[enc] socket: {path}: cannot tell whether it is in use: {e}") from e
    finally:
        probe.close()
    raise SocketInUse(f"[enc] socket: another process is listening on {path}")


def secure_socket(path: str, owner: str = "", group: str = "", mode: int = 0o660) -> None:
    """After listening: set the socket's mode and owner (``""`` leaves one unchanged)."""
    uid, gid = _ids(owner, group)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _ids(owner: str, group: str) -> tuple[int, int]:
    """Names or numeric ids; ``""`` becomes -1 (unchanged)."""
    def one(name: str, lookup: Callable[[str], int], option: str, kind: str) -> int:
        if not name:
            return -1
        if name.isdigit():
            return int(name)
        try:
            return lookup(name)
        except KeyError:
            raise ValueError(f"[enc] {option}: no such {kind}: {name!r}") from None
    return (one(owner, lambda n: pwd.getpwnam(n).pw_uid, "socket_owner", "user"),
            one(group, lambda n: grp.getgrnam(n).gr_gid, "socket_group", "group"))
