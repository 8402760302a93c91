"""
The pure certificate and CRL functions, checked by the tools that will read their output:
``openssl verify -crl_check_all`` for chains and revocation, and Puppet's own Ruby for the
trusted-fact extensions.
"""

from __future__ import annotations

import hashlib
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from puppetha.pki import bundles
from puppetha.pki.certs import (
    BACKDATE,
    PP_INSTANCE_ID,
    Usage,
    create_intermediate_ca,
    create_root_ca,
    fingerprint,
    issue_leaf,
    new_serial,
    puppet_extension,
)
from puppetha.pki.crl import Revocation, build_crl, crl_number
from puppetha.pki.keys import KeyType, PrivateKey
from tests.test_pki_csr import CERTNAME, make_csr

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
YEAR = timedelta(days=365)
DAY = timedelta(days=1)
PEM = serialization.Encoding.PEM


class Hierarchy:
    """Root -> master intermediate -> leaves, all of one key type, signed at NOW."""

    def __init__(self, key_type: KeyType) -> None:
        self.key_type = key_type
        self.root_key = key_type.generate()
        self.root = create_root_ca(self.root_key, "Puppet Root CA: test", NOW, 10 * YEAR)
        self.ca_key = key_type.generate()
        self.ca = create_intermediate_ca(
            self.ca_key.public_key(),
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Puppet CA"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "master1.internal"),
                ]
            ),
            issuer_cert=self.root,
            issuer_key=self.root_key,
            now=NOW,
            lifetime=5 * YEAR,
        )
        self.leaf_key: PrivateKey = key_type.generate()

    def leaf(self, usage: Usage = Usage.BOTH, **kwargs: object) -> x509.Certificate:
        csr = x509.load_pem_x509_csr(make_csr(key=self.leaf_key))
        arguments: dict[str, object] = {
            "common_name": CERTNAME,
            "sans": ["puppet", "10.0.1.23"],
            "usage": usage,
            "issuer_cert": self.ca,
            "issuer_key": self.ca_key,
            "now": NOW,
            "lifetime": YEAR,
            "extensions": [puppet_extension(PP_INSTANCE_ID, "i-0123456789abcdef0")],
        }
        arguments.update(kwargs)
        return issue_leaf(csr, **arguments)  # type: ignore[arg-type]

    def crls(
        self, revoked: list[Revocation] | None = None, number: int = 1
    ) -> list[x509.CertificateRevocationList]:
        return [
            build_crl(self.root, self.root_key, [], number=1, now=NOW, lifetime=7 * DAY),
            build_crl(self.ca, self.ca_key, revoked or [], number=number, now=NOW, lifetime=7 * DAY),
        ]


@pytest.fixture(scope="module", params=[KeyType.EC_P256, KeyType.RSA_2048], ids=lambda t: t.value)
def hierarchy(request: pytest.FixtureRequest) -> Hierarchy:
    return Hierarchy(request.param)


