"""`gateway run --workers N`: one listener, N processes, one admin view of the group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.admin import admin_app
from gateway.config import load_config
from gateway.emulator import Emulator
from gateway.purge import PurgeResult
from gateway.workers import Supervisor, merge_expositions
from tests.conftest import (
    SERVICE_ID,
    SERVICE_TOKEN,
    make_config,
    need_tool,
    raw_config,
    start_app,
)

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Group:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, admin: int) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.admin = f"http://127.0.0.1:{admin}"


@pytest.fixture
async def group(tmp_path: Path, upstream: str) -> AsyncIterator[Group]:
    port, admin = _free_port(), _free_port()
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "log": {"access": False},
        "authlete": {
            "base_url": "http://127.0.0.1:9",
            "allow_insecure_http": True,
            "service_id": "1",
            "access_token": "x",
        },
        "routes": [{"name": "pub", "path_prefix": "/", "upstream": upstream, "auth": "none"}],
    }
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(path), "--workers", "2"],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    g = Group(proc, port, admin)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(150):
                try:
                    async with session.get(f"{g.admin}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                pytest.fail("worker group never became ready")
        yield g
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


async def _metrics(session: aiohttp.ClientSession, admin: str) -> dict[str, float]:
    async with session.get(f"{admin}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_metrics_cover_the_whole_group(group: Group) -> None:
    n = 60
    # A fresh connection per request so the kernel spreads them over both workers.
    for _ in range(n):
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
            s.get(f"{group.url}/x") as resp,
        ):
            assert resp.status == 200
    async with aiohttp.ClientSession() as session:
        metrics = await _metrics(session, group.admin)
        served = metrics['gateway_requests_total{method="GET",route="pub",status="200"}']
        assert served == n  # every worker's share, added up
        assert metrics['gateway_request_duration_seconds_count{route="pub"}'] == n
        assert metrics['gateway_build_info{version="0.1.0"}'] == 1  # not summed
        # One SIGHUP, one successful reload for the group (the supervisor counts it; the
        # workers' own counts are left out: tests/test_group_metrics.py watches them).
        group.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        reloads = 0.0
        while reloads < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            metrics = await _metrics(session, group.admin)
            reloads = metrics.get('gateway_config_reloads_total{result="success"}', 0)
        assert reloads == 1


async def test_sigterm_drains_the_group_and_exits_0(group: Group) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{group.url}/x") as resp:
        assert resp.status == 200
    group.proc.send_signal(signal.SIGTERM)
    _, err = group.proc.communicate(timeout=30)
    assert group.proc.returncode == 0
    assert err.decode().count("stopped") == 2
    assert "Traceback" not in err.decode()


async def test_a_dead_worker_is_replaced(group: Group) -> None:
    children = subprocess.run(
        ["pgrep", "-P", str(group.proc.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    if not children:
        pytest.skip("pgrep unavailable")
    await asyncio.sleep(2.5)  # past the minimum uptime that counts as a real start
    os.kill(int(children[0]), signal.SIGKILL)
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 15
        healthy_again = False
        seen_unhealthy = False
        while time.monotonic() < deadline:
            async with session.get(f"{group.admin}/healthz") as resp:
                if resp.status != 200:
                    seen_unhealthy = True
                elif seen_unhealthy:
                    healthy_again = True
                    break
            await asyncio.sleep(0.05)
        assert seen_unhealthy and healthy_again
        async with session.get(f"{group.url}/x") as resp:
            assert resp.status == 200


def test_merge_adds_counters_and_histograms_and_labels_breaker_state_by_worker() -> None:
    one = """# HELP gateway_requests_total r
