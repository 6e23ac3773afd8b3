"""The worker's side of continuing locally (:mod:`orchestrator.engine.local`): which child may run in a slot, and
the task events that let Flower see a step no message carried.

A step run in its parent's slot is announced as Celery announces a message's task: ``task-sent``,
``task-received`` and ``task-started`` before it runs, ``task-succeeded`` or ``task-failed`` after, under the task
id the finish gave it and named ``WORKFLOW.STEP``. Its ``task-sent`` carries only the name and what
``task-received`` does not (queue, routing key, exchange): a task's events are merged into one task by Celery's
``events.state`` (Flower's model), and the arguments and ids a message's ``task-sent`` repeats were a fifth of the
bytes of a step's events. The events are buffered and published together (Celery's grouped
``task.multi`` events, which Flower and every event receiver read), at most once per 10 ms window while a chain runs
and at its end, so a local hop costs one publish or less where a message costs a push, a pop, an acknowledgement and
four event publishes.

On the threads pool a finish may keep several children (:meth:`CeleryLocalSteps.spare`): the first runs in the
slot, each other is submitted to the pool's own executor (:class:`WorkerThreads`), which never runs more threads
than the worker's concurrency, and queues it ahead of the messages the consumer hands over later. Prefork and solo
slots keep one.

As many handed-over children as the worker has threads may wait for one; while the child's queue holds messages
nobody has taken (a backlog, read once a second at most: :class:`~orchestrator.engine.backlog.QueueBacklog`), as
many more as that backlog, up to :data:`BACKLOG_EXTRA` times the threads. A kept child waits for a thread of this
worker rather than a slot of any worker, which no worker has free while a backlog lasts, and costs no publish, pop,
claim or LLM admission of its own; without a backlog another worker may have a free thread, and the child goes out
as a message.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from celery import Celery, bootsteps
from celery.concurrency.thread import TaskPool as ThreadsPool
from celery.events.dispatcher import EventDispatcher
from celery.worker import state as worker_state

from orchestrator.celery_app import CeleryPublisher, ShadowNamedAMQP
from orchestrator.definition.spec import StepKind, WorkflowSpec
from orchestrator.domain import Attempt
from orchestrator.engine.backlog import QueueBacklog
from orchestrator.engine.coordinator import queue_for
from orchestrator.engine.local import Delivery
from orchestrator.errors import StepFailed
from workers.consumer import EVENT_FLUSH_S, buffer_task_events

log = logging.getLogger(__name__)

BACKLOG_EXTRA = 3
"""While a child's queue holds a backlog, handed-over children that may wait for a thread beyond the pool's
concurrency, as a multiple of it at most: with those, as many as Celery's default prefetch (4 a slot) would reserve."""

MAX_LOCAL_HOPS = 100
"""Steps one message's slot runs one after another at most; the next child is then published (a worker stopping
warm waits for the chain, so it must stay short)."""


class WorkerThreads:
    """The threads pool's executor, for the children a finish keeps beyond its slot's own.

    Attached by the :class:`ThreadsBootstep` once the pool exists (never for prefork, solo or gevent: they take no
    work but a message's). At most the pool's limit of handed-over children wait for a thread at a time, and up to
    :data:`BACKLOG_EXTRA` times as many more while the child's queue holds messages (``backlog``).
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._limit = 0
        self._waiting = 0
        self._backlog: QueueBacklog | None = None
        self._lock = threading.Condition()
        self._here = threading.local()

    def attach(self, pool: Any, backlog: QueueBacklog | None = None) -> None:
        """Take the worker's pool, if it is the threads pool, and what waits in its queues (``None``: unknown, a
        broker that is not Redis)."""
        if isinstance(pool, ThreadsPool):
            # getattr: the executor is not in the pool's type as mypy sees it.
            self._executor, self._limit = getattr(pool, "executor"), int(pool.limit)  # noqa: B009
            self._backlog = backlog

    def detach(self, wait_s: float) -> None:
        """Hand no more children over, and wait up to ``wait_s`` for those handed over to start (the pool drops
        what has not started when it stops: those are left to their leases)."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            self._executor = None
            while self._waiting > 0 and self._lock.wait(max(0.0, deadline - time.monotonic())):
                pass
            if self._waiting:
                log.warning("%d kept steps did not start before the pool stopped; left to their leases", self._waiting)

    def spare(self, queue: str) -> int:
        """How many more children (of ``queue``) may be handed over now."""
        if self._executor is None:
            return 0
        room, waiting = self._limit, self._waiting
        if waiting >= room and self._backlog is not None:
            room += min(self._backlog.waiting(queue), BACKLOG_EXTRA * self._limit)  # read only when it decides
        return max(0, room - waiting)

    def spawn(self, job: Callable[[], None]) -> bool:
        """Submit ``job`` to the pool's executor; ``False`` when it takes no more (not attached, or shut down)."""
        executor = self._executor
        if executor is None:
            return False
        with self._lock:
            self._waiting += 1
        try:
            future = executor.submit(self._run, job)
        except RuntimeError:  # the executor has shut down
            self._started()
            return False
        future.add_done_callback(self._dropped)
        return True

    @property
    def in_spawned(self) -> bool:
        """Whether this thread runs a handed-over child (no message, so no request, carries it)."""
        return bool(getattr(self._here, "spawned", False))

    def _run(self, job: Callable[[], None]) -> None:
        self._started()
        self._here.spawned = True
        try:
            job()
        finally:
            self._here.spawned = False

    def _started(self) -> None:
        with self._lock:
            self._waiting -= 1
            self._lock.notify_all()

    def _dropped(self, future: Future[None]) -> None:
        if future.cancelled():
            self._started()
            log.warning("a kept step waiting for a thread was dropped as the pool stopped; left to its lease")


