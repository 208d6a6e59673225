"""Fault injection: a misbehaving Authlete and broken upstreams, over real loopback sockets.

What this adds to test_auth.py and test_proxy.py (the issue "harden the gateway"):

* Every malformed or failed Authlete answer ends in a 503 for that request *and* a WARNING
  naming the failure (never the token) *and* the right non-ok
  `gateway_introspection_requests_total{outcome=...}`; the counting upstream sees nothing,
  and the gateway keeps serving a healthy token afterwards.
* An Authlete answer far larger than the bounded read is refused without being read whole
  (503, small RSS growth); an `OK` whose `expiresAt` is already past is a 401.
* Broken upstreams (refused, reset, slow first byte, slow body, invalid headers, 50 MiB
  bodies) answer 502/504 or cut the started response, while concurrent healthy requests to
  another route keep succeeding; afterwards the open-connection gauge and this process's
  file descriptor count (the gateway runs in-process) are back at their baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.emulator import Emulator, Override
from gateway.introspection import MAX_BODY_BYTES
from tests.conftest import (
    RawResponse,
    RssWatch,
    Running,
    StartGateway,
    bearer,
    get,
    start_app,
)

MiB = 1 << 20
FUTURE_MS = 4102444800000  # 2100-01-01, in epoch milliseconds
FAILING_TOKEN = "tok-Faulty-4711.QxZ"  # distinctive, so any leak into a log line is found
HEALTHY_TOKEN = "tok-Healthy-0815.WvY"
SCOPE = "orders.read"


# --------------------------------------------------------------------------- helpers

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(gw: Running) -> Samples:
    """The gateway's /metrics, parsed (one short-lived connection to the admin port)."""
    resp = await get(gw.gateway.admin_port, "/metrics")
    assert resp.status == 200, resp.status
    out: Samples = {}
    for line in resp.body.decode().splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        out[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return out


def metric(samples: Samples, name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def outcomes(samples: Samples) -> dict[str, float]:
    return {
        dict(ls)["outcome"]: v
        for (n, ls), v in samples.items()
        if n == "gateway_introspection_requests_total"
    }


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def rst_close(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def assert_gateway_error(resp: RawResponse, status: int) -> None:
    assert resp.status == status, (resp.status, resp.body[:200])
    assert resp.header("Cache-Control") == "no-store"
    doc = resp.json()
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str), doc


def gateway_log(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == level and (r.name == "gateway" or r.name.startswith("gateway."))
    ]


@dataclass
class Counting:
    """An upstream that counts what reaches it (it must see nothing on a denial)."""

    url: str
    hits: list[str] = field(default_factory=list)


@pytest.fixture
async def counting() -> AsyncIterator[Counting]:
    state = Counting("")

    async def handle(request: web.Request) -> web.Response:
        state.hits.append(request.headers.get("Authorization", ""))
        return web.Response(text="upstream reached")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner, url, _ = await start_app(app)
    state.url = url
    try:
        yield state
    finally:
        await runner.cleanup()


def orders_route(upstream: str) -> dict[str, Any]:
    return {"name": "orders", "path_prefix": "/orders", "upstream": upstream, "scopes": [SCOPE]}


# --------------------------------------------------------------------------- misbehaving Authlete

_MISSING = object()


def ok_answer(**fields: object) -> bytes:
    """An introspection answer shaped like Authlete's OK, with some fields replaced."""
    doc: dict[str, object] = {
        "resultCode": "A056001",
        "resultMessage": "[A056001] The access token is valid.",
        "action": "OK",
        "responseContent": 'Bearer error="invalid_request"',
        "clientId": 42,
        "subject": "alice",
        "scopes": [SCOPE],
        "expiresAt": FUTURE_MS,
        "existent": True,
        "usable": True,
        "sufficient": True,
    }
    for key, value in fields.items():
        if value is _MISSING:
            doc.pop(key, None)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


def body(payload: bytes, content_type: str = "application/json") -> Callable[[], Override]:
    return lambda: Override(body=payload, content_type=content_type)


@dataclass(frozen=True)
class AuthleteFault:
    name: str
    make: Callable[[], Override]  # a fresh Override per test (count is mutated in place)
    outcome: str  # gateway_introspection_requests_total{outcome=...}
    detail: str  # what the WARNING must name


_HTML = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Bad Gateway</h1><p>The proxy could not reach Authlete.</p></body></html>"
)

AUTHLETE_FAULTS = [
    AuthleteFault(
        "not-json", body(b"upstream connect error", "text/plain"), "invalid_response", "not JSON"
    ),
    AuthleteFault("truncated-json", body(ok_answer()[:-25]), "invalid_response", "not JSON"),
    AuthleteFault("html-200", body(_HTML, "text/html"), "invalid_response", "not JSON"),
    AuthleteFault("empty-200", body(b""), "invalid_response", "not JSON"),
    AuthleteFault("json-null", body(b"null"), "invalid_response", "not a JSON object"),
    AuthleteFault(
        "missing-action", body(ok_answer(action=_MISSING)), "invalid_response", "missing action"
    ),
    AuthleteFault("null-action", body(ok_answer(action=None)), "invalid_response", "action"),
    AuthleteFault(
        "unknown-action", body(ok_answer(action="ALLOW")), "invalid_response", "unknown action"
    ),
    AuthleteFault(
        "lowercase-ok", body(ok_answer(action="ok")), "invalid_response", "unknown action"
    ),
    AuthleteFault("scopes-as-string", body(ok_answer(scopes=SCOPE)), "invalid_response", "scopes"),
    AuthleteFault(
        "scopes-with-number", body(ok_answer(scopes=[SCOPE, 7])), "invalid_response", "scopes"
    ),
    AuthleteFault(
        "scope-with-space",  # one "scope" that would read as two in X-Auth-Scopes
        body(ok_answer(scopes=[f"{SCOPE} admin"])),
        "invalid_response",
        "scopes",
    ),
    AuthleteFault(
        "scope-with-crlf",
        body(ok_answer(scopes=[SCOPE, "x\r\nX-Auth-Subject: root"])),
        "invalid_response",
        "scopes",
    ),
    AuthleteFault(
        "expiresAt-as-string",
        body(ok_answer(expiresAt=str(FUTURE_MS))),
        "invalid_response",
        "expiresAt",
    ),
    AuthleteFault(
        "expiresAt-in-seconds",
        body(ok_answer(expiresAt=FUTURE_MS // 1000)),
        "invalid_response",
        "expiresAt",
    ),
    AuthleteFault(
        "expiresAt-float",
        body(ok_answer(expiresAt=FUTURE_MS + 0.5)),
        "invalid_response",
        "expiresAt",
    ),
    AuthleteFault(
        "expiresAt-nan", body(ok_answer(expiresAt=float("nan"))), "invalid_response", "expiresAt"
    ),
    AuthleteFault(
        "expiresAt-missing",
        body(ok_answer(expiresAt=_MISSING)),
        "invalid_response",
        "expiresAt",
    ),
    AuthleteFault(
        "clientId-too-large", body(ok_answer(clientId=2**64)), "invalid_response", "clientId"
    ),
    AuthleteFault(
        "clientId-negative", body(ok_answer(clientId=-1)), "invalid_response", "clientId"
    ),
    AuthleteFault(
        "clientId-as-string", body(ok_answer(clientId="42")), "invalid_response", "clientId"
    ),
    AuthleteFault(
        "clientId-boolean", body(ok_answer(clientId=True)), "invalid_response", "clientId"
    ),
    AuthleteFault(
        "clientId-5000-digits",  # past Python's int-parsing limit: json.loads raises
        body(ok_answer(clientId=0).replace(b'"clientId": 0', b'"clientId": ' + b"9" * 5000)),
        "invalid_response",
        "Authlete answer",
    ),
    AuthleteFault("subject-as-number", body(ok_answer(subject=7)), "invalid_response", "subject"),
    AuthleteFault(
        "subject-with-crlf",
        body(ok_answer(subject="alice\r\nX-Auth-Scopes: admin")),
        "invalid_response",
        "subject",
    ),
    # The real answer, one byte per 10 ms: ~7 s, far past authlete.timeout (0.4 s).
    AuthleteFault("drip-past-timeout", lambda: Override(drip=0.01), "timeout", "in time"),
    AuthleteFault("reset-mid-body", lambda: Override(reset=True), "error", "unreachable"),
]


@pytest.mark.parametrize("fault", AUTHLETE_FAULTS, ids=[f.name for f in AUTHLETE_FAULTS])
async def test_misbehaving_authlete_fails_closed_with_log_and_metric(
    emulator: Emulator,
    start_gateway: StartGateway,
    counting: Counting,
    caplog: pytest.LogCaptureFixture,
    fault: AuthleteFault,
) -> None:
    caplog.set_level(logging.DEBUG)
    emulator.add_token(FAILING_TOKEN, subject="alice", client_id=42, scopes=[SCOPE])
    emulator.add_token(HEALTHY_TOKEN, subject="bob", client_id=43, scopes=[SCOPE])
    gw = await start_gateway(
        [orders_route(counting.url)], authlete={"timeout": 0.4, "retries": 1, "deadline": 3.0}
    )
    before = outcomes(await scrape(gw))

    emulator.override = fault.make()
    resp = await get(gw.port, "/orders/1", bearer(FAILING_TOKEN))
    emulator.override = None

    assert_gateway_error(resp, 503)
    assert resp.header("Retry-After") is not None
    assert FAILING_TOKEN.encode() not in resp.body
    assert counting.hits == [], "a request was forwarded without a verdict"
    after = outcomes(await scrape(gw))
    grew = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    assert grew.get(fault.outcome, 0) >= 1, f"expected outcome {fault.outcome!r}, got {grew}"
    assert "ok" not in grew, grew
    warnings = gateway_log(caplog, logging.WARNING)
    assert any(fault.detail in w for w in warnings), (fault.detail, warnings)
    assert FAILING_TOKEN not in caplog.text
    assert gateway_log(caplog, logging.ERROR) == [], "a handler failed (a crash, not a 503)"

    # Still serving: a healthy token, and the same token now that Authlete is sane again.
    healthy = await get(gw.port, "/orders/2", bearer(HEALTHY_TOKEN))
    assert healthy.status == 200, (healthy.status, healthy.body)
    again = await get(gw.port, "/orders/3", bearer(FAILING_TOKEN))
    assert again.status == 200, (again.status, again.body)
    assert counting.hits == [f"Bearer {HEALTHY_TOKEN}", f"Bearer {FAILING_TOKEN}"]


# A 5 MiB answer that is valid JSON and would allow the request if read whole: an OK with
# the route's scope followed by ~275,000 padding scope names.
_BIG_HEAD = (
    b'{"resultCode": "A056001", "action": "OK", "clientId": 42, "subject": "alice", '
    b'"expiresAt": %d, "scopes": ["%s"' % (FUTURE_MS, SCOPE.encode())
)
_BIG_TAIL = b"]}"
_PAD = b', "padding-scope-x"' * 3449  # ~64 KiB
ENORMOUS = 5 * MiB


def enormous_chunks() -> tuple[int, int]:
    """(number of padding chunks, total body size) for a body of about ENORMOUS bytes."""
    count = (ENORMOUS - len(_BIG_HEAD) - len(_BIG_TAIL)) // len(_PAD) + 1
    return count, len(_BIG_HEAD) + count * len(_PAD) + len(_BIG_TAIL)


def test_enormous_answer_is_valid_json_that_would_allow() -> None:
    """Guard for the test below: read whole, the body is a well-formed, allowing OK."""
    count, size = enormous_chunks()
    whole = _BIG_HEAD + _PAD * count + _BIG_TAIL
    assert len(whole) == size > ENORMOUS > MAX_BODY_BYTES
    doc = json.loads(whole)
    assert doc["action"] == "OK" and doc["scopes"][0] == SCOPE and len(doc["scopes"]) > 250_000


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_enormous_authlete_answer_is_refused_without_reading_it_whole(
    emulator: Emulator,
    start_gateway: StartGateway,
    counting: Counting,
    caplog: pytest.LogCaptureFixture,
    framing: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    count, size = enormous_chunks()
    sent = 0
    enormous = True

    async def authlete(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        await request.read()
        if not enormous:  # a sane Authlete again
            return web.json_response(json.loads(ok_answer()))
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if framing == "content-length":
            resp.content_length = size
        else:
            resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            for piece in [_BIG_HEAD, *([_PAD] * count), _BIG_TAIL]:
                await resp.write(piece)  # the same 64 KiB object: nothing big held here
                sent += len(piece)
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    app = web.Application()
    app.router.add_post("/api/{service_id}/auth/introspection", authlete)
    runner, authlete_url, _ = await start_app(app)
    try:
        gw = await start_gateway(
            [orders_route(counting.url)],
            authlete_url=authlete_url,
            authlete={"retries": 0, "timeout": 10.0, "deadline": 10.0},
        )
        await get(gw.port, "/orders/warm")  # no token: warms the listener, no Authlete call
        before = outcomes(await scrape(gw))
        async with RssWatch() as rss:
            resp = await get(gw.port, "/orders/1", bearer(FAILING_TOKEN))
        assert_gateway_error(resp, 503)
        assert counting.hits == [], "an answer too large to read must never allow"
        after = outcomes(await scrape(gw))
        assert after.get("invalid_response", 0) - before.get("invalid_response", 0) == 1, after
        assert after.get("ok", 0) == before.get("ok", 0)
        assert any("too large" in w for w in gateway_log(caplog, logging.WARNING)), caplog.text
        assert FAILING_TOKEN not in caplog.text
        # Read whole, 5 MiB costs 10 MiB of bytes (chunks + join) before any parsing; the
        # bounded read holds at most MAX_BODY_BYTES (1 MiB) plus one chunk.
        assert rss.growth < 4 * MiB, (
            f"RSS grew {rss.growth / MiB:.1f} MiB for a {size / MiB:.1f} MiB Authlete answer "
            f"({sent / MiB:.1f} MiB of it sent before the gateway stopped reading)"
        )
        enormous = False
        healthy = await get(gw.port, "/orders/2", bearer(HEALTHY_TOKEN))
        assert healthy.status == 200, (healthy.status, healthy.body)
    finally:
        await runner.cleanup()


async def test_ok_with_expires_at_in_the_past_is_401_and_not_forwarded(
    emulator: Emulator, start_gateway: StartGateway, counting: Counting
) -> None:
    emulator.add_token(FAILING_TOKEN, scopes=[SCOPE])
    gw = await start_gateway([orders_route(counting.url)])
    past_ms = int((time.time() - 5) * 1000)
    emulator.override = Override(body=ok_answer(expiresAt=past_ms))
    resp = await get(gw.port, "/orders/1", bearer(FAILING_TOKEN))
    assert resp.status == 401, (resp.status, resp.body)
    assert 'error="invalid_token"' in (resp.header("WWW-Authenticate") or "")
    assert resp.json()["error"] == "invalid_token"
    assert counting.hits == []
    assert outcomes(await scrape(gw)).get("ok", 0) == 0


# --------------------------------------------------------------------------- broken upstreams

ROUTE_TIMEOUT = 0.5  # the faulty route's timeout: silences longer than this are faults
STALL = 1.5  # how long a slow upstream stays silent (then gives up on its own)
HUGE = 50 * MiB
BLOCK = os.urandom(64 * 1024)

_INVALID_HEADS = {
    "header-without-colon": b"HTTP/1.1 200 OK\r\nX-Broken\r\nContent-Length: 2\r\n\r\nok",
    "content-length-not-a-number": b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\nok",
    "conflicting-content-lengths": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!"
    ),
    "content-length-with-chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    ),
    "nul-in-header-value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "header-line-100k": (
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 100_000 + b"\r\nContent-Length: 2\r\n\r\nok"
    ),
    "control-char-in-header-value": (
        b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\nok"
    ),
    "del-in-reason-phrase": b"HTTP/1.1 200 O\x7fK\r\nContent-Length: 2\r\n\r\nok",
    "status-2000": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
}


async def _read_head(reader: asyncio.StreamReader) -> str:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return head.split(b" ", 2)[1].decode("latin-1")


async def faulty_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One request, one fault (chosen by the last path segment), then the connection ends."""
    kind = (await _read_head(reader)).rsplit("/", 1)[-1]
    partial = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n"
        b"Connection: close\r\n\r\n" + b"p" * 1000
    )
    if kind == "reset-before-response":
        rst_close(writer)
    elif kind == "close-before-response":
        writer.close()
    elif kind == "reset-mid-response":
        writer.write(partial)
        await writer.drain()
        await asyncio.sleep(0.05)
        rst_close(writer)
    elif kind == "slow-first-byte":
        await asyncio.sleep(STALL)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nlate")
        await writer.drain()
    elif kind == "slow-body":
        writer.write(partial)
        await writer.drain()
        await asyncio.sleep(STALL)
    elif kind in _INVALID_HEADS:
        writer.write(_INVALID_HEADS[kind])
        await writer.drain()
        await asyncio.sleep(0.05)
    elif kind.startswith("huge"):
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % HUGE
        )
        for _ in range(HUGE // len(BLOCK)):
            writer.write(BLOCK)
            await writer.drain()
    else:
        raise AssertionError(f"unknown fault {kind}")


@dataclass
class FaultyServer:
    url: str
    tasks: set[asyncio.Task[None]]

    async def quiesce(self, timeout: float = 10.0) -> None:
        """Wait until every fault handler has finished (they all end on their own)."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)


@pytest.fixture
async def faulty() -> AsyncIterator[FaultyServer]:
    tasks: set[asyncio.Task[None]] = set()

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await faulty_handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            tasks.discard(task)
            writer.close()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        yield FaultyServer(f"http://127.0.0.1:{port}", tasks)
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await server.wait_closed()


@pytest.fixture
async def healthy_upstream() -> AsyncIterator[str]:
    """Answers with what identity it received, and closes every connection after answering
    (no pooled keep-alive connections, so the fd count has an exact baseline)."""

    async def handle(request: web.Request) -> web.Response:
        resp = web.json_response(
            {"path": request.path, "subject": request.headers.get("X-Auth-Subject")}
        )
        resp.force_close()
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner, url, _ = await start_app(app)
    try:
        yield url
    finally:
        await runner.cleanup()


@dataclass(frozen=True)
class UpstreamFault:
    kind: str
    expect: str  # "502", "504", "cut", "complete" or "abandoned"
    error_kind: str | None = None  # gateway_upstream_errors_total{kind=...} it must count
    count: int = 8  # concurrent faulty requests
    route: str = "faulty"


UPSTREAM_FAULTS = [
    UpstreamFault("refused", "502", "refused", route="refused"),
    UpstreamFault("reset-before-response", "502", "reset"),
    UpstreamFault("close-before-response", "502", "reset"),
    UpstreamFault("reset-mid-response", "cut"),
    UpstreamFault("slow-first-byte", "504", "timeout"),
    UpstreamFault("slow-body", "cut"),
    *(UpstreamFault(kind, "502", "protocol") for kind in _INVALID_HEADS),
    UpstreamFault("huge-complete", "complete", count=2),
    UpstreamFault("huge-abandoned", "abandoned", count=4),
]


async def _settled(gw: Running) -> tuple[int, float]:
    """(fd count, open-connection gauge) once transient sockets have closed."""
    gauge = metric(await scrape(gw), "gateway_open_connections")
    await asyncio.sleep(0.05)  # let the scrape's own sockets finish closing
    return fd_count(), gauge


async def _wait_for_baseline(
    gw: Running, fds: int, slack: int, timeout: float
) -> tuple[int, float]:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while True:
        now_fds, gauge = await _settled(gw)
        if (now_fds <= fds + slack and gauge == 0) or loop.time() > give_up:
            return now_fds, gauge
        await asyncio.sleep(0.1)


async def _faulty_request(session: aiohttp.ClientSession, url: str, expect: str) -> str:
    """What the client saw: a status, 'cut', 'complete', 'abandoned' or 'error:...'."""
    try:
        async with session.get(url, headers=bearer(HEALTHY_TOKEN)) as resp:
            if expect == "abandoned":
                got = 0
                async for chunk in resp.content.iter_any():
                    got += len(chunk)
                    if got >= MiB:
                        break
                resp.close()  # walk away mid-body
                return "abandoned" if resp.status == 200 and got >= MiB else f"{resp.status}"
            try:
                received = 0
                async for chunk in resp.content.iter_any():
                    received += len(chunk)
            except aiohttp.ClientPayloadError:
                return "cut" if resp.status == 200 else f"{resp.status}+cut"
            if resp.status == 200 and received == HUGE:
                return "complete"
            return str(resp.status)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return f"error:{type(exc).__name__}"


@pytest.mark.parametrize("fault", UPSTREAM_FAULTS, ids=[f.kind for f in UPSTREAM_FAULTS])
async def test_broken_upstream_spares_everyone_else_and_leaks_nothing(
    emulator: Emulator,
    start_gateway: StartGateway,
    faulty: FaultyServer,
    healthy_upstream: str,
    caplog: pytest.LogCaptureFixture,
    fault: UpstreamFault,
) -> None:
    caplog.set_level(logging.INFO)
    emulator.add_token(HEALTHY_TOKEN, subject="bob", client_id=43, scopes=[SCOPE])
    gw = await start_gateway(
        [
            {"name": "healthy", "path_prefix": "/healthy", "upstream": healthy_upstream},
            {
                "name": "faulty",
                "path_prefix": "/faulty",
                "upstream": faulty.url,
                "timeout": ROUTE_TIMEOUT,
            },
            {
                "name": "refused",
                "path_prefix": "/refused",
                "upstream": f"http://127.0.0.1:{free_port()}",
                "timeout": ROUTE_TIMEOUT,
            },
        ],
    )
    # Warm up (the token's verdict is cached, the Authlete connection pooled), then take
    # the baseline with no client connected.
    warm = await get(gw.port, "/healthy/warm", bearer(HEALTHY_TOKEN))
    assert warm.status == 200, (warm.status, warm.body)
    base_fds = min((await _settled(gw))[0], (await _settled(gw))[0])
    before = await scrape(gw)

    healthy: list[tuple[int, Any]] = []
    faults_done = asyncio.Event()

    async def healthy_client(session: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while not faults_done.is_set() or i < 3:
            path = f"/healthy/{n}/{i}"
            async with session.get(f"{gw.url}{path}", headers=bearer(HEALTHY_TOKEN)) as resp:
                doc = await resp.json() if resp.status == 200 else await resp.text()
                healthy.append((resp.status, doc))
                if resp.status == 200:
                    assert doc == {"path": path, "subject": "bob"}, doc
            i += 1
            await asyncio.sleep(0.005)

    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as faulty_session,
        aiohttp.ClientSession(timeout=timeout) as healthy_session,
    ):
        workers = [asyncio.create_task(healthy_client(healthy_session, n)) for n in range(4)]
        url = f"{gw.url}/{fault.route}/{fault.kind}"
        try:
            seen = await asyncio.gather(
                *(_faulty_request(faulty_session, url, fault.expect) for _ in range(fault.count))
            )
        finally:
            faults_done.set()
            await asyncio.gather(*workers)

    # Nothing leaks: every client session is closed; the fault handlers end on their own.
    await faulty.quiesce()
    fds, gauge = await _wait_for_baseline(gw, base_fds, slack=2, timeout=5.0)
    assert gauge == 0, f"gateway_open_connections stuck at {gauge}"
    assert fds <= base_fds + 2, f"fd count {fds} after the faults, baseline {base_fds}"
    assert (await get(gw.gateway.admin_port, "/healthz")).status == 200
    after = await scrape(gw)

    assert seen == [fault.expect] * fault.count, seen
    statuses = [status for status, _ in healthy]
    assert len(statuses) >= 4 * 3
    assert statuses == [200] * len(statuses), f"healthy route failed during the faults: {healthy}"

    assert metric(after, "gateway_requests_total", status="500") == 0, "a handler crashed"
    assert gateway_log(caplog, logging.ERROR) == []
    if fault.error_kind is not None:
        counted = metric(
            after, "gateway_upstream_errors_total", route=fault.route, kind=fault.error_kind
        ) - metric(
            before, "gateway_upstream_errors_total", route=fault.route, kind=fault.error_kind
        )
        assert counted == fault.count, (fault.error_kind, counted)


async def test_all_upstream_faults_at_once_leak_nothing(
    emulator: Emulator,
    start_gateway: StartGateway,
    faulty: FaultyServer,
    healthy_upstream: str,
) -> None:
    """Every fault kind concurrently (but the 50 MiB ones), with healthy traffic alongside."""
    emulator.add_token(HEALTHY_TOKEN, subject="bob", client_id=43, scopes=[SCOPE])
    gw = await start_gateway(
        [
            {"name": "healthy", "path_prefix": "/healthy", "upstream": healthy_upstream},
            {
                "name": "faulty",
                "path_prefix": "/faulty",
                "upstream": faulty.url,
                "timeout": ROUTE_TIMEOUT,
            },
            {
                "name": "refused",
                "path_prefix": "/refused",
                "upstream": f"http://127.0.0.1:{free_port()}",
                "timeout": ROUTE_TIMEOUT,
            },
        ],
    )
    assert (await get(gw.port, "/healthy/warm", bearer(HEALTHY_TOKEN))).status == 200
    base_fds = min((await _settled(gw))[0], (await _settled(gw))[0])

    faults = [f for f in UPSTREAM_FAULTS if not f.kind.startswith("huge")]
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def healthy_request(n: int) -> int:
            await asyncio.sleep(0.01 * n)
            async with session.get(f"{gw.url}/healthy/{n}", headers=bearer(HEALTHY_TOKEN)) as r:
                await r.read()
                return r.status

        results = await asyncio.gather(
            *(
                _faulty_request(session, f"{gw.url}/{f.route}/{f.kind}", f.expect)
                for f in faults
                for _ in range(3)
            ),
            *(healthy_request(n) for n in range(60)),
        )
    fault_results = results[: 3 * len(faults)]
    expected = [f.expect for f in faults for _ in range(3)]
    mismatches = [(f, r) for f, r in zip(expected, fault_results, strict=True) if f != r]
    assert results[3 * len(faults) :] == [200] * 60
    await faulty.quiesce()
    fds, gauge = await _wait_for_baseline(gw, base_fds, slack=2, timeout=5.0)
    assert gauge == 0
    assert fds <= base_fds + 2, f"fd count {fds} after the faults, baseline {base_fds}"
    assert mismatches == [], mismatches
