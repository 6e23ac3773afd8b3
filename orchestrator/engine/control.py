"""Run control: cancel, time out and resume. Shared by the client, the CLI, the API and the sweeper."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from orchestrator.definition.mapping import is_map
from orchestrator.definition.registry import workflows
from orchestrator.definition.spec import ApprovalParams, StepKind, WorkflowSpec
from orchestrator.domain import (
    MAX_DECISION_COMMENT_CHARS,
    Attempt,
    Decision,
    DecisionOutcome,
    ResumeOutcome,
    RunStatus,
    StepOutcome,
    StopOutcome,
    StopResult,
)
from orchestrator.engine.coordinator import failure_summary, plan_resume
from orchestrator.engine.local import Continuation
from orchestrator.engine.publisher import StepPublisher
from orchestrator.engine.triggers import release_rules
from orchestrator.errors import (
    DecisionRefusedError,
    ErrorRecord,
    InputValidationError,
    RunNotFoundError,
    RunStateError,
    UnknownWorkflowError,
    WorkflowDefinitionError,
)
from orchestrator.infra.settings import Settings
from orchestrator.principals import TIMEOUT_PRINCIPAL, reserved_message
from orchestrator.state import keys
from orchestrator.state.base import StateStore, releasable
from orchestrator.state.owed import OwedWrites
from orchestrator.telemetry import tracing

DEADLINE_REASON = "the workflow deadline passed"
log = logging.getLogger(__name__)


def record_outcome(
    publisher: StepPublisher,
    settings: Settings,
    store: StateStore,
    spec: WorkflowSpec,
    attempt: Attempt,
    *,
    outcome: StepOutcome,
    output: Any = None,
    error: ErrorRecord | None = None,
    cache_key: str = "",
    cached: bool = False,
    local: Continuation | None = None,
    owed: OwedWrites | None = None,
) -> bool:
    """Record a step attempt's final outcome, dispatch the children it released, interrupt the parents a
    ``cancel_others`` child cancelled; at the run's end (announced by the finish itself), tell a parent run.

    With ``local``, released children this worker may run are kept there instead of published: one for this slot,
    and on a threads pool more for its other threads (see :mod:`orchestrator.engine.local`). What the attempt
    ``owed`` Redis (its LLM calls' closes) goes ahead of the finish, in its round trip.

    Returns:
        ``False`` when the attempt was stale and nothing was recorded.
    """
    children = spec.graph.children[attempt.step]
    rules = release_rules(spec, attempt.step)
    # The finish claims the child this slot keeps in the same transition (one round trip for a local hop).
    keep = local.request(spec, attempt, releasable(children, rules), settings.lease_s) if local is not None else None
    result = store.finish(
        attempt,
        outcome,
        output=output,
        error=error,
        children=children,
        cache_key=cache_key,
        cached=cached,
        grace_s=settings.queued_grace_s,
        rules=rules,
        keep=keep,
        owed=owed,
        # The kept children's first LLM calls, opened after the script that claims them (orchestrator.llm.preopen).
        then=local.following() if local is not None else (),
    )
    if not result.recorded:
        return False
    if outcome == StepOutcome.FAILED:
        log.error("%s: %s", attempt.run_id, failure_summary(attempt.step, error))
    released = tuple(step for step in result.released if step not in result.kept_claims)
    publisher.publish(
        spec, run_id=attempt.run_id, steps=released, generation=attempt.generation, task_ids=result.task_ids
    )
    if local is not None:
        local.take(result)
        if result.kept is not None:
            # Its trace parent is this attempt, as its message's would have been.
            local.headers = tracing.dispatch_headers(attempt.run_id)
    if result.cancelled:
        # Parents a cancel_others step overtook: interrupted as a run cancel interrupts its steps. A queued one
        # finds itself cancelled when claimed and never starts.
        log.info("%s: cancelled %s", attempt.run_id, ", ".join(step for step, _ in result.cancelled))
        publisher.revoke([task for _, task in result.cancelled if task])
    if result.run_status is not None:
        log.info("run %s %s", attempt.run_id, result.run_status)
        trace_run_end(store, attempt.run_id)
        if result.parent_run is not None:
            _tell_parent(publisher, settings, store, attempt.run_id)
    return True


def _tell_parent(publisher: StepPublisher, settings: Settings, store: StateStore, run_id: str) -> None:
    """A child run (``uses: workflow``) ended: its parent's step takes its outcome."""
    from orchestrator.engine import subflow  # it builds on this module (record_outcome, resume_run)

    subflow.child_ended(publisher, settings, store, run_id, child=True)


def trace_run_end(store: StateStore, run_id: str) -> None:
    """Record the ended run's root span when this process traces (one more read of the run); never raises."""
    if not tracing.enabled():
        return
    try:
        fields = store.run_fields(run_id)
    except Exception as exc:
        log.warning("tracing: run %s ended but could not be read for its root span: %s", run_id, exc)
        return
    tracing.run_ended(run_id, fields)


def _deployed(pinned: WorkflowSpec) -> WorkflowSpec | None:
    """The workflow registered here under the pinned name and version, when its definition differs."""
    try:
        current = workflows.get(pinned.name, pinned.version)
    except UnknownWorkflowError:
        return None  # submitted as a file, or not deployed here: the stored definition is the only one
    return current if current.definition_hash != pinned.definition_hash else None


_HUMAN_DECISIONS = frozenset({"approve", "reject"})
_TIMEOUT_DECISIONS = frozenset({"timeout:approve", "timeout:reject", "timeout:fail"})


def decide_step(
    publisher: StepPublisher,
    settings: Settings,
    store: StateStore,
    run_id: str,
    step: str,
    *,
    decision: str,
    by: str,
    comment: str = "",
    timed_out: bool = False,
    generation: str = "",
    item: int | None = None,
) -> dict[str, Any]:
    """Approve or reject a waiting approval step as ``by``; the first allowed decision wins.

    An approval map step (``for_each``) takes one decision per item: ``item`` names it (required there, refused
    elsewhere); the item then finishes with the decision, and the step's output is the ordered list of them.

    ``decision`` is ``approve`` or ``reject`` by one of the step's approvers. Only the sweeper passes
    ``timed_out=True``, with what the timeout decides (``timeout:approve``, ``timeout:reject``, ``timeout:fail``) and
    ``by="timeout"`` for the audit trail: the flag allows that decision, a name never does, so ``by="timeout"``
    without it is refused like any stranger. Every attempt is audited, allowed or not, while the run lasts.
    ``generation`` (a timeout's) must be the run's current one: a timer set before a resume decides nothing after it.

    Returns:
        The decision as recorded (the step's output).

    Raises:
        InputValidationError: ``comment`` is longer than ``MAX_DECISION_COMMENT_CHARS``, or ``item`` is missing on a
            map step or given on another; nothing is written.
        ValueError: ``decision`` does not fit ``timed_out`` (a ``timeout:`` decision needs the flag and vice versa).
        RunNotFoundError: No such run.
        DefinitionNotFoundError: The run's workflow definition is no longer stored.
        WorkflowDefinitionError: No such step, or it is not an approval step.
        DecisionRefusedError: ``by`` is not an approver (``reason="not_an_approver"``), or the step is not waiting
            (``reason="not_waiting"``: decided already, not reached yet, the run ended, or it is at another
            ``generation``).
    """
    if len(comment) > MAX_DECISION_COMMENT_CHARS:
        raise InputValidationError(
            f"the comment is {len(comment)} characters; the limit is {MAX_DECISION_COMMENT_CHARS}"
        )
    allowed_decisions = _TIMEOUT_DECISIONS if timed_out else _HUMAN_DECISIONS
    if decision not in allowed_decisions:
        raise ValueError(f"decision {decision!r} is not one of {', '.join(sorted(allowed_decisions))}")
    fields = store.run_fields(run_id)
    spec = store.load_definition(fields["def_hash"])
    step_spec = spec.steps_by_name.get(step)
    if step_spec is None:
        raise WorkflowDefinitionError(f"run {run_id} has no step {step!r}", step=step)
    if not isinstance(step_spec.params, ApprovalParams):
        raise DecisionRefusedError(
            f"step {step!r} is not waiting for a decision (it is a {step_spec.uses.value} step, not an approval)",
            reason="not_waiting",
        )
    if is_map(step_spec) != (item is not None):
        raise InputValidationError(
            f"step {step!r} is a map step: name the item to decide (item, --item)"
            if item is None
            else f"step {step!r} is not a map step: it has no item {item}"
        )
    # The timeout's audit name grants nothing by itself: a step listing "timeout" as an approver gains no backdoor.
    allowed = timed_out or (by != TIMEOUT_PRINCIPAL and by in step_spec.params.approvers)
    token = f"decision-{uuid.uuid4().hex}"
    ruling = Decision(decision, by, comment, allowed, token, generation=generation)
    result = store.decide(run_id, step, ruling) if item is None else store.decide_item(run_id, step, item, ruling)
    if item is not None:
        step = f"{step}[{item}]"  # what the refusals below name
    outcome = result.outcome
    if outcome == DecisionOutcome.MISSING:
        raise RunNotFoundError(run_id)
    if outcome == DecisionOutcome.STALE:
        raise DecisionRefusedError(
            f"step {step!r} is not waiting for a decision of generation {generation} (the run "
            f"is at generation {result.generation})",
            reason="not_waiting",
        )
    if outcome == DecisionOutcome.FORBIDDEN and by == TIMEOUT_PRINCIPAL:
        raise DecisionRefusedError(
            f"{by!r} may not decide step {step!r}: {reserved_message(by)}", reason="not_an_approver"
        )
    if outcome == DecisionOutcome.FORBIDDEN:
        raise DecisionRefusedError(
            f"{by!r} may not decide step {step!r}: approvers are {', '.join(step_spec.params.approvers)}",
            reason="not_an_approver",
        )
    if outcome != DecisionOutcome.OK:
        raise DecisionRefusedError(
            f"step {step!r} is not waiting for a decision (it is {result.detail})", reason="not_waiting"
        )
    verdict = decision.removeprefix("timeout:")
    record = {"approved": verdict == "approve", "decision": decision, "by": by, "comment": comment}
    error: ErrorRecord | None = None
    if verdict != "approve":
        kind = "approval_timeout" if verdict == "fail" else "rejected"
        message = "no decision before the approval timeout" if verdict == "fail" else f"rejected by {by}"
        error = {
            "type": kind,
            "status": None,
            "message": message + (f": {comment}" if comment else ""),
            "retryable": False,
        }
    outcome_ = StepOutcome.SUCCEEDED if error is None else StepOutcome.FAILED
    attempt = Attempt(run_id, step_spec.name, result.generation, token, item)
    if item is not None:
        from orchestrator.engine.mapping import RecordParts, record_item  # the map engine imports this module

        record_item(RecordParts(publisher, settings, store), spec, attempt, outcome_, output=record, error=error)
    else:
        record_outcome(publisher, settings, store, spec, attempt, outcome=outcome_, output=record, error=error)
    return record


def stop_run(
    publisher: StepPublisher,
    store: StateStore,
    run_id: str,
    status: RunStatus,
    reason: str,
    *,
    generation: str = "",
    settings: Settings | None = None,
) -> StopResult:
    """Cancel or time out a run: no step starts after this returns, running ones are interrupted.

    The child runs its ``workflow`` steps wait for are stopped the same way; when the run is itself a child, its
    parent's step fails naming it (``settings`` gives that step's lease and grace; default: the defaults).

    Prefork workers interrupt a running step at once (revoke with terminate); on thread and gevent pools the step's
    own transitions are refused from now on, so its result is discarded and nothing after it starts.

    Raises:
        RunNotFoundError: No such run.
        DefinitionNotFoundError: The run's workflow definition is no longer stored.
    """
    fields = store.run_fields(run_id)
    spec = store.load_definition(fields["def_hash"])
    result = store.stop(run_id, status, reason, tuple(s.name for s in spec.steps), generation)
    items: list[str] = []
    children: list[str] = []
    if result.outcome == StopOutcome.OK:
        # A map step's items stop with it: each unfinished one is cancelled, the running ones interrupted, the
        # children of waiting ones stopped.
        for step in (s for s in spec.steps if is_map(s)):
            if step.uses == StepKind.WORKFLOW:
                children += store.waiting_children(run_id, step.name)
            items += store.stop_items(run_id, step.name, generation or fields["gen"])
        store.announce(run_id, f"run_{status.value}", spec.name)
        trace_run_end(store, run_id)
    publisher.revoke([task for _, task in result.interrupted if task] + items)
    if result.outcome == StopOutcome.OK:
        from orchestrator.engine import subflow  # it builds on this module (record_outcome, resume_run)

        # A step that parked on its child after ``fields`` was read and before the stop: its child too.
        after = store.run_fields(run_id)
        late = (v for k, v in after.items() if k.endswith(":child_run_id") and v and fields.get(k) != v)
        children += sorted(set(late))
        subflow.stop_children(publisher, settings, store, fields, status, items=children)
        subflow.child_ended(publisher, settings, store, run_id)
    return result


def resume_run(
    publisher: StepPublisher,
    settings: Settings,
    store: StateStore,
    run_id: str,
    *,
    from_step: str | None = None,
    allow_definition_change: bool = False,
) -> str:
    """Start the run's next generation from its checkpoint and dispatch what can run now.

    A run is pinned to the definition it was submitted with. When the workflow registered here under the run's name
    and version has a different definition (code deployed without a version bump), the resume is refused unless
    ``allow_definition_change``: then the run moves to the new definition, steps whose own definition is unchanged
    keep their results, and the rest re-run.

    Returns:
        The new generation.

    Raises:
        RunNotFoundError: No such run.
        DefinitionNotFoundError: The run's workflow definition is no longer stored.
        RunStateError: The run is still going, succeeded with nothing to re-run, its definition changed (and that
            was not allowed), or another resume won.
        WorkflowDefinitionError: ``from_step`` is not a step of the workflow.
    """
    fields = store.run_fields(run_id)
    spec = store.load_definition(fields["def_hash"])
    status = fields["status"]
    if status in {RunStatus.RUNNING.value, RunStatus.PENDING.value, RunStatus.WAITING.value}:
        raise RunStateError(f"run {run_id} is {status}: cancel it or wait for it to end before resuming", status=status)
    deployed = _deployed(spec)
    changed: frozenset[str] = frozenset()
    if deployed is not None:
        if not allow_definition_change:
            raise RunStateError(
                f"run {run_id} is pinned to {spec.name} v{spec.version} as {spec.definition_hash[:12]}, but that "
                f"version is now {deployed.definition_hash[:12]} here: resume with --allow-definition-change to move "
                "it (steps whose definition is unchanged keep their results), or deploy the pinned code",
                status=status,
            )
        old = spec.steps_by_name
        changed = frozenset(
            s.name for s in deployed.steps if s.name not in old or old[s.name].definition_hash != s.definition_hash
        )
        spec = deployed
    if status == RunStatus.SUCCEEDED.value and from_step is None and not changed:
        raise RunStateError(
            f"run {run_id} succeeded: nothing to resume (use --from STEP to re-run a step and its dependents)",
            status=status,
        )
    statuses = {s.name: fields.get(keys.step_field(s.name, "status"), "") for s in spec.steps}
    plan = plan_resume(
        spec, statuses, fields["gen"], from_step, changed=changed, new_definition=spec if deployed is not None else None
    )
    held = {step: uuid.uuid4().hex for step in plan.queued}
    store.hold_dispatch(run_id, held, settings.queued_grace_s)
    resumed = store.resume(run_id, plan)
    if resumed.outcome == ResumeOutcome.CONFLICT:
        raise RunStateError(
            f"run {run_id} was resumed by someone else meanwhile (generation {resumed.generation})", status=status
        )
    if resumed.outcome != ResumeOutcome.OK:
        raise RunStateError(f"run {run_id} cannot be resumed from {resumed.detail}", status=resumed.detail)
    publisher.publish(spec, run_id=run_id, steps=plan.queued, generation=resumed.generation, task_ids=held)
    store.announce(run_id, "run_resumed", spec.name)
    return resumed.generation
