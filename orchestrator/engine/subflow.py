"""Child runs (``uses: workflow``): start one per step execution, wait without a worker, finish with its outcome.

A ``workflow`` step's attempt renders the child's inputs, starts the child run (:func:`start_child`, idempotent:
the child's idempotency key is the parent run, step, item index and generation, so a redelivered attempt finds the
child its predecessor created), parks the step as ``waiting`` with the child's id and ends, holding no worker slot.
Whatever process ends the child (a worker finishing its last step, the sweeper's deadline, a cancel) calls
:func:`child_ended`, which counts the child's LLM spend into the parent and, when the parent's step still waits for
this child in the generation that started it, finishes the step with the child's outcome: its step outputs by name,
or an error naming the child run. The attempt checks the child once more after parking, so a child that ended
before the step waited is not missed; the store lets only one of the two take the step over.

Limits reach down: a child's deadline is at most its parent's, its LLM spend at most what the parent had left when it
started (then added to the parent's ``cost`` when it ends); cancelling or timing out the parent stops its children;
resuming the parent resumes a failed child under the same run id.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from orchestrator.definition.agent import AgentParams
from orchestrator.definition.inputs import validate_inputs
from orchestrator.definition.registry import workflows
from orchestrator.definition.spec import StepSpec, WorkflowSpec
from orchestrator.definition.subflow import WorkflowLookup, WorkflowParams, child_spec, render_inputs
from orchestrator.domain import Attempt, ChildTotals, Claim, ParentLink, RunStatus, StepOutcome
from orchestrator.engine.control import DEADLINE_REASON, record_outcome, resume_run, stop_run
from orchestrator.engine.mapping import RecordParts, record_item
from orchestrator.engine.publisher import StepPublisher
from orchestrator.engine.runtime import Runtime
from orchestrator.engine.status import run_view
from orchestrator.engine.steps import StepContext
from orchestrator.errors import (
    DeferralRecord,
    ErrorRecord,
    InputValidationError,
    NonRetryableStepError,
    RunNotFoundError,
    RunStateError,
    UnknownWorkflowError,
    WorkflowDefinitionError,
)
from orchestrator.infra.ids import new_id
from orchestrator.infra.settings import Settings
from orchestrator.llm.governor import to_nano_usd
from orchestrator.state import keys
from orchestrator.state.base import StateStore

log = logging.getLogger(__name__)

_ENDED = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMED_OUT})
_RESUMABLE = frozenset({RunStatus.FAILED.value, RunStatus.CANCELLED.value, RunStatus.TIMED_OUT.value})


def find_workflow(store: StateStore, name: str, version: int | None = None) -> WorkflowSpec:
    """A workflow by name: registered in this process, else submitted earlier as a file (the newest version, or
    ``version``; of equal versions the latest submitted).

    Raises:
        UnknownWorkflowError: Neither knows it.
    """
    try:
        return workflows.get(name, version)
    except UnknownWorkflowError:
        pass
    found = [d for d in store.submitted_definitions() if d["name"] == name and version in (None, d["version"])]
    if not found:
        raise UnknownWorkflowError(name, version)
    # Most recent first already: the highest version wins, and of one version the latest submitted.
    best = max(found, key=lambda d: d["version"])
    return store.load_definition(best["definition_hash"])


def workflow_lookup(store: StateStore) -> WorkflowLookup:
    """:func:`find_workflow` on ``store``, for :func:`~orchestrator.definition.subflow.check_subflows`."""
    return lambda name, version: find_workflow(store, name, version)


def child_key(parent_run: str, step: str, index: int | None, generation: str) -> str:
    """The idempotency key of the child a parent step's execution starts."""
    return f"child:{parent_run}:{step}:{'-' if index is None else index}:{generation}"


