"""
The stateful CA over the real SQLite store: CA creation, issuing, revocation, CRL refresh
(under a task.Clock), bundles, and that no clear CA key ever reaches the store.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from puppetha.pki.authority import (
    LB_CA,
    ROOT,
    AuthorityError,
    CAExists,
    CertificateAuthority,
    CRLRefresher,
    UnknownCA,
    crls_due,
    still_listed,
)
from puppetha.pki.certs import PP_INSTANCE_ID, Usage, puppet_extension
from puppetha.pki.crl import crl_number
from puppetha.pki.keys import KeyType, load_private_key
from puppetha.pki.vault import FileKeyVault, VaultError
from puppetha.store.records import CARecord, CRLRecord, Records, RevokedRecord, unb64
from puppetha.store.sqlite import SQLiteStore
from tests.test_pki_csr import CERTNAME, make_csr

T0 = 1_780_000_000.0  # 2026-05-28
DAY = timedelta(days=1)
MASTER = "master1.internal"
KINDS = ("ca", "crl", "revoked")


class Now:
    """A settable clock for the authority's ``now``."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(str(tmp_path / "puppetha.db"))
    yield s
    s.close()


@pytest.fixture
def vault(tmp_path):
    return FileKeyVault.create(tmp_path / "vault.key")


def make_authority(store, vault, now, key_type=KeyType.EC_P256) -> CertificateAuthority:
    return CertificateAuthority(
        Records(store),
        vault,
        key_type=key_type,
        now=now,
        ca_lifetime=3650 * DAY,
        cert_lifetime=365 * DAY,
        crl_lifetime=7 * DAY,
    )


@pytest.fixture
def now():
    return Now()


@pytest.fixture
def authority(store, vault, now):
    ca = make_authority(store, vault, now)
    ca.init_root("Puppet Root CA: test")
    ca.create_master_ca(MASTER)
    return ca


def load_crls(pem: bytes) -> list[x509.CertificateRevocationList]:
    end = b"-----END X509 CRL-----\n"
    return [x509.load_pem_x509_crl(block + end) for block in pem.split(end) if block.strip()]


def csr(key=None) -> x509.CertificateSigningRequest:
    return x509.load_pem_x509_csr(make_csr(key=key))


