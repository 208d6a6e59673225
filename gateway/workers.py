"""`gateway run --workers N`: N worker processes sharing the proxy listener (SO_REUSEPORT),
and a supervisor that owns the admin listener for the whole group.

Each worker serves its own admin endpoints on a private Unix socket. The supervisor's
`/metrics` scrapes every worker and merges their series (`GroupMetrics`), so Prometheus sees
the process group, not whichever worker the kernel picked; its counters never go back when a
worker dies and is replaced, and one SIGHUP counts as one reload. `/readyz` is ready only
when every worker is. `POST /cache/purge` is checked here (admin token, body) and then
carried out by every worker, each on its own cache (with `shared`, every worker also purges
Redis: the fleet purge is idempotent, and a worker that cannot reach Redis still empties its
own local level); the answer adds their counts up and is 200 only if every worker purged.
The supervisor forwards SIGHUP (and takes the admin token of the reloaded file), drains on
SIGTERM/SIGINT, and restarts a worker that dies (unless it dies right after starting, which
a restart would not mend).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.admin import add_purge_route, new_admin_app, purge_answer
from gateway.config import Config, ConfigError, load_config
from gateway.logs import set_log_format
from gateway.metrics import Counter, add_runtime_collectors
from gateway.tls import TLSError, load_server_certificates

log = logging.getLogger("gateway.workers")

_MIN_UPTIME = 2.0
_RESTART_BACKOFF = 1.0


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
        # Bumped when the worker in a slot dies: an answer to a scrape that started before
        # belongs to a worker whose counts are already retired, and is not used.
        self._generation = [0] * count
        self._group = GroupMetrics(count)
        self._registry = CollectorRegistry(auto_describe=True)  # the supervisor's own
        add_runtime_collectors(self._registry)
        self._reloads = Counter(
            "gateway_config_reloads",
            "Config reloads (SIGHUP) by result: success, error (the old config stays); with "
            "--workers counted once for the group, by the supervisor.",
            ["result"],
            registry=self._registry,
        )
        for result in ("success", "error"):
            self._reloads.labels(result)
        self._restarts = Counter(
            "gateway_worker_restarts",
            "Workers of --workers that died and were started again, by worker slot.",
            ["worker"],
            registry=self._registry,
        )
        for index in range(count):
            self._restarts.labels(str(index))

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
            self._generation[index] += 1
            self._group.died(index)
            if self._stopping:
                self.exit_code = max(self.exit_code, code if code > 0 else 0)
                return
            if time.monotonic() - started < _MIN_UPTIME:
                log.error("worker %d exited with %d right after start; stopping", index, code)
                self.exit_code = max(self.exit_code, code if code > 0 else 1)
                return
            log.error("worker %d exited with %d; restarting", index, code)
            self._restarts.labels(str(index)).inc()
            await asyncio.sleep(_RESTART_BACKOFF)

    def _reload(self) -> None:
        """SIGHUP: the workers reload; the supervisor takes the admin token, and counts the
        reload once for the group (gateway_config_reloads_total) by making the checks a
        worker makes: the file loads and, when the group started with TLS, its certificate
        and key load. A file that fails them is the workers' to report (they log why) and
        leaves the admin token in force, as it leaves their config."""
        self._forward(signal.SIGHUP)
        try:
            new = load_config(self._path)
            if self.cfg.tls is not None and new.tls is not None:
                load_server_certificates(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), new.tls)
        except (ConfigError, TLSError, OSError):
            self._reloads.labels("error").inc()
            return
        self._admin_token = new.admin.token
        # The supervisor's own lines follow the file as the workers' do.
        logging.getLogger().setLevel(new.log.level.upper())
        set_log_format(new.log.format)
        self._reloads.labels("success").inc()

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
        live = await asyncio.gather(*(self._scrape(i) for i in range(self._count)))
        own = generate_latest(self._registry).decode()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(self._group.exposition(own, live)))
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _scrape(self, index: int) -> Gauges | None:
        """Worker `index`'s exposition taken in (`GroupMetrics.answered`): its gauges, or
        None when it did not answer, or the worker that answered has died since."""
        generation = self._generation[index]
        status, text = await self._ask(index, "/metrics")
        if status != 200 or generation != self._generation[index]:
            return None
        try:
            return self._group.answered(index, text)
        except ValueError:  # not the text format: nothing from it is used
            log.warning("worker %d answered /metrics with something unreadable", index)
            return None


class _Merged(Collector):
    def __init__(self, metrics: Sequence[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


# --------------------------------------------------------------------------- group metrics

Labels = tuple[tuple[str, str], ...]
SampleKey = tuple[str, Labels]  # (sample name, labels sorted)

# Counts: kept from a worker's last answer while it cannot answer, kept after it died.
_COUNTS = frozenset({"counter", "histogram"})
# Gauges the same in every process: the group shows the highest, not the sum.
_MAX_GAUGES = frozenset({"gateway_build_info", "python_info"})
# Gauges of one worker's own state that a sum would misstate (in shared mode each worker
# reports the fleet's bucket; breaker states are 0/1/2 codes; readiness is each worker's):
# a series per worker, with a `worker` label (its slot, 0 to N-1, kept across restarts).
_PER_WORKER = frozenset(
    {"gateway_authlete_budget_tokens", "gateway_authlete_breaker_state", "gateway_ready"}
)
# Per worker, and 0 (not absent) for a worker that did not answer: the supervisor's /readyz
# counts such a worker as not ready, and so does the metric.
_ZERO_WHEN_SILENT = frozenset({"gateway_ready"})
# The supervisor's figure alone: a SIGHUP counted once, the group's start time.
_SUPERVISOR_ONLY = frozenset({"gateway_config_reloads", "process_start_time_seconds"})
WORKER_UP = "gateway_worker_up"


@dataclass
class Family:
    name: str
    documentation: str
    type: str
    samples: dict[SampleKey, float] = field(default_factory=dict)


Gauges = dict[str, Family]  # a worker's live families by name (all but counts)


def parse_exposition(text: str) -> list[Family]:
    """Prometheus text format -> families (raises ValueError on anything else)."""
    out = []
    for metric in text_string_to_metric_families(text):
        family = Family(metric.name, metric.documentation, metric.type)
        for sample in metric.samples:
            family.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        out.append(family)
    return out


def _combine(into: dict[str, Family], family: Family) -> None:
    """Add `family`'s samples into the family of the same name (the highest for a few)."""
    merged = into.get(family.name)
    if merged is None:
        into[family.name] = Family(
            family.name, family.documentation, family.type, dict(family.samples)
        )
        return
    take_max = family.name in _MAX_GAUGES
    for key, value in family.samples.items():
        old = merged.samples.get(key)
        if old is None:
            merged.samples[key] = value
        else:
            merged.samples[key] = max(old, value) if take_max else old + value


