"""The attempt lifecycle: claim → decide → run → record → release, and the outage handling around it.

A delivered step message becomes :func:`execute_attempt`. It claims the step in the state store (one script
decides whether this delivery may run), decides from the claim whether to skip, give up, reuse a cached result or
wait for a human, runs the step through the :class:`~orchestrator.engine.steps.StepExecutor`, and records the
outcome, which publishes the children it released. Nothing here knows Celery: the worker's task parses the message
and maps what this raises onto Celery's retry (:class:`~orchestrator.errors.RetryableStepError`, with ``countdown``
set) or its own bookkeeping (:class:`~orchestrator.errors.StepDeferred`), and, asked to, raises
:class:`~orchestrator.errors.StepFailed` once a step's final failure is recorded, so Celery marks the task failed.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from orchestrator import telemetry
from orchestrator.agents.loop import run_agent
from orchestrator.definition.agent import AgentParams
from orchestrator.definition.mapping import is_map
from orchestrator.definition.spec import ApprovalParams, WorkflowSpec
from orchestrator.definition.subflow import WorkflowParams
from orchestrator.domain import Attempt, Claim, ClaimOutcome, ItemClaim, RunStatus, StepOutcome
from orchestrator.engine.batches import run_passengers
from orchestrator.engine.control import DEADLINE_REASON, record_outcome, stop_run
from orchestrator.engine.coordinator import (
    decide_start,
    failure_summary,
    result_key,
    retry_delay,
    should_retry,
    upstream_reads,
)
from orchestrator.engine.local import Continuation, Delivery, continue_locally
from orchestrator.engine.mapping import map_items, start_map
from orchestrator.engine.outage import OUTAGE_ERRORS, Doing, retry_through_outage
from orchestrator.engine.preopen import attempt_call, open_ahead
from orchestrator.engine.repeat import run_repeated
from orchestrator.engine.runtime import Runtime
from orchestrator.engine.steps import StepContext
from orchestrator.engine.subflow import run_workflow_step
from orchestrator.engine.subflow_repeat import run_repeated_workflow_step
from orchestrator.errors import (
    DefinitionNotFoundError,
    ErrorRecord,
    NonRetryableStepError,
    RetryableStepError,
    StepDeferred,
    StepError,
    StepFailed,
)
from orchestrator.infra.ids import new_id
from orchestrator.llm.outbox import CallOutbox
from orchestrator.telemetry import AttemptScope

log = logging.getLogger(__name__)

T = TypeVar("T")


def execute_attempt(
    runtime: Runtime,
    attempt: Attempt,
    definition_hash: str,
    delivery: Delivery | None = None,
    *,
    raise_failure: bool = False,
) -> str:
    """Run one delivery of a step message; returns what happened, for the worker log.

    Args:
        runtime: The store, publisher, executor and settings.
        attempt: The delivery: run, step, generation and task id.
        definition_hash: The definition the message was sent for.
        delivery: What the broker says about the message.
        raise_failure: Raise :class:`StepFailed` when this attempt recorded the step's final failure, instead of
            returning ``"failed"`` (the Celery task does, so Flower and task events show the failure).

    Raises:
        StepFailed: With ``raise_failure``, after the step's final failure was recorded (nothing is left to do).
        RetryableStepError: With ``countdown`` set: the broker should deliver the message again after it.
        StepDeferred: With ``countdown``: the attempt was given back and waits that long in the broker.
        redis.exceptions.ConnectionError: Or another outage error, when Redis stayed away past the patience.
    """
    try:
        spec = _retry_through_outage(
            runtime, attempt, "load its definition", lambda: runtime.store.load_definition(definition_hash)
        )
    except DefinitionNotFoundError:
        log.warning(
            "dropping %s: no definition %s is stored (it expired, or was never submitted)", attempt, definition_hash
        )
        return "dropped: unknown definition"
    if attempt.step not in spec.steps_by_name:
        log.warning("dropping %s: workflow %s has no step %r", attempt, spec.name, attempt.step)
        return "dropped: unknown step"
    delivery = delivery or Delivery()
    hop = Continuation(delivery, runtime.local, leases=runtime.leases) if runtime.local is not None else None
    result, failure = _execute(runtime, spec, attempt, delivery, hop=hop)
    if hop is not None and hop.kept:
        continue_locally(spec, attempt, hop, lambda a, d, h, c: _execute(runtime, spec, a, d, hop=h, claim=c))
    if raise_failure and failure is not None:
        raise StepFailed(failure, step=attempt.step)
    return result


def _execute(
    runtime: Runtime,
    spec: WorkflowSpec,
    attempt: Attempt,
    delivery: Delivery,
    *,
    hop: Continuation | None,
    claim: Claim | None = None,
) -> tuple[str, str | None]:
    # One attempt, claimed here (or by its parent's finish, continuing locally): what happened, and the failure
    # summary when it failed for good.
    claimed_since = time.monotonic()  # the claim's lease runs from here, not from when this thread gets its reply
    if claim is None:
        claim = _claim(runtime, spec, attempt, delivery.carrier)
    if claim.outcome == ClaimOutcome.DONE:
        # A redelivery after the finishing worker died between recording and publishing: publish again.
        _publish_unclaimed(runtime, spec, attempt, claim)
        return f"duplicate delivery of finished step ({claim.detail})", None
    if claim.outcome == ClaimOutcome.INACTIVE and claim.detail == "deadline":
        # Past the workflow deadline: time the run out now rather than wait for the next sweep.
        stop_run(
            runtime.publisher,
            runtime.store,
            attempt.run_id,
            RunStatus.TIMED_OUT,
            DEADLINE_REASON,
            generation=attempt.generation,
            settings=runtime.settings,
        )
        return "dropped: the run is past its deadline", None
    if claim.outcome != ClaimOutcome.OK:
        log.info("dropping %s: %s %s", attempt, claim.outcome, claim.detail)
        return f"dropped: {claim.outcome}", None
    info = attempt_info(spec, attempt, claim, delivery)
    runtime.leases.hold(attempt, since=claimed_since)
    try:
        with telemetry.step_attempt(info) as scope:
            result = run_claimed(runtime, spec, attempt, claim, scope, hop=hop)
    finally:
        runtime.leases.release(attempt)
    return result, scope.failure


def _claim(runtime: Runtime, spec: WorkflowSpec, attempt: Attempt, carrier: str = "") -> Claim:
    children = spec.graph.children[attempt.step]
    upstream = upstream_reads(spec, attempt.step)
    # A claim lost to an outage would leave the step queued with no message: wait for Redis instead. Repeating it
    # after a lost reply is safe: the step is then ours and running ("busy", "own"), and its lease recovers it.
    return _retry_through_outage(
        runtime,
        attempt,
        "claim",
        lambda: runtime.store.claim(
            attempt, lease_s=runtime.settings.lease_s, upstream=upstream, children=children, carrier=carrier
        ),
    )


def attempt_info(
    spec: WorkflowSpec, attempt: Attempt, claim: Claim | ItemClaim, delivery: Delivery
) -> telemetry.AttemptInfo:
    """What telemetry records of a claimed attempt (of a step, or of a map step's item)."""
    return telemetry.AttemptInfo(
        run_id=attempt.run_id,
        workflow=spec.name,
        step=attempt.step,
        kind=spec.steps_by_name[attempt.step].uses.value,
        attempt=claim.attempt,
        task_id=attempt.task_id,
        queue=delivery.queue,
        queued_at=claim.queued_at,
        started_at=claim.now,
        headers=delivery.headers,
        due_at=delivery.due_at,
    )


def run_claimed(
    runtime: Runtime,
    spec: WorkflowSpec,
    attempt: Attempt,
    claim: Claim,
    scope: AttemptScope,
    *,
    hop: Continuation | None = None,
) -> str:
    """Decide, run and record an attempt this process has claimed; see :func:`execute_attempt`.

    ``hop``, when given, may keep one released child to run next in this slot.
    """
    # The attempt's LLM calls leave their closes here, for its next write to Redis to carry (the finish, or the next
    # call's open); what no write took is sent when the attempt ends.
    outbox = CallOutbox()
    try:
        return _run_claimed(runtime, spec, attempt, claim, scope=scope, hop=hop, outbox=outbox)
    finally:
        outbox.flush()


def _run_claimed(
    runtime: Runtime,
    spec: WorkflowSpec,
    attempt: Attempt,
    claim: Claim,
    *,
    scope: AttemptScope,
    hop: Continuation | None,
    outbox: CallOutbox,
) -> str:
    step = spec.steps_by_name[attempt.step]
    try:
        skip = decide_start(step, claim.parent_status)
        if skip is not None:
            return finish_attempt(runtime, spec, attempt, skip, scope, local=hop)
        # The retry budget is per generation (a resume grants it afresh); the attempt number is the run's own. A map
        # step's attempts only expand it (its items retry on their own), so they have no budget to run out of.
        if claim.generation_attempt > step.retry.max_attempts and not is_map(step):
            return finish_attempt(runtime, spec, attempt, StepOutcome.FAILED, scope, local=hop, error=_gave_up(claim))
        ctx = StepContext(attempt.run_id, attempt.step, claim.attempt, claim.inputs, claim.parent_output)
        if not runtime.executor.should_run(step, ctx):
            return finish_attempt(runtime, spec, attempt, StepOutcome.SKIPPED, scope, local=hop)
        if is_map(step):
            items = map_items(runtime, step, ctx)
            if not items:
                return finish_attempt(runtime, spec, attempt, StepOutcome.SUCCEEDED, scope, local=hop, output=[])
            scope.finish("mapped")
            return start_map(runtime, spec, attempt, claim, items)
        if isinstance(step.params, ApprovalParams):
            scope.finish("waiting")
            return _wait_for_decision(runtime, step.params, attempt, ctx)
        if isinstance(step.params, WorkflowParams):
            return _run_workflow(runtime, spec, attempt, claim, ctx=ctx, scope=scope)
        key = result_key(step, claim.inputs, claim.parent_output)
        if step.cache and not claim.force and claim.cache_key == key:
            # Resumed with the same definition and inputs as the result it already has: never pay for it twice.
            return finish_attempt(
                runtime, spec, attempt, StepOutcome.SUCCEEDED, scope, local=hop, cache_key=key, cached=True
            )
        call = attempt_call(spec, attempt, fresh=claim.force, outbox=outbox, opened=hop.opened if hop else None)
        try:
            if step.repeat is not None:
                output = run_repeated(runtime, step, attempt, ctx, call, key=key, force=claim.force)
            elif isinstance(step.params, AgentParams):
                output = run_agent(runtime, step, attempt, ctx, call, key=key, force=claim.force)
                runtime.executor.check_output(output)
            else:
                output = runtime.executor.run(step, ctx, call)
        except runtime.interrupts:
            raise RetryableStepError(f"step exceeded its timeout of {step.timeout_s}s", kind="timeout") from None
    except StepDeferred as exc:
        outbox.flush()  # a retry or a deferral takes no owed writes: they go first, on their own
        if not _defer(runtime, attempt, exc, scope):
            return "stale attempt: not deferred"
        raise
    except RetryableStepError as exc:
        error = error_record(exc, claim.attempt)
        if not should_retry(step.retry, claim.generation_attempt, exc.kind):
            return finish_attempt(
                runtime, spec, attempt, StepOutcome.FAILED, scope, local=hop, error=error, owed=outbox
            )
        outbox.flush()
        exc.countdown = retry_delay(step.retry, claim.generation_attempt, exc.retry_after, runtime.settings.retry_cap_s)
        if not _schedule_retry(runtime, attempt, exc, error, scope):
            return "stale attempt: not retried"
        raise
    except StepError as exc:
        error = error_record(exc, claim.attempt)
        return finish_attempt(runtime, spec, attempt, StepOutcome.FAILED, scope, local=hop, error=error, owed=outbox)
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
        error = error_record(internal, claim.attempt)
        return finish_attempt(runtime, spec, attempt, StepOutcome.FAILED, scope, local=hop, error=error, owed=outbox)
    return _succeeded(runtime, spec, attempt, scope, hop=hop, ctx=ctx, output=output, key=key, outbox=outbox)


def _succeeded(
    runtime: Runtime,
    spec: WorkflowSpec,
    attempt: Attempt,
    scope: AttemptScope,
    *,
    hop: Continuation | None,
    ctx: StepContext,
    output: Any,
    key: str,
    outbox: CallOutbox,
) -> str:
    # A step that ran succeeded: record it, and the LLM calls' closes it owes.
    if isinstance(output, dict) and isinstance(output.get("cost_usd"), float):
        scope.cost_usd = output["cost_usd"]
    if hop is not None:
        # The children it keeps may have their first LLM call opened in its finish's round trip.
        hop.open_ahead = functools.partial(open_ahead, runtime, spec, parent=attempt, ctx=ctx, output=output)
    return finish_attempt(
        runtime, spec, attempt, StepOutcome.SUCCEEDED, scope, local=hop, output=output, cache_key=key, owed=outbox
    )


def _run_workflow(
    runtime: Runtime, spec: WorkflowSpec, attempt: Attempt, claim: Claim, *, ctx: StepContext, scope: AttemptScope
) -> str:
    # A workflow step waits for its child run; a repeated one records its output once its loop has ended.
    step = spec.steps_by_name[attempt.step]
    if step.repeat is None:
        waiting: str | None = run_workflow_step(runtime, step, attempt, ctx, claim)
    else:
        waiting, output = run_repeated_workflow_step(runtime, step, attempt, ctx, claim)
        if waiting is None:
            return finish_attempt(runtime, spec, attempt, StepOutcome.SUCCEEDED, scope, output=output)
    scope.finish("waiting")
    return waiting or ""


def _gave_up(claim: Claim) -> ErrorRecord:
    # Attempts ran out without a recorded failure of the last one: its worker was lost (the sweeper re-queued it).
    last: ErrorRecord = claim.errors[-1] if claim.errors else {"type": "worker_lost", "message": "worker lost"}
    return {**last, "attempt": claim.attempt - 1, "message": f"gave up: {last.get('message', '')}"}


def _defer(runtime: Runtime, attempt: Attempt, exc: StepDeferred, scope: AttemptScope) -> bool:
    # Not a failure: the attempt is given back and the message waits in the broker, holding no worker slot.
    wait = exc.countdown or 0.0
    record = exc.to_deferral()
    if not _retry_through_outage(
        runtime,
        attempt,
        "defer",
        lambda: runtime.store.defer(attempt, record, countdown_s=wait, grace_s=runtime.settings.queued_grace_s),
    ):
        return False
    scope.finish("deferred", exc.reason)
    log.info("%s deferred %.2fs: %s", attempt, wait, exc)
    return True


def _schedule_retry(
    runtime: Runtime, attempt: Attempt, exc: RetryableStepError, error: ErrorRecord, scope: AttemptScope
) -> bool:
    countdown = exc.countdown or 0.0
    if not _retry_through_outage(
        runtime,
        attempt,
        "retry",
        lambda: runtime.store.retry(attempt, error, countdown_s=countdown, grace_s=runtime.settings.queued_grace_s),
    ):
        return False
    scope.finish("retry", exc.kind)
    log.warning("%s attempt %d: %s; retrying in %.2fs", attempt, error["attempt"], exc, countdown)
    return True


def _wait_for_decision(runtime: Runtime, params: ApprovalParams, attempt: Attempt, ctx: StepContext) -> str:
    # The attempt ends here: a human decision can take days, and no worker slot is held meanwhile.
    message = runtime.executor.approval_message(params, ctx)
    data = {"approvers": list(params.approvers), "message": message, "timeout_s": params.timeout_s}
    if not _retry_through_outage(
        runtime, attempt, "wait", lambda: runtime.store.wait_for_decision(attempt, data, params.timeout_s)
    ):
        return "stale attempt: not parked"
    return "waiting for a decision"


def error_record(exc: StepError, attempt: int) -> ErrorRecord:
    """The step error as recorded in the attempt's history and the status JSON."""
    record = exc.to_record()
    record["attempt"] = attempt
    record["retryable"] = isinstance(exc, RetryableStepError)
    if isinstance(exc, RetryableStepError) and exc.retry_after is not None:
        record["retry_after"] = exc.retry_after
    return record


def publish_children(runtime: Runtime, spec: WorkflowSpec, attempt: Attempt, steps: tuple[str, ...]) -> None:
    """Publish released steps again under fresh task ids, each held first so a lost publish is resent."""
    held = {step: new_id() for step in steps}
    runtime.store.hold_dispatch(attempt.run_id, held, runtime.settings.queued_grace_s)
    runtime.publisher.publish(spec, run_id=attempt.run_id, steps=steps, generation=attempt.generation, task_ids=held)


def finish_attempt(
    runtime: Runtime,
    spec: WorkflowSpec,
    attempt: Attempt,
    outcome: StepOutcome,
    scope: AttemptScope,
    *,
    local: Continuation | None = None,
    **details: Any,
) -> str:
    """Record the attempt's final outcome (waiting out an outage) and publish the children it released.

    With ``local``, one released child may be kept to run next in this slot (see :mod:`orchestrator.engine.local`).
    """

    def record() -> bool:
        return record_outcome(
            runtime.publisher, runtime.settings, runtime.store, spec, attempt, outcome=outcome, local=local, **details
        )

    recorded = _retry_through_outage(runtime, attempt, f"record {outcome.value}", record)
    if not recorded:
        # Refused as stale, which may hide our own finish: applied, but its reply lost to a dropped connection, and
        # the finish sent again (by us through an outage, or by redis-py itself in a cluster) found it done. Claiming
        # again tells, as for a redelivered message: a finished step's released children that no message has claimed
        # are published again (duplicates are dropped by the claim). Rare, so its round trip costs nothing healthy.
        children = spec.graph.children[attempt.step]
        claim = _retry_through_outage(
            runtime,
            attempt,
            "check",
            lambda: runtime.store.claim(attempt, lease_s=runtime.settings.lease_s, upstream=(), children=children),
        )
        if claim.outcome == ClaimOutcome.DONE:
            _publish_unclaimed(runtime, spec, attempt, claim)
    error = details.get("error")
    scope.finish(outcome.value if recorded else "stale", error.get("type") if error else None)
    if recorded and outcome == StepOutcome.FAILED:
        scope.failure = failure_summary(attempt.step, error)
    return outcome.value if recorded else "stale attempt: not recorded"


def _publish_unclaimed(runtime: Runtime, spec: WorkflowSpec, attempt: Attempt, done: Claim) -> None:
    """Publish again the children a finished step released that no message has claimed (their dispatch may have been
    lost); a duplicate message is dropped by its claim, so this is safe."""
    if done.unclaimed_children:
        _retry_through_outage(
            runtime,
            attempt,
            "publish",
            lambda: publish_children(runtime, spec, attempt, done.unclaimed_children),
        )


def _retry_through_outage(runtime: Runtime, attempt: Attempt, doing: str, call: Callable[[], T]) -> T:
    return retry_through_outage(Doing(attempt, doing), call, patience_s=runtime.settings.outage_patience_s)


def execute_batch(
    runtime: Runtime,
    attempt: Attempt,
    definition_hash: str,
    delivery: Delivery,
    passengers: Sequence[tuple[str, str]],
    *,
    raise_failure: bool = False,
) -> str:
    """Run a batch message (:mod:`orchestrator.engine.batches`): its own step as :func:`execute_attempt` does, then
    each ``(step, task_id)`` it carries, in this slot, whatever became of the first.

    Raises:
        StepFailed: With ``raise_failure``, when the message's own step failed for good (after the others ran).
        RetryableStepError: Or :class:`StepDeferred`, for the message's own step (after the others ran).
        redis.exceptions.ConnectionError: Or another outage error past the patience; the others are then left to
            their dispatch holds.
    """
    try:
        result = execute_attempt(runtime, attempt, definition_hash, delivery, raise_failure=raise_failure)
    except (RetryableStepError, StepFailed):
        _run_passengers(runtime, attempt, definition_hash, delivery, passengers)
        raise
    _run_passengers(runtime, attempt, definition_hash, delivery, passengers)
    return result


def _run_passengers(
    runtime: Runtime, carrier: Attempt, definition_hash: str, delivery: Delivery, passengers: Sequence[tuple[str, str]]
) -> None:
    if not passengers:
        return
    try:
        spec = runtime.store.load_definition(definition_hash)
    except DefinitionNotFoundError:
        return  # the message's own step was dropped for it already, and logged
    unknown = [step for step, _ in passengers if step not in spec.steps_by_name]
    if unknown:
        log.warning("dropping %s's batch: workflow %s has no step %s", carrier, spec.name, ", ".join(unknown))
        return

    def publish(steps: Sequence[str], task_ids: Mapping[str, str]) -> None:
        runtime.publisher.publish(
            spec, run_id=carrier.run_id, steps=steps, generation=carrier.generation, task_ids=task_ids
        )

    if runtime.local is None:
        publish([s for s, _ in passengers], dict(passengers))
        return
    hop = Continuation(delivery, runtime.local, leases=runtime.leases)
    run_passengers(
        spec,
        carrier,
        passengers=passengers,
        hop=hop,
        execute=lambda a, d, h, c: _execute(runtime, spec, a, d, hop=h, claim=c),
        publish=publish,
    )
