#!/usr/bin/env python3
"""Chaos: many runs of a mixed LLM and Python workflow while whole workers are SIGKILLed and restarted.

Everything runs on this machine: a private ``redis-server``, ``--workers`` real Celery worker processes (prefork,
``--concurrency`` slots each) and the offline provider served over HTTP by
``orchestrator.dev.offline_server.OfflineAPIServer``, which counts the calls it bills per request digest. Each run
is six steps, four of them LLM calls with a simulated latency drawn from ``--latency`` and two of them Python
functions::

    outline (llm)      facts (python)
      ├── draft_a (llm)    │
      └── draft_b (llm)    │
            └──── score (python) ────┘
                    └── summary (llm)

At most ``--parallel`` runs are in flight at once. Every ``--kill-every`` seconds (±50 %), a random worker is
SIGKILLed, main process and pool children together, as an OOM kill or a lost machine would, and a new one is
started in its place; a worker that exits on its own is restarted too. With ``--redis-kill-every``, Redis itself
(append-only file, synced on every write, as in compose) is SIGKILLed as often and started again ``--redis-down``
seconds later, while the driver keeps submitting (a submit cut off by the outage is made again under the same
idempotency key). The report checks:

- every run succeeded, and none stalled (no event for ``--stall-timeout`` seconds);
- every step's output was recorded exactly once: one ``step_succeeded`` per step and generation in each run's
  event stream;
- paid LLM calls against needed ones (distinct requests): every needed request billed, and the extra calls no more
  than the calls that can have been cut off (worker kills x slots, plus every slot for each Redis kill: a reply that
  arrives while Redis is down cannot be stored). A worker killed mid-call has
  been billed for it, as by a real provider; a reply that reached a worker is stored before anything else, so it
  is never paid for again.

It exits 1 when any check fails::

    python -m scripts.chaos              # 1,000 runs
    python -m scripts.chaos --quick      # 50 runs: a smoke run, about a minute
    python -m scripts.chaos --redis-kill-every 15   # Redis SIGKILLed too, about every 15 s
    python -m scripts.chaos --cluster               # state in a 3-master Redis Cluster, a master SIGKILLed every 20 s

With ``--cluster`` the state lives in a private Redis Cluster (3 masters, 3 replicas, ``ORCH_SHARDS=12``) and the
broker in a plain Redis; ``--redis-kill-every`` (default 20 s there) then SIGKILLs a random master, whose replica takes
over, and starts the killed node again ``--redis-down`` seconds later, when it rejoins as a replica.

Workers import its two step functions from ``scripts.steps.chaos`` (``ORCH_IMPORTS=scripts.steps.chaos``).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # `python scripts/chaos.py`: run as `python -m scripts.chaos`
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, [sys.executable, "-m", "scripts.chaos", *sys.argv[1:]])

import argparse
import contextlib
import json
import random
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import kombu.exceptions
import redis
from celery import Celery

import scripts.steps.chaos  # noqa: F401  (registers the step functions here too, for the client's validation)
from orchestrator import Client, Settings
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.dev.offline_server import OfflineAPIServer
from orchestrator.dev.redis_cluster import RedisClusterServers
from orchestrator.dev.redis_server import RedisServer
from orchestrator.engine.events import Event, EventType
from orchestrator.errors import StoreUnavailableError
from orchestrator.state import keys
from scripts.harness import cli
from scripts.harness.lifecycle import private_redis, run_main
from scripts.harness.report import write_results

MODEL = "claude-haiku-4-5"
LLM_STEPS = ("outline", "draft_a", "draft_b", "summary")
PYTHON_STEPS = ("facts", "score")
# Kills are the point: a step may be lost with its worker several times, and must not run out of attempts for it.
MAX_ATTEMPTS = 20
QUICK_RUNS = 50


def workflow(run: int, rng: random.Random, latency: tuple[float, float]) -> dict[str, Any]:
    """Run ``run``'s workflow: its prompts are its own, so every run needs four distinct paid calls."""

    def llm(name: str, prompt: str, *deps: str) -> dict[str, Any]:
        return {
            "name": name,
            "uses": "llm",
            "depends_on": list(deps),
            "with": {
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": 120,
                "simulate": {"latency_s": round(rng.uniform(*latency), 3)},
            },
            "retry": {"max_attempts": MAX_ATTEMPTS},
        }

    def py(name: str, fn: str, *deps: str) -> dict[str, Any]:
        return {
            "name": name,
            "uses": "python",
            "depends_on": list(deps),
            "with": {"function": fn, "args": {"seconds": round(rng.uniform(0.02, 0.15), 3)}},
            "retry": {"max_attempts": MAX_ATTEMPTS},
        }

    steps = [
        llm("outline", "Outline an article about {{ inputs.topic }}."),
        py("facts", "chaos.facts"),
        llm("draft_a", "Draft part one from: {{ steps.outline.output.text }}", "outline"),
        llm("draft_b", "Draft part two from: {{ steps.outline.output.text }}", "outline"),
        py("score", "chaos.score", "draft_a", "draft_b", "facts"),
        llm("summary", "Summarise {{ inputs.topic }} in {{ steps.score.output.words }} words.", "score"),
    ]
    return {"name": "chaos", "inputs": {"topic": {"type": "string"}}, "steps": steps, "description": f"chaos run {run}"}


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos session.

    Attributes:
        runs: Runs to complete.
        workers: Worker processes alive at any time.
        concurrency: Prefork slots per worker.
        kill_every: Mean seconds between SIGKILLs (each interval drawn from 0.5 to 1.5 times this); 0 kills none.
        parallel: Runs in flight at once.
        latency: Simulated LLM latency range, seconds.
        stall_timeout: A run with no new event for this long is reported stuck and given up on.
        seed: Seeds the latencies and the choice of victims.
        lease_s, sweep_interval_s, queued_grace_s: The workers' ``ORCH_LEASE_S``, ``ORCH_SWEEP_INTERVAL_S`` and
            ``ORCH_QUEUED_GRACE_S``: short, so a lost step is noticed in seconds.
        log_dir: Where worker logs go (default: discarded).
        loglevel: The workers' log level.
        redis_kill_every: Mean seconds between SIGKILLs of the Redis server itself (jittered as for workers); 0 (the
            default) kills none. Needs the server, started with an append-only file synced on every write.
        redis_down_s: How long Redis stays down after each kill before it is started again from its AOF.
    """

    runs: int = 1000
    workers: int = 4
    concurrency: int = 2
    kill_every: float = 3.0
    parallel: int = 24
    latency: tuple[float, float] = (0.2, 0.5)
    stall_timeout: float = 60.0
    seed: int = 7
    lease_s: float = 3.0
    sweep_interval_s: float = 0.5
    queued_grace_s: float = 5.0
    log_dir: Path | None = None
    loglevel: str = "WARNING"
    redis_kill_every: float = 0.0
    redis_down_s: float = 2.0


@dataclass
class ChaosReport:
    """What a chaos session saw; :meth:`problems` lists what broke a promise."""

    runs: int
    seconds: float
    succeeded: int
    not_succeeded: dict[str, str] = field(default_factory=dict)
    stuck: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicate_successes: list[tuple[str, str, int, int]] = field(default_factory=list)
    missing_successes: list[tuple[str, str]] = field(default_factory=list)
    kills: int = 0
    slots_per_worker: int = 0
    killer_error: str | None = None
    needed_calls: int = 0
    paid_calls: int = 0
    distinct_paid_requests: int = 0
    repaid_requests: int = 0
    paid_undelivered: int = 0
    steps: int = 0
    attempts: int = 0
    steps_rerun: int = 0
    steps_lost: int = 0
    steps_resent: int = 0
    workers_alive: int = 0
    redis_kills: int = 0
    worker_exits: int = 0

    @property
    def in_flight_bound(self) -> int:
        """The most LLM calls that can have been cut off: one per slot per worker kill, every slot per Redis kill.

        A call whose reply arrives while Redis is down cannot be stored, so the attempt is re-run and pays again.
        """
        return (self.kills + self.redis_kills * self.workers_alive) * self.slots_per_worker

    @property
    def extra_paid_calls(self) -> int:
        """Calls paid beyond one per distinct request."""
        return self.paid_calls - self.needed_calls

    def problems(self) -> list[str]:
        """Every broken promise, in words; empty when the session passed."""
        out: list[str] = []
        if self.killer_error:
            out.append(f"the killer stopped: {self.killer_error}")
        if self.succeeded != self.runs:
            out.append(f"{self.runs - self.succeeded} of {self.runs} runs did not succeed: {self.not_succeeded}")
        if self.stuck:
            out.append(f"{len(self.stuck)} runs stalled: {json.dumps(self.stuck, default=str)}")
        if self.duplicate_successes:
            out.append(
                f"steps that succeeded more than once (run, step, generation, count): {self.duplicate_successes}"
            )
        if self.missing_successes:
            out.append(f"steps with no step_succeeded event (run, step): {self.missing_successes[:20]}")
        if self.distinct_paid_requests != self.needed_calls:
            out.append(f"{self.distinct_paid_requests} distinct requests paid for, {self.needed_calls} needed")
        if self.extra_paid_calls > self.in_flight_bound:
            out.append(
                f"{self.extra_paid_calls} extra paid calls, more than the {self.in_flight_bound} "
                "that can have been cut off by the kills"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        """Every figure, for ``--json``."""
        return {
            **asdict(self),
            "in_flight_bound": self.in_flight_bound,
            "extra_paid_calls": self.extra_paid_calls,
            "problems": self.problems(),
        }


class _Killer(threading.Thread):
    """SIGKILLs a random worker every ``every`` seconds (jittered; 0: never) and starts a new one in its place.

    It also restarts a worker that exited on its own, as compose's ``restart: unless-stopped`` would (Celery's Redis
    transport can exit a worker when its broker connection is cut at the wrong moment); ``exits`` counts those.
    """

    TICK_S = 0.5

    def __init__(self, pool: LocalWorkers, every: float, rng: random.Random) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.pool = pool
        self.every = every
        self.rng = rng
        self.kills = 0
        self.exits = 0
        self.kill_times: list[float] = []
        self.error: str | None = None
        self._stop_event = threading.Event()
        self._next_index = len(pool.processes) + 1

    def run(self) -> None:
        try:
            due = self._next_kill()
            while not self._stop_event.wait(self.TICK_S):
                for name, process in list(self.pool.processes.items()):
                    if process.poll() is not None:
                        del self.pool.processes[name]
                        self.exits += 1
                        self._replace()
                if time.monotonic() >= due:
                    victim = self.rng.choice(sorted(self.pool.processes))
                    self.pool.kill(victim)
                    self.kill_times.append(time.time())
                    del self.pool.processes[victim]
                    self.kills += 1
                    self._replace()
                    due = self._next_kill()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def _next_kill(self) -> float:
        return time.monotonic() + self.every * self.rng.uniform(0.5, 1.5) if self.every > 0 else float("inf")

    def _replace(self) -> None:
        # Distinct node names: a name reused while the dead one is still in the broker's memory confuses pings.
        replacement = self.pool.start_one(self._next_index)
        self._next_index += 1
        # It may exit while starting, or Redis may be down: the next tick sees to it.
        with contextlib.suppress(RuntimeError, OSError, redis.RedisError, kombu.exceptions.OperationalError):
            self.pool.wait_ready([replacement], timeout=120)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()


class _RedisKiller(threading.Thread):
    """SIGKILLs the Redis server every ``every`` seconds (jittered); starts it again from its AOF ``down_s`` later."""

    def __init__(self, server: RedisServer, every: float, down_s: float, rng: random.Random) -> None:
        super().__init__(name="chaos-redis-killer", daemon=True)
        self.server = server
        self.every = every
        self.down_s = down_s
        self.rng = rng
        self.kills = 0
        self.error: str | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.wait(self.every * self.rng.uniform(0.5, 1.5)):
                if self.server.pid is None:
                    raise RuntimeError("redis-server exited on its own")
                self.server.kill()  # SIGKILL, and reaped: its start below cannot find it still running
                self.kills += 1
                # The outage itself: Redis stays down this long (a wait by design, not a synchronisation).
                self._stop_event.wait(self.down_s)
                self.server.start()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()
        if self.server.pid is None:
            self.server.start()


class _MasterKiller(_RedisKiller):
    """SIGKILLs a random master of a Redis Cluster every ``every`` seconds (jittered); its replica takes over, and the
    killed node is started again ``down_s`` later, when it rejoins as a replica."""

    def __init__(self, cluster: RedisClusterServers, every: float, down_s: float, rng: random.Random) -> None:
        super().__init__(cluster.nodes[0], every, down_s, rng)
        self.cluster = cluster
        self.name = "chaos-master-killer"
        self._killed: RedisServer | None = None

    def run(self) -> None:
        try:
            while not self._stop_event.wait(self.every * self.rng.uniform(0.5, 1.5)):
                port = self.rng.choice(self.cluster.master_ports())
                self._killed = next(node for node in self.cluster.nodes if node.port == port)
                self._killed.kill()
                self.kills += 1
                self.cluster.wait_ready(timeout_s=60)
                # Down this long on purpose (a wait by design, not a synchronisation), then back as a replica.
                self._stop_event.wait(self.down_s)
                self._killed.start()
                self._killed = None
                self.cluster.wait_ready(timeout_s=60)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()
        if self._killed is not None and self._killed.pid is None:
            self._killed.start()


def worker_env(config: ChaosConfig, redis_url: str, provider_url: str, broker_url: str | None = None) -> dict[str, str]:
    """The environment of the chaos workers."""
    return {
        **({"ORCH_BROKER_URL": broker_url, "ORCH_SHARDS": "12"} if broker_url else {}),
        "REDIS_URL": redis_url,
        "ORCH_IMPORTS": "scripts.steps.chaos",
        "ANTHROPIC_API_KEY": "chaos-offline-key",
        "ANTHROPIC_BASE_URL": provider_url,
        "ORCH_LEASE_S": str(config.lease_s),
        "ORCH_SWEEP_INTERVAL_S": str(config.sweep_interval_s),
        "ORCH_QUEUED_GRACE_S": str(config.queued_grace_s),
        "ORCH_RETRY_CAP_S": "10",
    }


def run_chaos(
    config: ChaosConfig,
    redis_url: str,
    *,
    server: RedisServer | None = None,
    progress: bool = False,
    cluster: RedisClusterServers | None = None,
    broker_url: str | None = None,
) -> ChaosReport:
    """Run a chaos session on the (empty, private) Redis at ``redis_url`` and check what it left behind.

    With ``cluster`` (whose URL ``redis_url`` is) and ``broker_url``, ``redis_kill_every`` kills masters of the cluster.

    Raises:
        ValueError: ``redis_kill_every`` without the ``server`` or ``cluster`` to kill.
    """
    if config.redis_kill_every > 0 and server is None and cluster is None:
        raise ValueError("killing Redis needs the RedisServer it runs as")
    rng = random.Random(config.seed)
    # The client holds the roots it submits for ORCH_QUEUED_GRACE_S, as workers hold the steps they release: with the
    # default (300 s) a root message lost to a kill right after the submit waited 5 minutes, far past the stall timeout.
    env = worker_env(config, redis_url, "", broker_url)
    client_env = {k: v for k, v in env.items() if k in {"REDIS_URL", "ORCH_BROKER_URL", "ORCH_SHARDS"}}
    client = Client(Settings.from_env({**client_env, "ORCH_QUEUED_GRACE_S": str(config.queued_grace_s)}))
    with ExitStack() as stack:
        provider = OfflineAPIServer().start()
        stack.callback(provider.stop)
        # Pings for the workers go through their own app: the killer thread must not share the client's connections.
        control = Celery("chaos-control", broker=broker_url or redis_url)
        stack.callback(control.close)
        pool = LocalWorkers(
            control,
            count=config.workers,
            concurrency=config.concurrency,
            env=worker_env(config, redis_url, provider.base_url, broker_url),
            loglevel=config.loglevel,
            log_dir=config.log_dir,
        )
        stack.callback(pool.stop)
        # Several minutes: on a 2-core machine busy with other work, three workers importing everything take long.
        pool.start(timeout=300)
        killer = _Killer(pool, config.kill_every, random.Random(config.seed + 1))
        killer.start()
        stack.callback(killer.stop)
        redis_killer: _RedisKiller | None = None
        if cluster is not None and config.redis_kill_every > 0:
            redis_killer = _MasterKiller(
                cluster, config.redis_kill_every, config.redis_down_s, random.Random(config.seed + 2)
            )
            redis_killer.start()
            stack.callback(redis_killer.stop)
        elif server is not None and config.redis_kill_every > 0:
            redis_killer = _RedisKiller(
                server, config.redis_kill_every, config.redis_down_s, random.Random(config.seed + 2)
            )
            redis_killer.start()
            stack.callback(redis_killer.stop)
        started = time.monotonic()
        run_ids, stuck = _drive(client, config, rng, progress=progress, killer=killer, redis_killer=redis_killer)
        seconds = time.monotonic() - started
        if redis_killer is not None:
            redis_killer.stop()
        killer.stop()
        stats = provider.stats()
    errors = [e for e in (killer.error, redis_killer and redis_killer.error) if e]
    report = ChaosReport(
        runs=config.runs,
        seconds=round(seconds, 2),
        succeeded=0,
        kills=killer.kills,
        slots_per_worker=config.concurrency,
        killer_error="; ".join(errors) or None,
        stuck=stuck,
        workers_alive=config.workers,
        redis_kills=redis_killer.kills if redis_killer else 0,
        worker_exits=killer.exits,
    )
    _check_runs(client, run_ids, report)
    report.needed_calls = config.runs * len(LLM_STEPS)
    report.paid_calls = stats["billed"]
    report.distinct_paid_requests = len(stats["billed_by_request"])
    report.repaid_requests = sum(1 for n in stats["billed_by_request"].values() if n > 1)
    report.paid_undelivered = stats["undelivered"]
    return report


# What the driver waits out while Redis is down: it submits again with the same idempotency key, and polls again.
_OUTAGE = (StoreUnavailableError, redis.RedisError, kombu.exceptions.OperationalError)


def _drive(
    client: Client,
    config: ChaosConfig,
    rng: random.Random,
    *,
    progress: bool,
    killer: _Killer,
    redis_killer: _RedisKiller | None = None,
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Keep ``parallel`` runs going until ``runs`` have ended (or stalled); returns every run id and the stuck ones."""
    run_ids: list[str] = []
    specs: list[dict[str, Any]] = []
    in_flight: dict[str, tuple[int, float]] = {}  # run id -> (last seq seen, when it last moved)
    stuck: dict[str, dict[str, Any]] = {}
    ended = 0
    last_print = time.monotonic()
    while len(run_ids) < config.runs or in_flight:
        try:
            while len(run_ids) < config.runs and len(in_flight) < config.parallel:
                n = len(run_ids)
                if len(specs) == n:
                    specs.append(workflow(n, rng, config.latency))
                # A submit cut off by an outage is made again with the same key: it returns the run it created, if any.
                run_id = client.submit(specs[n], {"topic": f"topic {n}"}, idempotency_key=f"chaos-{config.seed}-{n}")
                run_ids.append(run_id)
                in_flight[run_id] = (0, time.monotonic())
            now = time.monotonic()
            for run_id, (seq, moved) in list(in_flight.items()):
                events = client.store.events(run_id, after=seq)
                if events:
                    in_flight[run_id] = (events[-1].seq, now)
                    if any(EventType(e.type).ends_run for e in events):
                        del in_flight[run_id]
                        ended += 1
                elif now - moved > config.stall_timeout:
                    stuck[run_id] = _diagnose(client, run_id, killer.kill_times)
                    del in_flight[run_id]
        except _OUTAGE:
            # Redis is down for a moment (far shorter than the stall timeout): look again on the next turn.
            now = time.monotonic()
        if killer.error:
            raise RuntimeError(f"the killer stopped: {killer.error}")
        if redis_killer is not None and redis_killer.error:
            raise RuntimeError(f"the Redis killer stopped: {redis_killer.error}")
        if progress and now - last_print > 10:
            last_print = now
            redis_kills = f", {redis_killer.kills} Redis kills" if redis_killer else ""
            print(
                f"  {ended}/{config.runs} runs ended, {len(in_flight)} in flight, {killer.kills} kills"
                f"{redis_kills}, {len(stuck)} stuck",
                flush=True,
            )
        time.sleep(0.2)
    return run_ids, stuck


