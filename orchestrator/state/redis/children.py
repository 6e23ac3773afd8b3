"""The Redis store's child runs (``uses: workflow``): link a child to its parent, park and complete the parent step."""

from __future__ import annotations

import time
from typing import Any, cast

from orchestrator.domain import Attempt, ChildTotals, ParentLink
from orchestrator.state import keys
from orchestrator.state.base import link_fields
from orchestrator.state.redis.core import RedisStateCore, _run_keys, _text


class ChildRuns(RedisStateCore):
    """Link child runs to their parents and hand a parent's ``workflow`` step from wait to finish."""

    def link_parent(self, child_run_id: str, link: ParentLink, *, budget_cap_nusd: int | None = None) -> None:
        """Write the child's link to its parent (one ``HSET`` on the child's hash)."""
        self.client.hset(keys.run_key(child_run_id), mapping=cast(Any, link_fields(link, budget_cap_nusd)))

    def wait_for_child(self, attempt: Attempt, child_run_id: str) -> bool:
        """Park a claimed ``workflow`` step as ``waiting`` for its child (see ``lua/child_wait.lua``)."""
        run_id, step = attempt.run_id, attempt.step
        argv: list[Any] = [step, attempt.generation, attempt.task_id, child_run_id]
        reply = [_text(x) for x in self._scripts["child_wait"](keys=_run_keys(run_id), args=argv)]
        self.client.zrem(self._leases(run_id), keys.lease_member(run_id, step, attempt.task_id))
        return reply[0] == "ok"

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
        """Count the child's spend and take the parent's waiting step over (see ``lua/child_done.lua``)."""
        argv: list[Any] = [
            link.step,
            link.generation,
            child_run_id,
            task_id,
            lease_s,
            totals.spent_nusd,
            totals.calls,
            totals.input_tokens,
            totals.output_tokens,
            "1" if tool else "0",
        ]
        if tool:
            self._scripts["child_done"](keys=[keys.run_key(link.run_id)], args=argv)
            return False
        member = keys.lease_member(link.run_id, link.step, task_id)
        # Indexed before the script: a process dying between the take-over and the finish leaves a lease to expire.
        self.client.zadd(self._leases(link.run_id), {member: time.time() + lease_s})
        reply = [_text(x) for x in self._scripts["child_done"](keys=[keys.run_key(link.run_id)], args=argv)]
        if reply[0] != "ok":
            self.client.zrem(self._leases(link.run_id), member)
        return reply[0] == "ok"
