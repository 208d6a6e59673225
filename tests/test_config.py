"""Config parsing and validation: every problem is one `key.path: message` line."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import (
    Address,
    AuthleteConfig,
    CacheConfig,
    Config,
    ConfigError,
    HeadersConfig,
    Upstream,
    load_config,
    parse_config,
    share_budget,
    summary,
)

# The example from the configuration reference, verbatim.
EXAMPLE = """\
listen: "0.0.0.0:8080"            # proxy listener ("[::]:8080" for IPv6)
admin_listen: "127.0.0.1:9090"    # /healthz /readyz /metrics
realm: "gateway"                  # realm of the bare 401 challenge
upstream_timeout: 30              # seconds; a route may set its own `timeout`
shutdown_timeout: 10              # seconds in-flight requests get after SIGTERM
max_token_bytes: 4096             # longer bearer tokens get 400 before any lookup
authlete:
  base_url: "https://us.authlete.com"
  service_id: "715948317"
  access_token: "${AUTHLETE_ACCESS_TOKEN}"
  timeout: 2.0                    # whole introspection call
cache:
  ttl: 60                         # upper bound for an active token's entry (0 = no caching)
  negative_ttl: 5                 # how long an UNAUTHORIZED answer is remembered (0 = not at all)
  max_entries: 100000             # active verdicts; the oldest is evicted first
  negative_max_entries: 10000     # UNAUTHORIZED verdicts, bounded separately
headers:                          # injected upstream; defaults shown
  subject: X-Auth-Subject
  scopes: X-Auth-Scopes
  client_id: X-Auth-Client-Id
routes:                           # first match wins; no match -> 404 from the gateway
  - name: public                  # optional; the metrics label (default: the path_prefix)
    path_prefix: /public
    upstream: "http://127.0.0.1:8000"
    auth: none                    # default is "required"
  - name: orders
    path_prefix: /orders
    methods: [GET, POST]          # optional; other methods do not match this route
    upstream: "http://127.0.0.1:8001"
    scopes: [orders.read]         # all required
    timeout: 5                    # optional; overrides upstream_timeout
"""

SECRET = "s3cr3t-service-token"


def _problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env=env or {})
    problems = info.value.problems
    assert problems, "a ConfigError must carry at least one problem"
    assert str(info.value) == "\n".join(problems)
    for line in problems:
        assert "\n" not in line
        assert "Traceback" not in line
    return problems


# --------------------------------------------------------------------------- valid files


def test_full_example_parses() -> None:
    cfg = parse_config(EXAMPLE, env={"AUTHLETE_ACCESS_TOKEN": SECRET})
    assert cfg.listen == Address("0.0.0.0", 8080)
    assert cfg.admin_listen == Address("127.0.0.1", 9090)
    assert cfg.realm == "gateway"
    assert cfg.upstream_timeout == 30.0
    assert cfg.shutdown_timeout == 10.0
    assert cfg.max_token_bytes == 4096
    assert cfg.authlete == AuthleteConfig(
        base_url="https://us.authlete.com",
        service_id="715948317",
        access_token=SECRET,
        timeout=2.0,
    )
    assert cfg.authlete.access_token == SECRET
    assert (
        cfg.authlete.introspection_url == "https://us.authlete.com/api/715948317/auth/introspection"
    )
    assert cfg.cache == CacheConfig(
        ttl=60.0, negative_ttl=5.0, max_entries=100_000, negative_max_entries=10_000
    )
    assert cfg.headers == HeadersConfig("X-Auth-Subject", "X-Auth-Scopes", "X-Auth-Client-Id")
    assert len(cfg.routes) == 2
    public, orders = cfg.routes
    assert public.name == "public"
    assert public.path_prefix == "/public"
    assert public.methods is None
    assert public.upstream == Upstream("http", "127.0.0.1", 8000)
    assert public.upstream.origin == "http://127.0.0.1:8000"
    assert public.auth_required is False
    assert public.scopes == ()
    assert public.timeout == 30.0
    assert orders.name == "orders"
    assert orders.path_prefix == "/orders"
    assert orders.methods == frozenset({"GET", "POST"})
    assert orders.upstream == Upstream("http", "127.0.0.1", 8001)
    assert orders.auth_required is True
    assert orders.scopes == ("orders.read",)
    assert orders.timeout == 5.0


def test_service_token_never_in_repr() -> None:
    cfg = parse_config(EXAMPLE, env={"AUTHLETE_ACCESS_TOKEN": SECRET})
    assert SECRET not in repr(cfg)
    assert SECRET not in repr(cfg.authlete)
    assert SECRET not in str(cfg)


def test_config_is_frozen() -> None:
    cfg = parse_config(EXAMPLE, env={"AUTHLETE_ACCESS_TOKEN": SECRET})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.realm = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.routes[0].path_prefix = "/"  # type: ignore[misc]


MINIMAL = """\
authlete:
  base_url: "https://us.authlete.com/"
  service_id: "715948317"
  access_token: tok
routes:
  - path_prefix: /orders/
    upstream: "https://orders.internal"
