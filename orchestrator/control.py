"""Run control: cancel, time out and resume. Shared by the client, the CLI, the API and the sweeper."""

from __future__ import annotations

from celery import Celery

from orchestrator.coordinator import plan_resume
from orchestrator.dispatch import dispatch
from orchestrator.errors import RunStateError
from orchestrator.settings import Settings
from orchestrator.state.base import RunStatus, StateStore, Stop

DEADLINE_REASON = "the workflow deadline passed"


def stop_run(
    app: Celery, store: StateStore, run_id: str, status: RunStatus, reason: str, *, generation: str = ""
) -> Stop:
    """Cancel or time out a run: no step starts after this returns, running ones are interrupted.

    Prefork workers interrupt a running step at once (revoke with terminate); on thread and gevent pools the step's
    own transitions are refused from now on, so its result is discarded and nothing after it starts.

    Raises:
        RunNotFoundError: No such run.
    """
    fields = store.run_fields(run_id)
    spec = store.load_definition(fields["def_hash"])
    result = store.stop(run_id, status, reason, tuple(s.name for s in spec.steps), generation)
    if result.outcome == "ok":
        store.announce(run_id, f"run_{status.value}", spec.name)
    task_ids = [task for _, task in result.interrupted if task]
    if task_ids:
        app.control.revoke(task_ids, terminate=True, signal="SIGTERM")
    return result


def resume_run(app: Celery, settings: Settings, store: StateStore, run_id: str, *, from_step: str | None = None) -> str:
    """Start the run's next generation from its checkpoint and dispatch what can run now.

    Returns:
        The new generation.

    Raises:
        RunNotFoundError: No such run.
        RunStateError: The run is still going, succeeded with nothing to re-run, or another resume won.
        WorkflowDefinitionError: ``from_step`` is not a step of the workflow.
    """
    fields = store.run_fields(run_id)
    spec = store.load_definition(fields["def_hash"])
    status = fields["status"]
    if status in {RunStatus.RUNNING.value, RunStatus.PENDING.value, RunStatus.WAITING.value}:
        raise RunStateError(f"run {run_id} is {status}: cancel it or wait for it to end before resuming", status=status)
    if status == RunStatus.SUCCEEDED.value and from_step is None:
        raise RunStateError(
            f"run {run_id} succeeded: nothing to resume (use --from STEP to re-run a step and its dependents)",
            status=status,
        )
    statuses = {s.name: fields.get(f"s:{s.name}:status", "") for s in spec.steps}
    plan = plan_resume(spec, statuses, fields["gen"], from_step)
    outcome, value = store.resume(run_id, plan)
    if outcome == "conflict":
        raise RunStateError(f"run {run_id} was resumed by someone else meanwhile (generation {value})", status=status)
    if outcome != "ok":
        raise RunStateError(f"run {run_id} cannot be resumed from {value}", status=value)
    dispatch(app, settings, spec, run_id=run_id, steps=plan.queued, generation=value)
    store.announce(run_id, "run_resumed", spec.name)
    return value
