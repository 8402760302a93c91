"""Verification of EC2 instance identity documents and their PKCS7 signatures."""

from __future__ import annotations

import base64
import configparser
import datetime
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from asn1crypto import cms
from attrs import evolve
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from puppetha.aws.cloud import InstanceInfo
from puppetha.aws.identity import (
    MAX_DOCUMENT_BYTES,
    MAX_SIGNATURE_CHARS,
    IdentityRefused,
    TrustStore,
    parse_document,
    verify_identity,
)
from puppetha.testing.aws import (
    FakeAWSSigner,
    make_document,
    make_signer,
    render_document,
    sign_with,
)

REGION = "eu-west-1"
LAUNCHED = 1795000000.0  # 2026-11-18T11:06:40Z

INSTANCE = InstanceInfo(
    instance_id="i-0123456789abcdef0",
    account="123456789012",
    region=REGION,
    state="running",
    private_ip="10.20.1.4",
    private_dns="ip-10-20-1-4.eu-west-1.compute.internal",
    instance_profile_arn="",
    launch_time=LAUNCHED,
)


@pytest.fixture(scope="module")
def aws() -> FakeAWSSigner:
    return FakeAWSSigner.create(REGION, "us-east-1")


@pytest.fixture(scope="module")
def trust(aws: FakeAWSSigner) -> TrustStore:
    return aws.trust_store()


@pytest.fixture(scope="module")
def impostor() -> FakeAWSSigner:
    """Same regions, keys nobody trusts."""
    return FakeAWSSigner.create(REGION)


def document_fields(**changes: object) -> dict[str, object]:
    fields: dict[str, object] = json.loads(make_document(INSTANCE))
    fields.update(changes)
    return fields


def refused(document: bytes, signature: str, trust: TrustStore) -> IdentityRefused:
    with pytest.raises(IdentityRefused) as info:
        verify_identity(document, signature, trust)
    return info.value


def resign_with_content(signature: str, content: bytes, message_digest: bytes | None = None) -> str:
    """The same SignedData with other content (and, if given, another signed messageDigest)."""
    info = cms.ContentInfo.load(base64.b64decode("".join(signature.split())))
    signed_data = info["content"]
    signed_data["encap_content_info"]["content"] = content
    if message_digest is not None:
        signer = signed_data["signer_infos"][0]
        attributes = cms.CMSAttributes(
            [
                a
                if a["type"].native != "message_digest"
                else {"type": "message_digest", "values": [message_digest]}
                for a in signer["signed_attrs"]
            ]
        )
        signer["signed_attrs"] = attributes
    return base64.b64encode(info.dump(force=True)).decode("ascii")


def replace_signature_value(signature: str, value: bytes) -> str:
    info = cms.ContentInfo.load(base64.b64decode("".join(signature.split())))
    info["content"]["signer_infos"][0]["signature"] = value
    return base64.b64encode(info.dump(force=True)).decode("ascii")


# --- the happy paths


def test_verified_document_fields(aws: FakeAWSSigner, trust: TrustStore) -> None:
    document, signature = aws.identity_for(INSTANCE, instance_type="m5.large", architecture="arm64")
    identity = verify_identity(document, signature, trust)
    assert identity.instance_id == "i-0123456789abcdef0"
    assert identity.account_id == "123456789012"
    assert identity.region == REGION
    assert identity.availability_zone == "eu-west-1a"
    assert identity.private_ip == "10.20.1.4"
    assert identity.image_id == "ami-0123456789abcdef0"
    assert identity.instance_type == "m5.large"
    assert identity.architecture == "arm64"
    assert identity.pending_time == LAUNCHED
    assert identity.raw == document


def test_document_looks_like_aws(aws: FakeAWSSigner) -> None:
    document = make_document(INSTANCE)
    text = document.decode()
    assert text.startswith('{\n  "accountId" : "123456789012",\n  "architecture" : "x86_64",\n')
    assert '  "pendingTime" : "2026-11-18T11:06:40Z",\n' in text
    assert '  "billingProducts" : null,\n' in text
    assert text.endswith('  "version" : "2017-09-30"\n}')
    assert render_document({"marketplaceProductCodes": ["a1", "b2"]}) == (
        b'{\n  "marketplaceProductCodes" : [ "a1", "b2" ]\n}'
    )


def test_signature_without_signed_attributes_is_accepted(aws: FakeAWSSigner, trust: TrustStore) -> None:
    # RFC 5652 lets the signature cover the content directly; it proves as much.
    document = make_document(INSTANCE)
    signature = sign_with(aws.signers[REGION], document, signed_attributes=False)
    assert verify_identity(document, signature, trust).instance_id == INSTANCE.instance_id


