"""A Starlette upstream, served by uvicorn in the tests: it says what it saw.

`/admin` is the handler a public catch-all route on the gateway must never reach.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def _seen(request: Request, admin: bool) -> JSONResponse:
    body = await request.body()
    data: dict[str, Any] = {
        "framework": "starlette",
        "admin": admin,
        "method": request.method,
        "path": request.url.path,
        "raw_path": request.scope.get("raw_path", b"").decode("latin-1"),
        "query": request.url.query,
        "headers": [[k, v] for k, v in request.headers.items()],
        "scheme": request.url.scheme,
        "client": request.client.host if request.client else None,
        "body_length": len(body),
    }
    return JSONResponse(data)


async def admin(request: Request) -> JSONResponse:
    return await _seen(request, True)


async def anything(request: Request) -> JSONResponse:
    return await _seen(request, False)


async def early(request: Request) -> JSONResponse:
    """Answers without reading the request body."""
    return JSONResponse({"framework": "starlette", "early": True}, status_code=413)


_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
app = Starlette(
    routes=[
        Route("/admin", admin, methods=_METHODS),
        Route("/early", early, methods=_METHODS),
        Route("/{rest:path}", anything, methods=_METHODS),
    ]
)
