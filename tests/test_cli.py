"""The ``puppetha`` admin CLI: its answers, its refusals (one line, non-zero) and its effects."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from puppetha.build import make_authority, open_store, open_vault
from puppetha.cli import main
from puppetha.config import load_config
from puppetha.pki.certs import Usage
from puppetha.pki.keys import KeyType
from puppetha.store.records import EnrollmentClaim, IssuedCertificate, MasterRecord, NodeRecord, Records

NOW = 1_795_000_000.0


class Run:
    def __init__(self, status: int, out: str, err: str) -> None:
        self.status, self.out, self.err = status, out, err


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def cli(state: Path, *args: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    status = main(["--state-dir", str(state), *args], out=out, err=err, now=lambda: NOW)
    return Run(status, out.getvalue(), err.getvalue())


def enroll_by_hand(state: Path, certname: str = "i-0abc") -> NodeRecord:
    """What the enrollment service records for an agent, done directly through the same parts."""
    config = load_config(None, {("daemon", "state_dir"): str(state)})
    store = open_store(config)
    records = Records(store)
    authority = make_authority(config, records, open_vault(config), lambda: NOW)
    authority.create_master_ca("master-1")
    key = KeyType.EC_P256.generate()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, certname)]))
           .sign(key, hashes.SHA256()))
    cert = authority.issue("master-1", csr, common_name=certname, usage=Usage.CLIENT)
    node = NodeRecord(certname=certname, instance_id=certname, role="agent", account="123456789012",
                      region="us-east-1", private_ip="10.0.0.5", serial=cert.serial_number,
                      issuer="master-1", certificate_pem=cert.public_bytes(Encoding.PEM).decode(),
                      enrolled_at=NOW, not_after=NOW + timedelta(days=365).total_seconds())
    records.create(node)
    records.create(EnrollmentClaim(certname, "agent", certname, NOW, "issued"))
    store.close()
    return node


def test_help_touches_nothing(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "puppetha.cli", "--state-dir", str(tmp_path / "s"), "--help"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0
    assert "classify" in run.stdout
    assert "node" in run.stdout
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv", [["node", "show", "nosuchnode"], ["classify", "show", "node:nosuchnode"]])
def test_refusal_as_a_module_is_one_line(tmp_path: Path, argv: list[str]) -> None:
    """``python -m puppetha.cli`` runs cli.py as ``__main__``; a command group that imported
    ``puppetha.cli`` raised another module's CLIError, which escaped as a traceback (exit 1)."""
    run = subprocess.run([sys.executable, "-m", "puppetha.cli", "--state-dir", str(tmp_path / "s"), *argv],
                         capture_output=True, text=True, check=False)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr.startswith("puppetha: ")
    assert run.stderr.count("\n") == 1, run.stderr


def test_ca_init_then_show(state: Path) -> None:
    created = cli(state, "ca", "init")
    assert created.status == 0, created.err
    fingerprint = created.out.split("fingerprint ")[1].strip()
    shown = cli(state, "ca", "show")
    assert shown.status == 0
    assert fingerprint in shown.out
    assert "CN=puppetha Root CA" in shown.out
    assert (state / "ca-vault.key").stat().st_mode & 0o777 == 0o600


def test_ca_init_twice_is_refused_and_keeps_the_first_root(state: Path) -> None:
    first = cli(state, "ca", "init")
    again = cli(state, "ca", "init")
    assert again.status == 2
    assert again.err == "puppetha: the store already has a root CA (see `puppetha ca show`)\n"
    assert first.out.split("fingerprint ")[1].strip() in cli(state, "ca", "show").out


def test_ca_show_on_an_empty_store_says_what_to_do(state: Path) -> None:
    run = cli(state, "ca", "show")
    assert run.status == 2
    assert "run `puppetha ca init`" in run.err


def test_ca_show_pem_prints_a_chain_openssl_reads(state: Path, tmp_path: Path) -> None:
    cli(state, "ca", "init")
    enroll_by_hand(state)
    run = cli(state, "ca", "show", "--pem", "master-1")
    assert run.status == 0
    chain = x509.load_pem_x509_certificates(run.out.encode())
    assert [c.subject == c.issuer for c in chain] == [False, True]
    assert cli(state, "ca", "show", "--pem", "nobody").status == 2


def test_a_command_without_the_vault_key_fails_with_one_line(state: Path) -> None:
    cli(state, "ca", "init")
    (state / "ca-vault.key").unlink()
    run = cli(state, "crl", "show", "--pem")
    assert run.status == 1
    assert run.err.count("\n") == 1
    assert "ca-vault.key" in run.err


