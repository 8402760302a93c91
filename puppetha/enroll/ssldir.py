"""
Puts an enrolled node's Puppet files in place all at once, or not at all.

Every file and directory is first staged next to its target (same filesystem, so ``rename`` is
atomic); :meth:`Changes.commit` then renames the staged copies over the targets in order and,
if any step fails, puts back what the earlier steps replaced.  A crash or an error before
``commit`` leaves only hidden staging entries (``.NAME.new-*``), never a half-written ssldir.

A master's enrollment adds puppetserver's own files (its ``conf.d`` and ``services.d`` settings,
the ``[server]`` section of puppet.conf) as further :class:`Changes` steps beside the ssldir.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from attrs import field, frozen

#: Puppet's own modes for the ssldir and its parts.
SSLDIR_MODE = 0o771
PUBLIC_DIR_MODE = 0o755
PRIVATE_DIR_MODE = 0o750
PUBLIC_FILE_MODE = 0o644
PRIVATE_KEY_MODE = 0o600
#: A new puppet.conf's mode (an existing one keeps its own).
PUPPET_CONF_MODE = 0o644


class AlreadyEnrolled(Exception):
    """The ssldir already holds a certificate for this certname."""


@frozen
class PuppetCredentials:
    """What an enrolled node keeps in its ssldir, all PEM."""

    certname: str
    private_key: bytes = field(repr=False)
    public_key: bytes
    certificate: bytes
    #: The issuing CA up to the root: Puppet's ``certs/ca.pem``.
    ca_chain: bytes
    #: A CRL for every CA of the chain: Puppet's ``crl.pem``.
    crl_chain: bytes
    #: Further certificates for ``certs/`` by file name (a master's own intermediate CA).
    extra_certificates: Mapping[str, bytes] = field(factory=dict)
    #: Further public files at the ssldir's top by file name (a master's lb CA and its CRL).
    extra_files: Mapping[str, bytes] = field(factory=dict)


def certificate_path(ssldir: Path, certname: str) -> Path:
    return ssldir / "certs" / f"{certname}.pem"


def check_not_enrolled(ssldir: Path, certname: str) -> None:
    """:class:`AlreadyEnrolled` if ``ssldir`` has a certificate for ``certname``."""
    path = certificate_path(ssldir, certname)
    if path.exists():
        raise AlreadyEnrolled(f"{path} already exists (use --force to enroll again and replace it)")


def write_ssldir(changes: Changes, ssldir: Path, credentials: PuppetCredentials, *, force: bool) -> None:
    """
    Stage ``ssldir`` with ``credentials`` in Puppet's layout.  Whatever else the ssldir holds is
    kept; this certname's old certificate request is dropped.
    """
    if not force:
        check_not_enrolled(ssldir, credentials.certname)
    name = f"{credentials.certname}.pem"
    staged = changes.stage_directory(ssldir, SSLDIR_MODE)
    owner = changes.owner_for(ssldir)
    certs = _subdirectory(staged, "certs", PUBLIC_DIR_MODE, owner)
    private_keys = _subdirectory(staged, "private_keys", PRIVATE_DIR_MODE, owner)
    public_keys = _subdirectory(staged, "public_keys", PUBLIC_DIR_MODE, owner)
    _write(private_keys / name, credentials.private_key, PRIVATE_KEY_MODE, owner)
    _write(public_keys / name, credentials.public_key, PUBLIC_FILE_MODE, owner)
    _write(certs / name, credentials.certificate, PUBLIC_FILE_MODE, owner)
    _write(certs / "ca.pem", credentials.ca_chain, PUBLIC_FILE_MODE, owner)
    _write(staged / "crl.pem", credentials.crl_chain, PUBLIC_FILE_MODE, owner)
    for file_name, pem in credentials.extra_certificates.items():
        if "/" in file_name or file_name.startswith(".") or file_name in ("ca.pem", name):
            raise ValueError(f"{file_name!r} is not a name for an extra certificate")
        _write(certs / file_name, pem, PUBLIC_FILE_MODE, owner)
    for file_name, pem in credentials.extra_files.items():
        if "/" in file_name or file_name.startswith(".") or file_name == "crl.pem":
            raise ValueError(f"{file_name!r} is not a name for an extra ssldir file")
        _write(staged / file_name, pem, PUBLIC_FILE_MODE, owner)
    requests = staged / "certificate_requests"
    if requests.is_dir() and not requests.is_symlink():
        (requests / name).unlink(missing_ok=True)


def write_puppet_conf(changes: Changes, path: Path, section: str, settings: Mapping[str, str]) -> None:
    """Stage ``path`` with ``settings`` merged into ``[section]``, everything else kept."""
    write_puppet_conf_sections(changes, path, {section: settings})


def write_puppet_conf_sections(
    changes: Changes, path: Path, sections: Mapping[str, Mapping[str, str]]
) -> None:
    """Stage ``path`` with each section's settings merged in, in order, everything else kept."""
    try:
        existing = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        existing = ""
    except (OSError, UnicodeDecodeError) as e:
        raise OSError(f"cannot read {path}: {e}") from None
    for section, settings in sections.items():
        existing = merge_puppet_conf(existing, section, settings)
    changes.stage_file(path, existing.encode("utf-8"), PUPPET_CONF_MODE)


