"""
The lb role: keep the local nginx serving what the store says.

Each round is discover -> decide -> act.  *Discover* reads masters, CAs and CRLs from the store
(on the thread pool).  *Decide* (:func:`decide_front`, pure) picks the CAs whose whole chain has
a CRL and renders the config and bundles.  *Act* (:meth:`Generations.apply`, on the pool since it
runs nginx) writes the files as a new *generation* directory, has ``nginx -t`` check it, points the
``live`` symlink at it with one atomic rename and reloads nginx.  A generation nginx refuses is
deleted and reported; ``live`` never points at anything untested.

nginx runs with ``-c <dir>/live/nginx.conf``.  The config names its bundles relative to its own
directory, so each generation is self-contained.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from puppetha.ha.nginx import (
    AGENT_BUNDLE_MTIME_AHEAD,
    AGENT_CA_BUNDLE,
    AGENT_CRL_BUNDLE,
    CONFIG_NAME,
    Backend,
    FrontSettings,
    FrontState,
    MasterBackend,
    render_files,
)
from puppetha.store import IStore
from puppetha.store.records import CARecord, CRLRecord, MasterRecord, Records

log = Logger()

NGINX = "/usr/sbin/nginx"
LIVE = "live"
_GENERATION_PREFIX = "gen-"


class FrontError(Exception):
    """nginx could not be brought to the new state."""


class NginxRefused(FrontError):
    """``nginx -t`` refused a generation; ``output`` is what nginx said."""

    def __init__(self, generation: str, output: str) -> None:
        super().__init__(f"nginx refused generation {generation}: {output.strip()}")
        self.generation = generation
        self.output = output


class NginxReloadFailed(FrontError):
    """The signal to reload could not be delivered (nginx not running?)."""


class NginxControl:
    """nginx's command line: check a config, ask the running master to reload."""

    def __init__(self, binary: str = NGINX, error_log: str | None = None, timeout: float = 60.0) -> None:
        self.binary = binary
        # nginx logs to its compiled-in path until it has read the config; -e moves that too.
        self.error_log = error_log
        self.timeout = timeout

    def _argv(self, config: str, *extra: str) -> list[str]:
        argv = [self.binary]
        if self.error_log is not None:
            argv += ["-e", self.error_log]
        return [*argv, "-c", config, *extra]

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout, check=False)

    def test(self, config: str, generation: str = "") -> None:
        """Raise :class:`NginxRefused` unless ``nginx -t`` accepts ``config``."""
        done = self._run(self._argv(config, "-t", "-q"))
        if done.returncode != 0:
            raise NginxRefused(generation or config, done.stderr + done.stdout)

    def reload(self, config: str) -> None:
        """Signal the running master to reload; old workers finish their requests first."""
        done = self._run(self._argv(config, "-s", "reload"))
        if done.returncode != 0:
            raise NginxReloadFailed((done.stderr + done.stdout).strip())


