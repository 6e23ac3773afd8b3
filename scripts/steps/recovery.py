"""Step functions of ``scripts.bench_recovery``: its workers import them (``ORCH_IMPORTS=scripts.steps.recovery``)."""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import redis

from orchestrator import StepContext, function

PIDS_PREFIX = "bench_recovery:pids:"


def pids_key(run_id: str) -> str:
    """The list of the pids that ran the run's step, one per attempt."""
    return f"{PIDS_PREFIX}{run_id}"


@functools.cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


@function("recovery.pid_sleep")
def pid_sleep(ctx: StepContext, seconds: float = 30.0, **_: Any) -> dict[str, Any]:
    """Say which process runs this attempt, then sleep ``seconds`` (a long step, to be killed mid-way)."""
    _redis().rpush(pids_key(ctx.run_id), os.getpid())
    time.sleep(seconds)
    return {"pid": os.getpid()}