# TYPE gateway_requests_total counter
gateway_requests_total{route="a",status="200"} 3.0
# HELP gateway_authlete_breaker_state b
# TYPE gateway_authlete_breaker_state gauge
gateway_authlete_breaker_state 1.0
# HELP gateway_overhead_seconds o
# TYPE gateway_overhead_seconds histogram
gateway_overhead_seconds_bucket{le="0.1",route="a"} 1.0
gateway_overhead_seconds_bucket{le="+Inf",route="a"} 2.0
gateway_overhead_seconds_count{route="a"} 2.0
gateway_overhead_seconds_sum{route="a"} 0.5
"""
    two = one.replace("} 3.0", "} 4.0").replace("state 1.0", "state 0.0")
    merged = {m.name: m for m in merge_expositions([one, two])}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in merged.values()
        for s in m.samples
    }
    assert samples[("gateway_requests_total", (("route", "a"), ("status", "200")))] == 7
    # Each worker's own breaker, not a sum (nor the highest code: 2 half-open > 1 open).
    assert samples[("gateway_authlete_breaker_state", (("worker", "0"),))] == 1
    assert samples[("gateway_authlete_breaker_state", (("worker", "1"),))] == 0
    assert ("gateway_authlete_breaker_state", ()) not in samples
    assert samples[("gateway_overhead_seconds_bucket", (("le", "+Inf"), ("route", "a")))] == 4
    assert samples[("gateway_overhead_seconds_sum", (("route", "a"),))] == 1.0


async def test_group_metrics_pass_promtool(group: Group) -> None:
    promtool = need_tool("promtool")  # Debian prometheus; fails under CI, which installs it
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{group.url}/x") as resp:
            assert resp.status == 200
        async with session.get(f"{group.admin}/metrics") as resp:
            text = await resp.read()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_workers_divide_the_authlete_budget(
    tmp_path: Path, upstream: str, emulator: Emulator
) -> None:
    """The workers share one access token: each gets 1/N of rate and burst, so together they
    keep to the configured budget (here a burst of 2: two calls, not two per worker)."""
    port, admin = _free_port(), _free_port()
    tokens = [f"worker-budget-{i}" for i in range(20)]
    for token in tokens:
        emulator.add_token(token, scopes=["a"])
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "log": {"access": False},
        "authlete": {
            "base_url": emulator.base_url,
            "allow_insecure_http": True,
            "service_id": SERVICE_ID,
            "access_token": SERVICE_TOKEN,
            "retries": 0,
            "rate_limit": {"rate": 0.01, "burst": 2, "max_wait": 0},
        },
        "routes": [{"name": "api", "path_prefix": "/", "upstream": upstream}],
    }
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(path), "--workers", "2"],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    statuses: list[int] = []
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(150):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("worker group never became ready")
        for token in tokens:  # a connection each, so the kernel spreads them over both workers
            async with aiohttp.ClientSession() as session:
                headers = {"Authorization": f"Bearer {token}", "Connection": "close"}
                async with session.get(f"http://127.0.0.1:{port}/x", headers=headers) as resp:
                    statuses.append(resp.status)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert emulator.calls <= 2, (emulator.calls, statuses)
    assert statuses.count(200) == emulator.calls and statuses.count(503) == 20 - emulator.calls
    assert b"each gets authlete.rate_limit rate 0.005/s, burst 1" in err, err[-2000:]


# --------------------------------------------------------------------------- POST /cache/purge

ADMIN_TOKEN = "group-admin-secret-0123456789"


class FakeWorkers:
    """A Supervisor's group admin on loopback, with a worker admin app (the real one, its
    purge recorded) on each worker's socket, answering `results[i]` (None: no worker there)."""

    def __init__(self, url: str, calls: list[list[tuple[str, str]]]) -> None:
        self.url = url
        self.calls = calls


@contextlib.asynccontextmanager
async def fake_group(
    results: list[PurgeResult | None], admin_token: str | None = ADMIN_TOKEN
) -> AsyncIterator[FakeWorkers]:
    route = {"name": "r", "path_prefix": "/", "upstream": "http://127.0.0.1:9"}
    cfg = make_config("http://127.0.0.1:9", [route], admin={"token": admin_token})
    supervisor = Supervisor(cfg, "/nonexistent.yaml", len(results), "asyncio")
    runners: list[web.AppRunner] = []
    calls: list[list[tuple[str, str]]] = []
    try:
        for index, result in enumerate(results):
            seen: list[tuple[str, str]] = []
            calls.append(seen)
            if result is None:
                continue

            async def purge(
                kind: str, value: str, seen: list[tuple[str, str]] = seen, r: PurgeResult = result
            ) -> PurgeResult:
                seen.append((kind, value))
                return r

            worker = web.AppRunner(
                admin_app(CollectorRegistry(), list, purge=purge, admin_token=admin_token),
                access_log=None,
            )
            await worker.setup()
            await web.UnixSite(worker, supervisor.socket_of(index)).start()
            runners.append(worker)
        runner, url, _ = await start_app(supervisor._admin_app())
        runners.append(runner)
        yield FakeWorkers(url, calls)
    finally:
        for runner in runners:
            await runner.cleanup()
        supervisor._remove_sockets()


async def _purge(
    url: str, body: dict[str, object], token: str = ADMIN_TOKEN
) -> tuple[int, dict[str, object], str | None]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/cache/purge", json=body, headers={"Authorization": f"Bearer {token}"}
        ) as resp,
    ):
        answer = await resp.json(content_type=None) if resp.status != 404 else {}
        return resp.status, answer, resp.headers.get("Retry-After")


LOCAL = PurgeResult(purged=2, fleet=False, shared=False)


async def test_the_supervisor_purges_every_worker_and_adds_up() -> None:
    async with fake_group([LOCAL, PurgeResult(purged=3, fleet=False, shared=False)]) as group:
        status, answer, _ = await _purge(group.url, {"client_id": "0042"})
        assert (status, answer) == (200, {"purged": 5, "kind": "client_id", "fleet": False})
        assert group.calls == [[("client_id", "42")], [("client_id", "42")]]


