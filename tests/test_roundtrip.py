"""Round trip through the gateway, property-based: what a client sends arrives at the upstream
unchanged, and what the upstream answers arrives at the client unchanged.

Both ends are raw sockets that write exact bytes and parse with httptools, so nothing on
the test's side normalises a message: the request line's method and target, the body
whatever its framing, and every generated end-to-end header (name spelling, value bytes
including obs-text, repeats and their order) are compared byte for byte. Headers the gateway
adds or owns (Host, X-Forwarded-*, X-Request-Id, X-Auth-*, framing, Connection, Date,
Server) are left out by construction: generated names start with X-T- (requests) or X-R-
(responses) and only those are compared.

One emulator, one upstream and one gateway serve every example, on an event loop of their
own in a background thread; each example runs there and the synchronous hypothesis test
waits for it. Keep-alive connections to the upstream are therefore reused across examples,
as they are in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import httptools
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.app import Gateway
from gateway.emulator import Emulator
from tests.conftest import SERVICE_ID, SERVICE_TOKEN, make_config

Header = tuple[bytes, bytes]
RequestFraming = Literal["length", "chunked", "none"]
ResponseFraming = Literal["length", "chunked", "close"]

HOST = b"gateway.test"
TOKEN = "tok-rt"
PUBLIC_PREFIX = "/rt"
PROTECTED_PREFIX = "/rtp"
EXCHANGE_TIMEOUT = 3.0  # a loopback exchange takes milliseconds; a hang shrinks slowly

T = TypeVar("T")


# --------------------------------------------------------------------------- the examples


@dataclass(frozen=True)
class RequestPlan:
    protected: bool
    method: str
    target: str
    headers: tuple[Header, ...]  # the generated X-T-* headers, in order
    fixed_at: int  # where among them the client's own headers (framing, auth...) go
    body: bytes
    framing: RequestFraming
    cuts: tuple[int, ...]  # chunk boundaries (offsets into body) when chunked
    upper_hex: bool
    keep_alive: bool
    writes: tuple[int, ...]  # offsets at which the request bytes are split into writes

    def encode(self) -> bytes:
        fixed: list[Header] = []
        if self.protected:
            fixed.append((b"Authorization", b"Bearer " + TOKEN.encode()))
        if not self.keep_alive:
            fixed.append((b"Connection", b"close"))
        if self.framing == "length":
            fixed.append((b"Content-Length", str(len(self.body)).encode()))
        elif self.framing == "chunked":
            fixed.append((b"Transfer-Encoding", b"chunked"))
        headers = [*self.headers[: self.fixed_at], *fixed, *self.headers[self.fixed_at :]]
        head = f"{self.method} {self.target} HTTP/1.1\r\n".encode() + b"Host: " + HOST + b"\r\n"
        head += b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"
        if self.framing == "chunked":
            return head + chunked(self.body, self.cuts, self.upper_hex)
        return head + self.body

    def pieces(self) -> list[bytes]:
        data = self.encode()
        bounds = [0, *sorted({c for c in self.writes if 0 < c < len(data)}), len(data)]
        return [data[a:b] for a, b in itertools.pairwise(bounds)]


@dataclass(frozen=True)
class ResponsePlan:
    status: int
    headers: tuple[Header, ...]  # the generated X-R-* headers, in order
    body: bytes  # what a GET would get; a HEAD answer declares it (if framed) but sends none
    framing: ResponseFraming
    cuts: tuple[int, ...]
    upper_hex: bool
    connection_close: bool

    @property
    def closes(self) -> bool:
        return self.framing == "close" or self.connection_close

    def encode(self, head_request: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status} Generated".encode()]
        lines += [name + b": " + value for name, value in self.headers]
        if self.framing == "length":
            lines.append(b"Content-Length: " + str(len(self.body)).encode())
        elif self.framing == "chunked":
            lines.append(b"Transfer-Encoding: chunked")
        if self.connection_close:
            lines.append(b"Connection: close")
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        if head_request:
            return head
        if self.framing == "chunked":
            return head + chunked(self.body, self.cuts, self.upper_hex)
        return head + self.body


@dataclass(frozen=True)
class Case:
    request: RequestPlan
    response: ResponsePlan


def chunked(body: bytes, cuts: Sequence[int], upper_hex: bool) -> bytes:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(body)}), len(body)]
    out = bytearray()
    for a, b in itertools.pairwise(bounds):
        if b > a:
            out += (f"{b - a:X}" if upper_hex else f"{b - a:x}").encode() + b"\r\n"
            out += body[a:b] + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_PCHAR = _ALNUM + "-._~!$&'()*+,=:@"  # no ';', no '%': paths the gateway forwards unchanged
_HEXDIG = "0123456789ABCDEFabcdef"
_VALUE_BYTES = [*range(0x21, 0x7F), *range(0x80, 0x100)]  # VCHAR and obs-text

_segments = st.text(alphabet=_PCHAR, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
_paths = st.lists(_segments, max_size=5).map(lambda segs: "".join("/" + s for s in segs))
_query_parts = st.one_of(
    st.sampled_from([*_PCHAR, "/", "?"]),
    st.tuples(st.sampled_from(_HEXDIG), st.sampled_from(_HEXDIG)).map(lambda h: "%" + "".join(h)),
)
_queries = st.none() | st.lists(_query_parts, max_size=40).map("".join)

_values = st.lists(
    st.one_of(st.sampled_from(_VALUE_BYTES), st.sampled_from([0x20, 0x09])), max_size=200
).map(lambda b: bytes(b).strip(b" \t"))


def _names(prefix: bytes) -> st.SearchStrategy[bytes]:
    return st.text(alphabet=_ALNUM + "-", max_size=16).map(lambda s: prefix + s.encode())


def _headers(prefix: bytes) -> st.SearchStrategy[tuple[Header, ...]]:
    """Up to 12 headers drawn from a few distinct names, so that names repeat."""

    @st.composite
    def build(draw: st.DrawFn) -> tuple[Header, ...]:
        names = draw(st.lists(_names(prefix), min_size=1, max_size=4, unique_by=bytes.lower))
        picks = draw(st.lists(st.sampled_from(names), max_size=12))
        return tuple((name, draw(_values)) for name in picks)

    return build()


def _body_of_size(draw: st.DrawFn) -> bytes:
    small = st.binary(max_size=300)
    large = st.tuples(st.binary(min_size=1, max_size=64), st.integers(1, 3000)).map(
        lambda t: t[0] * t[1]
    )
    return draw(st.one_of(st.just(b""), small, large))


def _cuts(draw: st.DrawFn, size: int) -> tuple[int, ...]:
    if size < 2:
        return ()
    return tuple(draw(st.lists(st.integers(1, size - 1), max_size=8, unique=True)))


_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_STATUSES = st.integers(200, 599).filter(lambda s: s not in (204, 304))


@st.composite
def _cases(draw: st.DrawFn) -> Case:
    protected = draw(st.booleans())
    method = draw(st.sampled_from(_METHODS))
    prefix = PROTECTED_PREFIX if protected else PUBLIC_PREFIX
    path = prefix + draw(_paths)
    query = draw(_queries)
    target = path if query is None else f"{path}?{query}"
    headers = draw(_headers(b"X-T-"))
    body = b"" if method == "HEAD" else _body_of_size(draw)
    framings: list[RequestFraming] = ["length", "chunked"]
    if not body:
        framings.append("none")  # nothing at all: a request without content
    framing = draw(st.sampled_from(framings))
    request = RequestPlan(
        protected=protected,
        method=method,
        target=target,
        headers=headers,
        fixed_at=draw(st.integers(0, len(headers))),
        body=body,
        framing=framing,
        cuts=_cuts(draw, len(body)),
        upper_hex=draw(st.booleans()),
        keep_alive=draw(st.booleans()),
        writes=tuple(draw(st.lists(st.integers(1, 4096), max_size=3))),
    )
    status = draw(_STATUSES)
    # A 205 must not carry content (RFC 9110 15.3.6); its framing is still generated.
    answer = b"" if status == 205 else _body_of_size(draw)
    response = ResponsePlan(
        status=status,
        headers=draw(_headers(b"X-R-")),
        body=answer,
        framing=draw(st.sampled_from(["length", "chunked", "close"])),
        cuts=_cuts(draw, len(answer)),
        upper_hex=draw(st.booleans()),
        connection_close=draw(st.booleans()),
    )
    return Case(request, response)


# --------------------------------------------------------------------------- the upstream


@dataclass
class Received:
    """One request as the upstream parsed it: raw bytes, nothing decoded."""

    method: bytes = b""
    target: bytes = b""
    headers: list[Header] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)


class _RequestSink:
    """httptools callbacks for the upstream side; completed requests queue up in `done`."""

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | None = None
        self.current = Received()
        self.done: list[Received] = []

    def on_message_begin(self) -> None:
        self.current = Received()

    def on_url(self, url: bytes) -> None:
        self.current.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.current.method = self.parser.get_method()

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.done.append(self.current)


class Upstream:
    """Parses whatever arrives, records it, and answers with the bytes the example chose."""

    def __init__(self) -> None:
        self.reply: ResponsePlan | None = None
        self.seen: list[Received] = []
        self.errors: list[str] = []
        self.bytes_in = 0
        self.port = 0

    def expect(self, reply: ResponsePlan) -> None:
        self.reply = reply
        self.seen = []
        self.errors = []
        self.bytes_in = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sink = _RequestSink()
        parser = httptools.HttpRequestParser(sink)
        sink.parser = parser
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                self.bytes_in += len(data)
                try:
                    parser.feed_data(data)
                except httptools.HttpParserError as exc:
                    self.errors.append(f"upstream cannot parse the request: {exc!r}")
                    return
                while sink.done:
                    received = sink.done.pop(0)
                    self.seen.append(received)
                    reply = self.reply
                    if reply is None:
                        self.errors.append("a request arrived with no answer planned")
                        return
                    writer.write(reply.encode(head_request=received.method == b"HEAD"))
                    await writer.drain()
                    if reply.closes:
                        return
        except OSError as exc:
            self.errors.append(f"upstream connection failed: {exc!r}")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# --------------------------------------------------------------------------- the client


@dataclass
class Answer:
    status: int = 0
    headers: list[Header] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False
    head_done: bool = False


class _ResponseSink:
    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = None
        self.answer = Answer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.answer.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.answer.status = self.parser.get_status_code()
        self.answer.head_done = True

    def on_body(self, body: bytes) -> None:
        self.answer.body += body

    def on_message_complete(self) -> None:
        self.answer.complete = True


def _framed(headers: Sequence[Header]) -> bool:
    return any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in headers)


async def send(port: int, plan: RequestPlan) -> Answer:
    """Write the request's exact bytes (in pieces) and parse the one answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        pieces = plan.pieces()
        for i, piece in enumerate(pieces):
            writer.write(piece)
            await writer.drain()
            if i < len(pieces) - 1:
                await asyncio.sleep(0.002)  # separate segments: the gateway parses in pieces
        sink = _ResponseSink()
        parser = httptools.HttpResponseParser(sink)
        sink.parser = parser
        raw = bytearray()
        if plan.method == "HEAD":
            # httptools cannot be told the answer is to a HEAD: parse the head only, and
            # expect nothing after it.
            while b"\r\n\r\n" not in raw:
                data = await reader.read(65536)
                assert data, f"connection closed mid-head: {bytes(raw)!r}"
                raw += data
            head, _, rest = bytes(raw).partition(b"\r\n\r\n")
            parser.feed_data(head + b"\r\n\r\n")
            assert sink.answer.head_done
            if not plan.keep_alive:
                rest += await reader.read()
            assert rest == b"", f"bytes after the head of a HEAD answer: {rest[:200]!r}"
            return sink.answer
        while not sink.answer.complete:
            data = await reader.read(65536)
            if not data:
                # Only an answer with neither Content-Length nor chunked ends at close.
                assert sink.answer.head_done, f"connection closed mid-head: {bytes(raw)!r}"
                assert not _framed(sink.answer.headers), "connection closed mid-body"
                return sink.answer
            raw += data
            parser.feed_data(data)
        if not plan.keep_alive:
            rest = await reader.read()
            assert rest == b"", f"bytes after the answer: {rest[:200]!r}"
        return sink.answer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    loop: asyncio.AbstractEventLoop
    emulator: Emulator
    upstream: Upstream
    server: asyncio.Server
    gateway: Gateway

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def exchange(self, case: Case) -> Answer:
        upstream = self.upstream
        upstream.expect(case.response)
        try:
            return await asyncio.wait_for(
                send(self.gateway.proxy_port, case.request), EXCHANGE_TIMEOUT
            )
        except TimeoutError:
            raise AssertionError(
                f"no complete answer within {EXCHANGE_TIMEOUT}s; the upstream received "
                f"{upstream.bytes_in} bytes and {len(upstream.seen)} complete requests"
            ) from None

    async def stop(self) -> None:
        await self.gateway.stop()
        self.server.close()
        await self.server.wait_closed()
        await self.emulator.stop()


