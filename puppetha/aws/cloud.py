"""
The EC2 calls puppetha makes, behind a small synchronous interface (run on a thread pool).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from attrs import field, frozen
from zope.interface import Interface


class CloudError(Exception):
    """AWS could not be asked (endpoint down, throttled past retries, no permission)."""


@frozen
class SecurityGroup:
    group_id: str
    group_name: str


def _groups(groups: Iterable[SecurityGroup]) -> tuple[SecurityGroup, ...]:
    return tuple(groups)


@frozen
class InstanceInfo:
    """What DescribeInstances says of one instance, reduced to what puppetha decides on."""

    instance_id: str
    account: str
    region: str
    #: ``pending``, ``running``, ``stopping``, ``stopped``, ``shutting-down``, ``terminated``.
    state: str
    private_ip: str
    private_dns: str
    #: The instance profile's ARN, or "" when it has none.
    instance_profile_arn: str
    security_groups: tuple[SecurityGroup, ...] = field(converter=_groups, default=())
    tags: Mapping[str, str] = field(factory=dict)
    launch_time: float = 0.0


class ICloud(Interface):
    def describe_instances(region: str, instance_ids: Sequence[str]) -> dict[str, InstanceInfo]:
        """
        The instances among ``instance_ids`` that exist in ``region`` (unknown ids are simply
        absent from the answer, never an error).  Raises :class:`CloudError`.
        """

    def associate_address(region: str, allocation_id: str, instance_id: str) -> str:
        """Move the Elastic IP to ``instance_id`` (reassociating); returns the association id."""

    def describe_address(region: str, allocation_id: str) -> str | None:
        """The instance the Elastic IP is associated with now, or ``None``."""

    def run_instances(
        region: str,
        launch_template: str,
        count: int,
        tags: Mapping[str, str] | None = None,
        client_token: str | None = None,
    ) -> list[str]:
        """
        Launch ``count`` instances from a launch template (an id ``lt-...`` or a name); returns
        their ids.  ``tags`` are added to the instances' own (the template's tags stay), so a
        launch can carry the tag that the master policy admits.  A repeated call with the same
        ``client_token`` launches nothing more and returns the same ids.  Raises
        :class:`CloudError`; ``ValueError`` for a count under one, before asking.
        """

    def terminate_instances(region: str, instance_ids: Sequence[str]) -> dict[str, str]:
        """
        Terminate the instances among ``instance_ids`` that exist in ``region``; returns each
        one's state after the call (``shutting-down`` or ``terminated``).  Ids that name no
        instance there are absent from the answer and terminate nothing; terminating an
        instance twice is not an error.  Raises :class:`CloudError`.
        """

    def find_instances(
        region: str, tags: Mapping[str, str], states: Sequence[str]
    ) -> dict[str, InstanceInfo]:
        """
        The instances in ``region`` carrying every tag of ``tags`` and in one of ``states``
        (e.g. the masters launched but not yet enrolled).  Raises :class:`CloudError`.
        """
