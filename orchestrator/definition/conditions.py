"""Step conditions in workflow files: Jinja's expression language in its immutable sandbox, never ``eval``.

``steps.blog_post.output.word_count > 500 and inputs.tone == "formal"`` reads the run's inputs and upstream outputs;
validation checks that an expression parses and names only ``inputs`` and ancestor steps. Evaluation runs under the
templates' budgets (:mod:`orchestrator.sandbox`): past the allocation or time budget the step fails as
``template_limit``.
"""

from __future__ import annotations

from collections.abc import Set
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.parser import Parser

from orchestrator.definition.templates import (
    NESTING_ERRORS,
    STATIC_CHECK_TIMEOUT_S,
    TEMPLATE_TIMEOUT_S,
    BoundedSandbox,
    TemplateLimitError,
    bounded_evaluation,
    referenced_steps_in,
    unsafe_name,
)
from orchestrator.errors import NonRetryableStepError, WorkflowDefinitionError

# The templates' bounded sandbox: ``'a' * 10**10 > ''`` or ``x|center(10**10)`` is refused, never computed.
_ENV = BoundedSandbox()
_NAMES = frozenset({"inputs", "steps"})
UNTIL_NAMES = frozenset({"inputs", "steps", "output", "previous", "iteration"})
"""What a ``repeat.until`` expression reads: the step's context plus this iteration's ``output``, the ``previous``
iteration's and the 1-based ``iteration``."""


def _parse(source: str) -> nodes.Expr:
    parser = Parser(_ENV, source, state="variable")
    expr = parser.parse_expression()
    if not parser.stream.eos:
        raise TemplateError(f"unexpected {parser.stream.current.value!r} after the expression")
    return expr


def check_condition(
    source: str, *, step: str, upstream: Set[str], names: Set[str] = _NAMES, what: str = "condition"
) -> None:
    """Check that a condition parses, calls nothing, and reads only ``names`` (``steps`` only in ``upstream``).

    Args:
        source: The expression.
        step: The step it belongs to, for the error.
        upstream: The steps it may read.
        names: The variables it may read (``repeat.until`` passes :data:`UNTIL_NAMES`).
        what: What the error calls it.

    Raises:
        WorkflowDefinitionError: Naming the step and the problem.
    """
    try:
        # ``find_all`` looks below a node, never at the node itself: wrapped, a bare ``config`` or ``inputs.__class__``
        # is checked too.
        expr = nodes.Output([_parse(source)])
    except TemplateError as exc:
        raise WorkflowDefinitionError(f"step {step!r}: {what} does not parse: {exc.message}", step=step) from None
    except NESTING_ERRORS:
        raise WorkflowDefinitionError(f"step {step!r}: {what} nests too deeply", step=step) from None
    for call in expr.find_all(nodes.Call):
        raise WorkflowDefinitionError(f"step {step!r}: {what} may not call functions ({call!r})", step=step)
    for name in expr.find_all(nodes.Name):
        if name.name not in names:
            available = " and ".join(", ".join(repr(n) for n in sorted(names)).rsplit(", ", 1))
            raise WorkflowDefinitionError(
                f"step {step!r}: {what} refers to {name.name!r}; only {available} are available", step=step
            )
    for node in expr.find_all(nodes.Getattr):
        if node.attr.startswith("_"):
            raise WorkflowDefinitionError(f"step {step!r}: {what} reads private attribute {node.attr!r}", step=step)
    private = unsafe_name(expr)
    if private is not None:
        raise WorkflowDefinitionError(f"step {step!r}: {what} reads private attribute {private!r}", step=step)
    for ref in sorted(referenced_steps_in(expr) - set(upstream)):
        raise WorkflowDefinitionError(
            f"step {step!r}: {what} reads steps.{ref}, which is not upstream of it; add {ref!r} to depends_on",
            step=step,
        )
    try:
        compiled = _compile(source)  # nesting the parser takes can still be too deep for the code generator
    except NESTING_ERRORS:
        raise WorkflowDefinitionError(f"step {step!r}: {what} nests too deeply", step=step) from None
    if not any(True for _ in expr.find_all(nodes.Name)):
        _check_static(compiled, step=step, what=what)


