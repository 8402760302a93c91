"""
:class:`ICloud` over boto3.  Blocking: the reactor reaches it only through
:class:`puppetha.threads.Blocking` on a bounded pool.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.model import Shape, ShapeResolver
from botocore.parsers import ResponseParserFactory
from botocore.utils import parse_timestamp
from twisted.logger import Logger
from zope.interface import implementer

from puppetha.aws.cloud import CloudError, ICloud, InstanceInfo, SecurityGroup
from puppetha.aws.identity import REGION_NAME

log = Logger()

#: The deadline of one AWS call, retries included, unless configured (``[aws] timeout``).
DEFAULT_DEADLINE = 8.0

#: What one retry may sleep at most before the second attempt: botocore's standard mode backs
#: off at most one second (throttling) before it.
_FIRST_BACKOFF = 1.0


def within_deadline(deadline: float, **settings: Any) -> Config:
    """
    botocore's settings for calls that must end within ``deadline`` seconds, retries included:
    two attempts (one when the deadline is under two seconds), each with a connect timeout of
    at most a second and the rest of its share as the read timeout.  botocore's defaults are 60 s
    each and several attempts, so a black-holed endpoint would hold a call for minutes.
    """
    if deadline <= 0:
        raise ValueError("a deadline must be longer than zero")
    attempts = 2 if deadline >= 2 else 1
    share = (deadline - (_FIRST_BACKOFF if attempts > 1 else 0.0)) / attempts
    connect = min(1.0, share / 2)
    return Config(
        retries={"mode": "standard", "total_max_attempts": attempts},
        connect_timeout=connect,
        read_timeout=share - connect,
        **settings,
    )


def aws_timestamp(value: str) -> datetime:
    """
    A timestamp of an AWS answer.  EC2 writes ISO 8601 in UTC (``2026-11-27T16:50:28.000Z``),
    which :meth:`datetime.fromisoformat` reads directly; botocore's own parser (dateutil's
    general one) took about a tenth of a DescribeInstances call's CPU for the handful of
    timestamps each instance carries.  Anything else, or a time without a zone, goes to
    botocore's parser as before.
    """
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return parse_timestamp(value)
    if parsed.tzinfo is None:
        return parse_timestamp(value)
    return parsed


#: What :func:`instance_info` reads of a DescribeInstances answer, by the shape that holds it in
#: EC2's model: the rest of each instance (network interfaces, block devices, placement, some
#: fifty fields) is left unparsed.
DESCRIBED: Mapping[str, frozenset[str]] = {
    "DescribeInstancesResult": frozenset({"NextToken", "Reservations"}),
    "Reservation": frozenset({"OwnerId", "Instances"}),
    "Instance": frozenset({
        "InstanceId", "State", "PrivateIpAddress", "PrivateDnsName", "IamInstanceProfile",
        "SecurityGroups", "Tags", "LaunchTime",
    }),
}


class _NarrowParsers(ResponseParserFactory):
    """
    botocore's parsers, but DescribeInstances answers are read through :data:`DESCRIBED`'s
    narrower shape: botocore's generic parser walked every field of every instance, about half
    of a call's CPU, for the eight puppetha reads.  Errors are parsed as before (the shape is
    only consulted for a success), and every other operation keeps its full shape.
    """

    def __init__(self, shapes: Mapping[str, Any]) -> None:
        super().__init__()
        narrowed = dict(shapes)
        for name, keep in DESCRIBED.items():
            model = dict(shapes[name])
            model["members"] = {k: v for k, v in shapes[name]["members"].items() if k in keep}
            missing = keep - set(model["members"])
            if missing:
                raise ValueError(f"EC2's model has no {sorted(missing)} in {name}")
            narrowed[name] = model
        self._narrow = {"DescribeInstancesResult": ShapeResolver(narrowed).get_shape_by_name(
            "DescribeInstancesResult")}

    def create_parser(self, protocol_name: str) -> Any:
        return _NarrowParser(super().create_parser(protocol_name), self._narrow)


class _NarrowParser:
    def __init__(self, parser: Any, narrow: Mapping[str, Shape]) -> None:
        self._parser = parser
        self._narrow = narrow

    def parse(self, response: Mapping[str, Any], shape: Shape | None) -> Any:
        if shape is not None:
            shape = self._narrow.get(shape.name, shape)
        return self._parser.parse(response, shape)


#: DescribeInstances takes at most this many values in one filter.
DESCRIBE_BATCH = 200

# Ids that cannot name an instance are never sent (they would only come back absent).
_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")


@implementer(ICloud)
class Boto3Cloud:
    """
    The EC2 calls puppetha makes, over boto3, with one client per region.

    Credentials come from boto3's usual chain (instance profile in production) unless a
    ``profile`` or explicit keys are given; ``endpoint_url`` points every region at one endpoint
    (a moto server in tests), ``None`` means AWS.  Each call ends within ``deadline`` seconds,
    botocore's retries included (:func:`within_deadline`).
    """

    def __init__(
        self,
        endpoint_url: str | None = None,
        *,
        profile: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        deadline: float = DEFAULT_DEADLINE,
        max_pool_connections: int = 10,
        page_size: int | None = None,
    ) -> None:
        self.endpoint_url = endpoint_url
        #: DescribeInstances' ``MaxResults`` (None: EC2's own pages; tests make them small).
        self.page_size = page_size
        core = botocore.session.get_session()
        try:
            # Sessions are not thread-safe: this one is only used under the lock below.
            self._session = boto3.session.Session(
                botocore_session=core,
                profile_name=profile,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                aws_session_token=session_token,
            )
        except BotoCoreError as e:
            raise ValueError(f"AWS credentials: {e}") from e
        # After the session, which reads (and checks) the profile as it makes its model loader.
        ec2_model = core.get_component("data_loader").load_service_model("ec2", "service-2")
        parsers = _NarrowParsers(ec2_model["shapes"])
        parsers.set_parser_defaults(timestamp_parser=aws_timestamp)
        core.register_component("response_parser_factory", parsers)
        self.deadline = deadline
        self._config = within_deadline(deadline, max_pool_connections=max_pool_connections)
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}

    def prepare(self, region: str) -> None:
        """Makes ``region``'s client now (no call to AWS), rather than at its first call."""
        self._ec2(region)

    def _ec2(self, region: str) -> Any:
        if not REGION_NAME.fullmatch(region):
            raise ValueError(f"not a region name: {region!r}")
        with self._lock:
            ec2 = self._clients.get(region)
            if ec2 is None:
                with _as_cloud_error("connect", region):
                    ec2 = self._session.client(
                        "ec2",
                        region_name=region,
                        endpoint_url=self.endpoint_url,
                        config=self._config,
                    )
                self._clients[region] = ec2
            return ec2

    def describe_instances(self, region: str, instance_ids: Sequence[str]) -> dict[str, InstanceInfo]:
        ec2 = self._ec2(region)
        wanted = sorted({i for i in instance_ids if _INSTANCE_ID.fullmatch(i)})
        found: dict[str, InstanceInfo] = {}
        # A filter, not InstanceIds: with InstanceIds one unknown id fails the whole call.
        for start in range(0, len(wanted), DESCRIBE_BATCH):
            batch = wanted[start : start + DESCRIBE_BATCH]
            for info in self._described(ec2, region, [{"Name": "instance-id", "Values": batch}]):
                found[info.instance_id] = info
        return {i: found[i] for i in wanted if i in found}

    def _described(self, ec2: Any, region: str, filters: list[dict[str, Any]]) -> Iterator[InstanceInfo]:
        """
        Every instance DescribeInstances finds with ``filters``, page after page.  The pages are
        asked for here rather than through botocore's paginator, which cost a fifteenth of the
        CPU of a call, for a loop on ``NextToken``.
        """
        request: dict[str, Any] = {"Filters": filters}
        if self.page_size is not None:
            request["MaxResults"] = self.page_size
        seen: set[str] = set()
        with _as_cloud_error("DescribeInstances", region):
            while True:
                page = ec2.describe_instances(**request)
                for reservation in page.get("Reservations", []):
                    account = str(reservation.get("OwnerId", ""))
                    for instance in reservation.get("Instances", []):
                        yield instance_info(instance, account, region)
                token = page.get("NextToken")
                if not token:
                    return
                if token in seen:
                    # botocore's paginator stops the same way: an endpoint that sends a token
                    # again would keep the call going for ever.
                    raise CloudError(f"DescribeInstances in {region}: the same page token twice")
                seen.add(token)
                request["NextToken"] = token

    def associate_address(self, region: str, allocation_id: str, instance_id: str) -> str:
        ec2 = self._ec2(region)
        with _as_cloud_error("AssociateAddress", region):
            answer = ec2.associate_address(
                AllocationId=allocation_id, InstanceId=instance_id, AllowReassociation=True
            )
        log.info(
            "associated {allocation_id} with {instance_id}",
            allocation_id=allocation_id,
            instance_id=instance_id,
        )
        return str(answer["AssociationId"])

    def describe_address(self, region: str, allocation_id: str) -> str | None:
        ec2 = self._ec2(region)
        with _as_cloud_error("DescribeAddresses", region):
            answer = ec2.describe_addresses(AllocationIds=[allocation_id])
        addresses = answer.get("Addresses", [])
        if len(addresses) != 1:
            raise CloudError(f"DescribeAddresses in {region}: {len(addresses)} addresses for {allocation_id}")
        instance_id = addresses[0].get("InstanceId")
        return str(instance_id) if instance_id else None

    def run_instances(
        self,
        region: str,
        launch_template: str,
        count: int,
        tags: Mapping[str, str] | None = None,
        client_token: str | None = None,
    ) -> list[str]:
        if count < 1:
            raise ValueError(f"cannot launch {count} instances")
        ec2 = self._ec2(region)
        template = (
            {"LaunchTemplateId": launch_template}
            if launch_template.startswith("lt-")
            else {"LaunchTemplateName": launch_template}
        )
        arguments: dict[str, Any] = {"LaunchTemplate": template, "MinCount": count, "MaxCount": count}
        if tags:
            arguments["TagSpecifications"] = [
                {"ResourceType": "instance",
                 "Tags": [{"Key": k, "Value": v} for k, v in sorted(tags.items())]}
            ]
        if client_token is not None:
            # Without one, botocore fills in a ClientToken that its own retries reuse; ours also
            # holds across a daemon that retries after a lost answer.
            arguments["ClientToken"] = client_token
        with _as_cloud_error("RunInstances", region):
            answer = ec2.run_instances(**arguments)
        ids = [str(instance["InstanceId"]) for instance in answer.get("Instances", [])]
        log.info(
            "launched {count} instances from {launch_template}: {instance_ids}",
            count=len(ids),
            launch_template=launch_template,
            instance_ids=" ".join(ids),
        )
        return ids

    def terminate_instances(self, region: str, instance_ids: Sequence[str]) -> dict[str, str]:
        # Only instances that exist are named: with one unknown id the whole call would fail.
        present = self.describe_instances(region, instance_ids)
        if not present:
            return {}
        ec2 = self._ec2(region)
        with _as_cloud_error("TerminateInstances", region):
            answer = ec2.terminate_instances(InstanceIds=sorted(present))
        states = {
            str(change["InstanceId"]): str(change.get("CurrentState", {}).get("Name", ""))
            for change in answer.get("TerminatingInstances", [])
        }
        log.info("terminating {instance_ids}", instance_ids=" ".join(sorted(states)))
        return states

    def find_instances(
        self, region: str, tags: Mapping[str, str], states: Sequence[str]
    ) -> dict[str, InstanceInfo]:
        if not states:
            raise ValueError("find_instances needs at least one state")
        ec2 = self._ec2(region)
        filters = [{"Name": f"tag:{key}", "Values": [value]} for key, value in sorted(tags.items())]
        filters.append({"Name": "instance-state-name", "Values": sorted(set(states))})
        found = {info.instance_id: info for info in self._described(ec2, region, filters)}
        return dict(sorted(found.items()))


