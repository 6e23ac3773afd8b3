"""Registries that producers and workers share by importing the same modules, the way Celery shares tasks.

Workflows are registered by ``(name, version)``; ``python`` steps name functions registered here, so a submitted
file can only run code a worker deliberately exposed (never an arbitrary import path).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from orchestrator.definition.modules import unregistered, unregistered_error
from orchestrator.definition.spec import WorkflowSpec
from orchestrator.errors import UnknownWorkflowError, WorkflowDefinitionError

StepFunction = Callable[..., Any]
F = TypeVar("F", bound=StepFunction)


class FunctionRegistry:
    """Functions that ``python`` steps may call, by name."""

    def __init__(self) -> None:
        self._functions: dict[str, StepFunction] = {}

    def register(self, fn: F, name: str | None = None, *, replace: bool = False) -> F:
        """Expose ``fn`` under ``name`` (default: ``module.qualname``).

        Args:
            fn: The function.
            name: The name steps use.
            replace: Let ``fn`` take over a name already held (a workflow module imported twice re-creates its
                lambdas).

        Raises:
            WorkflowDefinitionError: When another function already holds the name.
        """
        key = name or f"{fn.__module__}.{fn.__qualname__}"
        existing = self._functions.get(key)
        if not replace and existing is not None and existing is not fn and _origin(existing) != _origin(fn):
            raise WorkflowDefinitionError(f"function name {key!r} is already registered")
        self._functions[key] = fn
        return fn

    def get(self, name: str) -> StepFunction:
        """The function registered as ``name``.

        Raises:
            WorkflowDefinitionError: When nothing is registered under it.
        """
        try:
            return self._functions[name]
        except KeyError:
            raise WorkflowDefinitionError(f"no registered function {name!r}") from None

    def name_of(self, fn: StepFunction) -> str | None:
        """The name ``fn`` is registered under, if it is."""
        return next((name for name, known in self._functions.items() if known is fn), None)

    def __contains__(self, name: object) -> bool:
        return name in self._functions

    def __iter__(self) -> Iterator[str]:
        return iter(self._functions)


def _origin(fn: StepFunction) -> tuple[str, str]:
    # Re-importing a module (e.g. __main__ vs its dotted name) re-creates its functions; same origin is no clash.
    return (getattr(fn, "__module__", ""), getattr(fn, "__qualname__", ""))


class WorkflowRegistry:
    """Workflows by name and version."""

    def __init__(self) -> None:
        self._workflows: dict[tuple[str, int], WorkflowSpec] = {}

    def register(self, spec: WorkflowSpec, *, replace: bool = False) -> WorkflowSpec:
        """Register ``spec``; registering the same definition again is harmless.

        Args:
            spec: The workflow.
            replace: Let a changed definition take over its name and version (what a redeploy of changed code
                without a version bump amounts to; runs stay pinned to the definition they started with).

        Raises:
            WorkflowDefinitionError: When a different definition already holds this name and version.
        """
        key = (spec.name, spec.version)
        existing = self._workflows.get(key)
        if not replace and existing is not None and existing.definition_hash != spec.definition_hash:
            raise WorkflowDefinitionError(
                f"workflow {spec.name!r} version {spec.version} is already registered with another definition; "
                "bump the version"
            )
        self._workflows[key] = spec
        return spec

    def get(self, name: str, version: int | None = None) -> WorkflowSpec:
        """The given version, or the latest when ``version`` is ``None``.

        Raises:
            UnknownWorkflowError: When nothing matches.
        """
        if version is not None:
            try:
                return self._workflows[(name, version)]
            except KeyError:
                raise UnknownWorkflowError(name, version) from None
        versions = [v for (n, v) in self._workflows if n == name]
        if not versions:
            raise UnknownWorkflowError(name)
        return self._workflows[(name, max(versions))]

    def all(self) -> list[WorkflowSpec]:
        """Every registered workflow, sorted by name and version."""
        return [self._workflows[key] for key in sorted(self._workflows)]


functions = FunctionRegistry()
workflows = WorkflowRegistry()


def function(name: str | None = None) -> Callable[[F], F]:
    """Decorator exposing a function to ``python`` steps under ``name`` (default ``module.qualname``)."""

    def decorate(fn: F) -> F:
        return functions.register(fn, name)

    return decorate


def check_functions(spec: WorkflowSpec, registry: FunctionRegistry | None = None) -> None:
    """Check that every function ``spec`` names (``python`` steps', ``condition_function``) is registered.

    Raises:
        WorkflowDefinitionError: Naming the step, the missing function and, where it can tell, the module to list
            in ``ORCH_IMPORTS``.
    """
    registry = registry or functions
    for step, kind, name in unregistered(spec, registry):
        raise unregistered_error(step, kind, name, registry)


def import_modules(modules: Iterable[str]) -> None:
    """Import the modules that define workflows and functions (``ORCH_IMPORTS``).

    Raises:
        WorkflowDefinitionError: When a module cannot be imported.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise WorkflowDefinitionError(f"cannot import ORCH_IMPORTS module {module!r}: {exc}") from exc
