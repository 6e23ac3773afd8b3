"""The Redis store's process liveness: which processes beat, and the attempts each of them keeps alive.

``orch:owners`` scores each process (its owner id) by when it stops being known alive; ``orch:owned:{OWNER}`` lists
the lease index members it runs. See :mod:`orchestrator.engine.leases` for how they are used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from redis.client import Pipeline

from orchestrator.infra.redis_cluster import queue_evalsha
from orchestrator.state import keys
from orchestrator.state.redis.core import RedisStateCore, _text


class ProcessOwners(RedisStateCore):
    """Process heartbeats and the attempts they cover, in one round trip each."""

    def keep_owner(self, owner: str, alive_s: float, *, joined: Sequence[str] = (), left: Sequence[str] = ()) -> None:
        """Mark ``owner`` alive for ``alive_s`` from now (0: it runs nothing more and leaves the index), and add
        ``joined`` to or drop ``left`` from the attempts it covers."""
        commands: list[Callable[[Pipeline], Any]] = []
        # Joined before the heartbeat lands: a sweeper never sees the owner live without its attempts.
        if joined:
            commands.append(lambda pipe: pipe.sadd(keys.owned_key(owner), *joined))
        if left:
            commands.append(lambda pipe: pipe.srem(keys.owned_key(owner), *left))
        if alive_s > 0:
            # Stamped by Redis's clock, which the sweeper reads: a worker's own clock may run seconds apart.
            beat = self._scripts["beat"].sha
            commands.append(lambda pipe: queue_evalsha(pipe, beat, 1, keys.OWNERS, owner, alive_s))
        else:
            commands.append(lambda pipe: pipe.zrem(keys.OWNERS, owner))
        self._pipeline(*commands)

    def dead_owners(self, limit: int = 100) -> list[str]:
        """Owners whose heartbeat ran out, by Redis's clock."""
        seconds, micros = self.client.time()
        now = seconds + micros / 1e6
        return [_text(m) for m in self.client.zrangebyscore(keys.OWNERS, "-inf", now, start=0, num=limit)]

    def owned(self, owner: str) -> list[str]:
        """The lease index members ``owner`` covers."""
        return sorted(_text(m) for m in self.client.smembers(keys.owned_key(owner)))

    def owner_alive(self, owner: str) -> bool:
        """Whether ``owner``'s heartbeat is current."""
        until = self.client.zscore(keys.OWNERS, owner)
        if until is None:
            return False
        seconds, micros = self.client.time()
        return float(until) > seconds + micros / 1e6

    def forget_owner(self, owner: str, members: Sequence[str]) -> None:
        """Drop a dead owner once its ``members`` were recovered; one that beat again meanwhile stays."""
        pipe = self.client.pipeline(transaction=False)
        if members:
            pipe.srem(keys.owned_key(owner), *members)
        pipe.zscore(keys.OWNERS, owner)
        pipe.time()
        *_, until, (seconds, micros) = pipe.execute()
        if until is not None and float(until) <= seconds + micros / 1e6:
            self.client.zrem(keys.OWNERS, owner)
