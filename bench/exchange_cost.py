"""`python -m bench.exchange_cost`: the Python work of one proxied exchange, without sockets.

A canned request is fed to a `ClientConnection` and a canned nginx answer to its pooled
`UpstreamConnection`, over and over, on stand-in transports that only count writes: what is
left is the gateway's own Python and llhttp work per request (route, token, cached verdict,
header policy both ways, metrics, access line). `--decision` measures a decision request
instead (decision mode: nginx's auth_request asking, answered 200 with identity headers; no
upstream). `--profile` adds a cProfile table (its times are inflated; the order is what it
is for).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import time
from typing import Any

import uvloop
import yaml

from gateway.cache import token_key
from gateway.config import Route, parse_config
from gateway.logs import AccessLog
from gateway.metrics import Metrics
from gateway.pipeline import Plan
from gateway.server import Listener
from gateway.upstream import Pool, UpstreamConnection
from gateway.verdict import Active
from gateway.verdicts import Verdicts

REQUEST = b"GET /api/x HTTP/1.1\r\nHost: localhost:8080\r\nAuthorization: Bearer tok-bench\r\n\r\n"
# What the shipped nginx example's auth_request subrequest sends under wrk (examples/nginx;
# the six headers measured in the decision benchmark).
DECISION = (
    b"GET /_gateway/auth HTTP/1.1\r\nHost: localhost:8080\r\nX-Original-URI: /api/x\r\n"
    b"X-Original-Method: GET\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"
    b"Authorization: Bearer tok-bench\r\n\r\n"
)
ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 28 Nov 2026 00:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 20\r\nConnection: keep-alive\r\n\r\n"
    b"upstream says hello\n"
)


class _Transport:
    """Takes writes and flow-control calls, sends nothing."""

    def __init__(self) -> None:
        self.last = b""

    def write(self, data: bytes) -> None:
        self.last = data

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else None

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True


async def measure(count: int, log: AccessLog | None, profile: bool, decision: bool) -> None:
    cfg = parse_config(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "admin_listen": "127.0.0.1:0",
                "authlete": {
                    "base_url": "http://127.0.0.1:1",
                    "allow_insecure_http": True,
                    "service_id": "1",
                    "access_token": "unused",
                },
                "trusted_proxies": ["127.0.0.1/32"],
                **({"decision": {}} if decision else {}),
                "routes": [
                    {
                        "name": "api",
                        "path_prefix": "/api",
                        "upstream": "http://127.0.0.1:9",
                        "scopes": ["read"],
                    }
                ],
            }
        ),
        env={},
    )
    metrics = Metrics()
    pools: dict[object, Pool] = {}

    def pool_for(route: Route) -> Pool:
        assert route.upstream is not None
        return pools.setdefault(route.upstream, Pool(route.upstream, None))

    async def no_calls(*args: object) -> Any:
        raise AssertionError("every request is a cache hit")

    verdicts = Verdicts(cfg.cache, no_calls, metrics, 5.0)
    verdict = Active("user-1@example.com", "123", ("read",), "read", time.time() + 3600)
    verdicts.cache.put_active(token_key("tok-bench"), verdict, 3600)
    listener = Listener(
        Plan(cfg, pool_for, metrics), verdicts, metrics, cfg.limits, pools, log, False
    )
    (pool,) = pools.values()
    upstream = UpstreamConnection(pool)
    upstream.connection_made(_Transport())  # type: ignore[arg-type]
    upstream.reusable = True
    pool.release(upstream)
    client = listener()
    client_transport = _Transport()
    client.connection_made(client_transport)  # type: ignore[arg-type]

    def run(n: int) -> None:
        for _ in range(n):
            client.data_received(REQUEST)
            upstream.data_received(ANSWER)

    def ask(n: int) -> None:
        for _ in range(n):
            client.data_received(DECISION)

    if decision:
        run = ask
    run(1000)
    expected = b"X-Auth-Client-Id: 123\r\n" if decision else b"upstream says hello\n"
    assert expected in client_transport.last, client_transport.last
    profiler = cProfile.Profile() if profile else None
    started = time.process_time()
    if profiler is not None:
        profiler.enable()
    run(count)
    if profiler is not None:
        profiler.disable()
    spent = time.process_time() - started
    print(f"{spent / count * 1e6:.2f} µs of CPU per exchange ({count:,} exchanges)")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(
            int(os.environ.get("PROFILE_ROWS", "25"))
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--decision", action="store_true", help="a decision request instead")
    args = parser.parse_args()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)  # as gateway.runner.tune_gc
    with open(os.devnull, "w") as devnull:
        log = None if args.no_access_log else AccessLog(devnull)
        uvloop.run(measure(args.count, log, args.profile, args.decision))


if __name__ == "__main__":
    main()
