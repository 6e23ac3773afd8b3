"""Every Redis key name, built in one place.

A run's state lives in one hash whose name carries the run id as a hash tag (``orch:{RUN}``), so the whole run sits
on one Redis Cluster slot and every transition is a single-key Lua script. Fields of a step are ``s:STEP:FIELD``
(step names are identifiers, so the colon is unambiguous).

The global indices (leases, deadlines, approvals, runs, the global event stream, the sweeper's turn) are one key each
on a single Redis. With ``ORCH_SHARDS=N`` above 1 each is split into N buckets: bucket K of every index shares the hash
tag :func:`shard_tag` (``{shard-K-J}``), and a run's entries go to bucket :func:`shard_of` (its run id's CRC-32 mod N),
so in a Redis Cluster the indices' load spreads over the slots of N tags instead of one hot slot. ``shard`` below is a
bucket's tag, or ``None`` for the single-bucket names, which are exactly those of a store without shards.
"""

from __future__ import annotations

import functools
import itertools
import zlib

from redis.crc import key_slot

PREFIX = "orch"
LEASES = f"{PREFIX}:leases"
DEADLINES = f"{PREFIX}:deadlines"
APPROVALS = f"{PREFIX}:approvals"
RUNS_INDEX = f"{PREFIX}:runs"
SWEEPER_LOCK = f"{PREFIX}:sweeper:lock"
# Processes running attempts: owner id -> until when it is known alive (a sorted set, refreshed by its heartbeat).
OWNERS = f"{PREFIX}:owners"
# Sweeper processes (``ORCH_SHARDS`` above 1): owner id -> until when it is known alive; each holds its share of the
# buckets (:func:`sweeper_lock_key`).
SWEEPERS = f"{PREFIX}:sweepers"
# Workers and their slots (``HOSTNAME CONCURRENCY``) -> until when each is known alive (a sorted set, refreshed by its
# sweeper bootstep): how wide a fan-out must be before it is sent in batches (:mod:`orchestrator.engine.batches`).
WORKER_SLOTS = f"{PREFIX}:worker_slots"
EVENTS = f"{PREFIX}:events"
# Definitions submitted lately (``orchestrator workflows``): hash -> last submitted (a sorted set) and hash -> its
# name, version and first submit (a hash); one hash tag, so one script keeps both.
SUBMITTED_DEFINITIONS = f"{PREFIX}:{{defs}}:submitted"
SUBMITTED_RECORDS = f"{PREFIX}:{{defs}}:records"


SLOTS = 16384
"""Hash slots of a Redis Cluster."""


def shard_of(run_id: str, shards: int) -> str | None:
    """The tag of the global indices' bucket holding ``run_id``'s entries (``None``: the indices are not split)."""
    return None if shards <= 1 else shard_tag(zlib.crc32(run_id.encode()) % shards, shards)


def all_shards(shards: int) -> list[str | None]:
    """The tag of every bucket of the global indices, for sweeps and listings that read them all."""
    return [None] if shards <= 1 else [shard_tag(k, shards) for k in range(shards)]


@functools.cache
def shard_tag(shard: int, shards: int) -> str:
    """The hash tag of bucket ``shard`` of ``shards``: ``shard-K-J``, the first ``J`` whose slot lies in the K-th of
    ``shards`` equal slot ranges.

    Tags named ``shard-K`` alone land where CRC16 puts them (12 of them fell 7, 3 and 2 on three masters); these are
    spread evenly over the slots, so on a cluster whose masters hold contiguous equal ranges (what ``redis-cli
    --cluster create`` makes) each master gets its share of buckets.
    """
    low, high = shard * SLOTS // shards, (shard + 1) * SLOTS // shards
    for attempt in itertools.count():
        tag = f"shard-{shard}-{attempt}"
        if low <= key_slot(tag.encode()) < high:
            return tag
    raise AssertionError("unreachable")


def _sharded(name: str, shard: str | None) -> str:
    return f"{PREFIX}:{name}" if shard is None else f"{PREFIX}:{{{shard}}}:{name}"


def leases_key(shard: str | None) -> str:
    """The lease index (members :func:`lease_member`, scored by expiry) of one bucket."""
    return _sharded("leases", shard)


def deadlines_key(shard: str | None) -> str:
    """The workflow deadline index (members :func:`deadline_member`) of one bucket."""
    return _sharded("deadlines", shard)


def approvals_key(shard: str | None) -> str:
    """The approval timeout index (members :func:`approval_member`) of one bucket."""
    return _sharded("approvals", shard)


def runs_index_key(shard: str | None) -> str:
    """The runs index (run ids scored by creation time) of one bucket."""
    return _sharded("runs", shard)


def global_events_key(shard: str | None) -> str:
    """The capped stream of run-level events dashboards follow, of one bucket."""
    return _sharded("events", shard)


def sweeper_lock_key(shard: str | None) -> str:
    """The sweeper's turn (one bucket), or with ``ORCH_SHARDS`` above 1 a sweeper's hold on one bucket: whoever holds it
    sweeps that bucket."""
    return _sharded("sweeper:lock", shard)


