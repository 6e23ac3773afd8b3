"""The task events of locally run steps (``workers/local.py``) and the consumer's window (``workers/consumer.py``).

A step run in its parent's slot is announced in task events so that Flower sees it as it sees a message's task.
These tests build a real :class:`BatchingConsumer` with Celery's own Events bootstep and a kombu hub, record what its
dispatcher publishes, and feed that through Celery's event receiver into ``celery.events.state.State``, which is
Flower's model of the cluster.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, states
from celery.events.state import State
from celery.utils.time import utcoffset
from kombu import Producer
from kombu.asynchronous import Hub
from kombu.utils.json import dumps, loads

from orchestrator.celery_app import CeleryPublisher, create_app
from orchestrator.definition.spec import WorkflowSpec, parse_workflow
from orchestrator.domain import Attempt
from orchestrator.engine.local import Delivery
from orchestrator.errors import StepFailed
from orchestrator.infra.settings import Settings
from tests.integration.helpers import wait_for
from workers.consumer import EVENT_FLUSH_S, BatchingConsumer
from workers.local import CeleryLocalSteps

pytestmark = pytest.mark.timeout(30)

HOSTNAME = "llm1@test"
STAMPED = {"type", "timestamp", "hostname", "utcoffset", "pid", "clock"}
"""What Celery's ``EventDispatcher.send`` adds to every event's own fields."""
RECEIVED = {"uuid", "name", "args", "kwargs", "root_id", "parent_id", "retries", "eta", "expires"}
"""The fields of the ``task-received`` event Celery's worker sends for a message (``celery/worker/strategy.py``)."""


@dataclass
class Published:
    """Stands in for the dispatcher's producer: what it publishes, as an event receiver decodes it."""

    messages: list[tuple[str, Any]] = field(default_factory=list)

    def publish(self, body: Any, *, routing_key: str, **_: Any) -> None:
        self.messages.append((routing_key, loads(dumps(body))))

    def events(self) -> list[dict[str, Any]]:
        return [event for _, body in self.messages for event in (body if isinstance(body, list) else [body])]


@dataclass
class Worker:
    app: Celery
    consumer: BatchingConsumer
    hub: Hub
    published: Published
    local: CeleryLocalSteps


@pytest.fixture
def worker() -> Iterator[Worker]:
    """A threads worker's main process as far as task events go: its consumer with an event loop and Celery's Events
    bootstep started on an in-memory broker, and the locally run steps' announcer."""
    settings = Settings()
    app = create_app(settings)
    app.conf.broker_url = "memory://"
    hub = Hub()
    controller = SimpleNamespace(use_eventloop=True, state=None)
    consumer = BatchingConsumer(lambda request: None, app=app, hub=hub, hostname=HOSTNAME, controller=controller)
    events_step = consumer.blueprint.steps["celery.worker.consumer.events.Events"]
    events_step.start(consumer)
    published = Published()
    consumer.event_dispatcher.producer = published
    try:
        yield Worker(app, consumer, hub, published, CeleryLocalSteps(app, CeleryPublisher(app, settings)))
    finally:
        events_step.shutdown(consumer)
        hub.close()


def spec() -> WorkflowSpec:
    def llm(name: str, *deps: str) -> dict[str, Any]:
        return {"name": name, "uses": "llm", "depends_on": list(deps), "with": {"prompt": name}}

    return parse_workflow({"name": "pipeline", "steps": [llm("draft"), llm("edit", "draft"), llm("review", "edit")]})


def attempt(step: str) -> Attempt:
    return Attempt("run-7f3a", step, "1", f"task-{step}")


def run_chain(local: CeleryLocalSteps, workflow: WorkflowSpec) -> None:
    """draft succeeds and hands its slot to edit, which succeeds and hands it to review, which fails for good."""
    delivery = Delivery(queue="llm", carrier="task-carrier", hops=1)
    for step, failure in (("draft", None), ("edit", None), ("review", "the reviewer refused")):
        local.started(workflow, attempt(step), delivery)
        local.ended(attempt(step), "done", failure, more=step != "review")