def _check_static(compiled: Any, *, step: str, what: str) -> None:
    # A condition that reads nothing evaluates the same at every run: past the allocation budget, refuse it now.
    try:
        with bounded_evaluation(timeout_s=STATIC_CHECK_TIMEOUT_S):
            compiled()
    except TemplateLimitError as exc:
        if exc.resource == "memory":
            raise WorkflowDefinitionError(f"step {step!r}: {what} passes a limit: {exc}", step=step) from None
    except Exception:  # any other failure is the run's to report, as the step's error
        pass


MAX_CONDITION_DEPTH = 200
"""How deeply an expression may nest (operators, parentheses, attribute reads): a bound of our own, not whatever
depth the interpreter's recursion limit (which libraries such as hypothesis raise) happens to allow."""


def _nesting(expr: nodes.Node) -> int:
    # Iterative, so that measuring a deep tree cannot itself run out of stack.
    deepest, stack = 0, [(expr, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node.iter_child_nodes())
    return deepest


@lru_cache(maxsize=1024)
def _compile(source: str) -> Any:
    if _nesting(_parse(source)) > MAX_CONDITION_DEPTH:
        raise RecursionError("the expression nests too deeply")
    return _ENV.compile_expression(source, undefined_to_none=False)


def evaluate_condition(
    source: str,
    *,
    inputs: dict[str, Any],
    outputs: dict[str, Any],
    timeout_s: float = TEMPLATE_TIMEOUT_S,
    extra: dict[str, Any] | None = None,
    what: str = "condition",
) -> bool:
    """Evaluate a condition against the run's inputs and upstream outputs (``steps.NAME.output``).

    Args:
        source: The expression.
        inputs: The run's inputs.
        outputs: Upstream outputs by step name.
        timeout_s: Seconds evaluation may take.
        extra: More variables (``repeat.until`` reads ``output``, ``previous`` and ``iteration``).
        what: What the error calls it.

    Raises:
        NonRetryableStepError: ``template_limit`` past the allocation or time budget; ``condition_error`` when
            evaluation fails otherwise (a missing value, a type error, nesting too deep …), with the cause.
    """
    value = evaluate_value(source, inputs=inputs, outputs=outputs, timeout_s=timeout_s, extra=extra, what=what)
    try:
        # The sandbox hands back what it refused as an undefined value that raises when it is looked at.
        return bool(value)
    except Exception as exc:
        raise _failed(source, what, exc) from None


def evaluate_value(
    source: str,
    *,
    inputs: dict[str, Any],
    outputs: dict[str, Any],
    timeout_s: float = TEMPLATE_TIMEOUT_S,
    extra: dict[str, Any] | None = None,
    what: str = "expression",
) -> Any:
    """Evaluate a safe expression to its value (a ``for_each`` list); see :func:`evaluate_condition`.

    Raises:
        NonRetryableStepError: As :func:`evaluate_condition`.
    """
    steps = {name: {"output": out} for name, out in outputs.items()}
    try:
        with bounded_evaluation(timeout_s=timeout_s):
            return _compile(source)(**(extra or {}), inputs=inputs, steps=steps)
    except TemplateLimitError as exc:
        raise NonRetryableStepError(f"{what} {_shown(source)} failed: {exc}", kind="template_limit") from None
    except NESTING_ERRORS:
        raise NonRetryableStepError(f"{what} {_shown(source)} nests too deeply", kind="condition_error") from None
    except Exception as exc:
        raise _failed(source, what, exc) from None


def _failed(source: str, what: str, exc: Exception) -> NonRetryableStepError:
    return NonRetryableStepError(f"{what} {_shown(source)} failed: {type(exc).__name__}: {exc}", kind="condition_error")


def _shown(source: str, limit: int = 200) -> str:
    # A condition can be thousands of characters: the error names it, but stays one readable line.
    return repr(source) if len(source) <= limit else repr(source[:limit]) + "…"
