"""The in-memory store's state and what every transition shares: runs, definitions, events, the sweeper lock.

The transitions themselves are mixins over :class:`MemoryStateCore` (``steps.py``, ``control.py``); the package joins
them into :class:`~orchestrator.state.memory.MemoryStateStore`.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from orchestrator.definition.spec import WorkflowSpec
from orchestrator.domain import Attempt
from orchestrator.engine.events import Event
from orchestrator.errors import DefinitionNotFoundError, RunNotFoundError
from orchestrator.state import keys
from orchestrator.state.base import (
    MAX_SUBMITTED_DEFINITIONS,
    SUMMARY_FIELDS,
    compact_ended,
    needs_failure_error,
    run_failed_data,
    submitted_record,
)

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
    # Each map step's items (``keys.items_key``), fields ``INDEX:FIELD`` as in Redis; they expire with the run.
    items: dict[str, dict[str, str]] = field(default_factory=dict)
    # Hashes beside the run's own (agent journals, notes), by key; they expire with the run.
    side: dict[str, dict[str, str]] = field(default_factory=dict)


class MemoryStateCore:
    """The state of a :class:`~orchestrator.state.memory.MemoryStateStore` and its non-transition operations.

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
        # Definition hash -> (last submitted, name, version, first submitted), least recently submitted first.
        self._submitted: dict[str, tuple[float, str, int, float]] = {}
        self._idempotency: dict[str, tuple[str, float]] = {}
        self._leases: dict[str, float] = {}
        self._owners: dict[str, float] = {}
        self._owned: dict[str, set[str]] = {}
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
            now = self._clock()
            first = self._submitted.pop(spec.definition_hash, (0.0, spec.name, spec.version, now))[3]
            self._submitted[spec.definition_hash] = (now, spec.name, spec.version, first)
            while len(self._submitted) > MAX_SUBMITTED_DEFINITIONS:
                del self._submitted[next(iter(self._submitted))]

    def submitted_definitions(self) -> list[dict[str, Any]]:
        """Definitions submitted lately, most recent first (they never expire here, as definitions do not)."""
        with self._lock:
            entries = list(self._submitted.items())
        return [
            submitted_record(h, last, {"name": name, "version": version, "first_submitted": first})
            for h, (last, name, version, first) in reversed(entries)
        ]

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
        starting = set(spec.start_steps)
        for step in spec.steps:
            parents = graph.parents[step.name]
            fields[keys.step_field(step.name, "status")] = "queued" if step.name in starting else "pending"
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
            rows = [{name: run.fields.get(name, "") for name in SUMMARY_FIELDS} for run in runs]
            for run, row in zip(runs, rows, strict=True):
                if needs_failure_error(row):
                    row["failure_error"] = run.fields.get(keys.step_field(row["first_failure"], "error"), "")
            return rows

    def run_parent(self, run_id: str) -> str | None:
        """The run's ``parent_run``, if it is a child run still kept."""
        with self._lock:
            run = self._live(run_id, self._clock())
            return (run.fields.get("parent_run") or None) if run is not None else None

    def list_run_ids(self, limit: int = 100, offset: int = 0) -> list[str]:
        """The newest run ids first (like Redis's index, it may name runs whose retention expired)."""
        with self._lock:
            ordered = sorted(self._run_index.items(), key=lambda item: (item[1], item[0]), reverse=True)
        ids = [run_id for run_id, _ in ordered]
        # ZREVRANGE offset offset+limit-1, negative indices counting from the end, as in RedisStateStore.
        start, stop = offset, offset + limit - 1
        start, stop = (start + len(ids) if start < 0 else start), (stop + len(ids) if stop < 0 else stop)
        return ids[max(start, 0) : stop + 1] if stop >= 0 else []

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
            self._emit(run, stamp, "run_failed", data=run_failed_data(message, [], reason=message))
            run.fields.update(
                {"status": "failed", "finished_at": stamp, "error": message, "first_failure": "(dispatch)"}
            )
            self._ended(run, now)
            self._deadlines.pop(keys.deadline_member(run_id, run.fields.get("gen", "")), None)

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

    def _ended(self, run: _Run, now: float) -> None:
        """A run ended: keep it for the retention from ``now``, without what no reader needs (``lua/_ended.lua``)."""
        compact_ended(run.fields)
        run.expires_at = now + self.retention_s

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
