"""The proxy listener: one `ClientConnection` (an asyncio.Protocol) per client connection,
parsing with httptools (llhttp, strict), and the `Exchange` of each request on it.

Limits are counted in the parser callbacks as bytes arrive; timeouts are deadlines on each
connection, checked by one coarse periodic sweep (`Listener.sweep`), not a timer per request.
Pipelined requests are answered in order: a request read while another is answered waits in
the queue, and reading pauses meanwhile. A cache hit is decided and forwarded inside
`on_headers_complete`; only a miss runs a task, which awaits the shared introspection call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections import deque
from json.encoder import encode_basestring_ascii as _json_str
from typing import IO, TYPE_CHECKING

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from gateway.config import LimitsConfig
from gateway.cors import answer_headers, preflight, preflight_request, relay
from gateway.decision import BAD_GATEWAY, GATEWAY_TIMEOUT, NOT_FOUND, Denial, denial
from gateway.http import IDEMPOTENT, READ_BUFFER, closing_answer, date_line, status_line
from gateway.ingress import describe_found
from gateway.introspection import IntrospectionError
from gateway.logs import AccessLog, RequestIds
from gateway.memory import release
from gateway.metrics import NO_ROUTE, Metrics
from gateway.pipeline import (
    BAD_HOST,
    BODY_TIMEOUT,
    BODY_TOO_SLOW,
    MISDIRECTED,
    TOO_LARGE,
    CompiledRoute,
    Miss,
    Plan,
    Routed,
    check_framing,
    judge,
    lookup,
    misdirected,
    route_request,
    token_of,
    unavailable,
)
from gateway.proxy import response_headers
from gateway.tls import server_name_of
from gateway.tracing import trace_id_of
from gateway.tunnel import Tunnel
from gateway.upstream import CHUNKED, STREAM, Pool, UpstreamConnection
from gateway.verdict import Active, Verdict

if TYPE_CHECKING:
    from gateway.tracing import RequestTrace, Tracing
    from gateway.verdicts import Verdicts

log = logging.getLogger("gateway")

_REFUSED = (503, "temporarily_unavailable", "Too many connections; try again.")
_SHED = (503, "temporarily_unavailable", "The server is short of memory; try again.")
_HEADER_TIMEOUT = (408, "request_timeout", "The request headers took too long.")
_MALFORMED = (400, "invalid_request", "The request is not valid HTTP.")
_TOO_BIG = (431, "invalid_request", "The request headers are too large.")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_SERVER_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

# Why reading from the client is paused; several reasons may hold at once.
_PAUSE_PIPELINE = 1  # a request waits behind the one being answered
_PAUSE_UPLOAD = 2  # the upstream connection's write buffer is full
_PAUSE_BUFFER = 4  # body buffered while the verdict or the upstream connection is pending
_PAUSE_DONE = 8  # nothing more will be read on this connection
_BUFFER_LIMIT = 256 * 1024
# A buffered body on a route without max_body_bytes: past this much on disk, it is streamed.
_SPOOL_CAP = 16 * 1024 * 1024
_PUMP_PIECE = 256 * 1024
# A local answer (401, 404, ...) to a request whose body is still coming: a small rest is
# read and dropped so the connection stays usable; anything more closes it.
_DISCARD_LIMIT = 64 * 1024
# After a closing answer, the rest of what the client sends is read and dropped for up to
# this long: closing with unread bytes makes the kernel send a reset, which can destroy the
# answer before the client reads it.
_LINGER_SECONDS = 1.0
# At most this many refused connections linger at once; past it they close at once.
_MAX_REFUSING = 256

# Deadline kinds: what happens when a connection's deadline passes.
_NONE = 0
_HEAD = 1  # request head incomplete: 408 and close
_IDLE = 2  # keep-alive connection with nothing to do: close
_BODY = 3  # request body stopped arriving: 408 and close
_LINGER = 4  # closing: close now
_NEVER = float("inf")
# What may follow the decision path in a decision request's target: nothing, a query (ignored),
# or the original path (Envoy's ext_authz appends it).
_AFTER = (b"", b"?", b"/")
_DECISION_FIELD = '"mode":"decision",'
_ALLOWED = b"Content-Length: 0\r\nCache-Control: no-store\r\n"
UNTRUSTED = denial(
    403,
    "forbidden",
    "Decision requests are answered only to proxies in trusted_proxies.",
    reason="untrusted_peer",
)


NOT_NORMAL = denial(
    400,
    "invalid_request",
    "Invalid request path: not in normal form (dot segments or needless escapes), and the "
    "ingress forwards it as sent.",
)


def unclear(reason: str) -> Denial:
    """A decision request that does not describe one request unambiguously: never an allow."""
    return denial(400, "invalid_request", f"The decision request is unclear: {reason}.")


# Memory is given back once at least this much was held and most of it has gone.
_RELEASE_AFTER = 8 * 1024 * 1024


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the answer is on the connection."""


