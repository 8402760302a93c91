"""
The configuration: an INI file like puppet.conf, read and validated completely before anything
starts, into frozen objects.

Every option is declared once in :data:`OPTIONS` with its parser, default and documentation;
``etc/puppetha.conf`` and ``docs/configuration.md`` are checked against that table by the tests,
so the documentation cannot drift from the code.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from attrs import field, frozen

from puppetha.aws.identity import REGION_NAME
from puppetha.pki.names import check_certname_template, check_host_port, parse_san

ROLES = ("enroll", "enc", "lb")
KEY_TYPES = ("ec-p256", "rsa-2048", "rsa-3072", "rsa-4096")
DEFAULT_STATE_DIR = "/var/lib/puppetha"
#: Where the daemon and the CLI look for the configuration when none is named.
DEFAULT_CONFIG_PATH = "/etc/puppetha/puppetha.conf"
#: Names the configuration file when ``--config`` does not.
CONFIG_ENV = "PUPPETHA_CONFIG"


class ConfigError(Exception):
    """One clear line naming the file, the option and what is wrong with it."""


# -- value parsers: each takes the raw text and returns the value or raises ValueError -------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|y)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "y": 365 * 86400}


def duration(text: str) -> float:
    """``90``, ``30s``, ``10m``, ``2h``, ``7d``, ``5y`` -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration (like 30s, 10m, 2h, 7d, 5y): {text!r}")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"not a boolean (true or false): {text!r}")


def words(text: str) -> tuple[str, ...]:
    """A comma- or whitespace-separated list."""
    return tuple(w for w in re.split(r"[,\s]+", text.strip()) if w)


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return parse


def some_of(*choices: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        values = words(text)
        for value in values:
            if value not in choices:
                raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return tuple(dict.fromkeys(values))

    return parse


def integer(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 0)
        except ValueError:
            raise ValueError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"{value} is outside {low}..{high}")
        return value

    return parse


def fraction(text_value: str) -> float:
    """A positive number, like ``0.8`` (a share of a pool, which load may exceed)."""
    try:
        value = float(text_value.strip())
    except ValueError:
        raise ValueError(f"not a number (like 0.8): {text_value!r}") from None
    if not 0 <= value <= 100:
        raise ValueError(f"{value} is outside 0..100")
    return value


def text(value: str) -> str:
    return value.strip()


def region(value: str) -> str:
    """An AWS region's name, as its identity documents spell it (``us-east-1``)."""
    value = value.strip()
    if not REGION_NAME.fullmatch(value):
        raise ValueError(f"not an AWS region name (like us-east-1): {value!r}")
    return value


def path(value: str) -> str:
    value = value.strip()
    if value and not os.path.isabs(value):
        raise ValueError(f"must be an absolute path: {value!r}")
    return value


def file_mode(value: str) -> int:
    try:
        mode = int(value.strip(), 8)
    except ValueError:
        raise ValueError(f"not an octal file mode (like 0660): {value!r}") from None
    if mode & ~0o777:
        raise ValueError(f"not a file mode: {value!r}")
    if mode & 0o007:
        raise ValueError("must give nothing to others (the socket serves classifications)")
    return mode


_ACCOUNT = re.compile(r"^\d{12}$")


def accounts(value: str) -> tuple[str, ...]:
    ids = words(value)
    for account in ids:
        if not _ACCOUNT.match(account):
            raise ValueError(f"not a 12-digit AWS account id: {account!r}")
    return ids


def addresses(value: str) -> tuple[str, ...]:
    out = []
    for word in words(value):
        try:
            out.append(str(ipaddress.ip_address(word)))
        except ValueError:
            raise ValueError(f"not an IP address: {word!r}") from None
    return tuple(out)


def address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError(f"not an IP address: {value.strip()!r}") from None


def optional_address(value: str) -> str:
    return address(value) if value.strip() else ""


def elastic_ip(value: str) -> str:
    value = value.strip()
    if value and not re.match(r"^eipalloc-[0-9a-f]{8,17}$", value):
        raise ValueError(f"not an Elastic IP allocation id (eipalloc-...): {value!r}")
    return value


def instance_id(value: str) -> str:
    value = value.strip()
    if value and not re.match(r"^i-[0-9a-f]{8,17}$", value):
        raise ValueError(f"not an EC2 instance id (i-...): {value!r}")
    return value


def host_port(value: str) -> str:
    return check_host_port(value.strip())


_RULE = re.compile(r"^(tag:[^=\s]+=\S*|profile:arn:\S+|sg:\S+)$")


