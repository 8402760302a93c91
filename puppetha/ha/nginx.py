"""
nginx's configuration for an lb node, rendered from a :class:`FrontState` (pure).

The rendered ``nginx.conf`` names its trust bundles by *relative* paths (:data:`CA_BUNDLE`,
:data:`CRL_BUNDLE`), which nginx resolves against the directory of the configuration file.
That lets :mod:`puppetha.ha.front` test a whole candidate generation (config and bundles) in a
directory of its own with ``nginx -t`` before anything live changes.

Same state, same bytes: masters are ordered, nothing reads a clock, so a reconcile that finds
nothing changed renders an identical file and skips the reload.
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import field, frozen

#: Where Debian's ``libnginx-mod-stream`` puts the stream module (the enrollment pass-through).
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

#: Every CA certificate agents' and masters' chains may use (root and the masters' CAs).
CA_BUNDLE = "ca.pem"
#: A CRL for every CA in :data:`CA_BUNDLE`: nginx checks the whole chain and refuses a chain
#: in which any CA's CRL is missing.
CRL_BUNDLE = "crl.pem"
#: The lb node's certificate followed by its issuers below the root: nginx sends the chain, so
#: agents that hold only the root and their own CA can check it.
SERVER_CHAIN = "server.pem"
CONFIG_NAME = "nginx.conf"
#: What agents refresh from the CA API paths (:data:`CA_PATHS`): every CA's certificate and
#: every CA's CRL, the lb CA's included (agents check the lb node's chain with it).
AGENT_CA_BUNDLE = "agents-ca.pem"
AGENT_CRL_BUNDLE = "agents-crl.pem"

#: The only paths of Puppet's CA API the front serves, to anyone, read-only: what a Puppet
#: agent fetches to refresh its CA and CRL bundles (``ca_refresh_interval``,
#: ``crl_refresh_interval``).  It fetches the CRL without its client certificate.
CA_PATHS = (
    ("/puppet-ca/v1/certificate/ca", AGENT_CA_BUNDLE),
    ("/puppet-ca/v1/certificate_revocation_list/ca", AGENT_CRL_BUNDLE),
)
#: How far ahead of its write the agent bundles' modification time is set.  nginx answers 304
#: when the file is no newer than an agent's ``If-Modified-Since`` (the agent's own clock at its
#: last refresh): dating the file ahead means an lb node whose clock lags an agent's by up to this
#: much still hands that agent a CRL published after its last refresh.  The cost: for this long
#: after a change, agents download the bundle again instead of getting 304.
AGENT_BUNDLE_MTIME_AHEAD = 600.0

#: The upstream of healthy masters behind the front port.
MASTERS_UPSTREAM = "puppetha_masters"
ENROLL_UPSTREAM = "puppetha_enroll"

#: Headers puppetserver reads when ``allow-header-cert-info`` is on.  ``proxy_set_header``
#: replaces whatever a client sent under these names.
CLIENT_HEADERS = (
    ("X-Client-Verify", "$ssl_client_verify"),
    ("X-Client-DN", "$ssl_client_s_dn"),
    ("X-Client-Cert", "$ssl_client_escaped_cert"),
)


@frozen
class MasterBackend:
    """A registered master as the front sees it."""

    certname: str
    address: str
    #: puppetserver's lb-only, header-trusting port.
    port: int
    healthy: bool = True
    #: Order of registration; the per-master ports follow it (see :func:`master_ports`).
    registered_at: float = 0.0
    #: Being drained: out of the upstream, and its own port sends to the masters in service.
    draining: bool = False


@frozen
class Backend:
    address: str
    port: int


@frozen
class FrontPorts:
    #: Address nginx listens on ("0.0.0.0" in production, 127.0.0.1 in tests).
    address: str = "0.0.0.0"  # noqa: S104 -- an lb node serves the whole VPC
    front: int = 8140
    #: The first master's own port; the next master gets the next port (see :func:`master_ports`).
    first_master: int = 8141
    #: How many per-master ports are reserved: masters beyond it get no direct route.
    max_masters: int = 50
    enroll: int = 8080


@frozen
class NginxRuntime:
    """Process-level paths and knobs (the test fixtures put everything in a temporary directory)."""

    pid_path: str = "/run/nginx.pid"
    error_log: str = "/var/log/nginx/error.log"
    #: nginx's client-body and proxy buffering directory.
    temp_dir: str = "/var/lib/nginx"
    access_log: str | None = "/var/log/nginx/puppetha-access.log"
    #: A UNIX datagram socket that also gets one line per proxied request, in
    #: :data:`LOAD_LOG_FORMAT` (``puppetha.ha.load`` reads it); ``None``: not sent.
    load_socket: str | None = None
    user: str | None = "www-data"
    worker_processes: str = "auto"
    worker_connections: int = 4096
    stream_module: str = STREAM_MODULE
    #: How long an old worker may finish requests in flight after a reload.
    worker_shutdown_timeout: int = 600
    #: The ``live`` link of the generations (``<[lb] nginx_dir>/live``): nginx serves the agent
    #: bundles from there, by absolute path (``alias`` does not resolve against the config).
    live_dir: str = "/var/lib/puppetha/nginx/live"


@frozen
class FrontSettings:
    """What an lb node's configuration says about its nginx (static for the daemon's life)."""

    #: The lb node's own certificate (it carries the front name) and key, written at enrollment.
    #: The same pair is nginx's client certificate towards the masters, which trust only the
    #: CA that signs lb nodes.  The front copies the certificate with its chain into each
    #: generation (:data:`SERVER_CHAIN`); nginx reads the key from here.
    certificate: str
    private_key: str
    #: The name every master's server certificate carries (policy grants masters the front name),
    #: checked by nginx when it connects to the masters' upstream.
    master_name: str
    ports: FrontPorts = FrontPorts()
    runtime: NginxRuntime = NginxRuntime()
    #: Largest request body (reports and facts can be large).
    client_max_body_size: str = "64m"
    #: Longest catalog compilation nginx waits for.
    read_timeout: int = 600


def _masters(masters: Iterable[MasterBackend]) -> tuple[MasterBackend, ...]:
    return tuple(sorted(masters, key=lambda m: (m.registered_at, m.certname)))


def _backends(backends: Iterable[Backend]) -> tuple[Backend, ...]:
    return tuple(sorted(backends, key=lambda b: (b.address, b.port)))


@frozen
class FrontState:
    settings: FrontSettings
    #: Every registered master, healthy or not; kept in registration order.
    masters: tuple[MasterBackend, ...] = field(default=(), converter=_masters)
    #: The enrollment services behind port 8080 (the PROXY protocol tells them the client).
    enroll_backends: tuple[Backend, ...] = field(default=(), converter=_backends)


def master_ports(masters: Iterable[MasterBackend], ports: FrontPorts) -> dict[str, int]:
    """
    Each master's own port on the front, for an agent's first test run: masters in order of
    registration (then certname) get ``first_master``, ``first_master + 1``, ...  Unhealthy
    masters keep their port, so health changes never move another master's port; only removing
    a master shifts the ones registered after it.
    """
    ordered = _masters(masters)[: ports.max_masters]
    return {m.certname: ports.first_master + i for i, m in enumerate(ordered)}


class RenderError(ValueError):
    """The state cannot be rendered (a value that would break or inject into the config)."""


#: The load monitor's access log: its syslog tag and format name, and the format (``|``-separated,
#: for the lists nginx writes with ", " when a request tried several masters).
LOAD_LOG_NAME = "puppetha_load"
LOAD_LOG_FORMAT = "v1|$upstream_addr|$status|$upstream_status|$request_time|$upstream_response_time"


def _word(value: str, what: str) -> str:
    # Values go into nginx's grammar unquoted: refuse anything that could end a directive.
    if not value or any(c.isspace() or c in ';{}"\'\\$#' for c in value):
        raise RenderError(f"{what} {value!r} cannot appear in nginx's configuration")
    return value


def _port(value: int, what: str) -> int:
    if not 0 < value < 65536:
        raise RenderError(f"{what} {value} is not a TCP port")
    return value


def _host_port(address: str, port: int, what: str) -> str:
    address = _word(address, what)
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"{address}:{_port(port, what)}"


def _server(m: MasterBackend) -> str:
    return _host_port(m.address, m.port, "master address")


def _check_ports(ports: FrontPorts) -> None:
    # nginx -t accepts two servers on one port (the first silently takes the other's agents)
    # and an http and a stream listener on one port (the reload then fails to bind): refuse
    # the plan whole, whatever masters are registered yet.
    first = _port(ports.first_master, "first master port")
    if ports.max_masters < 1:
        raise RenderError(f"max_masters {ports.max_masters} reserves no master port")
    last = _port(first + ports.max_masters - 1, "last reserved master port")
    for port, what in ((ports.front, "front port"), (ports.enroll, "enrollment port")):
        if first <= _port(port, what) <= last:
            raise RenderError(f"{what} {port} is one of the masters' ports {first}-{last}")
    if ports.front == ports.enroll:
        raise RenderError(f"the front and the enrollment port are both {ports.front}")


def render(state: FrontState) -> str:
    """The complete ``nginx.conf`` for ``state``."""
    s = state.settings
    rt = s.runtime
    _check_ports(s.ports)
    lines: list[str] = [
        "# Rendered by puppetha (lb role); every change here is overwritten.",
        f"load_module {_word(rt.stream_module, 'stream module')};",
    ]
    if rt.user is not None:
        lines.append(f"user {_word(rt.user, 'user')};")
    lines += [
        f"worker_processes {_word(rt.worker_processes, 'worker_processes')};",
        f"worker_shutdown_timeout {rt.worker_shutdown_timeout}s;",
        f"pid {_word(rt.pid_path, 'pid path')};",
        f"error_log {_word(rt.error_log, 'error log')} notice;",
        "",
        f"events {{ worker_connections {rt.worker_connections}; }}",
        "",
    ]
    lines += _http(state)
    lines += _stream(state)
    return "\n".join(lines) + "\n"


def _tls_server(s: FrontSettings, verify: str = "on") -> list[str]:
    return [
        f"        ssl_certificate {SERVER_CHAIN};",
        f"        ssl_certificate_key {_word(s.private_key, 'key path')};",
        f"        ssl_client_certificate {CA_BUNDLE};",
        f"        ssl_crl {CRL_BUNDLE};",
        # "optional" still refuses (400) a certificate that is presented and fails: a revoked
        # or foreign one never gets further than the handshake, on any path.
        f"        ssl_verify_client {verify};",
        "        ssl_verify_depth 2;",
    ]


def _json_return(status: int, code: str, message: str) -> str:
    return f"return {status} '{{\"error\": \"{code}\", \"message\": \"{message}\"}}';"


#: Every location of the front but the CA paths: nothing without a verified certificate.
_REQUIRE_CERTIFICATE = [
    "            if ($ssl_client_verify != SUCCESS) {",
    "                " + _json_return(400, "certificate-required",
                                      "a client certificate from the fleet is required"),
    "            }",
]


_NO_MASTER = [
    "        # No healthy master: answer at once instead of hanging agents.",
    "        location / {",
    "            default_type application/json;",
    *_REQUIRE_CERTIFICATE,
    "            " + _json_return(503, "no-master", "no healthy master"),
    "        }",
]


def _ca_locations(rt: NginxRuntime | None) -> list[str]:
    """The CA paths served from the live bundles (front), and the rest of the CA API refused."""
    lines = []
    if rt is not None:
        live = _word(rt.live_dir.rstrip("/"), "live dir")
        lines.append("        # Puppet agents refresh their CA and CRL bundles here, certificate or not.")
    for path, bundle in CA_PATHS if rt is not None else ():
        lines += [
            f"        location = {path} {{",
            "            limit_except GET { deny all; }",
            f"            alias {live}/{bundle};",
            "            default_type text/plain;",
            # 304 unless the bundle is newer than the agent's last refresh.
            "            if_modified_since before;",
            "            etag off;",
            "        }",
        ]
    lines += [
        # Prefix without the slash: "/puppet-ca;x/..." and the like are Puppet's CA API to
        # puppetserver (Jetty drops path parameters), so they end here too.
        "        location ^~ /puppet-ca {",
        "            default_type application/json;",
        "            " + _json_return(403, "forbidden", "the CA API is not served here"),
        "        }",
    ]
    return lines


def _proxy(upstream: str, ssl_name: str, require_certificate: bool = False) -> list[str]:
    name = _word(ssl_name, "master name")
    lines = ["        location / {"]
    if require_certificate:
        lines += ["            default_type application/json;", *_REQUIRE_CERTIFICATE]
    lines += [
        f"            proxy_pass https://{upstream};",
        f"            proxy_ssl_name {name};",
        # All headers here: a level with any proxy_set_header inherits none from above.
        # puppetserver (Jetty) wants Host to match the certificate it presented.
        f"            proxy_set_header Host {name};",
        '            proxy_set_header Connection "";',
    ]
    lines += [f"            proxy_set_header {header} {value};" for header, value in CLIENT_HEADERS]
    lines.append("        }")
    return lines


def _http(state: FrontState) -> list[str]:
    s = state.settings
    rt = s.runtime
    temp = _word(rt.temp_dir, "temp dir")
    lines = [
        "http {",
        "    server_tokens off;",
    ]
    if rt.access_log or not rt.load_socket:
        # "off" would turn off the load log of the same level too.
        lines.append(f"    access_log {_word(rt.access_log, 'access log') if rt.access_log else 'off'};")
    if rt.load_socket:
        # Every upstream attempt of a request, for the load monitor (puppetha/ha/load.py).
        lines += [
            f"    log_format {LOAD_LOG_NAME} '{LOAD_LOG_FORMAT}';",
            f"    access_log syslog:server=unix:{_word(rt.load_socket, 'load socket')},nohostname,"
            f"tag={LOAD_LOG_NAME} {LOAD_LOG_NAME};",
        ]
    lines += [
        f"    client_body_temp_path {temp}/body;",
        f"    proxy_temp_path {temp}/proxy;",
        f"    fastcgi_temp_path {temp}/fastcgi;",
        f"    uwsgi_temp_path {temp}/uwsgi;",
        f"    scgi_temp_path {temp}/scgi;",
        f"    client_max_body_size {_word(s.client_max_body_size, 'client_max_body_size')};",
        "    ssl_protocols TLSv1.2 TLSv1.3;",
        "    ssl_session_cache shared:puppetha_front:10m;",
        "",
        "    # Towards the masters: TLS with this node's certificate, which only lb nodes hold, and",
        "    # the masters' certificates checked against puppetha's CAs and CRLs.",
        "    proxy_http_version 1.1;",
        f"    proxy_read_timeout {s.read_timeout}s;",
        "    proxy_connect_timeout 5s;",
        f"    proxy_ssl_certificate {SERVER_CHAIN};",
        f"    proxy_ssl_certificate_key {_word(s.private_key, 'key path')};",
        f"    proxy_ssl_trusted_certificate {CA_BUNDLE};",
        f"    proxy_ssl_crl {CRL_BUNDLE};",
        "    proxy_ssl_verify on;",
        "    proxy_ssl_verify_depth 2;",
        "    proxy_ssl_server_name on;",
        "    proxy_ssl_protocols TLSv1.2 TLSv1.3;",
        "    proxy_ssl_session_reuse on;",
        "",
    ]
    healthy = [m for m in state.masters if m.healthy]
    if healthy:
        lines.append(f"    upstream {MASTERS_UPSTREAM} {{")
        lines += [
            f"        server {_server(m)};  # {_word(m.certname, 'certname')}" for m in healthy
        ]
        lines += ["        keepalive 32;", "    }", ""]
    ports = master_ports(state.masters, s.ports)
    by_name = {m.certname: m for m in state.masters}
    for i, (certname, _) in enumerate(ports.items()):
        m = by_name[certname]
        if m.draining:
            continue
        lines += [
            f"    upstream puppetha_master_{i} {{",
            f"        server {_server(m)};  # {_word(certname, 'certname')}",
            "        keepalive 4;",
            "    }",
            "",
        ]

    lines += [
        "    # The front: agents for good.",
        "    server {",
        f"        listen {_host_port(s.ports.address, s.ports.front, 'front')} ssl;",
    ]
    lines += _tls_server(s, verify="optional")
    lines += _ca_locations(rt)
    if healthy:
        lines += _proxy(MASTERS_UPSTREAM, s.master_name, require_certificate=True)
    else:
        lines += _NO_MASTER
    lines += ["    }", ""]

    for i, (certname, port) in enumerate(ports.items()):
        draining = by_name[certname].draining
        lines += [
            f"    # {certname} being drained: no new agents; a first test run goes to the masters in service."
            if draining else f"    # {certname} alone, for an agent's first test run.",
            "    server {",
            f"        listen {_host_port(s.ports.address, port, 'master port')} ssl;",
        ]
        lines += _tls_server(s)
        lines += _ca_locations(None)
        if not draining:
            lines += _proxy(f"puppetha_master_{i}", certname)
        elif healthy:
            # Its port stays (the others' do not move); nothing reaches the draining master.
            lines += _proxy(MASTERS_UPSTREAM, s.master_name)
        else:
            lines += _NO_MASTER
        lines += ["    }", ""]
    lines += ["}", ""]
    return lines


def _stream(state: FrontState) -> list[str]:
    if not state.enroll_backends:
        return []
    s = state.settings
    lines = [
        "# Enrollment passes through as TCP; the PROXY header tells the service the instance's",
        "# real address, which it checks against the identity document.",
        "stream {",
        f"    upstream {ENROLL_UPSTREAM} {{",
    ]
    lines += [
        f"        server {_host_port(b.address, b.port, 'enrollment backend')};"
        for b in state.enroll_backends
    ]
    lines += [
        "    }",
        "    # A flood from one address, or from all, never takes every connection of the",
        "    # enrollment services (nor their descriptors, which the ENC shares on their hosts).",
        f"    limit_conn_zone $binary_remote_addr zone={ENROLL_ZONE_PER_CLIENT}:1m;",
        f"    limit_conn_zone $server_port zone={ENROLL_ZONE_TOTAL}:64k;",
        "    server {",
        f"        listen {_host_port(s.ports.address, s.ports.enroll, 'enrollment port')};",
        f"        proxy_pass {ENROLL_UPSTREAM};",
        "        proxy_protocol on;",
        "        proxy_connect_timeout 5s;",
        f"        limit_conn {ENROLL_ZONE_PER_CLIENT} {ENROLL_CONNECTIONS_PER_CLIENT};",
        f"        limit_conn {ENROLL_ZONE_TOTAL} {ENROLL_CONNECTIONS};",
        "        # An enrollment is one short exchange: nothing idles longer than the client waits.",
        f"        proxy_timeout {ENROLL_PROXY_TIMEOUT};",
        "    }",
        "}",
    ]
    return lines


#: Connections one address may hold open on the enrollment port, and all addresses together.
ENROLL_CONNECTIONS_PER_CLIENT = 8
ENROLL_CONNECTIONS = 512
ENROLL_ZONE_PER_CLIENT = "puppetha_enroll_per_client"
ENROLL_ZONE_TOTAL = "puppetha_enroll_total"
#: Longest silence either way on an enrollment connection (puppetha-enroll waits 30 s).
ENROLL_PROXY_TIMEOUT = "30s"


def render_files(
    state: FrontState,
    ca_bundle: bytes,
    crl_bundle: bytes,
    server_chain: bytes,
    *,
    agent_ca_bundle: bytes,
    agent_crl_bundle: bytes,
) -> dict[str, bytes]:
    """A whole generation: the config and the certificate files it names, by file name."""
    return {
        CONFIG_NAME: render(state).encode("utf-8"),
        SERVER_CHAIN: server_chain,
        CA_BUNDLE: ca_bundle,
        CRL_BUNDLE: crl_bundle,
        AGENT_CA_BUNDLE: agent_ca_bundle,
        AGENT_CRL_BUNDLE: agent_crl_bundle,
    }

