"""Forwarding: headers in and out, bodies streamed both ways, upstream faults to 502/504."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Iterable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

from gateway.config import HOP_BY_HOP, HeadersConfig, IPNetwork
from gateway.introspection import Active

log = logging.getLogger("gateway.proxy")

_X_FORWARDED_FOR = istr("X-Forwarded-For")
_X_FORWARDED_PROTO = istr("X-Forwarded-Proto")
_X_FORWARDED_HOST = istr("X-Forwarded-Host")
# Set by the proxy itself; a client's copy is never passed on.
_REPLACED = frozenset({"host", "x-forwarded-proto", "x-forwarded-host", "expect", "content-length"})
# Forwarding claims dropped from untrusted peers (X-Forwarded-For is extended, see below).
_FORWARDING = frozenset(
    {
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-forwarded-uri",
        "x-forwarded-method",
        "x-original-uri",
        "x-original-url",
        "x-rewrite-url",
        "x-real-ip",
        "forwarded",
    }
)
# Headers the HTTP client must not invent: the upstream sees the client's own.
SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


class UpstreamError(Exception):
    """`kind` is one of refused, reset, timeout, protocol; a bounded metric label."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _fold(name: str) -> str:
    return name.lower().replace("_", "-")


def connection_tokens(values: Iterable[str]) -> frozenset[str]:
    """Header names listed in Connection are hop-by-hop for this message only."""
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


class HeaderPolicy:
    """What goes upstream: the client's end-to-end headers minus anything that claims identity,
    and forwarding headers believed only from trusted proxies."""

    def __init__(self, names: HeadersConfig, trusted_proxies: tuple[IPNetwork, ...] = ()) -> None:
        self.subject = names.subject
        self.scopes = names.scopes
        self.client_id = names.client_id
        self._identity = frozenset(_fold(n) for n in (names.subject, names.scopes, names.client_id))
        self._drop_request = HOP_BY_HOP | _REPLACED | {"x-forwarded-for"}
        self._drop_untrusted = self._drop_request | _FORWARDING
        self._passes_trusted: dict[str, bool] = {}
        self._passes_untrusted: dict[str, bool] = {}
        self._trusted_networks = trusted_proxies
        self._trusted: dict[str, bool] = {}

    def trusts(self, peer: str | None) -> bool:
        if not peer:
            return False
        known = self._trusted.get(peer)
        if known is None:
            try:
                address = ipaddress.ip_address(peer)
            except ValueError:
                known = False
            else:
                known = any(address in net for net in self._trusted_networks)
            if len(self._trusted) > 4096:
                self._trusted.clear()  # bounded; recomputing is cheap
            self._trusted[peer] = known
        return known

    def upstream_headers(
        self, request: web.BaseRequest, identity: Active | None
    ) -> CIMultiDict[str]:
        inbound = request.headers
        peer = request.remote or ""
        trusted = self.trusts(peer)
        drop = self._drop_request if trusted else self._drop_untrusted
        listed = (
            connection_tokens(inbound.getall("Connection", ())) if "Connection" in inbound else None
        )
        # Whether a header name passes depends only on the name (and on trust): decided
        # once per spelling and remembered, a bounded number of spellings per process.
        passes = self._passes_trusted if trusted else self._passes_untrusted
        kept: list[tuple[str, str]] = []
        for name, value in inbound.items():
            ok = passes.get(name)
            if ok is None:
                lower = name.lower()
                ok = lower not in drop and _fold(lower) not in self._identity
                if len(passes) < 1024:
                    passes[name] = ok
            if ok and (listed is None or name.lower() not in listed):
                kept.append((name, value))
        out: CIMultiDict[str] = CIMultiDict(kept)
        if "Content-Length" in inbound and "Transfer-Encoding" not in inbound:
            out["Content-Length"] = inbound["Content-Length"]
        # X-Forwarded-For: the chain as received plus the peer we saw, so its last entry
        # is always a fact; nothing here ever decides anything on the earlier entries.
        prior = inbound.getall(_X_FORWARDED_FOR, ())
        out[_X_FORWARDED_FOR] = ", ".join([*prior, peer]) if prior else peer
        if trusted:
            # A proxy we trust terminated the client's connection: its view of the
            # scheme and host is the real one.
            out[_X_FORWARDED_PROTO] = inbound.get(_X_FORWARDED_PROTO) or request.scheme
            host = inbound.get(_X_FORWARDED_HOST) or inbound.get("Host")
        else:
            # Anyone else could claim any scheme or host: only what we saw goes on.
            out[_X_FORWARDED_PROTO] = request.scheme
            host = inbound.get("Host")
        if host:
            out[_X_FORWARDED_HOST] = host
        if identity is not None:
            if identity.subject is not None:
                out[self.subject] = identity.subject
            out[self.scopes] = identity.scope_header
            out[self.client_id] = identity.client_id
        return out


