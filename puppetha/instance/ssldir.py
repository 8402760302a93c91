"""
Puts an enrolled node's Puppet files in place all at once, or not at all.

Every file and directory is first staged next to its target (same filesystem, so ``rename`` is
atomic); :meth:`Changes.commit` then renames the staged copies over the targets in order and,
if any step fails, puts back what the earlier steps replaced.  A crash or an error before
``commit`` leaves only hidden staging entries (``.NAME.new-*``), never a half-written ssldir.

The ssldir belongs to another user (Debian's ``puppet``, which runs puppetserver on masters), who
may also own its parent; we run as root.  So nothing there is reached by path as root: a
:class:`StagedDirectory` is a root-owned 0700 directory reached only through file descriptors
(``openat`` with ``O_NOFOLLOW``, ``fchmod``, ``fchown``), an existing ssldir is copied into it the
same way, and its top is given its final mode and owner only just before the rename that puts
it in place.  A link planted in the ssldir is copied as a link and never followed.

A master's enrollment adds puppetserver's own files (its ``conf.d`` and ``services.d`` settings,
the ``[server]`` section of puppet.conf) as further :class:`Changes` steps beside the ssldir.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from attrs import evolve, field, frozen

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
    certs = staged.subdirectory("certs", PUBLIC_DIR_MODE)
    private_keys = staged.subdirectory("private_keys", PRIVATE_DIR_MODE)
    public_keys = staged.subdirectory("public_keys", PUBLIC_DIR_MODE)
    private_keys.write(name, credentials.private_key, PRIVATE_KEY_MODE)
    public_keys.write(name, credentials.public_key, PUBLIC_FILE_MODE)
    certs.write(name, credentials.certificate, PUBLIC_FILE_MODE)
    certs.write("ca.pem", credentials.ca_chain, PUBLIC_FILE_MODE)
    staged.write("crl.pem", credentials.crl_chain, PUBLIC_FILE_MODE)
    for file_name, pem in credentials.extra_certificates.items():
        if "/" in file_name or file_name.startswith(".") or file_name in ("ca.pem", name):
            raise ValueError(f"{file_name!r} is not a name for an extra certificate")
        certs.write(file_name, pem, PUBLIC_FILE_MODE)
    for file_name, pem in credentials.extra_files.items():
        if "/" in file_name or file_name.startswith(".") or file_name == "crl.pem":
            raise ValueError(f"{file_name!r} is not a name for an extra ssldir file")
        staged.write(file_name, pem, PUBLIC_FILE_MODE)
    requests = staged.existing_subdirectory("certificate_requests")
    if requests is not None:
        requests.remove(name)


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


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class StagedDirectory:
    """
    A directory being staged, reached only through its file descriptor: what an attacker does
    to the paths around it cannot redirect a write, a chmod or a chown.  Everything made in it
    gets its final mode and ``owner`` at once; that is safe because the top of the staging tree
    stays root-owned 0700 until :meth:`Changes.commit` (nobody else can reach inside).
    """

    def __init__(self, fd: int, owner: tuple[int, int] | None) -> None:
        self.fd = fd
        self.owner = owner
        self._children: list[StagedDirectory] = []

    def subdirectory(self, name: str, mode: int) -> StagedDirectory:
        """The directory ``name`` (made if missing; a link or a file there is replaced)."""
        _check_name(name)
        try:
            fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            fd = self._make_directory(name)
        except OSError as e:
            if not isinstance(e, NotADirectoryError) and e.errno != errno.ELOOP:
                raise
            # A link (ELOOP with O_NOFOLLOW) or a file where Puppet keeps a directory: the copy of
            # an ssldir its owner planted it in.  Replaced, never followed.
            os.unlink(name, dir_fd=self.fd)
            fd = self._make_directory(name)
        child = StagedDirectory(fd, self.owner)
        self._children.append(child)
        os.fchmod(fd, mode)
        return child

    def existing_subdirectory(self, name: str) -> StagedDirectory | None:
        """The directory ``name`` if it is one (not a link to one), else ``None``."""
        _check_name(name)
        try:
            fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=self.fd)
        except OSError:
            return None
        child = StagedDirectory(fd, self.owner)
        self._children.append(child)
        return child

    def write(self, name: str, content: bytes, mode: int) -> None:
        """The file ``name`` with ``content``, created with ``mode`` (whatever was there is replaced)."""
        _check_name(name)
        self.remove(name)
        # Created with its final mode: a private key is never readable by others, not even briefly.
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                     dir_fd=self.fd)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
            _fchown(f.fileno(), self.owner)

    def remove(self, name: str) -> None:
        """Remove the file or link ``name``, if there is one (never what a link points to)."""
        _check_name(name)
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            shutil.rmtree(name, dir_fd=self.fd)

    def close(self) -> None:
        """fsync and close this directory and every one opened under it."""
        for child in self._children:
            child.close()
        self._children.clear()
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1

    def _make_directory(self, name: str) -> int:
        os.mkdir(name, 0o700, dir_fd=self.fd)
        fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=self.fd)
        _fchown(fd, self.owner)
        return fd


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a file name")


@frozen
class _Step:
    target: Path
    #: The staged copy's name in the target's directory, ``parent``: a descriptor opened when
    #: staging began, so that every later rename and removal happens in that same directory
    #: whatever is done to the path meanwhile.
    staged: str
    parent: int
    is_directory: bool
    #: A staged directory: its handle, and the mode and owner its top takes just before commit.
    handle: StagedDirectory | None = None
    mode: int = 0
    owner: tuple[int, int] | None = None


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

    def stage_directory(self, target: Path, mode: int) -> StagedDirectory:
        """
        A staging copy of ``target`` (empty if it does not exist) to edit; replaces it on commit.
        The copy keeps the modes and owners of what it copies; its top takes ``target``'s (or
        ``mode`` and the owner of the nearest parent) only at commit.
        """
        parent = _open_parent(target)
        staged = _unique_name(target, "new")
        try:
            os.mkdir(staged, 0o700, dir_fd=parent)
            fd = os.open(staged, _DIRECTORY_FLAGS, dir_fd=parent)
        except BaseException:
            os.close(parent)
            raise
        owner = self.owner_for(target)
        handle = StagedDirectory(fd, owner)
        step = _Step(target, staged, parent, True, handle, SSLDIR_MODE, owner)
        self._steps.append(step)
        try:
            source = os.open(target.name, _DIRECTORY_FLAGS, dir_fd=parent)
        except (FileNotFoundError, NotADirectoryError):
            source = -1
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            source = -1  # the ssldir itself a link: replaced by a directory, never followed
        if source >= 0:
            try:
                st = os.fstat(source)
                mode = stat.S_IMODE(st.st_mode) & 0o777
                owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
                _copy_into(source, handle.fd)
            finally:
                os.close(source)
        self._steps[-1] = evolve(step, mode=mode, owner=owner)
        return handle

    def stage_file(self, target: Path, content: bytes, mode: int) -> None:
        """Stage ``content`` for ``target``; an existing file's mode and owner are kept."""
        parent = _open_parent(target)
        try:
            owner = self.owner_for(target)
            try:
                st = os.stat(target.name, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    mode, owner = stat.S_IMODE(st.st_mode) & 0o777, (st.st_uid, st.st_gid)
            except FileNotFoundError:
                pass
            staged = _unique_name(target, "new")
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent)
        except BaseException:
            os.close(parent)
            raise
        self._steps.append(_Step(target, staged, parent, is_directory=False))
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
            if os.geteuid() == 0:
                _fchown(f.fileno(), owner)

    def commit(self) -> None:
        """Rename every staged copy over its target; on failure, undo the steps already done."""
        done: list[tuple[_Step, str | None]] = []
        merged: list[_Step] = []
        processed = 0
        try:
            for step in self._steps:
                if step.handle is not None:
                    _finish(step, step.handle)
                try:
                    done.append((step, _swap_in(step)))
                except OSError as e:
                    if e.errno != errno.EXDEV or not step.is_directory:
                        raise
                    # overlayfs will not rename a directory of a lower layer (an ssldir that came
                    # with the image): the staged entries move into it one by one instead.
                    _merge_in(step)
                    merged.append(step)
                processed += 1
        except BaseException:
            for step, backup in reversed(done):
                _swap_back(step, backup)
            for step in merged:
                _abandon(step)  # what was merged in stays: it cannot be taken back
            for step in self._steps[processed:]:
                _abandon(step)
            raise
        finally:
            self._committed = True
            self._steps.clear()
        for step, backup in done:
            try:
                if backup is not None:
                    _remove_at(backup, step.parent)
            finally:
                os.close(step.parent)
        for step in merged:
            _abandon(step)

    def abandon(self) -> None:
        """Remove everything staged; the targets are untouched."""
        for step in self._steps:
            _abandon(step)
        self._steps.clear()


