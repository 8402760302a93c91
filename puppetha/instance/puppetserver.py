"""
What a master's puppetserver needs from puppetha, as files: its certificates and puppetha's CA
material, the CA service disabled, trust in nginx's client-identity headers, and the ENC.

Header trust applies to every listener of a puppetserver, so a master has exactly one listener
and it accepts only the nginx nodes: ``client-auth: need`` with an ``ssl-ca-cert`` that holds the
lb CA alone (the CA that signs lb nodes' certificates and nothing else).  An agent holding a
perfectly good certificate of a master's CA cannot complete a handshake with it, so it cannot
send forged ``X-Client-*`` headers; agents reach masters only through nginx, their first test
run included (nginx's per-master ports).

:func:`master_config_files` (what puppetha must own on any master: the listener, authorization
and the services) and :func:`server_settings` (puppet.conf's ``[server]``) are what
``puppetha-enroll --role master`` writes beside the ssldir, in one all-or-nothing step, into a
packaged puppetserver.  :func:`master_files` adds the process-level files for a puppetserver run
from a directory of its own (the test fixture) and is written by :func:`write_master_files`
(keys 0600, atomically).  All of them are pure (file name -> content).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from attrs import field, frozen
from cryptography import x509

from puppetha.enc.launcher import fast_command

PUPPETSERVER_JAR = "/usr/share/puppetserver/puppetserver.jar"
RUBY_LOAD_PATH = "/usr/lib/puppetserver/ruby/vendor_ruby"
VENDORED_GEMS = "/usr/lib/puppetserver/vendored-jruby-gems"
JRUBY_LIB = "/usr/share/jruby/lib"

#: Puppet's port, where a master's puppetserver listens for the nginx nodes.
MASTER_PORT = 8140

#: Debian's services, with the CA service replaced by the disabled one (puppetha is the CA).
BOOTSTRAP_SERVICES = (
    "puppetlabs.services.request-handler.request-handler-service/request-handler-service",
    "puppetlabs.services.jruby.jruby-puppet-service/jruby-puppet-pooled-service",
    "puppetlabs.services.jruby-pool-manager.jruby-pool-manager-service/jruby-pool-manager-service",
    "puppetlabs.services.puppet-profiler.puppet-profiler-service/puppet-profiler-service",
    "puppetlabs.trapperkeeper.services.webserver.jetty9-service/jetty9-service",
    "puppetlabs.trapperkeeper.services.webrouting.webrouting-service/webrouting-service",
    "puppetlabs.services.config.puppet-server-config-service/puppet-server-config-service",
    "puppetlabs.services.master.master-service/master-service",
    "puppetlabs.services.puppet-admin.puppet-admin-service/puppet-admin-service",
    "puppetlabs.trapperkeeper.services.authorization.authorization-service/authorization-service",
    "puppetlabs.services.versioned-code-service.versioned-code-service/versioned-code-service",
    "puppetlabs.trapperkeeper.services.scheduler.scheduler-service/scheduler-service",
    "puppetlabs.trapperkeeper.services.status.status-service/status-service",
    "puppetlabs.trapperkeeper.services.metrics.metrics-service/metrics-service",
    "puppetlabs.trapperkeeper.services.metrics.metrics-service/metrics-webservice",
    "puppetlabs.services.jruby.jruby-metrics-service/jruby-metrics-service",
    "puppetlabs.services.analytics.analytics-service/analytics-service",
)
#: Debian's ``services.d/ca.cfg`` enables the CA service too: it is replaced as well, or
#: puppetserver would find two implementations of the CA service and refuse to start.
CA_SERVICES = (
    "puppetlabs.services.ca.certificate-authority-disabled-service/certificate-authority-disabled-service",
    "puppetlabs.trapperkeeper.services.watcher.filesystem-watch-service/filesystem-watch-service",
)


@frozen
class PuppetserverLayout:
    """Where puppetserver's and puppet's files live."""

    conf_d: str
    services_d: str
    #: puppet's confdir (puppet.conf); also puppetserver's ``server-conf-dir``.
    confdir: str
    codedir: str
    vardir: str
    rundir: str
    logdir: str
    ssldir: str
    gem_home: str

    @classmethod
    def debian(cls) -> PuppetserverLayout:
        """Debian's puppetserver package paths."""
        return cls(
            conf_d="/etc/puppet/puppetserver/conf.d",
            services_d="/etc/puppet/puppetserver/services.d",
            confdir="/etc/puppet",
            codedir="/etc/puppet/code",
            vardir="/var/lib/puppetserver",
            rundir="/run/puppetserver",
            logdir="/var/log/puppetserver",
            ssldir="/var/lib/puppet/ssl",
            gem_home="/var/lib/puppetserver/jruby-gems",
        )

    @classmethod
    def under(cls, root: str | os.PathLike[str]) -> PuppetserverLayout:
        """Everything below one directory (tests)."""
        r = Path(root)
        return cls(
            conf_d=str(r / "conf.d"),
            services_d=str(r / "services.d"),
            confdir=str(r / "confdir"),
            codedir=str(r / "code"),
            vardir=str(r / "var"),
            rundir=str(r / "run"),
            logdir=str(r / "log"),
            ssldir=str(r / "ssl"),
            gem_home=str(r / "gems"),
        )

    def certificate(self, certname: str) -> str:
        return f"{self.ssldir}/certs/{certname}.pem"

    def private_key(self, certname: str) -> str:
        return f"{self.ssldir}/private_keys/{certname}.pem"

    @property
    def ca_chain(self) -> str:
        return f"{self.ssldir}/certs/ca.pem"

    @property
    def crl_chain(self) -> str:
        return f"{self.ssldir}/crl.pem"

    @property
    def lb_ca(self) -> str:
        return f"{self.ssldir}/lb-ca.pem"

    @property
    def lb_crl(self) -> str:
        return f"{self.ssldir}/lb-crl.pem"

    @property
    def logback(self) -> str:
        return f"{self.conf_d}/../logback.xml"