async def _start(loop: asyncio.AbstractEventLoop) -> Stack:
    emulator = Emulator(SERVICE_ID, SERVICE_TOKEN)
    await emulator.start()
    emulator.add_token(TOKEN, scopes=["s"], lifetime=3600)
    upstream = Upstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    upstream.port = int(server.sockets[0].getsockname()[1])
    origin = f"http://127.0.0.1:{upstream.port}"
    routes: list[dict[str, Any]] = [
        {"name": "rt", "path_prefix": PUBLIC_PREFIX, "upstream": origin, "auth": "none"},
        {"name": "rtp", "path_prefix": PROTECTED_PREFIX, "upstream": origin, "scopes": ["s"]},
    ]
    gateway = Gateway(make_config(emulator.base_url, routes, log={"access": False}))
    await gateway.start()
    return Stack(loop, emulator, upstream, server, gateway)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="roundtrip-loop", daemon=True)
    thread.start()
    try:
        running = asyncio.run_coroutine_threadsafe(_start(loop), loop).result(30)
        try:
            yield running
        finally:
            running.call(running.stop())
            running.call(loop.shutdown_asyncgens())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# --------------------------------------------------------------------------- the property


def _generated(headers: Sequence[Header], prefix: bytes) -> list[Header]:
    return [(n, v) for n, v in headers if n.lower().startswith(prefix)]


def _framing(headers: Sequence[Header]) -> str:
    names = {n.lower() for n, _ in headers}
    if b"transfer-encoding" in names:
        return "chunked"
    return "length" if b"content-length" in names else "none"


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=_cases())
def test_request_and_response_round_trip_unchanged(stack: Stack, case: Case) -> None:
    request, response = case.request, case.response
    answer = stack.call(stack.exchange(case))
    upstream = stack.upstream
    if upstream.seen:
        event(f"request framing: {request.framing} -> {_framing(upstream.seen[0].headers)}")
    event(f"response framing: {response.framing} -> {_framing(answer.headers)}")
    event("protected route" if request.protected else "public route")

    assert upstream.errors == []
    assert len(upstream.seen) == 1, (answer.status, bytes(answer.body[:300]))
    seen = upstream.seen[0]
    assert seen.method == request.method.encode()
    assert seen.target == request.target.encode()
    assert _generated(seen.headers, b"x-t-") == list(request.headers)
    assert bytes(seen.body) == request.body

    assert answer.status == response.status
    assert _generated(answer.headers, b"x-r-") == list(response.headers)
    expected = b"" if request.method == "HEAD" else response.body
    assert bytes(answer.body) == expected
