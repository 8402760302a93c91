"""KmsKeyVault against moto's KMS (a real moto server), and CA keys at rest in DynamoDB."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from puppetha.aws.kms import CONTEXT_KEY, KmsKeyVault
from puppetha.pki.vault import IKeyVault, VaultError
from puppetha.store.dynamodb import DynamoDBStore
from puppetha.store.records import CARecord, Records, b64, unb64
from puppetha.testing.moto import MotoServer, client
from tests.aws_fixtures import moto_with_test_credentials

REGION = "us-east-1"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    # The vault and the store find credentials the way the daemon does: boto3's chain.
    with moto_with_test_credentials() as server:
        yield server


@pytest.fixture
def kms(moto: MotoServer) -> Any:
    return client("kms", moto.endpoint_url, REGION)


@pytest.fixture
def key_id(kms: Any) -> str:
    return str(kms.create_key(Description="puppetha CA keys")["KeyMetadata"]["KeyId"])


@pytest.fixture
def vault(moto: MotoServer, key_id: str) -> KmsKeyVault:
    return KmsKeyVault(key_id, REGION, moto.endpoint_url)


def ca_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_provides_the_interface(vault: KmsKeyVault) -> None:
    assert IKeyVault.providedBy(vault)


def test_round_trip(vault: KmsKeyVault) -> None:
    pem = ca_key_pem()
    sealed = vault.seal(pem, "root")
    assert pem not in sealed
    assert vault.open(sealed, "root") == pem


def test_each_seal_has_its_own_data_key(vault: KmsKeyVault) -> None:
    pem = ca_key_pem()
    first, second = vault.seal(pem, "root"), vault.seal(pem, "root")
    assert first != second
    assert vault.open(first, "root") == vault.open(second, "root") == pem


def test_another_vault_on_the_same_key_opens_it(moto: MotoServer, key_id: str, vault: KmsKeyVault) -> None:
    sealed = vault.seal(b"secret", "master-1.example.com")
    other = KmsKeyVault(key_id, REGION, moto.endpoint_url)
    assert other.open(sealed, "master-1.example.com") == b"secret"


def test_wrong_context_is_refused(vault: KmsKeyVault) -> None:
    sealed = vault.seal(ca_key_pem(), "master-1.example.com")
    with pytest.raises(VaultError):
        vault.open(sealed, "master-2.example.com")
    with pytest.raises(VaultError):
        vault.open(sealed, "root")


def test_context_reaches_kms(kms: Any, vault: KmsKeyVault) -> None:
    # The data key itself is bound to the CA's name, not only the local AES-GCM layer.
    sealed = vault.seal(b"secret", "root")
    length = int.from_bytes(sealed[1:3], "big")
    encrypted_key = sealed[3 : 3 + length]
    with pytest.raises(kms.exceptions.InvalidCiphertextException):
        kms.decrypt(CiphertextBlob=encrypted_key, EncryptionContext={CONTEXT_KEY: "other"})
    answer = kms.decrypt(CiphertextBlob=encrypted_key, EncryptionContext={CONTEXT_KEY: "root"})
    assert len(answer["Plaintext"]) == 32


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize(
    "where",
    ["version", "length", "encrypted key", "nonce", "ciphertext", "tag"],
)
def test_tampering_is_refused(vault: KmsKeyVault, where: str) -> None:
    sealed = vault.seal(ca_key_pem(), "root")
    length = int.from_bytes(sealed[1:3], "big")
    index = {
        "version": 0,
        "length": 2,
        "encrypted key": 3 + length // 2,
        "nonce": 3 + length + 5,
        "ciphertext": 3 + length + 12 + 10,
        "tag": len(sealed) - 1,
    }[where]
    with pytest.raises(VaultError):
        vault.open(_flip(sealed, index), "root")


@pytest.mark.parametrize(
    "sealed", [b"", b"\x01", b"\x01\x00\x00", b"\x01\x00\x10" + b"x" * 20, b"\x02" + b"x" * 80]
)
def test_malformed_is_refused(vault: KmsKeyVault, sealed: bytes) -> None:
    with pytest.raises(VaultError):
        vault.open(sealed, "root")


def test_another_kms_key_cannot_open(moto: MotoServer, kms: Any, vault: KmsKeyVault) -> None:
    sealed = vault.seal(b"secret", "root")
    other_key = kms.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(VaultError):
        KmsKeyVault(other_key, REGION, moto.endpoint_url).open(sealed, "root")


def test_unknown_key_is_a_vault_error(moto: MotoServer) -> None:
    vault = KmsKeyVault("alias/no-such-key", REGION, moto.endpoint_url)
    with pytest.raises(VaultError, match="root"):
        vault.seal(b"secret", "root")


def test_unreachable_kms_is_a_vault_error(moto: MotoServer) -> None:
    vault = KmsKeyVault("alias/none", REGION, "http://127.0.0.1:9", deadline=1.0)
    with pytest.raises(VaultError):
        vault.seal(b"secret", "root")


def test_empty_context_is_refused(vault: KmsKeyVault) -> None:
    with pytest.raises(VaultError):
        vault.seal(b"secret", "")


def test_no_clear_ca_key_in_the_store(moto: MotoServer, vault: KmsKeyVault) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    raw_scalar = key.private_numbers().private_value.to_bytes(48, "big")
    store = DynamoDBStore("ca-at-rest", REGION, moto.endpoint_url)
    store.create_table(deletion_protection=False)
    record = CARecord(
        name="root",
        certificate_pem="-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n",
        sealed_key=b64(vault.seal(pem, "root")),
        parent="root",
        created_at=1.0,
    )
    Records(store).create(record)

    items = client("dynamodb", moto.endpoint_url, REGION).scan(TableName="ca-at-rest")["Items"]
    # The CA record, and the change counter of CAs its write moved.
    assert sorted(i["pk"]["S"] for i in items) == ["ca#0", "gen"]
    blob = json.dumps(items, default=lambda b: base64.b64encode(b).decode()).encode()
    pem_body = b"".join(pem.splitlines()[1:-1])
    for secret in (pem, der, raw_scalar, pem_body, base64.b64encode(der), pem_body[:32]):
        assert secret not in blob
        assert base64.b64encode(secret) not in blob

    stored = Records(store).get(CARecord, "root")
    assert stored is not None
    assert vault.open(unb64(stored.record.sealed_key), "root") == pem
    store.close()
