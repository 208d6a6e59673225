"""CORS (Fetch standard, "CORS protocol"): a policy as plain values, and what it answers.

A `CorsConfig` is the `cors:` section as written (globally, or on a route, where it replaces
the global one whole); a `Policy` is that section compiled once per config load. Everything
here is a pure function of a policy and a request's header values; the listener calls it only
for requests that carry an `Origin` header, or on routes that have a policy (for `Vary`).

- A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered by the
  gateway: 204 with the policy's headers, or 403 without any `Access-Control-*` header when
  the origin, the method or a requested header is not allowed (as Spring and others do; a
  browser fails either way, and the 403 says why to someone reading the network panel).
- Every other answer to an allowed origin, the gateway's own refusals included, carries
  `Access-Control-Allow-Origin` (the origin itself, or `*` for `allow_origins: ["*"]`),
  `Access-Control-Allow-Credentials` and `Access-Control-Expose-Headers` as configured.
- Every answer on a route with a policy carries `Vary: Origin`, whatever the Origin.
- On such a route, the upstream's own `Access-Control-*` headers are dropped: the gateway's
  policy is the only one a browser sees.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "DEFAULT_HEADERS",
    "DEFAULT_METHODS",
    "CorsConfig",
    "Policy",
    "Preflight",
    "answer_headers",
    "origin_allowed",
    "origin_entry",
    "preflight",
    "preflight_request",
    "relay",
]

DEFAULT_METHODS = ("GET", "HEAD", "PUT", "PATCH", "POST", "DELETE")
DEFAULT_HEADERS = ("Authorization", "Content-Type")
# The gateway's own answers (401, 403, 503, ...) also expose these, so that a browser
# application can read why it was refused and quote the request id.
LOCAL_EXPOSED = ("WWW-Authenticate", "Retry-After", "X-Request-Id")

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_LABELS = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_LABELS_BYTES = re.compile(_LABELS.pattern.encode())
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class CorsConfig:
    """The `cors:` section as validated: origins normalised, methods upper case."""

    allow_origins: tuple[str, ...]  # "*" alone, or origins and `https://*.example.com`
    allow_methods: tuple[str, ...] = DEFAULT_METHODS  # ("*",): whatever is asked
    allow_headers: tuple[str, ...] = DEFAULT_HEADERS  # ("*",): whatever is asked
    expose_headers: tuple[str, ...] = ()
    allow_credentials: bool = False
    max_age: int | None = None  # seconds; None: no Access-Control-Max-Age (browsers: 5 s)


def origin_entry(text: str) -> str:
    """One `allow_origins` entry, normalised as a browser serialises an Origin (lower case,
    no default port, no path). Raises ValueError with the reason."""
    if text == "*":
        return text
    if text.strip().lower() == "null":
        raise ValueError(
            '"null" is the origin of sandboxed frames and local files, which any page can '
            "produce: it is never allowed"
        )
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise ValueError("must be an http(s) origin such as https://app.example.com")
    authority = rest
    for cut in "/?#":
        authority = authority.partition(cut)[0]
    if authority != rest:
        raise ValueError(f"an origin has no path (did you mean {scheme}://{authority}?)")
    if "@" in authority:
        raise ValueError("an origin has no user name or password")
    if authority.startswith("["):
        host, bracket, port_text = authority[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise ValueError("invalid IPv6 origin")
        try:
            host = "[" + ipaddress.IPv6Address(host).compressed + "]"
        except ValueError:
            raise ValueError("invalid IPv6 origin") from None
        has_port = bool(port_text)
        port_text = port_text[1:]
    else:
        host, has_colon, port_text = authority.partition(":")
        has_port = bool(has_colon)
        host = host.lower()
        wildcard = host.startswith("*.")
        name = host[2:] if wildcard else host
        if "*" in name:
            raise ValueError("'*' may only stand for the subdomains: https://*.example.com")
        if _LABELS.fullmatch(name) is None:
            raise ValueError(f"invalid host name {host!r}")
        if wildcard and "." not in name:
            raise ValueError(f"{host!r} is too broad: name at least two labels (*.example.com)")
    if has_port:
        if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
            raise ValueError(f"invalid port {port_text!r}")
        if int(port_text) != _DEFAULT_PORTS[scheme]:
            return f"{scheme}://{host}:{int(port_text)}"
    return f"{scheme}://{host}"


class Policy:
    """A `CorsConfig` compiled once per config load; what it answers to an origin is
    remembered (a bounded number of origins)."""

    __slots__ = (
        "allow_headers",
        "allow_methods",
        "any_header",
        "any_method",
        "any_origin",
        "blocks",
        "config",
        "credentials",
        "exact",
        "expose",
        "expose_local",
        "headers",
        "max_age",
        "methods",
        "wildcards",
    )

    def __init__(self, config: CorsConfig) -> None:
        self.config = config
        origins = config.allow_origins
        self.any_origin = "*" in origins
        self.exact = frozenset(o.encode() for o in origins if "*" not in o)
        wildcards: list[tuple[bytes, bytes]] = []
        for o in origins:
            if o != "*" and "*" in o:
                scheme, _, rest = o.partition("://*")  # "https", ".example.com[:port]"
                wildcards.append(((scheme + "://").encode(), rest.encode()))
        self.wildcards = tuple(wildcards)
        self.credentials = config.allow_credentials
        self.any_method = "*" in config.allow_methods
        self.methods = frozenset(m.encode() for m in config.allow_methods)
        self.allow_methods = ", ".join(config.allow_methods).encode()
        self.any_header = "*" in config.allow_headers
        self.headers = frozenset(h.lower().encode() for h in config.allow_headers)
        self.allow_headers = ", ".join(config.allow_headers).encode()
        self.expose = ", ".join(config.expose_headers).encode()
        local = list(config.expose_headers)
        if "*" not in local:
            lower = {h.lower() for h in local}
            local += (h for h in LOCAL_EXPOSED if h.lower() not in lower)
        self.expose_local = ", ".join(local).encode()
        self.max_age = config.max_age
        # origin -> (header lines for forwarded answers, for the gateway's own answers)
        self.blocks: dict[bytes, tuple[bytes, bytes]] = {}


_VARY = b"Vary: Origin\r\n"
_VARY_PREFLIGHT = b"Vary: Origin, Access-Control-Request-Method, Access-Control-Request-Headers\r\n"
_BLOCKS_SIZE = 1024


def origin_allowed(policy: Policy, origin: bytes) -> bool:
    """Exact origins as browsers send them (no case folding: a browser's Origin is lower
    case); `https://*.example.com` matches one or more labels before `.example.com`, with
    that scheme and port, never `https://example.com` itself."""
    if policy.any_origin or origin in policy.exact:
        return True
    for prefix, suffix in policy.wildcards:
        if (
            origin.startswith(prefix)
            and origin.endswith(suffix)
            and len(origin) > len(prefix) + len(suffix)
            and _LABELS_BYTES.fullmatch(origin, len(prefix), len(origin) - len(suffix))
        ):
            return True
    return False


def _allow_origin(policy: Policy, origin: bytes) -> list[bytes]:
    value = b"*" if policy.any_origin and not policy.credentials else origin
    lines = [b"Access-Control-Allow-Origin: ", value, b"\r\n"]
    if policy.credentials:
        lines.append(b"Access-Control-Allow-Credentials: true\r\n")
    return lines


def answer_headers(policy: Policy, origin: bytes | None, local: bool) -> bytes:
    """The CORS header lines of an answer that is not a preflight's: `Vary: Origin` always;
    for an allowed origin also Allow-Origin, Allow-Credentials and Expose-Headers (on the
    gateway's own answers, `LOCAL_EXPOSED` too)."""
    if origin is None:
        return _VARY
    blocks = policy.blocks.get(origin)
    if blocks is None:
        if origin_allowed(policy, origin):
            lines = _allow_origin(policy, origin)
            forwarded = [*lines, b"Access-Control-Expose-Headers: ", policy.expose, b"\r\n"]
            own = [*lines, b"Access-Control-Expose-Headers: ", policy.expose_local, b"\r\n"]
            blocks = (
                b"".join(forwarded if policy.expose else lines) + _VARY,
                b"".join(own) + _VARY,
            )
        else:
            blocks = (_VARY, _VARY)
        if len(policy.blocks) >= _BLOCKS_SIZE:
            policy.blocks.clear()  # bounded: a client inventing origins only empties it
        policy.blocks[origin] = blocks
    return blocks[1] if local else blocks[0]


def relay(policy: Policy, parts: list[bytes], origin: bytes | None) -> list[bytes]:
    """A forwarded answer's header parts (4 per header: name, ": ", value, CRLF) without the
    upstream's own `Access-Control-*` headers, with the policy's lines appended."""
    kept: list[bytes] = []
    for i in range(0, len(parts), 4):
        if parts[i][:15].lower() != b"access-control-":
            kept += parts[i : i + 4]
    kept.append(answer_headers(policy, origin, False))
    return kept


def preflight_request(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes | None] | None:
    """`(Access-Control-Request-Method, Access-Control-Request-Headers or None)` of a request
    head, or None when it has no Access-Control-Request-Method (not a preflight). Several
    Request-Headers fields are one comma-separated list."""
    method: bytes | None = None
    asked: list[bytes] = []
    for name, value in headers:
        if len(name) < 29 or name[:15].lower() != b"access-control-":
            continue
        lower = name.lower()
        if lower == b"access-control-request-method" and method is None:
            method = value.strip()
        elif lower == b"access-control-request-headers":
            asked.append(value)
    if method is None:
        return None
    return method, b",".join(asked) if asked else None


class Preflight(NamedTuple):
    """The gateway's answer to a preflight: status, header lines, JSON body (b"" for 204)."""

    status: int
    headers: bytes
    body: bytes


def _refused(description: str) -> Preflight:
    body = json.dumps({"error": "cors_refused", "error_description": description}).encode()
    head = b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return Preflight(403, head + b"Cache-Control: no-store\r\n" + _VARY_PREFLIGHT, body)


def preflight(policy: Policy, origin: bytes, method: bytes, asked: bytes | None) -> Preflight:
    """204 with the policy's headers when the origin, the method and every requested header
    are allowed; else 403 without any Access-Control-* header, saying which was refused."""
    text = origin.decode("latin-1")
    if not origin_allowed(policy, origin):
        return _refused(f"The origin {text} is not allowed to call this route.")
    if _TOKEN.fullmatch(method) is None:
        return _refused("Access-Control-Request-Method is not a method.")
    if not policy.any_method and method not in policy.methods:
        return _refused(
            f"The method {method.decode('latin-1')} is not allowed to {text} on this route."
        )
    names: list[bytes] = []
    if asked is not None:
        names = [n for n in (p.strip().lower() for p in asked.split(b",")) if n]
        for name in names:
            if _TOKEN.fullmatch(name) is None:
                return _refused("Access-Control-Request-Headers is not a list of header names.")
            if not policy.any_header and name not in policy.headers:
                return _refused(
                    f"The request header {name.decode('latin-1')} is not allowed to {text} "
                    "on this route."
                )
    lines = _allow_origin(policy, origin)
    lines += (
        b"Access-Control-Allow-Methods: ",
        method if policy.any_method else policy.allow_methods,
    )
    lines.append(b"\r\n")
    allow_headers = b", ".join(names) if policy.any_header else policy.allow_headers
    if allow_headers:
        lines += (b"Access-Control-Allow-Headers: ", allow_headers, b"\r\n")
    if policy.max_age is not None:
        lines.append(b"Access-Control-Max-Age: %d\r\n" % policy.max_age)
    lines.append(_VARY_PREFLIGHT)
    return Preflight(204, b"".join(lines), b"")
