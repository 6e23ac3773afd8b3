"""Quantiles, medians and latency summaries, the same for every benchmark."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linear interpolation between closest ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: Iterable[float | None]) -> float:
    """The median of the values that are neither ``None`` nor NaN; NaN when none is left."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    """Count, p50/p90/p99, min, max and mean of ``values_s`` (seconds), in milliseconds (NaN when empty)."""
    if not values_s:
        return {"n": 0, **dict.fromkeys(("p50", "p90", "p99", "min", "max", "mean"), math.nan)}
    ordered = sorted(values_s)
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 0.50) * 1e3,
        "p90": percentile(ordered, 0.90) * 1e3,
        "p99": percentile(ordered, 0.99) * 1e3,
        "min": ordered[0] * 1e3,
        "max": ordered[-1] * 1e3,
        "mean": statistics.fmean(ordered) * 1e3,
    }


def medians(reps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-key medians of repetitions' result dicts: numbers, and the numbers of nested dicts one level down."""
    out: dict[str, Any] = {}
    if not reps:
        return out
    for key, value in reps[0].items():
        if isinstance(value, bool):
            continue
        if isinstance(value, Mapping):
            out[key] = {k: median(r[key].get(k, math.nan) for r in reps) for k in value}
        elif isinstance(value, int | float):
            out[key] = median(r[key] for r in reps)
    return out


def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """``after - before`` per key of ``after`` (a counter missing before counts from 0)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}
