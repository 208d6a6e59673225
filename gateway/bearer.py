"""RFC 6750 section 2.1 token extraction. No I/O: headers in, a token or a reason out."""

from __future__ import annotations

import enum
from collections.abc import Sequence

# b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/")


class NoToken(enum.Enum):
    MISSING = "missing"  # no Authorization, or another scheme: 401 with a bare challenge
    MALFORMED = "malformed"  # a Bearer header we cannot use: 400 invalid_request
    TOO_LONG = "too_long"  # over max_token_bytes: 400 before any lookup


def extract(values: Sequence[str], max_len: int) -> str | NoToken:
    """Return the bearer token from the request's Authorization header values."""
    if not values:
        return NoToken.MISSING
    if len(values) > 1:
        # Several Authorization headers are ambiguous whatever their schemes are.
        return NoToken.MALFORMED
    value = values[0]
    cut = len(value)
    for i, ch in enumerate(value):
        if ch in " \t":
            cut = i
            break
    if value[:cut].lower() != "bearer":
        return NoToken.MISSING
    if value[cut : cut + 1] == "\t":
        return NoToken.MALFORMED  # RFC 6750 allows only spaces after the scheme
    token = value[cut:].lstrip(" ")
    if not token:
        return NoToken.MALFORMED
    if len(token) > max_len:
        return NoToken.TOO_LONG
    return token if _is_b64token(token) else NoToken.MALFORMED


def _is_b64token(token: str) -> bool:
    body = token.rstrip("=")
    if not body:
        return False
    return all(c in _B64TOKEN_CHARS for c in body)
