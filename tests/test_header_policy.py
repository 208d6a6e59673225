"""The header policy as a unit, bytes in and bytes out: what `HeaderPolicy.scan` keeps and
reads from a client's head, what `request_head` sends upstream, and what `response_headers`
relays back. Configs come from `make_config`; nothing is contacted."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import HeadersConfig
from gateway.proxy import (
    DROPPED_FROM_EVERY_PEER,
    DROPPED_FROM_UNTRUSTED,
    HeaderPolicy,
    _drop_listed,
    response_headers,
)
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
    forward_authorization: bool = True,
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
        forward_authorization,
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
            b"X-Auth-Subjects",
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


# --------------------------------------------------------------------------- identity-like claims

# Named in issue 10: each reached every upstream from an untrusted peer.
ISSUE_10_CLAIMS = [
    b"X-Forwarded-User",
    b"X-Forwarded-Email",
    b"X-Forwarded-Groups",
    b"X-Forwarded-Preferred-Username",
    b"X-Forwarded-Access-Token",
    b"X-Forwarded-Scheme",
    b"X-Forwarded-Ssl",
    b"X-Forwarded-Path",
    b"X-Remote-User",
    b"Remote-User",
    b"X-Auth-Request-User",
    b"X-Auth-Request-Email",
    b"X-Auth-Request-Preferred-Username",
    b"True-Client-IP",
    b"X-Client-IP",
    b"X-Original-Host",
    b"X-Host",
    b"X-HTTP-Method-Override",
]
METHOD_OVERRIDES = [b"X-HTTP-Method-Override", b"X-HTTP-Method", b"X-Method-Override"]
# Near misses of listed names, and headers clients legitimately send: never dropped.
ORDINARY = [
    b"Accept",
    b"Cookie",
    b"User-Agent",
    b"X-Forwarded",  # not an X-Forwarded-* name
    b"X-Forwardedx-User",
    b"X-Remote",
    b"X-Users",
    b"Remote-Users",
    b"X-Original-Hostname",
    b"X-Auth-Token",  # an API key some upstreams take from clients themselves
    b"X-Auth-Requests",
    b"X-Request-Start",
    b"X-Http-Methods",
]


def examples(entry: str) -> list[str]:
    """Header names an entry of a drop list covers: itself, or names under a prefix."""
    if not entry.endswith("*"):
        return [entry]
    prefix = entry[:-1]
    return [prefix + "user", prefix + "a-b"] + ([] if prefix.endswith("-") else [prefix])


def spellings(name: str) -> list[bytes]:
    """Spellings many frameworks read as one name: any case, `_` for any `-`."""
    us = name.replace("-", "_")
    words = name.split("-")
    capital = "-".join(w.capitalize() for w in words)
    first_us = name.replace("-", "_", 1)
    return [
        s.encode() for s in dict.fromkeys([name, name.upper(), capital, us, us.upper(), first_us])
    ]


UNTRUSTED_ONLY_NAMES = sorted({n for e in DROPPED_FROM_UNTRUSTED for n in examples(e)})
EVERY_PEER_NAMES = sorted({n for e in DROPPED_FROM_EVERY_PEER for n in examples(e)})


def kept_names(p: HeaderPolicy, headers: Headers, trusted: bool) -> list[bytes]:
    return names(p.scan(headers, trusted).kept)


def test_the_claims_named_in_issue_10_are_on_the_default_lists() -> None:
    p = policy()
    for name in ISSUE_10_CLAIMS:
        for spelling in spellings(name.decode()):
            assert kept_names(p, [(spelling, b"spoof"), (b"X-Control", b"c")], False) == [
                b"X-Control"
            ], spelling


def test_the_default_lists_are_disjoint_and_folded() -> None:
    assert not DROPPED_FROM_UNTRUSTED & DROPPED_FROM_EVERY_PEER
    for entry in DROPPED_FROM_UNTRUSTED | DROPPED_FROM_EVERY_PEER:
        assert entry == entry.lower().replace("_", "-"), entry
        assert "*" not in entry[:-1], entry  # a `*` only ends a prefix
    # The ones the gateway sets keep their own rules (extended or replaced, never dropped).
    for name in (b"X-Forwarded-For", b"X-Forwarded-Proto", b"X-Forwarded-Host"):
        assert policy().scan([(name, b"v")], False).kept == []


@pytest.mark.parametrize("name", UNTRUSTED_ONLY_NAMES)
def test_listed_claims_are_dropped_from_untrusted_peers_in_every_spelling(name: str) -> None:
    p = policy(trusted_proxies=TRUSTED)
    for spelling in spellings(name):
        assert kept_names(p, [(spelling, b"spoof"), (b"X-Control", b"c")], False) == [
            b"X-Control"
        ], spelling


@pytest.mark.parametrize("name", UNTRUSTED_ONLY_NAMES)
def test_listed_claims_pass_from_trusted_proxies_in_their_dashed_spelling_only(name: str) -> None:
    """A trusted proxy sets these itself (it may have authenticated the user), always with
    dashes; an underscore spelling is its client's copy, relayed unread, and would stand next
    to the proxy's own in a framework that reads `_` as `-`."""
    p = policy(trusted_proxies=TRUSTED)
    dashed = [s for s in spellings(name) if b"_" not in s]
    underscored = [s for s in spellings(name) if b"_" in s]
    assert underscored or "-" not in name
    for spelling in dashed:
        assert kept_names(p, [(spelling, b"fact")], True) == [spelling]
    for spelling in underscored:
        assert kept_names(p, [(spelling, b"spoof")], True) == [], spelling


