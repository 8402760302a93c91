"""Validation and merging of classifications: tables."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from puppetha.aws.cloud import SecurityGroup
from puppetha.enc import classify
from puppetha.enc.classify import (
    ClassificationError,
    NodeClassification,
    NodeFacts,
    check_certname,
    check_class_name,
    check_classification,
    check_environment,
    check_parameter_name,
    check_scope,
    check_value,
    classification_from_data,
    classification_to_yaml,
    explain,
    merge,
    scopes_for,
    to_enc_yaml,
)
from puppetha.store.records import Classification


@pytest.mark.parametrize(("name", "canonical"), [
    ("apache", "apache"),
    ("apache::mod::ssl", "apache::mod::ssl"),
    ("::apache", "apache"),
    ("role_web2", "role_web2"),
    ("a", "a"),
])
def test_class_names_accepted(name: str, canonical: str) -> None:
    assert check_class_name(name) == canonical


@pytest.mark.parametrize("name", [
    "", "::", "Apache", "apache::", "apache:::mod", "2apache", "_apache", "apache-web",
    "apache::Mod", "apache mod", "main", "settings", "class", "apache::if", "apache::init",
    "ap\u00e9", 7, None, "a" * 300,
])
def test_class_names_refused(name: Any) -> None:
    with pytest.raises(ClassificationError):
        check_class_name(name)


@pytest.mark.parametrize(("name", "top_scope", "ok"), [
    ("port", False, True),
    ("_private", False, True),
    ("maxClients", False, True),
    ("name", False, False),
    ("title", False, False),
    ("Port", False, False),
    ("9lives", False, False),
    ("a-b", False, False),
    ("ns::x", False, False),
    ("datacenter", True, True),
    ("trusted", True, False),
    ("facts", True, False),
    ("server_facts", True, False),
    ("environment", True, False),
    ("puppetha", True, False),
    ("clientcert", True, False),
    ("facts", False, True),  # a class may have a parameter named facts
])
def test_parameter_names(name: str, top_scope: bool, ok: bool) -> None:
    if ok:
        assert check_parameter_name(name, top_scope=top_scope) == name
    else:
        with pytest.raises(ClassificationError):
            check_parameter_name(name, top_scope=top_scope)


@pytest.mark.parametrize(("name", "ok"), [
    ("production", True), ("dev_2", True), ("Production", False), ("prod-1", False),
    ("", False), ("main", False), ("agent", False), ("user", False), ("master", False),
])
def test_environments(name: str, ok: bool) -> None:
    if ok:
        assert check_environment(name) == name
    else:
        with pytest.raises(ClassificationError):
            check_environment(name)


@pytest.mark.parametrize(("name", "ok"), [
    ("web1.example.com", True), ("i-0abc.ec2.internal", True), ("a", True), ("a" * 255, True),
    ("a" * 256, False), ("Web1", False), ("", False), ("web 1", False), ("web/1", False),
    ("web1\n", False), ("-web", False), ("../etc", False), ("caf\u00e9", False),
])
def test_certnames(name: str, ok: bool) -> None:
    if ok:
        assert check_certname(name) == name
    else:
        with pytest.raises(ClassificationError):
            check_certname(name)


@pytest.mark.parametrize(("scope", "ok"), [
    ("default", True),
    ("sg:web", True),
    ("sg:sg-0123456789abcdef0", True),
    ("sg:my group", True),
    ("sg:", False),
    ("sg: web", False),
    ("tag:role=web", True),
    ("tag:Name=", True),
    ("tag:aws:autoscaling:groupName=fleet-a", True),
    ("tag:role", False),
    ("tag:=web", False),
    ("tag:" + "k" * 129 + "=v", False),
    ("tag:role=" + "v" * 257, False),
    ("tag:role=a\nb", False),
    ("node:web1.example.com", True),
    ("node:WEB1", False),
    ("node:", False),
    ("defaults", False),
    ("host:web1", False),
    ("", False),
])
def test_scopes(scope: str, ok: bool) -> None:
    if ok:
        assert check_scope(scope) == scope
    else:
        with pytest.raises(ClassificationError):
            check_scope(scope)


@pytest.mark.parametrize(("value", "ok"), [
    ("text", True), (1, True), (-(2**63), True), (2**63 - 1, True), (2**63, False),
    (1.5, True), (float("nan"), False), (float("inf"), False), (True, True), (None, True),
    ([1, "a", [2]], True), ({"a": {"b": [1]}}, True), ({1: "a"}, False),
    (b"bytes", False), (datetime.date(2024, 1, 1), False), (object(), False),
    ({1, 2}, False), ("nul\x00", False), ("\ud800", False), ("x" * 70000, False),
])
def test_values(value: Any, ok: bool) -> None:
    if ok:
        assert check_value(value, "v") == (list(value) if isinstance(value, tuple) else value)
    else:
        with pytest.raises(ClassificationError):
            check_value(value, "v")


def test_values_are_bounded_in_depth() -> None:
    deep: Any = "leaf"
    for _ in range(11):
        deep = [deep]
    with pytest.raises(ClassificationError, match="nested deeper"):
        check_value(deep, "v")
    check_value(deep[0], "v")


def test_classification_size_is_bounded() -> None:
    big = {f"p{i}": "x" * 60000 for i in range(5)}
    with pytest.raises(ClassificationError, match="larger than"):
        check_classification(Classification("default", parameters=big))


@pytest.mark.parametrize(("data", "expected"), [
    (None, Classification("default")),
    ({"classes": ["ntp", "::ssh"]}, Classification("default", {"ntp": {}, "ssh": {}})),
    ({"classes": {"ntp": None, "apache": {"port": 8080}}},
     Classification("default", {"ntp": {}, "apache": {"port": 8080}})),
    ({"parameters": {"dc": "eu1"}, "environment": "production"},
     Classification("default", {}, {"dc": "eu1"}, "production")),
    ({"environment": ""}, Classification("default")),
])
def test_documents_accepted(data: Any, expected: Classification) -> None:
    assert classification_from_data("default", data) == expected


@pytest.mark.parametrize(("data", "message"), [
    ([1, 2], "is a hash"),
    ({"clases": ["ntp"]}, "unknown key"),
    ({"classes": ["Ntp"]}, "bad class name"),
    ({"classes": [1]}, "only strings"),
    ({"classes": {"ntp": [1]}}, "must be a hash"),
    ({"classes": {"ntp": None, "::ntp": None}}, "given twice"),
    ({"classes": {"ntp": {"name": "x"}}}, "reserved"),
    ({"parameters": {"trusted": {}}}, "reserved"),
    ({"parameters": {"puppetha": {}}}, "reserved"),
    ({"parameters": ["a"]}, "must be a hash"),
    ({"parameters": {"when": datetime.date(2024, 1, 1)}}, "quote dates"),
    ({"environment": "Prod"}, "bad environment"),
    ({"environment": 5}, "bad environment"),
])
def test_documents_refused(data: Any, message: str) -> None:
    with pytest.raises(ClassificationError, match=message):
        classification_from_data("default", data)


def test_stored_yaml_reads_back() -> None:
    c = Classification("tag:role=web", {"apache": {"port": 8080, "vhosts": ["a", "b"]}},
                       {"dc": "eu1"}, "production")
    again = classification_from_data(c.scope, yaml.safe_load(classification_to_yaml(c)))
    assert again == c


# -- merging --------------------------------------------------------------------------------

WEB = SecurityGroup("sg-00000000000000002", "web")
BASE = SecurityGroup("sg-00000000000000001", "base")


def facts(groups: tuple[SecurityGroup, ...] = (WEB, BASE), tags: dict[str, str] | None = None,
          ) -> NodeFacts:
    return NodeFacts("web1.example.com", "i-0123", "123456789012", "eu-west-1", "agent", groups,
                     {"role": "web", "env": "prod"} if tags is None else tags)


def test_scopes_in_merge_order() -> None:
    assert scopes_for(facts()) == [
        "default",
        "sg:base", "sg:sg-00000000000000001",
        "sg:web", "sg:sg-00000000000000002",
        "tag:env=prod", "tag:role=web",
        "node:web1.example.com",
    ]


def test_tags_that_no_scope_can_name_are_skipped() -> None:
    assert scopes_for(facts((), {"a=b": "c", "ok": "x\ny", "k": "v"})) == [
        "default", "tag:k=v", "node:web1.example.com"]


def C(scope: str, classes: dict[str, dict[str, Any]] | None = None,
      parameters: dict[str, Any] | None = None, environment: str | None = None) -> Classification:
    return Classification(scope, classes or {}, parameters or {}, environment)


MERGE_TABLE: list[tuple[str, list[Classification], dict[str, Any], dict[str, Any], str | None]] = [
    ("nothing stored: only the facts", [], {}, {}, None),
    ("default alone",
     [C("default", {"ntp": {}}, {"dc": "eu1"}, "production")],
     {"ntp": {}}, {"dc": "eu1"}, "production"),
    ("classes accumulate, class parameters merge key-wise, later wins",
     [C("default", {"apache": {"port": 80, "workers": 4}}),
      C("tag:role=web", {"apache": {"port": 8080}, "php": {}})],
     {"apache": {"port": 8080, "workers": 4}, "php": {}}, {}, None),
    ("security groups by name: base before web",
     [C("sg:web", parameters={"tier": "web"}), C("sg:base", parameters={"tier": "base"})],
     {}, {"tier": "web"}, None),
    ("a group's id scope after its name scope",
     [C("sg:sg-00000000000000002", parameters={"x": "id"}), C("sg:web", parameters={"x": "name"})],
     {}, {"x": "id"}, None),
    ("tags after groups, by key: env before role",
     [C("tag:role=web", parameters={"x": "role"}), C("tag:env=prod", parameters={"x": "env"}),
      C("sg:web", parameters={"x": "sg"})],
     {}, {"x": "role"}, None),
    ("the node's own entry last",
     [C("node:web1.example.com", {"apache": {"port": 1}}, {"x": "node"}, "canary"),
      C("tag:role=web", {"apache": {"port": 2}}, {"x": "tag"}, "production"),
      C("default", environment="base")],
     {"apache": {"port": 1}}, {"x": "node"}, "canary"),
    ("environment: the last one set, empty does not reset",
     [C("default", environment="production"), C("node:web1.example.com", {"ntp": {}})],
     {"ntp": {}}, {}, "production"),
    ("hash values are replaced whole, not deep-merged",
     [C("default", parameters={"h": {"a": 1, "b": 2}}), C("tag:env=prod", parameters={"h": {"a": 3}})],
     {}, {"h": {"a": 3}}, None),
    ("scopes of other groups, tags and nodes do not apply",
     [C("sg:db", {"mysql": {}}), C("tag:role=db", {"mysql": {}}), C("node:db1", {"mysql": {}}),
      C("tag:role=web2", {"mysql": {}})],
     {}, {}, None),
]


@pytest.mark.parametrize(("stored", "classes", "parameters", "environment"),
                         [row[1:] for row in MERGE_TABLE], ids=[row[0] for row in MERGE_TABLE])
def test_merge(stored: list[Classification], classes: dict[str, Any], parameters: dict[str, Any],
               environment: str | None) -> None:
    result = merge(facts(), {c.scope: c for c in stored})
    assert result.classes == classes
    assert result.environment == environment
    assert result.parameters == {**parameters, "puppetha": {
        "instance_id": "i-0123", "account": "123456789012", "region": "eu-west-1", "role": "agent",
        "security_groups": ["base", "web"],
        "security_group_ids": ["sg-00000000000000001", "sg-00000000000000002"],
    }}


def test_known_facts_cannot_be_overridden() -> None:
    # Even a classification written past validation (another tool, an old version) is ignored.
    sneaky = Classification("node:web1.example.com", parameters={"puppetha": {"role": "master"}})
    assert merge(facts(), {sneaky.scope: sneaky}).parameters["puppetha"]["role"] == "agent"


def test_merge_does_not_change_the_stored_classifications() -> None:
    a = C("default", {"apache": {"port": 80}}, {"x": 1})
    b = C("tag:role=web", {"apache": {"port": 8080}}, {"x": 2})
    merge(facts(), {a.scope: a, b.scope: b})
    assert a.classes == {"apache": {"port": 80}}
    assert a.parameters == {"x": 1}


def test_explain_says_where_each_piece_came_from() -> None:
    stored = [C("default", {"apache": {"port": 80, "workers": 4}}, {"dc": "eu1"}, "production"),
              C("sg:web", {"apache": {"port": 8080}}),
              C("node:web1.example.com", {"debug": {}}, {"dc": "eu2"})]
    e = explain(facts(), {c.scope: c for c in stored})
    assert [c.scope for c in e.contributions] == ["default", "sg:web", "node:web1.example.com"]
    assert e.origins == {
        "classes.apache": "default",
        "classes.apache.port": "sg:web",
        "classes.apache.workers": "default",
        "classes.debug": "node:web1.example.com",
        "parameters.dc": "node:web1.example.com",
        "parameters.puppetha": "puppetha",
        "environment": "default",
    }


def test_enc_yaml_has_puppets_shape() -> None:
    shared = ["a", "b"]
    stored = [C("default", {"apache": {"vhosts": shared}, "ntp": {}}, {"list": shared}, "production")]
    text = to_enc_yaml(merge(facts(), {c.scope: c for c in stored}))
    assert "&" not in text
    assert "*id" not in text
    document = yaml.safe_load(text)
    assert set(document) == {"classes", "parameters", "environment"}
    assert document["classes"] == {"apache": {"vhosts": ["a", "b"]}, "ntp": {}}
    assert document["parameters"]["list"] == ["a", "b"]
    assert document["environment"] == "production"


def test_enc_yaml_without_environment_leaves_it_to_puppet() -> None:
    document = yaml.safe_load(to_enc_yaml(merge(facts(), {})))
    assert document["classes"] == {}
    assert "environment" not in document


no_nul = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=50)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | no_nul,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                     max_size=4),
    max_leaves=20)


@given(json_values)
def test_any_valid_value_survives_the_enc_yaml(value: Any) -> None:
    c = check_classification(C("default", {"apache": {"v": value}}, {"v": value}))
    document = yaml.safe_load(to_enc_yaml(merge(facts(), {c.scope: c})))
    assert document["parameters"]["v"] == value
    assert document["classes"]["apache"]["v"] == value


def pyyaml_enc_yaml(result: NodeClassification) -> str:
    """What to_enc_yaml wrote before it wrote common values itself: PyYAML's block style."""
    document: dict[str, Any] = {"classes": result.classes, "parameters": result.parameters}
    if result.environment:
        document["environment"] = result.environment
    return yaml.dump(document, Dumper=classify._Dumper, default_flow_style=False, sort_keys=True,
                     explicit_start=True)


