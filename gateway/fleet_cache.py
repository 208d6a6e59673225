"""The fleet's verdict level in Redis: sealed values, one introspection per token across the
fleet, and purges.

A value in Redis is only believed with a valid HMAC (`shared.secret`) over the cache key and
every field, including a wall-clock end of validity: whoever can write to Redis can delete
verdicts or make replicas ask Authlete again, but cannot mint one, move one to another token,
or replay an old one past its end.

Each operation is one Lua script, so one round trip: `get_or_lock` reads the verdict and, on a
miss, takes the token's lock in the same step; `put` stores, indexes, unlocks and notifies;
purges delete and leave a marker stamped with the purge epoch, which keeps a call for that
token, subject or client that started before the purge from storing its verdict afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gateway.config import SharedConfig
from gateway.metrics import Metrics
from gateway.shared import Store, StoreDown
from gateway.verdict import Active, Inactive, Verdict

log = logging.getLogger("gateway.shared")

_SEP = b"\x00"
_VERSION = b"1"
_SKEW = 1.0  # seconds of wall-clock difference tolerated between replicas
LOCK_TTL = 1.0  # a dead holder's lock is taken over after this; a live holder renews it

# -> {status, value, purge count, lock ms left, Redis time ms}: 1 fresh value; 2 lock taken
# (value: a stale one or ''); 3 held by another replica (value likewise; and how long its lock
# has left)
_GET_OR_LOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = redis.call('GET', KEYS[1])
local epoch = redis.call('GET', KEYS[3]) or '0'
if v then
  local bar = string.find(v, '|', 1, true)
  local fresh = bar and tonumber(string.sub(v, 1, bar - 1)) or 0
  if fresh and fresh > now then return {1, v, epoch, 0, now} end
end
if ARGV[3] == '0' then return {3, v or '', epoch, 0, now} end
local got = redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
if got then return {2, v or '', epoch, 0, now} end
return {3, v or '', epoch, redis.call('PTTL', KEYS[2]), now}
"""

# KEYS: value, lock, purge markers of the token, subject and client (the token's again when
# there is none), index... ARGV: sealed value, px, owner, Redis time (ms) the call began, hex,
# channel.
# A verdict is not stored when its token, subject or client was purged after the call began.
_PUT = """
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
local seen = tonumber(ARGV[4])
local fresh = true
for i = 3, 5 do
  local purged = redis.call('GET', KEYS[i])
  if purged and tonumber(purged) >= seen then fresh = false end
end
if fresh then
  local px = tonumber(ARGV[2])
  redis.call('SET', KEYS[1], ARGV[1], 'PX', px)
  for i = 6, #KEYS do
    redis.call('SADD', KEYS[i], ARGV[5])
    if redis.call('PTTL', KEYS[i]) < px then redis.call('PEXPIRE', KEYS[i], px) end
  end
end
redis.call('PUBLISH', ARGV[6], 'f ' .. ARGV[5])
if fresh then return 1 end
return 0
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[2], 'f ' .. ARGV[3])
return 1
"""

_RENEW = """
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
end
return 1
"""

# KEYS: purge count, purge marker (set to Redis's time), value; ARGV: channel, message, marker px
_PURGE_KEY = """
local n = redis.call('DEL', KEYS[3])
redis.call('INCR', KEYS[1])
local t = redis.call('TIME')
redis.call('SET', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return n
"""

# KEYS: purge count, purge marker, index; ARGV: value key prefix, channel, message, marker px
_PURGE_INDEX = """
local n = 0
for _, hex in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  n = n + redis.call('DEL', ARGV[1] .. hex)
end
redis.call('DEL', KEYS[3])
redis.call('INCR', KEYS[1])
local t = redis.call('TIME')
redis.call('SET', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), 'PX', ARGV[4])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return n
"""
_MARKER_TTL = 120.0  # a purge marker outlives any call that began before the purge

FRESH, LOCKED, HELD = 1, 2, 3


class Watch:
    """A waiter's ear on one token's lock: `done` is set when the holder says it is done (and
    cleared by the waiter before it waits again); `released` stays true once it has."""

    __slots__ = ("done", "released")

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.released = False

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), timeout)
        self.done.clear()


@dataclass(frozen=True, slots=True)
class Sealed:
    """A verdict read back from Redis, its HMAC checked."""

    verdict: Verdict
    fresh_until: float  # wall clock
    valid_until: float  # wall clock: fresh_until + stale_if_error for an active one


@dataclass(frozen=True, slots=True)
class Lookup:
    status: int  # FRESH, LOCKED (this replica now holds the token's lock) or HELD
    found: Sealed | None  # FRESH: the verdict; otherwise a stale one, if any
    started: int  # Redis's clock (ms) at the lookup: a purge marker past it is a later purge
    lock_left: float = LOCK_TTL  # HELD: seconds until the holder's lock lapses unless renewed


def subject_index(subject: str) -> str:
    return hashlib.sha256(subject.encode()).hexdigest()


