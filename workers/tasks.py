"""The step task: a thin shell that claims, runs, records and releases.

Retryable errors are mapped onto Celery's retry options here and nowhere else (:meth:`StepTask.retry`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import kombu.exceptions
import redis
from celery import Celery, Task
from celery.exceptions import Reject, SoftTimeLimitExceeded

from orchestrator import telemetry
from orchestrator.definition.spec import ApprovalParams, WorkflowSpec
from orchestrator.definition.templates import render
from orchestrator.engine.control import DEADLINE_REASON, record_outcome, stop_run
from orchestrator.engine.coordinator import (
    decide_start,
    result_key,
    retry_delay,
    should_retry,
    upstream_reads,
)
from orchestrator.engine.dispatch import STEP_TASK, dispatch
from orchestrator.engine.steps import StepContext
from orchestrator.errors import (
    NonRetryableStepError,
    RetryableStepError,
    RunNotFoundError,
    StepDeferred,
    StepError,
)
from orchestrator.llm.gateway import CallContext
from orchestrator.state import Attempt, Claim, RunStatus, StepOutcome
from orchestrator.telemetry import AttemptScope
from workers.runtime import Runtime, RuntimeHolder

log = logging.getLogger(__name__)

T = TypeVar("T")

# Redis (the state store and the broker) not answering, or still loading its data after a restart.
OUTAGE_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    # A master demoted behind a proxy or a managed endpoint answers READONLY until the address moves to the new one.
    redis.exceptions.ReadOnlyError,
    kombu.exceptions.OperationalError,
)


class StepTask(Task[Any, Any]):
    """Celery task base for steps: late acks, redelivery on worker loss, autoretry for retryable step errors."""

    autoretry_for = (RetryableStepError,)
    # The step's own RetryPolicy decides how often (see ``execute``); Celery must not stop earlier.
    max_retries = None
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        # The one place retryability becomes Celery retry options: the policy's backoff, never below retry-after.
        exc = kwargs.get("exc")
        if isinstance(exc, RetryableStepError) and exc.countdown is not None:
            kwargs["countdown"] = exc.countdown
        return super().retry(*args, **kwargs)


def register_tasks(app: Celery, runtime: RuntimeHolder) -> Task[Any, Any]:
    """Register the step task on ``app``."""

    @app.task(bind=True, base=StepTask, name=STEP_TASK, shared=False)
    def run_step(self: StepTask, *args: Any, **kwargs: Any) -> str:
        """``run_step(run_id, definition_hash, step, generation)``, all strings, as ``dispatch`` sends it."""
        # Anyone who can write to the broker can send anything: a message not shaped like ours is refused for good
        # (rejected without requeueing, so never redelivered), with the reason in the log.
        try:
            run_id, definition_hash, step, generation = _step_args(args, kwargs)
        except ValueError as exc:
            log.error("rejecting malformed step message %s: %s", self.request.id, exc)
            raise Reject(f"malformed step message: {exc}", requeue=False) from None
        attempt = Attempt(run_id, step, generation, str(self.request.id))
        return execute(runtime.get(), attempt, definition_hash, _delivery(self.request))

    return run_step


_STEP_ARGS = ("run_id", "definition_hash", "step", "generation")


def _step_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str, str, str]:
    """The arguments of a step message, by position or by name.

    Raises:
        ValueError: Missing, surplus or unknown arguments, or one that is not a non-empty string.
    """
    if len(args) > len(_STEP_ARGS):
        raise ValueError(f"{len(args)} positional arguments; expected {', '.join(_STEP_ARGS)}")
    values = dict(zip(_STEP_ARGS, args, strict=False))
    unknown = sorted(set(kwargs) - set(_STEP_ARGS))
    if unknown:
        raise ValueError(f"unexpected keyword arguments {unknown}")
    twice = sorted(set(kwargs) & set(values))
    if twice:
        raise ValueError(f"arguments given twice: {twice}")
    values.update(kwargs)
    missing = [name for name in _STEP_ARGS if name not in values]
    if missing:
        raise ValueError(f"missing arguments {missing}")
    wrong = {name: type(values[name]).__name__ for name in _STEP_ARGS if not isinstance(values[name], str)}
    if wrong or not all(values.values()):
        raise ValueError(f"every argument must be a non-empty string; got {wrong or values}")
    return values["run_id"], values["definition_hash"], values["step"], values["generation"]


def _delivery(request: Any) -> dict[str, Any]:
    # The message's queue, headers (trace context) and, for a delayed retry or deferral, when it became due.
    info = request.delivery_info or {}
    due = request.eta
    if isinstance(due, str):
        due = datetime.fromisoformat(due)
    return {
        "queue": info.get("routing_key") or "",
        "headers": request.headers or {},
        "due_at": due.timestamp() if isinstance(due, datetime) else None,
    }


def execute(rt: Runtime, attempt: Attempt, definition_hash: str, delivery: dict[str, Any] | None = None) -> str:
    """Run one delivery of a step message; returns what happened, for the worker log.

    Raises:
        RetryableStepError: With ``countdown`` set, for Celery's autoretry to schedule the next attempt.
    """
    try:
        spec = _outlast(rt, f"{attempt}: load its definition", lambda: rt.store.load_definition(definition_hash))
    except RunNotFoundError:
        log.warning("dropping %s: no definition %s is stored (it expired, or was never submitted)",
                    attempt, definition_hash)  # fmt: skip
        return "dropped: unknown definition"
    if attempt.step not in spec.steps_by_name:
        log.warning("dropping %s: workflow %s has no step %r", attempt, spec.name, attempt.step)
        return "dropped: unknown step"
    children = spec.graph.children[attempt.step]
    upstream = upstream_reads(spec, attempt.step)
    # A claim lost to an outage would leave the step queued with no message: wait for Redis instead. Repeating it
    # after a lost reply is safe: the step is then ours and running ("busy", "own"), and its lease recovers it.
    claim = _outlast(rt, f"{attempt}: claim", lambda: rt.store.claim(attempt, lease_s=rt.settings.lease_s,
                                                                  upstream=upstream, children=children))  # fmt: skip
    if claim.outcome == "done":
        if claim.unclaimed_children:
            # A redelivery after the finishing worker died between recording and publishing: publish again
            # (a duplicate message is dropped by the claim, so this is safe).
            _outlast(rt, f"{attempt}: publish", lambda: _dispatch(rt, spec, attempt, claim.unclaimed_children))
        return f"duplicate delivery of finished step ({claim.detail})"
    if claim.outcome == "inactive" and claim.detail == "deadline":
        # Past the workflow deadline: time the run out now rather than wait for the next sweep.
        stop_run(rt.app, rt.store, attempt.run_id, RunStatus.TIMED_OUT, DEADLINE_REASON, generation=attempt.generation)
        return "dropped: the run is past its deadline"
    if claim.outcome != "ok":
        log.info("dropping %s: %s %s", attempt, claim.outcome, claim.detail)
        return f"dropped: {claim.outcome}"
    delivery = delivery or {}
    info = telemetry.AttemptInfo(
        run_id=attempt.run_id,
        workflow=spec.name,
        step=attempt.step,
        kind=spec.steps_by_name[attempt.step].uses.value,
        attempt=claim.attempt,
        task_id=attempt.task_id,
        queue=delivery.get("queue", ""),
        queued_at=claim.queued_at,
        started_at=claim.now,
        headers=delivery.get("headers") or {},
        due_at=delivery.get("due_at"),
    )
    rt.leases.hold(attempt)
    try:
        with telemetry.step_attempt(info) as scope:
            return _run_attempt(rt, spec, attempt, claim, scope)
    finally:
        rt.leases.release(attempt)


def _run_attempt(rt: Runtime, spec: WorkflowSpec, attempt: Attempt, claim: Claim, scope: AttemptScope) -> str:
    step = spec.steps_by_name[attempt.step]
    try:
        skip = decide_start(step, claim.parent_status)
        if skip is not None:
            return _finish(rt, spec, attempt, skip, scope)
        if claim.attempt > step.retry.max_attempts:
            last = claim.errors[-1] if claim.errors else {"type": "worker_lost", "message": "worker lost"}
            error = {**last, "attempt": claim.attempt - 1, "message": f"gave up: {last.get('message', '')}"}
            return _finish(rt, spec, attempt, StepOutcome.FAILED, scope, error=error)
        ctx = StepContext(attempt.run_id, attempt.step, claim.attempt, claim.inputs, claim.parent_output)
        if not rt.executor.should_run(step, ctx):
            return _finish(rt, spec, attempt, StepOutcome.SKIPPED, scope)
        if isinstance(step.params, ApprovalParams):
            scope.finish("waiting")
            return _wait_for_decision(rt, step.params, attempt, ctx)
        key = result_key(step, claim.inputs, claim.parent_output)
        if step.cache and not claim.force and claim.cache_key == key:
            # Resumed with the same definition and inputs as the result it already has: never pay for it twice.
            return _finish(rt, spec, attempt, StepOutcome.SUCCEEDED, scope, cache_key=key, cached=True)
        call = CallContext(attempt.run_id, spec.name, budget_usd=spec.budget_usd, fresh=claim.force, step=attempt.step)
        try:
            output = rt.executor.run(step, ctx, call)
        except SoftTimeLimitExceeded:
            raise RetryableStepError(f"step exceeded its timeout of {step.timeout_s}s", kind="timeout") from None
    except StepDeferred as exc:
        # Not a failure: the attempt is given back and the message waits in the broker, holding no worker slot.
        wait = exc.countdown or 0.0
        record = exc.to_record()
        if not _outlast(rt, f"{attempt}: defer", lambda: rt.store.defer(attempt, record, countdown_s=wait,
                                                                      grace_s=rt.settings.queued_grace_s)):  # fmt: skip
            return "stale attempt: not deferred"
        scope.finish("deferred", exc.reason)
        log.info("%s deferred %.2fs: %s", attempt, wait, exc)
        raise
    except RetryableStepError as exc:
        error = _error_record(exc, claim.attempt)
        if not should_retry(step.retry, claim.attempt, exc.kind):
            return _finish(rt, spec, attempt, StepOutcome.FAILED, scope, error=error)
        countdown = exc.countdown = retry_delay(step.retry, claim.attempt, exc.retry_after, rt.settings.retry_cap_s)
        if not _outlast(rt, f"{attempt}: retry", lambda: rt.store.retry(attempt, error, countdown_s=countdown,
                                                                      grace_s=rt.settings.queued_grace_s)):  # fmt: skip
            return "stale attempt: not retried"
        scope.finish("retry", exc.kind)
        log.warning("%s attempt %d: %s; retrying in %.2fs", attempt, claim.attempt, exc, exc.countdown)
        raise
    except StepError as exc:
        return _finish(rt, spec, attempt, StepOutcome.FAILED, scope, error=_error_record(exc, claim.attempt))
    except OUTAGE_ERRORS as exc:
        # Redis went away under the step (the LLM gateway's cache and limits live there): not the step's fault,
        # so not a failure. The attempt keeps its lease; once Redis is back and the lease has run out, the sweeper
        # queues the step again.
        log.warning("%s: Redis does not answer (%s); the attempt is left to its lease", attempt, exc)
        raise
    except Exception as exc:
        # A bug of ours must still end the step, not leave it running until its lease runs out.
        log.exception("%s: internal error", attempt)
        internal = NonRetryableStepError(f"internal error: {type(exc).__name__}: {exc}", kind="internal_error")
        return _finish(rt, spec, attempt, StepOutcome.FAILED, scope, error=_error_record(internal, claim.attempt))
    if isinstance(output, dict) and isinstance(output.get("cost_usd"), float):
        scope.cost_usd = output["cost_usd"]
    return _finish(rt, spec, attempt, StepOutcome.SUCCEEDED, scope, output=output, cache_key=key)


def _wait_for_decision(rt: Runtime, params: ApprovalParams, attempt: Attempt, ctx: StepContext) -> str:
    # The task ends here: a human decision can take days, and no worker slot is held meanwhile.
    message = render(params.message, ctx.template_context()) if params.message else None
    data = {"approvers": list(params.approvers), "message": message, "timeout_s": params.timeout_s}
    if not _outlast(rt, f"{attempt}: wait", lambda: rt.store.wait_for_decision(attempt, data, params.timeout_s)):
        return "stale attempt: not parked"
    return "waiting for a decision"


def _error_record(exc: StepError, attempt: int) -> dict[str, Any]:
    record = exc.to_record()
    record["attempt"] = attempt
    record["retryable"] = isinstance(exc, RetryableStepError)
    if isinstance(exc, RetryableStepError) and exc.retry_after is not None:
        record["retry_after"] = exc.retry_after
    return record


def _dispatch(rt: Runtime, spec: WorkflowSpec, attempt: Attempt, steps: tuple[str, ...]) -> None:
    held = {step: uuid.uuid4().hex for step in steps}
    rt.store.hold_dispatch(attempt.run_id, held, rt.settings.queued_grace_s)
    dispatch(
        rt.app, rt.settings, spec, run_id=attempt.run_id, steps=steps, generation=attempt.generation, task_ids=held
    )


def _finish(
    rt: Runtime, spec: WorkflowSpec, attempt: Attempt, outcome: StepOutcome, scope: AttemptScope, **details: Any
) -> str:
    interrupted = False

    def record() -> bool:
        nonlocal interrupted
        try:
            return record_outcome(rt.app, rt.settings, rt.store, spec, attempt, outcome=outcome, **details)
        except OUTAGE_ERRORS:
            interrupted = True
            raise

    recorded = _outlast(rt, f"{attempt}: record {outcome.value}", record)
    if interrupted and not recorded:
        # The outage may have hidden our own finish: applied, but its reply or the children's publish lost, so the
        # repeat was refused as stale. Claiming again tells, as for a redelivered message: a finished step's
        # released children that no message has claimed are published again (duplicates are dropped by the claim).
        children = spec.graph.children[attempt.step]
        claim = _outlast(rt, f"{attempt}: check", lambda: rt.store.claim(attempt, lease_s=rt.settings.lease_s,
                                                                      upstream=(), children=children))  # fmt: skip
        if claim.outcome == "done" and claim.unclaimed_children:
            _outlast(rt, f"{attempt}: publish", lambda: _dispatch(rt, spec, attempt, claim.unclaimed_children))
    error = details.get("error")
    scope.finish(outcome.value if recorded else "stale", error.get("type") if error else None)
    return outcome.value if recorded else "stale attempt: not recorded"


def _outlast(rt: Runtime, what: str, call: Callable[[], T]) -> T:
    """:func:`outlast` for up to the ``ORCH_OUTAGE_PATIENCE_S`` setting."""
    return outlast(what, call, patience_s=rt.settings.outage_patience_s)


def outlast(what: str, call: Callable[[], T], *, patience_s: float) -> T:
    """``call()``, repeated while Redis (or the broker) does not answer, for up to ``patience_s``.

    A transition given up half way strands a step: a claim that fails leaves it queued with its message already
    taken, a publish that fails leaves released children with no message. Nothing can move while Redis is down
    anyway, so the task waits for it rather than lose its message. Every call repeated here is safe to repeat:
    the scripts check the attempt's generation and task id, so a repeat after a lost reply is refused, not applied
    twice (``_finish`` handles what that refusal can hide).

    Raises:
        redis.exceptions.ConnectionError: Or another of ``OUTAGE_ERRORS``, once ``patience_s`` has passed.
    """
    deadline = time.monotonic() + patience_s
    pause = 0.1
    while True:
        try:
            return call()
        except OUTAGE_ERRORS as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("%s: Redis does not answer (%s); trying again in %.1fs", what, exc, pause)
        time.sleep(pause)
        pause = min(pause * 2, 2.0)