@pytest.mark.parametrize("layout", ["one line", "wrapped", "trailing newline", "crlf"])
def test_base64_layouts_are_accepted(aws: FakeAWSSigner, trust: TrustStore, layout: str) -> None:
    document, wrapped = aws.identity_for(INSTANCE)
    signature = {
        "one line": "".join(wrapped.split()),
        "wrapped": wrapped,
        "trailing newline": wrapped + "\n",
        "crlf": wrapped.replace("\n", "\r\n"),
    }[layout]
    assert verify_identity(document, signature, trust).region == REGION


def test_trust_file_round_trip(aws: FakeAWSSigner, tmp_path: Path) -> None:
    path = aws.write_trust_file(tmp_path)
    trust = TrustStore.from_file(path)
    assert trust.regions == {REGION, "us-east-1"}
    document, signature = aws.identity_for(INSTANCE)
    assert verify_identity(document, signature, trust).instance_id == INSTANCE.instance_id


def test_create_with_directory_writes_trust_file(tmp_path: Path) -> None:
    aws = FakeAWSSigner.create(directory=tmp_path)
    assert aws.trust_file == tmp_path / "aws-identity-certs.ini"
    assert TrustStore.from_file(aws.trust_file).regions == {"us-east-1"}


def test_shipped_example_trust_file_parses(tmp_path: Path) -> None:
    # The example names PEM files the operator downloads from AWS; with them in place, it loads.
    example = Path(__file__).parent.parent / "etc" / "aws-identity-certs.ini"
    copy = tmp_path / example.name
    copy.write_text(example.read_text())
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(copy)
    assert parser.sections()
    for region in parser.sections():
        target = tmp_path / parser[region]["certificate"]
        target.parent.mkdir(parents=True, exist_ok=True)
        write_pem(target, region)
    assert TrustStore.from_file(copy).regions == set(parser.sections())


# --- forgeries


def test_random_bytes_are_not_a_signature(aws: FakeAWSSigner, trust: TrustStore) -> None:
    document = make_document(INSTANCE)
    error = refused(document, base64.b64encode(os.urandom(1200)).decode(), trust)
    assert error.code == "malformed"


def test_random_signature_value_is_refused(aws: FakeAWSSigner, trust: TrustStore) -> None:
    document, signature = aws.identity_for(INSTANCE)
    forged = replace_signature_value(signature, os.urandom(256))
    assert refused(document, forged, trust).code == "bad-signature"


def test_untrusted_key_with_embedded_certificate_is_refused(
    impostor: FakeAWSSigner, trust: TrustStore
) -> None:
    # The impostor ships its own certificate in the PKCS7: it must not be believed.
    document = make_document(INSTANCE)
    forged = impostor.sign(document, embed_certificate=True)
    info = cms.ContentInfo.load(base64.b64decode("".join(forged.split())))
    assert len(info["content"]["certificates"]) == 1
    error = refused(document, forged, trust)
    assert error.code == "bad-signature"


def test_key_of_another_region_is_refused(aws: FakeAWSSigner, trust: TrustStore) -> None:
    document = make_document(INSTANCE)
    forged = aws.sign(document, region="us-east-1")
    assert refused(document, forged, trust).code == "bad-signature"


def test_sent_document_differs_from_signed_content(aws: FakeAWSSigner, trust: TrustStore) -> None:
    document, signature = aws.identity_for(INSTANCE)
    edited = document.replace(b"10.20.1.4", b"10.20.1.5")
    error = refused(edited, signature, trust)
    assert error.code == "document-mismatch"


@pytest.mark.parametrize("variant", [b" ", b"\n"])
def test_even_whitespace_differences_are_refused(
    aws: FakeAWSSigner, trust: TrustStore, variant: bytes
) -> None:
    document, signature = aws.identity_for(INSTANCE)
    assert refused(document + variant, signature, trust).code == "document-mismatch"


def test_signed_content_tampered_after_signing(aws: FakeAWSSigner, trust: TrustStore) -> None:
    document, signature = aws.identity_for(INSTANCE)
    tampered = document.replace(b"i-0123456789abcdef0", b"i-0fffffffffffffff0")
    forged = resign_with_content(signature, tampered)
    error = refused(tampered, forged, trust)
    assert error.code == "bad-signature"
    assert "changed after signing" in error.message


def test_signed_content_and_digest_tampered(aws: FakeAWSSigner, trust: TrustStore) -> None:
    document, signature = aws.identity_for(INSTANCE)
    tampered = document.replace(b"i-0123456789abcdef0", b"i-0fffffffffffffff0")
    forged = resign_with_content(signature, tampered, hashlib.sha256(tampered).digest())
    assert refused(tampered, forged, trust).code == "bad-signature"


def test_tampered_content_without_signed_attributes(aws: FakeAWSSigner, trust: TrustStore) -> None:
    document = make_document(INSTANCE)
    signature = sign_with(aws.signers[REGION], document, signed_attributes=False)
    tampered = document.replace(b"10.20.1.4", b"10.20.1.5")
    forged = resign_with_content(signature, tampered)
    assert refused(tampered, forged, trust).code == "bad-signature"


