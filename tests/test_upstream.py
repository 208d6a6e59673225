"""The upstream client as a unit: `Pool` and `UpstreamConnection` against a loopback origin
that writes exactly the bytes each test wants. No socket is mocked; the exchange's side is a
recording `Receiver`, and the test drives open/acquire/start/write/sent itself."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway import upstream as upstream_module
from gateway.config import Upstream
from gateway.upstream import (
    CHUNKED,
    LENGTH,
    MAX_RESPONSE_HEADERS,
    NO_BODY,
    STREAM,
    Pool,
    UpstreamConnection,
)

T = 2.0  # seconds any single expected event may take on loopback
Headers = list[tuple[bytes, bytes]]


# --------------------------------------------------------------------------- the exchange


class Recorder:
    """A `Receiver` that writes down every event, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.conn: UpstreamConnection | None = None
        self.settled = asyncio.Event()  # ready, end or failed
        self.paused = asyncio.Event()
        self.resumed = asyncio.Event()

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.events.append(("ready", conn))
        self.settled.set()

    def upstream_interim(self, status: int, reason: bytes, headers: Headers) -> None:
        self.events.append(("interim", status, reason, headers))

    def upstream_head(self, status: int, reason: bytes, headers: Headers, framing: int) -> None:
        self.events.append(("head", status, reason, headers, framing))

    def upstream_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def upstream_end(self) -> None:
        self.events.append(("end",))
        self.settled.set()

    def upstream_failed(self, kind: str, retryable: bool) -> None:
        self.events.append(("failed", kind, retryable))
        self.settled.set()

    def upstream_flush(self) -> None:
        self.events.append(("flush",))

    def upstream_upgraded(self, reason: bytes, headers: Headers, sent: bytes) -> None:
        self.events.append(("upgraded", reason, sent))
        self.settled.set()

    def pause_upload(self) -> None:
        self.events.append(("pause",))
        self.paused.set()

    def resume_upload(self) -> None:
        self.events.append(("resume",))
        self.resumed.set()

    # ------------------------------------------------------------------ reading the record
    async def wait(self) -> None:
        await asyncio.wait_for(self.settled.wait(), T)

    @property
    def kinds(self) -> list[str]:
        """Event names without flushes, with consecutive body events merged."""
        out: list[str] = []
        for event in self.events:
            kind = event[0]
            if kind == "flush" or (kind == "body" and out and out[-1] == "body"):
                continue
            out.append(kind)
        return out

    @property
    def body(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "body")

    @property
    def head(self) -> tuple[int, bytes, Headers, int]:
        (head,) = [e for e in self.events if e[0] == "head"]
        return head[1], head[2], head[3], head[4]

    @property
    def outcome(self) -> tuple[Any, ...]:
        """The last event that is not a flush: end or failed."""
        return [e for e in self.events if e[0] != "flush"][-1]


# --------------------------------------------------------------------------- the origin


