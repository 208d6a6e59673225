"""Configuration: parsed and validated once into frozen dataclasses.

Nothing else in the package reads YAML or the environment. Every problem is
reported as one line naming its key path, so an operator can fix a file
without reading a traceback.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from gateway.cors import CorsConfig, origin_entry
from gateway.http import HOP_BY_HOP
from gateway.routing import PathError, host_name, normalise_path

# Names that cannot be used as identity headers: the proxy owns them.
_RESERVED_HEADERS = HOP_BY_HOP | {
    "host",
    "authorization",
    "content-length",
    "content-type",
    "cookie",
    "expect",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
}
_TCHAR = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 scope-token (NQCHAR)
_SERVICE_ID = re.compile(r"^[A-Za-z0-9._~-]+$")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Nothing is trusted unless listed: a peer's X-Forwarded-Proto/-Host and similar claims
# are replaced by what the gateway itself saw.
DEFAULT_TRUSTED_PROXIES: tuple[str, ...] = ()
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("text", "json")
_BUFFERING = {"on": "on", "true": "on", "off": "off", "false": "off", "auto": "auto"}
_MIN_SECRET = 32  # bytes of shared.secret; admin.token needs half as many characters
_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """Raised with every problem found; each problem is one `key.path: message` line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Upstream:
    scheme: str
    host: str
    port: int

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    path_prefix: str
    methods: frozenset[str] | None
    upstream: Upstream | None  # None: a decision-only route (decision mode, no forwarding)
    auth_required: bool
    scopes: tuple[str, ...]
    timeout: float
    max_body_bytes: int = 0  # 0 = no limit
    # "on": the whole body is read before the upstream request opens (spilling to a file);
    # "auto": so is a body that fits in request_buffer_memory_bytes, a larger one streams;
    # "off": the body streams as it arrives.
    request_buffering: str = "auto"
    forward_authorization: bool = True  # pass the client's Authorization header upstream
    # The upstream URL's path ("/api/v2"; "" when none), the same for every endpoint:
    # normalised, without a trailing slash, never a query or fragment.
    base_path: str = ""
    # Every endpoint when `upstream` is a list (`upstream` is the first); () = just `upstream`.
    upstreams: tuple[Upstream, ...] = ()
    balance: str = "round_robin"  # or "least_requests"
    # This route's own `cors:` (replacing the global one whole); False: `cors: false`, no
    # CORS on this route; None: the global section applies.
    cors: CorsConfig | Literal[False] | None = None
    # Host names the route answers ("api.example.com", "*.example.com": any name under
    # example.com, not example.com itself), lower case; () = any Host.
    hosts: tuple[str, ...] = ()
    strip_prefix: bool = False  # forward the path without the matched path_prefix
    preserve_host: bool = False  # send the client's Host upstream, not the upstream's
    rewrite_redirects: bool = True  # map Location/Content-Location back to the client's URL
    websocket: bool = False  # relay `Upgrade: websocket` handshakes (and the socket after)
    websocket_max_lifetime: float = 0.0  # seconds a WebSocket may live; 0 = no limit

    @property
    def endpoints(self) -> tuple[Upstream, ...]:
        if self.upstream is None:
            return ()
        return self.upstreams or (self.upstream,)


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    rate: float = 100.0
    burst: int = 200
    max_wait: float = 1.0
    per_client: float = 0.0  # misses per second one client may spend; 0 = no quota


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failures: int = 5
    cooldown: float = 5.0


@dataclass(frozen=True, slots=True)
class AuthleteConfig:
    base_url: str
    service_id: str
    access_token: str = field(repr=False)
    timeout: float = 2.0
    rate_limit: RateLimitConfig = RateLimitConfig()
    retries: int = 2
    circuit_breaker: BreakerConfig = BreakerConfig()
    deadline: float = 5.0
    allow_insecure_http: bool = False
    ca_file: str | None = None
    token_pattern: re.Pattern[str] | None = None  # tokens not matching it are never sent

    @property
    def introspection_url(self) -> str:
        return f"{self.base_url}/api/{self.service_id}/auth/introspection"


@dataclass(frozen=True, slots=True)
class CacheConfig:
    ttl: float = 60.0
    negative_ttl: float = 5.0
    max_entries: int = 100_000
    negative_max_entries: int = 10_000
    stale_if_error: float = 0.0
    refresh_ahead: float = 0.1  # last fraction of an entry's life in which a use re-checks it


@dataclass(frozen=True, slots=True)
class HeadersConfig:
    subject: str = "X-Auth-Subject"
    scopes: str = "X-Auth-Scopes"
    client_id: str = "X-Auth-Client-Id"
    # Folded names (lower case, `_` read as `-`): dropped from untrusted peers besides the
    # built-in list, and let through from them although the built-in list names them.
    drop_from_untrusted: frozenset[str] = frozenset()
    allow_from_untrusted: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_header_bytes: int = 8190
    max_headers: int = 100
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 10_000
    max_body_bytes: int = 0
    max_head_bytes: int = 65536
    # Unfinished heads and buffered bodies of all connections together. Sized for the Helm
    # chart's 256 MiB memory limit: see the README ("Memory under attack").
    max_buffered_bytes: int = 64 * 1024 * 1024
    max_connections_per_client: int = 0  # 0 = no cap
    min_body_rate: int = 512  # bytes/s over each min_body_rate_window; 0 = no minimum
    min_body_rate_window: float = 10.0
    request_buffering: str = "auto"  # default of routes[].request_buffering
    request_buffer_memory_bytes: int = 65536  # a buffered body beyond this spills to a file


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    client_auth: str = "none"  # none | optional | required
    min_version: str = "1.2"


@dataclass(frozen=True, slots=True)
class UpstreamTLSConfig:
    ca_file: str | None = None
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    access: bool = True
    format: str = "text"  # of the gateway's own messages on stderr: text | json


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """W3C trace context and OpenTelemetry (gateway.tracing)."""

    generate: bool = False  # start a trace for a forwarded request that comes without one
    opentelemetry: bool = False  # spans, exported as the OTEL_* variables say
    exporters: tuple[str, ...] = ()  # span exporters' entry point names, from OTEL_*

    @property
    def active(self) -> bool:
        return self.generate or self.opentelemetry


@dataclass(frozen=True, slots=True)
class SharedConfig:
    """State shared by a fleet on Redis: one Authlete budget, one verdict cache, purges."""

    redis_url: str = field(repr=False)  # may hold a password
    secret: bytes = field(repr=False)  # HMAC key of verdicts stored in Redis
    ca_file: str | None = None  # for rediss://
    key_prefix: str = "gateway"
    local_ttl: float = 5.0
    timeout: float = 0.25
    expected_replicas: int = 2
    fallback_rate: float = 50.0  # the local budget while Redis is unusable
    fallback_burst: int = 100