def start_child(
    runtime: Runtime,
    parent_run: str,
    step: str,
    index: int | None,
    *,
    ref: WorkflowSpec | str,
    inputs: dict[str, Any],
    version: int | None = None,
    generation: str | None = None,
) -> str:
    """Start (or find) the child run of a parent step's execution; returns its id. Idempotent.

    Args:
        runtime: The process's store, publisher and settings.
        parent_run: The parent run's id.
        step: The parent's step.
        index: The map item's index, or ``None``.
        ref: The child's workflow: a spec, or a name (registered, or submitted as a file).
        inputs: The child's inputs (rendered already).
        version: With a name: its version (default the latest).
        generation: The parent's generation (default its current one); part of the idempotency key.

    Raises:
        NonRetryableStepError: ``unknown_workflow``, ``invalid_child_inputs``, or ``subflow_depth`` past
            ``ORCH_MAX_SUBFLOW_DEPTH``.
        RunNotFoundError: No such parent run.
    """
    store, settings = runtime.store, runtime.settings
    parent = store.run_fields(parent_run)
    gen = generation or parent["gen"]
    try:
        spec = ref if isinstance(ref, WorkflowSpec) else find_workflow(store, ref, version)
    except WorkflowDefinitionError as exc:
        raise NonRetryableStepError(f"step {step!r}: {exc}", kind="unknown_workflow") from None
    depth = int(parent.get("depth") or 1) + 1
    if depth > settings.max_subflow_depth:
        raise NonRetryableStepError(
            f"step {step!r}: a child of {spec.name!r} would nest {depth} runs deep; the limit is "
            f"{settings.max_subflow_depth} (ORCH_MAX_SUBFLOW_DEPTH)",
            kind="subflow_depth",
        )
    try:
        filled = validate_inputs(spec, inputs, max_bytes=settings.max_input_bytes)
    except InputValidationError as exc:
        raise NonRetryableStepError(
            f"step {step!r}: inputs of workflow {spec.name!r}: {exc}", kind="invalid_child_inputs"
        ) from None
    key = child_key(parent_run, step, index, gen)
    # A redelivered attempt gets the id its predecessor reserved, and creates the run if that one died before.
    child = store.reserve_idempotency_key(key, uuid.uuid4().hex)
    store.save_definition(spec)
    held = {name: new_id() for name in spec.start_steps}
    store.hold_dispatch(child, held, settings.queued_grace_s)
    created = store.create_run(child, spec, filled, key)
    link = ParentLink(parent_run, step, index, gen, depth)
    store.link_parent(child, link, budget_cap_nusd=_budget_left(store, parent))
    _cap_deadline(store, child, parent)
    if stop_orphan(runtime, parent_run, child):
        return child  # the parent was cancelled (or timed out) meanwhile: its stop may not have seen this child
    if created:
        runtime.publisher.publish(spec, run_id=child, steps=spec.start_steps, generation="1", task_ids=held)
        store.announce(child, "run_started", spec.name)
        log.info("run %s step %s started child run %s (%s)", parent_run, step, child, spec.name)
    return child


def run_workflow_step(runtime: Runtime, step: StepSpec, attempt: Attempt, ctx: StepContext, claim: Claim) -> str:
    """The attempt of a ``workflow`` step: start or find its child, park the step waiting for it, and end.

    A child recorded on the step by an earlier generation is continued rather than replaced (unless ``resume
    --from`` named this step): resumed when it failed, was cancelled or timed out; waited for when it runs; its
    outcome taken when it succeeded.

    Raises:
        NonRetryableStepError: The child's workflow is unknown, its inputs do not render or fit its schema, or runs
            would nest too deep.
    """
    fields = runtime.store.run_fields(attempt.run_id)
    child = fields.get(keys.step_field(step.name, "child_run_id")) or None
    return park_on_child(runtime, step, attempt, ctx, fields, child=None if claim.force else child, index=None)


