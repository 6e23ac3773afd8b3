"""Continuing locally: a finishing step runs one of the children it released in its own worker slot.

The hop from a step to its child then skips the broker (publish, receive, acknowledge): the finish holds the child
in the lease index under a fresh task id as for any release, and instead of publishing it claims it under that task
id in the same transition (one round trip for the hop: :class:`~orchestrator.domain.KeepRequest`); the same worker
then runs it. The other released children still fan out as messages. This is Temporal's
eager activity dispatch and Celery's own chain optimisation. The broker side of it (whether a child may run here,
and telling Flower about a step no message carried) is a :class:`LocalSteps`, the worker's, so nothing here knows
Celery; a runtime without one publishes every child.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from orchestrator.definition.spec import WorkflowSpec
from orchestrator.domain import Attempt, Claim, FinishResult, KeepCandidate, KeepRequest
from orchestrator.engine.coordinator import upstream_reads
from orchestrator.errors import RetryableStepError, StepDeferred

log = logging.getLogger(__name__)

MAX_CANDIDATES = 8
"""Children a finish is offered to keep at most: a 1→500 fan-out releases all of them at once and keeps the first,
so naming the other 499 (each its claim's arguments, and a lease index entry to re-score) would buy nothing."""


@dataclass(frozen=True)
class Delivery:
    """What the broker says about a message: its queue, headers (trace context) and, when delayed, when it was due.

    Attributes:
        carrier: The task id of the message a locally continued step runs in (``""`` for a step its own message
            carries).
        hops: How many steps the slot ran locally one after another up to this one (0 for a message's own step).
    """

    queue: str = ""
    headers: dict[str, Any] = field(default_factory=dict)
    due_at: float | None = None
    carrier: str = ""
    hops: int = 0


@dataclass
class Continuation:
    """Offered to a finishing attempt: the released child it keeps to run in its own slot, if any.

    Attributes:
        step: The kept child, once the finish claimed it.
        task_id: The task id it was claimed under.
        claim: The finish's claim of it (whatever its outcome: the slot then handles it as a message's claim).
    """

    delivery: Delivery
    local: LocalSteps
    step: str | None = None
    task_id: str = ""
    headers: dict[str, Any] = field(default_factory=dict)
    claim: Claim | None = None

    def request(
        self, spec: WorkflowSpec, attempt: Attempt, releasable: tuple[str, ...], lease_s: float
    ) -> KeepRequest | None:
        """What the finish of ``attempt`` is to claim for this slot: the children it may release that this slot may
        run (their queue, no time limit), in order, the first ``MAX_CANDIDATES`` of them; ``None`` when there is
        none."""
        accepted = (step for step in releasable if self.local.accepts(spec, step, self.delivery))
        candidates = tuple(
            KeepCandidate(step, upstream_reads(spec, step), spec.graph.children[step])
            for step in itertools.islice(accepted, MAX_CANDIDATES)
        )
        if not candidates:
            return None
        return KeepRequest(candidates, lease_s, self.delivery.carrier or attempt.task_id)

    @property
    def kept(self) -> bool:
        """Whether the finish kept a child for this slot (claimed: run it next)."""
        return self.step is not None and bool(self.task_id)

    def take(self, result: FinishResult) -> None:
        """Remember the child the finish kept (and its claim), if any."""
        self.step = result.kept
        self.task_id = result.task_ids[result.kept] if result.kept is not None else ""
        self.claim = result.kept_claim


class LocalSteps(Protocol):
    """The broker's side of running a released child in the finishing step's slot."""

    def accepts(self, spec: WorkflowSpec, step: str, delivery: Delivery) -> bool:
        """Whether ``step`` may run in the slot of the message ``delivery`` describes (same queue, not stopping, fewer
        than a limit of ``delivery.hops``); asked before the finish, of every child it may release."""

    def started(self, spec: WorkflowSpec, attempt: Attempt, delivery: Delivery) -> None:
        """The step was claimed for this slot (by its parent's finish): announce it as sent, received and started
        (Flower sees it)."""

    def ended(self, attempt: Attempt, result: str, failure: str | None, *, more: bool = False) -> None:
        """The step's attempt ended here (``failure`` when it failed for good): announce it.

        ``more``: another step starts here at once, so the announcement may go out with that one's.
        """

    def resend(self, spec: WorkflowSpec, attempt: Attempt, countdown_s: float, reason: str) -> None:
        """The attempt was retried or deferred: send its message, under its task id, due in ``countdown_s``.

        Raises:
            BrokerUnavailableError: The broker did not answer.
        """

    def flush(self) -> None:
        """Send the announcements held back (``more``) now: a batch of steps has ended (never raises)."""


Execute = Callable[[Attempt, Delivery, "Continuation", Claim | None], tuple[str, str | None]]
"""Runs one attempt here (claimed already, or claiming it when not): what happened, and its failure summary when it
failed for good."""


def continue_locally(spec: WorkflowSpec, parent: Attempt, hop: Continuation, execute: Execute) -> int:
    """Run the child each finish kept in this slot, one after another, announcing each through ``hop.local``.

    A kept step that must retry or wait is recorded so by ``execute`` and its message sent to the broker; one that
    meets an outage past the patience is left to its lease, as a message's attempt would be. A kept step comes
    claimed by its parent's finish; one without a claim (a batch's passenger) is claimed by ``execute``.

    Returns:
        The slot's count of local steps (``Delivery.hops``) after the last one run.
    """
    local = hop.local
    carrier = hop.delivery.carrier or parent.task_id
    hops = hop.delivery.hops
    while hop.step is not None and hop.task_id:
        attempt = Attempt(parent.run_id, hop.step, parent.generation, hop.task_id)
        claim = hop.claim
        hops = hop.delivery.hops + 1
        delivery = replace(hop.delivery, headers=hop.headers, due_at=None, carrier=carrier, hops=hop.delivery.hops + 1)
        hop = Continuation(delivery, local)
        local.started(spec, attempt, delivery)
        try:
            result, failure = execute(attempt, delivery, hop, claim)
        except (RetryableStepError, StepDeferred) as exc:
            try:
                local.resend(spec, attempt, exc.countdown or 0.0, str(exc))
            except Exception:
                log.exception("%s: its retry was not sent; the sweeper sends it once its lease runs out", attempt)
            return hops
        except Exception as exc:
            log.warning("%s: left to its lease: %s: %s", attempt, type(exc).__name__, exc)
            local.ended(attempt, "left to its lease", f"{type(exc).__name__}: {exc}")
            return hops
        local.ended(attempt, result, failure, more=hop.kept)
    return hops
