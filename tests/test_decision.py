"""Decision mode over real sockets: the endpoint an ingress asks (nginx auth_request, Caddy
forward_auth, Traefik ForwardAuth, Envoy ext_authz), against the Authlete emulator and the
real gateway. Through real nginx and Caddy: tests/test_ingress.py."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.emulator import Emulator, Override
from tests.conftest import (
    Running,
    StartGateway,
    get,
    head,
    metric,
    raw_config,
    raw_request,
)

AUTH = "/_gateway/auth"
TRUSTED = {"trusted_proxies": ["127.0.0.1/32"]}


def _routes(upstream: str | None = None) -> list[dict[str, Any]]:
    up = {"upstream": upstream} if upstream else {}
    return [
        {"name": "public", "path_prefix": "/public", "auth": "none", **up},
        {"name": "admin", "path_prefix": "/admin", "scopes": ["admin"], **up},
        {"name": "writes", "path_prefix": "/api", "methods": ["POST"], "scopes": ["write"], **up},
        {"name": "api", "path_prefix": "/api", "scopes": ["read"], **up},
    ]


async def _decision_gateway(start_gateway: StartGateway, **overrides: Any) -> Running:
    settings: dict[str, Any] = {"decision": {}, **TRUSTED, **overrides}
    return await start_gateway(_routes(), **settings)


def _tokens(emulator: Emulator) -> None:
    emulator.add_token("reader", subject="alice", client_id=42, scopes=["read"])
    emulator.add_token("writer", subject=None, client_id=7, scopes=["read", "write"])


def nginx(uri: str, method: str = "GET", token: str | None = None, *extra: str) -> list[str]:
    """The decision request nginx's auth_request sends, as the shipped example sets it."""
    lines = [f"X-Original-URI: {uri}", f"X-Original-Method: {method}", *extra]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return lines


async def ask(gw: Running, *lines: str, target: str = AUTH, method: str = "GET") -> Any:
    return await raw_request(gw.port, head(method, target, "Connection: close", *lines))


# ------------------------------------------------------------------------------ answers


async def test_allowed_answers_200_with_identity_and_no_body(
    emulator: Emulator, start_gateway: StartGateway
) -> None:
    _tokens(emulator)
    gw = await _decision_gateway(start_gateway)
    resp = await ask(gw, *nginx("/api/items?x=1", token="reader"))
    assert resp.status == 200, resp.body
    assert resp.header("X-Auth-Subject") == "alice"
    assert resp.header("X-Auth-Scopes") == "read"
    assert resp.header("X-Auth-Client-Id") == "42"
    assert resp.header("Content-Length") == "0" and resp.body == b""
    assert resp.header("Cache-Control") == "no-store"
    assert resp.header("x-envoy-auth-headers-to-remove") is None
    # A token without a subject (client credentials): no subject header at all, and Envoy
    # (which copies only what an answer carries) is told to remove a client's copy of it.
    resp = await ask(gw, *nginx("/api/x", "POST", token="writer"))
    assert resp.status == 200
    assert resp.header("X-Auth-Subject") is None
    assert resp.header("X-Auth-Client-Id") == "7"
    assert resp.header("x-envoy-auth-headers-to-remove") == "x-auth-subject"
    resp = await ask(gw, *nginx("/public/x"))
    assert resp.status == 200
    assert resp.header("x-envoy-auth-headers-to-remove") == (
        "x-auth-subject, x-auth-scopes, x-auth-client-id"
    )


async def test_denials_are_the_proxy_modes_own(
    emulator: Emulator, start_gateway: StartGateway, upstream: str
) -> None:
    """Status, challenge, Retry-After and JSON body: the same as proxy mode sends for the
    same request (the proxy here has the same routes, with an upstream)."""
    _tokens(emulator)
    gw = await _decision_gateway(start_gateway)
    proxy = await start_gateway(_routes(upstream))
    cases = [
        ("/api/x", "GET", None),  # no token: 401 realm challenge
        ("/api/x", "GET", "unknown-token"),  # inactive: 401 invalid_token
        ("/admin/x", "GET", "reader"),  # 403 insufficient_scope
        ("/api/x", "POST", "reader"),  # the POST route needs write: 403
        ("/nowhere", "GET", "reader"),  # 404
    ]
    for uri, method, token in cases:
        decided = await ask(gw, *nginx(uri, method, token))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        lines = [f"{k}: {v}" for k, v in headers.items()]
        proxied = await raw_request(proxy.port, head(method, uri, "Connection: close", *lines))
        assert decided.status == proxied.status != 200, (uri, method, decided.status)
        for name in ("WWW-Authenticate", "Content-Type", "Cache-Control"):
            assert decided.header(name) == proxied.header(name), (uri, name)
        assert decided.json() == proxied.json()
    assert (await ask(gw, *nginx("/api/x"))).header("WWW-Authenticate") == 'Bearer realm="test"'


