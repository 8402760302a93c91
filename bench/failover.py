"""
Elastic IP failover between lb nodes, in the network-namespace rig: puppetha's failover against
the peer operators run today (Debian's keepalived, unicast VRRP, a notify script moving the
Elastic IP with the AWS CLI), in the same rig and the same run.

    .venv/bin/python bench/failover.py                  # 10 trials of each kind, each system
    .venv/bin/python bench/failover.py --quick          # 2 trials, short partitions
    .venv/bin/python bench/failover.py --trials 30 --systems keepalived

The rig: two lb hosts, an AWS host (moto: EC2, DynamoDB, KMS) and a master host as network
namespaces on a bridge; the Elastic IP is an address of the bridge that sits in the namespace of whichever
instance moto says holds it (:mod:`puppetha.testing.eip`).  A client outside (the root
namespace) asks the service behind the address which node it is: a new request every 5 ms,
each given 200 ms, without waiting for the earlier ones.  Behind the address: for keepalived,
a TCP server that names its host; for puppetha, the daemon's nginx front, proxying an agent's
TLS request (client certificate) to a stand-in master that names the lb node the request came
through.

Per trial, once the cluster has settled and after a random wait of up to a second (seeded:
``--seed``), so that the stop falls anywhere in keepalived's advert cycle and puppetha's
renewal and heartbeat cycles rather than where the bench's own pace puts it, the primary (the
holder of the address) is stopped one of two ways:

- ``kill -9``: every process of the primary's host gets SIGKILL and its link is unplugged, as
  when the instance dies; nothing says goodbye.
- ``graceful``: SIGTERM to the failover daemon only (keepalived, or ``twistd puppetha``).

and two figures are taken from that moment: **address held**, until moto applied the
AssociateAddress that gave the address to another node; **first request**, until the client
outside got an answer from another node through the address.  The stopped node is then started
again and the cluster left to settle before the next trial.

Each trial's timeline says where the time went, every moment on the machine's monotonic clock
and counted from the stop: for puppetha, from the dead node's acting log (its last renewal
began) and the new primary's ``takeover`` event (its watch of the lease's last version began,
it suspected the holder, decided, took the lease, had nginx current, sent AssociateAddress, had
DescribeAddresses confirm); for keepalived, when the new node's notify script read MASTER;
for both, when moto applied the association, when the emulator had moved the address, and the
client's first answer.  The report gives each moment's p50 and p95 over the trials.

Partitions (``peers``: the primary cut from the other lb node; ``store``: cut from the AWS host,
which is also the store; ``both``) are held for ``--partition-seconds`` and healed; for each,
the time during which two nodes at once acted as primary, from each node's own record (for
keepalived: the MASTER state, from its notify script; for puppetha: the (token, from, until)
stretches of its acting log).

moto answers in milliseconds; on AWS an AssociateAddress takes longer to take effect (AWS gives
no figure; seconds are commonly seen), which adds the same to both systems.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

from attrs import frozen

from puppetha.ha.failover import FailoverSettings
from puppetha.testing.eip import ElasticIPEmulator
from puppetha.testing.keepalived import MASTER, KeepalivedNode
from puppetha.testing.lb_rig import FRONT_NAME, Agent, FleetPKI, LbDaemon, StandInMaster
from puppetha.testing.moto import Fleet
from puppetha.testing.name_service import who_answers
from puppetha.testing.netns import Host, Rig
from puppetha.testing.partition import cut, heal
from puppetha.testing.rig_aws import MotoInRig

REGION = "us-east-1"
NODES = ("lb1", "lb2")
SERVICE_PORT = 8140
KINDS = ("kill -9", "graceful")
PARTITIONS = ("peers", "store", "both")

#: The client outside: one request every POLL seconds, each given REQUEST_TIMEOUT.
POLL = 0.005
REQUEST_TIMEOUT = 0.2


@frozen
class Trial:
    system: str
    kind: str
    stopped: str
    address_held: float
    first_request: float
    #: Moment name -> seconds from the stop (see :data:`MOMENTS`), those this trial has.
    timeline: dict[str, float]


#: The moments of a takeover, in the order they come, and what each is.
MOMENTS = {
    "last renewal": "the dead node's last renewal of the lease began",
    "watch began": "the new node first knew the lease's last version (heartbeat or read)",
    "suspected": "the new node suspected the holder (heartbeats silent for suspect_after)",
    "MASTER": "keepalived's notify script read MASTER on the new node",
    "decided": "the new node decided to take the lease",
    "taken": "its compare-and-set of the lease began",
    "written": "the lease's write answered",
    "front ready": "nginx served the store's configuration (the front round)",
    "associate sent": "AssociateAddress sent",
    "moto applied": "moto applied the association",
    "address placed": "the emulator had the address in the new node",
    "associate answered": "AssociateAddress answered",
    "confirmed": "DescribeAddresses confirmed the address",
    "first answer": "the client outside got its first answer through the address",
}

#: The takeover event's fields (acting log) by moment.
_TAKEOVER_FIELDS = {
    "watch began": "watch_since",
    "suspected": "suspected",
    "decided": "decided",
    "taken": "taken",
    "written": "written",
    "front ready": "front",
    "associate sent": "associate",
    "associate answered": "associated",
    "confirmed": "confirmed",
}


@frozen
class PartitionResult:
    system: str
    partition: str
    cut_node: str
    seconds: float
    both_primary: float  # seconds with two or more nodes acting as primary
    episodes: int
    moves: int  # AssociateAddress calls that moved the address meanwhile
    address_on_primary: bool  # after healing, the address sits in the node acting as primary


class Cluster(Protocol):
    """The failover system under test, on the rig's lb hosts."""

    name: str

    def settings(self) -> dict[str, str]: ...

    def start(self, node: str) -> None:
        """Starts the node's failover daemon and its service (waiting for a stopping one to end)."""
        ...

    def crashed(self, node: str) -> None:
        """Notes that every process of ``node`` was just killed."""
        ...

    def stop(self, node: str) -> None:
        """Sends the node's failover daemon SIGTERM, without waiting."""
        ...

    def ready(self) -> bool:
        """Every node runs and exactly one acts as primary."""
        ...

    def who_answers(self, address: str) -> str | None:
        """The node whose service answered a client's request to ``address``, or None."""
        ...

    def primary_intervals(self) -> dict[str, list[tuple[float, float]]]:
        """Per node, when it acted as primary, on the monotonic clock (an open interval ends now)."""
        ...

    def moments(self, stopped: str, took_over: str, since: float) -> dict[str, float]:
        """The system's own moments (monotonic clock) of the takeover from ``stopped`` after ``since``."""
        ...

    def close(self) -> None: ...


