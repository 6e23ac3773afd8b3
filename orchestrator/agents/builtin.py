"""The built-in tools: ``calculator``, the run's notes (``notes.read``, ``notes.write``), and ``workflow:NAME``.

``calculator`` walks the expression's syntax tree (numbers, ``+ - * / // % **``, parentheses): never ``eval``, and
bounded in length, size, exponent and result. The notes are a blackboard shared by the agents of one run (a hash
beside the run's, expiring with it). ``workflow:NAME`` runs a child workflow as the tool call: the seam where child
runs plug in; until they exist it answers with an error result.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from collections.abc import Callable
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.agents.tools import Tool, ToolContext, make_tool
from orchestrator.definition.agent import WORKFLOW_TOOL_PREFIX

__all__ = ["MAX_EXPRESSION_CHARS", "MAX_NOTE_BYTES", "builtin_tool", "evaluate_arithmetic"]

MAX_EXPRESSION_CHARS: Final = 1000
MAX_EXPRESSION_NODES: Final = 200
MAX_EXPONENT: Final = 1000
MAX_MAGNITUDE: Final = 10**300
MAX_NOTE_BYTES: Final = 65_536
"""The largest note value, as compact JSON."""

_BINARY: Final[dict[type[ast.operator], Callable[[Any, Any], Any]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: Final[dict[type[ast.unaryop], Callable[[Any], Any]]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate_arithmetic(expression: str) -> int | float:
    """The value of an arithmetic expression.

    Raises:
        ValueError: Not arithmetic, too long or large, a division by zero, or an exponent past the bound.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is {len(expression)} characters; the limit is {MAX_EXPRESSION_CHARS}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression[:100]!r}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_EXPRESSION_NODES:
        raise ValueError(f"the expression has more than {MAX_EXPRESSION_NODES} parts")
    return _value(tree.body)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _bounded(_UNARY[type(node.op)](_value(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and (
            abs(right) > MAX_EXPONENT or (abs(left) > 1 and abs(right) * math.log10(abs(left)) > 300)
        ):
            raise ValueError(f"the power {left!r} ** {right!r} is too large")
        try:
            return _bounded(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("the result is too large") from None
    raise ValueError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")


def _bounded(value: Any) -> int | float:
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > MAX_MAGNITUDE:
        raise ValueError("the result is too large")
    return value  # type: ignore[no-any-return]  # int or float by the checks above


class CalculatorInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expression: str = Field(min_length=1, max_length=MAX_EXPRESSION_CHARS, examples=["6 * 7"])


def calculator(value: CalculatorInput) -> dict[str, Any]:
    """Evaluate an arithmetic expression (numbers, + - * / // % ** and parentheses) and return its result."""
    return {"result": evaluate_arithmetic(value.expression)}


class NoteKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=200, examples=["findings"])


class NoteWrite(NoteKey):
    value: Any = Field(examples=["a finding worth sharing"])


def notes_read(key: str, ctx: ToolContext) -> dict[str, Any]:
    """Read a note from the run's shared notes (written by any agent of this run); null when nobody wrote it."""
    NoteKey(key=key)
    raw = ctx.store.read_note(ctx.run_id, key)
    return {"value": None if raw is None else json.loads(raw)}


def notes_write(key: str, value: Any, ctx: ToolContext) -> dict[str, Any]:
    """Write a note (any JSON value) under a key in the run's shared notes, for the run's other agents to read."""
    NoteKey(key=key)
    body = json.dumps(value, separators=(",", ":"))
    if len(body.encode()) > MAX_NOTE_BYTES:
        raise ValueError(f"the note is {len(body.encode())} bytes as JSON; the limit is {MAX_NOTE_BYTES}")
    ctx.store.write_note(ctx.run_id, key, body)
    return {"ok": True}


class WorkflowToolInput(BaseModel):
    model_config = ConfigDict(extra="allow")

    inputs: dict[str, Any] = Field(default_factory=dict, description="The child workflow's inputs")


def _workflow_tool(name: str) -> Tool:
    workflow = name.removeprefix(WORKFLOW_TOOL_PREFIX)

    def run_child(value: WorkflowToolInput) -> Any:
        # The seam for child runs (``uses: workflow``): until the engine can start one and wait for it, say so.
        raise NotImplementedError("workflow tools are not available yet")

    return make_tool(
        run_child, name=f"workflow_{workflow}", description=f"Delegate to the workflow {workflow!r}: run it with inputs"
    )


_BUILTINS: Final[dict[str, Tool]] = {
    "calculator": make_tool(calculator),
    "notes.read": make_tool(notes_read, name="notes.read"),
    "notes.write": make_tool(notes_write, name="notes.write"),
}


def builtin_tool(name: str) -> Tool | None:
    """The built-in tool of that name (``workflow:NAME`` included), or ``None``."""
    if name.startswith(WORKFLOW_TOOL_PREFIX):
        entry = _workflow_tool(name)
        return Tool(name, entry.description, entry.input_schema, entry.fn, entry.model, False, True)
    return _BUILTINS.get(name)
