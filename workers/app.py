"""The Celery app, built by a factory from typed settings."""

from __future__ import annotations

import gc
import logging
import os
import sys
import warnings
from typing import Any, cast

from celery import Celery
from celery.exceptions import CPendingDeprecationWarning, SoftTimeLimitExceeded
from celery.signals import (
    celeryd_after_setup,
    setup_logging,
    task_revoked,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from orchestrator import celery_app
from orchestrator.celery_app import CeleryPublisher
from orchestrator.engine.runtime import RuntimeHolder
from orchestrator.infra.cpus import apply_cpus, worker_cpus
from orchestrator.infra.redis_url import require_shared_store
from orchestrator.infra.settings import Settings
from orchestrator.state import RedisStateStore
from orchestrator.telemetry.logs import Redactor, configure_logging
from workers.local import CeleryLocalSteps, ThreadsBootstep, WorkerThreads
from workers.metrics import WorkerMetricsEndpoint
from workers.slots import KnownSlots
from workers.sweeper import Sweeper
from workers.tasks import register_tasks, resend_passengers

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> Celery:
    """Build the worker's Celery app: the producers' app plus the step task, the sweeper bootstep and signals.

    Raises:
        RedisUrlError: ``REDIS_URL`` is ``memory://``: a worker cannot see the runs of another process's memory.
        ValueError: ``ORCH_WORKER_CPUS`` names a CPU this process may not run on.
    """
    settings = settings or Settings.from_env()
    require_shared_store(settings.redis_url, "a worker")
    app = celery_app.create_app(settings)
    # Task events published a window at a time (workers/consumer.py).
    app.conf.worker_consumer = "workers.consumer:BatchingConsumer"
    # A fan-out wider than the live workers' slots can take goes out in batches (orchestrator/engine/batches.py).
    slots = KnownSlots(lambda: _redis_store(holder))
    # The threads pool's executor, once the pool exists: a finish there keeps several children (workers/local.py).
    threads = WorkerThreads()
    holder = RuntimeHolder(
        settings,
        lambda: CeleryPublisher(app, settings, slots=slots),
        interrupts=(SoftTimeLimitExceeded,),
        local=lambda publisher: CeleryLocalSteps(app, cast(CeleryPublisher, publisher), threads),
    )
    app.orchestrator_runtime = holder  # type: ignore[attr-defined]
    app.orchestrator_threads = threads  # type: ignore[attr-defined]
    step_task = register_tasks(app, holder)
    # A revoked batch message takes its other steps with it: they go out again (workers/tasks.py).
    task_revoked.connect(lambda request, **_: resend_passengers(holder, request), sender=step_task, weak=False)
    app.steps["worker"].add(Sweeper)
    app.steps["worker"].add(ThreadsBootstep)
    _warm_up(holder)
    _observe(app, settings)
    return app


def _redis_store(holder: RuntimeHolder) -> RedisStateStore:
    store = holder.get().store
    if not isinstance(store, RedisStateStore):
        raise TypeError("a worker's state store is Redis")
    return store


def _warm_up(holder: RuntimeHolder) -> None:
    """Pay for imports and connections when a worker starts, not on its first step.

    The Anthropic SDK alone takes about a second to import: imported lazily inside a step, it delayed the first step
    on every new pool process by that much. The main process imports it once before forking (children inherit it),
    and each pool process builds its runtime as it starts.
    """

    def import_providers(**_: object) -> None:
        import orchestrator.llm.anthropic
        import orchestrator.llm.offline  # noqa: F401

    def build_runtime(**_: object) -> None:
        try:
            holder.get()
        except Exception:
            # Redis may not answer yet: the first step builds the runtime again rather than kill the pool process.
            log.warning("could not prepare the step runtime at pool start; the first step will", exc_info=True)

    worker_init.connect(import_providers, weak=False)
    worker_process_init.connect(build_runtime, weak=False)


def tune_collector(threshold: int) -> None:
    """Collect the youngest objects once allocations outnumber frees by ``threshold`` (``ORCH_GC_THRESHOLD``; the
    older generations' ratios kept), and leave what the worker holds at start (modules, the app, the registries) to
    no collection again (``gc.freeze``).

    Called before the pool starts, so a prefork pool's processes inherit both, and their collections leave the
    parent's pages unwritten.
    """
    gc.set_threshold(threshold, *gc.get_threshold()[1:])
    gc.freeze()


def _observe(app: Celery, settings: Settings) -> None:
    """Logging and the metrics endpoint of a worker of ``app`` (``celery -A workers worker``).

    Celery's signals are process-wide and every process that builds an app connects these receivers (the API and
    clients build one too), so each acts only for a worker of its own app. The first app of a process configures
    logging (the ``dispatch_uid``); ``worker_hijack_root_logger`` is off, and this receiver replaces Celery's own
    logging setup: one root handler on stderr (or ``--logfile``) in ``ORCH_LOG_FORMAT``, at ``ORCH_LOG_LEVEL`` or
    else ``--loglevel``, with step attempt fields and secrets redacted.
    """
    endpoint = WorkerMetricsEndpoint(settings)
    cpus = worker_cpus(settings.worker_cpus)  # checked here, at import: a CPU it may not use stops the worker

    def configure(loglevel: int | None = None, logfile: str | None = None, **_: Any) -> None:
        configure_logging(
            log_format=settings.log_format,
            level=settings.log_level or loglevel or logging.WARNING,
            # The real stderr: Celery redirects sys.stderr to the logger right after this.
            stream=sys.__stderr__,
            filename=logfile or None,
            redactor=Redactor.from_env(os.environ),
        )

    def prepare(sender: Any, **_: Any) -> None:
        if sender.app is app:
            # Before the pool starts (a prefork pool's processes inherit it); process-wide, so only a worker's.
            sys.setswitchinterval(settings.gil_switch_s)
            tune_collector(settings.gc_threshold)
            if cpus is not None:
                apply_cpus(cpus)
            endpoint.prepare()

    def serve(sender: Any, **_: Any) -> None:
        if sender.app is app:
            endpoint.start()

    def stop(sender: Any, **_: Any) -> None:
        if sender.app is app:
            endpoint.stop()

    def forked(**_: Any) -> None:
        endpoint.after_fork()

    def exiting(pid: int, **_: Any) -> None:
        endpoint.process_exited(pid)

    def quiet_reconnect_warning(**_: Any) -> None:
        # celery_config sets worker_cancel_long_running_tasks_on_connection_loss on purpose, yet Celery prints eight
        # lines about its future default at each broker reconnect, burying its one line saying the broker was lost.
        # Added after Celery's own "always" filter for its deprecation warnings, which it installs with its logging.
        warnings.filterwarnings(
            "ignore",
            message=r"\s*In Celery 5\.1 we introduced an optional breaking change",
            category=CPendingDeprecationWarning,
        )

    setup_logging.connect(configure, weak=False, dispatch_uid="orchestrator.setup_logging")
    celeryd_after_setup.connect(quiet_reconnect_warning, weak=False)
    worker_init.connect(prepare, weak=False)
    worker_ready.connect(serve, weak=False)
    worker_shutdown.connect(stop, weak=False)
    worker_process_init.connect(forked, weak=False)
    worker_process_shutdown.connect(exiting, weak=False)
