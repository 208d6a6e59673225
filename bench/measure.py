"""What /proc says about a process tree: CPU time, peak RSS, allowed CPUs."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """root and all its live descendants."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children[int(fields[1])].append(int(entry.name))  # fields[1] = ppid
    out: list[int] = []
    stack = [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def cpu_seconds(root: int) -> float:
    """utime+stime of the tree, plus the reaped children's (cutime+cstime), in seconds.

    A descendant that exits and is reaped moves its time into its parent's cutime/cstime, so
    the sum stays consistent across the delta of one run.
    """
    return sum(cpu_seconds_by_pid(root).values())


def cpu_seconds_by_pid(root: int) -> dict[int, float]:
    """The same, per process of the tree (e.g. the workers of `gateway run --workers 2`)."""
    out: dict[int, float] = {}
    for pid in tree(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # After the ')' split, utime is index 11 (field 14 of proc(5)); then stime, cutime, cstime.
        out[pid] = sum(int(v) for v in fields[11:15]) / CLK_TCK
    return out


def _status_value(pid: int, key: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def peak_rss_bytes(root: int) -> int:
    """Sum of VmHWM over the tree (peak resident set since each process started)."""
    total = 0
    for pid in tree(root):
        value = _status_value(pid, "VmHWM")
        if value is not None:
            total += int(value.split()[0]) * 1024
    return total


def rss_bytes(root: int) -> int:
    total = 0
    for pid in tree(root):
        value = _status_value(pid, "VmRSS")
        if value is not None:
            total += int(value.split()[0]) * 1024
    return total


def allowed_cpus(pid: int) -> str:
    return _status_value(pid, "Cpus_allowed_list") or "?"


def system_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat.

    busy is user+nice+system only: irq/softirq time (our own loopback traffic) is not charged
    to any process, so counting it would make our own load look like someone else's.
    """
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = fields[:8]
    return (user + nice + system) / CLK_TCK, steal / CLK_TCK
