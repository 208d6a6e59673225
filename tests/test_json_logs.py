"""`log.format: json`: the gateway's own messages as one JSON object per line (time, level,
logger, message, and the request id where one applies), collapsed repeats included, from
`gateway run` and from every process of `gateway run --workers N`; never a token."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway import logs
from gateway.config import ConfigError, parse_config
from gateway.emulator import Emulator, Override
from gateway.logs import JsonFormatter, collapse_repeats, set_log_format, setup_logging
from tests.conftest import (
    StartGateway,
    bearer,
    free_port,
    raw_config,
    wait_for_port,
)

_KEYS = ["time", "level", "logger", "message"]


class _Json(logging.Handler):
    """Keeps each record as the JSON formatter writes it, parsed back."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(self.format(record))

    @property
    def docs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text]


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def json_logger() -> Iterator[tuple[logging.Logger, _Json]]:
    handler = _Json()
    logger = logging.getLogger("gateway.test-json")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


def test_a_record_is_one_json_object_on_one_line(
    json_logger: tuple[logging.Logger, _Json],
) -> None:
    logger, handler = json_logger
    before = time.time()
    logger.warning("no verdict for route %s: %s", "orders", "timeout", extra={"request_id": "r-1"})
    logger.info('odd "text"\nwith a newline, ü and \u2028')
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    assert all("\n" not in line for line in handler.text)
    first, odd, failed = handler.docs
    assert list(first) == [*_KEYS, "request_id"]
    assert first["level"] == "WARNING" and first["logger"] == "gateway.test-json"
    assert first["message"] == "no verdict for route orders: timeout"
    assert first["request_id"] == "r-1"
    assert before <= first["time"] <= time.time()  # epoch seconds, as in the access log
    assert odd["message"] == 'odd "text"\nwith a newline, ü and \u2028' and "request_id" not in odd
    assert handler.text[1].isascii()
    assert failed["level"] == "ERROR" and "ValueError: boom" in failed["exception"]


def test_collapsed_repeats_are_json_too() -> None:
    clock = _Clock()
    handler = _Json()
    repeats = collapse_repeats(handler, clock=clock)
    logger = logging.getLogger("gateway.test-json-collapse")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        for i in range(1000):
            logger.warning(
                "no verdict for route %s: %s", "orders", i, extra={"request_id": f"r{i}"}
            )
            clock.now += 0.001
        clock.now += 10
        logger.info("something else")
        repeats.flush()
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    first, summary, other = handler.docs
    assert first["message"] == "no verdict for route orders: 0" and first["request_id"] == "r0"
    assert summary == {
        "time": summary["time"],
        "level": "WARNING",
        "logger": "gateway.test-json-collapse",
        "message": "no verdict for route orders: 0 (and 999 more like this within 10 s)",
        "repeated": 999,
    }
    assert other["message"] == "something else"


def test_setup_logging_writes_the_chosen_format_and_a_reload_switches_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh process (pytest has its own)
    monkeypatch.setattr(logs, "_handler", None)
    level = root.level
    stream = io.StringIO()
    try:
        setup_logging("info", stream, fmt="json")
        logging.getLogger("gateway").info("listening: %d routes", 2)
        set_log_format("text")
        logging.getLogger("gateway").info("config reloaded: %d routes", 2)
    finally:
        set_log_format("text")
        for handler in root.handlers:
            root.removeHandler(handler)
        root.setLevel(level)
    first, second = stream.getvalue().splitlines()
    assert json.loads(first)["message"] == "listening: 2 routes"
    assert second.endswith(" INFO gateway: config reloaded: 2 routes")


def test_log_format_is_validated() -> None:
    routes = [{"path_prefix": "/", "upstream": "http://127.0.0.1:9"}]
    text = yaml.safe_dump(raw_config("http://127.0.0.1:1", routes, log={"format": "xml"}))
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env={})
    assert caught.value.problems == ["log.format: must be one of text, json"]
    text = yaml.safe_dump(raw_config("http://127.0.0.1:1", routes, log={"format": "JSON"}))
    assert parse_config(text, env={}).log.format == "json"
    text = yaml.safe_dump(raw_config("http://127.0.0.1:1", routes))
    assert parse_config(text, env={}).log.format == "text"


async def test_lines_logged_for_a_request_carry_its_request_id(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
) -> None:
    """The listener's own warnings for a request (no verdict, upstream failed) name the
    request id the client got and the access line has."""
    dead = f"http://127.0.0.1:{free_port()}"
    routes = [
        {"name": "orders", "path_prefix": "/orders", "upstream": upstream},
        {"name": "dead", "path_prefix": "/dead", "upstream": dead, "auth": "none"},
    ]
    handler = _Json()
    gateway_logger = logging.getLogger("gateway")
    gateway_logger.addHandler(handler)
    try:
        gw = await start_gateway(routes, authlete={"retries": 0})
        emulator.override = Override(status=500, count=1)
        async with client.get(f"{gw.url}/orders/1", headers=bearer("tok-json-secret")) as resp:
            assert resp.status == 503
            unavailable = resp.headers["X-Request-Id"]
        async with client.get(f"{gw.url}/dead/1", headers={"X-Request-Id": "mine-1"}) as resp:
            assert resp.status == 502
    finally:
        gateway_logger.removeHandler(handler)
    docs = handler.docs
    (verdict,) = [d for d in docs if d["message"].startswith("no verdict for route orders")]
    assert verdict["request_id"] == unavailable and verdict["level"] == "WARNING"
    (failed,) = [d for d in docs if d["message"].startswith("upstream ")]
    assert failed["request_id"] == "mine-1"
    assert not any("request_id" in d for d in docs if d["message"].startswith("listening"))
    assert not any("tok-json-secret" in line for line in handler.text)


