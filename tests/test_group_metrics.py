"""The metrics of a `gateway run --workers N` group (issue 14, "Counters that never go
backwards"): counts that survive a worker's death and restart, a worker that does not answer
counted once, one SIGHUP counted once, gauges per worker or summed, the process and GC
metrics of the whole group, and promtool-clean expositions (one process and the group)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import ProcessCollector, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import load_config
from gateway.emulator import Emulator
from gateway.workers import Gauges, GroupMetrics, Supervisor
from tests.certs import self_signed
from tests.conftest import StartGateway, free_port, need_tool, raw_config

Key = tuple[str, tuple[tuple[str, str], ...]]

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")


# --------------------------------------------------------------------------- helpers


def key(name: str, **labels: str) -> Key:
    return (name, tuple(sorted(labels.items())))


@dataclass
class Exposition:
    values: dict[Key, float]
    types: dict[str, str]  # sample name -> its family's type
    text: str

    def get(self, name: str, **labels: str) -> float | None:
        return self.values.get(key(name, **labels))

    def __getitem__(self, k: Key) -> float:
        return self.values[k]

    def counts(self) -> dict[Key, float]:
        """Every counter and histogram sample."""
        return {
            k: v for k, v in self.values.items() if self.types[k[0]] in ("counter", "histogram")
        }

    def series(self, name: str) -> dict[Key, float]:
        return {k: v for k, v in self.values.items() if k[0] == name}


def parse(text: str) -> Exposition:
    values: dict[Key, float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            k = key(s.name, **s.labels)
            assert k not in values, f"duplicate series {k}"
            values[k] = s.value
            types[s.name] = family.type
    return Exposition(values, types, text)


def exposition_of(metrics: list[Any]) -> Exposition:
    """GroupMetrics.exposition's families, as the text generate_latest would make of them."""
    values: dict[Key, float] = {}
    types: dict[str, str] = {}
    for m in metrics:
        for s in m.samples:
            values[key(s.name, **s.labels)] = s.value
            types[s.name] = m.type
    return Exposition(values, types, "")


def counter(name: str, value: float, **labels: str) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"# HELP {name}_total c\n# TYPE {name}_total counter\n{name}_total{{{inner}}} {value}\n"


def gauge(name: str, value: float, **labels: str) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"# HELP {name} g\n# TYPE {name} gauge\n{name}{{{inner}}} {value}\n"


def histogram(name: str, fast: int, slow: int, total: float) -> str:
    return (
        f"# HELP {name} h\n# TYPE {name} histogram\n"
        f'{name}_bucket{{le="0.1"}} {float(fast)}\n'
        f'{name}_bucket{{le="+Inf"}} {float(fast + slow)}\n'
        f"{name}_count {float(fast + slow)}\n"
        f"{name}_sum {total}\n"
    )


def worker_text(requests: float, *, tokens: float = 5.0, entries: float = 3.0) -> str:
    """What one worker's /metrics could say."""
    return (
        counter("gateway_requests", requests, route="a")
        + histogram("gateway_overhead_seconds", int(requests), 1, requests / 10)
        + gauge("gateway_authlete_budget_tokens", tokens)
        + gauge("gateway_authlete_breaker_state", 0)
        + gauge("gateway_cache_entries", entries)
        + gauge("gateway_build_info", 1, version="0.1.0")
        + counter("gateway_config_reloads", 1, result="success")
        + gauge("process_start_time_seconds", 2000.0)
        + counter("process_cpu_seconds", requests / 100)
    )


SUPERVISOR = (
    counter("gateway_config_reloads", 1, result="success")
    + gauge("process_start_time_seconds", 1000.0)
    + counter("process_cpu_seconds", 0.5)
    + gauge("process_resident_memory_bytes", 100.0)
)

REQUESTS = key("gateway_requests_total", route="a")
OVERHEAD_COUNT = key("gateway_overhead_seconds_count")
OVERHEAD_SLOW = key("gateway_overhead_seconds_bucket", le="+Inf")


# --------------------------------------------------------------------------- the merge


