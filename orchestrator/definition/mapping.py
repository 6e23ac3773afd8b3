"""A step's ``for_each``: the shape of a map step, checked before a run exists (run by
:mod:`orchestrator.engine.mapping`).

``for_each`` is a safe expression over ``inputs`` and upstream ``steps`` (``for_each_function`` a registered
callable on the step context, from a Python workflow's ``for_each=`` lambda); each item of the list it yields runs
as its own unit of work, at most ``max_parallel`` at once. Templates and the Python ``ctx`` of a map step also see
``item``, ``index`` (0-based) and ``count``.
"""

from __future__ import annotations

from collections.abc import Set
from typing import TYPE_CHECKING

from orchestrator.definition.conditions import check_condition
from orchestrator.errors import WorkflowDefinitionError

if TYPE_CHECKING:
    from orchestrator.definition.registry import FunctionRegistry
    from orchestrator.definition.spec import StepSpec

DEFAULT_MAX_ITEMS = 10_000
"""The most items a ``for_each`` list may have by default (``ORCH_MAP_MAX_ITEMS``)."""

MAX_PARALLEL_LIMIT = 10_000
"""The largest ``max_parallel`` a step may ask for."""

MAP_KINDS = frozenset({"llm", "python", "noop", "workflow", "approval"})
"""Step kinds that take ``for_each`` (a ``workflow`` step's items each start a child run, an ``approval`` step's
each wait for a decision of their own)."""

ITEM_NAMES = frozenset({"item", "index", "count"})
"""What a map step's templates see besides ``inputs`` and ``steps``: the item, its 0-based index and the count."""

FOR_EACH_NAMES = frozenset({"inputs", "steps"})
"""What a ``for_each`` expression reads."""


def check_map_shape(step: StepSpec) -> None:
    """Check the ``for_each`` fields of one step on their own (called by the spec's validator).

    Raises:
        ValueError: One message naming the problem (pydantic prefixes the step).
    """
    if step.for_each is not None and step.for_each_function is not None:
        raise ValueError("give either for_each (an expression) or for_each_function, not both")
    if not is_map(step):
        if step.max_parallel is not None:
            raise ValueError("max_parallel needs for_each")
        return
    if step.uses.value not in MAP_KINDS:
        kinds = ", ".join(sorted(MAP_KINDS))
        raise ValueError(f"for_each is not supported on {step.uses.value} steps (supported: {kinds})")
    if step.repeat is not None:
        raise ValueError("for_each and repeat cannot be combined on one step")


def check_for_each(step: StepSpec, upstream: Set[str], registry: FunctionRegistry) -> None:
    """Check that a map step's expression parses and reads only ``inputs`` and upstream steps, or that its
    function is registered.

    Raises:
        WorkflowDefinitionError: Naming the step and the problem.
    """
    if step.for_each is not None:
        check_condition(step.for_each, step=step.name, upstream=upstream, names=FOR_EACH_NAMES, what="for_each")
    function = step.for_each_function
    if function is not None and function not in registry:
        raise WorkflowDefinitionError(
            f"step {step.name!r}: no registered for_each function {function!r}", step=step.name
        )


def is_map(step: StepSpec) -> bool:
    """Whether ``step`` runs once per item of a list."""
    return step.for_each is not None or step.for_each_function is not None
