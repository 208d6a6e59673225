"""RFC 6750 section 2.1 token extraction, alone and through a running gateway.

Missing token or another scheme: 401 with a bare `Bearer realm=...` challenge. A Bearer
header we cannot use: 400 `Bearer error="invalid_request"`. Neither calls Authlete.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.bearer import NoToken, extract
from gateway.emulator import Emulator
from tests.conftest import RawResponse, StartGateway, raw_request

B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
MISSING, MALFORMED, TOO_LONG = NoToken.MISSING, NoToken.MALFORMED, NoToken.TOO_LONG
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"

# (Authorization header values, max_len, expected)
CASES: list[tuple[list[str], int, str | NoToken]] = [
    # no header, or another scheme
    ([], 4096, MISSING),
    (["Basic dXNlcjpwYXNz"], 4096, MISSING),
    (["Digest username=x"], 4096, MISSING),
    (["Token abc"], 4096, MISSING),
    (["Bearerabc"], 4096, MISSING),  # a different scheme name, not Bearer
    (["Basic"], 4096, MISSING),
    # the scheme is case-insensitive; one or more spaces
    (["Bearer abc"], 4096, "abc"),
    (["bearer abc"], 4096, "abc"),
    (["BEARER abc"], 4096, "abc"),
    (["BeArEr abc"], 4096, "abc"),
    (["Bearer  abc"], 4096, "abc"),
    (["Bearer      abc"], 4096, "abc"),
    # the token is case-sensitive and kept verbatim
    (["Bearer AbC"], 4096, "AbC"),
    # every b64token character, trailing '=' padding
    (["Bearer azAZ09-._~+/"], 4096, "azAZ09-._~+/"),
    (["Bearer abc="], 4096, "abc="),
    (["Bearer abc=="], 4096, "abc=="),
    (["Bearer " + JWT], 4096, JWT),
    # empty token
    (["Bearer"], 4096, MALFORMED),
    (["bearer"], 4096, MALFORMED),
    (["Bearer "], 4096, MALFORMED),
    (["Bearer    "], 4096, MALFORMED),
    # illegal characters
    (["Bearer a,b"], 4096, MALFORMED),
    (["Bearer a;b"], 4096, MALFORMED),
    (['Bearer "abc"'], 4096, MALFORMED),
    (["Bearer a=b"], 4096, MALFORMED),  # '=' only at the end
    (["Bearer ="], 4096, MALFORMED),
    (["Bearer ==="], 4096, MALFORMED),
    (["Bearer a:b"], 4096, MALFORMED),
    (["Bearer a\\b"], 4096, MALFORMED),
    (["Bearer a@b"], 4096, MALFORMED),
    (["Bearer ab%20"], 4096, MALFORMED),
    (["Bearer caf\u00e9"], 4096, MALFORMED),
    (["Bearer a\x00b"], 4096, MALFORMED),
    (["Bearer a\x7fb"], 4096, MALFORMED),
    (['Bearer realm="x"'], 4096, MALFORMED),
    # two tokens
    (["Bearer abc def"], 4096, MALFORMED),
    (["Bearer abc, Bearer def"], 4096, MALFORMED),
    # tab separator (RFC 6750 allows only SP)
    (["Bearer\tabc"], 4096, MALFORMED),
    (["Bearer \tabc"], 4096, MALFORMED),
    (["Bearer abc\tdef"], 4096, MALFORMED),
    # several Authorization headers, whatever they hold
    (["Bearer abc", "Bearer abc"], 4096, MALFORMED),
    (["Bearer abc", "Bearer def"], 4096, MALFORMED),
    (["Bearer abc", "Basic dXNlcjpwYXNz"], 4096, MALFORMED),
    (["Basic dXNlcjpwYXNz", "Bearer abc"], 4096, MALFORMED),
    (["Basic a", "Basic b"], 4096, MALFORMED),
    # length
    (["Bearer " + "a" * 16], 16, "a" * 16),
    (["Bearer " + "a" * 17], 16, TOO_LONG),
    (["Bearer " + "a" * 4096], 4096, "a" * 4096),
    (["Bearer " + "a" * 4097], 4096, TOO_LONG),
    (["Bearer " + "a" * 100_000], 4096, TOO_LONG),
]


def _case_id(values: list[str], max_len: int, expected: str | NoToken) -> str:
    shown = repr(values)
    if len(shown) > 60:
        shown = shown[:40] + f"...len={sum(map(len, values))}"
    return f"{shown}-{max_len}"


@pytest.mark.parametrize(
    ("values", "max_len", "expected"),
    CASES,
    ids=[_case_id(*case) for case in CASES],
)
def test_extract(values: list[str], max_len: int, expected: str | NoToken) -> None:
    assert extract(values, max_len) == expected


def test_extract_accepts_any_sequence() -> None:
    assert extract(("Bearer abc",), 4096) == "abc"
    assert extract((), 4096) is NoToken.MISSING


# --------------------------------------------------------------------------- property

_B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/"
_SCHEMES = st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR", "Basic", "Bearer,", ""])
_SEPARATORS = st.sampled_from(["", " ", "  ", "\t", " \t", "       "])
_TOKENISH = st.one_of(
    st.text(alphabet=_B64_ALPHABET + "=", max_size=40),
    st.text(alphabet=_B64_ALPHABET + "= ,;\"'\\\t\x00\u00e9", max_size=40),
    st.text(max_size=40),
)
_HEADER = st.one_of(
    st.builds(lambda a, b, c: a + b + c, _SCHEMES, _SEPARATORS, _TOKENISH),
    st.text(max_size=60),
)


@settings(max_examples=2000, deadline=None)
@given(st.lists(_HEADER, max_size=3), st.integers(min_value=1, max_value=64))
@example(["Bearer abc"], 3)
@example(["Bearer ab="], 3)
@example(["bearer   x=="], 16)
def test_extract_property(values: list[str], max_len: int) -> None:
    result = extract(values, max_len)  # never raises
    assert isinstance(result, (str, NoToken))
    if isinstance(result, str):
        assert B64TOKEN.match(result), result
        assert len(result) <= max_len
        assert len(values) == 1
        header = values[0]
        assert header.endswith(result)
        scheme_and_space = header[: len(header) - len(result)]
        assert scheme_and_space.lower().startswith("bearer ")
        assert scheme_and_space[len("bearer") :].strip(" ") == ""
    elif not values:
        assert result is NoToken.MISSING
    elif len(values) > 1:
        assert result is NoToken.MALFORMED


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(["Bearer", "bearer", "BEARER", "BeArer"]),
    st.integers(min_value=1, max_value=5),
    st.text(alphabet=_B64_ALPHABET, min_size=1, max_size=50),
    st.text(alphabet="=", max_size=3),
)
def test_extract_valid_tokens_round_trip(scheme: str, spaces: int, body: str, pad: str) -> None:
    token = body + pad
    assert extract([scheme + " " * spaces + token], 4096) == token
    assert extract([scheme + " " * spaces + token], len(token)) == token
    if len(token) > 1:
        assert extract([scheme + " " * spaces + token], len(token) - 1) is NoToken.TOO_LONG


# --------------------------------------------------------------------------- end to end

GOOD = "bearer-test-valid-token"
MISSING_CHALLENGE = 'Bearer realm="test"'
MALFORMED_CHALLENGE = 'Bearer error="invalid_request"'


@pytest.fixture
async def port(start_gateway: StartGateway, upstream: str, emulator: Emulator) -> int:
    emulator.add_token(GOOD, scopes=["orders.read"])
    running = await start_gateway(
        [
            {
                "name": "orders",
                "path_prefix": "/orders",
                "upstream": upstream,
                "scopes": ["orders.read"],
            }
        ]
    )
    return running.port


async def _send(port: int, auth_lines: list[str]) -> RawResponse:
    """GET /orders/1 with the given raw `Authorization` header lines (any number)."""
    lines = ["GET /orders/1 HTTP/1.1", "Host: gateway.test", "Connection: close"]
    lines += auth_lines
    return await raw_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def _assert_denial(resp: RawResponse, status: int, challenge: str) -> dict[str, Any]:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.header("WWW-Authenticate") == challenge
    assert resp.header("Cache-Control") == "no-store"
    content_type = resp.header("Content-Type") or ""
    assert content_type.split(";")[0].strip() == "application/json"
    body: dict[str, Any] = json.loads(resp.body)
    assert isinstance(body.get("error"), str)
    assert body["error"]
    assert isinstance(body.get("error_description"), str)
    # the challenge header is present exactly once
    assert [k.lower() for k, _ in resp.headers].count("www-authenticate") == 1
    return body


MISSING_E2E: list[list[str]] = [
    [],
    ["Authorization: Basic dXNlcjpwYXNz"],
    ["Authorization: Digest username=x"],
    ["Authorization: Bearerabc"],
]


@pytest.mark.parametrize("auth", MISSING_E2E, ids=repr)
async def test_missing_token_401_bare_challenge(
    port: int, emulator: Emulator, auth: list[str]
) -> None:
    resp = await _send(port, auth)
    body = _assert_denial(resp, 401, MISSING_CHALLENGE)
    assert "error=" not in (resp.header("WWW-Authenticate") or "")
    assert body["error"] != "invalid_request"
    assert emulator.calls == 0


MALFORMED_E2E: list[list[str]] = [
    ["Authorization: Bearer"],
    ["Authorization: Bearer "],
    ["Authorization: bearer"],
    ["Authorization: Bearer a,b"],
    ['Authorization: Bearer "abc"'],
    ["Authorization: Bearer a=b"],
    ["Authorization: Bearer ==="],
    ["Authorization: Bearer ab\\c"],
    ["Authorization: Bearer abc def"],
    [f"Authorization: Bearer {GOOD} {GOOD}"],
    [f"Authorization: Bearer\t{GOOD}"],
    [f"Authorization: Bearer {GOOD}", f"Authorization: Bearer {GOOD}"],
    [f"Authorization: Bearer {GOOD}", "Authorization: Bearer other"],
    [f"Authorization: Bearer {GOOD}", "Authorization: Basic dXNlcjpwYXNz"],
    ["Authorization: Basic dXNlcjpwYXNz", f"Authorization: Bearer {GOOD}"],
    [f"authorization: Bearer {GOOD}", f"AUTHORIZATION: Bearer {GOOD}"],
    ["Authorization:", f"Authorization: Bearer {GOOD}"],
    [f"Authorization: Bearer {GOOD}", "Authorization: "],
]


@pytest.mark.parametrize("auth", MALFORMED_E2E, ids=repr)
async def test_malformed_bearer_400_invalid_request(
    port: int, emulator: Emulator, auth: list[str]
) -> None:
    resp = await _send(port, auth)
    body = _assert_denial(resp, 400, MALFORMED_CHALLENGE)
    assert body["error"] == "invalid_request"
    assert emulator.calls == 0


async def test_too_long_token_400_without_lookup(port: int, emulator: Emulator) -> None:
    long_token = "a" * 4097  # default max_token_bytes is 4096
    emulator.add_token(long_token, scopes=["orders.read"])
    resp = await _send(port, [f"Authorization: Bearer {long_token}"])
    body = _assert_denial(resp, 400, MALFORMED_CHALLENGE)
    assert body["error"] == "invalid_request"
    assert emulator.calls == 0


async def test_token_at_the_limit_is_looked_up(port: int, emulator: Emulator) -> None:
    token = "b" * 4096
    emulator.add_token(token, scopes=["orders.read"])
    resp = await _send(port, [f"Authorization: Bearer {token}"])
    assert resp.status == 200, resp.body
    assert emulator.calls == 1


async def test_max_token_bytes_is_configurable(
    start_gateway: StartGateway, upstream: str, emulator: Emulator
) -> None:
    running = await start_gateway(
        [{"name": "orders", "path_prefix": "/orders", "upstream": upstream}],
        max_token_bytes=32,
    )
    emulator.add_token("c" * 32)
    emulator.add_token("c" * 33)
    ok = await _send(running.port, ["Authorization: Bearer " + "c" * 32])
    assert ok.status == 200, ok.body
    assert emulator.calls == 1
    too_long = await _send(running.port, ["Authorization: Bearer " + "c" * 33])
    _assert_denial(too_long, 400, MALFORMED_CHALLENGE)
    assert emulator.calls == 1


VALID_E2E: list[str] = [
    f"Authorization: Bearer {GOOD}",
    f"Authorization: bearer {GOOD}",
    f"Authorization: BEARER {GOOD}",
    f"Authorization: Bearer    {GOOD}",
    f"authorization: Bearer {GOOD}",
]


@pytest.mark.parametrize("auth", VALID_E2E)
async def test_valid_bearer_forms_reach_upstream(port: int, emulator: Emulator, auth: str) -> None:
    resp = await _send(port, [auth])
    assert resp.status == 200, resp.body
    assert emulator.calls == 1
    assert emulator.calls_for(GOOD) == 1


async def test_realm_comes_from_config(
    start_gateway: StartGateway, upstream: str, emulator: Emulator
) -> None:
    running = await start_gateway(
        [{"name": "orders", "path_prefix": "/orders", "upstream": upstream}],
        realm="orders-api",
    )
    resp = await _send(running.port, [])
    _assert_denial(resp, 401, 'Bearer realm="orders-api"')
    assert emulator.calls == 0


async def test_public_route_ignores_authorization(
    start_gateway: StartGateway, upstream: str, emulator: Emulator
) -> None:
    running = await start_gateway(
        [{"name": "public", "path_prefix": "/orders", "upstream": upstream, "auth": "none"}]
    )
    resp = await _send(running.port, ["Authorization: Bearer a,b", "Authorization: Basic x"])
    assert resp.status == 200, resp.body
    assert emulator.calls == 0
