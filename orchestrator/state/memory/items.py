"""The in-memory store's item transitions, each as its ``lua/item_*.lua`` script (and ``lua/_items.lua``)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from orchestrator.domain import (
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
from orchestrator.state import keys
from orchestrator.state.items import ITEM_FIELDS, ITEM_STATUSES, ItemRecord, dumps, item_record, page_bounds
from orchestrator.state.memory.control import audited
from orchestrator.state.memory.core import MemoryStateCore, _float_or_none, _increment, _Run, _stamp
from orchestrator.state.owed import OwedWrites

_ENDED = frozenset({"succeeded", "failed", "skipped", "cancelled"})
_ITEM_KEYS = ("status", "item", "key", "task", "lease", "attempts", "base", "output", "error", "started_at")
_ITEM_KEYS_ALL = (*_ITEM_KEYS, "finished_at", "queued_at", "child_run_id", "child_counted")
_TOTALS = ("llm_spent_nusd", "llm_calls", "llm_input_tokens", "llm_output_tokens")


def _move(fields: dict[str, str], step: str, source: str | None, target: str | None, by: int = 1) -> None:
    """``count_move``: shift ``by`` items of ``step`` from one status counter to another."""
    if source:
        _increment(fields, keys.step_field(step, f"items_{source}"), -by)
    if target:
        _increment(fields, keys.step_field(step, f"items_{target}"), by)


def _ended(fields: dict[str, str], step: str) -> int:
    return sum(int(fields.get(keys.step_field(step, f"items_{s}")) or 0) for s in _ENDED)


def map_unfinished(fields: dict[str, str], step: str) -> bool:
    """Whether ``step`` is a map step expanded in the run's generation with items still unfinished."""
    p = keys.step_prefix(step)
    if not fields.get(p + "map_gen") or fields.get(p + "map_gen") != fields.get("gen"):
        return False
    return _ended(fields, step) < int(fields.get(p + "items_total") or 0)


def _item_refusal(fields: dict[str, str], p: str, item: tuple[str, str], task_id: str, now: float) -> ItemClaim | None:
    """Why an item may not be claimed (``item_claim.lua``'s refusals, in order), or ``None`` when it may."""
    status, owner = item
    if status in _ENDED:
        return ItemClaim(ClaimOutcome.DONE, detail=status)
    if fields.get("status") != "running":
        return ItemClaim(ClaimOutcome.INACTIVE, detail=fields.get("status", ""))
    deadline = _float_or_none(fields.get("deadline") or "")
    if deadline is not None and now > deadline:
        return ItemClaim(ClaimOutcome.INACTIVE, detail="deadline")
    if fields.get(p + "status") != "running":
        return ItemClaim(ClaimOutcome.INACTIVE, detail=f"step {fields.get(p + 'status', '')}")
    if status in ("pending", "waiting"):
        return ItemClaim(ClaimOutcome.BUSY)
    if status == "queued" and owner and owner != task_id:
        return ItemClaim(ClaimOutcome.SUPERSEDED)
    if status == "running":
        return ItemClaim(ClaimOutcome.BUSY, detail="own" if owner == task_id else "")
    return None


