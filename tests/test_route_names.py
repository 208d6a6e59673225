"""Configs the routes contract allows must load: unnamed routes get distinct default names
(used by metrics labels); browser-style query strings are forwarded byte for byte while the
path stays strict. Over real sockets, with the echo upstream and real frameworks."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError
from gateway.emulator import Emulator
from tests.conftest import StartGateway, bearer, make_config, metric, raw_request

# What browsers leave unencoded in a query (and frameworks accept), all at once.
BROWSER_QUERY = 'filter[name]=x&ids[]=1&ids[]=2&q=a|b&o={"k":1}&c=^~&s=a\\b&t=<i>&g=`x`'


def _names(routes: list[dict[str, Any]]) -> list[str]:
    return [r.name for r in make_config("http://127.0.0.1:9", routes).routes]


def test_default_names_are_distinct_and_explicit_duplicates_refused() -> None:
    up = "http://127.0.0.1:9"
    assert _names(
        [
            {"path_prefix": "/items", "methods": ["GET"], "upstream": up, "auth": "none"},
            {"path_prefix": "/items", "methods": ["POST", "DELETE"], "upstream": up},
            {"path_prefix": "/items", "methods": ["DELETE", "POST"], "upstream": up},
            {"path_prefix": "/items", "upstream": up},
        ]
    ) == ["/items", "/items [DELETE,POST]", "/items#2", "/items#3"]
    # An unnamed route whose prefix is another route's explicit name: a distinct default.
    assert _names(
        [
            {"path_prefix": "/items", "upstream": up},
            {"name": "/items", "path_prefix": "/other", "upstream": up},
        ]
    ) == ["/items#0", "/items"]
    with pytest.raises(ConfigError) as info:
        make_config(
            up,
            [
                {"name": "a", "path_prefix": "/x", "upstream": up},
                {"name": "a", "path_prefix": "/y", "upstream": up},
            ],
        )
    assert info.value.problems == ["routes[1].name: duplicate route name 'a'"]


async def test_same_prefix_different_methods_without_names_serves_both(
    emulator: Emulator, upstream: str, start_gateway: StartGateway
) -> None:
    emulator.add_token("names-token-123456", scopes=["w"])
    gw = await start_gateway(
        [
            {"path_prefix": "/items", "methods": ["GET"], "upstream": upstream, "auth": "none"},
            {"path_prefix": "/items", "upstream": upstream, "scopes": ["w"]},
        ]
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gw.url}/items/1") as resp:
            assert resp.status == 200
        async with session.post(f"{gw.url}/items") as resp:
            assert resp.status == 401
        async with session.post(f"{gw.url}/items", headers=bearer("names-token-123456")) as resp:
            assert resp.status == 200
    total = "gateway_requests_total"
    assert metric(gw, total, route="/items", method="GET", status="200") == 1
    assert metric(gw, total, route="/items#1", method="POST", status="401") == 1
    assert metric(gw, total, route="/items#1", method="POST", status="200") == 1


async def _raw_get(port: int, target: str) -> tuple[int, bytes]:
    head = f"GET {target} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n"
    resp = await raw_request(port, head.encode("latin-1"))
    return resp.status, resp.body


async def test_browser_query_reaches_the_echo_byte_for_byte(
    upstream: str, start_gateway: StartGateway
) -> None:
    gw = await start_gateway([{"path_prefix": "/", "upstream": upstream, "auth": "none"}])
    status, body = await _raw_get(gw.port, f"/search?{BROWSER_QUERY}")
    assert status == 200, body
    echo = json.loads(body)
    assert echo["path"] == f"/search?{BROWSER_QUERY}"
    assert echo["query"] == BROWSER_QUERY


@pytest.mark.parametrize("framework", ["flask_upstream", "starlette_upstream"])
async def test_browser_query_reaches_frameworks_as_sent(
    framework: str, request: pytest.FixtureRequest, start_gateway: StartGateway
) -> None:
    url: str = request.getfixturevalue(framework)
    gw = await start_gateway([{"path_prefix": "/", "upstream": url, "auth": "none"}])
    for query in ("filter[name]=x", "ids[]=1&ids[]=2", "q=a|b", BROWSER_QUERY):
        status, body = await _raw_get(gw.port, f"/search?{query}")
        assert status == 200, body
        seen = json.loads(body)
        assert seen["query"] == query
        if framework == "flask_upstream":
            assert seen["raw_uri"] == f"/search?{query}"


@pytest.mark.parametrize(
    "target",
    [
        "/search[x]?a=1",  # the path stays strict: routing decides on it
        "/se|arch?a=1",
        "/search?a=1#frag",  # a fragment is never part of a request target
    ],
)
async def test_path_stays_strict_and_fragments_refused(
    upstream: str, start_gateway: StartGateway, target: str
) -> None:
    gw = await start_gateway([{"path_prefix": "/", "upstream": upstream, "auth": "none"}])
    status, body = await _raw_get(gw.port, target)
    assert status == 400, body
