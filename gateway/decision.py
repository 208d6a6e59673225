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


def _body(error: str, description: str) -> bytes:
    return json.dumps({"error": error, "error_description": description}).encode()


def denial(
    status: int,
    error: str,
    description: str,
    challenge: str | None = None,
    retry_after: str | None = None,
) -> Denial:
    return Denial(status, _body(error, description), challenge, retry_after)


NOT_FOUND = denial(404, "not_found", "No route matches this request.")
SERVICE_UNAVAILABLE = denial(
    503, "temporarily_unavailable", "The token could not be checked; try again.", retry_after="1"
)
BAD_GATEWAY = denial(502, "bad_gateway", "The upstream service could not be reached.")
GATEWAY_TIMEOUT = denial(504, "gateway_timeout", "The upstream service did not answer in time.")

_ACTION_STATUS = {
    "UNAUTHORIZED": (401, "invalid_token", "The access token is not active."),
    "BAD_REQUEST": (400, "invalid_request", "The request does not carry a usable access token."),
    "FORBIDDEN": (403, "insufficient_scope", "The access token does not permit this request."),
    "INTERNAL_SERVER_ERROR": (500, "server_error", "The authorization server failed."),
}


class Decider:
    """Precomputes every fixed denial once, at config load."""

    def __init__(self, realm: str) -> None:
        self.missing = denial(
            401,
            "invalid_token",
            "An access token is required.",
            challenge=f'Bearer realm="{realm}"',
        )
        malformed = 'Bearer error="invalid_request"'
        self.malformed = denial(
            400, "invalid_request", "The Authorization header is malformed.", challenge=malformed
        )
        self.too_long = denial(
            400, "invalid_request", "The access token is too long.", challenge=malformed
        )
        # A token that authlete.token_pattern says Authlete never issued: answered as Authlete's
        # own answer to a token it does not know would be, without asking it.
        self.not_issued = denial(
            401,
            "invalid_token",
            _ACTION_STATUS["UNAUTHORIZED"][2],
            challenge='Bearer error="invalid_token"',
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
        return denial(status, error, description, challenge=verdict.challenge)

    def _insufficient(self, required: tuple[str, ...]) -> Denial:
        found = self._scope_denials.get(required)
        if found is None:
            found = denial(
                403,
                "insufficient_scope",
                "The access token lacks a scope this route requires.",
                challenge=f'Bearer error="insufficient_scope", scope="{" ".join(required)}"',
            )
            self._scope_denials[required] = found
        return found
