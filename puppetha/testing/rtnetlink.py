"""
The few rtnetlink requests the Elastic IP emulator makes, sent straight to the kernel: add or
delete one IPv4 address on an interface, forget one neighbour.  A request is a sendmsg and an
acknowledgement, tens of microseconds, where starting ``ip`` costs milliseconds.

A :class:`RouteSocket` belongs to the network namespace it was made in (make it with
:meth:`~puppetha.testing.netns.Host.inside` for a host), whichever thread uses it later.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading

NETLINK_ROUTE = 0
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_DELNEIGH = 29
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
IFA_ADDRESS = 1
IFA_LOCAL = 2
NDA_DST = 1

_HEADER = struct.Struct("=LHHLL")  # nlmsghdr: length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_NDMSG = struct.Struct("=BBHiHBB")  # family, pad, pad, interface index, state, flags, type


def _attribute(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


class RouteSocket:
    """An rtnetlink socket of one namespace, and the interface its requests are about."""

    def __init__(self, interface: str) -> None:
        self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._socket.bind((0, 0))
        self.interface = interface
        self.index = socket.if_nametoindex(interface)
        self._sequence = 0
        self._lock = threading.Lock()

    def _request(self, kind: int, flags: int, body: bytes) -> int:
        """Sends one request and returns the kernel's answer: 0, or an errno."""
        with self._lock:
            self._sequence += 1
            header = _HEADER.pack(
                _HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, self._sequence, 0
            )
            self._socket.send(header + body)
            while True:
                answer = self._socket.recv(65536)
                _, answer_kind, _, sequence, _ = _HEADER.unpack_from(answer)
                if answer_kind == NLMSG_ERROR and sequence == self._sequence:
                    (code,) = struct.unpack_from("=i", answer, _HEADER.size)
                    return -int(code)

    def _address_body(self, address: str, prefixlen: int) -> bytes:
        packed = ipaddress.IPv4Address(address).packed
        return (
            _IFADDRMSG.pack(socket.AF_INET, prefixlen, 0, 0, self.index)
            + _attribute(IFA_LOCAL, packed)
            + _attribute(IFA_ADDRESS, packed)
        )

    def add_address(self, address: str, prefixlen: int = 32) -> None:
        code = self._request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, self._address_body(address, prefixlen))
        if code not in (0, errno.EEXIST):
            raise OSError(code, f"adding {address}/{prefixlen} to {self.interface}: {os.strerror(code)}")

    def delete_address(self, address: str, prefixlen: int = 32) -> bool:
        """Removes the address; False when it was not there."""
        code = self._request(RTM_DELADDR, 0, self._address_body(address, prefixlen))
        if code in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
            return False
        if code != 0:
            raise OSError(code, f"deleting {address}/{prefixlen} from {self.interface}: {os.strerror(code)}")
        return True

    def forget_neighbour(self, address: str) -> bool:
        """Drops the neighbour entry (the cached MAC) of ``address``; False when there was none."""
        body = _NDMSG.pack(socket.AF_INET, 0, 0, self.index, 0, 0, 0) + _attribute(
            NDA_DST, ipaddress.IPv4Address(address).packed
        )
        code = self._request(RTM_DELNEIGH, 0, body)
        if code in (errno.ENOENT, errno.ESRCH):
            return False
        if code != 0:
            raise OSError(code, f"forgetting neighbour {address} on {self.interface}: {os.strerror(code)}")
        return True

    def close(self) -> None:
        self._socket.close()
