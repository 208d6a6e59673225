"""`python -m bench.fleet`: four gateway replicas on one Authlete budget (issue 11).

Real processes on loopback: one redis-server, the Authlete emulator with its rate limit on
(100 calls/s, bursts of 200, as Authlete), a minimal upstream, and for every case and
variant four fresh `gateway run` replicas with the same config:

- `shared`: the `shared:` section on (one Redis): one budget, one verdict cache, purges;
- `local`: no `shared:`, each replica with the whole budget (the behaviour before issue 11:
  each believes it owns all of it);
- `split`: no `shared:`, each replica with rate/4 and burst/4 (the static split, the sizing
  rule for a fleet without Redis).

The load comes from this process (aiohttp, keep-alive). Cases: a cold burst of distinct
tokens, new tokens at a sustained rate, users round-robin across the replicas, a purge that
must reach every replica, and uneven traffic on a static split. `python -m bench --scenarios
fleet` runs these and, with wrk, the hot path with `shared` on and off (bench/runner.py). See
bench/README.md, "Fleet". Targets are reported (MET / NOT MET), never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

from bench import measure
from bench.procs import (
    BenchError,
    Child,
    Procs,
    emulator_call,
    free_ports,
    http_ok,
    http_request,
    wait_until,
)
from bench.spray import Tally, open_loop

ROOT = Path(__file__).resolve().parent.parent
SERVICE_ID = "715948317"
SERVICE_TOKEN = "emulator-access-token"
SCOPE = "bench.read"

RATE = 100.0  # Authlete's limit (the emulator's), calls/s...
BURST = 200  # ...and burst; also each replica's authlete.rate_limit (the product's default)
REPLICAS = 4
MAX_WAIT = 1.0  # authlete.rate_limit.max_wait (the default): a new token waits this long
TTL = 60.0  # cache.ttl of every case but the purge (the product's default)
REQUEST_TIMEOUT = 15.0
POLL_INTERVAL = 0.010  # the purge case polls each replica this often

# Targets (issue 11, "Benchmark"), for the `shared` variant.
TARGET_429_SHARE = 0.01  # Authlete 429s at most this share of calls
TARGET_SERVED_SLACK = 0.05  # tokens served within this of burst + rate x duration
TARGET_CALLS_SLACK = 0.01  # calls within this of the distinct tokens called
TARGET_USERS_SLACK = 0.01  # calls for N users x 10 requests at most N x (1 + this)
TARGET_PURGE_S = 1.0  # the last replica refuses a purged token within this

VARIANTS = ("shared", "local", "split")
CASES = ("burst", "sustained", "users", "purge", "uneven")
CASE_VARIANTS: dict[str, tuple[str, ...]] = {
    "burst": ("shared", "local", "split"),
    "sustained": ("shared", "local", "split"),
    "users": ("shared", "local"),
    "purge": ("shared", "local"),
    "uneven": ("shared", "local", "split"),
}
# Share of the new tokens each replica gets in the uneven case.
PATTERNS: dict[str, tuple[float, ...]] = {
    "one": (1.0, 0.0, 0.0, 0.0),
    "skew": (0.7, 0.1, 0.1, 0.1),
}

VARIANT_TEXT = {
    "shared": "`shared:` on (one Redis), each replica authlete.rate_limit 100/s burst 200",
    "local": "no `shared:`, each replica 100/s burst 200 (each believes it owns the budget)",
    "split": "no `shared:`, static split: each replica 25/s burst 50",
}


@dataclass(frozen=True)
class Settings:
    burst_tokens: int = 2000
    burst_inflight: int = 400  # requests in flight during the cold burst
    fanout: int = REPLICAS  # each new token is requested on this many replicas at once
    sustained_rate: float = 300.0  # new tokens/s
    sustained_seconds: float = 20.0
    users: int = 1000
    user_requests: int = 10
    users_rate: float = 20.0  # new users/s: their first requests stay under the budget
    user_gap: float = 0.25  # seconds between one user's requests
    purge_ttl: float = 10.0  # cache.ttl in the purge case (bounds it without `shared`)
    uneven_rate: float = 150.0  # new tokens/s, 1.5x the budget
    uneven_seconds: float = 10.0
    emulator_latency: float = 0.002  # as `python -m bench` (--emulator-latency)
    settle: float = BURST / RATE  # between cases: the emulator's bucket fills again
    cases: tuple[str, ...] = CASES
    variants: tuple[str, ...] = VARIANTS

    @property
    def purge_bound(self) -> float:
        return 1.5 * self.purge_ttl + 1.0


QUICK = Settings(
    burst_tokens=200,
    burst_inflight=100,
    sustained_rate=100.0,
    sustained_seconds=1.0,
    users=40,
    user_requests=4,
    users_rate=40.0,
    user_gap=0.05,
    purge_ttl=1.0,
    uneven_rate=100.0,
    uneven_seconds=1.0,
    settle=0.1,
)


@dataclass
class Replica:
    index: int
    port: int
    admin: int
    child: Child


@dataclass
class Infra:
    redis_port: int = 0
    emulator_port: int = 0
    upstream_port: int = 0
    secret: str = field(default_factory=lambda: secrets.token_hex(32))
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def env(self, gateway_root: Path = ROOT) -> dict[str, str]:
        """The gateway's environment: the secrets come from it, as in production."""
        return {
            **_base_env(gateway_root),
            "GATEWAY_SHARED_SECRET": self.secret,
            "GATEWAY_ADMIN_TOKEN": self.admin_token,
        }


