"""What a finished run keeps in Redis, per step, beyond its steps' own output JSON (``MEMORY USAGE`` per key).

The figure issue 17 tracks: a finished run's keys (its hash, its large values, event stream, reply cache and notes)
cost what the outputs cost plus an overhead per step; the overhead is what the engine adds. Step outputs are the
``s:STEP:output`` fields of the run (in its hash, or among its large values once it ended: ``lua/_ended.lua``),
counted at their JSON length.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import redis

from orchestrator.state import keys
from orchestrator.state.redis.core import LARGE_MARK, unpack_large

RUN_KEYS: dict[str, Callable[[str], str]] = {
    "run_hash": keys.run_key,
    "large_values": keys.large_values_key,
    "events_stream": keys.events_key,
    "reply_cache": keys.llm_run_cache_key,
    "notes": keys.notes_key,
}
"""The keys a finished run keeps, by the label the benchmarks report them under."""


def finished_run_bytes(stats: redis.Redis, run_ids: Sequence[str]) -> dict[str, Any]:
    """Bytes per finished step of the runs' keys (``MEMORY USAGE ... SAMPLES 0``), with the outputs taken out.

    Returns ``bytes_per_step_beyond_output`` (the figure), ``bytes_per_step_by_key``, ``output_json_bytes_per_step``,
    ``bytes_per_run``, ``steps_per_run``, ``events_per_step`` and ``hash_bytes_per_step_by_field`` (the run's
    field names and values, in its hash or among its large values, by step field suffix or run field name, before
    Redis's own overhead).
    """
    by_key: Counter[str] = Counter()
    by_field: Counter[str] = Counter()
    outputs = steps = events = 0
    for start in range(0, len(run_ids), 100):
        chunk = run_ids[start : start + 100]
        pipe = stats.pipeline(transaction=False)
        for run_id in chunk:
            for key_of in RUN_KEYS.values():
                pipe.memory_usage(key_of(run_id), samples=0)
            pipe.hgetall(keys.run_key(run_id))
            pipe.get(keys.large_values_key(run_id))
            pipe.xlen(keys.events_key(run_id))
        replies = iter(pipe.execute())
        for _run_id in chunk:
            for label in RUN_KEYS:
                by_key[label] += int(next(replies) or 0)
            fields: dict[Any, Any] = {_text(k): v for k, v in next(replies).items()}
            large = next(replies)
            if fields.pop(LARGE_MARK, None) is not None and large is not None:
                fields = {**unpack_large(large)[1], **fields}
            events += int(next(replies) or 0)
            for name, value in fields.items():
                text, size = _text(name), len(_bytes(name)) + len(_bytes(value))
                if text.startswith("s:"):
                    suffix = text.rsplit(":", 1)[1]
                    by_field[f"s:*:{suffix}"] += size
                    steps += suffix == "status"
                    outputs += len(_bytes(value)) if suffix == "output" else 0
                else:
                    by_field[text] += size
    per = max(1, steps)
    total = sum(by_key.values())
    return {
        "runs": len(run_ids),
        "steps_per_run": round(steps / max(1, len(run_ids)), 2),
        "bytes_per_run": round(total / max(1, len(run_ids))),
        "bytes_per_step_beyond_output": round((total - outputs) / per),
        "output_json_bytes_per_step": round(outputs / per),
        "bytes_per_step_by_key": {label: round(n / per) for label, n in by_key.items()},
        "events_per_step": round(events / per, 2),
        "hash_bytes_per_step_by_field": {name: round(n / per, 1) for name, n in by_field.most_common()},
    }


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def print_footprint(footprint: dict[str, Any], commands_per_step: dict[str, float]) -> None:
    """The lines the benchmarks print for :func:`finished_run_bytes` and commandstats per step."""
    print(
        f"  a finished step keeps {footprint['bytes_per_step_beyond_output']} B of Redis beyond its output's "
        f"{footprint['output_json_bytes_per_step']} B of JSON ({footprint['bytes_per_run']} B per run of "
        f"{footprint['steps_per_run']} steps, {footprint['runs']} sampled); by key, per step: "
        f"{footprint['bytes_per_step_by_key']}; {footprint['events_per_step']} events per step"
    )
    fields = ", ".join(f"{name} {n}" for name, n in list(footprint["hash_bytes_per_step_by_field"].items())[:12])
    print(f"  run hash fields, bytes per step (name + value): {fields}")
    if not commands_per_step:
        return
    top = ", ".join(f"{name} {n}" for name, n in list(commands_per_step.items())[:12])
    print(f"  commands per step by name (commandstats, inside Lua included): {top}")
