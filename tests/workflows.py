"""Functions the test workflows call; workers import this module (ORCH_IMPORTS=tests.workflows)."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from orchestrator import StepContext, function


def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


@function("tests.sleep")
def sleep(ctx: StepContext, seconds: float = 0.0, **_: Any) -> dict[str, Any]:
    """Sleep, then report who ran it."""
    time.sleep(seconds)
    return {"step": ctx.step, "slept": seconds, "pid": os.getpid()}


@function("tests.report_pid_then_sleep")
def report_pid_then_sleep(ctx: StepContext, seconds: float = 5.0, **_: Any) -> dict[str, Any]:
    """Publish this process's pid and attempt (so a test can kill it), then sleep."""
    _redis().rpush(f"test:pids:{ctx.run_id}:{ctx.step}", f"{os.getpid()}:{ctx.attempt}")
    time.sleep(seconds)
    return {"pid": os.getpid(), "attempt": ctx.attempt}


@function("tests.count_calls")
def count_calls(ctx: StepContext, **_: Any) -> dict[str, Any]:
    """Count executions in Redis, so a test can prove a step ran exactly once."""
    n = _redis().incr(f"test:calls:{ctx.run_id}:{ctx.step}")
    return {"calls": n, "upstream": sorted(ctx)}


@function("tests.fail")
def fail(ctx: StepContext, **_: Any) -> None:
    """Fail with a bug-like exception (non-retryable)."""
    raise ValueError(f"{ctx.step} is broken on purpose")


@function("tests.big_output")
def big_output(ctx: StepContext, size: int = 0, **_: Any) -> str:
    """Return a string of ``size`` characters."""
    return "x" * size
