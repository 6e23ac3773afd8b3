#!/usr/bin/env python3
"""Recovery after a worker SIGKILL (kill to step running again, median of reps) and Redis commands per second while
healthy, at the default lease and sweep settings.

Everything runs on this machine: a private ``redis-server`` and ``--workers`` real Celery workers (prefork,
``--concurrency`` slots each) importing ``scripts.steps.recovery``. Two measurements:

1. Healthy traffic: ``--steps`` runs of one long step (a sleep) run at once, nothing is killed; Redis's
   ``INFO commandstats`` (every command, those run inside Lua scripts included) is reset once they all run and read
   ``--window`` seconds later. The Celery workers' own traffic (their ``BRPOP`` loops, events, pidbox) is in the total,
   the same before and after a change; the per-command figures show what moved.
2. Recovery, ``--reps`` times: a run of one long step starts; ``--kill-after`` seconds into it (an LLM call or a
   tool that has been running a while; 0 kills it as soon as it starts) its whole worker (main process and pool
   children) is SIGKILLed; the figure is the time from the kill to the step's next ``step_started`` event, on a
   surviving worker. A new worker then takes the dead one's place.

::

    python -m scripts.bench_recovery            # 3 recoveries, a 20 s traffic window
    python -m scripts.bench_recovery --quick    # 3 recoveries, a 10 s window
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # `python scripts/bench_recovery.py`: run as a module
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, [sys.executable, "-m", "scripts.bench_recovery", *sys.argv[1:]])

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import redis
from celery import Celery

import scripts.steps.recovery  # noqa: F401  (registers the step function here too, for the client's validation)
from orchestrator import Client, Settings
from orchestrator.dev.local_workers import LocalWorkers
from scripts.harness import cli
from scripts.harness.lifecycle import private_redis, run_main
from scripts.harness.report import write_results
from scripts.harness.stats import median
from scripts.steps.recovery import pids_key

T = TypeVar("T")
STEP = "long"


@dataclass(frozen=True)
class RecoveryConfig:
    """One session: ``workers`` x ``concurrency`` slots, ``steps`` long steps while healthy, ``reps`` recoveries."""

    workers: int = 2
    concurrency: int = 2
    steps: int = 4
    window_s: float = 20.0
    reps: int = 3
    kill_after_s: float = 5.0
    loglevel: str = "WARNING"


def spec(seconds: float) -> dict[str, Any]:
    """A run of one long step."""
    step = {"name": STEP, "uses": "python", "with": {"function": "recovery.pid_sleep", "args": {"seconds": seconds}}}
    return {"name": "recovery", "steps": [step]}


def wait_until(condition: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``condition`` until it is truthy; raises ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        time.sleep(0.02)
    return value


def healthy_traffic(client: Client, raw: redis.Redis, config: RecoveryConfig) -> dict[str, Any]:
    """Commands per second while ``config.steps`` long steps run and nothing dies."""
    runs = [client.submit(spec(config.window_s + 60), {}) for _ in range(config.steps)]
    wait_until(lambda: all(raw.llen(pids_key(r)) for r in runs), 180, "every long step to start")
    raw.config_resetstat()
    started = time.monotonic()
    time.sleep(config.window_s)  # the measurement window itself, not a synchronisation
    stats = raw.info("commandstats")
    elapsed = time.monotonic() - started
    for run_id in runs:
        client.cancel(run_id)
    per_command = {name.removeprefix("cmdstat_"): row["calls"] / elapsed for name, row in stats.items()}
    return {
        "running_steps": config.steps,
        "window_s": round(elapsed, 2),
        "commands_per_s": round(sum(per_command.values()), 2),
        "by_command_per_s": {k: round(v, 3) for k, v in sorted(per_command.items(), key=lambda kv: -kv[1])},
    }


def one_recovery(client: Client, raw: redis.Redis, pool: LocalWorkers, index: int, kill_after_s: float) -> float:
    """Kill the worker running a long step; seconds until the step runs again elsewhere."""
    run_id = client.submit(spec(120), {})
    first: Any = wait_until(lambda: raw.lindex(pids_key(run_id), 0), 300, "the step to start")
    pid = int(first)
    wait_until(lambda: any(pid in pool.pool_children(n) for n in pool.processes), 10, "the step's worker")
    (victim,) = [name for name in pool.processes if pid in pool.pool_children(name)]
    started = min(e.ts for e in client.store.events(run_id) if e.type == "step_started")
    time.sleep(max(0.0, started + kill_after_s - time.time()))  # the step's age at the kill, by design
    killed = time.time()
    pool.kill(victim)
    del pool.processes[victim]
    wait_until(lambda: raw.llen(pids_key(run_id)) >= 2, 300, "the step to run again")
    restarted = [e for e in client.store.events(run_id) if e.type == "step_started" and e.attempt == 2]
    client.cancel(run_id)
    recovered = restarted[0].ts - killed
    # A new worker takes the dead one's place before the next kill (a busy machine can take minutes to start one).
    pool.wait_ready([pool.start_one(index)], timeout=300)
    print(f"  worker SIGKILL -> step running again: {recovered:.2f} s", flush=True)
    return recovered


def measure(config: RecoveryConfig, redis_url: str) -> dict[str, Any]:
    """Both measurements on the (empty, private) Redis at ``redis_url``."""
    client = Client(Settings.from_env({"REDIS_URL": redis_url}))
    raw = redis.Redis.from_url(redis_url)
    control = Celery("recovery-control", broker=redis_url)
    pool = LocalWorkers(
        control,
        count=config.workers,
        concurrency=config.concurrency,
        env={"REDIS_URL": redis_url, "ORCH_IMPORTS": "scripts.steps.recovery"},
        loglevel=config.loglevel,
    )
    try:
        pool.start(timeout=300)
        traffic = healthy_traffic(client, raw, config)
        print(f"  healthy: {traffic['commands_per_s']:.1f} commands/s", flush=True)
        recoveries = [
            one_recovery(client, raw, pool, config.workers + 1 + i, config.kill_after_s) for i in range(config.reps)
        ]
    finally:
        pool.stop()
        control.close()
    settings = Settings.from_env({})
    return {
        "healthy": traffic,
        "recovery_s": [round(r, 2) for r in recoveries],
        "recovery_median_s": round(median(recoveries), 2),
        "kill_after_s": config.kill_after_s,
        "lease_s": settings.lease_s,
        "sweep_interval_s": settings.sweep_interval_s,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    defaults = RecoveryConfig()
    parser = cli.parser(__doc__, name="bench_recovery", quick="a 10 s traffic window")
    cli.add_workers(parser, workers=defaults.workers, concurrency=defaults.concurrency, pool=None)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="long steps running while healthy")
    parser.add_argument("--window", type=float, default=defaults.window_s, help="seconds of healthy traffic read")
    parser.add_argument("--reps", type=int, default=defaults.reps, help="recoveries measured (median reported)")
    parser.add_argument(
        "--kill-after", type=float, default=defaults.kill_after_s, help="the step's age when its worker is killed"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = RecoveryConfig(
        workers=args.workers,
        concurrency=args.concurrency,
        steps=args.steps,
        window_s=10.0 if args.quick else args.window,
        reps=max(1, args.reps),
        kill_after_s=max(0.0, args.kill_after),
        loglevel=args.loglevel,
    )

    def session() -> int:
        with private_redis() as server:
            results = measure(config, server.url)
        healthy = results["healthy"]
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(healthy["by_command_per_s"].items())[:8])
        print(
            f"healthy: {healthy['commands_per_s']:.1f} Redis commands/s with {healthy['running_steps']} long steps "
            f"running ({top})"
        )
        print(
            f"worker SIGKILL -> step running again: median {results['recovery_median_s']:.2f} s of "
            f"{results['recovery_s']} (killed {results['kill_after_s']:g} s into the step; lease "
            f"{results['lease_s']:g} s, sweep every {results['sweep_interval_s']:g} s)"
        )
        write_results(
            args.json, {**results, "config": asdict(config), "command": cli.command("scripts.bench_recovery", argv)}
        )
        return 0

    return run_main(session)


if __name__ == "__main__":
    sys.exit(main())
