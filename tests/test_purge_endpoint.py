"""POST /cache/purge on the admin listener: who may call it, what it takes, what it answers.

The admin app runs on a real loopback socket; the purge behind it records its calls, so these
tests see exactly what reaches the cache side. The purge through a real gateway (a cached
token refused afterwards) is at the end of the file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

import gateway.admin
from gateway.admin import MAX_BODY, admin_app, parse_body
from gateway.emulator import Emulator
from gateway.metrics import Metrics
from gateway.purge import PurgeResult
from tests.conftest import StartGateway, raw_request, start_app

ADMIN = "admin-secret-0123456789abcdef"
LOCAL_ONE = PurgeResult(purged=1, fleet=False, shared=False)
TOKEN = "raw-access-token-ZZZ.must_not_leak~"
URL = "/cache/purge"


@dataclass
class Recorder:
    """A purge that records what it was asked and answers `result`."""

    result: PurgeResult = LOCAL_ONE
    calls: list[tuple[str, str]] = field(default_factory=list)
    error: Exception | None = None

    async def __call__(self, kind: str, value: str) -> PurgeResult:
        self.calls.append((kind, value))
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class Admin:
    url: str
    port: int
    purge: Recorder
    registry: CollectorRegistry
    session: aiohttp.ClientSession

    async def post(
        self, body: Any = None, *, raw: bytes | None = None, token: str | None = ADMIN
    ) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        data = raw if raw is not None else json.dumps(body).encode()
        async with self.session.post(self.url + URL, data=data, headers=headers) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text.startswith("{") else {}, resp.headers

    def count(self, kind: str) -> float:
        value = self.registry.get_sample_value("gateway_cache_purges_total", {"kind": kind})
        return -1.0 if value is None else value


@pytest.fixture
async def make_admin() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def make(
        admin_token: Any = ADMIN, purge: Recorder | None = None, with_purge: bool = True
    ) -> Admin:
        metrics = Metrics()
        registry, purges = metrics.registry, metrics.purges
        recorder = purge if purge is not None else Recorder()
        app = admin_app(
            registry,
            list,
            purge=recorder if with_purge else None,
            admin_token=admin_token,
            purges=purges,
        )
        runner, url, port = await start_app(app)
        runners.append(runner)
        session = aiohttp.ClientSession()
        sessions.append(session)
        return Admin(url, port, recorder, registry, session)

    try:
        yield make
    finally:
        for session in sessions:
            await session.close()
        for runner in runners:
            await runner.cleanup()


# --------------------------------------------------------------------------- who may call


@pytest.mark.parametrize("token", [None, ""])
async def test_without_an_admin_token_the_endpoint_does_not_exist(
    make_admin: Callable[..., Any], token: str | None
) -> None:
    admin = await make_admin(admin_token=token)
    for method in ("POST", "GET", "DELETE"):
        async with admin.session.request(
            method, admin.url + URL, json={"token": TOKEN}, headers={"Authorization": "Bearer x"}
        ) as resp:
            assert resp.status == 404
    async with admin.session.get(admin.url + "/nowhere") as resp:
        unknown = (resp.status, await resp.text())
    async with admin.session.post(admin.url + URL, json={"token": TOKEN}) as resp:
        assert (resp.status, await resp.text()) == unknown  # the same answer as any other path
    assert admin.purge.calls == []


async def test_without_a_purge_function_the_endpoint_does_not_exist(
    make_admin: Callable[..., Any],
) -> None:
    admin = await make_admin(with_purge=False)
    status, _, _ = await admin.post({"token": TOKEN})
    assert status == 404


async def test_other_methods_are_405(make_admin: Callable[..., Any]) -> None:
    admin = await make_admin()
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        async with admin.session.request(method, admin.url + URL) as resp:
            assert resp.status == 405, method
            assert resp.headers["Allow"] == "POST"
    assert admin.purge.calls == []


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Basic {ADMIN}",
        f"Bearer {ADMIN[:-1]}",  # one character short
        f"Bearer {ADMIN}x",
        f"Bearer {ADMIN.upper()}",
        f"Bearer {TOKEN}",
    ],
)
async def test_a_wrong_or_missing_admin_token_is_401_and_says_nothing_more(
    make_admin: Callable[..., Any], authorization: str | None
) -> None:
    admin = await make_admin()
    headers = {} if authorization is None else {"Authorization": authorization}
    async with admin.session.post(admin.url + URL, json={"token": TOKEN}, headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="gateway-admin"'
        body = await resp.json()
    # The same answer however close the guess was.
    assert body == {"error": "unauthorized", "detail": "send the admin token as a Bearer token"}
    assert admin.purge.calls == []


async def test_two_authorization_headers_are_401(make_admin: Callable[..., Any]) -> None:
    admin = await make_admin()
    body = json.dumps({"token": TOKEN}).encode()
    request = (
        f"POST {URL} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        f"Authorization: Bearer {ADMIN}\r\nAuthorization: Bearer {ADMIN}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    resp = await raw_request(admin.port, request)
    assert resp.status == 401
    assert admin.purge.calls == []


async def test_the_scheme_is_case_insensitive(make_admin: Callable[..., Any]) -> None:
    admin = await make_admin()
    async with admin.session.post(
        admin.url + URL, json={"subject": "alice"}, headers={"Authorization": f"bearer {ADMIN}"}
    ) as resp:
        assert resp.status == 200


async def test_the_admin_token_in_force_is_asked_each_time(make_admin: Callable[..., Any]) -> None:
    """A function as admin_token: a reload that changes the secret applies at once."""
    current = [ADMIN]
    admin = await make_admin(admin_token=lambda: current[0])
    assert (await admin.post({"subject": "a"}))[0] == 200
    current[0] = "another-admin-secret-0123456789"
    assert (await admin.post({"subject": "a"}))[0] == 401
    assert (await admin.post({"subject": "a"}, token=current[0]))[0] == 200
    current[0] = ""  # unset by the reload: the endpoint is gone
    assert (await admin.post({"subject": "a"}, token=ADMIN))[0] == 404


# --------------------------------------------------------------------------- what it takes


@pytest.mark.parametrize(
    ("body", "call"),
    [
        ({"token": TOKEN}, ("token", TOKEN)),
        ({"token": "abc=="}, ("token", "abc==")),
        ({"token_sha256": "AB" * 32}, ("token_sha256", "ab" * 32)),
        ({"token_sha256": "0f" * 32}, ("token_sha256", "0f" * 32)),
        ({"subject": "alice@example.com"}, ("subject", "alice@example.com")),
        ({"subject": "Ünïcödé sübject"}, ("subject", "Ünïcödé sübject")),
        ({"client_id": 42}, ("client_id", "42")),
        ({"client_id": "42"}, ("client_id", "42")),
        ({"client_id": "0042"}, ("client_id", "42")),
        ({"client_id": 0}, ("client_id", "0")),
        ({"client_id": 2**63 - 1}, ("client_id", str(2**63 - 1))),
    ],
)
async def test_each_kind_reaches_the_purge_normalised(
    make_admin: Callable[..., Any], body: dict[str, Any], call: tuple[str, str]
) -> None:
    admin = await make_admin(purge=Recorder(PurgeResult(purged=3, fleet=False, shared=False)))
    status, answer, headers = await admin.post(body)
    assert status == 200
    assert answer == {"purged": 3, "kind": call[0], "fleet": False}
    assert headers["Cache-Control"] == "no-store"
    assert admin.purge.calls == [call]


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"", "not_json"),
        (b"   ", "not_json"),
        (b"token=abc", "not_json"),
        (b'{"token": "abc"', "not_json"),
        (b'{"subject": "\xff\xfe"}', "not_json"),  # not UTF-8
        (b"[" * 5000 + b"]" * 5000, "not_json"),  # deeper than the parser goes
        (b"[]", "not_object"),
        (b'"token"', "not_object"),
        (b"null", "not_object"),
        (b"{}", "no_kind"),
        (b'{"token": "a", "subject": "b"}', "several_kinds"),
        (b'{"token": "a", "token": "b"}', "duplicate_key"),
        (b'{"tokens": "a"}', "unknown_key"),
        (b'{"token": "a", "why": "revoked"}', "unknown_key"),
        (b'{"token": 12}', "bad_value"),
        (b'{"token": ""}', "bad_value"),
        (b'{"token": "has space"}', "bad_value"),
        (b'{"token": "Bearer abc"}', "bad_value"),
        (b'{"token": "abc\\n"}', "bad_value"),
        (b'{"token": "=abc"}', "bad_value"),
        (b'{"token": null}', "bad_value"),
        (b'{"token_sha256": "abc"}', "bad_value"),
        (b'{"token_sha256": "' + b"g" * 64 + b'"}', "bad_value"),
        (b'{"token_sha256": "' + b"a" * 65 + b'"}', "bad_value"),
        (b'{"subject": ""}', "bad_value"),
        (b'{"subject": 7}', "bad_value"),
        (b'{"subject": ["a"]}', "bad_value"),
        (b'{"subject": "\\ud800"}', "bad_value"),  # a lone surrogate
        (b'{"client_id": true}', "bad_value"),
        (b'{"client_id": 1.0}', "bad_value"),
        (b'{"client_id": -1}', "bad_value"),
        (b'{"client_id": "-1"}', "bad_value"),
        (b'{"client_id": " 1"}', "bad_value"),
        (b'{"client_id": "1e3"}', "bad_value"),
        (b'{"client_id": "\xd9\xa3"}', "bad_value"),  # ARABIC-INDIC DIGIT THREE
        (b'{"client_id": ""}', "bad_value"),
        (b'{"client_id": 9223372036854775808}', "bad_value"),
        (b'{"client_id": "99999999999999999999"}', "bad_value"),
        (b'{"client_id": "' + b"1" * 5000 + b'"}', "bad_value"),
    ],
)
async def test_a_bad_body_is_400_naming_the_problem(
    make_admin: Callable[..., Any], raw: bytes, error: str
) -> None:
    admin = await make_admin()
    status, answer, _ = await admin.post(raw=raw)
    assert status == 400, answer
    assert answer["error"] == error
    assert isinstance(answer["detail"], str) and answer["detail"]
    assert admin.purge.calls == []


async def test_a_400_never_echoes_what_it_was_sent(make_admin: Callable[..., Any]) -> None:
    admin = await make_admin()
    for body in (
        {TOKEN: "x"},  # a token as a key
        {"subject": TOKEN, "token": TOKEN},
        {"token": TOKEN + " "},
        {"token_sha256": TOKEN},
        {"client_id": TOKEN},
        {"token": [TOKEN]},
    ):
        status, answer, _ = await admin.post(body)
        assert status == 400
        assert TOKEN not in json.dumps(answer)
        assert "must_not_leak" not in json.dumps(answer)


async def test_a_body_over_16_kib_is_refused(make_admin: Callable[..., Any]) -> None:
    admin = await make_admin()
    padded = b'{"subject": "' + b"a" * MAX_BODY + b'"}'
    status, answer, _ = await admin.post(raw=padded)
    assert (status, answer["error"]) == (400, "too_large")

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to go by
        yield b'{"subject": "'
        for _ in range(20):
            yield b"a" * 1024
        yield b'"}'

    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with admin.session.post(admin.url + URL, data=chunks(), headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "too_large"
    # Right at the limit is fine.
    exact = b'{"subject": "' + b"a" * (MAX_BODY - 15) + b'"}'
    assert len(exact) == MAX_BODY
    assert (await admin.post(raw=exact))[0] == 200
    assert [kind for kind, _ in admin.purge.calls] == ["subject"]


async def test_a_body_that_does_not_arrive_is_408(
    make_admin: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.admin, "_BODY_TIMEOUT", 0.3)
    admin = await make_admin()
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    try:
        writer.write(
            (
                f"POST {URL} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {ADMIN}\r\n"
                "Content-Length: 20\r\n\r\n{"
            ).encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 408 ")
    finally:
        writer.close()
    assert admin.purge.calls == []


def test_parse_body_is_the_whole_contract() -> None:
    """The same parser serves the supervisor of --workers: spot checks without HTTP."""
    assert parse_body(b'{"client_id":"007"}') == ("client_id", "7")
    assert parse_body(b'{"token_sha256":"' + b"F" * 64 + b'"}') == ("token_sha256", "f" * 64)
    assert parse_body(b'\n{"subject":"a b"}\n') == ("subject", "a b")


# --------------------------------------------------------------------------- what it answers


async def test_fleet_true_when_the_purge_reached_the_fleet(make_admin: Callable[..., Any]) -> None:
    admin = await make_admin(purge=Recorder(PurgeResult(purged=5, fleet=True, shared=True)))
    status, answer, _ = await admin.post({"client_id": 7})
    assert (status, answer) == (200, {"purged": 5, "kind": "client_id", "fleet": True})


async def test_shared_state_unreachable_is_503_with_retry_after(
    make_admin: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    admin = await make_admin(purge=Recorder(PurgeResult(purged=2, fleet=False, shared=True)))
    with caplog.at_level(logging.INFO, logger="gateway.admin"):
        status, answer, headers = await admin.post({"token": TOKEN})
    assert status == 503
    assert answer == {"error": "shared_unavailable", "purged": 2, "kind": "token", "fleet": False}
    assert headers["Retry-After"] == "1"
    assert admin.count("token") == 1  # the local purge was done and counts
    assert "shared state unreachable" in caplog.text
    assert TOKEN not in caplog.text


async def test_a_purge_that_fails_is_500_and_leaks_nothing(
    make_admin: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    admin = await make_admin(purge=Recorder(error=ValueError(f"no such token {TOKEN}")))
    with caplog.at_level(logging.DEBUG):
        status, answer, _ = await admin.post({"token": TOKEN})
    assert status == 500
    assert answer["error"] == "purge_failed"
    assert TOKEN not in json.dumps(answer)
    assert "ValueError" in caplog.text
    assert TOKEN not in caplog.text
    assert admin.count("token") == 0


async def test_one_log_line_per_purge_without_the_token(
    make_admin: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    admin = await make_admin()
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    with caplog.at_level(logging.DEBUG):
        for body in ({"token": TOKEN}, {"token_sha256": digest}, {"subject": "s"}):
            assert (await admin.post(body))[0] == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.admin"]
    assert lines == [
        "cache purge: kind=token, 1 entries",
        "cache purge: kind=token_sha256, 1 entries",
        "cache purge: kind=subject, 1 entries",
    ]
    assert TOKEN not in caplog.text and digest not in caplog.text


async def test_purges_are_counted_by_kind_from_zero(make_admin: Callable[..., Any]) -> None:
    admin = await make_admin()
    text = generate_latest(admin.registry).decode()
    for kind in ("token", "token_sha256", "subject", "client_id"):
        assert f'gateway_cache_purges_total{{kind="{kind}"}} 0.0' in text
    await admin.post({"subject": "a"})
    await admin.post({"subject": "b"})
    await admin.post({"client_id": 1})
    await admin.post({"client_id": True})  # a 400 counts nothing
    await admin.post({"subject": "c"}, token="wrong")  # nor does a 401
    assert [admin.count(k) for k in ("token", "token_sha256", "subject", "client_id")] == [
        0,
        0,
        2,
        1,
    ]


async def test_a_client_that_hangs_up_does_not_cut_the_purge_short(
    make_admin: Callable[..., Any],
) -> None:
    finished = asyncio.Event()

    class Slow(Recorder):
        async def __call__(self, kind: str, value: str) -> PurgeResult:
            await asyncio.sleep(0.3)
            finished.set()
            return await super().__call__(kind, value)

    admin = await make_admin(purge=Slow())
    body = json.dumps({"subject": "a"}).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    writer.write(
        (
            f"POST {URL} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {ADMIN}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    await asyncio.wait_for(finished.wait(), 5)
    assert admin.purge.calls == [("subject", "a")]


# --------------------------------------------------------------------------- through a gateway


def _routes(upstream: str) -> list[dict[str, Any]]:
    return [{"name": "api", "path_prefix": "/", "upstream": upstream}]


async def _status(client: aiohttp.ClientSession, url: str, token: str) -> int:
    async with client.get(f"{url}/x", headers={"Authorization": f"Bearer {token}"}) as resp:
        await resp.read()
        return resp.status


async def _purge_at(
    client: aiohttp.ClientSession, admin_url: str, body: dict[str, Any], token: str = ADMIN
) -> tuple[int, Any]:
    async with client.post(
        f"{admin_url}{URL}", json=body, headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text.startswith("{") else text


@pytest.mark.parametrize("kind", ["token", "token_sha256", "subject", "client_id"])
async def test_a_purged_token_is_refused_at_once(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    kind: str,
) -> None:
    """Revoked at Authlete, still cached (200), purged: the next request asks Authlete and is
    refused. Tokens of another subject and client stay cached."""
    revoked = f"purge-{kind}-revoked"
    sibling = f"purge-{kind}-sibling"  # same subject and client as `revoked`
    other = f"purge-{kind}-other"
    emulator.add_token(revoked, subject="mallory", client_id=4242)
    emulator.add_token(sibling, subject="mallory", client_id=4242)
    emulator.add_token(other, subject="bob", client_id=7)
    gw = await start_gateway(_routes(upstream), admin={"token": ADMIN})
    for token in (revoked, sibling, other):
        assert await _status(client, gw.url, token) == 200
    emulator.revoke(revoked)
    assert await _status(client, gw.url, revoked) == 200  # cached: the revocation is not seen
    value: Any = {
        "token": revoked,
        "token_sha256": hashlib.sha256(revoked.encode()).hexdigest().upper(),
        "subject": "mallory",
        "client_id": "4242",
    }[kind]
    status, answer = await _purge_at(client, gw.admin_url, {kind: value})
    by_token = kind in ("token", "token_sha256")
    assert status == 200, answer
    assert answer == {"purged": 1 if by_token else 2, "kind": kind, "fleet": False}
    assert await _status(client, gw.url, revoked) == 401
    assert emulator.calls_for(revoked) == 2
    assert await _status(client, gw.url, sibling) == 200
    assert emulator.calls_for(sibling) == (1 if by_token else 2)
    assert await _status(client, gw.url, other) == 200
    assert emulator.calls_for(other) == 1  # untouched
    async with client.get(f"{gw.admin_url}/metrics") as resp:
        text = await resp.text()
    assert f'gateway_cache_purges_total{{kind="{kind}"}} 1.0' in text


async def test_a_gateway_without_an_admin_token_has_no_purge(
    upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(_routes(upstream))
    status, _ = await _purge_at(client, gw.admin_url, {"subject": "alice"})
    assert status == 404


async def test_a_gateway_checks_the_admin_token(
    upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(_routes(upstream), admin={"token": ADMIN})
    status, _ = await _purge_at(client, gw.admin_url, {"subject": "alice"}, token=ADMIN[:-1])
    assert status == 401
    status, answer = await _purge_at(client, gw.admin_url, {"subject": "alice"})
    assert (status, answer) == (200, {"purged": 0, "kind": "subject", "fleet": False})
