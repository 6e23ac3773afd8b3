"""The LLM client contract every provider implements.

A client makes exactly one provider call per :meth:`LLMClient.complete` (no hidden retries: Celery's autoretry owns
retrying, so every attempt shows in Redis and Flower) and raises only
:class:`~orchestrator.errors.RetryableStepError` or :class:`~orchestrator.errors.NonRetryableStepError`. Given an
``on_text`` callback, the call streams: each piece of text is passed to it as it arrives, and the pieces concatenate
to the response's ``text``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

TextCallback: TypeAlias = Callable[[str], None]
"""Receives each piece of a streamed reply's text, in order (see :meth:`LLMClient.complete`)."""


@dataclass(frozen=True)
class LLMRequest:
    """One call to a model.

    Attributes:
        model: Provider model id, e.g. ``claude-haiku-4-5``.
        prompt: The rendered user message.
        max_tokens: Upper bound on output tokens.
        system: Optional system prompt.
        temperature: Optional sampling temperature.
        attempt: 1-based attempt number of the step (the offline provider scripts failures by it).
        simulate: Offline-provider directives (``latency_s``, ``errors``); ignored by real providers.
        timeout_s: Per-call timeout in seconds.
        messages: A whole conversation (Messages API ``messages``) sent instead of ``prompt`` alone: an agent's turns,
            with its ``tool_use`` and ``tool_result`` blocks.
        tools: Tool definitions (Messages API ``tools``: ``name``, ``description``, ``input_schema``).
    """

    model: str
    prompt: str
    max_tokens: int = 1024
    system: str | None = None
    temperature: float | None = None
    attempt: int = 1
    simulate: dict[str, Any] | None = None
    timeout_s: float = 120.0
    messages: tuple[dict[str, Any], ...] | None = None
    tools: tuple[dict[str, Any], ...] | None = None

    @property
    def input_text(self) -> str:
        """What the model reads besides the system prompt: the prompt, or the conversation and tools as JSON."""
        if self.messages is None and self.tools is None:
            return self.prompt
        return json.dumps([self.messages, self.tools], separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class LLMUsage:
    """Tokens billed for one call (prompt-cache reads and writes apart from plain input)."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts, omitting prompt-cache ones that are zero."""
        out = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        if self.cache_creation_input_tokens:
            out["cache_creation_input_tokens"] = self.cache_creation_input_tokens
        if self.cache_read_input_tokens:
            out["cache_read_input_tokens"] = self.cache_read_input_tokens
        return out


@dataclass(frozen=True)
class LLMResponse:
    """What a model answered.

    ``content`` holds the reply's content blocks as JSON (``text`` and ``tool_use``) when it holds more than text,
    as an agent's turns do; ``text`` joins the text blocks either way.
    """

    text: str
    model: str
    usage: LLMUsage
    stop_reason: str | None = None
    request_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    content: tuple[dict[str, Any], ...] = ()


class LLMClient(Protocol):
    """A provider of completions."""

    def complete(self, request: LLMRequest, on_text: TextCallback | None = None) -> LLMResponse:
        """Make one call; with ``on_text``, stream it, passing each piece of text to ``on_text`` as it arrives.

        A streamed call that fails midway raises as an unstreamed one would; the text already passed on is then
        not part of any response.

        Raises:
            RetryableStepError: 408, 409, 429, 5xx, 529, connection errors and timeouts (``retry_after`` set from
                the provider's header when it sent one).
            NonRetryableStepError: 400, 401, 403, 404, 413 and any other client error.
        """
        ...
