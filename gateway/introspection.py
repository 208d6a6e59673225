"""One call to Authlete's introspection API and the strict parsing of its answer.

Anything that is not exactly the documented shape is an IntrospectionError, which the
gateway turns into a 503: an unexpected answer is never an allowance.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from gateway.budget import Budget, CallFailed, Priority, Reply, TransportError
from gateway.config import AuthleteConfig
from gateway.metrics import Metrics
from gateway.tracing import current_span
from gateway.verdict import Active, Inactive, Verdict

log = logging.getLogger("gateway.introspection")

MAX_BODY_BYTES = 1 << 20
# Milliseconds below this cannot be a real expiry of a live token (2001-09-09); such a
# value is almost certainly seconds sent by mistake, so it is refused, not trusted.
_MIN_PLAUSIBLE_EXPIRES_MS = 10**12
_MAX_EXPIRES_MS = 10**14  # year ~5138
_MAX_CLIENT_ID = 2**63 - 1

DEFAULT_CHALLENGES = {
    "UNAUTHORIZED": 'Bearer error="invalid_token"',
    "BAD_REQUEST": 'Bearer error="invalid_request"',
    "FORBIDDEN": 'Bearer error="insufficient_scope"',
    "INTERNAL_SERVER_ERROR": 'Bearer error="server_error"',
}
EXPIRED_CHALLENGE = 'Bearer error="invalid_token", error_description="The access token expired"'


# Outcomes after which a stale verdict may be served: Authlete could not give a verdict.
STALE_OK = frozenset(
    {"error", "timeout", "throttled", "budget", "breaker_open", "invalid_response"}
)


class IntrospectionError(Exception):
    """No verdict could be had.

    `outcome` is a bounded metric label; the message never holds the token.
    """

    def __init__(self, outcome: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.retry_after = retry_after

    @property
    def stale_ok(self) -> bool:
        return self.outcome in STALE_OK


class Introspector:
    """Owns the pooled HTTP client used to reach Authlete; every call goes through the budget."""

    def __init__(
        self,
        cfg: AuthleteConfig,
        session: aiohttp.ClientSession,
        budget: Budget,
        metrics: Metrics,
    ) -> None:
        self._url = cfg.introspection_url
        self._session = session
        self._budget = budget
        self._metrics = metrics
        self._headers = {
            "Authorization": f"Bearer {cfg.access_token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        self.credentials_rejected = False

    async def introspect(
        self,
        token: str,
        deadline: float,
        on_send: Callable[[], None] | None = None,
        priority: Priority = Priority.NEW,
    ) -> Verdict:
        """One verdict; `deadline` (monotonic) bounds waiting, the calls and their retries.

        `on_send` is told when a call leaves (the budget granted it); `priority` is the
        call's place in the budget's queue.
        """
        body = json.dumps({"token": token}).encode()
        metrics = self._metrics

        async def attempt(timeout: float) -> Reply:
            if on_send is not None:
                on_send()
            started = time.perf_counter()
            try:
                async with self._session.post(
                    self._url,
                    data=body,
                    headers=self._headers,
                    timeout=aiohttp.ClientTimeout(total=timeout),
                ) as resp:
                    payload = await _read_bounded(resp.content, MAX_BODY_BYTES)
                    reply = Reply(resp.status, resp.headers, payload)
            except TimeoutError:
                metrics.introspections.labels("timeout").inc()
                raise TransportError("timeout", "Authlete did not answer in time") from None
            except aiohttp.ClientError as exc:
                metrics.introspections.labels("error").inc()
                raise TransportError(
                    "error", f"Authlete unreachable: {type(exc).__name__}"
                ) from None
            except IntrospectionError as exc:  # an answer too large to read
                metrics.introspections.labels(exc.outcome).inc()
                raise
            finally:
                metrics.introspection_duration.observe(time.perf_counter() - started)
            if reply.status == 429:
                metrics.introspections.labels("throttled").inc()
            elif reply.status >= 500:
                metrics.introspections.labels("error").inc()
            return reply

        async def send(timeout: float) -> Reply:
            traced = current_span()  # OpenTelemetry: a span under the request that asked
            if traced is None:
                return await attempt(timeout)
            otel, parent = traced
            span = otel.introspection_span(parent, self._url)
            try:
                reply = await attempt(timeout)
            except TransportError as exc:
                otel.end_introspection(span, None, exc.outcome)
                raise
            except BaseException as exc:
                outcome = exc.outcome if isinstance(exc, IntrospectionError) else None
                otel.end_introspection(span, None, outcome or type(exc).__name__)
                raise
            otel.end_introspection(span, reply.status, None)
            return reply

        try:
            reply = await self._budget.call(send, deadline, priority)
        except CallFailed as exc:
            raise IntrospectionError(exc.outcome, exc.detail, exc.retry_after) from None
        try:
            verdict = self._judge(reply)
        except IntrospectionError as exc:
            metrics.introspections.labels(exc.outcome).inc()
            raise
        outcome = "ok" if isinstance(verdict, Active) else verdict.action.lower()
        metrics.introspections.labels(outcome).inc()
        return verdict

    def _judge(self, reply: Reply) -> Verdict:
        if reply.status == 401:
            if not self.credentials_rejected:
                log.error(
                    "Authlete rejected the gateway's own access token (HTTP 401): "
                    "check authlete.access_token and authlete.service_id"
                )
            self.credentials_rejected = True
            raise IntrospectionError("rejected", "Authlete rejected the gateway's credentials")
        self.credentials_rejected = False
        if reply.status != 200:
            raise IntrospectionError("error", f"Authlete answered HTTP {reply.status}")
        return parse_answer(reply.body, time.time())


async def _read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream.iter_any():
        size += len(chunk)
        if size > limit:
            raise IntrospectionError("invalid_response", "Authlete answer too large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_answer(payload: bytes, now: float) -> Verdict:
    """Turn a 200 body into a verdict, or raise IntrospectionError('invalid_response')."""
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise _invalid("body is not JSON") from None
    if not isinstance(doc, dict):
        raise _invalid("body is not a JSON object")
    action = doc.get("action")
    if not isinstance(action, str):
        raise _invalid("missing action")
    if action == "OK":
        return _active(doc, now)
    if action not in DEFAULT_CHALLENGES:
        raise _invalid("unknown action")
    challenge = doc.get("responseContent")
    if not isinstance(challenge, str) or not _header_safe(challenge):
        challenge = DEFAULT_CHALLENGES[action]
    return Inactive(action, challenge)


def _active(doc: dict[str, Any], now: float) -> Verdict:
    subject = doc.get("subject")
    if subject is not None and (not isinstance(subject, str) or not _header_safe(subject)):
        raise _invalid("subject is not a string")
    client_id = doc.get("clientId")
    if type(client_id) is not int or not 0 <= client_id <= _MAX_CLIENT_ID:
        raise _invalid("clientId is not a 64-bit integer")
    scopes = doc.get("scopes")
    if scopes is None:
        scopes = []
    if not isinstance(scopes, list) or not all(
        isinstance(s, str) and s and _header_safe(s) and " " not in s for s in scopes
    ):
        raise _invalid("scopes is not a list of scope names")
    expires_ms = doc.get("expiresAt")
    if (
        type(expires_ms) is not int
        or not _MIN_PLAUSIBLE_EXPIRES_MS <= expires_ms <= _MAX_EXPIRES_MS
    ):
        raise _invalid("expiresAt is not a plausible epoch-milliseconds integer")
    expires_at = expires_ms / 1000.0
    if expires_at <= now:
        return Inactive("UNAUTHORIZED", EXPIRED_CHALLENGE)
    scope_tuple = tuple(dict.fromkeys(scopes))
    return Active(subject or None, str(client_id), scope_tuple, " ".join(scope_tuple), expires_at)


def _header_safe(value: str) -> bool:
    return all(" " <= c != "\x7f" for c in value)


def _invalid(detail: str) -> IntrospectionError:
    return IntrospectionError("invalid_response", f"unexpected Authlete answer: {detail}")
