"""
AWS's own certificates, shipped with puppetha: genuine AWS-signed identity documents verify with
them and nothing configured, each only with its own region's certificate; the older DSA and
RSA-1024 signature forms are refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from puppetha.aws.identity import IdentityRefused, TrustStore, verify_identity
from puppetha.aws.shipped import (
    SHIPPED_TRUST_FILE,
    certificates_in,
    compare,
    sha256,
    shipped_trust,
)
from puppetha.config import config_from_string

DATA = Path(__file__).parent / "data"
SAMPLES = DATA / "aws-samples"
#: Samples that carry an rsa2048 signature, and the region each was signed in.
RSA2048_SAMPLES = sorted(p.parent.name for p in SAMPLES.glob("*/rsa2048"))


def sample(name: str, kind: str) -> tuple[bytes, str]:
    return (SAMPLES / name / "document.json").read_bytes(), (SAMPLES / name / kind).read_text()


def signer_algorithm(signature_b64: str) -> str:
    import base64

    from asn1crypto import cms

    info = cms.ContentInfo.load(base64.b64decode("".join(signature_b64.split())))
    return str(info["content"]["signer_infos"][0]["signature_algorithm"]["algorithm"].native)


def test_every_region_aws_publishes_is_shipped() -> None:
    trust = shipped_trust()
    assert len(trust.regions) == 39
    assert {"us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1", "eusc-de-east-1"} <= trust.regions
    # One certificate per region, none shared.
    assert len({sha256(c) for c in trust.certificates.values()}) == 39


def test_the_samples_cover_both_signature_forms() -> None:
    forms = {signer_algorithm(sample(name, "rsa2048")[1]) for name in RSA2048_SAMPLES}
    # rsaEncryption before late 2021; sha256WithRSAEncryption (with algorithm protection) since.
    assert forms == {"rsassa_pkcs1v15", "sha256_rsa"}
    assert len(RSA2048_SAMPLES) == 5


@pytest.mark.parametrize("name", RSA2048_SAMPLES)
def test_a_genuine_document_verifies_with_nothing_configured(name: str) -> None:
    document, signature = sample(name, "rsa2048")
    identity = verify_identity(document, signature, shipped_trust())
    assert identity.region == json.loads(document)["region"]
    assert identity.instance_id == json.loads(document)["instanceId"]


@pytest.mark.parametrize("name", RSA2048_SAMPLES)
def test_a_genuine_document_verifies_only_with_its_own_regions_certificate(name: str) -> None:
    document, signature = sample(name, "rsa2048")
    region = json.loads(document)["region"]
    shipped = shipped_trust().certificates
    outcomes = {}
    for other, certificate in shipped.items():
        # Every certificate posing as the document's region: only the right one verifies.
        trust = TrustStore.from_certificates({region: certificate})
        try:
            verify_identity(document, signature, trust)
            outcomes[other] = "verified"
        except IdentityRefused as e:
            outcomes[other] = e.code
    assert {r for r, outcome in outcomes.items() if outcome == "verified"} == {region}
    assert set(outcomes.values()) == {"verified", "bad-signature"}


@pytest.mark.parametrize("name", RSA2048_SAMPLES)
def test_a_changed_byte_of_a_genuine_document_is_refused(name: str) -> None:
    document, signature = sample(name, "rsa2048")
    forged = document.replace(b'"instanceId"', b'"instanceId" ', 1)
    with pytest.raises(IdentityRefused) as refused:
        verify_identity(forged, signature, shipped_trust())
    assert refused.value.code == "document-mismatch"


@pytest.mark.parametrize("name", sorted(p.parent.name for p in SAMPLES.glob("*/pkcs7")))
def test_the_dsa_pkcs7_form_is_refused(name: str) -> None:
    # A genuine AWS signature, but DSA with SHA-1: never trusted.
    document, signature = sample(name, "pkcs7")
    with pytest.raises(IdentityRefused) as refused:
        verify_identity(document, signature, shipped_trust())
    assert refused.value.code == "bad-signature"
    assert "sha1" in refused.value.message


@pytest.mark.parametrize("name", sorted(p.parent.name for p in SAMPLES.glob("*/signature")))
def test_the_bare_rsa1024_signature_form_is_refused(name: str) -> None:
    document, signature = sample(name, "signature")
    with pytest.raises(IdentityRefused) as refused:
        verify_identity(document, signature, shipped_trust())
    assert refused.value.code == "malformed"


@pytest.mark.parametrize("name", ["dsa-default.pem", "rsa-us-east-1.pem"])
def test_the_older_forms_certificates_cannot_be_trusted(name: str) -> None:
    certificate = x509.load_pem_x509_certificate((DATA / "aws-certs-other" / name).read_bytes())
    with pytest.raises(ValueError, match=r"RSA key|1024-bit key"):
        TrustStore.from_certificates({"us-east-1": certificate})


def test_the_daemon_trusts_the_shipped_file_when_identity_certs_is_unset() -> None:
    config = config_from_string("", "test.conf")
    assert config[("aws", "identity_certs")] == ""
    assert SHIPPED_TRUST_FILE.is_file()
    # Deny by default holds: no account may enroll until one is named.
    assert not config[("aws", "accounts")]


def page_with(certificates: list[x509.Certificate]) -> bytes:
    # A saved HTML page wraps each PEM line in markup.
    blocks = []
    for certificate in certificates:
        pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
        blocks.append("<pre class='programlisting'><code>" + pem.replace("\n", "<br/>\n") + "</code></pre>")
    return ("<html><body>" + "\n".join(blocks) + "</body></html>").encode()


def test_check_finds_every_shipped_certificate_on_a_saved_page() -> None:
    trust = shipped_trust()
    page = page_with(list(trust.certificates.values()))
    assert compare(trust, certificates_in(page)) == ([], [])


def test_check_reports_a_region_missing_and_a_certificate_not_shipped(tmp_path: Path) -> None:
    trust = shipped_trust()
    published = [c for region, c in trust.certificates.items() if region != "eu-west-1"]
    stranger = x509.load_pem_x509_certificate(
        (DATA / "aws-certs-other" / "rsa-default-2014-expired-2024.pem").read_bytes())
    page = tmp_path / "regions-certs.html"
    page.write_bytes(page_with([*published, stranger]))
    missing, new = compare(trust, certificates_in(page.read_bytes()))
    assert missing == ["eu-west-1"]
    assert new == []  # an RSA-1024 certificate on the page is not a candidate for the trust file

    result = subprocess.run([sys.executable, "-m", "puppetha.aws.shipped", "check", str(page)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "shipped but not on the page: eu-west-1" in result.stdout


def test_check_refuses_a_page_without_certificates(tmp_path: Path) -> None:
    page = tmp_path / "empty.html"
    page.write_text("<html></html>")
    result = subprocess.run([sys.executable, "-m", "puppetha.aws.shipped", "check", str(page)],
                            capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.strip().endswith("no certificates found in the page")


def test_a_listing_whose_reader_left_ends_without_a_traceback() -> None:
    # `list | head -0`: the reader has closed the pipe before the listing is written.
    lister = subprocess.Popen([sys.executable, "-m", "puppetha.aws.shipped", "list"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert lister.stdout is not None
    assert lister.stderr is not None
    lister.stdout.close()
    errors = lister.stderr.read()
    assert lister.wait(timeout=30) == 1
    assert errors == b""