# puppet.conf is an INI dialect: [section] headers, "name = value" settings, "#" comments.
_SECTION = re.compile(r"\s*\[([^\]]+)\]\s*$")
_SETTING = re.compile(r"(\s*)([A-Za-z0-9_]+)\s*=")
_NAME = re.compile(r"[A-Za-z0-9_]+")


def merge_puppet_conf(text: str, section: str, settings: Mapping[str, str]) -> str:
    """
    ``text`` with each of ``settings`` set in ``[section]``: an existing line for it is replaced
    in place (later duplicates in that section are dropped), a missing one is added at the end of
    the section, and a missing section is added at the end.  Every other line stays as it was.
    Settings before the first header belong to ``[main]``, as Puppet reads them.
    """
    if _NAME.fullmatch(section) is None:
        raise ValueError(f"bad puppet.conf section name {section!r}")
    for name, value in settings.items():
        if _NAME.fullmatch(name) is None:
            raise ValueError(f"bad puppet.conf setting name {name!r}")
        if "\n" in value or "\r" in value or value != value.strip():
            raise ValueError(f"bad value for puppet.conf setting {name}: {value!r}")

    lines = text.splitlines()
    out: list[str] = []
    written: set[str] = set()
    # Lines before the first header are [main] to Puppet; missing settings are only ever added
    # under an explicit header, so the file stays readable.
    current, explicit, found = "main", False, False

    def close_section() -> None:
        # New settings go after the section's last non-blank line, before the blank lines.
        missing = [f"{k} = {v}" for k, v in settings.items() if k not in written]
        written.update(settings)
        at = len(out)
        while at > 0 and not out[at - 1].strip():
            at -= 1
        out[at:at] = missing

    for line in lines:
        header = _SECTION.match(line)
        if header is not None:
            if current == section and explicit:
                close_section()
            current, explicit = header.group(1).strip(), True
            found = found or current == section
            out.append(line)
            continue
        setting = _SETTING.match(line)
        if current == section and setting is not None and setting.group(2) in settings:
            name = setting.group(2)
            if name not in written:
                out.append(f"{setting.group(1)}{name} = {settings[name]}")
                written.add(name)
            continue
        out.append(line)
    if current == section and explicit:
        close_section()
    if not found:
        while out and not out[-1].strip():
            out.pop()
        if out:
            out.append("")
        out.append(f"[{section}]")
        out.extend(f"{k} = {v}" for k, v in settings.items() if k not in written)
    return "\n".join(out) + "\n"


@frozen
class _Step:
    target: Path
    staged: Path
    is_directory: bool


