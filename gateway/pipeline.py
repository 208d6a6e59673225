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
from gateway.config import Config, Route
from gateway.cors import Policy
from gateway.decision import NOT_FOUND, SERVICE_UNAVAILABLE, Decider, Denial, denial
from gateway.metrics import Metrics, _CounterChild, _HistogramChild
from gateway.proxy import HeaderPolicy, Inbound, Redirects
from gateway.routing import (
    PathError,
    Router,
    forwarded_path,
    host_matches,
    host_name,
    parse_target,
)
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
INVALID_HOST = denial(400, "invalid_request", "The Host header is not a valid host name.")
MISDIRECTED = denial(
    421, "misdirected_request", "This connection's TLS server name does not serve this Host."
)


class CompiledRoute:
    """A route as the hot path needs it, built once per (re)load."""

    __slots__ = (
        "auth_required",
        "cors",
        "decision_duration",
        "denials",
        "duration",
        "forward_authorization",
        "max_body_bytes",
        "name",
        "overhead",
        "pool",
        "preserve_host",
        "redirects",
        "request_buffering",
        "route",
        "scopes",
        "timeout",
        "upstream_duration",
        "upstream_errors",
    )

    def __init__(self, route: Route, pool: Pool | None, metrics: Metrics) -> None:
        self.route = route
        self.name = route.name
        self.pool = pool  # None: a decision-only route (no upstream)
        self.timeout = route.timeout
        self.max_body_bytes = route.max_body_bytes
        self.forward_authorization = route.forward_authorization
        self.request_buffering = route.request_buffering
        self.auth_required = route.auth_required
        self.scopes = route.scopes
        self.cors: Policy | None = None  # set by Plan: the route's own or the global one
        self.preserve_host = route.preserve_host
        self.redirects = (
            Redirects(route.endpoints, route.base_path, route.path_prefix, route.strip_prefix)
            if route.rewrite_redirects
            else None
        )
        self.duration: _HistogramChild = metrics.request_duration.labels(route.name)
        self.overhead: _HistogramChild = metrics.overhead.labels(route.name)
        self.upstream_duration: _HistogramChild = metrics.upstream_duration.labels(route.name)
        self.decision_duration: _HistogramChild = metrics.decision_duration.labels(route.name)
        # Token denials by reason, at 0 from the start on routes that check tokens.
        self.denials: dict[str, _CounterChild] = (
            metrics.route_denials(route.name) if route.auth_required else {}
        )
        self.upstream_errors: dict[str, _CounterChild] = (
            metrics.route_upstream_errors(route.name) if pool is not None else {}
        )


class Plan:
    """Everything a request reads from the config, built once per (re)load."""

    __slots__ = (
        "cfg",
        "cors",
        "decider",
        "decision_on_proxy",
        "decision_path",
        "decision_routed",
        "decision_router",
        "header_policy",
        "host_routes",
        "host_sets",
        "max_token_bytes",
        "routed",
        "router",
        "routes",
        "token_pattern",
    )

    def __init__(self, cfg: Config, pool_for: Callable[[Route], Pool], metrics: Metrics) -> None:
        self.cfg = cfg
        # Proxied requests never match a decision-only route (one without an upstream);
        # decision requests match every route, in the same order.
        self.router = Router(tuple(r for r in cfg.routes if r.upstream is not None))
        self.decision_router = Router(cfg.routes)
        decision = cfg.decision
        self.decision_path = decision.path.encode() if decision is not None else None
        # Answered on the proxy listener too, unless they have a listener of their own.
        self.decision_on_proxy = (
            self.decision_path if decision is not None and decision.listen is None else None
        )
        self.decider = Decider(cfg.realm)
        self.header_policy = HeaderPolicy(cfg.headers, cfg.trusted_proxies)
        self.max_token_bytes = cfg.max_token_bytes
        self.token_pattern = cfg.authlete.token_pattern
        self.routes = {
            r.name: CompiledRoute(r, pool_for(r) if r.upstream is not None else None, metrics)
            for r in cfg.routes
        }
        # CORS: the global policy answers what no route took (404, 400 before routing); a
        # route's own `cors:` replaces it whole, `cors: false` turns it off there.
        self.cors = Policy(cfg.cors) if cfg.cors is not None else None
        for r in cfg.routes:
            self.routes[r.name].cors = (
                self.cors if r.cors is None else Policy(r.cors) if r.cors else None
            )
        # Routes with `hosts`, for the TLS server name check; the set each name selects.
        self.host_routes = tuple(r.hosts for r in cfg.routes if r.hosts)
        self.host_sets: dict[str, tuple[bool, ...]] = {}
        # (method, raw target, Host) -> where it goes: routing is a pure function of them for
        # one plan, so the hot path's repeated targets skip normalising and matching.
        self.routed: dict[tuple[bytes, bytes, bytes | None], Routed] = {}
        self.decision_routed: dict[tuple[bytes, bytes, bytes | None], Routed] = {}


