"""
``puppetha-enroll``: run once on a new instance to get its Puppet certificate.

It reads the instance identity document and its signature from the metadata service
(:mod:`~puppetha.instance.metadata`), makes a private key and a CSR here, the key never leaving
the instance (:mod:`~puppetha.instance.csr`), pins the enrollment server's root CA by fingerprint
and posts the enrollment (:mod:`~puppetha.instance.server`), checks what comes back
(:mod:`~puppetha.instance.answer`), and puts a ready ssldir and puppet.conf in place all at once
(:mod:`~puppetha.instance.install`).  Synchronous, on the stdlib and cryptography, without Twisted
or anything of the server's: it runs once on a fresh host.  See docs/client.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import NoReturn, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from puppetha.instance.answer import Enrollment, check_enrollment
from puppetha.instance.csr import make_csr, requested_alt_names
from puppetha.instance.failures import EXIT_OK, EnrollError, LocalError, Unavailable, WriteFailed
from puppetha.instance.install import install
from puppetha.instance.metadata import MetadataService, read_identity
from puppetha.instance.options import Options, parse_options
from puppetha.instance.server import EnrollmentServer, pinned_root
from puppetha.instance.ssldir import AlreadyEnrolled, check_not_enrolled
from puppetha.pki.keys import PrivateKey
from puppetha.pki.names import certname_problem, parse_san, san_text

#: Pauses between tries with ``--wait``: doubling from the first to the longest.
FIRST_PAUSE = 2.0
LONGEST_PAUSE = 30.0


def enroll(
    options: Options,
    *,
    imds: MetadataService,
    server: EnrollmentServer,
    now: Callable[[], datetime],
    key: PrivateKey | None = None,
) -> Enrollment:
    """
    One attempt.  ``key``: the private key to ask with; a retry passes the same one, so the
    server resumes its claim or answers again with the certificate it issued for that key.
    """
    identity = read_identity(imds, with_private_dns=options.role != "agent")
    certname = options.certname or identity.instance_id
    if (problem := certname_problem(certname)) is not None:
        raise LocalError(f"{problem}; name one with --certname")
    # Before asking: the server grants one enrollment per instance and role.
    if not options.force:
        try:
            check_not_enrolled(options.ssldir, certname)
        except AlreadyEnrolled as e:
            raise LocalError(str(e)) from None
    try:
        alt_names = requested_alt_names(options, identity)
        for name in alt_names:
            parse_san(name)
    except ValueError as e:
        raise LocalError(f"cannot ask for that name: {e}; name others with --dns-alt-names") from None
    root = pinned_root(server.ca_bundle(), options.ca_fingerprint)
    key = key or options.key_type.generate()
    csr = make_csr(key, certname, alt_names)
    answer = server.enroll(
        root,
        {
            "role": options.role,
            "document": _document_text(identity.document),
            "signature": identity.signature,
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        },
    )
    enrollment = check_enrollment(answer, role=options.role, certname=certname, key=key, root=root, now=now())
    install(options, enrollment, key, listen_address=identity.private_ip)
    return enrollment


def _document_text(document: bytes) -> str:
    try:
        return document.decode("utf-8")
    except UnicodeDecodeError:
        raise LocalError("the identity document is not UTF-8") from None


def summary(options: Options, enrollment: Enrollment) -> str:
    test = enrollment.test_server
    first_run = f"puppet agent --test --server {test.host} --serverport {test.port}"
    alt = ", ".join(
        san_text(n) for n in _sans(enrollment.certificate) if san_text(n) != f"DNS:{enrollment.certname}"
    )
    return (
        f"enrolled {enrollment.certname} as {enrollment.role}"
        + (f" ({alt})" if alt else "")
        + f": ssldir {options.ssldir}, puppet.conf {options.puppet_conf} [{options.section}], "
        + (f"puppetserver {options.puppetserver_dir}, " if enrollment.role == "master" else "")
        + f"server {enrollment.server}; first run: {first_run}"
    )


def _sans(certificate: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def run(
    argv: Sequence[str],
    *,
    stdout: TextIO,
    stderr: TextIO,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> int:
    """The command, without touching the process: returns the exit code."""
    try:
        options = parse_options(argv)
        deadline = monotonic() + options.wait
        pause = FIRST_PAUSE
        # One key for every try: a lost answer or an enrollment still in progress on the server
        # (503 in-progress) is picked up again with it, never refused as another enrollment.
        key = options.key_type.generate()
        while True:
            try:
                enrollment = enroll(
                    options,
                    imds=MetadataService(options.imds_url, options.timeout),
                    server=EnrollmentServer(options.server, options.timeout),
                    now=now,
                    key=key,
                )
                break
            except (Unavailable, WriteFailed) as e:
                # Only what may pass: a refusal or an untrusted server never gets better.
                if monotonic() + pause > deadline:
                    raise
                print(f"puppetha-enroll: {e.message}; trying again in {pause:.0f}s", file=stderr)
                sleep(pause)
                pause = min(pause * 2, LONGEST_PAUSE)
    except EnrollError as e:
        print(f"puppetha-enroll: {e.message}", file=stderr)
        return e.exit_code
    print(summary(options, enrollment), file=stdout)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> NoReturn:
    sys.exit(run(sys.argv[1:] if argv is None else argv, stdout=sys.stdout, stderr=sys.stderr))


if __name__ == "__main__":
    main()
