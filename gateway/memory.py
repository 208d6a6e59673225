"""The process's memory: glibc malloc tuning, and giving memory back after a burst.

Python frees objects at once, but glibc keeps freed heap pages mapped for reuse; after an
attack that held hundreds of MiB of unfinished request heads, the process would stay that
big. `release` runs a full collection (connection objects and their parsers form cycles)
and asks glibc to return every free page to the kernel.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc_function(name: str) -> Callable[..., int] | None:
    try:
        fn: Callable[..., int] = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None  # not glibc
    return fn


def tune_malloc() -> None:
    """Fixed glibc malloc thresholds. With the default dynamic ones, large socket buffers
    grew the heap and every free trimmed it again (brk, then freshly zeroed pages): 1 MiB
    downloads cost three times the CPU. Now allocations below 1 MiB come from the heap, and
    up to 2 MiB of free heap stay mapped for the next ones (more kept the peak of 64
    concurrent 1 MiB uploads higher for no speed)."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # type: ignore[attr-defined]
    mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    mallopt(_M_TRIM_THRESHOLD, 2 << 20)


def release() -> None:
    """Collect cycles, then return free heap pages to the kernel (a few ms; run rarely)."""
    gc.collect()
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]  # type: ignore[attr-defined]
        trim(0)
