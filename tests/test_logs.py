"""Access log lines and request ids; the gateway's own log with repeated lines collapsed."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.emulator import Emulator, Override
from gateway.logs import RepeatFilter, collapse_repeats
from tests.conftest import (
    StartGateway,
    bearer,
    echo_of,
    free_port,
    header_values,
    wait_for_port,
)


def _routes(upstream: str) -> list[dict[str, Any]]:
    return [
        {"name": "public", "path_prefix": "/public", "upstream": upstream, "auth": "none"},
        {"name": "orders", "path_prefix": "/orders", "upstream": upstream, "scopes": ["r"]},
    ]


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_one_json_line_per_request(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = "log-token-abcdef"
    emulator.add_token(token, subject="alice", client_id=99, scopes=["r"])
    gw = await start_gateway(_routes(upstream))
    async with client.get(f"{gw.url}/orders/1?secret=q", headers=bearer(token)) as resp:
        assert resp.status == 200
    async with client.get(f"{gw.url}/orders/1", headers=bearer(token)) as resp:
        assert resp.status == 200
    async with client.post(f"{gw.url}/public/up", data=b"x" * 1000) as resp:
        assert resp.status == 200
    async with client.get(f"{gw.url}/orders/2") as resp:
        assert resp.status == 401
    async with client.get(f"{gw.url}/nowhere") as resp:
        assert resp.status == 404
    await asyncio.sleep(0.3)  # lines are flushed at most every 100 ms
    out = capsys.readouterr().out
    lines = _lines(out)
    assert len(lines) == 5
    first, second, upload, denied, missing = lines
    assert first["route"] == "orders" and first["status"] == 200 and first["method"] == "GET"
    assert first["path"] == "/orders/1"  # no query: it may hold secrets
    assert first["cache"] == "miss" and second["cache"] == "hit"
    assert first["subject"] == "alice" and first["client_id"] == "99"
    assert isinstance(first["upstream_duration"], float)
    assert first["duration"] >= first["upstream_duration"]
    assert first["bytes_out"] > 0
    assert upload["bytes_in"] == 1000 and upload["subject"] is None
    assert denied["status"] == 401 and denied["upstream_duration"] is None
    assert missing["route"] == "(none)" and missing["status"] == 404
    assert all(isinstance(line["time"], float) and line["request_id"] for line in lines)
    assert len({line["request_id"] for line in lines}) == 5
    assert token not in out and "secret=q" not in out


async def test_request_id_taken_when_sane_and_passed_on(
    upstream: str, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(_routes(upstream))
    async with client.get(f"{gw.url}/public/x", headers={"X-Request-Id": "abc-123"}) as resp:
        assert resp.headers["X-Request-Id"] == "abc-123"
        echo = await echo_of(resp)
    assert header_values(echo, "X-Request-Id") == ["abc-123"]
    for insane in ("a b", "x" * 200, "<script>", ""):
        async with client.get(f"{gw.url}/public/x", headers={"X-Request-Id": insane}) as resp:
            generated = resp.headers["X-Request-Id"]
            echo = await echo_of(resp)
        assert generated != insane and generated
        assert header_values(echo, "X-Request-Id") == [generated]
    async with client.get(f"{gw.url}/orders") as resp:
        assert resp.status == 401 and resp.headers["X-Request-Id"]


async def test_access_log_can_be_switched_off(
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gw = await start_gateway(_routes(upstream), log={"access": False})
    async with client.get(f"{gw.url}/public/x") as resp:
        assert resp.status == 200
    await asyncio.sleep(0.3)
    assert _lines(capsys.readouterr().out) == []


async def test_lines_stay_valid_json_for_hostile_values(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    capsys: pytest.CaptureFixture[str],
) -> None:
    subject = 'a"b\\c ü \u2028 </script>'
    emulator.add_token("tok-odd", subject=subject, scopes=["r"])
    gw = await start_gateway(_routes(upstream))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"GET /orders HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer tok-odd\r\n\r\n"
        b'GET /pub"lic/\\x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n'
    )
    await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await asyncio.sleep(0.3)
    lines = _lines(capsys.readouterr().out)
    assert [line["status"] for line in lines] == [200, 400]
    assert lines[0]["subject"] == subject
    assert lines[1]["path"].startswith("/pub")


# --------------------------------------------------------------------------- collapsed repeats


class _Lines(logging.Handler):
    """Keeps each formatted line, as a stream handler would write it."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def collapsed() -> Iterator[tuple[logging.Logger, _Lines, RepeatFilter, _Clock]]:
    clock = _Clock()
    lines = _Lines()
    repeats = collapse_repeats(lines, clock=clock)
    logger = logging.getLogger("gateway.test-collapse")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(lines)
    try:
        yield logger, lines, repeats, clock
    finally:
        logger.removeHandler(lines)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


