"""W3C trace context (`traceparent`/`tracestate` passed on; `tracing.generate`), the access
line's `trace_id`, and OpenTelemetry spans (`tracing.opentelemetry`) read back from the SDK's
in-memory exporter: the span tree, its attributes, its links to the incoming trace, and no
token anywhere in it."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway import tracing
from gateway.app import Gateway
from gateway.config import ConfigError, parse_config
from gateway.emulator import Emulator
from gateway.tracing import new_ids, parse_traceparent, set_traceparent, trace_id_of
from tests.conftest import (
    SERVICE_TOKEN,
    Running,
    StartGateway,
    bearer,
    echo_of,
    eventually,
    free_port,
    header_values,
    make_config,
    raw_config,
    start_app,
)

try:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    HAVE_OTEL = True
except ImportError:  # pragma: no cover - the `test` extra installs it
    if os.environ.get("CI"):
        raise  # CI installs `.[test]`, which has the SDK: a missing one is a failure there
    HAVE_OTEL = False

needs_otel = pytest.mark.skipif(not HAVE_OTEL, reason="the OpenTelemetry SDK is not installed")

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
_GENERATED = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01")


def _routes(upstream: str) -> list[dict[str, Any]]:
    return [
        {"name": "public", "path_prefix": "/public", "upstream": upstream, "auth": "none"},
        {"name": "orders", "path_prefix": "/orders", "upstream": upstream, "scopes": ["r"]},
    ]


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def _access_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    await asyncio.sleep(0.3)  # access lines are written at most 100 ms apart
    return _lines(capsys.readouterr().out)


# --------------------------------------------------------------------------- the header's rules


def test_traceparent_parsing_follows_the_w3c_rules() -> None:
    assert parse_traceparent([TRACEPARENT.encode()]) == (TRACE, PARENT, 1)
    assert parse_traceparent([f" {TRACEPARENT}\t".encode()]) == (TRACE, PARENT, 1)
    assert parse_traceparent([f"00-{TRACE}-{PARENT}-00".encode()]) == (TRACE, PARENT, 0)
    # A later version may carry more, after a dash; version 00 may not.
    assert parse_traceparent([f"01-{TRACE}-{PARENT}-01-what-comes".encode()]) is not None
    assert parse_traceparent([f"01-{TRACE}-{PARENT}-01".encode()]) is not None
    invalid = [
        f"00-{TRACE}-{PARENT}-01-more",  # version 00 is exactly 55 characters
        f"01-{TRACE}-{PARENT}-01x",  # more, without the dash
        f"ff-{TRACE}-{PARENT}-01",  # version ff is forbidden
        f"00-{TRACE.upper()}-{PARENT}-01",  # lower-case hex only
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE}-{PARENT}-0g",
        f"0-{TRACE}-{PARENT}-01",
        f"00_{TRACE}_{PARENT}_01",
        f"00-{TRACE[:-1]}-{PARENT}-01",
        "",
    ]
    for value in invalid:
        assert parse_traceparent([value.encode()]) is None, value
    assert parse_traceparent(None) is None
    # Two traceparent fields: no single trace to belong to.
    assert parse_traceparent([TRACEPARENT.encode(), TRACEPARENT.encode()]) is None
    assert trace_id_of([TRACEPARENT.encode()]) == TRACE


def test_generated_ids_are_random_and_valid() -> None:
    seen = set()
    for _ in range(100):
        trace, parent = new_ids()
        assert parse_traceparent([f"00-{trace}-{parent}-01".encode()]) is not None
        seen.add(trace)
    assert len(seen) == 100


def test_setting_a_traceparent_keeps_the_other_fields() -> None:
    kept = [b"Accept", b": ", b"*/*", b"\r\n", b"TraceParent", b": ", b"bad", b"\r\n"]
    kept += [b"tracestate", b": ", b"a=1", b"\r\n", b"X-A", b": ", b"1", b"\r\n"]
    fresh = b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"
    replaced = list(kept)
    set_traceparent(replaced, fresh, keep_state=False)
    assert b"".join(replaced) == (b"Accept: */*\r\nX-A: 1\r\ntraceparent: " + fresh + b"\r\n")
    in_place = list(kept)
    set_traceparent(in_place, fresh, keep_state=True)
    assert b"".join(in_place) == (
        b"Accept: */*\r\nTraceParent: " + fresh + b"\r\ntracestate: a=1\r\nX-A: 1\r\n"
    )


# --------------------------------------------------------------------------- without tracing


async def test_trace_context_passes_unchanged_without_tracing(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No `tracing:` section: from an untrusted peer too, both fields go upstream as sent
    (an invalid traceparent as well: the gateway takes no part), and the access line carries
    the valid one's trace id."""
    emulator.add_token("tok-trace", subject="alice", scopes=["r"])
    gw = await start_gateway(_routes(upstream))  # trusted_proxies is empty: an untrusted peer
    context = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    async with client.get(f"{gw.url}/orders/1", headers={**bearer("tok-trace"), **context}) as resp:
        echo = await echo_of(resp)
    assert header_values(echo, "traceparent") == [TRACEPARENT]
    assert header_values(echo, "tracestate") == [TRACESTATE]
    bad = {"traceparent": "00-nonsense", "tracestate": TRACESTATE}
    async with client.get(f"{gw.url}/public/x", headers=bad) as resp:
        echo = await echo_of(resp)
    assert header_values(echo, "traceparent") == ["00-nonsense"]
    assert header_values(echo, "tracestate") == [TRACESTATE]
    async with client.get(f"{gw.url}/public/y") as resp:
        echo = await echo_of(resp)
    assert header_values(echo, "traceparent") == []
    async with client.get(f"{gw.url}/orders/2", headers=context) as resp:
        assert resp.status == 401
    lines = await _access_lines(capsys)
    assert [line["trace_id"] for line in lines] == [TRACE, None, None, TRACE]
    # The new field sits before `time`, after every field the line had before.
    assert list(lines[0])[-3:] == ["bytes_out", "trace_id", "time"]


