"""The Redis store's connection, its scripts and what every transition shares: runs, definitions, events, sweeping.

Scripts are loaded from ``orchestrator/state/lua/`` once per store and run by EVALSHA, reloaded when Redis answers
NOSCRIPT. The transitions themselves are mixins over :class:`RedisStateCore` (``steps.py``, ``control.py``); the
package joins them into :class:`~orchestrator.state.redis.RedisStateStore`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, Self, cast

import redis
from redis.client import Pipeline
from redis.commands.core import Script

from orchestrator.definition.spec import WorkflowSpec, parse_workflow
from orchestrator.engine.events import Event
from orchestrator.errors import DefinitionNotFoundError, RunNotFoundError, StoreUnavailableError
from orchestrator.infra.redis_cluster import (
    cluster_client,
    is_cluster_client,
    is_cluster_url,
    queue_evalsha,
    queue_wait,
)
from orchestrator.infra.redis_roundtrip import execute, run_command
from orchestrator.infra.redis_url import blocking_pool
from orchestrator.state import keys
from orchestrator.state.base import (
    MAX_SUBMITTED_DEFINITIONS,
    SUMMARY_FIELDS,
    needs_failure_error,
    submitted_record,
)
from orchestrator.state.owed import Overtaken, OwedWrite, OwedWrites, sent_again
from orchestrator.state.redis.clock import CLOCK_STEP_S, RedisClock

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
    "note_definition",
    "sweepers",
    "sweep_hold",
    "iterate",
    "item_expand",
    "item_claim",
    "item_finish",
    "item_retry",
    "item_reclaim",
    "item_stop",
    "item_renew",
    "item_wait",
    "item_decide",
    "item_hold",
    "item_child_done",
    "journal",
    "child_wait",
    "child_done",
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
    "iterate",
    "item_expand",
    "item_claim",
    "item_finish",
    "item_retry",
    "item_reclaim",
    "item_stop",
    "item_renew",
    "item_wait",
    "journal",
    "child_wait",
}

_ENDING = {"finish", "stop", "fail_dispatch"}

_DECIDING = {"decide", "item_decide"}

_CLAIMING = {"claim", "finish"}


WAITED_SCRIPTS = ("claim", "finish")
"""The transitions after which ``wait_replicas`` waits for replicas: a lost claim or finish runs a step again."""
WAIT_TIMEOUT_MS = 1000
"""How long one ``WAIT`` may hold a transition when too few replicas answer."""


def _load_lua(name: str) -> str:
    lua = resources.files("orchestrator.state").joinpath("lua")
    body = lua.joinpath(f"{name}.lua").read_text()
    # Scripts cannot include one another: the event helpers are prepended to every script that emits, the item
    # helpers to every item script, the end-of-run compaction to the scripts that end a run and to the resume, which
    # undoes it, the audit trail to the scripts that record a decision, the claim to the claim and to the finish
    # (which claims the child its slot keeps).
    if name in _DECIDING:
        body = lua.joinpath("_decide.lua").read_text() + body
    if name.startswith("item_"):
        body = lua.joinpath("_items.lua").read_text() + body
    if name in _ENDING or name == "resume":
        body = lua.joinpath("_ended.lua").read_text() + body
    if name in _CLAIMING:
        body = lua.joinpath("_claim.lua").read_text() + body
    return lua.joinpath("_events.lua").read_text() + body if name in _WITH_EVENTS else body


GLOBAL_EVENTS_MAXLEN = 100_000

MAX_CONNECTIONS = 100
"""Redis connections one store (one worker process) opens at most; more threads than this wait for a free one."""

CONNECTION_WAIT_S = 30.0
"""How long a thread waits for a free connection before the command fails as if Redis did not answer."""


def _event(run_id: str, entry_id: Any, fields: dict[Any, Any]) -> Event:
    return Event.from_stream(run_id, _text(entry_id), {_text(k): _text(v) for k, v in fields.items()})


def newest_run_ids(client: redis.Redis, shards: int, limit: int, offset: int = 0) -> list[str]:
    """The newest run ids first, after the ``offset`` newest, merged from every bucket of the runs index."""
    if shards <= 1:
        return [_text(r) for r in client.zrevrange(keys.runs_index_key(None), offset, offset + limit - 1)]
    pipe = client.pipeline(transaction=False)
    for shard in keys.all_shards(shards):
        pipe.zrevrange(keys.runs_index_key(shard), 0, offset + limit - 1, withscores=True)
    ranked = sorted(((score, _text(r)) for rows in pipe.execute() for r, score in rows), reverse=True)
    return [run_id for _, run_id in ranked[offset : offset + limit]]


def _run_keys(run_id: str) -> list[str]:
    return [keys.run_key(run_id), keys.events_key(run_id)]


def _ending_keys(run_id: str) -> list[str]:
    """The keys of a script that ends a run or resumes one: the run's, and where its large values go once it ended
    (``lua/_ended.lua`` names that key after the run's; listed so that Redis Cluster knows every key a script uses)."""
    return [*_run_keys(run_id), keys.large_values_key(run_id)]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


LARGE_MARK = "large"
"""The run hash's field naming the token of its large values (``keys.large_values_key``, ``lua/_ended.lua``)."""

ENDED_PACKED_FIELDS = ("attempts", "queued_at", "started_at", "finished_at")
"""An ended step's fields ``lua/_ended.lua`` packs into its field ``s:STEP:`` (``|`` between them, in this order)."""

READ_TRIES = 3
"""Reads of the run hash and its large values before :meth:`RedisStateCore.run_fields` settles for the hash alone."""


def unpack_large(blob: bytes | str) -> tuple[str, dict[str, str]]:
    """The token and the fields of an ended run's large values, as ``lua/_ended.lua`` packs them: ``TOKEN\\n`` then
    ``LEN:NAME`` and ``LEN:VALUE`` (byte lengths) for each field."""
    data = blob.encode() if isinstance(blob, str) else blob
    token, _, rest = data.partition(b"\n")
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        pair: list[str] = []
        for _ in range(2):
            colon = rest.index(b":", pos)
            end = colon + 1 + int(rest[pos:colon])
            pair.append(rest[colon + 1 : end].decode())
            pos = end
        fields[pair[0]] = pair[1]
    return token.decode(), fields


def unpack_steps(fields: dict[str, str]) -> dict[str, str]:
    """``fields`` with each ended step's packed field (``s:STEP:``) spread back into its :data:`ENDED_PACKED_FIELDS`
    (a field of the same name already there is the newer)."""
    packed = [name for name in fields if name.startswith("s:") and name.endswith(":")]
    for name in packed:
        for suffix, value in zip(ENDED_PACKED_FIELDS, fields.pop(name).split("|"), strict=False):
            if value:
                fields.setdefault(name + suffix, value)
    return fields


def ended_fields(client: Any, run_id: str) -> dict[str, str] | None:
    """The run's fields (``None``: no such run), its large values merged back in when it ended (``lua/_ended.lua``).

    The hash is read first (its ended steps' packed fields spread back out); only an ended run with large values
    costs a second read, of its large values, which belong to the hash read when they carry its token. A resume
    between the two reads puts them back into the hash and deletes them, so the reads start over (at most
    :data:`READ_TRIES` times; then the hash alone).
    """
    fields: dict[str, str] = {}
    for _ in range(READ_TRIES):
        raw = client.hgetall(keys.run_key(run_id))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        token = fields.pop(LARGE_MARK, None)
        if token is None:
            return unpack_steps(fields)
        blob = client.get(keys.large_values_key(run_id))
        if blob is not None:
            stored, large = unpack_large(blob)
            if stored == token:
                return unpack_steps({**large, **fields})  # a field written into the hash after the run ended is newer
    return unpack_steps(fields)


class RedisStateCore:
    """The connection, scripts and shared operations of a :class:`~orchestrator.state.redis.RedisStateStore`.

    Args:
        client: A redis-py client (``decode_responses`` off or on, either works).
        retention_s: How long a finished run is kept.
        definition_ttl_s: How long a stored workflow definition lives after its last submit.
        shards: Buckets of each global index (``ORCH_SHARDS``; see :mod:`orchestrator.state.keys`).
        wait_replicas: ``ORCH_WAIT_REPLICAS``: after every claim and finish, wait (``WAIT``, at most
            ``WAIT_TIMEOUT_MS``) until this many replicas have the run's writes; 0 (the default) does not wait.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        retention_s: int = 7 * 24 * 3600,
        definition_ttl_s: int | None = None,
        shards: int = 1,
        wait_replicas: int = 0,
    ):
        self.client = client
        self.clock = RedisClock(client)
        self.shards = shards
        self.wait_replicas = wait_replicas
        self._waits = threading.local()  # positions of the WAIT replies in the pipeline being built, per thread
        self.retention_s = retention_s
        # A run can outlive its retention while still running (approvals can wait for days): keep it 4x as long.
        self.active_ttl_s = retention_s * 4
        self.definition_ttl_s = definition_ttl_s or self.active_ttl_s
        self._scripts: dict[str, Script] = {name: client.register_script(_load_lua(name)) for name in _SCRIPTS}
        self._definitions: dict[str, WorkflowSpec] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = MAX_CONNECTIONS, **kwargs: Any) -> Self:
        """Connect to ``url`` (``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://``, password in the URL).

        The connections are a blocking pool: a thread that finds all ``max_connections`` in use waits for one.
        redis-py's default pool instead fails the command with ``Too many connections`` once 100 are in use: a
        threads worker with ``-c`` above about 100 got that on claims and finishes under load. Through Sentinel, each
        new connection goes to the master the Sentinels name at that moment.

        In a Redis Cluster (``redis+cluster://``) each node gets such a pool.

        Raises:
            RedisUrlError: A malformed Sentinel or cluster URL.
        """
        if is_cluster_url(url):
            client = cluster_client(
                url,
                max_connections=max_connections,
                wait_s=CONNECTION_WAIT_S,
                socket_connect_timeout=5,
                socket_timeout=30,
            )
            return cls(client, **kwargs)
        pool = blocking_pool(
            url,
            max_connections=max_connections,
            timeout=CONNECTION_WAIT_S,
            socket_connect_timeout=5,
            socket_timeout=30,
            health_check_interval=30,
        )
        return cls(redis.Redis(connection_pool=pool), **kwargs)

    def _evalsha(
        self, pipe: Pipeline, script: str, run_id: str, argv: list[Any], *, more_keys: Sequence[str] = ()
    ) -> Any:
        run_keys = _run_keys(run_id)
        if script == "finish":
            run_keys.append(keys.llm_run_cache_key(run_id))
        if script in _ENDING:
            run_keys.append(keys.large_values_key(run_id))
        run_keys += more_keys
        reply = queue_evalsha(pipe, self._scripts[script].sha, len(run_keys), *run_keys, *argv)
        if self.wait_replicas and script in WAITED_SCRIPTS:
            self._waits.positions.append(queue_wait(pipe, run_keys[0], self.wait_replicas, WAIT_TIMEOUT_MS))
        return reply

    # -- the global indices, one bucket per run (``keys.shard_of``) ----------------------------------------------

    def _shard(self, run_id: str) -> str | None:
        return keys.shard_of(run_id, self.shards)

    def _leases(self, run_id: str) -> str:
        return keys.leases_key(self._shard(run_id))

    def _deadlines(self, run_id: str) -> str:
        return keys.deadlines_key(self._shard(run_id))

    def _approvals(self, run_id: str) -> str:
        return keys.approvals_key(self._shard(run_id))

    def _lease_buckets(self, members: dict[str, float]) -> dict[str, dict[str, float]]:
        """Lease index members (with their scores) grouped by the bucket each belongs in."""
        out: dict[str, dict[str, float]] = {}
        for member, score in members.items():
            out.setdefault(self._leases(keys.parse_lease_member(member)[0]), {})[member] = score
        return out

    def _due(
        self,
        index: Callable[[str | None], str],
        limit: int,
        buckets: Sequence[str | None] | None = None,
    ) -> list[str]:
        """Members of ``buckets`` of ``index`` (default: all) due by Redis's clock, oldest first, at most ``limit``.

        The process's estimate of Redis's clock (:class:`~orchestrator.state.redis.clock.RedisClock`), plus its margin
        of error, picks the candidates, so a sweep that finds nothing due sends no ``TIME``; what it finds is checked
        against one ``TIME`` before anything acts on it, so the estimate's error neither makes an entry due early nor
        hides one that is due.
        """
        shards = keys.all_shards(self.shards) if buckets is None else list(buckets)
        estimate = self.clock.now() + CLOCK_STEP_S
        if len(shards) == 1:
            found = [self.client.zrangebyscore(index(shards[0]), "-inf", estimate, start=0, num=limit, withscores=True)]
        else:
            pipe = self.client.pipeline(transaction=False)
            for shard in shards:
                pipe.zrangebyscore(index(shard), "-inf", estimate, start=0, num=limit, withscores=True)
            found = pipe.execute()
        rows = [row for rows in cast(list[list[tuple[bytes | str, float]]], found) for row in rows]
        if not rows:
            return []
        now = self.clock.read()
        due = sorted((float(score), _text(member)) for member, score in rows if float(score) <= now)
        return [member for _, member in due[:limit]]

    def _pipeline(
        self,
        *commands: Callable[[Pipeline], Any],
        before: tuple[Callable[[Pipeline], Any], ...] = (),
        after: tuple[Callable[[Pipeline], Any], ...] = (),
        owed: OwedWrites | None = None,
        then: Sequence[OwedWrite] = (),
    ) -> list[Any]:
        """Run commands in one round trip, scripts by EVALSHA alone; ``before`` applied ahead of them and ``after``
        once they have been applied. The replies come in that order: ``before``'s, the commands', ``after``'s.

        What the attempt ``owed`` Redis (:mod:`orchestrator.state.owed`) goes first of all, sent once: each write
        takes its own reply, and its error is not the transition's. In a cluster it is sent on its own first.
        ``then``'s writes go last of all, sent once, each taking its own reply as an owed write does (wrapped in
        :class:`~orchestrator.state.owed.Overtaken` when an owed write was sent again after them); only those of
        this store's own client (``client`` attribute) and on a single Redis: the others are not sent.

        redis-py's own script objects add a SCRIPT EXISTS round trip before every pipeline that holds one; a step
        attempt runs two such pipelines, so that doubled its round trips. Scripts are loaded once when Redis says it
        does not know one (first use, or after a restart or SCRIPT FLUSH); every command here is safe to repeat.

        One Redis applies a pipeline in order, so ``before`` simply starts it and ``after`` ends it. A cluster
        pipeline sends each node its commands together, nodes in order of first use: an index entry removed after a
        script would reach the index's node with the entry added before it, ahead of the script on the run's node, and
        a worker dying in between would leave a running step that no index holds. Nor does a cluster pipeline keep
        order when a node fails: redis-py sends a command that met a connection error again on its own once the
        others were applied, so an index entry meant to go first can land after the script, or never. In a cluster
        ``before`` and ``after`` are therefore round trips of their own.
        """
        cluster = is_cluster_client(self.client)
        writes = [] if owed is None else owed.take(None if cluster else self.client)
        trailing = [] if cluster else [write for write in then if getattr(write, "client", None) is self.client]
        if (before or after) and cluster:
            first = self._pipeline(*before) if before else []
            return first + self._pipeline(*commands) + (self._pipeline(*after) if after else [])
        commands = (*before, *commands, *after)
        for tries_left in (1, 0):
            pipe = self.client.pipeline(transaction=False)
            for write in writes:
                write.queue(pipe)
            waits: list[int] = []
            self._waits.positions = waits
            for command in commands:
                command(pipe)
            for write in trailing:
                write.queue(pipe)
            try:
                if writes or trailing:
                    sent, writes = writes, []  # sent once: a second try runs the transition's own commands only
                    last, trailing = trailing, []
                    replies = self._around_owed(sent, last, pipe)
                    waits = [i - len(sent) for i in waits]
                else:
                    replies = execute(pipe)
                # The replicas' count is not the caller's business: WAIT gives up after its timeout either way.
                return [reply for i, reply in enumerate(replies) if i not in waits] if waits else replies
            except redis.exceptions.NoScriptError:
                # In a cluster, a replica promoted by a failover starts with no scripts: SCRIPT LOAD goes to every
                # master.
                if not tries_left:
                    raise
                for script in self._scripts.values():
                    self.client.script_load(script.script)
        raise AssertionError("unreachable")

    @staticmethod
    def _around_owed(writes: list[OwedWrite], last: list[OwedWrite], pipe: Pipeline) -> list[Any]:
        """Execute ``pipe``, whose first commands are ``writes`` and last ``last``: each takes its reply, and the
        others' come back (positions counted from the first of them) or raise their first error, as ``execute``
        would."""
        replies = execute(pipe, raise_on_error=False)
        for write, reply in zip(writes, replies, strict=False):
            write.answered(reply)
        # An owed write sent again went after ``last``'s: each is told, to make up for what it did not see.
        overtaken = sent_again(replies[: len(writes)])
        ends = len(replies) - len(last)
        for write, reply in zip(last, replies[ends:], strict=True):
            write.answered(Overtaken(reply) if overtaken else reply)
        rest = list(replies[len(writes) : ends])
        error = next((reply for reply in rest if isinstance(reply, Exception)), None)
        if error is not None:
            raise error
        return rest

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
        note: list[str | int] = [
            spec.definition_hash,
            spec.name,
            spec.version,
            self.definition_ttl_s,
            MAX_SUBMITTED_DEFINITIONS,
        ]
        index = [keys.SUBMITTED_DEFINITIONS, keys.SUBMITTED_RECORDS]
        self._pipeline(
            lambda pipe: pipe.set(keys.definition_key(spec.definition_hash), body, ex=self.definition_ttl_s),
            lambda pipe: queue_evalsha(pipe, self._scripts["note_definition"].sha, 2, *index, *note),
        )
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
        starting = set(spec.start_steps)
        for step in spec.steps:
            parents = graph.parents[step.name]
            fields[keys.step_field(step.name, "status")] = "queued" if step.name in starting else "pending"
            fields[keys.step_field(step.name, "pending")] = len(parents)
            fields[keys.step_field(step.name, "attempts")] = 0
        argv: list[Any] = [self.active_ttl_s]
        for name, value in fields.items():
            argv += [name, value]
        created = self._scripts["create"](keys=_run_keys(run_id), args=argv)
        if created is None:
            return False
        score = float(_text(created))
        runs = keys.runs_index_key(self._shard(run_id))
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(runs, {run_id: score})
        pipe.zremrangebyscore(runs, "-inf", score - self.active_ttl_s)
        if spec.timeout_s is not None:
            pipe.zadd(self._deadlines(run_id), {keys.deadline_member(run_id, "1"): score + spec.timeout_s})
        pipe.execute()
        return True

    def run_fields(self, run_id: str) -> dict[str, str]:
        """Every field of the run hash, decoded.

        Raises:
            RunNotFoundError: When the run does not exist (or expired).
        """
        fields = ended_fields(self.client, run_id)
        if fields is None:
            raise RunNotFoundError(run_id)
        return fields

    def run_parent(self, run_id: str) -> str | None:
        """The run's ``parent_run`` (one ``HGET``): a run id, so never moved out of an ended run's hash with its
        large values (``lua/_ended.lua`` moves only values longer than 64 bytes)."""
        raw = run_command(self.client, "HGET", keys.run_key(run_id), "parent_run")
        return _text(raw) or None if raw is not None else None

    def run_summaries(self, run_ids: list[str]) -> list[dict[str, str]]:
        """The summary fields of each run still kept, in order: one round trip per 500 runs (two with failures)."""
        out: list[dict[str, str]] = []
        for start in range(0, len(run_ids), 500):
            pipe = self.client.pipeline(transaction=False)
            for run_id in run_ids[start : start + 500]:
                pipe.hmget(keys.run_key(run_id), [*SUMMARY_FIELDS, LARGE_MARK])
            rows = [
                {
                    name: "" if v is None else _text(v)
                    for name, v in zip((*SUMMARY_FIELDS, LARGE_MARK), row, strict=True)
                }
                for row in pipe.execute()
                if row[0] is not None  # expired since the index was read
            ]
            failed = [row for row in rows if needs_failure_error(row)]
            if failed:
                # An ended run's step error is among its large values when longer than a compact hash takes.
                pipe = self.client.pipeline(transaction=False)
                for row in failed:
                    pipe.hget(keys.run_key(row["run_id"]), keys.step_field(row["first_failure"], "error"))
                    if row[LARGE_MARK]:
                        pipe.get(keys.large_values_key(row["run_id"]))
                replies = iter(pipe.execute())
                for row in failed:
                    field = keys.step_field(row["first_failure"], "error")
                    error = next(replies)
                    blob = next(replies) if row[LARGE_MARK] else None
                    if error is None and blob is not None:
                        error = unpack_large(blob)[1].get(field)
                    row["failure_error"] = "" if error is None else _text(error)
            for row in rows:
                del row[LARGE_MARK]
            out += rows
        return out

    def list_run_ids(self, limit: int = 100, offset: int = 0) -> list[str]:
        """The newest run ids first, after the ``offset`` newest."""
        return newest_run_ids(self.client, self.shards, limit, offset)

    def submitted_definitions(self) -> list[dict[str, Any]]:
        """Definitions submitted lately, most recent first (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrevrange(keys.SUBMITTED_DEFINITIONS, 0, MAX_SUBMITTED_DEFINITIONS - 1, withscores=True)
        pipe.hgetall(keys.SUBMITTED_RECORDS)
        ranked, raw = pipe.execute()
        records = {_text(k): json.loads(v) for k, v in raw.items()}
        return [
            submitted_record(_text(member), last, records[_text(member)])
            for member, last in ranked
            if _text(member) in records
        ]

    def mark_dispatch_failed(self, run_id: str, message: str) -> None:
        """Fail a run whose first tasks could not be published, with its ``run_failed`` event and ``finished_at``.

        One script (``lua/fail_dispatch.lua``), so the run never sits ``running`` nor ends without its final event.
        """
        raw = self._scripts["fail_dispatch"](keys=_ending_keys(run_id), args=[message, self.retention_s])
        reply = [_text(x) for x in raw]
        if reply[0] == "ok":
            self.client.zrem(self._deadlines(run_id), keys.deadline_member(run_id, reply[1]))

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
        """Append a run-level event to the global stream dashboards follow (``orch:events``, capped; one per bucket)."""
        stream = keys.global_events_key(self._shard(run_id))
        fields = ("run_id", run_id, "type", event_type, "workflow", workflow)
        # ``self._announce(self.client, …)``'s command, in a lean round trip.
        run_command(self.client, "XADD", stream, "MAXLEN", "~", self._announced_maxlen, "*", *fields)

    def _announce(self, client: Any, run_id: str, event_type: str, workflow: str) -> Any:
        """:meth:`announce` on ``client``, a client or a pipeline (``lua/finish.lua`` writes a run's end alike)."""
        return client.xadd(
            keys.global_events_key(self._shard(run_id)),
            {"run_id": run_id, "type": event_type, "workflow": workflow},
            maxlen=self._announced_maxlen,
        )

    @property
    def _announced_maxlen(self) -> int:
        """The global stream's cap, per bucket."""
        return GLOBAL_EVENTS_MAXLEN // max(1, self.shards)

    def try_sweeper_lock(self, owner: str, ttl_s: float) -> bool:
        """Take the cluster-wide sweeper turn for ``ttl_s`` (one worker sweeps per interval)."""
        return bool(self.client.set(keys.sweeper_lock_key(None), owner, nx=True, px=max(1, int(ttl_s * 1000))))
