"""The typed records over a real store (SQLite in a temporary directory)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from puppetha.store import AlreadyExists, VersionConflict
from puppetha.store.records import (
    CARecord,
    Classification,
    CRLRecord,
    EnrollmentClaim,
    IssuedCertificate,
    LeaseRecord,
    MasterRecord,
    NodeRecord,
    Record,
    Records,
    RevokedRecord,
    Versioned,
    b64,
    unb64,
)
from puppetha.store.sqlite import SQLiteStore
from puppetha.store.values import validate_kind

SERIAL_128 = 2**128 - 1
SERIAL_127 = 0x7A3F_0000_0000_0000_0000_0000_0000_0001

CERT = "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n"

NODE = NodeRecord(
    certname="a.example.com",
    instance_id="i-0123456789abcdef0",
    role="agent",
    account="123456789012",
    region="eu-west-1",
    private_ip="10.0.1.17",
    serial=SERIAL_127,
    issuer="master-1.example.com",
    certificate_pem=CERT,
    enrolled_at=1732450000.0,
    not_after=1763986000.0,
)
MASTER = MasterRecord(
    certname="master-1.example.com",
    address="10.0.1.5",
    port=8141,
    ca="master-1.example.com",
    registered_at=1732450000.0,
)
CLASSIFICATION = Classification(
    scope="sg:sg-0abc web",
    classes={"nginx": {"workers": 4, "sites": ["a", "b"]}, "ntp": {}},
    parameters={"role": "web", "nested": {"ok": True, "none": None}, "ünïcode": "日本"},
    environment="production",
)

RECORDS: list[Record] = [
    CARecord(
        name="root",
        certificate_pem=CERT,
        sealed_key=b64(b"\x00\xffsealed"),
        parent="root",
        created_at=1732450000.25,
    ),
    CARecord(
        name="master-1.example.com",
        certificate_pem=CERT,
        sealed_key=b64(b"sealed"),
        parent="root",
        created_at=1732450001.0,
    ),
    CRLRecord(
        ca="root",
        number=42,
        crl_pem="-----BEGIN X509 CRL-----\n...\n",
        this_update=1732450000.0,
        next_update=1733054800.0,
    ),
    RevokedRecord(ca="root", serial=SERIAL_128, revoked_at=1732450000.5, certname="old.example.com"),
    RevokedRecord(ca="root", serial=1, revoked_at=1732450000.5, reason="keyCompromise"),
    EnrollmentClaim(
        instance_id="i-0123456789abcdef0", role="agent", certname="a.example.com", claimed_at=1.5
    ),
    NODE,
    NodeRecord(
        certname="gone.example.com",
        instance_id="i-0fedcba9876543210",
        role="master",
        account="123456789012",
        region="eu-west-1",
        private_ip="10.0.1.18",
        serial=SERIAL_128,
        issuer="root",
        certificate_pem=CERT,
        enrolled_at=1732450000.0,
        not_after=1763986000.0,
        revoked_at=1732460000.0,
    ),
    MASTER,
    MasterRecord(
        certname="master-2.example.com",
        address="10.0.1.6",
        port=8141,
        ca="master-2.example.com",
        registered_at=1732450000.0,
        healthy=False,
    ),
    Classification(scope="default"),
    CLASSIFICATION,
    LeaseRecord(name="front", holder="lb-1", token=7, duration=10.0, renewed_at=123.5),
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(str(tmp_path / "store.sqlite"))
    yield store
    store.close()


@pytest.fixture
def records(store: SQLiteStore) -> Records:
    return Records(store)


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: f"{type(r).__name__}:{r.key()}")
def test_round_trip(tmp_path: Path, record: Record) -> None:
    path = str(tmp_path / "store.sqlite")
    first = SQLiteStore(path)
    item = Records(first).create(record)
    assert (item.kind, item.key, item.version) == (record.KIND, record.key(), 1)
    first.close()
    # Through a fresh store: what comes back is what was decoded from the file.
    second = SQLiteStore(path)
    got = Records(second).get(type(record), record.key())
    assert got == Versioned(record, 1)
    assert [v.record for v in Records(second).list(type(record))] == [record]
    second.close()


def test_kinds_are_distinct_and_valid() -> None:
    classes: list[type[Record]] = [
        CARecord,
        CRLRecord,
        RevokedRecord,
        EnrollmentClaim,
        NodeRecord,
        MasterRecord,
        Classification,
        LeaseRecord,
    ]
    kinds = [validate_kind(cls.KIND) for cls in classes]
    assert sorted(kinds) == ["ca", "claim", "class", "crl", "lease", "master", "node", "revoked"]


@pytest.mark.parametrize("serial", [0, 1, 2**63, 2**64 + 1, SERIAL_127, SERIAL_128])
def test_serials_survive_as_128_bit_ints(records: Records, store: SQLiteStore, serial: int) -> None:
    revoked = RevokedRecord(ca="root", serial=serial, revoked_at=1.0)
    records.create(revoked)
    # Stored as hex text: exact on every backend, whatever its number type.
    item = store.get("revoked", revoked.key())
    assert item is not None
    assert item.value["serial"] == f"{serial:x}"
    got = records.get(RevokedRecord, revoked.key())
    assert got is not None
    assert got.record.serial == serial
    assert type(got.record.serial) is int

    node = attrs.evolve(NODE, certname=f"n{serial}", serial=serial)
    records.create(node)
    got_node = records.get(NodeRecord, node.certname)
    assert got_node is not None
    assert got_node.record.serial == serial


def test_revoked_keys_list_by_ca_in_serial_order(records: Records) -> None:
    serials = [SERIAL_128, 1, 0xFF, 2**64, 0x10]
    for serial in serials:
        records.create(RevokedRecord(ca="root", serial=serial, revoked_at=1.0))
        records.create(RevokedRecord(ca="rootless", serial=serial, revoked_at=1.0))
    # Fixed-width hex keys sort like the numbers, and "root/" does not catch "rootless/".
    listed = records.list(RevokedRecord, "root/")
    assert [v.record.serial for v in listed] == sorted(serials)
    assert {v.record.ca for v in listed} == {"root"}
    assert RevokedRecord(ca="root", serial=0x10, revoked_at=1.0).key() == "root/" + "0" * 30 + "10"


def test_versioned_replace_flow(records: Records) -> None:
    lease = LeaseRecord(name="front", holder="lb-1", token=1, duration=10.0, renewed_at=0.0)
    records.create(lease)
    with pytest.raises(AlreadyExists):
        records.create(attrs.evolve(lease, holder="lb-2"))

    read = records.get(LeaseRecord, "front")
    assert read == Versioned(lease, 1)
    renewed = attrs.evolve(read.record, renewed_at=5.0)
    assert records.replace(renewed, read.version).version == 2

    # A holder that read before the renewal is refused, and changes nothing.
    taken = attrs.evolve(read.record, holder="lb-2", token=read.record.token + 1)
    with pytest.raises(VersionConflict):
        records.replace(taken, read.version)
    assert records.get(LeaseRecord, "front") == Versioned(renewed, 2)

    again = records.get(LeaseRecord, "front")
    assert again is not None
    assert records.replace(attrs.evolve(again.record, holder="lb-2", token=2), again.version).version == 3
    final = records.get(LeaseRecord, "front")
    assert final is not None
    assert (final.record.holder, final.record.token, final.version) == ("lb-2", 2, 3)


def test_replace_of_absent_record_conflicts(records: Records) -> None:
    with pytest.raises(VersionConflict):
        records.replace(Classification(scope="default"), 1)
    assert records.get(Classification, "default") is None


def test_a_node_record_of_the_older_shape_reads_with_its_certificate_as_history(
    store: SQLiteStore, records: Records
) -> None:
    """Records written before identities kept every certificate: the latest one is the history."""
    value = {k: v for k, v in NODE.to_value().items() if k != "certificates"}
    store.create("node", NODE.certname, value)
    got = records.get(NodeRecord, NODE.certname)
    assert got is not None
    assert got.record.certificates == (
        IssuedCertificate(SERIAL_127, NODE.issuer, "agent", NODE.certname, NODE.enrolled_at, NODE.not_after),
    )
    assert got.record.roles == ("agent",)


def test_a_node_keeps_every_certificate_of_every_role(tmp_path: Path) -> None:
    master_cert = IssuedCertificate(SERIAL_128, "a.example.com", "master", "a.example.com", 1.0, 2.0)
    node = attrs.evolve(NODE, certificates=(master_cert,))
    assert node.certificates[0] == master_cert
    assert node.certificates[1].serial == SERIAL_127
    assert node.roles == ("master", "agent")
    path = str(tmp_path / "again.sqlite")
    store = SQLiteStore(path)
    Records(store).create(node)
    assert [c["serial"] for c in store.get("node", node.certname).value["certificates"]] == [  # type: ignore[union-attr]
        f"{SERIAL_128:x}", f"{SERIAL_127:x}"]
    store.close()
    again = SQLiteStore(path)
    assert Records(again).get(NodeRecord, node.certname) == Versioned(node, 1)
    again.close()


def test_get_missing(records: Records) -> None:
    assert records.get(NodeRecord, "nobody.example.com") is None
    assert records.list(NodeRecord) == []


def test_unknown_fields_are_ignored(store: SQLiteStore, records: Records) -> None:
    # A newer daemon may add fields; an older one sharing the store still reads the record.
    lease = LeaseRecord(name="front", holder="lb-1", token=1, duration=10.0, renewed_at=0.0)
    store.create("lease", "front", {**lease.to_value(), "added_later": {"x": 1}})
    assert records.get(LeaseRecord, "front") == Versioned(lease, 1)


def test_missing_optional_fields_take_defaults(store: SQLiteStore, records: Records) -> None:
    value = {k: v for k, v in MASTER.to_value().items() if k != "healthy"}
    store.create("master", "master-1.example.com", value)
    got = records.get(MasterRecord, "master-1.example.com")
    assert got is not None
    assert got.record.healthy is True


def test_node_revoked_property() -> None:
    assert not NODE.revoked
    assert attrs.evolve(NODE, revoked_at=2.0).revoked


def test_to_value_does_not_share_state() -> None:
    value = CLASSIFICATION.to_value()
    value["classes"]["nginx"]["workers"] = 99
    assert CLASSIFICATION.classes["nginx"]["workers"] == 4


def test_b64_round_trip_and_refusal() -> None:
    data = bytes(range(256))
    assert unb64(b64(data)) == data
    with pytest.raises(ValueError, match=r"Incorrect padding|Only base64|Non-base64"):
        unb64("not base64!")