def generation_name(files: Mapping[str, bytes]) -> str:
    """A name that only the same files get: ``gen-`` and a digest of names and contents."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + str(len(files[name])).encode() + b"\0" + files[name])
    return _GENERATION_PREFIX + digest.hexdigest()[:20]


@frozen
class Applied:
    generation: str
    #: False when the live generation already had these files (nothing written, no reload).
    changed: bool


class Generations:
    """
    The lb node's nginx directory: ``gen-<digest>/`` directories and a ``live`` symlink to the one
    nginx runs.  Blocking (file I/O and subprocesses): call from the thread pool.
    """

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = keep

    @property
    def config_path(self) -> str:
        """What nginx's ``-c`` names."""
        return str(self.directory / LIVE / CONFIG_NAME)

    def live(self) -> str | None:
        try:
            target = os.readlink(self.directory / LIVE)
        except (FileNotFoundError, OSError):
            return None
        return Path(target).name

    def install(self, files: Mapping[str, bytes], control: NginxControl, reload: bool = True) -> Applied:
        """
        Make ``files`` live: unchanged if they already are; otherwise write, ``nginx -t``, switch,
        and (with ``reload``) signal nginx.  Raises :class:`NginxRefused` (nothing live changed) or
        :class:`NginxReloadFailed` (the new generation is live; nginx did not get the signal).
        """
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True)
            # nginx's workers open the agent bundles themselves (not as root).
            os.chmod(self.directory, 0o755)  # noqa: S103
        name = generation_name(files)
        previous = self.live()
        if previous == name and self._intact(name, files):
            return Applied(name, changed=False)
        target = self.directory / name
        self._write(target, files)
        try:
            control.test(str(target / CONFIG_NAME), name)
        except NginxRefused:
            shutil.rmtree(target, ignore_errors=True)
            raise
        self._point_live(name)
        self._prune({name, previous})
        if reload:
            control.reload(self.config_path)
        return Applied(name, changed=True)

    def _intact(self, name: str, files: Mapping[str, bytes]) -> bool:
        try:
            return all((self.directory / name / f).read_bytes() == data for f, data in files.items())
        except OSError:
            return False

    def _write(self, target: Path, files: Mapping[str, bytes]) -> None:
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.directory))
        try:
            os.chmod(staging, 0o755)  # noqa: S103 -- nginx's workers read the bundles
            for file_name, data in sorted(files.items()):
                if "/" in file_name or file_name.startswith("."):
                    raise ValueError(f"bad generation file name {file_name!r}")
                path = staging / file_name
                with open(path, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                # Certificates and CRLs only: public material, readable by nginx's workers.
                os.chmod(path, 0o644)
                if file_name in (AGENT_CA_BUNDLE, AGENT_CRL_BUNDLE):
                    # nginx answers agents' If-Modified-Since from this time (see nginx.py).
                    ahead = time.time() + AGENT_BUNDLE_MTIME_AHEAD
                    os.utime(path, (ahead, ahead))
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._sync_directory()

    def _point_live(self, name: str) -> None:
        link = self.directory / f".{LIVE}-{os.getpid()}"
        if link.is_symlink():
            link.unlink()
        os.symlink(name, link)
        os.replace(link, self.directory / LIVE)
        self._sync_directory()

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _prune(self, keep: set[str | None]) -> None:
        # Rounds never overlap, so any staging directory or spare link still here was left by a
        # daemon that died mid-install.
        leftovers = (".staging-", f".{LIVE}-")
        for path in self.directory.iterdir():
            if path.name.startswith(_GENERATION_PREFIX) and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith(leftovers):
                if path.is_symlink() or not path.is_dir():
                    path.unlink(missing_ok=True)
                else:
                    shutil.rmtree(path, ignore_errors=True)


def unreachable_for(path: Path, user: str) -> str | None:
    """
    The first existing directory on the way to ``path`` that ``user`` may not enter (nginx's
    workers open the agent bundles as that user), or ``None``.  Directories not made yet are
    made world-enterable by :class:`Generations`.  An unknown user is nginx's to refuse.
    """
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return None
    if account.pw_uid == 0:
        return None
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    for directory in [*reversed(path.parents), path]:
        try:
            st = directory.stat()
        except FileNotFoundError:
            return None
        if st.st_uid == account.pw_uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return str(directory)
    return None


# -- decide ------------------------------------------------------------------------------------


@frozen
class Trust:
    """What nginx trusts: PEM bundles and the CAs left out of them, with why."""

    ca_pem: bytes
    crl_pem: bytes
    trusted: tuple[str, ...]
    left_out: Mapping[str, str]


def decide_trust(
    cas: Iterable[CARecord], crls: Iterable[CRLRecord], exclude: Iterable[str] = ()
) -> Trust:
    """
    Trust a CA when it and every issuer up to a self-issued root are known, have a CRL, and none
    is in ``exclude``.  nginx checks a CRL for every CA of a chain, so a CA without one would
    make every handshake through it fail anyway; leaving it out says so clearly.
    """
    by_name = {ca.name: ca for ca in cas}
    crl_of = {crl.ca: crl for crl in crls}
    excluded = set(exclude)
    left_out: dict[str, str] = {}

    def why_not(name: str) -> str | None:
        seen: set[str] = set()
        current = name
        while True:
            if current in seen:
                return "its chain loops"
            seen.add(current)
            ca = by_name.get(current)
            if ca is None:
                return f"issuer {current!r} is unknown"
            if current in excluded:
                return "excluded" if current == name else f"issuer {current!r} is excluded"
            if current not in crl_of:
                return "no CRL" if current == name else f"issuer {current!r} has no CRL"
            if ca.parent == current:
                return None
            current = ca.parent

    trusted = []
    for name in sorted(by_name):
        reason = why_not(name)
        if reason is None:
            trusted.append(name)
        else:
            left_out[name] = reason
    return Trust(
        ca_pem=b"".join(_pem(by_name[n].certificate_pem) for n in trusted),
        crl_pem=b"".join(_pem(crl_of[n].crl_pem) for n in trusted),
        trusted=tuple(trusted),
        left_out=left_out,
    )


def _pem(text: str) -> bytes:
    return text.strip().encode("ascii") + b"\n"


@frozen
class FrontInputs:
    """What discover read: the store's masters, CAs and CRLs, and this node's certificate."""

    masters: tuple[MasterRecord, ...]
    cas: tuple[CARecord, ...]
    crls: tuple[CRLRecord, ...]
    certificate_pem: bytes


def server_chain(certificate_pem: bytes, cas: Iterable[CARecord]) -> bytes:
    """
    The lb node's certificate followed by its issuers up to, not including, the root.
    ``ValueError`` when the certificate does not parse or its issuer is not one of ``cas``.
    """
    by_subject: dict[bytes, CARecord] = {}
    for ca in cas:
        cert = x509.load_pem_x509_certificate(ca.certificate_pem.encode("ascii"))
        by_subject[cert.subject.public_bytes()] = ca
    leaf = x509.load_pem_x509_certificate(certificate_pem)
    chain = [leaf.public_bytes(serialization.Encoding.PEM)]
    issuer = by_subject.get(leaf.issuer.public_bytes())
    if issuer is None:
        raise ValueError(f"the lb certificate's issuer {leaf.issuer.rfc4514_string()} is not a puppetha CA")
    seen = set()
    while issuer.parent != issuer.name and issuer.name not in seen:
        seen.add(issuer.name)
        chain.append(_pem(issuer.certificate_pem))
        parent = next((ca for ca in by_subject.values() if ca.name == issuer.parent), None)
        if parent is None:
            raise ValueError(f"CA {issuer.parent!r} is unknown")
        issuer = parent
    return b"".join(chain)


@frozen
class FrontDecision:
    files: Mapping[str, bytes]
    trust: Trust
    state: FrontState


def decide_front(
    settings: FrontSettings,
    inputs: FrontInputs,
    enroll_backends: Sequence[Backend],
    exclude_cas: Iterable[str] = (),
) -> FrontDecision:
    """The generation the store calls for.  Masters whose CA is not trusted stay out."""
    trust = decide_trust(inputs.cas, inputs.crls, exclude_cas)
    # What agents refresh: every CA with a whole chain of CRLs, the excluded ones included
    # (agents check the lb node's chain, which the lb CA signs).
    agents = decide_trust(inputs.cas, inputs.crls)
    masters = [
        MasterBackend(
            certname=m.certname,
            address=m.address,
            port=m.port,
            # A draining master leaves the upstream at once: new requests go to the others, and
            # nginx's reload lets the old workers finish the requests they had sent it.
            healthy=m.healthy and m.ca in trust.trusted and not m.draining,
            registered_at=m.registered_at,
            draining=m.draining,
        )
        for m in inputs.masters
    ]
    state = FrontState(settings=settings, masters=tuple(masters), enroll_backends=tuple(enroll_backends))
    chain = server_chain(inputs.certificate_pem, inputs.cas)
    files = render_files(
        state, trust.ca_pem, trust.crl_pem, chain,
        agent_ca_bundle=agents.ca_pem, agent_crl_bundle=agents.crl_pem,
    )  # fmt: skip
    return FrontDecision(files, trust, state)


def discover_front(store: IStore, settings: FrontSettings) -> FrontInputs:
    """Blocking: read the store and this node's certificate file."""
    records = Records(store)
    return FrontInputs(
        masters=tuple(v.record for v in records.list(MasterRecord)),
        cas=tuple(v.record for v in records.list(CARecord)),
        crls=tuple(v.record for v in records.list(CRLRecord)),
        certificate_pem=Path(settings.certificate).read_bytes(),
    )


# -- act: the service --------------------------------------------------------------------------


class RunsBlocking(Protocol):
    """:class:`puppetha.threads.Blocking`, or a synchronous stand-in in unit tests."""

    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]: ...


