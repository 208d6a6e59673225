"""Access log: one JSON line per request on stdout, and request ids.

Lines are buffered and written at most every 100 ms (or when 64 KiB are waiting), so the
hot path pays for a json.dumps and a list append, not for a system call per request.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from typing import TextIO

_FLUSH_INTERVAL = 0.1
_FLUSH_BYTES = 64 * 1024
_PIPE_BUF = 4096
_MAX_REQUEST_ID = 128
_REQUEST_ID_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._:+/="
)


class RequestIds:
    """A random per-process prefix and a counter: unique, cheap, and never guessable as a whole."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def take(self, offered: str | None) -> str:
        if offered and len(offered) <= _MAX_REQUEST_ID and _sane(offered):
            return offered
        return f"{self._prefix}-{next(self._counter):x}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _sane(value: str) -> bool:
    return all(c in _REQUEST_ID_CHARS for c in value)


class AccessLog:
    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout
        try:
            self._stream.flush()
            self._fd: int | None = self._stream.fileno()
        except (OSError, ValueError, AttributeError):
            self._fd = None  # not a real file (captured in tests): use the stream
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def write(self, line: str) -> None:
        """One whole JSON object, without the newline."""
        self._lines.append(line)
        self._size += len(line)
        if self._size >= _FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        lines, self._lines, self._size = self._lines, [], 0
        try:
            if self._fd is None:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
                return
            # Several workers share one stdout pipe: each write() is whole lines and at
            # most PIPE_BUF bytes, so the kernel never interleaves two workers' lines.
            chunk: list[bytes] = []
            size = 0
            for line in lines:
                data = line.encode("utf-8", "backslashreplace") + b"\n"
                if size + len(data) > _PIPE_BUF and chunk:
                    _write_all(self._fd, b"".join(chunk))
                    chunk, size = [], 0
                chunk.append(data)
                size += len(data)
            _write_all(self._fd, b"".join(chunk))
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe): losing access lines must not stop the proxy