# Strings near the edges of what YAML writes plain: indicators, numbers, booleans, spaces.
plainish_text = st.text(alphabet="aZy09_./:@+=-", min_size=1, max_size=6)
plainish_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | plainish_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(plainish_text, children, max_size=4),
    max_leaves=25)
edgy_text = st.one_of(
    plainish_text,
    st.text(alphabet="aZ09_./:@+=-#' ~!&*?,[]{}|>%`\"\\", max_size=6),
    st.sampled_from(["yes", "No", "ON", "off", "null", "~", "1.5", "0x1f", "1:20", "2001-12-14", "<<",
                     "=", "---x", "...", "a:", "a:b", "/etc/x", "a" * 130, "1e3", ".5", "-", "_"]),
    no_nul,
)
edgy_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | edgy_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(edgy_text, children, max_size=4),
    max_leaves=25)


@given(st.dictionaries(edgy_text, edgy_values, max_size=5), st.sampled_from([None, "production"]))
def test_enc_yaml_is_byte_for_byte_what_pyyaml_writes(parameters: dict[str, Any],
                                                      environment: str | None) -> None:
    result = NodeClassification({"apache": {"v": parameters}, "ntp": {}}, parameters, environment)
    assert to_enc_yaml(result) == pyyaml_enc_yaml(result)


