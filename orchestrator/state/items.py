"""The state-store contract for a map step's items, and what both stores share to keep it.

A map step (``for_each``) is one step of the run hash while its items live in their own hash
(:func:`~orchestrator.state.keys.items_key`, fields ``INDEX:FIELD``); the step's counts of items by status are step
fields (``s:STEP:items_STATUS``), so the status JSON never walks 10,000 items. Each item is claimed, leased,
retried, reclaimed and finished like a step (``lua/item_*.lua``), under the task id its own message carries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NotRequired, Protocol

from typing_extensions import TypedDict

from orchestrator.infra.timestamps import iso
from orchestrator.state import keys

if TYPE_CHECKING:
    from orchestrator.domain import (
        Attempt,
        ChildTotals,
        Decision,
        DecisionResult,
        ItemClaim,
        ItemDispatch,
        ParentLink,
        ReclaimedItem,
        StepOutcome,
    )
    from orchestrator.errors import ErrorRecord
    from orchestrator.state.owed import OwedWrites

ITEM_STATUSES = ("pending", "queued", "running", "waiting", "succeeded", "failed", "skipped", "cancelled")
"""Every status an item can have; the step keeps a counter of each (``s:STEP:items_STATUS``)."""

ITEM_FIELDS = ("status", "item", "attempts", "started_at", "finished_at", "output", "error", "child_run_id")
"""The item fields a record shows."""

MAX_ITEM_PAGE = 1000
"""The most item records one page may hold."""


class ItemRecord(TypedDict):
    """One item of a map step, as the items endpoint and ``status --step`` list it."""

    index: int
    item: Any
    status: str
    attempts: int
    started_at: str | None
    finished_at: str | None
    output: Any
    error: dict[str, Any] | None
    child_run_id: NotRequired[str]
    """The child run of a ``workflow`` map step's item, once it started one (absent for other kinds)."""


class ItemPage(TypedDict):
    """One page of a map step's item records (``GET /runs/{id}/steps/{step}/items``, ``status --step``)."""

    run_id: str
    step: str
    total: int
    offset: int
    limit: int
    items: list[ItemRecord]


class ItemCounts(TypedDict):
    """A map step's items by status (``items`` in the status JSON)."""

    total: int
    pending: int
    queued: int
    running: int
    waiting: int
    succeeded: int
    failed: int
    skipped: int
    cancelled: int


class ItemStore(Protocol):
    """The item transitions both stores keep (``tests/unit/test_state_contract.py`` runs them on both)."""

    def expand_items(
        self, attempt: Attempt, items: list[str], result_keys: list[str], *, max_parallel: int, grace_s: float
    ) -> ItemDispatch:
        """Turn a claimed map step into its items (JSON texts) and queue the first ``max_parallel`` (0: all).

        An item that succeeded in an earlier generation under the same non-empty result key keeps its result; the
        rest become ``pending``. Expanding again in the same generation changes nothing and reports the counts.
        The step stays ``running`` under ``attempt``'s task with a lease of ``grace_s``, which the sweeper extends
        while items are unfinished (so a lost finish of the step is recovered). Queued items enter the lease index
        under their task ids, due ``grace_s`` from now.

        Returns:
            ``ItemDispatch(recorded=False)`` when the attempt is stale.
        """
        ...

    def claim_item(self, attempt: Attempt, *, lease_s: float, upstream: tuple[str, ...]) -> ItemClaim:
        """Start an attempt of item ``attempt.index``, by the rules of :meth:`StateStore.claim`.

        ``inactive`` also when the map step itself is no longer running (cancelled).
        """
        ...

    def finish_item(
        self,
        attempt: Attempt,
        outcome: StepOutcome,
        *,
        output: Any = None,
        error: ErrorRecord | None = None,
        grace_s: float = 300.0,
        may_refill: bool = True,
        owed: OwedWrites | None = None,
    ) -> ItemDispatch:
        """Record a running item's final outcome and queue the pending items its place frees (``max_parallel``).
        ``output`` is kept whatever the outcome (an approval item's rejection keeps its decision).

        ``all_ended`` says this was the last unfinished item: the caller finishes the step. The attempt leaves the
        lease index once the items queued are in it (as :meth:`expand_items` says); ``may_refill`` ``False`` (the
        step has no ``max_parallel``, so nothing can be queued) lets it leave at once. What the attempt ``owed``
        Redis is applied first, as :meth:`StateStore.finish` says.
        """
        ...

    def retry_item(
        self, attempt: Attempt, error: ErrorRecord | None, *, countdown_s: float, grace_s: float, counted: bool = True
    ) -> bool:
        """Put a running item back to ``queued`` for ``countdown_s``: after a retryable ``error`` (``counted``), or
        deferred for a shared limit (not ``counted``: the attempt number is given back). Leases as
        :meth:`StateStore.retry` does. ``False`` when the attempt is stale."""
        ...

    def reclaim_item(
        self,
        member: str,
        new_task_id: str,
        error: ErrorRecord,
        *,
        grace_s: float,
        backlog_wait_s: float = 0.0,
        owner_dead: bool = False,
    ) -> ReclaimedItem | None:
        """Recover the item behind an expired lease index ``member``, by the rules of :meth:`StateStore.reclaim`."""
        ...

    def extend_item_holds(self, run_id: str, step: str, items: Sequence[tuple[int, str]], *, grace_s: float) -> None:
        """Hold ``items`` (``(index, task_id)`` each) for ``grace_s`` from now while their publish is under way: each
        still ``queued`` under its task id gets that lease (in the lease index too), so the sweeper sends no copy of
        an item a long publish has not reached yet. Its ``queued_at`` stays. The others (claimed, sent again under
        another id, ended) are left alone."""
        ...

    def stop_items(self, run_id: str, step: str, generation: str) -> list[str]:
        """Cancel every unfinished item of a stopped run's map step; returns the task ids to interrupt."""
        ...

    def wait_item_child(self, attempt: Attempt, child_run_id: str) -> bool:
        """Park a running item of a ``workflow`` map step as ``waiting`` for its child run: no task, no lease (the
        sweeper leaves it alone), still one of ``max_parallel``; the attempt leaves the lease index. ``False`` when
        the attempt is stale."""
        ...

    def wait_item_decision(self, attempt: Attempt, data: dict[str, Any], timeout_s: float | None) -> bool:
        """Park a running item of an ``approval`` map step as ``waiting`` for a human decision on it, as
        :meth:`wait_item_child` parks one for its child (``data``: the ``item_waiting`` event's, with ``index``);
        its timeout, if any, is indexed under the item's unit. ``False`` when the attempt is stale."""
        ...

    def decide_item(self, run_id: str, step: str, index: int, decision: Decision) -> DecisionResult:
        """Record a decision on item ``index`` of an approval map step, by the rules of :meth:`StateStore.decide`
        (audited per item); on ``OK`` the item runs under ``decision.task_id`` for the caller to finish."""
        ...

    def child_item_ended(
        self, link: ParentLink, child_run_id: str, totals: ChildTotals, *, task_id: str, lease_s: float
    ) -> bool:
        """Count an ended child's spend into the parent once, and take its waiting item (``link.index``) over:
        ``running`` under ``task_id`` with a lease of ``lease_s`` (in the lease index), for the caller to finish
        with :meth:`finish_item`. ``False`` when the item does not wait for this child in ``link.generation``."""
        ...

    def waiting_children(self, run_id: str, step: str) -> list[str]:
        """The child runs the step's items wait for."""
        ...

    def item_records(self, run_id: str, step: str, offset: int = 0, limit: int = 100) -> list[ItemRecord]:
        """Item records ``offset`` to ``offset + limit`` (at most :data:`MAX_ITEM_PAGE`), in index order."""
        ...

    def item_outputs(self, run_id: str, step: str) -> tuple[list[Any], list[tuple[int, str, ErrorRecord | None]]]:
        """Every item's output in index order (``None`` where none), and ``(index, status, error)`` of the items
        that did not succeed."""
        ...


