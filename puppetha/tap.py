"""
The daemon's wiring: ``twistd puppetha`` options and :func:`makeService`.

This is the only module that imports the global reactor, and the only one that knows how the
parts fit together: it reads the configuration, opens the store, the vault and the CA, and
returns a ``MultiService`` holding the services of the configured roles.
"""

from __future__ import annotations

import functools
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from puppetha import build
from puppetha.aws.cloud import CloudError, ICloud
from puppetha.aws.identity import TrustStore
from puppetha.aws.shipped import SHIPPED_TRUST_FILE
from puppetha.config import DEFAULT_CONFIG_PATH, OPTIONS, Config, ConfigError, find_config, load_config
from puppetha.enc.service import Classifier, ENCSocketError, ENCSocketService
from puppetha.enroll.api import make_enrollment_site
from puppetha.enroll.listener import CannotListen, ensure_server_credentials, open_enrollment_listener
from puppetha.enroll.policy import EnrollmentPolicy
from puppetha.enroll.readiness import Readiness, ReadinessService
from puppetha.enroll.service import Enrollment, revoke_identity
from puppetha.ha.autoscale import FleetControl, Launcher, ScalingService, discover_fleet, write_decision
from puppetha.ha.drain import Drainer, ShuttingDownWorkers
from puppetha.ha.failover import FailoverSettings
from puppetha.ha.front import LIVE, FrontService, Generations, NginxControl
from puppetha.ha.health import HealthService, StatusProbe
from puppetha.ha.heartbeat import HeartbeatProtocol, ensure_heartbeat_key
from puppetha.ha.lease import Lease
from puppetha.ha.lifecycle import LifecycleSettings, LifecycleSweep
from puppetha.ha.load import LoadCounter
from puppetha.ha.monitor import LoadMonitor, LoadSocket, LoadSocketError, probe_jruby, read_sample
from puppetha.ha.nginx import Backend, FrontPorts, FrontSettings, NginxRuntime
from puppetha.ha.primary import ActingLog, ElasticIP, FailoverService
from puppetha.ha.scaling import Master, Sample, ScaleDecision, settings_from_config
from puppetha.heap import SettledHeap
from puppetha.metrics.endpoint import Scrape, Source, make_metrics_site, open_metrics_listener
from puppetha.metrics.sources import (
    enc_source,
    enrollment_source,
    failover_sources,
    heap_source,
    load_source,
    scale_decision_source,
    store_sources,
)
from puppetha.pki.authority import LB_CA, AuthorityError, CertificateAuthority, CRLRefresher
from puppetha.pki.certs import fingerprint
from puppetha.pki.crlfiles import CRLFilesService, master_crl_files
from puppetha.pki.keys import KeyType, load_private_key, same_public_key
from puppetha.pki.vault import IKeyVault, VaultError
from puppetha.services import BlockingStop, OrderedServices, TooFewDescriptors, descriptor_budget
from puppetha.store import IStore, StoreError, StoreUnavailable
from puppetha.store.records import Records
from puppetha.threads import Blocking, Episodes, make_pool

log = Logger()


class Options(usage.Options):
    synopsis = "[--config PATH] [--state-dir DIR] [--set SECTION.OPTION=VALUE ...]"
    longdesc = (
        "Run the puppetha daemon: the roles named in [daemon] roles of the configuration "
        "(enroll, enc, lb). Without --config it reads $PUPPETHA_CONFIG, else "
        "/etc/puppetha/puppetha.conf if it exists, else runs on its embedded defaults."
    )
    optParameters = [
        ["config", "c", None, "The configuration file (default: $PUPPETHA_CONFIG, else "
         "/etc/puppetha/puppetha.conf if it exists, else the embedded defaults)."],
        ["state-dir", None, None, "Override [daemon] state_dir."],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None,
                 default_config: str = DEFAULT_CONFIG_PATH) -> None:
        super().__init__()
        self["overrides"] = {}
        self.environ = os.environ if environ is None else environ
        self.default_config = default_config

    def config_path(self) -> str | None:
        """The file to read (see :func:`puppetha.config.find_config`), None for the embedded defaults."""
        return find_config(self["config"], self.environ, self.default_config)

    def opt_set(self, assignment: str) -> None:
        """Override one option: --set enc.socket=/tmp/enc.sock (may be repeated)."""
        name, sep, value = assignment.partition("=")
        section, dot, option = name.partition(".")
        if not sep or not dot:
            raise usage.UsageError(f"--set takes SECTION.OPTION=VALUE, not {assignment!r}")
        if not any(o.section == section and o.name == option for o in OPTIONS):
            raise usage.UsageError(f"--set: unknown option [{section}] {option}")
        self["overrides"][(section, option)] = value

    def overrides(self) -> dict[tuple[str, str], str]:
        overrides: dict[tuple[str, str], str] = dict(self["overrides"])
        if self["state-dir"]:
            overrides[("daemon", "state_dir")] = self["state-dir"]
        return overrides


