"""The Redis state store: every transition is one Lua script on the run's own hash."""

from __future__ import annotations

import json
import threading
from importlib import resources
from typing import Any, cast

import redis
from redis.commands.core import Script

from orchestrator.errors import RunNotFoundError, StoreUnavailableError
from orchestrator.spec import WorkflowSpec, parse_workflow
from orchestrator.state import keys
from orchestrator.state.base import Attempt, Claim, Finish, StepOutcome

_SCRIPTS = ("create", "claim", "finish", "retry", "reclaim", "renew")


def _load_lua(name: str) -> str:
    return resources.files("orchestrator.state").joinpath(f"lua/{name}.lua").read_text()


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
    def from_url(cls, url: str, **kwargs: Any) -> RedisStateStore:
        """Connect to ``url`` (``redis://`` or ``rediss://``, password in the URL)."""
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)
        return cls(client, **kwargs)

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
            RunNotFoundError: When it expired or never existed.
        """
        with self._lock:
            cached = self._definitions.get(definition_hash)
        if cached is not None:
            return cached
        raw = self.client.get(keys.definition_key(definition_hash))
        if raw is None:
            raise RunNotFoundError(f"definition {definition_hash}")
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
        """Create the run hash with every step ``pending`` (roots ``queued``).

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
        }
        for step in spec.steps:
            parents = graph.parents[step.name]
            fields[keys.step_field(step.name, "status")] = "pending" if parents else "queued"
            fields[keys.step_field(step.name, "pending")] = len(parents)
            fields[keys.step_field(step.name, "attempts")] = 0
        argv: list[Any] = [self.active_ttl_s]
        for name, value in fields.items():
            argv += [name, value]
        created = self._scripts["create"](keys=[keys.run_key(run_id)], args=argv)
        if created is None:
            return False
        score = float(_text(created))
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(keys.RUNS_INDEX, {run_id: score})
        pipe.zremrangebyscore(keys.RUNS_INDEX, "-inf", score - self.active_ttl_s)
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

    def list_run_ids(self, limit: int = 100) -> list[str]:
        """The newest run ids first."""
        return [_text(r) for r in self.client.zrevrange(keys.RUNS_INDEX, 0, limit - 1)]

    def mark_dispatch_failed(self, run_id: str, message: str) -> None:
        """Fail a run whose first tasks could not be published, so it cannot sit ``running`` forever."""
        self.client.hset(
            keys.run_key(run_id), mapping={"status": "failed", "error": message, "first_failure": "(dispatch)"}
        )
        self.client.expire(keys.run_key(run_id), self.retention_s)

    # -- step transitions ----------------------------------------------------------------------------------------

    def claim(self, attempt: Attempt, *, lease_s: float, upstream: tuple[str, ...], children: tuple[str, ...]) -> Claim:
        """Start an attempt of a step if this message may run it (see ``lua/claim.lua``).

        ``upstream`` names the steps whose status and output the attempt needs; ``children`` lets a duplicate
        delivery of a finished step find children whose dispatch was lost.
        """
        run_id, step, generation, task_id = attempt.run_id, attempt.step, attempt.generation, attempt.task_id
        parents = upstream
        argv: list[Any] = [step, generation, task_id, lease_s, len(parents), *parents, len(children), *children]
        reply = [_text(x) for x in self._scripts["claim"](keys=[keys.run_key(run_id)], args=argv)]
        outcome = reply[0]
        if outcome == "ok":
            parent_rows = reply[5:]
            return Claim(
                outcome="ok",
                attempt=int(reply[1]),
                now=float(reply[2]),
                errors=json.loads(reply[3]) if reply[3] else [],
                inputs=json.loads(reply[4]),
                parent_status={p: parent_rows[2 * i] for i, p in enumerate(parents)},
                parent_output={
                    p: json.loads(parent_rows[2 * i + 1]) if parent_rows[2 * i + 1] else None
                    for i, p in enumerate(parents)
                },
            )
        if outcome == "done":
            rows = reply[2:]
            waiting = tuple(c for i, c in enumerate(children) if rows[2 * i] == "queued" and rows[2 * i + 1] == "")
            return Claim(outcome="done", detail=reply[1], unclaimed_children=waiting)
        return Claim(outcome=outcome, detail=reply[1] if len(reply) > 1 else "")

    def add_lease(self, attempt: Attempt, until: float) -> None:
        """Index a running attempt so the sweeper finds it if its worker dies."""
        self.client.zadd(keys.LEASES, {keys.lease_member(attempt.run_id, attempt.step, attempt.task_id): until})

    def finish(
        self,
        attempt: Attempt,
        outcome: StepOutcome,
        *,
        output: Any = None,
        error: dict[str, Any] | None = None,
        children: tuple[str, ...] = (),
    ) -> Finish:
        """Record a final outcome and release the children whose last parent this was."""
        run_id, step, generation, task_id = attempt.run_id, attempt.step, attempt.generation, attempt.task_id
        argv: list[Any] = [
            step, generation, task_id, outcome.value,
            "" if output is None else json.dumps(output, separators=(",", ":")),
            "" if error is None else json.dumps(error, separators=(",", ":")),
            self.retention_s, *children,
        ]  # fmt: skip
        pipe = self.client.pipeline(transaction=False)
        self._scripts["finish"](keys=[keys.run_key(run_id)], args=argv, client=pipe)
        pipe.zrem(keys.LEASES, keys.lease_member(run_id, step, task_id))
        reply = [_text(x) for x in pipe.execute()[0]]
        if reply[0] != "ok":
            return Finish(recorded=False)
        return Finish(recorded=True, run_status=reply[1] or None, released=tuple(reply[2:]))

    def retry(self, attempt: Attempt, error: dict[str, Any]) -> bool:
        """Record a retryable error and put the step back to ``queued``; ``False`` when the attempt is stale."""
        run_id, step, generation, task_id = attempt.run_id, attempt.step, attempt.generation, attempt.task_id
        pipe = self.client.pipeline(transaction=False)
        self._scripts["retry"](
            keys=[keys.run_key(run_id)], args=[step, generation, task_id, json.dumps(error)], client=pipe
        )
        pipe.zrem(keys.LEASES, keys.lease_member(run_id, step, task_id))
        return bool(pipe.execute()[0])

    def renew(self, leases: dict[str, list[tuple[str, str]]], lease_s: float) -> list[tuple[str, str, str, bool]]:
        """Extend the leases of running attempts, grouped by run id; returns each with whether it is still ours."""
        pipe = self.client.pipeline(transaction=False)
        order = list(leases.items())
        for run_id, pairs in order:
            argv: list[Any] = [lease_s]
            for step, task_id in pairs:
                argv += [step, task_id]
            self._scripts["renew"](keys=[keys.run_key(run_id)], args=argv, client=pipe)
        replies = pipe.execute()
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

    def reclaim(self, member: str, new_task_id: str, error: dict[str, Any]) -> tuple[str, str] | None:
        """Re-queue the attempt behind an expired lease under ``new_task_id``.

        Returns:
            ``(definition_hash, generation)`` to re-dispatch with, or ``None`` when there is nothing to do.
        """
        run_id, step, task_id = keys.parse_lease_member(member)
        reply = [_text(x) for x in self._scripts["reclaim"](
            keys=[keys.run_key(run_id)], args=[step, task_id, new_task_id, json.dumps(error)]
        )]  # fmt: skip
        self.client.zrem(keys.LEASES, member)
        if reply[0] != "ok":
            return None
        return reply[1], reply[2]

    def try_sweeper_lock(self, owner: str, ttl_s: float) -> bool:
        """Take the cluster-wide sweeper turn for ``ttl_s`` (one worker sweeps per interval)."""
        return bool(self.client.set(keys.SWEEPER_LOCK, owner, nx=True, px=max(1, int(ttl_s * 1000))))
