"""The Celery app, built by a factory from typed settings."""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import worker_init, worker_process_init

import celeryconfig
from orchestrator.settings import Settings
from workers.runtime import RuntimeHolder
from workers.sweeper import Sweeper
from workers.tasks import register_tasks

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> Celery:
    """Build the Celery app: configuration, the step task and the sweeper bootstep."""
    settings = settings or Settings.from_env()
    app = Celery("orchestrator")
    app.config_from_object(celeryconfig.from_settings(settings))
    holder = RuntimeHolder(app, settings)
    app.orchestrator_runtime = holder  # type: ignore[attr-defined]
    register_tasks(app, holder)
    app.steps["worker"].add(Sweeper)
    _warm_up(holder)
    return app


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
