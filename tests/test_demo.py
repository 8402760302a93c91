"""
The README's main job, end to end with real parts: the demo fleet enrolls and is classified, and
the primary lb node is killed and the Elastic IP moves to the standby.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml


def cluster(status: str) -> tuple[str, int, str, dict[str, str]]:
    """The primary, its token, the Elastic IP's owner per AWS and each lb node's state, from text."""
    primary = re.search(r"^ *primary: (i-[0-9a-f]+) \(token (\d+),", status, re.MULTILINE)
    owner = re.search(r"^ *elastic ip: eipalloc-[0-9a-f]+ on (i-[0-9a-f]+)$", status, re.MULTILINE)
    assert primary is not None, status
    assert owner is not None, status
    states = dict(re.findall(r"^ *(i-[0-9a-f]+)  127\.0\.0\.1:\d+  (\w+)  token", status, re.MULTILINE))
    return primary[1], int(primary[2]), owner[1], states


def test_the_demo_fleet_enrolls_is_classified_and_fails_over(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "puppetha.demo", "--exit", "--state-dir", str(state)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    listed = out.split("Issued (puppetha node list):\n")[1].split("\n\n")[0].splitlines()
    roles = sorted(line.split()[1] for line in listed[1:])
    assert roles == ["agent", "agent", "agent", "master"]
    assert "already-enrolled" in out  # the replay
    # Every host (those four and the two lb nodes) wrote a ready ssldir, its private key for its
    # eyes only.
    keys = list((state / "hosts").glob("*/ssl/private_keys/*.pem"))
    assert len(keys) == 6
    assert {k.stat().st_mode & 0o777 for k in keys} == {0o600}
    # The ENC answers merge default, security group and tag classifications.
    answers = [yaml.safe_load("\n".join(line[5:] for line in part.split(":\n", 1)[1].split("\n\n")[0]
                                        .splitlines()))
               for part in out.split("   puppetha-enc ")[1:]]
    assert set(answers[0]["classes"]) == {"ntp", "nginx"}
    assert answers[0]["classes"]["nginx"] == {"worker_processes": 4}
    assert set(answers[1]["classes"]) == {"ntp", "postgresql"}
    assert {a["environment"] for a in answers} == {"production"}

    # Failover: before, one lb node holds the lease and (per AWS) the Elastic IP, the other stands
    # by; after kill -9 of the primary, the standby holds both under a newer token.
    before = out.split("puppetha status (before):\n")[1].split("\n\n")[0]
    after = out.split("puppetha status (after")[1].split(":\n", 1)[1].split("\n\n")[0]
    old, old_token, old_owner, old_states = cluster(before)
    new, new_token, new_owner, new_states = cluster(after)
    assert old_owner == old
    assert old_states == {old: "primary", new: "standby"}
    assert f"kill -9 the primary ({old})" in out
    assert new_owner == new != old
    assert new_token > old_token
    assert new_states[new] == "primary"
    # Checked from both nodes' acting logs: never two primaries, no stale AssociateAddress.
    assert "0 with two primaries at once, 0 AssociateAddress outside its token's window." in out
    # The new primary's nginx serves the fleet's CA to an agent that trusts only the root.
    assert re.search(r"GET /puppet-ca/v1/certificate/ca -> 200, [1-9]\d* CA certificate", out), out

    # [scale] on: with its one master down (no puppetserver), the primary launched one from the
    # launch template, and status shows why.
    assert re.search(r"the primary launched i-[0-9a-f]+ from puppet-master under token \d+ "
                     r"\(0 masters, fewer than min_masters 1\)", out), out
    assert re.search(r"^ *scaling: on\n(.*\n)* *\d+s ago  i-[0-9a-f]+  token \d+  launch 1: 0 masters, "
                     r"fewer than min_masters 1$", after, re.MULTILINE), after

    # The demo cleaned up after itself: the daemons stopped and the ENC socket is gone.
    assert not (state / "enc.sock").exists()
    for node in (old, new):
        assert not (state / "lb" / node / "enc.sock").exists()
