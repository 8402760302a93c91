"""Boto3Cloud, MotoServer and Fleet against a real moto server subprocess."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.utils import parse_timestamp
from zope.interface.verify import verifyObject

from puppetha.aws.boto import DESCRIBE_BATCH, Boto3Cloud, aws_timestamp, instance_info, within_deadline
from puppetha.aws.cloud import CloudError, ICloud, SecurityGroup
from puppetha.testing.moto import ROLE_TAG, TEST_CREDENTIALS, Fleet, MotoServer, MotoServerError

REGION = "us-east-1"
ACCOUNT = "123456789012"
UNKNOWN_ID = "i-0fffffffffffffff0"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def endpoint(moto: MotoServer) -> str:
    moto.reset()
    return moto.endpoint_url


@pytest.fixture(scope="module")
def shared_cloud(moto: MotoServer) -> Boto3Cloud:
    # One for the module: its clients are the expensive part, and they keep no AWS state.
    return Boto3Cloud(
        moto.endpoint_url,
        access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
        secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"],
    )


@pytest.fixture
def cloud(shared_cloud: Boto3Cloud, endpoint: str) -> Boto3Cloud:
    # Depends on endpoint for its reset: each test starts from an empty moto.
    return shared_cloud


@pytest.fixture
def fleet(endpoint: str) -> Fleet:
    return Fleet(endpoint, REGION)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_provides_icloud(cloud: Boto3Cloud) -> None:
    assert verifyObject(ICloud, cloud)


# --- describe_instances


def test_describe_instances_reduces_what_puppetha_decides_on(cloud: Boto3Cloud, fleet: Fleet) -> None:
    launched = fleet.launch(
        role="master",
        tags={"env": "prod"},
        security_groups=["web", "puppet"],
        instance_profile_arn="puppet-master",
    )
    found = cloud.describe_instances(REGION, [launched.instance_id])
    info = found[launched.instance_id]
    assert info == launched
    assert info.account == ACCOUNT
    assert info.region == REGION
    assert info.state in {"pending", "running"}
    assert info.private_ip.startswith("10.20.1.")
    assert info.private_dns
    assert info.instance_profile_arn == f"arn:aws:iam::{ACCOUNT}:instance-profile/puppet-master"
    assert {g.group_name for g in info.security_groups} == {"web", "puppet"}
    assert SecurityGroup(fleet.security_group("web"), "web") in info.security_groups
    assert info.tags == {ROLE_TAG: "master", "env": "prod"}
    assert info.launch_time > 0
    # The same instant botocore's own parser reads from the same answer.
    plain = fleet.ec2.describe_instances(InstanceIds=[launched.instance_id])
    assert info.launch_time == plain["Reservations"][0]["Instances"][0]["LaunchTime"].timestamp()


def test_describe_instances_reads_what_a_full_parse_reads(cloud: Boto3Cloud, fleet: Fleet) -> None:
    # DescribeInstances answers are parsed through a narrower shape (DESCRIBED): what puppetha
    # makes of them is what it makes of botocore's full parse of the same instances.
    launched = [
        fleet.launch(role="master", tags={"env": "prod", "team": ""}, security_groups=["web", "puppet"],
                     instance_profile_arn="puppet-master"),
        fleet.launch(role="agent"),
        fleet.launch(role="agent", security_groups=["web"]),
    ]
    ids = [i.instance_id for i in launched]
    full = fleet.ec2.describe_instances(InstanceIds=ids)
    expected = {
        i["InstanceId"]: instance_info(i, r["OwnerId"], REGION)
        for r in full["Reservations"] for i in r["Instances"]
    }
    assert cloud.describe_instances(REGION, ids) == expected
    assert cloud.find_instances(REGION, {ROLE_TAG: "agent"}, ["pending", "running"]) == {
        i: expected[i] for i in ids[1:]
    }


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-27T16:50:28.000Z",
        "2026-11-27T16:50:28Z",
        "2026-11-27T16:50:28.123456+00:00",
        "2026-11-27T18:50:28+02:00",
        "2026-11-27T16:50:28",
        "1700000000",
        "1700000000.5",
        "Fri, 27 Nov 2026 16:50:28 GMT",
    ],
)
def test_timestamps_are_read_as_botocore_reads_them(text: str) -> None:
    ours, theirs = aws_timestamp(text), parse_timestamp(text)
    assert ours == theirs
    assert (ours.tzinfo is None) == (theirs.tzinfo is None)


def test_a_text_that_is_no_time_is_refused_as_botocore_refuses_it() -> None:
    with pytest.raises(ValueError, match="Invalid timestamp"):
        parse_timestamp("not a time")
    with pytest.raises(ValueError, match="Invalid timestamp"):
        aws_timestamp("not a time")


def test_unknown_and_malformed_ids_are_simply_absent(cloud: Boto3Cloud, fleet: Fleet) -> None:
    one = fleet.launch()
    asked = [one.instance_id, UNKNOWN_ID, "garbage", "i-XYZ", "", one.instance_id]
    assert list(cloud.describe_instances(REGION, asked)) == [one.instance_id]
    assert cloud.describe_instances(REGION, [UNKNOWN_ID, "garbage"]) == {}
    assert cloud.describe_instances(REGION, []) == {}


def test_instances_of_other_regions_are_absent(cloud: Boto3Cloud, endpoint: str) -> None:
    elsewhere = Fleet(endpoint, "eu-west-1").launch()
    assert cloud.describe_instances(REGION, [elsewhere.instance_id]) == {}
    assert cloud.describe_instances("eu-west-1", [elsewhere.instance_id])[elsewhere.instance_id].region == (
        "eu-west-1"
    )


def test_describe_instances_shows_state_changes(cloud: Boto3Cloud, fleet: Fleet) -> None:
    stopped, terminated, running = fleet.launch(), fleet.launch(), fleet.launch()
    fleet.stop(stopped.instance_id)
    fleet.terminate(terminated.instance_id)
    states = {
        i: info.state
        for i, info in cloud.describe_instances(
            REGION, [stopped.instance_id, terminated.instance_id, running.instance_id]
        ).items()
    }
    assert states == {
        stopped.instance_id: "stopped",
        terminated.instance_id: "terminated",
        running.instance_id: "running",
    }


def test_describe_instances_in_batches(cloud: Boto3Cloud, fleet: Fleet) -> None:
    count = DESCRIBE_BATCH + 15
    answer = fleet.ec2.run_instances(
        ImageId="ami-0123456789abcdef0", MinCount=count, MaxCount=count, SubnetId=fleet.subnet_id
    )
    ids = [i["InstanceId"] for i in answer["Instances"]]
    found = cloud.describe_instances(REGION, [*ids, UNKNOWN_ID])
    assert sorted(found) == sorted(ids)


def test_every_page_is_read(endpoint: str, fleet: Fleet) -> None:
    paged = Boto3Cloud(
        endpoint,
        access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
        secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"],
        page_size=5,
    )
    pages: list[str | None] = []
    paged._ec2(REGION).meta.events.register(
        "provide-client-params.ec2.DescribeInstances",
        lambda params, **_: pages.append(params.get("NextToken")),
    )
    # EC2 pages by reservation: one launch each.
    ids = sorted(fleet.launch(role="agent").instance_id for _ in range(12))
    assert sorted(paged.describe_instances(REGION, [*ids, UNKNOWN_ID])) == ids
    assert len(pages) == 3
    assert pages[0] is None
    assert None not in pages[1:]
    assert list(paged.find_instances(REGION, {ROLE_TAG: "agent"}, ["pending", "running"])) == ids


class SameTokenAgain:
    """An endpoint whose second page names the first page's next one again."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    def __call__(self, parsed: dict[str, Any], **_: Any) -> None:
        if self.tokens:
            parsed["NextToken"] = self.tokens[0]
        self.tokens.append(parsed.get("NextToken", ""))


