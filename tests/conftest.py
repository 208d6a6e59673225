"""Shared fixtures: the Authlete emulator, echo upstreams and the gateway, all on real
loopback sockets. Nothing of our own HTTP path is mocked."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import Gateway
from gateway.budget import Budget
from gateway.config import AuthleteConfig, Config, parse_config
from gateway.echo import start_echo
from gateway.emulator import Emulator
from gateway.metrics import Metrics

SERVICE_ID = "715948317"
SERVICE_TOKEN = "test-service-access-token"


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator(SERVICE_ID, SERVICE_TOKEN)
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    """Base URL of an echo upstream that describes every request it receives."""
    runner, url = await start_echo()
    try:
        yield url
    finally:
        await runner.cleanup()


@dataclass
class Running:
    gateway: Gateway
    url: str
    admin_url: str
    port: int

    @property
    def config(self) -> Config:
        return self.gateway.cfg


def raw_config(authlete_url: str, routes: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """The YAML document of `make_config` (for a file to reload, say): loopback listeners on
    free ports, Authlete at `authlete_url`; a dict override is merged into its section."""
    raw: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "realm": "test",
        "authlete": {
            "base_url": authlete_url,
            "allow_insecure_http": True,  # the emulator speaks plain HTTP on loopback
            "service_id": SERVICE_ID,
            "access_token": SERVICE_TOKEN,
            "timeout": 2.0,
        },
        "routes": routes,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def make_config(authlete_url: str, routes: list[dict[str, Any]], **overrides: Any) -> Config:
    return parse_config(yaml.safe_dump(raw_config(authlete_url, routes, **overrides)), env={})


StartGateway = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_gateway(emulator: Emulator) -> AsyncIterator[StartGateway]:
    """Factory: `await start_gateway(routes, **config_overrides)` -> a running gateway."""
    started: list[Gateway] = []

    async def start(routes: list[dict[str, Any]], **overrides: Any) -> Running:
        authlete_url = overrides.pop("authlete_url", emulator.base_url)
        cfg = make_config(authlete_url, routes, **overrides)
        gw = Gateway(cfg)
        started.append(gw)
        await gw.start()
        return Running(
            gw,
            f"http://127.0.0.1:{gw.proxy_port}",
            f"http://127.0.0.1:{gw.admin_port}",
            gw.proxy_port,
        )

    try:
        yield start
    finally:
        for gw in reversed(started):
            await gw.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def echo_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """The echo upstream's description of what it received."""
    assert resp.status == 200, await resp.text()
    data: dict[str, Any] = json.loads(await resp.read())
    return data


def header_values(echo: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k.lower() == name.lower()]


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(port: int, data: bytes, timeout: float = 5.0) -> RawResponse:
    """Send bytes exactly as given (no client-side normalisation) and read one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = []
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers.append((k.strip(), v.strip()))
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), None)
        if length is not None:
            body = await asyncio.wait_for(reader.readexactly(length), timeout)
        else:
            body = await asyncio.wait_for(reader.read(), timeout)
        return RawResponse(status, headers, body)
    finally:
        writer.close()


async def get(port: int, target: str, headers: dict[str, str] | None = None) -> RawResponse:
    lines = [f"GET {target} HTTP/1.1", "Host: gateway.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return await raw_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


async def start_app(app: web.Application) -> tuple[web.AppRunner, str, int]:
    """Serve a test-specific aiohttp app on loopback (for upstreams that misbehave)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    return runner, f"http://127.0.0.1:{port}", port


# --------------------------------------------------------------------------- raw HTTP/1.1
# Exact bytes on both sides, every wait bounded: a raw client connection (`Client`) and a
# raw-socket upstream (`RawUpstream`) that records every byte and request head it receives.

HOST = "gateway.test"
KiB = 1 << 10
MiB = 1 << 20
WAIT = 5.0  # any one step that should take milliseconds
KEEP = 64 * KiB  # bytes of each connection and body kept for assertions on exact bytes


