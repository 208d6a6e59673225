"""The Authlete call budget: the token bucket, learning from rate-limit headers, 429 pauses,
retries, the circuit breaker, stale-if-error serving and readiness.

End to end on real loopback sockets (emulator -> gateway -> echo upstream), plus unit tests
of `gateway.budget.Budget` driven with fake clocks for the learning rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from multidict import CIMultiDict

from gateway.budget import BreakerState, Budget, CallFailed, Reply, TransportError
from gateway.emulator import Emulator, Override
from tests.conftest import (
    Clock,
    Running,
    StartGateway,
    bearer,
    budget,
    metric,
    routes,
    wait_until,
)

# ---------------------------------------------------------------- helpers


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    elapsed: float


async def fetch(
    client: aiohttp.ClientSession, gw: Running, token: str, timeout: float = 30.0
) -> Answer:
    started = time.monotonic()
    async with client.get(
        f"{gw.url}/api/resource",
        headers=bearer(token),
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as resp:
        body = await resp.read()
        return Answer(resp.status, resp.headers.copy(), body, time.monotonic() - started)


def assert_unavailable(answer: Answer) -> None:
    """503 with a Retry-After of whole seconds and a short JSON body."""
    assert answer.status == 503, (answer.status, answer.body)
    retry = answer.headers.get("Retry-After")
    assert retry is not None and retry.isdigit() and int(retry) >= 1, retry
    assert len(answer.body) < 512
    doc = json.loads(answer.body)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str)


async def scrape(client: aiohttp.ClientSession, gw: Running) -> dict[str, float]:
    async with client.get(f"{gw.admin_url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def readyz(client: aiohttp.ClientSession, gw: Running) -> tuple[int, dict[str, Any]]:
    async with client.get(f"{gw.admin_url}/readyz") as resp:
        doc: dict[str, Any] = await resp.json()
        return resp.status, doc


async def wait_ready(client: aiohttp.ClientSession, gw: Running, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status, doc = await readyz(client, gw)
        if status == 200:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz still {status}: {doc}")
        await asyncio.sleep(0.05)


def add_tokens(emulator: Emulator, *tokens: str, lifetime: float = 3600.0) -> None:
    for token in tokens:
        emulator.add_token(token, lifetime=lifetime)


def access_lines(out: str) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for line in out.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


class Counter:
    """A TCP listener that counts connections and closes each at once (no HTTP answer)."""

    def __init__(self) -> None:
        self.accepts = 0
        self.server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        return int(self.server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts += 1
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


def state_of(b: Budget) -> BreakerState:
    return b.state  # read afresh: the state changes under mypy's narrowing


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


# ---------------------------------------------------------------- 1. a burst of fresh tokens


async def test_burst_of_1000_fresh_tokens_never_overruns_authlete(
    emulator: Emulator, upstream: str, start_gateway: StartGateway
) -> None:
    emulator.rate_limit = (50, 50)
    tokens = [f"burst-{i}" for i in range(1000)]
    add_tokens(emulator, *tokens)
    max_wait = 1.0
    gw = await start_gateway(
        routes(upstream),
        authlete={"rate_limit": {"rate": 50, "burst": 50, "max_wait": max_wait}},
    )
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, gw.gateway.verdicts.inflight)
            await asyncio.sleep(0.005)

    sampler = asyncio.ensure_future(watch())
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        answers = await asyncio.gather(*(fetch(session, gw, t) for t in tokens))
    done.set()
    await sampler

    ok = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status != 200]
    for answer in refused:
        assert_unavailable(answer)
    assert len(ok) >= 50  # the burst itself
    assert refused, "1000 calls cannot fit in max_wait at 50/s"
    # The requests really were in the gateway at the same time.
    assert peak >= 500, f"only {peak} requests were waiting at once"
    assert metric(gw, "gateway_authlete_budget_rejected_total", reason="wait_timeout") >= 1
    assert metric(gw, "gateway_authlete_budget_wait_seconds_count") >= len(refused)
    assert 0 <= metric(gw, "gateway_authlete_budget_tokens") <= 50
    # Every 200 was one call (a 429 is retried), every 503 at most one.
    assert len(ok) <= emulator.calls - emulator.throttled
    assert emulator.max_calls_per_token <= (2 if emulator.throttled else 1)

    # The headline: Authlete never had to refuse a call...
    first = emulator.call_times[0]
    early = sum(1 for t in emulator.call_times if t < first + 0.1)
    assert emulator.throttled == 0, (
        f"Authlete answered {emulator.throttled} calls with 429; "
        f"{early} calls reached it within 100 ms of the first (limit: 50 + 5)"
    )
    assert metric(gw, "gateway_authlete_throttled_total") == 0
    # ...and nobody waited longer than max_wait plus one call.
    slowest = max(a.elapsed for a in answers)
    assert slowest <= max_wait + 1.5, f"a request took {slowest:.2f}s"


# ---------------------------------------------------------------- 2. 429 pauses every call


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_429_pauses_every_call_until_retry_after(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    form: str,
) -> None:
    tokens = [f"pause-{i}" for i in range(6)]
    add_tokens(emulator, *tokens)
    gw = await start_gateway(
        routes(upstream),
        authlete={"rate_limit": {"rate": 100, "burst": 200, "max_wait": 3.5}},
    )
    if form == "seconds":
        retry_after = "2"
        resume: float | None = None
    else:
        target = math.ceil(time.time()) + 2  # 2 to 3 s from now, whole seconds
        resume = time.monotonic() + (target - time.time())
        retry_after = email.utils.formatdate(target, usegmt=True)
    emulator.override = Override(status=429, headers={"Retry-After": retry_after}, count=1)

    first = asyncio.ensure_future(fetch(client, gw, tokens[0]))
    await wait_until(
        lambda: metric(gw, "gateway_authlete_throttled_total") == 1, 2.0, "the 429 to arrive"
    )
    others = await asyncio.gather(*(fetch(client, gw, t) for t in tokens[1:]))
    answers = [await first, *others]
    assert [a.status for a in answers] == [200] * 6  # calls resumed after the pause

    throttled_at = emulator.call_times[0]
    after = emulator.call_times[1:]
    assert len(after) == 6  # the five waiting ones and the retry of the throttled call
    gap = min(after) - throttled_at
    assert gap >= 1.9, f"Authlete was called again {gap:.2f}s after a 429 asking for 2 s"
    if resume is not None:
        assert min(after) >= resume - 0.05
    assert emulator.calls_for(tokens[0]) == 2  # the throttled call was retried
    assert metric(gw, "gateway_authlete_throttled_total") == 1
    assert metric(gw, "gateway_introspection_requests_total", outcome="throttled") == 1
    assert metric(gw, "gateway_introspection_requests_total", outcome="ok") == 6


async def test_throttled_call_is_retried_when_its_deadline_allows_past_max_wait(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    """authlete.deadline (5 s) decides whether the call that got the 429 is retried after
    the pause, not max_wait (1 s): a request that already made its call is not a new
    request waiting for a token."""
    add_tokens(emulator, "retried-429")
    gw = await start_gateway(routes(upstream))  # defaults: max_wait 1, deadline 5
    emulator.override = Override(status=429, headers={"Retry-After": "2"}, count=1)
    answer = await fetch(client, gw, "retried-429")
    assert answer.status == 200, (answer.status, answer.body, answer.elapsed)
    assert emulator.calls_for("retried-429") == 2
    assert emulator.call_times[1] - emulator.call_times[0] >= 1.9


async def test_429_beyond_the_deadline_is_503_with_its_retry_after(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    add_tokens(emulator, "late-429", "after-429")
    gw = await start_gateway(routes(upstream), authlete={"rate_limit": {"max_wait": 0.2}})
    emulator.override = Override(status=429, headers={"Retry-After": "30"}, count=1)
    answer = await fetch(client, gw, "late-429")
    assert_unavailable(answer)
    assert int(answer.headers["Retry-After"]) >= 25
    assert emulator.calls_for("late-429") == 1  # no retry: it could not happen in time
    # The pause holds for everyone: the next miss is refused without a call.
    answer = await fetch(client, gw, "after-429")
    assert_unavailable(answer)
    assert emulator.calls_for("after-429") == 0


# ---------------------------------------------------------------- 3. Remaining / Reset


@pytest.mark.parametrize("form", ["delta", "epoch"])
async def test_spent_budget_headers_stop_calls_until_reset(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    form: str,
) -> None:
    tokens = [f"spent-{form}-{i}" for i in range(5)]
    add_tokens(emulator, *tokens)
    gw = await start_gateway(
        routes(upstream), authlete={"rate_limit": {"rate": 100, "burst": 200, "max_wait": 4}}
    )
    if form == "delta":
        reset = "2"
        resume: float | None = None
    else:
        epoch = int(time.time()) + 2  # 1 to 2 s from now
        resume = time.monotonic() + (epoch - time.time())
        reset = str(epoch)
    emulator.override = Override(
        headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset}, count=1
    )
    assert (await fetch(client, gw, tokens[0])).status == 200
    answers = await asyncio.gather(*(fetch(client, gw, t) for t in tokens[1:]))
    assert [a.status for a in answers] == [200] * 4
    assert len(emulator.call_times) == 5
    gap = emulator.call_times[1] - emulator.call_times[0]
    if resume is None:
        assert gap >= 1.9, f"called {gap:.2f}s after 'Remaining: 0, Reset: 2'"
    else:
        early = resume - emulator.call_times[1]
        assert early <= 0.1, f"called {early:.2f}s before the Reset epoch"
    assert metric(gw, "gateway_authlete_throttled_total") == 0


async def test_real_rate_limit_headers_keep_the_gateway_under_the_limit(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    """The emulator's own limiter (2/s, burst 2, epoch Reset) against a gateway configured
    for far more: what the answers say keeps the gateway from ever meeting a 429."""
    emulator.rate_limit = (2, 2)
    emulator.reset_form = "epoch"
    tokens = [f"real-{i}" for i in range(4)]
    add_tokens(emulator, *tokens)
    gw = await start_gateway(
        routes(upstream), authlete={"rate_limit": {"rate": 100, "burst": 200, "max_wait": 3}}
    )
    for token in tokens:
        assert (await fetch(client, gw, token)).status == 200
    assert emulator.throttled == 0
    assert gw.gateway.budget.rate == 2  # X-RateLimit-Limit: 2
    assert emulator.call_times[2] - emulator.call_times[1] >= 0.45


GARBLED = [
    {"X-RateLimit-Remaining": "abc", "X-RateLimit-Reset": "2"},
    {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "abc"},
    {"X-RateLimit-Remaining": "-1", "X-RateLimit-Reset": "2"},
    {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "-1"},
    {"X-RateLimit-Remaining": "nan", "X-RateLimit-Reset": "2"},
    {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "nan"},
    {"X-RateLimit-Remaining": "", "X-RateLimit-Reset": "2"},
    {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": ""},
    {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "inf"},
    {"X-RateLimit-Limit": "abc"},
    {"X-RateLimit-Limit": "-1"},
    {"X-RateLimit-Limit": "nan"},
    {"X-RateLimit-Limit": ""},
    {"X-RateLimit-Limit": "0"},
]


def _garbled_id(headers: dict[str, str]) -> str:
    return ",".join(f"{k.rsplit('-', 1)[-1]}={v!r}" for k, v in headers.items())


@pytest.mark.parametrize("headers", GARBLED, ids=[_garbled_id(h) for h in GARBLED])
async def test_garbled_rate_limit_headers_change_nothing(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    headers: dict[str, str],
) -> None:
    tokens = [f"garbled-{i}" for i in range(6)]
    add_tokens(emulator, *tokens)
    # A tiny max_wait: any pause learnt from garbage turns the next requests into 503s.
    gw = await start_gateway(
        routes(upstream), authlete={"rate_limit": {"rate": 100, "burst": 200, "max_wait": 0.05}}
    )
    emulator.override = Override(headers=headers, count=1)
    assert (await fetch(client, gw, tokens[0])).status == 200  # never fatal
    answers = await asyncio.gather(*(fetch(client, gw, t) for t in tokens[1:]))
    assert [a.status for a in answers] == [200] * 5
    assert emulator.calls == 6
    assert gw.gateway.budget.rate == 100
    assert gw.gateway.budget.tokens > 190


async def test_lower_ratelimit_limit_lowers_the_rate(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    tokens = [f"limit-{i}" for i in range(4)]
    add_tokens(emulator, *tokens)
    gw = await start_gateway(
        routes(upstream), authlete={"rate_limit": {"rate": 50, "burst": 1, "max_wait": 1}}
    )
    emulator.override = Override(headers={"X-RateLimit-Limit": "5"}, count=1)
    for token in tokens:
        assert (await fetch(client, gw, token)).status == 200
    assert gw.gateway.budget.rate == 5
    times = emulator.call_times
    # At the configured 50/s the calls would be ~20 ms apart; at 5/s they are 200 ms apart.
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]
    assert all(g >= 0.15 for g in gaps), gaps


# ---------------------------------------------------------------- 4. the circuit breaker


async def test_breaker_opens_fails_fast_and_recovers_without_client_traffic(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    add_tokens(emulator, "cached", "after-outage")
    gw = await start_gateway(
        routes(upstream),
        authlete={"retries": 0, "timeout": 0.5, "circuit_breaker": {"failures": 3, "cooldown": 2}},
    )
    assert (await fetch(client, gw, "cached")).status == 200
    metrics = await scrape(client, gw)
    assert metrics["gateway_authlete_breaker_state"] == 0
    assert (await readyz(client, gw))[0] == 200

    port = port_of(emulator.base_url)
    await emulator.stop()
    listener = Counter()
    await listener.start(port)  # Authlete "down": connections are accepted and dropped
    try:
        for i in range(3):
            assert state_of(gw.gateway.budget) is BreakerState.CLOSED  # not before 3 failures
            assert_unavailable(await fetch(client, gw, f"down-{i}"))
        assert listener.accepts >= 3  # those failures really were calls
        assert state_of(gw.gateway.budget) is BreakerState.OPEN
        metrics = await scrape(client, gw)
        assert metrics["gateway_authlete_breaker_state"] == 1

        # Open: misses fail fast without touching the network.
        before = listener.accepts
        open_key = 'gateway_authlete_budget_rejected_total{reason="breaker_open"}'
        rejected = metrics.get(open_key, 0.0)
        for i in range(5):
            answer = await fetch(client, gw, f"fast-{i}")
            assert_unavailable(answer)
            assert answer.elapsed < 0.5
        assert listener.accepts == before
        metrics = await scrape(client, gw)
        assert metrics[open_key] >= rejected + 5
        # Cached verdicts are served throughout.
        assert (await fetch(client, gw, "cached")).status == 200
        status, doc = await readyz(client, gw)
        assert status == 503
        assert any("breaker" in p for p in doc["problems"]), doc
    finally:
        await listener.stop()

    await emulator.start("127.0.0.1", port)
    calls = emulator.calls
    # No client traffic: the background probe alone brings readiness back.
    await wait_ready(client, gw, timeout=6.0)
    assert emulator.calls > calls
    metrics = await scrape(client, gw)
    assert metrics["gateway_authlete_breaker_state"] == 0
    assert (await fetch(client, gw, "after-outage")).status == 200
    assert (await fetch(client, gw, "cached")).status == 200


# ---------------------------------------------------------------- 5. stale-if-error


STALE_MODES: dict[str, dict[str, Any]] = {
    # how Authlete fails -> gateway config for it
    "http_500": {},
    "throttled": {},
    "unreachable": {},
    "no_budget": {"rate_limit": {"rate": 1, "burst": 1, "max_wait": 0.2}},
    "breaker_open": {"circuit_breaker": {"failures": 1, "cooldown": 30}},
}


async def _break_authlete(
    emulator: Emulator, client: aiohttp.ClientSession, gw: Running, how: str
) -> None:
    if how == "http_500":
        emulator.override = Override(status=500)
    elif how == "throttled":
        emulator.override = Override(status=429, headers={"Retry-After": "30"})
    elif how == "unreachable":
        await emulator.stop()
    elif how == "breaker_open":
        emulator.override = Override(status=500, count=1)
        assert_unavailable(await fetch(client, gw, "opens-the-breaker"))
        assert state_of(gw.gateway.budget) is BreakerState.OPEN
    # no_budget: the first call spent the only token; the next is due in a second


@pytest.mark.parametrize("stale", [5.0, 0.0], ids=["stale-on", "stale-off"])
@pytest.mark.parametrize("how", list(STALE_MODES))
async def test_stale_if_error(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
    how: str,
    stale: float,
) -> None:
    add_tokens(emulator, "stale-tok")
    authlete: dict[str, Any] = {"retries": 0, "timeout": 0.5, "rate_limit": {"max_wait": 0.2}}
    gw = await start_gateway(
        routes(upstream),
        cache={"ttl": 0.2, "stale_if_error": stale},
        authlete={**authlete, **STALE_MODES[how]},
    )
    assert (await fetch(client, gw, "stale-tok")).status == 200
    await asyncio.sleep(0.3)  # the TTL has passed
    await _break_authlete(emulator, client, gw, how)
    answer = await fetch(client, gw, "stale-tok")
    # A known token without a stale entry to fall back on waits for budget past max_wait
    # (up to authlete.deadline): here the next token comes within a second.
    waited = how == "no_budget" and not stale
    asked = how in ("http_500", "throttled") or waited
    assert emulator.calls_for("stale-tok") == (2 if asked else 1)
    expected = 3 if how == "breaker_open" else 2
    lines: list[tuple[int, str | None]] = []
    deadline = time.monotonic() + 2
    while len(lines) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the access log is flushed every 100 ms
        lines += [
            (line["status"], line["cache"])
            for line in access_lines(capsys.readouterr().out)
            if line.get("path") == "/api/resource"
        ]
    assert len(lines) == expected, lines
    if stale:
        assert answer.status == 200, (answer.status, answer.body)
        assert metric(gw, "gateway_cache_requests_total", result="stale") == 1
        assert lines[0] == (200, "miss") and lines[-1] == (200, "stale"), lines
    elif waited:
        assert answer.status == 200, (answer.status, answer.body)
        assert lines[-1] == (200, "miss"), lines
    else:
        assert_unavailable(answer)
        assert metric(gw, "gateway_cache_requests_total", result="stale") == 0
        assert lines[-1] == (503, "miss"), lines


async def test_stale_window_is_bounded(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    add_tokens(emulator, "window-tok")
    gw = await start_gateway(
        routes(upstream), cache={"ttl": 0.2, "stale_if_error": 0.4}, authlete={"retries": 0}
    )
    assert (await fetch(client, gw, "window-tok")).status == 200
    emulator.override = Override(status=500)
    await asyncio.sleep(0.8)  # TTL + stale window have both passed
    assert_unavailable(await fetch(client, gw, "window-tok"))


async def test_stale_never_outlives_the_tokens_expiry(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    added = time.monotonic()
    add_tokens(emulator, "short-lived", lifetime=1.5)
    gw = await start_gateway(
        routes(upstream), cache={"ttl": 0.3, "stale_if_error": 30}, authlete={"retries": 0}
    )
    assert (await fetch(client, gw, "short-lived")).status == 200
    await asyncio.sleep(0.45)
    emulator.override = Override(status=500)
    answer = await fetch(client, gw, "short-lived")
    assert answer.status == 200  # stale, and the token itself is still valid
    await asyncio.sleep(max(0.0, added + 1.7 - time.monotonic()))  # now it has expired
    answer = await fetch(client, gw, "short-lived")
    assert_unavailable(answer)
    assert metric(gw, "gateway_cache_requests_total", result="stale") == 1


@pytest.mark.parametrize("negative_ttl", [0.3, 0.0])
async def test_a_token_authlete_called_unauthorized_is_never_served_stale(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    negative_ttl: float,
) -> None:
    add_tokens(emulator, "revoked-tok")
    gw = await start_gateway(
        routes(upstream),
        cache={"ttl": 0.3, "stale_if_error": 30, "negative_ttl": negative_ttl},
        authlete={"retries": 0},
    )
    assert (await fetch(client, gw, "revoked-tok")).status == 200  # cached active
    emulator.revoke("revoked-tok")
    await asyncio.sleep(0.4)
    assert (await fetch(client, gw, "revoked-tok")).status == 401  # Authlete: UNAUTHORIZED
    await asyncio.sleep(0.4)  # any negative entry has expired too
    emulator.override = Override(status=500)
    answer = await fetch(client, gw, "revoked-tok")
    assert answer.status in (401, 503), "a revoked token was let through from the stale cache"
    assert metric(gw, "gateway_cache_requests_total", result="stale") == 0


async def test_unknown_token_is_never_served_stale(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        routes(upstream),
        cache={"ttl": 0.3, "stale_if_error": 30, "negative_ttl": 0.2},
        authlete={"retries": 0},
    )
    assert (await fetch(client, gw, "never-known")).status == 401
    await asyncio.sleep(0.3)
    emulator.override = Override(status=500)
    answer = await fetch(client, gw, "never-known")
    assert answer.status in (401, 503)
    assert metric(gw, "gateway_cache_requests_total", result="stale") == 0


# ---------------------------------------------------------------- 6. retries


@pytest.mark.parametrize("status", [400, 403, 404])
async def test_4xx_is_not_retried(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    status: int,
) -> None:
    add_tokens(emulator, "four-xx")
    gw = await start_gateway(routes(upstream), authlete={"retries": 2})
    emulator.override = Override(status=status)
    assert_unavailable(await fetch(client, gw, "four-xx"))
    assert emulator.calls_for("four-xx") == 1
    assert metric(gw, "gateway_authlete_retries_total") == 0


@pytest.mark.parametrize(("status", "retries"), [(500, 2), (502, 1), (503, 0), (504, 3)])
async def test_5xx_is_retried_up_to_retries(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    status: int,
    retries: int,
) -> None:
    add_tokens(emulator, "five-xx")
    gw = await start_gateway(routes(upstream), authlete={"retries": retries})
    emulator.override = Override(status=status)
    assert_unavailable(await fetch(client, gw, "five-xx"))
    assert emulator.calls_for("five-xx") == 1 + retries
    gaps = [b - a for a, b in itertools.pairwise(emulator.call_times)]
    assert all(g >= 0.04 for g in gaps), f"retried without backoff: {gaps}"
    assert metric(gw, "gateway_authlete_retries_total") == retries
    assert metric(gw, "gateway_introspection_requests_total", outcome="error") == 1 + retries


async def test_5xx_then_success_is_a_200(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    add_tokens(emulator, "flaky")
    gw = await start_gateway(routes(upstream), authlete={"retries": 2})
    emulator.override = Override(status=502, count=2)
    assert (await fetch(client, gw, "flaky")).status == 200
    assert emulator.calls_for("flaky") == 3
    assert metric(gw, "gateway_authlete_retries_total") == 2


async def test_connection_errors_are_retried(
    upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    listener = Counter()
    port = await listener.start()
    try:
        gw = await start_gateway(
            routes(upstream), authlete_url=f"http://127.0.0.1:{port}", authlete={"retries": 2}
        )
        assert_unavailable(await fetch(client, gw, "conn-err"))
    finally:
        await listener.stop()
    assert listener.accepts == 3
    assert metric(gw, "gateway_authlete_retries_total") == 2


async def test_retries_stay_within_the_deadline(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    add_tokens(emulator, "slow")
    emulator.override = Override(delay=1.0)
    gw = await start_gateway(
        routes(upstream), authlete={"timeout": 0.5, "retries": 2, "deadline": 0.6}
    )
    # Without the deadline: three 0.5 s timeouts plus backoff, over 1.6 s.
    answer = await fetch(client, gw, "slow")
    assert_unavailable(answer)
    assert answer.elapsed < 1.3, answer.elapsed
    assert emulator.calls_for("slow") <= 2


# ---------------------------------------------------------------- 6. credentials, readiness


async def test_rejected_gateway_credentials(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    add_tokens(emulator, "cred-tok")
    gw = await start_gateway(
        routes(upstream),
        authlete={"access_token": "not-the-service-token", "circuit_breaker": {"cooldown": 1}},
    )
    for i in range(3):
        assert_unavailable(await fetch(client, gw, f"cred-{i}"))
    answers = await asyncio.gather(*(fetch(client, gw, "cred-tok") for _ in range(5)))
    for answer in answers:
        assert_unavailable(answer)
    status, doc = await readyz(client, gw)
    assert status == 503
    assert any("access token" in p for p in doc["problems"]), doc
    errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and "access token" in r.getMessage()
    ]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert emulator.calls >= 4  # each was a real call answered 401, not a cached failure
    # Breaker untouched: Authlete answered.
    assert state_of(gw.gateway.budget) is BreakerState.CLOSED

    emulator.access_token = "not-the-service-token"  # the operator fixes the credentials
    await wait_ready(client, gw, timeout=5.0)
    assert (await fetch(client, gw, "cred-tok")).status == 200


# ---------------------------------------------------------------- 6. queueing


async def test_waiters_for_one_token_share_one_queued_call(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    add_tokens(emulator, "co-first", "co-shared")
    gw = await start_gateway(
        routes(upstream), authlete={"rate_limit": {"rate": 2, "burst": 1, "max_wait": 2}}
    )
    assert (await fetch(client, gw, "co-first")).status == 200  # the bucket is empty now
    answers = await asyncio.gather(*(fetch(client, gw, "co-shared") for _ in range(50)))
    assert [a.status for a in answers] == [200] * 50
    assert emulator.calls_for("co-shared") == 1
    assert metric(gw, "gateway_introspection_coalesced_total") == 49
    assert metric(gw, "gateway_authlete_budget_wait_seconds_count") >= 1  # it did wait


async def test_a_client_that_goes_away_gives_its_place_up(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    add_tokens(emulator, "gone-first", "gone-away", "gone-next")
    gw = await start_gateway(
        routes(upstream), authlete={"rate_limit": {"rate": 2, "burst": 1, "max_wait": 3}}
    )
    assert (await fetch(client, gw, "gone-first")).status == 200
    spent_at = emulator.call_times[-1]  # the next token is due half a second after this
    with pytest.raises(TimeoutError):
        await fetch(client, gw, "gone-away", timeout=0.15)
    assert (await fetch(client, gw, "gone-next")).status == 200
    # Had "gone-away" kept its place it would have been called about half a second after
    # the first call (and "gone-next" half a second later).
    await asyncio.sleep(max(0.0, spent_at + 1.3 - time.monotonic()))
    assert emulator.calls_for("gone-away") == 0
    assert emulator.calls_for("gone-next") == 1


async def test_cache_hits_never_wait_for_the_budget(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    add_tokens(emulator, "hit-tok", "pause-tok", "blocked-tok")
    gw = await start_gateway(
        routes(upstream), authlete={"rate_limit": {"rate": 1, "burst": 2, "max_wait": 0.5}}
    )
    assert (await fetch(client, gw, "hit-tok")).status == 200  # one token left
    for _ in range(20):
        assert (await fetch(client, gw, "hit-tok")).status == 200  # hits take none
    emulator.override = Override(status=429, headers={"Retry-After": "30"}, count=1)
    assert_unavailable(await fetch(client, gw, "pause-tok"))  # bucket spent, 30 s pause
    assert emulator.calls_for("pause-tok") == 1  # the hits had left it its token
    assert_unavailable(await fetch(client, gw, "blocked-tok"))
    assert emulator.calls_for("blocked-tok") == 0  # the pause holds
    answers = await asyncio.gather(*(fetch(client, gw, "hit-tok") for _ in range(20)))
    assert [a.status for a in answers] == [200] * 20
    assert max(a.elapsed for a in answers) < 1.0
    assert emulator.calls_for("hit-tok") == 1


# ---------------------------------------------------------------- unit: Budget


def sample(b: Budget, name: str, **labels: str) -> float:
    value = b._metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.mark.parametrize("form", ["delta", "epoch"])
async def test_unit_remaining_caps_tokens_until_reset(form: str) -> None:
    clock = Clock()
    b = budget(clock)
    assert b.tokens == 200
    reset = "10" if form == "delta" else str(int(clock.epoch) + 10)
    b.learn({"X-RateLimit-Remaining": "3", "X-RateLimit-Reset": reset})
    assert b.tokens == 3
    for _ in range(3):
        await b.acquire(clock.mono() + 5)
    assert b.tokens == 0
    clock.advance(9.9)
    assert b.tokens == 0
    clock.advance(0.1)
    assert b.tokens == 200


def test_unit_reset_threshold_between_delta_and_epoch() -> None:
    clock = Clock()
    b = budget(clock)
    # Above 10^9: an epoch timestamp, here in the past: the cap lapses at once.
    b.learn({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(10**9 + 1)})
    assert b.tokens == 200
    # Not above: seconds from now (a long time).
    b.learn({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(10**9)})
    assert b.tokens == 0
    clock.advance(60)
    assert b.tokens == 0
    # A fractional epoch value works too.
    b.learn({"X-RateLimit-Remaining": "1", "X-RateLimit-Reset": f"{clock.epoch + 2.5:.3f}"})
    assert b.tokens == 1
    clock.advance(2.4)
    assert b.tokens == 1
    clock.advance(0.2)
    assert b.tokens == 200


@pytest.mark.parametrize("headers", GARBLED, ids=[_garbled_id(h) for h in GARBLED])
def test_unit_garbled_headers_are_ignored(headers: dict[str, str]) -> None:
    clock = Clock()
    b = budget(clock)
    b.learn(headers)
    assert b.tokens == 200
    assert b.rate == 100


def test_unit_ratelimit_limit_only_lowers_the_rate() -> None:
    b = budget(Clock())
    b.learn({"X-RateLimit-Limit": "20"})
    assert b.rate == 20
    b.learn({"X-RateLimit-Limit": "1000"})
    assert b.rate == 100  # never above the configured rate
    b.learn({"X-RateLimit-Limit": "100"})
    assert b.rate == 100


def test_unit_429_pause_sources() -> None:
    clock = Clock()
    b = budget(clock)
    assert b.throttled({"Retry-After": "3"}) == pytest.approx(3)
    clock.advance(3)
    date = email.utils.formatdate(clock.epoch + 7, usegmt=True)
    assert b.throttled({"Retry-After": date}) == pytest.approx(7)
    clock.advance(7)
    # Retry-After garbled: the Reset time, in either form.
    assert b.throttled({"Retry-After": "soon", "X-RateLimit-Reset": "4"}) == pytest.approx(4)
    clock.advance(4)
    reset = str(int(clock.epoch) + 6)
    assert b.throttled({"X-RateLimit-Reset": reset}) == pytest.approx(6)
    clock.advance(6)
    assert sample(b, "gateway_authlete_throttled_total") == 4


def test_unit_429_backoff_without_hints_doubles_from_1s_up_to_30s() -> None:
    clock = Clock()
    b = budget(clock, jitter=0.999999)
    pauses = []
    for _ in range(8):
        pause = b.throttled({"Retry-After": "garbage", "X-RateLimit-Reset": "-3"})
        pauses.append(pause)
        clock.advance(pause)
    assert pauses == pytest.approx([1, 2, 4, 8, 16, 30, 30, 30], rel=1e-3)
    low = budget(Clock(), jitter=0.0).throttled({})
    assert 0 < low <= 1.0


async def test_unit_429_pauses_every_acquire() -> None:
    b = budget(rate_limit={"max_wait": 2})
    b.throttled({"Retry-After": "0.3"})
    started = time.monotonic()
    await asyncio.gather(*(b.acquire(time.monotonic() + 5) for _ in range(3)))
    assert time.monotonic() - started >= 0.28


async def test_unit_no_token_within_max_wait_is_call_failed() -> None:
    b = budget(rate_limit={"rate": 1, "burst": 1, "max_wait": 0.1})
    await b.acquire(time.monotonic() + 5)
    started = time.monotonic()
    with pytest.raises(CallFailed) as info:
        await b.acquire(time.monotonic() + 5)
    assert time.monotonic() - started >= 0.09
    assert info.value.retry_after is not None and info.value.retry_after >= 0.5
    assert sample(b, "gateway_authlete_budget_rejected_total", reason="wait_timeout") == 1


async def test_unit_waiters_are_served_first_come_first_served() -> None:
    b = budget(rate_limit={"rate": 40, "burst": 1, "max_wait": 5})
    await b.acquire(time.monotonic() + 10)  # empty the bucket
    order: list[int] = []

    async def one(i: int) -> None:
        await b.acquire(time.monotonic() + 10)
        order.append(i)

    tasks = []
    for i in range(10):
        tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.sleep(0.001)  # each one queued behind the previous
    tasks[4].cancel()  # a waiter that goes away gives its place up
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 2, 3, 5, 6, 7, 8, 9]


async def test_unit_breaker_opens_probes_once_and_closes() -> None:
    clock = Clock()
    b = budget(clock, retries=0, circuit_breaker={"failures": 3, "cooldown": 5})
    sends = 0

    async def down(timeout: float) -> Reply:
        nonlocal sends
        sends += 1
        raise TransportError("error", "refused")

    async def up(timeout: float) -> Reply:
        nonlocal sends
        sends += 1
        return Reply(200, {}, b"{}")

    # Consecutive: a success in between resets the count.
    for send in (down, down, up, down, down):
        if send is up:
            await b.call(send, clock.mono() + 5)
            continue
        with pytest.raises(CallFailed):
            await b.call(send, clock.mono() + 5)
    assert state_of(b) is BreakerState.CLOSED
    with pytest.raises(CallFailed):
        await b.call(down, clock.mono() + 5)
    assert state_of(b) is BreakerState.OPEN and not b.ready
    assert sample(b, "gateway_authlete_breaker_state") == 1

    sends = 0
    with pytest.raises(CallFailed) as info:
        await b.call(up, clock.mono() + 5)
    assert info.value.outcome == "breaker_open" and sends == 0
    assert info.value.retry_after is not None and info.value.retry_after >= 1
    assert sample(b, "gateway_authlete_budget_rejected_total", reason="breaker_open") == 1

    # After the cooldown one probe goes out; a failed probe reopens for another cooldown.
    clock.advance(5)
    with pytest.raises(CallFailed):
        await b.call(down, clock.mono() + 5)
    assert sends == 1 and state_of(b) is BreakerState.OPEN
    with pytest.raises(CallFailed):
        await b.call(up, clock.mono() + 5)
    assert sends == 1

    clock.advance(5)
    release = asyncio.Event()

    async def slow_up(timeout: float) -> Reply:
        nonlocal sends
        sends += 1
        await release.wait()
        return Reply(200, {}, b"{}")

    probe = asyncio.ensure_future(b.call(slow_up, clock.mono() + 5))
    await wait_until(lambda: sends == 2, 1.0, "the probe to be sent")
    assert state_of(b) is BreakerState.HALF_OPEN
    assert sample(b, "gateway_authlete_breaker_state") == 2
    with pytest.raises(CallFailed) as info:  # only one probe at a time
        await b.call(up, clock.mono() + 5)
    assert info.value.outcome == "breaker_open" and sends == 2
    release.set()
    assert (await probe).status == 200
    assert state_of(b) is BreakerState.CLOSED and b.ready
    assert sample(b, "gateway_authlete_breaker_state") == 0


@pytest.mark.parametrize(
    ("replies", "sends", "outcome"),
    [
        ([Reply(500, {}, b"")] * 5, 3, "error"),
        ([Reply(503, {}, b""), Reply(200, {}, b"{}")], 2, None),
        ([TransportError("timeout", "slow")] * 5, 3, "timeout"),
        ([TransportError("error", "refused"), Reply(200, {}, b"{}")], 2, None),
        ([Reply(404, {}, b"")], 1, None),
        ([Reply(400, {}, b"")], 1, None),
    ],
)
async def test_unit_retries(
    replies: list[Reply | TransportError], sends: int, outcome: str | None
) -> None:
    b = budget(retries=2)
    sent = 0

    async def send(timeout: float) -> Reply:
        nonlocal sent
        reply = replies[sent]
        sent += 1
        if isinstance(reply, TransportError):
            raise reply
        return reply

    if outcome is None:
        reply = await b.call(send, time.monotonic() + 5)
        assert reply is replies[-1]
    else:
        with pytest.raises(CallFailed) as info:
            await b.call(send, time.monotonic() + 5)
        assert info.value.outcome == outcome
    assert sent == sends
    assert sample(b, "gateway_authlete_retries_total") == sends - 1


async def test_unit_no_retry_past_the_deadline() -> None:
    b = budget(retries=5)
    sent = 0

    async def send(timeout: float) -> Reply:
        nonlocal sent
        sent += 1
        return Reply(500, {}, b"")

    started = time.monotonic()
    with pytest.raises(CallFailed):
        await b.call(send, time.monotonic() + 0.03)  # less than the first backoff
    assert sent == 1
    assert time.monotonic() - started < 0.5  # no backoff sleeps past the deadline either


@pytest.mark.parametrize("status", [200, 404, 429, 500])
async def test_unit_learns_from_every_answer(status: int) -> None:
    clock = Clock()
    b = budget(clock, retries=0)

    async def send(timeout: float) -> Reply:
        headers = {"X-RateLimit-Remaining": "7", "X-RateLimit-Reset": "10", "Retry-After": "60"}
        return Reply(status, headers, b"{}")

    with contextlib.suppress(CallFailed):
        await b.call(send, clock.mono() + 5)
    assert b.tokens == 7  # what Authlete said is left, whatever the status


def test_unit_a_refilling_bucket_is_followed_not_waited_out() -> None:
    """Limit, Remaining and a Reset that is the time to refill the burst at Limit per second
    describe a token bucket (Authlete's, and the emulator's): the gateway's bucket is lowered
    to Remaining and refills at Limit, instead of holding back until Reset."""
    clock = Clock()
    b = budget(clock)  # rate 100, burst 200
    b.learn({"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "2"})
    assert b.tokens == 0
    clock.advance(0.05)
    assert b.tokens == pytest.approx(5)  # refilling, not held at 0 for 2 s
    # Remaining 3 with Reset 2: also a bucket ((200 - 3) / 100 = 1.97, rounded up to 2).
    b.learn({"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "3", "X-RateLimit-Reset": "2"})
    assert b.tokens == pytest.approx(3)
    clock.advance(1.0)
    assert b.tokens == pytest.approx(103)


@pytest.mark.parametrize(
    "headers",
    [
        {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "2"},  # no Limit: a quota
        {"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "10"},
        {"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "150", "X-RateLimit-Reset": "30"},
    ],
)
def test_unit_other_headers_still_cap_until_reset(headers: dict[str, str]) -> None:
    """A Reset that is not the time to refill (a fixed window, say), or no Limit to tell:
    Remaining caps the calls until Reset, as before."""
    clock = Clock()
    b = budget(clock)
    b.learn(headers)
    capped = float(headers["X-RateLimit-Remaining"])
    assert b.tokens == capped
    clock.advance(1.5)
    assert b.tokens == capped
