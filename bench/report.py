"""From runs to report: medians with their spread, ratios to the references, the targets,
and the markdown/JSON files."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench import fleet

REFERENCES = ("direct", "nginx", "bare", "client")
NOISY = 0.25  # cores used by other processes during a run before it is repeated
RETRIES = 2  # at most this many repeats of a disturbed run

# Hot-path goals (hot scenario, medians of the interleaved runs).
CPU_VS_NGINX = 2.5  # gateway CPU µs per request <= this x nginx proxy_pass's (c64)
CPU_VS_NGINX_MOONSHOT = 2.0
RPS_VS_BARE = 3.0  # gateway req/s >= this x the bare aiohttp proxy's (c64)
C1_P50_SLACK_MS = 0.05  # gateway's added p50 (vs direct) <= nginx's added p50 + this (c1)
WORKERS_SCALING = 1.8  # two workers vs one, projected on free cores (see _workers_target)
SHARED_CPU = 1.03  # fleet: gateway-shared CPU µs per request <= this x the gateway's (hot c64)
# Decision mode (issue 13; decision scenario, c64, medians): the gateway's own CPU per decision
# <= this x its CPU per proxied request, and nginx + gateway on the gateway's core >= this x
# the requests/s of the gateway proxying alone there.
DECISION_GATEWAY_CPU = 0.5
DECISION_RPS = 1.5

METRICS = (
    "rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "cpu_us_per_req",
    "cpu_cores",
    "req_per_cpu_s",
    "peak_rss_mib",
    "other_cpu_cores",
)
REQUIRED_KEYS = (*METRICS, "requests", "errors", "non_2xx", "runs", "vs", "pinned_cpus")

Run = dict[str, Any]


def spread(values: Iterable[float]) -> dict[str, float]:
    vs = [float(v) for v in values]
    if not vs:
        return {"median": 0.0, "min": 0.0, "max": 0.0}
    return {"median": statistics.median(vs), "min": min(vs), "max": max(vs)}


def aggregate(runs: Sequence[Run]) -> dict[str, Any]:
    """scenario -> case -> config -> metrics, keeping the order in which they ran."""
    out: dict[str, Any] = {}
    for run in runs:
        case = out.setdefault(run["scenario"], {"cases": {}})["cases"].setdefault(
            run["case"], {"title": run["title"], "connections": run["connections"], "configs": {}}
        )
        case.update(run.get("case_meta", {}))
        case["configs"].setdefault(run["config"], []).append(run)
    for scenario in out.values():
        for case in scenario["cases"].values():
            grouped: dict[str, list[Run]] = case["configs"]
            configs: dict[str, Any] = {}
            for name, rs in grouped.items():
                entry: dict[str, Any] = {m: spread(r[m] for r in rs) for m in METRICS}
                entry["requests"] = sum(r["requests"] for r in rs)
                entry["errors"] = sum(r["errors"] for r in rs)
                entry["non_2xx"] = sum(r["non_2xx"] for r in rs)
                entry["pinned_cpus"] = rs[0]["pinned_cpus"]
                if all("gateway_cpu_us_per_req" in r for r in rs):
                    entry["gateway_cpu_us_per_req"] = spread(
                        r["gateway_cpu_us_per_req"] for r in rs
                    )
                if all("cpu_parts_us_per_req" in r for r in rs):
                    entry["cpu_parts_us_per_req"] = {
                        role: spread(r["cpu_parts_us_per_req"][role] for r in rs)
                        for role in rs[0]["cpu_parts_us_per_req"]
                    }
                entry["runs"] = rs
                configs[name] = entry
            for entry in configs.values():
                entry["vs"] = _versus(entry, configs)
            case["configs"] = configs
    return out


def _versus(entry: dict[str, Any], configs: dict[str, Any]) -> dict[str, Any]:
    vs: dict[str, Any] = {}
    for ref in REFERENCES:
        other = configs.get(ref)
        if other is None:
            continue
        vs[ref] = {
            "rps_ratio": _ratio(entry["rps"]["median"], other["rps"]["median"]),
            "cpu_ratio": _ratio(
                entry["cpu_us_per_req"]["median"], other["cpu_us_per_req"]["median"]
            ),
            "p50_added_ms": entry["p50_ms"]["median"] - other["p50_ms"]["median"],
            "p99_added_ms": entry["p99_ms"]["median"] - other["p99_ms"]["median"],
        }
    return vs


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _config(
    results: dict[str, Any], scenario: str, case: str, config: str
) -> dict[str, Any] | None:
    found: dict[str, Any] | None = (
        results.get(scenario, {}).get("cases", {}).get(case, {}).get("configs", {}).get(config)
    )
    return found


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


def targets(results: dict[str, Any], extra: dict[str, Any]) -> list[dict[str, Any]]:
    out = _hot_targets(results)
    out.append(_workers_target(results, extra))
    large = results.get("large", {}).get("cases", {}).get("c64", {}).get("configs", {})
    prefill: dict[str, Any] = extra.get("large_cache", {})
    small_name, big_name = extra.get("large_names", ("gateway-1k", "gateway-1M"))
    if small_name in large and big_name in large:
        p_small = large[small_name]["p99_ms"]["median"]
        p_big = large[big_name]["p99_ms"]["median"]
        r = p_big / p_small if p_small else float("inf")
        out.append(
            _target(
                "large-p99",
                "Large cache: hot p99 with 1,000,000 entries vs 1,000",
                "<= 1.5x",
                f"{r:.2f}x ({p_big:.2f} vs {p_small:.2f} ms)",
                r <= 1.5,
            )
        )
    else:
        out.append(_target("large-p99", "Large cache: p99 1M vs 1k entries", "<= 1.5x", None, None))
    big = prefill.get(big_name)
    if big:
        b = float(big["bytes_per_entry"])
        out.append(
            _target(
                "large-bytes",
                "Large cache: bytes per entry (RSS delta / entries, tracemalloc off)",
                "<= 400 B",
                f"{b:.0f} B",
                b <= 400,
            )
        )
    else:
        out.append(_target("large-bytes", "Large cache: bytes per entry", "<= 400 B", None, None))

    cold = results.get("cold", {}).get("cases", {})
    cold_runs = [
        r
        for case in cold.values()
        for name, cfg in case["configs"].items()
        if name.startswith("gateway")
        for r in cfg["runs"]
    ]
    if cold_runs:
        bad = [r for r in cold_runs if not r.get("cold_ok", False)]
        calls = sum(r["authlete_calls"] for r in cold_runs)
        distinct = sum(r["distinct_tokens_called"] for r in cold_runs)
        worst = max(r["max_calls_per_token"] for r in cold_runs)
        out.append(
            _target(
                "cold-calls",
                "Cold path: Authlete calls per distinct token (every cold run)",
                "max_calls_per_token == 1 and calls == distinct tokens",
                f"{calls:,} calls for {distinct:,} distinct tokens, max {worst} per token; "
                f"{len(bad)} of {len(cold_runs)} runs failed the check",
                not bad and worst == 1 and calls == distinct,
            )
        )
    else:
        out.append(_target("cold-calls", "Cold path: one call per token", "== 1", None, None))
    latency_cases = [(k, v) for k, v in cold.items() if "latency_s" in v]
    if latency_cases:
        for name, case in latency_cases:
            g = case["configs"].get("gateway")
            lat_ms = case["latency_s"] * 1000
            if g is None:
                continue
            added = g["p50_ms"]["median"] - lat_ms
            out.append(
                _target(
                    f"cold-added-{name}",
                    f"Cold path, c1, emulator latency {lat_ms:g} ms: gateway p50 minus it",
                    "< 1 ms",
                    f"{added:.2f} ms (p50 {g['p50_ms']['median']:.2f} ms)",
                    added < 1.0,
                )
            )
    else:
        out.append(_target("cold-added", "Cold path: added latency", "< 1 ms", None, None))

    bodies = results.get("bodies", {}).get("cases", {})
    small = bodies.get("small", {}).get("configs", {}).get("gateway")
    big_runs = [
        r
        for case in ("download", "upload")
        for r in bodies.get(case, {}).get("configs", {}).get("gateway", {}).get("runs", [])
    ]
    if small and big_runs:
        base = small["peak_rss_mib"]["max"]
        peak = max(r["peak_rss_mib"] for r in big_runs)
        out.append(
            _target(
                "streaming",
                "Streaming: gateway peak RSS with 1 MiB bodies vs small bodies",
                "<= +20 MiB",
                f"+{peak - base:.1f} MiB ({peak:.1f} vs {base:.1f} MiB)",
                peak - base <= 20.0,
            )
        )
    else:
        out.append(_target("streaming", "Streaming: peak RSS", "<= +20 MiB", None, None))
    out += _decision_targets(results)
    if "fleet" in results:
        out.append(_fleet_hot_target(results, extra))
    return out


def _decision_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 13: what an ingress asking the gateway (nginx auth_request) saves against the
    gateway proxying, both on the gateway's core (c64, medians of the interleaved runs)."""
    dec = _config(results, "decision", "c64", "decision")
    gw = _config(results, "decision", "c64", "gateway")
    both = dec is not None and gw is not None
    out: list[dict[str, Any]] = []
    tid = "decision-gateway-cpu"
    desc = (
        "Decision mode: the gateway's own CPU per decision (nginx auth_request) vs its CPU per "
        "proxied request (c64)"
    )
    goal = f"<= {DECISION_GATEWAY_CPU:.1f}x"
    if both and dec and gw and "gateway_cpu_us_per_req" in dec and gw["cpu_us_per_req"]["median"]:
        d = dec["gateway_cpu_us_per_req"]["median"]
        g = gw["cpu_us_per_req"]["median"]
        total = dec["cpu_us_per_req"]["median"]
        out.append(
            _target(
                tid,
                desc,
                goal,
                f"{d / g:.2f}x ({d:.1f} vs {g:.1f} µs/req; nginx + gateway together "
                f"{total:.1f} µs/req, {total / g:.2f}x)",
                d / g <= DECISION_GATEWAY_CPU,
            )
        )
    else:
        out.append(_target(tid, desc, goal, None, None))
    tid = "decision-rps"
    desc = (
        "Decision mode: requests/s of nginx auth_request + the gateway vs the gateway proxying "
        "alone, on the same core (c64)"
    )
    goal = f">= {DECISION_RPS:.1f}x"
    if both and dec and gw and gw["rps"]["median"]:
        d, g = dec["rps"]["median"], gw["rps"]["median"]
        out.append(
            _target(
                tid,
                desc,
                goal,
                f"{d / g:.2f}x ({d:,.0f} vs {g:,.0f} req/s; CPUs: {dec['pinned_cpus']} vs "
                f"gateway {gw['pinned_cpus']})",
                d / g >= DECISION_RPS,
            )
        )
    else:
        out.append(_target(tid, desc, goal, None, None))
    return out


