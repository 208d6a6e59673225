"""Forwarding rules, as bytes in and bytes out: which client headers go upstream, which are
replaced, what the gateway adds (identity, X-Forwarded-*, request id), and which upstream
headers reach the client. No I/O here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Protocol

from gateway.config import HeadersConfig, IPNetwork, Upstream
from gateway.http import HOP_BY_HOP, fold
from gateway.ingress import DESCRIPTION_HEADERS, TWICE
from gateway.routing import host_name
from gateway.verdict import Active

# What the listener needs to know of a request head, besides what is forwarded.
_PASS = 0
_DROP = 1
_HOST = 2
_AUTHORIZATION = 3  # passed on unchanged, and read for the token
_CONTENT_LENGTH = 4
_TRANSFER_ENCODING = 5
_EXPECT = 6
_REQUEST_ID = 7
_CONNECTION = 8
_X_FORWARDED_FOR = 9
_X_FORWARDED_PROTO = 10  # believed from trusted proxies only
_X_FORWARDED_HOST = 11
_ORIGIN = 12  # passed on unchanged, and read for CORS
_TRACEPARENT = 13  # passed on (when the lists let it), and read for the trace id
_DESCRIPTION = 14  # a decision request's description of the original request (gateway.ingress)

_SPECIAL = {
    "host": _HOST,
    "authorization": _AUTHORIZATION,
    "content-length": _CONTENT_LENGTH,
    "transfer-encoding": _TRANSFER_ENCODING,
    "expect": _EXPECT,
    "x-request-id": _REQUEST_ID,
    "connection": _CONNECTION,
    "x-forwarded-for": _X_FORWARDED_FOR,
    "x-forwarded-proto": _X_FORWARDED_PROTO,
    "x-forwarded-host": _X_FORWARDED_HOST,
    "origin": _ORIGIN,
}
# A decision request keeps nothing; of the rest it reads only the trace context's id.
_DECISION_KINDS = {
    **_SPECIAL,
    "traceparent": _TRACEPARENT,
    **{name.decode(): _DESCRIPTION for name in DESCRIPTION_HEADERS},
}
# Headers that upstream frameworks, servers and auth proxies read as facts about the client
# (who it is, where it connects from, scheme, host, path) or as its method. Names are folded
# (lower case, `_` read as `-`); an entry ending in `*` is a prefix. Documented in the README
# ("Headers believed only from trusted proxies"); X-Forwarded-For/-Proto/-Host are not here:
# the gateway extends or replaces them (`_SPECIAL`).
#
# From untrusted peers these are dropped; from a proxy in `trusted_proxies` they pass, as that
# proxy set them (it may have authenticated the user: oauth2-proxy behind nginx, ALB OIDC, IAP).
DROPPED_FROM_UNTRUSTED = frozenset(
    {
        # Forwarding claims: every X-Forwarded-* but the three the gateway sets (scheme in
        # -Proto/-Ssl/-Protocol/-Scheme, -Port, -Prefix, -Path, -Uri, -Server, -Method, -User,
        # -Email, -Groups, -Preferred-Username, -Access-Token, -Client-Cert, ...).
        "x-forwarded-*",
        "forwarded",
        # Client address (Rails, Tornado, request-ip, CDNs, load balancers).
        "x-real-ip",
        "true-client-ip",
        "x-client-ip",
        "client-ip",
        "x-cluster-client-ip",
        "x-original-forwarded-for",
        "cf-connecting-ip",
        "cf-connecting-ipv6",
        "fastly-client-ip",
        "fly-client-ip",
        "x-appengine-user-ip",
        "x-azure-clientip",
        "x-azure-socketip",
        "x-originating-ip",
        "x-envoy-external-address",
        "x-envoy-internal",
        # Scheme, host and path as a proxy saw them (Tornado, PHP frameworks, IIS, Symfony,
        # nginx ingress, Cloudflare).
        "x-scheme",
        "cf-visitor",
        "x-url-scheme",
        "front-end-https",
        "x-original-host",
        "x-host",
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
        "x-envoy-original-path",
        # Identity set by authenticating proxies (Kubernetes front proxy, Authelia, oauth2-proxy,
        # Grafana/Gitea auth proxy, Kong, APISIX, mod_auth_openidc, SiteMinder, Authentik,
        # Pomerium, Vouch, Tailscale, AWS ALB, Google IAP, Azure App Service, Cloudflare Access).
        "x-remote-*",
        "remote-user",
        "remote-groups",
        "remote-email",
        "remote-name",
        "x-auth-request-*",
        "x-user",
        "x-user-id",
        "x-username",
        "x-email",
        "x-auth-user",
        "x-webauth-*",
        "x-authenticated-*",
        "x-consumer-*",
        "x-anonymous-consumer",
        "x-credential-*",
        "x-userinfo",
        "x-id-token",
        "x-access-token",
        "oidc-*",
        "sm-user",
        "x-authentik-*",
        "x-pomerium-*",
        "x-vouch-*",
        "tailscale-user-*",
        "x-amzn-oidc-*",
        "x-goog-authenticated-user-*",
        "x-goog-iap-jwt-assertion",
        "x-ms-client-principal*",
        "x-ms-token-*",
        "cf-access-authenticated-user-email",
        "cf-access-jwt-assertion",
        # Client certificates verified by a TLS-terminating proxy (nginx ingress, HAProxy,
        # Azure App Service, ALB mTLS).
        "ssl-client-*",
        "x-ssl-client-*",
        "x-client-cert*",
        "x-arr-clientcert",
        "x-amzn-mtls-*",
    }
)
# A method override is always the client's own wish, which a proxy in front relays unread:
# dropped from every peer, trusted or not (Express method-override, Rack::MethodOverride,
# Symfony, ASP.NET/OData, Google APIs; X-Original-Method: what ingress-nginx tells an auth
# service).
DROPPED_FROM_EVERY_PEER = frozenset(
    {
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-method",
    }
)


class _Rules:
    """Header-name entries, exact or `prefix*`, answering how specifically a name matches."""

    __slots__ = ("exact", "prefixes")

    def __init__(self, entries: frozenset[str]) -> None:
        folded = {fold(e) for e in entries}
        self.exact = frozenset(e for e in folded if not e.endswith("*"))
        self.prefixes = tuple(sorted({e[:-1] for e in folded if e.endswith("*")}))

    def match(self, folded: str) -> int:
        """-1 for no match; else higher for a more specific entry (an exact name beats any
        prefix, a longer prefix a shorter one)."""
        if folded in self.exact:
            return len(folded) + 1
        return max((len(p) for p in self.prefixes if folded.startswith(p)), default=-1)


# Upstream response headers never relayed: hop-by-hop ones, and the request id the gateway sets.
_RESPONSE_DROP = frozenset(n.encode() for n in HOP_BY_HOP) | {b"x-request-id"}
_CRLF = b"\r\n"
_SEP = b": "
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})


class Inbound:
    """A client's request head, read once: what is forwarded as is, and what the gateway
    decides on or replaces."""

    __slots__ = (
        "authorization",
        "connection",
        "content_length",
        "description",
        "expect",
        "forwarded_host",
        "forwarded_proto",
        "host",
        "host_count",
        "kept",
        "origin",
        "request_id",
        "traceparent",
        "transfer_encoding",
        "x_forwarded_for",
    )

    def __init__(self) -> None:
        self.kept: list[bytes] = []  # name, ": ", value, CRLF for each passing header
        self.host: bytes | None = None  # the first
        self.host_count = 0
        # Lists only for headers that are present (most requests have none of these).
        self.authorization: list[str] | None = None
        self.content_length: bytes | None = None
        self.transfer_encoding: list[bytes] | None = None
        self.expect: bytes | None = None
        self.request_id: bytes | None = None
        self.connection: list[bytes] | None = None
        self.x_forwarded_for: list[bytes] | None = None
        self.forwarded_proto: bytes | None = None
        self.forwarded_host: bytes | None = None
        self.origin: bytes | None = None  # the first Origin header (CORS)
        self.traceparent: list[bytes] | None = None  # W3C trace context (gateway.tracing)
        # A decision request's description headers (gateway.ingress.describe_found)
        self.description: dict[bytes, bytes] | None = None


class HeaderPolicy:
    """What goes upstream: the client's end-to-end headers minus the gateway's own identity
    headers (from everyone), claims about the client and its connection (believed only from
    trusted proxies: `DROPPED_FROM_UNTRUSTED` and `headers.drop_from_untrusted`, less
    `headers.allow_from_untrusted`) and method overrides (from no one)."""

    def __init__(self, names: HeadersConfig, trusted_proxies: tuple[IPNetwork, ...] = ()) -> None:
        self._subject = names.subject.encode() + _SEP
        self._scopes = names.scopes.encode() + _SEP
        self._client_id = names.client_id.encode() + _SEP
        self._identity = frozenset(fold(n) for n in (names.subject, names.scopes, names.client_id))
        remove = b"x-envoy-auth-headers-to-remove: "
        every = (names.subject, names.scopes, names.client_id)
        self._unset_all = remove + ", ".join(n.lower() for n in every).encode() + _CRLF
        self._unset_subject = remove + names.subject.lower().encode() + _CRLF
        self._untrusted_only = _Rules(DROPPED_FROM_UNTRUSTED)
        self._every_peer = _Rules(DROPPED_FROM_EVERY_PEER)
        self._configured_drop = _Rules(names.drop_from_untrusted)
        self._configured_allow = _Rules(names.allow_from_untrusted)
        # Whether a header passes depends only on its spelling and on trust: decided once
        # per spelling and remembered (a bounded number of spellings per process).
        self._kinds_trusted: dict[bytes, int] = {}
        self._kinds_untrusted: dict[bytes, int] = {}
        self._kinds_decision: dict[bytes, int] = {}
        self._trusted_networks = trusted_proxies
        self._identity_blocks: dict[Active, bytes] = {}

    def _identity_block(self, identity: Active) -> bytes:
        """The identity header lines for a verdict; remembered for recently seen verdicts."""
        lines = (
            [] if identity.subject is None else [self._subject, identity.subject.encode(), _CRLF]
        )
        lines += (self._scopes, identity.scope_header.encode(), _CRLF)
        lines += (self._client_id, identity.client_id.encode(), _CRLF)
        block = b"".join(lines)
        if len(self._identity_blocks) >= 4096:
            self._identity_blocks.clear()  # bounded; rebuilding is cheap
        self._identity_blocks[identity] = block
        return block

    def unset_identity(self, identity: Active | None) -> bytes:
        """`x-envoy-auth-headers-to-remove` naming the identity headers a decision answer
        does not carry (b"" when it carries all three)."""
        if identity is None:
            return self._unset_all
        return self._unset_subject if identity.subject is None else b""

    def identity_lines(self, identity: Active) -> bytes:
        """The identity header lines for a verdict (what a decision answer carries)."""
        block = self._identity_blocks.get(identity)
        return block if block is not None else self._identity_block(identity)

    def trusts(self, peer: str) -> bool:
        if not peer or not self._trusted_networks:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self._trusted_networks)

    def client_of(self, inbound: Inbound, peer: str, trusted: bool) -> str:
        """Who a request comes from, for per-client limits: the peer itself, or, when the peer
        is a trusted proxy, the nearest X-Forwarded-For hop that is not a trusted proxy (each
        trusted proxy appended the address it saw, so that hop is a fact, not a claim)."""
        if not trusted or not inbound.x_forwarded_for:
            return peer
        hops = [h.strip() for v in inbound.x_forwarded_for for h in v.split(b",")]
        for hop in reversed(hops):
            text = hop.decode("latin-1")[:64]
            if text and not self.trusts(text):
                return text
        return peer

    def _kind(self, name: bytes, trusted: bool) -> int:
        kind = self._forwarding_kind(name, trusted)
        if kind == _PASS and name.lower() == b"traceparent":
            return _TRACEPARENT  # unless the lists drop it (then the upstream never sees it)
        return kind

    def _forwarding_kind(self, name: bytes, trusted: bool) -> int:
        lower = name.decode("latin-1").lower()
        kind = _SPECIAL.get(lower)
        if kind is not None:
            return kind
        folded = fold(lower)
        if lower in HOP_BY_HOP or folded in self._identity:
            return _DROP
        if folded != lower and (folded in _SPECIAL or folded in HOP_BY_HOP):
            # `X_Forwarded_Host`, `Content_Length`: many frameworks read `_` as `-`, so an
            # underscore spelling of a name the gateway decides on or replaces is dropped.
            return _DROP
        allow = self._configured_allow.match(folded)
        if allow >= 0 and allow > self._configured_drop.match(folded):
            return _PASS  # let through on purpose; beats the built-in lists
        if self._every_peer.match(folded) >= 0:
            return _DROP
        if self._untrusted_only.match(folded) < 0 and self._configured_drop.match(folded) < 0:
            return _PASS
        # Listed: a trusted proxy sets the dashed spelling itself and relays its client's
        # `X_Remote_User` unread, which the upstream would read as the same header.
        return _PASS if trusted and folded == lower else _DROP

    def scan(
        self, headers: list[tuple[bytes, bytes]], trusted: bool, forwarding: bool = True
    ) -> Inbound:
        """`forwarding` False: a decision request, which is never forwarded: only what the
        gateway decides on is read, nothing is kept."""
        if forwarding:
            kinds = self._kinds_trusted if trusted else self._kinds_untrusted
        else:
            kinds = self._kinds_decision
        inbound = Inbound()
        kept = inbound.kept
        for name, value in headers:
            kind = kinds.get(name)
            if kind is None:
                if forwarding:
                    kind = self._kind(name, trusted)
                else:
                    kind = _DECISION_KINDS.get(name.decode("latin-1").lower(), _DROP)
                if len(kinds) < 4096:
                    kinds[name] = kind
            if kind == _PASS:
                kept += (name, _SEP, value, _CRLF)
            elif kind == _DROP:
                continue
            elif kind == _AUTHORIZATION:
                if inbound.authorization is None:
                    inbound.authorization = []
                inbound.authorization.append(value.decode("latin-1"))
                kept += (name, _SEP, value, _CRLF)
            elif kind == _HOST:
                if inbound.host is None:
                    inbound.host = value
                inbound.host_count += 1
            elif kind == _CONTENT_LENGTH:
                inbound.content_length = value  # llhttp refuses a second one
            elif kind == _TRANSFER_ENCODING:
                if inbound.transfer_encoding is None:
                    inbound.transfer_encoding = []
                inbound.transfer_encoding.append(value)
            elif kind == _EXPECT:
                inbound.expect = value
            elif kind == _REQUEST_ID:
                inbound.request_id = value
            elif kind == _CONNECTION:
                if inbound.connection is None:
                    inbound.connection = []
                inbound.connection.append(value)
            elif kind == _X_FORWARDED_FOR:
                if inbound.x_forwarded_for is None:
                    inbound.x_forwarded_for = []
                inbound.x_forwarded_for.append(value)
            elif kind == _X_FORWARDED_PROTO:
                if trusted and inbound.forwarded_proto is None:
                    inbound.forwarded_proto = value
            elif kind == _X_FORWARDED_HOST:
                if trusted and inbound.forwarded_host is None:
                    inbound.forwarded_host = value
            elif kind == _ORIGIN:
                if inbound.origin is None:
                    inbound.origin = value
                kept += (name, _SEP, value, _CRLF)
            elif kind == _TRACEPARENT:
                if inbound.traceparent is None:
                    inbound.traceparent = []
                inbound.traceparent.append(value)
                kept += (name, _SEP, value, _CRLF)
            elif kind == _DESCRIPTION:  # decision requests only: never forwarded
                found = inbound.description
                if found is None:
                    found = inbound.description = {}
                key = name.lower()
                if key in found:
                    found[TWICE] = name
                else:
                    found[key] = value.strip(b" \t")
        if inbound.connection is not None:
            _drop_listed(kept, inbound.connection, 0)
        return inbound

    def request_head(
        self,
        method: bytes,
        target: bytes,
        upstream_host: bytes,
        inbound: Inbound,
        peer: bytes,
        scheme: bytes,
        identity: Active | None,
        request_id: bytes,
        chunked: bool,
        forward_authorization: bool = True,
        length: int | None = None,
    ) -> bytes:
        """The upstream request head. `length`, when given, is the size of a body the gateway
        has read whole: it is sent with that Content-Length, whatever the client's framing.
        Without `forward_authorization` the client's Authorization fields are left out."""
        parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", upstream_host, _CRLF]
        if forward_authorization or inbound.authorization is None:
            parts += inbound.kept
        else:  # the route's upstream must not be able to replay the caller's credentials
            kept = inbound.kept
            for i in range(0, len(kept), 4):
                if kept[i].lower() != b"authorization":
                    parts += kept[i : i + 4]
        # X-Forwarded-For: the chain as received plus the peer we saw, so its last entry
        # is always a fact; nothing here ever decides anything on the earlier entries.
        prior = inbound.x_forwarded_for
        parts += (
            b"X-Forwarded-For: ",
            b", ".join((*prior, peer)) if prior else peer,
            b"\r\nX-Forwarded-Proto: ",
            inbound.forwarded_proto or scheme,
            _CRLF,
        )
        # A proxy we trust terminated the client's connection: its view of the host is the
        # real one. Anyone else could claim any host: only what we saw goes on.
        host = inbound.forwarded_host or inbound.host
        if host:
            parts += (b"X-Forwarded-Host: ", host, _CRLF)
        parts += (b"X-Request-Id: ", request_id, _CRLF)
        if identity is not None:
            block = self._identity_blocks.get(identity)
            if block is None:
                block = self._identity_block(identity)
            parts.append(block)
        if length is not None:
            parts += (b"Content-Length: %d\r\n\r\n" % length,)
        elif chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        elif inbound.content_length is not None:
            parts += (b"Content-Length: ", inbound.content_length, b"\r\n\r\n")
        else:
            parts.append(_CRLF)
        return b"".join(parts)


