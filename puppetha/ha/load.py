"""
The masters' load as nginx sees it: nginx sends one syslog datagram per request to a UNIX
socket (``[lb]``'s load socket, format :data:`puppetha.ha.nginx.LOAD_LOG_FORMAT`); the lb daemon
counts them per master and, every sampling interval, turns the counts into
:class:`puppetha.ha.scaling.MasterLoad`.

Requests in flight are not in an access log (a line is written when a request ends): the mean
number in flight over the interval is the upstream time summed over the interval's requests,
divided by its length (Little's law), which is what the policy needs of them.
"""

from __future__ import annotations

from collections.abc import Mapping

from attrs import define, frozen
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from puppetha.ha.nginx import LOAD_LOG_NAME
from puppetha.ha.scaling import MasterLoad

log = Logger()

_MARK = f"{LOAD_LOG_NAME}: v1|".encode()


@frozen
class Attempt:
    """One upstream attempt of a request: the master's address, its status, its time."""

    address: str
    status: int
    upstream_time: float


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_datagram(data: bytes) -> list[Attempt]:
    """
    The upstream attempts of one datagram; [] for anything else (a request nginx answered
    itself, a foreign or garbled datagram).  Never raises.
    """
    start = data.find(_MARK)
    if start < 0:
        return []
    fields = data[start + len(_MARK):].decode("ascii", "replace").rstrip("\n").split("|")
    if len(fields) != 5:
        return []
    addresses, _status, upstream_statuses, _request_time, upstream_times = fields

    def items(text: str) -> list[str]:
        # ", " between attempts, " : " between the upstreams of an internal redirect.
        return [i.strip() for i in text.replace(" : ", ", ").split(",")]

    attempts = []
    for address, status, time in zip(items(addresses), items(upstream_statuses), items(upstream_times),
                                     strict=False):
        code, seconds = _number(status), _number(time)
        if address in ("", "-") or address.startswith("unix:") or code is None:
            continue
        attempts.append(Attempt(address, int(code), seconds if seconds is not None else 0.0))
    return attempts


@define
class _Counts:
    requests: int = 0
    upstream_time: float = 0.0
    unavailable: int = 0


class LoadCounter:
    """Counts per master address since the last :meth:`take`."""

    def __init__(self) -> None:
        self._counts: dict[str, _Counts] = {}

    def add(self, attempts: list[Attempt]) -> None:
        for attempt in attempts:
            counts = self._counts.setdefault(attempt.address, _Counts())
            counts.requests += 1
            counts.upstream_time += attempt.upstream_time
            if attempt.status == 503:
                counts.unavailable += 1

    def take(self, masters: Mapping[str, str], interval: float) -> dict[str, MasterLoad]:
        """
        The interval's load of each master (``masters``: ``host:port`` -> certname), and a
        fresh count.  Masters nginx sent nothing to have a zero load; addresses of no master
        (gone since) are dropped.
        """
        counts, self._counts = self._counts, {}
        loads = {}
        for address, certname in masters.items():
            c = counts.get(address, _Counts())
            loads[certname] = MasterLoad(
                requests=c.requests,
                in_flight=round(c.upstream_time / interval) if interval > 0 else 0,
                upstream_time=c.upstream_time / c.requests if c.requests else 0.0,
                unavailable=c.unavailable,
            )
        return loads


class LoadLogProtocol(DatagramProtocol):
    """Listens on the load socket (``reactor.listenUNIXDatagram``) and counts."""

    def __init__(self, counter: LoadCounter) -> None:
        self.counter = counter

    def datagramReceived(self, datagram: bytes, addr: object) -> None:
        self.counter.add(parse_datagram(datagram))
