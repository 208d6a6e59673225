"""Routing: normalise the request target once, then match it against the route table.

The path that was matched is exactly the path that is forwarded, so no upstream can
be reached through a path the route table did not see (`/public/../orders`,
`/public/%2e%2e/orders`, `//orders`). Anything ambiguous in the path is refused. The query
is only checked for characters no HTTP/1.1 request line may carry, and forwarded as sent.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import Route

_HEX = "0123456789ABCDEFabcdef"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# RFC 3986 pchar minus '%' (handled separately) plus '/': what may appear raw in a path.
_PATH_CHARS = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
# The common case, checked in C: plain segments of safe characters, no escapes. Such a
# path is already normal unless it holds a dot segment or an empty segment (`//`, `/;x/`).
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9\-._~!$&'()*+,;=:@]*)+")
# The query is not routed on and goes upstream byte for byte: any visible ASCII but '#' (a
# fragment is never sent), including what browsers leave unencoded (`filter[name]=x`,
# `ids[]=1`, `q=a|b`, `{ } ^ \ < > "` and backtick), as upstream frameworks accept them.
# Refused: controls, DEL, space and non-ASCII octets.
_PLAIN_QUERY = re.compile(r"[\x21\x22\x24-\x7e]*")
# Encoded octets that would change the path's structure if an upstream decoded them.
_FORBIDDEN_OCTETS = {0x2F: "encoded slash", 0x5C: "encoded backslash", 0x00: "encoded NUL"}
# Control characters, which upstream frameworks decode into paths their own route patterns
# may still match (`/admin%0A` reached Starlette's `/admin`: Python's `$` matches before a
# final newline), and which the raw path may not hold either.
_CONTROL_OCTETS = frozenset(range(0x20)) | {0x7F}


class PathError(ValueError):
    """The request target cannot be routed safely; the client gets 400."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Target:
    path: str  # normalised; this exact string is forwarded
    query: str  # raw query without '?', "" when absent
    has_query: bool

    @property
    def forward(self) -> str:
        return f"{self.path}?{self.query}" if self.has_query else self.path


def parse_target(raw: str) -> Target:
    """Split an origin-form request target and normalise its path."""
    if not raw.startswith("/"):
        raise PathError("request target must be an absolute path")
    path, has_query, query = raw.partition("?")
    if query and _PLAIN_QUERY.fullmatch(query) is None:
        raise PathError("invalid character in query")
    if _PLAIN_PATH.fullmatch(path) is None or "/." in path or "//" in path or "/;" in path:
        path = normalise_path(path)
    return Target(path, query, bool(has_query))


def normalise_path(raw: str) -> str:
    """Decode unreserved percent-escapes, resolve dot segments, refuse anything ambiguous.

    Kept as is: reserved percent-escapes (uppercased), `;` parameters. Refused: encoded
    slash, backslash, or control character (%00-%1F, %7F), invalid or overlong UTF-8 in
    escapes, raw control or non-ASCII characters, backslashes, empty segments (`//`), dot
    segments that carry parameters (`..;x`), and `..` above the root. The path is decoded
    once, as upstream frameworks do: `%252e` stays `%252e`.
    """
    if not raw.startswith("/"):
        raise PathError("path must start with '/'")
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        ch = raw[i]
        if ch == "%":
            octets, i = _read_escapes(raw, i)
            _check_utf8(octets)
            for b in octets:
                c = chr(b)
                if c in _UNRESERVED:
                    out.append(c)
                else:
                    if b in _FORBIDDEN_OCTETS:
                        raise PathError(_FORBIDDEN_OCTETS[b])
                    if b in _CONTROL_OCTETS:
                        raise PathError("encoded control character")
                    out.append(f"%{b:02X}")
            continue
        if ch == "\\":
            raise PathError("backslash in path")
        if ch not in _PATH_CHARS:
            raise PathError("invalid character in path")
        out.append(ch)
        i += 1
    return _remove_dot_segments("".join(out))


def _read_escapes(raw: str, i: int) -> tuple[bytes, int]:
    """Read a run of consecutive %XX escapes starting at i."""
    buf = bytearray()
    n = len(raw)
    while i < n and raw[i] == "%":
        if i + 3 > n:
            raise PathError("truncated percent-encoding")
        h1, h2 = raw[i + 1], raw[i + 2]
        if h1 not in _HEX or h2 not in _HEX:
            raise PathError("invalid percent-encoding")
        buf.append(int(h1 + h2, 16))
        i += 3
    return bytes(buf), i


