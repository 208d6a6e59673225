"""`gateway run --workers N`: N worker processes sharing the proxy listener (SO_REUSEPORT),
and a supervisor that owns the admin listener for the whole group.

Each worker serves its own admin endpoints on a private Unix socket. The supervisor's
`/metrics` scrapes every worker and adds their series up, so Prometheus sees the process
group, not whichever worker the kernel picked; `/readyz` is ready only when every worker
is. `POST /cache/purge` is checked here (admin token, body) and then carried out by every
worker, each on its own cache (with `shared`, every worker also purges Redis: the fleet purge
is idempotent, and a worker that cannot reach Redis still empties its own local level); the
answer adds their counts up and is 200 only if every worker purged. The supervisor forwards
SIGHUP (and takes the admin token of the reloaded file), drains on SIGTERM/SIGINT, and
restarts a worker that dies (unless it dies right after starting, which a restart would not
mend).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.admin import add_purge_route, new_admin_app, purge_answer
from gateway.config import Config, ConfigError, load_config

log = logging.getLogger("gateway.workers")

_MIN_UPTIME = 2.0
_RESTART_BACKOFF = 1.0
# Gauges where adding the workers up makes no sense: the group reports the worst (highest).
_MAX_GAUGES = frozenset({"gateway_authlete_breaker_state", "gateway_build_info"})


class Supervisor:
    def __init__(self, cfg: Config, config_path: str, count: int, loop_kind: str) -> None:
        self.cfg = cfg
        self._path = config_path
        self._count = count
        self._loop_kind = loop_kind
        self._dir = Path(tempfile.mkdtemp(prefix="gateway-workers-"))
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False
        self._admin_token = cfg.admin.token
        self.exit_code = 0

    def socket_of(self, index: int) -> str:
        return str(self._dir / f"worker-{index}.sock")

    def _command(self, index: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gateway",
            "run",
            "--config",
            self._path,
            "--loop",
            self._loop_kind,
            "--reuse-port",
            "--admin-socket",
            self.socket_of(index),
            "--budget-share",
            str(self._count),
        ]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        runner = web.AppRunner(self._admin_app(), handle_signals=False, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(
                runner, self.cfg.admin_listen.host, self.cfg.admin_listen.port
            ).start()
        except OSError as exc:
            await runner.cleanup()
            self._remove_sockets()
            raise SystemExit(f"gateway: cannot listen: {exc.strerror or exc}") from None
        keepers = [asyncio.ensure_future(self._keep(i)) for i in range(self._count)]
        log.info("supervising %d workers; admin on %s", self._count, self.cfg.admin_listen)
        done = asyncio.ensure_future(stop.wait())
        await asyncio.wait([done, *keepers], return_when=asyncio.FIRST_COMPLETED)
        self._stopping = True
        self._forward(signal.SIGTERM)
        await asyncio.gather(*keepers, return_exceptions=True)
        done.cancel()
        await runner.cleanup()
        self._remove_sockets()
        return self.exit_code

    def _remove_sockets(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _keep(self, index: int) -> None:
        """Run worker `index`, restarting it until the group stops."""
        while True:
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(*self._command(index))
            self._procs[index] = proc
            code = await proc.wait()
            del self._procs[index]
            if self._stopping:
                self.exit_code = max(self.exit_code, code if code > 0 else 0)
                return
            if time.monotonic() - started < _MIN_UPTIME:
                log.error("worker %d exited with %d right after start; stopping", index, code)
                self.exit_code = max(self.exit_code, code if code > 0 else 1)
                return
            log.error("worker %d exited with %d; restarting", index, code)
            await asyncio.sleep(_RESTART_BACKOFF)

    def _reload(self) -> None:
        """SIGHUP: the workers reload; the supervisor only needs the admin token (a file that
        does not load is the workers' to report, and leaves the token in force)."""
        self._forward(signal.SIGHUP)
        with contextlib.suppress(ConfigError, OSError):
            self._admin_token = load_config(self._path).admin.token

    def _forward(self, sig: int) -> None:
        for proc in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    # ------------------------------------------------------------------ group admin
    def _admin_app(self) -> web.Application:
        app = new_admin_app()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        add_purge_route(app, lambda: self._admin_token, self._purge)
        return app

    async def _ask(self, index: int, path: str) -> tuple[int, str]:
        connector = aiohttp.UnixConnector(path=self.socket_of(index))
        timeout = aiohttp.ClientTimeout(total=5)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.get(f"http://worker{path}") as resp,
            ):
                return resp.status, await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return 0, ""

    async def _post_purge(
        self, index: int, body: bytes, token: str
    ) -> tuple[int, dict[str, object]]:
        """A purge on worker `index`: its status (0: no answer) and its JSON object ({} if
        it sent none)."""
        connector = aiohttp.UnixConnector(path=self.socket_of(index))
        timeout = aiohttp.ClientTimeout(total=5)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.post("http://worker/cache/purge", data=body, headers=headers) as resp,
            ):
                try:
                    answer = await resp.json(content_type=None)
                except ValueError:
                    answer = None
                return resp.status, answer if isinstance(answer, dict) else {}
        except (aiohttp.ClientError, OSError, TimeoutError):
            return 0, {}

    async def _purge(self, kind: str, value: str) -> web.Response:
        """Every worker purges its own cache; their counts add up. 200 only if all did."""
        token = self._admin_token
        assert token is not None  # add_purge_route answered 404 otherwise
        body = json.dumps({kind: value}).encode()
        answers = await asyncio.gather(
            *(self._post_purge(i, body, token) for i in range(self._count))
        )
        purged, fleet, shared_down = 0, True, False
        failed: list[tuple[int, int]] = []
        for index, (status, answer) in enumerate(answers):
            count = answer.get("purged")
            if status == 200 and type(count) is int:
                purged += count
                fleet = fleet and answer.get("fleet") is True
            elif status == 503 and answer.get("error") == "shared_unavailable":
                # That worker purged its own cache but could not reach Redis.
                purged += count if type(count) is int else 0
                shared_down = True
            else:
                failed.append((index, status))
        if failed:
            log.warning(
                "cache purge: kind=%s, %d entries, but %d of %d workers did not purge (%s)",
                kind,
                purged,
                len(failed),
                self._count,
                ", ".join(f"worker {i}: {status or 'no answer'}" for i, status in failed),
            )
            return web.json_response(
                {
                    "error": "workers_failed",
                    "detail": f"{len(failed)} of {self._count} workers did not purge",
                    "failed": len(failed),
                    "workers": self._count,
                    "purged": purged,
                    "kind": kind,
                    "fleet": False,
                },
                status=503,
                headers={"Retry-After": "1", "Cache-Control": "no-store"},
            )
        return purge_answer(kind, purged, fleet and not shared_down, shared_down)

    async def _healthz(self, request: web.Request) -> web.Response:
        alive = len(self._procs)
        status = 200 if alive == self._count and not self._stopping else 503
        return web.json_response({"workers": self._count, "alive": alive}, status=status)

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._stopping:
            return web.json_response({"status": "not ready", "problems": ["draining"]}, status=503)
        answers = await asyncio.gather(*(self._ask(i, "/readyz") for i in range(self._count)))
        not_ready = [i for i, (status, _) in enumerate(answers) if status != 200]
        if not_ready:
            return web.json_response(
                {"status": "not ready", "problems": [f"worker {i} not ready" for i in not_ready]},
                status=503,
            )
        return web.json_response({"status": "ready", "workers": self._count})

    async def _metrics(self, request: web.Request) -> web.Response:
        answers = await asyncio.gather(*(self._ask(i, "/metrics") for i in range(self._count)))
        texts = [text for status, text in answers if status == 200]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(merge_expositions(texts)))
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


class _Merged(Collector):
    def __init__(self, metrics: Sequence[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def merge_expositions(texts: Iterable[str]) -> list[Metric]:
    """Add the workers' series up (counters, histograms, most gauges; max for a few)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type
                )
                values[family.name] = {}
            series = values[family.name]
            take_max = family.name in _MAX_GAUGES
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in series:
                    old = series[key]
                    series[key] = max(old, sample.value) if take_max else old + sample.value
                else:
                    series[key] = sample.value
    for name, merged in families.items():
        for (sample_name, labels), value in values[name].items():
            merged.add_sample(sample_name, dict(labels), value)
    return list(families.values())


def supervise(cfg: Config, config_path: str, count: int, loop_kind: str) -> int:
    from gateway.cli import run_loop

    supervisor = Supervisor(cfg, config_path, count, loop_kind)
    return run_loop(supervisor.run(), loop_kind)
