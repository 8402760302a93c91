"""
A real AWS endpoint for tests and the local demo: a ``moto_server`` subprocess on loopback, and
a :class:`Fleet` helper that makes instances, security groups and Elastic IPs in it.

Blocking code, meant for test fixtures and command-line tools, never for the reactor thread.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3

from puppetha.aws.boto import instance_info
from puppetha.aws.cloud import InstanceInfo
from puppetha.testing.aws import DEFAULT_ACCOUNT

#: Credentials moto accepts; they reach nothing but the local moto server.
TEST_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}

#: The tag :meth:`Fleet.launch` writes the role into.
ROLE_TAG = "puppetha:role"

DEFAULT_IMAGE = "ami-0123456789abcdef0"


#: The rig's own path on :mod:`puppetha.testing.moto_app`, beside moto's ``/moto-api/``.
SETTLE_HEAP_PATH = "/puppetha-rig/settle-heap"


class MotoServerError(RuntimeError):
    """moto_server is missing, would not start, or does not answer."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def moto_server_command(path: str | Path | None = None) -> Path:
    """``path``, by default ``moto_server`` of the running interpreter's environment, if it can run."""
    path = Path(path) if path is not None else Path(sys.executable).parent / "moto_server"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise MotoServerError(
            f"{path} not found: install moto[server] into this environment (pip install 'moto[server]')"
        )
    return path