def test_region_without_trusted_certificate(trust: TrustStore) -> None:
    elsewhere = FakeAWSSigner.create("ap-south-1")
    document = make_document(evolve(INSTANCE, region="ap-south-1"))
    error = refused(document, elsewhere.sign(document), trust)
    assert error.code == "untrusted-region"
    assert "ap-south-1" in error.message


def test_empty_trust_store_refuses_everything(aws: FakeAWSSigner) -> None:
    document, signature = aws.identity_for(INSTANCE)
    assert refused(document, signature, TrustStore.from_certificates({})).code == "untrusted-region"


def test_weaker_or_other_digests_are_refused(aws: FakeAWSSigner, trust: TrustStore) -> None:
    document = make_document(INSTANCE)
    signer = aws.signers[REGION]
    der = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(document)
        .add_signer(signer.certificate, signer.key, hashes.SHA512())
        .sign(Encoding.DER, [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.NoCerts])
    )
    error = refused(document, base64.b64encode(der).decode(), trust)
    assert error.code == "bad-signature"
    assert "sha512" in error.message


def test_two_signers_are_refused(aws: FakeAWSSigner, impostor: FakeAWSSigner, trust: TrustStore) -> None:
    document = make_document(INSTANCE)
    good, bad = aws.signers[REGION], impostor.signers[REGION]
    der = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(document)
        .add_signer(bad.certificate, bad.key, hashes.SHA256())
        .add_signer(good.certificate, good.key, hashes.SHA256())
        .sign(Encoding.DER, [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.NoCerts])
    )
    assert refused(document, base64.b64encode(der).decode(), trust).code == "malformed"


# --- malformed input


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "not base64 at all!",
        "QUJD=",  # bad padding
        "QUJD\x00",
        "w6k=\u00e9",
    ],
)
def test_garbage_base64(trust: TrustStore, signature: str) -> None:
    assert refused(make_document(INSTANCE), signature, trust).code == "malformed"


def test_not_pkcs7(aws: FakeAWSSigner, trust: TrustStore) -> None:
    certificate_der = aws.signers[REGION].certificate.public_bytes(Encoding.DER)
    for blob in [certificate_der, b"hello", b"\x30\x03\x02\x01\x01"]:
        error = refused(make_document(INSTANCE), base64.b64encode(blob).decode(), trust)
        assert error.code == "malformed"


REQUIRED = [
    "accountId",
    "architecture",
    "availabilityZone",
    "imageId",
    "instanceId",
    "instanceType",
    "pendingTime",
    "privateIp",
    "region",
]


@pytest.mark.parametrize("missing", REQUIRED)
def test_missing_fields(aws: FakeAWSSigner, trust: TrustStore, missing: str) -> None:
    fields = document_fields()
    del fields[missing]
    document = render_document(fields)
    error = refused(document, aws.sign(document, region=REGION), trust)
    assert error.code == "malformed"
    assert missing in error.message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("accountId", 123456789012),
        ("accountId", "12345678901"),
        ("accountId", None),
        ("instanceId", ["i-0123456789abcdef0"]),
        ("instanceId", "i-0123"),
        ("instanceId", "i-0123456789ABCDEF0"),
        ("region", {"name": REGION}),
        ("region", "eu-west-1\n"),
        ("region", "../etc"),
        ("availabilityZone", "us-east-1a"),
        ("privateIp", "10.20.1"),
        ("privateIp", 167903492),
        ("pendingTime", 1795000000),
        ("pendingTime", "yesterday"),
        ("pendingTime", "2026-11-18T11:06:40"),
        ("imageId", "ami-xyz"),
        ("instanceType", True),
        ("architecture", "x86 64"),
    ],
)
def test_wrong_types_and_shapes(aws: FakeAWSSigner, trust: TrustStore, name: str, value: object) -> None:
    document = render_document(document_fields(**{name: value}))
    error = refused(document, aws.sign(document, region=REGION), trust)
    assert error.code == "malformed"
    assert name in error.message


@pytest.mark.parametrize(
    "content",
    [b"[]", b'"text"', b"null", b"{", b"\xff\xfe{}", b'{"region": "a", "region": "b"}'],
)
def test_signed_content_that_is_not_a_document(aws: FakeAWSSigner, trust: TrustStore, content: bytes) -> None:
    error = refused(content, aws.sign(content, region=REGION), trust)
    assert error.code == "malformed"


def test_duplicate_keys_cannot_smuggle_a_second_region() -> None:
    fields = render_document(document_fields()).decode()
    doubled = fields.replace('"region" : "eu-west-1"', '"region" : "eu-west-1",\n  "region" : "us-east-1"')
    with pytest.raises(IdentityRefused) as info:
        parse_document(doubled.encode())
    assert info.value.code == "malformed"


