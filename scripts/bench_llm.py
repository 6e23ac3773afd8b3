#!/usr/bin/env python3
"""LLM economics under load: a provider that pushes back, and workers that die at the worst moment.

Phases (each on a private Redis, 4 worker processes, and a local Messages API served by
``orchestrator.dev.offline_server`` that answers 429 with ``retry-after`` beyond ``--rpm`` requests a minute):

1. ``alone``: no shared limiter, no shared cool-down; each task retries its own 429s.
2. ``shared``: the cluster-wide limiter (``ORCH_LLM_LIMITS`` at the provider's rpm) and the shared cool-down.
   Both run ``--steps`` LLM steps (runs of 30 parallel steps, distinct prompts); reported: 429s the provider sent,
   total time, steps failed, attempts and deferrals.
3. ``after-reply``: no rate limit; pool processes SIGKILL themselves right after a reply is stored, before the step
   is recorded (probability ``--kill-probability``), and each run ends with a step that fails once, so every run is
   resumed. Reported: paid calls (replies the provider billed) ÷ needed calls (distinct requests): must be 1.00.
4. ``kill-workers``: the same runs while whole workers are SIGKILLed and restarted every ``--kill-every`` seconds.
   A worker killed mid-call has been billed for that call (as by a real provider); ``lost`` counts those the
   provider saw the caller vanish for. Replies that reached a worker must still never be paid twice.

    python -m scripts.bench_llm            # the issue's figures: 300 steps at 60 rpm (about 10 min)
    python -m scripts.bench_llm --quick    # 30 steps per phase: one run each
    python -m scripts.bench_llm --steps 120 --rpm 60
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # `python scripts/bench_llm.py`: run as `python -m scripts.bench_llm`
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, [sys.executable, "-m", "scripts.bench_llm", *sys.argv[1:]])

import argparse
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

import redis

import scripts.steps.llm_chaos  # noqa: F401  (registers bench.fail_once, for the client's validation)
from orchestrator import Client, Settings
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.dev.offline_server import OfflineAPIServer
from scripts.harness import cli
from scripts.harness.lifecycle import private_redis, run_main, running, worker_env
from scripts.harness.report import versions, write_results
from scripts.steps.llm_chaos import KILLS_KEY

MODEL = "claude-haiku-4-5"
RUN_WIDTH = 30


QUICK_STEPS = 30


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.parser(__doc__, name="bench_llm", quick=f"{QUICK_STEPS} LLM steps in every phase (one run each)")
    cli.add_workers(parser, workers=4, concurrency=2, pool=None)
    parser.add_argument("--steps", type=int, default=None, help="LLM steps in each rate-limit phase (default 300)")
    parser.add_argument("--rpm", type=int, default=60, help="the provider's requests per minute")
    parser.add_argument("--limit-rpm", type=int, default=None, help="the shared limiter's rpm (default: --rpm)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds each LLM call takes")
    parser.add_argument("--chaos-steps", type=int, default=None, help="LLM steps in each kill phase (default 120)")
    parser.add_argument("--kill-probability", type=float, default=0.2, help="after-reply: chance a process dies")
    parser.add_argument("--kill-every", type=float, default=2.0, help="kill-workers: seconds between SIGKILLs")
    parser.add_argument("--phases", default="alone,shared,after-reply,kill-workers")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a phase may take")
    args = parser.parse_args(argv)
    args.steps = args.steps or (QUICK_STEPS if args.quick else 300)
    args.chaos_steps = args.chaos_steps or (QUICK_STEPS if args.quick else 120)
    return args


def spec(name: str, run: int, width: int, latency: float, *, fail_once: bool = False) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [
        {
            "name": f"s{i}",
            "uses": "llm",
            "with": {
                "model": MODEL,
                "prompt": f"Run {run}, question {i}: what is worth knowing about {{{{ inputs.topic }}}}?",
                "max_tokens": 200,
                "simulate": {"latency_s": latency},
            },
            "retry": {"max_attempts": 100, "backoff_s": 1.0, "backoff_max_s": 30.0},
        }
        for i in range(width)
    ]
    if fail_once:
        steps.append(
            {
                "name": "last",
                "uses": "python",
                "depends_on": [f"s{i}" for i in range(width)],
                "with": {"function": "bench.fail_once"},
            }
        )
    return {"name": name, "inputs": {"topic": {"type": "string", "default": "Redis"}}, "steps": steps}


def run_phase(args: argparse.Namespace, phase: str, redis_url: str) -> dict[str, Any]:
    chaos = phase in {"after-reply", "kill-workers"}
    total = args.chaos_steps if chaos else args.steps
    env = {
        **worker_env(redis_url, ""),
        "ANTHROPIC_API_KEY": "bench-offline-key",
        "ORCH_LEASE_S": "3",
        "ORCH_SWEEP_INTERVAL_S": "0.5",
        "ORCH_QUEUED_GRACE_S": "5",
        "ORCH_RETRY_CAP_S": "60",
        "ORCH_LLM_SHARED_COOLDOWN": "true" if phase == "shared" else "false",
        "ORCH_LLM_LIMITS": json.dumps({MODEL: {"rpm": args.limit_rpm or args.rpm}}) if phase == "shared" else "",
    }
    if chaos:
        after_reply = args.kill_probability if phase == "after-reply" else 0.0
        env.update({"ORCH_IMPORTS": "scripts.steps.llm_chaos", "BENCH_KILL_AFTER_REPLY": str(after_reply)})
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    server = OfflineAPIServer(rpm=0 if chaos else args.rpm).start()
    env["ANTHROPIC_BASE_URL"] = server.base_url
    settings = replace(Settings.from_env({"REDIS_URL": redis_url}), anthropic_api_key="bench-offline-key")
    client = Client(settings)
    pool = LocalWorkers(client.app, count=args.workers, concurrency=args.concurrency, env=env, loglevel=args.loglevel)
    with ExitStack() as stack:
        stack.callback(server.stop)
        stack.enter_context(running(pool, grace=15))
        stop_killing = threading.Event()
        node_kills = [0]
        killer = threading.Thread(target=_kill_workers, args=(pool, args.kill_every, stop_killing, node_kills))
        if phase == "kill-workers":
            killer.start()
        started = time.monotonic()
        widths = [min(RUN_WIDTH, total - start) for start in range(0, total, RUN_WIDTH)]
        runs = [
            client.submit(spec(f"bench_llm_{phase}", n, width, args.latency, fail_once=chaos))
            for n, width in enumerate(widths)
        ]
        views = [client.wait(run_id, timeout=args.timeout) for run_id in runs]
        elapsed = time.monotonic() - started
        result: dict[str, Any] = {"phase": phase, "steps": total, "seconds": round(elapsed, 2)}
        if chaos:
            billed_before_resume = server.stats()["billed"]
            for run_id in runs:
                client.resume(run_id)
            views = [client.wait(run_id, timeout=args.timeout) for run_id in runs]
            stop_killing.set()
            if killer.is_alive():
                killer.join()
            result.update(
                billed_before_resume=billed_before_resume,
                pool_process_self_kills=int(r.get(KILLS_KEY) or 0),
                worker_node_kills=node_kills[0],
            )
        stats = server.stats()
        llm_steps = [s for v in views for name, s in v["steps"].items() if name != "last"]
        result.update(
            runs_succeeded=sum(v["status"] == "succeeded" for v in views),
            runs=len(views),
            provider_429s=stats["rate_limited"],
            provider_requests=stats["requests"],
            paid_calls=stats["billed"],
            needed_calls=total,
            paid_per_needed=round(stats["billed"] / total, 4),
            paid_undelivered=stats["undelivered"],
            delivered_paid_per_needed=round((stats["billed"] - stats["undelivered"]) / total, 4),
            repaid_requests=sum(1 for n in stats["billed_by_request"].values() if n > 1),
            steps_failed=sum(s["status"] != "succeeded" for s in llm_steps),
            attempts=sum(s["attempts"] for s in llm_steps),
            deferrals=sum(s.get("deferrals", 0) for s in llm_steps),
            cost_usd=round(sum(v.get("cost", 0.0) for v in views), 6),
            attempt_errors=dict(Counter(e.get("type") for s in llm_steps for e in s["errors"])),
        )
        return result


def _kill_workers(pool: LocalWorkers, every: float, stop: threading.Event, count: list[int]) -> None:
    rng = random.Random(7)
    next_index = len(pool.processes) + 1
    while not stop.wait(every):
        name = rng.choice(list(pool.processes))
        pool.kill(name)
        del pool.processes[name]
        # A fresh node name: start_one's default (count + 1) can be a live worker's, which would orphan that worker.
        pool.wait_ready([pool.start_one(next_index)])
        next_index += 1
        count[0] += 1


def print_report(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    print(
        f"{'phase':<8} {'steps':>5} {'time s':>8} {'429s':>6} {'failed':>6} {'attempts':>8} {'deferrals':>9} "
        f"{'paid':>5} {'lost':>5} {'paid/needed':>11}"
    )
    for r in results:
        print(
            f"{r['phase']:<8} {r['steps']:>5} {r['seconds']:>8.1f} {r['provider_429s']:>6} {r['steps_failed']:>6} "
            f"{r['attempts']:>8} {r['deferrals']:>9} {r['paid_calls']:>5} {r['paid_undelivered']:>5} "
            f"{r['paid_per_needed']:>11.3f}"
        )
    print("lost: replies billed while the worker that asked was being SIGKILLed (a real provider bills them too)")
    for chaos in (r for r in results if "worker_node_kills" in r):
        in_flight = chaos["worker_node_kills"] * args.concurrency
        print(
            f"{chaos['phase']}: {chaos['pool_process_self_kills']} pool processes killed right after a paid reply, "
            f"{chaos['worker_node_kills']} whole workers killed (at most {in_flight} calls in flight in them), "
            f"{chaos['runs']} runs resumed, {chaos['runs_succeeded']} succeeded; "
            f"{chaos['paid_calls'] - chaos['needed_calls']} extra paid calls"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def measure() -> int:
        started = time.monotonic()
        with private_redis() as server:
            results = [run_phase(args, phase, server.url) for phase in args.phases.split(",")]
            meta = versions(server.url)
        print_report(args, results)
        write_results(
            args.json,
            {
                "results": results,
                "versions": meta,
                "args": vars(args),
                "command": cli.command("scripts.bench_llm", argv),
                "runtime_s": time.monotonic() - started,
            },
        )
        after = next((r for r in results if r["phase"] == "after-reply"), None)
        ok = all(r["runs_succeeded"] == r["runs"] for r in results) and (after is None or after["paid_per_needed"] == 1)
        return 0 if ok else 1

    return run_main(measure)


if __name__ == "__main__":
    sys.exit(main())