def _config(tmp_path: Path, port: int, admin: int, authlete: int) -> Path:
    config = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "authlete": {
            "base_url": f"http://127.0.0.1:{authlete}",
            "allow_insecure_http": True,
            "service_id": "715948317",
            "access_token": "service-secret-xyz",
            "retries": 0,
        },
        "log": {"access": False, "format": "json"},
        "routes": [{"name": "orders", "path_prefix": "/orders", "upstream": "http://127.0.0.1:9"}],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of stderr, each a JSON object (fails on any other line)."""
    docs = []
    for line in text.splitlines():
        doc = json.loads(line)
        assert isinstance(doc, dict) and list(doc)[:4] == _KEYS, line
        docs.append(doc)
    return docs


async def _flood(port: int, count: int) -> list[int]:
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> int:
            url = f"http://127.0.0.1:{port}/orders/{i}"
            async with session.get(url, headers=bearer(f"tok-{i}-secret")) as resp:
                return resp.status

        return await asyncio.gather(*(one(i) for i in range(count)))


@pytest.mark.parametrize("workers", [1, 2])
def test_gateway_run_writes_json_lines(tmp_path: Path, workers: int) -> None:
    """`gateway run` (and `--workers 2`: the supervisor and each worker) with
    `log.format: json`: every stderr line is a JSON object; Authlete being unreachable gives
    one warning with a request id and, at exit, its JSON count line; no token anywhere."""
    port, admin = free_port(), free_port()
    refusing = socket.socket()  # Authlete's port: bound, never listening
    refusing.bind(("127.0.0.1", 0))
    path = _config(tmp_path, port, admin, refusing.getsockname()[1])
    argv = [sys.executable, "-m", "gateway", "run", "-c", str(path), "--loop", "asyncio"]
    if workers > 1:
        argv += ["--workers", str(workers)]
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for_port(port, proc)
        if workers > 1:
            wait_for_port(admin, proc)
            time.sleep(0.5)  # the other workers bind the shared port too
        assert proc.poll() is None, stderr.read_text(encoding="utf-8")
        statuses = asyncio.run(_flood(port, 100))
        assert statuses == [503] * 100
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        refusing.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = stderr.read_text(encoding="utf-8")
    docs = _json_lines(text)
    assert "secret" not in text and "tok-" not in text
    verdicts = [d for d in docs if d["message"].startswith("no verdict for route orders")]
    firsts = [d for d in verdicts if "repeated" not in d]
    summaries = [d for d in verdicts if "repeated" in d]
    assert 1 <= len(firsts) <= workers and len(summaries) <= workers, text
    assert all(d["request_id"] and d["level"] == "WARNING" for d in firsts)
    assert len(firsts) + sum(d["repeated"] for d in summaries) == 100, text
    assert any(d["message"].startswith("listening: proxy") for d in docs)
    if workers > 1:
        (supervising,) = [d for d in docs if d["message"].startswith("supervising")]
        assert supervising["logger"] == "gateway.workers"
        assert any(d["message"].startswith("--workers 2 share") for d in docs)


def test_a_failed_start_is_a_json_line_too(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        path = _config(tmp_path, busy.getsockname()[1], free_port(), free_port())
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "-c", str(path), "--loop", "asyncio"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        busy.close()
    assert done.returncode == 1
    last = _json_lines(done.stderr)[-1]
    assert last["level"] == "ERROR" and last["message"].startswith("gateway: cannot listen")


def test_a_reload_switches_the_supervisors_format_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--workers N`: each worker applies `log.format` on SIGHUP like any gateway, and so does
    the supervisor, so that the group keeps writing one format."""
    from gateway.config import load_config
    from gateway.workers import Supervisor

    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter(logs.LOG_FORMAT))
    monkeypatch.setattr(logs, "_handler", handler)
    monkeypatch.setattr(logging.getLogger(), "level", logging.getLogger().level)
    path = _config(tmp_path, free_port(), free_port(), free_port())
    text = yaml.safe_load(path.read_text(encoding="utf-8"))
    text["log"]["format"] = "text"
    path.write_text(yaml.safe_dump(text), encoding="utf-8")
    supervisor = Supervisor(load_config(path), str(path), 2, "asyncio")
    try:
        path.write_text(yaml.safe_dump({**text, "log": {"format": "json"}}), encoding="utf-8")
        supervisor._reload()
        assert isinstance(handler.formatter, JsonFormatter)
    finally:
        supervisor._remove_sockets()
