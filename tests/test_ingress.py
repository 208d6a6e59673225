"""Decision mode behind a real nginx and a real Caddy (issue 13), each running the config
shipped in examples/ with only its placeholder addresses replaced: the same contract cases
through each ingress as through the gateway in proxy mode.

Every request goes over loopback: client -> nginx/Caddy -> the gateway's decision endpoint
(in decision mode, routes without upstreams) -> the Authlete emulator, then nginx/Caddy ->
a raw upstream that records every request head it receives. In proxy mode the same client
requests go to a gateway with the same routes, each to that upstream.

The cases: a valid token reaches the application with the identity headers; a client's own
identity headers (any spelling) never do, on protected and public routes alike; no token,
an inactive token and a missing scope get the proxy mode's 401/403 with its challenge; a down
Authlete gets 503 with Retry-After; path tricks are refused or checked as the gateway's table
says and never reach the application unchecked; a client cannot choose the checked path,
method or host with the other dialects' description headers; no token on a public route
passes without identity. Then what only an ingress has: a gateway that cannot be reached
(503, never an allow), an ingress the gateway does not trust (403), and the decision endpoint
refusing a peer outside trusted_proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.emulator import Emulator
from tests.conftest import (
    Ingress,
    MakeUpstream,
    RawResponse,
    RawUpstream,
    Running,
    StartGateway,
    UpRequest,
    chunked,
    echo_answer,
    free_port,
    http,
    metric,
    raw_request,
    start_caddy,
    start_nginx,
)

VIAS = ["proxy", "nginx", "caddy"]
INGRESSES = ["nginx", "caddy"]
DECISION_PATH = "/_gateway/auth"
TRUSTED = ["127.0.0.1/32"]  # the ingress: nginx and Caddy connect from loopback
REALM_CHALLENGE = 'Bearer realm="test"'  # conftest's configs say realm: test
IDENTITY = ("x-auth-subject", "x-auth-scopes", "x-auth-client-id")

# A client's own identity headers, in the spellings frameworks read as the real ones (any
# case; `_` for `-`, which WSGI/CGI environ names and nginx's $http_* do not tell apart).
SPOOFED = [
    "X-Auth-Subject: mallory",
    "x-auth-subject: mallory-lower",
    "X_Auth_Subject: mallory-underscore",
    "X-Auth_Subject: mallory-mixed",
    "X-AUTH-SCOPES: admin write",
    "X_Auth_Scopes: admin",
    "X-Auth-Client-Id: 666",
    "X_Auth_Client_Id: 667",
    "X-Auth-Client_Id: 668",
]


def routes(upstream: str | None) -> list[dict[str, Any]]:
    """The route table of both modes; decision mode has no upstreams at all."""
    up = {"upstream": upstream} if upstream else {}
    return [
        {"name": "open", "path_prefix": "/", "hosts": ["open.test"], "auth": "none", **up},
        {"name": "public", "path_prefix": "/public", "auth": "none", **up},
        {"name": "admin", "path_prefix": "/admin", "scopes": ["admin"], **up},
        {"name": "writes", "path_prefix": "/api", "methods": ["POST"], "scopes": ["write"], **up},
        {"name": "api", "path_prefix": "/api", "scopes": ["read"], **up},
    ]


def add_tokens(emulator: Emulator) -> None:
    emulator.add_token("reader", subject="alice", client_id=42, scopes=["read"])
    emulator.add_token("writer", subject=None, client_id=7, scopes=["read", "write"])
    emulator.add_token("root", subject="root", client_id=1, scopes=["admin", "read"])


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def request_bytes(
    method: str, target: str, *lines: str, host: str = "gateway.test", body: bytes = b""
) -> bytes:
    head = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close", *lines]
    framed = any(line.lower().startswith("transfer-encoding:") for line in lines)
    if not framed and (body or method in ("POST", "PUT")):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def bearer(token: str | None) -> list[str]:
    return [] if token is None else [f"Authorization: Bearer {token}"]


@dataclass
class Stack:
    """Where a client talks (the ingress, or the gateway itself in proxy mode) and the
    application behind it."""

    via: str
    port: int
    app: RawUpstream
    gateway: Running
    ingress: Ingress | None = None

    async def send(
        self,
        method: str,
        target: str,
        *lines: str,
        host: str = "gateway.test",
        body: bytes = b"",
    ) -> RawResponse:
        data = request_bytes(method, target, *lines, host=host, body=body)
        return await raw_request(self.port, data)

    def why(self, resp: RawResponse) -> str:
        """Context for a failed assertion: the answer, and what the ingress logged."""
        log = self.ingress.log() if self.ingress is not None else ""
        return f"{self.via}: {resp.status} {resp.headers} {resp.body[:300]!r}\n{log}"


@contextlib.contextmanager
def ingress(via: str, gateway_port: int, app_port: int) -> Iterator[Ingress]:
    start = start_nginx if via == "nginx" else start_caddy
    with start(gateway_port, app_port) as running:
        yield running


@pytest.fixture(params=VIAS)
async def stack(
    request: pytest.FixtureRequest,
    emulator: Emulator,
    start_gateway: StartGateway,
    raw_upstream: MakeUpstream,
) -> AsyncIterator[Stack]:
    add_tokens(emulator)
    app = await raw_upstream(http(echo_answer))
    via: str = request.param
    if via == "proxy":
        gw = await start_gateway(routes(app.url))
        yield Stack(via, gw.port, app, gw)
        return
    gw = await start_gateway(routes(None), decision={}, trusted_proxies=TRUSTED)
    with ingress(via, gw.port, port_of(app.url)) as running:
        yield Stack(via, running.port, app, gw, running)


def identity(req: UpRequest) -> dict[str, list[bytes]]:
    """Every header the application got that it could read as an identity header (any case,
    `_` for `-`), by canonical name, values in order."""
    out: dict[str, list[bytes]] = {}
    for name, value in req.headers:
        key = name.decode("latin-1").lower().replace("_", "-")
        if key in IDENTITY:
            out.setdefault(key, []).append(value)
    return out


def only_request(stack: Stack, resp: RawResponse) -> UpRequest:
    assert resp.status == 200, stack.why(resp)
    assert len(stack.app.requests) == 1, [r.raw_head for r in stack.app.requests]
    return stack.app.requests[0]


def assert_refused(stack: Stack, resp: RawResponse, status: int, error: str) -> None:
    """A refusal as proxy mode sends it: status, JSON body with `error`, and the request
    never reached the application."""
    assert resp.status == status, stack.why(resp)
    content_type = resp.header("Content-Type") or ""
    assert content_type.startswith("application/json"), stack.why(resp)
    doc = resp.json()
    assert doc["error"] == error, stack.why(resp)
    assert isinstance(doc["error_description"], str) and doc["error_description"]
    assert stack.app.requests == [], [r.raw_head for r in stack.app.requests]


def challenges(resp: RawResponse) -> list[str]:
    return [v for k, v in resp.headers if k.lower() == "www-authenticate"]


# =========================================================================== allowed


async def test_valid_token_reaches_the_app_with_identity(stack: Stack) -> None:
    resp = await stack.send("GET", "/api/items?x=1&y=%2F", *bearer("reader"))
    req = only_request(stack, resp)
    assert (req.method, req.target) == ("GET", "/api/items?x=1&y=%2F")
    assert identity(req) == {
        "x-auth-subject": [b"alice"],
        "x-auth-scopes": [b"read"],
        "x-auth-client-id": [b"42"],
    }
    names = [name for name, _ in req.headers if name.lower().startswith(b"x-auth")]
    assert sorted(names) == [b"X-Auth-Client-Id", b"X-Auth-Scopes", b"X-Auth-Subject"], names
    # Through an ingress the gateway answered a decision about this request and forwarded
    # nothing itself; in proxy mode it forwarded the request.
    counted = {"route": "api", "method": "GET", "status": "200"}
    decisions = metric(stack.gateway, "gateway_decisions_total", **counted)
    proxied = metric(stack.gateway, "gateway_requests_total", **counted)
    assert (decisions, proxied) == ((0.0, 1.0) if stack.via == "proxy" else (1.0, 0.0))


async def test_post_body_reaches_the_app_and_a_token_without_subject_sends_none(
    stack: Stack,
) -> None:
    """The decision request carries no body (nginx: proxy_pass_request_body off; Caddy: a
    GET), so the application still gets all of it; a client-credentials token has no
    subject, so no X-Auth-Subject at all."""
    body = b'{"order": 1}' * 100
    resp = await stack.send("POST", "/api/orders", *bearer("writer"), body=body)
    req = only_request(stack, resp)
    assert (req.method, req.target) == ("POST", "/api/orders")
    assert bytes(req.body) == body and req.complete
    assert identity(req) == {"x-auth-scopes": [b"read write"], "x-auth-client-id": [b"7"]}
    # A chunked body: the decision request must not inherit Transfer-Encoding (the gateway
    # would wait for a body that never comes), the application must get the body whole.
    head = request_bytes("POST", "/api/orders", *bearer("writer"), "Transfer-Encoding: chunked")
    resp = await raw_request(stack.port, head + chunked(body, 500))
    assert resp.status == 200, stack.why(resp)
    req = stack.app.requests[-1]
    assert len(stack.app.requests) == 2 and req.method == "POST"
    assert bytes(req.body) == body and req.complete


async def test_public_route_passes_without_token_and_without_identity(stack: Stack) -> None:
    resp = await stack.send("GET", "/public/page?q=1")
    req = only_request(stack, resp)
    assert req.target == "/public/page?q=1"
    assert identity(req) == {}
    # A route chosen by Host (hosts: [open.test]) decides on the original Host.
    resp = await stack.send("GET", "/admin/anything", host="open.test")
    assert resp.status == 200, stack.why(resp)
    assert stack.app.requests[-1].target == "/admin/anything"
    assert identity(stack.app.requests[-1]) == {}


# =========================================================================== spoofed identity


@pytest.mark.parametrize(
    ("method", "target", "token", "host", "expected"),
    [
        pytest.param(
            "GET",
            "/api/x",
            "reader",
            "gateway.test",
            {"x-auth-subject": [b"alice"], "x-auth-scopes": [b"read"], "x-auth-client-id": [b"42"]},
            id="protected",
        ),
        pytest.param(
            "POST",
            "/api/x",
            "writer",
            "gateway.test",
            {"x-auth-scopes": [b"read write"], "x-auth-client-id": [b"7"]},
            id="no-subject",
        ),
        pytest.param("GET", "/public/x", None, "gateway.test", {}, id="public-no-token"),
        pytest.param("GET", "/public/x", "reader", "gateway.test", {}, id="public-token"),
        pytest.param("GET", "/admin/x", None, "open.test", {}, id="public-by-host"),
    ],
)
async def test_client_identity_headers_never_reach_the_app(
    stack: Stack,
    method: str,
    target: str,
    token: str | None,
    host: str,
    expected: dict[str, list[bytes]],
) -> None:
    """Only the decision's identity reaches the application: every client copy is removed,
    whatever its spelling, including where the decision has none to give (a token without
    subject, a public route)."""
    resp = await stack.send(method, target, *bearer(token), *SPOOFED, host=host, body=b"")
    req = only_request(stack, resp)
    assert identity(req) == expected, req.raw_head


# =========================================================================== refused


async def test_no_token_gets_401_with_the_realm_challenge(stack: Stack) -> None:
    resp = await stack.send("GET", "/api/items")
    assert_refused(stack, resp, 401, "invalid_token")
    assert challenges(resp) == [REALM_CHALLENGE], stack.why(resp)


async def test_inactive_token_gets_401_invalid_token(stack: Stack, emulator: Emulator) -> None:
    resp = await stack.send("GET", "/api/items", *bearer("never-issued"))
    assert_refused(stack, resp, 401, "invalid_token")
    [challenge] = challenges(resp)
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge, challenge
    assert emulator.calls_for("never-issued") == 1  # decided by Authlete, not by the ingress


@pytest.mark.parametrize(
    ("method", "target", "scope"),
    [("GET", "/admin/users", "admin"), ("POST", "/api/orders", "write")],
    ids=["admin", "write"],
)
async def test_missing_scope_gets_403_insufficient_scope(
    stack: Stack, method: str, target: str, scope: str
) -> None:
    resp = await stack.send(method, target, *bearer("reader"), body=b"")
    assert_refused(stack, resp, 403, "insufficient_scope")
    expected = f'Bearer error="insufficient_scope", scope="{scope}"'
    assert challenges(resp) == [expected], stack.why(resp)


async def test_no_route_gets_404(stack: Stack) -> None:
    resp = await stack.send("GET", "/nowhere", *bearer("reader"))
    assert_refused(stack, resp, 404, "not_found")


async def test_authlete_down_gets_503_with_retry_after(stack: Stack, emulator: Emulator) -> None:
    await emulator.stop()
    resp = await stack.send("GET", "/api/items", *bearer("reader"))
    assert_refused(stack, resp, 503, "temporarily_unavailable")
    retry_after = resp.header("Retry-After")
    assert retry_after is not None and retry_after.isdigit(), stack.why(resp)
    # A public route needs no Authlete: it still passes.
    resp = await stack.send("GET", "/public/x")
    assert resp.status == 200, stack.why(resp)


# =========================================================================== path tricks

# (target, token, status, error): what the gateway's table says of each (gateway/routing.py,
# tests/test_matching.py). Dot segments are resolved and the result is checked (`/public/../
# admin` is /admin: no token, 401); what could be read two ways is refused (400).
PATH_TRICKS = [
    ("/public/../admin/x", None, 401, "invalid_token"),
    ("/public/%2e%2e/admin/x", None, 401, "invalid_token"),
    ("/public/%2E%2E/admin/x", "reader", 403, "insufficient_scope"),
    ("/public/./../admin/x", None, 401, "invalid_token"),
    ("/admin%2fx", None, 400, "invalid_request"),
    ("/public/..%2fadmin/x", None, 400, "invalid_request"),
    ("/public%2f..%2fadmin/x", None, 400, "invalid_request"),
    ("/public%5c..%5cadmin/x", None, 400, "invalid_request"),
    ("//admin/x", None, 400, "invalid_request"),
    ("/public//x", None, 400, "invalid_request"),
    ("/public/..;/admin/x", None, 400, "invalid_request"),
    ("/public/%2e%2e;x/admin/x", None, 400, "invalid_request"),
]


@pytest.mark.parametrize(
    ("target", "token", "status", "error"), PATH_TRICKS, ids=[t[0] for t in PATH_TRICKS]
)
async def test_path_tricks_are_refused_and_never_reach_the_app(
    stack: Stack, target: str, token: str | None, status: int, error: str
) -> None:
    """Proxy mode resolves dot segments and decides on (and forwards) the result; behind an
    ingress, which forwards the target as sent, a target not in normal form is refused."""
    if stack.via != "proxy" and "." in target.lower().replace("%2e", "."):
        status, error = 400, "invalid_request"
    resp = await stack.send("GET", target, *bearer(token))
    assert_refused(stack, resp, status, error)


# Targets whose dot segments lead from one route into another. The gateway resolves them and
# checks the result; proxy mode then forwards the resolved path, so the application routes
# exactly what was checked. An ingress forwards the target as the client sent it, and an
# application that does not resolve dot segments itself (Starlette, werkzeug route on the
# raw path) would route `/admin/../api/x`, checked as /api/x, to its /admin handler.
DOT_SEGMENTS = [
    ("/admin/../api/x", "reader"),
    ("/admin/%2e%2e/api/x", "reader"),
    ("/admin/x/../../public/x", None),
    ("/admin/%2E%2E/public/x", None),
    ("/admin/./../public/x", None),
]


@pytest.mark.parametrize(("target", "token"), DOT_SEGMENTS, ids=[t[0] for t in DOT_SEGMENTS])
async def test_app_never_gets_a_path_other_than_the_checked_one(
    stack: Stack, target: str, token: str | None
) -> None:
    """Refused, or forwarded with its dot segments resolved: never allowed while the
    application gets dot segments to resolve (or not) its own way."""
    resp = await stack.send("GET", target, *bearer(token))
    for req in stack.app.requests:
        path = req.target.partition("?")[0]
        segments = path.lower().replace("%2e", ".").split("/")
        assert "." not in segments and ".." not in segments, (
            f"{stack.via}: {target} was allowed ({resp.status}) and the application got "
            f"{req.target}, not the path that was checked"
        )
    if not stack.app.requests:
        assert resp.status == 400, stack.why(resp)


# =========================================================================== description


# Headers of the other dialects, sent by the client to make a protected request look like a
# public one (a published forward-auth bypass trusted a client's X-Forwarded-Uri).
CHOSEN = [
    ["X-Forwarded-Uri: /public/x"],
    ["X-Original-URI: /public/x"],
    ["X-Original-URL: http://gateway.test/public/x"],
    ["X-Original-URL: http://open.test/admin/x"],
    ["X-Forwarded-Host: open.test"],
    ["X-Forwarded-Uri: /public/x", "X-Forwarded-Method: GET", "X-Forwarded-Host: gateway.test"],
    ["X-Original-URI: /public/x", "X-Original-Method: GET", "X-Forwarded-Uri: /public/x"],
]


@pytest.mark.parametrize("lines", CHOSEN, ids=["; ".join(c) for c in CHOSEN])
async def test_client_cannot_choose_the_checked_request(stack: Stack, lines: list[str]) -> None:
    """No token, a protected path: whatever the client says the request is, it is refused
    and the application sees nothing."""
    resp = await stack.send("GET", "/admin/x", *lines)
    assert_refused(stack, resp, 401, "invalid_token")
    assert challenges(resp) == [REALM_CHALLENGE], stack.why(resp)
    assert stack.app.requests == [], [r.raw_head for r in stack.app.requests]


async def test_client_cannot_choose_the_checked_method(stack: Stack) -> None:
    """POST /api needs `write`: a reader saying its POST is a GET is still refused."""
    for lines in (["X-Original-Method: GET"], ["X-Forwarded-Method: GET"]):
        resp = await stack.send("POST", "/api/orders", *bearer("reader"), *lines, body=b"x")
        assert_refused(stack, resp, 403, "insufficient_scope")


# =========================================================================== ingress only


@pytest.mark.parametrize("via", INGRESSES)
async def test_unreachable_gateway_gets_503_never_an_allow(
    via: str, raw_upstream: MakeUpstream
) -> None:
    """Nothing listens where the gateway should: even a public path is refused, 503 with
    Retry-After and a JSON body (nginx would say 500, Caddy 502 with no body)."""
    app = await raw_upstream(http(echo_answer))
    with ingress(via, free_port(), port_of(app.url)) as running:
        for target, lines in (("/public/x", []), ("/api/x", bearer("reader"))):
            data = request_bytes("GET", target, *lines)
            resp = await raw_request(running.port, data)
            assert resp.status == 503, (via, resp.status, resp.body, running.log())
            assert (resp.header("Content-Type") or "").startswith("application/json")
            assert resp.json()["error"] == "temporarily_unavailable"
            retry_after = resp.header("Retry-After")
            assert retry_after is not None and retry_after.isdigit(), resp.headers
    assert app.requests == []


@pytest.mark.parametrize("via", INGRESSES)
async def test_ingress_outside_trusted_proxies_gets_403(
    via: str, emulator: Emulator, start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    """A gateway that does not trust this ingress refuses every decision, so the client
    gets 403 forbidden (no challenge: it is not about the token), never an allow."""
    add_tokens(emulator)
    app = await raw_upstream(http(echo_answer))
    gw = await start_gateway(routes(None), decision={}, trusted_proxies=["10.0.0.0/8"])
    with ingress(via, gw.port, port_of(app.url)) as running:
        for target, lines in (("/public/x", []), ("/api/x", bearer("reader"))):
            resp = await raw_request(running.port, request_bytes("GET", target, *lines))
            assert resp.status == 403, (via, resp.status, resp.body, running.log())
            assert resp.json()["error"] == "forbidden"
            assert challenges(resp) == []
    assert app.requests == []
    assert emulator.calls == 0


@pytest.mark.parametrize("via", INGRESSES)
async def test_examples_work_against_a_decision_listener(
    via: str, emulator: Emulator, start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    """`decision_listen`: decisions on a listener of their own, the shipped config pointed at
    it unchanged (only its placeholder address)."""
    add_tokens(emulator)
    app = await raw_upstream(http(echo_answer))
    gw = await start_gateway(
        routes(None), decision={}, decision_listen="127.0.0.1:0", trusted_proxies=TRUSTED
    )
    decision_port = gw.gateway.decision_port
    assert decision_port not in (0, gw.port)
    with ingress(via, decision_port, port_of(app.url)) as running:
        resp = await raw_request(running.port, request_bytes("GET", "/api/x", *bearer("reader")))
        assert resp.status == 200, (via, resp.status, resp.body, running.log())
        assert identity(app.requests[-1])["x-auth-subject"] == [b"alice"]
        resp = await raw_request(running.port, request_bytes("GET", "/api/x"))
        assert resp.status == 401 and challenges(resp) == [REALM_CHALLENGE], resp.headers
    assert len(app.requests) == 1


async def request_from(address: str, port: int, data: bytes) -> RawResponse:
    """`raw_request`, from a given loopback source address (127.0.0.0/8 is all local)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    return RawResponse(int(lines[0].split(" ")[1]), headers, body)


