"""
What a full pass of Python's cyclic collector costs the daemon, with its heap left to the
collector and once settled (puppetha/heap.py), in the same run.

    .venv/bin/python -m bench.heap [--passes 9]

The daemon's whole service tree is built in this process from a configuration, as ``twistd
puppetha`` builds it (``make_daemon``: the store, the CA, the AWS client of its region, the
enrollment listener, the ENC), against a moto server, and runs on its reactor in a thread; a
master and ``--agents`` agents enroll with it (what they send is made before it is built; the
heap settles itself at its start, as in ``twistd``).  Then full passes (``gc.collect()``) are
timed with the heap settled, and after ``gc.unfreeze()`` with the same heap left to the
collector: each stops every thread of the daemon while it runs.  The figures are what each pass
took, p50 and max, and the objects it walked: the daemon's and this bench's own modules (the
bench's AWS clients are dropped before the daemon is built).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from twisted.internet.selectreactor import SelectReactor
from twisted.internet.threads import blockingCallFromThread

from bench.enroll import enroll_once, launch_agents, request_body
from bench.enroll_daemons import daemon_environment, free_port
from puppetha.aws.boto import Boto3Cloud
from puppetha.config import Config, config_from_string
from puppetha.heap import SettledHeap
from puppetha.pki.authority import ROOT
from puppetha.store.records import CARecord, Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.tap import make_daemon
from puppetha.testing.aws import DEFAULT_ACCOUNT, FakeAWSSigner
from puppetha.testing.moto import ROLE_TAG, TEST_CREDENTIALS, Fleet, MotoServer

REGION = "us-east-1"


def passes(count: int) -> list[float]:
    """Seconds each of ``count`` full passes took."""
    took = []
    for _ in range(count):
        start = time.perf_counter()
        gc.collect()
        took.append(time.perf_counter() - start)
    return took


def daemon_config(work: Path, aws_url: str, trust: Path | None, port: int) -> Config:
    """The enroll and enc roles on loopback, state in ``work``, moto as AWS."""
    (work / "state").mkdir(mode=0o700)
    return config_from_string(
        f"[daemon]\nroles = enroll, enc\nstate_dir = {work / 'state'}\n"
        f"[aws]\nendpoint_url = {aws_url}\naccounts = {DEFAULT_ACCOUNT}\nidentity_certs = {trust}\n"
        f"[enroll]\nlisten = tcp:{port}:interface=127.0.0.1\nproxy_from = 127.0.0.1\n"
        f"master_policy = tag:{ROLE_TAG}=master\n"
        f"[enc]\nsocket = {work / 'enc.sock'}\n"
    )


def enroll_all(port: int, root_pem: str, bodies: list[tuple[str, bytes]]) -> str | None:
    """The master (first), then every agent; what failed, or None."""
    # 503 until the daemon's first readiness round has seen the store and AWS answer.
    deadline = time.monotonic() + 30
    while (first := enroll_once(port, root_pem, *bodies[0])[0]) == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    if first != 200:
        return f"the master could not enroll: HTTP {first}"
    for source, body in bodies[1:]:
        status, _ = enroll_once(port, root_pem, source, body)
        if status != 200:
            return f"an enrollment failed: HTTP {status}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--passes", type=int, default=9, help="full passes timed each way (default 9)")
    parser.add_argument("--agents", type=int, default=200, help="agents enrolled first (default 200)")
    options = parser.parse_args(argv)
    if options.passes < 1 or not 1 <= options.agents <= 250:
        parser.error("--passes must be positive, --agents 1..250 (the fleet's subnet is a /24)")
    with tempfile.TemporaryDirectory(prefix="puppetha-heap-") as tmp, MotoServer() as moto:
        work = Path(tmp)
        signer = FakeAWSSigner.create(REGION, directory=work / "aws")
        cloud = Boto3Cloud(moto.endpoint_url, access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
                           secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"])
        fleet = Fleet(moto.endpoint_url, REGION)
        master = fleet.launch(role="master")
        bodies = [(master.private_ip, request_body(signer, master, "master"))]
        bodies += [(a.private_ip, request_body(signer, a, "agent"))
                   for a in launch_agents(fleet, cloud, options.agents)]
        # Only the daemon's own objects from here: the bench's AWS clients go, with their models.
        del cloud, fleet, master
        gc.collect()
        port = free_port()
        config = daemon_config(work, moto.endpoint_url, signer.trust_file, port)
        # The daemon finds its AWS credentials where twistd's would: in the environment.
        os.environ.update(daemon_environment())
        reactor = SelectReactor()
        daemon = make_daemon(config, reactor)
        heap = next(s for s in daemon if isinstance(s, SettledHeap))
        thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
        reactor.callWhenRunning(daemon.startService)
        thread.start()
        store = SQLiteStore(str(work / "state" / "puppetha.sqlite"))
        root = Records(store).get(CARecord, ROOT)
        store.close()
        assert root is not None
        (work / "root.pem").write_text(root.record.certificate_pem)
        failed = enroll_all(port, str(work / "root.pem"), bodies)
        if failed:
            print(failed, file=sys.stderr)
            return 1
        # Every thread of the daemon holds still while this one collects: the GIL is held.
        settled = heap.frozen()
        assert settled, "the daemon did not settle its heap"
        walked_settled = len(gc.get_objects())
        then = passes(options.passes)
        gc.unfreeze()
        walked_left = len(gc.get_objects())
        left = passes(options.passes)
        blockingCallFromThread(reactor, daemon.stopService)
        reactor.callFromThread(reactor.stop)
        thread.join(30)
    p50_left, p50_settled = statistics.median(left), statistics.median(then)
    print(f"the daemon (enroll, enc) in this process after {options.agents} enrollments; "
          f"{options.passes} full passes each way")
    print(f"{'':22s}{'p50 ms':>9s}{'max ms':>9s}{'objects walked':>16s}")
    print(f"{'heap left':22s}{1000 * p50_left:9.2f}{1000 * max(left):9.2f}{walked_left:16d}")
    print(f"{'heap settled':22s}{1000 * p50_settled:9.2f}{1000 * max(then):9.2f}{walked_settled:16d}")
    print(f"a full pass, settled against left, p50: x{p50_settled / p50_left:.4f} "
          f"({settled} objects settled at the start, still alive)")
    print("rerun: .venv/bin/python -m bench.heap" + "".join(f" {a}" for a in (argv or sys.argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
