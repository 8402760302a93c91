"""
Failover in the rig: ``twistd puppetha`` lb daemons with real nginx, each in its own network
namespace, on DynamoDB and EC2 in moto; the Elastic IP is an address that sits wherever moto
says; an agent outside makes its requests through that address.

A killed primary's address goes to a standby and the agent's requests succeed again; a primary
stopped with SIGTERM releases the lease and a standby takes it at once, without waiting for it
to lapse.  In both, no two nodes ever acted as primary at once, by their own acting logs, and
every AssociateAddress was made under a token newer than the ones before.  A real ``puppet agent
-t`` (Debian's, on a host of its own) runs through the address to a real puppetserver while the
primary is killed, and the next run succeeds through the new primary.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from puppetha.testing.acting import overlaps, read_events, stray_associations, windows
from puppetha.testing.eip import ElasticIPEmulator
from puppetha.testing.keepalived import MASTER, KeepalivedNode
from puppetha.testing.lb_rig import (
    RIG_GREETING,
    Agent,
    FleetPKI,
    LbDaemon,
    PuppetAgent,
    RealMaster,
    StandInMaster,
)
from puppetha.testing.moto import Fleet
from puppetha.testing.netns import Host, Rig
from puppetha.testing.partition import cut, heal
from puppetha.testing.rig_aws import MotoInRig


@attrs.define
class Cluster:
    rig: Rig
    eip: ElasticIPEmulator
    agent: Agent
    daemons: dict[str, LbDaemon]
    pki: FleetPKI
    #: Debian's puppetserver behind the fronts (None: the stand-in).
    master: RealMaster | None = None

    def name_of(self, address: str | None) -> str | None:
        return next((host.name for host in self.rig.hosts.values() if host.address == address), None)

    def served_by(self) -> str | None:
        return self.name_of(self.agent.served_by(self.eip.address))

    def primary(self) -> Host:
        holder = self.eip.holder
        assert holder is not None
        return holder

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{d.log_tail(30)}" for name, d in self.daemons.items())


def eventually(check: Callable[[], object], what: str, cluster: Cluster, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen; daemon logs:\n{cluster.logs()}")
        time.sleep(0.05)


def start_cluster(tmp_path: Path, nodes: int, puppetserver: bool = False) -> Iterator[Cluster]:
    """``puppetserver``: Debian's behind the fronts, and a host for a puppet agent, not the stand-in."""
    names = [f"lb{n + 1}" for n in range(nodes)]
    with Rig([*names, "aws", "master", *(["agent"] if puppetserver else [])]) as rig:
        socket_path = tmp_path / "associations.sock"
        with MotoInRig(rig["aws"], associations_socket=socket_path, log_dir=tmp_path) as moto:
            fleet = Fleet(moto.endpoint_url)
            instances = {name: fleet.launch("lb").instance_id for name in names}
            allocation_id = fleet.allocate_address()
            mapping = {instance: rig[name] for name, instance in instances.items()}
            with ElasticIPEmulator(rig, allocation_id, rig.spare_address(), socket_path, mapping) as eip:
                pki = FleetPKI(moto.endpoint_url, tmp_path / "pki")
                master: StandInMaster | RealMaster = (
                    RealMaster(rig["master"], pki, tmp_path / "puppetserver") if puppetserver
                    else StandInMaster(rig["master"], pki)
                )
                daemons = {
                    name: LbDaemon(
                        rig[name],
                        shared=pki.shared,
                        lb_files=pki.leaf("lb", f"{name}.lb.test", sans=["puppet"], usage="both"),
                        allocation_id=allocation_id,
                        instance_id=instances[name],
                        directory=tmp_path / name,
                    )
                    for name in names
                }
                cluster = Cluster(rig, eip, Agent(pki), daemons, pki,
                                  master if isinstance(master, RealMaster) else None)
                try:
                    for daemon in daemons.values():
                        daemon.start()
                    eventually(lambda: eip.holder is not None, "an Elastic IP holder", cluster)
                    if not puppetserver:
                        eventually(
                            lambda: cluster.served_by() == cluster.primary().name,
                            "the agent served through the address",
                            cluster,
                        )
                    yield cluster
                finally:
                    for daemon in daemons.values():
                        daemon.stop_all()
                    master.stop()
                    pki.close()
    assert rig.leftovers() == []


@pytest.fixture
def two(tmp_path: Path) -> Iterator[Cluster]:
    yield from start_cluster(tmp_path, 2)


@pytest.fixture
def three(tmp_path: Path) -> Iterator[Cluster]:
    yield from start_cluster(tmp_path, 3)