@dataclass(frozen=True, slots=True)
class DecisionConfig:
    """Decision mode: an ingress asks whether a request may pass, and as whom."""

    path: str = "/_gateway/auth"
    # Where decisions are answered: None = on the proxy listener, at `path`; an address =
    # on a listener of their own (and nowhere else).
    listen: Address | None = None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    token: str | None = field(default=None, repr=False)  # POST /cache/purge; None: 404


@dataclass(frozen=True, slots=True)
class Config:
    listen: Address
    admin_listen: Address
    realm: str
    upstream_timeout: float
    shutdown_timeout: float
    drain_delay: float
    max_token_bytes: int
    authlete: AuthleteConfig
    cache: CacheConfig
    headers: HeadersConfig
    routes: tuple[Route, ...]
    log: LogConfig = LogConfig()
    limits: LimitsConfig = LimitsConfig()
    trusted_proxies: tuple[IPNetwork, ...] = ()
    tls: TLSConfig | None = None
    upstream_tls: UpstreamTLSConfig = UpstreamTLSConfig()
    shared: SharedConfig | None = None
    upstream_dns_ttl: float = 5.0  # seconds between re-resolving upstream host names
    upstream_max_connection_age: float = 60.0  # seconds; 0 = pooled connections never age
    admin: AdminConfig = AdminConfig()
    cors: CorsConfig | None = None  # the global `cors:` section
    decision: DecisionConfig | None = None  # None: no decision endpoint
    tracing: TracingConfig = TracingConfig()


# --------------------------------------------------------------------------- reading


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, substitute `${VAR}` references, and validate. Raises ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"config: cannot read {os.fspath(path)}: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"config: {os.fspath(path)} is not UTF-8 text"]) from None
    return parse_config(text, env=os.environ if env is None else env)


def parse_config(text: str, env: Mapping[str, str]) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError([f"config: invalid YAML{where}: {problem}"]) from None
    if raw is None:
        raw = {}
    v = _Validator(env)
    cfg = v.config(raw)
    if v.problems or cfg is None:
        raise ConfigError(v.problems or ["config: invalid"])
    return cfg


# --------------------------------------------------------------------------- validation


def _default_name(index: int, route: Route, taken: set[str]) -> str:
    """The name of a route without `name:` (metrics labels and logs use it): its path_prefix;
    when that is taken, the prefix and its methods (`/items [DELETE,POST]`); when that is
    taken too, the prefix and its place in the list (`/items#2`, never a valid explicit name)."""
    prefix = route.path_prefix
    if prefix not in taken:
        return prefix
    if route.methods is not None:
        with_methods = f"{prefix} [{','.join(sorted(route.methods))}]"
        if with_methods not in taken:
            return with_methods
    return f"{prefix}#{index}"


def _same_socket(a: Address, b: Address) -> bool:
    """Whether two listeners would bind the same port (port 0: a free one each)."""
    return a.port != 0 and a.port == b.port and (a.host == b.host or "0.0.0.0" in (a.host, b.host))


class _Invalid(Exception):
    pass


