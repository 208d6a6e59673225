"""CORS: the policy functions (gateway/cors.py), the `cors:` config section, and end to end
over real sockets: a browser-style client sending Origin and preflights to a real gateway in
front of the emulator and a counting upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from aiohttp import web

from gateway.config import ConfigError, parse_config
from gateway.cors import (
    CorsConfig,
    Policy,
    answer_headers,
    origin_allowed,
    origin_entry,
    preflight,
    preflight_request,
    relay,
)
from gateway.emulator import Emulator, Override
from tests.conftest import (
    StartGateway,
    free_port,
    get,
    head,
    raw_config,
    raw_request,
    start_app,
)

APP = "https://app.example.com"


def policy(**kw: Any) -> Policy:
    kw.setdefault("allow_origins", (APP, "https://*.example.org"))
    return Policy(CorsConfig(**kw))


def lines(block: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.decode().split("\r\n"):
        if line:
            name, _, value = line.partition(": ")
            out[name.lower()] = value
    return out


# --------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    ("written", "normal"),
    [
        ("https://App.Example.com", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("http://localhost:80", "http://localhost"),
        ("https://*.example.com", "https://*.example.com"),
        ("https://*.Example.com:8443", "https://*.example.com:8443"),
        ("http://[::1]:3000", "http://[::1]:3000"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("*", "*"),
    ],
)
def test_origin_entries_are_normalised_as_browsers_send_them(written: str, normal: str) -> None:
    assert origin_entry(written) == normal


@pytest.mark.parametrize(
    ("written", "why"),
    [
        ("null", "never allowed"),
        ("app.example.com", "http(s) origin"),
        ("ftp://app.example.com", "http(s) origin"),
        ("https://app.example.com/", "did you mean https://app.example.com?"),
        ("https://app.example.com/path", "no path"),
        ("https://user@app.example.com", "user name"),
        ("https://*.com", "too broad"),
        ("https://app.*.example.com", "only stand for the subdomains"),
        ("https://a*.example.com", "only stand for the subdomains"),
        ("https://app.example.com:99999", "invalid port"),
        ("https://app_x.example.com", "invalid host name"),
    ],
)
def test_bad_origin_entries_say_why(written: str, why: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        origin_entry(written)
    assert why in str(info.value)


def test_exact_and_wildcard_origins() -> None:
    p = policy(allow_origins=(APP, "https://*.example.org", "http://*.dev.test:8080"))
    assert origin_allowed(p, b"https://app.example.com")
    assert not origin_allowed(p, b"https://app.example.com:8443")
    assert not origin_allowed(p, b"http://app.example.com")
    assert not origin_allowed(p, b"https://evil.com")
    assert origin_allowed(p, b"https://a.example.org")
    assert origin_allowed(p, b"https://a.b.example.org")  # any depth
    assert not origin_allowed(p, b"https://example.org")  # never the bare domain
    assert not origin_allowed(p, b"https://.example.org")
    assert not origin_allowed(p, b"https://evilexample.org")
    assert not origin_allowed(p, b"https://evil.com?.example.org")
    assert not origin_allowed(p, b"https://evil.com/.example.org")
    assert not origin_allowed(p, b"http://a.example.org")  # scheme is part of the pattern
    assert not origin_allowed(p, b"https://a.example.org:444")
    assert origin_allowed(p, b"http://x.dev.test:8080")
    assert not origin_allowed(p, b"http://x.dev.test")
    assert not origin_allowed(p, b"null")


def test_answer_headers_for_allowed_disallowed_and_absent_origins() -> None:
    p = policy(expose_headers=("X-Total",), allow_credentials=True)
    got = lines(answer_headers(p, b"https://app.example.com", False))
    assert got == {
        "access-control-allow-origin": "https://app.example.com",
        "access-control-allow-credentials": "true",
        "access-control-expose-headers": "X-Total",
        "vary": "Origin",
    }
    own = lines(answer_headers(p, b"https://app.example.com", True))
    assert own["access-control-expose-headers"] == (
        "X-Total, WWW-Authenticate, Retry-After, X-Request-Id"
    )
    assert answer_headers(p, b"https://evil.com", False) == b"Vary: Origin\r\n"
    assert answer_headers(p, None, True) == b"Vary: Origin\r\n"
    star = policy(allow_origins=("*",))
    got = lines(answer_headers(star, b"https://anyone.test", False))
    assert got == {"access-control-allow-origin": "*", "vary": "Origin"}  # nothing exposed


def test_answer_blocks_are_bounded() -> None:
    p = policy(allow_origins=("*",))
    for i in range(3000):
        answer_headers(p, b"https://%d.test" % i, False)
    assert len(p.blocks) <= 1024


def test_relay_drops_the_upstreams_cors_headers() -> None:
    p = policy()
    parts = [
        b"Content-Type", b": ", b"text/plain", b"\r\n",
        b"Access-Control-Allow-Origin", b": ", b"*", b"\r\n",
        b"access-control-allow-credentials", b": ", b"true", b"\r\n",
        b"Vary", b": ", b"Accept-Encoding", b"\r\n",
    ]  # fmt: skip
    out = b"".join(relay(p, parts, b"https://evil.com"))
    assert out == b"Content-Type: text/plain\r\nVary: Accept-Encoding\r\nVary: Origin\r\n"
    out = b"".join(relay(p, parts, b"https://app.example.com"))
    assert b"Access-Control-Allow-Origin: https://app.example.com\r\n" in out
    assert b"*" not in out and b"credentials" not in out


def test_preflight_request_is_read_from_the_head() -> None:
    assert preflight_request([(b"Origin", b"x")]) is None
    assert preflight_request([(b"Access-Control-Request-Method", b" PUT "), (b"Origin", b"x")]) == (
        b"PUT",
        None,
    )
    got = preflight_request(
        [
            (b"access-control-request-method", b"PUT"),
            (b"Access-Control-Request-Headers", b"authorization"),
            (b"ACCESS-CONTROL-REQUEST-HEADERS", b"x-a, x-b"),
        ]
    )
    assert got == (b"PUT", b"authorization,x-a, x-b")


def test_preflight_allowed() -> None:
    p = policy(max_age=600, allow_credentials=True)
    answer = preflight(p, b"https://app.example.com", b"PUT", b"Authorization, content-type")
    assert answer.status == 204 and answer.body == b""
    assert lines(answer.headers) == {
        "access-control-allow-origin": "https://app.example.com",
        "access-control-allow-credentials": "true",
        "access-control-allow-methods": "GET, HEAD, PUT, PATCH, POST, DELETE",
        "access-control-allow-headers": "Authorization, Content-Type",
        "access-control-max-age": "600",
        "vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }


def test_preflight_star_methods_and_headers_echo_what_is_asked() -> None:
    p = policy(allow_methods=("*",), allow_headers=("*",), allow_credentials=True)
    answer = preflight(p, b"https://x.example.org", b"PURGE", b"Authorization,X-Custom")
    assert answer.status == 204
    got = lines(answer.headers)
    assert got["access-control-allow-methods"] == "PURGE"
    # echoed, not "*": with credentials a browser reads "*" literally, and "*" never
    # covers Authorization
    assert got["access-control-allow-headers"] == "authorization, x-custom"


@pytest.mark.parametrize(
    ("origin", "method", "asked", "why"),
    [
        (b"https://evil.com", b"GET", None, "origin https://evil.com is not allowed"),
        (b"https://app.example.com", b"PURGE", None, "method PURGE is not allowed"),
        (b"https://app.example.com", b"put", None, "method put is not allowed"),
        (b"https://app.example.com", b"GET", b"authorization, x-secret", "header x-secret"),
        (b"https://app.example.com", b"GE T", None, "not a method"),
    ],
)
def test_preflight_refused_is_403_without_cors_headers(
    origin: bytes, method: bytes, asked: bytes | None, why: str
) -> None:
    answer = preflight(policy(), origin, method, asked)
    assert answer.status == 403
    assert b"Access-Control-Allow" not in answer.headers
    assert b"Vary: Origin, Access-Control-Request-Method" in answer.headers
    body = json.loads(answer.body)
    assert body["error"] == "cors_refused" and why in body["error_description"]


# --------------------------------------------------------------------------- config

ROUTE = {"path_prefix": "/api", "upstream": "http://127.0.0.1:9"}


def load(**top: Any) -> Any:
    raw = raw_config("http://127.0.0.1:1", [top.pop("route", ROUTE)], **top)
    return parse_config(yaml.safe_dump(raw), env={"FRONT": "https://front.example.com"})


def problems(**top: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(**top)
    return info.value.problems


def test_config_defaults_and_normalisation() -> None:
    cfg = load(cors={"allow_origins": ["https://App.example.com:443", "${FRONT}"]})
    assert cfg.cors == CorsConfig(allow_origins=(APP, "https://front.example.com"))
    assert cfg.cors.allow_methods == ("GET", "HEAD", "PUT", "PATCH", "POST", "DELETE")
    assert cfg.cors.allow_headers == ("Authorization", "Content-Type")
    assert cfg.routes[0].cors is None  # inherits
    assert load().cors is None


def test_config_route_override_and_off() -> None:
    route = {**ROUTE, "cors": {"allow_origins": ["*"], "allow_methods": ["get", "post"]}}
    cfg = load(route=route)
    assert cfg.routes[0].cors == CorsConfig(allow_origins=("*",), allow_methods=("GET", "POST"))
    for off in (False, "off"):  # YAML reads a bare off as false
        text = yaml.safe_dump(raw_config("http://127.0.0.1:1", [{**ROUTE, "cors": off}]))
        cfg = parse_config(text.replace("'off'", "off"), env={})
        assert cfg.routes[0].cors is False


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({}, "cors.allow_origins: is required"),
        ({"allow_origins": []}, "cors.allow_origins: must be a non-empty list"),
        ({"allow_origins": "https://a.test"}, "cors.allow_origins: must be a non-empty list"),
        ({"allow_origins": ["null"]}, 'cors.allow_origins[0]: "null"'),
        ({"allow_origins": ["*", APP]}, 'cors.allow_origins: "*" must be the only entry'),
        (
            {"allow_origins": ["*"], "allow_credentials": True},
            'cors.allow_origins: "*" cannot be combined with allow_credentials',
        ),
        (
            {"allow_origins": [APP], "allow_credentials": True, "expose_headers": ["*"]},
            "cors.expose_headers:",
        ),
        ({"allow_origins": [APP], "allow_methods": ["GET", "G T"]}, "cors.allow_methods[1]: not a"),
        ({"allow_origins": [APP], "allow_headers": "x"}, "cors.allow_headers: must be a list"),
        ({"allow_origins": [APP], "max_age": -1}, "cors.max_age: must be >= 0"),
        ({"allow_origins": [APP], "allow_credentials": "yes"}, "cors.allow_credentials"),
        ({"allow_origins": [APP], "origins": [APP]}, "cors.origins: unknown key"),
        (True, "cors: must be a mapping"),
    ],
)
def test_config_problems(section: Any, problem: str) -> None:
    found = problems(cors=section)
    assert any(p.startswith(problem) for p in found), found


def test_config_problem_on_a_route_names_its_path() -> None:
    found = problems(route={**ROUTE, "cors": {"allow_origins": ["https://*.com"]}})
    assert any(p.startswith("routes[0].cors.allow_origins[0]: ") for p in found), found


# --------------------------------------------------------------------------- end to end


class Upstream:
    """An upstream that counts requests and adds CORS headers of its own."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        return web.json_response(
            {"method": request.method, "origin": request.headers.get("Origin")},
            headers={
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Allow-Methods": "TRACE",
                "X-Total": "3",
                "Vary": "Accept-Encoding",
            },
        )


