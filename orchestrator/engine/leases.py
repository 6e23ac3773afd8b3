"""Per-attempt leases: a heartbeat keeps the leases of running attempts alive while their process lives.

A worker that dies stops renewing; the sweeper (:mod:`orchestrator.engine.sweep`) re-queues its attempts once their
leases run out, so a step lost with its worker runs again within ``lease_s + sweep_interval_s``, not after the broker's
visibility timeout, and an attempt that is alive, however long it runs, is never started twice.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

from orchestrator.domain import Attempt
from orchestrator.state import StateStore, keys

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the leases of this process's running attempts every third of the lease."""

    def __init__(self, store: StateStore, lease_s: float) -> None:
        self.store = store
        self.lease_s = lease_s
        self._active: dict[Attempt, None] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def hold(self, attempt: Attempt) -> None:
        """Start keeping a claimed attempt's lease (the claim set it and indexed it)."""
        with self._lock:
            self._active[attempt] = None
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="orchestrator-leases", daemon=True)
                self._thread.start()

    def release(self, attempt: Attempt) -> None:
        """Stop keeping an attempt's lease (its finish or retry already removed it from the index)."""
        with self._lock:
            self._active.pop(attempt, None)

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            with self._lock:
                active = list(self._active)
            if not active:
                continue
            grouped: dict[str, list[tuple[str, str]]] = defaultdict(list)
            for a in active:
                grouped[a.run_id].append((keys.item_unit(a.step, a.index), a.task_id))
            try:
                self.store.renew(dict(grouped), self.lease_s)
            except Exception:
                # A Redis blip must not kill the heartbeat; the next beat tries again well inside the lease.
                log.exception("lease renewal failed")
