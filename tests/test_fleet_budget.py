"""The fleet's one Authlete budget on a real redis-server: several `Budget`s in one process,
each with its own `Store` (as replicas have), sharing one bucket in Redis; learning and 429
pauses shared; the fallback bucket while Redis is down or stopped, and the way back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.budget import Budget, CallFailed, Priority, Reply
from gateway.config import SharedConfig
from gateway.fleet_budget import LEASE_TTL, bucket_digest, lease_limit, lease_sizes
from gateway.metrics import Metrics
from gateway.shared import Store
from tests.conftest import RedisServer, authlete_cfg, wait_until

TOKEN = "service-access-token-do-not-leak"
BASE = "https://authlete.example"


def shared_cfg(server: RedisServer, **fields: Any) -> SharedConfig:
    values: dict[str, Any] = {
        "redis_url": server.url,
        "secret": b"s" * 32,
        "timeout": 0.2,
        "fallback_rate": 10.0,
        "fallback_burst": 5,
    }
    values.update(fields)
    return SharedConfig(**values)


class Fleet:
    """Budgets on one Redis, each on its own Store and Metrics (replicas)."""

    def __init__(self, server: RedisServer, shared: SharedConfig, rate_limit: dict[str, Any]):
        self.server = server
        self.shared = shared
        self.rate_limit = rate_limit
        self.stores: list[Store] = []
        self.budgets: list[Budget] = []

    async def add(self, start: bool = True) -> Budget:
        metrics = Metrics()
        store = Store(self.shared, metrics)
        if start:
            await store.start()
            assert store.shared
        cfg = authlete_cfg(base_url=BASE, access_token=TOKEN, rate_limit=self.rate_limit)
        budget = Budget(cfg, metrics, shared=(store, self.shared))
        self.stores.append(store)
        self.budgets.append(budget)
        return budget

    @property
    def key(self) -> str:
        return f"{self.shared.key_prefix}:b:{self.budgets[0]._fleet.digest}"  # type: ignore[union-attr]

    def field(self, name: str) -> str:
        return self.server.cli("HGET", self.key, name)

    async def close(self) -> None:
        for budget in self.budgets:
            budget.close()
        for store in self.stores:
            await store.close()


@contextlib.asynccontextmanager
async def fleet(
    server: RedisServer, replicas: int, rate_limit: dict[str, Any], **shared: Any
) -> AsyncIterator[Fleet]:
    f = Fleet(server, shared_cfg(server, **shared), rate_limit)
    try:
        for _ in range(replicas):
            await f.add()
        yield f
    finally:
        await f.close()


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def sample(store: Store, name: str, **labels: str) -> float:
    value = store._metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ---------------------------------------------------------------- unit: lease sizing


def test_unit_lease_limit_is_a_twentieth_of_the_burst_at_least_one() -> None:
    assert lease_limit(200) == 10
    assert lease_limit(100) == 5
    assert lease_limit(39) == 1
    assert lease_limit(1) == 1
    assert lease_limit(0) == 1


@pytest.mark.parametrize(
    ("known", "new", "sizes"),
    [
        (0, 0, (0, 1)),  # nobody queued: one for the next caller
        (1, 0, (1, 1)),
        (0, 3, (0, 4)),
        (3, 2, (3, 3)),
        (4, 20, (4, 6)),  # at most the limit, KNOWN ones first
        (12, 5, (10, 0)),
        (0, 50, (0, 10)),
    ],
)
def test_unit_lease_sizes_follow_the_queue(known: int, new: int, sizes: tuple[int, int]) -> None:
    assert lease_sizes(known, new, 10) == sizes


def test_unit_bucket_digest_names_base_url_and_token_without_them() -> None:
    cfg = authlete_cfg(base_url=BASE, access_token=TOKEN)
    digest = bucket_digest(cfg)
    assert digest == hashlib.sha256(f"{BASE}\0{TOKEN}".encode()).hexdigest()
    assert TOKEN not in digest
    other = authlete_cfg(base_url="https://eu.authlete.example", access_token=TOKEN)
    assert bucket_digest(other) != digest


def test_unit_without_shared_nothing_changes() -> None:
    b = Budget(authlete_cfg(), Metrics())
    assert b._fleet is None
    assert b.tokens == 200 and b.rate == 100 and b.spare


# ---------------------------------------------------------------- one bucket for the fleet


async def test_fleet_never_exceeds_burst_plus_rate(redis_server: RedisServer) -> None:
    rate, burst = 100.0, 100
    async with fleet(redis_server, 3, {"rate": rate, "burst": burst, "max_wait": 5}) as f:
        times: list[float] = []
        started = time.monotonic()

        async def drive(b: Budget, priority: Priority) -> None:
            while time.monotonic() - started < 1.2:
                await b.acquire(soon(), priority=priority)
                times.append(time.monotonic())

        per = [Priority.KNOWN, Priority.NEW, Priority.KNOWN_STALE]
        await asyncio.gather(
            *(drive(b, per[i % 3]) for i, b in enumerate(f.budgets) for _ in range(4))
        )
        elapsed = max(times) - started
        allowed = burst + rate * elapsed
        assert len(times) <= allowed, (len(times), allowed)
        # Leases strand little: the fleet gets nearly all of it.
        assert len(times) >= 0.75 * allowed, (len(times), allowed)
        # Redis counted every permit (and maybe a few leased, unused).
        assert len(times) <= int(f.field("seq")) <= len(times) + 3 * lease_limit(burst)
        # The gauge reports the shared bucket: nearly empty, on every replica.
        for b in f.budgets:
            assert b.tokens < 20


async def test_known_callers_go_before_new_ones_across_replicas(
    redis_server: RedisServer,
) -> None:
    rate_limit = {"rate": 40, "burst": 40, "max_wait": 5}
    async with fleet(redis_server, 3, rate_limit) as f:
        new_side, known_side, drain = f.budgets
        for _ in range(40):  # empty the bucket from a third replica
            await drain.acquire(soon(), priority=Priority.KNOWN)
        order: list[str] = []

        async def one(b: Budget, priority: Priority, label: str) -> None:
            await b.acquire(soon(), priority=priority)
            order.append(label)

        known = [asyncio.ensure_future(one(known_side, Priority.KNOWN, "K")) for _ in range(6)]
        # The KNOWN callers found the bucket empty: the fleet holds NEW ones back.
        await wait_until(lambda: float(f.field("hold") or 0) > 0, 2.0, "a hold")
        new = [asyncio.ensure_future(one(new_side, Priority.NEW, "N")) for _ in range(6)]
        await asyncio.gather(*known, *new)
        assert order == ["K"] * 6 + ["N"] * 6


async def test_learnt_remaining_caps_every_replica(redis_server: RedisServer) -> None:
    async with fleet(redis_server, 2, {"rate": 100, "burst": 100, "max_wait": 0.4}) as f:
        a, b = f.budgets
        a.learn({"X-RateLimit-Remaining": "5", "X-RateLimit-Reset": "3", "X-RateLimit-Limit": "50"})
        await wait_until(lambda: f.field("cap") != "", 2.0, "the cap in Redis")
        granted = 0

        async def try_one(budget: Budget) -> None:
            nonlocal granted
            with contextlib.suppress(CallFailed):
                await budget.acquire(soon())
                granted += 1

        await asyncio.gather(*(try_one(x) for x in (a, b) for _ in range(10)))
        assert granted == 5
        assert b.tokens == 0 and a.tokens == 0
        assert b.rate == 50 and a.rate == 50  # the learnt X-RateLimit-Limit, fleet-wide


async def test_an_answer_caps_less_the_permits_granted_after_its_own(
    redis_server: RedisServer,
) -> None:
    async with fleet(redis_server, 2, {"rate": 100, "burst": 100, "max_wait": 1}) as f:
        a, b = f.budgets
        sent = asyncio.Event()
        release = asyncio.Event()

        async def send(timeout: float) -> Reply:
            sent.set()
            await release.wait()
            return Reply(200, {"X-RateLimit-Remaining": "20", "X-RateLimit-Reset": "5"}, b"{}")

        call = asyncio.ensure_future(a.call(send, soon()))
        await sent.wait()
        for _ in range(3):  # calls that Authlete had not counted when it answered
            await b.acquire(soon())
        release.set()
        assert (await call).status == 200
        await wait_until(lambda: f.field("cap") != "", 2.0, "the cap in Redis")
        seq = int(f.field("seq"))
        # 20 left as Authlete counted, less every permit the bucket granted since a's
        # (b's three calls and any permit leased ahead).
        assert float(f.field("cap")) <= 20 - 3
        assert float(f.field("cap")) >= 20 - (seq - 1)


async def test_spare_needs_room_in_the_shared_bucket(redis_server: RedisServer) -> None:
    async with fleet(redis_server, 2, {"rate": 10, "burst": 40, "max_wait": 5}) as f:
        a, b = f.budgets
        assert a.spare
        await a.acquire(soon(), priority=Priority.SPARE)
        for _ in range(25):  # b spends the bucket below half; a has not seen it yet
            await b.acquire(soon(), priority=Priority.KNOWN)
        assert not b.spare
        assert a.spare  # as a last saw the bucket...
        with pytest.raises(CallFailed):  # ...but the bucket has the last word
            await a.acquire(soon(), priority=Priority.SPARE)
        assert not a.spare


async def test_a_429_pauses_every_replica_at_once(redis_server: RedisServer) -> None:
    async with fleet(redis_server, 2, {"rate": 100, "burst": 100, "max_wait": 5}) as f:
        a, b = f.budgets
        await b.acquire(soon())  # b now holds a permit leased ahead
        assert b.spare
        pause = a.throttled({"Retry-After": "1"})
        assert pause == pytest.approx(1.0)
        noticed = time.monotonic()
        await wait_until(lambda: not b.spare, 1.0, "b to pause")
        assert time.monotonic() - noticed < 0.2  # tens of ms (not a poll, not a lease)
        assert float(f.field("paused_until")) > 0
        started = time.monotonic()
        await b.acquire(soon(), priority=Priority.KNOWN)  # the permit held was dropped
        assert time.monotonic() - started >= 0.8
        # A replica that was not listening (started later) is told by the bucket itself.
        assert a.throttled({"Retry-After": "1"}) == pytest.approx(1.0)
        c = await f.add()
        started = time.monotonic()
        await c.acquire(soon(), priority=Priority.KNOWN)
        assert time.monotonic() - started >= 0.8
        # Each replica counts the 429s it received.
        assert sample(f.stores[0], "gateway_authlete_throttled_total") == 2
        assert sample(f.stores[1], "gateway_authlete_throttled_total") == 0


# ---------------------------------------------------------------- when Redis fails


async def fallback_window(b: Budget, seconds: float) -> tuple[int, float]:
    """Acquire as fast as the budget allows for `seconds`: (how many, elapsed)."""
    count = 0
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                await b.acquire(soon(), priority=Priority.KNOWN)
                count += 1
    return count, time.monotonic() - started


async def test_redis_stopped_falls_back_without_stall_then_returns(
    redis_server: RedisServer,
) -> None:
    timeout = 0.2
    rate_limit = {"rate": 100, "burst": 100, "max_wait": 5}
    async with fleet(
        redis_server, 1, rate_limit, timeout=timeout, fallback_rate=10.0, fallback_burst=5
    ) as f:
        (b,) = f.budgets
        store = f.stores[0]
        redis_server.pause()  # SIGSTOP: slow, not gone
        try:
            started = time.monotonic()
            await asyncio.gather(*(b.acquire(soon(), priority=Priority.KNOWN) for _ in range(3)))
            stall = time.monotonic() - started
            # One lease timed out, then the fallback at once (the margin is for a busy CI box).
            assert stall < timeout + 0.3, stall
            assert not store.shared
            count, elapsed = await fallback_window(b, 0.8)
            # The fallback bucket: 5 at once (3 of them already taken), then 10/s.
            assert count <= 2 + 10 * elapsed + 1, (count, elapsed)
            assert count >= 2 + 10 * elapsed * 0.7 - 1, (count, elapsed)
            assert b.tokens < 5  # the gauge reports the fallback bucket
        finally:
            redis_server.resume()
        await wait_until(lambda: store.shared, 5.0, "shared mode again")
        count, elapsed = await fallback_window(b, 0.2)
        assert count >= 50, count  # the shared bucket's burst, far past the fallback's
        assert int(f.field("seq")) >= count


async def test_redis_killed_then_restarted_empty(redis_server: RedisServer) -> None:
    rate_limit = {"rate": 100, "burst": 100, "max_wait": 5}
    async with fleet(redis_server, 2, rate_limit, fallback_rate=20.0, fallback_burst=4) as f:
        a, b = f.budgets
        a.learn({"X-RateLimit-Limit": "50"})
        await wait_until(lambda: f.field("rate") == "0.050000000000000003", 2.0, "the rate")
        for _ in range(5):
            await a.acquire(soon())
        redis_server.kill()
        started = time.monotonic()
        await asyncio.gather(*(x.acquire(soon()) for x in (a, b) for _ in range(4)))
        assert time.monotonic() - started < 0.5  # refused connections fail fast
        assert not f.stores[0].shared and not f.stores[1].shared
        # Never open: the fallback bucket still bounds each replica.
        with pytest.raises(CallFailed):
            await asyncio.gather(*(a.acquire(time.monotonic() + 0.1) for _ in range(10)))
        redis_server.start()  # empty: no bucket, no scripts loaded
        await wait_until(lambda: all(s.shared for s in f.stores), 5.0, "shared mode again")
        for x in (a, b):
            for _ in range(10):
                await x.acquire(soon())
        assert int(f.field("seq")) >= 20  # a new bucket, full, shared by both
        assert a.rate == 100  # the learnt rate went with the old Redis


async def test_the_key_in_redis_never_holds_the_access_token(redis_server: RedisServer) -> None:
    async with fleet(redis_server, 1, {"rate": 100, "burst": 100}) as f:
        (b,) = f.budgets
        await b.acquire(soon())
        b.learn({"X-RateLimit-Remaining": "50", "X-RateLimit-Reset": "10"})
        b.throttled({"Retry-After": "0.1"})
        await wait_until(lambda: f.field("cap") != "", 2.0, "the cap")
        digest = hashlib.sha256(f"{BASE}\0{TOKEN}".encode()).hexdigest()
        keys = redis_server.cli("KEYS", "*").split()
        keys = [k for k in keys if k != "gateway:probe:alive"]  # the store's probe (1 s)
        assert keys == [f"gateway:b:{digest}"]
        dump = redis_server.cli("HGETALL", keys[0])
        assert TOKEN not in keys[0] and TOKEN not in dump and BASE not in dump
        ttl = int(redis_server.cli("PTTL", keys[0]))
        # An abandoned bucket goes away: a minute past the cap's reset (10 s) and its refill.
        assert 60_000 < ttl <= 72_000, ttl


async def test_leased_permits_expire_unused(redis_server: RedisServer) -> None:
    async with fleet(redis_server, 1, {"rate": 100, "burst": 100, "max_wait": 5}) as f:
        (b,) = f.budgets
        await b.acquire(soon())  # leases two: one for the next caller
        fleet_bucket = b._fleet
        assert fleet_bucket is not None
        assert fleet_bucket.held(time.monotonic()) == 1
        assert fleet_bucket.held(time.monotonic() + LEASE_TTL) == 0
        assert int(f.field("seq")) == 2


async def test_redis_full_falls_back_and_returns(redis_server: RedisServer) -> None:
    rate_limit = {"rate": 100, "burst": 100, "max_wait": 5}
    async with fleet(redis_server, 1, rate_limit, fallback_rate=10.0, fallback_burst=3) as f:
        (b,) = f.budgets
        store = f.stores[0]
        redis_server.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
        redis_server.cli("CONFIG", "SET", "maxmemory", "1")  # every write is refused
        started = time.monotonic()
        for _ in range(3):
            await b.acquire(soon())
        assert time.monotonic() - started < 0.2  # an OOM answer is immediate
        assert sample(store, "gateway_shared_errors_total", kind="full") >= 1
        with pytest.raises(CallFailed):  # the fallback bucket is spent: never open
            await b.acquire(time.monotonic() + 0.05)
        # A full Redis still answers PING; the probe writes, so the process stays in fallback
        # instead of flapping back to shared mode every probe.
        await asyncio.sleep(1.2)
        assert not store.shared
        assert sample(store, "gateway_shared_errors_total", kind="full") >= 2
        redis_server.cli("CONFIG", "SET", "maxmemory", "0")
        await wait_until(lambda: store.shared, 5.0, "shared mode again")
        for _ in range(20):
            await b.acquire(soon())
        assert int(f.field("seq")) >= 20


async def test_a_refilling_authlete_bucket_lowers_the_shared_one_without_holding_it(
    redis_server: RedisServer,
) -> None:
    """Limit, Remaining and a Reset that is the time to refill describe Authlete's bucket:
    the fleet's bucket drops to Remaining and refills at Limit, with no cap held until Reset."""
    async with fleet(redis_server, 2, {"rate": 100, "burst": 200, "max_wait": 1}) as f:
        a, b = f.budgets
        a.learn(
            {"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "2"}
        )
        await wait_until(lambda: float(f.field("tokens") or 200) < 5, 2.0, "the bucket lowered")
        assert f.field("cap") == ""
        started = time.monotonic()
        await b.acquire(soon())  # the next permit comes at 100/s, not after Reset
        assert time.monotonic() - started < 0.5
