"""The fleet's verdict level on a real redis-server: sealed values (HMAC, bound to key and
service, replay-proof), the two levels, one call per token across processes, and purges.

Several `Verdicts` in one test process, each with its own Store and connection, stand for
replicas; the introspection they call is a counting stand-in for Authlete (the wire to
Authlete is tested elsewhere). The whole gateway as subprocesses is in test_fleet.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.budget import Priority
from gateway.cache import VerdictCache, token_key
from gateway.config import CacheConfig, SharedConfig
from gateway.fleet_cache import FRESH, HELD, LOCKED, FleetCache
from gateway.introspection import IntrospectionError
from gateway.metrics import Metrics
from gateway.shared import Store, service_namespace
from gateway.verdict import Active, Inactive, Verdict
from gateway.verdicts import Verdicts
from tests.certs import issue, make_ca
from tests.conftest import RedisServer, free_port, need_tool, start_redis, wait_until

SECRET = b"k" * 32
SERVICE = service_namespace("https://authlete.test", "715948317")


def shared_cfg(redis: RedisServer, **overrides: object) -> SharedConfig:
    cfg = SharedConfig(redis_url=redis.url, secret=SECRET, local_ttl=5.0, timeout=0.5)
    return replace(cfg, **overrides)  # type: ignore[arg-type]


def active(subject: str = "alice", client: str = "42", life: float = 3600.0) -> Active:
    # Authlete's expiresAt is in milliseconds
    return Active(subject, client, ("read",), "read", round((time.time() + life) * 1000) / 1000)


class Authlete:
    """What the replicas' introspection calls see: counts, a delay, a verdict per token."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.verdicts: dict[str, Verdict] = {}
        self.delay = 0.0

    async def introspect(
        self, token: str, deadline: float, on_send: Callable[[], None], priority: Priority
    ) -> Verdict:
        on_send()
        self.calls[token] = self.calls.get(token, 0) + 1
        await asyncio.sleep(self.delay)
        return self.verdicts.get(token, Inactive("UNAUTHORIZED", 'Bearer error="invalid_token"'))


Replica = tuple[Verdicts, Store, Metrics]


@pytest.fixture
async def replicas(
    redis_server: RedisServer,
) -> AsyncIterator[Callable[..., Awaitable[Replica]]]:
    made: list[tuple[Store, FleetCache]] = []

    async def make(
        authlete: Authlete, cache: CacheConfig | None = None, **shared: object
    ) -> Replica:
        cfg = shared_cfg(redis_server, **shared)
        metrics = Metrics()
        store = Store(cfg, metrics, service=SERVICE)
        fleet = FleetCache(store, cfg, metrics)
        await store.start()
        assert store.shared
        made.append((store, fleet))
        verdicts = Verdicts(
            cache or CacheConfig(),
            authlete.introspect,
            metrics,
            deadline=3.0,
            fleet=fleet,
            local_ttl=cfg.local_ttl,
        )
        return verdicts, store, metrics

    try:
        yield make
    finally:
        for store, fleet in made:
            fleet.close()
            await store.close()


def count(metrics: Metrics, result: str) -> float:
    return metrics.cache_requests.labels(result).value


# --------------------------------------------------------------------------- sealing


async def test_sealed_value_round_trips_and_any_change_is_a_miss(redis_server: RedisServer) -> None:
    metrics = Metrics()
    store = Store(shared_cfg(redis_server), metrics, service=SERVICE)
    fleet = FleetCache(store, shared_cfg(redis_server), metrics)
    key = token_key("tok-a")
    now = time.time()
    verdict = active()
    sealed = fleet.seal(key, verdict, now + 60, now + 90)
    opened = fleet.open(key, sealed, now)
    assert opened is not None and opened.verdict == verdict
    assert opened.fresh_until == pytest.approx(now + 60, abs=0.002)
    assert b"tok-a" not in sealed

    # Every single-byte change, anywhere, is refused and counted.
    refused = 0
    for i in range(len(sealed)):
        forged = sealed[:i] + bytes([sealed[i] ^ 0x01]) + sealed[i + 1 :]
        got = fleet.open(key, forged, now)
        assert got is None or (got.verdict == verdict and i < sealed.index(b"|"))
        refused += got is None
    assert refused >= len(sealed) - len(sealed[: sealed.index(b"|")])
    assert metrics.shared_hmac_failures.labels().value >= refused

    # A genuine value moved to another token's key, or sealed with another secret or for
    # another service, is not a verdict.
    assert fleet.open(token_key("tok-b"), sealed, now) is None
    other = FleetCache(store, replace(shared_cfg(redis_server), secret=b"z" * 32), metrics)
    assert other.open(key, sealed, now) is None
    elsewhere = Store(shared_cfg(redis_server), metrics, service="0123456789abcdef")
    assert FleetCache(elsewhere, shared_cfg(redis_server), metrics).open(key, sealed, now) is None
    # Replayed after its end: not believed either (no HMAC failure: it is ours, just over).
    assert fleet.open(key, sealed, now + 95) is None
    await store.close()
    await elsewhere.close()