def head(method: str, target: str, *lines: str | bytes, version: str = "HTTP/1.1") -> bytes:
    """A request head, exactly as given (plus Host), ending with the empty line."""
    parts = [f"{method} {target} {version}".encode("latin-1"), f"Host: {HOST}".encode()]
    parts += [line if isinstance(line, bytes) else line.encode("latin-1") for line in lines]
    return b"\r\n".join(parts) + b"\r\n\r\n"


def chunked(body: bytes, size: int) -> bytes:
    out = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    )
    return out + b"0\r\n\r\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes: (data, closed); closed is False when the
    connection was still open after `timeout` seconds."""
    data = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return bytes(data), False
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            return bytes(data), False
        except ConnectionError:
            return bytes(data), True
        if not chunk:
            return bytes(data), True
        data += chunk


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:g}s for {what}")
        await asyncio.sleep(0.005)


@dataclass
class Response:
    """One response as the client received it; `headers` are the raw bytes of each line."""

    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    framing: str = "none"  # none | length | chunked | close
    length: int = 0
    sha256: str = ""

    def values(self, name: str) -> list[bytes]:
        key = name.lower().encode()
        return [v for k, v in self.headers if k.lower() == key]

    def header(self, name: str) -> str | None:
        found = self.values(name)
        return found[0].decode("latin-1") if found else None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def is_chunked(self) -> bool:
        return any(b"chunked" in v.lower() for v in self.values("Transfer-Encoding"))


def parse_response_head(raw: bytes) -> Response:
    lines = raw.removesuffix(b"\r\n\r\n").split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    assert version.startswith(b"HTTP/") and code.isdigit(), f"not a status line: {raw[:200]!r}"
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        assert sep, f"not a header line: {line!r} in {raw[:500]!r}"
        headers.append((name, value.strip(b" \t")))
    return Response(version, int(code), reason, headers)


def framing_of(resp: Response, method: str) -> str:
    if method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
        return "none"
    if resp.is_chunked:
        return "chunked"
    if resp.values("Content-Length"):
        return "length"
    return "close"


def dechunk(data: bytes) -> tuple[bytes, bytes] | None:
    """(body, rest) of a complete chunked body at the start of `data`; None if incomplete."""
    body = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(data[pos:eol].split(b";")[0].strip(), 16)
        pos = eol + 2
        if size == 0:
            while True:  # trailer section, up to the empty line
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    return None
                line, pos = data[pos:eol], eol + 2
                if not line:
                    return bytes(body), data[pos:]
        if len(data) < pos + size + 2:
            return None
        body += data[pos : pos + size]
        assert data[pos + size : pos + size + 2] == b"\r\n", f"bad chunk framing: {data[:300]!r}"
        pos += size + 2


def parse_first(data: bytes, method: str = "GET") -> tuple[Response, bytes]:
    """Split the first complete final response off `data` (1xx answers are skipped)."""
    while True:
        end = data.find(b"\r\n\r\n")
        assert end >= 0, f"no complete response head in {data[:300]!r}"
        resp = parse_response_head(data[: end + 4])
        data = data[end + 4 :]
        if not (100 <= resp.status < 200):
            break
    resp.framing = framing_of(resp, method)
    if resp.framing == "none":
        return resp, data
    if resp.framing == "length":
        size = int(resp.values("Content-Length")[0])
        assert len(data) >= size, f"truncated body: {data[:300]!r}"
        resp.body, rest = data[:size], data[size:]
    elif resp.framing == "chunked":
        found = dechunk(data)
        assert found is not None, f"incomplete chunked body: {data[:300]!r}"
        resp.body, rest = found
    else:
        resp.body, rest = data, b""
    resp.length, resp.sha256 = len(resp.body), sha(resp.body)
    return resp, rest


class Client:
    """A raw client connection: exact bytes out, responses parsed by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, rcvbuf: int = 0, sndbuf: int = 0) -> Client:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), WAIT
            )
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    async def send(self, data: bytes, timeout: float = WAIT) -> bool:
        """Write and drain; False when the gateway has closed the connection."""
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), timeout)
        except ConnectionError:
            return False
        return True

    async def head(self, timeout: float = WAIT) -> Response:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        return parse_response_head(raw)

    async def response(
        self,
        method: str = "GET",
        timeout: float = WAIT,
        interim: list[Response] | None = None,
        keep: bool = True,
    ) -> Response:
        """The next final response, whole; 1xx answers before it go to `interim`. With
        keep=False the body is only counted and hashed (for transfers too large to hold)."""
        while True:
            resp = await self.head(timeout)
            if 100 <= resp.status < 200 and resp.status != 101:
                if interim is not None:
                    interim.append(resp)
                continue
            break
        resp.framing = framing_of(resp, method)
        digest = hashlib.sha256()
        kept = bytearray()

        def take(data: bytes) -> None:
            resp.length += len(data)
            digest.update(data)
            if keep:
                kept.extend(data)

        read = self.reader
        if resp.framing == "chunked":
            while True:
                line = await asyncio.wait_for(read.readuntil(b"\r\n"), timeout)
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while await asyncio.wait_for(read.readuntil(b"\r\n"), timeout) != b"\r\n":
                        pass
                    break
                while size:
                    data = await asyncio.wait_for(read.readexactly(min(size, MiB)), timeout)
                    take(data)
                    size -= len(data)
                crlf = await asyncio.wait_for(read.readexactly(2), timeout)
                assert crlf == b"\r\n", f"bad chunk framing from the gateway: {crlf!r}"
        elif resp.framing == "length":
            left = int(resp.values("Content-Length")[0])
            while left:
                data = await asyncio.wait_for(read.read(min(left, MiB)), timeout)
                assert data, f"connection closed {left} bytes before the end of the body"
                take(data)
                left -= len(data)
        elif resp.framing == "close":
            while True:
                data = await asyncio.wait_for(read.read(MiB), timeout)
                if not data:
                    break
                take(data)
        resp.body = bytes(kept)
        resp.sha256 = digest.hexdigest()
        return resp

    async def read_until_closed(self, timeout: float) -> tuple[bytes, bool]:
        """Everything the gateway sends until it closes: (data, closed); closed is False when
        the connection was still open after `timeout` seconds."""
        return await read_until_closed(self.reader, timeout)

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


