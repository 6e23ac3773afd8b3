"""Celery's configuration, the Celery way: ``app.config_from_object("celeryconfig")`` from this directory.

Every value comes from the orchestrator's typed settings read from the environment once
(:func:`orchestrator.celery_app.celery_config`); the orchestrator's own apps (``orchestrator.celery_app.create_app``
for producers, ``workers.app.create_app`` for workers) call that function directly and never import this module.
"""

from orchestrator.celery_app import celery_config
from orchestrator.infra.settings import Settings

globals().update(celery_config(Settings.from_env()))
