"""``ORCH_WORKER_CPUS``: the CPUs a worker process runs on, as a Linux CPU list (``1``, ``0,2``, ``2-3``).

A threads worker runs Python on one CPU at a time (the interpreter lock), and its hundreds of threads hand the lock
to one another at every wait. Between threads on different CPUs each hand-over wakes the other CPU and moves the
interpreter's state into its caches; pinned to one CPU, the same hand-over stays on it. On this project's 2-core
benchmark machine that raised a 500-thread llm worker's steps/s by about 7% (docs/benchmarks.md). A prefork worker's
processes inherit the list.
"""

from __future__ import annotations

import os
import re
from typing import Final

__all__ = ["MAX_CPU", "apply_cpus", "parse_cpus", "worker_cpus"]

MAX_CPU: Final = 4095
"""The highest CPU number a list may name."""

MAX_LIST_CHARS: Final = 256
_ITEM = re.compile(r"(\d{1,4})(?:-(\d{1,4}))?")


def parse_cpus(text: str) -> frozenset[int]:
    """The CPUs of a Linux CPU list: numbers and ranges separated by commas (``0``, ``0,2``, ``1-3,6``).

    Raises:
        ValueError: One line naming the value: a list that does not parse, is empty or too long, a CPU above
            :data:`MAX_CPU`, or a range that runs backwards.
    """
    if len(text) > MAX_LIST_CHARS:
        raise ValueError(f"ORCH_WORKER_CPUS is {len(text)} characters; a CPU list has at most {MAX_LIST_CHARS}")
    cpus: set[int] = set()
    for item in text.replace(" ", "").split(","):
        match = _ITEM.fullmatch(item)
        if match is None:
            raise ValueError(f"ORCH_WORKER_CPUS={text!r} is not a CPU list such as 1, 0,2 or 2-3")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first or last > MAX_CPU:
            raise ValueError(f"ORCH_WORKER_CPUS={text!r}: {item} is not a range of CPUs from 0 to {MAX_CPU}")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def worker_cpus(text: str | None) -> frozenset[int] | None:
    """The CPUs ``ORCH_WORKER_CPUS`` (``text``) pins this worker to, checked against those it may use; ``None``
    when unset.

    Raises:
        ValueError: The list does not parse (see :func:`parse_cpus`), names a CPU this process may not run on (the
            machine's, or its container's, set), or the system cannot pin processes (not Linux).
    """
    if text is None:
        return None
    cpus = parse_cpus(text)
    if not hasattr(os, "sched_getaffinity"):
        raise ValueError("ORCH_WORKER_CPUS needs Linux (sched_setaffinity); unset it here")
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        outside = ",".join(str(cpu) for cpu in sorted(cpus - allowed))
        available = ",".join(str(cpu) for cpu in sorted(allowed))
        raise ValueError(f"ORCH_WORKER_CPUS={text!r} names CPU {outside}, which this worker may not use ({available})")
    return cpus


def apply_cpus(cpus: frozenset[int]) -> None:
    """Run this process, every thread it has and every thread and process it starts, on ``cpus`` only (as
    :func:`worker_cpus` gives them)."""
    # Threads created from now on inherit the calling thread's set; the ones already running are set one by one.
    for task in _threads():
        try:
            os.sched_setaffinity(task, cpus)
        except (ProcessLookupError, PermissionError):
            continue  # a thread that ended meanwhile
    os.sched_setaffinity(0, cpus)


def _threads() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return []
