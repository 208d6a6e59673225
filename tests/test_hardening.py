"""Hardening contract: limits with clear answers, request smuggling, forwarding headers from
untrusted peers, token secrecy, and property-based checks of routing and decisions.

Everything runs over real loopback sockets; raw sockets wherever the exact bytes matter. A
counting upstream records every request (and every body byte) that reaches it, so "never
forwarded" is asserted, not assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.config import Route, Upstream
from gateway.decision import Decider
from gateway.emulator import Emulator, Override
from gateway.introspection import DEFAULT_CHALLENGES
from gateway.routing import PathError, Router, parse_target
from gateway.verdict import Active, Inactive
from tests.conftest import (
    HOST,
    SERVICE_ID,
    SERVICE_TOKEN,
    StartGateway,
    free_port,
    gateway_run,
    read_until_closed,
    start_app,
)

# --------------------------------------------------------------------------- helpers


@dataclass
class Seen:
    """One request as the counting upstream received it; `body` grows as bytes arrive."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class Counting:
    """An upstream that records everything it receives and answers 200 with a small JSON."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        seen = Seen(request.method, request.raw_path, list(request.headers.items()))
        self.seen.append(seen)
        with contextlib.suppress(Exception):
            async for chunk in request.content.iter_any():
                seen.body += chunk
            seen.complete = True
        # Says nothing about the request: answers must never echo a client's secrets.
        return web.json_response({"ok": True})

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


@pytest.fixture
async def counting() -> AsyncIterator[Counting]:
    upstream = Counting()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner, url, _ = await start_app(app)
    upstream.url = url
    try:
        yield upstream
    finally:
        await runner.cleanup()


def public(upstream: str, prefix: str = "/public", **extra: Any) -> dict[str, Any]:
    name = prefix.strip("/") or "root"
    return {"name": name, "path_prefix": prefix, "upstream": upstream, "auth": "none", **extra}


def protected(upstream: str, prefix: str = "/api", **extra: Any) -> dict[str, Any]:
    return {
        "name": prefix.strip("/") or "root",
        "path_prefix": prefix,
        "upstream": upstream,
        **extra,
    }


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body)


def parse_one(data: bytes) -> tuple[Reply, bytes]:
    """Split the first complete HTTP/1.1 response (Content-Length or chunked) off `data`."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:300]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    reply = Reply(status, headers, b"")
    length = reply.header("Content-Length")
    if length is not None:
        size = int(length)
        assert len(rest) >= size, f"truncated body: {data[:300]!r}"
        return Reply(status, headers, rest[:size]), rest[size:]
    if "chunked" in (reply.header("Transfer-Encoding") or "").lower():
        body = bytearray()
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                _, _, rest = rest.partition(b"\r\n")
                return Reply(status, headers, bytes(body)), rest
            body += rest[:size]
            rest = rest[size + 2 :]
    return Reply(status, headers, rest), b""


