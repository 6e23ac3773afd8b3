"""Benchmark: a 10,000-item map step of no-op items against a raw Celery ``group`` of as many no-op tasks.

Usage::

    python -m scripts.bench_map [--quick] [--items 10000] [--workers 2] [--concurrency 2] [--json PATH]
    python -m scripts.bench_map --llm-latency 1 --pool threads --concurrency 50   # 1 s offline LLM items

It starts a private ``redis-server`` and ``--workers`` real worker processes importing ``scripts.steps.bench``, so
the raw tasks run on the very same processes, app configuration and broker as the map's items. For each side it
measures the makespan (orchestrator: the run's ``created_at`` → the map step's ``finished_at``, Redis clock; raw:
publish → the last task's end, recorded by the task), the CPU seconds per item of the workers, Redis and this
client (``/proc``), the Redis commands per item (``INFO commandstats``) and the Redis bytes per item still held when
the work is done (``used_memory``; the map keeps a record per item for the run's retention, Celery keeps nothing).
``--quick`` runs 1,000 items. Results go to ``test-artifacts/bench_map.json``; the exit code is 0 unless the
benchmark itself fails.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # `python scripts/bench_map.py`: run as `python -m scripts.bench_map`
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, [sys.executable, "-m", "scripts.bench_map", *sys.argv[1:]])

import argparse
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis
from celery import group

from orchestrator import Client, Settings
from orchestrator.dev.local_workers import LocalWorkers
from scripts.harness.cli import add_workers, command, parser
from scripts.harness.lifecycle import log_dir, pool_workers, private_redis, record_dir, run_main, running, worker_env
from scripts.harness.probes import cpu_s, total_commands, used_memory, workers_cpu_s
from scripts.harness.records import RecordReader
from scripts.harness.report import fmt, print_table, ts, versions, write_results

NAME = "bench_map"


def _cpu(workers: LocalWorkers, redis_pid: int | None) -> float:
    main, children = workers_cpu_s(workers)
    return main + children + cpu_s(redis_pid) + cpu_s(os.getpid())


def _measure(
    stats: redis.Redis, workers: LocalWorkers, redis_pid: int | None, items: int, work: Callable[[], float]
) -> dict[str, Any]:
    """Run ``work`` (it returns its makespan) and what it cost per item."""
    stats.config_resetstat()
    memory, cpu = used_memory(stats), _cpu(workers, redis_pid)
    makespan = work()
    cpu_used = _cpu(workers, redis_pid) - cpu
    return {
        "makespan_s": makespan,
        "items_per_s": items / makespan,
        "cpu_ms_per_item": cpu_used * 1000 / items,
        "redis_commands_per_item": total_commands(stats) / items,
        "redis_bytes_per_item": (used_memory(stats) - memory) / items,
    }


def _map_run(client: Client, items: int, latency: float) -> float:
    step: dict[str, Any] = {"name": "m", "uses": "noop", "for_each": "inputs.xs"}
    if latency:
        # An offline LLM call answering after ``latency`` seconds; each item's prompt differs (no reply cache hit).
        prompt = {"prompt": "Item {{ item }}: one line", "max_tokens": 20, "simulate": {"latency_s": latency}}
        step = {**step, "uses": "llm", "with": prompt}
    definition = {"name": f"bench_map_{uuid.uuid4().hex[:6]}", "inputs": {"xs": {"type": "array"}}, "steps": [step]}
    run_id = client.submit(definition, {"xs": list(range(items))})
    view = client.wait(run_id, timeout=max(120.0, items / 5))
    if view["status"] != "succeeded":
        raise RuntimeError(f"map run {run_id} ended {view['status']}: {view['error']}")
    return ts(view["steps"]["m"]["finished_at"]) - ts(view["created_at"])


def _raw_group(client: Client, reader: RecordReader, items: int, latency: float) -> float:
    tag = f"map{uuid.uuid4().hex[:6]}"
    if latency:
        # The raw side waits as long as the LLM call without making one: the ratio bounds our overhead from above.
        tasks = [client.app.signature("bench.raw_sleep", args=(tag, i, latency), immutable=True) for i in range(items)]
    else:
        tasks = [client.app.signature("bench.raw_noop", args=(tag, i), immutable=True) for i in range(items)]
    start = time.time()
    group(tasks).apply_async(queue=client.settings.cpu_queue)
    records = reader.wait(tag, items, timeout=max(120.0, items / 5), poll_s=0.05)
    return max(r.end for r in records) - start


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Start Redis and the workers, run both sides (map first, then raw), return the figures."""
    items = 1000 if args.quick and args.items is None else (args.items or 10_000)
    with private_redis() as server, record_dir("bench-map-") as records:
        env = worker_env(server.url, "scripts.steps.bench", record_dir=records, ORCH_MAP_MAX_ITEMS=str(items))
        settings = Settings.from_env({**env, "ORCH_MAP_MAX_ITEMS": str(items)})
        client = Client(settings)
        stats = redis.Redis.from_url(server.url)
        reader = RecordReader(records)
        with running(pool_workers(client.app, args, env, log_dir(NAME, fresh=True)), grace=10) as workers:
            latency = args.llm_latency
            ours = _measure(stats, workers, server.pid, items, lambda: _map_run(client, items, latency))
            raw = _measure(stats, workers, server.pid, items, lambda: _raw_group(client, reader, items, latency))
        meta = versions(server.url)
    return {
        "command": command(f"scripts.{NAME}", args.argv),
        "items": items,
        "llm_latency_s": args.llm_latency,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "pool": args.pool,
        "orchestrator": ours,
        "raw_celery": raw,
        "makespan_ratio": ours["makespan_s"] / raw["makespan_s"],
        "cpu_ratio": ours["cpu_ms_per_item"] / raw["cpu_ms_per_item"],
        "versions": meta,
    }


def report(results: dict[str, Any]) -> None:
    """Print the comparison table."""
    ours, raw = results["orchestrator"], results["raw_celery"]
    rows = [["", "map step", "raw group", "ratio"]]
    for key, label in (
        ("makespan_s", "makespan s"),
        ("items_per_s", "items/s"),
        ("cpu_ms_per_item", "CPU ms/item"),
        ("redis_commands_per_item", "Redis commands/item"),
        ("redis_bytes_per_item", "Redis bytes/item kept"),
    ):
        ratio = ours[key] / raw[key] if raw[key] else None
        rows.append([label, fmt(ours[key]), fmt(raw[key]), fmt(ratio)])
    latency = results.get("llm_latency_s") or 0
    kind = f"{latency:g} s offline LLM" if latency else "no-op"
    print(f"{results['items']} {kind} items, {results['workers']} workers x {results['concurrency']} {results['pool']}")
    print_table(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, measure, report."""
    cli = parser(__doc__, name=NAME, quick="1,000 items instead of 10,000")
    add_workers(cli, workers=2, concurrency=2, pool="prefork")
    cli.add_argument("--items", type=int, default=None, help="items on each side (default 10,000)")
    cli.add_argument(
        "--llm-latency",
        type=float,
        default=0.0,
        help="items are offline LLM calls answering after this many seconds, against raw tasks sleeping as long "
        "(default 0: no-op items against raw no-ops)",
    )
    args = cli.parse_args(argv)
    args.argv = argv

    def body() -> int:
        results = measure(args)
        report(results)
        write_results(args.json, results)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