async def test_negative_verdicts_seal_too(redis_server: RedisServer) -> None:
    metrics = Metrics()
    store = Store(shared_cfg(redis_server), metrics)
    fleet = FleetCache(store, shared_cfg(redis_server), metrics)
    key = token_key("tok-n")
    verdict = Inactive("UNAUTHORIZED", 'Bearer error="invalid_token"')
    opened = fleet.open(
        key, fleet.seal(key, verdict, time.time() + 5, time.time() + 5), time.time()
    )
    assert opened is not None and opened.verdict == verdict
    await store.close()


# --------------------------------------------------------------------------- the lock


async def test_get_or_lock_gives_the_lock_to_one_replica(redis_server: RedisServer) -> None:
    metrics = Metrics()
    stores = [Store(shared_cfg(redis_server), metrics) for _ in range(3)]
    fleets = [FleetCache(s, shared_cfg(redis_server), metrics) for s in stores]
    for s in stores:
        await s.start()
    key = token_key("tok-lock")
    looks = await asyncio.gather(*(f.get_or_lock(key) for f in fleets))
    assert sorted(look.status for look in looks) == [LOCKED, HELD, HELD]
    holder = fleets[[look.status for look in looks].index(LOCKED)]
    assert await holder.put(key, active(), 60, 60, looks[0].started)
    for fleet in fleets:
        look = await fleet.get_or_lock(key)
        assert look.status == FRESH and look.found is not None
        assert look.found.verdict.subject == "alice"  # type: ignore[union-attr]
    for f, s in zip(fleets, stores, strict=True):
        f.close()
        await s.close()


# --------------------------------------------------------------------------- two levels


async def test_one_call_per_token_across_replicas_and_the_second_level_answers(
    replicas: Callable[..., Awaitable[Replica]],
) -> None:
    authlete = Authlete()
    authlete.delay = 0.05
    tokens = [f"tok-{i}" for i in range(20)]
    for i, token in enumerate(tokens):
        authlete.verdicts[token] = active(subject=f"user-{i}")
    fleet = [await replicas(authlete) for _ in range(3)]
    answers = await asyncio.gather(
        *(v.lookup(token) for token in tokens for v, _, _ in fleet for _ in range(2))
    )
    assert all(isinstance(verdict, Active) for verdict, _ in answers)
    assert authlete.calls == dict.fromkeys(tokens, 1)
    shared_hits = sum(count(m, "shared_hit") for _, _, m in fleet)
    assert shared_hits > 0
    assert sum(m.shared_lock_waits.labels().value for _, _, m in fleet) > 0
    # From now on the local level answers without Redis or Authlete.
    for v, _, m in fleet:
        before = count(m, "hit")
        assert (await v.lookup(tokens[0]))[1] == "hit"
        assert count(m, "hit") == before + 1


async def test_local_level_lives_local_ttl_then_asks_redis_not_authlete(
    replicas: Callable[..., Awaitable[Replica]],
) -> None:
    authlete = Authlete()
    authlete.verdicts["tok"] = active()
    v1, _, _ = await replicas(authlete, local_ttl=0.2)
    v2, _, m2 = await replicas(authlete, local_ttl=0.2)
    assert (await v1.lookup("tok"))[1] == "miss"
    assert (await v2.lookup("tok"))[1] == "shared_hit"
    assert (await v2.lookup("tok"))[1] == "hit"
    await asyncio.sleep(0.3)
    assert (await v2.lookup("tok"))[1] == "shared_hit"
    assert authlete.calls == {"tok": 1}
    assert count(m2, "shared_hit") == 2


