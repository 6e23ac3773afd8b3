"""One process runs everything (``REDIS_URL=memory://``): the in-memory store, a step thread pool and a sweeper.

The engine only needs a state store and a :class:`~orchestrator.engine.publisher.StepPublisher`. Here the store is
:class:`~orchestrator.state.MemoryStateStore` and the publisher is :class:`InProcessPublisher`, which runs each
published attempt through :func:`~orchestrator.engine.attempt.execute_attempt` on its own threads, the way a Celery
worker with a thread pool would: a retry or deferral is delivered again under the same task id once its countdown
has passed, and a message is dropped by the claim when it is stale or a duplicate. :class:`InProcessSweeper` runs
:func:`~orchestrator.engine.sweep.sweep_once` every ``sweep_interval_s`` for workflow deadlines, approval timeouts
and steps whose message was lost. :class:`InProcessEngine` owns all three; ``Client`` builds one for a
``memory://`` URL.

Every thread here is a daemon: an interpreter exits with runs unfinished rather than wait for them (their state
dies with the process anyway). That is also why the pool is a few threads on a queue and not a
``ThreadPoolExecutor``, whose workers the interpreter joins at exit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from orchestrator.definition.spec import WorkflowSpec
from orchestrator.domain import Attempt
from orchestrator.engine.attempt import execute_attempt
from orchestrator.engine.items import execute_item
from orchestrator.engine.local import Delivery
from orchestrator.engine.runtime import Runtime, build_runtime
from orchestrator.engine.sweep import sweep_once
from orchestrator.errors import RetryableStepError
from orchestrator.infra.ids import new_id
from orchestrator.infra.settings import Settings
from orchestrator.state import MemoryStateStore

__all__ = ["InProcessEngine", "InProcessPublisher", "InProcessSweeper"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Message:
    """One step attempt as a broker would carry it; ``due_at`` is set on a delayed redelivery."""

    run_id: str
    definition_hash: str
    step: str
    generation: str
    task_id: str
    due_at: float | None = None
    index: int | None = None


class InProcessPublisher:
    """The :class:`StepPublisher` of a single process: each published attempt runs on one of its threads.

    It needs the runtime it delivers to, and that runtime needs it: build it, build the runtime with it, then
    :meth:`start` it with that runtime.

    Args:
        threads: How many attempts run at once.
    """

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"an in-process publisher needs at least one thread, not {threads}")
        self.threads = threads
        self._queue: queue.SimpleQueue[_Message | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._timers: set[threading.Timer] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._runtime: Runtime | None = None

    def start(self, runtime: Runtime) -> None:
        """Start the threads that deliver to ``runtime``; messages published before this wait for them."""
        with self._lock:
            if self._runtime is not None:
                raise RuntimeError("this publisher has started already")
            self._runtime = runtime
            for number in range(self.threads):
                worker = threading.Thread(target=self._work, name=f"orchestrator-step-{number}", daemon=True)
                worker.start()
                self._workers.append(worker)

    def publish(
        self,
        spec: WorkflowSpec,
        *,
        run_id: str,
        steps: Sequence[str],
        generation: str,
        task_ids: Mapping[str, str] | None = None,
    ) -> None:
        """Queue the steps for this process's threads (after :meth:`close`, nothing is queued any more)."""
        ids = task_ids or {}
        for step in steps:
            self._put(_Message(run_id, spec.definition_hash, step, generation, ids.get(step) or new_id()))

    def publish_items(
        self,
        spec: WorkflowSpec,
        *,
        run_id: str,
        step: str,
        generation: str,
        items: Sequence[tuple[int, str]],
        sent_at: float | None = None,
    ) -> None:
        """Queue a map step's items for this process's threads (no broker: ``sent_at`` is for the sweeper's backlog
        rule, which has no queue to read here)."""
        for index, task_id in items:
            self._put(_Message(run_id, spec.definition_hash, step, generation, task_id, index=index))

    def revoke(self, task_ids: Sequence[str]) -> None:
        """Nothing to do: a thread cannot be interrupted, and the store refuses a cancelled attempt's transitions,
        so its result is discarded and nothing after it starts."""

    def close(self, timeout: float | None = None) -> None:
        """Stop taking messages, drop the queued and delayed ones, and wait for the attempts in progress.

        Args:
            timeout: How long to wait for each thread at most (``None``: until its attempt ends).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            timers, self._timers = self._timers, set()
        for timer in timers:
            timer.cancel()
        # Drop what no thread took yet, then wake every thread with a sentinel.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(timeout)

    def _put(self, message: _Message) -> None:
        with self._lock:
            if self._closed:
                log.debug("in-process publisher closed: dropping %s/%s", message.run_id, message.step)
                return
            self._queue.put(message)

    def _later(self, message: _Message, countdown: float) -> None:
        """Deliver ``message`` again after ``countdown`` seconds, as Celery's retry does (same task id)."""
        delayed = replace(message, due_at=time.time() + countdown)
        if countdown <= 0:
            self._put(delayed)
            return

        def fire() -> None:
            with self._lock:
                self._timers.discard(timer)
            self._put(delayed)

        timer = threading.Timer(countdown, fire)
        timer.daemon = True
        timer.name = f"orchestrator-retry-{message.step}"
        with self._lock:
            if self._closed:
                return
            self._timers.add(timer)
        timer.start()

    def _work(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            self._deliver(message)

    def _deliver(self, message: _Message) -> None:
        runtime = self._runtime
        assert runtime is not None, "messages are only taken after start()"
        attempt = Attempt(message.run_id, message.step, message.generation, message.task_id, message.index)
        execute = execute_attempt if message.index is None else execute_item
        try:
            outcome = execute(runtime, attempt, message.definition_hash, Delivery(due_at=message.due_at))
        except RetryableStepError as exc:
            # A retry or a deferral (StepDeferred is one): the store has put the step back to queued already.
            self._later(message, exc.countdown or 0.0)
            return
        except Exception:
            # The attempt keeps its lease or dispatch hold, so the sweeper sends the step again once that runs out.
            log.exception("%s: the attempt failed outside the step; the sweeper will send it again", attempt)
            return
        log.debug("%s: %s", attempt, outcome)


class InProcessSweeper:
    """Runs :func:`~orchestrator.engine.sweep.sweep_once` on a daemon thread every ``sweep_interval_s``.

    Args:
        runtime: The runtime to sweep (its settings give the interval).
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.owner = f"inprocess:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orchestrator-sweeper", daemon=True)

    def start(self) -> None:
        """Sweep at once, then every interval, until :meth:`stop`."""
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the sweep in progress, waiting up to ``timeout`` for it."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        interval = self.runtime.settings.sweep_interval_s
        while not self._stop.is_set():
            try:
                sweep_once(self.runtime, self.owner)
            except Exception:
                log.exception("sweep failed; trying again in %.2fs", interval)
            if self._stop.wait(interval):
                return


class InProcessEngine:
    """The store, step threads and sweeper of a process that runs its own workflows (``REDIS_URL=memory://``).

    Args:
        settings: Limits, the LLM provider, ``inprocess_threads`` and ``sweep_interval_s``.
        store: The store to run on (default: a new, empty one).
    """

    def __init__(self, settings: Settings, *, store: MemoryStateStore | None = None) -> None:
        self.settings = settings
        self.store = store or MemoryStateStore(retention_s=settings.retention_s)
        self.publisher = InProcessPublisher(settings.inprocess_threads)
        self.runtime = build_runtime(settings, self.publisher, store=self.store)
        self.publisher.start(self.runtime)
        self.sweeper = InProcessSweeper(self.runtime)
        self.sweeper.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop the sweeper and the step threads; attempts in progress end first (each waited for up to
        ``timeout``), queued ones are dropped. The store's contents stay readable."""
        self.sweeper.stop(timeout)
        self.publisher.close(timeout)