def park_on_child(
    runtime: Runtime,
    step: StepSpec,
    attempt: Attempt,
    ctx: StepContext,
    fields: dict[str, str],
    *,
    child: str | None,
    index: int | None,
) -> str:
    """Continue ``child`` (resumed when it failed, was cancelled or timed out), or start a new one rendered from
    ``ctx`` when ``None`` or gone; park the step (or the item, for an item's ``attempt``) waiting for it. ``index``:
    the item's index, or a repeated step's iteration (the child's ``parent.index``, part of its idempotency key),
    else ``None``. ``fields``: the parent run's."""
    params = step.params
    assert isinstance(params, WorkflowParams), f"step {step.name!r} is not a workflow step"
    store = runtime.store
    status = _status_of(store, child) if child is not None else None
    if child is None or status is None:
        try:
            target = child_spec(params, workflow_lookup(store), step=step.name)
        except WorkflowDefinitionError as exc:
            raise NonRetryableStepError(str(exc), kind="unknown_workflow") from None
        inputs = render_inputs(params.inputs, ctx.template_context(), timeout_s=runtime.settings.template_timeout_s)
        child = start_child(
            runtime, attempt.run_id, step.name, index, ref=target, inputs=inputs, generation=attempt.generation
        )
    else:
        # Continued in this generation: its end must complete this generation's step.
        depth = int(fields.get("depth") or 1) + 1
        link = ParentLink(attempt.run_id, step.name, index, attempt.generation, depth)
        store.link_parent(child, link, budget_cap_nusd=_budget_left(store, fields))
    item = attempt.index is not None
    if not (store.wait_item_child(attempt, child) if item else store.wait_for_child(attempt, child)):
        # A cancel that landed between the start and the park did not see the child: stop it here.
        stop_orphan(runtime, attempt.run_id, child)
        return "stale attempt: not parked"
    if status in _RESUMABLE:
        _resume_child(runtime, child, fields)
    # The child may have ended before the step waited (or it had already): take its outcome now. The store lets
    # only one caller take the step over, so the child's own end racing this is harmless.
    child_ended(runtime.publisher, runtime.settings, store, child)
    return f"{'item ' if item else ''}waiting for child run {child}"


def stop_orphan(runtime: Runtime, parent_run: str, child: str) -> bool:
    """Stop ``child`` the way its parent stopped when the parent is no longer running (cancelled or timed out while
    the child was being started or parked); returns whether it did. A parent still running keeps the child (a stale
    park there is a re-queued attempt, which finds the child again)."""
    status = runtime.store.run_fields(parent_run).get("status")
    if status not in (RunStatus.CANCELLED.value, RunStatus.TIMED_OUT.value):
        return False
    reason = f"parent run {parent_run} was {status.replace('_', ' ')}"
    try:
        stop_run(runtime.publisher, runtime.store, child, RunStatus(status), reason, settings=runtime.settings)
    except RunNotFoundError:
        return False
    log.info("child run %s stopped: %s", child, reason)
    return True


def run_workflow_item(runtime: Runtime, step: StepSpec, attempt: Attempt, ctx: StepContext) -> str:
    """The attempt of one item of a ``workflow`` map step: start or find its child (idempotent per parent run, step,
    item index and generation), park the item waiting for it, and end.

    After a resume, the child an earlier generation's item started and that did not succeed is continued (resumed
    when it failed, was cancelled or timed out) rather than replaced, unless ``resume --from`` named the step.

    Raises:
        NonRetryableStepError: As :func:`run_workflow_step`.
    """
    fields = runtime.store.run_fields(attempt.run_id)
    child = _earlier_child(runtime.store, attempt, fields)
    return park_on_child(runtime, step, attempt, ctx, fields, child=child, index=attempt.index)


def _earlier_child(store: StateStore, attempt: Attempt, fields: dict[str, str]) -> str | None:
    """The child an item's earlier generation started and that did not succeed (``None``: start a new one)."""
    assert attempt.index is not None, "an item's attempt"
    if fields.get(keys.step_field(attempt.step, "force")) == "1":
        return None
    records = store.item_records(attempt.run_id, attempt.step, offset=attempt.index, limit=1)
    child = records[0].get("child_run_id") if records else None
    status = _status_of(store, child) if child else None
    return child if status is not None and status != RunStatus.SUCCEEDED.value else None


