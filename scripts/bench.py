"""Benchmark: the orchestrator against raw Celery on the same private Redis and the same worker processes.

Usage::

    python -m scripts.bench [--quick] [--workers 2] [--concurrency 2] [--pool prefork] [--reps 7] [--json PATH]

It starts a private ``redis-server`` (random port) and ``--workers`` real ``celery -A workers worker`` processes that
import ``scripts.steps.bench`` (``ORCH_IMPORTS=scripts.steps.bench``), so the raw Celery tasks of the baseline run
on the very same app configuration, pool processes and broker as the orchestrator's steps. It measures, as medians
over ``--reps`` repetitions:

(a) the hop from one step to the next, p50 and p99, over chains. A ``noop`` step runs no code of its own, so its
    hop is taken from one step's end to the next one's end: for the orchestrator from the status JSON (parent
    ``finished_at`` → child ``finished_at``, Redis ``TIME`` inside the finish scripts), for raw Celery over a
    ``chain`` of tiny tasks that record ``time.time()`` at start and end (next end - previous end). The ``python``
    chain's steps record their start and end as the raw tasks do, and both hops there are next start - previous end:
    the function's return to the next function's call. (A parent's finish claims the child its slot keeps in the
    same script, so a locally continued child's ``started_at`` is its parent's ``finished_at``: that difference says
    nothing of the hop.)
(b) Redis commands per executed step (``INFO commandstats`` summed after ``CONFIG RESETSTAT``; commands run inside
    Lua scripts count, as commandstats counts them), with the idle workers' background rate (BRPOP timeouts,
    heartbeats, sweeper) subtracted and the benchmark's own status polls removed; broken down by command, with a
    ``MONITOR`` pass telling which of them ran inside Lua.
(c) steps/s of a 1→500 fan-out of no-op steps, submit → last step finished, against a raw ``group`` of 500 no-op
    tasks published by the client (and, for information, published from inside a worker task, as the
    orchestrator's finishing root step does).
(d) makespan ÷ critical path (``Graph.critical_path_length`` of the nominal step durations) on a non-series-parallel
    DAG of 0.2 s ``python`` steps, from the run's ``created_at`` and from its first ``started_at``. Raw Celery has no
    canvas for such a DAG without a result backend, so as a reference both run a chain as deep as the DAG of the same
    sleeping steps: what the per-level hop alone costs on this machine.

(e) what a finished run keeps in Redis (``MEMORY USAGE`` of its keys, :mod:`scripts.harness.footprint`): bytes per
    finished step beyond the outputs' own JSON, by key and by hash field, over the no-op and ``python`` chains.

It also reads each process's CPU time from ``/proc`` around every window (worker main processes, pool children,
redis-server, this client), so a throughput gap on a CPU-bound machine can be traced to where the CPU goes. Other
processes on the machine add noise: ours and raw runs are interleaved (rotating order) so they share it.

It prints a table, writes ``test-artifacts/bench.json`` (``--json PATH``) and exits 0 (it is a measurement, not a
test) unless the benchmark itself fails. Workers and Redis are stopped on exit, Ctrl-C, SIGTERM and SIGHUP.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # `python scripts/bench.py`: run as `python -m scripts.bench`
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, [sys.executable, "-m", "scripts.bench", *sys.argv[1:]])

import hashlib
import itertools
import math
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
from celery import chain, group

from orchestrator import Client, Settings, WorkflowSpec, parse_workflow
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.engine.status import RunView
from orchestrator.state import keys
from scripts.harness import cli, probes
from scripts.harness.footprint import finished_run_bytes, print_footprint
from scripts.harness.lifecycle import log_dir, pool_workers, private_redis, record_dir, run_main, running, worker_env
from scripts.harness.records import Record, RecordReader
from scripts.harness.report import REPO_ROOT, Progress, fmt, print_table, ts, versions, write_results
from scripts.harness.runs import FINISHED
from scripts.harness.stats import median, medians, percentile
from scripts.steps import bench as tasks

LOGS = "bench-worker-logs"
TASKS_MODULE = "scripts.steps.bench"
SUBCOMMANDS = {"script", "config", "client", "cluster", "command", "object", "memory", "function", "acl", "xinfo"}
MONITOR_MARK = "bench:monitor:"

T = TypeVar("T")


# -- configuration -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """What to run, after ``--quick`` and the explicit flags are applied."""

    workers: int
    concurrency: int
    pool: str
    reps: int
    chain_len: int
    chains: int
    fanout: int
    step_s: float
    idle_s: float
    poll_s: float
    loglevel: str
    quick: bool
    monitor: bool
    out: Path


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = cli.parser(__doc__, name="bench", quick="fewer and shorter repetitions (under a minute)")
    cli.add_workers(parser, workers=2, concurrency=2, pool="prefork")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per measurement (default 7, quick 3)")
    parser.add_argument("--chain-len", type=int, default=20, help="steps per chain in (a)/(b) (default 20)")
    parser.add_argument("--chains", type=int, default=None, help="chains per repetition (default 5, quick 2)")
    parser.add_argument("--fanout", type=int, default=500, help="fan-out width in (c) (default 500)")
    parser.add_argument("--step-s", type=float, default=0.2, help="step duration in (d) (default 0.2)")
    parser.add_argument("--idle-s", type=float, default=None, help="idle-noise window, seconds (default 5, quick 2)")
    parser.add_argument("--poll-s", type=float, default=0.01, help="completion poll interval (default 0.01)")
    parser.add_argument("--no-monitor", action="store_true", help="skip the MONITOR pass (in-Lua breakdown)")
    ns = parser.parse_args(argv)
    quick = bool(ns.quick)
    if ns.chain_len < 2 or ns.fanout < 1 or ns.workers < 1 or ns.concurrency < 1:
        parser.error("--chain-len must be ≥ 2, --fanout, --workers and --concurrency ≥ 1")
    return Config(
        workers=ns.workers,
        concurrency=ns.concurrency,
        pool=ns.pool,
        reps=ns.reps or (3 if quick else 7),
        chain_len=ns.chain_len,
        chains=ns.chains or (2 if quick else 5),
        fanout=ns.fanout,
        step_s=ns.step_s,
        idle_s=ns.idle_s if ns.idle_s is not None else (2.0 if quick else 5.0),
        poll_s=ns.poll_s,
        loglevel=ns.loglevel,
        quick=quick,
        monitor=not ns.no_monitor,
        out=ns.json,
    )


# -- workflows -----------------------------------------------------------------------------------------------------


def chain_spec(length: int, kind: str, sleep_s: float = 0.0) -> WorkflowSpec:
    """``s0 → s1 → …`` of ``noop`` steps, or of ``python`` steps calling ``bench.noop`` (``bench.sleep`` when
    ``sleep_s`` is given), which record their start and end as the raw tasks do (tag: the run id)."""
    steps: list[dict[str, Any]] = []
    for i in range(length):
        step: dict[str, Any] = {"name": f"s{i}", "uses": kind, "depends_on": [f"s{i - 1}"] if i else []}
        if kind == "python":
            args: dict[str, Any] = {"record": True, **({"seconds": sleep_s} if sleep_s else {})}
            step["with"] = {"function": "bench.sleep" if sleep_s else "bench.noop", "args": args}
        steps.append(step)
    suffix = f"_sleep{int(sleep_s * 1000)}ms" if sleep_s else ""
    return parse_workflow({"name": f"bench_chain_{kind}_{length}{suffix}", "steps": steps})


def fanout_spec(width: int) -> WorkflowSpec:
    """One no-op root releasing ``width`` no-op leaves."""
    steps: list[dict[str, Any]] = [{"name": "root", "uses": "noop"}]
    steps += [{"name": f"leaf{i}", "uses": "noop", "depends_on": ["root"]} for i in range(width)]
    return parse_workflow({"name": f"bench_fanout_{width}", "steps": steps})


# A layered DAG that is not series-parallel: it contains the "N" A→C, B→C, B→D (A does not reach D), repeated at
# every layer. Width ≤ 3, so 4 pool slots can run it at its critical path.
DAG_EDGES: dict[str, list[str]] = {
    "A": [],
    "B": [],
    "C": ["A", "B"],
    "D": ["B"],
    "E": ["C"],
    "F": ["C", "D"],
    "G": ["D"],
    "H": ["E", "F"],
    "I": ["F", "G"],
    "J": ["H", "I"],
    "K": ["I"],
    "L": ["J", "K"],
}
DAG_WIDTH = 3


def dag_spec(step_s: float) -> WorkflowSpec:
    steps = [
        {
            "name": name,
            "uses": "python",
            "depends_on": deps,
            "with": {"function": "bench.sleep", "args": {"seconds": step_s}},
        }
        for name, deps in DAG_EDGES.items()
    ]
    return parse_workflow({"name": "bench_dag_n", "steps": steps})


# -- statistics ------------------------------------------------------------------------------------------------------


def cmd_name(command: str) -> str:
    """The commandstats-style name of a MONITOR line's command (``script|exists``, ``evalsha`` …)."""
    parts = command.split(" ", 2)
    name = parts[0].lower()
    if name in SUBCOMMANDS and len(parts) > 1:
        name = f"{name}|{parts[1].lower()}"
    return name


