"""Token spraying must not starve real users (issue 10 §5): the per-client miss quota, known
tokens ahead of never-seen ones in the budget's queue, refresh-ahead, and token_pattern.

End to end on real loopback sockets (the emulator as a real HTTP server, the real gateway, an
echo upstream), requests sent from chosen source addresses (127.0.0.x); plus unit tests of
the pure pieces (`Budget` priority, `ClientQuota`, the cache's refresh window) with fake clocks.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from gateway.budget import CallFailed, ClientQuota, Priority
from gateway.cache import VerdictCache, token_key
from gateway.emulator import Emulator
from gateway.verdict import Active, Inactive
from tests.conftest import (
    Clock,
    RawResponse,
    Running,
    StartGateway,
    budget,
    metric,
    raw_config,
    routes,
    wait_until,
)

# ---------------------------------------------------------------- helpers


async def ask(
    gw: Running,
    token: str,
    source: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
    timeout: float = 15.0,
) -> tuple[RawResponse, float]:
    """GET /api/resource with the token, from the `source` address; the answer and seconds."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, local_addr=(source, 0))
    try:
        lines = [
            "GET /api/resource HTTP/1.1",
            "Host: gateway.test",
            "Connection: close",
            f"Authorization: Bearer {token}",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    first, *rest = head.decode("latin-1").split("\r\n")
    fields = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in rest)]
    return RawResponse(int(first.split(" ")[1]), fields, body), time.monotonic() - started


def random_token() -> str:
    return "spray-" + os.urandom(12).hex()


# ---------------------------------------------------------------- per-client quota


async def test_a_sprayer_over_its_quota_gets_503_at_once_and_spends_no_calls(
    emulator: Emulator, upstream: str, start_gateway: StartGateway
) -> None:
    emulator.add_token("fresh-other-client")
    # A long max_wait: a refusal that waited for budget would take seconds, not milliseconds.
    gw = await start_gateway(
        routes(upstream), authlete={"rate_limit": {"per_client": 2, "max_wait": 5}}
    )
    answers = await asyncio.gather(*(ask(gw, random_token()) for _ in range(20)))
    statuses = sorted(a.status for a, _ in answers)
    assert statuses == [401] * 2 + [503] * 18  # the burst (one second's worth), then refused
    for answer, elapsed in answers:
        if answer.status == 503:
            assert elapsed < 1.0, f"a refusal took {elapsed:.2f}s"
            retry = answer.header("Retry-After")
            assert retry is not None and retry.isdigit() and int(retry) >= 1
    assert emulator.calls == 2  # refused misses never reached Authlete
    assert metric(gw, "gateway_authlete_budget_rejected_total", reason="client_quota") == 18

    # Another client address has its own quota: its fresh token gets its verdict.
    answer, _ = await ask(gw, "fresh-other-client", source="127.0.0.2")
    assert answer.status == 200, answer.body
    # The sprayer's quota refills at per_client calls per second.
    await asyncio.sleep(0.6)
    answer, _ = await ask(gw, random_token())
    assert answer.status == 401
    assert emulator.calls == 4


async def test_quota_counts_the_client_behind_a_trusted_proxy(
    emulator: Emulator, upstream: str, start_gateway: StartGateway
) -> None:
    emulator.add_token("fresh-behind-proxy")
    gw = await start_gateway(
        routes(upstream),
        authlete={"rate_limit": {"per_client": 1}},
        trusted_proxies=["127.0.0.1/32"],
    )
    sprayer = {"X-Forwarded-For": "203.0.113.7"}
    first, _ = await ask(gw, random_token(), headers=sprayer)
    second, _ = await ask(gw, random_token(), headers=sprayer)
    assert (first.status, second.status) == (401, 503)
    # The same ingress address, another client behind it: not starved by the sprayer.
    answer, _ = await ask(gw, "fresh-behind-proxy", headers={"X-Forwarded-For": "203.0.113.8"})
    assert answer.status == 200, answer.body
    assert emulator.calls == 2


