"""HTTP/1.1 vocabulary shared by the config, the listener, the upstream client and the proxy:
hop-by-hop names, header-name folding, status lines and the error answers the listener
writes before any route is known."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus

# Meaningful for one connection only (RFC 9110 section 7.6.1): never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)

# Both sides read into this one buffer, at most 64 KiB at a time (asyncio.BufferedProtocol):
# it is filled and parsed within one callback and llhttp hands out copies, so one buffer
# serves every connection; what a connection holds in flight stays small whatever the kernel
# has ready, and no read allocates.
READ_BUFFER = memoryview(bytearray(64 * 1024))

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# A reason phrase: HTAB, SP, VCHAR and obs-text, nothing else (RFC 9112 section 4).
_REASON = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


def fold(name: str) -> str:
    """`X_Auth_Subject` and `x-auth-subject` reach many frameworks as the same name."""
    return name.lower().replace("_", "-")


def connection_tokens(values: Iterable[str]) -> frozenset[str]:
    """Header names listed in Connection are hop-by-hop for this message only."""
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def valid_reason(reason: bytes) -> bool:
    return _REASON.fullmatch(reason) is not None


_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def status_line(status: int, reason: bytes | None = None) -> bytes:
    """`HTTP/1.1 <status> <reason>\\r\\n`, remembered for the common pairs."""
    key = (status, reason or b"")
    line = _STATUS_LINES.get(key)
    if line is None:
        if not reason:
            try:
                reason = HTTPStatus(status).phrase.encode()
            except ValueError:
                reason = b"Unknown"
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_STATUS_LINES) < 512:
            _STATUS_LINES[key] = line
    return line


_date: dict[int, bytes] = {}  # the current second -> its Date line


def date_line() -> bytes:
    """`Date: <IMF-fixdate>\r\n` for the gateway's own answers, formatted once a second."""
    now = int(time.time())
    line = _date.get(now)
    if line is None:
        _date.clear()
        line = _date[now] = b"Date: %s\r\n" % formatdate(now, usegmt=True).encode()
    return line


def error_body(error: str, description: str) -> bytes:
    return json.dumps({"error": error, "error_description": description}).encode()


def closing_answer(status: int, error: str, description: str) -> bytes:
    """A whole JSON error answer after which the connection is closed."""
    body = error_body(error, description)
    return (
        status_line(status)
        + date_line()
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n"
        b"Cache-Control: no-store\r\nConnection: close\r\n\r\n" % len(body) + body
    )
