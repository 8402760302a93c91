"""
The daemon's wiring: ``twistd puppetha`` options and :func:`makeService`.

This is the only module that imports the global reactor, and the only one that knows how the
parts fit together: it reads the configuration, opens the store, the vault and the CA, and
returns a ``MultiService`` holding the services of the configured roles.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, cast

from cryptography import x509
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from puppetha import build
from puppetha.aws.cloud import ICloud
from puppetha.aws.identity import TrustStore
from puppetha.config import OPTIONS, Config, ConfigError, load_config
from puppetha.enc.service import Classifier, ENCSocketService
from puppetha.enroll.api import make_enrollment_site
from puppetha.enroll.listener import enrollment_service, ensure_server_credentials
from puppetha.enroll.policy import EnrollmentPolicy
from puppetha.enroll.service import Enrollment
from puppetha.ha.failover import FailoverSettings
from puppetha.ha.front import FrontService, Generations, NginxControl
from puppetha.ha.health import HealthService, StatusProbe
from puppetha.ha.heartbeat import HeartbeatProtocol, ensure_heartbeat_key
from puppetha.ha.lease import Lease
from puppetha.ha.nginx import Backend, FrontPorts, FrontSettings, NginxRuntime
from puppetha.ha.primary import ActingLog, ElasticIP, FailoverService
from puppetha.pki.authority import LB_CA, AuthorityError, CertificateAuthority, CRLRefresher
from puppetha.pki.certs import fingerprint
from puppetha.pki.keys import KeyType
from puppetha.pki.vault import IKeyVault, VaultError
from puppetha.store import IStore, StoreError
from puppetha.store.records import Records
from puppetha.threads import Blocking, make_pool

log = Logger()


class Options(usage.Options):
    synopsis = "[--config PATH] [--state-dir DIR] [--set SECTION.OPTION=VALUE ...]"
    longdesc = (
        "Run the puppetha daemon: the roles named in [daemon] roles of the configuration "
        "(enroll, enc, lb). Without --config it runs on its embedded defaults."
    )
    optParameters = [
        ["config", "c", None, "The configuration file (default: the embedded defaults)."],
        ["state-dir", None, None, "Override [daemon] state_dir."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["overrides"] = {}

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


class ThreadPoolService(Service):
    """Starts the bounded pool with the daemon and joins its threads on stop."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class StopInOrder(MultiService):
    """Stops its children last first, each once the one after it has finished stopping."""

    @inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        for service in reversed(list(self)):
            yield maybeDeferred(service.stopService)


class StoreService(Service):
    """Closes the store after everything that uses it has stopped."""

    def __init__(self, store: IStore) -> None:
        self.store = store

    def stopService(self) -> None:
        super().stopService()
        self.store.close()


