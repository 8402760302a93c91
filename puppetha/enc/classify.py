"""
Classification: validating what operators store, and merging it into Puppet's ENC answer.

Everything here is pure.  A node's answer is the merge, in this order (later wins), of the
classifications stored for:

1. ``default``;
2. each of its security groups, ordered by group name then id: ``sg:<name>``, then ``sg:<id>``;
3. each of its tags, ordered by key: ``tag:<key>=<value>``;
4. ``node:<certname>``.

Classes accumulate (a later scope cannot remove one); a class's parameters merge key by key,
as do the top-scope parameters; the environment is the last one set.  Finally the top-scope
parameter ``puppetha`` is set to what puppetha knows for certain about the node
(:func:`known_facts`); no classification can set or override it.  ``docs/enc.md`` has the
whole story.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml
from attrs import field, frozen

from puppetha.aws.cloud import SecurityGroup
from puppetha.store.records import Classification


class ClassificationError(ValueError):
    """Input that Puppet would not accept, or that puppetha refuses to store; one clear line."""


# -- names ------------------------------------------------------------------------------------

#: One namespace segment of a class name (Puppet's "acceptable characters in names").
_CLASS_SEGMENT = re.compile(r"[a-z][a-z0-9_]*\Z")
#: Class and top-scope parameter names (Puppet's PARAM_NAME, ASCII only).
_PARAMETER_NAME = re.compile(r"[a-z_][a-zA-Z0-9_]*\Z")
_ENVIRONMENT_NAME = re.compile(r"[a-z0-9_]+\Z")
#: Certnames puppetha serves: lowercase DNS-like names, no whitespace, no slash.
_CERTNAME = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
_SECURITY_GROUP_ID = re.compile(r"sg-[0-9a-f]{8,17}\Z")

MAX_CERTNAME_BYTES = 255

#: Words of the Puppet language that cannot name a class.
RESERVED_WORDS = frozenset({
    "and", "application", "attr", "case", "class", "component", "consumes", "default", "define",
    "else", "elsif", "environment", "false", "function", "if", "import", "in", "inherits", "node",
    "or", "private", "produces", "regexp", "site", "true", "type", "undef", "unit", "unless",
})
#: Namespaces Puppet makes itself.
RESERVED_CLASS_NAMES = frozenset({"main", "settings"})
#: Parameters no class may declare.
RESERVED_CLASS_PARAMETERS = frozenset({"name", "title"})
#: Top-scope variables that Puppet sets itself (or refuses), and puppetha's own.
RESERVED_TOP_SCOPE = frozenset({
    "trusted", "facts", "server_facts", "name", "title", "environment", "module_name",
    "caller_module_name", "clientcert", "clientversion", "clientnoop", "servername",
    "serverip", "serverversion", "settings", "puppetha",
})
#: Environment names that collide with puppet.conf's sections.
RESERVED_ENVIRONMENTS = frozenset({"main", "master", "server", "agent", "user"})

#: The top-scope parameter that carries :func:`known_facts`.
FACTS_PARAMETER = "puppetha"


def check_class_name(name: object) -> str:
    """The canonical class name (without a leading ``::``), or :class:`ClassificationError`."""
    if not isinstance(name, str):
        raise ClassificationError(f"class name must be a string, not {type(name).__name__}")
    canonical = name.removeprefix("::")
    segments = canonical.split("::")
    if len(name) > 255 or not all(_CLASS_SEGMENT.match(s) for s in segments):
        raise ClassificationError(
            f"bad class name {name!r}: segments of lowercase letters, digits and _, each starting "
            "with a letter, joined by ::")
    if canonical in RESERVED_CLASS_NAMES or any(s in RESERVED_WORDS for s in segments):
        raise ClassificationError(f"bad class name {name!r}: reserved by Puppet")
    if len(segments) == 2 and segments[1] == "init":
        raise ClassificationError(f"bad class name {name!r}: <module>::init is reserved by Puppet")
    return canonical


def check_parameter_name(name: object, *, top_scope: bool) -> str:
    if not isinstance(name, str) or not _PARAMETER_NAME.match(name) or len(name) > 255:
        raise ClassificationError(
            f"bad parameter name {name!r}: a lowercase letter or _, then letters, digits or _")
    reserved = RESERVED_TOP_SCOPE if top_scope else RESERVED_CLASS_PARAMETERS
    if name in reserved:
        raise ClassificationError(f"bad parameter name {name!r}: reserved")
    return name


def check_environment(name: object) -> str:
    if not isinstance(name, str) or not _ENVIRONMENT_NAME.match(name) or len(name) > 255:
        raise ClassificationError(f"bad environment {name!r}: lowercase letters, digits and _ only")
    if name in RESERVED_ENVIRONMENTS:
        raise ClassificationError(f"bad environment {name!r}: reserved by Puppet")
    return name


def check_certname(name: object) -> str:
    if (not isinstance(name, str) or not _CERTNAME.match(name)
            or len(name.encode("utf-8")) > MAX_CERTNAME_BYTES):
        raise ClassificationError(
            f"bad certname {name!r}: up to {MAX_CERTNAME_BYTES} lowercase letters, digits, "
            "'.', '-' and '_'")
    return name


# -- values -----------------------------------------------------------------------------------

MAX_DEPTH = 10
MAX_STRING = 65536
#: Upper bound of one classification, as compact JSON.
MAX_CLASSIFICATION_BYTES = 256 * 1024
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1  # Puppet's Integer


def check_value(value: object, where: str, depth: int = 0) -> Any:
    """
    A JSON-compatible copy of ``value`` (YAML/JSON scalars, lists, string-keyed hashes), or
    :class:`ClassificationError`.  Dates, bytes and other objects are refused.
    """
    if depth > MAX_DEPTH:
        raise ClassificationError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise ClassificationError(f"{where}: integer out of Puppet's 64-bit range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ClassificationError(f"{where}: not a finite number")
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ClassificationError(f"{where}: string longer than {MAX_STRING} characters")
        if "\x00" in value:
            raise ClassificationError(f"{where}: string contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ClassificationError(f"{where}: string is not valid Unicode") from None
        return value
    if isinstance(value, list | tuple):
        return [check_value(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ClassificationError(f"{where}: hash key {k!r} is not a string")
            out[k] = check_value(v, f"{where}.{k}", depth + 1)
        return out
    raise ClassificationError(
        f"{where}: {type(value).__name__} is not allowed (strings, numbers, booleans, null, "
        "lists and hashes only; quote dates)")


# -- scopes -----------------------------------------------------------------------------------


def check_scope(scope: object) -> str:
    """``default``, ``sg:<group name or id>``, ``tag:<key>=<value>`` or ``node:<certname>``."""
    if not isinstance(scope, str):
        raise ClassificationError("scope must be a string")
    if scope == "default":
        return scope
    kind, sep, rest = scope.partition(":")
    if sep and kind == "node":
        check_certname(rest)
        return scope
    if sep and kind == "sg":
        if not 0 < len(rest) <= 255 or not rest.isprintable() or rest != rest.strip():
            raise ClassificationError(f"bad scope {scope!r}: sg:<group name or sg-id>")
        return scope
    if sep and kind == "tag":
        key, eq, value = rest.partition("=")
        if not eq or not _tag_addressable(key, value):
            raise ClassificationError(
                f"bad scope {scope!r}: tag:<key>=<value>, key of 1-128 printable characters "
                "without '=', value of 0-256")
        return scope
    raise ClassificationError(
        f"bad scope {scope!r}: default, sg:<group>, tag:<key>=<value> or node:<certname>")


def _tag_addressable(key: str, value: str) -> bool:
    return (0 < len(key) <= 128 and "=" not in key and len(value) <= 256
            and key.isprintable() and value.isprintable())


def security_group_scopes(groups: Sequence[SecurityGroup]) -> list[str]:
    out: list[str] = []
    for g in sorted(groups, key=lambda g: (g.group_name, g.group_id)):
        for name in (g.group_name, g.group_id):
            scope = f"sg:{name}"
            if name and scope not in out:
                out.append(scope)
    return out


def tag_scopes(tags: Mapping[str, str]) -> list[str]:
    return [f"tag:{k}={tags[k]}" for k in sorted(tags) if _tag_addressable(k, tags[k])]


# -- classifications --------------------------------------------------------------------------


def check_classification(c: Classification) -> Classification:
    """The classification with canonical class names, or :class:`ClassificationError`."""
    scope = check_scope(c.scope)
    if not isinstance(c.classes, Mapping):
        raise ClassificationError(f"{scope}: classes must be a hash of class name to parameters")
    classes: dict[str, dict[str, Any]] = {}
    for name, given in c.classes.items():
        canonical = check_class_name(name)
        if canonical in classes:
            raise ClassificationError(f"{scope}: class {canonical} given twice")
        params = {} if given is None else given
        if not isinstance(params, Mapping):
            raise ClassificationError(f"{scope}: parameters of class {canonical} must be a hash")
        classes[canonical] = {
            check_parameter_name(k, top_scope=False): check_value(v, f"{canonical}.{k}")
            for k, v in params.items()
        }
    if not isinstance(c.parameters, Mapping):
        raise ClassificationError(f"{scope}: parameters must be a hash")
    parameters = {
        check_parameter_name(k, top_scope=True): check_value(v, f"parameters.{k}")
        for k, v in c.parameters.items()
    }
    environment = None if c.environment in (None, "") else check_environment(c.environment)
    checked = Classification(scope, classes, parameters, environment)
    # As stored (to_value), without attrs' deep copy: the ENC checks every classification it reads.
    stored = {"scope": scope, "classes": classes, "parameters": parameters, "environment": environment}
    if len(json.dumps(stored, separators=(",", ":"))) > MAX_CLASSIFICATION_BYTES:
        raise ClassificationError(f"{scope}: larger than {MAX_CLASSIFICATION_BYTES} bytes")
    return checked


def classification_from_data(scope: str, data: object) -> Classification:
    """
    A classification from a parsed YAML/JSON document: a hash with ``classes`` (a hash of class
    to parameters, or a list of class names), ``parameters`` and ``environment``, all optional.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ClassificationError("a classification is a hash with classes, parameters, environment")
    unknown = sorted(str(k) for k in data if k not in ("classes", "parameters", "environment"))
    if unknown:
        raise ClassificationError(f"unknown key(s) {', '.join(unknown)}: "
                                  "only classes, parameters, environment")
    classes: Any = data.get("classes") or {}
    if isinstance(classes, list):
        if not all(isinstance(n, str) for n in classes):
            raise ClassificationError("classes: a list of class names must hold only strings")
        classes = {n: {} for n in classes}
    parameters = data.get("parameters") or {}
    environment = data.get("environment")
    return check_classification(Classification(scope, classes, parameters, environment))