"""


def test_defaults() -> None:
    cfg = parse_config(MINIMAL, env={})
    assert cfg.listen == Address("0.0.0.0", 8080)
    assert cfg.admin_listen == Address("127.0.0.1", 9090)
    assert cfg.realm == "gateway"
    assert cfg.upstream_timeout == 30.0
    assert cfg.shutdown_timeout == 10.0
    assert cfg.max_token_bytes == 4096
    assert cfg.authlete.timeout == 2.0
    assert cfg.authlete.base_url == "https://us.authlete.com"  # trailing slash dropped
    assert (
        cfg.authlete.introspection_url == "https://us.authlete.com/api/715948317/auth/introspection"
    )
    assert cfg.cache == CacheConfig(60.0, 5.0, 100_000, 10_000)
    assert cfg.headers == HeadersConfig()
    assert cfg.headers == HeadersConfig("X-Auth-Subject", "X-Auth-Scopes", "X-Auth-Client-Id")
    (route,) = cfg.routes
    assert route.path_prefix == "/orders"  # trailing slash of a prefix is not significant
    assert route.name == "/orders"  # default name: the path_prefix
    assert route.methods is None
    assert route.auth_required is True
    assert route.scopes == ()
    assert route.timeout == 30.0
    assert route.upstream == Upstream("https", "orders.internal", 443)


def test_route_timeout_defaults_to_upstream_timeout() -> None:
    cfg = parse_config("upstream_timeout: 12.5\n" + MINIMAL, env={})
    assert cfg.upstream_timeout == 12.5
    assert cfg.routes[0].timeout == 12.5


def test_negative_max_entries_defaults_to_a_tenth() -> None:
    cfg = parse_config(MINIMAL + "cache:\n  max_entries: 500\n", env={})
    assert cfg.cache.max_entries == 500
    assert cfg.cache.negative_max_entries == 50


def test_zero_durations_allowed_where_documented() -> None:
    text = MINIMAL + "shutdown_timeout: 0\ncache:\n  ttl: 0\n  negative_ttl: 0\n"
    cfg = parse_config(text, env={})
    assert cfg.shutdown_timeout == 0.0
    assert cfg.cache.ttl == 0.0
    assert cfg.cache.negative_ttl == 0.0


def test_values_normalised() -> None:
    text = """\
listen: "[::]:8443"
admin_listen: "127.0.0.1:0"
authlete:
  {base_url: "http://127.0.0.1:18400", allow_insecure_http: true, service_id: s, access_token: t}
routes:
  - {name: a, path_prefix: /, upstream: "http://[::1]:9000", methods: [get, Post]}
  - {name: b, path_prefix: /b, upstream: "HTTP://Example.COM"}
  - {name: c, path_prefix: /c, upstream: "http://h:8080/"}
