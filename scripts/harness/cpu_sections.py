"""Thread CPU by section inside a benchmark's workers: where each millisecond of a step goes.

``python -m scripts.bench_load --cpu-sections`` has its workers import this module (``ORCH_IMPORTS``) with
``ORCH_BENCH_SECTIONS`` naming a directory. On import it wraps the functions of :data:`SECTIONS` so that each call
adds the calling thread's CPU time (``time.thread_time``: user and system time of that thread alone, so the time it
waits for the GIL, a socket or a sleep is left out) to its section, and a daemon thread writes the process's totals,
with the CPU time of the whole process, to ``DIR/sections-PID.json`` every :data:`WRITE_EVERY_S`.

The benchmark reads the totals around each pass (:func:`read_totals`) and divides the difference by the LLM calls
made in between (:func:`per_llm_call`): ours and the raw floor make the same calls, one per ``llm`` step, so the
figures compare like for like. Sections nest (a finish's round trip is in ``round_trip`` and in ``finish``); each is
inclusive. py-spy's ``--gil`` samples are no substitute: they charge a thread for the moments it holds the GIL, and
with hundreds of threads that favours code right after a system call.

A wrapped call costs about 2 us more (two clock reads); a step makes some fifteen, about 1% of its CPU.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DIR_ENV",
    "MORE_ENV",
    "SECTIONS",
    "Accounting",
    "Section",
    "install",
    "parse_sections",
    "per_llm_call",
    "read_totals",
]

DIR_ENV = "ORCH_BENCH_SECTIONS"
MORE_ENV = "ORCH_BENCH_SECTIONS_MORE"
"""More sections than :data:`SECTIONS`, as ``LABEL=MODULE:ATTR`` separated by commas (``bench_load --section``)."""
WRITE_EVERY_S = 0.25
LLM_CALL = "sdk_call"
"""The section counting LLM calls, the unit every figure is divided by."""


@dataclass(frozen=True)
class Section:
    """A function to account: ``module`` and the dotted ``attr`` path in it (``Class.method``).

    ``threads_only``: only in a worker whose pool runs tasks in threads (a prefork pool pickles the function).
    """

    label: str
    module: str
    attr: str
    threads_only: bool = False


SECTIONS: tuple[Section, ...] = (
    Section("celery_task", "celery.worker.request", "fast_trace_task", threads_only=True),
    Section(LLM_CALL, "orchestrator.llm.anthropic", "AnthropicClient.complete"),
    Section("gateway", "orchestrator.llm.gateway", "LLMGateway.complete"),
    Section("step_run", "orchestrator.engine.steps", "StepExecutor.run"),
    Section("attempt", "orchestrator.engine.attempt", "run_claimed"),
    Section("claim", "orchestrator.state.redis.steps", "StepTransitions.claim"),
    Section("finish", "orchestrator.state.redis.steps", "StepTransitions.finish"),
    Section("round_trip", "orchestrator.infra.redis_roundtrip", "_round_trip"),
    Section("publish", "orchestrator.celery_app", "CeleryPublisher.publish"),
    Section("keep_request", "orchestrator.engine.local", "Continuation.request"),
    Section("result_key", "orchestrator.engine.attempt", "result_key"),
    Section("local_events", "workers.local", "CeleryLocalSteps.started"),
    Section("local_events", "workers.local", "CeleryLocalSteps.ended"),
    Section("task_events", "workers.consumer", "BatchingConsumer._flush_window"),
)


def parse_sections(text: str) -> tuple[Section, ...]:
    """``LABEL=MODULE:ATTR,...`` as sections (``ATTR`` may be ``Class.method``).

    Raises:
        ValueError: One is not of that form.
    """
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, _, target = item.partition("=")
        module, _, attr = target.partition(":")
        if not (label and module and attr):
            raise ValueError(f"a section is LABEL=MODULE:ATTR, not {item!r}")
        out.append(Section(label, module, attr))
    return tuple(out)


Totals = dict[str, list[float]]
"""Section label → ``[cpu_s, calls]``."""


def _summed(many: Iterable[Mapping[str, Sequence[float]]]) -> Totals:
    """Several totals (of threads, of processes) added up, section by section."""
    out: Totals = {}
    for totals in many:
        for label, (cpu, calls) in list(totals.items()):
            entry = out.setdefault(label, [0.0, 0.0])
            entry[0] += cpu
            entry[1] += calls
    return out


class _Accounts:
    """Per-thread totals (no lock on the hot path), summed when written."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[Totals] = []
        self._lock = threading.Lock()

    def mine(self) -> Totals:
        totals: Totals | None = getattr(self._local, "totals", None)
        if totals is None:
            totals = self._local.totals = {}
            with self._lock:
                self._all.append(totals)
        return totals

    def summed(self) -> Totals:
        with self._lock:
            threads = list(self._all)
        return _summed(threads)


