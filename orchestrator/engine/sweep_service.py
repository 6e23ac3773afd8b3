"""A process that only sweeps (``orchestrator sweeper``): lost steps, workflow deadlines, approval timeouts.

Every worker already runs the sweeper as a Celery bootstep (:mod:`workers.sweeper`). This process runs the same
:func:`~orchestrator.engine.sweep.sweep_once` on its own, so deadlines and approval timeouts fire and lost steps are
sent again while no worker is up: every worker scaled to zero, crash-looping, or being redeployed. It takes the same
Redis lock as the workers' sweepers, so running it next to them never sweeps twice in one interval; with
``ORCH_SHARDS`` above 1 it is one more sweeper to split the buckets with, so several of these processes spread the
sweep between them and take over each other's buckets when one stops. It consumes no queue.

Liveness: given a heartbeat file, the service updates the file's modification time after every sweep that reached
Redis (whether or not it won the lock), so a container healthcheck can tell a sweeper that is stuck or cut off from
Redis by the file's age.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid
from pathlib import Path
from types import FrameType

from orchestrator.engine.outage import OutageLog
from orchestrator.engine.runtime import RuntimeHolder
from orchestrator.engine.sweep import sweep_once
from orchestrator.infra.redis_url import require_shared_store
from orchestrator.infra.settings import Settings
from orchestrator.telemetry.logs import Redactor, configure_logging

__all__ = ["SweepService", "serve"]

log = logging.getLogger(__name__)


class SweepService:
    """Sweeps every ``settings.sweep_interval_s`` until :meth:`stop`.

    Args:
        settings: Redis, broker and sweep interval; ``ORCH_IMPORTS`` is imported as a worker would.
        heartbeat: A file whose modification time is updated after every sweep that reached Redis.

    Raises:
        RedisUrlError: ``REDIS_URL`` is ``memory://``: there would be nothing to sweep.
    """

    def __init__(self, settings: Settings, *, heartbeat: Path | None = None) -> None:
        require_shared_store(settings.redis_url, "the sweeper service")
        # The producers' app: the same Celery configuration and step routing as the workers', so a re-sent step goes
        # where a worker's sweeper would send it.
        from orchestrator.celery_app import CeleryPublisher, create_app

        app = create_app(settings)
        self.settings = settings
        self.heartbeat = heartbeat
        self.owner = f"sweeper@{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self._holder = RuntimeHolder(settings, lambda: CeleryPublisher(app, settings))
        self._stop = threading.Event()

    def sweep(self) -> int:
        """One sweep of the buckets this process holds (with one bucket: when it wins the interval's lock); returns how
        many actions it took.

        Raises:
            redis.RedisError: When Redis does not answer (the heartbeat is then left as it was).
        """
        actions = sweep_once(self._holder.get(), self.owner)
        if self.heartbeat is not None:
            self.heartbeat.touch()
        return actions

    def run(self) -> None:
        """Sweep at once, then every interval, until :meth:`stop`; a failed sweep is logged and tried again (a Redis
        outage once when it starts and once when it ends)."""
        interval = self.settings.sweep_interval_s
        outage = OutageLog("sweep", log)
        while True:
            outage.run(self.sweep)
            if self._stop.wait(interval):
                return

    def stop(self) -> None:
        """Make :meth:`run` return after the sweep in progress, if any."""
        self._stop.set()


def serve(settings: Settings, *, heartbeat: Path | None = None) -> None:
    """Run a :class:`SweepService` in the foreground until SIGTERM or SIGINT.

    A process started as a container's PID 1 gets no default action for SIGTERM, so the handlers here are what
    lets ``docker compose stop`` end it at once instead of after the stop grace period.

    Raises:
        LogConfigError: When ``ORCH_LOG_FORMAT`` or ``ORCH_LOG_LEVEL`` is not a known format or level.
    """
    configure_logging(
        log_format=settings.log_format, level=settings.log_level or "INFO", redactor=Redactor.from_env(os.environ)
    )
    service = SweepService(settings, heartbeat=heartbeat)

    def stop(signum: int, _: FrameType | None) -> None:
        log.info("sweeper: %s received, stopping", signal.Signals(signum).name)
        service.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("sweeper %s: sweeping every %.1fs", service.owner, settings.sweep_interval_s)
    service.run()