@pytest.mark.parametrize("trusted", [False, True])
@pytest.mark.parametrize("name", EVERY_PEER_NAMES)
def test_method_overrides_are_dropped_from_every_peer(name: str, trusted: bool) -> None:
    """A public GET must not become a DELETE in a framework that honours an override, and no
    proxy in front ever sets one on a client's behalf."""
    p = policy(trusted_proxies=TRUSTED)
    for spelling in spellings(name):
        assert kept_names(p, [(spelling, b"DELETE"), (b"X-Control", b"c")], trusted) == [
            b"X-Control"
        ], spelling


def test_method_overrides_are_on_the_every_peer_list() -> None:
    for name in METHOD_OVERRIDES:
        assert name.decode().lower() in DROPPED_FROM_EVERY_PEER
        assert kept_names(policy(trusted_proxies=TRUSTED), [(name, b"DELETE")], True) == []


@pytest.mark.parametrize("trusted", [False, True])
def test_ordinary_headers_and_near_misses_pass(trusted: bool) -> None:
    headers = [(name, b"v") for name in ORDINARY]
    assert kept_names(policy(trusted_proxies=TRUSTED), headers, trusted) == ORDINARY


@pytest.mark.parametrize("trusted", [False, True])
@pytest.mark.parametrize(
    "name",
    [
        b"Transfer_Encoding",
        b"transfer_encoding",
        b"TRANSFER_ENCODING",
        b"Content_Length",
        b"content_length",
        b"X_Request_Id",
        b"Proxy_Authorization",
        b"Keep_Alive",
        b"X_Forwarded_For",
    ],
)
def test_underscore_spellings_of_framing_and_decided_on_names_are_dropped_unread(
    name: bytes, trusted: bool
) -> None:
    inbound = policy(trusted_proxies=TRUSTED).scan([(name, b"5"), (b"X-Control", b"c")], trusted)
    assert names(inbound.kept) == [b"X-Control"]
    assert inbound.content_length is None
    assert inbound.transfer_encoding is None
    assert inbound.request_id is None
    assert inbound.x_forwarded_for is None


# --------------------------------------------------------------------------- the config keys


def test_drop_from_untrusted_extends_the_list_with_names_and_prefixes() -> None:
    p = policy(
        trusted_proxies=TRUSTED,
        headers={"drop_from_untrusted": ["X-Tenant", "x_internal_*", "X-Debug-"]},
    )
    spoofs = [
        (b"X-Tenant", b"other"),
        (b"x_tenant", b"other"),
        (b"X-Internal-Role", b"root"),
        (b"x-internal_flags", b"all"),
        (b"X-Debug-", b"1"),
    ]
    ordinary = [(b"X-Internal", b"1"), (b"X-Tenants", b"1"), (b"X-Debug-Level", b"1")]
    assert pairs(p.scan([*spoofs, *ordinary], False).kept) == ordinary
    # From a trusted proxy they pass, in the dashed spelling only, like the built-in ones.
    assert names(p.scan([*spoofs, *ordinary], True).kept) == [
        b"X-Tenant",
        b"X-Internal-Role",
        b"X-Debug-",
        *(n for n, _ in ordinary),
    ]


@pytest.mark.parametrize("trusted", [False, True])
def test_allow_from_untrusted_lets_a_named_header_through_on_purpose(trusted: bool) -> None:
    p = policy(
        trusted_proxies=TRUSTED,
        headers={"allow_from_untrusted": ["X-Real-IP", "x_forwarded_prefix", "X-Auth-Request-*"]},
    )
    allowed = [
        (b"X-Real-IP", b"203.0.113.5"),
        (b"x_real_ip", b"203.0.113.6"),  # allowed in every spelling, as named
        (b"X-Forwarded-Prefix", b"/app"),
        (b"X-Auth-Request-User", b"alice"),
        (b"x_auth_request_email", b"alice@example.com"),
    ]
    still_dropped = [(b"X-Forwarded-Port", b"443"), (b"X-Remote-User", b"mallory")]
    kept = pairs(p.scan([*still_dropped, *allowed], trusted).kept)
    expected = allowed if not trusted else [still_dropped[0], still_dropped[1], *allowed]
    assert kept == expected


