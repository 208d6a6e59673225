"""The whole request pipeline, top to bottom, and the two listeners that serve it.

routing -> bearer -> verdicts (cache -> introspection) -> decision -> proxy
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import signal
import ssl
import time
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from yarl import URL

from gateway import bearer
from gateway.budget import Budget
from gateway.config import Config, ConfigError, Route, load_config
from gateway.decision import (
    BAD_GATEWAY,
    GATEWAY_TIMEOUT,
    NOT_FOUND,
    SERVICE_UNAVAILABLE,
    Decider,
    Denial,
    denial,
)
from gateway.introspection import Active, IntrospectionError, Introspector
from gateway.logs import AccessLog, RequestIds
from gateway.metrics import NO_ROUTE, Metrics
from gateway.proxy import BodyGuard, HeaderPolicy, UpstreamError, forward
from gateway.routing import PathError, Router, parse_target
from gateway.tls import (
    TLSError,
    authlete_context,
    load_server_certificates,
    server_context,
    upstream_context,
)
from gateway.verdicts import Verdicts

log = logging.getLogger("gateway")

_NO_STORE = "no-store"


class Gateway:
    """One gateway process: the proxy listener, the admin listener and their shared state."""

    def __init__(
        self,
        cfg: Config,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
        admin_socket: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.plan = Plan(cfg)
        self.reuse_port = reuse_port
        self.admin_socket = admin_socket
        self.metrics = metrics if metrics is not None else Metrics()
        self.ready = False
        self.budget = Budget(cfg.authlete, self.metrics)
        self.metrics.budget_tokens.set_function(lambda: self.budget.tokens)
        self._request_ids = RequestIds()
        self._access_log = AccessLog() if cfg.log.access else None
        self._runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._authlete_session: aiohttp.ClientSession | None = None
        self._upstream_session: aiohttp.ClientSession | None = None
        self._introspector: Introspector | None = None
        self._prober: asyncio.Future[None] | None = None
        self._tls: ssl.SSLContext | None = None
        self._verdicts: Verdicts | None = None
        self.proxy_port = 0
        self.admin_port = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        cfg = self.cfg
        self._authlete_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=256, keepalive_timeout=30, ssl=authlete_context(cfg.authlete.ca_file)
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        self._upstream_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, keepalive_timeout=30, ssl=upstream_context(cfg.upstream_tls)
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            read_bufsize=_READ_BUFFER,
        )
        self._introspector = Introspector(
            cfg.authlete, self._authlete_session, self.budget, self.metrics
        )
        self._verdicts = Verdicts(
            cfg.cache, self._introspector.introspect, self.metrics, cfg.authlete.deadline
        )
        self._prober = asyncio.ensure_future(self._probe_while_unhealthy())
        verdicts = self._verdicts
        self.metrics.watch_cache(lambda: len(verdicts.cache), lambda: verdicts.cache.evictions)

        limits = cfg.limits
        server = _Server(
            self.handle,
            handler_cancellation=True,
            access_log=None,
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
            keepalive_timeout=limits.idle_timeout,
            read_bufsize=_READ_BUFFER,
        )
        server.gateway = self
        self.metrics.open_connections.set_function(lambda: len(server.connections))
        if cfg.tls is not None:
            self._tls = server_context(cfg.tls)
        self._runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=cfg.shutdown_timeout
        )
        await self._runner.setup()
        await _ProxySite(
            self._runner,
            cfg.listen.host,
            cfg.listen.port,
            backlog=1024,
            reuse_port=self.reuse_port or None,
            ssl_context=self._tls,
            handshake_timeout=limits.header_timeout,
        ).start()
        self.proxy_port = _bound_port(self._runner)

        admin = web.Application()
        admin.router.add_get("/healthz", self._healthz)
        admin.router.add_get("/readyz", self._readyz)
        admin.router.add_get("/metrics", self._metrics)
        self._admin_runner = web.AppRunner(admin, handle_signals=False, access_log=None)
        await self._admin_runner.setup()
        if self.admin_socket is not None:  # a worker of --workers: the supervisor asks here
            await web.UnixSite(self._admin_runner, self.admin_socket).start()
        else:
            await web.TCPSite(
                self._admin_runner, cfg.admin_listen.host, cfg.admin_listen.port
            ).start()
            self.admin_port = _bound_port(self._admin_runner)
        self.ready = True
        admin_at = self.admin_socket or f"{cfg.admin_listen.host}:{self.admin_port}"
        log.info(
            "listening: proxy %s:%d, admin %s, %d routes",
            cfg.listen.host,
            self.proxy_port,
            admin_at,
            len(cfg.routes),
        )

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then close everything."""
        self.ready = False
        if self._prober is not None:
            self._prober.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        for session in (self._upstream_session, self._authlete_session):
            if session is not None:
                await session.close()
        if self._access_log is not None:
            self._access_log.flush()

    @property
    def verdicts(self) -> Verdicts:
        assert self._verdicts is not None, "Gateway.start() first"
        return self._verdicts

    # ------------------------------------------------------------------ the request path
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        ex = Exchange(self._request_ids.take(request.headers.get("X-Request-Id")), request.method)
        protocol = request.protocol
        assert isinstance(protocol, _Protocol)
        protocol.request_started()
        try:
            response = await self._decide_and_forward(request, ex)
        except BaseException:
            ex.status = 499  # the client went away (handler cancelled), or a bug of ours
            self._account(request, ex, None)
            raise
        finally:
            protocol.request_finished()
        self._account(request, ex, response)
        return response

    async def _decide_and_forward(
        self, request: web.BaseRequest, ex: Exchange
    ) -> web.StreamResponse:
        try:
            target = parse_target(request.raw_path)
        except PathError as exc:
            bad_path = denial(400, "invalid_request", f"Invalid request path: {exc.reason}.")
            return self._deny(ex, bad_path)
        ex.path = target.path
        plan = self.plan  # one config for the whole request, even across a reload
        route = plan.router.match(ex.method, target.path)
        if route is None:
            return self._deny(ex, NOT_FOUND)
        ex.route = route.name
        headers = request.headers
        if "Transfer-Encoding" in headers and not _plain_chunked(request):
            # Only a single "chunked" is unambiguous; anything else is refused, never
            # passed on for an upstream to read differently (request smuggling).
            return self._refuse(request, ex, _BAD_FRAMING)
        if route.max_body_bytes and (request.content_length or 0) > route.max_body_bytes:
            return self._refuse(request, ex, _TOO_LARGE)

        identity: Active | None = None
        if route.auth_required:
            token = bearer.extract(
                request.headers.getall("Authorization", ()), plan.cfg.max_token_bytes
            )
            if isinstance(token, bearer.NoToken):
                return self._deny(ex, plan.decider.no_token(token))
            try:
                verdict, ex.cache = await self.verdicts.lookup(token)
            except IntrospectionError as exc:
                ex.cache = "miss"
                log.warning("no verdict for route %s: %s", route.name, exc.detail)
                return self._deny(ex, _unavailable(exc.retry_after))
            if isinstance(verdict, Active):
                ex.identity = verdict
            refused = plan.decider.check(verdict, route.scopes)
            if refused is not None:
                return self._deny(ex, refused)
            identity = ex.identity

        return await self._forward(request, ex, plan, route, target.forward, identity)

    async def _forward(
        self,
        request: web.BaseRequest,
        ex: Exchange,
        plan: Plan,
        route: Route,
        path_and_query: str,
        identity: Active | None,
    ) -> web.StreamResponse:
        assert self._upstream_session is not None
        headers = plan.header_policy.upstream_headers(request, identity)
        headers["X-Request-Id"] = ex.request_id
        url = URL(route.upstream.origin + path_and_query, encoded=True)
        body = (
            BodyGuard(request.content, route.max_body_bytes, plan.cfg.limits.idle_timeout)
            if request.body_exists
            else None
        )
        ex.upstream_started = time.perf_counter()
        self.metrics.overhead.labels(route.name).observe(ex.upstream_started - ex.started)
        try:
            response = await forward(
                request,
                self._upstream_session,
                url,
                headers,
                plan.timeouts[route.name],
                ex.request_id,
                body,
            )
        except UpstreamError as exc:
            if body is not None and body.too_large:
                return self._refuse(request, ex, _TOO_LARGE)
            if body is not None and body.stalled:
                return self._refuse(request, ex, _BODY_TIMEOUT)
            self.metrics.upstream_errors.labels(route.name, exc.kind).inc()
            log.warning("upstream %s for route %s: %s", route.upstream.origin, route.name, exc.kind)
            return self._deny(ex, GATEWAY_TIMEOUT if exc.kind == "timeout" else BAD_GATEWAY)
        finally:
            ex.upstream_seconds = time.perf_counter() - ex.upstream_started
            self.metrics.upstream_duration.labels(route.name).observe(ex.upstream_seconds)
        ex.status = response.status
        self.metrics.count_upstream(route.name, response.status)
        return response

    def _refuse(self, request: web.BaseRequest, ex: Exchange, refused: Denial) -> web.Response:
        """A denial after which the rest of the request body is not worth reading: answer
        and close, instead of aiohttp's default of draining the body for up to 10 s."""
        protocol = request.protocol
        if isinstance(protocol, _Protocol):
            protocol.no_linger()
        return self._deny(ex, refused, close=True)

    def _deny(self, ex: Exchange, refused: Denial, close: bool = False) -> web.Response:
        response = web.Response(
            status=refused.status, body=refused.body, content_type="application/json"
        )
        if close:
            response.force_close()
        headers = response.headers
        headers["Cache-Control"] = _NO_STORE
        headers["Pragma"] = "no-cache"
        headers["X-Request-Id"] = ex.request_id
        if refused.challenge is not None:
            headers["WWW-Authenticate"] = refused.challenge
        if refused.retry_after is not None:
            headers["Retry-After"] = refused.retry_after
        ex.status = refused.status
        return response

    def _account(
        self, request: web.BaseRequest, ex: Exchange, response: web.StreamResponse | None
    ) -> None:
        """Metrics and the access log line: one place, once per request."""
        duration = time.perf_counter() - ex.started
        self.metrics.count_request(ex.route, ex.method, ex.status)
        self.metrics.request_duration.labels(ex.route).observe(duration)
        if self._access_log is None:
            return
        # Built by hand: every field but the subject and a refused raw path is made of
        # characters that need no JSON escaping (request ids, route names and methods are
        # validated tokens, a normalised path has no quote or backslash, the rest numbers).
        identity = ex.identity
        path = (
            '"' + ex.path + '"' if ex.path is not None else _json(_loggable_path(request.raw_path))
        )
        upstream = "null" if ex.upstream_seconds is None else f"{ex.upstream_seconds:.6f}"
        cache = "null" if ex.cache is None else '"' + ex.cache + '"'
        if identity is None:
            client_id = subject = "null"
        else:
            client_id = '"' + identity.client_id + '"'
            subject = _json(identity.subject)
        out = response.body_length if response is not None else 0
        self._access_log.write(
            f'"request_id":"{ex.request_id}","remote":"{request.remote}",'
            f'"route":"{ex.route}","method":"{ex.method}","path":{path},'
            f'"status":{ex.status},"duration":{duration:.6f},"upstream_duration":{upstream},'
            f'"cache":{cache},"client_id":{client_id},"subject":{subject},'
            f'"bytes_in":{request.content.total_bytes},"bytes_out":{out}'
        )

    # ------------------------------------------------------------------ reload
    def reload(self, path: str) -> bool:
        """SIGHUP: a valid file replaces routes, headers, cache and Authlete settings for new
        requests, atomically; an invalid one leaves the running config alone."""
        try:
            new = load_config(path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config reload rejected: %s", problem)
            self.metrics.reloads.labels("error").inc()
            return False
        old = self.cfg
        for key in ("listen", "admin_listen"):
            if getattr(new, key) != getattr(old, key):
                log.warning(
                    "config reload: %s changed to %s; restart to apply", key, getattr(new, key)
                )
        if self._tls is not None and new.tls is not None:
            try:
                load_server_certificates(self._tls, new.tls)
            except TLSError as exc:
                log.error("config reload rejected: %s", exc)
                self.metrics.reloads.labels("error").inc()
                return False
        elif (new.tls is None) != (old.tls is None):
            log.warning("config reload: tls switched on or off; restart to apply")
        if new.upstream_tls != old.upstream_tls or new.limits != old.limits:
            log.warning("config reload: upstream_tls and limits apply after a restart")
        self.cfg = new
        self.plan = Plan(new)
        if self._verdicts is not None:
            if new.cache != old.cache:
                self._verdicts.reconfigure(new.cache)
            if new.authlete != old.authlete:
                self._connect_authlete(new)
        if new.log.access != old.log.access:
            if self._access_log is not None:
                self._access_log.flush()
            self._access_log = AccessLog() if new.log.access else None
        logging.getLogger().setLevel(new.log.level.upper())
        self.metrics.reloads.labels("success").inc()
        log.info("config reloaded: %d routes", len(new.routes))
        return True

    def _connect_authlete(self, cfg: Config) -> None:
        """A new budget and client for new Authlete settings; calls in flight finish on the old."""
        assert self._authlete_session is not None and self._verdicts is not None
        self.budget = Budget(cfg.authlete, self.metrics)
        self._introspector = Introspector(
            cfg.authlete, self._authlete_session, self.budget, self.metrics
        )
        self._verdicts.use(self._introspector.introspect, cfg.authlete.deadline)

    async def _probe_while_unhealthy(self) -> None:
        """Let the breaker close (and readiness return) without waiting for client traffic,
        which an orchestrator has routed away from a not-ready replica."""
        while True:
            await asyncio.sleep(max(0.5, self.cfg.authlete.circuit_breaker.cooldown / 2))
            assert self._introspector is not None
            if self.budget.ready and not self._introspector.credentials_rejected:
                continue
            probe = "gateway-probe-" + os.urandom(16).hex()  # unknown: UNAUTHORIZED if alive
            deadline = time.monotonic() + self.cfg.authlete.deadline
            with contextlib.suppress(IntrospectionError):
                await self._introspector.introspect(probe, deadline)

    # ------------------------------------------------------------------ admin listener
    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        problems = []
        if not self.ready:
            problems.append("not serving")
        elif not self.budget.ready:
            problems.append("Authlete circuit breaker open")
        if self._introspector is not None and self._introspector.credentials_rejected:
            problems.append("Authlete rejects the gateway's access token")
        if problems:
            return web.json_response({"status": "not ready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _raw_answer(status: int, reason: str, error: str, description: str) -> bytes:
    body = json.dumps({"error": error, "error_description": description}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


# Read buffers of 16 KiB instead of aiohttp's 64 KiB, for client bodies and upstream
# answers alike: 64 concurrent 1 MiB downloads peaked 40% lower, and ran faster.
_READ_BUFFER = 1 << 14


def write_and_close(transport: asyncio.BaseTransport, answer: bytes) -> None:
    # uvloop's transports are not asyncio.Transport subclasses, but both can write.
    write = getattr(transport, "write", None)
    if write is not None:
        write(answer)
    transport.close()


_REFUSED = _raw_answer(
    503, "Service Unavailable", "temporarily_unavailable", "Too many connections; try again."
)
_HEADER_TIMEOUT = _raw_answer(
    408, "Request Timeout", "request_timeout", "The request headers took too long."
)


class _Protocol(RequestHandler):
    """One client connection: aiohttp's, plus the gateway's own limits and error answers.

    aiohttp's error answers quote the offending request bytes (which may be an
    Authorization header) in the body and the log; ours name only the kind of error.
    """

    gateway: Gateway
    _head_timer: asyncio.TimerHandle | None = None
    _in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if (
            manager is not None
            and len(manager.connections) > self.gateway.cfg.limits.max_connections
        ):
            self.gateway.metrics.connections_refused.inc()
            write_and_close(transport, _REFUSED)
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Only a request head still incomplete after this data needs the timer: the
        # common case (a whole head in one read) allocates none.
        if self._in_request or self._messages:
            self._disarm()
        elif self._head_timer is None:
            self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        # A slowloris sends a request head a byte at a time: the whole head must arrive
        # within header_timeout of its first byte (or of the connection, for the first).
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(
            self.gateway.cfg.limits.header_timeout, self._head_timed_out
        )

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is not None and not self._in_request:
            self.gateway.metrics.header_timeouts.inc()
            write_and_close(transport, _HEADER_TIMEOUT)

    def request_started(self) -> None:
        self._in_request = True
        if self._head_timer is not None:
            self._disarm()

    def request_finished(self) -> None:
        self._in_request = False

    def no_linger(self) -> None:
        # Not 0: closing with unread bytes in the socket makes the kernel send a reset,
        # which can destroy the answer before the client reads it. A second of draining
        # lets it arrive; a client still sending after that is cut off.
        self._lingering_time = min(self._lingering_time, 1.0)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            log.info("malformed request from %s: %s", request.remote, type(exc).__name__)
            error, description = "invalid_request", "The request is not valid HTTP."
            if isinstance(exc, LineTooLong) or "Too many headers" in str(exc):
                status = 431
                error, description = "invalid_request", "The request headers are too large."
        elif isinstance(exc, ConnectionError):
            log.debug("client connection lost: %s", type(exc).__name__)
            error, description = "server_error", "The connection was lost."
        else:
            # A bug of ours: keep the traceback (our exceptions never carry a token).
            log.error("request handler failed", exc_info=exc)
            error, description = "server_error", "The gateway failed to handle the request."
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        # Never reached the handler: counted here, without a route or a trusted method.
        self.gateway.metrics.count_request(NO_ROUTE, "OTHER", status)
        response = web.Response(
            status=status,
            body=json.dumps({"error": error, "error_description": description}).encode(),
            content_type="application/json",
            headers={"Cache-Control": _NO_STORE},
        )
        response.force_close()
        return response


class _ProxySite(web.TCPSite):
    """aiohttp's TCPSite, with a TLS handshake bound by header_timeout: a connection that
    never starts its handshake is not held for asyncio's default 60 s."""

    def __init__(self, *args: Any, handshake_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handshake_timeout = handshake_timeout

    async def start(self) -> None:
        if self._ssl_context is None:
            await super().start()
            return
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
            ssl_handshake_timeout=self._handshake_timeout,
        )


class _Server(web.Server):
    gateway: Gateway

    def __call__(self) -> RequestHandler:
        protocol = _Protocol(self, loop=self._loop, **self._kwargs)
        protocol.gateway = self.gateway
        return protocol


class Plan:
    """Everything a request reads from the config, built once per (re)load."""

    __slots__ = ("cfg", "decider", "header_policy", "router", "timeouts")

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.router = Router(cfg.routes)
        self.decider = Decider(cfg.realm)
        self.header_policy = HeaderPolicy(cfg.headers, cfg.trusted_proxies)
        self.timeouts = {
            r.name: aiohttp.ClientTimeout(total=None, sock_connect=r.timeout, sock_read=r.timeout)
            for r in cfg.routes
        }


class Exchange:
    """What one request has learnt on its way through; read once, by `_account`."""

    __slots__ = (
        "cache",
        "identity",
        "method",
        "path",
        "request_id",
        "route",
        "started",
        "status",
        "upstream_seconds",
        "upstream_started",
    )

    def __init__(self, request_id: str, method: str) -> None:
        self.started = time.perf_counter()
        self.request_id = request_id
        self.method = method
        self.route = NO_ROUTE
        self.path: str | None = None
        self.status = 0
        self.cache: str | None = None
        self.identity: Active | None = None
        self.upstream_started = 0.0
        self.upstream_seconds: float | None = None


_BAD_FRAMING = denial(400, "invalid_request", "Only Transfer-Encoding: chunked is accepted.")
_TOO_LARGE = denial(413, "request_too_large", "The request body exceeds this route's limit.")
_BODY_TIMEOUT = denial(408, "request_timeout", "The request body stopped arriving.")


def _plain_chunked(request: web.BaseRequest) -> bool:
    values = request.headers.getall("Transfer-Encoding")
    return request.version >= (1, 1) and len(values) == 1 and values[0].strip().lower() == "chunked"


def _unavailable(retry_after: float | None) -> Denial:
    if retry_after is None:
        return SERVICE_UNAVAILABLE
    return SERVICE_UNAVAILABLE._replace(retry_after=str(max(1, math.ceil(retry_after))))


def _loggable_path(raw: str) -> str:
    path = raw.partition("?")[0]
    return path[:256].encode("ascii", "backslashreplace").decode()


def _json(value: str | None) -> str:
    return json.dumps(value)  # ASCII only: no U+2028 and friends to split a line


def _bound_port(runner: web.BaseRunner) -> int:
    addresses = runner.addresses
    return int(addresses[0][1]) if addresses else 0


def tune_gc() -> None:
    """Everything allocated so far (modules, config, the listeners) lives for the whole
    process: keep it out of every future collection, and collect the young generation less
    often than the default 700 allocations (each request allocates dozens)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)


async def serve(
    cfg: Config,
    path: str | None = None,
    reuse_port: bool = False,
    admin_socket: str | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then drain and return. SIGHUP reloads `path`."""
    gateway = Gateway(cfg, reuse_port=reuse_port, admin_socket=admin_socket)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if path is not None:
        loop.add_signal_handler(signal.SIGHUP, gateway.reload, path)
    try:
        await gateway.start()
    except OSError as exc:
        await gateway.stop()
        raise SystemExit(f"gateway: cannot listen: {exc.strerror or exc}") from None
    except TLSError as exc:
        await gateway.stop()
        raise SystemExit(f"gateway: {exc}") from None
    tune_gc()
    await stop.wait()
    gateway.ready = False  # /readyz says 503 at once, so load balancers stop sending
    if gateway.cfg.drain_delay > 0:
        log.info("signal received: serving %gs more while readiness turns", gateway.cfg.drain_delay)
        await asyncio.sleep(gateway.cfg.drain_delay)
    log.info("signal received: draining for up to %gs", gateway.cfg.shutdown_timeout)
    await gateway.stop()
    log.info("stopped")
