"""Step messages are sent without Celery canvas, and are the very messages canvas sent.

Every publish is captured where kombu's producer would send it (body, headers, properties, routing, declarations,
retry policy), with the ``task-sent`` event Flower reads, once through :meth:`CeleryPublisher._send` and once through
Celery's ``Signature.apply_async`` / ``group.apply_async`` (``_send_canvas``, what the publisher did before): on a
producer (no task registered) and in a worker running a step (the registered task's options; the running task as
root and parent), alone, as a group, in batches, as map items.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery._state import _task_stack
from kombu.messaging import Producer

from orchestrator import Settings, parse_workflow
from orchestrator.celery_app import STEP_TASK, CeleryPublisher, ShadowNamedAMQP, _SentEvents, celery_config
from orchestrator.definition.spec import WorkflowSpec
from workers.tasks import StepTask

pytestmark = pytest.mark.timeout(30)

SPEC = parse_workflow(
    {
        "name": "wf",
        "steps": [
            {"name": "root", "uses": "noop"},
            *({"name": f"fan{i}", "uses": "noop", "depends_on": ["root"]} for i in range(6)),
            {"name": "limited", "uses": "python", "timeout_s": 5, "depends_on": ["root"], "with": {"function": "x"}},
            {"name": "ask", "uses": "llm", "depends_on": ["root"], "with": {"prompt": "hi"}},
            {"name": "items", "uses": "noop", "for_each": "inputs.xs"},
        ],
    }
)
FANOUT = tuple(f"fan{i}" for i in range(6))
IDS = {step: f"task-{step}" for step in (*FANOUT, "root", "limited", "ask")}


class Captured:
    """What reached the broker and the event dispatcher, in order."""

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Captured:
    seen = Captured()

    def publish(self: Producer, body: Any, **kwargs: Any) -> None:
        seen.published.append({"body": body, **kwargs})

    def sent_event(self: _SentEvents, type: str, fields: dict[str, Any], producer: Any, **kwargs: Any) -> None:
        seen.events.append({"type": type, **fields, **kwargs})

    monkeypatch.setattr(Producer, "publish", publish)
    monkeypatch.setattr(_SentEvents, "publish", sent_event)
    clock = itertools.repeat(1_700_000_000.25)
    monkeypatch.setattr("orchestrator.celery_app.time.time", lambda: next(clock))
    return seen


def make_app(*, worker: bool) -> Celery:
    app = Celery("t", amqp=ShadowNamedAMQP, set_as_current=False)
    app.config_from_object({**celery_config(Settings.from_env({})), "broker_url": "memory://"})
    if worker:
        app.task(bind=True, base=StepTask, name=STEP_TASK, shared=False)(_run_step)
    return app


def _run_step(self: StepTask, *args: Any, **kwargs: Any) -> str:
    return ""


@pytest.fixture(params=["producer", "worker"])
def app(request: pytest.FixtureRequest) -> Iterator[Celery]:
    worker = request.param == "worker"
    app = make_app(worker=worker)
    if not worker:
        yield app
        return
    # A step running in this worker: what it sends has it for root and parent.
    task = app.tasks[STEP_TASK]
    task.push_request(id="running-task", root_id="root-task", delivery_info={"priority": 3}, called_directly=False)
    _task_stack.push(task)
    try:
        yield app
    finally:
        _task_stack.pop()
        task.pop_request()


def normalised(captured: Captured) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The captures, each group id replaced by its position among the group ids seen (a group id is random)."""
    groups: dict[str, str] = {}
    published = []
    for sent in captured.published:
        headers = dict(sent["headers"])
        if headers.get("group") is not None:
            headers["group"] = groups.setdefault(headers["group"], f"group-{len(groups)}")
        published.append({**sent, "headers": headers})
    return published, captured.events


