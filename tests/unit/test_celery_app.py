"""The producers' Celery app: what its step messages tell Flower."""

from __future__ import annotations

from typing import Any

from celery.utils.saferepr import saferepr

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


class _Buffer:
    """A worker's buffered task-event dispatcher, as Celery's Events bootstep builds it with an event loop."""

    enabled = True
    buffer_group = ("task",)

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, object]]] = []

    def send(self, type: str, **fields: object) -> None:
        self.sent.append((type, fields))


class _Producer:
    def __init__(self) -> None:
        self.published: list[object] = []

    def publish(self, body: object, **_: object) -> None:
        self.published.append(body)


def test_a_workers_task_sent_events_join_its_buffered_task_events_instead_of_one_publish_each() -> None:
    app = create_app(Settings())
    buffer, producer = _Buffer(), _Producer()
    amqp = app.amqp
    amqp.buffered_events = lambda: buffer  # type: ignore[attr-defined]

    amqp._event_dispatcher.publish("task-sent", {"uuid": "t-1", "name": "digest.review"}, producer)

    assert buffer.sent == [("task-sent", {"uuid": "t-1", "name": "digest.review"})]
    assert producer.published == []


def test_a_producers_task_sent_events_are_published_with_the_message_s_producer_as_celery_does() -> None:
    app = create_app(Settings())
    producer = _Producer()
    disabled = _Buffer()
    disabled.enabled = False
    amqp = app.amqp

    amqp._event_dispatcher.publish("task-sent", {"uuid": "t-1"}, producer)
    amqp.buffered_events = lambda: disabled  # type: ignore[attr-defined]
    amqp._event_dispatcher.publish("task-sent", {"uuid": "t-2"}, producer)

    assert [event["uuid"] for event in producer.published] == ["t-1", "t-2"]  # type: ignore[index]
    assert disabled.sent == []


def test_a_messages_shown_arguments_are_what_celerys_saferepr_makes_of_them() -> None:
    app = create_app(Settings())
    batch = {"batch": [[f"leaf{i}", f"task-{i:036d}"] for i in range(5)]}
    cases: list[tuple[Any, Any]] = [
        (("run", "hash", "review", "1"), {}),
        (("run", "hash", "review", "1"), batch),
        (("run", "hash", "review", "1"), {"batch": [[f"leaf{i}", f"task-{i:036d}"] for i in range(60)]}),  # too long
        (("x" * 2000,), {}),
        ((1, 2.5, None), {"deep": {"er": {"still": ["d"]}}}),
    ]
    for args, kwargs in cases:
        message = app.amqp.create_task_message("t", STEP_TASK, args, kwargs, create_sent_event=True)

        assert message.headers["argsrepr"] == saferepr(args, 1024)
        assert message.headers["kwargsrepr"] == saferepr(kwargs, 1024)
        assert message.sent_event["args"] == message.headers["argsrepr"]
