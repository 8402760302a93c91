"""
Debian's real puppetserver for tests, run from its jar in a temporary directory on loopback with
the files :mod:`puppetha.instance.puppetserver` writes for a master.  It takes half a minute to
start: share one per test session.  A missing puppetserver or java is an error, never a skip.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

from puppetha.instance.puppetserver import (
    PUPPETSERVER_JAR,
    MasterMaterial,
    MasterSettings,
    PuppetserverLayout,
    java_command,
    master_files,
    write_master_files,
)

JAVA = "/usr/bin/java"
PUPPET = "/usr/bin/puppet"


class PuppetserverMissing(RuntimeError):
    pass


def require_puppetserver() -> None:
    for path, package in ((PUPPETSERVER_JAR, "puppetserver"), (JAVA, "default-jre-headless"),
                          (PUPPET, "puppet-agent")):
        if not os.path.exists(path):
            raise PuppetserverMissing(f"{path} is missing (apt-get install {package})")


#: A module the tests classify nodes into: its parameter ends up in a notify resource.
TEST_MODULE = {
    "modules/puppetha_test/manifests/init.pp": (
        "class puppetha_test (String $greeting = 'hello from the default') {\n"
        "  notify { 'puppetha_test':\n"
        "    message => \"${greeting} (${trusted['certname']}, role ${role})\",\n"
        "  }\n"
        "}\n"
    ),
    "manifests/site.pp": "node default { }\n",
    "environment.conf": "modulepath = modules\n",
}


class PuppetserverUnderTest:
    """One puppetserver: :meth:`configure`, then :meth:`start`; :meth:`stop` when done."""

    def __init__(
        self,
        directory: Path,
        heap: str = "512m",
        popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
    ) -> None:
        """``popen`` starts the JVM: a rig's host passes its own, to run it in its namespace."""
        require_puppetserver()
        self.popen = popen
        self.directory = directory
        self.layout = PuppetserverLayout.under(directory)
        self.heap = heap
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "puppetserver.log"
        self.settings: MasterSettings | None = None
        self.material: MasterMaterial | None = None

    def configure(
        self,
        material: MasterMaterial,
        settings: MasterSettings,
        environment: Mapping[str, str] = TEST_MODULE,
    ) -> None:
        write_master_files(master_files(self.layout, material, settings), self.layout)
        for relative, text in environment.items():
            path = Path(self.layout.codedir) / "environments" / settings.environment / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.settings = settings
        self.material = material

    def start(self, client_certificate: str, client_key: str, timeout: float = 180.0) -> None:
        """Start and wait until the status API answers a client holding an lb certificate."""
        if self.settings is None:
            raise RuntimeError("configure() first")
        with open(self.log_path, "ab") as log:
            self.process = self.popen(
                java_command(self.layout, self.heap),
                cwd="/usr/share/puppetserver",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"puppetserver exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if self.status(client_certificate, client_key) == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"puppetserver did not answer within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.5)

    def _configured(self) -> tuple[MasterMaterial, MasterSettings]:
        if self.material is None or self.settings is None:
            raise RuntimeError("configure() first")
        return self.material, self.settings

    def context(self, client_certificate: str | None, client_key: str | None) -> ssl.SSLContext:
        material, _ = self._configured()
        context = ssl.create_default_context(cadata=material.ca_chain_pem)
        if client_certificate is not None:
            context.load_cert_chain(client_certificate, client_key)
        return context

    @property
    def url(self) -> str:
        _, settings = self._configured()
        return f"https://{settings.listen_address}:{settings.listen_port}"

    def status(self, client_certificate: str | None, client_key: str | None) -> int:
        context = self.context(client_certificate, client_key)
        context.check_hostname = False
        with urllib.request.urlopen(  # noqa: S310 -- our own https URL
            self.url + "/status/v1/simple", context=context, timeout=5
        ) as response:
            return int(response.status)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
