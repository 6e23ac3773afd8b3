"""The ``with:`` of an ``agent`` step: a model that calls tools in a loop (run by :mod:`orchestrator.agents.loop`).

Tool names are a built-in (:data:`BUILTIN_TOOLS`), ``workflow:NAME`` (a child workflow as the tool call), or the name
of a function registered with ``@orchestrator.tool`` (checked when the workflow is validated, as ``python`` steps'
functions are).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BUILTIN_TOOLS = frozenset({"calculator", "notes.read", "notes.write"})
"""The tools every worker has: arithmetic, and the run's shared notes."""

TOOL_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"
"""A registered tool's name (and a built-in's)."""

WORKFLOW_TOOL_PREFIX = "workflow:"
_WORKFLOW_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,99}$")
_TOOL_NAME = re.compile(TOOL_NAME_PATTERN)

MAX_TURNS = 50
"""The most turns (model calls) an agent step may take (``max_turns``)."""
MAX_TOOLS = 32
MAX_SCRIPTED_CALLS_BYTES = 16_384
"""The largest ``simulate.tool_calls``, as compact JSON (it travels in a request header to the offline provider)."""
MAX_TOOL_TIMEOUT_S = 3600.0


def check_tool_name(name: str) -> str:
    """Return ``name`` when it can name a tool: a built-in, ``workflow:NAME``, or a registrable name.

    Raises:
        ValueError: Naming the value and what a tool name looks like.
    """
    if name in BUILTIN_TOOLS:
        return name
    if name.startswith(WORKFLOW_TOOL_PREFIX):
        workflow = name.removeprefix(WORKFLOW_TOOL_PREFIX)
        if not _WORKFLOW_NAME.match(workflow):
            raise ValueError(f"tool {name[:120]!r}: workflow:NAME needs a workflow name (letters, digits, _ . -)")
        return name
    if not _TOOL_NAME.match(name):
        raise ValueError(
            f"unknown tool {name[:120]!r}: a tool is one of {', '.join(sorted(BUILTIN_TOOLS))}, workflow:NAME, "
            "or a function registered with @orchestrator.tool"
        )
    return name


class ScriptedToolCall(BaseModel):
    """One tool call the offline provider makes in a scripted turn."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=120)
    input: dict[str, Any] = Field(default_factory=dict)


class AgentSimulateSpec(BaseModel):
    """Offline-provider directives for an agent: latency and failures per call, and the tool calls of each turn."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_s: float = Field(default=0.0, ge=0, le=300)
    errors: tuple[str, ...] = ()
    retry_after_s: float | None = Field(default=None, ge=0, le=3600)
    tool_calls: tuple[tuple[ScriptedToolCall, ...], ...] | None = Field(default=None, max_length=MAX_TURNS)

    @field_validator("errors")
    @classmethod
    def _known_errors(cls, errors: tuple[str, ...]) -> tuple[str, ...]:
        from orchestrator.definition.spec import SimulateSpec

        SimulateSpec(errors=errors)
        return errors

    @field_validator("tool_calls")
    @classmethod
    def _bounded(cls, script: Any) -> Any:
        if script is not None:
            size = len(json.dumps([[c.model_dump() for c in turn] for turn in script], separators=(",", ":")))
            if size > MAX_SCRIPTED_CALLS_BYTES:
                raise ValueError(
                    f"simulate.tool_calls is {size} bytes as JSON; the limit is {MAX_SCRIPTED_CALLS_BYTES}"
                )
        return script


class AgentParams(BaseModel):
    """The ``with:`` of an ``agent`` step. ``prompt`` and ``system`` are sandboxed Jinja templates.

    Attributes:
        prompt: The task, the conversation's first user message.
        system: The system prompt.
        model: The model.
        max_tokens: Upper bound on each turn's output tokens.
        tools: The tools the model may call, by name (see :func:`check_tool_name`).
        max_turns: The most model calls; the step fails ``max_turns`` (never retried) if the model has not ended
            its turn by then.
        tool_timeout_s: Seconds one tool call may take (the step's ``timeout_s`` bounds the whole loop).
        simulate: Offline-provider directives, ``tool_calls`` scripting each turn.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=200_000)
    system: str | None = Field(default=None, max_length=100_000)
    model: str = Field(default="claude-haiku-4-5", min_length=1, max_length=100)
    max_tokens: int = Field(default=1024, ge=1, le=64_000)
    tools: tuple[Annotated[str, Field(min_length=1, max_length=120)], ...] = Field(default=(), max_length=MAX_TOOLS)
    max_turns: int = Field(default=8, ge=1, le=MAX_TURNS)
    tool_timeout_s: float = Field(default=30.0, gt=0, le=MAX_TOOL_TIMEOUT_S)
    simulate: AgentSimulateSpec | None = None
    stream: bool = False

    @field_validator("tools")
    @classmethod
    def _tool_names(cls, tools: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for name in tools:
            check_tool_name(name)
            if name in seen:
                raise ValueError(f"lists tool {name!r} twice")
            seen.add(name)
        return tools

    @model_validator(mode="after")
    def _scripted_tools_offered(self) -> AgentParams:
        if self.simulate is not None and self.simulate.tool_calls is not None:
            for turn in self.simulate.tool_calls:
                for call in turn:
                    if call.name not in self.tools:
                        raise ValueError(f"simulate.tool_calls calls {call.name[:120]!r}, which is not in tools")
        return self