def test_counts_add_up_and_a_dead_workers_counts_stay() -> None:
    group = GroupMetrics(2)
    live = [group.answered(0, worker_text(10)), group.answered(1, worker_text(5))]
    first = exposition_of(group.exposition("", live))
    assert first[REQUESTS] == 15
    assert first[OVERHEAD_COUNT] == 17  # (10 + 1) + (5 + 1)
    group.died(0)
    # Restarting: worker 0 cannot answer; what it counted stays, once.
    dead = exposition_of(group.exposition("", [None, group.answered(1, worker_text(5))]))
    assert dead[REQUESTS] == 15
    assert dead[OVERHEAD_COUNT] == 17
    # The new worker 0 counts from 0, on top of its predecessor's counts.
    again = exposition_of(
        group.exposition("", [group.answered(0, worker_text(2)), group.answered(1, worker_text(6))])
    )
    assert again[REQUESTS] == 10 + 2 + 6
    assert again[OVERHEAD_COUNT] == 11 + 3 + 7
    assert again[OVERHEAD_SLOW] == again[OVERHEAD_COUNT]
    # A second death of the same slot retires the second worker's counts too.
    group.died(0)
    group.answered(0, worker_text(1))
    last = exposition_of(group.exposition("", [None, None]))
    assert last[REQUESTS] == 10 + 2 + 1 + 6


def test_a_worker_that_does_not_answer_is_counted_once() -> None:
    """Not dead, just not answering (stuck, slow): its last counts stand in for it, and when
    it answers again its counts replace them instead of adding to them."""
    group = GroupMetrics(2)
    group.exposition("", [group.answered(0, worker_text(10)), group.answered(1, worker_text(5))])
    silent = exposition_of(group.exposition("", [group.answered(0, worker_text(11)), None]))
    assert silent[REQUESTS] == 16
    assert silent.get("gateway_worker_up", worker="1") == 0
    assert silent.get("gateway_worker_up", worker="0") == 1
    back = exposition_of(
        group.exposition(
            "", [group.answered(0, worker_text(11)), group.answered(1, worker_text(7))]
        )
    )
    assert back[REQUESTS] == 18
    assert back.get("gateway_worker_up", worker="1") == 1


def test_answers_out_of_order_do_not_take_counts_back() -> None:
    """Two scrapes at once: the older answer may be taken in after the newer."""
    group = GroupMetrics(1)
    group.answered(0, worker_text(12))
    group.answered(0, worker_text(10))
    assert exposition_of(group.exposition("", [None]))[REQUESTS] == 12
    group.died(0)  # what is retired is the highest answer
    assert exposition_of(group.exposition("", [group.answered(0, worker_text(1))]))[REQUESTS] == 13


def test_gauges_are_live_state_per_worker_summed_or_highest() -> None:
    group = GroupMetrics(2)
    live = [
        group.answered(0, worker_text(1, tokens=4, entries=3)),
        group.answered(1, worker_text(1, tokens=2, entries=5)),
    ]
    both = exposition_of(group.exposition(SUPERVISOR, live))
    assert both.series("gateway_authlete_budget_tokens") == {
        key("gateway_authlete_budget_tokens", worker="0"): 4,
        key("gateway_authlete_budget_tokens", worker="1"): 2,
    }
    assert set(both.series("gateway_authlete_breaker_state")) == {
        key("gateway_authlete_breaker_state", worker="0"),
        key("gateway_authlete_breaker_state", worker="1"),
    }
    assert both.get("gateway_cache_entries") == 8
    assert both.get("gateway_build_info", version="0.1.0") == 1
    group.died(1)
    one = exposition_of(group.exposition(SUPERVISOR, [group.answered(0, worker_text(1)), None]))
    # The dead worker's gauges are gone: no stale budget, no stale entries.
    assert one.series("gateway_authlete_budget_tokens") == {
        key("gateway_authlete_budget_tokens", worker="0"): 5,
    }
    assert one.get("gateway_cache_entries") == 3
    assert one.get("gateway_worker_up", worker="1") == 0
    nobody = exposition_of(group.exposition(SUPERVISOR, [None, None]))
    assert nobody.series("gateway_cache_entries") == {}
    assert nobody.series("gateway_authlete_budget_tokens") == {}


