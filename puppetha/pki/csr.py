"""
The policy a certificate signing request must pass before anything is signed.

A CSR only proves possession of a key: :func:`puppetha.pki.certs.issue_leaf` takes nothing
from it but the public key.  The check still refuses any CSR that *asks* for more than the
caller allows, so a client learns at once that it asked for the wrong thing.

Allowed in a CSR's extension request (everything else is refused with ``extension``):

- subjectAltName, if every name is a DNS name or IP address the policy allows (the certname
  itself is always allowed);
- basicConstraints with ``CA:FALSE`` (some tools add it; ``CA:TRUE`` is refused with ``ca-request``);
- Puppet's trusted-fact arcs ``1.3.6.1.4.1.34380.1.1`` (ppRegCertExt) and ``.1.2``
  (ppPrivCertExt), which ``csr_attributes.yaml`` fills.  Puppet's authorization arc ``.1.3``
  grants rights on puppetserver's own APIs and is refused.  Values of OIDs named in
  :attr:`CSRPolicy.expected_extensions` must be the expected UTF8String.

Keys: those of :class:`puppetha.pki.keys.KeyType` the policy lists (P-256, RSA 2048/3072/4096);
RSA below 2048 bits or with an exponent below 65537 is ``weak-key``; other curves, other RSA
sizes, DSA and EdDSA keys are ``key-type``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from asn1crypto import core
from attrs import field, frozen
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from puppetha.pki.keys import KeyType
from puppetha.pki.names import check_certname, parse_san, san_text

#: Larger than any CSR puppetha accepts (an RSA-4096 CSR is under 2 KiB of PEM).
MAX_CSR_PEM = 16 * 1024

#: Puppet extension-request arcs a CSR may use.
ALLOWED_PUPPET_ARCS = ("1.3.6.1.4.1.34380.1.1.", "1.3.6.1.4.1.34380.1.2.")

_STRONG_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_MIN_RSA_BITS = 2048
_MIN_RSA_EXPONENT = 65537


class CSRRefused(Exception):
    """
    The CSR breaks the policy.  ``code`` is one of ``malformed``, ``bad-signature``,
    ``key-type``, ``weak-key``, ``subject``, ``san``, ``ca-request``, ``extension``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _canonical_sans(names: Iterable[str]) -> frozenset[str]:
    return frozenset(san_text(parse_san(name)) for name in names)


def _key_types(types: Iterable[KeyType]) -> frozenset[KeyType]:
    return frozenset(KeyType(t) for t in types)


@frozen
class CSRPolicy:
    """What one enrollment may ask for."""

    #: The only subject accepted: ``CN=<certname>``.
    certname: str = field(converter=check_certname)
    #: Further DNS names and IP addresses the CSR may request (``DNS:``/``IP:`` prefixes optional).
    allowed_sans: frozenset[str] = field(converter=_canonical_sans, default=frozenset())
    key_types: frozenset[KeyType] = field(converter=_key_types, default=frozenset(KeyType))
    #: Dotted OID -> value: a CSR requesting one of these must request exactly this value.
    expected_extensions: Mapping[str, str] = field(factory=dict)


def check_csr(pem: bytes, policy: CSRPolicy) -> x509.CertificateSigningRequest:
    """The parsed CSR if it passes ``policy``; :class:`CSRRefused` otherwise."""
    csr = _parse(pem)
    try:
        signed = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm, InvalidSignature):
        signed = False
    if not signed:
        raise CSRRefused("bad-signature", "the CSR's self-signature does not verify")
    _check_key(csr.public_key(), policy)
    try:
        algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algorithm = None
    if not isinstance(algorithm, _STRONG_HASHES):
        raise CSRRefused("bad-signature", "the CSR is not signed with SHA-256 or stronger")
    _check_subject(csr.subject, policy.certname)
    try:
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension) as e:
        raise CSRRefused("malformed", f"unreadable extension request: {e}") from None
    for extension in extensions:
        _check_extension(extension, policy)
    return csr


def _parse(pem: bytes) -> x509.CertificateSigningRequest:
    if len(pem) > MAX_CSR_PEM:
        raise CSRRefused("malformed", f"the CSR is larger than {MAX_CSR_PEM} bytes")
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in pem:
        raise CSRRefused("malformed", "not a PEM certificate request")
    try:
        return x509.load_pem_x509_csr(pem)
    except ValueError:
        raise CSRRefused("malformed", "the PEM does not hold a readable certificate request") from None


def _check_key(public: object, policy: CSRPolicy) -> None:
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < _MIN_RSA_BITS:
            raise CSRRefused(
                "weak-key", f"RSA keys need at least {_MIN_RSA_BITS} bits, not {public.key_size}"
            )
        if public.public_numbers().e < _MIN_RSA_EXPONENT:
            raise CSRRefused("weak-key", "RSA public exponent below 65537")
        described = f"rsa-{public.key_size}"
        key_type = KeyType.of(public)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        described = f"EC {public.curve.name}"
        key_type = KeyType.of(public)
    else:
        described = type(public).__name__
        key_type = None
    if key_type is None or key_type not in policy.key_types:
        allowed = ", ".join(sorted(t.value for t in policy.key_types))
        raise CSRRefused("key-type", f"{described} keys are not accepted (allowed: {allowed})")


def _check_subject(subject: x509.Name, certname: str) -> None:
    attributes = list(subject)
    if len(attributes) != 1 or attributes[0].oid != NameOID.COMMON_NAME or attributes[0].value != certname:
        raise CSRRefused("subject", f"the subject must be exactly CN={certname}")


def _check_extension(extension: x509.Extension[x509.ExtensionType], policy: CSRPolicy) -> None:
    value = extension.value
    if isinstance(value, x509.BasicConstraints):
        if value.ca:
            raise CSRRefused("ca-request", "the CSR asks for CA rights")
        return
    if isinstance(value, x509.SubjectAlternativeName):
        _check_sans(value, policy)
        return
    dotted = extension.oid.dotted_string
    if not dotted.startswith(ALLOWED_PUPPET_ARCS):
        raise CSRRefused("extension", f"extension {dotted} may not be requested")
    expected = policy.expected_extensions.get(dotted)
    if expected is not None and _utf8_value(value) != expected:
        raise CSRRefused("extension", f"extension {dotted} does not hold the expected value")


def _check_sans(value: x509.SubjectAlternativeName, policy: CSRPolicy) -> None:
    allowed = policy.allowed_sans | {f"DNS:{policy.certname}"}
    for name in value:
        if not isinstance(name, x509.DNSName | x509.IPAddress):
            raise CSRRefused("san", f"{type(name).__name__} alternative names are not accepted")
        text = san_text(name)
        if text not in allowed:
            # Quoted: the name is the client's own text and this message reaches the log.
            raise CSRRefused("san", f"{text!r} is not an allowed alternative name")


def _utf8_value(value: x509.ExtensionType) -> str | None:
    if not isinstance(value, x509.UnrecognizedExtension):
        return None
    try:
        parsed = core.UTF8String.load(value.value, strict=True)
        return str(parsed.native)
    except (ValueError, TypeError):
        return None
