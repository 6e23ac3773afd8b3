"""The Redis state store: every transition is one Lua script on the run's own hash."""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
from collections.abc import Callable
from importlib import resources
from typing import Any, cast

import redis
from redis.client import Pipeline
from redis.commands.core import Script

from orchestrator.definition.spec import WorkflowSpec, parse_workflow
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
from orchestrator.errors import (
    DeferralRecord,
    DefinitionNotFoundError,
    ErrorRecord,
    RunNotFoundError,
    StoreUnavailableError,
)
from orchestrator.infra.redis_url import blocking_pool
from orchestrator.state import keys
from orchestrator.state.base import SUMMARY_FIELDS, success_detail

_SCRIPTS = (
    "create",
    "claim",
    "finish",
    "retry",
    "defer",
    "reclaim",
    "renew",
    "stop",
    "resume",
    "wait",
    "decide",
    "fail_dispatch",
)


_WITH_EVENTS = {
    "create",
    "claim",
    "finish",
    "retry",
    "defer",
    "reclaim",
    "stop",
    "resume",
    "wait",
    "decide",
    "fail_dispatch",
}


def _load_lua(name: str) -> str:
    lua = resources.files("orchestrator.state").joinpath("lua")
    body = lua.joinpath(f"{name}.lua").read_text()
    # Scripts cannot include one another: the event helpers are prepended to every script that emits.
    return lua.joinpath("_events.lua").read_text() + body if name in _WITH_EVENTS else body


GLOBAL_EVENTS_MAXLEN = 100_000

MAX_CONNECTIONS = 100
"""Redis connections one store (one worker process) opens at most; more threads than this wait for a free one."""

CONNECTION_WAIT_S = 30.0
"""How long a thread waits for a free connection before the command fails as if Redis did not answer."""


def _event(run_id: str, entry_id: Any, fields: dict[Any, Any]) -> Event:
    return Event.from_stream(run_id, _text(entry_id), {_text(k): _text(v) for k, v in fields.items()})


