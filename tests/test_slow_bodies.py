"""Slow request bodies (issue 10, section 6, and section 7's first bullet), over real loopback
sockets: request buffering (`on` / `auto` / `off`), the spill of a buffered body to an
unnamed temporary file, `limits.min_body_rate`, and upstreams that answer before reading
the whole body.

The finding these tests pin down: two POSTs trickling a byte at a time held both gunicorn
sync workers, so a plain GET behind them waited for a worker. A body the gateway buffers
never reaches the upstream before it is complete, and a body trickling slower than
`min_body_rate` gets 408 and is closed, while time the gateway itself held the body back
(upstream backpressure, pipelining) is never held against the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    WAIT,
    Client,
    Handler,
    KiB,
    MakeUpstream,
    MiB,
    Response,
    Running,
    StartGateway,
    UpConn,
    UpRequest,
    chunked,
    echo_answer,
    eventually,
    head,
    http,
    parse_first,
    response,
    sha,
)

PROC_FD = Path("/proc/self/fd")
SPILL_WARNING = "cannot buffer a request body on disk"


# =========================================================================== helpers


def public(upstream: str, prefix: str = "/public", **extra: Any) -> dict[str, Any]:
    name = prefix.strip("/") or "root"
    return {"name": name, "path_prefix": prefix, "upstream": upstream, "auth": "none", **extra}


def timed(arrivals: list[float]) -> Handler:
    """An echo upstream that notes the moment each request head arrives."""

    async def answer(conn: UpConn, req: UpRequest) -> bytes | None:
        arrivals.append(time.monotonic())
        return await echo_answer(conn, req)

    return http(answer)


@contextlib.asynccontextmanager
async def running(coro: Coroutine[Any, Any, Any]) -> AsyncIterator[asyncio.Task[Any]]:
    """Run `coro` as a task for the block's duration; cancelled at the end if unfinished."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError, ConnectionError):
            await task


async def send_body(client: Client, data: bytes, piece: int = 64 * KiB) -> None:
    """Write `data` in pieces, each drained; stops quietly when the gateway stops reading
    (closed, or reading nothing more for a long while)."""
    for i in range(0, len(data), piece):
        try:
            if not await client.send(data[i : i + piece], timeout=30):
                return
        except TimeoutError:
            return


class Trickle:
    """Sends `data` `count` times, `interval` seconds apart; `sent` counts the writes that
    went (also when the task is cancelled half-way)."""

    def __init__(self, client: Client, count: int, interval: float, data: bytes = b"x") -> None:
        self.client = client
        self.count = count
        self.interval = interval
        self.data = data
        self.sent = 0

    async def run(self) -> None:
        for _ in range(self.count):
            if not await self.client.send(self.data):
                return
            self.sent += 1
            await asyncio.sleep(self.interval)


async def dribble(client: Client, data: bytes, piece: int = 8 * KiB) -> None:
    """Write `data` a piece every 20 ms, until done or the gateway stops taking it."""
    for i in range(0, len(data), piece):
        if not await client.send(data[i : i + piece]):
            return
        await asyncio.sleep(0.02)


async def get(port: int, target: str, timeout: float = WAIT) -> Response:
    """One GET on a new connection."""
    client = await Client.open(port)
    try:
        assert await client.send(head("GET", target, "Connection: close"))
        return await client.response(timeout=timeout)
    finally:
        client.close()


def json_error(resp: Response, status: int) -> dict[str, Any]:
    assert resp.status == status, (resp.status, resp.body[:300])
    content_type = (resp.header("Content-Type") or "").split(";")[0].strip()
    assert content_type == "application/json", resp.headers
    doc: dict[str, Any] = resp.json()
    assert isinstance(doc.get("error"), str), doc
    return doc


def no_errors(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing at ERROR or above from any logger, and no traceback at any level."""
    bad = [
        f"{r.name} {r.levelname}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR or r.exc_info
    ]
    assert bad == [], bad


def files_open_under(directory: Path) -> list[str]:
    """What this process's open descriptors point to inside `directory` (an unlinked file
    shows as `<dir>/<name> (deleted)`, or `<dir>/#<inode> (deleted)` with O_TMPFILE)."""
    prefix = os.path.realpath(directory) + os.sep
    found = []
    for name in os.listdir(PROC_FD):
        try:
            target = os.readlink(PROC_FD / name)
        except OSError:
            continue  # closed since the listing (the listing's own descriptor, for one)
        if target.startswith(prefix):
            found.append(target)
    return found


def open_fds() -> int:
    return len(os.listdir(PROC_FD))


@pytest.fixture
def spill_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temporary directory for the gateway's spilled bodies (nobody else's files
    in it), or a skip where descriptors cannot be inspected."""
    if not PROC_FD.is_dir():
        pytest.skip("needs /proc/self/fd")
    directory = tmp_path / "spill"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