class Testbed:
    """The rig, moto with the Elastic IP emulator, and one instance per lb node."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._stack = ExitStack()
        self.rig = self._stack.enter_context(Rig([*NODES, "aws", "master"]))
        socket_path = workdir / "associations.sock"
        self.moto = self._stack.enter_context(
            MotoInRig(self.rig["aws"], associations_socket=socket_path, log_dir=workdir)
        )
        self.fleet = Fleet(self.moto.endpoint_url, REGION)
        self.instances = {name: self.fleet.launch("lb").instance_id for name in NODES}
        self.allocation_id = self.fleet.allocate_address()
        self.eip = self._stack.enter_context(
            ElasticIPEmulator(
                self.rig,
                self.allocation_id,
                self.rig.spare_address(),
                socket_path,
                {instance: self.rig[name] for name, instance in self.instances.items()},
            )
        )

    @property
    def lb_hosts(self) -> list[Host]:
        return [self.rig[name] for name in NODES]

    def crash_host(self, node: str) -> None:
        """Every process of the host killed and its link unplugged: the instance is gone."""
        self.rig[node].link_down()
        self.rig[node].kill_all()

    def revive_host(self, node: str) -> None:
        host = self.rig[node]
        wait_until(f"{node}'s processes gone", lambda: not host.pids(), 10)
        host.link_up()

    def close(self) -> None:
        self._stack.close()


class KeepalivedCluster:
    """keepalived on every lb node: BACKUP + nopreempt, advert_int 1 s, notify moves the address."""

    name = "keepalived"

    def __init__(self, bed: Testbed, advert_int: float = 1.0) -> None:
        self.bed = bed
        self.advert_int = advert_int
        self.nodes = {
            name: KeepalivedNode(
                bed.rig[name],
                [host for host in bed.lb_hosts if host.name != name],
                instance_id=bed.instances[name],
                allocation_id=bed.allocation_id,
                endpoint_url=bed.moto.endpoint_url,
                region=REGION,
                workdir=bed.workdir,
                advert_int=advert_int,
            )
            for name in NODES
        }
        self._services: dict[str, subprocess.Popen[bytes]] = {}
        self._died: dict[str, list[float]] = {name: [] for name in NODES}

    def settings(self) -> dict[str, str]:
        return {
            "vrrp": "unicast peers, every node state BACKUP with nopreempt, equal priority 100",
            "advert_int": f"{self.advert_int:g} s (master down after 3 adverts + skew)",
            "notify": "bash script: aws ec2 associate-address --allow-reassociation (Debian awscli)",
            "service": f"a TCP server naming its host, port {SERVICE_PORT}",
        }

    def start(self, node: str) -> None:
        service = self._services.get(node)
        if service is None or service.poll() is not None:
            self._services[node] = self.bed.rig[node].popen(
                [sys.executable, "-m", "puppetha.testing.name_service", node, str(SERVICE_PORT)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        self.nodes[node].start()

    def crashed(self, node: str) -> None:
        self._died[node].append(time.monotonic())
        self.nodes[node].kill()

    def stop(self, node: str) -> None:
        self.nodes[node].stop(wait=False)
        self._died[node].append(time.monotonic())

    def ready(self) -> bool:
        states = [node.state() for node in self.nodes.values() if node.running]
        return (
            len(states) == len(self.nodes)
            and states.count(MASTER) == 1
            and all(state in (MASTER, "BACKUP") for state in states)
        )

    def who_answers(self, address: str) -> str | None:
        return who_answers(address, SERVICE_PORT, REQUEST_TIMEOUT)

    def primary_intervals(self) -> dict[str, list[tuple[float, float]]]:
        now = time.monotonic()
        intervals: dict[str, list[tuple[float, float]]] = {}
        for name, node in self.nodes.items():
            # A killed keepalived writes nothing more: its mastership ended when it died.
            events = sorted(
                [(c.at, c.state) for c in node.states()] + [(t, "DEAD") for t in self._died[name]]
            )
            spans: list[tuple[float, float]] = []
            start: float | None = None
            for at, state in events:
                if state == MASTER and start is None:
                    start = at
                elif state != MASTER and start is not None:
                    spans.append((start, at))
                    start = None
            if start is not None:
                spans.append((start, now))
            intervals[name] = spans
        return intervals

    def moments(self, stopped: str, took_over: str, since: float) -> dict[str, float]:
        masters = [c.at for c in self.nodes[took_over].states() if c.state == MASTER and c.at >= since]
        return {"MASTER": masters[0]} if masters else {}

    def close(self) -> None:
        for node in self.nodes.values():
            node.kill()
        for service in self._services.values():
            service.kill()
            service.wait()


class PuppethaCluster:
    """``twistd puppetha`` lb daemons (failover on, [ha] defaults) with nginx, on DynamoDB in moto."""

    name = "puppetha"

    def __init__(self, bed: Testbed) -> None:
        self.bed = bed
        self.pki = FleetPKI(bed.moto.endpoint_url, bed.workdir / "pki")
        self.master = StandInMaster(bed.rig["master"], self.pki)
        self.agent = Agent(self.pki)
        self.nodes = {
            name: LbDaemon(
                bed.rig[name],
                shared=self.pki.shared,
                lb_files=self.pki.leaf("lb", f"{name}.lb.test", sans=[FRONT_NAME], usage="both"),
                allocation_id=bed.allocation_id,
                instance_id=bed.instances[name],
                directory=bed.workdir / name,
            )
            for name in NODES
        }
        self._names = {host.address: host.name for host in bed.lb_hosts}

    def settings(self) -> dict[str, str]:
        from puppetha.config import OPTIONS

        timing = [o for o in OPTIONS if o.section == "ha" and o.default.endswith("s") and o.name != "address"]
        settings = {f"[ha] {o.name}": o.default for o in timing}
        settings["service"] = "nginx (the daemon's front) proxying to a stand-in master over TLS"
        settings["store"] = "DynamoDB in moto, CA keys sealed by KMS in moto"
        return settings

    def start(self, node: str) -> None:
        self.nodes[node].start()

    def crashed(self, node: str) -> None:
        daemon = self.nodes[node]
        daemon.kill()

    def stop(self, node: str) -> None:
        self.nodes[node].stop(wait=False)

    def _acting_now(self) -> list[str]:
        now = time.monotonic()
        return [name for name, d in self.nodes.items() if any(until > now for _, _, until in d.acted()[-1:])]

    def ready(self) -> bool:
        return all(d.running for d in self.nodes.values()) and len(self._acting_now()) == 1

    def who_answers(self, address: str) -> str | None:
        return self._names.get(self.agent.served_by(address, timeout=REQUEST_TIMEOUT) or "")

    def primary_intervals(self) -> dict[str, list[tuple[float, float]]]:
        now = time.monotonic()
        return {
            name: [(start, min(until, now)) for _, start, until in d.acted()]
            for name, d in self.nodes.items()
        }

    def moments(self, stopped: str, took_over: str, since: float) -> dict[str, float]:
        found: dict[str, float] = {}
        # An acting event's until is its renewal's start plus the window (the [ha] defaults here).
        ha = FailoverSettings()
        renewals = [e["until"] - (ha.lease_duration - ha.lease_margin) for e in self.nodes[stopped].acting()
                    if e["event"] == "acting"]
        renewals = [at for at in renewals if at < since]
        if renewals:
            found["last renewal"] = max(renewals)

        def takeover() -> dict[str, Any] | None:
            events = [e for e in self.nodes[took_over].acting()
                      if e["event"] == "takeover" and e["decided"] >= since]
            return events[-1] if events else None

        # Written once DescribeAddresses confirmed, which may come after the client's first answer.
        with contextlib.suppress(TimeoutError):
            wait_until("the takeover's moments", lambda: takeover() is not None, 10)
        event = takeover() or {}
        for moment, field in _TAKEOVER_FIELDS.items():
            if event.get(field) is not None:
                found[moment] = float(event[field])
        return found

    def close(self) -> None:
        for daemon in self.nodes.values():
            daemon.stop_all()
        self.master.stop()
        self.pki.close()


def wait_until(condition: str, predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{condition} not reached after {timeout}s")
        time.sleep(interval)


def settle(bed: Testbed, cluster: Cluster, timeout: float = 60.0, quiet: float = 2.0) -> Host:
    """Waits until the cluster is ready and serves through the address; returns the primary."""
    wait_until("a settled cluster", cluster.ready, timeout)
    wait_until("the Elastic IP placed", lambda: bed.eip.holder is not None, timeout)
    # Heartbeats or adverts of the standby must be flowing before the primary is stopped.
    time.sleep(quiet)
    wait_until("a settled cluster", cluster.ready, timeout)
    holder = bed.eip.holder
    assert holder is not None
    wait_until(
        "the service answering through the address",
        lambda: cluster.who_answers(bed.eip.address) == holder.name,
        timeout,
    )
    return holder


def first_answer_from(cluster: Cluster, address: str, names: Sequence[str], timeout: float = 60.0) -> float:
    """
    The moment a client outside first gets an answer from one of ``names`` through ``address``.
    A new request starts every POLL seconds whether or not the earlier ones have finished, so a
    request stuck on the address's old place does not hide the moment the new one answers.
    """
    answered: list[float] = []
    done = threading.Event()

    def ask() -> None:
        if cluster.who_answers(address) in names:
            answered.append(time.monotonic())
            done.set()

    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(max_workers=int(REQUEST_TIMEOUT / POLL) + 8) as pool:
        while not done.is_set() and time.monotonic() < deadline:
            pool.submit(ask)
            done.wait(POLL)
    if not answered:
        raise TimeoutError(f"no answer from {', '.join(names)} through {address} after {timeout}s")
    return min(answered)


#: The longest random wait before a stop: keepalived's advert interval, five of puppetha's renewals.
PHASE = 1.0


def run_trial(bed: Testbed, cluster: Cluster, kind: str, phase: random.Random) -> Trial:
    primary = settle(bed, cluster)
    others = [host for host in bed.lb_hosts if host is not primary]
    moves_before = len(bed.eip.history)
    time.sleep(phase.uniform(0, PHASE))
    stopped_at = time.monotonic()
    if kind == "kill -9":
        bed.crash_host(primary.name)
        cluster.crashed(primary.name)
    else:
        cluster.stop(primary.name)
    answered_at = first_answer_from(cluster, bed.eip.address, [host.name for host in others])
    bed.eip.wait_for_any(others, timeout=60)
    took = next(m for m in bed.eip.moves_after(moves_before) if m.host != primary.name)
    assert took.host is not None  # waited for one of the others
    moments = {
        **cluster.moments(primary.name, took.host, stopped_at),
        "moto applied": took.associated_at,
        "address placed": took.placed_at,
        "first answer": answered_at,
    }
    if kind == "kill -9":
        bed.revive_host(primary.name)
    cluster.start(primary.name)
    timeline = {name: moments[name] - stopped_at for name in MOMENTS if name in moments}
    return Trial(cluster.name, kind, primary.name, took.associated_at - stopped_at, answered_at - stopped_at,
                 timeline)


def overlap(intervals: dict[str, list[tuple[float, float]]], since: float, until: float) -> tuple[float, int]:
    """Seconds in [since, until] during which two or more nodes acted as primary, and in how many episodes."""
    events: list[tuple[float, int]] = []
    for spans in intervals.values():
        for began, ended in spans:
            start, end = max(began, since), min(ended, until)
            if start < end:
                events += [(start, 1), (end, -1)]
    events.sort(key=lambda event: (event[0], event[1]))
    active, total, episodes, opened = 0, 0.0, 0, 0.0
    for at, step in events:
        if active >= 2 and active + step < 2:
            total += at - opened
        if active < 2 and active + step >= 2:
            opened, episodes = at, episodes + 1
        active += step
    return total, episodes


def run_partition(bed: Testbed, cluster: Cluster, partition: str, seconds: float) -> PartitionResult:
    primary = settle(bed, cluster)
    peers = [host for host in bed.lb_hosts if host is not primary]
    aws = bed.rig["aws"]
    moves_before = len(bed.eip.history)
    began = time.monotonic()
    if partition in ("peers", "both"):
        cut(primary, *peers)
    if partition in ("store", "both"):
        cut(primary, aws)
    time.sleep(seconds)
    for host in bed.rig.hosts.values():
        heal(host)
    settle(bed, cluster)
    ended = time.monotonic()
    intervals = cluster.primary_intervals()
    both, episodes = overlap(intervals, began, ended)
    acting = [name for name, spans in intervals.items() if spans and spans[-1][1] >= ended]
    holder = bed.eip.holder
    return PartitionResult(
        cluster.name,
        partition,
        primary.name,
        seconds,
        both,
        episodes,
        len(bed.eip.moves_after(moves_before)),
        address_on_primary=holder is not None and acting == [holder.name],
    )


def quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return statistics.median(ordered), p95, ordered[-1]


def make_cluster(system: str, bed: Testbed) -> Cluster:
    if system == "keepalived":
        return KeepalivedCluster(bed)
    return PuppethaCluster(bed)


def run_system(system: str, args: argparse.Namespace) -> Iterator[Trial | PartitionResult]:
    with ExitStack() as stack:
        if args.keep is not None:
            workdir = tempfile.mkdtemp(prefix=f"bench-failover-{system}-", dir=args.keep)
            print(f"\n{system}: logs kept in {workdir}")
        else:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-failover-{system}-"))
        bed = Testbed(Path(workdir))
        try:
            cluster = make_cluster(system, bed)
            try:
                for name in NODES:
                    cluster.start(name)
                print(f"\n{system} settings:")
                for key, value in cluster.settings().items():
                    print(f"  {key}: {value}")
                phase = random.Random(args.seed)
                for kind in args.kinds:
                    for n in range(args.trials):
                        trial = run_trial(bed, cluster, kind, phase)
                        print(
                            f"  {system} {kind} #{n + 1}: {trial.stopped} stopped; address held "
                            f"{trial.address_held:.3f} s, first request {trial.first_request:.3f} s",
                            flush=True,
                        )
                        print("    " + ", ".join(f"{m} {t:+.3f}" for m, t in trial.timeline.items()),
                              flush=True)
                        yield trial
                for partition in args.partitions:
                    result = run_partition(bed, cluster, partition, args.partition_seconds)
                    print(
                        f"  {system} partition {partition}: {result.both_primary:.2f} s with two primaries "
                        f"({result.episodes} episodes), {result.moves} address moves",
                        flush=True,
                    )
                    yield result
            finally:
                cluster.close()
        finally:
            bed.close()


def report(trials: list[Trial], partitions: list[PartitionResult], systems: Sequence[str]) -> None:
    print("\nfailover, seconds from the stop (p50 / p95 / max over the trials)")
    print(f"{'system':<11} {'kind':<9} {'trials':>6}  {'address held':>24}  {'first request':>24}")
    p95s: dict[tuple[str, str, str], float] = {}
    for system in systems:
        for kind in KINDS:
            mine = [t for t in trials if t.system == system and t.kind == kind]
            if not mine:
                continue
            held = quantiles([t.address_held for t in mine])
            first = quantiles([t.first_request for t in mine])
            p95s[(system, kind, "held")], p95s[(system, kind, "first")] = held[1], first[1]
            print(
                f"{system:<11} {kind:<9} {len(mine):>6}  "
                + "  ".join(f"{a:>6.3f} / {b:>6.3f} / {c:>6.3f}" for a, b, c in (held, first))
            )
    print("\nwhere the time went: each moment of the takeover, seconds from the stop (p50 / p95)")
    for system in systems:
        for kind in KINDS:
            mine = [t for t in trials if t.system == system and t.kind == kind]
            if not mine:
                continue
            print(f"{system}, {kind}:")
            for moment, meaning in MOMENTS.items():
                values = [t.timeline[moment] for t in mine if moment in t.timeline]
                if values:
                    p50, p95, _ = quantiles(values)
                    print(f"  {moment:<19} {p50:>7.3f} / {p95:>7.3f}  {meaning}")
    for kind in KINDS:
        for what in ("held", "first"):
            base, ours = p95s.get(("keepalived", kind, what)), p95s.get(("puppetha", kind, what))
            if base and ours:
                print(f"ratio keepalived/puppetha, {kind}, {what} p95: {base / ours:.1f}x")
    if partitions:
        print("\npartitions: seconds during which two nodes acted as primary")
        for result in partitions:
            print(
                f"{result.system:<11} {result.partition:<6} ({result.cut_node} cut for {result.seconds:g} s):"
                f" {result.both_primary:.2f} s in {result.episodes} episodes, {result.moves} address moves;"
                f" healed, the address {'is' if result.address_on_primary else 'is NOT'} on the primary"
            )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--trials", type=int, default=10, help="trials of each kind, per system")
    parser.add_argument("--systems", default="puppetha,keepalived")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--partitions", default=",".join(PARTITIONS), help="'' for none")
    parser.add_argument("--partition-seconds", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="2 trials, 5 s partitions")
    parser.add_argument("--seed", type=int, default=12, help="of the random waits before the stops")
    parser.add_argument("--keep", metavar="DIR", help="keep every log (daemons, nginx, moto) under DIR")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.partition_seconds = 2, 5.0
    systems = [s for s in args.systems.split(",") if s]
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.partitions = [p for p in args.partitions.split(",") if p]
    for value, allowed in (
        (systems, ("puppetha", "keepalived")),
        (args.kinds, KINDS),
        (args.partitions, PARTITIONS),
    ):
        bad = [v for v in value if v not in allowed]
        if bad:
            parser.error(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    print(
        f"bench/failover.py: {args.trials} trials of each of {', '.join(args.kinds)}; partitions "
        f"{', '.join(args.partitions) or 'none'} for {args.partition_seconds:g} s; client polls every "
        f"{POLL * 1000:g} ms (not waiting for earlier ones), each given {REQUEST_TIMEOUT * 1000:g} ms; "
        f"stops after a random wait of up to {PHASE:g} s (seed {args.seed})"
    )
    trials: list[Trial] = []
    partitions: list[PartitionResult] = []
    for system in systems:
        for result in run_system(system, args):
            if isinstance(result, Trial):
                trials.append(result)
            else:
                partitions.append(result)
    report(trials, partitions, systems)


if __name__ == "__main__":
    main()