class _Validator:
    """Walks the raw YAML tree, recording problems instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> _Invalid:
        self.problems.append(f"{path}: {message}")
        return _Invalid()

    # -- scalars ---------------------------------------------------------------------------
    def subst(self, path: str, value: Any) -> Any:
        if not isinstance(value, str) or "$" not in value:
            return value

        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            got = self.env.get(name, "")
            if got:
                return got
            if default is not None:
                return default
            raise self.fail(path, f"environment variable {name} is not set")

        return _ENV_REF.sub(repl, value)

    def string(self, path: str, value: Any, *, allow_empty: bool = False) -> str:
        value = self.subst(path, value)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(path, "must be a string")
        text = str(value)
        if not text and not allow_empty:
            raise self.fail(path, "must not be empty")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise self.fail(path, "must not contain control characters")
        return text

    def number(
        self, path: str, value: Any, *, minimum: float = 0.0, exclusive: bool = True
    ) -> float:
        value = self.subst(path, value)
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise self.fail(path, "must be a number (seconds)") from None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self.fail(path, "must be a number (seconds)")
        if value < minimum or (exclusive and value == minimum):
            raise self.fail(path, f"must be {'>' if exclusive else '>='} {minimum:g}")
        return float(value)

    def integer(self, path: str, value: Any, *, minimum: int) -> int:
        value = self.subst(path, value)
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise self.fail(path, "must be an integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, "must be an integer")
        if value < minimum:
            raise self.fail(path, f"must be >= {minimum}")
        return value

    def mapping(self, path: str, value: Any, known: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, "must be a mapping")
        for key in value:
            if key not in known:
                sub = f"{path}.{key}" if path else str(key)
                self.problems.append(f"{sub}: unknown key")
        return value

    def guard(self, fn: Callable[[], Any], default: Any) -> Any:
        try:
            return fn()
        except _Invalid:
            return default

    # -- composite -------------------------------------------------------------------------
    def address(self, path: str, value: Any) -> Address:
        text = self.string(path, value)
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise self.fail(path, 'must be "host:port"')
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise self.fail(path, f"invalid IPv6 address {host!r}") from None
        elif ":" in host:
            raise self.fail(path, 'IPv6 hosts must be written "[addr]:port"')
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise self.fail(path, f"invalid port {port_text!r}")
        return Address(host, int(port_text))

    def upstream(self, path: str, value: Any) -> Upstream:
        return self.upstream_url(path, value)[0]

    def upstream_url(self, path: str, value: Any) -> tuple[Upstream, str]:
        """One upstream URL: its origin and its base path ("" when none)."""
        text = self.string(path, value)
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            raise self.fail(path, "not an http(s) URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(path, "not an http(s) URL")
        if parts.username is not None or parts.password is not None:
            raise self.fail(path, "must not contain credentials")
        if "?" in text or "#" in text:
            raise self.fail(path, "must not contain a query or fragment")
        base = self.base_path(path, parts.path)
        default_port = 443 if parts.scheme == "https" else 80
        return Upstream(parts.scheme, parts.hostname, port or default_port), base

    def upstream_list(self, path: str, value: Any) -> tuple[tuple[Upstream, ...], str]:
        """`upstream`: one URL, or a list of URLs of one scheme and one base path."""
        if not isinstance(value, list):
            one, base = self.upstream_url(path, value)
            return (one,), base
        if not value:
            raise self.fail(path, "must be an http(s) URL or a non-empty list of them")
        parsed = [self.upstream_url(f"{path}[{i}]", item) for i, item in enumerate(value)]
        first, base = parsed[0]
        for i, (one, other_base) in enumerate(parsed):
            if one.scheme != first.scheme:
                raise self.fail(f"{path}[{i}]", f"all endpoints must use {first.scheme}://")
            if other_base != base:
                raise self.fail(f"{path}[{i}]", f"all endpoints must have base path {base!r}")
            if one in (u for u, _ in parsed[:i]):
                raise self.fail(f"{path}[{i}]", f"duplicate endpoint {one.origin}")
        return tuple(u for u, _ in parsed), base

    def base_path(self, path: str, raw: str) -> str:
        """An upstream URL's path: "" for none or "/", else normalised without a final "/"."""
        if raw in ("", "/"):
            return ""
        try:
            normal = normalise_path(raw)
        except PathError as exc:
            raise self.fail(path, f"invalid base path: {exc.reason}") from None
        if normal != raw and normal + "/" != raw:
            raise self.fail(path, f"base path must be normalised (did you mean {normal!r}?)")
        return normal.rstrip("/")

    def config(self, raw: Any) -> Config | None:
        top = self.guard(
            lambda: self.mapping(
                "",
                raw,
                {
                    "listen",
                    "admin_listen",
                    "realm",
                    "upstream_timeout",
                    "shutdown_timeout",
                    "drain_delay",
                    "max_token_bytes",
                    "authlete",
                    "cache",
                    "headers",
                    "routes",
                    "log",
                    "limits",
                    "trusted_proxies",
                    "tls",
                    "upstream_tls",
                    "shared",
                    "admin",
                    "upstream_dns_ttl",
                    "upstream_max_connection_age",
                    "cors",
                    "decision",
                    "decision_listen",
                    "tracing",
                },
            ),
            None,
        )
        if top is None:
            self.problems[-1] = "config: must be a mapping of settings"
            return None
        g = self.guard
        listen = g(lambda: self.address("listen", top.get("listen", "0.0.0.0:8080")), None)
        admin = g(
            lambda: self.address("admin_listen", top.get("admin_listen", "127.0.0.1:9090")), None
        )
        realm = g(lambda: self.realm(top.get("realm", "gateway")), None)
        upstream_timeout = g(
            lambda: self.number("upstream_timeout", top.get("upstream_timeout", 30)), None
        )
        shutdown_timeout = g(
            lambda: self.number(
                "shutdown_timeout", top.get("shutdown_timeout", 10), exclusive=False
            ),
            None,
        )
        drain_delay = g(
            lambda: self.number("drain_delay", top.get("drain_delay", 0), exclusive=False), None
        )
        max_token = g(
            lambda: self.integer("max_token_bytes", top.get("max_token_bytes", 4096), minimum=16),
            None,
        )
        authlete = g(lambda: self.authlete(top.get("authlete")), None)
        cache = g(lambda: self.cache(top.get("cache")), None)
        headers = g(lambda: self.headers(top.get("headers")), None)
        limits = g(lambda: self.limits(top.get("limits")), None)
        decision = g(lambda: self.decision(top.get("decision"), top.get("decision_listen")), False)
        routes = g(
            lambda: self.routes(
                top.get("routes"),
                upstream_timeout or 30.0,
                limits or LimitsConfig(),
                decision is not None,
            ),
            None,
        )
        log_cfg = g(lambda: self.log(top.get("log")), None)
        tracing = g(lambda: self.tracing(top.get("tracing")), None)
        trusted = g(
            lambda: self.networks(
                "trusted_proxies", top.get("trusted_proxies", list(DEFAULT_TRUSTED_PROXIES))
            ),
            None,
        )
        tls = g(lambda: self.tls(top.get("tls")), False)
        upstream_tls = g(lambda: self.upstream_tls(top.get("upstream_tls")), None)
        dns_ttl = g(lambda: self.number("upstream_dns_ttl", top.get("upstream_dns_ttl", 5)), None)
        max_age = g(
            lambda: self.number(
                "upstream_max_connection_age",
                top.get("upstream_max_connection_age", 60),
                exclusive=False,
            ),
            None,
        )
        shared = g(lambda: self.shared(top.get("shared"), authlete), False)
        admin_cfg = g(lambda: self.admin(top.get("admin")), None)
        cors = g(lambda: self.cors("cors", top.get("cors")), None)
        if listen is not None and admin is not None and _same_socket(listen, admin):
            self.problems.append("admin_listen: must differ from listen")
        if decision and decision.listen is not None and listen is not None and admin is not None:
            for key, other in (("listen", listen), ("admin_listen", admin)):
                if _same_socket(decision.listen, other):
                    self.problems.append(f"decision_listen: must differ from {key}")
        if self.problems:
            return None
        return Config(
            listen=listen,
            admin_listen=admin,
            realm=realm,
            upstream_timeout=upstream_timeout,
            shutdown_timeout=shutdown_timeout,
            drain_delay=drain_delay,
            max_token_bytes=max_token,
            authlete=authlete,
            cache=cache,
            headers=headers,
            routes=routes,
            log=log_cfg,
            limits=limits,
            trusted_proxies=trusted,
            tls=tls,
            upstream_tls=upstream_tls,
            shared=shared,
            upstream_dns_ttl=dns_ttl,
            upstream_max_connection_age=max_age,
            admin=admin_cfg,
            cors=cors or None,
            decision=decision or None,
            tracing=tracing,
        )

    def limits(self, raw: Any) -> LimitsConfig:
        p = "limits"
        m = self.mapping(
            p,
            raw,
            {
                "max_header_bytes",
                "max_headers",
                "header_timeout",
                "idle_timeout",
                "max_connections",
                "max_body_bytes",
                "max_head_bytes",
                "max_buffered_bytes",
                "max_connections_per_client",
                "min_body_rate",
                "min_body_rate_window",
                "request_buffering",
                "request_buffer_memory_bytes",
            },
        )
        d = LimitsConfig()
        g = self.guard

        def integer(key: str, minimum: int) -> Any:
            value = m.get(key, getattr(d, key))
            return g(lambda: self.integer(f"{p}.{key}", value, minimum=minimum), None)

        def seconds(key: str) -> Any:
            return g(lambda: self.number(f"{p}.{key}", m.get(key, getattr(d, key))), None)

        values = {
            "max_header_bytes": integer("max_header_bytes", 1024),
            "max_headers": integer("max_headers", 8),
            "header_timeout": seconds("header_timeout"),
            "idle_timeout": seconds("idle_timeout"),
            "max_connections": integer("max_connections", 1),
            "max_body_bytes": integer("max_body_bytes", 0),
            "max_head_bytes": integer("max_head_bytes", 1024),
            "max_buffered_bytes": integer("max_buffered_bytes", 65536),
            "max_connections_per_client": integer("max_connections_per_client", 0),
            "min_body_rate": integer("min_body_rate", 0),
            "min_body_rate_window": seconds("min_body_rate_window"),
            "request_buffering": g(
                lambda: self.buffering(
                    f"{p}.request_buffering", m.get("request_buffering", d.request_buffering)
                ),
                None,
            ),
            "request_buffer_memory_bytes": integer("request_buffer_memory_bytes", 0),
        }
        if None in values.values():
            raise _Invalid()
        if values["max_head_bytes"] < values["max_header_bytes"]:
            raise self.fail(
                f"{p}.max_head_bytes", "must be at least limits.max_header_bytes (one header line)"
            )
        if values["max_buffered_bytes"] < values["max_head_bytes"]:
            raise self.fail(
                f"{p}.max_buffered_bytes", "must be at least limits.max_head_bytes (one head)"
            )
        return LimitsConfig(**values)

    def networks(self, path: str, value: Any) -> tuple[IPNetwork, ...]:
        if not isinstance(value, list):
            raise self.fail(path, "must be a list of CIDR ranges")
        out = []
        for i, item in enumerate(value):
            text = self.string(f"{path}[{i}]", item)
            try:
                out.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise self.fail(f"{path}[{i}]", f"not a CIDR range: {text!r}") from None
        return tuple(out)

    def readable_file(self, path: str, value: Any) -> str:
        text = self.string(path, value)
        if not os.path.isfile(text) or not os.access(text, os.R_OK):
            raise self.fail(path, f"cannot read file {text!r}")
        return text

    def tls(self, raw: Any) -> TLSConfig | None:
        if raw is None:
            return None
        p = "tls"
        m = self.mapping(
            p, raw, {"cert_file", "key_file", "client_ca_file", "client_auth", "min_version"}
        )
        g = self.guard
        for key in ("cert_file", "key_file"):
            if key not in m:
                self.problems.append(f"{p}.{key}: is required")
        cert = (
            g(lambda: self.readable_file(f"{p}.cert_file", m["cert_file"]), None)
            if "cert_file" in m
            else None
        )
        key_file = (
            g(lambda: self.readable_file(f"{p}.key_file", m["key_file"]), None)
            if "key_file" in m
            else None
        )
        ca: Any = None
        if m.get("client_ca_file") is not None:
            ca = g(lambda: self.readable_file(f"{p}.client_ca_file", m["client_ca_file"]), False)
        mode = g(lambda: self.string(f"{p}.client_auth", m.get("client_auth", "none")), None)
        if mode is not None and mode not in ("none", "optional", "required"):
            self.problems.append(f'{p}.client_auth: must be "none", "optional" or "required"')
            mode = None
        if mode in ("optional", "required") and ca is None:
            self.problems.append(f"{p}.client_ca_file: is required with client_auth: {mode}")
            mode = None
        version = g(lambda: str(self.string(f"{p}.min_version", m.get("min_version", "1.2"))), None)
        if version is not None and version not in ("1.2", "1.3"):
            self.problems.append(f'{p}.min_version: must be "1.2" or "1.3"')
            version = None
        if cert is None or key_file is None or ca is False or mode is None or version is None:
            raise _Invalid()
        return TLSConfig(cert, key_file, ca, mode, version)

    def upstream_tls(self, raw: Any) -> UpstreamTLSConfig:
        p = "upstream_tls"
        m = self.mapping(p, raw, {"ca_file", "insecure_skip_verify"})
        ca: Any = None
        if m.get("ca_file") is not None:
            ca = self.guard(lambda: self.readable_file(f"{p}.ca_file", m["ca_file"]), False)
        skip = self.guard(
            lambda: self.boolean(f"{p}.insecure_skip_verify", m.get("insecure_skip_verify", False)),
            None,
        )
        if ca is False or skip is None:
            raise _Invalid()
        return UpstreamTLSConfig(ca_file=ca, insecure_skip_verify=skip)

    def shared(self, raw: Any, authlete: AuthleteConfig | None) -> SharedConfig | None:
        if raw is None:
            return None
        p = "shared"
        m = self.mapping(
            p,
            raw,
            {
                "redis_url",
                "tls",
                "secret",
                "key_prefix",
                "local_ttl",
                "timeout",
                "expected_replicas",
                "fallback_rate",
            },
        )
        g = self.guard
        for key in ("redis_url", "secret"):
            if key not in m:
                self.problems.append(f"{p}.{key}: is required when shared is set")
        url = (
            g(lambda: self.redis_url(f"{p}.redis_url", m["redis_url"]), None)
            if "redis_url" in m
            else None
        )
        secret = g(lambda: self.string(f"{p}.secret", m["secret"]), None) if "secret" in m else None
        if secret is not None and len(secret.encode()) < _MIN_SECRET:
            self.problems.append(f"{p}.secret: must be at least {_MIN_SECRET} bytes (a random key)")
            secret = None
        tls = self.guard(lambda: self.mapping(f"{p}.tls", m.get("tls"), {"ca_file"}), None)
        ca: Any = None
        if tls is not None and tls.get("ca_file") is not None:
            ca = g(lambda: self.readable_file(f"{p}.tls.ca_file", tls["ca_file"]), False)
            if url is not None and not url.startswith("rediss://"):
                self.problems.append(f"{p}.tls.ca_file: only applies to a rediss:// redis_url")
        prefix = g(lambda: self.string(f"{p}.key_prefix", m.get("key_prefix", "gateway")), None)
        if prefix is not None and (" " in prefix or not prefix.isascii()):
            self.problems.append(f"{p}.key_prefix: must be ASCII without spaces")
            prefix = None
        local_ttl = g(lambda: self.number(f"{p}.local_ttl", m.get("local_ttl", 5.0)), None)
        timeout = g(lambda: self.number(f"{p}.timeout", m.get("timeout", 0.25)), None)
        replicas = g(
            lambda: self.integer(
                f"{p}.expected_replicas", m.get("expected_replicas", 2), minimum=1
            ),
            None,
        )
        rate = authlete.rate_limit.rate if authlete is not None else 100.0
        burst = authlete.rate_limit.burst if authlete is not None else 200
        fallback: Any = None
        if replicas is not None:
            fallback = g(
                lambda: self.number(f"{p}.fallback_rate", m.get("fallback_rate", rate / replicas)),
                None,
            )
        if (
            None in (url, secret, prefix, local_ttl, timeout, replicas, fallback, tls)
            or ca is False
            or url is None
            or secret is None
        ):
            raise _Invalid()
        return SharedConfig(
            redis_url=url,
            secret=secret.encode(),
            ca_file=ca,
            key_prefix=prefix,
            local_ttl=local_ttl,
            timeout=timeout,
            expected_replicas=replicas,
            fallback_rate=min(fallback, rate),
            fallback_burst=max(1, burst // replicas),
        )

    def redis_url(self, path: str, value: Any) -> str:
        text = self.string(path, value)
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018  # raises on a bad port
        except ValueError:
            raise self.fail(path, "not a redis://, rediss:// or unix:// URL") from None
        if parts.scheme in ("redis", "rediss"):
            if not parts.hostname:
                raise self.fail(path, f"{parts.scheme}:// needs a host")
        elif parts.scheme == "unix":
            if not parts.path:
                raise self.fail(path, "unix:// needs a socket path")
        else:
            raise self.fail(path, "not a redis://, rediss:// or unix:// URL")
        return text

    def decision(self, raw: Any, listen_raw: Any) -> DecisionConfig | None:
        """`decision:` (a mapping, `{}` for the defaults) and `decision_listen`: either one
        turns decision mode on."""
        if raw is False or (raw is None and listen_raw is None):
            return None
        m = self.mapping("decision", raw, {"path"}) if raw not in (None, True) else {}
        g = self.guard
        path = g(lambda: self.decision_path("decision.path", m.get("path", "/_gateway/auth")), None)
        listen: Address | None = None
        if listen_raw is not None:
            listen = g(lambda: self.address("decision_listen", listen_raw), None)
            if listen is None:
                raise _Invalid()
        if path is None:
            raise _Invalid()
        return DecisionConfig(path=path, listen=listen)

    def decision_path(self, path: str, value: Any) -> str:
        text = self.path_prefix(path, value)
        if text == "/":
            raise self.fail(path, 'must not be "/" (it would take every request)')
        return text

    def admin(self, raw: Any) -> AdminConfig:
        m = self.mapping("admin", raw, {"token"})
        if m.get("token") is None:
            return AdminConfig()
        token = self.string("admin.token", m["token"], allow_empty=True)
        if not token:  # ${GATEWAY_ADMIN_TOKEN:-} with the variable unset: no purge endpoint
            return AdminConfig()
        if len(token) < _MIN_SECRET // 2:
            raise self.fail("admin.token", f"must be at least {_MIN_SECRET // 2} characters")
        return AdminConfig(token=token)

    def buffering(self, path: str, value: Any) -> str:
        value = self.subst(path, value)
        if value is True or value is False:  # YAML reads a bare on/off as a boolean
            return "on" if value else "off"
        if isinstance(value, str) and value.strip().lower() in _BUFFERING:
            return _BUFFERING[value.strip().lower()]
        raise self.fail(path, 'must be "on", "off" or "auto"')

    def boolean(self, path: str, value: Any) -> bool:
        value = self.subst(path, value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise self.fail(path, "must be true or false")
        return value

    def cors(self, path: str, raw: Any) -> CorsConfig | Literal[False] | None:
        """A `cors:` section: None when absent, False for `cors: false` (off)."""
        if raw is None:
            return None
        if raw is False:
            return False
        m = self.mapping(
            path,
            raw,
            {
                "allow_origins",
                "allow_methods",
                "allow_headers",
                "expose_headers",
                "allow_credentials",
                "max_age",
            },
        )
        if not isinstance(raw, dict):
            raise self.fail(path, "must be a mapping, or false to turn CORS off")

        def names(key: str, upper: bool = False) -> tuple[str, ...] | None:
            value = m.get(key)
            if not isinstance(value, list):
                raise self.fail(f"{path}.{key}", "must be a list")
            out: list[str] = []
            for i, item in enumerate(value):
                text = self.string(f"{path}.{key}[{i}]", item)
                if text != "*" and not _TCHAR.match(text):
                    raise self.fail(f"{path}.{key}[{i}]", "not a valid name")
                text = text.upper() if upper else text
                if text.lower() not in (o.lower() for o in out):
                    out.append(text)
            if "*" in out and len(out) > 1:
                raise self.fail(f"{path}.{key}", '"*" must be the only entry')
            return tuple(out)

        g = self.guard
        if "allow_origins" not in m:
            self.problems.append(f"{path}.allow_origins: is required")
        origins = g(lambda: self.origins(f"{path}.allow_origins", m.get("allow_origins")), None)
        kw: dict[str, Any] = {}
        for key in ("allow_methods", "allow_headers", "expose_headers"):
            if key in m:
                try:
                    kw[key] = names(key, key == "allow_methods")
                except _Invalid:
                    kw[key] = None
        credentials = g(
            lambda: self.boolean(f"{path}.allow_credentials", m.get("allow_credentials", False)),
            None,
        )
        if "max_age" in m:
            kw["max_age"] = g(
                lambda: self.integer(f"{path}.max_age", m["max_age"], minimum=0), None
            )
        if origins is None or credentials is None or None in kw.values():
            raise _Invalid()
        if credentials and origins == ("*",):
            raise self.fail(
                f"{path}.allow_origins",
                '"*" cannot be combined with allow_credentials: true (browsers refuse it, '
                "and answering every origin with credentials lets any site read them): list "
                "the origins",
            )
        if credentials and kw.get("expose_headers") == ("*",):
            raise self.fail(
                f"{path}.expose_headers",
                '"*" means no header to a browser with allow_credentials: true: list them',
            )
        return CorsConfig(allow_origins=origins, allow_credentials=credentials, **kw)

    def origins(self, path: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(path, 'must be a non-empty list of origins (or ["*"])')
        out: list[str] = []
        for i, item in enumerate(value):
            text = self.string(f"{path}[{i}]", item)
            try:
                entry = origin_entry(text)
            except ValueError as exc:
                raise self.fail(f"{path}[{i}]", str(exc)) from None
            if entry not in out:
                out.append(entry)
        if "*" in out and len(out) > 1:
            raise self.fail(path, '"*" must be the only entry')
        return tuple(out)

    def log(self, raw: Any) -> LogConfig:
        m = self.mapping("log", raw, {"level", "access", "format"})
        level = self.guard(lambda: self.string("log.level", m.get("level", "info")).lower(), None)
        if level is not None and level not in _LOG_LEVELS:
            self.problems.append(f"log.level: must be one of {', '.join(_LOG_LEVELS)}")
            level = None
        access = self.guard(lambda: self.boolean("log.access", m.get("access", True)), None)
        fmt = self.guard(lambda: self.string("log.format", m.get("format", "text")).lower(), None)
        if fmt is not None and fmt not in _LOG_FORMATS:
            self.problems.append(f"log.format: must be one of {', '.join(_LOG_FORMATS)}")
            fmt = None
        if level is None or access is None or fmt is None:
            raise _Invalid()
        return LogConfig(level=level, access=access, format=fmt)

    def tracing(self, raw: Any) -> TracingConfig:
        m = self.mapping("tracing", raw, {"generate", "opentelemetry"})
        g = self.guard
        generate = g(lambda: self.boolean("tracing.generate", m.get("generate", False)), None)
        otel = g(lambda: self.boolean("tracing.opentelemetry", m.get("opentelemetry", False)), None)
        if generate is None or otel is None:
            raise _Invalid()
        exporters: tuple[str, ...] = ()
        if otel and self.env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            otel = False  # the standard switch: no spans, whatever the file says
        elif otel:
            from gateway import tracing

            if not tracing.sdk_installed():
                raise self.fail(
                    "tracing.opentelemetry",
                    "the OpenTelemetry SDK is not installed: pip install 'authlete-gateway[otel]'",
                )
            try:
                exporters = tracing.exporter_names(self.env)
            except ValueError as exc:
                raise self.fail("tracing.opentelemetry", str(exc)) from None
        return TracingConfig(generate=generate, opentelemetry=otel, exporters=exporters)

    def realm(self, value: Any) -> str:
        text = self.string("realm", value)
        if '"' in text or "\\" in text or not text.isascii():
            raise self.fail("realm", "must be printable ASCII without quotes or backslashes")
        return text

    def authlete(self, raw: Any) -> AuthleteConfig:
        if raw is None:
            raise self.fail("authlete", "is required (base_url, service_id, access_token)")
        m = self.mapping(
            "authlete",
            raw,
            {
                "base_url",
                "service_id",
                "access_token",
                "timeout",
                "rate_limit",
                "retries",
                "circuit_breaker",
                "deadline",
                "allow_insecure_http",
                "ca_file",
                "token_pattern",
            },
        )
        for key in ("base_url", "service_id", "access_token"):
            if key not in m:
                self.problems.append(f"authlete.{key}: is required")
        base_url: Any = (
            self.guard(lambda: self.base_url(m["base_url"]), None) if "base_url" in m else None
        )
        service_id: Any = None
        if "service_id" in m:
            service_id = self.guard(
                lambda: self.string("authlete.service_id", m["service_id"]), None
            )
            if service_id is not None and not _SERVICE_ID.match(service_id):
                self.problems.append(
                    "authlete.service_id: must be a plain identifier (letters, digits, ._~-)"
                )
        token: Any = None
        if "access_token" in m:
            token = self.guard(
                lambda: self.string("authlete.access_token", m["access_token"]), None
            )
            if token is not None and (not token.isascii() or " " in token):
                self.problems.append("authlete.access_token: must be ASCII without spaces")
        timeout = self.guard(lambda: self.number("authlete.timeout", m.get("timeout", 2.0)), None)
        limits = self.guard(lambda: self.rate_limit(m.get("rate_limit")), None)
        retries = self.guard(
            lambda: self.integer("authlete.retries", m.get("retries", 2), minimum=0), None
        )
        breaker = self.guard(lambda: self.breaker(m.get("circuit_breaker")), None)
        deadline = self.guard(
            lambda: self.number("authlete.deadline", m.get("deadline", 5.0)), None
        )
        insecure = self.guard(
            lambda: self.boolean(
                "authlete.allow_insecure_http", m.get("allow_insecure_http", False)
            ),
            None,
        )
        if isinstance(base_url, str) and base_url.startswith("http://") and insecure is False:
            self.problems.append(
                "authlete.base_url: must be https (the access token and every client token "
                "cross this link); set authlete.allow_insecure_http: true for a local emulator"
            )
            base_url = None
        ca: Any = None
        if m.get("ca_file") is not None:
            ca = self.guard(lambda: self.readable_file("authlete.ca_file", m["ca_file"]), False)
        pattern: Any = None
        if m.get("token_pattern") is not None:
            pattern = self.guard(
                lambda: self.regex("authlete.token_pattern", m["token_pattern"]), False
            )
        if None in (base_url, service_id, token, timeout, limits, retries, breaker, deadline):
            raise _Invalid()
        if ca is False or pattern is False:
            raise _Invalid()
        return AuthleteConfig(
            base_url=base_url,
            service_id=service_id,
            access_token=token,
            timeout=timeout,
            rate_limit=limits,
            retries=retries,
            circuit_breaker=breaker,
            deadline=deadline,
            allow_insecure_http=bool(insecure),
            ca_file=ca,
            token_pattern=pattern,
        )

    def regex(self, path: str, value: Any) -> re.Pattern[str]:
        text = self.string(path, value)
        try:
            return re.compile(text)
        except re.error as exc:
            raise self.fail(path, f"not a regular expression: {exc}") from None

    def rate_limit(self, raw: Any) -> RateLimitConfig:
        p = "authlete.rate_limit"
        m = self.mapping(p, raw, {"rate", "burst", "max_wait", "per_client"})
        g = self.guard
        rate = g(lambda: self.number(f"{p}.rate", m.get("rate", 100)), None)
        burst = g(lambda: self.integer(f"{p}.burst", m.get("burst", 200), minimum=1), None)
        wait = g(
            lambda: self.number(f"{p}.max_wait", m.get("max_wait", 1.0), exclusive=False), None
        )
        per_client = g(
            lambda: self.number(f"{p}.per_client", m.get("per_client", 0), exclusive=False), None
        )
        if rate is None or burst is None or wait is None or per_client is None:
            raise _Invalid()
        return RateLimitConfig(rate=rate, burst=burst, max_wait=wait, per_client=per_client)

    def breaker(self, raw: Any) -> BreakerConfig:
        p = "authlete.circuit_breaker"
        m = self.mapping(p, raw, {"failures", "cooldown"})
        failures = self.guard(
            lambda: self.integer(f"{p}.failures", m.get("failures", 5), minimum=1), None
        )
        cooldown = self.guard(lambda: self.number(f"{p}.cooldown", m.get("cooldown", 5.0)), None)
        if failures is None or cooldown is None:
            raise _Invalid()
        return BreakerConfig(failures=failures, cooldown=cooldown)

    def base_url(self, value: Any) -> str:
        text = self.string("authlete.base_url", value)
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018  # validates the port
        except ValueError:
            raise self.fail("authlete.base_url", "not an http(s) URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail("authlete.base_url", "not an http(s) URL")
        if parts.query or parts.fragment or parts.username is not None:
            raise self.fail(
                "authlete.base_url", "must not contain a query, fragment or credentials"
            )
        return text.rstrip("/")

    def cache(self, raw: Any) -> CacheConfig:
        m = self.mapping(
            "cache",
            raw,
            {
                "ttl",
                "negative_ttl",
                "max_entries",
                "negative_max_entries",
                "stale_if_error",
                "refresh_ahead",
            },
        )
        g = self.guard
        ttl = g(lambda: self.number("cache.ttl", m.get("ttl", 60), exclusive=False), None)
        neg = g(
            lambda: self.number("cache.negative_ttl", m.get("negative_ttl", 5), exclusive=False),
            None,
        )
        size = g(
            lambda: self.integer("cache.max_entries", m.get("max_entries", 100_000), minimum=1),
            None,
        )
        neg_size = g(
            lambda: self.integer(
                "cache.negative_max_entries",
                m.get("negative_max_entries", max(1, (size or 100_000) // 10)),
                minimum=1,
            ),
            None,
        )
        stale = g(
            lambda: self.number(
                "cache.stale_if_error", m.get("stale_if_error", 0), exclusive=False
            ),
            None,
        )
        ahead = g(
            lambda: self.number(
                "cache.refresh_ahead", m.get("refresh_ahead", 0.1), exclusive=False
            ),
            None,
        )
        if ahead is not None and ahead >= 1:
            self.problems.append("cache.refresh_ahead: must be a fraction below 1 (0 turns it off)")
            ahead = None
        if None in (ttl, neg, size, neg_size, stale, ahead):
            raise _Invalid()
        return CacheConfig(
            ttl=ttl,
            negative_ttl=neg,
            max_entries=size,
            negative_max_entries=neg_size,
            stale_if_error=stale,
            refresh_ahead=ahead,
        )

    def headers(self, raw: Any) -> HeadersConfig:
        m = self.mapping(
            "headers",
            raw,
            {"subject", "scopes", "client_id", "drop_from_untrusted", "allow_from_untrusted"},
        )
        defaults = HeadersConfig()
        names: dict[str, str] = {}
        for key in ("subject", "scopes", "client_id"):
            path = f"headers.{key}"
            try:
                name = self.string(path, m.get(key, getattr(defaults, key)))
            except _Invalid:
                continue
            if not _TCHAR.match(name):
                self.problems.append(f"{path}: not a valid header name")
                continue
            folded = name.lower().replace("_", "-")
            if folded in _RESERVED_HEADERS:
                self.problems.append(f"{path}: {name} is reserved by the proxy")
                continue
            if folded in {n.lower().replace("_", "-") for n in names.values()}:
                self.problems.append(f"{path}: duplicates another identity header")
                continue
            names[key] = name
        drop = self.guard(
            lambda: self.header_names("headers.drop_from_untrusted", m.get("drop_from_untrusted")),
            None,
        )
        allow = self.guard(
            lambda: self.header_names(
                "headers.allow_from_untrusted", m.get("allow_from_untrusted")
            ),
            None,
        )
        if drop is not None and allow is not None and drop & allow:
            both = ", ".join(sorted(drop & allow))
            self.problems.append(
                f"headers.allow_from_untrusted: {both} also in drop_from_untrusted"
            )
            raise _Invalid()
        if len(names) != 3 or drop is None or allow is None:
            raise _Invalid()
        return HeadersConfig(
            subject=names["subject"],
            scopes=names["scopes"],
            client_id=names["client_id"],
            drop_from_untrusted=drop,
            allow_from_untrusted=allow,
        )

    def header_names(self, path: str, value: Any) -> frozenset[str]:
        if value is None:
            return frozenset()
        if not isinstance(value, list):
            raise self.fail(path, "must be a list of header names")
        out = set()
        for i, item in enumerate(value):
            name = self.string(f"{path}[{i}]", item)
            if not _TCHAR.match(name):
                raise self.fail(f"{path}[{i}]", "not a valid header name")
            if "*" in name[:-1]:
                raise self.fail(f"{path}[{i}]", "'*' may only end a name (a prefix: x-internal-*)")
            out.add(name.lower().replace("_", "-"))
        return frozenset(out)

    def routes(
        self, raw: Any, default_timeout: float, limits: LimitsConfig, decision: bool = False
    ) -> tuple[Route, ...]:
        if raw is None:
            raise self.fail("routes", "at least one route is required")
        if not isinstance(raw, list):
            raise self.fail("routes", "must be a list of routes")
        if not raw:
            raise self.fail("routes", "at least one route is required")
        routes: list[Route | None] = []
        for i, item in enumerate(raw):
            try:
                routes.append(self.route(i, item, default_timeout, limits, decision))
            except _Invalid:
                routes.append(None)
        named = [isinstance(item, Mapping) and "name" in item for item in raw]
        names: set[str] = set()
        for i, route in enumerate(routes):
            if route is None or not named[i]:
                continue
            if route.name in names:
                self.problems.append(f"routes[{i}].name: duplicate route name {route.name!r}")
            names.add(route.name)
        for i, route in enumerate(routes):
            if route is not None and not named[i]:
                routes[i] = route = replace(route, name=_default_name(i, route, names))
                names.add(route.name)
        if None in routes:
            raise _Invalid()
        return tuple(r for r in routes if r is not None)

    def route(
        self,
        index: int,
        raw: Any,
        default_timeout: float,
        limits: LimitsConfig,
        decision: bool = False,
    ) -> Route:
        p = f"routes[{index}]"
        m = self.mapping(
            p,
            raw,
            {
                "name",
                "path_prefix",
                "methods",
                "upstream",
                "auth",
                "scopes",
                "timeout",
                "max_body_bytes",
                "request_buffering",
                "forward_authorization",
                "balance",
                "cors",
                "hosts",
                "strip_prefix",
                "preserve_host",
                "rewrite_redirects",
                "websocket",
                "websocket_max_lifetime",
            },
        )
        if not m and raw is None:
            raise self.fail(p, "must be a mapping")
        g = self.guard
        if "path_prefix" not in m:
            self.problems.append(f"{p}.path_prefix: is required")
        if "upstream" not in m and not decision:
            self.problems.append(
                f"{p}.upstream: is required (a route without one needs decision mode: `decision:`)"
            )
        prefix: Any = (
            g(lambda: self.path_prefix(f"{p}.path_prefix", m["path_prefix"]), None)
            if "path_prefix" in m
            else None
        )
        upstream: Any = (
            g(lambda: self.upstream_list(f"{p}.upstream", m["upstream"]), None)
            if "upstream" in m
            else ((), "")  # decision-only (without decision mode: the problem above)
        )
        balance = g(lambda: self.string(f"{p}.balance", m.get("balance", "round_robin")), None)
        if balance is not None and balance not in ("round_robin", "least_requests"):
            self.problems.append(f'{p}.balance: must be "round_robin" or "least_requests"')
            balance = None
        methods = g(lambda: self.methods(f"{p}.methods", m.get("methods")), False)
        auth = g(lambda: self.string(f"{p}.auth", m.get("auth", "required")), None)
        if auth is not None and auth not in ("required", "none"):
            self.problems.append(f'{p}.auth: must be "required" or "none"')
            auth = None
        scopes = g(lambda: self.scopes(f"{p}.scopes", m.get("scopes")), None)
        if auth == "none" and scopes:
            self.problems.append(f"{p}.scopes: not allowed with auth: none")
            scopes = None
        timeout = g(lambda: self.number(f"{p}.timeout", m.get("timeout", default_timeout)), None)
        body = g(
            lambda: self.integer(
                f"{p}.max_body_bytes", m.get("max_body_bytes", limits.max_body_bytes), minimum=0
            ),
            None,
        )
        buffering = g(
            lambda: self.buffering(
                f"{p}.request_buffering", m.get("request_buffering", limits.request_buffering)
            ),
            None,
        )
        forward_auth = g(
            lambda: self.boolean(
                f"{p}.forward_authorization", m.get("forward_authorization", True)
            ),
            None,
        )
        hosts = g(lambda: self.hosts(f"{p}.hosts", m.get("hosts")), None)
        cors = g(lambda: self.cors(f"{p}.cors", m.get("cors")), ...)
        flags = {
            key: g(partial(self.boolean, f"{p}.{key}", m.get(key, on)), None)
            for key, on in (
                ("strip_prefix", False),
                ("preserve_host", False),
                ("rewrite_redirects", True),
                ("websocket", False),
            )
        }
        ws_lifetime = g(
            lambda: self.number(
                f"{p}.websocket_max_lifetime",
                m.get("websocket_max_lifetime", 0),
                exclusive=False,
            ),
            None,
        )
        name = g(lambda: self.string(f"{p}.name", m.get("name", prefix or f"route{index}")), None)
        if name is not None and not re.match(r"^[A-Za-z0-9._/:~-]+$", name):
            self.problems.append(f"{p}.name: use letters, digits and ._/:~-")
            name = None
        if (
            None in (prefix, upstream, auth, scopes, timeout, body, name, buffering, forward_auth)
            or methods is False
            or balance is None
            or hosts is None
            or None in flags.values()
            or ws_lifetime is None
        ):
            raise _Invalid()
        if cors is ...:
            raise _Invalid()
        endpoints, base_path = upstream
        if not endpoints:
            for key in ("websocket", "strip_prefix", "preserve_host", "balance"):
                if key in m:
                    self.problems.append(f"{p}.{key}: needs an upstream")
        return Route(
            name=name,
            path_prefix=prefix,
            methods=methods,
            upstream=endpoints[0] if endpoints else None,
            upstreams=endpoints if len(endpoints) > 1 else (),
            base_path=base_path,
            balance=balance,
            auth_required=auth == "required",
            scopes=scopes,
            timeout=timeout,
            max_body_bytes=body,
            request_buffering=buffering,
            forward_authorization=forward_auth,
            cors=cors,
            hosts=hosts,
            strip_prefix=bool(flags["strip_prefix"]),
            preserve_host=bool(flags["preserve_host"]),
            rewrite_redirects=bool(flags["rewrite_redirects"]),
            websocket=bool(flags["websocket"]),
            websocket_max_lifetime=ws_lifetime,
        )

    def hosts(self, path: str, value: Any) -> tuple[str, ...]:
        """`hosts`: exact names and `*.` wildcards, lower-cased, without ports."""
        if value is None:
            return ()
        if not isinstance(value, list) or not value:
            raise self.fail(path, "must be a non-empty list of host names (omit it for any host)")
        out: list[str] = []
        for i, item in enumerate(value):
            text = self.string(f"{path}[{i}]", item).strip().lower()
            name = text[2:] if text.startswith("*.") else text
            if host_name(name.encode()) != name.rstrip(".") or not name:
                raise self.fail(
                    f"{path}[{i}]",
                    "must be a host name without port, or *. and a domain (*.example.com)",
                )
            entry = text.rstrip(".")
            if entry not in out:
                out.append(entry)
        return tuple(out)

    def path_prefix(self, path: str, value: Any) -> str:
        text = self.string(path, value)
        if not text.startswith("/"):
            raise self.fail(path, 'must start with "/"')
        if "?" in text or "#" in text:
            raise self.fail(path, "must not contain a query or fragment")
        if ";" in text:
            raise self.fail(
                path, "must not contain ';' parameters (they are ignored when matching)"
            )
        try:
            normal = normalise_path(text)
        except PathError as exc:
            raise self.fail(path, f"invalid path: {exc.reason}") from None
        if normal != text and normal + "/" != text:
            raise self.fail(path, f"must be a normalised path (did you mean {normal!r}?)")
        return normal.rstrip("/") or "/"

    def methods(self, path: str, value: Any) -> frozenset[str] | None:
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise self.fail(path, "must be a non-empty list of HTTP methods")
        out = set()
        for i, item in enumerate(value):
            method = self.string(f"{path}[{i}]", item).upper()
            if not _TCHAR.match(method):
                raise self.fail(f"{path}[{i}]", "not a valid HTTP method")
            out.add(method)
        return frozenset(out)

    def scopes(self, path: str, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(path, "must be a list of scope names")
        out: list[str] = []
        for i, item in enumerate(value):
            scope = self.string(f"{path}[{i}]", item)
            if not _SCOPE.match(scope):
                raise self.fail(
                    f"{path}[{i}]", "not a valid scope name (one name, no spaces or quotes)"
                )
            if scope not in out:
                out.append(scope)
        return tuple(out)


def share_budget(cfg: Config, share: int) -> Config:
    """One of `share` processes on one Authlete access token (`--workers`): its part of the
    call budget, so that together they keep to `rate` and `burst`."""
    if share <= 1:
        return cfg
    if cfg.shared is not None:
        # The workers share the fleet's budget in Redis; only the fallback is theirs to split.
        shared = cfg.shared
        fallback = replace(
            shared,
            fallback_rate=shared.fallback_rate / share,
            fallback_burst=max(1, shared.fallback_burst // share),
        )
        return replace(cfg, shared=fallback)
    limit = cfg.authlete.rate_limit
    part = replace(limit, rate=limit.rate / share, burst=max(1, limit.burst // share))
    return replace(cfg, authlete=replace(cfg.authlete, rate_limit=part))


def summary(cfg: Config) -> Iterator[str]:
    """The one-screen summary printed by `gateway check-config`."""
    yield f"listen {cfg.listen}   admin {cfg.admin_listen}   realm {cfg.realm!r}"
    yield (
        f"authlete {cfg.authlete.introspection_url}  timeout {cfg.authlete.timeout:g}s   "
        f"cache ttl {cfg.cache.ttl:g}s negative {cfg.cache.negative_ttl:g}s "
        f"max {cfg.cache.max_entries}"
    )
    if cfg.shared is not None:
        sh = cfg.shared
        where = urlsplit(sh.redis_url)
        place = where.path if where.scheme == "unix" else f"{where.hostname}:{where.port or 6379}"
        yield (
            f"shared {where.scheme}://{place} prefix {sh.key_prefix!r}  local ttl "
            f"{sh.local_ttl:g}s  timeout {sh.timeout:g}s  fallback {sh.fallback_rate:g}/s"
        )
    yield f"purge endpoint: {'on' if cfg.admin.token else 'off (no admin.token)'}"
    if cfg.tracing.active:
        kinds = ["generate"] if cfg.tracing.generate else []
        if cfg.tracing.opentelemetry:
            kinds.append(f"opentelemetry ({', '.join(cfg.tracing.exporters) or 'no exporter'})")
        yield f"tracing: {', '.join(kinds)}"
    if cfg.decision is not None:
        yield f"decision endpoint: {cfg.decision.path} on {cfg.decision.listen or cfg.listen}"
    yield f"{len(cfg.routes)} route(s), first match wins:"
    for r in cfg.routes:
        methods = ",".join(sorted(r.methods)) if r.methods else "*"
        auth = (
            ("scopes: " + " ".join(r.scopes))
            if r.scopes
            else ("auth: token" if r.auth_required else "auth: none")
        )
        target = r.upstream.origin if r.upstream is not None else "(decisions only)"
        yield f"  {r.name:<16} {methods:<10} {r.path_prefix:<20} -> {target}  {auth}"