def child_ended(
    publisher: StepPublisher,
    settings: Settings | None,
    store: StateStore,
    child_run_id: str,
    *,
    child: bool = False,
) -> None:
    """Hand an ended child's outcome to its parent step (nothing for a run that is no child, or still going).

    Called wherever a run ends; safe to call twice: the spend counts once and the step is finished once. ``child``:
    the caller knows the run has a parent (a finish answers it), so it is not asked again.
    """
    settings = settings or Settings()
    if not child and store.run_parent(child_run_id) is None:
        return  # no child run: the common case costs one field, not the whole ended run
    try:
        fields = store.run_fields(child_run_id)
    except RunNotFoundError:
        return
    if not fields.get("parent_run") or RunStatus(fields.get("status") or "pending") not in _ENDED:
        return
    raw_index = fields.get("parent_index") or ""
    link = ParentLink(
        fields["parent_run"],
        fields["parent_step"],
        int(raw_index) if raw_index else None,
        fields.get("parent_gen", ""),
        int(fields.get("depth") or 2),
    )
    totals = ChildTotals(*(int(fields.get(name) or 0) for name in _TOTALS))
    view_status = RunStatus(fields["status"])
    token = f"child-{uuid.uuid4().hex}"
    try:
        parent = store.run_fields(link.run_id)
    except RunNotFoundError:
        return
    parent_spec = store.load_definition(parent["def_hash"])
    parent_step = parent_spec.steps_by_name.get(link.step)
    # An index means a map item's child, unless the step is an agent (its workflow:NAME calls carry an index too) or
    # repeats (the index is the iteration).
    tool = parent_step is not None and isinstance(parent_step.params, AgentParams)
    repeated = parent_step is not None and parent_step.repeat is not None
    if link.index is not None and not tool and not repeated:
        if store.child_item_ended(link, child_run_id, totals, task_id=token, lease_s=settings.lease_s):
            parts = RecordParts(publisher, settings, store)
            _finish_item(parts, parent_spec, link, token, child=(child_run_id, fields))
        return
    # An agent's workflow:NAME call: its spend counts, but the agent's attempt (running) takes the outcome itself.
    if not store.child_ended(link, child_run_id, totals, task_id=token, lease_s=settings.lease_s, tool=tool):
        return
    if _parent_timed_out(publisher, store, link, view_status):
        return
    attempt = Attempt(link.run_id, link.step, link.generation, token)
    if repeated and view_status == RunStatus.SUCCEEDED:
        # A worker checkpoints the iteration, tests ``until`` and starts the next child: the step goes back to its
        # queue (the attempt given back, as for a deferral), lease-indexed so a lost message is sent again.
        message = f"child run {child_run_id} ended iteration {link.index}"
        deferral: DeferralRecord = {"reason": "next_iteration", "model": "", "message": message}
        if store.defer(attempt, deferral, countdown_s=0.0, grace_s=settings.queued_grace_s):
            task_ids = {link.step: token}
            publisher.publish(
                parent_spec, run_id=link.run_id, steps=(link.step,), generation=link.generation, task_ids=task_ids
            )
        return
    outcome, output, error = child_outcome(store, child_run_id, fields)
    record_outcome(publisher, settings, store, parent_spec, attempt, outcome=outcome, output=output, error=error)


def _parent_timed_out(publisher: StepPublisher, store: StateStore, link: ParentLink, status: RunStatus) -> bool:
    """When the parent's own deadline timed the child out, the parent times out too, rather than fail the step."""
    parent = store.run_fields(link.run_id)
    if status != RunStatus.TIMED_OUT or not parent.get("deadline") or float(parent["deadline"]) > time.time():
        return False
    stop_run(publisher, store, link.run_id, RunStatus.TIMED_OUT, DEADLINE_REASON, generation=link.generation)
    return True