def test_a_flood_of_one_kind_is_one_line_and_a_count(
    collapsed: tuple[logging.Logger, _Lines, RepeatFilter, _Clock],
) -> None:
    logger, lines, _, clock = collapsed
    for i in range(10_000):
        logger.warning("no verdict for route %s: %s", "orders", f"attempt {i}")
        clock.now += 0.0005  # 10,000 in 5 s
    assert lines.lines == ["WARNING gateway.test-collapse: no verdict for route orders: attempt 0"]
    clock.now += 5.5  # the interval is over; the next line of any kind brings the count
    logger.info("something else")
    assert lines.lines[1:] == [
        "WARNING gateway.test-collapse: no verdict for route orders: attempt 0"
        " (and 9999 more like this within 10 s)",
        "INFO gateway.test-collapse: something else",
    ]


def test_a_steady_flood_gives_two_lines_per_interval(
    collapsed: tuple[logging.Logger, _Lines, RepeatFilter, _Clock],
) -> None:
    logger, lines, repeats, clock = collapsed
    for _ in range(30_000):  # 1,000 a second for 30 s
        logger.warning("upstream %s for route %s: %s", "http://10.0.0.1:80", "api", "refused")
        clock.now += 0.001
    repeats.flush()
    assert len(lines.lines) == 6
    firsts, summaries = lines.lines[0::2], lines.lines[1::2]
    assert set(firsts) == {
        "WARNING gateway.test-collapse: upstream http://10.0.0.1:80 for route api: refused"
    }
    counts = [int(line.split("(and ")[1].split()[0]) for line in summaries]
    assert sum(counts) + len(firsts) == 30_000
    assert all(9_990 <= count <= 10_000 for count in counts), counts


def test_kinds_are_counted_separately(
    collapsed: tuple[logging.Logger, _Lines, RepeatFilter, _Clock],
) -> None:
    logger, lines, repeats, clock = collapsed
    for i in range(300):
        logger.warning("no verdict for route %s: %s", "orders", "breaker open")
        if i % 3 == 0:
            logger.warning("upstream %s for route %s: %s", "http://u:1", "orders", "timeout")
        if i % 10 == 0:
            logger.error("no verdict for route %s: %s", "orders", "breaker open")  # other level
        clock.now += 0.01
    assert len(lines.lines) == 3
    repeats.flush()
    summaries = sorted(lines.lines[3:])
    assert summaries == [
        "ERROR gateway.test-collapse: no verdict for route orders: breaker open"
        " (and 29 more like this within 10 s)",
        "WARNING gateway.test-collapse: no verdict for route orders: breaker open"
        " (and 299 more like this within 10 s)",
        "WARNING gateway.test-collapse: upstream http://u:1 for route orders: timeout"
        " (and 99 more like this within 10 s)",
    ]


def test_a_kind_seen_again_after_the_interval_is_logged_again(
    collapsed: tuple[logging.Logger, _Lines, RepeatFilter, _Clock],
) -> None:
    logger, lines, repeats, clock = collapsed
    logger.warning("config reload rejected: %s", "first")
    clock.now += 10.5
    logger.warning("config reload rejected: %s", "second")  # nothing held back: no summary
    clock.now += 3
    logger.warning("config reload rejected: %s", "third")
    clock.now += 8
    logger.warning("config reload rejected: %s", "fourth")
    repeats.flush()
    repeats.flush()  # nothing left to sum up
    assert [line.split(": ", 1)[1] for line in lines.lines] == [
        "config reload rejected: first",
        "config reload rejected: second",
        "config reload rejected: second (and 1 more like this within 10 s)",
        "config reload rejected: fourth",
    ]