@pytest.fixture(params=[2, 3], ids=["2 nodes", "3 nodes"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from start_cluster(tmp_path, request.param)


def events(cluster: Cluster) -> list[dict[str, Any]]:
    return read_events(*(d.acting_log for d in cluster.daemons.values()))


def assert_one_primary_at_a_time(cluster: Cluster) -> None:
    """By the nodes' acting logs: no two acted at once, no address moved outside its token's window."""
    found = events(cluster)
    assert overlaps(windows(found)) == [], cluster.logs()
    assert stray_associations(found) == []
    made = sorted((e["at"], e["token"]) for e in found if e["event"] == "associate")
    assert [token for _, token in made] == sorted(token for _, token in made)


def kill_host(cluster: Cluster, host: Host) -> None:
    """The instance dies: every process in it gets SIGKILL and its link goes down."""
    host.link_down()
    host.kill_all()
    cluster.daemons[host.name].daemon = None
    cluster.daemons[host.name].nginx = None


def test_kill_9_of_the_primary_a_standby_holds_the_address_and_requests_succeed_again(
    cluster: Cluster,
) -> None:
    primary = cluster.primary()
    old_token = max(token for token, _, _ in cluster.daemons[primary.name].acted())
    eventually(lambda: cluster.served_by() == primary.name, "a request served by the primary", cluster)

    kill_host(cluster, primary)
    standbys = [cluster.rig[name] for name in cluster.daemons if name != primary.name]
    move = cluster.eip.wait_for_any(standbys, timeout=30)
    survivor = move.host
    assert survivor is not None
    eventually(lambda: cluster.served_by() == survivor, "a request served through the new holder", cluster)

    assert max(token for token, _, _ in cluster.daemons[survivor].acted()) > old_token
    log = cluster.daemons[survivor].log_path.read_text()
    assert f"left token {old_token} unrenewed" in log, cluster.logs()
    assert_one_primary_at_a_time(cluster)
    # The dead node made no move after it died; every move since was to the survivor.
    assert {m.host for m in cluster.eip.moves_after(cluster.eip.history.index(move))} == {survivor}


def test_sigterm_hands_over_at_once(two: Cluster) -> None:
    cluster = two
    primary = cluster.primary()
    standby = next(name for name in cluster.daemons if name != primary.name)
    old_token = max(token for token, _, _ in cluster.daemons[primary.name].acted())

    cluster.daemons[primary.name].stop()
    cluster.eip.wait_for(cluster.rig[standby], timeout=30)
    eventually(lambda: cluster.served_by() == standby, "a request served through the standby", cluster)

    # Taken because it was released, not after watching it lapse.
    log = cluster.daemons[standby].log_path.read_text()
    assert f"took the lease with token {old_token + 1}: token {old_token} was released" in log, cluster.logs()
    stopped = [e for e in cluster.daemons[primary.name].acting() if e["event"] == "stopped"]
    assert stopped
    assert stopped[-1]["token"] == old_token
    assert_one_primary_at_a_time(cluster)


def acting_now(cluster: Cluster) -> list[str]:
    """The nodes whose last acting window is still open."""
    now = time.monotonic()
    return [name for name, d in cluster.daemons.items() if any(until > now for _, _, until in d.acted()[-1:])]


def test_a_primary_cut_from_the_store_steps_down_and_healing_leaves_one_primary(two: Cluster) -> None:
    cluster = two
    primary = cluster.primary()
    standby = next(name for name in cluster.daemons if name != primary.name)
    old_token = max(token for token, _, _ in cluster.daemons[primary.name].acted())

    cut_at = time.monotonic()
    cut(primary, cluster.rig["aws"])
    cluster.eip.wait_for(cluster.rig[standby], timeout=30)
    eventually(lambda: cluster.served_by() == standby, "a request served through the standby", cluster)
    # Its own log says it stopped acting under the old token, without anyone telling it.
    stopped = [e for e in cluster.daemons[primary.name].acting() if e["event"] == "stopped"]
    assert [e["token"] for e in stopped] == [old_token]
    # Cut off a while longer (past an address check), then healed.
    time.sleep(3)
    heal(primary)
    eventually(lambda: acting_now(cluster) == [standby], "one primary after healing", cluster)
    time.sleep(3)
    assert acting_now(cluster) == [standby]
    assert cluster.eip.holder is cluster.rig[standby]
    assert_one_primary_at_a_time(cluster)
    # The old primary never moved the address again, cut off or healed.
    assert [e for e in cluster.daemons[primary.name].associations() if e["at"] > cut_at] == []


def test_a_primary_cut_from_its_peers_only_stays_primary(two: Cluster) -> None:
    """Heartbeats lost, the store still reachable: the lease, not the heartbeats, decides."""
    cluster = two
    primary = cluster.primary()
    standby = next(name for name in cluster.daemons if name != primary.name)
    moves = len(cluster.eip.history)

    cut(primary, cluster.rig[standby])
    time.sleep(4)
    assert acting_now(cluster) == [primary.name]
    assert cluster.served_by() == primary.name
    heal(primary)
    time.sleep(1)
    assert acting_now(cluster) == [primary.name]
    assert cluster.eip.moves_after(moves) == []
    assert_one_primary_at_a_time(cluster)


CHAOS_SEED = 20261127
CHAOS_ROUNDS = 50


def last_holder(cluster: Cluster) -> tuple[str, int] | None:
    """By the acting logs: the node that took the lease last (the highest token yet), and that token."""
    taken = [(token, name) for name, d in cluster.daemons.items() for token, _, _ in d.acted()]
    if not taken:
        return None
    token, name = max(taken)
    return name, token


def holder_after(cluster: Cluster, deposed: str, token: int) -> tuple[str, int] | None:
    """The node, other than ``deposed``, that acted under the highest token above ``token``."""
    taken = [
        (later, name)
        for name, d in cluster.daemons.items()
        if name != deposed
        for later, _, _ in d.acted()
        if later > token
    ]
    if not taken:
        return None
    later, name = max(taken)
    return name, later


def wait_for_takeover(
    cluster: Cluster, deposed: str, token: int, story: str, able: Callable[[], list[str]]
) -> tuple[str, int] | None:
    """
    Until another node than ``deposed`` acts under a token above ``token`` and holds the address;
    None if, before that, no node is ``able`` to take the lease any more (the one that was ended).
    """
    eventually(lambda: holder_after(cluster, deposed, token) is not None or not able(),
               f"a takeover from {deposed} (token {token}) after:\n{story}\n", cluster)
    holder = holder_after(cluster, deposed, token)
    if holder is None:
        return None
    eventually(lambda: cluster.eip.holder is cluster.rig[holder[0]],
               f"the address on {holder[0]} (token {holder[1]}) after:\n{story}\n", cluster)
    return holder


def test_chaos_of_kills_restarts_and_partitions_never_two_primaries(three: Cluster) -> None:
    """
    A bounded, seeded run of random kills (-9 and SIGTERM), restarts, partitions and heals on
    three nodes: by every node's acting log and by the Elastic IP's history, never two primaries,
    and no AssociateAddress outside the window of the token that made it.  After every round
    that leaves the lease's last holder dead or cut from the store while another node runs and
    reaches the store, that node takes over under a higher token and gets the address.  Then,
    all healed and running, exactly one primary that serves through the address.

    The seed fixes which node each round picks, not which node holds the lease then (the
    start's race and each takeover decide that), so how many rounds call for a takeover differs
    from run to run: the test works that out from its own record of what it did and checks a
    takeover after each of them, rather than counting tokens against a fixed number.
    """
    chooser = random.Random(CHAOS_SEED)
    cluster = three
    names = list(cluster.daemons)
    aws = cluster.rig["aws"]
    from_store: set[str] = set()  # cut from the store (and AWS), until healed

    def down() -> set[str]:
        # Killed or stopped by a round, or ended by itself (a daemon that starts while cut from
        # the store cannot open the heartbeat key and exits).
        return {name for name in names if not cluster.daemons[name].running}

    def able() -> list[str]:
        """The nodes that could take the lease: running, and not cut from the store."""
        return [name for name in names if name not in down() | from_store]
    done: list[str] = []
    takeovers: list[tuple[str, int, str, int]] = []  # (deposed, its token, new holder, new token)
    for round_ in range(CHAOS_ROUNDS):
        name = chooser.choice(names)
        host, daemon = cluster.rig[name], cluster.daemons[name]
        dead = down()
        if name in dead:
            action = "restart"
            host.link_up()
            daemon.start()
        else:
            action = chooser.choice(["kill -9", "sigterm", "cut peers", "cut store", "cut both", "heal"])
            if action == "kill -9" and len(dead) < 2:
                kill_host(cluster, host)
            elif action == "sigterm" and len(dead) < 2:
                daemon.stop()
            elif action.startswith("cut"):
                if action in ("cut peers", "cut both"):
                    cut(host, *(cluster.rig[other] for other in names if other != name))
                if action in ("cut store", "cut both"):
                    cut(host, aws)
                    from_store.add(name)
            else:
                action = "heal"
                heal(host)
                from_store.discard(name)
            if action in ("kill -9", "sigterm") and daemon.running:
                action = f"{action} (skipped: two are down)"
        pause = chooser.uniform(0.1, 1.5)
        paused_from = time.monotonic()
        done.append(f"{round_}: {action} {name}")
        # The lease's last holder is dead or cut from the store, and another node is running and
        # reaches it: that node must take over, under a higher token, and get the address.
        holder = last_holder(cluster)
        if holder is not None and holder[0] not in able() and able():
            deposed, token = holder
            taker = wait_for_takeover(cluster, deposed, token, "\n".join(done), able)
            if taker is not None:
                takeovers.append((deposed, token, *taker))
                done[-1] += f" ({deposed} held token {token}: {taker[0]} took over with token {taker[1]})"
        # The seeded pause, less the time the takeover took: the run's wall time stays as it was.
        time.sleep(max(0.0, pause - (time.monotonic() - paused_from)))

    dead = down()
    for name in names:
        heal(cluster.rig[name])
        if name in dead:
            cluster.rig[name].link_up()
            cluster.daemons[name].start()
    eventually(lambda: len(acting_now(cluster)) == 1, "one primary after the chaos", cluster)
    primary_at_end = acting_now(cluster)[0]
    eventually(lambda: cluster.eip.holder is cluster.rig[primary_at_end], "the address on the primary",
               cluster)
    eventually(lambda: cluster.served_by() == primary_at_end, "a request served through the primary",
               cluster)

    story = "\n".join(done)
    print(story)
    found = events(cluster)
    # Safety first: never two primaries, never an association under a stale token.
    assert overlaps(windows(found)) == [], story
    assert stray_associations(found) == [], story
    # And the run really failed over, each time one was called for (checked as it happened).
    assert takeovers, story
    assert all(new > old and taker != deposed for deposed, old, taker, new in takeovers), story
    assert len({token for _, token in windows(found)}) > len(takeovers), story
    # Each move of the address was made by an AssociateAddress of the node it went to, inside
    # the window of the token that node held.
    instances = {d.settings["ha.instance_id"]: name for name, d in cluster.daemons.items()}
    made = [e for e in found if e["event"] == "associate"]
    for move in cluster.eip.history:
        assert move.host == instances.get(move.instance_id), story
        assert any(
            e["instance_id"] == move.instance_id and e["at"] <= move.associated_at <= e["done"] for e in made
        ), f"{move} made by no logged AssociateAddress\n{story}"


def until(check: Callable[[], bool], what: str, show: Callable[[], object], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen: {show()}"
        time.sleep(0.05)


def test_the_keepalived_baseline_fails_over_and_splits_its_brain_in_the_same_rig(tmp_path: Path) -> None:
    """
    The peer bench/failover.py measures puppetha against, checked in the same rig: keepalived's
    backup takes the address when the master's host dies, the dead node comes back as BACKUP,
    and both nodes are MASTER while they cannot hear each other.
    """
    names = ["lb1", "lb2"]
    with Rig([*names, "aws"]) as rig:
        socket_path = tmp_path / "associations.sock"
        with MotoInRig(rig["aws"], associations_socket=socket_path, log_dir=tmp_path) as moto:
            fleet = Fleet(moto.endpoint_url)
            instances = {name: fleet.launch("lb").instance_id for name in names}
            allocation_id = fleet.allocate_address()
            mapping = {instance: rig[name] for name, instance in instances.items()}
            with ElasticIPEmulator(rig, allocation_id, rig.spare_address(), socket_path, mapping) as eip:
                nodes = {
                    name: KeepalivedNode(
                        rig[name],
                        [rig[other] for other in names if other != name],
                        instance_id=instances[name],
                        allocation_id=allocation_id,
                        endpoint_url=moto.endpoint_url,
                        region="us-east-1",
                        workdir=tmp_path,
                    )
                    for name in names
                }
                try:

                    def states() -> list[str | None]:
                        return [nodes[name].state() for name in names]

                    # One after the other, as instances boot: started in the same millisecond,
                    # both time out together and are MASTER for a moment, and both notify
                    # scripts' AssociateAddress calls race (the last, maybe the BACKUP's, wins).
                    first, second = names
                    nodes[first].start()
                    until(lambda: nodes[first].state() == MASTER, f"{first} MASTER", states)
                    nodes[second].start()
                    until(lambda: sorted(map(str, states())) == ["BACKUP", MASTER], "one MASTER", states)
                    master = next(name for name in names if nodes[name].state() == MASTER)
                    backup = next(name for name in names if name != master)
                    eip.wait_for(rig[master], timeout=30)

                    rig[master].link_down()
                    nodes[master].kill()
                    until(lambda: nodes[backup].state() == MASTER, "the backup MASTER after the kill", states)
                    eip.wait_for(rig[backup], timeout=30)

                    # The dead node comes back as BACKUP (nopreempt); then the two cannot hear each other.
                    rig[master].link_up()
                    nodes[master].start()
                    until(lambda: nodes[master].state() == "BACKUP", "the old master back as BACKUP", states)
                    cut(rig[master], rig[backup])
                    until(lambda: states() == [MASTER, MASTER], "both MASTER while cut (split brain)", states)
                finally:
                    for node in nodes.values():
                        node.kill()
    assert rig.leftovers() == []


@pytest.mark.parametrize(
    ("intervals", "expected"),
    [
        ({"a": [(0.0, 5.0)], "b": [(5.0, 9.0)]}, (0.0, 0)),  # one after the other: never both
        ({"a": [(0.0, 5.0)], "b": [(4.0, 9.0)]}, (1.0, 1)),
        ({"a": [(0.0, 2.0), (3.0, 6.0)], "b": [(1.0, 4.0)]}, (2.0, 2)),
        ({"a": [(0.0, 10.0)], "b": [(-5.0, 1.0), (9.0, 20.0)]}, (2.0, 2)),  # clipped to [0, 10]
        (
            {"a": [(0.0, 10.0)], "b": [(2.0, 3.0)], "c": [(2.5, 4.0)]},
            (2.0, 1),
        ),  # three at once is one episode
    ],
)
def test_the_bench_counts_the_time_two_nodes_acted_as_primary(intervals, expected) -> None:
    from bench.failover import overlap

    total, episodes = overlap(intervals, 0.0, 10.0)
    assert (round(total, 6), episodes) == expected


@pytest.fixture
def with_puppetserver(tmp_path: Path) -> Iterator[Cluster]:
    yield from start_cluster(tmp_path, 2, puppetserver=True)


def agent_requests(daemon: LbDaemon, certname: str) -> list[str]:
    """The lines of ``daemon``'s nginx access log that name ``certname`` (its catalog, its report...)."""
    try:
        return [line for line in daemon.dir.joinpath("nginx-access.log").read_text().splitlines()
                if certname in line]
    except FileNotFoundError:
        return []


def test_a_puppet_agent_run_through_the_elastic_ip_before_and_after_the_primary_is_killed(
    with_puppetserver: Cluster, tmp_path: Path
) -> None:
    """
    The run under way when the primary dies may fail (its connection dies with the node); the
    next run, as an agent makes at its next interval, gets its catalog through the new primary.
    """
    cluster = with_puppetserver
    # A request whose answer died with the node waits puppet's http_read_timeout (10 minutes
    # by default: nothing tells the agent the node is gone); a short one ends it sooner.
    agent = PuppetAgent(cluster.rig["agent"], cluster.pki, tmp_path / "agent", cluster.eip.address,
                        http_read_timeout="20s")
    try:
        primary = cluster.primary()
        standby = next(name for name in cluster.daemons if name != primary.name)
        # Until the front has a healthy master to proxy to (its first probes of a starting
        # puppetserver fail): puppetserver answers a node's request with what its ENC said.
        node = "/puppet/v3/node/agent-1.test?environment=production"
        eventually(lambda: RIG_GREETING in (cluster.agent.served_by(cluster.eip.address, path=node) or ""),
                   "the front proxying to puppetserver", cluster, seconds=120)
        before = agent.start()
        # Killed while the run talks to it: once its first request reached the primary's nginx.
        eventually(lambda: agent_requests(cluster.daemons[primary.name], "agent-eip.test") or
                   before.poll() is not None, "the agent's first request", cluster, seconds=120)
        kill_host(cluster, primary)
        output_before, _ = before.communicate(timeout=300)
        cluster.eip.wait_for(cluster.rig[standby], timeout=30)

        after = agent.start()
        output_after, _ = after.communicate(timeout=300)
        # --test is --detailed-exitcodes: 2, changes applied (the notify); 0 would be none.
        assert after.returncode == 2, f"{output_after}\n--- the run before the kill:\n{output_before}"
        assert RIG_GREETING in output_after
        assert "Applied catalog" in output_after
        assert any("/puppet/v3/catalog/agent-eip.test" in line
                   for line in agent_requests(cluster.daemons[standby], "agent-eip.test"))
        print(f"the run under way when {primary.name} was killed ended with {before.returncode}:\n"
              + "\n".join(output_before.splitlines()[-8:]))
        assert_one_primary_at_a_time(cluster)
    finally:
        agent.close()
