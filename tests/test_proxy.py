"""Forwarding contract of the gateway, over real loopback sockets only.

Covers: method/path/query/body forwarding, streaming with flat memory in both directions,
hop-by-hop headers, X-Forwarded-*, upstream connection pooling, upstream faults (502/504
before the response starts, a cut connection after), pass-through of upstream answers,
identity headers (set on allowed requests, never chosen by the client) and the
Authorization header.

Raw sockets are used wherever the exact spelling of what goes over the wire matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.emulator import Emulator
from tests.conftest import (
    RawResponse,
    RssWatch,
    StartGateway,
    bearer,
    echo_of,
    header_values,
    start_app,
)

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

MiB = 1 << 20
IDENTITY_DEFAULT = ("X-Auth-Subject", "X-Auth-Scopes", "X-Auth-Client-Id")
HOP_BY_HOP = (
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
)


# --------------------------------------------------------------------------- helpers


def public_route(upstream: str, prefix: str = "/public", **extra: Any) -> dict[str, Any]:
    return {
        "name": prefix.strip("/") or "root",
        "path_prefix": prefix,
        "upstream": upstream,
        "auth": "none",
        **extra,
    }


def protected_route(upstream: str, prefix: str = "/api", **extra: Any) -> dict[str, Any]:
    return {
        "name": prefix.strip("/") or "root",
        "path_prefix": prefix,
        "upstream": upstream,
        **extra,
    }


def fold(name: str) -> str:
    return name.lower().replace("_", "-")


def names_folding_to(echo: dict[str, Any], name: str) -> list[tuple[str, str]]:
    """Every header the upstream received whose name folds to `name`."""
    return [(k, v) for k, v in echo["headers"] if fold(k) == fold(name)]


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def request_bytes(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {target} {version}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_head(
    reader: asyncio.StreamReader, timeout: float = 10.0
) -> tuple[int, list[tuple[str, str]]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
    return status, headers


def _get(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


async def read_body(
    reader: asyncio.StreamReader,
    status: int,
    headers: list[tuple[str, str]],
    method: str = "GET",
    timeout: float = 10.0,
) -> bytes:
    """Read one message body following HTTP/1.1 framing (chunked, Content-Length or EOF)."""
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return b""
    if any("chunked" in v.lower() for v in _get(headers, "Transfer-Encoding")):
        out = bytearray()
        while True:
            size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                # trailers (none expected) up to the empty line
                while (await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)) != b"\r\n":
                    pass
                return bytes(out)
            out += await asyncio.wait_for(reader.readexactly(size), timeout)
            await asyncio.wait_for(reader.readexactly(2), timeout)
    lengths = _get(headers, "Content-Length")
    if lengths:
        return await asyncio.wait_for(reader.readexactly(int(lengths[0])), timeout)
    return await asyncio.wait_for(reader.read(), timeout)


async def exchange(
    port: int, data: bytes, method: str = "GET", timeout: float = 10.0
) -> RawResponse:
    """Send exact bytes, read exactly one framed response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        status, headers = await read_head(reader, timeout)
        body = await read_body(reader, status, headers, method, timeout)
        return RawResponse(status, headers, body)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def raw_echo(
    port: int,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
) -> dict[str, Any]:
    """Send a raw request through the gateway to the echo upstream; return what it saw."""
    all_headers = [("Host", "gateway.test"), ("Connection", "close"), *headers]
    resp = await exchange(port, request_bytes(method, target, all_headers, body))
    assert resp.status == 200, (resp.status, resp.body)
    data: dict[str, Any] = json.loads(resp.body)
    return data


def rst_close(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


@pytest.fixture
async def serve_app() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """Factory: serve a custom aiohttp upstream, return its base URL; cleaned up after."""
    runners: list[web.AppRunner] = []

    async def serve(app: web.Application) -> str:
        runner, url, _ = await start_app(app)
        runners.append(runner)
        return url

    try:
        yield serve
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.fixture
async def serve_raw() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    """Factory: a raw TCP upstream whose handler writes whatever bytes it likes."""
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[None]] = set()

    async def serve(handler: RawHandler) -> str:
        async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await handler(reader, writer)
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                tasks.discard(task)
                writer.close()

        server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    try:
        yield serve
    finally:
        for server in servers:
            server.close()
        for task in list(tasks):
            task.cancel()
        for server in servers:
            await server.wait_closed()


# --------------------------------------------------------------------------- memory


BIG = 128 * MiB
# Everything (client, gateway, upstream) shares this process. Holding the body whole would
# cost at least BIG; streaming costs a few socket buffers. A quarter leaves room for noise.
MAX_GROWTH = BIG // 4
BLOCK = os.urandom(MiB)


