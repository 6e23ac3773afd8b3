"""The engine's vocabulary: run and step statuses, outcomes, attempts and the results of transitions.

The bottom of the dependency order: the coordinator, the engine, the state stores and the entry points all take
these values from here, and this module imports nothing of theirs (nor Redis, Celery or OpenTelemetry).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.definition.spec import WorkflowSpec
    from orchestrator.errors import ErrorRecord


class RunStatus(StrEnum):
    """Where a run is in its life (the status JSON's ``status``)."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def finished(self) -> bool:
        """Whether the run has ended."""
        return self in _FINISHED_RUN


_FINISHED_RUN = {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMED_OUT}


class StepStatus(StrEnum):
    """Where a step is in its life (the status JSON's ``steps.*.status``)."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    UPSTREAM_FAILED = "upstream_failed"
    CANCELLED = "cancelled"
    WAITING = "waiting"


class StepOutcome(StrEnum):
    """The final statuses a step attempt can record."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    UPSTREAM_FAILED = "upstream_failed"


class ClaimOutcome(StrEnum):
    """The answer of :meth:`StateStore.claim <orchestrator.state.base.StateStore.claim>` (see :class:`Claim`)."""

    OK = "ok"
    DONE = "done"
    STALE = "stale"
    SUPERSEDED = "superseded"
    BUSY = "busy"
    INACTIVE = "inactive"
    MISSING = "missing"


class StopOutcome(StrEnum):
    """The answer of cancelling or timing out a run (see :class:`StopResult`)."""

    OK = "ok"
    FINISHED = "finished"
    STALE = "stale"
    MISSING = "missing"


class DecisionOutcome(StrEnum):
    """The answer of recording a decision on an approval step (see :class:`DecisionResult`)."""

    OK = "ok"
    FORBIDDEN = "forbidden"
    NOT_WAITING = "not_waiting"
    STALE = "stale"
    MISSING = "missing"


class ResumeOutcome(StrEnum):
    """The answer of starting a run's next generation (see :class:`ResumeResult`)."""

    OK = "ok"
    CONFLICT = "conflict"
    REFUSED = "refused"


@dataclass(frozen=True)
class Attempt:
    """Which delivery of which step: every transition names the attempt it applies to, so a stale one is refused.

    Attributes:
        run_id: The run.
        step: The step's name.
        generation: The run's generation the message was sent in (a resume starts a new one).
        task_id: The Celery task id of the message: the step's current dispatch token.
        index: For one item of a map step (``for_each``), its 0-based index; ``None`` for the step itself.
    """

    run_id: str
    step: str
    generation: str
    task_id: str
    index: int | None = None


@dataclass(frozen=True)
class Claim:
    """The answer to "may this message run an attempt of this step?".

    Attributes:
        outcome: ``OK`` (run it), ``DONE`` (the step finished already), or why not: ``STALE`` (older generation),
            ``SUPERSEDED`` (re-dispatched under another task id), ``BUSY`` (another attempt holds a live lease, or
            the step is not released yet), ``INACTIVE`` (the run is not running), ``MISSING`` (no such run).
        attempt: 1-based number of the attempt now starting, counted over the run's whole life: the number the status
            (``attempts``), the events, the error records, the step itself and the logs all show.
        generation_attempt: 1-based number of the attempt within this generation: the retry policy's count, which
            a resume starts over (a resumed step gets its full ``max_attempts`` again).
        cache_key: The key of the step's stored result from an earlier generation ('' when none).
        force: The step must run even if its cache key matches (``resume --from`` names it).
        now: Redis's clock when the attempt started (epoch seconds).
        queued_at: When the step was last queued (the run's creation for a root), for the queue-wait metric.
        errors: Errors of earlier attempts.
        inputs: The run's inputs.
        parent_status: Each dependency's status.
        parent_output: Each dependency's output.
        detail: The finished step's status, or the inactive run's status.
        unclaimed_children: For ``done``: children released but never claimed (their dispatch may have been lost).
    """

    outcome: ClaimOutcome
    attempt: int = 0
    generation_attempt: int = 0
    now: float = 0.0
    queued_at: float | None = None
    cache_key: str = ""
    force: bool = False
    errors: list[ErrorRecord] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    parent_status: dict[str, str] = field(default_factory=dict)
    parent_output: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    unclaimed_children: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReclaimedStep:
    """A step to publish again after its lease ran out."""

    run_id: str
    step: str
    definition_hash: str
    generation: str
    task_id: str


@dataclass(frozen=True)
class StopResult:
    """The result of cancelling or timing out a run.

    Attributes:
        outcome: ``OK``; ``FINISHED`` (it had ended: ``detail`` says how); ``STALE``; ``MISSING``.
        detail: When it stopped (epoch seconds), or the status it had already ended with.
        interrupted: ``(step, task_id)`` of steps that were running or queued, to revoke.
    """

    outcome: StopOutcome
    detail: str = ""
    interrupted: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ResumeResult:
    """The result of starting a run's next generation.

    Attributes:
        outcome: ``OK``; ``CONFLICT`` (another resume moved the generation first); ``REFUSED`` (the run's status
            does not allow this resume, or the run is gone).
        generation: For ``OK`` the new generation, for ``CONFLICT`` the run's current one.
        detail: For ``REFUSED`` the run's status (``missing`` when the run is gone).
    """

    outcome: ResumeOutcome
    generation: str = ""
    detail: str = ""


@dataclass(frozen=True)
class DecisionResult:
    """The result of recording a decision on an approval step.

    Attributes:
        outcome: ``OK`` (the step now runs under the decision's task id: record its outcome next), ``FORBIDDEN``
            (the decider is not an approver), ``NOT_WAITING`` (the step is not waiting), ``STALE`` (the decision
            names another generation), ``MISSING`` (no such run or step).
        generation: For ``OK`` the generation the step runs in, for ``STALE`` the run's current one.
        detail: For ``NOT_WAITING`` the step's status.
    """

    outcome: DecisionOutcome
    generation: str = ""
    detail: str = ""


@dataclass(frozen=True)
class ResumePlan:
    """Which steps a resume resets, computed from the state read at ``expected_generation``.

    Attributes:
        expected_generation: The generation the plan was made from; the resume is refused if it moved.
        allowed_statuses: Run statuses this resume may start from.
        resets: ``(step, status, pending_parents)``: ``queued`` when all its parents keep their results.
        forced_step: The ``--from`` step, which runs even when its result could be reused.
        definition: A changed definition the run moves to (``--allow-definition-change``), else ``None``.
    """

    expected_generation: str
    allowed_statuses: tuple[str, ...]
    resets: tuple[tuple[str, str, int], ...]
    forced_step: str | None = None
    definition: WorkflowSpec | None = None

    @property
    def queued(self) -> tuple[str, ...]:
        """The steps to dispatch at once."""
        return tuple(step for step, status, _ in self.resets if status == "queued")


MAX_AUDIT_ENTRIES = 100
"""Entries an approval step's audit trail keeps: the newest, an accepted decision before any refused one.

Every decision is audited, and anyone with a token can send refused ones: the trail is re-encoded on each, so
without a cap it grew (and slowed every decision) without bound."""

MAX_DECISION_COMMENT_CHARS = 2000
"""The longest comment a decision may carry (characters); a longer one is refused before anything is written."""


@dataclass(frozen=True)
class Decision:
    """A human's decision on an approval step.

    Attributes:
        decision: ``approve`` or ``reject`` (or what a timeout decided: ``timeout:approve`` …).
        by: Who decided (``timeout`` when nobody did in time).
        comment: Free text, kept in the audit trail.
        allowed: Whether ``by`` is one of the step's approvers (a refused attempt is audited too).
        task_id: The id the step runs under while its outcome is recorded.
        lease_s: Lease for recording it (a crash in between is recovered by the sweeper).
        generation: The generation the decision is for ('' for the current one): a timeout names the generation
            its wait began in, and is refused (``stale``) once the run has moved on to another.
    """

    decision: str
    by: str
    comment: str
    allowed: bool
    task_id: str
    lease_s: float = 30.0
    generation: str = ""


@dataclass(frozen=True)
class FinishResult:
    """The result of recording a step's final outcome.

    Attributes:
        recorded: ``False`` when the attempt was stale and nothing changed.
        run_status: The run's final status when this step was its last, else ``None``.
        released: Children whose last dependency this was: they are now ``queued`` and must be dispatched.
        task_ids: The task id each released child must be published with: the lease index already holds it, due
            ``grace_s`` from now, so the sweeper sends the child again should its message be lost before any claim.
        cancelled: ``(step, task_id)`` of parents cancelled by a ``cancel_others`` child this finish released (the
            task id is empty for a step no worker had claimed): to interrupt, as a run cancel does.
        kept_claims: With a :class:`KeepRequest`: the released children claimed for this worker (each under its
            ``task_ids`` entry, not to be published), in release order, each with its claim as
            :meth:`StateStore.claim` would have answered it. The first runs in the finishing slot (:attr:`kept`), the
            others (:attr:`kept_more`, when ``most`` is above 1) in the worker's other threads.
        parent_run: When this step ended a child run (``uses: workflow``): its parent run's id, so that the run's end
            tells its parent step without reading the run again; else ``None``.
    """

    recorded: bool
    run_status: str | None = None
    released: tuple[str, ...] = ()
    task_ids: dict[str, str] = field(default_factory=dict)
    cancelled: tuple[tuple[str, str], ...] = ()
    kept_claims: dict[str, Claim] = field(default_factory=dict)
    parent_run: str | None = None

    @property
    def kept(self) -> str | None:
        """The child claimed for the finishing slot; ``None`` when no candidate was released."""
        return next(iter(self.kept_claims), None)

    @property
    def kept_claim(self) -> Claim | None:
        """The claim of :attr:`kept`."""
        return next(iter(self.kept_claims.values()), None)

    @property
    def kept_more(self) -> dict[str, Claim]:
        """The other children claimed for this worker, with their claims, in release order."""
        return dict(list(self.kept_claims.items())[1:])


@dataclass(frozen=True)
class KeepCandidate:
    """A child a finishing slot could run next, with what its claim needs (as :meth:`StateStore.claim` takes it).

    ``task_id``, when given, is the task id the finish holds (and claims) it under, in place of a fresh one: what is
    sent for it in the finish's round trip can then name it (:mod:`orchestrator.llm.preopen`).
    """

    step: str
    upstream: tuple[str, ...] = ()
    children: tuple[str, ...] = ()
    task_id: str = ""


@dataclass(frozen=True)
class KeepRequest:
    """Asked of a finish by a worker slot that can run one released child next ("continuing locally").

    The finish claims the first ``most`` children it releases, in release order, that are among ``candidates``, in
    the same transition: each under the task id it holds the child with, with ``lease_s`` and ``carrier``, exactly as
    :meth:`StateStore.claim` would claim it. The other released children are held and published as usual.

    Attributes:
        candidates: The children this slot may run (those a ``LocalSteps`` accepts).
        lease_s: The kept attempts' claim lease.
        carrier: The task id of the message whose slot runs the kept child.
        most: How many of them to claim at most: the first runs in this slot, each other in another thread of the
            same worker (1 for a worker that can take no extra work).
    """

    candidates: tuple[KeepCandidate, ...]
    lease_s: float
    carrier: str
    most: int = 1


@dataclass(frozen=True)
class ReleaseRules:
    """What a finishing step must know of its children's trigger rules beyond their names (see ``finish.lua``).

    Attributes:
        early: Child → the outcomes of this step that release it at once (its ``one_*`` rule), whatever its other
            parents are doing. Other children are released by their last parent.
        cancel: Child with ``cancel_others`` → its other parents, cancelled if this step's outcome releases it early.
        after: Each step ``cancel`` may cancel → its children with their ``early`` outcomes: a cancelled step ends
            like any other for its dependents (as ``cancelled``, which trigger rules count as failed).
    """

    early: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    cancel: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    after: Mapping[str, tuple[tuple[str, tuple[str, ...]], ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class IterationCheckpoint:
    """A finished iteration of a repeated step, as the step's record keeps it (one per step: the latest).

    Attributes:
        iteration: Its 1-based number.
        output: What it returned: the next iteration's ``previous``.
        until_met: Whether the step's ``until`` held after it.
        key: The step's result key when it ran (its definition, inputs and upstream outputs): a checkpoint is
            continued from only while the key matches.
        generation: The run's generation when it ran.
    """

    iteration: int
    output: Any
    until_met: bool
    key: str
    generation: str


@dataclass(frozen=True)
class ItemClaim:
    """The answer to "may this message run an attempt of this item?" (a map step's :class:`Claim`).

    Attributes:
        outcome: As :attr:`Claim.outcome`; ``DONE`` when the item has ended (``detail`` says how).
        attempt: The item's 1-based attempt number over the run's life.
        generation_attempt: Its number within this generation (the retry policy's count).
        now: Redis's clock when the attempt started.
        queued_at: When the item was last queued.
        item: The item's value.
        count: How many items the step has.
        step_task: The task id the map step itself runs under (its finish names it).
        inputs: The run's inputs.
        parent_status: Each dependency's status.
        parent_output: Each dependency's output.
        detail: The ended item's status, or why the claim was refused.
    """

    outcome: ClaimOutcome
    attempt: int = 0
    generation_attempt: int = 0
    now: float = 0.0
    queued_at: float | None = None
    item: Any = None
    count: int = 0
    step_task: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)
    parent_status: dict[str, str] = field(default_factory=dict)
    parent_output: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


@dataclass(frozen=True)
class ItemDispatch:
    """What an item transition decided: the items to publish and whether the step's items have all ended.

    Attributes:
        recorded: ``False`` when the attempt was stale and nothing changed.
        publish: ``(index, task_id)`` of items queued now, to send.
        all_ended: Every item of the step has ended: the step is to be finished (:func:`finish_map`).
        step_task: The map step's own task id.
        ended: How many items have ended (expansions report it).
        total: How many items the step has.
    """

    recorded: bool
    publish: tuple[tuple[int, str], ...] = ()
    all_ended: bool = False
    step_task: str = ""
    ended: int = 0
    total: int = 0


@dataclass(frozen=True)
class ReclaimedItem:
    """An item to publish again after its lease ran out."""

    run_id: str
    step: str
    index: int
    definition_hash: str
    generation: str
    task_id: str


@dataclass(frozen=True)
class ParentLink:
    """Where a child run (``uses: workflow``) came from: kept in the child run, read when it ends.

    Attributes:
        run_id: The parent run.
        step: The parent's ``workflow`` step.
        index: The map item's index when the step has ``for_each``, else ``None``.
        generation: The parent's generation that (re)started the child: only that generation's step is completed.
        depth: How deep the child nests (a top-level run is 1, its children 2 …).
    """

    run_id: str
    step: str
    index: int | None
    generation: str
    depth: int


@dataclass(frozen=True)
class ChildTotals:
    """A child run's LLM totals when it ended, counted once into its parent run."""

    spent_nusd: int = 0
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
