"""
CA keys sealed with AWS KMS by envelope encryption.

Each seal asks KMS for a fresh AES-256 data key (bound to the CA's name by the encryption
context), encrypts locally with AES-256-GCM, and keeps only the KMS-encrypted copy of the data
key beside the ciphertext.  Opening needs ``kms:Decrypt`` on the key with the same context, so
whoever can read the store but not use the KMS key learns nothing.

Sealed layout (all lengths in bytes)::

    version (1, = 1) | len(encrypted data key) (2, big-endian) | encrypted data key |
    nonce (12) | AES-GCM ciphertext and tag

The header (version, length, encrypted data key) and the context are the AES-GCM associated
data, so neither can be changed or swapped without the tag failing.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from zope.interface import implementer

from puppetha.aws.boto import DEFAULT_DEADLINE, within_deadline
from puppetha.pki.vault import IKeyVault, VaultError

FORMAT_VERSION = 1
NONCE_BYTES = 12
#: The encryption context's key; its value is the CA's name.  KMS logs it in CloudTrail,
#: which shows which CA each Decrypt was for.
CONTEXT_KEY = "puppetha-ca"

_HEADER = struct.Struct(">BH")


def _context(context: str) -> dict[str, str]:
    if not isinstance(context, str) or not context:
        raise VaultError("a sealing context (the CA's name) is required")
    return {CONTEXT_KEY: context}


def _associated_data(header: bytes, context: str) -> bytes:
    return header + b"\x00" + context.encode("utf-8")


@implementer(IKeyVault)
class KmsKeyVault:
    """:class:`IKeyVault` over one KMS key (symmetric, ``ENCRYPT_DECRYPT``).  Thread-safe."""

    def __init__(
        self,
        key_id: str,
        region: str,
        endpoint_url: str | None,
        client: Any = None,
        *,
        deadline: float = DEFAULT_DEADLINE,
    ) -> None:
        if not key_id:
            raise ValueError("a KMS key id or ARN is required")
        self.key_id = key_id
        if client is None:
            # Each call ends within the deadline ([aws] timeout), retries included.
            config = within_deadline(deadline, region_name=region)
            client = boto3.session.Session().client("kms", endpoint_url=endpoint_url, config=config)
        self._client = client

    def seal(self, plaintext: bytes, context: str) -> bytes:
        encryption_context = _context(context)
        try:
            answer = self._client.generate_data_key(
                KeyId=self.key_id, KeySpec="AES_256", EncryptionContext=encryption_context
            )
        except (ClientError, BotoCoreError) as e:
            raise VaultError(f"KMS GenerateDataKey failed for CA {context!r}: {_reason(e)}") from None
        encrypted_key: bytes = answer["CiphertextBlob"]
        data_key = answer.pop("Plaintext")
        del answer
        try:
            header = _HEADER.pack(FORMAT_VERSION, len(encrypted_key)) + encrypted_key
            nonce = os.urandom(NONCE_BYTES)
            sealed = AESGCM(data_key).encrypt(nonce, plaintext, _associated_data(header, context))
        finally:
            # Python cannot wipe the bytes; dropping the last reference is what we can do.
            del data_key
        return header + nonce + sealed

    def open(self, sealed: bytes, context: str) -> bytes:
        encryption_context = _context(context)
        header, encrypted_key, nonce, ciphertext = _parse(sealed)
        try:
            answer = self._client.decrypt(
                CiphertextBlob=encrypted_key,
                EncryptionContext=encryption_context,
                KeyId=self.key_id,
            )
        except (ClientError, BotoCoreError) as e:
            raise VaultError(f"KMS refused to open the key of CA {context!r}: {_reason(e)}") from None
        data_key = answer.pop("Plaintext")
        del answer
        try:
            return AESGCM(data_key).decrypt(nonce, ciphertext, _associated_data(header, context))
        except InvalidTag:
            raise VaultError(f"sealed key of CA {context!r} was altered or sealed for another CA") from None
        finally:
            del data_key


def _parse(sealed: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    if not isinstance(sealed, bytes) or len(sealed) < _HEADER.size:
        raise VaultError("sealed key is truncated")
    version, length = _HEADER.unpack_from(sealed)
    if version != FORMAT_VERSION:
        raise VaultError(f"sealed key has unknown format {version}")
    end = _HEADER.size + length
    if length == 0 or len(sealed) < end + NONCE_BYTES + 16:
        raise VaultError("sealed key is truncated")
    return (
        sealed[:end],
        sealed[_HEADER.size : end],
        sealed[end : end + NONCE_BYTES],
        sealed[end + NONCE_BYTES :],
    )


def _reason(error: Exception) -> str:
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", "error"))
    return type(error).__name__