# -- command counting ------------------------------------------------------------------------------------------------


class CpuProbe:
    """CPU seconds used so far by role: worker main processes, their pool children, redis-server, this process."""

    def __init__(self, workers: LocalWorkers, redis_pid: int | None) -> None:
        self.workers = workers
        self.redis_pid = redis_pid

    def snapshot(self) -> dict[str, float]:
        main, children = probes.workers_cpu_s(self.workers)
        return {
            "worker_main": main,
            "pool_children": children,
            "redis": probes.cpu_s(self.redis_pid),
            "bench_client": probes.cpu_s(os.getpid()),
        }


@dataclass
class Window:
    """Commands counted in one measurement window, with the idle background and our own polls taken out."""

    duration: float
    observed: dict[str, int]
    polls: int
    noise: dict[str, float]
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def net(self) -> dict[str, float]:
        out: dict[str, float] = {cmd: float(n) for cmd, n in self.observed.items()}
        for cmd, expected in self.noise.items():
            out[cmd] = out.get(cmd, 0.0) - expected
        if self.polls:
            out["hget"] = out.get("hget", 0.0) - self.polls
        return out

    @property
    def total_net(self) -> float:
        return sum(self.net.values())

    @property
    def total_observed(self) -> int:
        return sum(self.observed.values())

    def merged(self, other: Window | None) -> Window:
        if other is None:
            return self
        observed = Counter(self.observed)
        observed.update(other.observed)
        noise = Counter(self.noise)
        noise.update(other.noise)
        cpu = Counter(self.cpu)
        cpu.update(other.cpu)
        return Window(self.duration + other.duration, dict(observed), self.polls + other.polls, dict(noise), dict(cpu))


