"""Map steps (``for_each``): a step that runs once per item of a list computed when its parents are done.

The step's own attempt computes the list (:func:`map_items`), expands the step into items in the state store and
publishes the first of them (:func:`start_map`), each its own message of the step task with an item index: its own
claim, lease, retries, timeout, cost and events (:mod:`orchestrator.engine.items`). At most ``max_parallel`` items
are queued or running; a finishing item's script queues the next pending ones and its worker publishes them, so no
process polls. The worker finishing the last item finishes the step (:func:`finish_map`): the ordered list of item
outputs, or a failure naming the items that did not succeed. Nothing here knows Celery.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.definition.conditions import evaluate_value
from orchestrator.definition.spec import StepKind, StepSpec, WorkflowSpec
from orchestrator.domain import Attempt, Claim, StepOutcome
from orchestrator.engine.control import record_outcome
from orchestrator.engine.coordinator import result_key
from orchestrator.engine.outage import Doing, retry_through_outage
from orchestrator.engine.publisher import StepPublisher
from orchestrator.engine.runtime import Runtime
from orchestrator.engine.steps import StepContext
from orchestrator.errors import ErrorRecord, NonRetryableStepError
from orchestrator.infra.digests import sha256
from orchestrator.infra.settings import Settings
from orchestrator.state.base import StateStore
from orchestrator.state.owed import OwedWrites

log = logging.getLogger(__name__)

_COMPACT = (",", ":")

PUBLISH_CHUNK = 500
"""The most item messages one group sends: a long map is published a group at a time (see :func:`publish_items`)."""
FIRST_PUBLISH_CHUNK = 100
"""The first group's size, before the broker's pace is known."""


class Parts(Protocol):
    """What finishing an item needs of a process: a :class:`Runtime` has it, and so has a child run's end."""

    @property
    def store(self) -> StateStore: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def publisher(self) -> StepPublisher: ...


@dataclass(frozen=True)
class RecordParts:
    """What :func:`record_item` needs, outside a worker's runtime (a child run's end, a human decision)."""

    publisher: StepPublisher
    settings: Settings
    store: StateStore


def map_items(runtime: Runtime, step: StepSpec, ctx: StepContext) -> list[Any]:
    """The list a map step runs over: its ``for_each`` expression or function, checked.

    Raises:
        NonRetryableStepError: ``invalid_items`` when it is not a list, is longer than ``ORCH_MAP_MAX_ITEMS`` or
            holds a value that is not JSON; ``condition_error``/``template_limit`` when the expression fails.
    """
    if step.for_each is not None:
        timeout = runtime.executor.template_timeout_s
        items = evaluate_value(
            step.for_each,
            inputs=dict(ctx.inputs),
            outputs=dict(ctx.outputs),
            timeout_s=min(timeout, step.timeout_s) if step.timeout_s else timeout,
            what="for_each",
        )
    else:
        assert step.for_each_function is not None, f"step {step.name!r} is not a map step"
        try:
            items = runtime.executor.functions.get(step.for_each_function)(ctx)
        except Exception as exc:
            raise NonRetryableStepError(
                f"step {step.name!r}: for_each {step.for_each_function!r} raised {type(exc).__name__}: {exc}",
                kind="condition_error",
            ) from None
    if isinstance(items, tuple):
        items = list(items)
    if not isinstance(items, list):
        raise NonRetryableStepError(
            f"step {step.name!r}: for_each gave {type(items).__name__}, not a list", kind="invalid_items"
        )
    limit = runtime.settings.map_max_items
    if len(items) > limit:
        raise NonRetryableStepError(
            f"step {step.name!r}: for_each gave {len(items)} items; the limit is {limit} (ORCH_MAP_MAX_ITEMS)",
            kind="invalid_items",
        )
    return items


def start_map(runtime: Runtime, spec: WorkflowSpec, attempt: Attempt, claim: Claim, items: list[Any]) -> str:
    """Expand a claimed map step into ``items`` and publish the first of them; returns what happened.

    An item keeps an earlier generation's success when its result key matches (same step definition, inputs,
    upstream outputs and item), so a resume re-runs only the rest. Expanding again in the same generation (a
    redelivered step message, or one the sweeper sent because the last item's worker died before finishing the
    step) publishes nothing new and finishes the step when every item has ended.

    Raises:
        NonRetryableStepError: ``invalid_items`` when an item is not JSON.
    """
    step = spec.steps_by_name[attempt.step]
    try:
        texts = [json.dumps(item, separators=_COMPACT, allow_nan=False) for item in items]
    except (TypeError, ValueError) as exc:
        raise NonRetryableStepError(f"step {step.name!r}: an item is not JSON: {exc}", kind="invalid_items") from None
    # ``resume --from`` this step (force) re-runs every item; ``cache: false`` never keeps one.
    base = result_key(step, claim.inputs, claim.parent_output) if step.cache and not claim.force else ""
    keys = [sha256(f"{base}|{text}".encode()).hexdigest()[:32] if base else "" for text in texts]
    expanded = retry_through_outage(
        Doing(attempt, "expand"),
        lambda: runtime.store.expand_items(
            attempt, texts, keys, max_parallel=step.max_parallel or 0, grace_s=runtime.settings.queued_grace_s
        ),
        patience_s=runtime.settings.outage_patience_s,
    )
    if not expanded.recorded:
        return "stale attempt: not expanded"
    publish_items(runtime, spec, attempt, expanded.publish)
    if expanded.all_ended:
        return finish_map(runtime, spec, attempt)
    return f"mapped: {expanded.total} items, {len(expanded.publish)} queued"


