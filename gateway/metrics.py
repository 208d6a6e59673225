"""Every metric the gateway exports, defined in one place.

Label values are bounded: route names come from the config, methods from a fixed set,
statuses are integers, outcomes are enums. No token, subject or path is ever a label.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.decision import DENIAL_REASONS

disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created` series only add bulk (and break summing workers up)

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
NO_ROUTE = "(none)"

# Label values known in advance: their series exist (at 0) from the start, so a query such
# as `rate(gateway_authlete_budget_rejected_total[5m])` reads 0, not nothing, before the
# first event (observability/queries.yaml relies on it).
INTROSPECTION_OUTCOMES = (
    "ok", "unauthorized", "forbidden", "bad_request", "internal_server_error",
    "error", "timeout", "throttled", "rejected", "invalid_response",
)  # fmt: skip
BUDGET_REJECTED_REASONS = ("wait_timeout", "breaker_open", "client_quota")
CACHE_RESULTS = ("hit", "negative_hit", "shared_hit", "shared_negative_hit", "miss", "stale")
CACHE_REFRESH_RESULTS = ("active", "inactive", "failed")
RELOAD_RESULTS = ("success", "error")
UPSTREAM_ERROR_KINDS = ("refused", "reset", "timeout", "protocol")  # per route with an upstream

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


_SHARED_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class Counter(Collector):
    """A counter for the request path: no lock (one event loop per process owns it), and
    children cached by label values, so an increment is a dict lookup and an addition."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
        registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self._name = name
        self._doc = documentation
        self._labelnames = list(labelnames)
        self._children: dict[tuple[str, ...], _CounterChild] = {}
        if not labelnames:
            self._children[()] = _CounterChild()
        registry.register(self)

    def labels(self, *values: str) -> _CounterChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _CounterChild()
        return child

    def inc(self, amount: float = 1.0) -> None:
        self._children[()].value += amount

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in self._children.items():
            family.add_metric(list(values), child.value)
        return [family]