def _finish_item(
    parts: RecordParts, spec: WorkflowSpec, link: ParentLink, token: str, *, child: tuple[str, dict[str, str]]
) -> None:
    """Finish a taken-over item with its child's outcome (``child``: its id and fields), then refill and, after the
    last item, finish the step."""
    child_run_id, fields = child
    if _parent_timed_out(parts.publisher, parts.store, link, RunStatus(fields["status"])):
        return
    outcome, output, error = child_outcome(parts.store, child_run_id, fields)
    attempt = Attempt(link.run_id, link.step, link.generation, token, link.index)
    _, what = record_item(parts, spec, attempt, outcome, output=output, error=error)
    log.info("run %s step %s item %s: child run %s ended: %s", link.run_id, link.step, link.index, child_run_id, what)


def child_outcome(
    store: StateStore, child_run_id: str, fields: dict[str, str]
) -> tuple[StepOutcome, dict[str, Any] | None, ErrorRecord | None]:
    """An ended child's outcome as its parent's: its step outputs by name, or an error naming it."""
    view = run_view(fields, store.load_definition(fields["def_hash"]))
    if view["status"] == RunStatus.SUCCEEDED:
        return StepOutcome.SUCCEEDED, {name: step["output"] for name, step in view["steps"].items()}, None
    error: ErrorRecord = {
        "type": f"child_{view['status'].value}",
        "status": None,
        "message": f"child run {child_run_id} ({view['workflow']}) {view['status'].value}: {view['error']}",
        "retryable": False,
        "child_run_id": child_run_id,
    }
    return StepOutcome.FAILED, None, error


def stop_children(
    publisher: StepPublisher,
    settings: Settings | None,
    store: StateStore,
    fields: dict[str, str],
    status: RunStatus,
    *,
    items: Sequence[str] = (),
) -> None:
    """Stop the children a stopped run was waiting for (``fields``: the run as it was before it stopped; ``items``:
    the children its map items were waiting for)."""
    waited = list(items)
    for name, value in fields.items():
        if not name.endswith(":child_run_id") or not value:
            continue
        if fields.get(name.removesuffix("child_run_id") + "status") in ("waiting", "running"):
            waited.append(value)
    reason = f"parent run {fields['run_id']} was {status.value.replace('_', ' ')}"
    for child in waited:
        try:
            stop_run(publisher, store, child, status, reason, settings=settings)
        except RunNotFoundError:
            continue


_TOTALS = ("llm_spent_nusd", "llm_calls", "llm_input_tokens", "llm_output_tokens")


def _status_of(store: StateStore, run_id: str) -> str | None:
    rows = store.run_summaries([run_id])
    return rows[0]["status"] if rows else None


def _resume_child(runtime: Runtime, child: str, parent: dict[str, str]) -> None:
    try:
        resume_run(runtime.publisher, runtime.settings, runtime.store, child, allow_definition_change=True)
    except RunStateError as exc:
        # Resumed meanwhile by someone else, or running again: its end completes the step all the same.
        log.info("child run %s not resumed: %s", child, exc)
        return
    _cap_deadline(runtime.store, child, parent)


def _budget_left(store: StateStore, parent: dict[str, str]) -> int | None:
    """What the parent may still spend, in nano-dollars (``None``: no limit)."""
    limits = []
    budget = store.load_definition(parent["def_hash"]).budget_usd
    if budget is not None:
        limits.append(to_nano_usd(budget))
    if parent.get("budget_cap_nusd"):
        limits.append(int(parent["budget_cap_nusd"]))
    if not limits:
        return None
    return min(limits) - int(parent.get("llm_spent_nusd") or 0) - int(parent.get("llm_held_nusd") or 0)


def _cap_deadline(store: StateStore, child: str, parent: dict[str, str]) -> None:
    """Bring the child's deadline forward to its parent's, when the parent's comes first."""
    if not parent.get("deadline"):
        return
    at = float(parent["deadline"])
    fields = store.run_fields(child)
    own = fields.get("deadline")
    if own and float(own) <= at:
        return
    store.add_deadline(child, fields.get("gen") or "1", at)