class MonitorTap(threading.Thread):
    """Counts commands seen by ``MONITOR`` per phase, split into top-level and inside-Lua."""

    def __init__(self, url: str, exclude_addrs: set[str]) -> None:
        super().__init__(name="bench-monitor", daemon=True)
        self.url = url
        self.exclude = exclude_addrs
        self.ready = threading.Event()
        self.phases: dict[str, Counter[tuple[str, bool]]] = defaultdict(Counter)
        self.spans: dict[str, list[float]] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        conn = redis.Redis.from_url(self.url)
        phase = ""
        try:
            with conn.monitor() as mon:  # type: ignore[no-untyped-call]
                for entry in mon.listen():
                    command: str = entry["command"]
                    if command.startswith("ECHO " + MONITOR_MARK):
                        mark = command.split(MONITOR_MARK, 1)[1]
                        if phase:
                            self.spans[phase].append(entry["time"])
                        if mark == "stop":
                            return
                        if mark == "ready":
                            self.ready.set()
                            continue
                        phase = mark
                        self.spans[phase] = [entry["time"]]
                        continue
                    if not phase:
                        continue
                    addr = f"{entry['client_address']}:{entry['client_port']}"
                    if addr in self.exclude:
                        continue
                    self.phases[phase][(cmd_name(command), entry["client_type"] == "lua")] += 1
        except BaseException as exc:  # reported by the caller
            self.error = exc
            self.ready.set()
        finally:
            conn.close()


# -- the benchmark ---------------------------------------------------------------------------------------------------