async def test_public_route_allows_without_token_and_without_identity(
    emulator: Emulator, start_gateway: StartGateway
) -> None:
    _tokens(emulator)
    gw = await _decision_gateway(start_gateway)
    for token in (None, "reader", "garbage"):
        resp = await ask(gw, *nginx("/public/page", "POST", token))
        assert resp.status == 200
        assert resp.header("X-Auth-Subject") is None and resp.header("X-Auth-Scopes") is None
    assert emulator.calls_for("garbage") == 0  # a public route asks Authlete nothing


async def test_authlete_down_is_503_with_retry_after(
    emulator: Emulator, start_gateway: StartGateway
) -> None:
    _tokens(emulator)
    gw = await _decision_gateway(start_gateway, authlete={"retries": 0})
    emulator.override = Override(status=500)
    resp = await ask(gw, *nginx("/api/x", token="reader"))
    assert resp.status == 503
    assert resp.header("Retry-After") is not None
    assert resp.json()["error"] == "temporarily_unavailable"


async def test_every_dialect_decides_the_same(
    emulator: Emulator, start_gateway: StartGateway
) -> None:
    _tokens(emulator)
    gw = await _decision_gateway(start_gateway)
    bearer = "Authorization: Bearer reader"
    forms: dict[str, tuple[str, list[str], str]] = {
        "nginx": ("GET", ["X-Original-URI: {u}", "X-Original-Method: {m}", bearer], AUTH),
        "ingress-nginx": (
            "GET",
            ["X-Original-URL: https://gateway.test{u}", "X-Original-Method: {m}", bearer],
            AUTH,
        ),
        "traefik": (
            "GET",
            [
                "X-Forwarded-Method: {m}",
                "X-Forwarded-Uri: {u}",
                "X-Forwarded-Host: gateway.test",
                "X-Forwarded-Proto: https",
                bearer,
            ],
            AUTH,
        ),
        "envoy": ("{m}", [bearer], AUTH + "{u}"),
    }
    for name, (method, lines, target) in forms.items():
        for uri, verb, status in (
            ("/api/x?q=1", "GET", 200),
            ("/admin", "GET", 403),
            ("/api/x", "POST", 403),
            ("/admin/../public/x", "GET", 400),  # not in normal form: see below
        ):
            resp = await ask(
                gw,
                *(line.format(u=uri, m=verb) for line in lines),
                target=target.format(u=uri),
                method=method.format(m=verb),
            )
            assert resp.status == status, (name, uri, verb, resp.body)


@pytest.mark.parametrize(
    "uri",
    [
        "/public/..%2fadmin",
        "/public%2f..%2fadmin",
        "//admin",
        "/public/..;/admin",
        "/public/%2e%2e;x/admin",
        "/admin%00",
        "/public/\\..\\admin",
        "http://gateway.test/admin",
        "*",
        "admin",
    ],
)
async def test_path_tricks_are_refused_as_in_proxy_mode(
    emulator: Emulator, start_gateway: StartGateway, upstream: str, uri: str
) -> None:
    """The described URI goes through the proxy's own table: the same 400s, never a 200."""
    gw = await _decision_gateway(start_gateway)
    proxy = await start_gateway(_routes(upstream))
    decided = await ask(gw, *nginx(uri))
    assert decided.status == 400, decided.body
    if uri.startswith("/"):
        proxied = await raw_request(proxy.port, head("GET", uri, "Connection: close"))
        assert proxied.status == 400
        assert decided.json() == proxied.json()