async def test_known_tokens_and_in_flight_calls_are_not_charged(
    emulator: Emulator, upstream: str, start_gateway: StartGateway
) -> None:
    emulator.add_token("known-user")
    emulator.add_token("shared-fresh")
    emulator.latency = 0.2
    gw = await start_gateway(
        routes(upstream),
        authlete={"rate_limit": {"per_client": 1}},
        cache={"ttl": 0.5, "refresh_ahead": 0},
    )
    # Five requests for one fresh token while its call is in flight: one call, one charge.
    answers = await asyncio.gather(*(ask(gw, "shared-fresh") for _ in range(5)))
    assert [a.status for a, _ in answers] == [200] * 5
    assert (await ask(gw, random_token()))[0].status == 503  # that was 127.0.0.1's one call
    # known-user from another address; then, once its entry expired, from 127.0.0.1 right
    # after a never-seen token spent 127.0.0.1's quota again.
    assert (await ask(gw, "known-user", source="127.0.0.2"))[0].status == 200
    await asyncio.sleep(1.1)  # known-user's entry expired; 127.0.0.1's quota refilled
    assert (await ask(gw, random_token()))[0].status == 401  # charged: the bucket is empty
    answer, _ = await ask(gw, "known-user")
    assert answer.status == 200, answer.body
    assert emulator.calls_for("known-user") == 2
    assert emulator.calls_for("shared-fresh") == 1


# ---------------------------------------------------------------- priority


async def test_a_known_token_goes_before_queued_new_ones(
    emulator: Emulator, upstream: str, start_gateway: StartGateway
) -> None:
    emulator.add_token("returning-user")
    gw = await start_gateway(
        routes(upstream),
        authlete={"rate_limit": {"rate": 4, "burst": 1, "max_wait": 10}},
        cache={"ttl": 0.3, "refresh_ahead": 0},
    )
    assert (await ask(gw, "returning-user"))[0].status == 200
    await asyncio.sleep(0.6)  # its entry expired; the bucket is full again (one call)
    sprayed = [asyncio.ensure_future(ask(gw, random_token())) for _ in range(8)]
    await wait_until(lambda: gw.gateway.budget.waiting >= 7, 5.0, "the new tokens to queue")
    answer, elapsed = await ask(gw, "returning-user")
    assert answer.status == 200, answer.body
    # Served at the next token (0.25 s at 4/s), not after the seven queued before it (~2 s).
    assert elapsed < 0.9, f"the known token waited {elapsed:.2f}s"
    later = [a for a, _ in await asyncio.gather(*sprayed)]
    assert all(a.status == 401 for a in later)  # FIFO within a class: all served in the end


async def test_unit_known_waiters_are_served_before_new_ones_fifo_within_each() -> None:
    b = budget(rate_limit={"rate": 40, "burst": 1, "max_wait": 5})
    await b.acquire(time.monotonic() + 10)  # empty the bucket
    order: list[str] = []

    async def one(name: str, priority: Priority) -> None:
        await b.acquire(time.monotonic() + 10, priority=priority)
        order.append(name)

    tasks = []
    for name, priority in [
        ("n0", Priority.NEW),
        ("n1", Priority.NEW),
        ("k0", Priority.KNOWN),
        ("n2", Priority.NEW),
        ("k1", Priority.KNOWN),
    ]:
        tasks.append(asyncio.ensure_future(one(name, priority)))
        await asyncio.sleep(0.001)  # each one queued behind the previous
    await asyncio.gather(*tasks)
    assert order == ["k0", "k1", "n0", "n1", "n2"]


async def test_unit_new_waiters_are_shed_first() -> None:
    b = budget(rate_limit={"rate": 20, "burst": 1, "max_wait": 0.5})
    await b.acquire(time.monotonic() + 10)

    async def one(priority: Priority) -> bool:
        try:
            await b.acquire(time.monotonic() + 10, priority=priority)
        except CallFailed:
            return False
        return True

    new = [asyncio.ensure_future(one(Priority.NEW)) for _ in range(20)]
    await asyncio.sleep(0.01)
    known = [asyncio.ensure_future(one(Priority.KNOWN)) for _ in range(3)]
    assert all(await asyncio.gather(*known))  # queued last, served first
    served = await asyncio.gather(*new)
    assert not all(served)  # 0.5 s at 20/s cannot serve 23
    # Those shed are the newest new ones: the served ones are a prefix, in arrival order.
    assert served == sorted(served, reverse=True)
    assert b.waiting == 0


async def test_unit_a_spare_call_never_waits() -> None:
    clock = Clock()
    b = budget(clock, rate_limit={"rate": 1, "burst": 10})
    assert b.spare
    for _ in range(4):
        await b.acquire(clock.mono() + 5, priority=Priority.SPARE)
    assert b.tokens == 6 and b.spare  # 6 >= 10 / 2 + 1
    await b.acquire(clock.mono() + 5, priority=Priority.SPARE)
    assert not b.spare  # 5 left: taking one more would leave less than half the burst
    with pytest.raises(CallFailed):
        await b.acquire(clock.mono() + 5, priority=Priority.SPARE)
    clock.advance(5)
    assert b.spare
    b.throttled({"Retry-After": "3"})  # a 429 pause: no spare budget
    assert not b.spare
    clock.advance(3)
    assert b.spare
    b.learn({"X-RateLimit-Remaining": "2", "X-RateLimit-Reset": "30"})
    assert not b.spare  # what Authlete says is left counts too