def openssl_verify(tmp_path: Path, authority: CertificateAuthority, leaf: x509.Certificate, t: float) -> str:
    """Verify ``leaf`` against the root only, with the authority's own chain and CRL bundles."""
    chain = x509.load_pem_x509_certificates(authority.ca_chain_pem(MASTER))
    (tmp_path / "root.pem").write_bytes(chain[-1].public_bytes(serialization.Encoding.PEM))
    (tmp_path / "chain.pem").write_bytes(authority.ca_chain_pem(MASTER))
    (tmp_path / "crls.pem").write_bytes(authority.crl_chain_pem())
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    result = subprocess.run(
        [
            "openssl", "verify", "-crl_check_all", "-x509_strict", "-purpose", "sslclient",
            "-attime", str(int(t)),
            "-CAfile", str(tmp_path / "root.pem"),
            "-untrusted", str(tmp_path / "chain.pem"),
            "-CRLfile", str(tmp_path / "crls.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    return result.stdout + result.stderr


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.RSA_2048], ids=lambda t: t.value)
def test_issue_and_revoke_verified_by_openssl(tmp_path, store, vault, now, key_type):
    authority = make_authority(store, vault, now, key_type)
    authority.init_root("Puppet Root CA: test")
    authority.create_master_ca(MASTER)
    leaf = authority.issue(
        MASTER,
        csr(),
        common_name=CERTNAME,
        sans=["10.0.1.23"],
        usage=Usage.BOTH,
        extensions=[puppet_extension(PP_INSTANCE_ID, "i-0123456789abcdef0")],
    )
    assert KeyType.of(authority.certificate(MASTER).public_key()) is key_type  # type: ignore[arg-type]
    assert openssl_verify(tmp_path, authority, leaf, now.t + 60).strip().endswith(": OK")
    # A host whose clock runs a minute behind the signer's still accepts certificate and CRLs.
    assert openssl_verify(tmp_path, authority, leaf, now.t - 60).strip().endswith(": OK")

    now.t += 3600
    crl = authority.revoke(MASTER, leaf.serial_number, CERTNAME, "keyCompromise")
    assert crl.number == 2
    parsed = x509.load_pem_x509_crl(crl.crl_pem.encode())
    assert parsed.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    assert "certificate revoked" in openssl_verify(tmp_path, authority, leaf, now.t + 60)


def test_root_is_created_once(store, vault, now):
    authority = make_authority(store, vault, now)
    root = authority.init_root("Puppet Root CA: test")
    assert root.parent == ROOT
    assert authority.crl(ROOT).number == 1
    with pytest.raises(CAExists):
        authority.init_root("another")
    again = make_authority(store, vault, now).ensure_root("another")
    assert again.certificate_pem == root.certificate_pem
    assert [v.record.name for v in Records(store).list(CARecord)] == [ROOT]


def test_ensure_root_creates(store, vault, now):
    authority = make_authority(store, vault, now)
    root = authority.ensure_root("Puppet Root CA: test")
    assert authority.root() == root
    cert = authority.certificate(ROOT)
    assert cert.subject.rfc4514_string() == "CN=Puppet Root CA: test"


def test_master_ca_needs_the_root(store, vault, now):
    with pytest.raises(UnknownCA):
        make_authority(store, vault, now).create_master_ca(MASTER)
    assert store.list("ca") == []
    assert store.list("crl") == []


def test_master_ca(authority):
    record = authority.ca(MASTER)
    assert record.parent == ROOT
    cert = authority.certificate(MASTER)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    cert.verify_directly_issued_by(authority.certificate(ROOT))
    assert authority.crl(MASTER).number == 1
    with pytest.raises(CAExists):
        authority.create_master_ca(MASTER)


@pytest.mark.parametrize("certname", [ROOT, "Master1", "", "ca"])
def test_master_ca_names_refused(authority, certname):
    before = [item.key for item in authority.records.store.list("ca")]
    with pytest.raises((AuthorityError, ValueError)):
        authority.create_master_ca(certname)
    assert [item.key for item in authority.records.store.list("ca")] == before


class StaleRecords(Records):
    """Answers "no such CA" once: this daemon read just before another one created it."""

    def __init__(self, store, name: str) -> None:
        super().__init__(store)
        self.name = name
        self.stale = True

    def get(self, cls, key):
        if cls is CARecord and key == self.name and self.stale:
            self.stale = False
            return None
        return super().get(cls, key)


def test_ensure_ca_creates_once_under_the_root(authority, store, vault, now):
    lb = authority.ensure_ca(LB_CA)
    assert lb.parent == ROOT
    cert = authority.certificate(LB_CA)
    cert.verify_directly_issued_by(authority.certificate(ROOT))
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert authority.crl(LB_CA).number == 1
    assert make_authority(store, vault, now).ensure_ca(LB_CA) == lb
    # The lb CA's CRL is in the chain every node gets (nginx sends the lb CA to agents).
    issuers = [c.issuer for c in load_crls(authority.crl_chain_pem())]
    assert cert.subject in issuers


def test_ensure_ca_loser_of_a_race_reads_the_winner(authority, store, vault, now):
    winner = authority.ensure_ca(LB_CA)
    loser = CertificateAuthority(
        StaleRecords(store, LB_CA), vault, key_type=KeyType.EC_P256, now=now,
        ca_lifetime=3650 * DAY, cert_lifetime=365 * DAY, crl_lifetime=7 * DAY,
    )  # fmt: skip
    assert loser.ensure_ca(LB_CA) == winner
    assert [item.key for item in store.list("ca")].count(LB_CA) == 1


@pytest.mark.parametrize("name", [ROOT, "Not A Name", ""])
def test_ensure_ca_refuses_the_root_and_bad_names(authority, name):
    before = [item.key for item in authority.records.store.list("ca")]
    with pytest.raises((AuthorityError, ValueError)):
        authority.ensure_ca(name)
    assert [item.key for item in authority.records.store.list("ca")] == before


def test_bundles(authority):
    authority.create_master_ca("master2.internal")
    chain = x509.load_pem_x509_certificates(authority.ca_chain_pem(MASTER))
    assert chain == [authority.certificate(MASTER), authority.certificate(ROOT)]
    assert x509.load_pem_x509_certificates(authority.ca_chain_pem(ROOT)) == [authority.certificate(ROOT)]
    bundle = x509.load_pem_x509_certificates(authority.ca_bundle_pem())
    assert bundle[0] == authority.certificate(ROOT)
    assert set(bundle) == {authority.certificate(n) for n in (ROOT, MASTER, "master2.internal")}
    crls = load_crls(authority.crl_chain_pem())
    assert [c.issuer for c in crls] == [
        authority.certificate(n).subject for n in (ROOT, MASTER, "master2.internal")
    ]
    assert len(load_crls(authority.crl_chain_pem([ROOT, MASTER]))) == 2
    with pytest.raises(UnknownCA):
        authority.ca_chain_pem("nobody")
    with pytest.raises(UnknownCA):
        authority.crl_chain_pem(["nobody"])


def test_issue_from_unknown_ca(authority):
    with pytest.raises(UnknownCA):
        authority.issue("nobody", csr(), common_name=CERTNAME)


def test_revoke_records_and_numbers(authority, now):
    leaf = authority.issue(MASTER, csr(), common_name=CERTNAME)
    first = authority.revoke(MASTER, leaf.serial_number, CERTNAME, "superseded")
    now.t += 10
    second = authority.revoke(MASTER, leaf.serial_number, CERTNAME, "keyCompromise")
    assert (first.number, second.number) == (2, 3)
    revoked = Records(authority.records.store).list(RevokedRecord)
    assert [(v.record.serial, v.record.reason, v.record.revoked_at) for v in revoked] == [
        (leaf.serial_number, "superseded", T0)
    ]
    parsed = x509.load_pem_x509_crl(authority.crl(MASTER).crl_pem.encode())
    assert crl_number(parsed) == 3
    assert [r.serial_number for r in parsed] == [leaf.serial_number]
    # The root's CRL is untouched.
    assert authority.crl(ROOT).number == 1


@pytest.mark.parametrize(
    ("ca", "serial", "reason", "error"),
    [
        ("nobody", 5, "unspecified", UnknownCA),
        (MASTER, 0, "unspecified", ValueError),
        (MASTER, -5, "unspecified", ValueError),
        (MASTER, 1 << 160, "unspecified", ValueError),
        (MASTER, 5, "bored", ValueError),
    ],
)
def test_revoke_refuses_bad_input(authority, ca, serial, reason, error):
    with pytest.raises(error):
        authority.revoke(ca, serial, "x", reason)
    assert authority.records.store.list("revoked") == []
    assert authority.crl(MASTER).number == 1


def test_concurrent_revocations_from_two_daemons(authority, store, vault, now):
    """Two authorities on one store: every revocation lands, CRL numbers never repeat."""
    other = make_authority(store, vault, now)
    serials = {a: [1000 * (i + 1) + n for n in range(12)] for i, a in enumerate((authority, other))}
    numbers: list[int] = []
    errors: list[BaseException] = []

    def revoke_all(a: CertificateAuthority) -> None:
        try:
            for serial in serials[a]:
                numbers.append(a.revoke(MASTER, serial, "x").number)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=revoke_all, args=(a,)) for a in serials]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(numbers) == list(range(2, 26))
    crl = x509.load_pem_x509_crl(authority.crl(MASTER).crl_pem.encode())
    assert crl_number(crl) == 25
    assert sorted(r.serial_number for r in crl) == sorted(s for ss in serials.values() for s in ss)


