"""The connection to the fleet's shared state (Redis or Valkey), and its mode.

Every operation is bounded by `shared.timeout` and never retried here: a failure switches the
process to fallback (its local cache and a local budget of `shared.fallback_rate`) at once,
and a probe brings it back to shared mode when Redis answers again.
Redis is never on the way of a request for longer than one timeout, and never decides an
allow by its absence.

Events between replicas (a verdict was stored, a purge) travel on one pub/sub channel,
`<key_prefix>:events`, read by one task per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    OutOfMemoryError,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from gateway.config import SharedConfig
from gateway.metrics import Metrics

log = logging.getLogger("gateway.shared")

T = TypeVar("T")
Handler = Callable[[str, str], None]  # (event kind, payload)

_PROBE_INTERVAL = 0.5
_MAX_CONNECTIONS = 64
_ALWAYS = {"always_log": True}  # changes of mode are never collapsed (see logs.RepeatFilter)
ERROR_KINDS = ("timeout", "connection", "full", "response", "other")


class StoreDown(Exception):
    """The shared state could not be used for this operation; `kind` is a metric label."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"shared state unavailable ({kind})")
        self.kind = kind


def service_namespace(base_url: str, service_id: str) -> str:
    """A short digest of the Authlete service a fleet checks tokens with."""
    return hashlib.sha256(f"{base_url}\0{service_id}".encode()).hexdigest()[:16]


def connect(
    cfg: SharedConfig, retries: int = 1, max_connections: int = _MAX_CONNECTIONS
) -> aioredis.Redis:
    """A client whose every command fails fast: one immediate retry on a fresh connection (a
    pooled one may be stale after a Redis restart), never past the timeout."""
    options: dict[str, Any] = {
        "socket_timeout": cfg.timeout,
        "socket_connect_timeout": cfg.timeout,
        "retry": Retry(NoBackoff(), retries),
        "max_connections": max_connections,
        "health_check_interval": 0,
        "client_name": "authlete-gateway",
    }
    if cfg.redis_url.startswith("rediss://") and cfg.ca_file is not None:
        options["ssl_ca_certs"] = cfg.ca_file
    pool = aioredis.BlockingConnectionPool.from_url(cfg.redis_url, timeout=None, **options)
    return aioredis.Redis(connection_pool=pool)


