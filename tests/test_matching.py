"""Matching and rewriting (issue 12), over real sockets: `hosts:` on routes (and 421 when a
TLS connection's server name selects other routes than the Host), `strip_prefix` and the
upstream URL's base path, `preserve_host`, and Location/Content-Location rewriting against a
real framework (Flask under gunicorn)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from gateway.config import ConfigError
from tests.conftest import (
    RawResponse,
    StartGateway,
    free_port,
    header_values,
    make_config,
    raw_request,
    serve,
)
from tests.test_tls import Pki, pki, tls_config

__all__ = ["pki"]  # the TLS tests' certificates, as a fixture here too


def public(upstream: str, path_prefix: str = "/", **extra: Any) -> dict[str, Any]:
    return {"path_prefix": path_prefix, "upstream": upstream, "auth": "none", **extra}


async def send(
    port: int, target: str, host: str | None = "gateway.test", *lines: str
) -> RawResponse:
    head = [f"GET {target} HTTP/1.1", "Connection: close"]
    if host is not None:
        head.insert(1, f"Host: {host}")
    head += lines
    return await raw_request(port, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))


def seen_path(resp: RawResponse) -> str:
    assert resp.status == 200, (resp.status, resp.body[:300])
    path: str = resp.json()["path"]  # aiohttp's raw_path: path and query as received
    return path


# =========================================================================== hosts


async def test_hosts_choose_the_route_before_the_path(
    start_gateway: StartGateway, upstream: str
) -> None:
    """Each route sends to its own base path, so the echo's path tells which route matched.
    `*.example.com` matches any name under example.com (one label or more), not the apex;
    the Host is lower-cased and its port ignored; routes without hosts match any Host."""
    gw = await start_gateway(
        [
            public(f"{upstream}/exact", hosts=["api.example.com"], name="exact"),
            public(f"{upstream}/wild", hosts=["*.example.com"], name="wild"),
            public(f"{upstream}/apex", "/only", hosts=["example.com"], name="apex"),
            public(f"{upstream}/any", name="any"),
        ]
    )
    cases = {
        "api.example.com": "/exact/x",
        "API.Example.COM:8443": "/exact/x",
        "api.example.com.": "/exact/x",
        "www.example.com": "/wild/x",
        "a.b.example.com": "/wild/x",
        "example.com": "/any/x",  # the apex route only has /only
        "notexample.com": "/any/x",
        "gateway.test": "/any/x",
        "127.0.0.1:8080": "/any/x",
        "[::1]:8080": "/any/x",
    }
    for host, path in cases.items():
        assert seen_path(await send(gw.port, "/x", host)) == path, host
    assert seen_path(await send(gw.port, "/only/y", "example.com")) == "/apex/only/y"
    assert seen_path(await send(gw.port, "/only/y", "www.example.com")) == "/wild/only/y"


@pytest.mark.parametrize(
    "host", ["bad host", "a/b", "a..b", "ex:ample", "[zz]", "-a.com", "a.com:99999x", "é.com"]
)
async def test_a_host_that_is_not_a_host_name_is_400(
    start_gateway: StartGateway, upstream: str, host: str
) -> None:
    gw = await start_gateway([public(upstream)])
    resp = await send(gw.port, "/x", host)
    assert resp.status == 400, resp.body
    assert b"Host" in resp.body


async def test_a_request_without_host_matches_only_routes_without_hosts(
    start_gateway: StartGateway, upstream: str
) -> None:
    gw = await start_gateway(
        [
            public(f"{upstream}/named", hosts=["api.example.com"]),
            public(f"{upstream}/any", "/any"),
        ]
    )
    old = b"GET /x HTTP/1.0\r\n\r\n"
    assert (await raw_request(gw.port, old)).status == 404
    old = b"GET /any/x HTTP/1.0\r\n\r\n"
    assert seen_path(await raw_request(gw.port, old)) == "/any/any/x"


def test_hosts_config_is_checked() -> None:
    cfg = make_config(
        "http://127.0.0.1:1",
        [public("http://u", hosts=["API.example.com.", "*.Example.com", "api.example.com"])],
    )
    assert cfg.routes[0].hosts == ("api.example.com", "*.example.com")
    for bad in (["a.com:80"], ["*"], ["*.*.a.com"], ["a b"], [], "a.com", ["a.*.com"]):
        with pytest.raises(ConfigError, match=r"routes\[0\]\.hosts"):
            make_config("http://127.0.0.1:1", [public("http://u", hosts=bad)])


# =========================================================================== strip_prefix


async def test_strip_prefix_and_base_path(start_gateway: StartGateway, upstream: str) -> None:
    """The upstream receives the base path, then the path less the matched prefix; the
    query goes byte for byte."""
    gw = await start_gateway(
        [
            public(upstream, "/orders", strip_prefix=True),
            public(f"{upstream}/api/v2", "/items", strip_prefix=True),
            public(f"{upstream}/api/v2/", "/kept"),
            public(upstream, "/plain"),
        ]
    )
    cases = {
        "/orders/7": "/7",
        "/orders": "/",
        "/orders/": "/",
        "/orders/7/lines?a=1&b=%2F&c&d=%7e": "/7/lines?a=1&b=%2F&c&d=%7e",
        "/orders;v=1/7": "/7",
        "/orders/../orders/8": "/8",
        "/items/7": "/api/v2/7",
        "/items": "/api/v2",
        "/items/": "/api/v2/",
        "/items?x=1": "/api/v2?x=1",
        "/kept/7": "/api/v2/kept/7",
        "/plain/7": "/plain/7",
    }
    for target, path in cases.items():
        assert seen_path(await send(gw.port, target)) == path, target
    # Not a prefix match: a longer first segment is another route's (here: none).
    assert (await send(gw.port, "/ordersx")).status == 404


# =========================================================================== preserve_host


async def test_preserve_host_sends_the_clients_host(
    start_gateway: StartGateway, upstream: str
) -> None:
    gw = await start_gateway(
        [public(upstream, "/kept", preserve_host=True), public(upstream, "/default")]
    )
    resp = await send(gw.port, "/kept/x", "Shop.Example:8080")
    assert header_values(resp.json(), "Host") == ["Shop.Example:8080"]
    resp = await send(gw.port, "/default/x", "Shop.Example:8080")
    assert header_values(resp.json(), "Host") == [upstream.removeprefix("http://")]
    assert header_values(resp.json(), "X-Forwarded-Host") == ["Shop.Example:8080"]


# =========================================================================== redirects


@pytest.fixture(scope="module")
def redirect_upstream() -> Iterator[str]:
    """gunicorn serving tests/apps/redirect_app.py (Flask)."""
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"127.0.0.1:{port}"]
    with serve([*argv, "tests.apps.redirect_app:app"], port) as url:
        yield url


def to(path: str, absolute: bool = True, header: str = "Location") -> str:
    query = f"to={quote(path)}" + ("&absolute=1" if absolute else "")
    return query if header == "Location" else f"{query}&header={header}"


async def test_location_to_the_upstream_is_given_back_as_the_clients_address(
    start_gateway: StartGateway, redirect_upstream: str
) -> None:
    gw = await start_gateway(
        [
            public(redirect_upstream, "/orders", strip_prefix=True, name="stripped"),
            public(f"{redirect_upstream}/api/v2", "/based", strip_prefix=True, name="based"),
            public(redirect_upstream, "/off", rewrite_redirects=False, name="off"),
            public(redirect_upstream, "/", name="root"),
        ]
    )
    origin = redirect_upstream  # http://127.0.0.1:<port>, as Flask builds it from Host
    host = "Gateway.Test:8080"
    cases = [
        # A route that keeps paths: only the origin changes.
        ("/go", to("/landed"), "http://Gateway.Test:8080/landed"),
        ("/go", to("/landed?x=1#f"), "http://Gateway.Test:8080/landed?x=1#f"),
        ("/go", to("/landed", absolute=False), "/landed"),
        ("/go", to("http://elsewhere.example/x", absolute=False), "http://elsewhere.example/x"),
        # strip_prefix: the prefix comes back.
        ("/orders/go", to("/7"), "http://Gateway.Test:8080/orders/7"),
        ("/orders/go", to("/7", absolute=False), "/orders/7"),
        ("/orders/go", to("/"), "http://Gateway.Test:8080/orders/"),
        # A base path: only what is under it is mapped; relative paths too.
        ("/based/go", to("/api/v2/7"), "http://Gateway.Test:8080/based/7"),
        ("/based/go", to("/api/v2"), "http://Gateway.Test:8080/based"),
        ("/based/go", to("/api/v2?q=1"), "http://Gateway.Test:8080/based?q=1"),
        ("/based/go", to("/api/v2/7", absolute=False), "/based/7"),
        ("/based/go", to("/api/v2x/7"), f"{origin}/api/v2x/7"),
        ("/based/go", to("/other"), f"{origin}/other"),
        ("/based/go", to("/other", absolute=False), "/other"),
        # Turned off.
        ("/off/go", to("/landed"), f"{origin}/landed"),
    ]
    for target, query, expected in cases:
        resp = await send(gw.port, f"{target}?{query}", host)
        assert resp.status == 302, (target, resp.status, resp.body[:200])
        assert resp.header("Location") == expected, (target, query)
    resp = await send(gw.port, f"/based/cl?{to('/api/v2/doc', header='Content-Location')}", host)
    assert resp.status == 200
    assert resp.header("Content-Location") == "http://Gateway.Test:8080/based/doc"
    assert resp.header("X-Seen-Path") == "/api/v2/cl"


async def test_forwarded_proto_and_host_are_believed_from_trusted_proxies_only(
    start_gateway: StartGateway, redirect_upstream: str
) -> None:
    claims = ("X-Forwarded-Proto: https", "X-Forwarded-Host: public.example")
    untrusted = await start_gateway([public(redirect_upstream)])
    resp = await send(untrusted.port, f"/go?{to('/landed')}", "inner.test", *claims)
    assert resp.header("Location") == "http://inner.test/landed"
    trusted = await start_gateway([public(redirect_upstream)], trusted_proxies=["127.0.0.1/32"])
    resp = await send(trusted.port, f"/go?{to('/landed')}", "inner.test", *claims)
    assert resp.header("Location") == "https://public.example/landed"
    # An invalid X-Forwarded-Host is not used: the Host is.
    bad = ("X-Forwarded-Host: a b", "X-Forwarded-Proto: gopher")
    resp = await send(trusted.port, f"/go?{to('/landed')}", "inner.test", *bad)
    assert resp.header("Location") == "http://inner.test/landed"


async def test_preserve_host_leaves_the_location_to_the_upstream(
    start_gateway: StartGateway, redirect_upstream: str
) -> None:
    gw = await start_gateway([public(redirect_upstream, preserve_host=True)])
    resp = await send(gw.port, f"/go?{to('/landed')}", "shop.example:8080")
    assert resp.header("X-Seen-Host") == "shop.example:8080"
    assert resp.header("Location") == "http://shop.example:8080/landed"


# =========================================================================== TLS: 421


def sni_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the names below are not in the test certificate
    return ctx


async def tls_send(port: int, server_name: str | None, host: str, target: str = "/x") -> bytes:
    """One request over TLS; `server_name` None sends no SNI (as to an IP address)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=sni_context(), server_hostname=server_name or ""
    )
    try:
        request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, OSError):
            await writer.wait_closed()


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