async def test_the_supervisor_checks_the_request_itself() -> None:
    async with fake_group([LOCAL, LOCAL]) as group:
        status, answer, _ = await _purge(group.url, {"token": "abc"}, token="wrong")
        assert status == 401
        status, answer, _ = await _purge(group.url, {"token": "abc", "subject": "x"})
        assert (status, answer["error"]) == (400, "several_kinds")
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{group.url}/cache/purge") as resp,
        ):
            assert resp.status == 405
        assert group.calls == [[], []]  # no worker was bothered
    async with fake_group([LOCAL, LOCAL], admin_token=None) as group:
        status, _, _ = await _purge(group.url, {"token": "abc"})
        assert status == 404


async def test_the_group_answers_503_when_a_worker_did_not_purge() -> None:
    async with fake_group([LOCAL, None, LOCAL]) as group:  # worker 1 is not there (restarting)
        status, answer, retry = await _purge(group.url, {"subject": "alice"})
        assert status == 503 and retry == "1"
        assert answer == {
            "error": "workers_failed",
            "detail": "1 of 3 workers did not purge",
            "failed": 1,
            "workers": 3,
            "purged": 4,
            "kind": "subject",
            "fleet": False,
        }
        assert group.calls == [[("subject", "alice")], [], [("subject", "alice")]]


async def test_the_group_relays_shared_state_unreachable() -> None:
    fleet = PurgeResult(purged=1, fleet=True, shared=True)
    down = PurgeResult(purged=1, fleet=False, shared=True)
    async with fake_group([fleet, fleet]) as group:
        status, answer, _ = await _purge(group.url, {"token_sha256": "A" * 64})
        assert (status, answer) == (200, {"purged": 2, "kind": "token_sha256", "fleet": True})
        assert group.calls[0] == [("token_sha256", "a" * 64)]
    async with fake_group([fleet, down]) as group:
        status, answer, retry = await _purge(group.url, {"token": "abc"})
        assert (status, retry) == (503, "1")
        assert answer == {
            "error": "shared_unavailable",
            "purged": 2,
            "kind": "token",
            "fleet": False,
        }


def test_the_supervisor_takes_the_admin_token_of_a_reloaded_file(tmp_path: Path) -> None:
    route = {"name": "r", "path_prefix": "/", "upstream": "http://127.0.0.1:9"}
    raw = raw_config("http://127.0.0.1:9", [route], admin={"token": ADMIN_TOKEN})
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    supervisor = Supervisor(load_config(path), str(path), 2, "asyncio")
    try:
        assert supervisor._admin_token == ADMIN_TOKEN
        path.write_text(yaml.safe_dump({**raw, "admin": {"token": "b" * 32}}))
        supervisor._reload()
        assert supervisor._admin_token == "b" * 32
        path.write_text("listen: [")  # a file that does not load keeps the token in force
        supervisor._reload()
        assert supervisor._admin_token == "b" * 32
        path.write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "admin"}))
        supervisor._reload()
        assert supervisor._admin_token is None
    finally:
        supervisor._remove_sockets()


async def test_a_purge_reaches_every_worker(
    tmp_path: Path, upstream: str, emulator: Emulator
) -> None:
    """A token cached by both workers, revoked at Authlete: one purge on the group's admin
    listener and neither worker accepts it any more."""
    port, admin = _free_port(), _free_port()
    token = "purged-in-every-worker"
    emulator.add_token(token, subject="mallory", client_id=99)
    cfg = raw_config(emulator.base_url, [{"name": "api", "path_prefix": "/", "upstream": upstream}])
    cfg.update(
        listen=f"127.0.0.1:{port}",
        admin_listen=f"127.0.0.1:{admin}",
        log={"access": False},
        admin={"token": ADMIN_TOKEN},
    )
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(path), "--workers", "2"],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    admin_url = f"http://127.0.0.1:{admin}"

    async def status_once() -> int:  # a connection each: the kernel picks the worker
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {token}", "Connection": "close"}
            async with session.get(f"http://127.0.0.1:{port}/x", headers=headers) as resp:
                return resp.status

    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(150):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{admin_url}/readyz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("worker group never became ready")
        for _ in range(200):  # until each worker has asked Authlete once
            assert await status_once() == 200
            if emulator.calls_for(token) == 2:
                break
        else:
            # 200 new connections all to one of two SO_REUSEPORT listeners (odds 2**-199)
            # would mean the group does not share its listener: a real failure.
            pytest.fail("every connection reached one worker")
        emulator.revoke(token)
        status, answer, _ = await _purge(admin_url, {"subject": "mallory"})
        assert (status, answer) == (200, {"purged": 2, "kind": "subject", "fleet": False})
        assert [await status_once() for _ in range(20)] == [401] * 20
        async with aiohttp.ClientSession() as session:
            metrics = await _metrics(session, admin_url)
        assert metrics['gateway_cache_purges_total{kind="subject"}'] == 2  # one per worker
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert err.decode().count("cache purge: kind=subject, 1 entries") == 2, err[-2000:]
    assert token not in err.decode()