def _diagnose(client: Client, run_id: str, kills: list[float]) -> dict[str, Any]:
    """Where a stalled run's unfinished steps are: status, task id, lease, messages for it, kills near its release."""
    view = client.status(run_id)
    store: Any = client.store
    leases = {m.decode() for m in store.client.zrange(store._leases(run_id), 0, -1)}
    # The messages are in the broker, which is the state's Redis unless ORCH_BROKER_URL names another.
    raw: Any = redis.Redis.from_url(client.settings.effective_broker_url)
    # Celery's argsrepr header names the run and the step in plain text (the body is base64).
    messages = [m.decode() for q in ("llm", "cpu") for m in raw.lrange(q, 0, -1)]
    messages += [m.decode() for m in raw.hvals("unacked")]
    fields = client.store.run_fields(run_id)
    out: dict[str, Any] = {"status": view["status"]}
    for name, step in view["steps"].items():
        if step["status"] in {"succeeded", "skipped"}:
            continue
        queued = float(fields.get(keys.step_field(name, "queued_at")) or fields.get("created_at") or 0)
        out[name] = {
            "status": step["status"],
            "task": fields.get(keys.step_field(name, "task"), ""),
            "lease_indexed": any(m.startswith(f"{run_id}|{name}|") for m in leases),
            "messages": sum(1 for m in messages if run_id in m and f"'{name}'" in m),
            "kills_within_5s_of_release": [round(k - queued, 3) for k in kills if queued and abs(k - queued) < 5],
        }
    return out


