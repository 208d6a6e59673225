"""The admin listener: liveness, readiness, the Prometheus exposition and POST /cache/purge
(aiohttp: it is off the request path).

POST /cache/purge takes a JSON object naming exactly one of:
- `token`: the raw access token (RFC 6750 b64token characters, as the gateway accepts it);
- `token_sha256`: 64 hex digits, either case, the SHA-256 of the token (the cache key);
- `subject`: the resource owner, a non-empty string;
- `client_id`: the Authlete client id, an integer or a string of decimal digits.

Nothing here ever puts a value from the body into an answer, a log line or an exception: a
detail names the key and what was wrong with it, never what it held, so a token pasted into
the wrong field stays out of responses and logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web, web_response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway.metrics import Counter
from gateway.purge import PurgeResult

log = logging.getLogger("gateway.admin")

PURGE_PATH = "/cache/purge"
SERVER = "gateway"  # the Server header of the admin listener's answers
KINDS = ("token", "token_sha256", "subject", "client_id")
MAX_BODY = 16 * 1024
CHALLENGE = 'Bearer realm="gateway-admin"'
_BODY_TIMEOUT = 10.0  # seconds for a purge request's body to arrive
_NO_STORE = {"Cache-Control": "no-store"}
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # as gateway.bearer accepts a token
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII only: str.isdigit() would take "٣"
_MAX_CLIENT_ID = 2**63 - 1  # Authlete's client ids are Java longs, as introspection checks

AdminToken = str | Callable[[], str | None] | None
# (kind, value) -> what it did; the value already checked and normalised by `parse_body`:
# token raw, token_sha256 lower-case hex, subject as given, client_id decimal, no leading zeros.
Purge = Callable[[str, str], Awaitable[PurgeResult]]
# (kind, normalised value) -> the answer to a purge request that passed every check
PurgeAnswer = Callable[[str, str], Awaitable[web.Response]]


def admin_app(
    registry: CollectorRegistry,
    problems: Callable[[], list[str]],
    purge: Purge | None = None,
    admin_token: AdminToken = None,
    purges: Counter | None = None,
) -> web.Application:
    """`problems` names what keeps the gateway from being ready; none means ready.

    `purge` carries out POST /cache/purge, which exists only with both `purge` and an admin
    token (`admin_token`: the secret, or a function returning the one in force, so a reload
    applies); `purges` is the counter of purges by kind (gateway_cache_purges_total)."""

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

    app = new_admin_app()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if purges is not None:
        for kind in KINDS:
            purges.labels(kind)  # every kind exported from the start, at 0
    if purge is not None:  # without it the path does not exist at all
        add_purge_route(app, token_source(admin_token), _purge_here(purge, purges))
    return app


# Answers aiohttp makes before any application hook runs (a request it cannot parse: a bad
# request line, a head too large) take the module's default Server value: name no versions
# there either. Only aiohttp's server answers read it; its client's User-Agent is separate.
setattr(web_response, "SERVER_SOFTWARE", SERVER)  # noqa: B010  # not exported: mypy


def new_admin_app() -> web.Application:
    """An aiohttp application whose answers say `Server: gateway`, not aiohttp's default
    `Python/3.x aiohttp/3.y` (no versions for a scanner to match against advisories)."""
    app = web.Application()
    app.on_response_prepare.append(_server_header)
    return app


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER


def token_source(admin_token: AdminToken) -> Callable[[], str | None]:
    if admin_token is None or isinstance(admin_token, str):
        fixed = admin_token or None
        return lambda: fixed
    return admin_token


def add_purge_route(
    app: web.Application, token: Callable[[], str | None], run: PurgeAnswer
) -> None:
    """POST /cache/purge, checked in this order: 404 without an admin token (as if there were
    no such path), 405 for another method, 401 without the admin token as bearer, 400 for a
    body that does not name exactly one thing to purge, then `run(kind, value)` answers.
    The supervisor of --workers uses it with a `run` that asks every worker."""

    async def handle(request: web.Request) -> web.StreamResponse:
        expected = token()
        if not expected:
            raise web.HTTPNotFound()
        if request.method != "POST":
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        if not authorized(request.headers.getall("Authorization", []), expected):
            return web.json_response(
                {"error": "unauthorized", "detail": "send the admin token as a Bearer token"},
                status=401,
                headers={"WWW-Authenticate": CHALLENGE, **_NO_STORE},
            )
        try:
            async with asyncio.timeout(_BODY_TIMEOUT):
                body = await _read_body(request)
            kind, value = parse_body(body)
        except BadPurge as exc:
            return web.json_response(exc.body(), status=400, headers=_NO_STORE)
        except TimeoutError:
            return web.json_response(
                {"error": "timeout", "detail": f"the body did not arrive in {_BODY_TIMEOUT:g} s"},
                status=408,
                headers={"Connection": "close", **_NO_STORE},
            )
        return await run(kind, value)

    app.router.add_route("*", PURGE_PATH, handle)


async def _read_body(request: web.Request) -> bytes:
    """The body, refused as soon as it passes MAX_BODY (announced or sent)."""
    too_large = BadPurge("too_large", f"the body is limited to {MAX_BODY} bytes")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > MAX_BODY:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def purge_answer(kind: str, purged: int, fleet: bool, shared_down: bool) -> web.Response:
    """200 with what was purged; 503 (Retry-After: 1) when shared state is configured but
    Redis was not reached: the local purge is done, a revocation hook should try again."""
    if shared_down:
        return web.json_response(
            {"error": "shared_unavailable", "purged": purged, "kind": kind, "fleet": False},
            status=503,
            headers={"Retry-After": "1", **_NO_STORE},
        )
    return web.json_response({"purged": purged, "kind": kind, "fleet": fleet}, headers=_NO_STORE)


def _purge_here(purge: Purge, purges: Counter | None) -> PurgeAnswer:
    async def run(kind: str, value: str) -> web.Response:
        try:
            # Shielded: a client that hangs up does not leave a purge half done.
            result = await asyncio.shield(purge(kind, value))
        except Exception as exc:
            # The class only: an exception's text could quote the value (the raw token).
            log.error("cache purge failed: kind=%s, %s", kind, type(exc).__name__)
            return web.json_response(
                {"error": "purge_failed", "detail": "the purge failed; see the gateway's log"},
                status=500,
                headers=_NO_STORE,
            )
        if purges is not None:
            purges.labels(kind).inc()
        shared_down = result.shared and not result.fleet
        if shared_down:
            log.warning(
                "cache purge: kind=%s, %d entries, in this process only: shared state "
                "unreachable (answered 503, the caller should retry)",
                kind,
                result.purged,
            )
        else:
            log.info(
                "cache purge: kind=%s, %d entries%s",
                kind,
                result.purged,
                ", fleet-wide" if result.fleet else "",
            )
        return purge_answer(kind, result.purged, result.fleet, shared_down)

    return run


# --------------------------------------------------------------------------- the request


class BadPurge(Exception):
    """A purge request that cannot be carried out: `error` is a short code, `detail` a
    sentence for a person; neither ever holds a value from the request."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.error = error
        self.detail = detail

    def body(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}


