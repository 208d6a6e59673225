"""The admin listener: liveness, readiness and the Prometheus exposition (aiohttp: it is off
the request path)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def admin_app(registry: CollectorRegistry, problems: Callable[[], list[str]]) -> web.Application:
    """`problems` names what keeps the gateway from being ready; none means ready."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        found = problems()
        if found:
            return web.json_response({"status": "not ready", "problems": found}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
