"""
``puppetha status``: the cluster at a glance, from the store and AWS.

The lb nodes as each registered itself (state, the nginx generation it serves, how long ago its
peers last heard it), the lease (holder, token, age), the Elastic IP's owner per
DescribeAddresses, the masters with their health, their drain if one is in progress, and
their load (the lb nodes' fresh reports, merged as the primary merges them), and the primary's
last scaling decisions with their reasons.  A node neither heard nor reporting for
:data:`STALE_AFTER` is shown as stale: what its record says is its last word, not its state.
:func:`cluster_status` is pure; the command only reads and prints.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping
from typing import Any

from puppetha.aws.cloud import CloudError
from puppetha.context import EXIT_FAILED, Context
from puppetha.ha.autoscale import SCALE_LOG, ScaleLogRecord
from puppetha.ha.lease import FAILOVER_LEASE
from puppetha.ha.monitor import read_sample
from puppetha.ha.scaling import MasterLoad, Sample
from puppetha.store.records import LbNodeRecord, LeaseRecord, MasterRecord, Versioned


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "status", help="the lb nodes, the primary, the lease, the Elastic IP's owner, the masters with "
        "their load, and the last scaling decisions")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=status)


#: A live lb node rewrites its record every 2 s and its peers hear it ten times a second: after
#: this long without either, its record is a dead node's last word (five reports missed).
STALE_AFTER = 10.0


def stale(reported_age: float, heartbeat_age: float | None, after: float = STALE_AFTER) -> bool:
    """Whether an lb node's record is older than ``after`` and no peer heard it within ``after``."""
    return reported_age > after and (heartbeat_age is None or heartbeat_age > after)


def heard_age(node: str, records: Iterable[LbNodeRecord], now: float) -> float | None:
    """
    Seconds since any peer last heard ``node``: what each peer reported, aged by how long ago
    it reported it (wall clocks of different hosts: an estimate, to the nearest tenth or so).
    """
    ages = [
        other.heard[node] + max(0.0, now - other.updated_at)
        for other in records
        if other.node != node and node in other.heard
    ]
    return round(min(ages), 3) if ages else None