async def test_local_level_never_outlives_the_token(
    replicas: Callable[..., Awaitable[Replica]],
) -> None:
    authlete = Authlete()
    authlete.verdicts["tok"] = active(life=0.4)
    v1, _, _ = await replicas(authlete, local_ttl=30)
    assert isinstance((await v1.lookup("tok"))[0], Active)
    await asyncio.sleep(0.5)
    authlete.verdicts["tok"] = Inactive("UNAUTHORIZED", "x")
    verdict, result = await v1.lookup("tok")
    assert isinstance(verdict, Inactive) and result == "miss"


async def test_negative_verdicts_are_shared(replicas: Callable[..., Awaitable[Replica]]) -> None:
    authlete = Authlete()
    v1, _, _ = await replicas(authlete)
    v2, _, m2 = await replicas(authlete)
    assert isinstance((await v1.lookup("nope"))[0], Inactive)
    verdict, result = await v2.lookup("nope")
    assert isinstance(verdict, Inactive) and result == "shared_negative_hit"
    assert authlete.calls == {"nope": 1}
    assert count(m2, "shared_negative_hit") == 1


async def test_forged_value_in_redis_is_a_miss_never_an_allow(
    replicas: Callable[..., Awaitable[Replica]],
) -> None:
    authlete = Authlete()
    v1, store, m1 = await replicas(authlete)
    key = store.key("v", token_key("guessed").hex())
    fresh = int((time.time() + 600) * 1000)
    forged = f"{fresh}|1".encode() + b"A" * 32 + f"A\x00{fresh}\x00{fresh}".encode()
    await store.redis.set(key, forged + b"\x00999999999999999\x00mallory\x001\x00admin")
    verdict, result = await v1.lookup("guessed")
    assert isinstance(verdict, Inactive) and result == "miss"
    assert authlete.calls == {"guessed": 1}
    assert m1.shared_hmac_failures.labels().value == 1


# --------------------------------------------------------------------------- purges


async def test_purge_by_token_reaches_every_replica(
    replicas: Callable[..., Awaitable[Replica]],
) -> None:
    authlete = Authlete()
    authlete.verdicts["tok"] = active()
    fleet = [await replicas(authlete) for _ in range(3)]
    for v, _, _ in fleet:
        await v.lookup("tok")
    assert all(v.cache.peek(token_key("tok")) is not None for v, _, _ in fleet)
    authlete.verdicts["tok"] = Inactive("UNAUTHORIZED", "revoked")
    result = await fleet[0][0].purge("token", "tok")
    assert result.fleet and result.shared and result.purged >= 2  # local + Redis
    for v, _, _ in fleet:
        cache = v.cache
        await wait_until(lambda: cache.peek(token_key("tok")) is None, 1.0, "purged")  # noqa: B023
        verdict, _ = await v.lookup("tok")
        assert isinstance(verdict, Inactive)


@pytest.mark.parametrize(("kind", "value"), [("subject", "alice"), ("client_id", "42")])
async def test_purge_by_subject_or_client_reaches_every_replica(
    replicas: Callable[..., Awaitable[Replica]], kind: str, value: str
) -> None:
    authlete = Authlete()
    authlete.verdicts["t1"] = active("alice", "42")
    authlete.verdicts["t2"] = active("alice", "42")
    authlete.verdicts["bob"] = active("bob", "7")
    fleet = [await replicas(authlete) for _ in range(2)]
    for v, _, _ in fleet:
        for token in ("t1", "t2", "bob"):
            await v.lookup(token)
    result = await fleet[1][0].purge(kind, value)
    assert result.fleet
    await asyncio.sleep(0.1)
    for v, _, _ in fleet:
        assert v.cache.peek(token_key("t1")) is None
        assert v.cache.peek(token_key("t2")) is None
        assert v.cache.peek(token_key("bob")) is not None
    # Redis forgot them too: the next lookup is a call, bob's a hit.
    calls = dict(authlete.calls)
    await fleet[0][0].lookup("t1")
    assert authlete.calls["t1"] == calls["t1"] + 1


