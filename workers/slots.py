"""How many worker slots take steps: each worker's main process says so every sweep interval, and a finishing step
reads the sum before it decides whether its fan-out goes out in batches (:mod:`orchestrator.engine.batches`).

``orch:worker_slots`` scores ``HOSTNAME CONCURRENCY`` by when the worker stops being known alive (three sweep
intervals after it last said so); a worker that stops removes itself. A reader caches the sum for
:data:`SLOTS_CACHE_S`, so a fan-out costs one read at most that often.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import cast

import redis

from orchestrator.state import keys

log = logging.getLogger(__name__)

SLOTS_CACHE_S = 5.0
"""How long a process trusts the slots it last read."""

ALIVE_INTERVALS = 3
"""How long, in sweep intervals, a worker's slots count without its saying so again."""


def member(hostname: str, concurrency: int) -> str:
    """A worker's entry in ``orch:worker_slots``."""
    return f"{hostname} {concurrency}"


def announce_slots(client: redis.Redis, hostname: str, concurrency: int, alive_s: float) -> None:
    """Say that ``hostname`` runs ``concurrency`` slots for ``alive_s`` more (0: it stops, remove it)."""
    entry = member(hostname, concurrency)
    if alive_s <= 0:
        client.zrem(keys.WORKER_SLOTS, entry)
        return
    seconds, micros = client.time()
    client.zadd(keys.WORKER_SLOTS, {entry: seconds + micros / 1e6 + alive_s})


class KnownSlots:
    """The slots of the workers known alive, read at most every :data:`SLOTS_CACHE_S` (0 when unknown).

    Args:
        client: Builds the Redis client to read with (called on the first read of each process).
    """

    def __init__(self, client: Callable[[], redis.Redis]) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._slots = 0

    def __call__(self) -> int:
        """The sum of the live workers' concurrency."""
        now = time.monotonic()
        with self._lock:
            if now - self._read_at < SLOTS_CACHE_S:
                return self._slots
            self._read_at = now
        try:
            client = self._client()
            seconds, _ = client.time()
            entries = cast(list[bytes | str], client.zrangebyscore(keys.WORKER_SLOTS, seconds, "+inf"))
            slots = sum(_concurrency(entry) for entry in entries)
        except redis.RedisError as exc:
            log.warning("could not read the workers' slots (%s); the fan-out goes out one step a message", exc)
            slots = 0
        with self._lock:
            self._slots = slots
        return slots


def _concurrency(entry: bytes | str) -> int:
    text = entry.decode() if isinstance(entry, bytes) else entry
    _, _, count = text.rpartition(" ")
    return int(count) if count.isdigit() else 0
