"""
Pure certificate making: the root CA, a master's intermediate CA, and leaf certificates.

Nothing here reads a clock or the store: ``now`` and lifetimes are arguments, so every
function gives the same answer for the same input (apart from serials and signatures).
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from puppetha.pki.keys import SIGNATURE_HASH, PrivateKey, PublicKey
from puppetha.pki.names import check_certname, parse_san, san_text

#: Puppet's arc for certificate extensions (``ppCertExt``).
PUPPET_EXTENSION_ARC = "1.3.6.1.4.1.34380.1"
#: ``pp_instance_id``: the EC2 instance the certificate was issued to, readable as
#: ``$trusted['extensions']['pp_instance_id']``.
PP_INSTANCE_ID = x509.ObjectIdentifier("1.3.6.1.4.1.34380.1.1.2")

#: Certificates and CRLs start this long before ``now``, so a host whose clock lags a little
#: still accepts them.
BACKDATE = timedelta(minutes=10)

_SERIAL_BITS = 127


class Usage(enum.Enum):
    """What a leaf certificate is for."""

    SERVER = "server"
    CLIENT = "client"
    BOTH = "both"

    def extended_key_usage(self) -> x509.ExtendedKeyUsage:
        usages = {
            Usage.SERVER: [ExtendedKeyUsageOID.SERVER_AUTH],
            Usage.CLIENT: [ExtendedKeyUsageOID.CLIENT_AUTH],
            Usage.BOTH: [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        }
        return x509.ExtendedKeyUsage(usages[self])


def new_serial() -> int:
    """
    A random positive serial of at most 127 bits: its DER INTEGER never needs the leading zero
    byte that a set top bit would force, so it always fits RFC 5280's 20 octets with room and
    stays within 16 bytes.
    """
    while True:
        serial = secrets.randbits(_SERIAL_BITS)
        if serial:
            return serial


def puppet_extension(oid: x509.ObjectIdentifier | str, value: str) -> x509.UnrecognizedExtension:
    """
    A Puppet trusted-fact extension.  Puppet writes these values as a DER UTF8String inside the
    extension's OCTET STRING, and decodes them that way into ``$trusted['extensions']``.
    """
    oid = oid if isinstance(oid, x509.ObjectIdentifier) else x509.ObjectIdentifier(oid)
    if not oid.dotted_string.startswith(PUPPET_EXTENSION_ARC + "."):
        raise ValueError(f"{oid.dotted_string} is not under Puppet's arc {PUPPET_EXTENSION_ARC}")
    return x509.UnrecognizedExtension(oid, core.UTF8String(value).dump())


def fingerprint(cert: x509.Certificate) -> str:
    """``sha256:`` and the lowercase hex SHA-256 of the DER certificate (what clients pin)."""
    return "sha256:" + hashlib.sha256(cert.public_bytes(_DER)).hexdigest()


def create_root_ca(
    key: PrivateKey,
    common_name: str,
    now: datetime,
    lifetime: timedelta,
) -> x509.Certificate:
    """The self-signed root CA (no path length limit: it signs the masters' intermediates)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    builder = (
        _validity(x509.CertificateBuilder(), now, now + lifetime)
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
    )
    return builder.sign(key, SIGNATURE_HASH)


def create_intermediate_ca(
    public_key: PublicKey,
    subject: x509.Name,
    *,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    now: datetime,
    lifetime: timedelta,
) -> x509.Certificate:
    """A master's CA: may sign leaves only (path length 0), never outliving its issuer."""
    builder = (
        _issued_by(x509.CertificateBuilder(), issuer_cert, now, lifetime)
        .subject_name(subject)
        .public_key(public_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return builder.sign(issuer_key, SIGNATURE_HASH)


def issue_leaf(
    csr: x509.CertificateSigningRequest,
    *,
    common_name: str,
    sans: Sequence[str],
    usage: Usage,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    now: datetime,
    lifetime: timedelta,
    extensions: Sequence[x509.UnrecognizedExtension] = (),
) -> x509.Certificate:
    """
    Sign a leaf for the public key of ``csr``; everything else the CSR says is ignored.

    The subject is ``CN=<common_name>``, a Puppet certname.  The subjectAltName holds the
    certname itself followed by ``sans`` (DNS names or IP addresses, see
    :func:`puppetha.pki.names.parse_san`).  ``extensions`` are non-critical extensions under
    Puppet's arc, made with :func:`puppet_extension`.  ``ValueError`` for a bad name, a key type
    puppetha does not issue for, or a foreign extension.
    """
    check_certname(common_name)
    public = csr.public_key()
    if not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError(f"cannot issue for a {type(public).__name__}")
    names = _alt_names(common_name, sans)
    seen = set()
    for extension in extensions:
        if not extension.oid.dotted_string.startswith(PUPPET_EXTENSION_ARC + "."):
            raise ValueError(f"extension {extension.oid.dotted_string} is not a Puppet extension")
        if extension.oid in seen:
            raise ValueError(f"extension {extension.oid.dotted_string} given twice")
        seen.add(extension.oid)
    is_rsa = isinstance(public, rsa.RSAPublicKey)
    builder = (
        _issued_by(x509.CertificateBuilder(), issuer_cert, now, lifetime)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .public_key(public)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(key_encipherment=is_rsa), critical=True)
        .add_extension(usage.extended_key_usage(), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, SIGNATURE_HASH)


_DER = serialization.Encoding.DER

_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _leaf_key_usage(key_encipherment: bool) -> x509.KeyUsage:
    # keyEncipherment only means something for RSA key transport; ECDSA keys sign only.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _alt_names(common_name: str, sans: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(common_name)]
    seen = {san_text(names[0])}
    for text in sans:
        name = parse_san(text)
        if san_text(name) not in seen:
            seen.add(san_text(name))
            names.append(name)
    return names


def _validity(
    builder: x509.CertificateBuilder, now: datetime, not_after: datetime
) -> x509.CertificateBuilder:
    return builder.serial_number(new_serial()).not_valid_before(now - BACKDATE).not_valid_after(not_after)


def _issued_by(
    builder: x509.CertificateBuilder, issuer_cert: x509.Certificate, now: datetime, lifetime: timedelta
) -> x509.CertificateBuilder:
    """Issuer name, AKI, and a validity clipped to the issuer's (no child outlives its CA)."""
    if now >= issuer_cert.not_valid_after_utc:
        raise ValueError("the issuing CA has expired")
    not_after = min(now + lifetime, issuer_cert.not_valid_after_utc)
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _validity(builder, now, not_after)
        .issuer_name(issuer_cert.subject)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