# -- merging ----------------------------------------------------------------------------------


def _groups(groups: Iterable[SecurityGroup]) -> tuple[SecurityGroup, ...]:
    return tuple(groups)


@frozen
class NodeFacts:
    """What puppetha knows of a node: its record and what AWS says of its instance."""

    certname: str
    instance_id: str
    account: str
    region: str
    role: str
    security_groups: tuple[SecurityGroup, ...] = field(converter=_groups, default=())
    tags: Mapping[str, str] = field(factory=dict)


def known_facts(facts: NodeFacts) -> dict[str, Any]:
    """The ``puppetha`` top-scope hash: facts the node cannot fake and operators cannot override."""
    groups = sorted(facts.security_groups, key=lambda g: (g.group_name, g.group_id))
    return {
        "instance_id": facts.instance_id,
        "account": facts.account,
        "region": facts.region,
        "role": facts.role,
        "security_groups": [g.group_name for g in groups],
        "security_group_ids": [g.group_id for g in groups],
    }


def scopes_for(facts: NodeFacts) -> list[str]:
    """The scopes that apply to a node, in merge order."""
    return [
        "default",
        *security_group_scopes(facts.security_groups),
        *tag_scopes(facts.tags),
        f"node:{facts.certname}",
    ]


@frozen
class NodeClassification:
    """The merged answer, in Puppet's ENC shape."""

    classes: dict[str, dict[str, Any]]
    parameters: dict[str, Any]
    environment: str | None = None


