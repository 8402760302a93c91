"""
The names a certificate may carry: Puppet certnames and subject alternative names.

Puppet's own rule for ``certname`` is lowercase and, "for best compatibility",
``/\\A[a-z0-9._-]+\\Z/``; ``ca`` is reserved.  We hold every name to that rule, and also refuse
empty labels (leading, trailing or doubled dots) and names longer than 64 characters, the
X.509 upper bound for a common name.
"""

from __future__ import annotations

import ipaddress
import re
import string

from cryptography import x509

#: X.509's ub-common-name.
MAX_CERTNAME = 64
#: Longest DNS name.
MAX_DNS_NAME = 253

_LABEL = r"[a-z0-9_-]+"
_DOTTED = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")

#: Names Puppet gives a meaning of its own.
RESERVED_CERTNAMES = frozenset({"ca"})

SubjectAltName = x509.DNSName | x509.IPAddress


def certname_problem(name: str) -> str | None:
    """Why ``name`` is not an acceptable certname, or ``None`` when it is."""
    if not name:
        return "certname is empty"
    if len(name) > MAX_CERTNAME:
        return f"certname is longer than {MAX_CERTNAME} characters"
    if _DOTTED.fullmatch(name) is None:
        return f"certname {name!r} must be lowercase letters, digits, '.', '_' or '-' between dots"
    if name in RESERVED_CERTNAMES:
        return f"certname {name!r} is reserved"
    return None


def check_certname(name: str) -> str:
    """Return ``name`` if it is an acceptable certname; ``ValueError`` otherwise."""
    problem = certname_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


def parse_san(text: str) -> SubjectAltName:
    """
    A DNS name or IP address, written bare or with Puppet's ``DNS:``/``IP:`` prefix.
    DNS names are lowercased; wildcards and other characters are refused with ``ValueError``.
    """
    kind, sep, rest = text.partition(":")
    if sep and kind in ("DNS", "IP"):
        text = rest
    else:
        kind = ""
    if kind in ("", "IP"):
        try:
            return x509.IPAddress(ipaddress.ip_address(text))
        except ValueError:
            if kind == "IP":
                raise ValueError(f"{text!r} is not an IP address") from None
    name = text.lower()
    if (
        len(name) > MAX_DNS_NAME
        or _DOTTED.fullmatch(name) is None
        or any(len(label) > 63 for label in name.split("."))
    ):
        raise ValueError(f"{text!r} is not an acceptable DNS name")
    return x509.DNSName(name)


def san_text(name: x509.GeneralName) -> str:
    """A canonical spelling (``DNS:x``, ``IP:a.b.c.d``) for comparing names; others get their type."""
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value.lower()}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    return f"{type(name).__name__}:{name.value}"


#: The fields a certname template may use (all read from verified identity and EC2 data).
TEMPLATE_FIELDS = frozenset({"instance_id", "account", "region", "private_ip_dashed", "private_dns"})


def check_certname_template(template: str) -> str:
    """``template`` if it names only :data:`TEMPLATE_FIELDS` and the instance ID; ``ValueError``."""
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"not a template: {e}") from None
    unknown = names - TEMPLATE_FIELDS
    if unknown:
        raise ValueError(f"unknown field {sorted(unknown)[0]!r}; use {', '.join(sorted(TEMPLATE_FIELDS))}")
    if "instance_id" not in names:
        # One certname per instance: a template without the ID would hand two instances one name.
        raise ValueError("must contain {instance_id}, so that every instance gets its own name")
    return template


def check_host_port(value: str) -> str:
    """``host:port`` (``[v6]:port`` too) whose host a certificate could name; ``ValueError``."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not host:port: {value!r}")
    parse_san(host.strip("[]"))
    return value
