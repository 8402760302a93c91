"""
Certificates issued per second for each key type, beside the raw signing rate of the same CA
key in the same run: the ratio shows how much of issuing is the signature itself.

    .venv/bin/python bench/pki.py [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import cryptography
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from puppetha.pki.certs import PP_INSTANCE_ID, Usage, create_root_ca, issue_leaf, puppet_extension
from puppetha.pki.keys import KeyType, PrivateKey

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CERTNAME = "ip-10-0-1-23.eu-west-1.compute.internal"


#: Issuing and signing are measured in alternating slices, so load from other processes that
#: comes and goes during the run weighs on both alike.
ROUNDS = 8


def run_for(operation: Callable[[], object], seconds: float) -> tuple[int, float]:
    """Run ``operation`` for about ``seconds`` of this thread's CPU time: the count and that time."""
    count = 0
    start = time.thread_time()
    deadline = start + seconds
    while True:
        operation()
        count += 1
        now = time.thread_time()
        if now >= deadline:
            return count, now - start


def sign_32_bytes(key: PrivateKey) -> Callable[[], object]:
    data = os.urandom(32)
    if isinstance(key, rsa.RSAPrivateKey):
        return lambda: key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return lambda: key.sign(data, ec.ECDSA(hashes.SHA256()))


def measure(key_type: KeyType, seconds: float) -> tuple[float, float]:
    ca_key = key_type.generate()
    ca_cert = create_root_ca(ca_key, "bench CA", NOW, timedelta(days=3650))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CERTNAME)]))
        .sign(key_type.generate(), hashes.SHA256())
    )
    extensions = [puppet_extension(PP_INSTANCE_ID, "i-0123456789abcdef0")]

    def issue() -> object:
        return issue_leaf(
            csr,
            common_name=CERTNAME,
            sans=["10.0.1.23"],
            usage=Usage.CLIENT,
            issuer_cert=ca_cert,
            issuer_key=ca_key,
            now=NOW,
            lifetime=timedelta(days=365),
            extensions=extensions,
        )

    sign = sign_32_bytes(ca_key)
    issue()  # warm up
    sign()
    totals = {"issue": [0, 0.0], "sign": [0, 0.0]}
    for _ in range(ROUNDS):
        for name, operation in (("issue", issue), ("sign", sign)):
            count, spent = run_for(operation, seconds / 2 / ROUNDS)
            totals[name][0] += count
            totals[name][1] += spent
    return totals["issue"][0] / totals["issue"][1], totals["sign"][0] / totals["sign"][1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=4.0,
        help="CPU seconds per key type (default 4); wall time grows when the machine is busy",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    print(f"rerun: .venv/bin/python bench/pki.py --seconds {args.seconds:g}")
    print(
        f"python {platform.python_version()}, cryptography {cryptography.__version__}, "
        f"{os.cpu_count()} CPUs; one thread, rates per second of its CPU time, "
        f"{args.seconds:g} s per key type"
    )
    print(f"{'key type':<10} {'certs/s':>10} {'signs/s':>10} {'certs/signs':>12}")
    for key_type in KeyType:
        certs, signs = measure(key_type, args.seconds)
        print(f"{key_type.value:<10} {certs:>10.1f} {signs:>10.1f} {certs / signs:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