# --------------------------------------------------------------------------- raw upstream


@dataclass
class UpRequest:
    """One request head as the upstream received it, and what it read of the body."""

    method: str
    target: str
    version: str
    headers: list[tuple[bytes, bytes]]
    raw_head: bytes
    body: bytearray = field(default_factory=bytearray)  # the first KEEP bytes
    body_length: int = 0
    body_sha256: str = ""
    complete: bool = False

    def values(self, name: str) -> list[bytes]:
        key = name.lower().encode()
        return [v for k, v in self.headers if k.lower() == key]


class UpConn:
    """One connection from the gateway to the raw upstream. `closed` is set the moment a read
    sees the gateway's FIN (or a reset), `closed_at` is when."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        arrivals: list[UpRequest],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.nbytes = 0
        self.prefix = bytearray()
        self.closed = asyncio.Event()
        self.closed_at = 0.0
        self.requests: list[UpRequest] = []
        self._arrivals = arrivals

    def _took(self, data: bytes) -> bytes:
        self.nbytes += len(data)
        room = KEEP - len(self.prefix)
        if room > 0:
            self.prefix += data[:room]
        return data

    def saw_close(self) -> None:
        if not self.closed.is_set():
            self.closed_at = time.monotonic()
            self.closed.set()

    async def read(self, n: int = 65536) -> bytes:
        try:
            data = await self.reader.read(n)
        except ConnectionError:
            data = b""
        if not data:
            self.saw_close()
        return self._took(data)

    async def _take(self, reading: Awaitable[bytes]) -> bytes:
        """What `reading` returns, counted; a close or reset it runs into is noted."""
        try:
            return self._took(await reading)
        except asyncio.IncompleteReadError as exc:
            self._took(exc.partial)
            self.saw_close()
            raise
        except ConnectionError:
            self.saw_close()
            raise

    async def readuntil(self, separator: bytes) -> bytes:
        return await self._take(self.reader.readuntil(separator))

    async def readexactly(self, n: int) -> bytes:
        return await self._take(self.reader.readexactly(n))

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError:
            self.saw_close()
            raise

    async def drain_until_closed(self) -> None:
        while await self.read():
            pass

    async def read_request(self) -> UpRequest | None:
        """The next request head; None when the gateway closes (or resets) first."""
        try:
            raw = await self.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = raw[:-4].split(b"\r\n")
        method, target, version = lines[0].decode("latin-1").split(" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip(b" \t")))
        req = UpRequest(method, target, version, headers, raw)
        self.requests.append(req)
        self._arrivals.append(req)
        return req

    async def read_body(
        self, req: UpRequest, pace: Callable[[], Awaitable[None]] | None = None
    ) -> bool:
        """Read the request's body as framed; True when it arrived whole. `pace` is awaited
        after every read (a slow upstream)."""
        digest = hashlib.sha256()

        def took(data: bytes) -> None:
            req.body_length += len(data)
            digest.update(data)
            room = KEEP - len(req.body)
            if room > 0:
                req.body += data[:room]

        try:
            if any(b"chunked" in v.lower() for v in req.values("Transfer-Encoding")):
                while True:
                    size = int((await self.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                    if size == 0:
                        while await self.readuntil(b"\r\n") != b"\r\n":
                            pass
                        break
                    while size:
                        data = await self.readexactly(min(size, 65536))
                        took(data)
                        size -= len(data)
                        if pace is not None:
                            await pace()
                    if await self.readexactly(2) != b"\r\n":
                        return False
            else:
                lengths = req.values("Content-Length")
                left = int(lengths[0]) if lengths else 0
                while left:
                    data = await self.read(min(left, 65536))
                    if not data:
                        return False
                    took(data)
                    left -= len(data)
                    if pace is not None:
                        await pace()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return False
        req.complete = True
        req.body_sha256 = digest.hexdigest()
        return True


Handler = Callable[[UpConn], Awaitable[None]]
Answer = Callable[[UpConn, UpRequest], Awaitable[bytes | None]]


class RawUpstream:
    """A raw TCP upstream: `handler` runs once per accepted connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.conns: list[UpConn] = []
        self.requests: list[UpRequest] = []  # every request head, in order of arrival
        self.errors: list[BaseException] = []
        self.url = ""
        self._rcvbuf = 0
        self._sndbuf = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, rcvbuf: int = 0, sndbuf: int = 0) -> None:
        self._rcvbuf, self._sndbuf = rcvbuf, sndbuf
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None and self._rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf)
        if sock is not None and self._sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
        conn = UpConn(reader, writer, self.requests)
        self.conns.append(conn)
        try:
            await self.handler(conn)
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception as exc:  # a broken test upstream: reported at teardown
            self.errors.append(exc)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=WAIT)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.conns)

    def targets(self) -> list[str]:
        return [r.target for r in self.requests]


