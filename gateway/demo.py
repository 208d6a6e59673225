"""`gateway demo` and `gateway emulator`: everything on loopback, nothing to install."""

from __future__ import annotations

import asyncio
import logging
import signal
from urllib.parse import urlsplit

from aiohttp import web

from gateway.app import Gateway
from gateway.config import Config
from gateway.echo import echo_app
from gateway.emulator import Emulator

log = logging.getLogger("gateway.demo")


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def curl_commands(cfg: Config, port: int) -> list[tuple[str, str]]:
    """The commands printed by the demo, with what each one should show."""
    base = f"http://{cfg.listen.host}:{port}"
    return [
        ("valid token -> 200, identity headers injected",
         f"curl -i -H 'Authorization: Bearer demo-valid-token' {base}/orders/42"),
        ("expired token -> 401 invalid_token",
         f"curl -i -H 'Authorization: Bearer demo-expired-token' {base}/orders/42"),
        ("token lacking the orders.read scope -> 403 insufficient_scope",
         f"curl -i -H 'Authorization: Bearer demo-noscope-token' {base}/orders/42"),
        ("no token -> 401 with a bare Bearer challenge",
         f"curl -i {base}/orders/42"),
        ("public route, no token needed -> 200",
         f"curl -i {base}/public/hello"),
        ("metrics",
         f"curl -s http://{cfg.admin_listen}/metrics | grep ^gateway_"),
    ]  # fmt: skip


async def run_demo(cfg: Config, tokens_file: str) -> int:
    parts = urlsplit(cfg.authlete.base_url)
    emulator = Emulator(cfg.authlete.service_id, cfg.authlete.access_token)
    emulator.load_tokens(tokens_file)
    runners: list[web.AppRunner] = []
    gateway = Gateway(cfg)
    try:
        await emulator.start(parts.hostname or "127.0.0.1", parts.port or 80)
        for upstream in sorted({(u.host, u.port) for r in cfg.routes for u in r.endpoints[:1]}):
            runner = web.AppRunner(echo_app(), access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, upstream[0], upstream[1]).start()
        await gateway.start()
    except OSError as exc:
        print(f"demo: cannot listen: {exc.strerror or exc} (is another demo running?)")
        await _close(gateway, emulator, runners)
        return 1
    print("\nThe gateway is running. Try:\n", flush=True)
    for what, command in curl_commands(cfg, gateway.proxy_port):
        print(f"  # {what}\n  {command}\n")
    print("Stop with Ctrl-C.", flush=True)
    await _wait_for_signal()
    await _close(gateway, emulator, runners)
    return 0


async def _close(gateway: Gateway, emulator: Emulator, runners: list[web.AppRunner]) -> None:
    await gateway.stop()
    for runner in runners:
        await runner.cleanup()
    await emulator.stop()


async def run_emulator(
    host: str,
    port: int,
    *,
    service_id: str,
    access_token: str,
    tokens: str | None,
    latency: float,
    rate_limit: tuple[float, int] | None,
    reset_form: str,
) -> int:
    emulator = Emulator(
        service_id,
        access_token,
        latency=latency,
        rate_limit=rate_limit,
        reset_form="epoch" if reset_form == "epoch" else "delta",
    )
    if tokens:
        count = emulator.load_tokens(tokens)
        log.info("loaded %d tokens", count)
    try:
        url = await emulator.start(host, port)
    except OSError as exc:
        print(f"emulator: cannot listen: {exc.strerror or exc}")
        return 1
    print(f"Authlete emulator at {url}/api/{service_id}/auth/introspection", flush=True)
    await _wait_for_signal()
    await emulator.stop()
    return 0
