"""Access log: one JSON line per request on stdout, and request ids. The gateway's own
messages on stderr (`log.format`: text, or one JSON object per line), with repeated lines of
one kind collapsed.

Access lines are buffered and written at most every 100 ms (or when 64 KiB are waiting), so
the hot path pays for a json.dumps and a list append, not for a system call per request.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import json
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
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


# --------------------------------------------------------------------------- the gateway's own log

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")
COLLAPSE_INTERVAL = 10.0  # seconds a kind of message is logged once, then counted
COLLAPSE_MAX_KINDS = 256  # kinds tracked at once; the oldest is closed (and summed up) first


@dataclass(slots=True)
class _Kind:
    end: float  # the clock reading when this kind's interval ends
    suppressed: int
    # What the summary line repeats: the first record's place and rendered message.
    name: str
    level: int
    pathname: str
    lineno: int
    func: str | None
    message: str


class RepeatFilter(logging.Filter):
    """Lets the first record of a kind through, then counts the kind's records for
    `interval` seconds instead of passing them on; a kind is (logger name, level, message
    template), so "no verdict for route %s: %s" is one kind whatever the route and reason.

    When a kind's interval has ended and records were held back, one summary line goes out
    with the first line's message and the count: `... (and 1234 more like this within 10 s)`.
    Intervals are checked when the next record of any kind arrives (no timer, no thread),
    and `flush()` sums up every open kind (at exit). Records below `min_level` (DEBUG by
    default) always pass: whoever turns debug on wants every line.
    """

    def __init__(
        self,
        emit: Callable[[logging.LogRecord], object],
        *,
        interval: float = COLLAPSE_INTERVAL,
        max_kinds: int = COLLAPSE_MAX_KINDS,
        min_level: int = logging.INFO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._emit = emit
        self._interval = interval
        self._max_kinds = max(1, max_kinds)
        self._min_level = min_level
        self._clock = clock
        # Insertion order is the order of interval ends: every interval is equally long.
        self._kinds: OrderedDict[tuple[str, int, str], _Kind] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "collapsed_summary", False) or getattr(record, "always_log", False):
            return True  # our own summary, or a change of state that must never be held back
        summaries: list[logging.LogRecord] = []
        with self._lock:
            now = self._clock()
            self._expire(now, summaries)
            passed = record.levelno < self._min_level or self._admit(record, now, summaries)
        for summary in summaries:
            self._emit(summary)
        return passed

    def flush(self) -> None:
        """Sum up every kind that has records held back (the process is ending)."""
        summaries: list[logging.LogRecord] = []
        with self._lock:
            while self._kinds:
                self._close(summaries)
        for summary in summaries:
            self._emit(summary)

    def _admit(self, record: logging.LogRecord, now: float, out: list[logging.LogRecord]) -> bool:
        msg = record.msg if isinstance(record.msg, str) else str(record.msg)
        key = (record.name, record.levelno, msg)
        kind = self._kinds.get(key)
        if kind is not None:
            kind.suppressed += 1
            return False
        while len(self._kinds) >= self._max_kinds:
            self._close(out)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler reports it; keep the template
            message = msg
        self._kinds[key] = _Kind(
            now + self._interval,
            0,
            record.name,
            record.levelno,
            record.pathname,
            record.lineno,
            record.funcName,
            message,
        )
        return True

    def _expire(self, now: float, out: list[logging.LogRecord]) -> None:
        while self._kinds and next(iter(self._kinds.values())).end <= now:
            self._close(out)

    def _close(self, out: list[logging.LogRecord]) -> None:
        """End the oldest kind's interval; a summary if anything was held back."""
        _, kind = self._kinds.popitem(last=False)
        if kind.suppressed:
            summary = logging.LogRecord(
                kind.name,
                kind.level,
                kind.pathname,
                kind.lineno,
                f"{kind.message} (and {kind.suppressed} more like this "
                f"within {self._interval:g} s)",
                None,
                None,
                kind.func,
            )
            summary.collapsed_summary = True
            summary.repeated = kind.suppressed
            out.append(summary)


def collapse_repeats(
    handler: logging.Handler,
    *,
    interval: float = COLLAPSE_INTERVAL,
    max_kinds: int = COLLAPSE_MAX_KINDS,
    clock: Callable[[], float] = time.monotonic,
) -> RepeatFilter:
    """Install a RepeatFilter on `handler` (summaries go out through the same handler)."""
    repeats = RepeatFilter(handler.handle, interval=interval, max_kinds=max_kinds, clock=clock)
    handler.addFilter(repeats)
    return repeats


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line, for `log.format: json`: `time` (epoch
    seconds, as in the access log), `level`, `logger`, `message`, then `request_id` when the
    record was logged for a request (`extra={"request_id": ...}`), `repeated` on a collapsed
    kind's summary line, and `exception` (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            doc["request_id"] = str(request_id)
        repeated = getattr(record, "repeated", None)
        if repeated is not None:
            doc["repeated"] = repeated
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, separators=(",", ":"), default=str)


def formatter(fmt: str) -> logging.Formatter:
    """The formatter of the gateway's own log for `log.format`."""
    return JsonFormatter() if fmt == "json" else logging.Formatter(LOG_FORMAT)


_handler: logging.Handler | None = None  # the stderr handler setup_logging installed


def setup_logging(level: str = "info", stream: TextIO | None = None, fmt: str = "text") -> None:
    """The gateway's own messages on stderr, repeated ones collapsed (see RepeatFilter), as
    text lines or JSON objects (`fmt`). Like logging.basicConfig: does nothing when the root
    logger already has a handler."""
    global _handler
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt))
    repeats = collapse_repeats(handler)
    root.addHandler(handler)
    root.setLevel(level.upper())
    _handler = handler
    atexit.register(repeats.flush)  # runs before logging's own shutdown (atexit is LIFO)


def set_log_format(fmt: str) -> None:
    """A reload changed `log.format`: the handler setup_logging installed writes the new way."""
    if _handler is not None:
        _handler.setFormatter(formatter(fmt))


def logs_json() -> bool:
    """Whether the gateway's own log is JSON (setup_logging was told `json`)."""
    return _handler is not None and isinstance(_handler.formatter, JsonFormatter)
