"""
``puppetha classify set|show|list|delete|explain``: the operator's view of classifications.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from puppetha.context import CLIError, Context
from puppetha.enc.classify import (
    ClassificationError,
    Explanation,
    NodeFacts,
    check_certname,
    check_class_name,
    check_classification,
    check_scope,
    classification_from_data,
    classification_to_yaml,
    explain,
    scopes_for,
    to_enc_yaml,
)
from puppetha.store import AlreadyExists, VersionConflict
from puppetha.store.records import Classification, NodeRecord


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser(
        "classify", help="classifications: what the ENC answers",
        description="Classifications by scope: default, sg:<group name or id>, tag:<key>=<value>, "
                    "node:<certname>; merged in that order, later wins (docs/enc.md).")
    commands = group.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    p = commands.add_parser("set", help="store the classification of a scope",
                            description="Replace the classification of SCOPE (with --merge: update "
                                        "it) from a YAML file and/or options; options win over the "
                                        "file. VALUEs are JSON (8080, true, [1,2], \"8080\"), "
                                        "anything else is a string.")
    p.add_argument("scope")
    p.add_argument("--file", metavar="F.yaml",
                   help="a YAML document with classes, parameters, environment ('-': stdin)")
    p.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a top-scope parameter")
    p.add_argument("--class-param", action="append", default=[], metavar="CLASS.KEY=VALUE",
                   help="a class parameter (adds the class)")
    p.add_argument("--environment", metavar="NAME")
    p.add_argument("--merge", action="store_true",
                   help="start from the stored classification instead of an empty one")
    p.set_defaults(func=set_classification)

    p = commands.add_parser("show", help="print the classification of a scope as YAML")
    p.add_argument("scope")
    p.set_defaults(func=show_classification)

    p = commands.add_parser("list", help="list the classified scopes")
    p.set_defaults(func=list_classifications)

    p = commands.add_parser("delete", help="delete the classification of a scope")
    p.add_argument("scope")
    p.set_defaults(func=delete_classification)

    p = commands.add_parser(
        "explain", help="a node's merged classification and where each piece came from",
        description="Reads the node's record from the store and its security groups and tags "
                    "from AWS. With --no-aws, only the groups and tags given by --sg and --tag "
                    "count (what-if, offline).")
    p.add_argument("certname")
    p.add_argument("--no-aws", action="store_true", help="do not ask AWS")
    p.add_argument("--sg", action="append", default=[], metavar="GROUP",
                   help="with --no-aws: a security group name (or id: sg-...)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="with --no-aws: a tag")
    p.set_defaults(func=explain_node)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _assignment(text: str, option: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise CLIError(f"{option} {text!r}: expected KEY=VALUE")
    return key, value


def _read_document(path: str) -> object:
    import sys

    import yaml

    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read {path}: {e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CLIError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None


def build_classification(args: argparse.Namespace, base: Classification | None) -> Classification:
    """The classification ``set`` stores: ``base`` (or the file) updated by the options."""
    scope = check_scope(args.scope)
    if args.file:
        c = classification_from_data(scope, _read_document(args.file))
        if base is not None:
            c = Classification(scope, {**base.classes, **c.classes},
                               {**base.parameters, **c.parameters},
                               c.environment or base.environment)
    else:
        c = base or Classification(scope)
    classes = {name: dict(params) for name, params in c.classes.items()}
    parameters = dict(c.parameters)
    for name in args.classes:
        classes.setdefault(check_class_name(name), {})
    for text in args.class_param:
        target, value = _assignment(text, "--class-param")
        name, dot, key = target.rpartition(".")
        if not dot or not name or not key:
            raise CLIError(f"--class-param {text!r}: expected CLASS.KEY=VALUE")
        classes.setdefault(check_class_name(name), {})[key] = _value(value)
    for text in args.param:
        key, value = _assignment(text, "--param")
        parameters[key] = _value(value)
    environment = args.environment if args.environment is not None else c.environment
    return classification_from_data(
        scope, {"classes": classes, "parameters": parameters, "environment": environment or None})


def set_classification(ctx: Context, args: argparse.Namespace) -> int:
    try:
        scope = check_scope(args.scope)
        current = ctx.records.get(Classification, scope)
        c = build_classification(args, current.record if current and args.merge else None)
    except ClassificationError as e:
        raise CLIError(str(e)) from None
    try:
        if current is None:
            ctx.records.create(c)
        else:
            ctx.records.replace(c, current.version)
    except (AlreadyExists, VersionConflict):
        raise CLIError(f"{scope} was changed meanwhile; nothing written, try again") from None
    print(f"{scope}: {len(c.classes)} class(es), {len(c.parameters)} parameter(s)"
          + (f", environment {c.environment}" if c.environment else ""), file=ctx.out)
    return 0


def show_classification(ctx: Context, args: argparse.Namespace) -> int:
    scope = _scope(args.scope)
    found = ctx.records.get(Classification, scope)
    if found is None:
        raise CLIError(f"no classification for {scope}")
    ctx.out.write(classification_to_yaml(found.record))
    return 0


def list_classifications(ctx: Context, args: argparse.Namespace) -> int:
    for found in ctx.records.list(Classification):
        c = found.record
        summary = ", ".join(sorted(c.classes)) or "-"
        env = f" environment={c.environment}" if c.environment else ""
        print(f"{c.scope}\tclasses={summary} parameters={len(c.parameters)}{env}", file=ctx.out)
    return 0


def delete_classification(ctx: Context, args: argparse.Namespace) -> int:
    scope = _scope(args.scope)
    if not ctx.records.store.delete(Classification.KIND, scope):
        raise CLIError(f"no classification for {scope}")
    print(f"deleted {scope}", file=ctx.out)
    return 0


def _scope(text: str) -> str:
    try:
        return check_scope(text)
    except ClassificationError as e:
        raise CLIError(str(e)) from None


def node_facts(ctx: Context, args: argparse.Namespace) -> NodeFacts:
    """The node's facts: its record, and security groups and tags from AWS or the options."""
    from puppetha.aws.cloud import CloudError, SecurityGroup

    try:
        certname = check_certname(args.certname)
    except ClassificationError as e:
        raise CLIError(str(e)) from None
    found = ctx.records.get(NodeRecord, certname)
    if found is None:
        raise CLIError(f"{certname} is not enrolled")
    node = found.record
    if args.no_aws:
        groups = [SecurityGroup(g, "") if g.startswith("sg-") else SecurityGroup("", g)
                  for g in args.sg]
        tags = dict(_assignment(t, "--tag") for t in args.tag)
    else:
        if args.sg or args.tag:
            raise CLIError("--sg and --tag need --no-aws")
        from puppetha.build import make_cloud

        try:
            info = make_cloud(ctx.config).describe_instances(node.region, [node.instance_id])
        except CloudError as e:
            raise CLIError(f"cannot ask AWS ({e}); --no-aws explains without it") from None
        instance = info.get(node.instance_id)
        if instance is None:
            raise CLIError(f"instance {node.instance_id} of {certname} does not exist")
        groups, tags = list(instance.security_groups), dict(instance.tags)
    return NodeFacts(certname, node.instance_id, node.account, node.region, node.role, groups, tags)


def explain_node(ctx: Context, args: argparse.Namespace) -> int:
    facts = node_facts(ctx, args)
    stored: dict[str, Classification] = {}
    for scope in scopes_for(facts):
        # Checked as the ENC service checks them: an invalid one refuses the node there.
        try:
            found = ctx.records.get(Classification, scope)
            if found is not None:
                stored[scope] = check_classification(found.record)
        except (ClassificationError, TypeError, KeyError) as e:
            raise CLIError(f"stored {scope} is invalid ({' '.join(str(e).split())}): the ENC "
                             f"refuses {facts.certname} (invalid-classification)") from None
    ctx.out.write(format_explanation(facts, explain(facts, stored)))
    return 0


def format_explanation(facts: NodeFacts, explanation: Explanation) -> str:
    used = {c.scope for c in explanation.contributions}
    lines = [f"# {facts.certname}: scopes in merge order (* = classified)"]
    lines += [f"#   {'*' if s in used else ' '} {s}" for s in scopes_for(facts)]
    lines.append("# where each piece comes from:")
    lines += [f"#   {path} <- {scope}" for path, scope in sorted(explanation.origins.items())]
    return "\n".join(lines) + "\n" + to_enc_yaml(explanation.result)
