"""
The ``ca``, ``node``, ``crl`` and ``store`` command groups of the ``puppetha`` CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509

from puppetha.context import EXIT_FAILED, CLIError, Context
from puppetha.pki.authority import ROOT, CAExists, UnknownCA
from puppetha.pki.certs import fingerprint
from puppetha.store import StoreError
from puppetha.store.records import CARecord, CRLRecord, MasterRecord, NodeRecord, Versioned

if TYPE_CHECKING:
    from puppetha.enroll.service import RevokedIdentity

REASONS = ("unspecified", "keyCompromise", "superseded", "cessationOfOperation", "affiliationChanged")


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = subparsers.add_parser("ca", help="the root CA and the masters' CAs")
    ca_sub = ca.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = ca_sub.add_parser("init", help="create the root CA (and the vault key) in an empty store")
    p.set_defaults(func=ca_init)
    p = ca_sub.add_parser("show", help="every CA with its fingerprint; --pem prints a chain")
    p.add_argument("--pem", metavar="CA", nargs="?", const=ROOT,
                   help="print the PEM chain of this CA (default: the root) instead")
    p.set_defaults(func=ca_show)

    node = subparsers.add_parser("node", help="enrolled nodes")
    node_sub = node.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = node_sub.add_parser("list", help="one line per node")
    p.add_argument("--role", choices=("agent", "master", "lb"))
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(func=node_list)
    p = node_sub.add_parser("show", help="one node in full")
    p.add_argument("certname")
    p.add_argument("--pem", action="store_true", help="print its certificate instead")
    p.set_defaults(func=node_show)
    p = node_sub.add_parser(
        "revoke", help="revoke every certificate of the node's instance, deregister it, publish the CRLs")
    p.add_argument("certname")
    p.add_argument("--reason", choices=REASONS, default="unspecified")
    p.set_defaults(func=node_revoke)
    p = node_sub.add_parser(
        "reset", help="revoke a node and forget its enrollment, so that its instance may enroll again")
    p.add_argument("certname")
    p.set_defaults(func=node_reset)

    crl = subparsers.add_parser("crl", help="certificate revocation lists")
    crl_sub = crl.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = crl_sub.add_parser("show", help="every CA's CRL: number, validity, revoked serials")
    p.add_argument("--pem", action="store_true", help="print the CRL bundle (every CA) instead")
    p.set_defaults(func=crl_show)

    store = subparsers.add_parser("store", help="the store itself")
    store_sub = store.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = store_sub.add_parser("init", help="create the store (the DynamoDB table); safe to repeat")
    p.set_defaults(func=store_init)
    p = store_sub.add_parser("migrate", help="copy every record from one store into another")
    p.add_argument("--from", dest="source", required=True, metavar="sqlite:PATH|dynamodb:TABLE")
    p.add_argument("--to", dest="target", required=True, metavar="sqlite:PATH|dynamodb:TABLE")
    p.set_defaults(func=store_migrate)


def _span(seconds: float) -> str:
    """A duration as the configuration writes it (``1h``, ``90m``, ``45s``)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- ca


def ca_init(ctx: Context, args: argparse.Namespace) -> int:
    from puppetha.build import make_authority, open_vault, store_has_root

    if store_has_root(ctx.records)():
        # Before the vault: a refused init leaves no new key file behind.
        raise CLIError("the store already has a root CA (see `puppetha ca show`)")
    vault = open_vault(ctx.config, create=True, has_root=store_has_root(ctx.records))
    authority = make_authority(ctx.config, ctx.records, vault, ctx.now)
    try:
        record = authority.init_root(ctx.config[("pki", "root_name")])
    except CAExists:
        raise CLIError("the store already has a root CA (see `puppetha ca show`)") from None
    cert = x509.load_pem_x509_certificate(record.certificate_pem.encode())
    print(f"created root CA {cert.subject.rfc4514_string()}", file=ctx.out)
    print(f"fingerprint {fingerprint(cert)}", file=ctx.out)
    return 0