@frozen
class Explanation:
    result: NodeClassification
    #: The stored classifications that applied, in merge order.
    contributions: tuple[Classification, ...]
    #: Where each piece of the result came from: ``classes.<c>``, ``classes.<c>.<param>``,
    #: ``parameters.<p>``, ``environment`` -> scope (``puppetha`` for the known facts).
    origins: dict[str, str]


def explain(facts: NodeFacts, classifications: Mapping[str, Classification]) -> Explanation:
    """Merge the ``classifications`` (by scope; absent scopes are skipped) for ``facts``."""
    classes: dict[str, dict[str, Any]] = {}
    parameters: dict[str, Any] = {}
    environment: str | None = None
    origins: dict[str, str] = {}
    used: list[Classification] = []
    for scope in scopes_for(facts):
        c = classifications.get(scope)
        if c is None:
            continue
        used.append(c)
        for name, params in c.classes.items():
            origins.setdefault(f"classes.{name}", scope)
            merged = classes.setdefault(name, {})
            for k, v in params.items():
                merged[k] = v
                origins[f"classes.{name}.{k}"] = scope
        for k, v in c.parameters.items():
            if k == FACTS_PARAMETER:
                continue  # never from a classification, even one stored without validation
            parameters[k] = v
            origins[f"parameters.{k}"] = scope
        if c.environment:
            environment = c.environment
            origins["environment"] = scope
    parameters[FACTS_PARAMETER] = known_facts(facts)
    origins[f"parameters.{FACTS_PARAMETER}"] = FACTS_PARAMETER
    return Explanation(NodeClassification(classes, parameters, environment), tuple(used), origins)