def role_rules(value: str) -> tuple[str, ...]:
    """``tag:Key=Value``, ``profile:arn:aws:iam::...:instance-profile/Name`` or ``sg:sg-123|name``."""
    rules = words(value)
    for rule in rules:
        if not _RULE.match(rule):
            raise ValueError(f"not a rule (tag:KEY=VALUE, profile:ARN or sg:GROUP): {rule!r}")
    return rules


def certname_template(value: str) -> str:
    return check_certname_template(value.strip())


def url(value: str) -> str:
    value = value.strip()
    if value and not re.match(r"^https?://[^\s/]+(/\S*)?$", value):
        raise ValueError(f"not an http(s) URL: {value!r}")
    return value


#: The keywords each listening endpoint takes (Twisted's endpoint descriptions); a typo in one
#: would otherwise surface as a traceback when the daemon starts listening.
_ENDPOINT_KEYWORDS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "interface", "backlog"),
    "unix": ("address", "mode", "backlog", "lockfile", "wantPID"),
}


def endpoint(value: str) -> str:
    """A ``tcp:``, ``tcp6:`` or ``unix:`` listening endpoint, checked the whole way through."""
    value = value.strip()
    kind, colon, rest = value.partition(":")
    if not colon or kind not in _ENDPOINT_KEYWORDS or not rest or re.search(r"\s", value):
        raise ValueError(f"not a tcp: or unix: endpoint description: {value!r}")
    positional: list[str] = []
    keywords: dict[str, str] = {}
    # Colons escaped with a backslash belong to the value (an IPv6 interface: \:\:1).
    for escaped in re.split(r"(?<!\\):", rest):
        part = escaped.replace("\\:", ":")
        name, equals, given = part.partition("=")
        if not equals:
            positional.append(part)
        elif name not in _ENDPOINT_KEYWORDS[kind]:
            raise ValueError(f"{value!r}: unknown keyword {name!r} "
                             f"(known: {', '.join(_ENDPOINT_KEYWORDS[kind])})")
        elif name in keywords:
            raise ValueError(f"{value!r}: {name} given twice")
        else:
            keywords[name] = given
    first = "address" if kind == "unix" else "port"
    if len(positional) > 1 or (positional and first in keywords):
        raise ValueError(f"{value!r}: too many values (one {first}, then keyword=value)")
    if positional:
        keywords[first] = positional[0]
    if first not in keywords:
        raise ValueError(f"{value!r}: no {first}")
    if kind == "unix":
        if not os.path.isabs(keywords["address"]):
            raise ValueError(f"{value!r}: the socket must be an absolute path")
        return value
    port = keywords["port"]
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r}: the port must be a number from 0 to 65535, not {port!r}")
    if "interface" in keywords:
        try:
            ipaddress.ip_address(keywords["interface"])
        except ValueError:
            raise ValueError(f"{value!r}: the interface must be an IP address, "
                             f"not {keywords['interface']!r}") from None
    if "backlog" in keywords and not keywords["backlog"].isdigit():
        raise ValueError(f"{value!r}: backlog must be a number")
    return value


def metrics_endpoint(value: str) -> str:
    """Empty (no metrics listener), or an endpoint that names the address it listens on."""
    value = value.strip()
    if not value:
        return value
    endpoint(value)
    if value.startswith("tcp") and "interface=" not in value:
        raise ValueError(f"{value!r}: name the interface (interface=127.0.0.1 for this host only): "
                         "the figures describe the fleet, and without one every address listens")
    return value


def server_names(value: str) -> tuple[str, ...]:
    """DNS names and IP addresses for the enrollment server's certificate: at least one."""
    names = words(value)
    if not names:
        raise ValueError("name at least one DNS name or IP address")
    for name in names:
        parse_san(name)  # ValueError says what is wrong with it
    return names


# -- the table of options ------------------------------------------------------------------


@frozen
class Option:
    section: str
    name: str
    parse: Callable[[str], Any]
    #: The default as it would be written in the file; ``{state_dir}`` is expanded.
    default: str
    doc: str


