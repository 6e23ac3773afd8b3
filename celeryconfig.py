"""Celery settings, mapped from the orchestrator's typed settings (``orchestrator.infra.settings.Settings``).

``celery -A workers`` loads these through ``workers.app.create_app``; this module only maps settings onto Celery's
keys and holds no other logic.
"""

from __future__ import annotations

from typing import Any

from orchestrator.engine.priorities import REDIS_PRIORITY_SEPARATOR, REDIS_PRIORITY_STEPS, TOP_LEVEL
from orchestrator.infra.redis_url import broker_connection
from orchestrator.infra.settings import Settings


def from_settings(settings: Settings) -> dict[str, Any]:
    """Celery configuration for ``settings``.

    Raises:
        RedisUrlError: The broker URL is a malformed Sentinel URL.
    """
    # A Sentinel URL becomes kombu's ``sentinel://`` URLs plus the master name (and TLS) in transport options.
    broker = broker_connection(settings.effective_broker_url)
    return {
        "broker_url": broker.url,
        # Step state and outputs live in the orchestrator's own Redis hashes; Celery results would only cost commands.
        "result_backend": None,
        "task_ignore_result": True,
        # JSON only: a pickled message is refused before it reaches any task.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # State is written before the message is acknowledged; a worker that dies hands its message back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Long LLM calls: one message per process slot, so a slow step never hoards work another worker could do.
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # Redis: kombu's default priority lists, pinned, since a producer and a consumer that disagree strand
            # messages; ``queue_order_strategy`` stays round robin (it orders queues, not priorities).
            "priority_steps": list(REDIS_PRIORITY_STEPS),
            "sep": REDIS_PRIORITY_SEPARATOR,
            **broker.transport_options,
        },
        "broker_connection_retry_on_startup": True,
        # A Redis blip must not kill running LLM calls: their state transitions are guarded by generation and task
        # id, so a step that finishes after a reconnect records once, and a redelivered copy finds it taken.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_default_queue": settings.cpu_queue,
        "task_create_missing_queues": True,
        # RabbitMQ honours message priorities only on queues declared with x-max-priority (opt-in: an existing queue
        # redeclared with another argument fails with PRECONDITION_FAILED).
        **({"task_queue_max_priority": TOP_LEVEL} if settings.rabbitmq_priority_queues else {}),
        # Flower and event consumers see every task, with its sent time.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "imports": list(settings.imports),
        **({"broker_use_ssl": dict(broker.use_ssl)} if broker.use_ssl is not None else {}),
    }
