"""
New agents enrolling with puppetha, side by side with puppetserver's own CA, and the floor.

    .venv/bin/python -m bench.vs_puppetserver_ca [--agents 200] [--concurrency 12] [--rounds 3]

(from the repository's top directory).  Three peers, each a server process of its own on
loopback, get the same wave of ``--agents`` new agents (P-256 keys) at ``--concurrency``, in
interleaved rounds:

- **puppetserver**: Debian's puppetserver from its jar in a temporary directory, with its own
  CA and ``autosign = true``, driven over its CA API as a new agent drives it: on one TLS
  connection, PUT the CSR, GET the certificate, GET the CRL.
- **puppetha**: the enrollment service on its real listener (PROXY protocol, TLS, the Site),
  the daemon's parts wired as ``bench/enroll.py`` wires them (SQLite store, the CA, a moto
  server as AWS), in a process of its own: one POST per agent with its signed identity.
- **floor**: in the puppetha process, a second listener built the same way (PROXY wrapper, the
  same P-256 TLS options, the same Site with a resource that answers at once): one TLS
  handshake and one small POST.  No enrollment can be cheaper on this stack.

Everything an agent sends (keys, CSRs, signed identity documents) is made before the clock
starts.  Server CPU is read from ``/proc/<pid>/stat`` of each server process around each wave;
peak RSS is the process's ``VmHWM``.  The clients share the machine with the servers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import blockingCallFromThread
from twisted.web.resource import Resource
from twisted.web.server import Request

from bench.enroll import MAX_INSTANCES, REGION, enroll_once, request_body, start_daemon
from bench.waves import Figures, peak_rss_mib, settle_rig, wave
from puppetha.aws.boto import Boto3Cloud
from puppetha.aws.cloud import InstanceInfo
from puppetha.aws.identity import TrustStore
from puppetha.enroll.api import make_enrollment_site
from puppetha.enroll.listener import ensure_server_credentials, listen_enrollment
from puppetha.instance.puppetserver import JRUBY_LIB, PUPPETSERVER_JAR, RUBY_LOAD_PATH, VENDORED_GEMS
from puppetha.pki.keys import KeyType
from puppetha.testing.aws import FakeAWSSigner
from puppetha.testing.moto import ROLE_TAG, TEST_CREDENTIALS, Fleet, MotoServer
from puppetha.testing.nginx import free_port

JAVA = "/usr/bin/java"
DEBIAN_PUPPETSERVER = Path("/etc/puppet/puppetserver")
SERVER_NAME = "localhost"


# -- measuring a server process ---------------------------------------------------------------


# -- puppetserver with its own CA ---------------------------------------------------------------


def puppetserver_files(root: Path, port: int) -> dict[Path, str]:
    """A puppetserver with Debian's services (its CA included) and autosign, below ``root``."""
    q = json.dumps
    files = {
        root / "conf.d/puppetserver.conf": (
            "jruby-puppet: {\n"
            f"    ruby-load-path: [{q(RUBY_LOAD_PATH)}]\n"
            f"    gem-home: {q(str(root / 'gems'))}\n"
            f"    gem-path: [{q(str(root / 'gems'))}, {q(VENDORED_GEMS)}]\n"
            f"    server-conf-dir: {q(str(root / 'confdir'))}\n"
            f"    server-code-dir: {q(str(root / 'code'))}\n"
            f"    server-var-dir: {q(str(root / 'var'))}\n"
            f"    server-run-dir: {q(str(root / 'run'))}\n"
            f"    server-log-dir: {q(str(root / 'log'))}\n"
            "    max-active-instances: 1\n"
            "}\n"
            "http-client: {}\n"
            "profiler: { enabled: false }\n"
        ),
        root / "conf.d/global.conf": (
            f"global: {{ logging-config: {q(str(root / 'logback.xml'))} }}\n"
            "product: { check-for-updates: false }\n"
        ),
        # No ssl-* settings: puppetserver then serves its CA's own certificate for certname.
        root / "conf.d/webserver.conf": (
            f"webserver: {{\n    ssl-host: 127.0.0.1\n    ssl-port: {port}\n    client-auth: want\n}}\n"
        ),
        root / "conf.d/metrics.conf": f"metrics: {{ server-id: {q(SERVER_NAME)} }}\n",
        root / "logback.xml": (
            '<configuration scan="false">\n'
            '  <appender name="console" class="ch.qos.logback.core.ConsoleAppender">\n'
            "    <encoder><pattern>%d %-5p [%c{2}] %m%n</pattern></encoder>\n"
            "  </appender>\n"
            '  <root level="WARN"><appender-ref ref="console"/></root>\n'
            "</configuration>\n"
        ),
        root / "confdir/puppet.conf": (
            "[main]\n"
            f"certname = {SERVER_NAME}\n"
            f"ssldir = {root / 'ssl'}\n"
            "[server]\n"
            f"vardir = {root / 'var'}\n"
            f"codedir = {root / 'code'}\n"
            f"cadir = {root / 'ca'}\n"
            "autosign = true\n"
        ),
    }
    for name in ("auth.conf", "web-routes.conf", "ca.conf"):
        files[root / "conf.d" / name] = (DEBIAN_PUPPETSERVER / "conf.d" / name).read_text()
    for name in ("bootstrap.cfg", "ca.cfg"):
        files[root / "services.d" / name] = (DEBIAN_PUPPETSERVER / "services.d" / name).read_text()
    return files