def cluster_status(
    *,
    now: float,
    nodes: Iterable[LbNodeRecord],
    lease: Versioned[LeaseRecord] | None,
    elastic_ip: str,
    owner: str | None,
    owner_error: str | None,
    masters: Iterable[MasterRecord],
    load: Sample | None = None,
    scaling: bool = False,
    decisions: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """``load``: the merged fresh reports (None: none); ``decisions``: the kept ones, oldest first."""
    nodes = list(nodes)
    loads = load.loads if load is not None else {}
    holder = lease.record.holder if lease is not None and lease.record.holder else None
    lb_nodes = []
    for n in sorted(nodes, key=lambda n: n.node):
        reported, heard = round(max(0.0, now - n.updated_at), 3), heard_age(n.node, nodes, now)
        lb_nodes.append({
            "node": n.node,
            "address": f"{n.address}:{n.port}",
            "state": n.state,
            "stale": stale(reported, heard),
            "token": n.token,
            "generation": n.generation,
            "reported_age": reported,
            "heartbeat_age": heard,
        })
    return {
        "lb_nodes": lb_nodes,
        "primary": holder,
        "lease": None if lease is None else {
            "holder": lease.record.holder or None,
            "token": lease.record.token,
            "duration": lease.record.duration,
            "age": round(max(0.0, now - lease.record.renewed_at), 3),
        },
        "elastic_ip": {
            "allocation_id": elastic_ip or None,
            "owner": owner,
            "error": owner_error,
            "agrees_with_lease": None if not elastic_ip or owner_error else owner == holder,
        },
        "masters": [
            {"certname": m.certname, "address": f"{m.address}:{m.port}", "healthy": m.healthy,
             "draining": _draining(m, now),
             "load": _load(loads[m.certname]) if m.certname in loads else None}
            for m in sorted(masters, key=lambda m: m.certname)
        ],
        "scaling": {
            "enabled": scaling,
            "decisions": [
                {**d, "age": round(max(0.0, now - float(d.get("at", now))), 3)} for d in decisions
            ],
        },
    }


def _draining(master: MasterRecord, now: float) -> dict[str, Any] | None:
    """A drain in progress: since when, under which token, and whether its requests have ended."""
    if master.draining_since is None:
        return None
    return {
        "since": master.draining_since,
        "age": round(max(0.0, now - master.draining_since), 3),
        "token": master.drain_token,
        "drained_at": master.drained_at,
    }


def _load(load: MasterLoad) -> dict[str, Any]:
    return {
        "requests": load.requests,
        "in_flight": load.in_flight,
        "busy": round(load.busy(), 3),
        "unavailable": load.unavailable,
        "queue_limit_hits": load.queue_limit_hits,
        "jruby_free": load.jruby_free,
        "jruby_size": load.jruby_size,
        "agents": load.agents,
    }


def render(status: Mapping[str, Any]) -> str:
    lines = []
    lease = status["lease"]
    if lease is None:
        lines.append("primary: none (no lease yet)")
    elif lease["holder"] is None:
        lines.append(f"primary: none (lease released, token {lease['token']})")
    else:
        lines.append(f"primary: {lease['holder']} (token {lease['token']}, lease renewed "
                     f"{lease['age']:.1f}s ago by its own clock, duration {lease['duration']}s)")
    eip = status["elastic_ip"]
    if eip["allocation_id"] is None:
        lines.append("elastic ip: not configured ([ha] elastic_ip)")
    elif eip["error"] is not None:
        lines.append(f"elastic ip: {eip['allocation_id']} on an unknown instance: {eip['error']}")
    else:
        agree = "" if eip["agrees_with_lease"] else "  (NOT the lease holder)"
        lines.append(f"elastic ip: {eip['allocation_id']} on {eip['owner'] or 'nothing'}{agree}")
    lines.append("lb nodes:")
    if not status["lb_nodes"]:
        lines.append("  (none registered)")
    for n in status["lb_nodes"]:
        heard = "never heard" if n["heartbeat_age"] is None else f"heard {n['heartbeat_age']:.1f}s ago"
        state = f"STALE (last said {n['state']})" if n["stale"] else n["state"]
        lines.append(f"  {n['node']}  {n['address']}  {state}  token {n['token']}  {heard}  "
                     f"reported {n['reported_age']:.1f}s ago  nginx {n['generation'] or '-'}")
    lines.append("masters:")
    if not status["masters"]:
        lines.append("  (none registered)")
    for m in status["masters"]:
        lines.append(f"  {m['certname']}  {m['address']}  {'healthy' if m['healthy'] else 'UNHEALTHY'}")
        drain = m["draining"]
        if drain is not None:
            where = ("drained, to be terminated" if drain["drained_at"] is not None
                     else "out of the upstream, its requests finishing")
            lines.append(f"    draining for {drain['age']:.0f}s under token {drain['token']}: {where}")
        load = m["load"]
        if load is None:
            lines.append("    load: no fresh report from any lb node")
        else:
            jruby = (f"JRuby {load['jruby_free']}/{load['jruby_size']} free" if load["jruby_size"]
                     else "no jruby-metrics")
            lines.append(f"    load: {load['requests']} requests, {load['in_flight']} in flight, busy "
                         f"{load['busy']:.2f}, {load['unavailable']} 503s, {jruby}, {load['agents']} agents")
    scaling = status["scaling"]
    lines.append(f"scaling: {'on' if scaling['enabled'] else 'off'}")
    if not scaling["decisions"]:
        lines.append("  (no decision yet)")
    for d in reversed(scaling["decisions"]):
        what = d["action"]
        if d.get("count"):
            what += f" {d['count']}"
        if d.get("master"):
            what += f" {d['master']}"
        lines.append(f"  {d['age']:.0f}s ago  {d.get('node', '?')}  token {d.get('token', '?')}  "
                     f"{what}: {d['reason']}")
    return "\n".join(lines) + "\n"


def status(ctx: Context, args: argparse.Namespace) -> int:
    records = ctx.records
    elastic_ip = ctx.config[("ha", "elastic_ip")]
    owner: str | None = None
    owner_error: str | None = None
    if elastic_ip:
        from puppetha.build import make_cloud

        try:
            owner = make_cloud(ctx.config).describe_address(ctx.config[("aws", "region")], elastic_ip)
        except (CloudError, ValueError) as e:
            owner_error = str(e)
    now = ctx.now()
    kept = records.get(ScaleLogRecord, SCALE_LOG)
    result = cluster_status(
        now=now,
        nodes=[v.record for v in records.list(LbNodeRecord)],
        lease=records.get(LeaseRecord, FAILOVER_LEASE),
        elastic_ip=elastic_ip,
        owner=owner,
        owner_error=owner_error,
        masters=[v.record for v in records.list(MasterRecord)],
        load=read_sample(records.store, now, ctx.config[("scale", "stale")]),
        scaling=ctx.config[("scale", "enabled")],
        decisions=kept.record.decisions if kept is not None else (),
    )
    if args.json:
        ctx.out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    else:
        ctx.out.write(render(result))
    # AWS unreachable: everything else was shown, but the answer is incomplete.
    return EXIT_FAILED if owner_error is not None else 0
