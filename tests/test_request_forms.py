"""Issue 10, sections 2 and 3: request targets and methods that must never reach an upstream,
tried against a real uvicorn+Starlette upstream behind a public catch-all route, where a
slip would land on its `/admin` handler."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.emulator import Emulator
from tests.conftest import RawResponse, StartGateway, bearer, raw_request


def table(upstream: str) -> list[dict[str, Any]]:
    return [
        {"name": "admin", "path_prefix": "/admin", "upstream": upstream, "scopes": ["admin"]},
        {
            "name": "trace",
            "path_prefix": "/debug",
            "upstream": upstream,
            "auth": "none",
            "methods": ["GET", "TRACE"],
        },
        {"name": "public", "path_prefix": "/", "upstream": upstream, "auth": "none"},
    ]


async def send(port: int, line: bytes, *headers: bytes) -> RawResponse:
    head = [line, b"Host: gateway.test", b"Connection: close", *headers]
    return await raw_request(port, b"\r\n".join(head) + b"\r\n\r\n")


def refused(resp: RawResponse, status: int) -> None:
    """Answered by the gateway itself (a JSON error), not by Starlette."""
    assert resp.status == status, (resp.status, resp.body[:200])
    doc = resp.json()
    assert "framework" not in doc and isinstance(doc.get("error"), str), doc


CONTROLS = [f"%{b:02X}" for b in (*range(0x20), 0x7F)] + ["%0a", "%0d", "%7f", "%1f"]


@pytest.mark.parametrize("escape", CONTROLS)
async def test_encoded_control_characters_in_the_path_are_refused(
    start_gateway: StartGateway, starlette_upstream: str, escape: str
) -> None:
    gw = await start_gateway(table(starlette_upstream))
    resp = await send(gw.port, b"GET /admin%s HTTP/1.1" % escape.encode())
    refused(resp, 400)
    assert (
        "control" in resp.json()["error_description"] or "NUL" in resp.json()["error_description"]
    )


async def test_starlette_admin_handler_is_reachable_only_with_a_token(
    start_gateway: StartGateway, starlette_upstream: str, emulator: Emulator
) -> None:
    """The control for the test above: the catch-all does reach Starlette, and `/admin`
    itself needs a token with the admin scope."""
    gw = await start_gateway(table(starlette_upstream))
    public = await send(gw.port, b"GET /somewhere HTTP/1.1")
    assert public.status == 200 and public.json()["admin"] is False
    assert (await send(gw.port, b"GET /admin HTTP/1.1")).status == 401
    token = "tok-admin"
    emulator.add_token(token, subject="root", client_id=1, scopes=["admin"])
    auth = b"Authorization: " + bearer(token)["Authorization"].encode()
    ok = await send(gw.port, b"GET /admin HTTP/1.1", auth)
    assert ok.status == 200 and ok.json()["admin"] is True


async def test_an_encoded_percent_before_ordinary_text_still_passes(
    start_gateway: StartGateway, starlette_upstream: str
) -> None:
    gw = await start_gateway(table(starlette_upstream))
    resp = await send(gw.port, b"GET /files/100%25done HTTP/1.1")
    assert resp.status == 200, resp.body[:200]
    assert resp.json()["raw_path"] == "/files/100%25done"


@pytest.mark.parametrize(
    "line",
    [
        b"CONNECT admin.internal:443 HTTP/1.1",
        b"CONNECT /admin HTTP/1.1",
        b"GET http://gateway.test/admin HTTP/1.1",
        b"GET gateway.test/admin HTTP/1.1",
        b"GET * HTTP/1.1",
        b"POST * HTTP/1.1",
    ],
)
async def test_targets_that_are_not_origin_form_are_refused(
    start_gateway: StartGateway, starlette_upstream: str, line: bytes
) -> None:
    gw = await start_gateway(table(starlette_upstream))
    resp = await send(gw.port, line)
    assert resp.status in (400, 405), resp.status
    refused(resp, resp.status)


async def test_options_asterisk_is_answered_by_the_gateway(
    start_gateway: StartGateway, starlette_upstream: str
) -> None:
    gw = await start_gateway(table(starlette_upstream))
    resp = await send(gw.port, b"OPTIONS * HTTP/1.1")
    assert resp.status == 200
    assert "GET" in (resp.header("Allow") or "")
    assert resp.body == b""


@pytest.mark.parametrize("line", [b"GET /admin\r\n\r\n", b"GET /admin\r\n", b"GET /\n"])
async def test_http_0_9_request_line_is_refused_at_once(
    start_gateway: StartGateway, starlette_upstream: str, line: bytes
) -> None:
    """A request line without a version (HTTP/0.9) is a 400 as soon as it ends, whether or
    not a blank line follows, never forwarded and never answered as HTTP/0.9."""
    gw = await start_gateway(table(starlette_upstream), limits={"header_timeout": 30})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(line)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 3)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 400 "), data[:100]
    assert b"framework" not in data


async def test_trace_is_refused_unless_the_route_lists_it(
    start_gateway: StartGateway, starlette_upstream: str
) -> None:
    gw = await start_gateway(table(starlette_upstream))
    resp = await send(gw.port, b"TRACE /somewhere HTTP/1.1")
    refused(resp, 405)
    listed = await send(gw.port, b"TRACE /debug HTTP/1.1")
    # forwarded: Starlette has no TRACE handler and says so itself
    assert listed.status == 405 and b"framework" not in listed.body
    assert listed.header("X-Request-Id") is not None