def _finish(step: _Step, handle: StagedDirectory) -> None:
    """The staged directory's top takes its final mode and owner: from here on it is theirs."""
    os.fchmod(handle.fd, step.mode)
    if os.geteuid() == 0:
        _fchown(handle.fd, step.owner)
    handle.close()


def _abandon(step: _Step) -> None:
    if step.handle is not None:
        step.handle.close()
    try:
        _remove_at(step.staged, step.parent)
    finally:
        os.close(step.parent)


def _swap_in(step: _Step) -> str | None:
    """Put the staged copy at ``step.target``; returns the name the old target was kept under."""
    parent, name = step.parent, step.target.name
    backup: str | None = None
    if _lexists(name, parent):
        backup = _unique_name(step.target, "old")
        if step.is_directory:
            os.rename(name, backup, src_dir_fd=parent, dst_dir_fd=parent)
        else:
            # A hard link keeps the old file for undo while the rename below replaces the
            # target atomically, so readers never find it missing.
            os.link(name, backup, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
    try:
        os.rename(step.staged, name, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException:
        if backup is not None and step.is_directory:
            os.rename(backup, name, src_dir_fd=parent, dst_dir_fd=parent)
        elif backup is not None:
            os.unlink(backup, dir_fd=parent)
        raise
    os.fsync(parent)
    return backup


def _merge_in(step: _Step) -> None:
    """
    Move what is staged for the directory ``step.target`` into it entry by entry (each file
    replaced atomically, what the staging left out removed), through file descriptors, then
    give it the staged top's mode and owner.  Not undone if a later step fails.
    """
    staged = os.open(step.staged, _DIRECTORY_FLAGS, dir_fd=step.parent)
    try:
        target = os.open(step.target.name, _DIRECTORY_FLAGS, dir_fd=step.parent)
        try:
            _merge(staged, target)
            os.fchmod(target, step.mode)
            if os.geteuid() == 0:
                _fchown(target, step.owner)
            os.fsync(target)
        finally:
            os.close(target)
    finally:
        os.close(staged)


def _merge(staged: int, target: int) -> None:
    names = set(os.listdir(staged))
    for name in os.listdir(target):
        if name not in names:
            _remove_at(name, target)
    for name in sorted(names):
        st = os.stat(name, dir_fd=staged, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            try:
                inner_target = os.open(name, _DIRECTORY_FLAGS, dir_fd=target)
            except OSError as e:
                if not isinstance(e, FileNotFoundError | NotADirectoryError) and e.errno != errno.ELOOP:
                    raise
                _remove_at(name, target)
                os.rename(name, name, src_dir_fd=staged, dst_dir_fd=target)
                continue
            try:
                inner_staged = os.open(name, _DIRECTORY_FLAGS, dir_fd=staged)
                try:
                    _merge(inner_staged, inner_target)
                finally:
                    os.close(inner_staged)
                os.fchmod(inner_target, stat.S_IMODE(st.st_mode))
                if os.geteuid() == 0:
                    os.fchown(inner_target, st.st_uid, st.st_gid)
                os.fsync(inner_target)
            finally:
                os.close(inner_target)
        else:
            try:
                os.rename(name, name, src_dir_fd=staged, dst_dir_fd=target)
            except IsADirectoryError:
                _remove_at(name, target)
                os.rename(name, name, src_dir_fd=staged, dst_dir_fd=target)


def _remove_at(name: str, dir_fd: int) -> None:
    """Remove the entry ``name`` of the directory open at ``dir_fd``; a link is never followed."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(name, dir_fd=dir_fd)


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _swap_back(step: _Step, backup: str | None) -> None:
    parent, name = step.parent, step.target.name
    try:
        if backup is None:
            _remove_at(name, parent)
        elif step.is_directory:
            _remove_at(name, parent)
            os.rename(backup, name, src_dir_fd=parent, dst_dir_fd=parent)
        else:
            os.rename(backup, name, src_dir_fd=parent, dst_dir_fd=parent)
    finally:
        os.close(parent)


def _unique_name(target: Path, what: str) -> str:
    return f".{target.name}.{what}-{secrets.token_hex(6)}"


def _open_parent(target: Path) -> int:
    """The target's directory (made if missing), opened once for every step on it."""
    parent = target.parent
    parent.mkdir(mode=PUBLIC_DIR_MODE, parents=True, exist_ok=True)
    return os.open(parent, _DIRECTORY_FLAGS & ~os.O_NOFOLLOW)


def _fchown(fd: int, owner: tuple[int, int] | None) -> None:
    if owner is not None:
        os.fchown(fd, *owner)


def _copy_into(source: int, copy: int) -> None:
    """
    Copy the directory open at ``source`` into the one open at ``copy``, entry by entry through
    file descriptors, with modes (less setuid, setgid and sticky bits) and owners.  Links are
    copied as links, never followed; a directory is entered only with ``O_NOFOLLOW``; a file is
    copied only if, once opened, it is a regular file with one link (a hard link to a file
    elsewhere is not Puppet's and is not copied, nor is anything but files, directories and links).
    """
    as_root = os.geteuid() == 0
    for entry in os.scandir(source):
        name = entry.name
        try:
            st = os.stat(name, dir_fd=source, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            try:
                os.symlink(os.readlink(name, dir_fd=source), name, dir_fd=copy)
            except FileNotFoundError:
                continue
            if as_root:
                os.chown(name, st.st_uid, st.st_gid, dir_fd=copy, follow_symlinks=False)
        elif stat.S_ISDIR(st.st_mode):
            try:
                inner = os.open(name, _DIRECTORY_FLAGS, dir_fd=source)
            except OSError:
                continue  # swapped for something else since: not copied
            try:
                found = os.fstat(inner)
                os.mkdir(name, 0o700, dir_fd=copy)
                made = os.open(name, _DIRECTORY_FLAGS, dir_fd=copy)
                try:
                    _copy_into(inner, made)
                    os.fchmod(made, stat.S_IMODE(found.st_mode) & 0o777)
                    if as_root:
                        os.fchown(made, found.st_uid, found.st_gid)
                finally:
                    os.close(made)
            finally:
                os.close(inner)
        elif stat.S_ISREG(st.st_mode):
            _copy_file(name, source, copy, as_root)


def _copy_file(name: str, source: int, copy: int, as_root: bool) -> None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=source)
    except OSError:
        return  # gone, or swapped for a link or a FIFO since: not copied
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
            return
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=copy)
        try:
            while chunk := os.read(fd, 1 << 16):
                os.write(out, chunk)
            os.fchmod(out, stat.S_IMODE(found.st_mode) & 0o777)
            if as_root:
                os.fchown(out, found.st_uid, found.st_gid)
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(fd)


__all__: Sequence[str] = (
    "AlreadyEnrolled",
    "Changes",
    "PuppetCredentials",
    "StagedDirectory",
    "certificate_path",
    "check_not_enrolled",
    "merge_puppet_conf",
    "write_puppet_conf",
    "write_puppet_conf_sections",
    "write_ssldir",
)
