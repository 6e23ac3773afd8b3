"""Whether any worker consumes a queue: the warning ``orchestrator submit --wait`` prints instead of waiting silently.

Workers are asked with Celery's ``inspect().active_queues()``, a broadcast their main process answers (a busy pool
does not keep it from answering), with a short timeout. A run whose first steps sit on a queue no worker reads
would otherwise wait for ever without a word.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from orchestrator.engine.coordinator import queue_for
from orchestrator.infra.redis_url import is_memory_url

if TYPE_CHECKING:
    from celery import Celery

    from orchestrator.client import Client
    from orchestrator.definition.spec import WorkflowSpec

log = logging.getLogger(__name__)

NO_WORKER_WARNING_S = 5.0
"""How long ``submit --wait`` waits for a run's first step to start before it asks whether any worker reads its
queues."""
INSPECT_TIMEOUT_S = 1.0
"""How long workers have to answer that question."""


def consumed_queues(app: Celery, timeout: float = INSPECT_TIMEOUT_S) -> set[str]:
    """The queues the workers that answer within ``timeout`` consume (empty when none answers)."""
    replies: dict[str, Any] = app.control.inspect(timeout=timeout).active_queues() or {}
    return {str(queue["name"]) for queues in replies.values() for queue in queues or ()}


def queues_without_consumers(app: Celery, queues: Iterable[str], timeout: float = INSPECT_TIMEOUT_S) -> list[str]:
    """Those of ``queues`` that no worker answering within ``timeout`` consumes, in order."""
    consumed = consumed_queues(app, timeout)
    return [queue for queue in dict.fromkeys(queues) if queue not in consumed]


class NoWorkerWarning:
    """Says once, after ``delay_s`` without the run starting, which of its first queues no worker consumes.

    It runs on a daemon thread, so a broker slow to answer never holds up the wait it sits beside.

    Args:
        client: The client that submitted the run.
        spec: The run's workflow.
        run_id: The run.
        say: Where the line goes (the command line's stderr).
        delay_s: How long the run may take to start before workers are asked.
    """

    def __init__(
        self,
        client: Client,
        spec: WorkflowSpec,
        run_id: str,
        say: Callable[[str], None],
        delay_s: float = NO_WORKER_WARNING_S,
    ) -> None:
        self._client, self._spec, self._run_id, self._say, self._delay_s = client, spec, run_id, say, delay_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._check, name="orchestrator-no-worker-warning", daemon=True)

    def __enter__(self) -> NoWorkerWarning:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()

    def _check(self) -> None:
        # With memory:// the command runs the run itself: there is no worker to miss.
        if is_memory_url(self._client.settings.redis_url) or self._done.wait(self._delay_s):
            return
        try:
            if any(step["started_at"] for step in self._client.status(self._run_id)["steps"].values()):
                return
            settings = self._client.settings
            steps = self._spec.steps_by_name
            queues = [queue_for(steps[name], settings.llm_queue, settings.cpu_queue) for name in self._spec.graph.roots]
            idle = queues_without_consumers(self._client.app, queues)
        except Exception:
            # Only a hint: a failure to ask is no reason to disturb the wait.
            log.debug("could not ask workers which queues they consume", exc_info=True)
            return
        if idle and not self._done.is_set():
            names = ", ".join(repr(queue) for queue in idle)
            self._say(
                f"warning: run {self._run_id} has not started after {self._delay_s:g}s: no worker consumes queue "
                f"{names} (start one with: orchestrator worker -Q {','.join(idle)}); still waiting"
            )