def both_ways(
    app: Celery, captured: Captured, send: Any, *, slots: int | None = None
) -> tuple[tuple[list[dict[str, Any]], list[dict[str, Any]]], tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """What ``send(publisher)`` sends directly, then through Celery's canvas."""
    publisher = CeleryPublisher(app, Settings.from_env({}), slots=None if slots is None else (lambda: slots))
    send(publisher)
    direct = normalised(captured)
    captured.published.clear()
    captured.events.clear()
    publisher._send = publisher._send_canvas  # type: ignore[method-assign]
    send(publisher)
    return direct, normalised(captured)


def publish(spec: WorkflowSpec, *steps: str) -> Any:
    return lambda p: p.publish(spec, run_id="r1", steps=steps, generation="2", task_ids=IDS)


@pytest.mark.parametrize(
    "steps",
    [("root",), ("limited",), ("ask",), FANOUT, ("fan0", "limited", "ask")],
    ids=["alone", "with-time-limits", "llm-queue", "group", "group-of-two-queues"],
)
def test_a_step_message_is_the_one_celery_canvas_sends(app: Celery, captured: Captured, steps: tuple[str, ...]) -> None:
    direct, canvas = both_ways(app, captured, publish(SPEC, *steps))

    assert len(direct[0]) == len(steps)
    assert direct == canvas
    assert [e["type"] for e in direct[1]] == ["task-sent"] * len(steps), "Flower sees each message sent"
    assert [e["name"] for e in direct[1]] == [f"wf.{step}" for step in steps]


def test_a_fan_out_in_batches_is_the_same_messages_as_through_canvas(app: Celery, captured: Captured) -> None:
    direct, canvas = both_ways(app, captured, publish(SPEC, *FANOUT), slots=1)

    assert len(direct[0]) == 2, "six steps over one known slot: two batches of three"
    assert direct == canvas
    assert direct[0][0]["body"][1] == {"batch": [["fan1", "task-fan1"], ["fan2", "task-fan2"]]}


def test_map_items_are_the_same_messages_as_through_canvas(app: Celery, captured: Captured) -> None:
    items = [(i, f"item-{i}") for i in range(3)]
    send = lambda p: p.publish_items(SPEC, run_id="r1", step="items", generation="1", items=items)  # noqa: E731

    direct, canvas = both_ways(app, captured, send)

    assert direct == canvas
    assert [m["headers"]["shadow"] for m in direct[0]] == ["wf.items[0]", "wf.items[1]", "wf.items[2]"]


def test_a_message_of_a_worker_carries_the_running_task_as_root_and_parent(captured: Captured) -> None:
    app = make_app(worker=True)
    task = app.tasks[STEP_TASK]
    task.push_request(id="running-task", root_id="root-task", delivery_info={}, called_directly=False)
    _task_stack.push(task)
    try:
        CeleryPublisher(app, Settings.from_env({})).publish(SPEC, run_id="r", steps=FANOUT[:2], generation="1")
    finally:
        _task_stack.pop()
        task.pop_request()

    first, second = (m["headers"] for m in captured.published)
    assert (first["root_id"], first["parent_id"]) == ("root-task", "running-task")
    assert (first["group"], first["group_index"], second["group_index"]) == (second["group"], 0, 1)
    assert first["id"] != second["id"], "a step published without a task id gets a fresh one"
    assert first["ignore_result"] is True, "the registered task's own options"


def test_a_queue_is_declared_on_the_first_publish_of_a_connection_and_not_asked_about_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = make_app(worker=True)
    asked: list[str] = []
    maybe_declare = Producer.maybe_declare

    def counted(self: Producer, entity: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(entity.name)
        return maybe_declare(self, entity, *args, **kwargs)

    monkeypatch.setattr(Producer, "maybe_declare", counted)
    publisher = CeleryPublisher(app, Settings.from_env({}))

    for run_id in ("r1", "r2", "r3"):
        publisher.publish(SPEC, run_id=run_id, steps=("root",), generation="1")

    assert asked.count("cpu") == 1, "declared once on the connection, then known to be"
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("cpu", no_ack=True)
        received = [queue.get(timeout=1).payload[0][0] for _ in range(3)]
        queue.close()
    assert received == ["r1", "r2", "r3"], "every message reached the queue"
