"""TLS: the proxy listener (versions, client certificates, reload on SIGHUP), verified https
upstreams, and Authlete over https. Certificates are made per session by tests/certs.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import Gateway
from gateway.config import ConfigError
from gateway.echo import echo_app
from gateway.emulator import Emulator
from gateway.tls import TLSError
from tests.certs import Pair, issue, make_ca, self_signed
from tests.conftest import SERVICE_ID, SERVICE_TOKEN, StartGateway, gateway_run, make_config

ROUTES_PUBLIC = "public"


@dataclass(frozen=True)
class Pki:
    ca: Pair
    other_ca: Pair
    server: Pair  # CN gateway-one, serial 1001
    server2: Pair  # CN gateway-two, serial 2002
    client: Pair  # clientAuth, signed by `ca`
    rogue_client: Pair  # clientAuth, signed by `other_ca`
    upstream: Pair  # serverAuth for 127.0.0.1, signed by `ca`
    wrong_host: Pair  # serverAuth for other.example only, signed by `ca`
    self_signed: Pair  # serverAuth for 127.0.0.1, its own issuer


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "test-ca")
    other = make_ca(d, "other-ca")
    return Pki(
        ca=ca,
        other_ca=other,
        server=issue(ca, d, "server", cn="gateway-one", serial=1001),
        server2=issue(ca, d, "server2", cn="gateway-two", serial=2002),
        client=issue(ca, d, "client", cn="good-client", client=True),
        rogue_client=issue(other, d, "rogue", cn="rogue-client", client=True),
        upstream=issue(ca, d, "upstream", cn="upstream"),
        wrong_host=issue(ca, d, "wrong-host", san="DNS:other.example"),
        self_signed=self_signed(d, "self-signed"),
    )


def tls_config(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key), **extra}


def public_route(upstream: str) -> dict[str, Any]:
    return {"name": "public", "path_prefix": "/public", "upstream": upstream, "auth": "none"}


def client_context(
    pki: Pki,
    cert: Pair | None = None,
    maximum: ssl.TLSVersion | None = None,
    trust: Path | None = None,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(trust or pki.ca.cert))
    if maximum is not None:
        ctx.maximum_version = maximum
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


@dataclass
class TlsReply:
    status: int | None  # None: no HTTP answer (handshake or connection refused)
    data: bytes
    version: str | None = None
    peer: dict[str, Any] | None = None

    def json(self) -> Any:
        return json.loads(self.data.partition(b"\r\n\r\n")[2])


async def tls_get(
    port: int, ctx: ssl.SSLContext, target: str = "/public/x", headers: list[str] | None = None
) -> TlsReply:
    """One request over TLS with `Connection: close`; failures to get an answer are a None
    status, whatever the layer they happen in."""
    lines = [f"GET {target} HTTP/1.1", "Host: gateway.test", "Connection: close", *(headers or [])]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"), 5
        )
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        return TlsReply(None, repr(exc).encode())
    sslobj = writer.get_extra_info("ssl_object")
    version = sslobj.version() if sslobj is not None else None
    peer = writer.get_extra_info("peercert")
    data = b""
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    except (ssl.SSLError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        data += repr(exc).encode()
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, OSError):
            await writer.wait_closed()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return TlsReply(status, data, version, peer)


def echoed_header(reply: TlsReply, name: str) -> list[str]:
    doc = reply.json()
    return [v for k, v in doc["headers"] if k.lower() == name.lower()]


# =========================================================================== the listener


async def test_tls_listener_serves_https_and_upstream_sees_https(
    start_gateway: StartGateway, upstream: str, emulator: Emulator, pki: Pki
) -> None:
    emulator.add_token("tls-tok", scopes=["s"])
    gw = await start_gateway(
        [
            public_route(upstream),
            {"name": "api", "path_prefix": "/api", "upstream": upstream, "scopes": ["s"]},
        ],
        tls=tls_config(pki),
    )
    reply = await tls_get(gw.port, client_context(pki))
    assert reply.status == 200, reply.data[:300]
    assert echoed_header(reply, "X-Forwarded-Proto") == ["https"]
    reply = await tls_get(
        gw.port,
        client_context(pki),
        "/api/x",
        ["Authorization: Bearer tls-tok", "X-Forwarded-Proto: http"],
    )
    assert reply.status == 200, reply.data[:300]
    assert echoed_header(reply, "X-Forwarded-Proto") == ["https"]
    assert reply.peer is not None
    assert dict(x[0] for x in reply.peer["subject"])["commonName"] == "gateway-one"


async def test_tls_listener_does_not_answer_plain_http(
    start_gateway: StartGateway, upstream: str, pki: Pki
) -> None:
    gw = await start_gateway([public_route(upstream)], tls=tls_config(pki))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"GET /public/x HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        data = b""
    finally:
        writer.close()
    assert not data.startswith(b"HTTP/1.1 200"), data[:200]


@pytest.mark.parametrize("stage", ["before-handshake", "after-handshake"])
async def test_tls_connection_that_never_sends_is_closed(
    start_gateway: StartGateway, upstream: str, pki: Pki, stage: str
) -> None:
    """limits.header_timeout holds on the TLS listener too, including for a client that
    never starts its handshake (a slowloris one layer down)."""
    gw = await start_gateway(
        [public_route(upstream)],
        tls=tls_config(pki),
        limits={"header_timeout": 1, "idle_timeout": 30},
    )
    if stage == "before-handshake":
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    else:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gw.port, ssl=client_context(pki), server_hostname="127.0.0.1"
        )
    started = time.monotonic()
    try:
        await asyncio.wait_for(reader.read(), 8)
        closed = True
    except (ConnectionError, ssl.SSLError):
        closed = True
    except TimeoutError:
        closed = False
    finally:
        writer.close()
    assert closed, f"still open after {time.monotonic() - started:.1f}s"


@contextlib.contextmanager
def _tls11_server(pki: Pki) -> Iterator[int]:
    """A bare TLS server that accepts TLS 1.1: the control showing our TLS 1.1 client works."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()
        thread.join(5)