MakeUpstream = Callable[..., Awaitable[RawUpstream]]


def response(
    status: int,
    body: bytes,
    *lines: str | bytes,
    reason: bytes = b"OK",
    version: bytes = b"HTTP/1.1",
) -> bytes:
    parts = [b"%s %d %s" % (version, status, reason)]
    parts += [line if isinstance(line, bytes) else line.encode("latin-1") for line in lines]
    parts.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(parts) + b"\r\n\r\n" + body


async def echo_answer(conn: UpConn, req: UpRequest) -> bytes | None:
    """Read the body, answer with a JSON description of the request (None: body cut)."""
    if not await conn.read_body(req):
        return None
    doc = {
        "method": req.method,
        "target": req.target,
        "length": req.body_length,
        "sha256": req.body_sha256,
    }
    return response(200, json.dumps(doc).encode(), "Content-Type: application/json")


def http(answer: Answer = echo_answer) -> Handler:
    """A keep-alive HTTP/1.1 upstream: each request gets `answer`'s bytes; None closes."""

    async def handle(conn: UpConn) -> None:
        while True:
            req = await conn.read_request()
            if req is None:
                return
            out = await answer(conn, req)
            if out is None:
                return
            await conn.send(out)

    return handle


@pytest.fixture
async def raw_upstream() -> AsyncIterator[MakeUpstream]:
    """Factory: `await raw_upstream(handler, rcvbuf=0, sndbuf=0)` -> a started RawUpstream."""
    started: list[RawUpstream] = []

    async def make(handler: Handler, rcvbuf: int = 0, sndbuf: int = 0) -> RawUpstream:
        up = RawUpstream(handler)
        await up.start(rcvbuf, sndbuf)
        started.append(up)
        return up

    try:
        yield make
    finally:
        for up in started:
            await up.stop()
    errors = [exc for up in started for exc in up.errors]
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------- real frameworks

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"upstream exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