class FleetCache:
    def __init__(self, store: Store, cfg: SharedConfig, metrics: Metrics) -> None:
        self.store = store
        self._secret = cfg.secret
        self._prefix = store.prefix.encode()  # a verdict is bound to its service
        self._metrics = metrics
        self.owner = os.urandom(12).hex()
        redis = store.redis
        self._get_or_lock = redis.register_script(_GET_OR_LOCK)
        self._put = redis.register_script(_PUT)
        self._unlock = redis.register_script(_UNLOCK)
        self._renew = redis.register_script(_RENEW)
        self._purge_key = redis.register_script(_PURGE_KEY)
        self._purge_index = redis.register_script(_PURGE_INDEX)
        self._epoch_key = store.key("epoch", "purge")
        self._held: set[str] = set()  # lock keys this process holds
        self._renewer: asyncio.Task[None] | None = None
        self._waiters: dict[str, list[Watch]] = {}
        self.epoch = b"0"  # the purge epoch last seen
        store.on_event(self._on_event)

    # ------------------------------------------------------------------ sealing
    def seal(self, key: bytes, verdict: Verdict, fresh_until: float, valid_until: float) -> bytes:
        fresh_ms = str(round(fresh_until * 1000)).encode()
        valid_ms = str(round(valid_until * 1000)).encode()
        if isinstance(verdict, Active):
            fields = [
                b"A",
                fresh_ms,
                valid_ms,
                str(round(verdict.expires_at * 1000)).encode(),
                (verdict.subject or "").encode(),
                verdict.client_id.encode(),
                verdict.scope_header.encode(),
            ]
        else:
            fields = [b"I", fresh_ms, valid_ms, verdict.action.encode(), verdict.challenge.encode()]
        payload = _SEP.join(fields)
        return fresh_ms + b"|" + _VERSION + self._mac(key, payload) + payload

    def open(self, key: bytes, value: bytes, now: float) -> Sealed | None:
        """The verdict in `value`, or None when it is not one this fleet sealed for `key`
        (counted and logged: someone wrote to Redis who should not have), or is past its
        validity (a replay)."""
        fresh_text, bar, rest = value.partition(b"|")
        if not bar or rest[:1] != _VERSION or len(rest) < 33:
            return self._forged()
        mac, payload = rest[1:33], rest[33:]
        if not hmac.compare_digest(mac, self._mac(key, payload)):
            return self._forged()
        fields = payload.split(_SEP)
        try:
            fresh_until = int(fields[1]) / 1000
            valid_until = int(fields[2]) / 1000
            if fields[1] != fresh_text:
                return self._forged()
            if fields[0] == b"A" and len(fields) == 7:
                expires_at = int(fields[3]) / 1000
                header = fields[6].decode()
                scopes = tuple(header.split(" ")) if header else ()
                verdict: Verdict = Active(
                    fields[4].decode() or None, fields[5].decode(), scopes, header, expires_at
                )
            elif fields[0] == b"I" and len(fields) == 5:
                verdict = Inactive(fields[3].decode(), fields[4].decode())
            else:
                return self._forged()
        except (ValueError, UnicodeDecodeError):
            return self._forged()
        if now > valid_until + _SKEW:
            return None  # sealed by us, but over: Redis should have dropped it already
        return Sealed(verdict, fresh_until, valid_until)

    def _mac(self, key: bytes, payload: bytes) -> bytes:
        return hmac.new(self._secret, self._prefix + _SEP + key + _SEP + payload, "sha256").digest()

    def _forged(self) -> Sealed | None:
        self._metrics.shared_hmac_failures.inc()
        log.warning("shared state: a verdict in Redis failed its HMAC check; ignored")
        return None  # a miss, never an allow

    # ------------------------------------------------------------------ the two steps
    async def get_or_lock(self, key: bytes, lock: bool = True) -> Lookup:
        """The fresh verdict, or the token's lock (LOCKED) when nobody holds it; HELD when
        another replica does. With `lock` False, only reads (HELD stands for "no fresh one")."""
        hexkey = key.hex()
        keys = [self.store.key("v", hexkey), self.store.key("l", hexkey), self._epoch_key]
        args: list[Any] = [self.owner, int(LOCK_TTL * 1000), "1" if lock else "0"]
        reply = await self.store.call(
            "get", lambda r: self._get_or_lock(keys=keys, args=args, client=r)
        )
        status, value, epoch, left_ms, started = reply
        lock_left = int(left_ms) / 1000 if int(left_ms) > 0 else LOCK_TTL
        started = int(started)
        self.epoch = epoch
        found = self.open(key, value, time.time()) if value else None
        status = int(status)
        if status == FRESH and (found is None or found.fresh_until + _SKEW < time.time()):
            # A value that fails its check (or this replica's clock) is a miss: take the lock
            # as a miss would.
            if not lock:
                return Lookup(HELD, found, started)
            return await self._lock_only(found, hexkey, started)
        if status == LOCKED:
            self._hold(keys[1])
        return Lookup(status, found, started, lock_left)

    async def _lock_only(self, found: Sealed | None, hexkey: str, started: int) -> Lookup:
        lock_key = self.store.key("l", hexkey)
        got = await self.store.call(
            "lock",
            lambda r: r.set(lock_key, self.owner, nx=True, px=int(LOCK_TTL * 1000)),
        )
        if got:
            self._hold(lock_key)
            return Lookup(LOCKED, found, started)
        return Lookup(HELD, found, started)

    async def put(
        self, key: bytes, verdict: Verdict, fresh_for: float, keep_for: float, started: int
    ) -> bool:
        """Store a verdict this replica fetched while holding the lock (released here), unless
        the token, its subject or its client was purged since `started`. True when stored."""
        hexkey = key.hex()
        lock_key = self.store.key("l", hexkey)
        self._held.discard(lock_key)
        now = time.time()
        value = self.seal(key, verdict, now + fresh_for, now + keep_for)
        token_marker = self.store.key("pk", hexkey)
        keys = [self.store.key("v", hexkey), lock_key, token_marker, token_marker, token_marker]
        if isinstance(verdict, Active):
            subject = subject_index(verdict.subject) if verdict.subject else None
            if subject is not None:
                keys[3] = self.store.key("ps", subject)
            keys[4] = self.store.key("pc", verdict.client_id)
            if subject is not None:
                keys.append(self.store.key("s", subject))
            keys.append(self.store.key("c", verdict.client_id))
        args: list[Any] = [value, max(1, int(keep_for * 1000)), self.owner, started, hexkey]
        args.append(self.store.channel)
        stored = await self.store.call("store", lambda r: self._put(keys=keys, args=args, client=r))
        return bool(stored)

    async def unlock(self, key: bytes) -> None:
        """Give the lock up without a verdict (the call failed): a waiter may try itself."""
        hexkey = key.hex()
        lock_key = self.store.key("l", hexkey)
        self._held.discard(lock_key)
        args = [self.owner, self.store.channel, hexkey]
        with contextlib.suppress(StoreDown):
            await self.store.call(
                "unlock", lambda r: self._unlock(keys=[lock_key], args=args, client=r)
            )

    def _hold(self, lock_key: str) -> None:
        self._held.add(lock_key)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.ensure_future(self._renew_held())

    async def _renew_held(self) -> None:
        """Keep this process's locks alive while their calls wait or run: one script for all
        of them, three times per LOCK_TTL."""
        while self._held:
            await asyncio.sleep(LOCK_TTL / 3)
            if self._held:
                with contextlib.suppress(StoreDown):
                    await self._renew_once(list(self._held))

    async def _renew_once(self, keys: list[str]) -> None:
        args: list[Any] = [self.owner, int(LOCK_TTL * 1000)]
        await self.store.call("renew", lambda r: self._renew(keys=keys, args=args, client=r))

    @contextlib.contextmanager
    def watch(self, key: bytes) -> Iterator[Watch]:
        """Hear, for as long as the block lasts, when the holder of `key`'s lock says it is
        done, also between two waits (while the waiter reads Redis again)."""
        hexkey = key.hex()
        watch = Watch()
        self._waiters.setdefault(hexkey, []).append(watch)
        try:
            yield watch
        finally:
            watchers = self._waiters.get(hexkey)
            if watchers is not None:
                with contextlib.suppress(ValueError):
                    watchers.remove(watch)
                if not watchers:
                    del self._waiters[hexkey]

    # ------------------------------------------------------------------ purges
    async def purge_key(self, key: bytes, message: str) -> int:
        """Delete a token's verdict fleet-wide, keep a call already under way for it from
        storing one, and tell every replica (`message`)."""
        hexkey = key.hex()
        keys = [self._epoch_key, self.store.key("pk", hexkey), self.store.key("v", hexkey)]
        args: list[Any] = [self.store.channel, message, int(_MARKER_TTL * 1000)]
        deleted = await self.store.call(
            "purge", lambda r: self._purge_key(keys=keys, args=args, client=r)
        )
        return int(deleted)

    async def purge_index(self, kind: str, name: str, message: str) -> int:
        """The same for every verdict of a subject (`s`) or client id (`c`)."""
        target = subject_index(name) if kind == "s" else name
        keys = [self._epoch_key, self.store.key("p" + kind, target), self.store.key(kind, target)]
        args: list[Any] = [
            self.store.key("v", ""),
            self.store.channel,
            message,
            int(_MARKER_TTL * 1000),
        ]
        deleted = await self.store.call(
            "purge", lambda r: self._purge_index(keys=keys, args=args, client=r)
        )
        return int(deleted)

    async def read_epoch(self) -> bytes:
        value = await self.store.call("get", lambda r: r.get(self._epoch_key))
        return value if isinstance(value, bytes) else b"0"

    # ------------------------------------------------------------------ events
    def _on_event(self, kind: str, payload: str) -> None:
        if kind == "f":
            for watch in self._waiters.get(payload, ()):
                watch.done.set()
                watch.released = True

    def close(self) -> None:
        self._held.clear()
        if self._renewer is not None:
            self._renewer.cancel()