@pytest.fixture
async def counting() -> AsyncIterator[Upstream]:
    up = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", up.handle)
    runner, up.url, _ = await start_app(app)
    try:
        yield up
    finally:
        await runner.cleanup()


GLOBAL = {
    "allow_origins": [APP, "https://*.example.org"],
    "allow_headers": ["Authorization", "Content-Type", "X-Trace"],
    "expose_headers": ["X-Total"],
    "max_age": 600,
}


def e2e_routes(url: str) -> list[dict[str, Any]]:
    return [
        {"name": "api", "path_prefix": "/api", "upstream": url},
        {
            "name": "partner",
            "path_prefix": "/partner",
            "upstream": url,
            "cors": {
                "allow_origins": ["https://partner.test"],
                "allow_methods": ["GET"],
                "allow_credentials": True,
            },
        },
        {"name": "own", "path_prefix": "/own", "upstream": url, "auth": "none", "cors": False},
        {"name": "public", "path_prefix": "/public", "upstream": url, "auth": "none"},
    ]


def preflight_head(target: str, origin: str, method: str, *more: str) -> bytes:
    return head(
        "OPTIONS",
        target,
        f"Origin: {origin}",
        f"Access-Control-Request-Method: {method}",
        *more,
        "Connection: close",
    )


def acao(resp: Any) -> str | None:
    value: str | None = resp.header("Access-Control-Allow-Origin")
    return value


