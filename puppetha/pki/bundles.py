"""
PEM bundles in the shapes puppet and nginx read.

- A CA chain: the issuing CA first, then each issuer up to the root (puppet's
  ``ssldir/certs/ca.pem``, puppetserver's ``ssl-ca-cert``, nginx's ``ssl_client_certificate``).
- A CRL chain: a CRL for every CA in the chain, root included (puppet's ``crl.pem``,
  puppetserver's ``ssl-crl-path``, nginx's ``ssl_crl``).  Puppet refuses a chain in which any
  CA's CRL is missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

_PEM = serialization.Encoding.PEM


def certificates_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(_PEM) for cert in certs)


def crls_pem(crls: Iterable[x509.CertificateRevocationList]) -> bytes:
    return b"".join(crl.public_bytes(_PEM) for crl in crls)


def chain_names(ca_name: str, parents: Mapping[str, str]) -> list[str]:
    """
    ``ca_name`` and its issuers up to the root, from a map CA name -> issuing CA name (the root
    names itself).  ``KeyError`` for an unknown CA, ``ValueError`` for a loop.
    """
    chain = [ca_name]
    while parents[chain[-1]] != chain[-1]:
        parent = parents[chain[-1]]
        if parent in chain:
            raise ValueError(f"CA chain of {ca_name!r} loops at {parent!r}")
        chain.append(parent)
    return chain


def check_chain(chain: Sequence[x509.Certificate]) -> None:
    """``ValueError`` unless each certificate is signed by the next and the last by itself."""
    for child, parent in zip(chain, [*chain[1:], chain[-1]], strict=True):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise ValueError(f"{child.subject.rfc4514_string()} is not issued by the next CA") from e
