"""`python -m bench`: the gateway measured side by side with its references, on loopback.

See bench/README.md for what each scenario and configuration means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from bench import decision, fleet, measure, nginx, report, wrk
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
from bench.report import NOISY, RETRIES

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
EXIT_MISSING = 2

SERVICE_ID = "715948317"
SERVICE_TOKEN = "emulator-access-token"
SCOPE = "bench.read"
HOT_TOKEN = "bench-hot-token"
WARM_PREFIX = "warm-"
WARM_TOKENS = 10_000
ZIPF_S = 1.0
LONG_LIFETIME = 7 * 86400
SLOW_LATENCY = 0.010  # the second emulator latency of the cold c1 cases
INTROSPECTION_PATH = f"/api/{SERVICE_ID}/auth/introspection"

AfterRun = Callable[[str, "report.Run", wrk.WrkResult, dict[str, str]], None]

MAIN_CONFIGS = ("direct", "nginx", "bare", "client", "gateway", "gateway-w2")
FLEET_CONFIGS = ("gateway", "gateway-shared")  # the hot case of the fleet scenario
ALL_CONFIGS = (*MAIN_CONFIGS, "gateway-shared", "decision")
SCENARIOS = ("hot", "warm", "cold", "large", "bodies", "decision")  # the default set
ALL_SCENARIOS = (*SCENARIOS, "fleet")  # fleet (issue 11) needs redis-server: on request


@dataclass(frozen=True)
class Options:
    duration: float
    repeats: int
    scenarios: tuple[str, ...]
    configs: tuple[str, ...] | None  # None: each case's defaults
    emulator_latency: float
    out: Path
    quick: bool
    large_entries: int
    small_entries: int
    warmup: float
    keep_temp: bool
    profile: bool
    retry_noisy: bool


@dataclass
class Target:
    """One configuration under test: where wrk sends requests, which process tree pays."""

    name: str
    port: int
    child: Child
    path: str | None = None  # replaces the case's path (the emulator reference)
    script: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Every process tree the configuration is charged for, by role, when it is more than
    # `child` (decision: the nginx in front and the gateway it asks); empty = `child` alone.
    parts: dict[str, Child] = field(default_factory=dict)
    # Decisions the gateway counted so far (decision: its gateway_decisions_total), read
    # before and after each run.
    decisions: Callable[[], int] | None = None

    def charged(self) -> dict[str, Child]:
        return self.parts or {self.name: self.child}


def _parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the gateway against nginx and a bare aiohttp proxy on loopback.",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="runs per case and config (default 3)")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(ALL_SCENARIOS)} (default "
        f"{','.join(SCENARIOS)}; fleet needs redis-server)",
    )
    p.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated subset of {','.join(ALL_CONFIGS)} (default: each case's own set)",
    )
    p.add_argument(
        "--emulator-latency",
        type=float,
        default=0.002,
        help="seconds the Authlete emulator adds per call (default 0.002)",
    )
    p.add_argument(
        "--out", type=Path, default=BENCH_DIR / "results", help="report directory (bench/results)"
    )
    p.add_argument("--quick", action="store_true", help="smoke mode: duration 1, repeats 1")
    p.add_argument(
        "--large-entries",
        type=int,
        default=1_000_000,
        help="entries pre-filled for the large-cache case (default 1000000)",
    )
    p.add_argument(
        "--no-retry",
        action="store_true",
        help=f"do not repeat a run during which other processes used > {NOISY} cores",
    )
    p.add_argument("--keep-temp", action="store_true", help="keep the temp dir (logs, configs)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of the benchmark: py-spy profile of the gateway under the hot c64 load",
    )
    a = p.parse_args(argv)
    scenarios = tuple(s for s in a.scenarios.split(",") if s)
    unknown = [s for s in scenarios if s not in ALL_SCENARIOS]
    if unknown:
        p.error(f"--scenarios: unknown {', '.join(unknown)}")
    configs: tuple[str, ...] | None = None
    if a.configs:
        configs = tuple(c for c in a.configs.split(",") if c)
        bad = [c for c in configs if c not in ALL_CONFIGS]
        if bad:
            p.error(f"--configs: unknown {', '.join(bad)}")
    duration, repeats = (1.0, 1) if a.quick else (a.duration, a.repeats)
    if duration < 1 or repeats < 1:
        p.error("--duration must be >= 1 and --repeats >= 1")
    return Options(
        duration=duration,
        repeats=repeats,
        scenarios=scenarios,
        configs=configs,
        emulator_latency=a.emulator_latency,
        out=a.out,
        quick=a.quick,
        large_entries=a.large_entries,
        small_entries=1000,
        warmup=1.0,
        keep_temp=a.keep_temp,
        profile=a.profile,
        retry_noisy=not a.no_retry,
    )


def missing_tools(scenarios: Sequence[str] = SCENARIOS) -> list[str]:
    tools = ("wrk", "nginx", "taskset", *(("redis-server",) if "fleet" in scenarios else ()))
    return [t for t in tools if _which(t) is None]


def _which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found is None and tool == "nginx" and os.access("/usr/sbin/nginx", os.X_OK):
        return "/usr/sbin/nginx"
    return found


def _fmt_count(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Bench:
    def __init__(self, opts: Options, workdir: Path, procs: Procs) -> None:
        self.opts = opts
        self.workdir = workdir
        self.procs = procs
        self.wrk = _which("wrk") or "wrk"
        self.nginx = _which("nginx") or "nginx"
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise BenchError("needs at least 2 CPUs (load generator and proxy are pinned apart)")
        self.cpu_load, self.cpu_proxy = str(cpus[0]), str(cpus[1])
        self.cpu_both = f"{cpus[0]},{cpus[1]}"
        self.runs: list[report.Run] = []
        self.pinning: dict[str, str] = {"wrk (load generator)": self.cpu_load}
        self.skipped: dict[str, str] = {}
        self.notes: dict[str, list[str]] = {}
        self.large_cache: dict[str, Any] = {}
        self.large_names = (
            f"gateway-{_fmt_count(opts.small_entries)}",
            f"gateway-{_fmt_count(opts.large_entries)}",
        )
        self._cold_capacity: dict[tuple[str, str], int] = {}
        self._token_seq = 0
        self.upstream: Child
        self.emulator: Child
        self.upstream_port = 0
        self.emulator_port = 0
        self.workers_supported = False
        self.fleet: fleet.Fleet | None = None  # the fleet scenario's Redis, emulator, replicas
        self.fleet_doc: dict[str, Any] | None = None
        self.shared_modes: dict[str, str] = {}

    # ------------------------------------------------------------------ infrastructure
    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def env(self) -> dict[str, str]:
        path = os.environ.get("PYTHONPATH", "")
        return {
            "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT),
            "GATEWAY_LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }

    def start_infra(self) -> None:
        self.upstream_port, self.emulator_port = free_ports(2)
        argv = nginx.nginx_argv(
            self.nginx,
            self.workdir,
            "upstream",
            nginx.upstream_conf(self.workdir, self.upstream_port),
        )
        self.upstream = self.procs.start("upstream-nginx", argv, self.cpu_load)
        wait_until("upstream nginx", lambda: http_ok(self.upstream_port), self.upstream)
        self.pinning["upstream nginx"] = measure.allowed_cpus(self.upstream.pid)
        problem = nginx.check_upload_reads_body(self.upstream_port)
        if problem:
            raise BenchError(f"upstream /upload does not read the body first: {problem}")

        self.emulator = self.procs.start(
            "emulator",
            self.python(
                "-m",
                "gateway",
                "emulator",
                "--listen",
                f"127.0.0.1:{self.emulator_port}",
                "--latency",
                str(self.opts.emulator_latency),
                "--access-token",
                SERVICE_TOKEN,
                "--service-id",
                SERVICE_ID,
            ),
            self.cpu_load,
            env=self.env(),
        )
        wait_until(
            "emulator", lambda: http_ok(self.emulator_port, "/_emulator/stats"), self.emulator
        )
        self.pinning["emulator"] = measure.allowed_cpus(self.emulator.pid)
        self.emu("/_emulator/tokens", {"token": HOT_TOKEN, "scopes": [SCOPE], "lifetime": 86400})
        self.emu(
            "/_emulator/tokens/bulk",
            {"prefix": WARM_PREFIX, "count": WARM_TOKENS, "scopes": [SCOPE], "lifetime": 86400},
        )
        help_text = subprocess.run(
            self.python("-m", "gateway", "run", "--help"),
            capture_output=True,
            text=True,
            env={**os.environ, **self.env()},
            check=False,
        ).stdout
        self.workers_supported = "--workers" in help_text
        if not self.workers_supported:
            self.skipped["gateway-w2"] = "`gateway run` has no --workers option in this checkout"

    def emu(self, path: str, doc: dict[str, Any] | None = None) -> Any:
        return emulator_call(self.emulator_port, path, doc)

    def set_latency(self, seconds: float) -> None:
        self.emu("/_emulator/config", {"latency": seconds})

    # ------------------------------------------------------------------ configurations
    def gateway_yaml(
        self,
        port: int,
        admin: int,
        max_entries: int = 100_000,
        redis_url: str | None = None,
        decision: bool = False,
    ) -> Path:
        """The gateway's config; `decision`: decision mode (the decision scenario), answering
        the nginx in front on loopback, its one route without an upstream."""
        path = self.workdir / f"gateway-{port}.yaml"
        shared = (
            f"""\
