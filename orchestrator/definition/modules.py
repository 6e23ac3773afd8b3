"""Which module registers a function a workflow names: the hint in the error, and the CLI's import of local code.

A ``python`` step names a registered function; by convention (``@function()`` without a name) the name is the
module's dotted path plus the function's, so the module can be found from the name alone, as a file, without
importing anything. Only the command line imports such a module, and only from the directory it runs in (the user's
own project): a workflow submitted over the API never causes an import (see the security page).
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Container, Iterable, Iterator
from pathlib import Path

from orchestrator.definition.spec import PythonParams, WorkflowSpec
from orchestrator.errors import WorkflowDefinitionError

MAX_MODULE_DEPTH = 8
"""The most dotted parts a function name may have for its module to be looked for (each is a file lookup)."""


def module_of(name: str, root: Path | None = None) -> str | None:
    """The longest dotted prefix of ``name`` that is a Python module under ``root`` (default: the current directory).

    Only the file system is read (``a/b.py`` or ``a/b/__init__.py``); nothing is imported.

    Args:
        name: A registered function's name (``module:function`` is read as ``module.function``).
        root: The directory modules are looked for in.
    """
    parts = name.replace(":", ".").split(".")
    if len(parts) > MAX_MODULE_DEPTH or not all(part.isidentifier() for part in parts):
        return None
    base = Path.cwd() if root is None else root
    for end in range(len(parts) - 1, 0, -1):
        path = base.joinpath(*parts[:end])
        if path.with_name(f"{path.name}.py").is_file() or (path / "__init__.py").is_file():
            return ".".join(parts[:end])
    return None


def unregistered(spec: WorkflowSpec, registered: Container[str]) -> Iterator[tuple[str, str, str]]:
    """``(step, kind, name)`` of each function ``spec`` names that is not in ``registered``.

    ``kind`` is ``function`` (a ``python`` step's), ``condition function`` (a step's ``condition_function``) or
    ``until function`` (its ``repeat.until_function``).
    """
    for step in spec.steps:
        if isinstance(step.params, PythonParams) and step.params.function not in registered:
            yield step.name, "function", step.params.function
        if step.condition_function is not None and step.condition_function not in registered:
            yield step.name, "condition function", step.condition_function
        until = step.repeat.until_function if step.repeat is not None else None
        if until is not None and until not in registered:
            yield step.name, "until function", until


def unregistered_error(step: str, kind: str, name: str, registered: Iterable[str]) -> WorkflowDefinitionError:
    """The error for ``step``'s unregistered function ``name``, saying which module to import where it can tell.

    The module is looked for by name under the current directory (nothing is imported): when it exists and is not
    imported the message says ``set ORCH_IMPORTS=MODULE``; when it is imported, that it registers no such function,
    with the closest registered name.
    """
    head = f"step {step!r}: no registered {kind} {name!r}"
    module = module_of(name)
    if module is None:
        fix = "register it with @orchestrator.function and list its module in ORCH_IMPORTS"
    elif module not in sys.modules:
        fix = f"set ORCH_IMPORTS={module} (the module that registers it with @orchestrator.function)"
    else:
        close = difflib.get_close_matches(name, list(registered), n=1)
        fix = f"module {module} is imported but registers no function by that name" + (
            f"; did you mean {close[0]!r}?" if close else ""
        )
    return WorkflowDefinitionError(f"{head}; {fix}", step=step)


def import_local_modules(spec: WorkflowSpec, registered: Container[str], root: Path | None = None) -> list[str]:
    """Import the modules under ``root`` (default: the current directory) that the unregistered functions of ``spec``
    name, the way ``ORCH_IMPORTS`` would; for the command line only, never for a workflow from elsewhere.

    Returns:
        The modules imported, in order.

    Raises:
        WorkflowDefinitionError: When one fails to import, naming it and the step.
    """
    base = Path.cwd() if root is None else root
    imported: list[str] = []
    for step, _, name in list(unregistered(spec, registered)):
        module = module_of(name, base)
        if module is None or module in sys.modules:
            continue
        if str(base) not in sys.path:
            sys.path.insert(0, str(base))
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise WorkflowDefinitionError(
                f"step {step!r}: cannot import {module} (for {name!r}): {type(exc).__name__}: {exc}", step=step
            ) from exc
        imported.append(module)
    return imported
