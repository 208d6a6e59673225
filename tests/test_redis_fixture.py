"""The redis-server fixture of conftest.py (used by the shared-state tests) on its own."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import RedisServer, free_port, start_redis


def ping_within(server: RedisServer, timeout: float) -> bool:
    """True if a raw PING gets +PONG within `timeout` seconds."""
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def test_start_ping_and_settings(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.running and redis_server.pid > 0
    assert redis_server.cli("PING") == "PONG"
    # No persistence, loopback only.
    assert redis_server.cli("CONFIG", "GET", "save") == "save"  # and an empty value
    assert redis_server.cli("CONFIG", "GET", "appendonly").splitlines() == ["appendonly", "no"]
    assert redis_server.cli("CONFIG", "GET", "bind").splitlines() == ["bind", "127.0.0.1"]


def test_pause_and_resume(redis_server: RedisServer) -> None:
    redis_server.cli("SET", "k", "v")
    redis_server.pause()
    started = time.monotonic()
    assert not ping_within(redis_server, 0.3)  # accepted by the kernel, never answered
    assert time.monotonic() - started >= 0.25
    assert redis_server.running
    redis_server.resume()
    assert ping_within(redis_server, 5)
    assert redis_server.cli("GET", "k") == "v"


def test_restart_is_empty_on_the_same_port(redis_server: RedisServer) -> None:
    port, pid = redis_server.port, redis_server.pid
    redis_server.cli("SET", "k", "v")
    redis_server.restart()
    assert redis_server.port == port and redis_server.pid != pid
    assert redis_server.cli("DBSIZE") == "0"
    # Also after a kill (no clean shutdown) and while paused.
    redis_server.cli("SET", "k", "v")
    redis_server.pause()
    redis_server.kill()
    assert not redis_server.running
    assert not ping_within(redis_server, 0.3)
    redis_server.restart()
    assert redis_server.cli("EXISTS", "k") == "0"


def test_stop_while_paused_and_unix_socket(tmp_path: Path) -> None:
    sock = str(tmp_path / "redis.sock")
    server = start_redis(port=free_port(), unix_socket=sock)
    try:
        assert server.unix_url == f"unix://{sock}?db=0"
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            client.connect(sock)
            client.sendall(b"PING\r\n")
            assert client.recv(64).startswith(b"+PONG")
        pid = server.pid
        server.pause()
        server.stop()  # resumes, then SIGTERM
        assert not server.running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        server.close()
    assert not server.dir.exists()


def test_cli_reports_errors(redis_server: RedisServer) -> None:
    redis_server.stop()
    with pytest.raises(RuntimeError, match="redis-cli PING"):
        redis_server.cli("PING")
    redis_server.restart()
    redis_server.pause()
    with pytest.raises(subprocess.TimeoutExpired):
        redis_server.cli("PING", timeout=0.3)
    # left paused: the fixture resumes it before stopping it
