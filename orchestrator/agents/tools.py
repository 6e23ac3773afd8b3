"""Tools an agent may call: Python functions registered with :func:`tool`, described to the model by JSON schema.

A tool's input schema comes from its type hints (or from its one pydantic-model parameter); the model's input is
validated against it before the call, and a validation error goes back to the model as an error result, as does an
exception the tool raises. A parameter annotated :class:`ToolContext` receives the run, step and store instead.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, get_type_hints, overload

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from orchestrator.definition.agent import BUILTIN_TOOLS, TOOL_NAME_PATTERN, WORKFLOW_TOOL_PREFIX
from orchestrator.errors import WorkflowDefinitionError

__all__ = ["Tool", "ToolContext", "ToolInputError", "ToolRegistry", "api_name", "tool", "tools"]

F = TypeVar("F", bound=Callable[..., Any])
_NAME = re.compile(TOOL_NAME_PATTERN)


@dataclass(frozen=True)
class ToolContext:
    """What a tool may know about its call.

    Attributes:
        run_id: The run.
        step: The agent step.
        attempt: The step's attempt number.
        call_id: The model's id for this call (``tool_use`` id).
        store: The run's state store (the built-in notes use it).
    """

    run_id: str
    step: str
    attempt: int
    call_id: str
    store: Any = None


class ToolInputError(ValueError):
    """The model's input does not fit the tool's schema (sent back to the model as an error result)."""


@dataclass(frozen=True)
class Tool:
    """A tool the model can call.

    Attributes:
        name: What steps list in ``tools``.
        description: What the model is told it does.
        input_schema: The JSON schema of its input (an object).
        fn: The function.
        model: The pydantic model inputs are validated with.
        idempotent: A call interrupted by a lost worker may run again (else it is answered as an error).
        takes_model: ``fn`` takes the validated model as its one argument, not keyword arguments.
        context_param: The name of the parameter that receives the :class:`ToolContext`, if any.
    """

    name: str
    description: str
    input_schema: dict[str, Any]
    fn: Callable[..., Any]
    model: type[BaseModel]
    idempotent: bool = False
    takes_model: bool = False
    context_param: str | None = None

    def definition(self, name: str | None = None) -> dict[str, Any]:
        """The Messages API ``tools`` entry, under ``name`` (the API's spelling) or the tool's own."""
        return {"name": name or api_name(self.name), "description": self.description, "input_schema": self.input_schema}

    def validate(self, raw: Any) -> BaseModel:
        """The model's input, validated.

        Raises:
            ToolInputError: One line per problem, naming the field.
        """
        try:
            return self.model.model_validate(raw if raw is not None else {})
        except ValidationError as exc:
            problems = [
                f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors(include_url=False)
            ]
            raise ToolInputError(f"invalid input for tool {self.name!r}: " + "; ".join(problems)) from None

    def call(self, value: BaseModel, ctx: ToolContext) -> Any:
        """Run the tool on a validated input."""
        if self.takes_model:
            args: dict[str, Any] = {next(iter(inspect.signature(self.fn).parameters)): value}
        else:
            args = {name: getattr(value, name) for name in type(value).model_fields}
        if self.context_param is not None:
            args[self.context_param] = ctx
        return self.fn(**args)


def api_name(name: str) -> str:
    """A tool's name as the Messages API accepts it (``^[a-zA-Z0-9_-]{1,128}$``): other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def make_tool(
    fn: Callable[..., Any], *, name: str | None = None, description: str | None = None, idempotent: bool = False
) -> Tool:
    """Describe ``fn`` as a tool: its schema from its type hints, its description from its docstring.

    Raises:
        WorkflowDefinitionError: A bad name, a missing docstring, or a parameter without a type hint.
    """
    key = name or fn.__name__
    if not _NAME.match(key) or key.startswith(WORKFLOW_TOOL_PREFIX):
        raise WorkflowDefinitionError(f"tool name {key!r} must match {TOOL_NAME_PATTERN}")
    text = description or inspect.getdoc(fn)
    if not text:
        raise WorkflowDefinitionError(f"tool {key!r} needs a docstring (or description=): the model reads it")
    hints = get_type_hints(fn)
    params = inspect.signature(fn).parameters
    context_param = next((p for p in params if hints.get(p) is ToolContext), None)
    inputs = [p for p in params.values() if p.name != context_param]
    first = hints.get(inputs[0].name) if inputs else None
    if len(inputs) == 1 and isinstance(first, type) and issubclass(first, BaseModel):
        model: type[BaseModel] = first
        takes_model = True
    else:
        fields: dict[str, Any] = {}
        for param in inputs:
            if param.name not in hints:
                raise WorkflowDefinitionError(f"tool {key!r}: parameter {param.name!r} needs a type hint")
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[param.name] = (hints[param.name], default)
        model = create_model(f"{api_name(key)}_input", __config__=ConfigDict(extra="forbid"), **fields)
        takes_model = False
    schema = model.model_json_schema()
    schema.pop("title", None)
    return Tool(key, text.strip(), schema, fn, model, idempotent, takes_model, context_param)


class ToolRegistry:
    """Tools by name; the built-ins are always there."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(self, entry: Tool, *, replace: bool = False) -> Tool:
        """Add a tool.

        Raises:
            WorkflowDefinitionError: When a built-in or another function holds the name.
        """
        existing = self._tools.get(entry.name)
        if entry.name in BUILTIN_TOOLS:
            raise WorkflowDefinitionError(f"tool name {entry.name!r} is a built-in")
        if not replace and existing is not None and _origin(existing.fn) != _origin(entry.fn):
            raise WorkflowDefinitionError(f"tool name {entry.name!r} is already registered")
        self._tools[entry.name] = entry
        return entry

    def get(self, name: str) -> Tool | None:
        """The registered tool, or ``None``."""
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def names(self) -> Mapping[str, Tool]:
        """Every registered tool by name."""
        return dict(self._tools)


def _origin(fn: Callable[..., Any]) -> tuple[str, str]:
    return (getattr(fn, "__module__", ""), getattr(fn, "__qualname__", ""))


tools = ToolRegistry()
"""The process's registered tools (workers import the modules that register them: ``ORCH_IMPORTS``)."""


@overload
def tool(fn: F, /) -> F: ...
@overload
def tool(*, name: str | None = None, description: str | None = None, idempotent: bool = False) -> Callable[[F], F]: ...
def tool(
    fn: F | None = None, /, *, name: str | None = None, description: str | None = None, idempotent: bool = False
) -> F | Callable[[F], F]:
    """Register a function as a tool agents may call: ``@tool`` or ``@tool(name=..., idempotent=True)``.

    Args:
        fn: The function (its docstring is the description; its type hints, the input schema).
        name: The name steps list in ``tools`` (default: the function's name).
        description: Instead of the docstring.
        idempotent: A call cut short by a lost worker may run again; by default such a call is answered to the
            model as an error, never run twice.

    Raises:
        WorkflowDefinitionError: A bad name, a name already held, a missing docstring or type hint.
    """

    def decorate(function: F) -> F:
        tools.register(make_tool(function, name=name, description=description, idempotent=idempotent))
        return function

    return decorate(fn) if fn is not None else decorate
