"""The state-store contract (its values live in :mod:`orchestrator.domain`)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

    from orchestrator.definition.spec import WorkflowSpec
    from orchestrator.engine.events import Event
    from orchestrator.errors import DeferralRecord, ErrorRecord
    from orchestrator.state.owed import OwedWrite, OwedWrites


from orchestrator.domain import (
    Attempt,
    ChildTotals,
    Claim,
    Decision,
    DecisionResult,
    FinishResult,
    IterationCheckpoint,
    KeepRequest,
    ParentLink,
    ReclaimedStep,
    ReleaseRules,
    ResumePlan,
    ResumeResult,
    RunStatus,
    StepOutcome,
    StopResult,
)
from orchestrator.engine.coordinator import failure_summary
from orchestrator.infra.json_text import compact
from orchestrator.state.items import ItemStore

SUMMARY_FIELDS = (
    "run_id",
    "workflow",
    "version",
    "status",
    "gen",
    "created_at",
    "finished_at",
    "started_at",
    "error",
    "first_failure",
    "llm_spent_nusd",
    "llm_calls",
    "llm_input_tokens",
    "llm_output_tokens",
)
"""The run fields a listing reads (one ``HMGET`` per run); :meth:`StateStore.run_summaries` adds ``failure_error``."""

MAX_SUBMITTED_DEFINITIONS = 1000
"""Submitted definitions :meth:`StateStore.submitted_definitions` remembers, the most recently submitted."""


class StateStore(ItemStore, Protocol):
    """Where runs, step attempts, leases and definitions live: the contract both stores keep.

    ``RedisStateStore`` runs each transition as one Lua script on the run's own hash; ``MemoryStateStore`` does the
    same in-process under one lock. ``tests/unit/test_state_contract.py`` runs one suite against both.

    A run is a flat map of strings: run fields (``status``, ``gen``, ``inputs``, ``remaining``, ``failures`` …) and
    step fields ``s:STEP:FIELD`` (``status``, ``task``, ``lease``, ``attempts``, ``output``, ``errors`` …), so
    ``orchestrator.engine.status.run_view`` reads either store's :meth:`run_fields`. Every step transition names the
    :class:`Attempt` it applies to and is refused when that attempt is stale: another generation, or a task id that
    no longer owns the step. A run that outlived its retention behaves exactly like one that never existed.
    """

    def ping(self) -> None:
        """Check that the store answers.

        Raises:
            StoreUnavailableError: When it does not.
        """
        ...

    def save_definition(self, spec: WorkflowSpec) -> None:
        """Store a workflow definition under its ``definition_hash`` (refreshing its TTL) and note it as submitted."""
        ...

    def load_definition(self, definition_hash: str) -> WorkflowSpec:
        """The definition stored under ``definition_hash``.

        Raises:
            DefinitionNotFoundError: When it expired or never existed.
        """
        ...

    def reserve_idempotency_key(self, key: str, run_id: str) -> str:
        """Bind ``key`` to ``run_id`` unless it is bound already.

        Returns:
            The run id ``key`` is bound to: ``run_id`` when this call bound it, else the earlier run's id.
        """
        ...

    def release_idempotency_key(self, key: str, run_id: str) -> None:
        """Forget ``key`` if it is still bound to ``run_id`` (a creation that failed half way)."""
        ...

    def create_run(self, run_id: str, spec: WorkflowSpec, inputs: dict[str, Any], idempotency_key: str | None) -> bool:
        """Create a ``running`` run with its roots ``queued`` and every other step ``pending``.

        Each step gets a pending-parent counter; the run counts ``remaining`` steps and ``failures``. The run is kept
        for four times the retention period while it runs.

        Returns:
            ``False`` when a (live) run with this id exists already; nothing is changed then.
        """
        ...

    def run_fields(self, run_id: str) -> dict[str, str]:
        """Every field of the run, as strings (the input of ``orchestrator.engine.status.run_view``).

        Raises:
            RunNotFoundError: When the run does not exist or its retention expired.
        """
        ...

    def run_parent(self, run_id: str) -> str | None:
        """The parent run of a child run (started by a ``uses: workflow`` step), read alone; ``None`` for a run that
        is no child or is not kept. What a run's end asks first, so that a run with no parent costs one field."""
        ...

    def list_run_ids(self, limit: int = 100, offset: int = 0) -> list[str]:
        """Run ids, newest first, at most ``limit`` of them after skipping the ``offset`` newest."""
        ...

    def submitted_definitions(self) -> list[dict[str, Any]]:
        """Definitions submitted lately, most recent first (the newest ``MAX_SUBMITTED_DEFINITIONS``, while kept).

        Each is ``{"name", "version", "definition_hash", "first_submitted", "last_submitted"}`` (epoch seconds).
        """
        ...

    def mark_dispatch_failed(self, run_id: str, message: str) -> None:
        """Fail a run whose first tasks could not be published (``error`` = ``message``), keep it for the retention."""
        ...

    def claim(
        self,
        attempt: Attempt,
        *,
        lease_s: float,
        upstream: tuple[str, ...],
        children: tuple[str, ...],
        carrier: str = "",
    ) -> Claim:
        """Start an attempt of a step if this message may run it; the only way a step starts running.

        In order: an unknown run or step is ``missing``; another generation is ``stale``; a finished step is
        ``done`` (whatever the task id), listing the ``children`` that are ``queued`` but were never claimed; a run
        that is not ``running`` is ``inactive``; a step not released yet, or already running (even under the same
        task id), is ``busy``; a queued step owned by another task id (re-queued by :meth:`reclaim`) is
        ``superseded``. Otherwise the step becomes ``running``, owned by ``attempt.task_id``, its attempt counter
        goes up and its lease runs ``lease_s`` seconds from now.

        Args:
            attempt: The delivery asking.
            lease_s: How long the attempt may go without :meth:`renew` before the sweeper may reclaim it.
            upstream: Steps whose status and output the attempt needs.
            children: The step's children, for a duplicate delivery of a finished step to find lost dispatches.
            carrier: The task id of the message whose worker slot runs the step, when it continues locally after its
                parent (``""`` otherwise); stopping the run lists it among the task ids to interrupt.
        """
        ...

    def finish(
        self,
        attempt: Attempt,
        outcome: StepOutcome,
        *,
        output: Any = None,
        error: ErrorRecord | None = None,
        children: tuple[str, ...] = (),
        cache_key: str = "",
        cached: bool = False,
        grace_s: float = 300.0,
        rules: ReleaseRules | None = None,
        keep: KeepRequest | None = None,
        owed: OwedWrites | None = None,
        then: Sequence[OwedWrite] = (),
    ) -> FinishResult:
        """Record a running attempt's final outcome and release the children it decides.

        A child is released (``queued``) when this was its last unfinished parent, or at once when its ``one_*``
        rule fires on this outcome (``rules.early``); only while it is still ``pending``, so it is queued exactly
        once however its parents race. A child with ``cancel_others`` released early cancels its other parents
        still unfinished (``FinishResult.cancelled``, to interrupt); they end as ``cancelled`` for their own children.

        A success stores ``output`` and ``cache_key`` (an empty ``output`` with ``cached`` keeps the stored output:
        a result reused on resume); any other outcome clears the output.

        ``error`` is also appended to the step's ``errors``. A ``failed`` or ``upstream_failed`` leaf (no children)
        counts as a failure of the run, as in Airflow (the run's state follows its leaves); the first ``failed`` step
        is remembered as ``first_failure`` (with its summary, :func:`failure_line`), and every ``failed`` step in
        ``failed_steps``. When this was the run's last step the run becomes ``failed`` (a failed leaf; its
        ``run_failed`` event carries :func:`run_failed_data`) or ``succeeded`` and is kept for the retention period
        from now. The attempt leaves the lease index in every case. Each released child enters it under a fresh task
        id (``FinishResult.task_ids``), due ``grace_s`` from now: a worker dying between this call and the publish,
        or a message lost in the broker, leaves the sweeper a step to send again.

        With ``keep``, the first ``keep.most`` released children among its candidates, in release order, are claimed
        in the same transition, each as :meth:`claim` would claim it under its task id (``FinishResult.kept`` and
        ``kept_claim`` for the first, ``kept_more`` for the others): each one's lease index entry is then the
        attempt's lease, or gone when its claim was refused. Their ``step_queued`` and ``step_started`` events follow
        this step's.

        A finish that ends the run also drops its workflow deadline and announces its end on the global stream
        (``run_succeeded`` or ``run_failed``, as :meth:`announce` would, after the run's own event), in the same
        transition where the store can; ``FinishResult.parent_run`` then names the run's parent when it is a child.

        What the attempt ``owed`` Redis (its LLM calls' closes, :mod:`orchestrator.state.owed`) is applied before the
        transition, in its round trip when the store can share it, and is sent whether or not the attempt is stale.
        ``then``'s writes (the opens of kept children's LLM calls, :mod:`orchestrator.llm.preopen`) are queued after
        it in the same round trip, each taking its own reply, where the store shares one with their Redis; elsewhere
        they are not sent (nothing then waits for them).

        Returns:
            ``FinishResult(recorded=False)`` when the attempt is stale (other generation, step not running, or owned by
            another task id): nothing changed.
        """
        ...

    def hold_dispatch(self, run_id: str, task_ids: dict[str, str], grace_s: float) -> None:
        """Enter steps about to be published in the lease index under the task ids their messages will carry.

        Due ``grace_s`` from now: should the message be lost before any worker claims the step, the sweeper finds
        the step still ``queued`` and unclaimed and sends it again under the same task id (see :meth:`reclaim`).
        A claim under that task id turns the entry into the attempt's lease.
        """
        ...

    def retry(self, attempt: Attempt, error: ErrorRecord, *, countdown_s: float, grace_s: float) -> bool:
        """Put a running attempt's step back to ``queued`` after a retryable error, appending it to ``errors``.

        The step stays owned by the same task id: Celery's retry message carries it, so that message may claim.
        The attempt stays in the lease index with a lease of ``countdown_s + grace_s``, so a delayed retry lost
        with its worker is sent again by the sweeper.

        Returns:
            ``False`` when the attempt is stale (as for :meth:`finish`); nothing changed then.
        """
        ...

    def defer(self, attempt: Attempt, deferral: DeferralRecord, *, countdown_s: float, grace_s: float) -> bool:
        """Put a running attempt's step back to ``queued`` for ``countdown_s`` without counting the attempt.

        For a step that must wait for a shared LLM rate limit or a provider's cool-down: it failed nothing, so the
        attempt number is given back, and it holds no worker slot while it waits (the delayed message does). Records
        ``deferred_until``, the ``deferral`` detail and a ``step_deferred`` event; leases as :meth:`retry` does.

        Returns:
            ``False`` when the attempt is stale; nothing changed then.
        """
        ...

    def renew(self, leases: dict[str, list[tuple[str, str]]], lease_s: float) -> list[tuple[str, str, str, bool]]:
        """Extend to ``lease_s`` from now the leases of attempts that still run and are still owned.

        Args:
            leases: ``(step, task_id)`` pairs grouped by run id.
            lease_s: The new lease length.

        Returns:
            ``(run_id, step, task_id, renewed)`` for every pair, in order; ``renewed`` is ``False`` where the attempt
            finished, was re-queued, or its run is gone or not running.
        """
        ...

    def expired_leases(self, limit: int = 500, buckets: Sequence[str | None] | None = None) -> list[str]:
        """Lease index members (``run|step|task``) whose lease ran out, oldest first, at most ``limit``; only those of
        ``buckets`` (:meth:`sweep_buckets`) when given."""
        ...

    def keep_owner(self, owner: str, alive_s: float, *, joined: Sequence[str] = (), left: Sequence[str] = ()) -> None:
        """Mark the process ``owner`` alive for ``alive_s`` from now and update the attempts it covers.

        Args:
            owner: The process's id (:class:`orchestrator.engine.leases.LeaseKeeper`).
            alive_s: How long it is known alive without another beat; 0 when it runs nothing more: it leaves the
                owners index (a process that is idle is never taken for dead).
            joined: Lease index members it now covers; added before the beat is recorded.
            left: Lease index members it no longer covers (their attempts ended).
        """
        ...

    def dead_owners(self, limit: int = 100) -> list[str]:
        """Owners whose heartbeat ran out, at most ``limit``."""
        ...

    def owned(self, owner: str) -> list[str]:
        """The lease index members that ``owner`` covers."""
        ...

    def owner_alive(self, owner: str) -> bool:
        """Whether ``owner``'s heartbeat is current."""
        ...

    def forget_owner(self, owner: str, members: Sequence[str]) -> None:
        """Drop a dead owner once the attempts it covered (``members``) were recovered; if it beat again
        meanwhile, it stays, with whatever it covers besides ``members``."""
        ...

    def reclaim(
        self,
        member: str,
        new_task_id: str,
        error: ErrorRecord,
        *,
        grace_s: float,
        backlog_wait_s: float = 0.0,
        owner_dead: bool = False,
    ) -> ReclaimedStep | None:
        """Recover the step behind an expired lease.

        A ``running`` step whose lease ran out (its worker died) is re-queued under ``new_task_id`` with ``error``
        appended; a ``queued`` one (a delayed retry or re-dispatch lost with its worker, or a step no worker has
        claimed since :meth:`hold_dispatch` or :meth:`finish` released it) is sent again under the task id of the
        expired entry. Either way it gets a lease of ``grace_s`` to be claimed in; a ``queued`` step's grace doubles
        with each resend, up to 8 times ``grace_s``, so a step waiting behind a long backlog is not resent every period.
        A lease renewed meanwhile is put back in the index at its new expiry.

        ``backlog_wait_s`` > 0 says the step queues hold a backlog: a step nobody has claimed is then likely still
        waiting in it, so its hold is extended by ``grace_s`` instead of sending a copy, until the step has waited
        ``backlog_wait_s`` since it was queued.

        ``owner_dead`` says the process running the attempt stopped beating (:meth:`dead_owners`): a ``running``
        step is then re-queued without waiting for its lease.

        Returns:
            What to publish, or ``None`` when there is nothing to do.
        """
        ...

    def stop(
        self, run_id: str, status: RunStatus, reason: str, steps: tuple[str, ...], generation: str = ""
    ) -> StopResult:
        """End a running run as ``cancelled`` or ``timed_out``: its unfinished ``steps`` become ``cancelled``.

        ``generation`` (when given) must match, so a deadline of an earlier generation cannot stop a resumed run.
        """
        ...

    def resume(self, run_id: str, plan: ResumePlan) -> ResumeResult:
        """Start the next generation: reset the plan's steps, unless the generation moved or the status forbids it.

        Returns:
            ``OK`` with the new generation, ``CONFLICT`` with the run's current generation, or ``REFUSED`` with the
            run's status (``missing`` when the run is gone).
        """
        ...

    def add_deadline(self, run_id: str, generation: str, at: float) -> None:
        """Schedule a run's workflow deadline."""
        ...

    def due_deadlines(self, limit: int = 500, buckets: Sequence[str | None] | None = None) -> list[tuple[str, str]]:
        """``(run_id, generation)`` of deadlines that have passed."""
        ...

    def drop_deadline(self, run_id: str, generation: str) -> None:
        """Forget a deadline."""
        ...

    def wait_for_decision(self, attempt: Attempt, data: dict[str, Any], timeout_s: float | None) -> bool:
        """Park a claimed approval step as ``waiting`` (no task, no lease); schedule its timeout.

        Returns:
            ``False`` when the attempt is stale.
        """
        ...

    def decide(self, run_id: str, step: str, decision: Decision) -> DecisionResult:
        """Audit a decision; the first allowed one on a waiting step makes it ``running`` under ``decision.task_id``.

        A decision naming another ``generation`` than the run's changes nothing (not even the audit). The audit keeps
        the newest :data:`MAX_AUDIT_ENTRIES` (refused ones give way first) and, once the run has ended, records no
        refused decision; the step's approval timeout leaves the index when a decision wins.

        Returns:
            ``OK`` with the generation the step now runs in, ``FORBIDDEN``, ``NOT_WAITING`` with the step's status
            (as ``detail``), ``STALE`` with the run's generation, or ``MISSING``.
        """
        ...

    def due_approvals(
        self, limit: int = 500, buckets: Sequence[str | None] | None = None
    ) -> list[tuple[str, str, str]]:
        """``(run_id, generation, step)`` of approval waits whose timeout passed."""
        ...

    def drop_approval(self, run_id: str, generation: str, step: str) -> None:
        """Forget an approval timeout."""
        ...

    def run_summaries(self, run_ids: list[str]) -> list[dict[str, str]]:
        """The :data:`SUMMARY_FIELDS` of each run still kept, in order (``""`` for a field not set).

        A failed run with a ``first_failure`` step but no run ``error`` also gets ``failure_error``: that step's error
        record (JSON), read in a second round trip for those runs only.
        """
        ...

    def events(self, run_id: str, after: int = 0, count: int | None = None) -> list[Event]:
        """The run's events with ``seq > after``, in order (at most ``count``)."""
        ...

    def wait_events(self, run_id: str, after: int, timeout_s: float) -> list[Event]:
        """Like :meth:`events`, but wait up to ``timeout_s`` until at least one arrives."""
        ...

    def announce(self, run_id: str, event_type: str, workflow: str) -> None:
        """Append a run-level event to the global stream dashboards follow."""
        ...

    def record_iteration(self, attempt: Attempt, checkpoint: IterationCheckpoint) -> bool:
        """Checkpoint a finished iteration of a running attempt's repeated step, replacing the one before.

        Guarded as :meth:`finish` is: the attempt must still own the running step in its generation. The step's
        ``iterations`` and ``until_met`` fields follow the checkpoint, and a ``step_iteration`` event (data
        ``{"iteration": N, "until_met": BOOL}``, the step's attempt number) tells it. The checkpoint outlives the
        attempt (retries, a lost worker, a resume all continue from it) and expires with the run.

        Returns:
            ``False`` when the attempt is stale; nothing changed then.
        """
        ...

    def iteration_checkpoint(self, run_id: str, step: str) -> IterationCheckpoint | None:
        """The step's latest checkpointed iteration, or ``None`` when it has none (or the run is gone)."""
        ...

    def record_journal_entry(
        self, attempt: Attempt, entry_id: str, entry_json: str, *, event: str = "", event_data: str = ""
    ) -> bool:
        """Journal an entry of a running attempt's agent step (a turn, a tool call), replacing one of the same id.

        Guarded as :meth:`finish` is. With ``event``, emits it (data ``event_data``, the step's attempt number) in
        the same transition. The journal outlives the attempt (the next one replays it) and expires with the run.

        Returns:
            ``False`` when the attempt is stale; nothing changed then.
        """
        ...

    def link_parent(self, child_run_id: str, link: ParentLink, *, budget_cap_nusd: int | None = None) -> None:
        """Write the child run's ``parent_run``, ``parent_step``, ``parent_index``, ``parent_gen`` and ``depth``.

        ``budget_cap_nusd`` (what the parent had left, in nano-dollars) caps the child's LLM spend besides its own
        ``budget_usd``. Writing again (a resumed parent's new generation) replaces the link.
        """
        ...

    def wait_for_child(self, attempt: Attempt, child_run_id: str) -> bool:
        """Park a claimed ``workflow`` step as ``waiting`` for its child run (no task, no lease), noting the child.

        Emits ``step_waiting`` with data ``{"child_run_id": ID}``. Guarded as :meth:`finish` is.

        Returns:
            ``False`` when the attempt is stale; nothing changed then.
        """
        ...

    def journal(self, run_id: str, step: str) -> dict[str, str]:
        """Every journal entry of an agent step, by id (empty when it has none, or the run is gone)."""
        ...

    def write_note(self, run_id: str, key: str, value_json: str) -> None:
        """Set a note on the run's blackboard (``notes.write``), kept as long as the run."""
        ...

    def read_note(self, run_id: str, key: str) -> str | None:
        """A note's JSON (``notes.read``), or ``None`` when nobody wrote it."""
        ...

    def child_ended(
        self,
        link: ParentLink,
        child_run_id: str,
        totals: ChildTotals,
        *,
        task_id: str,
        lease_s: float,
        tool: bool = False,
    ) -> bool:
        """A child run ended: count its spend into the parent and take the waiting parent step over.

        With ``tool`` (the child of an agent step's ``workflow:NAME`` call) the totals are counted once per child
        (under a field of its own, whatever the step's ``child_run_id``) and the step is never taken over: the
        agent's attempt, still running, waits for the child itself.

        While ``child_run_id`` is the step's child, the child's ``totals`` not counted yet are added to the parent
        run's LLM totals (once, however often the child ends). When the parent is at ``link.generation``, running,
        and the step waits, the step becomes ``running`` under ``task_id`` with a lease of ``lease_s`` (indexed),
        to be finished next with the child's outcome.

        Returns:
            Whether the step was taken over.
        """
        ...

    def try_sweeper_lock(self, owner: str, ttl_s: float) -> bool:
        """Take the cluster-wide sweeper turn for ``ttl_s`` seconds; ``False`` while anyone (``owner`` too) holds it."""
        ...

    def sweep_buckets(self, owner: str, interval_s: float) -> list[str | None]:
        """The buckets of the global indices (:mod:`orchestrator.state.keys`) the sweeper ``owner``, sweeping every
        ``interval_s``, sweeps this turn; ``[]`` for none.

        One bucket (``ORCH_SHARDS=1``): ``[None]`` when ``owner`` wins the turn (:meth:`try_sweeper_lock` for 0.9
        interval). Several: each live sweeper holds its share of them, renewed every turn (see
        :mod:`orchestrator.engine.sweep`).
        """
        ...


