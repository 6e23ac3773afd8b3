"""Sub-workflows (``uses: workflow``): the step's ``with:``, its checks at submit, and rendering its inputs.

A ``workflow`` step names another workflow (registered by name and version, or submitted as a file before) or gives
one inline; each execution starts a child run of it (:mod:`orchestrator.engine.subflow`). At submit the parent's
whole tree is checked: every named workflow exists, every inline one is valid, no workflow calls itself (directly
or through others) and the tree is at most ``max_depth`` levels deep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.definition.templates import render
from orchestrator.errors import WorkflowDefinitionError

if TYPE_CHECKING:
    from orchestrator.definition.spec import WorkflowSpec

MAX_SUBFLOW_DEPTH = 5
"""How deep runs may nest by default (``ORCH_MAX_SUBFLOW_DEPTH``): a top-level run is depth 1."""

MAX_INPUT_TEMPLATE_CHARS = 256 * 1024
"""The longest rendered string of a child's inputs (the inputs as a whole are capped by ``ORCH_MAX_INPUT_BYTES``)."""

WorkflowLookup = Callable[[str, "int | None"], "WorkflowSpec"]
"""Finds a workflow by name and version (``None``: the latest); raises ``UnknownWorkflowError``."""


class WorkflowParams(BaseModel):
    """The ``with:`` of a ``workflow`` step: which workflow runs as the child, and its inputs.

    Attributes:
        workflow: A registered (or earlier submitted) workflow's name.
        version: Its version; ``None`` takes the latest.
        definition: An inline workflow definition instead (the workflow-file shape).
        inputs: The child's inputs; every string in it is a template over ``inputs`` and ``steps`` (and
            ``previous``/``iteration``, ``item``/``index`` where the step has them), rendered when the step runs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    workflow: str | None = Field(default=None, pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,99}$")
    version: int | None = Field(default=None, ge=1)
    definition: dict[str, Any] | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> WorkflowParams:
        if (self.workflow is None) == (self.definition is None):
            raise ValueError("give workflow (a registered name) or definition (an inline workflow), exactly one")
        if self.version is not None and self.workflow is None:
            raise ValueError("version goes with workflow, not with an inline definition")
        return self

    def templates(self) -> list[str]:
        """Every string in ``inputs``: each is rendered as a template."""
        return list(_strings(self.inputs))


def inline_spec(params: WorkflowParams, *, step: str) -> WorkflowSpec:
    """The inline definition of a ``workflow`` step, validated.

    Raises:
        WorkflowDefinitionError: Naming the step, with what is wrong in the definition.
    """
    from orchestrator.definition.spec import parse_workflow  # spec.py imports this module for WorkflowParams

    assert params.definition is not None
    try:
        return parse_workflow(params.definition)
    except WorkflowDefinitionError as exc:
        raise WorkflowDefinitionError(f"step {step!r}: with.definition: {exc}", step=step) from None


def child_spec(params: WorkflowParams, lookup: WorkflowLookup, *, step: str) -> WorkflowSpec:
    """The workflow a ``workflow`` step runs: looked up by name and version, or its inline definition.

    Raises:
        WorkflowDefinitionError: The workflow is unknown (naming the step and the workflow), or the inline one is
            invalid.
    """
    if params.definition is not None:
        return inline_spec(params, step=step)
    assert params.workflow is not None
    try:
        return lookup(params.workflow, params.version)
    except WorkflowDefinitionError as exc:
        raise WorkflowDefinitionError(f"step {step!r}: {exc}", step=step) from None


def check_subflows(
    spec: WorkflowSpec,
    lookup: WorkflowLookup,
    *,
    max_depth: int = MAX_SUBFLOW_DEPTH,
    check: Callable[[WorkflowSpec], None] | None = None,
) -> None:
    """Check the tree of workflows ``spec`` starts: known, valid, no cycles, at most ``max_depth`` levels.

    Args:
        spec: The top workflow (depth 1).
        lookup: Finds named workflows.
        max_depth: The deepest a run may nest.
        check: Checks each inline child as ``check_workflow`` checks a submitted one.

    Raises:
        WorkflowDefinitionError: Naming the step and the problem (``a -> b -> a`` for a cycle).
    """
    _check_tree(spec, lookup, (spec.name,), max_depth=max_depth, check=check, seen={})


def _check_tree(
    spec: WorkflowSpec,
    lookup: WorkflowLookup,
    path: tuple[str, ...],
    *,
    max_depth: int,
    check: Callable[[WorkflowSpec], None] | None,
    seen: dict[str, int],
) -> None:
    # ``seen`` maps a definition already checked to the depth it was checked at: a diamond is walked once per depth.
    from orchestrator.definition.spec import StepKind

    for step in spec.steps:
        if step.uses != StepKind.WORKFLOW or not isinstance(step.params, WorkflowParams):
            continue
        child = child_spec(step.params, lookup, step=step.name)
        if child.name in path:
            chain = " -> ".join((*path, child.name))
            raise WorkflowDefinitionError(
                f"step {step.name!r}: workflow {child.name!r} calls itself ({chain})", step=step.name
            )
        depth = len(path) + 1
        if depth > max_depth:
            chain = " -> ".join((*path, child.name))
            raise WorkflowDefinitionError(
                f"step {step.name!r}: runs nest {depth} deep ({chain}); the limit is {max_depth} "
                "(ORCH_MAX_SUBFLOW_DEPTH)",
                step=step.name,
            )
        if step.params.definition is not None and check is not None:
            try:
                check(child)
            except WorkflowDefinitionError as exc:
                raise WorkflowDefinitionError(f"step {step.name!r}: with.definition: {exc}", step=step.name) from None
        key = f"{child.definition_hash}@{depth}"
        if key in seen:
            continue
        seen[key] = depth
        _check_tree(child, lookup, (*path, child.name), max_depth=max_depth, check=check, seen=seen)


def render_inputs(value: Any, variables: dict[str, Any], *, timeout_s: float) -> Any:
    """``inputs`` with every string rendered as a template over ``variables`` (keys are kept as they are).

    A string that is one expression and nothing else (``"{{ steps.a.output }}"``) renders as text like any other;
    the child's input schema decides whether that text fits.

    Raises:
        NonRetryableStepError: ``template_error`` or ``template_limit`` from the renderer.
    """
    if isinstance(value, str):
        return render(value, variables, max_chars=MAX_INPUT_TEMPLATE_CHARS, timeout_s=timeout_s)
    if isinstance(value, dict):
        return {k: render_inputs(v, variables, timeout_s=timeout_s) for k, v in value.items()}
    if isinstance(value, list):
        return [render_inputs(v, variables, timeout_s=timeout_s) for v in value]
    return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []
