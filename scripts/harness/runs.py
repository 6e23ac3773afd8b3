"""Submitting in bursts and waiting for conditions, always with a deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis

from orchestrator.state import keys

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


class RunEnds:
    """Which runs have ended, read from the run-end announcements of the global stream (``orch:events``, one per
    bucket), as a dashboard follows them: one ``XREAD`` per bucket and poll for what was announced since, where asking
    each pending run for its status costs an ``HMGET`` per run and poll (5,000 a second with 10,000 runs in flight,
    which only the measured system's side of a benchmark paid).

    Args:
        client: A Redis client answering strings (``decode_responses=True``).
        shards: The store's buckets (``Settings.shards``).
    """

    READ_COUNT = 10_000
    """Announcements read per command at most; a poll reads again while a read comes back full."""

    def __init__(self, client: redis.Redis, shards: int) -> None:
        self.client = client
        self.commands = 0
        self.ended: set[str] = set()
        self._after: dict[str, str] = {}
        for shard in keys.all_shards(shards):
            stream = keys.global_events_key(shard)
            last: Any = client.xrevrange(stream, count=1)
            self._after[stream] = last[0][0] if last else "0-0"
            self.commands += 1

    def poll(self) -> set[str]:
        """The runs whose end was announced since the last poll (since this follower was made, the first time)."""
        new: set[str] = set()
        for stream in self._after:
            while True:
                reply: Any = self.client.xread({stream: self._after[stream]}, count=self.READ_COUNT)
                self.commands += 1
                rows = reply[0][1] if reply else []
                for entry_id, fields in rows:
                    self._after[stream] = entry_id
                    if fields.get("type", "").removeprefix("run_") in FINISHED:
                        new.add(fields["run_id"])
                if len(rows) < self.READ_COUNT:
                    break
        self.ended |= new
        return new