def failure_line(step: str, outcome: StepOutcome, error: ErrorRecord | None) -> str:
    """The one-line summary a ``failed`` outcome leaves for the run's ``run_failed`` event; '' for any other."""
    return failure_summary(step, error) if outcome == StepOutcome.FAILED else ""


def run_failed_data(failure: str | None, failed_steps: list[str], *, reason: str | None = None) -> str:
    """The ``run_failed`` event's data: the status's one-line ``error``, the failed steps, a dispatch ``reason``."""
    data: dict[str, Any] = {"reason": reason} if reason is not None else {}
    data.update({"error": failure or "run failed", "failed_steps": failed_steps})
    return json.dumps(data, separators=(",", ":"))


def success_detail(output: Any) -> str:
    """The ``step_succeeded`` event's data for an output: an LLM step's usage and cost, else nothing ('')."""
    if not isinstance(output, dict) or "usage" not in output:
        return ""
    detail = {"usage": output["usage"], "cost_usd": output.get("cost_usd")}
    if output.get("reply_cached"):
        detail["reply_cached"] = True
    return compact(detail)


def rules_json(rules: ReleaseRules | None) -> str:
    """``ReleaseRules`` as ``finish.lua`` reads them ('' when no child fires early)."""
    if rules is None or not rules.early:
        return ""
    data = {
        "early": {c: list(on) for c, on in rules.early.items()},
        "cancel": {c: list(parents) for c, parents in rules.cancel.items()},
        "after": {p: [[g, list(on)] for g, on in pairs] for p, pairs in rules.after.items()},
    }
    return json.dumps(data, separators=(",", ":"))


