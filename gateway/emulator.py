"""An emulator of Authlete's token introspection API, for tests, the benchmark and the demo.

It follows the wire contract in ``/work/shared/authlete/introspection.md`` (the "facts file";
``§n`` below refers to its sections):

* ``POST /api/{serviceId}/auth/introspection`` with ``Authorization: Bearer <service token>``,
  a JSON or form-encoded ``introspection_request`` (§1, §2) and a 200 ``introspection_response``
  whose ``action`` carries the outcome (§3, §4, §12).
* API-level failures answer with the plain ``result`` body ``{resultCode, resultMessage}`` (§7).
* Optional rate limiting with ``X-RateLimit-*`` headers and 429 (§7, §12.5).

Everything else lives under ``/_emulator/`` (no authentication: this is a test tool and must only
be bound to loopback). See :meth:`Emulator.app` for the list of control routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
import secrets
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import parse_qsl

import yaml
from aiohttp import web

__all__ = [
    "DEFAULT_ACCESS_TOKEN",
    "DEFAULT_SERVICE_ID",
    "DEMO_TOKENS_PATH",
    "GRANT_TYPES",
    "EmulatedToken",
    "Emulator",
    "Override",
]

#: The demo tokens shipped with the package (used by ``gateway demo``).
DEMO_TOKENS_PATH: Final = Path(__file__).parent / "data" / "demo-tokens.yaml"

#: Defaults of the emulated service: its ID (path segment) and the service access token.
DEFAULT_SERVICE_ID: Final = "715948317"
DEFAULT_ACCESS_TOKEN: Final = "emulator-access-token"

#: Values of the ``grant_type`` enum (§3 ``grantType``).
GRANT_TYPES: Final = frozenset(
    {
        "AUTHORIZATION_CODE",
        "IMPLICIT",
        "PASSWORD",
        "CLIENT_CREDENTIALS",
        "REFRESH_TOKEN",
        "CIBA",
        "DEVICE_CODE",
        "TOKEN_EXCHANGE",
        "JWT_BEARER",
        "PRE_AUTHORIZED_CODE",
    }
)

_DEFAULT_SUBJECT: Final = "alice"
_DEFAULT_CLIENT_ID: Final = 3006291287
_DEFAULT_LIFETIME: Final = 3600.0

# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")

_JSON: Final = "application/json"
_FORM: Final = "application/x-www-form-urlencoded"

# Plain ``result`` bodies of the API-level errors (§5 "API-level codes", §7).
_RESULT_MISSING_AUTH: Final = ("A001202", "[A001202] Authorization header is missing.")
_RESULT_BAD_AUTH: Final = (
    "A001203",
    "[A001203] Authorization header does not contain valid credentials.",
)
# The 429 body is undocumented (§7 "429 body shape", §11); this one is the emulator's invention,
# shaped like the other API-level errors.
_RESULT_THROTTLED: Final = ("A001429", "[A001429] Too many requests.")
# Authlete documents only A001201 ("TLS must be used") for 400 (§5, §7); nothing documents the
# answer to an unparseable body. The emulator reuses A001201 -- the one documented 400 code, in the
# caller-error family (third digit from the right = 2) -- with a message saying what is wrong.
_BAD_BODY_CODE: Final = "A001201"
# Bodies used when an Override sets a non-200 status without a body (§7 examples).
_STATUS_RESULTS: Final[dict[int, tuple[str, str]]] = {
    400: ("A001201", "[A001201] TLS must be used."),
    401: _RESULT_MISSING_AUTH,
    403: ("A001215", "[A001215] The client is locked."),
    404: ("404", ""),
    429: _RESULT_THROTTLED,
    500: ("A001101", "[A001101] Authlete Server error."),
}


@dataclass(slots=True)
class EmulatedToken:
    """An access token known to the emulator."""

    token: str
    subject: str | None  # None for client-credentials tokens
    client_id: int
    scopes: tuple[str, ...]
    expires_at_ms: int  # epoch milliseconds
    client_id_alias: str | None = None
    refreshable: bool = False
    grant_type: str = "AUTHORIZATION_CODE"

    def to_json(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "subject": self.subject,
            "client_id": self.client_id,
            "client_id_alias": self.client_id_alias,
            "scopes": list(self.scopes),
            "expires_at_ms": self.expires_at_ms,
            "refreshable": self.refreshable,
            "grant_type": self.grant_type,
        }


@dataclass
class Override:
    """Fault injection for the next ``count`` introspection calls (``None`` = until cleared).

    Applied to calls that passed caller authentication and were not throttled. ``count`` is
    decremented in place; the override clears itself when it reaches 0.

    ``body=None`` keeps the normal answer when ``status`` is 200 (so ``delay``/``drip``/``reset``/
    ``headers`` can wrap a real answer); with another status it sends the documented ``result``
    body for that status (e.g. 500 -> A001101).
    """

    status: int = 200
    body: bytes | None = None  # raw body to send instead of the normal answer
    content_type: str = _JSON
    headers: dict[str, str] = field(default_factory=dict)  # replace computed headers
    delay: float = 0.0  # seconds before answering
    drip: float = 0.0  # if > 0: send the body one byte per `drip` seconds
    reset: bool = False  # reset the connection mid-body
    count: int | None = None


@dataclass(slots=True)
class _Bucket:
    level: float
    stamp: float


@dataclass(slots=True)
class _Query:
    """The parsed ``introspection_request`` (only the fields the emulator acts on)."""

    token: str | None
    scopes: list[str] | None
    subject: str | None


class _BadBody(Exception):
    pass


@dataclass(slots=True)
class _TokenSpec:
    token: str
    subject: str | None
    client_id: int
    scopes: tuple[str, ...]
    lifetime: float
    client_id_alias: str | None
    refreshable: bool
    grant_type: str | None


def _result(code: str, message: str) -> dict[str, Any]:
    return {"resultCode": code, "resultMessage": message}


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _challenge(error: str, code: str, message: str) -> str:
    # Shape of §12: error, error_description "[code] message", error_uri on docs.authlete.com.
    return (
        f'Bearer error="{error}",error_description="{_quote(message)}",'
        f'error_uri="https://docs.authlete.com/#{code}"'
    )


def _sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _valid_scope(name: str) -> bool:
    return _SCOPE_TOKEN.fullmatch(name) is not None


# --------------------------------------------------------------------------- validation helpers


def _key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parse_token_spec(
    data: object, where: str, *, require_subject: bool, need_token: bool = True
) -> _TokenSpec:
    """Validate one token description (YAML entry or control-API body)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or 'body'}: must be a mapping")
    allowed = {
        "subject",
        "client_id",
        "client_id_alias",
        "scopes",
        "lifetime",
        "refreshable",
        "grant_type",
    }
    if need_token:
        allowed.add("token")
    for key in data:
        if key not in allowed:
            raise ValueError(f"{_key(where, str(key))}: unknown key")
    token = data.get("token", "")
    if need_token and (not isinstance(token, str) or not token):
        raise ValueError(f"{_key(where, 'token')}: must be a non-empty string")
    if require_subject and "subject" not in data:
        raise ValueError(
            f"{_key(where, 'subject')}: is required (null for a client-credentials token)"
        )
    subject = data.get("subject", _DEFAULT_SUBJECT)
    if subject is not None and not isinstance(subject, str):
        raise ValueError(f"{_key(where, 'subject')}: must be a string or null")
    client_id = data.get("client_id", _DEFAULT_CLIENT_ID)
    if not isinstance(client_id, int) or isinstance(client_id, bool) or client_id < 0:
        raise ValueError(f"{_key(where, 'client_id')}: must be a non-negative integer")
    alias = data.get("client_id_alias")
    if alias is not None and (not isinstance(alias, str) or not alias):
        raise ValueError(f"{_key(where, 'client_id_alias')}: must be a non-empty string or null")
    scopes = data.get("scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ValueError(f"{_key(where, 'scopes')}: must be a list of strings")
    for scope in scopes:
        if not _valid_scope(scope):
            raise ValueError(
                f"{_key(where, 'scopes')}: {scope!r} is not a valid scope name (RFC 6749 §3.3)"
            )
    lifetime = data.get("lifetime", _DEFAULT_LIFETIME)
    if not _is_number(lifetime) or not math.isfinite(lifetime):
        raise ValueError(
            f"{_key(where, 'lifetime')}: must be a number of seconds (negative = expired)"
        )
    refreshable = data.get("refreshable", False)
    if not isinstance(refreshable, bool):
        raise ValueError(f"{_key(where, 'refreshable')}: must be true or false")
    grant_type = data.get("grant_type")
    if grant_type is not None and grant_type not in GRANT_TYPES:
        raise ValueError(
            f"{_key(where, 'grant_type')}: must be one of {', '.join(sorted(GRANT_TYPES))}"
        )
    return _TokenSpec(
        token=token if isinstance(token, str) else "",
        subject=subject,
        client_id=client_id,
        scopes=tuple(scopes),
        lifetime=float(lifetime),
        client_id_alias=alias,
        refreshable=refreshable,
        grant_type=grant_type,
    )


def _parse_override(data: object) -> Override:
    if not isinstance(data, Mapping):
        raise ValueError("override: must be an object or null")
    allowed = {"status", "body", "content_type", "headers", "delay", "drip", "reset", "count"}
    for key in data:
        if key not in allowed:
            raise ValueError(f"override.{key}: unknown key")
    status = data.get("status", 200)
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise ValueError("override.status: must be an HTTP status code")
    body = data.get("body")
    if body is not None and not isinstance(body, str):
        raise ValueError("override.body: must be a string or null")
    content_type = data.get("content_type", _JSON)
    if not isinstance(content_type, str):
        raise ValueError("override.content_type: must be a string")
    headers = data.get("headers", {})
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ValueError("override.headers: must be an object of strings")
    numbers: dict[str, float] = {}
    for name in ("delay", "drip"):
        value = data.get(name, 0.0)
        if not _is_number(value) or not 0 <= value < math.inf:
            raise ValueError(f"override.{name}: must be a non-negative number")
        numbers[name] = float(value)
    reset = data.get("reset", False)
    if not isinstance(reset, bool):
        raise ValueError("override.reset: must be true or false")
    count = data.get("count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        raise ValueError("override.count: must be a positive integer or null")
    return Override(
        status=status,
        body=None if body is None else body.encode(),
        content_type=content_type,
        headers=dict(headers),
        delay=numbers["delay"],
        drip=numbers["drip"],
        reset=reset,
        count=count,
    )


def _check_rate_limit(value: tuple[float, int] | None) -> tuple[float, int] | None:
    if value is None:
        return None
    rate, burst = value
    if not _is_number(rate) or not 0 < rate < math.inf:
        raise ValueError("rate_limit: rate must be a positive number")
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
        raise ValueError("rate_limit: burst must be a positive integer")
    return (float(rate), burst)


# --------------------------------------------------------------------------- the emulator


class Emulator:
    """Authlete introspection emulator.

    All state is in memory and mutated only from the event loop the server runs on.
    """

    def __init__(
        self,
        service_id: str = DEFAULT_SERVICE_ID,
        access_token: str = DEFAULT_ACCESS_TOKEN,
        *,
        latency: float = 0.0,
        rate_limit: tuple[float, int] | None = None,
        reset_form: Literal["delta", "epoch"] = "delta",
        known_scopes: Iterable[str] | None = None,
    ) -> None:
        self.service_id = service_id
        self.access_token = access_token
        self.latency = latency
        self.reset_form: Literal["delta", "epoch"] = reset_form
        # Scope names the emulated service recognises. Authlete drops requested scope names it
        # does not recognise and, if none are left, skips the scope check (§2 `scopes`, §9).
        # None = every syntactically valid name is recognised.
        self.known_scopes: frozenset[str] | None = (
            None if known_scopes is None else frozenset(known_scopes)
        )
        self.override: Override | None = None
        self.calls = 0
        self.call_times: list[float] = []
        self.throttled = 0
        self.base_url = ""
        self._rate_limit: tuple[float, int] | None = _check_rate_limit(rate_limit)
        self._buckets: dict[str, _Bucket] = {}
        self._tokens: dict[str, EmulatedToken] = {}
        self._calls_by_token: dict[bytes, int] = {}  # keyed by SHA-256 of the token
        self._runner: web.AppRunner | None = None

    # ----------------------------------------------------------------------- configuration

    @property
    def rate_limit(self) -> tuple[float, int] | None:
        """``(rate per second, burst)`` of the per-caller token bucket, or None (no limit)."""
        return self._rate_limit

    @rate_limit.setter
    def rate_limit(self, value: tuple[float, int] | None) -> None:
        self._rate_limit = _check_rate_limit(value)
        self._buckets.clear()

    # ----------------------------------------------------------------------- tokens

    def add_token(
        self,
        token: str,
        *,
        subject: str | None = _DEFAULT_SUBJECT,
        client_id: int = _DEFAULT_CLIENT_ID,
        scopes: Iterable[str] = (),
        lifetime: float = _DEFAULT_LIFETIME,
        client_id_alias: str | None = None,
        refreshable: bool = False,
        grant_type: str | None = None,
    ) -> EmulatedToken:
        """Store (or replace) a token. ``lifetime`` is seconds from now; negative = expired.

        ``grant_type`` defaults to CLIENT_CREDENTIALS when ``subject`` is None, else
        AUTHORIZATION_CODE.
        """
        if not token:
            raise ValueError("token: must be a non-empty string")
        scope_tuple = tuple(scopes)
        for scope in scope_tuple:
            if not _valid_scope(scope):
                raise ValueError(f"scopes: {scope!r} is not a valid scope name (RFC 6749 §3.3)")
        if grant_type is None:
            grant_type = "AUTHORIZATION_CODE" if subject is not None else "CLIENT_CREDENTIALS"
        elif grant_type not in GRANT_TYPES:
            raise ValueError(f"grant_type: unknown grant type {grant_type!r}")
        emulated = EmulatedToken(
            token=token,
            subject=subject,
            client_id=client_id,
            scopes=scope_tuple,
            expires_at_ms=int((time.time() + lifetime) * 1000),
            client_id_alias=client_id_alias,
            refreshable=refreshable,
            grant_type=grant_type,
        )
        self._tokens[token] = emulated
        return emulated

    def _add_spec(self, spec: _TokenSpec) -> EmulatedToken:
        return self.add_token(
            spec.token,
            subject=spec.subject,
            client_id=spec.client_id,
            scopes=spec.scopes,
            lifetime=spec.lifetime,
            client_id_alias=spec.client_id_alias,
            refreshable=spec.refreshable,
            grant_type=spec.grant_type,
        )

    def revoke(self, token: str) -> bool:
        """Forget a token; later introspections report it as unknown. True if it was known."""
        return self._tokens.pop(token, None) is not None

    def get_token(self, token: str) -> EmulatedToken | None:
        return self._tokens.get(token)

    @property
    def token_count(self) -> int:
        return len(self._tokens)

    def load_tokens(self, path: str | Path) -> int:
        """Add the tokens of a YAML file (see ``gateway/data/demo-tokens.yaml``).

        The whole file is validated before any token is added. Raises ValueError naming the
        offending key, e.g. ``tokens[2].scopes: must be a list of strings``.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: must be a mapping with a 'tokens' list")
        for key in doc:
            if key != "tokens":
                raise ValueError(f"{path}: {key}: unknown key")
        entries = doc.get("tokens")
        if not isinstance(entries, list):
            raise ValueError(f"{path}: tokens: must be a list")
        specs: list[_TokenSpec] = []
        seen: set[str] = set()
        for index, entry in enumerate(entries):
            where = f"tokens[{index}]"
            try:
                spec = _parse_token_spec(entry, where, require_subject=True)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
            if spec.token in seen:
                raise ValueError(f"{path}: {where}.token: duplicate token")
            seen.add(spec.token)
            specs.append(spec)
        for spec in specs:
            self._add_spec(spec)
        return len(specs)

    # ----------------------------------------------------------------------- statistics

    def calls_for(self, token: str) -> int:
        """Introspection calls whose request carried this token."""
        return self._calls_by_token.get(_sha256(token), 0)

    @property
    def distinct_tokens_called(self) -> int:
        return len(self._calls_by_token)

    @property
    def max_calls_per_token(self) -> int:
        return max(self._calls_by_token.values(), default=0)

    def reset_stats(self) -> None:
        self.calls = 0
        self.call_times = []
        self.throttled = 0
        self._calls_by_token.clear()

    def stats(self, token: str | None = None) -> dict[str, int]:
        out = {
            "calls": self.calls,
            "throttled": self.throttled,
            "tokens": len(self._tokens),
            "distinct_tokens_called": self.distinct_tokens_called,
            "max_calls_per_token": self.max_calls_per_token,
        }
        if token is not None:
            out["calls_for_token"] = self.calls_for(token)
        return out

    # ----------------------------------------------------------------------- server

    def app(self) -> web.Application:
        """A new aiohttp application serving this emulator's state.

        Routes: ``POST /api/{serviceId}/auth/introspection`` (other methods: 405) and the control
        API ``POST /_emulator/tokens``, ``POST /_emulator/tokens/bulk``, ``POST /_emulator/revoke``,
        ``GET /_emulator/stats[?token=...]``, ``POST /_emulator/reset``,
        ``POST /_emulator/config``, ``POST /_emulator/override``.
        """
        app = web.Application()
        app.router.add_post("/api/{service_id}/auth/introspection", self._handle_introspection)
        app.router.add_post("/_emulator/tokens", self._handle_add_token)
        app.router.add_post("/_emulator/tokens/bulk", self._handle_bulk)
        app.router.add_post("/_emulator/revoke", self._handle_revoke)
        app.router.add_get("/_emulator/stats", self._handle_stats)
        app.router.add_post("/_emulator/reset", self._handle_reset)
        app.router.add_post("/_emulator/config", self._handle_config)
        app.router.add_post("/_emulator/override", self._handle_override)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0 = any free port); returns the base URL."""
        if self._runner is not None:
            raise RuntimeError("emulator already started")
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.base_url = f"http://{url_host}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # ----------------------------------------------------------------------- introspection

    async def _handle_introspection(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        self.call_times.append(time.monotonic())
        raw = await request.read()
        query: _Query | None = None
        bad_body: str | None = None
        try:
            query = self._parse_query(request.content_type, raw)
        except _BadBody as exc:
            bad_body = str(exc)
        if query is not None and query.token:
            digest = _sha256(query.token)
            self._calls_by_token[digest] = self._calls_by_token.get(digest, 0) + 1
        if self.latency > 0:
            await asyncio.sleep(self.latency)

        # Caller authentication (§1): a missing header is A001202, anything else wrong A001203.
        auth = request.headers.getall("Authorization", [])
        if not auth or (len(auth) == 1 and not auth[0].strip()):
            return self._result_response(401, *_RESULT_MISSING_AUTH)
        scheme, _, credential = auth[0].strip().partition(" ")
        if (
            len(auth) != 1
            or scheme.lower() != "bearer"
            or not secrets.compare_digest(credential.strip().encode(), self.access_token.encode())
        ):
            return self._result_response(401, *_RESULT_BAD_AUTH)
        caller = self.access_token

        headers: dict[str, str] = {}
        if self._rate_limit is not None:
            allowed, headers = self._take(caller)
            if not allowed:
                self.throttled += 1
                return self._result_response(429, *_RESULT_THROTTLED, headers=headers)

        override = self._take_override()
        if override is not None:
            return await self._send_override(request, override, headers, query, bad_body)
        status, body = self._answer(request, query, bad_body)
        return web.Response(status=status, body=body, content_type=_JSON, headers=headers)

    def _answer(
        self, request: web.Request, query: _Query | None, bad_body: str | None
    ) -> tuple[int, bytes]:
        if request.match_info["service_id"] != self.service_id:
            # §5/§7: the spec's 404 example uses the literal resultCode "404", empty message.
            return 404, _dumps(_result("404", ""))
        if query is None:
            message = f"[{_BAD_BODY_CODE}] {bad_body or 'The request body is malformed.'}"
            return 400, _dumps(_result(_BAD_BODY_CODE, message))
        return 200, _dumps(self.introspect(query.token, query.scopes, query.subject))

    @staticmethod
    def _parse_query(content_type: str, raw: bytes) -> _Query:
        if content_type == _JSON:
            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise _BadBody("The request body is not valid JSON.") from None
            if not isinstance(data, dict):
                raise _BadBody("The request body must be a JSON object.")
            token = data.get("token")
            scopes = data.get("scopes")
            subject = data.get("subject")
            if token is not None and not isinstance(token, str):
                raise _BadBody("'token' must be a string.")
            if scopes is not None and (
                not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes)
            ):
                raise _BadBody("'scopes' must be an array of strings.")
            if subject is not None and not isinstance(subject, str):
                raise _BadBody("'subject' must be a string.")
            return _Query(token=token, scopes=scopes, subject=subject)
        if content_type == _FORM:
            try:
                pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True)
            except (ValueError, UnicodeDecodeError):
                raise _BadBody("The request body is not valid form data.") from None
            form: dict[str, str] = {}
            for name, value in pairs:
                form.setdefault(name, value)
            form_scopes = form.get("scopes")
            # §1: in form encoding `scopes` is one space-separated string.
            return _Query(
                token=form.get("token") or None,
                scopes=None if form_scopes is None else form_scopes.split(),
                subject=form.get("subject") or None,
            )
        raise _BadBody(f"Unsupported content type {content_type!r}.")

    def introspect(
        self, token: str | None, scopes: list[str] | None = None, subject: str | None = None
    ) -> dict[str, Any]:
        """The ``introspection_response`` for a request (with its side effects, §9)."""
        if not token:
            code, message = (
                "A057301",
                "[A057301] The request does not contain a valid access token.",
            )
            return {  # §12.4
                **_result(code, message),
                "action": "BAD_REQUEST",
                "responseContent": _challenge("invalid_request", code, message),
                "existent": False,
                "usable": False,
                "sufficient": False,
                "refreshable": False,
            }
        found = self._tokens.get(token)
        if found is None:
            code, message = "A057302", "[A057302] The access token does not exist."
            return {  # §12.2
                **_result(code, message),
                "action": "UNAUTHORIZED",
                "responseContent": _challenge("invalid_token", code, message),
                "clientId": 0,
                "existent": False,
                "usable": False,
                "sufficient": False,
                "refreshable": False,
                "expiresAt": 0,
            }
        if found.expires_at_ms <= int(time.time() * 1000):
            # §9 "Expiry side effect": the first introspection after expiry deletes the token.
            del self._tokens[token]
            if found.refreshable:
                code = "A065301"
                message = "[A065301] The access token has expired, but it can be refreshed."
            else:
                code, message = "A065303", "[A065303] The access token has expired."
            return {
                **_result(code, message),
                "action": "UNAUTHORIZED",
                "responseContent": _challenge("invalid_token", code, message),
                **self._token_fields(found),
                "existent": True,
                "usable": False,
                "sufficient": False,
            }
        if scopes:
            # Names Authlete would not recognise are dropped; if none remain, no check (§2, §9).
            known = self.known_scopes
            required = [s for s in scopes if _valid_scope(s) and (known is None or s in known)]
            if required and not found.scopes:
                code = "A064301"
                message = "[A064301] No scopes are associated with the access token."
                return self._forbidden(found, "insufficient_scope", code, message, False)
            held = set(found.scopes)
            for name in required:
                if name not in held:
                    code = "A064302"
                    message = (
                        f"[A064302] The access token does not cover the required scope '{name}'."
                    )
                    return self._forbidden(found, "insufficient_scope", code, message, False)
        if subject is not None:
            if found.subject is None:
                code = "A066301"
                message = (
                    "[A066301] The access token is not associated with any subject, "
                    "but a subject is required."
                )
                return self._forbidden(found, "invalid_request", code, message, True)
            if subject != found.subject:
                code = "A066302"
                message = (
                    "[A066302] The subject associated with the access token is different "
                    "from the required subject."
                )
                return self._forbidden(found, "invalid_request", code, message, True)
        code, message = "A056001", "[A056001] The access token is valid."
        return {  # §12.1
            **_result(code, message),
            "action": "OK",
            "responseContent": 'Bearer error="invalid_request"',
            **self._token_fields(found),
            "clientIdAlias": found.client_id_alias,
            "clientIdAliasUsed": found.client_id_alias is not None,
            "clientEntityIdUsed": False,
            "metadataDocumentUsed": False,
            "existent": True,
            "usable": True,
            "sufficient": True,
            "grantType": found.grant_type,
            "properties": [],
            "forExternalAttachment": False,
            "forCredentialIssuance": False,
            "responseSigningRequired": False,
        }

    @staticmethod
    def _token_fields(found: EmulatedToken) -> dict[str, Any]:
        return {
            "clientId": found.client_id,
            "subject": found.subject,
            "scopes": list(found.scopes),
            "refreshable": found.refreshable,
            "expiresAt": found.expires_at_ms,
        }

    def _forbidden(
        self, found: EmulatedToken, error: str, code: str, message: str, sufficient: bool
    ) -> dict[str, Any]:
        return {  # §12.3
            **_result(code, message),
            "action": "FORBIDDEN",
            "responseContent": _challenge(error, code, message),
            **self._token_fields(found),
            "existent": True,
            "usable": True,
            "sufficient": sufficient,
        }

    # ----------------------------------------------------------------------- rate limiting

    def _take(self, caller: str) -> tuple[bool, dict[str, str]]:
        """Take one token from the caller's bucket; returns (allowed, rate-limit headers)."""
        assert self._rate_limit is not None
        rate, burst = self._rate_limit
        now = time.monotonic()
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = self._buckets[caller] = _Bucket(level=float(burst), stamp=now)
        bucket.level = min(float(burst), bucket.level + (now - bucket.stamp) * rate)
        bucket.stamp = now
        allowed = bucket.level >= 1.0
        if allowed:
            bucket.level -= 1.0
        full_in = (burst - bucket.level) / rate
        reset = (
            math.ceil(full_in) if self.reset_form == "delta" else math.ceil(time.time() + full_in)
        )
        headers = {
            # The README example is an integer; a rate below 1/s is still advertised as 1.
            "X-RateLimit-Limit": str(max(1, int(rate))),
            "X-RateLimit-Remaining": str(math.floor(bucket.level)),
            "X-RateLimit-Reset": str(reset),
        }
        if not allowed:
            headers["Retry-After"] = str(max(1, math.ceil((1.0 - bucket.level) / rate)))
        return allowed, headers

    # ----------------------------------------------------------------------- overrides

    def _take_override(self) -> Override | None:
        override = self.override
        if override is None:
            return None
        if override.count is not None:
            if override.count <= 0:
                self.override = None
                return None
            override.count -= 1
            if override.count == 0:
                self.override = None
        return override

    async def _send_override(
        self,
        request: web.Request,
        override: Override,
        computed: dict[str, str],
        query: _Query | None,
        bad_body: str | None,
    ) -> web.StreamResponse:
        if override.delay > 0:
            await asyncio.sleep(override.delay)
        status = override.status
        if override.body is not None:
            body = override.body
        elif status == 200:
            status, body = self._answer(request, query, bad_body)
        else:
            code, message = _STATUS_RESULTS.get(status, _STATUS_RESULTS[500])
            body = _dumps(_result(code, message))
        # Override.headers replace computed ones (names compared case-insensitively).
        headers = {k.lower(): (k, v) for k, v in computed.items()}
        headers["content-type"] = ("Content-Type", override.content_type)
        headers.update({k.lower(): (k, v) for k, v in override.headers.items()})

        if not override.reset and override.drip <= 0:
            response = web.Response(status=status, body=body)
            for name, value in headers.values():
                response.headers[name] = value
            return response

        stream = web.StreamResponse(status=status)
        for name, value in headers.values():
            stream.headers[name] = value
        # A reset promises more than it sends, so the client sees a truncated body.
        stream.content_length = len(body) + 1024 if override.reset else len(body)
        try:
            await stream.prepare(request)
            if override.reset:
                await stream.write(body[: max(1, len(body) // 2)])
                await asyncio.sleep(0.01)  # let the partial body leave before the reset
                _abort(request)
                return stream
            for index in range(len(body)):
                await asyncio.sleep(override.drip)
                await stream.write(body[index : index + 1])
            await stream.write_eof()
        except ConnectionError:
            _abort(request)
        return stream

    # ----------------------------------------------------------------------- control API

    @staticmethod
    async def _control_body(request: web.Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise _control_error("body: must be valid JSON") from None

    async def _handle_add_token(self, request: web.Request) -> web.Response:
        data = await self._control_body(request)
        try:
            spec = _parse_token_spec(data, "", require_subject=False)
            emulated = self._add_spec(spec)
        except ValueError as exc:
            raise _control_error(str(exc)) from None
        return web.json_response(emulated.to_json(), status=201)

    async def _handle_bulk(self, request: web.Request) -> web.Response:
        data = await self._control_body(request)
        try:
            if not isinstance(data, dict):
                raise ValueError("body: must be an object")
            prefix = data.get("prefix", "bench-")
            count = data.get("count")
            if not isinstance(prefix, str):
                raise ValueError("prefix: must be a string")
            if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 10**7:
                raise ValueError("count: must be an integer between 0 and 10000000")
            if not prefix and count:
                raise ValueError("prefix: must not be empty")
            rest = {k: v for k, v in data.items() if k not in ("prefix", "count")}
            spec = _parse_token_spec(rest, "", require_subject=False, need_token=False)
            expires_at_ms = int((time.time() + spec.lifetime) * 1000)
            grant_type = spec.grant_type or (
                "AUTHORIZATION_CODE" if spec.subject is not None else "CLIENT_CREDENTIALS"
            )
        except ValueError as exc:
            raise _control_error(str(exc)) from None
        for index in range(count):
            name = f"{prefix}{index}"
            self._tokens[name] = EmulatedToken(
                token=name,
                subject=spec.subject,
                client_id=spec.client_id,
                scopes=spec.scopes,
                expires_at_ms=expires_at_ms,
                client_id_alias=spec.client_id_alias,
                refreshable=spec.refreshable,
                grant_type=grant_type,
            )
        return web.json_response({"created": count, "tokens": len(self._tokens)}, status=201)

    async def _handle_revoke(self, request: web.Request) -> web.Response:
        data = await self._control_body(request)
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise _control_error("token: must be a non-empty string")
        return web.json_response({"revoked": self.revoke(token)})

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats(request.query.get("token")))

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return web.json_response(self.stats())

    async def _handle_config(self, request: web.Request) -> web.Response:
        data = await self._control_body(request)
        try:
            if not isinstance(data, dict):
                raise ValueError("body: must be an object")
            for key in data:
                if key not in ("latency", "rate_limit", "reset_form", "known_scopes"):
                    raise ValueError(f"{key}: unknown key")
            latency = data.get("latency", self.latency)
            if not _is_number(latency) or not 0 <= latency < math.inf:
                raise ValueError("latency: must be a non-negative number of seconds")
            reset_form = data.get("reset_form", self.reset_form)
            if reset_form not in ("delta", "epoch"):
                raise ValueError("reset_form: must be 'delta' or 'epoch'")
            rate_limit = self._rate_limit
            if "rate_limit" in data:
                raw = data["rate_limit"]
                if raw is None:
                    rate_limit = None
                elif isinstance(raw, dict) and set(raw) <= {"rate", "burst"} and "rate" in raw:
                    rate = raw["rate"]
                    burst = raw.get("burst", max(1, math.ceil(rate) if _is_number(rate) else 1))
                    rate_limit = _check_rate_limit((rate, burst))
                else:
                    raise ValueError("rate_limit: must be {'rate': r, 'burst': b} or null")
            known = self.known_scopes
            if "known_scopes" in data:
                raw_known = data["known_scopes"]
                if raw_known is not None and (
                    not isinstance(raw_known, list)
                    or not all(isinstance(s, str) for s in raw_known)
                ):
                    raise ValueError("known_scopes: must be a list of strings or null")
                known = None if raw_known is None else frozenset(raw_known)
        except ValueError as exc:
            raise _control_error(str(exc)) from None
        self.latency = float(latency)
        self.reset_form = reset_form
        if "rate_limit" in data:
            self.rate_limit = rate_limit
        self.known_scopes = known
        return web.json_response(self.config())

    def config(self) -> dict[str, Any]:
        limit = self._rate_limit
        return {
            "latency": self.latency,
            "rate_limit": None if limit is None else {"rate": limit[0], "burst": limit[1]},
            "reset_form": self.reset_form,
            "known_scopes": None if self.known_scopes is None else sorted(self.known_scopes),
        }

    async def _handle_override(self, request: web.Request) -> web.Response:
        # JSON null or an empty body clears the override.
        data = await self._control_body(request) if await request.read() else None
        if data is None:
            self.override = None
            return web.json_response({"override": None})
        try:
            self.override = _parse_override(data)
        except ValueError as exc:
            raise _control_error(str(exc)) from None
        return web.json_response({"override": _override_json(self.override)})

    @staticmethod
    def _result_response(
        status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return web.Response(
            status=status, body=_dumps(_result(code, message)), content_type=_JSON, headers=headers
        )


def _override_json(override: Override) -> dict[str, Any]:
    return {
        "status": override.status,
        "body": None if override.body is None else override.body.decode("utf-8", "replace"),
        "content_type": override.content_type,
        "headers": override.headers,
        "delay": override.delay,
        "drip": override.drip,
        "reset": override.reset,
        "count": override.count,
    }


def _control_error(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type=_JSON)


def _abort(request: web.Request) -> None:
    """Reset the client connection: SO_LINGER 0 turns the close into a TCP RST."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