@pytest.mark.parametrize(
    ("next_updates", "now", "margin_hours", "due"),
    [
        ({}, 0, 1, []),
        ({"root": 10 * 3600}, 0, 1, []),
        ({"root": 10 * 3600}, 9 * 3600, 1, ["root"]),  # exactly at the margin
        ({"root": 10 * 3600}, 9 * 3600 - 1, 1, []),
        ({"root": 10 * 3600}, 11 * 3600, 1, ["root"]),  # already expired: still re-signed
        ({"root": 10 * 3600, "m2": 3600, "m1": 2 * 3600}, 0, 2, ["m1", "m2"]),
        ({"root": 10 * 3600, "m1": 2 * 3600}, 0, 0, []),
    ],
)
def test_crls_due(next_updates, now, margin_hours, due):
    crls = [
        CRLRecord(ca=n, number=1, crl_pem="", this_update=0.0, next_update=t) for n, t in next_updates.items()
    ]
    assert crls_due(crls, now, timedelta(hours=margin_hours)) == due


def test_refresh_crls(authority, now):
    assert authority.refresh_crls(2 * DAY) == []
    now.t += 5 * 86400 + 1
    assert authority.refresh_crls(2 * DAY) == [MASTER, ROOT]
    assert (authority.crl(ROOT).number, authority.crl(MASTER).number) == (2, 2)
    assert authority.crl(MASTER).next_update == now.t + 7 * 86400
    # Done already: a second daemon running the same refresh finds nothing to do.
    assert authority.refresh_crls(2 * DAY) == []