"""
    cfg = parse_config(text, env={})
    assert cfg.listen == Address("::", 8443)
    assert cfg.admin_listen == Address("127.0.0.1", 0)
    a, b, c = cfg.routes
    assert a.path_prefix == "/"
    assert a.upstream == Upstream("http", "::1", 9000)
    assert a.upstream.origin == "http://[::1]:9000"
    assert a.methods == frozenset({"GET", "POST"})
    assert b.upstream == Upstream("http", "example.com", 80)
    assert c.upstream == Upstream("http", "h", 8080)


# --------------------------------------------------------------------------- invalid files

BASE: dict[str, Any] = {
    "authlete": {
        "base_url": "http://127.0.0.1:18400",
        "allow_insecure_http": True,
        "service_id": "715948317",
        "access_token": "tok",
    },
    "routes": [
        {
            "name": "public",
            "path_prefix": "/public",
            "upstream": "http://127.0.0.1:8000",
            "auth": "none",
        },
        {
            "name": "orders",
            "path_prefix": "/orders",
            "upstream": "http://127.0.0.1:8001",
            "scopes": ["orders.read"],
        },
    ],
}


def test_base_is_valid() -> None:
    assert isinstance(parse_config(yaml.safe_dump(BASE), env={}), Config)


Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    """`_set("routes.1.upstream", x)`: set a value deep in a copy of BASE."""

    def apply(raw: dict[str, Any]) -> None:
        node: Any = raw
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return apply


def _del(path: str) -> Mutation:
    def apply(raw: dict[str, Any]) -> None:
        node: Any = raw
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[keys[-1]]

    return apply


NAME_HINT = "not a valid scope name (one name, no spaces or quotes)"

INVALID: list[tuple[str, list[Mutation], list[str]]] = [
    # unknown keys, at every level
    ("unknown-top", [_set("bogus", 1)], ["bogus: unknown key"]),
    ("typo-top", [_set("upstream_timout", 3)], ["upstream_timout: unknown key"]),
    ("unknown-authlete", [_set("authlete.url", "x")], ["authlete.url: unknown key"]),
    ("unknown-cache", [_set("cache.size", 1)], ["cache.size: unknown key"]),
    ("unknown-headers", [_set("headers.user", "X-User")], ["headers.user: unknown key"]),
    ("unknown-route", [_set("routes.1.scope", ["a"])], ["routes[1].scope: unknown key"]),
    # wrong types
    ("authlete-not-map", [_set("authlete", "x")], ["authlete: must be a mapping"]),
    ("cache-not-map", [_set("cache", [1])], ["cache: must be a mapping"]),
    ("headers-not-map", [_set("headers", "X")], ["headers: must be a mapping"]),
    ("routes-not-list", [_set("routes", {"a": 1})], ["routes: must be a list of routes"]),
    ("routes-empty", [_set("routes", [])], ["routes: at least one route is required"]),
    ("route-not-map", [_set("routes.1", "x")], ["routes[1]: must be a mapping"]),
    ("realm-list", [_set("realm", ["a"])], ["realm: must be a string"]),
    (
        "realm-quote",
        [_set("realm", 'a"b')],
        ["realm: must be printable ASCII without quotes or backslashes"],
    ),
    (
        "timeout-unit",
        [_set("upstream_timeout", "30s")],
        ["upstream_timeout: must be a number (seconds)"],
    ),
    (
        "timeout-bool",
        [_set("upstream_timeout", True)],
        ["upstream_timeout: must be a number (seconds)"],
    ),
    (
        "timeout-list",
        [_set("shutdown_timeout", [1])],
        ["shutdown_timeout: must be a number (seconds)"],
    ),
    (
        "authlete-timeout-str",
        [_set("authlete.timeout", "fast")],
        ["authlete.timeout: must be a number (seconds)"],
    ),
    ("ttl-str", [_set("cache.ttl", "1m")], ["cache.ttl: must be a number (seconds)"]),
    ("max-token-float", [_set("max_token_bytes", 1.5)], ["max_token_bytes: must be an integer"]),
    (
        "max-entries-str",
        [_set("cache.max_entries", "many")],
        ["cache.max_entries: must be an integer"],
    ),
    ("max-entries-zero", [_set("cache.max_entries", 0)], ["cache.max_entries: must be >= 1"]),
    (
        "scopes-str",
        [_set("routes.1.scopes", "orders.read")],
        ["routes[1].scopes: must be a list of scope names"],
    ),
    (
        "auth-other",
        [_set("routes.1.auth", "optional")],
        ['routes[1].auth: must be "required" or "none"'],
    ),
    # upstream / base_url
    (
        "upstream-ftp",
        [_set("routes.1.upstream", "ftp://x")],
        ["routes[1].upstream: not an http(s) URL"],
    ),
    (
        "upstream-words",
        [_set("routes.1.upstream", "not a url")],
        ["routes[1].upstream: not an http(s) URL"],
    ),
    (
        "upstream-no-scheme",
        [_set("routes.1.upstream", "127.0.0.1:8001")],
        ["routes[1].upstream: not an http(s) URL"],
    ),
    (
        "upstream-no-host",
        [_set("routes.1.upstream", "http://")],
        ["routes[1].upstream: not an http(s) URL"],
    ),
    (
        "upstream-bad-port",
        [_set("routes.1.upstream", "http://h:99999")],
        ["routes[1].upstream: not an http(s) URL"],
    ),
    (
        "upstream-number",
        [_set("routes.1.upstream", 8001)],
        ["routes[1].upstream: not an http(s) URL"],
    ),
    (
        "upstream-query",
        [_set("routes.1.upstream", "http://h/api?x=1")],
        ["routes[1].upstream: must not contain a query or fragment"],
    ),
    (
        "upstream-creds",
        [_set("routes.1.upstream", "http://u:p@h")],
        ["routes[1].upstream: must not contain credentials"],
    ),
    (
        "base-url-ftp",
        [_set("authlete.base_url", "ftp://x")],
        ["authlete.base_url: not an http(s) URL"],
    ),
    (
        "base-url-words",
        [_set("authlete.base_url", "us.authlete.com")],
        ["authlete.base_url: not an http(s) URL"],
    ),
    # missing required keys
    (
        "no-authlete",
        [_del("authlete")],
        ["authlete: is required (base_url, service_id, access_token)"],
    ),
    ("no-access-token", [_del("authlete.access_token")], ["authlete.access_token: is required"]),
    ("no-base-url", [_del("authlete.base_url")], ["authlete.base_url: is required"]),
    (
        "authlete-empty",
        [_set("authlete", {})],
        [
            "authlete.base_url: is required",
            "authlete.service_id: is required",
            "authlete.access_token: is required",
        ],
    ),
    ("no-routes", [_del("routes")], ["routes: at least one route is required"]),
    (
        "route-no-upstream",
        [_del("routes.1.upstream")],
        ["routes[1].upstream: is required (a route without one needs decision mode: `decision:`)"],
    ),
    ("route-no-prefix", [_del("routes.1.path_prefix")], ["routes[1].path_prefix: is required"]),
    (
        "empty-access-token",
        [_set("authlete.access_token", "")],
        ["authlete.access_token: must not be empty"],
    ),
    # listen addresses
    ("listen-port-only", [_set("listen", "8080")], ['listen: must be "host:port"']),
    ("listen-int", [_set("listen", 8080)], ['listen: must be "host:port"']),
    ("listen-no-host", [_set("listen", ":8080")], ['listen: must be "host:port"']),
    ("listen-big-port", [_set("listen", "127.0.0.1:99999")], ["listen: invalid port '99999'"]),
    ("listen-named-port", [_set("listen", "127.0.0.1:http")], ["listen: invalid port 'http'"]),
    (
        "listen-bare-ipv6",
        [_set("listen", "::1:8080")],
        ['listen: IPv6 hosts must be written "[addr]:port"'],
    ),
    (
        "admin-bad-ipv6",
        [_set("admin_listen", "[zz]:9090")],
        ["admin_listen: invalid IPv6 address 'zz'"],
    ),
    (
        "admin-same",
        [_set("listen", "127.0.0.1:8080"), _set("admin_listen", "127.0.0.1:8080")],
        ["admin_listen: must differ from listen"],
    ),
    ("admin-same-any", [_set("listen", "0.0.0.0:9090")], ["admin_listen: must differ from listen"]),
    # methods
    (
        "methods-str",
        [_set("routes.1.methods", "GET")],
        ["routes[1].methods: must be a non-empty list of HTTP methods"],
    ),
    (
        "methods-empty",
        [_set("routes.1.methods", [])],
        ["routes[1].methods: must be a non-empty list of HTTP methods"],
    ),
    (
        "methods-space",
        [_set("routes.1.methods", ["GET", "GE T"])],
        ["routes[1].methods[1]: not a valid HTTP method"],
    ),
    (
        "methods-slash",
        [_set("routes.1.methods", ["GET/POST"])],
        ["routes[1].methods[0]: not a valid HTTP method"],
    ),
    # auth: none with scopes
    (
        "none-with-scopes",
        [_set("routes.0.scopes", ["a"])],
        ["routes[0].scopes: not allowed with auth: none"],
    ),
    # scope names
    (
        "scope-space",
        [_set("routes.1.scopes", ["orders read"])],
        [f"routes[1].scopes[0]: {NAME_HINT}"],
    ),
    (
        "scope-quote",
        [_set("routes.1.scopes", ["ok", 'a"b'])],
        [f"routes[1].scopes[1]: {NAME_HINT}"],
    ),
    ("scope-backslash", [_set("routes.1.scopes", ["a\\b"])], [f"routes[1].scopes[0]: {NAME_HINT}"]),
    ("scope-empty", [_set("routes.1.scopes", [""])], ["routes[1].scopes[0]: must not be empty"]),
    # path_prefix
    (
        "prefix-dotdot",
        [_set("routes.1.path_prefix", "/public/../admin")],
        ["routes[1].path_prefix: must be a normalised path (did you mean '/admin'?)"],
    ),
    (
        "prefix-dot",
        [_set("routes.1.path_prefix", "/orders/./x")],
        ["routes[1].path_prefix: must be a normalised path (did you mean '/orders/x'?)"],
    ),
    (
        "prefix-escape",
        [_set("routes.1.path_prefix", "/%6frders")],
        ["routes[1].path_prefix: must be a normalised path (did you mean '/orders'?)"],
    ),
    (
        "prefix-relative",
        [_set("routes.1.path_prefix", "orders")],
        ['routes[1].path_prefix: must start with "/"'],
    ),
    (
        "prefix-query",
        [_set("routes.1.path_prefix", "/orders?x=1")],
        ["routes[1].path_prefix: must not contain a query or fragment"],
    ),
    (
        "prefix-double-slash",
        [_set("routes.1.path_prefix", "/orders//x")],
        ["routes[1].path_prefix: invalid path: empty path segment (repeated slash)"],
    ),
    (
        "prefix-encoded-slash",
        [_set("routes.1.path_prefix", "/a%2fb")],
        ["routes[1].path_prefix: invalid path: encoded slash"],
    ),
    (
        "prefix-escapes-root",
        [_set("routes.1.path_prefix", "/..")],
        ["routes[1].path_prefix: invalid path: path escapes the root"],
    ),
    # identity headers
    (
        "header-dup",
        [_set("headers.subject", "X-User"), _set("headers.scopes", "x-user")],
        ["headers.scopes: duplicates another identity header"],
    ),
    (
        "header-dup-underscore",
        [_set("headers.subject", "X-User"), _set("headers.client_id", "X_User")],
        ["headers.client_id: duplicates another identity header"],
    ),
    (
        "header-authorization",
        [_set("headers.client_id", "Authorization")],
        ["headers.client_id: Authorization is reserved by the proxy"],
    ),
    (
        "header-host",
        [_set("headers.subject", "host")],
        ["headers.subject: host is reserved by the proxy"],
    ),
    (
        "header-connection",
        [_set("headers.scopes", "Connection")],
        ["headers.scopes: Connection is reserved by the proxy"],
    ),
    (
        "header-xff",
        [_set("headers.subject", "X-Forwarded-For")],
        ["headers.subject: X-Forwarded-For is reserved by the proxy"],
    ),
    (
        "header-xff-underscore",
        [_set("headers.subject", "X_Forwarded_For")],
        ["headers.subject: X_Forwarded_For is reserved by the proxy"],
    ),
    (
        "header-bad-name",
        [_set("headers.subject", "X User")],
        ["headers.subject: not a valid header name"],
    ),
    (
        "header-colon",
        [_set("headers.scopes", "X-Scopes:")],
        ["headers.scopes: not a valid header name"],
    ),
    # negative durations
    ("neg-upstream-timeout", [_set("upstream_timeout", -1)], ["upstream_timeout: must be > 0"]),
    ("zero-upstream-timeout", [_set("upstream_timeout", 0)], ["upstream_timeout: must be > 0"]),
    ("neg-shutdown", [_set("shutdown_timeout", -1)], ["shutdown_timeout: must be >= 0"]),
    ("neg-authlete-timeout", [_set("authlete.timeout", -2)], ["authlete.timeout: must be > 0"]),
    ("neg-ttl", [_set("cache.ttl", -1)], ["cache.ttl: must be >= 0"]),
    ("neg-negative-ttl", [_set("cache.negative_ttl", -0.5)], ["cache.negative_ttl: must be >= 0"]),
    ("neg-route-timeout", [_set("routes.1.timeout", -5)], ["routes[1].timeout: must be > 0"]),
    (
        "nan-timeout",
        [_set("upstream_timeout", float("nan"))],
        ["upstream_timeout: must be a number (seconds)"],
    ),
    (
        "inf-timeout",
        [_set("upstream_timeout", float("inf"))],
        ["upstream_timeout: must be a number (seconds)"],
    ),
    # route names
    (
        "dup-route-name",
        [_set("routes.1.name", "public")],
        ["routes[1].name: duplicate route name 'public'"],
    ),
    # the second hardening round
    (
        "head-under-a-line",
        [_set("limits.max_head_bytes", 4096)],
        ["limits.max_head_bytes: must be at least limits.max_header_bytes (one header line)"],
    ),
    (
        "buffered-under-a-head",
        [_set("limits.max_buffered_bytes", 65536), _set("limits.max_head_bytes", 131072)],
        ["limits.max_buffered_bytes: must be at least limits.max_head_bytes (one head)"],
    ),
    (
        "per-client-negative",
        [_set("limits.max_connections_per_client", -1)],
        ["limits.max_connections_per_client: must be >= 0"],
    ),
    (
        "buffering-unknown",
        [_set("limits.request_buffering", "sometimes")],
        ['limits.request_buffering: must be "on", "off" or "auto"'],
    ),
    (
        "route-buffering-number",
        [_set("routes.1.request_buffering", 1)],
        ['routes[1].request_buffering: must be "on", "off" or "auto"'],
    ),
    (
        "forward-authorization-word",
        [_set("routes.1.forward_authorization", "never")],
        ["routes[1].forward_authorization: must be true or false"],
    ),
    (
        "token-pattern-not-regex",
        [_set("authlete.token_pattern", "[a-z")],
        [
            "authlete.token_pattern: not a regular expression: unterminated character set at "
            "position 0"
        ],
    ),
    (
        "refresh-ahead-whole-life",
        [_set("cache.refresh_ahead", 1)],
        ["cache.refresh_ahead: must be a fraction below 1 (0 turns it off)"],
    ),
    (
        "header-star-inside",
        [_set("headers.drop_from_untrusted", ["x-*-user"])],
        ["headers.drop_from_untrusted[0]: '*' may only end a name (a prefix: x-internal-*)"],
    ),
    (
        "header-in-both-lists",
        [
            _set("headers.drop_from_untrusted", ["X-Team"]),
            _set("headers.allow_from_untrusted", ["x_team"]),
        ],
        ["headers.allow_from_untrusted: x-team also in drop_from_untrusted"],
    ),
    # shared state and the admin token
    (
        "shared-empty",
        [_set("shared", {})],
        [
            "shared.redis_url: is required when shared is set",
            "shared.secret: is required when shared is set",
        ],
    ),
    (
        "shared-bad-scheme",
        [_set("shared", {"redis_url": "http://redis:6379", "secret": "x" * 32})],
        ["shared.redis_url: not a redis://, rediss:// or unix:// URL"],
    ),
    (
        "shared-no-host",
        [_set("shared", {"redis_url": "redis:///0", "secret": "x" * 32})],
        ["shared.redis_url: redis:// needs a host"],
    ),
    (
        "shared-short-secret",
        [_set("shared", {"redis_url": "redis://r:6379", "secret": "short"})],
        ["shared.secret: must be at least 32 bytes (a random key)"],
    ),
    (
        "shared-unknown",
        [_set("shared", {"redis_url": "redis://r", "secret": "x" * 32, "ttl": 3})],
        ["shared.ttl: unknown key"],
    ),
    (
        "shared-ca-without-tls",
        [
            _set(
                "shared",
                {"redis_url": "redis://r", "secret": "x" * 32, "tls": {"ca_file": __file__}},
            )
        ],
        ["shared.tls.ca_file: only applies to a rediss:// redis_url"],
    ),
    (
        "shared-bad-numbers",
        [
            _set(
                "shared",
                {
                    "redis_url": "redis://r",
                    "secret": "x" * 32,
                    "local_ttl": 0,
                    "timeout": -1,
                    "expected_replicas": 0,
                },
            )
        ],
        [
            "shared.local_ttl: must be > 0",
            "shared.timeout: must be > 0",
            "shared.expected_replicas: must be >= 1",
        ],
    ),
    (
        "admin-short-token",
        [_set("admin", {"token": "short"})],
        [
            "admin.token: must be at least 16 characters",
        ],
    ),
    ("admin-unknown", [_set("admin", {"tokens": "x"})], ["admin.tokens: unknown key"]),
]


@pytest.mark.parametrize(
    ("value", "mode"),
    [(True, "on"), (False, "off"), ("on", "on"), ("OFF", "off"), ("auto", "auto")],
)
def test_request_buffering_values(value: Any, mode: str) -> None:
    raw = copy.deepcopy(BASE)
    raw["limits"] = {"request_buffering": value}
    raw["routes"][0]["request_buffering"] = "on"
    cfg = parse_config(yaml.safe_dump(raw), env={})
    assert cfg.limits.request_buffering == mode
    assert cfg.routes[0].request_buffering == "on"  # a route's own setting wins
    assert cfg.routes[1].request_buffering == mode  # else the limits default


def test_second_hardening_round_defaults() -> None:
    cfg = parse_config(yaml.safe_dump(BASE), env={})
    limits = cfg.limits
    assert (limits.max_head_bytes, limits.max_buffered_bytes) == (65536, 64 * 1024 * 1024)
    assert limits.max_connections_per_client == 0
    assert (limits.min_body_rate, limits.min_body_rate_window) == (512, 10.0)
    assert (limits.request_buffering, limits.request_buffer_memory_bytes) == ("auto", 65536)
    assert all(r.forward_authorization for r in cfg.routes)
    assert cfg.authlete.token_pattern is None
    assert cfg.authlete.rate_limit.per_client == 0
    assert cfg.cache.refresh_ahead == 0.1
    assert cfg.headers.drop_from_untrusted == cfg.headers.allow_from_untrusted == frozenset()


@pytest.mark.parametrize(
    ("mutations", "expected"),
    [(m, e) for _, m, e in INVALID],
    ids=[name for name, _, _ in INVALID],
)
def test_invalid(mutations: list[Mutation], expected: list[str]) -> None:
    raw = copy.deepcopy(BASE)
    for mutate in mutations:
        mutate(raw)
    assert _problems(yaml.safe_dump(raw)) == expected


@pytest.mark.parametrize("name", ["orders", None])
def test_path_prefix_with_params_is_refused(name: str | None) -> None:
    # `;` parameters are ignored when matching ("/orders;x/7" matches "/orders"), so a
    # prefix holding one could never match anything: a dead route. The problem is in
    # path_prefix, and the line must name that key (the one the user wrote).
    raw = copy.deepcopy(BASE)
    raw["routes"][1]["path_prefix"] = "/orders;v=1"
    if name is None:
        del raw["routes"][1]["name"]
    problems = _problems(yaml.safe_dump(raw))
    assert len(problems) == 1, problems
    assert problems[0].startswith("routes[1].path_prefix: "), problems


def test_several_problems_all_reported() -> None:
    text = """\