def authorized(values: Sequence[str], expected: str) -> bool:
    """Whether the Authorization header values carry `Bearer <expected>`. The comparison
    takes the same time whatever was sent (digests of both sides: not even the length of the
    admin token leaks)."""
    if len(values) != 1:
        return False
    scheme, _, rest = values[0].partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = rest.strip(" ").encode("utf-8", "surrogatepass")
    want = expected.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(want).digest())


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadPurge("duplicate_key", "a key appears more than once in the body")
        out[key] = value
    return out


def parse_body(body: bytes) -> tuple[str, str]:
    """The (kind, normalised value) a request body names; raises BadPurge."""
    if len(body) > MAX_BODY:
        raise BadPurge("too_large", f"the body is limited to {MAX_BODY} bytes")
    if not body.strip():
        raise BadPurge("not_json", "the body is empty; send a JSON object")
    try:
        doc = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise BadPurge("not_json", "the body is not JSON (UTF-8)") from None
    if not isinstance(doc, dict):
        raise BadPurge("not_object", "the body must be a JSON object")
    unknown = [key for key in doc if key not in KINDS]
    if unknown:
        raise BadPurge(
            "unknown_key",
            f"{len(unknown)} unknown key(s); the body names exactly one of {', '.join(KINDS)}",
        )
    if not doc:
        raise BadPurge("no_kind", f"the body names none of {', '.join(KINDS)}")
    if len(doc) > 1:
        raise BadPurge("several_kinds", f"the body names {len(doc)} of {', '.join(KINDS)}; one")
    ((kind, value),) = doc.items()
    return kind, _normalise(kind, value)


def _normalise(kind: str, value: Any) -> str:
    if kind == "client_id":
        if type(value) is int:  # not bool, not float
            number = value
        elif isinstance(value, str) and _DIGITS.fullmatch(value):
            number = int(value)
        else:
            raise BadPurge("bad_value", "client_id must be an integer or a string of digits")
        if not 0 <= number <= _MAX_CLIENT_ID:
            raise BadPurge("bad_value", "client_id is out of range (0 to 2^63-1)")
        return str(number)
    if not isinstance(value, str):
        raise BadPurge("bad_value", f"{kind} must be a string")
    if kind == "token":
        if not _B64TOKEN.fullmatch(value):
            raise BadPurge(
                "bad_value", "token must be an access token (RFC 6750 b64token characters)"
            )
        return value
    if kind == "token_sha256":
        if not _SHA256_HEX.fullmatch(value):
            raise BadPurge("bad_value", "token_sha256 must be 64 hex digits")
        return value.lower()
    if not value:  # subject
        raise BadPurge("bad_value", "subject must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a JSON \ud800 escape
        raise BadPurge("bad_value", "subject is not valid Unicode") from None
    return value
