"""Celery for producers: the configuration built from :class:`Settings`, a publish-only app, and the publisher.

Everything that sends step messages (the client, the CLI, the API, the sweeper service) builds its app here; it
registers no task, so a producer never imports the worker package. Workers build theirs with
:func:`workers.app.create_app`, which starts from :func:`create_app` and adds the step task, bootsteps and signals.
``celeryconfig.py`` at the top of the repository maps the same :func:`celery_config` for ``celery -A`` users.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any, NamedTuple

import kombu.exceptions
from celery import Celery, group
from celery.app.amqp import AMQP
from celery.canvas import Signature
from celery.utils import uuid

from orchestrator.definition.spec import TOP_LEVEL, StepKind, WorkflowSpec
from orchestrator.engine.backlog import SENT_AT_HEADER
from orchestrator.engine.batches import batch_size, plan_batches
from orchestrator.engine.coordinator import queue_for
from orchestrator.engine.priorities import REDIS_PRIORITY_SEPARATOR, REDIS_PRIORITY_STEPS, message_priority, step_level
from orchestrator.errors import BrokerUnavailableError
from orchestrator.infra import event_json, kombu_redis
from orchestrator.infra.redis_url import broker_connection, require_shared_store
from orchestrator.infra.settings import Settings
from orchestrator.telemetry.tracing import dispatch_headers

STEP_TASK = "orchestrator.run_step"
"""The step task's registered name: the producers' messages and the workers' task must agree on it."""

BATCH_KWARG = "batch"
"""The keyword argument of a step message carrying the other steps of its batch, ``[[step, task_id], ...]``."""


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery configuration for ``settings``.

    Raises:
        RedisUrlError: The broker URL is a malformed Sentinel URL, or ``REDIS_URL`` is ``memory://`` (a process with
            a Celery app shares its runs with other processes, which a memory store cannot).
    """
    require_shared_store(settings.redis_url, "Celery workers and producers")
    # A Sentinel URL becomes kombu's ``sentinel://`` URLs plus the master name (and TLS) in transport options.
    broker = broker_connection(settings.effective_broker_url)
    event_json.register()
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
        # A step that failed for good raises StepFailed after recording it: acknowledged, never redelivered.
        "task_acks_on_failure_or_timeout": True,
        # Long LLM calls: one message per process slot, so a slow step never hoards work another worker could do.
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # kombu's ack emulation on Redis (the ``unacked`` hash and index): a copy of each message taken, for the
            # visibility timeout to hand back. The lease index covers every step message sooner, so by default it is
            # off; kombu then keeps unacknowledged messages in memory and requeues them on close, reject or warm
            # shutdown all the same. Other transports ignore the option.
            "ack_emulation": settings.broker_unacked_index,
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
        # The same JSON, encoded by orjson (every receiver decodes it as JSON).
        "event_serializer": event_json.EVENT_SERIALIZER,
        "worker_hijack_root_logger": False,
        "imports": list(settings.imports),
        **({"broker_use_ssl": dict(broker.use_ssl)} if broker.use_ssl is not None else {}),
    }


class ShadowNamedAMQP(AMQP):
    """Celery's message factory, with each ``task-sent`` event naming the task as Flower shows it (``WORKFLOW.STEP``).

    Celery names a sent event after the registered task (``orchestrator.run_step``) even when the message has a
    ``shadow`` name, and event consumers merge a sent event into the task whenever it arrives: one arriving after the
    worker's ``task-received`` (the producer descheduled between its publish and its event, on a busy machine)
    renamed the step in Flower, and a failed step then hid as ``orchestrator.run_step``.
    """

    buffered_events: Callable[[], Any] | None = None
    """Set by a worker's consumer (``workers/consumer.py``): its task-event dispatcher, when this process has a
    buffering one (its main process, with an event loop), else ``None``. See :meth:`task_event_buffer`."""

    def task_event_buffer(self) -> Any | None:
        """The worker's buffered task-event dispatcher, if this process has one: events sent to it go out with the
        worker's own task events, a window at a time, instead of one ``PUBLISH`` each. ``task-sent`` events of the
        messages this process publishes go there."""
        source = self.buffered_events
        buffered = source() if source is not None else None
        if buffered is not None and buffered.enabled and "task" in (buffered.buffer_group or ()):
            return buffered
        return None

    def as_task_v2(self, *args: Any, **kwargs: Any) -> Any:
        """The message, with its sent event named like its ``shadow`` header.

        Its shown arguments (``argsrepr`` and ``kwargsrepr``, in its headers and sent event) are their plain ``repr``
        when they are short strings in tuples, lists and dicts, as a step message's are: what Celery's ``saferepr``
        makes of them, at a fraction of its cost. Anything else is left to ``saferepr``.
        """
        if len(args) >= 4:  # Celery passes (task_id, name, args, kwargs, ...) by position
            shown = (("argsrepr", args[2], self.argsrepr_maxsize), ("kwargsrepr", args[3], self.kwargsrepr_maxsize))
            for name, value, max_chars in shown:
                if kwargs.get(name) is None:
                    kwargs[name] = _plain_repr(value, max_chars)
        message = super().as_task_v2(*args, **kwargs)
        shadow = message.headers.get("shadow")
        if shadow and message.sent_event is not None:
            message.sent_event["name"] = shadow
        return message

    @cached_property
    def _event_dispatcher(self) -> Any:
        # Celery publishes each sent event through this dispatcher, with the message's producer (Celery's own is a
        # disabled dispatcher, since it publishes with the producer given).
        return _SentEvents(self, self.app.events.Dispatcher(enabled=False))


class _StepMessage(NamedTuple):
    """One step message before it is sent: the step task's arguments and its Celery options."""

    args: tuple[str, ...]
    kwargs: dict[str, Any]
    options: dict[str, Any]


