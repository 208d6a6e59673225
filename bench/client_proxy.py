"""The own-client reference: the bare proxy's aiohttp server in front of the gateway's own
upstream client (`gateway.upstream`: the keep-alive `Pool`, `UpstreamConnection` on httptools).

The server side is bench/bare_proxy.py's (low-level `web.Server`, `StreamResponse`, uvloop, no
GC tuning), so `bare` vs `client` isolates the upstream client and `client` vs `gateway` the
listener plus the product's work. No routing, no token, no checks; hop-by-hop headers dropped,
bodies streamed both ways with flow control, one retry of a request without a body whose reused
connection the upstream had closed. No per-request read timeout (the gateway checks it in a
coarse sweep; the upstream here is a local nginx).

    python bench/client_proxy.py --listen 127.0.0.1:8082 --upstream http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from urllib.parse import urlsplit

import uvloop
from aiohttp import web
from multidict import CIMultiDict

from gateway.config import Upstream
from gateway.http import HOP_BY_HOP_BYTES
from gateway.upstream import Pool, UpstreamConnection

_DROP = HOP_BY_HOP_BYTES | {b"host"}
_HIGH = 64 * 1024  # response bytes queued for the client before the upstream read pauses
CONNECT_TIMEOUT = 30.0


class _Exchange:
    """`upstream.Receiver` of one request: records what the upstream says and wakes the
    handler, which does all the awaiting (head, body chunks, room for the upload)."""

    __slots__ = (
        "abandoned",
        "buffered",
        "chunks",
        "conn",
        "ended",
        "error",
        "headers",
        "loop",
        "read_paused",
        "reason",
        "retryable",
        "status",
        "upload_paused",
        "waiter",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiter: asyncio.Future[None] | None = None
        self.conn: UpstreamConnection | None = None  # while the exchange holds one
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.ended = False
        self.error: str | None = None
        self.retryable = False
        self.read_paused = False
        self.upload_paused = False
        self.abandoned = False

    async def wait(self) -> None:
        self.waiter = self.loop.create_future()
        await self.waiter

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # upstream.Receiver
    def upstream_ready(self, conn: UpstreamConnection) -> None:
        if self.abandoned:
            conn.reusable = True
            conn.pool.release(conn)
            return
        self.conn = conn
        self._wake()

    def upstream_interim(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        pass  # 1xx answers are not relayed

    def upstream_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], framing: int
    ) -> None:
        self.status, self.reason, self.headers = status, reason, headers
        self._wake()

    def upstream_body(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > _HIGH and not self.read_paused and self.conn is not None:
            self.read_paused = True
            self.conn.pause_reading()
        self._wake()

    def upstream_end(self) -> None:
        conn, self.conn = self.conn, None  # back in the pool (or closed) already
        if self.read_paused and conn is not None:
            # Paused by this answer's last read: an idle pooled connection must read.
            self.read_paused = False
            conn.resume_reading()
        self.ended = True
        self._wake()

    def upstream_failed(self, kind: str, retryable: bool) -> None:
        self.conn = None
        self.error, self.retryable = kind, retryable
        self._wake()

    def upstream_flush(self) -> None:
        pass  # the handler writes

    def pause_upload(self) -> None:
        self.upload_paused = True

    def resume_upload(self) -> None:
        self.upload_paused = False
        self._wake()


def _request_head(request: web.BaseRequest, host: bytes, chunked: bool) -> bytes:
    parts = [request.method.encode(), b" ", request.raw_path.encode(), b" HTTP/1.1\r\nHost: "]
    parts += (host, b"\r\n")
    for name, value in request.raw_headers:
        if name.lower() not in _DROP:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"\r\n")
    return b"".join(parts)


async def _upload(request: web.BaseRequest, ex: _Exchange, chunked: bool) -> None:
    async for chunk in request.content.iter_any():
        conn = ex.conn
        if conn is None:
            return  # answered early, or failed: the rest is not sent
        conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        while ex.upload_paused and ex.conn is not None:
            await ex.wait()
    if chunked and ex.conn is not None:
        ex.conn.write(b"0\r\n\r\n")


async def serve(host: str, port: int, upstream: str) -> None:
    loop = asyncio.get_running_loop()
    url = urlsplit(upstream)
    pool = Pool(Upstream(url.scheme, url.hostname or "127.0.0.1", url.port or 80), None)

    def sweep() -> None:
        pool.sweep(time.monotonic())
        loop.call_later(1.0, sweep)

    loop.call_later(1.0, sweep)

    async def exchange(
        request: web.BaseRequest, head: bytes, body: bool, chunked: bool
    ) -> _Exchange:
        for attempt in (1, 2):
            ex = _Exchange(loop)
            try:
                conn = pool.acquire()
                if conn is None:
                    pool.open(ex, CONNECT_TIMEOUT)
                    while ex.conn is None and ex.error is None:
                        await ex.wait()
                    conn = ex.conn
                    if conn is None:
                        raise web.HTTPBadGateway()
                ex.conn = conn
                conn.start(ex, head, request.method == "HEAD")
                if body:
                    await _upload(request, ex, chunked)
                conn.sent()
                while not ex.status and ex.error is None:
                    await ex.wait()
            except BaseException:
                _abandon(ex)
                raise
            if ex.status:
                return ex
            if not (ex.retryable and attempt == 1 and not body):
                raise web.HTTPBadGateway()
        raise AssertionError("unreachable")

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        body = request.body_exists
        chunked = body and request.content_length is None
        ex = await exchange(
            request, _request_head(request, pool.host_header, chunked), body, chunked
        )
        try:
            response = web.StreamResponse(
                status=ex.status,
                reason=ex.reason.decode("latin-1") or None,
                headers=CIMultiDict(
                    (n.decode("latin-1"), v.decode("latin-1"))
                    for n, v in ex.headers
                    if n.lower() not in _DROP
                ),
            )
            await response.prepare(request)
            while True:
                if ex.chunks:
                    chunks, ex.chunks, ex.buffered = ex.chunks, [], 0
                    await response.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                    if ex.read_paused and ex.conn is not None:
                        ex.read_paused = False
                        ex.conn.resume_reading()
                elif ex.ended:
                    break
                elif ex.error is not None:  # the status line is out: cut the response
                    raise ConnectionResetError(f"upstream {ex.error}")
                else:
                    await ex.wait()
            await response.write_eof()
            return response
        finally:
            _abandon(ex)

    runner = web.ServerRunner(web.Server(handle, access_log=None), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"client proxy on {host}:{port} -> {upstream}", flush=True)
    await stop.wait()
    await runner.cleanup()
    pool.close()


def _abandon(ex: _Exchange) -> None:
    """The handler is done with the exchange: a connection still mid-exchange is aborted,
    and one still being opened goes to the pool when it arrives."""
    ex.abandoned = True
    conn, ex.conn = ex.conn, None
    if conn is not None and not ex.ended:
        conn.abort()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--upstream", required=True, help="http://host:port (no path)")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(host, int(port), args.upstream.rstrip("/")))


if __name__ == "__main__":
    main()
