"""Step functions and raw Celery tasks for ``scripts.bench`` and ``scripts.bench_load``.

Worker processes import this module through ``ORCH_IMPORTS=scripts.steps.bench``: Celery's ``imports`` setting
registers the raw ``@shared_task`` tasks on the workers' own app, and the orchestrator's registry gets the ``python``
step functions. So the raw baseline runs on the very same worker processes,
app configuration (acks late, ignore results, task events) and broker as the orchestrator's steps.

Raw tasks record their start and end times (``time.time()``) by appending one line to a per-process file in
``$BENCH_RECORD_DIR``, not to Redis, so the raw baseline's Redis command counts carry no measurement traffic.
"""

from __future__ import annotations

import os
import threading
import time
from typing import IO, Any

from celery import group, shared_task

from orchestrator import StepContext, function
from orchestrator.llm.base import LLMRequest
from orchestrator.llm.offline import OfflineClient
from scripts.harness.records import RECORD_DIR_ENV

_sinks: dict[int, IO[str]] = {}
_clients: dict[int, OfflineClient] = {}
_clients_lock = threading.Lock()


def _record(tag: str, index: int, start: float, end: float) -> None:
    """Append ``tag index start end`` to this process's record file (opened once per process, after any fork)."""
    pid = os.getpid()
    sink = _sinks.get(pid)
    if sink is None:
        path = os.path.join(os.environ[RECORD_DIR_ENV], f"{pid}.log")
        sink = _sinks[pid] = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    sink.write(f"{tag} {index} {start:.6f} {end:.6f}\n")


# -- raw Celery tasks (the baseline) ---------------------------------------------------------------------------------


@shared_task(name="bench.raw_noop", ignore_result=True)
def raw_noop(tag: str, index: int) -> None:
    """A no-op task: records when it started and ended."""
    start = time.time()
    end = time.time()
    _record(tag, index, start, end)


@shared_task(name="bench.raw_sleep", ignore_result=True)
def raw_sleep(tag: str, index: int, seconds: float) -> None:
    """Sleep ``seconds``: records when it started and ended."""
    start = time.time()
    time.sleep(seconds)
    end = time.time()
    _record(tag, index, start, end)


@shared_task(name="bench.raw_llm", ignore_result=True)
def raw_llm(tag: str, index: int, request: dict[str, Any]) -> None:
    """Make one LLM call as an ``llm`` step makes it, with none of the orchestration: ``request`` is an
    :class:`~orchestrator.llm.base.LLMRequest`'s fields (the prompt already rendered), sent through the offline
    provider (the real Anthropic SDK over an in-process transport, one client per process as a worker's gateway has).
    Records when it started and ended."""
    start = time.time()
    _client().complete(LLMRequest(**request))
    end = time.time()
    _record(tag, index, start, end)


def _client() -> OfflineClient:
    pid = os.getpid()
    client = _clients.get(pid)
    if client is None:
        with _clients_lock:
            client = _clients.setdefault(pid, OfflineClient())
    return client


@shared_task(name="bench.raw_fanout", ignore_result=True)
def raw_fanout(tag: str, count: int) -> None:
    """Publish a ``group`` of ``count`` raw no-ops from inside a worker, as a finishing step's dispatch does."""
    start = time.time()
    group(raw_noop.si(tag, i) for i in range(count)).apply_async()
    end = time.time()
    _record(f"{tag}:root", 0, start, end)


# -- orchestrator step functions -------------------------------------------------------------------------------------


@function("bench.noop")
def noop(ctx: StepContext, record: bool = False, **_: Any) -> None:
    """A python step doing nothing; with ``record``, it records its start and end as a raw task does (tag: its run,
    index: its number in a chain of steps ``s0``, ``s1``, …)."""
    if record:
        now = time.time()
        _record(ctx.run_id, int(ctx.step.removeprefix("s")), now, now)


@function("bench.sleep")
def sleep(ctx: StepContext, seconds: float = 0.2, record: bool = False, **_: Any) -> None:
    """A python step sleeping ``seconds``; ``record`` as for :func:`noop`."""
    start = time.time()
    time.sleep(seconds)
    if record:
        _record(ctx.run_id, int(ctx.step.removeprefix("s")), start, time.time())
