"""Continuing locally: a finishing step runs one of the children it released in its own worker slot.

The hop from a step to its child then skips the broker (publish, receive, acknowledge): the finish holds the child
in the lease index under a fresh task id as for any release, and instead of publishing it, the same worker claims it
under that task id at once and runs it. The other released children still fan out as messages. This is Temporal's
eager activity dispatch and Celery's own chain optimisation. The broker side of it (whether a child may run here,
and telling Flower about a step no message carried) is a :class:`LocalSteps`, the worker's, so nothing here knows
Celery; a runtime without one publishes every child.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.definition.spec import WorkflowSpec
from orchestrator.domain import Attempt


@dataclass(frozen=True)
class Delivery:
    """What the broker says about a message: its queue, headers (trace context) and, when delayed, when it was due.

    Attributes:
        carrier: The task id of the message a locally continued step runs in (``""`` for a step its own message
            carries).
    """

    queue: str = ""
    headers: dict[str, Any] = field(default_factory=dict)
    due_at: float | None = None
    carrier: str = ""


@dataclass
class Continuation:
    """Offered to a finishing attempt: the released child it keeps to run in its own slot, if any."""

    delivery: Delivery
    local: LocalSteps
    step: str | None = None
    task_id: str = ""
    headers: dict[str, Any] = field(default_factory=dict)

    def keep(self, spec: WorkflowSpec, released: tuple[str, ...]) -> str | None:
        """Pick the first released child this slot may run (its queue, no time limit); remember it."""
        self.step = None
        for step in released:
            if self.local.accepts(spec, step, self.delivery):
                self.step = step
                return step
        return None


class LocalSteps(Protocol):
    """The broker's side of running a released child in the finishing step's slot."""

    def accepts(self, spec: WorkflowSpec, step: str, delivery: Delivery) -> bool:
        """Whether ``step`` may run in the slot of the message ``delivery`` describes (same queue, not stopping)."""

    def started(self, spec: WorkflowSpec, attempt: Attempt, delivery: Delivery) -> None:
        """The step is about to be claimed here: announce it as sent, received and started (Flower sees it)."""

    def ended(self, attempt: Attempt, result: str, failure: str | None, *, more: bool = False) -> None:
        """The step's attempt ended here (``failure`` when it failed for good): announce it.

        ``more``: another step starts here at once, so the announcement may go out with that one's.
        """

    def resend(self, spec: WorkflowSpec, attempt: Attempt, countdown_s: float, reason: str) -> None:
        """The attempt was retried or deferred: send its message, under its task id, due in ``countdown_s``.

        Raises:
            BrokerUnavailableError: The broker did not answer.
        """