#: Seconds a pool's threads and the store get to finish the call in progress when the daemon stops.
POOL_STOP_TIMEOUT = 5.0


class ThreadPoolService(BlockingStop):
    """Starts the bounded pool with the daemon and joins its threads on stop (bounded)."""

    def __init__(self, pool: ThreadPool, reactor: Any) -> None:
        # Daemon threads: a call stalled past the stop's bound must not keep the process alive.
        pool.threadFactory = functools.partial(threading.Thread, daemon=True)  # type: ignore[assignment]
        super().__init__(pool.name or "thread pool", pool.stop, reactor, POOL_STOP_TIMEOUT)
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()


class StoreService(BlockingStop):
    """Closes the store after everything that uses it has stopped."""

    def __init__(self, store: IStore, reactor: Any) -> None:
        super().__init__("store", store.close, reactor, POOL_STOP_TIMEOUT)
        self.store = store


def make_enrollment(
    config: Config,
    clock: IReactorTime,
    *,
    signing: Blocking[CertificateAuthority],
    store_calls: Blocking[Records],
    aws: Blocking[ICloud],
    on_master: Callable[[], object],
) -> Enrollment:
    """The enrollment service as the configuration has it: its policy, trust and AWS calls."""
    certs = config[("aws", "identity_certs")]
    try:
        trust = TrustStore.from_file(certs or SHIPPED_TRUST_FILE)
    except ValueError as e:
        raise ConfigError(f"{config.source}: [aws] identity_certs: {e}") from None
    if not config[("aws", "accounts")]:
        log.warn("no AWS account may enroll ([aws] accounts): every enrollment will be refused")
    policy = EnrollmentPolicy(
        accounts=config[("aws", "accounts")],
        max_age=config[("enroll", "max_age")],
        front=config[("enroll", "front")],
        require_source_match=config[("enroll", "require_source_match")],
        certname_template=config[("enroll", "certname_template")],
        master_rules=config[("enroll", "master_policy")],
        lb_rules=config[("enroll", "lb_policy")],
        allow_second_role=config[("enroll", "allow_second_role")],
    )
    return Enrollment(
        policy=policy,
        trust=trust,
        records=store_calls,
        authority=signing,
        cloud=aws,
        clock=clock,
        allowed_keys=[KeyType(k) for k in config[("pki", "allowed_csr_keys")]],
        # An agent's first test run goes through nginx's port for its master: the same ports the
        # lb nodes render from the same options.
        front_ports=FrontPorts(first_master=config[("lb", "first_master_port")],
                               max_masters=config[("lb", "max_masters")]),
        on_master=on_master,
        describe_in_flight=config[("enroll", "describe_in_flight")],
    )


def enrollment_listener(
    config: Config,
    reactor: Any,
    *,
    authority: CertificateAuthority,
    signing: Blocking[CertificateAuthority],
    store_calls: Blocking[Records],
    aws: Blocking[ICloud],
    on_master: Callable[[], object],
    readiness: Callable[[], Readiness] | None = None,
    metric_sources: dict[str, Source] | None = None,
) -> IService:
    """
    The enrollment API on its TLS listener (behind the nginx nodes' PROXY protocol, if set); its
    counts join ``metric_sources``.
    """
    enrollment = make_enrollment(config, reactor, signing=signing, store_calls=store_calls, aws=aws,
                                 on_master=on_master)
    # Before the reactor runs: the listener's own certificate, issued by the root.
    credentials = ensure_server_credentials(
        authority, config.state_dir, config[("enroll", "server_names")], KeyType(config[("pki", "key_type")])
    )
    if metric_sources is not None:
        metric_sources["enrollment"] = enrollment_source(enrollment)
    log.info("enrollment API on {listen}; clients pin the root CA {pin}",
             listen=config[("enroll", "listen")], pin=credentials.root_fingerprint)
    # A flood on the enrollment port may take its share of descriptors, never the ENC's.
    max_connections = descriptor_budget(enc="enc" in config.roles)
    log.info("enrollment API: at most {count} connections at once", count=max_connections)
    return open_enrollment_listener(
        reactor,
        config[("enroll", "listen")],
        make_enrollment_site(enrollment, reactor, readiness),
        credentials.tls_context(),
        config[("enroll", "proxy_from")],
        max_connections=max_connections,
    )