@pytest.mark.parametrize("via", VIAS)
async def test_per_client_quota_counts_the_real_client(
    via: str, emulator: Emulator, start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    """authlete.rate_limit.per_client behind an ingress: the quota is the client's (the
    address the ingress saw, the nearest X-Forwarded-For hop not in trusted_proxies), so a
    client rotating its own X-Forwarded-For gets no fresh quota. The client connects from
    127.0.0.2, outside trusted_proxies."""
    for n in range(3):
        emulator.add_token(f"fresh-{n}", subject=f"user{n}", client_id=n, scopes=["read"])
    app = await raw_upstream(http(echo_answer))
    quota = {"rate_limit": {"per_client": 1}}  # a burst of 1: the second miss is refused
    statuses: list[int] = []
    async with contextlib.AsyncExitStack() as exits:
        if via == "proxy":
            gw = await start_gateway(routes(app.url), authlete=quota)
            port = gw.port
        else:
            gw = await start_gateway(
                routes(None), decision={}, trusted_proxies=TRUSTED, authlete=quota
            )
            port = exits.enter_context(ingress(via, gw.port, port_of(app.url))).port
        for n in range(3):
            lines = [*bearer(f"fresh-{n}"), f"X-Forwarded-For: 203.0.113.{n}"]
            resp = await request_from("127.0.0.2", port, request_bytes("GET", "/api/x", *lines))
            statuses.append(resp.status)
            if resp.status == 503:
                assert resp.header("Retry-After") is not None, resp.headers
    assert statuses == [200, 503, 503], (via, statuses)
    assert emulator.calls == 1
    assert len(app.requests) == 1


async def test_decision_endpoint_refuses_a_peer_outside_trusted_proxies(
    emulator: Emulator, start_gateway: StartGateway
) -> None:
    """The same decision request: from 127.0.0.1 (trusted) it is answered, from 127.0.0.2
    403 forbidden without a challenge, whatever it describes and whatever token it carries."""
    add_tokens(emulator)
    gw = await start_gateway(routes(None), decision={}, trusted_proxies=TRUSTED)
    for uri, token in (("/public/x", None), ("/api/x", "reader")):
        data = request_bytes(
            "GET", DECISION_PATH, f"X-Original-URI: {uri}", "X-Original-Method: GET", *bearer(token)
        )
        trusted = await request_from("127.0.0.1", gw.port, data)
        assert trusted.status == 200, (trusted.status, trusted.body)
        untrusted = await request_from("127.0.0.2", gw.port, data)
        assert untrusted.status == 403, (untrusted.status, untrusted.body)
        assert untrusted.json()["error"] == "forbidden"
        assert challenges(untrusted) == []
        assert untrusted.header("X-Auth-Subject") is None
    assert emulator.calls_for("reader") == 1  # the untrusted request asked Authlete nothing