@dataclass
class ChainRep:
    hops: list[float] = field(default_factory=list)
    cycles: list[float] = field(default_factory=list)  # one step's end → the next one's end
    service: list[float] = field(default_factory=list)
    window: Window | None = None
    steps: int = 0
    run_ids: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, cfg: Config, client: Client, url: str, record_dir: str, cpu: CpuProbe) -> None:
        self.cfg = cfg
        self.cpu = cpu
        self.client = client
        self.url = url
        self.stats = redis.Redis.from_url(url, decode_responses=True)
        self.poller = redis.Redis.from_url(url, single_connection_client=True, decode_responses=True)
        self.records = RecordReader(record_dir)
        self.idle: dict[str, float] = {}
        self.anomalies: list[str] = []
        self.code_at_start = ""  # product code fingerprint before the workers started
        self.log = Progress()
        self.chain_noop = chain_spec(cfg.chain_len, "noop")
        self.chain_python = chain_spec(cfg.chain_len, "python")
        self.fanout = fanout_spec(cfg.fanout)
        self.dag = dag_spec(cfg.step_s)
        depth = round(self.dag.graph.critical_path_length(dict.fromkeys(DAG_EDGES, 1.0)))
        self.sleep_chain = chain_spec(depth, "python", sleep_s=cfg.step_s)

    # -- primitives ----------------------------------------------------------------------------------------------

    def measure(self, fn: Callable[[], tuple[T, int]]) -> tuple[T, Window]:
        """Run ``fn`` (returning its result and how many status polls it sent) between RESETSTAT and INFO."""
        cpu_before = self.cpu.snapshot()
        self.stats.config_resetstat()
        start = time.monotonic()
        result, polls = fn()
        duration = time.monotonic() - start
        observed = probes.commandstats(self.stats)
        cpu = {role: used - cpu_before.get(role, 0.0) for role, used in self.cpu.snapshot().items()}
        noise = {cmd: rate * duration for cmd, rate in self.idle.items()}
        return result, Window(duration, observed, polls, noise, cpu)

    def wait_run(self, run_id: str, timeout: float = 90.0) -> int:
        """Poll the run's status field until it ends; returns how many HGETs that took."""
        key = keys.run_key(run_id)
        deadline = time.monotonic() + timeout
        polls = 0
        while True:
            status = self.poller.hget(key, "status")
            polls += 1
            if status in FINISHED:
                return polls
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {status!r} after {timeout}s (see the worker logs in {LOGS})")
            time.sleep(self.cfg.poll_s)

    def submit_wait(self, spec: WorkflowSpec) -> tuple[str, int, float, float]:
        """Submit and wait; returns the run id, polls, the client's submit start time and submit duration."""
        t_submit = time.time()
        run_id = self.client.submit(spec)
        submit_s = time.time() - t_submit
        polls = self.wait_run(run_id)
        return run_id, polls, t_submit, submit_s

    def view(self, run_id: str) -> RunView:
        """The status JSON of a run that must have succeeded (read outside the counting windows).

        A step that needed more than one attempt (an error, or a lost worker recovered by the sweeper) makes the
        measurement meaningless; it is recorded in ``anomalies`` and reported loudly.
        """
        view = self.client.status(run_id)
        if view["status"] != "succeeded":
            raise RuntimeError(f"benchmark run {view['workflow']} {run_id} ended {view['status']}: {view.get('error')}")
        retried = [name for name, step in view["steps"].items() if step.get("attempts", 1) != 1 or step.get("errors")]
        if retried:
            self.anomalies.append(
                f"run {run_id} ({view['workflow']}): {len(retried)} steps needed more than one attempt"
            )
        return view

    def run_ours(self, spec: WorkflowSpec) -> tuple[RunView, int, float, float]:
        """Submit, wait and read the status JSON."""
        run_id, polls, t_submit, submit_s = self.submit_wait(spec)
        return self.view(run_id), polls, t_submit, submit_s

    def raw_chain(self, length: int) -> list[Record]:
        tag = f"chain-{uuid.uuid4().hex[:12]}"
        chain(*(tasks.raw_noop.si(tag, i) for i in range(length))).apply_async()
        return self.records.wait(tag, length, timeout=120.0, poll_s=self.cfg.poll_s)

    # -- phases --------------------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Every pool process builds its runtime, loads the Lua scripts and caches the definitions once."""
        self.log("warm-up")
        for spec in (self.chain_noop, self.chain_python, self.fanout, self.dag, self.sleep_chain):
            self.run_ours(spec)
        self.raw_chain(self.cfg.chain_len)
        tag = f"warm-{uuid.uuid4().hex[:8]}"
        group(tasks.raw_noop.si(tag, i) for i in range(self.cfg.fanout)).apply_async()
        self.records.wait(tag, self.cfg.fanout, timeout=120.0, poll_s=self.cfg.poll_s)

    def measure_idle(self) -> None:
        self.log(f"idle background for {self.cfg.idle_s:g}s")
        time.sleep(0.5)
        self.stats.config_resetstat()
        time.sleep(self.cfg.idle_s)
        observed = probes.commandstats(self.stats)
        self.idle = {cmd: n / self.cfg.idle_s for cmd, n in observed.items()}

    def chain_ours(self, spec: WorkflowSpec, rep: ChainRep) -> None:
        """One chain of ours in its own counting window, added to ``rep``."""

        def work() -> tuple[str, int]:
            run_id, polls, _t, _s = self.submit_wait(spec)
            return run_id, polls

        run_id, window = self.measure(work)
        rep.window = window.merged(rep.window)
        rep.run_ids.append(run_id)
        steps = self.view(run_id)["steps"]
        for i in range(len(spec.steps)):
            step = steps[f"s{i}"]
            rep.service.append(ts(step["finished_at"]) - ts(step["started_at"]))
            if i:
                rep.cycles.append(ts(step["finished_at"]) - ts(steps[f"s{i - 1}"]["finished_at"]))
        if spec.steps[0].uses == "python":
            records = self.records.wait(run_id, len(spec.steps), timeout=30.0, poll_s=self.cfg.poll_s)
            rep.hops += [b.start - a.end for a, b in itertools.pairwise(records)]
        rep.steps += len(spec.steps)

    def chain_raw(self, rep: ChainRep) -> None:
        """One raw Celery chain in its own counting window, added to ``rep``."""
        records, window = self.measure(lambda: (self.raw_chain(self.cfg.chain_len), 0))
        rep.window = window.merged(rep.window)
        for i, rec in enumerate(records):
            rep.service.append(rec.end - rec.start)
            if i:
                rep.hops.append(rec.start - records[i - 1].end)
                rep.cycles.append(rec.end - records[i - 1].end)
        rep.steps += len(records)

    def fanout_ours(self) -> dict[str, Any]:
        def work() -> tuple[tuple[str, float, float], int]:
            run_id, polls, t_submit, submit_s = self.submit_wait(self.fanout)
            return (run_id, t_submit, submit_s), polls

        (run_id, t_submit, submit_s), window = self.measure(work)
        view = self.view(run_id)
        finished = ts(view["finished_at"])
        steps = view["steps"]
        leaves = [steps[f"leaf{i}"] for i in range(self.cfg.fanout)]
        root_done = ts(steps["root"]["finished_at"])
        elapsed = finished - t_submit
        return {
            "elapsed_s": elapsed,
            "steps_per_s": self.cfg.fanout / elapsed,
            "submit_s": submit_s,
            "root_done_to_first_leaf_start_s": min(ts(s["started_at"]) for s in leaves) - root_done,
            "root_done_to_last_leaf_start_s": max(ts(s["started_at"]) for s in leaves) - root_done,
            "submit_to_root_done_s": root_done - t_submit,
            "commands_per_step": window.total_net / (self.cfg.fanout + 1),
            "cpu_ms_per_step": {r: v * 1e3 / (self.cfg.fanout + 1) for r, v in window.cpu.items()},
            "window": window,
        }

    def fanout_raw(self, from_worker: bool) -> dict[str, Any]:
        tag = f"fan-{uuid.uuid4().hex[:12]}"
        n = self.cfg.fanout

        def work() -> tuple[tuple[list[Record], float, float], int]:
            t_start = time.time()
            if from_worker:
                tasks.raw_fanout.delay(tag, n)
            else:
                group(tasks.raw_noop.si(tag, i) for i in range(n)).apply_async()
            published = time.time() - t_start
            records = self.records.wait(tag, n, timeout=120.0, poll_s=self.cfg.poll_s)
            return (records, t_start, published), 0

        (records, t_start, published), window = self.measure(work)
        elapsed = max(r.end for r in records) - t_start
        out: dict[str, Any] = {
            "elapsed_s": elapsed,
            "steps_per_s": n / elapsed,
            "client_publish_s": published,
            "commands_per_step": window.total_net / (n + (1 if from_worker else 0)),
            "cpu_ms_per_step": {r: v * 1e3 / (n + (1 if from_worker else 0)) for r, v in window.cpu.items()},
            "window": window,
        }
        if from_worker:
            root = self.records.wait(f"{tag}:root", 1, timeout=30.0, poll_s=self.cfg.poll_s)[0]
            out["worker_publish_s"] = root.end - root.start
        return out

    def dag_ours(self) -> dict[str, Any]:
        view, _polls, _t, _s = self.run_ours(self.dag)
        steps = view["steps"]
        last = max(ts(s["finished_at"]) for s in steps.values())
        first = min(ts(s["started_at"]) for s in steps.values())
        created = ts(view["created_at"])
        graph = self.dag.graph
        nominal = graph.critical_path_length(dict.fromkeys(DAG_EDGES, self.cfg.step_s))
        measured = graph.critical_path_length(
            {name: ts(s["finished_at"]) - ts(s["started_at"]) for name, s in steps.items()}
        )
        return {
            "makespan_created_s": last - created,
            "makespan_first_start_s": last - first,
            "critical_path_s": nominal,
            "critical_path_measured_durations_s": measured,
            "ratio_created": (last - created) / nominal,
            "ratio_first_start": (last - first) / nominal,
            "ratio_vs_measured_cp": (last - created) / measured,
        }

    def sleep_chain_ours(self) -> dict[str, Any]:
        """Reference for (d): a chain as deep as the DAG, of the same sleeping steps."""
        view, _polls, _t, _s = self.run_ours(self.sleep_chain)
        steps = [view["steps"][f"s{i}"] for i in range(len(self.sleep_chain.steps))]
        records = self.records.wait(view["run_id"], len(steps), timeout=60.0, poll_s=self.cfg.poll_s)
        cp = len(steps) * self.cfg.step_s
        last = ts(steps[-1]["finished_at"])
        return {
            "ratio_created": (last - ts(view["created_at"])) / cp,
            "ratio_first_start": (last - ts(steps[0]["started_at"])) / cp,
            "hops_ms": [(b.start - a.end) * 1e3 for a, b in itertools.pairwise(records)],
        }

    def sleep_chain_raw(self) -> dict[str, Any]:
        """Raw Celery's reference for (d): a ``chain`` as deep as the DAG, of tasks sleeping as long."""
        depth = len(self.sleep_chain.steps)
        tag = f"sleep-{uuid.uuid4().hex[:12]}"
        sent = time.time()
        chain(*(tasks.raw_sleep.si(tag, i, self.cfg.step_s) for i in range(depth))).apply_async()
        records = self.records.wait(tag, depth, timeout=60.0, poll_s=self.cfg.poll_s)
        cp = depth * self.cfg.step_s
        return {
            "ratio_created": (records[-1].end - sent) / cp,
            "ratio_first_start": (records[-1].end - records[0].start) / cp,
            "hops_ms": [(b.start - a.end) * 1e3 for a, b in itertools.pairwise(records)],
        }

    def monitor_pass(self) -> dict[str, Any]:
        """One ours chain and one raw chain under MONITOR: which commands run inside Lua, per step."""
        addr = str(self.poller.client_info()["addr"])
        tap = MonitorTap(self.url, {addr})
        tap.start()
        deadline = time.monotonic() + 10
        while not tap.ready.is_set() and time.monotonic() < deadline:
            self.stats.echo(MONITOR_MARK + "ready")  # repeated until the tap's MONITOR connection sees one
            tap.ready.wait(0.05)
        if not tap.ready.is_set() or tap.error:
            raise RuntimeError(f"MONITOR did not start: {tap.error}")
        self.stats.echo(MONITOR_MARK + "ours")
        for _ in range(self.cfg.chains):
            self.submit_wait(self.chain_noop)
        self.stats.echo(MONITOR_MARK + "raw")
        for _ in range(self.cfg.chains):
            self.raw_chain(self.cfg.chain_len)
        self.stats.echo(MONITOR_MARK + "stop")
        tap.join(10)
        steps = self.cfg.chains * self.cfg.chain_len
        out: dict[str, Any] = {}
        for phase, counts in tap.phases.items():
            span = tap.spans.get(phase, [0.0, 0.0])
            duration = span[-1] - span[0] if len(span) > 1 else 0.0
            top: dict[str, float] = defaultdict(float)
            lua: dict[str, float] = defaultdict(float)
            for (cmd, in_lua), n in counts.items():
                (lua if in_lua else top)[cmd] += n
            # The idle background is top-level (BRPOP timeouts, heartbeats, sweeper); status HGETs were excluded.
            for cmd, rate in self.idle.items():
                top[cmd] -= rate * duration
            out[phase] = {
                "top_level_per_step": {c: v / steps for c, v in top.items()},
                "in_lua_per_step": {c: v / steps for c, v in lua.items()},
                "top_level_total_per_step": sum(top.values()) / steps,
                "in_lua_total_per_step": sum(lua.values()) / steps,
            }
        return out

    # -- the whole run -------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.warm_up()
        if self.code_at_start and source_fingerprint() != self.code_at_start:
            # Every process has loaded the product code and its Lua scripts by the end of the warm-up; a change
            # before that may have given workers a mix of old and new files.
            self.anomalies.append("product code (orchestrator/, workers/) changed while the processes were loading it")
        self.measure_idle()
        chain_reps: dict[str, list[ChainRep]] = {"ours": [], "raw": [], "ours_python": []}
        runners: dict[str, Callable[[ChainRep], None]] = {
            "ours": lambda rep: self.chain_ours(self.chain_noop, rep),
            "raw": self.chain_raw,
            "ours_python": lambda rep: self.chain_ours(self.chain_python, rep),
        }
        order = list(runners)
        turn = 0
        for rep in range(cfg.reps):
            self.log(f"(a)(b) chains, rep {rep + 1}/{cfg.reps}")
            current = {name: ChainRep() for name in order}
            # Interleaved one chain at a time, rotating the order, so background load hits all variants alike.
            for _ in range(cfg.chains):
                for name in order[turn % 3 :] + order[: turn % 3]:
                    runners[name](current[name])
                turn += 1
            for name in order:
                chain_reps[name].append(current[name])
        fan: dict[str, list[dict[str, Any]]] = {"ours": [], "raw_group": [], "raw_worker": []}
        fan_runs: dict[str, Callable[[], dict[str, Any]]] = {
            "ours": self.fanout_ours,
            "raw_group": lambda: self.fanout_raw(from_worker=False),
            "raw_worker": lambda: self.fanout_raw(from_worker=True),
        }
        fan_order = list(fan_runs)
        for rep in range(cfg.reps):
            self.log(f"(c) fan-out 1→{cfg.fanout}, rep {rep + 1}/{cfg.reps}")
            for name in fan_order[rep % 3 :] + fan_order[: rep % 3]:
                fan[name].append(fan_runs[name]())
        dags: list[dict[str, Any]] = []
        sleeps: dict[str, list[dict[str, Any]]] = {"ours": [], "raw": []}
        for rep in range(cfg.reps):
            self.log(f"(d) N-shaped DAG, {len(DAG_EDGES)} steps of {cfg.step_s:g}s, rep {rep + 1}/{cfg.reps}")
            dags.append(self.dag_ours())
            sleeps["ours"].append(self.sleep_chain_ours())
            sleeps["raw"].append(self.sleep_chain_raw())
        monitor: dict[str, Any] = {}
        if cfg.monitor:
            self.log("MONITOR pass (commands inside Lua)")
            monitor = self.monitor_pass()
        results = summarise(cfg, chains=chain_reps, fan=fan, dags=dags, sleeps=sleeps, monitor=monitor, idle=self.idle)
        results["finished_run"] = {
            name: finished_run_bytes(self.stats, [r for rep in chain_reps[name] for r in rep.run_ids])
            for name in ("ours", "ours_python")
        }
        results["anomalies"] = self.anomalies
        return results


