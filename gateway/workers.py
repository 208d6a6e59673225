"""`gateway run --workers N`: N processes sharing the listeners through SO_REUSEPORT.

The parent only supervises: it forwards SIGTERM/SIGINT (and SIGHUP) to every worker,
restarts a worker that died unexpectedly, and exits 0 once all have drained.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

log = logging.getLogger("gateway.workers")

_RESTART_BACKOFF = 1.0
_MIN_UPTIME = 2.0  # a worker dying sooner than this will not do better if restarted


def supervise(count: int, work: Callable[[int], int]) -> int:
    """Fork `count` workers running `work(index)`; return when all have exited."""
    stopping = False
    children: dict[int, int] = {}  # pid -> worker index
    born: dict[int, float] = {}

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # child
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = work(index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index
        born[pid] = time.monotonic()

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for index in range(count):
        spawn(index)
    log.info("started %d workers", count)

    worst = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in children:
            continue
        index = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            worst = max(worst, code if code > 0 else 0)
            continue
        if time.monotonic() - born.pop(pid, 0.0) < _MIN_UPTIME:
            log.error("worker %d exited with %d right after start; stopping all", index, code)
            stopping = True
            worst = max(worst, code if code > 0 else 1)
            forward(signal.SIGTERM, None)
            continue
        log.error("worker %d (pid %d) exited with %d; restarting", index, pid, code)
        time.sleep(_RESTART_BACKOFF)
        if not stopping:
            spawn(index)
    return worst
