"""
AWS's identity-signing certificates as shipped with puppetha, and the check an operator runs
against AWS's own page before trusting an update.

The shipped trust file names the RSA-2048 certificate of every region AWS publishes; it is used
when ``[aws] identity_certs`` is unset.  ``python -m puppetha.aws.shipped check PAGE`` compares
the shipped set with the certificates in a copy of AWS's page "AWS public certificates for
instance identity document signatures" (saved as HTML or Markdown), by SHA-256 of each
certificate.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from puppetha.aws.identity import TrustStore

SHIPPED_TRUST_FILE = Path(__file__).with_name("identity_certs") / "identity-certs.ini"

_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.DOTALL)


def shipped_trust() -> TrustStore:
    """Every region's certificate as shipped."""
    return TrustStore.from_file(SHIPPED_TRUST_FILE)


def sha256(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


def certificates_in(text: bytes) -> list[x509.Certificate]:
    """The certificates in a saved page: each PEM block, with HTML line markup stripped."""
    found = []
    for body in _PEM_BLOCK.findall(text):
        base64_text = re.sub(rb"<[^>]*>|&[a-z]+;|[^A-Za-z0-9+/=]", b"", body)
        pem = b"-----BEGIN CERTIFICATE-----\n" + base64_text + b"\n-----END CERTIFICATE-----\n"
        try:
            found.append(x509.load_pem_x509_certificate(pem))
        except ValueError:
            continue  # a block mangled by the page's markup cannot be compared; it is reported
    return found


def compare(trust: TrustStore, published: Iterable[x509.Certificate]) -> tuple[list[str], list[str]]:
    """
    (regions whose shipped certificate the page lacks, fingerprints on the page that puppetha
    does not ship).  The page also lists DSA and RSA-1024 certificates for the older signatures,
    which puppetha does not accept: only RSA-2048 ones count as new.
    """
    page = {sha256(c): c for c in published}
    shipped = {sha256(c): region for region, c in trust.certificates.items()}
    missing = sorted(region for fp, region in shipped.items() if fp not in page)
    new = sorted(fp for fp, c in page.items() if fp not in shipped and _is_rsa2048(c))
    return missing, new


def _is_rsa2048(certificate: x509.Certificate) -> bool:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = certificate.public_key()
    return isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    trust = shipped_trust()
    if args == ["list"]:
        for region in sorted(trust.regions):
            certificate = trust.certificates[region]
            print(f"{region:16} {certificate.serial_number:016X} "
                  f"{certificate.not_valid_after_utc:%Y-%m-%d} sha256:{sha256(certificate)}")
        return 0
    if len(args) != 2 or args[0] != "check":
        print("usage: python -m puppetha.aws.shipped list | check SAVED-AWS-PAGE", file=sys.stderr)
        return 2
    try:
        text = Path(args[1]).read_bytes()
    except OSError as e:
        print(f"puppetha: {args[1]}: {e.strerror}", file=sys.stderr)
        return 2
    published = certificates_in(text)
    if not published:
        print(f"puppetha: {args[1]}: no certificates found in the page", file=sys.stderr)
        return 2
    missing, new = compare(trust, published)
    for region in missing:
        print(f"shipped but not on the page: {region} "
              f"sha256:{sha256(trust.certificates[region])}")
    for fp in new:
        print(f"on the page but not shipped: sha256:{fp}")
    if missing or new:
        return 1
    print(f"all {len(trust.regions)} shipped certificates are on the page, and nothing is missing")
    return 0


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (`list | head`): the rest of the listing is not wanted, and Python's
        # own flush at exit would only fail again, with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)