# Where scripts/get-helm.sh and .ci/run put the chart checkers (helm, kubernetes-validate).
CHECKERS = Path(os.environ.get("GATEWAY_TOOLS", "/var/tmp/gateway-tools"))


def find_checker(env: str, name: str, cached: Path) -> str | None:
    """A chart/example checker: $env, the cached install, beside this Python, or PATH."""
    explicit = os.environ.get(env)
    if explicit:
        return explicit
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


HELM = find_checker("HELM", "helm", CHECKERS / "bin" / "helm")
KUBERNETES_VALIDATE = find_checker(
    "KUBERNETES_VALIDATE", "kubernetes-validate", CHECKERS / "venv" / "bin" / "kubernetes-validate"
)


def need_tool(name: str) -> str:
    """The tool's path; a missing tool fails under CI (which installs it) and skips elsewhere."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required under CI")
        pytest.skip(f"{name} is not installed")
    return path


@contextlib.contextmanager
def serve(argv: list[str], port: int, cwd: Path = ROOT) -> Iterator[str]:
    """Run a real server process until the block ends; stopped by its PID."""
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            try:
                wait_for_port(port, proc)
            except RuntimeError as exc:
                errors.seek(0)
                raise RuntimeError(f"{exc}: {errors.read()[-2000:]!r}") from None
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def flask_upstream() -> Iterator[str]:
    """gunicorn (2 sync workers) serving tests/apps/flask_app.py."""
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}"]
    with serve([*argv, "tests.apps.flask_app:app"], port) as url:
        yield url


@pytest.fixture(scope="session")
def starlette_upstream() -> Iterator[str]:
    """uvicorn serving tests/apps/starlette_app.py (its default: trusts X-Forwarded-* from
    127.0.0.1, as it would the gateway in a pod)."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--port", str(port), "--no-access-log"]
    with serve([*argv, "--log-level", "warning", "tests.apps.starlette_app:app"], port) as url:
        yield url


# --------------------------------------------------------------------------- memory


def status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), or None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kib = status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset VmHWM (Linux >= 4.0: write 5 to clear_refs). True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return status_kib("VmHWM") is not None


