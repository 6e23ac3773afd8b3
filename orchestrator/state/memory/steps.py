"""The in-memory store's step transitions: claim, finish, retry, defer, renew and reclaim, each as its Lua script."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from orchestrator.domain import (
    Attempt,
    Claim,
    ClaimOutcome,
    FinishResult,
    KeepRequest,
    ReclaimedStep,
    ReleaseRules,
    StepOutcome,
)
from orchestrator.errors import DeferralRecord, ErrorRecord
from orchestrator.infra.ids import new_id
from orchestrator.state import keys
from orchestrator.state.base import failure_line, run_failed_data, success_detail
from orchestrator.state.items import split_item_leases
from orchestrator.state.memory.core import (
    _COMPACT,
    _STOPPABLE_STEP,
    _UNFINISHED,
    MAX_RESEND_BACKOFF,
    _due,
    _float_or_none,
    _increment,
    _json_list,
    _Run,
    _stamp,
)
from orchestrator.state.memory.items import ItemTransitions, map_unfinished
from orchestrator.state.owed import OwedWrite, OwedWrites


class StepTransitions(ItemTransitions):
    """Claim, finish, retry, defer, renew and reclaim a step's attempts, under the store's lock."""

    # -- step transitions ----------------------------------------------------------------------------------------

    def claim(
        self,
        attempt: Attempt,
        *,
        lease_s: float,
        upstream: tuple[str, ...],
        children: tuple[str, ...],
        carrier: str = "",
    ) -> Claim:
        """Start an attempt of a step if this message may run it (see ``lua/claim.lua``).

        As in Redis, the attempt enters the lease index (at the clock plus ``lease_s``) before the claim, and leaves
        it again when the claim is anything but ``ok``. ``carrier`` is not kept: nothing interrupts an in-memory
        store's steps (a thread cannot be).
        """
        member = keys.lease_member(attempt.run_id, attempt.step, attempt.task_id)
        with self._lock:
            self._leases[member] = self._clock() + lease_s
            got = self._claim(attempt, lease_s, upstream, children)
            if got.outcome != ClaimOutcome.OK and not (got.outcome == ClaimOutcome.BUSY and got.detail == "own"):
                self._leases.pop(member, None)
            return got

    def _claim(self, attempt: Attempt, lease_s: float, upstream: tuple[str, ...], children: tuple[str, ...]) -> Claim:
        """``lua/claim.lua``, under the lock."""
        p = keys.step_prefix(attempt.step)
        now = self._clock()
        run = self._live(attempt.run_id, now)
        fields = run.fields if run is not None else {}
        run_status, status = fields.get("status"), fields.get(p + "status")
        if run is None or run_status is None or status is None:
            return Claim(outcome=ClaimOutcome.MISSING)
        if fields.get("gen") != attempt.generation:
            return Claim(outcome=ClaimOutcome.STALE)
        if status not in _UNFINISHED:
            waiting = tuple(
                c
                for c in children
                if fields.get(keys.step_field(c, "status")) == "queued" and not fields.get(keys.step_field(c, "task"))
            )
            return Claim(outcome=ClaimOutcome.DONE, detail=status, unclaimed_children=waiting)
        if run_status != "running":
            return Claim(outcome=ClaimOutcome.INACTIVE, detail=run_status)
        deadline = fields.get("deadline")
        if deadline and now > float(deadline):
            return Claim(outcome=ClaimOutcome.INACTIVE, detail="deadline")
        if status == "pending":
            return Claim(outcome=ClaimOutcome.BUSY)
        owner = fields.get(p + "task")
        if status == "queued" and owner and owner != attempt.task_id:
            return Claim(outcome=ClaimOutcome.SUPERSEDED)
        # A running step is never started twice: the sweeper re-queues it once its lease has expired.
        if status == "running":
            return Claim(outcome=ClaimOutcome.BUSY, detail="own" if owner == attempt.task_id else "")

        number = int(fields.get(p + "attempts") or 0) + 1
        started = _stamp(now)
        fields.update(
            {
                p + "status": "running",
                p + "task": attempt.task_id,
                p + "lease": _stamp(now + lease_s),
                p + "attempts": str(number),
                p + "attempt_started_at": started,
            }
        )
        if number == 1 or p + "started_at" not in fields:
            fields[p + "started_at"] = started
        self._emit(run, started, "step_started", attempt.step, attempt=number)
        outputs = {u: fields.get(keys.step_field(u, "output"), "") for u in upstream}
        return Claim(
            outcome=ClaimOutcome.OK,
            attempt=number,
            generation_attempt=number - int(fields.get(p + "attempt_base") or 0),
            now=float(started),
            cache_key=fields.get(p + "cache_key", ""),
            force=fields.get(p + "force") == "1",
            queued_at=_float_or_none(fields.get(p + "queued_at") or fields.get("created_at") or ""),
            errors=_json_list(fields.get(p + "errors")),
            inputs=json.loads(fields.get("inputs") or "{}"),
            parent_status={u: fields.get(keys.step_field(u, "status"), "") for u in upstream},
            parent_output={u: json.loads(raw) if raw else None for u, raw in outputs.items()},
        )

    def finish(
        self,
        attempt: Attempt,
        outcome: StepOutcome,
        *,
        output: Any = None,
        error: ErrorRecord | None = None,
        children: tuple[str, ...] = (),
        cache_key: str = "",
        cached: bool = False,
        grace_s: float = 300.0,
        rules: ReleaseRules | None = None,
        keep: KeepRequest | None = None,
        owed: OwedWrites | None = None,
        then: Sequence[OwedWrite] = (),
    ) -> FinishResult:
        """Record a final outcome and release the children it decides (see ``lua/finish.lua``).

        A success stores ``output`` (``None`` keeps the stored output: a cached result) and ``cache_key``; any other
        outcome replaces the output, so a failure is never served as a cached result. With ``keep``, the first
        ``keep.most`` released candidates are claimed under the same lock, as :meth:`claim` would claim them. What the
        attempt ``owed`` a Redis is sent on its own first: this store has no round trip to share, nor sends ``then``.
        """
        if owed is not None:
            owed.flush()
        p = keys.step_prefix(attempt.step)
        raw_output = "" if output is None else json.dumps(output, separators=_COMPACT)
        raw_error = "" if error is None else json.dumps(error, separators=_COMPACT)
        with self._lock:
            now = self._clock()
            self._leases.pop(keys.lease_member(attempt.run_id, attempt.step, attempt.task_id), None)
            run = self._live(attempt.run_id, now)
            if run is None or not self._owns(run.fields, attempt):
                return FinishResult(recorded=False)
            fields = run.fields
            stamp = _stamp(now)
            fields.update(
                {
                    p + "status": outcome.value,
                    p + "finished_at": stamp,
                    p + "lease": "",
                    p + "cache_key": cache_key,
                    p + "cached": "1" if cached else "",
                    p + "force": "",
                }
            )
            if outcome != StepOutcome.SUCCEEDED or raw_output != "":
                fields[p + "output"] = raw_output
            if raw_error:
                errors = [*_json_list(fields.get(p + "errors")), json.loads(raw_error)]
                fields.update({p + "error": raw_error, p + "errors": json.dumps(errors, separators=_COMPACT)})
            number = int(fields.get(p + "attempts") or 0)
            detail = raw_error
            if outcome == StepOutcome.SUCCEEDED:
                detail = '{"cached":true}' if cached else success_detail(output) or raw_error
            self._emit(run, stamp, f"step_{outcome.value}", attempt.step, attempt=number, data=detail)
            if outcome in (StepOutcome.FAILED, StepOutcome.UPSTREAM_FAILED):
                _increment(fields, "failures", 1)
                if outcome == StepOutcome.FAILED:
                    fields.setdefault("first_failure", attempt.step)
                    fields.setdefault("failure", failure_line(attempt.step, outcome, error))
                    failed = [*_json_list(fields.get("failed_steps")), attempt.step]
                    fields["failed_steps"] = json.dumps(failed, separators=_COMPACT)
                if not children:
                    _increment(fields, "leaf_failures", 1)

            released, cancelled = self._release(run, stamp, outcome.value, children, rules or ReleaseRules())
            run_status, parent_run = None, None
            if _increment(fields, "remaining", -1) == 0:
                run_status, parent_run = self._end_run(run, attempt, stamp, now)
            chosen = {c.step: c.task_id for c in keep.candidates if c.task_id} if keep is not None else {}
            task_ids = {child: chosen.get(child) or new_id() for child in released}
            for child, task_id in task_ids.items():
                self._leases[keys.lease_member(attempt.run_id, child, task_id)] = now + grace_s
            for step, task_id in cancelled:
                self._leases.pop(keys.lease_member(attempt.run_id, step, task_id), None)
            claims = self._keep(attempt, keep if run_status is None else None, released, task_ids, now)
            return FinishResult(
                recorded=True,
                run_status=run_status,
                released=tuple(released),
                task_ids=task_ids,
                cancelled=tuple(cancelled),
                kept_claims=claims,
                parent_run=parent_run,
            )

    def _end_run(self, run: _Run, attempt: Attempt, stamp: str, now: float) -> tuple[str, str | None]:
        """End the run whose last step ``attempt`` finished, under the lock: its status and event, its compaction,
        its deadline dropped and its end announced (``lua/finish.lua``). Returns its status and its parent run."""
        fields = run.fields
        status = "failed" if int(fields.get("leaf_failures") or 0) > 0 else "succeeded"
        fields.update({"status": status, "finished_at": stamp})
        data = ""
        if status == "failed":
            data = run_failed_data(fields.get("failure"), _json_list(fields.get("failed_steps")))
        self._emit(run, stamp, f"run_{status}", data=data)
        parent_run = fields.get("parent_run") or None
        announced = {"run_id": attempt.run_id, "type": f"run_{status}", "workflow": fields["workflow"]}
        self._ended(run, now)
        self._deadlines.pop(keys.deadline_member(attempt.run_id, attempt.generation), None)
        self._announcements.append(announced)
        return status, parent_run

    def _keep(
        self, parent: Attempt, keep: KeepRequest | None, released: list[str], task_ids: dict[str, str], now: float
    ) -> dict[str, Claim]:
        """The claims of the children a finish keeps for its worker (``claim_step`` in ``lua/finish.lua``), in
        release order, under the lock."""
        if keep is None:
            return {}
        candidates = {c.step: c for c in keep.candidates}
        claims: dict[str, Claim] = {}
        for kept in [child for child in released if child in candidates][: max(1, keep.most)]:
            member = keys.lease_member(parent.run_id, kept, task_ids[kept])
            self._leases[member] = now + keep.lease_s
            child = Attempt(parent.run_id, kept, parent.generation, task_ids[kept])
            claims[kept] = self._claim(child, keep.lease_s, candidates[kept].upstream, candidates[kept].children)
            if claims[kept].outcome != ClaimOutcome.OK:
                self._leases.pop(member, None)
        return claims

    def _release(
        self, run: _Run, stamp: str, outcome: str, children: tuple[str, ...], rules: ReleaseRules
    ) -> tuple[list[str], list[tuple[str, str]]]:
        """The release and cancel part of ``lua/finish.lua``, under the lock: (released, cancelled (step, task))."""
        fields = run.fields
        released: list[str] = []
        cancelled: list[tuple[str, str]] = []

        def release(child: str, on: tuple[str, ...], what: str) -> bool:
            c = keys.step_prefix(child)
            left = _increment(fields, c + "pending", -1)
            if (left == 0 or what in on) and fields.get(c + "status") == "pending":
                fields.update({c + "status": "queued", c + "queued_at": stamp})
                self._emit(run, stamp, "step_queued", child)
                released.append(child)
                return True
            return False

        for child in children:
            fired = release(child, rules.early.get(child, ()), outcome)
            if not fired or child not in rules.cancel or fields.get(keys.step_field(child, "pending")) == "0":
                continue
            for parent in rules.cancel[child]:
                q = keys.step_prefix(parent)
                status = fields.get(q + "status")
                if status not in _STOPPABLE_STEP:
                    continue
                fields.update({q + "status": "cancelled", q + "finished_at": stamp, q + "lease": ""})
                data = json.dumps({"reason": f"step {child} fired first"}, separators=_COMPACT)
                self._emit(run, stamp, "step_cancelled", parent, data=data)
                _increment(fields, "remaining", -1)
                task = fields.get(q + "task", "") if status in ("running", "queued") else ""
                cancelled.append((parent, task))
                for grandchild, on in rules.after.get(parent, ()):
                    release(grandchild, on, "cancelled")
        return released, cancelled

    def hold_dispatch(self, run_id: str, task_ids: dict[str, str], grace_s: float) -> None:
        """Cover steps about to be published in the lease index, so the sweeper resends a message that is lost."""
        with self._lock:
            due = self._clock() + grace_s
            for step, task_id in task_ids.items():
                self._leases[keys.lease_member(run_id, step, task_id)] = due

    def retry(self, attempt: Attempt, error: ErrorRecord, *, countdown_s: float, grace_s: float) -> bool:
        """Record a retryable error and put the step back to ``queued`` for ``countdown_s`` (see ``lua/retry.lua``).

        The attempt stays in the lease index, re-scored to its new lease of ``countdown_s + grace_s``.

        Returns:
            ``False`` when the attempt is stale; nothing changed then (the lease index neither).
        """
        p = keys.step_prefix(attempt.step)
        raw = json.dumps(error)

        def record(fields: dict[str, str], now: float) -> tuple[int, str]:
            errors = [*_json_list(fields.get(p + "errors")), json.loads(raw)]
            fields.update({p + "error": raw, p + "errors": json.dumps(errors, separators=_COMPACT)})
            # As retry.lua: the error's JSON as it was given, the countdown as redis-py sends a float.
            return int(fields.get(p + "attempts") or 0), '{"error":' + raw

        return self._requeue(attempt, "step_retry", record, countdown_s=countdown_s, grace_s=grace_s)

    def defer(self, attempt: Attempt, deferral: DeferralRecord, *, countdown_s: float, grace_s: float) -> bool:
        """Put a running step back to ``queued`` for ``countdown_s`` without counting the attempt (as ``defer.lua``)."""
        p = keys.step_prefix(attempt.step)
        raw = json.dumps(deferral)

        def record(fields: dict[str, str], now: float) -> tuple[int, str]:
            attempts = int(fields.get(p + "attempts") or 1) - 1
            fields.update(
                {
                    p + "attempts": str(attempts),
                    p + "deferred_until": _stamp(now + countdown_s),
                    p + "deferral": raw,
                    p + "deferrals": str(int(fields.get(p + "deferrals") or 0) + 1),
                }
            )
            return attempts + 1, '{"deferral":' + raw

        return self._requeue(attempt, "step_deferred", record, countdown_s=countdown_s, grace_s=grace_s)

    def _requeue(
        self,
        attempt: Attempt,
        event: str,
        record: Callable[[dict[str, str], float], tuple[int, str]],
        *,
        countdown_s: float,
        grace_s: float,
    ) -> bool:
        """Put an owned running step back to ``queued`` for ``countdown_s``, keeping a lease of countdown + grace.

        ``record`` writes what is particular to the transition and returns the attempt number and the event's data
        up to its countdown.
        """
        p = keys.step_prefix(attempt.step)
        with self._lock:
            now = self._clock()
            run = self._live(attempt.run_id, now)
            if run is None or not self._owns(run.fields, attempt):
                return False
            lease = _stamp(now + countdown_s + grace_s)
            stamp = _stamp(now)
            run.fields.update({p + "status": "queued", p + "lease": lease, p + "queued_at": stamp})
            number, head = record(run.fields, now)
            detail = head + ',"countdown_s":' + repr(float(countdown_s)) + "}"
            self._emit(run, stamp, event, attempt.step, attempt=number, data=detail)
            self._leases[keys.lease_member(attempt.run_id, attempt.step, attempt.task_id)] = float(lease)
            return True

    def renew(self, leases: dict[str, list[tuple[str, str]]], lease_s: float) -> list[tuple[str, str, str, bool]]:
        """Extend the leases of running attempts, grouped by run id; returns each with whether it is still ours."""
        leases, items = split_item_leases(leases)
        if items:
            self.renew_items(items, lease_s)
        out: list[tuple[str, str, str, bool]] = []
        with self._lock:
            now = self._clock()
            until = float(_stamp(now)) + lease_s
            for run_id, pairs in leases.items():
                run = self._live(run_id, now)
                fields = run.fields if run is not None else {}
                for step, task_id in pairs:
                    p = keys.step_prefix(step)
                    ours = (
                        fields.get("status") == "running"
                        and fields.get(p + "status") == "running"
                        and fields.get(p + "task") == task_id
                    )
                    if ours:
                        fields[p + "lease"] = _stamp(now + lease_s)
                        member = keys.lease_member(run_id, step, task_id)
                        # Only re-scores an indexed attempt (ZADD XX): renewing never adds one.
                        if member in self._leases:
                            self._leases[member] = until
                    out.append((run_id, step, task_id, ours))
        return out

    def expired_leases(self, limit: int = 500, buckets: Sequence[str | None] | None = None) -> list[str]:
        """Lease index members whose lease ran out, oldest first."""
        with self._lock:
            return _due(self._leases, self._clock(), limit)

    def reclaim(
        self,
        member: str,
        new_task_id: str,
        error: ErrorRecord,
        *,
        grace_s: float,
        backlog_wait_s: float = 0.0,
        owner_dead: bool = False,
    ) -> ReclaimedStep | None:
        """Recover the step behind an expired lease (see ``lua/reclaim.lua``).

        A ``running`` step is re-queued under ``new_task_id`` with ``error`` appended; a ``queued`` one is sent again
        under its own task id. Either way it gets a lease of ``grace_s`` and is indexed under the task id to publish
        with. A lease that is live stays in the index, re-scored to that lease; anything else leaves the index.

        Returns:
            What to publish, or ``None`` when there is nothing to do.
        """
        run_id, step, task_id = keys.parse_lease_member(member)
        p = keys.step_prefix(step)
        with self._lock:
            now = self._clock()
            run = self._live(run_id, now)
            fields = run.fields if run is not None else {}
            status = fields.get(p + "status")
            unclaimed = status == "queued" and not fields.get(p + "task")
            if (
                run is None
                or fields.get("status") != "running"
                or (fields.get(p + "task") != task_id and not unclaimed)
                or status not in ("running", "queued")
            ):
                self._leases.pop(member, None)
                return None
            raw_lease = fields.get(p + "lease") or ""
            lease = _float_or_none(raw_lease)
            if lease is not None and lease > now and not (owner_dead and status == "running"):
                self._leases[member] = float(raw_lease)
                return None
            if status == "running" and map_unfinished(fields, step):
                # A map step's own lease watches for a lost finish: extended while items are unfinished.
                held = _stamp(now + grace_s)
                fields[p + "lease"] = held
                self._leases[member] = float(held)
                return None
            since = _float_or_none(fields.get(p + "queued_at") or fields.get("created_at") or "")
            if unclaimed and backlog_wait_s > 0 and now - (now if since is None else since) < backlog_wait_s:
                held = _stamp(now + grace_s)
                fields[p + "lease"] = held
                self._leases[member] = float(held)
                return None
            until = _stamp(now + grace_s)
            stamp = _stamp(now)
            publish = task_id
            if status == "queued":
                resends = _increment(fields, p + "resends", 1)
                until = _stamp(now + grace_s * min(2 ** (resends - 1), MAX_RESEND_BACKOFF))
                fields[p + "lease"] = until
                self._emit(run, stamp, "step_queued", step, data='{"resent":true}')
            else:
                publish = new_task_id
                raw = json.dumps(error)
                errors = [*_json_list(fields.get(p + "errors")), json.loads(raw)]
                fields.update(
                    {
                        p + "status": "queued",
                        p + "task": new_task_id,
                        p + "lease": until,
                        p + "queued_at": stamp,
                        p + "error": raw,
                        p + "errors": json.dumps(errors, separators=_COMPACT),
                    }
                )
                self._emit(run, stamp, "step_lost", step, data=raw)
                self._emit(run, stamp, "step_queued", step)
            self._leases.pop(member, None)
            self._leases[keys.lease_member(run_id, step, publish)] = float(until)
            return ReclaimedStep(
                run_id=run_id,
                step=step,
                definition_hash=fields.get("def_hash", ""),
                generation=fields.get("gen", ""),
                task_id=publish,
            )