@given(st.dictionaries(plainish_text, plainish_values, max_size=5))
def test_enc_yaml_of_mostly_plain_values_is_what_pyyaml_writes(parameters: dict[str, Any]) -> None:
    result = NodeClassification({"apache": {"v": parameters}}, parameters, "production")
    assert to_enc_yaml(result) == pyyaml_enc_yaml(result)


def test_common_answers_are_written_without_pyyaml() -> None:
    result = merge(facts(), {"default": C("default", {"ssh": {"port": 22, "keys": ["a/b", 1.5e17]}},
                                          {"dc": "eu1", "flags": {"on": True, "x": None}}, "production")})
    assert "".join(classify._block_mapping({"classes": result.classes}, 0)).startswith("classes:\n")
    assert to_enc_yaml(result) == pyyaml_enc_yaml(result)
    assert classify._block_mapping({"account": "123456789012", "v": "yes"}, 0) == [
        "account: '123456789012'\n", "v: 'yes'\n"]
    with pytest.raises(classify._NotPlain):
        classify._block_mapping({"v": "a b"}, 0)  # may be folded by PyYAML: left to it


def test_the_size_limit_is_of_the_classification_as_stored() -> None:
    def of_size(size: int) -> Classification:
        pads = {f"p{i}": "" for i in range(8)}  # strings of at most 65536 characters each
        missing = size - len(json.dumps(C("default", {"ntp": {}}, pads).to_value(), separators=(",", ":")))
        for i in range(8):
            pads[f"p{i}"] = "x" * (missing // 8 + (i < missing % 8))
        return C("default", {"ntp": {}}, pads)

    limit = classify.MAX_CLASSIFICATION_BYTES
    assert check_classification(of_size(limit)) == of_size(limit)
    with pytest.raises(ClassificationError, match="larger than"):
        check_classification(of_size(limit + 1))
