"""The sweeper bootstep: every worker's main process runs :func:`orchestrator.engine.sweep.sweep_once`."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from celery import bootsteps

from orchestrator.engine.outage import OutageLog
from orchestrator.engine.runtime import RuntimeHolder
from orchestrator.engine.sweep import sweep_once

log = logging.getLogger(__name__)


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
            outage = OutageLog("sweep", log)
            # Sweep at once on start: a deadline that passed while no worker ran fires now, not an interval later.
            while True:
                outage.run(lambda: sweep_once(holder.get(), owner))
                if self._stop.wait(interval):
                    return

        self._thread = threading.Thread(target=loop, name="orchestrator-sweeper", daemon=True)
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