@pytest.mark.parametrize(
    "uri",
    ["/admin/../public/x", "/admin/%2e%2e/public/x", "/admin/./x", "/%70ublic/x", "/api/%7ex"],
)
async def test_targets_not_in_normal_form_are_refused(
    emulator: Emulator, start_gateway: StartGateway, uri: str
) -> None:
    """Proxy mode forwards the normalised path, so it can decide on it; an ingress forwards
    the target as sent, so a decision on its normal form would check one path and let the
    upstream serve another (`/admin/../public/x` checked as the public route)."""
    _tokens(emulator)
    gw = await _decision_gateway(start_gateway)
    for token in (None, "reader"):
        resp = await ask(gw, *nginx(uri, token=token))
        assert resp.status == 400, (uri, token, resp.body)
        assert "normal form" in resp.json()["error_description"]
    # The same request in normal form is decided.
    assert (await ask(gw, *nginx("/public/x"))).status == 200


async def test_methods_the_proxy_refuses_are_refused(
    emulator: Emulator, start_gateway: StartGateway
) -> None:
    _tokens(emulator)
    gw = await _decision_gateway(start_gateway)
    assert (await ask(gw, *nginx("/public/x", "CONNECT"))).status == 405
    assert (await ask(gw, *nginx("/public/x", "TRACE"))).status == 405
    assert (await ask(gw, *nginx("/public/x", "get"))).status == 400
    assert (await ask(gw, *nginx("/public/x", "BREW"))).status == 400


# ------------------------------------------------------------------------------ trust