# =========================================================================== 1. the finding


async def test_trickling_posts_do_not_hold_gunicorn_sync_workers(
    start_gateway: StartGateway, flask_upstream: str
) -> None:
    """gunicorn+Flask with 2 sync workers behind a public route. Two POSTs trickle one byte
    every 0.5 s: with the default buffering the gateway holds their bodies, so a GET is
    answered at once and the POSTs go up whole when they complete. The control: with
    request_buffering off the trickles occupy both workers and the GET waits."""
    no_rate = {"min_body_rate": 0}  # the trickle must not be cut: the workers are the point
    length = 100

    # default config: "auto" buffering, a 100-byte body fits in memory
    gw = await start_gateway([public(flask_upstream)], limits=no_rate)
    assert gw.config.routes[0].request_buffering == "auto"
    clients = [await Client.open(gw.port) for _ in range(2)]
    drips = [Trickle(c, length - 2, 0.5) for c in clients]
    try:
        for c in clients:
            assert await c.send(head("POST", "/public/slow", f"Content-Length: {length}") + b"x")
        async with running(drips[0].run()), running(drips[1].run()):
            await asyncio.sleep(1.0)
            started = time.monotonic()
            fast = await asyncio.wait_for(get(gw.port, "/public/fast"), 2.0)
            took = time.monotonic() - started
        assert fast.status == 200, fast.body[:300]
        assert fast.json()["framework"] == "flask"
        assert took < 2.0
        # the trickles still complete, whole, once the rest of their bodies arrives
        for c, drip in zip(clients, drips, strict=True):
            assert 0 < drip.sent < length - 1
            assert await c.send(b"y" * (length - 1 - drip.sent))
            whole = await c.response("POST")
            assert whole.status == 200, whole.body[:300]
            assert whole.json()["body_length"] == length
    finally:
        for c in clients:
            c.close()

    # control: the same with request_buffering off -> the GET waits for a worker
    gw = await start_gateway([public(flask_upstream, request_buffering="off")], limits=no_rate)
    clients = [await Client.open(gw.port) for _ in range(2)]
    drips = [Trickle(c, length - 2, 0.5) for c in clients]
    getter: asyncio.Task[Response] | None = None
    try:
        for c in clients:
            assert await c.send(head("POST", "/public/slow", f"Content-Length: {length}") + b"x")
        async with running(drips[0].run()), running(drips[1].run()):
            await asyncio.sleep(1.0)
            getter = asyncio.create_task(get(gw.port, "/public/blocked", timeout=30))
            done, _ = await asyncio.wait({getter}, timeout=1.5)
            assert not done, "the GET was answered while both sync workers were trickled"
    finally:
        for c in clients:
            c.close()
    # the trickling clients are gone: their upstream connections are cut, the workers free
    assert getter is not None
    try:
        recovered = await asyncio.wait_for(getter, 15)
    finally:
        getter.cancel()
    assert recovered.status == 200, recovered.body[:300]


# =========================================================================== 2. "on"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_on_sends_nothing_upstream_before_the_body_is_complete(
    start_gateway: StartGateway, raw_upstream: MakeUpstream, framing: str
) -> None:
    arrivals: list[float] = []
    up = await raw_upstream(timed(arrivals))
    gw = await start_gateway([public(up.url, request_buffering="on")])
    body = os.urandom(4000)
    if framing == "chunked":
        first, second = chunked(body[:2000], 500)[:-5], chunked(body[2000:], 500)
        line = "Transfer-Encoding: chunked"
    else:
        first, second = body[:2000], body[2000:]
        line = f"Content-Length: {len(body)}"
    client = await Client.open(gw.port)
    try:
        assert await client.send(head("POST", "/public/held", line) + first)
        await asyncio.sleep(0.5)
        assert arrivals == [], "the upstream request opened before the body was complete"
        second_sent = time.monotonic()
        assert await client.send(second)
        resp = await client.response("POST")
    finally:
        client.close()
    assert resp.status == 200, resp.body[:300]
    assert resp.json() == {
        "method": "POST",
        "target": "/public/held",
        "length": len(body),
        "sha256": sha(body),
    }
    assert len(arrivals) == 1
    assert arrivals[0] >= second_sent
    req = up.requests[0]
    # a body read whole goes up with its length, whatever the client's framing (as nginx)
    assert req.values("Content-Length") == [str(len(body)).encode()]
    assert req.values("Transfer-Encoding") == []