def item_record(index: int, row: list[str | None]) -> ItemRecord:
    """A record from an item's :data:`ITEM_FIELDS`, as stored."""
    status, item, attempts, started, finished, output, error, child = row
    record: ItemRecord = {
        "index": index,
        "item": json.loads(item) if item else None,
        "status": status or "pending",
        "attempts": int(attempts or 0),
        "started_at": iso(float(started)) if started else None,
        "finished_at": iso(float(finished)) if finished else None,
        "output": json.loads(output) if output else None,
        "error": json.loads(error) if error else None,
    }
    if child:
        record["child_run_id"] = child
    return record


def item_counts(fields: dict[str, str], step: str) -> ItemCounts | None:
    """The step's item counters from the run's fields, or ``None`` when it has not been expanded."""
    total = fields.get(keys.step_field(step, "items_total"))
    if total is None:
        return None

    def n(status: str) -> int:
        return int(fields.get(keys.step_field(step, f"items_{status}")) or 0)

    return ItemCounts(
        total=int(total),
        pending=n("pending"),
        queued=n("queued"),
        running=n("running"),
        waiting=n("waiting"),
        succeeded=n("succeeded"),
        failed=n("failed"),
        skipped=n("skipped"),
        cancelled=n("cancelled"),
    )


def page_bounds(offset: int, limit: int, total: int) -> range:
    """The indices of one page of items: ``limit`` capped at :data:`MAX_ITEM_PAGE`, within ``total``."""
    start = max(0, offset)
    return range(start, min(total, start + max(0, min(limit, MAX_ITEM_PAGE))))


def split_item_leases(
    leases: dict[str, list[tuple[str, str]]],
) -> tuple[dict[str, list[tuple[str, str]]], dict[tuple[str, str], list[tuple[int, str]]]]:
    """Split the lease keeper's ``(unit, task_id)`` pairs into steps by run and items by ``(run, step)``."""
    steps: dict[str, list[tuple[str, str]]] = {}
    items: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for run_id, pairs in leases.items():
        for unit, task_id in pairs:
            step, index = keys.parse_item_unit(unit)
            if index is None:
                steps.setdefault(run_id, []).append((step, task_id))
            else:
                items.setdefault((run_id, step), []).append((index, task_id))
    return steps, items


def dumps(value: Any) -> str:
    """Compact JSON, as the scripts store it."""
    return json.dumps(value, separators=(",", ":"))
