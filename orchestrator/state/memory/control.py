"""The in-memory store's run control: stop, resume, workflow deadlines and approval waits, each as its Lua script."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from orchestrator.domain import (
    MAX_AUDIT_ENTRIES,
    Attempt,
    Decision,
    DecisionOutcome,
    DecisionResult,
    ResumeOutcome,
    ResumePlan,
    ResumeResult,
    RunStatus,
    StopOutcome,
    StopResult,
)
from orchestrator.state import keys
from orchestrator.state.memory.core import (
    _COMPACT,
    _STOPPABLE_RUN,
    _STOPPABLE_STEP,
    MemoryStateCore,
    _due,
    _json_list,
    _stamp,
)


class RunControl(MemoryStateCore):
    """Stop and resume runs, schedule their deadlines and park or decide approval steps, under the store's lock."""

    # -- cancel, time out, resume --------------------------------------------------------------------------------

    def stop(
        self, run_id: str, status: RunStatus, reason: str, steps: tuple[str, ...], generation: str = ""
    ) -> StopResult:
        """End a run early as ``cancelled`` or ``timed_out`` (see ``lua/stop.lua``).

        Its unfinished ``steps`` become ``cancelled``; the running and queued ones are returned to interrupt and
        leave the lease index.
        """
        with self._lock:
            now = self._clock()
            run = self._live(run_id, now)
            fields = run.fields if run is not None else {}
            if run is None or "status" not in fields:
                return StopResult(outcome=StopOutcome.MISSING)
            if generation != "" and fields.get("gen") != generation:
                return StopResult(outcome=StopOutcome.STALE)
            if fields["status"] not in _STOPPABLE_RUN:
                return StopResult(outcome=StopOutcome.FINISHED, detail=fields["status"])
            stamp = _stamp(now)
            fields.update({"status": status.value, "finished_at": stamp, "stopped_at": stamp, "error": reason})
            interrupted: list[tuple[str, str]] = []
            for step in steps:
                p = keys.step_prefix(step)
                was = fields.get(p + "status")
                if was in _STOPPABLE_STEP:
                    fields.update({p + "status": "cancelled", p + "finished_at": stamp, p + "lease": ""})
                    self._emit(run, stamp, "step_cancelled", step)
                    if was in ("running", "queued"):
                        interrupted.append((step, fields.get(p + "task") or ""))
            self._emit(run, stamp, f"run_{status.value}", data=json.dumps({"reason": reason}, separators=_COMPACT))
            self._ended(run, now)
            for step, task_id in interrupted:
                if task_id:
                    self._leases.pop(keys.lease_member(run_id, step, task_id), None)
            stopped_gen = fields.get("gen", "")
            self._deadlines.pop(keys.deadline_member(run_id, stopped_gen), None)
            for step in steps:
                self._approvals.pop(keys.approval_member(run_id, stopped_gen, step), None)
            return StopResult(outcome=StopOutcome.OK, detail=stamp, interrupted=tuple(interrupted))

    def resume(self, run_id: str, plan: ResumePlan) -> ResumeResult:
        """Start the run's next generation from ``plan`` (see ``lua/resume.lua``).

        Returns:
            ``OK`` with the new generation, ``CONFLICT`` with the current one when the generation moved since the
            plan was made, or ``REFUSED`` with the run's status (``missing`` for an unknown run).
        """
        with self._lock:
            now = self._clock()
            run = self._live(run_id, now)
            fields = run.fields if run is not None else {}
            if run is None or "status" not in fields:
                return ResumeResult(ResumeOutcome.REFUSED, detail="missing")
            current = fields.get("gen", "")
            if current != plan.expected_generation:
                return ResumeResult(ResumeOutcome.CONFLICT, generation=current)
            allowed = ",".join(plan.allowed_statuses)
            if f",{fields['status']}," not in f",{allowed},":
                return ResumeResult(ResumeOutcome.REFUSED, detail=fields["status"])
            generation = str(int(plan.expected_generation) + 1)
            stamp = _stamp(now)
            self._emit(run, stamp, "run_resumed", data=json.dumps({"generation": int(generation)}, separators=_COMPACT))
            for step, status, pending in plan.resets:
                p = keys.step_prefix(step)
                fields.update(
                    {
                        p + "status": status,
                        p + "pending": str(pending),
                        p + "task": "",
                        p + "lease": "",
                        p + "attempt_base": fields.get(p + "attempts", "0"),
                        p + "force": "1" if step == plan.forced_step else "",
                    }
                )
                for name in ("finished_at", "error", "queued_at", "decision", "decide_by"):
                    fields.pop(p + name, None)
                if status == "queued":
                    self._emit(run, stamp, "step_queued", step)
            fields.update(
                {
                    "status": "running",
                    "gen": generation,
                    "remaining": str(len(plan.resets)),
                    "failures": "0",
                    "leaf_failures": "0",
                }
            )
            if plan.definition is not None:
                self._definitions[plan.definition.definition_hash] = plan.definition
                fields["def_hash"] = plan.definition.definition_hash
            for name in ("finished_at", "stopped_at", "error", "first_failure", "failure", "failed_steps", "deadline"):
                fields.pop(name, None)
            old = plan.expected_generation
            self._deadlines.pop(keys.deadline_member(run_id, old), None)
            for step, _, _ in plan.resets:
                self._approvals.pop(keys.approval_member(run_id, old, step), None)
            if fields.get("timeout_s"):
                at = now + float(fields["timeout_s"])
                fields["deadline"] = _stamp(at)
                self._deadlines[keys.deadline_member(run_id, generation)] = at
            run.expires_at = now + self.active_ttl_s
            return ResumeResult(ResumeOutcome.OK, generation=generation)

    # -- deadlines -----------------------------------------------------------------------------------------------

    def add_deadline(self, run_id: str, generation: str, at: float) -> None:
        """Schedule the run's workflow deadline."""
        with self._lock:
            self._deadlines[keys.deadline_member(run_id, generation)] = at

    def due_deadlines(self, limit: int = 500, buckets: Sequence[str | None] | None = None) -> list[tuple[str, str]]:
        """``(run_id, generation)`` of deadlines that have passed, oldest first."""
        with self._lock:
            members = _due(self._deadlines, self._clock(), limit)
        out: list[tuple[str, str]] = []
        for member in members:
            run_id, _, generation = member.partition("|")
            out.append((run_id, generation))
        return out

    def drop_deadline(self, run_id: str, generation: str) -> None:
        """Forget a deadline that fired or no longer applies."""
        with self._lock:
            self._deadlines.pop(keys.deadline_member(run_id, generation), None)

    # -- approvals -----------------------------------------------------------------------------------------------

    def wait_for_decision(self, attempt: Attempt, data: dict[str, Any], timeout_s: float | None) -> bool:
        """Park a claimed approval step as ``waiting`` (``lua/wait.lua``)."""
        p = keys.step_prefix(attempt.step)
        with self._lock:
            now = self._clock()
            run = self._live(attempt.run_id, now)
            self._leases.pop(keys.lease_member(attempt.run_id, attempt.step, attempt.task_id), None)
            if run is None or not self._owns(run.fields, attempt):
                return False
            stamp = _stamp(now)
            decide_by = _stamp(now + timeout_s) if timeout_s else ""
            self._emit(run, stamp, "step_waiting", attempt.step, data=json.dumps(data))
            run.fields.update(
                {
                    p + "status": "waiting",
                    p + "task": "",
                    p + "lease": "",
                    p + "waiting_since": stamp,
                    p + "decide_by": decide_by,
                }
            )
            if decide_by:
                self._approvals[keys.approval_member(attempt.run_id, attempt.generation, attempt.step)] = float(
                    decide_by
                )
            return True

    def decide(self, run_id: str, step: str, decision: Decision) -> DecisionResult:
        """Audit a decision; the first allowed one on a waiting step wins (``lua/decide.lua``)."""
        p = keys.step_prefix(step)
        with self._lock:
            now = self._clock()
            run = self._live(run_id, now)
            fields = run.fields if run is not None else {}
            run_status, status = fields.get("status"), fields.get(p + "status")
            if run is None or run_status is None or status is None:
                return DecisionResult(DecisionOutcome.MISSING)
            if decision.generation != "" and fields.get("gen") != decision.generation:
                return DecisionResult(DecisionOutcome.STALE, generation=fields.get("gen", ""))
            stamp = _stamp(now)
            outcome = "accepted"
            if not decision.allowed:
                outcome = "refused: not an approver"
            elif run_status != "running" or status != "waiting":
                outcome = f"refused: not waiting ({run_status if status == 'waiting' else status})"
            if run_status in _STOPPABLE_RUN:
                fields[p + "audit"] = audited(fields.get(p + "audit"), decision, stamp, outcome)
            if not decision.allowed:
                return DecisionResult(DecisionOutcome.FORBIDDEN)
            if outcome != "accepted":
                return DecisionResult(DecisionOutcome.NOT_WAITING, detail=status)
            record = {"decision": decision.decision, "by": decision.by, "comment": decision.comment, "at": stamp}
            fields.update(
                {
                    p + "status": "running",
                    p + "task": decision.task_id,
                    p + "lease": _stamp(now + decision.lease_s),
                    p + "decision": json.dumps(record),
                    p + "decide_by": "",
                }
            )
            self._leases[keys.lease_member(run_id, step, decision.task_id)] = now + decision.lease_s
            self._approvals.pop(keys.approval_member(run_id, fields["gen"], step), None)
            return DecisionResult(DecisionOutcome.OK, generation=fields["gen"])

    def due_approvals(
        self, limit: int = 500, buckets: Sequence[str | None] | None = None
    ) -> list[tuple[str, str, str]]:
        """``(run_id, generation, step)`` of approval waits whose timeout passed, oldest first."""
        with self._lock:
            members = _due(self._approvals, self._clock(), limit)
        out: list[tuple[str, str, str]] = []
        for member in members:
            run_id, generation, step = member.split("|", 2)
            out.append((run_id, generation, step))
        return out

    def drop_approval(self, run_id: str, generation: str, step: str) -> None:
        """Forget an approval timeout that fired or no longer applies."""
        with self._lock:
            self._approvals.pop(keys.approval_member(run_id, generation, step), None)


def audited(raw: str | None, decision: Decision, stamp: str, outcome: str) -> str:
    """An audit trail (JSON) with ``decision`` appended, bounded as ``lua/decide.lua`` bounds it."""
    audit = _json_list(raw)
    entry = {"at": stamp, "by": decision.by, "decision": decision.decision, "comment": decision.comment}
    audit.append({**entry, "outcome": outcome})
    while len(audit) > MAX_AUDIT_ENTRIES:
        oldest = next((i for i, old in enumerate(audit) if old["outcome"] != "accepted"), 0)
        del audit[oldest]
    return json.dumps(audit, separators=_COMPACT)