def _check_utf8(octets: bytes) -> None:
    # Only runs of non-ASCII octets need decoding; strict UTF-8 refuses overlong forms.
    if any(b >= 0x80 for b in octets):
        try:
            octets.decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise PathError("invalid UTF-8 in percent-encoding") from None


def _remove_dot_segments(path: str) -> str:
    segments = path.split("/")[1:]
    out: list[str] = []
    last = len(segments) - 1
    for idx, seg in enumerate(segments):
        name = seg.partition(";")[0]
        if name in (".", ".."):
            if seg != name:
                raise PathError("dot segment with parameters")
            if name == "..":
                if not out:
                    raise PathError("path escapes the root")
                out.pop()
            if idx == last:
                out.append("")  # "/a/b/.." -> "/a/"
            continue
        if name == "" and idx != last:
            # "/;x/orders" is "//orders" to anything that strips parameters.
            raise PathError("empty path segment (repeated slash)")
        out.append(seg)
    return "/" + "/".join(out)


@dataclass(frozen=True, slots=True)
class Router:
    """First match wins; a prefix matches whole segments, ignoring `;` parameters."""

    routes: Sequence[Route]

    def match(self, method: str, path: str, host: str = "") -> Route | None:
        """TRACE matches only a route that lists it: it echoes the request, credentials and
        all, back to whoever sent it (cross-site tracing). `host` is the request's normalised
        host name (`host_name`); a route with `hosts` matches only those names."""
        key = _match_key(path)
        for route in self.routes:
            if route.hosts and not host_matches(route.hosts, host):
                continue
            methods = route.methods
            if methods is None:
                if method == "TRACE":
                    continue
            elif method not in methods:
                continue
            prefix = route.path_prefix
            if prefix == "/" or key == prefix or key.startswith(prefix + "/"):
                return route
        return None


def _match_key(path: str) -> str:
    # Servlet containers and others drop ";params" per segment before routing, so
    # "/orders;x/7" must match the "/orders" route, not slip to a catch-all.
    if ";" not in path:
        return path
    return "/".join(seg.partition(";")[0] for seg in path.split("/"))


# A host name as the Host header may carry it, lower-cased: DNS-style labels (letters,
# digits, `-`, `_`; an IPv4 address is one too) with an optional final dot, or an IPv6
# literal in brackets; then an optional port.
_HOST_NAME = re.compile(
    r"((?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)\.?"
    r"|(\[[0-9a-f:.]{2,45}\])"
)
_PORT = re.compile(r"(?::[0-9]{0,5})?")


def host_name(raw: bytes | None) -> str | None:
    """The host name a Host header value names: lower case, without port or final dot;
    "" when there is none (no or empty Host); None when the value is not a valid host."""
    if not raw:
        return ""
    try:
        text = raw.decode("ascii").lower()
    except UnicodeDecodeError:
        return None
    m = _HOST_NAME.match(text)
    if m is None or len(text) > 261 or _PORT.fullmatch(text, m.end()) is None:
        return None
    name = m.group(1)
    if name is None:
        name = m.group(2)
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            return None
    return name if len(name) <= 253 else None


def host_matches(hosts: Sequence[str], name: str) -> bool:
    """`hosts` entries are exact names or `*.domain`: any name ending in `.domain` (one label
    or more before it, as nginx and Envoy read it), never `domain` itself."""
    for entry in hosts:
        if entry[0] == "*":
            if name.endswith(entry[1:]) and len(name) > len(entry) - 1:
                return True
        elif name == entry:
            return True
    return False


def forwarded_path(path: str, prefix: str, strip: bool, base: str) -> str:
    """What a route sends upstream for a matched (normalised) path: the upstream URL's base
    path, then the path, less the prefix's segments when `strip` (with any `;` parameters
    they carry). `/orders/7` on `/orders` -> `/7`, `/orders` and `/orders/` -> `/`; with
    base `/api/v2`: `/api/v2/7`, `/api/v2`, `/api/v2/`."""
    rest = path
    if strip and prefix != "/":
        if ";" in path:
            segments = path.split("/")
            count = prefix.count("/") + 1
            rest = "/".join(("", *segments[count:])) if len(segments) > count else ""
        else:
            rest = path[len(prefix) :]
    return base + rest or "/"