def _plain_repr(value: object, max_chars: int) -> str | None:
    """``repr(value)`` if ``value`` is strings in at most three levels of tuples, lists and string-keyed dicts
    (there ``saferepr`` gives the same) and it is at most ``max_chars`` long (``saferepr`` would truncate it); else
    ``None``."""

    def plain(item: object, level: int) -> bool:
        if isinstance(item, str):
            return True
        if level >= 3:
            return False
        if isinstance(item, tuple | list):
            return all(plain(x, level + 1) for x in item)
        if isinstance(item, dict):
            return all(isinstance(k, str) and plain(v, level + 1) for k, v in item.items())
        return False

    if value is None or not plain(value, 0):
        return None
    shown = repr(value)
    return shown if len(shown) <= max_chars else None


class _SentEvents:
    """Publishes ``task-sent`` events as Celery does, or buffers them with a worker's own task events."""

    def __init__(self, amqp: ShadowNamedAMQP, plain: Any) -> None:
        self._amqp = amqp
        self._plain = plain

    def publish(self, type: str, fields: dict[str, Any], producer: Any, **kwargs: Any) -> Any:
        """Buffer the event with the worker's task events when there are such, else publish it with ``producer``."""
        buffered = self._amqp.task_event_buffer()
        if buffered is not None:
            return buffered.send(type, **fields)
        return self._plain.publish(type, fields, producer, **kwargs)


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app that sends step messages and registers no task (the producers' app)."""
    settings = settings or Settings.from_env()
    kombu_redis.install()
    app = Celery("orchestrator", amqp=ShadowNamedAMQP)
    app.config_from_object(celery_config(settings))
    return app


@contextmanager
def _broker_errors(what: str) -> Iterator[None]:
    try:
        yield
    except kombu.exceptions.OperationalError as exc:
        raise BrokerUnavailableError(f"{what}: the broker did not answer: {exc}") from exc


class CeleryPublisher:
    """Sends step attempts as Celery canvas and revokes them (the engine's :class:`StepPublisher` on Celery).

    Args:
        app: The Celery app to send with (a producer's or a worker's).
        settings: Queues, priorities and the broker URL.
        slots: How many worker slots are known to take steps; given, a fan-out wider than twice that is sent as
            batches of several steps a message (:mod:`orchestrator.engine.batches`). Only workers give it: they
            alone run a batch's other steps.
    """

    def __init__(self, app: Celery, settings: Settings, *, slots: Callable[[], int] | None = None) -> None:
        self.app = app
        self.settings = settings
        self.slots = slots

    def signature(
        self,
        spec: WorkflowSpec,
        *,
        run_id: str,
        step: str,
        generation: str,
        task_id: str | None = None,
        index: int | None = None,
        sent_at: float | None = None,
        passengers: Sequence[tuple[str, str]] = (),
    ) -> Signature:
        """The immutable signature of one step attempt (:meth:`message` as Celery canvas)."""
        message = self.message(
            spec,
            run_id=run_id,
            step=step,
            generation=generation,
            task_id=task_id,
            index=index,
            sent_at=sent_at,
            passengers=passengers,
        )
        return self._signature(message)

    def message(
        self,
        spec: WorkflowSpec,
        *,
        run_id: str,
        step: str,
        generation: str,
        task_id: str | None = None,
        index: int | None = None,
        sent_at: float | None = None,
        passengers: Sequence[tuple[str, str]] = (),
    ) -> _StepMessage:
        """The message of one step attempt, routed by kind and named ``workflow.step`` for Flower.

        With ``ORCH_PRIORITIES=depth`` it carries the step's priority (:mod:`orchestrator.engine.priorities`),
        which Celery keeps on retries. An item of a map step (``index``) carries its index as a fifth argument and
        is named ``workflow.step[index]``. Dispatched inside a traced span of the same run (a step attempt, the run's
        root), its headers carry that span as the W3C ``traceparent``. ``sent_at`` (default now) is the time its
        publish began, stamped on every message of one group alike. ``passengers``, ``(step, task_id)`` pairs of the
        same queue and priority, ride along as a batch (``batch`` keyword argument), run after it in its slot.
        """
        settings = self.settings
        step_spec = spec.steps_by_name[step]
        options: dict[str, object] = {
            "queue": queue_for(step_spec, settings.llm_queue, settings.cpu_queue),
            "shadow": f"{spec.name}.{step}" if index is None else f"{spec.name}.{step}[{index}]",
        }
        if settings.priorities == "depth":
            options["priority"] = message_priority(step_level(spec, step), settings.effective_broker_url)
        if step_spec.timeout_s is not None and step_spec.uses not in {StepKind.LLM, StepKind.AGENT}:
            # Prefork enforces these with signals; LLM calls get the timeout from the SDK instead, on any pool.
            options["soft_time_limit"] = step_spec.timeout_s
            options["time_limit"] = step_spec.timeout_s + 10
        if task_id is not None:
            options["task_id"] = task_id
        # When it was sent: the sweeper tells by it whether a step's lost message could still be waiting in a queue.
        sent = time.time() if sent_at is None else sent_at
        options["headers"] = {**dispatch_headers(run_id), SENT_AT_HEADER: f"{sent:.3f}"}
        args: tuple[str, ...] = (run_id, spec.definition_hash, step, generation)
        if index is not None:
            args += (str(index),)
        kwargs = {BATCH_KWARG: [list(pair) for pair in passengers]} if passengers else {}
        return _StepMessage(args, kwargs, options)

    def _signature(self, message: _StepMessage) -> Signature:
        return self.app.signature(
            STEP_TASK, args=message.args, kwargs=message.kwargs, options=message.options, immutable=True
        )

    def _batches(self, spec: WorkflowSpec, steps: Sequence[str], ids: Mapping[str, str]) -> list[tuple[str, ...]]:
        # Batches only for a fan-out wider than the known slots can take, of steps with task ids held by their finish.
        if self.slots is None or len(steps) <= 1 or self.settings.priorities == "off":
            return [(step,) for step in steps]
        size = batch_size(len(steps), self.slots())
        return plan_batches(steps, size, lambda step: self._batch_group(spec, step, ids))

    def _batch_group(self, spec: WorkflowSpec, step: str, ids: Mapping[str, str]) -> tuple[str, int] | None:
        step_spec = spec.steps_by_name[step]
        if step not in ids or (
            step_spec.timeout_s is not None and step_spec.uses not in {StepKind.LLM, StepKind.AGENT}
        ):
            return None
        queue = queue_for(step_spec, self.settings.llm_queue, self.settings.cpu_queue)
        return queue, step_level(spec, step)

    def publish(
        self,
        spec: WorkflowSpec,
        *,
        run_id: str,
        steps: Sequence[str],
        generation: str,
        task_ids: Mapping[str, str] | None = None,
    ) -> None:
        """Send the steps that became ready together: one signature, or a ``group`` fanning out across workers (in
        batches of several steps a message when wider than the known slots can take; see ``slots``).

        Raises:
            BrokerUnavailableError: The broker did not answer.
        """
        if not steps:
            return
        ids, sent = task_ids or {}, time.time()
        messages = [
            self.message(
                spec,
                run_id=run_id,
                step=batch[0],
                generation=generation,
                task_id=ids.get(batch[0]),
                sent_at=sent,
                passengers=[(s, ids[s]) for s in batch[1:]],
            )
            for batch in self._batches(spec, steps, ids)
        ]
        with _broker_errors(f"run {run_id}: publish {', '.join(steps)}"):
            self._send(messages)

    def publish_items(
        self,
        spec: WorkflowSpec,
        *,
        run_id: str,
        step: str,
        generation: str,
        items: Sequence[tuple[int, str]],
        sent_at: float | None = None,
    ) -> None:
        """Send items of a map step as one ``group``, each under its task id (held in the lease index already), all
        stamped ``sent_at`` (default now).

        Raises:
            BrokerUnavailableError: The broker did not answer.
        """
        if not items:
            return
        # One stamp for the whole group (and for every group of one long list), taken before it is built: building
        # and sending 10,000 messages takes seconds, and a later message stamped later than its item was queued (past
        # SENT_CLOCK_MARGIN_S) made the sweeper take every item still waiting behind it for lost and send it again.
        sent = time.time() if sent_at is None else sent_at
        messages = [
            self.message(
                spec, run_id=run_id, step=step, generation=generation, task_id=task_id, index=index, sent_at=sent
            )
            for index, task_id in items
        ]
        with _broker_errors(f"run {run_id}: publish {len(items)} items of {step}"):
            self._send(messages)

    def _send(self, messages: Sequence[_StepMessage]) -> None:
        """Send ``messages`` as ``Signature.apply_async`` (one) or ``group.apply_async`` (several) would send them,
        without building either: each message is made by ``app.amqp.create_task_message`` and sent by
        ``app.amqp.send_task_message`` (signals, ``task-sent`` events and publish retries included), all on one
        producer from the app's pool.

        What Celery's path adds is kept: several messages share a fresh group id, each with its index in it; the
        registered step task's execution options (a worker's) go under each message's own; the task a worker is
        running is the root and parent of what it sends. What is left out only fed result objects, which nothing
        reads here (no result backend): the ``AsyncResult`` and ``GroupResult`` and the parent task's trail of them.
        A configuration this does not cover (eager mode; a task-level ``expires``) goes through Celery's canvas.
        """
        app = self.app
        # The worker's registered step task, whose execution options Task.apply_async puts under the message's.
        task: Any = app.tasks.get(STEP_TASK)
        preset: dict[str, Any] = dict(task._get_exec_options()) if task is not None else {}
        if app.conf.task_always_eager or preset.get("expires") is not None:
            self._send_canvas(messages)
            return
        if task is not None:
            preset.setdefault("ignore_result", task.ignore_result)
        group_id = uuid() if len(messages) > 1 else None
        with app.producer_or_acquire() as producer:
            for index, message in enumerate(messages):
                self._send_one(producer, task, message, preset, group=(group_id, None if group_id is None else index))

    def _send_one(
        self,
        producer: Any,
        task: Any,
        message: _StepMessage,
        preset: dict[str, Any],
        *,
        group: tuple[str | None, int | None],
    ) -> None:
        """One message, as ``app.send_task`` makes and sends it (Celery 5.7, ``celery/app/base.py``); ``group``: its
        group id and index in it (``None`` each for a message sent alone)."""
        app, amqp = self.app, self.app.amqp
        group_id, group_index = group
        options = {**preset, **message.options}
        task_id = options.pop("task_id", None) or uuid()
        shadow = options.pop("shadow", None)
        time_limit = options.pop("time_limit", None)
        soft_time_limit = options.pop("soft_time_limit", None)
        options.pop("expires", None)
        ignore_result = options.pop("ignore_result", None)
        options = amqp.router.route(options, STEP_TASK, message.args, message.kwargs, task)
        queue = options.get("queue")
        if queue is not None and hash(queue) in producer.connection.declared_entities:
            # Declared on this connection already: kombu would find so only after binding a copy of the queue to the
            # channel, for every message. A new connection starts with none declared, so the first still declares.
            options["declare"] = []
        root_id = parent_id = None
        parent: Any = app.current_worker_task
        if parent:
            root_id = parent.request.root_id or parent.request.id
            parent_id = parent.request.id
            if app.conf.task_inherit_parent_priority:
                options.setdefault("priority", parent.request.delivery_info.get("priority"))
        created = amqp.create_task_message(
            task_id,
            STEP_TASK,
            message.args,
            message.kwargs,
            None,  # countdown
            None,  # eta
            group_id,
            group_index,
            None,  # expires
            0,  # retries
            None,  # chord
            None,  # callbacks
            None,  # errbacks
            app.thread_oid,
            time_limit,
            soft_time_limit,
            app.conf.task_send_sent_event,
            root_id,
            parent_id,
            shadow,
            None,  # chain
            ignore_result=ignore_result,
            replaced_task_nesting=0,
            **options,
        )
        with producer.connection._reraise_as_library_errors():
            if not ignore_result:
                app.backend.on_task_call(producer, task_id)
            amqp.send_task_message(producer, STEP_TASK, created, **options)

    def _send_canvas(self, messages: Sequence[_StepMessage]) -> None:
        """Send ``messages`` through Celery's canvas: one signature, or a ``group``."""
        signatures = [self._signature(message) for message in messages]
        if len(signatures) == 1:
            signatures[0].apply_async()
        else:
            group(signatures).apply_async()

    def revoke(self, task_ids: Sequence[str]) -> None:
        """Interrupt the attempts running under ``task_ids`` (prefork: SIGTERM; thread pools cannot be).

        Raises:
            BrokerUnavailableError: The broker did not answer.
        """
        if task_ids:
            with _broker_errors("revoke"):
                self.app.control.revoke(list(task_ids), terminate=True, signal="SIGTERM")