listen: "8080"
bogus: true
upstream_timeout: -3
authlete:
  base_url: "ftp://authlete"
  service_id: "715948317"
cache:
  ttl: "soon"
headers:
  subject: Authorization
routes:
  - name: public
    path_prefix: /public
    upstream: "http://127.0.0.1:8000"
    auth: none
    scopes: [x]
  - name: orders
    path_prefix: /orders
    upstream: "gopher://127.0.0.1:8001"
    methods: "GET"
    colour: blue
"""
    problems = _problems(text)
    expected = {
        'listen: must be "host:port"',
        "bogus: unknown key",
        "upstream_timeout: must be > 0",
        "authlete.base_url: not an http(s) URL",
        "authlete.access_token: is required",
        "cache.ttl: must be a number (seconds)",
        "headers.subject: Authorization is reserved by the proxy",
        "routes[0].scopes: not allowed with auth: none",
        "routes[1].upstream: not an http(s) URL",
        "routes[1].methods: must be a non-empty list of HTTP methods",
        "routes[1].colour: unknown key",
    }
    assert set(problems) == expected
    assert len(problems) == len(expected)  # each problem once


# --------------------------------------------------------------------------- raw YAML


@pytest.mark.parametrize(
    "text",
    ["routes: [\n", "a: b\n c: d\n", "a:\n\tb: 1\n", "listen: 'unterminated\n", "{a: 1\n"],
)
def test_yaml_syntax_error_is_one_line(text: str) -> None:
    problems = _problems(text)
    assert len(problems) == 1
    assert problems[0].startswith("config: invalid YAML at line "), problems


@pytest.mark.parametrize("text", ["", "\n", "# just a comment\n", "---\n", "~\n", "null\n"])
def test_empty_file(text: str) -> None:
    assert _problems(text) == [
        "authlete: is required (base_url, service_id, access_token)",
        "routes: at least one route is required",
    ]


@pytest.mark.parametrize("text", ["- a\n- b\n", "hello\n", "42\n", "true\n", '"x"\n'])
def test_non_mapping_file(text: str) -> None:
    assert _problems(text) == ["config: must be a mapping of settings"]


# --------------------------------------------------------------------------- environment

AUTH_ENV = """\
authlete:
  base_url: "http://127.0.0.1:18400"
  allow_insecure_http: true
  service_id: "715948317"
  access_token: "{token}"