def test_crl_refresher_keeps_crls_ahead_of_the_clock(authority, store, vault):
    clock = Clock()
    clock.advance(T0)
    ca = make_authority(store, vault, clock.seconds)
    leaf = ca.issue(MASTER, csr(), common_name=CERTNAME)
    ca.revoke(MASTER, leaf.serial_number, CERTNAME)
    refresher = CRLRefresher(
        lambda margin: succeed(ca.refresh_crls(margin)), clock, interval=timedelta(hours=6), margin=2 * DAY
    )
    refresher.startService()
    seen: dict[str, list[int]] = {ROOT: [], MASTER: []}
    for _ in range(60 * 24):  # 60 days in hours: many CRL lifetimes
        clock.advance(3600)
        for name, numbers in seen.items():
            crl = ca.crl(name)
            parsed = x509.load_pem_x509_crl(crl.crl_pem.encode())
            assert crl.next_update > clock.seconds() + 1 * 86400
            assert parsed.next_update_utc is not None
            assert parsed.next_update_utc.timestamp() == crl.next_update
            numbers.append(crl.number)
    for numbers in seen.values():
        assert numbers == sorted(numbers)
        assert numbers[-1] >= 60 // 5  # re-signed about every five days
    # The revocation survives every re-signing.
    parsed = x509.load_pem_x509_crl(ca.crl(MASTER).crl_pem.encode())
    assert parsed.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    d = refresher.stopService()
    assert d is not None
    assert d.called
    assert clock.getDelayedCalls() == []


def test_crl_refresher_survives_failures():
    clock = Clock()
    calls: list[timedelta] = []

    def call(margin: timedelta) -> Deferred[list[str]]:
        calls.append(margin)
        return fail(RuntimeError("store down")) if len(calls) == 1 else succeed(["root"])

    refresher = CRLRefresher(call, clock, interval=timedelta(minutes=10), margin=timedelta(hours=1))
    with capturedLogs() as events:
        refresher.startService()
        clock.advance(600)
    assert calls == [timedelta(hours=1)] * 2
    assert any(e.get("log_format") == "CRL refresh failed" for e in events)
    assert any(e.get("cas") == ["root"] for e in events)
    refresher.stopService()


def test_crl_refresher_waits_for_a_run_in_progress():
    clock = Clock()
    pending: Deferred[list[str]] = Deferred()
    refresher = CRLRefresher(
        lambda m: pending, clock, interval=timedelta(minutes=10), margin=timedelta(hours=1)
    )
    refresher.startService()
    stopped = refresher.stopService()
    assert stopped is not None
    assert not stopped.called
    pending.callback([])
    assert stopped.called


@pytest.mark.parametrize(("interval", "margin"), [(3600, 3600), (7200, 3600), (0, 3600)])
def test_crl_refresher_interval_must_be_inside_margin(interval, margin):
    with pytest.raises(ValueError, match="shorter than the margin"):
        CRLRefresher(
            lambda m: succeed([]),
            Clock(),
            interval=timedelta(seconds=interval),
            margin=timedelta(seconds=margin),
        )


