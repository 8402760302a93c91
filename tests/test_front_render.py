"""The pure parts of the front: nginx rendering, per-master ports, trust decisions."""

from __future__ import annotations

import pytest

from puppetha.ha.front import decide_trust, generation_name
from puppetha.ha.nginx import (
    AGENT_CA_BUNDLE,
    AGENT_CRL_BUNDLE,
    CA_BUNDLE,
    CA_PATHS,
    CONFIG_NAME,
    CRL_BUNDLE,
    SERVER_CHAIN,
    Backend,
    FrontPorts,
    FrontSettings,
    FrontState,
    MasterBackend,
    RenderError,
    master_ports,
    render,
    render_files,
)
from puppetha.store.records import CARecord, CRLRecord

SETTINGS = FrontSettings(
    certificate="/etc/puppetha/lb/cert.pem",
    private_key="/etc/puppetha/lb/key.pem",
    master_name="puppet.example",
)

M1 = MasterBackend("m1", "10.0.0.1", 8140, registered_at=1.0)
M2 = MasterBackend("m2", "10.0.0.2", 8140, registered_at=2.0)
M3 = MasterBackend("m3", "10.0.0.3", 8140, registered_at=3.0)


def state(*masters: MasterBackend, backends: tuple[Backend, ...] = ()) -> FrontState:
    return FrontState(settings=SETTINGS, masters=masters, enroll_backends=backends)


@pytest.mark.parametrize(
    ("masters", "expected"),
    [
        ((), {}),
        ((M1,), {"m1": 8141}),
        ((M2, M1), {"m1": 8141, "m2": 8142}),
        # Health does not move ports.
        ((M1, M2.__class__("m2", "10.0.0.2", 8140, healthy=False, registered_at=2.0), M3),
         {"m1": 8141, "m2": 8142, "m3": 8143}),
        # Removing a master shifts only the ones registered after it.
        ((M1, M3), {"m1": 8141, "m3": 8142}),
        # Same registration time: certname decides.
        ((MasterBackend("b", "10.0.0.9", 8140), MasterBackend("a", "10.0.0.8", 8140)),
         {"a": 8141, "b": 8142}),
    ],
)
def test_master_ports(masters, expected):
    assert master_ports(masters, FrontPorts()) == expected


def test_master_ports_stop_at_the_reserved_range():
    masters = [MasterBackend(f"m{i:02d}", "10.0.0.1", 8140, registered_at=i) for i in range(5)]
    assert master_ports(masters, FrontPorts(max_masters=3)) == {"m00": 8141, "m01": 8142, "m02": 8143}


def test_same_state_same_bytes_whatever_the_order():
    a = render(state(M1, M2, M3, backends=(Backend("10.0.1.1", 8080), Backend("10.0.1.2", 8080))))
    b = render(state(M3, M1, M2, backends=(Backend("10.0.1.2", 8080), Backend("10.0.1.1", 8080))))
    assert a == b


def upstream_servers(text: str, name: str) -> list[str]:
    block = text.split(f"upstream {name} {{", 1)[1].split("}", 1)[0]
    return [line.split()[1].rstrip(";") for line in block.splitlines() if line.strip().startswith("server ")]


@pytest.mark.parametrize(
    ("masters", "front_upstream"),
    [
        ((M1, M2), ["10.0.0.1:8140", "10.0.0.2:8140"]),
        ((M1, MasterBackend("m2", "10.0.0.2", 8140, healthy=False, registered_at=2.0)), ["10.0.0.1:8140"]),
        ((MasterBackend("v6", "fd00::1", 8140),), ["[fd00::1]:8140"]),
    ],
)
def test_front_upstream_holds_the_healthy_masters(masters, front_upstream):
    assert upstream_servers(render(state(*masters)), "puppetha_masters") == front_upstream


def test_no_healthy_master_answers_503_and_keeps_direct_routes():
    text = render(state(MasterBackend("m1", "10.0.0.1", 8140, healthy=False)))
    assert "upstream puppetha_masters" not in text
    assert "return 503 '{\"error\": \"no-master\"" in text
    assert "listen 0.0.0.0:8141 ssl;" in text
    assert upstream_servers(text, "puppetha_master_0") == ["10.0.0.1:8140"]


def master_server(text: str, port: int) -> str:
    return text.split(f"listen 0.0.0.0:{port} ssl;", 1)[1].split("\n    }\n", 1)[0]