async def test_on_spills_a_large_chunked_body_to_an_unlinked_file_and_sends_its_length(
    start_gateway: StartGateway, upstream: str, spill_dir: Path
) -> None:
    """5 MiB, chunked, with 64 KiB kept in memory: the rest goes to a temporary file that
    has no name from the start and is closed once sent; upstream it arrives intact with a
    Content-Length and without Transfer-Encoding."""
    gw = await start_gateway(
        [public(upstream, request_buffering="on")],
        limits={"request_buffer_memory_bytes": 64 * KiB},
    )
    body = os.urandom(5 * MiB)
    encoded = chunked(body, 64 * KiB)
    split = len(chunked(body[:MiB], 64 * KiB)) - 5  # the first MiB's chunks, no terminator
    warm = await get(gw.port, "/public/warm")  # the pooled upstream connection exists
    assert warm.status == 200
    before = open_fds()
    assert files_open_under(spill_dir) == []
    client = await Client.open(gw.port)
    try:
        lines = ("Transfer-Encoding: chunked", "Connection: close")
        assert await client.send(head("POST", "/public/big", *lines) + encoded[:split])
        await eventually(
            lambda: len(files_open_under(spill_dir)) == 1, "the body to spill to a temporary file"
        )
        spilled = files_open_under(spill_dir)[0]
        assert spilled.endswith(" (deleted)"), spilled  # never reachable by name
        assert os.listdir(spill_dir) == []
        assert await client.send(encoded[split:])
        resp = await client.response("POST", timeout=15)
    finally:
        client.close()
    assert resp.status == 200, resp.body[:300]
    echo = resp.json()
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    headers = {k.lower(): v for k, v in echo["headers"]}
    assert headers.get("content-length") == str(len(body))
    assert "transfer-encoding" not in headers
    await eventually(lambda: files_open_under(spill_dir) == [], "the temporary file to close")
    assert os.listdir(spill_dir) == []
    await eventually(lambda: open_fds() <= before, f"the open descriptors to return to {before}")


# =========================================================================== 3. "auto"


