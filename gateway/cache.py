"""The verdict cache: keyed by the SHA-256 digest of the token, never the token itself.

Active verdicts and UNAUTHORIZED verdicts live in separate, separately bounded stores,
so a client spraying random tokens can only churn the small negative store and never
evicts the entries of real users. The keys of active entries that expired or were evicted
are remembered a while longer (`was_active`): a real user coming back goes ahead of
never-seen tokens in the Authlete budget's queue.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable

import cachetools

from gateway.verdict import Active, Inactive, Verdict

# monotonic deadline, monotonic refresh-after (== deadline: no refresh), token expiry (epoch)
_HEAD = struct.Struct("=ddd")
_SEP = "\x00"
_SEP_BYTES = b"\x00"
_RECENT = 4096  # cannot occur in a subject, client id or scope: they are header-safe


def _pack(deadline: float, refresh_at: float, verdict: Active) -> bytes:
    text = f"{verdict.subject or ''}{_SEP}{verdict.client_id}{_SEP}{verdict.scope_header}"
    return _HEAD.pack(deadline, refresh_at, verdict.expires_at) + text.encode()


def _unpack(entry: bytes, expires_at: float) -> Active:
    subject, client_id, header = entry[_HEAD.size :].decode().split(_SEP)
    scopes = tuple(header.split(" ")) if header else ()
    return Active(subject or None, client_id, scopes, header, expires_at)


def token_key(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii", "surrogateescape")).digest()


class _CountingTTLCache(cachetools.TTLCache[bytes, Inactive]):
    evictions = 0

    def popitem(self) -> tuple[bytes, Inactive]:
        self.evictions += 1
        return super().popitem()


class VerdictCache:
    def __init__(
        self,
        max_entries: int,
        negative_max_entries: int,
        negative_ttl: float,
        stale_if_error: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._max = max_entries
        # key -> packed entry (see _pack). A plain dict keeps insertion order, so the first
        # key is the oldest entry and eviction is O(1). Keys and values are bytes, which the
        # garbage collector does not track, so neither is the dict: a million entries cost
        # the collector nothing (tuples here made p99 latency jump with cache size).
        self._active: dict[bytes, bytes] = {}
        self._negative = _CountingTTLCache(
            maxsize=negative_max_entries, ttl=max(negative_ttl, 1e-9), timer=clock
        )
        self._negative_ttl = negative_ttl
        self._stale_for = stale_if_error
        self._clock = clock
        self._wall = wall
        self._evictions = 0
        # The verdicts of the tokens seen lately, unpacked: busy tokens skip _unpack. Small
        # on purpose (these tuples are what the collector would have to walk).
        self._recent: dict[bytes, tuple[bytes, Active]] = {}
        # Keys of active entries that expired or were evicted, oldest first, at most as many
        # as there may be entries (about 100 bytes a key; bytes and None: untracked by the GC).
        self._lapsed: dict[bytes, None] = {}
        # Set by get() when the active entry it returned is inside its refresh window (and
        # not yet claimed): the caller, who holds the token, may start a refresh; it clears it.
        self.due = False

    def get(self, key: bytes) -> Verdict | None:
        entry = self._active.get(key)
        if entry is not None:
            deadline, refresh_at, expires_at = _HEAD.unpack_from(entry)
            now = self._clock()
            if deadline > now:
                if now >= refresh_at:
                    self.due = True
                recent = self._recent.get(key)
                if recent is not None and recent[0] is entry:
                    return recent[1]
                verdict = _unpack(entry, expires_at)
                if len(self._recent) >= _RECENT:
                    self._recent.clear()
                self._recent[key] = (entry, verdict)
                return verdict
            if now - deadline >= self._stale_for:
                del self._active[key]  # past any stale window too
                self._lapse(key)
            return None
        return self._negative.get(key)

    def peek(self, key: bytes) -> Verdict | None:
        """A live verdict, as get() but never handed over for a refresh."""
        entry = self._active.get(key)
        if entry is not None:
            deadline, _, expires_at = _HEAD.unpack_from(entry)
            return _unpack(entry, expires_at) if deadline > self._clock() else None
        return self._negative.get(key)

    def claim_refresh(self, key: bytes) -> bool:
        """True once for a live entry inside its refresh window: it is marked as refreshing
        (not due again), so one entry starts at most one refresh, whatever comes of it."""
        entry = self._active.get(key)
        if entry is None:
            return False
        deadline, refresh_at, expires_at = _HEAD.unpack_from(entry)
        now = self._clock()
        if not refresh_at <= now < deadline:
            return False
        self._active[key] = _HEAD.pack(deadline, deadline, expires_at) + entry[_HEAD.size :]
        return True

    def was_active(self, key: bytes) -> bool:
        """The token's last verdict was active: its entry is still held (expired, or it would
        not be asked) or was lately."""
        return key in self._active or key in self._lapsed

    def get_stale(self, key: bytes) -> Active | None:
        """An expired active verdict still inside `stale_if_error`, never past the token's
        own expiry. Only for when Authlete cannot give a verdict."""
        entry = self._active.get(key)
        if entry is None:
            return None
        deadline, _, expires_at = _HEAD.unpack_from(entry)
        if self._clock() - deadline >= self._stale_for or expires_at <= self._wall():
            return None
        return _unpack(entry, expires_at)

    def put_active(self, key: bytes, verdict: Active, ttl: float, ahead: float = 0.0) -> None:
        """Hold `verdict` for `ttl` seconds; with `ahead` (a fraction), a use within the last
        `ahead` of that life is offered for a refresh (see `due`)."""
        if ttl <= 0:
            return
        self._negative.pop(key, None)
        self._lapsed.pop(key, None)
        if key in self._active:
            del self._active[key]  # re-insert at the end: it is the newest now
        elif len(self._active) >= self._max:
            self._evict_one()
        now = self._clock()
        deadline = now + ttl
        refresh_at = now + ttl * (1.0 - ahead) if ahead > 0 else deadline
        self._active[key] = _pack(deadline, refresh_at, verdict)

    def put_negative(self, key: bytes, verdict: Inactive) -> None:
        self._lapsed.pop(key, None)  # no longer a known user's token
        self._active.pop(key, None)  # also ends any stale window: never serve it again
        if self._negative_ttl <= 0:
            return
        self._negative[key] = verdict

    def put_stale(self, key: bytes, verdict: Active) -> None:
        """An active verdict known only as stale (the fleet's copy is past its freshness):
        kept for get_stale alone, never over a live entry, never past `stale_if_error`."""
        if self._stale_for <= 0 or key in self._active:
            return
        if len(self._active) >= self._max:
            self._evict_one()
        now = self._clock()
        self._active[key] = _pack(now, now, verdict)

    def delete(self, key: bytes) -> int:
        """Forget a token's verdicts (a purge): live, stale, negative, and that it was known."""
        found = self._active.pop(key, None) is not None
        found = self._negative.pop(key, None) is not None or found
        self._recent.pop(key, None)
        self._lapsed.pop(key, None)
        return int(found)

    def delete_matching(self, subject: str | None = None, client_id: str | None = None) -> int:
        """Forget every active verdict of a subject or a client (a purge); one pass over the
        entries, so it costs milliseconds per hundred thousand."""
        field = 0 if subject is not None else 1
        wanted = (subject if subject is not None else client_id or "").encode()
        start = _HEAD.size
        doomed = [
            key
            for key, entry in self._active.items()
            if entry[start:].split(_SEP_BYTES, 2)[field] == wanted
        ]
        for key in doomed:
            del self._active[key]
            self._recent.pop(key, None)
            self._lapsed.pop(key, None)
        return len(doomed)

    def reconfigure(
        self, max_entries: int, negative_max_entries: int, negative_ttl: float, stale: float
    ) -> None:
        self._max = max_entries
        while len(self._active) > max_entries:
            self._evict_one()
        while len(self._lapsed) > max_entries:
            del self._lapsed[next(iter(self._lapsed))]
        self._stale_for = stale
        if (negative_max_entries, negative_ttl) != (self._negative.maxsize, self._negative_ttl):
            # Negative entries live seconds at most: starting that store afresh is cheap.
            self._evictions += self._negative.evictions  # the counter must not go back
            self._negative = _CountingTTLCache(
                maxsize=negative_max_entries, ttl=max(negative_ttl, 1e-9), timer=self._clock
            )
            self._negative_ttl = negative_ttl

    def _evict_one(self) -> None:
        # Oldest first; an expired head entry is the best victim, and in a FIFO of
        # near-uniform TTLs the head is also the entry closest to expiry.
        oldest = next(iter(self._active))
        del self._active[oldest]
        self._evictions += 1
        self._lapse(oldest)

    def _lapse(self, key: bytes) -> None:
        self._lapsed[key] = None
        if len(self._lapsed) > self._max:
            del self._lapsed[next(iter(self._lapsed))]

    @property
    def evictions(self) -> int:
        return self._evictions + self._negative.evictions

    def __len__(self) -> int:
        return len(self._active) + len(self._negative)

    def clear(self) -> None:
        self._recent.clear()
        self._lapsed.clear()
        self._active.clear()
        self._negative.clear()
