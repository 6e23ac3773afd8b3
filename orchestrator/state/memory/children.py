"""The in-memory store's child runs, as ``lua/child_wait.lua`` and ``lua/child_done.lua``."""

from __future__ import annotations

import json

from orchestrator.domain import Attempt, ChildTotals, ParentLink
from orchestrator.state import keys
from orchestrator.state.base import link_fields
from orchestrator.state.memory.core import _COMPACT, MemoryStateCore, _increment, _stamp

_TOTALS = ("llm_spent_nusd", "llm_calls", "llm_input_tokens", "llm_output_tokens")


class ChildRuns(MemoryStateCore):
    """Link child runs to their parents and hand a parent's ``workflow`` step from wait to finish, under the lock."""

    def link_parent(self, child_run_id: str, link: ParentLink, *, budget_cap_nusd: int | None = None) -> None:
        """Write the child's link to its parent (nothing when the child is gone, as ``HSET`` on an expired hash
        would leave only the link behind)."""
        with self._lock:
            run = self._live(child_run_id, self._clock())
            if run is not None:
                run.fields.update(link_fields(link, budget_cap_nusd))

    def wait_for_child(self, attempt: Attempt, child_run_id: str) -> bool:
        """Park a claimed ``workflow`` step as ``waiting`` for its child (``lua/child_wait.lua``)."""
        p = keys.step_prefix(attempt.step)
        with self._lock:
            now = self._clock()
            run = self._live(attempt.run_id, now)
            self._leases.pop(keys.lease_member(attempt.run_id, attempt.step, attempt.task_id), None)
            if run is None or not self._owns(run.fields, attempt):
                return False
            stamp = _stamp(now)
            data = json.dumps({"child_run_id": child_run_id}, separators=_COMPACT)
            self._emit(run, stamp, "step_waiting", attempt.step, data=data)
            if run.fields.get(p + "child_run_id") != child_run_id:
                run.fields[p + "child_counted"] = ""
            run.fields.update(
                {
                    p + "status": "waiting",
                    p + "task": "",
                    p + "lease": "",
                    p + "waiting_since": stamp,
                    p + "child_run_id": child_run_id,
                }
            )
            return True

    def child_ended(
        self, link: ParentLink, child_run_id: str, totals: ChildTotals, *, task_id: str, lease_s: float
    ) -> bool:
        """Count the child's spend and take the parent's waiting step over (``lua/child_done.lua``)."""
        p = keys.step_prefix(link.step)
        with self._lock:
            now = self._clock()
            run = self._live(link.run_id, now)
            fields = run.fields if run is not None else {}
            if "status" not in fields or p + "status" not in fields or fields.get(p + "child_run_id") != child_run_id:
                return False
            raw = fields.get(p + "child_counted") or ""
            counted = [int(n) for n in raw.split(",")] if raw else [0, 0, 0, 0]
            now_counted = []
            for name, total, before in zip(
                _TOTALS,
                (totals.spent_nusd, totals.calls, totals.input_tokens, totals.output_tokens),
                counted,
                strict=True,
            ):
                if total > before:
                    _increment(fields, name, total - before)
                now_counted.append(str(max(total, before)))
            fields[p + "child_counted"] = ",".join(now_counted)
            if (
                fields.get("gen") != link.generation
                or fields["status"] != "running"
                or fields[p + "status"] != "waiting"
            ):
                return False
            fields.update({p + "status": "running", p + "task": task_id, p + "lease": _stamp(now + lease_s)})
            self._leases[keys.lease_member(link.run_id, link.step, task_id)] = now + lease_s
            return True
