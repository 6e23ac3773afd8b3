"""The sweeper bootstep: every worker's main process runs :func:`orchestrator.engine.sweep.sweep_once`, and says how
many slots it runs (:mod:`workers.slots`)."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from celery import bootsteps

from orchestrator.engine.outage import OutageLog
from orchestrator.engine.runtime import RuntimeHolder
from orchestrator.engine.sweep import sweep_once
from orchestrator.state import RedisStateStore
from workers.slots import SlotsBeat

log = logging.getLogger(__name__)


class Sweeper(bootsteps.StartStopStep):
    """Worker bootstep running :func:`sweep_once` every ``sweep_interval_s`` on a daemon thread."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._slots: SlotsBeat | None = None

    def start(self, worker: Any) -> None:
        holder: RuntimeHolder = worker.app.orchestrator_runtime
        owner = f"{worker.hostname}:{uuid.uuid4().hex[:8]}"
        interval = holder.settings.sweep_interval_s
        concurrency = int(getattr(worker, "concurrency", 0) or 0)
        # Its slots, for a finishing step to size its fan-out's batches by (workers/slots.py).
        slots = self._slots = SlotsBeat(str(worker.hostname), concurrency, interval) if concurrency > 0 else None

        def announce() -> None:
            store = holder.get().store
            if slots is not None and isinstance(store, RedisStateStore):
                slots.say(store)

        def loop() -> None:
            outage = OutageLog("sweep", log)
            # Sweep at once on start: a deadline that passed while no worker ran fires now, not an interval later.
            while True:
                outage.run(lambda: sweep_once(holder.get(), owner))
                # Only a turn that talks to Redis is run as one: a turn with nothing to say would end an outage.
                if slots is not None and slots.due():
                    outage.run(announce)
                if self._stop.wait(interval):
                    return

        self._thread = threading.Thread(target=loop, name="orchestrator-sweeper", daemon=True)
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        holder: RuntimeHolder = worker.app.orchestrator_runtime
        try:
            store = holder.get().store
            if self._slots is not None and isinstance(store, RedisStateStore):
                self._slots.withdraw(store)
        except Exception as exc:
            log.warning("could not withdraw this worker's slots (%s); they lapse on their own", exc)
