"""The in-memory state store: the Lua transitions of ``RedisStateStore`` as Python under one lock.

For tests and single-process use. A run is the same flat field map as the Redis hash (``s:STEP:FIELD``), so
``orchestrator.engine.status.run_view`` reads it unchanged; every transition mirrors its script in ``lua/`` rule for
rule, down to the progress events it emits (``lua/_events.lua``): same types, order, step, attempt and data, numbered
by the run's ``seq`` field. Time comes from an injectable clock, so tests move it instead of sleeping.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from orchestrator.definition.spec import WorkflowSpec
from orchestrator.domain import (
    MAX_AUDIT_ENTRIES,
    Attempt,
    Claim,
    ClaimOutcome,
    Decision,
    DecisionOutcome,
    DecisionResult,
    FinishResult,
    ReclaimedStep,
    ResumeOutcome,
    ResumePlan,
    ResumeResult,
    RunStatus,
    StepOutcome,
    StopOutcome,
    StopResult,
)
from orchestrator.engine.events import Event
from orchestrator.errors import DeferralRecord, DefinitionNotFoundError, ErrorRecord, RunNotFoundError
from orchestrator.state import keys
from orchestrator.state.base import SUMMARY_FIELDS, success_detail

_UNFINISHED = ("queued", "running", "pending")
# Run statuses stop.lua may end; step statuses it cancels.
_STOPPABLE_RUN = ("running", "waiting", "pending")
_STOPPABLE_STEP = ("pending", "queued", "running", "waiting")
_COMPACT = (",", ":")
# A step sent again while still waiting gets grace_s times 1, 2, 4, then 8 before the next resend (``reclaim.lua``).
MAX_RESEND_BACKOFF = 8
# A run's events are capped like ``XADD ... MAXLEN ~ 10000`` (exactly here; Redis trims whole nodes, so a little later).
EVENTS_MAXLEN = 10_000
# The global stream of run-level events (``RedisStateStore.announce``).
GLOBAL_EVENTS_MAXLEN = 100_000


def _stamp(epoch: float) -> str:
    """Epoch seconds as the scripts write them (``%.6f``)."""
    return f"{epoch:.6f}"


def _json_list(raw: str | None) -> list[Any]:
    return list(json.loads(raw)) if raw else []


# One stream entry: its sequence number and its fields, as ``XADD`` stores them (decoded on every read).
_Entry = tuple[int, dict[str, str]]


def _new_stream() -> deque[_Entry]:
    return deque(maxlen=EVENTS_MAXLEN)


@dataclass
class _Run:
    fields: dict[str, str]
    expires_at: float
    # The run's event stream; it expires with the run, as in Redis.
    events: deque[_Entry] = field(default_factory=_new_stream)


class MemoryStateStore:
    """Run and step state in this process, with the semantics of :class:`~orchestrator.state.RedisStateStore`.

    Args:
        retention_s: How long a finished run is kept.
        clock: Epoch seconds now; the stand-in for Redis's ``TIME`` (inject a fake one to move time in tests).
    """

    def __init__(self, *, retention_s: int = 7 * 24 * 3600, clock: Callable[[], float] = time.time) -> None:
        self.retention_s = retention_s
        # As in Redis: a run can outlive its retention while still running, so it is kept 4x as long.
        self.active_ttl_s = retention_s * 4
        self._clock = clock
        self._lock = threading.Lock()
        # Every event emitted notifies it: ``wait_events`` sleeps on it (the stand-in for ``XREAD BLOCK``).
        self._changed = threading.Condition(self._lock)
        self._waiting = 0
        self._announcements: deque[dict[str, str]] = deque(maxlen=GLOBAL_EVENTS_MAXLEN)
        self._runs: dict[str, _Run] = {}
        self._run_index: dict[str, float] = {}
        self._definitions: dict[str, WorkflowSpec] = {}
        self._idempotency: dict[str, tuple[str, float]] = {}
        self._leases: dict[str, float] = {}
        self._deadlines: dict[str, float] = {}
        self._approvals: dict[str, float] = {}
        self._sweeper_lock: tuple[str, float] | None = None

    def ping(self) -> None:
        """Always answers: the store is this process."""

    # -- definitions -------------------------------------------------------------------------------------------

    def save_definition(self, spec: WorkflowSpec) -> None:
        """Store a workflow definition by its hash."""
        with self._lock:
            self._definitions[spec.definition_hash] = spec

    def load_definition(self, definition_hash: str) -> WorkflowSpec:
        """The definition stored under ``definition_hash``.

        Definitions never expire here: ``RedisStateStore`` caches every definition it saw for the life of its
        process, and this store's life is its process.

        Raises:
            DefinitionNotFoundError: When it was never saved.
        """
        with self._lock:
            spec = self._definitions.get(definition_hash)
        if spec is None:
            raise DefinitionNotFoundError(definition_hash)
        return spec

    # -- runs ----------------------------------------------------------------------------------------------------

    def reserve_idempotency_key(self, key: str, run_id: str) -> str:
        """Bind ``key`` to ``run_id`` unless it is bound already; returns the run id it is bound to."""
        with self._lock:
            now = self._clock()
            bound = self._idempotency.get(key)
            if bound is not None and bound[1] > now:
                return bound[0]
            self._idempotency[key] = (run_id, now + self.active_ttl_s)
            return run_id

    def release_idempotency_key(self, key: str, run_id: str) -> None:
        """Forget ``key`` if it still points at ``run_id`` (a creation that failed half way)."""
        with self._lock:
            bound = self._idempotency.get(key)
            if bound is not None and bound[0] == run_id:
                del self._idempotency[key]

    def create_run(self, run_id: str, spec: WorkflowSpec, inputs: dict[str, Any], idempotency_key: str | None) -> bool:
        """Create the run with every step ``pending`` (roots ``queued``), as ``lua/create.lua`` does.

        Returns:
            ``False`` when a run with this id exists already.
        """
        graph = spec.graph
        fields: dict[str, str] = {
            "run_id": run_id,
            "workflow": spec.name,
            "version": str(spec.version),
            "def_hash": spec.definition_hash,
            "status": "running",
            "gen": "1",
            "inputs": json.dumps(inputs, separators=_COMPACT),
            "remaining": str(len(spec.steps)),
            "total": str(len(spec.steps)),
            "failures": "0",
            "idempotency_key": idempotency_key or "",
            "timeout_s": "" if spec.timeout_s is None else repr(spec.timeout_s),
        }
        for step in spec.steps:
            parents = graph.parents[step.name]
            fields[keys.step_field(step.name, "status")] = "pending" if parents else "queued"
            fields[keys.step_field(step.name, "pending")] = str(len(parents))
            fields[keys.step_field(step.name, "attempts")] = "0"
        with self._lock:
            now = self._clock()
            if self._live(run_id, now) is not None:
                return False
            created = _stamp(now)
            run = _Run({"created_at": created, "started_at": created, **fields}, now + self.active_ttl_s)
            self._runs[run_id] = run
            score = float(created)
            if spec.timeout_s is not None:
                run.fields["deadline"] = _stamp(score + spec.timeout_s)
                self._deadlines[keys.deadline_member(run_id, "1")] = score + spec.timeout_s
            self._emit(run, created, "run_started")
            for step in spec.steps:
                if fields[keys.step_field(step.name, "status")] == "queued":
                    self._emit(run, created, "step_queued", step.name)
            self._run_index[run_id] = score
            for old in [r for r, s in self._run_index.items() if s <= score - self.active_ttl_s]:
                del self._run_index[old]
            return True

    def run_fields(self, run_id: str) -> dict[str, str]:
        """Every field of the run.

        Raises:
            RunNotFoundError: When the run does not exist (or expired).
        """
        with self._lock:
            run = self._live(run_id, self._clock())
            if run is None:
                raise RunNotFoundError(run_id)
            return dict(run.fields)

    def run_summaries(self, run_ids: list[str]) -> list[dict[str, str]]:
        """A few fields of each run still kept, in order."""
        with self._lock:
            now = self._clock()
            runs = [run for run in (self._live(run_id, now) for run_id in run_ids) if run is not None]
            return [{name: run.fields.get(name, "") for name in SUMMARY_FIELDS} for run in runs]

    def list_run_ids(self, limit: int = 100) -> list[str]:
        """The newest run ids first (like Redis's index, it may name runs whose retention expired)."""
        with self._lock:
            ordered = sorted(self._run_index.items(), key=lambda item: (item[1], item[0]), reverse=True)
        ids = [run_id for run_id, _ in ordered]
        # ZREVRANGE 0 limit-1: a limit below 1 counts from the end, as in RedisStateStore.
        return ids[:limit] if limit > 0 else ids[: len(ids) + limit]

    def mark_dispatch_failed(self, run_id: str, message: str) -> None:
        """Fail a run whose first tasks could not be published, with its ``run_failed`` event (``fail_dispatch.lua``).

        A run that is missing or has ended already is left as it is.
        """
        with self._lock:
            now = self._clock()
            run = self._live(run_id, now)
            if run is None or run.fields.get("status") not in _STOPPABLE_RUN:
                return
            stamp = _stamp(now)
            self._emit(run, stamp, "run_failed", data=json.dumps({"reason": message}, separators=_COMPACT))
            run.fields.update(
                {"status": "failed", "finished_at": stamp, "error": message, "first_failure": "(dispatch)"}
            )
            run.expires_at = now + self.retention_s
            self._deadlines.pop(keys.deadline_member(run_id, run.fields.get("gen", "")), None)

    # -- step transitions ----------------------------------------------------------------------------------------

    def claim(self, attempt: Attempt, *, lease_s: float, upstream: tuple[str, ...], children: tuple[str, ...]) -> Claim:
        """Start an attempt of a step if this message may run it (see ``lua/claim.lua``).

        As in Redis, the attempt enters the lease index (at the clock plus ``lease_s``) before the claim, and leaves
        it again when the claim is anything but ``ok``.
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
    ) -> FinishResult:
        """Record a final outcome and release the children whose last parent this was (see ``lua/finish.lua``).

        A success stores ``output`` (``None`` keeps the stored output: a cached result) and ``cache_key``; any other
        outcome replaces the output, so a failure is never served as a cached result.
        """
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

            released: list[str] = []
            for child in children:
                c = keys.step_prefix(child)
                if _increment(fields, c + "pending", -1) == 0:
                    fields.update({c + "status": "queued", c + "queued_at": stamp})
                    self._emit(run, stamp, "step_queued", child)
                    released.append(child)

            run_status: str | None = None
            if _increment(fields, "remaining", -1) == 0:
                run_status = "failed" if int(fields.get("failures") or 0) > 0 else "succeeded"
                fields.update({"status": run_status, "finished_at": stamp})
                self._emit(run, stamp, f"run_{run_status}")
                run.expires_at = now + self.retention_s
                self._deadlines.pop(keys.deadline_member(attempt.run_id, attempt.generation), None)
            task_ids = {child: uuid.uuid4().hex for child in released}
            for child, task_id in task_ids.items():
                self._leases[keys.lease_member(attempt.run_id, child, task_id)] = now + grace_s
            return FinishResult(recorded=True, run_status=run_status, released=tuple(released), task_ids=task_ids)

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

    def expired_leases(self, limit: int = 500) -> list[str]:
        """Lease index members whose lease ran out, oldest first."""
        with self._lock:
            return _due(self._leases, self._clock(), limit)

    def reclaim(
        self, member: str, new_task_id: str, error: ErrorRecord, *, grace_s: float, backlog_wait_s: float = 0.0
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
            if lease is not None and lease > now:
                self._leases[member] = float(raw_lease)
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
            run.expires_at = now + self.retention_s
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
            fields.update({"status": "running", "gen": generation, "remaining": str(len(plan.resets)), "failures": "0"})
            if plan.definition is not None:
                self._definitions[plan.definition.definition_hash] = plan.definition
                fields["def_hash"] = plan.definition.definition_hash
            for name in ("finished_at", "stopped_at", "error", "first_failure", "deadline"):
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

    def due_deadlines(self, limit: int = 500) -> list[tuple[str, str]]:
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
                audit = _json_list(fields.get(p + "audit"))
                audit.append(
                    {
                        "at": stamp,
                        "by": decision.by,
                        "decision": decision.decision,
                        "comment": decision.comment,
                        "outcome": outcome,
                    }
                )
                while len(audit) > MAX_AUDIT_ENTRIES:
                    oldest = next((i for i, entry in enumerate(audit) if entry["outcome"] != "accepted"), 0)
                    del audit[oldest]
                fields[p + "audit"] = json.dumps(audit, separators=_COMPACT)
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

    def due_approvals(self, limit: int = 500) -> list[tuple[str, str, str]]:
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

    # -- events ------------------------------------------------------------------------------------------------------

    def events(self, run_id: str, after: int = 0, count: int | None = None) -> list[Event]:
        """The run's events with ``seq > after``, in order (at most ``count``; none once the run has expired).

        Raises:
            ValueError: When ``count`` is given but not positive (redis-py refuses it too).
        """
        if count is not None and count < 1:
            raise ValueError("count must be a positive integer")
        with self._lock:
            return self._events_after(run_id, after, count)

    def wait_events(self, run_id: str, after: int, timeout_s: float) -> list[Event]:
        """Like :meth:`events`, but block up to ``timeout_s`` (real time) until at least one arrives.

        Like ``XREAD BLOCK`` it waits for a run that does not exist (yet) too, and gives ``[]`` when time runs out.
        """
        deadline = time.monotonic() + max(0.001, timeout_s)
        with self._changed:
            self._waiting += 1
            try:
                while not (found := self._events_after(run_id, after, None)):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
                return found
            finally:
                self._waiting -= 1

    def waiting_readers(self) -> int:
        """How many :meth:`wait_events` calls are blocked right now (tests wait for a reader to block)."""
        with self._lock:
            return self._waiting

    def announce(self, run_id: str, event_type: str, workflow: str) -> None:
        """Append a run-level event to the global list dashboards follow (the newest 100,000 are kept)."""
        with self._lock:
            self._announcements.append({"run_id": run_id, "type": event_type, "workflow": workflow})

    def announcements(self) -> list[dict[str, str]]:
        """The global list's entries, oldest first (what ``XRANGE orch:events - +`` holds in Redis)."""
        with self._lock:
            return [dict(entry) for entry in self._announcements]

    def _events_after(self, run_id: str, after: int, count: int | None) -> list[Event]:
        """``XRANGE events (after + COUNT count``, under the lock."""
        run = self._live(run_id, self._clock())
        if run is None or not run.events:
            return []
        # Numbers are gapless and trimming drops the oldest, so ``seq`` finds its entry by position.
        start = max(0, after + 1 - run.events[0][0])
        stop = len(run.events) if count is None else min(len(run.events), start + count)
        return [Event.from_stream(run_id, f"0-{seq}", dict(fields)) for seq, fields in islice(run.events, start, stop)]

    def _emit(
        self, run: _Run, stamp: str, event_type: str, step: str = "", *, attempt: int = 0, data: str = ""
    ) -> None:
        """``emit`` of ``lua/_events.lua``: the run's next ``seq``, appended to its stream; wakes every waiting reader.

        The caller holds the lock.
        """
        seq = int(run.fields.get("seq") or 0) + 1
        run.fields["seq"] = str(seq)
        run.events.append(
            (seq, {"type": event_type, "step": step, "attempt": str(attempt), "ts": stamp, "data": data}),
        )
        self._changed.notify_all()

    # -- sweeper -------------------------------------------------------------------------------------------------

    def try_sweeper_lock(self, owner: str, ttl_s: float) -> bool:
        """Take the sweeper turn for ``ttl_s`` (whole milliseconds, at least one, as in Redis)."""
        with self._lock:
            now = self._clock()
            if self._sweeper_lock is not None and self._sweeper_lock[1] > now:
                return False
            self._sweeper_lock = (owner, now + max(1, int(ttl_s * 1000)) / 1000)
            return True

    # -- helpers -------------------------------------------------------------------------------------------------

    def _live(self, run_id: str, now: float) -> _Run | None:
        """The run, or ``None`` when it never existed or its time ran out (then it is dropped, as Redis would)."""
        run = self._runs.get(run_id)
        if run is not None and run.expires_at <= now:
            del self._runs[run_id]
            return None
        return run

    @staticmethod
    def _owns(fields: dict[str, str], attempt: Attempt) -> bool:
        """Whether ``attempt`` is the step's current running attempt: the guard of finish and retry."""
        p = keys.step_prefix(attempt.step)
        return (
            fields.get("gen") == attempt.generation
            and fields.get(p + "status") == "running"
            and fields.get(p + "task") == attempt.task_id
        )


def _increment(fields: dict[str, str], name: str, by: int) -> int:
    """HINCRBY on a field map."""
    value = int(fields.get(name) or 0) + by
    fields[name] = str(value)
    return value


def _due(index: dict[str, float], now: float, limit: int) -> list[str]:
    """ZRANGEBYSCORE -inf now LIMIT 0 limit: members due by ``now``, by score then name (a negative limit: all)."""
    members = [member for until, member in sorted((until, m) for m, until in index.items() if until <= now)]
    return members[:limit] if limit >= 0 else members


def _float_or_none(raw: str) -> float | None:
    """Lua's ``tonumber``: ``None`` for text that is no number."""
    try:
        return float(raw)
    except ValueError:
        return None
