"""
The enrollment answer, checked before anything is written: our certname, a certificate for our
key that chains to the pinned root, a CRL from every CA of the chain, usable addresses, and for
a master its own CA and the lb CA.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from attrs import field, frozen
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from puppetha.instance.failures import Untrusted
from puppetha.instance.options import ServerAddress, parse_host_port
from puppetha.pki.keys import PrivateKey, same_public_key


@frozen
class Enrollment:
    """An enrollment answer that checked out, ready to be written."""

    certname: str
    role: str
    certificate: x509.Certificate
    ca_chain: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...] = field(repr=False)
    server: ServerAddress
    test_server: ServerAddress
    master_ca: x509.Certificate | None = None
    #: Masters: the CA of the lb nodes, the only clients their puppetserver accepts, and its CRL.
    lb_ca: x509.Certificate | None = None
    lb_crl: x509.CertificateRevocationList | None = field(default=None, repr=False)


#: The extended key usage each role's certificate must carry, as docs/api.md promises.
REQUIRED_USAGE = {
    "agent": ExtendedKeyUsageOID.CLIENT_AUTH,
    "master": ExtendedKeyUsageOID.SERVER_AUTH,
    "lb": ExtendedKeyUsageOID.SERVER_AUTH,
}


_USAGE_NAMES = {ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth", ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth"}


def check_enrollment(
    answer: Mapping[str, Any],
    *,
    role: str,
    certname: str,
    key: PrivateKey,
    root: x509.Certificate,
    now: datetime,
) -> Enrollment:
    """
    The answer as an :class:`Enrollment` if it is what we asked for: our certname, a certificate
    for our key that chains to the pinned ``root`` through ``ca_chain``, a CRL from every CA of the
    chain, usable addresses.  :class:`Untrusted` naming the first thing wrong otherwise.
    """

    def text(name: str) -> str:
        value = answer.get(name)
        if not isinstance(value, str) or not value:
            raise Untrusted(f"the server's answer has no {name}")
        return value

    def certificates(name: str) -> list[x509.Certificate]:
        try:
            return x509.load_pem_x509_certificates(text(name).encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise Untrusted(f"the server's {name} is not PEM certificates") from None

    if text("certname") != certname:
        raise Untrusted(f"the server issued for {answer['certname']!r}, not our certname {certname!r}")
    issued = certificates("certificate")
    if len(issued) != 1:
        raise Untrusted("the server's certificate is not exactly one PEM certificate")
    certificate = issued[0]
    chain = certificates("ca_chain")
    if chain[-1] != root:
        raise Untrusted("the server's ca_chain does not end with the pinned root CA")
    if not same_public_key(certificate.public_key(), key.public_key()):  # type: ignore[arg-type]
        raise Untrusted("the issued certificate is not for our key")
    subject = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in subject] != [certname]:
        raise Untrusted(f"the issued certificate's subject is not CN={certname}")
    _verify_chain(certificate, chain, root, role, now)
    crls = _check_crls(text("crl_chain"), chain, now)
    try:
        server = parse_host_port(text("server"))
        test_server = parse_host_port(text("test_server") if "test_server" in answer else text("server"))
    except ValueError as e:
        raise Untrusted(f"the server's answer has a bad address: {e}") from None
    master_ca = None
    if role == "master":
        own = certificates("ca_certificate")
        if len(own) != 1 or own[0] != chain[0] or own[0].subject != certificate.issuer:
            raise Untrusted("the server's ca_certificate is not the CA that issued this master's certificate")
        master_ca = own[0]
        lb_ca, lb_crl = _check_lb_ca(certificates("lb_ca_chain"), text("lb_crl"), root, now)
        return Enrollment(
            certname, role, certificate, tuple(chain), crls, server, test_server, master_ca, lb_ca, lb_crl
        )
    return Enrollment(certname, role, certificate, tuple(chain), crls, server, test_server, master_ca)


def _check_lb_ca(
    chain: Sequence[x509.Certificate], crl_pem: str, root: x509.Certificate, now: datetime
) -> tuple[x509.Certificate, x509.CertificateRevocationList]:
    """The lb CA of a master's answer: a CA issued by the pinned root itself, with its CRL."""
    if len(chain) != 2 or chain[-1] != root:
        raise Untrusted("the server's lb_ca_chain is not the lb CA and the pinned root CA")
    lb_ca = chain[0]
    try:
        lb_ca.verify_directly_issued_by(root)
        constraints = lb_ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        raise Untrusted("the server's lb CA is not issued by the pinned root CA") from None
    if not constraints.ca or lb_ca.subject == root.subject:
        raise Untrusted("the server's lb CA is not an intermediate CA")
    if not lb_ca.not_valid_before_utc <= now <= lb_ca.not_valid_after_utc:
        raise Untrusted("the server's lb CA is not valid now")
    crls = _check_crls(crl_pem, [lb_ca], now)
    if len(crls) != 1:
        raise Untrusted("the server's lb_crl is not exactly one CRL")
    return lb_ca, crls[0]


def _verify_chain(
    certificate: x509.Certificate,
    chain: Sequence[x509.Certificate],
    root: x509.Certificate,
    role: str,
    now: datetime,
) -> None:
    # Extended key usage is checked below per role; the chain's CAs get the full WebPKI rules.
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([root]))
        .time(now)
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=verification.ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(certificate, list(chain[:-1]))
    except verification.VerificationError as e:
        raise Untrusted(f"the issued certificate does not verify against the pinned root CA: {e}") from None
    if list(verified.chain[1:]) != list(chain):
        raise Untrusted("the server's ca_chain is not the issued certificate's chain")
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = x509.ExtendedKeyUsage([])
    if REQUIRED_USAGE[role] not in usages:
        raise Untrusted(
            f"the issued certificate lacks the extended key usage {_USAGE_NAMES[REQUIRED_USAGE[role]]} "
            f"that the {role} role needs"
        )


def _check_crls(
    pem: str, chain: Sequence[x509.Certificate], now: datetime
) -> tuple[x509.CertificateRevocationList, ...]:
    # Puppet checks revocation along the whole chain and fails without a CRL for every CA.
    blocks = re.findall(r"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", pem, re.S)
    if not blocks or len(blocks) != pem.count("-----BEGIN"):
        raise Untrusted("the server's crl_chain is not PEM CRLs")
    try:
        crls = tuple(x509.load_pem_x509_crl(b.encode("ascii")) for b in blocks)
    except (ValueError, UnicodeEncodeError):
        raise Untrusted("the server's crl_chain holds an unreadable CRL") from None
    for ca in chain:
        if not any(
            crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
            for crl in crls
        ):
            raise Untrusted(f"the server's crl_chain has no CRL signed by {ca.subject.rfc4514_string()}")
    return crls
