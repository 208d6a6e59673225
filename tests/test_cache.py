"""The verdict cache as a unit: lifetimes, bounds, stale windows, and staying out of the GC."""

from __future__ import annotations

import gc

import pytest

from gateway.cache import VerdictCache, token_key
from gateway.verdict import Active, Inactive


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cache(clock: Clock, wall: Clock, **kw: float) -> VerdictCache:
    return VerdictCache(
        int(kw.get("max_entries", 10)),
        5,
        kw.get("negative_ttl", 5.0),
        kw.get("stale", 0.0),
        clock=clock,
        wall=wall,
    )


@pytest.mark.parametrize(
    "verdict",
    [
        Active("alice", "42", ("a", "b.c"), "a b.c", 2e9),
        Active(None, "7", (), "", 2e9),
        Active('ü"\\ x', "18446744073709551615", ("s",), "s", 2e9),
    ],
)
def test_entries_round_trip(verdict: Active) -> None:
    clock, wall = Clock(), Clock()
    cache = _cache(clock, wall)
    cache.put_active(token_key("t"), verdict, 60)
    assert cache.get(token_key("t")) == verdict


def test_the_store_is_not_tracked_by_the_garbage_collector() -> None:
    clock, wall = Clock(), Clock()
    cache = _cache(clock, wall, max_entries=1000)
    for i in range(500):
        cache.put_active(token_key(f"t{i}"), Active(f"s{i}", str(i), ("x",), "x", 2e9), 60)
    # An untracked dict is never traversed by a collection, however large it grows.
    assert not gc.is_tracked(cache._active)


def test_lifetime_bounds_and_stale_window() -> None:
    clock, wall = Clock(), Clock()
    wall.now = 1_700_000_000.0
    cache = _cache(clock, wall, stale=10.0)
    key = token_key("t")
    verdict = Active("a", "1", (), "", wall.now + 100)
    cache.put_active(key, verdict, 5)
    clock.now += 4.9
    assert cache.get(key) == verdict
    clock.now += 0.2
    assert cache.get(key) is None  # TTL over
    assert cache.get_stale(key) == verdict  # inside the stale window
    wall.now += 200  # past the token's own expiry: never stale-served
    assert cache.get_stale(key) is None
    wall.now -= 200
    clock.now += 10
    assert cache.get(key) is None and cache.get_stale(key) is None
    assert len(cache) == 0  # dropped once past the window


def test_negative_verdict_replaces_an_active_one() -> None:
    clock, wall = Clock(), Clock()
    cache = _cache(clock, wall, stale=30.0)
    key = token_key("t")
    cache.put_active(key, Active("a", "1", (), "", 2e9), 1)
    clock.now += 2
    cache.put_negative(key, Inactive("UNAUTHORIZED", "Bearer"))
    assert cache.get(key) == Inactive("UNAUTHORIZED", "Bearer")
    assert cache.get_stale(key) is None


def test_full_cache_evicts_oldest_first() -> None:
    clock, wall = Clock(), Clock()
    cache = _cache(clock, wall, max_entries=3)
    for name in ("a", "b", "c", "d"):
        cache.put_active(token_key(name), Active(name, "1", (), "", 2e9), 60)
    assert cache.get(token_key("a")) is None
    assert all(cache.get(token_key(n)) is not None for n in ("b", "c", "d"))
    assert cache.evictions == 1
