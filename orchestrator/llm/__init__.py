"""LLM providers behind one contract: the Anthropic SDK against the real service, or the offline provider.

Both are the same SDK client; the offline one answers from an in-process transport (see :mod:`.offline`). The
providers are imported on first use: the SDK takes a second to import, and producers and the CLI never need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.llm.base import LLMClient, LLMRequest, LLMResponse, LLMUsage
from orchestrator.llm.structured import STRUCTURED_OUTPUT_MARKER, parse_structured, structured_output_instruction

if TYPE_CHECKING:
    from orchestrator.llm.anthropic import AnthropicClient, classify_error
    from orchestrator.llm.offline import OfflineClient, OfflineMessagesAPI

__all__ = [
    # the contract
    "LLMClient",
    "LLMRequest",
    "LLMResponse",
    "LLMUsage",
    "make_llm_client",
    # providers
    "AnthropicClient",
    "OfflineClient",
    "OfflineMessagesAPI",
    "classify_error",
    # structured output
    "STRUCTURED_OUTPUT_MARKER",
    "parse_structured",
    "structured_output_instruction",
]

_LAZY = {
    "AnthropicClient": "orchestrator.llm.anthropic",
    "classify_error": "orchestrator.llm.anthropic",
    "OfflineClient": "orchestrator.llm.offline",
    "OfflineMessagesAPI": "orchestrator.llm.offline",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def make_llm_client(api_key: str | None, base_url: str | None = None, timeout_s: float = 120.0) -> LLMClient:
    """Build the client the settings ask for.

    Args:
        api_key: The Anthropic API key; when empty or ``None`` the offline provider answers instead.
        base_url: The API root for the real service (ignored offline); ``None`` means the SDK's default.
        timeout_s: Default per-call timeout in seconds.

    Returns:
        An :class:`AnthropicClient` when ``api_key`` is set, else an :class:`OfflineClient`.
    """
    if api_key:
        from orchestrator.llm.anthropic import AnthropicClient

        return AnthropicClient(api_key=api_key, base_url=base_url, timeout_s=timeout_s)
    from orchestrator.llm.offline import OfflineClient

    return OfflineClient(timeout_s=timeout_s)
