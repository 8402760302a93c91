"""
ENC benchmark.

1. The ENC script's wall time per call (p50/p99) in the form puppetserver runs it
   (``python -IS script.pyc``, :mod:`puppetha.enc.launcher`), as ``python -IS script.py`` and
   as the ``puppetha-enc`` console script, against the baseline ``python -I -S -c pass`` of the
   same interpreter, and a script that prints a fixed YAML; the fast form also against a
   stand-in daemon (a thread of the benchmark answering at once), which leaves out the
   daemon's own time.  Interleaved call by call, in the same run.
2. The service's classifications per second over the UNIX socket, many concurrent clients,
   10,000 enrolled and classified nodes in a SQLite store.  AWS: an in-memory ICloud in the
   server process (every instance running, 3 security groups and 2 tags each), so the numbers
   are the daemon's own; the first pass over the fleet ("cold") fills the instance cache through
   batched describe calls, the timed pass after it ("warm") is served from the caches, as a
   fleet whose nodes run on schedule is.  The baseline ("floor"): a second listener in the same
   daemon process, on the same Twisted stack (``ENCFactory`` and its protocol, the same UNIX
   socket options), whose classifier answers one fixed ENC YAML at once, driven by the same
   clients; floor and warm alternate ``--rounds`` times, and each figure is printed against
   the floor measured next to it: the rate, and the daemon's CPU time per answer (its own
   user and system time from ``/proc``, background refresh included), which a shared, busy
   machine disturbs far less than the rate.

Rerun: ``.venv/bin/python bench/enc.py`` (about a minute; ``--calls``, ``--nodes``,
``--clients``, ``--seconds``, ``--rounds`` to change the sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from twisted.internet.defer import Deferred, succeed

from puppetha.aws.cloud import InstanceInfo, SecurityGroup
from puppetha.enc.launcher import compile_script, fast_command
from puppetha.store import Create, Item
from puppetha.store.records import Classification, NodeRecord, Records
from puppetha.store.sqlite import SQLiteStore

REGION = "us-east-1"
ACCOUNT = "123456789012"
#: What the ENC script's start-up is measured against: the interpreter doing nothing.
BASELINE = "python -I -S -c pass (baseline)"
GROUPS = [SecurityGroup(f"sg-{i:017x}", f"group{i}") for i in range(8)]


def certname(i: int) -> str:
    return f"node{i:05d}.example.com"


def instance_id(i: int) -> str:
    return f"i-{i:017x}"


class MemoryCloud:
    """What DescribeInstances would say of the benchmark's fleet, from memory."""

    def __init__(self, nodes: int) -> None:
        self.calls = 0
        self.instances = {
            instance_id(i): InstanceInfo(
                instance_id(i), ACCOUNT, REGION, "running", "10.0.0.1", "", "",
                [GROUPS[i % 8], GROUPS[(i + 1) % 8], GROUPS[(i + 3) % 8]],
                {"role": f"role{i % 10}", "env": f"env{i % 3}"})
            for i in range(nodes)
        }

    def describe_instances(self, region: str, ids: Sequence[str]) -> dict[str, InstanceInfo]:
        self.calls += 1
        return {i: self.instances[i] for i in ids if i in self.instances}


def seed(path: str, nodes: int) -> None:
    store = SQLiteStore(path)
    writes: list[Create] = []
    for c in [Classification("default", {"ntp": {}, "ssh": {"port": 22}}, {"dc": "eu1"}, "production")]:
        writes.append(Create(c.KIND, c.key(), c.to_value()))
    for g in GROUPS:
        c = Classification(f"sg:{g.group_name}", {f"profile::{g.group_name}": {"enabled": True}})
        writes.append(Create(c.KIND, c.key(), c.to_value()))
    for r in range(10):
        c = Classification(f"tag:role=role{r}", {f"role::r{r}": {"workers": r}}, {"tier": r})
        writes.append(Create(c.KIND, c.key(), c.to_value()))
    for i in range(nodes):
        n = NodeRecord(certname(i), instance_id(i), "agent", ACCOUNT, REGION, "10.0.0.1", i + 1,
                       "root", "", 0.0, 1e12)
        c = Classification(f"node:{certname(i)}", parameters={"rack": f"r{i % 40}"})
        writes += [Create(n.KIND, n.key(), n.to_value()), Create(c.KIND, c.key(), c.to_value())]
    for start in range(0, len(writes), 100):
        store.transact(writes[start : start + 100])
    store.close()


class CountingStore(SQLiteStore):
    """The bench's store, counting the items asked for (the refresh's cost)."""

    gets = 0

    def get(self, kind: str, key: str) -> Item | None:
        self.gets += 1
        return super().get(kind, key)

    def get_many(self, kind: str, keys: Sequence[str]) -> dict[str, Item]:
        self.gets += len(keys)
        return super().get_many(kind, keys)


