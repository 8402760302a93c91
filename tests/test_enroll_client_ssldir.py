"""
Writing the ssldir and puppet.conf: the merge as a table, all-or-nothing commits, modes and
owners, and Debian's puppet agent reading the result (``puppet ssl verify``).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from puppetha.enroll.ssldir import (
    AlreadyEnrolled,
    Changes,
    PuppetCredentials,
    merge_puppet_conf,
    write_puppet_conf,
    write_ssldir,
)
from puppetha.pki.keys import private_key_pem
from tests.test_enroll_client import TestCA, pem

SETTINGS = {"certname": "i-1", "server": "puppet", "serverport": "8140", "ssldir": "/var/lib/puppet/ssl"}


@pytest.mark.parametrize(
    ("before", "section", "after"),
    [
        pytest.param(
            "", "agent",
            "[agent]\ncertname = i-1\nserver = puppet\nserverport = 8140\nssldir = /var/lib/puppet/ssl\n",
            id="empty file",
        ),
        pytest.param(
            "# Debian's comments\n# more\n", "agent",
            "# Debian's comments\n# more\n\n[agent]\ncertname = i-1\nserver = puppet\nserverport = 8140\n"
            "ssldir = /var/lib/puppet/ssl\n",
            id="comments only",
        ),
        pytest.param(
            "[main]\nlogdir = /x\n\n[agent]\n  server=old # note\nruninterval = 1h\nserver = dup\n"
            "\n[user]\na = 1\n",
            "agent",
            "[main]\nlogdir = /x\n\n[agent]\n  server = puppet\nruninterval = 1h\ncertname = i-1\n"
            "serverport = 8140\nssldir = /var/lib/puppet/ssl\n\n[user]\na = 1\n",
            id="replace in place, drop duplicate, add missing before the blank line",
        ),
        pytest.param(
            "[main]\ncertname = old\n[agent]\nserver = x\n", "agent",
            "[main]\ncertname = old\n[agent]\nserver = puppet\ncertname = i-1\nserverport = 8140\n"
            "ssldir = /var/lib/puppet/ssl\n",
            id="other sections untouched",
        ),
        pytest.param(
            "certname = old\nvardir = /v\n[agent]\nserver = x\n", "main",
            "certname = i-1\nvardir = /v\n[agent]\nserver = x\n\n[main]\nserver = puppet\nserverport = 8140\n"
            "ssldir = /var/lib/puppet/ssl\n",
            id="settings before any header are main",
        ),
        pytest.param(
            "[main]\nserver = a\n[main]\nserver = b\n", "main",
            "[main]\nserver = puppet\ncertname = i-1\nserverport = 8140\nssldir = /var/lib/puppet/ssl\n"
            "[main]\n",
            id="repeated section",
        ),
        pytest.param(
            "[agent]\r\nserver = x\r\n", "agent",
            "[agent]\nserver = puppet\ncertname = i-1\nserverport = 8140\nssldir = /var/lib/puppet/ssl\n",
            id="CRLF",
        ),
    ],
)  # fmt: skip
def test_merge_puppet_conf(before: str, section: str, after: str) -> None:
    assert merge_puppet_conf(before, section, SETTINGS) == after
    # Merging again changes nothing.
    assert merge_puppet_conf(after, section, SETTINGS) == after


@pytest.mark.parametrize(
    ("section", "settings"),
    [
        ("agent]\n[main", {"a": "b"}),
        ("agent", {"a b": "c"}),
        ("agent", {"certname": "x\n[main]"}),
        ("agent", {"certname": " x"}),
    ],
)
def test_merge_puppet_conf_refuses_what_would_not_read_back(section: str, settings: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="bad"):
        merge_puppet_conf("", section, settings)


def _credentials(ca: TestCA, certname: str = "i-1") -> PuppetCredentials:
    key, cert = ca.agent_leaf(certname)
    return PuppetCredentials(
        certname=certname,
        private_key=private_key_pem(key),
        public_key=key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        certificate=pem(cert),
        ca_chain=pem(ca.master_ca) + pem(ca.root),
        crl_chain=pem(ca.crl(ca.root, ca.root_key)) + pem(ca.crl(ca.master_ca, ca.master_key)),
    )


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def _tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        str(p.relative_to(root)): (
            stat.S_IMODE(p.lstat().st_mode),
            p.lstat().st_uid,
            p.read_bytes() if p.is_file() else b"",
        )
        for p in sorted(root.rglob("*"))
    }


def test_modes(ca: TestCA, tmp_path: Path) -> None:
    ssldir = tmp_path / "ssl"
    with Changes() as changes:
        write_ssldir(changes, ssldir, _credentials(ca), force=False)
        changes.commit()
    modes = {name: mode for name, (mode, _, _) in _tree(tmp_path).items()}
    assert modes == {
        "ssl": 0o771,
        "ssl/certs": 0o755,
        "ssl/certs/ca.pem": 0o644,
        "ssl/certs/i-1.pem": 0o644,
        "ssl/crl.pem": 0o644,
        "ssl/private_keys": 0o750,
        "ssl/private_keys/i-1.pem": 0o600,
        "ssl/public_keys": 0o755,
        "ssl/public_keys/i-1.pem": 0o644,
    }


def test_new_files_take_the_owner_of_the_ssldirs_parent(ca: TestCA, tmp_path: Path) -> None:
    """As Debian's /var/lib/puppet is puppet's, so is a new ssldir in it (we run as root)."""
    assert os.geteuid() == 0, "these tests run as root"
    parent = tmp_path / "var-lib-puppet"
    parent.mkdir()
    os.chown(parent, 4242, 4343)
    with Changes() as changes:
        write_ssldir(changes, parent / "ssl", _credentials(ca), force=False)
        write_puppet_conf(changes, tmp_path / "etc" / "puppet.conf", "agent", SETTINGS)
        changes.commit()
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in parent.rglob("*")}
    assert owners == {(4242, 4343)}
    assert (tmp_path / "etc" / "puppet.conf").stat().st_uid == 0


def test_existing_ssldir_keeps_its_other_files_modes_and_owners(ca: TestCA, tmp_path: Path) -> None:
    ssldir = tmp_path / "ssl"
    (ssldir / "certs").mkdir(parents=True)
    (ssldir / "certs" / "other.pem").write_text("other")
    os.chmod(ssldir / "certs" / "other.pem", 0o640)
    os.chown(ssldir / "certs" / "other.pem", 4242, 4242)
    (ssldir / "certs" / "link.pem").symlink_to("other.pem")
    before = _tree(ssldir)
    with Changes() as changes:
        write_ssldir(changes, ssldir, _credentials(ca), force=False)
        changes.commit()
    after = _tree(ssldir)
    assert after["certs/other.pem"] == before["certs/other.pem"]
    assert (ssldir / "certs" / "link.pem").readlink() == Path("other.pem")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ssl"]


@pytest.mark.parametrize("subdirectory", ["certs", "private_keys", "public_keys", "certificate_requests"])
def test_a_planted_symlink_never_sends_a_write_outside_the_ssldir(
    ca: TestCA, tmp_path: Path, subdirectory: str
) -> None:
    """
    Whoever owns the ssldir (puppet) plants ``<subdirectory> -> elsewhere``; the root-run
    client must neither write into, delete from, nor change the mode of ``elsewhere``.
    """
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.chmod(elsewhere, 0o700)
    (elsewhere / "i-1.pem").write_text("not the client's to touch")
    ssldir = tmp_path / "ssl"
    ssldir.mkdir()
    (ssldir / subdirectory).symlink_to(elsewhere)
    before = _tree(elsewhere), stat.S_IMODE(elsewhere.stat().st_mode)
    credentials = _credentials(ca)
    with Changes() as changes:
        write_ssldir(changes, ssldir, credentials, force=True)
        changes.commit()
    assert (_tree(elsewhere), stat.S_IMODE(elsewhere.stat().st_mode)) == before
    if subdirectory != "certificate_requests":
        assert not (ssldir / subdirectory).is_symlink()
    assert (ssldir / "private_keys" / "i-1.pem").read_bytes() == credentials.private_key
    assert stat.S_IMODE((ssldir / "private_keys").stat().st_mode) == 0o750


def test_already_enrolled_unless_forced(ca: TestCA, tmp_path: Path) -> None:
    ssldir = tmp_path / "ssl"
    (ssldir / "certs").mkdir(parents=True)
    (ssldir / "certs" / "i-1.pem").write_text("old")
    with Changes() as changes, pytest.raises(AlreadyEnrolled, match="already exists"):
        write_ssldir(changes, ssldir, _credentials(ca), force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ssl"]
    credentials = _credentials(ca)
    with Changes() as changes:
        write_ssldir(changes, ssldir, credentials, force=True)
        changes.commit()
    assert (ssldir / "certs" / "i-1.pem").read_bytes() == credentials.certificate


def test_nothing_happens_without_commit(ca: TestCA, tmp_path: Path) -> None:
    conf = tmp_path / "puppet.conf"
    conf.write_text("[main]\n")
    before = _tree(tmp_path)
    changes = Changes()
    with changes:
        write_ssldir(changes, tmp_path / "ssl", _credentials(ca), force=False)
        write_puppet_conf(changes, conf, "agent", SETTINGS)
        assert _tree(tmp_path) != before  # staged beside the targets
    # Leaving the block without commit (an answer that did not verify, an exception) removes it all.
    assert _tree(tmp_path) == before


def test_a_failed_step_puts_back_what_earlier_steps_replaced(ca: TestCA, tmp_path: Path) -> None:
    ssldir = tmp_path / "ssl"
    (ssldir / "certs").mkdir(parents=True)
    (ssldir / "certs" / "ca.pem").write_text("the old CA")
    conf = tmp_path / "puppet.conf"
    conf.write_text("[main]\nlogdir = /x\n")
    # The last target is a non-empty directory: its step fails after the first two succeeded.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "inside").write_text("")
    before = _tree(tmp_path)
    with Changes() as changes:
        write_ssldir(changes, ssldir, _credentials(ca), force=False)
        write_puppet_conf(changes, conf, "agent", SETTINGS)
        changes.stage_file(blocked, b"x", 0o644)
        with pytest.raises(OSError, match="blocked"):
            changes.commit()
    assert _tree(tmp_path) == before


def test_puppet_reads_what_we_write(ca: TestCA, tmp_path: Path) -> None:
    """Debian's puppet agent checks key, certificate, chain and CRLs with its own code."""
    puppet = shutil.which("puppet")
    assert puppet is not None, "Debian's puppet agent must be installed (apt-get install puppet-agent)"
    ssldir = tmp_path / "ssl"
    conf = tmp_path / "puppet.conf"
    with Changes() as changes:
        write_ssldir(changes, ssldir, _credentials(ca, "i-0abc"), force=False)
        write_puppet_conf(changes, conf, "agent", {**SETTINGS, "certname": "i-0abc", "ssldir": str(ssldir)})
        changes.commit()
    dirs = [f"--{name}={tmp_path / name}" for name in ("vardir", "logdir", "rundir", "codedir", "publicdir")]
    done = subprocess.run(
        [puppet, "ssl", "verify", f"--config={conf}", "--color=false", *dirs],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Verified client certificate 'CN=i-0abc'" in done.stdout

    # Without the root's CRL, Puppet refuses the same ssldir: crl.pem must hold every CA's.
    crls = (ssldir / "crl.pem").read_text()
    (ssldir / "crl.pem").write_text(crls[crls.index("-----BEGIN", 1) :])
    done = subprocess.run(
        [puppet, "ssl", "verify", f"--config={conf}", "--color=false", *dirs],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "CRL" in done.stdout + done.stderr