def enrollment_listener(
    config: Config,
    reactor: Any,
    *,
    authority: CertificateAuthority,
    signing: Blocking[CertificateAuthority],
    store_calls: Blocking[Records],
    aws: Blocking[ICloud],
    on_master: Callable[[], object],
) -> IService:
    """The enrollment API on its TLS listener (behind the nginx nodes' PROXY protocol, if set)."""
    certs = config[("aws", "identity_certs")]
    try:
        trust = TrustStore.from_file(certs) if certs else TrustStore({})
    except ValueError as e:
        raise ConfigError(f"{config.source}: [aws] identity_certs: {e}") from None
    if not trust.regions:
        log.warn("no AWS region is trusted ([aws] identity_certs): every enrollment will be refused")
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
    )
    enrollment = Enrollment(
        policy=policy,
        trust=trust,
        records=store_calls,
        authority=signing,
        cloud=aws,
        clock=reactor,
        allowed_keys=[KeyType(k) for k in config[("pki", "allowed_csr_keys")]],
        # An agent's first test run goes through nginx's port for its master: the same ports the
        # lb nodes render from the same options.
        front_ports=FrontPorts(first_master=config[("lb", "first_master_port")],
                               max_masters=config[("lb", "max_masters")]),
        on_master=on_master,
    )
    # Before the reactor runs: the listener's own certificate, issued by the root.
    credentials = ensure_server_credentials(
        authority, config.state_dir, config[("enroll", "server_names")], KeyType(config[("pki", "key_type")])
    )
    log.info("enrollment API on {listen}; clients pin the root CA {pin}",
             listen=config[("enroll", "listen")], pin=credentials.root_fingerprint)
    return enrollment_service(
        reactor,
        config[("enroll", "listen")],
        make_enrollment_site(enrollment, reactor),
        credentials.tls_context(),
        config[("enroll", "proxy_from")],
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
        config = load_config(options["config"], options.overrides())
        return make_daemon(config, reactor)
    except (ConfigError, StoreError, VaultError, AuthorityError) as e:
        # twistd prints this one line and exits non-zero before anything listens.
        raise SystemExit(f"puppetha: {e}") from None


def make_daemon(config: Config, reactor: Any) -> MultiService:
    """
    Everything the configured roles need, as one service tree.  ``reactor`` provides the time,
    thread, TCP and UNIX interfaces of Twisted's real reactors.
    """
    # One after another, last started first: the store closes only once nothing uses it.
    root = StopInOrder()
    os.makedirs(config.state_dir, mode=0o700, exist_ok=True)

    store = build.open_store(config)
    StoreService(store).setServiceParent(root)
    pool = make_pool("puppetha", config[("daemon", "threads")])
    ThreadPoolService(pool).setServiceParent(root)

    records = Records(store)
    vault = build.open_vault(config, create=True, has_root=build.store_has_root(records))
    authority = build.make_authority(config, records, vault, reactor.seconds)
    # Before the reactor runs, so that a broken store or vault stops the daemon with one line.
    root_ca = authority.ensure_root(config[("pki", "root_name")])
    authority.check_key()
    log.info("root CA {name}, {fingerprint}", name=root_ca.name,
             fingerprint=fingerprint(x509.load_pem_x509_certificate(root_ca.certificate_pem.encode())))

    signing = Blocking(reactor, pool, authority)
    margin = timedelta(seconds=config[("pki", "crl_refresh_margin")])
    CRLRefresher(
        lambda m: signing.call(authority.refresh_crls, m),
        reactor,
        # Several runs inside the margin, so that one failed run (store down) costs nothing.
        interval=min(timedelta(hours=1), margin / 4),
        margin=margin,
    ).setServiceParent(root)

    cloud = build.make_cloud(config)
    # AWS calls get their own pool, so a slow AWS never starves store reads and signing.
    aws_pool = make_pool("puppetha-aws", config[("daemon", "threads")])
    ThreadPoolService(aws_pool).setServiceParent(root)
    aws = Blocking(reactor, aws_pool, cloud)
    store_calls = Blocking(reactor, pool, records)

    # Same host: a master's registration reaches nginx at once; other hosts' lb roles see it on
    # their next round ([lb] interval).
    poke_front: Callable[[], object] | None = None
    if "lb" in config.roles:
        front, poke_front = front_services(config, reactor, store, Blocking(reactor, pool, None))
        front.setServiceParent(root)
        if config[("ha", "elastic_ip")]:
            failover_service(config, reactor, records=records, vault=vault, cloud=cloud, aws=aws,
                             front=front).setServiceParent(root)

    if "enroll" in config.roles:
        enrollment_listener(config, reactor, authority=authority, signing=signing, store_calls=store_calls,
                            aws=aws, on_master=poke_front or (lambda: None)).setServiceParent(root)

    if "enc" in config.roles:
        classifier = Classifier(
            reactor,
            store_calls,
            aws,
            ttl=config[("enc", "cache_ttl")],
            stale_limit=config[("enc", "stale_limit")],
        )
        ENCSocketService(
            reactor,
            classifier,
            config[("enc", "socket")],
            owner=config[("enc", "socket_owner")],
            group=config[("enc", "socket_group")],
            mode=config[("enc", "socket_mode")],
        ).setServiceParent(root)

    Announcement(config).setServiceParent(root)
    return root


def failover_service(
    config: Config, reactor: Any, *, records: Records, vault: IKeyVault, cloud: ICloud,
    aws: Blocking[ICloud], front: MultiService,
) -> IService:
    """Heartbeats, the lease and the Elastic IP (the lb role with [ha] elastic_ip)."""
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
    services = StopInOrder()
    ThreadPoolService(pool).setServiceParent(services)
    front_service = cast(FrontService, front.getServiceNamed("front"))
    FailoverService(
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
    ).setServiceParent(services)
    log.info("failover: {node} for {allocation_id}, heartbeats on udp {port}, lease {duration}s",
             node=node, allocation_id=ha["elastic_ip"], port=ha["heartbeat_port"],
             duration=settings.lease_duration)
    return services


def front_services(
    config: Config, reactor: Any, store: IStore, blocking: Blocking[None]
) -> tuple[MultiService, Callable[[], object]]:
    """
    nginx kept in step with the store, and the masters' health probed (the lb role); with the
    function that starts a round of the front at once.
    """
    lb = {name: value for (section, name), value in config.values.items() if section == "lb"}
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
    health = HealthService(
        clock=reactor,
        blocking=blocking,
        store=store,
        probe=StatusProbe(reactor),
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
    log.info("front: nginx config in {directory}, agents on port {port}",
             directory=lb["nginx_dir"], port=lb["front_port"])
    return services, front.poke
