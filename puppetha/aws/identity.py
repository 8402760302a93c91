"""
EC2 instance identity: the document the metadata service serves and its PKCS7 signature
(``/latest/dynamic/instance-identity/rsa2048``), verified against AWS's public certificate for
the document's region.

Only certificates from the operator's trust file are believed; a certificate carried inside the
PKCS7 is ignored.  The fields are read from the signed content, and the document sent alongside
must be byte-for-byte that content.  ``docs/aws.md`` describes the trust file.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from asn1crypto import cms, core
from attrs import field, frozen
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

#: A real document is about 500 bytes and its signature about 1,600 characters of base64;
#: anything far beyond is refused before it is parsed.
MAX_DOCUMENT_BYTES = 16 * 1024
MAX_SIGNATURE_CHARS = 32 * 1024

#: Smallest RSA key accepted as an AWS signing certificate.
MIN_TRUSTED_KEY_BITS = 2048

_INSTANCE_ID = re.compile(r"i-(?:[0-9a-f]{8}|[0-9a-f]{17})")
_ACCOUNT_ID = re.compile(r"[0-9]{12}")
REGION_NAME = re.compile(r"[a-z]{2,4}(?:-[a-z]+)+-[0-9]{1,2}")
_ZONE = re.compile(r"[a-z0-9-]{1,64}")
_IMAGE_ID = re.compile(r"ami-(?:[0-9a-f]{8}|[0-9a-f]{17})")
_INSTANCE_TYPE = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")
_ARCHITECTURE = re.compile(r"[a-z0-9_]{1,32}")

# The RSA signature algorithms a SignerInfo may name, with the digest each one implies
# (None: the digest named by the SignerInfo's digestAlgorithm).
_RSA_SIGNATURES: Mapping[str, str | None] = {
    "rsassa_pkcs1v15": None,
    "sha256_rsa": "sha256",
}

# SHA-256 only: AWS signs rsa2048 documents with it, and weaker digests are not worth trusting.
_DIGESTS: Mapping[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256()}


class IdentityRefused(Exception):
    """
    An identity document that was not proven.  ``code`` is one of ``too-large``,
    ``malformed``, ``document-mismatch``, ``untrusted-region``, ``bad-signature``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@frozen
class IdentityDocument:
    """The fields of a verified instance identity document, read from the signed content."""

    instance_id: str
    account_id: str
    region: str
    availability_zone: str
    private_ip: str
    image_id: str
    instance_type: str
    #: When the instance was launched (``pendingTime``), in seconds since the epoch.
    pending_time: float
    architecture: str
    #: The signed content, exactly as AWS signed it.
    raw: bytes = field(repr=False)


@frozen
class TrustStore:
    """AWS's identity-signing certificates, one per region; nothing else is trusted."""

    certificates: Mapping[str, x509.Certificate]

    @property
    def regions(self) -> frozenset[str]:
        return frozenset(self.certificates)

    def certificate(self, region: str) -> x509.Certificate | None:
        return self.certificates.get(region)

    @classmethod
    def from_certificates(cls, certificates: Mapping[str, x509.Certificate]) -> TrustStore:
        for region, certificate in certificates.items():
            problem = _unsuitable(region, certificate)
            if problem:
                raise ValueError(problem)
        return cls(dict(certificates))

    @classmethod
    def from_file(cls, path: str | Path) -> TrustStore:
        """
        Reads an INI file with one section per region, each naming a PEM file with
        ``certificate = <path>`` (relative paths are taken from the INI file's directory).
        Raises a one-line :class:`ValueError` naming the file and region on any problem.
        """
        path = Path(path)
        parser = configparser.ConfigParser(interpolation=None, default_section="\x00no-defaults")
        try:
            with path.open(encoding="utf-8") as f:
                parser.read_file(f)
        except (OSError, UnicodeDecodeError, configparser.Error) as e:
            raise ValueError(f"{path}: cannot read trust file: {_one_line(e)}") from e
        certificates: dict[str, x509.Certificate] = {}
        for region in parser.sections():
            where = f"{path} [{region}]"
            if not REGION_NAME.fullmatch(region):
                raise ValueError(f"{where}: not a region name")
            section = parser[region]
            unknown = set(section) - {"certificate"}
            if unknown:
                raise ValueError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
            name = section.get("certificate", "").strip()
            if not name:
                raise ValueError(f"{where}: no 'certificate = <path to PEM>'")
            pem_path = path.parent / name
            try:
                pem = pem_path.read_bytes()
            except OSError as e:
                raise ValueError(f"{where}: cannot read {pem_path}: {e.strerror}") from e
            try:
                certificate = x509.load_pem_x509_certificate(pem)
            except ValueError as e:
                raise ValueError(f"{where}: {pem_path} is not a PEM certificate") from e
            problem = _unsuitable(region, certificate)
            if problem:
                raise ValueError(f"{where}: {pem_path}: {problem}")
            certificates[region] = certificate
        if not certificates:
            raise ValueError(f"{path}: no regions configured, every identity would be refused")
        return cls(certificates)


