"""Running wrk: the Lua scripts in bench/lua/, `--latency`, and the BENCH_JSON line that
the shared `done()` hook prints."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LUA_DIR = Path(__file__).parent / "lua"
_MARK = "BENCH_JSON "


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    errors: dict[str, int]
    latency_us: dict[str, float]
    sent_by_thread: list[int]
    raw: str

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def socket_errors(self) -> int:
        return sum(v for k, v in self.errors.items() if k != "status")

    @property
    def non_2xx(self) -> int:
        return self.errors.get("status", 0)


def script(workdir: Path, name: str) -> Path:
    """common.lua + <name>.lua, written once into the run's temp dir."""
    path = workdir / f"wrk-{name}.lua"
    if not path.exists():
        text = (LUA_DIR / "common.lua").read_text() + "\n" + (LUA_DIR / f"{name}.lua").read_text()
        path.write_text(text)
    return path


def run(
    wrk: str,
    url: str,
    lua: Path,
    *,
    connections: int,
    duration: float,
    cpus: str,
    env: Mapping[str, str] | None = None,
    threads: int = 1,
) -> WrkResult:
    argv = [
        "taskset",
        "-c",
        cpus,
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(lua),
        url,
    ]
    merged = dict(os.environ)
    merged.update(env or {})
    merged["BENCH_THREADS"] = str(threads)
    done = subprocess.run(
        argv,
        env=merged,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=False,
    )
    if done.returncode != 0 or _MARK not in done.stdout:
        raise RuntimeError(
            f"wrk failed ({done.returncode}): {' '.join(argv)}\n{done.stdout}\n{done.stderr}"
        )
    line = next(x for x in done.stdout.splitlines() if x.startswith(_MARK))
    doc: dict[str, Any] = json.loads(line[len(_MARK) :])
    return WrkResult(
        requests=int(doc["requests"]),
        duration_s=int(doc["duration_us"]) / 1e6,
        errors={k: int(v) for k, v in doc["errors"].items()},
        latency_us={k: float(v) for k, v in doc["latency_us"].items()},
        sent_by_thread=[int(x) for x in doc["sent_by_thread"]],
        raw=done.stdout,
    )