def releasable(children: tuple[str, ...], rules: ReleaseRules | None) -> tuple[str, ...]:
    """Every step a finish may release: its children, and the children of the parents it may cancel."""
    more = [g for pairs in (rules.after.values() if rules else ()) for g, _ in pairs]
    return tuple(dict.fromkeys([*children, *more]))


def needs_failure_error(row: dict[str, str]) -> bool:
    """Whether a summary row is of a failed run whose one-line error must come from its first failed step."""
    return row.get("status") == "failed" and not row.get("error") and bool(row.get("first_failure"))


def submitted_record(definition_hash: str, last_submitted: float, record: dict[str, Any]) -> dict[str, Any]:
    """One entry of :meth:`StateStore.submitted_definitions`, from its index score and record."""
    return {
        "name": str(record["name"]),
        "version": int(record["version"]),
        "definition_hash": definition_hash,
        "first_submitted": float(record["first_submitted"]),
        "last_submitted": float(last_submitted),
    }


ENDED_SCRATCH_FIELDS = (
    "task",
    "lease",
    "pending",
    "attempt_started_at",
    "force",
    "attempt_base",
    "deferred_until",
    "deferral",
    "carrier",
)
"""Step fields a run drops when it ends (``lua/_ended.lua``): per-attempt scratch no reader needs any more.

A resume writes each of them afresh for the steps it resets; the status JSON reads none of them for an ended run.
"""

