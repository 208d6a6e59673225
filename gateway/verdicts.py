"""Token -> verdict: the cache first, then one shared introspection call per token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from gateway.cache import VerdictCache, token_key
from gateway.config import CacheConfig
from gateway.introspection import IntrospectionError
from gateway.metrics import Metrics
from gateway.verdict import Active, Verdict

# (token, monotonic deadline, called when the request goes on the wire) -> verdict;
# raises IntrospectionError
Introspect = Callable[[str, float, Callable[[], None]], Awaitable[Verdict]]


class _Flight:
    """One introspection in flight, and how many requests still wait on it."""

    __slots__ = ("sent", "task", "waiters")

    def __init__(self) -> None:
        self.task: asyncio.Task[Verdict] | None = None
        self.waiters = 0
        self.sent = False

    def on_send(self) -> None:
        self.sent = True


class Verdicts:
    def __init__(
        self, cfg: CacheConfig, introspect: Introspect, metrics: Metrics, deadline: float
    ) -> None:
        self._cfg = cfg
        self._introspect = introspect
        self._metrics = metrics
        self._deadline = deadline
        self.cache = VerdictCache(
            cfg.max_entries, cfg.negative_max_entries, cfg.negative_ttl, cfg.stale_if_error
        )
        self._inflight: dict[bytes, _Flight] = {}
        self._hit = metrics.cache_requests.labels("hit")
        self._negative_hit = metrics.cache_requests.labels("negative_hit")
        self._miss = metrics.cache_requests.labels("miss")
        self._stale = metrics.cache_requests.labels("stale")

    def cached(self, key: bytes) -> tuple[Verdict, str] | None:
        """A verdict the cache holds, and hit or negative_hit; None on a miss. Synchronous,
        so a hit is answered without a coroutine."""
        verdict = self.cache.get(key)
        if verdict is None:
            return None
        if isinstance(verdict, Active):
            self._hit.inc()
            return verdict, "hit"
        self._negative_hit.inc()
        return verdict, "negative_hit"

    async def lookup(self, token: str) -> tuple[Verdict, str]:
        """The verdict and the cache result (hit, negative_hit, miss, stale).

        Raises IntrospectionError when no verdict could be had; that is never cached.
        """
        key = token_key(token)
        found = self.cached(key)
        if found is not None:
            return found
        return await self.fetch(token, key)

    async def fetch(self, token: str, key: bytes, client: str = "") -> tuple[Verdict, str]:
        """A miss: one introspection call shared by every request for the token. `client`
        names who asks (see HeaderPolicy.client_of), for the per-client miss quota."""
        self._miss.inc()
        flight = self._inflight.get(key)
        if flight is None:
            flight = _Flight()
            deadline = time.monotonic() + self._deadline
            task = asyncio.ensure_future(self._fill(key, token, deadline, flight.on_send))
            flight.task = task
            self._inflight[key] = flight
            task.add_done_callback(lambda t: self._done(key, flight, t))
        else:
            self._metrics.coalesced.inc()
            assert flight.task is not None
            task = flight.task
        flight.waiters += 1
        try:
            # shield: one client going away must not cancel the call others wait on...
            return await asyncio.shield(task), "miss"
        except IntrospectionError as exc:
            stale = self.cache.get_stale(key) if exc.stale_ok else None
            if stale is None:
                raise
            self._stale.inc()
            return stale, "stale"
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.sent and not task.done():
                # ...but when the last one has gone before the call went out, its place in
                # the budget queue is given up. A call already sent is let finish and cached.
                if self._inflight.get(key) is flight:
                    del self._inflight[key]  # a newcomer starts afresh, not on a dying call
                task.cancel()

    def _done(self, key: bytes, flight: _Flight, task: asyncio.Task[Verdict]) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark retrieved even when every waiter went away

    async def _fill(
        self, key: bytes, token: str, deadline: float, on_send: Callable[[], None]
    ) -> Verdict:
        verdict = await self._introspect(token, deadline, on_send)
        if isinstance(verdict, Active):
            ttl = min(self._cfg.ttl, verdict.expires_at - time.time())
            self.cache.put_active(key, verdict, ttl)
        elif verdict.action == "UNAUTHORIZED":
            self.cache.put_negative(key, verdict)
        return verdict

    def reconfigure(self, cfg: CacheConfig) -> None:
        """New cache settings from a reload; active entries are kept (bounded anew)."""
        self._cfg = cfg
        self.cache.reconfigure(
            cfg.max_entries, cfg.negative_max_entries, cfg.negative_ttl, cfg.stale_if_error
        )

    def use(self, introspect: Introspect, deadline: float) -> None:
        """New Authlete settings from a reload; calls already in flight finish as they were."""
        self._introspect = introspect
        self._deadline = deadline

    @property
    def inflight(self) -> int:
        return len(self._inflight)