class Miss(NamedTuple):
    """No cached verdict: the listener awaits `verdicts.fetch(token, key)`."""

    token: str
    key: bytes


class Routed(NamedTuple):
    route: CompiledRoute
    path: str  # normalised: what was matched
    target: bytes  # path and query as forwarded: `path` itself, or as strip_prefix and the
    # upstream's base path make it (routing.forwarded_path)


_ROUTED_CACHE_SIZE = 4096


def route_request(
    plan: Plan,
    method: bytes,
    raw_target: bytes,
    host: bytes | None = None,
    decision: bool = False,
) -> Routed | Denial:
    """`host`: the request's Host header, as sent (None when it has none: HTTP/1.0).
    `decision`: the request an ingress asks about, which may take a decision-only route."""
    key = (method, raw_target, host)
    cache = plan.decision_routed if decision else plan.routed
    routed = cache.get(key)
    if routed is not None:
        return routed
    if method == b"CONNECT":
        return CONNECT_REFUSED  # a tunnel, whatever its target looks like: never forwarded
    name = host_name(host)
    if name is None:
        return INVALID_HOST
    try:
        target = parse_target(raw_target.decode("latin-1"))
    except PathError as exc:
        return denial(400, "invalid_request", f"Invalid request path: {exc.reason}.")
    router = plan.decision_router if decision else plan.router
    route = router.match(method.decode("latin-1"), target.path, name)
    if route is None:
        return TRACE_REFUSED if method == b"TRACE" else NOT_FOUND
    forward = target.forward
    if route.strip_prefix or route.base_path:
        path = forwarded_path(target.path, route.path_prefix, route.strip_prefix, route.base_path)
        forward = f"{path}?{target.query}" if target.has_query else path
    routed = Routed(plan.routes[route.name], target.path, forward.encode())
    if len(cache) >= _ROUTED_CACHE_SIZE:
        cache.clear()  # bounded; a client varying its targets only empties it
    cache[key] = routed
    return routed


def misdirected(plan: Plan, server_name: str, host: bytes | None) -> bool:
    """With TLS, a request whose Host selects other `hosts` routes than the connection's
    server name (SNI) did is answered 421: the client must open a connection for that name.
    Names that select the same routes (or none with `hosts`) may share a connection."""
    name = host_name(host)
    if name is None or name == server_name:
        return False  # an invalid Host gets its 400 from routing
    return _host_set(plan, name) != _host_set(plan, server_name)


def _host_set(plan: Plan, name: str) -> tuple[bool, ...]:
    found = plan.host_sets.get(name)
    if found is None:
        found = tuple(host_matches(hosts, name) for hosts in plan.host_routes)
        if len(plan.host_sets) >= _ROUTED_CACHE_SIZE:
            plan.host_sets.clear()
        plan.host_sets[name] = found
    return found


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
