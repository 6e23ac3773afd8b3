"""Functions the test workflows call; workers import this module (ORCH_IMPORTS=tests.workflows)."""

from __future__ import annotations

import functools
import gc
import os
import sys
import time
from typing import Any

import redis

from orchestrator import LLMStep, NoopStep, StepContext, ToolContext, Workflow, function, tool
from orchestrator.errors import NonRetryableStepError
from orchestrator.infra.redis_url import sync_client
from orchestrator.state import keys


def _redis() -> redis.Redis:
    return sync_client(os.environ["REDIS_URL"])


@function("tests.sleep")
def sleep(ctx: StepContext, seconds: float = 0.0, **_: Any) -> dict[str, Any]:
    """Sleep, then report who ran it (and the process's switch interval, collector settings and CPUs,
    ``ORCH_GIL_SWITCH_S``, ``ORCH_GC_THRESHOLD`` and ``ORCH_WORKER_CPUS``)."""
    time.sleep(seconds)
    return {
        "step": ctx.step,
        "slept": seconds,
        "pid": os.getpid(),
        "switch_s": sys.getswitchinterval(),
        "gc_threshold": gc.get_threshold()[0],
        "gc_frozen": gc.get_freeze_count(),
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


@function("tests.report_pid_then_sleep")
def report_pid_then_sleep(ctx: StepContext, seconds: float = 5.0, **_: Any) -> dict[str, Any]:
    """Publish this process's pid and attempt (so a test can kill it), then sleep."""
    _redis().rpush(f"test:pids:{ctx.run_id}:{ctx.step}", f"{os.getpid()}:{ctx.attempt}")
    time.sleep(seconds)
    return {"pid": os.getpid(), "attempt": ctx.attempt}


@function("tests.report_message_then_sleep")
def report_message_then_sleep(ctx: StepContext, seconds: float = 0.0, **_: Any) -> dict[str, Any]:
    """Publish this process's pid, the attempt and the Celery message it runs in (``PID:ATTEMPT:TASK_ID:STEP`` of
    the message's own step, which differs from this step's when it rides in another's batch), then sleep."""
    from celery import current_task

    request = current_task.request if current_task else None
    carrier = f"{request.id}:{request.args[2]}" if request is not None and request.args else ":"
    _redis().rpush(f"test:pids:{ctx.run_id}:{ctx.step}", f"{os.getpid()}:{ctx.attempt}:{carrier}")
    time.sleep(seconds)
    return {"pid": os.getpid(), "attempt": ctx.attempt}


@function("tests.count_calls")
def count_calls(ctx: StepContext, **_: Any) -> dict[str, Any]:
    """Count executions in Redis, so a test can prove a step ran exactly once."""
    n = _redis().incr(f"test:calls:{ctx.run_id}:{ctx.step}")
    return {"calls": n, "upstream": sorted(ctx)}


@function("tests.count_on_broker")
def count_on_broker(ctx: StepContext, **_: Any) -> dict[str, Any]:
    """Like ``tests.count_calls``, but counted in the broker's Redis: it stays up while a state node is killed."""
    n = _broker().incr(f"test:calls:{ctx.run_id}:{ctx.step}")
    return {"calls": n}


@functools.cache
def _broker() -> redis.Redis:
    return sync_client(os.environ["ORCH_BROKER_URL"])


@function("tests.fail")
def fail(ctx: StepContext, **_: Any) -> None:
    """Fail with a bug-like exception (non-retryable)."""
    raise ValueError(f"{ctx.step} is broken on purpose")


@function("tests.big_output")
def big_output(ctx: StepContext, size: int = 0, **_: Any) -> str:
    """Return a string of ``size`` characters."""
    return "x" * size


@function("tests.gate")
def gate(ctx: StepContext, **_: Any) -> dict[str, Any]:
    """Fail for good until the test "fixes the cause" by setting ``test:fixed:RUN``."""
    r = _redis()
    r.incr(f"test:calls:{ctx.run_id}:{ctx.step}")
    if not r.exists(f"test:fixed:{ctx.run_id}"):
        raise ValueError("the cause is not fixed yet")
    return {"fixed": True}


@function("tests.count_constant")
def count_constant(ctx: StepContext, **_: Any) -> dict[str, Any]:
    """Count executions but always return the same output (a deterministic step)."""
    _redis().incr(f"test:calls:{ctx.run_id}:{ctx.step}")
    return {"value": 42}


@function("tests.iterate")
def iterate(ctx: StepContext, block_in: int = 0, **_: Any) -> dict[str, Any]:
    """One iteration of a repeated step: counted in Redis per iteration number, its output the previous one's plus
    its number. The first run of iteration ``block_in`` publishes this process's pid and blocks until it is killed."""
    r = _redis()
    runs = r.incr(f"test:iterations:{ctx.run_id}:{ctx.step}:{ctx.iteration}")
    if ctx.iteration == block_in and runs == 1:
        r.rpush(f"test:pids:{ctx.run_id}:{ctx.step}", f"{os.getpid()}:{ctx.attempt}")
        time.sleep(120)  # not synchronisation: the test kills this process meanwhile
        raise RuntimeError("this worker was to be killed during the iteration")
    seen = (ctx.previous or {}).get("seen", [])
    return {"seen": [*seen, ctx.iteration], "n": ctx.iteration}


# The seed's Option C, as written there: a Python condition on the context (registered on workers by import).
conditional = Workflow(
    "tests_conditional",
    inputs={"topic": {"type": "string", "default": "tests"}, "tokens": {"type": "integer", "default": 900}},
    steps=[
        LLMStep(name="draft", prompt="Draft about {{ inputs.topic }}", max_tokens=900),
        LLMStep(name="short_draft", prompt="Draft briefly about {{ inputs.topic }}", max_tokens=100),
        LLMStep(
            name="quality_check",
            prompt="Check the draft",
            depends_on=["draft"],
            condition=lambda context: context["draft"]["word_count"] > 500,
        ),
        LLMStep(
            name="quality_check_short",
            prompt="Check the short draft",
            depends_on=["short_draft"],
            condition=lambda context: context["short_draft"]["word_count"] > 500,
        ),
        NoopStep(name="publish_short", depends_on=["quality_check_short"]),
        NoopStep(name="publish_anyway", depends_on=["quality_check_short"], trigger_rule="none_failed"),
    ],
)


@function("tests.log_secrets")
def log_secrets(ctx: StepContext, **_: Any) -> dict[str, Any]:
    """Log every secret this process can see, as careless code might: the log redaction must hide them all."""
    import json
    import logging

    tokens = list(json.loads(os.environ.get("ORCH_API_TOKENS") or "{}"))
    log = logging.getLogger("tests.workflows")
    log.warning("calling out with Authorization: Bearer %s", tokens[0] if tokens else "")
    log.warning("tokens %s, key %s, store %s", tokens, os.environ.get("ANTHROPIC_API_KEY"), os.environ["REDIS_URL"])
    return {"logged": len(tokens)}


@function("tests.wait_for_llm_calls")
def wait_for_llm_calls(ctx: StepContext, calls: int = 1, timeout_s: float = 20.0, **_: Any) -> dict[str, Any]:
    """Poll until the run has paid for ``calls`` LLM calls (so a test orders steps by spend, not by timing)."""
    deadline = time.monotonic() + timeout_s
    client = _redis()
    while (seen := int(client.hget(keys.run_key(ctx.run_id), "llm_calls") or 0)) < calls:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the run paid for {seen} LLM calls in {timeout_s}s, not {calls}")
        time.sleep(0.02)
    return {"calls": seen}


_CLIENTS: dict[int, redis.Redis] = {}


def _cached_redis() -> redis.Redis:
    # A thousand items in a second: one connection per process, not one per item.
    client = _CLIENTS.get(os.getpid())
    if client is None:
        client = _CLIENTS[os.getpid()] = _redis()
    return client


@function("tests.map_item")
def map_item(ctx: StepContext, seconds: float = 0.0, fail_on: Any = None, **_: Any) -> dict[str, Any]:
    """One item of a map step: sleep, fail for good on ``fail_on`` until ``test:fixed:RUN`` is set, count each
    execution that ran to its end per item (``test:map:RUN:STEP``, field = index)."""
    time.sleep(seconds)
    r = _cached_redis()
    if fail_on is not None and ctx.item == fail_on and not r.exists(f"test:fixed:{ctx.run_id}"):
        r.hincrby(f"test:map:{ctx.run_id}:{ctx.step}", str(ctx.index), 1)
        raise NonRetryableStepError(f"item {ctx.item!r} is bad", kind="exception")
    r.hincrby(f"test:map:{ctx.run_id}:{ctx.step}", str(ctx.index), 1)
    return {"item": ctx.item, "index": ctx.index, "count": ctx.count}


@function("tests.collect")
def collect(ctx: StepContext, **_: Any) -> dict[str, Any]:
    """What a step downstream of a map step sees: its upstream outputs as they are."""
    return {name: ctx[name] for name in ctx}


@tool(name="tests.counted", idempotent=True)
def counted(label: str, ctx: ToolContext) -> dict[str, Any]:
    """Count this call's runs in Redis; the first run of a label ending in ``!block`` publishes this process's pid and
    blocks until the test kills it."""
    r = _redis()
    runs = r.incr(f"test:tool:{ctx.run_id}:{label}")
    if label.endswith("!block") and runs == 1:
        r.rpush(f"test:pids:{ctx.run_id}:{ctx.step}", f"{os.getpid()}:{ctx.attempt}")
        time.sleep(120)  # not synchronisation: the test kills this process meanwhile
        raise RuntimeError("this worker was to be killed during the tool call")
    return {"label": label, "runs": runs}
