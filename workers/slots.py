"""How many worker slots take steps: each worker's main process says so every other sweep interval, and a finishing
step reads the sum before it decides whether its fan-out goes out in batches (:mod:`orchestrator.engine.batches`).

``orch:worker_slots`` scores ``HOSTNAME CONCURRENCY`` by when the worker stops being known alive, by Redis's clock:
:data:`ALIVE_INTERVALS` sweep intervals after it last said so, and it says so again every :data:`ANNOUNCE_INTERVALS`,
so one late or failed turn costs nothing. A worker that stops removes itself; a killed one's slots stop counting within
:data:`ALIVE_INTERVALS` intervals and its entry is dropped by a reader :data:`FORGET_AFTER_S` later. Both sides stamp
and judge by the process's estimate of Redis's clock (:class:`~orchestrator.state.redis.clock.RedisClock`), so an
announcement is one ``ZADD`` and a read one ``ZRANGE``: no ``TIME`` of their own. A reader caches the sum for
:data:`SLOTS_CACHE_S`, so a fan-out costs one read at most that often.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import cast

import redis

from orchestrator.state import RedisStateStore, keys

log = logging.getLogger(__name__)

SLOTS_CACHE_S = 5.0
"""How long a process trusts the slots it last read."""

ALIVE_INTERVALS = 4
"""How long, in sweep intervals, a worker's slots count without its saying so again."""

ANNOUNCE_INTERVALS = 2
"""How often, in sweep intervals, a worker says so again: half of :data:`ALIVE_INTERVALS`."""

FORGET_AFTER_S = 600.0
"""How long after its slots stopped counting a reader drops a worker's entry (one that was killed, never withdrawn)."""


def member(hostname: str, concurrency: int) -> str:
    """A worker's entry in ``orch:worker_slots``."""
    return f"{hostname} {concurrency}"


def announce_slots(store: RedisStateStore, hostname: str, concurrency: int, alive_s: float) -> None:
    """Say that ``hostname`` runs ``concurrency`` slots for ``alive_s`` more (0: it stops, remove it).

    Raises:
        redis.RedisError: Redis did not answer.
    """
    entry = member(hostname, concurrency)
    if alive_s <= 0:
        store.client.zrem(keys.WORKER_SLOTS, entry)
        return
    store.client.zadd(keys.WORKER_SLOTS, {entry: store.clock.now() + alive_s})


class SlotsBeat:
    """A worker's announcements, sent from its sweeper's turns when :meth:`due`: on the first, then once every
    :data:`ANNOUNCE_INTERVALS` sweep intervals (at the next turn after one that failed).

    Args:
        hostname: The worker's name.
        concurrency: Its slots.
        interval_s: The sweep interval.
        clock: Seconds, monotonic (tests pass their own).
    """

    def __init__(
        self, hostname: str, concurrency: int, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.hostname = hostname
        self.concurrency = concurrency
        self.interval_s = interval_s
        self._clock = clock
        self._said_at = float("-inf")

    def due(self) -> bool:
        """Whether this turn should announce the slots: the first one, then every :data:`ANNOUNCE_INTERVALS`."""
        # Half an interval early at most: a turn that comes a little sooner than the last one's cadence still says so.
        return self._clock() - self._said_at >= (ANNOUNCE_INTERVALS - 0.5) * self.interval_s

    def say(self, store: RedisStateStore) -> None:
        """Announce the slots, counted for :data:`ALIVE_INTERVALS` sweep intervals.

        Raises:
            redis.RedisError: Redis did not answer (the slots are due again at the next turn).
        """
        now = self._clock()
        announce_slots(store, self.hostname, self.concurrency, ALIVE_INTERVALS * self.interval_s)
        self._said_at = now

    def withdraw(self, store: RedisStateStore) -> None:
        """Remove the worker's slots (it stops).

        Raises:
            redis.RedisError: Redis did not answer (the slots lapse on their own).
        """
        announce_slots(store, self.hostname, self.concurrency, 0.0)


class KnownSlots:
    """The slots of the workers known alive, read at most every :data:`SLOTS_CACHE_S` (0 when unknown).

    Args:
        store: Gives the Redis store to read from (called on every read; the first builds the process's store).
    """

    def __init__(self, store: Callable[[], RedisStateStore]) -> None:
        self._store = store
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
            slots = live_slots(self._store())
        except redis.RedisError as exc:
            log.warning("could not read the workers' slots (%s); the fan-out goes out one step a message", exc)
            slots = 0
        with self._lock:
            self._slots = slots
        return slots


def live_slots(store: RedisStateStore) -> int:
    """The sum of the live workers' concurrency, by one read (and one more to drop entries long lapsed, if any).

    Raises:
        redis.RedisError: Redis did not answer.
    """
    entries = cast(list[tuple[bytes | str, float]], store.client.zrange(keys.WORKER_SLOTS, 0, -1, withscores=True))
    now = store.clock.now()
    if any(until < now - FORGET_AFTER_S for _, until in entries):
        store.client.zremrangebyscore(keys.WORKER_SLOTS, "-inf", now - FORGET_AFTER_S)
    return sum(_concurrency(entry) for entry, until in entries if until > now)


def _concurrency(entry: bytes | str) -> int:
    text = entry.decode() if isinstance(entry, bytes) else entry
    _, _, count = text.rpartition(" ")
    return int(count) if count.isdigit() else 0