class Announcement(Service):
    """Started last: says that every other service of the daemon is up."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def startService(self) -> None:
        super().startService()
        log.info("puppetha started: roles {roles}, state in {state_dir}, config {source}",
                 roles=", ".join(self.config.roles), state_dir=self.config.state_dir,
                 source=self.config.source)


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        config = load_config(options.config_path(), options.overrides())
        return make_daemon(config, reactor)
    except (ConfigError, StoreError, VaultError, AuthorityError, CannotListen, ENCSocketError,
            TooFewDescriptors) as e:
        # twistd prints this one line and exits non-zero; what was opened closes with the process.
        raise SystemExit(f"puppetha: {e}") from None
    except OSError as e:
        # A file or directory the checks above did not foresee: still one line, never a traceback.
        raise SystemExit(f"puppetha: {e.filename}: {e.strerror}" if e.filename
                         else f"puppetha: {e}") from None


def make_daemon(config: Config, reactor: Any) -> MultiService:
    """
    Everything the configured roles need, as one service tree.  ``reactor`` provides the time,
    thread, TCP and UNIX interfaces of Twisted's real reactors.
    """
    # Stopped in the reverse order of this function: the listeners and the lb role first, then
    # what they need (the CRL refresher, the thread pools), the store last.
    root = OrderedServices(reactor)
    check_state_dir(config)
    if config[("pki", "vault")] == "file":
        check_parent_dir(config[("pki", "vault_key_file")], "[pki] vault_key_file")

    store = build.open_store(config)
    StoreService(store, reactor).setServiceParent(root)
    pool = make_pool("puppetha", config[("daemon", "threads")])
    ThreadPoolService(pool, reactor).setServiceParent(root)
    # AWS calls get their own pool, so a slow AWS never starves store reads and signing.
    aws_pool = make_pool("puppetha-aws", config[("daemon", "threads")])
    ThreadPoolService(aws_pool, reactor).setServiceParent(root)

    records = Records(store)
    vault = build.open_vault(config, create=True, has_root=build.store_has_root(records))
    authority = build.make_authority(config, records, vault, reactor.seconds)
    # Before the reactor runs, so that a broken store or vault stops the daemon with one line.
    root_ca = authority.ensure_root(config[("pki", "root_name")])
    authority.check_key()
    log.info("root CA {name}, {fingerprint}", name=root_ca.name,
             fingerprint=fingerprint(x509.load_pem_x509_certificate(root_ca.certificate_pem.encode())))

    # Every call to a dependency has a deadline ([store] timeout, [aws] timeout), and an outage
    # is logged once when it starts and once when it ends.
    store_deadline, aws_deadline = config[("store", "timeout")], config[("aws", "timeout")]
    # An outage ends with an answer three deadlines after its last failure: calls that fail
    # come in waves (each waits out the deadline), with answers of other kinds in between.
    store_episodes = Episodes("store", reactor, quiet=3 * store_deadline)
    aws_episodes = Episodes("AWS", reactor, quiet=3 * aws_deadline)

    def store_blocking(on: ThreadPool, target: Any, *, abandon: bool = False,
                       episodes: Episodes | None = store_episodes) -> Blocking[Any]:
        return Blocking(reactor, on, target, deadline=store_deadline, abandon=abandon,
                        timed_out=lambda s: StoreUnavailable(f"the store did not answer within {s:g}s"),
                        unavailable=(StoreUnavailable,), episodes=episodes)

    # Signing is mostly CPU: its answers say nothing about the store.
    signing = store_blocking(pool, authority, episodes=None)
    margin = timedelta(seconds=config[("pki", "crl_refresh_margin")])
    CRLRefresher(
        lambda m: signing.call(authority.refresh_crls, m),
        reactor,
        # Several runs inside the margin, so that one failed run (store down) costs nothing.
        interval=min(timedelta(hours=1), margin / 4),
        margin=margin,
    ).setServiceParent(root)

    if config[("master", "ssldir")]:
        # A master: puppetserver's CRL files follow the store (a revoked lb node is refused).
        CRLFilesService(
            clock=reactor,
            blocking=Blocking(reactor, pool, None),
            store=store,
            files=master_crl_files(config[("master", "ssldir")]),
            interval=config[("master", "crl_interval")],
        ).setServiceParent(root)

    # The client of the daemon's own region now rather than at its first call: it is kept for
    # the daemon's life, so it belongs to the heap settled once started (puppetha/heap.py).
    cloud = build.make_cloud(config, prepared=[config[("aws", "region")]])
    # AWS reads past their deadline are left to botocore's own timeouts, which fit inside it.
    aws = Blocking(reactor, aws_pool, cloud, deadline=aws_deadline, abandon=True,
                   timed_out=lambda s: CloudError(f"AWS did not answer within {s:g}s"),
                   unavailable=(CloudError,), episodes=aws_episodes)
    store_calls = store_blocking(pool, records)
    # The reads the ENC and the health check need have a pool of their own: they never queue
    # behind writes waiting for the write lock (docs/design.md).
    read_pool = make_pool("puppetha-read", config[("daemon", "threads")])
    ThreadPoolService(read_pool, reactor).setServiceParent(root)
    # Reads answer while the write lock is held: they count as an outage of their own.
    store_reads = store_blocking(read_pool, records, abandon=True,
                                 episodes=Episodes("store reads", reactor, quiet=3 * store_deadline))

    # What GET /metrics reads at each scrape ([metrics] listen): each part adds its own below.
    metric_sources: dict[str, Source] = store_sources(store_reads, reactor)

    # Same host: a master's registration reaches nginx at once; other hosts' lb roles see it on
    # their next round ([lb] interval).
    poke_front: Callable[[], object] | None = None
    if "lb" in config.roles:
        front, poke_front = front_services(config, reactor, store, Blocking(reactor, pool, None))
        front.setServiceParent(root)
        if config[("ha", "elastic_ip")]:
            failover_service(config, reactor, records=records, vault=vault, cloud=cloud, aws=aws,
                             front=front, authority=authority, signing=signing,
                             metric_sources=metric_sources).setServiceParent(root)

    if "enroll" in config.roles:
        readiness = ReadinessService(reactor, writes=store_calls, reads=store_reads, cloud=aws,
                                     region=config[("aws", "region")],
                                     interval=config[("enroll", "health_interval")])
        readiness.setServiceParent(root)
        enrollment_listener(config, reactor, authority=authority, signing=signing, store_calls=store_calls,
                            aws=aws, on_master=poke_front or (lambda: None), readiness=readiness.readiness,
                            metric_sources=metric_sources).setServiceParent(root)

    # Before the ENC's socket file: a metrics port in use must not leave that file behind.  The
    # ENC's source joins the sources after; each scrape asks those there are then.
    add_metrics_listener(root, config, reactor, metric_sources)

    if "enc" in config.roles:
        enc_service(config, reactor, store_reads, aws, metric_sources).setServiceParent(root)

    # Last but the announcement: what the services above keep for the daemon's life is made by
    # then, and is settled out of the collector's full passes (puppetha/heap.py).
    heap = SettledHeap(reactor)
    metric_sources["heap"] = heap_source(heap)
    heap.setServiceParent(root)
    Announcement(config).setServiceParent(root)
    return root


def enc_service(config: Config, reactor: Any, store_reads: Blocking[Records], aws: Blocking[ICloud],
                metric_sources: dict[str, Source]) -> IService:
    """The ENC on its socket, already listening; its counts join ``metric_sources``."""
    classifier = Classifier(
        reactor,
        store_reads,
        aws,
        ttl=config[("enc", "cache_ttl")],
        stale_limit=config[("enc", "stale_limit")],
        store_hot_window=config[("enc", "store_hot_window")],
    )
    enc = ENCSocketService(
        reactor,
        classifier,
        config[("enc", "socket")],
        owner=config[("enc", "socket_owner")],
        group=config[("enc", "socket_group")],
        mode=config[("enc", "socket_mode")],
    )
    enc.open()  # now, so that a bad socket setting stops the start with one line
    metric_sources["enc"] = enc_source(enc.factory)
    return enc


def add_metrics_listener(root: MultiService, config: Config, reactor: Any,
                         metric_sources: Mapping[str, Source]) -> None:
    """GET /metrics on [metrics] listen, if set, over the sources the parts of the daemon gave."""
    listen = config[("metrics", "listen")]
    if not listen:
        return
    # Opened now, like the enrollment port: a port in use stops the start with one line.
    open_metrics_listener(reactor, listen, make_metrics_site(Scrape(metric_sources), reactor)
                          ).setServiceParent(root)
    log.info("metrics on {listen}", listen=listen)


def failover_service(
    config: Config, reactor: Any, *, records: Records, vault: IKeyVault, cloud: ICloud,
    aws: Blocking[ICloud], front: MultiService, authority: CertificateAuthority,
    signing: Blocking[CertificateAuthority], metric_sources: dict[str, Source] | None = None,
) -> IService:
    """
    Heartbeats, the lease and the Elastic IP (the lb role with [ha] elastic_ip), and what only
    the primary does: the life cycle sweep.  This node's view (heartbeats heard, primary or not)
    joins ``metric_sources``.
    """
    ha = {name: value for (section, name), value in config.values.items() if section == "ha"}
    node = ha["instance_id"]
    settings = FailoverSettings(
        lease_duration=ha["lease_duration"],
        lease_margin=ha["lease_margin"],
        renew_interval=ha["renew_interval"],
        standby_poll=ha["standby_poll"],
        suspect_poll=ha["suspect_poll"],
        heartbeat_interval=ha["heartbeat_interval"],
        suspect_after=ha["suspect_after"],
        address_check=ha["address_check"],
    )
    # Before the reactor runs, like the root CA: a vault that cannot open the key stops the daemon.
    key = ensure_heartbeat_key(records, vault, reactor.seconds())
    heartbeat = HeartbeatProtocol(node=node, key=key, port=ha["heartbeat_port"], monotonic=time.monotonic,
                                  wall=reactor.seconds, stale_after=ha["heartbeat_stale"])
    # Its own small pool: renewals must never queue behind signing or a slow listing.
    pool = make_pool("puppetha-ha", 2)
    # The lease is released on the pool while the failover service stops: the pool stops after.
    services = OrderedServices(reactor)
    ThreadPoolService(pool, reactor).setServiceParent(services)
    front_service = cast(FrontService, front.getServiceNamed("front"))
    failover = FailoverService(
        reactor=reactor,
        udp=reactor,
        monotonic=time.monotonic,
        wall=reactor.seconds,
        blocking=Blocking(reactor, pool, None),
        aws=aws,
        lease=Lease(records, node, duration=settings.lease_duration, margin=settings.lease_margin,
                    monotonic=time.monotonic, wall=reactor.seconds),
        records=records,
        settings=settings,
        heartbeat=heartbeat,
        listen=(ha["heartbeat_listen"], ha["heartbeat_port"]),
        advertise=ha["address"],
        address=ElasticIP(config[("aws", "region")], ha["elastic_ip"], node),
        cloud=cloud,
        ensure_front=front_service.poke,
        generation=lambda: front_service.reloaded,
        acting_log=ActingLog(ha["acting_log"] or None, node),
    )
    failover.setServiceParent(services)
    if metric_sources is not None:
        metric_sources.update(failover_sources(failover))
    # Started after failover, so stopped before it: no sweep outlives the lease it acts under.
    lifecycle = LifecycleSettings(interval=config[("lifecycle", "interval")],
                                  revoke_terminated=config[("lifecycle", "revoke_terminated")],
                                  grace=config[("lifecycle", "grace")])
    LifecycleSweep(
        clock=reactor,
        settings=lifecycle,
        guard=failover.guard,
        records=records,
        # Revocation signs CRLs: on the signing pool, never on the lease's.
        blocking=signing,
        cloud=cloud,
        aws=aws,
        revoke=functools.partial(revoke_identity, records, authority, now=reactor.seconds),
        lb_region=config[("aws", "region")],
    ).setServiceParent(services)
    if config[("scale", "enabled")]:
        scaling = scaling_service(config, reactor, guard=failover.guard, records=records, cloud=cloud,
                                  aws=aws, blocking=signing, poke=front_service.poke)
        scaling.setServiceParent(services)
        if metric_sources is not None:
            metric_sources["scale_decisions"] = scale_decision_source(lambda: scaling.decisions)
    if metric_sources is not None and config[("lb", "load_socket")]:
        # The fleet's merged load, as the primary judges it: the same on every lb node.
        stale = config[("scale", "stale")]
        metric_sources["load"] = load_source(
            lambda: signing.call(read_sample, records.store, reactor.seconds(), stale)
            .addCallback(lambda sample: sample.loads))
    log.info("failover: {node} for {allocation_id}, heartbeats on udp {port}, lease {duration}s",
             node=node, allocation_id=ha["elastic_ip"], port=ha["heartbeat_port"],
             duration=settings.lease_duration)
    return services


def scaling_service(
    config: Config, reactor: Any, *, guard: Callable[[int | None], Any], records: Records, cloud: ICloud,
    aws: Blocking[ICloud], blocking: Blocking[Any], poke: Callable[[], object],
) -> ScalingService:
    """
    The scaling loop ([scale] enabled), on the primary only: the lb nodes' fresh load reports
    merged, the fleet from the store and EC2, the policy, launches from the launch template, and
    drains (``poke`` runs the front's round, so that a draining master leaves the upstream).
    """
    settings = settings_from_config(config)
    region = config[("aws", "region")]
    node = config[("ha", "instance_id")]

    def sample(now: float) -> Deferred[Sample]:
        return blocking.call(read_sample, records.store, now, settings.stale)

    def masters(now: float) -> Deferred[list[Master]]:
        d: Deferred[list[Master]] = discover_fleet(records=records, blocking=blocking, cloud=cloud, aws=aws,
                                                   region=region, now=now, settings=settings)
        return d

    def publish(at: float, decision: ScaleDecision, token: int) -> Deferred[Any]:
        return blocking.call(write_decision, records, node, token, at, decision)

    control = FleetControl(clock=reactor, guard=guard, records=records, blocking=blocking, cloud=cloud,
                           aws=aws, region=region)
    log.info("scaling: every {interval}s on the primary, masters from launch template {template}",
             interval=config[("scale", "interval")], template=config[("scale", "launch_template")])
    return ScalingService(
        clock=reactor,
        settings=settings,
        interval=config[("scale", "interval")],
        guard=guard,
        sample=sample,
        masters=masters,
        launcher=Launcher(control, launch_template=config[("scale", "launch_template")]),
        drainer=Drainer(control, settings=settings,
                        in_flight=ShuttingDownWorkers(config[("lb", "nginx_pid")]), poke=poke),
        publish=publish,
    )


def check_state_dir(config: Config) -> None:
    """The state directory exists (made 0700) and this process can write in it."""
    state_dir = config.state_dir
    if os.path.exists(state_dir) and not os.path.isdir(state_dir):
        raise ConfigError(f"{config.source}: [daemon] state_dir: {state_dir} is not a directory")
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        # Writing is the only sure test: root passes every permission check but not a read-only
        # mount or an immutable directory.
        with tempfile.TemporaryFile(dir=state_dir, prefix=".puppetha-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"{config.source}: [daemon] state_dir: cannot write in {state_dir}: "
                          f"{e.strerror}") from None


def check_parent_dir(path: str, option: str) -> None:
    """Nothing on the way to ``path`` is a file (the directories themselves are made later)."""
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ConfigError(f"{option}: {parent} is not a directory (on the way to {path})")


def check_lb_credentials(certificate: str, private_key: str) -> None:
    """The lb node's certificate and key parse and belong together (the files hold secrets:
    errors name the files, never their content)."""
    try:
        cert = x509.load_pem_x509_certificate(Path(certificate).read_bytes())
    except (OSError, ValueError):
        raise ConfigError(f"[lb] certificate: {certificate} is not a PEM certificate") from None
    try:
        key = load_private_key(Path(private_key).read_bytes())
    except (OSError, ValueError, TypeError):
        raise ConfigError(f"[lb] private_key: {private_key} is not an unencrypted PEM private key "
                          "of a supported type") from None
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) or not same_public_key(
            key.public_key(), public):
        raise ConfigError(f"[lb] private_key: {private_key} does not belong to the certificate "
                          f"{certificate}")


def front_services(
    config: Config, reactor: Any, store: IStore, blocking: Blocking[None]
) -> tuple[MultiService, Callable[[], object]]:
    """
    nginx kept in step with the store, and the masters' health probed (the lb role); with the
    function that starts a round of the front at once.
    """
    lb = {name: value for (section, name), value in config.values.items() if section == "lb"}
    check_lb_credentials(lb["certificate"], lb["private_key"])
    if not (os.path.isfile(lb["nginx"]) and os.access(lb["nginx"], os.X_OK)):
        raise ConfigError(f"[lb] nginx: {lb['nginx']} is not an executable file")
    check_parent_dir(os.path.join(lb["nginx_dir"], "live"), "[lb] nginx_dir")
    master_name = lb["master_name"] or config[("enroll", "front")].rpartition(":")[0].strip("[]")
    settings = FrontSettings(
        certificate=lb["certificate"],
        private_key=lb["private_key"],
        master_name=master_name,
        ports=FrontPorts(
            address=lb["listen_address"],
            front=lb["front_port"],
            first_master=lb["first_master_port"],
            max_masters=lb["max_masters"],
            enroll=lb["enroll_port"],
        ),
        runtime=NginxRuntime(
            pid_path=lb["nginx_pid"],
            error_log=lb["nginx_error_log"],
            user=lb["nginx_user"] or None,
            temp_dir=lb["nginx_temp_dir"],
            access_log=lb["nginx_access_log"] or None,
            live_dir=os.path.join(lb["nginx_dir"], LIVE),
            load_socket=lb["load_socket"] or None,
        ),
    )
    front = FrontService(
        clock=reactor,
        blocking=blocking,
        store=store,
        settings=settings,
        generations=Generations(lb["nginx_dir"]),
        control=NginxControl(lb["nginx"], error_log=lb["nginx_error_log"]),
        enroll_backends=[
            Backend(host.strip("[]"), int(port))
            for host, _, port in (b.rpartition(":") for b in lb["enroll_backends"])
        ],
        exclude_cas=[LB_CA],  # the lb CA signs lb nodes only; agents never chain to it
        interval=lb["interval"],
    )
    # The very name nginx checks: a master nginx would answer 502 for is not healthy.
    probe = StatusProbe(reactor, master_name=master_name)
    health = HealthService(
        clock=reactor,
        blocking=blocking,
        store=store,
        probe=probe,
        certificate=lb["certificate"],
        private_key=lb["private_key"],
        interval=lb["health_interval"],
        fall=lb["health_fall"],
        rise=lb["health_rise"],
        # A master that goes down leaves nginx's upstream at once, not at the next round.
        on_change=front.poke,
    )
    services = MultiService()
    front.setName("front")
    front.setServiceParent(services)
    health.setServiceParent(services)
    if lb["load_socket"]:
        counter = LoadCounter()
        load_socket = LoadSocket(reactor, lb["load_socket"], counter, lb["nginx_user"] or None)
        try:
            load_socket.open()  # now, so that a path that cannot be bound stops the start with one line
        except LoadSocketError as e:
            raise ConfigError(f"[lb] load_socket: {e}") from None
        load_socket.setServiceParent(services)
        LoadMonitor(
            clock=reactor,
            node=config[("ha", "instance_id")] or socket.gethostname(),
            blocking=blocking,
            store=store,
            counter=counter,
            jruby=functools.partial(probe_jruby, probe),
            certificate=lb["certificate"],
            private_key=lb["private_key"],
            interval=config[("scale", "interval")],
        ).setServiceParent(services)
        log.info("load monitor: nginx's load log on {path}, sampled every {interval}s",
                 path=lb["load_socket"], interval=config[("scale", "interval")])
    log.info("front: nginx config in {directory}, agents on port {port}",
             directory=lb["nginx_dir"], port=lb["front_port"])
    return services, front.poke
