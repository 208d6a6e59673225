"""What Authlete said about a token, as plain values: the cache, the decision and the proxy
use these without importing the Authlete client."""

from __future__ import annotations

from typing import NamedTuple


class Active(NamedTuple):
    """An OK verdict. A tuple of atomic values, so the garbage collector can skip it."""

    subject: str | None
    client_id: str
    scopes: tuple[str, ...]
    scope_header: str  # space-separated, computed once
    expires_at: float  # epoch seconds


class Inactive(NamedTuple):
    """Any other action: what Authlete says the client should be told."""

    action: str
    challenge: str


Verdict = Active | Inactive
