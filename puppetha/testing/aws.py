"""
Plays AWS's identity signer in tests and the local demo: a test "AWS" key and certificate per
region, identity documents shaped like the metadata service's, and their PKCS7 signatures.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import NameOID

from puppetha.aws.cloud import InstanceInfo
from puppetha.aws.identity import TrustStore

#: moto's account, and so the account of every instance in tests.
DEFAULT_ACCOUNT = "123456789012"
DEFAULT_IMAGE = "ami-0123456789abcdef0"
DEFAULT_INSTANCE_TYPE = "t3.micro"

#: The keys of AWS's identity document, in the order the metadata service prints them.
DOCUMENT_KEYS = (
    "accountId",
    "architecture",
    "availabilityZone",
    "billingProducts",
    "devpayProductCodes",
    "marketplaceProductCodes",
    "imageId",
    "instanceId",
    "instanceType",
    "kernelId",
    "pendingTime",
    "privateIp",
    "ramdiskId",
    "region",
    "version",
)

TRUST_FILE_NAME = "aws-identity-certs.ini"

# Fixed validity, so nothing here depends on the wall clock.
_NOT_BEFORE = datetime(2020, 1, 1, tzinfo=UTC)
_NOT_AFTER = datetime(2199, 1, 1, tzinfo=UTC)


@frozen
class RegionSigner:
    region: str
    key: rsa.RSAPrivateKey
    certificate: x509.Certificate


def make_signer(region: str, name: str = "AWS test identity signer") -> RegionSigner:
    """An RSA-2048 key and a self-signed certificate standing in for AWS's in ``region``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "puppetha test AWS"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {region}"),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .sign(key, hashes.SHA256())
    )
    return RegionSigner(region, key, certificate)


@frozen
class FakeAWSSigner:
    """One test signing key per region, as AWS has; ``trust_file`` is set when one was written."""

    signers: Mapping[str, RegionSigner]
    trust_file: Path | None = None

    @classmethod
    def create(cls, *regions: str, directory: str | Path | None = None) -> FakeAWSSigner:
        """
        Signers for ``regions`` (``us-east-1`` when none are named); with ``directory``, also
        writes their certificates and a trust file there (see :meth:`write_trust_file`).
        """
        signers = {region: make_signer(region) for region in regions or ("us-east-1",)}
        signer = cls(signers)
        if directory is not None:
            signer = cls(signers, signer.write_trust_file(directory))
        return signer

    def trust_store(self) -> TrustStore:
        return TrustStore.from_certificates({r: s.certificate for r, s in self.signers.items()})

    def write_trust_file(self, directory: str | Path) -> Path:
        """Writes ``<region>.pem`` per region and ``aws-identity-certs.ini`` naming them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        sections = []
        for region, signer in sorted(self.signers.items()):
            (directory / f"aws-{region}.pem").write_bytes(signer.certificate.public_bytes(Encoding.PEM))
            sections.append(f"[{region}]\ncertificate = aws-{region}.pem\n")
        path = directory / TRUST_FILE_NAME
        path.write_text("# Test AWS signing certificates (not AWS's).\n\n" + "\n".join(sections))
        return path

    def sign(
        self,
        document: bytes,
        *,
        region: str | None = None,
        embed_certificate: bool = False,
        signed_attributes: bool = True,
    ) -> str:
        """
        The ``rsa2048`` text for ``document``: base64 of a DER PKCS7 SignedData holding the
        document, signed with SHA-256 by the key of ``region`` (by default the document's own).
        """
        if region is None:
            region = str(json.loads(document)["region"])
        return sign_with(self.signers[region], document, embed_certificate, signed_attributes)

    def identity_for(self, instance: InstanceInfo, **document_options: Any) -> tuple[bytes, str]:
        """An instance's identity document and its signature, as its metadata service serves them."""
        document = make_document(instance, **document_options)
        return document, self.sign(document)


def sign_with(
    signer: RegionSigner, document: bytes, embed_certificate: bool = False, signed_attributes: bool = True
) -> str:
    # Binary: without it the builder turns the document's LF into CRLF before signing.
    options = [pkcs7.PKCS7Options.Binary]
    if not embed_certificate:
        options.append(pkcs7.PKCS7Options.NoCerts)
    if not signed_attributes:
        options.append(pkcs7.PKCS7Options.NoAttributes)
    der = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(document)
        .add_signer(signer.certificate, signer.key, hashes.SHA256())
        .sign(Encoding.DER, options)
    )
    text = base64.b64encode(der).decode("ascii")
    # The metadata service serves the base64 in lines of 64 characters.
    return "\n".join(text[i : i + 64] for i in range(0, len(text), 64))


def make_document(
    instance: InstanceInfo,
    *,
    pending_time: float | None = None,
    availability_zone: str | None = None,
    image_id: str = DEFAULT_IMAGE,
    instance_type: str = DEFAULT_INSTANCE_TYPE,
    architecture: str = "x86_64",
) -> bytes:
    """``instance``'s identity document, as AWS prints it (``pendingTime`` defaults to its launch time)."""
    return render_document(
        {
            "accountId": instance.account,
            "architecture": architecture,
            "availabilityZone": availability_zone or f"{instance.region}a",
            "billingProducts": None,
            "devpayProductCodes": None,
            "marketplaceProductCodes": None,
            "imageId": image_id,
            "instanceId": instance.instance_id,
            "instanceType": instance_type,
            "kernelId": None,
            "pendingTime": iso_time(instance.launch_time if pending_time is None else pending_time),
            "privateIp": instance.private_ip,
            "ramdiskId": None,
            "region": instance.region,
            "version": "2017-09-30",
        }
    )


def iso_time(seconds: float) -> str:
    """``2026-11-24T10:00:00Z``: AWS's way of writing ``pendingTime``."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_document(fields: Mapping[str, Any]) -> bytes:
    """
    ``fields`` printed the way the metadata service prints a document (its keys first, in its
    order, then any others); values are not checked, so tests can build wrong documents.
    """
    ordered = [k for k in DOCUMENT_KEYS if k in fields] + [k for k in fields if k not in DOCUMENT_KEYS]
    lines = [f"  {json.dumps(k)} : {_render_value(fields[k])}" for k in ordered]
    return ("{\n" + ",\n".join(lines) + "\n}").encode("utf-8")


def _render_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[ " + ", ".join(_render_value(v) for v in value) + " ]" if value else "[ ]"
    return json.dumps(value)