# --- huge input


def test_huge_document_is_refused_before_parsing(trust: TrustStore) -> None:
    huge = b"{" + b" " * (MAX_DOCUMENT_BYTES + 1) + b"}"
    assert refused(huge, "AAAA", trust).code == "too-large"


def test_huge_signature_is_refused_before_parsing(trust: TrustStore) -> None:
    huge = "A" * (MAX_SIGNATURE_CHARS + 4)
    assert refused(make_document(INSTANCE), huge, trust).code == "too-large"


def test_deeply_nested_document_within_limits(aws: FakeAWSSigner, trust: TrustStore) -> None:
    depth = MAX_DOCUMENT_BYTES // 2 - 1
    document = b"[" * depth + b"]" * depth
    assert refused(document, aws.sign(document, region=REGION), trust).code == "malformed"


def test_largest_accepted_document(aws: FakeAWSSigner, trust: TrustStore) -> None:
    # Extra fields AWS may add do not matter, up to the size limit.
    base = render_document(document_fields(padding=""))
    fields = document_fields(padding="x" * (MAX_DOCUMENT_BYTES - len(base)))
    document = render_document(fields)
    assert len(document) == MAX_DOCUMENT_BYTES
    assert verify_identity(document, aws.sign(document), trust).instance_id == INSTANCE.instance_id


# --- the trust file


def write_pem(path: Path, region: str = REGION) -> Path:
    path.write_bytes(make_signer(region).certificate.public_bytes(Encoding.PEM))
    return path


def test_trust_file_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    write_pem(tmp_path / "certs" / "eu.pem")
    ini = tmp_path / "trust.ini"
    ini.write_text(f"# AWS\n[{REGION}]\ncertificate = certs/eu.pem\n")
    assert TrustStore.from_file(ini).regions == {REGION}


def ec_certificate_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(Encoding.PEM)


@pytest.mark.parametrize(
    ("ini", "files", "expected"),
    [
        ("[eu-west-1]\ncertificate = missing.pem\n", {}, "[eu-west-1]: cannot read"),
        ("[eu-west-1]\ncertificate = bad.pem\n", {"bad.pem": b"not a pem"}, "is not a PEM certificate"),
        (
            "[eu-west-1]\ncertificate = cut.pem\n",
            {"cut.pem": b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"},
            "is not a PEM certificate",
        ),
        ("[eu-west-1]\ncertificate = ec.pem\n", {"ec.pem": "ec"}, "does not hold an RSA key"),
        ("[eu-west-1]\n", {}, "no 'certificate = <path to PEM>'"),
        ("[eu-west-1]\ncertificate = good.pem\npem = x\n", {"good.pem": "rsa"}, "unknown keys pem"),
        ("[not a region]\ncertificate = good.pem\n", {"good.pem": "rsa"}, "not a region name"),
        ("# nothing\n", {}, "no regions configured"),
        ("certificate = x\n", {}, "cannot read trust file"),
        ("[eu-west-1]\n[eu-west-1]\n", {}, "cannot read trust file"),
    ],
)
def test_trust_file_errors(tmp_path: Path, ini: str, files: dict[str, object], expected: str) -> None:
    for name, content in files.items():
        if content == "ec":
            (tmp_path / name).write_bytes(ec_certificate_pem())
        elif content == "rsa":
            write_pem(tmp_path / name)
        else:
            assert isinstance(content, bytes)
            (tmp_path / name).write_bytes(content)
    path = tmp_path / "trust.ini"
    path.write_text(ini)
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        TrustStore.from_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message


def test_missing_trust_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read trust file") as info:
        TrustStore.from_file(tmp_path / "nope.ini")
    assert str(tmp_path / "nope.ini") in str(info.value)


# --- anything at all is refused cleanly


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=4096), document=st.binary(max_size=1024))
def test_arbitrary_bytes_are_only_ever_refused(trust: TrustStore, blob: bytes, document: bytes) -> None:
    with pytest.raises(IdentityRefused):
        verify_identity(document, base64.b64encode(blob).decode(), trust)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_corrupted_signatures_are_refused_or_prove_the_same(
    aws: FakeAWSSigner, trust: TrustStore, data: st.DataObject
) -> None:
    # Bytes outside what AWS signed (the signer's name, say) may change without effect;
    # nothing may change what is proven.
    document, signature = aws.identity_for(INSTANCE)
    der = bytearray(base64.b64decode("".join(signature.split())))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(der) - 1))
        der[at] = data.draw(st.integers(0, 255))
    try:
        identity = verify_identity(document, base64.b64encode(bytes(der)).decode(), trust)
    except IdentityRefused:
        return
    assert identity == verify_identity(document, signature, trust)
