"""The step task: parses the message and hands it to the engine (:mod:`orchestrator.engine.attempt`).

Retryable errors are mapped onto Celery's retry options here and nowhere else (:meth:`StepTask.retry`).

What Celery (and so Flower, task events and their exporters) sees of each step attempt:

- ``SUCCESS``: the step succeeded, was skipped (its condition, or ``upstream_failed``), waits for a human, or the
  delivery was dropped (a duplicate, a cancelled or finished run, a stale attempt): the task did what it had to.
- ``RETRY``: a retryable error the step's retry policy allows again, or a deferral (a shared rate limit).
- ``FAILURE``: the step failed for good. The failure is recorded first (step record, events, our metrics), then
  :class:`~orchestrator.errors.StepFailed` is raised: listed in ``throws``, so the worker logs one line without a
  traceback; not in ``autoretry_for``, so it is never retried; and with ``acks_late`` the message is acknowledged
  as any failure is (``acks_on_failure_or_timeout``), never redelivered.
- ``REVOKED``: a running attempt interrupted by ``cancel`` (prefork terminates it). The other steps of a revoked
  batch message are sent again (:func:`resend_passengers`).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject

from orchestrator.celery_app import BATCH_KWARG, STEP_TASK
from orchestrator.domain import Attempt
from orchestrator.engine.attempt import execute_attempt, execute_batch
from orchestrator.engine.batches import passengers_of
from orchestrator.engine.items import execute_item
from orchestrator.engine.local import Delivery
from orchestrator.engine.runtime import RuntimeHolder
from orchestrator.errors import RetryableStepError, StepFailed

log = logging.getLogger(__name__)


class StepTask(Task[Any, Any]):
    """Celery task base for steps: late acks, redelivery on worker loss, autoretry for retryable step errors."""

    autoretry_for = (RetryableStepError,)
    # A step that failed for good is a failed task, expected: logged as one line, and its message acknowledged.
    throws = (StepFailed,)
    acks_on_failure_or_timeout = True
    # The step's own RetryPolicy decides how often (the engine); Celery must not stop earlier.
    max_retries = None
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        # The one place retryability becomes Celery retry options: the policy's backoff, never below retry-after.
        exc = kwargs.get("exc")
        if isinstance(exc, RetryableStepError) and exc.countdown is not None:
            kwargs["countdown"] = exc.countdown
        sent = self.request.kwargs or {}
        if BATCH_KWARG in sent and "kwargs" not in kwargs:
            # A batch's other steps ran in this slot already: the retried message carries its own step alone.
            kwargs["kwargs"] = {k: v for k, v in sent.items() if k != BATCH_KWARG}
        return super().retry(*args, **kwargs)


def register_tasks(app: Celery, runtime: RuntimeHolder) -> Task[Any, Any]:
    """Register the step task on ``app``."""

    @app.task(bind=True, base=StepTask, name=STEP_TASK, shared=False)
    def run_step(self: StepTask, *args: Any, **kwargs: Any) -> str:
        """``run_step(run_id, definition_hash, step, generation[, index], batch=[[step, task_id], ...])``, all
        strings, as the publisher sends it (``index``, a map step's item, in decimal digits; ``batch``, the other
        steps of a batch message)."""
        # Anyone who can write to the broker can send anything: a message not shaped like ours is refused for good
        # (rejected without requeueing, so never redelivered), with the reason in the log.
        try:
            passengers = passengers_of(kwargs.pop(BATCH_KWARG)) if BATCH_KWARG in kwargs else ()
            run_id, definition_hash, step, generation, index = step_args(args, kwargs)
            if passengers and index is not None:
                raise ValueError("a map step's item carries no batch")
        except ValueError as exc:
            log.error("rejecting malformed step message %s: %s", self.request.id, exc)
            raise Reject(f"malformed step message: {exc}", requeue=False) from None
        attempt = Attempt(run_id, step, generation, str(self.request.id), index)
        if index is not None:
            return execute_item(runtime.get(), attempt, definition_hash, _delivery(self.request))
        delivery = _delivery(self.request)
        if passengers:
            # A batch (orchestrator/engine/batches.py): the message's own step, then the others in this slot.
            return execute_batch(runtime.get(), attempt, definition_hash, delivery, passengers, raise_failure=True)
        return execute_attempt(runtime.get(), attempt, definition_hash, delivery, raise_failure=True)

    return run_step


_STEP_ARGS = ("run_id", "definition_hash", "step", "generation")
_ITEM_ARG = "index"
MAX_ITEM_INDEX_DIGITS = 9


def step_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str, str, str, int | None]:
    """The arguments of a step message, by position or by name; the item index is ``None`` for a step.

    Raises:
        ValueError: Missing, surplus or unknown arguments, one that is not a non-empty string, or an index that is
            not a small decimal number.
    """
    names = (*_STEP_ARGS, _ITEM_ARG)
    if len(args) > len(names):
        raise ValueError(f"{len(args)} positional arguments; expected {', '.join(_STEP_ARGS)} and optionally index")
    values = dict(zip(names, args, strict=False))
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise ValueError(f"unexpected keyword arguments {unknown}")
    twice = sorted(set(kwargs) & set(values))
    if twice:
        raise ValueError(f"arguments given twice: {twice}")
    values.update(kwargs)
    missing = [name for name in _STEP_ARGS if name not in values]
    if missing:
        raise ValueError(f"missing arguments {missing}")
    wrong = {name: type(v).__name__ for name, v in values.items() if not isinstance(v, str)}
    if wrong or not all(values.values()):
        raise ValueError(f"every argument must be a non-empty string; got {wrong or values}")
    raw = values.get(_ITEM_ARG)
    if raw is not None and not (raw.isascii() and raw.isdigit() and len(raw) <= MAX_ITEM_INDEX_DIGITS):
        raise ValueError(f"index must be decimal digits (at most {MAX_ITEM_INDEX_DIGITS}); got {raw[:20]!r}")
    index = int(raw) if raw is not None else None
    return values["run_id"], values["definition_hash"], values["step"], values["generation"], index


def resend_passengers(runtime: RuntimeHolder, request: Any) -> int:
    """Send again, one step a message, the other steps of a revoked batch message; returns how many went out.

    A revoke is aimed at one step (``cancel_others``, a cancel, a deadline), but Celery acknowledges the whole message:
    a batch dropped before it started, or its slot terminated mid-step, would leave its other steps to the sweeper's
    grace. Sent again under their own task ids, each is claimed once: one that ran already, or whose run was cancelled
    with it, is dropped by its claim as any duplicate is.
    """
    sent = dict(request.kwargs or {})
    if request.task != STEP_TASK or BATCH_KWARG not in sent:
        return 0
    try:
        passengers = passengers_of(sent.pop(BATCH_KWARG))
        run_id, definition_hash, _, generation, _ = step_args(tuple(request.args or ()), sent)
    except ValueError:
        return 0  # a malformed message, refused when it ran
    active = runtime.get()
    spec = active.store.load_definition(definition_hash)
    for step, task_id in passengers:
        active.publisher.publish(spec, run_id=run_id, steps=(step,), generation=generation, task_ids={step: task_id})
    log.info("batch message %s revoked: sent its %d other steps again", request.id, len(passengers))
    return len(passengers)


def _delivery(request: Any) -> Delivery:
    # The message's queue, headers (trace context) and, for a delayed retry or deferral, when it became due.
    info = request.delivery_info or {}
    due = request.eta
    if isinstance(due, str):
        due = datetime.fromisoformat(due)
    return Delivery(
        queue=info.get("routing_key") or "",
        headers=request.headers or {},
        due_at=due.timestamp() if isinstance(due, datetime) else None,
    )