OPTIONS: tuple[Option, ...] = (
    Option("daemon", "roles", some_of(*ROLES), "enroll, enc",
           "Which services this host runs: enroll (the enrollment API), enc (the ENC socket), "
           "lb (the nginx front)."),
    Option("daemon", "state_dir", path, DEFAULT_STATE_DIR,
           "Where the daemon keeps its files (the SQLite store, the vault key, TLS material)."),
    Option("daemon", "threads", integer(1, 64), "8",
           "Size of each thread pool for blocking work: store writes and signing, store reads "
           "(the ENC, health), AWS (docs/design.md)."),
    Option("store", "backend", one_of("sqlite", "dynamodb"), "sqlite",
           "sqlite keeps everything in one file on this host; dynamodb shares state between hosts."),
    Option("store", "path", path, "{state_dir}/puppetha.sqlite", "The SQLite file (backend sqlite)."),
    Option("store", "table", text, "puppetha", "The DynamoDB table (backend dynamodb)."),
    Option("store", "timeout", duration, "5s",
           "The deadline of one store call: a write waits at most this long for the write lock "
           "(SQLite: this process's other writers, then other processes'), a DynamoDB call ends "
           "within it, retries included. A call past it fails (503 store-unavailable) having "
           "changed nothing."),
    Option("pki", "key_type", one_of(*KEY_TYPES), "ec-p256",
           "Key type of the CAs puppetha creates: ec-p256, rsa-2048, rsa-3072 or rsa-4096."),
    Option("pki", "allowed_csr_keys", some_of(*KEY_TYPES), ", ".join(KEY_TYPES),
           "Key types a CSR may carry."),
    Option("pki", "vault", one_of("file", "kms"), "file",
           "How CA private keys are encrypted at rest: a local key file, or AWS KMS."),
    Option("pki", "vault_key_file", path, "{state_dir}/ca-vault.key",
           "The vault's AES-256 key (vault file); created mode 0600 on first start."),
    Option("pki", "kms_key_id", text, "", "The KMS key id or ARN (vault kms)."),
    Option("pki", "root_name", text, "puppetha Root CA", "Common name of the root CA."),
    Option("pki", "ca_lifetime", duration, "10y", "Validity of the root and the masters' CAs."),
    Option("pki", "cert_lifetime", duration, "5y", "Validity of node certificates."),
    Option("pki", "crl_lifetime", duration, "6y",
           "A CRL's nextUpdate after it is signed. Long on purpose: a host whose copy has expired "
           "cannot even fetch a new one (docs/pki.md)."),
    Option("pki", "crl_refresh_margin", duration, "5y",
           "A CRL is re-signed once its nextUpdate is closer than this, so every copy a host "
           "fetches is good for at least this long: how long an instance may stay stopped and "
           "still run. Keep it at least cert_lifetime."),
    Option("aws", "region", region, "us-east-1", "The region of the daemon's own AWS calls."),
    Option("aws", "endpoint_url", url, "",
           "Another AWS endpoint (a moto server in tests and the demo); empty for AWS itself."),
    Option("aws", "timeout", duration, "8s",
           "The deadline of one AWS call (EC2, KMS), retries included: botocore's connect and read "
           "timeouts and attempts are set to fit inside it. Keep it well under puppetha-enroll's "
           "30s: an enrollment waits for AWS and then for the store."),
    Option("aws", "accounts", accounts, "",
           "AWS account ids whose instances may enroll. Empty: none may (deny by default)."),
    Option("aws", "identity_certs", path, "",
           "INI file naming AWS's identity-document signing certificate per region (docs/aws.md). "
           "Empty: the certificates shipped with puppetha, every region AWS publishes."),
    Option("enroll", "listen", endpoint, "tcp:8080",
           "Where the enrollment API listens (TLS is added by the daemon)."),
    Option("enroll", "server_names", server_names, "puppet",
           "DNS names (and IP addresses) in the enrollment server's own certificate."),
    Option("enroll", "proxy_from", addresses, "",
           "Addresses (the nginx nodes) allowed to send a PROXY protocol header. "
           "When set, every connection must come from one of them and carry the header."),
    Option("enroll", "require_source_match", boolean, "true",
           "Refuse an enrollment whose connection does not come from the instance's private IP."),
    Option("enroll", "max_age", duration, "1h",
           "How long after its pendingTime (launch) an instance may still enroll."),
    Option("enroll", "certname_template", certname_template, "{instance_id}",
           "The certname of an enrolled node; fields: instance_id, account, region, "
           "private_ip_dashed, private_dns."),
    Option("enroll", "master_policy", role_rules, "",
           "Who may enroll as a master: tag:KEY=VALUE, profile:ARN or sg:GROUP rules, any one "
           "suffices. Empty: nobody."),
    Option("enroll", "lb_policy", role_rules, "", "Who may enroll as an nginx node; as master_policy."),
    Option("enroll", "allow_second_role", boolean, "false",
           "Let an instance that has enrolled in one role enroll in another too (a master that is "
           "also an agent). Off: refused with 409. Revoking a node revokes all its certificates."),
    Option("enroll", "health_interval", duration, "5s",
           "How often the daemon checks that it can enroll (store writable, AWS reachable, a "
           "healthy master): GET /v1/health answers from the last check at once."),
    Option("enroll", "describe_in_flight", integer(1, 8), "1",
           "DescribeInstances calls kept in flight per region while instances enroll; those that "
           "ask meanwhile go together as the next call (up to 100 instances each). Each call in "
           "flight spends the account's EC2 request budget, shared with the ENC and every other "
           "tool, once per round trip: raise it only where AWS's round trip, not moto's or the "
           "batch, sets the enrollment latency (docs/performance.md). At most [daemon] threads."),
    Option("enroll", "front", host_port, "puppet:8140",
           "The address agents use for good (the Elastic IP's name and the front port)."),
    Option("lb", "certificate", path, "",
           "The lb node's certificate (written by `puppetha-enroll --role lb`); required with role lb."),
    Option("lb", "private_key", path, "", "Its private key; required with role lb."),
    Option("lb", "master_name", text, "",
           "The name nginx checks in the masters' certificates (empty: the host of [enroll] front)."),
    Option("lb", "listen_address", address, "0.0.0.0",  # noqa: S104 - an lb node serves the VPC
           "The address nginx listens on."),
    Option("lb", "front_port", integer(1, 65535), "8140", "Where agents reach the healthy masters."),
    Option("lb", "first_master_port", integer(1, 65535), "8141",
           "Each master's own port, for an agent's first test run, counts up from here."),
    Option("lb", "max_masters", integer(1, 1000), "50", "How many per-master ports are reserved."),
    Option("lb", "enroll_port", integer(1, 65535), "8080",
           "Where instances reach the enrollment services (passed through with the PROXY protocol)."),
    Option("lb", "enroll_backends", words, "",
           "The enrollment services, host:port each; their [enroll] proxy_from must name this node."),
    Option("lb", "nginx", path, "/usr/sbin/nginx", "The nginx binary."),
    Option("lb", "nginx_dir", path, "{state_dir}/nginx",
           "Where the generations of nginx's configuration are written; nginx runs with "
           "-c <nginx_dir>/live/nginx.conf."),
    Option("lb", "nginx_pid", path, "/run/nginx.pid", "nginx's pid file."),
    Option("lb", "nginx_error_log", path, "/var/log/nginx/error.log", "nginx's error log."),
    Option("lb", "nginx_user", text, "www-data", "The user nginx's workers run as."),
    Option("lb", "nginx_temp_dir", path, "/var/lib/nginx", "Where nginx buffers request bodies."),
    Option("lb", "nginx_access_log", path, "/var/log/nginx/puppetha-access.log",
           "nginx's access log for the front (empty: none)."),
    Option("lb", "load_socket", path, "",
           "The UNIX datagram socket nginx sends one line per proxied request to, for the load "
           "monitor (docs/scaling.md); its directory must be reachable by [lb] nginx_user, the only "
           "user who may send to it (mode 0600; a daemon not running as root needs nginx run as "
           "its own user, named there). With it "
           "the node samples the masters' load every [scale] interval and publishes it in the "
           "store. Empty: no load log and no sampling. Required with [scale] enabled."),
    Option("lb", "interval", duration, "2s",
           "How often the front re-reads the store: a change made on another host (a master "
           "enrolled, a node revoked, a CRL re-signed) reaches nginx within it; one made on this "
           "host at once. A round that changes nothing writes nothing and does not reload nginx."),
    Option("lb", "health_interval", duration, "5s", "How often every master's status is probed."),
    Option("lb", "health_fall", integer(1, 100), "3", "Failed probes in a row that take a master out."),
    Option("lb", "health_rise", integer(1, 100), "2", "Good probes in a row that bring it back."),
    Option("ha", "elastic_ip", elastic_ip, "",
           "The allocation id (eipalloc-...) of the Elastic IP agents reach the front on. Empty: no "
           "failover (an lb node serves, and the address is moved by hand). Set on every lb node, "
           "and where `puppetha status` runs."),
    Option("ha", "instance_id", instance_id, "",
           "This lb node's EC2 instance id: its name among the lb nodes and where the address goes "
           "when it takes over. Required with elastic_ip."),
    Option("ha", "address", optional_address, "",
           "This node's private address, where the other lb nodes send it heartbeats. Required "
           "with elastic_ip."),
    Option("ha", "heartbeat_listen", address, "0.0.0.0",  # noqa: S104 - lb nodes hear each other
           "The address heartbeats are received on."),
    Option("ha", "heartbeat_port", integer(1, 65535), "7946", "The UDP port of heartbeats (every lb node)."),
    Option("ha", "heartbeat_interval", duration, "0.1s", "How often a node sends its heartbeat."),
    Option("ha", "suspect_after", duration, "0.2s",
           "Heartbeat silence after which a standby looks closely at the lease (every suspect_poll)."),
    Option("ha", "heartbeat_stale", duration, "5s",
           "Heartbeats sent longer ago than this (by the sender's clock) are ignored."),
    Option("ha", "lease_duration", duration, "0.8s",
           "How long a lease left unrenewed keeps others from taking it; see docs/ha.md."),
    Option("ha", "lease_margin", duration, "0.2s",
           "The holder stops acting this long before lease_duration has passed since its last "
           "renewal began."),
    Option("ha", "renew_interval", duration, "0.2s",
           "How often the holder renews; under lease_duration - lease_margin."),
    Option("ha", "standby_poll", duration, "1s",
           "How often a standby reads the lease while the primary's heartbeats arrive."),
    Option("ha", "suspect_poll", duration, "0.05s", "How often a suspecting standby reads the lease."),
    Option("ha", "address_check", duration, "2s",
           "How often the primary checks that the Elastic IP is still on its instance (and takes "
           "it back if not)."),
    Option("ha", "acting_log", path, "",
           "A file where the node appends (JSON lines, monotonic clock) each time it acted as "
           "primary and each AssociateAddress, with the lease token. Empty: none."),
    Option("master", "ssldir", path, "",
           "On a master: the ssldir whose CRL files the daemon keeps in step with the store "
           "(crl.pem: every CA's; lb-crl.pem: the lb CA's, which puppetserver checks lb nodes "
           "against). Empty: none (not a master)."),
    Option("master", "crl_interval", duration, "10s",
           "How often a master's CRL files are compared with the store: a revoked lb node is "
           "refused by puppetserver within it (puppetserver reloads the file when it changes)."),
    Option("scale", "enabled", boolean, "false",
           "Launch masters when Puppet is busy and drain them when it is not (docs/scaling.md): the "
           "primary lb node decides every interval from the lb nodes' load samples, launches from "
           "launch_template, and drains and terminates an idle master. Needs [ha] elastic_ip and "
           "[lb] load_socket on lb nodes."),
    Option("scale", "interval", duration, "10s",
           "How often every lb node samples the masters' load (nginx's load log, puppetserver's "
           "jruby-metrics, agents per master) and publishes it, and the primary decides."),
    Option("scale", "launch_template", text, "",
           "The launch template (lt-... or its name) of new masters; its instances must pass "
           "[enroll] master_policy. Required when enabled."),
    Option("scale", "min_masters", integer(0, 1000), "1", "Fewer serving masters than this: launch at once."),
    Option("scale", "max_masters", integer(1, 1000), "4", "Never more masters than this."),
    Option("scale", "max_launches", integer(1, 100), "2",
           "At most this many masters launched by one decision, and starting or warming at once."),
    Option("scale", "out_busy", fraction, "0.8",
           "Scale out when the serving masters' mean busy share (JRubies in use plus borrows waiting, "
           "over the pool) stays at or above this for out_window; a 503 or a queue-limit hit counts "
           "as busy."),
    Option("scale", "out_window", duration, "60s", "How long out_busy must hold."),
    Option("scale", "in_busy", fraction, "0.3",
           "Scale in (drain one master) when the busy share stays at or below this, with no 503, for "
           "in_window."),
    Option("scale", "in_window", duration, "10m", "How long in_busy must hold: longer than out_window."),
    Option("scale", "target_busy", fraction, "0.6",
           "The busy share a launch aims at; a drain is made only if the rest stay under it. "
           "Between in_busy and out_busy."),
    Option("scale", "cooldown", duration, "5m", "No launch or drain for this long after any."),
    Option("scale", "warmup", duration, "5m",
           "A new master's time from enrollment to serving (puppetserver starting its JRubies): not "
           "judged, and no other launch, meanwhile."),
    Option("scale", "launch_timeout", duration, "15m",
           "A launched master not enrolled after this long no longer counts as coming."),
    Option("scale", "drain_timeout", duration, "2m",
           "A draining master gets no new agents or requests; the requests nginx had sent it may "
           "finish for this long, then it is terminated (sooner once none is in flight)."),
    Option("scale", "stale", duration, "30s", "Without a load sample younger than this, nothing is decided."),
    Option("lifecycle", "interval", duration, "60s",
           "How often the primary lb node checks the enrolled instances against DescribeInstances "
           "(lb role with [ha] elastic_ip)."),
    Option("lifecycle", "revoke_terminated", boolean, "true",
           "Revoke every certificate of an instance AWS says is terminated. A terminated master "
           "leaves the upstream either way; its CA stays trusted for the agents it signed."),
    Option("lifecycle", "grace", duration, "10m",
           "An enrolled instance DescribeInstances does not know counts as terminated only this "
           "long after it enrolled (EC2's reads are eventually consistent)."),
    Option("enc", "socket", path, "/run/puppetha/enc.sock", "The ENC's UNIX socket."),
    Option("enc", "socket_mode", file_mode, "0660", "The socket's mode."),
    Option("enc", "socket_owner", text, "", "User owning the socket (empty: the daemon's)."),
    Option("enc", "socket_group", text, "",
           "Group owning the socket; puppetserver's user must be in it (empty: the daemon's)."),
    Option("enc", "cache_ttl", duration, "60s",
           "How long an instance's state, security groups and tags are trusted before a refresh."),
    Option("enc", "stale_limit", duration, "1h",
           "While AWS or the store is unreachable, a node's last good classification is served "
           "for at most this long."),
    Option("enc", "store_hot_window", duration, "60s",
           "A node's record and scopes are kept fresh this long after it last asked, so that its "
           "next question within the run needs no store read; shorter reads the store less "
           "(docs/enc.md says what it costs)."),
    Option("metrics", "listen", metrics_endpoint, "",
           "Where GET /metrics (Prometheus's text format, plain HTTP) listens, e.g. "
           "tcp:9464:interface=127.0.0.1; a tcp endpoint must name its interface. Empty: no "
           "metrics. Keep it on loopback or a private address: the figures reveal the fleet "
           "(masters, lb nodes, the primary, CRL dates) to whoever can read them (docs/metrics.md)."),
)

