"""Reports: progress lines, tables, numbers, what the figures were measured with, and the JSON results file."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts"
PACKAGES = ("celery", "kombu", "redis")


class Progress:
    """Progress lines on stderr, stamped with the seconds since the benchmark began."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table, ``—`` when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Rows of cells under a rule after the header; the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def ts(iso: str | None) -> float:
    """An ISO timestamp of the status JSON as epoch seconds.

    Raises:
        ValueError: The timestamp is missing.
    """
    if not iso:
        raise ValueError("missing timestamp in status JSON")
    return datetime.fromisoformat(iso).timestamp()


def versions(url: str, packages: Sequence[str] = PACKAGES) -> dict[str, Any]:
    """What the figures were measured with: Python, the ``packages`` installed, the Redis server, the machine."""
    server = redis.Redis.from_url(url).info("server")
    installed: dict[str, str] = {}
    for name in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            installed[name] = importlib.metadata.version(name)
    return {
        "python": platform.python_version(),
        **installed,
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
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` as JSON to ``path`` (its folder created) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(results), indent=2, ensure_ascii=False, default=str) + "\n")
    total = results.get("runtime_s")
    print(f"\nresults: {path}" + (f"  (total {total:.0f}s)" if isinstance(total, int | float) else ""))
