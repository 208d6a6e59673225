"""Issue 11 end to end: several `gateway run` processes on one emulator and one real
redis-server, as a fleet runs.

- A cold burst of distinct tokens sent to every replica makes one Authlete call per token
  (the others wait for the holder's verdict in Redis); with the emulator's rate limit on, the
  fleet keeps to one budget: no 429 beyond the first-ever reset.
- A purge on one replica reaches every replica within a second, for each kind; a call that
  started before the purge does not store its verdict afterwards.
- Redis killed mid-run (then started again, empty), Redis stopped with SIGSTOP (slow, not
  gone), Redis unreachable from the start: the replicas keep serving in fallback mode (local
  cache, a local budget of `shared.fallback_rate`), never fail open, stay ready, log each
  change of mode once, say so in `gateway_shared_mode`, and return to shared mode by
  themselves.
- A value in Redis that someone else wrote (a broken HMAC, a verdict moved to another token,
  one minted with another secret) is never an allow.
- A replica killed while it holds a token's lock: another one takes over.
- The raw tokens never reach Redis, nor any log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import SharedConfig, parse_config
from gateway.emulator import Emulator, Override
from gateway.fleet_cache import LOCK_TTL, FleetCache
from gateway.metrics import Metrics
from gateway.shared import Store, service_namespace
from gateway.verdict import Active
from tests.conftest import (
    SERVICE_ID,
    SERVICE_TOKEN,
    GatewayRun,
    RedisServer,
    bearer,
    free_port,
    gateway_run,
    need_tool,
    raw_config,
)

ADMIN = "fleet-admin-token-0123456789abcdef"
SECRET = "fleet-hmac-secret-0123456789abcdef0123456789abcdef"
TIMEOUT = 0.25  # shared.timeout
FALLBACK_LINE = "fallback mode, local cache and local budget"
BACK_LINE = "shared state reachable again: shared mode"
HMAC_LINE = "failed its HMAC check"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# --------------------------------------------------------------------------- the fleet


def fleet_config(
    emulator: Emulator,
    upstream: str,
    redis_url: str | None,
    shared: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A gateway on the emulator with /api protected, the purge endpoint on, and (unless
    `redis_url` is None) shared state on that Redis; `sections` merge into the document."""
    routes = [{"name": "api", "path_prefix": "/api", "upstream": upstream}]
    overrides: dict[str, Any] = {"admin": {"token": ADMIN}, "cache": {"ttl": 60}, **sections}
    cfg = raw_config(emulator.base_url, routes, **overrides)
    if redis_url is not None:
        cfg["shared"] = {
            "redis_url": redis_url,
            "secret": SECRET,
            "local_ttl": 30,
            "timeout": TIMEOUT,
            **(shared or {}),
        }
    return cfg


@contextlib.asynccontextmanager
async def replicas(
    tmp_path: Path, cfg: dict[str, Any], count: int
) -> AsyncIterator[list[GatewayRun]]:
    """`count` `gateway run` processes of one config, started together; each is stopped
    (SIGTERM, waited for) on the way out, so its log is complete afterwards."""
    async with contextlib.AsyncExitStack() as stack:

        async def one(index: int) -> GatewayRun:
            where = tmp_path / f"replica{index}"
            where.mkdir()
            return await stack.enter_async_context(gateway_run(where, cfg))

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(index)) for index in range(count)]
        yield [task.result() for task in tasks]


def new_token(emulator: Emulator, tag: str, **fields: Any) -> str:
    """A token the emulator knows, unique to this run (so finding it anywhere means a leak)."""
    token = f"fleet-{tag}-{secrets.token_hex(10)}"
    emulator.add_token(token, **fields)
    return token


def unknown_token(tag: str) -> str:
    return f"fleet-{tag}-unknown-{secrets.token_hex(10)}"