def test_a_page_token_sent_twice_ends_the_call(endpoint: str, fleet: Fleet) -> None:
    cloud = Boto3Cloud(
        endpoint,
        access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
        secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"],
        page_size=5,
    )
    again = SameTokenAgain()
    cloud._ec2(REGION).meta.events.register("after-call.ec2.DescribeInstances", again)
    ids = [fleet.launch(role="agent").instance_id for _ in range(6)]
    with pytest.raises(CloudError, match="the same page token twice"):
        cloud.describe_instances(REGION, ids)
    assert len(again.tokens) == 2  # the token was not sent again


def test_concurrent_calls_from_threads(cloud: Boto3Cloud, endpoint: str) -> None:
    regions = ["us-east-1", "eu-west-1", "ap-south-1", "us-west-2"]
    launched = {region: Fleet(endpoint, region).launch().instance_id for region in regions}
    results: dict[str, bool] = {}
    errors: list[BaseException] = []

    def ask(region: str) -> None:
        try:
            for _ in range(5):
                results[region] = launched[region] in cloud.describe_instances(region, [launched[region]])
        except BaseException as e:  # reported below, from the test's thread
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(r,)) for r in regions * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == dict.fromkeys(regions, True)


# --- Elastic IPs


def test_associate_and_describe_address(cloud: Boto3Cloud, fleet: Fleet) -> None:
    first, second = fleet.launch(role="lb"), fleet.launch(role="lb")
    allocation = fleet.allocate_address()
    assert cloud.describe_address(REGION, allocation) is None
    association = cloud.associate_address(REGION, allocation, first.instance_id)
    assert association.startswith("eipassoc-")
    assert cloud.describe_address(REGION, allocation) == first.instance_id
    # Taking the address over from a live holder is the point of failover.
    cloud.associate_address(REGION, allocation, second.instance_id)
    assert cloud.describe_address(REGION, allocation) == second.instance_id