class Listener:
    """What every connection of the proxy listener shares: the gateway's state as values.

    `plan` and `access_log` are replaced on reload; a request keeps the plan it started with.
    """

    def __init__(
        self,
        plan: Plan,
        verdicts: Verdicts,
        metrics: Metrics,
        limits: LimitsConfig,
        pools: dict[object, Pool],
        access_log: AccessLog | None,
        tls: bool,
        decision_only: bool = False,
    ) -> None:
        self.plan = plan
        # `decision_listen`: this listener answers decision requests and nothing else.
        self.decision_only = decision_only
        self.verdicts = verdicts
        self.metrics = metrics
        self.limits = limits
        self.pools = pools
        self.access_log = access_log
        self.scheme = b"https" if tls else b"http"
        self.request_ids = RequestIds()
        # `tracing:` (set by the app, replaced on reload); None: nothing per request
        self.tracing: Tracing | None = None
        self.connections: set[ClientConnection] = set()
        self.closing = False
        self.emptied = asyncio.Event()  # set when closing and the last connection is gone
        self.max_head_bytes = limits.max_head_bytes
        # Heads with at most this many fields cannot pass max_head_bytes, each line being at
        # most max_header_bytes (plus ": " and CRLF, and the request line's method and
        # version): not added up.
        line = limits.max_header_bytes + 4
        self.short_head_fields = (limits.max_head_bytes - 64) // line - 1
        self.max_buffered_bytes = limits.max_buffered_bytes
        # Bytes held by unfinished request heads and by bodies held for an upstream, over
        # every connection; `heads` holds the connections with an unfinished head, oldest first.
        self.buffered = 0
        self.buffered_high = 0  # since memory was last given back
        self.heads: dict[ClientConnection, None] = {}
        self.tunnels: set[Tunnel] = set()  # open WebSockets
        self.per_client: dict[str, int] = {}  # open connections per untrusted peer address
        self.refusing = 0  # connections refused at accept, still lingering
        self._sweeper: asyncio.TimerHandle | None = None
        self._methods: dict[bytes, str] = {}

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    # ------------------------------------------------------------------ timeouts
    def start_sweeping(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(self.tick, self.sweep)

    @property
    def tick(self) -> float:
        """A quarter of the shortest timeout, within 50 ms to 1 s: deadlines are kept to
        within that, at the price of one pass over the open connections per tick."""
        limits = self.limits
        shortest = min(
            limits.header_timeout,
            limits.idle_timeout,
            *(r.timeout for r in self.plan.routes.values()),
        )
        return min(1.0, max(0.05, shortest / 4))

    def sweep(self) -> None:
        now = time.monotonic()
        try:
            for conn in list(self.connections):
                conn.check(now)
            if self.tunnels:
                idle = self.limits.idle_timeout
                for tunnel in list(self.tunnels):
                    tunnel.check(now, idle)
            for pool in self.pools.values():
                pool.sweep(now)
            if self.buffered_high >= _RELEASE_AFTER and self.buffered <= self.buffered_high // 8:
                # What was held has mostly gone (an attack ended, a burst of uploads was
                # sent): give the memory back instead of keeping the peak for good.
                self.buffered_high = self.buffered
                release()
        finally:
            self._sweeper = asyncio.get_running_loop().call_later(self.tick, self.sweep)

    def stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def reloaded(self, grace: float) -> None:
        """A new config: open WebSockets may run on for `grace` seconds, then are closed."""
        deadline = time.monotonic() + grace
        for tunnel in self.tunnels:
            tunnel.finish_by(deadline)

    # ------------------------------------------------------------------ memory
    def hold(self, nbytes: int) -> None:
        """More bytes are held for a request; past the bound, the oldest unfinished heads go."""
        held = self.buffered = self.buffered + nbytes
        if held > self.buffered_high:
            self.buffered_high = held
        if held > self.max_buffered_bytes:
            self.shed_heads()

    def shed_heads(self) -> None:
        for conn in list(self.heads):
            conn.shed()
            if self.buffered <= self.max_buffered_bytes:
                break

    @property
    def full(self) -> bool:
        """No room for one more head: new connections are refused."""
        return self.buffered > self.max_buffered_bytes - self.max_head_bytes

    def drain(self) -> None:
        """Stop taking requests: idle connections close now, busy ones after their answer."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_when_idle()
        if not self.connections:
            self.emptied.set()

    # ------------------------------------------------------------------ accounting
    def method_name(self, method: bytes) -> str:
        name = self._methods.get(method)
        if name is None:
            name = method.decode("latin-1")
            if len(self._methods) < 64:
                self._methods[method] = name
        return name

    def account(self, ex: Exchange) -> None:
        """Metrics and the access log line: one place, once per request."""
        duration = time.perf_counter() - ex.started
        route = ex.route
        name = route.name if route is not None else NO_ROUTE
        decision = ex.decision
        if decision:
            self.metrics.count_decision(name, ex.method_name, ex.status)
            if route is not None:
                route.decision_duration.observe(duration)
            else:
                self.metrics.decision_duration.labels(NO_ROUTE).observe(duration)
        else:
            self.metrics.count_request(name, ex.method_name, ex.status)
            if route is not None:
                route.duration.observe(duration)
            else:
                self.metrics.request_duration.labels(NO_ROUTE).observe(duration)
        trace = ex.trace
        if trace is not None and trace.span is not None:
            trace.end(ex)  # OpenTelemetry: the request's spans end
        access_log = self.access_log
        if access_log is None:
            return
        # Built by hand: every field but the subject and a refused raw path is made of
        # characters that need no JSON escaping (request ids, route names and methods are
        # validated tokens, a normalised path has no quote or backslash, the rest numbers).
        identity = ex.identity
        if ex.path is not None:
            path = '"' + ex.path + '"'
        elif ex.raw_target:
            raw = ex.raw_target.partition(b"?")[0][:256]
            path = _json_str(raw.decode("ascii", "backslashreplace"))
        else:
            path = "null"  # refused before a request line was read whole (400, 408, 431)
        upstream = "null" if ex.upstream_seconds is None else f"{ex.upstream_seconds:.6f}"
        cache = "null" if ex.cache is None else '"' + ex.cache + '"'
        if identity is None:
            client_id = subject = "null"
        else:
            client_id = '"' + identity.client_id + '"'
            subject = "null" if identity.subject is None else _json_str(identity.subject)
        # The trace id the upstream sees: the request's valid traceparent's, or the one the
        # gateway started (tracing); 32 hex digits when not null.
        if trace is None and ex.inbound.traceparent is None:
            trace_field = "null"  # the common case: no trace context came, none started
        else:
            trace_id = trace.trace_id if trace is not None else trace_id_of(ex.inbound.traceparent)
            trace_field = "null" if trace_id is None else '"' + trace_id + '"'
        # Two f-strings: CPython builds one of more than 30 parts with a list and str.join,
        # which costs more than the concatenation of two built on the stack.
        head = (
            f'{{"request_id":"{ex.request_id}",{_DECISION_FIELD if decision else ""}'
            f'"remote":"{ex.conn.peer}",'
            f'"route":"{name}","method":"{ex.method_name}","path":{path},'
            f'"status":{ex.status},"duration":{duration:.6f},"upstream_duration":{upstream},'
        )
        access_log.write(
            head + f'"cache":{cache},"client_id":{client_id},"subject":{subject},'
            f'"bytes_in":{ex.bytes_in},"bytes_out":{ex.bytes_out},"trace_id":{trace_field},'
            f'"time":{time.time():.6f}}}'
        )


class ClientConnection(asyncio.BufferedProtocol):
    """One client connection: the parser's callbacks are its entry points."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.parser = HttpRequestParser(self)
        self.peer = ""
        self.peer_bytes = b""
        self.trusted = False
        self.server_name: str | None = None  # what a TLS client asked for (SNI)
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.in_head = True
        self.head_bytes = 0  # of the unfinished head, as they arrive
        self.waiting = False  # in listener.heads: the head outlived a read
        self.client: str | None = None  # counted against max_connections_per_client
        self.refusing = False  # refused at accept, lingering
        self.cur: Exchange | None = None  # the exchange being answered
        self.upgrading = False  # the parser stopped at an upgrade request
        self.tunnel: Tunnel | None = None  # a WebSocket now owns the transport
        self.parsing: Exchange | None = None  # the exchange whose body is being read
        self.queue: deque[Exchange] = deque()  # pipelined exchanges waiting for cur
        self.out: list[bytes] = []
        self.paused = 0
        self.write_paused = False
        self.write_deadline = _NEVER
        self.closed = False
        self.read_eof = False
        self.deadline = _NEVER
        self.deadline_kind = _NONE
        # limits.min_body_rate: body bytes since the current window opened
        self.body_window_start = 0.0
        self.body_window_bytes = 0

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        listener = self.listener
        limits = listener.limits
        if len(listener.connections) >= limits.max_connections or listener.closing:
            self._refuse_connection(_REFUSED)
            return
        if listener.full:
            self._refuse_connection(_SHED)
            return
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        self.peer_bytes = self.peer.encode()
        self.trusted = listener.plan.header_policy.trusts(self.peer)
        if listener.scheme == b"https":
            self.server_name = server_name_of(transport.get_extra_info("ssl_object"))
        cap = limits.max_connections_per_client
        if cap and not self.trusted:
            # Behind a trusted proxy, one connection carries many clients: not counted.
            count = listener.per_client.get(self.peer, 0)
            if count >= cap:
                self._refuse_connection(_REFUSED)
                return
            listener.per_client[self.peer] = count + 1
            self.client = self.peer
        listener.connections.add(self)
        # A connection's first request head must arrive within header_timeout of the connection.
        self._expect(_HEAD, listener.limits.header_timeout)

    def _refuse_connection(self, refusal: tuple[int, str, str]) -> None:
        """503 at once, then a short lingering close: a client that already sent its request
        would otherwise see a reset, which can destroy the answer before it is read."""
        listener = self.listener
        listener.metrics.connections_refused.inc()
        transport = self.transport
        assert transport is not None
        self.paused |= _PAUSE_DONE  # whatever arrives is dropped
        transport.write(closing_answer(*refusal))
        if listener.refusing >= _MAX_REFUSING or not transport.can_write_eof():
            self.closed = True  # a flood of refused connections: no fd is kept for them
            transport.close()
            return
        listener.refusing += 1
        self.refusing = True
        transport.write_eof()
        asyncio.get_running_loop().call_later(_LINGER_SECONDS, self.close)

    def shed(self) -> None:
        """Memory is short and this unfinished head is the oldest: answer 503 and close."""
        self.listener.metrics.connections_shed.inc()
        self._release_head()
        self._parse_failed(_SHED, "shed: memory short")

    def _release_head(self) -> None:
        if self.waiting:
            self.waiting = False
            listener = self.listener
            listener.buffered -= self.head_bytes
            del listener.heads[self]
        self.head_bytes = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        return READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(READ_BUFFER[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.paused & _PAUSE_DONE:
            return  # closing, or after an upgrade: nothing more is read as HTTP
        if self.in_head:
            # All of it counts as head until the parser says where the head ended; a head
            # that outlived a read holds memory (listener.buffered) until it is done.
            n = len(data)
            self.head_bytes += n
            if self.waiting:
                self.listener.hold(n)
                if self.closed or self.paused & _PAUSE_DONE:
                    return  # this one was shed
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            # Upgrade or CONNECT: answered as a plain request, then closed; a WebSocket
            # handshake on a websocket route is relayed (WebSocketExchange).
            self.pause(_PAUSE_DONE)
            self.upgrading = True
            last = self.queue[-1] if self.queue else self.cur
            if isinstance(last, WebSocketExchange) and not last.finished:
                last.sent = bytes(data[exc.args[0] :])  # sent after the head: goes up later
        except HttpParserError as exc:  # httptools wraps what a callback raised (_Refused)
            if not isinstance(exc.__context__, _Refused):
                self._parse_failed(_MALFORMED, type(exc).__name__)
        if self.in_head and self.head_bytes:
            # A head still incomplete after this read: it now holds memory until it is done.
            if self.head_bytes > self.listener.max_head_bytes:
                self._parse_failed(_TOO_BIG, "head too large")
            elif self.url and data[-1:] == b"\n" and self.parser.get_http_version() == "0.0":
                # A request line that ended without a version: an HTTP/0.9 request, which
                # would otherwise wait for a blank line until header_timeout.
                self._parse_failed(_MALFORMED, "request line without a version")
            elif not self.waiting:
                self.waiting = True
                listener = self.listener
                listener.heads[self] = None  # oldest first, for shed_heads
                listener.hold(self.head_bytes)
        if self.out:
            self.flush()

    def eof_received(self) -> bool | None:
        # A client that half-closes after whole requests still gets its answers, except
        # while a verdict is awaited: a client that closes then has given up, and its place
        # in the Authlete budget's queue goes to the next one (connection_lost follows).
        if not self.in_head or self.head_bytes or self.parsing is not None:
            return None  # mid-request: nothing more can complete it
        cur = self.cur
        if cur is None or cur.task is not None:
            return None
        self.read_eof = True
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        listener = self.listener
        if self.refusing:
            self.refusing = False
            listener.refusing -= 1
        listener.connections.discard(self)
        self._release_head()
        if self.client is not None:
            count = listener.per_client.pop(self.client, 1) - 1
            if count:
                listener.per_client[self.client] = count
            self.client = None
        if listener.closing and not listener.connections:
            listener.emptied.set()
        cur = self.cur
        for ex in (cur, self.parsing, *self.queue):
            if ex is not None and not ex.gone:
                ex.abandon()
        if cur is not None and not cur.finished and cur.route is not None:
            cur.status = 499  # the client went away before its answer was complete
            cur.finished = True
            listener.account(cur)
        self.queue.clear()
        self.cur = self.parsing = None

    def pause_writing(self) -> None:
        # The client reads slower than the upstream sends: stop reading the upstream.
        self.write_paused = True
        self.write_deadline = time.monotonic() + self.listener.limits.idle_timeout
        ex = self.cur
        if ex is not None and ex.up is not None:
            ex.up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.write_deadline = _NEVER
        ex = self.cur
        if ex is not None and ex.up is not None:
            ex.up.resume_reading()

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        if self.paused & _PAUSE_DONE:
            raise _Refused  # after a closing answer or `Connection: close`: not read
        self.headers = []
        self.url = b""
        self.in_head = True
        if self.deadline_kind != _HEAD:
            self._expect(_HEAD, self.listener.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.listener.limits.max_header_bytes:
            self._parse_failed(_TOO_BIG, "request line too long")
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.listener.limits
        if len(name) + len(value) > limits.max_header_bytes:
            self._parse_failed(_TOO_BIG, "header too long")
            raise _Refused
        if not self.in_head:
            return  # a trailer of a chunked body: not forwarded
        headers = self.headers
        headers.append((name, value))
        if len(headers) > limits.max_headers:
            self._parse_failed(_TOO_BIG, "too many headers")
            raise _Refused

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._release_head()
        listener = self.listener
        parser = self.parser
        method = parser.get_method()
        headers = self.headers
        limit = listener.max_head_bytes
        if len(headers) > listener.short_head_fields and (
            # The request line (method, spaces, version, line end), each field line
            # (": " and CRLF) and the final CRLF: only worth adding up when it could be over.
            len(method) + len(self.url) + 13 + sum(len(n) + len(v) + 4 for n, v in headers) > limit
        ):
            self._parse_failed(_TOO_BIG, "head too large")
            raise _Refused
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._parse_failed(_MALFORMED, "HTTP version " + version)
            raise _Refused
        upgrade = parser.should_upgrade()
        plan = listener.plan
        asks = plan.decision_path if listener.decision_only else plan.decision_on_proxy
        url = self.url
        if asks is not None and url.startswith(asks) and url[len(asks) : len(asks) + 1] in _AFTER:
            ex: Exchange = DecisionExchange(self, method, url, headers, version == "1.1")
        elif listener.decision_only:
            ex = DecisionExchange(self, method, url, headers, version == "1.1", stray=True)
        elif upgrade and _asks_websocket(headers):
            ex = WebSocketExchange(self, method, self.url, headers, version == "1.1")
        else:
            ex = Exchange(self, method, self.url, headers, version == "1.1")
        if upgrade or not parser.should_keep_alive():
            ex.keep_alive = False
        self.parsing = ex
        if ex.has_body:  # the body must keep arriving, until on_message_complete
            self.deadline_kind = _BODY
            now = time.monotonic()
            self.deadline = now + self.listener.limits.idle_timeout
            self.body_window_start = now
            self.body_window_bytes = 0
        else:
            self.deadline_kind = _NONE
            self.deadline = _NEVER
        if self.cur is None:
            self.cur = ex
            ex.begin()
        else:
            self.queue.append(ex)
            self.pause(_PAUSE_PIPELINE)

    def on_body(self, chunk: bytes) -> None:
        ex = self.parsing
        if ex is None:
            return
        ex.body_received(chunk)

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        self.in_head = True
        self.deadline_kind = _NONE
        self.deadline = _NEVER
        if ex is None:
            return
        if not ex.keep_alive:
            self.pause(_PAUSE_DONE)  # nothing after this request is read
        ex.request_complete()

    # ------------------------------------------------------------------ reading and writing
    def pause(self, why: int) -> None:
        if not self.paused and not self.closed and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= why

    def resume(self, why: int) -> None:
        if self.paused & why:
            self.paused &= ~why
            if not self.paused and not self.closed and self.transport is not None:
                self.transport.resume_reading()
                if self.deadline_kind == _BODY:
                    self._expect(_BODY, self.listener.limits.idle_timeout)

    def flush(self) -> None:
        out = self.out
        if not self.closed and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def abort(self) -> None:
        """Cut the connection: the client must see an incomplete answer as broken."""
        self.out.clear()
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()

    def linger(self) -> None:
        """A closing answer has been written: half-close, drop what still arrives, and
        close when the client does or after a second."""
        was_paused = self.paused
        self.paused |= _PAUSE_DONE  # from now on data_received drops everything
        transport = self.transport
        if transport is None or self.closed:
            return
        if self.out:
            self.flush()
        if not transport.can_write_eof():  # TLS: no half-close
            self.close()
            return
        if was_paused:
            transport.resume_reading()
        transport.write_eof()
        self._expect(_LINGER, _LINGER_SECONDS)

    def _expect(self, kind: int, seconds: float) -> None:
        self.deadline_kind = kind
        self.deadline = time.monotonic() + seconds

    # ------------------------------------------------------------------ exchanges
    def answered(self, ex: Exchange) -> None:
        """`ex` is complete both ways: account for it, then serve the next one."""
        if ex.finished:
            return
        ex.finished = True
        self.listener.account(ex)
        if self.out:
            self.flush()
        if self.cur is ex:
            self.cur = None
        if self.closed:
            return
        if not ex.keep_alive or not ex.request_done:
            if self.parsing is not None or not ex.request_done or self.upgrading:
                # (after an upgrade request, the client may already send the new protocol)
                self.linger()
            else:
                self.close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            if not self.queue:
                self.resume(_PAUSE_PIPELINE)
            self.cur = nxt
            nxt.begin()
            if self.out:
                self.flush()
            return
        if self.read_eof or self.listener.closing:
            self.close()
            return
        if self.in_head and self.deadline_kind != _HEAD:
            self.deadline_kind = _IDLE
            self.deadline = time.monotonic() + self.listener.limits.idle_timeout

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            if self.out:
                self.transport.write(b"".join(self.out))
                self.out.clear()
            self.transport.close()

    def close_when_idle(self) -> None:
        if (
            self.cur is None
            and self.parsing is None
            and not self.head_bytes
            and self.tunnel is None  # a WebSocket runs on until shutdown_timeout
        ):
            self.close()

    def _parse_failed(self, refusal: tuple[int, str, str], why: str) -> None:
        """The request cannot be read (or is too large to): answer in order, then close."""
        if self.paused & _PAUSE_DONE:
            return
        status, error, description = refusal
        listener = self.listener
        self.pause(_PAUSE_DONE)
        self._release_head()  # nothing more of it is read
        self.headers = []
        ex = self.parsing
        self.parsing = None
        if ex is not None and not ex.gone:
            # Its head was good and it may be on its way upstream: stop that at once.
            ex.fail_request(closing_answer(status, error, description), status)
            log.info(
                "malformed request from %s: %s",
                self.peer,
                why,
                extra={"request_id": ex.request_id or None},
            )
            return
        answer = closing_answer(status, error, description)
        refused = _closing_exchange(self, answer, status)
        log.info(
            "malformed request from %s: %s",
            self.peer,
            why,
            extra={"request_id": refused.request_id},
        )
        if self.cur is None:
            self.out.append(answer)
            listener.account(refused)
            self.linger()
        else:
            # Answered after the requests before it, which are under way.
            self.queue.append(refused)

    def check(self, now: float) -> None:
        """The sweep's visit: act on a passed deadline."""
        if self.closed:
            return
        if now >= self.write_deadline:
            self.abort()  # a client that stopped reading its answer
            return
        ex = self.cur
        if ex is not None and ex.up is not None:
            ex.check_upstream(now)
        if self.deadline_kind == _BODY and self._body_too_slow(now):
            ex = self.parsing
            self.parsing = None
            self.deadline = _NEVER
            if ex is not None:
                log.info(
                    "request body from %s too slow",
                    self.peer,
                    extra={"request_id": ex.request_id or None},
                )
                ex.refuse(BODY_TOO_SLOW)
            return
        if now < self.deadline:
            return
        kind = self.deadline_kind
        if kind == _HEAD:
            self.listener.metrics.header_timeouts.inc()
            if self.cur is None:
                answer = closing_answer(*_HEADER_TIMEOUT)
                if self.head_bytes:  # part of a request came: it gets its access line
                    self.listener.account(_closing_exchange(self, answer, 408))
                else:  # a connection that never said anything: counted, not logged
                    self.listener.metrics.count_request(NO_ROUTE, "OTHER", 408)
                self.closed = True
                self._write(answer)
                if self.transport is not None:
                    self.transport.close()
            else:
                self.deadline = _NEVER
                self._parse_failed(_HEADER_TIMEOUT, "header timeout")
        elif kind == _BODY:
            if self.paused & (_PAUSE_UPLOAD | _PAUSE_BUFFER | _PAUSE_PIPELINE):
                self._expect(_BODY, self.listener.limits.idle_timeout)  # held by us
                return
            ex = self.parsing
            self.parsing = None
            self.deadline = _NEVER
            if ex is not None:
                ex.refuse(BODY_TIMEOUT)
        elif kind in (_IDLE, _LINGER):
            self.deadline = _NEVER
            self.close()

    def _body_too_slow(self, now: float) -> bool:
        """limits.min_body_rate, judged per window; time the gateway held the body back
        (upstream not taking it, pipelining) does not count against the client."""
        limits = self.listener.limits
        rate = limits.min_body_rate
        if not rate:
            return False
        if self.paused & (_PAUSE_UPLOAD | _PAUSE_BUFFER | _PAUSE_PIPELINE):
            self.body_window_start = now
            self.body_window_bytes = 0
            return False
        elapsed = now - self.body_window_start
        if elapsed < limits.min_body_rate_window:
            return False
        if self.body_window_bytes < rate * elapsed:
            return True
        self.body_window_start = now
        self.body_window_bytes = 0
        return False


def _closing_exchange(conn: ClientConnection, answer: bytes, status: int) -> Exchange:
    """A request refused before it could be routed (malformed, 408, 431): an exchange only
    for its answer and its access line (route `(none)`, method OTHER, path null)."""
    ex = Exchange(conn, b"OTHER", b"", [], True)
    ex.keep_alive = False
    ex.request_done = True
    ex.local = answer
    ex.status = status
    ex.bytes_out = _body_size(answer)
    ex.request_id = conn.listener.request_ids.take(None)
    return ex


def _body_size(answer: bytes) -> int:
    """Body bytes of a whole answer (what `bytes_out` counts)."""
    return len(answer) - answer.index(b"\r\n\r\n") - 4


class Exchange:
    """One request and its answer; the upstream connection's `Receiver` while forwarded."""

    decision = False  # a decision request (DecisionExchange): counted and logged as one

    __slots__ = (
        "body",
        "body_size",
        "buffering",
        "bytes_in",
        "bytes_out",
        "cache",
        "chunked",
        "conn",
        "finished",
        "forwarding",
        "gone",
        "has_body",
        "headers",
        "http11",
        "identity",
        "inbound",
        "keep_alive",
        "length",
        "local",
        "method",
        "method_name",
        "path",
        "plan",
        "raw_target",
        "request_done",
        "request_id",
        "response_chunked",
        "response_done",
        "response_started",
        "retried",
        "route",
        "spool",
        "spool_sent",
        "spooled",
        "started",
        "status",
        "target",
        "task",
        "trace",
        "unsent_head",
        "up",
        "upload_done",
        "upload_paused",
        "upstream_head_bytes",
        "upstream_seconds",
        "upstream_started",
    )

    def __init__(
        self,
        conn: ClientConnection,
        method: bytes,
        raw_target: bytes,
        headers: list[tuple[bytes, bytes]],
        http11: bool,
    ) -> None:
        self.conn = conn
        self.started = time.perf_counter()
        self.method = method
        self.method_name = conn.listener.method_name(method)
        self.raw_target = raw_target
        self.headers = headers
        self.http11 = http11
        self.keep_alive = True
        plan = self.plan = conn.listener.plan
        inbound = self.inbound = plan.header_policy.scan(headers, conn.trusted, not self.decision)
        self.chunked = inbound.transfer_encoding is not None
        length = inbound.content_length
        self.has_body = self.chunked or (length is not None and length.strip(b"0 \t") != b"")
        self.request_id = ""
        self.route: CompiledRoute | None = None
        self.path: str | None = None
        self.target = b""
        self.status = 0
        self.cache: str | None = None
        self.identity: Active | None = None
        self.local: bytes | None = None  # a local answer waiting for its turn
        self.request_done = False
        self.body: list[bytes] | None = None  # body bytes held in memory, in order
        self.body_size = 0  # their size, counted in listener.buffered
        self.buffering = False  # the body is read whole before the upstream request opens
        self.spool: IO[bytes] | None = None  # the rest of a buffered body, on disk
        self.spooled = 0
        self.spool_sent = 0
        self.forwarding: tuple[Routed, Active | None] | None = None
        self.length: int | None = None  # Content-Length sent upstream for a body read whole
        self.upload_done = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.up: UpstreamConnection | None = None
        self.upstream_head_bytes = b""
        self.upload_paused = False
        self.upstream_started = 0.0
        self.upstream_seconds: float | None = None
        self.response_started = False
        self.unsent_head = False  # the response head is in the output, not yet written
        self.response_chunked = False
        self.response_done = False
        self.retried = False
        self.gone = False
        self.finished = False
        self.task: asyncio.Task[None] | None = None
        self.trace: RequestTrace | None = None  # with `tracing:` only

    # ------------------------------------------------------------------ the pipeline
    def begin(self) -> None:
        """Route, token, verdict, decision: synchronously unless the verdict is a miss.

        One method for proxied and decision requests, the hot path written out inline:
        admission (request id, trace, Host, framing), then the route (`_routed`, or a
        decision request's `_described`), then the token."""
        if self.local is not None:  # a refusal queued behind earlier requests
            self.conn.out.append(self.local)
            self.response_done = True
            self.conn.answered(self)
            return
        listener = self.conn.listener
        inbound = self.inbound
        rid = inbound.request_id
        self.request_id = listener.request_ids.take(
            rid.decode("latin-1") if rid is not None else None
        )
        decision = self.decision
        tracing = listener.tracing
        if tracing is not None:
            # A decision request is never forwarded: no trace is started for it.
            self.trace = tracing.begin(self, not decision)
        if inbound.host_count != 1 and (self.http11 or inbound.host_count > 1):
            self.refuse(BAD_HOST)
            return
        if inbound.transfer_encoding is not None:
            refused = check_framing(inbound, self.http11, 0)
            if refused is not None:
                self.refuse(refused)
                return
        routed = self._described() if decision else self._routed()
        if routed is None:
            return  # answered
        if not routed.route.auth_required:
            self.forward(routed, None)
            return
        token = token_of(self.plan, inbound)
        if isinstance(token, Denial):
            self.deny(token)
            return
        found = lookup(listener.verdicts, token)
        if isinstance(found, Miss):
            self.cache = "miss"
            waiting = self._await_verdict(routed, found)
            trace = self.trace
            if trace is None:
                self.task = asyncio.get_running_loop().create_task(waiting)
            else:  # the Authlete call made for it is traced as its child
                self.task = trace.task(waiting)
            return
        verdict, self.cache = found
        self.decide(routed, verdict)

    def _routed(self) -> Routed | None:
        """Where a proxied request goes, with its body limits; None: answered here."""
        plan = self.plan
        inbound = self.inbound
        if self.raw_target == b"*" and self.method == b"OPTIONS":
            self._server_options()
            return None
        server_name = self.conn.server_name  # TLS only
        if (
            server_name is not None
            and plan.host_routes
            and misdirected(plan, server_name, inbound.host)
        ):
            self.deny(MISDIRECTED)
            return None
        if inbound.origin is not None and self.method == b"OPTIONS" and self._preflight():
            return None
        routed = route_request(plan, self.method, self.raw_target, inbound.host)
        if isinstance(routed, Denial):
            self.deny(routed)
            return None
        route = self.route = routed.route
        self.path = routed.path
        self.target = routed.target
        if self.has_body and route.request_buffering != "off":
            # "auto" holds only what fits in memory: a body declared larger streams at once.
            length = inbound.content_length
            self.buffering = (
                route.request_buffering == "on"
                or length is None
                or int(length) <= self.conn.listener.limits.request_buffer_memory_bytes
            )
        if route.max_body_bytes and inbound.content_length is not None:
            refused = check_framing(inbound, self.http11, route.max_body_bytes)
            if refused is not None:
                self.refuse(refused)
                return None
        return routed

    def _described(self) -> Routed | None:
        """A decision request's route (DecisionExchange)."""
        raise NotImplementedError

    async def _await_verdict(self, routed: Routed, miss: Miss) -> None:
        conn = self.conn
        client = (
            self.plan.header_policy.client_of(self.inbound, conn.peer, True)
            if conn.trusted
            else conn.peer
        )
        try:
            verdict, self.cache = await conn.listener.verdicts.fetch(miss.token, miss.key, client)
        except IntrospectionError as exc:
            log.warning(
                "no verdict for route %s: %s",
                routed.route.name,
                exc.detail,
                extra={"request_id": self.request_id},
            )
            if not self.gone:
                self.deny(unavailable(exc.retry_after))
            return
        finally:
            self.task = None
        if not self.gone:
            self.decide(routed, verdict)
            if conn.out:
                conn.flush()

    def decide(self, routed: Routed, verdict: Verdict) -> None:
        if isinstance(verdict, Active):
            self.identity = verdict
        allowed = judge(self.plan, routed.route, verdict)
        if isinstance(allowed, Active):
            self.forward(routed, allowed)
        else:
            self.deny(allowed)

    # ------------------------------------------------------------------ local answers
    def deny(self, refused: Denial, close: bool = False) -> None:
        """Answer the client ourselves (RFC 6750 style for token problems)."""
        if refused.reason:
            self._count_denial(refused.reason)
        if not self.request_done:
            remaining = self._unread_body()
            if close or remaining is None or remaining > _DISCARD_LIMIT or self._expects_continue():
                close = True
        if close:
            self.keep_alive = False
        parts = [
            b"Content-Type: application/json\r\nContent-Length: %d\r\n"
            b"Cache-Control: no-store\r\nPragma: no-cache\r\n" % len(refused.body)
        ]
        if refused.challenge is not None:
            parts += (b"WWW-Authenticate: ", refused.challenge.encode(), b"\r\n")
        if refused.retry_after is not None:
            parts += (b"Retry-After: ", refused.retry_after.encode(), b"\r\n")
        cors = self.route.cors if self.route is not None else self.plan.cors
        if cors is not None:  # so that a browser application can read why
            parts.append(answer_headers(cors, self.inbound.origin, True))
        self._answer(refused.status, parts, refused.body)

    def _count_denial(self, reason: str) -> None:
        route = self.route
        counter = route.denials.get(reason) if route is not None else None
        if counter is None:
            name = route.name if route is not None else NO_ROUTE
            counter = self.conn.listener.metrics.denials.labels(name, reason)
        counter.inc()

    def _preflight(self) -> bool:
        """A CORS preflight to a route with a policy is answered here (204 or 403), without a
        token and without Authlete or the upstream. The route is the one the request it asks
        about would take (its Access-Control-Request-Method). False: not a preflight, or no
        route with a policy takes that method there: handled as an ordinary OPTIONS."""
        asked = preflight_request(self.headers)
        if asked is None:
            return False
        method, request_headers = asked
        inbound = self.inbound
        routed = route_request(self.plan, method, self.raw_target, inbound.host)
        if isinstance(routed, Denial) or routed.route.cors is None:
            return False
        self.route = routed.route
        self.path = routed.path
        assert inbound.origin is not None
        answer = preflight(routed.route.cors, inbound.origin, method, request_headers)
        if not self.request_done:
            remaining = self._unread_body()
            if remaining is None or remaining > _DISCARD_LIMIT or self._expects_continue():
                self.keep_alive = False
        self._answer(answer.status, [answer.headers], answer.body)
        return True

    def _server_options(self) -> None:
        """`OPTIONS *` asks about the server, not a resource: answered here, never routed."""
        self._answer(200, [b"Allow: ", _SERVER_METHODS, b"\r\nContent-Length: 0\r\n"], b"")

    def _answer(self, status: int, headers: list[bytes], body: bytes) -> None:
        """A local answer: status line, Date, the given header lines, the request id."""
        conn = self.conn
        self.status = status
        parts = [status_line(status), date_line(), *headers]
        parts += (b"X-Request-Id: ", self.request_id.encode(), b"\r\n")
        if not self.keep_alive:
            parts.append(b"Connection: close\r\n")
        elif not self.http11:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if self.method != b"HEAD":  # a HEAD answer announces its body but carries none
            parts.append(body)
            self.bytes_out = len(body)
        conn.out.append(b"".join(parts))
        self.response_started = self.response_done = True
        self._drop_body()
        if self.request_done:
            conn.answered(self)
        elif not self.keep_alive:
            conn.parsing = None if conn.parsing is self else conn.parsing
            conn.answered(self)
        else:
            conn.flush()  # the rest of the body is read and dropped; then it is complete

    def refuse(self, refused: Denial) -> None:
        """A denial after which the rest of the request is not worth reading."""
        if self.response_started:
            self.conn.abort()
            return
        self._drop_upstream()
        self.deny(refused, close=True)

    def fail_request(self, answer: bytes, status: int) -> None:
        """The request turned unreadable after its head (bad chunk framing, for one)."""
        self._drop_upstream()
        if self.conn.cur is not self:
            self.local = answer
            self.status = status
            self.bytes_out = _body_size(answer)
            rid = self.inbound.request_id
            self.request_id = self.conn.listener.request_ids.take(
                rid.decode("latin-1") if rid is not None else None
            )
            self.keep_alive = False
            self.request_done = True
            return
        if self.response_started:
            self.conn.abort()
            return
        self.status = status
        self.bytes_out = _body_size(answer)
        self.keep_alive = False
        self.response_started = self.response_done = True
        self.conn.out.append(answer)
        self.conn.answered(self)

    def _unread_body(self) -> int | None:
        """Bytes of body still to come, or None when unknown (chunked)."""
        inbound = self.inbound
        if self.chunked:
            return None
        if inbound.content_length is None:
            return 0
        return int(inbound.content_length) - self.bytes_in

    def _expects_continue(self) -> bool:
        inbound = self.inbound
        return inbound.expect is not None and inbound.expect.strip().lower() == b"100-continue"

    # ------------------------------------------------------------------ forwarding
    def forward(self, routed: Routed, identity: Active | None) -> None:
        conn = self.conn
        route = routed.route
        if self.has_body and self.http11 and self._expects_continue():
            # The token is good: let the client send its body now instead of after its own
            # timeout. The upstream never sees the Expect, so it sends no 100 of its own.
            conn.out.append(_CONTINUE)
        self.upstream_started = time.perf_counter()
        route.overhead.observe(self.upstream_started - self.started)
        if self.buffering and not self.request_done:
            self.forwarding = (routed, identity)
            return  # the upstream request opens once the whole body is here
        self._open_upstream(routed, identity)

    def _open_upstream(self, routed: Routed, identity: Active | None) -> None:
        self.forwarding = None  # opened: once
        route = routed.route
        conn = self.conn
        # With request_buffering "on", a body read whole goes up with its length, whatever
        # the client's framing (as nginx does); "auto" keeps the client's framing.
        self.length = self.bytes_in if self.buffering and route.request_buffering == "on" else None
        pool = route.pool
        assert pool is not None  # decision-only routes are never matched by proxied requests
        trace = self.trace
        if trace is not None and trace.span is not None:
            trace.upstream(self)  # OpenTelemetry: the traceparent sent names its span
        self.upstream_head_bytes = self.plan.header_policy.request_head(
            self.method,
            routed.target,
            (self.inbound.host or pool.host_header) if route.preserve_host else pool.host_header,
            self.inbound,
            conn.peer_bytes,
            conn.listener.scheme,
            identity,
            self.request_id.encode(),
            self.chunked,
            route.forward_authorization,
            self.length,
        )
        self._connect(route)

    def _connect(self, route: CompiledRoute) -> None:
        pool = route.pool
        assert pool is not None
        up = pool.acquire()
        if up is not None:
            self.upstream_ready(up)
        else:
            pool.open(self, route.timeout)

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        if self.gone or self.response_started:
            conn.reusable = True
            conn.pool.release(conn)
            return
        self.up = conn
        self.upload_done = False
        conn.start(self, self.upstream_head_bytes, self.method == b"HEAD")
        if self.request_done or self.body is not None or self.spool is not None:
            self._pump()
        if self.conn.write_paused:
            conn.pause_reading()

    # ------------------------------------------------------------------ the request body
    def body_received(self, chunk: bytes) -> None:
        self.bytes_in += len(chunk)
        conn = self.conn
        conn.body_window_bytes += len(chunk)
        if conn.deadline_kind == _BODY:
            conn.deadline = time.monotonic() + conn.listener.limits.idle_timeout
        route = self.route
        if route is not None and route.max_body_bytes and self.bytes_in > route.max_body_bytes:
            conn.parsing = None
            self.refuse(TOO_LARGE)
            raise _Refused
        up = self.up
        if up is not None and self.body is None and self.spool is None:
            # also while an early answer is relayed: the upstream may read on
            up.write(self._frame(chunk))
            return
        if self.response_started:
            return  # answered already: dropped
        self._keep(chunk)

    def _frame(self, data: bytes) -> bytes:
        """Body bytes as they go upstream: chunk-framed when the client's body was chunked
        and is not sent with a known length."""
        if self.chunked and self.length is None:
            return b"%x\r\n%s\r\n" % (len(data), data)
        return data

    def _keep(self, chunk: bytes) -> None:
        """Hold body bytes until they can go upstream: in memory up to a bound, then (when the
        body is buffered whole) in a temporary file."""
        listener = self.conn.listener
        if self.spool is None:
            limit = listener.limits.request_buffer_memory_bytes if self.buffering else 0
            if self.buffering and self.body_size + len(chunk) > limit:
                route = self.route
                if route is None or route.request_buffering != "on":
                    self._stop_buffering()  # "auto": a body this large streams
            if not self.buffering or self.body_size + len(chunk) <= limit:
                if self.body is None:
                    self.body = []
                self.body.append(chunk)
                self.body_size += len(chunk)
                listener.hold(len(chunk))
                if self.up is not None:
                    self._pump()  # attached just now (a body too large to buffer)
                elif not self.buffering and self.body_size > _BUFFER_LIMIT:
                    self.conn.pause(_PAUSE_BUFFER)
                return
            try:
                self.spool = tempfile.TemporaryFile(prefix="gateway-body-")  # noqa: SIM115
            except OSError as exc:
                log.warning(
                    "cannot buffer a request body on disk, streaming it: %s",
                    exc,
                    extra={"request_id": self.request_id},
                )
                self._stop_buffering()
                self._keep(chunk)
                return
        os.pwrite(self.spool.fileno(), chunk, self.spooled)
        self.spooled += len(chunk)
        route = self.route
        cap = route.max_body_bytes if route is not None and route.max_body_bytes else _SPOOL_CAP
        if self.buffering and self.spooled > cap:
            self._stop_buffering()  # no limit on this route: a huge body is streamed
        if not self.buffering:
            self.conn.pause(_PAUSE_BUFFER)  # streamed: the file drains before more is read
            self._pump()

    def _stop_buffering(self) -> None:
        self.buffering = False
        if self.forwarding is not None:  # allowed, and waiting for the body: open it now
            self._open_upstream(*self.forwarding)

    def _pump(self) -> None:
        """Send what is held, in order, as far as the upstream takes it; then, once the
        client's body is complete, finish the upstream request."""
        up = self.up
        if up is None:
            return
        if self.body is not None:
            parts, self.body = self.body, None
            up.write(b"".join(self._frame(p) for p in parts if p))
            self.conn.listener.buffered -= self.body_size
            self.body_size = 0
        spool = self.spool
        while spool is not None:
            if self.upload_paused:
                return  # resume_upload pumps again
            piece = os.pread(spool.fileno(), _PUMP_PIECE, self.spool_sent)
            if not piece:
                spool.close()
                self.spool = spool = None
                self.spooled = self.spool_sent = 0
                break
            self.spool_sent += len(piece)
            up.write(self._frame(piece))
        if self.conn.paused & _PAUSE_BUFFER:
            self.conn.resume(_PAUSE_BUFFER)
        if self.request_done and not self.upload_done:
            self.upload_done = True
            if self.chunked and self.length is None:
                up.write(b"0\r\n\r\n")
            up.sent()

    def _drop_body(self) -> None:
        if self.body is not None:
            self.body = None
            self.conn.listener.buffered -= self.body_size
            self.body_size = 0
        if self.spool is not None:
            self.spool.close()
            self.spool = None

    def request_complete(self) -> None:
        self.request_done = True
        if self.response_done:
            self.conn.answered(self)
            return
        if self.buffering:
            if self.forwarding is not None:
                self._open_upstream(*self.forwarding)
            return
        up = self.up
        if up is not None:
            if self.body is None and self.spool is None and not self.chunked:
                self.upload_done = True  # the common case: nothing held, nothing to end
                up.sent()
                return
            self._pump()

    def check_upstream(self, now: float) -> None:
        """The route's timeout, while the upstream owes us bytes or will not take ours."""
        up = self.up
        route = self.route
        if up is None or route is None or up.read_paused:
            return
        if not (up.request_sent or self.upload_paused):
            return
        if now - up.last_read > route.timeout:
            self.upstream_failed("timeout", False)

    def _drop_upstream(self) -> None:
        up = self.up
        if up is not None:
            self.up = None
            up.abort()
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def abandon(self) -> None:
        """The client is gone: nothing more is sent or awaited for this exchange."""
        self.gone = True
        self._drop_upstream()
        self._drop_body()

    # ------------------------------------------------------------------ upstream.Receiver
    def upstream_interim(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        if status == 100 or not self.http11 or self.response_started:
            return  # the gateway sent its own 100 Continue, or the client asked for none
        self.conn.out += (status_line(status, reason), *response_headers(headers), b"\r\n")

    def upstream_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], framing: int
    ) -> None:
        route = self.route
        assert route is not None
        self.conn.listener.metrics.count_upstream(route.name, status)
        self.status = status
        self.response_started = True
        parts = [status_line(status, reason), *response_headers(headers, self)]
        if route.cors is not None:  # the gateway's policy, not the upstream's
            parts[1:] = relay(route.cors, parts[1:], self.inbound.origin)
        parts += (b"X-Request-Id: ", self.request_id.encode(), b"\r\n")
        if not self.request_done:
            self.keep_alive = False  # an early answer: the rest of the body is not read
        if framing in (CHUNKED, STREAM):
            if self.http11:
                parts.append(b"Transfer-Encoding: chunked\r\n")
                self.response_chunked = True
            else:
                self.keep_alive = False  # an HTTP/1.0 client reads until we close
        if not self.keep_alive:
            parts.append(b"Connection: close\r\n\r\n")
        elif not self.http11:
            parts.append(b"Connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        self.conn.out.append(b"".join(parts))
        self.unsent_head = True

    def rewrite_location(self, value: bytes) -> bytes:
        """A Location or Content-Location of the upstream's answer, as the client sees it."""
        route = self.route
        redirects = route.redirects if route is not None else None
        if redirects is None:
            return value
        return redirects.rewrite(value, self.inbound, self.conn.listener.scheme)

    def upstream_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.response_chunked:
            self.conn.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.conn.out.append(data)

    def upstream_end(self) -> None:
        self.up = None
        if self.response_chunked:
            self.conn.out.append(b"0\r\n\r\n")
        self._upstream_done()
        self.response_done = True
        conn = self.conn
        if not self.request_done:
            conn.parsing = None if conn.parsing is self else conn.parsing
        conn.answered(self)

    def upstream_failed(self, kind: str, retryable: bool) -> None:
        up, self.up = self.up, None
        if up is not None:
            up.abort()
        if self.gone:
            return
        route = self.route
        assert route is not None
        if (
            retryable
            and not self.retried
            and not self.response_started
            and self.method in IDEMPOTENT
            and not self.has_body
            and self.request_done
        ):
            # A reused keep-alive connection the upstream had closed, or (with several
            # endpoints) one reset before any answer: once more, afresh, elsewhere if it can.
            self.retried = True
            assert route.pool is not None
            route.pool.reconnect(self, route.timeout, up.pool if up is not None else None)
            return
        self._upstream_done()
        if self.trace is not None:
            self.trace.upstream_failed(kind)
        errors = route.upstream_errors.get(kind)
        if errors is None:
            errors = route.upstream_errors[kind] = (
                self.conn.listener.metrics.upstream_errors.labels(route.name, kind)
            )
        errors.inc()
        if self.unsent_head:
            # The head arrived in the same read as the fault: nothing was relayed yet, so
            # the client can still get an honest 502 instead of a cut connection.
            self.conn.out.clear()
            self.response_started = self.unsent_head = self.response_chunked = False
            self.keep_alive = self.keep_alive and self.request_done
        if self.response_started:
            # The status line is gone already: all we can honestly do is cut the connection,
            # so the client sees a truncated message instead of a complete wrong one.
            log.info(
                "response stream cut: upstream %s", kind, extra={"request_id": self.request_id}
            )
            self.conn.abort()
            return
        origin = route.pool.upstream.origin if route.pool is not None else "-"
        log.warning(
            "upstream %s for route %s: %s",
            origin,
            route.name,
            kind,
            extra={"request_id": self.request_id},
        )
        self.deny(GATEWAY_TIMEOUT if kind == "timeout" else BAD_GATEWAY)
        if self.conn.out:
            self.conn.flush()

    def upstream_upgraded(
        self, reason: bytes, headers: list[tuple[bytes, bytes]], sent: bytes
    ) -> None:
        self.upstream_failed("protocol", False)  # never asked for (see WebSocketExchange)

    def upstream_flush(self) -> None:
        self.unsent_head = False
        if self.conn.out:
            self.conn.flush()

    def pause_upload(self) -> None:
        self.upload_paused = True
        self.conn.pause(_PAUSE_UPLOAD)

    def resume_upload(self) -> None:
        self.upload_paused = False
        if self.spool is not None:
            self._pump()
        self.conn.resume(_PAUSE_UPLOAD)

    def _upstream_done(self) -> None:
        if self.upstream_seconds is None and self.upstream_started:
            self.upstream_seconds = time.perf_counter() - self.upstream_started
            route = self.route
            if route is not None:
                route.upstream_duration.observe(self.upstream_seconds)


_WEBSOCKET_UPGRADE = b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def _asks_websocket(headers: list[tuple[bytes, bytes]]) -> bool:
    """An upgrade request whose Upgrade names websocket (only asked when llhttp reports an
    upgrade: the ordinary request path never comes here)."""
    for name, value in headers:
        if name.lower() == b"upgrade":
            return any(t.strip().lower() == b"websocket" for t in value.split(b","))
    return False


class WebSocketExchange(Exchange):
    """A request with `Upgrade: websocket`. On a route with `websocket: true` (a GET without
    a body) it is checked like any request, then forwarded as a handshake (Connection and
    Upgrade restored, the Sec-WebSocket-* fields passed as any end-to-end header); the
    upstream's 101 is relayed and a `Tunnel` takes both connections. Anywhere else, and for
    any other answer of the upstream, it is an ordinary request after which the connection
    closes, as any upgrade request."""

    __slots__ = ("handshake", "sent")

    def __init__(
        self,
        conn: ClientConnection,
        method: bytes,
        raw_target: bytes,
        headers: list[tuple[bytes, bytes]],
        http11: bool,
    ) -> None:
        super().__init__(conn, method, raw_target, headers, http11)
        self.handshake = False
        self.sent = b""  # bytes the client sent after the head, before any answer

    def _connect(self, route: CompiledRoute) -> None:
        if route.route.websocket and self.method == b"GET" and self.http11 and not self.has_body:
            self.handshake = True
            # request_head ends with the blank line: the upgrade fields go before it
            self.upstream_head_bytes = self.upstream_head_bytes[:-2] + _WEBSOCKET_UPGRADE
        super()._connect(route)

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        super().upstream_ready(conn)
        if self.handshake and self.up is conn:
            conn.upgrade = True

    def upstream_upgraded(
        self, reason: bytes, headers: list[tuple[bytes, bytes]], sent: bytes
    ) -> None:
        up, self.up = self.up, None
        route = self.route
        conn = self.conn
        client = conn.transport
        if up is None or route is None or self.gone or conn.closed or client is None:
            if up is not None:
                up.abort()
            return
        upstream = up.transport
        assert upstream is not None
        listener = conn.listener
        listener.metrics.count_upstream(route.name, 101)
        self._upstream_done()
        self.status = 101
        self.response_started = self.response_done = True
        parts = [status_line(101, reason), *response_headers(headers)]
        parts += (b"X-Request-Id: ", self.request_id.encode(), b"\r\n", _WEBSOCKET_UPGRADE)
        conn.out.append(b"".join(parts))
        conn.flush()
        self.finished = True
        listener.account(self)  # the handshake's line; the socket's life is in the metrics
        conn.cur = None
        conn.deadline = conn.write_deadline = _NEVER
        conn.deadline_kind = _NONE

        def client_lost() -> None:
            conn.connection_lost(None)

        tunnel = conn.tunnel = Tunnel(
            route.name,
            client,
            upstream,
            route.route.websocket_max_lifetime,
            listener.metrics,
            listener.tunnels,
            client_lost,
            up.ended,
        )
        tunnel.start(self.sent, sent)
        self.sent = b""


class DecisionExchange(Exchange):
    """A decision request from an ingress (nginx `auth_request`, Caddy `forward_auth`,
    Traefik ForwardAuth, Envoy `ext_authz`): the request it describes is routed and its
    token checked as a proxied request would be, and the answer is 200 with the identity
    headers, or the denial proxy mode would send. Nothing is forwarded.

    Only peers in `trusted_proxies` are asked what they describe: from anyone else, a
    client could choose the path that is checked and present a token valid for another."""

    __slots__ = ("stray",)

    decision = True

    def __init__(
        self,
        conn: ClientConnection,
        method: bytes,
        raw_target: bytes,
        headers: list[tuple[bytes, bytes]],
        http11: bool,
        stray: bool = False,
    ) -> None:
        super().__init__(conn, method, raw_target, headers, http11)
        self.stray = stray  # not at the decision path, on the decision listener: 404
        self.buffering = False

    def _described(self) -> Routed | None:
        """The route of the request the ingress describes; None: answered here."""
        conn = self.conn
        plan = self.plan
        inbound = self.inbound
        if self.stray:
            self.deny(NOT_FOUND)
            return None
        if not conn.trusted:
            log.warning(
                "decision request from %s refused: the peer is not in trusted_proxies",
                conn.peer,
                extra={"request_id": self.request_id},
            )
            self.deny(UNTRUSTED)
            return None
        path = plan.decision_path
        assert path is not None
        rest = self.raw_target[len(path) :]
        original = describe_found(
            inbound.description, self.method, inbound.host, rest if rest[:1] == b"/" else None
        )
        if isinstance(original, str):
            self.deny(unclear(original))
            return None
        self.method_name = conn.listener.method_name(original.method)
        self.raw_target = original.target  # what the access line shows
        routed = route_request(plan, original.method, original.target, original.host, True)
        if isinstance(routed, Denial):
            self.deny(routed)
            return None
        if routed.path.encode("latin-1") != original.target.partition(b"?")[0]:
            # The ingress forwards the target as the client sent it, not as normalised here:
            # `/orders/../public` would be checked as /public, and an upstream routing on the
            # raw path could serve /orders. Only a target already in normal form is decided.
            self.deny(NOT_NORMAL)
            return None
        self.route = routed.route
        self.path = routed.path
        return routed

    def forward(self, routed: Routed, identity: Active | None) -> None:
        """Allowed: 200, the identity headers, no body; the ingress forwards the request."""
        if not self.request_done:
            remaining = self._unread_body()
            if remaining is None or remaining > _DISCARD_LIMIT or self._expects_continue():
                self.keep_alive = False
        parts = [_ALLOWED]
        policy = self.plan.header_policy
        if identity is not None:
            parts.append(policy.identity_lines(identity))
        # Envoy's ext_authz copies only the identity headers an answer carries, and leaves a
        # client's copy of the others: it removes what this header lists.
        parts.append(policy.unset_identity(identity))
        self._answer(200, parts, b"")