@dataclass
class Puppetserver:
    process: subprocess.Popen[bytes]
    port: int
    ca_pem: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def insecure_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A GET that trusts any certificate: only for the CA's own certificate, as agents do."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url, context=context, timeout=timeout) as answer:  # noqa: S310
        return int(answer.status), answer.read()


@contextmanager
def running_puppetserver(root: Path, heap: str, timeout: float = 240.0) -> Iterator[Puppetserver]:
    for path in (PUPPETSERVER_JAR, JAVA, DEBIAN_PUPPETSERVER / "services.d/ca.cfg"):
        if not Path(path).exists():
            raise SystemExit(f"{path} is missing (apt-get install puppetserver)")
    port = free_port()
    for path, text in puppetserver_files(root, port).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for name in ("var", "run", "log", "gems", "code/environments/production"):
        (root / name).mkdir(parents=True, exist_ok=True)
    log = root / "puppetserver.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [JAVA, f"-Xms{heap}", f"-Xmx{heap}",
             "-Djruby.logger.class=com.puppetlabs.jruby_utils.jruby.Slf4jLogger",
             f"-Djruby.lib={JRUBY_LIB}", "-XX:+CrashOnOutOfMemoryError", "-jar", PUPPETSERVER_JAR,
             "--config", str(root / "conf.d"), "--bootstrap-config", str(root / "services.d")],
            cwd="/usr/share/puppetserver", stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise SystemExit(f"puppetserver exited with {process.returncode}; see {log}")
            try:
                status, ca = insecure_get(f"https://127.0.0.1:{port}/puppet-ca/v1/certificate/ca")
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"puppetserver did not answer within {timeout:.0f}s; see {log}")
            time.sleep(0.5)
        yield Puppetserver(process, port, ca.decode("ascii"), log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def new_csr(certname: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, certname)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def puppet_agent_enrolls(server: Puppetserver, certname: str, csr: bytes) -> float:
    """What a new agent asks of the CA, on one connection; the time taken, or an error."""
    start = time.perf_counter()
    context = ssl.create_default_context(cadata=server.ca_pem)
    conn = http.client.HTTPSConnection(SERVER_NAME, server.port, context=context, timeout=60)
    try:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        conn.sock = context.wrap_socket(raw, server_hostname=SERVER_NAME)
        steps = (
            ("PUT", f"/puppet-ca/v1/certificate_request/{certname}?environment=production", csr),
            ("GET", f"/puppet-ca/v1/certificate/{certname}?environment=production", None),
            ("GET", "/puppet-ca/v1/certificate_revocation_list/ca?environment=production", None),
        )
        answers = []
        for method, path, body in steps:
            headers = {"Content-Type": "text/plain", "Accept": "text/plain"}
            conn.request(method, path, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
            if answer.status != 200:
                raise RuntimeError(f"{method} {path}: HTTP {answer.status} {data[:200]!r}")
            answers.append(data)
    finally:
        conn.close()
    took = time.perf_counter() - start
    cert = x509.load_pem_x509_certificate(answers[1])
    if cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value != certname:
        raise RuntimeError(f"{certname}: got a certificate for {cert.subject.rfc4514_string()}")
    return took




# -- puppetha and the floor, in a server process of their own --------------------------------


class _FileTrust:
    """The AWS signing certificates from the trust file the parent wrote (a signer's stand-in)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def trust_store(self) -> TrustStore:
        return TrustStore.from_file(self.path)


class FloorResource(Resource):
    """Answers any POST at once with a small JSON body: TLS and HTTP, nothing else."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"floor": true}'


def serve_puppetha(directory: Path, moto_url: str, trust_file: Path, threads: int, settle: bool) -> None:
    """The server process: the enrollment listener and the floor's; prints where, then waits."""
    cloud = Boto3Cloud(
        moto_url, access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
        secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"], max_pool_connections=threads,
    )
    signer = cast(FakeAWSSigner, _FileTrust(trust_file))
    daemon = start_daemon(directory, signer, cloud, KeyType.EC_P256, threads, settle=settle)
    reactor = daemon.reactor
    credentials = ensure_server_credentials(
        daemon.authority, directory / "state", ["puppet"], KeyType.EC_P256)
    floor_site = make_enrollment_site(daemon.enrollment, reactor)
    floor_site.resource = FloorResource()

    def listen() -> Deferred[IListeningPort]:
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        return listen_enrollment(
            endpoint, floor_site, credentials.tls_context(), ["127.0.0.1"], clock=reactor)

    floor: IListeningPort = blockingCallFromThread(reactor, cast(Callable[[], Any], listen))
    print(json.dumps({
        "enroll_port": daemon.port.getHost().port,  # type: ignore[attr-defined]
        "floor_port": floor.getHost().port,  # type: ignore[attr-defined]
        "root_pem": str(daemon.root_pem),
    }), flush=True)
    sys.stdin.read()  # until the parent closes it
    blockingCallFromThread(reactor, floor.stopListening)
    daemon.stop()


@dataclass
class PuppethaServer:
    process: subprocess.Popen[str]
    enroll_port: int
    floor_port: int
    root_pem: str

    @property
    def pid(self) -> int:
        return self.process.pid


@contextmanager
def running_puppetha(
    directory: Path, moto_url: str, trust_file: Path, threads: int, settle: bool = True
) -> Iterator[PuppethaServer]:
    top = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.vs_puppetserver_ca", "--serve", str(directory), moto_url,
         str(trust_file), str(threads), "settle" if settle else "unsettled"],
        cwd=top, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise SystemExit(f"the puppetha server process exited with {process.wait()}")
        where = json.loads(line)
        yield PuppethaServer(process, where["enroll_port"], where["floor_port"], where["root_pem"])
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()


# -- waves and figures ----------------------------------------------------------------------


def launch_agents(fleet: Fleet, cloud: Boto3Cloud, count: int, subnet_id: str) -> list[InstanceInfo]:
    ids: list[str] = []
    while len(ids) < count:
        batch = min(100, count - len(ids))
        answer = fleet.ec2.run_instances(
            ImageId="ami-0123456789abcdef0", InstanceType="t3.micro", MinCount=batch, MaxCount=batch,
            SubnetId=subnet_id,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": ROLE_TAG, "Value": "agent"}]}],
        )
        ids += [i["InstanceId"] for i in answer["Instances"]]
    found: dict[str, InstanceInfo] = {}
    for start in range(0, len(ids), 100):
        found.update(cloud.describe_instances(REGION, ids[start : start + 100]))
    return [found[i] for i in ids]


def agents_in_subnets(fleet: Fleet, cloud: Boto3Cloud, count: int) -> list[InstanceInfo]:
    """``count`` agents, in as many /24 subnets of the fleet's VPC as they need."""
    agents: list[InstanceInfo] = []
    number = 2
    while len(agents) < count:
        cidr = fleet.cidr.rsplit(".", 2)[0] + f".{number}.0/24"
        subnet = fleet.ec2.create_subnet(VpcId=fleet.vpc_id, CidrBlock=cidr)["Subnet"]["SubnetId"]
        agents += launch_agents(fleet, cloud, min(MAX_INSTANCES, count - len(agents)), subnet)
        number += 1
    return agents


def ratio(value: float, base: float) -> str:
    return f"x{value / base:.2f}" if base else "x-"


def report(peers: dict[str, Figures], options: argparse.Namespace, rerun: str) -> None:
    ps, ha, floor = peers["puppetserver"], peers["puppetha"], peers["floor"]
    print(f"\n{options.agents} new agents per round, {options.rounds} interleaved rounds, "
          f"concurrency {options.concurrency}, P-256 agent keys; {os.cpu_count()} CPUs; "
          f"load average before: {options.load_before}")
    print(options.ca_keys)
    print(f"puppetha's heap {'left to the collector' if options.unsettled_heap else 'settled'}, "
          f"moto's and the clients' {'left to the collector' if options.unsettled_rig else 'settled'}")
    print(f"{'':14s}{'rate/s':>9s}{'p50 ms':>9s}{'p99 ms':>9s}{'CPU ms/cert':>13s}{'peak RSS MiB':>14s}"
          f"{'client ms/cert':>16s}   rates per round")
    for f in (ps, ha, floor):
        print(f"{f.name:14s}{f.rate:9.1f}{f.percentile(0.5):9.1f}{f.percentile(0.99):9.1f}"
              f"{f.cpu_per_cert_ms:13.2f}{f.peak_rss:14.0f}{f.client_cpu_per_cert_ms:16.2f}   "
              f"{', '.join(f'{r:.1f}' for r in f.rates)}")
    print("\npuppetha against puppetserver's CA (baseline):")
    print(f"  rate           {ha.rate:8.1f}/s  vs {ps.rate:8.1f}/s   {ratio(ha.rate, ps.rate)}")
    print(f"  p50            {ha.percentile(0.5):8.1f} ms vs {ps.percentile(0.5):8.1f} ms  "
          f"{ratio(ha.percentile(0.5), ps.percentile(0.5))}")
    print(f"  p99            {ha.percentile(0.99):8.1f} ms vs {ps.percentile(0.99):8.1f} ms  "
          f"{ratio(ha.percentile(0.99), ps.percentile(0.99))}")
    print(f"  CPU per cert   {ha.cpu_per_cert_ms:8.2f} ms vs {ps.cpu_per_cert_ms:8.2f} ms  "
          f"{ratio(ha.cpu_per_cert_ms, ps.cpu_per_cert_ms)}")
    print(f"  peak RSS       {ha.peak_rss:8.0f} MiB vs {ps.peak_rss:6.0f} MiB  "
          f"{ratio(ha.peak_rss, ps.peak_rss)}")
    print("puppetha against the floor (bare TLS + one POST on the same listener stack):")
    print(f"  rate           {ha.rate:8.1f}/s  vs {floor.rate:8.1f}/s   {ratio(ha.rate, floor.rate)} "
          f"(puppetha reaches {100 * ha.rate / floor.rate if floor.rate else 0:.0f} % of the floor)")
    print(f"  CPU per cert   {ha.cpu_per_cert_ms:8.2f} ms vs {floor.cpu_per_cert_ms:8.2f} ms  "
          f"{ratio(ha.cpu_per_cert_ms, floor.cpu_per_cert_ms)}")
    whole = ha.cpu_per_cert_ms + ha.client_cpu_per_cert_ms + ha.aws_cpu_per_cert_ms
    cpus = os.cpu_count() or 1
    ceiling = 1000 * cpus / whole if whole else 0.0
    print("the whole machine's CPU per puppetha enrollment:")
    print(f"  server {ha.cpu_per_cert_ms:.2f} + clients {ha.client_cpu_per_cert_ms:.2f} + AWS (moto) "
          f"{ha.aws_cpu_per_cert_ms:.2f} = {whole:.2f} ms: {cpus} CPUs could do at most {ceiling:.0f}/s, "
          f"{100 * ceiling / floor.rate if floor.rate else 0:.0f} % of the floor")
    for f in (ps, ha, floor):
        if f.failures:
            print(f"{f.name}: {len(f.failures)} agents failed, first: {f.failures[0]}")
    print(f"\nrerun: {rerun}")


Peer = tuple[int, Callable[[int], Callable[[], float]]]


def run_rounds(peers: dict[str, Peer], options: argparse.Namespace) -> dict[str, Figures]:
    """A warm-up wave for each peer, then ``options.rounds`` interleaved rounds of waves."""
    figures = {name: Figures(name) for name in peers}
    print(f"warming up: {options.warmup} agents each ...", flush=True)
    for pid, make_job in peers.values():
        wave(Figures("warm-up"), [pid], [make_job(i) for i in range(options.warmup)], options.concurrency)
    order = list(peers)
    for round_number in range(options.rounds):
        first = options.warmup + round_number * options.agents
        for name in order:
            pid, make_job = peers[name]
            jobs = [make_job(i) for i in range(first, first + options.agents)]
            wave(figures[name], [pid], jobs, options.concurrency, aws_pids=[options.aws_pid])
            print(f"round {round_number + 1} {name}: {figures[name].rates[-1]:.1f}/s", flush=True)
        order = order[1:] + order[:1]  # each peer goes first once in three rounds
    return figures


def parse_options(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--agents", type=int, default=200, help="new agents per round and peer (default 200)")
    parser.add_argument("--concurrency", type=int, default=12, help="agents in flight (default 12)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=50,
                        help="agents each peer gets before timing (default 50)")
    parser.add_argument("--threads", type=int, default=8, help="puppetha's thread pool (default 8)")
    parser.add_argument("--heap", default="512m", help="puppetserver's Java heap (default 512m)")
    parser.add_argument("--unsettled-heap", action="store_true",
                        help="leave puppetha's heap to every pass of the collector, to compare "
                             "(puppetha/heap.py)")
    parser.add_argument("--unsettled-rig", action="store_true",
                        help="leave moto's and the clients' heaps to every pass of the collector")
    parser.add_argument("--serve", nargs=5, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.agents < 1 or options.rounds < 1 or options.concurrency < 1 or options.warmup < 0:
        parser.error("--agents, --rounds and --concurrency must be positive, --warmup not negative")
    return options


def describe_key(certificate_pem: str) -> str:
    key = x509.load_pem_x509_certificate(certificate_pem.encode("ascii")).public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return f"{type(key).__name__.removesuffix('PublicKey').removeprefix('_')} {getattr(key, 'key_size', '')}"


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    if options.serve:
        directory, moto_url, trust_file, threads, settle = options.serve
        serve_puppetha(Path(directory), moto_url, Path(trust_file), int(threads), settle == "settle")
        return 0
    given = list(argv if argv is not None else sys.argv[1:])
    rerun = shlex.join([".venv/bin/python", "-m", "bench.vs_puppetserver_ca", *given])
    options.load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="puppetha-vs-ca-")))
        moto = stack.enter_context(MotoServer())
        print("starting puppetserver with its own CA (half a minute or more) ...", flush=True)
        puppetserver = stack.enter_context(running_puppetserver(work / "puppetserver", options.heap))
        signer = FakeAWSSigner.create(REGION, directory=work / "aws")
        assert signer.trust_file is not None
        cloud = Boto3Cloud(moto.endpoint_url, access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
                           secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"])
        fleet = Fleet(moto.endpoint_url, REGION)
        master = fleet.launch(role="master")
        total = options.warmup + options.agents * options.rounds
        print(f"launching {total} instances in moto and signing their identities ...", flush=True)
        agents = agents_in_subnets(fleet, cloud, total)
        bodies = [(a.private_ip, request_body(signer, a, "agent")) for a in agents]
        csrs = [(f"agent{i:05d}.bench", new_csr(f"agent{i:05d}.bench")) for i in range(total)]
        (work / "puppetha").mkdir()
        puppetha = stack.enter_context(running_puppetha(work / "puppetha", moto.endpoint_url,
                                                        signer.trust_file, options.threads,
                                                        settle=not options.unsettled_heap))
        if not options.unsettled_rig:
            settle_rig(moto)

        status, _ = enroll_once(puppetha.enroll_port, puppetha.root_pem, master.private_ip,
                                request_body(signer, master, "master"))
        if status != 200:
            print(f"the master could not enroll with puppetha: HTTP {status}", file=sys.stderr)
            return 1
        floor_body = b'{"hello": "floor"}'

        def puppetserver_job(i: int) -> Callable[[], float]:
            return lambda: puppet_agent_enrolls(puppetserver, *csrs[i])

        def puppetha_job(i: int) -> Callable[[], float]:
            def job() -> float:
                code, took = enroll_once(puppetha.enroll_port, puppetha.root_pem, *bodies[i])
                if code != 200:
                    raise RuntimeError(f"HTTP {code}")
                return took
            return job

        def floor_job(i: int) -> Callable[[], float]:
            def job() -> float:
                code, took = enroll_once(puppetha.floor_port, puppetha.root_pem, "10.20.9.9", floor_body)
                if code != 200:
                    raise RuntimeError(f"HTTP {code}")
                return took
            return job

        peers: dict[str, Peer] = {
            "puppetserver": (puppetserver.pid, puppetserver_job),
            "puppetha": (puppetha.pid, puppetha_job),
            "floor": (puppetha.pid, floor_job),
        }
        options.aws_pid = moto.pid
        figures = run_rounds(peers, options)
        options.ca_keys = (f"puppetserver's CA key {describe_key(puppetserver.ca_pem)}, puppetha's "
                           f"{describe_key(Path(puppetha.root_pem).read_text())}")
        figures["puppetserver"].peak_rss = peak_rss_mib(puppetserver.pid)
        figures["puppetha"].peak_rss = figures["floor"].peak_rss = peak_rss_mib(puppetha.pid)
    report(figures, options, rerun)
    return 0 if not any(f.failures for f in figures.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