_BY_KEY: Mapping[tuple[str, str], Option] = {(o.section, o.name): o for o in OPTIONS}
SECTIONS = tuple(dict.fromkeys(o.section for o in OPTIONS))


# -- the frozen configuration --------------------------------------------------------------


@frozen
class Config:
    """The validated configuration; ``values[(section, name)]`` holds every option."""

    source: str
    values: Mapping[tuple[str, str], Any] = field(repr=False)
    #: The options the file or the command line set; the rest are defaults.
    given: frozenset[tuple[str, str]] = field(default=frozenset(), repr=False, eq=False)

    def __getitem__(self, key: tuple[str, str]) -> Any:
        return self.values[key]

    @property
    def roles(self) -> tuple[str, ...]:
        return self.values[("daemon", "roles")]  # type: ignore[no-any-return]

    @property
    def state_dir(self) -> str:
        return self.values[("daemon", "state_dir")]  # type: ignore[no-any-return]


def config_from_string(
    content: str, source: str = "<string>", overrides: Mapping[tuple[str, str], str] | None = None
) -> Config:
    """
    Parse and validate ``content``.  ``overrides`` (from command-line flags) win over the file.
    Raises :class:`ConfigError` naming the source and the option.
    """
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    try:
        parser.read_string(content, source=source)
    except configparser.Error as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"{source}: {first}") from None

    raw: dict[tuple[str, str], str] = {}
    for section in parser.sections():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
        for name, value in parser.items(section):
            if (section, name) not in _BY_KEY:
                known = ", ".join(o.name for o in OPTIONS if o.section == section)
                raise ConfigError(f"{source}: [{section}] {name}: unknown option (known: {known})")
            raw[(section, name)] = value
    raw.update(overrides or {})

    values: dict[tuple[str, str], Any] = {}
    # state_dir first: other defaults are relative to it.
    order = sorted(OPTIONS, key=lambda o: (o.section, o.name) != ("daemon", "state_dir"))
    for option in order:
        key = (option.section, option.name)
        given = key in raw
        # {state_dir} is expanded in given values too, so the example file works uncommented.
        text_value = (raw[key] if given else option.default).replace(
            "{state_dir}", values.get(("daemon", "state_dir"), DEFAULT_STATE_DIR))
        where = source if given else "the built-in default"
        try:
            values[key] = option.parse(text_value)
        except ValueError as e:
            raise ConfigError(f"{where}: [{option.section}] {option.name}: {e}") from None
    config = Config(source=source, values=values, given=frozenset(raw))
    _check_together(config)
    return config


