"""The Redis store's process liveness: which processes beat, the attempts each of them keeps alive, and which
sweeper sweeps which bucket of the global indices.

``orch:owners`` scores each process (its owner id) by when it stops being known alive; ``orch:owned:{OWNER}`` lists
the lease index members it runs. See :mod:`orchestrator.engine.leases` for how they are used.

With ``ORCH_SHARDS=N`` above 1, ``orch:sweepers`` scores each sweeper the same way, and each bucket's sweeper lock names
the sweeper that holds it: every turn a sweeper renews the buckets it holds, up to its share (N over the live
sweepers, rounded up), releases any beyond it, and takes free ones up to it. A new sweeper gets its share once the
others release theirs, a turn later; a stopped one's buckets are free once its hold runs out (``HOLD_INTERVALS``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

from redis.client import Pipeline

from orchestrator.infra.redis_cluster import queue_evalsha
from orchestrator.state import keys
from orchestrator.state.redis.core import RedisStateCore, _text

HOLD_INTERVALS = 3
"""How long, in sweep intervals, a sweeper's hold on a bucket (and its entry among the live sweepers) lasts without a
renewal: a stopped sweeper's buckets are taken by the others within this many intervals and one more."""


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
            until = self.clock.now() + alive_s
            commands.append(lambda pipe: pipe.zadd(keys.OWNERS, {owner: until}))
        else:
            commands.append(lambda pipe: pipe.zrem(keys.OWNERS, owner))
        self._pipeline(*commands)

    def dead_owners(self, limit: int = 100) -> list[str]:
        """Owners whose heartbeat ran out, by Redis's clock (no ``TIME`` while none did: ``RedisStateCore._due``)."""
        return self._due(lambda _: keys.OWNERS, limit, [None])

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

    def sweep_buckets(self, owner: str, interval_s: float) -> list[str | None]:
        """The buckets ``owner`` sweeps this turn (module docstring); ``[None]`` or ``[]`` with one bucket, as before
        the indices were split: whoever wins the turn (0.9 interval) sweeps it. Two round trips with several."""
        if self.shards <= 1:
            return [None] if self.try_sweeper_lock(owner, interval_s * 0.9) else []
        hold_s = interval_s * HOLD_INTERVALS
        # Each sweeper looks at the buckets from its own place, so two taking their share rarely reach for the same.
        shards = keys.all_shards(self.shards)
        start = zlib.crc32(owner.encode()) % self.shards
        shards = shards[start:] + shards[:start]
        register = self._scripts["sweepers"].sha
        live, *holders = self._pipeline(
            lambda pipe: queue_evalsha(pipe, register, 1, keys.SWEEPERS, owner, hold_s),
            *[lambda pipe, shard=shard: pipe.get(keys.sweeper_lock_key(shard)) for shard in shards],
        )
        share = -(-self.shards // max(1, int(live)))
        mine = [shard for shard, holder in zip(shards, holders, strict=True) if holder and _text(holder) == owner]
        free = [shard for shard, holder in zip(shards, holders, strict=True) if holder is None]
        keep, drop = mine[:share], mine[share:]
        take = free[: max(0, share - len(keep))]
        hold = self._scripts["sweep_hold"].sha
        hold_ms = max(1, int(hold_s * 1000))

        def turn(shard: str | None, action: str) -> Callable[[Pipeline], Any]:
            return lambda pipe: queue_evalsha(pipe, hold, 1, keys.sweeper_lock_key(shard), owner, hold_ms, action)

        wanted = [*keep, *take]
        held = self._pipeline(
            *[turn(shard, "keep") for shard in keep],
            *[turn(shard, "take") for shard in take],
            *[turn(shard, "drop") for shard in drop],
        )
        return [shard for shard, ok in zip(wanted, held, strict=False) if ok]