def run_key(run_id: str) -> str:
    """The hash holding a run and all of its steps."""
    return f"{PREFIX}:{{{run_id}}}"


def events_key(run_id: str) -> str:
    """The run's event stream (same hash tag as the run: one slot, one script can write both)."""
    return f"{PREFIX}:{{{run_id}}}:events"


def large_values_key(run_id: str) -> str:
    """An ended run's values too long for a compact hash (its steps' outputs, mostly), packed in one string (same
    hash tag as the run; see ``lua/_ended.lua``)."""
    return f"{PREFIX}:{{{run_id}}}:large"


def definition_key(definition_hash: str) -> str:
    """A workflow definition, stored by hash so any worker executes exactly what was submitted."""
    return f"{PREFIX}:def:{definition_hash}"


def idempotency_key(key: str) -> str:
    """Maps a producer's idempotency key to the run it created."""
    return f"{PREFIX}:idem:{key}"


def step_field(step: str, field: str) -> str:
    """A step's field inside the run hash."""
    return f"{step_prefix(step)}{field}"


def step_prefix(step: str) -> str:
    """What every field of ``step`` starts with: ``step_field(step, f) == step_prefix(step) + f``."""
    return f"s:{step}:"


def items_key(run_id: str, step: str) -> str:
    """The hash holding a map step's items (fields ``INDEX:FIELD``; same hash tag as the run)."""
    return f"{PREFIX}:{{{run_id}}}:items:{step}"


ITEM_SEPARATOR = "#"
"""Joins a step name and an item index where the lease index names an item (``STEP#INDEX``)."""


def item_unit(step: str, index: int | None) -> str:
    """What the lease index and the lease keeper call a unit of work: the step, or ``STEP#INDEX`` for an item."""
    return step if index is None else f"{step}{ITEM_SEPARATOR}{index}"


def parse_item_unit(unit: str) -> tuple[str, int | None]:
    """Split :func:`item_unit`'s result into the step and the item index (``None`` for a step)."""
    step, sep, index = unit.partition(ITEM_SEPARATOR)
    return (step, int(index)) if sep else (step, None)


def lease_member(run_id: str, step: str, task_id: str) -> str:
    """A running attempt in the lease index."""
    return f"{run_id}|{step}|{task_id}"


def parse_lease_member(member: str) -> tuple[str, str, str]:
    """Split a lease index member into run id, step and task id."""
    run_id, step, task_id = member.split("|", 2)
    return run_id, step, task_id


def owned_key(owner: str) -> str:
    """The set of lease index members (attempts) that the process ``owner`` runs and keeps alive by its heartbeat."""
    return f"{PREFIX}:owned:{{{owner}}}"


def deadline_member(run_id: str, generation: str) -> str:
    """A generation's workflow deadline in the deadline index."""
    return f"{run_id}|{generation}"


def approval_member(run_id: str, generation: str, step: str) -> str:
    """An approval wait's timeout in the approval index (set for one generation: it decides no other)."""
    return f"{run_id}|{generation}|{step}"


def llm_limiter_key(model: str) -> str:
    """A model's cluster-wide rate-limit buckets and cool-down (hash-tagged by model)."""
    return f"{PREFIX}:llm:{{{model}}}"


def llm_booking_key(model: str, caller: str) -> str:
    """A caller's booked place in a model's rate limit (same slot as the limiter)."""
    return f"{PREFIX}:llm:{{{model}}}:booked:{caller}"


def llm_run_cache_key(run_id: str) -> str:
    """LLM replies cached for one run, by request digest (same slot as the run)."""
    return f"{PREFIX}:{{{run_id}}}:llm"


def agent_journal_key(run_id: str, step: str) -> str:
    """An agent step's journal of turns and tool calls, by entry id (same slot as the run)."""
    return f"{PREFIX}:{{{run_id}}}:agent:{step}"


def notes_key(run_id: str) -> str:
    """The run's notes, the blackboard its agents share (``notes.read`` / ``notes.write``; same slot as the run)."""
    return f"{PREFIX}:{{{run_id}}}:notes"


def llm_shared_cache_key(digest: str) -> str:
    """An LLM reply cached across runs (opt-in), by request digest."""
    return f"{PREFIX}:llmcache:{digest}"


def deltas_channel(run_id: str) -> str:
    """The pub/sub channel of a run's ``llm_delta`` and ``llm_reset`` events (never stored; same slot as the run)."""
    return f"{PREFIX}:{{{run_id}}}:deltas"


def stream_texts_key(run_id: str) -> str:
    """The set of the run's step attempts streaming now (members ``STEP|INDEX|ATTEMPT``, INDEX ``-`` when none)."""
    return f"{PREFIX}:{{{run_id}}}:texts"


def stream_text_key(run_id: str, member: str) -> str:
    """The text streamed so far by the step attempt ``member`` of :func:`stream_texts_key` names."""
    return f"{PREFIX}:{{{run_id}}}:text:{member}"