def _check_together(config: Config) -> None:
    """Checks that involve several options or the file system."""
    src = config.source
    if not config.roles:
        raise ConfigError(f"{src}: [daemon] roles: name at least one of {', '.join(ROLES)} "
                          "(a daemon with no role serves nothing)")
    if config[("pki", "vault")] == "kms" and not config[("pki", "kms_key_id")]:
        raise ConfigError(f"{src}: [pki] kms_key_id: required when vault = kms")
    if config[("store", "backend")] == "dynamodb" and config[("pki", "vault")] != "kms":
        raise ConfigError(
            f"{src}: [pki] vault: must be kms with the dynamodb store "
            "(a shared store never holds keys sealed by one host's key file)")
    certs = config[("aws", "identity_certs")]
    if certs and not os.path.isfile(certs):
        raise ConfigError(f"{src}: [aws] identity_certs: no such file: {certs}")
    if config[("pki", "key_type")] not in config[("pki", "allowed_csr_keys")]:
        # Masters' server certificates use the configured key type too.
        raise ConfigError(f"{src}: [pki] allowed_csr_keys: must include key_type "
                          f"{config[('pki', 'key_type')]}")
    first, count = config[("lb", "first_master_port")], config[("lb", "max_masters")]
    if first + count - 1 > 65535:
        raise ConfigError(f"{src}: [lb] max_masters: ports {first}..{first + count - 1} go past 65535")
    for name in ("front_port", "enroll_port"):
        if first <= config[("lb", name)] < first + count:
            raise ConfigError(f"{src}: [lb] {name}: {config[('lb', name)]} is inside the masters' ports "
                              f"{first}..{first + count - 1} ([lb] first_master_port, max_masters)")
    if config[("lb", "front_port")] == config[("lb", "enroll_port")]:
        raise ConfigError(f"{src}: [lb] enroll_port: the same port as front_port")
    if "lb" in config.roles:
        for name in ("certificate", "private_key"):
            value = config[("lb", name)]
            if not value:
                raise ConfigError(f"{src}: [lb] {name}: required with role lb")
            if not os.path.isfile(value):
                raise ConfigError(f"{src}: [lb] {name}: no such file: {value}")
        if not {("enroll", "front"), ("lb", "master_name")} & config.given:
            # nginx and the health probe check the masters' certificates for this name; the
            # default host `puppet` is in no master's certificate, so every agent would get 502.
            raise ConfigError(f"{src}: [lb] master_name: role lb needs the front's name: set "
                              "[enroll] front (or [lb] master_name) to the name in the masters' "
                              "certificates")
        for backend in config[("lb", "enroll_backends")]:
            try:
                host_port(backend)
            except ValueError as e:
                raise ConfigError(f"{src}: [lb] enroll_backends: {e}") from None
        listen = re.match(r"^tcp6?:(?:port=)?(\d+)", config[("enroll", "listen")])
        if "enroll" in config.roles and listen and int(listen.group(1)) == config[("lb", "enroll_port")]:
            raise ConfigError(f"{src}: [enroll] listen: port {listen.group(1)} is nginx's "
                              "[lb] enroll_port on this host; listen elsewhere and list it in "
                              "[lb] enroll_backends")
    _check_ha(config)
    _check_scale(config)
    ssldir = config[("master", "ssldir")]
    if ssldir and not os.path.isdir(ssldir):
        raise ConfigError(f"{src}: [master] ssldir: no such directory: {ssldir}")
    if config[("enroll", "describe_in_flight")] > config[("daemon", "threads")]:
        # Each call holds a thread of the AWS pool, which the ENC's calls need too.
        raise ConfigError(f"{src}: [enroll] describe_in_flight: more than [daemon] threads "
                          f"({config[('daemon', 'threads')]})")
    if config[("pki", "crl_refresh_margin")] >= config[("pki", "crl_lifetime")]:
        raise ConfigError(f"{src}: [pki] crl_refresh_margin: must be shorter than crl_lifetime")