def test_unknown_address_is_a_cloud_error(cloud: Boto3Cloud) -> None:
    with pytest.raises(CloudError, match=r"InvalidAllocationID\.NotFound"):
        cloud.describe_address(REGION, "eipalloc-0123456789abcdef0")
    with pytest.raises(CloudError, match="AssociateAddress in us-east-1"):
        cloud.associate_address(REGION, "eipalloc-0123456789abcdef0", UNKNOWN_ID)


def test_associating_with_an_unknown_instance_changes_nothing(cloud: Boto3Cloud, fleet: Fleet) -> None:
    holder = fleet.launch()
    allocation = fleet.allocate_address()
    cloud.associate_address(REGION, allocation, holder.instance_id)
    with pytest.raises(CloudError):
        cloud.associate_address(REGION, allocation, UNKNOWN_ID)
    assert cloud.describe_address(REGION, allocation) == holder.instance_id


# --- run_instances


@pytest.mark.parametrize("by", ["name", "id"])
def test_run_instances_from_launch_template(cloud: Boto3Cloud, fleet: Fleet, by: str) -> None:
    template_id = fleet.create_launch_template("puppet-master")
    ids = cloud.run_instances(REGION, template_id if by == "id" else "puppet-master", 2)
    assert len(ids) == len(set(ids)) == 2
    found = cloud.describe_instances(REGION, ids)
    assert {info.tags.get(ROLE_TAG) for info in found.values()} == {"master"}


def test_run_instances_refuses_bad_counts_without_calling(cloud: Boto3Cloud, fleet: Fleet) -> None:
    fleet.create_launch_template("puppet-master")
    for count in (0, -1):
        with pytest.raises(ValueError, match="cannot launch"):
            cloud.run_instances(REGION, "puppet-master", count)
    assert fleet.ec2.describe_instances()["Reservations"] == []


