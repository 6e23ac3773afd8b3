"""Small pieces the benchmark scripts share: quantiles, number formatting, JSON output, versions, timestamps."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import redis


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1), linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def versions(url: str) -> dict[str, Any]:
    """What the figures were measured with: Python, Celery, kombu, redis-py, the Redis server, the machine."""
    server = redis.Redis.from_url(url).info("server")
    return {
        "python": platform.python_version(),
        **{name: importlib.metadata.version(name) for name in ("celery", "kombu", "redis")},
        "redis_server": server.get("redis_version"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` and tuples as lists, ready for ``json.dumps``."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table, ``—`` when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def ts(iso: str | None) -> float:
    """An ISO timestamp of the status JSON as epoch seconds."""
    if not iso:
        raise ValueError("missing timestamp in status JSON")
    return datetime.fromisoformat(iso).timestamp()