# Response header spelling -> 0 relayed, 1 dropped, 2 Connection (dropped, and read),
# 3 Location or Content-Location (relayed, rewritten by `Redirects`).
_RESPONSE_KINDS: dict[bytes, int] = {}
_LOCATIONS = frozenset({b"location", b"content-location"})


def _response_kind(name: bytes) -> int:
    lower = name.lower()
    kind = (2 if lower == b"connection" else 1) if lower in _RESPONSE_DROP else 0
    if lower in _LOCATIONS:
        kind = 3
    if len(_RESPONSE_KINDS) < 4096:
        _RESPONSE_KINDS[name] = kind
    return kind


class LocationRewriter(Protocol):
    def rewrite_location(self, value: bytes) -> bytes: ...


def response_headers(
    headers: list[tuple[bytes, bytes]], locations: LocationRewriter | None = None
) -> list[bytes]:
    """The upstream's end-to-end headers, in order and with duplicates, as head parts;
    Location and Content-Location values through `locations` (see `Redirects`)."""
    parts: list[bytes] = []
    listed: list[bytes] | None = None
    kinds = _RESPONSE_KINDS
    for name, value in headers:
        kind = kinds.get(name)
        if kind is None:
            kind = _response_kind(name)
        if kind == 0:
            parts += (name, _SEP, value, _CRLF)
        elif kind == 3:
            if locations is not None:
                value = locations.rewrite_location(value)
            parts += (name, _SEP, value, _CRLF)
        elif kind == 2:
            if listed is None:
                listed = []
            listed.append(value)
    if listed is not None:
        _drop_listed(parts, listed, 0)
    return parts