def copy_response_headers(upstream: CIMultiDictProxy[str], out: CIMultiDict[str]) -> None:
    """The upstream's end-to-end headers, in order and with duplicates, into `out`."""
    listed = (
        connection_tokens(upstream.getall("Connection", ())) if "Connection" in upstream else None
    )
    add = out.add
    for name, value in upstream.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or (listed is not None and lower in listed):
            continue
        add(name, value)


class _PassThrough(web.StreamResponse):
    """aiohttp gives an untyped body `Content-Type: application/octet-stream`; a proxy must
    pass the upstream's headers unchanged (clients may sniff an untyped body)."""

    untyped = False

    def hold_headers(self) -> None:
        self._send_headers_immediately = False

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        if self.untyped:
            self.headers.popall("Content-Type", None)


class BodyGuard:
    """The client's body as it streams upstream, held to the route's size limit and to the
    idle timeout (a client that stops sending mid-body cannot hold a connection forever)."""

    __slots__ = ("_idle", "_limit", "_stream", "stalled", "too_large")

    def __init__(self, stream: aiohttp.StreamReader, limit: int, idle: float) -> None:
        self._stream = stream
        self._limit = limit
        self._idle = idle
        self.too_large = False
        self.stalled = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        total = 0
        while True:
            try:
                chunk = await asyncio.wait_for(self._stream.readany(), self._idle)
            except TimeoutError:
                self.stalled = True
                raise BodyRefused("client body stalled") from None
            if not chunk:
                return
            total += len(chunk)
            if self._limit and total > self._limit:
                self.too_large = True
                raise BodyRefused("client body too large")
            yield chunk


class BodyRefused(Exception):
    pass


async def forward(
    request: web.BaseRequest,
    session: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    timeout: aiohttp.ClientTimeout,
    request_id: str,
    body: BodyGuard | None,
) -> web.StreamResponse:
    """Stream the request to `url` and the answer back.

    Raises UpstreamError before the response has started; after that a fault cuts the
    client connection instead, and the (already sent) response is returned.
    """
    if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
        # The token is good: let the client send its body now instead of after its own timeout.
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    try:
        upstream = await session.request(
            request.method,
            url,
            headers=headers,
            data=body,
            allow_redirects=False,
            timeout=timeout,
            skip_auto_headers=SKIP_AUTO_HEADERS,
        )
    except TimeoutError:
        raise UpstreamError("timeout") from None
    except aiohttp.ClientConnectorError:
        raise UpstreamError("refused") from None
    except (aiohttp.ClientResponseError, aiohttp.ClientPayloadError):
        raise UpstreamError("protocol") from None
    except (aiohttp.ClientError, OSError, BodyRefused):
        raise UpstreamError("reset") from None
    try:
        response = _PassThrough(status=upstream.status, reason=upstream.reason)
        copy_response_headers(upstream.headers, response.headers)
        response.untyped = "Content-Type" not in upstream.headers
        response.headers["X-Request-Id"] = request_id
        # A small answer is often complete by now: hold the headers back and send them
        # with the body in one write, instead of one write for each.
        complete = upstream.content.is_eof()
        if complete:
            response.hold_headers()
        await response.prepare(request)
    except ValueError:
        # aiohttp's client accepts control characters in a status line or header value
        # that its server refuses to send on: an invalid upstream response, nothing sent yet.
        upstream.close()
        raise UpstreamError("protocol") from None
    except (aiohttp.ClientError, OSError):
        upstream.close()  # the client went away before the headers could go out
        raise
    try:
        if complete:
            await response.write_eof(await upstream.content.read())
            return response
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        # The status line is gone already: all we can honestly do is cut the connection,
        # so the client sees a truncated message instead of a complete wrong one.
        log.info("response stream cut: %s", type(exc).__name__)
        upstream.close()
        if request.transport is not None:
            request.transport.abort()
        return response
    finally:
        upstream.release()
