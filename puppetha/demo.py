"""
The local demo fleet: the whole enrollment story on one box.

A moto server plays AWS (EC2), a test key plays AWS's identity-document signer, an IMDSv2
emulator plays each instance's metadata service, and the real daemon runs on its embedded
defaults with only what the demo needs set on the command line.  One master and three agents
then enroll with the real ``puppetha-enroll``, a classification is stored with
``puppetha classify``, and the ENC is asked for an agent with the real ``puppetha-enc``.
Then two lb nodes enroll and run (each a ``twistd puppetha`` with the lb role and its own real
nginx, on loopback), the primary is killed with ``kill -9``, and the Elastic IP moves to the
standby as moto says, with ``puppetha status`` before and after.  The lb nodes run with
``[scale]`` on: the master runs no puppetserver, so once its (short) warm-up is over the
primary finds no healthy master and launches one from a launch template in moto
(``[scale] min_masters``), which ``puppetha status`` shows with its reason.

Run it with ``./scripts/demo`` (or ``python -m puppetha.demo``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from puppetha.aws.cloud import InstanceInfo
from puppetha.testing.acting import overlaps, read_events, stray_associations, windows
from puppetha.testing.aws import FakeAWSSigner
from puppetha.testing.imds import IMDSThread, InstanceMetadata
from puppetha.testing.lb_daemon import LbNode
from puppetha.testing.moto import Fleet, MotoServer
from puppetha.testing.nginx import NginxMissing, require_nginx

T = TypeVar("T")

BIN = Path(sys.executable).parent
ACCOUNT = "123456789012"
REGION = "us-east-1"
#: Credentials for the moto server only; it accepts any.
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": REGION}
#: The launch template the primary launches masters from (its instances are tagged as masters).
LAUNCH_TEMPLATE = "puppet-master"


class DemoError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(text: str = "") -> None:
    print(text, flush=True)


def run(command: Sequence[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=120)
    if done.returncode != 0:
        raise DemoError(f"{' '.join(command[:3])} ... failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def wait_for_log(path: Path, what: str, daemon: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and what in path.read_text():
            return
        if daemon.poll() is not None:
            raise DemoError(f"the daemon stopped (status {daemon.returncode}); see {path}")
        time.sleep(0.1)
    raise DemoError(f"the daemon did not start within {seconds:.0f}s; see {path}")


class Demo:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.port = free_port()
        self.env = {**os.environ, **MOTO_ENV}
        self.imds_urls: dict[str, str] = {}
        #: The CLI's settings beyond the daemon's state directory (AWS, the Elastic IP).
        self.cli_conf = self.state / "cli.conf"
        self.lb_nodes: list[LbNode] = []

    def cli(self, *args: str) -> str:
        return run([str(BIN / "puppetha"), "--config", str(self.cli_conf), "--state-dir",
                    str(self.state / "daemon"), *args], self.env)

    def write_cli_conf(self, moto: MotoServer, allocation: str) -> None:
        self.cli_conf.write_text(f"[aws]\nendpoint_url = {moto.endpoint_url}\nregion = {REGION}\n\n"
                                 f"[ha]\nelastic_ip = {allocation}\n\n"
                                 f"[scale]\nenabled = true\nlaunch_template = {LAUNCH_TEMPLATE}\n")

    def daemon_command(self, moto: MotoServer, trust_file: Path) -> list[str]:
        settings = {
            "aws.endpoint_url": moto.endpoint_url,
            "aws.accounts": ACCOUNT,
            "aws.identity_certs": str(trust_file),
            "enroll.listen": f"tcp:{self.port}:interface=127.0.0.1",
            "enroll.server_names": "127.0.0.1, localhost",
            "enroll.front": "127.0.0.1:8140",
            "enroll.master_policy": "tag:puppetha:role=master",
            "enroll.lb_policy": "tag:puppetha:role=lb",
            # Every demo instance connects from 127.0.0.1, not from its private IP in moto's VPC.
            "enroll.require_source_match": "false",
            "enc.socket": str(self.state / "enc.sock"),
        }
        command = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile",
                   str(self.state / "daemon.log"), "puppetha", "--state-dir", str(self.state / "daemon")]
        for name, value in settings.items():
            command += ["--set", f"{name}={value}"]
        return command

    def enroll(self, imds: IMDSThread, signer: FakeAWSSigner, info: InstanceInfo, role: str, pin: str,
               *extra: str) -> Path:
        if info.instance_id not in self.imds_urls:
            document, signature = signer.identity_for(info)
            metadata = InstanceMetadata(info.instance_id, document, signature, info.private_ip,
                                        info.private_dns)
            self.imds_urls[info.instance_id] = imds.serve(metadata)
        host = self.state / "hosts" / info.instance_id
        run([str(BIN / "puppetha-enroll"), "--role", role, "--server", f"https://127.0.0.1:{self.port}",
             "--ca-fingerprint", pin, "--imds-url", self.imds_urls[info.instance_id],
             "--ssldir", str(host / "ssl"), "--puppet-conf", str(host / "puppet.conf"), *extra], self.env)
        return host

    def run(self, keep_running: bool) -> None:
        marker = self.state / ".puppetha-demo"
        if self.state.exists() and any(self.state.iterdir()) and not marker.exists():
            raise DemoError(f"{self.state} is not empty and not a previous demo's; "
                            "choose another --state-dir")
        try:
            require_nginx()  # before anything starts: the lb nodes need it
        except NginxMissing as e:
            raise DemoError(f"{e}; the lb nodes need it (./scripts/bootstrap installs it as root)") from None
        shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True, mode=0o700)
        marker.touch()
        say("puppetha demo: one box plays AWS, the daemon, one master, three agents and two lb nodes.\n")
        with MotoServer(log_dir=self.state) as moto:
            say(f"  AWS (moto server)          {moto.endpoint_url}")
            signer = FakeAWSSigner.create("us-east-1")
            trust_file = signer.write_trust_file(self.state / "aws")
            # A VPC on loopback: the lb nodes probe the master at its private address, which must
            # stay on this box.
            fleet = Fleet(moto.endpoint_url, REGION, cidr="127.20.0.0/16")
            master = fleet.launch("master", security_groups=["puppet-masters"])
            agents = [
                fleet.launch("agent", security_groups=["web"], tags={"app": "shop", "tier": "frontend"}),
                fleet.launch("agent", security_groups=["web"], tags={"app": "shop", "tier": "frontend"}),
                fleet.launch("agent", security_groups=["db"], tags={"app": "shop", "tier": "backend"}),
            ]
            lbs = [fleet.launch("lb", security_groups=["puppet-front"]) for _ in range(2)]
            allocation = fleet.allocate_address()
            self.write_cli_conf(moto, allocation)
            say(f"  instances (EC2 in moto)    master {master.instance_id}, agents "
                f"{', '.join(a.instance_id for a in agents)}")
            say(f"                             lb nodes {', '.join(lb.instance_id for lb in lbs)}; "
                f"Elastic IP {allocation} ({fleet.public_ip(allocation)})")

            log = self.state / "daemon.log"
            daemon = subprocess.Popen(self.daemon_command(moto, trust_file), env=self.env)
            try:
                wait_for_log(log, "puppetha started", daemon)
                pin = self.cli("ca", "show").split("fingerprint")[1].split()[0]
                say(f"  daemon (twistd puppetha)   enrollment API https://127.0.0.1:{self.port}, "
                    f"ENC {self.state / 'enc.sock'}")
                say(f"  root CA pin                {pin}\n")
                self.story(signer, master, agents, pin)
                self.failover(moto, fleet, signer=signer, lbs=lbs, allocation=allocation, pin=pin)
                say(f"\nEverything is under {self.state}: the daemons' logs and store, each host's ssldir.")
                if keep_running:
                    # moto takes any credentials, but boto3 wants some to sign with.
                    say("The daemon and the surviving lb node keep running; try\n"
                        f"  AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo .venv/bin/puppetha "
                        f"--config {self.cli_conf} --state-dir {self.state / 'daemon'} status\n"
                        "Ctrl-C stops it all.")
                    signal.signal(signal.SIGTERM, signal.default_int_handler)
                    try:
                        while daemon.poll() is None:
                            time.sleep(1)
                    except KeyboardInterrupt:
                        say("\nstopping")
            finally:
                for node in self.lb_nodes:
                    node.stop_all()
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(timeout=30)

    def story(self, signer: FakeAWSSigner, master: InstanceInfo, agents: list[InstanceInfo],
              pin: str) -> None:
        with IMDSThread() as imds:
            say("1. The master enrolls: it gets its own intermediate CA and a server certificate.")
            self.enroll(imds, signer, master, "master", pin)
            say("2. The agents enroll: certificates signed by the master's CA.")
            hosts = [self.enroll(imds, signer, agent, "agent", pin) for agent in agents]
            say("3. The same identity document, sent again, is refused:")
            try:
                self.enroll(imds, signer, agents[0], "agent", pin, "--force")
            except DemoError as e:
                say(f"     {e.args[0].split(': ', 1)[1]}")
        say("\nIssued (puppetha node list):")
        say(self.cli("node", "list").rstrip())
        say(f"\nWhat an agent got ({hosts[0]}):")
        for path in sorted(p for p in hosts[0].rglob("*") if p.is_file()):
            say(f"  {oct(path.stat().st_mode & 0o777)}  {path.relative_to(hosts[0])}")
        say("\n4. Classify: everyone gets ntp; security group web gets nginx; tier=backend gets postgresql.")
        self.cli("classify", "set", "default", "--class", "ntp", "--environment", "production")
        self.cli("classify", "set", "sg:web", "--class-param", "nginx.worker_processes=4")
        self.cli("classify", "set", "tag:tier=backend", "--class", "postgresql")
        for agent in (agents[0], agents[2]):
            say(f"\n   puppetha-enc {agent.instance_id}  (what puppetserver's external_nodes gets):")
            enc = [str(BIN / "puppetha-enc"), "--socket", str(self.state / "enc.sock"), agent.instance_id]
            answer = run(enc, self.env)
            say("\n".join(f"     {line}" for line in answer.rstrip().splitlines()))

    def failover(self, moto: MotoServer, fleet: Fleet, *, signer: FakeAWSSigner, lbs: list[InstanceInfo],
                 allocation: str, pin: str) -> None:
        say("\n5. Two lb nodes enroll (certificates from the lb CA) and run: each a `twistd puppetha`")
        say("   with the lb role and its own nginx, sharing the daemon's store and the Elastic IP.")
        say("   (The demo's master runs no puppetserver: the lb nodes' probes soon mark it unhealthy.)")
        say("   [scale] is on: each node samples the masters' load from its nginx's load log, and the\n"
            f"   primary launches masters from the launch template {LAUNCH_TEMPLATE} in moto.")
        fleet.create_launch_template(LAUNCH_TEMPLATE)
        with IMDSThread() as imds:
            hosts = [self.enroll(imds, signer, lb, "lb", pin) for lb in lbs]
        common = {
            "store.path": str(self.state / "daemon" / "puppetha.sqlite"),
            "pki.vault_key_file": str(self.state / "daemon" / "ca-vault.key"),
            "aws.endpoint_url": moto.endpoint_url,
            "aws.region": REGION,
            "enroll.front": "127.0.0.1:8140",
            "ha.elastic_ip": allocation,
            "scale.enabled": "true",
            "scale.launch_template": LAUNCH_TEMPLATE,
            "scale.interval": "2s",
            "scale.stale": "6s",
            # The demo's master never starts a puppetserver: after this warm-up it counts as gone,
            # and the primary launches one (a real master gets minutes to start its JRubies).
            "scale.warmup": "3s",
        }
        (self.state / "lb").mkdir()
        (self.state / "root-ca.pem").write_text(self.cli("ca", "show", "--pem"))
        for lb, host in zip(lbs, hosts, strict=True):
            ssldir = host / "ssl"
            self.lb_nodes.append(LbNode(
                lb.instance_id, lb.instance_id, self.state / "lb",
                {**common, "lb.load_socket": str(self.state / "lb" / lb.instance_id / "load.sock")},
                certificate=str(ssldir / "certs" / f"{lb.instance_id}.pem"),
                private_key=str(ssldir / "private_keys" / f"{lb.instance_id}.pem"), env=self.env))
        first, second = self.lb_nodes

        def owner() -> str | None:
            found = fleet.ec2.describe_addresses(AllocationIds=[allocation])["Addresses"][0]
            return str(found["InstanceId"]) if found.get("InstanceId") else None

        def cluster() -> dict[str, Any]:
            result: dict[str, Any] = json.loads(self.cli("status", "--json"))
            return result

        def agreed(standing: Sequence[LbNode]) -> LbNode | None:
            """
            The primary once the lease, AWS and its own report name it and every other node of
            ``standing`` reports itself a standby; else None.
            """
            found = cluster()
            states = {n["node"]: n["state"] for n in found["lb_nodes"]}
            holder = found["primary"]
            if holder is None or owner() != holder or states.get(holder) != "primary":
                return None
            if any(states.get(n.instance_id) != "standby" for n in standing if n.instance_id != holder):
                return None
            return next((n for n in self.lb_nodes if n.instance_id == holder), None)

        for node in self.lb_nodes:
            node.start()
            self.wait(node.live.exists, f"{node.name}'s first nginx configuration", node)
            node.start_nginx()
            if node is first:
                self.wait(lambda: owner() == first.instance_id, "the first lb node taking the Elastic IP",
                          first)
        # Normally the first node; on a loaded machine it may miss its lease's window once, and
        # then the second may be the one that holds it.
        primary = self.wait(lambda: agreed(self.lb_nodes), "a primary and a standby", *self.lb_nodes)
        standby = second if primary is first else first
        say(f"   {primary.instance_id} holds the lease and the Elastic IP; {standby.instance_id} stands by.")
        self.show_launch(fleet, primary)
        say("\n   puppetha status (before):")
        say(indent(self.cli("status")))

        say(f"\n6. kill -9 the primary ({primary.instance_id}); the standby takes the lease and the address:")
        killed = time.monotonic()
        primary.signal(signal.SIGKILL)
        self.wait(lambda: owner() == standby.instance_id, "the standby taking the Elastic IP", standby)
        moved = time.monotonic() - killed
        say(f"   after {moved:.1f}s AWS (moto) says {allocation} is on {standby.instance_id}.")
        # On AWS the address now leads agents to this node; on one box each node has its own port.
        status, body = self.front_get(standby, "/puppet-ca/v1/certificate/ca")
        say(f"   Its front answers an agent's CA refresh: GET /puppet-ca/v1/certificate/ca -> {status}, "
            f"{body.count('BEGIN CERTIFICATE')} CA certificate(s).")
        self.wait(lambda: agreed([]) is standby, "status showing the new primary", standby)
        say("\n   puppetha status (after; the dead node's last report still says primary, but nobody has")
        say("   heard it since, and the lease and AWS name the new primary):")
        say(indent(self.cli("status")))
        # Each node logs when it acted as primary and each AssociateAddress, with the token.
        events = read_events(first.acting_log, second.acting_log)
        acted = windows(events)
        say(f"\n   The nodes' acting logs ([ha] acting_log): {len(acted)} window(s) as primary, tokens "
            f"{', '.join(str(token) for token in sorted({token for _, token in acted}))}; "
            f"{len(overlaps(acted))} with two primaries at once, {len(stray_associations(events))} "
            "AssociateAddress outside its token's window.")

    def show_launch(self, fleet: Fleet, primary: LbNode) -> None:
        """The primary's launch of a master for want of a healthy one, as status and EC2 show it."""

        def launched() -> dict[str, Any] | None:
            status: dict[str, Any] = json.loads(self.cli("status", "--json"))
            return next((d for d in status["scaling"]["decisions"] if d["action"] == "launch"), None)

        launch = self.wait(launched, "the primary launching a master", primary)
        found = fleet.ec2.describe_instances(
            Filters=[{"Name": "tag-key", "Values": ["puppetha:launched-by-token"]}])
        ids = [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]]
        say(f"   With no healthy master, the primary launched {', '.join(ids)} from {LAUNCH_TEMPLATE} "
            f"under token {launch['token']} ({launch['reason']}); it would enroll itself as a master.")

    def front_get(self, node: LbNode, path: str) -> tuple[int, str]:
        """A request to ``node``'s nginx front as an agent makes it, trusting the fleet's root only."""
        context = ssl.create_default_context(cafile=str(self.state / "root-ca.pem"))
        url = f"https://127.0.0.1:{node.ports.front}{path}"
        try:
            with urllib.request.urlopen(url, context=context, timeout=10) as answer:
                return int(answer.status), answer.read().decode("ascii", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("ascii", "replace")
        except (OSError, ssl.SSLError) as e:
            raise DemoError(f"the front of {node.name} did not answer: {e}") from None

    def wait(self, check: Callable[[], T | None], what: str, *nodes: LbNode, seconds: float = 60) -> T:
        """The first true value of ``check``; a DemoError if a node stops or time runs out."""
        deadline = time.monotonic() + seconds
        while not (found := check()):
            for node in nodes:
                if node.process is not None and node.process.poll() is not None:
                    raise DemoError(f"{node.name} stopped (status {node.process.returncode}); "
                                    f"see {node.log}")
            if time.monotonic() > deadline:
                raise DemoError(f"{what} did not happen within {seconds:.0f}s; see "
                                f"{', '.join(str(node.log) for node in nodes)}")
            time.sleep(0.1)
        return found


def indent(text: str) -> str:
    return "\n".join(f"     {line}" for line in text.rstrip().splitlines())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="puppetha-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", default="demo-state", help="where the demo keeps everything "
                        "(emptied first; default: ./demo-state)")
    parser.add_argument("--exit", action="store_true", help="stop once the story is told")
    args = parser.parse_args(argv)
    try:
        Demo(Path(args.state_dir).resolve()).run(keep_running=not args.exit)
    except DemoError as e:
        print(f"puppetha-demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
