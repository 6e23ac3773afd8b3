"""Redis's clock as one process sees it: the offset of Redis's ``TIME`` from the local clock, re-read now and then.

Everything timed across hosts (heartbeats, leases, deadlines, the workers' slots) is judged by Redis's clock: a worker
host's own may run seconds apart, and stamped by it a live process could look dead. Reading ``TIME`` before every
stamp or sweep made the clock the largest share of a healthy cluster's Redis commands, so a process reads it once
every :data:`CLOCK_CHECK_S` and adds the offset to its own clock in between: the error is the round trip of that one
read plus the local clock's drift since, milliseconds against leases of seconds. A local clock that is stepped (set
by hand or by NTP, or a host resumed from suspend) moves apart from the monotonic clock: past :data:`CLOCK_STEP_S`,
the offset is read again at once. And what would act on an entry found due by the estimate checks it against one
fresh ``TIME`` first (``RedisStateCore._due``), so the estimate's error never makes anything due early.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

CLOCK_CHECK_S = 60.0
"""How often a process re-reads its offset from Redis's clock (one TIME)."""

CLOCK_STEP_S = 0.5
"""How far the local clock may move apart from the monotonic clock before the offset is read again; also the margin a
sweep adds to the estimate when it looks for due entries, which it then checks against one ``TIME``."""


class RedisClock:
    """Redis's time from this process, one ``TIME`` every :data:`CLOCK_CHECK_S` at most while the local clock runs
    evenly.

    Args:
        client: The Redis whose clock is read.
        wall: The local clock (tests pass their own).
        monotonic: The local monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._wall = wall
        self._monotonic = monotonic
        # When the offset was read (monotonic, local), and Redis's clock minus the local one then.
        self._offset: tuple[float, float, float] = (float("-inf"), float("-inf"), 0.0)

    def now(self) -> float:
        """Redis's time now, from this host's clock and the last offset read (a ``TIME`` when it is due).

        Raises:
            redis.RedisError: Redis did not answer a due ``TIME``.
        """
        checked_mono, checked_local, offset = self._offset
        elapsed, local = self._monotonic() - checked_mono, self._wall()
        if elapsed > CLOCK_CHECK_S or abs(local - checked_local - elapsed) > CLOCK_STEP_S:
            return self.read()
        return local + offset

    def read(self) -> float:
        """Redis's time by one ``TIME``, which also renews the offset.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        sent = self._wall()
        seconds, micros = self._client.time()
        now = seconds + micros / 1e6
        local = self._wall()
        # Redis read its clock somewhere in the round trip: its middle errs by half of it at most, either way.
        self._offset = (self._monotonic(), local, now - (sent + local) / 2)
        return now