def _drop_listed(parts: list[bytes], values: list[bytes], start: int) -> None:
    """Drop, in place, the header fields a Connection header lists (parts: 4 per header)."""
    if len(values) == 1 and values[0].lower() in _PLAIN_CONNECTION:
        return  # the common case: nothing is listed
    listed = {t.strip().lower() for v in values for t in v.split(b",")}
    listed -= {b"", b"close", b"keep-alive"}
    if not listed:
        return
    kept = parts[:start]
    for i in range(start, len(parts), 4):
        if parts[i].lower() not in listed:
            kept += parts[i : i + 4]
    parts[:] = kept


_SCHEMES = {b"http": b"http", b"https": b"https"}
_AUTHORITY_END = re.compile(rb"[/?#]")


class Redirects:
    """A route's `proxy_redirect default`: a Location or Content-Location naming the route's
    upstream (any endpoint, by the authority the gateway sends it as Host, or with its port
    spelled out) under its base path is given back as the address the client used: its
    scheme and host, then the route's prefix when strip_prefix removed it. An absolute path
    (`/api/v2/7`) is mapped the same way, kept relative, when the route changes paths
    (strip_prefix or a base path). Anything else (other hosts, paths outside the base path)
    passes unchanged."""

    __slots__ = ("authorities", "base", "maps_paths", "prefix")

    def __init__(
        self, endpoints: Iterable[Upstream], base_path: str, prefix: str, strip: bool
    ) -> None:
        names: set[bytes] = set()
        for up in endpoints:
            host = (f"[{up.host}]" if ":" in up.host else up.host).lower().encode()
            names.add(b"%s:%d" % (host, up.port))
            if up.port == (443 if up.scheme == "https" else 80):
                names.add(host)
        self.authorities = frozenset(names)
        self.base = base_path.encode()
        self.prefix = prefix.encode() if strip and prefix != "/" else b""
        self.maps_paths = bool(self.base or self.prefix)

    def rewrite(self, value: bytes, inbound: Inbound, scheme: bytes) -> bytes:
        head = value[:8].lower()
        if head.startswith(b"http://"):
            start = 7
        elif head.startswith(b"https://"):
            start = 8
        elif value[:1] == b"/" and value[1:2] != b"/" and self.maps_paths:
            path = self._client_path(value)
            return value if path is None else path
        else:
            return value
        found = _AUTHORITY_END.search(value, start)
        end = found.start() if found is not None else len(value)
        if value[start:end].lower() not in self.authorities:
            return value
        path = self._client_path(value[end:])
        if path is None:
            return value
        host = _client_host(inbound)
        if host is None:
            return path  # no Host (HTTP/1.0): relative to whatever the client asked
        proto = inbound.forwarded_proto  # only ever set from a trusted proxy
        if proto is not None:
            scheme = _SCHEMES.get(proto.partition(b",")[0].strip().lower(), scheme)
        return b"".join((scheme, b"://", host, path))

    def _client_path(self, rest: bytes) -> bytes | None:
        """`rest` (path, query, fragment as the upstream wrote them) as the client's path, or
        None when it is outside the base path."""
        base = self.base
        if base:
            if not rest.startswith(base):
                return None
            rest = rest[len(base) :]
            if rest and rest[:1] not in b"/?#":
                return None
        if self.prefix:
            return self.prefix + rest
        return rest if rest[:1] == b"/" else b"/" + rest


def _client_host(inbound: Inbound) -> bytes | None:
    """The host (and port) the client addressed: X-Forwarded-Host from a trusted proxy (its
    first entry, when valid), else the Host header (checked by routing)."""
    forwarded = inbound.forwarded_host
    if forwarded is not None:
        first = forwarded.partition(b",")[0].strip()
        if host_name(first):
            return first
    return inbound.host or None
