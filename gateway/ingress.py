"""What an ingress says of the request it asks about (decision mode): the original method,
target and Host, read from the headers of its dialect. Pure: a decision request's head in,
a description or the reason it is not one out.

Dialects:
- nginx `auth_request` (as shipped in examples/nginx): `X-Original-URI`, `X-Original-Method`,
  and the original Host as the decision request's own `Host`;
- ingress-nginx `auth-url`: `X-Original-URL` (scheme://host/path?query), `X-Original-Method`;
- Traefik ForwardAuth, Caddy `forward_auth`: `X-Forwarded-Uri`, `X-Forwarded-Method`,
  `X-Forwarded-Host` (and `-Proto`, not needed to decide);
- Envoy `ext_authz` (HTTP service): the original path and query appended to the decision
  path, the original method and Host as the decision request's own.

Several sources of one fact must agree byte for byte, and one header given twice is refused:
a description that could be read two ways is never read the permissive way. Nothing here
trusts anyone; the caller answers only peers in `trusted_proxies`.
"""

from __future__ import annotations

from typing import NamedTuple

from gateway.routing import host_name

# Methods the proxy listener's parser (llhttp) accepts: any other is refused there, so it is
# refused in a description too, never routed as an unknown method that no route lists.
PARSED_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH "
    b"SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY "
    b"SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)

_URL = b"x-original-url"
_URI = b"x-original-uri"
_FORWARDED_URI = b"x-forwarded-uri"
_ORIGINAL_METHOD = b"x-original-method"
_FORWARDED_METHOD = b"x-forwarded-method"
_FORWARDED_HOST = b"x-forwarded-host"
_READ = frozenset(
    {_URL, _URI, _FORWARDED_URI, _ORIGINAL_METHOD, _FORWARDED_METHOD, _FORWARDED_HOST}
)


DESCRIPTION_HEADERS = _READ  # what a decision request's header scan collects
TWICE = b""  # in a collected description: the spelling of a header given twice

# Header spelling -> the folded name when it is one of `_READ`, else None: decided once per
# spelling (a bounded number of them), as the header policy does.
_KEYS: dict[bytes, bytes | None] = {}
_UNSEEN = b"?"


def _key(name: bytes) -> bytes | None:
    lower = name.lower()
    key = lower if lower in _READ else None
    if len(_KEYS) < 4096:
        _KEYS[name] = key
    return key


class Original(NamedTuple):
    """The request asked about, as its client sent it: routed like a proxied request."""

    method: bytes
    target: bytes  # origin-form path and query, not yet normalised
    host: bytes | None  # Host header value (may carry a port); None: none was named


def describe(
    headers: list[tuple[bytes, bytes]],
    own_method: bytes,
    own_host: bytes | None,
    suffix: bytes | None,
) -> Original | str:
    """`suffix`: what followed the decision path in the decision request's target (Envoy's
    form), or None. A str is the reason the head does not describe one request."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        key = _KEYS.get(name, _UNSEEN)
        if key is _UNSEEN:
            key = _key(name)
        if key is not None:
            if key in found:
                return f"{name.decode('latin-1')} is given twice"
            found[key] = value.strip(b" \t")
    return describe_found(found, own_method, own_host, suffix)


def describe_found(
    found: dict[bytes, bytes] | None,
    own_method: bytes,
    own_host: bytes | None,
    suffix: bytes | None,
) -> Original | str:
    """`describe` over the description headers already collected (lower-case name ->
    value, each given once; `TWICE` -> the spelling of one given twice), as the header
    scan of a decision request collects them."""
    if found is None:
        found = {}
    elif TWICE in found:
        return f"{found[TWICE].decode('latin-1')} is given twice"
    url = found.get(_URL)
    url_host: bytes | None = None
    targets: list[bytes] = []
    if url is not None:
        split = _split_url(url)
        if split is None:
            return "X-Original-URL is not an absolute http(s) URL"
        url_host, url_target = split
        targets.append(url_target)
    for key in (_URI, _FORWARDED_URI):
        if key in found:
            targets.append(found[key])
    if suffix is not None:
        targets.append(suffix)
    if not targets:
        return "no original URI (X-Original-URI, X-Forwarded-Uri or X-Original-URL)"
    target = targets[0]
    if any(t != target for t in targets):
        return "the original URI is given differently by two headers"

    methods = [found[k] for k in (_ORIGINAL_METHOD, _FORWARDED_METHOD) if k in found]
    if suffix is not None:
        methods.append(own_method)  # Envoy sends the check with the original method
    if not methods:
        return "no original method (X-Original-Method or X-Forwarded-Method)"
    method = methods[0]
    if any(m != method for m in methods):
        return "the original method is given differently by two headers"
    if method not in PARSED_METHODS:
        return "the original method is not a known HTTP method"

    forwarded_host = found.get(_FORWARDED_HOST)
    if url_host is not None:
        host: bytes | None = url_host
    elif _URI in found or suffix is not None:
        host = own_host  # nginx (Host set to $host), Envoy (Host is the original :authority)
    elif forwarded_host is not None:
        return Original(method, target, forwarded_host)  # Traefik, Caddy
    else:
        host = own_host
    if forwarded_host is not None:
        named = host_name(host)
        if named is None or named != host_name(forwarded_host):
            return "X-Forwarded-Host names another host than the original request"
    return Original(method, target, host)


def _split_url(url: bytes) -> tuple[bytes, bytes] | None:
    """`scheme://authority/path?query` -> (authority, "/path?query")."""
    scheme, sep, rest = url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    slash = rest.find(b"/")
    if slash <= 0:
        return None
    authority = rest[:slash]
    if b"@" in authority or b"?" in authority or b"#" in authority:
        return None
    return authority, rest[slash:]