def _accounted(fn: Callable[..., Any], label: str, accounts: _Accounts) -> Callable[..., Any]:
    clock = time.thread_time

    def accounted(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            entry = accounts.mine().setdefault(label, [0.0, 0.0])
            entry[0] += clock() - start
            entry[1] += 1

    accounted.__wrapped__ = fn  # type: ignore[attr-defined]
    return accounted


class Accounting:
    """The sections installed in this process: their totals so far, written to a directory until :meth:`stop`."""

    def __init__(self, accounts: _Accounts, path: Path, queues: str) -> None:
        self._accounts = accounts
        self._path = path
        self._queues = queues
        self._stopped = threading.Event()
        self._writer = threading.Thread(target=self._write_until_stopped, name="cpu-sections", daemon=True)
        self._writer.start()

    def totals(self) -> Totals:
        """Section label → ``[cpu_s, calls]`` over every thread so far."""
        return self._accounts.summed()

    def stop(self) -> None:
        """Stop writing (the functions stay wrapped)."""
        self._stopped.set()
        self._writer.join()

    def _write_until_stopped(self) -> None:
        while True:
            times = os.times()
            record = {
                "t": time.time(),
                "queues": self._queues,
                "process_cpu_s": times.user + times.system,
                "sections": self.totals(),
            }
            scratch = self._path.with_suffix(".tmp")
            scratch.write_text(json.dumps(record))
            os.replace(scratch, self._path)
            if self._stopped.wait(WRITE_EVERY_S):
                return


def _wrapped(owner: Any, name: str, label: str, accounts: _Accounts) -> Any:
    """``owner.name`` accounted under ``label``, a static or class method of a class kept as such."""
    raw = inspect.getattr_static(owner, name)
    if isinstance(raw, staticmethod):
        return staticmethod(_accounted(raw.__func__, label, accounts))
    if isinstance(raw, classmethod):
        return classmethod(_accounted(raw.__func__, label, accounts))
    return _accounted(getattr(owner, name), label, accounts)


def install(directory: Path, sections: Iterable[Section] = SECTIONS, *, argv: list[str] | None = None) -> Accounting:
    """Wrap ``sections`` (``threads_only`` ones only in a worker started with ``--pool=threads``) and write their
    totals to ``directory`` every :data:`WRITE_EVERY_S`, under this process's id and the worker's ``--queues``."""
    argv = sys.argv if argv is None else argv
    threads = "--pool=threads" in argv
    accounts = _Accounts()
    for section in sections:
        if section.threads_only and not threads:
            continue
        owner: Any = importlib.import_module(section.module)
        *parents, name = section.attr.split(".")
        for part in parents:
            owner = getattr(owner, part)
        setattr(owner, name, _wrapped(owner, name, section.label, accounts))
    queues = next((a.split("=", 1)[1] for a in argv if a.startswith("--queues=")), "")
    directory.mkdir(parents=True, exist_ok=True)
    return Accounting(accounts, directory / f"sections-{os.getpid()}.json", queues)


def read_totals(directory: Path, queue: str, *, newer_than: float, timeout_s: float = 5.0) -> dict[str, Any]:
    """The totals of the workers consuming ``queue``, summed, each written after ``newer_than`` (waits for that,
    up to ``timeout_s``): ``{"process_cpu_s": ..., "sections": {label: [cpu_s, calls]}}``.

    Raises:
        TimeoutError: A worker's totals were not written again in time (it died, or never installed them).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        records = []
        for path in sorted(directory.glob("sections-*.json")):
            record = json.loads(path.read_text())
            if queue in record["queues"].split(","):
                records.append(record)
        if records and all(r["t"] > newer_than for r in records):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"no fresh CPU sections from the {queue!r} workers in {directory}")
        time.sleep(WRITE_EVERY_S / 2)
    sections = _summed(r["sections"] for r in records)
    return {"process_cpu_s": sum(r["process_cpu_s"] for r in records), "sections": sections}


def per_llm_call(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """The difference of two :func:`read_totals`, per LLM call made in between: the process's CPU and each
    section's in ms, and each section's calls."""
    calls = after["sections"].get(LLM_CALL, [0, 0])[1] - before["sections"].get(LLM_CALL, [0, 0])[1]
    if calls <= 0:
        return {"llm_calls": 0}
    sections: dict[str, dict[str, float]] = {}
    for label, (cpu, count) in sorted(after["sections"].items()):
        was_cpu, was_count = before["sections"].get(label, [0.0, 0.0])
        if count > was_count:
            sections[label] = {
                "ms": round((cpu - was_cpu) / calls * 1000, 3),
                "calls": round((count - was_count) / calls, 2),
            }
    process_ms = (after["process_cpu_s"] - before["process_cpu_s"]) / calls * 1000
    return {"llm_calls": int(calls), "process_ms": round(process_ms, 3), "sections": sections}


if os.environ.get(DIR_ENV):  # imported by a benchmark's worker
    install(Path(os.environ[DIR_ENV]), SECTIONS + parse_sections(os.environ.get(MORE_ENV, "")))
