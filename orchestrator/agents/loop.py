"""The agent loop: model turns through the LLM gateway, tool calls journaled under the step, until the model ends.

Each turn sends the conversation so far (with the tools) through :func:`call_turn`, the one place a turn is asked.
Its reply's ``tool_use`` blocks run the tools, and their results go back as ``tool_result`` blocks in the next turn.
Every turn and every tool call is journaled under the step, fenced by the attempt like a finish, before the next
turn: a worker killed mid-loop leaves a journal the next attempt replays. A replayed turn sends the same
conversation, so the reply cache answers it (no turn is paid twice); a finished tool call's result is read back from
the journal (no finished call runs twice); a call that started but did not finish runs again only when its tool is
``idempotent``, else the model is told it was interrupted. ``resume --from`` starts the loop afresh (journal entries
of earlier generations are ignored and replies are not taken from the cache).

With ``stream: true`` each turn's text streams into the attempt's :class:`~orchestrator.engine.deltas.AttemptStream`.
The step's output ``text`` is the last turn's, so a turn after one that streamed text starts with an ``llm_reset``:
what a client shows after the last reset is the output ``text``. A turn answered from the reply cache streams as one
delta, like a cached ``llm`` reply.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from orchestrator.agents.builtin import builtin_tool
from orchestrator.agents.tools import Tool, ToolContext, ToolInputError, api_name, tools
from orchestrator.definition.agent import AgentParams
from orchestrator.definition.spec import StepSpec
from orchestrator.domain import Attempt
from orchestrator.engine.outage import Doing, retry_through_outage
from orchestrator.engine.runtime import Runtime
from orchestrator.engine.steps import StepContext
from orchestrator.errors import NonRetryableStepError, RetryableStepError, StepDeferred, StepError
from orchestrator.llm.base import LLMRequest
from orchestrator.llm.gateway import CallContext, GatewayReply

__all__ = [
    "EVENT_TEXT_CHARS",
    "EVENT_VALUE_CHARS",
    "MAX_TOOL_RESULT_BYTES",
    "AgentStepError",
    "call_turn",
    "resolve_tools",
    "run_agent",
]

MAX_TOOL_RESULT_BYTES = 65_536
"""The largest tool result sent back to the model, as JSON; a larger one is an error result."""
_MAX_TRANSCRIPT_CALLS = 50
_CALLS_PER_TURN = 1000
"""A call's ordinal is ``turn * _CALLS_PER_TURN + position``: unique while a turn asks fewer calls than this."""
EVENT_TEXT_CHARS = 2000
"""A turn's text in its ``agent_turn`` event is cut to this many characters (the output holds the whole text)."""
EVENT_VALUE_CHARS = 500
"""A tool call's input and result in events are cut, as JSON text, to this many characters."""


class AgentStepError(NonRetryableStepError):
    """An agent step failed for good; its transcript so far is kept in the step's error record."""

    def __init__(self, message: str, *, kind: str, transcript: dict[str, Any], status_code: int | None = None):
        super().__init__(message, kind=kind, status_code=status_code)
        self.transcript = transcript

    def to_record(self) -> Any:
        """The error record, with ``transcript``."""
        record = super().to_record()
        record["transcript"] = self.transcript
        return record


def resolve_tools(names: tuple[str, ...]) -> dict[str, Tool]:
    """The step's tools by their Messages API name.

    Raises:
        NonRetryableStepError: ``unknown_tool`` when a name is not built in or registered on this worker; two names
            that the API spells alike.
    """
    found: dict[str, Tool] = {}
    for name in names:
        entry = builtin_tool(name) or tools.get(name)
        if entry is None:
            raise NonRetryableStepError(
                f"no tool {name!r} on this worker (register it with @orchestrator.tool, module in ORCH_IMPORTS)",
                kind="unknown_tool",
            )
        spelled = api_name(entry.name if not name.startswith("workflow:") else f"workflow_{name[9:]}")
        if spelled in found:
            raise NonRetryableStepError(
                f"tools {found[spelled].name!r} and {name!r} clash as {spelled!r}", kind="unknown_tool"
            )
        found[spelled] = entry
    return found