async def converse(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send exact bytes, then read until the gateway closes (or `timeout`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_until_closed(reader, timeout)
    finally:
        writer.close()


def request(
    method: str,
    target: str,
    headers: list[str],
    body: bytes = b"",
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {target} {version}", f"Host: {HOST}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


PIPELINED = request("GET", "/public/second", [])


def assert_json_error(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    content_type = (reply.header("Content-Type") or "").split(";")[0].strip()
    assert content_type == "application/json", reply.headers
    assert reply.header("Cache-Control") == "no-store", reply.headers
    doc: dict[str, Any] = reply.json()
    assert isinstance(doc.get("error"), str) and doc["error"], doc
    assert isinstance(doc.get("error_description"), str), doc
    return doc


async def settle() -> None:
    """Give anything the gateway might (wrongly) forward the time to reach the upstream."""
    await asyncio.sleep(0.05)


# =========================================================================== limits


async def test_overlong_request_line_is_431_json_and_closed(
    start_gateway: StartGateway, counting: Counting
) -> None:
    gw = await start_gateway([public(counting.url)])
    data, closed = await converse(gw.port, request("GET", "/public/" + "a" * 9000, []) + PIPELINED)
    reply, rest = parse_one(data)
    assert_json_error(reply, 431)
    assert closed and rest == b""
    await settle()
    assert counting.seen == []


async def test_overlong_header_is_431_json_and_closed(
    start_gateway: StartGateway, counting: Counting
) -> None:
    gw = await start_gateway([public(counting.url)])
    data, closed = await converse(
        gw.port, request("GET", "/public/x", ["X-Big: " + "b" * 9000]) + PIPELINED
    )
    reply, rest = parse_one(data)
    assert_json_error(reply, 431)
    assert closed and rest == b""
    await settle()
    assert counting.seen == []


async def test_max_header_bytes_is_configurable(
    start_gateway: StartGateway, counting: Counting
) -> None:
    gw = await start_gateway([public(counting.url)], limits={"max_header_bytes": 2048})
    data, _ = await converse(
        gw.port, request("GET", "/public/ok", ["X-Mid: " + "m" * 1500, "Connection: close"])
    )
    assert parse_one(data)[0].status == 200
    data, closed = await converse(gw.port, request("GET", "/public/big", ["X-Mid: " + "m" * 3000]))
    assert_json_error(parse_one(data)[0], 431)
    assert closed
    await settle()
    assert counting.paths() == ["/public/ok"]


async def test_too_many_headers_is_431(start_gateway: StartGateway, counting: Counting) -> None:
    gw = await start_gateway([public(counting.url)])
    many = [f"X-H{i}: v" for i in range(150)]  # default limits.max_headers is 100
    data, closed = await converse(gw.port, request("GET", "/public/many", many) + PIPELINED)
    reply, rest = parse_one(data)
    assert_json_error(reply, 431)
    assert closed and rest == b""
    await settle()
    assert counting.seen == []


async def test_max_headers_is_configurable(start_gateway: StartGateway, counting: Counting) -> None:
    gw = await start_gateway([public(counting.url)], limits={"max_headers": 20})
    few = [f"X-H{i}: v" for i in range(10)]
    data, _ = await converse(gw.port, request("GET", "/public/few", [*few, "Connection: close"]))
    assert parse_one(data)[0].status == 200
    many = [f"X-H{i}: v" for i in range(30)]
    data, closed = await converse(gw.port, request("GET", "/public/many", many))
    assert_json_error(parse_one(data)[0], 431)
    assert closed
    await settle()
    assert counting.paths() == ["/public/few"]


# --------------------------------------------------------------------------- body size


async def test_content_length_over_route_limit_is_413_before_forwarding(
    start_gateway: StartGateway, counting: Counting
) -> None:
    gw = await start_gateway([public(counting.url, max_body_bytes=1024)])
    body = b"x" * 1025
    data, closed = await converse(
        gw.port, request("POST", "/public/up", ["Content-Length: 1025"], body) + PIPELINED
    )
    reply, rest = parse_one(data)
    assert_json_error(reply, 413)
    assert closed and rest == b""
    await settle()
    assert counting.seen == []


async def test_content_length_at_route_limit_is_forwarded_whole(
    start_gateway: StartGateway, counting: Counting
) -> None:
    gw = await start_gateway([public(counting.url, max_body_bytes=1024)])
    body = b"y" * 1024
    data, _ = await converse(
        gw.port, request("POST", "/public/up", ["Content-Length: 1024", "Connection: close"], body)
    )
    assert parse_one(data)[0].status == 200
    assert [bytes(s.body) for s in counting.seen] == [body]


def chunked(body: bytes, size: int) -> bytes:
    out = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    )
    return out + b"0\r\n\r\n"


async def test_chunked_body_over_route_limit_is_413_and_upstream_gets_at_most_the_limit(
    start_gateway: StartGateway, counting: Counting
) -> None:
    gw = await start_gateway([public(counting.url, max_body_bytes=1024)])
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(request("POST", "/public/stream", ["Transfer-Encoding: chunked"]))
        # The body arrives in pieces, so the gateway has started forwarding when the
        # limit is crossed.
        for i in range(16):
            writer.write(chunked(bytes([65 + i]) * 256, 256)[:-5])
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            await asyncio.sleep(0.02)
        with contextlib.suppress(ConnectionError):
            writer.write(b"0\r\n\r\n" + PIPELINED)
            await writer.drain()
        data, closed = await read_until_closed(reader, 5)
    finally:
        writer.close()
    reply, rest = parse_one(data)
    assert_json_error(reply, 413)
    assert closed and rest == b""
    await settle()
    assert "/public/second" not in counting.paths()
    for seen in counting.seen:
        assert len(seen.body) <= 1024, len(seen.body)
        assert not seen.complete or len(seen.body) <= 1024


async def test_chunked_body_within_route_limit_is_forwarded(
    start_gateway: StartGateway, counting: Counting
) -> None:
    gw = await start_gateway([public(counting.url, max_body_bytes=1024)])
    body = bytes(range(256)) * 4
    data, _ = await converse(
        gw.port,
        request(
            "POST",
            "/public/stream",
            ["Transfer-Encoding: chunked", "Connection: close"],
            chunked(body, 100),
        ),
    )
    assert parse_one(data)[0].status == 200
    assert [bytes(s.body) for s in counting.seen] == [body]


async def test_global_body_limit_is_the_route_default(
    start_gateway: StartGateway, counting: Counting
) -> None:
    gw = await start_gateway(
        [public(counting.url, "/small"), public(counting.url, "/large", max_body_bytes=1000)],
        limits={"max_body_bytes": 100},
    )
    body = b"z" * 200
    data, _ = await converse(gw.port, request("POST", "/small", ["Content-Length: 200"], body))
    assert_json_error(parse_one(data)[0], 413)
    data, _ = await converse(
        gw.port, request("POST", "/large", ["Content-Length: 200", "Connection: close"], body)
    )
    assert parse_one(data)[0].status == 200
    assert counting.paths() == ["/large"]


# --------------------------------------------------------------------------- slow clients

SLOW = {"header_timeout": 1, "idle_timeout": 1}


async def dribble(writer: asyncio.StreamWriter, data: bytes, interval: float = 0.2) -> None:
    """Send `data` one byte every `interval` seconds, until done or the peer is gone."""
    for byte in data:
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(interval)


async def test_slowloris_gets_408_and_is_closed(
    start_gateway: StartGateway, counting: Counting
) -> None:
    gw = await start_gateway([public(counting.url)], limits={"header_timeout": 1})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    started = time.monotonic()
    # One header byte every 0.2 s: far longer than header_timeout in all.
    slow = b"GET /public/slow HTTP/1.1\r\nHost: gateway.test\r\nX-Slow: " + b"s" * 100
    sender = asyncio.create_task(dribble(writer, slow))
    try:
        data, closed = await read_until_closed(reader, 12)
    finally:
        sender.cancel()
        writer.close()
    elapsed = time.monotonic() - started
    assert data, f"no answer to a slowloris after {elapsed:.1f}s"
    assert_json_error(parse_one(data)[0], 408)
    assert closed
    assert counting.seen == []


async def test_idle_connection_that_never_sends_is_closed(
    start_gateway: StartGateway, counting: Counting
) -> None:
    # idle_timeout is long: the header timeout runs from the connection's start.
    gw = await start_gateway(
        [public(counting.url)], limits={"header_timeout": 1, "idle_timeout": 30}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        data, closed = await read_until_closed(reader, 8)
    finally:
        writer.close()
    assert closed, "a connection that never sent a byte was kept open"
    if data:
        assert parse_one(data)[0].status == 408


async def test_slow_second_request_on_keep_alive_connection_gets_408(
    start_gateway: StartGateway, counting: Counting
) -> None:
    # idle_timeout is long: only the header timeout can end this.
    gw = await start_gateway(
        [public(counting.url)], limits={"header_timeout": 1, "idle_timeout": 30}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(request("GET", "/public/first", []))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        assert length is not None, head
        await reader.readexactly(int(length.group(1)))
        slow = b"GET /public/second HTTP/1.1\r\nHost: gateway.test\r\nX-Slow: " + b"s" * 100
        sender = asyncio.create_task(dribble(writer, slow))
        try:
            data, closed = await read_until_closed(reader, 12)
        finally:
            sender.cancel()
    finally:
        writer.close()
    assert data, "no answer to a slow second request"
    assert_json_error(parse_one(data)[0], 408)
    assert closed
    assert counting.paths() == ["/public/first"]


async def test_idle_keep_alive_connection_is_closed_after_idle_timeout(
    start_gateway: StartGateway, counting: Counting
) -> None:
    gw = await start_gateway([public(counting.url)], limits=SLOW)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(request("GET", "/public/once", []))
        await writer.drain()
        data, closed = await read_until_closed(reader, 8)
    finally:
        writer.close()
    assert parse_one(data)[0].status == 200
    assert closed, "an idle keep-alive connection was kept open past idle_timeout"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_client_stopping_mid_body_gets_408(
    start_gateway: StartGateway, counting: Counting, framing: str
) -> None:
    gw = await start_gateway(
        [public(counting.url)], limits={"header_timeout": 5, "idle_timeout": 1}
    )
    if framing == "chunked":
        head = request("POST", "/public/stall", ["Transfer-Encoding: chunked"])
        part = b"a\r\n0123456789\r\n"
    else:
        head = request("POST", "/public/stall", ["Content-Length: 100"])
        part = b"0123456789"
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(head + part)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"\r\nConnection: close\r\n" in answer, answer
    for seen in counting.seen:
        assert not seen.complete


async def test_content_length_over_limit_is_413_before_the_body_is_sent(
    start_gateway: StartGateway, counting: Counting
) -> None:
    """The declared length alone is enough: the gateway neither waits for the body nor asks
    for it (no `100 Continue`)."""
    gw = await start_gateway(
        [public(counting.url, max_body_bytes=1024)], limits={"idle_timeout": 30}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(
            request("PUT", "/public/big", ["Content-Length: 10000000", "Expect: 100-continue"])
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer
    await settle()
    assert counting.seen == []


@pytest.mark.parametrize("case", ["408-stalled-body", "413-unsent-body"])
async def test_a_refused_body_closes_the_connection_at_once(
    start_gateway: StartGateway, counting: Counting, case: str
) -> None:
    """After a 408 or 413 the connection is closed, not kept open waiting for (and
    discarding) the rest of a body the client may never send."""
    gw = await start_gateway(
        [public(counting.url, max_body_bytes=1024)],
        limits={"header_timeout": 5, "idle_timeout": 1},
    )
    if case == "408-stalled-body":
        data = request("POST", "/public/stall", ["Content-Length: 100"], b"0123456789")
    else:
        data = request("POST", "/public/big", ["Content-Length: 10000000"])
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        answered = time.monotonic() - started
        _, closed = await read_until_closed(reader, 5)
    finally:
        writer.close()
    assert head.startswith(case[:3].encode(), len(b"HTTP/1.1 ")), head
    assert closed, (
        f"answered {case[:3]} after {answered:.1f}s, but the connection was still open "
        f"{time.monotonic() - started - answered:.1f}s later"
    )


# --------------------------------------------------------------------------- connections


async def test_connection_cap_refuses_with_503_and_recovers(
    start_gateway: StartGateway, counting: Counting, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([public(counting.url)], limits={"max_connections": 3})
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for i in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            held.append((reader, writer))
            writer.write(request("GET", f"/public/held{i}", []))
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
        # The fourth is refused at once, without a request being read.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            data, closed = await read_until_closed(reader, 5)
        finally:
            writer.close()
        reply, rest = parse_one(data)
        assert_json_error(reply, 503)
        assert closed and rest == b""
        # Once one closes, a new connection is served.
        held.pop()[1].close()
        deadline = time.monotonic() + 5
        while True:
            data, _ = await converse(
                gw.port, request("GET", "/public/after", ["Connection: close"])
            )
            status = parse_one(data)[0].status
            if status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert status == 200
    finally:
        for _, writer in held:
            writer.close()
    assert sorted(counting.paths()) == [
        "/public/after",
        "/public/held0",
        "/public/held1",
        "/public/held2",
    ]


# =========================================================================== smuggling

CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"

# (id, framing header lines, body, HTTP version)
AMBIGUOUS: list[tuple[str, list[str], bytes, str]] = [
    ("cl-then-te", ["Content-Length: 4", "Transfer-Encoding: chunked"], CHUNKED_HELLO, "1.1"),
    ("te-then-cl", ["Transfer-Encoding: chunked", "Content-Length: 4"], CHUNKED_HELLO, "1.1"),
    ("cl-and-te-identity", ["Content-Length: 5", "Transfer-Encoding: identity"], b"hello", "1.1"),
    ("cl-conflicting", ["Content-Length: 5", "Content-Length: 6"], b"hello!", "1.1"),
    ("cl-duplicate", ["Content-Length: 5", "Content-Length: 5"], b"hello", "1.1"),
    ("cl-list", ["Content-Length: 5, 5"], b"hello", "1.1"),
    ("cl-plus", ["Content-Length: +5"], b"hello", "1.1"),
    ("cl-hex", ["Content-Length: 0x5"], b"hello", "1.1"),
    ("cl-negative", ["Content-Length: -5"], b"hello", "1.1"),
    ("obs-fold", ["Content-Length: 5", "X-Folded: a", " b"], b"hello", "1.1"),
    ("obs-fold-tab", ["Content-Length: 5", "X-Folded: a", "\tb"], b"hello", "1.1"),
    ("obs-fold-te", ["Transfer-Encoding: identity", " chunked"], CHUNKED_HELLO, "1.1"),
    ("te-gzip-chunked", ["Transfer-Encoding: gzip, chunked"], CHUNKED_HELLO, "1.1"),
    ("te-chunked-identity", ["Transfer-Encoding: chunked, identity"], CHUNKED_HELLO, "1.1"),
    ("te-identity", ["Transfer-Encoding: identity"], b"hello", "1.1"),
    ("te-xchunked", ["Transfer-Encoding: xchunked"], CHUNKED_HELLO, "1.1"),
    ("te-chunked-chunked", ["Transfer-Encoding: chunked, chunked"], CHUNKED_HELLO, "1.1"),
    (
        "te-duplicate-headers",
        ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
        CHUNKED_HELLO,
        "1.1",
    ),
    (
        "te-chunked-then-identity",
        ["Transfer-Encoding: chunked", "Transfer-Encoding: identity"],
        CHUNKED_HELLO,
        "1.1",
    ),
    ("te-http10", ["Transfer-Encoding: chunked"], CHUNKED_HELLO, "1.0"),
    ("te-space-before-colon", ["Transfer-Encoding : chunked"], CHUNKED_HELLO, "1.1"),
    ("te-vertical-tab", ["Transfer-Encoding:\x0bchunked"], CHUNKED_HELLO, "1.1"),
    ("te-nbsp", ["Transfer-Encoding: \xa0chunked"], CHUNKED_HELLO, "1.1"),
]


@pytest.mark.parametrize(
    ("framing", "body", "version"),
    [case[1:] for case in AMBIGUOUS],
    ids=[case[0] for case in AMBIGUOUS],
)
async def test_ambiguous_framing_is_400_closed_and_never_forwarded(
    start_gateway: StartGateway,
    counting: Counting,
    framing: list[str],
    body: bytes,
    version: str,
) -> None:
    gw = await start_gateway([public(counting.url)])
    first = request("POST", "/public/first", framing, body, version=f"HTTP/{version}")
    data, closed = await converse(gw.port, first + PIPELINED)
    reply, rest = parse_one(data)
    assert reply.status == 400, (reply.status, reply.body)
    assert reply.json()["error"] == "invalid_request"
    assert closed, "the connection stayed open after an ambiguous message"
    assert rest == b"", f"a pipelined request was answered: {rest[:200]!r}"
    await settle()
    assert counting.seen == [], counting.paths()


@pytest.mark.parametrize(
    ("target", "routes"),
    [("/nowhere", "public-only"), ("/api/x", "protected")],
    ids=["unrouted", "protected-no-token"],
)
async def test_ambiguous_framing_closes_the_connection_on_any_path(
    start_gateway: StartGateway, counting: Counting, emulator: Emulator, target: str, routes: str
) -> None:
    """Whatever the gateway answers, the bytes after an ambiguous message must not be read as
    a new request: a front proxy may have framed them differently."""
    table = [public(counting.url)]
    if routes == "protected":
        table.append(protected(counting.url))
    gw = await start_gateway(table)
    first = request(
        "POST", target, ["Content-Length: 4", "Transfer-Encoding: chunked"], CHUNKED_HELLO
    )
    data, closed = await converse(gw.port, first + PIPELINED)
    reply, rest = parse_one(data)
    assert reply.status == 400, (reply.status, reply.body)
    assert closed and rest == b"", rest[:200]
    await settle()
    assert counting.seen == []
    assert emulator.calls == 0


@pytest.mark.parametrize("te", ["chunked", "Chunked", "CHUNKED", " chunked "])
async def test_plain_chunked_is_forwarded_and_keeps_the_connection(
    start_gateway: StartGateway, counting: Counting, te: str
) -> None:
    """The control for the table above: one plain `chunked` works, keep-alive included."""
    gw = await start_gateway([public(counting.url)])
    first = request("POST", "/public/first", [f"Transfer-Encoding:{te}"], CHUNKED_HELLO)
    last = request("GET", "/public/second", ["Connection: close"])
    data, closed = await converse(gw.port, first + last)
    reply, rest = parse_one(data)
    assert reply.status == 200, reply.body
    assert parse_one(rest)[0].status == 200
    assert closed
    assert counting.paths() == ["/public/first", "/public/second"]
    assert bytes(counting.seen[0].body) == b"hello"
    assert counting.seen[0].values("Transfer-Encoding") in ([], ["chunked"])


# =========================================================================== headers

BAD_HEADER_BYTES = [
    ("cr-in-value", b"X-Test: a\rb"),
    ("nul-in-value", b"X-Test: a\x00b"),
    ("bare-lf-line-end", b"X-Test: a\nb"),
    ("bare-lf-then-header", b"X-Test: a\nX-Auth-Subject: mallory"),
    ("cr-in-name", b"X-Te\rst: a"),
    ("nul-in-authorization", b"Authorization: Bearer abc\x00def"),
    ("space-before-colon", b"X-Auth-Subject : mallory"),
]


@pytest.mark.parametrize(
    "line", [c[1] for c in BAD_HEADER_BYTES], ids=[c[0] for c in BAD_HEADER_BYTES]
)
@pytest.mark.parametrize("route", ["public", "protected"])
async def test_control_characters_in_headers_are_400_and_never_forwarded(
    start_gateway: StartGateway, counting: Counting, emulator: Emulator, line: bytes, route: str
) -> None:
    emulator.add_token("tok-ctl", scopes=["s"])
    gw = await start_gateway([public(counting.url), protected(counting.url, scopes=["s"])])
    target = b"/public/ctl" if route == "public" else b"/api/ctl"
    raw = b"GET " + target + b" HTTP/1.1\r\nHost: gateway.test\r\n"
    if route == "protected":
        raw += b"Authorization: Bearer tok-ctl\r\n" if b"Authorization" not in line else b""
    raw += line + b"\r\n\r\n"
    data, closed = await converse(gw.port, raw + PIPELINED)
    reply, rest = parse_one(data)
    assert reply.status == 400, (reply.status, reply.body)
    assert closed and rest == b""
    await settle()
    assert counting.seen == []


async def test_identity_header_copies_in_every_case_are_replaced_on_protected_route(
    start_gateway: StartGateway, counting: Counting, emulator: Emulator
) -> None:
    emulator.add_token("tok-dup", subject="alice", client_id=7, scopes=["read"])
    gw = await start_gateway([protected(counting.url, scopes=["read"])])
    spoofed = [
        "X-Auth-Subject: root",
        "x-auth-subject: root2",
        "X-AUTH-SUBJECT: root3",
        "x-AuTh-sUbJeCt: root4",
        "X_Auth_Subject: root5",
        "x_auth_subject: root6",
        "X-Auth-Scopes: admin",
        "x-auth-scopes: admin2",
        "X-AUTH-SCOPES: admin3",
        "X_AUTH_scopes: admin4",
        "X-Auth-Client-Id: 1",
        "x-auth-client-id: 2",
        "X-AUTH-CLIENT-ID: 3",
        "X-Auth-Client_Id: 4",
    ]
    # spoofs before and after the Authorization header
    head = [*spoofed[:7], "Authorization: Bearer tok-dup", *spoofed[7:], "Connection: close"]
    data, _ = await converse(gw.port, request("GET", "/api/who", head))
    assert parse_one(data)[0].status == 200
    (seen,) = counting.seen

    def folded(name: str) -> list[str]:
        return [v for k, v in seen.headers if k.lower().replace("_", "-") == name.lower()]

    assert folded("X-Auth-Subject") == ["alice"]
    assert folded("X-Auth-Scopes") == ["read"]
    assert folded("X-Auth-Client-Id") == ["7"]


FORWARDING_CLAIMS = [
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-Prefix", "/admin"),
    ("X-Forwarded-Uri", "/admin/secret"),
    ("X-Original-Uri", "/admin/secret"),
    ("X-Real-Ip", "10.9.8.7"),
    ("Forwarded", "for=10.9.8.7;proto=https;host=evil.example"),
    ("X-Forwarded-For", "10.9.8.7"),
]
DROPPED_FROM_UNTRUSTED = (
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Forwarded-Uri",
    "X-Original-Uri",
    "X-Real-Ip",
    "Forwarded",
)


@pytest.mark.parametrize(
    "trusted", [None, ["10.0.0.0/8", "::1/128"]], ids=["default", "other-network"]
)
@pytest.mark.parametrize("route", ["public", "protected"])
async def test_forwarding_claims_from_untrusted_peers_are_replaced_or_dropped(
    start_gateway: StartGateway,
    counting: Counting,
    emulator: Emulator,
    trusted: list[str] | None,
    route: str,
) -> None:
    emulator.add_token("tok-fwd", scopes=["s"])
    overrides = {} if trusted is None else {"trusted_proxies": trusted}
    gw = await start_gateway(
        [public(counting.url), protected(counting.url, scopes=["s"])], **overrides
    )
    target = "/public/fwd" if route == "public" else "/api/fwd"
    lines = [f"{k}: {v}" for k, v in FORWARDING_CLAIMS] + ["Connection: close"]
    if route == "protected":
        lines.append("Authorization: Bearer tok-fwd")
    data, _ = await converse(gw.port, request("GET", target, lines))
    assert parse_one(data)[0].status == 200, data[:300]
    (seen,) = counting.seen
    assert seen.values("X-Forwarded-Proto") == ["http"]
    assert seen.values("X-Forwarded-Host") == [HOST]
    for name in DROPPED_FROM_UNTRUSTED:
        assert seen.values(name) == [], (name, seen.headers)
    xff = ", ".join(seen.values("X-Forwarded-For"))
    assert xff.split(",")[-1].strip() == "127.0.0.1", xff


async def test_forwarding_claims_from_a_trusted_proxy_are_kept(
    start_gateway: StartGateway, counting: Counting
) -> None:
    gw = await start_gateway([public(counting.url)], trusted_proxies=["127.0.0.0/8"])
    lines = [f"{k}: {v}" for k, v in FORWARDING_CLAIMS] + ["Connection: close"]
    data, _ = await converse(gw.port, request("GET", "/public/fwd", lines))
    assert parse_one(data)[0].status == 200
    (seen,) = counting.seen
    assert seen.values("X-Forwarded-Proto") == ["https"]
    assert seen.values("X-Forwarded-Host") == ["evil.example"]
    assert seen.values("Forwarded") == ["for=10.9.8.7;proto=https;host=evil.example"]
    xff = ", ".join(seen.values("X-Forwarded-For"))
    assert [h.strip() for h in xff.split(",")] == ["10.9.8.7", "127.0.0.1"]
    # The upstream still sees its own Host, whoever the peer is.
    assert seen.values("Host") != [HOST]


# =========================================================================== gateway run


def _authlete(base_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "base_url": base_url,
        "allow_insecure_http": True,
        "service_id": SERVICE_ID,
        "access_token": SERVICE_TOKEN,
        **extra,
    }


async def test_connection_limits_hold_under_gateway_run(
    tmp_path: Path, emulator: Emulator, counting: Counting
) -> None:
    """The header timeout and the connection cap, in the process `gateway run` starts (its
    default event loop, uvloop, has transports of its own)."""
    cfg = {
        "authlete": _authlete(emulator.base_url),
        "limits": {"header_timeout": 1, "max_connections": 3},
        "routes": [public(counting.url)],
    }
    async with gateway_run(tmp_path, cfg) as gw:
        # slowloris
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        slow = b"GET /public/slow HTTP/1.1\r\nHost: gateway.test\r\nX-Slow: " + b"s" * 100
        sender = asyncio.create_task(dribble(writer, slow))
        try:
            data, closed = await read_until_closed(reader, 8)
        finally:
            sender.cancel()
            writer.close()
        assert data, f"no answer to a slowloris: {gw.stderr()[-2000:]}"
        assert_json_error(parse_one(data)[0], 408)
        assert closed

        # a connection that never sends
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            data, closed = await read_until_closed(reader, 8)
        finally:
            writer.close()
        assert closed, f"an idle connection was kept open: {gw.stderr()[-2000:]}"

        # the connection cap, and recovery
        held = []
        try:
            for i in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                held.append(writer)
                writer.write(request("GET", f"/public/held{i}", []))
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200"), head
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            try:
                data, closed = await read_until_closed(reader, 5)
            finally:
                writer.close()
            assert data, f"the connection over the cap got no answer: {gw.stderr()[-2000:]}"
            assert_json_error(parse_one(data)[0], 503)
            assert closed
            held.pop().close()
            deadline = time.monotonic() + 5
            while True:
                data, _ = await converse(
                    gw.port, request("GET", "/public/after", ["Connection: close"])
                )
                if parse_one(data)[0].status == 200 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert parse_one(data)[0].status == 200
        finally:
            for writer in held:
                writer.close()
    assert "Traceback" not in gw.stderr(), gw.stderr()[-3000:]


# =========================================================================== token secrecy

SECRET = "Zq8vN-SeCrEt.tOkEn_4711~kWp3"


def _leaks(text: str, secret: str = SECRET, window: int = 10) -> list[str]:
    """Every `window`-character piece of the secret found in `text` (a truncated token is a
    leak too)."""
    pieces = {secret[i : i + window] for i in range(len(secret) - window + 1)}
    return sorted(p for p in pieces if p in text)


async def test_token_never_appears_in_output_metrics_or_answers(
    tmp_path: Path, emulator: Emulator, counting: Counting
) -> None:
    """`gateway run` with debug logging and the access log sees one token through every path
    we know; nothing it writes anywhere (stdout, stderr, /metrics, answers) holds the token."""
    emulator.add_token(SECRET, subject="alice", scopes=["s"])
    cfg = {
        "log": {"level": "debug", "access": True},
        "authlete": _authlete(
            emulator.base_url,
            timeout=1,
            deadline=2,
            retries=0,
            circuit_breaker={"failures": 1000},
        ),
        "cache": {"ttl": 0, "negative_ttl": 0},  # every request asks Authlete
        "limits": {"header_timeout": 1},
        "routes": [
            {"name": "api", "path_prefix": "/api", "upstream": counting.url, "scopes": ["s"]},
            {"name": "adm", "path_prefix": "/adm", "upstream": counting.url, "scopes": ["adm"]},
            {
                "name": "down",
                "path_prefix": "/down",
                "upstream": f"http://127.0.0.1:{free_port()}",
            },
            {"name": "pub", "path_prefix": "/pub", "upstream": counting.url, "auth": "none"},
        ],
    }
    answers: list[bytes] = []
    statuses: dict[str, int] = {}
    auth = f"Authorization: Bearer {SECRET}"

    def get(target: str, *lines: str) -> bytes:
        return request("GET", target, [*lines, "Connection: close"])

    async with gateway_run(tmp_path, cfg) as gw:

        async def send(name: str, raw: bytes, timeout: float = 8) -> None:
            try:
                data, _ = await converse(gw.port, raw, timeout)
            except ConnectionError as exc:  # refused outright: nothing was written back
                data = repr(exc).encode()
            answers.append(data)
            statuses[name] = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0

        await send("valid", get("/api/a", auth))
        await send("valid-lowercase", get("/api/a", f"authorization: bearer {SECRET}"))
        await send("insufficient-scope", get("/adm/a", auth))
        await send("upstream-refused", get("/down/a", auth))
        await send("public-with-token", get("/pub/a", auth))
        await send("two-tokens", get("/api/a", f"{auth} {SECRET}"))
        await send("tab", get("/api/a", f"Authorization: Bearer\t{SECRET}"))
        await send("bad-char", get("/api/a", f"{auth},"))
        await send("two-headers", get("/api/a", auth, auth))
        await send("other-scheme", get("/api/a", f"Authorization: Basic {SECRET}"))
        await send("over-long", get("/api/a", f"Authorization: Bearer {SECRET * 200}"))
        await send("control-byte", get("/api/a", f"{auth}\x01"))
        await send("nul-byte", get("/api/a", f"{auth}\x00x"))
        await send("header-too-large", get("/api/a", auth, "X-Pad: " + "p" * 9000))
        await send("too-many-headers", get("/api/a", auth, *(f"X-{i}: v" for i in range(150))))
        await send(
            "smuggling",
            request(
                "POST",
                "/api/a",
                [auth, "Content-Length: 4", "Transfer-Encoding: chunked"],
                CHUNKED_HELLO,
            ),
        )
        # The token in the head of a request that never completes. (Whether it gets its 408
        # under `gateway run` is test_connection_limits_hold_under_gateway_run's business.)
        await send("slow-head", f"GET /api/a HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode(), 4)
        await send("query", get(f"/pub/a?access_token={SECRET}"))
        emulator.override = Override(status=500, body=f'{{"echo":"{SECRET}"}}'.encode())
        await send("authlete-500", get("/api/a", auth))
        emulator.override = Override(status=200, body=f"<html>{SECRET}</html>".encode())
        await send("authlete-garbage", get("/api/a", auth))
        emulator.override = Override(status=200, reset=True)
        await send("authlete-reset", get("/api/a", auth))
        emulator.override = Override(status=400, body=f"{SECRET} is bad".encode())
        await send("authlete-400", get("/api/a", auth))
        emulator.override = None
        emulator.revoke(SECRET)
        await send("revoked", get("/api/a", auth))
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{gw.admin_url}/metrics") as resp,
        ):
            metrics = await resp.text()
    stdout, stderr = gw.stdout(), gw.stderr()
    # The paths were really taken (so the absence of the token means something).
    assert statuses.pop("slow-head") in (408, 0)
    assert statuses == {
        "valid": 200,
        "valid-lowercase": 200,
        "insufficient-scope": 403,
        "upstream-refused": 502,
        "public-with-token": 200,
        "two-tokens": 400,
        "tab": 400,
        "bad-char": 400,
        "two-headers": 400,
        "other-scheme": 401,
        "over-long": 400,
        "control-byte": 400,
        "nul-byte": 400,
        "header-too-large": 431,
        "too-many-headers": 431,
        "smuggling": 400,
        "query": 200,
        "authlete-500": 503,
        "authlete-garbage": 503,
        "authlete-reset": 503,
        "authlete-400": 503,
        "revoked": 401,
    }, statuses
    assert emulator.calls >= 8
    assert stdout.count('"status":') >= 15, stdout
    assert "WARNING" in stderr and "malformed request" in stderr, stderr
    assert gw.proc.returncode == 0, stderr
    for where, text in (("stdout", stdout), ("stderr", stderr), ("/metrics", metrics)):
        assert _leaks(text) == [], f"the token leaked into {where}"
    for answer in answers:
        assert _leaks(answer.decode("latin-1")) == [], answer[:500]


# =========================================================================== properties

_SEGMENTS = ["a", "b", "orders", "ord", "v1"]
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH"]
_SCOPES = ["read", "write", "admin"]
_ACTIONS = sorted(DEFAULT_CHALLENGES)
_ORIGIN = Upstream("http", "127.0.0.1", 9)

_prefixes = st.lists(st.sampled_from(_SEGMENTS), max_size=3).map(lambda s: "/" + "/".join(s))


@st.composite
def _routes(draw: st.DrawFn) -> tuple[Route, ...]:
    routes = []
    for i in range(draw(st.integers(min_value=1, max_value=5))):
        auth = draw(st.booleans())
        methods = draw(st.none() | st.frozensets(st.sampled_from(_METHODS), min_size=1))
        scopes = draw(st.lists(st.sampled_from(_SCOPES), unique=True)) if auth else []
        routes.append(
            Route(
                name=f"r{i}",
                path_prefix=draw(_prefixes),
                methods=methods,
                upstream=_ORIGIN,
                auth_required=auth,
                scopes=tuple(scopes),
                timeout=1.0,
            )
        )
    return tuple(routes)


_segment = st.sampled_from([*_SEGMENTS, "x", "ORDERS", "a;p=1", "orders;x", "..", ".", "%61"])
_paths = st.one_of(
    st.lists(_segment, max_size=4).map(lambda s: "/" + "/".join(s)),
    st.lists(_segment, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s) + "/"),
    st.text(max_size=20),
)

_verdicts = st.one_of(
    st.builds(
        lambda subject, client, scopes: Active(
            subject, str(client), tuple(scopes), " ".join(scopes), time.time() + 600
        ),
        st.none() | st.sampled_from(["alice", "bob"]),
        st.integers(min_value=0, max_value=2**63 - 1),
        st.lists(st.sampled_from([*_SCOPES, "other"]), unique=True),
    ),
    st.builds(
        lambda action, challenge: Inactive(action, challenge or DEFAULT_CHALLENGES[action]),
        st.sampled_from(_ACTIONS),
        st.sampled_from(["", 'Bearer error="invalid_token"']),
    ),
)


def _reference_match(routes: tuple[Route, ...], method: str, path: str) -> Route | None:
    """The documented rule, written independently: first route whose methods allow `method`
    and whose prefix is a whole-segment prefix of `path` with `;` parameters ignored."""
    segments = [seg.split(";")[0] for seg in path.split("/")[1:]]
    for route in routes:
        if route.methods is not None and method not in route.methods:
            continue
        wanted = [] if route.path_prefix == "/" else route.path_prefix.split("/")[1:]
        if segments[: len(wanted)] == wanted:
            return route
    return None


@settings(max_examples=500, deadline=None)
@given(
    routes=_routes(),
    method=st.sampled_from([*_METHODS, "OPTIONS"]),
    raw=_paths,
    verdict=_verdicts,
)
def test_routing_and_decision_never_raise_and_never_allow_wrongly(
    routes: tuple[Route, ...], method: str, raw: str, verdict: Active | Inactive
) -> None:
    try:
        target = parse_target(raw)
    except PathError:
        return  # refused with 400 before any route is consulted
    route = Router(routes).match(method, target.path)
    assert route is _reference_match(routes, method, target.path)
    if route is None or not route.auth_required:
        return
    refused = Decider("test").check(verdict, route.scopes)
    if refused is None:
        assert isinstance(verdict, Active), verdict
        assert set(route.scopes) <= set(verdict.scopes), (route.scopes, verdict.scopes)
    else:
        assert refused.status in (400, 401, 403, 500), refused
        if isinstance(verdict, Active):
            assert refused.status == 403
            assert not set(route.scopes) <= set(verdict.scopes)


@settings(max_examples=300, deadline=None)
@given(verdict=_verdicts, required=st.lists(st.sampled_from([*_SCOPES, "other"]), unique=True))
def test_decider_allows_exactly_active_verdicts_with_every_scope(
    verdict: Active | Inactive, required: list[str]
) -> None:
    refused = Decider("test").check(verdict, tuple(required))
    allowed = isinstance(verdict, Active) and set(required) <= set(verdict.scopes)
    assert (refused is None) == allowed, (verdict, required, refused)


# Tokens the emulator knows, with what a route may get from them.
_ACTIVE = {
    "p-read": ["read"],
    "p-rw": ["read", "write"],
    "p-all": ["read", "write", "admin"],
    "p-none": [],
}
_TOKENS = [*_ACTIVE, "p-expired", "p-unknown", None, "p bad"]


@st.composite
def _configs(draw: st.DrawFn) -> list[dict[str, Any]]:
    routes = []
    for i in range(draw(st.integers(min_value=1, max_value=4))):
        auth = draw(st.booleans())
        route: dict[str, Any] = {"name": f"r{i}", "path_prefix": draw(_prefixes)}
        if not auth:
            route["auth"] = "none"
        else:
            route["scopes"] = draw(st.lists(st.sampled_from(_SCOPES), unique=True))
        methods = draw(st.none() | st.lists(st.sampled_from(_METHODS), min_size=1, unique=True))
        if methods is not None:
            route["methods"] = methods
        routes.append(route)
    return routes


def _expected_status(routes: tuple[Route, ...], method: str, raw: str, token: str | None) -> int:
    try:
        path = parse_target(raw).path
    except PathError:
        return 400
    route = _reference_match(routes, method, path)
    if route is None:
        return 404
    if not route.auth_required:
        return 200
    if token is None:
        return 401
    if " " in token:
        return 400  # two tokens: malformed
    if token not in _ACTIVE:
        return 401  # unknown or expired
    return 200 if set(route.scopes) <= set(_ACTIVE[token]) else 403


_e2e_segment = st.sampled_from([*_SEGMENTS, "x", "a;p", "..", "%6f"])
_e2e_paths = st.lists(_e2e_segment, max_size=4).map(lambda s: "/" + "/".join(s))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    table=_configs(),
    requests=st.lists(
        st.tuples(st.sampled_from(_METHODS), _e2e_paths, st.sampled_from(_TOKENS)),
        min_size=1,
        max_size=6,
    ),
)
async def test_upstream_only_ever_sees_protected_requests_with_a_sufficient_token(
    emulator: Emulator,
    counting: Counting,
    table: list[dict[str, Any]],
    requests: list[tuple[str, str, str | None]],
) -> None:
    from gateway.app import Gateway
    from tests.conftest import make_config

    for name, scopes in _ACTIVE.items():
        emulator.add_token(name, scopes=scopes)
    emulator.add_token("p-expired", scopes=_SCOPES, lifetime=-60)
    for entry in table:
        entry["upstream"] = counting.url
    counting.seen.clear()
    gateway = Gateway(make_config(emulator.base_url, table))
    await gateway.start()
    routes = gateway.cfg.routes
    try:
        async with aiohttp.ClientSession() as session:
            for method, path, token in requests:
                headers = {} if token is None else {"Authorization": f"Bearer {token}"}
                url = URL(f"http://127.0.0.1:{gateway.proxy_port}{path}", encoded=True)
                async with session.request(method, url, headers=headers) as resp:
                    await resp.read()
                    expected = _expected_status(routes, method, path, token)
                    assert resp.status == expected, (method, path, token, table)
    finally:
        await gateway.stop()
    for seen in counting.seen:
        matched = _reference_match(routes, seen.method, seen.path)
        assert matched is not None, (seen.path, table)
        if not matched.auth_required:
            continue
        (auth,) = seen.values("Authorization")
        presented = auth.split(" ", 1)[1].strip()
        assert presented in _ACTIVE, (presented, seen.path, table)
        assert set(matched.scopes) <= set(_ACTIVE[presented]), (presented, matched, seen.path)
        assert seen.values("X-Auth-Scopes") == [" ".join(_ACTIVE[presented])]