class MotoServer:
    """
    moto's server on a free loopback port, as a subprocess: by default moto's application served
    one request at a time (:mod:`puppetha.testing.moto_app`, atomic as AWS is), or the
    ``moto_server`` named by ``command``.

    ``with MotoServer() as moto: ...`` or ``moto = MotoServer(); moto.start(); ...; moto.stop()``
    (the latter suits a session-scoped fixture).  Its output goes to ``log_path``.
    """

    def __init__(
        self,
        startup_timeout: float = 30.0,
        log_dir: str | Path | None = None,
        command: str | Path | None = None,
    ) -> None:
        self.startup_timeout = startup_timeout
        self.command = command
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path: Path | None = None

    @property
    def endpoint_url(self) -> str:
        if self._process is None:
            raise MotoServerError("moto server is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process (its CPU is AWS's side of a benchmark)."""
        if self._process is None:
            raise MotoServerError("moto server is not running")
        return self._process.pid

    def start(self) -> MotoServer:
        if self._process is not None:
            return self
        command = self._command()
        log_dir = self._log_dir or Path(tempfile.mkdtemp(prefix="puppetha-moto-"))
        # Another process may take the free port before moto binds it: try a few.
        failures = []
        for _attempt in range(3):
            self.port = _free_port()
            self.log_path = log_dir / f"moto-{self.port}.log"
            with self.log_path.open("wb") as log:
                self._process = subprocess.Popen(
                    [*command, "-H", "127.0.0.1", "-p", str(self.port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_until_up(self._process):
                return self
            failures.append(self._stop_process())
        self._process = None
        raise MotoServerError(f"moto_server would not start; last output in {self.log_path}: {failures[-1]}")

    def _command(self) -> list[str]:
        """moto's own ``moto_server`` when ``command`` names one; else moto's app, one request at a time."""
        if self.command is not None:
            return [str(moto_server_command(self.command))]
        if importlib.util.find_spec("moto.moto_server") is None:
            raise MotoServerError("moto's server is not installed: pip install 'moto[server]'")
        return [sys.executable, "-m", "puppetha.testing.moto_app"]

    def _wait_until_up(self, process: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/moto-api/data.json", timeout=1
                ) as answer:
                    if answer.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def _stop_process(self) -> str:
        process, self._process = self._process, None
        if process is None:
            return ""
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        tail = self.log_path.read_bytes()[-400:] if self.log_path and self.log_path.exists() else b""
        return " ".join(tail.decode("utf-8", "replace").split())

    def reset(self) -> None:
        """Forget everything (every service, every region)."""
        url = f"{self.endpoint_url}/moto-api/reset"
        request = urllib.request.Request(url, method="POST")  # noqa: S310 - loopback http
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
            if answer.status != 200:
                raise MotoServerError(f"moto reset answered {answer.status}")

    def settle_heap(self) -> int:
        """
        Moves what moto holds now out of its collector's passes (``moto_app``'s
        ``/puppetha-rig/settle-heap``); how many objects that was.  For a benchmark, once its
        fleet is launched.
        """
        request = urllib.request.Request(f"{self.endpoint_url}{SETTLE_HEAP_PATH}", method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 - loopback
            return int(json.loads(answer.read())["settled"])

    def stop(self) -> None:
        self._stop_process()

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


@functools.cache
def client(service: str, endpoint_url: str, region: str) -> Any:
    """
    A boto3 client of ``service`` on the moto server, with test credentials.  Cached: making one
    loads the service's model, which costs more than most calls, and clients are thread-safe.
    """
    session = boto3.session.Session(
        aws_access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
        aws_secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"],
        region_name=region,
    )
    return session.client(
        service,  # type: ignore[call-overload]
        endpoint_url=endpoint_url,
    )


class Fleet:
    """
    Instances in one region of a moto server: one VPC and subnet made on first use, security
    groups made by name as needed, instance profiles made in moto's IAM as needed.
    """

    def __init__(self, endpoint_url: str, region: str = "us-east-1", cidr: str = "10.20.0.0/16") -> None:
        self.endpoint_url = endpoint_url
        self.region = region
        self.cidr = cidr
        self.ec2 = client("ec2", endpoint_url, region)
        self.iam = client("iam", endpoint_url, region)
        self._network_ids: tuple[str, str] | None = None
        self._groups: dict[str, str] = {}

    @property
    def vpc_id(self) -> str:
        return self._network()[0]

    @property
    def subnet_id(self) -> str:
        return self._network()[1]

    def _network(self) -> tuple[str, str]:
        if self._network_ids is None:
            vpc_id = str(self.ec2.create_vpc(CidrBlock=self.cidr)["Vpc"]["VpcId"])
            subnet_cidr = self.cidr.rsplit(".", 2)[0] + ".1.0/24"
            subnet = self.ec2.create_subnet(VpcId=vpc_id, CidrBlock=subnet_cidr)["Subnet"]
            self._network_ids = (vpc_id, str(subnet["SubnetId"]))
        return self._network_ids

    def security_group(self, name: str) -> str:
        """The id of the security group ``name`` in the fleet's VPC, made if needed."""
        if name not in self._groups:
            self._groups[name] = self.ec2.create_security_group(
                GroupName=name, Description=f"puppetha test group {name}", VpcId=self.vpc_id
            )["GroupId"]
        return self._groups[name]

    def instance_profile(self, name_or_arn: str) -> str:
        """The ARN of an instance profile, made in moto's IAM if it does not exist."""
        name = name_or_arn.rsplit("/", 1)[-1]
        try:
            return str(self.iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Arn"])
        except self.iam.exceptions.NoSuchEntityException:
            return str(self.iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Arn"])

    def launch(
        self,
        role: str | None = "agent",
        *,
        tags: Mapping[str, str] | None = None,
        security_groups: Iterable[str] = (),
        instance_profile_arn: str | None = None,
        image_id: str = DEFAULT_IMAGE,
        instance_type: str = "t3.micro",
    ) -> InstanceInfo:
        """
        Runs one instance; ``role`` goes into the ``puppetha:role`` tag (None: no such tag),
        ``security_groups`` are names, ``instance_profile_arn`` an ARN or a profile name.
        """
        all_tags = dict(tags or {})
        if role is not None:
            all_tags.setdefault(ROLE_TAG, role)
        arguments: dict[str, Any] = {
            "ImageId": image_id,
            "InstanceType": instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "SubnetId": self.subnet_id,
            "SecurityGroupIds": [self.security_group(name) for name in security_groups],
        }
        if all_tags:
            arguments["TagSpecifications"] = [
                {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in all_tags.items()]}
            ]
        if instance_profile_arn:
            arguments["IamInstanceProfile"] = {"Arn": self.instance_profile(instance_profile_arn)}
        reservation = self.ec2.run_instances(**arguments)
        return self.describe(reservation["Instances"][0]["InstanceId"])

    def describe(self, instance_id: str) -> InstanceInfo:
        answer = self.ec2.describe_instances(InstanceIds=[instance_id])
        reservation = answer["Reservations"][0]
        return instance_info(
            reservation["Instances"][0], reservation.get("OwnerId", DEFAULT_ACCOUNT), self.region
        )

    def stop(self, instance_id: str) -> None:
        self.ec2.stop_instances(InstanceIds=[instance_id])

    def start(self, instance_id: str) -> None:
        self.ec2.start_instances(InstanceIds=[instance_id])

    def terminate(self, *instance_ids: str) -> None:
        self.ec2.terminate_instances(InstanceIds=list(instance_ids))

    def allocate_address(self) -> str:
        """A new Elastic IP in the VPC; returns its allocation id."""
        return str(self.ec2.allocate_address(Domain="vpc")["AllocationId"])

    def public_ip(self, allocation_id: str) -> str:
        return str(self.ec2.describe_addresses(AllocationIds=[allocation_id])["Addresses"][0]["PublicIp"])

    def create_launch_template(
        self, name: str, image_id: str = DEFAULT_IMAGE, instance_type: str = "t3.micro", role: str = "master"
    ) -> str:
        """A launch template whose instances carry the ``puppetha:role`` tag; returns its id."""
        template = self.ec2.create_launch_template(
            LaunchTemplateName=name,
            LaunchTemplateData={
                "ImageId": image_id,
                "InstanceType": instance_type,
                "TagSpecifications": [
                    {"ResourceType": "instance", "Tags": [{"Key": ROLE_TAG, "Value": role}]}
                ],
            },
        )
        return str(template["LaunchTemplate"]["LaunchTemplateId"])
