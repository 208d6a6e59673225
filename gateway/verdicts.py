"""Token -> verdict: the cache first, then one shared introspection call per token.

Three things keep a flood of guessed tokens from starving real users: a miss of a never-seen
token is charged to its client's quota (`rate_limit.per_client`); a token whose last verdict
was active waits in the budget's queue ahead of never-seen ones; and an active entry used in
the last part of its life is refreshed in the background with spare budget
(`cache.refresh_ahead`), so a steady user never meets a miss at all.

With shared state (`shared:`), the cache has two levels: this process's, whose entries live at
most `shared.local_ttl`, and the fleet's in Redis (`FleetCache`), asked on a local miss. A miss
in both takes the token's fleet-wide lock, so one replica calls Authlete while the others wait
for its verdict. Whenever Redis cannot be used the process carries on alone: local cache,
local budget (see `shared`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from gateway.budget import ClientQuota, Priority
from gateway.cache import VerdictCache, token_key
from gateway.config import CacheConfig
from gateway.fleet_cache import FRESH, LOCKED, FleetCache, Lookup
from gateway.introspection import IntrospectionError
from gateway.metrics import Metrics
from gateway.purge import PurgeResult
from gateway.shared import StoreDown
from gateway.verdict import Active, Verdict

log = logging.getLogger("gateway")

_LOCK_SLACK = 0.02  # a waiter re-reads this long after the holder's lock would lapse
_PURGES_KEPT = 4096  # purges remembered for calls under way (far more than one call's time)

# (token, monotonic deadline, called when the request goes on the wire, budget class)
# -> verdict; raises IntrospectionError
Introspect = Callable[[str, float, Callable[[], None], Priority], Awaitable[Verdict]]


class _Flight:
    """One introspection in flight, and how many requests still wait on it."""

    __slots__ = ("result", "sent", "task", "waiters")

    def __init__(self) -> None:
        self.task: asyncio.Task[Verdict] | None = None
        self.waiters = 0
        self.sent = False
        self.result = "miss"  # or shared_hit / shared_negative_hit: Redis had it

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
        fleet: FleetCache | None = None,
        local_ttl: float = 0.0,
    ) -> None:
        """`per_client`: calls per second one client's misses may start (0: no quota);
        `spare`: whether the budget has room for a refresh-ahead (None: no refreshes);
        `fleet`: the shared level, whose verdicts this process keeps `local_ttl` at most."""
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
        self._fleet = fleet
        self._local_ttl = local_ttl
        self._epoch = 0  # bumped by every purge
        # What was purged (("k", token digest hex), ("s", subject), ("c", client id)) at which
        # epoch: a call that began before a purge of its token, subject or client stores nothing.
        self._purged: dict[tuple[str, str], int] = {}
        self._background: set[asyncio.Task[None]] = set()
        if fleet is not None:
            fleet.store.on_event(self._on_event)
            fleet.store.on_shared(self._rejoin)
        self._shared_hit = metrics.cache_requests.labels("shared_hit")
        self._shared_negative_hit = metrics.cache_requests.labels("shared_negative_hit")
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
        fleet = self._fleet
        if fleet is None:
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
            verdict = await asyncio.shield(task)
            if fleet is not None:
                self._count(flight.result)
            return verdict, flight.result
        except IntrospectionError as exc:
            if fleet is not None:
                self._miss.inc()
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
        task = asyncio.ensure_future(self._fill(key, token, deadline, flight, priority))
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

    def _count(self, result: str) -> None:
        if result == "shared_hit":
            self._shared_hit.inc()
        elif result == "shared_negative_hit":
            self._shared_negative_hit.inc()
        else:
            self._miss.inc()

    async def _fill(
        self, key: bytes, token: str, deadline: float, flight: _Flight, priority: Priority
    ) -> Verdict:
        epoch = self._epoch
        fleet = self._fleet
        if fleet is not None and fleet.store.shared:
            with contextlib.suppress(StoreDown):  # Redis failed before a call: carry on alone
                return await self._fill_shared(fleet, key, token, deadline, flight, priority)
        verdict = await self._introspect(token, deadline, flight.on_send, priority)
        if self._may_keep(key, verdict, epoch):
            self._keep(key, verdict)
        return verdict

    def _keep(self, key: bytes, verdict: Verdict) -> None:
        """This process's rules, without the fleet: the whole `cache.ttl` here."""
        if isinstance(verdict, Active):
            cfg = self._cfg
            lifetime = verdict.expires_at - time.time()
            # An entry cut short by the token's own expiry is not refreshed: it ends there.
            ahead = cfg.refresh_ahead if lifetime > cfg.ttl else 0.0
            self.cache.put_active(key, verdict, min(cfg.ttl, lifetime), ahead)
        elif verdict.action == "UNAUTHORIZED":
            self.cache.put_negative(key, verdict)

    # ------------------------------------------------------------------ the fleet's level
    async def _fill_shared(
        self,
        fleet: FleetCache,
        key: bytes,
        token: str,
        deadline: float,
        flight: _Flight,
        priority: Priority,
    ) -> Verdict:
        """Redis's verdict; or, holding the token's lock, Authlete's (stored for the fleet);
        or, while another replica holds it, that replica's once stored. StoreDown before any
        Authlete call lets the caller go on alone."""
        epoch = self._epoch
        waited = False
        with fleet.watch(key) as watch:  # from before the first read: no notice is missed
            while True:
                look = await fleet.get_or_lock(key, lock=priority is not Priority.SPARE)
                found = look.found
                if look.status == FRESH and found is not None:
                    verdict = found.verdict
                    flight.result = (
                        "shared_hit" if isinstance(verdict, Active) else "shared_negative_hit"
                    )
                    if self._may_keep(key, verdict, epoch):
                        self._keep_local(key, verdict, found.fresh_until)
                    if isinstance(verdict, Active) and self._due(found.fresh_until, verdict):
                        self._refresh_shared(token, key)
                    return verdict
                if found is not None and isinstance(found.verdict, Active):
                    # for stale-if-error, if it comes to it
                    self.cache.put_stale(key, found.verdict)
                if look.status == LOCKED:
                    if waited and not watch.released:  # the holder never said it was done
                        self._metrics.shared_lock_takeovers.inc()
                    return await self._call_locked(
                        fleet, key, token, deadline, flight, priority, look
                    )
                if priority is Priority.SPARE:
                    raise IntrospectionError("budget", "a refresh is already under way")
                if not waited:
                    waited = True
                    self._metrics.shared_lock_waits.inc()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise IntrospectionError(
                        "timeout",
                        "another replica's introspection of this token did not end in time",
                        retry_after=1.0,
                    )
                # Woken by the holder's "done"; else it re-reads when the lock would lapse (a
                # live holder renews it meanwhile): a dead holder is taken over within LOCK_TTL.
                pause = min(remaining, look.lock_left + _LOCK_SLACK)
                await watch.wait(pause)

    async def _call_locked(
        self,
        fleet: FleetCache,
        key: bytes,
        token: str,
        deadline: float,
        flight: _Flight,
        priority: Priority,
        look: Lookup,
    ) -> Verdict:
        epoch = self._epoch
        try:
            verdict = await self._introspect(token, deadline, flight.on_send, priority)
        except BaseException:
            self._spawn(fleet.unlock(key))  # also when cancelled: a waiter may go on
            raise
        fresh, keep = self._lifetimes(verdict)
        if keep > 0:
            with contextlib.suppress(StoreDown):  # the verdict stands; only the fleet misses it
                await fleet.put(key, verdict, fresh, keep, look.started)
        else:
            await fleet.unlock(key)
        if self._may_keep(key, verdict, epoch):
            self._keep_local(key, verdict, time.time() + fresh)
        return verdict

    def _lifetimes(self, verdict: Verdict) -> tuple[float, float]:
        """Seconds a verdict is fresh in Redis, and kept there (fresh + stale-if-error)."""
        cfg = self._cfg
        if isinstance(verdict, Active):
            left = verdict.expires_at - time.time()
            fresh = min(cfg.ttl, left)
            return fresh, min(fresh + cfg.stale_if_error, left)
        if verdict.action == "UNAUTHORIZED":
            return cfg.negative_ttl, cfg.negative_ttl
        return 0.0, 0.0

    def _keep_local(self, key: bytes, verdict: Verdict, fresh_until: float) -> None:
        """The local level: `shared.local_ttl` at most, never past the fleet's freshness."""
        if isinstance(verdict, Active):
            ttl = min(self._local_ttl, fresh_until - time.time())
            self.cache.put_active(key, verdict, ttl)
        elif verdict.action == "UNAUTHORIZED":
            self.cache.put_negative(key, verdict)

    def _due(self, fresh_until: float, verdict: Active) -> bool:
        """A fleet entry in the last `refresh_ahead` of a full `cache.ttl` life."""
        cfg = self._cfg
        if cfg.refresh_ahead <= 0 or self._spare is None:
            return False
        left = fresh_until - time.time()
        return left < cfg.ttl * cfg.refresh_ahead and verdict.expires_at > fresh_until + 1.0

    def _refresh_shared(self, token: str, key: bytes) -> None:
        """Re-check a fleet entry in its refresh window, on spare budget, by whichever replica
        takes the token's lock first."""
        if key in self._inflight or self._spare is None or not self._spare():
            return
        _, task = self._start(key, token, Priority.SPARE)
        task.add_done_callback(self._count_refresh)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ purges
    async def purge(self, kind: str, value: str) -> PurgeResult:
        """Forget verdicts by `token`, `token_sha256` (hex), `subject` or `client_id`, here and,
        with shared state, in Redis and on every replica. A call already under way when the
        purge comes answers its waiters but stores nothing."""
        if kind in ("token", "token_sha256"):
            key = token_key(value) if kind == "token" else bytes.fromhex(value)
            message = f"p k {key.hex()}"
        else:
            key = b""
            message = f"p {'s' if kind == 'subject' else 'c'} {value}"
        purged = self._purge_here(kind, key, value)
        fleet = self._fleet
        if fleet is None:
            return PurgeResult(purged=purged, fleet=False, shared=False)
        if not fleet.store.shared:
            return PurgeResult(purged=purged, fleet=False, shared=True)
        try:
            if key:
                purged += await fleet.purge_key(key, message)
            else:
                purged += await fleet.purge_index(message[2], value, message)
        except StoreDown:
            return PurgeResult(purged=purged, fleet=False, shared=True)
        return PurgeResult(purged=purged, fleet=True, shared=True)

    def _purge_here(self, kind: str, key: bytes, value: str) -> int:
        """Forget here; a request from now on starts a call of its own (for a subject or a
        client, whose tokens are unknown until answered, every call under way is left to
        its present waiters)."""
        self._epoch += 1
        if kind in ("token", "token_sha256"):
            target = ("k", key.hex())
            self._inflight.pop(key, None)
        else:
            target = ("s" if kind == "subject" else "c", value)
            self._inflight.clear()
        self._purged.pop(target, None)
        self._purged[target] = self._epoch
        if len(self._purged) > _PURGES_KEPT:
            del self._purged[next(iter(self._purged))]
        if kind in ("token", "token_sha256"):
            return self.cache.delete(key)
        if kind == "subject":
            return self.cache.delete_matching(subject=value)
        return self.cache.delete_matching(client_id=value)

    def _may_keep(self, key: bytes, verdict: Verdict, since: int) -> bool:
        """False when the token, or an active verdict's subject or client, was purged after
        the call that fetched `verdict` began (epoch `since`)."""
        if since == self._epoch:
            return True  # no purge at all since: the common case
        purged = self._purged
        if purged.get(("k", key.hex()), 0) > since:
            return False
        if isinstance(verdict, Active):
            if verdict.subject and purged.get(("s", verdict.subject), 0) > since:
                return False
            if purged.get(("c", verdict.client_id), 0) > since:
                return False
        return True

    def _on_event(self, kind: str, payload: str) -> None:
        """A purge published by any replica (this one too: purging twice is harmless)."""
        if kind != "p":
            return
        what, _, value = payload.partition(" ")
        if what == "k":
            with contextlib.suppress(ValueError):
                self._purge_here("token_sha256", bytes.fromhex(value), value)
        elif what == "s" and value:
            self._purge_here("subject", b"", value)
        elif what == "c" and value:
            self._purge_here("client_id", b"", value)

    async def _rejoin(self) -> None:
        """Back in shared mode: if a purge happened while this process could not hear it, its
        local level may hold a purged verdict; start it afresh."""
        assert self._fleet is not None
        seen = self._fleet.epoch
        now = await self._fleet.read_epoch()
        self._fleet.epoch = now
        if now != seen:
            log.info("shared state: purges happened while away; local cache cleared")
            self._epoch += 1
            self._inflight.clear()
            self.cache.clear()

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
