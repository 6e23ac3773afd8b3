"""Publishing step tasks as Celery canvas."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from celery import Celery, group
from celery.canvas import Signature

from orchestrator.definition.spec import StepKind, WorkflowSpec
from orchestrator.engine.coordinator import queue_for
from orchestrator.engine.priorities import message_priority, step_level
from orchestrator.infra.settings import Settings
from orchestrator.telemetry.tracing import dispatch_headers

STEP_TASK = "orchestrator.run_step"


def step_signature(
    app: Celery,
    settings: Settings,
    spec: WorkflowSpec,
    *,
    run_id: str,
    step: str,
    generation: str,
    task_id: str | None = None,
) -> Signature:
    """The immutable signature of one step attempt, routed by kind and named ``workflow.step`` for Flower.

    With ``ORCH_PRIORITIES=depth`` it carries the step's priority (:mod:`orchestrator.engine.priorities`), which Celery keeps
    on retries. Dispatched inside a traced span of the same run (a step attempt, the run's root), its headers carry
    that span as the W3C ``traceparent``.
    """
    step_spec = spec.steps_by_name[step]
    options: dict[str, object] = {
        "queue": queue_for(step_spec, settings.llm_queue, settings.cpu_queue),
        "shadow": f"{spec.name}.{step}",
    }
    if settings.priorities == "depth":
        options["priority"] = message_priority(step_level(spec, step), settings.effective_broker_url)
    if step_spec.timeout_s is not None and step_spec.uses != StepKind.LLM:
        # Prefork enforces these with signals; LLM calls get the timeout from the SDK instead, on any pool.
        options["soft_time_limit"] = step_spec.timeout_s
        options["time_limit"] = step_spec.timeout_s + 10
    if task_id is not None:
        options["task_id"] = task_id
    headers = dispatch_headers(run_id)
    if headers:
        options["headers"] = headers
    args = (run_id, spec.definition_hash, step, generation)
    return app.signature(STEP_TASK, args=args, options=options, immutable=True)


def dispatch(
    app: Celery,
    settings: Settings,
    spec: WorkflowSpec,
    *,
    run_id: str,
    steps: Sequence[str],
    generation: str,
    task_ids: Mapping[str, str] | None = None,
) -> None:
    """Send the steps that became ready together: one signature, or a ``group`` fanning out across workers."""
    if not steps:
        return
    ids = task_ids or {}
    signatures = [
        step_signature(app, settings, spec, run_id=run_id, step=s, generation=generation, task_id=ids.get(s))
        for s in steps
    ]
    if len(signatures) == 1:
        signatures[0].apply_async()
    else:
        group(signatures).apply_async()
