"""FileKeyVault: AES-256-GCM under a 0600 key file."""

from __future__ import annotations

import os
import stat

import pytest
from zope.interface.verify import verifyObject

from puppetha.pki.vault import FILE_VAULT_KEY_BYTES, FileKeyVault, IKeyVault, VaultError

SECRET = b"-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def vault(tmp_path):
    return FileKeyVault.create(tmp_path / "vault.key")


def test_provides_interface(vault):
    assert verifyObject(IKeyVault, vault)


def test_round_trip(vault):
    sealed = vault.seal(SECRET, "root")
    assert SECRET not in sealed
    assert sealed[0] == 1
    assert vault.open(sealed, "root") == SECRET


def test_same_plaintext_seals_differently(vault):
    assert vault.seal(SECRET, "root") != vault.seal(SECRET, "root")


def test_another_process_opens_with_the_same_file(tmp_path, vault):
    sealed = vault.seal(SECRET, "master1")
    assert FileKeyVault(tmp_path / "vault.key").open(sealed, "master1") == SECRET


def test_wrong_context_refused(vault):
    sealed = vault.seal(SECRET, "master1")
    with pytest.raises(VaultError, match="master2"):
        vault.open(sealed, "master2")


@pytest.mark.parametrize("position", [0, 1, 13, -1])
def test_tampered_ciphertext_refused(vault, position):
    sealed = bytearray(vault.seal(SECRET, "root"))
    sealed[position] ^= 0x01
    with pytest.raises(VaultError):
        vault.open(bytes(sealed), "root")


@pytest.mark.parametrize("sealed", [b"", b"\x01", b"\x01" + b"\x00" * 20, b"\x02" + b"\x00" * 64])
def test_truncated_or_foreign_refused(vault, sealed):
    with pytest.raises(VaultError):
        vault.open(sealed, "root")


def test_other_key_refused(tmp_path, vault):
    other = FileKeyVault.create(tmp_path / "other.key")
    with pytest.raises(VaultError):
        other.open(vault.seal(SECRET, "root"), "root")


def test_key_file_is_0600_and_32_bytes(tmp_path, vault):
    info = os.stat(tmp_path / "vault.key")
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_size == FILE_VAULT_KEY_BYTES
    # Nothing else is left behind by the atomic create.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vault.key"]


def test_create_with_permissive_umask_still_0600(tmp_path):
    old = os.umask(0)
    try:
        FileKeyVault.create(tmp_path / "vault.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "vault.key").st_mode) == 0o600


def test_create_never_replaces(tmp_path, vault):
    before = (tmp_path / "vault.key").read_bytes()
    with pytest.raises(VaultError, match="already exists"):
        FileKeyVault.create(tmp_path / "vault.key")
    assert (tmp_path / "vault.key").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vault.key"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_group_or_world_accessible_key_refused(tmp_path, vault, mode):
    os.chmod(tmp_path / "vault.key", mode)
    with pytest.raises(VaultError, match="0600"):
        FileKeyVault(tmp_path / "vault.key")


@pytest.mark.parametrize("size", [0, 16, 31, 33, 44])
def test_wrong_size_refused(tmp_path, size):
    path = tmp_path / "vault.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"k" * size)
    os.close(fd)
    with pytest.raises(VaultError, match="exactly 32 bytes"):
        FileKeyVault(path)


def test_missing_or_symlinked_key_refused(tmp_path, vault):
    with pytest.raises(VaultError, match="cannot open"):
        FileKeyVault(tmp_path / "absent.key")
    os.symlink(tmp_path / "vault.key", tmp_path / "link.key")
    with pytest.raises(VaultError, match="cannot open"):
        FileKeyVault(tmp_path / "link.key")
