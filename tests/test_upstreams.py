"""Several upstream endpoints per route, and the upstream URL's base path."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

import pytest
import yaml

from gateway import balance
from gateway.balance import Balancer
from gateway.config import ConfigError, Upstream, parse_config
from tests.conftest import (
    MakeUpstream,
    RawUpstream,
    Running,
    StartGateway,
    UpConn,
    UpRequest,
    echo_answer,
    eventually,
    free_port,
    get,
    head,
    http,
    metric,
    raw_request,
    read_until_closed,
)

AUTHLETE = {
    "base_url": "http://127.0.0.1:18400",
    "allow_insecure_http": True,
    "service_id": "s",
    "access_token": "t",
}


def _cfg(upstream: Any, **route: Any) -> dict[str, Any]:
    return {
        "authlete": AUTHLETE,
        "routes": [{"name": "r", "path_prefix": "/", "upstream": upstream, **route}],
    }


def _parse(raw: dict[str, Any]) -> Any:
    return parse_config(yaml.safe_dump(raw), env={})


def _problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _parse(raw)
    return info.value.problems


# --------------------------------------------------------------------------- base path


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://orders:8080", ""),
        ("http://orders:8080/", ""),
        ("http://orders:8080/api/v2", "/api/v2"),
        ("http://orders:8080/api/v2/", "/api/v2"),
        ("https://orders/a%2Bb/x;v=1", "/a%2Bb/x;v=1"),
    ],
)
def test_base_path_parsed(url: str, base: str) -> None:
    route = _parse(_cfg(url)).routes[0]
    assert route.base_path == base
    assert route.upstream.host == "orders"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h/api?x=1", "must not contain a query or fragment"),
        ("http://h/api?", "must not contain a query or fragment"),
        ("http://h/api#top", "must not contain a query or fragment"),
        ("http://h/api//v2", "invalid base path: empty path segment (repeated slash)"),
        ("http://h/a%2fb", "invalid base path: encoded slash"),
        ("http://h/api/../v2", "base path must be normalised (did you mean '/v2'?)"),
        ("http://h/a%7Eb", "base path must be normalised (did you mean '/a~b'?)"),
    ],
)
def test_base_path_refused(url: str, problem: str) -> None:
    assert _problems(_cfg(url)) == [f"routes[0].upstream: {problem}"]


def test_no_base_path_by_default() -> None:
    route = _parse(_cfg("http://127.0.0.1:9")).routes[0]
    assert route.base_path == ""
    assert route.endpoints == (Upstream("http", "127.0.0.1", 9),)
    assert route.balance == "round_robin"


# --------------------------------------------------------------------------- lists


def test_upstream_list() -> None:
    route = _parse(_cfg(["http://a:8080/api/", "http://b:8080/api", "http://[::1]:9/api"])).routes[
        0
    ]
    assert route.endpoints == (
        Upstream("http", "a", 8080),
        Upstream("http", "b", 8080),
        Upstream("http", "::1", 9),
    )
    assert route.upstream == Upstream("http", "a", 8080)
    assert route.base_path == "/api"
    route = _parse(_cfg(["http://a"], balance="least_requests")).routes[0]
    assert route.endpoints == (Upstream("http", "a", 80),)
    assert route.balance == "least_requests"


@pytest.mark.parametrize(
    ("upstream", "route", "problem"),
    [
        ([], {}, "routes[0].upstream: must be an http(s) URL or a non-empty list of them"),
        (
            ["http://a", "https://b"],
            {},
            "routes[0].upstream[1]: all endpoints must use http://",
        ),
        (
            ["http://a/v1", "http://b/v2"],
            {},
            "routes[0].upstream[1]: all endpoints must have base path '/v1'",
        ),
        (["http://a", "http://a:80"], {}, "routes[0].upstream[1]: duplicate endpoint http://a:80"),
        (["http://a", "ftp://b"], {}, "routes[0].upstream[1]: not an http(s) URL"),
        (
            "http://a",
            {"balance": "random"},
            'routes[0].balance: must be "round_robin" or "least_requests"',
        ),
    ],
)
def test_upstream_list_refused(upstream: Any, route: dict[str, Any], problem: str) -> None:
    assert _problems(_cfg(upstream, **route)) == [problem]


# --------------------------------------------------------------------------- over sockets


def _route(upstream: Any, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": "r", "path_prefix": "/", "upstream": upstream, "auth": "none", **extra}]


def _refusing_url() -> str:
    """A loopback port nobody listens on: connecting is refused."""
    return f"http://127.0.0.1:{free_port()}"


async def _reset_after_request(conn: UpConn) -> None:
    """Reads a request, then resets the connection without a byte of answer."""
    await conn.read_request()
    sock = conn.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.writer.transport.abort()


def _balancer(gw: Running) -> Balancer:
    assert gw.gateway._listener is not None
    pool = gw.gateway._listener.plan.routes["r"].pool
    assert isinstance(pool, Balancer)
    return pool


async def test_round_robin_over_endpoints(
    start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    ups = [await raw_upstream(http()) for _ in range(3)]
    gw = await start_gateway(_route([u.url for u in ups]))
    for i in range(9):
        assert (await get(gw.port, f"/x{i}")).status == 200
    assert [len(u.requests) for u in ups] == [3, 3, 3]
    assert ups[0].targets() == ["/x0", "/x3", "/x6"]
    for u in ups:
        assert metric(gw, "gateway_upstream_endpoint_requests_total", upstream=u.url) == 3


async def test_least_requests_avoids_a_busy_endpoint(
    start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    release = asyncio.Event()

    async def slow(conn: UpConn, req: UpRequest) -> bytes | None:
        await release.wait()
        return await echo_answer(conn, req)

    busy = await raw_upstream(http(slow))
    free = await raw_upstream(http())
    gw = await start_gateway(_route([busy.url, free.url], balance="least_requests"))
    stuck = asyncio.ensure_future(get(gw.port, "/stuck"))
    await eventually(lambda: len(busy.requests) == 1, "the slow request")
    for i in range(4):  # round robin would send two of them to the busy endpoint
        assert (await get(gw.port, f"/y{i}")).status == 200
    assert free.targets() == ["/y0", "/y1", "/y2", "/y3"]
    release.set()
    assert (await stuck).status == 200


async def test_refused_endpoint_is_retried_elsewhere_then_ejected(
    start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    good = await raw_upstream(http())
    dead = _refusing_url()
    gw = await start_gateway(_route([dead, good.url]))
    # POST too: nothing was sent to the refusing endpoint, so it may go elsewhere.
    for i in range(6):
        resp = await raw_request(gw.port, head("POST", f"/p{i}", "Content-Length: 2") + b"hi")
        assert resp.status == 200
    assert len(good.requests) == 6
    failures = "gateway_upstream_endpoint_failures_total"
    # Three refusals in a row (requests 0, 1, 2 each tried it first) eject it: no more tries.
    assert metric(gw, failures, upstream=dead, kind="refused") == 3
    assert metric(gw, "gateway_upstream_endpoint_ejections_total", upstream=dead) == 1
    assert metric(gw, "gateway_upstream_endpoint_requests_total", upstream=dead) == 0
    (pool,) = [p for p in _balancer(gw).endpoints if p.upstream.origin == dead]
    assert pool.ejected_until > time.monotonic()


async def test_ejected_endpoint_is_probed_back_after_cooldown(
    start_gateway: StartGateway, raw_upstream: MakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(balance, "EJECT_SECONDS", 0.3)
    good = await raw_upstream(http())
    port = free_port()
    gw = await start_gateway(_route([f"http://127.0.0.1:{port}", good.url]))
    for i in range(4):
        assert (await get(gw.port, f"/a{i}")).status == 200
    assert metric(gw, "gateway_upstream_endpoint_ejections_total", upstream=f"http://127.0.0.1:{port}") == 1  # fmt: skip  # noqa: E501
    back = RawUpstream(http())
    back._server = await asyncio.start_server(back._serve, "127.0.0.1", port)
    try:
        await asyncio.sleep(0.4)
        for i in range(4):
            assert (await get(gw.port, f"/b{i}")).status == 200
        assert len(back.requests) == 2  # back in the rotation
    finally:
        await back.stop()


async def test_all_endpoints_refusing_is_502(start_gateway: StartGateway) -> None:
    urls = [_refusing_url(), _refusing_url()]
    gw = await start_gateway(_route(urls))
    assert (await get(gw.port, "/")).status == 502
    for url in urls:
        assert metric(gw, "gateway_upstream_endpoint_failures_total", upstream=url, kind="refused") == 1  # fmt: skip  # noqa: E501


async def test_reset_idempotent_is_retried_once_on_another_endpoint(
    start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    resetting = await raw_upstream(_reset_after_request)
    good = await raw_upstream(http())
    gw = await start_gateway(_route([resetting.url, good.url]))
    resp = await get(gw.port, "/idem")  # goes to the resetting endpoint first
    assert resp.status == 200
    assert resetting.targets() == ["/idem"]
    assert good.targets() == ["/idem"]
    reset = "gateway_upstream_endpoint_failures_total"
    assert metric(gw, reset, upstream=resetting.url, kind="reset") == 1


async def test_reset_non_idempotent_is_not_retried(
    start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    resetting = await raw_upstream(_reset_after_request)
    good = await raw_upstream(http())
    gw = await start_gateway(_route([resetting.url, good.url]))
    resp = await raw_request(gw.port, head("POST", "/once", "Content-Length: 0"))
    assert resp.status == 502
    assert resetting.targets() == ["/once"]
    assert good.targets() == []


async def test_reset_after_response_bytes_is_not_retried(
    start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    async def partial(conn: UpConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.writer.transport.abort()

    cut = await raw_upstream(partial)
    good = await raw_upstream(http())
    gw = await start_gateway(_route([cut.url, good.url]))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(head("GET", "/cut"))
    data, _ = await read_until_closed(reader, 5.0)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")  # relayed, then cut: no retry
    assert data.endswith(b"half")
    assert good.targets() == []


async def test_host_names_are_re_resolved(
    start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    """A headless Service: the name's addresses change, each address gets traffic. The
    resolver is a seam (a mapping); the connections are real, to 127.0.0.1 and 127.0.0.2
    (both loopback on Linux), so the addresses are what the upstream sees."""
    first = RawUpstream(http())
    first._server = await asyncio.start_server(first._serve, "127.0.0.1", 0)
    port = first._server.sockets[0].getsockname()[1]
    second = RawUpstream(http())
    second._server = await asyncio.start_server(second._serve, "127.0.0.2", port)
    records = {"orders.test": ["127.0.0.1"]}

    async def resolve(host: str, port: int) -> list[str]:
        return records[host]

    try:
        gw = await start_gateway(_route(f"http://orders.test:{port}"), upstream_dns_ttl=0.2)
        balancer = _balancer(gw)
        balancer.resolve = resolve
        assert (await get(gw.port, "/one")).status == 200
        await eventually(lambda: balancer.resolving is None and len(balancer.pools) == 1, "dns")
        records["orders.test"] = ["127.0.0.1", "127.0.0.2"]
        await asyncio.sleep(0.25)
        assert (await get(gw.port, "/two")).status == 200  # starts the re-resolution
        await eventually(lambda: len(balancer.endpoints) == 2, "the new address")
        for i in range(4):
            assert (await get(gw.port, f"/n{i}")).status == 200
        assert len(second.requests) == 2
        host_headers = {r.values("host")[0] for r in second.requests}
        assert host_headers == {f"orders.test:{port}".encode()}
        assert metric(gw, "gateway_upstream_endpoint_requests_total", upstream=f"http://orders.test:{port}") == 6  # fmt: skip  # noqa: E501
    finally:
        await first.stop()
        await second.stop()


async def test_pooled_connections_have_a_maximum_age(
    start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    up = await raw_upstream(http())
    gw = await start_gateway(_route(up.url), upstream_max_connection_age=0.3)
    for _ in range(3):
        assert (await get(gw.port, "/")).status == 200
    assert len(up.conns) == 1  # kept alive and reused
    await asyncio.sleep(0.35)  # (less than the 1.5 s idle limit)
    assert (await get(gw.port, "/")).status == 200
    assert len(up.conns) == 2


async def test_connections_are_reused_without_a_maximum_age(
    start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    up = await raw_upstream(http())
    gw = await start_gateway(_route(up.url), upstream_max_connection_age=0)
    assert (await get(gw.port, "/")).status == 200
    await asyncio.sleep(0.35)
    assert (await get(gw.port, "/")).status == 200
    assert len(up.conns) == 1
