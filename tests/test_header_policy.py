"""The header policy as a unit, bytes in and bytes out: what `HeaderPolicy.scan` keeps and
reads from a client's head, what `request_head` sends upstream, and what `response_headers`
relays back. Configs come from `make_config`; nothing is contacted."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import HeadersConfig
from gateway.proxy import HeaderPolicy, _drop_listed, response_headers
from gateway.verdict import Active
from tests.conftest import make_config

Headers = list[tuple[bytes, bytes]]

ROUTES = [{"name": "api", "path_prefix": "/api", "upstream": "http://127.0.0.1:9"}]
TRUSTED = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]
ALICE = Active("alice", "42", ("read", "write"), "read write", 2e9)
SERVICE = Active(None, "7", (), "", 2e9)  # client credentials: no subject


def policy(**overrides: Any) -> HeaderPolicy:
    cfg = make_config("http://authlete.test", ROUTES, **overrides)
    return HeaderPolicy(cfg.headers, cfg.trusted_proxies)


def pairs(parts: list[bytes]) -> Headers:
    """Head parts (name, ": ", value, CRLF per field) as (name, value) pairs."""
    assert len(parts) % 4 == 0
    for i in range(0, len(parts), 4):
        assert (parts[i + 1], parts[i + 3]) == (b": ", b"\r\n")
    return [(parts[i], parts[i + 2]) for i in range(0, len(parts), 4)]


def names(parts: list[bytes]) -> list[bytes]:
    return [name for name, _ in pairs(parts)]


def parse_head(head: bytes) -> tuple[bytes, Headers]:
    """A request head as the upstream reads it: the request line and every field."""
    assert head.endswith(b"\r\n\r\n")
    assert head.count(b"\r\n\r\n") == 1
    line, *fields = head[:-4].split(b"\r\n")
    out = []
    for field in fields:
        name, sep, value = field.partition(b": ")
        assert sep, field
        out.append((name, value))
    return line, out


def values(fields: Headers, name: bytes) -> list[bytes]:
    return [v for n, v in fields if n.lower() == name.lower()]


def forward(
    p: HeaderPolicy,
    headers: Headers,
    *,
    trusted: bool = False,
    identity: Active | None = None,
    chunked: bool = False,
    peer: bytes = b"198.51.100.9",
    scheme: bytes = b"http",
) -> tuple[bytes, Headers]:
    inbound = p.scan(headers, trusted)
    head = p.request_head(
        b"GET",
        b"/api/x?y=1",
        b"up.internal:8080",
        inbound,
        peer,
        scheme,
        identity,
        b"rid-1",
        chunked,
    )
    return parse_head(head)


# --------------------------------------------------------------------------- scan: kept


def test_end_to_end_headers_pass_in_order_with_spelling_and_duplicates() -> None:
    headers = [
        (b"Accept", b"*/*"),
        (b"x-custom", b"1"),
        (b"Cookie", b"a=b"),
        (b"X-Custom", b"2"),
        (b"X-Obs", b"caf\xe9"),
    ]
    inbound = policy().scan(headers, False)
    assert pairs(inbound.kept) == headers


@pytest.mark.parametrize(
    "name",
    [
        b"Keep-Alive",
        b"keep-alive",
        b"TE",
        b"Trailer",
        b"Upgrade",
        b"UPGRADE",
        b"Proxy-Authorization",
        b"Proxy-Authenticate",
        b"Proxy-Connection",
    ],
)
def test_hop_by_hop_headers_are_not_kept(name: bytes) -> None:
    for trusted in (False, True):
        inbound = policy().scan([(name, b"v"), (b"X-Control", b"c")], trusted)
        assert pairs(inbound.kept) == [(b"X-Control", b"c")]


def test_framing_and_control_headers_are_read_not_kept() -> None:
    inbound = policy().scan(
        [
            (b"Host", b"gw.test"),
            (b"Content-Length", b"12"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Expect", b"100-continue"),
            (b"X-Request-Id", b"client-id"),
            (b"Connection", b"keep-alive"),
            (b"X-Forwarded-For", b"203.0.113.1"),
        ],
        False,
    )
    assert inbound.kept == []
    assert (inbound.host, inbound.host_count) == (b"gw.test", 1)
    assert inbound.content_length == b"12"
    assert inbound.transfer_encoding == [b"chunked"]
    assert inbound.expect == b"100-continue"
    assert inbound.request_id == b"client-id"
    assert inbound.connection == [b"keep-alive"]
    assert inbound.x_forwarded_for == [b"203.0.113.1"]


def test_every_host_and_transfer_encoding_field_is_counted() -> None:
    inbound = policy().scan(
        [
            (b"Host", b"a"),
            (b"host", b"b"),
            (b"Transfer-Encoding", b"gzip"),
            (b"transfer-encoding", b"chunked"),
        ],
        False,
    )
    assert (inbound.host, inbound.host_count) == (b"a", 2)  # the listener refuses 2
    assert inbound.transfer_encoding == [b"gzip", b"chunked"]


def test_authorization_is_read_and_passed_on_unchanged() -> None:
    inbound = policy().scan([(b"authorization", b"Bearer abc"), (b"X-A", b"1")], False)
    assert inbound.authorization == ["Bearer abc"]
    assert pairs(inbound.kept) == [(b"authorization", b"Bearer abc"), (b"X-A", b"1")]


def test_authorization_obs_text_is_read_as_latin_1() -> None:
    inbound = policy().scan([(b"Authorization", b"Bearer \xe9")], False)
    assert inbound.authorization == ["Bearer \xe9"]


# --------------------------------------------------------------------------- Connection


def test_headers_listed_in_connection_are_dropped() -> None:
    inbound = policy().scan(
        [
            (b"Connection", b"X-Drop, close"),
            (b"X-Drop", b"1"),
            (b"x-drop", b"2"),
            (b"X-Keep", b"3"),
            (b"connection", b"  X-OTHER ,,"),
            (b"x-other", b"4"),
            (b"X-Dropped-Not", b"5"),  # a prefix of nothing listed
        ],
        False,
    )
    assert pairs(inbound.kept) == [(b"X-Keep", b"3"), (b"X-Dropped-Not", b"5")]
    assert inbound.connection == [b"X-Drop, close", b"  X-OTHER ,,"]


def test_listed_header_before_the_connection_field_is_dropped_too() -> None:
    inbound = policy().scan([(b"X-Drop", b"1"), (b"Connection", b"x-drop")], False)
    assert inbound.kept == []


@pytest.mark.parametrize(
    "value", [b"keep-alive", b"Keep-Alive", b"close", b"CLOSE", b"close, keep-alive", b""]
)
def test_plain_connection_values_drop_nothing(value: bytes) -> None:
    headers = [(b"Connection", value), (b"X-A", b"1"), (b"Close", b"2")]
    inbound = policy().scan(headers, False)
    assert pairs(inbound.kept) == [(b"X-A", b"1"), (b"Close", b"2")]


def test_a_connection_listed_authorization_is_not_forwarded_but_still_read() -> None:
    inbound = policy().scan([(b"Connection", b"authorization"), (b"Authorization", b"B t")], False)
    assert inbound.kept == []
    assert inbound.authorization == ["B t"]


# --------------------------------------------------------------------------- identity


def _spellings(name: str) -> list[bytes]:
    us = name.replace("-", "_")
    head, _, tail = name.rpartition("-")
    return [
        s.encode()
        for s in (name, name.lower(), name.upper(), us, us.lower(), us.upper(), f"{head}_{tail}")
    ]


@pytest.mark.parametrize("trusted", [False, True])
@pytest.mark.parametrize(
    ("overrides", "identity", "not_identity"),
    [
        (
            {},
            ("X-Auth-Subject", "X-Auth-Scopes", "X-Auth-Client-Id"),
            b"X-User",
        ),
        (
            {"headers": {"subject": "X-User", "scopes": "X-Perms", "client_id": "X_App_Id"}},
            ("X-User", "X-Perms", "X-App-Id"),
            b"X-Auth-Subject",
        ),
    ],
    ids=["default-names", "custom-names"],
)
def test_identity_spoofs_in_any_case_or_underscore_spelling_are_dropped(
    overrides: dict[str, Any], identity: tuple[str, ...], not_identity: bytes, trusted: bool
) -> None:
    spoofs = [(s, b"mallory") for name in identity for s in _spellings(name)]
    headers = [*spoofs, (not_identity, b"control")]
    inbound = policy(**overrides).scan(headers, trusted)
    assert pairs(inbound.kept) == [(not_identity, b"control")]


@pytest.mark.parametrize("identity", [ALICE, SERVICE, None])
def test_identity_headers_come_only_from_the_verdict(identity: Active | None) -> None:
    spoofs = [(b"X-Auth-Subject", b"mallory"), (b"x_auth_scopes", b"admin")]
    _, fields = forward(policy(), [*spoofs, (b"X-Auth-Client_Id", b"999")], identity=identity)
    subject = values(fields, b"X-Auth-Subject")
    scopes = values(fields, b"X-Auth-Scopes")
    client = values(fields, b"X-Auth-Client-Id")
    assert not [f for f in fields if f[0] in {b"x_auth_scopes", b"X-Auth-Client_Id"}]
    if identity is None:
        assert (subject, scopes, client) == ([], [], [])
    elif identity.subject is None:
        assert (subject, scopes, client) == ([], [b""], [b"7"])
    else:
        assert (subject, scopes, client) == ([b"alice"], [b"read write"], [b"42"])


def test_each_request_carries_its_own_verdicts_identity() -> None:
    p = policy()
    other = Active("bob", "43", ("write",), "write", 2e9)
    for identity, subject in [(ALICE, b"alice"), (other, b"bob"), (ALICE, b"alice")] * 2:
        _, fields = forward(p, [], identity=identity)
        assert values(fields, b"X-Auth-Subject") == [subject]
        assert values(fields, b"X-Auth-Client-Id") == [identity.client_id.encode()]
        assert values(fields, b"X-Auth-Scopes") == [identity.scope_header.encode()]
    _, fields = forward(p, [], identity=SERVICE)
    assert values(fields, b"X-Auth-Subject") == []


def test_identity_headers_use_the_configured_names() -> None:
    p = policy(headers={"subject": "X-User", "scopes": "X-Perms", "client_id": "X_App_Id"})
    _, fields = forward(p, [], identity=ALICE)
    assert [f for f in fields if f[0] in {b"X-User", b"X-Perms", b"X_App_Id"}] == [
        (b"X-User", b"alice"),
        (b"X-Perms", b"read write"),
        (b"X_App_Id", b"42"),
    ]
    assert values(fields, b"X-Auth-Subject") == []


def test_identity_values_are_utf8_on_the_wire() -> None:
    who = Active("Jos\u00e9", "1", ("s",), "s", 2e9)
    _, fields = forward(policy(), [], identity=who)
    assert values(fields, b"X-Auth-Subject") == ["Jos\u00e9".encode()]


# --------------------------------------------------------------------------- trust


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("10.1.2.3", True),
        ("10.255.255.255", True),
        ("11.0.0.1", False),
        ("192.0.2.7", True),
        ("192.0.2.8", False),
        ("2001:db8::1", True),
        ("2001:db9::1", False),
        ("::ffff:10.1.2.3", False),  # a mapped address is not the IPv4 network: fail closed
        ("", False),
        ("not-an-address", False),
        ("10.1.2.3%eth0", False),
    ],
)
def test_trust_is_by_configured_network(peer: str, trusted: bool) -> None:
    assert policy(trusted_proxies=TRUSTED).trusts(peer) is trusted


def test_nobody_is_trusted_by_default() -> None:
    p = policy()
    assert not p.trusts("127.0.0.1")
    assert not p.trusts("10.1.2.3")


def test_headers_config_is_all_the_policy_needs() -> None:
    p = HeaderPolicy(HeadersConfig())
    assert not p.trusts("10.0.0.1")
    assert pairs(p.scan([(b"x-auth-subject", b"m"), (b"X-A", b"1")], True).kept) == [(b"X-A", b"1")]


FORWARDING_CLAIMS = [
    b"X-Forwarded-Port",
    b"X-Forwarded-Prefix",
    b"X-Forwarded-Server",
    b"X-Forwarded-Uri",
    b"X-Forwarded-Method",
    b"X-Original-URI",
    b"X-Original-URL",
    b"X-Rewrite-URL",
    b"X-Real-IP",
    b"x-real-ip",
    b"Forwarded",
    b"FORWARDED",
]


def test_forwarding_claims_are_dropped_from_untrusted_peers() -> None:
    headers = [(name, b"claim") for name in FORWARDING_CLAIMS] + [(b"X-Control", b"c")]
    inbound = policy(trusted_proxies=TRUSTED).scan(headers, False)
    assert pairs(inbound.kept) == [(b"X-Control", b"c")]


def test_forwarding_claims_are_kept_from_trusted_peers() -> None:
    headers = [(name, b"claim") for name in FORWARDING_CLAIMS] + [(b"X-Control", b"c")]
    inbound = policy(trusted_proxies=TRUSTED).scan(headers, True)
    assert pairs(inbound.kept) == headers


def test_forwarding_claims_in_underscore_spelling_are_dropped_from_untrusted_peers() -> None:
    """`X_Real_IP` reaches many frameworks (CGI/WSGI-style environs, among others) as
    X-Real-IP: the reason identity names are folded (`gateway.http.fold`) and the config
    reserves `X_Forwarded_For`. A claim the policy drops or replaces in one spelling must not
    pass in another: an untrusted client would otherwise stand next to the gateway's own
    X-Forwarded-Host/-Proto, or invent an X-Real-IP."""
    claims = [
        (b"X_Real_IP", b"203.0.113.66"),
        (b"x_forwarded_port", b"443"),
        (b"X-Forwarded_Prefix", b"/admin"),
        (b"X_Forwarded_Host", b"evil.example"),
        (b"X_Forwarded_Proto", b"https"),
    ]
    inbound = policy(trusted_proxies=TRUSTED).scan([*claims, (b"X-Control", b"c")], False)
    assert pairs(inbound.kept) == [(b"X-Control", b"c")]


def test_trust_decisions_are_remembered_per_trust_level() -> None:
    p = policy(trusted_proxies=TRUSTED)
    claim = [(b"X-Real-IP", b"203.0.113.5")]
    for _ in range(2):  # the second round is answered from the remembered spellings
        assert pairs(p.scan(claim, True).kept) == claim
        assert p.scan(claim, False).kept == []


# --------------------------------------------------------------------------- request_head


def test_request_line_and_host_are_the_upstreams() -> None:
    line, fields = forward(policy(), [(b"Host", b"gw.test"), (b"HOST", b"other")])
    assert line == b"GET /api/x?y=1 HTTP/1.1"
    assert fields[0] == (b"Host", b"up.internal:8080")
    assert values(fields, b"Host") == [b"up.internal:8080"]


def test_kept_headers_follow_host_in_order() -> None:
    _, fields = forward(policy(), [(b"Accept", b"a"), (b"Cookie", b"c"), (b"accept", b"b")])
    assert fields[1:4] == [(b"Accept", b"a"), (b"Cookie", b"c"), (b"accept", b"b")]


@pytest.mark.parametrize("trusted", [False, True])
def test_x_forwarded_for_appends_the_peer(trusted: bool) -> None:
    p = policy(trusted_proxies=TRUSTED)
    _, fields = forward(p, [], trusted=trusted, peer=b"10.9.9.9")
    assert values(fields, b"X-Forwarded-For") == [b"10.9.9.9"]
    _, fields = forward(
        p,
        [(b"X-Forwarded-For", b"203.0.113.1, 10.0.0.1"), (b"x-forwarded-for", b"198.51.100.2")],
        trusted=trusted,
        peer=b"10.9.9.9",
    )
    assert values(fields, b"X-Forwarded-For") == [b"203.0.113.1, 10.0.0.1, 198.51.100.2, 10.9.9.9"]


def test_x_forwarded_proto_and_host_from_an_untrusted_peer_are_replaced() -> None:
    headers = [
        (b"Host", b"gw.test"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"evil.example"),
    ]
    _, fields = forward(policy(trusted_proxies=TRUSTED), headers, scheme=b"http")
    assert values(fields, b"X-Forwarded-Proto") == [b"http"]
    assert values(fields, b"X-Forwarded-Host") == [b"gw.test"]


def test_x_forwarded_proto_and_host_from_a_trusted_peer_are_believed_first_value_only() -> None:
    headers = [
        (b"Host", b"lb.internal"),
        (b"X-Forwarded-Proto", b"https"),
        (b"x-forwarded-proto", b"gopher"),
        (b"X-Forwarded-Host", b"shop.example"),
        (b"X-Forwarded-Host", b"evil.example"),
    ]
    _, fields = forward(policy(trusted_proxies=TRUSTED), headers, trusted=True, scheme=b"http")
    assert values(fields, b"X-Forwarded-Proto") == [b"https"]
    assert values(fields, b"X-Forwarded-Host") == [b"shop.example"]


def test_scheme_is_the_listeners_without_a_trusted_claim() -> None:
    _, fields = forward(policy(), [(b"Host", b"gw.test")], scheme=b"https")
    assert values(fields, b"X-Forwarded-Proto") == [b"https"]


def test_no_host_means_no_x_forwarded_host() -> None:
    _, fields = forward(policy(), [(b"X-Forwarded-Host", b"evil.example")])
    assert values(fields, b"X-Forwarded-Host") == []


def test_request_id_is_the_gateways() -> None:
    p = policy()
    inbound = p.scan([(b"X-Request-Id", b"client-chosen"), (b"x-request-id", b"second")], False)
    assert inbound.request_id == b"second"  # the listener validates or replaces it
    head = p.request_head(
        b"GET", b"/", b"up", inbound, b"1.2.3.4", b"http", None, b"gw-id-7", False
    )
    _, fields = parse_head(head)
    assert values(fields, b"X-Request-Id") == [b"gw-id-7"]


@pytest.mark.parametrize(
    ("headers", "chunked", "framing"),
    [
        ([(b"Content-Length", b"5")], False, [(b"Content-Length", b"5")]),
        ([(b"Content-Length", b"0")], False, [(b"Content-Length", b"0")]),
        ([(b"Transfer-Encoding", b" Chunked ")], True, [(b"Transfer-Encoding", b"chunked")]),
        ([(b"Content-Length", b"5")], True, [(b"Transfer-Encoding", b"chunked")]),
        ([], False, []),
    ],
    ids=["length", "zero-length", "chunked", "chunked-wins", "no-body"],
)
def test_body_framing_in_the_upstream_head(
    headers: Headers, chunked: bool, framing: Headers
) -> None:
    _, fields = forward(policy(), headers, chunked=chunked)
    got = [f for f in fields if f[0].lower() in (b"content-length", b"transfer-encoding")]
    assert got == framing
    if framing:
        assert fields[-1] == framing[-1]  # after everything else, just before the blank line


def test_nothing_hop_by_hop_reaches_the_upstream() -> None:
    headers = [
        (b"Connection", b"keep-alive, X-Hop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Upgrade", b"websocket"),
        (b"X-Hop", b"1"),
        (b"Expect", b"100-continue"),
        (b"Content-Length", b"3"),
    ]
    _, fields = forward(policy(), headers)
    sent = {n.lower() for n, _ in fields}
    assert sent.isdisjoint({b"connection", b"keep-alive", b"te", b"upgrade", b"x-hop", b"expect"})
    assert values(fields, b"Content-Length") == [b"3"]


# --------------------------------------------------------------------------- response_headers


def test_response_headers_keep_order_spelling_and_duplicates() -> None:
    headers = [
        (b"Content-Type", b"text/plain"),
        (b"Set-Cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"X-Obs", b"\xff"),
        (b"Content-Length", b"10"),
    ]
    assert pairs(response_headers(headers)) == headers


def test_response_hop_by_hop_headers_and_the_request_id_are_dropped() -> None:
    dropped = [
        (b"Connection", b"keep-alive"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"transfer-encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"Trailer", b"X-T"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Proxy-Connection", b"close"),
        (b"TE", b"trailers"),
        (b"X-Request-Id", b"upstream-id"),
        (b"x-request-id", b"upstream-id-2"),
    ]
    kept = [(b"ETag", b'"1"'), (b"Vary", b"Accept")]
    assert pairs(response_headers([kept[0], *dropped, kept[1]])) == kept


def test_response_headers_listed_in_connection_are_dropped() -> None:
    headers = [
        (b"X-Internal", b"secret"),
        (b"Connection", b"close, X-Internal"),
        (b"X-Public", b"ok"),
        (b"connection", b"x-debug"),
        (b"X-DEBUG", b"trace"),
    ]
    assert pairs(response_headers(headers)) == [(b"X-Public", b"ok")]


def test_response_connection_keep_alive_drops_nothing_else() -> None:
    headers = [(b"Connection", b"Keep-Alive"), (b"Close", b"1"), (b"X-A", b"2")]
    assert pairs(response_headers(headers)) == [(b"Close", b"1"), (b"X-A", b"2")]


# --------------------------------------------------------------------------- _drop_listed


def _parts(*fields: tuple[bytes, bytes]) -> list[bytes]:
    out: list[bytes] = []
    for name, value in fields:
        out += (name, b": ", value, b"\r\n")
    return out


def test_drop_listed_leaves_everything_before_start_alone() -> None:
    parts = _parts((b"X-A", b"prefix"), (b"X-A", b"1"), (b"X-B", b"2"), (b"x-a", b"3"))
    _drop_listed(parts, [b"x-A"], 4)
    assert pairs(parts) == [(b"X-A", b"prefix"), (b"X-B", b"2")]


def test_drop_listed_reads_every_value_and_ignores_close_and_keep_alive() -> None:
    parts = _parts((b"close", b"1"), (b"X-A", b"2"), (b"X-B", b"3"), (b"X-C", b"4"))
    _drop_listed(parts, [b"close , x-a", b"X-C,keep-alive"], 0)
    assert pairs(parts) == [(b"close", b"1"), (b"X-B", b"3")]


def test_drop_listed_with_nothing_listed_changes_nothing() -> None:
    parts = _parts((b"X-A", b"1"))
    before = list(parts)
    for listed in ([b"close"], [b"keep-alive"], [b"close", b"keep-alive"], [b" , "]):
        _drop_listed(parts, listed, 0)
        assert parts == before
