"""End to end against real upstream servers: headers that frameworks and auth proxies read as
identity, client address, scheme, host or method never reach them from an untrusted client
(issue 10, section 4), obs-text values arrive byte for byte, and `forward_authorization`
decides whether an upstream ever sees the caller's token.

The upstreams are the ones these headers fool in practice: gunicorn+Flask (gunicorn answers
400 to contradictory scheme headers), uvicorn+Starlette, and nginx (whose `$http_x_remote_user`
matches `X_Remote_User` as well as `X-Remote-User`)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.emulator import Emulator
from tests.conftest import RawResponse, StartGateway, free_port, need_tool, raw_request, serve

Fields = list[tuple[bytes, bytes]]

# Headers an untrusted client sends to pass for someone, somewhere or something else. None of
# them may reach an upstream, whatever the spelling.
SPOOFS: Fields = [
    (b"X-Remote-User", b"mallory"),
    (b"Remote-User", b"mallory"),
    (b"X-Forwarded-User", b"mallory"),
    (b"X-Forwarded-Email", b"mallory@example.com"),
    (b"X-Forwarded-Groups", b"admins"),
    (b"X-Forwarded-Preferred-Username", b"mallory"),
    (b"X-Forwarded-Access-Token", b"stolen"),
    (b"X-Auth-Request-User", b"mallory"),
    (b"X-Auth-Request-Email", b"mallory@example.com"),
    (b"X-Auth-Request-Groups", b"admins"),
    (b"X-WebAuth-User", b"mallory"),
    (b"X-Authenticated-Userid", b"mallory"),
    (b"X-Consumer-Username", b"mallory"),
    (b"X-Amzn-Oidc-Identity", b"mallory"),
    (b"X-Goog-Authenticated-User-Email", b"accounts.google.com:mallory@example.com"),
    (b"X-MS-Client-Principal-Name", b"mallory"),
    (b"Cf-Access-Authenticated-User-Email", b"mallory@example.com"),
    (b"True-Client-IP", b"203.0.113.66"),
    (b"X-Client-IP", b"203.0.113.66"),
    (b"X-Real-IP", b"203.0.113.66"),
    (b"CF-Connecting-IP", b"203.0.113.66"),
    (b"Fastly-Client-IP", b"203.0.113.66"),
    (b"X-Cluster-Client-IP", b"203.0.113.66"),
    (b"Forwarded", b"for=203.0.113.66;proto=https"),
    (b"X-Forwarded-Scheme", b"https"),
    (b"X-Forwarded-Path", b"/admin"),
    (b"X-Forwarded-Port", b"443"),
    (b"X-Original-Host", b"admin.internal"),
    (b"X-Host", b"admin.internal"),
    (b"X-Original-URL", b"/admin"),
    (b"X-HTTP-Method-Override", b"DELETE"),
    (b"X-HTTP-Method", b"DELETE"),
    (b"X-Method-Override", b"DELETE"),
]
# The same claims in the spellings many servers read alike (`_` as `-`, any case).
SPELLINGS: Fields = [
    (b"x_remote_user", b"mallory"),
    (b"X_FORWARDED_USER", b"mallory"),
    (b"x-auth-request_user", b"mallory"),
    (b"TRUE_CLIENT_IP", b"203.0.113.66"),
    (b"x_http_method_override", b"DELETE"),
    (b"X_Forwarded_Ssl", b"on"),
]
SPOOFED = {n.decode().lower().replace("_", "-") for n, _ in SPOOFS + SPELLINGS}


def routes(upstream: str) -> list[dict[str, Any]]:
    return [
        {"name": "public", "path_prefix": "/public", "upstream": upstream, "auth": "none"},
        {
            "name": "public-sealed",
            "path_prefix": "/sealed",
            "upstream": upstream,
            "auth": "none",
            "forward_authorization": False,
        },
        {"name": "api", "path_prefix": "/api", "upstream": upstream},
        {
            "name": "api-sealed",
            "path_prefix": "/no-replay",
            "upstream": upstream,
            "forward_authorization": False,
        },
    ]


async def send(
    port: int, fields: Fields, target: bytes = b"/public/x", method: bytes = b"GET"
) -> RawResponse:
    """One request with exactly these header bytes (nothing normalised on the client side)."""
    head = [method + b" " + target + b" HTTP/1.1", b"Host: gateway.test", b"Connection: close"]
    head += [name + b": " + value for name, value in fields]
    return await raw_request(port, b"\r\n".join(head) + b"\r\n\r\n")


def seen(resp: RawResponse) -> dict[str, Any]:
    """What a framework upstream said it received."""
    assert resp.status == 200, resp.body[:500]
    data: dict[str, Any] = json.loads(resp.body)
    return data


def received(data: dict[str, Any], name: str) -> list[bytes]:
    """A header's values as the upstream got them on the wire: WSGI and ASGI servers hand
    them over decoded as latin-1, so encoding back gives the exact bytes."""
    want = name.lower().replace("_", "-")
    return [v.encode("latin-1") for k, v in data["headers"] if k.lower().replace("_", "-") == want]


def spoofed_names(data: dict[str, Any]) -> set[str]:
    got = {k.lower().replace("_", "-") for k, _ in data["headers"]}
    return got & SPOOFED


# --------------------------------------------------------------------------- gunicorn + Flask


@pytest.mark.parametrize(
    "claim",
    [
        (b"X-Forwarded-Ssl", b"on"),
        (b"X-FORWARDED-SSL", b"on"),
        (b"X-Forwarded-Protocol", b"ssl"),
    ],
    ids=["ssl", "ssl-upper", "protocol"],
)
async def test_gunicorn_is_not_handed_contradictory_scheme_headers(
    flask_upstream: str, start_gateway: StartGateway, claim: tuple[bytes, bytes]
) -> None:
    """gunicorn believes X-Forwarded-Proto/-Ssl/-Protocol from the gateway (127.0.0.1 is in its
    forwarded_allow_ips) and answers 400 when they disagree: a client's `X-Forwarded-Ssl: on`
    next to the gateway's `X-Forwarded-Proto: http` broke every request that carried it."""
    gw = await start_gateway(routes(flask_upstream))
    data = seen(await send(gw.port, [claim, (b"X-Control", b"kept")]))
    assert data["framework"] == "flask"
    assert data["scheme"] == "http"  # what the gateway saw, not what the client claimed
    assert received(data, claim[0].decode()) == []
    assert received(data, "X-Control") == [b"kept"]