def test_readiness_is_per_worker_and_0_for_a_worker_that_does_not_answer() -> None:
    """As the supervisor's /readyz: a worker that does not answer is not ready (its series
    reads 0 rather than vanishing, so `min without (worker) (gateway_ready)` sees it)."""
    group = GroupMetrics(2)
    ready = worker_text(1) + gauge("gateway_ready", 1)
    both = exposition_of(group.exposition("", [group.answered(0, ready), group.answered(1, ready)]))
    assert both.series("gateway_ready") == {
        key("gateway_ready", worker="0"): 1,
        key("gateway_ready", worker="1"): 1,
    }
    group.died(1)
    one = exposition_of(group.exposition("", [group.answered(0, ready), None]))
    assert one.series("gateway_ready") == {
        key("gateway_ready", worker="0"): 1,
        key("gateway_ready", worker="1"): 0,
    }
    not_ready = worker_text(1) + gauge("gateway_ready", 0)
    back = exposition_of(
        group.exposition("", [group.answered(0, ready), group.answered(1, not_ready)])
    )
    assert back.get("gateway_ready", worker="1") == 0
    assert back.get("gateway_ready", worker="0") == 1


def test_the_supervisor_alone_counts_reloads_and_gives_the_start_time() -> None:
    group = GroupMetrics(2)
    live = [group.answered(0, worker_text(1)), group.answered(1, worker_text(1))]
    merged = exposition_of(group.exposition(SUPERVISOR, live))
    assert merged.get("gateway_config_reloads_total", result="success") == 1  # not 3
    assert merged.get("process_start_time_seconds") == 1000  # the supervisor's
    assert merged.get("process_cpu_seconds_total") == 0.5 + 0.01 + 0.01  # everyone's
    assert merged.get("process_resident_memory_bytes") == 100


def test_a_family_only_a_dead_worker_had_is_still_shown() -> None:
    group = GroupMetrics(2)
    errors = counter("gateway_upstream_errors", 4, route="a", kind="reset")
    group.exposition(
        "", [group.answered(0, worker_text(1) + errors), group.answered(1, worker_text(1))]
    )
    group.died(0)
    after = exposition_of(group.exposition("", [None, group.answered(1, worker_text(1))]))
    assert after.get("gateway_upstream_errors_total", kind="reset", route="a") == 4


def test_float_sums_added_in_another_order_never_show_less() -> None:
    """(0.255 + 0.495) + 0.449 > (0.449 + 0.255) + 0.495 in floating point: after the third
    worker died its retired sum comes first, and without care the total would drop by one
    ulp, which Prometheus takes for a counter reset."""
    assert (0.449 + 0.255) + 0.495 < (0.255 + 0.495) + 0.449
    group = GroupMetrics(3)
    texts = [histogram("gateway_overhead_seconds", 1, 0, s) for s in (0.255, 0.495, 0.449)]
    before = exposition_of(
        group.exposition("", [group.answered(i, t) for i, t in enumerate(texts)])
    )
    group.died(2)
    live = [group.answered(0, texts[0]), group.answered(1, texts[1]), None]
    after = exposition_of(group.exposition("", live))
    sum_key = key("gateway_overhead_seconds_sum")
    assert after[sum_key] >= before[sum_key]
    assert after[key("gateway_overhead_seconds_count")] == 3


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["serve", "scrape", "silent", "die"]), st.integers(0, 2)),
        max_size=60,
    )
)
def test_no_sequence_of_events_takes_a_count_back(events: list[tuple[str, int]]) -> None:
    """Any mix of traffic, scrapes, workers not answering and workers dying: every count the
    group shows is at least what it showed before, and whenever every worker answers it is
    exactly what the workers ever counted (the dead ones as they last answered)."""
    group = GroupMetrics(3)
    running = [0, 0, 0]  # what each worker has counted so far
    answered = [0, 0, 0]  # what the group last heard from each
    retired = 0
    shown: dict[Key, float] = {}
    for event, index in events:
        if event == "serve":
            running[index] += 1
        elif event == "die":
            group.died(index)
            retired += answered[index]
            running[index] = answered[index] = 0
        else:
            live: list[Gauges | None] = []
            for i in range(3):
                if event == "silent" and i == index:
                    live.append(None)
                else:
                    live.append(group.answered(i, worker_text(running[i])))
                    answered[i] = running[i]
            now = exposition_of(group.exposition("", live)).counts()
            for k, v in shown.items():
                assert now.get(k, 0) >= v, (k, v, now.get(k))
            shown.update(now)
            assert now.get(REQUESTS, 0) == retired + sum(answered)