async def ask(
    session: aiohttp.ClientSession, run: GatewayRun, token: str, timeout: float = 10.0
) -> int:
    """The status of GET /api/fleet with `token` on replica `run`."""
    async with session.get(
        f"http://127.0.0.1:{run.port}/api/fleet",
        headers=bearer(token),
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as resp:
        await resp.read()
        return resp.status


async def timed(answer: Awaitable[int]) -> tuple[int, float]:
    started = time.monotonic()
    status = await answer
    return status, time.monotonic() - started


async def purge(
    session: aiohttp.ClientSession, run: GatewayRun, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with session.post(
        f"{run.admin_url}/cache/purge", json=body, headers=bearer(ADMIN)
    ) as resp:
        doc: dict[str, Any] = await resp.json()
        return resp.status, doc


async def ready(session: aiohttp.ClientSession, run: GatewayRun) -> int:
    async with session.get(f"{run.admin_url}/readyz") as resp:
        await resp.read()
        return resp.status


async def until(
    predicate: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.02
) -> float:
    """Poll `predicate` until it holds; the seconds it took. Fails the test past `timeout`."""
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(f"waited {timeout:g} s for {what}")
        await asyncio.sleep(every)
    return time.monotonic() - started


# --------------------------------------------------------------------------- metrics


async def scrape(session: aiohttp.ClientSession, run: GatewayRun) -> Samples:
    async with session.get(f"{run.admin_url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def metric(
    session: aiohttp.ClientSession, run: GatewayRun, name: str, **labels: str
) -> float:
    return sample(await scrape(session, run), name, **labels)


async def total(
    session: aiohttp.ClientSession, runs: Sequence[GatewayRun], name: str, **labels: str
) -> float:
    """The sum of one series over the replicas."""
    return sum([await metric(session, run, name, **labels) for run in runs])


async def mode(session: aiohttp.ClientSession, run: GatewayRun) -> str:
    """What `gateway_shared_mode` says: shared, fallback, or none (no series, or both)."""
    samples = await scrape(session, run)
    shared = sample(samples, "gateway_shared_mode", mode="shared")
    fallback = sample(samples, "gateway_shared_mode", mode="fallback")
    if (shared, fallback) == (1.0, 0.0):
        return "shared"
    if (shared, fallback) == (0.0, 1.0):
        return "fallback"
    return "none"


async def wait_mode(
    session: aiohttp.ClientSession, runs: Sequence[GatewayRun], want: str, timeout: float
) -> float:
    async def there() -> bool:
        return all([await mode(session, run) == want for run in runs])

    return await until(there, timeout, f"every replica in {want} mode", every=0.05)


# --------------------------------------------------------------------------- Redis


@contextlib.asynccontextmanager
async def connect(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        yield client
    finally:
        await client.aclose()


def prefix(emulator: Emulator) -> str:
    """Where a gateway on this emulator keeps its keys (key_prefix `gateway`, the service)."""
    return f"gateway:{service_namespace(emulator.base_url, SERVICE_ID)}"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def verdict_key(emulator: Emulator, token: str) -> str:
    return f"{prefix(emulator)}:v:{digest(token)}"


def lock_key(emulator: Emulator, token: str) -> str:
    return f"{prefix(emulator)}:l:{digest(token)}"


def raw(value: bytes | str) -> bytes:
    """A reply of the client (without decode_responses: bytes; typed bytes | str)."""
    return value if isinstance(value, bytes) else value.encode()


async def get(r: aioredis.Redis, key: str) -> bytes:
    value = await r.get(key)
    assert value is not None, f"no {key} in Redis"
    return raw(value)


async def dump(server: RedisServer) -> dict[bytes, list[bytes]]:
    """Every key in Redis and everything it holds (values, hash fields, members)."""
    out: dict[bytes, list[bytes]] = {}
    async with connect(server) as r:
        async for key in r.scan_iter(count=1000):
            kind = raw(await r.type(key))
            held: list[bytes | str] = []
            if kind == b"string":
                value = await r.get(key)
                held = [] if value is None else [value]
            elif kind == b"hash":
                fields = await r.hgetall(key)
                held = [*fields.keys(), *fields.values()]
            elif kind == b"set":
                held = list(await r.smembers(key))
            elif kind == b"list":
                held = list(await r.lrange(key, 0, -1))
            elif kind == b"zset":
                held = [m for m in await r.zrange(key, 0, -1) if isinstance(m, bytes | str)]
            out[raw(key)] = [raw(item) for item in held]
    return out


async def assert_nothing_secret_in_redis(
    server: RedisServer, emulator: Emulator, tokens: Iterable[str]
) -> None:
    """No raw token (nor the Authlete access token, nor the HMAC secret) in any key or value;
    every key lives under the fleet's prefix."""
    everything = await dump(server)
    assert everything, "Redis is empty: the check would prove nothing"
    words = [*tokens, SERVICE_TOKEN, SECRET]
    for key, held in everything.items():
        assert key.startswith(prefix(emulator).encode() + b":"), key
        for blob in (key, *held):
            for word in words:
                assert word.encode() not in blob, f"{word[:12]}... found in Redis under {key!r}"


def assert_nothing_secret_in_logs(runs: Iterable[GatewayRun], tokens: Iterable[str]) -> None:
    words = [*tokens, ADMIN, SECRET]
    for run in runs:
        for text in (run.stdout(), run.stderr()):
            for word in words:
                assert word not in text, f"{word[:12]}... found in a gateway log"


def log_count(run: GatewayRun, needle: str) -> int:
    """How many times a message was logged: its lines, a summary line counting for the N
    repeats it stands for (`... (and N more like this within 10 s)`). Complete once the
    process has exited (the last summaries are written at exit)."""
    count = 0
    for line in run.stderr().splitlines():
        if needle in line:
            more = re.search(r"\(and (\d+) more like this within", line)
            count += int(more.group(1)) if more else 1
    return count


async def settle(*tasks: asyncio.Task[Any]) -> None:
    """Cancel whatever is left of `tasks` and wait for them: a failing test leaves no task
    behind (nor an exception nobody retrieved)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def in_thread(fn: Callable[[], None]) -> None:
    """Drive redis-server from a thread: the emulator on this event loop keeps answering."""
    await asyncio.to_thread(fn)


# --------------------------------------------------------------------------- one call per token


async def test_a_cold_burst_makes_one_authlete_call_per_token(
    tmp_path: Path, emulator: Emulator, upstream: str, redis_server: RedisServer
) -> None:
    """Each of N new tokens sent to three replicas at once: N Authlete calls, every answer
    200; the replicas that did not call were answered from Redis (shared hits) after waiting
    on the token's lock. Asked again: local hits, without Redis or Authlete. Nothing raw in
    Redis or in the logs."""
    count = 16
    emulator.latency = 0.05  # the calls overlap the other replicas' misses
    tokens = [new_token(emulator, f"burst{i}") for i in range(count)]
    cfg = fleet_config(emulator, upstream, redis_server.url)
    async with replicas(tmp_path, cfg, 3) as runs, aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(*(ask(session, run, t) for t in tokens for run in runs))
        assert statuses == [200] * (3 * count)
        assert {t: emulator.calls_for(t) for t in tokens} == {t: 1 for t in tokens}
        result = "gateway_cache_requests_total"
        assert await total(session, runs, result, result="miss") == count
        assert await total(session, runs, result, result="shared_hit") == 2 * count
        waits = await total(session, runs, "gateway_shared_lock_waits_total")
        assert 0 < waits <= 2 * count
        assert await total(session, runs, "gateway_shared_lock_takeovers_total") == 0
        async with connect(redis_server) as r:
            for t in tokens:
                assert await r.exists(verdict_key(emulator, t)) == 1

        gets = await total(session, runs, "gateway_shared_roundtrip_seconds_count", op="get")
        again = await asyncio.gather(*(ask(session, run, t) for t in tokens for run in runs))
        assert again == [200] * (3 * count)
        assert emulator.calls == count
        assert await total(session, runs, result, result="hit") == 3 * count
        # A local hit never touches Redis.
        assert (
            await total(session, runs, "gateway_shared_roundtrip_seconds_count", op="get") == gets
        )
        await assert_nothing_secret_in_redis(redis_server, emulator, tokens)
    assert all(run.stdout() for run in runs)  # the access log was checked too
    assert_nothing_secret_in_logs(runs, tokens)


async def test_a_cold_burst_under_authlete_rate_limit_gets_no_429(
    tmp_path: Path,
    emulator: Emulator,
    upstream: str,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Authlete allows 20 calls/s, bursts of 20, and each replica is configured so: on budgets
    of their own, three replicas spend the burst three times over and re-burst together after
    the 429's pause (measured: about 20 refused, some past the first reset). On one shared
    budget, a cold burst of 60 tokens sent to all three replicas is served
    whole, one call per token, with no 429 past the first reset (1 s after the first call)."""
    rate, burst, count = 20, 20, 60
    refused: list[float] = []
    take = emulator._take

    def counting_take(caller: str) -> tuple[bool, dict[str, str]]:
        allowed, headers = take(caller)
        if not allowed:
            refused.append(time.monotonic())
        return allowed, headers

    monkeypatch.setattr(emulator, "_take", counting_take)
    emulator.rate_limit = (rate, burst)
    tokens = [new_token(emulator, f"budget{i}") for i in range(count)]
    cfg = fleet_config(
        emulator,
        upstream,
        redis_server.url,
        shared={"expected_replicas": 3},
        authlete={
            "rate_limit": {"rate": rate, "burst": burst, "max_wait": 10},
            "deadline": 15,
        },
    )
    async with replicas(tmp_path, cfg, 3) as runs, aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(
            *(ask(session, run, t, timeout=20) for t in tokens for run in runs)
        )
        first = emulator.call_times[0]
        assert statuses.count(200) == len(statuses), sorted(set(statuses))
        late = [round(at - first, 2) for at in refused if at > first + 1.0]
        assert not late, f"429s after the first reset, at {late} s"
        assert len(refused) <= 2, f"{len(refused)} calls refused with 429"
        assert emulator.calls == count + len(refused)  # one call per token, and its retries
        assert max(emulator.calls_for(t) for t in tokens) <= 2
        # The fleet kept to the rate: the burst, then 20/s (a margin for the first reset).
        span = emulator.call_times[-1] - first
        assert span >= (count - burst) / rate * 0.8, span
    assert_nothing_secret_in_logs(runs, tokens)


# --------------------------------------------------------------------------- purge


async def test_a_purge_reaches_every_replica_within_a_second(
    tmp_path: Path, emulator: Emulator, upstream: str, redis_server: RedisServer
) -> None:
    """Tokens cached on three replicas, revoked at Authlete (still 200 everywhere: cached),
    then purged on one replica by token, token_sha256, subject or client id: the admin
    answer says fleet true, and every replica refuses the token within 1 s. Tokens of
    another subject and client stay cached."""
    sub = f"mallory-{secrets.token_hex(4)}"
    by_token = new_token(emulator, "p-token", client_id=101)
    by_sha = new_token(emulator, "p-sha", client_id=102)
    by_subject = [new_token(emulator, f"p-sub{i}", subject=sub, client_id=103) for i in (1, 2)]
    by_client = [new_token(emulator, f"p-client{i}", client_id=5150) for i in (1, 2)]
    other = new_token(emulator, "p-other", subject="bob", client_id=7)
    everyone = [by_token, by_sha, *by_subject, *by_client, other]
    cases: list[tuple[str, Any, list[str]]] = [
        ("token", by_token, [by_token]),
        ("token_sha256", digest(by_sha).upper(), [by_sha]),
        ("subject", sub, by_subject),
        ("client_id", 5150, by_client),
    ]
    cfg = fleet_config(emulator, upstream, redis_server.url)
    async with replicas(tmp_path, cfg, 3) as runs, aiohttp.ClientSession() as session:
        for t in everyone:
            for run in runs:
                assert await ask(session, run, t) == 200
            assert emulator.calls_for(t) == 1
        for index, (kind, value, revoked) in enumerate(cases):
            for t in revoked:
                emulator.revoke(t)
                for run in runs:
                    assert await ask(session, run, t) == 200  # cached: not seen yet
            started = time.monotonic()
            status, answer = await purge(session, runs[index % 3], {kind: value})
            assert status == 200, answer
            assert answer["kind"] == kind and answer["fleet"] is True, answer
            assert answer["purged"] >= len(revoked), answer

            for run in runs:
                for t in revoked:

                    async def refused(run: GatewayRun = run, t: str = t) -> bool:
                        return await ask(session, run, t) == 401

                    await until(refused, 2.0, f"{kind} purge on replica {runs.index(run)}")
            took = time.monotonic() - started
            assert took < 1.0, f"the {kind} purge took {took:.2f} s to reach every replica"
            async with connect(redis_server) as r:
                for t in revoked:  # a negative verdict now, for the fleet
                    assert await r.exists(verdict_key(emulator, t)) == 1
        for run in runs:
            assert await ask(session, run, other) == 200
        assert emulator.calls_for(other) == 1  # never purged, never asked again
        for kind in ("token", "token_sha256", "subject", "client_id"):
            assert await total(session, runs, "gateway_cache_purges_total", kind=kind) >= 1
        await assert_nothing_secret_in_redis(redis_server, emulator, everyone)
    assert_nothing_secret_in_logs(runs, everyone)


async def test_a_call_under_way_during_a_purge_stores_nothing(
    tmp_path: Path, emulator: Emulator, upstream: str, redis_server: RedisServer
) -> None:
    """A replica's introspection is on the wire when another replica purges the token: the
    call answers its own request, but its verdict is kept neither in Redis nor locally."""
    token = new_token(emulator, "inflight")
    cfg = fleet_config(emulator, upstream, redis_server.url)
    async with replicas(tmp_path, cfg, 3) as runs, aiohttp.ClientSession() as session:
        emulator.override = Override(delay=0.8, count=1)
        slow = asyncio.create_task(ask(session, runs[0], token))
        try:

            async def on_the_wire() -> bool:
                return emulator.calls_for(token) == 1

            await until(on_the_wire, 5.0, "the introspection call")
            status, answer = await purge(session, runs[1], {"token": token})
            assert (status, answer["fleet"]) == (200, True), answer
            assert await slow == 200
        finally:
            await settle(slow)
        async with connect(redis_server) as r:
            assert await r.exists(verdict_key(emulator, token)) == 0
        assert await ask(session, runs[2], token) == 200
        assert emulator.calls_for(token) == 2  # nothing stored: asked again
        assert await ask(session, runs[0], token) == 200
        assert emulator.calls_for(token) == 2  # replica 0 took replica 2's verdict from Redis
        assert await metric(session, runs[0], "gateway_cache_requests_total", result="hit") == 0


# --------------------------------------------------------------------------- Redis fails


async def test_redis_killed_mid_run_then_restarted_empty(
    tmp_path: Path, emulator: Emulator, upstream: str, redis_server: RedisServer
) -> None:
    """Traffic on two replicas while Redis is SIGKILLed: cached tokens keep their 200 from
    the local level, new tokens are introspected by each replica alone, unknown and revoked
    tokens are never let through; both replicas stay ready, go to fallback mode (metric, one
    log line each), and a purge answers 503 (this replica only). Redis started again,
    empty: both return to shared mode by themselves and new verdicts land in Redis again."""
    warm = new_token(emulator, "warm")
    revoked = new_token(emulator, "revoked")
    emulator.revoke(revoked)
    unknown = unknown_token("killed")
    fresh: list[str] = []
    seen: dict[str, list[int]] = {"warm": [], "new": [], "unknown": []}
    cfg = fleet_config(emulator, upstream, redis_server.url)
    async with replicas(tmp_path, cfg, 2) as runs, aiohttp.ClientSession() as session:
        for run in runs:
            assert await ask(session, run, warm) == 200
        running = True

        async def traffic() -> None:
            turn = 0
            while running:
                run = runs[turn % 2]
                turn += 1
                token = new_token(emulator, f"traffic{turn}")
                fresh.append(token)
                seen["warm"].append(await ask(session, run, warm))
                seen["new"].append(await ask(session, run, token))
                seen["unknown"].append(await ask(session, run, unknown))
                await asyncio.sleep(0.02)

        load = asyncio.create_task(traffic())
        try:
            await asyncio.sleep(0.3)
            await in_thread(redis_server.kill)
            await wait_mode(session, runs, "fallback", 3.0)
            await asyncio.sleep(0.5)  # traffic in fallback mode
            for run in runs:
                assert await ready(session, run) == 200
                assert await ask(session, run, revoked) == 401
                assert await ask(session, run, unknown_token("down")) == 401
                assert await metric(session, run, "gateway_shared_errors_total", kind="connection")
            status, answer = await purge(session, runs[0], {"token": unknown})
            assert (status, answer["error"], answer["fleet"]) == (503, "shared_unavailable", False)

            await in_thread(redis_server.start)  # empty: no verdicts, no scripts, no epoch
            took = await wait_mode(session, runs, "shared", 5.0)
            assert took < 3.0, f"{took:.2f} s to return to shared mode"
            await asyncio.sleep(0.3)  # traffic in shared mode again
        finally:
            running = False
            await load
        assert seen["warm"] and set(seen["warm"]) == {200}, seen["warm"]
        assert set(seen["new"]) == {200}, seen["new"]
        assert set(seen["unknown"]) == {401}, seen["unknown"]
        assert max(emulator.calls_for(t) for t in fresh) == 1
        assert emulator.calls_for(warm) == 1  # the local level kept it throughout

        back = new_token(emulator, "back")
        assert await ask(session, runs[0], back) == 200
        async with connect(redis_server) as r:
            assert await r.exists(verdict_key(emulator, back)) == 1
        assert await ask(session, runs[1], back) == 200
        assert emulator.calls_for(back) == 1  # replica 1 had it from Redis
        assert await metric(session, runs[1], "gateway_cache_requests_total", result="shared_hit")

        # Restarted (SIGTERM, started again: empty): away for a moment (a connection error
        # each), then back by themselves.
        errors = "gateway_shared_errors_total"
        before = [await metric(session, run, errors, kind="connection") for run in runs]
        await in_thread(redis_server.restart)

        async def noticed() -> bool:
            now = [await metric(session, run, errors, kind="connection") for run in runs]
            return all(n > b for n, b in zip(now, before, strict=True))

        await until(noticed, 3.0, "both replicas to notice the restart")
        await wait_mode(session, runs, "shared", 5.0)
        async with connect(redis_server) as r:
            assert await r.exists(verdict_key(emulator, back)) == 0  # gone with the restart
        again = new_token(emulator, "again")
        for run in runs:
            assert await ask(session, run, back) == 200  # the local level
            assert await ask(session, run, again) == 200
        assert (emulator.calls_for(back), emulator.calls_for(again)) == (1, 1)
        async with connect(redis_server) as r:
            assert await r.exists(verdict_key(emulator, again)) == 1
    for run in runs:  # once per change of mode
        assert log_count(run, FALLBACK_LINE) == 2, run.stderr()
        assert log_count(run, BACK_LINE) == 2, run.stderr()
    assert_nothing_secret_in_logs(runs, [warm, revoked, unknown, back, again, *fresh])


async def test_redis_stopped_is_slow_not_a_hang(
    tmp_path: Path, emulator: Emulator, upstream: str, redis_server: RedisServer
) -> None:
    """Redis SIGSTOPped keeps its connections but answers nothing: a request that needs it
    is answered within about shared.timeout (then fallback mode), a cached token at once,
    and once in fallback no request waits on Redis at all. SIGCONT: shared mode again."""
    warm = new_token(emulator, "warm")
    cfg = fleet_config(emulator, upstream, redis_server.url)
    async with replicas(tmp_path, cfg, 2) as runs, aiohttp.ClientSession() as session:
        for run in runs:
            assert await ask(session, run, warm) == 200
        await in_thread(redis_server.pause)
        try:
            for run in runs:
                news = [new_token(emulator, f"stopped{i}") for i in range(4)]
                answers = await asyncio.gather(
                    timed(ask(session, run, warm)),
                    timed(ask(session, run, unknown_token("stopped"))),
                    *(timed(ask(session, run, t)) for t in news),
                )
                statuses = [status for status, _ in answers]
                assert statuses == [200, 401, 200, 200, 200, 200], statuses
                slowest = max(took for _, took in answers)
                assert slowest < TIMEOUT + 0.75, f"answered in {slowest:.2f} s"
                assert answers[0][1] < TIMEOUT + 0.75  # a local hit
                assert await mode(session, run) == "fallback"
                assert await ready(session, run) == 200
                # Now in fallback: Redis is not asked, so no request waits for its timeout.
                status, took = await timed(ask(session, run, new_token(emulator, "after")))
                assert status == 200 and took < TIMEOUT * 0.8, took
                errors = "gateway_shared_errors_total"
                assert await metric(session, run, errors, kind="timeout") >= 1
            await asyncio.sleep(1.2)  # a few probes time out meanwhile
            for run in runs:
                assert await mode(session, run) == "fallback"
        finally:
            await in_thread(redis_server.resume)
        took = await wait_mode(session, runs, "shared", 5.0)
        assert took < 3.0, f"{took:.2f} s to return to shared mode"
        back = new_token(emulator, "back")
        assert await ask(session, runs[1], back) == 200
        assert await ask(session, runs[0], back) == 200
        assert emulator.calls_for(back) == 1
    for run in runs:
        assert log_count(run, FALLBACK_LINE) == 1, run.stderr()
        assert log_count(run, BACK_LINE) == 1, run.stderr()


async def test_the_fallback_budget_is_local_and_never_open(
    tmp_path: Path, emulator: Emulator, upstream: str
) -> None:
    """With Redis unreachable, new tokens are introspected on a local budget of
    shared.fallback_rate (2/s) and fallback_burst (burst / expected_replicas = 5): of 20 new
    tokens at once, about 5 are answered and the rest refused with 503, none let through.
    Redis up: the shared bucket (burst 50) serves 20 more at once."""
    need_tool("redis-server")
    server = RedisServer(free_port())  # not started yet
    try:
        cfg = fleet_config(
            emulator,
            upstream,
            server.url,
            shared={"expected_replicas": 10, "fallback_rate": 2},
            authlete={"rate_limit": {"rate": 50, "burst": 50, "max_wait": 0.3}},
        )
        async with replicas(tmp_path, cfg, 1) as runs, aiohttp.ClientSession() as session:
            (run,) = runs
            assert await mode(session, run) == "fallback"
            tokens = [new_token(emulator, f"fb{i}") for i in range(20)]
            started = time.monotonic()
            statuses = await asyncio.gather(*(ask(session, run, t) for t in tokens))
            elapsed = time.monotonic() - started
            served = statuses.count(200)
            assert set(statuses) <= {200, 503}, statuses
            assert 3 <= served <= 5 + 2 * elapsed + 1, (served, elapsed)
            assert emulator.calls == served  # a refused one never reached Authlete
            assert await ask(session, run, unknown_token("fb"), timeout=5) in (401, 503)

            await in_thread(server.start)
            await wait_mode(session, runs, "shared", 5.0)
            more = [new_token(emulator, f"shared{i}") for i in range(20)]
            statuses = await asyncio.gather(*(ask(session, run, t) for t in more))
            assert statuses == [200] * 20
    finally:
        await in_thread(server.close)


async def test_without_shared_a_gateway_needs_no_redis(
    tmp_path: Path, emulator: Emulator, upstream: str
) -> None:
    """No `shared` section: no Redis anywhere, the gateway serves as before, exports no
    shared-state mode, and a purge is this process's (fleet false)."""
    token = new_token(emulator, "alone")
    cfg = fleet_config(emulator, upstream, None)
    async with replicas(tmp_path, cfg, 1) as runs, aiohttp.ClientSession() as session:
        (run,) = runs
        assert await ask(session, run, token) == 200
        assert await ask(session, run, token) == 200
        assert await ask(session, run, unknown_token("alone")) == 401
        assert emulator.calls_for(token) == 1
        samples = await scrape(session, run)
        assert not [key for key in samples if key[0] == "gateway_shared_mode"]
        status, answer = await purge(session, run, {"token": token})
        assert (status, answer) == (200, {"purged": 1, "kind": "token", "fleet": False})
    assert "shared state" not in run.stderr()


async def test_redis_unreachable_at_start_then_joined(
    tmp_path: Path, emulator: Emulator, upstream: str
) -> None:
    """`shared` on, nothing listening at redis_url: the gateway starts, is ready and serves
    in fallback mode (one log line); Redis comes up and the gateway joins by itself."""
    need_tool("redis-server")
    server = RedisServer(free_port())
    warm = new_token(emulator, "early")
    try:
        cfg = fleet_config(emulator, upstream, server.url)
        async with replicas(tmp_path, cfg, 1) as runs, aiohttp.ClientSession() as session:
            (run,) = runs
            assert await ready(session, run) == 200
            assert await mode(session, run) == "fallback"
            assert await ask(session, run, warm) == 200
            assert await ask(session, run, unknown_token("early")) == 401
            await in_thread(server.start)
            await wait_mode(session, runs, "shared", 5.0)
            assert await ask(session, run, warm) == 200  # still local
            joined = new_token(emulator, "joined")
            assert await ask(session, run, joined) == 200
            async with connect(server) as r:
                assert await r.exists(verdict_key(emulator, joined)) == 1
                assert await r.exists(verdict_key(emulator, warm)) == 0
        assert log_count(run, "shared state unreachable at start") == 1, run.stderr()
        assert log_count(run, BACK_LINE) == 1, run.stderr()
    finally:
        await in_thread(server.close)


# --------------------------------------------------------------------------- tampering


def sealer(emulator: Emulator, upstream: str, redis_url: str, secret: bytes) -> FleetCache:
    """A FleetCache of the fleet's service, sealing with `secret` (no connection is made)."""
    doc = fleet_config(emulator, upstream, redis_url)
    cfg = parse_config(yaml.safe_dump(doc), env={})
    assert cfg.shared is not None
    shared: SharedConfig = replace(cfg.shared, secret=secret)
    store = Store(shared, Metrics(), service=service_namespace(emulator.base_url, SERVICE_ID))
    return FleetCache(store, shared, Metrics())


async def test_a_tampered_value_in_redis_is_never_an_allow(
    tmp_path: Path, emulator: Emulator, upstream: str, redis_server: RedisServer
) -> None:
    """Whoever writes to Redis cannot mint a verdict: a value with a broken HMAC, a real
    verdict copied under another token's key, one sealed with another secret, or garbage,
    is a miss (Authlete decides: 401 here), counted and logged without the token. The same
    minted value sealed with the fleet's own secret is believed: the format was right, only
    the HMAC refused the others."""
    revoked = new_token(emulator, "t-revoked")
    donor = new_token(emulator, "t-donor")
    copied, minted, garbage, control = (unknown_token(f"t-{n}") for n in range(4))
    cfg = fleet_config(emulator, upstream, redis_server.url)
    async with (
        replicas(tmp_path, cfg, 2) as runs,
        aiohttp.ClientSession() as session,
        connect(redis_server) as r,
    ):
        writer, reader = runs
        failures = "gateway_shared_hmac_failures_total"
        for t in (revoked, donor):
            assert await ask(session, writer, t) == 200
        emulator.revoke(revoked)

        async def forged(token: str, value: bytes) -> None:
            assert await r.set(verdict_key(emulator, token), value, px=60_000)
            before = await metric(session, reader, failures)
            assert await ask(session, reader, token) == 401, token[:16]
            assert await metric(session, reader, failures) == before + 1

        # A real verdict, one byte of its HMAC flipped.
        real = await get(r, verdict_key(emulator, revoked))
        bar = real.index(b"|")
        await forged(revoked, real[: bar + 2] + bytes([real[bar + 2] ^ 1]) + real[bar + 3 :])
        # A real active verdict, moved to another token's key.
        await forged(copied, await get(r, verdict_key(emulator, donor)))
        # An active verdict minted for an unknown token with a secret that is not the fleet's.
        now = time.time()
        verdict = Active("mallory", "4242", ("admin",), "admin", now + 3600)
        own = sealer(emulator, upstream, redis_server.url, SECRET.encode())
        other = sealer(emulator, upstream, redis_server.url, b"not-the-fleet-secret-" * 2)
        await forged(minted, other.seal(bytes.fromhex(digest(minted)), verdict, now + 60, now + 60))
        # Not a sealed value at all.
        await forged(garbage, str(int(now * 1000) + 60_000).encode() + b"|1garbage")

        value = own.seal(bytes.fromhex(digest(control)), verdict, now + 60, now + 60)
        assert await r.set(verdict_key(emulator, control), value, px=60_000)
        assert await ask(session, reader, control) == 200  # the control: right secret
        assert emulator.calls_for(control) == 0
        assert await metric(session, reader, failures) == 4
        for store in (own.store, other.store):
            await store.close()
    assert log_count(reader, HMAC_LINE) == 4, reader.stderr()
    assert_nothing_secret_in_logs(runs, [revoked, donor, copied, minted, garbage, control])


# --------------------------------------------------------------------------- lock take-over


async def test_a_replica_killed_holding_a_lock_is_taken_over(
    tmp_path: Path, emulator: Emulator, upstream: str, redis_server: RedisServer
) -> None:
    """Replica A holds a token's lock while its introspection hangs at Authlete; replica B
    waits on the lock for the same token; A is SIGKILLed. B takes the lock over once A's
    renewals stop (within the lock TTL and a poll), calls Authlete itself and answers 200."""
    token = new_token(emulator, "lock")
    cfg = fleet_config(
        emulator, upstream, redis_server.url, authlete={"timeout": 8.0, "deadline": 10}
    )
    async with (
        replicas(tmp_path, cfg, 2) as runs,
        aiohttp.ClientSession() as session,
        connect(redis_server) as r,
    ):
        holder, waiter = runs
        emulator.override = Override(delay=6.0, count=1)  # the holder's call hangs
        doomed = asyncio.create_task(ask(session, holder, token))
        waiting: asyncio.Task[int] | None = None
        try:

            async def on_the_wire() -> bool:
                return emulator.calls_for(token) == 1

            await until(on_the_wire, 5.0, "the holder's introspection")
            assert await r.exists(lock_key(emulator, token)) == 1
            waiting = asyncio.create_task(ask(session, waiter, token, timeout=15))

            async def waits() -> bool:
                return await metric(session, waiter, "gateway_shared_lock_waits_total") == 1

            await until(waits, 5.0, "replica B waiting on the lock")
            await asyncio.sleep(LOCK_TTL * 1.2)  # renewed all along: still A's
            assert not waiting.done()
            assert await r.exists(lock_key(emulator, token)) == 1
            killed = time.monotonic()
            holder.proc.kill()
            status = await waiting
            took = time.monotonic() - killed
            assert status == 200
            assert took < LOCK_TTL + 1.0, f"answered {took:.2f} s after the holder died"
            assert await metric(session, waiter, "gateway_shared_lock_takeovers_total") == 1
            assert emulator.calls_for(token) == 2
            with contextlib.suppress(aiohttp.ClientError):
                await doomed
            assert await r.exists(verdict_key(emulator, token)) == 1
        finally:
            await settle(doomed, *([waiting] if waiting is not None else []))
