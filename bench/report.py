"""From runs to report: medians with their spread, ratios to the references, the targets,
and the markdown/JSON files."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REFERENCES = ("direct", "nginx", "bare")
NOISY = 0.25  # cores used by other processes during a run before it is repeated
RETRIES = 2  # at most this many repeats of a disturbed run
METRICS = (
    "rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "cpu_us_per_req",
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
    out: list[dict[str, Any]] = []
    gw = _config(results, "hot", "c64", "gateway")
    bare = _config(results, "hot", "c64", "bare")
    if gw and bare:
        r = gw["rps"]["median"] / bare["rps"]["median"]
        c = gw["cpu_us_per_req"]["median"] / bare["cpu_us_per_req"]["median"]
        out.append(
            _target(
                "hot-rps",
                "Hot path: gateway requests/s vs the bare Python proxy (c64)",
                ">= 0.90x",
                f"{r:.2f}x ({gw['rps']['median']:,.0f} vs {bare['rps']['median']:,.0f} req/s)",
                r >= 0.90,
            )
        )
        out.append(
            _target(
                "hot-cpu",
                "Hot path: gateway CPU per request vs the bare Python proxy (c64)",
                "<= 1.15x",
                f"{c:.2f}x ({gw['cpu_us_per_req']['median']:.0f} vs "
                f"{bare['cpu_us_per_req']['median']:.0f} µs/req)",
                c <= 1.15,
            )
        )
    else:
        for tid, text in (("hot-rps", "requests/s"), ("hot-cpu", "CPU per request")):
            out.append(
                _target(tid, f"Hot path: gateway {text} vs bare", "-", None, None),
            )

    w2 = _config(results, "hot", "c64", "gateway-w2")
    if gw and w2:
        r = w2["rps"]["median"] / gw["rps"]["median"]
        out.append(
            _target(
                "workers",
                "--workers 2 on two cores vs one worker (hot, c64)",
                ">= 1.7x",
                f"{r:.2f}x ({w2['rps']['median']:,.0f} vs {gw['rps']['median']:,.0f} req/s)",
                r >= 1.7,
            )
        )
    else:
        note = extra.get("skipped", {}).get("gateway-w2")
        out.append(
            _target(
                "workers",
                "--workers 2 on two cores vs one worker (hot, c64)",
                ">= 1.7x",
                f"skipped: {note}" if note else None,
                None,
            )
        )

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
    return out


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
        "CPU = utime+stime of the server process tree per request; peak RSS = VmHWM of its "
        "processes (cumulative within a scenario). xdirect/xnginx/xbare = requests/s ratio to "
        "that reference "
        "in the same case; CPU xbare = CPU-per-request ratio; Δp50 = added median latency "
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
            "| case | config | req/s | p50 | p90 | p99 | CPU µs/req | peak RSS MiB "
            "| xdirect | xnginx | xbare | CPU xbare | Δp50 vs direct | other load | errors |"
        )
        lines.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for case_name, case in data["cases"].items():
            for config, e in case["configs"].items():
                vs = e["vs"]
                d = vs.get("direct", {})
                errors = e["errors"] + e["non_2xx"]
                lines.append(
                    f"| {case_name} | {config} | {_cell(e['rps'], 0)} "
                    f"| {_cell(e['p50_ms'], 2, False)} | {_cell(e['p90_ms'], 2, False)} "
                    f"| {_cell(e['p99_ms'], 2)} | {_cell(e['cpu_us_per_req'], 0)} "
                    f"| {_num(e['peak_rss_mib']['max'], 1)} "
                    f"| {_x(d.get('rps_ratio'))} | {_x(vs.get('nginx', {}).get('rps_ratio'))} "
                    f"| {_x(vs.get('bare', {}).get('rps_ratio'))} "
                    f"| {_x(vs.get('bare', {}).get('cpu_ratio'))} "
                    f"| {_num(d.get('p50_added_ms'))} "
                    f"| {_num(e['other_cpu_cores']['max'], 2)} | {errors or ''} |"
                )
        lines.append("")
        for case_name, case in data["cases"].items():
            lines.append(f"- **{case_name}**: {case['title']}")
        for note in data.get("notes", []):
            lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def write(doc: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    js = out / "report.json"
    md.write_text(markdown(doc))
    js.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return md, js