async def blocks(count: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield BLOCK


def digest_of_blocks(count: int) -> str:
    h = hashlib.sha256()
    for _ in range(count):
        h.update(BLOCK)
    return h.hexdigest()


async def test_large_upload_streams_with_flat_memory(
    start_gateway: StartGateway, upstream: str, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([public_route(upstream)])
    # warm up the connection pools and buffers first
    async with client.post(f"{gw.url}/public/warm", data=blocks(4)) as resp:
        warm = await echo_of(resp)
    assert warm["body_length"] == 4 * MiB

    count = BIG // MiB
    expected = digest_of_blocks(count)
    url = f"{gw.url}/public/upload"
    async with RssWatch() as watch, client.post(url, data=blocks(count)) as resp:
        echo = await echo_of(resp)
    assert echo["body_length"] == BIG
    assert echo["body_sha256"] == expected
    assert watch.growth < MAX_GROWTH, f"RSS grew {watch.growth / MiB:.1f} MiB for a 128 MiB upload"


async def test_large_download_streams_with_flat_memory(
    start_gateway: StartGateway,
    serve_app: Callable[[web.Application], Awaitable[str]],
    client: aiohttp.ClientSession,
) -> None:
    async def download(request: web.Request) -> web.StreamResponse:
        count = int(request.match_info["mib"])
        resp = web.StreamResponse()
        resp.content_type = "application/octet-stream"
        resp.content_length = count * MiB
        await resp.prepare(request)
        for _ in range(count):
            await resp.write(BLOCK)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/public/download/{mib}", download)
    gw = await start_gateway([public_route(await serve_app(app))])

    async with client.get(f"{gw.url}/public/download/4") as resp:
        assert len(await resp.read()) == 4 * MiB

    count = BIG // MiB
    received = 0
    h = hashlib.sha256()
    async with RssWatch() as watch, client.get(f"{gw.url}/public/download/{count}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(BIG)
        async for chunk in resp.content.iter_any():
            received += len(chunk)
            h.update(chunk)
    assert received == BIG
    assert h.hexdigest() == digest_of_blocks(count)
    assert watch.growth < MAX_GROWTH, (
        f"RSS grew {watch.growth / MiB:.1f} MiB for a 128 MiB download"
    )


async def test_upload_reaches_upstream_before_client_finishes(
    start_gateway: StartGateway,
    serve_app: Callable[[web.Application], Awaitable[str]],
    client: aiohttp.ClientSession,
) -> None:
    """The second half of the body is only sent once the upstream has seen the first:
    a gateway that buffered the whole request would deadlock here."""
    first_seen = asyncio.Event()

    async def sink(request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            if total >= MiB:
                first_seen.set()
        return web.json_response({"total": total})

    app = web.Application()
    app.router.add_post("/public/sink", sink)
    gw = await start_gateway([public_route(await serve_app(app))])

    async def body() -> AsyncIterator[bytes]:
        yield BLOCK
        await asyncio.wait_for(first_seen.wait(), 10)
        yield BLOCK

    async with client.post(f"{gw.url}/public/sink", data=body()) as resp:
        assert resp.status == 200
        assert (await resp.json())["total"] == 2 * MiB


async def test_download_reaches_client_before_upstream_finishes(
    start_gateway: StartGateway,
    serve_app: Callable[[web.Application], Awaitable[str]],
    client: aiohttp.ClientSession,
) -> None:
    """The upstream only sends its second half once the client has the first."""
    client_has_first = asyncio.Event()

    async def source(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"a" * 1000)
        await asyncio.wait_for(client_has_first.wait(), 10)
        await resp.write(b"b" * 1000)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/public/source", source)
    gw = await start_gateway([public_route(await serve_app(app))])

    async with client.get(f"{gw.url}/public/source") as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readexactly(1000), 10)
        assert first == b"a" * 1000
        client_has_first.set()
        assert await asyncio.wait_for(resp.read(), 10) == b"b" * 1000


# --------------------------------------------------------------------------- basic forwarding


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
async def test_method_path_query_and_body_are_forwarded(
    start_gateway: StartGateway, upstream: str, client: aiohttp.ClientSession, method: str
) -> None:
    gw = await start_gateway([public_route(upstream)])
    body = f"body for {method}".encode() * 100 if method != "GET" else b""
    async with client.request(
        method,
        f"{gw.url}/public/items/42?x=1&y=two",
        data=body or None,
        headers={"Content-Type": "application/octet-stream"} if body else None,
    ) as resp:
        echo = await echo_of(resp)
    assert echo["method"] == method
    assert echo["path"].split("?")[0] == "/public/items/42"
    assert echo["query"] == "x=1&y=two"
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_request_goes_to_the_matching_routes_upstream(
    start_gateway: StartGateway,
    serve_app: Callable[[web.Application], Awaitable[str]],
    client: aiohttp.ClientSession,
) -> None:
    def named(name: str) -> web.Application:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(text=f"{name}:{request.path}")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        return app

    one, two = await serve_app(named("one")), await serve_app(named("two"))
    gw = await start_gateway([public_route(one, "/one"), public_route(two, "/two")])
    for prefix, expected in (("/one", "one:/one/x"), ("/two", "two:/two/x")):
        async with client.get(f"{gw.url}{prefix}/x") as resp:
            assert resp.status == 200
            assert await resp.text() == expected


async def test_query_string_is_forwarded_raw(start_gateway: StartGateway, upstream: str) -> None:
    gw = await start_gateway([public_route(upstream)])
    query = "b=2&a=1&a=%2f&c=%E2%82%AC&d=x+y&e=&&f=a/b?c:@!$'()*,;=&%7e=%7E"
    echo = await raw_echo(gw.port, "GET", f"/public/search?{query}", [])
    assert echo["query"] == query
    assert echo["path"] == f"/public/search?{query}"


async def test_percent_encoded_path_is_forwarded(
    start_gateway: StartGateway, upstream: str
) -> None:
    gw = await start_gateway([public_route(upstream)])
    echo = await raw_echo(gw.port, "GET", "/public/a/b%20c/%C3%A9t%C3%A9.txt", [])
    assert echo["path"] == "/public/a/b%20c/%C3%A9t%C3%A9.txt"
    assert echo["query"] == ""


async def test_content_length_is_preserved(start_gateway: StartGateway, upstream: str) -> None:
    gw = await start_gateway([public_route(upstream)])
    body = b"hello world"
    echo = await raw_echo(
        gw.port,
        "POST",
        "/public/cl",
        [("Content-Length", str(len(body))), ("Content-Type", "text/plain")],
        body,
    )
    assert header_values(echo, "Content-Length") == ["11"]
    assert header_values(echo, "Transfer-Encoding") == []
    assert echo["body_length"] == 11
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_large_content_length_upload_is_not_rechunked(
    start_gateway: StartGateway, upstream: str, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([public_route(upstream)])
    body = os.urandom(3 * MiB + 17)
    async with client.put(f"{gw.url}/public/blob", data=body) as resp:
        echo = await echo_of(resp)
    assert header_values(echo, "Content-Length") == [str(len(body))]
    assert header_values(echo, "Transfer-Encoding") == []
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_bodyless_get_gets_no_invented_framing(
    start_gateway: StartGateway, upstream: str
) -> None:
    gw = await start_gateway([public_route(upstream)])
    echo = await raw_echo(gw.port, "GET", "/public/nobody", [])
    assert header_values(echo, "Content-Length") == []
    assert header_values(echo, "Transfer-Encoding") == []
    assert echo["body_length"] == 0


async def test_chunked_upload_is_forwarded(start_gateway: StartGateway, upstream: str) -> None:
    gw = await start_gateway([public_route(upstream)])
    chunks = [b"hello", b" ", b"chunked " * 1000, b"world"]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    echo = await raw_echo(
        gw.port, "POST", "/public/chunked", [("Transfer-Encoding", "chunked")], framed
    )
    whole = b"".join(chunks)
    assert echo["body_length"] == len(whole)
    assert echo["body_sha256"] == hashlib.sha256(whole).hexdigest()
    # the gateway cannot know the length without buffering: it must not invent one
    assert header_values(echo, "Content-Length") == []


@pytest.mark.parametrize("protected", [False, True], ids=["public", "protected"])
async def test_expect_100_continue_is_answered(
    start_gateway: StartGateway, upstream: str, emulator: Emulator, protected: bool
) -> None:
    emulator.add_token("tok-expect", subject="alice", client_id=7, scopes=["write"])
    route = protected_route(upstream, "/up") if protected else public_route(upstream, "/up")
    gw = await start_gateway([route])
    body = b"x" * 50_000
    headers = [
        ("Host", "gateway.test"),
        ("Connection", "close"),
        ("Content-Length", str(len(body))),
        ("Expect", "100-continue"),
    ]
    if protected:
        headers.append(("Authorization", "Bearer tok-expect"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        # like curl: send the head, wait for 100 Continue before sending the body
        writer.write(request_bytes("POST", "/up/file", headers))
        await writer.drain()
        status, _ = await read_head(reader, timeout=10)
        assert status == 100
        writer.write(body)
        await writer.drain()
        status, resp_headers = await read_head(reader)
        raw = await read_body(reader, status, resp_headers)
    finally:
        writer.close()
    assert status == 200, raw
    echo = json.loads(raw)
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_expect_100_continue_not_sent_before_token_is_accepted(
    start_gateway: StartGateway, upstream: str, emulator: Emulator
) -> None:
    """The body is only invited once the token is good: a bad token gets its 401 at once."""
    gw = await start_gateway([protected_route(upstream, "/up")])
    headers = [
        ("Host", "gateway.test"),
        ("Connection", "close"),
        ("Content-Length", "50000"),
        ("Expect", "100-continue"),
        ("Authorization", "Bearer unknown-token"),
    ]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(request_bytes("POST", "/up/file", headers))
        await writer.drain()
        status, _ = await read_head(reader, timeout=10)
    finally:
        writer.close()
    assert status == 401


async def test_upstream_sees_its_own_host(start_gateway: StartGateway, upstream: str) -> None:
    gw = await start_gateway([public_route(upstream)])
    echo = await raw_echo(gw.port, "GET", "/public/host", [])
    assert header_values(echo, "Host") == [upstream.removeprefix("http://")]
    assert header_values(echo, "X-Forwarded-Host") == ["gateway.test"]


# --------------------------------------------------------------------------- hop-by-hop


async def test_hop_by_hop_request_headers_are_dropped(
    start_gateway: StartGateway, upstream: str
) -> None:
    gw = await start_gateway([public_route(upstream)])
    echo = await raw_echo(
        gw.port,
        "GET",
        "/public/hop",
        [
            ("Connection", "X-Client-Hop, x-other-hop"),
            ("Connection", "X-Third-Hop"),
            ("X-Client-Hop", "a"),
            ("X-Other-Hop", "b"),
            ("x-third-hop", "c"),
            ("Keep-Alive", "timeout=5, max=100"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "h2c"),
            ("X-End-To-End", "kept"),
        ],
    )
    received = {k.lower() for k, _ in echo["headers"]}
    for name in (*HOP_BY_HOP, "x-client-hop", "x-other-hop", "x-third-hop"):
        if name == "connection":
            continue
        assert name not in received, (name, echo["headers"])
    for value in header_values(echo, "Connection"):
        assert "hop" not in value.lower(), value
    assert header_values(echo, "X-End-To-End") == ["kept"]


UPSTREAM_HOP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Connection: close, X-Up-Hop\r\n"
    b"Connection: X-Up-Hop-Two\r\n"
    b"X-Up-Hop: secret\r\n"
    b"X-Up-Hop-Two: secret2\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b'Proxy-Authenticate: Basic realm="upstream"\r\n'
    b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
    b"TE: trailers\r\n"
    b"Trailer: X-Checksum\r\n"
    b"Upgrade: h2c\r\n"
    b"X-End-To-End: kept\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
)


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
async def test_hop_by_hop_response_headers_are_dropped(
    start_gateway: StartGateway,
    serve_raw: Callable[[RawHandler], Awaitable[str]],
    version: str,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(UPSTREAM_HOP_RESPONSE)
        await writer.drain()

    gw = await start_gateway([public_route(await serve_raw(handler))])
    resp = await exchange(
        gw.port,
        request_bytes(
            "GET", "/public/x", [("Host", "gateway.test"), ("Connection", "close")], version=version
        ),
    )
    assert resp.status == 200
    assert resp.body == b"hello world"
    names = {k.lower() for k, _ in resp.headers}
    for name in (
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
        "x-up-hop",
        "x-up-hop-two",
    ):
        assert name not in names, (name, resp.headers)
    for value in _get(resp.headers, "Connection"):
        assert "hop" not in value.lower(), value
    if version == "HTTP/1.0":
        # nothing to re-frame for an HTTP/1.0 client: the upstream's chunking must not leak
        assert "transfer-encoding" not in names, resp.headers
    else:
        # the gateway may chunk on its own, but only once
        assert len(_get(resp.headers, "Transfer-Encoding")) <= 1
    assert _get(resp.headers, "X-End-To-End") == ["kept"]


# --------------------------------------------------------------------------- X-Forwarded-*


async def test_x_forwarded_for_is_appended(start_gateway: StartGateway, upstream: str) -> None:
    gw = await start_gateway([public_route(upstream)])
    echo = await raw_echo(gw.port, "GET", "/public/xff", [("X-Forwarded-For", "203.0.113.7")])
    assert header_values(echo, "X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]


async def test_x_forwarded_for_keeps_every_client_value(
    start_gateway: StartGateway, upstream: str
) -> None:
    gw = await start_gateway([public_route(upstream)])
    echo = await raw_echo(
        gw.port,
        "GET",
        "/public/xff",
        [("X-Forwarded-For", "203.0.113.7, 10.0.0.1"), ("x-forwarded-for", "198.51.100.2")],
    )
    values = header_values(echo, "X-Forwarded-For")
    hops = [h.strip() for v in values for h in v.split(",")]
    assert hops == ["203.0.113.7", "10.0.0.1", "198.51.100.2", "127.0.0.1"]


async def test_x_forwarded_for_is_set_without_client_value(
    start_gateway: StartGateway, upstream: str
) -> None:
    gw = await start_gateway([public_route(upstream)])
    echo = await raw_echo(gw.port, "GET", "/public/xff", [])
    assert header_values(echo, "X-Forwarded-For") == ["127.0.0.1"]


async def test_x_forwarded_proto_and_host_replace_client_copies(
    start_gateway: StartGateway, upstream: str
) -> None:
    gw = await start_gateway([public_route(upstream)])
    echo = await raw_echo(
        gw.port,
        "GET",
        "/public/xfp",
        [
            ("X-Forwarded-Proto", "https"),
            ("x-forwarded-proto", "gopher"),
            ("X-Forwarded-Host", "evil.example"),
        ],
    )
    assert header_values(echo, "X-Forwarded-Proto") == ["http"]
    assert header_values(echo, "X-Forwarded-Host") == ["gateway.test"]


async def test_x_forwarded_headers_set_on_protected_route(
    start_gateway: StartGateway, upstream: str, emulator: Emulator
) -> None:
    emulator.add_token("tok-xf", subject="bob", client_id=3, scopes=["a"])
    gw = await start_gateway([protected_route(upstream)])
    echo = await raw_echo(
        gw.port,
        "GET",
        "/api/xf",
        [
            ("Authorization", "Bearer tok-xf"),
            ("X-Forwarded-For", "192.0.2.1"),
            ("X-Forwarded-Host", "evil.example"),
        ],
    )
    assert header_values(echo, "X-Forwarded-For") == ["192.0.2.1, 127.0.0.1"]
    assert header_values(echo, "X-Forwarded-Proto") == ["http"]
    assert header_values(echo, "X-Forwarded-Host") == ["gateway.test"]


# --------------------------------------------------------------------------- pooling


async def test_upstream_connections_are_reused(
    start_gateway: StartGateway,
    serve_app: Callable[[web.Application], Awaitable[str]],
    client: aiohttp.ClientSession,
) -> None:
    peers: list[tuple[str, int]] = []

    async def record(request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[:2])
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    gw = await start_gateway([public_route(await serve_app(app))])
    for i in range(6):
        if i % 2:
            async with client.post(f"{gw.url}/public/{i}", data=b"payload" * 100) as resp:
                assert resp.status == 200
                await resp.read()
        else:
            async with client.get(f"{gw.url}/public/{i}") as resp:
                assert resp.status == 200
                await resp.read()
    assert len(peers) == 6
    assert len(set(peers)) == 1, peers


async def test_upstream_connection_reused_across_client_connections(
    start_gateway: StartGateway, serve_app: Callable[[web.Application], Awaitable[str]]
) -> None:
    peers: list[tuple[str, int]] = []

    async def record(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[:2])
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", record)
    gw = await start_gateway([public_route(await serve_app(app))])
    for i in range(4):
        # a fresh client connection each time (Connection: close)
        resp = await exchange(
            gw.port,
            request_bytes("GET", f"/public/{i}", [("Host", "g"), ("Connection", "close")]),
        )
        assert resp.status == 200
    assert len(peers) == 4
    assert len(set(peers)) == 1, peers


# --------------------------------------------------------------------------- upstream faults


def assert_gateway_error(resp: RawResponse, status: int) -> None:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.header("Cache-Control") == "no-store"
    content_type = resp.header("Content-Type") or ""
    assert content_type.startswith("application/json"), content_type
    assert len(resp.body) < 1024
    doc = resp.json()
    assert isinstance(doc, dict)
    assert isinstance(doc.get("error"), str)


def simple_get(target: str, extra: list[tuple[str, str]] | None = None) -> bytes:
    return request_bytes(
        "GET", target, [("Host", "gateway.test"), ("Connection", "close"), *(extra or [])]
    )


async def test_upstream_refused_is_502(start_gateway: StartGateway) -> None:
    gw = await start_gateway([public_route(f"http://127.0.0.1:{free_port()}")])
    assert_gateway_error(await exchange(gw.port, simple_get("/public/x")), 502)


async def test_upstream_refused_on_protected_route_is_502(
    start_gateway: StartGateway, emulator: Emulator
) -> None:
    emulator.add_token("tok-refused", subject="s", client_id=1)
    gw = await start_gateway([protected_route(f"http://127.0.0.1:{free_port()}")])
    resp = await exchange(gw.port, simple_get("/api/x", [("Authorization", "Bearer tok-refused")]))
    assert_gateway_error(resp, 502)


@pytest.mark.parametrize("how", ["fin", "rst", "fin-before-reading"])
async def test_upstream_reset_is_502(
    start_gateway: StartGateway, serve_raw: Callable[[RawHandler], Awaitable[str]], how: str
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if how != "fin-before-reading":
            await read_request_head(reader)
        if how == "rst":
            rst_close(writer)
        else:
            writer.close()

    gw = await start_gateway([public_route(await serve_raw(handler))])
    assert_gateway_error(await exchange(gw.port, simple_get("/public/x")), 502)


async def test_upstream_garbage_is_502(
    start_gateway: StartGateway, serve_raw: Callable[[RawHandler], Awaitable[str]]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"this is not HTTP at all\r\n\r\n")
        await writer.drain()

    gw = await start_gateway([public_route(await serve_raw(handler))])
    assert_gateway_error(await exchange(gw.port, simple_get("/public/x")), 502)


@dataclass
class Stalled:
    url: str
    release: asyncio.Event


@pytest.fixture
async def stalled_upstream() -> AsyncIterator[Stalled]:
    """An upstream that accepts the request and answers only when released."""
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stall)
    runner, url, _ = await start_app(app)
    try:
        yield Stalled(url, release)
    finally:
        release.set()
        await runner.cleanup()


async def test_upstream_timeout_is_504(
    start_gateway: StartGateway, stalled_upstream: Stalled
) -> None:
    gw = await start_gateway([public_route(stalled_upstream.url)], upstream_timeout=0.5)
    resp = await exchange(gw.port, simple_get("/public/slow"), timeout=15)
    assert_gateway_error(resp, 504)


async def test_route_timeout_is_504(start_gateway: StartGateway, stalled_upstream: Stalled) -> None:
    gw = await start_gateway([public_route(stalled_upstream.url, timeout=0.5)], upstream_timeout=60)
    resp = await exchange(gw.port, simple_get("/public/slow"), timeout=15)
    assert_gateway_error(resp, 504)


async def test_route_timeout_overrides_global(
    start_gateway: StartGateway, serve_app: Callable[[web.Application], Awaitable[str]]
) -> None:
    async def slowish(request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)
        return web.Response(text="made it")

    app = web.Application()
    app.router.add_get("/{tail:.*}", slowish)
    url = await serve_app(app)
    gw = await start_gateway(
        [public_route(url, "/patient", timeout=20), public_route(url, "/hasty")],
        upstream_timeout=0.3,
    )
    patient = await exchange(gw.port, simple_get("/patient/x"), timeout=30)
    assert patient.status == 200
    assert patient.body == b"made it"
    hasty = await exchange(gw.port, simple_get("/hasty/x"), timeout=30)
    assert_gateway_error(hasty, 504)


async def test_protected_upstream_timeout_is_504(
    start_gateway: StartGateway, stalled_upstream: Stalled, emulator: Emulator
) -> None:
    emulator.add_token("tok-slow", subject="s", client_id=1)
    gw = await start_gateway([protected_route(stalled_upstream.url, timeout=0.5)])
    resp = await exchange(
        gw.port, simple_get("/api/slow", [("Authorization", "Bearer tok-slow")]), timeout=15
    )
    assert_gateway_error(resp, 504)


MID_BODY_FAULTS = ["content-length-short", "chunked-unterminated", "rst", "stall"]


@pytest.mark.parametrize("fault", MID_BODY_FAULTS)
async def test_fault_after_response_started_cuts_client(
    start_gateway: StartGateway,
    serve_raw: Callable[[RawHandler], Awaitable[str]],
    client: aiohttp.ClientSession,
    fault: str,
) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        if fault == "chunked-unterminated":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"3e8\r\n"
                + b"p" * 1000
                + b"\r\n"
            )
        else:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n"
                + b"p" * 1000
            )
        await writer.drain()
        await asyncio.sleep(0.2)
        if fault == "rst":
            rst_close(writer)
        elif fault == "stall":
            await release.wait()
        else:
            writer.close()

    try:
        route = public_route(await serve_raw(handler), timeout=0.5)
        gw = await start_gateway([route])
        async with client.get(f"{gw.url}/public/partial") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(resp.read(), 15)
    finally:
        release.set()


@pytest.mark.parametrize("fault", ["content-length-short", "chunked-unterminated"])
async def test_fault_after_response_started_never_completes_message_raw(
    start_gateway: StartGateway,
    serve_raw: Callable[[RawHandler], Awaitable[str]],
    fault: str,
) -> None:
    """Byte-level check: the client never sees a well-formed end of message."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        if fault == "chunked-unterminated":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nhello")
        await writer.drain()
        writer.close()

    gw = await start_gateway([public_route(await serve_raw(handler))])
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(simple_get("/public/partial").replace(b"close", b"keep-alive"))
        await writer.drain()
        status, headers = await read_head(reader)
        rest = await asyncio.wait_for(reader.read(), 15)  # until the gateway cuts
    finally:
        writer.close()
    assert status == 200
    if _get(headers, "Content-Length"):
        assert int(_get(headers, "Content-Length")[0]) > len(rest)
    else:
        assert _get(headers, "Transfer-Encoding") == ["chunked"]
        assert not rest.endswith(b"0\r\n\r\n"), rest


# --------------------------------------------------------------------------- pass-through


def passthrough_app() -> web.Application:
    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code, headers={"X-Upstream": "yes", "ETag": '"v1"'})
        return web.Response(
            status=code,
            body=f"upstream said {code}".encode(),
            headers={"X-Upstream": "yes", "Content-Type": "text/x-upstream"},
        )

    async def cookies(request: web.Request) -> web.Response:
        resp = web.Response(text="cookies", headers={"Cache-Control": "max-age=60"})
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
        resp.headers.add("Set-Cookie", "c=3; Expires=Wed, 21 Oct 2037 07:28:00 GMT")
        resp.headers.add("X-Multi", "one")
        resp.headers.add("X-Multi", "two")
        resp.headers.add("Link", '</a>; rel="preload"')
        resp.headers.add("Link", '</b>; rel="preload"')
        return resp

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"s" * 12345, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_route("*", "/public/status/{code}", status)
    app.router.add_get("/public/cookies", cookies)
    app.router.add_get("/public/sized", sized)  # HEAD is answered too
    return app


@pytest.mark.parametrize("code", [200, 201, 202, 301, 400, 403, 404, 409, 418, 500, 503])
async def test_upstream_status_and_body_pass_through(
    start_gateway: StartGateway,
    serve_app: Callable[[web.Application], Awaitable[str]],
    code: int,
) -> None:
    gw = await start_gateway([public_route(await serve_app(passthrough_app()))])
    resp = await exchange(gw.port, simple_get(f"/public/status/{code}"))
    assert resp.status == code
    assert resp.body == f"upstream said {code}".encode()
    assert resp.header("X-Upstream") == "yes"
    assert resp.header("Content-Type") == "text/x-upstream"


@pytest.mark.parametrize("code", [204, 304])
async def test_bodyless_statuses_pass_through(
    start_gateway: StartGateway,
    serve_app: Callable[[web.Application], Awaitable[str]],
    client: aiohttp.ClientSession,
    code: int,
) -> None:
    gw = await start_gateway([public_route(await serve_app(passthrough_app()))])
    async with client.get(f"{gw.url}/public/status/{code}") as resp:
        assert resp.status == code
        assert resp.headers["X-Upstream"] == "yes"
        assert resp.headers["ETag"] == '"v1"'
        assert await resp.read() == b""
    # and the client connection is still usable afterwards (no stray body bytes)
    async with client.get(f"{gw.url}/public/status/201") as resp:
        assert resp.status == 201
        assert await resp.read() == b"upstream said 201"


async def test_duplicate_headers_pass_through(
    start_gateway: StartGateway, serve_app: Callable[[web.Application], Awaitable[str]]
) -> None:
    gw = await start_gateway([public_route(await serve_app(passthrough_app()))])
    resp = await exchange(gw.port, simple_get("/public/cookies"))
    assert resp.status == 200
    assert _get(resp.headers, "Set-Cookie") == [
        "a=1; Path=/",
        "b=2; Path=/; HttpOnly",
        "c=3; Expires=Wed, 21 Oct 2037 07:28:00 GMT",
    ]
    assert _get(resp.headers, "X-Multi") == ["one", "two"]
    assert _get(resp.headers, "Link") == ['</a>; rel="preload"', '</b>; rel="preload"']
    assert _get(resp.headers, "Cache-Control") == ["max-age=60"]
    assert resp.body == b"cookies"


async def test_head_keeps_content_length(
    start_gateway: StartGateway, serve_app: Callable[[web.Application], Awaitable[str]]
) -> None:
    gw = await start_gateway([public_route(await serve_app(passthrough_app()))])
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(request_bytes("HEAD", "/public/sized", [("Host", "g")]))
        await writer.drain()
        status, headers = await read_head(reader)
        assert status == 200
        assert _get(headers, "Content-Length") == ["12345"]
        assert _get(headers, "Transfer-Encoding") == []
        # no body follows: the same connection answers the next request straight away
        writer.write(request_bytes("GET", "/public/status/202", [("Host", "g")]))
        await writer.drain()
        status, headers = await read_head(reader)
        assert status == 202
        assert await read_body(reader, status, headers) == b"upstream said 202"
    finally:
        writer.close()


async def test_gzip_body_passes_through_byte_for_byte(
    start_gateway: StartGateway, serve_app: Callable[[web.Application], Awaitable[str]]
) -> None:
    plain = b"compress me please " * 5000
    compressed = gzip.compress(plain, mtime=0)
    seen_accept_encoding: list[str | None] = []

    async def gz(request: web.Request) -> web.Response:
        seen_accept_encoding.append(request.headers.get("Accept-Encoding"))
        return web.Response(
            body=compressed,
            headers={
                "Content-Encoding": "gzip",
                "Content-Type": "text/plain",
                "Vary": "Accept-Encoding",
            },
        )

    app = web.Application()
    app.router.add_get("/public/gz", gz)
    gw = await start_gateway([public_route(await serve_app(app))])
    resp = await exchange(gw.port, simple_get("/public/gz", [("Accept-Encoding", "gzip")]))
    assert resp.status == 200
    assert resp.header("Content-Encoding") == "gzip"
    assert resp.body == compressed
    assert resp.header("Content-Length") == str(len(compressed))
    assert seen_accept_encoding == ["gzip"]


async def test_gzip_chunked_body_passes_through(
    start_gateway: StartGateway, serve_raw: Callable[[RawHandler], Awaitable[str]]
) -> None:
    compressed = gzip.compress(b"streamed and zipped " * 3000, mtime=0)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Type: text/plain\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        for i in range(0, len(compressed), 1000):
            piece = compressed[i : i + 1000]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    gw = await start_gateway([public_route(await serve_raw(handler))])
    resp = await exchange(gw.port, simple_get("/public/gz", [("Accept-Encoding", "gzip")]))
    assert resp.status == 200
    assert resp.header("Content-Encoding") == "gzip"
    assert resp.body == compressed


async def test_response_without_content_type_gets_none_invented(
    start_gateway: StartGateway, serve_raw: Callable[[RawHandler], Awaitable[str]]
) -> None:
    """Headers pass back unchanged: a body without Content-Type stays without one."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbody")
        await writer.drain()

    gw = await start_gateway([public_route(await serve_raw(handler))])
    resp = await exchange(gw.port, simple_get("/public/untyped"))
    assert resp.status == 200
    assert resp.body == b"body"
    assert _get(resp.headers, "Content-Type") == []


async def test_custom_reason_and_upstream_server_header_pass_through(
    start_gateway: StartGateway, serve_raw: Callable[[RawHandler], Awaitable[str]]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(
            b"HTTP/1.1 299 Quite Fine\r\nServer: upstream/9\r\nX-Order: 1\r\nX-Order: 2\r\n"
            b"Content-Type: application/x-thing\r\nContent-Length: 3\r\n"
            b"Connection: close\r\n\r\nabc"
        )
        await writer.drain()

    gw = await start_gateway([public_route(await serve_raw(handler))])
    resp = await exchange(gw.port, simple_get("/public/odd"))
    assert resp.status == 299
    assert resp.body == b"abc"
    assert _get(resp.headers, "Server") == ["upstream/9"]
    assert _get(resp.headers, "X-Order") == ["1", "2"]
    assert _get(resp.headers, "Content-Type") == ["application/x-thing"]


# --------------------------------------------------------------------------- client headers


async def test_client_content_headers_pass_unchanged(
    start_gateway: StartGateway, upstream: str
) -> None:
    gw = await start_gateway([public_route(upstream)])
    sent = [
        ("User-Agent", "curl/8.5.0 (odd; agent)"),
        ("Accept", "application/vnd.thing+json; q=0.9, */*;q=0.1"),
        ("Accept-Encoding", "br;q=1.0, identity;q=0.5"),
        ("Content-Type", "application/x-custom; charset=latin-1"),
        ("Accept-Language", "fr-CH, fr;q=0.9"),
        ("Cookie", "session=abc; theme=dark"),
        ("X-Request-Id", "req-123"),
    ]
    echo = await raw_echo(gw.port, "POST", "/public/h", [*sent, ("Content-Length", "2")], b"{}")
    for name, value in sent:
        assert header_values(echo, name) == [value], name


async def test_no_default_headers_invented(start_gateway: StartGateway, upstream: str) -> None:
    gw = await start_gateway([public_route(upstream)])
    for method, extra, body in (
        ("GET", [], b""),
        ("POST", [("Content-Length", "5")], b"hello"),
        ("POST", [("Transfer-Encoding", "chunked")], b"5\r\nhello\r\n0\r\n\r\n"),
    ):
        echo = await raw_echo(gw.port, method, "/public/bare", extra, body)
        for name in ("User-Agent", "Accept", "Accept-Encoding", "Content-Type"):
            assert header_values(echo, name) == [], (method, name, echo["headers"])


async def test_no_default_headers_invented_on_protected_route(
    start_gateway: StartGateway, upstream: str, emulator: Emulator
) -> None:
    emulator.add_token("tok-bare", subject="carol", client_id=11)
    gw = await start_gateway([protected_route(upstream)])
    echo = await raw_echo(
        gw.port,
        "POST",
        "/api/bare",
        [("Authorization", "Bearer tok-bare"), ("Content-Length", "3")],
        b"abc",
    )
    for name in ("User-Agent", "Accept", "Accept-Encoding", "Content-Type"):
        assert header_values(echo, name) == [], (name, echo["headers"])


# --------------------------------------------------------------------------- identity headers


SPOOFS = [
    ("{subject}", "mallory"),
    ("{subject_lower}", "mallory-lower"),
    ("{subject_upper}", "MALLORY-UPPER"),
    ("{subject_us}", "mallory-underscore"),
    ("{subject_us_lower}", "mallory-underscore-lower"),
    ("{scopes}", "admin root"),
    ("{scopes_us}", "admin"),
    ("{scopes_lower}", "superuser"),
    ("{client_id}", "999"),
    ("{client_id_us}", "998"),
    ("{client_id_mixed}", "997"),
]


def spoof_headers(subject: str, scopes: str, client_id: str) -> list[tuple[str, str]]:
    def us(name: str) -> str:
        return name.replace("-", "_")

    def mixed(name: str) -> str:
        # underscore only in the last separator, e.g. X-Auth-Client_Id
        head, _, tail = name.rpartition("-")
        return f"{head}_{tail}" if head else us(name)

    names = {
        "subject": subject,
        "subject_lower": subject.lower(),
        "subject_upper": subject.upper(),
        "subject_us": us(subject),
        "subject_us_lower": us(subject).lower(),
        "scopes": scopes,
        "scopes_us": us(scopes),
        "scopes_lower": scopes.lower(),
        "client_id": client_id,
        "client_id_us": us(client_id).upper(),
        "client_id_mixed": mixed(client_id),
    }
    return [(template.format(**names), value) for template, value in SPOOFS]


CUSTOM_HEADERS = {"subject": "X-User", "scopes": "X-User-Perms", "client_id": "X_App_Id"}
HEADER_SETS = {
    "default": (None, IDENTITY_DEFAULT),
    "custom": (CUSTOM_HEADERS, ("X-User", "X-User-Perms", "X_App_Id")),
}


@pytest.mark.parametrize("names", ["default", "custom"])
async def test_identity_headers_stripped_on_public_route(
    start_gateway: StartGateway, upstream: str, names: str
) -> None:
    config, (subject_h, scopes_h, client_h) = HEADER_SETS[names]
    overrides = {"headers": config} if config else {}
    gw = await start_gateway([public_route(upstream)], **overrides)
    spoofs = spoof_headers(subject_h, scopes_h, client_h)
    echo = await raw_echo(gw.port, "GET", "/public/who", [*spoofs, ("X-Not-Identity", "control")])
    for name in (subject_h, scopes_h, client_h):
        assert names_folding_to(echo, name) == [], (name, echo["headers"])
    # sanity: the raw request did carry ordinary headers through
    assert header_values(echo, "X-Not-Identity") == ["control"]
    assert not any(v.startswith(("mallory", "MALLORY")) for _, v in echo["headers"])


@pytest.mark.parametrize("names", ["default", "custom"])
async def test_identity_headers_set_by_gateway_on_protected_route(
    start_gateway: StartGateway, upstream: str, emulator: Emulator, names: str
) -> None:
    config, (subject_h, scopes_h, client_h) = HEADER_SETS[names]
    emulator.add_token(
        "tok-ident", subject="alice@example.com", client_id=4242, scopes=["read", "write", "o:x"]
    )
    overrides = {"headers": config} if config else {}
    gw = await start_gateway([protected_route(upstream)], **overrides)
    spoofs = spoof_headers(subject_h, scopes_h, client_h)
    echo = await raw_echo(
        gw.port,
        "GET",
        "/api/who",
        [("Authorization", "Bearer tok-ident"), *spoofs, ("X-Not-Identity", "control")],
    )
    got_subject = names_folding_to(echo, subject_h)
    got_scopes = names_folding_to(echo, scopes_h)
    got_client = names_folding_to(echo, client_h)
    assert [(k.lower(), v) for k, v in got_subject] == [(subject_h.lower(), "alice@example.com")]
    assert [(k.lower(), v) for k, v in got_scopes] == [(scopes_h.lower(), "read write o:x")]
    assert [(k.lower(), v) for k, v in got_client] == [(client_h.lower(), "4242")]
    assert header_values(echo, "X-Not-Identity") == ["control"]


@pytest.mark.parametrize("names", ["default", "custom"])
async def test_subject_omitted_for_client_credentials_even_when_spoofed(
    start_gateway: StartGateway, upstream: str, emulator: Emulator, names: str
) -> None:
    config, (subject_h, scopes_h, client_h) = HEADER_SETS[names]
    emulator.add_token("tok-cc", subject=None, client_id=77, scopes=["svc"])
    overrides = {"headers": config} if config else {}
    gw = await start_gateway([protected_route(upstream)], **overrides)
    spoofs = spoof_headers(subject_h, scopes_h, client_h)
    echo = await raw_echo(gw.port, "GET", "/api/svc", [("Authorization", "Bearer tok-cc"), *spoofs])
    assert names_folding_to(echo, subject_h) == [], echo["headers"]
    assert [v for _, v in names_folding_to(echo, scopes_h)] == ["svc"]
    assert [v for _, v in names_folding_to(echo, client_h)] == ["77"]


async def test_custom_name_variants_stripped_for_client_credentials(
    start_gateway: StartGateway, upstream: str, emulator: Emulator
) -> None:
    """With custom names configured, the `_`/case variants of *those* names are removed
    on a protected route that answers with a client-credentials token (no subject)."""
    emulator.add_token("tok-cc2", subject=None, client_id=5)
    gw = await start_gateway([protected_route(upstream)], headers=CUSTOM_HEADERS)
    echo = await raw_echo(
        gw.port,
        "GET",
        "/api/svc",
        [
            ("Authorization", "Bearer tok-cc2"),
            ("x_user", "mallory"),
            ("X_USER", "mallory2"),
            ("x-app-id", "1"),
            ("X-APP_ID", "2"),
        ],
    )
    assert names_folding_to(echo, "X-User") == []
    assert [v for _, v in names_folding_to(echo, "X_App_Id")] == ["5"]


async def test_identity_headers_are_per_request(
    start_gateway: StartGateway, upstream: str, emulator: Emulator
) -> None:
    """Two tokens through the same gateway (and pooled upstream connection) never mix."""
    emulator.add_token("tok-a", subject="alice", client_id=1, scopes=["a"])
    emulator.add_token("tok-b", subject="bob", client_id=2, scopes=["b"])
    gw = await start_gateway([protected_route(upstream)])
    for _ in range(2):
        for token, subject, client_id, scope in (
            ("tok-a", "alice", "1", "a"),
            ("tok-b", "bob", "2", "b"),
        ):
            echo = await raw_echo(gw.port, "GET", "/api/me", [("Authorization", f"Bearer {token}")])
            assert header_values(echo, "X-Auth-Subject") == [subject]
            assert header_values(echo, "X-Auth-Client-Id") == [client_id]
            assert header_values(echo, "X-Auth-Scopes") == [scope]


# --------------------------------------------------------------------------- Authorization


async def test_authorization_forwarded_unchanged_on_protected_route(
    start_gateway: StartGateway, upstream: str, emulator: Emulator
) -> None:
    emulator.add_token("tok-fwd.abc~+/=", subject="dave", client_id=8)
    gw = await start_gateway([protected_route(upstream)])
    echo = await raw_echo(
        gw.port, "GET", "/api/auth", [("Authorization", "Bearer tok-fwd.abc~+/=")]
    )
    assert header_values(echo, "Authorization") == ["Bearer tok-fwd.abc~+/="]


async def test_authorization_forwarded_unchanged_on_public_route(
    start_gateway: StartGateway, upstream: str, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([public_route(upstream)])
    echo = await raw_echo(gw.port, "GET", "/public/auth", [("Authorization", "Basic dXNlcjpwYXNz")])
    assert header_values(echo, "Authorization") == ["Basic dXNlcjpwYXNz"]
    async with client.get(f"{gw.url}/public/auth", headers=bearer("anything-goes")) as resp:
        echo = await echo_of(resp)
    assert header_values(echo, "Authorization") == ["Bearer anything-goes"]
