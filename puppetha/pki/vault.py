"""
Encryption at rest for CA private keys.

A vault seals a private key's PEM before it reaches the store and opens it when a CA signs;
the store only ever holds sealed bytes.  Implementations: :class:`FileKeyVault` (a local
key file, the one-box default) and :class:`puppetha.aws.kms.KmsKeyVault` (AWS KMS envelope
encryption, for the shared DynamoDB store).
"""

from __future__ import annotations

import os
import stat
import tempfile

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from zope.interface import Interface, implementer


class VaultError(Exception):
    """Sealed bytes could not be opened (wrong key, tampering) or sealing failed."""


class IKeyVault(Interface):
    def seal(plaintext: bytes, context: str) -> bytes:
        """
        Encrypt ``plaintext``.  ``context`` (the CA's name) is bound to the ciphertext as
        associated data, so a sealed key cannot be swapped onto another CA's record.
        """

    def open(sealed: bytes, context: str) -> bytes:
        """Decrypt what :meth:`seal` made for the same ``context``.  Raises :class:`VaultError`."""


#: Version byte that starts everything :class:`FileKeyVault` seals.
FILE_VAULT_V1 = b"\x01"
FILE_VAULT_KEY_BYTES = 32
_NONCE_BYTES = 12


@implementer(IKeyVault)
class FileKeyVault:
    """
    AES-256-GCM with a key held in a local file of exactly 32 raw random bytes, mode 0600.

    Sealed layout: version byte ``0x01``, a random 96-bit nonce, then ciphertext and tag.  The
    associated data is the version byte followed by the UTF-8 context, so neither the context
    nor the format can be changed without the tag failing.  Every daemon that shares a store
    needs the same key file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._aead = AESGCM(_read_key_file(self.path))

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> FileKeyVault:
        """
        Write a new random key to ``path`` and open it.  The file appears complete or not at
        all, and never replaces an existing one (``VaultError`` if ``path`` exists).
        """
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, temporary = tempfile.mkstemp(prefix=".vault-key-", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, os.urandom(FILE_VAULT_KEY_BYTES))
            os.fsync(fd)
            os.close(fd)
            fd = -1
            # link() refuses an existing name: an atomic create-if-absent of the finished file.
            os.link(temporary, path)
        except FileExistsError:
            raise VaultError(f"vault key file {path} already exists") from None
        finally:
            if fd >= 0:
                os.close(fd)
            os.unlink(temporary)
        return cls(path)

    def seal(self, plaintext: bytes, context: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return FILE_VAULT_V1 + nonce + self._aead.encrypt(nonce, plaintext, _associated(context))

    def open(self, sealed: bytes, context: str) -> bytes:
        if sealed[:1] != FILE_VAULT_V1:
            raise VaultError("sealed data is not in a format this vault knows")
        if len(sealed) < 1 + _NONCE_BYTES + 16:
            raise VaultError("sealed data is truncated")
        nonce = sealed[1 : 1 + _NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, sealed[1 + _NONCE_BYTES :], _associated(context))
        except InvalidTag:
            raise VaultError(
                f"cannot open sealed data for {context!r}: wrong key, wrong context or tampered"
            ) from None


def _associated(context: str) -> bytes:
    return FILE_VAULT_V1 + context.encode("utf-8")


def _read_key_file(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise VaultError(f"cannot open vault key file {path}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise VaultError(f"vault key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise VaultError(
                f"vault key file {path} is accessible to group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); it must be 0600"
            )
        if info.st_size != FILE_VAULT_KEY_BYTES:
            raise VaultError(f"vault key file {path} must hold exactly {FILE_VAULT_KEY_BYTES} bytes")
        key = os.read(fd, FILE_VAULT_KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != FILE_VAULT_KEY_BYTES:
        raise VaultError(f"vault key file {path} must hold exactly {FILE_VAULT_KEY_BYTES} bytes")
    return key
