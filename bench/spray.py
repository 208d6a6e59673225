"""`python -m bench.spray`: token spraying against the Authlete call budget (issue 10 §5).

An unauthenticated client sends random tokens at five times the budget while a legitimate
client uses fresh valid tokens and a set of known users keep re-using theirs past the cache
TTL. Reported: the share of 200s each of them gets, with the features off (the baseline),
with the spray from one address (the per-client quota applies) and from many addresses (it
does not). Everything is real processes on loopback: the Authlete emulator with its rate
limit, `gateway run`, a minimal upstream; the load comes from this process, from chosen
127.0.0.x source addresses. See bench/README.md, "Token spraying".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

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

ROOT = Path(__file__).resolve().parent.parent
SERVICE_ID = "715948317"
SERVICE_TOKEN = "emulator-access-token"
SCOPE = "bench.read"

RATE = 50.0  # the emulator's (Authlete's) limit, calls/s...
BURST = 100  # ...and burst
# The gateway's budget: Authlete's limit itself, as the product's defaults are (100/200).
BUDGET = (RATE, BURST)
SPRAY_FACTOR = 5.0  # the sprayer sends this many times Authlete's limit
FRESH_RATE = 5.0  # requests/s of the legitimate client, each with a never-seen valid token
STEADY_USERS = 20  # known users re-using their token every 0.05-0.25 s
RETURNING_USERS = 10  # known users coming back every 2.2-3.0 s, after their entry expired
TTL = 2.0  # cache.ttl: short, so entries expire during a run
PER_CLIENT = 10.0  # authlete.rate_limit.per_client when the features are on
REFRESH_AHEAD = 0.1  # cache.refresh_ahead when on (the product's default)
MANY_SOURCES = 200  # addresses of the spray from many clients (1.25 requests/s each)
EMULATOR_LATENCY = 0.005
REQUEST_TIMEOUT = 10.0

TARGET_FRESH = 0.95
TARGET_KNOWN = 0.99

FRESH_SOURCE = "127.0.0.20"
ONE_SPRAYER = ("127.0.0.10",)


def known_source(i: int) -> str:
    """Each known user has an address of its own, as real users do."""
    return f"127.0.2.{i + 1}"


@dataclass(frozen=True)
class RunSpec:
    name: str
    per_client: float
    refresh_ahead: float
    spray_sources: tuple[str, ...]
    what: str


RUNS = (
    RunSpec("baseline", 0.0, 0.0, ONE_SPRAYER, "features off, the spray from one address"),
    RunSpec("one-client", PER_CLIENT, REFRESH_AHEAD, ONE_SPRAYER, "the spray from one address"),
    RunSpec(
        "many-clients",
        PER_CLIENT,
        REFRESH_AHEAD,
        tuple(f"127.0.1.{i}" for i in range(1, MANY_SOURCES + 1)),
        f"the spray from {MANY_SOURCES} addresses, each under the quota",
    ),
)


@dataclass
class Tally:
    """What one class of client got."""

    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def add(self, status: int, seconds: float) -> None:
        self.statuses[status] += 1
        self.latencies.append(seconds)

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> float:
        return self.statuses[200] / self.sent if self.sent else 0.0

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {
            "sent": self.sent,
            "ok_fraction": round(self.ok, 4),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "p50_ms": round(1000 * statistics.median(ordered), 1) if ordered else None,
            "p99_ms": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 1) if ordered else None,
        }


# ---------------------------------------------------------------- the load


async def get(port: int, token: str, source: str) -> tuple[int, float]:
    """One request on a fresh connection from `source`; (status, seconds), status 0 if none."""
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), REQUEST_TIMEOUT
        )
    except (OSError, TimeoutError):
        return 0, time.monotonic() - started
    try:
        writer.write(
            b"GET /resource HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n\r\n"
        )
        line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
        status = int(line.split(b" ", 2)[1])
        await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT)
    except (OSError, TimeoutError, ValueError, IndexError):
        status = 0
    finally:
        writer.close()
    return status, time.monotonic() - started


async def open_loop(rate: float, seconds: float, one: Callable[[int], Awaitable[None]]) -> None:
    """Start `one(i)` `rate` times a second for `seconds`, whether or not earlier ones ended."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    running: set[asyncio.Task[None]] = set()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(i))
        running.add(task)
        task.add_done_callback(running.discard)
    if running:
        await asyncio.gather(*running)


