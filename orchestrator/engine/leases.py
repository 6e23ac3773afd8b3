"""Process liveness: one heartbeat per process covers every attempt it runs, and a dead process's attempts are
recovered as soon as its heartbeat runs out.

Each process that runs attempts is an *owner* (``host:pid:random``). A claim gives the attempt a short lease of its own
(``lease_s``, in the lease index as before). An attempt still running a third of a lease later is *covered*: it joins
its owner's set (``orch:owned:{OWNER}``) and its lease is pushed out to a backstop (``BACKSTOP_LEASES`` leases,
renewed when a third of it is left). From then on the process's one beat, every third of a lease, keeps all of its
attempts alive: ``ZADD orch:owners OWNER now+lease_s``, one command however many attempts it runs, where a renewal per
attempt (a script per run) used to go out every third of a lease. A process with nothing covered does not beat.

The sweeper (:mod:`orchestrator.engine.sweep`) re-queues the attempts of an owner whose beat ran out at once
(``reclaim(..., owner_dead=True)`` skips the backstop), so a step lost with its worker runs again within about
``lease_s + sweep_interval_s``. Everything else is as before: an attempt shorter than a third of a lease never beats
and is recovered by its claim lease; the backstop recovers anything whose owner record were lost; a task id guards
every transition, so a process taken for dead that was only stalled finds its finish refused.

The beat has its own thread, but a process can starve it: a threads pool of hundreds of busy slots on a loaded machine
hands each thread the GIL rarely, and a 10,000-run benchmark saw the llm worker's beat thread miss a whole lease
five times (1,293 live steps re-dispatched). So the threads that claim and finish attempts beat too: a hold or a
release that finds the last beat half a lease old sends it itself (at most one thread at a time). A healthy beat
thread always beats first, so this adds no traffic; a starved one is stood in for by whichever slot runs next.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict

from orchestrator.domain import Attempt
from orchestrator.state import StateStore, keys

log = logging.getLogger(__name__)

BACKSTOP_LEASES = 20
"""A covered attempt's own lease, in leases: the process's beat keeps it alive; this only recovers it should the owner
record be lost."""


def lease_member(attempt: Attempt) -> str:
    """The attempt's member in the lease index (an item of a map step as ``STEP#INDEX``)."""
    return keys.lease_member(attempt.run_id, keys.item_unit(attempt.step, attempt.index), attempt.task_id)


class LeaseKeeper:
    """Beats for this process every third of the lease while it covers attempts (see the module docstring).

    Args:
        store: Where the beat, the covered attempts and their leases are kept.
        lease_s: The claim lease, and how long one beat keeps the process known alive.
        owner: This process's owner id (default: host, pid and a random part).
    """

    def __init__(self, store: StateStore, lease_s: float, owner: str | None = None) -> None:
        self.store = store
        self.lease_s = lease_s
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._active: dict[Attempt, float] = {}  # attempt -> when held (monotonic)
        self._covered: dict[Attempt, float] = {}  # attempt -> when its backstop was last set (monotonic)
        self._left: set[str] = set()  # members of ended covered attempts, still in the owner's set
        self._beating = False
        self._last_beat = time.monotonic()
        self._lock = threading.Lock()
        self._beat_lock = threading.Lock()  # one beat at a time, from the thread or a slot standing in
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def backstop_s(self) -> float:
        """A covered attempt's own lease."""
        return self.lease_s * BACKSTOP_LEASES

    def hold(self, attempt: Attempt, *, since: float | None = None) -> None:
        """Start keeping a claimed attempt alive (its claim lease covers it until the keeper's next beat).

        Args:
            since: When the claim was sent (``time.monotonic()``; default now). Its lease runs from then, and a starved
                thread may get the claim's reply seconds later: the cover is due a third of a lease after ``since``.
                An attempt held already keeps its earlier time (a child its parent's finish kept for another thread
                is held when it is handed over, and again by the thread that runs it).
        """
        at = time.monotonic() if since is None else since
        with self._lock:
            self._active[attempt] = min(at, self._active.get(attempt, at))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="orchestrator-leases", daemon=True)
                self._thread.start()
        self._stand_in()

    def release(self, attempt: Attempt) -> None:
        """Stop keeping an attempt alive (its finish or retry already took it out of the lease index)."""
        with self._lock:
            self._active.pop(attempt, None)
            if self._covered.pop(attempt, None) is not None:
                self._left.add(lease_member(attempt))
        self._stand_in()

    def _stand_in(self) -> None:
        """Beat from this slot if the beat thread is half a lease late (starved; see the module docstring)."""
        if time.monotonic() - self._last_beat < self.lease_s / 2 or self._stop.is_set():
            return
        self._beat_guarded()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            self._beat_guarded()

    def _beat_guarded(self) -> None:
        if not self._beat_lock.acquire(blocking=False):
            return  # another thread is beating
        try:
            self.beat()
        except Exception:
            # A Redis blip must not kill the heartbeat; the next beat tries again well inside the lease.
            log.exception("heartbeat failed")
        finally:
            self._beat_lock.release()

    def beat(self) -> None:
        """One beat: cover attempts held for a third of a lease (or whose backstop is a third gone), drop ended ones
        from the owner's set, and mark the process alive while it covers any; nothing while it covers none."""
        now = time.monotonic()
        self._last_beat = now
        third = self.lease_s / 3
        with self._lock:
            due = [
                a
                for a, held in self._active.items()
                if now - held >= third and now - self._covered.get(a, -self.backstop_s) >= self.backstop_s / 3
            ]
            joined = [lease_member(a) for a in due if a not in self._covered]
            left = sorted(self._left)
            covering = bool(self._covered) or bool(due)
        if not covering and not left and not self._beating:
            return
        self.store.keep_owner(self.owner, self.lease_s if covering else 0.0, joined=joined, left=left)
        self._beating = covering
        if due:
            grouped: dict[str, list[tuple[str, str]]] = defaultdict(list)
            for a in due:
                grouped[a.run_id].append((keys.item_unit(a.step, a.index), a.task_id))
            self.store.renew(dict(grouped), self.backstop_s)
        with self._lock:
            self._left.difference_update(left)
            for a in due:
                if a in self._active:
                    self._covered[a] = now
                else:
                    # Ended while this beat covered it: out of the owner's set at the next beat.
                    self._left.add(lease_member(a))

    def stop(self) -> None:
        """Stop beating (the thread ends at its next wake-up)."""
        self._stop.set()