async def test_flask_sees_no_spoofed_identity_or_client_facts(
    flask_upstream: str, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(routes(flask_upstream))
    data = seen(await send(gw.port, [*SPOOFS, (b"X-Control", b"kept")]))
    assert spoofed_names(data) == set()
    assert data["method"] == "GET"
    assert data["remote_user"] is None
    assert data["remote_addr"] == "127.0.0.1"
    assert received(data, "X-Control") == [b"kept"]


# --------------------------------------------------------------------------- uvicorn + Starlette


async def test_starlette_sees_no_spoofed_identity_client_address_or_method(
    starlette_upstream: str, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(routes(starlette_upstream))
    data = seen(await send(gw.port, [*SPOOFS, *SPELLINGS, (b"X-Control", b"kept")]))
    assert data["framework"] == "starlette"
    assert spoofed_names(data) == set()
    assert data["method"] == "GET"
    assert data["client"] == "127.0.0.1"  # uvicorn reads the gateway's X-Forwarded-For
    assert data["scheme"] == "http"
    assert received(data, "X-Control") == [b"kept"]


async def test_a_trusted_proxy_passes_identity_but_never_a_method_override(
    starlette_upstream: str, start_gateway: StartGateway
) -> None:
    """An ingress listed in trusted_proxies may have authenticated the user (oauth2-proxy,
    ALB OIDC, IAP): its identity and client-address headers go on. A method override is always
    the client's own wish, which a proxy relays unread: it goes nowhere."""
    gw = await start_gateway(routes(starlette_upstream), trusted_proxies=["127.0.0.0/8"])
    fields: Fields = [
        (b"X-Auth-Request-User", b"alice"),
        (b"X-Real-IP", b"203.0.113.7"),
        (b"X-HTTP-Method-Override", b"DELETE"),
        (b"X-Method-Override", b"DELETE"),
        (b"x_remote_user", b"mallory"),  # the ingress sets X-Remote-User, not this
    ]
    data = seen(await send(gw.port, fields))
    assert received(data, "X-Auth-Request-User") == [b"alice"]
    assert received(data, "X-Real-IP") == [b"203.0.113.7"]
    assert received(data, "X-HTTP-Method-Override") == []
    assert received(data, "X-Method-Override") == []
    assert received(data, "X-Remote-User") == []
    assert data["method"] == "GET"


async def test_configured_drop_and_allow_lists_reach_the_upstream(
    starlette_upstream: str, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(
        routes(starlette_upstream),
        headers={
            "drop_from_untrusted": ["X-Tenant", "x-internal-*"],
            "allow_from_untrusted": ["X-Real-IP"],
        },
    )
    fields: Fields = [
        (b"X-Tenant", b"other"),
        (b"x_tenant", b"other"),
        (b"X-Internal-Role", b"root"),
        (b"X-Real-IP", b"203.0.113.7"),
        (b"X-Internal", b"not-a-prefix-match"),
    ]
    data = seen(await send(gw.port, fields))
    assert received(data, "X-Tenant") == []
    assert received(data, "X-Internal-Role") == []
    assert received(data, "X-Real-IP") == [b"203.0.113.7"]
    assert received(data, "X-Internal") == [b"not-a-prefix-match"]


# --------------------------------------------------------------------------- obs-text

OBS_TEXT = [b"\x80abc", b"caf\xe9", b"\xff", b"a \x80\xfe z", b"\xc3\xa9t\xc3\xa9"]


@pytest.mark.parametrize("framework", ["flask", "starlette"])
async def test_obs_text_values_arrive_byte_for_byte(
    framework: str, request: pytest.FixtureRequest, start_gateway: StartGateway
) -> None:
    upstream: str = request.getfixturevalue(f"{framework}_upstream")
    gw = await start_gateway(routes(upstream))
    fields = [(b"X-Obs-%d" % i, value) for i, value in enumerate(OBS_TEXT)]
    data = seen(await send(gw.port, fields))
    assert data["framework"] == framework
    for name, value in fields:
        assert received(data, name.decode()) == [value]


# --------------------------------------------------------------------------- forward_authorization


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [(b"/public/x", True), (b"/sealed/x", False), (b"/api/x", True), (b"/no-replay/x", False)],
    ids=["public", "public-sealed", "api", "api-sealed"],
)
async def test_forward_authorization_decides_whether_the_upstream_sees_the_token(
    emulator: Emulator,
    starlette_upstream: str,
    start_gateway: StartGateway,
    target: bytes,
    forwarded: bool,
) -> None:
    emulator.add_token("tok-alice", subject="alice", client_id=42, scopes=["x"])
    gw = await start_gateway(routes(starlette_upstream))
    data = seen(
        await send(
            gw.port, [(b"Authorization", b"Bearer tok-alice"), (b"X-Control", b"kept")], target
        )
    )
    assert received(data, "Authorization") == ([b"Bearer tok-alice"] if forwarded else [])
    assert received(data, "X-Control") == [b"kept"]
    if target.startswith((b"/api", b"/no-replay")):
        assert received(data, "X-Auth-Subject") == [b"alice"]


async def test_auth_none_routes_forward_authorization_as_sent_unless_sealed(
    starlette_upstream: str, start_gateway: StartGateway
) -> None:
    """A public route neither reads nor judges the header: any scheme, several of them, all
    go on as sent; with `forward_authorization: false` none does."""
    gw = await start_gateway(routes(starlette_upstream))
    fields: Fields = [
        (b"Authorization", b"Basic bm90OmNoZWNrZWQ="),
        (b"X-Control", b"kept"),
        (b"authorization", b"Bearer not-a-known-token"),
    ]
    data = seen(await send(gw.port, fields))
    assert received(data, "Authorization") == [
        b"Basic bm90OmNoZWNrZWQ=",
        b"Bearer not-a-known-token",
    ]
    data = seen(await send(gw.port, fields, b"/sealed/"))
    assert received(data, "Authorization") == []
    assert received(data, "X-Control") == [b"kept"]


# --------------------------------------------------------------------------- nginx

_NGINX_VARS = [
    "http_x_remote_user",
    "http_remote_user",
    "http_x_forwarded_user",
    "http_x_forwarded_email",
    "http_x_auth_request_user",
    "http_x_auth_request_email",
    "http_x_webauth_user",
    "http_true_client_ip",
    "http_x_real_ip",
    "http_x_client_ip",
    "http_x_original_host",
    "http_x_http_method_override",
    "http_x_forwarded_ssl",
    "http_x_forwarded_for",
    "http_x_auth_subject",
    "http_x_control",
    "http_x_obs",
]


@pytest.fixture(scope="module")
def nginx_upstream() -> Iterator[str]:
    """nginx answering with the `$http_*` variables an nginx config would hand to a backend or
    test in an `if`. `underscores_in_headers on` makes `X_Remote_User` fill
    `$http_x_remote_user` too: nginx reads `_` and `-` alike there."""
    nginx = need_tool("nginx")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gw-nginx-") as tmp:
        body = "".join(f"{v}=[${v}]\\n" for v in _NGINX_VARS)
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = Path(tmp, "nginx.conf")
        conf.write_text(
            f"{user}worker_processes 1;\nerror_log {tmp}/error.log warn;\n"
            "events { worker_connections 64; }\n"
            "http {\n"
            "  access_log off;\n"
            "  underscores_in_headers on;\n"
            f"  client_body_temp_path {tmp}/body;\n"
            f"  proxy_temp_path {tmp}/proxy;\n"
            f"  fastcgi_temp_path {tmp}/fastcgi;\n"
            f"  uwsgi_temp_path {tmp}/uwsgi;\n"
            f"  scgi_temp_path {tmp}/scgi;\n"
            "  server {\n"
            f"    listen 127.0.0.1:{port};\n"
            "    location / {\n"
            "      default_type text/plain;\n"
            f'      return 200 "{body}";\n'
            "    }\n"
            "  }\n"
            "}\n"
        )
        argv = [nginx, "-p", tmp, "-e", f"{tmp}/error.log", "-c", str(conf)]
        with serve([*argv, "-g", f"daemon off; pid {tmp}/nginx.pid;"], port) as url:
            yield url


def nginx_vars(resp: RawResponse) -> dict[str, bytes]:
    assert resp.status == 200, resp.body[:500]
    out = {}
    for line in resp.body.split(b"\n"):
        if line:
            name, _, value = line.partition(b"=")
            assert value.startswith(b"[") and value.endswith(b"]"), line
            out[name.decode()] = value[1:-1]
    assert set(out) == set(_NGINX_VARS)
    return out


async def test_nginx_sees_no_spoofed_identity_in_any_spelling(
    nginx_upstream: str, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(routes(nginx_upstream))
    for fields in (SPOOFS, SPELLINGS, [(b"X_Auth_Subject", b"mallory")]):
        got = nginx_vars(await send(gw.port, [*fields, (b"X-Control", b"kept")]))
        assert got["http_x_control"] == b"kept"
        assert got["http_x_forwarded_for"] == b"127.0.0.1"
        spoofed = {
            k: v
            for k, v in got.items()
            if v and k not in {"http_x_control", "http_x_forwarded_for"}
        }
        assert spoofed == {}, fields


async def test_nginx_gets_obs_text_byte_for_byte(
    nginx_upstream: str, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(routes(nginx_upstream))
    for value in OBS_TEXT:
        got = nginx_vars(await send(gw.port, [(b"X-Obs", value)]))
        assert got["http_x_obs"] == value