class Store:
    """One process's use of the shared state: the client, the mode, and the event channel."""

    def __init__(
        self,
        cfg: SharedConfig,
        metrics: Metrics,
        client: aioredis.Redis | None = None,
        service: str = "",
    ) -> None:
        """`service` names the Authlete service (see `service_namespace`): gateways of two
        services on one Redis never see each other's verdicts, locks or events."""
        self.cfg = cfg
        self.prefix = f"{cfg.key_prefix}:{service}" if service else cfg.key_prefix
        self.channel = f"{self.prefix}:events"
        self.redis = client if client is not None else connect(cfg)
        # The subscription gets a client of its own that never reconnects by itself: a lost
        # subscription may have missed purges, so it must go through fallback and the re-sync.
        self._events = connect(cfg, retries=0, max_connections=2)
        self._metrics = metrics
        self._timeout = cfg.timeout
        self.shared = False  # until the first ping answers
        self._handlers: list[Handler] = []
        self._on_shared: list[Callable[[], Awaitable[None]]] = []
        self._probe: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        self._errors = {kind: metrics.shared_errors.labels(kind) for kind in ERROR_KINDS}
        self._roundtrips: dict[str, Any] = {}
        self._set_gauge()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect, or start in fallback: a gateway starts and serves without Redis."""
        try:
            await self._probe_once()
        except StoreDown as exc:
            log.warning(
                "shared state unreachable at start (%s): serving in fallback mode",
                exc.kind,
                extra=_ALWAYS,
            )
            self._start_probe()
            return
        if not await self._subscribe():
            log.warning(
                "shared state: cannot subscribe to events: serving in fallback mode",
                extra=_ALWAYS,
            )
            self._start_probe()
            return
        self.shared = True
        self._set_gauge()
        log.info("shared state connected (key prefix %r)", self.prefix, extra=_ALWAYS)

    async def close(self) -> None:
        self._closing = True
        for task in (self._probe, self._listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for client in (self.redis, self._events):
            with contextlib.suppress(Exception):
                await client.aclose()

    def on_event(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def on_shared(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` each time shared mode returns (before it is announced)."""
        self._on_shared.append(callback)

    # ------------------------------------------------------------------ operations
    async def call(self, op: str, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run one operation within `shared.timeout`; StoreDown on any failure (and the
        process goes to fallback). `op` names it in the round-trip histogram."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                result = await fn(self.redis)
        except (TimeoutError, RedisTimeoutError):
            raise self._failed("timeout") from None
        except OutOfMemoryError:
            raise self._failed("full") from None
        except (RedisConnectionError, OSError):
            raise self._failed("connection") from None
        except ResponseError as exc:
            # An OOM reply arrives as a ResponseError on scripts (the script's own write).
            raise self._failed("full" if "OOM" in str(exc) else "response") from None
        except RedisError:
            raise self._failed("other") from None
        histogram = self._roundtrips.get(op)
        if histogram is None:
            histogram = self._roundtrips[op] = self._metrics.shared_roundtrip.labels(op)
        histogram.observe(time.perf_counter() - started)
        return result

    async def publish(self, message: str) -> None:
        await self.call("publish", lambda r: r.publish(self.channel, message))

    def key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    # ------------------------------------------------------------------ the mode
    def _failed(self, kind: str) -> StoreDown:
        self._errors[kind].inc()
        if self.shared and not self._closing:
            self.shared = False
            self._set_gauge()
            log.warning(
                "shared state unusable (%s): fallback mode, local cache and local budget",
                kind,
                extra=_ALWAYS,
            )
            self._stop_listening()
            self._start_probe()
        return StoreDown(kind)

    def _start_probe(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        while not self._closing:
            await asyncio.sleep(_PROBE_INTERVAL)
            for client in (self.redis, self._events):  # connections from before: likely dead
                with contextlib.suppress(Exception):
                    await client.connection_pool.disconnect()
            try:
                await self._probe_once()
            except StoreDown:
                continue
            # Subscribe first: no event published from here on may be missed.
            if not await self._subscribe():
                continue
            try:
                for callback in self._on_shared:
                    await callback()
            except StoreDown:
                self._stop_listening()
                continue
            self.shared = True
            self._set_gauge()
            log.info("shared state reachable again: shared mode", extra=_ALWAYS)
            return

    async def _probe_once(self) -> None:
        """A write, not a PING: a Redis that is full (out of memory) still answers PING but
        refuses the writes the fleet needs, and must keep the process in fallback."""
        key = self.key("probe", "alive")
        await self.call("ping", lambda r: r.set(key, b"1", px=1000))

    async def _subscribe(self) -> bool:
        """Start the event listener; True once Redis confirmed the subscription."""
        self._stop_listening()
        subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        listener = self._listener = asyncio.ensure_future(self._listen(subscribed))
        try:
            async with asyncio.timeout(self._timeout * 4):
                await asyncio.shield(subscribed)
        except (TimeoutError, RedisError, OSError):
            listener.cancel()
            self._listener = None
            return False
        return True

    def _stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            self._listener = None

    async def _listen(self, subscribed: asyncio.Future[None]) -> None:
        """Read the event channel until cancelled; a broken subscription is a failure."""
        pubsub = self._events.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            subscribed.set_result(None)
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is None or message.get("type") != "message":
                    continue
                data = message.get("data")
                text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
                kind, _, payload = text.partition(" ")
                for handler in self._handlers:
                    try:
                        handler(kind, payload)
                    except Exception:  # one bad message must not end the subscription
                        log.exception("shared state event %r not handled", kind)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:
            if not subscribed.done():
                subscribed.set_exception(exc)
                return
            if self._listener is asyncio.current_task():
                self._listener = None
            self._failed("connection")
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _set_gauge(self) -> None:
        gauge = self._metrics.shared_mode
        gauge.labels("shared").set(1 if self.shared else 0)
        gauge.labels("fallback").set(0 if self.shared else 1)