def test_debug_lines_are_never_collapsed(
    collapsed: tuple[logging.Logger, _Lines, RepeatFilter, _Clock],
) -> None:
    logger, lines, _, _ = collapsed
    for i in range(50):
        logger.debug("step %d", i)
    assert len(lines.lines) == 50


def test_the_number_of_kinds_tracked_is_bounded() -> None:
    clock = _Clock()
    lines = _Lines()
    repeats = collapse_repeats(lines, clock=clock, max_kinds=4)
    logger = logging.getLogger("gateway.test-collapse-bounded")
    logger.propagate = False
    logger.addHandler(lines)
    try:
        for _ in range(3):
            for kind in range(10):
                logger.warning(f"kind {kind}: %s", "x")  # ten templates on purpose
        assert len(repeats._kinds) <= 4
        # Evicted kinds are summed up when they go, so no count is lost.
        repeats.flush()
        passed = [line for line in lines.lines if "more like this" not in line]
        counted = sum(
            int(line.split("(and ")[1].split()[0]) for line in lines.lines if "(and " in line
        )
        assert len(passed) + counted == 30
    finally:
        logger.removeHandler(lines)
        logger.propagate = True


async def test_gateway_answering_503s_logs_a_bounded_number_of_lines(
    emulator: Emulator,
    upstream: str,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
) -> None:
    """In process: the real listener's WARNING per 503, through the filter `gateway run`
    installs on its stderr handler."""
    emulator.override = Override(status=500)  # Authlete fails every call
    lines = _Lines()
    repeats = collapse_repeats(lines)
    gateway_logger = logging.getLogger("gateway")
    gateway_logger.addHandler(lines)
    try:
        gw = await start_gateway(_routes(upstream), authlete={"retries": 0})

        async def one(i: int) -> int:
            async with client.get(f"{gw.url}/orders/{i}", headers=bearer(f"tok-{i}")) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(400)))
        assert statuses == [503] * 400
        repeats.flush()
    finally:
        gateway_logger.removeHandler(lines)
    verdicts = [line for line in lines.lines if "no verdict for route orders" in line]
    assert len(verdicts) == 2, lines.lines
    assert verdicts[1].endswith("(and 399 more like this within 10 s)")
    assert len(lines.lines) <= 6, lines.lines
    assert not any("tok-" in line for line in lines.lines)


def test_gateway_run_collapses_its_stderr(tmp_path: Path) -> None:
    """`gateway run` as an operator starts it: 400 requests answered 503 (Authlete
    unreachable) leave two lines on stderr, the second one with the count (written at
    exit)."""
    port, admin = free_port(), free_port()
    # Authlete's port: bound but not listening, so every call is refused while the test runs.
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))
    config = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "authlete": {
            "base_url": f"http://127.0.0.1:{refusing.getsockname()[1]}",
            "allow_insecure_http": True,
            "service_id": "715948317",
            "access_token": "t",
            "retries": 0,
        },
        "log": {"access": False},
        "routes": [{"name": "orders", "path_prefix": "/orders", "upstream": "http://127.0.0.1:9"}],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with (tmp_path / "stderr").open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(path), "--loop", "asyncio"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    stderr = tmp_path / "stderr"
    try:
        wait_for_port(port, proc)
        assert proc.poll() is None, stderr.read_text(encoding="utf-8")

        async def flood() -> list[int]:
            async with aiohttp.ClientSession() as session:

                async def one(i: int) -> int:
                    url = f"http://127.0.0.1:{port}/orders/{i}"
                    async with session.get(url, headers=bearer(f"tok-{i}")) as resp:
                        return resp.status

                return await asyncio.gather(*(one(i) for i in range(400)))

        statuses = asyncio.run(flood())
        assert statuses == [503] * 400, (sorted(set(statuses)), stderr.read_text(encoding="utf-8"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        refusing.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = stderr.read_text(encoding="utf-8")
    verdicts = [line for line in text.splitlines() if "no verdict for route orders" in line]
    assert len(verdicts) == 2, text
    assert " WARNING gateway: " in verdicts[0]
    assert verdicts[1].endswith("(and 399 more like this within 10 s)"), text
    assert len(text.splitlines()) <= 10, text
