"""A master's CRL files kept in step with the store: the pure bundles, the atomic write, the timer."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher

from puppetha.pki.authority import LB_CA
from puppetha.pki.crlfiles import (
    NEW_FILE_MODE,
    CRLFile,
    CRLFilesService,
    MissingCRL,
    crl_bundles,
    master_crl_files,
    replace_file,
)
from puppetha.store.records import CRLRecord
from puppetha.testing.nginx import FrontPKI


def crl(ca: str, number: int = 1) -> CRLRecord:
    return CRLRecord(ca=ca, number=number, crl_pem=f"CRL {ca} {number}\n", this_update=0, next_update=1)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # Every CA, the root first, then by name: the order of the enrollment answer.
        ([CRLFile("a")], {"a": b"CRL root 1\nCRL lb 1\nCRL m1 1\n"}),
        ([CRLFile("b", (LB_CA,))], {"b": b"CRL lb 1\n"}),
        (
            [CRLFile("a"), CRLFile("b", (LB_CA,))],
            {"a": b"CRL root 1\nCRL lb 1\nCRL m1 1\n", "b": b"CRL lb 1\n"},
        ),
    ],
)
def test_crl_bundles(files: list[CRLFile], expected: dict[str, bytes]) -> None:
    assert crl_bundles(files, [crl("m1"), crl(LB_CA), crl("root")]) == expected


def test_a_file_asking_for_an_unknown_cas_crl_is_refused() -> None:
    with pytest.raises(MissingCRL, match="no CRL for lb"):
        crl_bundles([CRLFile("b", (LB_CA,))], [crl("root")])


def test_master_crl_files_are_where_puppetha_enroll_writes_them() -> None:
    assert master_crl_files("/var/lib/puppet/ssl") == (
        CRLFile("/var/lib/puppet/ssl/crl.pem"),
        CRLFile("/var/lib/puppet/ssl/lb-crl.pem", (LB_CA,)),
    )


def test_replace_file_keeps_owner_and_mode_and_leaves_nothing_beside(tmp_path: Path) -> None:
    target = tmp_path / "lb-crl.pem"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    os.chown(target, 65534, 65534)
    inode = target.stat().st_ino
    assert replace_file(str(target), b"new")
    st = target.stat()
    assert target.read_bytes() == b"new"
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 65534, 65534)
    # Renamed into place (readers never see half a file), not written over the old inode.
    assert st.st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lb-crl.pem"]


def test_replace_file_writes_nothing_when_the_bytes_are_the_same(tmp_path: Path) -> None:
    target = tmp_path / "crl.pem"
    target.write_bytes(b"same")
    before = target.stat()
    assert not replace_file(str(target), b"same")
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_new_file_takes_the_directorys_owner(tmp_path: Path) -> None:
    os.chown(tmp_path, 65534, 65533)
    assert replace_file(str(tmp_path / "crl.pem"), b"x")
    st = (tmp_path / "crl.pem").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (NEW_FILE_MODE, 65534, 65533)


def test_without_root_the_file_keeps_its_group_and_mode() -> None:
    # A master's ssldir: 0771, puppet's group; the daemon's user is in that group, not root.
    group, daemon_user = 65533, 65534
    top = Path(tempfile.mkdtemp(prefix="crlfiles-"))  # pytest's tmp_path is root's alone
    try:
        os.chmod(top, 0o755)  # noqa: S103 -- the other user must reach the ssldir
        ssldir = top / "ssl"
        ssldir.mkdir()
        os.chown(ssldir, 0, group)
        os.chmod(ssldir, 0o771)  # noqa: S103 -- Puppet's own ssldir mode
        target = ssldir / "lb-crl.pem"
        target.write_bytes(b"old")
        os.chown(target, 0, group)
        os.chmod(target, 0o644)
        child = os.fork()
        if child == 0:  # pragma: no cover -- the child reports through its exit status
            try:
                os.setgroups([group])
                os.setgid(daemon_user)
                os.setuid(daemon_user)
                os._exit(0 if replace_file(str(target), b"new") else 2)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        st = target.stat()
        assert target.read_bytes() == b"new"
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o644, daemon_user, group)
        assert sorted(p.name for p in ssldir.iterdir()) == ["lb-crl.pem"]
    finally:
        shutil.rmtree(top)


def test_a_failed_write_leaves_the_old_file_and_no_staging(tmp_path: Path) -> None:
    target = tmp_path / "crl.pem"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        replace_file(str(target), "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crl.pem"]


class Synchronous:
    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        try:
            return succeed(f(*args, **kwargs))
        except Exception:
            return fail()


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[FrontPKI]:
    pki = FrontPKI(tmp_path / "pki")
    pki.add_ca(LB_CA)
    pki.add_ca("m1")
    try:
        yield pki
    finally:
        pki.close()


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def test_a_revoked_lb_node_reaches_the_masters_file_at_the_next_round(
    pki: FrontPKI, tmp_path: Path, logged: list[LogEvent]
) -> None:
    ssldir = tmp_path / "ssl"
    ssldir.mkdir()
    files = master_crl_files(str(ssldir))
    # What puppetha-enroll wrote at enrollment.
    (ssldir / "crl.pem").write_bytes(pki.authority.crl_chain_pem())
    (ssldir / "lb-crl.pem").write_text(pki.authority.crl(LB_CA).crl_pem)
    clock = Clock()
    service = CRLFilesService(clock=clock, blocking=Synchronous(), store=pki.store, files=files, interval=10)
    service.startService()
    try:
        # Nothing changed in the store: nothing written.
        assert [e for e in logged if "wrote the store's CRLs" in e.get("log_format", "")] == []
        lb = pki.leaf(LB_CA, "lb9")
        pki.revoke(lb)
        clock.advance(9)
        assert str(lb.serial) not in _serials(ssldir / "lb-crl.pem")
        clock.advance(1)
        assert str(lb.serial) in _serials(ssldir / "lb-crl.pem")
        assert (ssldir / "lb-crl.pem").read_text() == pki.authority.crl(LB_CA).crl_pem
        assert (ssldir / "crl.pem").read_bytes() == pki.authority.crl_chain_pem()
        written = sorted(e["path"] for e in logged if "wrote the store's CRLs" in e.get("log_format", ""))
        assert written == [str(ssldir / "crl.pem"), str(ssldir / "lb-crl.pem")]
    finally:
        service.stopService()


def test_a_failed_round_is_logged_and_the_next_one_recovers(
    pki: FrontPKI, tmp_path: Path, logged: list[LogEvent]
) -> None:
    ssldir = tmp_path / "missing"
    files = master_crl_files(str(ssldir))
    clock = Clock()
    service = CRLFilesService(clock=clock, blocking=Synchronous(), store=pki.store, files=files, interval=10)
    service.startService()
    try:
        assert any("refreshing the CRL files failed" in e.get("log_format", "") for e in logged)
        ssldir.mkdir()
        clock.advance(10)
        assert (ssldir / "lb-crl.pem").read_text() == pki.authority.crl(LB_CA).crl_pem
    finally:
        service.stopService()


def test_a_file_whose_ca_is_not_in_the_store_yet_is_skipped_and_said_once(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    pki = FrontPKI(tmp_path / "pki")  # the root alone: no lb CA yet
    ssldir = tmp_path / "ssl"
    ssldir.mkdir()
    clock = Clock()
    service = CRLFilesService(
        clock=clock, blocking=Synchronous(), store=pki.store, files=master_crl_files(str(ssldir)), interval=10
    )
    service.startService()
    try:
        clock.advance(10)
        assert (ssldir / "crl.pem").read_bytes() == pki.authority.crl_chain_pem()
        assert not (ssldir / "lb-crl.pem").exists()
        said = [e for e in logged if "not writing a CRL file" in e.get("log_format", "")]
        assert len(said) == 1
        assert "no CRL for lb" in said[0]["problem"]
        pki.add_ca(LB_CA)
        clock.advance(10)
        assert (ssldir / "lb-crl.pem").read_text() == pki.authority.crl(LB_CA).crl_pem
    finally:
        service.stopService()
        pki.close()


def _serials(path: Path) -> str:
    from cryptography import x509

    return " ".join(str(r.serial_number) for r in x509.load_pem_x509_crl(path.read_bytes()))
