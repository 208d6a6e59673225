"""Verdict + route -> allow, or the denial the client gets (RFC 6750 section 3).

Route scopes are checked here on every request, cache hit or miss: two well-known
gateways shipped bypasses by skipping that check on cached answers.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from gateway.bearer import NoToken
from gateway.verdict import Active, Inactive


class Denial(NamedTuple):
    status: int
    body: bytes
    challenge: str | None = None  # WWW-Authenticate value
    retry_after: str | None = None
    # Why a request was refused for its token (gateway_denials_total); "" for the other
    # local answers (404, 400 for a bad path, ...).
    reason: str = ""


# gateway_denials_total's reasons, all exported at 0 from the start.
DENIAL_REASONS = (
    "missing_token",  # 401: no bearer token
    "malformed_token",  # 400: an Authorization header that is not a usable bearer token
    "invalid_token",  # 401: Authlete does not know it, or it expired or was revoked
    "insufficient_scope",  # 403: a scope the route requires is missing
    "forbidden",  # 403: Authlete's FORBIDDEN (the token may not be used here)
    "bad_request",  # 400: Authlete's BAD_REQUEST
    "authlete_error",  # 500: Authlete's INTERNAL_SERVER_ERROR
    "unavailable",  # 503: no verdict (Authlete down, budget, breaker)
    "untrusted_peer",  # 403: a decision request from outside trusted_proxies
)


def _body(error: str, description: str) -> bytes:
    return json.dumps({"error": error, "error_description": description}).encode()


def denial(
    status: int,
    error: str,
    description: str,
    challenge: str | None = None,
    retry_after: str | None = None,
    reason: str = "",
) -> Denial:
    return Denial(status, _body(error, description), challenge, retry_after, reason)


NOT_FOUND = denial(404, "not_found", "No route matches this request.")
SERVICE_UNAVAILABLE = denial(
    503,
    "temporarily_unavailable",
    "The token could not be checked; try again.",
    retry_after="1",
    reason="unavailable",
)
BAD_GATEWAY = denial(502, "bad_gateway", "The upstream service could not be reached.")
GATEWAY_TIMEOUT = denial(504, "gateway_timeout", "The upstream service did not answer in time.")

_ACTION_STATUS = {
    "UNAUTHORIZED": (401, "invalid_token", "The access token is not active."),
    "BAD_REQUEST": (400, "invalid_request", "The request does not carry a usable access token."),
    "FORBIDDEN": (403, "insufficient_scope", "The access token does not permit this request."),
    "INTERNAL_SERVER_ERROR": (500, "server_error", "The authorization server failed."),
}
_ACTION_REASON = {
    "UNAUTHORIZED": "invalid_token",
    "BAD_REQUEST": "bad_request",
    "FORBIDDEN": "forbidden",
    "INTERNAL_SERVER_ERROR": "authlete_error",
}


class Decider:
    """Precomputes every fixed denial once, at config load."""

    def __init__(self, realm: str) -> None:
        self.missing = denial(
            401,
            "invalid_token",
            "An access token is required.",
            challenge=f'Bearer realm="{realm}"',
            reason="missing_token",
        )
        malformed = 'Bearer error="invalid_request"'
        self.malformed = denial(
            400,
            "invalid_request",
            "The Authorization header is malformed.",
            challenge=malformed,
            reason="malformed_token",
        )
        self.too_long = denial(
            400,
            "invalid_request",
            "The access token is too long.",
            challenge=malformed,
            reason="malformed_token",
        )
        # A token that authlete.token_pattern says Authlete never issued: answered as Authlete's
        # own answer to a token it does not know would be, without asking it.
        self.not_issued = denial(
            401,
            "invalid_token",
            _ACTION_STATUS["UNAUTHORIZED"][2],
            challenge='Bearer error="invalid_token"',
            reason="invalid_token",
        )
        self._scope_denials: dict[tuple[str, ...], Denial] = {}

    def no_token(self, why: NoToken) -> Denial:
        if why is NoToken.MISSING:
            return self.missing
        return self.too_long if why is NoToken.TOO_LONG else self.malformed

    def check(self, verdict: Active | Inactive, required: tuple[str, ...]) -> Denial | None:
        """None means allowed."""
        if isinstance(verdict, Active):
            scopes = verdict.scopes
            for scope in required:
                if scope not in scopes:
                    return self._insufficient(required)
            return None
        status, error, description = _ACTION_STATUS[verdict.action]
        return denial(
            status,
            error,
            description,
            challenge=verdict.challenge,
            reason=_ACTION_REASON[verdict.action],
        )

    def _insufficient(self, required: tuple[str, ...]) -> Denial:
        found = self._scope_denials.get(required)
        if found is None:
            found = denial(
                403,
                "insufficient_scope",
                "The access token lacks a scope this route requires.",
                challenge=f'Bearer error="insufficient_scope", scope="{" ".join(required)}"',
                reason="insufficient_scope",
            )
            self._scope_denials[required] = found
        return found
