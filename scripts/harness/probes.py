"""What the processes and Redis used: CPU, memory and descriptors from ``/proc``; counters from Redis ``INFO``.

Every reader answers 0 (or an empty dict) for a process that is gone or a system without ``/proc``, so a window
around a dying worker still closes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import redis

from orchestrator.dev.local_workers import LocalWorkers

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# Commands a benchmark sends itself around a counting window, left out of ``commandstats``.
OWN_COMMANDS = frozenset({"info", "config|resetstat", "echo", "client|info", "monitor"})
SWITCH_FIELDS = ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")


# -- /proc ---------------------------------------------------------------------------------------------------------


def cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) the process has used so far."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) in kB, and ``Threads``, from ``/proc/PID/status``."""
    return _status_fields(f"/proc/{pid}/status", ("VmRSS", "VmHWM", "Threads"))


def _status_fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    """The first number of each of the ``names`` fields of a ``/proc`` status file (none when it cannot be read)."""
    out: dict[str, int] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        name, _, value = line.partition(":")
        if name in names:
            out[name] = int(value.split()[0])
    return out


def context_switches(pid: int | None) -> tuple[int, int]:
    """Voluntary and involuntary context switches of the process's threads so far, summed over
    ``/proc/PID/task/*/status`` (a thread that has exited takes its own counts with it)."""
    if pid is None:
        return 0, 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    voluntary = involuntary = 0
    for task in tasks:
        counts = _status_fields(f"/proc/{pid}/task/{task}/status", SWITCH_FIELDS)
        voluntary += counts.get(SWITCH_FIELDS[0], 0)
        involuntary += counts.get(SWITCH_FIELDS[1], 0)
    return voluntary, involuntary


def open_fds(pid: int) -> int:
    """How many file descriptors the process holds."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's ``VmHWM`` to its current RSS (``echo 5 > /proc/PID/clear_refs``, Linux ≥ 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_cpu_s() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine so far (``/proc/stat``; idle and iowait are not busy)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks) - idle) / TICK, sum(ticks) / TICK


def workers_cpu_s(workers: LocalWorkers) -> tuple[float, float]:
    """CPU seconds of the workers' main processes and of their pool children."""
    main = children = 0.0
    for name, process in list(workers.processes.items()):
        main += cpu_s(process.pid)
        children += sum(cpu_s(child) for child in workers.pool_children(name))
    return main, children


def workers_context_switches(workers: LocalWorkers) -> tuple[int, int]:
    """Voluntary and involuntary context switches of the workers' main processes' threads so far."""
    voluntary = involuntary = 0
    for process in list(workers.processes.values()):
        v, i = context_switches(process.pid)
        voluntary, involuntary = voluntary + v, involuntary + i
    return voluntary, involuntary


def workers_memory_mb(workers: LocalWorkers) -> dict[str, Any]:
    """RSS of the workers' main processes and pool children in MB, now and at peak, and their thread count."""
    out: dict[str, Any] = {
        "main_rss_mb": 0.0,
        "main_peak_mb": 0.0,
        "children_rss_mb": 0.0,
        "children_peak_mb": 0.0,
        "threads": 0,
    }
    for name, process in list(workers.processes.items()):
        main = proc_status(process.pid)
        out["main_rss_mb"] += main.get("VmRSS", 0) / 1024
        out["main_peak_mb"] += main.get("VmHWM", 0) / 1024
        out["threads"] += main.get("Threads", 0)
        for child in workers.pool_children(name):
            mem = proc_status(child)
            out["children_rss_mb"] += mem.get("VmRSS", 0) / 1024
            out["children_peak_mb"] += mem.get("VmHWM", 0) / 1024
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}


# -- Redis INFO ----------------------------------------------------------------------------------------------------


def commandstats(stats: redis.Redis, ignored: Iterable[str] = OWN_COMMANDS) -> dict[str, int]:
    """Calls per command since the last ``CONFIG RESETSTAT`` (``INFO commandstats``; commands inside Lua count)."""
    skip = set(ignored)
    info: Mapping[str, Any] = stats.info("commandstats")
    out: dict[str, int] = {}
    for key, value in info.items():
        name = key.removeprefix("cmdstat_")
        if name not in skip:
            out[name] = int(value["calls"])
    return out


def used_memory(stats: redis.Redis) -> int:
    """``INFO memory`` ``used_memory``, bytes."""
    return int(stats.info("memory")["used_memory"])


def total_commands(stats: redis.Redis) -> int:
    """``INFO stats`` ``total_commands_processed``."""
    return int(stats.info("stats")["total_commands_processed"])


def total_reads(stats: redis.Redis) -> int:
    """``INFO stats`` ``total_reads_processed``: the socket reads Redis made, about one per client round trip."""
    return int(stats.info("stats")["total_reads_processed"])


def connected_clients(stats: redis.Redis) -> int:
    """``INFO clients`` ``connected_clients``; -1 when Redis does not answer."""
    try:
        return int(stats.info("clients").get("connected_clients", 0))
    except redis.RedisError:
        return -1
