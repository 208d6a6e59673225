"""The shared HTTP/1.1 vocabulary as a unit: hop-by-hop names, header-name folding,
Connection tokens, reason phrases, status lines and the listener's closing JSON answers."""

from __future__ import annotations

import json
import time
from email.utils import parsedate_to_datetime

import pytest
from httptools import HttpResponseParser

from gateway import http
from gateway.http import (
    HOP_BY_HOP,
    HOP_BY_HOP_BYTES,
    IDEMPOTENT,
    closing_answer,
    connection_tokens,
    date_line,
    error_body,
    fold,
    status_line,
    valid_reason,
)


def test_hop_by_hop_names_are_rfc_9110s_plus_proxy_connection() -> None:
    assert {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    } == HOP_BY_HOP
    assert {n.encode() for n in HOP_BY_HOP} == HOP_BY_HOP_BYTES
    assert all(n == n.lower() for n in HOP_BY_HOP)


def test_idempotent_methods_exclude_post_patch_and_connect() -> None:
    assert {b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"} == IDEMPOTENT
    assert not IDEMPOTENT & {b"POST", b"PATCH", b"CONNECT", b"get"}


@pytest.mark.parametrize(
    ("name", "folded"),
    [
        ("X-Auth-Subject", "x-auth-subject"),
        ("X_Auth_Subject", "x-auth-subject"),
        ("x_AUTH-subject", "x-auth-subject"),
        ("X-Auth-Client_Id", "x-auth-client-id"),
        ("__", "--"),
        ("Plain", "plain"),
        ("", ""),
    ],
)
def test_fold_makes_case_and_underscore_spellings_one_name(name: str, folded: str) -> None:
    assert fold(name) == folded
    assert fold(folded) == folded  # idempotent


@pytest.mark.parametrize(
    ("values", "tokens"),
    [
        ([], set()),
        (["close"], {"close"}),
        (["Keep-Alive, X-Foo"], {"keep-alive", "x-foo"}),
        (["  X-A ,x-b,, ", "X-C"], {"x-a", "x-b", "x-c"}),
        ([" , ,", ""], set()),
        (["X-A", "x-a"], {"x-a"}),
    ],
)
def test_connection_tokens_are_trimmed_lowercased_and_non_empty(
    values: list[str], tokens: set[str]
) -> None:
    got = connection_tokens(values)
    assert isinstance(got, frozenset)
    assert got == tokens


def test_connection_tokens_accept_any_iterable() -> None:
    assert connection_tokens(v for v in ("a, B", "c")) == {"a", "b", "c"}


@pytest.mark.parametrize(
    "reason",
    [b"", b"OK", b"Not Found", b"with\ttab", b"caf\xe9", b"\x80\xff", b"~!@#$%^&*()"],
)
def test_valid_reasons(reason: bytes) -> None:
    assert valid_reason(reason)


@pytest.mark.parametrize(
    "reason",
    [b"\x00", b"O\rK", b"O\nK", b"bad\x7f", b"\x01", b"\x1f", b"OK\r\nX-Injected: 1"],
)
def test_invalid_reasons(reason: bytes) -> None:
    assert not valid_reason(reason)


@pytest.mark.parametrize(
    ("status", "reason", "line"),
    [
        (200, None, b"HTTP/1.1 200 OK\r\n"),
        (404, None, b"HTTP/1.1 404 Not Found\r\n"),
        (503, None, b"HTTP/1.1 503 Service Unavailable\r\n"),
        (200, b"", b"HTTP/1.1 200 OK\r\n"),
        (200, b"Fine Thanks", b"HTTP/1.1 200 Fine Thanks\r\n"),
        (299, None, b"HTTP/1.1 299 Unknown\r\n"),
        (299, b"Custom", b"HTTP/1.1 299 Custom\r\n"),
        (103, None, b"HTTP/1.1 103 Early Hints\r\n"),
        (418, None, b"HTTP/1.1 418 I'm a Teapot\r\n"),
    ],
)
def test_status_line(status: int, reason: bytes | None, line: bytes) -> None:
    assert status_line(status, reason) == line
    assert status_line(status, reason) == line  # the remembered copy is the same


def test_common_status_lines_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "_STATUS_LINES", {})
    assert status_line(204) is status_line(204)
    assert status_line(200, b"OK") is status_line(200, b"OK")


def test_a_custom_reason_does_not_change_the_default_line() -> None:
    assert status_line(201, b"Made It") == b"HTTP/1.1 201 Made It\r\n"
    assert status_line(201) == b"HTTP/1.1 201 Created\r\n"
    assert status_line(201, b"Made It") == b"HTTP/1.1 201 Made It\r\n"


def test_remembered_status_lines_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "_STATUS_LINES", {})
    for i in range(2000):  # an upstream inventing reasons cannot grow it without bound
        assert status_line(200, b"R%d" % i) == b"HTTP/1.1 200 R%d\r\n" % i
    assert len(http._STATUS_LINES) == 512
    assert status_line(200, b"R1999") == b"HTTP/1.1 200 R1999\r\n"  # still right, uncached


def test_error_body_is_oauth_style_json() -> None:
    body = error_body("invalid_request", 'A "quoted" \\ description: ü')
    assert json.loads(body) == {
        "error": "invalid_request",
        "error_description": 'A "quoted" \\ description: ü',
    }
    assert body.isascii()


class _Parsed:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


@pytest.mark.parametrize(
    ("status", "error", "description"),
    [
        (400, "invalid_request", "The request is not valid HTTP."),
        (408, "request_timeout", "The request headers took too long."),
        (431, "invalid_request", "The request headers are too large."),
        (503, "temporarily_unavailable", "Too many connections; try again."),
    ],
)
def test_closing_answer_is_one_whole_json_response_that_closes(
    status: int, error: str, description: str
) -> None:
    answer = closing_answer(status, error, description)
    assert answer.startswith(status_line(status))
    parsed = _Parsed()
    parser = HttpResponseParser(parsed)
    parser.feed_data(answer)
    assert parsed.complete  # Content-Length matches the body: nothing left over, nothing owed
    assert parser.get_status_code() == status
    assert not parser.should_keep_alive()
    headers = dict(parsed.headers)
    assert headers.pop(b"Date") == date_line()[len(b"Date: ") : -2]
    assert headers == {
        b"Content-Type": b"application/json",
        b"Content-Length": str(len(parsed.body)).encode(),
        b"Cache-Control": b"no-store",
        b"Connection": b"close",
    }
    assert json.loads(parsed.body) == {"error": error, "error_description": description}
    assert answer.endswith(b"\r\n\r\n" + error_body(error, description))


def test_date_line_is_an_imf_fixdate_of_now() -> None:
    line = date_line()
    assert line.startswith(b"Date: ") and line.endswith(b" GMT\r\n")
    when = parsedate_to_datetime(line[6:-2].decode())
    assert abs(when.timestamp() - time.time()) < 2
    assert date_line() is line or date_line()[6:-2] != line[6:-2]  # formatted once a second
