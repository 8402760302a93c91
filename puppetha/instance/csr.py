"""
The request the instance signs with its key, which never leaves it: the certname and the names a
master or lb node asks for.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from puppetha.instance.metadata import InstanceIdentity
from puppetha.instance.options import Options, is_ip
from puppetha.pki.keys import PrivateKey
from puppetha.pki.names import parse_san


def requested_alt_names(options: Options, identity: InstanceIdentity) -> tuple[str, ...]:
    """The SANs to ask for: none for agents; the private DNS name and front host otherwise."""
    if options.role == "agent":
        return ()
    if options.dns_alt_names is not None:
        return options.dns_alt_names
    names = [identity.private_dns] if identity.private_dns else []
    if not is_ip(options.server.host):
        names.append(options.server.host)
    return tuple(dict.fromkeys(n.lower() for n in names))


def make_csr(key: PrivateKey, certname: str, alt_names: Sequence[str]) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, certname)])
    )
    if alt_names:
        names = [parse_san(n) for n in (certname, *alt_names)]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256())