def flower_view(app: Celery, events: list[dict[str, Any]]) -> State:
    """What Flower makes of ``events``: each one through Celery's event receiver into its cluster state."""
    state = State()
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={})
        for event in events:
            state.event(receiver.event_from_message(event)[1])
    return state


def test_flower_sees_each_locally_run_step_as_a_message_carried_task(worker: Worker) -> None:
    workflow = spec()
    run_chain(worker.local, workflow)
    worker.consumer._flush_window()

    assert len(worker.published.messages) == 1
    assert_seen_as_tasks(worker.app, workflow, worker.published.events(), HOSTNAME)


def test_a_prefork_childs_locally_run_steps_are_seen_alike_through_its_own_dispatcher(worker: Worker) -> None:
    # A prefork child has no event loop: no worker buffer, and its own dispatcher publishes a chain's events.
    worker.app.amqp.buffered_events = None
    dispatcher: Any = worker.local._dispatcher()
    dispatcher.producer = published = Published()
    workflow = spec()
    run_chain(worker.local, workflow)

    assert published.messages, "published by the end of the chain"
    assert_seen_as_tasks(worker.app, workflow, published.events(), dispatcher.hostname)


def assert_seen_as_tasks(app: Celery, workflow: WorkflowSpec, events: list[dict[str, Any]], hostname: str) -> None:
    """``events`` announce run_chain's three steps as Celery announces a message's task, and Flower's state ends
    with each in the state and with the fields a message's task would have."""
    assert [(e["type"], e["uuid"]) for e in events] == [
        (kind, f"task-{step}")
        for step, end in (("draft", "task-succeeded"), ("edit", "task-succeeded"), ("review", "task-failed"))
        for kind in ("task-sent", "task-received", "task-started", end)
    ]
    for event in events:
        assert set(event) >= STAMPED, event
        assert (event["hostname"], event["utcoffset"], event["pid"]) == (hostname, utcoffset(), os.getpid())
    clocks = [e["clock"] for e in events]
    assert clocks == sorted(set(clocks)), "each event has its own clock value, in the order sent"
    received = [e for e in events if e["type"] == "task-received"]
    assert all(set(e) - STAMPED == RECEIVED for e in received)
    # task-sent adds the route and repeats only the name: Flower's state merges the two into one task (below).
    sent = [e for e in events if e["type"] == "task-sent"]
    assert all(set(e) - STAMPED == {"uuid", "name", "queue", "routing_key", "exchange"} for e in sent)

    state = flower_view(app, events)
    for step in ("draft", "edit", "review"):
        task = state.tasks[f"task-{step}"]
        args = repr(("run-7f3a", workflow.definition_hash, step, "1"))
        assert (task.name, task.args, task.kwargs, task.retries, task.eta, task.expires) == (
            f"pipeline.{step}",
            args,
            "{}",
            0,
            None,
            None,
        )
        assert (task.root_id, task.parent_id, task.exchange, task.routing_key) == (f"task-{step}", None, "", "llm")
        assert (task.client, task.worker.hostname) == (hostname, hostname)
        assert None not in (task.sent, task.received, task.started)
        assert task.sent <= task.received <= task.started
    for step in ("draft", "edit"):
        task = state.tasks[f"task-{step}"]
        assert (task.state, task.result) == (states.SUCCESS, "'done'")
        assert task.succeeded >= task.started
        assert isinstance(task.runtime, float)
        assert task.runtime >= 0
    review = state.tasks["task-review"]
    assert review.state == states.FAILURE
    assert review.exception == repr(StepFailed("the reviewer refused", step="review"))
    assert review.failed >= review.started


def test_every_task_event_of_a_window_goes_out_in_one_publish_however_many_steps_it_holds(worker: Worker) -> None:
    workflow = spec()
    for _ in range(4):
        run_chain(worker.local, workflow)  # 48 events
    # A message's own task event, sent by Celery's request, joins the same window.
    worker.consumer.event_dispatcher.send("task-received", uuid="task-message", name="pipeline.draft")

    assert worker.published.messages == [], "nothing is published before the window ends"
    worker.consumer._flush_window()

    assert [key for key, _ in worker.published.messages] == ["task.multi"]
    assert len(worker.published.events()) == 4 * 12 + 1


