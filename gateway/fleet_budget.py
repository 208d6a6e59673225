"""The fleet's one Authlete budget: a token bucket in Redis shared by every replica (and every
worker) that calls Authlete with the same base URL and access token.

The bucket is one Redis hash, `<prefix>:b:<sha256(base_url NUL access_token) hex>` (a digest:
the access token itself never reaches Redis), changed only by the Lua scripts below, which
read the clock with Redis `TIME`, so the replicas' clocks never matter. Its fields:

- `tokens`, `stamp`      the bucket (ms since the epoch on Redis's clock);
- `rate`                 what `X-RateLimit-Limit` taught (never above the configured rate);
- `cap`, `cap_until`     what `X-RateLimit-Remaining` says is left until `X-RateLimit-Reset`,
                         less the permits granted since the answer's own (calls in flight);
- `paused_until`         the end of a 429's pause;
- `seq`                  permits granted so far (for the in-flight count above);
- `hold`                 until when a replica's KNOWN callers found the bucket empty: NEW
                         ones anywhere wait until then, so KNOWN goes first fleet-wide.

Every script refreshes a PEXPIRE, so the bucket of a fleet that went away goes away too; a
bucket that is gone (expired, or Redis restarted empty) starts full, as a process does.

Leases. A replica takes permits `lease_sizes()` at a time (at most `lease_limit(burst)`, 10
at the default burst of 200) and hands them to its own queue without asking Redis again;
permits it did not use within `LEASE_TTL` (1 s) are dropped, never spent later. See
`lease_limit` for why that size. A refused lease says how long until the next permit (or
the pause's end), and the replica's queue waits that long before asking again.

A 429 sets `paused_until` and publishes `t <digest> <pause ms>` on the event channel: every
replica pauses at once and drops the permits it holds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import math
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from gateway.config import AuthleteConfig, SharedConfig
from gateway.shared import Store, StoreDown

log = logging.getLogger("gateway.budget")

LEASE_TTL = 1.0  # seconds a leased permit may wait for a caller before it is dropped
LEASE_SHARE = 20  # a lease is at most 1/20 of the burst (and at least one permit)
HOLD_GRACE = 0.05  # seconds NEW callers keep waiting after KNOWN ones were told to wait
KEY_TTL = 60.0  # an idle bucket's hash lives this long past its refill time (and pauses)
EVENT = "t"  # pub/sub event kind: a 429 paused the bucket


def bucket_digest(cfg: AuthleteConfig) -> str:
    """The hex SHA-256 of `base_url NUL access_token`: names the bucket without the token."""
    material = f"{cfg.base_url}\0{cfg.access_token}".encode()
    return hashlib.sha256(material).hexdigest()


def lease_limit(burst: float) -> int:
    """The most permits one replica takes from the bucket at a time: 1/20 of the burst, at
    least one (10 at the default burst of 200).

    A leased permit a replica holds is budget no other replica can use until it expires
    (`LEASE_TTL`), so leases are kept small: ten replicas each holding a full lease strand
    half the burst for at most a second, and as leases are sized by demand (`lease_sizes`)
    a replica rarely holds more than the one permit it took ahead. Big enough, though, that
    a replica serving a queue asks Redis once per up to ten Authlete calls. Leases never
    let the fleet exceed `rate` and `burst`: every permit comes out of the one bucket.
    """
    return max(1, int(burst) // LEASE_SHARE)


def lease_sizes(known: int, new: int, limit: int) -> tuple[int, int]:
    """How many permits to ask for: (for KNOWN callers, for others), together at most `limit`.

    `known` and `new` are the callers waiting in this replica's queue. One permit more than
    the queue is asked for (as the lowest priority), for the next caller, which then goes
    without a round trip to Redis; it costs at most one permit stranded for `LEASE_TTL` when
    traffic stops. KNOWN callers are counted apart because the bucket serves them first.
    """
    first = min(limit, max(0, known))
    rest = min(limit - first, max(0, new) + 1)
    return first, rest


# Shared by the scripts: load the bucket, refilled to now (Redis's clock), and save it.
_PRELUDE = """
local function num(x) return string.format('%.17g', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local key = KEYS[1]
local cfg_rate = tonumber(ARGV[1]) / 1000
local burst = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local h = redis.call('HMGET', key, 'tokens', 'stamp', 'rate', 'cap', 'cap_until',
                     'paused_until', 'seq', 'hold')
local b = {
  tokens = tonumber(h[1]) or burst,
  stamp = tonumber(h[2]) or now,
  rate = tonumber(h[3]) or cfg_rate,
  cap = tonumber(h[4]),
  cap_until = tonumber(h[5]) or 0,
  paused_until = tonumber(h[6]) or 0,
  seq = tonumber(h[7]) or 0,
  hold = tonumber(h[8]) or 0,
}
if b.rate > cfg_rate or b.rate <= 0 then b.rate = cfg_rate end
if now > b.stamp then b.tokens = b.tokens + (now - b.stamp) * b.rate end
b.stamp = now
if b.tokens > burst then b.tokens = burst end
if b.cap and now >= b.cap_until then b.cap = nil end
local function save()
  redis.call('HSET', key, 'tokens', num(b.tokens), 'stamp', num(b.stamp),
             'rate', num(b.rate), 'paused_until', num(b.paused_until),
             'seq', num(b.seq), 'hold', num(b.hold))
  local life = ttl + (burst / b.rate)
  if b.cap then
    redis.call('HSET', key, 'cap', num(b.cap), 'cap_until', num(b.cap_until))
    life = math.max(life, b.cap_until - now + ttl)
  else
    redis.call('HDEL', key, 'cap', 'cap_until')
  end
  life = math.max(life, b.paused_until - now + ttl)
  redis.call('PEXPIRE', key, math.ceil(life))
end
local function state(granted, wait_known, wait_other)
  local cap, cap_left = '', 0
  if b.cap then cap, cap_left = num(b.cap), math.ceil(b.cap_until - now) end
  return {granted, math.ceil(wait_known), math.ceil(wait_other), num(b.seq), num(b.tokens),
          cap, cap_left, num(b.rate * 1000), math.ceil(math.max(0, b.paused_until - now))}
end
"""

# ARGV[4..7]: permits for KNOWN callers, for others, '1' for a SPARE call, hold grace (ms).
_LEASE = (
    _PRELUDE
    + """
local known = tonumber(ARGV[4])
local other = tonumber(ARGV[5])
local spare = ARGV[6] == '1'
local grace = tonumber(ARGV[7])
local avail = b.tokens
if b.cap and b.cap < avail then avail = b.cap end
local paused = now < b.paused_until
local held = now < b.hold
local granted = 0
if spare then
  if not paused and not held and avail >= burst / 2 + 1 then granted = 1 end
else
  local whole = math.floor(avail)
  if paused or whole < 0 then whole = 0 end
  granted = math.min(known, whole)
  if not held then granted = granted + math.min(other, whole - granted) end
end
b.tokens = b.tokens - granted
if b.cap then b.cap = b.cap - granted end
b.seq = b.seq + granted
local wait_known, wait_other = 0, 0
if not spare and granted < known + other then
  if paused then wait_known = b.paused_until - now end
  if b.cap and b.cap < 1 then wait_known = math.max(wait_known, b.cap_until - now) end
  if b.tokens < 1 then wait_known = math.max(wait_known, (1 - b.tokens) / b.rate) end
  if granted < known then b.hold = math.max(b.hold, now + wait_known + grace) end
  wait_other = wait_known
  if now < b.hold then wait_other = math.max(wait_other, b.hold - now) end
end
save()
return state(granted, wait_known, wait_other)
"""
)

# ARGV[4..8]: the learnt rate per second ('' none), Remaining ('' none), Reset in ms, the
# answer's own permit number (-1 unknown), this replica's other calls in flight.
_LEARN = (
    _PRELUDE
    + """
if ARGV[4] ~= '' then
  local rate = tonumber(ARGV[4]) / 1000
  if rate > cfg_rate then rate = cfg_rate end
  if rate > 0 then b.rate = rate end
end
if ARGV[5] ~= '' then
  local ahead = tonumber(ARGV[8])
  local own = tonumber(ARGV[7])
  if own >= 0 and b.seq >= own then ahead = math.max(ahead, b.seq - own) end
  local left = math.max(0, math.floor(tonumber(ARGV[5])) - ahead)
  if tonumber(ARGV[6]) < 0 then
    if left < b.tokens then b.tokens = left end
  else
    b.cap = left
    b.cap_until = now + tonumber(ARGV[6])
  end
end
save()
return state(0, 0, 0)
"""
)

# ARGV[4..6]: the pause (ms), the event channel, the event's prefix ('t <digest> ').
_THROTTLE = (
    _PRELUDE
    + """
b.paused_until = math.max(b.paused_until, now + tonumber(ARGV[4]))
save()
redis.call('PUBLISH', ARGV[5], ARGV[6] .. math.ceil(b.paused_until - now))
return state(0, 0, 0)
"""
)


@dataclass(frozen=True, slots=True)
class Grant:
    """A script's answer: permits granted and what the bucket looks like afterwards."""

    granted: int
    wait_known: float  # seconds until a KNOWN caller may get a permit (when one was refused)
    wait_other: float  # the same for the others (longer while KNOWN callers are held)
    seq: int  # permits the bucket granted so far, these included
    tokens: float
    cap: float | None
    cap_left: float
    rate: float
    paused: float  # seconds of 429 pause left

    @classmethod
    def parse(cls, reply: Any) -> Grant:
        granted, wait_known, wait_other, seq, tokens, cap, cap_left, rate, paused = reply
        return cls(
            granted=int(granted),
            wait_known=int(wait_known) / 1000,
            wait_other=int(wait_other) / 1000,
            seq=int(float(seq)),
            tokens=float(tokens),
            cap=float(cap) if cap not in (b"", "") else None,
            cap_left=int(cap_left) / 1000,
            rate=float(rate),
            paused=int(paused) / 1000,
        )


class _Lease:
    __slots__ = ("end", "expires", "next")

    def __init__(self, first: int, end: int, expires: float) -> None:
        self.next = first  # the bucket's number of the next permit to hand out
        self.end = end
        self.expires = expires


class FleetBucket:
    """One process's use of the shared bucket: the scripts, the permits it holds, and its
    last view of the bucket (for the gauge and for `spare` without a round trip)."""

    def __init__(
        self,
        store: Store,
        shared: SharedConfig,
        cfg: AuthleteConfig,
        on_pause: Callable[[float], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.digest = bucket_digest(cfg)
        self.key = store.key("b", self.digest)
        self.configured_rate = cfg.rate_limit.rate
        self.rate = cfg.rate_limit.rate
        self.burst = float(cfg.rate_limit.burst)
        self.limit = lease_limit(cfg.rate_limit.burst)
        self._timeout = shared.timeout
        self._clock = clock
        self._on_pause = on_pause
        self._lease_script = store.redis.register_script(_LEASE)
        self._learn_script = store.redis.register_script(_LEARN)
        self._throttle_script = store.redis.register_script(_THROTTLE)
        self._common = (f"{self.configured_rate:.17g}", f"{self.burst:.17g}", str(KEY_TTL * 1000))
        self._leases: collections.deque[_Lease] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._down_until = 0.0
        # The bucket as last seen (full until a script says otherwise).
        self._tokens = self.burst
        self._seen = clock()
        self._cap: float | None = None
        self._cap_until = 0.0
        store.on_event(_weak_handler(self))

    # ------------------------------------------------------------------ the mode
    @property
    def active(self) -> bool:
        """Shared mode: the store is usable and our last call to it did not just fail."""
        return self.store.shared and self._clock() >= self._down_until

    def _down(self) -> None:
        # The store switched to fallback; this keeps a store that is closing (and stays
        # "shared") from being asked again at once, in a loop.
        self._down_until = self._clock() + self._timeout

    def pause_sharing(self, seconds: float = 1.0) -> None:
        """Use the fallback bucket for `seconds` (after an unexpected error)."""
        self._down_until = self._clock() + seconds

    # ------------------------------------------------------------------ permits held here
    def take(self, now: float) -> int | None:
        """A leased permit's number, or None if this process holds none (or they expired)."""
        leases = self._leases
        while leases:
            lease = leases[0]
            if lease.expires <= now or lease.next > lease.end:
                leases.popleft()
                continue
            lease.next += 1
            return lease.next - 1
        return None

    def held(self, now: float) -> int:
        return sum(max(0, x.end - x.next + 1) for x in self._leases if x.expires > now)

    def drop(self) -> None:
        """Give up every permit held (a 429: nobody calls during the pause, nor just after)."""
        self._leases.clear()

    def trim(self, keep: int) -> None:
        """Hold at most `keep` permits (Authlete says fewer are left)."""
        excess = self.held(self._clock()) - max(0, keep)
        while excess > 0 and self._leases:
            last = self._leases[-1]
            mine = max(0, last.end - last.next + 1)
            cut = min(mine, excess)
            last.end -= cut
            excess -= cut
            if last.next > last.end:
                self._leases.pop()

    # ------------------------------------------------------------------ the last view
    def estimate(self, now: float) -> float:
        """What the bucket would allow now, from its last answer refilled since."""
        tokens = min(self.burst, self._tokens + max(0.0, now - self._seen) * self.rate)
        if self._cap is not None and now < self._cap_until:
            tokens = min(tokens, self._cap)
        return max(0.0, tokens)

    def _absorb(self, grant: Grant) -> None:
        now = self._clock()
        self._tokens = grant.tokens
        self._seen = now
        self.rate = grant.rate
        self._cap = grant.cap
        self._cap_until = now + grant.cap_left

    # ------------------------------------------------------------------ scripts
    async def lease(self, known: int, other: int, spare: bool = False) -> Grant:
        """Ask the bucket for permits; those granted are held here. Raises StoreDown."""
        args = (*self._common, known, other, "1" if spare else "0", int(HOLD_GRACE * 1000))
        try:
            reply = await self.store.call(
                "lease", lambda r: self._lease_script(keys=[self.key], args=args, client=r)
            )
            grant = Grant.parse(reply)
        except StoreDown:
            self._down()
            raise
        except (ValueError, TypeError):  # not our script's answer: treat Redis as unusable
            self._down()
            raise StoreDown("response") from None
        self._absorb(grant)
        if grant.granted > 0:
            self._leases.append(
                _Lease(grant.seq - grant.granted + 1, grant.seq, self._clock() + LEASE_TTL)
            )
        return grant

    def learn(
        self,
        rate: float | None,
        remaining: int | None,
        reset: float | None,
        own: int,
        in_flight: int,
        refilling: bool = False,
    ) -> None:
        """Write what an answer's rate-limit headers say to the bucket, in the background.
        `refilling`: Remaining is the level of a bucket that refills (see budget._refills),
        so it lowers the tokens; otherwise it caps them until Reset."""
        if rate is not None:
            rate = min(rate, self.configured_rate)
        if rate is None and remaining is None:
            return
        if remaining is None and rate == self.rate:
            return  # nothing new
        args = (
            *self._common,
            "" if rate is None else f"{rate:.17g}",
            "" if remaining is None or reset is None else str(remaining),
            "-1" if refilling else "0" if reset is None else str(math.ceil(reset * 1000)),
            str(own),
            str(in_flight),
        )
        self._spawn(self._run("learn", self._learn_script, args))

    def throttle(self, pause: float) -> None:
        """A 429: pause the bucket and tell every replica, in the background."""
        prefix = f"{EVENT} {self.digest} "
        args = (*self._common, str(math.ceil(pause * 1000)), self.store.channel, prefix)
        self._spawn(self._run("throttle", self._throttle_script, args))

    async def _run(self, op: str, script: Any, args: tuple[str, ...]) -> None:
        try:
            reply = await self.store.call(
                op, lambda r: script(keys=[self.key], args=args, client=r)
            )
            self._absorb(Grant.parse(reply))
        except StoreDown:
            self._down()  # counted by the store; the local pause or cap still holds
        except (ValueError, TypeError):
            log.warning("shared budget: unexpected answer to %s", op)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if not self.active:
            coro.close()
            return
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (a synchronous caller): the local state is enough
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Cancel the writes still in flight (at shutdown)."""
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------------ events
    def on_event(self, kind: str, payload: str) -> None:
        if kind != EVENT:
            return
        digest, _, millis = payload.partition(" ")
        if digest != self.digest:
            return  # another Authlete service's bucket on the same Redis
        with contextlib.suppress(ValueError):
            pause = int(millis) / 1000
            if pause > 0:
                self.drop()
                self._on_pause(pause)


def _weak_handler(bucket: FleetBucket) -> Callable[[str, str], None]:
    """An event handler that does not keep a replaced budget (a reload) alive."""
    ref = weakref.ref(bucket)

    def handle(kind: str, payload: str) -> None:
        target = ref()
        if target is not None:
            target.on_event(kind, payload)

    return handle