def test_node_list_show_and_json(state: Path) -> None:
    cli(state, "ca", "init")
    node = enroll_by_hand(state)
    listed = cli(state, "node", "list")
    assert listed.status == 0
    assert listed.out.splitlines()[1].split()[:4] == [node.certname, "agent", node.instance_id, "master-1"]
    as_json = [json.loads(line) for line in cli(state, "node", "list", "--json").out.splitlines()]
    assert as_json[0]["serial"] == f"{node.serial:x}"
    assert cli(state, "node", "list", "--role", "master").out.count("\n") == 1  # header only
    shown = cli(state, "node", "show", node.certname)
    assert "revoked_at   -" in shown.out
    assert cli(state, "node", "show", node.certname, "--pem").out == node.certificate_pem


def test_node_show_unknown_is_refused(state: Path) -> None:
    cli(state, "ca", "init")
    run = cli(state, "node", "show", "i-nothere")
    assert (run.status, run.err) == (2, "puppetha: no node named 'i-nothere'\n")


def test_revoke_publishes_the_serial_in_the_issuers_crl(state: Path) -> None:
    cli(state, "ca", "init")
    node = enroll_by_hand(state)
    run = cli(state, "node", "revoke", node.certname, "--reason", "keyCompromise")
    assert run.status == 0, run.err
    assert "CRL 2 of master-1" in run.out
    bundle = cli(state, "crl", "show", "--pem").out
    crls = [x509.load_pem_x509_crl(f"-----BEGIN X509 CRL-----{part}".encode())
            for part in bundle.split("-----BEGIN X509 CRL-----")[1:]]
    assert len(crls) == 2  # root and master-1
    revoked = {entry.serial_number for crl in crls for entry in crl}
    assert node.serial in revoked
    assert "revoked" in cli(state, "node", "list").out
    shown = cli(state, "crl", "show")
    assert f"{node.serial:x}" in shown.out
    again = cli(state, "node", "revoke", node.certname)
    assert again.status == 2
    assert "already revoked" in again.err


def test_reset_revokes_and_lets_the_instance_enroll_again(state: Path) -> None:
    cli(state, "ca", "init")
    node = enroll_by_hand(state)
    run = cli(state, "node", "reset", node.certname)
    assert run.status == 0, run.err
    # The age check still holds after a reset: the operator is told so, with the limit.
    assert "[enroll] max_age (1h)" in run.out
    assert "refused (403 too-old)" in run.out
    config = load_config(None, {("daemon", "state_dir"): str(state)})
    store = open_store(config)
    try:
        assert store.get("claim", f"{node.instance_id}/agent") is None
        assert store.get("node", node.certname) is None
        assert store.get("revoked", f"master-1/{node.serial:032x}") is not None
    finally:
        store.close()


def test_unknown_command_exits_non_zero(state: Path) -> None:
    assert cli(state, "frobnicate").status == 2


def test_a_bad_config_file_is_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "p.conf"
    conf.write_text("[store]\nbackend = postgres\n")
    out, err = io.StringIO(), io.StringIO()
    status = main(["--config", str(conf), "node", "list"], out=out, err=err)
    assert status == 2
    assert err.getvalue() == f"puppetha: {conf}: [store] backend: 'postgres' is not one of sqlite, dynamodb\n"


def test_store_init_on_sqlite(state: Path) -> None:
    run = cli(state, "store", "init")
    assert run.status == 0
    assert (state / "puppetha.sqlite").exists()


def test_ca_init_on_a_store_with_a_root_creates_no_new_vault_key(state: Path) -> None:
    cli(state, "ca", "init")
    (state / "ca-vault.key").unlink()
    again = cli(state, "ca", "init")
    assert again.status == 2
    assert "already has a root CA" in again.err
    assert not (state / "ca-vault.key").exists()


