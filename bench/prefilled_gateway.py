"""A gateway whose verdict cache already holds N entries (the "large cache" scenario).

Loads the config like ``gateway run`` does, builds and starts ``gateway.app.Gateway`` on uvloop,
then inserts N synthetic active verdicts through the cache's public ``put_active(key, verdict,
ttl)``: random 32-byte keys (what SHA-256 digests look like), realistic ``Active`` values
(a distinct subject string, a client id string produced per verdict like the parser does,
a distinct expiry, scope tuples and scope headers shared between verdicts). It measures the
process RSS before and after (``gc.collect()`` first, tracemalloc off) and prints the bytes per
entry, then serves until SIGTERM/SIGINT.

Output (stdout): one line ``PREFILL_JSON {...}`` once the gateway is ready.

    python bench/prefilled_gateway.py -c bench-config.yaml --entries 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import sys
import time
import tracemalloc
from typing import Any

import uvloop

from gateway.app import Gateway
from gateway.cache import VerdictCache
from gateway.config import load_config
from gateway.introspection import parse_answer
from gateway.memory import tune_malloc
from gateway.runner import tune_gc
from gateway.verdict import Active

# A few scope sets shared by many tokens, as a real deployment has.
_SCOPE_SETS: tuple[tuple[str, ...], ...] = (
    ("bench.read",),
    ("bench.read", "orders.read"),
    ("openid", "profile", "email", "bench.read"),
    ("bench.read", "bench.write", "orders.read", "orders.write"),
)
_CLIENT_IDS = 1000  # distinct clients the tokens were issued to
_TTL = 3600.0


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def fill(cache: VerdictCache, n: int) -> None:
    """Insert n entries without keeping any other reference to them."""
    rng = random.Random(2)
    shared = [(scopes, " ".join(scopes)) for scopes in _SCOPE_SETS]
    clients = [rng.randrange(10**9, 10**10) for _ in range(_CLIENT_IDS)]
    now = time.time()
    put = cache.put_active
    for i in range(n):
        scopes, header = shared[i % len(shared)]
        verdict = Active(
            f"user-{i:010d}",
            str(clients[i % _CLIENT_IDS]),
            scopes,
            header,
            now + rng.uniform(600.0, 7200.0),
        )
        put(rng.randbytes(32), verdict, _TTL)


def _traced_bytes_per_entry(sample: int, from_parser: bool) -> float:
    """tracemalloc's view of one entry, in a scratch cache (run after the RSS measurement)."""
    cache = VerdictCache(sample + 1, 1, 5.0)
    rng = random.Random(3)
    payloads: list[bytes] = []
    if from_parser:
        expires = int((time.time() + 3600) * 1000)
        payloads = [
            json.dumps(
                {
                    "action": "OK",
                    "subject": f"user-{i:010d}",
                    "clientId": rng.randrange(10**9, 10**10),
                    "scopes": list(_SCOPE_SETS[i % len(_SCOPE_SETS)]),
                    "expiresAt": expires + i,
                }
            ).encode()
            for i in range(sample)
        ]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    if from_parser:
        now = time.time()
        for payload in payloads:
            verdict = parse_answer(payload, now)
            assert isinstance(verdict, Active)
            cache.put_active(rng.randbytes(32), verdict, _TTL)
    else:
        fill(cache, sample)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del cache, payloads
    gc.collect()
    return (after - before) / sample


async def run(config: str, entries: int, sample: int) -> None:
    cfg = load_config(config)
    if cfg.cache.max_entries < entries + 1:
        raise SystemExit(f"cache.max_entries ({cfg.cache.max_entries}) must exceed --entries")
    tune_malloc()  # what `gateway.runner.serve` does before it starts the gateway
    gateway = Gateway(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    tune_gc()  # what `gateway.runner.serve` does once the listeners are up
    cache = gateway.verdicts.cache

    gc.collect()
    rss_before = _rss_bytes()
    started = time.perf_counter()
    fill(cache, entries)
    fill_seconds = time.perf_counter() - started
    gc.collect()
    rss_after = _rss_bytes()
    # What one full collection costs now: the pause a request can hit when it runs.
    gc_started = time.perf_counter()
    gc.collect()
    gc_full_ms = (time.perf_counter() - gc_started) * 1000

    report: dict[str, Any] = {
        "entries": entries,
        "cache_len": len(cache),
        "rss_before": rss_before,
        "rss_after": rss_after,
        "bytes_per_entry": (rss_after - rss_before) / entries if entries else 0.0,
        "fill_seconds": round(fill_seconds, 3),
        "gc_tracked_objects": len(gc.get_objects()),
        "gc_full_collection_ms": round(gc_full_ms, 1),
        "proxy_port": gateway.proxy_port,
        "admin_port": gateway.admin_port,
        "pid": os.getpid(),
    }
    if sample > 0:
        report["tracemalloc_sample"] = sample
        report["tracemalloc_bytes_per_entry"] = _traced_bytes_per_entry(sample, False)
        report["tracemalloc_bytes_per_entry_via_parser"] = _traced_bytes_per_entry(sample, True)
    print("PREFILL_JSON " + json.dumps(report), flush=True)
    await stop.wait()
    await gateway.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description="A gateway with a pre-filled verdict cache.")
    parser.add_argument("--config", "-c", required=True)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument(
        "--tracemalloc-sample",
        type=int,
        default=0,
        help="also measure this many entries with tracemalloc, after the RSS measurement",
    )
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(args.config, args.entries, args.tracemalloc_sample))
    return 0


if __name__ == "__main__":
    sys.exit(main())
