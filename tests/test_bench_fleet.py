"""Smoke test of `python -m bench --scenarios fleet --quick`: the fleet scenario's plumbing
(redis-server, the rate-limited emulator, four gateway replicas per case and variant, the
hot case under wrk with `shared` on and off, the report) runs end to end. No numbers are
asserted: the targets are reported as MET / NOT MET, and quick runs say nothing about them.
A missing tool fails under CI (which installs them) and skips elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need_tool

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "burst": {"shared", "local", "split"},
    "sustained": {"shared", "local", "split"},
    "users": {"shared", "local"},
    "purge": {"shared", "local"},
    "uneven": {f"{p}/{v}" for p in ("one", "skew") for v in ("shared", "local", "split")},
}
TARGET_IDS = (
    "fleet-hot-cpu",
    "fleet-burst-429",
    "fleet-burst-served",
    "fleet-burst-calls",
    "fleet-sustained-429",
    "fleet-sustained-served",
    "fleet-sustained-calls",
    "fleet-users-calls",
    "fleet-purge",
)


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str]:
    for tool in ("wrk", "nginx", "taskset", "redis-server"):
        need_tool(tool)
    out = tmp_path_factory.mktemp("fleet")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--scenarios", "fleet", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-5000:]}"
    doc: dict[str, Any] = json.loads((out / "report.json").read_text())
    return doc, (out / "report.md").read_text(), done.stdout


def test_hot_case_measures_shared_on_and_off(fleet_run: tuple[dict[str, Any], str, str]) -> None:
    doc, _, _ = fleet_run
    configs = doc["scenarios"]["fleet"]["cases"]["hot-c64"]["configs"]
    assert set(configs) == {"gateway", "gateway-shared"}
    for name, entry in configs.items():
        assert entry["requests"] > 0, name
        assert entry["cpu_us_per_req"]["median"] > 0, name
        assert entry["errors"] == 0 and entry["non_2xx"] == 0, name
        for run in entry["runs"]:
            assert run["redis_commands"] >= 0, name


def test_every_case_and_variant_ran(fleet_run: tuple[dict[str, Any], str, str]) -> None:
    doc, _, _ = fleet_run
    fleet = doc["fleet"]
    assert set(fleet["cases"]) == set(CASES)
    for case, variants in CASES.items():
        runs = fleet["cases"][case]["runs"]
        assert set(runs) == variants, case
        for variant, run in runs.items():
            where = f"{case}/{variant}"
            assert len(run["modes"]) == 4, where
            if variant.endswith(("local", "split")):
                assert set(run["modes"]) == {"off"}, where
            assert run["authlete_calls"] >= 0 and run["authlete_429"] >= 0, where
            if case == "purge":
                assert run["warm_statuses"] == [200] * 4, where
                assert len(run["refused_after_s"]) == 4, where
                continue
            assert run["requests"]["sent"] > 0, where
            assert 0 <= run["tokens_served"] <= run["tokens_sent"], where
            assert run["authlete_calls"] > 0, where
            if case != "users":
                assert run["ideal_served"] > 0, where
    assert isinstance(fleet["shared_active"], bool)


def test_targets_have_a_verdict(fleet_run: tuple[dict[str, Any], str, str]) -> None:
    doc, _, _ = fleet_run
    targets = {t["id"]: t for t in doc["targets"]}
    for tid in TARGET_IDS:
        assert tid in targets, tid
        assert targets[tid]["status"] in ("MET", "NOT MET"), targets[tid]
        assert isinstance(targets[tid]["met"], bool)
        assert targets[tid]["measured"], tid


def test_markdown_report(fleet_run: tuple[dict[str, Any], str, str]) -> None:
    _, text, stdout = fleet_run
    assert "## Targets" in text
    assert "## fleet" in text
    assert "## fleet: four replicas on one Authlete budget" in text
    for case in CASES:
        assert f"### {case}" in text, case
    assert text.strip() in stdout  # the report is also printed