async def user(
    port: int,
    token: str,
    source: str,
    pause: tuple[float, float],
    until: float,
    tally: Tally,
    rng: random.Random,
) -> None:
    """A known user: a request, a pause drawn from `pause`, again, until `until`."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(rng.uniform(0, pause[1]))
    while loop.time() < until:
        tally.add(*await get(port, token, source))
        await asyncio.sleep(rng.uniform(*pause))


async def load(
    port: int, spec: RunSpec, fresh: Sequence[str], known: Sequence[str], seconds: float
) -> dict[str, Tally]:
    tallies = {"spray": Tally(), "fresh": Tally(), "known": Tally()}
    rng = random.Random(10)
    sources = spec.spray_sources

    async def spray(i: int) -> None:
        token = "spray-" + os.urandom(16).hex()
        tallies["spray"].add(*await get(port, token, sources[i % len(sources)]))

    async def legit(i: int) -> None:
        tallies["fresh"].add(*await get(port, fresh[i], FRESH_SOURCE))

    until = asyncio.get_running_loop().time() + seconds
    steady, returning = (0.05, 0.25), (2.2, 3.0)
    users = [
        user(
            port,
            token,
            known_source(i),
            steady if i < STEADY_USERS else returning,
            until,
            tallies["known"],
            rng,
        )
        for i, token in enumerate(known)
    ]
    await asyncio.gather(
        open_loop(RATE * SPRAY_FACTOR, seconds, spray),
        open_loop(FRESH_RATE, seconds, legit),
        *users,
    )
    return tallies


# ---------------------------------------------------------------- processes


def _env(gateway_root: Path = ROOT) -> dict[str, str]:
    return {
        "PYTHONPATH": str(gateway_root),
        "GATEWAY_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }


class Spray:
    def __init__(
        self,
        procs: Procs,
        workdir: Path,
        seconds: float,
        gateway_root: Path,
        budget: tuple[float, int],
        settle: float = BURST / RATE,
    ) -> None:
        self.procs = procs
        self.settle = settle  # after the warm-up: the emulator's bucket fills again
        self.workdir = workdir
        self.seconds = seconds
        self.gateway_root = gateway_root
        self.budget = budget
        self.emulator_port = 0
        self.upstream_port = 0

    def start_infra(self) -> None:
        self.emulator_port, self.upstream_port = free_ports(2)
        python = sys.executable
        emulator = self.procs.start(
            "emulator",
            [
                *(python, "-m", "gateway", "emulator"),
                *("--listen", f"127.0.0.1:{self.emulator_port}"),
                *("--service-id", SERVICE_ID, "--access-token", SERVICE_TOKEN),
                *("--latency", str(EMULATOR_LATENCY), "--rate", str(RATE), "--burst", str(BURST)),
            ],
            None,
            env=_env(),
        )
        wait_until("emulator", lambda: http_ok(self.emulator_port, "/_emulator/stats"), emulator)
        upstream = self.procs.start(
            "upstream",
            [python, "-m", "bench.spray", "--serve-upstream", str(self.upstream_port)],
            None,
            env=_env(),
        )
        wait_until("upstream", lambda: http_ok(self.upstream_port, "/"), upstream)

    def emu(self, path: str, doc: dict[str, Any] | None = None) -> Any:
        return emulator_call(self.emulator_port, path, doc)

    def gateway(self, spec: RunSpec) -> tuple[Child, int, int]:
        port, admin = free_ports(2)
        rate, burst = self.budget
        config = self.workdir / f"gateway-{spec.name}.yaml"
        config.write_text(
            f"""\
listen: "127.0.0.1:{port}"
admin_listen: "127.0.0.1:{admin}"
shutdown_timeout: 1
authlete:
  base_url: "http://127.0.0.1:{self.emulator_port}"
  service_id: "{SERVICE_ID}"
  access_token: "{SERVICE_TOKEN}"
  allow_insecure_http: true  # the emulator on loopback
  rate_limit: {{rate: {rate:g}, burst: {burst}, max_wait: 1, per_client: {spec.per_client:g}}}
cache:
  ttl: {TTL:g}
  refresh_ahead: {spec.refresh_ahead:g}
routes:
  - name: spray
    path_prefix: /
    upstream: "http://127.0.0.1:{self.upstream_port}"
    scopes: [{SCOPE}]
