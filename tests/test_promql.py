"""Every PromQL expression the project ships, run by a real Prometheus against real gateways.

observability/queries.yaml holds them all: the README's examples, the dashboard's panels and
the alert rules. A real Prometheus (Debian's `prometheus`, on a free loopback port, scraping
every second, with the alert rules loaded) scrapes two in-process gateways: one driven
through every case the expressions exist for (allowed, denied 401/403, gateway-made 502
refused / 504 timeout / 503 Authlete down or budget exhausted, Authlete 429s, stale answers,
upstream 5xx relayed, decisions, a rejected and an accepted reload) and one with shared state
on a real Redis. Then every expression goes through /api/v1/query:

- before any traffic, the expressions that must read 0 (not nothing) do;
- afterwards each returns the series it claims (EXPECT below: every shipped expression must
  have an entry), with no error and no warning;
- the dashboard's expressions run with their variables substituted as Grafana would, once
  with the regex-all values (`.*`) and once with one namespace, one pod and two routes;
- the variables' own label_values() queries find the namespace, pods and routes;
- every alert and rule evaluates without error inside Prometheus, and the alerts that the
  traffic should fire (or not) are checked by their expressions.

Rate windows: the shipped [5m] windows need no shortening, since rate() over a window holding
only the test's ~20 s of 1 s scrapes already gives the rate of that stretch; the dashboard's
[$__rate_interval] is substituted with [1m] (what Grafana uses at a 15 s scrape interval).
Each kind of event happens in three rounds, scrapes apart, so that series created by the
first one still show an increase.

Fails (not skips) under CI when prometheus or redis-server is missing (`need_tool`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from gateway.decision import DENIAL_REASONS
from gateway.emulator import Emulator, Override
from observability import build
from tests.conftest import (
    RedisServer,
    Running,
    StartGateway,
    bearer,
    free_port,
    need_tool,
    raw_config,
    start_app,
)

NAMESPACE = "test-ns"
POD = "gateway-0"
SHARED_POD = "gateway-shared-0"
SHARED_SECRET = "promql-test-hmac-secret-0123456789abcdef0123456789"
ROUTES = ("api", "broken", "mixed", "slow", "refused", "ingress")
SHARED_ROUTE = "shared-api"
AUTH = "/_gateway/auth"
ROUNDS = 3
SCRAPE = 1.0  # seconds

# ----------------------------------------------------------------------------- claims
# For each named query and each alert: what it returns after the traffic (`after`: each item
# is a set of labels that some series must have, and a condition on its value) and, for the
# expressions that must read 0 rather than nothing before any event, `before`.

Item = dict[str, str]


@dataclass(frozen=True)
class Expect:
    after: list[Item] = field(default_factory=list)
    before: list[Item] | None = None  # None: not checked before traffic
    all_zero_before: bool = False


def each(label: str, values: tuple[str, ...], value: str) -> list[Item]:
    return [{label: v, "value": value} for v in values]


OUTCOMES = (
    "ok", "unauthorized", "forbidden", "bad_request", "internal_server_error",
    "error", "timeout", "throttled", "rejected", "invalid_response",
)  # fmt: skip
RESULTS = ("hit", "negative_hit", "shared_hit", "shared_negative_hit", "miss", "stale")
REASONS = ("wait_timeout", "breaker_open", "client_quota")
KINDS = ("refused", "reset", "timeout", "protocol")
UPSTREAM_ROUTES = ("api", "broken", "mixed", "slow", "refused")
ALL_ROUTES = (*ROUTES, SHARED_ROUTE)


def zero(*items: Item) -> Expect:
    """An expression that reads 0 (every series) before the first event."""
    return Expect(before=list(items), all_zero_before=True)


def with_after(expect: Expect, *after: Item) -> Expect:
    return Expect(list(after), expect.before, expect.all_zero_before)


POSITIVE = {"value": ">0"}
EXPECT: dict[str, Expect] = {
    # traffic
    "requests_rate": Expect([POSITIVE]),
    "requests_by_route_status": Expect(
        [
            {"route": "api", "status": "200", "value": ">0"},
            {"route": "api", "status": "401", "value": ">0"},
            {"route": "api", "status": "403", "value": ">0"},
            {"route": "api", "status": "503", "value": ">0"},
            {"route": "refused", "status": "502", "value": ">0"},
            {"route": "slow", "status": "504", "value": ">0"},
            {"route": "mixed", "status": "504", "value": ">0"},
            {"route": "mixed", "status": "500", "value": ">0"},
            {"route": "broken", "status": "500", "value": ">0"},
            {"route": SHARED_ROUTE, "status": "200", "value": ">0"},
        ]
    ),
    "denials_by_status": Expect(
        [{"status": "401", "value": ">0"}, {"status": "403", "value": ">0"}]
    ),
    "denials_by_reason": with_after(
        zero(*each("reason", DENIAL_REASONS, "0")),
        {"reason": "missing_token", "value": ">0"},
        {"reason": "invalid_token", "value": ">0"},
        {"reason": "insufficient_scope", "value": ">0"},
        {"reason": "unavailable", "value": ">0"},
        {"reason": "untrusted_peer", "value": "0"},
    ),
    "gateway_5xx_by_route": with_after(
        zero(*each("route", ALL_ROUTES, "0")),
        {"route": "slow", "value": ">0"},  # only gateway-made 504s: the case the old query lost
        {"route": "refused", "value": ">0"},
        {"route": "mixed", "value": ">0"},  # 504s made, 500s relayed (subtracted)
        {"route": "api", "value": ">0"},  # 503: Authlete down, budget exhausted, 429s
        {"route": "broken", "value": "0"},  # only the upstream's own 500s
        {"route": "ingress", "value": "0"},
        {"route": SHARED_ROUTE, "value": "0"},
    ),
    "upstream_5xx_by_route": Expect(
        [{"route": "broken", "value": ">0"}, {"route": "mixed", "value": ">0"}]
    ),
    "gateway_5xx_ratio_by_route": Expect(
        [
            {"route": "slow", "value": "1"},
            {"route": "refused", "value": "1"},
            {"route": "mixed", "value": "(0,1)"},
            {"route": "api", "value": "(0,1)"},
            {"route": "broken", "value": "0"},
        ]
    ),
    "upstream_errors_by_route_kind": with_after(
        zero(*[{"route": r, "kind": k, "value": "0"} for r in UPSTREAM_ROUTES for k in KINDS]),
        {"route": "refused", "kind": "refused", "value": ">0"},
        {"route": "slow", "kind": "timeout", "value": ">0"},
        {"route": "mixed", "kind": "timeout", "value": ">0"},
        {"route": "api", "kind": "reset", "value": "0"},
    ),
    "decisions_by_route_status": Expect(
        [
            {"route": "ingress", "status": "200", "value": ">0"},
            {"route": "ingress", "status": "401", "value": ">0"},
        ]
    ),
    # latency
    "overhead_p50": Expect([POSITIVE]),
    "overhead_p99": Expect([POSITIVE]),
    "overhead_p99_by_route": Expect([{"route": "api", "value": ">0"}]),
    "upstream_p50": Expect([POSITIVE]),
    "upstream_p99": Expect([POSITIVE]),
    "request_p99": Expect([POSITIVE]),
    "decision_p99": Expect([POSITIVE]),
    # cache
    "cache_hit_ratio": Expect([{"value": "(0,1)"}]),
    "cache_requests_by_result": with_after(
        zero(*each("result", RESULTS, "0")),
        *each("result", ("hit", "negative_hit", "miss", "stale"), ">0"),
    ),
    "cache_entries": with_after(zero({"pod": POD, "value": "0"}), {"pod": POD, "value": ">0"}),
    "cache_evictions_rate": with_after(zero({"value": "0"}), {"value": "0"}),
    "cache_refreshes_by_result": with_after(
        zero(*each("result", ("active", "inactive", "failed"), "0")),
        {"result": "active", "value": "0"},  # refresh_ahead is off here
    ),
    # Authlete
    "introspection_by_outcome": with_after(
        zero(*each("outcome", OUTCOMES, "0")),
        *each("outcome", ("ok", "unauthorized", "error", "throttled"), ">0"),
        {"outcome": "rejected", "value": "0"},
    ),
    "introspection_budget_share": with_after(zero({"value": "0"}), POSITIVE),
    "introspection_p50": Expect([POSITIVE]),
    "introspection_p99": Expect([POSITIVE]),
    "authlete_throttled_rate": with_after(zero({"value": "0"}), POSITIVE),
    "authlete_retries_rate": with_after(zero({"value": "0"}), {"value": "0"}),
    "breaker_state": with_after(
        zero({"pod": POD, "value": "0"}),
        {"pod": POD, "value": "0"},
        {"pod": SHARED_POD, "value": "0"},
    ),
    # budget
    "budget_tokens": Expect([{"pod": POD, "value": ">0"}, {"pod": SHARED_POD, "value": "any"}]),
    "budget_waits_rate": with_after(zero({"value": "0"}), POSITIVE),
    "budget_wait_p99": Expect([POSITIVE]),
    "budget_rejections_by_reason": with_after(
        zero(*each("reason", REASONS, "0")),
        {"reason": "wait_timeout", "value": ">0"},
        {"reason": "breaker_open", "value": ">0"},
        {"reason": "client_quota", "value": "0"},
    ),
    "throttled_or_refused_rate": with_after(zero({"value": "0"}), POSITIVE),
    # shared state
    "shared_mode": Expect(
        [{"mode": "shared", "value": "1"}, {"mode": "fallback", "value": "0"}],
        before=[{"mode": "shared", "value": "1"}],
    ),
    "shared_errors_by_kind": with_after(
        zero(*each("kind", ("timeout", "connection", "full", "response", "other"), "0")),
        {"kind": "connection", "value": "0"},
    ),
    # process
    "open_connections": with_after(zero({"pod": POD, "value": "0"}), {"pod": POD, "value": "any"}),
    "connections_refused_rate": with_after(zero({"value": "0"}), {"value": "0"}),
    "connections_shed_rate": with_after(zero({"value": "0"}), {"value": "0"}),
    "header_timeouts_rate": with_after(zero({"value": "0"}), {"value": "0"}),
    "process_memory": Expect(
        [{"pod": POD, "value": ">0"}, {"pod": SHARED_POD, "value": ">0"}],
        before=[{"pod": POD, "value": ">0"}],
    ),
    "process_cpu": Expect([{"pod": POD, "value": ">0"}]),
    "ready": Expect(
        [{"pod": POD, "value": "1"}, {"pod": SHARED_POD, "value": "1"}],
        before=[{"pod": POD, "value": "1"}, {"pod": SHARED_POD, "value": "1"}],
    ),
    "versions": Expect([{"version": __version__, "value": "2"}]),
    # config
    "reloads_by_result": with_after(
        zero(*each("result", ("success", "error"), "0")),
        {"result": "success", "value": ">0"},
        {"result": "error", "value": ">0"},
    ),
    # alerts: FIRING = some series, QUIET = none, ANY = runs without error
    "GatewayAuthleteUnreachable": Expect([{"value": "optional"}]),
    "GatewayAuthleteBreakerOpen": Expect([{"value": "none"}]),  # closed again at the end
    "GatewayAuthleteThrottled": Expect([{"namespace": NAMESPACE, "job": "gateway"}]),
    "GatewayAuthleteBudgetRejections": Expect([{"namespace": NAMESPACE, "job": "gateway"}]),
    "GatewayMade5xxRatioHigh": Expect(
        [
            {"route": "slow"},
            {"route": "refused"},
            {"route": "broken", "value": "none"},
            {"route": SHARED_ROUTE, "value": "none"},
        ]
    ),
    "GatewayIntrospectionLatencyHigh": Expect([{"value": "none"}]),
    "GatewayCacheHitRatioLow": Expect([{"value": "optional"}]),
    "GatewayConfigReloadFailed": Expect([{"pod": POD, "result": "error"}]),
    "GatewayNotReady": Expect([{"value": "none"}]),
    "GatewayScrapeFailing": Expect([{"value": "none"}]),
}


def value_ok(condition: str, value: float) -> bool:
    if condition == "any":
        return not math.isnan(value)
    if condition == ">0":
        return value > 0
    if condition == "(0,1)":
        return 0 < value < 1
    return math.isclose(value, float(condition), abs_tol=1e-9)


def problems_with(result: list[dict[str, Any]], items: list[Item]) -> list[str]:
    """What `result` (an instant vector) lacks of `items`; [] when it has everything."""
    found = []
    series = [(s["metric"], float(s["value"][1])) for s in result]
    for item in items:
        labels = {k: v for k, v in item.items() if k != "value"}
        condition = item.get("value", ">0")
        matching = [v for m, v in series if all(m.get(k) == v for k, v in labels.items())]
        if condition == "optional":
            continue
        if condition == "none":
            if matching:
                found.append(f"expected no series with {labels}, got {matching}")
        elif not any(value_ok(condition, v) for v in matching):
            found.append(f"expected a series with {labels} and value {condition}: {series}")
    return found


# ----------------------------------------------------------------------------- Prometheus


class Prometheus:
    """A real `prometheus` on a free loopback port with a temporary storage directory,
    stopped by its PID."""

    def __init__(self, directory: Path, targets: dict[str, int]) -> None:
        self.dir = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "prometheus.log"
        static = [
            {"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": NAMESPACE, "pod": pod}}
            for pod, port in targets.items()
        ]
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE:g}s",
                "scrape_timeout": f"{SCRAPE:g}s",
                "evaluation_interval": f"{SCRAPE:g}s",
            },
            "rule_files": [str(build.RULES)],
            "scrape_configs": [{"job_name": "gateway", "static_configs": static}],
        }
        self.config = directory / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = need_tool("prometheus")
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                ],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def exited(self) -> bool:
        return self._proc is not None and self._proc.poll() is not None


@contextlib.asynccontextmanager
async def prometheus(directory: Path, targets: dict[str, int]) -> AsyncIterator[Prometheus]:
    prom = Prometheus(directory, targets)
    prom.start()
    try:
        yield prom
    finally:
        prom.stop()


class Api:
    def __init__(self, session: aiohttp.ClientSession, prom: Prometheus) -> None:
        self.session = session
        self.prom = prom
        self.at: float | None = None  # evaluation time of queries (None: now)

    async def get(self, path: str, params: dict[str, str] | list[tuple[str, str]]) -> Any:
        async with self.session.get(f"{self.prom.url}{path}", params=params) as resp:
            body = await resp.json(content_type=None)
        if body.get("status") != "success":
            raise QueryError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        if body.get("warnings"):
            raise QueryError(f"{path} {params}: warnings {body['warnings']}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        params = {"query": expr} if self.at is None else {"query": expr, "time": f"{self.at:.3f}"}
        data = await self.get("/api/v1/query", params)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        result: list[dict[str, Any]] = data["result"]
        return result

    async def scalar(self, expr: str) -> float:
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    async def ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.prom.exited():
                pytest.fail(f"prometheus exited: {self.prom.log()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with self.session.get(f"{self.prom.url}/-/ready") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
        pytest.fail(f"prometheus never became ready: {self.prom.log()}")

    async def scraped(self, times: int, timeout: float = 20.0) -> None:
        """Until every target has been scraped successfully `times` more times."""
        query = 'min(count_over_time(up{job="gateway"}[10m]) and up{job="gateway"} == 1)'
        start = await self.scalar(query)
        deadline = time.monotonic() + timeout
        while await self.scalar(query) < start + times or len(await self.query("up")) < 2:
            if time.monotonic() > deadline:
                targets = await self.get("/api/v1/targets", {})
                pytest.fail(f"targets not scraped {times} times: {targets}")
            await asyncio.sleep(0.2)


class QueryError(Exception):
    pass


# ----------------------------------------------------------------------------- the traffic


async def upstream_app() -> tuple[web.AppRunner, str]:
    """Upstreams that fail: 500 on /broken and /mixed/err, silence on /slow and /mixed/slow."""

    async def late(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response(text="late")

    async def broke(request: web.Request) -> web.Response:
        return web.Response(status=500, text="upstream broke")

    app = web.Application()
    app.router.add_route("*", "/mixed/err", broke)
    app.router.add_route("*", "/mixed/slow", late)
    app.router.add_route("*", "/broken/{tail:.*}", broke)
    app.router.add_route("*", "/slow/{tail:.*}", late)
    runner, url, _ = await start_app(app)
    return runner, url


def routes(echo: str, failing: str) -> list[dict[str, Any]]:
    return [
        {"name": "api", "path_prefix": "/api", "upstream": echo, "scopes": ["read"]},
        {"name": "broken", "path_prefix": "/broken", "upstream": failing, "auth": "none"},
        {"name": "mixed", "path_prefix": "/mixed", "upstream": failing, "auth": "none",
         "timeout": 0.3},
        {"name": "slow", "path_prefix": "/slow", "upstream": failing, "auth": "none",
         "timeout": 0.3},
        {"name": "refused", "path_prefix": "/refused", "auth": "none",
         "upstream": f"http://127.0.0.1:{free_port()}"},
        {"name": "ingress", "path_prefix": "/ingress", "scopes": ["read"]},  # decisions only
    ]  # fmt: skip


SETTINGS: dict[str, Any] = {
    "authlete": {
        "retries": 0,
        "timeout": 0.5,
        "deadline": 1.0,
        "rate_limit": {"rate": 50, "burst": 10, "max_wait": 0.05},
        "circuit_breaker": {"failures": 5, "cooldown": 1},
    },
    "cache": {"ttl": 1, "stale_if_error": 60, "refresh_ahead": 0},
    "decision": {},
    "trusted_proxies": ["127.0.0.1/32"],
}


@dataclass
class Traffic:
    client: aiohttp.ClientSession
    emulator: Emulator
    gw: Running
    shared: Running
    statuses: dict[str, list[int]] = field(default_factory=dict)

    async def get(self, what: str, url: str, headers: dict[str, str] | None = None) -> int:
        async with self.client.get(url, headers=headers or {}) as resp:
            await resp.read()
            self.statuses.setdefault(what, []).append(resp.status)
            return resp.status

    async def round(self, n: int, tmp_path: Path, reload_args: tuple[str, list[Any]]) -> None:
        gw = self.gw.url
        await breaker_closed(self.gw)
        for _ in range(3):
            await self.get("allowed", f"{gw}/api/items", bearer("reader"))
            await self.get("shared allowed", f"{self.shared.url}/items", bearer("reader"))
        await self.get("no token", f"{gw}/api/items")
        for _ in range(2):  # a miss, then a negative hit
            await self.get("unknown token", f"{gw}/api/items", bearer(f"unknown-{n}"))
        await self.get("no scope", f"{gw}/api/items", bearer("writer"))
        await asyncio.gather(
            self.get("refused", f"{gw}/refused/x"),
            self.get("timeout", f"{gw}/slow/x"),
            self.get("mixed timeout", f"{gw}/mixed/slow"),
            self.get("mixed 500", f"{gw}/mixed/err"),
            self.get("broken", f"{gw}/broken/x"),
        )
        asked = {"X-Original-URI": "/ingress/x", "X-Original-Method": "GET"}
        await self.get("decision allowed", f"{gw}{AUTH}", {**asked, **bearer("reader")})
        await self.get("decision denied", f"{gw}{AUTH}", asked)
        # More never-seen tokens at once than the budget's burst: those that cannot get a
        # call within max_wait are answered 503 (wait_timeout).
        await asyncio.gather(
            *(self.get("budget", f"{gw}/api/items", bearer(f"burst-{n}-{i}")) for i in range(25))
        )
        await asyncio.sleep(0.3)  # the bucket refills
        # Authlete throttles (429, Retry-After 1): the gateway answers 503 and pauses its calls.
        self.emulator.override = Override(status=429, headers={"Retry-After": "1"}, count=1)
        await self.get("throttled", f"{gw}/api/items", bearer(f"throttled-{n}"))
        assert self.emulator.override is None, "the 429 was not asked for"
        await asyncio.sleep(1.1)  # the gateway's 429 pause ends
        # Authlete down: the expired entry of `stale` is served stale; unknown tokens get 503
        # until the breaker opens, then 503 without a call.
        self.emulator.override = Override(status=500)
        await self.get("stale", f"{gw}/api/items", bearer("stale"))
        for i in range(7):
            await self.get("authlete down", f"{gw}/api/items", bearer(f"down-{n}-{i}"))
        self.emulator.override = None
        if n == 0:
            path, route_list = reload_args
            bad = tmp_path / "bad.yaml"
            bad.write_text("routes: [")
            assert not self.gw.gateway.reload(str(bad))
            good = tmp_path / "good.yaml"
            good.write_text(yaml.safe_dump(raw_config(path, route_list, **SETTINGS)))
            assert self.gw.gateway.reload(str(good))

    def check(self) -> None:
        """The traffic did what it was meant to (else the queries prove nothing)."""
        s = self.statuses
        assert set(s["allowed"]) == {200}, s["allowed"]
        assert set(s["shared allowed"]) == {200}, s["shared allowed"]
        assert set(s["no token"]) == {401} and set(s["unknown token"]) == {401}, s
        assert set(s["no scope"]) == {403}, s["no scope"]
        assert set(s["refused"]) == {502}, s["refused"]
        assert set(s["timeout"]) == {504} and set(s["mixed timeout"]) == {504}, s
        assert set(s["mixed 500"]) == {500} and set(s["broken"]) == {500}, s
        assert set(s["decision allowed"]) == {200}, s["decision allowed"]
        assert set(s["decision denied"]) == {401}, s["decision denied"]
        assert 503 in s["budget"] and 401 in s["budget"], s["budget"]
        assert set(s["throttled"]) == {503}, s["throttled"]
        assert set(s["stale"]) == {200}, s["stale"]
        assert set(s["authlete down"]) == {503}, s["authlete down"]


async def breaker_closed(gw: Running) -> None:
    deadline = time.monotonic() + 10
    while not (gw.gateway.budget.ready and gw.gateway.ready):
        assert time.monotonic() < deadline, "the Authlete breaker never closed again"
        await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------- the test


def shipped() -> dict[str, str]:
    """Every expression shipped, by name: the named queries and the alerts."""
    source = build.load()
    exprs = {name: q.expr for name, q in source.queries.items()}
    exprs.update({a.name: a.expr for a in source.alerts})
    return exprs


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expression) of every target of the committed dashboard."""
    board = json.loads(build.DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def named(expr: str) -> str:
    """The name of the query a dashboard expression was made from."""
    for name, query in build.load().queries.items():
        if build.dashboard_expr(query.expr) == expr:
            return name
    raise AssertionError(f"not made from a named query: {expr}")


ALL = {"namespace": ".*", "pod": ".*", "route": ".*"}
ONE = {"namespace": NAMESPACE, "pod": POD, "route": "(slow|mixed)"}


def test_every_shipped_expression_has_a_claim() -> None:
    assert set(EXPECT) == set(shipped())


async def test_every_shipped_query_returns_what_it_claims_from_a_real_prometheus(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    need_tool("prometheus")
    emulator.add_token("reader", subject="alice", scopes=["read"])
    emulator.add_token("stale", subject="bob", scopes=["read"])
    emulator.add_token("writer", subject="carol", scopes=["write"])
    failing, failing_url = await upstream_app()
    try:
        route_list = routes(upstream, failing_url)
        gw = await start_gateway(route_list, **SETTINGS)
        shared = await start_gateway(
            [{"name": SHARED_ROUTE, "path_prefix": "/", "upstream": upstream}],
            shared={"redis_url": redis_server.url, "secret": SHARED_SECRET},
        )
        targets = {POD: gw.gateway.admin_port, SHARED_POD: shared.gateway.admin_port}
        async with prometheus(tmp_path, targets) as prom:
            api = Api(client, prom)
            await api.ready()
            await api.scraped(3)  # rates need two samples; nothing has happened yet
            api.at = time.time()  # one instant for every query: results comparable
            problems = await check_before(api)
            api.at = None

            traffic = Traffic(client, emulator, gw, shared)
            await traffic.get("warm stale", f"{gw.url}/api/items", bearer("stale"))
            await asyncio.sleep(1.1)  # its entry expires (cache.ttl 1 s)
            for n in range(ROUNDS):
                await traffic.round(n, tmp_path, (emulator.base_url, route_list))
                await asyncio.sleep(1.5)  # scrapes apart; the breaker's cooldown passes
            traffic.check()
            await breaker_closed(gw)
            await api.scraped(2)  # the last events and the closed breaker are in
            api.at = time.time()
            problems += await check_after(api)
            problems += await check_dashboard(api)
            problems += await check_variables(api)
            problems += await check_rules(api)
            problems += await check_families(client, gw, shared)
    finally:
        await failing.cleanup()
    assert not problems, "\n".join(problems)


async def run(api: Api, what: str, expr: str) -> list[dict[str, Any]] | str:
    try:
        return await api.query(expr)
    except QueryError as exc:
        return f"{what}: {exc}"


async def check_before(api: Api) -> list[str]:
    problems = []
    exprs = shipped()
    dashboard = {named(expr): expr for _, expr in dashboard_exprs()}
    for name, expect in EXPECT.items():
        if expect.before is None:
            continue
        variants = [(name, exprs[name])]
        if name in dashboard:
            variants.append((f"{name} (dashboard)", build.substitute(dashboard[name], ALL)))
        for what, expr in variants:
            result = await run(api, what, expr)
            if isinstance(result, str):
                problems.append(result)
                continue
            found = problems_with(result, expect.before)
            if expect.all_zero_before:
                if not result:
                    found.append("empty: it must read 0, not nothing, before any event")
                found += [f"not 0: {s}" for s in result if float(s["value"][1]) != 0]
            problems += [f"before traffic, {what}: {p}" for p in found]
    return problems


async def check_after(api: Api) -> list[str]:
    problems = []
    for name, expr in shipped().items():
        result = await run(api, name, expr)
        if isinstance(result, str):
            problems.append(result)
            continue
        problems += [f"{name}: {p}" for p in problems_with(result, EXPECT[name].after)]
    # The gateway-made 5xx of a route that had both: its 504s exactly, not its relayed 500s.
    made = {
        s["metric"]["route"]: float(s["value"][1])
        for s in await api.query(shipped()["gateway_5xx_by_route"])
    }
    timeouts = await api.scalar(
        'sum(rate(gateway_requests_total{route="mixed", status="504"}[5m]))'
    )
    if not math.isclose(made.get("mixed", -1), timeouts, rel_tol=1e-6):
        problems.append(f"gateway_5xx_by_route: mixed {made.get('mixed')} != its 504s {timeouts}")
    return problems


async def check_dashboard(api: Api) -> list[str]:
    """Every dashboard target, with the variables at "All" (regex-all) and at one value."""
    problems = []
    for title, expr in dashboard_exprs():
        name = named(expr)
        result = await run(api, title, build.substitute(expr, ALL))
        if isinstance(result, str):
            problems.append(result)
        else:
            problems += [f"dashboard {title!r} ({name}): {p}" for p in
                         problems_with(result, EXPECT[name].after)]  # fmt: skip
        result = await run(api, title, build.substitute(expr, ONE))
        if isinstance(result, str):
            problems.append(result)
            continue
        for series in result:
            labels = series["metric"]
            if labels.get("pod", POD) != POD or labels.get("route", "slow") not in (
                "slow",
                "mixed",
            ):
                problems.append(f"dashboard {title!r} with {ONE}: {labels}")
    return problems


async def check_variables(api: Api) -> list[str]:
    """The label_values() queries of the namespace, pod and route variables."""
    problems = []
    wanted = {"namespace": {NAMESPACE}, "pod": {POD, SHARED_POD}, "route": {*ROUTES, SHARED_ROUTE}}
    for name, query in build.variable_queries().items():
        match = re.fullmatch(r"label_values\((.*), (\w+)\)", query)
        assert match, query
        selector = build.substitute(match.group(1), ALL)
        data = await api.get(f"/api/v1/label/{match.group(2)}/values", [("match[]", selector)])
        if set(data) != wanted[name]:
            problems.append(f"variable {name}: {query} -> {data}, expected {wanted[name]}")
    return problems


async def check_rules(api: Api) -> list[str]:
    """Every rule of the rules file is loaded and evaluates without error."""
    data = await api.get("/api/v1/rules", {})
    loaded = {rule["name"]: rule for group in data["groups"] for rule in group["rules"]}
    problems = []
    for alert in build.load().alerts:
        rule = loaded.get(alert.name)
        if rule is None:
            problems.append(f"rule {alert.name} not loaded: {sorted(loaded)}")
        elif rule["health"] != "ok" or rule.get("lastError"):
            problems.append(f"rule {alert.name}: {rule['health']} {rule.get('lastError')}")
    return problems


async def exposition(client: aiohttp.ClientSession, gw: Running) -> str:
    async with client.get(f"{gw.admin_url}/metrics") as resp:
        return await resp.text()


async def check_families(client: aiohttp.ClientSession, *gateways: Running) -> list[str]:
    """Every metric an expression names is exported, and the dashboard's idea of which
    families carry a route label is the exposition's."""
    samples = [
        sample
        for gw in gateways
        for family in text_string_to_metric_families(await exposition(client, gw))
        for sample in family.samples
    ]
    names = {build.family(s.name) for s in samples} | {s.name for s in samples} | {"up"}
    problems = []
    for name, expr in shipped().items():
        for metric in re.findall(r"\b((?:gateway|process)_[a-z0-9_]+)", expr):
            if metric not in names:
                problems.append(f"{name}: {metric} is not exported")
    with_route = {build.family(s.name) for s in samples if "route" in s.labels}
    present = {build.family(s.name) for s in samples}
    if with_route != build.ROUTE_FAMILIES & present:
        problems.append(f"route families: exported {with_route}, build.py says "
                        f"{build.ROUTE_FAMILIES & present}")  # fmt: skip
    return problems
