"""gateway_denials_total{route,reason}: every way a request is refused for its token, in
proxy mode and in decision mode, counted under its reason, and every reason exported at 0
from the start on routes that check tokens (so `rate()` reads 0 before the first one)."""

from __future__ import annotations

import json
from typing import Any

from gateway.decision import DENIAL_REASONS
from gateway.emulator import Emulator, Override
from tests.conftest import StartGateway, head, metric, raw_request


def _routes(upstream: str) -> list[dict[str, Any]]:
    return [
        {"name": "public", "path_prefix": "/public", "upstream": upstream, "auth": "none"},
        {"name": "orders", "path_prefix": "/orders", "upstream": upstream, "scopes": ["read"]},
    ]


async def _status(port: int, target: str, *lines: str) -> int:
    return (await raw_request(port, head("GET", target, "Connection: close", *lines))).status


def _action(action: str) -> Override:
    body = json.dumps({"resultCode": "A0", "action": action, "responseContent": 'Bearer x="y"'})
    return Override(body=body.encode(), count=1)


async def test_each_reason_is_counted_once_per_denial(
    emulator: Emulator, upstream: str, start_gateway: StartGateway
) -> None:
    emulator.add_token("reader", scopes=["read"])
    emulator.add_token("other", scopes=["write"])
    gw = await start_gateway(_routes(upstream), authlete={"retries": 0}, cache={"negative_ttl": 0})
    for reason in DENIAL_REASONS[:-1]:  # untrusted_peer: decision mode only
        assert metric(gw, "gateway_denials_total", route="orders", reason=reason) == 0
    assert metric(gw, "gateway_denials_total", route="public", reason="missing_token") == 0

    cases = [
        ("missing_token", 401, []),
        ("malformed_token", 400, ["Authorization: Bearer not,a,token"]),
        ("invalid_token", 401, ["Authorization: Bearer nobody-knows-me"]),
        ("insufficient_scope", 403, ["Authorization: Bearer other"]),
    ]
    for reason, status, lines in cases:
        assert await _status(gw.port, "/orders/1", *lines) == status, reason
    for action, reason, status in (
        ("FORBIDDEN", "forbidden", 403),
        ("BAD_REQUEST", "bad_request", 400),
        ("INTERNAL_SERVER_ERROR", "authlete_error", 500),
    ):
        emulator.override = _action(action)
        assert await _status(gw.port, "/orders/1", f"Authorization: Bearer t-{reason}") == status
        cases.append((reason, status, []))
    emulator.override = Override(status=500, count=1)
    assert await _status(gw.port, "/orders/1", "Authorization: Bearer t-down") == 503
    cases.append(("unavailable", 503, []))

    for reason, _, _ in cases:
        assert metric(gw, "gateway_denials_total", route="orders", reason=reason) == 1, reason
    # Allowed requests and answers that are not about the token are not denials.
    assert await _status(gw.port, "/orders/1", "Authorization: Bearer reader") == 200
    assert await _status(gw.port, "/nowhere") == 404
    assert await _status(gw.port, "/public/x") == 200
    total = sum(
        metric(gw, "gateway_denials_total", route=route, reason=reason)
        for route in ("orders", "public", "(none)")
        for reason in DENIAL_REASONS
    )
    assert total == len(cases)


async def test_decisions_are_counted_with_their_route_and_untrusted_peers_apart(
    emulator: Emulator, start_gateway: StartGateway
) -> None:
    routes = [{"name": "orders", "path_prefix": "/orders", "scopes": ["read"]}]
    describe = ["X-Original-URI: /orders/1", "X-Original-Method: GET"]
    trusted = await start_gateway(routes, decision={}, trusted_proxies=["127.0.0.1/32"])
    assert await _status(trusted.port, "/_gateway/auth", *describe) == 401
    assert metric(trusted, "gateway_denials_total", route="orders", reason="missing_token") == 1
    untrusted = await start_gateway(routes, decision={}, trusted_proxies=["10.0.0.0/8"])
    assert await _status(untrusted.port, "/_gateway/auth", *describe) == 403
    assert metric(untrusted, "gateway_denials_total", route="(none)", reason="untrusted_peer") == 1
    assert metric(untrusted, "gateway_denials_total", route="orders", reason="missing_token") == 0
