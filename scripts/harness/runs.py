"""Submitting in bursts and waiting for conditions, always with a deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# A run in one of these statuses has ended.
FINISHED = frozenset({"succeeded", "failed", "cancelled", "timed_out"})


def wait_until(check: Callable[[], bool], *, timeout: float, poll_s: float, what: str) -> float:
    """Poll ``check`` until it is true; returns the seconds that took.

    Raises:
        TimeoutError: ``check`` still false after ``timeout`` seconds (the message names ``what``).
    """
    start = time.monotonic()
    deadline = start + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached after {timeout:g}s")
        time.sleep(poll_s)
    return time.monotonic() - start


@dataclass
class Submitted:
    """What a burst of calls produced: ids in order, per-call latencies, start and end (epoch)."""

    ids: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    @property
    def rate(self) -> float:
        """Calls per second over the burst."""
        return len(self.ids) / (self.ended - self.started) if self.ended > self.started else float("nan")


def burst(count: int, threads: int, call: Callable[[int], str], progress: Submitted | None = None) -> Submitted:
    """Call ``call(i)`` for ``i`` in ``range(count)`` from ``threads`` threads; ids land in ``progress`` as they come.

    Raises:
        Exception: The first exception a call raised, after every thread stopped.
    """
    out = progress if progress is not None else Submitted()
    lock = threading.Lock()
    out.started = time.time()

    def worker(indices: Iterable[int]) -> None:
        for i in indices:
            t0 = time.perf_counter()
            ident = call(i)
            elapsed = time.perf_counter() - t0
            with lock:
                out.ids.append(ident)
                out.latencies.append(elapsed)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="submit") as pool:
        futures = [pool.submit(worker, range(k, count, threads)) for k in range(threads)]
        for future in futures:
            future.result()
    out.ended = time.time()
    return out