def _tls11_client(pki: Pki) -> ssl.SSLContext:
    ctx = client_context(pki)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


async def test_tls_11_client_is_refused(
    start_gateway: StartGateway, upstream: str, pki: Pki
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with _tls11_server(pki) as port:
            control = await tls_get(port, _tls11_client(pki))
    if control.version != "TLSv1.1":
        pytest.skip(f"this OpenSSL cannot speak TLS 1.1 at all: {control.data[:200]!r}")
    gw = await start_gateway([public_route(upstream)], tls=tls_config(pki))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        reply = await tls_get(gw.port, _tls11_client(pki))
    assert reply.status is None and reply.version is None, reply
    assert (
        await tls_get(gw.port, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2))
    ).status == 200


async def test_min_version_13_refuses_tls_12(
    start_gateway: StartGateway, upstream: str, pki: Pki
) -> None:
    gw = await start_gateway([public_route(upstream)], tls=tls_config(pki, min_version="1.3"))
    refused = await tls_get(gw.port, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2))
    assert refused.status is None and refused.version is None, refused
    ok = await tls_get(gw.port, client_context(pki))
    assert ok.status == 200 and ok.version == "TLSv1.3", ok


async def test_default_min_version_accepts_tls_12(
    start_gateway: StartGateway, upstream: str, pki: Pki
) -> None:
    gw = await start_gateway([public_route(upstream)], tls=tls_config(pki))
    ok = await tls_get(gw.port, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2))
    assert ok.status == 200 and ok.version == "TLSv1.2", ok


CLIENT_AUTH_CASES = [
    # mode, client certificate, served?
    ("required", None, False),
    ("required", "client", True),
    ("required", "rogue_client", False),
    ("optional", None, True),
    ("optional", "client", True),
    ("optional", "rogue_client", False),
]