# --------------------------------------------------------------------------- reloads


def _garbage_tls(tmp_path: Path) -> dict[str, str]:
    cert, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key_file.write_text("not a key\n")
    return {"cert_file": str(cert), "key_file": str(key_file)}


def _self_signed(tmp_path: Path) -> dict[str, str]:
    pair = self_signed(tmp_path, "good", san="DNS:localhost")
    return {"cert_file": str(pair.cert), "key_file": str(pair.key)}


def _reload_counts(supervisor: Supervisor) -> tuple[float, float]:
    merged = exposition_of(supervisor._group.exposition(_own(supervisor), []))
    success = merged.get("gateway_config_reloads_total", result="success")
    error = merged.get("gateway_config_reloads_total", result="error")
    assert success is not None and error is not None  # both there from the start
    return success, error


def _own(supervisor: Supervisor) -> str:
    return generate_latest(supervisor._registry).decode()


def test_the_supervisor_counts_each_sighup_once_with_the_workers_checks(tmp_path: Path) -> None:
    route = {"name": "r", "path_prefix": "/", "upstream": "http://127.0.0.1:9"}
    good = raw_config("http://127.0.0.1:9", [route], admin={"token": "a" * 32})
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(good))
    supervisor = Supervisor(load_config(path), str(path), 2, "asyncio")
    try:
        assert _reload_counts(supervisor) == (0, 0)
        supervisor._reload()
        assert _reload_counts(supervisor) == (1, 0)
        path.write_text("listen: [")
        supervisor._reload()
        assert _reload_counts(supervisor) == (1, 1)
        # Certificates a worker would not load: the group did not start with TLS, and a
        # worker ignores `tls` on reload then (a restart applies it): success, as it says.
        path.write_text(yaml.safe_dump({**good, "tls": _garbage_tls(tmp_path)}))
        supervisor._reload()
        assert _reload_counts(supervisor) == (2, 1)
    finally:
        supervisor._remove_sockets()


def test_a_certificate_the_workers_refuse_is_a_failed_reload(tmp_path: Path) -> None:
    route = {"name": "r", "path_prefix": "/", "upstream": "http://127.0.0.1:9"}
    tls = _self_signed(tmp_path)
    good = raw_config("http://127.0.0.1:9", [route], admin={"token": "a" * 32}, tls=tls)
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(good))
    supervisor = Supervisor(load_config(path), str(path), 2, "asyncio")
    try:
        supervisor._reload()
        assert _reload_counts(supervisor) == (1, 0)
        bad = {**good, "tls": _garbage_tls(tmp_path), "admin": {"token": "b" * 32}}
        path.write_text(yaml.safe_dump(bad))
        supervisor._reload()
        assert _reload_counts(supervisor) == (1, 1)
        assert supervisor._admin_token == "a" * 32  # the workers keep their config: so do we
    finally:
        supervisor._remove_sockets()


# --------------------------------------------------------------------------- one process

PROCESS_FAMILIES = (
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
    "python_gc_objects_collected_total",
    "python_gc_collections_total",
    "python_info",
)


def promtool_check(text: str) -> None:
    promtool = need_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, check=False
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process metrics need /proc")
async def test_one_process_exports_process_and_gc_metrics(
    start_gateway: StartGateway, upstream: str, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        [{"name": "pub", "path_prefix": "/", "upstream": upstream, "auth": "none"}]
    )
    async with client.get(f"{gw.url}/x") as resp:
        assert resp.status == 200
    async with client.get(f"{gw.admin_url}/metrics") as resp:
        text = await resp.text()
    got = parse(text)
    names = {k[0] for k in got.values}
    for name in PROCESS_FAMILIES:
        assert name in names, name
    mine = process_figures(os.getpid())  # the gateway runs in the test's own process
    assert got.get("process_start_time_seconds") == mine["process_start_time_seconds"]
    assert got.types["process_cpu_seconds_total"] == "counter"
    assert got.series("python_gc_collections_total")
    promtool_check(text)


# --------------------------------------------------------------------------- real groups


