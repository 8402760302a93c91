"""
AWS that hangs instead of refusing: EC2, DynamoDB and KMS black-holed (connections accepted,
never answered) by a proxy in front of a moto server.  The clients are built from the
configuration as the daemon builds them (:mod:`puppetha.build`), on its defaults, and must
come back with a clear failure before ``puppetha-enroll`` (30 s) gives up, then work again
once the fault ends, without being rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from puppetha import build
from puppetha.aws.cloud import CloudError
from puppetha.config import Config, config_from_string
from puppetha.instance.options import DEFAULT_TIMEOUT as ENROLL_CLIENT_TIMEOUT
from puppetha.pki.vault import VaultError
from puppetha.store import StoreUnavailable
from puppetha.store.dynamodb import DynamoDBStore
from puppetha.testing.blackhole import BlackHoleProxy
from puppetha.testing.moto import Fleet, MotoServer
from puppetha.testing.moto import client as moto_client
from tests.aws_fixtures import moto_with_test_credentials

REGION = "us-east-1"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with moto_with_test_credentials() as server:
        yield server


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[BlackHoleProxy]:
    with BlackHoleProxy("127.0.0.1", moto.port) as p:
        yield p


def configured(proxy: BlackHoleProxy, key_id: str) -> Config:
    """The daemon's defaults but for where AWS is: behind the proxy."""
    return config_from_string(
        f"[aws]\nendpoint_url = {proxy.url}\nregion = {REGION}\n"
        f"[store]\nbackend = dynamodb\ntable = faults-{proxy.port}\n"
        f"[pki]\nvault = kms\nkms_key_id = {key_id}\n"
    )


def outcomes(calls: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Each call's result or exception, all at once, each waited for as long as puppetha-enroll waits."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(call) for name, call in calls.items()}
        out: dict[str, Any] = {}
        for name, future in futures.items():
            error = future.exception(timeout=ENROLL_CLIENT_TIMEOUT)
            out[name] = error if error is not None else future.result()
        return out


def test_black_holed_ec2_dynamodb_and_kms_fail_in_time_and_recover(moto: MotoServer,
                                                                    proxy: BlackHoleProxy) -> None:
    kms = moto_client("kms", moto.endpoint_url, REGION)
    config = configured(proxy, str(kms.create_key()["KeyMetadata"]["KeyId"]))
    cloud = build.make_cloud(config)
    store = build.open_store(config)
    assert isinstance(store, DynamoDBStore)
    store.create_table(wait=True, point_in_time_recovery=False)
    vault = build.open_vault(config)
    instance = Fleet(moto.endpoint_url, REGION).launch("agent")
    calls: dict[str, Callable[[], Any]] = {
        "ec2": lambda: cloud.describe_instances(REGION, [instance.instance_id]),
        "dynamodb": lambda: store.get("node", "n1"),
        "kms": lambda: vault.open(vault.seal(b"key", "root"), "root"),
    }
    assert outcomes(calls) == {"ec2": {instance.instance_id: instance}, "dynamodb": None, "kms": b"key"}

    proxy.black_holed = True
    down = outcomes(calls)
    assert isinstance(down["ec2"], CloudError), down
    assert isinstance(down["dynamodb"], StoreUnavailable), down
    assert isinstance(down["kms"], VaultError), down
    assert proxy.swallowed >= 3

    proxy.black_holed = False
    assert outcomes(calls) == {"ec2": {instance.instance_id: instance}, "dynamodb": None, "kms": b"key"}
    store.close()
