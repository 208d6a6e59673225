"""`python -m bench --profile`: py-spy samples the gateway while wrk drives the hot c64 load.

Writes `profile.txt` (py-spy raw/collapsed stacks, one `frame;frame;... count` per line)
and `profile-top.md` (frames by self time and by inclusive time) into --out.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from bench import wrk

if TYPE_CHECKING:
    from bench.runner import Bench

_LINE = re.compile(r":\d+\)$")


def _short(frame: str) -> str:
    """`handle (/x/site-packages/aiohttp/web.py:12)` -> `handle (aiohttp/web.py)`."""
    frame = _LINE.sub(")", frame)
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        head, sep, tail = frame.partition(marker)
        if sep:
            name = head.split(" (", 1)[0]
            return f"{name} ({tail}"
    return frame


def _is_python(frame: str) -> bool:
    return frame.endswith(".py)") or "(<frozen " in frame


def summarize(raw: Path, top: int = 15) -> str:
    """Three views of the collapsed stacks: self time per frame (native frames included),
    self time folded into the nearest Python frame, inclusive time of gateway/ functions."""
    self_time: Counter[str] = Counter()
    folded: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        python = [f for f in frames if _is_python(f)]
        if python:
            leaf = python[-1]
            native = frames[-1] if frames[-1] != leaf else None
            folded[leaf + (" + native" if native else "")] += count
        for frame in set(frames):
            if "(gateway/" in frame:
                inclusive[frame] += count
    if total == 0:
        return "no samples\n"

    def table(title: str, counts: Counter[str], n: int) -> list[str]:
        rows = ["", f"| # | % | {title} |", "|--:|--:|---|"]
        for i, (frame, k) in enumerate(counts.most_common(n), 1):
            rows.append(f"| {i} | {100 * k / total:.1f} | `{frame}` |")
        return rows

    out = [f"{total:,} samples (idle excluded)."]
    out += table("frame, by self time (native frames included)", self_time, top)
    out += table("Python frame, by self time with the native time below it folded in", folded, top)
    out += table("gateway function, by inclusive time", inclusive, top)
    return "\n".join(out) + "\n"


def profile_hot(bench: Bench, native: bool = True) -> None:
    opts = bench.opts
    spy = shutil.which("py-spy")
    assert spy is not None
    opts.out.mkdir(parents=True, exist_ok=True)
    raw = opts.out / "profile.txt"
    with bench.proxies(["gateway"]) as targets:
        target = targets["gateway"]
        url = f"http://127.0.0.1:{target.port}/"
        lua = wrk.script(bench.workdir, "static")
        env = {"BENCH_TOKEN": "bench-hot-token"}
        wrk.run(bench.wrk, url, lua, connections=64, duration=2, cpus=bench.cpu_load, env=env)
        argv = [
            "taskset", "-c", bench.cpu_load, spy, "record",
            "--pid", str(target.child.pid),
            "--duration", str(int(opts.duration)),
            "--rate", "200",
            "--format", "raw",
            "--output", str(raw),
            *(["--native"] if native else []),
        ]  # fmt: skip
        sampler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        result = wrk.run(
            bench.wrk,
            url,
            lua,
            connections=64,
            duration=opts.duration + 2,
            cpus=bench.cpu_load,
            env=env,
        )
        _, err = sampler.communicate(timeout=60)
        if sampler.returncode != 0:
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')}")
    text = (
        f"# Profile: gateway, hot path (c64), py-spy {'--native ' if native else ''}"
        f"at 200 Hz for {int(opts.duration)} s\n\n"
        f"Load during sampling: {result.rps:,.0f} req/s (py-spy pauses the process to sample, "
        "so this is below the benchmark's number).\n\n" + summarize(raw)
    )
    (opts.out / "profile-top.md").write_text(text)
    print(text)
    print(f"raw stacks: {raw}", file=sys.stderr)