def find_config(
    explicit: str | None, environ: Mapping[str, str], default: str = DEFAULT_CONFIG_PATH
) -> str | None:
    """
    Which file to read: ``--config``, else ``$PUPPETHA_CONFIG``, else ``default`` if it exists,
    else None (the embedded defaults).  An existing default file that cannot be read is an error
    later, never a silent fall back to a second, empty store.
    """
    if explicit:
        return explicit
    if environ.get(CONFIG_ENV):
        return environ[CONFIG_ENV]
    if os.path.lexists(default):
        return default
    return None


def _check_ha(config: Config) -> None:
    src = config.source
    # Other hosts (and `puppetha status`) may name the Elastic IP too; only lb nodes act on it.
    if not config[("ha", "elastic_ip")] or "lb" not in config.roles:
        return
    for name in ("instance_id", "address"):
        if not config[("ha", name)]:
            raise ConfigError(f"{src}: [ha] {name}: required with elastic_ip")
    duration_, margin = config[("ha", "lease_duration")], config[("ha", "lease_margin")]
    if margin >= duration_:
        raise ConfigError(f"{src}: [ha] lease_margin: must be shorter than lease_duration")
    if config[("ha", "renew_interval")] >= duration_ - margin:
        raise ConfigError(f"{src}: [ha] renew_interval: must be shorter than lease_duration - lease_margin")