@dataclass
class Group:
    proc: subprocess.Popen[bytes]
    port: int
    admin: str
    path: Path
    err_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def start_group(tmp_path: Path, cfg: dict[str, Any]) -> AsyncIterator[Group]:
    """`gateway run --workers 2` on free loopback ports, until ready; SIGTERM on the way out
    (after SIGCONT to every worker, in case a test left one stopped)."""
    port, admin = free_port(), free_port()
    while admin == port:
        admin = free_port()
    cfg = {**cfg, "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}"}
    path = tmp_path / "group.yaml"
    path.write_text(yaml.safe_dump(cfg))
    err_path = tmp_path / "stderr"
    with err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(path), "--workers", "2"],
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    group = Group(proc, port, f"http://127.0.0.1:{admin}", path, err_path)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(150):
                if proc.poll() is not None:
                    pytest.fail(f"group exited: {group.stderr()[-3000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{group.admin}/readyz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"worker group never became ready: {group.stderr()[-3000:]}")
        yield group
    finally:
        for pid in workers(group).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 30)
        except TimeoutError:
            proc.kill()
            await asyncio.to_thread(proc.wait)


def workers(group: Group) -> dict[int, int]:
    """Worker slot -> pid, for the supervisor's children now (from /proc)."""
    out: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid != group.proc.pid or b"--admin-socket" not in argv:
            continue
        socket_path = argv[argv.index(b"--admin-socket") + 1].decode()
        out[int(Path(socket_path).stem.removeprefix("worker-"))] = int(entry.name)
    return out


def socket_of(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return argv[argv.index(b"--admin-socket") + 1].decode()


async def scrape(admin: str) -> Exposition:
    async with aiohttp.ClientSession() as session, session.get(f"{admin}/metrics") as resp:
        assert resp.status == 200
        return parse(await resp.text())


async def scrape_worker(pid: int) -> Exposition:
    """A worker's own /metrics, on its private socket (as the supervisor asks it)."""
    connector = aiohttp.UnixConnector(path=socket_of(pid))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get("http://worker/metrics") as resp,
    ):
        assert resp.status == 200
        return parse(await resp.text())


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"not within {timeout:g} s: {what}")


