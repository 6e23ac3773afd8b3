"""Small builders for test workflows and polling with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import redis
from celery import Celery

from orchestrator.engine.priorities import redis_queue_lists

T = TypeVar("T")


def llm(name: str, *deps: str, latency: float = 0.0, errors: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """An offline ``llm`` step."""
    simulate: dict[str, Any] = {"latency_s": latency, "errors": list(errors)}
    if "retry_after_s" in extra:
        simulate["retry_after_s"] = extra.pop("retry_after_s")
    step: dict[str, Any] = {
        "name": name,
        "uses": "llm",
        "depends_on": list(deps),
        "with": {"prompt": f"Write about {name} for {{{{ inputs.topic }}}}", "max_tokens": 60, "simulate": simulate},
    }
    step.update(extra)
    return step


def py(name: str, function: str, *deps: str, **args: Any) -> dict[str, Any]:
    """A ``python`` step calling a function from ``tests.workflows``."""
    queue = args.pop("queue", None)
    step: dict[str, Any] = {
        "name": name,
        "uses": "python",
        "depends_on": list(deps),
        "with": {"function": function, "args": args},
    }
    if queue:
        step["queue"] = queue
    return step


def workflow(name: str, *steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A workflow taking a ``topic`` input (defaulted)."""
    return {"name": name, "inputs": {"topic": {"type": "string", "default": "tests"}}, "steps": list(steps), **extra}


def wait_for(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def ts(value: str) -> float:
    """An ISO timestamp from the status JSON as epoch seconds."""
    return datetime.fromisoformat(value).timestamp()


def queue_length(client: redis.Redis, queue: str) -> int:
    """Messages waiting in ``queue`` on the Redis broker: the sum of its priority lists."""
    return sum(int(client.llen(name)) for name in redis_queue_lists(queue))


def held_by_workers(app: Celery, marker: str | None = None) -> bool:
    """Whether a worker holds a message it took and has not acknowledged (one mentioning ``marker``, a task or run
    id, or any): reserved, scheduled (a countdown) or running.

    The Redis broker keeps no copy of a taken message (``ORCH_BROKER_UNACKED_INDEX`` is off), so only the workers
    know of it.
    """
    inspect = app.control.inspect(timeout=1.0)
    held = [task for replies in (inspect.reserved(), inspect.scheduled(), inspect.active()) for task in _tasks(replies)]
    return any(marker is None or marker in str(task) for task in held)


def _tasks(replies: dict[str, list[Any]] | None) -> list[Any]:
    return [task for tasks in (replies or {}).values() for task in tasks]