class FrontService(Service):
    """
    Reconciles nginx with the store every ``interval`` seconds and whenever :meth:`poke` is
    called (the enrollment service and the health checker poke after they change masters).
    Rounds never overlap; pokes during a round coalesce into one more round.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        blocking: RunsBlocking,
        store: IStore,
        settings: FrontSettings,
        generations: Generations,
        control: NginxControl,
        enroll_backends: Sequence[Backend] = (),
        exclude_cas: Iterable[str] = (),
        interval: float = 10.0,
    ) -> None:
        self.clock = clock
        self.blocking = blocking
        self.store = store
        self.settings = settings
        self.generations = generations
        self.control = control
        self.enroll_backends = tuple(enroll_backends)
        self.exclude_cas = frozenset(exclude_cas)
        self.interval = interval
        self._loop: LoopingCall | None = None
        self._current: Deferred[Applied | None] | None = None
        self._waiters: list[Deferred[Applied | None]] = []
        #: The generation nginx was last signalled to load (None: not yet, or the signal failed).
        self.reloaded: str | None = None
        self._last_left_out: Mapping[str, str] = {}
        #: Whether nginx could not be signalled since it was last reached: said once, not every round.
        self._nginx_unreachable = False

    def startService(self) -> None:
        super().startService()
        user = self.settings.runtime.user
        blocked = unreachable_for(Path(self.settings.runtime.live_dir), user) if user else None
        if blocked is not None:
            log.error(
                "nginx's workers ({user}) cannot enter {directory}: agents cannot refresh their "
                "CRLs through this front; put [lb] nginx_dir where {user} may enter, or run "
                "nginx as this daemon's user",
                user=user,
                directory=blocked,
            )
        self._loop = LoopingCall(self.poke)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._current is None:
            return None
        done: Deferred[None] = Deferred()

        def stopped(result: object) -> object:
            done.callback(None)
            return result

        self._current.addBoth(stopped)
        return done

    def poke(self) -> Deferred[Applied | None]:
        """
        Reconcile now, or right after the round in progress.  Fires with the result of the
        round that includes this poke (``None`` when that round failed; the failure is logged).
        """
        if self._current is not None:
            waiter: Deferred[Applied | None] = Deferred()
            self._waiters.append(waiter)
            return waiter
        return self._start()

    def _start(self) -> Deferred[Applied | None]:
        d = self.blocking.call(self._discover_and_decide)
        d.addCallback(self._act_on)
        d.addErrback(self._failed)
        self._current = d
        d.addBoth(self._finished)
        return d

    def _finished(self, result: Applied | None) -> Applied | None:
        self._current = None
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            following = self._start()

            def fan_out(r: Applied | None) -> Applied | None:
                for waiter in waiters:
                    waiter.callback(r)
                return r

            following.addCallback(fan_out)
        return result

    def _discover_and_decide(self) -> FrontDecision:
        # Both on the pool: the store is blocking, and decide parses certificates.
        inputs = discover_front(self.store, self.settings)
        return decide_front(self.settings, inputs, self.enroll_backends, self.exclude_cas)

    def _act_on(self, decision: FrontDecision) -> Deferred[Applied]:
        if decision.trust.left_out != self._last_left_out:
            for name, reason in sorted(decision.trust.left_out.items()):
                if reason != "excluded":
                    log.warn("front leaves CA {ca} out: {reason}", ca=name, reason=reason)
            self._last_left_out = decision.trust.left_out
        d = self.blocking.call(self._act, decision.files)
        d.addCallback(self._acted, decision)
        return d

    def _act(self, files: Mapping[str, bytes]) -> Applied:
        applied = self.generations.install(files, self.control, reload=False)
        if applied.changed or self.reloaded != applied.generation:
            try:
                self.control.reload(self.generations.config_path)
            except NginxReloadFailed:
                self.reloaded = None
                raise
            self.reloaded = applied.generation
            return Applied(applied.generation, changed=True)
        return applied

    def _acted(self, applied: Applied, decision: FrontDecision) -> Applied:
        if self._nginx_unreachable:
            self._nginx_unreachable = False
            log.info("nginx reached: it serves {generation}", generation=applied.generation)
        if applied.changed:
            healthy = [m.certname for m in decision.state.masters if m.healthy]
            log.info(
                "nginx now serves {generation}: masters {masters}, CAs {cas}",
                generation=applied.generation,
                masters=healthy,
                cas=list(decision.trust.trusted),
            )
        return applied

    def _failed(self, failure: Failure) -> None:
        if failure.check(NginxRefused):
            log.error("nginx refused the new configuration, keeping the old one: {error}",
                      error=str(failure.value))
        elif failure.check(NginxReloadFailed):
            # Until nginx runs (an lb node's first boot) every round fails alike: one line per episode.
            if not self._nginx_unreachable:
                self._nginx_unreachable = True
                log.error("nginx could not be reloaded: {error}; trying every round, said again once "
                          "it is reached", error=str(failure.value))
        else:
            log.failure("front reconcile failed", failure)
