"""Child processes of the benchmark: pinned with taskset, each in its own process group,
logged to files in the run's temp dir, and all killed at exit (normal, exception, Ctrl-C,
SIGTERM). Children also get PR_SET_PDEATHSIG, so they die with the benchmark even if it is
killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import http.client
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class BenchError(Exception):
    """A setup step failed; the message says which and where its log is."""


@dataclass
class Child:
    name: str
    argv: list[str]
    cpus: str | None
    log: Path
    popen: subprocess.Popen[bytes]
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Procs:
    """Owns every long-running child of one benchmark run."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        cpus: str | None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        command = ["taskset", "-c", cpus, *argv] if cpus else list(argv)
        log = self.workdir / f"{name}.log"
        merged = dict(os.environ)
        if env:
            merged.update(env)
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=merged,
                cwd=cwd,
                start_new_session=True,  # own process group: killpg reaches forked workers
                preexec_fn=_die_with_parent,  # the benchmark is single-threaded
            )
        child = Child(name, command, cpus, log, popen)
        self.children.append(child)
        return child

    def stop(self, child: Child, grace: float = 5.0) -> None:
        if child in self.children:
            self.children.remove(child)
        _signal_group(child.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=grace)
        _signal_group(child.pid, signal.SIGKILL)  # stragglers: workers, nginx workers
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=grace)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together so they cannot repeat)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One request to 127.0.0.1:port (no proxies from the environment, ever)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_until(
    what: str, check: Callable[[], bool], child: Child | None = None, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise BenchError(
                f"{what}: {child.name} exited with {child.popen.returncode}; "
                f"log {child.log}:\n{child.log_tail()}"
            )
        try:
            if check():
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.05)
    tail = f"; log {child.log}:\n{child.log_tail()}" if child is not None else ""
    raise BenchError(f"{what}: not ready after {timeout:g}s{tail}")


def http_ok(port: int, path: str = "/", headers: Mapping[str, str] | None = None) -> bool:
    status, _ = http_request(port, "GET", path, headers=headers, timeout=2.0)
    return status == 200


def emulator_call(port: int, path: str, doc: dict[str, Any] | None = None) -> Any:
    """The emulator's control API: GET without a document, POST with one; its JSON answer."""
    body = None if doc is None else json.dumps(doc).encode()
    method = "GET" if doc is None else "POST"
    status, raw = http_request(
        port, method, path, body=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    if status >= 300:
        raise BenchError(f"emulator {method} {path}: {status} {raw[:200]!r}")
    return json.loads(raw)
