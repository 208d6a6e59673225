"""The gateway's own answers and its access log: no `Server` header with versions (the
upstream's passes through unchanged), `bytes_out` is the body bytes sent on every line,
requests refused before routing get a line too; `gateway emulator --help` describes every
option. All over real sockets."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from typing import Any

import aiohttp
import pytest

from gateway.cli import _parser
from tests.conftest import ROOT, StartGateway, raw_request


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _public(upstream: str) -> list[dict[str, Any]]:
    return [
        {"name": "public", "path_prefix": "/public", "upstream": upstream, "auth": "none"},
        {"name": "api", "path_prefix": "/api", "upstream": upstream},
    ]


async def test_no_server_version_on_own_answers_upstream_server_passes(
    flask_upstream: str, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(_public(flask_upstream))
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz", "/metrics", "/nowhere"):
            async with session.get(f"{gw.admin_url}{path}") as resp:
                assert resp.headers.getall("Server", []) == ["gateway"], path
        async with session.post(f"{gw.admin_url}/healthz") as resp:  # 405 from aiohttp
            assert resp.headers.getall("Server", []) == ["gateway"]
    # A request aiohttp cannot parse is answered before any application hook runs.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.admin_port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.") and b" 400 " in raw.split(b"\r\n")[0], raw[:40]
    assert b"aiohttp" not in raw and b"Python/" not in raw, raw
    async with aiohttp.ClientSession() as session:
        for path in ("/api/x", "/nowhere"):  # 401 and 404, answered by the proxy itself
            async with session.get(f"{gw.url}{path}") as resp:
                assert resp.status in (401, 404)
                assert "Server" not in resp.headers
        async with session.get(f"{gw.url}/public/x") as resp:
            assert resp.status == 200
            assert resp.headers.getall("Server", []) == ["gunicorn"]  # the upstream's own


async def test_bytes_out_is_the_body_sent_on_every_line(
    upstream: str, start_gateway: StartGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = await start_gateway(_public(upstream))
    sizes = []
    async with aiohttp.ClientSession() as session:
        for path in ("/public/x", "/api/x", "/nowhere"):  # forwarded, 401, 404
            async with session.get(f"{gw.url}{path}") as resp:
                sizes.append(len(await resp.read()))
        async with session.head(f"{gw.url}/nowhere") as resp:
            assert resp.status == 404
    await asyncio.sleep(0.3)
    lines = _lines(capsys.readouterr().out)
    assert [line["status"] for line in lines] == [200, 401, 404, 404]
    assert [line["bytes_out"] for line in lines] == [*sizes, 0]
    assert all(size > 0 for size in sizes)


async def _send(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_requests_refused_before_routing_get_a_line(
    upstream: str, start_gateway: StartGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = await start_gateway(_public(upstream), limits={"header_timeout": 1})
    malformed = await _send(gw.port, b"GET /public/x HTTP/1.1\r\nBad Header\r\n\r\n")
    too_big = await _send(
        gw.port, b"GET /public/x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n"
    )
    slow = await _send(gw.port, b"GET /public/secret-path HTTP/1.1\r\nHost: a\r\n")
    silent = await _send(gw.port, b"")  # says nothing: counted, not logged
    for answer, status in ((malformed, 400), (too_big, 431), (slow, 408), (silent, 408)):
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:80]
    # and one refused after a good request on the same connection (queued behind it)
    pipelined = await raw_request(
        gw.port,
        b"GET /public/x HTTP/1.1\r\nHost: a\r\n\r\nGET /public/y HTTP/1.1\r\nBad Header\r\n\r\n",
    )
    assert pipelined.status == 200
    await asyncio.sleep(0.3)
    out = capsys.readouterr().out
    lines = _lines(out)
    refused = [line for line in lines if line["route"] == "(none)"]
    assert [line["status"] for line in refused] == [400, 431, 408, 400]
    for line in refused:
        assert line["path"] is None and line["method"] == "OTHER"
        assert line["bytes_out"] > 0 and line["bytes_in"] == 0 and line["request_id"]
        assert line["client_id"] is None and line["subject"] is None
    assert "secret-path" not in out and "bbbb" not in out
    assert len({line["request_id"] for line in lines}) == len(lines)


def test_emulator_help_describes_every_option() -> None:
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    sub = commands.choices["emulator"]
    for action in sub._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.dest
    shown = subprocess.run(
        [sys.executable, "-m", "gateway", "emulator", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for route in ("tokens", "tokens/bulk", "revoke", "stats", "reset", "config", "override"):
        assert f"/_emulator/{route} " in shown