async def test_tls_host_outside_the_server_names_routes_is_421(
    start_gateway: StartGateway, upstream: str, pki: Pki
) -> None:
    gw = await start_gateway(
        [
            public(f"{upstream}/api", hosts=["api.example.test"]),
            public(f"{upstream}/web", hosts=["*.web.test"]),
            public(f"{upstream}/any"),
        ],
        tls=tls_config(pki),
    )
    cases = [
        ("api.example.test", "api.example.test", 200),
        ("api.example.test", "API.example.test:443", 200),
        ("API.EXAMPLE.TEST", "api.example.test", 200),
        ("api.example.test", "www.web.test", 421),
        ("www.web.test", "api.example.test", 421),
        ("api.example.test", "other.test", 421),  # SNI picked api's routes; Host picks none
        ("other.test", "api.example.test", 421),
        ("a.web.test", "b.web.test", 200),  # the same routes: one connection may serve both
        ("other.test", "unknown.test", 200),
        (None, "api.example.test", 200),  # no SNI (a client dialling an IP): not checked
        ("api.example.test", "a b", 400),
    ]
    for server_name, host, status in cases:
        data = await tls_send(gw.port, server_name, host)
        assert status_of(data) == status, (server_name, host, data[:300])
        if status == 421:
            assert b"misdirected_request" in data
    # The matching route was the one for the Host (its base path shows it).
    data = await tls_send(gw.port, "api.example.test", "api.example.test")
    assert b'"path": "/api/x"' in data


async def test_tls_without_hosts_routes_never_answers_421(
    start_gateway: StartGateway, upstream: str, pki: Pki
) -> None:
    gw = await start_gateway([public(upstream)], tls=tls_config(pki))
    assert status_of(await tls_send(gw.port, "a.test", "b.test")) == 200


async def test_tls_listener_rewrites_locations_to_https(
    start_gateway: StartGateway, redirect_upstream: str, pki: Pki
) -> None:
    gw = await start_gateway([public(redirect_upstream)], tls=tls_config(pki))
    data = await tls_send(gw.port, "api.example.test", "api.example.test", f"/go?{to('/in')}")
    assert status_of(data) == 302, data[:300]
    assert b"\r\nLocation: https://api.example.test/in\r\n" in data