class FixedAnswer:
    """The floor's classifier: one fixed answer at once, whoever asks."""

    def __init__(self, answer: str) -> None:
        self.answer = answer

    def classify(self, certname: str) -> Deferred[str]:
        return succeed(self.answer)


def serve(socket_path: str, floor_path: str, store_path: str, nodes: int) -> None:
    from twisted.internet import reactor

    from puppetha.enc.service import Classifier, ENCFactory, ENCSocketService
    from puppetha.threads import Blocking, make_pool

    pool = make_pool("enc", 4)
    pool.start()
    cloud = MemoryCloud(nodes)
    store = CountingStore(store_path)
    classifier = Classifier(reactor, Blocking(reactor, pool, Records(store)),  # type: ignore[arg-type]
                            Blocking(reactor, pool, cloud))  # type: ignore[arg-type]
    service = ENCSocketService(reactor, classifier, socket_path)  # type: ignore[arg-type]
    service.factory.max_connections = 4096
    service.startService()

    def floor(answer: str) -> None:
        # The same factory and protocol as the service's, the same listen call: what is left
        # between the two is the classification itself.
        factory = ENCFactory(FixedAnswer(answer), reactor, max_connections=4096)  # type: ignore[arg-type]
        reactor.listenUNIX(floor_path, factory, mode=0o660, backlog=service.backlog)  # type: ignore[attr-defined]
        print("ready", flush=True)

    def report() -> None:
        print(f"describe calls {cloud.calls} store fetches "
              f"{classifier.nodes.fetches + classifier.scopes.fetches} items read {store.gets}",
              flush=True)

    reactor.addSystemEventTrigger("before", "shutdown", report)
    reactor.addSystemEventTrigger("after", "shutdown", pool.stop)
    # The floor answers what the service answers for one node of the fleet.
    classifier.classify(certname(0)).addCallback(floor)
    reactor.run()


