"""What LLM calls cost: a price table per model, and cost estimates made before a call.

Prices are US dollars per million tokens. The defaults are Anthropic's list prices for current Claude models;
``ORCH_LLM_PRICES`` (a JSON object ``{"MODEL": {"input": X, "output": Y}}``) overrides or extends them. A model id
matches the longest entry it starts with, so dated ids (``claude-sonnet-4-5-20250929``) find their family's price.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from orchestrator.errors import OrchestratorError

__all__ = ["DEFAULT_PRICES", "Price", "PriceTable", "estimate_input_tokens"]


@dataclass(frozen=True)
class Price:
    """Dollars per million tokens.

    Attributes:
        input: Input tokens.
        output: Output tokens.
        cache_write: Input tokens written to the prompt cache (1.25x input by default).
        cache_read: Input tokens read from the prompt cache (0.1x input by default).
    """

    input: float
    output: float
    cache_write: float | None = None
    cache_read: float | None = None

    def cost(
        self, input_tokens: int, output_tokens: int, cache_write_tokens: int = 0, cache_read_tokens: int = 0
    ) -> float:
        """Dollars for these token counts."""
        write = self.cache_write if self.cache_write is not None else self.input * 1.25
        read = self.cache_read if self.cache_read is not None else self.input * 0.1
        total = (
            input_tokens * self.input
            + output_tokens * self.output
            + cache_write_tokens * write
            + cache_read_tokens * read
        )
        return total / 1_000_000


DEFAULT_PRICES: Final[Mapping[str, Price]] = MappingProxyType(
    {
        "claude-opus-4-5": Price(5.0, 25.0),
        "claude-opus-4-1": Price(15.0, 75.0),
        "claude-opus-4": Price(15.0, 75.0),
        "claude-sonnet-4-5": Price(3.0, 15.0),
        "claude-sonnet-4": Price(3.0, 15.0),
        "claude-3-7-sonnet": Price(3.0, 15.0),
        "claude-haiku-4-5": Price(1.0, 5.0),
        "claude-3-5-haiku": Price(0.8, 4.0),
        "claude-3-haiku": Price(0.25, 1.25),
    }
)


class PriceTable:
    """Prices by model id, matched by longest prefix.

    Args:
        prices: Model id (or id prefix) to price.
    """

    def __init__(self, prices: Mapping[str, Price] = DEFAULT_PRICES) -> None:
        # Longest first, so "claude-opus-4-1" wins over "claude-opus-4" for "claude-opus-4-1-20250805".
        self._prices = dict(sorted(prices.items(), key=lambda item: -len(item[0])))

    @classmethod
    def from_json(cls, raw: str | None) -> PriceTable:
        """The defaults, overridden by ``raw`` (the ``ORCH_LLM_PRICES`` JSON), if given.

        Raises:
            OrchestratorError: ``raw`` is not an object of ``{"input": number, "output": number}`` entries.
        """
        prices = dict(DEFAULT_PRICES)
        if raw:
            try:
                parsed = json.loads(raw)
                if not isinstance(parsed, dict):
                    raise TypeError("expected a JSON object")
                prices.update({str(model): _price(entry) for model, entry in parsed.items()})
            except (TypeError, ValueError) as exc:
                raise OrchestratorError(
                    f'ORCH_LLM_PRICES: {exc}; expected {{"MODEL": {{"input": USD_PER_MTOK, "output": USD_PER_MTOK}}}}'
                ) from None
        return cls(prices)

    def price(self, model: str) -> Price | None:
        """The price of ``model``, or ``None`` when no entry matches."""
        for prefix, price in self._prices.items():
            if model == prefix or model.startswith(prefix + "-") or model.startswith(prefix + "@"):
                return price
        return None

    def cost(self, model: str, usage: Mapping[str, Any]) -> float | None:
        """Dollars for a reply's ``usage``; ``None`` for a model without a price."""
        price = self.price(model)
        if price is None:
            return None
        return price.cost(
            int(usage.get("input_tokens") or 0),
            int(usage.get("output_tokens") or 0),
            int(usage.get("cache_creation_input_tokens") or 0),
            int(usage.get("cache_read_input_tokens") or 0),
        )

    def worst_case(self, model: str, input_tokens: int, max_tokens: int) -> float:
        """The most a call can cost: estimated input plus every output token allowed.

        A model without a price is priced as the dearest one known, so a budget still holds.
        """
        price = self.price(model) or max(self._prices.values(), key=lambda p: p.input + p.output)
        return price.cost(input_tokens, max_tokens)


def estimate_input_tokens(*texts: str | None) -> int:
    """A cautious input-token estimate before a call: one token per 3 characters, plus the message framing."""
    chars = sum(len(text) for text in texts if text)
    return math.ceil(chars / 3) + 8


def _price(entry: Any) -> Price:
    if not isinstance(entry, dict) or not {"input", "output"} <= entry.keys():
        raise TypeError(f"price entry {entry!r} needs 'input' and 'output'")
    values = {k: float(entry[k]) for k in ("input", "output", "cache_write", "cache_read") if k in entry}
    if any(v < 0 or not math.isfinite(v) for v in values.values()):
        raise ValueError(f"price entry {entry!r} has a negative or non-finite price")
    return Price(**values)