class ThreadsBootstep(bootsteps.StartStopStep):
    """Gives the worker's :class:`WorkerThreads` its pool once the pool exists, and takes it back before the pool
    stops (waiting a lease at most for the children handed over to start)."""

    requires = ("celery.worker.components:Pool",)

    def start(self, worker: Any) -> None:
        backlog = None
        if isinstance(worker.pool, ThreadsPool):
            try:
                broker = worker.app.orchestrator_runtime.get().broker
            except Exception as exc:  # Redis may not answer yet (a cluster client connects as it is built)
                log.warning("children kept beyond the pool's threads ignore the queues' backlog: %s", exc)
                broker = None
            if broker is not None:
                backlog = QueueBacklog(broker, tuple(worker.app.amqp.queues.consume_from or ()))
        worker.app.orchestrator_threads.attach(worker.pool, backlog)

    def stop(self, worker: Any) -> None:
        threads: WorkerThreads = worker.app.orchestrator_threads
        threads.detach(worker.app.orchestrator_runtime.settings.lease_s)


class CeleryLocalSteps:
    """Lets a finishing step keep a released child on the same queue, and announces it in task events.

    Args:
        app: The worker's app (its event dispatcher and its current task's request).
        publisher: Sends a locally run step's message when it is retried or deferred.
        threads: The threads pool's executor, when the worker runs one (more children kept per finish).
    """

    def __init__(self, app: Celery, publisher: CeleryPublisher, threads: WorkerThreads | None = None) -> None:
        self.app = app
        self.publisher = publisher
        self.threads = threads
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
        if request is None:
            # A child handed to another thread runs with no message: kept only where no time limit applies.
            if self.threads is None or not self.threads.in_spawned:
                return False
        elif any(request.timelimit or ()):
            return False
        return delivery.hops < MAX_LOCAL_HOPS

    def spare(self, queue: str) -> int:
        """The threads pool's room for handed-over children of ``queue`` (0 on other pools, or when stopping)."""
        if self.threads is None or worker_state.should_stop is not None or worker_state.should_terminate is not None:
            return 0
        return self.threads.spare(queue)

    def spawn(self, job: Callable[[], None]) -> bool:
        """Submit ``job`` to the threads pool's executor (``False`` on other pools)."""
        return self.threads is not None and self.threads.spawn(job)

    def started(self, spec: WorkflowSpec, attempt: Attempt, delivery: Delivery) -> None:
        """Announce the step (claimed by its parent's finish) as sent, received and started, in one publish."""
        # A step's arguments are strings: shown as their repr, as a step message's own are (ShadowNamedAMQP), where
        # Celery's saferepr would give the same at several times the cost.
        args = repr((attempt.run_id, spec.definition_hash, attempt.step, attempt.generation))
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
            (
                "task-sent",
                {
                    "uuid": attempt.task_id,
                    "name": fields["name"],
                    "queue": delivery.queue,
                    "routing_key": delivery.queue,
                    "exchange": "",
                },
            ),
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
        amqp = self.app.amqp
        worker_buffer = amqp.task_event_buffer() if isinstance(amqp, ShadowNamedAMQP) else None
        if worker_buffer is not None:
            # The worker's main process (threads pool): its consumer publishes these with its own events, a window
            # at a time.
            buffer_task_events(worker_buffer, *events)
            return
        dispatcher = self._dispatcher()
        buffer_task_events(dispatcher, *events)
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
