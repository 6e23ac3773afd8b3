"""The worker's side of continuing locally (:mod:`orchestrator.engine.local`): which child may run in a slot, and
the task events that let Flower see a step no message carried.

A step run in its parent's slot is announced as Celery announces a message's task: ``task-sent``,
``task-received`` and ``task-started`` before it runs, ``task-succeeded`` or ``task-failed`` after, under the task
id the finish gave it and named ``WORKFLOW.STEP``. The events are buffered and published together (Celery's grouped
``task.multi`` events, which Flower and every event receiver read), at most once per 10 ms window while a chain runs
and at its end, so a local hop costs one publish or less where a message costs a push, a pop, an acknowledgement and
four event publishes.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from celery import Celery
from celery.events.dispatcher import EventDispatcher
from celery.utils.saferepr import saferepr
from celery.worker import state as worker_state

from orchestrator.celery_app import CeleryPublisher, ShadowNamedAMQP
from orchestrator.definition.spec import StepKind, WorkflowSpec
from orchestrator.domain import Attempt
from orchestrator.engine.coordinator import queue_for
from orchestrator.engine.local import Delivery
from orchestrator.errors import StepFailed
from workers.consumer import EVENT_FLUSH_S

MAX_LOCAL_HOPS = 100
"""Steps one message's slot runs one after another at most; the next child is then published (a worker stopping
warm waits for the chain, so it must stay short)."""


class CeleryLocalSteps:
    """Lets a finishing step keep a released child on the same queue, and announces it in task events.

    Args:
        app: The worker's app (its event dispatcher and its current task's request).
        publisher: Sends a locally run step's message when it is retried or deferred.
    """

    def __init__(self, app: Celery, publisher: CeleryPublisher) -> None:
        self.app = app
        self.publisher = publisher
        self._lock = threading.Lock()
        self._events: EventDispatcher | None = None
        self._pid = 0
        self._started: dict[str, float] = {}
        self._flushed = 0.0

    def accepts(self, spec: WorkflowSpec, step: str, delivery: Delivery) -> bool:
        """Same queue as the message this slot runs, no signal-enforced time limit on either, not stopping, and
        priorities by depth (running a child at once is depth first; ``ORCH_PRIORITIES=off`` keeps arrival order)."""
        if worker_state.should_stop is not None or worker_state.should_terminate is not None:
            return False
        settings = self.publisher.settings
        if settings.priorities == "off":
            return False  # first in, first out asked for: a released child queues behind what came before it
        child = spec.steps_by_name[step]
        if not delivery.queue or queue_for(child, settings.llm_queue, settings.cpu_queue) != delivery.queue:
            return False
        if child.timeout_s is not None and child.uses not in {StepKind.LLM, StepKind.AGENT}:
            return False  # prefork's time limits are per message: the carrier's would not fit this step
        request = self.app.current_task.request if self.app.current_task else None
        if request is None or any(request.timelimit or ()):
            return False
        return delivery.hops < MAX_LOCAL_HOPS

    def started(self, spec: WorkflowSpec, attempt: Attempt, delivery: Delivery) -> None:
        """Announce the step (claimed by its parent's finish) as sent, received and started, in one publish."""
        args = saferepr((attempt.run_id, spec.definition_hash, attempt.step, attempt.generation))
        fields: dict[str, Any] = {
            "uuid": attempt.task_id,
            "name": f"{spec.name}.{attempt.step}",
            "args": args,
            "kwargs": "{}",
            "root_id": attempt.task_id,
            "parent_id": None,
            "retries": 0,
            "eta": None,
            "expires": None,
        }
        self._started[attempt.task_id] = time.monotonic()
        self._send(
            ("task-sent", {**fields, "queue": delivery.queue, "routing_key": delivery.queue, "exchange": ""}),
            ("task-received", fields),
            ("task-started", {"uuid": attempt.task_id}),
            flush=time.monotonic() - self._flushed >= EVENT_FLUSH_S,
        )

    def ended(self, attempt: Attempt, result: str, failure: str | None, *, more: bool = False) -> None:
        """Announce the step's end: ``task-failed`` with :class:`StepFailed` when it failed for good.

        With ``more`` it goes out with the next step's announcement (one publish for both).
        """
        began = self._started.pop(attempt.task_id, None)
        event: tuple[str, dict[str, Any]]
        if failure is not None:
            exc = StepFailed(failure, step=attempt.step)
            event = ("task-failed", {"uuid": attempt.task_id, "exception": repr(exc), "traceback": ""})
        else:
            runtime = time.monotonic() - began if began is not None else None
            event = ("task-succeeded", {"uuid": attempt.task_id, "result": repr(result), "runtime": runtime})
        self._send(event, flush=not more)

    def resend(self, spec: WorkflowSpec, attempt: Attempt, countdown_s: float, reason: str) -> None:
        """Send the step's message under its task id, due in ``countdown_s``, and announce the retry."""
        self._started.pop(attempt.task_id, None)
        self._send(("task-retried", {"uuid": attempt.task_id, "exception": reason, "traceback": ""}))
        signature = self.publisher.signature(
            spec, run_id=attempt.run_id, step=attempt.step, generation=attempt.generation, task_id=attempt.task_id
        )
        signature.apply_async(countdown=countdown_s)

    def flush(self) -> None:
        """Publish the buffered events now (a batch has ended); with the worker's own buffer, its window does."""
        if self._events is not None and self._pid == os.getpid():
            self._events.flush(errors=False)
            self._flushed = time.monotonic()

    def _send(self, *events: tuple[str, dict[str, Any]], flush: bool = True) -> None:
        worker_buffer = self.app.amqp.task_event_buffer() if isinstance(self.app.amqp, ShadowNamedAMQP) else None
        if worker_buffer is not None:
            # The worker's main process (threads pool): its consumer publishes these with its own events, a window
            # at a time.
            for kind, fields in events:
                worker_buffer.send(kind, **fields)
            return
        dispatcher = self._dispatcher()
        for kind, fields in events:
            dispatcher.send(kind, **fields)
        if flush:
            dispatcher.flush(errors=False)
            self._flushed = time.monotonic()

    def _dispatcher(self) -> EventDispatcher:
        # One per process, built after the fork (a connection must not cross processes); its buffer is shared by
        # the process's threads, and a flush publishes whatever is buffered as one message.
        with self._lock:
            if self._events is None or self._pid != os.getpid():
                request = self.app.current_task.request if self.app.current_task else None
                hostname = getattr(request, "hostname", None) or None
                self._events = self.app.events.Dispatcher(
                    self.app.connection_for_write(), hostname=hostname, buffer_group=["task"], buffer_limit=1000
                )
                self._pid = os.getpid()
            return self._events
