"""One gateway process: the proxy listener, the admin listener, the upstream pools and the
Authlete client, put together, started, reloaded and stopped.

The request path itself is `server` (connections) -> `pipeline` (decisions) -> `upstream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import ssl
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from gateway.admin import admin_app
from gateway.balance import Balancer, Resolve, is_address, system_resolve
from gateway.budget import Budget
from gateway.config import Config, ConfigError, Route, Upstream, load_config, share_budget
from gateway.fleet_cache import FleetCache
from gateway.introspection import IntrospectionError, Introspector
from gateway.logs import AccessLog, set_log_format
from gateway.metrics import EndpointCounts, Metrics
from gateway.pipeline import Plan
from gateway.server import Listener
from gateway.shared import Store, service_namespace
from gateway.tls import (
    TLSError,
    authlete_context,
    load_server_certificates,
    server_context,
    upstream_context,
)
from gateway.tracing import Tracing
from gateway.upstream import EndpointStats, Pool
from gateway.verdicts import Verdicts

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from gateway.otel import OpenTelemetry

log = logging.getLogger("gateway")


class Gateway:
    def __init__(
        self,
        cfg: Config,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
        admin_socket: str | None = None,
        budget_share: int = 1,
        span_exporter: SpanExporter | None = None,
    ) -> None:
        """`span_exporter`: with tracing.opentelemetry, export spans there one by one instead
        of to the exporters the OTEL_* variables name (tests)."""
        # A worker of `--workers N` runs on 1/N of the Authlete budget, also after a reload.
        self.budget_share = budget_share
        cfg = share_budget(cfg, budget_share)
        self.cfg = cfg
        self.reuse_port = reuse_port
        self.admin_socket = admin_socket
        self.metrics = metrics if metrics is not None else Metrics()
        self.ready = False
        self.store: Store | None = None
        self._fleet: FleetCache | None = None
        if cfg.shared is not None:
            service = service_namespace(cfg.authlete.base_url, cfg.authlete.service_id)
            self.store = Store(cfg.shared, self.metrics, service=service)
            self._fleet = FleetCache(self.store, cfg.shared, self.metrics)
        self.budget = self._new_budget(cfg)
        self.metrics.budget_tokens.set_function(lambda: self.budget.tokens)
        self.metrics.ready.set_function(lambda: 0.0 if self._not_ready() else 1.0)
        self.pools: dict[object, Pool] = {}
        self.endpoint_stats: dict[Upstream, EndpointStats] = {}
        self.resolve: Resolve = system_resolve  # host name -> addresses (a seam for tests)
        self.metrics.watch_endpoints(self._endpoint_counts)
        self._upstream_tls: ssl.SSLContext | None = None
        self._server: asyncio.Server | None = None
        self._listener: Listener | None = None
        self._decision_server: asyncio.Server | None = None
        self._decision_listener: Listener | None = None  # `decision_listen`
        self._admin_runner: web.AppRunner | None = None
        self._authlete_session: aiohttp.ClientSession | None = None
        self._introspector: Introspector | None = None
        self._prober: asyncio.Future[None] | None = None
        self._tls: ssl.SSLContext | None = None
        self._verdicts: Verdicts | None = None
        self.proxy_port = 0
        self.admin_port = 0
        self.decision_port = 0
        self._span_exporter = span_exporter
        self._otel: OpenTelemetry | None = None
        self._tracing: Tracing | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        cfg = self.cfg
        if cfg.tracing.opentelemetry:
            from gateway.otel import OpenTelemetry

            self._otel = OpenTelemetry(cfg.tracing.exporters, self._span_exporter)
            log.info(
                "tracing: OpenTelemetry spans exported to %s",
                ", ".join(cfg.tracing.exporters) or "nowhere (OTEL_TRACES_EXPORTER=none)",
            )
        self._tracing = self._tracing_for(cfg)
        self._authlete_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=256, keepalive_timeout=30, ssl=authlete_context(cfg.authlete.ca_file)
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        self._upstream_tls = upstream_context(cfg.upstream_tls)
        if self.store is not None:
            await self.store.start()  # or fallback mode: never a reason not to serve
        self._introspector = Introspector(
            cfg.authlete, self._authlete_session, self.budget, self.metrics
        )
        self._verdicts = Verdicts(
            cfg.cache,
            self._introspector.introspect,
            self.metrics,
            cfg.authlete.deadline,
            per_client=cfg.authlete.rate_limit.per_client,
            spare=lambda: self.budget.spare,  # the budget of the moment: reload replaces it
            fleet=self._fleet,
            local_ttl=cfg.shared.local_ttl if cfg.shared is not None else 0.0,
        )
        self._prober = asyncio.ensure_future(self._probe_while_unhealthy())
        verdicts = self._verdicts
        self.metrics.watch_cache(lambda: len(verdicts.cache), lambda: verdicts.cache.evictions)

        if cfg.tls is not None:
            self._tls = server_context(cfg.tls)
        plan = Plan(cfg, self._pool_for, self.metrics)
        access_log = AccessLog() if cfg.log.access else None
        listener = self._listener = self._new_listener(plan, verdicts, access_log, False)
        self._server = await self._serve(listener, cfg.listen.host, cfg.listen.port)
        self.proxy_port = int(self._server.sockets[0].getsockname()[1])
        listener.start_sweeping()
        decision_at = cfg.decision.listen if cfg.decision is not None else None
        if decision_at is not None:
            decisions = self._decision_listener = self._new_listener(
                plan, verdicts, access_log, True
            )
            self._decision_server = await self._serve(decisions, decision_at.host, decision_at.port)
            self.decision_port = int(self._decision_server.sockets[0].getsockname()[1])
            decisions.start_sweeping()
        self.metrics.open_connections.set_function(
            lambda: sum(len(li.connections) for li in self._listeners())
        )
        if cfg.decision is not None and not cfg.trusted_proxies:
            log.warning(
                "decision mode is on but trusted_proxies is empty: every decision request "
                "is refused (403); list the ingress's addresses"
            )

        admin = admin_app(
            self.metrics.registry,
            self._not_ready,
            purge=verdicts.purge,
            admin_token=lambda: self.cfg.admin.token,  # a reload may change it
            purges=self.metrics.purges,
        )
        self._admin_runner = web.AppRunner(admin, handle_signals=False, access_log=None)
        await self._admin_runner.setup()
        if self.admin_socket is not None:  # a worker of --workers: the supervisor asks here
            await web.UnixSite(self._admin_runner, self.admin_socket).start()
        else:
            await web.TCPSite(
                self._admin_runner, cfg.admin_listen.host, cfg.admin_listen.port
            ).start()
            addresses = self._admin_runner.addresses
            self.admin_port = int(addresses[0][1]) if addresses else 0
        self.ready = True
        admin_at = self.admin_socket or f"{cfg.admin_listen.host}:{self.admin_port}"
        log.info(
            "listening: proxy %s:%d, admin %s, %d routes",
            cfg.listen.host,
            self.proxy_port,
            admin_at,
            len(cfg.routes),
        )
        if cfg.decision is not None:
            where = (
                f"{decision_at.host}:{self.decision_port}" if decision_at else "the proxy listener"
            )
            log.info("decision endpoint: %s on %s", cfg.decision.path, where)

    def _new_listener(
        self, plan: Plan, verdicts: Verdicts, access_log: AccessLog | None, decision_only: bool
    ) -> Listener:
        listener = Listener(
            plan,
            verdicts,
            self.metrics,
            self.cfg.limits,
            self.pools,
            access_log,
            tls=self._tls is not None,
            decision_only=decision_only,
        )
        listener.tracing = self._tracing
        return listener

    async def _serve(self, listener: Listener, host: str, port: int) -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(
            listener,
            host,
            port,
            backlog=1024,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            ssl=self._tls,
            # A connection that never finishes its handshake is not held for asyncio's 60 s.
            ssl_handshake_timeout=self.cfg.limits.header_timeout if self._tls is not None else None,
        )

    def _listeners(self) -> list[Listener]:
        return [li for li in (self._listener, self._decision_listener) if li is not None]

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then close everything."""
        self.ready = False
        if self._prober is not None:
            self._prober.cancel()
        for server in (self._server, self._decision_server):
            if server is not None:
                server.close()
        listeners = self._listeners()
        for one in listeners:
            one.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(li.emptied.wait() for li in listeners)),
                self.cfg.shutdown_timeout,
            )
        for one in listeners:
            for conn in list(one.connections):
                conn.abort()
            one.stop_sweeping()
        listener = self._listener
        for pool in self.pools.values():
            pool.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._authlete_session is not None:
            await self._authlete_session.close()
        self.budget.close()
        if self._fleet is not None:
            self._fleet.close()
        if self.store is not None:
            await self.store.close()
        if listener is not None and listener.access_log is not None:
            listener.access_log.flush()
        if self._otel is not None:
            await self._otel.shutdown()

    @property
    def verdicts(self) -> Verdicts:
        assert self._verdicts is not None, "Gateway.start() first"
        return self._verdicts

    def _pool_for(self, route: Route) -> Pool:
        """One pool per origin (a Balancer per list of endpoints or host name: it resolves
        the name), kept across reloads."""
        cfg = self.cfg
        max_age = cfg.upstream_max_connection_age
        endpoints = route.endpoints
        if len(endpoints) == 1 and is_address(endpoints[0].host):
            upstream = endpoints[0]
            pool = self.pools.get(upstream)
            if pool is None:
                pool = self.pools[upstream] = Pool(
                    upstream, self._upstream_tls, stats=self._stats_for(upstream)
                )
            pool.max_age = max_age or math.inf
            return pool
        key = (endpoints, route.balance)
        balancer = self.pools.get(key)
        if isinstance(balancer, Balancer):
            balancer.configure(cfg.upstream_dns_ttl, max_age)
            return balancer
        balancer = self.pools[key] = Balancer(
            endpoints,
            self._upstream_tls,
            route.balance,
            self._stats_for,
            resolve=self.resolve,
            dns_ttl=cfg.upstream_dns_ttl,
            max_age=max_age,
        )
        return balancer

    def _stats_for(self, upstream: Upstream) -> EndpointStats:
        stats = self.endpoint_stats.get(upstream)
        if stats is None:
            stats = self.endpoint_stats[upstream] = EndpointStats()
        return stats

    def _endpoint_counts(self) -> list[EndpointCounts]:
        stats = self.endpoint_stats.items()
        return [(u.origin, s.requests, s.failures, s.ejections) for u, s in stats]

    # ------------------------------------------------------------------ reload
    def reload(self, path: str) -> bool:
        """SIGHUP: a valid file replaces routes, headers, cache and Authlete settings for new
        requests, atomically; an invalid one leaves the running config alone."""
        try:
            new = share_budget(load_config(path), self.budget_share)
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
        if new.shared != old.shared:
            log.warning("config reload: shared applies after a restart")
            new = replace(new, shared=old.shared)
        self.cfg = new
        old_at = old.decision.listen if old.decision is not None else None
        new_at = new.decision.listen if new.decision is not None else None
        if new_at != old_at:
            log.warning("config reload: decision_listen changed to %s; restart to apply", new_at)
        listener = self._listener
        plan = Plan(new, self._pool_for, self.metrics)
        if new.tracing != old.tracing:
            if new.tracing.opentelemetry != old.tracing.opentelemetry or (
                new.tracing.exporters != old.tracing.exporters
            ):
                log.warning("config reload: tracing.opentelemetry applies after a restart")
            self._tracing = self._tracing_for(new)
        for one in self._listeners():
            one.plan = plan
            one.tracing = self._tracing
            one.reloaded(new.shutdown_timeout)  # WebSockets of the old config end
        if self._verdicts is not None:
            if new.cache != old.cache:
                self._verdicts.reconfigure(new.cache)
            if new.authlete != old.authlete:
                self._connect_authlete(new)
        if listener is not None and new.log.access != old.log.access:
            if listener.access_log is not None:
                listener.access_log.flush()
            access_log = AccessLog() if new.log.access else None
            for one in self._listeners():
                one.access_log = access_log
        logging.getLogger().setLevel(new.log.level.upper())
        if new.log.format != old.log.format:
            set_log_format(new.log.format)
        self.metrics.reloads.labels("success").inc()
        log.info("config reloaded: %d routes", len(new.routes))
        return True

    def _tracing_for(self, cfg: Config) -> Tracing | None:
        """What the listeners do about trace context; None: nothing per request."""
        if not cfg.tracing.generate and self._otel is None:
            return None
        return Tracing(cfg.tracing.generate, self._otel)

    def _connect_authlete(self, cfg: Config) -> None:
        """A new budget and client for new Authlete settings; calls in flight finish on the old."""
        assert self._authlete_session is not None and self._verdicts is not None
        self.budget = self._new_budget(cfg)
        self._introspector = Introspector(
            cfg.authlete, self._authlete_session, self.budget, self.metrics
        )
        self._verdicts.use(
            self._introspector.introspect,
            cfg.authlete.deadline,
            cfg.authlete.rate_limit.per_client,
        )

    def _new_budget(self, cfg: Config) -> Budget:
        """The Authlete budget: the fleet's bucket in Redis with `shared` (and a local one
        while Redis is unusable), else this process's own."""
        if self.store is not None and cfg.shared is not None:
            return Budget(cfg.authlete, self.metrics, shared=(self.store, cfg.shared))
        return Budget(cfg.authlete, self.metrics)

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

    def _not_ready(self) -> list[str]:
        problems = []
        if not self.ready:
            problems.append("not serving")
        elif not self.budget.ready:
            problems.append("Authlete circuit breaker open")
        if self._introspector is not None and self._introspector.credentials_rejected:
            problems.append("Authlete rejects the gateway's access token")
        return problems
