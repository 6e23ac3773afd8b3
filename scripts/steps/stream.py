"""Step functions for ``scripts.bench_stream``.

Worker processes import this module through ``ORCH_IMPORTS=scripts.steps.stream``. ``bench_stream.gate`` holds a
run at its first step until the benchmark has connected every SSE client to it, so that everything after the gate is
delivered live (through the API's per-run hub) rather than replayed from the stream on connect.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import redis

from orchestrator import StepContext, function

GATE_PREFIX = "bench_stream:gate:"


def gate_key(run_id: str) -> str:
    """The key whose existence opens the run's gate."""
    return f"{GATE_PREFIX}{run_id}"


@functools.cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


@function("bench_stream.gate")
def gate(ctx: StepContext, timeout_s: float = 120.0, poll_s: float = 0.002, **_: Any) -> dict[str, Any]:
    """Wait until ``bench_stream:gate:RUN`` exists (at most ``timeout_s``), then succeed."""
    deadline = time.monotonic() + timeout_s
    client = _redis()
    while not client.exists(gate_key(ctx.run_id)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate of run {ctx.run_id} not opened within {timeout_s}s")
        time.sleep(poll_s)
    return {"opened": True}