def _check_runs(client: Client, run_ids: list[str], report: ChaosReport) -> None:
    """Final statuses, and exactly one ``step_succeeded`` per step and generation in each run's event stream."""
    for run_id in run_ids:
        view = client.status(run_id)
        if view["status"] == "succeeded":
            report.succeeded += 1
        else:
            report.not_succeeded[run_id] = f"{view['status']}: {view.get('error')}"
        for step_view in view["steps"].values():
            report.steps += 1
            report.attempts += step_view["attempts"]
            report.steps_rerun += step_view["attempts"] > 1
        events = client.store.events(run_id)
        successes = _successes(events)
        report.steps_lost += sum(1 for e in events if e.type == EventType.STEP_LOST)
        # Sent again by the sweeper while still queued: a message lost before any worker claimed it.
        report.steps_resent += sum(
            1 for e in events if e.type == EventType.STEP_QUEUED and (e.data or {}).get("resent")
        )
        for (step, generation), count in successes.items():
            if count > 1:
                report.duplicate_successes.append((run_id, step, generation, count))
        if view["status"] == "succeeded":
            last = max((g for _, g in successes), default=1)
            report.missing_successes += [(run_id, s) for s in view["steps"] if (s, last) not in successes]


def _successes(events: list[Event]) -> Counter[tuple[str, int]]:
    """``step_succeeded`` events per (step, generation); each ``run_resumed`` starts the next generation."""
    generation = 1
    counts: Counter[tuple[str, int]] = Counter()
    for event in events:
        if event.type == EventType.RUN_RESUMED:
            generation += 1
        elif event.type == EventType.STEP_SUCCEEDED and event.step:
            counts[(event.step, generation)] += 1
    return counts