def _run_keys(run_id: str) -> list[str]:
    return [keys.run_key(run_id), keys.events_key(run_id)]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStateStore:
    """Run and step state in Redis.

    Args:
        client: A redis-py client (``decode_responses`` off or on, either works).
        retention_s: How long a finished run is kept.
        definition_ttl_s: How long a stored workflow definition lives after its last submit.
    """

    def __init__(self, client: redis.Redis, *, retention_s: int = 7 * 24 * 3600, definition_ttl_s: int | None = None):
        self.client = client
        self.retention_s = retention_s
        # A run can outlive its retention while still running (approvals can wait for days): keep it 4x as long.
        self.active_ttl_s = retention_s * 4
        self.definition_ttl_s = definition_ttl_s or self.active_ttl_s
        self._scripts: dict[str, Script] = {name: client.register_script(_load_lua(name)) for name in _SCRIPTS}
        self._definitions: dict[str, WorkflowSpec] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = MAX_CONNECTIONS, **kwargs: Any) -> RedisStateStore:
        """Connect to ``url`` (``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://``, password in the URL).

        The connections are a blocking pool: a thread that finds all ``max_connections`` in use waits for one.
        redis-py's default pool instead fails the command with ``Too many connections`` once 100 are in use: a
        threads worker with ``-c`` above about 100 got that on claims and finishes under load. Through Sentinel, each
        new connection goes to the master the Sentinels name at that moment.

        Raises:
            RedisUrlError: A malformed Sentinel URL.
        """
        pool = blocking_pool(
            url,
            max_connections=max_connections,
            timeout=CONNECTION_WAIT_S,
            socket_connect_timeout=5,
            socket_timeout=30,
            health_check_interval=30,
        )
        return cls(redis.Redis(connection_pool=pool), **kwargs)

    def _evalsha(self, pipe: Pipeline, script: str, run_id: str, argv: list[Any]) -> Any:
        run_keys = _run_keys(run_id)
        if script == "finish":
            run_keys.append(keys.llm_run_cache_key(run_id))
        return pipe.evalsha(self._scripts[script].sha, len(run_keys), *run_keys, *argv)

    def _pipeline(self, *commands: Callable[[Pipeline], Any]) -> list[Any]:
        """Run commands in one round trip, scripts by EVALSHA alone.

        redis-py's own script objects add a SCRIPT EXISTS round trip before every pipeline that holds one; a step
        attempt runs two such pipelines, so that doubled its round trips. Scripts are loaded once when Redis says it
        does not know one (first use, or after a restart or SCRIPT FLUSH); every command here is safe to repeat.
        """
        for tries_left in (1, 0):
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                command(pipe)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                if not tries_left:
                    raise
                for script in self._scripts.values():
                    self.client.script_load(script.script)
        raise AssertionError("unreachable")

    def ping(self) -> None:
        """Check that Redis answers.

        Raises:
            StoreUnavailableError: When it does not.
        """
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise StoreUnavailableError(f"Redis does not answer: {exc}") from exc

    # -- definitions -------------------------------------------------------------------------------------------

    def save_definition(self, spec: WorkflowSpec) -> None:
        """Store a workflow definition by its hash (refreshing its TTL)."""
        body = json.dumps(spec.to_json_dict(), separators=(",", ":"))
        self.client.set(keys.definition_key(spec.definition_hash), body, ex=self.definition_ttl_s)
        with self._lock:
            self._definitions[spec.definition_hash] = spec

    def load_definition(self, definition_hash: str) -> WorkflowSpec:
        """The definition stored under ``definition_hash`` (cached: definitions never change).

        Raises:
            DefinitionNotFoundError: When it expired or never existed.
        """
        with self._lock:
            cached = self._definitions.get(definition_hash)
        if cached is not None:
            return cached
        raw = self.client.get(keys.definition_key(definition_hash))
        if raw is None:
            raise DefinitionNotFoundError(definition_hash)
        spec = parse_workflow(json.loads(raw))
        with self._lock:
            self._definitions[definition_hash] = spec
        return spec

    # -- runs ----------------------------------------------------------------------------------------------------

    def reserve_idempotency_key(self, key: str, run_id: str) -> str:
        """Bind ``key`` to ``run_id`` unless it is bound already; returns the run id it is bound to."""
        name = keys.idempotency_key(key)
        if self.client.set(name, run_id, nx=True, ex=self.active_ttl_s):
            return run_id
        existing = self.client.get(name)
        return _text(existing) if existing is not None else run_id

    def release_idempotency_key(self, key: str, run_id: str) -> None:
        """Forget ``key`` if it still points at ``run_id`` (a creation that failed half way)."""
        name = keys.idempotency_key(key)
        if (existing := self.client.get(name)) is not None and _text(existing) == run_id:
            self.client.delete(name)

    def create_run(self, run_id: str, spec: WorkflowSpec, inputs: dict[str, Any], idempotency_key: str | None) -> bool:
        """Create the run hash with every step ``pending`` (roots ``queued``), and its deadline if it has one.

        Returns:
            ``False`` when a run with this id exists already.
        """
        graph = spec.graph
        fields: dict[str, Any] = {
            "run_id": run_id,
            "workflow": spec.name,
            "version": spec.version,
            "def_hash": spec.definition_hash,
            "status": "running",
            "gen": "1",
            "inputs": json.dumps(inputs, separators=(",", ":")),
            "remaining": len(spec.steps),
            "total": len(spec.steps),
            "failures": 0,
            "idempotency_key": idempotency_key or "",
            "timeout_s": "" if spec.timeout_s is None else spec.timeout_s,
        }
        for step in spec.steps:
            parents = graph.parents[step.name]
            fields[keys.step_field(step.name, "status")] = "pending" if parents else "queued"
            fields[keys.step_field(step.name, "pending")] = len(parents)
            fields[keys.step_field(step.name, "attempts")] = 0
        argv: list[Any] = [self.active_ttl_s]
        for name, value in fields.items():
            argv += [name, value]
        created = self._scripts["create"](keys=_run_keys(run_id), args=argv)
        if created is None:
            return False
        score = float(_text(created))
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(keys.RUNS_INDEX, {run_id: score})
        pipe.zremrangebyscore(keys.RUNS_INDEX, "-inf", score - self.active_ttl_s)
        if spec.timeout_s is not None:
            pipe.zadd(keys.DEADLINES, {keys.deadline_member(run_id, "1"): score + spec.timeout_s})
        pipe.execute()
        return True

    def run_fields(self, run_id: str) -> dict[str, str]:
        """Every field of the run hash, decoded.

        Raises:
            RunNotFoundError: When the run does not exist (or expired).
        """
        raw = self.client.hgetall(keys.run_key(run_id))
        if not raw:
            raise RunNotFoundError(run_id)
        return {_text(k): _text(v) for k, v in raw.items()}

    def run_summaries(self, run_ids: list[str]) -> list[dict[str, str]]:
        """A few fields of each run still kept, in order, one round trip per 500 runs."""
        out: list[dict[str, str]] = []
        for start in range(0, len(run_ids), 500):
            pipe = self.client.pipeline(transaction=False)
            for run_id in run_ids[start : start + 500]:
                pipe.hmget(keys.run_key(run_id), list(SUMMARY_FIELDS))
            for row in pipe.execute():
                if row[0] is not None:  # expired since the index was read
                    out.append(
                        {name: "" if v is None else _text(v) for name, v in zip(SUMMARY_FIELDS, row, strict=True)}
                    )
        return out

    def list_run_ids(self, limit: int = 100) -> list[str]:
        """The newest run ids first."""
        return [_text(r) for r in self.client.zrevrange(keys.RUNS_INDEX, 0, limit - 1)]

    def mark_dispatch_failed(self, run_id: str, message: str) -> None:
        """Fail a run whose first tasks could not be published, with its ``run_failed`` event and ``finished_at``.

        One script (``lua/fail_dispatch.lua``), so the run never sits ``running`` nor ends without its final event.
        """
        raw = self._scripts["fail_dispatch"](keys=_run_keys(run_id), args=[message, self.retention_s])
        reply = [_text(x) for x in raw]
        if reply[0] == "ok":
            self.client.zrem(keys.DEADLINES, keys.deadline_member(run_id, reply[1]))

    # -- step transitions ----------------------------------------------------------------------------------------

    def claim(self, attempt: Attempt, *, lease_s: float, upstream: tuple[str, ...], children: tuple[str, ...]) -> Claim:
        """Start an attempt of a step if this message may run it (see ``lua/claim.lua``).

        The attempt enters the lease index in the same round trip, before the claim: a worker that dies right after
        claiming can then never leave a running step the sweeper cannot see.

        ``upstream`` names the steps whose status and output the attempt needs; ``children`` lets a duplicate
        delivery of a finished step find children whose dispatch was lost.
        """
        run_id, step, generation, task_id = attempt.run_id, attempt.step, attempt.generation, attempt.task_id
        member = keys.lease_member(run_id, step, task_id)
        argv: list[Any] = [step, generation, task_id, lease_s, len(upstream), *upstream, len(children), *children]
        replies = self._pipeline(
            lambda pipe: pipe.zadd(keys.LEASES, {member: time.time() + lease_s}),
            lambda pipe: self._evalsha(pipe, "claim", run_id, argv),
        )
        reply = [_text(x) for x in replies[1]]
        outcome = ClaimOutcome(reply[0])
        if outcome != ClaimOutcome.OK and not (outcome == ClaimOutcome.BUSY and reply[1:2] == ["own"]):
            self.client.zrem(keys.LEASES, member)
        if outcome == ClaimOutcome.OK:
            rows = reply[9:]
            return Claim(
                outcome=ClaimOutcome.OK,
                attempt=int(reply[1]),
                generation_attempt=int(reply[1]) - int(reply[5] or 0),
                now=float(reply[2]),
                errors=json.loads(reply[3]) if reply[3] else [],
                inputs=json.loads(reply[4]),
                cache_key=reply[6],
                force=reply[7] == "1",
                queued_at=float(reply[8]) if reply[8] else None,
                parent_status={p: rows[2 * i] for i, p in enumerate(upstream)},
                parent_output={
                    p: json.loads(rows[2 * i + 1]) if rows[2 * i + 1] else None for i, p in enumerate(upstream)
                },
            )
        if outcome == ClaimOutcome.DONE:
            rows = reply[2:]
            waiting = tuple(c for i, c in enumerate(children) if rows[2 * i] == "queued" and rows[2 * i + 1] == "")
            return Claim(outcome=ClaimOutcome.DONE, detail=reply[1], unclaimed_children=waiting)
        return Claim(outcome=outcome, detail=reply[1] if len(reply) > 1 else "")

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
        """Record a final outcome and release the children whose last parent this was.

        ``cached`` marks a success served from the step's stored result (its output is then kept as it is).
        """
        run_id, step, generation, task_id = attempt.run_id, attempt.step, attempt.generation, attempt.task_id
        argv: list[Any] = [
            step,
            generation,
            task_id,
            outcome.value,
            "" if output is None else json.dumps(output, separators=(",", ":")),
            "" if error is None else json.dumps(error, separators=(",", ":")),
            self.retention_s,
            cache_key,
            "1" if cached else "",
            success_detail(output),
            *children,
        ]
        # Each child this finish may release is covered in the lease index before the script runs, under the task id
        # its message will carry: a worker dying between the finish and the publish, or a message lost in the
        # broker, leaves the sweeper something to send again.
        held = {child: uuid.uuid4().hex for child in children}
        due = time.time() + grace_s
        commands: list[Callable[[Pipeline], Any]] = []
        if held:
            members = {keys.lease_member(run_id, c, t): due for c, t in held.items()}
            commands.append(lambda pipe: pipe.zadd(keys.LEASES, cast(Any, members)))
        commands.append(lambda pipe: self._evalsha(pipe, "finish", run_id, argv))
        commands.append(lambda pipe: pipe.zrem(keys.LEASES, keys.lease_member(run_id, step, task_id)))
        replies = self._pipeline(*commands)
        reply = [_text(x) for x in replies[1 if held else 0]]
        released = tuple(reply[2:]) if reply[0] == "ok" else ()
        unreleased = [keys.lease_member(run_id, c, t) for c, t in held.items() if c not in released]
        ended = reply[0] == "ok" and reply[1] != ""
        if unreleased or ended:
            pipe = self.client.pipeline(transaction=False)
            if unreleased:
                pipe.zrem(keys.LEASES, *unreleased)
            if ended:
                pipe.zrem(keys.DEADLINES, keys.deadline_member(run_id, generation))
            pipe.execute()
        if reply[0] != "ok":
            return FinishResult(recorded=False)
        return FinishResult(
            recorded=True, run_status=reply[1] or None, released=released, task_ids={c: held[c] for c in released}
        )

    def hold_dispatch(self, run_id: str, task_ids: dict[str, str], grace_s: float) -> None:
        """Cover steps about to be published in the lease index, so the sweeper resends a message that is lost."""
        if task_ids:
            due = time.time() + grace_s
            members = {keys.lease_member(run_id, s, t): due for s, t in task_ids.items()}
            self.client.zadd(keys.LEASES, cast(Any, members))

    def retry(self, attempt: Attempt, error: ErrorRecord, *, countdown_s: float, grace_s: float) -> bool:
        """Record a retryable error and put the step back to ``queued`` for ``countdown_s``.

        The attempt stays in the lease index until ``countdown_s + grace_s`` (Celery's retry keeps the task id), so
        a delayed retry lost with its worker is sent again. ``False`` when the attempt is stale.
        """
        run_id, step, generation, task_id = attempt.run_id, attempt.step, attempt.generation, attempt.task_id
        argv: list[Any] = [step, generation, task_id, json.dumps(error), countdown_s, grace_s]
        lease = self._scripts["retry"](keys=_run_keys(run_id), args=argv)
        if lease is None:
            return False
        self.client.zadd(keys.LEASES, {keys.lease_member(run_id, step, task_id): float(_text(lease))})
        return True

    def defer(self, attempt: Attempt, deferral: DeferralRecord, *, countdown_s: float, grace_s: float) -> bool:
        """Put a running step back to ``queued`` for ``countdown_s`` without counting the attempt (see ``defer.lua``).

        ``False`` when the attempt is stale.
        """
        run_id, step, generation, task_id = attempt.run_id, attempt.step, attempt.generation, attempt.task_id
        argv: list[Any] = [step, generation, task_id, countdown_s, grace_s, json.dumps(deferral)]
        lease = self._scripts["defer"](keys=_run_keys(run_id), args=argv)
        if lease is None:
            return False
        self.client.zadd(keys.LEASES, {keys.lease_member(run_id, step, task_id): float(_text(lease))})
        return True

    def renew(self, leases: dict[str, list[tuple[str, str]]], lease_s: float) -> list[tuple[str, str, str, bool]]:
        """Extend the leases of running attempts, grouped by run id; returns each with whether it is still ours."""
        order = list(leases.items())
        calls = []
        for run_id, pairs in order:
            argv: list[Any] = [lease_s]
            for step, task_id in pairs:
                argv += [step, task_id]
            calls.append(functools.partial(self._evalsha, script="renew", run_id=run_id, argv=argv))
        replies = self._pipeline(*calls)
        out: list[tuple[str, str, str, bool]] = []
        index: dict[str, float] = {}
        for (run_id, pairs), reply in zip(order, replies, strict=True):
            now = float(_text(reply[0]))
            for (step, task_id), flag in zip(pairs, reply[1:], strict=True):
                out.append((run_id, step, task_id, bool(int(flag))))
                if int(flag):
                    index[keys.lease_member(run_id, step, task_id)] = now + lease_s
        if index:
            self.client.zadd(keys.LEASES, cast(Any, index), xx=True)
        return out

    def expired_leases(self, limit: int = 500) -> list[str]:
        """Lease index members whose lease ran out, by Redis's clock."""
        seconds, micros = self.client.time()
        now = seconds + micros / 1e6
        return [_text(m) for m in self.client.zrangebyscore(keys.LEASES, "-inf", now, start=0, num=limit)]

    def reclaim(
        self, member: str, new_task_id: str, error: ErrorRecord, *, grace_s: float, backlog_wait_s: float = 0.0
    ) -> ReclaimedStep | None:
        """Recover the step behind an expired lease (see ``lua/reclaim.lua``).

        Returns:
            What to publish, or ``None`` when there is nothing to do (the lease is live again, or the attempt ended).
        """
        run_id, step, task_id = keys.parse_lease_member(member)
        argv: list[Any] = [step, task_id, new_task_id, json.dumps(error), grace_s, backlog_wait_s]
        reply = [_text(x) for x in self._scripts["reclaim"](keys=_run_keys(run_id), args=argv)]
        if reply[0] == "live":
            # The heartbeat renewed it after we read the index: keep it findable at its new expiry.
            self.client.zadd(keys.LEASES, {member: float(reply[1])})
            return None
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(keys.LEASES, member)
        if reply[0] == "ok":
            pipe.zadd(keys.LEASES, {keys.lease_member(run_id, step, reply[3]): float(reply[4])})
        pipe.execute()
        if reply[0] != "ok":
            return None
        return ReclaimedStep(run_id=run_id, step=step, definition_hash=reply[1], generation=reply[2], task_id=reply[3])

    def stop(
        self, run_id: str, status: RunStatus, reason: str, steps: tuple[str, ...], generation: str = ""
    ) -> StopResult:
        """End a run early (``cancelled`` or ``timed_out``; see ``lua/stop.lua``)."""
        argv: list[Any] = [status.value, reason, self.retention_s, generation, *steps]
        reply = [_text(x) for x in self._scripts["stop"](keys=_run_keys(run_id), args=argv)]
        if reply[0] != StopOutcome.OK:
            return StopResult(outcome=StopOutcome(reply[0]), detail=reply[1] if len(reply) > 1 else "")
        stopped_gen, pairs = reply[2], reply[3:]
        interrupted = tuple((pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2))
        members = [keys.lease_member(run_id, s, t) for s, t in interrupted if t]
        pipe = self.client.pipeline(transaction=False)
        if members:
            pipe.zrem(keys.LEASES, *members)
        # The ended run's timers go with it: a deadline or an approval timeout left behind would fire into a later
        # generation (or linger in the index for as long as the workflow's timeout).
        pipe.zrem(keys.DEADLINES, keys.deadline_member(run_id, stopped_gen))
        if steps:
            pipe.zrem(keys.APPROVALS, *(keys.approval_member(run_id, stopped_gen, step) for step in steps))
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
        reply = [_text(x) for x in self._scripts["resume"](keys=_run_keys(run_id), args=argv)]
        outcome = ResumeOutcome(reply[0])
        if outcome == ResumeOutcome.REFUSED:
            return ResumeResult(outcome, detail=reply[1])
        if outcome == ResumeOutcome.OK:
            # Timers of the generation left behind must not fire into the new one; fresh ones are set as steps wait.
            old = plan.expected_generation
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(keys.DEADLINES, keys.deadline_member(run_id, old))
            if plan.resets:
                pipe.zrem(keys.APPROVALS, *(keys.approval_member(run_id, old, step) for step, _, _ in plan.resets))
            if reply[2]:
                pipe.zadd(keys.DEADLINES, {keys.deadline_member(run_id, reply[1]): float(reply[2])})
            pipe.execute()
        return ResumeResult(outcome, generation=reply[1])

    def add_deadline(self, run_id: str, generation: str, at: float) -> None:
        """Schedule the run's workflow deadline (durable: swept by any worker, whenever one runs)."""
        self.client.zadd(keys.DEADLINES, {keys.deadline_member(run_id, generation): at})

    def due_deadlines(self, limit: int = 500) -> list[tuple[str, str]]:
        """``(run_id, generation)`` of deadlines that have passed, by Redis's clock."""
        seconds, micros = self.client.time()
        members = self.client.zrangebyscore(keys.DEADLINES, "-inf", seconds + micros / 1e6, start=0, num=limit)
        out: list[tuple[str, str]] = []
        for member in members:
            run_id, _, generation = _text(member).partition("|")
            out.append((run_id, generation))
        return out

    def drop_deadline(self, run_id: str, generation: str) -> None:
        """Forget a deadline that fired or no longer applies."""
        self.client.zrem(keys.DEADLINES, keys.deadline_member(run_id, generation))

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
        pipe.zrem(keys.LEASES, keys.lease_member(run_id, step, attempt.task_id))
        if reply[0] == "ok" and reply[1]:
            pipe.zadd(keys.APPROVALS, {keys.approval_member(run_id, attempt.generation, step): float(reply[1])})
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
        pipe.zadd(keys.LEASES, {keys.lease_member(run_id, step, decision.task_id): time.time() + decision.lease_s})
        pipe.zrem(keys.APPROVALS, keys.approval_member(run_id, reply[1], step))
        pipe.execute()
        return DecisionResult(DecisionOutcome.OK, generation=reply[1])

    def due_approvals(self, limit: int = 500) -> list[tuple[str, str, str]]:
        """``(run_id, generation, step)`` of approval waits whose timeout passed, by Redis's clock."""
        seconds, micros = self.client.time()
        members = self.client.zrangebyscore(keys.APPROVALS, "-inf", seconds + micros / 1e6, start=0, num=limit)
        out: list[tuple[str, str, str]] = []
        for member in members:
            run_id, generation, step = _text(member).split("|", 2)
            out.append((run_id, generation, step))
        return out

    def drop_approval(self, run_id: str, generation: str, step: str) -> None:
        """Forget an approval timeout that fired or no longer applies."""
        self.client.zrem(keys.APPROVALS, keys.approval_member(run_id, generation, step))

    # -- events --------------------------------------------------------------------------------------------------

    def events(self, run_id: str, after: int = 0, count: int | None = None) -> list[Event]:
        """The run's events with ``seq > after``, in order (at most ``count``)."""
        rows: Any = self.client.xrange(keys.events_key(run_id), min=f"0-{after + 1}", max="+", count=count)
        return [_event(run_id, entry_id, fields) for entry_id, fields in rows]

    def wait_events(self, run_id: str, after: int, timeout_s: float) -> list[Event]:
        """Like :meth:`events`, but block up to ``timeout_s`` until at least one arrives."""
        # Blocking longer than the socket timeout would end in a timeout error: wait at most 20 s per call.
        block_ms = max(1, int(min(timeout_s, 20.0) * 1000))
        reply: Any = self.client.xread({keys.events_key(run_id): f"0-{after}"}, block=block_ms)
        return [_event(run_id, entry_id, fields) for _, rows in reply or [] for entry_id, fields in rows]

    def announce(self, run_id: str, event_type: str, workflow: str) -> None:
        """Append a run-level event to the global stream dashboards follow (``orch:events``, capped)."""
        self.client.xadd(
            keys.EVENTS, {"run_id": run_id, "type": event_type, "workflow": workflow}, maxlen=GLOBAL_EVENTS_MAXLEN
        )

    def try_sweeper_lock(self, owner: str, ttl_s: float) -> bool:
        """Take the cluster-wide sweeper turn for ``ttl_s`` (one worker sweeps per interval)."""
        return bool(self.client.set(keys.SWEEPER_LOCK, owner, nx=True, px=max(1, int(ttl_s * 1000))))
