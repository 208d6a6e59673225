"""Token -> verdict: the cache first, then one shared introspection call per token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from gateway.cache import VerdictCache, token_key
from gateway.config import CacheConfig
from gateway.introspection import Active, Verdict
from gateway.metrics import Metrics

Introspect = Callable[[str], Awaitable[Verdict]]


class Verdicts:
    def __init__(self, cfg: CacheConfig, introspect: Introspect, metrics: Metrics) -> None:
        self._cfg = cfg
        self._introspect = introspect
        self._metrics = metrics
        self.cache = VerdictCache(cfg.max_entries, cfg.negative_max_entries, cfg.negative_ttl)
        self._inflight: dict[bytes, asyncio.Future[Verdict]] = {}
        self._hit = metrics.cache_requests.labels("hit")
        self._negative_hit = metrics.cache_requests.labels("negative_hit")
        self._miss = metrics.cache_requests.labels("miss")

    async def lookup(self, token: str) -> tuple[Verdict, str]:
        """The verdict and the cache result (hit, negative_hit, miss).

        Raises IntrospectionError when no verdict could be had; that is never cached.
        """
        key = token_key(token)
        verdict = self.cache.get(key)
        if verdict is not None:
            if isinstance(verdict, Active):
                self._hit.inc()
                return verdict, "hit"
            self._negative_hit.inc()
            return verdict, "negative_hit"
        self._miss.inc()
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._fill(key, token))
            self._inflight[key] = future
            future.add_done_callback(lambda f: self._done(key, f))
        else:
            self._metrics.coalesced.inc()
        # shield: a client that goes away must not cancel the call others are waiting on.
        return await asyncio.shield(future), "miss"

    def _done(self, key: bytes, future: asyncio.Future[Verdict]) -> None:
        if self._inflight.get(key) is future:
            del self._inflight[key]
        if not future.cancelled():
            future.exception()  # mark retrieved even when every waiter went away

    async def _fill(self, key: bytes, token: str) -> Verdict:
        verdict = await self._introspect(token)
        if isinstance(verdict, Active):
            ttl = min(self._cfg.ttl, verdict.expires_at - time.time())
            self.cache.put_active(key, verdict, ttl)
        elif verdict.action == "UNAUTHORIZED":
            self.cache.put_negative(key, verdict)
        return verdict

    @property
    def inflight(self) -> int:
        return len(self._inflight)
