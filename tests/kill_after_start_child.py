"""Imported by one test worker only (ORCH_IMPORTS): its first start of a child run kills the process running the
parent step with SIGKILL, right after the child was started and before the step parks (a worker lost at the worst
moment for idempotency). Once per ``TEST_KILL_ONCE_KEY`` (a Redis key set to the child's id)."""

from __future__ import annotations

import os
import signal
from typing import Any

from orchestrator.engine import subflow
from tests.workflows import _redis

_start_child = subflow.start_child


def _start_then_die(runtime: Any, parent_run: str, *args: Any, **kwargs: Any) -> str:
    child = _start_child(runtime, parent_run, *args, **kwargs)
    once = os.environ.get("TEST_KILL_ONCE_KEY")
    if once and _redis().set(once, child, nx=True, ex=300):
        os.kill(os.getpid(), signal.SIGKILL)
    return child


subflow.start_child = _start_then_die