class Peer:
    """The origin's side of one connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self) -> bytes:
        """One request head, as the gateway wrote it."""
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), T)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()

    async def closed_by_gateway(self) -> bool:
        """True once the gateway closed (or reset) this connection."""
        with contextlib.suppress(ConnectionResetError):
            await asyncio.wait_for(self.reader.read(), T)  # whatever was unread, then EOF
        return True


class Origin:
    def __init__(self) -> None:
        self.peers: asyncio.Queue[Peer] = asyncio.Queue()
        self.all: list[Peer] = []
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        self.all.append(peer)
        await self.peers.put(peer)

    async def peer(self) -> Peer:
        return await asyncio.wait_for(self.peers.get(), T)

    async def stop(self) -> None:
        for peer in self.all:
            peer.writer.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    o = Origin()
    await o.start()
    try:
        yield o
    finally:
        await o.stop()


@pytest.fixture
async def pool(origin: Origin) -> AsyncIterator[Pool]:
    p = Pool(Upstream("http", "127.0.0.1", origin.port), None)
    try:
        yield p
    finally:
        p.close()


def request_head(method: bytes = b"GET", extra: bytes = b"") -> bytes:
    return b"%s /x HTTP/1.1\r\nHost: origin.test\r\n%s\r\n" % (method, extra)


async def connect(pool: Pool, origin: Origin) -> tuple[UpstreamConnection, Peer]:
    rec = Recorder()
    pool.open(rec, T)
    await rec.wait()
    assert rec.kinds == ["ready"]
    assert rec.conn is not None
    return rec.conn, await origin.peer()


async def exchange(
    conn: UpstreamConnection, peer: Peer, answer: bytes, method: bytes = b"GET"
) -> Recorder:
    """A whole request sent, then `answer` written by the origin in one write."""
    rec = Recorder()
    conn.start(rec, request_head(method), method == b"HEAD")
    conn.sent()
    assert (await peer.request()).startswith(method + b" /x HTTP/1.1\r\n")
    peer.send(answer)
    await rec.wait()
    return rec


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + T
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def is_pooled(pool: Pool, conn: UpstreamConnection) -> bool:
    return conn.reusable and conn in pool.idle


async def assert_discarded(pool: Pool, conn: UpstreamConnection, peer: Peer) -> None:
    """The connection is out of the pool and closed: the origin sees it end."""
    assert not conn.reusable
    assert conn not in pool.idle
    assert await peer.closed_by_gateway()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --------------------------------------------------------------------------- Pool


@pytest.mark.parametrize(
    ("scheme", "host", "port", "expected"),
    [
        ("http", "example.com", 80, b"example.com"),
        ("http", "example.com", 8080, b"example.com:8080"),
        ("https", "example.com", 443, b"example.com"),
        ("https", "example.com", 80, b"example.com:80"),
        ("http", "::1", 80, b"[::1]"),
        ("https", "2001:db8::7", 8443, b"[2001:db8::7]:8443"),
    ],
)
def test_host_header_omits_the_default_port_and_brackets_ipv6(
    scheme: str, host: str, port: int, expected: bytes
) -> None:
    assert Pool(Upstream(scheme, host, port), None).host_header == expected


def test_tls_context_is_used_for_https_origins_only() -> None:
    ctx = ssl.create_default_context()
    assert Pool(Upstream("https", "example.com", 443), ctx).ssl is ctx
    assert Pool(Upstream("http", "example.com", 80), ctx).ssl is None


async def test_open_reports_ready_with_a_fresh_connection(pool: Pool, origin: Origin) -> None:
    assert pool.acquire() is None
    conn, _ = await connect(pool, origin)
    assert pool.opened == 1
    assert conn.pool is pool
    assert not conn.reused and not conn.reusable
    assert pool.idle == []  # opened for an exchange, not parked


async def test_open_to_a_closed_port_is_refused() -> None:
    pool = Pool(Upstream("http", "127.0.0.1", free_port()), None)
    rec = Recorder()
    await asyncio.wait_for(pool.open(rec, T), T)
    assert rec.events == [("failed", "refused", False)]
    assert pool.opened == 0


async def test_open_that_cannot_finish_in_time_is_a_timeout(origin: Origin) -> None:
    pool = Pool(Upstream("http", "127.0.0.1", origin.port), None)
    rec = Recorder()
    await asyncio.wait_for(pool.open(rec, 0), T)
    assert rec.events == [("failed", "timeout", False)]
    assert pool.opened == 0


async def test_released_connections_come_back_most_recent_first(pool: Pool, origin: Origin) -> None:
    first, _ = await connect(pool, origin)
    second, _ = await connect(pool, origin)
    for conn in (first, second):
        conn.reusable = True  # as after a clean exchange
        pool.release(conn)
    assert pool.acquire() is second
    assert pool.acquire() is first
    assert pool.acquire() is None


async def test_connection_idle_past_max_idle_is_closed_not_handed_out(origin: Origin) -> None:
    pool = Pool(Upstream("http", "127.0.0.1", origin.port), None, max_idle=0.05)
    conn, peer = await connect(pool, origin)
    conn.reusable = True
    pool.release(conn)
    await asyncio.sleep(0.1)
    assert pool.acquire() is None
    await assert_discarded(pool, conn, peer)


async def test_connection_within_max_idle_is_handed_out(origin: Origin) -> None:
    pool = Pool(Upstream("http", "127.0.0.1", origin.port), None, max_idle=5.0)
    conn, _ = await connect(pool, origin)
    conn.reusable = True
    pool.release(conn)
    await asyncio.sleep(0.05)
    assert pool.acquire() is conn
    conn.close()


async def test_acquire_skips_stale_connections_and_closes_them(pool: Pool, origin: Origin) -> None:
    old, old_peer = await connect(pool, origin)
    new, new_peer = await connect(pool, origin)
    for conn in (old, new):
        conn.reusable = True
        pool.release(conn)
    new.idle_since -= pool.max_idle  # the most recent one is the stale one here
    assert pool.acquire() is old
    assert pool.idle == []
    await assert_discarded(pool, new, new_peer)
    assert not old_peer.reader.at_eof()


async def test_sweep_closes_only_the_connections_idle_too_long(pool: Pool, origin: Origin) -> None:
    conns = []
    for _ in range(3):
        conn, _ = await connect(pool, origin)
        conn.reusable = True
        pool.release(conn)
        conns.append(conn)
    now = time.monotonic()
    conns[0].idle_since = now - 10
    conns[1].idle_since = now - pool.max_idle  # exactly max_idle: expired
    conns[2].idle_since = now - pool.max_idle / 2
    pool.sweep(now)
    assert pool.idle == [conns[2]]
    for conn, peer in zip(conns[:2], origin.all[:2], strict=True):
        await assert_discarded(pool, conn, peer)
    assert not origin.all[2].reader.at_eof()


async def test_idle_connection_closed_by_the_origin_is_not_handed_out(
    pool: Pool, origin: Origin
) -> None:
    conn, peer = await connect(pool, origin)
    rec = await exchange(conn, peer, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert rec.kinds == ["head", "end"]
    assert is_pooled(pool, conn)
    peer.close()
    await until(lambda: not conn.reusable)
    assert pool.acquire() is None


async def test_closed_pool_closes_idle_and_released_connections(pool: Pool, origin: Origin) -> None:
    idle, idle_peer = await connect(pool, origin)
    busy, busy_peer = await connect(pool, origin)
    idle.reusable = True
    pool.release(idle)
    pool.close()
    assert pool.idle == []
    await assert_discarded(pool, idle, idle_peer)
    busy.reusable = True
    pool.release(busy)  # an exchange ending after the pool was closed
    await assert_discarded(pool, busy, busy_peer)


async def test_release_beyond_the_idle_bound_closes_the_connection(
    pool: Pool, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_module, "MAX_IDLE_CONNECTIONS", 1)
    kept, _ = await connect(pool, origin)
    extra, extra_peer = await connect(pool, origin)
    for conn in (kept, extra):
        conn.reusable = True
        pool.release(conn)
    assert pool.idle == [kept]
    await assert_discarded(pool, extra, extra_peer)


# --------------------------------------------------------------------------- response framing


async def test_content_length_answer_completes_and_the_connection_is_reused(
    pool: Pool, origin: Origin
) -> None:
    conn, peer = await connect(pool, origin)
    rec = await exchange(conn, peer, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello")
    assert rec.kinds == ["head", "body", "end"]
    assert rec.head == (200, b"OK", [(b"Content-Length", b"5"), (b"X-A", b"1")], LENGTH)
    assert rec.body == b"hello"
    assert rec.events[-1] == ("flush",)  # the read that carried the answer is flushed
    assert is_pooled(pool, conn)
    assert pool.acquire() is conn
    again = await exchange(conn, peer, b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    assert again.kinds == ["head", "body", "end"]
    assert again.head[0] == 201 and again.body == b"ok"
    assert conn.reused and conn.exchanges == 2
    assert pool.opened == 1


async def test_body_split_over_reads_is_delivered_whole(pool: Pool, origin: Origin) -> None:
    conn, peer = await connect(pool, origin)
    rec = Recorder()
    conn.start(rec, request_head(), False)
    conn.sent()
    await peer.request()
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    await until(lambda: rec.body == b"abc")
    assert not rec.settled.is_set()
    peer.send(b"defghij")
    await rec.wait()
    assert rec.kinds == ["head", "body", "end"]
    assert rec.body == b"abcdefghij"
    assert is_pooled(pool, conn)


@pytest.mark.parametrize(
    "te",
    [b"chunked", b"Chunked", b"gzip, chunked"],
)
async def test_chunked_answer_is_decoded_and_the_connection_is_reused(
    pool: Pool, origin: Origin, te: bytes
) -> None:
    conn, peer = await connect(pool, origin)
    rec = await exchange(
        conn,
        peer,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n" % te,
    )
    assert rec.kinds == ["head", "body", "end"]
    assert rec.head[3] == CHUNKED
    assert rec.body == b"hello world"
    assert is_pooled(pool, conn)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\n",
    ],
    ids=["no-framing", "chunked-not-last", "http-1.0"],
)
async def test_close_delimited_answer_ends_at_eof(
    pool: Pool, origin: Origin, answer: bytes
) -> None:
    conn, peer = await connect(pool, origin)
    rec = Recorder()
    conn.start(rec, request_head(), False)
    conn.sent()
    await peer.request()
    peer.send(answer + b"part one, ")
    await until(lambda: rec.body == b"part one, ")
    assert rec.head[3] == STREAM
    assert not rec.settled.is_set()  # nothing but the close can end it
    peer.send(b"part two")
    await asyncio.sleep(0.02)
    assert not rec.settled.is_set()
    peer.close()
    await rec.wait()
    assert rec.kinds == ["head", "body", "end"]
    assert rec.body == b"part one, part two"
    assert not conn.reusable and pool.idle == []
    assert pool.acquire() is None


@pytest.mark.parametrize(
    "te",
    [b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip", b"Transfer-Encoding: xchunked"],
    ids=["chunked-then-gzip-fields", "xchunked"],
)
async def test_answer_whose_final_coding_is_not_chunked_ends_at_eof(
    pool: Pool, origin: Origin, te: bytes
) -> None:
    """Two Transfer-Encoding fields make one list ("chunked, gzip"), and "xchunked" is not
    "chunked": either way chunked is not the final coding, so the answer is close-delimited
    (RFC 9112 section 6.3), which is also how llhttp reads it. The framing reported must
    agree, or the close that ends the answer is taken for a reset."""
    conn, peer = await connect(pool, origin)
    rec = Recorder()
    conn.start(rec, request_head(), False)
    conn.sent()
    await peer.request()
    peer.send(b"HTTP/1.1 200 OK\r\n%s\r\n\r\nraw body" % te)
    await until(lambda: rec.body == b"raw body")  # llhttp passes it on as is
    peer.close()
    await rec.wait()
    assert (rec.head[3], rec.outcome) == (STREAM, ("end",))
    assert rec.body == b"raw body"


async def test_connection_close_answer_is_not_reused(pool: Pool, origin: Origin) -> None:
    conn, peer = await connect(pool, origin)
    rec = await exchange(
        conn, peer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    )
    assert rec.kinds == ["head", "body", "end"]
    assert rec.head[3] == LENGTH
    await assert_discarded(pool, conn, peer)


async def test_http_1_0_answer_is_reused_only_with_keep_alive(pool: Pool, origin: Origin) -> None:
    conn, peer = await connect(pool, origin)
    rec = await exchange(conn, peer, b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert rec.kinds == ["head", "body", "end"]
    await assert_discarded(pool, conn, peer)

    conn, peer = await connect(pool, origin)
    rec = await exchange(
        conn, peer, b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
    )
    assert rec.kinds == ["head", "body", "end"]
    assert is_pooled(pool, conn)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 99\r\n\r\n',
        b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
    ],
    ids=["204", "304-with-length", "304-chunked", "204-with-length"],
)
async def test_bodyless_statuses_end_at_their_head_and_are_reused(
    pool: Pool, origin: Origin, answer: bytes
) -> None:
    conn, peer = await connect(pool, origin)
    rec = await exchange(conn, peer, answer)
    assert rec.kinds == ["head", "end"]
    assert rec.head[3] == NO_BODY
    assert is_pooled(pool, conn)
    # The next answer on the same connection is read from its first byte.
    again = await exchange(conn, peer, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnew")
    assert again.kinds == ["head", "body", "end"] and again.body == b"new"


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 1000", b"Transfer-Encoding: chunked", b"Content-Length: 0"],
)
async def test_head_answer_completes_at_its_head_and_is_reused(
    pool: Pool, origin: Origin, framing: bytes
) -> None:
    conn, peer = await connect(pool, origin)
    rec = await exchange(conn, peer, b"HTTP/1.1 200 OK\r\n%s\r\n\r\n" % framing, b"HEAD")
    assert rec.kinds == ["head", "end"]
    status, reason, headers, kind = rec.head
    assert (status, reason, kind) == (200, b"OK", NO_BODY)
    assert headers == [tuple(framing.split(b": "))]  # relayed as announced
    assert is_pooled(pool, conn)
    assert pool.acquire() is conn
    # The parser starts afresh: the next answer is not taken for the HEAD's body.
    again = await exchange(conn, peer, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
    assert again.kinds == ["head", "body", "end"]
    assert again.head[3] == LENGTH and again.body == b"body"
    again = await exchange(conn, peer, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", b"HEAD")
    assert again.kinds == ["head", "end"]
    assert is_pooled(pool, conn)


async def test_head_answer_without_length_is_not_reused(pool: Pool, origin: Origin) -> None:
    conn, peer = await connect(pool, origin)
    rec = await exchange(conn, peer, b"HTTP/1.1 200 OK\r\n\r\n", b"HEAD")
    assert rec.kinds == ["head", "end"]
    assert rec.head[3] == NO_BODY
    await assert_discarded(pool, conn, peer)


async def test_get_with_the_same_answer_waits_for_the_announced_body(
    pool: Pool, origin: Origin
) -> None:
    conn, peer = await connect(pool, origin)
    rec = Recorder()
    conn.start(rec, request_head(), False)
    conn.sent()
    await peer.request()
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
    await until(lambda: "head" in rec.kinds)
    await asyncio.sleep(0.02)
    assert rec.kinds == ["head"]
    assert rec.head[3] == LENGTH
    peer.send(b"late")
    await rec.wait()
    assert rec.kinds == ["head", "body", "end"]


async def test_interim_answers_come_before_the_final_one(pool: Pool, origin: Origin) -> None:
    conn, peer = await connect(pool, origin)
    rec = await exchange(
        conn,
        peer,
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )
    assert rec.kinds == ["interim", "interim", "head", "body", "end"]
    assert rec.events[0] == ("interim", 100, b"Continue", [])
    assert rec.events[1] == ("interim", 103, b"Early Hints", [(b"Link", b"</s.css>; rel=preload")])
    assert rec.head == (200, b"OK", [(b"Content-Length", b"2")], LENGTH)
    assert is_pooled(pool, conn)


async def test_interim_answer_in_its_own_read_leaves_the_exchange_open(
    pool: Pool, origin: Origin
) -> None:
    conn, peer = await connect(pool, origin)
    rec = Recorder()
    conn.start(rec, request_head(), False)
    conn.sent()
    await peer.request()
    peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
    await until(lambda: "interim" in rec.kinds)
    await asyncio.sleep(0.02)
    assert rec.kinds == ["interim"]
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    await rec.wait()
    assert rec.kinds == ["interim", "head", "end"]
    assert is_pooled(pool, conn)


async def test_101_is_a_protocol_failure(pool: Pool, origin: Origin) -> None:
    conn, peer = await connect(pool, origin)
    rec = await exchange(
        conn,
        peer,
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    assert rec.events == [("failed", "protocol", False)]
    await assert_discarded(pool, conn, peer)


async def test_upgrade_headers_on_a_200_are_only_informational(pool: Pool, origin: Origin) -> None:
    conn, peer = await connect(pool, origin)
    rec = await exchange(
        conn,
        peer,
        b"HTTP/1.1 200 OK\r\nConnection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\nok",
    )
    assert rec.kinds == ["head", "body", "end"]
    assert rec.body == b"ok"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok",
        b"HTTP/1.1 200 \x01bad\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 O\x7fK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HELLO\r\n\r\n",
    ],
    ids=[
        "length-and-chunked",
        "two-lengths",
        "negative-length",
        "hex-length",
        "control-in-reason",
        "del-in-reason",
        "four-digit-status",
        "space-in-name",
        "obs-fold",
        "bare-lf",
        "not-http",
    ],
)
async def test_invalid_head_is_a_protocol_failure_before_any_head_event(
    pool: Pool, origin: Origin, answer: bytes
) -> None:
    conn, peer = await connect(pool, origin)
    rec = await exchange(conn, peer, answer)
    assert rec.events == [("failed", "protocol", False)]
    await assert_discarded(pool, conn, peer)


@pytest.mark.parametrize(
    "body",
    [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n", b"5\nhello\r\n0\r\n\r\n"],
    ids=["bad-size", "missing-crlf", "bare-lf"],
)
async def test_broken_chunked_body_is_a_protocol_failure_after_the_head(
    pool: Pool, origin: Origin, body: bytes
) -> None:
    conn, peer = await connect(pool, origin)
    rec = await exchange(
        conn, peer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    )
    assert rec.kinds[0] == "head" and rec.head[3] == CHUNKED
    assert rec.outcome == ("failed", "protocol", False)
    assert "end" not in rec.kinds
    await assert_discarded(pool, conn, peer)


async def test_oversized_response_head_is_a_protocol_failure(pool: Pool, origin: Origin) -> None:
    conn, peer = await connect(pool, origin)
    rec = Recorder()
    conn.start(rec, request_head(), False)
    conn.sent()
    await peer.request()
    peer.send(b"HTTP/1.1 200 OK\r\nX-Big: ")
    peer.send(b"a" * (upstream_module.MAX_RESPONSE_HEAD_BYTES + 1024))
    await rec.wait()  # refused without waiting for the end of the head
    # (reads that end mid-head are flushed, with nothing to relay)
    assert [e for e in rec.events if e != ("flush",)] == [("failed", "protocol", False)]
    await assert_discarded(pool, conn, peer)


async def test_oversized_head_sent_at_once_is_a_protocol_failure(
    pool: Pool, origin: Origin
) -> None:
    conn, peer = await connect(pool, origin)
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
    rec = await exchange(conn, peer, b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n")
    # (the gateway reads at most 64 KiB at a time: a read that ends mid-head is flushed)
    assert [e for e in rec.events if e != ("flush",)] == [("failed", "protocol", False)]
    await assert_discarded(pool, conn, peer)


async def test_large_head_under_the_limit_and_a_large_body_are_accepted(
    pool: Pool, origin: Origin
) -> None:
    conn, peer = await connect(pool, origin)
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 1000) for i in range(50))
    body = b"b" * 300_000  # the head's read also carries much body: only the head counts
    rec = await exchange(
        conn, peer, b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (fields, len(body), body)
    )
    assert rec.kinds == ["head", "body", "end"]
    assert len(rec.head[2]) == 51
    assert rec.body == body
    assert is_pooled(pool, conn)


@pytest.mark.parametrize(
    ("count", "ok"), [(MAX_RESPONSE_HEADERS, True), (MAX_RESPONSE_HEADERS + 1, False)]
)
async def test_header_field_count_is_bounded(
    pool: Pool, origin: Origin, count: int, ok: bool
) -> None:
    conn, peer = await connect(pool, origin)
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(count - 1))
    rec = await exchange(conn, peer, b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n")
    if ok:
        assert rec.kinds == ["head", "end"]
        assert len(rec.head[2]) == count
    else:
        assert rec.events == [("failed", "protocol", False)]


async def test_obs_text_in_reason_and_values_is_kept_byte_for_byte(
    pool: Pool, origin: Origin
) -> None:
    conn, peer = await connect(pool, origin)
    rec = await exchange(
        conn, peer, b"HTTP/1.1 299 Caf\xe9\tok\r\nX-V: \xff\xfe\r\nContent-Length: 0\r\n\r\n"
    )
    assert rec.head == (
        299,
        b"Caf\xe9\tok",
        [(b"X-V", b"\xff\xfe"), (b"Content-Length", b"0")],
        LENGTH,
    )


# --------------------------------------------------------------------------- reuse rules


async def test_answer_before_the_request_was_sent_is_never_reused(
    pool: Pool, origin: Origin
) -> None:
    conn, peer = await connect(pool, origin)
    rec = Recorder()
    conn.start(rec, request_head(b"POST", b"Content-Length: 100\r\n"), False)
    conn.write(b"x" * 10)  # the rest of the body is never sent
    await peer.request()
    peer.send(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    await rec.wait()
    assert rec.kinds == ["head", "end"]
    await assert_discarded(pool, conn, peer)


async def test_early_answer_is_not_reused_even_if_the_request_finishes_first(
    pool: Pool, origin: Origin
) -> None:
    conn, peer = await connect(pool, origin)
    rec = Recorder()
    conn.start(rec, request_head(b"POST", b"Content-Length: 4\r\n"), False)
    await peer.request()
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    await until(lambda: rec.body == b"ab")
    conn.write(b"body")
    conn.sent()  # the request is whole before the answer is
    assert await asyncio.wait_for(peer.reader.readexactly(4), T) == b"body"
    peer.send(b"cd")
    await rec.wait()
    assert rec.kinds == ["head", "body", "end"]
    await assert_discarded(pool, conn, peer)


async def test_request_body_written_then_sent_allows_reuse(pool: Pool, origin: Origin) -> None:
    conn, peer = await connect(pool, origin)
    rec = Recorder()
    conn.start(rec, request_head(b"POST", b"Content-Length: 7\r\n"), False)
    conn.write(b"pay")
    conn.write(b"load")
    conn.sent()
    await peer.request()
    assert await asyncio.wait_for(peer.reader.readexactly(7), T) == b"payload"
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    await rec.wait()
    assert rec.kinds == ["head", "end"]
    assert is_pooled(pool, conn)


@pytest.mark.parametrize(
    "trailing",
    [b"garbage", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 200 OK\r\n"],
    ids=["garbage", "second-answer", "start-of-second-answer"],
)
async def test_bytes_after_a_complete_answer_in_the_same_read_discard_the_connection(
    pool: Pool, origin: Origin, trailing: bytes
) -> None:
    conn, peer = await connect(pool, origin)
    rec = await exchange(conn, peer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + trailing)
    assert rec.kinds == ["head", "body", "end"]  # the answer itself was whole
    assert rec.body == b"ok"
    assert pool.acquire() is None  # unasked-for bytes: the connection cannot be trusted
    await assert_discarded(pool, conn, peer)


async def test_body_bytes_after_a_head_answer_in_the_same_read_discard_the_connection(
    pool: Pool, origin: Origin
) -> None:
    """An origin that sends a body after its HEAD answer: part of it may still be on the way,
    to be read as the start of the next exchange's answer."""
    conn, peer = await connect(pool, origin)
    rec = await exchange(conn, peer, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart", b"HEAD")
    assert rec.kinds == ["head", "end"]
    assert pool.acquire() is None
    await assert_discarded(pool, conn, peer)


async def test_bytes_on_an_idle_connection_discard_it(pool: Pool, origin: Origin) -> None:
    conn, peer = await connect(pool, origin)
    await exchange(conn, peer, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert is_pooled(pool, conn)
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert await peer.closed_by_gateway()
    assert not conn.reusable
    assert pool.acquire() is None


# --------------------------------------------------------------------------- connection loss


async def test_fresh_connection_closed_before_any_byte_is_not_retryable(
    pool: Pool, origin: Origin
) -> None:
    conn, peer = await connect(pool, origin)
    rec = Recorder()
    conn.start(rec, request_head(), False)
    conn.sent()
    await peer.request()
    peer.close()
    await rec.wait()
    assert rec.events == [("failed", "reset", False)]


async def test_reused_connection_closed_before_any_byte_is_retryable(
    pool: Pool, origin: Origin
) -> None:
    conn, peer = await connect(pool, origin)
    await exchange(conn, peer, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert pool.acquire() is conn
    rec = Recorder()
    conn.start(rec, request_head(), False)
    conn.sent()
    await peer.request()
    peer.close()
    await rec.wait()
    assert rec.events == [("failed", "reset", True)]


async def test_reused_connection_closed_after_some_bytes_is_not_retryable(
    pool: Pool, origin: Origin
) -> None:
    conn, peer = await connect(pool, origin)
    await exchange(conn, peer, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert pool.acquire() is conn
    rec = Recorder()
    conn.start(rec, request_head(), False)
    conn.sent()
    await peer.request()
    peer.send(b"HTTP/1.1 200 OK\r\nContent-")
    await until(lambda: ("flush",) in rec.events)
    peer.close()
    await rec.wait()
    assert rec.events[-1] == ("failed", "reset", False)


async def test_length_delimited_answer_cut_short_is_a_reset(pool: Pool, origin: Origin) -> None:
    conn, peer = await connect(pool, origin)
    rec = Recorder()
    conn.start(rec, request_head(), False)
    conn.sent()
    await peer.request()
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    await until(lambda: rec.body == b"abc")
    peer.close()
    await rec.wait()
    assert rec.kinds == ["head", "body", "failed"]
    assert rec.outcome == ("failed", "reset", False)
    assert pool.acquire() is None


async def test_aborted_exchange_hears_nothing_more(pool: Pool, origin: Origin) -> None:
    conn, peer = await connect(pool, origin)
    rec = Recorder()
    conn.start(rec, request_head(), False)
    conn.sent()
    await peer.request()
    conn.abort()
    assert await peer.closed_by_gateway()
    assert rec.events == []
    assert not conn.reusable and pool.acquire() is None


# --------------------------------------------------------------------------- flow control


async def test_paused_reading_holds_the_answer_until_resumed(pool: Pool, origin: Origin) -> None:
    conn, peer = await connect(pool, origin)
    rec = Recorder()
    conn.start(rec, request_head(), False)
    conn.sent()
    await peer.request()
    conn.pause_reading()
    assert conn.read_paused
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await asyncio.sleep(0.05)
    assert rec.events == []
    conn.resume_reading()
    assert not conn.read_paused
    await rec.wait()
    assert rec.kinds == ["head", "body", "end"]


async def test_full_upload_buffer_pauses_and_drained_buffer_resumes(
    pool: Pool, origin: Origin
) -> None:
    conn, peer = await connect(pool, origin)
    rec = Recorder()
    size = 32 << 20  # beyond what the loopback socket buffers take in
    conn.start(rec, request_head(b"POST", b"Content-Length: %d\r\n" % size), False)
    chunk = b"u" * (1 << 20)
    for _ in range(size // len(chunk)):
        conn.write(chunk)
    assert rec.paused.is_set()  # the transport's buffer is over its high-water mark
    conn.sent()
    await peer.request()
    got = 0
    while got < size:
        got += len(await asyncio.wait_for(peer.reader.read(1 << 20), T))
    await asyncio.wait_for(rec.resumed.wait(), T)
    assert [e for e in rec.kinds if e in ("pause", "resume")] == ["pause", "resume"]
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    await rec.wait()
    assert is_pooled(pool, conn)