async def test_preflight_is_answered_without_authlete_or_upstream(
    emulator: Emulator, counting: Upstream, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(e2e_routes(counting.url), cors=GLOBAL)
    resp = await raw_request(
        gw.port,
        preflight_head(
            "/api/items/7", APP, "DELETE", "Access-Control-Request-Headers: authorization,x-trace"
        ),
    )
    assert resp.status == 204, resp.body
    assert acao(resp) == APP
    assert resp.header("Access-Control-Allow-Methods") == "GET, HEAD, PUT, PATCH, POST, DELETE"
    assert resp.header("Access-Control-Allow-Headers") == "Authorization, Content-Type, X-Trace"
    assert resp.header("Access-Control-Max-Age") == "600"
    assert resp.header("Access-Control-Allow-Credentials") is None
    assert "Origin" in (resp.header("Vary") or "")
    assert resp.header("Content-Length") is None and resp.body == b""
    assert emulator.calls == 0
    assert counting.requests == []


async def test_refused_preflights_are_403_and_never_forwarded(
    emulator: Emulator, counting: Upstream, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(e2e_routes(counting.url), cors=GLOBAL)
    for request, why in [
        (preflight_head("/api/x", "https://evil.com", "GET"), "origin"),
        (preflight_head("/api/x", APP, "PURGE"), "method PURGE"),
        (preflight_head("/api/x", APP, "GET", "Access-Control-Request-Headers: x-no"), "x-no"),
    ]:
        resp = await raw_request(gw.port, request)
        assert resp.status == 403, resp.body
        assert acao(resp) is None
        assert why in resp.json()["error_description"]
    assert emulator.calls == 0
    assert counting.requests == []


async def test_options_without_preflight_headers_is_an_ordinary_request(
    emulator: Emulator, counting: Upstream, start_gateway: StartGateway
) -> None:
    emulator.add_token("tok-a", scopes=[])
    gw = await start_gateway(e2e_routes(counting.url), cors=GLOBAL)
    # Origin, but no Access-Control-Request-Method: needs a token like any request
    resp = await raw_request(
        gw.port, head("OPTIONS", "/api/x", f"Origin: {APP}", "Connection: close")
    )
    assert resp.status == 401
    assert acao(resp) == APP
    resp = await raw_request(
        gw.port,
        head(
            "OPTIONS",
            "/api/x",
            f"Origin: {APP}",
            "Authorization: Bearer tok-a",
            "Connection: close",
        ),
    )
    assert resp.status == 200
    assert counting.requests == [("OPTIONS", "/api/x")]
    assert emulator.calls == 1


async def test_refusals_carry_cors_headers_a_browser_can_read(
    emulator: Emulator, counting: Upstream, start_gateway: StartGateway
) -> None:
    emulator.add_token("tok-a", scopes=[])
    more = [
        {"path_prefix": "/scoped", "upstream": counting.url, "scopes": ["admin"],
         "max_body_bytes": 10},
        {"path_prefix": "/dead", "upstream": f"http://127.0.0.1:{free_port()}", "auth": "none"},
    ]  # fmt: skip
    gw = await start_gateway([*e2e_routes(counting.url), *more], cors=GLOBAL)
    origin = {"Origin": APP}
    missing = await get(gw.port, "/api/x", origin)
    assert missing.status == 401
    assert acao(missing) == APP
    assert missing.header("WWW-Authenticate") is not None
    exposed = missing.header("Access-Control-Expose-Headers") or ""
    assert "WWW-Authenticate" in exposed and "X-Total" in exposed and "X-Request-Id" in exposed
    assert missing.header("Vary") == "Origin"
    scope = await get(gw.port, "/scoped/x", {**origin, "Authorization": "Bearer tok-a"})
    assert scope.status == 403 and acao(scope) == APP
    not_found = await get(gw.port, "/nowhere", origin)  # no route: the global policy
    assert not_found.status == 404 and acao(not_found) == APP
    bad_path = await get(gw.port, "/api/%2e%2e%2f", origin)
    assert bad_path.status == 400 and acao(bad_path) == APP
    too_large = await raw_request(
        gw.port,
        head(
            "POST",
            "/scoped/x",
            f"Origin: {APP}",
            "Authorization: Bearer tok-a",
            "Content-Length: 100",
            "Connection: close",
        )
        + b"x" * 100,
    )
    assert too_large.status == 413 and acao(too_large) == APP
    emulator.override = Override(status=500)
    down = await get(gw.port, "/api/x", {**origin, "Authorization": "Bearer tok-b"})
    assert down.status == 503 and acao(down) == APP
    assert "Retry-After" in (down.header("Access-Control-Expose-Headers") or "")
    emulator.override = None
    dead = await get(gw.port, "/dead/x", origin)  # nothing listens there
    assert dead.status == 502 and acao(dead) == APP
    assert counting.requests == []


async def test_forwarded_answers_carry_the_gateways_policy_not_the_upstreams(
    emulator: Emulator, counting: Upstream, start_gateway: StartGateway
) -> None:
    emulator.add_token("tok-a", scopes=[])
    gw = await start_gateway(e2e_routes(counting.url), cors=GLOBAL)
    auth = {"Authorization": "Bearer tok-a"}
    ok = await get(gw.port, "/api/x", {"Origin": "https://deep.sub.example.org", **auth})
    assert ok.status == 200
    assert ok.json()["origin"] == "https://deep.sub.example.org"  # Origin still goes up
    assert acao(ok) == "https://deep.sub.example.org"
    assert ok.header("Access-Control-Expose-Headers") == "X-Total"
    assert ok.header("Access-Control-Allow-Methods") is None  # the upstream's is dropped
    assert [v for k, v in ok.headers if k.lower() == "vary"] == ["Accept-Encoding", "Origin"]
    # a disallowed origin: no CORS headers at all (the upstream's "*" is dropped too)
    evil = await get(gw.port, "/api/x", {"Origin": "https://example.org", **auth})
    assert evil.status == 200
    assert not [k for k, _ in evil.headers if k.lower().startswith("access-control-")]
    assert [v for k, v in evil.headers if k.lower() == "vary"] == ["Accept-Encoding", "Origin"]
    # no Origin: Vary only, on a route with a policy
    plain = await get(gw.port, "/api/x", auth)
    assert acao(plain) is None
    assert [v for k, v in plain.headers if k.lower() == "vary"] == ["Accept-Encoding", "Origin"]


async def test_route_override_replaces_the_global_policy(
    emulator: Emulator, counting: Upstream, start_gateway: StartGateway
) -> None:
    emulator.add_token("tok-a", scopes=[])
    gw = await start_gateway(e2e_routes(counting.url), cors=GLOBAL)
    # the global origin is not allowed on /partner: its section replaces the global one
    resp = await raw_request(gw.port, preflight_head("/partner/x", APP, "GET"))
    assert resp.status == 403
    resp = await raw_request(gw.port, preflight_head("/partner/x", "https://partner.test", "GET"))
    assert resp.status == 204
    assert acao(resp) == "https://partner.test"
    assert resp.header("Access-Control-Allow-Credentials") == "true"
    assert resp.header("Access-Control-Allow-Methods") == "GET"
    assert resp.header("Access-Control-Max-Age") is None  # not inherited either
    refused = await raw_request(
        gw.port, preflight_head("/partner/x", "https://partner.test", "POST")
    )
    assert refused.status == 403
    missing = await get(gw.port, "/partner/x", {"Origin": "https://partner.test"})
    assert missing.status == 401
    assert acao(missing) == "https://partner.test"
    assert missing.header("Access-Control-Allow-Credentials") == "true"
    assert emulator.calls == 0 and counting.requests == []


async def test_cors_off_on_a_route_leaves_it_to_the_upstream(
    emulator: Emulator, counting: Upstream, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(e2e_routes(counting.url), cors=GLOBAL)
    # the preflight is forwarded like any OPTIONS (here a public route), the upstream answers
    resp = await raw_request(gw.port, preflight_head("/own/x", APP, "GET"))
    assert resp.status == 200
    assert acao(resp) == "*"  # the upstream's own
    assert resp.header("Access-Control-Allow-Methods") == "TRACE"
    assert counting.requests == [("OPTIONS", "/own/x")]
    got = await get(gw.port, "/own/x", {"Origin": APP})
    assert acao(got) == "*"
    assert [v for k, v in got.headers if k.lower() == "vary"] == ["Accept-Encoding"]


async def test_preflight_is_routed_by_the_method_it_asks_about(
    emulator: Emulator, counting: Upstream, start_gateway: StartGateway
) -> None:
    routes = [
        {"name": "read", "path_prefix": "/items", "methods": ["GET"], "upstream": counting.url,
         "auth": "none", "cors": {"allow_origins": ["https://reader.test"]}},
        {"name": "write", "path_prefix": "/items", "methods": ["PUT", "DELETE"],
         "upstream": counting.url, "cors": {"allow_origins": [APP], "allow_methods": ["PUT"]}},
    ]  # fmt: skip
    gw = await start_gateway(routes)
    resp = await raw_request(gw.port, preflight_head("/items/1", APP, "PUT"))
    assert resp.status == 204 and acao(resp) == APP
    resp = await raw_request(gw.port, preflight_head("/items/1", "https://reader.test", "PUT"))
    assert resp.status == 403
    resp = await raw_request(gw.port, preflight_head("/items/1", "https://reader.test", "GET"))
    assert resp.status == 204 and acao(resp) == "https://reader.test"
    # DELETE goes to "write", whose policy does not allow it
    resp = await raw_request(gw.port, preflight_head("/items/1", APP, "DELETE"))
    assert resp.status == 403
    # no route takes PATCH there: an ordinary OPTIONS, which no route takes either (no global
    # policy: no CORS headers on the 404)
    resp = await raw_request(gw.port, preflight_head("/items/1", APP, "PATCH"))
    assert resp.status == 404 and acao(resp) is None
    assert counting.requests == [] and emulator.calls == 0


async def test_star_origin_without_credentials(
    emulator: Emulator, counting: Upstream, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(e2e_routes(counting.url), cors={"allow_origins": ["*"]})
    resp = await raw_request(gw.port, preflight_head("/public/x", "https://any.test", "GET"))
    assert resp.status == 204 and acao(resp) == "*"
    got = await get(gw.port, "/public/x", {"Origin": "https://any.test"})
    assert got.status == 200 and acao(got) == "*"
    assert got.header("Access-Control-Allow-Credentials") is None


async def test_requests_without_origin_on_routes_without_cors_are_untouched(
    emulator: Emulator, counting: Upstream, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(e2e_routes(counting.url))  # no cors anywhere
    got = await get(gw.port, "/public/x", {"Origin": APP})
    assert acao(got) == "*"  # the upstream's, relayed as before
    assert [v for k, v in got.headers if k.lower() == "vary"] == ["Accept-Encoding"]
    missing = await get(gw.port, "/api/x", {"Origin": APP})
    assert missing.status == 401 and acao(missing) is None and missing.header("Vary") is None
