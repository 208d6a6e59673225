"""Token -> verdict: the cache first, then one shared introspection call per token.

Three things keep a flood of guessed tokens from starving real users: a miss of a never-seen
token is charged to its client's quota (`rate_limit.per_client`); a token whose last verdict
was active waits in the budget's queue ahead of never-seen ones; and an active entry used in
the last part of its life is refreshed in the background with spare budget
(`cache.refresh_ahead`), so a steady user never meets a miss at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from gateway.budget import ClientQuota, Priority
from gateway.cache import VerdictCache, token_key
from gateway.config import CacheConfig
from gateway.introspection import IntrospectionError
from gateway.metrics import Metrics
from gateway.verdict import Active, Verdict

# (token, monotonic deadline, called when the request goes on the wire, budget class)
# -> verdict; raises IntrospectionError
Introspect = Callable[[str, float, Callable[[], None], Priority], Awaitable[Verdict]]


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
        self,
        cfg: CacheConfig,
        introspect: Introspect,
        metrics: Metrics,
        deadline: float,
        *,
        per_client: float = 0.0,
        spare: Callable[[], bool] | None = None,
    ) -> None:
        """`per_client`: calls per second one client's misses may start (0: no quota);
        `spare`: whether the budget has room for a refresh-ahead (None: no refreshes)."""
        self._cfg = cfg
        self._introspect = introspect
        self._metrics = metrics
        self._deadline = deadline
        self._quota = ClientQuota(per_client) if per_client > 0 else None
        self._spare = spare
        self.cache = VerdictCache(
            cfg.max_entries, cfg.negative_max_entries, cfg.negative_ttl, cfg.stale_if_error
        )
        self._inflight: dict[bytes, _Flight] = {}
        self._hit = metrics.cache_requests.labels("hit")
        self._negative_hit = metrics.cache_requests.labels("negative_hit")
        self._miss = metrics.cache_requests.labels("miss")
        self._stale = metrics.cache_requests.labels("stale")
        self._quota_rejected = metrics.budget_rejected.labels("client_quota")

    def cached(self, key: bytes, token: str) -> tuple[Verdict, str] | None:
        """A verdict the cache holds, and hit or negative_hit; None on a miss. Synchronous,
        so a hit is answered without a coroutine. A hit in the last part of its entry's life
        starts a refresh-ahead (in the background, with spare budget only)."""
        cache = self.cache
        verdict = cache.get(key)
        if verdict is None:
            return None
        if isinstance(verdict, Active):
            self._hit.inc()
            if cache.due:
                cache.due = False
                self._refresh(token, key)
            return verdict, "hit"
        self._negative_hit.inc()
        return verdict, "negative_hit"

    async def lookup(self, token: str) -> tuple[Verdict, str]:
        """The verdict and the cache result (hit, negative_hit, miss, stale).

        Raises IntrospectionError when no verdict could be had; that is never cached.
        """
        key = token_key(token)
        found = self.cached(key, token)
        if found is not None:
            return found
        return await self.fetch(token, key)

    async def fetch(self, token: str, key: bytes, client: str = "") -> tuple[Verdict, str]:
        """A miss: one introspection call shared by every request for the token. `client`
        names who asks (see HeaderPolicy.client_of), for the per-client miss quota.
        """
        live = self.cache.peek(key)
        if live is not None:  # filled since the caller looked
            if isinstance(live, Active):
                self._hit.inc()
                return live, "hit"
            self._negative_hit.inc()
            return live, "negative_hit"
        self._miss.inc()
        flight = self._inflight.get(key)
        if flight is None:
            priority = Priority.NEW
            if self.cache.was_active(key):
                # A stale entry answers when no budget comes within max_wait: no need to wait
                # longer for it. Without one, a real user waits up to the deadline.
                fallback = self.cache.get_stale(key) is not None
                priority = Priority.KNOWN_STALE if fallback else Priority.KNOWN
            if priority is Priority.NEW and self._quota is not None and client:
                # Only never-seen tokens are charged: guessing is what the quota stops. A known
                # user (the only kind with a stale entry to fall back on) is never refused.
                wait = self._quota.charge(client)
                if wait > 0:  # refused at once, without waiting or spending budget
                    self._quota_rejected.inc()
                    raise IntrospectionError(
                        "client_quota",
                        "this client's misses are over authlete.rate_limit.per_client",
                        retry_after=max(1.0, wait),
                    )
            flight, task = self._start(key, token, priority)
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

    def _start(
        self, key: bytes, token: str, priority: Priority
    ) -> tuple[_Flight, asyncio.Task[Verdict]]:
        flight = _Flight()
        deadline = time.monotonic() + self._deadline
        task = asyncio.ensure_future(self._fill(key, token, deadline, flight.on_send, priority))
        flight.task = task
        self._inflight[key] = flight
        task.add_done_callback(lambda t: self._done(key, flight, t))
        return flight, task

    # ------------------------------------------------------------------ refresh-ahead
    def _refresh(self, token: str, key: bytes) -> None:
        """Re-check a live entry in the background, on spare budget only; a miss for the
        same token joins the call. Once per entry: a refresh that fails is not retried."""
        if (
            self._spare is None
            or self._cfg.refresh_ahead <= 0
            or key in self._inflight
            or not self._spare()
            or not self.cache.claim_refresh(key)
        ):
            return
        _, task = self._start(key, token, Priority.SPARE)
        task.add_done_callback(self._count_refresh)

    def _count_refresh(self, task: asyncio.Task[Verdict]) -> None:
        if task.cancelled() or task.exception() is not None:
            result = "failed"
        else:
            result = "active" if isinstance(task.result(), Active) else "inactive"
        self._metrics.cache_refreshes.labels(result).inc()

    def _done(self, key: bytes, flight: _Flight, task: asyncio.Task[Verdict]) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark retrieved even when every waiter went away

    async def _fill(
        self,
        key: bytes,
        token: str,
        deadline: float,
        on_send: Callable[[], None],
        priority: Priority,
    ) -> Verdict:
        verdict = await self._introspect(token, deadline, on_send, priority)
        if isinstance(verdict, Active):
            cfg = self._cfg
            lifetime = verdict.expires_at - time.time()
            # An entry cut short by the token's own expiry is not refreshed: it ends there.
            ahead = cfg.refresh_ahead if lifetime > cfg.ttl else 0.0
            self.cache.put_active(key, verdict, min(cfg.ttl, lifetime), ahead)
        elif verdict.action == "UNAUTHORIZED":
            self.cache.put_negative(key, verdict)
        return verdict

    def reconfigure(self, cfg: CacheConfig) -> None:
        """New cache settings from a reload; active entries are kept (bounded anew)."""
        self._cfg = cfg
        self.cache.reconfigure(
            cfg.max_entries, cfg.negative_max_entries, cfg.negative_ttl, cfg.stale_if_error
        )

    def use(self, introspect: Introspect, deadline: float, per_client: float) -> None:
        """New Authlete settings from a reload; calls already in flight finish as they were.
        The client quotas start afresh only when `per_client` changed."""
        self._introspect = introspect
        self._deadline = deadline
        if per_client <= 0:
            self._quota = None
        elif self._quota is None or self._quota.rate != per_client:
            self._quota = ClientQuota(per_client)

    @property
    def inflight(self) -> int:
        return len(self._inflight)
