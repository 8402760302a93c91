"""The CSR policy: what is accepted, and every refusal with its code."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import tempfile
from collections.abc import Sequence

import pytest
from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from puppetha.pki.certs import PP_INSTANCE_ID
from puppetha.pki.csr import CSRPolicy, CSRRefused, check_csr
from puppetha.pki.keys import KeyType
from puppetha.pki.names import certname_problem, parse_san

CERTNAME = "ip-10-0-1-23.eu-west-1.compute.internal"

_KEYS: dict[str, object] = {}


def cached_key(kind: str) -> object:
    """Keys are slow to make (RSA): one per kind per test run."""
    if kind not in _KEYS:
        _KEYS[kind] = {
            "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
            "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
            "rsa-1024": lambda: rsa.generate_private_key(65537, 1024),  # noqa: S505 (refused below)
            "rsa-2048": lambda: rsa.generate_private_key(65537, 2048),
            "rsa-2560": lambda: rsa.generate_private_key(65537, 2560),
            "dsa-2048": lambda: dsa.generate_private_key(2048),
            "ed25519": ed25519.Ed25519PrivateKey.generate,
        }[kind]()
    return _KEYS[kind]


def make_csr(
    certname: str = CERTNAME,
    *,
    key: object | None = None,
    sans: Sequence[x509.GeneralName] = (),
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    subject: x509.Name | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    key = cached_key("ec-p256") if key is None else key
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, certname)])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    is_ed = isinstance(key, ed25519.Ed25519PrivateKey)
    csr = builder.sign(key, None if is_ed else (algorithm or hashes.SHA256()))  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM)


def utf8_extension(oid: str, value: str) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), core.UTF8String(value).dump())


def tamper(pem: bytes) -> bytes:
    """Change one byte of the signed subject (the certname) while keeping the PEM parseable."""
    csr = x509.load_pem_x509_csr(pem)
    der = csr.public_bytes(serialization.Encoding.DER)
    at = der.index(CERTNAME.encode())
    der = der[:at] + b"x" + der[at + 1 :]
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)


def openssl_sha1_csr() -> bytes:
    """cryptography no longer signs with SHA-1; openssl still does."""
    key = cached_key("rsa-2048")
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "key.pem")
        with open(path, "wb") as f:
            f.write(
                key.private_bytes(  # type: ignore[attr-defined]
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return subprocess.run(
            ["openssl", "req", "-new", "-sha1", "-key", path, "-subj", f"/CN={CERTNAME}"],
            check=True,
            capture_output=True,
        ).stdout


POLICY = CSRPolicy(
    certname=CERTNAME,
    allowed_sans=["DNS:puppet", "10.0.1.23"],
    key_types=[KeyType.EC_P256, KeyType.RSA_2048],
    expected_extensions={PP_INSTANCE_ID.dotted_string: "i-0123456789abcdef0"},
)


@pytest.mark.parametrize(
    ("name", "pem"),
    [
        ("plain EC", make_csr),
        ("plain RSA", lambda: make_csr(key=cached_key("rsa-2048"))),
        (
            "allowed SANs, certname among them",
            lambda: make_csr(
                sans=[
                    x509.DNSName(CERTNAME),
                    x509.DNSName("puppet"),
                    x509.IPAddress(ipaddress.ip_address("10.0.1.23")),
                ]
            ),
        ),
        ("CA:FALSE", lambda: make_csr(extensions=[(x509.BasicConstraints(False, None), True)])),
        (
            "Puppet trusted facts, pp_instance_id as expected",
            lambda: make_csr(
                extensions=[
                    (utf8_extension(PP_INSTANCE_ID.dotted_string, "i-0123456789abcdef0"), False),
                    (utf8_extension("1.3.6.1.4.1.34380.1.1.13", "webserver"), False),
                    (utf8_extension("1.3.6.1.4.1.34380.1.2.1", "anything"), False),
                ]
            ),
        ),
        ("SHA-384 signature", lambda: make_csr(algorithm=hashes.SHA384())),
    ],
)
def test_accepted(name, pem):
    csr = check_csr(pem(), POLICY)
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CERTNAME


@pytest.mark.parametrize(
    ("name", "pem", "code"),
    [
        ("not PEM", lambda: b"hello", "malformed"),
        (
            "PEM armour, garbage inside",
            lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "malformed",
        ),
        ("oversize", lambda: make_csr() + b"\n" * 20000, "malformed"),
        (
            "a certificate, not a CSR",
            lambda: make_csr().replace(b"CERTIFICATE REQUEST", b"CERTIFICATE"),
            "malformed",
        ),
        ("tampered bytes", lambda: tamper(make_csr()), "bad-signature"),
        ("SHA-1 signature (made by openssl)", openssl_sha1_csr, "bad-signature"),
        ("RSA 1024", lambda: make_csr(key=cached_key("rsa-1024")), "weak-key"),
        ("RSA 2560 (size not offered)", lambda: make_csr(key=cached_key("rsa-2560")), "key-type"),
        ("P-384", lambda: make_csr(key=cached_key("ec-p384")), "key-type"),
        ("DSA", lambda: make_csr(key=cached_key("dsa-2048")), "key-type"),
        ("Ed25519", lambda: make_csr(key=cached_key("ed25519")), "key-type"),
        ("wrong CN", lambda: make_csr(certname="ip-10-0-1-24.eu-west-1.compute.internal"), "subject"),
        ("CN differs in case", lambda: make_csr(certname=CERTNAME.upper()), "subject"),
        (
            "extra subject attribute",
            lambda: make_csr(
                subject=x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evil"),
                        x509.NameAttribute(NameOID.COMMON_NAME, CERTNAME),
                    ]
                )
            ),
            "subject",
        ),
        (
            "no CN",
            lambda: make_csr(subject=x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, CERTNAME)])),
            "subject",
        ),
        ("extra DNS SAN", lambda: make_csr(sans=[x509.DNSName("puppet.example.com")]), "san"),
        ("extra IP SAN", lambda: make_csr(sans=[x509.IPAddress(ipaddress.ip_address("10.0.1.24"))]), "san"),
        ("wildcard SAN", lambda: make_csr(sans=[x509.DNSName("*.compute.internal")]), "san"),
        ("email SAN", lambda: make_csr(sans=[x509.RFC822Name("root@example.com")]), "san"),
        ("CA:TRUE", lambda: make_csr(extensions=[(x509.BasicConstraints(True, None), True)]), "ca-request"),
        (
            "keyUsage request",
            lambda: make_csr(
                extensions=[
                    (
                        x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                        True,
                    )
                ]
            ),
            "extension",
        ),
        (
            "Puppet authorization arc",
            lambda: make_csr(extensions=[(utf8_extension("1.3.6.1.4.1.34380.1.3.1", "true"), False)]),
            "extension",
        ),
        (
            "another instance's pp_instance_id",
            lambda: make_csr(
                extensions=[(utf8_extension(PP_INSTANCE_ID.dotted_string, "i-0fffffffffffffff0"), False)]
            ),
            "extension",
        ),
        (
            "pp_instance_id not a UTF8String",
            lambda: make_csr(
                extensions=[
                    (
                        x509.UnrecognizedExtension(
                            PP_INSTANCE_ID, core.OctetString(b"i-0123456789abcdef0").dump()
                        ),
                        False,
                    )
                ]
            ),
            "extension",
        ),
    ],
)
def test_refused(name, pem, code):
    with pytest.raises(CSRRefused) as refused:
        check_csr(pem(), POLICY)
    assert refused.value.code == code
    assert refused.value.message


def test_key_types_default_to_every_offered_type():
    policy = CSRPolicy(certname=CERTNAME)
    check_csr(make_csr(key=cached_key("rsa-2048")), policy)
    with pytest.raises(CSRRefused) as refused:
        check_csr(
            make_csr(key=cached_key("rsa-2048")), CSRPolicy(certname=CERTNAME, key_types=[KeyType.EC_P256])
        )
    assert refused.value.code == "key-type"


@pytest.mark.parametrize(
    ("certname", "ok"),
    [
        ("agent01", True),
        ("ip-10-0-1-23.eu-west-1.compute.internal", True),
        ("web_01.example.com", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("", False),
        ("Agent01", False),
        (".agent01", False),
        ("agent01.", False),
        ("agent..01", False),
        ("agent 01", False),
        ("agent/01", False),
        ("*.example.com", False),
        ("caf\u00e9", False),
        ("ca", False),
    ],
)
def test_certnames(certname, ok):
    assert (certname_problem(certname) is None) is ok


def test_policy_refuses_bad_certname():
    with pytest.raises(ValueError, match="lowercase"):
        CSRPolicy(certname="Agent01")


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("puppet", "DNS:puppet"),
        ("DNS:Puppet.Example.com", "DNS:puppet.example.com"),
        ("IP:10.0.0.1", "IP:10.0.0.1"),
        ("10.0.0.1", "IP:10.0.0.1"),
        ("::1", "IP:::1"),
        ("*.example.com", None),
        ("IP:puppet", None),
        ("a..b", None),
    ],
)
def test_parse_san(text, canonical):
    from puppetha.pki.names import san_text

    if canonical is None:
        with pytest.raises(ValueError, match="not"):
            parse_san(text)
    else:
        assert san_text(parse_san(text)) == canonical


PUPPET_CSR_SCRIPT = """
require "puppet"
require "puppet/ssl"
Puppet::SSL::Oids.register_puppet_oids
req = Puppet::SSL::CertificateRequest.new(ARGV[0])
req.generate(
  OpenSSL::PKey::RSA.new(2048),
  dns_alt_names: ARGV[1],
  extension_requests: {"pp_instance_id" => ARGV[2], "pp_role" => "web"},
)
puts req.to_s
"""


def puppet_csr(alt_names: str, instance_id: str) -> bytes:
    """A CSR made by Puppet's own code, as `puppet ssl submit_request` would send it."""
    return subprocess.run(
        ["ruby", "-e", PUPPET_CSR_SCRIPT, CERTNAME, alt_names, instance_id],
        capture_output=True,
        check=True,
    ).stdout


def test_csr_made_by_puppet():
    pem = puppet_csr("puppet,IP:10.0.1.23", "i-0123456789abcdef0")
    check_csr(pem, POLICY)
    with pytest.raises(CSRRefused) as refused:
        check_csr(puppet_csr("puppet,IP:10.0.1.99", "i-0123456789abcdef0"), POLICY)
    assert refused.value.code == "san"
    with pytest.raises(CSRRefused) as refused:
        check_csr(puppet_csr("puppet", "i-0fffffffffffffff0"), POLICY)
    assert refused.value.code == "extension"


def test_a_refused_name_cannot_forge_a_log_line() -> None:
    """The refusal's message reaches the daemon's log and the client's terminal as one line."""
    forged = "a\n2030-01-01T00:00:00+0000 [puppetha] enrolled i-0123456789abcdef0 as master\x1b[2K"
    with pytest.raises(CSRRefused) as refused:
        check_csr(make_csr(sans=[x509.DNSName(forged)]), CSRPolicy(CERTNAME))
    assert refused.value.code == "san"
    assert refused.value.message.isprintable()