@pytest.mark.parametrize("trusted", [False, True])
def test_an_allowed_method_override_passes_from_every_peer(trusted: bool) -> None:
    p = policy(trusted_proxies=TRUSTED, headers={"allow_from_untrusted": ["X-HTTP-Method"]})
    headers = [(b"X-HTTP-Method", b"PATCH"), (b"X-HTTP-Method-Override", b"DELETE")]
    assert pairs(p.scan(headers, trusted).kept) == [(b"X-HTTP-Method", b"PATCH")]


def test_between_the_configured_lists_the_more_specific_entry_wins() -> None:
    p = policy(
        headers={
            "drop_from_untrusted": ["x-internal-*", "x-team-secret"],
            "allow_from_untrusted": ["x-internal-ok", "x-team-*"],
        }
    )
    # (The same entry in both lists is a config error: see tests/test_config.py.)
    headers = [
        (b"X-Internal-Ok", b"1"),  # exact allow beats a drop prefix
        (b"X-Internal-Role", b"2"),
        (b"X-Team-Name", b"3"),
        (b"X-Team-Secret", b"4"),  # exact drop beats an allow prefix
    ]
    assert names(p.scan(headers, False).kept) == [b"X-Internal-Ok", b"X-Team-Name"]


def test_a_drop_everything_entry_with_an_allow_list_forwards_only_what_is_named() -> None:
    """`drop_from_untrusted: ["*"]` turns the list into an allow list for untrusted peers;
    the headers the gateway reads, sets or replaces keep their own rules."""
    p = policy(
        headers={"drop_from_untrusted": ["*"], "allow_from_untrusted": ["accept", "content-type"]}
    )
    headers = [
        (b"Host", b"gw.test"),
        (b"Accept", b"*/*"),
        (b"Content-Type", b"text/plain"),
        (b"X-Anything", b"1"),
        (b"Cookie", b"a=b"),
        (b"Authorization", b"Bearer t"),
        (b"X-Forwarded-For", b"203.0.113.1"),
        (b"Content-Length", b"3"),
    ]
    _, fields = forward(p, headers)
    assert [n for n, _ in fields] == [
        b"Host",
        b"Accept",
        b"Content-Type",
        b"Authorization",
        b"X-Forwarded-For",
        b"X-Forwarded-Proto",
        b"X-Forwarded-Host",
        b"X-Request-Id",
        b"Content-Length",
    ]
    assert names(p.scan(headers, True).kept) == [
        b"Accept",
        b"Content-Type",
        b"X-Anything",
        b"Cookie",
        b"Authorization",
    ]


