"""OpenTelemetry spans (`tracing.opentelemetry: true`; the `otel` extra). Imported only when
that is on: the core install neither needs nor loads the SDK.

One SERVER span per request (`GET orders`: method and route name), parented on the
incoming `traceparent`; a CLIENT span for each Authlete introspection call made for it and
one for its upstream call. Attributes follow the HTTP semantic conventions; no token, no
`Authorization` value and no query string is ever put on a span. The exporters are the
SDK's, built without arguments, so the standard OTEL_* variables configure them (endpoint,
headers, timeout, compression, certificates), as they do the sampler (OTEL_TRACES_SAMPLER,
default parent-based always-on), the resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES)
and the batching (OTEL_BSP_*).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from gateway import __version__
from gateway.routing import host_name
from gateway.tracing import EXPORTER_GROUP, TraceParent

if TYPE_CHECKING:
    from gateway.server import Exchange

__all__ = ["OpenTelemetry", "Span"]

SERVICE_NAME = "authlete-gateway"  # unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES say
_KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"}
)
_INTROSPECTION_TEMPLATE = "/api/{serviceId}/auth/introspection"


def _since_ns(perf_started: float) -> int:
    """The wall-clock time (ns) of a `time.perf_counter()` reading."""
    return time.time_ns() - int((time.perf_counter() - perf_started) * 1e9)


def _method(name: str) -> tuple[str, str | None]:
    """http.request.method and, for a method outside the known set, the original."""
    return (name, None) if name in _KNOWN_METHODS else ("_OTHER", name)


def _host_port(value: bytes | None, default_port: int) -> tuple[str | None, int]:
    """server.address (an IPv6 address without brackets) and server.port from a Host (or
    X-Forwarded-Host) value."""
    if not value:
        return None, default_port
    first = value.partition(b",")[0].strip()
    name = host_name(first)
    if not name:
        return None, default_port
    if first.startswith(b"["):
        port = first.partition(b"]")[2].removeprefix(b":")
    else:
        port = first.partition(b":")[2]
    return name.strip("[]"), int(port) if port.isdigit() else default_port


class OpenTelemetry:
    """The process's tracer provider and the spans the request path makes."""

    def __init__(self, exporters: Sequence[str], span_exporter: SpanExporter | None = None) -> None:
        """`exporters`: entry point names (tracing.exporter_names), each exported in batches;
        `span_exporter`: instead of them, one exporter fed span by span (the tests' in-memory
        one)."""
        resource = Resource.create({"service.version": __version__})
        name = resource.attributes.get("service.name")
        if not isinstance(name, str) or name.startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        if span_exporter is not None:
            self.provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        else:
            for entry in exporters:
                (point,) = entry_points(group=EXPORTER_GROUP, name=entry)
                self.provider.add_span_processor(BatchSpanProcessor(point.load()()))
        self.tracer = self.provider.get_tracer("gateway", __version__)

    async def shutdown(self) -> None:
        """Export what is queued (bounded by the exporters' own timeouts), off the loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.provider.shutdown)

    # ------------------------------------------------------------------ the request's span
    def server_span(self, ex: Exchange, parent: TraceParent | None, tracestate: list[str]) -> Span:
        context: Context
        if parent is not None:
            remote = SpanContext(
                int(parent.trace_id, 16),
                int(parent.parent_id, 16),
                is_remote=True,
                trace_flags=TraceFlags(parent.flags & 0xFF),
                trace_state=TraceState.from_header(tracestate) if tracestate else None,
            )
            context = set_span_in_context(NonRecordingSpan(remote))
        else:
            context = Context()  # a new trace: never whatever context happens to be current
        method, original = _method(ex.method.decode("latin-1"))
        conn = ex.conn
        listener = conn.listener
        inbound = ex.inbound
        proto = inbound.forwarded_proto  # a trusted proxy's only; its first entry
        scheme = (proto or listener.scheme).partition(b",")[0].strip().decode("latin-1").lower()
        if scheme not in ("http", "https"):
            scheme = listener.scheme.decode()
        address, port = _host_port(
            inbound.forwarded_host or inbound.host, 443 if scheme == "https" else 80
        )
        attributes: dict[str, str | int | bool] = {
            "http.request.method": method,
            "url.scheme": scheme,
            "network.protocol.name": "http",
            "network.protocol.version": "1.1" if ex.http11 else "1.0",
            "network.peer.address": conn.peer,
            "client.address": (
                ex.plan.header_policy.client_of(inbound, conn.peer, True)
                if conn.trusted
                else conn.peer
            ),
            "gateway.request_id": ex.request_id,
        }
        if original is not None:
            attributes["http.request.method_original"] = original
        if address is not None:
            attributes["server.address"] = address
            attributes["server.port"] = port
        if ex.decision:
            attributes["gateway.decision"] = True
        return self.tracer.start_span(
            "HTTP" if original is not None else method,
            context,
            SpanKind.SERVER,
            attributes,
            start_time=_since_ns(ex.started),
        )

    def end_server(self, span: Span, ex: Exchange) -> None:
        if span.is_recording():
            route = ex.route
            status = ex.status
            attributes: dict[str, str | int] = {"http.response.status_code": status}
            if route is not None:
                attributes["http.route"] = route.name
                method, original = _method(ex.method.decode("latin-1"))
                span.update_name(f"{'HTTP' if original is not None else method} {route.name}")
            if ex.decision:
                decision_path = ex.plan.decision_path
                if decision_path is not None:
                    attributes["url.path"] = decision_path.decode()
            elif ex.path is not None:
                attributes["url.path"] = ex.path
            if ex.cache is not None:
                attributes["gateway.cache"] = ex.cache
            if status >= 500:
                attributes["error.type"] = str(status)
                span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attributes)
        span.end()

    # ------------------------------------------------------------------ the upstream call
    def upstream_span(self, parent: Span, ex: Exchange) -> Span:
        route = ex.route
        assert route is not None and route.pool is not None
        upstream = route.pool.upstream
        method, original = _method(ex.method.decode("latin-1"))
        path = ex.target.partition(b"?")[0].decode("latin-1")  # never the query
        host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "server.address": upstream.host,
            "server.port": upstream.port,
            "url.full": f"{upstream.scheme}://{host}:{upstream.port}{path}",
            "network.protocol.version": "1.1",
            "gateway.route": route.name,
        }
        if original is not None:
            attributes["http.request.method_original"] = original
        return self.tracer.start_span(
            "HTTP" if original is not None else method,
            set_span_in_context(parent),
            SpanKind.CLIENT,
            attributes,
            start_time=_since_ns(ex.upstream_started),
        )

    def end_upstream(self, span: Span, ex: Exchange, error: str | None) -> None:
        seconds = ex.upstream_seconds
        end = None
        if span.is_recording():
            if error is not None:
                span.set_attribute("error.type", error)
                span.set_status(Status(StatusCode.ERROR))
            elif seconds is not None and ex.response_started:
                span.set_attribute("http.response.status_code", ex.status)
                if ex.status >= 400:
                    span.set_attribute("error.type", str(ex.status))
                    span.set_status(Status(StatusCode.ERROR))
            else:
                span.set_attribute("error.type", "cancelled")  # the client went away first
                span.set_status(Status(StatusCode.ERROR))
            if seconds is not None:
                end = _since_ns(ex.upstream_started + seconds)
        span.end(end)

    # ------------------------------------------------------------------ the Authlete call
    def introspection_span(self, parent: Span, url: str) -> Span:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        attributes: dict[str, str | int] = {
            "http.request.method": "POST",
            "server.address": parts.hostname or "",
            "server.port": port,
            "url.full": url,
            "url.template": _INTROSPECTION_TEMPLATE,
            "network.protocol.version": "1.1",
        }
        return self.tracer.start_span(
            f"POST {_INTROSPECTION_TEMPLATE}",
            set_span_in_context(parent),
            SpanKind.CLIENT,
            attributes,
        )

    @staticmethod
    def end_introspection(span: Span, status: int | None, error: str | None) -> None:
        if span.is_recording():
            if status is not None:
                span.set_attribute("http.response.status_code", status)
                if status >= 400:
                    error = error or str(status)
            if error is not None:
                span.set_attribute("error.type", error)
                span.set_status(Status(StatusCode.ERROR))
        span.end()

    # ------------------------------------------------------------------ trace context
    @staticmethod
    def trace_id(span: Span) -> str | None:
        context = span.get_span_context()
        return f"{context.trace_id:032x}" if context.is_valid else None

    @staticmethod
    def traceparent(span: Span) -> bytes | None:
        """The `traceparent` naming `span` as the parent of what the upstream does."""
        context = span.get_span_context()
        if not context.is_valid:
            return None
        return (
            f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}".encode()
        )