@pytest.mark.parametrize(
    ("mode", "cert", "served"),
    CLIENT_AUTH_CASES,
    ids=[f"{m}-{c or 'no-cert'}" for m, c, _ in CLIENT_AUTH_CASES],
)
@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, None], ids=["tls12", "tls13"])
async def test_client_certificates(
    start_gateway: StartGateway,
    upstream: str,
    pki: Pki,
    mode: str,
    cert: str | None,
    served: bool,
    maximum: ssl.TLSVersion | None,
) -> None:
    gw = await start_gateway(
        [public_route(upstream)],
        tls=tls_config(pki, client_ca_file=str(pki.ca.cert), client_auth=mode),
    )
    pair = getattr(pki, cert) if cert else None
    reply = await tls_get(gw.port, client_context(pki, pair, maximum))
    if served:
        assert reply.status == 200, reply.data[:300]
    else:
        assert reply.status is None, reply.data[:300]


# =========================================================================== configuration


def _tls_problems(pki: Pki, tmp_path: Path, **tls: Any) -> list[str]:
    upstream_tls = tls.pop("upstream_tls", None)
    overrides: dict[str, Any] = {"tls": tls} if tls else {}
    if upstream_tls is not None:
        overrides["upstream_tls"] = upstream_tls
    with pytest.raises(ConfigError) as info:
        make_config("http://127.0.0.1:9", [public_route("http://127.0.0.1:9")], **overrides)
    return info.value.problems


def _missing(tmp_path: Path) -> str:
    return str(tmp_path / "does-not-exist.pem")


CONFIG_CASES: list[tuple[str, Callable[[Pki, Path], dict[str, Any]], str]] = [
    (
        "cert-missing",
        lambda p, t: {"cert_file": _missing(t), "key_file": str(p.server.key)},
        "tls.cert_file: ",
    ),
    (
        "key-missing",
        lambda p, t: {"cert_file": str(p.server.cert), "key_file": _missing(t)},
        "tls.key_file: ",
    ),
    ("key-not-given", lambda p, t: {"cert_file": str(p.server.cert)}, "tls.key_file: "),
    (
        "required-without-ca",
        lambda p, t: {**tls_config(p), "client_auth": "required"},
        "tls.client_ca_file: ",
    ),
    (
        "optional-without-ca",
        lambda p, t: {**tls_config(p), "client_auth": "optional"},
        "tls.client_ca_file: ",
    ),
    (
        "ca-missing",
        lambda p, t: {**tls_config(p), "client_ca_file": _missing(t), "client_auth": "required"},
        "tls.client_ca_file: ",
    ),
    ("bad-mode", lambda p, t: {**tls_config(p), "client_auth": "maybe"}, "tls.client_auth: "),
    ("tls-1.1", lambda p, t: {**tls_config(p), "min_version": "1.1"}, "tls.min_version: "),
    (
        "upstream-ca-missing",
        lambda p, t: {"upstream_tls": {"ca_file": _missing(t)}},
        "upstream_tls.ca_file: ",
    ),
    (
        "skip-verify-not-bool",
        lambda p, t: {"upstream_tls": {"insecure_skip_verify": "yes please"}},
        "upstream_tls.insecure_skip_verify: ",
    ),
]


