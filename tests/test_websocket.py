"""WebSockets through the gateway (issue 12, "WebSockets"): a real WebSocket server from
PyPI (`websockets`) as the upstream, the `websockets` client or a raw socket as the client,
everything over loopback sockets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request

from gateway.emulator import Emulator
from gateway.tunnel import HIGH_WATER
from tests import test_tls
from tests.conftest import (
    SERVICE_ID,
    SERVICE_TOKEN,
    Running,
    StartGateway,
    free_port,
    metric,
    read_until_closed,
    wait_for_port,
)
from tests.test_tls import Pki, client_context, tls_config

pki = test_tls.pki  # the fixture: test certificates, made once per session

TOKEN = "tok-websocket"
FLOOD_MESSAGE = 64 * 1024
FLOOD_TOTAL = 64 * 1024 * 1024


@dataclass
class WsUpstream:
    url: str
    server: Server
    handshakes: list[Headers] = field(default_factory=list)
    flood_sent: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    """A `websockets` server: /…/flood sends FLOOD_TOTAL bytes as fast as it is let, anything
    else echoes every message; each handshake's headers are recorded."""
    state: WsUpstream | None = None

    def process_request(connection: ServerConnection, request: Request) -> None:
        assert state is not None
        state.handshakes.append(request.headers)

    async def handler(ws: ServerConnection) -> None:
        assert state is not None
        try:
            if ws.request is not None and ws.request.path.endswith("/flood"):
                chunk = b"x" * FLOOD_MESSAGE
                while state.flood_sent < FLOOD_TOTAL:
                    await ws.send(chunk)
                    state.flood_sent += len(chunk)
                await ws.wait_closed()
                return
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            state.closed.set()

    server = await serve(
        handler, "127.0.0.1", 0, process_request=process_request, compression=None, max_size=None
    )
    port = server.sockets[0].getsockname()[1]
    state = WsUpstream(f"http://127.0.0.1:{port}", server)
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


def ws_routes(upstream: str, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"name": "ws", "path_prefix": "/ws", "upstream": upstream, "websocket": True, **extra},
        {
            "name": "ws-scoped",
            "path_prefix": "/scoped",
            "upstream": upstream,
            "websocket": True,
            "scopes": ["chat.admin"],
        },
        {"name": "plain", "path_prefix": "/plain", "upstream": upstream},
    ]