def _fleet_hot_target(results: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Issue 11: a local-level hit never touches Redis, so `shared` costs the hot path
    (almost) nothing."""
    tid = "fleet-hot-cpu"
    desc = "Fleet, hot path: CPU per request with `shared` on vs off (c64)"
    goal = f"<= {SHARED_CPU:.2f}x"
    on = _config(results, "fleet", "hot-c64", "gateway-shared")
    off = _config(results, "fleet", "hot-c64", "gateway")
    if not (on and off and off["cpu_us_per_req"]["median"]):
        return _target(tid, desc, goal, None, None)
    a, b = on["cpu_us_per_req"]["median"], off["cpu_us_per_req"]["median"]
    mode = extra.get("shared_modes", {}).get("gateway-shared", "?")
    inactive = "" if mode == "shared" else f" (shared mode at start: {mode})"
    commands = [r.get("redis_commands_per_req", 0.0) for r in on["runs"]]
    return _target(
        tid,
        desc,
        goal,
        f"{a / b:.3f}x ({a:.1f} vs {b:.1f} µs/req; Redis commands per request "
        f"{max(commands, default=0.0):.5f}){inactive}",
        a / b <= SHARED_CPU,
    )


def _hot_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    gw = _config(results, "hot", "c64", "gateway")
    ngx = _config(results, "hot", "c64", "nginx")
    for tid, factor, label in (
        ("hot-cpu-nginx", CPU_VS_NGINX, "Hot path: gateway CPU per request vs nginx proxy_pass"),
        (
            "hot-cpu-nginx-moonshot",
            CPU_VS_NGINX_MOONSHOT,
            "Hot path (moonshot): gateway CPU per request vs nginx proxy_pass",
        ),
    ):
        desc, goal = f"{label} (c64)", f"<= {factor:.1f}x"
        if gw and ngx and ngx["cpu_us_per_req"]["median"]:
            g, n = gw["cpu_us_per_req"]["median"], ngx["cpu_us_per_req"]["median"]
            out.append(
                _target(
                    tid, desc, goal, f"{g / n:.2f}x ({g:.0f} vs {n:.0f} µs/req)", g / n <= factor
                )
            )
        else:
            out.append(_target(tid, desc, goal, None, None))

    bare = _config(results, "hot", "c64", "bare")
    desc, goal = (
        "Hot path: gateway requests/s vs the bare aiohttp proxy (c64)",
        f">= {RPS_VS_BARE:.1f}x",
    )
    if gw and bare and bare["rps"]["median"]:
        g, b = gw["rps"]["median"], bare["rps"]["median"]
        out.append(
            _target(
                "hot-rps-bare",
                desc,
                goal,
                f"{g / b:.2f}x ({g:,.0f} vs {b:,.0f} req/s)",
                g / b >= RPS_VS_BARE,
            )
        )
    else:
        out.append(_target("hot-rps-bare", desc, goal, None, None))

    g1 = _config(results, "hot", "c1", "gateway")
    n1 = _config(results, "hot", "c1", "nginx")
    d1 = _config(results, "hot", "c1", "direct")
    desc = "Hot path, c1: gateway's added p50 (vs direct) minus nginx's added p50"
    goal = f"<= {C1_P50_SLACK_MS:.2f} ms"
    if g1 and n1 and d1:
        direct = d1["p50_ms"]["median"]
        g_added = g1["p50_ms"]["median"] - direct
        n_added = n1["p50_ms"]["median"] - direct
        diff = g_added - n_added
        out.append(
            _target(
                "hot-c1-p50",
                desc,
                goal,
                f"{diff:+.3f} ms (gateway adds {g_added:.3f} ms, nginx {n_added:.3f} ms, "
                f"direct p50 {direct:.3f} ms)",
                diff <= C1_P50_SLACK_MS,
            )
        )
    else:
        out.append(_target("hot-c1-p50", desc, goal, None, None))
    return out


def _workers_target(results: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Two workers vs one on the hot c64 load, as capacity per CPU second.

    wrk, the upstream nginx and the emulator are pinned to CPU 0, and gateway-w2 runs on CPUs
    0 and 1, so its raw req/s is bounded by the share of CPU 0 the load generator leaves
    (1.1 to 1.5 cores for the two workers together in our runs). What would scale on free
    cores is how many requests each CPU second of the gateway serves: capacity = requests /
    CPU seconds of the whole process tree (= req/s / cores used; supervisor included). Two
    workers on two free cores serve 2 x capacity(w2) per second, one worker on its core 1 x
    capacity(w1), so the projected ratio is 2 x capacity(w2) / capacity(w1). It assumes each
    worker would get a whole core of its own (no SO_REUSEPORT imbalance, no SMT sibling,
    the load generator elsewhere); the raw req/s ratio is reported beside it.
    """
    tid = "workers"
    desc = (
        "--workers 2 vs one worker, projected on free cores: 2 x requests per gateway "
        "CPU-second of w2 / that of w1 (hot, c64)"
    )
    goal = f">= {WORKERS_SCALING:.1f}x"
    gw = _config(results, "hot", "c64", "gateway")
    w2 = _config(results, "hot", "c64", "gateway-w2")
    if not (gw and w2 and gw["req_per_cpu_s"]["median"] and gw["rps"]["median"]):
        note = extra.get("skipped", {}).get("gateway-w2")
        return _target(tid, desc, goal, f"skipped: {note}" if note else None, None)
    cap1, cap2 = gw["req_per_cpu_s"]["median"], w2["req_per_cpu_s"]["median"]
    projected = 2 * cap2 / cap1
    raw = w2["rps"]["median"] / gw["rps"]["median"]
    return _target(
        tid,
        desc,
        goal,
        f"{projected:.2f}x (w2 {cap2:,.0f} req per CPU-s on {w2['cpu_cores']['median']:.2f} "
        f"cores, w1 {cap1:,.0f} on {gw['cpu_cores']['median']:.2f}; per-CPU efficiency "
        f"{cap2 / cap1:.2f}); raw req/s {raw:.2f}x ({w2['rps']['median']:,.0f} vs "
        f"{gw['rps']['median']:,.0f}, load generator on a shared core)",
        projected >= WORKERS_SCALING,
    )


HALVES = ("bare", "client", "gateway")


def halves(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per case that ran bare, client and gateway: what swapping each half of the proxy changes.

    bare = aiohttp server + aiohttp client; client = aiohttp server + own client (the gateway's
    upstream.Pool); gateway = own server + own client + the product's work. So client - bare is
    the own client in place of aiohttp's, and gateway - client the own server plus the product's
    work (token check, header policy, metrics, access log) in place of the aiohttp server.
    Negative = cheaper. Assumes the halves' costs add up (they share one event loop).
    """
    out: dict[str, dict[str, Any]] = {}
    for scenario, data in results.items():
        for case, cdata in data["cases"].items():
            configs = cdata["configs"]
            if not all(name in configs for name in HALVES):
                continue
            names = [n for n in (*HALVES, "nginx") if n in configs]
            cpu = {n: configs[n]["cpu_us_per_req"]["median"] for n in names}
            rps = {n: configs[n]["rps"]["median"] for n in names}
            out.setdefault(scenario, {})[case] = {
                "cpu_us_per_req": cpu,
                "rps": rps,
                "own_client_delta_us": cpu["client"] - cpu["bare"],
                "own_server_and_product_delta_us": cpu["gateway"] - cpu["client"],
            }
    return out


def halves_notes(split: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    notes: dict[str, list[str]] = {}
    for scenario, cases in split.items():
        for case, h in cases.items():
            cpu, rps = h["cpu_us_per_req"], h["rps"]
            text = (
                f"**{case}, each half's share** (CPU µs/req; req/s): bare = aiohttp server + "
                f"aiohttp client {cpu['bare']:.0f}; {rps['bare']:,.0f} → client = aiohttp server "
                f"+ own client {cpu['client']:.0f}; {rps['client']:,.0f} → gateway = own server "
                f"+ own client + the product's work {cpu['gateway']:.0f}; {rps['gateway']:,.0f}"
            )
            if "nginx" in cpu:
                text += f" (nginx proxy_pass {cpu['nginx']:.0f}; {rps['nginx']:,.0f})"
            text += (
                f". Own client in place of aiohttp's: {h['own_client_delta_us']:+.0f} µs/req; "
                "own server plus the product's work in place of the aiohttp server: "
                f"{h['own_server_and_product_delta_us']:+.0f} µs/req"
            )
            notes.setdefault(scenario, []).append(text)
    return notes


# --------------------------------------------------------------------------- markdown


def _num(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _cell(s: dict[str, float], digits: int, with_range: bool = True) -> str:
    if not with_range or s["min"] == s["max"]:
        return _num(s["median"], digits)
    return f"{_num(s['median'], digits)} ({_num(s['min'], digits)}-{_num(s['max'], digits)})"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = [
        "# Gateway benchmark",
        "",
        f"{meta['started']} · gateway {meta.get('git', '?')} · {meta['machine']} · "
        f"duration {meta['duration']} s x "
        f"{meta['repeats']} repeats, interleaved · emulator latency "
        f"{meta['emulator_latency'] * 1000:g} ms",
        "",
        "Pinning (CPUs): " + ", ".join(f"{k} {v}" for k, v in doc["pinning"].items()),
        "",
        "Medians over the repeats, (min-max) where they differ. Latency in ms as wrk sees it; "
        "CPU = utime+stime of the server process tree per request; cores = its CPU seconds per "
        "second of load; peak RSS = VmHWM of its "
        "processes (cumulative within a scenario). xdirect/xnginx/xbare = requests/s ratio to "
        "that reference "
        "in the same case; CPU xnginx/xbare = CPU-per-request ratio; Δp50 = added median latency "
        "vs direct; other load = the most CPU (in cores) that processes outside the benchmark "
        f"used during one of the runs (a run above {NOISY} cores is repeated, at most {RETRIES} "
        "times, and the quietest attempt kept).",
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
    for name, reason in doc.get("skipped", {}).items():
        lines.append("")
        lines.append(f"Skipped configuration `{name}`: {reason}")
    for scenario, data in doc["scenarios"].items():
        lines += ["", f"## {scenario}", ""]
        lines.append(
            "| case | config | req/s | p50 | p90 | p99 | CPU µs/req | cores | peak RSS MiB "
            "| xdirect | xnginx | xbare | CPU xnginx | CPU xbare | Δp50 vs direct | other load "
            "| errors |"
        )
        lines.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for case_name, case in data["cases"].items():
            for config, e in case["configs"].items():
                vs = e["vs"]
                d = vs.get("direct", {})
                errors = e["errors"] + e["non_2xx"]
                lines.append(
                    f"| {case_name} | {config} | {_cell(e['rps'], 0)} "
                    f"| {_cell(e['p50_ms'], 2, False)} | {_cell(e['p90_ms'], 2, False)} "
                    f"| {_cell(e['p99_ms'], 2)} | {_cell(e['cpu_us_per_req'], 0)} "
                    f"| {_num(e['cpu_cores']['median'], 2)} "
                    f"| {_num(e['peak_rss_mib']['max'], 1)} "
                    f"| {_x(d.get('rps_ratio'))} | {_x(vs.get('nginx', {}).get('rps_ratio'))} "
                    f"| {_x(vs.get('bare', {}).get('rps_ratio'))} "
                    f"| {_x(vs.get('nginx', {}).get('cpu_ratio'))} "
                    f"| {_x(vs.get('bare', {}).get('cpu_ratio'))} "
                    f"| {_num(d.get('p50_added_ms'))} "
                    f"| {_num(e['other_cpu_cores']['max'], 2)} | {errors or ''} |"
                )
        lines += _split_table(data)
        lines.append("")
        for case_name, case in data["cases"].items():
            lines.append(f"- **{case_name}**: {case['title']}")
        for note in data.get("notes", []):
            lines.append(f"- {note}")
    if doc.get("fleet"):
        lines += [
            "",
            "## fleet: four replicas on one Authlete budget",
            "",
            *fleet.tables(doc["fleet"]),
        ]
    return "\n".join(lines) + "\n"


def _split_table(data: dict[str, Any]) -> list[str]:
    """Where the CPU of a request goes, by process, in a scenario where a configuration is
    more than one process tree (decision: the nginx in front and the gateway)."""
    cases = data["cases"]
    if not any("cpu_parts_us_per_req" in e for c in cases.values() for e in c["configs"].values()):
        return []
    rows = []
    for case_name, case in cases.items():
        for config, e in case["configs"].items():
            parts: dict[str, Any] = e.get("cpu_parts_us_per_req", {})
            gw = e.get("gateway_cpu_us_per_req")
            ngx = parts.get("nginx") or (e["cpu_us_per_req"] if config == "nginx" else None)
            rows.append(
                f"| {case_name} | {config} | {e['pinned_cpus']} | {_cell(e['rps'], 0)} "
                f"| {_cell(e['cpu_us_per_req'], 1)} | {_cell(gw, 1) if gw else '-'} "
                f"| {_cell(ngx, 1) if ngx else '-'} | {_num(e['cpu_cores']['median'], 2)} |"
            )
    return [
        "",
        "CPU µs per request by process (medians, min-max): total = every process of the "
        "configuration; gateway = the gateway's own; nginx = the nginx in front of it (or the "
        "plain nginx proxy)",
        "",
        "| case | config | pinned CPUs | req/s | total CPU µs/req | gateway CPU µs/req "
        "| nginx CPU µs/req | cores |",
        "|---|---|---|--:|--:|--:|--:|--:|",
        *rows,
    ]


def write(doc: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    js = out / "report.json"
    md.write_text(markdown(doc))
    js.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return md, js
