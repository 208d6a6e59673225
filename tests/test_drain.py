"""SIGTERM with drain_delay: readiness turns at once, the listener keeps serving a while."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_drain_delay_keeps_serving_with_readiness_off(tmp_path: Path, upstream: str) -> None:
    port, admin = _free_port(), _free_port()
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "drain_delay": 1.5,
        "authlete": {
            "base_url": "http://127.0.0.1:9",
            "allow_insecure_http": True,
            "service_id": "1",
            "access_token": "x",
        },
        "routes": [{"path_prefix": "/", "upstream": upstream, "auth": "none"}],
    }
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with session.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                assert resp.status == 503
            async with session.get(f"http://127.0.0.1:{port}/x") as resp:
                assert resp.status == 200  # still served during the drain delay
    finally:
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "serving 1.5s more" in err.decode()


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_drain_delay_is_validated(value: str) -> None:
    from gateway.config import ConfigError, parse_config

    text = f"""drain_delay: {value}
authlete: {{base_url: "https://a.example", service_id: s, access_token: t}}
routes: [{{path_prefix: /, upstream: "http://u:1"}}]
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    assert info.value.problems[0].startswith("drain_delay: must be")
