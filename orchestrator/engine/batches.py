"""Batched messages: a wide fan-out sent as fewer messages, each carrying several released steps.

A finish that releases more children than the workers have slots to take them would send one message per child,
and each would pay the broker's whole cost (publish, receive, unacked index, acknowledgement, pool hand-over, task
events). Instead the children are grouped, in release order, into batches of :func:`batch_size` steps: the first
step of a batch is its message's own (its task id, its name in Flower), and the others ride along as
``(step, task_id)`` pairs. The receiving slot runs the message's step, then each passenger one after another as if
it had continued locally (:mod:`orchestrator.engine.local`): claimed under its own task id, with the message as its
carrier, announced in task events, retried or deferred as its own message. This is Celery's ``chunks`` and
Hatchet's batch assignment, with every step still its own attempt.

What is never batched: a step with a signal-enforced time limit (prefork's limits are per message), a step without a
task id given by its finish, and steps of different queues or priorities (each batch shares both). A batch is no
larger than :data:`MAX_BATCH`, and small enough that every known slot gets work twice over.

Nothing is lost by it: every passenger keeps the dispatch hold its finish gave it, so a worker that dies mid-batch
leaves the unstarted ones to the message's redelivery or, failing that, the sweeper; a revoked batch message has its
passengers sent again by the worker (``workers.tasks.resend_passengers``); a duplicate is dropped by its claim as any
duplicate message is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import replace

from orchestrator.definition.spec import WorkflowSpec
from orchestrator.domain import Attempt
from orchestrator.engine.local import Continuation, Delivery, Execute, LocalSteps, continue_locally

log = logging.getLogger(__name__)

MAX_BATCH = 50
"""Steps one message carries at most (a worker stopping warm waits for its slot's batch, so it must stay short)."""

SLOT_SHARES = 2
"""Batches per known worker slot at least: a slot that draws slow steps leaves the rest to the others."""


def batch_size(steps: int, slots: int) -> int:
    """Steps per message for a fan-out of ``steps`` over ``slots`` known worker slots (1: no batching).

    A fan-out no wider than ``SLOT_SHARES`` messages per slot is sent one step a message, as is any when no slot is
    known.
    """
    if slots <= 0 or steps <= slots * SLOT_SHARES:
        return 1
    return min(MAX_BATCH, math.ceil(steps / (slots * SLOT_SHARES)))


def plan_batches(steps: Sequence[str], size: int, group_of: Callable[[str], Hashable | None]) -> list[tuple[str, ...]]:
    """Split released ``steps`` into messages of at most ``size`` steps, in release order.

    ``group_of`` names what a batch must share (queue and priority); ``None`` sends that step alone.
    """
    if size <= 1:
        return [(step,) for step in steps]
    open_batches: dict[Hashable, list[str]] = {}
    planned: list[list[str]] = []
    for step in steps:
        group = group_of(step)
        if group is None:
            planned.append([step])
            continue
        current = open_batches.get(group)
        if current is None or len(current) >= size:
            current = []
            open_batches[group] = current
            planned.append(current)
        current.append(step)
    return [tuple(batch) for batch in planned]


Publish = Callable[[Sequence[str], Mapping[str, str]], None]
"""Sends steps, each under its task id, as messages (the rest of a batch this slot may not run)."""


def run_passengers(
    spec: WorkflowSpec,
    carrier: Attempt,
    *,
    passengers: Sequence[tuple[str, str]],
    hop: Continuation,
    execute: Execute,
    publish: Publish,
) -> None:
    """Run a batch's other steps in this slot after its message's own, one after another.

    Each is claimed under its own task id with the message as its carrier and announced through ``hop.local``
    (and may itself continue locally, as any step run here). When the slot may run no more (the worker is stopping,
    or its run of local steps is long enough), the rest are sent as messages under their task ids. The steps' task
    events go out together, once per event window and when the batch ends.
    """
    local = _HeldBack(hop.local)
    try:
        _run(spec, carrier, passengers=passengers, hop=replace(hop, local=local), execute=execute, publish=publish)
    finally:
        hop.local.flush()


class _HeldBack:
    """The slot's :class:`LocalSteps`, holding each step's end announcement for the next one's publish: a batch's
    task events go out once per event window (and once at its end) rather than once per step."""

    def __init__(self, local: LocalSteps) -> None:
        self.local = local

    def accepts(self, spec: WorkflowSpec, step: str, delivery: Delivery) -> bool:
        return self.local.accepts(spec, step, delivery)

    def started(self, spec: WorkflowSpec, attempt: Attempt, delivery: Delivery) -> None:
        self.local.started(spec, attempt, delivery)

    def ended(self, attempt: Attempt, result: str, failure: str | None, *, more: bool = False) -> None:
        self.local.ended(attempt, result, failure, more=True)

    def resend(self, spec: WorkflowSpec, attempt: Attempt, countdown_s: float, reason: str) -> None:
        self.local.resend(spec, attempt, countdown_s, reason)

    def flush(self) -> None:
        self.local.flush()

    def spare(self, queue: str) -> int:
        return self.local.spare(queue)

    def spawn(self, job: Callable[[], None]) -> bool:
        return self.local.spawn(job)


def _run(
    spec: WorkflowSpec,
    carrier: Attempt,
    *,
    passengers: Sequence[tuple[str, str]],
    hop: Continuation,
    execute: Execute,
    publish: Publish,
) -> None:
    local = hop.local
    delivery = replace(hop.delivery, due_at=None, carrier=hop.delivery.carrier or carrier.task_id)
    hops = hop.delivery.hops
    for i, (step, task_id) in enumerate(passengers):
        # The first is asked about as the message's own child would be, which starts the slot's count of local steps
        # afresh; each after it counts on (a batch and the chains its steps continue stay within the slot's bound).
        if not local.accepts(spec, step, replace(delivery, hops=hops) if i else hop.delivery):
            rest = passengers[i:]
            log.info("%s: sending %d steps of its batch on as messages", carrier, len(rest))
            try:
                publish([s for s, _ in rest], dict(rest))
            except Exception:
                log.exception("%s: the rest of its batch was not sent; the sweeper sends it", carrier)
            return
        kept = Continuation(
            replace(delivery, hops=hops),
            local,
            step=step,
            task_id=task_id,
            headers=hop.delivery.headers,
            leases=hop.leases,
        )
        hops = continue_locally(spec, carrier, kept, execute)


def passengers_of(raw: object, limit: int = MAX_BATCH) -> tuple[tuple[str, str], ...]:
    """The ``(step, task_id)`` pairs a batch message carries, checked.

    Raises:
        ValueError: Not a list of at most ``limit`` pairs of non-empty strings.
    """
    if not isinstance(raw, list) or len(raw) > limit:
        raise ValueError(f"batch must be a list of at most {limit} [step, task_id] pairs")
    pairs: list[tuple[str, str]] = []
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) and v for v in pair)):
            raise ValueError("each batch entry must be [step, task_id], two non-empty strings")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)
