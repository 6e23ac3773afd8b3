"""Microbenchmark: client CPU per Redis round trip, redis-py's pipeline and script call against the lean round trip.

Usage::

    python -m scripts.bench_roundtrip [--quick] [--batches 40] [--per-batch 300] [--threads 1] [--json PATH]

A private ``redis-server`` (random port) and a client on the store's own pool (``blocking_pool``, 100 connections).
Each way sends a claim-like round trip (``EVALSHA`` of a one-line script with two keys, and a ``ZADD``; or one
``EVALSHA`` alone for the script calls) ``--per-batch`` times per batch; the ways take turns batch by batch, so a
noisy neighbour hits them alike, and each reports the median (and quartiles) over ``--batches`` batches of this
process's CPU (``time.process_time``, user and system) per round trip. ``raw`` is the floor: the same commands packed
by redis-py's connection, sent and read by hand on a pooled connection, with no error handling at all. ``lean,
Python's timeout`` is the lean round trip on a pool whose sockets keep Python's timeout (a poll before each send and
read), as the store's did before its pools took the timeout to the kernel (:mod:`orchestrator.infra.redis_pool`). With
``--threads N`` every batch runs on N threads at once (the store's pool of 100 connections shared, as in a threads
worker), so the GIL's hand-overs count too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from orchestrator.infra.redis_roundtrip import execute, run_script
from orchestrator.infra.redis_url import blocking_pool
from scripts.harness.cli import command, parser
from scripts.harness.lifecycle import private_redis, run_main
from scripts.harness.report import print_table, write_results
from scripts.harness.stats import median, percentile

SCRIPT = "return 1"


def _ways(client: redis.Redis, polled: redis.Redis) -> dict[str, Callable[[], Any]]:
    pool: Any = client.connection_pool
    script = client.register_script(SCRIPT)
    client.script_load(SCRIPT)
    claim = ("EVALSHA", script.sha, 2, "bench:a", "bench:b", "x", "y", 3)

    def queued(on: redis.Redis = client) -> Any:
        pipe = on.pipeline(transaction=False)
        pipe.execute_command(*claim)  # type: ignore[no-untyped-call]
        pipe.zadd("bench:z", {"m": 1.0})
        return pipe

    def raw() -> None:
        conn = pool.get_connection()
        conn.send_packed_command(conn.pack_commands([claim, ("ZADD", "bench:z", 1.0, "m")]))
        conn.read_response()
        conn.read_response()
        pool.release(conn)

    return {
        "pipeline.execute": lambda: queued().execute(),
        "lean execute": lambda: execute(queued()),
        "lean, Python's timeout": lambda: execute(queued(polled)),
        "raw send/read": raw,
        "Script()": lambda: script(keys=["bench:a", "bench:b"], args=["x", "y", 3]),
        "lean run_script": lambda: run_script(client, script, ["bench:a", "bench:b"], ["x", "y", 3]),
    }


def _batch(way: Callable[[], Any], per_batch: int, threads: int) -> float:
    """CPU seconds per round trip of one batch (``per_batch`` round trips on each of ``threads`` threads)."""

    def run() -> None:
        for _ in range(per_batch):
            way()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    started = time.process_time()
    if threads == 1:
        run()
    else:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    return (time.process_time() - started) / (per_batch * threads)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    ap = parser(__doc__, name="bench_roundtrip", quick="10 batches of 100")
    ap.add_argument("--batches", type=int, default=40, help="batches per way (default 40)")
    ap.add_argument("--per-batch", type=int, default=300, help="round trips per batch and thread (default 300)")
    ap.add_argument("--threads", type=int, default=1, help="threads running each batch at once (default 1)")
    args = ap.parse_args(argv)
    batches, per_batch = (10, 100) if args.quick else (args.batches, args.per_batch)

    def body() -> int:
        with private_redis() as server:
            pool = blocking_pool(server.url, max_connections=100, timeout=30, socket_timeout=30)
            client = redis.Redis(connection_pool=pool)
            # The same pool with the timeout left to Python, as before the store's pools took it to the kernel: a
            # poll before every send and every read.
            old = blocking_pool(server.url, max_connections=100, timeout=30, socket_timeout=30)
            old.connection_kwargs.update(socket_timeout=30, kernel_timeout=None)
            ways = _ways(client, redis.Redis(connection_pool=old))
            for way in ways.values():  # connections made, code warm
                _batch(way, 50, args.threads)
            samples: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(batches):
                for name, way in ways.items():
                    samples[name].append(_batch(way, per_batch, args.threads) * 1e6)
            pool.disconnect()
            old.disconnect()
        results = {
            name: {"median_us": median(us), "p25_us": percentile(us, 0.25), "p75_us": percentile(us, 0.75)}
            for name, us in samples.items()
        }
        print(f"client CPU per round trip, {args.threads} thread(s), median of {batches} batches of {per_batch}:")
        rows = [["way", "median us", "p25", "p75"]]
        rows += [[n, f"{r['median_us']:.1f}", f"{r['p25_us']:.1f}", f"{r['p75_us']:.1f}"] for n, r in results.items()]
        print_table(rows)
        write_results(
            args.json,
            {"command": command("scripts.bench_roundtrip", argv), "threads": args.threads, "ways": results},
        )
        return 0

    return run_main(body, stopped="Redis")


if __name__ == "__main__":
    raise SystemExit(main())
