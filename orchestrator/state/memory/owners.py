"""The in-memory store's process liveness (``redis/owners.py`` under one lock)."""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.state.memory.core import MemoryStateCore, _due


class ProcessOwners(MemoryStateCore):
    """Process heartbeats and the attempts they cover."""

    def keep_owner(self, owner: str, alive_s: float, *, joined: Sequence[str] = (), left: Sequence[str] = ()) -> None:
        """Mark ``owner`` alive for ``alive_s`` from now (0: it leaves the index); add ``joined``, drop ``left``."""
        with self._lock:
            covered = self._owned.setdefault(owner, set())
            covered.update(joined)
            covered.difference_update(left)
            if not covered:
                del self._owned[owner]
            if alive_s > 0:
                self._owners[owner] = self._clock() + alive_s
            else:
                self._owners.pop(owner, None)

    def dead_owners(self, limit: int = 100) -> list[str]:
        """Owners whose heartbeat ran out."""
        with self._lock:
            return _due(self._owners, self._clock(), limit)

    def owned(self, owner: str) -> list[str]:
        """The lease index members ``owner`` covers."""
        with self._lock:
            return sorted(self._owned.get(owner, ()))

    def owner_alive(self, owner: str) -> bool:
        """Whether ``owner``'s heartbeat is current."""
        with self._lock:
            return self._owners.get(owner, 0.0) > self._clock()

    def forget_owner(self, owner: str, members: Sequence[str]) -> None:
        """Drop a dead owner once its ``members`` were recovered; one that beat again meanwhile stays."""
        with self._lock:
            covered = self._owned.get(owner, set())
            covered.difference_update(members)
            if not covered:
                self._owned.pop(owner, None)
            if self._owners.get(owner, 0.0) <= self._clock():
                self._owners.pop(owner, None)

    def sweep_buckets(self, owner: str, interval_s: float) -> list[str | None]:
        """``[None]`` when ``owner`` wins the sweeper turn: one store, one bucket."""
        return [None] if self.try_sweeper_lock(owner, interval_s * 0.9) else []