def ca_show(ctx: Context, args: argparse.Namespace) -> int:
    if args.pem:
        try:
            ctx.out.write(ctx.authority.ca_chain_pem(args.pem).decode("ascii"))
        except UnknownCA:
            raise CLIError(f"no CA named {args.pem!r}") from None
        return 0
    cas = ctx.records.list(CARecord)
    if not cas:
        raise CLIError("the store has no CA yet; run `puppetha ca init` or start the daemon")
    for found in sorted(cas, key=lambda v: (v.record.name != ROOT, v.record.name)):
        cert = x509.load_pem_x509_certificate(found.record.certificate_pem.encode())
        kind = "root" if found.record.name == ROOT else f"master CA, under {found.record.parent}"
        print(f"{found.record.name}  ({kind})", file=ctx.out)
        print(f"  subject      {cert.subject.rfc4514_string()}", file=ctx.out)
        print(f"  fingerprint  {fingerprint(cert)}", file=ctx.out)
        print(f"  valid until  {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}", file=ctx.out)
    return 0


# -- node


def _node(ctx: Context, certname: str) -> Versioned[NodeRecord]:
    found = ctx.records.get(NodeRecord, certname)
    if found is None:
        raise CLIError(f"no node named {certname!r}")
    return found


def _node_dict(node: NodeRecord) -> dict[str, Any]:
    return {
        "certname": node.certname,
        "role": node.role,
        "instance_id": node.instance_id,
        "account": node.account,
        "region": node.region,
        "private_ip": node.private_ip,
        "issuer": node.issuer,
        "serial": f"{node.serial:x}",
        "enrolled_at": _when(node.enrolled_at),
        "not_after": _when(node.not_after),
        "revoked_at": _when(node.revoked_at) if node.revoked else None,
        "roles": list(node.roles),
        "certificates": [
            {"serial": f"{c.serial:x}", "issuer": c.issuer, "role": c.role, "certname": c.certname,
             "issued_at": _when(c.issued_at), "not_after": _when(c.not_after)}
            for c in node.certificates
        ],
    }


def node_list(ctx: Context, args: argparse.Namespace) -> int:
    nodes = [v.record for v in ctx.records.list(NodeRecord)]
    if args.role:
        nodes = [n for n in nodes if args.role in n.roles]
    if args.json:
        for node in nodes:
            print(json.dumps(_node_dict(node), sort_keys=True), file=ctx.out)
        return 0
    rows = [("CERTNAME", "ROLE", "INSTANCE", "ISSUER", "ENROLLED", "STATUS")]
    rows += [(n.certname, ",".join(n.roles), n.instance_id, n.issuer, _when(n.enrolled_at),
              "revoked" if n.revoked else "valid") for n in nodes]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=ctx.out)
    return 0


def node_show(ctx: Context, args: argparse.Namespace) -> int:
    node = _node(ctx, args.certname).record
    if args.pem:
        ctx.out.write(node.certificate_pem)
        return 0
    shown = _node_dict(node)
    certificates = shown.pop("certificates")
    shown["roles"] = ",".join(shown["roles"])
    for key, value in shown.items():
        print(f"{key:12} {value if value is not None else '-'}", file=ctx.out)
    # Every certificate the instance holds, and so every one `node revoke` revokes.
    for c in certificates:
        print(f"certificate  {c['serial']}  {c['role']}  issued by {c['issuer']} at {c['issued_at']}, "
              f"valid until {c['not_after']}", file=ctx.out)
    return 0


def _revoke(ctx: Context, certname: str, reason: str) -> RevokedIdentity:
    """Every certificate of the instance on its CRL, its records revoked, in one transaction."""
    from puppetha.enroll.service import revoke_identity

    try:
        done = revoke_identity(ctx.records, ctx.authority, certname, reason, ctx.now)
    except StoreError as e:
        raise CLIError(str(e), status=EXIT_FAILED) from None
    if done is None:
        raise CLIError(f"no node named {certname!r}")
    serials = ", ".join(f"{c.serial:x} ({c.role}, {c.issuer})" for c in done.certificates)
    crls = ", ".join(f"CRL {crl.number} of {ca}" for ca, crl in sorted(done.crls.items()))
    print(f"revoked {certname}: instance {done.instance_id}, serials {serials}; {crls}", file=ctx.out)
    for master in done.deregistered:
        print(f"deregistered master {master}", file=ctx.out)
    for lb in done.deregistered_lb:
        print(f"deregistered lb node {lb}", file=ctx.out)
    return done


def node_revoke(ctx: Context, args: argparse.Namespace) -> int:
    node = _node(ctx, args.certname).record
    if node.revoked and ctx.records.get(MasterRecord, node.certname) is None:
        raise CLIError(f"{args.certname} was already revoked at {_when(node.revoked_at)}")
    _revoke(ctx, args.certname, args.reason)
    return 0