def _per_worker(family: Family, index: int) -> Family:
    worker = ("worker", str(index))
    return Family(
        family.name,
        family.documentation,
        family.type,
        {
            (name, tuple(sorted((*labels, worker)))): value
            for (name, labels), value in family.samples.items()
        },
    )


class GroupMetrics:
    """The exposition of a worker group, merged from the supervisor's own and each
    worker's, such that no count (counter, histogram bucket, sum and count) ever goes back:

    - each worker slot keeps the counts of the worker running in it as last answered, so a
      worker that does not answer a scrape (busy, stopped, dying) still counts what it had,
      once, and the next answer replaces them;
    - when a worker dies, its kept counts move to the retired counts, which the group adds
      to the live ones for as long as the supervisor runs: the new worker counts from 0 on
      top (counts made after the dead worker's last answer are lost: nobody saw them);
    - gauges describe live state: only the workers that answered this scrape add theirs (a
      dead worker's disappear); a few are per worker (`worker` label), a few the highest;
      `gateway_ready{worker}` is 0 for a worker that did not answer, as /readyz has it;
    - the supervisor's own counts and gauges (process, GC, reloads, restarts) join in;
      `gateway_worker_up{worker}` says which workers answered.

    A count never shows less than it showed before (float sums added in another order could
    differ in the last bit, which Prometheus would take for a reset)."""

    def __init__(self, count: int) -> None:
        self._kept: list[dict[str, Family]] = [{} for _ in range(count)]
        self._retired: dict[str, Family] = {}
        self._shown: dict[SampleKey, float] = {}
        self._silent_zero: dict[str, Family] = {}  # _ZERO_WHEN_SILENT families seen so far

    def answered(self, index: int, text: str) -> Gauges:
        """Worker `index` answered a scrape with `text`: keep its counts (never below an
        answer it gave before: two scrapes' answers may arrive out of order) and return its
        gauges for this exposition."""
        gauges: Gauges = {}
        kept = self._kept[index]
        for family in parse_exposition(text):
            if family.name in _SUPERVISOR_ONLY:
                continue
            if family.type not in _COUNTS:
                gauges[family.name] = family
                if family.name in _ZERO_WHEN_SILENT:
                    self._silent_zero[family.name] = family
                continue
            mine = kept.get(family.name)
            if mine is None:
                mine = kept[family.name] = Family(family.name, family.documentation, family.type)
            for key, value in family.samples.items():
                old = mine.samples.get(key)
                mine.samples[key] = value if old is None or value > old else old
        return gauges

    def died(self, index: int) -> None:
        """The worker in slot `index` exited: its counts are retired; the slot counts anew."""
        for family in self._kept[index].values():
            _combine(self._retired, family)
        self._kept[index] = {}

    def exposition(self, own: str, live: Sequence[Gauges | None]) -> list[Metric]:
        """The group's families: the supervisor's own exposition `own`, the retired counts,
        every slot's kept counts, and the gauges of the workers that answered (`live[i]`,
        None for a worker that did not)."""
        out: dict[str, Family] = {}
        for family in parse_exposition(own):
            _combine(out, family)
        for family in self._retired.values():
            _combine(out, family)
        up = Family(
            WORKER_UP,
            "1 if the worker answered the supervisor's scrape for this exposition, 0 if it "
            "did not: dead, restarting or stuck (its counts stay as last answered).",
            "gauge",
        )
        for index, kept in enumerate(self._kept):
            for family in kept.values():
                _combine(out, family)
            gauges = live[index] if index < len(live) else None
            up.samples[(WORKER_UP, (("worker", str(index)),))] = float(gauges is not None)
            if gauges is None:
                for family in self._silent_zero.values():
                    zero = Family(family.name, family.documentation, family.type)
                    zero.samples = {k: 0.0 for k in family.samples}
                    _combine(out, _per_worker(zero, index))
            for family in (gauges or {}).values():
                _combine(out, _per_worker(family, index) if family.name in _PER_WORKER else family)
        _combine(out, up)
        metrics = []
        for family in out.values():
            metric = Metric(family.name, family.documentation, family.type)
            counts = family.type in _COUNTS
            for key, value in family.samples.items():
                if counts:
                    value = max(value, self._shown.get(key, value))
                    self._shown[key] = value
                metric.add_sample(key[0], dict(key[1]), value)
            metrics.append(metric)
        return metrics


def merge_expositions(texts: Iterable[str]) -> list[Metric]:
    """One scrape of a group without history (worker i answered texts[i])."""
    answers = list(texts)
    group = GroupMetrics(len(answers))
    live: list[Gauges | None] = [group.answered(i, text) for i, text in enumerate(answers)]
    return group.exposition("", live)


def supervise(cfg: Config, config_path: str, count: int, loop_kind: str) -> int:
    from gateway.cli import run_loop

    supervisor = Supervisor(cfg, config_path, count, loop_kind)
    return run_loop(supervisor.run(), loop_kind)
