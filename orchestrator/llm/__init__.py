"""LLM providers behind one contract: the Anthropic SDK against the real service, or the offline provider.

Both are the same SDK client; the offline one answers from an in-process transport (see :mod:`.offline`).
"""

from __future__ import annotations

from orchestrator.llm.anthropic import AnthropicClient, classify_error
from orchestrator.llm.base import LLMClient, LLMRequest, LLMResponse, LLMUsage
from orchestrator.llm.offline import OfflineClient, OfflineMessagesAPI
from orchestrator.llm.structured import STRUCTURED_OUTPUT_MARKER, parse_structured, structured_output_instruction

__all__ = [
    "STRUCTURED_OUTPUT_MARKER",
    "AnthropicClient",
    "LLMClient",
    "LLMRequest",
    "LLMResponse",
    "LLMUsage",
    "OfflineClient",
    "OfflineMessagesAPI",
    "classify_error",
    "make_llm_client",
    "parse_structured",
    "structured_output_instruction",
]


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
        return AnthropicClient(api_key=api_key, base_url=base_url, timeout_s=timeout_s)
    return OfflineClient(timeout_s=timeout_s)
