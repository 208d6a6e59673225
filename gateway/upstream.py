"""The upstream client: a keep-alive pool per origin and one protocol object per connection,
parsing responses with httptools (llhttp, strict).

Nothing here awaits on the request path: a pooled connection is handed over synchronously,
response events are delivered to the exchange as callbacks (`Receiver`), and only opening a
new connection runs as a task.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from typing import Protocol

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from gateway.config import Upstream
from gateway.http import READ_BUFFER, valid_reason

log = logging.getLogger("gateway.upstream")

# Idle pooled connections are closed after this long: shorter than the keep-alive timeouts
# of common upstream servers (gunicorn 2 s, uvicorn and Node.js 5 s, nginx 75 s), so the
# gateway, not the upstream, decides when an idle connection ends and a request rarely
# meets a connection the upstream is closing at that moment.
MAX_IDLE_SECONDS = 1.5
MAX_IDLE_CONNECTIONS = 1024  # per origin; more than this are closed when released
# A pooled connection older than this is not used again (`upstream_max_connection_age`):
# behind a Kubernetes ClusterIP Service each connection is pinned to one pod, so only new
# connections reach new pods.
MAX_CONNECTION_AGE = 60.0
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
MAX_RESPONSE_HEADERS = 256
_WRITE_HIGH_WATER = 32 * 1024


class Receiver(Protocol):
    """The exchange an upstream connection serves: where response events go."""

    def upstream_ready(self, conn: UpstreamConnection) -> None: ...
    def upstream_interim(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None: ...  # fmt: skip  # noqa: E501
    def upstream_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], framing: int
    ) -> None: ...
    def upstream_body(self, data: bytes) -> None: ...
    def upstream_end(self) -> None: ...
    def upstream_failed(self, kind: str, retryable: bool) -> None: ...
    def upstream_flush(self) -> None: ...
    def upstream_upgraded(self, reason: bytes, headers: list[tuple[bytes, bytes]], sent: bytes) -> None: ...  # fmt: skip  # noqa: E501
    def pause_upload(self) -> None: ...
    def resume_upload(self) -> None: ...


# How a response's body is delimited.
NO_BODY = 0  # HEAD, 204, 304
LENGTH = 1  # Content-Length
CHUNKED = 2  # Transfer-Encoding ending in chunked
STREAM = 3  # until the upstream closes


_OTHER = 0
_CONTENT_LENGTH = 1
_TRANSFER_ENCODING = 2
_FRAMING_FIELDS = {b"content-length": _CONTENT_LENGTH, b"transfer-encoding": _TRANSFER_ENCODING}
_field_kinds: dict[bytes, int] = {}  # header spelling -> which framing field it is, if any


def _framing_field(name: bytes) -> int:
    kind = _field_kinds.get(name)
    if kind is None:
        kind = _FRAMING_FIELDS.get(name.lower(), _OTHER)
        if len(_field_kinds) < 4096:
            _field_kinds[name] = kind
    return kind


class EndpointStats:
    """Counters of one configured endpoint (all its resolved addresses), for the metrics.
    Nothing is added on the request path: requests are the exchanges of its connections,
    summed when scraped (and when a connection ends)."""

    __slots__ = ("ejections", "ended", "failures", "live")

    def __init__(self) -> None:
        self.ended = 0  # exchanges of connections that have ended
        self.live: set[UpstreamConnection] = set()
        self.failures: dict[str, int] = {}  # "refused", "timeout", "reset"
        self.ejections = 0

    @property
    def requests(self) -> int:
        return self.ended + sum(conn.exchanges for conn in self.live)

    def failed(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


class ConnectFailed(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind  # "refused" or "timeout"


class _SkipBody(Exception):
    """Raised from on_headers_complete to end a HEAD answer at its head: llhttp cannot know
    that the request was HEAD, and would wait for the body its Content-Length announces."""


class Pool:
    """Keep-alive connections to one origin (or one resolved address of it), most recently
    used first."""

    def __init__(
        self,
        upstream: Upstream,
        ssl_context: ssl.SSLContext | None,
        max_idle: float = MAX_IDLE_SECONDS,
        *,
        address: str | None = None,
        stats: EndpointStats | None = None,
        max_age: float = MAX_CONNECTION_AGE,
    ) -> None:
        self.upstream = upstream
        self.host = upstream.host
        self.address = address or upstream.host  # what is connected to
        self.port = upstream.port
        self.ssl = ssl_context if upstream.scheme == "https" else None
        self.max_idle = max_idle
        self.max_age = max_age or math.inf  # 0: no maximum
        self.idle: list[UpstreamConnection] = []
        self.opened = 0  # connections ever opened (tests and the benchmark read it)
        self.closed = False
        self.stats = stats or EndpointStats()
        self.live: set[UpstreamConnection] = set()  # opened here, not yet closed
        # Health, kept by a Balancer: consecutive connect failures, ejected until when.
        self.eject_after = 0  # 0: never ejected (a route with one endpoint)
        self.cooldown = 0.0
        self.connect_failures = 0
        self.ejected_until = 0.0
        self.alternatives = False  # another endpoint could take a retried request
        default = 443 if upstream.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if self.port == default else f"{host}:{self.port}").encode()

    def acquire(self) -> UpstreamConnection | None:
        """An idle connection that is still open and fresh, or None."""
        idle = self.idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if (
                conn.reusable
                and now - conn.idle_since < self.max_idle
                and now - conn.born < self.max_age
            ):
                return conn
            conn.close()
        return None

    def open(self, receiver: Receiver, timeout: float) -> asyncio.Task[None]:
        """Open a new connection in the background; the receiver hears ready or failed."""
        return asyncio.get_running_loop().create_task(self._open(receiver, timeout))

    async def _open(self, receiver: Receiver, timeout: float) -> None:
        try:
            conn = await self.connect(timeout)
        except ConnectFailed as exc:
            receiver.upstream_failed(exc.kind, False)
            return
        receiver.upstream_ready(conn)

    async def connect(self, timeout: float) -> UpstreamConnection:
        """A new connection; raises ConnectFailed (counted, and ejecting after
        `eject_after` in a row)."""
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(self),
                    self.address,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                ),
                timeout,
            )
        except TimeoutError:
            self._connect_failed("timeout")
            raise ConnectFailed("timeout") from None
        except (OSError, ssl.SSLError) as exc:
            log.debug("upstream %s: connect failed: %s", self.upstream.origin, type(exc).__name__)
            self._connect_failed("refused")
            raise ConnectFailed("refused") from None
        self.opened += 1
        self.connect_failures = 0
        self.live.add(conn)
        self.stats.live.add(conn)
        return conn

    @property
    def active(self) -> int:
        """Exchanges in progress (balance: least_requests): open connections not idle."""
        return len(self.live) - len(self.idle)

    def _connect_failed(self, kind: str) -> None:
        self.stats.failed(kind)
        self.connect_failures += 1
        if self.eject_after and self.connect_failures >= self.eject_after:
            now = time.monotonic()
            if self.ejected_until <= now:
                self.stats.ejections += 1
                log.warning(
                    "upstream %s (%s): %d connect failures in a row, out for %g s",
                    self.upstream.origin,
                    self.address,
                    self.connect_failures,
                    self.cooldown,
                )
            self.ejected_until = now + self.cooldown

    def release(self, conn: UpstreamConnection) -> None:
        if self.closed or len(self.idle) >= MAX_IDLE_CONNECTIONS:
            conn.close()
            return
        now = conn.idle_since = time.monotonic()
        if now - conn.born >= self.max_age:
            conn.close()
            return
        self.idle.append(conn)

    def reconnect(self, receiver: Receiver, timeout: float, failed: Pool | None) -> None:
        """A retry after a reset: a new connection (a Balancer picks another endpoint)."""
        self.open(receiver, timeout)

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than max_idle (the oldest are first)."""
        idle = self.idle
        expired = 0
        while expired < len(idle) and now - idle[expired].idle_since >= self.max_idle:
            idle[expired].close()
            expired += 1
        if expired:
            del idle[:expired]

    def close(self) -> None:
        self.closed = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class UpstreamConnection(asyncio.BufferedProtocol):
    """One upstream connection; serves one exchange at a time."""

    __slots__ = (
        "_early",
        "_eof_delimited",
        "_head_bytes",
        "_headers",
        "_interim",
        "_keep_alive",
        "_reason",
        "_skip",
        "_skipping",
        "_switch",
        "born",
        "exchanges",
        "got_bytes",
        "idle_since",
        "last_read",
        "parser",
        "pool",
        "read_paused",
        "receiver",
        "request_sent",
        "reusable",
        "started",
        "transport",
        "upgrade",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.born = time.monotonic()
        self.parser = HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.receiver: Receiver | None = None
        self.reusable = False  # open, idle, and its last exchange ended cleanly
        self.read_paused = False
        self.exchanges = 0
        self.idle_since = 0.0
        self.last_read = 0.0
        self.got_bytes = False
        self.request_sent = False
        self.started = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._reason = b""
        self._interim = False
        self._keep_alive = False
        self._eof_delimited = False
        self._early = False
        self._skip = False
        self._skipping = False
        self.upgrade = False  # a WebSocket handshake was sent: a 101 is the answer hoped for
        self._switch: tuple[bytes, list[tuple[bytes, bytes]]] | None = None

    # ------------------------------------------------------------------ the exchange's side
    def start(self, receiver: Receiver, head: bytes, head_request: bool) -> None:
        """Send a request head; the body (if any) follows through `write`."""
        self.receiver = receiver
        self.reusable = False
        self.last_read = time.monotonic()  # the route timeout counts from the request
        self.exchanges += 1
        self.got_bytes = False
        self.request_sent = False
        self.started = False
        self._head_bytes = 0
        self._skip = head_request
        self.upgrade = False
        assert self.transport is not None
        if self.read_paused:  # paused for a slow reader of the exchange before
            self.read_paused = False
            self.transport.resume_reading()
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def sent(self) -> None:
        """The whole request is written: the wait for the answer begins."""
        self.request_sent = True
        self.last_read = time.monotonic()

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()
        self.last_read = time.monotonic()

    def abort(self) -> None:
        """The exchange is over on the client's side; this connection's state is unknown."""
        self.receiver = None
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.receiver = None
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    @property
    def reused(self) -> bool:
        return self.exchanges > 1

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # An upload pauses the client once this much waits for the upstream to read it.
        transport.set_write_buffer_limits(_WRITE_HIGH_WATER)  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        if self.receiver is not None:
            self.receiver.pause_upload()

    def resume_writing(self) -> None:
        self.last_read = time.monotonic()
        if self.receiver is not None:
            self.receiver.resume_upload()

    def get_buffer(self, sizehint: int) -> memoryview:
        return READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(READ_BUFFER[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        receiver = self.receiver
        if receiver is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        self.got_bytes = True
        self.last_read = time.monotonic()
        if not self.started:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._switched(bytes(data[exc.args[0] :]))
            return
        except HttpParserError:
            if not self._skipping:
                self._fail("protocol")
                return
            self._skipping = False
            # llhttp stopped at the head: reusable only if nothing followed it in this read.
            self._end_head_only(data[-4:] == b"\r\n\r\n")
        if not self.started and self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
            # A head still incomplete after this many bytes (llhttp holds at most the
            # field it is in): refused, like one with too many fields.
            self._fail("protocol")
            return
        receiver.upstream_flush()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost tells the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        receiver = self.receiver
        pool = self.pool
        if self in pool.live:
            pool.live.discard(self)
            pool.stats.live.discard(self)
            pool.stats.ended += self.exchanges
        if receiver is None:
            return
        self.receiver = None
        if self.started and self._eof_delimited:
            self.started = False
            receiver.upstream_end()  # a close-delimited answer ends here
            return
        pool.stats.failed("reset")
        # Nothing came back: a reused connection the upstream had closed, or (with another
        # endpoint to go to) one reset before answering; the exchange decides on a retry.
        retryable = not self.got_bytes and (self.exchanges > 1 or pool.alternatives)
        receiver.upstream_failed("reset", retryable)

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        if self.receiver is None:
            # Bytes after a complete answer, in the same read: nobody asked for them, and
            # the connection is out of step with its requests (it is closed, never reused).
            raise HttpParserError("unrequested response")
        self._headers = []
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        if len(headers) > MAX_RESPONSE_HEADERS:
            raise HttpParserError("too many response header fields")

    def on_headers_complete(self) -> None:
        receiver = self.receiver
        if receiver is None:
            raise HttpParserError("unexpected response")
        parser = self.parser
        status = parser.get_status_code()
        reason = self._reason
        if not valid_reason(reason):
            raise HttpParserError("invalid reason phrase")
        if self._head_bytes > MAX_RESPONSE_HEAD_BYTES and (
            sum(len(n) + len(v) + 4 for n, v in self._headers) + len(reason)
            > MAX_RESPONSE_HEAD_BYTES
        ):
            # (Only counted when what arrived so far could hold a head that large.)
            raise HttpParserError("response head too large")
        if status < 200:
            if status == 101:
                if not self.upgrade:  # only a WebSocket handshake asks for one
                    raise HttpParserError("unrequested upgrade")
                if not parser.should_upgrade():  # no Upgrade and Connection: upgrade
                    raise HttpParserError("101 without an upgrade")
                self._switch = (reason, self._headers)
                self._interim = True  # no message end to act on; feed_data stops here
                return
            self._interim = True
            receiver.upstream_interim(status, reason, self._headers)
            return
        self._interim = False
        self.started = True
        # An answer that began before the whole request was sent: whether the upstream
        # read the rest is unknown, so this connection is not used again.
        self._early = not self.request_sent
        self._head_bytes = 0
        self._keep_alive = parser.should_keep_alive()
        if self._skip or status == 204 or status == 304:
            framing = NO_BODY
        else:
            # As llhttp reads it (RFC 9112 section 6.3): chunked only when it is the final
            # coding of the last Transfer-Encoding field; any other coding ends at EOF.
            framing = STREAM
            for name, value in self._headers:
                field = _framing_field(name)
                if field == _CONTENT_LENGTH:
                    framing = LENGTH  # llhttp refuses it beside Transfer-Encoding
                elif field == _TRANSFER_ENCODING:
                    last = value.rpartition(b",")[2].strip().lower()
                    framing = CHUNKED if last == b"chunked" else STREAM
        self._eof_delimited = framing == STREAM
        receiver.upstream_head(status, reason, self._headers, framing)
        if self._skip:
            self._skipping = True
            raise _SkipBody

    def on_body(self, data: bytes) -> None:
        if self.receiver is not None:
            self.receiver.upstream_body(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete(self.parser.should_keep_alive() and self._keep_alive)

    # ------------------------------------------------------------------ endings
    def _switched(self, sent: bytes) -> None:
        """The upstream's 101: the connection leaves HTTP (and the pool) for a WebSocket;
        `sent` is what followed the head in the same read."""
        receiver, switch = self.receiver, self._switch
        self.receiver = None
        self._switch = None
        if receiver is None or switch is None:
            self.close()
            return
        receiver.upstream_upgraded(switch[0], switch[1], sent)

    def ended(self) -> None:
        """A connection handed over (a WebSocket) has closed: the pool's accounting."""
        pool = self.pool
        if self in pool.live:
            pool.live.discard(self)
            pool.stats.live.discard(self)
            pool.stats.ended += self.exchanges

    def _end_head_only(self, clean: bool) -> None:
        self.parser = HttpResponseParser(self)
        self._complete(self._keep_alive and clean)

    def _complete(self, keep_alive: bool) -> None:
        receiver = self.receiver
        self.receiver = None
        self.started = False
        if keep_alive and self.request_sent and not self._early and self.transport is not None:
            self.reusable = True
            self.pool.release(self)
        else:
            self.close()
        if receiver is not None:
            receiver.upstream_end()

    def _fail(self, kind: str) -> None:
        receiver = self.receiver
        self.receiver = None
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()
        if receiver is not None:
            receiver.upstream_failed(kind, False)
