"""Timestamps on the wire: Redis ``TIME`` epoch seconds in, ISO 8601 with microseconds in UTC out."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(epoch: str | float | None) -> str | None:
    """Epoch seconds (a number or its string) as ISO 8601 with microseconds, UTC; ``None`` stays ``None``."""
    if epoch is None or epoch == "":
        return None
    return datetime.fromtimestamp(float(epoch), tz=UTC).isoformat(timespec="microseconds")
