"""The producers' Celery app: what its step messages tell Flower."""

from __future__ import annotations

from orchestrator import Settings
from orchestrator.celery_app import STEP_TASK, create_app


def test_a_step_message_s_sent_event_names_the_step_as_flower_shows_it_so_a_late_one_cannot_rename_it() -> None:
    app = create_app(Settings())

    message = app.amqp.create_task_message(
        "task-1", STEP_TASK, ("run", "hash", "review", "1"), {}, create_sent_event=True, shadow="digest.review"
    )
    plain = app.amqp.create_task_message("task-2", STEP_TASK, (), {}, create_sent_event=True)

    assert message.headers["shadow"] == "digest.review"
    assert message.sent_event["name"] == "digest.review"
    assert plain.sent_event["name"] == STEP_TASK, "without a shadow name, the task's own"
