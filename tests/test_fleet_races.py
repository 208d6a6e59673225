"""Races around purges and the event channel, found by driving a real fleet (gateway
subprocesses on one Redis and the emulator): each test was a failing reproducer first."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from gateway.emulator import Emulator, Override
from tests.conftest import RedisServer
from tests.test_fleet import (
    ask,
    connect,
    digest,
    fleet_config,
    in_thread,
    metric,
    mode,
    new_token,
    prefix,
    purge,
    replicas,
    until,
    verdict_key,
    wait_mode,
)


async def test_a_purge_of_another_token_leaves_calls_under_way_alone(
    tmp_path: Path, emulator: Emulator, upstream: str, redis_server: RedisServer
) -> None:
    """A busy revocation hook must not turn the cache off: only a purge of the token (or its
    subject or client) keeps a call under way from storing its verdict."""
    x = new_token(emulator, "x")
    y = new_token(emulator, "y")
    cfg = fleet_config(emulator, upstream, redis_server.url)
    async with replicas(tmp_path, cfg, 2) as runs, aiohttp.ClientSession() as s:
        a, b = runs
        assert await ask(s, a, y) == 200
        emulator.override = Override(delay=0.8, count=1)
        slow = asyncio.create_task(ask(s, a, x))

        async def on_the_wire() -> bool:
            return emulator.calls_for(x) == 1

        await until(on_the_wire, 5, "x on the wire")
        await asyncio.sleep(0.1)
        waiter = asyncio.create_task(ask(s, b, x))  # waits for a's call through the lock
        await asyncio.sleep(0.2)
        status, _ = await purge(s, b, {"token": y})
        assert status == 200
        assert await slow == 200
        assert await waiter == 200
        async with connect(redis_server) as r:
            assert await r.exists(verdict_key(emulator, x)) == 1
        assert emulator.calls_for(x) == 1
        # The waiter was told the holder was done: no take-over was counted.
        assert await metric(s, b, "gateway_shared_lock_takeovers_total") == 0


async def test_every_change_of_mode_is_logged_at_once(
    tmp_path: Path, emulator: Emulator, upstream: str, redis_server: RedisServer
) -> None:
    """Repeated log lines are collapsed for 10 s, but a change of mode never is: the last
    line about the mode always tells the mode the process is in."""
    cfg = fleet_config(emulator, upstream, redis_server.url)
    async with replicas(tmp_path, cfg, 1) as runs, aiohttp.ClientSession() as s:
        (a,) = runs
        for _ in range(2):
            await in_thread(redis_server.kill)
            await wait_mode(s, runs, "fallback", 3)
            await in_thread(redis_server.start)
            await wait_mode(s, runs, "shared", 5)
        await in_thread(redis_server.kill)
        await wait_mode(s, runs, "fallback", 3)
        await asyncio.sleep(0.3)
        assert await mode(s, a) == "fallback"
        lines = [line for line in a.stderr().splitlines() if "gateway.shared" in line]
        assert "fallback mode" in lines[-1], lines[-3:]
        assert sum("fallback mode" in line for line in lines) == 3
        assert sum("shared mode" in line for line in lines) == 2


async def test_a_dropped_subscription_cannot_lose_a_purge(
    tmp_path: Path, emulator: Emulator, upstream: str, redis_server: RedisServer
) -> None:
    """The event channel's connection never reconnects quietly: a replica whose subscription
    dropped goes through fallback, and on its way back notices the purge it could not hear."""
    tok = new_token(emulator, "blip")
    cfg = fleet_config(emulator, upstream, redis_server.url)
    async with (
        replicas(tmp_path, cfg, 1) as runs,
        aiohttp.ClientSession() as s,
        connect(redis_server) as r,
    ):
        (a,) = runs
        assert await ask(s, a, tok) == 200
        emulator.revoke(tok)
        # What POST /cache/purge does on another replica, while this one's subscription is cut.
        pipe = r.pipeline(transaction=True)
        pipe.delete(verdict_key(emulator, tok))
        pipe.incr(f"{prefix(emulator)}:epoch:purge")
        pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        pipe.publish(f"{prefix(emulator)}:events", f"p k {digest(tok)}")
        await pipe.execute()

        async def refused() -> bool:
            return await ask(s, a, tok) == 401

        await until(refused, 1.5, "the purged token refused")
        assert await metric(s, a, "gateway_shared_errors_total", kind="connection") >= 1
