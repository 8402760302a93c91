"""
Enrollment throughput: N simulated instances enroll concurrently against the enrollment site
(real TLS listener on loopback with the PROXY protocol, SQLite store, the real CA, a moto
server as AWS), beside the raw signing rate of the CA key measured in the same run.

    .venv/bin/python bench/enroll.py [--instances 60] [--concurrency 12] [--seconds 60]

Each instance's key, CSR and signed identity document are made before the clock starts; what is
timed is what the daemon does per enrollment (TLS handshake, identity verification,
DescribeInstances, claim, CSR check, signing, the store transaction) plus the client's half of
the TLS handshake.  The server and the clients share one process: peak RSS is of both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.threads import blockingCallFromThread

from bench.cpuprofile import CPUProfile
from bench.phases import Sampler
from bench.steps import StepCPU, TimedBlocking
from bench.store import delayed
from bench.timeline import CLIENT_END, CLIENT_START, Timeline
from puppetha.aws.boto import Boto3Cloud
from puppetha.aws.cloud import InstanceInfo
from puppetha.enroll.api import make_enrollment_site
from puppetha.enroll.listener import ensure_server_credentials, listen_enrollment
from puppetha.enroll.policy import EnrollmentPolicy
from puppetha.enroll.service import Enrollment
from puppetha.heap import SettledHeap
from puppetha.pki.authority import ROOT, CertificateAuthority
from puppetha.pki.keys import KeyType, load_private_key
from puppetha.pki.vault import FileKeyVault
from puppetha.store.records import Records, unb64
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.aws import DEFAULT_ACCOUNT, FakeAWSSigner
from puppetha.testing.moto import ROLE_TAG, TEST_CREDENTIALS, Fleet, MotoServer
from puppetha.threads import Blocking, make_pool

REGION = "us-east-1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: The test fleet's subnet is a /24: the master and the agents must fit in it.
MAX_INSTANCES = 240


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def raw_signing_rate(key: Any, seconds: float) -> float:
    """Signatures of 32 bytes per second with ``key`` (the CA's own key)."""
    data = os.urandom(32)
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            key.sign(data, ec.ECDSA(hashes.SHA256()))
        else:
            from cryptography.hazmat.primitives.asymmetric import padding

            key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        count += 1
    return count / (time.perf_counter() - start)


def launch_agents(fleet: Fleet, cloud: Boto3Cloud, count: int) -> list[InstanceInfo]:
    ids: list[str] = []
    while len(ids) < count:
        batch = min(100, count - len(ids))
        answer = fleet.ec2.run_instances(
            ImageId="ami-0123456789abcdef0", InstanceType="t3.micro", MinCount=batch, MaxCount=batch,
            SubnetId=fleet.subnet_id,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": ROLE_TAG, "Value": "agent"}]}],
        )
        ids += [i["InstanceId"] for i in answer["Instances"]]
    found = cloud.describe_instances(REGION, ids)
    return [found[i] for i in ids]


def request_body(signer: FakeAWSSigner, instance: InstanceInfo, role: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, instance.instance_id)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    document, signature = signer.identity_for(instance)
    return json.dumps(
        {"role": role, "document": document.decode(), "signature": signature, "csr": csr.decode()}
    ).encode()


#: TLS client contexts by CA file: made once, not per agent (loading the CA file and the
#: default settings cost the client more CPU than its half of the handshake).
_contexts: dict[str, ssl.SSLContext] = {}


def client_context(root_pem: str) -> ssl.SSLContext:
    context = _contexts.get(root_pem)
    if context is None:
        context = _contexts[root_pem] = ssl.create_default_context(cafile=root_pem)
    return context


def enroll_once(port: int, root_pem: str, source: str, body: bytes) -> tuple[int, float]:
    context = client_context(root_pem)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        raw.sendall(f"PROXY TCP4 {source} 127.0.0.1 40000 {port}\r\n".encode())
        with context.wrap_socket(raw, server_hostname="puppet") as tls:
            tls.sendall(
                (
                    "POST /v1/enroll HTTP/1.1\r\nHost: puppet:8080\r\nConnection: close\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body
            )
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, time.perf_counter() - start


def enrolled(port: int, root_pem: str, source: str, body: bytes) -> float:
    """One agent's enrollment, which must succeed; its latency (a job of :mod:`bench.waves`)."""
    code, took = enroll_once(port, root_pem, source, body)
    if code != 200:
        raise RuntimeError(f"HTTP {code}")
    return took


@dataclass
class Daemon:
    """The enrollment side of the daemon, on a private reactor in a thread."""

    reactor: SelectReactor
    thread: threading.Thread
    pool: Any
    store: SQLiteStore
    authority: CertificateAuthority
    enrollment: Enrollment
    port: IListeningPort
    root_pem: Path
    #: With ``--steps``: the CPU of each step on the pool.
    steps: StepCPU | None = None
    #: Settles what the daemon holds once started, as ``twistd puppetha`` does (puppetha/heap.py).
    heap: SettledHeap | None = None

    def threads(self) -> dict[int, str]:
        """The daemon's threads by ident: its reactor's and its pool's."""
        found = {cast(int, self.thread.ident): "reactor"}
        for worker in list(getattr(self.pool, "threads", [])):
            if worker.ident is not None:
                found[worker.ident] = "pool"
        return found

    def cpu_seconds(self) -> dict[str, float]:
        """CPU (user and system) each kind of the daemon's threads used so far, from ``/proc``."""
        found: dict[str, float] = {}
        workers = [(self.thread, "reactor")] + [(w, "pool") for w in list(getattr(self.pool, "threads", []))]
        for worker, kind in workers:
            try:
                stat = Path(f"/proc/self/task/{worker.native_id}/stat").read_text()
            except (OSError, TypeError):
                continue
            fields = stat.rsplit(")", 1)[1].split()
            found[kind] = found.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        return found

    def stop(self) -> None:
        if self.heap is not None:
            blockingCallFromThread(self.reactor, self.heap.stopService)
        blockingCallFromThread(self.reactor, self.port.stopListening)
        self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(timeout=10)
        self.pool.stop()
        self.store.close()


def start_daemon(
    directory: Path, signer: FakeAWSSigner, cloud: Boto3Cloud, key_type: KeyType, threads: int,
    *, steps: StepCPU | None = None, timeline: Timeline | None = None, describe_in_flight: int = 1,
    settle: bool = True,
) -> Daemon:
    reactor = SelectReactor()
    thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
    thread.start()
    pool = make_pool("enroll-bench", threads)
    pool.start()
    store = SQLiteStore(str(directory / "puppetha.sqlite"))
    records = Records(store)
    authority = CertificateAuthority(
        records, FileKeyVault.create(directory / "vault.key"), key_type=key_type, now=reactor.seconds,
        ca_lifetime=timedelta(days=3650), cert_lifetime=timedelta(days=365),
        crl_lifetime=timedelta(days=7),
    )
    authority.ensure_root("puppetha bench root")
    policy = EnrollmentPolicy(
        accounts=[DEFAULT_ACCOUNT], max_age=3600, front="puppet:8140",
        master_rules=(f"tag:{ROLE_TAG}=master",),
    )
    blocking = partial(TimedBlocking, steps) if steps is not None else Blocking
    enrollment = Enrollment(
        policy=policy,
        trust=signer.trust_store(),
        records=blocking(reactor, pool, records),
        authority=blocking(reactor, pool, authority),
        cloud=blocking(reactor, pool, cloud),
        clock=reactor,
        timeline=timeline,
        describe_in_flight=describe_in_flight,
    )
    credentials = ensure_server_credentials(authority, directory / "state", ["puppet"], key_type)
    root_pem = directory / "root.pem"
    root_pem.write_bytes(credentials.root.public_bytes(serialization.Encoding.PEM))
    site = make_enrollment_site(enrollment, reactor)
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")

    def listen() -> Deferred[IListeningPort]:
        return listen_enrollment(endpoint, site, credentials.tls_context(), ["127.0.0.1"], clock=reactor)

    port: IListeningPort = blockingCallFromThread(reactor, cast(Callable[[], Any], listen))
    heap = None
    if settle:
        # As the daemon's wiring does: its region's AWS client made, then the heap settled.
        cloud.prepare(REGION)
        heap = SettledHeap(reactor)
        blockingCallFromThread(reactor, heap.startService)
    return Daemon(reactor, thread, pool, store, authority, enrollment, port, root_pem, steps, heap)


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    failures: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0
    describe_calls: int = 0
    #: CPU of the daemon's threads during the wave, seconds by kind (reactor, pool).
    cpu: dict[str, float] = field(default_factory=dict)


def run_clients(
    daemon: Daemon, bodies: list[tuple[str, bytes]], concurrency: int, seconds: float,
    timeline: Timeline | None = None,
) -> Run:
    run = Run()
    number = daemon.port.getHost().port  # type: ignore[attr-defined]
    deadline = time.monotonic() + seconds
    calls_before = daemon.enrollment.batcher.calls

    def one(item: tuple[str, bytes]) -> None:
        if time.monotonic() > deadline:
            return
        if timeline is not None:
            timeline.stamp(item[0], CLIENT_START)
        code, took = enroll_once(number, str(daemon.root_pem), *item)
        if timeline is not None:
            timeline.stamp(item[0], CLIENT_END)
        if code == 200:
            run.latencies.append(took)
        else:
            run.failures[code] = run.failures.get(code, 0) + 1

    if daemon.steps is not None:
        daemon.steps.clear()  # the wave's, not the master's
    cpu_before = daemon.cpu_seconds()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as clients:
        list(clients.map(one, bodies))
    run.elapsed = time.perf_counter() - started
    run.cpu = {k: v - cpu_before.get(k, 0.0) for k, v in daemon.cpu_seconds().items()}
    run.describe_calls = daemon.enrollment.batcher.calls - calls_before
    return run


def report(
    run: Run, options: argparse.Namespace, signing: float, rerun: str,
    *, timeline: Timeline | None = None, sources: list[str] | None = None,
) -> None:
    done = len(run.latencies)
    rate = done / run.elapsed if run.elapsed else 0.0
    print(f"enrollments: {done} of {options.instances} agents in {run.elapsed:.2f}s "
          f"(concurrency {options.concurrency}, daemon threads {options.threads}, "
          f"CA keys {options.key_type})")
    if run.failures:
        print(f"refused or failed: {run.failures}")
    if done:
        print(f"throughput: {rate:.1f} enrollments/s")
        print(f"latency: p50 {percentile(run.latencies, 0.5) * 1000:.1f} ms, "
              f"p99 {percentile(run.latencies, 0.99) * 1000:.1f} ms, "
              f"max {max(run.latencies) * 1000:.1f} ms, mean {statistics.fmean(run.latencies) * 1000:.1f} ms")
    attempts = done + sum(run.failures.values())
    if attempts and run.cpu:
        each = {k: 1000 * v / attempts for k, v in sorted(run.cpu.items())}
        print(f"daemon CPU per enrollment: {sum(each.values()):.2f} ms ("
              + ", ".join(f"{k} {v:.2f}" for k, v in each.items()) + ")")
    print(f"DescribeInstances calls: {run.describe_calls} for {attempts} enrollments (batched)")
    print(f"raw signing rate of the CA key ({options.key_type}, 32 bytes, same run): "
          f"{signing:.0f} signatures/s")
    if rate:
        print(f"one enrollment costs as much as {signing / rate:.0f} raw signatures")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak RSS (server and clients, one process): {peak_kib / 1024:.1f} MiB")
    print(f"rerun: {rerun}")
    if timeline is not None:
        print("\nan enrollment's steps, segment by segment (bench/timeline.py):\n"
              + timeline.report(sources or []))


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--instances", type=int, default=60, help="agents that enroll (default 60)")
    parser.add_argument("--concurrency", type=int, default=12, help="enrollments in flight (default 12)")
    parser.add_argument("--threads", type=int, default=8, help="the daemon's thread pool (default 8)")
    parser.add_argument("--seconds", type=float, default=60.0, help="stop enrolling after this long")
    parser.add_argument("--key-type", default="ec-p256", choices=[k.value for k in KeyType],
                        help="key type of the CAs (default ec-p256)")
    parser.add_argument("--phases", action="store_true",
                        help="sample the daemon's threads and say where an enrollment's time goes")
    parser.add_argument("--cpu", action="store_true",
                        help="profile the daemon's threads' CPU by function (yappi, CPU clock)")
    parser.add_argument("--steps", action="store_true",
                        help="say how much CPU each step of an enrollment used on the pool")
    parser.add_argument("--cpu-save", metavar="FILE",
                        help="with --cpu, also save the daemon's threads' profile as a pstats file")
    parser.add_argument("--describe-in-flight", type=int, default=1, metavar="N",
                        help="DescribeInstances calls in flight per region (default 1, as the daemon)")
    parser.add_argument("--timeline", action="store_true",
                        help="stamp each enrollment's steps and print its segments (bench/timeline.py)")
    parser.add_argument("--aws-delay-ms", type=float, default=0.0, metavar="MS",
                        help="hold each of the daemon's AWS calls this long in a proxy before moto, as "
                             "a round trip to AWS would (default 0: moto on loopback)")
    parser.add_argument("--unsettled-heap", action="store_true",
                        help="leave the daemon's heap to every pass of the collector (puppetha/heap.py), "
                             "to compare")
    options = parser.parse_args(argv)
    if not 1 <= options.instances <= MAX_INSTANCES:
        parser.error(f"--instances must be 1..{MAX_INSTANCES} (the test fleet's subnet is a /24)")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    rerun = shlex.join([".venv/bin/python", "bench/enroll.py", *(argv if argv is not None else sys.argv[1:])])
    key_type = KeyType(options.key_type)

    with tempfile.TemporaryDirectory(prefix="puppetha-bench-") as tmp, MotoServer() as moto:
        signer = FakeAWSSigner.create(REGION)
        cloud = Boto3Cloud(
            moto.endpoint_url,
            access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
            secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"],
            max_pool_connections=options.threads,
        )
        fleet = Fleet(moto.endpoint_url, REGION)
        master = fleet.launch(role="master")
        agents = launch_agents(fleet, cloud, options.instances)
        steps = StepCPU() if options.steps else None
        timeline = Timeline() if options.timeline else None
        if options.aws_delay_ms > 0:
            # The daemon's calls (only its own) wait that long each way in total, as AWS's would.
            proxy = delayed(moto.endpoint_url, options.aws_delay_ms / 1000)
            cloud = Boto3Cloud(
                f"http://127.0.0.1:{proxy.server_address[1]}",
                access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
                secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"],
                max_pool_connections=options.threads,
            )
        daemon = start_daemon(Path(tmp), signer, cloud, key_type, options.threads, steps=steps,
                              timeline=timeline, describe_in_flight=options.describe_in_flight,
                              settle=not options.unsettled_heap)
        try:
            number = daemon.port.getHost().port  # type: ignore[attr-defined]
            body = request_body(signer, master, "master")
            status, _ = enroll_once(number, str(daemon.root_pem), master.private_ip, body)
            if status != 200:
                print(f"the master could not enroll: HTTP {status}", file=sys.stderr)
                return 1
            bodies = [(a.private_ip, request_body(signer, a, "agent")) for a in agents]
            with ExitStack() as sampling:
                sampler = sampling.enter_context(Sampler(daemon.threads)) if options.phases else None
                profile = sampling.enter_context(CPUProfile(daemon.threads)) if options.cpu else None
                run = run_clients(daemon, bodies, options.concurrency, options.seconds, timeline)
            sealed = unb64(daemon.authority.ca(ROOT).sealed_key)
            signing = raw_signing_rate(load_private_key(daemon.authority.vault.open(sealed, ROOT)), 2.0)
        finally:
            daemon.stop()
    report(run, options, signing, rerun, timeline=timeline, sources=[source for source, _ in bodies])
    if sampler is not None:
        print("\nwhere the daemon's threads spent the wave (bench/phases.py):")
        print(sampler.report(len(run.latencies)))
    if steps is not None:
        print("\nCPU of each step on the daemon's pool during the wave (bench/steps.py):\n"
              + steps.report(len(run.latencies)))
    if profile is not None:
        print("\nthe daemon's threads' CPU during the wave (bench/cpuprofile.py):")
        print(profile.report(len(run.latencies)))
        if options.cpu_save:
            profile.save(options.cpu_save)
    return 0 if run.latencies and not run.failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
