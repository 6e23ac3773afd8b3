"""The Celery app, built by a factory from typed settings."""

from __future__ import annotations

from celery import Celery

import celeryconfig
from orchestrator.settings import Settings
from workers.runtime import RuntimeHolder
from workers.sweeper import Sweeper
from workers.tasks import register_tasks


def create_app(settings: Settings | None = None) -> Celery:
    """Build the Celery app: configuration, the step task and the sweeper bootstep."""
    settings = settings or Settings.from_env()
    app = Celery("orchestrator")
    app.config_from_object(celeryconfig.from_settings(settings))
    holder = RuntimeHolder(app, settings)
    app.orchestrator_runtime = holder  # type: ignore[attr-defined]
    register_tasks(app, holder)
    app.steps["worker"].add(Sweeper)
    return app
