"""W3C trace context on the request path (`tracing:`), and the seam to OpenTelemetry.

Without a `tracing:` section nothing here runs per request: a client's `traceparent` and
`tracestate` go upstream like any end-to-end header, and the access line's `trace_id` is read
from the `traceparent` when the line is written (`trace_id_of`).

`tracing.generate: true`: a forwarded request without one valid `traceparent` starts a trace:
a fresh `traceparent` (version 00, random trace id and parent id, sampled) goes upstream in
place of whatever came (an invalid one, or several), and any `tracestate` is dropped with it
(it belongs to no trace the gateway knows).

`tracing.opentelemetry: true` (the `otel` extra, `gateway.otel`): a SERVER span per request,
parented on the incoming `traceparent`, with CLIENT spans for the Authlete call and the
upstream call; the `traceparent` sent upstream names the upstream call's span as parent.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Coroutine, Mapping
from contextvars import ContextVar, copy_context
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from gateway.otel import OpenTelemetry, Span
    from gateway.proxy import Inbound
    from gateway.server import Exchange

# version, trace id, parent id, flags, and what a later version may add; optional whitespace
# around the value is allowed (RFC 9110 field values)
_FORM = re.compile(
    rb"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\r\n]*)?[ \t]*"
)
_ZERO_TRACE = b"0" * 32
_ZERO_PARENT = b"0" * 16
_TRACEPARENT = b"traceparent"
_TRACESTATE = b"tracestate"
_SEP = b": "
_CRLF = b"\r\n"

EXPORTER_GROUP = "opentelemetry_traces_exporter"  # the SDK's entry points for exporters
_OTLP = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}


class TraceParent(NamedTuple):
    trace_id: str  # 32 lowercase hex digits, not all zero
    parent_id: str  # 16 lowercase hex digits, not all zero
    flags: int


def _valid(values: list[bytes] | None) -> re.Match[bytes] | None:
    """The request's one `traceparent` when it is valid (W3C Trace Context: lower-case hex;
    version 00 exactly 55 characters, a later version at least that with `-` after the four
    fields read here, never version ff; trace id and parent id not all zero); else None:
    none, several, or invalid."""
    if values is None or len(values) != 1:
        return None
    match = _FORM.fullmatch(values[0])
    if match is None:
        return None
    version, trace, parent, _, more = match.groups()
    if (more is not None and version == b"00") or version == b"ff":
        return None
    if trace == _ZERO_TRACE or parent == _ZERO_PARENT:
        return None
    return match


def parse_traceparent(values: list[bytes] | None) -> TraceParent | None:
    """The request's valid `traceparent` (see `_valid`), read."""
    match = _valid(values)
    if match is None:
        return None
    return TraceParent(match[2].decode(), match[3].decode(), int(match[4], 16))


def trace_id_of(values: list[bytes] | None) -> str | None:
    """The trace id of the request's valid `traceparent`, else None (for the access line)."""
    match = _valid(values)
    return match[2].decode() if match is not None else None


def new_ids() -> tuple[str, str]:
    """A random trace id (16 bytes) and parent id (8 bytes), as lower-case hex."""
    while True:
        digits = os.urandom(24).hex()
        trace, parent = digits[:32], digits[32:]
        if trace != "0" * 32 and parent != "0" * 16:  # all zero is invalid (2^-64 odds)
            return trace, parent


def set_traceparent(kept: list[bytes], value: bytes, keep_state: bool) -> None:
    """In the forwarded header fields (4 parts each): `value` replaces the `traceparent`
    (in place when there is exactly one and `keep_state`, else every one is removed and one
    appended); without `keep_state` every `tracestate` goes too."""
    if keep_state:
        for i in range(0, len(kept), 4):
            if kept[i].lower() == _TRACEPARENT:
                kept[i + 2] = value
                return
    out: list[bytes] = []
    for i in range(0, len(kept), 4):
        name = kept[i].lower()
        if name == _TRACEPARENT or (name == _TRACESTATE and not keep_state):
            continue
        out += kept[i : i + 4]
    out += (_TRACEPARENT, _SEP, value, _CRLF)
    kept[:] = out


def tracestate_of(kept: list[bytes]) -> list[str]:
    """The `tracestate` field values among the forwarded header fields, in order."""
    return [
        kept[i + 2].decode("latin-1")
        for i in range(0, len(kept), 4)
        if kept[i].lower() == _TRACESTATE
    ]


# The request whose task is running (a cache miss, with OpenTelemetry): the Authlete call
# made on its behalf becomes a child of its span. Set only in that task's own context.
CURRENT: ContextVar[RequestTrace | None] = ContextVar("gateway_request_trace", default=None)