@frozen
class MasterMaterial:
    """The master's TLS material, from its enrollment answer."""

    certname: str
    certificate_pem: str
    private_key_pem: str
    #: Every puppetha CA, root included (puppet's own ``localcacert``).
    ca_chain_pem: str
    #: A CRL for every CA in ``ca_chain_pem``.
    crl_chain_pem: str
    #: The CA that signs lb nodes' certificates: the only one the listener trusts.
    lb_ca_pem: str
    #: Its CRL, so a revoked lb node is refused too.
    lb_crl_pem: str


@frozen
class MasterSettings:
    #: The private address nginx nodes reach (never a public one).
    listen_address: str
    listen_port: int = MASTER_PORT
    #: The ENC command puppetserver runs with the certname as its last argument: words
    #: separated by single spaces (puppet splits ``external_nodes`` on whitespace).  The
    #: default runs the script's bytecode, isolated and without site: :mod:`puppetha.enc.launcher`.
    enc_command: str = field(factory=fast_command)
    #: The ENC socket, passed as ``--socket`` (empty: the script's default).
    enc_socket: str = ""
    max_jruby_instances: int = 1
    environment: str = "production"
    log_level: str = "INFO"


class LayoutError(ValueError):
    pass


def _hocon_string(value: str) -> str:
    # JSON strings are valid HOCON quoted strings.
    return json.dumps(value)


def _check_word(value: str, what: str) -> str:
    if not value or any(c.isspace() or c in "\"'\\\n;#" for c in value):
        raise LayoutError(f"{what} {value!r} cannot be written into puppet's configuration")
    return value


