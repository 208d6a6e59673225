"""The /metrics exposition: Prometheus conventions, promtool-clean, nothing secret in it."""

from __future__ import annotations

import subprocess
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.emulator import Emulator, Override
from tests.conftest import StartGateway, bearer, need_tool

SUBJECT = "subject-that-must-not-be-a-label"
TOKEN = "token-that-must-not-appear"


async def _exercise(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> str:
    emulator.add_token(TOKEN, subject=SUBJECT, scopes=["s"])
    routes: list[dict[str, Any]] = [
        {"name": "api", "path_prefix": "/api", "upstream": upstream, "scopes": ["s"]},
        {"name": "open", "path_prefix": "/open", "upstream": upstream, "auth": "none"},
        {"name": "dead", "path_prefix": "/dead", "upstream": "http://127.0.0.1:9", "auth": "none"},
    ]
    gw = await start_gateway(routes)
    for path, headers in (
        ("/api/1", bearer(TOKEN)),
        ("/api/1", bearer(TOKEN)),
        ("/api/1", {}),
        ("/api/1", bearer("unknown")),
        ("/open/x", {}),
        ("/dead/x", {}),
        ("/nowhere", {}),
    ):
        async with client.get(f"{gw.url}{path}", headers=headers) as resp:
            await resp.read()
    emulator.override = Override(status=500)
    async with client.get(f"{gw.url}/api/2", headers=bearer("other")) as resp:
        assert resp.status == 503
    async with client.request("PROPFIND", f"{gw.url}/open/dav") as resp:
        await resp.read()
    async with client.get(f"{gw.admin_url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


async def test_metric_names_and_labels_follow_conventions(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    text = await _exercise(emulator, upstream, start_gateway, client)
    assert TOKEN not in text and SUBJECT not in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, family in families.items():
        # Ours, or prometheus_client's standard process, GC and platform collectors.
        assert name.startswith(("gateway_", "process_", "python_")), name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), name
        if family.type == "histogram":
            assert name.endswith("_seconds"), name
    required = {
        "gateway_requests": {"route", "method", "status"},
        "gateway_request_duration_seconds": {"route"},
        "gateway_overhead_seconds": {"route"},
        "gateway_upstream_requests": {"route", "status"},
        "gateway_upstream_duration_seconds": {"route"},
        "gateway_upstream_errors": {"route", "kind"},
        "gateway_introspection_requests": {"outcome"},
        "gateway_introspection_duration_seconds": set(),
        "gateway_cache_requests": {"result"},
        "gateway_cache_entries": set(),
        "gateway_cache_evictions": set(),
        "gateway_introspection_coalesced": set(),
        "gateway_build_info": {"version"},
        "gateway_config_reloads": {"result"},
        "gateway_open_connections": set(),
    }
    for name, labels in required.items():
        assert name in families, name
        for sample in families[name].samples:
            assert labels <= set(sample.labels) | {"le"}, (name, sample.labels)
    routes = {s.labels["route"] for s in families["gateway_requests"].samples}
    assert routes == {"api", "open", "dead", "(none)"}  # config names only: bounded
    methods = {s.labels["method"] for s in families["gateway_requests"].samples}
    assert methods == {"GET", "OTHER"}  # an unknown method does not become a label value
    # Every route with an upstream has each error kind from the start (at 0: a rate reads 0,
    # not nothing); only the failure that happened counts.
    errors = {
        (s.labels["route"], s.labels["kind"]): s.value
        for s in families["gateway_upstream_errors"].samples
    }
    kinds = {"refused", "reset", "timeout", "protocol"}
    assert set(errors) == {(route, kind) for route in ("api", "open", "dead") for kind in kinds}
    assert {key for key, value in errors.items() if value} == {("dead", "refused")}


async def test_promtool_check_metrics_passes(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    promtool = need_tool("promtool")  # Debian prometheus; fails under CI, which installs it
    text = await _exercise(emulator, upstream, start_gateway, client)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, check=False
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
