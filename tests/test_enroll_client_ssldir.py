"""
Writing the ssldir and puppet.conf: the merge as a table, all-or-nothing commits, modes and
owners, and Debian's puppet agent reading the result (``puppet ssl verify``).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from puppetha.instance.ssldir import (
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


# The ssldir's owner (Debian's `puppet`, running puppetserver on a master) attacking the root-run
# client while it stages: it plants links in the ssldir, swaps them for plain 0666 files, and
# swaps the staging directories in the parent it also owns for links elsewhere.
ATTACKER = r"""
import os, sys
ssldir, parent, victim, stop, report = sys.argv[1:6]
victim_dir = os.path.dirname(victim)
swaps = 0
while not os.path.exists(stop):
    certs = os.path.join(ssldir, "certs")
    try:
        link = os.path.join(certs, "x")
        try:
            os.unlink(link)
        except OSError:
            pass
        os.symlink(victim, link)
        plain = os.path.join(certs, ".x")
        with open(plain, "w"):
            pass
        os.chmod(plain, 0o666)
        os.replace(plain, link)
        os.symlink(victim, os.path.join(certs, ".y"))
        os.replace(os.path.join(certs, ".y"), link)
        swaps += 1
    except OSError:
        pass
    try:
        for name in os.listdir(parent):
            if name.startswith(".ssl.new-") or name.startswith(".ssl.old-"):
                try:
                    os.rename(os.path.join(parent, name), os.path.join(parent, "moved" + name))
                    os.symlink(victim_dir, os.path.join(parent, name))
                    swaps += 1
                except OSError:
                    pass
    except OSError:
        pass
with open(report, "w") as f:
    f.write(str(swaps))
"""


def test_the_ssldirs_owner_racing_the_client_changes_no_file_outside_the_ssldir(ca: TestCA) -> None:
    """A real two-process race, the attacker running as `nobody`: no file outside the ssldir changes."""
    assert os.geteuid() == 0, "these tests run as root"
    base = Path(tempfile.mkdtemp(prefix="ident-race-"))
    try:
        os.chmod(base, 0o755)  # noqa: S103 - the attacker (nobody) must reach its own directory
        victim_dir = base / "victim"
        victim_dir.mkdir(mode=0o755)
        victim = victim_dir / "shadow"
        victim.write_text("root's secret\n")
        os.chmod(victim, 0o600)
        before = (victim.lstat(), victim.read_bytes(), sorted(os.listdir(victim_dir)))
        parent = base / "var-lib-puppet"
        ssldir = parent / "ssl"
        (ssldir / "certs").mkdir(parents=True)
        for path in (parent, ssldir, ssldir / "certs"):
            os.chown(path, 65534, 65534)
        credentials = _credentials(ca)
        stop, report = base / "stop", parent / "attacker-report"
        # Debian's own interpreter: nobody may not run the one under /root.
        assert os.access("/usr/bin/python3", os.X_OK), "the attacker needs Debian's python3"
        attacker = subprocess.Popen(
            ["/usr/bin/python3", "-c", ATTACKER, *map(str, (ssldir, parent, victim, stop, report))],
            user="nobody", group="nogroup", extra_groups=[],
        )
        written = 0
        try:
            for _ in range(200):
                try:
                    with Changes() as changes:
                        write_ssldir(changes, ssldir, credentials, force=True)
                        changes.commit()
                except OSError:
                    continue  # the attacker may break an enrollment in its own directory
                written += 1
        finally:
            stop.touch()
            assert attacker.wait(timeout=60) == 0
        after = victim.lstat()
        assert (stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid) == (0o600, 0, 0)
        assert after.st_ino == before[0].st_ino
        assert victim.read_bytes() == before[1]
        assert sorted(os.listdir(victim_dir)) == before[2]
        # The race really ran: the attacker swapped, and enrollments went through it.
        assert int(report.read_text()) > 100
        assert written > 0
    finally:
        shutil.rmtree(base)


def test_an_ssldir_from_an_image_layer_on_overlayfs_is_written(ca: TestCA, tmp_path: Path) -> None:
    """
    overlayfs refuses to rename a directory of a lower layer (EXDEV): an ssldir that came with
    the image is updated entry by entry instead, with the same result.
    """
    lower, upper, work, merged = (tmp_path / name for name in ("lower", "upper", "work", "merged"))
    for path in (upper, work, merged):
        path.mkdir()
    (lower / "ssl" / "certs").mkdir(parents=True)
    (lower / "ssl" / "certs" / "other.pem").write_text("other")
    (lower / "ssl" / "certificate_requests").mkdir()
    (lower / "ssl" / "certificate_requests" / "i-1.pem").write_text("old request")
    mount = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
         str(merged)], capture_output=True, text=True, check=False)
    assert mount.returncode == 0, f"overlayfs must be mountable here: {mount.stderr}"
    try:
        ssldir = merged / "ssl"
        credentials = _credentials(ca)
        with Changes() as changes:
            write_ssldir(changes, ssldir, credentials, force=False)
            changes.commit()
        assert (ssldir / "private_keys" / "i-1.pem").read_bytes() == credentials.private_key
        assert (ssldir / "certs" / "i-1.pem").read_bytes() == credentials.certificate
        assert (ssldir / "certs" / "other.pem").read_text() == "other"
        assert not (ssldir / "certificate_requests" / "i-1.pem").exists()
        modes = {name: mode for name, (mode, _, _) in _tree(ssldir).items()}
        assert (modes["private_keys"], modes["private_keys/i-1.pem"]) == (0o750, 0o600)
        assert stat.S_IMODE(ssldir.stat().st_mode) == 0o755  # the image's own
        assert sorted(p.name for p in merged.iterdir()) == ["ssl"]  # no staging left behind
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_no_descriptor_is_left_open_whatever_the_outcome(ca: TestCA, tmp_path: Path) -> None:
    """Staging works through descriptors: committed, abandoned or failed, it closes them all."""
    before = sorted(os.listdir("/proc/self/fd"))
    ssldir, conf = tmp_path / "ssl", tmp_path / "puppet.conf"
    with Changes() as changes:
        write_ssldir(changes, ssldir, _credentials(ca), force=False)
        write_puppet_conf(changes, conf, "agent", SETTINGS)
        changes.commit()
    with Changes() as changes:
        write_ssldir(changes, ssldir, _credentials(ca), force=True)
    blocked = tmp_path / "blocked"
    (blocked / "inside").mkdir(parents=True)
    with Changes() as changes:
        write_ssldir(changes, ssldir, _credentials(ca), force=True)
        changes.stage_file(blocked, b"x", 0o644)
        with pytest.raises(OSError, match="blocked"):
            changes.commit()
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "puppet.conf", "ssl"]
