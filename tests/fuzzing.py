"""Hypothesis settings shared by the fuzz tests, scaled by ``ORCH_FUZZ_SCALE``.

The suite runs a quarter of each fuzzer's full case count (at least 10) so it stays within its time budget; the
full-size run is ``bash scripts/fuzz.sh`` (``ORCH_FUZZ_SCALE=1``), and a larger scale fuzzes longer still.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings


def fuzz_scale() -> float:
    """``ORCH_FUZZ_SCALE`` as a positive number (default 0.25); anything else fails with the value named."""
    text = os.environ.get("ORCH_FUZZ_SCALE", "0.25")
    try:
        scale = float(text)
    except ValueError:
        scale = 0.0
    if not 0 < scale <= 100:
        raise ValueError(f"ORCH_FUZZ_SCALE={text!r} must be a number in (0, 100]")
    return scale


def fuzz_examples(full: int) -> int:
    """How many cases a fuzzer whose full size is ``full`` runs at the current scale (at least 10, or ``full``)."""
    return max(min(full, 10), round(full * fuzz_scale()))


def fuzz(full: int, **extra: Any) -> Any:
    """Settings for a fuzzer of ``full`` cases at full size: no deadline (the first parse imports lazily), no example
    database, blobs printed to reproduce a failure."""
    options: dict[str, Any] = {
        "deadline": None,
        "database": None,
        "print_blob": True,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    }
    return settings(max_examples=fuzz_examples(full), **{**options, **extra})