def _base_env(gateway_root: Path = ROOT) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {
        "PYTHONPATH": f"{gateway_root}{os.pathsep}{path}" if path else str(gateway_root),
        "GATEWAY_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- redis


def redis_command(port: int, *args: str, timeout: float = 5.0) -> bytes:
    """One command over RESP on a fresh connection; the reply's payload (simple or bulk)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"".join(parts))
        reader = sock.makefile("rb")
        line = reader.readline()
        if not line:
            raise OSError("redis closed the connection")
        kind, rest = line[:1], line[1:].rstrip(b"\r\n")
        if kind == b"-":
            raise BenchError(f"redis {args[0]}: {rest.decode(errors='replace')}")
        if kind == b"$":
            size = int(rest)
            return b"" if size < 0 else reader.read(size + 2)[:size]
        return rest


def redis_info(port: int, section: str) -> dict[str, str]:
    text = redis_command(port, "INFO", section).decode(errors="replace")
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            out[key] = value
    return out


def redis_commands_processed(port: int) -> int:
    return int(redis_info(port, "stats").get("total_commands_processed", "0"))


def start_redis(procs: Procs, workdir: Path, cpus: str | None = None) -> tuple[Child, int]:
    """One redis-server on loopback, nothing persisted, its files in the run's temp dir."""
    (port,) = free_ports(1)
    data = workdir / "redis"
    data.mkdir(exist_ok=True)
    redis = shutil.which("redis-server") or "redis-server"
    child = procs.start(
        "redis",
        [
            *(redis, "--bind", "127.0.0.1", "--port", str(port)),
            *("--save", "", "--appendonly", "no", "--dir", str(data)),
        ],
        cpus,
    )
    wait_until("redis-server", lambda: redis_command(port, "PING") == b"PONG", child)
    return child, port


# ---------------------------------------------------------------- gateway metrics

_FAMILIES = (
    "gateway_introspection_requests_total",
    "gateway_authlete_budget_rejected_total",
    "gateway_authlete_throttled_total",
    "gateway_cache_requests_total",
    "gateway_introspection_coalesced_total",
    "gateway_cache_purges_total",
    "gateway_shared_",
)


def scrape(admin: int) -> dict[str, float]:
    """The samples of the families above from one replica's /metrics (histogram buckets and
    `_created` left out), by name with labels."""
    status, raw = http_request(admin, "GET", "/metrics")
    if status != 200:
        raise BenchError(f"gateway /metrics on {admin}: {status}")
    found: dict[str, float] = {}
    for line in raw.decode(errors="replace").splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        base = name.partition("{")[0]
        if base.endswith(("_created", "_bucket")) or not base.startswith(_FAMILIES):
            continue
        with contextlib.suppress(ValueError):
            found[name] = float(value)
    return found


def shared_mode(sample: dict[str, float]) -> str:
    """`shared`, `fallback`, or `off` (no gateway_shared_mode metric: not in this checkout)."""
    for mode in ("shared", "fallback"):
        if sample.get(f'gateway_shared_mode{{mode="{mode}"}}') == 1.0:
            return mode
    return "off"


def _sum(samples: Sequence[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for sample in samples:
        for name, value in sample.items():
            if not name.startswith("gateway_shared_mode"):
                total[name] = total.get(name, 0.0) + value
    return dict(sorted(total.items()))


def metric(summed: dict[str, float], name: str, **labels: str) -> float:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return summed.get(f"{name}{{{inner}}}" if inner else name, 0.0)


# ---------------------------------------------------------------- the load


@dataclass
class Load:
    """What one case sent and got: per request, and per token (served: one 200 or more)."""

    requests: Tally = field(default_factory=Tally)
    tokens_sent: int = 0
    tokens_served: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests.summary(),
            "tokens_sent": self.tokens_sent,
            "tokens_served": self.tokens_served,
            "wall_s": round(self.wall_s, 3),
        }


class Client:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def get(self, port: int, token: str) -> tuple[int, float]:
        """GET / with the token; (status, seconds), status 0 if no answer."""
        started = time.monotonic()
        try:
            async with self.session.get(
                f"http://127.0.0.1:{port}/", headers={"Authorization": f"Bearer {token}"}
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            status = 0
        return status, time.monotonic() - started

    async def token_group(self, ports: Sequence[int], token: str, load: Load) -> None:
        """One new token on several replicas at once (a page load's parallel API calls)."""
        results = await asyncio.gather(*(self.get(port, token) for port in ports))
        load.tokens_sent += 1
        for status, seconds in results:
            load.requests.add(status, seconds)
        if any(status == 200 for status, _ in results):
            load.tokens_served += 1


@contextlib.asynccontextmanager
async def _client(limit: int) -> AsyncIterator[Client]:
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        skip_auto_headers=("User-Agent",),
    ) as session:
        yield Client(session)


def _run(coro: Awaitable[Any]) -> Any:
    """Run the load on uvloop when installed (the client is not what is measured)."""

    async def main() -> Any:
        return await coro

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def _fanout_ports(ports: Sequence[int], i: int, fanout: int) -> list[int]:
    return [ports[(i + k) % len(ports)] for k in range(fanout)]


async def burst_load(ports: Sequence[int], tokens: Sequence[str], s: Settings) -> Load:
    """Every token at once, `fanout` requests each, at most `burst_inflight` in flight."""
    load = Load()
    groups = asyncio.Semaphore(max(1, s.burst_inflight // s.fanout))
    async with _client(s.burst_inflight + 8) as client:

        async def one(i: int, token: str) -> None:
            async with groups:
                await client.token_group(_fanout_ports(ports, i, s.fanout), token, load)

        started = time.monotonic()
        await asyncio.gather(*(one(i, t) for i, t in enumerate(tokens)))
        load.wall_s = time.monotonic() - started
    return load


async def rate_load(
    ports: Sequence[int],
    tokens: Sequence[str],
    rate: float,
    seconds: float,
    pick: Callable[[int], list[int]],
) -> Load:
    """New tokens at `rate` per second for `seconds`, open loop; token i goes to pick(i)."""
    load = Load()
    async with _client(0) as client:

        async def one(i: int) -> None:
            await client.token_group(pick(i), tokens[i], load)

        started = time.monotonic()
        await open_loop(rate, seconds, one)
        load.wall_s = time.monotonic() - started
    return load


async def users_load(ports: Sequence[int], prefix: str, s: Settings) -> Load:
    """Users arriving at `users_rate`; each makes `user_requests` requests `user_gap` apart,
    request k of user u to replica (u + k) mod N (a round-robin Service)."""
    load = Load()
    async with _client(0) as client:

        async def user(u: int) -> None:
            token = f"{prefix}{u}"
            served = False
            for k in range(s.user_requests):
                status, seconds = await client.get(ports[(u + k) % len(ports)], token)
                load.requests.add(status, seconds)
                served = served or status == 200
                await asyncio.sleep(s.user_gap)
            load.tokens_sent += 1
            load.tokens_served += served

        started = time.monotonic()
        await open_loop(s.users_rate, s.users / s.users_rate, user)
        load.wall_s = time.monotonic() - started
    return load


async def purge_load(
    replicas: Sequence[Replica], token: str, admin_token: str, bound: float
) -> dict[str, Any]:
    """Poll every replica with the (revoked) token every POLL_INTERVAL; purge on the first;
    per replica the seconds from the purge call until its first 401."""
    refused: dict[int, float | None] = {}
    other: Counter[int] = Counter()
    async with _client(16) as client:
        start = asyncio.Event()
        t0 = 0.0

        async def poll(r: Replica) -> None:
            await start.wait()
            deadline = t0 + bound
            while time.monotonic() < deadline:
                status, _ = await client.get(r.port, token)
                if status == 401:
                    refused[r.index] = time.monotonic() - t0
                    return
                if status != 200:
                    other[status] += 1
                await asyncio.sleep(POLL_INTERVAL)
            refused[r.index] = None

        pollers = [asyncio.ensure_future(poll(r)) for r in replicas]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        start.set()
        purge_started = time.monotonic()
        try:
            async with client.session.post(
                f"http://127.0.0.1:{replicas[0].admin}/cache/purge",
                json={"token": token},
                headers={"Authorization": f"Bearer {admin_token}"},
            ) as response:
                body = (await response.read()).decode(errors="replace")[:200]
                purge_status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            purge_status, body = 0, str(exc)
        purge_seconds = time.monotonic() - purge_started
        await asyncio.gather(*pollers)
        # Once refused, a replica must not let the token in again.
        after = [(await client.get(r.port, token))[0] for r in replicas]
    times = [refused.get(r.index) for r in replicas]
    return {
        "purge_status": purge_status,
        "purge_answer": body,
        "purge_call_ms": round(1000 * purge_seconds, 1),
        "refused_after_s": [None if t is None else round(t, 4) for t in times],
        "last_refused_s": None if None in times else round(max(t or 0.0 for t in times), 4),
        "bound_s": bound,
        "statuses_after": after,
        "other_statuses_while_polling": {str(k): v for k, v in sorted(other.items())},
    }


# ---------------------------------------------------------------- the processes


class Fleet:
    def __init__(
        self, procs: Procs, workdir: Path, settings: Settings, gateway_root: Path = ROOT
    ) -> None:
        self.procs = procs
        self.gateway_root = gateway_root
        self.workdir = workdir
        self.s = settings
        self.infra = Infra()
        self._seq = 0
        self.modes_seen: dict[str, list[str]] = {}
        self.redis: Child | None = None
        self._cpu_start: dict[str, float] = {}

    def start_infra(self, cpus: str | None = None) -> None:
        """redis-server, the rate-limited emulator and the upstream (all on `cpus`)."""
        self.redis, self.infra.redis_port = start_redis(self.procs, self.workdir, cpus)
        self.infra.emulator_port, self.infra.upstream_port = free_ports(2)
        python = sys.executable
        emulator = self.procs.start(
            "fleet-emulator",
            [
                *(python, "-m", "gateway", "emulator"),
                *("--listen", f"127.0.0.1:{self.infra.emulator_port}"),
                *("--service-id", SERVICE_ID, "--access-token", SERVICE_TOKEN),
                *("--latency", str(self.s.emulator_latency)),
                *("--rate", f"{RATE:g}", "--burst", str(BURST)),
            ],
            cpus,
            env=_base_env(self.gateway_root),
            cwd=self.gateway_root,  # `python -m` puts the working directory first on sys.path
        )
        ready = _ready_path(self.infra.emulator_port, "/_emulator/stats")
        wait_until("fleet emulator", ready, emulator)
        upstream = self.procs.start(
            "fleet-upstream",
            [python, "-m", "bench.spray", "--serve-upstream", str(self.infra.upstream_port)],
            cpus,
            env=_base_env(),
        )
        wait_until("fleet upstream", lambda: http_ok(self.infra.upstream_port, "/"), upstream)

    def emu(self, path: str, doc: dict[str, Any] | None = None) -> Any:
        return emulator_call(self.infra.emulator_port, path, doc)

    def mint(self, name: str, count: int) -> tuple[str, list[str]]:
        """`count` new tokens at the emulator (never seen by any gateway)."""
        self._seq += 1
        prefix = f"fleet{self._seq}-{name}-"
        self.emu(
            "/_emulator/tokens/bulk",
            {"prefix": prefix, "count": count, "scopes": [SCOPE], "lifetime": 86400},
        )
        return prefix, [f"{prefix}{i}" for i in range(count)]

    def gateway_yaml(
        self, name: str, port: int, admin: int, variant: str, ttl: float, redis_url: str
    ) -> Path:
        rate, burst = (RATE / REPLICAS, BURST // REPLICAS) if variant == "split" else (RATE, BURST)
        shared = (
            f"""\
shared:
  redis_url: "{redis_url}"
  secret: "${{GATEWAY_SHARED_SECRET}}"
  expected_replicas: {REPLICAS}
"""
            if variant == "shared"
            else ""
        )
        path = self.workdir / f"{name}.yaml"
        path.write_text(
            f"""\
listen: "127.0.0.1:{port}"
admin_listen: "127.0.0.1:{admin}"
shutdown_timeout: 1
authlete:
  base_url: "http://127.0.0.1:{self.infra.emulator_port}"
  service_id: "{SERVICE_ID}"
  access_token: "{SERVICE_TOKEN}"
  allow_insecure_http: true  # the emulator on loopback
  rate_limit: {{rate: {rate:g}, burst: {burst}, max_wait: {MAX_WAIT:g}}}
cache:
  ttl: {ttl:g}
admin:
  token: "${{GATEWAY_ADMIN_TOKEN}}"
routes:
  - name: fleet
    path_prefix: /
    upstream: "http://127.0.0.1:{self.infra.upstream_port}"
    scopes: [{SCOPE}]
{shared}"""
        )
        return path

    @contextlib.contextmanager
    def replicas(self, case: str, variant: str, ttl: float = TTL) -> Iterator[list[Replica]]:
        """Four fresh replicas on an empty Redis and a full emulator bucket."""
        redis_command(self.infra.redis_port, "FLUSHALL")
        # Setting the limit again empties the emulator's buckets: a fresh one is full.
        self.emu("/_emulator/config", {"rate_limit": {"rate": RATE, "burst": BURST}})
        started: list[Replica] = []
        try:
            ports = free_ports(2 * REPLICAS)
            for i in range(REPLICAS):
                port, admin = ports[2 * i], ports[2 * i + 1]
                name = f"fleet-{case}-{variant}-{i}"
                config = self.gateway_yaml(name, port, admin, variant, ttl, self.infra.redis_url)
                child = self.procs.start(
                    name,
                    [sys.executable, "-m", "gateway", "run", "-c", str(config)],
                    None,
                    env=self.infra.env(self.gateway_root),
                    cwd=self.gateway_root,
                )
                started.append(Replica(i, port, admin, child))
            for r in started:
                wait_until(r.child.name, _ready(r.admin), r.child)
            modes = [shared_mode(scrape(r.admin)) for r in started]
            self.modes_seen.setdefault(variant, []).extend(modes)
            if variant != "shared" and any(m != "off" for m in modes):
                raise BenchError(f"{case}/{variant}: a replica without shared reports {modes}")
            self.emu("/_emulator/reset", {})
            self._cpu_start = self._cpu(started)
            yield started
        finally:
            for r in started:
                self.procs.stop(r.child, grace=3.0)

    def _cpu(self, replicas: Sequence[Replica]) -> dict[str, float]:
        """CPU seconds so far: the replicas together, Redis, this process (the load)."""
        own = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "replicas": sum(measure.cpu_seconds(r.child.pid) for r in replicas),
            "redis": measure.cpu_seconds(self.redis.pid) if self.redis else 0.0,
            "client": own.ru_utime + own.ru_stime,
        }

    def collect(self, replicas: Sequence[Replica]) -> dict[str, Any]:
        for r in replicas:
            if not r.child.alive():
                raise BenchError(f"{r.child.name} died; log {r.child.log}")
        now = self._cpu(replicas)
        cpu = {k: round(now[k] - self._cpu_start.get(k, 0.0), 2) for k in now}
        samples = [scrape(r.admin) for r in replicas]
        stats = self.emu("/_emulator/stats")
        summed = _sum(samples)
        calls = int(stats["calls"])
        throttled = int(stats["throttled"])
        distinct = int(stats["distinct_tokens_called"])
        fallback = sum(_log_lines(r.child, "fallback mode") for r in replicas)
        return {
            "cpu_s": cpu,
            "fallback_log_lines": fallback,
            "authlete_calls": calls,
            "authlete_429": throttled,
            "share_429": round(throttled / calls, 4) if calls else 0.0,
            "distinct_tokens_called": distinct,
            "max_calls_per_token": int(stats["max_calls_per_token"]),
            "calls_per_token": round(calls / distinct, 3) if distinct else 0.0,
            "modes": [shared_mode(s) for s in samples],
            "gateway": summed,
            "introspections": {
                k.split('"')[1]: v
                for k, v in summed.items()
                if k.startswith("gateway_introspection_requests_total{")
            },
            "budget_rejected": {
                k.split('"')[1]: v
                for k, v in summed.items()
                if k.startswith("gateway_authlete_budget_rejected_total{")
            },
        }

    def _settle(self) -> None:
        time.sleep(self.s.settle)

    # ------------------------------------------------------------ cases
    def case_burst(self, variant: str) -> dict[str, Any]:
        s = self.s
        _prefix, tokens = self.mint("burst", s.burst_tokens)
        with self.replicas("burst", variant) as rs:
            load: Load = _run(burst_load([r.port for r in rs], tokens, s))
            out = self.collect(rs)
        return {**load.summary(), **out, **_ideal(load)}

    def case_sustained(self, variant: str) -> dict[str, Any]:
        s = self.s
        count = int(s.sustained_rate * s.sustained_seconds) + 1
        _prefix, tokens = self.mint("sustained", count)
        with self.replicas("sustained", variant) as rs:
            ports = [r.port for r in rs]
            load: Load = _run(
                rate_load(
                    ports,
                    tokens,
                    s.sustained_rate,
                    s.sustained_seconds,
                    lambda i: _fanout_ports(ports, i, s.fanout),
                )
            )
            out = self.collect(rs)
        return {**load.summary(), **out, **_ideal(load)}

    def case_users(self, variant: str) -> dict[str, Any]:
        s = self.s
        prefix, _tokens = self.mint("users", s.users)
        with self.replicas("users", variant) as rs:
            load: Load = _run(users_load([r.port for r in rs], prefix, s))
            out = self.collect(rs)
        sent = load.requests.sent
        return {
            **load.summary(),
            **out,
            "users": s.users,
            "hit_ratio": round(1 - out["authlete_calls"] / sent, 4) if sent else 0.0,
        }

    def case_purge(self, variant: str) -> dict[str, Any]:
        s = self.s
        _prefix, (token,) = self.mint("purge", 1)
        with self.replicas("purge", variant, ttl=s.purge_ttl) as rs:
            warm = [http_request(r.port, "GET", "/", headers=_bearer(token))[0] for r in rs]
            if warm != [200] * len(rs):
                raise BenchError(f"purge/{variant}: the token before the purge answered {warm}")
            time.sleep(0.2)
            self.emu("/_emulator/revoke", {"token": token})
            result: dict[str, Any] = _run(
                purge_load(rs, token, self.infra.admin_token, s.purge_bound)
            )
            out = self.collect(rs)
        return {**result, **out, "cache_ttl": s.purge_ttl, "warm_statuses": warm}

    def case_uneven(self, variant: str, pattern: str) -> dict[str, Any]:
        s = self.s
        weights = PATTERNS[pattern]
        wheel = [i for i, w in enumerate(weights) for _ in range(round(w * 10))]
        count = int(s.uneven_rate * s.uneven_seconds) + 1
        _prefix, tokens = self.mint(f"uneven-{pattern}", count)
        with self.replicas(f"uneven-{pattern}", variant) as rs:
            ports = [r.port for r in rs]
            load: Load = _run(
                rate_load(
                    ports,
                    tokens,
                    s.uneven_rate,
                    s.uneven_seconds,
                    lambda i: [ports[wheel[i % len(wheel)]]],
                )
            )
            out = self.collect(rs)
        return {
            **load.summary(),
            **out,
            **_ideal(load),
            "pattern": pattern,
            "weights": list(weights),
            "demand_served": round(load.tokens_served / load.tokens_sent, 4)
            if load.tokens_sent
            else 0.0,
        }

    def run(self) -> dict[str, Any]:
        s = self.s
        cases: dict[str, Any] = {}
        for case in s.cases:
            variants = [v for v in CASE_VARIANTS[case] if v in s.variants]
            runs: dict[str, Any] = {}
            for variant in variants:
                if case == "uneven":
                    for pattern in PATTERNS:
                        self._settle()
                        _log(f"[fleet/uneven-{pattern}] {variant}")
                        runs[f"{pattern}/{variant}"] = self.case_uneven(variant, pattern)
                        _log(f"    {_line(runs[f'{pattern}/{variant}'])}")
                    continue
                self._settle()
                _log(f"[fleet/{case}] {variant}")
                runs[variant] = getattr(self, f"case_{case}")(variant)
                _log(f"    {_line(runs[variant])}")
            cases[case] = {"title": CASE_TITLES[case].format(s=s), "runs": runs}
        shared_modes = self.modes_seen.get("shared", [])
        return {
            "settings": asdict(s) | {"purge_bound": s.purge_bound},
            "limits": {
                "rate": RATE,
                "burst": BURST,
                "replicas": REPLICAS,
                "max_wait": MAX_WAIT,
                "cache_ttl": TTL,
            },
            "variants": {v: VARIANT_TEXT[v] for v in s.variants},
            "shared_active": bool(shared_modes) and all(m == "shared" for m in shared_modes),
            "shared_modes_at_start": shared_modes,
            "cases": cases,
        }


CASE_TITLES = {
    "burst": "cold burst: {s.burst_tokens:,} new tokens at once, each on {s.fanout} replicas "
    "at the same time, {s.burst_inflight} requests in flight",
    "sustained": "{s.sustained_rate:g} new tokens/s for {s.sustained_seconds:g} s, each on "
    "{s.fanout} replicas at the same time (open loop)",
    "users": "{s.users:,} users x {s.user_requests} requests round-robin across the replicas: "
    "{s.users_rate:g} new users/s, {s.user_gap:g} s between one user's requests",
    "purge": "a token cached on every replica, revoked at Authlete, then POST /cache/purge on "
    "one replica; each replica polled every 10 ms until it answers 401 (cache.ttl "
    "{s.purge_ttl:g} s)",
    "uneven": "{s.uneven_rate:g} new tokens/s for {s.uneven_seconds:g} s, each on one replica, "
    "the replicas' shares uneven",
}


def _log_lines(child: Child, word: str) -> int:
    """Lines of the child's log naming `word` (a replica logs each change to fallback mode)."""
    try:
        text = child.log.read_text(errors="replace")
    except OSError:
        return 0
    return sum(word in line for line in text.splitlines())


def _ready(admin: int) -> Callable[[], bool]:
    return _ready_path(admin, "/readyz")


def _ready_path(port: int, path: str) -> Callable[[], bool]:
    return lambda: http_ok(port, path)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _ideal(load: Load) -> dict[str, Any]:
    """What one budget allows during the load: burst + rate x its duration (first request
    sent to last answer), or every token sent if fewer; the tokens served as a share of it."""
    ideal = min(float(load.tokens_sent), BURST + RATE * load.wall_s)
    ratio = load.tokens_served / ideal if ideal else 0.0
    return {"ideal_served": round(ideal, 1), "served_ratio": round(ratio, 4)}


def _line(r: dict[str, Any]) -> str:
    if "last_refused_s" in r:
        return (
            f"purge {r['purge_status']}, refused after {r['refused_after_s']} s, "
            f"calls {r['authlete_calls']}, modes {r['modes']}"
        )
    req = r["requests"]
    text = (
        f"{req['sent']} requests {req['statuses']} p50 {req['p50_ms']} p99 {req['p99_ms']} ms; "
        f"tokens {r['tokens_served']}/{r['tokens_sent']} served; calls {r['authlete_calls']} "
        f"(429 {r['authlete_429']}, {r['calls_per_token']} per token)"
    )
    if "served_ratio" in r:
        text += f"; served {r['served_ratio']:.2%} of {r['ideal_served']:g}"
    return text + f"; modes {r['modes']}"


# ---------------------------------------------------------------- targets and report


def _target(
    tid: str, description: str, goal: str, measured: str | None, met: bool | None
) -> dict[str, Any]:
    status = "SKIPPED" if met is None else ("MET" if met else "NOT MET")
    return {
        "id": tid,
        "description": description,
        "target": goal,
        "measured": measured if measured is not None else "not measured",
        "met": bool(met),
        "status": status,
    }


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, on the `shared` variant; `today` = the `local` variant."""
    cases = doc.get("cases", {})
    inactive = "" if doc.get("shared_active") else " (shared mode NOT active on the replicas)"
    out: list[dict[str, Any]] = []

    def run(case: str, variant: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = cases.get(case, {}).get("runs", {}).get(variant)
        return found

    def today(case: str, key: str, fmt: str) -> str:
        local = run(case, "local")
        return f"; today (local) {format(local[key], fmt)}" if local else ""

    for case, label in (("burst", "cold burst"), ("sustained", "sustained new tokens")):
        r = run(case, "shared")
        desc = f"Fleet, {label}: Authlete 429s as a share of calls (4 replicas, shared)"
        goal = f"<= {TARGET_429_SHARE:.0%}"
        if r is None:
            out.append(_target(f"fleet-{case}-429", desc, goal, None, None))
        else:
            out.append(
                _target(
                    f"fleet-{case}-429",
                    desc,
                    goal,
                    f"{r['share_429']:.2%} ({r['authlete_429']} of {r['authlete_calls']})"
                    + today(case, "share_429", ".2%")
                    + inactive,
                    r["share_429"] <= TARGET_429_SHARE,
                )
            )
        desc = f"Fleet, {label}: tokens served vs burst + rate x duration (shared)"
        goal = f"within {TARGET_SERVED_SLACK:.0%}"
        if r is None:
            out.append(_target(f"fleet-{case}-served", desc, goal, None, None))
        else:
            out.append(
                _target(
                    f"fleet-{case}-served",
                    desc,
                    goal,
                    f"{r['served_ratio']:.1%} ({r['tokens_served']:,} of {r['ideal_served']:,.0f})"
                    + today(case, "served_ratio", ".1%")
                    + inactive,
                    abs(r["served_ratio"] - 1) <= TARGET_SERVED_SLACK,
                )
            )
        desc = f"Fleet, {label}: Authlete calls vs distinct tokens called (shared)"
        goal = f"within {TARGET_CALLS_SLACK:.0%}"
        if r is None:
            out.append(_target(f"fleet-{case}-calls", desc, goal, None, None))
        else:
            out.append(
                _target(
                    f"fleet-{case}-calls",
                    desc,
                    goal,
                    f"{r['calls_per_token']:.3f}x ({r['authlete_calls']:,} calls, "
                    f"{r['distinct_tokens_called']:,} tokens)"
                    + today(case, "calls_per_token", ".2f")
                    + inactive,
                    r["calls_per_token"] <= 1 + TARGET_CALLS_SLACK,
                )
            )
    r = run("users", "shared")
    users = int(doc.get("settings", {}).get("users", 1000))
    limit = int(users * (1 + TARGET_USERS_SLACK))
    desc = f"Fleet: Authlete calls for {users:,} users x N requests round-robin (shared)"
    goal = f"<= {limit:,}"
    if r is None:
        out.append(_target("fleet-users-calls", desc, goal, None, None))
    else:
        out.append(
            _target(
                "fleet-users-calls",
                desc,
                goal,
                f"{r['authlete_calls']:,}" + today("users", "authlete_calls", ",") + inactive,
                r["authlete_calls"] <= limit,
            )
        )
    r = run("purge", "shared")
    desc = "Fleet: purge, time until the last replica refuses the token (shared)"
    goal = f"<= {TARGET_PURGE_S:g} s"
    if r is None:
        out.append(_target("fleet-purge", desc, goal, None, None))
    else:
        last = r["last_refused_s"]
        local = run("purge", "local")
        was = ""
        if local is not None:
            was = "; today (local) " + (
                f"{local['last_refused_s']:.2f} s"
                if local["last_refused_s"] is not None
                else f"not refused within {local['bound_s']:g} s"
            )
        out.append(
            _target(
                "fleet-purge",
                desc,
                goal,
                (f"{last:.3f} s" if last is not None else f"not refused within {r['bound_s']:g} s")
                + f" (purge answered {r['purge_status']})"
                + was
                + inactive,
                last is not None and last <= TARGET_PURGE_S,
            )
        )
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _status(req: dict[str, Any], code: str) -> int:
    value: int = req["statuses"].get(code, 0)
    return value


def _details(runs: dict[str, Any]) -> list[str]:
    """Per run: CPU during the load, and with `shared` what the replicas did with Redis."""
    out: list[str] = []
    for key, r in runs.items():
        cpu = r["cpu_s"]
        text = (
            f"- {key}: CPU seconds during the load: replicas {cpu['replicas']:.1f}, Redis "
            f"{cpu['redis']:.1f}, load generator {cpu['client']:.1f}"
        )
        g = r["gateway"]
        trips = {
            k.split('"')[1]: v
            for k, v in g.items()
            if k.startswith("gateway_shared_roundtrip_seconds_count{") and v
        }
        if trips:
            total = sum(trips.values())
            seconds = sum(
                v for k, v in g.items() if k.startswith("gateway_shared_roundtrip_seconds_sum{")
            )
            errors = {
                k.split('"')[1]: v
                for k, v in g.items()
                if k.startswith("gateway_shared_errors_total{") and v
            }
            text += (
                "; Redis round trips "
                + ", ".join(f"{op} {n:,.0f}" for op, n in sorted(trips.items()))
                + f" (mean {1000 * seconds / total:.1f} ms); errors "
                + (", ".join(f"{k} {v:,.0f}" for k, v in errors.items()) or "none")
                + f"; lock waits {metric(g, 'gateway_shared_lock_waits_total'):,.0f}, "
                f"take-overs {metric(g, 'gateway_shared_lock_takeovers_total'):,.0f}; "
                f"shared hits {metric(g, 'gateway_cache_requests_total', result='shared_hit'):,.0f}"
                f"; modes at the end {r['modes']}; log lines naming fallback mode "
                f"{r.get('fallback_log_lines', 0)}"
            )
        out.append(text)
    return out


def tables(doc: dict[str, Any]) -> list[str]:
    """The fleet section's markdown (used by the standalone report and by bench/report.py)."""
    limits = doc["limits"]
    lines = [
        f"Authlete (the emulator) allows {limits['rate']:g} calls/s, burst {limits['burst']}; "
        f"{limits['replicas']} replicas, `max_wait` {limits['max_wait']:g} s, `cache.ttl` "
        f"{limits['cache_ttl']:g} s; fresh replicas, an empty Redis and a full emulator bucket "
        "for every case and variant. Variants: "
        + "; ".join(f"`{k}` = {v}" for k, v in doc["variants"].items())
        + ".",
        "",
    ]
    if doc.get("shared_modes_at_start") and not doc.get("shared_active"):
        lines += [
            "**Shared mode was not active** on the `shared` replicas "
            f"(gateway_shared_mode at start: {sorted(set(doc.get('shared_modes_at_start', [])))}"
            "): their numbers are today's behaviour, not the feature's.",
            "",
        ]
    cases = doc["cases"]
    for name in ("burst", "sustained"):
        if name not in cases:
            continue
        lines += [
            f"### {name}",
            "",
            cases[name]["title"] + ".",
            "",
            "| variant | tokens served / sent | served vs burst + rate x duration | requests "
            "200 / 503 / other | p50 / p99 ms | Authlete calls | 429s | calls per token "
            "| budget refusals | duration s |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for variant, r in cases[name]["runs"].items():
            req = r["requests"]
            ok, busy = _status(req, "200"), _status(req, "503")
            lines.append(
                f"| {variant} | {r['tokens_served']:,} / {r['tokens_sent']:,} "
                f"| {_pct(r['served_ratio'])} of {r['ideal_served']:,.0f} "
                f"| {ok:,} / {busy:,} / {req['sent'] - ok - busy:,} "
                f"| {req['p50_ms']} / {req['p99_ms']} | {r['authlete_calls']:,} "
                f"| {r['authlete_429']:,} ({_pct(r['share_429'])}) | {r['calls_per_token']:.2f} "
                f"| {sum(r['budget_rejected'].values()):,.0f} | {r['wall_s']:.1f} |"
            )
        lines += ["", *_details(cases[name]["runs"]), ""]
    if "users" in cases:
        lines += [
            "### users",
            "",
            cases["users"]["title"] + ".",
            "",
            "| variant | requests | 200 | Authlete calls | 429s | hit ratio | p50 / p99 ms |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for variant, r in cases["users"]["runs"].items():
            req = r["requests"]
            lines.append(
                f"| {variant} | {req['sent']:,} | {_status(req, '200'):,} "
                f"| {r['authlete_calls']:,} | {r['authlete_429']:,} | {_pct(r['hit_ratio'])} "
                f"| {req['p50_ms']} / {req['p99_ms']} |"
            )
        lines += ["", *_details(cases["users"]["runs"]), ""]
    if "purge" in cases:
        lines += [
            "### purge",
            "",
            cases["purge"]["title"] + ".",
            "",
            "| variant | purge answer | purge call ms | refused after, per replica (s) | last "
            "| statuses after |",
            "|---|--:|--:|---|--:|---|",
        ]
        for variant, r in cases["purge"]["runs"].items():
            per = ", ".join("never" if t is None else f"{t:.3f}" for t in r["refused_after_s"])
            last = (
                f"{r['last_refused_s']:.3f} s"
                if r["last_refused_s"] is not None
                else f"not refused within {r['bound_s']:g} s"
            )
            lines.append(
                f"| {variant} | {r['purge_status']} | {r['purge_call_ms']} | {per} | {last} "
                f"| {r['statuses_after']} |"
            )
        lines += ["", *_details(cases["purge"]["runs"]), ""]
    if "uneven" in cases:
        lines += [
            "### uneven",
            "",
            cases["uneven"]["title"] + ". Pattern `one`: every token to one of the four "
            "replicas; `skew`: 70% / 10% / 10% / 10%.",
            "",
            "| pattern | variant | tokens sent | served | share of the budget (burst + rate x "
            "duration) | share of the demand | 429s |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for key, r in cases["uneven"]["runs"].items():
            pattern, variant = key.split("/")
            lines.append(
                f"| {pattern} | {variant} | {r['tokens_sent']:,} | {r['tokens_served']:,} "
                f"| {_pct(r['served_ratio'])} of {r['ideal_served']:,.0f} "
                f"| {_pct(r['demand_served'])} | {r['authlete_429']:,} |"
            )
        lines += ["", *_details(cases["uneven"]["runs"]), ""]
    return lines


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Fleet",
        "",
        f"{doc['started']} · gateway {doc.get('git', '?')} · {doc['elapsed_s']:.0f} s",
        "",
        "## Targets",
        "",
        "| target | goal | measured | result |",
        "|---|---|---|---|",
    ]
    for t in doc["targets"]:
        lines.append(
            f"| {t['description']} | {t['target']} | {t['measured']} | **{t['status']}** |"
        )
    lines += ["", "## Cases", "", *tables(doc)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _names(
    p: argparse.ArgumentParser, flag: str, raw: str, known: Sequence[str]
) -> tuple[str, ...]:
    names = tuple(n for n in raw.split(",") if n)
    bad = [n for n in names if n not in known]
    if bad:
        p.error(f"{flag}: unknown {', '.join(bad)}")
    return names


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    p.add_argument("--cases", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny loads, numbers moot")
    p.add_argument(
        "--sustained-seconds", type=float, help="seconds of the sustained case (default 20)"
    )
    p.add_argument("--users-rate", type=float, help="new users/s in the users case (default 20)")
    p.add_argument(
        "--emulator-latency", type=float, help="seconds per Authlete call (default 0.002)"
    )
    p.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="where fleet.md/.json go"
    )
    p.add_argument(
        "--gateway-root",
        type=Path,
        default=ROOT,
        help="run the gateway and the emulator from this source tree (its gateway/ package)",
    )
    p.add_argument("--keep-temp", action="store_true", help="keep the temp dir (logs, configs)")
    a = p.parse_args(argv)
    s = QUICK if a.quick else Settings()
    s = replace(
        s,
        cases=_names(p, "--cases", a.cases, CASES),
        variants=_names(p, "--variants", a.variants, VARIANTS),
    )
    if a.sustained_seconds is not None:
        s = replace(s, sustained_seconds=a.sustained_seconds)
    if a.users_rate is not None:
        s = replace(s, users_rate=a.users_rate)
    if a.emulator_latency is not None:
        s = replace(s, emulator_latency=a.emulator_latency)
    return s, a


def missing_tools() -> list[str]:
    return [t for t in ("redis-server",) if shutil.which(t) is None]


def git_state() -> str:
    def git(*args: str) -> str:
        import subprocess

        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "gateway")
    return f"{commit}{' + uncommitted changes in gateway/' if dirty else ''}"


def main(argv: Sequence[str] | None = None) -> int:
    settings, args = parse_args(argv)
    missing = missing_tools()
    if missing:
        print(
            f"bench.fleet: missing {', '.join(missing)} on PATH "
            "(apt-get install redis-server). The benchmark installs nothing itself.",
            file=sys.stderr,
        )
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-fleet-"))
    procs = Procs(workdir)
    keep = args.keep_temp
    started = time.time()
    t0 = time.monotonic()
    try:
        fleet = Fleet(procs, workdir, settings, args.gateway_root.resolve())
        fleet.start_infra()
        doc = fleet.run()
        doc["targets"] = targets(doc)
        doc["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
        doc["elapsed_s"] = round(time.monotonic() - t0, 1)
        doc["git"] = git_state() if args.gateway_root.resolve() == ROOT else str(args.gateway_root)
        args.out.mkdir(parents=True, exist_ok=True)
        text = markdown(doc)
        (args.out / "fleet.md").write_text(text)
        (args.out / "fleet.json").write_text(json.dumps(doc, indent=2) + "\n")
        print(text)
        _log(f"wrote {args.out / 'fleet.md'} and {args.out / 'fleet.json'}")
        return 0
    except BenchError as exc:
        _log(f"bench.fleet: {exc}")
        keep = True
        return 1
    except KeyboardInterrupt:
        _log("bench.fleet: interrupted")
        return 130
    finally:
        procs.stop_all()
        if keep:
            _log(f"bench.fleet: temp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