def test_a_draining_master_keeps_its_port_and_nothing_reaches_it():
    draining = MasterBackend("m2", "10.0.0.2", 8140, healthy=False, registered_at=2.0, draining=True)
    text = render(state(M1, draining, M3))
    # Nowhere to be reached: not in the front's upstream, and no upstream of its own.
    assert "10.0.0.2" not in text
    assert upstream_servers(text, "puppetha_masters") == ["10.0.0.1:8140", "10.0.0.3:8140"]
    # Its port stays (the others' do not move) and sends a first test run to the masters in service.
    assert master_ports([M1, draining, M3], FrontPorts()) == {"m1": 8141, "m2": 8142, "m3": 8143}
    own = master_server(text, 8142)
    assert "proxy_pass https://puppetha_masters;" in own
    assert "proxy_ssl_name puppet.example;" in own
    assert "ssl_verify_client on;" in own
    assert "proxy_pass https://puppetha_master_0;" in master_server(text, 8141)
    assert "proxy_pass https://puppetha_master_2;" in master_server(text, 8143)


def test_a_draining_master_with_no_master_in_service_answers_503_on_its_port():
    draining = MasterBackend("m1", "10.0.0.1", 8140, healthy=False, registered_at=1.0, draining=True)
    text = render(state(draining))
    assert "10.0.0.1" not in text
    own = master_server(text, 8141)
    assert "proxy_pass" not in own
    assert "return 503 '{\"error\": \"no-master\"" in own


def test_every_server_verifies_clients_and_overwrites_the_identity_headers():
    text = render(state(M1, M2))
    servers = text.split("    server {")[1:]
    assert len(servers) == 3  # the front and one per master
    # The front lets a client without a certificate through the handshake (agents fetch the
    # CRL so); its proxying location refuses it.  The masters' own ports demand one.
    assert "ssl_verify_client optional;" in servers[0]
    for server in servers[1:]:
        assert "ssl_verify_client on;" in server
    for server in servers:
        assert "ssl_verify_depth 2;" in server
        assert f"ssl_client_certificate {CA_BUNDLE};" in server
        assert f"ssl_crl {CRL_BUNDLE};" in server
        assert "proxy_set_header X-Client-Verify $ssl_client_verify;" in server
        assert "proxy_set_header X-Client-DN $ssl_client_s_dn;" in server
        assert "proxy_set_header X-Client-Cert $ssl_client_escaped_cert;" in server
        assert 'proxy_set_header Connection "";' in server  # keepalive to the masters
    # The front checks the shared master name, each direct route the master's own certname.
    # Host names the same: puppetserver refuses a Host its certificate does not carry.
    for server, name in zip(servers, ("puppet.example", "m1", "m2"), strict=True):
        assert f"proxy_ssl_name {name};" in server
        assert f"proxy_set_header Host {name};" in server
    # nginx inherits no proxy_set_header into a level that has its own: none at http level.
    assert "\n    proxy_set_header" not in text


def locations(server: str) -> dict[str, str]:
    """A server block's locations by their match ("= /path", "^~ /prefix", "/")."""
    found = {}
    for block in server.split("        location ")[1:]:
        match, _, body = block.partition(" {")
        found[match] = body.split("\n        }\n", 1)[0]
    return found


@pytest.mark.parametrize("healthy", [True, False])
def test_the_front_serves_only_the_two_ca_paths_without_a_certificate(healthy):
    text = render(state(MasterBackend("m1", "10.0.0.1", 8140, healthy=healthy)))
    front = text.split("    server {")[1]
    by_match = locations(front)
    assert set(by_match) == {
        "= /puppet-ca/v1/certificate/ca",
        "= /puppet-ca/v1/certificate_revocation_list/ca",
        "^~ /puppet-ca",
        "/",
    }
    live = SETTINGS.runtime.live_dir
    for path, bundle in CA_PATHS:
        served = by_match[f"= {path}"]
        assert f"alias {live}/{bundle};" in served
        assert "limit_except GET { deny all; }" in served
        assert "if_modified_since before;" in served
        assert "proxy_pass" not in served
    assert "return 403" in by_match["^~ /puppet-ca"]
    assert "proxy_pass" not in by_match["^~ /puppet-ca"]
    # Everything else: a verified certificate or a refusal, before anything is proxied.
    rest = by_match["/"]
    assert rest.index("if ($ssl_client_verify != SUCCESS)") < rest.index("return 400")
    if healthy:
        assert rest.index("return 400") < rest.index("proxy_pass")


def test_the_masters_own_ports_serve_none_of_the_ca_api():
    text = render(state(M1))
    direct = text.split("    server {")[2]
    assert set(locations(direct)) == {"^~ /puppet-ca", "/"}
    assert "alias" not in direct


def test_towards_the_masters_nginx_shows_the_lb_certificate_and_checks_theirs():
    text = render(state(M1))
    for line in (
        f"proxy_ssl_certificate {SERVER_CHAIN};",
        "proxy_ssl_certificate_key /etc/puppetha/lb/key.pem;",
        f"proxy_ssl_trusted_certificate {CA_BUNDLE};",
        f"proxy_ssl_crl {CRL_BUNDLE};",
        "proxy_ssl_verify on;",
    ):
        assert f"    {line}\n" in text