routes:
  - path_prefix: /orders
    upstream: "http://127.0.0.1:8001"
"""


def _with_token(expr: str, env: dict[str, str]) -> str:
    return parse_config(AUTH_ENV.format(token=expr), env=env).authlete.access_token


def test_env_var_substituted() -> None:
    assert _with_token("${AUTHLETE_ACCESS_TOKEN}", {"AUTHLETE_ACCESS_TOKEN": SECRET}) == SECRET
    assert _with_token("pre-${A}-mid-${B}-post", {"A": "1", "B": "2"}) == "pre-1-mid-2-post"


def test_env_var_unset_without_default() -> None:
    problems = _problems(AUTH_ENV.format(token="${AUTHLETE_ACCESS_TOKEN}"), {})
    assert problems == [
        "authlete.access_token: environment variable AUTHLETE_ACCESS_TOKEN is not set"
    ]


def test_unset_vars_reported_at_each_key() -> None:
    text = """\
listen: "127.0.0.1:${PROXY_PORT}"
authlete:
  base_url: "${AUTHLETE_URL}"
  service_id: "715948317"
  access_token: "${AUTHLETE_ACCESS_TOKEN}"
routes:
  - path_prefix: /orders
    upstream: "${ORDERS_URL}"
"""
    assert set(_problems(text, {})) == {
        "listen: environment variable PROXY_PORT is not set",
        "authlete.base_url: environment variable AUTHLETE_URL is not set",
        "authlete.access_token: environment variable AUTHLETE_ACCESS_TOKEN is not set",
        "routes[0].upstream: environment variable ORDERS_URL is not set",
    }


def test_env_default() -> None:
    assert _with_token("${TOK:-fallback}", {}) == "fallback"
    assert _with_token("${TOK:-fallback}", {"TOK": ""}) == "fallback"  # unset or empty
    assert _with_token("${TOK:-fallback}", {"TOK": "real"}) == "real"
    assert _with_token("${TOK:-a-b.c~d}", {}) == "a-b.c~d"


def test_dollar_dollar_escape() -> None:
    assert _with_token("pa$$word", {}) == "pa$word"
    assert _with_token("$${TOK}", {"TOK": "expanded"}) == "${TOK}"
    assert _with_token("$$$${TOK}", {"TOK": "x"}) == "$${TOK}"
    assert _with_token("$$${TOK}", {"TOK": "x"}) == "$x"


def test_env_in_list_items_and_route_fields() -> None:
    text = """\
