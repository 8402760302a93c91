"""The PROXY header parser, as a table: what nginx sends, what it may be cut into, what is refused."""

from __future__ import annotations

import socket
import struct

import pytest
from twisted.internet.address import IPv4Address, IPv6Address

from puppetha.enroll.proxyheader import (
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    may_be_proxy_header,
    parse_proxy_header,
)


def v2(command: int, family: int, addresses: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(addresses)) + addresses


V4 = ProxyHeader(IPv4Address("TCP", "10.20.1.5", 40000), IPv4Address("TCP", "10.0.0.9", 8080))
V6 = ProxyHeader(IPv6Address("TCP", "fd00::5", 40000), IPv6Address("TCP", "fd00::9", 8080))
PORTS = struct.pack("!HH", 40000, 8080)
V2_V4 = v2(1, 0x11, socket.inet_aton("10.20.1.5") + socket.inet_aton("10.0.0.9") + PORTS)
V2_V6 = v2(1, 0x21, socket.inet_pton(socket.AF_INET6, "fd00::5")
           + socket.inet_pton(socket.AF_INET6, "fd00::9") + PORTS)


@pytest.mark.parametrize(
    ("raw", "header"),
    [
        (b"PROXY TCP4 10.20.1.5 10.0.0.9 40000 8080\r\n", V4),
        (b"PROXY TCP6 fd00::5 fd00::9 40000 8080\r\n", V6),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(None, None)),
        (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyHeader(None, None)),
        (V2_V4, V4),
        (V2_V6, V6),
        (v2(0, 0x00, b""), ProxyHeader(None, None)),  # LOCAL
    ],
    ids=["v1-tcp4", "v1-tcp6", "v1-unknown", "v1-unknown-with-addresses", "v2-tcp4", "v2-tcp6", "v2-local"],
)
def test_a_whole_header_and_what_follows(raw: bytes, header: ProxyHeader) -> None:
    assert parse_proxy_header(raw + b"\x16\x03\x01") == (header, b"\x16\x03\x01")
    # Cut anywhere before its end, it is not whole yet.
    for cut in range(1, len(raw)):
        assert parse_proxy_header(raw[:cut]) is None, cut


@pytest.mark.parametrize(
    "raw",
    [
        b"PROXY TCP4 999.1.1.1 10.0.0.9 40000 8080\r\n",
        b"PROXY TCP4 ::1 10.0.0.9 40000 8080\r\n",
        b"PROXY TCP6 10.20.1.5 ::1 40000 8080\r\n",
        b"PROXY TCP4 10.20.1.5 10.0.0.9 4x000 8080\r\n",
        b"PROXY TCP4 10.20.1.5 10.0.0.9 -1 8080\r\n",
        b"PROXY TCP4 10.20.1.5 10.0.0.9 4000000 8080\r\n",
        b"PROXY TCP4 10.20.1.5 10.0.0.9 40000\r\n",
        b"PROXY UDP4 10.20.1.5 10.0.0.9 40000 8080\r\n",
        b"PROXY TCP4  10.20.1.5 10.0.0.9 40000 8080\r\n",
        b"PROXY TCP4 " + b"1" * V1_MAX,
        v2(1, 0x11, b"garbage"),
        v2(1, 0x31, b"/tmp/x".ljust(216, b"\x00")),
        v2(1, 0x12, socket.inet_aton("10.20.1.5") * 2 + struct.pack("!HH", 1, 2)),  # UDP
        v2(2, 0x11, socket.inet_aton("10.20.1.5") * 2 + struct.pack("!HH", 1, 2)),  # no such command
        V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12,  # version 1 in a version 2 signature
    ],
)
def test_a_malformed_header_is_refused(raw: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(raw)


@pytest.mark.parametrize(
    "raw", [b"\x16\x03\x01\x02\x00", b"GET / HTTP/1.1\r\n", b"PROXX", b"\r\n\r\n\x00\r\nQUIX"]
)
def test_anything_else_is_no_header_at_once(raw: bytes) -> None:
    assert not may_be_proxy_header(raw)
    with pytest.raises(ProxyHeaderError, match="no PROXY header"):
        parse_proxy_header(raw)