def print_report(report: ChaosReport, config: ChaosConfig, *, cluster: bool = False) -> None:
    """The human-readable summary; ``cluster``: Redis kills hit a cluster's masters, not a single Redis."""
    print(
        f"runs: {report.succeeded}/{report.runs} succeeded in {report.seconds:.1f} s "
        f"({report.runs / report.seconds:.1f} runs/s), {len(report.stuck)} stalled"
    )
    print(
        f"workers: {config.workers} x {config.concurrency} slots; {report.kills} SIGKILLs of a whole worker "
        f"(about one every {config.kill_every:g} s); {report.worker_exits} exited on their own and were restarted"
    )
    if config.redis_kill_every > 0 and cluster:
        print(
            f"redis cluster: {report.redis_kills} SIGKILLs of a master (about one every {config.redis_kill_every:g} "
            f"s); its replica took over, and the killed node rejoined as a replica {config.redis_down_s:g} s later"
        )
    elif config.redis_kill_every > 0:
        print(
            f"redis: {report.redis_kills} SIGKILLs (about one every {config.redis_kill_every:g} s, down "
            f"{config.redis_down_s:g} s each, restarted from its AOF)"
        )
    print(
        f"steps: {report.steps}, attempts {report.attempts}, re-run after a loss {report.steps_rerun}, "
        f"step_lost events {report.steps_lost}, queued steps sent again {report.steps_resent}"
    )
    print(
        f"outputs recorded more than once: {len(report.duplicate_successes)}; "
        f"steps of succeeded runs without a success event: {len(report.missing_successes)}"
    )
    print(
        f"paid LLM calls: {report.paid_calls} for {report.needed_calls} needed "
        f"({report.paid_calls / max(1, report.needed_calls):.4f}); extra {report.extra_paid_calls} "
        f"(at most {report.in_flight_bound} cut off: (worker kills + Redis kills x workers) x slots); "
        f"requests paid twice or more {report.repaid_requests}; billed but never delivered "
        f"{report.paid_undelivered}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    defaults = ChaosConfig()
    parser = cli.parser(__doc__, name="chaos", quick=f"{QUICK_RUNS} runs: a smoke run, about a minute")
    cli.add_workers(parser, workers=defaults.workers, concurrency=defaults.concurrency, pool=None)
    parser.add_argument("--runs", type=int, default=None, help=f"runs (default {defaults.runs}, quick {QUICK_RUNS})")
    parser.add_argument("--kill-every", type=float, default=defaults.kill_every, help="mean seconds between kills")
    parser.add_argument("--parallel", type=int, default=defaults.parallel, help="runs in flight at once")
    parser.add_argument("--latency", type=float, nargs=2, default=defaults.latency, metavar=("MIN", "MAX"))
    parser.add_argument("--stall-timeout", type=float, default=defaults.stall_timeout)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--redis-kill-every",
        type=float,
        default=defaults.redis_kill_every,
        help="mean seconds between SIGKILLs of Redis itself (0: none); it restarts from its AOF (with --cluster: of a "
        "master, whose replica takes over)",
    )
    parser.add_argument(
        "--redis-down", type=float, default=defaults.redis_down_s, help="seconds Redis (a master) stays down"
    )
    parser.add_argument("--log-dir", type=Path, help="keep each worker's log here")
    parser.add_argument(
        "--cluster", action="store_true", help="state in a 3-master Redis Cluster; Redis kills hit its masters"
    )
    args = parser.parse_args(argv)
    if args.cluster and args.redis_kill_every == defaults.redis_kill_every:
        args.redis_kill_every = 20.0
    if args.runs is None:
        args.runs = QUICK_RUNS if args.quick else defaults.runs
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    config = ChaosConfig(
        runs=args.runs,
        workers=args.workers,
        concurrency=args.concurrency,
        kill_every=args.kill_every,
        parallel=args.parallel,
        latency=tuple(args.latency),
        stall_timeout=args.stall_timeout,
        seed=args.seed,
        log_dir=args.log_dir,
        loglevel=args.loglevel,
        redis_kill_every=args.redis_kill_every,
        redis_down_s=args.redis_down,
    )

    def session() -> int:
        # With an append-only file synced before each write is acknowledged, as in compose: a killed Redis loses
        # nothing.
        with private_redis(appendonly=True, appendfsync="always") as server:
            if args.cluster:
                with RedisClusterServers() as cluster:
                    report = run_chaos(config, cluster.url, progress=True, cluster=cluster, broker_url=server.url)
            else:
                report = run_chaos(config, server.url, server=server, progress=True)
            version = redis.Redis.from_url(server.url).info("server").get("redis_version")
        print_report(report, config, cluster=args.cluster)
        write_results(
            args.json,
            {
                **report.to_json(),
                "config": asdict(config),
                "redis": version,
                "command": cli.command("scripts.chaos", argv),
            },
        )
        problems = report.problems()
        for problem in problems:
            print(f"FAIL: {problem}", file=sys.stderr)
        return 1 if problems else 0

    return run_main(session)


if __name__ == "__main__":
    sys.exit(main())
