"""The configuration: every kind of error names the file and the option; docs match the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from puppetha.config import (
    OPTIONS,
    ConfigError,
    config_from_string,
    duration,
    example_config,
    find_config,
    load_config,
    markdown_reference,
)

ROOT = Path(__file__).resolve().parent.parent


def refused(content: str, source: str = "puppetha.conf") -> str:
    with pytest.raises(ConfigError) as info:
        config_from_string(content, source)
    return str(info.value)


def test_embedded_defaults_are_valid() -> None:
    config = load_config(None)
    assert config.roles == ("enroll", "enc")
    assert config[("store", "backend")] == "sqlite"
    assert config[("store", "path")] == "/var/lib/puppetha/puppetha.sqlite"
    assert config[("aws", "accounts")] == ()  # deny by default


def test_state_dir_moves_the_derived_defaults() -> None:
    config = config_from_string("[daemon]\nstate_dir = /srv/p\n")
    assert config[("store", "path")] == "/srv/p/puppetha.sqlite"
    assert config[("pki", "vault_key_file")] == "/srv/p/ca-vault.key"


def test_state_dir_placeholder_expands_in_given_values() -> None:
    config = config_from_string("[daemon]\nstate_dir = /srv/p\n[store]\npath = {state_dir}/x.db\n")
    assert config[("store", "path")] == "/srv/p/x.db"


def test_overrides_win_over_the_file() -> None:
    config = config_from_string("[daemon]\nthreads = 3\n", overrides={("daemon", "threads"): "5"})
    assert config[("daemon", "threads")] == 5


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[daemon]\nroles = enroll, dns\n", "puppetha.conf: [daemon] roles: 'dns' is not one of"),
        ("[daemon]\nthreads = 0\n", "puppetha.conf: [daemon] threads: 0 is outside 1..64"),
        ("[daemon]\nthreads = many\n", "puppetha.conf: [daemon] threads: not a whole number"),
        ("[daemon]\nstate_dir = relative/dir\n", "[daemon] state_dir: must be an absolute path"),
        ("[pki]\nkey_type = dsa-1024\n", "puppetha.conf: [pki] key_type: 'dsa-1024' is not one of"),
        ("[pki]\ncrl_lifetime = soon\n", "puppetha.conf: [pki] crl_lifetime: not a duration"),
        ("[pki]\ncrl_lifetime = 0s\n", "[pki] crl_lifetime: must be longer than zero"),
        ("[aws]\naccounts = 1234\n", "puppetha.conf: [aws] accounts: not a 12-digit AWS account id"),
        ("[aws]\nendpoint_url = ftp://x\n", "[aws] endpoint_url: not an http(s) URL"),
        ("[aws]\nregion = us east 1\n", "[aws] region: not an AWS region name (like us-east-1)"),
        ("[enroll]\nproxy_from = 10.0.0.300\n", "[enroll] proxy_from: not an IP address"),
        ("[enroll]\nrequire_source_match = maybe\n", "[enroll] require_source_match: not a boolean"),
        ("[enroll]\nfront = puppet\n", "[enroll] front: not host:port"),
        ("[enroll]\nmaster_policy = role=master\n", "[enroll] master_policy: not a rule"),
        ("[enroll]\ncertname_template = {account}\n",
         "[enroll] certname_template: must contain {instance_id}"),
        ("[enroll]\ncertname_template = {instance_id}.{zone}\n", "certname_template: unknown field 'zone'"),
        ("[enroll]\nlisten = ssl:8080\n", "[enroll] listen: not a tcp: or unix: endpoint"),
        ("[enc]\nsocket_mode = 0666\n", "[enc] socket_mode: must give nothing to others"),
        ("[enc]\nsocket_mode = rw\n", "[enc] socket_mode: not an octal file mode"),
        ("[enc]\nstore_hot_window = 0s\n", "[enc] store_hot_window: must be longer than zero"),
        ("[enroll]\ndescribe_in_flight = 0\n", "[enroll] describe_in_flight: 0 is outside 1..8"),
        ("[enroll]\ndescribe_in_flight = 9\n", "[enroll] describe_in_flight: 9 is outside 1..8"),
    ],
)
def test_a_bad_value_names_the_file_section_and_option(content: str, expected: str) -> None:
    assert expected in refused(content)


def test_unknown_option_is_refused_with_the_known_ones() -> None:
    message = refused("[pki]\nkeytype = ec-p256\n")
    assert message.startswith("puppetha.conf: [pki] keytype: unknown option (known: key_type,")


def test_unknown_section_is_refused() -> None:
    assert "unknown section [puppet]" in refused("[puppet]\nserver = x\n")


def test_duplicate_option_is_refused() -> None:
    assert "puppetha.conf" in refused("[pki]\nkey_type = ec-p256\nkey_type = rsa-2048\n")


def test_syntax_error_is_one_line() -> None:
    message = refused("key_type = ec-p256\n")
    assert "\n" not in message
    assert message.startswith("puppetha.conf:")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[pki]\nvault = kms\n", "[pki] kms_key_id: required when vault = kms"),
        ("[store]\nbackend = dynamodb\n", "[pki] vault: must be kms with the dynamodb store"),
        ("[aws]\nidentity_certs = /nonexistent/aws.ini\n", "[aws] identity_certs: no such file"),
        ("[pki]\nkey_type = rsa-4096\nallowed_csr_keys = ec-p256\n", "[pki] allowed_csr_keys: must include"),
        ("[pki]\ncrl_lifetime = 1d\ncrl_refresh_margin = 2d\n", "[pki] crl_refresh_margin: must be shorter"),
        ("[daemon]\nthreads = 2\n[enroll]\ndescribe_in_flight = 3\n",
         "[enroll] describe_in_flight: more than [daemon] threads (2)"),
    ],
)
def test_options_checked_together(content: str, expected: str) -> None:
    assert expected in refused(content)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"
    with pytest.raises(ConfigError, match=rf"^{missing}: cannot read the configuration"):
        load_config(str(missing))


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_bytes(b"[pki]\nroot_name = \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(bad))


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("30s", 30), ("10m", 600), ("2h", 7200),
                                               ("7d", 604800), ("1.5h", 5400), ("5y", 5 * 365 * 86400)])
def test_durations(text: str, seconds: float) -> None:
    assert duration(text) == seconds


def test_the_shipped_example_is_generated_from_the_table() -> None:
    assert (ROOT / "etc" / "puppetha.conf").read_text() == example_config()


def test_the_reference_doc_is_generated_from_the_table() -> None:
    assert (ROOT / "docs" / "configuration.md").read_text() == markdown_reference()


def test_the_example_uncommented_is_a_valid_configuration() -> None:
    uncommented = "\n".join(
        line[1:] if line.startswith("#") and "=" in line and not line.startswith("# ") else line
        for line in example_config().splitlines()
    )
    config = config_from_string(uncommented, "etc/puppetha.conf")
    assert len(config.values) == len(OPTIONS)
    assert config == config_from_string("", "etc/puppetha.conf")


def test_the_lb_role_needs_its_certificate_and_key(tmp_path: Path) -> None:
    assert "[lb] certificate: required with role lb" in refused("[daemon]\nroles = lb\n")
    cert = tmp_path / "lb.pem"
    cert.write_text("x")
    message = refused(f"[daemon]\nroles = lb\n[lb]\ncertificate = {cert}\n"
                      f"private_key = {tmp_path}/none.pem\n")
    assert f"[lb] private_key: no such file: {tmp_path}/none.pem" in message


def test_lb_and_enroll_on_one_host_cannot_share_the_enrollment_port(tmp_path: Path) -> None:
    (tmp_path / "lb.pem").write_text("x")
    (tmp_path / "lb.key").write_text("x")
    lb = (f"[lb]\ncertificate = {tmp_path}/lb.pem\nprivate_key = {tmp_path}/lb.key\n"
          "master_name = puppet.test\n")
    message = refused("[daemon]\nroles = enroll, lb\n[enroll]\nlisten = tcp:8080\n" + lb)
    assert "[enroll] listen: port 8080 is nginx's [lb] enroll_port" in message
    config = config_from_string("[daemon]\nroles = enroll, lb\n[enroll]\nlisten = tcp:8081\n"
                                "proxy_from = 127.0.0.1\n" + lb + "enroll_backends = 127.0.0.1:8081\n")
    assert config[("lb", "enroll_backends")] == ("127.0.0.1:8081",)
    bad_backend = refused("[daemon]\nroles = lb\n" + lb + "enroll_backends = x\n")
    assert "[lb] enroll_backends: not host:port" in bad_backend


def test_the_front_host_must_be_a_name_a_certificate_can_carry() -> None:
    assert "[enroll] front:" in refused("[enroll]\nfront = bad host!:8140\n")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[lb]\nfront_port = 8145\n", "[lb] front_port: 8145 is inside the masters' ports 8141..8190"),
        ("[lb]\nenroll_port = 8141\n", "[lb] enroll_port: 8141 is inside the masters' ports"),
        ("[lb]\nenroll_port = 8140\n", "[lb] enroll_port: the same port as front_port"),
        ("[lb]\nfirst_master_port = 65500\n", "[lb] max_masters: ports 65500..65549 go past 65535"),
    ],
)
def test_the_lb_port_plan_is_checked_before_start(content: str, expected: str) -> None:
    assert expected in refused(content)


@pytest.mark.parametrize(
    ("named", "environ", "default_exists", "found"),
    [
        ("/srv/given.conf", {"PUPPETHA_CONFIG": "/srv/env.conf"}, True, "/srv/given.conf"),
        (None, {"PUPPETHA_CONFIG": "/srv/env.conf"}, True, "/srv/env.conf"),
        (None, {}, True, "DEFAULT"),
        (None, {"PUPPETHA_CONFIG": ""}, True, "DEFAULT"),
        (None, {}, False, None),
    ],
)
def test_the_configuration_is_found_by_flag_environment_or_default_file(
    tmp_path: Path, named: str | None, environ: dict[str, str], default_exists: bool, found: str | None
) -> None:
    default = tmp_path / "puppetha.conf"
    if default_exists:
        default.write_text("")
    expected = str(default) if found == "DEFAULT" else found
    assert find_config(named, environ, str(default)) == expected


def test_a_default_file_the_user_cannot_read_is_an_error_not_the_embedded_defaults(tmp_path: Path) -> None:
    default = tmp_path / "puppetha.conf"
    default.mkdir()  # unreadable as a file, for root too
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(find_config(None, {}, str(default)))


def test_an_lb_node_must_name_the_front_or_the_masters_name(tmp_path: Path) -> None:
    (tmp_path / "lb.pem").write_text("x")
    (tmp_path / "lb.key").write_text("x")
    lb = f"[daemon]\nroles = lb\n[lb]\ncertificate = {tmp_path}/lb.pem\nprivate_key = {tmp_path}/lb.key\n"
    # The default front host `puppet` is in no master's certificate: nginx would answer 502.
    assert "[lb] master_name: role lb needs the front's name" in refused(lb)
    named = config_from_string(lb + "master_name = puppet.example.net\n")
    assert named[("lb", "master_name")] == "puppet.example.net"
    fronted = config_from_string(lb + "[enroll]\nfront = puppet.example.net:8140\n")
    assert fronted[("enroll", "front")] == "puppet.example.net:8140"
    # Said on the command line counts as said.
    overridden = config_from_string(lb, overrides={("enroll", "front"): "puppet.example.net:8140"})
    assert overridden[("enroll", "front")] == "puppet.example.net:8140"
