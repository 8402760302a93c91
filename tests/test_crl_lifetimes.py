"""
The CRL lifetime defaults: an instance stopped for as long as its certificate lives still finds
its CRL copy valid when it starts again (docs/pki.md, "Lifetimes").  The daemon's re-signing is
played day by day on an injected clock with the real authority over a real store.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from puppetha import build
from puppetha.config import config_from_string, duration
from puppetha.pki.vault import FileKeyVault
from puppetha.store.records import CRLRecord, Records
from puppetha.store.sqlite import SQLiteStore

DAY = 86400.0
START = 1_800_000_000.0


def test_the_defaults_keep_every_crl_copy_valid_for_as_long_as_a_certificate() -> None:
    config = config_from_string("")
    margin = config[("pki", "crl_refresh_margin")]
    assert margin >= config[("pki", "cert_lifetime")]
    assert margin < config[("pki", "crl_lifetime")]


def earliest_expiry_by_day(tmp_path: Path, lifetime: str, margin: str, days: int) -> list[float]:
    """
    A daemon re-signing CRLs once a day (the real timer checks hourly) for ``days``: what an
    agent fetching its CRLs on day ``d`` holds expires at ``[d]`` (its earliest nextUpdate).
    """
    config = config_from_string(f"[pki]\ncrl_lifetime = {lifetime}\ncrl_refresh_margin = {margin}\n")
    now = [START]
    store = SQLiteStore(str(tmp_path / "store.sqlite"))
    try:
        records = Records(store)
        authority = build.make_authority(config, records, FileKeyVault.create(tmp_path / "vault.key"),
                                         lambda: now[0])
        authority.ensure_root("lifetimes root")
        authority.create_master_ca("m1")
        refresh_margin = timedelta(seconds=config[("pki", "crl_refresh_margin")])
        expiries = []
        for day in range(days):
            now[0] = START + day * DAY
            authority.refresh_crls(refresh_margin)
            expiries.append(min(v.record.next_update for v in records.list(CRLRecord)))
        return expiries
    finally:
        store.close()


@pytest.mark.parametrize(
    ("lifetime", "margin", "stopped", "days", "runs_again"),
    [
        # The defaults: stopped as long as a certificate lives, whenever it last fetched.
        ("6y", "5y", "5y", 7 * 365, True),
        # The old defaults: a CRL copy could have only 3 days left; a long weekend off was fatal.
        ("7d", "3d", "4d", 30, False),
        ("7d", "3d", "2d", 30, True),
    ],
)
def test_an_instance_stopped_after_any_fetch_still_holds_a_valid_crl(
    tmp_path: Path, *, lifetime: str, margin: str, stopped: str, days: int, runs_again: bool
) -> None:
    expiries = earliest_expiry_by_day(tmp_path, lifetime, margin, days)
    away = duration(stopped)
    # Every day it could have fetched, far enough from the end for the stop to fit.
    fetch_days = range(int(days - away / DAY))
    assert fetch_days
    valid_on_return = [expiries[d] > START + d * DAY + away for d in fetch_days]
    assert all(valid_on_return) is runs_again
