"""
The instance's identity from the metadata service (IMDSv2): the signed identity document, its
signature, and for masters and lb nodes the private DNS name.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping
from urllib.parse import urlsplit

from attrs import frozen

from puppetha.instance.failures import LocalError, Unavailable
from puppetha.instance.options import is_ip
from puppetha.instance.transport import describe, read_limited

#: IMDSv2 session tokens need only outlive this run.
IMDS_TOKEN_TTL = 300


@frozen
class InstanceIdentity:
    #: The exact bytes the metadata service served: the server verifies the signature over them.
    document: bytes
    signature: str
    instance_id: str
    #: The private DNS name (``local-hostname``), read for masters and lb nodes only.
    private_dns: str | None = None
    #: The document's ``privateIp`` (where a master's puppetserver listens by default).
    private_ip: str | None = None


class MetadataService:
    """IMDSv2: a session token from ``PUT /latest/api/token``, then GETs that present it."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.hostname is None:
            raise LocalError(f"bad metadata service address {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout = timeout

    def _request(
        self, method: str, path: str, headers: Mapping[str, str], missing_ok: bool = False
    ) -> bytes | None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request(method, path, headers=dict(headers))
            response = connection.getresponse()
            body = read_limited(response)
        except (OSError, http.client.HTTPException) as e:
            raise Unavailable(
                f"the metadata service at {self.url} is not answering ({describe(e)})"
            ) from None
        finally:
            connection.close()
        if response.status == 200:
            return body
        if response.status == 404 and missing_ok:
            return None
        if response.status >= 500:
            raise Unavailable(f"the metadata service answered {method} {path} with {response.status}")
        raise LocalError(f"the metadata service answered {method} {path} with {response.status}")

    def token(self) -> str:
        token = self._request(
            "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": str(IMDS_TOKEN_TTL)}
        )
        return (token or b"").decode("ascii", "replace").strip()

    def get(self, path: str, token: str) -> bytes:
        return self._request("GET", path, {"X-aws-ec2-metadata-token": token}) or b""

    def get_optional(self, path: str, token: str) -> bytes | None:
        """Like :meth:`get`, but ``None`` when the service has no such path (404)."""
        return self._request("GET", path, {"X-aws-ec2-metadata-token": token}, missing_ok=True)


def read_identity(imds: MetadataService, *, with_private_dns: bool) -> InstanceIdentity:
    token = imds.token()
    document = imds.get("/latest/dynamic/instance-identity/document", token)
    signature = imds.get("/latest/dynamic/instance-identity/rsa2048", token)
    try:
        fields = json.loads(document)
        instance_id = fields["instanceId"]
        private_ip = fields.get("privateIp")
        signature_text = signature.decode("ascii")
    except (ValueError, KeyError, TypeError) as e:
        raise LocalError(
            f"the metadata service served an unreadable identity document ({describe(e)})"
        ) from None
    if not isinstance(instance_id, str) or not instance_id:
        raise LocalError("the identity document has no instanceId")
    private_dns = None
    if with_private_dns:
        # Optional: without it the CSR asks only for the other names.
        hostname = imds.get_optional("/latest/meta-data/local-hostname", token) or b""
        private_dns = hostname.decode("ascii", "replace").strip()
    if not isinstance(private_ip, str) or not is_ip(private_ip):
        private_ip = None
    return InstanceIdentity(document, signature_text, instance_id, private_dns or None, private_ip)
