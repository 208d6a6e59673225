"""HTTP/1.1 conformance of the gateway's request path: a black-box suite over real loopback
sockets, the safety net for rewriting the listener and the upstream client.

The client side is a raw asyncio stream wherever exact bytes matter (which is nearly
everywhere); the upstream is a raw-socket server (`RawUpstream`) that records every byte and
every request head it receives, so "never forwarded" and "closed at once" are measured, not
assumed. Nothing of the gateway's HTTP path is mocked. Every wait is bounded: a hang fails the
test instead of blocking the suite.

What is covered, by section: 1 request framing and smuggling, 2 pipelining, 3 half-closed
clients, 4-5 clients leaving mid-body and mid-response, 6 early upstream answers, 7 a chunked
body turning invalid after it was forwarded, 8 invalid upstream framing, 9 obs-text header
bytes, 10 slow readers and writers, 11 large transfers, 12 `100 Continue` and other 1xx,
13 bodyless answers, 14 HTTP/1.0 clients, 15 close-delimited upstream answers, 16 stale pooled
upstream connections.

Large transfers (section 11) move 256 MiB each way by default; set GATEWAY_CONFORMANCE_BIG=1
to move 1 GiB instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from email.utils import parsedate_to_datetime
from typing import Any

import pytest

from gateway.emulator import Emulator
from tests.conftest import (
    WAIT,
    Answer,
    Client,
    KiB,
    MakeUpstream,
    MiB,
    RawUpstream,
    Response,
    RssWatch,
    Running,
    StartGateway,
    UpConn,
    UpRequest,
    chunked,
    dechunk,
    echo_answer,
    eventually,
    framing_of,
    head,
    http,
    parse_first,
    parse_response_head,
    response,
    sha,
)

TOKEN = "tok-conformance"
AUTH = f"Authorization: Bearer {TOKEN}"
CLOSE_WITHIN = 2.0  # "at once": a close that must not wait for some timeout to fire
BIG = (1 << 30) if os.environ.get("GATEWAY_CONFORMANCE_BIG") == "1" else 256 * MiB
MAX_GROWTH = 48 * MiB  # client, gateway and upstream all share this process
BLOCK = os.urandom(MiB)


# =========================================================================== client side


@functools.cache
def digest_of_blocks(count: int) -> str:
    h = hashlib.sha256()
    for _ in range(count):
        h.update(BLOCK)
    return h.hexdigest()


async def converse(port: int, data: bytes, timeout: float = WAIT) -> tuple[bytes, bool]:
    """Send exact bytes in one write, then read until the gateway closes (or `timeout`)."""
    client = await Client.open(port)
    try:
        await client.send(data)
        return await client.read_until_closed(timeout)
    finally:
        client.close()


async def fetch(port: int, data: bytes, method: str = "GET") -> Response:
    """One request on a new connection, one response read."""
    client = await Client.open(port)
    try:
        await client.send(data)
        return await client.response(method)
    finally:
        client.close()


def assert_json_error(resp: Response, *statuses: int) -> dict[str, Any]:
    assert resp.status in statuses, (resp.status, resp.body[:300])
    content_type = (resp.header("Content-Type") or "").split(";")[0].strip()
    assert content_type == "application/json", resp.headers
    doc = resp.json()
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str), doc
    return doc


def described(resp: Response) -> dict[str, Any]:
    """What the echo upstream says it received."""
    assert resp.status == 200, (resp.status, resp.body[:300])
    doc: dict[str, Any] = resp.json()
    return doc


def expected(method: str, target: str, body: bytes = b"") -> dict[str, Any]:
    return {"method": method, "target": target, "length": len(body), "sha256": sha(body)}


async def settle() -> None:
    """Give anything the gateway might (wrongly) forward the time to reach the upstream."""
    await asyncio.sleep(0.1)


Launch = Callable[..., Awaitable[Running]]


@pytest.fixture
def launch(start_gateway: StartGateway, emulator: Emulator) -> Launch:
    """`await launch(upstream, route={...}, **config)`: a gateway with a public route
    /public and a protected route /api (scope "s", TOKEN has it) to the same upstream."""
    emulator.add_token(TOKEN, subject="alice", scopes=["s"])

    async def go(
        upstream: RawUpstream, route: dict[str, Any] | None = None, **config: Any
    ) -> Running:
        extra = route or {}
        table: list[dict[str, Any]] = [
            {"name": "pub", "path_prefix": "/public", "upstream": upstream.url, "auth": "none"},
            {"name": "api", "path_prefix": "/api", "upstream": upstream.url, "scopes": ["s"]},
        ]
        return await start_gateway([{**r, **extra} for r in table], **config)

    return go


@pytest.fixture
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], None]]:
    """A check: nothing logged at ERROR or above, and no traceback at any level (gateway
    loggers at WARNING; anything else that reaches the root logger is caught too)."""
    caplog.set_level(logging.WARNING, logger="gateway")

    def check() -> None:
        bad = [
            f"{r.name} {r.levelname}: {r.getMessage()}"
            for r in caplog.records
            if r.levelno >= logging.ERROR or r.exc_info
        ]
        assert bad == [], bad

    yield check


# =========================================================================== memory


# =========================================================================== 1. framing

CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"
PIPELINED = head("GET", "/public/pipelined")


def post(lines: Sequence[str | bytes], body: bytes, version: str = "HTTP/1.1") -> bytes:
    return head("POST", "/public/framing", *lines, version=version) + body


TE_CHUNKED = "Transfer-Encoding: chunked"

MALFORMED: list[tuple[str, bytes]] = [
    ("cl-then-te", post(["Content-Length: 4", TE_CHUNKED], CHUNKED_HELLO)),
    ("te-then-cl", post([TE_CHUNKED, "Content-Length: 4"], CHUNKED_HELLO)),
    ("cl-conflicting", post(["Content-Length: 5", "Content-Length: 6"], b"hello!")),
    ("cl-duplicate", post(["Content-Length: 5", "Content-Length: 5"], b"hello")),
    ("cl-list", post(["Content-Length: 5, 5"], b"hello")),
    ("cl-non-numeric", post(["Content-Length: abc"], b"hello")),
    ("cl-trailing-garbage", post(["Content-Length: 5x"], b"hello")),
    ("cl-negative", post(["Content-Length: -5"], b"hello")),
    ("te-gzip-chunked", post(["Transfer-Encoding: gzip, chunked"], CHUNKED_HELLO)),
    ("te-chunked-chunked", post(["Transfer-Encoding: chunked, chunked"], CHUNKED_HELLO)),
    ("te-identity", post(["Transfer-Encoding: identity"], b"hello")),
    ("te-unknown", post(["Transfer-Encoding: xchunked"], CHUNKED_HELLO)),
    ("te-duplicated-headers", post([TE_CHUNKED, TE_CHUNKED], CHUNKED_HELLO)),
    ("te-in-http-1.0", post([TE_CHUNKED], CHUNKED_HELLO, version="HTTP/1.0")),
    ("obs-fold", post(["Content-Length: 5", "X-Folded: a", " b"], b"hello")),
    ("obs-fold-tab", post(["Content-Length: 5", "X-Folded: a", "\tb"], b"hello")),
    ("obs-fold-on-te", post(["Transfer-Encoding: identity", " chunked"], CHUNKED_HELLO)),
    ("bare-lf-in-head", post([b"X-A: a\nX-B: b", "Content-Length: 5"], b"hello")),
    ("cr-in-value", post([b"X-Test: a\rb", "Content-Length: 5"], b"hello")),
    ("nul-in-value", post([b"X-Test: a\x00b", "Content-Length: 5"], b"hello")),
    ("space-before-colon", post([b"X-Test : a", "Content-Length: 5"], b"hello")),
    ("space-before-colon-on-cl", post([b"Content-Length : 5"], b"hello")),
    ("chunk-size-not-hex", post([TE_CHUNKED], b"zz\r\nhello\r\n0\r\n\r\n")),
    ("chunk-size-overflow", post([TE_CHUNKED], b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n")),
    ("chunk-data-without-crlf", post([TE_CHUNKED], b"5\r\nhelloXX0\r\n\r\n")),
    ("chunk-size-bare-lf", post([TE_CHUNKED], b"5\nhello\r\n0\r\n\r\n")),
]


@pytest.mark.parametrize("data", [c[1] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
async def test_malformed_request_is_400_closed_and_never_forwarded(
    launch: Launch, raw_upstream: MakeUpstream, data: bytes
) -> None:
    up = await raw_upstream(http())
    gw = await launch(up)
    answer, closed = await converse(gw.port, data + PIPELINED)
    assert answer, "no answer at all"
    resp, rest = parse_first(answer)
    assert assert_json_error(resp, 400)["error"] == "invalid_request"
    assert closed, "the connection stayed open after a malformed request"
    assert rest == b"", f"a pipelined request was answered: {rest[:200]!r}"
    await settle()
    assert up.nbytes == 0, bytes(up.conns[0].prefix[:500])


BAD_VERSIONS: list[tuple[str, bytes]] = [
    ("http-2.0", b"GET /public/v HTTP/2.0\r\nHost: gateway.test\r\n\r\n"),
    ("http-0.9", b"GET /public/v HTTP/0.9\r\nHost: gateway.test\r\n\r\n"),
    ("missing", b"GET /public/v\r\nHost: gateway.test\r\n\r\n"),
    ("lowercase", b"GET /public/v http/1.1\r\nHost: gateway.test\r\n\r\n"),
    ("garbage", b"GET /public/v HTTP/1.1x\r\nHost: gateway.test\r\n\r\n"),
]


@pytest.mark.parametrize("data", [c[1] for c in BAD_VERSIONS], ids=[c[0] for c in BAD_VERSIONS])
async def test_bad_http_version_is_refused_closed_and_never_forwarded(
    launch: Launch, raw_upstream: MakeUpstream, data: bytes
) -> None:
    up = await raw_upstream(http())
    gw = await launch(up)
    answer, closed = await converse(gw.port, data + PIPELINED)
    assert answer, "no answer at all"
    resp, rest = parse_first(answer)
    doc = assert_json_error(resp, 400, 505)
    if resp.status == 400:
        assert doc["error"] == "invalid_request", doc
    assert closed, "the connection stayed open after a bad request line"
    assert rest == b"", f"a pipelined request was answered: {rest[:200]!r}"
    await settle()
    assert up.nbytes == 0, bytes(up.conns[0].prefix[:500])


# =========================================================================== 2. pipelining


async def test_pipelined_requests_are_answered_in_order_and_the_connection_kept(
    launch: Launch, raw_upstream: MakeUpstream
) -> None:
    up = await raw_upstream(http())
    gw = await launch(up)
    batch = [
        ("GET", "/public/one", head("GET", "/public/one"), b""),
        ("GET", "/api/two", head("GET", "/api/two", AUTH), b""),
        (
            "POST",
            "/public/three",
            head("POST", "/public/three", "Content-Length: 11") + b"hello world",
            b"hello world",
        ),
        (
            "POST",
            "/api/four",
            head("POST", "/api/four", AUTH, TE_CHUNKED) + chunked(b"a chunked body", 4),
            b"a chunked body",
        ),
        ("GET", "/public/five", head("GET", "/public/five"), b""),
    ]
    client = await Client.open(gw.port)
    try:
        assert await client.send(b"".join(raw for _, _, raw, _ in batch))
        for method, target, _, body in batch:
            assert described(await client.response()) == expected(method, target, body)
        extra, closed = await client.read_until_closed(0.3)
        assert (extra, closed) == (b"", False), "after the batch: stray bytes or a close"
        assert await client.send(head("GET", "/public/six", "Connection: close"))
        assert described(await client.response()) == expected("GET", "/public/six")
        extra, closed = await client.read_until_closed(CLOSE_WITHIN)
        assert extra == b"" and closed, "not closed after Connection: close"
    finally:
        client.close()
    assert up.targets() == [t for _, t, _, _ in batch] + ["/public/six"]


CLOSING_FIRST: list[tuple[str, bytes]] = [
    ("connection-close", head("GET", "/public/first", "Connection: close")),
    (
        "connection-close-with-body",
        head("POST", "/public/first", "Connection: close", "Content-Length: 5") + b"hello",
    ),
    ("http-1.0", head("GET", "/public/first", version="HTTP/1.0")),
]


@pytest.mark.parametrize("first", [c[1] for c in CLOSING_FIRST], ids=[c[0] for c in CLOSING_FIRST])
async def test_nothing_after_a_closing_request_is_answered_or_forwarded(
    launch: Launch, raw_upstream: MakeUpstream, first: bytes
) -> None:
    up = await raw_upstream(http())
    gw = await launch(up)
    answer, closed = await converse(gw.port, first + PIPELINED + head("GET", "/api/x", AUTH))
    resp, rest = parse_first(answer)
    assert described(resp)["target"] == "/public/first"
    assert closed, "the connection stayed open after a closing request"
    assert rest == b"", f"a request after the closing one was answered: {rest[:200]!r}"
    await settle()
    assert up.targets() == ["/public/first"]


# =========================================================================== 3. half-close

HALF_CLOSED: list[tuple[str, str, str, bytes, bytes]] = [
    ("get-public", "GET", "/public/half", head("GET", "/public/half"), b""),
    ("get-protected", "GET", "/api/half", head("GET", "/api/half", AUTH), b""),
    (
        "post-content-length",
        "POST",
        "/public/half",
        head("POST", "/public/half", "Content-Length: 5") + b"hello",
        b"hello",
    ),
    (
        "post-chunked",
        "POST",
        "/api/half",
        head("POST", "/api/half", AUTH, TE_CHUNKED) + chunked(b"hello", 2),
        b"hello",
    ),
]


@pytest.mark.parametrize(
    ("method", "target", "data", "body"),
    [c[1:] for c in HALF_CLOSED],
    ids=[c[0] for c in HALF_CLOSED],
)
async def test_half_closed_client_still_gets_the_whole_answer(
    launch: Launch,
    raw_upstream: MakeUpstream,
    method: str,
    target: str,
    data: bytes,
    body: bytes,
) -> None:
    async def slow_echo(conn: UpConn, req: UpRequest) -> bytes | None:
        out = await echo_answer(conn, req)
        await asyncio.sleep(0.2)  # the answer comes well after the client's FIN
        return out

    up = await raw_upstream(http(slow_echo))
    gw = await launch(up)
    if target.startswith("/api"):
        # A FIN while the token's verdict is still awaited gives the request up (its place
        # in the Authlete budget goes to the next client; README, "Half-closed clients"):
        # with the verdict cached, a half-closed client is answered like any other.
        warm = await Client.open(gw.port)
        try:
            assert await warm.send(head("GET", "/api/warm", AUTH))
            assert (await warm.response()).status == 200
        finally:
            warm.close()
    client = await Client.open(gw.port)
    try:
        assert await client.send(data)
        client.writer.write_eof()
        try:
            resp = await client.response()
        except asyncio.IncompleteReadError:
            pytest.fail("the gateway closed the half-closed connection without answering")
        assert described(resp) == expected(method, target, body)
        extra, closed = await client.read_until_closed(CLOSE_WITHIN)
    finally:
        client.close()
    assert extra == b""
    assert closed, "the gateway did not close a half-closed connection after answering"


# =========================================================================== 4-5. clients leaving


def stream_piece(framing: str, size: int) -> bytes:
    data = BLOCK[:size]
    return b"%x\r\n%s\r\n" % (size, data) if framing == "chunked" else data


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_client_leaving_mid_body_closes_the_upstream_connection(
    launch: Launch,
    raw_upstream: MakeUpstream,
    no_errors_logged: Callable[[], None],
    framing: str,
    how: str,
) -> None:
    up = await raw_upstream(http())
    # no timeout can be what closes it; the body streams as it arrives
    gw = await launch(up, limits={"idle_timeout": 30, "request_buffering": "off"})
    framing_line = TE_CHUNKED if framing == "chunked" else f"Content-Length: {MiB}"
    client = await Client.open(gw.port)
    try:
        assert await client.send(
            head("POST", "/public/upload", framing_line) + stream_piece(framing, 64 * KiB)
        )
        await eventually(
            lambda: bool(up.requests) and up.requests[0].body_length > 0,
            "the upstream to receive the head and the first body bytes",
        )
    finally:
        if how == "rst":
            client.abort()
        else:
            client.close()
    conn = up.conns[0]
    try:
        await asyncio.wait_for(conn.closed.wait(), CLOSE_WITHIN)
    except TimeoutError:
        pytest.fail(f"upstream connection still open {CLOSE_WITHIN}s after the client left")
    req = up.requests[0]
    assert not req.complete and req.body_length <= 64 * KiB, req.body_length
    after = await fetch(gw.port, head("GET", "/public/after", "Connection: close"))
    assert described(after) == expected("GET", "/public/after")
    await settle()
    no_errors_logged()


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_client_leaving_mid_response_closes_the_upstream_connection(
    launch: Launch,
    raw_upstream: MakeUpstream,
    no_errors_logged: Callable[[], None],
    how: str,
) -> None:
    async def endless(conn: UpConn, req: UpRequest) -> bytes | None:
        if req.target != "/public/stream":
            return await echo_answer(conn, req)
        await conn.read_body(req)
        await conn.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % (1 << 40)
        )
        watcher = asyncio.create_task(conn.drain_until_closed())
        try:
            while not conn.closed.is_set():
                await conn.send(BLOCK[: 64 * KiB])
                await asyncio.sleep(0.01)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        return None

    up = await raw_upstream(http(endless))
    gw = await launch(up, limits={"idle_timeout": 30})
    client = await Client.open(gw.port)
    try:
        assert await client.send(head("GET", "/public/stream"))
        resp = await client.head()
        assert resp.status == 200
        got = 0
        while got < 256 * KiB:
            data = await asyncio.wait_for(client.reader.read(65536), WAIT)
            assert data, "the gateway closed mid-response"
            got += len(data)
    finally:
        if how == "rst":
            client.abort()
        else:
            client.close()
    conn = up.conns[0]
    try:
        await asyncio.wait_for(conn.closed.wait(), CLOSE_WITHIN)
    except TimeoutError:
        pytest.fail(f"upstream connection still open {CLOSE_WITHIN}s after the client left")
    after = await fetch(gw.port, head("GET", "/public/after", "Connection: close"))
    assert described(after) == expected("GET", "/public/after")
    await settle()
    no_errors_logged()


# =========================================================================== 6. early answers

SMUGGLED = head("GET", "/public/smuggled")
EARLY_413 = response(
    413, b'{"error": "too_large"}', "Content-Type: application/json", reason=b"Payload Too Large"
)
EARLY_200 = response(200, b"early and complete", "Content-Type: text/plain")


@pytest.mark.parametrize("sending", ["all-sent", "still-sending"])
@pytest.mark.parametrize(
    ("answer", "then"),
    [
        (EARLY_413, "close"),
        (EARLY_413, "keep-open"),
        (EARLY_200, "close"),
        (EARLY_200, "keep-open"),
    ],
    ids=["413-close", "413-keep-open", "200-close", "200-keep-open"],
)
async def test_early_upstream_answer_is_relayed_whole_then_the_client_closed(
    launch: Launch,
    raw_upstream: MakeUpstream,
    no_errors_logged: Callable[[], None],
    answer: bytes,
    then: str,
    sending: str,
) -> None:
    """The upstream answers right after the request head, before the body is complete. The
    client gets that answer whole, and then the connection is closed: what remains of the
    body (here: copies of a request head) is never read as a new request."""

    async def early(conn: UpConn, req: UpRequest) -> bytes | None:
        if req.target != "/public/early":
            return await echo_answer(conn, req)
        await conn.send(answer)
        if then == "keep-open":
            await asyncio.sleep(30)  # neither reads nor closes; cancelled at teardown
        return None

    up = await raw_upstream(http(early))
    gw = await launch(up, limits={"idle_timeout": 30})
    want, _ = parse_first(answer)
    client = await Client.open(gw.port)
    dribbler: asyncio.Task[None] | None = None
    try:
        if sending == "all-sent":
            body = SMUGGLED * (256 * KiB // len(SMUGGLED))
            client.writer.write(head("POST", "/public/early", f"Content-Length: {len(body)}"))
            client.writer.write(body)  # not drained: the gateway may stop reading it
        else:
            body = SMUGGLED * (MiB // len(SMUGGLED))
            client.writer.write(head("POST", "/public/early", f"Content-Length: {len(body)}"))

            async def dribble() -> None:
                for i in range(0, len(body), 4 * KiB):
                    if not await client.send(body[i : i + 4 * KiB]):
                        return
                    await asyncio.sleep(0.02)

            dribbler = asyncio.create_task(dribble())
        resp = await client.response("POST")
        extra, closed = await client.read_until_closed(CLOSE_WITHIN)
    finally:
        if dribbler is not None:
            dribbler.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await dribbler
        client.close()
    assert (resp.status, resp.body) == (want.status, want.body)
    await settle()
    assert "/public/smuggled" not in up.targets(), "the rest of the body was read as requests"
    assert extra == b"", f"more after the early answer: {extra[:200]!r}"
    if sending == "all-sent" and not closed:
        # The gateway read the whole body (its length was known) before the answer was
        # complete: keeping that connection is valid HTTP. What must hold is that the body
        # was never read as requests, and that the gateway goes on serving.
        reopened = await Client.open(gw.port)
        try:
            assert await reopened.send(head("GET", "/public/after", "Connection: close"))
            assert (await reopened.response()).status == 200
        finally:
            reopened.close()
        assert "/public/smuggled" not in up.targets()
        return
    assert closed, "the client connection stayed open after an early answer mid-body"
    after = await fetch(gw.port, head("GET", "/public/after", "Connection: close"))
    assert described(after) == expected("GET", "/public/after")
    no_errors_logged()


# =========================================================================== 7. broken chunks

BROKEN_CONTINUATIONS: list[tuple[str, bytes]] = [
    ("size-not-hex", b"zz\r\n"),
    ("size-overflow", b"ffffffffffffffffff\r\n"),
    ("data-without-crlf", b"5\r\nhelloXX"),
]


@pytest.mark.parametrize(
    "bad", [c[1] for c in BROKEN_CONTINUATIONS], ids=[c[0] for c in BROKEN_CONTINUATIONS]
)
async def test_chunked_body_breaking_after_its_head_was_forwarded(
    launch: Launch,
    raw_upstream: MakeUpstream,
    no_errors_logged: Callable[[], None],
    bad: bytes,
) -> None:
    up = await raw_upstream(http())
    # no timeout can be what closes it; the body streams as it arrives
    gw = await launch(up, limits={"idle_timeout": 30, "request_buffering": "off"})
    client = await Client.open(gw.port)
    try:
        assert await client.send(head("POST", "/public/chunks", TE_CHUNKED) + b"5\r\nhello\r\n")
        await eventually(
            lambda: bool(up.requests) and up.requests[0].body_length >= 5,
            "the upstream to receive the head and the first chunk",
        )
        await client.send(bad + PIPELINED)
        conn = up.conns[0]
        try:
            await asyncio.wait_for(conn.closed.wait(), 1.0)
        except TimeoutError:
            pytest.fail("the upstream connection was still open 1s after the body broke")
        answer, closed = await client.read_until_closed(CLOSE_WITHIN)
    finally:
        client.close()
    assert answer, "no answer to a broken chunked body"
    resp, rest = parse_first(answer, "POST")
    assert assert_json_error(resp, 400)["error"] == "invalid_request"
    assert closed and rest == b"", rest[:200]
    assert not up.requests[0].complete
    await settle()
    assert up.targets() == ["/public/chunks"]
    no_errors_logged()


# =========================================================================== 8. upstream framing

BROKEN_HEADS: list[tuple[str, bytes]] = [
    (
        "cl-and-te",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        + CHUNKED_HELLO,
    ),
    (
        "te-and-cl",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        + CHUNKED_HELLO,
    ),
    ("cl-conflicting", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
    ("cl-non-numeric", b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello"),
    ("status-line-garbage", b"HTXP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    ("status-code-not-numeric", b"HTTP/1.1 2x0 OK\r\nContent-Length: 5\r\n\r\nhello"),
    ("not-http", b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
    (
        "first-chunk-size-invalid",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ),
    ("header-control-char", b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 5\r\n\r\nhello"),
    ("header-nul", b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 5\r\n\r\nhello"),
    ("header-cr", b"HTTP/1.1 200 OK\r\nX-Bad: a\rb\r\nContent-Length: 5\r\n\r\nhello"),
    ("reason-control-char", b"HTTP/1.1 200 O\x01K\r\nContent-Length: 5\r\n\r\nhello"),
]


@pytest.mark.parametrize("raw", [c[1] for c in BROKEN_HEADS], ids=[c[0] for c in BROKEN_HEADS])
async def test_invalid_upstream_answer_before_relaying_is_502(
    launch: Launch, raw_upstream: MakeUpstream, raw: bytes
) -> None:
    async def broken(conn: UpConn, req: UpRequest) -> bytes | None:
        await conn.read_body(req)
        await conn.send(raw)
        await conn.drain_until_closed()  # kept open: the gateway must not wait for more
        return None

    up = await raw_upstream(http(broken))
    gw = await launch(up)
    answer, _ = await converse(gw.port, head("GET", "/public/broken", "Connection: close"))
    try:
        resp, _ = parse_first(answer)
    except AssertionError:
        pytest.fail(f"no complete answer, the client got (then the close): {answer[:200]!r}")
    assert_json_error(resp, 502)
    assert b"hello" not in resp.body


CUT_AFTER_HEAD: list[tuple[str, bytes, bytes, str]] = [
    (
        "chunk-size-invalid-mid-body",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"p" * 1000 + b"\r\n",
        b"zz\r\n",
        "keep-open",
    ),
    (
        "content-length-short",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"p" * 10,
        b"",
        "close",
    ),
    (
        "chunked-unterminated",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
        b"",
        "close",
    ),
]


@pytest.mark.parametrize(
    ("first", "fault", "then"),
    [c[1:] for c in CUT_AFTER_HEAD],
    ids=[c[0] for c in CUT_AFTER_HEAD],
)
async def test_invalid_upstream_answer_after_relaying_cuts_the_client(
    launch: Launch,
    raw_upstream: MakeUpstream,
    no_errors_logged: Callable[[], None],
    first: bytes,
    fault: bytes,
    then: str,
) -> None:
    faulted: list[float] = []

    async def breaking(conn: UpConn, req: UpRequest) -> bytes | None:
        await conn.read_body(req)
        await conn.send(first)
        await asyncio.sleep(0.3)  # the head (and some body) reach the client first
        if fault:
            await conn.send(fault)
        faulted.append(time.monotonic())
        if then == "keep-open":
            await conn.drain_until_closed()
        return None

    up = await raw_upstream(http(breaking))
    gw = await launch(up)  # upstream_timeout 30: no timeout can be what cuts it
    client = await Client.open(gw.port)
    try:
        assert await client.send(head("GET", "/public/partial"))  # keep-alive
        resp = await client.head()
        rest, closed = await client.read_until_closed(0.3 + CLOSE_WITHIN)
    finally:
        client.close()
    assert resp.status == 200
    assert closed, "the client connection was left hanging after the upstream answer broke"
    assert faulted and time.monotonic() - faulted[0] < CLOSE_WITHIN + 0.5
    framing = framing_of(resp, "GET")
    assert framing in ("length", "chunked"), f"a cut would look complete: {resp.headers}"
    if framing == "length":
        assert len(rest) < int(resp.values("Content-Length")[0]), "a complete message was sent"
    else:
        assert dechunk(rest) is None, f"a complete chunked message was sent: {rest[-50:]!r}"
    no_errors_logged()


# =========================================================================== 9. obs-text

OBS_TEXT = [b"caf\xe9 \xff", b"caf\xc3\xa9 \xe2\x82\xac", b"\x80\x81 \xfe"]


@pytest.mark.parametrize("value", OBS_TEXT, ids=["latin-1", "utf-8", "high-bytes"])
@pytest.mark.parametrize("target", ["/public/obs", "/api/obs"])
async def test_obs_text_header_values_pass_byte_for_byte(
    launch: Launch, raw_upstream: MakeUpstream, target: str, value: bytes
) -> None:
    async def answer(conn: UpConn, req: UpRequest) -> bytes | None:
        await conn.read_body(req)
        return response(200, b"ok", b"X-Obs-Out: " + value, "Content-Type: text/plain")

    up = await raw_upstream(http(answer))
    gw = await launch(up)
    resp = await fetch(
        gw.port, head("GET", target, b"X-Obs-In: " + value, AUTH, "Connection: close")
    )
    assert resp.status == 200, resp.body
    (seen,) = up.requests
    problems = []
    if seen.values("X-Obs-In") != [value]:
        problems.append(f"client->upstream: {value!r} arrived as {seen.values('X-Obs-In')!r}")
    if resp.values("X-Obs-Out") != [value]:
        problems.append(f"upstream->client: {value!r} arrived as {resp.values('X-Obs-Out')!r}")
    assert not problems, "; ".join(problems)


# =========================================================================== 10. slow peers


async def test_slow_reader_keeps_gateway_memory_flat(
    launch: Launch, raw_upstream: MakeUpstream
) -> None:
    """The upstream sends 64 MiB as fast as it can; the client reads 64 KiB every 50 ms for
    2 s, then the rest. The gateway must push back instead of buffering."""
    size = 64 * MiB
    finished = asyncio.Event()

    async def source(conn: UpConn, req: UpRequest) -> bytes | None:
        if req.target != "/public/source":
            return await echo_answer(conn, req)
        await conn.read_body(req)
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // MiB):
            await conn.send(BLOCK)
        finished.set()
        return b""

    up = await raw_upstream(http(source), sndbuf=256 * KiB)
    gw = await launch(up)
    await fetch(gw.port, head("GET", "/public/warm", "Connection: close"))
    client = await Client.open(gw.port, rcvbuf=256 * KiB)
    digest = hashlib.sha256()
    got = 0
    try:
        async with RssWatch() as watch:
            assert await client.send(head("GET", "/public/source", "Connection: close"))
            resp = await client.head()
            assert resp.status == 200
            slow_until = time.monotonic() + 2.0
            while time.monotonic() < slow_until:
                data = await asyncio.wait_for(client.reader.read(64 * KiB), WAIT)
                assert data
                digest.update(data)
                got += len(data)
                await asyncio.sleep(0.05)
            pushed_back = not finished.is_set()
            while got < size:
                data = await asyncio.wait_for(client.reader.read(MiB), WAIT)
                assert data, f"closed after {got} of {size} bytes"
                digest.update(data)
                got += len(data)
    finally:
        client.close()
    assert got == size and digest.hexdigest() == digest_of_blocks(size // MiB)
    assert pushed_back, "the upstream could send 64 MiB to a client reading 1.3 MB/s"
    assert watch.growth < MAX_GROWTH, f"RSS grew {watch.growth / MiB:.1f} MiB"


async def test_slow_upstream_reader_keeps_gateway_memory_flat(
    launch: Launch, raw_upstream: MakeUpstream
) -> None:
    """The client uploads 64 MiB as fast as it can; the upstream reads 64 KiB every 50 ms for
    2 s, then the rest. The gateway must push back on the client instead of buffering."""
    size = 64 * MiB

    async def sink(conn: UpConn, req: UpRequest) -> bytes | None:
        if req.target != "/public/sink":
            return await echo_answer(conn, req)
        slow_until = time.monotonic() + 2.0

        async def pace() -> None:
            if time.monotonic() < slow_until:
                await asyncio.sleep(0.05)

        if not await conn.read_body(req, pace):
            return None
        doc = {"length": req.body_length, "sha256": req.body_sha256}
        return response(200, json.dumps(doc).encode(), "Content-Type: application/json")

    up = await raw_upstream(http(sink), rcvbuf=256 * KiB)
    gw = await launch(up)
    await fetch(gw.port, head("GET", "/public/warm", "Connection: close"))
    client = await Client.open(gw.port, sndbuf=256 * KiB)
    uploaded = asyncio.Event()

    async def upload() -> None:
        for _ in range(size // MiB):
            client.writer.write(BLOCK)
            await asyncio.wait_for(client.writer.drain(), 15)
        uploaded.set()

    try:
        async with RssWatch() as watch:
            assert await client.send(
                head("POST", "/public/sink", f"Content-Length: {size}", "Connection: close")
            )
            uploader = asyncio.create_task(upload())
            await asyncio.sleep(1.5)
            pushed_back = not uploaded.is_set()
            await asyncio.wait_for(uploader, 30)
            resp = await client.response()
    finally:
        client.close()
    assert resp.status == 200, resp.body[:300]
    assert resp.json() == {"length": size, "sha256": digest_of_blocks(size // MiB)}
    assert pushed_back, "the client could upload 64 MiB to an upstream reading 1.3 MB/s"
    assert watch.growth < MAX_GROWTH, f"RSS grew {watch.growth / MiB:.1f} MiB"


# =========================================================================== 11. large transfers


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_upload_arrives_exact_with_flat_memory(
    launch: Launch, raw_upstream: MakeUpstream, framing: str
) -> None:
    """256 MiB up (1 GiB with GATEWAY_CONFORMANCE_BIG=1): sha256 checked at the upstream."""
    count = BIG // MiB
    up = await raw_upstream(http())
    gw = await launch(up)
    await fetch(gw.port, head("GET", "/public/warm", "Connection: close"))
    framing_line = TE_CHUNKED if framing == "chunked" else f"Content-Length: {BIG}"
    client = await Client.open(gw.port)

    async def upload() -> None:
        for _ in range(count):
            if framing == "chunked":
                client.writer.write(b"%x\r\n" % MiB)
                client.writer.write(BLOCK)
                client.writer.write(b"\r\n")
            else:
                client.writer.write(BLOCK)
            await asyncio.wait_for(client.writer.drain(), WAIT)
        if framing == "chunked":
            client.writer.write(b"0\r\n\r\n")

    try:
        async with RssWatch() as watch:
            assert await client.send(head("POST", "/public/big", framing_line, "Connection: close"))
            await asyncio.wait_for(upload(), 10 + count / 10)
            resp = await client.response()
    finally:
        client.close()
    assert described(resp) == {
        "method": "POST",
        "target": "/public/big",
        "length": BIG,
        "sha256": digest_of_blocks(count),
    }
    assert watch.growth < MAX_GROWTH, f"RSS grew {watch.growth / MiB:.1f} MiB"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_download_arrives_exact_with_flat_memory(
    launch: Launch, raw_upstream: MakeUpstream, framing: str
) -> None:
    """256 MiB down (1 GiB with GATEWAY_CONFORMANCE_BIG=1): sha256 checked at the client."""
    count = BIG // MiB

    async def source(conn: UpConn, req: UpRequest) -> bytes | None:
        if req.target != "/public/big":
            return await echo_answer(conn, req)
        await conn.read_body(req)
        if framing == "chunked":
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(count):
                await conn.send(b"%x\r\n%s\r\n" % (MiB, BLOCK))
            return b"0\r\n\r\n"
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
        for _ in range(count):
            await conn.send(BLOCK)
        return b""

    up = await raw_upstream(http(source))
    gw = await launch(up)
    await fetch(gw.port, head("GET", "/public/warm", "Connection: close"))
    client = await Client.open(gw.port)
    try:
        async with RssWatch() as watch:
            assert await client.send(head("GET", "/public/big", "Connection: close"))
            resp = await asyncio.wait_for(client.response(keep=False), 10 + count / 10)
    finally:
        client.close()
    assert resp.status == 200
    assert (resp.length, resp.sha256) == (BIG, digest_of_blocks(count))
    assert watch.growth < MAX_GROWTH, f"RSS grew {watch.growth / MiB:.1f} MiB"


# =========================================================================== 12. 1xx


async def test_expect_100_continue_with_a_valid_token(
    launch: Launch, raw_upstream: MakeUpstream
) -> None:
    up = await raw_upstream(http())
    gw = await launch(up)
    body = os.urandom(100_000)
    client = await Client.open(gw.port)
    try:
        assert await client.send(
            head(
                "POST",
                "/api/upload",
                AUTH,
                f"Content-Length: {len(body)}",
                "Expect: 100-continue",
            )
        )
        first = await client.head()  # like curl: no body before 100 Continue
        assert first.status == 100, first
        assert await client.send(body)
        interim: list[Response] = []
        resp = await client.response("POST", interim=interim)
    finally:
        client.close()
    assert described(resp) == expected("POST", "/api/upload", body)
    assert [r.status for r in interim if r.status == 100] == [], "a second 100 Continue"


async def test_expect_100_continue_with_a_bad_token_is_401_without_100(
    launch: Launch, raw_upstream: MakeUpstream
) -> None:
    up = await raw_upstream(http())
    gw = await launch(up)
    client = await Client.open(gw.port)
    try:
        assert await client.send(
            head(
                "POST",
                "/api/upload",
                "Authorization: Bearer not-a-token",
                "Content-Length: 100000",
                "Expect: 100-continue",
            )
        )
        first = await client.head()
    finally:
        client.close()
    assert first.status == 401, first
    await settle()
    assert up.nbytes == 0


@pytest.mark.parametrize("expect", [True, False], ids=["client-expects", "client-does-not"])
async def test_an_upstream_100_continue_is_not_duplicated(
    launch: Launch, raw_upstream: MakeUpstream, expect: bool
) -> None:
    async def eager(conn: UpConn, req: UpRequest) -> bytes | None:
        if req.method == "POST":
            await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await echo_answer(conn, req)

    up = await raw_upstream(http(eager))
    gw = await launch(up)
    body = os.urandom(50_000)
    lines = [AUTH, f"Content-Length: {len(body)}"]
    client = await Client.open(gw.port)
    interim: list[Response] = []
    try:
        if expect:
            assert await client.send(head("POST", "/api/upload", *lines, "Expect: 100-continue"))
            first = await client.head()
            assert first.status == 100, first
            interim.append(first)
            assert await client.send(body)
        else:
            assert await client.send(head("POST", "/api/upload", *lines) + body)
        resp = await client.response("POST", interim=interim)
        assert described(resp) == expected("POST", "/api/upload", body)
        # the connection is still in step: the next answer is the next request's
        assert await client.send(head("GET", "/api/next", AUTH))
        assert described(await client.response()) == expected("GET", "/api/next")
    finally:
        client.close()
    assert [r.status for r in interim].count(100) <= 1, [r.status for r in interim]
    assert all(r.status == 100 for r in interim), [r.status for r in interim]


@pytest.mark.parametrize("hints", [1, 2])
async def test_early_hints_leave_the_final_answer_and_the_connection_intact(
    launch: Launch, raw_upstream: MakeUpstream, hints: int
) -> None:
    early_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n"

    async def hinting(conn: UpConn, req: UpRequest) -> bytes | None:
        if req.target != "/public/hints":
            return await echo_answer(conn, req)
        await conn.read_body(req)
        await conn.send(early_hints * hints)
        await asyncio.sleep(0.05)
        return response(200, b"the final answer", "Content-Type: text/plain")

    up = await raw_upstream(http(hinting))
    gw = await launch(up)
    client = await Client.open(gw.port)
    interim: list[Response] = []
    try:
        assert await client.send(head("GET", "/public/hints"))
        resp = await client.response(interim=interim)
        assert (resp.status, resp.body) == (200, b"the final answer")
        assert await client.send(head("GET", "/public/next"))
        assert described(await client.response()) == expected("GET", "/public/next")
    finally:
        client.close()
    for hint in interim:
        assert hint.status == 103, hint
        assert hint.values("Link") == [b"</style.css>; rel=preload; as=style"], hint.headers


# =========================================================================== 13. bodyless

BODYLESS: list[tuple[str, str, bytes]] = [
    (
        "head-content-length",
        "HEAD",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n",
    ),
    ("head-chunked", "HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("204-content-length", "GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
    (
        "304-content-length",
        "GET",
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 5\r\n\r\n',
    ),
]


@pytest.mark.parametrize(("method", "raw"), [c[1:] for c in BODYLESS], ids=[c[0] for c in BODYLESS])
async def test_bodyless_answers_carry_no_body_and_keep_the_connection(
    launch: Launch, raw_upstream: MakeUpstream, method: str, raw: bytes
) -> None:
    async def bodyless(conn: UpConn, req: UpRequest) -> bytes | None:
        if req.target != "/public/bodyless":
            return await echo_answer(conn, req)
        await conn.read_body(req)
        return raw

    up = await raw_upstream(http(bodyless))
    gw = await launch(up)
    want = parse_response_head(raw)
    client = await Client.open(gw.port)
    try:
        assert await client.send(head(method, "/public/bodyless"))
        resp = await client.head()
        assert resp.status == want.status
        extra, closed = await client.read_until_closed(0.3)
        assert extra == b"", f"a body after a bodyless answer: {extra[:200]!r}"
        assert not closed, "the connection was closed after a bodyless answer"
        assert await client.send(head("GET", "/public/after"))
        assert described(await client.response()) == expected("GET", "/public/after")
    finally:
        client.close()


# =========================================================================== 14. HTTP/1.0

PAYLOAD = os.urandom(100 * KiB)


def payload_answer(framing: str) -> Answer:
    async def answer(conn: UpConn, req: UpRequest) -> bytes | None:
        await conn.read_body(req)
        if framing == "chunked":
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(
                PAYLOAD, 10 * KiB
            )
        return response(200, PAYLOAD)

    return answer


@pytest.mark.parametrize("keep_alive", [False, True], ids=["plain", "keep-alive"])
@pytest.mark.parametrize("upstream_framing", ["chunked", "content-length"])
async def test_http_1_0_client_gets_no_chunked_encoding(
    launch: Launch, raw_upstream: MakeUpstream, upstream_framing: str, keep_alive: bool
) -> None:
    """No chunked encoding for an HTTP/1.0 client; closed after the answer unless it asked
    for keep-alive, and a close-delimited answer always ends with the close."""
    up = await raw_upstream(http(payload_answer(upstream_framing)))
    gw = await launch(up)
    lines = ["Connection: keep-alive"] if keep_alive else []
    client = await Client.open(gw.port)
    try:
        assert await client.send(head("GET", "/public/old", *lines, version="HTTP/1.0"))
        resp = await client.head()
        assert resp.status == 200
        assert not resp.values("Transfer-Encoding"), resp.headers
        if not resp.values("Content-Length"):  # close-delimited: the close is the end
            body, closed = await client.read_until_closed(CLOSE_WITHIN)
            assert closed, "a close-delimited answer whose connection was never closed"
            assert body == PAYLOAD
            return
        body = await asyncio.wait_for(
            client.reader.readexactly(int(resp.values("Content-Length")[0])), WAIT
        )
        assert body == PAYLOAD
        extra, closed = await client.read_until_closed(0.3 if keep_alive else CLOSE_WITHIN)
        assert extra == b""
        if not keep_alive:
            assert closed, "an HTTP/1.0 connection was kept open without keep-alive"
        elif not closed:  # kept alive, as asked: it must serve the next request
            assert await client.send(head("GET", "/public/again", *lines, version="HTTP/1.0"))
            again = await client.response()
            assert again.body == PAYLOAD and not again.values("Transfer-Encoding")
    finally:
        client.close()


# =========================================================================== 15. close-delimited


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
async def test_close_delimited_upstream_answer_is_relayed_whole(
    launch: Launch, raw_upstream: MakeUpstream, version: bytes
) -> None:
    body = os.urandom(300 * KiB)

    async def until_close(conn: UpConn, req: UpRequest) -> bytes | None:
        if req.target != "/public/eof":
            return await echo_answer(conn, req)
        await conn.read_body(req)
        await conn.send(version + b" 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for i in range(0, len(body), 50 * KiB):
            await conn.send(body[i : i + 50 * KiB])
            await asyncio.sleep(0.01)
        return None  # the close ends the body

    up = await raw_upstream(http(until_close))
    gw = await launch(up)
    client = await Client.open(gw.port)
    try:
        assert await client.send(head("GET", "/public/eof"))
        resp = await client.response()
        assert resp.status == 200
        assert resp.length == len(body) and resp.body == body
        if resp.framing == "close":
            _, closed = await client.read_until_closed(CLOSE_WITHIN)
            assert closed
        else:  # framed for the client: the connection may serve another request
            extra, closed = await client.read_until_closed(0.2)
            assert extra == b""
            if not closed:
                assert await client.send(head("GET", "/public/after"))
                assert described(await client.response()) == expected("GET", "/public/after")
    finally:
        client.close()


# =========================================================================== 16. stale pool


async def test_pooled_connection_closed_by_the_upstream_is_not_used(
    launch: Launch, raw_upstream: MakeUpstream, no_errors_logged: Callable[[], None]
) -> None:
    """The upstream answers one request keep-alive, then closes its side silently."""

    async def one_then_close(conn: UpConn) -> None:
        req = await conn.read_request()
        if req is None:
            return
        out = await echo_answer(conn, req)
        if out is not None:
            await conn.send(out)
        await asyncio.sleep(0.05)

    up = await raw_upstream(one_then_close)
    gw = await launch(up)
    one = await fetch(gw.port, head("GET", "/public/one", "Connection: close"))
    assert described(one) == expected("GET", "/public/one")
    await asyncio.sleep(0.3)  # the upstream's FIN is in
    two = await fetch(gw.port, head("GET", "/public/two", "Connection: close"))
    assert described(two) == expected("GET", "/public/two")
    await asyncio.sleep(0.3)
    three = await fetch(
        gw.port,
        head("POST", "/public/three", "Content-Length: 5", "Connection: close") + b"hello",
        "POST",
    )
    assert described(three) == expected("POST", "/public/three", b"hello")
    assert up.targets().count("/public/three") == 1
    no_errors_logged()


async def test_pooled_connection_closed_on_arrival_retries_get_never_post(
    launch: Launch, raw_upstream: MakeUpstream, no_errors_logged: Callable[[], None]
) -> None:
    """The upstream answers the first request of each connection; a second one it reads and
    then closes without answering (its keep-alive timer fired as the request arrived). A GET
    may be retried on a fresh connection; a POST must never reach the upstream twice."""

    async def first_only(conn: UpConn) -> None:
        req = await conn.read_request()
        if req is None:
            return
        out = await echo_answer(conn, req)
        if out is None:
            return
        await conn.send(out)
        await conn.read_request()  # arrived: counted, never answered

    up = await raw_upstream(first_only)
    gw = await launch(up)
    one = await fetch(gw.port, head("GET", "/public/one", "Connection: close"))
    assert described(one) == expected("GET", "/public/one")
    two = await fetch(gw.port, head("GET", "/public/two", "Connection: close"))
    assert described(two) == expected("GET", "/public/two")
    assert up.targets().count("/public/two") <= 2
    three = await fetch(
        gw.port,
        head("POST", "/public/three", "Content-Length: 5", "Connection: close") + b"hello",
        "POST",
    )
    await settle()
    assert up.targets().count("/public/three") == 1, up.targets()
    if three.status != 200:  # sent on a pooled connection that closed: not retried
        assert_json_error(three, 502)
    no_errors_logged()


@pytest.mark.parametrize("target", ["/api/no-token", "/nowhere"], ids=["401", "404"])
async def test_local_answer_to_head_has_no_body_and_keeps_the_connection(
    launch: Launch, raw_upstream: MakeUpstream, target: str
) -> None:
    """The gateway's own answers follow the HEAD rule too: the length is announced, no body
    follows, and the next request on the connection is read from the right place."""
    up = await raw_upstream(http())
    gw = await launch(up)
    client = await Client.open(gw.port)
    try:
        assert await client.send(
            head("HEAD", target) + head("GET", "/public/next", "Connection: close")
        )
        first = await client.response("HEAD")
        assert first.status in (401, 404)
        assert first.values("Content-Length") != [b"0"]
        assert first.body == b""
        second = await client.response("GET")
        assert second.status == 200, second
    finally:
        client.close()
    assert up.targets() == ["/public/next"]


async def test_connections_paused_for_a_slow_reader_serve_the_next_request(
    launch: Launch, raw_upstream: MakeUpstream
) -> None:
    """A 1 MiB answer to a client that reads slower than the upstream sends pauses reading
    from the upstream; a pooled connection that goes back to the pool while paused must be
    read again by the next exchange, or the next request sent on it never gets its answer.
    (Whether the last read of an answer lands while paused depends on timing: this drives
    many such answers over reused connections.)"""

    async def source(conn: UpConn, req: UpRequest) -> bytes | None:
        if req.target != "/public/mib":
            return await echo_answer(conn, req)
        await conn.read_body(req)
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % MiB)
        await conn.send(BLOCK)
        return b""

    up = await raw_upstream(http(source))
    gw = await launch(up)

    async def downloads(count: int) -> int:
        client = await Client.open(gw.port, rcvbuf=64 * KiB)
        try:
            for _ in range(count):
                assert await client.send(head("GET", "/public/mib"))
                resp = await client.head()
                assert resp.status == 200
                got = 0
                while got < MiB:  # slowly: the gateway's write buffer fills up
                    data = await asyncio.wait_for(client.reader.read(32 * KiB), WAIT)
                    assert data, f"closed after {got} bytes"
                    got += len(data)
                    await asyncio.sleep(0.002)
                assert got == MiB
            return count
        finally:
            client.close()

    done = await asyncio.wait_for(asyncio.gather(*(downloads(8) for _ in range(8))), 30)
    assert sum(done) == 64
    opened = sum(pool.opened for pool in gw.gateway.pools.values())
    assert opened < 64, "no upstream connection was reused: the case above was not exercised"


@pytest.mark.parametrize(
    "data",
    [
        head("GET", "/nowhere", "Connection: close"),
        head("GET", "/public/x", "X-Big: " + "b" * 9000),
    ],
    ids=["404", "431-closing"],
)
async def test_the_gateways_own_answers_carry_a_date(
    launch: Launch, raw_upstream: MakeUpstream, data: bytes
) -> None:
    """RFC 9110 section 6.6.1: an origin server with a clock sends Date in its 4xx answers;
    for these the gateway is the origin."""
    up = await raw_upstream(http())
    gw = await launch(up)
    resp = await fetch(gw.port, data)
    assert 400 <= resp.status < 500
    (date,) = resp.values("Date")
    assert abs(parsedate_to_datetime(date.decode()).timestamp() - time.time()) < 5
    assert date.endswith(b" GMT")