# -- summary ---------------------------------------------------------------------------------------------------------


def _chain_summary(reps: list[ChainRep]) -> dict[str, Any]:
    pooled = [h for r in reps for h in r.hops]
    cycles = [r for r in reps if r.cycles]
    per_step = [r.window.total_net / r.steps for r in reps if r.window]
    commands: dict[str, list[float]] = defaultdict(list)
    for r in reps:
        if r.window:
            for cmd, n in r.window.net.items():
                commands[cmd].append(n / r.steps)
    return {
        "hop_p50_ms": median(percentile(r.hops, 0.5) * 1e3 for r in reps),
        "hop_p99_ms": median(percentile(r.hops, 0.99) * 1e3 for r in reps),
        "hop_p50_ms_reps": [percentile(r.hops, 0.5) * 1e3 for r in reps],
        "hop_p99_ms_reps": [percentile(r.hops, 0.99) * 1e3 for r in reps],
        "hop_p50_ms_pooled": percentile(pooled, 0.5) * 1e3,
        "hop_p99_ms_pooled": percentile(pooled, 0.99) * 1e3,
        "hop_max_ms_pooled": max(pooled) * 1e3 if pooled else math.nan,
        "hops_per_rep": len(reps[0].hops) if reps else 0,
        "cycle_p50_ms": median(percentile(r.cycles, 0.5) * 1e3 for r in cycles) if cycles else math.nan,
        "cycle_p99_ms": median(percentile(r.cycles, 0.99) * 1e3 for r in cycles) if cycles else math.nan,
        "service_p50_ms": median(percentile(r.service, 0.5) * 1e3 for r in reps),
        "commands_per_step": median(per_step),
        "commands_per_step_reps": per_step,
        "commands_per_step_unsubtracted": median(
            (r.window.total_observed - r.window.polls) / r.steps for r in reps if r.window
        ),
        "commands_by_name_per_step": {c: median(v) for c, v in sorted(commands.items())},
        "window_s": median(r.window.duration for r in reps if r.window),
        "cpu_ms_per_step": {
            role: median(r.window.cpu.get(role, 0.0) * 1e3 / r.steps for r in reps if r.window)
            for role in (reps[0].window.cpu if reps and reps[0].window else {})
        },
    }


