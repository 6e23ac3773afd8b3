"""The Redis store's run control: stop, resume, workflow deadlines and approval waits."""

from __future__ import annotations

import json
import time
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
from orchestrator.state.redis.core import RedisStateCore, _ending_keys, _run_keys, _text


class RunControl(RedisStateCore):
    """Stop and resume runs, schedule their deadlines and park or decide approval steps, with their timer indexes."""

    # -- cancel, time out, resume --------------------------------------------------------------------------------

    def stop(
        self, run_id: str, status: RunStatus, reason: str, steps: tuple[str, ...], generation: str = ""
    ) -> StopResult:
        """End a run early (``cancelled`` or ``timed_out``; see ``lua/stop.lua``)."""
        argv: list[Any] = [status.value, reason, self.retention_s, generation, *steps]
        reply = [_text(x) for x in self._scripts["stop"](keys=_ending_keys(run_id), args=argv)]
        if reply[0] != StopOutcome.OK:
            return StopResult(outcome=StopOutcome(reply[0]), detail=reply[1] if len(reply) > 1 else "")
        stopped_gen, pairs = reply[2], reply[3:]
        interrupted = tuple((pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2))
        members = [keys.lease_member(run_id, s, t) for s, t in interrupted if t]
        pipe = self.client.pipeline(transaction=False)
        if members:
            pipe.zrem(self._leases(run_id), *members)
        # The ended run's timers go with it: a deadline or an approval timeout left behind would fire into a later
        # generation (or linger in the index for as long as the workflow's timeout).
        pipe.zrem(self._deadlines(run_id), keys.deadline_member(run_id, stopped_gen))
        if steps:
            pipe.zrem(self._approvals(run_id), *(keys.approval_member(run_id, stopped_gen, step) for step in steps))
        pipe.execute()
        return StopResult(outcome=StopOutcome.OK, detail=reply[1], interrupted=interrupted)

    def resume(self, run_id: str, plan: ResumePlan) -> ResumeResult:
        """Apply a resume plan atomically (see ``lua/resume.lua``); a workflow deadline starts again from now.

        Returns:
            ``OK`` with the new generation, ``CONFLICT`` with the current one when another resume won, or
            ``REFUSED`` with the run's status.
        """
        if plan.definition is not None:
            self.save_definition(plan.definition)
        new_hash = plan.definition.definition_hash if plan.definition is not None else ""
        argv: list[Any] = [
            plan.expected_generation,
            ",".join(plan.allowed_statuses),
            self.active_ttl_s,
            plan.forced_step or "",
            new_hash,
        ]

        for step, status, pending in plan.resets:
            argv += [step, status, pending]
        reply = [_text(x) for x in self._scripts["resume"](keys=_ending_keys(run_id), args=argv)]
        outcome = ResumeOutcome(reply[0])
        if outcome == ResumeOutcome.REFUSED:
            return ResumeResult(outcome, detail=reply[1])
        if outcome == ResumeOutcome.OK:
            # Timers of the generation left behind must not fire into the new one; fresh ones are set as steps wait.
            old = plan.expected_generation
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(self._deadlines(run_id), keys.deadline_member(run_id, old))
            if plan.resets:
                pipe.zrem(
                    self._approvals(run_id), *(keys.approval_member(run_id, old, step) for step, _, _ in plan.resets)
                )
            if reply[2]:
                pipe.zadd(self._deadlines(run_id), {keys.deadline_member(run_id, reply[1]): float(reply[2])})
            pipe.execute()
        return ResumeResult(outcome, generation=reply[1])

    def add_deadline(self, run_id: str, generation: str, at: float) -> None:
        """Schedule the run's workflow deadline (durable: swept by any worker, whenever one runs)."""
        self.client.zadd(self._deadlines(run_id), {keys.deadline_member(run_id, generation): at})

    def due_deadlines(self, limit: int = 500, buckets: Sequence[str | None] | None = None) -> list[tuple[str, str]]:
        """``(run_id, generation)`` of deadlines that have passed, by Redis's clock."""
        members = self._due(keys.deadlines_key, limit, buckets)
        out: list[tuple[str, str]] = []
        for member in members:
            run_id, _, generation = _text(member).partition("|")
            out.append((run_id, generation))
        return out

    def drop_deadline(self, run_id: str, generation: str) -> None:
        """Forget a deadline that fired or no longer applies."""
        self.client.zrem(self._deadlines(run_id), keys.deadline_member(run_id, generation))

    # -- approvals -----------------------------------------------------------------------------------------------

    def wait_for_decision(self, attempt: Attempt, data: dict[str, Any], timeout_s: float | None) -> bool:
        """Park a claimed approval step as ``waiting``: no task, no lease, no worker slot (see ``lua/wait.lua``).

        Returns:
            ``False`` when the attempt is stale.
        """
        run_id, step = attempt.run_id, attempt.step
        argv: list[Any] = [step, attempt.generation, attempt.task_id, json.dumps(data), timeout_s or ""]
        reply = [_text(x) for x in self._scripts["wait"](keys=_run_keys(run_id), args=argv)]
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(self._leases(run_id), keys.lease_member(run_id, step, attempt.task_id))
        if reply[0] == "ok" and reply[1]:
            pipe.zadd(
                self._approvals(run_id), {keys.approval_member(run_id, attempt.generation, step): float(reply[1])}
            )
        pipe.execute()
        return reply[0] == "ok"

    def decide(self, run_id: str, step: str, decision: Decision) -> DecisionResult:
        """Record a decision on a waiting step; the first allowed one wins (see ``lua/decide.lua``).

        Returns:
            ``OK`` with the generation (the step now runs under ``decision.task_id``, lease indexed: finish it
            next), ``FORBIDDEN``, ``NOT_WAITING`` with the step's status, ``STALE`` with the run's generation, or
            ``MISSING``.
        """
        argv: list[Any] = [
            step,
            decision.decision,
            decision.by,
            decision.comment,
            "1" if decision.allowed else "0",
            decision.task_id,
            decision.lease_s,
            decision.generation,
            MAX_AUDIT_ENTRIES,
        ]
        reply = [_text(x) for x in self._scripts["decide"](keys=_run_keys(run_id), args=argv)]
        outcome = DecisionOutcome(reply[0])
        if outcome == DecisionOutcome.NOT_WAITING:
            return DecisionResult(outcome, detail=reply[1])
        if outcome != DecisionOutcome.OK:
            return DecisionResult(outcome, generation=reply[1] if len(reply) > 1 else "")
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(
            self._leases(run_id), {keys.lease_member(run_id, step, decision.task_id): time.time() + decision.lease_s}
        )
        pipe.zrem(self._approvals(run_id), keys.approval_member(run_id, reply[1], step))
        pipe.execute()
        return DecisionResult(DecisionOutcome.OK, generation=reply[1])

    def due_approvals(
        self, limit: int = 500, buckets: Sequence[str | None] | None = None
    ) -> list[tuple[str, str, str]]:
        """``(run_id, generation, step)`` of approval waits whose timeout passed, by Redis's clock."""
        members = self._due(keys.approvals_key, limit, buckets)
        out: list[tuple[str, str, str]] = []
        for member in members:
            run_id, generation, step = _text(member).split("|", 2)
            out.append((run_id, generation, step))
        return out

    def drop_approval(self, run_id: str, generation: str, step: str) -> None:
        """Forget an approval timeout that fired or no longer applies."""
        self.client.zrem(self._approvals(run_id), keys.approval_member(run_id, generation, step))
