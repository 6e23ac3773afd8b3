"""Repeated steps (``repeat:``): a bounded loop of iterations inside an attempt, each finished one a checkpoint.

An iteration is not an attempt. One attempt runs iterations one after another until ``until`` holds or
``max_iterations`` have run; after each, the iteration's number and output are checkpointed in the step's record
(fenced like a finish: only the attempt that owns the step may write it), with a ``step_iteration`` event. When an
iteration fails, the attempt fails the way any attempt does (retried by the step's retry policy, or failed for good);
the next attempt, a worker's replacement after a crash, or a ``resume`` of the failed run then continues after the
last checkpoint: iterations already finished are never run (or paid for) again. ``resume --from STEP`` starts the
loop afresh, and so does any change to what the step reads (the checkpoint carries the step's result key).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from orchestrator.definition.repeat import RepeatSpec
from orchestrator.definition.spec import StepSpec
from orchestrator.domain import Attempt, IterationCheckpoint
from orchestrator.engine.outage import Doing, retry_through_outage
from orchestrator.engine.runtime import Runtime
from orchestrator.engine.steps import StepContext
from orchestrator.errors import NonRetryableStepError
from orchestrator.llm.gateway import CallContext

log = logging.getLogger(__name__)


def run_repeated(
    runtime: Runtime,
    step: StepSpec,
    attempt: Attempt,
    ctx: StepContext,
    call: CallContext,
    *,
    key: str,
    force: bool,
) -> Any:
    """Run a repeated step's remaining iterations in this attempt and return the last one's output.

    Args:
        runtime: The process's store and executor.
        step: The step (its ``repeat`` is set).
        attempt: The attempt, which owns the step: checkpoints are written under it.
        ctx: What the step sees; each iteration gets its ``iteration`` and ``previous``.
        call: The LLM call context; each iteration's carries its number (the reply cache's key includes it).
        key: The step's result key now: a checkpoint made under another key is not continued from.
        force: ``resume --from`` named the step: checkpoints of earlier generations are not continued from.

    Raises:
        NonRetryableStepError: ``max_iterations`` when ``until`` never held and ``on_exhausted`` is ``fail``; or
            what an iteration or ``until`` raised.
        RetryableStepError: What an iteration raised (the attempt fails; the next continues after the checkpoint).
        StepDeferred: An iteration must wait for a shared rate limit (likewise).
    """
    repeat = step.repeat
    assert repeat is not None, f"step {step.name!r} does not repeat"
    found = retry_through_outage(
        Doing(attempt, "read its loop checkpoint"),
        lambda: runtime.store.iteration_checkpoint(attempt.run_id, attempt.step),
        patience_s=runtime.settings.outage_patience_s,
    )
    last = continued_from(found, repeat, key=key, generation=attempt.generation, force=force)
    if last is not None and loop_ended(last, repeat):
        # The worker before finished the loop but died before recording the step.
        return loop_result(step, repeat, last)
    deadline = time.monotonic() + step.timeout_s if step.timeout_s else None
    iteration = last.iteration if last is not None else 0
    previous = last.output if last is not None else None
    while True:
        iteration += 1
        this = replace(ctx, iteration=iteration, previous=previous)
        output = runtime.executor.run(step, this, replace(call, iteration=iteration), deadline=deadline)
        checkpoint = IterationCheckpoint(
            iteration=iteration,
            output=output,
            until_met=runtime.executor.until_met(step, this, output),
            key=key,
            generation=attempt.generation,
        )
        if not _record(runtime, attempt, checkpoint):
            # The step is no longer ours (cancelled, or re-queued by the sweeper): stop paying for iterations. The
            # finish that follows is refused as stale.
            log.info("%s: stale after iteration %d; the loop stops", attempt, iteration)
            return output
        if loop_ended(checkpoint, repeat):
            return loop_result(step, repeat, checkpoint)
        previous = output


def _record(runtime: Runtime, attempt: Attempt, checkpoint: IterationCheckpoint) -> bool:
    # Repeating the script after a lost reply is safe: the same checkpoint again, under the same guard (told twice).
    return retry_through_outage(
        Doing(attempt, f"checkpoint iteration {checkpoint.iteration}"),
        lambda: runtime.store.record_iteration(attempt, checkpoint),
        patience_s=runtime.settings.outage_patience_s,
    )


def continued_from(
    checkpoint: IterationCheckpoint | None, repeat: RepeatSpec, *, key: str, generation: str, force: bool
) -> IterationCheckpoint | None:
    """The checkpoint a new attempt continues after, or ``None`` to start the loop afresh.

    A checkpoint counts when it was made under the same result key (same definition, inputs and upstream outputs)
    and either in this generation (a retry, a lost worker), or in an earlier one that left the loop unfinished (a
    resumed failed run) and the resume did not name this step with ``--from``.
    """
    if checkpoint is None or checkpoint.key != key or checkpoint.iteration > repeat.max_iterations:
        return None
    if checkpoint.generation == generation:
        return checkpoint
    if force or loop_ended(checkpoint, repeat):
        return None
    return checkpoint


def loop_ended(checkpoint: IterationCheckpoint, repeat: RepeatSpec) -> bool:
    """Whether no iteration follows this one: ``until`` held, or it was the last allowed."""
    return checkpoint.until_met or checkpoint.iteration >= repeat.max_iterations


def loop_result(step: StepSpec, repeat: RepeatSpec, last: IterationCheckpoint) -> Any:
    """The output of a loop that ended at ``last``.

    Raises:
        NonRetryableStepError: ``max_iterations`` when ``until`` never held and ``on_exhausted`` is ``fail``.
    """
    if last.until_met or repeat.on_exhausted == "succeed":
        return last.output
    until = repeat.until if repeat.until is not None else repeat.until_function
    raise NonRetryableStepError(
        f"step {step.name!r}: until {until!r} still false after {last.iteration} iterations (max_iterations)",
        kind="max_iterations",
    )