async def test_untrusted_peer_gets_403_and_a_log_line(
    emulator: Emulator, start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    _tokens(emulator)
    gw = await _decision_gateway(start_gateway, trusted_proxies=["10.0.0.0/8"])
    caplog.set_level(logging.WARNING, logger="gateway")
    for lines in (nginx("/public/x"), nginx("/api/x", token="reader")):
        resp = await ask(gw, *lines)
        assert resp.status == 403
        assert resp.json()["error"] == "forbidden"
        assert resp.header("WWW-Authenticate") is None
    assert any("trusted_proxies" in r.getMessage() for r in caplog.records)
    assert "reader" not in caplog.text
    assert emulator.calls_for("reader") == 0


async def test_a_client_cannot_choose_the_checked_path(
    emulator: Emulator, start_gateway: StartGateway
) -> None:
    """The ingress sets the description; a client's own copy of another dialect's header
    (passed through by the ingress) makes the request ambiguous: 400, never the client's."""
    _tokens(emulator)
    gw = await _decision_gateway(start_gateway)
    for extra in (
        "X-Forwarded-Uri: /public/x",
        "X-Original-URL: http://gateway.test/public/x",
        "X-Forwarded-Method: GET",  # the request was a POST (the writes route)
        "X-Forwarded-Host: other.test",
        "X-Original-URI: /public/x",  # a second copy
    ):
        resp = await ask(gw, *nginx("/admin/x", "POST", "reader", extra))
        assert resp.status == 400, (extra, resp.status)
        assert "unclear" in resp.json()["error_description"]
    # Without a description at all: 400, not the decision path itself.
    assert (await ask(gw, "Authorization: Bearer reader")).status == 400
    assert (await ask(gw, "X-Original-URI: /public/x")).status == 400  # no method


async def test_hosts_decide_on_the_described_host(
    emulator: Emulator, start_gateway: StartGateway
) -> None:
    _tokens(emulator)
    routes = [
        {"path_prefix": "/", "hosts": ["public.test"], "auth": "none"},
        {"path_prefix": "/", "scopes": ["admin"]},
    ]
    gw = await start_gateway(routes, decision={}, **TRUSTED)
    lines = ["X-Forwarded-Uri: /x", "X-Forwarded-Method: GET"]
    resp = await ask(gw, *lines, "X-Forwarded-Host: public.test")
    assert resp.status == 200
    resp = await ask(gw, *lines, "X-Forwarded-Host: api.test")
    assert resp.status == 401
    resp = await ask(gw, *lines, "X-Forwarded-Host: bad host!")
    assert resp.status == 400


# ------------------------------------------------------------------------------ the endpoint


async def test_decision_only_routes_are_never_proxied(
    emulator: Emulator, start_gateway: StartGateway, upstream: str
) -> None:
    routes = [
        {"name": "checked", "path_prefix": "/api", "auth": "none"},
        {"name": "proxied", "path_prefix": "/", "upstream": upstream, "auth": "none"},
    ]
    gw = await start_gateway(routes, decision={}, **TRUSTED)
    # Proxied: the decision-only route is invisible; the catch-all takes /api.
    resp = await get(gw.port, "/api/x")
    assert resp.status == 200 and json.loads(resp.body)["path"] == "/api/x"
    resp = await ask(gw, *nginx("/api/x"))
    assert resp.status == 200 and resp.body == b""
    assert metric(gw, "gateway_decisions_total", route="checked", method="GET", status="200") == 1


async def test_queries_bodies_head_and_keep_alive(
    emulator: Emulator, start_gateway: StartGateway
) -> None:
    _tokens(emulator)
    gw = await _decision_gateway(start_gateway)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        # ingress-nginx may put a query on the auth URL; a body is read and dropped; HEAD
        # gets no body; the connection serves the next decision.
        writer.write(
            head("POST", AUTH + "?rd=/x", "Content-Length: 5", *nginx("/api/x", token="reader"))
            + b"hello"
            + head("HEAD", AUTH, *nginx("/api/x"))
            + head("GET", AUTH, "Connection: close", *nginx("/public"))
        )
        await writer.drain()
        got = await asyncio.wait_for(reader.read(), 5)  # until the gateway closes
    finally:
        writer.close()
    statuses = [int(part[:3]) for part in got.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [200, 401, 200], got
    second = got.split(b"HTTP/1.1 ")[2]
    assert second.endswith(b"\r\n\r\n"), "a HEAD answer carries no body"


async def test_decision_listen_answers_decisions_only_there(
    emulator: Emulator, start_gateway: StartGateway, upstream: str
) -> None:
    _tokens(emulator)
    routes = [
        {"name": "api", "path_prefix": "/api", "scopes": ["read"]},
        {"name": "site", "path_prefix": "/", "upstream": upstream, "auth": "none"},
    ]
    gw = await start_gateway(routes, decision_listen="127.0.0.1:0", **TRUSTED)
    port = gw.gateway.decision_port
    assert port and port != gw.port
    resp = await raw_request(port, head("GET", AUTH, "Connection: close", *nginx("/api/x")))
    assert resp.status == 401
    resp = await raw_request(
        port, head("GET", AUTH, "Connection: close", *nginx("/api/x", token="reader"))
    )
    assert resp.status == 200 and resp.header("X-Auth-Subject") == "alice"
    # Anything else on the decision listener: 404, never proxied.
    resp = await raw_request(port, head("GET", "/", "Connection: close"))
    assert resp.status == 404
    # The proxy listener has no decision endpoint: the path is an ordinary one.
    resp = await get(gw.port, AUTH)
    assert resp.status == 200 and json.loads(resp.body)["path"] == AUTH


async def test_metrics_count_decisions_apart_and_share_the_cache(
    emulator: Emulator, start_gateway: StartGateway
) -> None:
    _tokens(emulator)
    gw = await _decision_gateway(start_gateway)
    for _ in range(3):
        assert (await ask(gw, *nginx("/api/x", "PUT", "reader"))).status == 200
    assert (await ask(gw, *nginx("/admin", "GET", "reader"))).status == 403
    assert (await ask(gw, "X-Original-URI: /x")).status == 400
    assert metric(gw, "gateway_decisions_total", route="api", method="PUT", status="200") == 3
    assert metric(gw, "gateway_decisions_total", route="admin", method="GET", status="403") == 1
    assert metric(gw, "gateway_decisions_total", route="(none)", method="GET", status="400") == 1
    assert metric(gw, "gateway_decision_duration_seconds_count", route="api") == 3
    assert metric(gw, "gateway_requests_total", route="api", method="PUT", status="200") == 0
    assert emulator.calls_for("reader") == 1
    assert metric(gw, "gateway_cache_requests_total", result="hit") == 3
    assert metric(gw, "gateway_cache_requests_total", result="miss") == 1


async def test_access_lines_say_decision_and_show_the_original_request(
    emulator: Emulator, start_gateway: StartGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    _tokens(emulator)
    gw = await _decision_gateway(start_gateway)
    await ask(gw, *nginx("/api/x?token=q", "DELETE", "reader"))
    gw.gateway._listener.access_log.flush()  # type: ignore[union-attr]
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    line = next(x for x in lines if x.get("mode") == "decision")
    assert line["route"] == "api" and line["method"] == "DELETE" and line["path"] == "/api/x"
    assert line["status"] == 200 and line["subject"] == "alice"
    assert "reader" not in json.dumps(lines)


# ------------------------------------------------------------------------------ config


def test_config_keys_and_their_errors() -> None:
    def problems(**overrides: Any) -> list[str]:
        import yaml

        routes = overrides.pop("routes", [{"path_prefix": "/api"}])
        text = yaml.safe_dump(raw_config("http://127.0.0.1:9", routes, **overrides))
        try:
            parse_config(text, env={})
        except ConfigError as exc:
            return exc.problems
        return []

    assert problems() == [
        "routes[0].upstream: is required (a route without one needs decision mode: `decision:`)"
    ]
    assert problems(decision={}) == []
    assert problems(decision=True) == []
    assert problems(decision_listen="127.0.0.1:0") == []
    assert problems(decision={"path": "/"}) == [
        'decision.path: must not be "/" (it would take every request)'
    ]
    assert problems(decision={"path": "auth"}) == ['decision.path: must start with "/"']
    assert problems(decision={"paths": "/x"})[0].startswith("decision")
    assert problems(decision={}, listen="127.0.0.1:8080", decision_listen="127.0.0.1:8080") == [
        "decision_listen: must differ from listen"
    ]
    assert problems(decision={}, routes=[{"path_prefix": "/a", "websocket": True}]) == [
        "routes[0].websocket: needs an upstream"
    ]
    assert problems(decision_listen="nope") == ['decision_listen: must be "host:port"']


def test_check_config_warns_about_decision_mode_pitfalls() -> None:
    import yaml

    from gateway.lint import warnings

    routes: list[dict[str, Any]] = [
        {"name": "checked", "path_prefix": "/api", "scopes": ["read"]},
        {"name": "site", "path_prefix": "/", "upstream": "http://site.svc:8080", "auth": "none"},
    ]
    cfg = parse_config(yaml.safe_dump(raw_config("http://127.0.0.1:9", routes, decision={})), {})
    found = warnings(cfg)
    assert any("trusted_proxies is empty" in w for w in found), found
    shadow = next(w for w in found if "'checked'" in w)
    assert "taken by route 'site'" in shadow and "no token" in shadow
    trusted = raw_config("http://127.0.0.1:9", routes[:1], decision={}, **TRUSTED)
    assert warnings(parse_config(yaml.safe_dump(trusted), {})) == []


async def test_reload_moves_the_decision_path_and_turns_decision_mode_off(
    emulator: Emulator, start_gateway: StartGateway, tmp_path: Any
) -> None:
    import yaml

    _tokens(emulator)
    gw = await _decision_gateway(start_gateway)
    assert (await ask(gw, *nginx("/public/x"))).status == 200

    def reload(**overrides: Any) -> None:
        doc = raw_config(emulator.base_url, _routes(), **TRUSTED, **overrides)
        doc["listen"] = f"127.0.0.1:{gw.port}"
        doc["admin_listen"] = f"127.0.0.1:{gw.gateway.admin_port}"
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(doc))
        assert gw.gateway.reload(str(path))

    reload(decision={"path": "/_auth"})
    assert (await ask(gw, *nginx("/public/x"), target="/_auth")).status == 200
    # The old path is an ordinary one now: no route takes it.
    assert (await ask(gw, *nginx("/public/x"))).status == 404
    # Without decision mode, decision-only routes are not allowed: the reload is refused.
    doc = raw_config(emulator.base_url, _routes(), **TRUSTED)
    (tmp_path / "off.yaml").write_text(yaml.safe_dump(doc))
    assert not gw.gateway.reload(str(tmp_path / "off.yaml"))
    assert (await ask(gw, *nginx("/public/x"), target="/_auth")).status == 200