async def test_unit_no_spare_while_anyone_waits() -> None:
    b = budget(rate_limit={"rate": 10, "burst": 4, "max_wait": 5})
    for _ in range(4):
        await b.acquire(time.monotonic() + 5)
    waiter = asyncio.ensure_future(b.acquire(time.monotonic() + 5))
    await asyncio.sleep(0)
    assert b.waiting == 1 and not b.spare
    await waiter


# ---------------------------------------------------------------- the client quota as a unit


def test_unit_client_quota_burst_refill_and_bound() -> None:
    clock = Clock()
    quota = ClientQuota(5, max_clients=3, clock=clock.mono)
    assert [quota.charge("a") for _ in range(5)] == [0.0] * 5  # one second's worth
    assert quota.charge("a") == pytest.approx(0.2)  # the next call is due in 1/rate
    clock.advance(0.2)
    assert quota.charge("a") == 0.0
    assert quota.charge("a") == pytest.approx(0.2)
    assert quota.charge("b") == 0.0  # its own bucket
    slow = ClientQuota(0.5, clock=clock.mono)
    assert slow.charge("c") == 0.0
    assert slow.charge("c") == pytest.approx(2.0)  # below 1/s: a burst of one
    for client in ("c", "d", "e"):
        quota.charge(client)
    assert len(quota) == 3  # "a" (least recently charged) made room, forgiven
    assert quota.charge("a") == 0.0
    assert not gc.is_tracked(quota._due)  # str -> float: nothing for the collector to walk


# ---------------------------------------------------------------- the cache as a unit


class _Now:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cache(clock: Callable[[], float], max_entries: int = 10) -> VerdictCache:
    return VerdictCache(max_entries, 5, 5.0, clock=clock, wall=lambda: 1_700_000_000.0)


def test_unit_an_entry_is_offered_for_refresh_only_in_its_window_and_claimed_once() -> None:
    now = _Now()
    cache = _cache(now)
    key, verdict = token_key("t"), Active("a", "1", (), "", 2e9)
    cache.put_active(key, verdict, 10.0, ahead=0.1)
    now.now += 8.9
    assert cache.get(key) == verdict and not cache.due
    now.now += 0.2  # 9.1 s: inside the last 10%
    assert cache.get(key) == verdict and cache.due  # served, and offered for a refresh
    cache.due = False
    assert cache.claim_refresh(key)
    assert not cache.claim_refresh(key)  # once per entry
    assert cache.get(key) == verdict and not cache.due  # claimed: an ordinary hit again
    cache.put_active(key, verdict, 10.0, ahead=0.1)  # the refreshed verdict
    now.now += 9.5
    assert cache.get(key) == verdict and cache.due
    cache.due = False
    cache.put_active(token_key("u"), verdict, 10.0)  # no `ahead`: never due
    now.now += 9.9
    assert cache.get(token_key("u")) == verdict and not cache.due


def test_unit_expired_and_evicted_active_keys_are_remembered_as_known() -> None:
    now = _Now()
    cache = _cache(now, max_entries=2)
    verdict = Active("a", "1", (), "", 2e9)
    cache.put_active(token_key("expires"), verdict, 1.0)
    now.now += 2
    assert cache.get(token_key("expires")) is None
    assert cache.was_active(token_key("expires"))
    for name in ("b", "c", "d"):
        cache.put_active(token_key(name), verdict, 60.0)
    assert cache.get(token_key("b")) is None and cache.was_active(token_key("b"))  # evicted
    assert not cache.was_active(token_key("never-seen"))
    cache.put_negative(token_key("expires"), Inactive("UNAUTHORIZED", "Bearer"))
    assert not cache.was_active(token_key("expires"))  # revoked: not a known user any more
    assert len(cache._lapsed) <= 2  # bounded like the entries
    assert not gc.is_tracked(cache._lapsed)  # and costs the garbage collector nothing


# ---------------------------------------------------------------- refresh-ahead