def call_turn(
    runtime: Runtime, request: LLMRequest, call: CallContext, on_text: Callable[[str], None] | None = None
) -> GatewayReply:
    """Ask the model one turn through the gateway (budget, limits, reply cache), streaming its text into ``on_text``."""
    # Passed only when streaming: gateways written before streaming take no ``on_text``.
    streaming = {"on_text": on_text} if on_text is not None else {}
    return runtime.executor.llm.complete(request, call, **streaming)


@dataclass
class _Transcript:
    turns: int = 0
    text: str = ""
    stop_reason: str | None = None
    usage: dict[str, int] = field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0})
    cost_usd: float | None = 0.0
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def add(self, reply: GatewayReply) -> None:
        self.turns += 1
        self.usage["input_tokens"] += reply.response.usage.input_tokens
        self.usage["output_tokens"] += reply.response.usage.output_tokens
        self.cost_usd = None if self.cost_usd is None or reply.cost_usd is None else self.cost_usd + reply.cost_usd
        self.stop_reason = reply.response.stop_reason
        self.text = reply.response.text

    def output(self, model: str) -> dict[str, Any]:
        return {
            "text": self.text,
            "turns": self.turns,
            "tool_calls": self.tool_calls,
            "usage": dict(self.usage),
            "cost_usd": self.cost_usd,
            "stop_reason": self.stop_reason,
            "model": model,
        }


