"""A Flask upstream that redirects, served by gunicorn in the tests: `?to=/path` answers 302
with that Location, made absolute from the Host it was sent (as `url_for(_external=True)`
and most frameworks do) with `&absolute=1`; `&header=Content-Location` answers 200 with a
Content-Location instead."""

from __future__ import annotations

from flask import Flask, Response, request

app = Flask(__name__)


@app.route("/", defaults={"rest": ""})
@app.route("/<path:rest>")
def anything(rest: str) -> Response:
    to = request.args.get("to", "/")
    if request.args.get("absolute"):
        to = request.host_url.rstrip("/") + to  # http://<Host it was sent><to>
    header = request.args.get("header", "Location")
    resp = Response(status=302) if header == "Location" else Response(b"here", status=200)
    resp.headers[header] = to
    resp.headers["X-Seen-Path"] = request.path
    resp.headers["X-Seen-Host"] = request.host
    return resp
