"""A WebSocket after its handshake: bytes relayed both ways, never decoded.

The two transports (the client's and the upstream's) are handed to one `Tunnel`, one
`_End` protocol each. What one end reads is written to the other; when the other's write
buffer passes a high-water mark, reading the first end pauses until it drains (asyncio's
flow control), so a slow side holds memory flat: at most the mark plus one read per
direction. When either side ends (EOF or close), the other is closed after its buffered
bytes are written. The listener's sweep closes a tunnel that was silent both ways for
`limits.idle_timeout`, or that lived the route's `websocket_max_lifetime`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from gateway.metrics import Metrics

# Per direction: bytes written and not yet taken by the receiving side's socket, past which
# the sending side is no longer read.
HIGH_WATER = 64 * 1024
# After a close, a side that does not take its buffered bytes for this long is cut.
_CLOSE_GRACE = 5.0


class _End(asyncio.Protocol):
    """One side of a tunnel: reads go to the peer's transport."""

    __slots__ = ("lost", "peer", "transport", "tunnel")

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.peer: _End = self
        self.lost = False

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        tunnel.last = time.monotonic()
        tunnel.relayed += len(data)
        peer = self.peer.transport
        if not peer.is_closing():
            peer.write(data)

    def eof_received(self) -> bool | None:
        # Half-close: the other side is closed once what it was sent is written.
        self.tunnel.close()
        return None  # this transport closes too (after writing what it holds)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.tunnel.side_lost(self)

    def pause_writing(self) -> None:
        # This side's socket does not take what the peer sends: stop reading the peer.
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()


class Tunnel:
    """One WebSocket: its two ends, its deadlines and its accounting."""

    __slots__ = (
        "client",
        "closed_at",
        "deadline",
        "done",
        "last",
        "metrics",
        "on_client_lost",
        "on_upstream_lost",
        "opened",
        "relayed",
        "route",
        "tunnels",
    )

    def __init__(
        self,
        route: str,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        max_lifetime: float,
        metrics: Metrics,
        tunnels: set[Tunnel],
        on_client_lost: Callable[[], None],
        on_upstream_lost: Callable[[], None],
    ) -> None:
        self.route = route
        self.client = _End(self, client)
        self.client.peer = upstream_end = _End(self, upstream)
        upstream_end.peer = self.client
        self.opened = self.last = time.monotonic()
        self.deadline = self.opened + max_lifetime if max_lifetime else math.inf
        self.closed_at = math.inf
        self.relayed = 0
        self.done = False
        self.metrics = metrics
        self.tunnels = tunnels
        self.on_client_lost = on_client_lost
        self.on_upstream_lost = on_upstream_lost

    @property
    def upstream(self) -> _End:
        return self.client.peer

    def start(self, client_sent: bytes, upstream_sent: bytes) -> None:
        """Take both transports over; `client_sent` and `upstream_sent` are bytes each side
        sent after its handshake head, in the same read."""
        self.tunnels.add(self)
        self.metrics.websockets_open.labels(self.route).inc()
        for end in (self.client, self.upstream):
            transport = end.transport
            transport.set_write_buffer_limits(HIGH_WATER, HIGH_WATER // 4)
            transport.set_protocol(end)
        if client_sent:
            self.upstream.transport.write(client_sent)
        if upstream_sent:
            self.client.transport.write(upstream_sent)
        for end in (self.client, self.upstream):
            if not end.transport.is_reading():
                end.transport.resume_reading()

    def close(self) -> None:
        """Both sides close once their buffered bytes are written."""
        if self.closed_at == math.inf:
            self.closed_at = time.monotonic()
        for end in (self.client, self.upstream):
            if not end.lost:
                end.transport.close()

    def abort(self) -> None:
        for end in (self.client, self.upstream):
            if not end.lost:
                end.transport.abort()

    def side_lost(self, end: _End) -> None:
        if end is self.client:
            self.on_client_lost()
        else:
            self.on_upstream_lost()
        if not (self.client.lost and self.upstream.lost):
            self.close()  # the other side: once written, or cut by `check` after the grace
            return
        if not self.done:
            self.done = True
            self.tunnels.discard(self)
            self.metrics.websockets_open.labels(self.route).dec()
            self.metrics.websocket_duration.labels(self.route).observe(
                time.monotonic() - self.opened
            )

    def check(self, now: float, idle_timeout: float) -> None:
        """The sweep's visit: silence both ways, the lifetime, a close that does not end."""
        if self.closed_at != math.inf:
            if now - self.closed_at >= _CLOSE_GRACE:
                self.abort()
            return
        if now - self.last >= idle_timeout or now >= self.deadline:
            self.close()

    def finish_by(self, deadline: float) -> None:
        """A reload: the socket may run on until `deadline`, then it is closed."""
        self.deadline = min(self.deadline, deadline)
