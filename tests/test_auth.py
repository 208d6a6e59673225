"""End to end: token verdicts from the emulator, the cache, single-flight, and denials."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.emulator import Emulator, Override
from tests.conftest import (
    SERVICE_ID,
    SERVICE_TOKEN,
    StartGateway,
    bearer,
    echo_of,
    header_values,
    start_app,
)


def routes(upstream: str) -> list[dict[str, Any]]:
    return [
        {"name": "public", "path_prefix": "/public", "upstream": upstream, "auth": "none"},
        {
            "name": "orders",
            "path_prefix": "/orders",
            "methods": ["GET", "POST"],
            "upstream": upstream,
            "scopes": ["orders.read"],
        },
        {
            "name": "write",
            "path_prefix": "/write",
            "upstream": upstream,
            "scopes": ["orders.read", "orders.write"],
        },
        {"name": "any", "path_prefix": "/any", "upstream": upstream},
    ]


async def test_active_token_is_forwarded_with_identity(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    emulator.add_token("tok-alice", subject="alice", client_id=42, scopes=["orders.read", "x"])
    gw = await start_gateway(routes(upstream))
    async with client.get(f"{gw.url}/orders/7?a=1", headers=bearer("tok-alice")) as resp:
        echo = await echo_of(resp)
    assert echo["path"] == "/orders/7?a=1"
    assert header_values(echo, "X-Auth-Subject") == ["alice"]
    assert header_values(echo, "X-Auth-Scopes") == ["orders.read x"]
    assert header_values(echo, "X-Auth-Client-Id") == ["42"]
    assert emulator.calls_for("tok-alice") == 1


async def test_second_request_is_a_cache_hit(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    emulator.add_token("tok-hit", scopes=["orders.read"])
    gw = await start_gateway(routes(upstream))
    for _ in range(5):
        async with client.get(f"{gw.url}/orders", headers=bearer("tok-hit")) as resp:
            assert resp.status == 200
    assert emulator.calls_for("tok-hit") == 1
    metrics = await _metrics(client, gw.admin_url)
    assert metrics['gateway_cache_requests_total{result="hit"}'] == 4
    assert metrics['gateway_cache_requests_total{result="miss"}'] == 1


async def test_client_credentials_token_has_no_subject_header(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    emulator.add_token("tok-cc", subject=None, client_id=7, scopes=["orders.read"])
    gw = await start_gateway(routes(upstream))
    async with client.get(f"{gw.url}/orders", headers=bearer("tok-cc")) as resp:
        echo = await echo_of(resp)
    assert header_values(echo, "X-Auth-Subject") == []
    assert header_values(echo, "X-Auth-Client-Id") == ["7"]


async def test_unknown_token_is_401_with_authlete_challenge(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(routes(upstream))
    async with client.get(f"{gw.url}/orders", headers=bearer("nope")) as resp:
        assert resp.status == 401
        challenge = resp.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer error="invalid_token"')
        assert "A057302" in challenge  # Authlete's responseContent, passed through
        assert resp.headers["Cache-Control"] == "no-store"
        body = await resp.json()
    assert body["error"] == "invalid_token"
    assert "nope" not in json.dumps(body)


async def test_expired_token_is_401(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    emulator.add_token("tok-old", scopes=["orders.read"], lifetime=-5)
    gw = await start_gateway(routes(upstream))
    async with client.get(f"{gw.url}/orders", headers=bearer("tok-old")) as resp:
        assert resp.status == 401
        assert "A065303" in resp.headers["WWW-Authenticate"]


@pytest.mark.parametrize(
    ("action", "status"),
    [
        ("BAD_REQUEST", 400),
        ("FORBIDDEN", 403),
        ("INTERNAL_SERVER_ERROR", 500),
        ("UNAUTHORIZED", 401),
    ],
)
async def test_each_action_maps_to_its_status_with_response_content(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    action: str,
    status: int,
) -> None:
    challenge = f'Bearer error="custom_{action.lower()}",error_description="[A0] x"'
    body = json.dumps({"resultCode": "A0", "action": action, "responseContent": challenge})
    emulator.override = Override(body=body.encode())
    gw = await start_gateway(routes(upstream))
    async with client.get(f"{gw.url}/orders", headers=bearer("tok-action")) as resp:
        assert resp.status == status
        assert resp.headers["WWW-Authenticate"] == challenge
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.content_type == "application/json"
        assert "A0" not in await resp.text()  # Authlete's raw body is never echoed


async def test_missing_scope_is_403_even_on_a_cache_hit(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    emulator.add_token("tok-read", scopes=["orders.read"])
    gw = await start_gateway(routes(upstream))
    async with client.get(f"{gw.url}/orders", headers=bearer("tok-read")) as resp:
        assert resp.status == 200  # cached now
    async with client.get(f"{gw.url}/write", headers=bearer("tok-read")) as resp:
        assert resp.status == 403
        assert (
            resp.headers["WWW-Authenticate"]
            == 'Bearer error="insufficient_scope", scope="orders.read orders.write"'
        )
        assert (await resp.json())["error"] == "insufficient_scope"
    assert emulator.calls_for("tok-read") == 1


async def test_route_without_scopes_needs_only_an_active_token(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    emulator.add_token("tok-none", scopes=[])
    gw = await start_gateway(routes(upstream))
    async with client.get(f"{gw.url}/any/thing", headers=bearer("tok-none")) as resp:
        assert resp.status == 200
    async with client.get(f"{gw.url}/any/thing", headers=bearer("tok-unknown")) as resp:
        assert resp.status == 401


async def test_scopes_are_not_sent_to_authlete(
    upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    """The call's exact shape: path, caller auth, JSON body with only the token."""
    seen: list[tuple[str, str, str | None, str | None, bytes]] = []

    async def fake_authlete(request: web.Request) -> web.Response:
        seen.append(
            (
                request.method,
                request.path,
                request.headers.get("Authorization"),
                request.headers.get("Content-Type"),
                await request.read(),
            )
        )
        return web.json_response(
            {
                "action": "OK",
                "resultCode": "A056001",
                "subject": "s",
                "clientId": 1,
                "scopes": ["orders.read"],
                "expiresAt": 4102444800000,
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake_authlete)
    runner, url, _ = await start_app(app)
    try:
        gw = await start_gateway(routes(upstream), authlete_url=url)
        async with client.get(f"{gw.url}/orders", headers=bearer("abc.DEF-123")) as resp:
            assert resp.status == 200
    finally:
        await runner.cleanup()
    assert len(seen) == 1
    method, path, auth, ctype, body = seen[0]
    assert (method, path) == ("POST", f"/api/{SERVICE_ID}/auth/introspection")
    assert auth == f"Bearer {SERVICE_TOKEN}"
    assert ctype is not None and ctype.startswith("application/json")
    assert json.loads(body) == {"token": "abc.DEF-123"}


# ---------------------------------------------------------------- failing closed: 503


def _bodies() -> list[tuple[str, Override]]:
    html = b"<html><body>502 Bad Gateway</body></html>"
    return [
        ("status 500", Override(status=500)),
        ("status 503", Override(status=503)),
        ("status 404", Override(status=404)),
        ("not json", Override(body=b"this is not json")),
        ("truncated json", Override(body=b'{"action": "OK", "subject": ')),
        ("html 200", Override(body=html, content_type="text/html")),
        ("json array", Override(body=b'["OK"]')),
        ("missing action", Override(body=b'{"resultCode": "A056001", "subject": "x"}')),
        ("unknown action", Override(body=b'{"action": "MAYBE", "responseContent": "x"}')),
        ("action not a string", Override(body=b'{"action": 1}')),
        (
            "scopes as a string",
            Override(
                body=b'{"action":"OK","clientId":1,"scopes":"orders.read","expiresAt":4102444800000}'
            ),
        ),
        (
            "expiresAt as a string",
            Override(
                body=b'{"action":"OK","clientId":1,"scopes":["orders.read"],"expiresAt":"4102444800000"}'
            ),
        ),
        (
            "expiresAt in seconds",
            Override(
                body=b'{"action":"OK","clientId":1,"scopes":["orders.read"],"expiresAt":4102444800}'
            ),
        ),
        (
            "clientId too large",
            Override(
                body=b'{"action":"OK","clientId":18446744073709551616,"scopes":["orders.read"],'
                b'"expiresAt":4102444800000}'
            ),
        ),
        ("reset mid-body", Override(reset=True)),
    ]


@pytest.mark.parametrize(("name", "override"), _bodies(), ids=[n for n, _ in _bodies()])
async def test_authlete_failure_is_503_and_never_forwarded(
    emulator: Emulator,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    name: str,
    override: Override,
) -> None:
    hits = 0

    async def counting(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response(text="should not be reached")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", counting)
    runner, url, _ = await start_app(app)
    emulator.add_token("tok-fail", scopes=["orders.read"])
    emulator.override = override
    try:
        gw = await start_gateway(routes(url))
        async with client.get(f"{gw.url}/orders", headers=bearer("tok-fail")) as resp:
            assert resp.status == 503, name
            assert resp.headers["Cache-Control"] == "no-store"
            assert "Retry-After" in resp.headers
            body = await resp.json()
            assert set(body) == {"error", "error_description"}
        # A failure is never cached: once Authlete is healthy the same token works.
        emulator.override = None
        async with client.get(f"{gw.url}/orders", headers=bearer("tok-fail")) as resp:
            assert resp.status == 200
    finally:
        await runner.cleanup()
    assert hits == 1
    metrics = await _metrics(client, gw.admin_url)
    failures = sum(
        v
        for k, v in metrics.items()
        if k.startswith("gateway_introspection_requests_total")
        and 'outcome="ok"' not in k
        and 'outcome="unauthorized"' not in k
    )
    assert failures >= 1


async def test_authlete_unreachable_is_503(
    upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    # A port that was just free: nothing listens there.
    runner, url, _ = await start_app(web.Application())
    await runner.cleanup()
    gw = await start_gateway(routes(upstream), authlete_url=url)
    async with client.get(f"{gw.url}/orders", headers=bearer("tok")) as resp:
        assert resp.status == 503
    metrics = await _metrics(client, gw.admin_url)
    # The first call and authlete.retries (default 2) retries, all failing.
    assert metrics['gateway_introspection_requests_total{outcome="error"}'] == 3
    assert metrics["gateway_authlete_retries_total"] == 2


async def test_authlete_timeout_is_503(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    emulator.add_token("tok-slow", scopes=["orders.read"])
    emulator.latency = 1.0
    gw = await start_gateway(routes(upstream), authlete={"timeout": 0.2})
    async with client.get(f"{gw.url}/orders", headers=bearer("tok-slow")) as resp:
        assert resp.status == 503
    metrics = await _metrics(client, gw.admin_url)
    assert metrics['gateway_introspection_requests_total{outcome="timeout"}'] == 3


async def test_wrong_service_credentials_are_503_not_401(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    emulator.add_token("tok-good", scopes=["orders.read"])
    gw = await start_gateway(routes(upstream), authlete={"access_token": "wrong"})
    async with client.get(f"{gw.url}/orders", headers=bearer("tok-good")) as resp:
        assert resp.status == 503  # our misconfiguration is not the client's fault


# ---------------------------------------------------------------- cache lifetimes


async def test_entry_lives_no_longer_than_the_token(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    emulator.add_token("tok-short", scopes=["orders.read"], lifetime=1.0)
    gw = await start_gateway(routes(upstream), cache={"ttl": 60})
    async with client.get(f"{gw.url}/orders", headers=bearer("tok-short")) as resp:
        assert resp.status == 200
    await asyncio.sleep(1.3)
    async with client.get(f"{gw.url}/orders", headers=bearer("tok-short")) as resp:
        assert resp.status == 401  # not served from a cache entry that outlived the token
    assert emulator.calls_for("tok-short") == 2


async def test_active_entry_expires_after_ttl(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    emulator.add_token("tok-ttl", scopes=["orders.read"])
    gw = await start_gateway(routes(upstream), cache={"ttl": 0.3})
    async with client.get(f"{gw.url}/orders", headers=bearer("tok-ttl")) as resp:
        assert resp.status == 200
    emulator.revoke("tok-ttl")
    async with client.get(f"{gw.url}/orders", headers=bearer("tok-ttl")) as resp:
        assert resp.status == 200  # still cached: revocation is seen after the TTL
    await asyncio.sleep(0.5)
    async with client.get(f"{gw.url}/orders", headers=bearer("tok-ttl")) as resp:
        assert resp.status == 401
    assert emulator.calls_for("tok-ttl") == 2


async def test_unauthorized_is_remembered_for_negative_ttl(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(routes(upstream), cache={"negative_ttl": 0.5})
    for _ in range(3):
        async with client.get(f"{gw.url}/orders", headers=bearer("tok-later")) as resp:
            assert resp.status == 401
    assert emulator.calls_for("tok-later") == 1
    emulator.add_token("tok-later", scopes=["orders.read"])
    await asyncio.sleep(0.7)
    async with client.get(f"{gw.url}/orders", headers=bearer("tok-later")) as resp:
        assert resp.status == 200
    assert emulator.calls_for("tok-later") == 2
    metrics = await _metrics(client, gw.admin_url)
    assert metrics['gateway_cache_requests_total{result="negative_hit"}'] == 2


@pytest.mark.parametrize("action", ["FORBIDDEN", "BAD_REQUEST", "INTERNAL_SERVER_ERROR"])
async def test_other_actions_are_not_cached(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    action: str,
) -> None:
    body = json.dumps({"action": action, "responseContent": 'Bearer error="x"'}).encode()
    emulator.override = Override(body=body)
    gw = await start_gateway(routes(upstream))
    for _ in range(3):
        async with client.get(f"{gw.url}/orders", headers=bearer("tok-nc")) as resp:
            assert resp.status in (400, 403, 500)
    assert emulator.calls_for("tok-nc") == 3


async def test_cache_is_bounded_and_evicts_oldest(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    for name in ("t1", "t2", "t3"):
        emulator.add_token(name, scopes=["orders.read"])
    gw = await start_gateway(routes(upstream), cache={"max_entries": 2})
    for name in ("t1", "t2", "t3", "t3", "t2", "t1"):
        async with client.get(f"{gw.url}/orders", headers=bearer(name)) as resp:
            assert resp.status == 200
    assert emulator.calls_for("t1") == 2  # evicted by t3, fetched again
    assert emulator.calls_for("t2") == 1
    assert emulator.calls_for("t3") == 1
    assert len(gw.gateway.verdicts.cache) == 2
    metrics = await _metrics(client, gw.admin_url)
    assert metrics["gateway_cache_entries"] == 2
    assert metrics["gateway_cache_evictions_total"] == 2  # t1 by t3, then t2 by t1


async def test_cache_keys_are_digests_not_tokens(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    token = "secret-token-value-123"
    emulator.add_token(token, scopes=["orders.read"])
    gw = await start_gateway(routes(upstream))
    async with client.get(f"{gw.url}/orders", headers=bearer(token)) as resp:
        assert resp.status == 200
    cache = gw.gateway.verdicts.cache
    keys = list(cache._active)
    assert len(keys) == 1 and isinstance(keys[0], bytes) and len(keys[0]) == 32
    assert token.encode() not in keys[0]
    assert token not in repr(cache._active)
    async with client.get(f"{gw.admin_url}/metrics") as resp:
        assert token not in await resp.text()


# ---------------------------------------------------------------- single flight


async def test_concurrent_misses_share_one_call(
    emulator: Emulator, upstream: str, start_gateway: StartGateway
) -> None:
    emulator.add_token("tok-storm", scopes=["orders.read"])
    emulator.latency = 0.3
    gw = await start_gateway(routes(upstream))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as many:

        async def one() -> int:
            async with many.get(f"{gw.url}/orders", headers=bearer("tok-storm")) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(100)))
    assert statuses == [200] * 100
    assert emulator.calls_for("tok-storm") == 1
    assert emulator.calls == 1


async def test_a_shared_failure_fails_every_waiter_and_is_not_cached(
    emulator: Emulator, upstream: str, start_gateway: StartGateway
) -> None:
    emulator.add_token("tok-shared", scopes=["orders.read"])
    emulator.override = Override(status=500, delay=0.3, count=1)
    gw = await start_gateway(routes(upstream), authlete={"retries": 0})
    async with aiohttp.ClientSession() as many:

        async def one() -> int:
            async with many.get(f"{gw.url}/orders", headers=bearer("tok-shared")) as resp:
                return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(20)))
        assert statuses == [503] * 20
        assert emulator.calls_for("tok-shared") == 1
        assert await one() == 200
    assert emulator.calls_for("tok-shared") == 2


async def test_client_going_away_does_not_cancel_the_shared_call(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    emulator.add_token("tok-leave", scopes=["orders.read"])
    emulator.latency = 0.4
    gw = await start_gateway(routes(upstream))
    async with aiohttp.ClientSession() as impatient:
        with pytest.raises(asyncio.TimeoutError):
            async with impatient.get(
                f"{gw.url}/orders",
                headers=bearer("tok-leave"),
                timeout=aiohttp.ClientTimeout(total=0.1),
            ):
                pass
    async with client.get(f"{gw.url}/orders", headers=bearer("tok-leave")) as resp:
        assert resp.status == 200
    assert emulator.calls_for("tok-leave") == 1


# ---------------------------------------------------------------- routing answers


async def test_no_route_is_404_json(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(routes(upstream))
    async with client.get(f"{gw.url}/ordersx", headers=bearer("t")) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"
    async with client.delete(f"{gw.url}/orders/1", headers=bearer("t")) as resp:
        assert resp.status == 404  # method not in the route's list: the route does not match
    assert emulator.calls == 0


async def test_public_route_needs_no_token_and_never_calls_authlete(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(routes(upstream))
    async with client.get(f"{gw.url}/public/x", headers=bearer("whatever")) as resp:
        echo = await echo_of(resp)
    assert echo["path"] == "/public/x"
    assert header_values(echo, "X-Auth-Subject") == []
    assert emulator.calls == 0


# ---------------------------------------------------------------- admin listener


async def test_admin_endpoints(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    emulator.add_token("tok-m", scopes=["orders.read"])
    gw = await start_gateway(routes(upstream))
    async with client.get(f"{gw.admin_url}/healthz") as resp:
        assert resp.status == 200
    async with client.get(f"{gw.admin_url}/readyz") as resp:
        assert resp.status == 200
    async with client.get(f"{gw.url}/orders", headers=bearer("tok-m")) as resp:
        assert resp.status == 200
    async with client.get(f"{gw.url}/orders") as resp:
        assert resp.status == 401
    metrics = await _metrics(client, gw.admin_url)
    assert metrics['gateway_requests_total{method="GET",route="orders",status="200"}'] == 1
    assert metrics['gateway_requests_total{method="GET",route="orders",status="401"}'] == 1
    assert metrics['gateway_introspection_requests_total{outcome="ok"}'] == 1
    assert metrics["gateway_introspection_duration_seconds_count"] == 1
    assert metrics['gateway_request_duration_seconds_count{route="orders"}'] == 2
    # The proxy listener does not serve the admin endpoints.
    async with client.get(f"{gw.url}/metrics") as resp:
        assert resp.status == 404


async def test_readyz_turns_503_when_stopping(
    emulator: Emulator, upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(routes(upstream))
    gw.gateway.ready = False  # what stop() does first
    async with client.get(f"{gw.admin_url}/readyz") as resp:
        assert resp.status == 503
    async with client.get(f"{gw.admin_url}/healthz") as resp:
        assert resp.status == 200


async def _metrics(client: aiohttp.ClientSession, admin_url: str) -> dict[str, float]:
    async with client.get(f"{admin_url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_token_never_appears_in_logs_or_answers(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    secret = "SeCrEt-Token-4711"
    emulator.add_token(secret, scopes=["profile"])
    gw = await start_gateway(routes(upstream))
    answers: list[bytes] = []
    for raw in (
        f"Authorization: Bearer {secret}\x01x",  # invalid header byte: a parse error
        f"Authorization: Bearer {secret} {secret}",  # two tokens
        f"Authorization: Bearer {secret}\r\nAuthorization: Bearer {secret}",
        f"Authorization: Bearer {secret}",  # active, but lacks the scope: 403
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(f"GET /orders HTTP/1.1\r\nHost: t\r\n{raw}\r\n\r\n".encode("latin-1"))
        answers.append(await asyncio.wait_for(reader.read(65536), 5))
        writer.close()
    emulator.override = Override(status=500)
    assert [a.split(b" ", 2)[1] for a in answers] == [b"400", b"400", b"400", b"403"]
    async with client.get(f"{gw.url}/orders", headers=bearer(secret + "2")) as resp:
        assert resp.status == 503
        answers.append(await resp.read())
    for answer in answers:
        assert secret.encode() not in answer
    assert caplog.records, "the failures above should have been logged"
    assert secret not in caplog.text
    async with client.get(f"{gw.admin_url}/metrics") as resp:
        assert secret not in await resp.text()