class Changes:
    """
    Files and directories staged beside their targets, put in place together by :meth:`commit`.
    As a context manager, anything not committed is removed on exit.
    """

    def __init__(self) -> None:
        self._steps: list[_Step] = []
        self._committed = False

    def __enter__(self) -> Changes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._committed:
            self.abandon()

    def owner_for(self, target: Path) -> tuple[int, int] | None:
        """
        The uid and gid new files under ``target`` get: those of ``target`` if it exists, else of
        its nearest existing parent (so a puppet-owned ``/var/lib/puppet`` stays puppet's).
        ``None`` when we could not give files away anyway (not root).
        """
        if os.geteuid() != 0:
            return None
        for path in (target, *target.parents):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            return st.st_uid, st.st_gid
        return None

    def stage_directory(self, target: Path, mode: int) -> Path:
        """A staging copy of ``target`` (empty if it does not exist) to edit; replaces it on commit."""
        parent = _make_parents(target)
        staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=parent))
        self._steps.append(_Step(target, staged, is_directory=True))
        if target.is_dir():
            _copy_tree(target, staged)
        else:
            os.chmod(staged, mode)
            _chown(staged, self.owner_for(target))
        return staged

    def stage_file(self, target: Path, content: bytes, mode: int) -> None:
        """Stage ``content`` for ``target``; an existing file's mode and owner are kept."""
        parent = _make_parents(target)
        owner = self.owner_for(target)
        try:
            st = target.stat()
            mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
        except FileNotFoundError:
            pass
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.new-", dir=parent)
        staged = Path(name)
        self._steps.append(_Step(target, staged, is_directory=False))
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        _chown(staged, owner)

    def commit(self) -> None:
        """Rename every staged copy over its target; on failure, undo the steps already done."""
        done: list[tuple[_Step, Path | None]] = []
        try:
            for step in self._steps:
                _fsync_tree(step.staged)
                done.append((step, _swap_in(step)))
        except BaseException:
            for step, backup in reversed(done):
                _swap_back(step, backup)
            for step in self._steps[len(done) :]:
                _remove(step.staged)
            raise
        finally:
            self._committed = True
            self._steps.clear()
        for _, backup in done:
            if backup is not None:
                _remove(backup)

    def abandon(self) -> None:
        """Remove everything staged; the targets are untouched."""
        for step in self._steps:
            _remove(step.staged)
        self._steps.clear()


def _swap_in(step: _Step) -> Path | None:
    """Put ``step.staged`` at ``step.target``; returns where the old target was kept, if any."""
    backup: Path | None = None
    if os.path.lexists(step.target):
        backup = _backup_name(step.target)
        if step.is_directory:
            os.rename(step.target, backup)
        else:
            # A hard link keeps the old file for undo while the rename below replaces the target
            # atomically, so readers never find it missing.
            os.link(step.target, backup)
    try:
        os.replace(step.staged, step.target)
    except BaseException:
        if backup is not None and step.is_directory:
            os.rename(backup, step.target)
        elif backup is not None:
            backup.unlink()
        raise
    _fsync_directory(step.target.parent)
    return backup


def _swap_back(step: _Step, backup: Path | None) -> None:
    if backup is None:
        _remove(step.target)
    elif step.is_directory:
        _remove(step.target)
        os.rename(backup, step.target)
    else:
        os.replace(backup, step.target)


def _backup_name(target: Path) -> Path:
    # mkdtemp reserves a unique name; the rename then takes its place.
    reserved = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    reserved.rmdir()
    return reserved


def _make_parents(target: Path) -> Path:
    parent = target.parent
    parent.mkdir(mode=PUBLIC_DIR_MODE, parents=True, exist_ok=True)
    return parent


def _subdirectory(staged: Path, name: str, mode: int, owner: tuple[int, int] | None) -> Path:
    path = staged / name
    if path.is_symlink():
        # The copy of an ssldir its owner planted a link in: we run as root, and would otherwise
        # chmod and write through it, wherever it points.
        path.unlink()
    if not path.is_dir():
        path.mkdir()
        _chown(path, owner)
    os.chmod(path, mode)
    return path


def _write(path: Path, content: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    path.unlink(missing_ok=True)
    # Created with its final mode: a private key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(content)
    _chown(path, owner)


def _chown(path: Path, owner: tuple[int, int] | None) -> None:
    if owner is not None:
        os.chown(path, *owner, follow_symlinks=False)


def _copy_tree(source: Path, staged: Path) -> None:
    """Copy ``source``'s contents into ``staged`` with modes and owners (copytree keeps no owners)."""
    shutil.copytree(source, staged, symlinks=True, dirs_exist_ok=True)
    for original, copy in _pairs(source, staged):
        st = os.lstat(original)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(copy, stat.S_IMODE(st.st_mode))
        if os.geteuid() == 0:
            os.chown(copy, st.st_uid, st.st_gid, follow_symlinks=False)


def _pairs(source: Path, copy: Path) -> Iterator[tuple[Path, Path]]:
    yield source, copy
    for root, dirs, files in os.walk(source):
        relative = Path(root).relative_to(source)
        for name in (*dirs, *files):
            yield Path(root) / name, copy / relative / name


def _fsync_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                fd = os.open(full, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_directory(Path(root))


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


__all__: Sequence[str] = (
    "AlreadyEnrolled",
    "Changes",
    "PuppetCredentials",
    "certificate_path",
    "check_not_enrolled",
    "merge_puppet_conf",
    "write_puppet_conf",
    "write_puppet_conf_sections",
    "write_ssldir",
)
