"""
The enrollment server as the instance reaches it: its CA bundle fetched unverified and trusted
only through the pinned root's fingerprint, then the enrollment posted over TLS verified against
that root alone.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from puppetha.instance.failures import (
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EnrollError,
    Refused,
    Unavailable,
    Untrusted,
)
from puppetha.instance.options import ServerAddress
from puppetha.instance.transport import describe, read_limited
from puppetha.pki.certs import fingerprint


def pinned_root(bundle: bytes, pin: str) -> x509.Certificate:
    """The self-signed certificate of ``bundle`` whose fingerprint is ``pin``; :class:`Untrusted` if none."""
    try:
        certificates = x509.load_pem_x509_certificates(bundle)
    except ValueError:
        raise Untrusted("the server's CA bundle (GET /v1/ca) holds no readable certificate") from None
    for certificate in certificates:
        if fingerprint(certificate) == pin and _self_signed(certificate):
            return certificate
    raise Untrusted(f"the server's CA bundle has no root CA with fingerprint {pin}; refusing to trust it")


def _self_signed(certificate: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def exit_code_for_status(status: int) -> int:
    """What a non-200 answer means for whoever runs us (retry on 3, give up on 2)."""
    if 400 <= status < 500:
        return EXIT_REFUSED
    return EXIT_UNAVAILABLE


def refusal_line(status: int, body: bytes) -> str:
    """One line from a refusal: the server's ``error: message``, or its status."""
    try:
        answer = json.loads(body)
        text = f"{answer['error']}: {answer['message']}"
    except (ValueError, KeyError, TypeError):
        text = f"HTTP {status}"
    # Never let a server paint the terminal or span lines.
    return "".join(c if c.isprintable() else " " for c in text)[:500]


#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = (62, 64)


class EnrollmentServer:
    """The enrollment API at one address, trusted only through the pinned root."""

    def __init__(self, address: ServerAddress, timeout: float) -> None:
        self.address = address
        self.timeout = timeout

    def _exchange(
        self,
        context: ssl.SSLContext,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        connection = http.client.HTTPSConnection(
            self.address.host, self.address.port, timeout=self.timeout, context=context
        )
        try:
            connection.request(method, path, body=body, headers=dict(headers or {}))
            response = connection.getresponse()
            return response.status, read_limited(response)
        except ssl.SSLCertVerificationError as e:
            hint = ""
            if e.verify_code in _NAME_MISMATCH:
                # The usual cause is the server's configuration, not an attack: say where to look.
                hint = (f"; its certificate does not name {self.address.host}: the server's "
                        "[enroll] server_names must list it")
            raise Untrusted(
                f"the server at {self.address} is not verified by the pinned root CA ({e.verify_message})"
                + hint
            ) from None
        except (OSError, http.client.HTTPException) as e:
            raise Unavailable(
                f"cannot reach the enrollment server at {self.address} ({describe(e)})"
            ) from None
        finally:
            connection.close()

    def ca_bundle(self) -> bytes:
        """``GET /v1/ca`` without verification: its content is trusted only by the pin."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        status, body = self._exchange(context, "GET", "/v1/ca")
        if status != 200:
            raise _refusal("GET /v1/ca", status, body)
        return body

    def enroll(self, root: x509.Certificate, request: Mapping[str, str]) -> Mapping[str, Any]:
        """``POST /v1/enroll``, verifying the server (and its name) against ``root`` alone."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(cadata=root.public_bytes(serialization.Encoding.PEM).decode("ascii"))
        status, body = self._exchange(
            context,
            "POST",
            "/v1/enroll",
            json.dumps(request).encode("utf-8"),
            {"Content-Type": "application/json", "Accept": "application/json"},
        )
        if status != 200:
            raise _refusal("enrollment", status, body)
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise Untrusted("the server's answer to the enrollment is not a JSON object")
        return answer


def _refusal(what: str, status: int, body: bytes) -> EnrollError:
    line = f"{what} refused: {refusal_line(status, body)}"
    return Refused(line) if exit_code_for_status(status) == EXIT_REFUSED else Unavailable(line)