"""
        )
        child = self.procs.start(
            f"gateway-{spec.name}",
            [sys.executable, "-m", "gateway", "run", "-c", str(config)],
            None,
            env=_env(self.gateway_root),
            cwd=self.gateway_root,  # `python -m` puts the working directory first on sys.path
        )
        wait_until(f"gateway ({spec.name})", lambda: http_ok(admin, "/readyz"), child)
        return child, port, admin

    def run(self, spec: RunSpec) -> dict[str, Any]:
        fresh_count = int(FRESH_RATE * self.seconds) + 1
        self.emu(
            "/_emulator/tokens/bulk",
            {"prefix": f"fresh-{spec.name}-", "count": fresh_count, "scopes": [SCOPE]},
        )
        known = [f"known-{spec.name}-{i}" for i in range(STEADY_USERS + RETURNING_USERS)]
        self.emu(
            "/_emulator/tokens/bulk",
            {"prefix": f"known-{spec.name}-", "count": len(known), "scopes": [SCOPE]},
        )
        fresh = [f"fresh-{spec.name}-{i}" for i in range(fresh_count)]
        child, port, admin = self.gateway(spec)
        try:
            # The known users' tokens are introspected once before the spray...
            warm = asyncio.run(_warm(port, known))
            if warm != [200] * len(known):
                raise BenchError(f"warm-up of the known tokens answered {Counter(warm)}")
            time.sleep(self.settle)  # ...and the emulator's bucket is full again.
            self.emu("/_emulator/reset", {})
            _log(f"  {spec.name}: {spec.what}, {self.seconds:g} s")
            tallies = asyncio.run(load(port, spec, fresh, known, self.seconds))
            emulator = self.emu("/_emulator/stats")
            metrics = _scrape(admin)
        finally:
            self.procs.stop(child)
        return {
            "run": spec.name,
            "what": spec.what,
            "per_client": spec.per_client,
            "refresh_ahead": spec.refresh_ahead,
            "spray_sources": len(spec.spray_sources),
            **{name: tally.summary() for name, tally in tallies.items()},
            "authlete_calls": emulator["calls"],
            "authlete_429": emulator["throttled"],
            "gateway": metrics,
        }


async def _warm(port: int, tokens: Sequence[str]) -> list[int]:
    return [(await get(port, token, known_source(i)))[0] for i, token in enumerate(tokens)]


_METRICS = {
    'gateway_authlete_budget_rejected_total{reason="client_quota"}': "rejected_client_quota",
    'gateway_authlete_budget_rejected_total{reason="wait_timeout"}': "rejected_wait_timeout",
    'gateway_cache_refreshes_total{result="active"}': "refreshes",
    'gateway_cache_requests_total{result="hit"}': "cache_hits",
    'gateway_cache_requests_total{result="miss"}': "cache_misses",
    "gateway_authlete_throttled_total": "authlete_429_seen",
}


def _scrape(admin: int) -> dict[str, float]:
    status, raw = http_request(admin, "GET", "/metrics")
    if status != 200:
        raise BenchError(f"gateway /metrics: {status}")
    found: dict[str, float] = {}
    for line in raw.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name in _METRICS:
            found[_METRICS[name]] = float(value)
    return {label: found.get(label, 0.0) for label in _METRICS.values()}


# ---------------------------------------------------------------- the report


def verdicts(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target: measured, and met or not."""
    by = {r["run"]: r for r in results}
    targets: list[dict[str, Any]] = []

    def add(tid: str, run: str, who: str, goal: float) -> None:
        if run not in by:
            return
        got = by[run][who]["ok_fraction"]
        targets.append(
            {"id": tid, "run": run, "who": who, "goal": goal, "measured": got, "met": got >= goal}
        )

    add("spray-one-fresh", "one-client", "fresh", TARGET_FRESH)
    add("spray-one-known", "one-client", "known", TARGET_KNOWN)
    add("spray-many-known", "many-clients", "known", TARGET_KNOWN)
    return targets


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Token spraying",
        "",
        f"Authlete (the emulator) allows {RATE:g} calls/s (burst {BURST}), the gateway's "
        f"budget is {doc['settings']['budget_rate']:g}/s (burst "
        f"{doc['settings']['budget_burst']}); "
        f"spray {RATE * SPRAY_FACTOR:g} random tokens/s; legitimate client {FRESH_RATE:g} "
        f"fresh tokens/s; {STEADY_USERS} steady + {RETURNING_USERS} returning known users; "
        f"cache.ttl {TTL:g} s; {doc['seconds']:g} s per run; gateway from {doc['gateway_root']}.",
        "",
        "| run | per_client | refresh_ahead | spray from | fresh 200 | known 200 | known p99 "
        "| spray 401/503 | Authlete calls (429) | quota refusals | refreshes |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in doc["runs"]:
        spray = r["spray"]["statuses"]
        lines.append(
            f"| {r['run']} | {r['per_client']:g} | {r['refresh_ahead']:g} | "
            f"{r['spray_sources']} | {100 * r['fresh']['ok_fraction']:.1f}% "
            f"({r['fresh']['sent']}) | {100 * r['known']['ok_fraction']:.2f}% "
            f"({r['known']['sent']}) | {r['known']['p99_ms']} ms | "
            f"{spray.get('401', 0)}/{spray.get('503', 0)} | {r['authlete_calls']} "
            f"({r['authlete_429']}) | {r['gateway']['rejected_client_quota']:g} | "
            f"{r['gateway']['refreshes']:g} |"
        )
    lines += ["", "| target | goal | measured | status |", "|---|--:|--:|---|"]
    for t in doc["targets"]:
        status = "MET" if t["met"] else "NOT MET"
        lines.append(
            f"| {t['id']} ({t['who']}, {t['run']}) | ≥ {100 * t['goal']:g}% | "
            f"{100 * t['measured']:.2f}% | {status} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the upstream and main


def serve_upstream(port: int) -> None:
    """The upstream: 200 and a two-byte body for anything (its cost is not the question)."""
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.spray", description=__doc__)
    p.add_argument("--duration", type=float, default=15.0, help="seconds per run (default 15)")
    p.add_argument(
        "--runs",
        default=",".join(r.name for r in RUNS),
        help=f"comma-separated subset of {','.join(r.name for r in RUNS)}",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke mode: 1 s per run, numbers meaningless"
    )
    p.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="where spray.md/.json go"
    )
    p.add_argument(
        "--gateway-root",
        type=Path,
        default=ROOT,
        help="run `gateway run` from this source tree (e.g. an export of an older commit)",
    )
    p.add_argument(
        "--budget",
        default=f"{BUDGET[0]:g},{BUDGET[1]}",
        help="the gateway's authlete.rate_limit as RATE,BURST (default %(default)s)",
    )
    p.add_argument("--keep-temp", action="store_true", help="keep the temp dir (logs, configs)")
    p.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = [r.name for r in RUNS]
    unknown = [n for n in args.runs.split(",") if n and n not in names]
    if unknown:
        p.error(f"--runs: unknown {', '.join(unknown)}")
    try:
        rate, burst = args.budget.split(",")
        args.budget = (float(rate), int(burst))
    except ValueError:
        p.error("--budget: RATE,BURST, e.g. 45,90")
    if args.quick:
        args.duration = 1.0
    if args.duration < 1:
        p.error("--duration must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.serve_upstream is not None:
        serve_upstream(args.serve_upstream)
        return 0
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-spray-"))
    procs = Procs(workdir)
    keep = args.keep_temp
    try:
        bench = Spray(
            procs,
            workdir,
            args.duration,
            args.gateway_root.resolve(),
            args.budget,
            settle=0.2 if args.quick else BURST / RATE,
        )
        bench.start_infra()
        results = [bench.run(spec) for spec in RUNS if spec.name in args.runs.split(",")]
        doc = {
            "seconds": args.duration,
            "gateway_root": str(args.gateway_root.resolve()),
            "settings": {
                "rate": RATE,
                "burst": BURST,
                "budget_rate": args.budget[0],
                "budget_burst": args.budget[1],
                "spray_rate": RATE * SPRAY_FACTOR,
                "fresh_rate": FRESH_RATE,
                "steady_users": STEADY_USERS,
                "returning_users": RETURNING_USERS,
                "ttl": TTL,
                "emulator_latency": EMULATOR_LATENCY,
            },
            "runs": results,
            "targets": verdicts(results),
            "run_specs": [asdict(s) | {"spray_sources": len(s.spray_sources)} for s in RUNS],
        }
        args.out.mkdir(parents=True, exist_ok=True)
        text = markdown(doc)
        (args.out / "spray.md").write_text(text)
        (args.out / "spray.json").write_text(json.dumps(doc, indent=2) + "\n")
        print(text)
        _log(f"wrote {args.out / 'spray.md'} and {args.out / 'spray.json'}")
        return 0
    except BenchError as exc:
        _log(f"bench.spray: {exc}")
        keep = True
        return 1
    except KeyboardInterrupt:
        _log("bench.spray: interrupted")
        return 130
    finally:
        procs.stop_all()
        if keep:
            _log(f"bench.spray: temp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
