"""Smoke test of the benchmark harness: `python -m bench --quick` runs end to end and writes a
well-formed report. No timing assertions: the numbers depend on the machine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("hot", "warm", "cold", "large", "bodies", "decision")
REQUIRED = (
    "rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "cpu_us_per_req",
    "peak_rss_mib",
    "requests",
    "errors",
    "runs",
    "vs",
    "pinned_cpus",
)
TARGET_IDS = (
    "hot-cpu-nginx",
    "hot-cpu-nginx-moonshot",
    "hot-rps-bare",
    "hot-c1-p50",
    "workers",
    "large-p99",
    "large-bytes",
    "cold-calls",
    "streaming",
    "decision-gateway-cpu",
    "decision-rps",
)


def _missing_tools() -> list[str]:
    missing = [t for t in ("wrk", "taskset") if shutil.which(t) is None]
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        missing.append("nginx")
    return missing


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    missing = _missing_tools()
    if missing:
        pytest.skip(
            f"benchmark tools not installed: {', '.join(missing)} (apt-get install wrk nginx)"
        )
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-5000:]}"
    return out, done.stdout


def _report(out: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((out / "report.json").read_text())
    return doc


def test_every_scenario_and_configuration_is_reported(bench_run: tuple[Path, str]) -> None:
    out, _ = bench_run
    doc = _report(out)
    assert set(SCENARIOS) <= set(doc["scenarios"])
    for scenario in SCENARIOS:
        cases = doc["scenarios"][scenario]["cases"]
        assert cases, scenario
        for case_name, case in cases.items():
            assert case["configs"], f"{scenario}/{case_name}"
            for name, entry in case["configs"].items():
                where = f"{scenario}/{case_name}/{name}"
                for key in REQUIRED:
                    assert key in entry, f"{where}: no {key}"
                for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "peak_rss_mib"):
                    assert set(entry[key]) == {"median", "min", "max"}, f"{where}: {key}"
                assert entry["rps"]["median"] > 0, where
                assert entry["requests"] > 0, where
                assert entry["runs"], where


def test_main_configurations_ran(bench_run: tuple[Path, str]) -> None:
    out, _ = bench_run
    doc = _report(out)
    hot = doc["scenarios"]["hot"]["cases"]["c64"]["configs"]
    expected = {"direct", "nginx", "bare", "client", "gateway"}
    if "gateway-w2" not in doc["skipped"]:
        expected.add("gateway-w2")
    assert expected <= set(hot)
    assert hot["gateway"]["vs"].keys() == {"direct", "nginx", "bare", "client"}
    assert set(doc["scenarios"]["hot"]["halves"]) == {"c64", "c1"}
    assert doc["pinning"]


def test_decision_configuration(bench_run: tuple[Path, str]) -> None:
    """Issue 13: nginx auth_request + the gateway in decision mode against the gateway as the
    proxy, with the CPU of each process reported (no numbers asserted)."""
    out, _ = bench_run
    doc = _report(out)
    cases = doc["scenarios"]["decision"]["cases"]
    assert {"nginx", "gateway", "decision"} <= set(cases["c64"]["configs"])
    assert {"direct", "nginx", "gateway", "decision"} <= set(cases["c1"]["configs"])
    for case in cases.values():
        configs = case["configs"]
        pair, alone = configs["decision"], configs["gateway"]
        assert set(pair["cpu_parts_us_per_req"]) == {"nginx", "gateway"}
        for key in ("cpu_us_per_req", "gateway_cpu_us_per_req"):
            assert set(pair[key]) == {"median", "min", "max"}, key
            assert set(alone[key]) == {"median", "min", "max"}, key
        assert "cpu_parts_us_per_req" not in alone
        assert "gateway_cpu_us_per_req" not in configs["nginx"]
        for run in pair["runs"]:
            parts = run["cpu_parts_us_per_req"]
            assert abs(sum(parts.values()) - run["cpu_us_per_req"]) < 1e-6, run
            assert run["gateway_cpu_us_per_req"] == parts["gateway"]
            assert run["decisions"] > 0  # nginx asked the gateway
            assert run["authlete_calls"] == 0  # the hot cache
    assert doc["pinning"]["decision: nginx auth_request + gateway (decision mode)"]
    text = (out / "report.md").read_text()
    assert "| total CPU µs/req | gateway CPU µs/req | nginx CPU µs/req |" in text


def test_targets_have_a_verdict(bench_run: tuple[Path, str]) -> None:
    out, _ = bench_run
    targets = _report(out)["targets"]
    ids = [t["id"] for t in targets]
    for tid in TARGET_IDS:
        assert tid in ids
    assert any(t.startswith("cold-added-") for t in ids)
    for target in targets:
        assert isinstance(target["met"], bool), target
        assert target["status"] in ("MET", "NOT MET", "SKIPPED"), target
        assert target["measured"], target


def test_markdown_report(bench_run: tuple[Path, str]) -> None:
    out, stdout = bench_run
    text = (out / "report.md").read_text()
    assert "## Targets" in text
    for scenario in SCENARIOS:
        assert f"## {scenario}" in text
    assert "| case | config | req/s |" in text
    assert text.strip() in stdout  # the report is also printed