@dataclass
class _Loop:
    runtime: Runtime
    step: StepSpec
    params: AgentParams
    attempt: Attempt
    ctx: StepContext
    key: str
    journal: dict[str, dict[str, Any]]
    deadline: float | None
    transcript: _Transcript = field(default_factory=_Transcript)

    def record(self, entry_id: str, entry: dict[str, Any], event: str = "", data: dict[str, Any] | None = None) -> None:
        body = json.dumps({**entry, "gen": self.attempt.generation, "key": self.key}, separators=(",", ":"))
        event_data = json.dumps(data, separators=(",", ":")) if data is not None else ""
        recorded = retry_through_outage(
            Doing(self.attempt, f"journal {entry_id}"),
            lambda: self.runtime.store.record_journal_entry(
                self.attempt, entry_id, body, event=event, event_data=event_data
            ),
            patience_s=self.runtime.settings.outage_patience_s,
        )
        if not recorded:
            # The step is no longer ours (cancelled, or re-queued by the sweeper): stop; the finish is refused too.
            raise NonRetryableStepError(f"{self.attempt}: the step is no longer this attempt's", kind="stale")
        self.journal[entry_id] = {**entry, "gen": self.attempt.generation, "key": self.key}

    def time_left(self) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RetryableStepError(f"step exceeded its timeout of {self.step.timeout_s}s", kind="timeout")
        return left

    def run_call(self, turn: int, position: int, use: dict[str, Any], toolset: dict[str, Tool]) -> dict[str, Any]:
        """One ``tool_use`` (the turn's ``position``-th) → its ``tool_result`` block, from the journal when it
        finished before."""
        call_id, entry_id = str(use.get("id")), f"call:{use.get('id')}"
        entry = toolset.get(str(use.get("name")))
        name = entry.name if entry is not None else str(use.get("name"))
        seen = self.journal.get(entry_id)
        if seen is not None and seen.get("status") == "done":
            result, is_error = seen["content"], bool(seen.get("is_error"))
        elif seen is not None and entry is not None and not entry.idempotent:
            result, is_error = f"the call to {name!r} was interrupted (its worker was lost) and is not run again", True
            self.finish_call(turn, call_id, name, (result, is_error))
        else:
            if seen is None:
                self.record(entry_id, {"status": "started", "turn": turn, "name": name})
            result, is_error = self.invoke(entry, name, (call_id, turn * _CALLS_PER_TURN + position), use.get("input"))
            self.finish_call(turn, call_id, name, (result, is_error))
        record: dict[str, Any] = {"id": call_id, "name": name, "input": use.get("input")}
        record["error" if is_error else "output"] = result if is_error else json.loads(result)
        self.transcript.tool_calls.append(record)
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id, "content": result}
        if is_error:
            block["is_error"] = True
        return block

    def finish_call(self, turn: int, call_id: str, name: str, outcome: tuple[str, bool]) -> None:
        result, is_error = outcome
        entry = {"status": "done", "turn": turn, "name": name, "content": result, "is_error": is_error}
        data = {"turn": turn, "id": call_id, "name": name, "error": is_error, "result": _cut(result, EVENT_VALUE_CHARS)}
        self.record(f"call:{call_id}", entry, "tool_call", data)

    def invoke(self, entry: Tool | None, name: str, call: tuple[str, int], raw: Any) -> tuple[str, bool]:
        """Validate and run one call (its id and ordinal) with the per-call timeout: (the result's text, whether it
        is an error)."""
        if entry is None:
            return f"there is no tool {name!r}; the tools are: {', '.join(self.params.tools)}", True
        try:
            value = entry.validate(raw)
        except ToolInputError as exc:
            return str(exc), True
        left = self.time_left()
        timeout = self.params.tool_timeout_s if left is None else min(self.params.tool_timeout_s, left)
        call_id, index = call
        context = ToolContext(
            self.attempt.run_id,
            self.attempt.step,
            self.ctx.attempt,
            call_id,
            self.runtime.store,
            runtime=self.runtime,
            index=index,
            timeout_s=timeout,
        )
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tool-{self.attempt.step}")
        try:
            output = pool.submit(entry.call, value, context).result(timeout=timeout)
        except FutureTimeout:
            return f"the tool {name!r} did not finish within {timeout:.1f}s", True
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}", True
        finally:
            # A tool past its timeout cannot be stopped from outside: its thread is left to finish on its own.
            pool.shutdown(wait=False)
        try:
            text = json.dumps(output, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            return f"the tool {name!r} returned something that is not JSON: {exc}", True
        if len(text.encode()) > MAX_TOOL_RESULT_BYTES:
            return f"the tool {name!r} returned {len(text.encode())} bytes; the limit is {MAX_TOOL_RESULT_BYTES}", True
        return text, False

    def failed(self, message: str, kind: str, status_code: int | None = None) -> AgentStepError:
        transcript = self.transcript.output(self.params.model)
        transcript["tool_calls"] = transcript["tool_calls"][-_MAX_TRANSCRIPT_CALLS:]
        return AgentStepError(message, kind=kind, transcript=transcript, status_code=status_code)


def run_agent(
    runtime: Runtime, step: StepSpec, attempt: Attempt, ctx: StepContext, call: CallContext, *, key: str, force: bool
) -> dict[str, Any]:
    """Run an agent step's loop in this attempt, replaying what earlier attempts journaled, and return its output.

    Raises:
        AgentStepError: ``max_turns`` (the model never ended its turn), or a permanent failure of a turn (a spent
            budget, a refused request), with the transcript so far.
        NonRetryableStepError: ``unknown_tool`` and the prompt's own errors.
        RetryableStepError: A turn's transient failure, or the step's timeout (the next attempt replays).
        StepDeferred: A turn must wait for a shared rate limit (likewise).
    """
    params = step.params
    assert isinstance(params, AgentParams), f"step {step.name!r} is not an agent"
    deadline = time.monotonic() + step.timeout_s if step.timeout_s else None
    prompt, system = runtime.executor.render_prompt(params.prompt, params.system, ctx, deadline)
    toolset = resolve_tools(params.tools)
    definitions = tuple(entry.definition(spelled) for spelled, entry in toolset.items())
    loop = _Loop(runtime, step, params, attempt, ctx, key, _journal(runtime, attempt, key, force), deadline)
    simulate = _simulate(params, toolset)
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    stream = runtime.executor.attempt_stream(ctx, attempt.index) if params.stream else None
    with stream if stream is not None else contextlib.nullcontext():
        for turn in range(1, params.max_turns + 1):
            if stream is not None and turn > 1:
                # The output text is the last turn's: a turn's text replaces what earlier turns streamed.
                stream.reset()
            request = LLMRequest(
                model=params.model,
                prompt=prompt,
                max_tokens=params.max_tokens,
                system=system,
                attempt=ctx.attempt,
                simulate=simulate,
                timeout_s=loop.time_left() or runtime.executor.llm_timeout_s,
                messages=tuple(messages),
                tools=definitions or None,
            )
            try:
                reply = call_turn(runtime, request, call, stream.on_text if stream is not None else None)
            except (StepDeferred, RetryableStepError):
                raise
            except StepError as exc:
                raise loop.failed(f"agent turn {turn}: {exc}", exc.kind, exc.status_code) from None
            if stream is not None:
                stream.flush()
            loop.transcript.add(reply)
            content = list(reply.response.content) or [{"type": "text", "text": reply.response.text}]
            uses = [block for block in content if block.get("type") == "tool_use"]
            if f"turn:{turn}" not in loop.journal:
                data = {
                    "turn": turn,
                    "stop_reason": reply.response.stop_reason,
                    "tool_calls": len(uses),
                    "text": _cut(reply.response.text, EVENT_TEXT_CHARS),
                    "calls": [_call_preview(use, toolset) for use in uses],
                }
                loop.record(
                    f"turn:{turn}",
                    {"stop_reason": reply.response.stop_reason},
                    "agent_turn",
                    {**data, "cached": reply.cached},
                )
            if not uses or reply.response.stop_reason != "tool_use":
                return loop.transcript.output(params.model)
            messages.append({"role": "assistant", "content": content})
            if call.outbox is not None:
                # Tools can take long and start child runs, whose budget is what this run has left: the turn is
                # settled before they run, not with the next turn's open.
                call.outbox.flush()
            messages.append(
                {"role": "user", "content": [loop.run_call(turn, n, use, toolset) for n, use in enumerate(uses)]}
            )
        raise loop.failed(
            f"step {step.name!r}: the model did not end its turn within max_turns={params.max_turns}", "max_turns"
        )


def _cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit - 1`` characters and an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _call_preview(use: dict[str, Any], toolset: dict[str, Tool]) -> dict[str, Any]:
    """A ``tool_use`` block as an ``agent_turn`` event tells it: its id, the tool's name as written, its input cut."""
    entry = toolset.get(str(use.get("name")))
    name = entry.name if entry is not None else str(use.get("name"))
    raw = json.dumps(use.get("input"), separators=(",", ":"), default=str)
    return {"id": str(use.get("id")), "name": name, "input": _cut(raw, EVENT_VALUE_CHARS)}


def _journal(runtime: Runtime, attempt: Attempt, key: str, force: bool) -> dict[str, dict[str, Any]]:
    """The entries this attempt replays: its generation's, or an earlier one's under the same result key unless
    ``resume --from`` named the step."""
    raw = retry_through_outage(
        Doing(attempt, "read its journal"),
        lambda: runtime.store.journal(attempt.run_id, attempt.step),
        patience_s=runtime.settings.outage_patience_s,
    )
    kept = {}
    for entry_id, body in raw.items():
        entry = json.loads(body)
        if entry.get("gen") == attempt.generation or (not force and entry.get("key") == key):
            kept[entry_id] = entry
    return kept


def _simulate(params: AgentParams, toolset: dict[str, Tool]) -> dict[str, Any] | None:
    """The offline provider's directives, scripted tool names spelled as the API sees them."""
    if params.simulate is None:
        return None
    simulate = params.simulate.model_dump(exclude_none=True)
    if params.simulate.tool_calls is not None:
        spelled = {entry.name: name for name, entry in toolset.items()}
        simulate["tool_calls"] = [
            [{"name": spelled.get(c.name, api_name(c.name)), "input": c.input} for c in turn]
            for turn in params.simulate.tool_calls
        ]
    return simulate