def test_no_clear_ca_key_in_the_store(tmp_path, authority, store, vault):
    authority.issue(MASTER, csr(), common_name=CERTNAME)
    secrets = []
    for name in (ROOT, MASTER):
        record = authority.ca(name)
        pem = vault.open(unb64(record.sealed_key), name)
        key = load_private_key(pem)
        secrets += [
            pem,
            key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ),
            key.private_numbers().private_value.to_bytes(32, "big"),  # type: ignore[union-attr]
        ]
    items = [item for kind in KINDS for item in store.list(kind)]
    assert {item.kind for item in items} == {"ca", "crl"}
    text = json.dumps([item.value for item in items]).encode()
    blobs = [text] + [path.read_bytes() for path in tmp_path.iterdir() if path.name.startswith("puppetha.db")]
    for secret in secrets:
        for encoded in (secret, secret.hex().encode(), base64.b64encode(secret)):
            assert all(encoded not in blob for blob in blobs)


def test_swapped_sealed_key_refused(authority, store, vault, now):
    records = Records(store)
    master = records.get(CARecord, MASTER)
    assert master is not None
    swapped = CARecord(
        name=MASTER,
        certificate_pem=master.record.certificate_pem,
        sealed_key=authority.ca(ROOT).sealed_key,
        parent=ROOT,
        created_at=master.record.created_at,
    )
    records.replace(swapped, master.version)
    fresh = make_authority(store, vault, now)  # nothing cached
    with pytest.raises(VaultError):
        fresh.issue(MASTER, csr(), common_name=CERTNAME)


@pytest.mark.parametrize("name", ["root", "lb"])
def test_a_master_cannot_take_a_reserved_ca_name(authority: CertificateAuthority, name: str) -> None:
    with pytest.raises(AuthorityError, match=f"a master cannot be called '{name}'"):
        authority.create_master_ca(name)


D = DAY.total_seconds()


@pytest.mark.parametrize(
    ("not_after", "listed"),
    [
        (None, True),  # expiry unknown: listed for ever
        (T0 + 400 * D, True),  # not expired yet
        (T0 + 360 * D, True),  # expired, but less than one CRL period ago
        (T0 + 300 * D, False),  # expired long ago: dropped
    ],
)
def test_still_listed(not_after, listed) -> None:
    record = RevokedRecord(ca=MASTER, serial=7, revoked_at=T0, not_after=not_after)
    assert (still_listed([record], T0 + 365 * D, 7 * DAY) == [record]) is listed


def test_crls_stop_listing_certificates_long_expired(authority, now):
    leaf = authority.issue(MASTER, csr(), common_name=CERTNAME)
    expiry = leaf.not_valid_after_utc.timestamp()
    authority.revoke(MASTER, leaf.serial_number, CERTNAME, not_after=expiry)

    def listed() -> bool:
        crl = x509.load_pem_x509_crl(authority.crl(MASTER).crl_pem.encode())
        return leaf.serial_number in {r.serial_number for r in crl}

    assert listed()
    now.t = expiry + 1  # expired: still on the CRLs issued after its expiry
    authority.refresh_crls(timedelta(days=8))
    assert listed()
    now.t = expiry + 8 * D
    authority.refresh_crls(timedelta(days=8))
    assert not listed()
    # The record of the revocation is kept.
    kept = Records(authority.records.store).list(RevokedRecord)
    assert [v.record.serial for v in kept] == [leaf.serial_number]


def test_ca_certificates_are_parsed_once_and_follow_their_records(authority, store):
    """The parsed certificate is kept while its record holds the same PEM, and no longer."""
    authority.create_master_ca("m1.example.com")
    first = authority.certificate("m1.example.com")
    assert authority.certificate("m1.example.com") is first
    assert authority._chain("m1.example.com")[0] is first
    # Another certificate under the same name (as a re-made CA would be): read anew at once.
    records = Records(store)
    other = records.get(CARecord, ROOT)
    current = records.get(CARecord, "m1.example.com")
    assert other is not None
    assert current is not None
    records.replace(
        CARecord.from_value({**current.record.to_value(), "certificate_pem": other.record.certificate_pem}),
        current.version,
    )
    assert authority.certificate("m1.example.com").subject == authority.certificate(ROOT).subject
    assert authority._chain("m1.example.com")[0].subject == authority.certificate(ROOT).subject
