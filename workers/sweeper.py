"""The sweeper: re-dispatches steps whose attempt lost its worker (lease expired).

It runs in every worker's main process as a Celery bootstep; a short Redis lock lets one worker sweep per interval.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from celery import bootsteps

from orchestrator.dispatch import dispatch
from orchestrator.state import keys
from workers.runtime import Runtime, RuntimeHolder

log = logging.getLogger(__name__)


def sweep_once(rt: Runtime, owner: str) -> int:
    """Re-queue and re-dispatch every attempt whose lease expired; returns how many were re-dispatched."""
    if not rt.store.try_sweeper_lock(owner, rt.settings.sweep_interval_s * 0.9):
        return 0
    count = 0
    for member in rt.store.expired_leases():
        run_id, step, old_task = keys.parse_lease_member(member)
        new_task = uuid.uuid4().hex
        lost = {"type": "worker_lost", "status": None, "message": f"worker lost during attempt (task {old_task})"}
        found = rt.store.reclaim(member, new_task, lost)
        if found is None:
            continue
        definition_hash, generation = found
        spec = rt.store.load_definition(definition_hash)
        dispatch(
            rt.app, rt.settings, spec, run_id=run_id, steps=[step], generation=generation, task_ids={step: new_task}
        )
        log.warning("re-dispatched %s/%s after its worker was lost", run_id, step)
        count += 1
    return count


class Sweeper(bootsteps.StartStopStep):
    """Worker bootstep running :func:`sweep_once` every ``sweep_interval_s`` on a daemon thread."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        holder: RuntimeHolder = worker.app.orchestrator_runtime
        owner = f"{worker.hostname}:{uuid.uuid4().hex[:8]}"

        def loop() -> None:
            interval = holder.settings.sweep_interval_s
            while not self._stop.wait(interval):
                try:
                    sweep_once(holder.get(), owner)
                except Exception:
                    log.exception("sweep failed")

        self._thread = threading.Thread(target=loop, name="orchestrator-sweeper", daemon=True)
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