ENDED_IF_EMPTY_FIELDS = ("cache_key", "cached")
"""Step fields an ended run drops while they say nothing (``''``, or ``cached`` other than ``'1'``)."""

ENDED_RUN_IF_EMPTY_FIELDS = ("idempotency_key", "timeout_s")
"""Run fields an ended run drops when ``''``."""


def compact_ended(fields: dict[str, str]) -> None:
    """Drop what an ended run keeps for no reader, as ``lua/_ended.lua`` does (the memory store's twin)."""
    for name in list(fields):
        suffix = name.rsplit(":", 1)[1] if name.startswith("s:") else None
        value = fields[name]
        if (
            suffix in ENDED_SCRATCH_FIELDS
            or (suffix in ENDED_IF_EMPTY_FIELDS and (value == "" or (suffix == "cached" and value != "1")))
            or (suffix is None and name in ENDED_RUN_IF_EMPTY_FIELDS and value == "")
        ):
            del fields[name]


LOOP_FIELDS = ("iterations", "until_met", "loop_key", "loop_gen", "loop_output")
"""The step fields a loop checkpoint writes (``iterations`` and ``until_met`` are also the status JSON's)."""


def checkpoint_from(row: list[str | None]) -> IterationCheckpoint | None:
    """A checkpoint from its step fields (in :data:`LOOP_FIELDS` order), or ``None`` when the step has none."""
    iterations, met, key, generation, output = row
    if not iterations or output is None:
        return None
    return IterationCheckpoint(
        iteration=int(iterations),
        output=json.loads(output),
        until_met=met == "1",
        key=key or "",
        generation=generation or "",
    )


def link_fields(link: ParentLink, budget_cap_nusd: int | None) -> dict[str, str]:
    """The child run's fields that name its parent (and cap its budget)."""
    fields = {
        "parent_run": link.run_id,
        "parent_step": link.step,
        "parent_index": "" if link.index is None else str(link.index),
        "parent_gen": link.generation,
        "depth": str(link.depth),
    }
    if budget_cap_nusd is not None:
        fields["budget_cap_nusd"] = str(max(0, budget_cap_nusd))
    return fields
