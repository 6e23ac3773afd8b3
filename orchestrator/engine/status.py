"""The status JSON of a run (``orchestrator status --json``, ``GET /runs/{id}``), built from its Redis hash.

:class:`RunView` is its one typed form: :func:`run_view` builds it, ``Client.status`` returns it, the CLI prints it
and the API documents it as the response of ``GET /runs/{id}``. The status JSON is a stable interface: a field may be
added, never renamed or removed (``docs/status-json.md``). The types are ``typing_extensions`` TypedDicts so pydantic
can describe them on Python 3.11; the value is a plain dict, serialised as it is.
"""

import json
import time
from typing import Any, NotRequired

from typing_extensions import TypedDict

from orchestrator.definition.mapping import is_map
from orchestrator.definition.spec import StepSpec, WorkflowSpec
from orchestrator.domain import RunStatus, StepStatus
from orchestrator.engine.coordinator import failure_summary
from orchestrator.errors import ErrorRecord
from orchestrator.infra.timestamps import iso
from orchestrator.llm.governor import from_nano_usd
from orchestrator.state import keys
from orchestrator.state.items import ItemCounts, item_counts


class TokenUsage(TypedDict):
    """Tokens the provider counted, summed over the run's LLM steps."""

    input_tokens: int
    output_tokens: int


class ApprovalView(TypedDict):
    """An approval step's wait and decisions.

    Attributes:
        waiting_since: When the step began to wait (ISO 8601), or ``None``.
        decide_by: When its approval timeout fires, or ``None``.
        decision: The decision that won (``decision``, ``by``, ``comment``, ``at``), or ``None``.
        audit: Every decision sent while the run lasted, accepted or refused (``at``, ``by``, ``decision``,
            ``comment``, ``outcome``), the newest ``MAX_AUDIT_ENTRIES``.
    """

    waiting_since: str | None
    decide_by: str | None
    decision: dict[str, Any] | None
    audit: list[dict[str, Any]]


class StepView(TypedDict):
    """A step in the status JSON.

    Attributes:
        status: Where the step is.
        attempts: Attempts started over the run's whole life.
        queued_at: When it was last queued (ISO 8601, UTC, microseconds), or ``None``; likewise the others.
        output: What it returned (``None`` unless it succeeded).
        error: The error of its last attempt when it ``failed``, else ``None``.
        errors: Every failed attempt, oldest first.
        cached: Whether its output was reused from an earlier generation.
        depends_on: Its dependencies.
        kind: What it uses (``llm``, ``tool``, ``approval`` …).
        approval: An approval step's wait and decisions.
        usage: An LLM step's token usage, as its provider reported it.
        cost: An LLM step's cost in US dollars at list prices.
        deferrals: Times it waited for a shared LLM rate limit or cool-down (never counted as attempts).
        deferred: While it waits so: the deferral record and ``until`` (ISO 8601).
        iterations: A repeated step's finished iterations (the latest checkpoint's number; 0 before the first).
        until_met: A repeated step's ``until`` held after its latest iteration.
        items: A map step's items by status, once its list is known (``total``, ``pending`` … ``cancelled``).
        child_run_id: A ``workflow`` step's child run, once it started one.
    """

    status: StepStatus
    attempts: int
    queued_at: str | None
    started_at: str | None
    finished_at: str | None
    output: Any
    error: ErrorRecord | None
    errors: list[ErrorRecord]
    cached: bool
    depends_on: list[str]
    kind: str
    approval: NotRequired[ApprovalView]
    usage: NotRequired[dict[str, Any]]
    cost: NotRequired[float]
    deferrals: NotRequired[int]
    deferred: NotRequired[dict[str, Any]]
    iterations: NotRequired[int]
    until_met: NotRequired[bool]
    items: NotRequired[ItemCounts]
    child_run_id: NotRequired[str]


class ParentView(TypedDict):
    """Where a child run (``uses: workflow``) came from.

    Attributes:
        run_id: The parent run.
        step: The parent's ``workflow`` step.
        index: The map item's index when that step has ``for_each``, else ``None``.
    """

    run_id: str
    step: str
    index: int | None


class BudgetView(TypedDict):
    """A run's LLM budget: its limit, what is held for calls in flight, and whether it ran out."""

    budget_usd: float
    held_usd: float
    exhausted: bool


