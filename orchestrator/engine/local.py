"""Continuing locally: a finishing step runs one of the children it released in its own worker slot.

The hop from a step to its child then skips the broker (publish, receive, acknowledge): the finish holds the child
in the lease index under a fresh task id as for any release, and instead of publishing it claims it under that task
id in the same transition (one round trip for the hop: :class:`~orchestrator.domain.KeepRequest`); the same worker
then runs it. The other released children still fan out as messages. This is Temporal's
eager activity dispatch and Celery's own chain optimisation. The broker side of it (whether a child may run here,
and telling Flower about a step no message carried) is a :class:`LocalSteps`, the worker's, so nothing here knows
Celery; a runtime without one publishes every child.

A worker that can take extra work (a threads pool: :meth:`LocalSteps.spare`) has its finish keep several released
children in the same transition (``KeepRequest.most``): the first runs in this slot as above, and each other is
handed to another of the worker's threads (:meth:`LocalSteps.spawn`) as a chain of its own, which may keep its own
children in turn. A fan-out of three after a step then costs no message at all. A handed-over child is claimed
already, so it is held in the lease keeper from its finish's claim (:class:`~orchestrator.engine.leases.LeaseKeeper`):
however long it waits for a free thread, the process's beat keeps it alive, and should the process die it is
recovered by the owner's lapse as any attempt is. If it cannot be handed over (the pool is stopping) this slot runs
it at once, then its own; if its thread never gets to it (the pool stopped first), it is left to its lease. It
retries and defers as any local step (its message sent by :meth:`LocalSteps.resend`), and anything its thread meets
is logged and leaves it to its lease, never ending the thread.

A kept ``llm`` child's first LLM call is opened in the same round trip as the finish that claims it (the
continuation's ``open_ahead``: :mod:`orchestrator.engine.preopen`, :mod:`orchestrator.llm.preopen`), and handed to
its attempt with its claim; what its attempt does not take is given back once it has run.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from orchestrator.definition.spec import WorkflowSpec
from orchestrator.domain import Attempt, Claim, ClaimOutcome, FinishResult, KeepCandidate, KeepRequest
from orchestrator.engine.coordinator import upstream_reads
from orchestrator.engine.leases import LeaseKeeper
from orchestrator.errors import RetryableStepError, StepDeferred
from orchestrator.infra.ids import new_id
from orchestrator.llm.preopen import PreOpen

log = logging.getLogger(__name__)

MAX_CANDIDATES = 8
"""Children a finish is offered to keep at most: a 1→500 fan-out releases all of them at once and keeps the first,
so naming the other 499 (each its claim's arguments) would buy nothing."""


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


OpenAhead = Callable[[str, str], PreOpen | None]
"""Opens a kept child's first LLM call ahead: given the child and the task id the finish is to claim it under, the
open for the finish's round trip, or ``None``."""


@dataclass(frozen=True)
class Kept:
    """A released child its parent's finish claimed for this worker beyond the one its slot runs next (``opened``:
    its first LLM call, opened by that finish)."""

    step: str
    task_id: str
    claim: Claim
    opened: PreOpen | None = None


@dataclass
class Continuation:
    """Offered to a finishing attempt: the released child it keeps to run in its own slot, if any, and the others it
    keeps for the worker's other threads.

    Attributes:
        step: The kept child, once the finish claimed it.
        task_id: The task id it was claimed under.
        claim: The finish's claim of it (whatever its outcome: the slot then handles it as a message's claim).
        others: The other children the finish claimed, each to run in another thread of this worker.
        leases: The process's lease keeper: holds each of ``others`` from its claim until a thread runs it.
        claimed_at: When the finish that kept them was sent (``time.monotonic()``): their claim leases run from then.
        opened: The first LLM call of the attempt this continuation is offered to, opened by its parent's finish.
        open_ahead: Set once the attempt succeeded: opens a kept child's first LLM call in the finish.
        kept_open: ``step``'s first LLM call, opened by the finish that kept it.
    """

    delivery: Delivery
    local: LocalSteps
    step: str | None = None
    task_id: str = ""
    headers: dict[str, Any] = field(default_factory=dict)
    claim: Claim | None = None
    others: tuple[Kept, ...] = ()
    leases: LeaseKeeper | None = None
    claimed_at: float = 0.0
    opened: PreOpen | None = None
    open_ahead: OpenAhead | None = None
    kept_open: PreOpen | None = None
    _opens: dict[str, PreOpen] = field(default_factory=dict)

    def request(
        self, spec: WorkflowSpec, attempt: Attempt, releasable: tuple[str, ...], lease_s: float
    ) -> KeepRequest | None:
        """What the finish of ``attempt`` is to claim for this slot: the children it may release that this slot may
        run (their queue, no time limit), in order, the first ``MAX_CANDIDATES`` of them; ``None`` when there is
        none. It claims as many of them as the worker can start now (this slot's one, and what
        :meth:`LocalSteps.spare` allows beyond it)."""
        accepted = (step for step in releasable if self.local.accepts(spec, step, self.delivery))
        candidates = tuple(
            KeepCandidate(step, upstream_reads(spec, step), spec.graph.children[step])
            for step in itertools.islice(accepted, MAX_CANDIDATES)
        )
        if not candidates:
            return None
        room = self.local.spare(self.delivery.queue) if len(candidates) > 1 else 0
        most = 1 + min(room, len(candidates) - 1)
        if self.open_ahead is not None:
            # The finish claims the first ``most`` it releases: as a rule these (an open for another would be void).
            ahead = tuple(self._open_ahead(self.open_ahead, c) for c in candidates[:most])
            candidates = ahead + candidates[most:]
        self.claimed_at = time.monotonic()
        return KeepRequest(candidates, lease_s, self.delivery.carrier or attempt.task_id, most=most)

    def _open_ahead(self, open_ahead: OpenAhead, candidate: KeepCandidate) -> KeepCandidate:
        """``candidate`` under the task id its first LLM call is opened ahead for, when it is."""
        stale = self._opens.pop(candidate.step, None)
        if stale is not None:
            _give_back(stale)  # a finish asked again (through an outage): its first request's opens are void
        task_id = new_id()
        opened = open_ahead(candidate.step, task_id)
        if opened is None:
            return candidate
        self._opens[candidate.step] = opened
        return replace(candidate, task_id=task_id)

    def following(self) -> tuple[PreOpen, ...]:
        """The opens for the finish to send after its own script (see :mod:`orchestrator.llm.preopen`)."""
        return tuple(self._opens.values())

    @property
    def kept(self) -> bool:
        """Whether the finish kept a child for this slot (claimed: run it next)."""
        return self.step is not None and bool(self.task_id)

    def take(self, result: FinishResult) -> None:
        """Remember the children the finish kept (and their claims), if any."""
        self.step = result.kept
        self.task_id = result.task_ids[result.kept] if result.kept is not None else ""
        self.claim = result.kept_claim
        opens, self._opens = self._opens, {}
        self.kept_open = opens.pop(result.kept, None) if result.kept is not None else None
        self.others = tuple(
            Kept(step, result.task_ids[step], claim, opens.pop(step, None)) for step, claim in result.kept_more.items()
        )
        for opened in opens.values():
            _give_back(opened)  # not claimed, so not opened (the open's guard): nothing to send, as a rule


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

    def spare(self, queue: str) -> int:
        """How many released children of ``queue`` beyond the slot's own this worker may take now, each to run in
        another of its threads (0 for a worker that runs one step per slot: prefork, or one stopping)."""

    def spawn(self, job: Callable[[], None]) -> bool:
        """Run ``job`` in another thread of this worker, after the work already handed to its threads (never more
        threads than its concurrency); ``False`` when it cannot (the caller then runs it itself). ``job`` never
        raises."""


Execute = Callable[[Attempt, Delivery, "Continuation", Claim | None], tuple[str, str | None]]
"""Runs one attempt here (claimed already, or claiming it when not): what happened, and its failure summary when it
failed for good."""


def continue_locally(spec: WorkflowSpec, parent: Attempt, hop: Continuation, execute: Execute) -> int:
    """Run the child each finish kept in this slot, one after another, announcing each through ``hop.local``; the
    other children a finish kept go to the worker's other threads (:meth:`LocalSteps.spawn`) before its slot's own
    runs.

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
        _spawn_others(spec, parent, hop, execute)
        attempt = Attempt(parent.run_id, hop.step, parent.generation, hop.task_id)
        claim = hop.claim
        hops = hop.delivery.hops + 1
        delivery = replace(hop.delivery, headers=hop.headers, due_at=None, carrier=carrier, hops=hop.delivery.hops + 1)
        hop = Continuation(delivery, local, leases=hop.leases, opened=hop.kept_open)
        try:
            local.started(spec, attempt, delivery)
        except BaseException:
            if hop.opened is not None:
                _give_back(hop.opened)
            raise
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
        finally:
            if hop.opened is not None:
                _give_back(hop.opened)  # what its attempt did not take (none, as a rule)
        local.ended(attempt, result, failure, more=hop.kept)
    return hops


def _spawn_others(spec: WorkflowSpec, parent: Attempt, hop: Continuation, execute: Execute) -> None:
    """Hand each of the other children the finish kept to another thread of this worker, as a chain of its own.

    Each is held in the lease keeper from its claim (``hop.claimed_at``), so a wait for a free thread never lets the
    sweeper take it for lost while this process lives; a process that dies leaves it to its lease, as any attempt.
    """
    for kept in hop.others:
        attempt = Attempt(parent.run_id, kept.step, parent.generation, kept.task_id)
        if hop.leases is not None and kept.claim.outcome == ClaimOutcome.OK:
            hop.leases.hold(attempt, since=hop.claimed_at)
        chain = Continuation(
            hop.delivery,
            hop.local,
            step=kept.step,
            task_id=kept.task_id,
            headers=hop.headers,
            claim=kept.claim,
            leases=hop.leases,
            kept_open=kept.opened,
        )
        job = functools.partial(_run_spawned, spec, parent, chain, execute, attempt)
        if not hop.local.spawn(job):
            job()
    hop.others = ()


def _run_spawned(spec: WorkflowSpec, parent: Attempt, chain: Continuation, execute: Execute, attempt: Attempt) -> None:
    """Run a kept child handed to another thread, and the chain it continues; never raises (a pool thread must not
    end on it silently): what goes wrong is logged and the attempt left to its lease."""
    try:
        continue_locally(spec, parent, chain, execute)
    except Exception:
        log.exception("%s: run in another thread, it failed there; left to its lease", attempt)
    finally:
        if chain.leases is not None:
            chain.leases.release(attempt)  # a no-op once it ran: its own run released it
        if chain.kept_open is not None:
            _give_back(chain.kept_open)  # a no-op once it ran: its attempt took it or gave it back
        try:
            chain.local.flush()
        except Exception:
            log.exception("%s: its task events were not sent", attempt)


def _give_back(opened: PreOpen) -> None:
    """Give back what a call opened ahead holds, at once (never raises: what is lost is logged)."""
    back = opened.give_back()
    if back is not None:
        back.send()
