"""Step conditions in workflow files: Jinja's expression language in its immutable sandbox, never ``eval``.

``steps.blog_post.output.word_count > 500 and inputs.tone == "formal"`` reads the run's inputs and upstream outputs;
validation checks that an expression parses and names only ``inputs`` and ancestor steps.
"""

from __future__ import annotations

from collections.abc import Set
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.parser import Parser

from orchestrator.definition.templates import BoundedSandbox, bounded_evaluation, referenced_steps_in, unsafe_name
from orchestrator.errors import NonRetryableStepError, WorkflowDefinitionError

# The templates' bounded sandbox: ``'a' * 10**10 > ''`` or ``x|center(10**10)`` is refused, never computed.
_ENV = BoundedSandbox()
_NAMES = frozenset({"inputs", "steps"})


def _parse(source: str) -> nodes.Expr:
    parser = Parser(_ENV, source, state="variable")
    expr = parser.parse_expression()
    if not parser.stream.eos:
        raise TemplateError(f"unexpected {parser.stream.current.value!r} after the expression")
    return expr


def check_condition(source: str, *, step: str, upstream: Set[str]) -> None:
    """Check that a condition parses, calls nothing, and reads only ``inputs`` and steps in ``upstream``.

    Raises:
        WorkflowDefinitionError: Naming the step and the problem.
    """
    try:
        # ``find_all`` looks below a node, never at the node itself: wrapped, a bare ``config`` or ``inputs.__class__``
        # is checked too.
        expr = nodes.Output([_parse(source)])
    except TemplateError as exc:
        raise WorkflowDefinitionError(f"step {step!r}: condition does not parse: {exc}", step=step) from None
    for call in expr.find_all(nodes.Call):
        raise WorkflowDefinitionError(f"step {step!r}: condition may not call functions ({call!r})", step=step)
    for name in expr.find_all(nodes.Name):
        if name.name not in _NAMES:
            raise WorkflowDefinitionError(
                f"step {step!r}: condition refers to {name.name!r}; only 'inputs' and 'steps' are available", step=step
            )
    for node in expr.find_all(nodes.Getattr):
        if node.attr.startswith("_"):
            raise WorkflowDefinitionError(f"step {step!r}: condition reads private attribute {node.attr!r}", step=step)
    private = unsafe_name(expr)
    if private is not None:
        raise WorkflowDefinitionError(f"step {step!r}: condition reads private attribute {private!r}", step=step)
    for ref in sorted(referenced_steps_in(expr) - set(upstream)):
        raise WorkflowDefinitionError(
            f"step {step!r}: condition reads steps.{ref}, which is not upstream of it; add {ref!r} to depends_on",
            step=step,
        )


@lru_cache(maxsize=1024)
def _compile(source: str) -> Any:
    return _ENV.compile_expression(source, undefined_to_none=False)


def evaluate_condition(source: str, *, inputs: dict[str, Any], outputs: dict[str, Any]) -> bool:
    """Evaluate a condition against the run's inputs and upstream outputs (``steps.NAME.output``).

    Raises:
        NonRetryableStepError: When evaluation fails (a missing value, a type error …), with the cause.
    """
    steps = {name: {"output": out} for name, out in outputs.items()}
    try:
        with bounded_evaluation():
            return bool(_compile(source)(inputs=inputs, steps=steps))
    except Exception as exc:
        raise NonRetryableStepError(f"condition {source!r} failed: {type(exc).__name__}: {exc}",
                                    kind="condition_error") from None  # fmt: skip
