"""The budget for calls to Authlete: a token bucket that learns from Authlete's rate-limit
headers and 429s, retries with backoff, and a circuit breaker.

It knows nothing about access tokens or verdicts: it runs a `send(timeout)` callable and
decides whether, when and how often. Authlete limits each service access token (about
100 requests/s, bursts to 200); twenty sidecars sharing one token, or a cold start, meet
that limit at once, so every call is budgeted and cache hits never wait here. With `shared`
the bucket is the fleet's, in Redis (`gateway.fleet_budget`).
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import enum
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from gateway.config import AuthleteConfig, SharedConfig
from gateway.fleet_budget import FleetBucket, Grant, lease_sizes
from gateway.metrics import Metrics
from gateway.shared import Store, StoreDown

log = logging.getLogger("gateway.budget")

_EPOCH_THRESHOLD = 10**9  # a Reset above this is an epoch timestamp, else seconds from now
_MAX_PAUSE = 300.0  # never believe a rate-limit header asking for more than five minutes
_RETRY_BASE = 0.1
_RETRY_CAP = 2.0
_THROTTLE_BASE = 1.0
_THROTTLE_CAP = 30.0


class Priority(enum.IntEnum):
    """Who a call is for. KNOWN (the token's last verdict was active: a real user whose entry
    expired) is served before NEW (a token never seen, or seen inactive), so a flood of
    guessed tokens waits, and is shed, behind real users. A KNOWN call waits until its
    deadline, a NEW one at most `max_wait`; KNOWN_STALE (known, and a stale entry can answer
    if no budget comes) is served like KNOWN but given up after `max_wait`, like NEW. SPARE (a
    refresh-ahead) never waits and goes only while the budget has room to spare."""

    KNOWN = 0
    NEW = 1
    SPARE = 2
    KNOWN_STALE = 3


class BreakerState(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


class TransportError(Exception):
    """The call got no HTTP answer. `outcome` is `timeout` or `error`."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome


class CallFailed(Exception):
    """No usable answer. `outcome` is a bounded metric label; `retry_after` a hint in seconds."""

    def __init__(self, outcome: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.retry_after = retry_after


Send = Callable[[float], Awaitable[Reply]]


class _Bucket:
    """A token bucket in this process: the whole budget without `shared`, else the fallback
    one (`shared.fallback_rate` and `fallback_burst`) used while Redis is unusable."""

    __slots__ = ("burst", "cap", "cap_until", "configured_rate", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.configured_rate = rate
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now
        self.cap: float | None = None  # what X-RateLimit-Remaining says we have left...
        self.cap_until = 0.0  # ...until X-RateLimit-Reset

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.cap is not None and now >= self.cap_until:
            self.cap = None

    def available(self, now: float) -> float:
        self.refill(now)
        if self.cap is not None:
            return min(self.tokens, self.cap)
        return self.tokens

    def delay(self, now: float) -> float:
        """Seconds until one token can be taken, the 429 pause aside (0: now)."""
        self.refill(now)
        wait = 0.0
        if self.cap is not None and self.cap < 1:
            wait = self.cap_until - now
        if self.tokens < 1:
            wait = max(wait, (1 - self.tokens) / self.rate)
        return wait

    def take(self) -> None:
        self.tokens -= 1
        if self.cap is not None:
            self.cap -= 1

    def learn_rate(self, limit: float, now: float) -> None:
        """X-RateLimit-Limit: lowers the rate, never above the configured one."""
        if 0 < limit < self.configured_rate:
            self.refill(now)
            self.rate = limit
        elif limit >= self.configured_rate:
            self.rate = self.configured_rate

    def learn_remaining(self, cap: int, until: float, now: float) -> None:
        self.refill(now)
        self.cap = cap
        self.cap_until = until

    def lower_to(self, left: int, now: float) -> None:
        """Authlete's bucket holds only `left`: so does this one, refilling as it does."""
        self.refill(now)
        self.tokens = min(self.tokens, float(left))


class Budget:
    """The Authlete call budget of one process.

    Without `shared` the bucket is this process's own. With `shared=(store, shared_cfg)` it
    is the fleet's bucket in Redis (`gateway.fleet_budget`), taken in small leases, while the
    store is in shared mode; while it is not (Redis down, slow, full), a local bucket of
    `shared.fallback_rate` and `fallback_burst`, exactly as without `shared`. A lease that
    fails serves its waiters from that fallback bucket: never open, never stalled past
    `shared.timeout`. The queue (KNOWN before NEW), the 429 pause as this process knows it,
    the calls in flight and the breaker are this process's in both modes.
    """

    def __init__(
        self,
        cfg: AuthleteConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        shared: tuple[Store, SharedConfig] | None = None,
    ) -> None:
        limit = cfg.rate_limit
        self.burst = float(limit.burst)
        self.max_wait = limit.max_wait
        self._timeout = cfg.timeout
        self._retries = cfg.retries
        self._failures_to_open = cfg.circuit_breaker.failures
        self._cooldown = cfg.circuit_breaker.cooldown
        self._clock = clock
        self._wall = wall
        self._jitter = jitter
        self._metrics = metrics

        now = clock()
        self._fleet: FleetBucket | None = None
        if shared is None:
            self._local = _Bucket(limit.rate, self.burst, now)
        else:
            store, shared_cfg = shared
            self._local = _Bucket(
                min(shared_cfg.fallback_rate, limit.rate),
                float(max(1, min(shared_cfg.fallback_burst, limit.burst))),
                now,
            )
            self._fleet = FleetBucket(store, shared_cfg, cfg, self._paused_by_fleet, clock)
        self._paused_until = 0.0  # after a 429
        self._throttle_streak = 0
        self._in_flight = 0  # sent, not answered: Authlete may not have counted them yet
        # Waiters by class, FIFO within each; every KNOWN one goes before any NEW one. A
        # waiter's result is its permit's number in the shared bucket (-1: a local permit).
        self._known: collections.deque[asyncio.Future[int]] = collections.deque()
        self._new: collections.deque[asyncio.Future[int]] = collections.deque()
        self._wakeup: asyncio.TimerHandle | None = None
        # Shared mode: the one lease request in flight, and when the bucket said to ask again.
        self._lease_task: asyncio.Task[None] | None = None
        self._retry_known = 0.0
        self._retry_new = 0.0

        self.state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    # ------------------------------------------------------------------ the bucket
    @property
    def rate(self) -> float:
        """Calls per second: configured, or lower if Authlete's X-RateLimit-Limit says so."""
        if self._fleet is not None and self._fleet.active:
            return self._fleet.rate
        return self._local.rate

    @property
    def tokens(self) -> float:
        """What the bucket would allow now: in shared mode, the shared bucket as last seen."""
        now = self._clock()
        if self._fleet is not None and self._fleet.active:
            return self._fleet.estimate(now)
        return self._local.available(now)

    def _delay_until_token(self, now: float) -> float:
        """Seconds until one token can be taken (0 if one can be taken now; in shared mode,
        0 also when Redis must be asked)."""
        wait = max(0.0, self._paused_until - now)
        if self._fleet is not None and self._fleet.active:
            burst = self.burst
            retry = self._retry_known if self._known else self._retry_new
            if self._fleet.held(now) == 0:
                wait = max(wait, retry - now)
        else:
            burst = self._local.burst
            wait = max(wait, self._local.delay(now))
        if self._in_flight >= burst:
            # A burst's worth is out and unanswered: network delays bunch calls up on
            # Authlete's side, so wait for answers (each one reschedules; this is a fallback).
            wait = max(wait, 0.05)
        return wait

    def _take_now(self, now: float) -> int | None:
        """A permit without waiting (its number, -1 if local), or None."""
        if self._fleet is not None and self._fleet.active:
            if now < self._paused_until or self._in_flight >= self.burst:
                return None
            return self._fleet.take(now)
        if self._delay_until_token(now) > 0:
            return None
        self._local.take()
        return -1

    @property
    def spare(self) -> bool:
        """Room for a call nobody waits on (a refresh-ahead): the breaker closed, no 429 pause,
        nobody queued, and more than half the burst still in the bucket after the call (in
        shared mode as last seen; the shared bucket has the last word)."""
        if self.state is not BreakerState.CLOSED or self._known or self._new:
            return False
        now = self._clock()
        if now < self._paused_until or self._in_flight >= self.burst / 2:
            return False
        if self._fleet is not None and self._fleet.active:
            return self._fleet.estimate(now) >= self.burst / 2 + 1
        return self._local.available(now) >= self._local.burst / 2 + 1

    @property
    def waiting(self) -> int:
        """Requests queued for a token (those that gave up may still be counted)."""
        return len(self._known) + len(self._new)

    async def acquire(
        self, deadline: float, patient: bool = False, priority: Priority = Priority.NEW
    ) -> None:
        """Wait for a token, KNOWN before NEW and first come first served within each, at
        most `max_wait` (or, when `patient`, after a 429 whose pause the request's deadline
        allows, until `deadline`; a KNOWN call always waits until `deadline`). SPARE never
        waits: no room is a CallFailed at once."""
        await self._acquire(deadline, patient, priority)

    async def _acquire(self, deadline: float, patient: bool, priority: Priority) -> int:
        """`acquire`, returning the permit's number in the shared bucket (-1: local)."""
        if priority is Priority.SPARE:
            return await self._acquire_spare()
        now = self._clock()
        known = priority is Priority.KNOWN or priority is Priority.KNOWN_STALE
        if priority is Priority.KNOWN:
            patient = True  # a real user is worth the wait; only NEW ones are shed by max_wait
        queued = bool(self._known) or (not known and bool(self._new))  # anyone ahead of us
        if not queued:
            permit = self._take_now(now)
            if permit is not None:
                return permit
        started = now
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[int] = loop.create_future()
        (self._known if known else self._new).append(waiter)
        self._schedule()
        give_up = loop.call_at(
            loop.time()
            + max(0.0, (deadline if patient else min(deadline, now + self.max_wait)) - now),
            _expire,
            waiter,
        )
        try:
            return await waiter
        except BudgetTimeout:
            self._metrics.budget_rejected.labels("wait_timeout").inc()
            retry = max(1.0, self._delay_until_token(self._clock()))
            raise CallFailed(
                "budget", "no Authlete call budget within max_wait", retry_after=retry
            ) from None
        finally:
            give_up.cancel()
            if not waiter.done():
                waiter.cancel()  # the client went away: give the place up
            self._metrics.budget_wait.observe(self._clock() - started)
            self._schedule()

    async def _acquire_spare(self) -> int:
        if not self.spare:
            raise CallFailed("budget", "no spare Authlete call budget")
        fleet = self._fleet
        if fleet is not None and fleet.active:
            permit = fleet.take(self._clock())
            if permit is not None:
                return permit
            try:
                grant = await fleet.lease(0, 1, spare=True)
            except StoreDown:
                if not self.spare:  # now on the fallback bucket: its room counts
                    raise CallFailed("budget", "no spare Authlete call budget") from None
            else:
                self._absorb(grant)
                permit = fleet.take(self._clock()) if grant.granted else None
                if permit is None:
                    raise CallFailed("budget", "no spare Authlete call budget")
                return permit
        self._local.take()
        return -1

    def _schedule(self) -> None:
        """Hand tokens to waiters, KNOWN ones first; arm a timer for when the next is due (or,
        in shared mode, ask the shared bucket for a lease)."""
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        fleet = self._fleet
        shared = fleet is not None and fleet.active
        for waiters in (self._known, self._new):
            while waiters:
                if waiters[0].done():  # timed out or cancelled: skip without using a token
                    waiters.popleft()
                    continue
                now = self._clock()
                permit = self._take_now(now)
                if permit is None:
                    delay = self._delay_until_token(now)
                    if shared and delay <= 0:
                        self._ask_fleet()
                        return
                    loop = asyncio.get_running_loop()
                    self._wakeup = loop.call_later(max(delay, 0.001), self._schedule)
                    return
                waiters.popleft().set_result(permit)

    # ------------------------------------------------------------------ shared mode
    def _ask_fleet(self) -> None:
        """Ask the shared bucket for a lease sized by this process's queue (one at a time:
        its answer reschedules)."""
        if self._lease_task is not None or self._fleet is None:
            return
        limit = self._fleet.limit
        first, rest = lease_sizes(_live(self._known, limit), _live(self._new, limit), limit)
        if self._clock() < self._retry_new:
            rest = 0  # the bucket holds NEW callers back (or has nothing): KNOWN ones only
        if first + rest == 0:
            return
        self._lease_task = asyncio.ensure_future(self._lease(first, rest))

    async def _lease(self, known: int, other: int) -> None:
        assert self._fleet is not None
        try:
            grant = await self._fleet.lease(known, other)
        except StoreDown:
            pass  # the store is in fallback now: the waiters go to the local bucket
        except Exception:  # a bug, not Redis: use the fallback bucket for a while
            log.exception("shared budget: lease failed")
            self._fleet.pause_sharing()
        else:
            self._absorb(grant)
            now = self._clock()
            if grant.granted < known:
                self._retry_known = now + grant.wait_known
            if grant.granted < known + other:
                self._retry_new = now + grant.wait_other
        finally:
            self._lease_task = None
        if self._known or self._new:
            self._schedule()

    def _absorb(self, grant: Grant) -> None:
        if grant.paused > 0:  # paused by a 429 whose event we missed
            self._paused_until = max(self._paused_until, self._clock() + grant.paused)

    def _paused_by_fleet(self, pause: float) -> None:
        """Another replica (or this one) got a 429: pause with it."""
        self._paused_until = max(self._paused_until, self._clock() + pause)
        if self._known or self._new:
            self._schedule()

    def close(self) -> None:
        """Stop the shared-mode background work (at shutdown; optional otherwise)."""
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        if self._lease_task is not None:
            self._lease_task.cancel()
        if self._fleet is not None:
            self._fleet.close()

    # ------------------------------------------------------------------ learning
    def learn(self, headers: Mapping[str, str]) -> None:
        """X-RateLimit-Limit/-Remaining/-Reset from any Authlete answer; garbage is ignored."""
        self._learn(headers, -1)

    def _learn(self, headers: Mapping[str, str], permit: int) -> None:
        """`learn`, for the answer to the call that used shared `permit` (-1: unknown). In
        shared mode the lesson goes to the shared bucket too (in the background)."""
        now = self._clock()
        limit = _number(headers.get("X-RateLimit-Limit"))
        rate: float | None = None
        if limit is not None:
            self._local.learn_rate(limit, now)
            if limit > 0:
                rate = limit
        remaining = _number(headers.get("X-RateLimit-Remaining"))
        reset = self._reset_in(headers.get("X-RateLimit-Reset"), now)
        left: int | None = None
        refilling = False
        if remaining is not None and remaining >= 0 and reset is not None:
            left = math.floor(remaining)
            refilling = rate is not None and _refills(left, reset, rate, self.burst)
            # Calls still in flight were sent after this answer was counted.
            if refilling:
                self._local.lower_to(max(0, left - self._in_flight), now)
            else:
                self._local.learn_remaining(max(0, left - self._in_flight), now + reset, now)
        fleet = self._fleet
        if fleet is not None and fleet.active:
            if left is not None:
                fleet.trim(left - self._in_flight)
            fleet.learn(rate, left, reset, permit, self._in_flight, refilling)

    def _reset_in(self, value: str | None, now: float) -> float | None:
        seconds = _number(value)
        if seconds is None or seconds < 0:
            return None
        if seconds > _EPOCH_THRESHOLD:
            seconds = seconds - self._wall()
            if seconds < 0:
                return 0.0
        return min(seconds, _MAX_PAUSE)

    def throttled(self, headers: Mapping[str, str]) -> float:
        """A 429: pause every call (in shared mode, every replica's: the pause is written to
        the shared bucket and announced, in the background). Returns the pause in seconds."""
        now = self._clock()
        pause = _retry_after(headers.get("Retry-After"), self._wall())
        if pause is None:
            pause = self._reset_in(headers.get("X-RateLimit-Reset"), now)
        if pause is None or pause <= 0:
            backoff = min(_THROTTLE_CAP, _THROTTLE_BASE * 2**self._throttle_streak)
            pause = backoff * (0.5 + self._jitter() / 2)
        self._throttle_streak += 1
        self._paused_until = max(self._paused_until, now + min(pause, _MAX_PAUSE))
        self._metrics.authlete_throttled.inc()
        left = self._paused_until - now
        fleet = self._fleet
        if fleet is not None:
            fleet.drop()
            if fleet.active:
                fleet.throttle(left)
        return left

    # ------------------------------------------------------------------ the breaker
    def _gate(self) -> bool:
        """Raise if the breaker refuses the call; True if this call is the half-open probe."""
        if self.state is BreakerState.CLOSED:
            return False
        now = self._clock()
        if self.state is BreakerState.OPEN and now - self._opened_at >= self._cooldown:
            self._set_state(BreakerState.HALF_OPEN)
        if self.state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        self._metrics.budget_rejected.labels("breaker_open").inc()
        retry = max(1.0, self._cooldown - (now - self._opened_at))
        raise CallFailed("breaker_open", "Authlete circuit breaker is open", retry_after=retry)

    def _succeeded(self) -> None:
        self._consecutive_failures = 0
        if self.state is not BreakerState.CLOSED:
            self._set_state(BreakerState.CLOSED)

    def _failed(self) -> None:
        self._consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED
            and self._consecutive_failures >= self._failures_to_open
        ):
            self._opened_at = self._clock()
            self._set_state(BreakerState.OPEN)

    def _set_state(self, state: BreakerState) -> None:
        self.state = state
        self._metrics.breaker_state.set(int(state))

    @property
    def ready(self) -> bool:
        return self.state is BreakerState.CLOSED

    # ------------------------------------------------------------------ one budgeted call
    async def call(self, send: Send, deadline: float, priority: Priority = Priority.NEW) -> Reply:
        """Run `send` within the budget, retrying transient failures until `deadline`.

        Returns the first answer that is neither a 429 nor a 5xx; raises CallFailed. A SPARE
        call is tried once: a refresh that fails leaves the entry to expire as it would have.
        """
        if priority is Priority.SPARE and not self.spare:
            raise CallFailed("budget", "no spare Authlete call budget")
        attempt = 0
        patient = False
        while True:
            probe = self._gate()
            try:
                reply, failure = await self._attempt(send, deadline, patient, priority)
            finally:
                if probe:
                    self._probe_in_flight = False
            if reply is not None:
                return reply
            assert failure is not None
            if priority is Priority.SPARE:
                raise failure
            now = self._clock()
            if failure.outcome == "throttled":
                if failure.retry_after is not None and now + failure.retry_after < deadline:
                    patient = True  # acquire() waits out the pause, past max_wait if need be
                    continue
                raise failure
            if attempt >= self._retries or self.state is not BreakerState.CLOSED:
                raise failure
            delay = min(_RETRY_CAP, _RETRY_BASE * 2**attempt) * (0.5 + self._jitter() / 2)
            if now + delay + 0.01 >= deadline:
                raise failure
            attempt += 1
            self._metrics.authlete_retries.inc()
            await asyncio.sleep(delay)

    async def _attempt(
        self, send: Send, deadline: float, patient: bool, priority: Priority
    ) -> tuple[Reply | None, CallFailed | None]:
        permit = await self._acquire(deadline, patient, priority)
        remaining = deadline - self._clock()
        if remaining <= 0:
            return None, CallFailed("budget", "deadline passed waiting for budget", 1.0)
        self._in_flight += 1
        try:
            reply = await send(min(self._timeout, remaining))
        except TransportError as exc:
            self._in_flight -= 1
            self._failed()
            return None, CallFailed(exc.outcome, str(exc))
        except BaseException:
            self._in_flight -= 1
            raise
        else:
            # Learn before anyone else may go: this answer can say the budget is spent.
            self._in_flight -= 1
            return self._judge(reply, permit)
        finally:
            if self._known or self._new:
                self._schedule()

    def _judge(self, reply: Reply, permit: int) -> tuple[Reply | None, CallFailed | None]:
        self._learn(reply.headers, permit)
        if reply.status == 429:
            pause = self.throttled(reply.headers)
            return None, CallFailed("throttled", "Authlete rate limit reached", retry_after=pause)
        self._throttle_streak = 0
        if reply.status >= 500:
            self._failed()
            return None, CallFailed("error", f"Authlete answered HTTP {reply.status}")
        self._succeeded()  # any other answer means Authlete is up
        return reply, None


class ClientQuota:
    """How many calls one client's misses may start per second (`rate_limit.per_client`), so
    one client guessing tokens cannot spend the budget everyone shares.

    One float per client, the generic cell rate algorithm: `_due[client]` is when the client's
    bucket would be full again. The burst is one second's worth (at least one call): a client
    never spends more than `rate` x (seconds + 1). The map is bounded (least recently charged
    out first); a client pushed out starts again with a full bucket, which only forgives.
    Strings and floats are not tracked by the garbage collector, so neither is the map.
    """

    def __init__(
        self,
        rate: float,
        max_clients: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self._interval = 1.0 / rate
        self._tolerance = (max(1.0, rate) - 1.0) * self._interval
        self._max = max_clients
        self._clock = clock
        self._due: dict[str, float] = {}

    def charge(self, client: str) -> float:
        """0.0 and one call charged to `client`; or, past its quota, the seconds until it may
        start another (nothing charged)."""
        now = self._clock()
        due = self._due.pop(client, now)
        if due < now:
            due = now
        over = due - now - self._tolerance
        if over > 1e-9:  # not float dust from adding up intervals
            self._due[client] = due  # back at the end: recently seen
            return over
        self._due[client] = due + self._interval
        if len(self._due) > self._max:
            del self._due[next(iter(self._due))]
        return 0.0

    def __len__(self) -> int:
        return len(self._due)


class BudgetTimeout(Exception):
    pass


def _expire(waiter: asyncio.Future[int]) -> None:
    if not waiter.done():
        waiter.set_exception(BudgetTimeout())


def _live(waiters: collections.deque[asyncio.Future[int]], most: int) -> int:
    """How many of `waiters` still wait, counting up to `most`."""
    count = 0
    for waiter in waiters:
        if not waiter.done():
            count += 1
            if count >= most:
                break
    return count


def _refills(left: int, reset: float, limit: float, burst: float) -> bool:
    """Whether Remaining/Reset describe a token bucket refilling at `limit` per second: Reset
    is the time until the bucket is full again (whole seconds, rounded up). Then Remaining is
    its level now, not a quota held until Reset."""
    return abs(reset - (burst - left) / limit) <= 1.0


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _retry_after(value: str | None, now_wall: float) -> float | None:
    """Retry-After: delta-seconds or an HTTP date."""
    if value is None:
        return None
    seconds = _number(value)
    if seconds is not None:
        return seconds if seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_wall)
