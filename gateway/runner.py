"""Running one gateway process until told to stop: signals (SIGTERM/SIGINT drain and stop,
SIGHUP reloads), the drain delay, and garbage-collector tuning."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from gateway.app import Gateway
from gateway.config import Config
from gateway.memory import tune_malloc
from gateway.tls import TLSError

log = logging.getLogger("gateway")


def tune_gc() -> None:
    """Everything allocated so far (modules, config, the listeners) lives for the whole
    process: keep it out of every future collection, and collect the young generation less
    often than the default 700 allocations (each request allocates dozens)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)


async def serve(
    cfg: Config,
    path: str | None = None,
    reuse_port: bool = False,
    admin_socket: str | None = None,
    budget_share: int = 1,
) -> None:
    """Run until SIGTERM or SIGINT, then drain and return. SIGHUP reloads `path`."""
    tune_malloc()
    gateway = Gateway(
        cfg, reuse_port=reuse_port, admin_socket=admin_socket, budget_share=budget_share
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if path is not None:
        loop.add_signal_handler(signal.SIGHUP, gateway.reload, path)
    try:
        await gateway.start()
    except OSError as exc:
        await gateway.stop()
        raise SystemExit(f"gateway: cannot listen: {exc.strerror or exc}") from None
    except TLSError as exc:
        await gateway.stop()
        raise SystemExit(f"gateway: {exc}") from None
    tune_gc()
    await stop.wait()
    gateway.ready = False  # /readyz says 503 at once, so load balancers stop sending
    if gateway.cfg.drain_delay > 0:
        log.info("signal received: serving %gs more while readiness turns", gateway.cfg.drain_delay)
        await asyncio.sleep(gateway.cfg.drain_delay)
    log.info("signal received: draining for up to %gs", gateway.cfg.shutdown_timeout)
    await gateway.stop()
    log.info("stopped")
