"""Smoke test of `python -m bench.spray --quick`: the spray scenario's plumbing (emulator,
gateway and upstream processes, the load from chosen source addresses, the report) runs end to
end. No numbers are asserted: a one-second run says nothing about them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_spray_bench_runs_and_reports(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.spray", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-5000:]}"
    doc = json.loads((tmp_path / "spray.json").read_text())
    assert [r["run"] for r in doc["runs"]] == ["baseline", "one-client", "many-clients"]
    for run in doc["runs"]:
        for who in ("spray", "fresh", "known"):
            assert run[who]["sent"] > 0, (run["run"], who)
            assert 0.0 <= run[who]["ok_fraction"] <= 1.0
        assert run["authlete_calls"] > 0
        assert set(run["gateway"]) >= {"rejected_client_quota", "refreshes"}
    assert [t["id"] for t in doc["targets"]] == [
        "spray-one-fresh",
        "spray-one-known",
        "spray-many-known",
    ]
    assert all(isinstance(t["met"], bool) for t in doc["targets"])
    text = (tmp_path / "spray.md").read_text()
    assert "| run | per_client |" in text
    assert text.strip() in done.stdout