AUTH_RULES = (
    # (name, path, type, methods, allow) -- allow "$1": only the node named in the path.
    ("puppetha catalog", "^/puppet/v3/catalog/([^/]+)$", "regex", ["get", "post"], "$1"),
    ("puppetha node", "^/puppet/v3/node/([^/]+)$", "regex", ["get"], "$1"),
    ("puppetha facts", "^/puppet/v3/facts/([^/]+)$", "regex", ["put"], "$1"),
    ("puppetha report", "^/puppet/v3/report/([^/]+)$", "regex", ["put"], "$1"),
    ("puppetha file bucket", "/puppet/v3/file_bucket_file", "path", ["get", "head", "post", "put"], "*"),
    ("puppetha file content", "/puppet/v3/file_content", "path", ["get", "post"], "*"),
    ("puppetha file metadata", "/puppet/v3/file_metadata", "path", ["get", "post"], "*"),
    ("puppetha static file content", "/puppet/v3/static_file_content", "path", ["get"], "*"),
    ("puppetha environments", "/puppet/v3/environments", "path", ["get"], "*"),
    ("puppetha tasks", "/puppet/v3/tasks", "path", ["get"], "*"),
)


def auth_conf() -> str:
    """
    puppetserver's authorization: each node reads its own catalog and node and writes its own
    facts and reports; the status API answers anyone who got through TLS (only lb nodes can);
    everything else, the admin and CA APIs included, is denied.
    """
    rules = []
    for name, path, kind, methods, allow in AUTH_RULES:
        rules.append(
            "        {\n"
            f"            match-request: {{ path: {_hocon_string(path)}, type: {kind}, "
            f"method: [{', '.join(methods)}] }}\n"
            f"            allow: {_hocon_string(allow)}\n"
            "            sort-order: 500\n"
            f"            name: {_hocon_string(name)}\n"
            "        }"
        )
    for name, path in (("puppetha status simple", "/status/v1/simple"),
                       ("puppetha status services", "/status/v1/services")):
        rules.append(
            "        {\n"
            f"            match-request: {{ path: {_hocon_string(path)}, type: path, method: get }}\n"
            "            allow-unauthenticated: true\n"
            "            sort-order: 500\n"
            f"            name: {_hocon_string(name)}\n"
            "        }"
        )
    rules.append(
        "        {\n"
        '            match-request: { path: "/", type: path }\n'
        '            deny: "*"\n'
        "            sort-order: 999\n"
        '            name: "puppetha deny everything else"\n'
        "        }"
    )
    return (
        "# Written by puppetha.  Identities come from nginx's X-Client-* headers: this\n"
        "# puppetserver's only listener accepts nothing but lb nodes' certificates.\n"
        "authorization: {\n"
        "    version: 1\n"
        "    allow-header-cert-info: true\n"
        "    rules: [\n" + ",\n".join(rules) + "\n    ]\n}\n"
    )


def check_lb_ca(lb_ca_pem: str) -> None:
    """
    The listener's only trust anchor must be a CA that signs lb nodes alone.  A self-signed
    root would also accept any agent that sends its CA chain along with its certificate.
    """
    certs = x509.load_pem_x509_certificates(lb_ca_pem.encode("ascii"))
    if len(certs) != 1:
        raise LayoutError("the lb CA bundle must hold exactly one certificate")
    if certs[0].subject == certs[0].issuer:
        raise LayoutError(
            "the lb CA is self-signed (the root?): masters would then trust every agent's headers"
        )


def material_from_ssldir(
    ssldir: str | os.PathLike[str], certname: str, lb_ca_pem: str, lb_crl_pem: str
) -> MasterMaterial:
    """The material of a master enrolled with ``puppetha-enroll --role master`` (its puppet ssldir)."""
    d = Path(ssldir)
    return MasterMaterial(
        certname=certname,
        certificate_pem=(d / "certs" / f"{certname}.pem").read_text(),
        private_key_pem=(d / "private_keys" / f"{certname}.pem").read_text(),
        ca_chain_pem=(d / "certs" / "ca.pem").read_text(),
        crl_chain_pem=(d / "crl.pem").read_text(),
        lb_ca_pem=lb_ca_pem,
        lb_crl_pem=lb_crl_pem,
    )


