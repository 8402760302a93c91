"""
Pure CRL signing: one CRL per CA, numbered, with the issuer's key identifier.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import NamedTuple

from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from puppetha.pki.certs import BACKDATE
from puppetha.pki.keys import SIGNATURE_HASH, PrivateKey

#: Reason names accepted by :func:`build_crl` (RFC 5280's CRLReason spellings).
REASONS = frozenset(flag.value for flag in x509.ReasonFlags)


class Revocation(NamedTuple):
    serial: int
    revoked_at: datetime
    reason: str = "unspecified"


def check_reason(reason: str) -> str:
    """Return ``reason`` if it is one of :data:`REASONS`; ``ValueError`` otherwise."""
    if reason not in REASONS:
        raise ValueError(f"unknown revocation reason {reason!r} (one of {', '.join(sorted(REASONS))})")
    return reason


def build_crl(
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    revoked: Iterable[tuple[int, datetime, str]],
    *,
    number: int,
    now: datetime,
    lifetime: timedelta,
) -> x509.CertificateRevocationList:
    """
    The CRL of ``issuer_cert`` listing ``revoked`` (serial, revocation time, reason), valid
    until ``now + lifetime``.  Its thisUpdate is backdated like certificates are: OpenSSL
    (nginx, puppet) refuses every handshake while a CRL looks "not yet valid" to a host whose
    clock runs a little behind the signer's.  Callers make ``number`` strictly increase per CA.
    """
    if number < 1:
        raise ValueError("CRL numbers start at 1")
    if lifetime <= timedelta(0):
        raise ValueError("a CRL needs a positive lifetime")
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + lifetime)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    for serial, revoked_at, reason in sorted(revoked):
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(revoked_at)
        # RFC 5280 5.3.1: leave the reason out rather than say "unspecified".
        if check_reason(reason) != x509.ReasonFlags.unspecified.value:
            entry = entry.add_extension(x509.CRLReason(x509.ReasonFlags(reason)), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(issuer_key, SIGNATURE_HASH)


def crl_number(crl: x509.CertificateRevocationList) -> int:
    number = crl.extensions.get_extension_for_oid(ExtensionOID.CRL_NUMBER).value
    if not isinstance(number, x509.CRLNumber):
        raise ValueError("CRL without a CRL number")
    return number.crl_number