shared:  # the fleet scenario's gateway-shared: verdicts also in Redis, one budget there
  redis_url: "{redis_url}"
  secret: "${{GATEWAY_SHARED_SECRET}}"
"""
            if redis_url
            else ""
        )
        decision_mode = (
            f"""\
trusted_proxies: ["127.0.0.1/32"]  # the nginx in front
decision:
  path: {nginx.DECISION_PATH}
"""
            if decision
            else ""
        )
        route_upstream = (
            "" if decision else f'    upstream: "http://127.0.0.1:{self.upstream_port}"\n'
        )
        path.write_text(
            f"""\
listen: "127.0.0.1:{port}"
admin_listen: "127.0.0.1:{admin}"
shutdown_timeout: 1
authlete:
  base_url: "http://127.0.0.1:{self.emulator_port}"
  service_id: "{SERVICE_ID}"
  access_token: "{SERVICE_TOKEN}"
  allow_insecure_http: true  # the emulator on loopback
  timeout: 10
  rate_limit:  # the call budget, lifted: the emulator has no rate limit, and the cold
    rate: 1000000  # cases measure the cost of the call path, not the 100/s default policy
    burst: 1000000
cache:
  ttl: 600
  max_entries: {max_entries}
{decision_mode}routes:
  - name: bench
    path_prefix: /
{route_upstream}    scopes: [{SCOPE}]
{shared}"""
        )
        return path

    def pick(self, defaults: Sequence[str], supported: Sequence[str] = MAIN_CONFIGS) -> list[str]:
        chosen = self.opts.configs
        names = [c for c in supported if c in chosen] if chosen else list(defaults)
        if "gateway-w2" in names and not self.workers_supported:
            names.remove("gateway-w2")
        return names

    @contextlib.contextmanager
    def proxies(self, names: Sequence[str]) -> Iterator[dict[str, Target]]:
        started: list[Child] = []
        targets: dict[str, Target] = {}
        try:
            for name in names:
                if name == "direct":
                    targets[name] = Target(name, self.upstream_port, self.upstream)
                    continue
                if name == "decision":
                    front, gateway, port = decision.start(self, started, HOT_TOKEN)
                    admin = gateway.extra["admin"]
                    assert isinstance(admin, int)
                    targets[name] = Target(
                        name,
                        port,
                        front,
                        parts={"nginx": front, "gateway": gateway},
                        decisions=functools.partial(decision.decisions_counted, admin),
                    )
                    self.pinning[decision.ROLE] = (
                        f"nginx {measure.allowed_cpus(front.pid)} + gateway "
                        f"{measure.allowed_cpus(gateway.pid)}"
                    )
                    continue
                child, port = self._start_proxy(name)
                started.append(child)
                targets[name] = Target(name, port, child)
                self.pinning[_ROLE.get(name, name)] = measure.allowed_cpus(child.pid)
            for target in targets.values():
                self.sanity(target)
            yield targets
        finally:
            for child in started:
                self.procs.stop(child)

    def _start_proxy(self, name: str) -> tuple[Child, int]:
        port, admin = free_ports(2)
        if name == "nginx":
            argv = nginx.nginx_argv(
                self.nginx,
                self.workdir,
                "nginx-proxy",
                nginx.proxy_conf(self.workdir, port, self.upstream_port),
            )
            child = self.procs.start("nginx-proxy", argv, self.cpu_proxy)
            wait_until("nginx proxy", lambda: http_ok(port), child)
        elif name in ("bare", "client"):
            child = self.procs.start(
                f"{name}-proxy",
                self.python(
                    str(BENCH_DIR / f"{name}_proxy.py"),
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--upstream",
                    f"http://127.0.0.1:{self.upstream_port}",
                ),
                self.cpu_proxy,
                env=self.env(),
            )
            wait_until(f"{name} proxy", lambda: http_ok(port), child)
        elif name in ("gateway", "gateway-w2", "gateway-shared"):
            env = self.env()
            redis_url = None
            if name == "gateway-shared":
                if self.fleet is None:
                    raise BenchError("gateway-shared runs in the fleet scenario only (its Redis)")
                redis_url = self.fleet.infra.redis_url
                env = {**self.fleet.infra.env(), **env}
            config = self.gateway_yaml(port, admin, redis_url=redis_url)
            extra = ["--workers", "2"] if name == "gateway-w2" else []
            child = self.procs.start(
                name,
                self.python("-m", "gateway", "run", "-c", str(config), *extra),
                self.cpu_both if name == "gateway-w2" else self.cpu_proxy,
                env=env,
            )
            child.extra["admin"] = admin
            wait_until(name, lambda: http_ok(admin, "/readyz"), child)
        else:
            raise BenchError(f"unknown configuration {name}")
        return child, port

    def start_prefilled(self, entries: int) -> tuple[Child, int, int]:
        port, admin = free_ports(2)
        config = self.gateway_yaml(port, admin, max_entries=entries + 10_000)
        child = self.procs.start(
            f"prefilled-{entries}",
            self.python(
                str(BENCH_DIR / "prefilled_gateway.py"),
                "-c",
                str(config),
                "--entries",
                str(entries),
                "--tracemalloc-sample",
                str(min(entries, 100_000)),
            ),
            self.cpu_proxy,
            env=self.env(),
        )
        return child, port, admin

    def sanity(self, target: Target) -> None:
        """Each configuration answers what the benchmark expects before it is measured."""
        auth = {"Authorization": f"Bearer {HOT_TOKEN}"}
        status, body = http_request(target.port, "GET", "/", headers=auth)
        if status != 200 or body.decode(errors="replace") != nginx.SMALL_BODY:
            raise BenchError(f"{target.name}: GET / answered {status} {body[:80]!r}")
        if target.name.startswith("gateway") or target.name == "decision":
            status, _ = http_request(target.port, "GET", "/")
            if status != 401:
                raise BenchError(f"{target.name}: GET / without a token answered {status}")
        if target.name == "decision":
            decision.sanity(target.port, target.parts["gateway"], HOT_TOKEN, SCOPE)

    def sanity_bodies(self, target: Target) -> None:
        auth = {"Authorization": f"Bearer {HOT_TOKEN}"}
        status, body = http_request(target.port, "GET", "/download", headers=auth)
        if status != 200 or len(body) != nginx.BODY_BYTES:
            raise BenchError(f"{target.name}: download answered {status}, {len(body)} bytes")
        upload = b"x" * nginx.BODY_BYTES
        status, body = http_request(target.port, "POST", "/upload", body=upload, headers=auth)
        if status != 200:
            raise BenchError(f"{target.name}: upload answered {status} {body[:80]!r}")

    # ------------------------------------------------------------------ measuring
    def run_case(
        self,
        scenario: str,
        case: str,
        title: str,
        targets: dict[str, Target],
        configs: Sequence[str],
        *,
        connections: int,
        path: str = "/",
        script: str = "static",
        env: dict[str, str] | None = None,
        before_run: Callable[[str], dict[str, str]] | None = None,
        after_run: AfterRun | None = None,
        warmup_script: str | None = None,
        warmup_env: Callable[[str], dict[str, str]] | None = None,
        warmup_seconds: Callable[[str], float] | None = None,
        case_meta: dict[str, Any] | None = None,
    ) -> None:
        names = [c for c in configs if c in targets]
        if not names:
            return
        base_env = {"BENCH_TOKEN": HOT_TOKEN, "BENCH_PATH": path, **(env or {})}
        for name in names:  # warm-up: pools open, caches filled; not measured
            t = targets[name]
            seconds = warmup_seconds(name) if warmup_seconds is not None else self.opts.warmup
            wenv = {**base_env, **t.env, **(warmup_env(name) if warmup_env else {})}
            wrk.run(
                self.wrk,
                f"http://127.0.0.1:{t.port}{t.path or path}",
                wrk.script(self.workdir, t.script or warmup_script or script),
                connections=connections,
                duration=seconds,
                cpus=self.cpu_load,
                env=wenv,
            )
        for repeat in range(1, self.opts.repeats + 1):
            for name in names:  # interleaved: A B C A B C ...
                t = targets[name]

                def make_env(t: Target = t, name: str = name) -> dict[str, str]:
                    env = {**base_env, **t.env}
                    if before_run is not None:
                        env.update(before_run(name))  # e.g. a fresh cold token pool
                    return env

                run, result, run_env = self._measure(
                    t, t.path or path, t.script or script, connections, make_env
                )
                run.update(
                    scenario=scenario,
                    case=case,
                    title=title,
                    config=name,
                    repeat=repeat,
                    connections=connections,
                )
                if case_meta:
                    run["case_meta"] = case_meta
                if after_run is not None:
                    after_run(name, run, result, run_env)
                self.runs.append(run)
                _log(
                    f"[{scenario}/{case}] {name:<12} #{repeat}: {run['rps']:>9,.0f} req/s  "
                    f"p50 {run['p50_ms']:.2f}  p99 {run['p99_ms']:.2f} ms  "
                    f"cpu {run['cpu_us_per_req']:.0f} µs/req  rss {run['peak_rss_mib']:.0f} MiB"
                    + (f"  socket errors {run['errors']}" if run["errors"] else "")
                    + (f"  non-2xx {run['non_2xx']}" if run["non_2xx"] else "")
                )

    def _measure(
        self,
        t: Target,
        path: str,
        script: str,
        connections: int,
        make_env: Callable[[], dict[str, str]],
    ) -> tuple[report.Run, wrk.WrkResult, dict[str, str]]:
        """One run, repeated (at most RETRIES times, each with a fresh env) while processes
        outside the benchmark take more than NOISY cores; the quietest attempt is kept."""
        env = make_env()
        run, result = self._measure_once(t, path, script, connections, env)
        attempts = 1
        while run["other_cpu_cores"] > NOISY and self.opts.retry_noisy and attempts <= RETRIES:
            _log(f"    {t.name}: other load {run['other_cpu_cores']:.2f} cores, repeating the run")
            env2 = make_env()
            again, result2 = self._measure_once(t, path, script, connections, env2)
            attempts += 1
            if again["other_cpu_cores"] < run["other_cpu_cores"]:
                run, result, env = again, result2, env2
        run["attempts"] = attempts
        return run, result, env

    def _measure_once(
        self, t: Target, path: str, script: str, connections: int, env: dict[str, str]
    ) -> tuple[report.Run, wrk.WrkResult]:
        self.emu("/_emulator/reset", {})
        charged = t.charged()
        roots = {c.pid for c in charged.values()}
        ours = roots | {self.upstream.pid, self.emulator.pid}
        before = {pid: measure.cpu_seconds(pid) for pid in ours}
        tree_before = _trees_cpu(roots)
        self_before = _own_cpu()
        decisions0 = t.decisions() if t.decisions else 0
        gateway = t.parts.get("gateway") or (t.child if t.name.startswith("gateway") else None)
        split0 = decision.user_system_seconds(gateway.pid) if gateway else (0.0, 0.0)
        busy0, steal0 = measure.system_cpu()
        wall0 = time.monotonic()
        result = wrk.run(
            self.wrk,
            f"http://127.0.0.1:{t.port}{path}",
            wrk.script(self.workdir, script),
            connections=connections,
            duration=self.opts.duration,
            cpus=self.cpu_load,
            env=env,
        )
        busy1, steal1 = measure.system_cpu()
        wall = time.monotonic() - wall0
        after = {pid: measure.cpu_seconds(pid) for pid in ours}
        tree_after = _trees_cpu(roots)
        split1 = decision.user_system_seconds(gateway.pid) if gateway else (0.0, 0.0)
        self_after = _own_cpu()  # this process and its reaped children: wrk, taskset
        delta = {pid: after[pid] - before[pid] for pid in ours}
        other = (busy1 - busy0) - sum(delta.values()) - (self_after - self_before)
        time.sleep(0.25)  # let introspections of the last in-flight requests land
        decisions = t.decisions() - decisions0 if t.decisions else None
        stats = self.emu("/_emulator/stats")
        if not t.child.alive():
            raise BenchError(f"{t.name} died during the run; log {t.child.log}")
        n = max(result.requests, 1)
        loaded = result.duration_s if result.duration_s > 0 else wall  # wrk's own clock
        lat = result.latency_us
        server = sum(delta[pid] for pid in roots)
        run: report.Run = {
            "rps": result.rps,
            "requests": result.requests,
            "p50_ms": lat["p50"] / 1000,
            "p90_ms": lat["p90"] / 1000,
            "p99_ms": lat["p99"] / 1000,
            "p999_ms": lat["p999"] / 1000,
            "mean_ms": lat["mean"] / 1000,
            "max_ms": lat["max"] / 1000,
            "cpu_us_per_req": server * 1e6 / n,
            # The server tree's CPU seconds per second of load (wrk's duration; the delta
            # also spans wrk's start-up, when the server idles), and the requests it served
            # per CPU second (= 1e6 / CPU µs per request; the workers target uses it).
            "cpu_cores": server / loaded,
            "req_per_cpu_s": result.requests / server if server else 0.0,
            # Per process of the server tree (supervisor and workers), busiest first.
            "cpu_cores_by_process": sorted(
                (
                    (tree_after[pid] - tree_before[pid]) / loaded
                    for pid in tree_after
                    if pid in tree_before
                ),
                reverse=True,
            ),
            "upstream_cpu_us_per_req": delta[self.upstream.pid] * 1e6 / n,
            "emulator_cpu_us_per_req": delta[self.emulator.pid] * 1e6 / n,
            "peak_rss_mib": sum(measure.peak_rss_bytes(pid) for pid in roots) / 2**20,
            "errors": result.socket_errors,
            "non_2xx": result.non_2xx,
            "authlete_calls": int(stats["calls"]),
            "distinct_tokens_called": int(stats["distinct_tokens_called"]),
            "max_calls_per_token": int(stats["max_calls_per_token"]),
            "tokens_sent": sum(result.sent_by_thread),
            "pinned_cpus": (
                " + ".join(f"{role} {measure.allowed_cpus(c.pid)}" for role, c in charged.items())
                if t.parts
                else measure.allowed_cpus(t.child.pid)
            ),
            "other_cpu_cores": max(other, 0.0) / wall,
            "steal_cores": (steal1 - steal0) / wall,
        }
        if decisions is not None:
            run["decisions"] = decisions
            run["decisions_per_req"] = decisions / n
        if t.parts:  # each part's share of the configuration's CPU (decision: nginx, gateway)
            run["cpu_parts_us_per_req"] = {
                role: delta[c.pid] * 1e6 / n for role, c in charged.items()
            }
        if gateway is not None:  # the gateway's own CPU, whatever else the request used
            run["gateway_cpu_us_per_req"] = delta[gateway.pid] * 1e6 / n
            # ... between the interpreter (user) and the kernel (system: loopback I/O)
            run["gateway_user_us_per_req"] = (split1[0] - split0[0]) * 1e6 / n
            run["gateway_system_us_per_req"] = (split1[1] - split0[1]) * 1e6 / n
        return run, result

    # ------------------------------------------------------------------ scenarios
    def scenario_hot(self) -> None:
        c64 = self.pick(MAIN_CONFIGS)
        c1 = self.pick(("direct", "nginx", "bare", "client", "gateway"))
        with self.proxies(sorted(set(c64) | set(c1), key=MAIN_CONFIGS.index)) as targets:
            self.run_case(
                "hot",
                "c64",
                "one valid token, every request a cache hit, 64 connections (wrk -t1 -c64)",
                targets,
                c64,
                connections=64,
            )
            self.run_case(
                "hot",
                "c1",
                "the same at 1 connection: the latency each hop adds",
                targets,
                c1,
                connections=1,
            )
        w2_cores = [
            "[" + ", ".join(f"{c:.2f}" for c in r["cpu_cores_by_process"]) + "]"
            for r in self.runs
            if r["scenario"] == "hot" and r["case"] == "c64" and r["config"] == "gateway-w2"
        ]
        if w2_cores:
            self.notes.setdefault("hot", []).append(
                "gateway-w2, cores used per process (busiest first; supervisor included) in each "
                "c64 run: " + ", ".join(w2_cores) + ". wrk, the upstream nginx and the emulator "
                f"share CPU {self.cpu_load} with one worker: the workers target therefore compares "
                "requests per CPU-second (see Targets), not raw req/s"
            )

    def scenario_warm(self) -> None:
        names = self.pick(("bare", "gateway", "gateway-w2"))
        warm_env = {
            "BENCH_TOKEN_PREFIX": WARM_PREFIX,
            "BENCH_TOKEN_COUNT": str(WARM_TOKENS),
            "BENCH_ZIPF_S": str(ZIPF_S),
        }

        def hits(name: str, run: report.Run, result: wrk.WrkResult, env: dict[str, str]) -> None:
            if name.startswith("gateway"):
                run["cache_hit_ratio"] = 1 - run["authlete_calls"] / max(result.requests, 1)

        with self.proxies(names) as targets:
            self.run_case(
                "warm",
                "zipf",
                f"{WARM_TOKENS:,} tokens drawn from a Zipf distribution (s={ZIPF_S:g}) by the wrk "
                "script, 64 connections; warm-up walks every token first",
                targets,
                names,
                connections=64,
                script="zipf",
                env=warm_env,
                warmup_script="walk",
                warmup_env=lambda _name: {"BENCH_WRAP": "1"},
                warmup_seconds=self._warm_warmup,
                after_run=hits,
            )
        ratios = [
            f"{r['config']} {r['cache_hit_ratio']:.4f}"
            for r in self.runs
            if r["scenario"] == "warm" and "cache_hit_ratio" in r
        ]
        self.notes.setdefault("warm", []).append(
            "cache hit ratio per run (1 - Authlete calls / responses): " + ", ".join(ratios)
        )

    def _warm_warmup(self, name: str) -> float:
        """Long enough for the walk to reach every token at ~2k introspections/s (the emulator's
        pace), twice over for two workers (each has its own cache); the bare proxy needs none."""
        if self.opts.quick or not name.startswith("gateway"):
            return max(self.opts.warmup, 2.0) if name.startswith("gateway") else self.opts.warmup
        return 15.0 if name == "gateway-w2" else 8.0

    def _cold_tokens(self, case: str) -> Callable[[str], dict[str, str]]:
        def make(name: str) -> dict[str, str]:
            if name == "emulator":
                return {}
            guess = 8000 if case == "c64" else 1500
            count = self._cold_capacity.get((case, name), int(guess * self.opts.duration) + 2000)
            self._token_seq += 1
            prefix = f"cold{self._token_seq}-"
            self.emu(
                "/_emulator/tokens/bulk",
                {"prefix": prefix, "count": count, "scopes": [SCOPE], "lifetime": 86400},
            )
            return {"BENCH_TOKEN_PREFIX": prefix, "BENCH_TOKEN_COUNT": str(count)}

        return make

    def _cold_check(self, case: str) -> AfterRun:
        def check(name: str, run: report.Run, result: wrk.WrkResult, env: dict[str, str]) -> None:
            if name == "emulator":
                return
            created = int(env["BENCH_TOKEN_COUNT"])
            per_thread = created // max(len(result.sent_by_thread), 1)
            exhausted = any(s > per_thread for s in result.sent_by_thread)
            calls, distinct = run["authlete_calls"], run["distinct_tokens_called"]
            run.update(
                tokens_created=created,
                tokens_exhausted=exhausted,
                cold_ok=(
                    not exhausted
                    and run["max_calls_per_token"] == 1
                    and calls == distinct
                    and result.non_2xx == 0
                    and result.socket_errors == 0
                    and result.requests <= distinct <= run["tokens_sent"]
                ),
            )
            # Size the next run's pool from this one: 1.5x what was used, doubled after a miss.
            used = max(result.sent_by_thread, default=0) * len(result.sent_by_thread)
            wanted = int(used * 1.5) + 2000
            if exhausted:
                wanted = max(wanted, created * 2)
            self._cold_capacity[(case, name)] = wanted

        return check

    def scenario_cold(self) -> None:
        c64 = self.pick(("gateway", "gateway-w2"), ("gateway", "gateway-w2"))
        c1 = self.pick(("gateway",), ("gateway", "gateway-w2"))
        with self.proxies(sorted(set(c64) | set(c1), key=MAIN_CONFIGS.index)) as targets:
            targets["emulator"] = Target(
                "emulator",
                self.emulator_port,
                self.emulator,
                path=INTROSPECTION_PATH,
                script="static",
                env={
                    "BENCH_TOKEN": SERVICE_TOKEN,
                    "BENCH_METHOD": "POST",
                    "BENCH_BODY": json.dumps({"token": HOT_TOKEN}),
                    "BENCH_CONTENT_TYPE": "application/json",
                },
            )
            cold_env = {"BENCH_TOKEN_PREFIX": "", "BENCH_TOKEN_COUNT": "0"}
            self.run_case(
                "cold",
                "c64",
                "every request carries a token never seen before (wrk script walks bulk-created "
                "tokens), 64 connections",
                targets,
                c64,
                connections=64,
                script="walk",
                env=cold_env,
                before_run=self._cold_tokens("c64"),
                after_run=self._cold_check("c64"),
                warmup_env=self._cold_tokens("warmup"),
            )
            latencies = sorted({self.opts.emulator_latency, SLOW_LATENCY})
            try:
                for latency in latencies:
                    self.set_latency(latency)
                    case = f"c1-{latency * 1000:g}ms"
                    configs = (["emulator"] if "gateway" in c1 else []) + c1
                    self.run_case(
                        "cold",
                        case,
                        f"cold at 1 connection, emulator latency {latency * 1000:g} ms; "
                        "`emulator` = wrk straight to the emulator's introspection endpoint",
                        targets,
                        configs,
                        connections=1,
                        script="walk",
                        env=cold_env,
                        before_run=self._cold_tokens(case),
                        after_run=self._cold_check(case),
                        warmup_env=self._cold_tokens("warmup"),
                        case_meta={"latency_s": latency},
                    )
            finally:
                self.set_latency(self.opts.emulator_latency)
        self._cold_latency_notes()
        cold_runs = [r for r in self.runs if r["scenario"] == "cold" and "cold_ok" in r]
        self.notes.setdefault("cold", []).append(
            "Authlete calls per run (calls / distinct tokens / max per token / responses / "
            "tokens sent): "
            + "; ".join(
                f"{r['case']} {r['config']} {r['authlete_calls']}/{r['distinct_tokens_called']}/"
                f"{r['max_calls_per_token']}/{r['requests']}/{r['tokens_sent']}"
                + ("" if r["cold_ok"] else " FAILED")
                for r in cold_runs
            )
        )

    def _cold_latency_notes(self) -> None:
        for case in sorted({r["case"] for r in self.runs if r["scenario"] == "cold"}):
            if not case.startswith("c1-"):
                continue
            p50 = {
                name: statistics.median(
                    r["p50_ms"] for r in self.runs if r["case"] == case and r["config"] == name
                )
                for name in ("emulator", "gateway")
                if any(r["case"] == case and r["config"] == name for r in self.runs)
            }
            if len(p50) < 2:
                continue
            latency = float(case[3:-2])
            self.notes.setdefault("cold", []).append(
                f"{case}: gateway p50 {p50['gateway']:.2f} ms = configured latency {latency:g} ms "
                f"+ {p50['gateway'] - latency:.2f} ms; the emulator alone answers at p50 "
                f"{p50['emulator']:.2f} ms, so the gateway path (wrk → gateway → emulator → "
                f"gateway → upstream → gateway → wrk) adds {p50['gateway'] - p50['emulator']:.2f} "
                "ms to what a direct Authlete call costs"
            )

    def scenario_large(self) -> None:
        if not self.pick(("gateway",), ("gateway",)):
            return
        small_name, big_name = self.large_names
        started: list[Child] = []
        try:
            targets: dict[str, Target] = {}
            pending: list[tuple[str, Child, int]] = []
            for name, entries in (
                (small_name, self.opts.small_entries),
                (big_name, self.opts.large_entries),
            ):
                child, port, _admin = self.start_prefilled(entries)
                started.append(child)
                pending.append((name, child, port))
            for name, child, port in pending:
                wait_until(f"{name} pre-fill", _prefill_report_ready(child), child, timeout=600)
                self.large_cache[name] = _prefill_report(child)
                targets[name] = Target(name, port, child)
                self.pinning["prefilled gateways"] = measure.allowed_cpus(child.pid)
                self.sanity(targets[name])
            self.run_case(
                "large",
                "c64",
                f"the hot case with {self.opts.large_entries:,} vs {self.opts.small_entries:,} "
                "entries already in the verdict cache (bench/prefilled_gateway.py)",
                targets,
                [small_name, big_name],
                connections=64,
            )
        finally:
            for child in started:
                self.procs.stop(child)
        notes = self.notes.setdefault("large", [])
        for name, info in self.large_cache.items():
            text = (
                f"{name}: {info['entries']:,} entries, RSS "
                f"+{(info['rss_after'] - info['rss_before']) / 2**20:.1f} MiB "
                f"= **{info['bytes_per_entry']:.0f} B/entry** (RSS delta, tracemalloc off), "
                f"filled in {info['fill_seconds']:.1f} s; then {info['gc_tracked_objects']:,} "
                f"GC-tracked objects, one full collection {info['gc_full_collection_ms']:.0f} ms"
            )
            if "tracemalloc_bytes_per_entry" in info:
                text += (
                    f"; tracemalloc on a {info['tracemalloc_sample']:,}-entry sample: "
                    f"{info['tracemalloc_bytes_per_entry']:.0f} B/entry as filled, "
                    f"{info['tracemalloc_bytes_per_entry_via_parser']:.0f} B/entry when the "
                    "verdicts come from `parse_answer`"
                )
            notes.append(text)

    def scenario_bodies(self) -> None:
        small = self.pick(("gateway",))
        big = self.pick(("nginx", "bare", "client", "gateway"))
        with self.proxies(sorted(set(small) | set(big), key=MAIN_CONFIGS.index)) as targets:
            for target in targets.values():
                self.sanity_bodies(target)
            self.run_case(
                "bodies",
                "small",
                "small GET (the baseline of the peak-RSS comparison), 64 connections",
                targets,
                small,
                connections=64,
            )
            self.run_case(
                "bodies",
                "download",
                "GET of a 1 MiB static file from the upstream, 64 connections",
                targets,
                big,
                connections=64,
                path="/download",
            )
            self.run_case(
                "bodies",
                "upload",
                "POST of a 1 MiB body, read whole by the upstream before it answers, 64 "
                "connections",
                targets,
                big,
                connections=64,
                path="/upload",
                env={
                    "BENCH_METHOD": "POST",
                    "BENCH_BODY_BYTES": str(nginx.BODY_BYTES),
                    "BENCH_CONTENT_TYPE": "application/octet-stream",
                },
            )
        self.notes.setdefault("bodies", []).append(
            "peak RSS is VmHWM since the process started; the cases run in the order small → "
            "download → upload on the same processes, so each value is the peak so far"
        )

    def scenario_fleet(self) -> None:
        """Issue 11: the hot path with `shared` on and off (wrk, pinned, as `hot`), then four
        replicas on one Authlete budget (bench/fleet.py: its own Redis, rate-limited emulator
        and upstream; the replicas are not pinned)."""
        settings = replace(
            fleet.QUICK if self.opts.quick else fleet.Settings(),
            emulator_latency=self.opts.emulator_latency,
        )
        self.fleet = fleet.Fleet(self.procs, self.workdir, settings)
        self.fleet.start_infra(self.cpu_load)
        self.pinning["redis, fleet emulator, fleet upstream"] = self.cpu_load
        self.pinning["fleet replicas"] = "not pinned"
        redis_port = self.fleet.infra.redis_port
        names = self.pick(FLEET_CONFIGS, FLEET_CONFIGS)
        commands: dict[str, int] = {}

        def before(name: str) -> dict[str, str]:
            commands[name] = fleet.redis_commands_processed(redis_port)
            return {}

        def after(name: str, run: report.Run, result: wrk.WrkResult, env: dict[str, str]) -> None:
            # A local-level hit never touches Redis: count what Redis did during the run.
            # (The count includes this INFO call and, with retried runs, every attempt.)
            delta = fleet.redis_commands_processed(redis_port) - commands.get(name, 0) - 1
            run["redis_commands"] = delta
            run["redis_commands_per_req"] = delta / max(result.requests, 1)

        modes: dict[str, str] = {}
        with self.proxies(names) as targets:
            for name, target in targets.items():
                admin = target.child.extra.get("admin")
                if isinstance(admin, int):
                    modes[name] = fleet.shared_mode(fleet.scrape(admin))
            self.run_case(
                "fleet",
                "hot-c64",
                "one valid token, every request a cache hit, 64 connections: the gateway with "
                "and without `shared:` (gateway-shared: Redis behind the per-process level)",
                targets,
                names,
                connections=64,
                before_run=before,
                after_run=after,
            )
        notes = self.notes.setdefault("fleet", [])
        notes.append(
            "shared mode at start (gateway_shared_mode): "
            + ", ".join(f"{k} {v}" for k, v in modes.items())
        )
        notes.append(
            "Redis commands during each hot run (all clients; a local-level hit sends none): "
            + ", ".join(
                f"{r['config']} {r['redis_commands']} ({r['redis_commands_per_req']:.5f}/req)"
                for r in self.runs
                if r["scenario"] == "fleet" and "redis_commands" in r
            )
        )
        self.shared_modes = modes
        _log("== fleet: four replicas")
        doc = self.fleet.run()
        doc["targets"] = fleet.targets(doc)
        self.fleet_doc = doc

    def scenario_decision(self) -> None:
        """Issue 13: nginx `auth_request` asking the gateway in decision mode, against the
        gateway as the proxy, on the same core (bench/decision.py)."""
        decision.scenario(self)

    # ------------------------------------------------------------------ report
    def document(self, started: dt.datetime, elapsed: float) -> dict[str, Any]:
        results = report.aggregate(self.runs)
        for scenario, notes in self.notes.items():
            if scenario in results:
                results[scenario]["notes"] = list(notes)
        split = report.halves(results)
        for scenario, notes in report.halves_notes(split).items():
            results[scenario]["halves"] = split[scenario]
            results[scenario].setdefault("notes", [])[:0] = notes
        extra = {
            "skipped": self.skipped,
            "large_cache": self.large_cache,
            "large_names": self.large_names,
            "shared_modes": self.shared_modes,
        }
        return {
            "meta": {
                "started": started.isoformat(timespec="seconds"),
                "elapsed_s": round(elapsed, 1),
                "machine": _machine(),
                "git": _git_state(),
                "versions": _versions(self.wrk, self.nginx),
                "duration": self.opts.duration,
                "repeats": self.opts.repeats,
                "quick": self.opts.quick,
                "emulator_latency": self.opts.emulator_latency,
                "scenarios": list(self.opts.scenarios),
                "configs": list(self.opts.configs) if self.opts.configs else None,
            },
            "pinning": self.pinning,
            "skipped": self.skipped,
            "large_cache": self.large_cache,
            "targets": report.targets(results, extra)
            + (self.fleet_doc["targets"] if self.fleet_doc else []),
            "scenarios": results,
            **({"fleet": self.fleet_doc} if self.fleet_doc else {}),
        }


def _trees_cpu(roots: set[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for root in roots:
        out.update(measure.cpu_seconds_by_pid(root))
    return out


_PREFILL_MARK = "PREFILL_JSON "


def _prefill_report(child: Child) -> dict[str, Any] | None:
    for line in child.log.read_text(errors="replace").splitlines():
        if line.startswith(_PREFILL_MARK):
            found: dict[str, Any] = json.loads(line[len(_PREFILL_MARK) :])
            return found
    return None


def _prefill_report_ready(child: Child) -> Callable[[], bool]:
    return lambda: _prefill_report(child) is not None


_ROLE = {
    "nginx": "nginx proxy",
    "bare": "bare proxy",
    "client": "client proxy",
    "gateway": "gateway",
    "gateway-w2": "gateway-w2",
}


def _machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} CPUs, Linux {platform.release()}"


def _own_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _git_state() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "gateway")
    return f"{commit}{' + uncommitted changes in gateway/' if dirty else ''}"


def _versions(wrk_path: str, nginx_path: str) -> dict[str, str]:
    from importlib.metadata import version

    def first_line(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        text = (done.stdout + done.stderr).strip().splitlines()
        return text[0] if text else "?"

    return {
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "uvloop": version("uvloop"),
        "nginx": first_line([nginx_path, "-v"]),
        "wrk": first_line([wrk_path, "-v"]),
    }


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    opts = _parse_args(argv)
    missing = missing_tools(opts.scenarios)
    if missing:
        redis = " redis-server" if "redis-server" in missing else ""
        print(
            f"bench: missing {', '.join(missing)} on PATH. Install them with:\n"
            f"    apt-get install wrk nginx{redis}      # Debian/Ubuntu; taskset is in util-linux\n"
            "The benchmark installs nothing itself.",
            file=sys.stderr,
        )
        return EXIT_MISSING
    if opts.profile and shutil.which("py-spy") is None:
        print("bench --profile: py-spy not found; `pip install py-spy`", file=sys.stderr)
        return EXIT_MISSING
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    # Also when started in the background by a shell that ignores SIGINT for its jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    workdir.chmod(0o755)  # nginx workers (user nobody when run as root) read files in here
    procs = Procs(workdir)
    keep = opts.keep_temp
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    try:
        bench = Bench(opts, workdir, procs)
        bench.start_infra()
        if opts.profile:
            from bench.profile import profile_hot

            profile_hot(bench)
            return 0
        for scenario in opts.scenarios:
            _log(f"== {scenario}")
            getattr(bench, f"scenario_{scenario}")()
        doc = bench.document(started, time.monotonic() - t0)
        md, js = report.write(doc, opts.out)
        print(md.read_text())
        _log(f"wrote {md} and {js}")
        return 0
    except BenchError as exc:
        _log(f"bench: {exc}")
        keep = True  # the logs of the failed step are in there
        return 1
    except KeyboardInterrupt:
        _log("bench: interrupted")
        return 130
    finally:
        procs.stop_all()
        if keep:
            _log(f"bench: temp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
