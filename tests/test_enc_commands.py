"""``puppetha classify ...`` through the real command line, on a SQLite store in a temp dir."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from puppetha.cli import main
from puppetha.store.records import Classification, NodeRecord, Records
from puppetha.store.sqlite import SQLiteStore
from puppetha.testing.moto import TEST_CREDENTIALS, Fleet, MotoServer


class CLI:
    def __init__(self, state_dir: Path, config: Path | None = None) -> None:
        self.state_dir = state_dir
        self.config = config

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        prefix = ["--config", str(self.config)] if self.config else []
        status = main([*prefix, "--state-dir", str(self.state_dir), *argv], out=out, err=err)
        return status, out.getvalue(), err.getvalue()

    def records(self) -> Records:
        return Records(SQLiteStore(str(self.state_dir / "puppetha.sqlite")))


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    return CLI(tmp_path)


def test_set_show_list_delete(cli: CLI, tmp_path: Path) -> None:
    doc = tmp_path / "web.yaml"
    doc.write_text("classes:\n  apache:\n    port: 80\n  ntp:\nparameters:\n  dc: eu1\n")
    status, out, err = cli("classify", "set", "tag:role=web", "--file", str(doc),
                           "--class", "php", "--class-param", "apache::vhost.port=8080",
                           "--param", "replicas=3", "--param", "label=web", "--environment", "production")
    assert (status, err) == (0, "")
    assert out == "tag:role=web: 4 class(es), 3 parameter(s), environment production\n"
    status, out, _ = cli("classify", "show", "tag:role=web")
    assert status == 0
    assert yaml.safe_load(out) == {
        "classes": {"apache": {"port": 80}, "ntp": {}, "php": {}, "apache::vhost": {"port": 8080}},
        "parameters": {"dc": "eu1", "replicas": 3, "label": "web"},
        "environment": "production",
    }
    cli("classify", "set", "default", "--class", "base")
    status, out, _ = cli("classify", "list")
    assert out.splitlines() == [
        "default\tclasses=base parameters=0",
        "tag:role=web\tclasses=apache, apache::vhost, ntp, php parameters=3 environment=production",
    ]
    assert cli("classify", "delete", "default")[:2] == (0, "deleted default\n")
    assert cli("classify", "delete", "default")[0] == 2


def test_set_replaces_and_merge_updates(cli: CLI) -> None:
    cli("classify", "set", "default", "--class", "ntp", "--param", "a=1")
    cli("classify", "set", "default", "--class", "ssh")
    assert cli.records().get(Classification, "default").record == Classification(  # type: ignore[union-attr]
        "default", {"ssh": {}}, {}, None)
    cli("classify", "set", "default", "--merge", "--class", "ntp", "--param", 'b="2"')
    assert cli.records().get(Classification, "default").record == Classification(  # type: ignore[union-attr]
        "default", {"ssh": {}, "ntp": {}}, {"b": "2"}, None)


@pytest.mark.parametrize(("argv", "message"), [
    (["set", "host:web1", "--class", "ntp"], "bad scope"),
    (["set", "default", "--class", "Ntp"], "bad class name"),
    (["set", "default", "--param", "trusted=1"], "reserved"),
    (["set", "default", "--param", "novalue"], "expected KEY=VALUE"),
    (["set", "default", "--class-param", "ntp=1"], "expected CLASS.KEY=VALUE"),
    (["set", "default", "--environment", "Prod"], "bad environment"),
    (["set", "default", "--file", "/nonexistent.yaml"], "cannot read"),
    (["show", "default"], "no classification for default"),
    (["show", "tag:x"], "bad scope"),
    (["explain", "nobody.example.com", "--no-aws"], "is not enrolled"),
    (["explain", "Web1", "--no-aws"], "bad certname"),
])
def test_refusals_are_one_line_and_change_nothing(cli: CLI, argv: list[str], message: str) -> None:
    status, _, err = cli("classify", *argv)
    assert status == 2
    assert message in err
    assert err.count("\n") == 1
    assert cli("classify", "list")[1] == ""


@pytest.mark.parametrize(("text", "message"), [
    ("classes: [ntp\n", "not valid YAML"),
    ("when: 2024-01-01\n", "unknown key"),
    ("parameters:\n  when: 2024-01-01\n", "quote dates"),
    ("- a\n- b\n", "is a hash"),
])
def test_bad_files_are_refused(cli: CLI, tmp_path: Path, text: str, message: str) -> None:
    doc = tmp_path / "bad.yaml"
    doc.write_text(text)
    status, _, err = cli("classify", "set", "default", "--file", str(doc))
    assert status == 2
    assert message in err


def enroll(cli: CLI, instance_id: str = "i-0123456789abcdef0") -> None:
    cli.records().create(NodeRecord("web1.example.com", instance_id, "agent", "123456789012",
                                    "us-east-1", "10.0.0.1", 1, "root", "", 0.0, 1e12))


def test_explain_offline(cli: CLI) -> None:
    enroll(cli)
    cli("classify", "set", "default", "--class", "ntp", "--environment", "production")
    cli("classify", "set", "sg:web", "--class-param", "apache.port=80")
    cli("classify", "set", "tag:role=web", "--class-param", "apache.port=8080")
    status, out, err = cli("classify", "explain", "web1.example.com", "--no-aws",
                           "--sg", "web", "--tag", "role=web")
    assert (status, err) == (0, "")
    assert "#   * sg:web\n" in out
    assert "#     node:web1.example.com\n" in out
    assert "#   classes.apache.port <- tag:role=web\n" in out
    assert "#   environment <- default\n" in out
    document = yaml.safe_load(out)
    assert document["classes"] == {"ntp": {}, "apache": {"port": 8080}}


def test_explain_refuses_as_the_enc_does_when_a_stored_classification_is_invalid(cli: CLI) -> None:
    enroll(cli)
    cli("classify", "set", "default", "--class", "ntp")
    cli.records().store.create("class", "sg:web", {"scope": "sg:web", "classes": {"Bad-Name": {}}})
    status, out, err = cli("classify", "explain", "web1.example.com", "--no-aws", "--sg", "web")
    assert status == 2
    assert "sg:web" in err
    assert "invalid-classification" in err
    assert err.count("\n") == 1
    assert out == ""


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def test_explain_asks_aws(tmp_path: Path, moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # boto3's credential chain reads the environment: the test credentials reach only moto.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_CREDENTIALS["aws_secret_access_key"])
    config = tmp_path / "puppetha.conf"
    config.write_text(f"[aws]\nendpoint_url = {moto.endpoint_url}\n")
    cli = CLI(tmp_path, config)
    web = Fleet(moto.endpoint_url, "us-east-1").launch("agent", tags={"role": "web"},
                                                       security_groups=["web"])
    enroll(cli, web.instance_id)
    cli("classify", "set", "sg:web", "--class", "apache")
    status, out, err = cli("classify", "explain", "web1.example.com")
    assert (status, err) == (0, "")
    assert "#   classes.apache <- sg:web\n" in out
    assert yaml.safe_load(out)["parameters"]["puppetha"]["instance_id"] == web.instance_id
    status, _, err = cli("classify", "explain", "web1.example.com", "--sg", "db")
    assert status == 2
    assert "--no-aws" in err
