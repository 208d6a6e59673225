"""Access log lines and request ids."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from gateway.emulator import Emulator
from tests.conftest import StartGateway, bearer, echo_of, header_values


def _routes(upstream: str) -> list[dict[str, Any]]:
    return [
        {"name": "public", "path_prefix": "/public", "upstream": upstream, "auth": "none"},
        {"name": "orders", "path_prefix": "/orders", "upstream": upstream, "scopes": ["r"]},
    ]


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_one_json_line_per_request(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = "log-token-abcdef"
    emulator.add_token(token, subject="alice", client_id=99, scopes=["r"])
    gw = await start_gateway(_routes(upstream))
    async with client.get(f"{gw.url}/orders/1?secret=q", headers=bearer(token)) as resp:
        assert resp.status == 200
    async with client.get(f"{gw.url}/orders/1", headers=bearer(token)) as resp:
        assert resp.status == 200
    async with client.post(f"{gw.url}/public/up", data=b"x" * 1000) as resp:
        assert resp.status == 200
    async with client.get(f"{gw.url}/orders/2") as resp:
        assert resp.status == 401
    async with client.get(f"{gw.url}/nowhere") as resp:
        assert resp.status == 404
    await asyncio.sleep(0.3)  # lines are flushed at most every 100 ms
    out = capsys.readouterr().out
    lines = _lines(out)
    assert len(lines) == 5
    first, second, upload, denied, missing = lines
    assert first["route"] == "orders" and first["status"] == 200 and first["method"] == "GET"
    assert first["path"] == "/orders/1"  # no query: it may hold secrets
    assert first["cache"] == "miss" and second["cache"] == "hit"
    assert first["subject"] == "alice" and first["client_id"] == "99"
    assert isinstance(first["upstream_duration"], float)
    assert first["duration"] >= first["upstream_duration"]
    assert first["bytes_out"] > 0
    assert upload["bytes_in"] == 1000 and upload["subject"] is None
    assert denied["status"] == 401 and denied["upstream_duration"] is None
    assert missing["route"] == "(none)" and missing["status"] == 404
    assert all(isinstance(line["time"], float) and line["request_id"] for line in lines)
    assert len({line["request_id"] for line in lines}) == 5
    assert token not in out and "secret=q" not in out


async def test_request_id_taken_when_sane_and_passed_on(
    upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(_routes(upstream))
    async with client.get(f"{gw.url}/public/x", headers={"X-Request-Id": "abc-123"}) as resp:
        assert resp.headers["X-Request-Id"] == "abc-123"
        echo = await echo_of(resp)
    assert header_values(echo, "X-Request-Id") == ["abc-123"]
    for insane in ("a b", "x" * 200, "<script>", ""):
        async with client.get(f"{gw.url}/public/x", headers={"X-Request-Id": insane}) as resp:
            generated = resp.headers["X-Request-Id"]
            echo = await echo_of(resp)
        assert generated != insane and generated
        assert header_values(echo, "X-Request-Id") == [generated]
    async with client.get(f"{gw.url}/orders") as resp:
        assert resp.status == 401 and resp.headers["X-Request-Id"]


async def test_access_log_can_be_switched_off(
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gw = await start_gateway(_routes(upstream), log={"access": False})
    async with client.get(f"{gw.url}/public/x") as resp:
        assert resp.status == 200
    await asyncio.sleep(0.3)
    assert _lines(capsys.readouterr().out) == []


async def test_lines_stay_valid_json_for_hostile_values(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    capsys: pytest.CaptureFixture[str],
) -> None:
    subject = 'a"b\\c ü \u2028 </script>'
    emulator.add_token("tok-odd", subject=subject, scopes=["r"])
    gw = await start_gateway(_routes(upstream))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"GET /orders HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer tok-odd\r\n\r\n"
        b'GET /pub"lic/\\x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n'
    )
    await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await asyncio.sleep(0.3)
    lines = _lines(capsys.readouterr().out)
    assert [line["status"] for line in lines] == [200, 400]
    assert lines[0]["subject"] == subject
    assert lines[1]["path"].startswith("/pub")