class RunView(TypedDict):
    """The status JSON of a run.

    Attributes:
        run_id: The run.
        workflow: The workflow's name.
        version: The workflow's version.
        definition_hash: The hash of the definition the run is pinned to.
        status: Where the run is.
        generation: 1, plus one per resume.
        created_at: When it was submitted (ISO 8601, UTC, microseconds); likewise the others, ``None`` until then.
        inputs: The run's inputs.
        error: One line saying why it failed, was cancelled or timed out, else ``None``.
        steps: Every step, in declaration order.
        usage: Token usage over its LLM steps, when any were counted.
        cost: What the provider billed the run in US dollars (runs with LLM steps or a budget).
        llm_calls: Paid LLM calls (runs with LLM steps or a budget).
        budget: The run's LLM budget, when the workflow sets ``budget_usd``.
        parent: A child run's parent run and step.
    """

    run_id: str
    workflow: str
    version: int
    definition_hash: str
    status: RunStatus
    generation: int
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    stopped_at: str | None
    inputs: dict[str, Any]
    error: str | None
    steps: dict[str, StepView]
    usage: NotRequired[TokenUsage]
    cost: NotRequired[float]
    llm_calls: NotRequired[int]
    budget: NotRequired[BudgetView]
    parent: NotRequired[ParentView]


def _json(raw: str | None) -> Any:
    return json.loads(raw) if raw else None


def _spend(step: StepSpec, output: Any) -> tuple[dict[str, Any] | None, Any]:
    """An LLM step's usage and cost from its output (a map step's: its items' summed)."""
    if is_map(step) and isinstance(output, list) and step.uses == "llm":
        return _summed_usage(output)
    if not isinstance(output, dict):
        return None, None
    return (output.get("usage") if step.uses == "llm" else None), output.get("cost_usd")


def _summed_usage(outputs: list[Any]) -> tuple[dict[str, int] | None, float | None]:
    """A map of LLM items: their usage and cost summed (``None`` when no item reported any)."""
    found = [o for o in outputs if isinstance(o, dict) and isinstance(o.get("usage"), dict)]
    if not found:
        return None, None
    usage = {
        "input_tokens": sum(int(o["usage"].get("input_tokens", 0)) for o in found),
        "output_tokens": sum(int(o["usage"].get("output_tokens", 0)) for o in found),
    }
    costs = [float(o["cost_usd"]) for o in found if o.get("cost_usd") is not None]
    return usage, (sum(costs) if costs else None)


def run_view(fields: dict[str, str], spec: WorkflowSpec) -> RunView:
    """The run's status JSON: run fields, then every step in declaration order."""
    steps: dict[str, StepView] = {}
    input_tokens = output_tokens = 0
    for step in spec.steps:
        p = keys.step_prefix(step.name)
        output = _json(fields.get(p + "output"))
        usage, output_cost = _spend(step, output)
        view: StepView = {
            "status": StepStatus(fields.get(p + "status") or StepStatus.PENDING),
            "attempts": int(fields.get(p + "attempts") or 0),
            "queued_at": iso(fields.get(p + "queued_at")),
            "started_at": iso(fields.get(p + "started_at")),
            "finished_at": iso(fields.get(p + "finished_at")),
            "output": output,
            "error": _json(fields.get(p + "error")) if fields.get(p + "status") == "failed" else None,
            "errors": _json(fields.get(p + "errors")) or [],
            "cached": fields.get(p + "cached") == "1",
            "depends_on": list(step.depends_on),
            "kind": step.uses.value,
        }
        if step.uses == "approval":
            decision = _json(fields.get(p + "decision"))
            if decision:
                decision = {**decision, "at": iso(decision.get("at"))}
            view["approval"] = {
                "waiting_since": iso(fields.get(p + "waiting_since")),
                "decide_by": iso(fields.get(p + "decide_by")),
                "decision": decision,
                "audit": [{**entry, "at": iso(entry.get("at"))} for entry in _json(fields.get(p + "audit")) or []],
            }
        if usage:
            view["usage"] = usage
            input_tokens += int(usage.get("input_tokens", 0))
            output_tokens += int(usage.get("output_tokens", 0))
            if output_cost is not None:
                view["cost"] = round(float(output_cost), 9)
        if is_map(step) and (counts := item_counts(fields, step.name)) is not None:
            view["items"] = counts
        if step.repeat is not None:
            view["iterations"] = int(fields.get(p + "iterations") or 0)
            view["until_met"] = fields.get(p + "until_met") == "1"
        if fields.get(p + "child_run_id"):
            view["child_run_id"] = fields[p + "child_run_id"]
        if fields.get(p + "deferrals"):
            # Times the step waited for a shared LLM rate limit or cool-down (never counted as attempts).
            view["deferrals"] = int(fields[p + "deferrals"])
        if view["status"] == "queued" and fields.get(p + "deferral"):
            view["deferred"] = {
                **(_json(fields.get(p + "deferral")) or {}),
                "until": iso(fields.get(p + "deferred_until")),
            }
        steps[step.name] = view
    status = RunStatus(fields.get("status") or RunStatus.PENDING)
    live = {v["status"] for v in steps.values()}
    if (
        status == RunStatus.RUNNING
        and StepStatus.WAITING in live
        and not live & {StepStatus.QUEUED, StepStatus.RUNNING}
    ):
        # Nothing can move until a human decides: the run waits, holding no worker.
        status = RunStatus.WAITING
    error = fields.get("error") or None
    first = fields.get("first_failure")
    if status == "failed" and not error and first and first in steps:
        error = failure_summary(first, steps[first]["error"])
    view_run: RunView = {
        "run_id": fields["run_id"],
        "workflow": fields["workflow"],
        "version": int(fields["version"]),
        "definition_hash": fields["def_hash"],
        "status": status,
        "generation": int(fields.get("gen") or 1),
        "created_at": iso(fields.get("created_at")),
        "started_at": iso(fields.get("started_at")),
        "finished_at": iso(fields.get("finished_at")),
        "stopped_at": iso(fields.get("stopped_at")),
        "inputs": _json(fields.get("inputs")) or {},
        "error": error,
        "steps": steps,
    }
    if input_tokens or output_tokens:
        view_run["usage"] = {"input_tokens": input_tokens, "output_tokens": output_tokens}
    if spec.budget_usd is not None or any(step.uses in {"llm", "agent"} for step in spec.steps):
        # What the provider billed this run, every attempt included (replies served from the cache cost nothing).
        view_run["cost"] = from_nano_usd(int(fields.get("llm_spent_nusd") or 0))
        view_run["llm_calls"] = int(fields.get("llm_calls") or 0)
    if spec.budget_usd is not None:
        view_run["budget"] = {
            "budget_usd": spec.budget_usd,
            "held_usd": from_nano_usd(int(fields.get("llm_held_nusd") or 0)),
            "exhausted": fields.get("budget_exhausted") == "1",
        }
    if fields.get("parent_run"):
        index = fields.get("parent_index")
        view_run["parent"] = {
            "run_id": fields["parent_run"],
            "step": fields.get("parent_step", ""),
            "index": int(index) if index else None,
        }
    return view_run


