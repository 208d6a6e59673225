"""RFC 6750 section 2.1 token extraction. No I/O: headers in, a token or a reason out."""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence

# credentials = "Bearer" 1*SP b64token;  b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" /
# "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class NoToken(enum.Enum):
    MISSING = "missing"  # no Authorization, or another scheme: 401 with a bare challenge
    MALFORMED = "malformed"  # a Bearer header we cannot use: 400 invalid_request
    TOO_LONG = "too_long"  # over max_token_bytes: 400 before any lookup


def extract(values: Sequence[str], max_len: int) -> str | NoToken:
    """Return the bearer token from the request's Authorization header values."""
    if len(values) != 1:
        # None: no credentials. Several: ambiguous, whatever their schemes are.
        return NoToken.MISSING if not values else NoToken.MALFORMED
    value = values[0]
    scheme, _, rest = value.partition(" ")
    if scheme.lower() != "bearer":
        # "Bearer\tabc" is a Bearer header with an illegal separator, not another scheme.
        head = scheme.partition("\t")[0]
        return NoToken.MALFORMED if head.lower() == "bearer" else NoToken.MISSING
    token = rest.lstrip(" ")
    if not token:
        return NoToken.MALFORMED
    if len(token) > max_len:
        return NoToken.TOO_LONG
    return token if _B64TOKEN.fullmatch(token) is not None else NoToken.MALFORMED