async def test_trace_context_from_a_trusted_proxy_passes_too(
    upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(_routes(upstream), trusted_proxies=["127.0.0.1/32"])
    context = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    async with client.get(f"{gw.url}/public/x", headers=context) as resp:
        echo = await echo_of(resp)
    assert header_values(echo, "traceparent") == [TRACEPARENT]
    assert header_values(echo, "tracestate") == [TRACESTATE]


async def test_the_header_lists_can_drop_trace_context_from_untrusted_peers(
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`drop_from_untrusted: [traceparent, tracestate]`: an untrusted client cannot choose the
    trace; with `generate`, the gateway starts one instead."""
    gw = await start_gateway(
        _routes(upstream),
        headers={"drop_from_untrusted": ["traceparent", "tracestate"]},
        tracing={"generate": True},
    )
    context = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    async with client.get(f"{gw.url}/public/x", headers=context) as resp:
        echo = await echo_of(resp)
    (sent,) = header_values(echo, "traceparent")
    match = _GENERATED.fullmatch(sent)
    assert match is not None and match.group(1) != TRACE
    assert header_values(echo, "tracestate") == []
    (line,) = await _access_lines(capsys)
    assert line["trace_id"] == match.group(1)


# --------------------------------------------------------------------------- tracing.generate


async def test_generate_starts_a_trace_when_none_or_an_invalid_one_comes(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    emulator.add_token("tok-gen", scopes=["r"])
    gw = await start_gateway(_routes(upstream), tracing={"generate": True})
    sent: list[str] = []
    for headers in (
        {},  # none: a fresh one
        {"traceparent": "00-nonsense-01", "tracestate": TRACESTATE},  # replaced, state dropped
        {"tracestate": TRACESTATE},  # a tracestate without a trace belongs to nothing
    ):
        async with client.get(
            f"{gw.url}/orders/1", headers={**bearer("tok-gen"), **headers}
        ) as resp:
            echo = await echo_of(resp)
        (value,) = header_values(echo, "traceparent")
        assert _GENERATED.fullmatch(value), value
        assert header_values(echo, "tracestate") == []
        sent.append(value)
    # A valid one is kept as it is, with its tracestate.
    context = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    async with client.get(f"{gw.url}/public/x", headers=context) as resp:
        echo = await echo_of(resp)
    assert header_values(echo, "traceparent") == [TRACEPARENT]
    assert header_values(echo, "tracestate") == [TRACESTATE]
    lines = await _access_lines(capsys)
    generated = [_GENERATED.fullmatch(value).group(1) for value in sent]  # type: ignore[union-attr]
    assert len(set(generated)) == 3
    assert [line["trace_id"] for line in lines] == [*generated, TRACE]


async def test_generate_is_for_forwarded_requests_not_decisions(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A decision request goes nowhere: nothing is generated for it; the trace id of the
    traceparent an ingress passes is on its line."""
    emulator.add_token("tok-dec", scopes=["r"])
    gw = await start_gateway(
        _routes(upstream),
        decision={},
        trusted_proxies=["127.0.0.1/32"],
        tracing={"generate": True},
    )
    asked = {**bearer("tok-dec"), "X-Original-URI": "/orders/1", "X-Original-Method": "GET"}
    async with client.get(f"{gw.url}/_gateway/auth", headers=asked) as resp:
        assert resp.status == 200
        assert "traceparent" not in resp.headers
    async with client.get(
        f"{gw.url}/_gateway/auth", headers={**asked, "traceparent": TRACEPARENT}
    ) as resp:
        assert resp.status == 200
    lines = await _access_lines(capsys)
    assert [(line["mode"], line["trace_id"]) for line in lines] == [
        ("decision", None),
        ("decision", TRACE),
    ]


async def test_reload_turns_generate_on_and_off(
    emulator: Emulator,
    upstream: str,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    raw = raw_config(emulator.base_url, _routes(upstream))
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    gw = Gateway(parse_config(path.read_text(encoding="utf-8"), env={}))
    await gw.start()
    try:
        url = f"http://127.0.0.1:{gw.proxy_port}/public/x"

        async def sent() -> list[str]:
            async with client.get(url) as resp:
                return header_values(await echo_of(resp), "traceparent")

        assert await sent() == []
        path.write_text(yaml.safe_dump({**raw, "tracing": {"generate": True}}), encoding="utf-8")
        assert gw.reload(str(path))
        assert len(await sent()) == 1
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        assert gw.reload(str(path))
        assert await sent() == []
    finally:
        await gw.stop()


# --------------------------------------------------------------------------- configuration


_ANY = [{"path_prefix": "/", "upstream": "http://127.0.0.1:9"}]


def _problems(env: dict[str, str] | None = None, **overrides: Any) -> list[str]:
    text = yaml.safe_dump(raw_config("http://127.0.0.1:1", _ANY, **overrides))
    try:
        parse_config(text, env=env or {})
    except ConfigError as exc:
        return exc.problems
    return []


def test_tracing_keys_are_validated_with_one_line_each(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "tracing.generate: must be true or false" in _problems(tracing={"generate": "yes"})
    assert "tracing.sample: unknown key" in _problems(tracing={"sample": 1})
    cfg = make_config("http://127.0.0.1:1", _ANY, tracing={"generate": "${GEN:-true}"})
    assert cfg.tracing.generate and not cfg.tracing.opentelemetry
    assert not make_config("http://127.0.0.1:1", _ANY).tracing.active
    monkeypatch.setattr(tracing, "sdk_installed", lambda: False)
    assert _problems(tracing={"opentelemetry": True}) == [
        "tracing.opentelemetry: the OpenTelemetry SDK is not installed: "
        "pip install 'authlete-gateway[otel]'"
    ]


@needs_otel
def test_the_otel_variables_choose_the_exporters() -> None:
    def exporters(env: dict[str, str]) -> tuple[str, ...]:
        cfg = parse_config(
            yaml.safe_dump(raw_config("http://127.0.0.1:1", _ANY, tracing={"opentelemetry": True})),
            env=env,
        )
        return cfg.tracing.exporters

    assert exporters({}) == ("otlp_proto_http",)  # the specification's default protocol
    assert exporters({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == ("otlp_proto_grpc",)
    assert exporters(
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        }
    ) == ("otlp_proto_http",)
    assert exporters({"OTEL_TRACES_EXPORTER": "console,otlp"}) == ("console", "otlp_proto_http")
    assert exporters({"OTEL_TRACES_EXPORTER": "none"}) == ()
    on = {"tracing": {"opentelemetry": True}}
    assert _problems({"OTEL_TRACES_EXPORTER": "zipkin-ish"}, **on) == [
        "tracing.opentelemetry: OTEL_TRACES_EXPORTER: no span exporter 'zipkin-ish' is "
        "installed (pip install 'authlete-gateway[otel]' brings otlp and console)"
    ]
    assert _problems({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, **on) == [
        "tracing.opentelemetry: OTEL_EXPORTER_OTLP_PROTOCOL: must be http/protobuf or grpc, "
        "not 'http/json'"
    ]
    disabled = parse_config(
        yaml.safe_dump(raw_config("http://127.0.0.1:1", _ANY, **on)),
        env={"OTEL_SDK_DISABLED": "true"},
    )
    assert not disabled.tracing.opentelemetry


# --------------------------------------------------------------------------- OpenTelemetry

Traced = Callable[..., Awaitable[tuple[Running, "InMemorySpanExporter"]]]


@pytest.fixture
async def traced(emulator: Emulator) -> AsyncIterator[Traced]:
    """Factory: a gateway with `tracing.opentelemetry: true` whose spans go to an in-memory
    exporter (returned with it)."""
    started: list[Gateway] = []

    async def start(routes: list[dict[str, Any]], **overrides: Any) -> tuple[Running, Any]:
        exporter = InMemorySpanExporter()
        tracing_section = {"opentelemetry": True, **overrides.pop("tracing", {})}
        cfg = make_config(emulator.base_url, routes, tracing=tracing_section, **overrides)
        gw = Gateway(cfg, span_exporter=exporter)
        started.append(gw)
        await gw.start()
        url = f"http://127.0.0.1:{gw.proxy_port}"
        return Running(gw, url, f"http://127.0.0.1:{gw.admin_port}", gw.proxy_port), exporter

    try:
        yield start
    finally:
        for gw in reversed(started):
            await gw.stop()


def _by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [span.name for span in spans]
    return named


def _no_secret_in(spans: tuple[ReadableSpan, ...], *secrets: str) -> None:
    """Nothing of any span (names, attributes, events, status, resource) holds a secret."""
    dumped = "".join(span.to_json() for span in spans)
    for secret in (*secrets, SERVICE_TOKEN, "Bearer", "uthorization"):
        assert secret not in dumped, secret


async def _spans(exporter: Any, count: int) -> tuple[ReadableSpan, ...]:
    await eventually(lambda: len(exporter.get_finished_spans()) >= count, f"{count} spans")
    spans: tuple[ReadableSpan, ...] = exporter.get_finished_spans()
    assert len(spans) == count, [span.name for span in spans]
    return spans


@needs_otel
async def test_a_span_tree_per_request_under_the_incoming_trace(
    emulator: Emulator,
    upstream: str,
    traced: Traced,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = "tok-otel-secret-0123456789"
    emulator.add_token(token, subject="alice", client_id=42, scopes=["r"])
    gw, exporter = await traced(_routes(upstream))
    context = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE, "User-Agent": "t"}
    async with client.get(
        f"{gw.url}/orders/7?secret=q", headers={**bearer(token), **context}
    ) as resp:
        echo = await echo_of(resp)
        request_id = resp.headers["X-Request-Id"]
    spans = _by_name(await _spans(exporter, 3))
    server = spans["GET orders"]
    introspection = spans["POST /api/{serviceId}/auth/introspection"]
    up = spans["GET"]
    assert server.kind is SpanKind.SERVER
    assert introspection.kind is SpanKind.CLIENT and up.kind is SpanKind.CLIENT
    # The incoming trace goes on: same trace id, the caller's span as parent.
    assert server.context is not None and server.parent is not None
    assert f"{server.context.trace_id:032x}" == TRACE
    assert f"{server.parent.span_id:016x}" == PARENT and server.parent.is_remote
    assert str(server.context.trace_state.to_header()) == TRACESTATE
    for child in (introspection, up):
        assert child.context is not None and child.parent is not None
        assert child.context.trace_id == server.context.trace_id
        assert child.parent.span_id == server.context.span_id
    # The upstream is told its parent is the gateway's upstream call; the state goes on.
    assert up.context is not None
    assert header_values(echo, "traceparent") == [f"00-{TRACE}-{up.context.span_id:016x}-01"]
    assert header_values(echo, "tracestate") == [TRACESTATE]
    assert dict(server.attributes or {}) == {
        "http.request.method": "GET",
        "url.scheme": "http",
        "network.protocol.name": "http",
        "network.protocol.version": "1.1",
        "network.peer.address": "127.0.0.1",
        "client.address": "127.0.0.1",
        "server.address": "127.0.0.1",
        "server.port": gw.port,
        "gateway.request_id": request_id,
        "http.response.status_code": 200,
        "http.route": "orders",
        "url.path": "/orders/7",
        "gateway.cache": "miss",
    }
    host, port = emulator.base_url.removeprefix("http://").split(":")
    assert dict(introspection.attributes or {}) == {
        "http.request.method": "POST",
        "server.address": host,
        "server.port": int(port),
        "url.full": f"{emulator.base_url}/api/715948317/auth/introspection",
        "url.template": "/api/{serviceId}/auth/introspection",
        "network.protocol.version": "1.1",
        "http.response.status_code": 200,
    }
    up_host, up_port = upstream.removeprefix("http://").split(":")
    assert dict(up.attributes or {}) == {
        "http.request.method": "GET",
        "server.address": up_host,
        "server.port": int(up_port),
        "url.full": f"{upstream}/orders/7",  # never the query
        "network.protocol.version": "1.1",
        "gateway.route": "orders",
        "http.response.status_code": 200,
    }
    # Time: the children lie within the request's span.
    assert server.start_time is not None and server.end_time is not None
    for child in (introspection, up):
        assert child.start_time is not None and child.end_time is not None
        assert server.start_time <= child.start_time <= child.end_time <= server.end_time
    assert server.status.status_code is StatusCode.UNSET
    _no_secret_in(await _spans(exporter, 3), token, "secret=q")
    (line,) = await _access_lines(capsys)
    assert line["trace_id"] == TRACE and line["request_id"] == request_id


@needs_otel
async def test_a_trace_starts_here_when_none_or_an_invalid_one_comes(
    emulator: Emulator,
    upstream: str,
    traced: Traced,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    emulator.add_token("tok-root", scopes=["r"])
    gw, exporter = await traced(_routes(upstream))
    async with client.get(f"{gw.url}/orders/1", headers=bearer("tok-root")) as resp:
        first = header_values(await echo_of(resp), "traceparent")
    bad = {"traceparent": f"00-{TRACE.upper()}-{PARENT}-01", "tracestate": TRACESTATE}
    async with client.get(f"{gw.url}/orders/2", headers={**bearer("tok-root"), **bad}) as resp:
        echo = await echo_of(resp)
    second = header_values(echo, "traceparent")
    assert header_values(echo, "tracestate") == []  # the invalid trace's state went with it
    spans = await _spans(exporter, 5)  # a miss (3 spans), then a hit (2)
    servers = [span for span in spans if span.kind is SpanKind.SERVER]
    assert len(servers) == 2
    lines = await _access_lines(capsys)
    for server, sent, line in zip(servers, (first, second), lines, strict=True):
        assert server.parent is None and server.context is not None  # a root span
        trace_id = f"{server.context.trace_id:032x}"
        assert trace_id != TRACE.lower()
        (value,) = sent
        # sampled, and (the SDK's root spans) W3C level 2's random-trace-id flag
        assert re.fullmatch(f"00-{trace_id}-[0-9a-f]{{16}}-0[13]", value), value
        assert line["trace_id"] == trace_id
    assert dict(servers[1].attributes or {})["gateway.cache"] == "hit"


@needs_otel
async def test_refusals_failures_and_decisions_have_their_spans(
    emulator: Emulator,
    upstream: str,
    traced: Traced,
    client: aiohttp.ClientSession,
) -> None:
    emulator.add_token("tok-fail", scopes=["r"])
    dead = f"http://127.0.0.1:{free_port()}"
    routes = [*_routes(upstream), {"name": "dead", "path_prefix": "/dead", "upstream": dead}]
    gw, exporter = await traced(routes, decision={}, trusted_proxies=["127.0.0.1/32"])
    async with client.get(f"{gw.url}/orders/1") as resp:  # no token
        assert resp.status == 401
    async with client.get(f"{gw.url}/nowhere") as resp:
        assert resp.status == 404
    async with client.get(f"{gw.url}/dead/1", headers=bearer("tok-fail")) as resp:
        assert resp.status == 502
    asked = {**bearer("tok-fail"), "X-Original-URI": "/orders/1", "X-Original-Method": "GET"}
    async with client.get(f"{gw.url}/_gateway/auth", headers=asked) as resp:
        assert resp.status == 200
    spans = await _spans(exporter, 6)  # 401, 404, 502 (+ Authlete + upstream), decision
    servers = [span for span in spans if span.kind is SpanKind.SERVER]
    status = [dict(span.attributes or {}).get("http.response.status_code") for span in servers]
    assert status == [401, 404, 502, 200]
    refused, missing, failed, decided = servers
    assert refused.name == "GET orders" and missing.name == "GET"
    assert "http.route" not in dict(missing.attributes or {})
    assert failed.status.status_code is StatusCode.ERROR
    assert dict(failed.attributes or {})["error.type"] == "502"
    (dead_call,) = [
        span
        for span in spans
        if span.kind is SpanKind.CLIENT
        and dict(span.attributes or {}).get("gateway.route") == "dead"
    ]
    assert failed.context is not None and dead_call.parent is not None
    assert dead_call.parent.span_id == failed.context.span_id
    assert dead_call.status.status_code is StatusCode.ERROR
    assert dict(dead_call.attributes or {})["error.type"] in ("refused", "connect", "error")
    decision = dict(decided.attributes or {})
    assert decided.name == "GET orders" and decision["gateway.decision"] is True
    assert decision["url.path"] == "/_gateway/auth"
    _no_secret_in(spans, "tok-fail")


@needs_otel
async def test_an_authlete_failure_is_an_error_span(
    emulator: Emulator, upstream: str, traced: Traced, client: aiohttp.ClientSession
) -> None:
    from gateway.emulator import Override

    emulator.override = Override(status=500, count=1)
    gw, exporter = await traced(_routes(upstream), authlete={"retries": 0})
    async with client.get(f"{gw.url}/orders/1", headers=bearer("tok-unknown-x")) as resp:
        assert resp.status == 503
    spans = _by_name(await _spans(exporter, 2))
    call = spans["POST /api/{serviceId}/auth/introspection"]
    assert dict(call.attributes or {})["http.response.status_code"] == 500
    assert dict(call.attributes or {})["error.type"] == "500"
    assert call.status.status_code is StatusCode.ERROR
    assert spans["GET orders"].status.status_code is StatusCode.ERROR
    _no_secret_in(tuple(spans.values()), "tok-unknown-x")


@needs_otel
async def test_spans_reach_the_otlp_collector_the_variables_name(
    emulator: Emulator,
    upstream: str,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No exporter given: the SDK's own OTLP/HTTP exporter, configured by nothing but the
    standard variables (endpoint, service name, batching), delivers the spans; the last ones
    are flushed when the gateway stops."""
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    bodies: list[bytes] = []

    async def collect(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner, collector, _ = await start_app(app)
    token = "tok-otlp-secret-987654"
    emulator.add_token(token, scopes=["r"])
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector,
        "OTEL_SERVICE_NAME": "gateway-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    raw = raw_config(emulator.base_url, _routes(upstream), tracing={"opentelemetry": True})
    cfg = parse_config(yaml.safe_dump(raw), env=env)
    assert cfg.tracing.exporters == ("otlp_proto_http",)
    gw = Gateway(cfg)
    await gw.start()
    try:
        url = f"http://127.0.0.1:{gw.proxy_port}/orders/1"
        async with client.get(url, headers=bearer(token)) as resp:
            assert resp.status == 200
    finally:
        await gw.stop()  # exports what the batch still holds
        await runner.cleanup()
    names = []
    for body in bodies:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert attributes["service.name"] == "gateway-under-test"
            for scope in resource_spans.scope_spans:
                names += [span.name for span in scope.spans]
    assert sorted(names) == ["GET", "GET orders", "POST /api/{serviceId}/auth/introspection"]
    assert not any(token.encode() in body or b"Bearer" in body for body in bodies)
