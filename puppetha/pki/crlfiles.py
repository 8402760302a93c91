"""
A master's CRL files kept in step with the store.

``puppetha-enroll --role master`` writes puppetserver's CRLs once: ``<ssldir>/lb-crl.pem`` (the lb
CA's, which puppetserver's listener checks lb nodes against, ``ssl-crl-path``) and
``<ssldir>/crl.pem`` (every CA's, Puppet's ``hostcrl``).  The daemon on a master (it runs there
for the ENC) keeps both fresh: each round reads the CRLs from the store (discover), computes each
file's bytes (decide, pure: :func:`crl_bundles`) and replaces only the files whose bytes differ
(act: :func:`replace_file`, same-directory temporary file and rename, the old file's owner and
mode kept).

puppetserver 7 picks the new ``lb-crl.pem`` up without a restart: trapperkeeper-webserver-jetty9
(4.4) watches the directory of ``ssl-crl-path`` when the filesystem-watch service is in
puppetserver's services (Debian's ``ca.cfg`` and ours list it) and reloads its SSL context
factory when that path changes; a rename into place is such a change.  See docs/pki.md.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from puppetha.pki.authority import LB_CA, ROOT
from puppetha.repeat import Repeating, RepeatingService
from puppetha.store import IStore
from puppetha.store.records import CRLRecord, Records

log = Logger()

#: Mode of a CRL file that did not exist yet: public material, read by puppetserver's user.
NEW_FILE_MODE = 0o644


@frozen
class CRLFile:
    """One file and the CAs whose CRLs it holds (``None``: every CA, the root first)."""

    path: str
    cas: tuple[str, ...] | None = None


def master_crl_files(ssldir: str) -> tuple[CRLFile, ...]:
    """A master's CRL files, where ``PuppetserverLayout`` puts them under ``ssldir``."""
    return (
        CRLFile(os.path.join(ssldir, "crl.pem")),
        CRLFile(os.path.join(ssldir, "lb-crl.pem"), (LB_CA,)),
    )


class MissingCRL(ValueError):
    """A file asks for the CRL of a CA the store does not have."""


def crl_bundles(files: Iterable[CRLFile], crls: Iterable[CRLRecord]) -> dict[str, bytes]:
    """
    Each file's bytes: its CAs' CRLs in PEM, in the order the enrollment answer gives them (the
    root first, then by name), so an unchanged store gives the bytes ``puppetha-enroll`` wrote.
    """
    by_ca = {crl.ca: crl for crl in crls}
    every = sorted(by_ca, key=lambda name: (name != ROOT, name))
    out = {}
    for f in files:
        names = every if f.cas is None else list(f.cas)
        missing = [name for name in names if name not in by_ca]
        if missing:
            raise MissingCRL(f"{f.path}: the store has no CRL for {', '.join(missing)}")
        out[f.path] = "".join(by_ca[name].crl_pem for name in names).encode("ascii")
    return out


def replace_file(path: str, data: bytes) -> bool:
    """
    Blocking: make ``path`` hold ``data``; ``False`` (nothing written) when it already does.

    Written to a temporary file in the same directory, flushed to disk, given the old file's
    owner and mode (a new file: :data:`NEW_FILE_MODE` and the directory's owner; without root,
    only the group), and renamed
    over ``path``: a reader (puppetserver, nginx, an agent) sees the old bytes or the new, never
    a half-written CRL.
    """
    target = Path(path)
    try:
        if target.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    try:
        st = target.stat()
        mode, uid, gid = st.st_mode & 0o7777, st.st_uid, st.st_gid
    except FileNotFoundError:
        parent = target.parent.stat()
        mode, uid, gid = NEW_FILE_MODE, parent.st_uid, parent.st_gid
    fd, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if (uid, gid) != (os.geteuid(), os.getegid()):
                try:
                    os.fchown(f.fileno(), uid, gid)
                except PermissionError:
                    # Not root (the daemon's own user, in the ssldir's group): the file becomes
                    # ours, in the old group, with the old mode, so puppetserver still reads it.
                    with contextlib.suppress(PermissionError):
                        os.fchown(f.fileno(), -1, gid)
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return True


class RunsBlocking(Protocol):
    """:class:`puppetha.threads.Blocking`, or a synchronous stand-in in unit tests."""

    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]: ...


class CRLFilesService(RepeatingService):
    """
    Every ``interval``, writes the store's CRLs into ``files`` where they changed.  A failed
    round (store unreachable, a file not writable) is logged; the next one tries again, and the
    files keep their last good content meanwhile.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        blocking: RunsBlocking,
        store: IStore,
        files: Sequence[CRLFile],
        interval: float,
    ) -> None:
        self.blocking = blocking
        self.store = store
        self.files = tuple(files)
        self._repeating = Repeating(self.refresh, clock, interval)
        #: What the last round could not write, so each problem is logged once, not every round.
        self._missing: list[str] = []

    def refresh(self) -> Deferred[list[str]]:
        """One round; fires with the paths rewritten (an empty list when it failed)."""
        d = self.blocking.call(self._round)
        d.addCallback(self._written)
        d.addErrback(self._failed)
        return d

    def _round(self) -> list[str]:
        crls = [v.record for v in Records(self.store).list(CRLRecord)]
        written = []
        missing = []
        for f in self.files:
            try:
                data = crl_bundles([f], crls)[f.path]
            except MissingCRL as e:
                # Not yet (a store without the lb CA): the other files still follow the store.
                missing.append(str(e))
                continue
            if replace_file(f.path, data):
                written.append(f.path)
        if missing != self._missing:
            for problem in missing:
                log.warn("not writing a CRL file: {problem}", problem=problem)
            self._missing = missing
        return written

    def _written(self, paths: list[str]) -> list[str]:
        for path in paths:
            log.info("wrote the store's CRLs to {path}", path=path)
        return paths

    def _failed(self, failure: Failure) -> list[str]:
        log.failure("refreshing the CRL files failed; they keep their last content", failure)
        return []