def answer_forever(path: str, answer: bytes) -> None:
    """A stand-in daemon in a thread of this process: the same answer to every request."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            with conn:
                conn.recv(512)
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()


def timed_calls(argv: list[str], calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
        assert done.returncode == 0, done.stderr
    return times


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def load(socket_path: str, names: list[str], clients: int, seconds: float | None,
               ) -> tuple[int, float]:
    """Classify ``names`` (once each, or at random for ``seconds``) with ``clients`` at once."""
    done = 0
    queue = list(names)
    deadline = None if seconds is None else time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while True:
            if deadline is None:
                if not queue:
                    return
                name = queue.pop()
            else:
                if time.perf_counter() > deadline:
                    return
                name = random.choice(names)
            reader, writer = await asyncio.open_unix_connection(socket_path)
            writer.write(name.encode() + b"\n")
            answer = await reader.read()
            writer.close()
            assert answer.startswith(b"OK "), answer[:200]
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done, time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """The user and system CPU time of process ``pid`` so far (Linux's ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Measured:
    rate: float
    #: The daemon's CPU time per answer, background work included: less noisy than the rate
    #: on a shared machine, where the rate also measures what else runs.
    cpu_us: float


def rate(path: str, names: list[str], clients: int, seconds: float | None, daemon: int) -> Measured:
    cpu = cpu_seconds(daemon)
    done, took = asyncio.run(load(path, names, clients, seconds))
    return Measured(done / took, (cpu_seconds(daemon) - cpu) / done * 1e6)


def answer_writing(node: int = 7, rounds: int = 2000) -> tuple[float, float]:
    """
    Microseconds to write one node's ENC answer, as the service does (``to_enc_yaml``) and
    with PyYAML's block style for the same document (the baseline): the bench fleet's shape.
    """
    import timeit

    import yaml

    from puppetha.enc.classify import NodeFacts, _Dumper, merge, to_enc_yaml

    info = MemoryCloud(node + 1).instances[instance_id(node)]
    facts = NodeFacts(certname(node), info.instance_id, ACCOUNT, REGION, "agent", info.security_groups,
                      info.tags)
    group = GROUPS[node % 8].group_name
    stored = {c.scope: c for c in (
        Classification("default", {"ntp": {}, "ssh": {"port": 22}}, {"dc": "eu1"}, "production"),
        Classification(f"sg:{group}", {f"profile::{group}": {"enabled": True}}),
        Classification(f"tag:role=role{node % 10}", {f"role::r{node % 10}": {"workers": node % 10}},
                       {"tier": node % 10}),
        Classification(f"node:{certname(node)}", parameters={"rack": f"r{node % 40}"}),
    )}
    result = merge(facts, stored)
    document = {"classes": result.classes, "parameters": result.parameters,
                "environment": result.environment}

    def pyyaml() -> str:
        return yaml.dump(document, Dumper=_Dumper, default_flow_style=False, sort_keys=True,
                         explicit_start=True)

    assert to_enc_yaml(result) == pyyaml()
    ours = timeit.timeit(lambda: to_enc_yaml(result), number=rounds) / rounds
    theirs = timeit.timeit(pyyaml, number=rounds) / rounds
    return ours * 1e6, theirs * 1e6


def script_timings(calls: int, socket_path: str, work: Path) -> None:
    """The ENC script's forms, one call of each in turn, against the baseline interpreter."""
    bindir = Path(sys.executable).parent
    script = bindir / "puppetha-enc"
    direct = Path(__file__).resolve().parent.parent / "puppetha" / "enc" / "script.py"
    sample = subprocess.run([str(script), "--socket", socket_path, certname(1)],
                            capture_output=True, check=True).stdout
    floor = work / "floor.py"
    floor.write_text(f"import sys\nsys.stdout.write({sample.decode()!r})\n")
    compile_script()
    fast = fast_command().split()
    fixed_socket = str(work / "fixed.sock")
    answer_forever(fixed_socket, b"OK %d\n" % len(sample) + sample)

    runs = {
        BASELINE: [sys.executable, "-I", "-S", "-c", "pass"],
        "fixed YAML, -I -S": [sys.executable, "-I", "-S", str(floor)],
        "fast: -IS script.pyc": [*fast, "--socket", socket_path, certname(4)],
        "fast, stand-in daemon": [*fast, "--socket", fixed_socket, certname(4)],
        "-IS script.py": [sys.executable, "-IS", str(direct), "--socket", socket_path, certname(3)],
        "puppetha-enc (console script)": [str(script), "--socket", socket_path, certname(2)],
    }
    timings = {k: [] for k in runs}  # type: dict[str, list[float]]
    for _ in range(calls):  # one of each in turn, so the machine's drift hits all alike
        for label, command in runs.items():
            timings[label] += timed_calls(command, 1)
    print(f"\nper call, {calls} calls each (same interpreter: {sys.executable});"
          f" fast = {' '.join(fast)}")
    base = statistics.median(timings[BASELINE])
    for label, times in timings.items():
        p50, p99 = statistics.median(times), pct(times, 99)
        print(f"  {label:30s} p50 {p50 * 1000:6.1f} ms  p99 {p99 * 1000:6.1f} ms  "
              f"p50/baseline {p50 / base:4.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=10000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", nargs=4, metavar=("SOCKET", "FLOOR", "STORE", "NODES"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve[0], args.serve[1], args.serve[2], int(args.serve[3]))
        return 0

    work = Path(tempfile.mkdtemp(prefix="puppetha-bench-enc-"))
    store_path, socket_path = str(work / "store.sqlite"), str(work / "enc.sock")
    floor_path = str(work / "floor.sock")
    start = time.perf_counter()
    seed(store_path, args.nodes)
    print(f"seeded {args.nodes} nodes + {args.nodes + 19} classifications in "
          f"{time.perf_counter() - start:.1f}s")
    server = subprocess.Popen([sys.executable, __file__, "--serve", socket_path, floor_path,
                               store_path, str(args.nodes)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        if args.calls:
            script_timings(args.calls, socket_path, work)

        ours, pyyaml = answer_writing()
        print(f"\nwriting one answer's YAML: to_enc_yaml {ours:.1f} us, PyYAML's block style "
              f"{pyyaml:.1f} us (baseline): x{ours / pyyaml:.2f}")

        names = [certname(i) for i in range(args.nodes)]
        random.shuffle(names)
        print(f"\nthe service, {args.clients} clients, against the floor (the same listener "
              f"stack in the daemon answering a fixed YAML at once) measured just before;"
              f" answers a second, and the daemon's CPU time per answer:")
        floor = rate(floor_path, names, args.clients, args.seconds, server.pid)
        cold = rate(socket_path, names, args.clients, None, server.pid)
        print(f"  floor {floor.rate:7,.0f}/s {floor.cpu_us:4.0f} us CPU | cold pass, {args.nodes} distinct"
              f" nodes: {cold.rate:7,.0f}/s {cold.cpu_us:4.0f} us CPU | x{cold.rate / floor.rate:4.2f}"
              f" the floor's rate, x{cold.cpu_us / floor.cpu_us:4.1f} its CPU")
        for _ in range(args.rounds):
            floor = rate(floor_path, names, args.clients, args.seconds, server.pid)
            warm = rate(socket_path, names, args.clients, args.seconds, server.pid)
            print(f"  floor {floor.rate:7,.0f}/s {floor.cpu_us:4.0f} us CPU | warm, {args.seconds:g}s at"
                  f" random: {warm.rate:7,.0f}/s {warm.cpu_us:4.0f} us CPU | x{warm.rate / floor.rate:4.2f}"
                  f" the floor's rate, x{warm.cpu_us / floor.cpu_us:4.1f} its CPU")
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
        print(f"server: {out.strip()}")
        shutil.rmtree(work, ignore_errors=True)
    print("\nrerun: .venv/bin/python bench/enc.py"
          f" --calls {args.calls} --nodes {args.nodes} --clients {args.clients} --seconds {args.seconds:g}"
          f" --rounds {args.rounds}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
