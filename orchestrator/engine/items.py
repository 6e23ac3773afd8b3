"""One item of a map step: claim → run → record → refill, as :mod:`orchestrator.engine.attempt` does for a step.

A delivered item message (the step task with an item index) becomes :func:`execute_item`. The item is claimed in
the state store, run by its step's kind (:func:`run_item`, the seam where other kinds of item plug in), and its
outcome recorded; the record queues the next pending items, which this worker publishes, and when it was the step's
last unfinished item this worker also finishes the step (:func:`orchestrator.engine.mapping.finish_map`). Retries
follow the step's policy per item, under the item's own task id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from orchestrator import telemetry
from orchestrator.definition.mapping import is_map
from orchestrator.definition.spec import ApprovalParams, StepKind, StepSpec, WorkflowSpec
from orchestrator.domain import Attempt, ClaimOutcome, ItemClaim, RunStatus, StepOutcome
from orchestrator.engine.attempt import attempt_info, error_record
from orchestrator.engine.control import DEADLINE_REASON, stop_run
from orchestrator.engine.coordinator import retry_delay, should_retry, upstream_reads
from orchestrator.engine.local import Delivery
from orchestrator.engine.mapping import record_item
from orchestrator.engine.outage import OUTAGE_ERRORS, Doing, retry_through_outage
from orchestrator.engine.runtime import Runtime
from orchestrator.engine.steps import StepContext
from orchestrator.engine.subflow import run_workflow_item
from orchestrator.errors import (
    DefinitionNotFoundError,
    ErrorRecord,
    NonRetryableStepError,
    RetryableStepError,
    StepDeferred,
    StepError,
)
from orchestrator.llm.gateway import CallContext
from orchestrator.llm.outbox import CallOutbox
from orchestrator.state.owed import OwedWrites
from orchestrator.telemetry import AttemptScope

log = logging.getLogger(__name__)

T = TypeVar("T")


def execute_item(runtime: Runtime, attempt: Attempt, definition_hash: str, delivery: Delivery | None = None) -> str:
    """Run one delivery of an item message (``attempt.index`` set); returns what happened, for the worker log.

    Raises:
        RetryableStepError: With ``countdown`` set: the broker should deliver the message again after it.
        redis.exceptions.ConnectionError: Or another outage error, when Redis stayed away past the patience.
    """
    try:
        spec = _patiently(runtime, attempt, "load", lambda: runtime.store.load_definition(definition_hash))
    except DefinitionNotFoundError:
        return "dropped: unknown definition"
    step = spec.steps_by_name.get(attempt.step)
    if step is None or not is_map(step):
        log.warning("dropping %s: workflow %s has no map step %r", attempt, spec.name, attempt.step)
        return "dropped: not a map step"
    upstream = upstream_reads(spec, attempt.step)
    claimed_since = time.monotonic()  # the claim's lease runs from here (see LeaseKeeper.hold)
    claim = _patiently(
        runtime,
        attempt,
        "claim",
        lambda: runtime.store.claim_item(attempt, lease_s=runtime.settings.lease_s, upstream=upstream),
    )
    if claim.outcome == ClaimOutcome.INACTIVE and claim.detail == "deadline":
        stop_run(runtime.publisher, runtime.store, attempt.run_id, RunStatus.TIMED_OUT, DEADLINE_REASON)
        return "dropped: the run is past its deadline"
    if claim.outcome != ClaimOutcome.OK:
        return f"dropped item: {claim.outcome} {claim.detail}".rstrip()
    info = attempt_info(spec, attempt, claim, delivery or Delivery())
    runtime.leases.hold(attempt, since=claimed_since)
    try:
        with telemetry.step_attempt(info) as scope:
            return _run_claimed_item(runtime, spec, attempt, claim, scope)
    finally:
        runtime.leases.release(attempt)


def run_item(runtime: Runtime, step: StepSpec, ctx: StepContext, call: CallContext) -> Any:
    """Run one item of ``step`` by its kind and return its output (the seam for kinds that run items otherwise)."""
    return runtime.executor.run(step, ctx, call)


def _run_claimed_item(
    runtime: Runtime, spec: WorkflowSpec, attempt: Attempt, claim: ItemClaim, scope: AttemptScope
) -> str:
    # The item's LLM calls leave their closes for its record to carry (see orchestrator.engine.attempt.run_claimed).
    outbox = CallOutbox()
    try:
        return _run_item_attempt(runtime, spec, attempt, claim, scope, outbox=outbox)
    finally:
        outbox.flush()


def _run_item_attempt(
    runtime: Runtime, spec: WorkflowSpec, attempt: Attempt, claim: ItemClaim, scope: AttemptScope, *, outbox: CallOutbox
) -> str:
    step = spec.steps_by_name[attempt.step]
    try:
        if claim.generation_attempt > step.retry.max_attempts:
            # Attempts ran out without a recorded failure of the last one: its worker was lost.
            lost: ErrorRecord = {"type": "worker_lost", "message": "gave up: worker lost", "attempt": claim.attempt - 1}
            return _finish(runtime, spec, attempt, StepOutcome.FAILED, scope, error=lost)
        ctx = StepContext(
            attempt.run_id,
            attempt.step,
            claim.attempt,
            claim.inputs,
            claim.parent_output,
            item=claim.item,
            index=attempt.index,
            count=claim.count,
        )
        if step.uses == StepKind.WORKFLOW:
            what = run_workflow_item(runtime, step, attempt, ctx)
            scope.finish("waiting")
            return what
        if isinstance(step.params, ApprovalParams):
            what = _wait_for_decision(runtime, step.params, attempt, ctx)
            scope.finish("waiting")
            return what
        call = CallContext(attempt.run_id, spec.name, budget_usd=spec.budget_usd, step=attempt.step, outbox=outbox)
        try:
            output = run_item(runtime, step, ctx, call)
        except runtime.interrupts:
            raise RetryableStepError(f"step exceeded its timeout of {step.timeout_s}s", kind="timeout") from None
    except StepDeferred as exc:
        outbox.flush()  # a requeue takes no owed writes: they go first, on their own
        if not _requeue(runtime, attempt, None, exc.countdown or 0.0, counted=False):
            return "stale attempt: not deferred"
        scope.finish("deferred", exc.reason)
        raise
    except RetryableStepError as exc:
        error = error_record(exc, claim.attempt)
        if not should_retry(step.retry, claim.generation_attempt, exc.kind):
            return _finish(runtime, spec, attempt, StepOutcome.FAILED, scope, error=error, owed=outbox)
        outbox.flush()
        exc.countdown = retry_delay(step.retry, claim.generation_attempt, exc.retry_after, runtime.settings.retry_cap_s)
        if not _requeue(runtime, attempt, error, exc.countdown, counted=True):
            return "stale attempt: not retried"
        scope.finish("retry", exc.kind)
        raise
    except StepError as exc:
        error = error_record(exc, claim.attempt)
        return _finish(runtime, spec, attempt, StepOutcome.FAILED, scope, error=error, owed=outbox)
    except OUTAGE_ERRORS:
        raise
    except Exception as exc:
        log.exception("%s: internal error", attempt)
        internal = NonRetryableStepError(f"internal error: {type(exc).__name__}: {exc}", kind="internal_error")
        error = error_record(internal, claim.attempt)
        return _finish(runtime, spec, attempt, StepOutcome.FAILED, scope, error=error, owed=outbox)
    if isinstance(output, dict) and isinstance(output.get("cost_usd"), float):
        scope.cost_usd = output["cost_usd"]
    return _finish(runtime, spec, attempt, StepOutcome.SUCCEEDED, scope, output=output, owed=outbox)


def _wait_for_decision(runtime: Runtime, params: ApprovalParams, attempt: Attempt, ctx: StepContext) -> str:
    # One decision per item: the item's attempt ends here, holding no worker slot while a human decides.
    message = runtime.executor.approval_message(params, ctx)
    data: dict[str, Any] = {"index": attempt.index, "approvers": list(params.approvers), "message": message}
    data["timeout_s"] = params.timeout_s
    parked = _patiently(
        runtime, attempt, "wait", lambda: runtime.store.wait_item_decision(attempt, data, params.timeout_s)
    )
    return "item waiting for a decision" if parked else "stale attempt: not parked"


def _requeue(runtime: Runtime, attempt: Attempt, error: ErrorRecord | None, countdown: float, *, counted: bool) -> bool:
    grace = runtime.settings.queued_grace_s
    return _patiently(
        runtime,
        attempt,
        "requeue",
        lambda: runtime.store.retry_item(attempt, error, countdown_s=countdown, grace_s=grace, counted=counted),
    )


def _finish(
    runtime: Runtime,
    spec: WorkflowSpec,
    attempt: Attempt,
    outcome: StepOutcome,
    scope: AttemptScope,
    *,
    output: Any = None,
    error: ErrorRecord | None = None,
    owed: OwedWrites | None = None,
) -> str:
    """Record the item's outcome (:func:`~orchestrator.engine.mapping.record_item`) and close its telemetry."""
    recorded, what = record_item(runtime, spec, attempt, outcome, output=output, error=error, owed=owed)
    scope.finish(outcome.value if recorded else "stale", error.get("type") if error else None)
    return what


def _patiently(runtime: Runtime, attempt: Attempt, doing: str, call: Callable[[], T]) -> T:
    return retry_through_outage(Doing(attempt, doing), call, patience_s=runtime.settings.outage_patience_s)
