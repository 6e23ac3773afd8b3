"""Checks beyond the spec's own shape: registered functions and templates that parse and read only dependencies.

Prompts, system prompts and approval messages are checked alike; one that reads no variable is rendered under the
templates' budgets too, so a static bomb is refused before a run exists.
"""

from __future__ import annotations

from orchestrator.definition.agent import BUILTIN_TOOLS, WORKFLOW_TOOL_PREFIX, AgentParams
from orchestrator.definition.conditions import UNTIL_NAMES, check_condition
from orchestrator.definition.mapping import ITEM_NAMES, check_for_each, is_map
from orchestrator.definition.registry import FunctionRegistry, check_functions, functions
from orchestrator.definition.spec import ApprovalParams, LLMParams, StepSpec, WorkflowSpec
from orchestrator.definition.subflow import WorkflowParams
from orchestrator.definition.templates import check_static_render, check_template, referenced_steps
from orchestrator.errors import WorkflowDefinitionError


def check_workflow(spec: WorkflowSpec, registry: FunctionRegistry | None = None) -> None:
    """Everything a workflow must satisfy before a run of it is created.

    Raises:
        WorkflowDefinitionError: Naming the step and the problem.
    """
    registry = registry or functions
    check_functions(spec, registry)
    for step in spec.steps:
        upstream = spec.graph.ancestors(step.name)
        if step.condition is not None:
            check_condition(step.condition, step=step.name, upstream=upstream)
        _check_repeat(step, upstream, registry)
        check_for_each(step, upstream, registry)
        loop_names = (LOOP_NAMES if step.repeat is not None else frozenset()) | (
            ITEM_NAMES if is_map(step) else frozenset()
        )
        _check_tools(step)
        for source in _templates(step):
            check_template(source, step=step.name, extra_names=loop_names)
            for ref in sorted(referenced_steps(source) - upstream):
                what = "an unknown step" if ref not in spec.steps_by_name else "a step it does not depend on"
                raise WorkflowDefinitionError(
                    f"step {step.name!r}: template reads steps.{ref}, {what}; add {ref!r} to depends_on",
                    step=step.name,
                )
            check_static_render(source, step=step.name, extra_names=loop_names)


LOOP_NAMES = frozenset({"previous", "iteration"})
"""What a repeated step's templates see besides ``inputs`` and ``steps``: the last iteration's output and the number."""


def _check_repeat(step: StepSpec, upstream: set[str], registry: FunctionRegistry) -> None:
    if step.repeat is None:
        return
    if step.repeat.until is not None:
        check_condition(step.repeat.until, step=step.name, upstream=upstream, names=UNTIL_NAMES, what="repeat.until")
    function = step.repeat.until_function
    if function is not None and function not in registry:
        raise WorkflowDefinitionError(f"step {step.name!r}: no registered until function {function!r}", step=step.name)


def _check_tools(step: StepSpec) -> None:
    if not isinstance(step.params, AgentParams):
        return
    # Imported here: the tool registry pulls in the built-ins, which the file-shape modules above do not need.
    from orchestrator.agents.tools import tools

    for name in step.params.tools:
        if name not in BUILTIN_TOOLS and not name.startswith(WORKFLOW_TOOL_PREFIX) and name not in tools:
            raise WorkflowDefinitionError(
                f"step {step.name!r}: unknown tool {name!r}: not a built-in ({', '.join(sorted(BUILTIN_TOOLS))}), "
                "not workflow:NAME, and no function is registered under it with @orchestrator.tool "
                "(list its module in ORCH_IMPORTS)",
                step=step.name,
            )


def _templates(step: StepSpec) -> list[str]:
    """The templates a step renders: an ``llm`` or ``agent`` step's prompt and system prompt, an approval's
    message, a ``workflow`` step's inputs."""
    if isinstance(step.params, LLMParams | AgentParams):
        return [s for s in (step.params.prompt, step.params.system) if s is not None]
    if isinstance(step.params, ApprovalParams) and step.params.message is not None:
        return [step.params.message]
    if isinstance(step.params, WorkflowParams):
        return step.params.templates()
    return []