async def get(url: str, headers: dict[str, str] | None = None) -> int:
    """One request on a connection of its own, so the kernel picks a worker each time."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={**(headers or {}), "Connection": "close"}) as resp,
    ):
        await resp.read()
        return resp.status


def served(e: Exposition) -> float:
    return sum(v for k, v in e.values.items() if k[0] == "gateway_requests_total")


def worker_busy(e: Exposition) -> bool:
    return served(e) > 0 and (e.get("gateway_cache_entries") or 0) > 0


async def until_both_workers_served(group: Group, emulator: Emulator) -> dict[int, int]:
    """Traffic (valid, unknown and missing tokens, an open route) until each worker has
    answered some and cached a verdict: the counts a death could take away are not 0."""
    emulator.add_token("group-token", scopes=["s"])
    pids = workers(group)
    assert sorted(pids) == [0, 1]
    for i in range(400):
        assert await get(f"{group.url}/pub/x") == 200
        assert await get(f"{group.url}/api/x", {"Authorization": "Bearer group-token"}) == 200
        assert await get(f"{group.url}/api/x", {"Authorization": f"Bearer unknown-{i}"}) == 401
        assert await get(f"{group.url}/api/x") == 401
        if i >= 3 and all([worker_busy(await scrape_worker(pid)) for pid in pids.values()]):
            return pids
    # 1600 new connections all to one of two SO_REUSEPORT listeners: not a shared listener.
    pytest.fail("every connection reached one worker")


def group_config(emulator: Emulator, upstream: str) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {"name": "pub", "path_prefix": "/pub", "upstream": upstream, "auth": "none"},
        {"name": "api", "path_prefix": "/api", "upstream": upstream, "scopes": ["s"]},
    ]
    return raw_config(emulator.base_url, routes, log={"access": False}, cache={"ttl": 600})


def assert_no_count_went_back(before: Exposition, after: Exposition) -> None:
    counts = before.counts()
    assert counts, "no counter or histogram in the exposition"
    back = {k: (v, after.values.get(k)) for k, v in counts.items() if after.values.get(k, -1) < v}
    assert not back, f"counts that went back (before, after): {back}"


async def test_counts_never_go_back_when_a_worker_is_killed(
    tmp_path: Path, upstream: str, emulator: Emulator
) -> None:
    async with start_group(tmp_path, group_config(emulator, upstream)) as group:
        pids = await until_both_workers_served(group, emulator)
        victim = await scrape_worker(pids[0])
        before = await scrape(group.admin)
        assert served(victim) > 0
        assert before.get("gateway_worker_restarts_total", worker="0") == 0
        assert before.get("gateway_authlete_budget_tokens", worker="0") is not None
        await asyncio.sleep(2.5)  # past the minimum uptime that counts as a real start

        os.kill(pids[0], signal.SIGKILL)

        async def noticed() -> bool:
            async with aiohttp.ClientSession() as s, s.get(f"{group.admin}/healthz") as resp:
                answer = await resp.json()
                return bool(answer["alive"] == 1)

        await eventually(noticed, "the supervisor saw worker 0 die")
        during = await scrape(group.admin)
        assert_no_count_went_back(before, during)
        assert served(during) == served(before)  # the dead worker's requests still count
        if await noticed() and 0 not in workers(group):  # no worker 0 during that scrape
            assert during.get("gateway_worker_up", worker="0") == 0
            assert during.get("gateway_authlete_budget_tokens", worker="0") is None
            assert during.get("gateway_authlete_breaker_state", worker="0") is None
            assert during.get("gateway_worker_up", worker="1") == 1
            if before.series("gateway_ready"):  # not ready while it is not there
                assert during.get("gateway_ready", worker="0") == 0
                assert during.get("gateway_ready", worker="1") == 1

        async def replaced() -> bool:
            now = workers(group)
            if now.get(0) in (None, pids[0]):
                return False
            e = await scrape(group.admin)
            return e.get("gateway_worker_up", worker="0") == 1

        await eventually(replaced, "worker 0 restarted and answering")
        after = await scrape(group.admin)
        assert_no_count_went_back(before, after)
        assert served(after) == served(before)
        assert after.get("gateway_worker_restarts_total", worker="0") == 1
        assert after.get("gateway_worker_restarts_total", worker="1") == 0
        new_worker = await scrape_worker(workers(group)[0])
        assert served(new_worker) == 0  # it counts from 0: the group adds the old counts

        for _ in range(20):
            assert await get(f"{group.url}/pub/y") == 200
        more = await scrape(group.admin)
        assert_no_count_went_back(after, more)
        pub = key("gateway_requests_total", method="GET", route="pub", status="200")
        assert more[pub] == before[pub] + 20
        assert served(more) == served(before) + 20
        cpu = key("process_cpu_seconds_total")
        assert more[cpu] >= before[cpu]
        promtool_check(more.text)
    assert "Traceback" not in group.stderr()


async def test_a_stuck_worker_is_counted_once(
    tmp_path: Path, upstream: str, emulator: Emulator
) -> None:
    """A worker that does not answer the scrape (here stopped with SIGSTOP: alive, not dead)
    keeps its counts in the group's sum, once, and its gauges are left out meanwhile."""
    async with start_group(tmp_path, group_config(emulator, upstream)) as group:
        pids = await until_both_workers_served(group, emulator)
        before = await scrape(group.admin)
        os.kill(pids[1], signal.SIGSTOP)
        try:
            stuck = await scrape(group.admin)  # the supervisor's ask times out (5 s)
        finally:
            os.kill(pids[1], signal.SIGCONT)
        assert stuck.get("gateway_worker_up", worker="1") == 0
        assert stuck.get("gateway_worker_up", worker="0") == 1
        assert_no_count_went_back(before, stuck)
        assert served(stuck) == served(before)
        assert stuck.get("gateway_authlete_budget_tokens", worker="1") is None
        assert stuck.get("gateway_authlete_budget_tokens", worker="0") is not None
        back = await scrape(group.admin)
        assert back.get("gateway_worker_up", worker="1") == 1
        assert served(back) == served(before)  # not its counts a second time
        assert back.get("gateway_worker_restarts_total", worker="1") == 0
        assert workers(group) == pids


