"""How the offline provider plays an agent: a request that offers ``tools`` gets ``tool_use`` turns, then an answer.

With ``simulate.tool_calls`` (one list of ``{name, input}`` per turn), turn N calls the tools of list N, and the first
turn past the script (or with an empty list) answers. Without a script, the first turn calls each offered tool once,
with an input synthesised from its ``input_schema``, and the second answers. A turn's number is the number of
assistant messages in the conversation plus one, so a replayed conversation gets the same reply.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.llm.synthetic import example

__all__ = ["agent_tool_uses", "conversation_text"]


def agent_tool_uses(
    tools: Sequence[Mapping[str, Any]],
    messages: Sequence[Mapping[str, Any]],
    simulate: Mapping[str, Any],
    digest: bytes,
) -> list[dict[str, Any]]:
    """The ``tool_use`` blocks this turn answers with (none: the turn ends with text).

    Raises:
        ValueError: ``simulate.tool_calls`` is not a list of lists of ``{name, input}`` objects.
    """
    turn = sum(1 for m in messages if isinstance(m, Mapping) and m.get("role") == "assistant") + 1
    script = simulate.get("tool_calls")
    if script is not None:
        if not isinstance(script, list) or not all(isinstance(calls, list) for calls in script):
            raise ValueError("simulate.tool_calls must be a list of lists of {name, input}")
        planned = script[turn - 1] if turn <= len(script) else []
        calls = [_scripted(call) for call in planned]
    elif turn == 1:
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        calls = [
            (str(t.get("name")), example(t.get("input_schema", {}), t.get("input_schema", {}), rng, 0)) for t in tools
        ]
    else:
        calls = []
    return [
        {"type": "tool_use", "id": _tool_use_id(digest, index), "name": name, "input": tool_input}
        for index, (name, tool_input) in enumerate(calls)
    ]


def _scripted(call: Any) -> tuple[str, Any]:
    if not isinstance(call, Mapping) or not isinstance(call.get("name"), str):
        raise ValueError(f"simulate.tool_calls: each call is {{name, input}}, not {call!r}")
    return call["name"], call.get("input", {})


def _tool_use_id(digest: bytes, index: int) -> str:
    return "toolu_offline_" + hashlib.sha256(digest + index.to_bytes(2, "big")).hexdigest()[:20]


def conversation_text(messages: Sequence[Any]) -> str:
    """Every message's text, tool calls and tool results included, so each turn reads (and is answered) apart."""
    return "\n\n".join(_block_text(m.get("content")) for m in messages if isinstance(m, Mapping))


def _block_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = []
    for block in content:
        if not isinstance(block, Mapping):
            continue
        if "text" in block:
            parts.append(str(block["text"]))
        elif block.get("type") == "tool_use":
            parts.append(f"[called {block.get('name')} with {json.dumps(block.get('input'), sort_keys=True)}]")
        elif block.get("type") == "tool_result":
            parts.append(f"[result: {_block_text(block.get('content'))}]")
    return "\n".join(parts)
