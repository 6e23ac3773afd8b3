"""Prompt templates, rendered in Jinja's immutable sandbox: no attribute access to Python internals."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from orchestrator.errors import NonRetryableStepError, WorkflowDefinitionError

# What evaluating an expression in a template can raise besides TemplateError. Not ``Exception``: a Celery soft time
# limit arriving mid-render must stay a timeout.
_EXPRESSION_ERRORS = (ArithmeticError, AttributeError, LookupError, RuntimeError, TypeError, ValueError)
_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


@lru_cache(maxsize=1024)
def _compile(source: str) -> Any:
    return _ENV.from_string(source)


def check_template(source: str, *, step: str) -> None:
    """Check that a template parses.

    Raises:
        WorkflowDefinitionError: Naming the step and the syntax error.
    """
    try:
        _ENV.parse(source)
    except TemplateError as exc:
        raise WorkflowDefinitionError(f"step {step!r}: template does not parse: {exc}", step=step) from None


def referenced_steps(source: str) -> set[str]:
    """Step names a template reads through ``steps.NAME`` or ``steps['NAME']``."""
    return referenced_steps_in(_ENV.parse(source))


def referenced_steps_in(tree: nodes.Node) -> set[str]:
    """Step names a parsed template or expression reads through ``steps.NAME`` or ``steps['NAME']``."""
    found: set[str] = set()
    for node in tree.find_all(nodes.Getattr):
        if isinstance(node.node, nodes.Name) and node.node.name == "steps":
            found.add(node.attr)
    # Jinja reads ``steps['x']`` like ``steps.x``; missing it would let a template read a step nobody loads.
    for item in tree.find_all(nodes.Getitem):
        target, key = item.node, item.arg
        on_steps = isinstance(target, nodes.Name) and target.name == "steps"
        if on_steps and isinstance(key, nodes.Const) and isinstance(key.value, str):
            found.add(key.value)
    return found


def render(source: str, context: dict[str, Any]) -> str:
    """Render ``source`` against ``context`` (``inputs`` and ``steps``).

    Raises:
        NonRetryableStepError: On a missing variable, a sandbox violation or any other rendering error.
    """
    try:
        return str(_compile(source).render(context))
    except TemplateError as exc:
        raise NonRetryableStepError(f"template failed: {exc}", kind="template_error") from None
    except _EXPRESSION_ERRORS as exc:
        # ``{{ 1 / 0 }}`` or a sandbox range limit: as permanent as a syntax error. Left uncaught, the task would
        # crash without recording anything and the step would fail only after its leases ran out, as "worker lost".
        raise NonRetryableStepError(f"template failed: {type(exc).__name__}: {exc}", kind="template_error") from None