def server_settings(settings: MasterSettings) -> dict[str, str]:
    """puppet.conf's ``[server]`` settings for puppetha's ENC.  ``LayoutError`` if unsafe."""
    enc = " ".join(_check_word(word, "ENC command") for word in settings.enc_command.split(" "))
    if settings.enc_socket:
        enc += f" --socket={_check_word(settings.enc_socket, 'ENC socket')}"
    return {"node_terminus": "exec", "external_nodes": enc}


def master_config_files(
    layout: PuppetserverLayout, material: MasterMaterial, settings: MasterSettings
) -> dict[str, str]:
    """
    What puppetha owns on every master, by absolute path: the lb-only listener, header-trusting
    authorization, and the services with the CA disabled.  ``LayoutError`` if unsafe.
    """
    certname = _check_word(material.certname, "certname")
    check_lb_ca(material.lb_ca_pem)
    _check_word(settings.listen_address, "listen address")
    for path in (layout.ssldir, layout.conf_d, layout.services_d):
        _check_word(path, "path")
    q = _hocon_string
    return {
        f"{layout.conf_d}/webserver.conf": (
            "# Written by puppetha.  One listener, for the nginx nodes only: see auth.conf.\n"
            "webserver: {\n"
            f"    ssl-host: {q(settings.listen_address)}\n"
            f"    ssl-port: {settings.listen_port}\n"
            f"    ssl-cert: {q(layout.certificate(certname))}\n"
            f"    ssl-key: {q(layout.private_key(certname))}\n"
            f"    ssl-ca-cert: {q(layout.lb_ca)}\n"
            f"    ssl-crl-path: {q(layout.lb_crl)}\n"
            "    client-auth: need\n"
            "}\n"
        ),
        f"{layout.conf_d}/auth.conf": auth_conf(),
        f"{layout.services_d}/bootstrap.cfg": "\n".join(BOOTSTRAP_SERVICES) + "\n",
        f"{layout.services_d}/ca.cfg": (
            "# Written by puppetha: puppetha is the CA.\n" + "\n".join(CA_SERVICES) + "\n"
        ),
    }


def master_ssl_files(layout: PuppetserverLayout, material: MasterMaterial) -> dict[str, str]:
    """The ssldir's files for a master, by absolute path (the key among them)."""
    certname = _check_word(material.certname, "certname")
    return {
        layout.certificate(certname): material.certificate_pem,
        layout.private_key(certname): material.private_key_pem,
        layout.ca_chain: material.ca_chain_pem,
        layout.crl_chain: material.crl_chain_pem,
        layout.lb_ca: material.lb_ca_pem,
        layout.lb_crl: material.lb_crl_pem,
    }


