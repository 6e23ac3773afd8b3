"""The Redis store's item transitions: a map step's items claimed, finished, retried and reclaimed by Lua scripts
(``lua/item_*.lua``) on the run's hash and the step's item hash (one hash tag, one slot)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, cast

from orchestrator.domain import (
    MAX_AUDIT_ENTRIES,
    Attempt,
    ChildTotals,
    ClaimOutcome,
    Decision,
    DecisionOutcome,
    DecisionResult,
    ItemClaim,
    ItemDispatch,
    ParentLink,
    ReclaimedItem,
    StepOutcome,
)
from orchestrator.errors import ErrorRecord
from orchestrator.infra.redis_cluster import queue_evalsha
from orchestrator.state import keys
from orchestrator.state.items import ITEM_FIELDS, ItemRecord, dumps, item_record, page_bounds
from orchestrator.state.owed import OwedWrites
from orchestrator.state.redis.core import RedisStateCore, _text

_CHUNK = 1000
"""Item fields read per ``HMGET``: a 10,000-item step is read in ten commands of one pipeline."""


def _item_keys(run_id: str, step: str) -> list[str]:
    return [keys.run_key(run_id), keys.events_key(run_id), keys.items_key(run_id, step)]


def _member(attempt: Attempt) -> str:
    return keys.lease_member(attempt.run_id, keys.item_unit(attempt.step, attempt.index), attempt.task_id)


class ItemTransitions(RedisStateCore):
    """Expand a map step, and claim, finish, retry, reclaim, stop and read its items."""

    def _item_script(self, script: str, run_id: str, step: str, argv: list[Any]) -> Any:
        return self._scripts[script](keys=_item_keys(run_id, step), args=argv)

    def _hold_items(self, run_id: str, step: str, publish: tuple[tuple[int, str], ...], grace_s: float) -> None:
        if publish:
            due = time.time() + grace_s
            held = {keys.lease_member(run_id, keys.item_unit(step, i), t): due for i, t in publish}
            self.client.zadd(self._leases(run_id), cast(Any, held))

    def expand_items(
        self, attempt: Attempt, items: list[str], result_keys: list[str], *, max_parallel: int, grace_s: float
    ) -> ItemDispatch:
        """Expand a claimed map step into its items (see ``lua/item_expand.lua``).

        The items a first expansion queues (the first ``max_parallel``, or all) are covered in the lease index in the
        same round trip, before the script: their task ids are the prefix sent here and their index, so a worker
        dying between the expansion and the publish leaves the sweeper every one of them to send. Covers that the
        script did not use (items kept from an earlier generation) are dropped after it.
        """
        prefix = uuid.uuid4().hex[:16]
        argv: list[Any] = [attempt.step, attempt.generation, attempt.task_id, max_parallel, grace_s]
        argv += [prefix, len(items)]
        for item, key in zip(items, result_keys, strict=True):
            argv += [item, key]
        step_member = keys.lease_member(attempt.run_id, attempt.step, attempt.task_id)
        first = min(len(items), max_parallel or len(items))
        covered = {i: f"{prefix}.{i}" for i in range(first)}
        due = time.time() + grace_s
        # The step's own entry now watches for a lost finish of the step (reclaim.lua extends it while items run).
        held: dict[str, float] = {self._item_member(attempt, i, t): due for i, t in covered.items()}
        held[step_member] = due
        script = self._scripts["item_expand"]
        replies = self._pipeline(
            lambda pipe: queue_evalsha(pipe, script.sha, 3, *_item_keys(attempt.run_id, attempt.step), *argv),
            before=(lambda pipe: pipe.zadd(self._leases(attempt.run_id), cast(Any, held)),),
        )
        reply = [_text(x) for x in replies[1]]
        publish = tuple((int(reply[i]), reply[i + 1]) for i in range(3, len(reply), 2)) if reply[0] == "ok" else ()
        unused = [self._item_member(attempt, i, t) for i, t in covered.items() if (i, t) not in set(publish)]
        if unused:
            self.client.zrem(self._leases(attempt.run_id), *unused)
        if reply[0] != "ok":
            return ItemDispatch(recorded=False)
        # Items past the first cover (a resume keeping earlier successes): held now, after the script.
        self._hold_items(attempt.run_id, attempt.step, tuple(p for p in publish if p[0] not in covered), grace_s)
        ended, total = int(reply[1]), int(reply[2])
        return ItemDispatch(
            recorded=True,
            publish=publish,
            all_ended=ended >= total,
            step_task=attempt.task_id,
            ended=ended,
            total=total,
        )

    @staticmethod
    def _item_member(attempt: Attempt, index: int, task_id: str) -> str:
        return keys.lease_member(attempt.run_id, keys.item_unit(attempt.step, index), task_id)

    def claim_item(self, attempt: Attempt, *, lease_s: float, upstream: tuple[str, ...]) -> ItemClaim:
        """Start an attempt of one item (see ``lua/item_claim.lua``); the attempt enters the lease index first."""
        member = _member(attempt)
        argv: list[Any] = [attempt.step, attempt.generation, attempt.task_id, attempt.index, lease_s]
        argv += [len(upstream), *upstream]
        script = self._scripts["item_claim"]
        replies = self._pipeline(
            lambda pipe: queue_evalsha(pipe, script.sha, 3, *_item_keys(attempt.run_id, attempt.step), *argv),
            before=(lambda pipe: pipe.zadd(self._leases(attempt.run_id), {member: time.time() + lease_s}),),
        )
        reply = [_text(x) for x in replies[1]]
        outcome = ClaimOutcome(reply[0])
        if outcome != ClaimOutcome.OK and not (outcome == ClaimOutcome.BUSY and reply[1:2] == ["own"]):
            self.client.zrem(self._leases(attempt.run_id), member)
        if outcome != ClaimOutcome.OK:
            return ItemClaim(outcome=outcome, detail=reply[1] if len(reply) > 1 else "")
        rows = reply[10:]
        return ItemClaim(
            outcome=outcome,
            attempt=int(reply[1]),
            generation_attempt=int(reply[1]) - int(reply[3] or 0),
            now=float(reply[2]),
            item=json.loads(reply[4]),
            inputs=json.loads(reply[5]),
            count=int(reply[6]),
            queued_at=float(reply[7]) if reply[7] else None,
            step_task=reply[8],
            parent_status={p: rows[2 * i] for i, p in enumerate(upstream)},
            parent_output={p: json.loads(rows[2 * i + 1]) if rows[2 * i + 1] else None for i, p in enumerate(upstream)},
        )

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
        """Record an item's outcome and queue the items its place frees (see ``lua/item_finish.lua``).

        With ``may_refill`` (the step has ``max_parallel``) the item's own lease entry is kept until the items it
        queued are held: a worker dying in between leaves that entry to fall due, and its reclaim holds them then
        (``lua/item_reclaim.lua``). Without it nothing can be queued, and the entry goes in the same round trip.
        What the attempt ``owed`` Redis (its LLM calls' closes) goes first in the script's round trip.
        """
        argv: list[Any] = [attempt.step, attempt.generation, attempt.task_id, attempt.index, outcome.value]
        argv += ["" if output is None else dumps(output), "" if error is None else dumps(error), uuid.uuid4().hex[:16]]
        script = self._scripts["item_finish"]
        leases = self._leases(attempt.run_id)
        release = (lambda pipe: pipe.zrem(leases, _member(attempt)),)
        finish = (lambda pipe: queue_evalsha(pipe, script.sha, 3, *_item_keys(attempt.run_id, attempt.step), *argv),)
        replies = self._pipeline(*finish, after=() if may_refill else release, owed=owed)
        reply = [_text(x) for x in replies[0]]
        publish = tuple((int(reply[i]), reply[i + 1]) for i in range(3, len(reply), 2)) if reply[0] == "ok" else ()
        if may_refill and publish:
            due = time.time() + grace_s
            held = {self._item_member(attempt, i, t): due for i, t in publish}
            marker = keys.items_key(attempt.run_id, attempt.step), f"{attempt.index}:refill"
            # The refills are held before the marker and the item's own entry go (in a cluster, a round trip later).
            self._pipeline(lambda pipe: pipe.zadd(leases, held), after=(lambda pipe: pipe.hdel(*marker), *release))
        elif may_refill:
            self._pipeline(*release)
        if reply[0] != "ok":
            return ItemDispatch(recorded=False)
        return ItemDispatch(recorded=True, publish=publish, all_ended=reply[1] == "1", step_task=reply[2])

    def retry_item(
        self, attempt: Attempt, error: ErrorRecord | None, *, countdown_s: float, grace_s: float, counted: bool = True
    ) -> bool:
        """Put a running item back to ``queued`` (see ``lua/item_retry.lua``); ``False`` when stale."""
        argv: list[Any] = [attempt.step, attempt.generation, attempt.task_id, attempt.index]
        argv += ["" if error is None else dumps(error), countdown_s, grace_s, "1" if counted else ""]
        lease = self._item_script("item_retry", attempt.run_id, attempt.step, argv)
        if lease is None:
            return False
        self.client.zadd(self._leases(attempt.run_id), {_member(attempt): float(_text(lease))})
        return True

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
        """Recover the item behind an expired lease (see ``lua/item_reclaim.lua``)."""
        run_id, unit, task_id = keys.parse_lease_member(member)
        step, index = keys.parse_item_unit(unit)
        argv: list[Any] = [step, index, task_id, new_task_id, dumps(error), grace_s, backlog_wait_s, int(owner_dead)]
        reply = [_text(x) for x in self._item_script("item_reclaim", run_id, step, argv)]
        if reply[0] == "refill":
            # The item finished but its worker died before holding the items its finish queued: hold them now, due
            # at once, for the next sweep to send.
            now = time.time()
            pipe = self.client.pipeline(transaction=False)
            refills = {
                keys.lease_member(run_id, keys.item_unit(step, int(i)), t): now
                for i, t in zip(reply[1::2], reply[2::2], strict=True)
            }
            if refills:
                pipe.zadd(self._leases(run_id), cast(Any, refills))
            pipe.zrem(self._leases(run_id), member)
            pipe.execute()
            return None
        if reply[0] == "live":
            self.client.zadd(self._leases(run_id), {member: float(reply[1])})
            return None
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(self._leases(run_id), member)
        if reply[0] == "ok":
            pipe.zadd(self._leases(run_id), {keys.lease_member(run_id, unit, reply[3]): float(reply[4])})
        pipe.execute()
        if reply[0] != "ok" or index is None:
            return None
        return ReclaimedItem(run_id, step, index, definition_hash=reply[1], generation=reply[2], task_id=reply[3])

    def extend_item_holds(self, run_id: str, step: str, items: Sequence[tuple[int, str]], *, grace_s: float) -> None:
        """Hold queued items for another grace (see ``lua/item_hold.lua``); the lease index follows the script: a
        sweep between the two finds their leases live and holds them itself."""
        if not items:
            return
        argv: list[Any] = [grace_s]
        for index, task_id in items:
            argv += [index, task_id]
        reply = [_text(x) for x in self._item_script("item_hold", run_id, step, argv)]
        due = float(reply[0])
        held = {
            keys.lease_member(run_id, keys.item_unit(step, int(i)), t): due
            for i, t in zip(reply[1::2], reply[2::2], strict=True)
        }
        if held:
            self.client.zadd(self._leases(run_id), cast(Any, held))

    def stop_items(self, run_id: str, step: str, generation: str) -> list[str]:
        """Cancel a stopped run's unfinished items (see ``lua/item_stop.lua``); the task ids to interrupt."""
        reply = self._item_script("item_stop", run_id, step, [step, generation])
        return [_text(x) for x in reply[1:]]

    def wait_item_child(self, attempt: Attempt, child_run_id: str) -> bool:
        """Park a running item waiting for its child run (see ``lua/item_wait.lua``)."""
        return self._wait_item(attempt, [child_run_id, "", ""]) is not None

    def wait_item_decision(self, attempt: Attempt, data: dict[str, Any], timeout_s: float | None) -> bool:
        """Park a running item of an approval map step waiting for a decision (see ``lua/item_wait.lua``); its
        timeout enters the approval index under the item's unit (``STEP#INDEX``)."""
        decide_by = self._wait_item(attempt, ["", dumps(data), timeout_s or ""])
        if decide_by:
            unit = keys.item_unit(attempt.step, attempt.index)
            member = keys.approval_member(attempt.run_id, attempt.generation, unit)
            self.client.zadd(self._approvals(attempt.run_id), {member: float(decide_by)})
        return decide_by is not None

    def _wait_item(self, attempt: Attempt, extra: list[Any]) -> str | None:
        argv: list[Any] = [attempt.step, attempt.generation, attempt.task_id, attempt.index, *extra]
        script = self._scripts["item_wait"]
        replies = self._pipeline(
            lambda pipe: queue_evalsha(pipe, script.sha, 3, *_item_keys(attempt.run_id, attempt.step), *argv),
            lambda pipe: pipe.zrem(self._leases(attempt.run_id), _member(attempt)),
        )
        reply = [_text(x) for x in replies[0]]
        return reply[1] if reply[0] == "ok" else None

    def decide_item(self, run_id: str, step: str, index: int, decision: Decision) -> DecisionResult:
        """Record a decision on one waiting item; the first allowed one wins (see ``lua/item_decide.lua``).

        Returns:
            As :meth:`StateStore.decide`, for the item: on ``OK`` it runs under ``decision.task_id`` (lease indexed)
            for the caller to finish with :meth:`finish_item`.
        """
        argv: list[Any] = [step, index, decision.decision, decision.by, decision.comment]
        argv += ["1" if decision.allowed else "0", decision.task_id, decision.lease_s, decision.generation]
        argv += [MAX_AUDIT_ENTRIES]
        taken = Attempt(run_id, step, decision.generation, decision.task_id, index)
        reply = self._taken_over(taken, decision.lease_s, "item_decide", argv)
        outcome = DecisionOutcome(reply[0])
        if outcome == DecisionOutcome.NOT_WAITING:
            return DecisionResult(outcome, detail=reply[1])
        if outcome != DecisionOutcome.OK:
            return DecisionResult(outcome, generation=reply[1] if len(reply) > 1 else "")
        self.client.zrem(self._approvals(run_id), keys.approval_member(run_id, reply[1], keys.item_unit(step, index)))
        return DecisionResult(DecisionOutcome.OK, generation=reply[1])

    def _taken_over(self, attempt: Attempt, lease_s: float, script: str, argv: list[Any]) -> list[str]:
        """Run a script that may take a waiting item over under ``attempt``'s task id, its lease entry written first
        in the same round trip (a process dying right after the take-over leaves the sweeper the item to re-queue);
        the entry is dropped again when the script did not take it over."""
        member = _member(attempt)
        sha = self._scripts[script].sha
        replies = self._pipeline(
            lambda pipe: queue_evalsha(pipe, sha, 3, *_item_keys(attempt.run_id, attempt.step), *argv),
            before=(lambda pipe: pipe.zadd(self._leases(attempt.run_id), {member: time.time() + lease_s}),),
        )
        reply = [_text(x) for x in replies[1]]
        if reply[0] != "ok":
            self.client.zrem(self._leases(attempt.run_id), member)
        return reply

    def child_item_ended(
        self, link: ParentLink, child_run_id: str, totals: ChildTotals, *, task_id: str, lease_s: float
    ) -> bool:
        """Count the child's spend and take its waiting item over (see ``lua/item_child_done.lua``)."""
        assert link.index is not None, "the child of a step, not of an item"
        argv: list[Any] = [link.step, link.generation, link.index, child_run_id, task_id, lease_s]
        argv += [totals.spent_nusd, totals.calls, totals.input_tokens, totals.output_tokens]
        taken = Attempt(link.run_id, link.step, link.generation, task_id, link.index)
        return self._taken_over(taken, lease_s, "item_child_done", argv)[0] == "ok"

    def waiting_children(self, run_id: str, step: str) -> list[str]:
        """The child runs the step's items wait for (one pipeline)."""
        total = int(self.client.hget(keys.run_key(run_id), keys.step_field(step, "items_total")) or 0)
        pipe = self.client.pipeline(transaction=False)
        for start in range(0, total, _CHUNK):
            names = [f"{i}:{f}" for i in range(start, min(total, start + _CHUNK)) for f in ("status", "child_run_id")]
            pipe.hmget(keys.items_key(run_id, step), names)
        flat = [None if v is None else _text(v) for chunk in pipe.execute() for v in chunk]
        return [child for status, child in zip(flat[::2], flat[1::2], strict=True) if status == "waiting" and child]

    def item_records(self, run_id: str, step: str, offset: int = 0, limit: int = 100) -> list[ItemRecord]:
        """One page of item records, in index order (one ``HMGET``)."""
        total = self.client.hget(keys.run_key(run_id), keys.step_field(step, "items_total"))
        indices = page_bounds(offset, limit, int(total or 0))
        if not indices:
            return []
        names = [f"{i}:{f}" for i in indices for f in ITEM_FIELDS]
        row = [None if v is None else _text(v) for v in self.client.hmget(keys.items_key(run_id, step), names)]
        width = len(ITEM_FIELDS)
        return [item_record(i, row[n * width : (n + 1) * width]) for n, i in enumerate(indices)]

    def item_outputs(self, run_id: str, step: str) -> tuple[list[Any], list[tuple[int, str, ErrorRecord | None]]]:
        """Every item's output in order, and the items that did not succeed (one pipeline)."""
        total = int(self.client.hget(keys.run_key(run_id), keys.step_field(step, "items_total")) or 0)
        pipe = self.client.pipeline(transaction=False)
        for start in range(0, total, _CHUNK):
            names = [f"{i}:{f}" for i in range(start, min(total, start + _CHUNK)) for f in ("status", "output")]
            pipe.hmget(keys.items_key(run_id, step), names)
        flat = [None if v is None else _text(v) for chunk in pipe.execute() for v in chunk]
        outputs: list[Any] = []
        unsuccessful: list[tuple[int, str, ErrorRecord | None]] = []
        for i in range(total):
            status, output = flat[2 * i], flat[2 * i + 1]
            outputs.append(json.loads(output) if output else None)
            if status != "succeeded":
                unsuccessful.append((i, status or "pending", None))
        if unsuccessful:
            errors = self.client.hmget(keys.items_key(run_id, step), [f"{i}:error" for i, _, _ in unsuccessful[:1]])
            first = unsuccessful[0]
            unsuccessful[0] = (first[0], first[1], json.loads(_text(errors[0])) if errors[0] else None)
        return outputs, unsuccessful


def renew_items(store: RedisStateCore, items: dict[tuple[str, str], list[tuple[int, str]]], lease_s: float) -> None:
    """Extend the leases of running items, grouped by ``(run_id, step)`` (see ``lua/item_renew.lua``)."""
    index: dict[str, float] = {}
    lease_end = store.clock.now() + lease_s
    for (run_id, step), pairs in items.items():
        argv: list[Any] = [f"{lease_end:.6f}"]
        for item, task_id in pairs:
            argv += [item, task_id]
        reply = store._scripts["item_renew"](keys=_item_keys(run_id, step), args=argv)
        for (item, task_id), flag in zip(pairs, reply, strict=True):
            if int(flag):
                index[keys.lease_member(run_id, keys.item_unit(step, item), task_id)] = lease_end
    for bucket, members in store._lease_buckets(index).items():
        store.client.zadd(bucket, cast(Any, members), xx=True)