async def test_refresh_ahead_renews_an_entry_used_in_its_last_part_of_life(
    emulator: Emulator, upstream: str, start_gateway: StartGateway
) -> None:
    emulator.add_token("steady-user")
    gw = await start_gateway(routes(upstream), cache={"ttl": 2.0, "refresh_ahead": 0.25})
    assert (await ask(gw, "steady-user"))[0].status == 200
    started = time.monotonic()  # just after the entry was made
    await asyncio.sleep(max(0.0, started + 1.7 - time.monotonic()))  # in the last 25%
    answer, elapsed = await ask(gw, "steady-user")
    assert answer.status == 200 and elapsed < 0.5
    await wait_until(lambda: emulator.calls_for("steady-user") == 2, 2.0, "the refresh")
    assert metric(gw, "gateway_cache_refreshes_total", result="active") == 1
    await asyncio.sleep(max(0.0, started + 2.3 - time.monotonic()))  # the first entry's end
    assert (await ask(gw, "steady-user"))[0].status == 200
    assert emulator.calls_for("steady-user") == 2  # a hit: the refreshed entry
    assert metric(gw, "gateway_cache_requests_total", result="miss") == 1
    assert metric(gw, "gateway_cache_requests_total", result="hit") == 2


async def test_refresh_ahead_drops_a_revoked_token_before_its_entry_ends(
    emulator: Emulator, upstream: str, start_gateway: StartGateway
) -> None:
    emulator.add_token("revoked-user")
    gw = await start_gateway(routes(upstream), cache={"ttl": 2.0, "refresh_ahead": 0.25})
    assert (await ask(gw, "revoked-user"))[0].status == 200
    emulator.revoke("revoked-user")
    await asyncio.sleep(1.7)
    assert (await ask(gw, "revoked-user"))[0].status == 200  # the entry still serves...
    await wait_until(lambda: emulator.calls_for("revoked-user") == 2, 2.0, "the refresh")
    await wait_until(
        lambda: metric(gw, "gateway_cache_refreshes_total", result="inactive") == 1, 2.0, "it"
    )
    answer, _ = await ask(gw, "revoked-user")  # ...until the refresh said inactive
    assert answer.status == 401
    assert emulator.calls_for("revoked-user") == 2


async def test_no_refresh_ahead_when_the_budget_is_short(
    emulator: Emulator, upstream: str, start_gateway: StartGateway
) -> None:
    tokens = ["short-user", "other-0", "other-1", "other-2"]
    for token in tokens:
        emulator.add_token(token)
    gw = await start_gateway(
        routes(upstream),
        authlete={"rate_limit": {"rate": 0.2, "burst": 4}},
        cache={"ttl": 1.0, "refresh_ahead": 0.3},
    )
    for token in tokens:  # the bucket: 4 -> 0 (0.2/s refills about 0.2 by the window)
        assert (await ask(gw, token))[0].status == 200
        if token == "short-user":
            started = time.monotonic()  # just after its entry was made
    await asyncio.sleep(max(0.0, started + 0.8 - time.monotonic()))  # in the last 30%
    assert (await ask(gw, "short-user"))[0].status == 200  # a hit in the window
    await asyncio.sleep(0.3)
    assert emulator.calls_for("short-user") == 1  # no refresh: no spare budget
    assert metric(gw, "gateway_cache_refreshes_total", result="active") == 0


# ---------------------------------------------------------------- token_pattern


async def test_a_token_outside_token_pattern_is_401_without_a_call(
    emulator: Emulator, upstream: str, start_gateway: StartGateway
) -> None:
    emulator.add_token("tok-1234")
    gw = await start_gateway(routes(upstream), authlete={"token_pattern": "tok-[0-9]{4}"})
    for token in ("random-garbage", "tok-12345", "xtok-1234", "tok-123"):  # fullmatch only
        answer, _ = await ask(gw, token)
        assert answer.status == 401, (token, answer.body)
        challenge = answer.header("WWW-Authenticate")
        assert challenge is not None and 'error="invalid_token"' in challenge
    assert emulator.calls == 0
    assert (await ask(gw, "tok-1234"))[0].status == 200
    assert emulator.calls == 1


# ---------------------------------------------------------------- reload


async def test_reload_applies_quota_pattern_and_refresh_settings(
    tmp_path: Path, emulator: Emulator, upstream: str, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(routes(upstream))
    for _ in range(3):
        assert (await ask(gw, random_token()))[0].status == 401  # no quota, no pattern
    path = tmp_path / "gateway.yaml"
    raw = raw_config(
        emulator.base_url,
        routes(upstream),
        authlete={"rate_limit": {"per_client": 1}, "token_pattern": "spray-[0-9a-f]{24}"},
        cache={"refresh_ahead": 0},
    )
    path.write_text(yaml.safe_dump(raw))
    assert gw.gateway.reload(str(path))
    calls = emulator.calls
    assert (await ask(gw, "not-the-format"))[0].status == 401
    assert emulator.calls == calls  # the pattern refused it
    assert (await ask(gw, random_token()))[0].status == 401
    assert (await ask(gw, random_token()))[0].status == 503  # the quota, now 1/s
    assert gw.gateway.verdicts._cfg.refresh_ahead == 0
