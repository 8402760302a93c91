"""The README's main job: the demo fleet enrolls and is classified, end to end, with real parts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml


def test_the_demo_fleet_enrolls_and_is_classified(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "puppetha.demo", "--exit", "--state-dir", str(state)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    listed = out.split("Issued (puppetha node list):\n")[1].split("\n\n")[0].splitlines()
    roles = sorted(line.split()[1] for line in listed[1:])
    assert roles == ["agent", "agent", "agent", "master"]
    assert "already-enrolled" in out  # the replay
    # Every agent wrote a ready ssldir, its private key for its eyes only.
    keys = list((state / "hosts").glob("*/ssl/private_keys/*.pem"))
    assert len(keys) == 4
    assert {k.stat().st_mode & 0o777 for k in keys} == {0o600}
    # The ENC answers merge default, security group and tag classifications.
    answers = [yaml.safe_load("\n".join(line[5:] for line in part.split(":\n", 1)[1].split("\n\n")[0]
                                        .splitlines()))
               for part in out.split("   puppetha-enc ")[1:]]
    assert set(answers[0]["classes"]) == {"ntp", "nginx"}
    assert answers[0]["classes"]["nginx"] == {"worker_processes": 4}
    assert set(answers[1]["classes"]) == {"ntp", "postgresql"}
    assert {a["environment"] for a in answers} == {"production"}
    # The demo cleaned up after itself: the daemon stopped and its socket is gone.
    assert not (state / "enc.sock").exists()
