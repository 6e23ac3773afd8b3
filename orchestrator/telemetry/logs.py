"""JSON log lines carrying run id, step and attempt; secrets redacted. (Placeholder: filled in by the logs work.)"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.telemetry import AttemptInfo


@contextlib.contextmanager
def attempt_context(info: AttemptInfo) -> Iterator[None]:
    """Put the attempt's run id, step and attempt on every log record made inside."""
    yield