async def test_a_call_started_before_a_purge_stores_nothing(
    replicas: Callable[..., Awaitable[Replica]],
) -> None:
    authlete = Authlete()
    authlete.verdicts["tok"] = active()
    authlete.delay = 0.3
    v1, _, _ = await replicas(authlete)
    v2, _, _ = await replicas(authlete)
    pending = asyncio.ensure_future(v1.lookup("tok"))
    await asyncio.sleep(0.1)  # the call is out
    await v2.purge("token", "tok")
    verdict, _ = await pending  # answered: it began before the purge...
    assert isinstance(verdict, Active)
    # ...but neither level kept it, on either replica.
    assert v1.cache.peek(token_key("tok")) is None
    authlete.delay = 0.0
    assert (await v2.lookup("tok"))[1] == "miss"
    assert authlete.calls["tok"] == 2


async def test_without_shared_purge_is_local(replicas: Callable[..., Awaitable[Replica]]) -> None:
    authlete = Authlete()
    authlete.verdicts["tok"] = active()
    alone = Verdicts(CacheConfig(), authlete.introspect, Metrics(), deadline=3.0)
    await alone.lookup("tok")
    result = await alone.purge("token_sha256", token_key("tok").hex())
    assert (result.purged, result.fleet, result.shared) == (1, False, False)
    assert alone.cache.peek(token_key("tok")) is None


# --------------------------------------------------------------------------- fallback


async def test_redis_down_carries_on_alone_and_never_allows_an_unknown_token(
    replicas: Callable[..., Awaitable[Replica]], redis_server: RedisServer
) -> None:
    authlete = Authlete()
    authlete.verdicts["known"] = active()
    v1, store, metrics = await replicas(authlete, timeout=0.2)
    await v1.lookup("known")
    redis_server.pause()
    try:
        started = time.monotonic()
        verdict, result = await v1.lookup("fresh-one")
        assert isinstance(verdict, Inactive) and result == "miss"
        assert time.monotonic() - started < 1.0
        assert not store.shared
        assert metrics.shared_mode.labels("fallback")._value.get() == 1
        authlete.verdicts["new"] = active()
        assert isinstance((await v1.lookup("new"))[0], Active)  # fallback: Authlete alone
        assert (await v1.lookup("known"))[1] == "hit"
    finally:
        redis_server.resume()
    await wait_until(lambda: store.shared, 5.0, "back in shared mode")


async def test_purges_missed_while_away_clear_the_local_level(
    replicas: Callable[..., Awaitable[Replica]], redis_server: RedisServer
) -> None:
    authlete = Authlete()
    authlete.verdicts["tok"] = active()
    v1, store1, _ = await replicas(authlete, timeout=0.2, local_ttl=60)
    v2, _, _ = await replicas(authlete)
    await v1.lookup("tok")
    # v1 loses Redis (its connections cut), a purge happens meanwhile on v2.
    await store1.close()  # stands for a network cut: v1 hears nothing
    store1._closing = False
    store1._failed("connection")
    await v2.purge("token", "tok")
    assert v1.cache.peek(token_key("tok")) is not None  # it could not hear the purge
    await store1._probe_until_back()
    assert store1.shared
    assert v1.cache.peek(token_key("tok")) is None


# --------------------------------------------------------------------------- the local cache


def test_cache_delete_and_delete_matching() -> None:
    cache = VerdictCache(100, 10, 5.0)
    now = time.time()
    cache.put_active(b"a", Active("alice", "1", (), "", now + 60), 60)
    cache.put_active(b"b", Active("alice", "2", (), "", now + 60), 60)
    cache.put_active(b"c", Active("bob", "1", (), "", now + 60), 60)
    cache.put_active(b"d", Active(None, "3", (), "", now + 60), 60)
    cache.put_negative(b"n", Inactive("UNAUTHORIZED", "x"))
    assert cache.delete_matching(subject="alice") == 2
    assert cache.peek(b"a") is None and cache.peek(b"c") is not None
    assert cache.delete_matching(client_id="1") == 1
    assert cache.peek(b"c") is None and cache.peek(b"d") is not None
    assert cache.delete(b"n") == 1 and cache.peek(b"n") is None
    assert cache.delete(b"n") == 0
    assert cache.delete(b"d") == 1 and not cache.was_active(b"d")