def test_unknown_launch_template_is_a_cloud_error(cloud: Boto3Cloud) -> None:
    with pytest.raises(CloudError, match="RunInstances in us-east-1"):
        cloud.run_instances(REGION, "no-such-template", 1)


def test_run_instances_adds_tags_to_the_templates(cloud: Boto3Cloud, fleet: Fleet) -> None:
    # The template tags the role; the launch adds who launched it, and both are on the instance.
    fleet.create_launch_template("puppet-master")
    (launched,) = cloud.run_instances(REGION, "puppet-master", 1, tags={"puppetha:launched-by": "7"})
    info = cloud.describe_instances(REGION, [launched])[launched]
    assert info.tags[ROLE_TAG] == "master"
    assert info.tags["puppetha:launched-by"] == "7"


def test_run_instances_sends_the_client_token(cloud: Boto3Cloud, fleet: Fleet) -> None:
    # EC2 answers a repeated RunInstances with the same ClientToken with the first call's
    # instances; moto does not, so what is checked here is that the token reaches EC2.
    fleet.create_launch_template("puppet-master")
    ids = cloud.run_instances(REGION, "puppet-master", 2, client_token="scale-7-1")
    instances = fleet.ec2.describe_instances(InstanceIds=ids)["Reservations"][0]["Instances"]
    assert {i["ClientToken"] for i in instances} == {"scale-7-1"}


# --- terminate_instances


def test_terminate_instances(cloud: Boto3Cloud, fleet: Fleet) -> None:
    doomed, kept = fleet.launch(role="master"), fleet.launch(role="master")
    states = cloud.terminate_instances(REGION, [doomed.instance_id])
    assert list(states) == [doomed.instance_id]
    assert states[doomed.instance_id] in {"shutting-down", "terminated"}
    now = cloud.describe_instances(REGION, [doomed.instance_id, kept.instance_id])
    assert now[doomed.instance_id].state in {"shutting-down", "terminated"}
    assert now[kept.instance_id].state == "running"


def test_terminate_skips_unknown_ids_and_terminates_the_rest(cloud: Boto3Cloud, fleet: Fleet) -> None:
    doomed = fleet.launch()
    states = cloud.terminate_instances(REGION, [UNKNOWN_ID, "garbage", doomed.instance_id])
    assert list(states) == [doomed.instance_id]
    assert cloud.terminate_instances(REGION, [UNKNOWN_ID, "garbage"]) == {}
    assert cloud.terminate_instances(REGION, []) == {}


def test_terminating_twice_is_not_an_error(cloud: Boto3Cloud, fleet: Fleet) -> None:
    doomed = fleet.launch()
    cloud.terminate_instances(REGION, [doomed.instance_id])
    again = cloud.terminate_instances(REGION, [doomed.instance_id])
    assert again[doomed.instance_id] in {"shutting-down", "terminated"}


def test_terminate_in_another_region_touches_nothing(cloud: Boto3Cloud, endpoint: str) -> None:
    elsewhere = Fleet(endpoint, "eu-west-1").launch()
    assert cloud.terminate_instances(REGION, [elsewhere.instance_id]) == {}
    found = cloud.describe_instances("eu-west-1", [elsewhere.instance_id])
    assert found[elsewhere.instance_id].state == "running"


# --- find_instances


def test_find_instances_by_tag_and_state(cloud: Boto3Cloud, fleet: Fleet) -> None:
    master, other_master = fleet.launch(role="master"), fleet.launch(role="master")
    agent = fleet.launch(role="agent")
    fleet.terminate(other_master.instance_id)
    live = ["pending", "running"]
    assert list(cloud.find_instances(REGION, {ROLE_TAG: "master"}, live)) == [master.instance_id]
    assert list(cloud.find_instances(REGION, {ROLE_TAG: "agent"}, live)) == [agent.instance_id]
    gone = cloud.find_instances(REGION, {ROLE_TAG: "master"}, ["terminated"])
    assert list(gone) == [other_master.instance_id]
    assert cloud.find_instances(REGION, {ROLE_TAG: "master", "env": "prod"}, live) == {}
    with pytest.raises(ValueError, match="at least one state"):
        cloud.find_instances(REGION, {ROLE_TAG: "master"}, [])