class ItemTransitions(MemoryStateCore):
    """Expand a map step, and claim, finish, retry, reclaim, stop and read its items, under the store's lock."""

    def _items(self, run: _Run, step: str) -> dict[str, str]:
        return run.items.setdefault(step, {})

    def _take(self, run: _Run, step: str, n: int, prefix: str, now: str) -> list[tuple[int, str]]:
        """``take``: queue up to ``n`` pending items from the cursor on."""
        p = keys.step_prefix(step)
        items = self._items(run, step)
        total, cursor = int(run.fields.get(p + "items_total") or 0), int(run.fields.get(p + "cursor") or 0)
        out: list[tuple[int, str]] = []
        while len(out) < n and cursor < total:
            if items.get(f"{cursor}:status") == "pending":
                task = f"{prefix}.{cursor}"
                items.update({f"{cursor}:status": "queued", f"{cursor}:task": task, f"{cursor}:queued_at": now})
                items[f"{cursor}:lease"] = ""
                out.append((cursor, task))
            cursor += 1
        run.fields[p + "cursor"] = str(cursor)
        if out:
            _move(run.fields, step, "pending", "queued", len(out))
        return out

    def _room(self, fields: dict[str, str], step: str) -> int:
        p = keys.step_prefix(step)
        limit = int(fields.get(p + "max_parallel") or 0)
        if limit <= 0:
            return int(fields.get(p + "items_total") or 0)
        busy = sum(int(fields.get(p + f"items_{s}") or 0) for s in ("queued", "running", "waiting"))
        return max(0, limit - busy)

    def _hold(self, run_id: str, step: str, publish: list[tuple[int, str]], due: float) -> None:
        for index, task in publish:
            self._leases[keys.lease_member(run_id, keys.item_unit(step, index), task)] = due

    def expand_items(
        self, attempt: Attempt, items: list[str], result_keys: list[str], *, max_parallel: int, grace_s: float
    ) -> ItemDispatch:
        """Expand a claimed map step into its items (see ``lua/item_expand.lua``)."""
        p = keys.step_prefix(attempt.step)
        with self._lock:
            now = self._clock()
            run = self._live(attempt.run_id, now)
            if run is None or not self._owns(run.fields, attempt):
                return ItemDispatch(recorded=False)
            fields = run.fields
            total = int(fields.get(p + "items_total") or 0)
            if fields.get(p + "map_gen") == attempt.generation:
                ended = _ended(fields, attempt.step)
                return ItemDispatch(True, (), ended >= total, attempt.task_id, ended, total)
            stored = self._items(run, attempt.step)
            kept = 0
            for i, (item, key) in enumerate(zip(items, result_keys, strict=True)):
                if stored.get(f"{i}:status") == "succeeded" and key and stored.get(f"{i}:key") == key:
                    kept += 1
                    continue
                attempts = stored.get(f"{i}:attempts") or "0"
                for name in ("output", "error", "started_at", "finished_at", "child_run_id", "child_counted"):
                    stored.pop(f"{i}:{name}", None)
                stored.update({f"{i}:status": "pending", f"{i}:item": item, f"{i}:key": key, f"{i}:task": ""})
                stored.update({f"{i}:lease": "", f"{i}:attempts": attempts, f"{i}:base": attempts})
            for i in range(len(items), total):
                for name in _ITEM_KEYS_ALL:
                    stored.pop(f"{i}:{name}", None)
            counts = dict.fromkeys(ITEM_STATUSES, "0") | {"pending": str(len(items) - kept), "succeeded": str(kept)}
            fields.update({p + f"items_{s}": n for s, n in counts.items()})
            fields.update({p + "items_total": str(len(items)), p + "cursor": "0", p + "map_gen": attempt.generation})
            fields.update({p + "max_parallel": str(max_parallel), p + "lease": _stamp(now + grace_s)})
            publish = self._take(
                run, attempt.step, self._room(fields, attempt.step), uuid.uuid4().hex[:16], _stamp(now)
            )
            self._leases[keys.lease_member(attempt.run_id, attempt.step, attempt.task_id)] = now + grace_s
            self._hold(attempt.run_id, attempt.step, publish, now + grace_s)
            return ItemDispatch(True, tuple(publish), kept >= len(items), attempt.task_id, kept, len(items))

    def claim_item(self, attempt: Attempt, *, lease_s: float, upstream: tuple[str, ...]) -> ItemClaim:
        """Start an attempt of one item (see ``lua/item_claim.lua``)."""
        p = keys.step_prefix(attempt.step)
        f = f"{attempt.index}:"
        with self._lock:
            now = self._clock()
            run = self._live(attempt.run_id, now)
            if run is None:
                return ItemClaim(ClaimOutcome.MISSING)
            fields = run.fields
            if fields.get("gen") != attempt.generation:
                return ItemClaim(ClaimOutcome.STALE)
            items = self._items(run, attempt.step)
            status, owner = items.get(f + "status"), items.get(f + "task") or ""
            if status is None:
                return ItemClaim(ClaimOutcome.MISSING)
            refusal = _item_refusal(fields, p, (status, owner), attempt.task_id, now)
            if refusal is not None:
                return refusal
            number = int(items.get(f + "attempts") or 0) + 1
            stamp = _stamp(now)
            items.update({f + "status": "running", f + "task": attempt.task_id, f + "lease": _stamp(now + lease_s)})
            items[f + "attempts"] = str(number)
            items.setdefault(f + "started_at", stamp)
            _move(fields, attempt.step, "queued", "running")
            self._emit(run, stamp, "item_started", attempt.step, attempt=number, data=f'{{"index":{attempt.index}}}')
            self._leases[
                keys.lease_member(attempt.run_id, keys.item_unit(attempt.step, attempt.index), attempt.task_id)
            ] = now + lease_s
            queued = items.get(f + "queued_at")
            return ItemClaim(
                outcome=ClaimOutcome.OK,
                attempt=number,
                generation_attempt=number - int(items.get(f + "base") or 0),
                now=float(stamp),
                queued_at=float(queued) if queued else None,
                item=json.loads(items.get(f + "item") or "null"),
                count=int(fields.get(p + "items_total") or 0),
                step_task=fields.get(p + "task") or "",
                inputs=json.loads(fields.get("inputs") or "{}"),
                parent_status={u: fields.get(keys.step_field(u, "status"), "") for u in upstream},
                parent_output={
                    u: json.loads(raw) if (raw := fields.get(keys.step_field(u, "output"))) else None for u in upstream
                },
            )

    def _owned_item(self, run: _Run | None, attempt: Attempt) -> dict[str, str] | None:
        if run is None or run.fields.get("gen") != attempt.generation:
            return None
        items = self._items(run, attempt.step)
        f = f"{attempt.index}:"
        if items.get(f + "status") != "running" or items.get(f + "task") != attempt.task_id:
            return None
        return items

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
        """Record an item's outcome and queue the items its place frees (see ``lua/item_finish.lua``); what the
        attempt ``owed`` a Redis is sent on its own first."""
        if owed is not None:
            owed.flush()
        p = keys.step_prefix(attempt.step)
        f = f"{attempt.index}:"
        member = keys.lease_member(attempt.run_id, keys.item_unit(attempt.step, attempt.index), attempt.task_id)
        with self._lock:
            now = self._clock()
            self._leases.pop(member, None)
            run = self._live(attempt.run_id, now)
            items = self._owned_item(run, attempt)
            if run is None or items is None:
                return ItemDispatch(recorded=False)
            stamp = _stamp(now)
            items.update({f + "status": outcome.value, f + "finished_at": stamp, f + "lease": ""})
            if output is not None:
                items[f + "output"] = dumps(output)
            else:
                items.pop(f + "output", None)
            detail = f'{{"index":{attempt.index}}}'
            if error is not None:
                items[f + "error"] = json.dumps(error)
                detail = f'{{"index":{attempt.index},"error":{items[f + "error"]}}}'
            _move(run.fields, attempt.step, "running", outcome.value)
            number = int(items.get(f + "attempts") or 0)
            self._emit(run, stamp, f"item_{outcome.value}", attempt.step, attempt=number, data=detail)
            publish: list[tuple[int, str]] = []
            running = run.fields.get(p + "status") == "running"
            if running:
                room = self._room(run.fields, attempt.step)
                publish = self._take(run, attempt.step, room, uuid.uuid4().hex[:16], stamp)
            self._hold(attempt.run_id, attempt.step, publish, now + grace_s)
            last = running and _ended(run.fields, attempt.step) >= int(run.fields.get(p + "items_total") or 0)
            return ItemDispatch(True, tuple(publish), last, run.fields.get(p + "task") or "")

    def retry_item(
        self, attempt: Attempt, error: ErrorRecord | None, *, countdown_s: float, grace_s: float, counted: bool = True
    ) -> bool:
        """Put a running item back to ``queued`` (see ``lua/item_retry.lua``); ``False`` when stale."""
        f = f"{attempt.index}:"
        with self._lock:
            now = self._clock()
            run = self._live(attempt.run_id, now)
            items = self._owned_item(run, attempt)
            if run is None or items is None:
                return False
            number = int(items.get(f + "attempts") or 0)
            lease = _stamp(now + countdown_s + grace_s)
            stamp = _stamp(now)
            items.update({f + "status": "queued", f + "lease": lease, f + "queued_at": stamp})
            items[f + "attempts"] = str(number if counted else number - 1)
            raw = "" if error is None else json.dumps(error)
            if raw:
                items[f + "error"] = raw
            _move(run.fields, attempt.step, "running", "queued")
            detail = f'{{"index":{attempt.index},"countdown_s":{float(countdown_s)!r}'
            detail += f',"error":{raw}}}' if raw else "}"
            kind = "item_retry" if counted else "item_deferred"
            self._emit(run, stamp, kind, attempt.step, attempt=number, data=detail)
            unit = keys.item_unit(attempt.step, attempt.index)
            self._leases[keys.lease_member(attempt.run_id, unit, attempt.task_id)] = float(lease)
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
        p, f = keys.step_prefix(step), f"{index}:"
        with self._lock:
            now = self._clock()
            run = self._live(run_id, now)
            items = self._items(run, step) if run is not None else {}
            status = items.get(f + "status")
            if (
                run is None
                or index is None
                or run.fields.get("status") != "running"
                or run.fields.get(p + "status") != "running"
                or items.get(f + "task") != task_id
                or status not in ("running", "queued")
            ):
                self._leases.pop(member, None)
                return None
            lease = _float_or_none(items.get(f + "lease") or "")
            if owner_dead and status == "running":
                lease = None
            until = _stamp(now + grace_s)
            since = _float_or_none(items.get(f + "queued_at") or "")
            waiting = status == "queued" and backlog_wait_s > 0 and now - (since or now) < backlog_wait_s
            if (lease is not None and lease > now) or waiting:
                held = items[f + "lease"] if lease is not None and lease > now else until
                items[f + "lease"] = held
                self._leases[member] = float(held)
                return None
            publish = task_id
            items.update({f + "lease": until, f + "queued_at": _stamp(now)})  # a resent copy is queued anew
            if status == "running":
                publish = new_task_id
                raw = json.dumps(error)
                items.update({f + "status": "queued", f + "task": new_task_id})
                items[f + "error"] = raw
                _move(run.fields, step, "running", "queued")
                number = int(items.get(f + "attempts") or 0)
                data = f'{{"index":{index},"error":{raw}}}'
                self._emit(run, _stamp(now), "item_lost", step, attempt=number, data=data)
            self._leases.pop(member, None)
            self._leases[keys.lease_member(run_id, unit, publish)] = float(until)
            return ReclaimedItem(
                run_id, step, index, run.fields.get("def_hash", ""), run.fields.get("gen", ""), publish
            )

    def extend_item_holds(self, run_id: str, step: str, items: Sequence[tuple[int, str]], *, grace_s: float) -> None:
        """Hold queued items for another grace (see ``lua/item_hold.lua``)."""
        with self._lock:
            now = self._clock()
            run = self._live(run_id, now)
            if run is None:
                return
            rows = self._items(run, step)
            until = _stamp(now + grace_s)
            for index, task_id in items:
                f = f"{index}:"
                if rows.get(f + "status") == "queued" and rows.get(f + "task") == task_id:
                    rows[f + "lease"] = until
                    self._leases[keys.lease_member(run_id, keys.item_unit(step, index), task_id)] = float(until)

    def stop_items(self, run_id: str, step: str, generation: str) -> list[str]:
        """Cancel a stopped run's unfinished items (see ``lua/item_stop.lua``); the task ids to interrupt."""
        p = keys.step_prefix(step)
        with self._lock:
            now = self._clock()
            run = self._live(run_id, now)
            if run is None or run.fields.get("status") == "running":
                return []
            if run.fields.get("gen") != generation or run.fields.get(p + "map_gen") != generation:
                return []
            items = self._items(run, step)
            tasks: list[str] = []
            for i in range(int(run.fields.get(p + "items_total") or 0)):
                status = items.get(f"{i}:status")
                if status in ("pending", "queued", "running", "waiting"):
                    items.update({f"{i}:status": "cancelled", f"{i}:finished_at": _stamp(now), f"{i}:lease": ""})
                    _move(run.fields, step, status, "cancelled")
                    if status in ("queued", "running") and items.get(f"{i}:task"):
                        tasks.append(items[f"{i}:task"])
            return tasks

    def wait_item_child(self, attempt: Attempt, child_run_id: str) -> bool:
        """Park a running item waiting for its child run (see ``lua/item_wait.lua``)."""
        return self._wait_item(attempt, child_run_id, {"index": attempt.index, "child_run_id": child_run_id}, None)

    def wait_item_decision(self, attempt: Attempt, data: dict[str, Any], timeout_s: float | None) -> bool:
        """Park a running item of an approval map step waiting for a decision (see ``lua/item_wait.lua``)."""
        return self._wait_item(attempt, "", data, timeout_s)

    def _wait_item(self, attempt: Attempt, child_run_id: str, data: dict[str, Any], timeout_s: float | None) -> bool:
        f = f"{attempt.index}:"
        with self._lock:
            now = self._clock()
            unit = keys.item_unit(attempt.step, attempt.index)
            self._leases.pop(keys.lease_member(attempt.run_id, unit, attempt.task_id), None)
            run = self._live(attempt.run_id, now)
            items = self._owned_item(run, attempt)
            if run is None or items is None or run.fields.get(keys.step_field(attempt.step, "status")) != "running":
                return False
            stamp = _stamp(now)
            items.update({f + "status": "waiting", f + "task": "", f + "lease": ""})
            if child_run_id:
                if items.get(f + "child_run_id") != child_run_id:
                    items[f + "child_counted"] = ""
                items[f + "child_run_id"] = child_run_id
            else:
                items[f + "decide_by"] = _stamp(now + timeout_s) if timeout_s else ""
                if timeout_s:
                    self._approvals[keys.approval_member(attempt.run_id, attempt.generation, unit)] = now + timeout_s
            _move(run.fields, attempt.step, "running", "waiting")
            number = int(items.get(f + "attempts") or 0)
            self._emit(run, stamp, "item_waiting", attempt.step, attempt=number, data=dumps(data))
            return True

    def decide_item(self, run_id: str, step: str, index: int, decision: Decision) -> DecisionResult:
        """Audit a decision on one item; the first allowed one on a waiting item wins (``lua/item_decide.lua``)."""
        f, p = f"{index}:", keys.step_prefix(step)
        with self._lock:
            now = self._clock()
            run = self._live(run_id, now)
            fields = run.fields if run is not None else {}
            if run is None or "status" not in fields or p + "status" not in fields:
                return DecisionResult(DecisionOutcome.MISSING)
            if decision.generation != "" and fields.get("gen") != decision.generation:
                return DecisionResult(DecisionOutcome.STALE, generation=fields.get("gen", ""))
            items = self._items(run, step)
            expanded = fields.get(p + "map_gen") == fields.get("gen") and f + "status" in items
            status = items.get(f + "status", "pending") if expanded else "pending"
            waiting = status == "waiting" and not items.get(f + "child_run_id")
            outcome = "accepted"
            if not decision.allowed:
                outcome = "refused: not an approver"
            elif fields["status"] != "running" or fields[p + "status"] != "running" or not waiting:
                outcome = f"refused: not waiting ({fields['status'] if waiting else status})"
            if fields["status"] in ("running", "waiting", "pending") and expanded:
                items[f + "audit"] = audited(items.get(f + "audit"), decision, _stamp(now), outcome)
            if not decision.allowed:
                return DecisionResult(DecisionOutcome.FORBIDDEN)
            if outcome != "accepted":
                return DecisionResult(DecisionOutcome.NOT_WAITING, detail=fields["status"] if waiting else status)
            lease = now + decision.lease_s
            items.update({f + "status": "running", f + "task": decision.task_id, f + "lease": _stamp(lease)})
            items[f + "decide_by"] = ""
            _move(fields, step, "waiting", "running")
            unit = keys.item_unit(step, index)
            self._leases[keys.lease_member(run_id, unit, decision.task_id)] = lease
            self._approvals.pop(keys.approval_member(run_id, fields["gen"], unit), None)
            return DecisionResult(DecisionOutcome.OK, generation=fields["gen"])

    def child_item_ended(
        self, link: ParentLink, child_run_id: str, totals: ChildTotals, *, task_id: str, lease_s: float
    ) -> bool:
        """Count the child's spend and take its waiting item over (see ``lua/item_child_done.lua``)."""
        f = f"{link.index}:"
        with self._lock:
            now = self._clock()
            run = self._live(link.run_id, now)
            items = self._items(run, link.step) if run is not None else {}
            if run is None or f + "status" not in items or items.get(f + "child_run_id") != child_run_id:
                return False
            raw = items.get(f + "child_counted") or ""
            counted = [int(n) for n in raw.split(",")] if raw else [0, 0, 0, 0]
            values = (totals.spent_nusd, totals.calls, totals.input_tokens, totals.output_tokens)
            for name, total, before in zip(_TOTALS, values, counted, strict=True):
                if total > before:
                    _increment(run.fields, name, total - before)
            items[f + "child_counted"] = ",".join(str(max(t, b)) for t, b in zip(values, counted, strict=True))
            fields = run.fields
            if fields.get("gen") != link.generation or fields.get("status") != "running":
                return False
            if fields.get(keys.step_field(link.step, "status")) != "running" or items[f + "status"] != "waiting":
                return False
            items.update({f + "status": "running", f + "task": task_id, f + "lease": _stamp(now + lease_s)})
            _move(fields, link.step, "waiting", "running")
            member = keys.lease_member(link.run_id, keys.item_unit(link.step, link.index), task_id)
            self._leases[member] = now + lease_s
            return True

    def waiting_children(self, run_id: str, step: str) -> list[str]:
        """The child runs the step's items wait for."""
        with self._lock:
            run = self._live(run_id, self._clock())
            if run is None:
                return []
            items = self._items(run, step)
            total = int(run.fields.get(keys.step_field(step, "items_total")) or 0)
            rows = [(items.get(f"{i}:status"), items.get(f"{i}:child_run_id")) for i in range(total)]
            return [child for status, child in rows if status == "waiting" and child]

    def renew_items(self, items: dict[tuple[str, str], list[tuple[int, str]]], lease_s: float) -> None:
        """Extend the leases of running items (see ``lua/item_renew.lua``)."""
        with self._lock:
            now = self._clock()
            for (run_id, step), pairs in items.items():
                run = self._live(run_id, now)
                if run is None or run.fields.get("status") != "running":
                    continue
                stored = self._items(run, step)
                for index, task_id in pairs:
                    f = f"{index}:"
                    if stored.get(f + "status") == "running" and stored.get(f + "task") == task_id:
                        stored[f + "lease"] = _stamp(now + lease_s)
                        member = keys.lease_member(run_id, keys.item_unit(step, index), task_id)
                        if member in self._leases:
                            self._leases[member] = now + lease_s

    def item_records(self, run_id: str, step: str, offset: int = 0, limit: int = 100) -> list[ItemRecord]:
        """One page of item records, in index order."""
        with self._lock:
            run = self._live(run_id, self._clock())
            if run is None:
                return []
            total = int(run.fields.get(keys.step_field(step, "items_total")) or 0)
            items = self._items(run, step)
            return [
                item_record(i, [items.get(f"{i}:{name}") for name in ITEM_FIELDS])
                for i in page_bounds(offset, limit, total)
            ]

    def item_outputs(self, run_id: str, step: str) -> tuple[list[Any], list[tuple[int, str, ErrorRecord | None]]]:
        """Every item's output in order, and the items that did not succeed (the first with its error)."""
        with self._lock:
            run = self._live(run_id, self._clock())
            if run is None:
                return [], []
            total = int(run.fields.get(keys.step_field(step, "items_total")) or 0)
            items = self._items(run, step)
            outputs = [json.loads(raw) if (raw := items.get(f"{i}:output")) else None for i in range(total)]
            bad: list[tuple[int, str, ErrorRecord | None]] = [
                (i, items.get(f"{i}:status") or "pending", None)
                for i in range(total)
                if items.get(f"{i}:status") != "succeeded"
            ]
            if bad:
                raw = items.get(f"{bad[0][0]}:error")
                bad[0] = (bad[0][0], bad[0][1], json.loads(raw) if raw else None)
            return outputs, bad