def openssl_verify(
    tmp_path: Path,
    hierarchy: Hierarchy,
    leaf: x509.Certificate,
    crls: list[x509.CertificateRevocationList],
    purpose: str,
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "root.pem").write_bytes(hierarchy.root.public_bytes(PEM))
    (tmp_path / "untrusted.pem").write_bytes(hierarchy.ca.public_bytes(PEM))
    (tmp_path / "crls.pem").write_bytes(bundles.crls_pem(crls))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(PEM))
    at = int((NOW + timedelta(hours=1)).timestamp())
    return subprocess.run(
        [
            "openssl", "verify", "-crl_check_all", "-x509_strict", "-purpose", purpose,
            "-attime", str(at),
            "-CAfile", str(tmp_path / "root.pem"),
            "-untrusted", str(tmp_path / "untrusted.pem"),
            "-CRLfile", str(tmp_path / "crls.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip


@pytest.mark.parametrize("purpose", ["sslserver", "sslclient"])
def test_chain_verifies_with_openssl(tmp_path, hierarchy, purpose):
    result = openssl_verify(tmp_path, hierarchy, hierarchy.leaf(), hierarchy.crls(), purpose)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


def test_usage_is_enforced_by_openssl(tmp_path, hierarchy):
    client_only = hierarchy.leaf(Usage.CLIENT)
    assert openssl_verify(tmp_path, hierarchy, client_only, hierarchy.crls(), "sslclient").returncode == 0
    refused = openssl_verify(tmp_path, hierarchy, client_only, hierarchy.crls(), "sslserver")
    assert refused.returncode != 0
    assert "unsuitable certificate purpose" in refused.stdout + refused.stderr


def test_revoked_leaf_is_listed_and_refused(tmp_path, hierarchy):
    leaf = hierarchy.leaf()
    other = hierarchy.leaf()
    crls = hierarchy.crls([Revocation(leaf.serial_number, NOW, "keyCompromise")], number=2)
    entry = crls[1].get_revoked_certificate_by_serial_number(leaf.serial_number)
    assert entry is not None
    assert (
        entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        == x509.ReasonFlags.key_compromise
    )
    assert crls[1].get_revoked_certificate_by_serial_number(other.serial_number) is None
    assert crl_number(crls[1]) == 2

    refused = openssl_verify(tmp_path, hierarchy, leaf, crls, "sslclient")
    assert refused.returncode != 0
    assert "certificate revoked" in refused.stdout + refused.stderr
    assert openssl_verify(tmp_path, hierarchy, other, crls, "sslclient").returncode == 0


def test_missing_root_crl_is_refused_by_openssl(tmp_path, hierarchy):
    """Why the CRL bundle must hold the root's CRL too."""
    result = openssl_verify(tmp_path, hierarchy, hierarchy.leaf(), hierarchy.crls()[1:], "sslclient")
    assert result.returncode != 0
    assert "unable to get certificate CRL" in result.stdout + result.stderr


def test_ca_extensions(hierarchy):
    root, ca = hierarchy.root, hierarchy.ca
    assert root.issuer == root.subject
    basic = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca
    assert basic.value.path_length is None
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca
    assert basic.value.path_length == 0
    for cert in (root, ca):
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert usage.critical
        assert usage.value.key_cert_sign
        assert usage.value.crl_sign
        assert not usage.value.digital_signature
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    ca_aki = ca.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert ca_aki.key_identifier == root_ski.digest
    ca.verify_directly_issued_by(root)
    bundles.check_chain([ca, root])


@pytest.mark.parametrize(
    ("usage", "ekus"),
    [
        (Usage.SERVER, [ExtendedKeyUsageOID.SERVER_AUTH]),
        (Usage.CLIENT, [ExtendedKeyUsageOID.CLIENT_AUTH]),
        (Usage.BOTH, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
    ],
)
def test_leaf_extensions(hierarchy, usage, ekus):
    leaf = hierarchy.leaf(usage)
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == ekus
    key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert key_usage.critical
    assert key_usage.value.digital_signature
    assert key_usage.value.key_encipherment is hierarchy.key_type.is_rsa
    assert not key_usage.value.key_cert_sign
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [CERTNAME, "puppet"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.1.23"]
    assert leaf.subject.rfc4514_string() == f"CN={CERTNAME}"
    assert leaf.issuer == hierarchy.ca.subject
    assert leaf.not_valid_before_utc == NOW - BACKDATE
    assert leaf.not_valid_after_utc == NOW + YEAR
    leaf.verify_directly_issued_by(hierarchy.ca)


def test_only_the_public_key_comes_from_the_csr(hierarchy):
    """A CSR asking for another name, SANs and CA rights still yields exactly what the caller said."""
    greedy = make_csr(
        "someone-else",
        key=hierarchy.leaf_key,
        sans=[x509.DNSName("*.example.com")],
        extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)],
    )
    leaf = issue_leaf(
        x509.load_pem_x509_csr(greedy),
        common_name=CERTNAME,
        sans=[],
        usage=Usage.CLIENT,
        issuer_cert=hierarchy.ca,
        issuer_key=hierarchy.ca_key,
        now=NOW,
        lifetime=YEAR,
    )
    assert leaf.subject.rfc4514_string() == f"CN={CERTNAME}"
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == [CERTNAME]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.public_key() == hierarchy.leaf_key.public_key()


def test_leaf_never_outlives_its_ca(hierarchy):
    leaf = hierarchy.leaf(lifetime=20 * YEAR)
    assert leaf.not_valid_after_utc == hierarchy.ca.not_valid_after_utc
    with pytest.raises(ValueError, match="expired"):
        hierarchy.leaf(now=hierarchy.ca.not_valid_after_utc)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"common_name": "Upper.Case"}, "lowercase"),
        ({"sans": ["*.example.com"]}, "DNS name"),
        (
            {"extensions": [x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00")]},
            "Puppet",
        ),
    ],
)
def test_issue_refuses_bad_arguments(hierarchy, kwargs, message):
    with pytest.raises(ValueError, match=message):
        hierarchy.leaf(**kwargs)


def test_pp_instance_id_is_a_der_utf8string(hierarchy):
    value = hierarchy.leaf().extensions.get_extension_for_oid(PP_INSTANCE_ID).value
    assert isinstance(value, x509.UnrecognizedExtension)
    assert value.value == b"\x0c\x13i-0123456789abcdef0"
    assert core.UTF8String.load(value.value).native == "i-0123456789abcdef0"
    with pytest.raises(ValueError, match="Puppet's arc"):
        puppet_extension("1.2.3.4", "x")


def test_puppet_reads_the_trusted_facts(tmp_path, hierarchy):
    """Puppet's own code decodes our extensions into $trusted['extensions']."""
    path = tmp_path / "leaf.pem"
    path.write_bytes(hierarchy.leaf().public_bytes(PEM))
    script = (
        'require "puppet"; require "puppet/ssl"; Puppet::SSL::Oids.register_puppet_oids; '
        "c = Puppet::SSL::Certificate.from_s(File.read(ARGV[0])); "
        'c.custom_extensions.each { |e| puts "#{e["oid"]}=#{e["value"]}" }'
    )
    result = subprocess.run(["ruby", "-e", script, str(path)], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["pp_instance_id=i-0123456789abcdef0"]


def test_serials_are_positive_and_fit_16_bytes():
    serials = [new_serial() for _ in range(2000)]
    assert all(0 < s < 1 << 127 for s in serials)
    assert len(set(serials)) == len(serials)
    # The DER INTEGER content is at most 16 bytes: no leading zero byte is ever needed.
    assert all(len(s.to_bytes((s.bit_length() + 8) // 8, "big", signed=True)) <= 16 for s in serials)
    # Random, not small: some serial uses the top bit available.
    assert any(s.bit_length() == 127 for s in serials)


def test_fingerprint(hierarchy):
    digest = hashlib.sha256(hierarchy.root.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert fingerprint(hierarchy.root) == f"sha256:{digest}"
    assert fingerprint(hierarchy.root) == fingerprint(hierarchy.root).lower()
    assert ":" not in fingerprint(hierarchy.root).removeprefix("sha256:")


def test_crl_contents(hierarchy):
    revoked = [
        Revocation(5, NOW - DAY, "unspecified"),
        Revocation(3, NOW - 2 * DAY, "superseded"),
    ]
    crl = build_crl(hierarchy.ca, hierarchy.ca_key, revoked, number=7, now=NOW, lifetime=7 * DAY)
    assert crl.is_signature_valid(hierarchy.ca_key.public_key())
    assert crl.issuer == hierarchy.ca.subject
    assert crl.last_update_utc == NOW - BACKDATE
    assert crl.next_update_utc == NOW + 7 * DAY
    assert crl_number(crl) == 7
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = hierarchy.ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert sorted(r.serial_number for r in crl) == [3, 5]
    unspecified = crl.get_revoked_certificate_by_serial_number(5)
    assert unspecified is not None
    assert len(unspecified.extensions) == 0  # RFC 5280: no reasonCode rather than "unspecified"
    with pytest.raises(ValueError, match="unknown revocation reason"):
        build_crl(hierarchy.ca, hierarchy.ca_key, [(1, NOW, "bored")], number=8, now=NOW, lifetime=DAY)
    with pytest.raises(ValueError, match="start at 1"):
        build_crl(hierarchy.ca, hierarchy.ca_key, [], number=0, now=NOW, lifetime=DAY)


def test_chain_helpers(hierarchy):
    assert bundles.chain_names("m1", {"m1": "root", "root": "root"}) == ["m1", "root"]
    with pytest.raises(ValueError, match="loops"):
        bundles.chain_names("a", {"a": "b", "b": "a"})
    with pytest.raises(ValueError, match="not issued by"):
        bundles.check_chain([hierarchy.root, hierarchy.ca])
    pem = bundles.certificates_pem([hierarchy.ca, hierarchy.root])
    assert [c.subject for c in x509.load_pem_x509_certificates(pem)] == [
        hierarchy.ca.subject,
        hierarchy.root.subject,
    ]


@pytest.mark.parametrize("key_type", list(KeyType), ids=lambda t: t.value)
def test_key_types(key_type):
    assert KeyType(key_type.value) is key_type
    key = key_type.generate()
    assert KeyType.of(key) is key_type
    assert KeyType.of(key.public_key()) is key_type