@pytest.mark.parametrize(
    ("build", "key"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_tls_config_errors_are_one_line_naming_the_key(
    pki: Pki, tmp_path: Path, build: Callable[[Pki, Path], dict[str, Any]], key: str
) -> None:
    problems = _tls_problems(pki, tmp_path, **build(pki, tmp_path))
    assert len(problems) == 1, problems
    assert problems[0].startswith(key), problems
    assert "\n" not in problems[0]


def test_check_config_reports_tls_problems_without_traceback(pki: Pki, tmp_path: Path) -> None:
    cfg = {
        "authlete": {
            "base_url": "https://authlete.example",
            "service_id": SERVICE_ID,
            "access_token": SERVICE_TOKEN,
        },
        "routes": [public_route("http://127.0.0.1:9")],
        "tls": {
            "cert_file": _missing(tmp_path),
            "key_file": str(pki.server.key),
            "client_auth": "required",
        },
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert sorted(line.split(":")[0] for line in lines) == ["tls.cert_file", "tls.client_ca_file"]
    assert "Traceback" not in done.stderr


async def test_unloadable_certificate_fails_start_naming_the_file_not_the_key(
    pki: Pki, tmp_path: Path, emulator: Emulator
) -> None:
    # The key passed as the certificate: readable, so the config is valid; loading fails.
    cfg = make_config(
        emulator.base_url,
        [public_route("http://127.0.0.1:9")],
        tls={"cert_file": str(pki.server.key), "key_file": str(pki.server.key)},
    )
    gw = Gateway(cfg)
    try:
        with pytest.raises(TLSError) as info:
            await gw.start()
    finally:
        await gw.stop()
    message = str(info.value)
    assert str(pki.server.key) in message
    key_text = pki.server.key.read_text()
    body = "".join(key_text.splitlines()[1:-1])
    assert body[:16] not in message and "PRIVATE KEY" not in message


# =========================================================================== reload


async def metric(session: aiohttp.ClientSession, admin: str, name: str) -> float:
    async with session.get(f"{admin}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _peer_cn(peer: dict[str, Any] | None) -> str | None:
    if not peer:
        return None
    return str(dict(x[0] for x in peer["subject"])["commonName"])


async def test_sighup_reloads_certificates_and_keeps_the_old_on_a_broken_file(
    tmp_path: Path, upstream: str, pki: Pki
) -> None:
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    cfg = {
        "authlete": {
            "base_url": "http://127.0.0.1:9",
            "allow_insecure_http": True,
            "service_id": SERVICE_ID,
            "access_token": SERVICE_TOKEN,
        },
        "routes": [public_route(upstream)],
        "tls": {"cert_file": str(cert), "key_file": str(key)},
    }
    ctx = client_context(pki)
    async with gateway_run(tmp_path, cfg) as gw:
        first = await tls_get(gw.port, ctx)
        assert first.status == 200, first.data[:300]
        assert _peer_cn(first.peer) == "gateway-one"
        assert first.peer is not None and first.peer["serialNumber"] == "03E9"

        # An open keep-alive connection from before the reload.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gw.port, ssl=ctx, server_hostname="127.0.0.1"
        )
        try:
            shutil.copy(pki.server2.cert, cert)
            shutil.copy(pki.server2.key, key)
            gw.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while True:
                now = await tls_get(gw.port, ctx)
                if _peer_cn(now.peer) == "gateway-two" or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert now.status == 200, now.data[:300]
            assert _peer_cn(now.peer) == "gateway-two", gw.stderr()[-2000:]
            assert now.peer is not None and now.peer["serialNumber"] == "07D2"
            # the old connection still works, with its own certificate
            writer.write(b"GET /public/old HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert _peer_cn(writer.get_extra_info("peercert")) == "gateway-one"
        finally:
            writer.close()

        # A broken certificate: the reload is refused, the current certificate keeps serving.
        cert.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        gw.proc.send_signal(signal.SIGHUP)
        errors = 0.0
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 10
            while errors < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                errors = await metric(
                    session, gw.admin_url, 'gateway_config_reloads_total{result="error"}'
                )
            successes = await metric(
                session, gw.admin_url, 'gateway_config_reloads_total{result="success"}'
            )
        assert errors == 1, gw.stderr()[-2000:]
        assert successes == 1
        after = await tls_get(gw.port, ctx)
        assert after.status == 200, after.data[:300]
        assert _peer_cn(after.peer) == "gateway-two"
    stderr = gw.stderr()
    assert gw.proc.returncode == 0, stderr
    assert "config reload rejected" in stderr and str(cert) in stderr, stderr
    assert "Traceback" not in stderr, stderr


# =========================================================================== upstream TLS


@pytest.fixture
async def https_upstream() -> AsyncIterator[Callable[[Pair], Awaitable[str]]]:
    """Factory: the echo upstream served over TLS with the given certificate."""
    runners: list[web.AppRunner] = []

    async def serve(pair: Pair) -> str:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(pair.cert), str(pair.key))
        runner = web.AppRunner(echo_app(), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        return f"https://127.0.0.1:{runner.addresses[0][1]}"

    try:
        yield serve
    finally:
        for runner in runners:
            await runner.cleanup()


async def _status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status


async def test_https_upstream_with_self_signed_certificate_is_502(
    start_gateway: StartGateway,
    https_upstream: Callable[[Pair], Awaitable[str]],
    client: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    url = await https_upstream(pki.self_signed)
    gw = await start_gateway([public_route(url)])
    assert await _status(client, f"{gw.url}/public/x") == 502


async def test_https_upstream_signed_by_configured_ca_is_200(
    start_gateway: StartGateway,
    https_upstream: Callable[[Pair], Awaitable[str]],
    client: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    url = await https_upstream(pki.upstream)
    untrusted = await start_gateway([public_route(url)])
    assert await _status(client, f"{untrusted.url}/public/x") == 502
    trusted = await start_gateway([public_route(url)], upstream_tls={"ca_file": str(pki.ca.cert)})
    assert await _status(client, f"{trusted.url}/public/x") == 200


async def test_https_upstream_with_wrong_host_name_is_502_even_with_its_ca(
    start_gateway: StartGateway,
    https_upstream: Callable[[Pair], Awaitable[str]],
    client: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    url = await https_upstream(pki.wrong_host)
    gw = await start_gateway([public_route(url)], upstream_tls={"ca_file": str(pki.ca.cert)})
    assert await _status(client, f"{gw.url}/public/x") == 502


async def test_insecure_skip_verify_works_and_warns_at_start(
    start_gateway: StartGateway,
    https_upstream: Callable[[Pair], Awaitable[str]],
    client: aiohttp.ClientSession,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = await https_upstream(pki.self_signed)
    caplog.set_level(logging.WARNING)
    gw = await start_gateway([public_route(url)])
    assert not [r for r in caplog.records if "insecure_skip_verify" in r.getMessage()]
    gw = await start_gateway([public_route(url)], upstream_tls={"insecure_skip_verify": True})
    warned = [r for r in caplog.records if "insecure_skip_verify" in r.getMessage()]
    assert [r.levelno for r in warned] == [logging.WARNING], caplog.text
    assert await _status(client, f"{gw.url}/public/x") == 200


# =========================================================================== Authlete over https


async def test_authlete_over_https_with_an_unknown_ca_is_never_trusted(
    start_gateway: StartGateway,
    upstream: str,
    client: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """No verdict from an Authlete whose certificate cannot be verified: 503, and no
    introspection request is ever made over the unverified connection."""
    emulator = Emulator(SERVICE_ID, SERVICE_TOKEN)
    emulator.add_token("https-tok", scopes=["s"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.upstream.cert), str(pki.upstream.key))
    runner = web.AppRunner(emulator.app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        base = f"https://127.0.0.1:{runner.addresses[0][1]}"
        gw = await start_gateway(
            [{"name": "api", "path_prefix": "/api", "upstream": upstream, "scopes": ["s"]}],
            authlete_url=base,
            authlete={"allow_insecure_http": False, "retries": 0, "deadline": 2},
        )
        async with client.get(
            f"{gw.url}/api/x", headers={"Authorization": "Bearer https-tok"}
        ) as resp:
            assert resp.status == 503, await resp.text()
        assert emulator.calls == 0
    finally:
        await runner.cleanup()


async def test_authlete_over_https_with_its_ca_configured(
    start_gateway: StartGateway,
    upstream: str,
    client: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """`authlete.ca_file` trusts a private CA for the Authlete link (verification stays on)."""
    emulator = Emulator(SERVICE_ID, SERVICE_TOKEN)
    emulator.add_token("https-ok", subject="tia", scopes=["s"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.upstream.cert), str(pki.upstream.key))
    runner = web.AppRunner(emulator.app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        base = f"https://127.0.0.1:{runner.addresses[0][1]}"
        gw = await start_gateway(
            [{"name": "api", "path_prefix": "/api", "upstream": upstream, "scopes": ["s"]}],
            authlete_url=base,
            authlete={"allow_insecure_http": False, "ca_file": str(pki.ca.cert)},
        )
        async with client.get(
            f"{gw.url}/api/x", headers={"Authorization": "Bearer https-ok"}
        ) as resp:
            assert resp.status == 200, await resp.text()
        assert emulator.calls_for("https-ok") == 1
    finally:
        await runner.cleanup()