def test_without_config_the_cli_uses_the_fleets_file_and_says_which_store(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    default = tmp_path / "puppetha.conf"
    default.write_text(f"[daemon]\nstate_dir = {fleet}\n")
    out, err = io.StringIO(), io.StringIO()
    status = main(["classify", "set", "default", "--class", "ntp"], out=out, err=err,
                  environ={}, default_config=str(default))
    assert status == 0, err.getvalue()
    assert err.getvalue() == f"puppetha: store sqlite:{fleet}/puppetha.sqlite (config: {default})\n"
    listed = cli(fleet, "classify", "show", "default")
    assert "ntp" in listed.out


def test_puppetha_config_names_the_file_when_the_flag_does_not(tmp_path: Path) -> None:
    other = tmp_path / "other.conf"
    other.write_text(f"[daemon]\nstate_dir = {tmp_path / 'other'}\n")
    default = tmp_path / "puppetha.conf"
    default.write_text(f"[daemon]\nstate_dir = {tmp_path / 'default'}\n")
    out, err = io.StringIO(), io.StringIO()
    status = main(["store", "init"], out=out, err=err,
                  environ={"PUPPETHA_CONFIG": str(other)}, default_config=str(default))
    assert status == 0, err.getvalue()
    assert f"(config: {other})" in err.getvalue()
    assert (tmp_path / "other" / "puppetha.sqlite").exists()
    assert not (tmp_path / "default").exists()


def test_a_fleet_file_the_operator_cannot_read_stops_the_cli_before_any_store(tmp_path: Path) -> None:
    default = tmp_path / "puppetha.conf"
    default.mkdir()  # unreadable as a file whoever runs the test
    out, err = io.StringIO(), io.StringIO()
    status = main(["--state-dir", str(tmp_path / "s"), "classify", "set", "default", "--class", "ntp"],
                  out=out, err=err, environ={}, default_config=str(default))
    assert status == 2
    assert err.getvalue().startswith(f"puppetha: {default}: cannot read the configuration")
    assert not (tmp_path / "s").exists()


def test_revoke_covers_every_certificate_of_the_instance_and_deregisters_its_master(state: Path) -> None:
    """A master that also enrolled as an agent: `node revoke` leaves neither certificate valid."""
    cli(state, "ca", "init")
    agent = enroll_by_hand(state, "i-0both")
    config = load_config(None, {("daemon", "state_dir"): str(state)})
    store = open_store(config)
    records = Records(store)
    authority = make_authority(config, records, open_vault(config), lambda: NOW)
    ca = authority.create_master_ca("i-0both")
    key = KeyType.EC_P256.generate()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "i-0both")]))
           .sign(key, hashes.SHA256()))
    master_cert = authority.issue("i-0both", csr, common_name="i-0both", usage=Usage.BOTH)
    found = records.get(NodeRecord, "i-0both")
    assert found is not None
    both = attrs.evolve(found.record, certificates=(
        IssuedCertificate(master_cert.serial_number, "i-0both", "master", "i-0both", NOW, NOW + 1e7),
        *found.record.certificates))
    records.replace(both, found.version)
    records.create(MasterRecord("i-0both", "10.0.0.5", 8140, "i-0both", NOW))
    store.close()

    shown = cli(state, "node", "show", "i-0both").out
    assert "roles        master,agent" in shown
    assert shown.count("certificate  ") == 2
    assert "i-0both" in cli(state, "node", "list", "--role", "master").out

    run = cli(state, "node", "revoke", "i-0both")
    assert run.status == 0, run.err
    assert "deregistered master i-0both" in run.out
    bundle = cli(state, "crl", "show", "--pem").out
    crls = [x509.load_pem_x509_crl(f"-----BEGIN X509 CRL-----{part}".encode())
            for part in bundle.split("-----BEGIN X509 CRL-----")[1:]]
    revoked = {(crl.issuer, entry.serial_number) for crl in crls for entry in crl}
    master_ca = x509.load_pem_x509_certificate(ca.certificate_pem.encode())
    assert (master_ca.subject, master_cert.serial_number) in revoked
    assert (x509.load_pem_x509_certificate(agent.certificate_pem.encode()).issuer, agent.serial) in revoked
    store = open_store(config)
    try:
        assert store.get("master", "i-0both") is None
    finally:
        store.close()
    assert "already revoked" in cli(state, "node", "revoke", "i-0both").err


def test_revoking_a_node_of_the_older_shape_still_deregisters_its_master(state: Path) -> None:
    cli(state, "ca", "init")
    node = enroll_by_hand(state, "i-0old")
    config = load_config(None, {("daemon", "state_dir"): str(state)})
    store = open_store(config)
    value = {k: v for k, v in node.to_value().items() if k != "certificates"}
    store.replace("node", "i-0old", value, 1)
    Records(store).create(MasterRecord("i-0old", "10.0.0.5", 8140, "i-0old", NOW))
    store.close()
    run = cli(state, "node", "revoke", "i-0old")
    assert run.status == 0, run.err
    assert "deregistered master i-0old" in run.out
    store = open_store(config)
    try:
        assert store.get("master", "i-0old") is None
        assert store.get("revoked", f"master-1/{node.serial:032x}") is not None
    finally:
        store.close()


def test_output_whose_reader_left_ends_without_a_traceback(tmp_path: Path) -> None:
    # `puppetha ca show | head -0`: the reader has closed the pipe before anything is written.
    assert main(["--state-dir", str(tmp_path), "ca", "init"], out=io.StringIO(), err=io.StringIO()) == 0
    command = [sys.executable, "-m", "puppetha.cli", "--state-dir", str(tmp_path), "ca", "show"]
    shown = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert shown.stdout is not None
    assert shown.stderr is not None
    shown.stdout.close()
    errors = shown.stderr.read()
    assert shown.wait(timeout=60) == 1
    assert errors == b""
