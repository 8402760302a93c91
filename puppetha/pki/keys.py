"""
The key types puppetha issues for and signs with, chosen by configuration.
"""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

#: The private keys a CA can sign with.
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
#: The public keys a certificate can be issued for.
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

#: Every signature puppetha makes (certificates, CRLs) uses SHA-256.
SIGNATURE_HASH = hashes.SHA256()

_RSA_EXPONENT = 65537


class KeyType(enum.Enum):
    EC_P256 = "ec-p256"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    @property
    def is_rsa(self) -> bool:
        return self is not KeyType.EC_P256

    @property
    def rsa_bits(self) -> int:
        """The modulus size of an RSA type (0 for EC)."""
        return int(self.value.split("-")[1]) if self.is_rsa else 0

    def generate(self) -> PrivateKey:
        if self is KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        return rsa.generate_private_key(public_exponent=_RSA_EXPONENT, key_size=self.rsa_bits)

    @classmethod
    def of(cls, key: PrivateKey | PublicKey) -> KeyType | None:
        """The type of ``key``, or ``None`` when it is not one puppetha knows."""
        if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
            return cls.EC_P256 if isinstance(key.curve, ec.SECP256R1) else None
        if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
            try:
                return cls(f"rsa-{key.key_size}")
            except ValueError:
                return None
        return None


def private_key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM: what a vault seals and an agent's ssldir holds."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(pem: bytes) -> PrivateKey:
    """Parse a PEM private key of a type puppetha signs with; ``ValueError`` otherwise."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) or KeyType.of(key) is None:
        raise ValueError(f"unsupported private key type {type(key).__name__}")
    return key


def same_public_key(a: PublicKey, b: PublicKey) -> bool:
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(der, spki) == b.public_bytes(der, spki)
