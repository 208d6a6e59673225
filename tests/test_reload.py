"""SIGHUP reload: a valid file replaces the config for new requests; an invalid one is refused."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.emulator import Emulator
from tests.conftest import SERVICE_ID, SERVICE_TOKEN, StartGateway, bearer, echo_of, header_values


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(authlete: str, upstream: str, port: int, admin: int, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "authlete": {
            "base_url": authlete,
            "allow_insecure_http": True,
            "service_id": SERVICE_ID,
            "access_token": SERVICE_TOKEN,
        },
        "routes": [{"name": "old", "path_prefix": "/old", "upstream": upstream, "auth": "none"}],
    }
    cfg.update(extra)
    return cfg


async def _metric(session: aiohttp.ClientSession, admin: str, name: str) -> float:
    async with session.get(f"{admin}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_sighup_applies_a_valid_file_and_refuses_an_invalid_one(
    tmp_path: Path, emulator: Emulator, upstream: str
) -> None:
    emulator.add_token("tok-reload", subject="rita", scopes=["new.scope"])
    port, admin_port = _free_port(), _free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(_config(emulator.base_url, upstream, port, admin_port)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    try:
        connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection throughout
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(100):
                try:
                    async with session.get(f"{admin}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            async with session.get(f"{base}/old/x") as resp:
                assert resp.status == 200
            async with session.get(f"{base}/new/x") as resp:
                assert resp.status == 404

            # A valid file: new routes and header names, for new requests, same connection.
            new = _config(emulator.base_url, upstream, port, admin_port)
            new["routes"] = [
                {
                    "name": "new",
                    "path_prefix": "/new",
                    "upstream": upstream,
                    "scopes": ["new.scope"],
                }
            ]
            new["headers"] = {"subject": "X-User"}
            path.write_text(yaml.safe_dump(new))
            proc.send_signal(signal.SIGHUP)
            await _until(session, f"{base}/old/x", 404)
            async with session.get(f"{base}/new/x", headers=bearer("tok-reload")) as resp:
                echo = await echo_of(resp)
            assert header_values(echo, "X-User") == ["rita"]
            assert (
                await _metric(session, admin, 'gateway_config_reloads_total{result="success"}') == 1
            )

            # An invalid file: refused, the running config stays, each problem logged.
            broken = dict(new, routes=[{"path_prefix": "/x", "upstream": "ftp://nope"}])
            broken["listen"] = f"127.0.0.1:{_free_port()}"
            path.write_text(yaml.safe_dump(broken))
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            errors = 0.0
            while errors < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                errors = await _metric(
                    session, admin, 'gateway_config_reloads_total{result="error"}'
                )
            assert errors == 1
            async with session.get(f"{base}/new/x", headers=bearer("tok-reload")) as resp:
                assert resp.status == 200

            # Listener changes are reported as needing a restart, the rest is applied.
            moved = dict(new, listen=f"127.0.0.1:{_free_port()}")
            moved["routes"] = [
                *new["routes"],
                {"path_prefix": "/old", "upstream": upstream, "auth": "none"},
            ]
            path.write_text(yaml.safe_dump(moved))
            proc.send_signal(signal.SIGHUP)
            await _until(session, f"{base}/old/x", 200)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    log = err.decode()
    assert "config reload rejected: routes[0].upstream: not an http(s) URL" in log
    assert "listen changed" in log and "restart to apply" in log
    assert "Traceback" not in log


async def _until(session: aiohttp.ClientSession, url: str, status: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        async with session.get(url) as resp:
            if resp.status == status:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"{url} never answered {status}")
        await asyncio.sleep(0.1)


async def test_reload_keeps_cached_verdicts_and_applies_cache_limits(
    tmp_path: Path,
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
) -> None:
    for name in ("r1", "r2", "r3"):
        emulator.add_token(name, scopes=["s"])
    routes = [{"name": "p", "path_prefix": "/p", "upstream": upstream, "scopes": ["s"]}]
    gw = await start_gateway(routes)
    for name in ("r1", "r2", "r3"):
        async with client.get(f"{gw.url}/p", headers=bearer(name)) as resp:
            assert resp.status == 200
    cfg = _config(emulator.base_url, upstream, 0, 0, cache={"max_entries": 2})
    cfg["routes"] = routes
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert gw.gateway.reload(str(path))
    assert len(gw.gateway.verdicts.cache) == 2  # bounded anew, oldest evicted
    async with client.get(f"{gw.url}/p", headers=bearer("r3")) as resp:
        assert resp.status == 200
    assert emulator.calls_for("r3") == 1  # still cached across the reload
    path.write_text("routes: [")
    assert not gw.gateway.reload(str(path))
    assert gw.gateway.cfg.cache.max_entries == 2
