"""Tests of the Authlete emulator and the echo upstream, over real loopback sockets."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from gateway.echo import start_echo
from gateway.emulator import (
    DEFAULT_ACCESS_TOKEN,
    DEFAULT_SERVICE_ID,
    DEMO_TOKENS_PATH,
    Emulator,
    Override,
)

AUTH = {"Authorization": f"Bearer {DEFAULT_ACCESS_TOKEN}"}
PATH = f"/api/{DEFAULT_SERVICE_ID}/auth/introspection"


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    emulator = Emulator()
    await emulator.start()
    try:
        yield emulator
    finally:
        await emulator.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


class Reply:
    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    session: aiohttp.ClientSession,
    emu: Emulator,
    payload: Any = None,
    *,
    headers: dict[str, str] | None = None,
    path: str = PATH,
    data: Any = None,
) -> Reply:
    kwargs: dict[str, Any] = {"headers": AUTH if headers is None else headers}
    if data is not None:
        kwargs["data"] = data
    else:
        kwargs["json"] = payload
    async with session.post(emu.base_url + path, **kwargs) as resp:
        return Reply(resp.status, CIMultiDict(resp.headers), await resp.read())


# --------------------------------------------------------------------------- caller auth, routing


async def test_missing_caller_auth_is_401_a001202(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    emu.add_token("t")
    reply = await call(session, emu, {"token": "t"}, headers={})
    assert reply.status == 401
    assert reply.json() == {
        "resultCode": "A001202",
        "resultMessage": "[A001202] Authorization header is missing.",
    }
    assert "action" not in reply.json()
    assert emu.calls == 1
    assert len(emu.call_times) == 1


@pytest.mark.parametrize(
    "value",
    [
        "Bearer wrong-token",
        f"Basic {DEFAULT_ACCESS_TOKEN}",
        "Bearer",
        DEFAULT_ACCESS_TOKEN,
        f"Bearer {DEFAULT_ACCESS_TOKEN}x",
    ],
)
async def test_wrong_caller_auth_is_401_a001203(
    emu: Emulator, session: aiohttp.ClientSession, value: str
) -> None:
    emu.add_token("t")
    reply = await call(session, emu, {"token": "t"}, headers={"Authorization": value})
    assert reply.status == 401
    assert reply.json()["resultCode"] == "A001203"
    assert reply.json()["resultMessage"].startswith("[A001203] ")
    assert emu.calls == 1


async def test_bearer_scheme_is_case_insensitive(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    emu.add_token("t")
    reply = await call(
        session, emu, {"token": "t"}, headers={"Authorization": f"bearer {DEFAULT_ACCESS_TOKEN}"}
    )
    assert reply.status == 200
    assert reply.json()["action"] == "OK"


async def test_wrong_service_id_is_404(emu: Emulator, session: aiohttp.ClientSession) -> None:
    emu.add_token("t")
    reply = await call(session, emu, {"token": "t"}, path="/api/1/auth/introspection")
    assert reply.status == 404
    assert reply.json() == {"resultCode": "404", "resultMessage": ""}
    assert emu.calls == 1


async def test_other_methods_are_405(emu: Emulator, session: aiohttp.ClientSession) -> None:
    for method in ("GET", "PUT", "DELETE"):
        async with session.request(method, emu.base_url + PATH, headers=AUTH) as resp:
            assert resp.status == 405
    assert emu.calls == 0


# --------------------------------------------------------------------------- actions


async def test_ok_answer_has_the_documented_fields(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    before_ms = time.time() * 1000
    emu.add_token(
        "good",
        subject="user-4711",
        client_id=3006291287,
        scopes=["openid", "orders.read"],
        lifetime=600,
        client_id_alias="shop-web",
        refreshable=True,
    )
    reply = await call(session, emu, {"token": "good", "scopes": ["orders.read"]})
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    expires_at = body.pop("expiresAt")
    assert before_ms + 599_000 <= expires_at <= time.time() * 1000 + 601_000
    assert body == {
        "resultCode": "A056001",
        "resultMessage": "[A056001] The access token is valid.",
        "action": "OK",
        "responseContent": 'Bearer error="invalid_request"',
        "clientId": 3006291287,
        "clientIdAlias": "shop-web",
        "clientIdAliasUsed": True,
        "clientEntityIdUsed": False,
        "metadataDocumentUsed": False,
        "subject": "user-4711",
        "scopes": ["openid", "orders.read"],
        "existent": True,
        "usable": True,
        "sufficient": True,
        "refreshable": True,
        "grantType": "AUTHORIZATION_CODE",
        "properties": [],
        "forExternalAttachment": False,
        "forCredentialIssuance": False,
        "responseSigningRequired": False,
    }


async def test_client_credentials_token(emu: Emulator, session: aiohttp.ClientSession) -> None:
    emu.add_token("svc", subject=None, client_id=2002, scopes=["orders.read"])
    body = (await call(session, emu, {"token": "svc"})).json()
    assert body["action"] == "OK"
    assert body["subject"] is None
    assert body["clientId"] == 2002
    assert body["grantType"] == "CLIENT_CREDENTIALS"
    assert body["clientIdAlias"] is None
    assert body["clientIdAliasUsed"] is False


@pytest.mark.parametrize("payload", [{}, {"token": None}, {"token": ""}])
async def test_no_token_is_bad_request_a057301(
    emu: Emulator, session: aiohttp.ClientSession, payload: dict[str, Any]
) -> None:
    reply = await call(session, emu, payload)
    assert reply.status == 200
    message = "[A057301] The request does not contain a valid access token."
    assert reply.json() == {
        "resultCode": "A057301",
        "resultMessage": message,
        "action": "BAD_REQUEST",
        "responseContent": (
            f'Bearer error="invalid_request",error_description="{message}",'
            'error_uri="https://docs.authlete.com/#A057301"'
        ),
        "existent": False,
        "usable": False,
        "sufficient": False,
        "refreshable": False,
    }


async def test_unknown_token_is_unauthorized_a057302(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    reply = await call(session, emu, {"token": "nope", "scopes": ["orders.read"]})
    assert reply.status == 200
    message = "[A057302] The access token does not exist."
    assert reply.json() == {
        "resultCode": "A057302",
        "resultMessage": message,
        "action": "UNAUTHORIZED",
        "responseContent": (
            f'Bearer error="invalid_token",error_description="{message}",'
            'error_uri="https://docs.authlete.com/#A057302"'
        ),
        "clientId": 0,
        "existent": False,
        "usable": False,
        "sufficient": False,
        "refreshable": False,
        "expiresAt": 0,
    }


@pytest.mark.parametrize(("refreshable", "code"), [(False, "A065303"), (True, "A065301")])
async def test_expired_token_then_deleted(
    emu: Emulator, session: aiohttp.ClientSession, refreshable: bool, code: str
) -> None:
    emu.add_token("old", subject="bob", lifetime=-60, refreshable=refreshable)
    assert emu.get_token("old") is not None
    first = (await call(session, emu, {"token": "old"})).json()
    assert first["action"] == "UNAUTHORIZED"
    assert first["resultCode"] == code
    assert first["resultMessage"].startswith(f"[{code}] ")
    assert first["responseContent"].startswith('Bearer error="invalid_token",')
    assert f'error_uri="https://docs.authlete.com/#{code}"' in first["responseContent"]
    assert first["existent"] is True
    assert first["usable"] is False
    assert first["refreshable"] is refreshable
    assert first["subject"] == "bob"
    assert 0 < first["expiresAt"] < time.time() * 1000
    # Facts §9: the first introspection after expiry deletes the token.
    assert emu.get_token("old") is None
    second = (await call(session, emu, {"token": "old"})).json()
    assert second["action"] == "UNAUTHORIZED"
    assert second["resultCode"] == "A057302"
    assert second["existent"] is False


async def test_revoked_token_is_unknown(emu: Emulator, session: aiohttp.ClientSession) -> None:
    emu.add_token("t")
    assert (await call(session, emu, {"token": "t"})).json()["action"] == "OK"
    assert emu.revoke("t") is True
    assert emu.revoke("t") is False
    body = (await call(session, emu, {"token": "t"})).json()
    assert body["resultCode"] == "A057302"
    assert body["action"] == "UNAUTHORIZED"


# --------------------------------------------------------------------------- scopes and subject


async def test_scope_not_covered_is_forbidden_a064302(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    emu.add_token("t", scopes=["openid", "orders.read"], client_id=77)
    body = (
        await call(session, emu, {"token": "t", "scopes": ["orders.read", "orders.write"]})
    ).json()
    message = "[A064302] The access token does not cover the required scope 'orders.write'."
    assert body["action"] == "FORBIDDEN"
    assert body["resultCode"] == "A064302"
    assert body["resultMessage"] == message
    assert body["responseContent"] == (
        f'Bearer error="insufficient_scope",error_description="{message}",'
        'error_uri="https://docs.authlete.com/#A064302"'
    )
    assert body["sufficient"] is False
    assert body["usable"] is True
    assert body["existent"] is True
    assert body["clientId"] == 77
    assert body["scopes"] == ["openid", "orders.read"]

    covered = (await call(session, emu, {"token": "t", "scopes": ["orders.read", "openid"]})).json()
    assert covered["action"] == "OK"
    assert covered["sufficient"] is True


async def test_token_without_scopes_is_forbidden_a064301(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    emu.add_token("bare", scopes=[])
    body = (await call(session, emu, {"token": "bare", "scopes": ["orders.read"]})).json()
    assert body["action"] == "FORBIDDEN"
    assert body["resultCode"] == "A064301"
    assert body["responseContent"].startswith('Bearer error="insufficient_scope",')
    # No scopes requested: no check.
    assert (await call(session, emu, {"token": "bare", "scopes": []})).json()["action"] == "OK"


async def test_unrecognised_scope_names_skip_the_check(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    # Facts §2/§9: ["a b"] is one (non-existent) scope name, dropped -> no scope check at all.
    emu.add_token("t", scopes=["profile"])
    body = (await call(session, emu, {"token": "t", "scopes": ["orders.read orders.write"]})).json()
    assert body["action"] == "OK"
    # With a service scope list, names outside it are dropped too; known ones are still checked.
    emu.known_scopes = frozenset({"profile", "orders.read"})
    assert (await call(session, emu, {"token": "t", "scopes": ["admin"]})).json()["action"] == "OK"
    denied = (await call(session, emu, {"token": "t", "scopes": ["admin", "orders.read"]})).json()
    assert denied["action"] == "FORBIDDEN"
    assert "'orders.read'" in denied["resultMessage"]


async def test_subject_checks(emu: Emulator, session: aiohttp.ClientSession) -> None:
    emu.add_token("t", subject="alice", scopes=["profile"])
    emu.add_token("svc", subject=None, scopes=["profile"])

    same = (await call(session, emu, {"token": "t", "subject": "alice"})).json()
    assert same["action"] == "OK"

    other = (await call(session, emu, {"token": "t", "subject": "mallory"})).json()
    assert other["action"] == "FORBIDDEN"
    assert other["resultCode"] == "A066302"
    assert other["responseContent"].startswith('Bearer error="invalid_request",')
    assert "#A066302" in other["responseContent"]
    assert other["sufficient"] is True

    none = (await call(session, emu, {"token": "svc", "subject": "alice"})).json()
    assert none["action"] == "FORBIDDEN"
    assert none["resultCode"] == "A066301"
    assert none["responseContent"].startswith('Bearer error="invalid_request",')


async def test_form_encoding(emu: Emulator, session: aiohttp.ClientSession) -> None:
    emu.add_token("t", subject="alice", scopes=["a", "b"])
    ok = await call(session, emu, data={"token": "t", "scopes": "a b", "subject": "alice"})
    assert ok.json()["action"] == "OK"
    missing = await call(session, emu, data={"token": "t", "scopes": "a c"})
    assert missing.json()["resultCode"] == "A064302"
    assert "'c'" in missing.json()["resultMessage"]
    assert (await call(session, emu, data={"token": "nope"})).json()["resultCode"] == "A057302"
    assert (await call(session, emu, data={"scopes": "a"})).json()["resultCode"] == "A057301"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b'{"token": 42}', "application/json"),
        (b'{"token": "t", "scopes": "a b"}', "application/json"),
        (b'{"token": "t", "subject": 1}', "application/json"),
        (b"token=t", "text/plain"),
        (b"token=\xff", "application/x-www-form-urlencoded"),
    ],
)
async def test_unparseable_body_is_400(
    emu: Emulator, session: aiohttp.ClientSession, body: bytes, content_type: str
) -> None:
    emu.add_token("t")
    headers = {**AUTH, "Content-Type": content_type}
    async with session.post(emu.base_url + PATH, data=body, headers=headers) as resp:
        assert resp.status == 400
        result = await resp.json()
    assert result["resultCode"] == "A001201"
    assert result["resultMessage"].startswith("[A001201] ")
    assert "action" not in result


# --------------------------------------------------------------------------- rate limiting


async def test_rate_limit_delta(session: aiohttp.ClientSession) -> None:
    emu = Emulator(rate_limit=(1, 2))
    await emu.start()
    try:
        emu.add_token("t")
        first = await call(session, emu, {"token": "t"})
        second = await call(session, emu, {"token": "t"})
        third = await call(session, emu, {"token": "t"})
    finally:
        await emu.stop()
    assert first.status == second.status == 200
    assert first.headers["X-RateLimit-Limit"] == "1"
    assert first.headers["X-RateLimit-Remaining"] == "1"
    assert second.headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(second.headers["X-RateLimit-Reset"]) <= 2
    assert "Retry-After" not in second.headers
    assert third.status == 429
    assert third.json() == {
        "resultCode": "A001429",
        "resultMessage": "[A001429] Too many requests.",
    }
    assert third.headers["Retry-After"] == "1"
    assert third.headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(third.headers["X-RateLimit-Reset"]) <= 2
    assert emu.throttled == 1
    assert emu.calls == 3


async def test_rate_limit_epoch_reset(session: aiohttp.ClientSession) -> None:
    emu = Emulator(rate_limit=(0.5, 1), reset_form="epoch")
    await emu.start()
    try:
        emu.add_token("t")
        ok = await call(session, emu, {"token": "t"})
        throttled = await call(session, emu, {"token": "t"})
    finally:
        await emu.stop()
    now = time.time()
    assert ok.status == 200
    assert ok.headers["X-RateLimit-Limit"] == "1"  # rates below 1/s are advertised as 1
    assert throttled.status == 429
    reset = int(throttled.headers["X-RateLimit-Reset"])
    assert now < reset <= math.ceil(now) + 3
    assert throttled.headers["Retry-After"] == "2"


async def test_rate_limit_counts_only_authenticated_calls_and_is_runtime_settable(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    emu.add_token("t")
    emu.rate_limit = (1, 1)
    for _ in range(3):
        unauth = await call(session, emu, {"token": "t"}, headers={})
        assert unauth.status == 401
        assert "X-RateLimit-Remaining" not in unauth.headers
    assert (await call(session, emu, {"token": "t"})).status == 200
    assert (await call(session, emu, {"token": "t"})).status == 429
    emu.rate_limit = (1, 1)  # setting it again refills the bucket
    assert (await call(session, emu, {"token": "t"})).status == 200
    emu.rate_limit = None
    free = await call(session, emu, {"token": "t"})
    assert free.status == 200
    assert "X-RateLimit-Limit" not in free.headers
    assert emu.throttled == 1


# --------------------------------------------------------------------------- latency and overrides


async def test_latency(emu: Emulator, session: aiohttp.ClientSession) -> None:
    emu.add_token("t")
    emu.latency = 0.2
    started = time.monotonic()
    reply = await call(session, emu, {"token": "t"})
    assert time.monotonic() - started >= 0.2
    assert reply.json()["action"] == "OK"


async def test_override_status_and_body_for_count_calls(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    emu.add_token("t")
    emu.override = Override(status=503, body=b"upstream down", content_type="text/plain", count=2)
    for _ in range(2):
        reply = await call(session, emu, {"token": "t"})
        assert reply.status == 503
        assert reply.body == b"upstream down"
        assert reply.headers["Content-Type"] == "text/plain"
    assert emu.override is None
    assert (await call(session, emu, {"token": "t"})).json()["action"] == "OK"
    assert emu.calls == 3


async def test_override_status_without_body_gets_result_body(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    emu.override = Override(status=500, count=1)
    reply = await call(session, emu, {"token": "t"})
    assert reply.status == 500
    assert reply.json()["resultCode"] == "A001101"


async def test_override_does_not_apply_to_unauthenticated_calls(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    emu.override = Override(status=500, count=1)
    assert (await call(session, emu, {"token": "t"}, headers={})).status == 401
    assert emu.override is not None
    assert emu.override.count == 1


async def test_override_headers_replace_computed_ones(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    emu.add_token("t")
    emu.rate_limit = (10, 10)
    emu.override = Override(
        status=429,
        headers={"Retry-After": "2", "x-ratelimit-remaining": "garbage"},
        count=1,
    )
    reply = await call(session, emu, {"token": "t"})
    assert reply.status == 429
    assert reply.headers["Retry-After"] == "2"
    assert reply.headers.getall("X-RateLimit-Remaining") == ["garbage"]
    assert reply.headers["X-RateLimit-Limit"] == "10"  # computed, not overridden
    assert reply.json()["resultCode"] == "A001429"
    assert emu.throttled == 0  # the emulator's own bucket did not throttle


async def test_override_delay_keeps_normal_answer(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    emu.add_token("t")
    emu.override = Override(delay=0.2, count=1)
    started = time.monotonic()
    reply = await call(session, emu, {"token": "t"})
    assert time.monotonic() - started >= 0.2
    assert reply.status == 200
    assert reply.json()["action"] == "OK"


async def test_override_reset_breaks_the_connection(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    emu.add_token("t")
    emu.override = Override(reset=True, count=1)
    with pytest.raises(aiohttp.ClientError):
        await call(session, emu, {"token": "t"})
    assert emu.calls == 1
    assert emu.calls_for("t") == 1
    # Only one call was affected; the server is still healthy.
    assert (await call(session, emu, {"token": "t"})).json()["action"] == "OK"


async def test_override_drip_sends_body_slowly(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    emu.override = Override(body=b'{"slow":1}', drip=0.04, count=1)
    started = time.monotonic()
    reply = await call(session, emu, {"token": "t"})
    assert time.monotonic() - started >= 10 * 0.04
    assert reply.status == 200
    assert reply.body == b'{"slow":1}'


async def test_override_drip_trips_a_client_read_timeout(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    emu.override = Override(body=b"x" * 50, drip=0.2, count=1)
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(
            emu.base_url + PATH,
            json={"token": "t"},
            headers=AUTH,
            timeout=aiohttp.ClientTimeout(sock_read=0.1),
        ) as resp:
            await resp.read()


# --------------------------------------------------------------------------- counting


async def test_calls_for_counts_per_token(emu: Emulator, session: aiohttp.ClientSession) -> None:
    emu.add_token("a")
    for _ in range(3):
        await call(session, emu, {"token": "a"})
    await call(session, emu, {"token": "b"})
    await call(session, emu, {})
    assert emu.calls_for("a") == 3
    assert emu.calls_for("b") == 1
    assert emu.calls_for("c") == 0
    assert emu.calls == 5
    assert len(emu.call_times) == 5
    assert emu.call_times == sorted(emu.call_times)
    assert emu.distinct_tokens_called == 2
    assert emu.max_calls_per_token == 3
    # Keys are SHA-256 digests, never the raw tokens.
    assert set(emu._calls_by_token) == {
        hashlib.sha256(b"a").digest(),
        hashlib.sha256(b"b").digest(),
    }
    emu.reset_stats()
    assert emu.calls == 0
    assert emu.call_times == []
    assert emu.calls_for("a") == 0


# --------------------------------------------------------------------------- control API


async def test_control_api_tokens_revoke_stats_reset(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    base = emu.base_url + "/_emulator"
    async with session.post(
        base + "/tokens",
        json={
            "token": "ctl",
            "subject": None,
            "client_id": 5,
            "scopes": ["x"],
            "lifetime": 60,
            "client_id_alias": "c5",
            "refreshable": True,
        },
    ) as resp:
        assert resp.status == 201
        stored = await resp.json()
    assert stored["token"] == "ctl"
    assert stored["subject"] is None
    assert stored["grant_type"] == "CLIENT_CREDENTIALS"
    assert stored["scopes"] == ["x"]
    body = (await call(session, emu, {"token": "ctl"})).json()
    assert body["action"] == "OK"
    assert body["clientId"] == 5
    assert body["clientIdAlias"] == "c5"

    async with session.post(
        base + "/tokens/bulk", json={"prefix": "bench-", "count": 100, "scopes": ["s"]}
    ) as resp:
        assert resp.status == 201
        assert (await resp.json())["created"] == 100
    assert (await call(session, emu, {"token": "bench-99", "scopes": ["s"]})).json()[
        "action"
    ] == "OK"
    assert (await call(session, emu, {"token": "bench-100"})).json()["resultCode"] == "A057302"
    await call(session, emu, {"token": "bench-99"})

    async with session.get(base + "/stats", params={"token": "bench-99"}) as resp:
        stats = await resp.json()
    assert stats == {
        "calls": 4,
        "throttled": 0,
        "tokens": 101,
        "distinct_tokens_called": 3,
        "max_calls_per_token": 2,
        "calls_for_token": 2,
    }

    async with session.post(base + "/revoke", json={"token": "ctl"}) as resp:
        assert await resp.json() == {"revoked": True}
    async with session.post(base + "/revoke", json={"token": "ctl"}) as resp:
        assert await resp.json() == {"revoked": False}
    assert (await call(session, emu, {"token": "ctl"})).json()["resultCode"] == "A057302"

    async with session.post(base + "/reset") as resp:
        assert resp.status == 200
    async with session.get(base + "/stats") as resp:
        stats = await resp.json()
    assert stats["calls"] == 0
    assert stats["distinct_tokens_called"] == 0
    assert "calls_for_token" not in stats
    assert stats["tokens"] == 100


async def test_control_api_config(emu: Emulator, session: aiohttp.ClientSession) -> None:
    base = emu.base_url + "/_emulator"
    emu.add_token("t")
    async with session.post(
        base + "/config",
        json={"latency": 0.01, "rate_limit": {"rate": 1, "burst": 1}, "reset_form": "epoch"},
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["rate_limit"] == {"rate": 1.0, "burst": 1}
    assert emu.latency == 0.01
    assert emu.rate_limit == (1.0, 1)
    assert emu.reset_form == "epoch"
    assert (await call(session, emu, {"token": "t"})).status == 200
    throttled = await call(session, emu, {"token": "t"})
    assert throttled.status == 429
    assert int(throttled.headers["X-RateLimit-Reset"]) > 1_000_000_000

    async with session.post(base + "/config", json={"rate_limit": None, "latency": 0}) as resp:
        assert resp.status == 200
    assert emu.rate_limit is None
    assert (await call(session, emu, {"token": "t"})).status == 200

    async with session.post(base + "/config", json={"latency": -1}) as resp:
        assert resp.status == 400
        assert "latency" in (await resp.json())["error"]
    async with session.post(base + "/config", json={"rate_limit": {"rate": 0}}) as resp:
        assert resp.status == 400
        assert "rate" in (await resp.json())["error"]
    assert emu.latency == 0


async def test_control_api_override(emu: Emulator, session: aiohttp.ClientSession) -> None:
    base = emu.base_url + "/_emulator"
    emu.add_token("t")
    async with session.post(
        base + "/override",
        json={"status": 502, "body": "bad gateway", "content_type": "text/plain", "count": 1},
    ) as resp:
        assert resp.status == 200
    assert emu.override == Override(
        status=502, body=b"bad gateway", content_type="text/plain", count=1
    )
    reply = await call(session, emu, {"token": "t"})
    assert reply.status == 502
    assert reply.body == b"bad gateway"
    assert (await call(session, emu, {"token": "t"})).status == 200

    async with session.post(base + "/override", json={"status": 500}) as resp:
        assert resp.status == 200
    assert (await call(session, emu, {"token": "t"})).status == 500
    assert (await call(session, emu, {"token": "t"})).status == 500  # no count: until cleared
    async with session.post(
        base + "/override", data=b"null", headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 200
    assert emu.override is None
    assert (await call(session, emu, {"token": "t"})).status == 200
    emu.override = Override(status=500)
    async with session.post(base + "/override") as resp:  # an empty body clears it too
        assert resp.status == 200
    assert emu.override is None

    async with session.post(base + "/override", json={"stauts": 500}) as resp:
        assert resp.status == 400
        assert "override.stauts" in (await resp.json())["error"]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"subject": "a"}, "token: must be a non-empty string"),
        ({"token": "x", "scopes": "a b"}, "scopes: must be a list of strings"),
        ({"token": "x", "client_id": "1"}, "client_id"),
        ({"token": "x", "lifetime": "soon"}, "lifetime"),
        ({"token": "x", "grant_type": "MAGIC"}, "grant_type"),
        ({"token": "x", "colour": "red"}, "colour: unknown key"),
    ],
)
async def test_control_api_token_validation(
    emu: Emulator, session: aiohttp.ClientSession, payload: dict[str, Any], fragment: str
) -> None:
    async with session.post(emu.base_url + "/_emulator/tokens", json=payload) as resp:
        assert resp.status == 400
        assert fragment in (await resp.json())["error"]
    assert emu.token_count == 0


# --------------------------------------------------------------------------- YAML tokens


async def test_load_demo_tokens(emu: Emulator, session: aiohttp.ClientSession) -> None:
    assert emu.load_tokens(DEMO_TOKENS_PATH) == 4
    valid = (await call(session, emu, {"token": "demo-valid-token"})).json()
    assert valid["action"] == "OK"
    assert valid["subject"] == "alice"
    assert valid["clientId"] == 1001
    assert valid["clientIdAlias"] == "demo-web"
    assert valid["scopes"] == ["orders.read", "orders.write", "profile"]
    assert valid["expiresAt"] > (time.time() + 86000) * 1000

    expired = (await call(session, emu, {"token": "demo-expired-token"})).json()
    assert expired["resultCode"] == "A065303"
    assert expired["subject"] == "bob"

    noscope = await call(session, emu, {"token": "demo-noscope-token", "scopes": ["orders.read"]})
    assert noscope.json()["resultCode"] == "A064302"

    service = (await call(session, emu, {"token": "demo-service-token"})).json()
    assert service["subject"] is None
    assert service["clientId"] == 2002
    assert service["grantType"] == "CLIENT_CREDENTIALS"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- token: a\n", "must be a mapping with a 'tokens' list"),
        ("tokens: {}\n", "tokens: must be a list"),
        ("tokens: []\nextra: 1\n", "extra: unknown key"),
        ("tokens:\n  - subject: a\n", "tokens[0].token: must be a non-empty string"),
        ("tokens:\n  - token: a\n", "tokens[0].subject: is required"),
        (
            "tokens:\n  - {token: a, subject: x}\n  - {token: b, subject: x}\n"
            "  - {token: c, subject: x, scopes: read}\n",
            "tokens[2].scopes: must be a list of strings",
        ),
        ("tokens:\n  - {token: a, subject: x, scopes: [1]}\n", "tokens[0].scopes"),
        ("tokens:\n  - {token: a, subject: x, scopes: ['a b']}\n", "not a valid scope name"),
        ("tokens:\n  - {token: a, subject: 3}\n", "tokens[0].subject: must be a string or null"),
        ("tokens:\n  - {token: a, subject: x, client_id: -1}\n", "tokens[0].client_id"),
        ("tokens:\n  - {token: a, subject: x, lifetime: soon}\n", "tokens[0].lifetime"),
        ("tokens:\n  - {token: a, subject: x, refreshable: 1}\n", "tokens[0].refreshable"),
        ("tokens:\n  - {token: a, subject: x, grant_type: X}\n", "tokens[0].grant_type"),
        ("tokens:\n  - {token: a, subject: x, expires: 1}\n", "tokens[0].expires: unknown key"),
        ("tokens:\n  - {token: a, subject: x}\n  - {token: a, subject: y}\n", "duplicate"),
        ("tokens:\n  - [a\n", "not valid YAML"),
        ("tokens:\n  - 5\n", "tokens[0]: must be a mapping"),
    ],
)
def test_load_tokens_validation(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    emu = Emulator()
    with pytest.raises(ValueError) as excinfo:
        emu.load_tokens(path)
    assert message in str(excinfo.value)
    assert emu.token_count == 0  # nothing is added from an invalid file


def test_load_tokens_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        Emulator().load_tokens(tmp_path / "absent.yaml")


# --------------------------------------------------------------------------- echo upstream


async def test_echo_reports_duplicates_raw_path_and_chunked_body_hash(
    session: aiohttp.ClientSession,
) -> None:
    runner, base_url = await start_echo()
    chunks = [b"a" * 1000, b"", b"b" * 70_000, b"tail"]

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk
            await asyncio.sleep(0)

    headers = CIMultiDict([("X-Dup", "one"), ("X-Other", "mid"), ("X-Dup", "two")])
    url = URL(base_url + "/some%2Fpath/x?b=1&a=%20&a=2", encoded=True)
    try:
        async with session.put(url, data=body(), headers=headers) as resp:
            assert resp.status == 200
            echoed = await resp.json()
        async with session.get(base_url + "/") as resp:
            empty = await resp.json()
    finally:
        await runner.cleanup()

    joined = b"".join(chunks)
    assert echoed["method"] == "PUT"
    assert echoed["path"] == "/some%2Fpath/x?b=1&a=%20&a=2"
    assert echoed["query"] == "b=1&a=%20&a=2"
    assert echoed["body_length"] == len(joined)
    assert echoed["body_sha256"] == hashlib.sha256(joined).hexdigest()
    names = [name.lower() for name, _ in echoed["headers"]]
    assert [v for n, v in echoed["headers"] if n.lower() == "x-dup"] == ["one", "two"]
    assert names.index("x-dup") < names.index("x-other")
    assert ["Transfer-Encoding", "chunked"] in echoed["headers"]

    assert empty["method"] == "GET"
    assert empty["body_length"] == 0
    assert empty["body_sha256"] == hashlib.sha256(b"").hexdigest()