def master_files(
    layout: PuppetserverLayout, material: MasterMaterial, settings: MasterSettings
) -> dict[str, str]:
    """
    Every file of a master whose puppetserver runs from ``layout`` alone (not the package's
    files), by absolute path: :func:`master_config_files`, the ssldir, a complete puppet.conf
    and the process-level settings.  ``LayoutError`` if unsafe.
    """
    certname = _check_word(material.certname, "certname")
    files = master_config_files(layout, material, settings)
    server = server_settings(settings)
    for path in (layout.confdir, layout.codedir, layout.vardir):
        _check_word(path, "path")
    q = _hocon_string
    files[f"{layout.conf_d}/global.conf"] = (
        "global: {\n"
        f"    logging-config: {q(layout.logback)}\n"
        "}\n"
        "product: {\n"
        "    check-for-updates: false\n"
        "}\n"
    )
    files[f"{layout.conf_d}/puppetserver.conf"] = (
        "jruby-puppet: {\n"
        f"    ruby-load-path: [{q(RUBY_LOAD_PATH)}]\n"
        f"    gem-home: {q(layout.gem_home)}\n"
        f"    gem-path: [{q(layout.gem_home)}, {q(VENDORED_GEMS)}]\n"
        f"    server-conf-dir: {q(layout.confdir)}\n"
        f"    server-code-dir: {q(layout.codedir)}\n"
        f"    server-var-dir: {q(layout.vardir)}\n"
        f"    server-run-dir: {q(layout.rundir)}\n"
        f"    server-log-dir: {q(layout.logdir)}\n"
        f"    max-active-instances: {settings.max_jruby_instances}\n"
        "}\n"
        "http-client: {}\n"
        "profiler: { enabled: false }\n"
    )
    files[f"{layout.conf_d}/web-routes.conf"] = (
        "web-router-service: {\n"
        '    "puppetlabs.services.ca.certificate-authority-service/certificate-authority-service": '
        '"/puppet-ca"\n'
        '    "puppetlabs.services.master.master-service/master-service": "/puppet"\n'
        '    "puppetlabs.services.legacy-routes.legacy-routes-service/legacy-routes-service": ""\n'
        '    "puppetlabs.services.puppet-admin.puppet-admin-service/puppet-admin-service": '
        '"/puppet-admin-api"\n'
        '    "puppetlabs.trapperkeeper.services.status.status-service/status-service": "/status"\n'
        '    "puppetlabs.trapperkeeper.services.metrics.metrics-service/metrics-webservice": "/metrics"\n'
        "}\n"
    )
    files[f"{layout.conf_d}/metrics.conf"] = f"metrics: {{ server-id: {q(certname)} }}\n"
    files[layout.logback] = (
        "<configuration scan=\"false\">\n"
        "  <appender name=\"console\" class=\"ch.qos.logback.core.ConsoleAppender\">\n"
        "    <encoder><pattern>%d %-5p [%c{2}] %m%n</pattern></encoder>\n"
        "  </appender>\n"
        f"  <root level=\"{_check_word(settings.log_level, 'log level')}\">"
        "<appender-ref ref=\"console\"/></root>\n"
        "</configuration>\n"
    )
    files[f"{layout.confdir}/puppet.conf"] = (
        "# Written by puppetha.\n"
        "[main]\n"
        f"certname = {certname}\n"
        f"ssldir = {layout.ssldir}\n"
        "\n"
        "[server]\n"
        f"vardir = {layout.vardir}\n"
        f"codedir = {layout.codedir}\n"
        f"environment = {_check_word(settings.environment, 'environment')}\n"
        + "".join(f"{name} = {value}\n" for name, value in server.items())
        + "reports = none\n"
    )
    files.update(master_ssl_files(layout, material))
    return files


def is_secret(path: str, layout: PuppetserverLayout) -> bool:
    return path.startswith(f"{layout.ssldir}/private_keys/")


def write_master_files(files: Mapping[str, str], layout: PuppetserverLayout) -> None:
    """Write each file atomically (temporary file, then rename); private keys 0600 from the start."""
    for path, text in sorted(files.items()):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        secret = is_secret(path, layout)
        if secret:
            os.chmod(target.parent, 0o700)
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            # mkstemp makes the file 0600; only public files are opened up.
            if not secret:
                os.fchmod(fd, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    for directory in (layout.vardir, layout.rundir, layout.logdir, layout.gem_home, layout.codedir):
        Path(directory).mkdir(parents=True, exist_ok=True)


def java_command(
    layout: PuppetserverLayout,
    heap: str = "512m",
    java: str = "/usr/bin/java",
    jar: str = PUPPETSERVER_JAR,
) -> list[str]:
    """The command that runs puppetserver in the foreground with ``layout``'s configuration."""
    return [
        java,
        f"-Xms{min(heap, '256m', key=_mebibytes)}",
        f"-Xmx{heap}",
        "-Djruby.logger.class=com.puppetlabs.jruby_utils.jruby.Slf4jLogger",
        f"-Djruby.lib={JRUBY_LIB}",
        "-XX:+CrashOnOutOfMemoryError",
        "-jar",
        jar,
        "--config",
        layout.conf_d,
        "--bootstrap-config",
        layout.services_d,
    ]


def _mebibytes(size: str) -> int:
    units = {"k": 1 / 1024, "m": 1, "g": 1024}
    return int(float(size[:-1]) * units[size[-1].lower()])
