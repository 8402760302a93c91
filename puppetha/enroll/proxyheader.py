"""
The PROXY protocol header (HAProxy's ``proxy-protocol.txt``, versions 1 and 2), which nginx's
stream proxy sends before anything else on a connection.  Parsing only: what to trust is the
listener's business (:mod:`puppetha.enroll.listener`).

Twisted ships a parser, but only as private modules; this one is ours and strict: a version 1
line is ``PROXY TCP4|TCP6 src dst sport dport`` with addresses of the named family and decimal
ports, a version 2 header is a PROXY or LOCAL command over TCP.
"""

from __future__ import annotations

import ipaddress
import struct

from attrs import frozen
from twisted.internet.address import IPv4Address, IPv6Address

V1_PREFIX = b"PROXY "
#: The longest version 1 header, CRLF included.
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16

_V2_TCP4 = 0x11
_V2_TCP6 = 0x21


class ProxyHeaderError(Exception):
    """The bytes start a PROXY header that is malformed, or one of a kind we do not take."""


@frozen
class ProxyHeader:
    """What the header says; ``source`` is None for ``UNKNOWN`` and ``LOCAL`` headers."""

    source: IPv4Address | IPv6Address | None
    destination: IPv4Address | IPv6Address | None


def may_be_proxy_header(data: bytes) -> bool:
    """Whether ``data`` is, so far, the start of a version 1 or 2 header."""
    return any(data[: len(prefix)] == prefix[: len(data)] for prefix in (V1_PREFIX, V2_SIGNATURE))


def parse_proxy_header(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    """
    The header at the start of ``data`` and the bytes after it, or None while it is not whole.
    Raises :class:`ProxyHeaderError` when it is malformed.
    """
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    if may_be_proxy_header(data):
        return None
    raise ProxyHeaderError("no PROXY header")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"a version 1 header passes {V1_MAX} bytes")
        return None
    fields = data[:end].split(b" ")
    rest = data[end + 2:]
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return ProxyHeader(None, None), rest
    if len(fields) != 6:
        raise ProxyHeaderError("a version 1 header has six fields")
    _, family, source, destination, source_port, destination_port = fields
    if family not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("a version 1 header names TCP4, TCP6 or UNKNOWN")
    version = 4 if family == b"TCP4" else 6
    return ProxyHeader(
        _v1_address(version, source, source_port), _v1_address(version, destination, destination_port)
    ), rest


def _v1_address(version: int, host: bytes, port: bytes) -> IPv4Address | IPv6Address:
    if not port.isdigit() or len(port) > 5:
        raise ProxyHeaderError(f"the port {port!r} is not a number")
    try:
        text = host.decode("ascii")
        address = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProxyHeaderError(f"{host!r} is not an IPv{version} address") from e
    return _twisted_address(address, int(port))


def _parse_v2(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    if len(data) < _V2_FIXED:
        return None
    version_command, family, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if version_command >> 4 != 2:
        raise ProxyHeaderError("a version 2 signature with another version")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError("a version 2 command other than LOCAL or PROXY")
    if len(data) < _V2_FIXED + length:
        return None
    body, rest = data[_V2_FIXED:_V2_FIXED + length], data[_V2_FIXED + length:]
    if command == 0:
        return ProxyHeader(None, None), rest  # LOCAL: the proxy speaking for itself
    if family == _V2_TCP4 and length >= 12:
        source4, destination4 = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        ports = struct.unpack("!HH", body[8:12])
        header = ProxyHeader(_twisted_address(source4, ports[0]), _twisted_address(destination4, ports[1]))
        return header, rest
    if family == _V2_TCP6 and length >= 36:
        source6, destination6 = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        ports = struct.unpack("!HH", body[32:36])
        header = ProxyHeader(_twisted_address(source6, ports[0]), _twisted_address(destination6, ports[1]))
        return header, rest
    raise ProxyHeaderError(f"a version 2 header of family 0x{family:02x} and {length} address bytes")


def _twisted_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                     port: int) -> IPv4Address | IPv6Address:
    if isinstance(address, ipaddress.IPv4Address):
        return IPv4Address("TCP", str(address), port)
    return IPv6Address("TCP", str(address), port)
