"""Several upstream endpoints behind one route: round robin or least requests, passive
health (ejection after connect failures in a row), connect retries on another endpoint,
and host names re-resolved so every address they resolve to is an endpoint.

A `Balancer` is a `Pool` to the exchange (`acquire`, `open`, `host_header`): it picks an
endpoint pool in `acquire` and opens to the same one in `open` (the exchange calls the two
back to back, synchronously). Nothing here awaits on the request path; resolving runs as a
background task, at most once per `dns_ttl`, started by a request that finds the answer
stale (until the first answer, a name is connected to as it is, resolved by the system).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence

from gateway.config import Upstream
from gateway.upstream import (
    MAX_CONNECTION_AGE,
    ConnectFailed,
    EndpointStats,
    Pool,
    Receiver,
    UpstreamConnection,
)

log = logging.getLogger("gateway.upstream")

EJECT_AFTER = 3  # connect failures (refused or timed out) in a row take an endpoint out
EJECT_SECONDS = 10.0  # for this long; then the next request picked for it probes it
MAX_CONNECT_ATTEMPTS = 3  # per request, each to a different endpoint
# A connect attempt that has another endpoint to fall back to waits at most this long (the
# last one waits the route's timeout, as a route with one endpoint does).
CONNECT_TIMEOUT = 5.0
DNS_TTL = 5.0

Resolve = Callable[[str, int], Awaitable[Sequence[str]]]


async def system_resolve(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host, in its order, once each."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Balancer(Pool):
    """Every endpoint of one route's upstream list (its first URL gives the Host header)."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        ssl_context: ssl.SSLContext | None,
        balance: str,
        stats_for: Callable[[Upstream], EndpointStats],
        *,
        resolve: Resolve = system_resolve,
        dns_ttl: float = DNS_TTL,
        max_age: float = MAX_CONNECTION_AGE,
    ) -> None:
        super().__init__(upstreams[0], ssl_context, max_age=max_age)
        self.upstreams = tuple(upstreams)
        self.least_requests = balance == "least_requests"
        self.stats_for = stats_for
        self.resolve = resolve
        self.dns_ttl = dns_ttl
        self.ssl_context = ssl_context
        # (configured endpoint, address or None) -> its pool; None: connect to the name.
        self.pools: dict[tuple[Upstream, str | None], Pool] = {}
        self.endpoints: list[Pool] = [self._pool(u, None) for u in self.upstreams]
        self._mark_alternatives()
        self.names = [u for u in self.upstreams if not is_address(u.host)]
        self.resolve_at = 0.0 if self.names else float("inf")
        self.resolving: asyncio.Task[None] | None = None
        self.resolved = False  # an answer came (until then, names are connected to as such)
        self.next = 0
        self.picked: Pool | None = None

    def _pool(self, upstream: Upstream, address: str | None) -> Pool:
        pool = self.pools.get((upstream, address))
        if pool is None:
            pool = self.pools[upstream, address] = Pool(
                upstream,
                self.ssl_context,
                address=address,
                stats=self.stats_for(upstream),
                max_age=self.max_age,
            )
            pool.eject_after = EJECT_AFTER
            pool.cooldown = EJECT_SECONDS
        return pool

    def _mark_alternatives(self) -> None:
        several = len(self.endpoints) > 1
        for pool in self.endpoints:
            pool.alternatives = several

    def configure(self, dns_ttl: float, max_age: float) -> None:
        """A reload's settings (the endpoints and their connections stay)."""
        self.dns_ttl = dns_ttl
        self.max_age = max_age or float("inf")
        for pool in self.pools.values():
            pool.max_age = self.max_age
        if self.names:
            self.resolve_at = min(self.resolve_at, time.monotonic() + dns_ttl)

    # ------------------------------------------------------------------ picking
    def pick(self, avoid: Sequence[Pool] = ()) -> Pool | None:
        """The next endpoint: not ejected, not in avoid; when every one left is ejected, the
        one back soonest (better a try than a certain 502); None when all are in avoid."""
        now = time.monotonic()
        if now >= self.resolve_at and self.resolving is None and not self.closed:
            self.resolve_at = now + self.dns_ttl
            self.resolving = asyncio.get_running_loop().create_task(self._refresh())
        endpoints = self.endpoints
        n = len(endpoints)
        start = self.next
        best: Pool | None = None
        fallback: Pool | None = None
        for k in range(n):
            i = (start + k) % n
            pool = endpoints[i]
            if pool in avoid:
                continue
            if pool.ejected_until > now:
                if fallback is None or pool.ejected_until < fallback.ejected_until:
                    fallback = pool
                continue
            if not self.least_requests:
                self.next = i + 1
                return pool
            if best is None or pool.active < best.active:
                best = pool
        self.next = start + 1 if start + 1 < n else 0
        return best or fallback

    def acquire(self, avoid: Sequence[Pool] = ()) -> UpstreamConnection | None:
        # The common case first: round robin, the next endpoint is in, nothing to avoid.
        i = self.next
        endpoints = self.endpoints
        if i >= len(endpoints):
            i = 0
        pool = endpoints[i]
        now = time.monotonic()
        if (
            not avoid
            and not self.least_requests
            and pool.ejected_until <= now
            and now < self.resolve_at
        ):
            self.next = i + 1
            self.picked = pool
            idle = pool.idle  # Pool.acquire, inlined: this is the hot path
            while idle:
                conn = idle.pop()
                if (
                    conn.reusable
                    and now - conn.idle_since < pool.max_idle
                    and now - conn.born < pool.max_age
                ):
                    return conn
                conn.close()
            return None
        picked = self.picked = self.pick(avoid)
        return picked.acquire() if picked is not None else None

    def open(self, receiver: Receiver, timeout: float) -> asyncio.Task[None]:
        first, self.picked = self.picked, None
        return asyncio.get_running_loop().create_task(self._open_any(receiver, timeout, first))

    def reconnect(self, receiver: Receiver, timeout: float, failed: Pool | None) -> None:
        conn = self.acquire((failed,) if failed is not None else ())
        if conn is not None:
            receiver.upstream_ready(conn)
        else:
            self.open(receiver, timeout)

    async def _open_any(self, receiver: Receiver, timeout: float, pool: Pool | None) -> None:
        """Connect to pool; on a connect failure (nothing was sent), to another endpoint."""
        resolving = self.resolving
        if resolving is not None and not self.resolved:
            # The first answer is on its way: wait for it rather than ask the system.
            await asyncio.shield(resolving)
        if pool is None or pool.closed:  # replaced by an answer meanwhile
            pool = self.pick()
        tried: list[Pool] = []
        kind = "refused"
        while pool is not None and len(tried) < MAX_CONNECT_ATTEMPTS:
            tried.append(pool)
            last = len(tried) == MAX_CONNECT_ATTEMPTS or len(tried) >= len(self.endpoints)
            try:
                conn = await pool.connect(timeout if last else min(timeout, CONNECT_TIMEOUT))
            except ConnectFailed as exc:
                kind = exc.kind
                pool = None if last else self.pick(tried)
                continue
            receiver.upstream_ready(conn)
            return
        receiver.upstream_failed(kind, False)

    # ------------------------------------------------------------------ resolving
    async def _refresh(self) -> None:
        try:
            endpoints: list[Pool] = []
            for upstream in self.upstreams:
                if upstream not in self.names:
                    endpoints.append(self._pool(upstream, None))
                    continue
                try:
                    addresses = await self.resolve(upstream.host, upstream.port)
                except (OSError, UnicodeError) as exc:
                    addresses = []
                    log.warning("upstream %s: cannot resolve: %s", upstream.origin, exc)
                if not addresses:  # keep what it resolved to before
                    endpoints += [p for p in self.endpoints if p.upstream == upstream]
                    continue
                endpoints += [self._pool(upstream, a) for a in addresses]
            if self.closed:
                return
            for key, pool in list(self.pools.items()):
                if pool not in endpoints:  # gone from DNS: busy connections finish first
                    pool.close()
                    del self.pools[key]
            self.endpoints = endpoints
            self._mark_alternatives()
            self.resolved = True
        finally:
            self.resolving = None

    # ------------------------------------------------------------------ Pool's duties
    def sweep(self, now: float) -> None:
        for pool in self.endpoints:
            pool.sweep(now)

    def close(self) -> None:
        self.closed = True
        if self.resolving is not None:
            self.resolving.cancel()
        for pool in self.pools.values():
            pool.close()

    @property
    def opened_total(self) -> int:
        return sum(p.opened for p in self.pools.values())
