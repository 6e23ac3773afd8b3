"""Prompt templates, rendered in a bounded immutable sandbox (:mod:`orchestrator.definition.sandbox`): no attribute
access to Python internals, and no expression, loop or output large enough to exhaust a worker.

Validation refuses access to dunder and name-mangled attributes, undefined names and nesting too deep to compile before
a run exists; rendering refuses them again, and bounds sizes, loops, total allocation and time.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, meta, nodes

from orchestrator.definition.budget import (
    MAX_INT_BITS,
    MAX_LOOP_ITERATIONS,
    MAX_OUTPUT_CHARS,
    MAX_VALUE_CHARS,
    TEMPLATE_BUDGET_BYTES,
    TEMPLATE_TIMEOUT_S,
    TemplateLimitError,
    bounded_evaluation,
)
from orchestrator.definition.sandbox import EXPRESSION_ERRORS, BoundedSandbox
from orchestrator.errors import NonRetryableStepError, WorkflowDefinitionError

_NAMES = frozenset({"inputs", "steps", "run_id", "attempt"})
"""The variables a prompt template sees."""

__all__ = [
    "MAX_INT_BITS",
    "MAX_LOOP_ITERATIONS",
    "MAX_OUTPUT_CHARS",
    "MAX_VALUE_CHARS",
    "STATIC_CHECK_TIMEOUT_S",
    "TEMPLATE_BUDGET_BYTES",
    "TEMPLATE_TIMEOUT_S",
    "BoundedSandbox",
    "TemplateLimitError",
    "bounded_evaluation",
    "check_static_render",
    "check_template",
    "referenced_steps",
    "referenced_steps_in",
    "render",
    "unsafe_name",
]

_ENV = BoundedSandbox(autoescape=False, keep_trailing_newline=True)

STATIC_CHECK_TIMEOUT_S = 0.5
"""Seconds validation spends rendering a template that reads no variable; one still running then is left to the
run-time limits rather than refused (validation runs where a request waits for it)."""
NESTING_ERRORS = (RecursionError, SyntaxError)
"""What parsing or compiling a deeply nested template raises (Python's own parser refuses 200 nested brackets)."""


@lru_cache(maxsize=1024)
def _compile(source: str) -> Any:
    template = _ENV.from_string(source)
    # Jinja chains the template's globals to the environment's (a ChainMap, copied key by key in Python on every
    # render); ours never change once built, so each template keeps them as one plain dict.
    template.globals = dict(template.globals)
    return template


def unsafe_name(tree: nodes.Node) -> str | None:
    """The first dunder or name-mangled attribute a parsed template or expression reads, or ``None``.

    Attribute reads, constant subscripts and the ``attr`` filter are all checked: the sandbox would refuse them
    when rendering, and no prompt needs them, so they are refused when the workflow is validated.
    """

    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            # ``steps.NAME`` reads a step, whatever its name; an unknown one is refused by the depends_on check.
            on_steps = isinstance(node.node, nodes.Name) and node.node.name == "steps"
            if _private(node.attr) and not on_steps:
                return node.attr
        elif isinstance(node, nodes.Getitem):
            if isinstance(node.arg, nodes.Const) and _private(node.arg.value):
                return str(node.arg.value)
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args:
            first = node.args[0]
            if isinstance(first, nodes.Const) and _private(first.value):
                return str(first.value)
    return None


def _private(name: Any) -> bool:
    """A dunder (``__class__``) or name-mangled (``_TemplateReference__context``) attribute name."""
    return isinstance(name, str) and (name.startswith("__") or re.match(r"_[A-Za-z][A-Za-z0-9]*__", name) is not None)


def check_template(source: str, *, step: str, extra_names: frozenset[str] = frozenset()) -> None:
    """Check that a template parses, reads no Python internals and names only variables a step can see.

    ``extra_names`` are variables this step sees besides the usual ones (a repeated step's ``previous`` and
    ``iteration``).

    Raises:
        WorkflowDefinitionError: Naming the step and the problem.
    """
    try:
        tree = _ENV.parse(source)
    except TemplateError as exc:
        raise WorkflowDefinitionError(f"step {step!r}: template does not parse: {exc}", step=step) from None
    except NESTING_ERRORS:
        raise WorkflowDefinitionError(f"step {step!r}: template nests too deeply", step=step) from None
    name = unsafe_name(tree)
    if name is not None:
        raise WorkflowDefinitionError(f"step {step!r}: template reads the internal attribute {name!r}", step=step)
    for unknown in sorted(meta.find_undeclared_variables(tree) - _NAMES - extra_names - set(_ENV.globals)):
        raise WorkflowDefinitionError(
            f"step {step!r}: template refers to {unknown!r}, which is not defined; "
            f"a template sees {', '.join(sorted(_NAMES | extra_names))}",
            step=step,
        )
    try:
        _compile(source)  # nesting the parser takes can still be too deep for the code generator
    except TemplateError as exc:
        raise WorkflowDefinitionError(f"step {step!r}: template does not compile: {exc}", step=step) from None
    except NESTING_ERRORS:
        raise WorkflowDefinitionError(f"step {step!r}: template nests too deeply", step=step) from None


def check_static_render(
    source: str, *, step: str, what: str = "template", extra_names: frozenset[str] = frozenset()
) -> None:
    """Render a template that reads no variable under the budgets now, so a bomb is refused before a run exists.

    Only a template past its allocation budget is refused: any other failure (or one still running after
    :data:`STATIC_CHECK_TIMEOUT_S`) is left for the run, which reports it as the step's error.

    Raises:
        WorkflowDefinitionError: Naming the step and the limit.
    """
    if meta.find_undeclared_variables(_ENV.parse(source)) & (_NAMES | extra_names):
        return
    try:
        with bounded_evaluation(timeout_s=STATIC_CHECK_TIMEOUT_S):
            for _ in _compile(source).generate({}):
                pass
    except TemplateLimitError as exc:
        if exc.resource == "memory":
            raise WorkflowDefinitionError(f"step {step!r}: {what} passes a limit: {exc}", step=step) from None
    except (TemplateError, *EXPRESSION_ERRORS, SyntaxError):
        pass


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


def render(
    source: str,
    context: dict[str, Any],
    *,
    max_chars: int = MAX_VALUE_CHARS,
    timeout_s: float = TEMPLATE_TIMEOUT_S,
    deadline: float | None = None,
) -> str:
    """Render ``source`` against ``context`` (``inputs`` and ``steps``).

    Args:
        source: The template.
        context: Its variables.
        max_chars: The rendered text may not be longer; rendering stops as soon as it is.
        timeout_s: Seconds rendering may take.
        deadline: A :func:`time.monotonic` time rendering must end by anyway (the step's own timeout).

    Raises:
        NonRetryableStepError: ``prompt_too_large`` past ``max_chars``; ``template_limit`` past the allocation
            budget (:data:`TEMPLATE_BUDGET_BYTES`) or the time limit; ``template_error`` on a missing variable,
            a sandbox violation, a size or loop limit, nesting too deep, or any other rendering error.
    """
    pieces: list[str] = []
    length = 0
    try:
        with bounded_evaluation(max_chars, timeout_s=timeout_s, deadline=deadline):
            for piece in _compile(source).generate(context):
                length += len(piece)
                if length > max_chars:
                    raise NonRetryableStepError(
                        f"the rendered text passes {max_chars} characters, the limit", kind="prompt_too_large"
                    )
                pieces.append(piece)
    except TemplateLimitError as exc:
        raise NonRetryableStepError(f"template failed: {exc}", kind="template_limit") from None
    except TemplateError as exc:
        raise NonRetryableStepError(f"template failed: {exc}", kind="template_error") from None
    except NESTING_ERRORS:
        # Raised by the parser or code generator, before anything ran: the traceback would only say "recursion".
        raise NonRetryableStepError("template failed: it nests too deeply", kind="template_error") from None
    except EXPRESSION_ERRORS as exc:
        # ``{{ 1 / 0 }}`` or a sandbox range limit: as permanent as a syntax error. Left uncaught, the task would
        # crash without recording anything and the step would fail only after its leases ran out, as "worker lost".
        raise NonRetryableStepError(f"template failed: {type(exc).__name__}: {exc}", kind="template_error") from None
    return "".join(pieces)
