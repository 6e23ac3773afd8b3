"""bench_load's content pipeline with state in one Redis, then in a 3-master Redis Cluster: same runs, same workers.

Both setups use a separate plain Redis as the broker (``ORCH_BROKER_URL``), so the only difference is where state
lives. Reported per setup: steps per second over the makespan, CPU per step (workers, state nodes and broker, from
/proc), and the commands each state master processed (INFO ``total_commands_processed`` deltas), with the largest
master's count over the smallest's: the sharded global indices (``ORCH_SHARDS``) keep that ratio near 1.

Usage::

    .venv/bin/python -m scripts.bench_cluster                 # 300 runs each (~3 minutes on 2 cores)
    .venv/bin/python -m scripts.bench_cluster --runs 100 --shards 12
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from orchestrator import Client, Settings
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.dev.redis_cluster import RedisClusterServers
from scripts.bench_load import CPU_QUEUE, IMPORTS, LLM_QUEUE, pipeline_spec
from scripts.harness import probes
from scripts.harness.lifecycle import log_dir, private_redis, record_dir, run_main, running, worker_env
from scripts.harness.report import write_results
from scripts.harness.runs import FINISHED, burst

LOGS = "bench-cluster"


@dataclass(frozen=True)
class Config:
    runs: int
    shards: int
    llm_concurrency: int
    out: str


@dataclass
class StateNodes:
    """Where state lives: its URL, the pids of its servers, and the ports of its masters."""

    url: str
    pids: list[int]
    masters: list[int]


@contextlib.contextmanager
def single() -> Iterator[StateNodes]:
    with private_redis() as server:
        assert server.pid is not None
        yield StateNodes(server.url, [server.pid], [server.port])


@contextlib.contextmanager
def cluster() -> Iterator[StateNodes]:
    with RedisClusterServers() as servers:
        yield StateNodes(servers.url, [n.pid for n in servers if n.pid is not None], servers.master_ports())


def _commands(port: int) -> int:
    return probes.total_commands(redis.Redis(port=port, decode_responses=True))


def measure(cfg: Config, name: str, state: StateNodes, broker_url: str, broker_pid: int | None) -> dict[str, Any]:
    """Run ``cfg.runs`` pipelines with state at ``state``; the figures of this setup."""
    shards = cfg.shards if name == "cluster" else 1
    extra = {"ORCH_BROKER_URL": broker_url, "ORCH_SHARDS": str(shards), "ORCH_PRIORITIES": "depth"}
    settings = Settings.from_env({"REDIS_URL": state.url, "ORCH_IMPORTS": IMPORTS, **extra})
    client = Client(settings)
    spec = pipeline_spec()
    logs = log_dir(f"{LOGS}-{name}", fresh=True)
    with record_dir("orchestrator-bench-cluster-") as records:
        env = worker_env(state.url, IMPORTS, record_dir=records, **extra)
        llm = LocalWorkers(
            client.app, env=env, pool="threads", concurrency=cfg.llm_concurrency, queues=(LLM_QUEUE,), log_dir=logs
        )
        cpu = LocalWorkers(client.app, env=env, pool="prefork", concurrency=2, queues=(CPU_QUEUE,), log_dir=logs)
        with running(llm, grace=30, timeout=120), running(cpu, grace=30, timeout=120):
            warm = [client.submit(spec, {"topic": f"warm {i}"}) for i in range(4)]
            _wait(client, warm, timeout=120)
            before_cmds = {port: _commands(port) for port in state.masters}
            servers = [*state.pids, broker_pid]
            cpu_before = sum(probes.workers_cpu_s(llm)) + sum(probes.workers_cpu_s(cpu))
            server_before = sum(probes.cpu_s(pid) for pid in servers)
            started = time.time()
            ids = burst(cfg.runs, 4, lambda i: client.submit(spec, {"topic": f"load {i}"})).ids
            rows = _wait(client, ids, timeout=1800)
            makespan = time.time() - started
            workers_cpu = sum(probes.workers_cpu_s(llm)) + sum(probes.workers_cpu_s(cpu)) - cpu_before
            server_cpu = sum(probes.cpu_s(pid) for pid in servers) - server_before
            per_master = {str(port): _commands(port) - before_cmds[port] for port in state.masters}
    steps = len(ids) * len(spec.steps)
    counts = list(per_master.values())
    return {
        "runs": len(ids),
        "succeeded": sum(1 for row in rows if row["status"] == "succeeded"),
        "steps": steps,
        "makespan_s": round(makespan, 2),
        "steps_per_s": round(steps / makespan, 1),
        "cpu_ms_per_step_workers": round(workers_cpu / steps * 1000, 2),
        "cpu_ms_per_step_redis": round(server_cpu / steps * 1000, 2),
        "commands_per_master": per_master,
        "commands_per_step": round(sum(counts) / steps, 1),
        "max_over_min_master": round(max(counts) / max(1, min(counts)), 2),
        "shards": shards,
    }


def _wait(client: Client, ids: list[str], *, timeout: float) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, str]] = {}
    while len(done) < len(ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids) - len(done)} runs still going after {timeout}s")
        for row in client.store.run_summaries([r for r in ids if r not in done]):
            if row["status"] in FINISHED:
                done[row["run_id"]] = row
        time.sleep(0.5)
    return list(done.values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=300, help="content-pipeline runs per setup (default 300)")
    parser.add_argument("--shards", type=int, default=12, help="ORCH_SHARDS on the cluster (default 12)")
    parser.add_argument("--llm-concurrency", type=int, default=200, help="llm worker threads (default 200)")
    parser.add_argument("--out", default="bench-cluster.json", help="where the JSON results go")
    args = parser.parse_args(argv)
    cfg = Config(args.runs, args.shards, args.llm_concurrency, args.out)

    def body() -> int:
        results: dict[str, Any] = {"config": cfg.__dict__}
        with private_redis() as broker:
            for name, setup in (("single", single), ("cluster", cluster)):
                with setup() as state:
                    results[name] = measure(cfg, name, state, broker.url, broker.pid)
                print(name, results[name], flush=True)
        write_results(Path(cfg.out), results)
        ok = all(results[n]["succeeded"] == cfg.runs for n in ("single", "cluster"))
        return 0 if ok else 1

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