authlete:
  base_url: "${AUTHLETE_URL:-http://127.0.0.1:18400}"
  allow_insecure_http: true
  service_id: "${SERVICE_ID}"
  access_token: tok
routes:
  - name: "${ROUTE_NAME:-orders}"
    path_prefix: "${PREFIX}"
    methods: ["${METHOD}", POST]
    upstream: "http://${ORDERS_HOST}:8001"
    scopes: ["${SCOPE}", "fixed"]
"""
    env = {
        "SERVICE_ID": "42",
        "PREFIX": "/orders",
        "METHOD": "get",
        "ORDERS_HOST": "orders.internal",
        "SCOPE": "orders.read",
    }
    cfg = parse_config(text, env=env)
    assert cfg.authlete.base_url == "http://127.0.0.1:18400"
    assert cfg.authlete.service_id == "42"
    (route,) = cfg.routes
    assert route.name == "orders"
    assert route.path_prefix == "/orders"
    assert route.methods == frozenset({"GET", "POST"})
    assert route.upstream == Upstream("http", "orders.internal", 8001)
    assert route.scopes == ("orders.read", "fixed")
    assert set(_problems(text, {**env, "SCOPE": "two words"})) == {
        "routes[0].scopes[0]: not a valid scope name (one name, no spaces or quotes)"
    }


def test_dollar_without_braces_is_literal() -> None:
    assert _with_token("a$b", {"b": "x"}) == "a$b"
    assert _with_token("tail$", {}) == "tail$"


def test_env_values_are_not_reinterpreted() -> None:
    # substitution happens after YAML parsing and is not recursive
    text = 'realm: "${REALM}"\n' + AUTH_ENV.format(token="${T}")
    cfg = parse_config(text, env={"REALM": "a: #b [c]", "T": "${OTHER}", "OTHER": "no"})
    assert cfg.realm == "a: #b [c]"
    assert cfg.authlete.access_token == "${OTHER}"


def test_numbers_from_env() -> None:
    text = """\
