"""The bare Python reference: an aiohttp + uvloop reverse proxy that forwards without any checks.

No routing, no token, no cache, no metrics: the floor of what a proxy written with plain aiohttp
costs. Low-level ``web.Server`` (no application router), one pooled keep-alive ``ClientSession``,
bodies streamed both ways, hop-by-hop headers dropped.

    python bench/bare_proxy.py --listen 127.0.0.1:8081 --upstream http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


def _strip(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _HOP)


async def serve(host: str, port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
    )
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=30)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        async with session.request(
            request.method,
            URL(upstream + request.raw_path, encoded=True),
            headers=_strip(request.headers),
            data=request.content if request.body_exists else None,
            allow_redirects=False,
            skip_auto_headers=_SKIP_AUTO,
            timeout=timeout,
        ) as upstream_response:
            response = web.StreamResponse(
                status=upstream_response.status, reason=upstream_response.reason
            )
            response.headers.extend(_strip(upstream_response.headers))
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    runner = web.ServerRunner(web.Server(handle, access_log=None), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"bare proxy on {host}:{port} -> {upstream}", flush=True)
    await stop.wait()
    await runner.cleanup()
    await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--upstream", required=True, help="http://host:port (no path)")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(host, int(port), args.upstream.rstrip("/")))


if __name__ == "__main__":
    main()