def node_reset(ctx: Context, args: argparse.Namespace) -> int:
    from puppetha.enroll.service import identity_of, reset_enrollment

    _node(ctx, args.certname)
    done = _revoke(ctx, args.certname, "superseded")
    removed = reset_enrollment(ctx.records, done.instance_id)
    _, nodes = identity_of(ctx.records, args.certname)
    for found in nodes:
        ctx.store.delete(NodeRecord.KIND, found.record.certname)
    roles = sorted({c.role for c in done.certificates} | {key.partition("/")[2] for key in removed})
    # The claims are gone, but the age check still applies: an instance launched longer ago than
    # max_age is refused however often it is reset.
    max_age = ctx.config[("enroll", "max_age")]
    print(f"reset {args.certname}: instance {done.instance_id} may enroll again "
          f"(it held {', '.join(roles)}), "
          f"but only within [enroll] max_age ({_span(max_age)}) of its launch; an instance launched "
          "earlier is refused (403 too-old): raise max_age for its enrollment or replace the instance",
          file=ctx.out)
    return 0


# -- crl


def crl_show(ctx: Context, args: argparse.Namespace) -> int:
    if args.pem:
        ctx.out.write(ctx.authority.crl_chain_pem().decode("ascii"))
        return 0
    crls = sorted((v.record for v in ctx.records.list(CRLRecord)), key=lambda c: (c.ca != ROOT, c.ca))
    if not crls:
        raise CLIError("the store has no CRL yet; run `puppetha ca init` or start the daemon")
    now = ctx.now()
    for crl in crls:
        revoked = x509.load_pem_x509_crl(crl.crl_pem.encode())
        state = "FRESH" if crl.next_update > now else "EXPIRED"
        print(f"{crl.ca}  CRL {crl.number}  signed {_when(crl.this_update)}  "
              f"next update {_when(crl.next_update)} ({state})  {len(list(revoked))} revoked",
              file=ctx.out)
        for entry in revoked:
            print(f"  {entry.serial_number:x}  revoked {entry.revocation_date_utc:%Y-%m-%dT%H:%M:%SZ}",
                  file=ctx.out)
    return 0


# -- store


def store_init(ctx: Context, args: argparse.Namespace) -> int:
    if ctx.config[("store", "backend")] == "dynamodb":
        created = ctx.store.create_table()  # type: ignore[attr-defined]
        word = "created" if created else "already there:"
        print(f"{word} DynamoDB table {ctx.config[('store', 'table')]}", file=ctx.out)
        return 0
    ctx.store  # noqa: B018 - opening the SQLite store creates its file and schema
    print(f"SQLite store ready at {ctx.config[('store', 'path')]}", file=ctx.out)
    return 0


def _open_location(ctx: Context, location: str, *, must_exist: bool) -> Any:
    scheme, sep, rest = location.partition(":")
    if not sep or not rest:
        raise CLIError(f"not sqlite:PATH or dynamodb:TABLE: {location!r}")
    if scheme == "sqlite":
        if must_exist and not os.path.isfile(rest):
            # Opening would create an empty store, and the copy would quietly copy nothing.
            raise CLIError(f"no SQLite store at {rest}")
        from puppetha.store.sqlite import SQLiteStore

        return SQLiteStore(rest)
    if scheme == "dynamodb":
        from puppetha.store.dynamodb import DynamoDBStore

        return DynamoDBStore(table=rest, region=ctx.config[("aws", "region")],
                             endpoint_url=ctx.config[("aws", "endpoint_url")] or None)
    raise CLIError(f"unknown store {scheme!r} in {location!r} (sqlite or dynamodb)")


def store_migrate(ctx: Context, args: argparse.Namespace) -> int:
    from puppetha.store.migrate import migrate

    source = _open_location(ctx, args.source, must_exist=True)
    try:
        target = _open_location(ctx, args.target, must_exist=False)
    except BaseException:
        source.close()
        raise
    try:
        started = time.monotonic()
        counts = migrate(source, target)
        copied = sum(c.copied for c in counts.values())
        unchanged = sum(c.unchanged for c in counts.values())
        detail = ", ".join(f"{kind} {c.copied}+{c.unchanged}" for kind, c in sorted(counts.items()) if
                           c.copied or c.unchanged)
        print(f"copied {copied} records, {unchanged} already there, in {time.monotonic() - started:.1f}s"
              f" (per kind, copied+unchanged: {detail or 'none'})", file=ctx.out)
    finally:
        source.close()
        target.close()
    return 0