def _check_scale(config: Config) -> None:
    from puppetha.ha.scaling import settings_from_config

    try:
        settings_from_config(config)
    except ValueError as e:
        raise ConfigError(f"{config.source}: [scale] {e}") from None
    if not config[("scale", "enabled")]:
        return
    if not config[("scale", "launch_template")]:
        raise ConfigError(f"{config.source}: [scale] launch_template: required when enabled")
    if "lb" in config.roles:
        # The primary decides (the failover lease) on what the lb nodes sampled (the load log).
        for section, name in (("ha", "elastic_ip"), ("lb", "load_socket")):
            if not config[(section, name)]:
                raise ConfigError(f"{config.source}: [{section}] {name}: required with [scale] enabled")
    if config[("scale", "stale")] < 2 * config[("scale", "interval")]:
        # A node's report is up to one interval old when the primary reads it, and the
        # primary's round comes up to one interval later.
        raise ConfigError(f"{config.source}: [scale] stale: must be at least twice interval")


def load_config(
    config_path: str | None, overrides: Mapping[tuple[str, str], str] | None = None
) -> Config:
    """Read the file (or the embedded defaults when ``config_path`` is None) and validate it."""
    if config_path is None:
        return config_from_string("", "<embedded defaults>", overrides)
    try:
        content = Path(config_path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{config_path}: cannot read the configuration: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{config_path}: not UTF-8 text") from None
    return config_from_string(content, config_path, overrides)


# -- documentation generated from the table (etc/puppetha.conf, docs/configuration.md) -------


def example_config() -> str:
    """The documented example file: every option, commented out at its default."""
    lines = [
        "# puppetha configuration. Every option is shown at its default, commented out.",
        "# Values are validated before the daemon starts; an unknown option stops it.",
        "# Durations: 30s, 10m, 2h, 7d, 5y. Lists: comma or space separated.",
        "# Generated from puppetha/config.py: `python -m puppetha.config example`.",
    ]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for option in (o for o in OPTIONS if o.section == section):
            lines.append("")
            lines += [f"# {chunk}" for chunk in _wrap(option.doc, 96)]
            lines.append(f"#{option.name} = {option.default}".rstrip())
    return "\n".join(lines) + "\n"


def markdown_reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "puppetha reads one INI file",
        "(`twistd --nodaemon --pidfile= puppetha --config /etc/puppetha/puppetha.conf`).",
        "The daemon and the `puppetha` CLI take the first of: `--config PATH`, the file named by",
        "`$PUPPETHA_CONFIG`, `/etc/puppetha/puppetha.conf` if it exists (one that exists but cannot",
        "be read is an error, never a fall back), else the embedded defaults below. The whole file",
        "is validated before anything starts: an unknown section or option, a bad value or a",
        "missing file stops the daemon with one line naming the file, the section and the option.",
        "`--state-dir DIR` overrides `[daemon] state_dir`, on the daemon and on the `puppetha` CLI.",
        "",
        "Durations are written `30s`, `10m`, `2h`, `7d` or `5y`; lists are comma or space",
        "separated. `{state_dir}` in a default stands for the value of `[daemon] state_dir`.",
        "`etc/puppetha.conf` is the same reference as a file to copy.",
        "",
        "Checked together: `vault = kms` needs `kms_key_id`; the `dynamodb` store needs",
        "`vault = kms`; `identity_certs` must exist; `allowed_csr_keys` must include `key_type`;",
        "`crl_refresh_margin` must be shorter than `crl_lifetime`; the lb ports (front, enrollment",
        "and the masters' range) must not overlap or pass 65535; role `lb` needs `[enroll] front` or",
        "`[lb] master_name` set (the default host `puppet` is in no master's certificate); on an lb",
        "node, `[ha] elastic_ip` needs `instance_id` and `address`, a `lease_margin` under",
        "`lease_duration` and a `renew_interval` under their difference; `roles` must name at least",
        "one role; `[enroll] listen` and `[metrics] listen` are checked to their port (0..65535),",
        "keywords and interface address (`[metrics] listen` must name its interface),",
        "and `server_names` must name at least one valid DNS name or IP address.",
        "",
        "At start the daemon then checks or opens everything before it says `puppetha started`: the",
        "state directory must be writable, the lb role's certificate and key must parse and match,",
        "and the enrollment port, the metrics port and the ENC socket are opened (a port in use, an",
        "address this host does not have, a socket path held by another process or not a socket, an unknown",
        "`socket_owner` or `socket_group`). Any failure is one line on stderr and a non-zero exit.",
    ]
    for section in SECTIONS:
        lines += ["", f"## [{section}]", "", "| option | default | meaning |", "|---|---|---|"]
        for option in (o for o in OPTIONS if o.section == section):
            default = f"`{option.default}`" if option.default else "(empty)"
            lines.append(f"| `{option.name}` | {default} | {option.doc} |")
    return "\n".join(lines) + "\n"


def _wrap(text_value: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text_value, width)


if __name__ == "__main__":
    import sys

    kinds = {"example": example_config, "markdown": markdown_reference}
    if len(sys.argv) != 2 or sys.argv[1] not in kinds:
        sys.exit("usage: python -m puppetha.config example|markdown")
    sys.stdout.write(kinds[sys.argv[1]]())
