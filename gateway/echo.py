"""A tiny echo upstream: answers every request with a JSON description of what it received.

Used as the demo upstream and by tests of the proxy. The body is read chunk by chunk and only
hashed, never held whole, so large and chunked uploads are cheap.
"""

from __future__ import annotations

import hashlib

from aiohttp import web

__all__ = ["echo_app", "start_echo"]


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


async def _echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "query": request.rel_url.raw_query_string,
            "headers": [[_decode(name), _decode(value)] for name, value in request.raw_headers],
            "body_length": length,
            "body_sha256": digest.hexdigest(),
        }
    )


def echo_app() -> web.Application:
    """An application answering any method on any path with the echo JSON."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def start_echo(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve :func:`echo_app` on ``host:port`` (0 = any free port).

    Returns the runner (call ``await runner.cleanup()`` to stop) and the base URL.
    """
    runner = web.AppRunner(echo_app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{url_host}:{bound_port}"
