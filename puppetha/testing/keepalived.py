"""
The failover operators run today, in a rig host: Debian's keepalived with unicast VRRP peers and
a notify script that moves the Elastic IP with the AWS CLI, the usual AWS setup (every node
``state BACKUP`` with ``nopreempt``, so a node that comes back does not take the address back).

Each node logs its VRRP state changes with the time (``$EPOCHREALTIME`` in the notify script,
read back on the monotonic clock), so a benchmark can tell when each node acted as primary.
Blocking code, for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from attrs import frozen

from puppetha.testing.moto import TEST_CREDENTIALS
from puppetha.testing.netns import Host

KEEPALIVED = "/usr/sbin/keepalived"
#: Debian's AWS CLI (not whatever ``aws`` comes first on the PATH).
AWS_CLI = "/usr/bin/aws"

MASTER = "MASTER"


class KeepalivedMissing(RuntimeError):
    pass


def require_keepalived() -> None:
    for path, package in ((KEEPALIVED, "keepalived"), (AWS_CLI, "awscli")):
        if not os.access(path, os.X_OK):
            raise KeepalivedMissing(f"{path} is not installed (apt-get install {package})")


@frozen
class StateChange:
    at: float  # time.monotonic() of the notify script's start
    state: str  # MASTER, BACKUP, FAULT, STOP


_CONFIG = """\
global_defs {{
  router_id {name}
  script_user root
  enable_script_security
  vrrp_notify_fifo {fifo}
  vrrp_notify_fifo_script {notify}
}}
vrrp_instance puppet_front {{
  state BACKUP
  nopreempt
  interface eth0
  virtual_router_id {router_id}
  priority {priority}
  advert_int {advert_int}
  unicast_src_ip {address}
  unicast_peer {{
{peers}
  }}
}}
"""

# keepalived starts one reader and writes each state change to the FIFO, in the order it made
# them ('INSTANCE "puppet_front" MASTER 100').  A plain ``notify`` script is forked once per
# change, so two changes a millisecond apart (MASTER, then BACKUP on hearing a peer's advert:
# both nodes' first timeouts fall together when they start together) race, and the states log
# could end with MASTER on a node that is BACKUP.
_NOTIFY = """\
#!/bin/bash
# keepalived calls: notify_fifo_script FIFO
while read -r _kind _name state _priority; do
  # The FIFO also carries events that are not states (MASTER_RX_LOWER_PRI: a master heard a
  # lower priority's advert); the record keeps the states alone, as a notify script saw them.
  case "$state" in MASTER|BACKUP|FAULT|STOP) ;; *) continue ;; esac
  echo "$EPOCHREALTIME $state" >> {states}
  if [ "$state" = {master} ]; then
    AWS_ACCESS_KEY_ID={key} AWS_SECRET_ACCESS_KEY={secret} AWS_DEFAULT_REGION={region} \\
    AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_PAGER= \\
      {aws} ec2 associate-address --endpoint-url {endpoint} \\
        --allocation-id {allocation_id} --instance-id {instance_id} --allow-reassociation >> {aws_log} 2>&1 &
  fi
done < "${{@: -1}}"
"""


class KeepalivedNode:
    """keepalived on ``host``, peering with ``peers``, moving ``allocation_id`` to ``instance_id``."""

    def __init__(
        self,
        host: Host,
        peers: Sequence[Host],
        *,
        instance_id: str,
        allocation_id: str,
        endpoint_url: str,
        region: str,
        workdir: str | Path,
        priority: int = 100,
        advert_int: float = 1.0,
        router_id: int = 51,
    ) -> None:
        self.host = host
        self.peers = list(peers)
        self.instance_id = instance_id
        self.allocation_id = allocation_id
        self.endpoint_url = endpoint_url
        self.region = region
        self.priority = priority
        self.advert_int = advert_int
        self.router_id = router_id
        self.dir = Path(workdir) / f"keepalived-{host.name}"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.states_path = self.dir / "states.log"
        self.aws_log = self.dir / "aws.log"
        self.log_path = self.dir / "keepalived.log"
        self._process: subprocess.Popen[bytes] | None = None
        # $EPOCHREALTIME is wall-clock time: the offset reads it back on the monotonic clock.
        self._wall_minus_monotonic = time.time() - time.monotonic()

    def _write_files(self) -> Path:
        notify = self.dir / "notify.sh"
        notify.write_text(
            _NOTIFY.format(
                states=self.states_path,
                master=MASTER,
                key=TEST_CREDENTIALS["aws_access_key_id"],
                secret=TEST_CREDENTIALS["aws_secret_access_key"],
                region=self.region,
                aws=AWS_CLI,
                endpoint=self.endpoint_url,
                allocation_id=self.allocation_id,
                instance_id=self.instance_id,
                aws_log=self.aws_log,
            )
        )
        notify.chmod(0o700)
        config = self.dir / "keepalived.conf"
        config.write_text(
            _CONFIG.format(
                name=self.host.name,
                router_id=self.router_id,
                priority=self.priority,
                advert_int=self.advert_int,
                address=self.host.address,
                peers="\n".join(f"    {peer.address}" for peer in self.peers),
                notify=notify,
                fifo=self.dir / "notify.fifo",
            )
        )
        return config

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> KeepalivedNode:
        require_keepalived()
        if self._process is not None:
            # Still stopping (see stop(wait=False)): the new one starts once the old one is gone.
            try:
                self._process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
            self._process = None
        config = self._write_files()
        with self.log_path.open("ab") as log:
            self._process = self.host.popen(
                [
                    KEEPALIVED,
                    "--dont-fork",
                    "--log-console",
                    "--log-detail",
                    "--no-syslog",
                    "--vrrp",
                    f"--use-file={config}",
                    f"--pid={self.dir / 'keepalived.pid'}",
                    f"--vrrp_pid={self.dir / 'vrrp.pid'}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def _vrrp_pid(self) -> int | None:
        try:
            return int((self.dir / "vrrp.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, timeout: float = 10.0, wait: bool = True) -> None:
        """
        A graceful stop: keepalived tells its peers (priority 0) and they take over at once.
        ``wait=False`` only sends the signal.
        """
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            if not wait:
                return
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._process = None

    def kill(self) -> None:
        """``kill -9``: the VRRP process first, so it cannot see its parent die and say goodbye."""
        vrrp = self._vrrp_pid()
        if vrrp is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(vrrp, signal.SIGKILL)
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def states(self) -> list[StateChange]:
        """Every state change so far, in order, on the monotonic clock."""
        try:
            lines = self.states_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        changes = []
        for line in lines:
            wall, _, state = line.partition(" ")
            changes.append(StateChange(float(wall) - self._wall_minus_monotonic, state.strip()))
        return changes

    def state(self) -> str | None:
        changes = self.states()
        return changes[-1].state if changes else None

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