@contextmanager
def _as_cloud_error(operation: str, region: str) -> Iterator[None]:
    try:
        yield
    except ClientError as e:
        error = e.response.get("Error", {})
        code = error.get("Code", "Unknown")
        message = " ".join(str(error.get("Message", "")).split())
        raise CloudError(f"{operation} in {region}: {code}: {message}") from e
    except BotoCoreError as e:
        raise CloudError(f"{operation} in {region}: {e}") from e


def instance_info(instance: Mapping[str, Any], account: str, region: str) -> InstanceInfo:
    """One ``Instances`` entry of DescribeInstances (or RunInstances), reduced."""
    launch_time = instance.get("LaunchTime")
    groups: list[SecurityGroup] = [
        SecurityGroup(str(g.get("GroupId", "")), str(g.get("GroupName", "")))
        for g in instance.get("SecurityGroups", [])
    ]
    return InstanceInfo(
        instance_id=str(instance["InstanceId"]),
        account=account,
        region=region,
        state=str(instance.get("State", {}).get("Name", "")),
        private_ip=str(instance.get("PrivateIpAddress") or ""),
        private_dns=str(instance.get("PrivateDnsName") or ""),
        instance_profile_arn=str(instance.get("IamInstanceProfile", {}).get("Arn", "")),
        # mypy's attrs plugin cannot bind the generic ``converter=tuple`` of this field.
        security_groups=groups,
        tags={str(t["Key"]): str(t.get("Value", "")) for t in instance.get("Tags", [])},
        launch_time=launch_time.timestamp() if launch_time is not None else 0.0,
    )