class RequestTrace:
    """One request's part in a trace: its trace id (the access line's `trace_id`) and, with
    OpenTelemetry, its spans."""

    __slots__ = ("otel", "span", "trace_id", "upstream_error", "upstream_span")

    def __init__(
        self, trace_id: str | None, otel: OpenTelemetry | None = None, span: Span | None = None
    ) -> None:
        self.trace_id = trace_id
        self.otel = otel
        self.span = span  # the SERVER span
        self.upstream_span: Span | None = None
        self.upstream_error: str | None = None

    def task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `coro` (a request's wait for its verdict) as a task in which this request is
        CURRENT, so that an Authlete call started from it is traced as its child."""
        loop = asyncio.get_running_loop()
        if self.span is None:
            return loop.create_task(coro)
        context = copy_context()
        context.run(CURRENT.set, self)
        return loop.create_task(coro, context=context)

    def upstream(self, ex: Exchange) -> None:
        """The upstream request is about to be built: with OpenTelemetry, its CLIENT span
        starts and the `traceparent` sent names it as parent."""
        otel = self.otel
        if otel is None or self.span is None:
            return
        span = self.upstream_span = otel.upstream_span(self.span, ex)
        value = otel.traceparent(span)
        if value is not None:  # (none when the SDK hands out invalid spans: it is disabled)
            inbound = ex.inbound
            set_traceparent(inbound.kept, value, _valid(inbound.traceparent) is not None)

    def upstream_failed(self, kind: str) -> None:
        self.upstream_error = kind

    def end(self, ex: Exchange) -> None:
        """The exchange is accounted for: its spans end."""
        otel = self.otel
        if otel is None or self.span is None:
            return
        if self.upstream_span is not None:
            otel.end_upstream(self.upstream_span, ex, self.upstream_error)
            self.upstream_span = None
        otel.end_server(self.span, ex)
        self.span = None


class Tracing:
    """What a listener does about trace context; the listener has None when `tracing:`
    asks for nothing, and then no request pays for any of this."""

    __slots__ = ("generate", "otel")

    def __init__(self, generate: bool, otel: OpenTelemetry | None) -> None:
        self.generate = generate
        self.otel = otel

    def begin(self, ex: Exchange, forwarding: bool) -> RequestTrace:
        """A request starts (its request id is known). `forwarding`: it may go upstream (a
        decision request never does: nothing is generated for it)."""
        inbound: Inbound = ex.inbound
        otel = self.otel
        if otel is not None:
            parent = parse_traceparent(inbound.traceparent)
            state = tracestate_of(inbound.kept) if parent is not None else []
            span = otel.server_span(ex, parent, state)
            return RequestTrace(otel.trace_id(span), otel, span)
        trace = trace_id_of(inbound.traceparent)
        if trace is not None or not (forwarding and self.generate):
            return RequestTrace(trace)
        # A new trace: version 00, the sampled flag (the upstream is asked to record it).
        trace, parent_id = new_ids()
        set_traceparent(inbound.kept, f"00-{trace}-{parent_id}-01".encode(), False)
        return RequestTrace(trace)


def current_span() -> tuple[OpenTelemetry, Span] | None:
    """The OpenTelemetry span of the request whose task is running, if any."""
    trace = CURRENT.get()
    if trace is None or trace.otel is None or trace.span is None:
        return None
    return trace.otel, trace.span


# --------------------------------------------------------------------------- configuration


def sdk_installed() -> bool:
    from importlib.util import find_spec

    try:
        return find_spec("opentelemetry.sdk.trace") is not None
    except ImportError:  # not even the parent package
        return False


def exporter_names(env: Mapping[str, str]) -> tuple[str, ...]:
    """The span exporters the standard variables ask for, as the SDK's entry point names:
    OTEL_TRACES_EXPORTER (default `otlp`; `none`: no exporter; comma-separated), `otlp`
    resolved by OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or OTEL_EXPORTER_OTLP_PROTOCOL
    (`http/protobuf`, the default, or `grpc`). Raises ValueError with a one-line reason."""
    from importlib.metadata import entry_points

    names = [n.strip().lower() for n in (env.get("OTEL_TRACES_EXPORTER") or "otlp").split(",")]
    names = [n for n in names if n]
    if not names or names == ["none"]:
        return ()
    out: list[str] = []
    for name in names:
        if name == "none":
            raise ValueError('OTEL_TRACES_EXPORTER: "none" cannot be combined with exporters')
        if name == "otlp":
            variable = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
            protocol = env.get(variable, "").strip()
            if not protocol:
                variable = "OTEL_EXPORTER_OTLP_PROTOCOL"
                protocol = env.get(variable, "").strip() or "http/protobuf"
            if protocol not in _OTLP:
                raise ValueError(f"{variable}: must be http/protobuf or grpc, not {protocol!r}")
            name = _OTLP[protocol]
        if not entry_points(group=EXPORTER_GROUP, name=name):
            raise ValueError(
                f"OTEL_TRACES_EXPORTER: no span exporter {name!r} is installed "
                "(pip install 'authlete-gateway[otel]' brings otlp and console)"
            )
        if name not in out:
            out.append(name)
    return tuple(out)
