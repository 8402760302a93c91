"""
The Debian package, built once per test session by ``scripts/build-deb`` and shared by every
test that installs it (``tests/test_deb.py``, ``tests/test_deployment_guide.py``): the build is
most of their time.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: What the package's tests need on this machine besides the build's own dependencies.
TOOLS = {"/usr/bin/unshare": "util-linux", "/usr/bin/nsenter": "util-linux", "/usr/bin/apt-get": "apt",
         "/usr/sbin/runuser": "util-linux"}
#: The build, as docs/debian.md and docs/deployment.md give it (the output directory appended).
BUILD_COMMAND = "scripts/build-deb"


@pytest.fixture(scope="session")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package, built from this checkout by ``scripts/build-deb`` (its build deps with apt)."""
    if os.geteuid() != 0:
        raise RuntimeError("the package tests install with apt into a mount namespace: run them as root")
    for path, package in TOOLS.items():
        if not os.path.exists(path):
            raise RuntimeError(f"{path} is missing (apt-get install {package})")
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([str(ROOT / BUILD_COMMAND), str(out)], capture_output=True, text=True,
                          timeout=1800, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (deb,) = out.glob("puppetha_*.deb")
    return deb