# --- failures


def test_endpoint_down_is_a_cloud_error() -> None:
    cloud = Boto3Cloud(
        f"http://127.0.0.1:{closed_port()}",
        access_key_id="testing",
        secret_access_key="testing",
        deadline=1.0,
    )
    with pytest.raises(CloudError, match="DescribeInstances in us-east-1: Could not connect"):
        cloud.describe_instances(REGION, [UNKNOWN_ID])
    with pytest.raises(CloudError, match="DescribeAddresses"):
        cloud.describe_address(REGION, "eipalloc-0123456789abcdef0")
    with pytest.raises(CloudError, match="DescribeInstances"):
        cloud.terminate_instances(REGION, [UNKNOWN_ID])


def test_bad_region_is_refused(cloud: Boto3Cloud) -> None:
    for region in ["", "us east 1", "../x", "http://evil"]:
        with pytest.raises(ValueError, match="not a region name"):
            cloud.describe_instances(region, [UNKNOWN_ID])


def test_one_client_per_region(endpoint: str) -> None:
    cloud = Boto3Cloud(endpoint, access_key_id="testing", secret_access_key="testing")
    assert cloud._ec2(REGION) is cloud._ec2(REGION)
    assert cloud._ec2(REGION) is not cloud._ec2("eu-west-1")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="deadline"):
        Boto3Cloud(deadline=0)
    with pytest.raises(ValueError, match="AWS credentials"):
        Boto3Cloud(profile="no-such-profile-anywhere")


# --- the harness itself


def test_reset_forgets_everything(moto: MotoServer, fleet: Fleet, cloud: Boto3Cloud) -> None:
    launched = fleet.launch()
    moto.reset()
    assert cloud.describe_instances(REGION, [launched.instance_id]) == {}


def test_fleet_instance_profiles_are_made_once(fleet: Fleet) -> None:
    arn = fleet.instance_profile("worker")
    assert fleet.instance_profile(arn) == arn
    assert fleet.launch(instance_profile_arn=arn).instance_profile_arn == arn


def test_fleet_without_role(fleet: Fleet) -> None:
    assert fleet.launch(role=None).tags == {}


def test_missing_moto_server_is_a_clear_error(tmp_path: Path) -> None:
    server = MotoServer(command=tmp_path / "moto_server")
    with pytest.raises(MotoServerError, match="install moto\\[server\\]"):
        server.start()


def test_moto_server_that_dies_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "moto_server"
    fake.write_text("#!/bin/sh\necho 'no luck' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(MotoServerError, match=r"would not start.*no luck"):
        MotoServer(command=fake, log_dir=tmp_path).start()


def test_stopped_server_has_no_endpoint(tmp_path: Path) -> None:
    server = MotoServer(log_dir=tmp_path).start()
    url = server.endpoint_url
    assert url.startswith("http://127.0.0.1:")
    server.stop()
    with pytest.raises(MotoServerError, match="not running"):
        _ = server.endpoint_url


@pytest.mark.parametrize("deadline", [0.5, 1.9, 2.0, 5.0, 8.0, 30.0])
def test_botocore_settings_fit_inside_the_deadline(deadline: float) -> None:
    config: Any = within_deadline(deadline)  # botocore sets them dynamically
    attempts = config.retries["total_max_attempts"]
    backoff = 1.0 if attempts > 1 else 0.0  # standard mode's first backoff is at most 1 s
    worst = attempts * (config.connect_timeout + config.read_timeout) + backoff
    assert worst == pytest.approx(deadline)
    assert config.connect_timeout <= 1.0
    assert config.read_timeout > 0
    assert attempts == (2 if deadline >= 2 else 1)
