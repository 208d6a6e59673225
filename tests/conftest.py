"""Shared fixtures: the Authlete emulator, echo upstreams and the gateway, all on real
loopback sockets. Nothing of our own HTTP path is mocked."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import Gateway
from gateway.config import Config, parse_config
from gateway.echo import start_echo
from gateway.emulator import Emulator

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


def make_config(authlete_url: str, routes: list[dict[str, Any]], **overrides: Any) -> Config:
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
    return parse_config(yaml.safe_dump(raw), env={})


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