class RssWatch:
    """Peak resident-set growth of this process (tests run client, gateway and upstream in it).

    Sampled every few milliseconds and, where the kernel allows, also read from VmHWM after
    resetting it, so a short spike between samples is not missed.
    """

    def __init__(self) -> None:
        self.baseline = 0
        self.peak = 0
        self._hwm = False
        self._task: asyncio.Task[None] | None = None
        self._running = False

    async def __aenter__(self) -> RssWatch:
        gc.collect()
        self._hwm = reset_peak()
        self.baseline = rss_bytes()
        self.peak = self.baseline
        self._running = True
        self._task = asyncio.create_task(self._sample())
        return self

    async def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, rss_bytes())
            await asyncio.sleep(0.005)

    async def __aexit__(self, *exc: object) -> None:
        self._running = False
        assert self._task is not None
        await self._task
        self.peak = max(self.peak, rss_bytes())
        if self._hwm:
            hwm = status_kib("VmHWM")
            if hwm is not None:
                self.peak = max(self.peak, hwm * 1024)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


# --------------------------------------------------------------------------- Authlete budget


def routes(upstream: str) -> list[dict[str, Any]]:
    """A protected route /api and a public route /public, both to `upstream`."""
    return [
        {"name": "api", "path_prefix": "/api", "upstream": upstream},
        {"name": "public", "path_prefix": "/public", "upstream": upstream, "auth": "none"},
    ]


