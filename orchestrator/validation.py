"""Checks beyond the spec's own shape: registered functions and templates that parse and read only dependencies."""

from __future__ import annotations

from orchestrator.errors import WorkflowDefinitionError
from orchestrator.registry import FunctionRegistry, check_functions, functions
from orchestrator.spec import LLMParams, WorkflowSpec
from orchestrator.templates import check_template, referenced_steps


def check_workflow(spec: WorkflowSpec, registry: FunctionRegistry | None = None) -> None:
    """Everything a workflow must satisfy before a run of it is created.

    Raises:
        WorkflowDefinitionError: Naming the step and the problem.
    """
    check_functions(spec, registry or functions)
    for step in spec.steps:
        if not isinstance(step.params, LLMParams):
            continue
        for source in (step.params.prompt, step.params.system):
            if source is None:
                continue
            check_template(source, step=step.name)
            upstream = spec.graph.ancestors(step.name)
            for ref in sorted(referenced_steps(source) - upstream):
                what = "an unknown step" if ref not in spec.steps_by_name else "a step it does not depend on"
                raise WorkflowDefinitionError(
                    f"step {step.name!r}: template reads steps.{ref}, {what}; add {ref!r} to depends_on",
                    step=step.name,
                )