def _without_window(d: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in d.items() if k != "window"}
    window = d.get("window")
    if isinstance(window, Window):
        out["commands_by_name"] = {c: round(n, 2) for c, n in sorted(window.net.items())}
    return out


def _metric(
    ours: float, raw: float | None, *, target: str, passed: bool | None, unit: str, note: str = ""
) -> dict[str, Any]:
    ratio = ours / raw if raw else None
    return {"ours": ours, "raw": raw, "ratio": ratio, "target": target, "pass": passed, "unit": unit, "note": note}


def summarise(
    cfg: Config,
    *,
    chains: dict[str, list[ChainRep]],
    fan: dict[str, list[dict[str, Any]]],
    dags: list[dict[str, Any]],
    sleeps: dict[str, list[dict[str, Any]]],
    monitor: dict[str, Any],
    idle: dict[str, float],
) -> dict[str, Any]:
    ours, raw, py = (_chain_summary(chains[k]) for k in ("ours", "raw", "ours_python"))
    fan_ours = median(f["steps_per_s"] for f in fan["ours"])
    fan_raw = median(f["steps_per_s"] for f in fan["raw_group"])
    fan_raw_worker = median(f["steps_per_s"] for f in fan["raw_worker"])
    cpu_ours = median(sum(f["cpu_ms_per_step"].values()) for f in fan["ours"])
    cpu_raw = median(sum(f["cpu_ms_per_step"].values()) for f in fan["raw_group"])
    d_created = median(d["ratio_created"] for d in dags)
    d_first = median(d["ratio_first_start"] for d in dags)
    chain_o = median(x["ratio_created"] for x in sleeps["ours"])
    chain_r = median(x["ratio_created"] for x in sleeps["raw"])
    chain_o_first = median(x["ratio_first_start"] for x in sleeps["ours"])
    chain_r_first = median(x["ratio_first_start"] for x in sleeps["raw"])
    sleep_hop_o = median(h for x in sleeps["ours"] for h in x["hops_ms"])
    sleep_hop_r = median(h for x in sleeps["raw"] for h in x["hops_ms"])
    slots = cfg.workers * cfg.concurrency
    p50, p99 = raw["hop_p50_ms"], raw["hop_p99_ms"]
    c50, c99 = raw["cycle_p50_ms"], raw["cycle_p99_ms"]
    cmds = ours["commands_per_step"]
    metrics: dict[str, dict[str, Any]] = {
        "a_hop_p50": _metric(
            ours["cycle_p50_ms"],
            c50,
            target="≤ 1.3x raw",
            passed=ours["cycle_p50_ms"] <= 1.3 * c50,
            unit="ms",
            note="no-op chain, one step's end to the next one's end",
        ),
        "a_hop_p99": _metric(
            ours["cycle_p99_ms"],
            c99,
            target="≤ 1.5x raw",
            passed=ours["cycle_p99_ms"] <= 1.5 * c99,
            unit="ms",
            note="no-op chain, one step's end to the next one's end",
        ),
        "a_hop_p50_python": _metric(
            py["hop_p50_ms"],
            p50,
            target="≤ 1.3x raw",
            passed=py["hop_p50_ms"] <= 1.3 * p50,
            unit="ms",
            note="python chain (info), function return to the next call",
        ),
        "a_hop_p99_python": _metric(
            py["hop_p99_ms"],
            p99,
            target="≤ 1.5x raw",
            passed=py["hop_p99_ms"] <= 1.5 * p99,
            unit="ms",
            note="python chain (info)",
        ),
        "b_commands_per_step": _metric(
            cmds,
            raw["commands_per_step"],
            target="≤ 22",
            passed=cmds <= 22,
            unit="cmds",
            note="no-op chain, incl. commands inside Lua",
        ),
        "c_fanout_steps_per_s": _metric(
            fan_ours,
            fan_raw,
            target="≥ 0.8x raw",
            passed=fan_ours >= 0.8 * fan_raw,
            unit="steps/s",
            note=f"1->{cfg.fanout}, raw group published by the client",
        ),
        "c_fanout_vs_worker_published": _metric(
            fan_ours,
            fan_raw_worker,
            target="(info)",
            passed=None,
            unit="steps/s",
            note="raw group published inside a worker task",
        ),
        "c_fanout_cpu_per_step": _metric(
            cpu_ours,
            cpu_raw,
            target="(info)",
            passed=None,
            unit="ms",
            note="CPU of all processes per step: on a CPU-bound machine raw/ours "
            "bounds the throughput ratio, and other load does not move it",
        ),
        "d_makespan_over_cp": _metric(
            d_created, None, target="≤ 1.05", passed=d_created <= 1.05, unit="x", note="from run created_at"
        ),
        "d_makespan_over_cp_first_start": _metric(
            d_first, None, target="≤ 1.05", passed=d_first <= 1.05, unit="x", note="from first step started_at"
        ),
        "d_chain_over_cp": _metric(
            chain_o,
            chain_r,
            target="(info)",
            passed=None,
            unit="x",
            note="chain of sleeping steps as deep as the DAG, from submit",
        ),
        "d_chain_over_cp_first_start": _metric(
            chain_o_first, chain_r_first, target="(info)", passed=None, unit="x", note="same, from first start"
        ),
        "d_hop_after_sleep": _metric(
            sleep_hop_o, sleep_hop_r, target="(info)", passed=None, unit="ms", note="hop p50 after a sleeping step"
        ),
    }
    monitor_ours = monitor.get("ours", {})
    if monitor_ours:
        top = monitor_ours["top_level_total_per_step"]
        metrics["b_commands_per_step_top_level"] = _metric(
            top,
            monitor.get("raw", {}).get("top_level_total_per_step"),
            target="(info)",
            passed=None,
            unit="cmds",
            note="excl. commands inside Lua (MONITOR pass)",
        )
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
        "slots": slots,
        "dag_width": DAG_WIDTH,
        "metrics": metrics,
        "chains": {"ours_noop": ours, "raw": raw, "ours_python": py},
        "fanout": {k: [_without_window(f) for f in v] for k, v in fan.items()},
        "fanout_medians": {k: medians(v) for k, v in fan.items() if v},
        "dag": {"reps": dags, "edges": DAG_EDGES, "sleep_chains": sleeps},
        "monitor": monitor,
        "idle_commands_per_s": idle,
    }