def test_the_events_still_buffered_when_the_worker_shuts_down_are_published(worker: Worker) -> None:
    # The worker stopped its loop, then its pool: the last steps' events wait for a window that never ends.
    run_chain(worker.local, spec())

    worker.consumer.shutdown()

    assert [key for key, _ in worker.published.messages] == ["task.multi"]
    assert len(worker.published.events()) == 12


def test_a_thread_that_fills_the_buffer_while_the_loop_publishes_leaves_it_to_the_next_window(worker: Worker) -> None:
    # A batch stays in the buffer until its publish is done: every thread sending an event meanwhile found the buffer
    # full and queued on the dispatcher's lock behind that publish (over 200 of 500 threads at a time, under load).
    dispatcher: Any = worker.consumer.event_dispatcher
    dispatcher.buffer_limit = 12
    workflow = spec()
    chain = threading.Thread(target=run_chain, args=(worker.local, workflow), daemon=True)
    with dispatcher.mutex:  # the loop publishing a batch
        chain.start()
        chain.join(timeout=10)
        finished_during_the_publish = not chain.is_alive()
    chain.join(timeout=10)

    assert finished_during_the_publish, "the thread waited for the loop's publish"
    assert worker.published.messages == [], "nor did it publish once the lock was free"
    assert worker.consumer._flush_due, "a window is open for what it buffered"
    worker.consumer._flush_window()
    assert [key for key, _ in worker.published.messages] == ["task.multi"]
    assert len(worker.published.events()) == 12

    # With no publish under way, a full buffer is still published by the thread that filled it (a loop that stopped).
    worker.consumer._flush_due = True  # a window that never ends
    run_chain(worker.local, workflow)
    assert len(worker.published.messages) == 2
    assert len(worker.published.events()) == 24


def test_the_events_buffered_when_the_broker_connection_is_lost_go_out_after_it_is_back(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = Published()
    monkeypatch.setattr(Producer, "publish", lambda producer, body, **options: published.publish(body, **options))
    run_chain(worker.local, spec())

    # What Celery's consumer does when it reconnects: its Events bootstep closes the dispatcher and makes another.
    events_step = worker.consumer.blueprint.steps["celery.worker.consumer.events.Events"]
    events_step.start(worker.consumer)
    worker.consumer._flush_window()

    assert [e["type"] for e in published.events()] == [
        "task-sent",
        "task-received",
        "task-started",
        "task-succeeded",
    ] * 2 + [
        "task-sent",
        "task-received",
        "task-started",
        "task-failed",
    ]


@pytest.fixture
def running_loop(worker: Worker) -> Iterator[Hub]:
    """The worker's loop in a thread of its own, waiting on a socket nothing writes to for as long as its timers
    let it (10 s: a quiet worker), as the loop of a worker whose slots are all busy does."""
    hub = worker.hub
    quiet, other_end = socket.socketpair()
    hub.add_reader(quiet, lambda: None)
    hub.timer.max_interval = 60.0
    hub.call_later(60.0, lambda: None)
    ticked = threading.Event()
    hub.on_tick.add(ticked.set)
    loop = threading.Thread(target=hub.run_forever, daemon=True)
    loop.start()
    assert ticked.wait(10)
    try:
        yield hub
    finally:
        hub.stop()
        loop.join(10)
        hub.remove_reader(quiet)
        quiet.close()
        other_end.close()


def test_an_event_a_pool_thread_buffers_is_published_once_its_window_ends_though_the_loop_sleeps(
    worker: Worker, running_loop: Hub
) -> None:
    sent_at = time.monotonic()
    worker.local.started(spec(), attempt("draft"), Delivery(queue="llm", carrier="task-carrier", hops=1))

    wait_for(lambda: worker.published.messages, timeout=5, interval=0.005, what="the window's publish")
    waited = time.monotonic() - sent_at
    assert waited >= EVENT_FLUSH_S * 0.9, "published at the end of its window, not at once"
    assert [e["type"] for e in worker.published.events()] == ["task-sent", "task-received", "task-started"]