class RunSummary(TypedDict):
    """One run in a listing (``orchestrator runs``, ``GET /runs``, the web page's runs list).

    Attributes:
        run_id: The run.
        workflow: The workflow's name.
        version: The workflow's version.
        status: Where the run is (as stored: a run waiting for a human reads ``running`` here).
        generation: 1, plus one per resume.
        created_at: When it was submitted (ISO 8601, UTC, microseconds).
        started_at: When it started; ``finished_at``: when it ended, ``None`` while it goes on.
        duration_s: Seconds from ``started_at`` to ``finished_at``, or to now while the run goes on
            (``finished_at`` is ``None`` then); ``None`` before it started.
        error: The status JSON's ``error``: one line saying why it failed, was cancelled or timed out, else ``None``.
        cost: What the provider billed the run in US dollars, every attempt included; ``None`` when it made no
            paid LLM call.
        usage: Input and output tokens billed over those calls, when any.
        llm_calls: Paid LLM calls, when any.
    """

    run_id: str
    workflow: str
    version: int
    status: str
    generation: int
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    duration_s: float | None
    error: str | None
    cost: float | None
    usage: NotRequired[TokenUsage]
    llm_calls: NotRequired[int]


MAX_LIST_OFFSET = 100_000
"""The furthest a run listing pages (``offset``): a deeper page would read that many runs to find its start."""


class RunPage(TypedDict):
    """A page of a run listing: its runs, where it starts, its size and where the next starts (``None``: last)."""

    runs: list[RunSummary]
    offset: int
    limit: int
    next_offset: int | None


def run_summary(row: dict[str, str], now: float | None = None) -> RunSummary:
    """One run in a listing, from the fields ``StateStore.run_summaries`` read.

    Args:
        row: The run's summary fields.
        now: Epoch seconds now, for the duration of a run still going (default: the clock).
    """
    started, finished = row.get("started_at") or row.get("created_at"), row.get("finished_at")
    end = float(finished) if finished else (time.time() if now is None else now)
    summary: RunSummary = {
        "run_id": row["run_id"],
        "workflow": row["workflow"],
        "version": int(row["version"] or 1),
        "status": row["status"] or "pending",
        "generation": int(row["gen"] or 1),
        "created_at": iso(row["created_at"]),
        "started_at": iso(started),
        "finished_at": iso(finished),
        "duration_s": round(max(end - float(started), 0.0), 6) if started else None,
        "error": _summary_error(row),
        "cost": None,
    }
    calls = int(row.get("llm_calls") or 0)
    if calls or row.get("llm_spent_nusd"):
        summary["cost"] = from_nano_usd(int(row.get("llm_spent_nusd") or 0))
        summary["llm_calls"] = calls
    input_tokens, output_tokens = int(row.get("llm_input_tokens") or 0), int(row.get("llm_output_tokens") or 0)
    if input_tokens or output_tokens:
        summary["usage"] = {"input_tokens": input_tokens, "output_tokens": output_tokens}
    return summary


def _summary_error(row: dict[str, str]) -> str | None:
    """The run's one-line error as ``run_view`` words it (the first failed step's error, for a failed run)."""
    if row.get("error"):
        return row["error"]
    if row.get("status") == "failed" and row.get("first_failure"):
        return failure_summary(row["first_failure"], _json(row.get("failure_error")))
    return None