# -- output ----------------------------------------------------------------------------------------------------------


def print_report(results: dict[str, Any]) -> None:
    cfg = results["config"]
    print()
    print(
        f"Benchmark: {cfg['workers']} workers x {cfg['pool']} c{cfg['concurrency']}, {cfg['reps']} reps "
        f"(medians), chains {cfg['chains']}x{cfg['chain_len']}, fan-out 1→{cfg['fanout']}"
    )
    rows = [("metric", "ours", "raw", "ratio", "target", "result")]
    names = {
        "a_hop_p50": "(a) hop p50 ms, no-op chain",
        "a_hop_p99": "(a) hop p99 ms, no-op chain",
        "a_hop_p50_python": "(a) hop p50 ms, python chain",
        "a_hop_p99_python": "(a) hop p99 ms, python chain",
        "b_commands_per_step": "(b) Redis cmds/step (commandstats)",
        "b_commands_per_step_top_level": "(b) … of which top-level (not in Lua)",
        "c_fanout_steps_per_s": "(c) fan-out steps/s vs client group",
        "c_fanout_vs_worker_published": "(c) fan-out steps/s vs worker group",
        "c_fanout_cpu_per_step": "(c) fan-out CPU ms/step, all procs",
        "d_makespan_over_cp": "(d) makespan/CP from created_at",
        "d_makespan_over_cp_first_start": "(d) makespan/CP from first start",
        "d_chain_over_cp": "(d) ref: sleep chain makespan/CP",
        "d_chain_over_cp_first_start": "(d) ref: … from first start",
        "d_hop_after_sleep": "(d) ref: hop p50 ms after 0.2s step",
    }
    for key, label in names.items():
        m = results["metrics"].get(key)
        if m is None:
            continue
        digits = 3 if key.startswith("d_") else 0 if key.startswith("c_fanout_") else 2
        if key in {"d_hop_after_sleep", "c_fanout_cpu_per_step"}:
            digits = 2
        result = "—" if m["pass"] is None else ("pass" if m["pass"] else "MISS")
        rows.append((label, fmt(m["ours"], digits), fmt(m["raw"], digits), fmt(m["ratio"]), m["target"], result))
    print_table(rows)

    ours = results["chains"]["ours_noop"]["commands_by_name_per_step"]
    raw = results["chains"]["raw"]["commands_by_name_per_step"]
    lua = results["monitor"].get("ours", {}).get("in_lua_per_step", {})
    print()
    print("Redis commands per step, no-op chain (commandstats, idle background and status polls subtracted):")
    print(f"  {'command':<18}{'ours':>8}{'in Lua':>8}{'raw':>8}")
    for cmd in sorted(set(ours) | set(raw), key=lambda c: (-ours.get(c, 0.0), -raw.get(c, 0.0))):
        o, r = ours.get(cmd, 0.0), raw.get(cmd, 0.0)
        if abs(o) < 0.005 and abs(r) < 0.005:
            continue
        print(f"  {cmd:<18}{o:8.2f}{lua.get(cmd, 0.0):8.2f}{r:8.2f}")
    print(f"  {'total':<18}{sum(ours.values()):8.2f}{sum(lua.values()):8.2f}{sum(raw.values()):8.2f}")
    print("Redis a finished no-op chain keeps (MEMORY USAGE):")
    print_footprint(results["finished_run"]["ours"], {})
    fm = results["fanout_medians"]
    print()
    print(
        f"Fan-out 1→{cfg['fanout']} (medians): ours {fm['ours']['elapsed_s']:.3f}s (submit "
        f"{fm['ours']['submit_s'] * 1e3:.1f} ms, root done → last leaf started "
        f"{fm['ours']['root_done_to_last_leaf_start_s']:.3f}s, {fm['ours']['commands_per_step']:.1f} cmds/step); "
        f"raw group {fm['raw_group']['elapsed_s']:.3f}s (client publish {fm['raw_group']['client_publish_s']:.3f}s, "
        f"{fm['raw_group']['commands_per_step']:.1f} cmds/task); raw from worker {fm['raw_worker']['elapsed_s']:.3f}s "
        f"(publish in worker {fm['raw_worker'].get('worker_publish_s', math.nan):.3f}s)"
    )
    ch = results["chains"]

    def cpu_line(label: str, cpu: Mapping[str, float]) -> str:
        parts = ", ".join(f"{role} {ms:.2f}" for role, ms in cpu.items())
        return f"  {label:<28} total {sum(cpu.values()):5.2f}  ({parts})"

    print("CPU ms per step by process role (from /proc, medians):")
    print(cpu_line("no-op chain, ours", ch["ours_noop"]["cpu_ms_per_step"]))
    print(cpu_line("chain, raw", ch["raw"]["cpu_ms_per_step"]))
    print(cpu_line(f"fan-out 1→{cfg['fanout']}, ours", fm["ours"]["cpu_ms_per_step"]))
    print(cpu_line("raw group (client)", fm["raw_group"]["cpu_ms_per_step"]))
    print(cpu_line("raw group (worker)", fm["raw_worker"]["cpu_ms_per_step"]))
    print(
        f"Step service time p50 (start → end inside the step): ours no-op {ch['ours_noop']['service_p50_ms']:.2f} ms, "
        f"python {ch['ours_python']['service_p50_ms']:.2f} ms, raw {ch['raw']['service_p50_ms']:.3f} ms"
    )
    if results["slots"] < results["dag_width"]:
        print(f"Note: {results['slots']} pool slots < DAG width {results['dag_width']}: (d) cannot reach 1.0.")
    env = results["environment"]
    before, after = env["loadavg_1_5_15_before"][0], env["loadavg_1_5_15_after"][0]
    print(
        f"Machine: {env['cpus']} CPUs; 1-min load average {before:.2f} before, {after:.2f} after "
        "(other processes share the CPUs: ours and raw runs are interleaved so they share the noise too)"
    )
    idle = results["idle_commands_per_s"]
    parts = ", ".join(f"{c} {v:.2f}" for c, v in sorted(idle.items(), key=lambda kv: -kv[1]))
    print(f"Idle background subtracted: {sum(idle.values()):.1f} cmds/s ({parts})")


