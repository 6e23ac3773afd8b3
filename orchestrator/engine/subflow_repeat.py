"""A repeated ``workflow`` step (``repeat:`` on ``uses: workflow``): each iteration a child run, each finished one a
checkpoint.

An attempt of the step continues after its last checkpoint (:func:`~orchestrator.engine.repeat.continued_from`):
it starts the next iteration's child, its inputs rendered with ``iteration`` and ``previous`` (the last iteration's
output: the child's step outputs by name), and parks the step waiting for it, as a plain ``workflow`` step waits.
The child's index on its parent link is its iteration (part of its idempotency key, so a redelivered attempt finds
the child its predecessor started). When the child succeeds, the step goes back to its queue
(:func:`~orchestrator.engine.subflow.child_ended`) and the next attempt checkpoints that iteration, tests ``until``
and either ends the loop or starts the next child. A failed child fails the step; ``resume`` resumes that child.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from orchestrator.definition.spec import StepSpec
from orchestrator.domain import Attempt, Claim, IterationCheckpoint, RunStatus
from orchestrator.engine.coordinator import result_key
from orchestrator.engine.repeat import continued_from, loop_ended, loop_result
from orchestrator.engine.runtime import Runtime
from orchestrator.engine.steps import StepContext
from orchestrator.engine.subflow import child_outcome, park_on_child
from orchestrator.errors import RunNotFoundError
from orchestrator.state import keys
from orchestrator.state.base import StateStore


def run_repeated_workflow_step(
    runtime: Runtime, step: StepSpec, attempt: Attempt, ctx: StepContext, claim: Claim
) -> tuple[str | None, Any]:
    """One attempt of a repeated ``workflow`` step.

    Returns:
        ``(what, None)`` when the step now waits for a child (or the attempt was stale), ``(None, output)`` when
        the loop has ended: the last iteration's output, for the caller to record.

    Raises:
        NonRetryableStepError: ``max_iterations`` (``on_exhausted: fail``), what ``until`` raised, or what starting
            a child raised.
    """
    repeat = step.repeat
    assert repeat is not None, f"step {step.name!r} does not repeat"
    store = runtime.store
    fields = store.run_fields(attempt.run_id)
    key = result_key(step, claim.inputs, claim.parent_output)
    found = store.iteration_checkpoint(attempt.run_id, step.name)
    last = continued_from(found, repeat, key=key, generation=attempt.generation, force=claim.force)
    child = None if claim.force else fields.get(keys.step_field(step.name, "child_run_id")) or None
    child_fields = _fields_of(store, child)
    done = last.iteration if last is not None else 0
    if child_fields.get("parent_index") != str(done + 1):
        child = None  # an earlier iteration's child (checkpointed already), or none: the next starts afresh
    elif child_fields.get("status") == RunStatus.SUCCEEDED.value:
        assert child is not None
        _, output, _ = child_outcome(store, child, child_fields)
        this = replace(ctx, iteration=done + 1, previous=last.output if last is not None else None)
        checkpoint = IterationCheckpoint(
            iteration=done + 1,
            output=output,
            until_met=runtime.executor.until_met(step, this, output),
            key=key,
            generation=attempt.generation,
        )
        if not store.record_iteration(attempt, checkpoint):
            return "stale attempt: iteration not checkpointed", None
        last, child = checkpoint, None
    if last is not None and loop_ended(last, repeat):
        return None, loop_result(step, repeat, last)
    iteration = last.iteration + 1 if last is not None else 1
    this = replace(ctx, iteration=iteration, previous=last.output if last is not None else None)
    return park_on_child(runtime, step, attempt, this, fields, child=child, index=iteration), None


def _fields_of(store: StateStore, run_id: str | None) -> dict[str, str]:
    if run_id is None:
        return {}
    try:
        return store.run_fields(run_id)
    except RunNotFoundError:
        return {}
