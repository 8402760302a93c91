"""The [ha] section: off by default, and an lb node's failover settings checked before it starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from puppetha.config import ConfigError, config_from_string

EIP = "eipalloc-0123456789abcdef0"


def lb(tmp_path: Path) -> str:
    (tmp_path / "lb.pem").write_text("x")
    (tmp_path / "lb.key").write_text("x")
    return f"[daemon]\nroles = lb\n[lb]\ncertificate = {tmp_path}/lb.pem\nprivate_key = {tmp_path}/lb.key\n"


def refused(content: str) -> str:
    with pytest.raises(ConfigError) as caught:
        config_from_string(content, "test.conf")
    return str(caught.value)


def test_off_by_default_and_the_defaults_are_consistent(tmp_path: Path) -> None:
    config = config_from_string(lb(tmp_path))
    assert config[("ha", "elastic_ip")] == ""
    assert (config[("ha", "lease_duration")], config[("ha", "lease_margin")],
            config[("ha", "renew_interval")]) == (0.8, 0.2, 0.2)
    assert config[("ha", "heartbeat_interval")] == 0.1


def test_an_lb_node_with_an_elastic_ip_needs_its_instance_and_address(tmp_path: Path) -> None:
    base = lb(tmp_path) + f"[ha]\nelastic_ip = {EIP}\n"
    assert "[ha] instance_id: required with elastic_ip" in refused(base)
    assert "[ha] address: required with elastic_ip" in refused(base + "instance_id = i-0123456789abcdef0\n")
    config = config_from_string(base + "instance_id = i-0123456789abcdef0\naddress = 10.0.0.5\n")
    assert config[("ha", "address")] == "10.0.0.5"


def test_other_hosts_may_name_the_elastic_ip_for_status() -> None:
    assert config_from_string(f"[ha]\nelastic_ip = {EIP}\n")[("ha", "elastic_ip")] == EIP


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("lease_margin = 0.8s\n", "[ha] lease_margin: must be shorter than lease_duration"),
        ("renew_interval = 0.7s\n", "[ha] renew_interval: must be shorter than lease_duration - lease_"),
    ],
)
def test_timings_that_would_flap_or_be_unsafe_are_refused(tmp_path: Path, extra: str, expected: str) -> None:
    base = lb(tmp_path) + f"[ha]\nelastic_ip = {EIP}\ninstance_id = i-0123456789abcdef0\naddress = 10.0.0.5\n"
    assert expected in refused(base + extra)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("elastic_ip = 203.0.113.7\n", "[ha] elastic_ip: not an Elastic IP allocation id"),
        ("instance_id = web-1\n", "[ha] instance_id: not an EC2 instance id"),
        ("address = somewhere\n", "[ha] address: not an IP address"),
        ("heartbeat_port = 0\n", "[ha] heartbeat_port: 0 is outside 1..65535"),
    ],
)
def test_bad_values_are_named(line: str, expected: str) -> None:
    assert expected in refused("[ha]\n" + line)
