"""
Building the daemon's blocking parts from the configuration: the store, the vault, the CA and
the AWS client.  Shared by the daemon's wiring (:mod:`puppetha.tap`) and the ``puppetha`` CLI,
so both open the very same things the very same way.  Nothing here touches the reactor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from puppetha.config import Config
from puppetha.pki.vault import IKeyVault, VaultError
from puppetha.store import IStore, StoreError
from puppetha.store.records import Records

if TYPE_CHECKING:
    from puppetha.aws.cloud import ICloud
    from puppetha.pki.authority import CertificateAuthority


def open_store(config: Config) -> IStore:
    if config[("store", "backend")] == "sqlite":
        from puppetha.store.sqlite import SQLiteStore

        path = config[("store", "path")]
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create {parent} for [store] path: {e.strerror}") from None
        return SQLiteStore(path, busy_timeout=config[("store", "timeout")])
    from puppetha.store.dynamodb import DynamoDBStore

    return DynamoDBStore(
        table=config[("store", "table")],
        region=config[("aws", "region")],
        endpoint_url=config[("aws", "endpoint_url")] or None,
        deadline=config[("store", "timeout")],
    )


def open_vault(
    config: Config, create: bool = False, has_root: Callable[[], bool] | None = None
) -> IKeyVault:
    """
    The vault for CA keys.  With ``create`` a missing key file is made (mode 0600), unless
    ``has_root`` says the store already holds keys sealed by the lost one; without ``create`` a
    missing key file is an error, so that the CLI never silently creates a second key.
    """
    if config[("pki", "vault")] == "kms":
        from puppetha.aws.kms import KmsKeyVault

        return KmsKeyVault(
            key_id=config[("pki", "kms_key_id")],
            region=config[("aws", "region")],
            endpoint_url=config[("aws", "endpoint_url")] or None,
            deadline=config[("aws", "timeout")],
        )
    from puppetha.pki.vault import FileKeyVault

    path = config[("pki", "vault_key_file")]
    if not os.path.exists(path):
        if not create:
            raise VaultError(f"no vault key file {path} ([pki] vault_key_file); run `puppetha ca init`")
        if has_root is not None and has_root():
            # A new key could never open the CA keys already sealed in the store.
            raise VaultError(f"the store has a root CA but the vault key file {path} is missing "
                             "([pki] vault_key_file): restore it from the backup")
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        return FileKeyVault.create(path)
    return FileKeyVault(path)


def store_has_root(records: Records) -> Callable[[], bool]:
    from puppetha.pki.authority import ROOT
    from puppetha.store.records import CARecord

    return lambda: records.get(CARecord, ROOT) is not None


def make_authority(
    config: Config, records: Records, vault: IKeyVault, now: Callable[[], float]
) -> CertificateAuthority:
    from puppetha.pki.authority import CertificateAuthority
    from puppetha.pki.keys import KeyType

    return CertificateAuthority(
        records=records,
        vault=vault,
        key_type=KeyType(config[("pki", "key_type")]),
        now=now,
        ca_lifetime=timedelta(seconds=config[("pki", "ca_lifetime")]),
        cert_lifetime=timedelta(seconds=config[("pki", "cert_lifetime")]),
        crl_lifetime=timedelta(seconds=config[("pki", "crl_lifetime")]),
    )


def make_cloud(config: Config, prepared: Sequence[str] = ()) -> ICloud:
    """The AWS client of the configuration, with those of the ``prepared`` regions made now."""
    from puppetha.aws.boto import Boto3Cloud

    cloud = Boto3Cloud(
        endpoint_url=config[("aws", "endpoint_url")] or None, deadline=config[("aws", "timeout")]
    )
    for region in prepared:
        cloud.prepare(region)
    return cloud