class Histogram(Collector):
    """A histogram for the request path, on the same terms as Counter."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
        buckets: Sequence[float], registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self._name = name
        self._doc = documentation
        self._labelnames = list(labelnames)
        self._bounds = tuple(float(b) for b in buckets)
        self._children: dict[tuple[str, ...], _HistogramChild] = {}
        if not labelnames:
            self._children[()] = _HistogramChild(self._bounds)
        registry.register(self)

    def labels(self, *values: str) -> _HistogramChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _HistogramChild(self._bounds)
        return child

    def observe(self, value: float) -> None:
        self._children[()].observe(value)

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in self._children.items():
            running = 0
            buckets = []
            for bound, count in zip(self._bounds, child.counts, strict=False):
                running += count
                buckets.append((repr(bound), float(running)))
            running += child.counts[-1]
            buckets.append(("+Inf", float(running)))
            family.add_metric(list(values), buckets, child.sum)
        return [family]


def add_runtime_collectors(registry: CollectorRegistry) -> None:
    """prometheus_client's standard collectors for this process: `process_*` (CPU seconds,
    resident and virtual memory, open and maximum file descriptors, start time; read from
    /proc, so Linux only: elsewhere they export nothing), `python_gc_*` (collections and
    objects collected per generation) and `python_info` (the interpreter's version)."""
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Every gateway metric, in `registry` or in a registry of its own, which also gets
        the process, GC and platform collectors (`add_runtime_collectors`); a registry given
        by the caller gets only the gateway's metrics."""
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            add_runtime_collectors(registry)
        self.registry = registry
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.denials = Counter(
            "gateway_denials",
            "Requests (and decisions) refused for their token, by route and reason: "
            "missing_token, malformed_token, invalid_token, insufficient_scope, forbidden, "
            "bad_request, authlete_error, unavailable, untrusted_peer.",
            ["route", "reason"],
            registry=r,
        )
        self.decisions = Counter(
            "gateway_decisions",
            "Decision requests answered (an ingress asking whether a request may pass), by the "
            "route and method of the request asked about and the status of the answer.",
            ["route", "method", "status"],
            registry=r,
        )
        self.decision_duration = Histogram(
            "gateway_decision_duration_seconds",
            "Decision requests, from arrival until the answer (introspection included).",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Whole request as the client sees it, until the response is complete.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "The gateway's own share of a forwarded request: from its arrival until the "
            "upstream is called (routing, token check, cache, introspection).",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            "gateway_upstream_requests",
            "Responses received from upstreams, by route and upstream status.",
            ["route", "status"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds",
            "Upstream exchange, from the call until the response body was relayed.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream failures by kind (refused, reset, timeout, protocol).",
            ["route", "kind"],
            registry=r,
        )
        self.introspections = Counter(
            "gateway_introspection_requests",
            "Calls to Authlete's introspection API by outcome.",
            ["outcome"],
            registry=r,
        )
        self.introspection_duration = Histogram(
            "gateway_introspection_duration_seconds",
            "Latency of calls to Authlete's introspection API.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_requests = Counter(
            "gateway_cache_requests",
            "Verdict lookups by the level that answered: hit, negative_hit (this process), "
            "shared_hit, shared_negative_hit (Redis, with shared state), miss (an "
            "introspection was needed), stale.",
            ["result"],
            registry=r,
        )
        self.coalesced = Counter(
            "gateway_introspection_coalesced",
            "Cache misses that joined an introspection call already in flight for their token.",
            registry=r,
        )
        self.budget_tokens = Gauge(
            "gateway_authlete_budget_tokens",
            "Calls the Authlete token bucket would allow right now.",
            registry=r,
        )
        self.budget_wait = Histogram(
            "gateway_authlete_budget_wait_seconds",
            "Time cache misses waited for Authlete call budget (only those that waited).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.budget_rejected = Counter(
            "gateway_authlete_budget_rejected",
            "Cache misses answered 503 without a call: wait_timeout (no budget within "
            "max_wait), breaker_open, or client_quota (the client's misses were over "
            "authlete.rate_limit.per_client).",
            ["reason"],
            registry=r,
        )
        self.cache_refreshes = Counter(
            "gateway_cache_refreshes",
            "Active verdicts re-checked ahead of expiry (cache.refresh_ahead), by result: "
            "active (entry renewed), inactive (revoked: dropped at once), failed.",
            ["result"],
            registry=r,
        )
        self.authlete_throttled = Counter(
            "gateway_authlete_throttled", "HTTP 429 answers received from Authlete.", registry=r
        )
        self.authlete_retries = Counter(
            "gateway_authlete_retries",
            "Authlete calls retried after a connection error, timeout or 5xx.",
            registry=r,
        )
        self.breaker_state = Gauge(
            "gateway_authlete_breaker_state",
            "Circuit breaker for Authlete calls: 0 closed, 1 open, 2 half-open.",
            registry=r,
        )
        self.connections_refused = Counter(
            "gateway_connections_refused",
            "New client connections refused (503): limits.max_connections or "
            "limits.max_connections_per_client open, or limits.max_buffered_bytes held.",
            registry=r,
        )
        self.connections_shed = Counter(
            "gateway_connections_shed",
            "Client connections with an unfinished request head closed (503), oldest first, "
            "because limits.max_buffered_bytes were held.",
            registry=r,
        )
        self.header_timeouts = Counter(
            "gateway_header_timeouts",
            "Client connections closed (408) for not sending request headers within "
            "limits.header_timeout.",
            registry=r,
        )
        self.open_connections = Gauge(
            "gateway_open_connections", "Client connections open on the proxy listener.", registry=r
        )
        self.websockets_open = Gauge(
            "gateway_websockets_open",
            "WebSockets open through the gateway (after the upstream's 101), by route.",
            ["route"],
            registry=r,
        )
        self.websocket_duration = Histogram(
            "gateway_websocket_duration_seconds",
            "How long WebSockets stayed open, from the 101 until both sides were closed.",
            ["route"],
            buckets=(1, 10, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
            registry=r,
        )
        self.reloads = Counter(
            "gateway_config_reloads",
            "Config reloads (SIGHUP) by result: success, error (the old config stays).",
            ["result"],
            registry=r,
        )
        self.shared_roundtrip = Histogram(
            "gateway_shared_roundtrip_seconds",
            "Round trips to the shared state (Redis), by operation.",
            ["op"],
            buckets=_SHARED_BUCKETS,
            registry=r,
        )
        self.shared_errors = Counter(
            "gateway_shared_errors",
            "Failed shared-state operations by kind: timeout (past shared.timeout), "
            "connection, full (Redis out of memory), response (an error reply), other.",
            ["kind"],
            registry=r,
        )
        self.shared_mode = Gauge(
            "gateway_shared_mode",
            "1 on the mode the shared state is in: shared (Redis in use) or fallback (local "
            "cache and shared.fallback_rate while Redis is unusable). Absent without shared.",
            ["mode"],
            registry=r,
        )
        self.shared_lock_waits = Counter(
            "gateway_shared_lock_waits",
            "Misses that waited for another replica's introspection of the same token.",
            registry=r,
        )
        self.shared_lock_takeovers = Counter(
            "gateway_shared_lock_takeovers",
            "Token locks taken over after their holder stopped renewing them (died or hung).",
            registry=r,
        )
        self.shared_hmac_failures = Counter(
            "gateway_shared_hmac_failures",
            "Verdicts read from Redis whose HMAC did not match (treated as a miss).",
            registry=r,
        )
        self.purges = Counter(
            "gateway_cache_purges",
            "Purges carried out by this process (POST /cache/purge on its admin listener), by kind "
            "(token, token_sha256, subject, client_id).",
            ["kind"],
            registry=r,
        )
        build = Gauge("gateway_build_info", "Build information.", ["version"], registry=r)
        build.labels(__version__).set(1)
        self.ready = Gauge(
            "gateway_ready",
            "1 while /readyz answers 200 (serving, the Authlete breaker not open, the "
            "gateway's access token not rejected), else 0.",
            registry=r,
        )
        for counter, values in (
            (self.introspections, INTROSPECTION_OUTCOMES),
            (self.budget_rejected, BUDGET_REJECTED_REASONS),
            (self.cache_requests, CACHE_RESULTS),
            (self.cache_refreshes, CACHE_REFRESH_RESULTS),
            (self.reloads, RELOAD_RESULTS),
        ):
            for value in values:
                counter.labels(value)
        self._request_children: dict[tuple[str, str, int], _CounterChild] = {}
        self._upstream_children: dict[tuple[str, int], _CounterChild] = {}
        self._decision_children: dict[tuple[str, str, int], _CounterChild] = {}

    def count_request(self, route: str, method: str, status: int) -> None:
        if method not in KNOWN_METHODS:
            method = "OTHER"  # keeps both the label set and this dict bounded
        key = (route, method, status)
        child = self._request_children.get(key)
        if child is None:
            child = self.requests.labels(route, method, str(status))
            self._request_children[key] = child
        child.inc()

    def count_decision(self, route: str, method: str, status: int) -> None:
        if method not in KNOWN_METHODS:
            method = "OTHER"
        key = (route, method, status)
        child = self._decision_children.get(key)
        if child is None:
            child = self.decisions.labels(route, method, str(status))
            self._decision_children[key] = child
        child.inc()

    def count_upstream(self, route: str, status: int) -> None:
        key = (route, status)
        child = self._upstream_children.get(key)
        if child is None:
            child = self.upstream_requests.labels(route, str(status))
            self._upstream_children[key] = child
        child.inc()

    def route_denials(self, route: str) -> dict[str, _CounterChild]:
        """The route's token-denial counters, one per reason, at 0 until a denial."""
        return {reason: self.denials.labels(route, reason) for reason in DENIAL_REASONS}

    def route_upstream_errors(self, route: str) -> dict[str, _CounterChild]:
        """The route's upstream error counters, one per kind, at 0 until a failure."""
        return {kind: self.upstream_errors.labels(route, kind) for kind in UPSTREAM_ERROR_KINDS}

    def watch_cache(self, entries: Callable[[], int], evictions: Callable[[], int]) -> None:
        self.registry.register(_CacheCollector(entries, evictions))

    def watch_endpoints(self, endpoints: Callable[[], Iterable[EndpointCounts]]) -> None:
        self.registry.register(_EndpointCollector(endpoints))


# One configured upstream endpoint: (origin, requests, failures by kind, ejections).
EndpointCounts = tuple[str, int, dict[str, int], int]


class _EndpointCollector(Collector):
    """Per configured upstream endpoint (its origin: bounded by the config, never a
    resolved address): requests sent, failures by kind, ejections."""

    def __init__(self, endpoints: Callable[[], Iterable[EndpointCounts]]) -> None:
        self._endpoints = endpoints

    def collect(self) -> Iterator[CounterMetricFamily]:
        requests = CounterMetricFamily(
            "gateway_upstream_endpoint_requests",
            "Requests sent to an upstream endpoint (retries included).",
            labels=["upstream"],
        )
        failures = CounterMetricFamily(
            "gateway_upstream_endpoint_failures",
            "Connections to an upstream endpoint that failed: refused or timeout (connecting),"
            " reset (closed before a complete answer).",
            labels=["upstream", "kind"],
        )
        ejections = CounterMetricFamily(
            "gateway_upstream_endpoint_ejections",
            "Times an upstream endpoint (one of its addresses) was taken out after connect"
            " failures in a row.",
            labels=["upstream"],
        )
        for origin, sent, failed, ejected in self._endpoints():
            requests.add_metric([origin], sent)
            for kind in ("refused", "timeout", "reset"):
                failures.add_metric([origin, kind], failed.get(kind, 0))
            ejections.add_metric([origin], ejected)
        yield requests
        yield failures
        yield ejections


class _CacheCollector(Collector):
    def __init__(self, entries: Callable[[], int], evictions: Callable[[], int]) -> None:
        self._entries = entries
        self._evictions = evictions

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily(
            "gateway_cache_entries", "Verdicts held in the cache.", value=self._entries()
        )
        yield CounterMetricFamily(
            "gateway_cache_evictions",
            "Verdicts evicted before expiry because the cache was full.",
            value=self._evictions(),
        )
