"""The status JSON of a run (``orchestrator status --json``, ``GET /runs/{id}``), built from its Redis hash."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.definition.spec import WorkflowSpec
from orchestrator.engine.coordinator import failure_summary
from orchestrator.infra.timestamps import iso
from orchestrator.llm.governor import from_nano_usd


def _json(raw: str | None) -> Any:
    return json.loads(raw) if raw else None


def run_view(fields: dict[str, str], spec: WorkflowSpec) -> dict[str, Any]:
    """The run's status JSON: run fields, then every step in declaration order."""
    steps: dict[str, Any] = {}
    input_tokens = output_tokens = 0
    for step in spec.steps:
        p = f"s:{step.name}:"
        output = _json(fields.get(p + "output"))
        usage = output.get("usage") if isinstance(output, dict) and step.uses == "llm" else None
        view: dict[str, Any] = {
            "status": fields.get(p + "status", "pending"),
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
            if isinstance(output, dict) and output.get("cost_usd") is not None:
                view["cost"] = round(float(output["cost_usd"]), 9)
        if fields.get(p + "deferrals"):
            # Times the step waited for a shared LLM rate limit or cool-down (never counted as attempts).
            view["deferrals"] = int(fields[p + "deferrals"])
        if view["status"] == "queued" and fields.get(p + "deferral"):
            view["deferred"] = {
                **(_json(fields.get(p + "deferral")) or {}),
                "until": iso(fields.get(p + "deferred_until")),
            }
        steps[step.name] = view
    status = fields.get("status", "pending")
    live = {v["status"] for v in steps.values()}
    if status == "running" and "waiting" in live and not live & {"queued", "running"}:
        # Nothing can move until a human decides: the run waits, holding no worker.
        status = "waiting"
    error = fields.get("error") or None
    first = fields.get("first_failure")
    if status == "failed" and not error and first and first in steps:
        error = failure_summary(first, steps[first]["error"])
    view_run: dict[str, Any] = {
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
    if spec.budget_usd is not None or any(step.uses == "llm" for step in spec.steps):
        # What the provider billed this run, every attempt included (replies served from the cache cost nothing).
        view_run["cost"] = from_nano_usd(int(fields.get("llm_spent_nusd") or 0))
        view_run["llm_calls"] = int(fields.get("llm_calls") or 0)
    if spec.budget_usd is not None:
        view_run["budget"] = {
            "budget_usd": spec.budget_usd,
            "held_usd": from_nano_usd(int(fields.get("llm_held_nusd") or 0)),
            "exhausted": fields.get("budget_exhausted") == "1",
        }
    return view_run


def run_summary(row: dict[str, str]) -> dict[str, Any]:
    """One run in a listing (``orchestrator runs``, ``GET /runs``), from its summary fields."""
    return {
        "run_id": row["run_id"],
        "workflow": row["workflow"],
        "version": int(row["version"] or 1),
        "status": row["status"] or "pending",
        "generation": int(row["gen"] or 1),
        "created_at": iso(row["created_at"]),
        "finished_at": iso(row["finished_at"]),
    }