@pytest.mark.parametrize("trusted", [False, True])
def test_allow_from_untrusted_never_overrides_the_gateways_own_rules(trusted: bool) -> None:
    allowed = [
        "X-Auth-Subject",
        "x_auth_scopes",
        "Upgrade",
        "Proxy-Authorization",
        "Content_Length",
        "Transfer_Encoding",
        "X-Forwarded-Host",
        "X-Forwarded-Proto",
        "X_Forwarded_For",
        "x-forwarded-*",
    ]
    p = policy(trusted_proxies=TRUSTED, headers={"allow_from_untrusted": allowed})
    headers = [
        (b"Host", b"gw.test"),
        (b"X-Auth-Subject", b"mallory"),
        (b"X_Auth_Scopes", b"admin"),
        (b"Upgrade", b"websocket"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Content_Length", b"9"),
        (b"Transfer_Encoding", b"chunked"),
        (b"X_Forwarded_For", b"203.0.113.9"),
        (b"X-Forwarded-Host", b"evil.example"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Ssl", b"on"),  # allowed through the configured prefix
    ]
    _, fields = forward(p, headers, trusted=trusted, identity=ALICE)
    assert values(fields, b"X-Auth-Subject") == [b"alice"]
    assert values(fields, b"X-Auth-Scopes") == [b"read write"]
    for name in (b"Upgrade", b"Proxy-Authorization", b"Content_Length", b"Transfer_Encoding"):
        assert values(fields, name) == []
    assert values(fields, b"X_Forwarded_For") == []
    assert values(fields, b"X-Forwarded-For") == [b"198.51.100.9"]
    assert values(fields, b"X-Forwarded-Host") == [b"evil.example" if trusted else b"gw.test"]
    assert values(fields, b"X-Forwarded-Proto") == [b"https" if trusted else b"http"]
    assert values(fields, b"X-Forwarded-Ssl") == [b"on"]


def test_a_configured_identity_name_on_the_list_comes_only_from_the_verdict() -> None:
    p = policy(
        trusted_proxies=TRUSTED,
        headers={"subject": "X-Remote-User", "allow_from_untrusted": ["x-remote-user"]},
    )
    for trusted in (False, True):
        _, fields = forward(p, [(b"X-Remote-User", b"mallory")], trusted=trusted, identity=ALICE)
        assert values(fields, b"X-Remote-User") == [b"alice"]


def test_listed_decisions_are_remembered_per_spelling_and_trust_level() -> None:
    p = policy(trusted_proxies=TRUSTED)
    headers = [(b"X-Remote-User", b"a"), (b"x_remote_user", b"b"), (b"X-Method-Override", b"c")]
    for _ in range(2):  # the second round is answered from the remembered spellings
        assert p.scan(headers, False).kept == []
        assert names(p.scan(headers, True).kept) == [b"X-Remote-User"]
    assert set(p._kinds_untrusted) >= {n for n, _ in headers}
    assert set(p._kinds_trusted) >= {n for n, _ in headers}


# --------------------------------------------------------------------------- obs-text


@pytest.mark.parametrize("value", [b"\x80abc", b"caf\xe9", b"\xff", b"a \x80\xfe z", b"\xc3\xa9"])
def test_obs_text_values_go_upstream_byte_for_byte(value: bytes) -> None:
    p = policy()
    inbound = p.scan([(b"X-Obs", value)], False)
    head = p.request_head(b"GET", b"/", b"up", inbound, b"1.2.3.4", b"http", None, b"r", False)
    assert b"\r\nX-Obs: " + value + b"\r\n" in head


# --------------------------------------------------------------------------- forward_authorization


@pytest.mark.parametrize("identity", [ALICE, None], ids=["protected", "auth-none"])
def test_authorization_is_forwarded_in_place_by_default(identity: Active | None) -> None:
    headers = [(b"Accept", b"a"), (b"Authorization", b"Bearer t"), (b"Cookie", b"c")]
    _, fields = forward(policy(), headers, identity=identity)
    assert fields[1:4] == headers


@pytest.mark.parametrize("identity", [ALICE, None], ids=["protected", "auth-none"])
def test_forward_authorization_false_keeps_the_token_from_the_upstream(
    identity: Active | None,
) -> None:
    p = policy()
    headers = [
        (b"Accept", b"a"),
        (b"Authorization", b"Bearer t"),
        (b"Cookie", b"c"),
        (b"authorization", b"Basic second"),  # a public route does not refuse several
        (b"X-Last", b"l"),
    ]
    _, fields = forward(p, headers, identity=identity, forward_authorization=False)
    assert values(fields, b"Authorization") == []
    assert fields[1:4] == [(b"Accept", b"a"), (b"Cookie", b"c"), (b"X-Last", b"l")]
    assert values(fields, b"X-Forwarded-For") == [b"198.51.100.9"]
    # The same scan still forwards it where the route allows: nothing was removed in place.
    inbound = p.scan(headers, False)
    for allow in (False, True, False):
        head = p.request_head(
            b"GET", b"/", b"up", inbound, b"1.2.3.4", b"http", identity, b"r", False, allow
        )
        assert (b"\r\nAuthorization: Bearer t\r\n" in head) is allow


def test_forward_authorization_false_after_connection_listed_headers_moved_it() -> None:
    headers = [
        (b"X-Hop", b"1"),
        (b"Connection", b"X-Hop, x-other"),
        (b"Accept", b"a"),
        (b"x-other", b"2"),
        (b"Authorization", b"Bearer t"),
        (b"Cookie", b"c"),
    ]
    _, fields = forward(policy(), headers, forward_authorization=False)
    assert fields[1:3] == [(b"Accept", b"a"), (b"Cookie", b"c")]
    assert values(fields, b"Authorization") == []
    _, fields = forward(policy(), headers)
    assert fields[1:4] == [(b"Accept", b"a"), (b"Authorization", b"Bearer t"), (b"Cookie", b"c")]


def test_forward_authorization_changes_nothing_else_in_the_head() -> None:
    p = policy()
    headers = [(b"Host", b"gw.test"), (b"Accept", b"a"), (b"Content-Length", b"2")]
    inbound = p.scan(headers, False)
    assert inbound.authorization is None
    heads = {
        p.request_head(
            b"POST", b"/", b"up", inbound, b"1.2.3.4", b"http", ALICE, b"r", False, forward
        )
        for forward in (True, False)
    }
    assert len(heads) == 1
