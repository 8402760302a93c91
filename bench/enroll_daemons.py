"""
Enrollment with more than one core: the same wave of new agents against one enrolling daemon
and against two, each a real ``twistd puppetha`` with the enroll role on one state directory
(one SQLite store, one CA vault), on its own port, as nginx's enrollment upstream spreads
them (``[lb] enroll_backends``).  Interleaved rounds; the figure is the ratio of the rates.

    .venv/bin/python -m bench.enroll_daemons [--agents 200] [--concurrency 12] [--rounds 3] \\
        [--daemons 2] [--warmup 30]

Clients speak as nginx does (PROXY protocol, then TLS); with two daemons, agent i goes to
daemon i mod 2.  Server CPU is summed over the daemons' processes.  The clients (Python
threads) run on the same CPUs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from bench.enroll import REGION, enroll_once, enrolled, request_body
from bench.vs_puppetserver_ca import agents_in_subnets
from bench.waves import Clients, Figures, Job, settle_rig, wave
from puppetha.aws.boto import Boto3Cloud
from puppetha.testing.aws import DEFAULT_ACCOUNT, FakeAWSSigner
from puppetha.testing.moto import ROLE_TAG, TEST_CREDENTIALS, Fleet, MotoServer

TWISTD = str(Path(sys.executable).parent / "twistd")
CLI = [sys.executable, "-m", "puppetha.cli"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=TEST_CREDENTIALS["aws_access_key_id"],
               AWS_SECRET_ACCESS_KEY=TEST_CREDENTIALS["aws_secret_access_key"],
               AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true")
    return env


@dataclass
class EnrollDaemon:
    process: subprocess.Popen[bytes]
    port: int


@contextmanager
def running_daemon(work: Path, name: str, state: Path, moto_url: str, trust: Path) -> Iterator[EnrollDaemon]:
    """One ``twistd puppetha`` with the enroll role on ``state``; stopped on exit."""
    port = free_port()
    config = work / f"{name}.conf"
    config.write_text(
        f"[daemon]\nroles = enroll\nstate_dir = {state}\n"
        f"[aws]\nendpoint_url = {moto_url}\naccounts = {DEFAULT_ACCOUNT}\nidentity_certs = {trust}\n"
        f"[enroll]\nlisten = tcp:{port}:interface=127.0.0.1\nproxy_from = 127.0.0.1\n"
        f"server_names = puppet\nmaster_policy = tag:{ROLE_TAG}=master\n"
    )
    log = work / f"{name}.log"
    process = subprocess.Popen(
        [TWISTD, "--nodaemon", "--pidfile=", f"--logfile={log}", "puppetha", "--config", str(config)],
        env=daemon_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if log.exists() and "puppetha started" in log.read_text():
                break
            if process.poll() is not None:
                raise SystemExit(f"daemon {name} exited:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        else:
            raise SystemExit(f"daemon {name} never started:\n{log.read_text()[-2000:]}")
        yield EnrollDaemon(process, port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


#: The cgroup v1 CPU controller's hierarchy, where this machine mounts it.
CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")
#: The period of a CPU quota: short, so that a daemon at its quota waits milliseconds, not a
#: whole 100 ms default period.
QUOTA_PERIOD_US = 10_000


@contextmanager
def cpu_share(pid: int, share: float) -> Iterator[None]:
    """
    ``pid`` (all its threads) may use ``share`` of one CPU at most, through a cgroup of its own
    (the cgroup v1 CPU controller; root only); the cgroup goes when the process has.
    """
    if not (CPU_CGROUPS / "cgroup.procs").exists() or os.geteuid() != 0:
        raise SystemExit(f"--cpu-share needs root and the cgroup v1 CPU controller at {CPU_CGROUPS}")
    group = CPU_CGROUPS / f"puppetha-bench-{pid}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text(str(QUOTA_PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(round(share * QUOTA_PERIOD_US)))
        (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        for _ in range(100):  # empty once the process has exited
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def parse_options(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--agents", type=int, default=200, help="new agents per wave (default 200)")
    parser.add_argument("--concurrency", type=int, default=12, help="agents in flight (default 12)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--daemons", type=int, default=2, help="daemons in the second setup (default 2)")
    parser.add_argument("--warmup", type=int, default=30,
                        help="agents per daemon before the clock (default 30)")
    parser.add_argument("--clients", type=int, default=1,
                        help="client processes, the agents in flight shared among them (default 1)")
    parser.add_argument("--cpu-share", type=float, default=0.0, metavar="F",
                        help="limit each daemon to F of a CPU (a cgroup's quota; root), as if each had "
                             "a small core of its own (default: no limit)")
    parser.add_argument("--unsettled-rig", action="store_true",
                        help="leave moto's and the clients' heaps to every pass of the collector")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    given = list(argv if argv is not None else sys.argv[1:])
    options = parse_options(given)
    rerun = shlex.join([".venv/bin/python", "-m", "bench.enroll_daemons", *given])
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="puppetha-daemons-")))
        moto = stack.enter_context(MotoServer())
        signer = FakeAWSSigner.create(REGION, directory=work / "aws")
        assert signer.trust_file is not None
        cloud = Boto3Cloud(moto.endpoint_url, access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
                           secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"])
        fleet = Fleet(moto.endpoint_url, REGION)
        master = fleet.launch(role="master")
        total = options.warmup * options.daemons + 2 * options.agents * options.rounds
        print(f"launching {total} instances in moto and signing their identities ...", flush=True)
        agents = agents_in_subnets(fleet, cloud, total)
        bodies = [(a.private_ip, request_body(signer, a, "agent")) for a in agents]
        if not options.unsettled_rig:
            settle_rig(moto)
        state = work / "state"
        # In turn: the others start once the first has made the root CA and the server's
        # credentials.
        trust = signer.trust_file
        daemons = []
        for n in range(options.daemons):
            # Entered before the daemon, so unwound after it: a cgroup goes once its daemon has.
            groups = stack.enter_context(ExitStack())
            daemons.append(stack.enter_context(
                running_daemon(work, f"d{n}", state, moto.endpoint_url, trust)))
            if options.cpu_share:
                groups.enter_context(cpu_share(daemons[-1].process.pid, options.cpu_share))
        root = work / "root.pem"
        root.write_text(subprocess.run([*CLI, "--config", str(work / "d0.conf"), "ca", "show", "--pem"],
                                       capture_output=True, text=True, check=True,
                                       env=daemon_environment()).stdout)
        status, _ = enroll_once(daemons[0].port, str(root), master.private_ip,
                                request_body(signer, master, "master"))
        if status != 200:
            print(f"the master could not enroll: HTTP {status}", file=sys.stderr)
            return 1

        def job(port: int, i: int) -> Job:
            # A partial of a module's function: it pickles, for client processes.
            return partial(enrolled, port, str(root), *bodies[i])

        pids = [d.process.pid for d in daemons]
        clients = Clients(options.clients)
        stack.callback(clients.close)
        print("warming up ...", flush=True)
        warm = Figures("warm-up")
        wave(warm, pids, [job(d.port, n * options.warmup + i) for n, d in enumerate(daemons)
                          for i in range(options.warmup)], options.concurrency,
                          clients=clients, aws_pids=[moto.pid])
        setups = {"1 daemon": daemons[:1], f"{options.daemons} daemons": daemons}
        figures = {name: Figures(name) for name in setups}
        next_agent = options.warmup * options.daemons
        order = list(setups)
        for round_number in range(options.rounds):
            for name in order:
                serving = setups[name]
                jobs = [job(serving[i % len(serving)].port, next_agent + i) for i in range(options.agents)]
                next_agent += options.agents
                wave(figures[name], pids, jobs, options.concurrency, clients=clients, aws_pids=[moto.pid])
                print(f"round {round_number + 1} {name}: {figures[name].rates[-1]:.1f}/s", flush=True)
            order.reverse()

    report(figures, options, load_before, rerun)
    return 0 if not any(f.failures for f in figures.values()) and not warm.failures else 1


def report(figures: dict[str, Figures], options: argparse.Namespace, load_before: str, rerun: str) -> None:
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    one, many = figures.values()
    print(f"\n{options.agents} new agents per wave, concurrency {options.concurrency}, {options.rounds} "
          f"interleaved rounds, {options.clients} client process(es); load average {load_before} before, "
          f"{load_after} after; {os.cpu_count()} CPUs")
    print("| setup | rate | p50 | p99 | CPU per certificate: servers, clients, AWS (moto) "
          "| cores busy: servers + clients + AWS | rates per round |")
    print("|---|---|---|---|---|---|---|")
    for f in figures.values():
        rates = ", ".join(f"{r:.1f}" for r in f.rates)
        print(f"| {f.name} | {f.rate:.1f}/s | {f.percentile(0.5):.0f} ms | {f.percentile(0.99):.0f} ms | "
              f"{f.cpu_per_cert_ms:.2f}, {f.client_cpu_per_cert_ms:.2f}, {f.aws_cpu_per_cert_ms:.2f} ms | "
              f"{f.cores(f.cpu):.2f} + {f.cores(f.client_cpu):.2f} + {f.cores(f.aws_cpu):.2f} | {rates} |")
    per_round = [b / a for a, b in zip(one.rates, many.rates, strict=True)]
    print(f"{many.name} / 1 daemon: x{many.rate / one.rate:.2f} overall; per round "
          + ", ".join(f"x{r:.2f}" for r in per_round) + f" (median x{statistics.median(per_round):.2f})")
    for failure in (one.failures + many.failures)[:10]:
        print(f"failed: {failure}")
    print(f"rerun: {rerun}")


if __name__ == "__main__":
    raise SystemExit(main())
