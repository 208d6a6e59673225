"""A Flask upstream, served by gunicorn's sync workers in the tests: it says what it saw."""

from __future__ import annotations

from typing import Any

from flask import Flask, request

app = Flask(__name__)


def _seen() -> dict[str, Any]:
    body = request.get_data(cache=False)
    return {
        "framework": "flask",
        "method": request.method,
        "path": request.path,
        "raw_uri": request.environ.get("RAW_URI", ""),
        "query": request.query_string.decode("latin-1"),
        "headers": [[k, v] for k, v in request.headers.items()],
        "scheme": request.scheme,
        "remote_addr": request.remote_addr,
        "remote_user": request.environ.get("REMOTE_USER"),
        "body_length": len(body),
    }


@app.route("/admin", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
def admin() -> dict[str, Any]:
    return {"admin": True, **_seen()}


@app.route("/", defaults={"rest": ""}, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"])
@app.route("/<path:rest>", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"])
def anything(rest: str) -> dict[str, Any]:
    return {"admin": False, **_seen()}