async def test_one_sighup_is_one_reload_for_the_group(
    tmp_path: Path, upstream: str, emulator: Emulator
) -> None:
    async with start_group(tmp_path, group_config(emulator, upstream)) as group:
        pids = workers(group)
        assert sorted(pids) == [0, 1]
        first = await scrape(group.admin)
        assert first.get("gateway_config_reloads_total", result="success") == 0
        assert first.get("gateway_config_reloads_total", result="error") == 0

        async def every_worker(result: str) -> bool:
            for pid in pids.values():
                own = await scrape_worker(pid)
                if own.get("gateway_config_reloads_total", result=result) != 1:
                    return False
            return True

        group.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: every_worker("success"), "both workers reloaded")
        merged = await scrape(group.admin)
        assert merged.get("gateway_config_reloads_total", result="success") == 1
        assert merged.get("gateway_config_reloads_total", result="error") == 0

        group.path.write_text("listen: [")
        group.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: every_worker("error"), "both workers rejected the file")
        merged = await scrape(group.admin)
        assert merged.get("gateway_config_reloads_total", result="success") == 1
        assert merged.get("gateway_config_reloads_total", result="error") == 1


async def test_gauges_per_worker_or_summed(
    tmp_path: Path, upstream: str, emulator: Emulator
) -> None:
    held = 6
    async with start_group(tmp_path, group_config(emulator, upstream)) as group:
        pids = await until_both_workers_served(group, emulator)
        sessions = [aiohttp.ClientSession() for _ in range(held)]
        try:
            for session in sessions:  # a kept-alive connection each, spread by the kernel
                async with session.get(f"{group.url}/pub/held") as resp:
                    assert resp.status == 200
            own = [await scrape_worker(pid) for pid in pids.values()]
            merged = await scrape(group.admin)
        finally:
            for session in sessions:
                await session.close()
        assert merged.get("gateway_open_connections") == held
        assert merged.get("gateway_open_connections") == sum(
            o.get("gateway_open_connections") or 0 for o in own
        )
        entries = [o.get("gateway_cache_entries") or 0 for o in own]
        assert all(entries), entries  # both cached verdicts (until_both_workers_served)
        assert merged.get("gateway_cache_entries") == sum(entries)
        for name in ("gateway_authlete_budget_tokens", "gateway_authlete_breaker_state"):
            assert set(merged.series(name)) == {key(name, worker="0"), key(name, worker="1")}
        assert merged.get("gateway_authlete_breaker_state", worker="1") == 0
        assert [v for k, v in merged.values.items() if k[0] == "gateway_build_info"] == [1]
        assert [v for k, v in merged.values.items() if k[0] == "python_info"] == [1]
        promtool_check(merged.text)


def process_figures(pid: int) -> dict[str, float]:
    """prometheus_client's own reading of /proc/<pid>: the oracle for the group's sums."""
    collector = ProcessCollector(pid=lambda: pid, registry=None)
    return {s.name: s.value for m in collector.collect() for s in m.samples}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process metrics need /proc")
async def test_process_metrics_cover_the_whole_group(
    tmp_path: Path, upstream: str, emulator: Emulator
) -> None:
    async with start_group(tmp_path, group_config(emulator, upstream)) as group:
        pids = await until_both_workers_served(group, emulator)
        processes = [group.proc.pid, *pids.values()]
        earlier = {pid: process_figures(pid) for pid in processes}
        gc_earlier = [await scrape_worker(pid) for pid in pids.values()]
        merged = await scrape(group.admin)
        for name in PROCESS_FAMILIES:
            assert merged.series(name), name
        # Limits do not move: the group's is exactly the sum of its three processes'.
        assert merged.get("process_max_fds") == sum(e["process_max_fds"] for e in earlier.values())
        # The supervisor's start, not a worker's.
        supervisor_start = earlier[group.proc.pid]["process_start_time_seconds"]
        assert merged.get("process_start_time_seconds") == supervisor_start
        assert all(e["process_start_time_seconds"] >= supervisor_start for e in earlier.values())
        # CPU seconds only grow: the group's now is at least everyone's a moment ago.
        cpu = merged.get("process_cpu_seconds_total")
        assert cpu is not None
        assert cpu >= sum(e["process_cpu_seconds_total"] for e in earlier.values())
        # Memory and descriptors move; a sum is above any one process's.
        for name in (
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
        ):
            value = merged.get(name)
            assert value is not None and value > max(e[name] for e in earlier.values()), name
        for generation in ("0", "1", "2"):
            total = merged.get("python_gc_collections_total", generation=generation)
            assert total is not None
            assert total >= sum(
                g.get("python_gc_collections_total", generation=generation) or 0 for g in gc_earlier
            )