def record_item(
    runtime: Parts,
    spec: WorkflowSpec,
    attempt: Attempt,
    outcome: StepOutcome,
    *,
    output: Any = None,
    error: ErrorRecord | None = None,
    owed: OwedWrites | None = None,
) -> tuple[bool, str]:
    """Record an item's outcome, publish the items it let start, and finish the step after its last item.

    What the item's attempt ``owed`` Redis (its LLM calls' closes) goes ahead of the record, in its round trip.

    Returns:
        Whether the outcome was recorded (``False``: a stale attempt), and what happened, for the worker log.
    """
    done = retry_through_outage(
        Doing(attempt, f"record {outcome.value}"),
        lambda: runtime.store.finish_item(
            attempt,
            outcome,
            output=output,
            error=error,
            grace_s=runtime.settings.queued_grace_s,
            may_refill=bool(spec.steps_by_name[attempt.step].max_parallel),
            owed=owed,
        ),
        patience_s=runtime.settings.outage_patience_s,
    )
    if not done.recorded:
        return False, "stale attempt: not recorded"
    publish_items(runtime, spec, attempt, done.publish)
    if done.all_ended:
        step_attempt = Attempt(attempt.run_id, attempt.step, attempt.generation, done.step_task)
        return True, f"item {outcome.value}; {finish_map(runtime, spec, step_attempt)}"
    return True, f"item {outcome.value}"


def publish_items(runtime: Parts, spec: WorkflowSpec, attempt: Attempt, items: Sequence[tuple[int, str]]) -> None:
    """Send the items a transition queued (held in the lease index already, so a lost publish is resent).

    A long list goes a group at a time, every message stamped with the time the first group's publish began (as one
    group's are: see :meth:`~orchestrator.engine.publisher.StepPublisher.publish_items`). Sending thousands of
    messages can outlast the grace the transition held the items for, so every half grace the items not sent yet are
    held for another grace (:meth:`~orchestrator.state.items.ItemStore.extend_item_holds`): the sweeper sends no copy
    of an item whose publish is still under way. A group is as large as the broker's pace lets it be sent in a
    quarter grace (``FIRST_PUBLISH_CHUNK`` first, ``PUBLISH_CHUNK`` at most), so the holds are renewed in time
    however slow the broker.
    """
    grace_s = runtime.settings.queued_grace_s
    sent_at = time.time()
    held_at = time.monotonic()
    start, size = 0, min(FIRST_PUBLISH_CHUNK, PUBLISH_CHUNK)
    while start < len(items):
        now = time.monotonic()
        if start and now - held_at >= grace_s / 2:
            rest = items[start:]
            retry_through_outage(
                Doing(attempt, f"hold {len(rest)} items"),
                functools.partial(runtime.store.extend_item_holds, attempt.run_id, attempt.step, rest, grace_s=grace_s),
                patience_s=runtime.settings.outage_patience_s,
            )
            held_at = now
        chunk = items[start : start + size]
        began = time.monotonic()
        retry_through_outage(
            Doing(attempt, f"publish {len(chunk)} items"),
            functools.partial(
                runtime.publisher.publish_items,
                spec,
                run_id=attempt.run_id,
                step=attempt.step,
                generation=attempt.generation,
                items=chunk,
                sent_at=sent_at,
            ),
            patience_s=runtime.settings.outage_patience_s,
        )
        start += len(chunk)
        took = time.monotonic() - began
        size = PUBLISH_CHUNK if took <= 0 else max(1, min(PUBLISH_CHUNK, int(len(chunk) * grace_s / 4 / took)))


def finish_map(runtime: Parts, spec: WorkflowSpec, step_attempt: Attempt) -> str:
    """Finish a map step whose items have all ended: the ordered outputs, or a failure naming the first item that
    did not succeed. ``step_attempt`` names the step's own task (the one that expanded it)."""
    run_id, step = step_attempt.run_id, step_attempt.step
    step_spec = spec.steps_by_name[step]
    outputs, unsuccessful = retry_through_outage(
        Doing(step_attempt, "read items"),
        lambda: runtime.store.item_outputs(run_id, step),
        patience_s=runtime.settings.outage_patience_s,
    )
    error: ErrorRecord | None = None
    outcome = StepOutcome.SUCCEEDED
    if unsuccessful:
        outcome = StepOutcome.FAILED
        index, status, first = unsuccessful[0]
        cause = f": {first.get('message', '')}" if first else ""
        error = {
            "type": "item_failed",
            "message": f"{len(unsuccessful)} of {len(outputs)} items did not succeed; item {index} {status}{cause}",
            "status": None,
            "retryable": False,
        }
    recorded = retry_through_outage(
        Doing(step_attempt, f"record {outcome.value}"),
        lambda: record_outcome(
            runtime.publisher,
            runtime.settings,
            runtime.store,
            spec,
            step_attempt,
            outcome=outcome,
            # An approval map step's output is its decisions, a rejection's included.
            output=outputs if outcome == StepOutcome.SUCCEEDED or step_spec.uses == StepKind.APPROVAL else None,
            error=error,
        ),
        patience_s=runtime.settings.outage_patience_s,
    )
    return f"map {outcome.value}" if recorded else "stale map step: not recorded"