listen: "127.0.0.1:${PROXY_PORT:-8080}"
upstream_timeout: "${UPSTREAM_TIMEOUT}"
shutdown_timeout: ${SHUTDOWN_TIMEOUT:-7}
max_token_bytes: "${MAX_TOKEN_BYTES}"
authlete:
  base_url: "http://127.0.0.1:18400"
  allow_insecure_http: true
  service_id: "715948317"
  access_token: tok
  timeout: "${AUTHLETE_TIMEOUT:-2}"
cache:
  ttl: "${TTL}"
  max_entries: "${MAX_ENTRIES}"
routes:
  - path_prefix: /orders
    upstream: "http://127.0.0.1:8001"
    timeout: "${ROUTE_TIMEOUT}"
"""
    env = {
        "PROXY_PORT": "18080",
        "UPSTREAM_TIMEOUT": "2.5",
        "MAX_TOKEN_BYTES": "8192",
        "TTL": "0",
        "MAX_ENTRIES": "500",
        "ROUTE_TIMEOUT": " 4 ",
    }
    cfg = parse_config(text, env=env)
    assert cfg.listen == Address("127.0.0.1", 18080)
    assert cfg.upstream_timeout == 2.5
    assert cfg.shutdown_timeout == 7.0
    assert cfg.max_token_bytes == 8192
    assert cfg.authlete.timeout == 2.0
    assert cfg.cache.ttl == 0.0
    assert cfg.cache.max_entries == 500
    assert cfg.routes[0].timeout == 4.0
    assert isinstance(cfg.max_token_bytes, int)
    assert isinstance(cfg.cache.max_entries, int)

    bad = {**env, "UPSTREAM_TIMEOUT": "soon", "MAX_TOKEN_BYTES": "1.5", "TTL": "-1"}
    assert set(_problems(text, bad)) == {
        "upstream_timeout: must be a number (seconds)",
        "max_token_bytes: must be an integer",
        "cache.ttl: must be >= 0",
    }


# --------------------------------------------------------------------------- load_config


def test_load_config_reads_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(EXAMPLE, encoding="utf-8")
    cfg = load_config(path, env={"AUTHLETE_ACCESS_TOKEN": "from-arg"})
    assert cfg.authlete.access_token == "from-arg"
    monkeypatch.setenv("AUTHLETE_ACCESS_TOKEN", "from-os-environ")
    assert load_config(str(path)).authlete.access_token == "from-os-environ"
    monkeypatch.delenv("AUTHLETE_ACCESS_TOKEN")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        "authlete.access_token: environment variable AUTHLETE_ACCESS_TOKEN is not set"
    ]


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert len(info.value.problems) == 1
    line = info.value.problems[0]
    assert line.startswith("config: ")
    assert str(path) in line


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env={})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("config: ")


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"realm: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("config: ")


def test_authlete_base_url_must_be_https_unless_explicitly_allowed() -> None:
    text = """\