def metric(gw: Running, name: str, **labels: str) -> float:
    """A sample of an in-process gateway's metric (0 if it has none yet)."""
    value = gw.gateway.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Clock:
    """A fake monotonic and wall clock that only `advance` moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.epoch = 1_700_000_000.0

    def mono(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.epoch

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.epoch += seconds


def authlete_cfg(**authlete: Any) -> AuthleteConfig:
    route = {"name": "r", "path_prefix": "/", "upstream": "http://127.0.0.1:9"}
    return make_config("http://127.0.0.1:9", [route], authlete=authlete).authlete


def budget(clock: Clock | None = None, jitter: float = 0.5, **authlete: Any) -> Budget:
    """A `Budget` on its own (no gateway), on `clock` if given, with a fixed jitter."""
    if clock is None:
        return Budget(authlete_cfg(**authlete), Metrics(), jitter=lambda: jitter)
    return Budget(
        authlete_cfg(**authlete),
        Metrics(),
        clock=clock.mono,
        wall=clock.wall,
        jitter=lambda: jitter,
    )


# --------------------------------------------------------------------------- gateway run


@dataclass
class GatewayRun:
    """A `gateway run` subprocess: its proxy port, its admin listener, what it wrote."""

    proc: subprocess.Popen[bytes]
    port: int
    admin_url: str
    out_path: Path
    err_path: Path

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def gateway_run(
    tmp_path: Path, cfg: dict[str, Any], wait_on: str = "/readyz"
) -> AsyncIterator[GatewayRun]:
    """`python -m gateway run -c <tmp_path>/gateway.yaml` as production runs it (its default
    event loop: uvloop when installed), with `cfg` listening on free loopback ports; yielded
    once the admin listener answers `wait_on` with 200. SIGTERM and wait on the way out."""
    port, admin = free_port(), free_port()
    while admin == port:
        admin = free_port()
    cfg = {**cfg, "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}"}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(path)],
            cwd=ROOT,
            stdout=out,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    running = GatewayRun(proc, port, f"http://127.0.0.1:{admin}", out_path, err_path)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(150):
                if proc.poll() is not None:
                    pytest.fail(f"gateway exited: {running.stderr()[-3000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{running.admin_url}{wait_on}") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"gateway never answered {wait_on}: {running.stderr()[-3000:]}")
        yield running
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 20)
        except TimeoutError:
            proc.kill()
            await asyncio.to_thread(proc.wait)


# --------------------------------------------------------------------------- Redis


class RedisServer:
    """A real `redis-server` on 127.0.0.1 without persistence, driven by its PID.

    Started by `start_redis` (or the `redis_server` fixture). `url` is what a gateway's
    `shared.redis_url` takes; `unix_url` too when it was started with a socket.
    """

    def __init__(self, port: int, unix_socket: str | None = None) -> None:
        self.port = port
        self.unix_socket = unix_socket
        self.url = f"redis://127.0.0.1:{port}/0"
        self.unix_url = f"unix://{unix_socket}?db=0" if unix_socket else None
        self.dir = Path(tempfile.mkdtemp(prefix="gateway-redis-"))
        self.log_path = self.dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("redis-server was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Launch on `port` (empty: nothing is saved or loaded), return once PING answers."""
        if self.running:
            raise RuntimeError(f"redis-server {self.pid} is already running")
        argv = [
            need_tool("redis-server"),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--protected-mode", "yes",
        ]  # fmt: skip
        if self.unix_socket:
            argv += ["--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self._paused = False
        deadline = time.monotonic() + timeout
        while not self._pong():
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self._proc.returncode}: {self.log()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server never answered PING on {self.port}: {self.log()}")
            time.sleep(0.02)

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def log(self) -> str:
        """The tail of the server's log."""
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _signal(self, signum: signal.Signals) -> None:
        if self.running:
            os.kill(self.pid, signum)

    def pause(self) -> None:
        """SIGSTOP: Redis keeps its connections but answers nothing (slow, not gone)."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        self._signal(signal.SIGCONT)
        self._paused = False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (resumed first if paused); SIGKILL if it does not exit in time."""
        if self._proc is None or self._proc.poll() is not None:
            return
        if self._paused:
            self.resume()
        self._signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL (works on a paused server too) and reap."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._signal(signal.SIGKILL)
        self._proc.wait()
        self._paused = False

    def restart(self) -> None:
        """Stop if running, then start again on the same port, empty (no persistence)."""
        self.stop()
        for leftover in self.dir.glob("*.rdb"):
            leftover.unlink()
        self.start()

    def cli(self, *args: str, timeout: float = 10.0) -> str:
        """`redis-cli -p PORT ARGS...`: its stdout, stripped (raises if redis-cli fails)."""
        proc = subprocess.run(
            [need_tool("redis-cli"), "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def close(self) -> None:
        """Stop and remove the working directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_redis(port: int | None = None, unix_socket: str | None = None) -> RedisServer:
    """A started `RedisServer` (on a free port unless given); `close()` it when done. Skips
    the test when redis-server is missing, fails it under CI (which installs it)."""
    server = RedisServer(free_port() if port is None else port, unix_socket)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty redis-server for the test; stopped afterwards (even if paused)."""
    server = start_redis()
    try:
        yield server
    finally:
        server.close()


# --------------------------------------------------------------------------- ingresses
# A real nginx and a real Caddy running the configs shipped in examples/ (decision mode), as
# a user would after replacing their placeholders with addresses.

EXAMPLES = ROOT / "examples"


def shipped_example(relative: str, placeholders: dict[str, str]) -> str:
    """The text of `examples/<relative>` with each placeholder replaced. Each must occur
    exactly once: an example whose placeholders change fails the tests that run it instead
    of silently running something else."""
    text = (EXAMPLES / relative).read_text()
    for old, new in placeholders.items():
        found = text.count(old)
        if found != 1:
            raise AssertionError(f"examples/{relative}: {old!r} occurs {found} times, not once")
        text = text.replace(old, new)
    return text


@dataclass
class Ingress:
    """A running ingress: where clients talk to it, its directory, what it logged."""

    name: str
    port: int
    dir: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        """The tail of what the ingress wrote (its error log)."""
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


@contextlib.contextmanager
def _run_ingress(
    ingress: Ingress, argv: list[str], env: dict[str, str] | None = None
) -> Iterator[Ingress]:
    """Run the ingress process until the block ends; SIGTERM by its PID (SIGKILL after 5 s)."""
    with (ingress.dir / "stderr").open("wb") as err:
        proc = subprocess.Popen(
            argv, cwd=ingress.dir, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err
        )
    try:
        try:
            wait_for_port(ingress.port, proc)
        except RuntimeError as exc:
            stderr = (ingress.dir / "stderr").read_text(errors="replace")[-2000:]
            log = "" if ingress.log_path.name == "stderr" else ingress.log()
            raise RuntimeError(f"{ingress.name}: {exc}: {stderr}{log}") from None
        yield ingress
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def start_nginx(gateway_port: int, app_port: int) -> Iterator[Ingress]:
    """Debian's nginx (with its auth_request module) running examples/nginx/gateway.conf as
    shipped, inside a minimal `http { }`: the gateway and the application on loopback
    ports, listening on a free loopback port. Fails under CI when nginx is missing."""
    nginx = need_tool("nginx")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gw-ingress-nginx-") as tmp:
        site = shipped_example(
            "nginx/gateway.conf",
            {
                "server gateway:8080;": f"server 127.0.0.1:{gateway_port};",
                "server app:8000;": f"server 127.0.0.1:{app_port};",
                "listen 80;": f"listen 127.0.0.1:{port};",
            },
        )
        Path(tmp, "gateway.conf").write_text(site)
        user = "user root;\n" if os.geteuid() == 0 else ""
        Path(tmp, "nginx.conf").write_text(
            f"{user}worker_processes 1;\n"
            f"error_log {tmp}/error.log info;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            f"  access_log {tmp}/access.log;\n"
            f"  client_body_temp_path {tmp}/body;\n"
            f"  proxy_temp_path {tmp}/proxy;\n"
            f"  fastcgi_temp_path {tmp}/fastcgi;\n"
            f"  uwsgi_temp_path {tmp}/uwsgi;\n"
            f"  scgi_temp_path {tmp}/scgi;\n"
            f"  include {tmp}/gateway.conf;\n"
            "}\n"
        )
        argv = [nginx, "-p", tmp, "-e", f"{tmp}/error.log", "-c", f"{tmp}/nginx.conf"]
        argv += ["-g", f"daemon off; pid {tmp}/nginx.pid;"]
        ingress = Ingress("nginx", port, Path(tmp), Path(tmp, "error.log"))
        with _run_ingress(ingress, argv) as running:
            yield running


# Caddy without its admin endpoint or automatic HTTPS, bound to loopback (Caddy 2.6 has no
# `persist_config off`: it saves its config under XDG_CONFIG_HOME, a temporary directory).
CADDY_GLOBAL_OPTIONS = """{
	admin off
	auto_https off
	default_bind 127.0.0.1
}

"""


@contextlib.contextmanager
def start_caddy(gateway_port: int, app_port: int) -> Iterator[Ingress]:
    """Debian's Caddy running examples/caddy/Caddyfile as shipped (after the global options
    above): the gateway and the application on loopback ports, the site on a free loopback
    port. Fails under CI when caddy is missing."""
    caddy = need_tool("caddy")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gw-ingress-caddy-") as tmp:
        site = shipped_example(
            "caddy/Caddyfile",
            {
                "\n:80 {\n": f"\n:{port} {{\n",
                "reverse_proxy gateway:8080 {": f"reverse_proxy 127.0.0.1:{gateway_port} {{",
                "reverse_proxy app:8000\n": f"reverse_proxy 127.0.0.1:{app_port}\n",
            },
        )
        path = Path(tmp, "Caddyfile")
        path.write_text(CADDY_GLOBAL_OPTIONS + site)
        env = {**os.environ, "HOME": tmp, "XDG_CONFIG_HOME": tmp, "XDG_DATA_HOME": tmp}
        argv = [caddy, "run", "--config", str(path), "--adapter", "caddyfile"]
        ingress = Ingress("caddy", port, Path(tmp), Path(tmp, "stderr"))
        with _run_ingress(ingress, argv, env) as running:
            yield running