def source_fingerprint() -> str:
    """A hash of the product code the workers run, to notice it changing under a running benchmark."""
    digest = hashlib.sha256()
    for folder in ("orchestrator", "workers"):
        for path in sorted((REPO_ROOT / folder).rglob("*")):
            if path.suffix in {".py", ".lua"} and path.is_file():
                digest.update(str(path.relative_to(REPO_ROOT)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# -- main ------------------------------------------------------------------------------------------------------------


def measure(cfg: Config) -> dict[str, Any]:
    """Start Redis and the workers, run the benchmark, stop them."""
    started = time.monotonic()
    load_before = os.getloadavg()
    code_before = source_fingerprint()  # of the code the workers about to start will load
    logs = log_dir(LOGS)
    with record_dir("orchestrator-bench-") as records, private_redis() as server:
        env = worker_env(server.url, TASKS_MODULE, record_dir=records)
        client = Client(Settings.from_env({"REDIS_URL": server.url, "ORCH_IMPORTS": TASKS_MODULE}))
        workers = pool_workers(client.app, cfg, env, logs)
        print(f"redis {server.url}; starting {cfg.workers} workers (logs in {logs})", file=sys.stderr)
        with running(workers, grace=10, timeout=180):  # a busy machine can take minutes to boot them
            bench = Bench(cfg, client, server.url, records, CpuProbe(workers, server.pid))
            bench.code_at_start = code_before
            results = bench.run()
            results["environment"] = {
                **versions(server.url),
                "loadavg_1_5_15_before": load_before,
                "loadavg_1_5_15_after": os.getloadavg(),
                "product_code_fingerprint": code_before,
            }
            if source_fingerprint() != code_before:
                results["notes"] = [
                    "product code changed on disk after the warm-up: the processes ran the code "
                    f"as loaded (fingerprint {code_before} at start)"
                ]
            print("stopping workers", file=sys.stderr)
    results["runtime_s"] = time.monotonic() - started
    return results


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)

    def measure_and_report() -> int:
        results = measure(cfg)
        results["command"] = cli.command("scripts.bench", argv)
        print_report(results)
        for note in results.get("notes", []):
            print(f"Note: {note}")
        for anomaly in results["anomalies"]:
            print(f"WARNING: {anomaly}: these figures are not a valid measurement; run again.")
        write_results(cfg.out, results)
        return 0

    return run_main(measure_and_report)


if __name__ == "__main__":
    sys.exit(main())