@pytest.mark.parametrize(
    ("backends", "stream"),
    [
        ((), False),
        ((Backend("10.0.1.1", 8080),), True),
    ],
)
def test_enrollment_stream_with_proxy_protocol(backends, stream):
    text = render(state(M1, backends=backends))
    assert ("stream {" in text) is stream
    assert ("load_module /usr/lib/nginx/modules/ngx_stream_module.so;" in text)
    if stream:
        block = text.split("stream {", 1)[1]
        assert "listen 0.0.0.0:8080;" in block
        assert "proxy_protocol on;" in block
        assert upstream_servers(text, "puppetha_enroll") == ["10.0.1.1:8080"]


@pytest.mark.parametrize(
    "master",
    [
        MasterBackend("m1", "10.0.0.1;evil", 8140),
        MasterBackend("m1 x", "10.0.0.1", 8140),
        MasterBackend("m1", "10.0.0.1", 0),
        MasterBackend("m1", "10.0.0.1", 70000),
        MasterBackend("m1}", "10.0.0.1", 8140),
        MasterBackend("m1", "", 8140),
    ],
)
def test_values_that_would_break_the_grammar_are_refused(master):
    with pytest.raises(RenderError):
        render(state(master))


@pytest.mark.parametrize(
    "ports",
    [
        # nginx -t accepts both, then serves the front's pool on a master's own port ...
        FrontPorts(front=8142),
        # ... or fails to bind the enrollment port at reload, while the daemon thinks it is live.
        FrontPorts(enroll=8190),
        FrontPorts(front=8080, enroll=8080),
        # The reserved per-master ports must all be TCP ports, or the front stops rendering
        # (CRL updates included) when enough masters register.
        FrontPorts(first_master=65500, max_masters=50),
    ],
)
def test_a_port_plan_that_reuses_a_port_is_refused_even_before_any_master(ports):
    settings = FrontSettings(
        certificate="/etc/puppetha/lb/cert.pem",
        private_key="/etc/puppetha/lb/key.pem",
        master_name="puppet.example",
        ports=ports,
    )
    with pytest.raises(RenderError):
        render(FrontState(settings=settings, enroll_backends=(Backend("10.0.1.1", 8080),)))


def test_the_default_port_plan_renders():
    settings = FrontSettings(certificate="/c.pem", private_key="/k.pem", master_name="puppet.example",
                             ports=FrontPorts(first_master=65486, max_masters=50))
    assert "listen 0.0.0.0:65486 ssl;" in render(FrontState(settings=settings, masters=(M1,)))
    render(state(M1, backends=(Backend("10.0.1.1", 8080),)))


def test_render_files_names_the_generation():
    files = render_files(state(M1), b"CA", b"CRL", b"CHAIN", agent_ca_bundle=b"ACA", agent_crl_bundle=b"ACRL")
    assert set(files) == {CONFIG_NAME, CA_BUNDLE, CRL_BUNDLE, SERVER_CHAIN, AGENT_CA_BUNDLE, AGENT_CRL_BUNDLE}
    assert files[AGENT_CRL_BUNDLE] == b"ACRL"
    assert generation_name(files) == generation_name(dict(files))
    assert generation_name(files) != generation_name({**files, CRL_BUNDLE: b"CRL2"})


def ca(name: str, parent: str) -> CARecord:
    return CARecord(name=name, certificate_pem=f"CERT {name}", sealed_key="", parent=parent, created_at=0)


def crl(name: str) -> CRLRecord:
    return CRLRecord(ca=name, number=1, crl_pem=f"CRL {name}", this_update=0, next_update=1)


@pytest.mark.parametrize(
    ("cas", "crls", "exclude", "trusted", "left_out"),
    [
        ([ca("root", "root"), ca("m1", "root")], ["root", "m1"], (), ("m1", "root"), {}),
        ([ca("root", "root"), ca("m1", "root")], ["root"], (), ("root",), {"m1": "no CRL"}),
        (
            [ca("root", "root"), ca("m1", "root")],
            ["m1"],
            (),
            (),
            {"root": "no CRL", "m1": "issuer 'root' has no CRL"},
        ),
        ([ca("m1", "root")], ["m1"], (), (), {"m1": "issuer 'root' is unknown"}),
        (
            [ca("root", "root"), ca("m1", "root"), ca("lb", "root")],
            ["root", "m1", "lb"],
            ("lb",),
            ("m1", "root"),
            {"lb": "excluded"},
        ),
        ([ca("a", "b"), ca("b", "a")], ["a", "b"], (), (), {"a": "its chain loops", "b": "its chain loops"}),
    ],
)
def test_decide_trust(cas, crls, exclude, trusted, left_out):
    trust = decide_trust(cas, [crl(n) for n in crls], exclude)
    assert trust.trusted == trusted
    assert dict(trust.left_out) == left_out
    assert trust.ca_pem == b"".join(f"CERT {n}\n".encode() for n in trusted)
    assert trust.crl_pem == b"".join(f"CRL {n}\n".encode() for n in trusted)