def merge(facts: NodeFacts, classifications: Mapping[str, Classification]) -> NodeClassification:
    return explain(facts, classifications).result


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """Safe dumping without anchors and aliases: every value written out where it is used."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_enc_yaml(result: NodeClassification) -> str:
    """Puppet's ENC document: ``classes`` (a hash), ``parameters``, and ``environment`` if set."""
    document: dict[str, Any] = {"classes": result.classes, "parameters": result.parameters}
    if result.environment:
        document["environment"] = result.environment
    try:
        return "---\n" + "".join(_block_mapping(document, 0))
    except _NotPlain:
        return yaml.dump(document, Dumper=_Dumper, default_flow_style=False, sort_keys=True,
                         explicit_start=True)


# The ENC answers every catalog, and PyYAML's representer (Python even with the C emitter)
# was most of the ENC service's time.  Answers hold few kinds of values, so the common ones are
# written here exactly as PyYAML writes them in block style (tests compare the two on random
# documents); anything else, a string that needs quoting among them, goes to PyYAML.

class _NotPlain(Exception):
    """A value the fast writer leaves to PyYAML."""


#: Strings PyYAML writes plain, or else in single quotes as they are: ASCII without spaces,
#: quotes, comments, flow or leading indicators.
_SIMPLE_STRING = re.compile(r"[A-Za-z0-9_/][A-Za-z0-9_./:@+=-]*\Z")
_STR_TAG = "tag:yaml.org,2002:str"
_resolver = yaml.resolver.Resolver()
#: How each string seen is written ("" when PyYAML must write it), by string.
_written: dict[str, str] = {"": "''"}
_WRITTEN_MEMORY = 100_000


def _string(value: str) -> str:
    if not _SIMPLE_STRING.match(value):
        return ""
    if (value.endswith(":") or value.startswith(("---", "..."))
            # What PyYAML's resolver would read back as another type (yes, 1.5, ~, 1:20).
            or _resolver.resolve(yaml.ScalarNode, value, (True, False)) != _STR_TAG):
        return f"'{value}'"
    return value


def _scalar(value: object, key: bool = False) -> str:
    if isinstance(value, str):
        written = _written.get(value)
        if written is None:
            written = _string(value)
            if len(_written) >= _WRITTEN_MEMORY:
                _written.clear()
                _written[""] = "''"
            _written[value] = written
        if not written or (key and len(value) >= 128):
            raise _NotPlain
        return written
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value).lower()
        return text.replace("e", ".0e", 1) if "." not in text and "e" in text else text
    raise _NotPlain


def _is_mapping(value: object) -> bool:
    return type(value) is dict or isinstance(value, Mapping)  # dicts first: ABC checks are slow


def _is_sequence(value: object) -> bool:
    return type(value) is list or isinstance(value, list | tuple)


def _block_mapping(mapping: Mapping[str, Any], indent: int) -> list[str]:
    """A non-empty mapping in block style at column ``indent``, one string per line."""
    lines: list[str] = []
    pad = " " * indent
    for key in sorted(mapping):
        value = mapping[key]
        written_key = _written.get(key)  # the common case without a call
        if not written_key or len(key) >= 128:
            written_key = _scalar(key, key=True)
        if type(value) is str:
            lines.append(f"{pad}{written_key}: {_written.get(value) or _scalar(value)}\n")
        elif _is_mapping(value):
            if value:
                lines.append(f"{pad}{written_key}:\n")
                lines += _block_mapping(value, indent + 2)
            else:
                lines.append(f"{pad}{written_key}: {{}}\n")
        elif _is_sequence(value):
            if value:
                lines.append(f"{pad}{written_key}:\n")
                lines += _block_sequence(value, indent)  # PyYAML does not indent these
            else:
                lines.append(f"{pad}{written_key}: []\n")
        else:
            lines.append(f"{pad}{written_key}: {_scalar(value)}\n")
    return lines


def _block_sequence(items: Sequence[Any], indent: int) -> list[str]:
    lines: list[str] = []
    pad = " " * indent
    for item in items:
        if type(item) is str:
            lines.append(f"{pad}- {_written.get(item) or _scalar(item)}\n")
        elif _is_mapping(item) or _is_sequence(item):
            if not item:
                lines.append(f"{pad}- {{}}\n" if _is_mapping(item) else f"{pad}- []\n")
                continue
            # The first line of a nested collection goes on the dash's line.
            inner = (_block_mapping(item, indent + 2) if _is_mapping(item)
                     else _block_sequence(item, indent + 2))
            lines.append(f"{pad}- {inner[0][indent + 2:]}")
            lines += inner[1:]
        else:
            lines.append(f"{pad}- {_scalar(item)}\n")
    return lines


def classification_to_yaml(c: Classification) -> str:
    """A stored classification as the document :func:`classification_from_data` reads back."""
    document: dict[str, Any] = {"classes": c.classes, "parameters": c.parameters}
    if c.environment:
        document["environment"] = c.environment
    return yaml.dump(document, Dumper=_Dumper, default_flow_style=False, sort_keys=True)