def test_put_stale_only_answers_get_stale() -> None:
    cache = VerdictCache(100, 10, 5.0, stale_if_error=30)
    verdict = Active("alice", "1", (), "", time.time() + 60)
    cache.put_stale(b"s", verdict)
    assert cache.get(b"s") is None
    assert cache.get_stale(b"s") == verdict
    # Never over a live entry, and not at all without stale_if_error.
    cache.put_active(b"live", verdict, 60)
    cache.put_stale(b"live", Active("mallory", "1", (), "", time.time() + 60))
    assert cache.peek(b"live") == verdict
    plain = VerdictCache(100, 10, 5.0)
    plain.put_stale(b"s", verdict)
    assert plain.get_stale(b"s") is None


async def test_introspection_errors_reach_every_waiter_and_release_the_lock(
    replicas: Callable[..., Awaitable[Replica]],
) -> None:
    calls = 0

    async def failing(
        token: str, deadline: float, on_send: Callable[[], None], priority: Priority
    ) -> Verdict:
        nonlocal calls
        calls += 1
        on_send()
        raise IntrospectionError("error", "Authlete answered HTTP 500")

    authlete = Authlete()
    v1, _, _ = await replicas(authlete)
    v1._introspect = failing
    with pytest.raises(IntrospectionError):
        await v1.lookup("tok")
    # The lock is free again at once: a second try calls again, no wait for LOCK_TTL.
    started = time.monotonic()
    with pytest.raises(IntrospectionError):
        await v1.lookup("tok")
    assert time.monotonic() - started < 0.5
    assert calls == 2


# --------------------------------------------------------------------------- how to reach Redis


async def _round_trip(cfg: SharedConfig) -> bool:
    store = Store(cfg, Metrics(), service=SERVICE)
    try:
        await store.start()
        if not store.shared:
            return False
        await store.call("set", lambda r: r.set(store.key("probe", "x"), b"1", px=1000))
        return bool(await store.call("get", lambda r: r.get(store.key("probe", "x"))))
    finally:
        await store.close()


async def test_unix_socket_url(tmp_path: Path) -> None:
    with start_redis(unix_socket=str(tmp_path / "redis.sock")) as server:
        assert server.unix_url is not None
        cfg = SharedConfig(redis_url=server.unix_url, secret=SECRET, timeout=1.0)
        assert await _round_trip(cfg)


async def test_password_and_acl_user_from_the_url(redis_server: RedisServer) -> None:
    redis_server.cli("ACL", "SETUSER", "gw", "on", ">pw-for-gw", "~*", "&*", "+@all")
    port = redis_server.port
    good = SharedConfig(redis_url=f"redis://gw:pw-for-gw@127.0.0.1:{port}/0", secret=SECRET)
    assert await _round_trip(good)
    wrong = SharedConfig(redis_url=f"redis://gw:wrong@127.0.0.1:{port}/0", secret=SECRET)
    assert not await _round_trip(wrong)  # refused: fallback mode, never a crash


async def test_rediss_with_a_private_ca(tmp_path: Path) -> None:
    need_tool("redis-server")
    ca = make_ca(tmp_path, "redis-ca")
    leaf = issue(ca, tmp_path, "redis")
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(leaf.cert),
            "--tls-key-file",
            str(leaf.key),
            "--tls-ca-cert-file",
            str(ca.cert),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"rediss://127.0.0.1:{port}/0"
        cfg = SharedConfig(redis_url=url, secret=SECRET, ca_file=str(ca.cert), timeout=1.0)
        for _ in range(100):  # until it listens
            if await _round_trip(cfg):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no TLS round trip with the private CA")
        # Without the CA, the server's certificate is not trusted: fallback, not a connection.
        assert not await _round_trip(replace(cfg, ca_file=None))
    finally:
        proc.terminate()
        proc.wait(10)