authlete: {base_url: "http://authlete.example", service_id: s, access_token: t}
routes: [{path_prefix: /, upstream: "http://u:1"}]
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("authlete.base_url: must be https")
    allowed = text.replace("access_token: t}", "access_token: t, allow_insecure_http: true}")
    assert parse_config(allowed, env={}).authlete.allow_insecure_http is True
    https = text.replace("http://authlete", "https://authlete")
    assert parse_config(https, env={}).authlete.base_url == "https://authlete.example"


def test_shared_section_parsed_with_secrets_from_the_environment() -> None:
    raw = copy.deepcopy(BASE)
    raw["shared"] = {
        "redis_url": "rediss://:${REDIS_PASSWORD}@redis.internal:6380/0",
        "secret": "${SHARED_SECRET}",
        "local_ttl": 2,
        "expected_replicas": 4,
    }
    raw["authlete"]["rate_limit"] = {"rate": 100, "burst": 200}
    raw["admin"] = {"token": "${ADMIN_TOKEN}"}
    env = {"REDIS_PASSWORD": "pw-123", "SHARED_SECRET": "k" * 40, "ADMIN_TOKEN": "a" * 20}
    cfg = parse_config(yaml.safe_dump(raw), env=env)
    shared = cfg.shared
    assert shared is not None
    assert shared.redis_url == "rediss://:pw-123@redis.internal:6380/0"
    assert shared.secret == b"k" * 40
    assert (shared.local_ttl, shared.timeout, shared.key_prefix) == (2.0, 0.25, "gateway")
    assert (shared.fallback_rate, shared.fallback_burst) == (25.0, 50)  # rate and burst / 4
    assert cfg.admin.token == "a" * 20
    # Secrets never in a repr (logs, tracebacks).
    for secret in ("pw-123", "k" * 40, "a" * 20):
        assert secret not in repr(cfg)
    # The summary names where Redis is, never the password.
    lines = "\n".join(summary(cfg))
    assert "redis.internal:6380" in lines and "pw-123" not in lines
    assert "purge endpoint: on" in lines


def test_shared_off_by_default_and_admin_token_may_be_empty() -> None:
    raw = copy.deepcopy(BASE)
    raw["admin"] = {"token": "${ADMIN_TOKEN:-}"}
    cfg = parse_config(yaml.safe_dump(raw), env={})
    assert cfg.shared is None and cfg.admin.token is None


def test_unix_socket_url_and_fallback_rate_never_above_rate() -> None:
    raw = copy.deepcopy(BASE)
    raw["shared"] = {
        "redis_url": "unix:///run/redis/redis.sock?db=1",
        "secret": "x" * 32,
        "fallback_rate": 500,
    }
    shared = parse_config(yaml.safe_dump(raw), env={}).shared
    assert shared is not None and shared.fallback_rate == 100.0


def test_workers_split_only_the_fallback_when_shared() -> None:
    raw = copy.deepcopy(BASE)
    raw["shared"] = {"redis_url": "redis://r", "secret": "x" * 32, "expected_replicas": 2}
    cfg = share_budget(parse_config(yaml.safe_dump(raw), env={}), 4)
    assert cfg.authlete.rate_limit.rate == 100  # the fleet's bucket in Redis is shared
    assert cfg.shared is not None
    assert (cfg.shared.fallback_rate, cfg.shared.fallback_burst) == (12.5, 25)
