"""Opening a kept child's LLM call in its parent's finish: which children, and with what request.

A finishing step that keeps children to run in its worker (:mod:`orchestrator.engine.local`) knows, for a plain
``llm`` child whose reads it holds, the request its attempt will send first: the run's inputs, the finishing step's
output and what its own claim read. Its open then rides the finish (:mod:`orchestrator.llm.preopen`). Agents,
repeated and map steps and steps with a condition are left alone: their first call, or whether there is one, is
their own business.
"""

from __future__ import annotations

from typing import Any

from orchestrator.definition.mapping import is_map
from orchestrator.definition.spec import LLMParams, WorkflowSpec
from orchestrator.domain import Attempt
from orchestrator.engine.coordinator import upstream_reads
from orchestrator.engine.runtime import Runtime
from orchestrator.engine.steps import StepContext
from orchestrator.llm.gateway import CallContext
from orchestrator.llm.outbox import CallOutbox
from orchestrator.llm.preopen import PreOpen

__all__ = ["attempt_call", "open_ahead"]


def attempt_call(
    spec: WorkflowSpec,
    attempt: Attempt,
    *,
    fresh: bool,
    outbox: CallOutbox | None = None,
    opened: PreOpen | None = None,
) -> CallContext:
    """Who an attempt's LLM calls are for: its run's budget and workflow, its step (``fresh`` when the step was named
    by ``resume --from``)."""
    return CallContext(
        attempt.run_id,
        spec.name,
        budget_usd=spec.budget_usd,
        fresh=fresh,
        step=attempt.step,
        outbox=outbox,
        opened=opened,
    )


def open_ahead(
    runtime: Runtime, spec: WorkflowSpec, child: str, task_id: str, *, parent: Attempt, ctx: StepContext, output: Any
) -> PreOpen | None:
    """The first LLM call of ``child``, claimed under ``task_id`` by the finish of ``parent`` (which saw ``ctx`` and
    returned ``output``), opened ahead; ``None`` when the child is not a plain ``llm`` step or reads a step whose
    output is not known here."""
    step = spec.steps_by_name[child]
    plain = step.repeat is None and step.condition is None and step.condition_function is None and not is_map(step)
    if not plain or not isinstance(step.params, LLMParams):
        return None
    outputs: dict[str, Any] = {}
    for read in upstream_reads(spec, child):
        if read == parent.step:
            outputs[read] = output
        elif read in ctx.outputs:
            outputs[read] = ctx.outputs[read]
        else:
            return None
    # A first attempt, as a child just released is (a later one renders its own request, and gives this one back).
    seen = StepContext(parent.run_id, child, 1, ctx.inputs, outputs)
    attempt = Attempt(parent.run_id, child, parent.generation, task_id)
    return runtime.executor.pre_open(step, seen, attempt_call(spec, attempt, fresh=False), task_id)
