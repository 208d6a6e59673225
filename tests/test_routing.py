"""Routing: request-target normalisation, route matching, and traversal through a live gateway.

The contract: matching is on the normalised path and the upstream receives exactly the
path that was matched, so no trick aimed at a protected prefix from a public one can reach
the protected upstream without a token. Ambiguous targets get 400.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.config import Route, Upstream
from gateway.emulator import Emulator
from gateway.routing import PathError, Router, Target, normalise_path, parse_target
from tests.conftest import RawResponse, StartGateway, bearer, get

ERR = PathError  # marker in the tables: this target must be refused

# --------------------------------------------------------------------------- parse_target

# raw request target -> expected `Target.forward` (normalised path + raw query), or ERR
TARGETS: list[tuple[str, str | type[PathError]]] = [
    # plain paths, trailing slash kept
    ("/", "/"),
    ("/orders", "/orders"),
    ("/orders/", "/orders/"),
    ("/orders/7", "/orders/7"),
    ("/a/b/c/", "/a/b/c/"),
    # dot segments
    ("/a/./b", "/a/b"),
    ("/a/b/../c", "/a/c"),
    ("/public/../orders", "/orders"),
    ("/public/./../orders/7", "/orders/7"),
    ("/public/x/../../orders", "/orders"),
    ("/./orders", "/orders"),
    ("/a/.", "/a/"),
    ("/a/b/..", "/a/"),
    ("/a/..", "/"),
    ("/a/../", "/"),
    ("/.", "/"),
    ("/./", "/"),
    ("/..", ERR),
    ("/../orders", ERR),
    ("/a/../..", ERR),
    ("/a/../../orders", ERR),
    ("/public/../../orders", ERR),
    # encoded dots: lower, upper and mixed case, fully or partly encoded
    ("/public/%2e%2e/orders", "/orders"),
    ("/public/%2E%2E/orders", "/orders"),
    ("/public/%2e%2E/orders", "/orders"),
    ("/public/.%2e/orders", "/orders"),
    ("/public/%2e./orders", "/orders"),
    ("/public/%2E./orders", "/orders"),
    ("/a/%2e/b", "/a/b"),
    ("/a/%2E", "/a/"),
    ("/%2e%2e", ERR),
    ("/%2e%2e/orders", ERR),
    ("/a/%2e%2e/%2e%2e/orders", ERR),
    # a double-encoded dot is not a dot: kept as data, never resolved
    ("/public/%252e%252e/orders", "/public/%252e%252e/orders"),
    # encoded slash, NUL, backslash
    ("/public/..%2forders", ERR),
    ("/public/..%2Forders", ERR),
    ("/public%2f..%2forders", ERR),
    ("/public/%2e%2e%2forders", ERR),
    ("/a%2Fb", ERR),
    ("/a%00", ERR),
    ("/a/%00/../b", ERR),
    ("/a%5cb", ERR),
    ("/a%5Cb", ERR),
    ("/public/..%5corders", ERR),
    # raw backslash
    ("/a\\b", ERR),
    ("/public/..\\orders", ERR),
    ("/\\orders", ERR),
    # ';' parameters kept; dot segments carrying parameters refused
    ("/orders;x/7", "/orders;x/7"),
    ("/orders;jsessionid=1", "/orders;jsessionid=1"),
    ("/public;x/../orders", "/orders"),
    ("/a/..;", ERR),
    ("/a/..;x", ERR),
    ("/public/..;/orders", ERR),
    ("/public/..;x/orders", ERR),
    ("/a/.;x", ERR),
    ("/a/.;x/b", ERR),
    ("/public/%2e%2e;x/orders", ERR),
    # not origin-form
    ("http://evil.example/orders", ERR),
    ("https://gateway.test/orders", ERR),
    ("gateway.test:443", ERR),
    ("*", ERR),
    ("", ERR),
    ("orders", ERR),
    ("?x=1", ERR),
    # repeated slashes: refused (documented choice)
    ("//", ERR),
    ("//orders", ERR),
    ("/orders//7", ERR),
    ("/orders//", ERR),
    ("/public//../orders", ERR),
    ("///orders", ERR),
    # control characters, DEL, space, non-ASCII
    ("/a\x00b", ERR),
    ("/a\x01b", ERR),
    ("/a\tb", ERR),
    ("/a\nb", ERR),
    ("/a\rb", ERR),
    ("/a\x1fb", ERR),
    ("/a\x7fb", ERR),
    ("/a b", ERR),
    ("/caf\u00e9", ERR),
    ("/\u2024\u2024/orders", ERR),  # ONE DOT LEADER, looks like ".."
    ("/\uff0e\uff0e/orders", ERR),  # FULLWIDTH FULL STOP
    # overlong and otherwise invalid UTF-8 in escapes
    ("/%c0%ae", ERR),
    ("/public/%c0%ae%c0%ae/orders", ERR),
    ("/%C0%AE%C0%AE/orders", ERR),
    ("/%e0%80%ae", ERR),
    ("/public/%e0%80%ae%e0%80%ae/orders", ERR),
    ("/%c0%af", ERR),
    ("/%ff", ERR),
    ("/%80", ERR),
    ("/%c3", ERR),
    ("/%c3a%a9", ERR),
    ("/%ed%a0%80", ERR),  # UTF-16 surrogate
    # valid UTF-8 escapes are kept encoded, hex uppercased
    ("/caf%c3%a9", "/caf%C3%A9"),
    ("/caf%C3%A9", "/caf%C3%A9"),
    # invalid escapes
    ("/%g1", ERR),
    ("/%1g", ERR),
    ("/a%", ERR),
    ("/a%4", ERR),
    ("/%", ERR),
    ("/a%%41", ERR),
    # unreserved escapes decoded
    ("/%41", "/A"),
    ("/%61bc", "/abc"),
    ("/%7E", "/~"),
    ("/%7e", "/~"),
    ("/%2D%5F%2E", "/-_."),
    ("/%30%39", "/09"),
    ("/%6f%72%64%65%72%73/7", "/orders/7"),
    # reserved escapes kept, hex uppercased
    ("/%3a", "/%3A"),
    ("/a%3Ab", "/a%3Ab"),
    ("/a%3fb", "/a%3Fb"),
    ("/a%23b", "/a%23b"),
    ("/a%20b", "/a%20b"),
    ("/a%25", "/a%25"),
    ("/a%3b", "/a%3B"),
    ("/a%40%2c", "/a%40%2C"),
    # raw sub-delims and ':' / '@' are legal path characters
    ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
    # the query is passed through raw, never normalised
    ("/orders?x=1", "/orders?x=1"),
    ("/orders?x=%2f&y=../..&z=%2e%2e", "/orders?x=%2f&y=../..&z=%2e%2e"),
    ("/orders?%41=%7e", "/orders?%41=%7e"),
    ("/public/../orders?a=b", "/orders?a=b"),
    ("/orders?", "/orders?"),
    ("/?q", "/?q"),
    ("/a?x=/../y", "/a?x=/../y"),
    # fragments are not part of a request target
    ("/a#frag", ERR),
]


def _ids(rows: list[tuple[str, Any]]) -> list[str]:
    return [repr(raw)[1:-1] or "<empty>" for raw, _ in rows]


@pytest.mark.parametrize(("raw", "expected"), TARGETS, ids=_ids(TARGETS))
def test_parse_target(raw: str, expected: str | type[PathError]) -> None:
    if expected is ERR:
        with pytest.raises(PathError) as info:
            parse_target(raw)
        assert info.value.reason, "a PathError must say why"
        return
    target = parse_target(raw)
    assert target.forward == expected
    path, sep, query = str(expected).partition("?")
    assert target.path == path
    assert target.query == query
    assert target.has_query == bool(sep)


def test_parse_target_error_is_a_value_error() -> None:
    # 400 handling may catch ValueError; PathError must stay one.
    with pytest.raises(ValueError, match=r".+"):
        parse_target("/%2f")


# normalise_path works on a path alone (also used to validate config path prefixes)
PATHS: list[tuple[str, str | type[PathError]]] = [
    ("/", "/"),
    ("/a/./b/../c/", "/a/c/"),
    ("/a/%2e%2E/b", "/b"),
    ("/%41%7e%3a", "/A~%3A"),
    ("/a;p/b", "/a;p/b"),
    ("", ERR),
    ("a/b", ERR),
    ("/a//b", ERR),
    ("/a%2fb", ERR),
    ("/a%00", ERR),
    ("/a%5c", ERR),
    ("/a\\b", ERR),
    ("/..", ERR),
    ("/..;x", ERR),
    ("/%c0%ae", ERR),
    ("/%e0%80%ae", ERR),
    ("/a?b", ERR),  # '?' is not a path character: callers split the query first
]


@pytest.mark.parametrize(("raw", "expected"), PATHS, ids=_ids(PATHS))
def test_normalise_path(raw: str, expected: str | type[PathError]) -> None:
    if expected is ERR:
        with pytest.raises(PathError):
            normalise_path(raw)
    else:
        assert normalise_path(raw) == expected


# --------------------------------------------------------------------------- property


def _segment_names(path: str) -> list[str]:
    return [seg.partition(";")[0] for seg in path.split("/")[1:]]


def _check_normalised(target: Target) -> None:
    path = target.path
    assert path.startswith("/")
    assert "//" not in path
    assert ".." not in path.split("/")
    assert "." not in path.split("/")
    for name in _segment_names(path):
        assert name not in (".", "..")
    upper = path.upper()
    for forbidden in ("%2F", "%00", "%5C", "\\", "?", "#"):
        assert forbidden not in upper
    assert all(0x21 <= ord(c) < 0x7F for c in path), path
    assert normalise_path(path) == path  # a fixed point
    assert parse_target(target.forward) == target


_PIECES = st.sampled_from(
    [
        "/",
        "/",
        "/",
        ".",
        "..",
        "a",
        "orders",
        ";",
        ";x",
        "%",
        "%2e",
        "%2E",
        "%2f",
        "%2F",
        "%5c",
        "%00",
        "%41",
        "%7e",
        "%3a",
        "%25",
        "%c0%ae",
        "%e0%80%ae",
        "%c3%a9",
        "%g",
        "\\",
        "?",
        "#",
        " ",
        "\x00",
        "\x7f",
        "\u00e9",
        "=",
        ":",
        "@",
    ]
)
_TRICKY = st.builds(lambda parts: "/" + "".join(parts), st.lists(_PIECES, max_size=12))
# Mostly-valid pieces, so that dot-segment resolution is exercised often, not just refusals.
_DOTTY = st.builds(
    lambda parts: "/" + "".join(parts),
    st.lists(
        st.sampled_from(["/", "/", ".", "..", "a", "b", "%2e", "%2E", "%41", "%3a", ";x", "%25"]),
        max_size=14,
    ),
)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.one_of(st.text(), st.text().map(lambda s: "/" + s), _TRICKY, _DOTTY))
@example("/public/%2e%2e/orders")
@example("/a/%2e%2e%2f")
@example("/a/b/%2e")
@example("/;/..")
def test_parse_target_property(raw: str) -> None:
    try:
        target = parse_target(raw)
    except PathError:
        return
    _check_normalised(target)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_TRICKY, _DOTTY))
def test_normalise_path_is_idempotent(raw: str) -> None:
    try:
        once = normalise_path(raw)
    except PathError:
        return
    assert normalise_path(once) == once


# --------------------------------------------------------------------------- Router.match


def _route(name: str, prefix: str, methods: set[str] | None = None) -> Route:
    return Route(
        name=name,
        path_prefix=prefix,
        methods=None if methods is None else frozenset(methods),
        upstream=Upstream("http", "127.0.0.1", 9),
        auth_required=True,
        scopes=(),
        timeout=5.0,
    )


def _match(router: Router, path: str, method: str = "GET") -> str | None:
    route = router.match(method, path)
    return None if route is None else route.name


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/orders", "orders"),
        ("/orders/", "orders"),
        ("/orders/7", "orders"),
        ("/orders/7/items", "orders"),
        ("/ordersx", None),
        ("/orders-old", None),
        ("/order", None),
        ("/", None),
        ("/public/orders", None),
        ("/api/v1", "v1"),
        ("/api/v1/x", "v1"),
        ("/api/v10", None),
        ("/api", None),
        ("/api/", None),
        # ';' parameters are ignored for matching
        ("/orders;x", "orders"),
        ("/orders;x/7", "orders"),
        ("/orders/7;y", "orders"),
        ("/orders;", "orders"),
        ("/ordersx;y", None),
        ("/api;p/v1/x", "v1"),
        ("/api/v1;p", "v1"),
        # matching is exact on the (normalised) string: an escape is not the character
        ("/orders%3Bx/7", None),
    ],
)
def test_router_whole_segments(path: str, expected: str | None) -> None:
    router = Router([_route("orders", "/orders"), _route("v1", "/api/v1")])
    assert _match(router, path) == expected


def test_router_methods() -> None:
    router = Router(
        [
            _route("read", "/orders", {"GET", "HEAD"}),
            _route("write", "/orders", {"POST"}),
            _route("any", "/other"),
        ]
    )
    assert _match(router, "/orders/1", "GET") == "read"
    assert _match(router, "/orders/1", "HEAD") == "read"
    assert _match(router, "/orders/1", "POST") == "write"
    assert _match(router, "/orders/1", "DELETE") is None
    assert _match(router, "/orders/1", "get") is None  # methods are case-sensitive
    for method in ("GET", "DELETE", "PATCH", "OPTIONS", "BREW"):
        assert _match(router, "/other/x", method) == "any"


def test_router_first_match_wins() -> None:
    specific_first = Router([_route("admin", "/orders/admin"), _route("orders", "/orders")])
    assert _match(specific_first, "/orders/admin/1") == "admin"
    assert _match(specific_first, "/orders/1") == "orders"
    general_first = Router([_route("orders", "/orders"), _route("admin", "/orders/admin")])
    assert _match(general_first, "/orders/admin/1") == "orders"
    # a method-restricted earlier route does not shadow a later one for other methods
    mixed = Router([_route("ro", "/orders", {"GET"}), _route("all", "/")])
    assert _match(mixed, "/orders/1", "GET") == "ro"
    assert _match(mixed, "/orders/1", "DELETE") == "all"


@pytest.mark.parametrize("path", ["/", "/x", "/orders", "/a/b/c/", "/;x", "/%3A"])
def test_router_catch_all(path: str) -> None:
    router = Router([_route("orders", "/orders"), _route("root", "/")])
    expected = "orders" if path == "/orders" else "root"
    assert _match(router, path) == expected


def test_router_no_routes() -> None:
    assert Router([]).match("GET", "/") is None


# --------------------------------------------------------------------------- end to end

TOKEN = "routing-test-token"


@pytest.fixture
async def split_gateway(start_gateway: StartGateway, upstream: str, emulator: Emulator) -> int:
    emulator.add_token(TOKEN, scopes=["orders.read"])
    running = await start_gateway(
        [
            {"name": "public", "path_prefix": "/public", "upstream": upstream, "auth": "none"},
            {
                "name": "orders",
                "path_prefix": "/orders",
                "upstream": upstream,
                "scopes": ["orders.read"],
            },
        ]
    )
    return running.port


def _echo(resp: RawResponse) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(resp.body)
    return data


# Every trick aimed at /orders from /public, sent without a token, with the only acceptable
# outcome: 401 (it was routed to /orders, which wants a token), 400 (refused), or 200 through
# the public route with exactly the normalised path given here.
TRAVERSALS: list[tuple[str, int, str | None]] = [
    ("/public/../orders", 401, None),
    ("/public/../orders/7", 401, None),
    ("/public/%2e%2e/orders", 401, None),
    ("/public/%2E%2E/orders", 401, None),
    ("/public/%2e%2E/orders", 401, None),
    ("/public/.%2e/orders", 401, None),
    ("/public/%2e./orders", 401, None),
    ("/public/./../orders", 401, None),
    ("/public/x/../../orders", 401, None),
    ("/public;x/../orders", 401, None),
    ("/public/..;/orders", 400, None),
    ("/public/..;x/orders", 400, None),
    ("/public/%2e%2e;x/orders", 400, None),
    ("/public/..%2forders", 400, None),
    ("/public/..%2Forders", 400, None),
    ("/public%2f..%2forders", 400, None),
    ("/public/%2e%2e%2forders", 400, None),
    ("/public/..%5corders", 400, None),
    ("/public/..%5Corders", 400, None),
    ("/public/..\\orders", 400, None),
    ("/public\\..\\orders", 400, None),
    ("/public//../orders", 400, None),
    ("//orders", 400, None),
    ("//public/../orders", 400, None),
    ("/public/%00/../../orders", 400, None),
    ("/public/%c0%ae%c0%ae/orders", 400, None),
    ("/public/%e0%80%ae%e0%80%ae/orders", 400, None),
    ("/public/%c0%af../orders", 400, None),
    ("/public/../../orders", 400, None),
    ("/public/%2e%2e/%2e%2e/orders", 400, None),
    ("http://gateway.test/public/../orders", 400, None),
    ("http://gateway.test/orders", 400, None),
    # reserved escapes are data, not structure: the public upstream gets them as they are
    ("/public/%252e%252e/orders", 200, "/public/%252e%252e/orders"),
    ("/public/..%3B/orders", 200, "/public/..%3B/orders"),
    ("/public/%2e%2e%3b/orders", 200, "/public/..%3B/orders"),
    # plainly protected paths
    ("/./orders", 401, None),
    ("/orders", 401, None),
    ("/orders/", 401, None),
    ("/orders;x/7", 401, None),
    ("/orders;/7", 401, None),
    ("/%6frders", 401, None),
    ("/%6F%72%64%65%72%73/7", 401, None),
    ("/orders/../orders/7", 401, None),
    ("/public/../orders?x=/public", 401, None),
]


@pytest.mark.parametrize(("target", "status", "forwarded"), TRAVERSALS)
async def test_traversal_never_reaches_orders_without_token(
    split_gateway: int, emulator: Emulator, target: str, status: int, forwarded: str | None
) -> None:
    resp = await get(split_gateway, target)
    assert resp.status == status, (target, resp.status, resp.body)
    if status == 200:
        # the echo reports the raw target it received
        assert _echo(resp)["path"] == forwarded
    elif status == 401:
        assert resp.header("WWW-Authenticate") == 'Bearer realm="test"'
        assert resp.json()["error"]
    assert emulator.calls == 0


# Targets that are forwarded, and the exact path + query the upstream must receive.
FORWARDED: list[tuple[str, str, str]] = [
    ("/public", "/public", ""),
    ("/public/", "/public/", ""),
    ("/public/hello", "/public/hello", ""),
    ("/public/a/./b", "/public/a/b", ""),
    ("/public/a/../b", "/public/b", ""),
    ("/public/a/%2e%2e/b", "/public/b", ""),
    ("/public/%41%7e%2D", "/public/A~-", ""),
    ("/public/%3a%2c", "/public/%3A%2C", ""),
    ("/public/caf%c3%a9", "/public/caf%C3%A9", ""),
    ("/public;v=1/x", "/public;v=1/x", ""),
    ("/public/%252e%252e/orders", "/public/%252e%252e/orders", ""),
    ("/public/x?q=%2f..%2f&r=%zz", "/public/x", "q=%2f..%2f&r=%zz"),
    ("/x/../public/y?a=1", "/public/y", "a=1"),
]


@pytest.mark.parametrize(("target", "path", "query"), FORWARDED)
async def test_public_forwarded_path_is_normalised_path(
    split_gateway: int, target: str, path: str, query: str
) -> None:
    resp = await get(split_gateway, target)
    assert resp.status == 200, resp.body
    echo = _echo(resp)
    # the echo's "path" is the raw target it received (path and query)
    assert echo["path"].partition("?")[0] == path
    assert echo["query"] == query
    assert echo["path"] == parse_target(target).forward


PROTECTED_FORWARDED: list[tuple[str, str]] = [
    ("/orders/7", "/orders/7"),
    ("/public/../orders/7", "/orders/7"),
    ("/public/%2e%2e/orders/7", "/orders/7"),
    ("/orders/./7", "/orders/7"),
    ("/orders/%37", "/orders/7"),
    ("/orders;x/7", "/orders;x/7"),
    ("/orders/", "/orders/"),
]


@pytest.mark.parametrize(("target", "path"), PROTECTED_FORWARDED)
async def test_protected_forwarded_with_token_gets_normalised_path(
    split_gateway: int, target: str, path: str
) -> None:
    resp = await get(split_gateway, target, bearer(TOKEN))
    assert resp.status == 200, resp.body
    assert _echo(resp)["path"] == path


BAD_TARGETS = [
    "/orders//7",
    "//",
    "/a%2fb",
    "/a%00",
    "/a%5cb",
    "/a\\b",
    "/..",
    "/orders/../..",
    "/orders/..;x",
    "/%c0%ae",
    "/%e0%80%ae",
    "/%g1",
    "/a%",
    "/a%4",
    "*",
    "http://evil.example/public",
    "/caf\u00e9",
    "/a\x7fb",
]


@pytest.mark.parametrize("target", BAD_TARGETS)
async def test_bad_targets_get_400_without_introspection(
    split_gateway: int, emulator: Emulator, target: str
) -> None:
    # A valid token is sent: the refusal must come from routing, before any lookup.
    resp = await get(split_gateway, target, bearer(TOKEN))
    assert resp.status == 400, (target, resp.status, resp.body)
    assert emulator.calls == 0


async def test_bad_path_400_is_a_json_denial(split_gateway: int) -> None:
    resp = await get(split_gateway, "/public/..%2forders")
    assert resp.status == 400
    body = resp.json()
    assert body["error"] == "invalid_request"
    assert isinstance(body["error_description"], str)
    assert resp.header("Cache-Control") == "no-store"


async def test_unmatched_path_is_404(split_gateway: int, emulator: Emulator) -> None:
    for target in ("/ordersx", "/publicx", "/", "/other/orders"):
        resp = await get(split_gateway, target, bearer(TOKEN))
        assert resp.status == 404, (target, resp.body)
    assert emulator.calls == 0


# A public catch-all `/` next to a protected `/orders`, both on the same upstream. `;`
# parameters are ignored for matching because servlet containers drop them before routing;
# a segment holding only parameters is then an empty segment, so `/;x/orders` is `//orders`
# to such an upstream (which collapses it to `/orders`). Whatever the gateway does with it,
# it must not hand the protected resource out without a token: 400 (a repeated slash) or
# 401 (routed to /orders), never 200.
CATCH_ALL_TRICKS = [
    "/;x/orders",
    "/;/orders",
    "/;x/orders/7",
    "/;x/;y/orders",
    "/%2e/orders",
    "/x/../orders",
    "/x/%2e%2e/orders",
    "/x;y/../orders",
]


@pytest.mark.parametrize("target", CATCH_ALL_TRICKS)
async def test_catch_all_public_never_serves_orders_without_token(
    start_gateway: StartGateway, upstream: str, emulator: Emulator, target: str
) -> None:
    running = await start_gateway(
        [
            {
                "name": "orders",
                "path_prefix": "/orders",
                "upstream": upstream,
                "scopes": ["orders.read"],
            },
            {"name": "rest", "path_prefix": "/", "upstream": upstream, "auth": "none"},
        ]
    )
    resp = await get(running.port, target)
    assert resp.status in (400, 401), (target, resp.status, resp.body)
    assert emulator.calls == 0


async def test_catch_all_public_still_serves_other_paths(
    start_gateway: StartGateway, upstream: str
) -> None:
    running = await start_gateway(
        [
            {
                "name": "orders",
                "path_prefix": "/orders",
                "upstream": upstream,
                "scopes": ["orders.read"],
            },
            {"name": "rest", "path_prefix": "/", "upstream": upstream, "auth": "none"},
        ]
    )
    for target, forwarded in [("/", "/"), ("/x/y", "/x/y"), ("/ordersx", "/ordersx")]:
        resp = await get(running.port, target)
        assert resp.status == 200, (target, resp.body)
        assert _echo(resp)["path"] == forwarded


_PATHISH = st.text(alphabet=st.sampled_from(list("/.;%2eEfF0aAx:@~-_\\ ?")), max_size=24)


@given(raw=_PATHISH.map(lambda s: "/" + s))
@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow])
def test_fast_path_agrees_with_the_full_normaliser(raw: str) -> None:
    """parse_target skips normalise_path for plain paths; both must always agree."""
    path = raw.partition("?")[0]
    try:
        expected: str | None = normalise_path(path)
    except PathError:
        expected = None
    try:
        got: str | None = parse_target(raw).path
    except PathError:
        got = None
        if expected is not None:
            # Only the query may make parse_target refuse a path normalise_path accepts.
            assert "?" in raw
            return
    assert got == expected


@pytest.mark.parametrize("octet", [*range(0x20), 0x7F])
def test_encoded_control_characters_are_refused_in_either_case(octet: int) -> None:
    for escape in (f"%{octet:02X}", f"%{octet:02x}"):
        with pytest.raises(PathError):
            normalise_path(f"/admin{escape}")


def test_trace_matches_only_routes_that_list_it() -> None:
    up = Upstream("http", "127.0.0.1", 1)
    routes = [
        Route("debug", "/debug", frozenset({"GET", "TRACE"}), up, False, (), 1.0),
        Route("all", "/", None, up, False, (), 1.0),
    ]
    router = Router(routes)
    assert router.match("TRACE", "/x") is None
    route = router.match("TRACE", "/debug/x")
    assert route is not None and route.name == "debug"
    route = router.match("GET", "/x")
    assert route is not None and route.name == "all"