async def test_auto_holds_a_small_chunked_body_and_keeps_its_framing(
    start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    arrivals: list[float] = []
    up = await raw_upstream(timed(arrivals))
    gw = await start_gateway([public(up.url)])  # the default: "auto"
    client = await Client.open(gw.port)
    try:
        line = "Transfer-Encoding: chunked"
        assert await client.send(head("POST", "/public/small", line) + b"5\r\nhello\r\n")
        await asyncio.sleep(0.3)
        assert arrivals == [], "a small body was not held until complete"
        second_sent = time.monotonic()
        assert await client.send(b"6\r\n world\r\n0\r\n\r\n")
        resp = await client.response("POST")
    finally:
        client.close()
    assert resp.status == 200, resp.body[:300]
    assert resp.json()["length"] == len(b"hello world")
    assert arrivals[0] >= second_sent
    req = up.requests[0]
    assert req.complete and bytes(req.body) == b"hello world"
    assert req.values("Transfer-Encoding") == [b"chunked"]
    assert req.values("Content-Length") == []


async def test_auto_streams_a_body_larger_than_the_memory_threshold(
    start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    """The second half is only sent once the upstream has read most of the first: a
    gateway that buffered this body whole would deadlock here."""
    size = 512 * KiB
    first_seen = asyncio.Event()

    async def sink(conn: UpConn, req: UpRequest) -> bytes | None:
        async def pace() -> None:
            if req.body_length >= 192 * KiB:
                first_seen.set()

        if not await conn.read_body(req, pace):
            return None
        doc = {"length": req.body_length, "sha256": req.body_sha256}
        return response(200, json.dumps(doc).encode(), "Content-Type: application/json")

    up = await raw_upstream(http(sink))
    gw = await start_gateway([public(up.url)])
    assert gw.config.limits.request_buffer_memory_bytes == 64 * KiB
    body = os.urandom(size)
    client = await Client.open(gw.port)
    try:
        line = f"Content-Length: {size}"
        assert await client.send(head("POST", "/public/stream", line) + body[: size // 2])
        try:
            await asyncio.wait_for(first_seen.wait(), WAIT)
        except TimeoutError:
            pytest.fail("the upstream saw nothing of a large body before it was complete")
        assert await client.send(body[size // 2 :])
        resp = await client.response("POST")
    finally:
        client.close()
    assert resp.status == 200, resp.body[:300]
    assert resp.json() == {"length": size, "sha256": sha(body)}
    assert up.requests[0].values("Content-Length") == [str(size).encode()]


# =========================================================================== 4. max_body_bytes


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_on_with_max_body_bytes_refuses_413_and_forwards_nothing(
    start_gateway: StartGateway, raw_upstream: MakeUpstream, spill_dir: Path, framing: str
) -> None:
    up = await raw_upstream(http())
    limit = 100 * KiB
    gw = await start_gateway(
        [public(up.url, request_buffering="on", max_body_bytes=limit)],
        limits={"request_buffer_memory_bytes": 16 * KiB},  # the body spills before the limit
    )
    # under the limit: through, with its length
    small = os.urandom(limit)
    client = await Client.open(gw.port)
    try:
        assert await client.send(head("POST", "/public/ok", f"Content-Length: {limit}") + small)
        ok = await client.response("POST")
    finally:
        client.close()
    assert ok.status == 200, ok.body[:300]
    assert ok.json()["sha256"] == sha(small)
    assert len(up.requests) == 1

    body = os.urandom(2 * limit)
    if framing == "chunked":
        line, data = "Transfer-Encoding: chunked", chunked(body, 8 * KiB)
    else:
        line, data = f"Content-Length: {len(body)}", body
    client = await Client.open(gw.port)
    try:
        assert await client.send(head("POST", "/public/big", line))
        async with running(send_body(client, data, 8 * KiB)):
            resp = await client.response("POST")
            _, closed = await client.read_until_closed(WAIT)
    finally:
        client.close()
    assert json_error(resp, 413)["error"] == "request_too_large"
    assert (resp.header("Connection") or "").lower() == "close"
    assert closed, "the connection stayed open after 413"
    await asyncio.sleep(0.2)
    assert len(up.requests) == 1, "part of a body over the limit reached the upstream"
    assert "/public/big" not in up.targets()
    await eventually(lambda: files_open_under(spill_dir) == [], "the temporary file to close")


# =========================================================================== 5. min_body_rate


async def test_min_body_rate_cuts_a_trickle_and_spares_a_steady_body(
    start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    """min_body_rate 1000 B/s over 1 s windows: one byte per 0.2 s gets 408 and is closed
    within about 3 s; 2 KiB per 0.2 s completes. The control gateway (min_body_rate 0)
    leaves the same trickle alone."""
    up = await raw_upstream(http())
    strict = await start_gateway(
        [public(up.url)], limits={"min_body_rate": 1000, "min_body_rate_window": 1}
    )
    lax = await start_gateway([public(up.url)], limits={"min_body_rate": 0})

    async def slow(gw: Running) -> tuple[bytes, bool, float]:
        client = await Client.open(gw.port)
        try:
            started = time.monotonic()
            assert await client.send(head("POST", "/public/trickle", "Content-Length: 100"))
            async with running(Trickle(client, 99, 0.2).run()):
                data, closed = await client.read_until_closed(3.0)
            return data, closed, time.monotonic() - started
        finally:
            client.close()

    async def steady() -> Response:
        body = os.urandom(20 * KiB)
        client = await Client.open(strict.port)
        try:
            line = f"Content-Length: {len(body)}"
            assert await client.send(head("POST", "/public/steady", line))
            for i in range(0, len(body), 2 * KiB):
                await asyncio.sleep(0.2)
                assert await client.send(body[i : i + 2 * KiB])
            resp = await client.response("POST")
        finally:
            client.close()
        assert resp.json() == {
            "method": "POST",
            "target": "/public/steady",
            "length": len(body),
            "sha256": sha(body),
        }
        return resp

    (cut_data, cut_closed, cut_after), (lax_data, lax_closed, _), ok = await asyncio.gather(
        slow(strict), slow(lax), steady()
    )
    assert cut_closed, f"a 5 B/s body was not cut within 3 s: {cut_data[:200]!r}"
    assert cut_after < 3.0
    cut, rest = parse_first(cut_data, "POST")
    assert json_error(cut, 408)["error"] == "request_timeout"
    assert (cut.header("Connection") or "").lower() == "close"
    assert rest == b""
    assert ok.status == 200
    assert (lax_data, lax_closed) == (b"", False), "min_body_rate 0 still cut the trickle"
    assert "/public/trickle" not in up.targets()


async def test_min_body_rate_ignores_time_held_back_by_upstream_backpressure(
    start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    """The upstream takes the head and never reads: the gateway stops reading the client
    (the body streams, request_buffering off), and the client is blocked by backpressure,
    not slow. The rate rule (0.5 s windows, checked every 0.5 s) must not fire; the route's
    timeout (2 s of an upstream neither reading nor answering) ends the request: 504."""
    accepted = asyncio.Event()

    async def deaf(conn: UpConn, req: UpRequest) -> bytes | None:
        if req.target != "/public/deaf":
            return await echo_answer(conn, req)
        accepted.set()
        await asyncio.sleep(60)  # reads nothing more; cancelled at teardown
        return None

    up = await raw_upstream(http(deaf), rcvbuf=16 * KiB)
    route_timeout = 2.0
    gw = await start_gateway(
        [public(up.url, request_buffering="off", timeout=route_timeout)],
        limits={"min_body_rate": 1000, "min_body_rate_window": 0.5, "idle_timeout": 30},
    )
    # A pooled connection that has just read an answer (a fresh one is tested below).
    warm = await get(gw.port, "/public/warm")
    assert warm.status == 200
    size = 64 * MiB
    client = await Client.open(gw.port, sndbuf=64 * KiB)
    try:
        started = time.monotonic()
        assert await client.send(head("POST", "/public/deaf", f"Content-Length: {size}"))
        async with running(send_body(client, b"z" * size, MiB)) as sender:
            await asyncio.wait_for(accepted.wait(), WAIT)
            data, closed = await client.read_until_closed(route_timeout + 4)
            ended = time.monotonic() - started
            assert not sender.done(), "the whole body was taken by an upstream reading nothing"
    finally:
        client.close()
    assert len(up.conns) == 1, "the warm connection was not reused"
    assert closed, "the request outlived the route timeout"
    if data:  # a 504, unless the gateway had to cut the connection
        resp, _ = parse_first(data, "POST")
        assert resp.status != 408, "held back by the gateway, yet judged too slow"
        json_error(resp, 504)
    # the rate rule would have fired by about 1 s; the route timeout fires at 2 s
    assert ended >= 1.5, f"ended after {ended:.2f}s, before the route timeout"


async def test_upload_paused_on_a_fresh_upstream_connection_waits_for_the_route_timeout(
    start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    """A healthy upstream that takes 1.5 s before it starts reading a 4 MiB body (the
    route timeout is the default 30 s): the upload pauses meanwhile, and must succeed."""

    async def thoughtful(conn: UpConn, req: UpRequest) -> bytes | None:
        await asyncio.sleep(1.5)
        return await echo_answer(conn, req)

    up = await raw_upstream(http(thoughtful), rcvbuf=16 * KiB)
    gw = await start_gateway([public(up.url, request_buffering="off")])
    assert gw.config.routes[0].timeout == 30
    body = os.urandom(4 * MiB)
    client = await Client.open(gw.port, sndbuf=64 * KiB)
    try:
        assert await client.send(head("POST", "/public/upload", f"Content-Length: {len(body)}"))
        async with running(send_body(client, body, MiB)):
            resp = await client.response("POST", timeout=10)
    finally:
        client.close()
    assert resp.status == 200, resp.body[:300]
    assert resp.json()["sha256"] == sha(body)


async def test_min_body_rate_ignores_time_held_back_by_pipelining(
    start_gateway: StartGateway, raw_upstream: MakeUpstream
) -> None:
    """A POST pipelined behind a GET the upstream answers after 2.5 s: the gateway does not
    read the POST's body meanwhile, and that pause is not the client's."""

    async def answer(conn: UpConn, req: UpRequest) -> bytes | None:
        if req.target == "/public/slow":
            await asyncio.sleep(2.5)
        return await echo_answer(conn, req)

    up = await raw_upstream(http(answer))
    gw = await start_gateway(
        [public(up.url)], limits={"min_body_rate": 1000, "min_body_rate_window": 1}
    )
    body = os.urandom(4 * KiB)
    client = await Client.open(gw.port)
    try:
        post = head("POST", "/public/after", f"Content-Length: {len(body)}")
        assert await client.send(head("GET", "/public/slow") + post + body[:KiB])
        await asyncio.sleep(0.3)
        assert await client.send(body[KiB:])  # sits unread while the GET is answered
        first = await client.response(timeout=WAIT)
        second = await client.response("POST", timeout=WAIT)
    finally:
        client.close()
    assert first.status == 200, first.body[:300]
    assert second.status == 200, second.body[:300]
    assert second.json()["sha256"] == sha(body)


# =========================================================================== 6. early answers


@pytest.mark.parametrize("buffering", ["off", "on"])
async def test_upstream_answering_before_reading_the_body(
    start_gateway: StartGateway,
    starlette_upstream: str,
    caplog: pytest.LogCaptureFixture,
    buffering: str,
) -> None:
    """uvicorn+Starlette's /early answers 413 without reading a 1 MiB body: the client gets
    that answer (or a clean answer of the gateway's own), whole and readable. Streamed
    ("off"), the answer comes mid-body and the connection is then closed; buffered ("on"),
    the gateway had the whole body, and the connection goes on. Nothing is logged at ERROR
    and no traceback appears, and the next request is served."""
    caplog.set_level(logging.DEBUG, logger="gateway")
    gw = await start_gateway([public(starlette_upstream, "/", request_buffering=buffering)])
    body = os.urandom(MiB)
    again: Response | None = None
    client = await Client.open(gw.port)
    try:
        assert await client.send(head("POST", "/early", f"Content-Length: {len(body)}"))
        # "off": the body goes on arriving for seconds, so the answer comes mid-body
        sending = send_body(client, body) if buffering == "on" else dribble(client, body)
        async with running(sending) as sender:
            resp = await client.response("POST")
            if buffering == "off":
                extra, closed = await client.read_until_closed(WAIT)
            else:
                await asyncio.wait_for(sender, WAIT)  # the gateway took the whole body
                assert await client.send(head("GET", "/again"))
                again = await client.response()
    finally:
        client.close()
    if resp.status == 413:
        assert resp.json() == {"framework": "starlette", "early": True}
    else:
        json_error(resp, 502)
    if buffering == "off":
        # the gateway had not read the whole body: the rest is never read as requests
        assert (resp.header("Connection") or "").lower() == "close"
        assert extra == b""
        assert closed, "the connection was left open after an early answer mid-body"
    else:
        # the whole body was read before the upstream request opened: HTTP allows the
        # connection to go on, and it does (only the upstream connection is given up)
        assert again is not None
        assert again.status == 200, again.body[:300]
    after = await get(gw.port, "/after")
    assert after.status == 200, after.body[:300]
    assert after.json()["framework"] == "starlette"
    await asyncio.sleep(0.2)
    no_errors(caplog)


# =========================================================================== 7. no disk


async def test_on_streams_when_the_temporary_directory_is_unusable(
    start_gateway: StartGateway,
    upstream: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    gw = await start_gateway(
        [public(upstream, request_buffering="on")],
        limits={"request_buffer_memory_bytes": 64 * KiB},
    )
    body = os.urandom(512 * KiB)
    client = await Client.open(gw.port)
    try:
        line = f"Content-Length: {len(body)}"
        assert await client.send(head("POST", "/public/nodisk", line, "Connection: close"))
        async with running(send_body(client, body)):
            resp = await client.response("POST")
    finally:
        client.close()
    assert resp.status == 200, resp.body[:300]
    echo = resp.json()
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == sha(body)
    warnings = [r for r in caplog.records if SPILL_WARNING in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert warnings[0].levelno == logging.WARNING
    no_errors(caplog)