def handshake(path: str, *lines: str, upgrade: str = "websocket") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    head = [
        f"GET {path} HTTP/1.1",
        "Host: gateway.test",
        f"Upgrade: {upgrade}",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *lines,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


def auth(token: str = TOKEN) -> str:
    return f"Authorization: Bearer {token}"


async def open_raw(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def headers_of(data: bytes) -> dict[str, str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}


def upstream_opened(gw: Running) -> int:
    return sum(getattr(p, "opened", 0) for p in gw.gateway.pools.values())


async def ws_connect(gw: Running, path: str, token: str | None = TOKEN, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await connect(
        f"ws://127.0.0.1:{gw.port}{path}",
        additional_headers={**headers, **kw.pop("headers", {})},
        proxy=None,
        compression=None,
        ping_interval=None,
        **kw,
    )


# ---------------------------------------------------------------------------- relaying


async def test_echo_both_ways_and_identity_headers_in_the_handshake(
    start_gateway: StartGateway, emulator: Emulator, ws_upstream: WsUpstream
) -> None:
    emulator.add_token(TOKEN, subject="alice", scopes=["chat"])
    gw = await start_gateway(ws_routes(ws_upstream.url))
    ws = await ws_connect(
        gw, "/ws/room?x=1", headers={"X-Auth-Subject": "mallory", "X-Auth-Scopes": "admin"}
    )
    async with ws:
        for i in range(50):
            await ws.send(f"text {i}")
            assert await ws.recv() == f"text {i}"
        blob = os.urandom(300_000)
        await ws.send(blob)
        assert await ws.recv() == blob
        assert metric(gw, "gateway_websockets_open", route="ws") == 1
    (seen,) = ws_upstream.handshakes
    assert seen.get_all("X-Auth-Subject") == ["alice"]  # the client's copy is gone
    assert seen.get_all("X-Auth-Scopes") == ["chat"]
    assert seen["Upgrade"].lower() == "websocket"
    assert "upgrade" in seen["Connection"].lower()
    assert seen["Sec-WebSocket-Version"] == "13"
    assert "Sec-WebSocket-Key" in seen
    assert seen["Host"] == ws_upstream.url.removeprefix("http://")
    await asyncio.wait_for(ws_upstream.closed.wait(), 5)
    await _wait(lambda: metric(gw, "gateway_websockets_open", route="ws") == 0, "gauge back to 0")
    assert metric(gw, "gateway_websocket_duration_seconds_count", route="ws") == 1
    assert metric(gw, "gateway_requests_total", route="ws", method="GET", status="101") == 1
    assert gw.gateway._listener is not None and not gw.gateway._listener.connections


async def test_bytes_the_upstream_sends_right_after_its_101_reach_the_client(
    start_gateway: StartGateway, emulator: Emulator, ws_upstream: WsUpstream
) -> None:
    emulator.add_token(TOKEN, scopes=["chat"])
    gw = await start_gateway(ws_routes(ws_upstream.url))
    async with await ws_connect(gw, "/ws/flood", max_size=None) as ws:
        got = 0
        while got < 1024 * 1024:
            got += len(await ws.recv())


# ---------------------------------------------------------------------------- refusals


async def _refused(gw: Running, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """The answer to `data`, and that the connection then closed cleanly (no reset, no 101)."""
    reader, writer = await open_raw(gw.port, data)
    try:
        got, closed = await read_until_closed(reader, 5)
    finally:
        writer.close()
    assert closed, got
    assert b" 101 " not in got.split(b"\r\n", 1)[0]
    return status_of(got), headers_of(got), got.split(b"\r\n\r\n", 1)[1]


async def test_no_token_is_401_before_any_upgrade(
    start_gateway: StartGateway, ws_upstream: WsUpstream
) -> None:
    gw = await start_gateway(ws_routes(ws_upstream.url))
    status, headers, _ = await _refused(gw, handshake("/ws/x"))
    assert status == 401
    assert "upgrade" not in headers
    assert headers["connection"] == "close"
    assert "Bearer" in headers["www-authenticate"]
    assert upstream_opened(gw) == 0 and ws_upstream.handshakes == []
    with pytest.raises(InvalidStatus) as info:
        await ws_connect(gw, "/ws/x", token=None)
    assert info.value.response.status_code == 401


async def test_unknown_token_is_401_after_introspection_then_a_clean_close(
    start_gateway: StartGateway, ws_upstream: WsUpstream
) -> None:
    gw = await start_gateway(ws_routes(ws_upstream.url))
    # The client sends a frame at once (it should not, but may): still a readable 401.
    status, _, _ = await _refused(gw, handshake("/ws/x", auth("nope")) + b"\x81\x85" + b"x" * 9)
    assert status == 401
    assert upstream_opened(gw) == 0 and ws_upstream.handshakes == []


async def test_insufficient_scope_is_403(
    start_gateway: StartGateway, emulator: Emulator, ws_upstream: WsUpstream
) -> None:
    emulator.add_token(TOKEN, scopes=["chat"])
    gw = await start_gateway(ws_routes(ws_upstream.url))
    status, headers, _ = await _refused(gw, handshake("/scoped/x", auth()))
    assert status == 403
    assert "insufficient_scope" in headers["www-authenticate"]
    assert ws_upstream.handshakes == []
    # cached now: the same answer from the cache-hit path
    status, _, _ = await _refused(gw, handshake("/scoped/x", auth()))
    assert status == 403
    assert upstream_opened(gw) == 0


async def test_websocket_on_a_route_without_websocket_true_is_refused_as_before(
    start_gateway: StartGateway, emulator: Emulator, ws_upstream: WsUpstream, upstream: str
) -> None:
    emulator.add_token(TOKEN, scopes=["chat"])
    echo = {"name": "echo", "path_prefix": "/echo", "upstream": upstream}
    gw = await start_gateway([*ws_routes(ws_upstream.url), echo])
    # What it has always been: a plain request without Upgrade, then the connection closes.
    status, headers, body = await _refused(gw, handshake("/echo/x", auth()))
    assert status == 200 and headers["connection"] == "close"
    seen = {k.lower() for k, _ in json.loads(body)["headers"]}
    assert "upgrade" not in seen and "connection" not in seen
    # A WebSocket server behind such a route sees no handshake, and says so (426).
    with pytest.raises(InvalidStatus) as info:
        await ws_connect(gw, "/plain/x")
    assert info.value.response.status_code == 426
    assert ws_upstream.handshakes == [] or all("Upgrade" not in h for h in ws_upstream.handshakes)


async def test_an_h2c_upgrade_is_refused_as_before_on_a_websocket_route(
    start_gateway: StartGateway, emulator: Emulator, upstream: str
) -> None:
    emulator.add_token(TOKEN, scopes=["chat"])
    gw = await start_gateway(ws_routes(upstream))
    data = (
        b"GET /ws/x HTTP/1.1\r\nHost: gateway.test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
        + auth().encode()
        + b"\r\n\r\n"
    )
    status, headers, body = await _refused(gw, data)
    assert status == 200 and headers["connection"] == "close"
    seen = {k.lower() for k, _ in json.loads(body)["headers"]}
    assert seen.isdisjoint({"upgrade", "connection", "http2-settings"})


async def test_an_upstream_that_refuses_the_handshake_is_relayed(
    start_gateway: StartGateway, emulator: Emulator, upstream: str
) -> None:
    """A websocket route whose upstream answers 200 (no WebSocket there): relayed, closed."""
    emulator.add_token(TOKEN, scopes=["chat"])
    gw = await start_gateway(ws_routes(upstream))
    status, headers, body = await _refused(gw, handshake("/ws/x", auth()))
    assert status == 200 and headers["connection"] == "close"
    seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert seen["upgrade"] == "websocket"  # the handshake itself went up


# ---------------------------------------------------------------------------- limits


async def test_idle_timeout_closes_a_silent_socket_and_not_a_busy_one(
    start_gateway: StartGateway, emulator: Emulator, ws_upstream: WsUpstream
) -> None:
    emulator.add_token(TOKEN, scopes=["chat"])
    gw = await start_gateway(ws_routes(ws_upstream.url), limits={"idle_timeout": 0.6})
    async with await ws_connect(gw, "/ws/busy") as busy, await ws_connect(gw, "/ws/q") as quiet:
        for _ in range(8):  # 1.6 s of traffic, a message every 0.2 s
            await busy.send("ping")
            assert await busy.recv() == "ping"
            await asyncio.sleep(0.2)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(quiet.recv(), 2)
        await busy.send("still here")
        assert await busy.recv() == "still here"


async def test_websocket_max_lifetime_closes_even_a_busy_socket(
    start_gateway: StartGateway, emulator: Emulator, ws_upstream: WsUpstream
) -> None:
    emulator.add_token(TOKEN, scopes=["chat"])
    gw = await start_gateway(ws_routes(ws_upstream.url, websocket_max_lifetime=1))
    started = time.monotonic()
    async with await ws_connect(gw, "/ws/x") as ws:
        with pytest.raises(ConnectionClosed):
            while time.monotonic() - started < 5:
                await ws.send("tick")
                await ws.recv()
                await asyncio.sleep(0.05)
    assert 0.9 < time.monotonic() - started < 3


async def test_the_socket_outlives_its_token_by_default(
    start_gateway: StartGateway, emulator: Emulator, ws_upstream: WsUpstream
) -> None:
    emulator.add_token(TOKEN, scopes=["chat"], lifetime=1)
    gw = await start_gateway(ws_routes(ws_upstream.url))
    async with await ws_connect(gw, "/ws/x") as ws:
        await asyncio.sleep(1.5)
        await ws.send("after expiry")
        assert await ws.recv() == "after expiry"


async def test_a_client_that_does_not_read_holds_the_gateway_buffer_flat(
    start_gateway: StartGateway, emulator: Emulator, ws_upstream: WsUpstream
) -> None:
    emulator.add_token(TOKEN, scopes=["chat"])
    gw = await start_gateway(ws_routes(ws_upstream.url))
    listener = gw.gateway._listener
    assert listener is not None
    reader, writer = await open_raw(gw.port, handshake("/ws/flood", auth()))
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert status_of(head) == 101
        # The client reads nothing more: the upstream may send only what the buffers hold.
        await asyncio.sleep(0.5)
        (tunnel,) = listener.tunnels
        most = 0
        for _ in range(20):
            most = max(most, tunnel.client.transport.get_write_buffer_size())
            await asyncio.sleep(0.05)
        sent = ws_upstream.flood_sent
        await asyncio.sleep(0.5)
        assert ws_upstream.flood_sent - sent <= 2 * FLOOD_MESSAGE, "the upstream is not held"
        assert most <= HIGH_WATER + 256 * 1024, most
        assert ws_upstream.flood_sent < FLOOD_TOTAL // 2
        # Then it reads: everything arrives.
        got = 0
        while got < FLOOD_TOTAL:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 5)
            assert chunk
            got += len(chunk)
        assert ws_upstream.flood_sent == FLOOD_TOTAL
    finally:
        writer.close()


async def test_a_client_that_closes_ends_the_upstream_side(
    start_gateway: StartGateway, emulator: Emulator, ws_upstream: WsUpstream
) -> None:
    emulator.add_token(TOKEN, scopes=["chat"])
    gw = await start_gateway(ws_routes(ws_upstream.url))
    reader, writer = await open_raw(gw.port, handshake("/ws/x", auth()))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert status_of(head) == 101
    writer.transport.abort()  # no close frame: just gone
    await asyncio.wait_for(ws_upstream.closed.wait(), 5)
    await _wait(lambda: metric(gw, "gateway_websockets_open", route="ws") == 0, "gauge at 0")


async def test_a_reload_lets_open_sockets_run_for_shutdown_timeout(
    start_gateway: StartGateway, emulator: Emulator, ws_upstream: WsUpstream, tmp_path: Path
) -> None:
    emulator.add_token(TOKEN, scopes=["chat"])
    gw = await start_gateway(ws_routes(ws_upstream.url), shutdown_timeout=1)
    async with await ws_connect(gw, "/ws/x") as ws:
        from tests.conftest import raw_config

        path = tmp_path / "g.yaml"
        path.write_text(
            yaml.safe_dump(
                raw_config(emulator.base_url, ws_routes(ws_upstream.url), shutdown_timeout=1)
            )
        )
        reloaded = time.monotonic()
        assert gw.gateway.reload(str(path))
        await ws.send("after reload")
        assert await ws.recv() == "after reload"
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.send("tick")
                await asyncio.wait_for(ws.recv(), 5)
                await asyncio.sleep(0.05)
        assert 0.9 < time.monotonic() - reloaded < 3
    # and a new socket works on the new config
    async with await ws_connect(gw, "/ws/y") as ws:
        await ws.send("new")
        assert await ws.recv() == "new"


async def test_sigterm_lets_an_open_socket_finish_within_shutdown_timeout(
    tmp_path: Path, emulator: Emulator, ws_upstream: WsUpstream
) -> None:
    emulator.add_token(TOKEN, scopes=["chat"])
    port, admin = free_port(), free_port()
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "shutdown_timeout": 2,
        "authlete": {
            "base_url": emulator.base_url,
            "allow_insecure_http": True,
            "service_id": SERVICE_ID,
            "access_token": SERVICE_TOKEN,
        },
        "routes": ws_routes(ws_upstream.url),
    }
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(wait_for_port, port, proc)
        ws = await connect(
            f"ws://127.0.0.1:{port}/ws/x",
            additional_headers={"Authorization": f"Bearer {TOKEN}"},
            proxy=None,
            ping_interval=None,
        )
        async with ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            proc.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            await asyncio.sleep(0.5)
            await ws.send("during shutdown")  # it is let finish
            assert await ws.recv() == "during shutdown"
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.send("tick")
                    await asyncio.wait_for(ws.recv(), 5)
                    await asyncio.sleep(0.05)
        code = await asyncio.to_thread(proc.wait, 10)
        assert code == 0
        assert 1.5 < time.monotonic() - stopped < 4.5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_sigterm_exits_as_soon_as_the_last_socket_closes(
    tmp_path: Path, emulator: Emulator, ws_upstream: WsUpstream
) -> None:
    emulator.add_token(TOKEN, scopes=["chat"])
    port, admin = free_port(), free_port()
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "shutdown_timeout": 20,
        "authlete": {
            "base_url": emulator.base_url,
            "allow_insecure_http": True,
            "service_id": SERVICE_ID,
            "access_token": SERVICE_TOKEN,
        },
        "routes": ws_routes(ws_upstream.url),
    }
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(wait_for_port, port, proc)
        ws = await connect(
            f"ws://127.0.0.1:{port}/ws/x",
            additional_headers={"Authorization": f"Bearer {TOKEN}"},
            proxy=None,
            ping_interval=None,
        )
        async with ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
        closed = time.monotonic()
        code = await asyncio.to_thread(proc.wait, 10)
        assert code == 0
        assert time.monotonic() - closed < 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _wait(predicate: Any, what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:g}s for {what}")
        await asyncio.sleep(0.01)


async def test_wss_on_a_tls_listener(
    start_gateway: StartGateway, emulator: Emulator, ws_upstream: WsUpstream, pki: Pki
) -> None:
    emulator.add_token(TOKEN, subject="alice", scopes=["chat"])
    gw = await start_gateway(ws_routes(ws_upstream.url), tls=tls_config(pki))
    async with await connect(
        f"wss://localhost:{gw.port}/ws/x",
        ssl=client_context(pki),
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        proxy=None,
        ping_interval=None,
        max_size=None,
    ) as ws:
        blob = os.urandom(1_000_000)
        await ws.send(blob)
        assert await ws.recv() == blob
    assert ws_upstream.handshakes[0]["X-Forwarded-Proto"] == "https"
    await _wait(lambda: metric(gw, "gateway_websockets_open", route="ws") == 0, "gauge at 0")


async def test_a_side_that_stops_reading_after_the_other_closed_is_cut(
    start_gateway: StartGateway, emulator: Emulator
) -> None:
    """An upstream that answers 101 and then never reads; the client floods, then goes.
    Reading the client is paused (backpressure), so its going is seen only when the socket
    falls silent: after idle_timeout both sides are closed, and the bytes the gateway holds
    for the upstream are dropped after the close grace. (Bytes, not frames: nothing is
    decoded on the way.)"""
    emulator.add_token(TOKEN, scopes=["chat"])
    writers: list[asyncio.StreamWriter] = []

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = headers_of(head)["sec-websocket-key"]
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        ).decode()
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
        )
        writers.append(writer)
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()

    server = await asyncio.start_server(never_reads, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        gw = await start_gateway(ws_routes(f"http://127.0.0.1:{port}"), limits={"idle_timeout": 1})
        listener = gw.gateway._listener
        assert listener is not None
        reader, writer = await open_raw(gw.port, handshake("/ws/x", auth()))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert status_of(head) == 101
        for _ in range(64):
            writer.write(b"\x00" * 65536)
        await asyncio.sleep(0.5)
        writer.transport.abort()
        cut = time.monotonic()
        await _wait(lambda: not listener.tunnels, "the tunnel to be cut", timeout=10)
        assert time.monotonic() - cut > 4  # idle_timeout, then the grace
        assert metric(gw, "gateway_websockets_open", route="ws") == 0
    finally:
        for w in writers:
            w.close()
        server.close()
