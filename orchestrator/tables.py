"""How runs, workflows and a run's steps print in a terminal (``orchestrator runs``, ``workflows``, ``status``,
``watch``).

Plain functions from the typed views to rich tables and lines; the commands only fetch and print.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from orchestrator.infra.timestamps import iso

if TYPE_CHECKING:
    from orchestrator.definition.spec import WorkflowSpec
    from orchestrator.engine.status import RunSummary, RunView


def money(usd: float | None) -> str:
    """US dollars to four decimals (``$0.0123``); ``""`` when unknown."""
    return "" if usd is None else f"${usd:.4f}"


def tokens(usage: Mapping[str, Any] | None) -> str:
    """Input and output tokens as ``IN in / OUT out``; ``""`` when none were counted."""
    if not usage:
        return ""
    return f"{int(usage.get('input_tokens', 0))} in / {int(usage.get('output_tokens', 0))} out"


def seconds(duration_s: float | None) -> str:
    """A duration: ``1.23s`` below a minute, ``4m05s`` below an hour, else ``2h03m``; ``""`` when unknown."""
    if duration_s is None:
        return ""
    if duration_s < 60:
        return f"{duration_s:.2f}s"
    whole = int(duration_s)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def between(started_at: str | None, finished_at: str | None, now: float | None = None) -> float | None:
    """Seconds between two ISO 8601 times; to ``now`` (epoch seconds) when ``finished_at`` is ``None`` and ``now`` is
    given; ``None`` when either end is unknown."""
    if not started_at:
        return None
    start = datetime.fromisoformat(started_at).timestamp()
    if finished_at:
        return max(datetime.fromisoformat(finished_at).timestamp() - start, 0.0)
    return None if now is None else max(now - start, 0.0)


def runs_table(runs: list[RunSummary], *, title: str = "runs") -> Table:
    """One row per run: id, workflow and version, status, started, duration, cost, tokens, error."""
    table = Table(title=title)
    for column in ("run", "workflow", "status", "started", "duration", "cost", "tokens", "error"):
        table.add_column(column, overflow="fold" if column in {"run", "error"} else "ellipsis")
    for run in runs:
        duration = seconds(run.get("duration_s"))
        table.add_row(
            run["run_id"],
            f"{run['workflow']} v{run['version']}",
            run["status"],
            (run.get("started_at") or run["created_at"] or "").replace("T", " ")[:19],
            duration + ("…" if duration and not run["finished_at"] else ""),
            money(run.get("cost")),
            tokens(run.get("usage")),
            Text((run.get("error") or "")[:120], style="red"),
        )
    return table


def workflow_rows(
    registered: list[WorkflowSpec], submitted: list[dict[str, Any]], in_flight: dict[tuple[str, int], int]
) -> list[dict[str, Any]]:
    """What ``orchestrator workflows`` lists: the workflows registered here, then those only submitted (as files, most
    recent first, one row per name and version), then those only seen in runs in flight (retired versions).

    Args:
        registered: The workflows registered in this process.
        submitted: ``StateStore.submitted_definitions()``.
        in_flight: Runs in flight per name and version (emptied as rows take them).
    """
    last = {entry["definition_hash"]: entry["last_submitted"] for entry in submitted}
    rows = [
        _workflow_row(
            spec.name, spec.version, spec.definition_hash, len(spec.steps), source="registered", in_flight=in_flight
        )
        | {"last_submitted": last.get(spec.definition_hash)}
        for spec in registered
    ]
    seen = {(row["name"], row["version"]) for row in rows}
    for entry in submitted:
        if (entry["name"], entry["version"]) not in seen:
            seen.add((entry["name"], entry["version"]))
            row = _workflow_row(
                entry["name"], entry["version"], entry["definition_hash"], None, source="submitted", in_flight=in_flight
            )
            rows.append(row | {"last_submitted": entry["last_submitted"]})
    rows += [_workflow_row(*key, None, None, source="runs only", in_flight=in_flight) for key in sorted(in_flight)]
    return rows


def _workflow_row(
    name: str, version: int, definition_hash: str | None, steps: int | None, *, source: str, in_flight: dict[Any, int]
) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "definition_hash": definition_hash,
        "steps": steps,
        "source": source,
        "last_submitted": None,
        "in_flight": in_flight.pop((name, version), 0),
    }


def workflows_table(rows: list[dict[str, Any]]) -> Table:
    """Workflows by name and version: definition hash, steps, where it comes from, last submitted, runs in flight."""
    table = Table(title="workflows")
    for column in ("name", "version", "definition", "steps", "source", "last submitted", "in flight"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"],
            str(row["version"]),
            (row["definition_hash"] or "(unknown)")[:12],
            str(row["steps"] or ""),
            row["source"],
            (iso(row.get("last_submitted")) or "").replace("T", " ")[:19],
            str(row["in_flight"]),
        )
    return table


def step_table(view: RunView) -> Table:
    """The plain ``orchestrator status`` table: a row per step with its cost, tokens and duration."""
    table = Table(title=f"{view['workflow']} v{view['version']} · run {view['run_id']} · {view['status']}")
    for column in ("step", "status", "attempts", "started", "duration", "cost", "tokens", "error"):
        table.add_column(column)
    for name, step in view["steps"].items():
        error = step["error"]
        table.add_row(
            name,
            step["status"],
            str(step["attempts"]),
            (step["started_at"] or "")[11:23],
            seconds(between(step["started_at"], step["finished_at"])),
            money(step.get("cost")),
            tokens(step.get("usage")),
            str(error.get("message", "") if error else "")[:60],
        )
    return table


def run_totals(view: RunView, now: float | None = None) -> str:
    """One line of run totals: cost (and paid calls), tokens, budget left, duration (so far, while it runs)."""
    parts = []
    if "cost" in view:
        parts.append(f"cost {money(view['cost'])} over {view.get('llm_calls', 0)} paid LLM calls")
    if view.get("usage"):
        parts.append(f"tokens {tokens(view.get('usage'))}")
    budget = view.get("budget")
    if budget is not None:
        left = max(budget["budget_usd"] - view.get("cost", 0.0), 0.0)
        spent = " (spent)" if budget["exhausted"] else ""
        parts.append(f"budget left {money(left)} of {money(budget['budget_usd'])}{spent}")
    duration = between(view["started_at"], view["finished_at"], now)
    if duration is not None:
        parts.append(f"duration {seconds(duration)}" + ("" if view["finished_at"] else " so far"))
    return "total: " + " · ".join(parts) if parts else ""


def run_links(view: RunView) -> list[str]:
    """Lines naming a run's parent run and its child runs (``uses: workflow``), for ``orchestrator status``."""
    lines = []
    parent = view.get("parent")
    if parent is not None:
        item = f" item {parent['index']}" if parent["index"] is not None else ""
        lines.append(f"parent: run {parent['run_id']} step {parent['step']}{item}")
    for name, step in view["steps"].items():
        child = step.get("child_run_id")
        if child:
            lines.append(f"child run of {name}: {child}")
    return lines