def _unsuitable(region: str, certificate: x509.Certificate) -> str | None:
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return f"the certificate for {region} does not hold an RSA key"
    if key.key_size < MIN_TRUSTED_KEY_BITS:
        return f"the certificate for {region} holds a {key.key_size}-bit key"
    return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def verify_identity(document: bytes, signature_b64: str, trust: TrustStore) -> IdentityDocument:
    """
    The identity proven by ``signature_b64`` (the metadata service's ``rsa2048`` text), whose
    signed content must be exactly ``document``.  Raises :class:`IdentityRefused`.

    Pure and CPU-bound (an RSA verification): callers on the reactor run it on a thread pool.
    """
    if len(document) > MAX_DOCUMENT_BYTES or len(signature_b64) > MAX_SIGNATURE_CHARS:
        raise IdentityRefused("too-large", "identity document or signature too large")
    signed = _parse_signed_data(_decode_base64(signature_b64))
    if signed.content != document:
        raise IdentityRefused("document-mismatch", "the document is not the signed content")
    identity = parse_document(signed.content)
    certificate = trust.certificate(identity.region)
    if certificate is None:
        raise IdentityRefused("untrusted-region", f"no trusted certificate for region {identity.region}")
    _verify_signature(signed, certificate)
    return identity


def _decode_base64(text: str) -> bytes:
    # The metadata service wraps the base64 in lines; nothing else may be in it.
    try:
        return base64.b64decode("".join(text.split()).encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as e:
        raise IdentityRefused("malformed", "the signature is not base64") from e


@frozen
class _SignedData:
    content: bytes
    digest_algorithm: str
    signature_algorithm: str
    #: DER of the signed attributes as a SET, or None when the signature covers the content.
    signed_attributes: bytes | None
    message_digest: bytes | None
    content_type: str | None
    signature: bytes


def _parse_signed_data(der: bytes) -> _SignedData:
    try:
        return _read_signed_data(der)
    except IdentityRefused:
        raise
    except Exception as e:
        # asn1crypto parses lazily and raises assorted errors on bad input: all mean malformed.
        raise IdentityRefused("malformed", "the signature is not a PKCS7 SignedData") from e


def _read_signed_data(der: bytes) -> _SignedData:
    info = cms.ContentInfo.load(der, strict=True)
    if info["content_type"].native != "signed_data":
        raise IdentityRefused("malformed", "the signature is not a PKCS7 SignedData")
    signed_data = info["content"]
    encapsulated = signed_data["encap_content_info"]
    if encapsulated["content_type"].native != "data":
        raise IdentityRefused("malformed", "the signed content is not data")
    content = encapsulated["content"].native
    if not isinstance(content, bytes):
        raise IdentityRefused("malformed", "the signature carries no document")
    signers = list(signed_data["signer_infos"])
    if len(signers) != 1:
        raise IdentityRefused("malformed", f"expected one signer, found {len(signers)}")
    signer = signers[0]
    attributes = signer["signed_attrs"]
    signed_attributes: bytes | None = None
    message_digest: bytes | None = None
    content_type: str | None = None
    # An absent optional field is a Void; asking for ``.native`` instead converted every
    # attribute to Python (two fifths of the parse) only to compare the result with None.
    if not isinstance(attributes, core.Void):
        # The signature covers the attributes encoded as a SET OF, not with their [0] tag.
        tagged = attributes.dump()
        signed_attributes = b"\x31" + tagged[1:]
        message_digest = _single_attribute(attributes, "message_digest")
        content_type = _single_attribute(attributes, "content_type")
    return _SignedData(
        content=content,
        digest_algorithm=str(signer["digest_algorithm"]["algorithm"].native),
        signature_algorithm=str(signer["signature_algorithm"]["algorithm"].native),
        signed_attributes=signed_attributes,
        message_digest=message_digest,
        content_type=content_type,
        signature=signer["signature"].native,
    )


def _single_attribute(attributes: Iterable[Any], name: str) -> Any:
    values = [a["values"] for a in attributes if a["type"].native == name]
    if len(values) != 1 or len(values[0]) != 1:
        raise IdentityRefused("malformed", f"the signer must sign exactly one {name}")
    return values[0][0].native


def _verify_signature(signed: _SignedData, certificate: x509.Certificate) -> None:
    digest = _DIGESTS.get(signed.digest_algorithm)
    if digest is None:
        raise IdentityRefused("bad-signature", f"digest {signed.digest_algorithm} is not accepted")
    if signed.signature_algorithm not in _RSA_SIGNATURES:
        raise IdentityRefused("bad-signature", f"signature {signed.signature_algorithm} is not accepted")
    implied = _RSA_SIGNATURES[signed.signature_algorithm]
    if implied is not None and implied != signed.digest_algorithm:
        raise IdentityRefused("bad-signature", "signature and digest algorithms disagree")
    if signed.signed_attributes is None:
        covered = signed.content
    else:
        if signed.content_type != "data":
            raise IdentityRefused("bad-signature", "the signed content type is not data")
        if signed.message_digest != hashlib.sha256(signed.content).digest():
            raise IdentityRefused("bad-signature", "the document was changed after signing")
        covered = signed.signed_attributes
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise IdentityRefused("bad-signature", "the trusted certificate does not hold an RSA key")
    try:
        key.verify(signed.signature, covered, padding.PKCS1v15(), digest)
    except InvalidSignature as e:
        raise IdentityRefused("bad-signature", "the signature is not AWS's for this region") from e


def parse_document(content: bytes) -> IdentityDocument:
    """The fields of an identity document (not verified: :func:`verify_identity` does that)."""
    try:
        fields = json.loads(content.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IdentityRefused("malformed", "the document is not JSON") from e
    if not isinstance(fields, dict):
        raise IdentityRefused("malformed", "the document is not a JSON object")

    def text(name: str, pattern: re.Pattern[str] | None = None) -> str:
        value = fields.get(name)
        if not isinstance(value, str):
            raise IdentityRefused("malformed", f"{name} is missing or not a string")
        if pattern is not None and not pattern.fullmatch(value):
            raise IdentityRefused("malformed", f"{name} is not well formed")
        return value

    region = text("region", REGION_NAME)
    zone = text("availabilityZone", _ZONE)
    if not zone.startswith(region):
        raise IdentityRefused("malformed", "availabilityZone is not in the region")
    private_ip = text("privateIp")
    try:
        ipaddress.ip_address(private_ip)
    except ValueError as e:
        raise IdentityRefused("malformed", "privateIp is not an IP address") from e
    return IdentityDocument(
        instance_id=text("instanceId", _INSTANCE_ID),
        account_id=text("accountId", _ACCOUNT_ID),
        region=region,
        availability_zone=zone,
        private_ip=private_ip,
        image_id=text("imageId", _IMAGE_ID),
        instance_type=text("instanceType", _INSTANCE_TYPE),
        pending_time=_parse_time(text("pendingTime")),
        architecture=text("architecture", _ARCHITECTURE),
        raw=content,
    )


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key}")
        result[key] = value
    return result


def _parse_time(value: str) -> float:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as e:
        raise IdentityRefused("malformed", "pendingTime is not an ISO 8601 time") from e
    if moment.tzinfo is None:
        raise IdentityRefused("malformed", "pendingTime has no time zone")
    return moment.timestamp()
