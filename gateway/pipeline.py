"""The request pipeline, top to bottom, as plain functions over plain values:

    route (routing) -> token (bearer) -> verdict (verdicts) -> decision -> forward (proxy)

The listener calls `admit` when a request head is complete. A cache hit is decided there and
then, synchronously; only a miss returns a `Miss`, which the listener awaits in a task.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from gateway import bearer
from gateway.cache import token_key
from gateway.config import Config, Route, Upstream
from gateway.decision import NOT_FOUND, SERVICE_UNAVAILABLE, Decider, Denial, denial
from gateway.metrics import Metrics, _CounterChild, _HistogramChild
from gateway.proxy import HeaderPolicy, Inbound
from gateway.routing import PathError, Router, parse_target
from gateway.upstream import Pool
from gateway.verdict import Active, Verdict
from gateway.verdicts import Verdicts

BAD_FRAMING = denial(400, "invalid_request", "Only Transfer-Encoding: chunked is accepted.")
BAD_HOST = denial(400, "invalid_request", "An HTTP/1.1 request needs exactly one Host header.")
TOO_LARGE = denial(413, "request_too_large", "The request body exceeds this route's limit.")
BODY_TIMEOUT = denial(408, "request_timeout", "The request body stopped arriving.")
CONNECT_REFUSED = denial(405, "method_not_allowed", "CONNECT is not supported.")
TRACE_REFUSED = denial(405, "method_not_allowed", "TRACE is not allowed on this route.")
BODY_TOO_SLOW = denial(408, "request_timeout", "The request body arrives too slowly.")


class CompiledRoute:
    """A route as the hot path needs it, built once per (re)load."""

    __slots__ = (
        "auth_required",
        "duration",
        "forward_authorization",
        "max_body_bytes",
        "name",
        "overhead",
        "pool",
        "request_buffering",
        "route",
        "scopes",
        "timeout",
        "upstream_duration",
        "upstream_errors",
    )

    def __init__(self, route: Route, pool: Pool, metrics: Metrics) -> None:
        self.route = route
        self.name = route.name
        self.pool = pool
        self.timeout = route.timeout
        self.max_body_bytes = route.max_body_bytes
        self.forward_authorization = route.forward_authorization
        self.request_buffering = route.request_buffering
        self.auth_required = route.auth_required
        self.scopes = route.scopes
        self.duration: _HistogramChild = metrics.request_duration.labels(route.name)
        self.overhead: _HistogramChild = metrics.overhead.labels(route.name)
        self.upstream_duration: _HistogramChild = metrics.upstream_duration.labels(route.name)
        self.upstream_errors: dict[str, _CounterChild] = {}


class Plan:
    """Everything a request reads from the config, built once per (re)load."""

    __slots__ = (
        "cfg",
        "decider",
        "header_policy",
        "max_token_bytes",
        "routed",
        "router",
        "routes",
        "token_pattern",
    )

    def __init__(self, cfg: Config, pool_for: Callable[[Upstream], Pool], metrics: Metrics) -> None:
        self.cfg = cfg
        self.router = Router(cfg.routes)
        self.decider = Decider(cfg.realm)
        self.header_policy = HeaderPolicy(cfg.headers, cfg.trusted_proxies)
        self.max_token_bytes = cfg.max_token_bytes
        self.token_pattern = cfg.authlete.token_pattern
        self.routes = {r.name: CompiledRoute(r, pool_for(r.upstream), metrics) for r in cfg.routes}
        # (method, raw target) -> where it goes: routing is a pure function of the two for
        # one plan, so the hot path's repeated targets skip normalising and matching.
        self.routed: dict[tuple[bytes, bytes], Routed] = {}


class Miss(NamedTuple):
    """No cached verdict: the listener awaits `verdicts.fetch(token, key)`."""

    token: str
    key: bytes


class Routed(NamedTuple):
    route: CompiledRoute
    path: str  # normalised: what was matched, and what is forwarded
    target: bytes  # path and query as forwarded


_ROUTED_CACHE_SIZE = 4096


def route_request(plan: Plan, method: bytes, raw_target: bytes) -> Routed | Denial:
    key = (method, raw_target)
    routed = plan.routed.get(key)
    if routed is not None:
        return routed
    if method == b"CONNECT":
        return CONNECT_REFUSED  # a tunnel, whatever its target looks like: never forwarded
    try:
        target = parse_target(raw_target.decode("latin-1"))
    except PathError as exc:
        return denial(400, "invalid_request", f"Invalid request path: {exc.reason}.")
    route = plan.router.match(method.decode("latin-1"), target.path)
    if route is None:
        return TRACE_REFUSED if method == b"TRACE" else NOT_FOUND
    routed = Routed(plan.routes[route.name], target.path, target.forward.encode())
    if len(plan.routed) >= _ROUTED_CACHE_SIZE:
        plan.routed.clear()  # bounded; a client varying its targets only empties it
    plan.routed[key] = routed
    return routed


def check_framing(inbound: Inbound, http11: bool, limit: int) -> Denial | None:
    """Refusals after which the connection is closed: the body cannot be trusted or read."""
    if inbound.transfer_encoding is not None:
        # Only a single "chunked" is unambiguous; anything else is refused, never passed on
        # for an upstream to read differently (request smuggling).
        te = inbound.transfer_encoding
        if not http11 or len(te) != 1 or te[0].strip().lower() != b"chunked":
            return BAD_FRAMING
    if limit and inbound.content_length is not None and int(inbound.content_length) > limit:
        return TOO_LARGE
    return None


def token_of(plan: Plan, inbound: Inbound) -> str | Denial:
    token = bearer.extract(inbound.authorization or (), plan.max_token_bytes)
    if isinstance(token, bearer.NoToken):
        return plan.decider.no_token(token)
    pattern = plan.token_pattern
    if pattern is not None and pattern.fullmatch(token) is None:
        return plan.decider.not_issued  # not the service's token format: no call for it
    return token


def lookup(verdicts: Verdicts, token: str) -> tuple[Verdict, str] | Miss:
    key = token_key(token)
    found = verdicts.cached(key, token)
    return found if found is not None else Miss(token, key)


def judge(plan: Plan, route: CompiledRoute, verdict: Verdict) -> Active | Denial:
    """Route scopes are checked on every request, cache hit or miss."""
    refused = plan.decider.check(verdict, route.scopes)
    if refused is not None:
        return refused
    assert isinstance(verdict, Active)
    return verdict


def unavailable(retry_after: float | None) -> Denial:
    if retry_after is None:
        return SERVICE_UNAVAILABLE
    return SERVICE_UNAVAILABLE._replace(retry_after=str(max(1, math.ceil(retry_after))))
