"""
Encryption at rest for CA private keys.

A vault seals a private key's PEM before it reaches the store and opens it when a CA signs;
the store only ever holds sealed bytes.  Implementations: :class:`FileKeyVault` (a local
key file, the one-box default) and :class:`puppetha.aws.kms.KmsKeyVault` (AWS KMS envelope
encryption, for the shared DynamoDB store).
"""

from __future__ import annotations

from zope.interface import Interface


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
