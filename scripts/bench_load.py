#!/usr/bin/env python3
"""Load benchmark: thousands of content-pipeline runs in flight on one small machine, against raw Celery's floor.

Two measurements, each on a private Redis with real ``celery -A workers worker`` processes:

**The load** (default). ``--runs`` runs (10,000) of the seed's content pipeline, ``demo_pipeline``: research →
blog post → social posts, newsletter and SEO in parallel → final review; five ``llm`` steps with 1 s of simulated
latency (the offline provider) and one ``python`` step. They go through the ``llm`` worker (``--llm-pool``, threads by
default) and one prefork ``cpu`` worker (``--cpu-concurrency`` processes), submitted with ``Client.submit`` from
``--submit-threads`` threads. The ``llm`` worker is deployed as Operations recommends, one threads process per CPU
(``--llm-workers``, default the CPUs this process may run on), its 500 slots shared out between them
(``--llm-concurrency`` slots each; 200 in all with ``--quick``); ``--llm-workers 1`` puts them all in one process,
whose single interpreter lock then caps its steps/s (docs/benchmarks.md, "The llm worker bound by its own CPU").
Reported:

- submit rate (runs/s) and ``Client.submit`` latency;
- throughput (steps/s, first ``created_at`` → last ``finished_at``) and run latency p50/p99 (``created_at`` →
  ``finished_at`` of each run; with every run submitted at once this is mostly queueing);
- Redis memory (``INFO memory`` ``used_memory``) per in-flight run, at the moment most runs were in flight (finished
  runs at that moment are charged at the per-finished figure), and per finished run once all have finished (retention
  keeps them: outputs, events, reply cache); the peak of what the runs in flight hold (used memory less the finished
  runs at the per-finished figure, over the samples);
- a finished run's keys by ``MEMORY USAGE`` (a sample of 50 runs, :mod:`scripts.harness.footprint`): bytes per
  finished step beyond the outputs' own JSON, by key and by hash field;
- Redis commands per step: ``total_commands_processed`` less the benchmark's own polls, and by name from
  ``INFO commandstats`` (both count the commands run inside Lua scripts); socket reads per step
  (``total_reads_processed``, about one per client round trip, the submit and the benchmark's polls included);
- worker RSS (``/proc``: peak ``VmHWM`` and final ``VmRSS``) and CPU seconds per process role; how many CPUs the
  ``llm`` worker kept busy over the makespan, ours and each floor pass (one threads process near 1.0 is bound by its
  own CPU: its throughput then follows its CPU per step);
- the ratio to the **floor**: the same number of raw Celery tasks through the same two workers, published the same
  way (from the same number of threads, all at once), with no dependencies between them: one raw task per ``llm``
  step on the ``llm`` queue and one ``bench.raw_noop`` per ``python`` step on the ``cpu`` queue. Two floors
  (``--floor``, both by default):

  - ``llm``: each ``llm`` step's raw task (``bench.raw_llm``) makes the very call the step makes (its prompt as the
    step renders it, from a warm-up run's outputs; the same model, ``max_tokens``, system prompt and simulated
    latency) through the same offline provider, the real Anthropic SDK over an in-process transport. That is Celery
    alone running the same LLM calls: what is left above it is the orchestration (state, leases, events, templates,
    the gateway's cache, limits and budget), which is what the ratio is about.
  - ``sleep``: ``bench.raw_sleep`` of the step's latency, no call: Celery alone moving the messages. Ours pays the
    SDK and the simulated provider (about 0.9 ms of CPU a call on this machine) on top of the orchestration here.

  Each runs in two halves, before and after ours, so it shares the machine's drift. Neither pass is polled: the
  floor's tasks write their times to files, and ours are followed through the run-end announcements of the global
  stream (``orch:events``, one read per sample, as a dashboard follows them), each run's summary read once when all
  have ended (:class:`~scripts.harness.runs.RunEnds`).

- with ``--cpu-sections``, the llm worker's CPU per LLM call, ours beside the ``llm`` floor: the whole process's and
  each section's (the SDK call, the finish, round trips, publishes, Celery's task …), by the calling threads' own
  CPU clocks (:mod:`scripts.harness.cpu_sections`; about 2 us a wrapped call, 1% of a step).

**The pools** (``--pools threads,gevent``). One worker process per pool, ``-P POOL -c --concurrency`` on the ``llm``
queue, ``--steps`` single-step runs of one ``llm`` step (1 s simulated latency), and the same number of raw
``bench.raw_sleep(1)`` tasks on the same worker, interleaved over ``--reps`` repetitions (rotating order), medians
reported: throughput, step latency (started → finished, and queued → finished), worker CPU, peak RSS, threads, time to
shut down.

Usage::

    python -m scripts.bench_load                          # 10,000 runs (20-30 minutes on 2 cores)
    python -m scripts.bench_load --quick                  # 300 runs, about 2 minutes
    python -m scripts.bench_load --pools threads,gevent   # the pool comparison, about 3 minutes
    python -m scripts.bench_load --quick --priorities off # first in, first out, for comparison
    python -m scripts.bench_load --floor llm --llm-workers 1    # the 500 threads in one process: one GIL's ceiling
    python -m scripts.bench_load --runs 4000 --floor llm --cpu-sections   # where each millisecond goes

gevent must be installed for ``-P gevent`` (``pip install gevent``). Results go to ``test-artifacts/bench_load.json``
(``--json PATH``); worker logs to ``test-artifacts/bench-load-logs/``. It exits 1 when a run did not succeed.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # `python scripts/bench_load.py`: run as `python -m scripts.bench_load`
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, [sys.executable, "-m", "scripts.bench_load", *sys.argv[1:]])

import collections
import statistics
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from orchestrator import Client, Settings, WorkflowSpec, parse_workflow
from orchestrator.definition.spec import LLMParams
from orchestrator.definition.templates import render
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.engine.status import RunView
from orchestrator.engine.steps import StepContext
from orchestrator.infra.cpus import worker_cpus
from orchestrator.llm.structured import structured_output_instruction
from orchestrator.state import keys
from scripts.harness import cli, cpu_sections, probes
from scripts.harness.footprint import finished_run_bytes, print_footprint
from scripts.harness.lifecycle import log_dir, private_redis, record_dir, run_main, running, worker_env
from scripts.harness.records import RecordReader
from scripts.harness.report import ARTIFACTS, Progress, fmt, ts, versions, write_results
from scripts.harness.runs import FINISHED, RunEnds, Submitted, burst, wait_until
from scripts.harness.stats import delta, percentile

LOGS = "bench-load-logs"
SECTIONS = "bench-load-sections"  # the llm worker's CPU by section (--cpu-sections)
IMPORTS = "examples.content_pipeline,scripts.steps.bench"
FLOORS = ("llm", "sleep")
ENDS_SILENT_S = 30.0
"""Seconds without a run-end announcement, runs still going, after which the wait reads every pending run's status."""
LLM_QUEUE, CPU_QUEUE = "llm", "cpu"
SWITCHES = ("llm_voluntary_switches", "llm_involuntary_switches")
"""The llm worker's context switches in a probe's snapshot (its threads', from ``/proc``)."""


# -- configuration -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """What to run, after ``--quick`` and the explicit flags are applied."""

    runs: int
    llm_pool: str
    llm_concurrency: int
    llm_workers: int
    cpu_concurrency: int
    submit_threads: int
    floors: tuple[str, ...]
    timeout_s: float
    sample_s: float
    pools: tuple[str, ...]
    steps: int
    concurrency: int
    reps: int
    loglevel: str
    worker_env: dict[str, str]
    llm_cpus: str | None
    cpu_sections: bool
    quick: bool
    out: Path


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = cli.parser(__doc__, name="bench_load", quick="300 runs, 200 pool steps, 1 rep: a couple of minutes")
    parser.add_argument("--runs", type=int, default=None, help="content-pipeline runs (default 10000, quick 300)")
    parser.add_argument("--llm-pool", default="threads", help="pool of the llm worker (default threads)")
    parser.add_argument(
        "--llm-concurrency",
        type=int,
        default=None,
        help="slots of each llm worker process (default 500 in all, quick 200, shared out between the processes)",
    )
    parser.add_argument(
        "--llm-workers",
        type=int,
        default=None,
        help="llm worker processes (default one per CPU this process may run on, as docs/operations.md recommends)",
    )
    parser.add_argument(
        "--llm-cpus",
        default=None,
        metavar="CPUS",
        help="pin the llm worker (every llm process) to these CPUs, ORCH_WORKER_CPUS, e.g. 1 (default: unpinned)",
    )
    parser.add_argument("--cpu-concurrency", type=int, default=2, help="cpu worker prefork processes (default 2)")
    parser.add_argument("--submit-threads", type=int, default=4, help="threads calling Client.submit (default 4)")
    parser.add_argument(
        "--floor",
        choices=("both", *FLOORS, "none"),
        default="both",
        help="the raw Celery floor: llm (the same LLM calls), sleep (sleeps of their latency), both (default), none",
    )
    parser.add_argument("--no-floor", action="store_true", help="skip the raw Celery floor (as --floor none)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds the runs may take (default 3600)")
    parser.add_argument("--sample-s", type=float, default=2.0, help="seconds between progress samples (default 2)")
    parser.add_argument("--pools", default="", help="compare these pools instead (e.g. threads,gevent)")
    parser.add_argument("--steps", type=int, default=None, help="pools: LLM steps per pool and rep (default 500)")
    parser.add_argument("--concurrency", type=int, default=100, help="pools: slots of the worker (default 100)")
    parser.add_argument("--reps", type=int, default=None, help="pools: repetitions (default 3, quick 1)")
    parser.add_argument(
        "--priorities",
        choices=("depth", "off"),
        default=Settings().priorities,
        help="ORCH_PRIORITIES of the producer and the workers (default: the setting's)",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra worker environment, e.g. ORCH_LEASE_S=30 (repeatable)",
    )
    parser.add_argument(
        "--cpu-sections",
        action="store_true",
        help="the llm worker's thread CPU by section, per LLM call, ours and the floor (scripts/harness/cpu_sections)",
    )
    parser.add_argument(
        "--section",
        action="append",
        default=[],
        metavar="LABEL=MODULE:ATTR",
        help="with --cpu-sections, another function to account, e.g. pack=orchestrator.infra.redis_roundtrip:_pack",
    )
    ns = parser.parse_args(argv)
    quick = bool(ns.quick)
    llm_workers = available_cpus() if ns.llm_workers is None else ns.llm_workers
    if llm_workers < 1:
        parser.error(f"--llm-workers must be at least 1, not {llm_workers}")
    if ns.llm_concurrency is not None and ns.llm_concurrency < 1:
        parser.error(f"--llm-concurrency must be at least 1, not {ns.llm_concurrency}")
    extra = {"ORCH_PRIORITIES": ns.priorities, **dict(item.split("=", 1) for item in ns.worker_env)}
    if ns.llm_cpus is not None:
        try:
            worker_cpus(ns.llm_cpus)  # one this machine lacks fails here, not in the worker
        except ValueError as exc:
            parser.error(str(exc))
    if ns.cpu_sections and ns.pools:
        parser.error("--cpu-sections measures the load, not --pools")
    if ns.section and not ns.cpu_sections:
        parser.error("--section goes with --cpu-sections")
    if ns.cpu_sections:
        more = ",".join(ns.section)
        try:
            cpu_sections.parse_sections(more)  # a malformed one fails here, not in the workers
        except ValueError as exc:
            parser.error(str(exc))
        extra |= {
            cpu_sections.DIR_ENV: str(ARTIFACTS / SECTIONS),
            cpu_sections.MORE_ENV: more,
            "ORCH_IMPORTS": f"{extra.get('ORCH_IMPORTS', IMPORTS)},{cpu_sections.__name__}",
        }
    return Config(
        runs=ns.runs or (300 if quick else 10_000),
        llm_pool=ns.llm_pool,
        llm_concurrency=ns.llm_concurrency or -(-(200 if quick else 500) // llm_workers),  # each process's share
        llm_workers=llm_workers,
        llm_cpus=ns.llm_cpus,
        cpu_concurrency=ns.cpu_concurrency,
        submit_threads=max(1, ns.submit_threads),
        floors=() if ns.no_floor or ns.floor == "none" else FLOORS if ns.floor == "both" else (ns.floor,),
        timeout_s=ns.timeout,
        sample_s=ns.sample_s,
        pools=tuple(p for p in ns.pools.split(",") if p),
        steps=ns.steps or (200 if quick else 500),
        concurrency=ns.concurrency,
        reps=ns.reps or (1 if quick else 3),
        loglevel=ns.loglevel,
        worker_env=extra,
        cpu_sections=bool(ns.cpu_sections),
        quick=quick,
        out=ns.json,
    )


# -- workflows ---------------------------------------------------------------------------------------------------------


def pipeline_spec() -> WorkflowSpec:
    """The seed's content pipeline with 1 s of simulated latency on each LLM step."""
    from examples.content_pipeline import demo_pipeline

    return demo_pipeline.spec


def single_llm_spec(latency_s: float) -> WorkflowSpec:
    """One ``llm`` step, for the pool comparison."""
    return parse_workflow(
        {
            "name": "bench_load_llm",
            "inputs": {"topic": {"type": "string"}},
            "steps": [
                {
                    "name": "ask",
                    "uses": "llm",
                    "with": {
                        "prompt": "Three facts about {{ inputs.topic }}.",
                        "max_tokens": 200,
                        "simulate": {"latency_s": latency_s},
                    },
                }
            ],
        }
    )


def llm_requests(spec: WorkflowSpec, run: RunView) -> list[dict[str, Any]]:
    """The LLM calls a finished run of ``spec`` made, one per ``llm`` step in order, as ``LLMRequest`` fields: each
    step's prompt and system prompt rendered from the run's inputs and its dependencies' outputs as the step renders
    them (the structured-output instruction appended to the system prompt when it has a schema)."""
    requests: list[dict[str, Any]] = []
    for step in spec.steps:
        params = step.params
        if not isinstance(params, LLMParams):
            continue
        outputs = {dep: run["steps"][dep]["output"] for dep in step.depends_on}
        variables = StepContext(run["run_id"], step.name, 1, run["inputs"], outputs).template_context()
        system = render(params.system, variables) if params.system else None
        if params.output_schema is not None:
            instruction = structured_output_instruction(params.output_schema)
            system = f"{system}\n\n{instruction}" if system else instruction
        simulate = params.simulate.model_dump(exclude_none=True) if params.simulate else None
        requests.append(
            {
                "model": params.model,
                "prompt": render(params.prompt, variables),
                "max_tokens": params.max_tokens,
                "system": system,
                "temperature": params.temperature,
                "simulate": simulate,
            }
        )
    return requests


def step_latency_s(spec: WorkflowSpec) -> float:
    """The simulated latency of the spec's LLM steps (the floor's raw tasks sleep as long)."""
    for step in spec.steps:
        simulate = getattr(step.params, "simulate", None)
        if simulate is not None:
            return float(simulate.latency_s)
    return 0.0


# -- measuring processes -----------------------------------------------------------------------------------------------


class Probes:
    """CPU seconds by role (llm worker, cpu worker main and children, redis, this process) and Redis's command count."""

    def __init__(self, llm: LocalWorkers, cpu: LocalWorkers | None, redis_pid: int | None, stats: redis.Redis) -> None:
        self.llm = llm
        self.cpu = cpu
        self.redis_pid = redis_pid
        self.stats = stats

    def snapshot(self) -> dict[str, float]:
        out = {
            "llm_worker": sum(probes.workers_cpu_s(self.llm)),
            "redis": probes.cpu_s(self.redis_pid),
            "bench_client": probes.cpu_s(os.getpid()),
        }
        if self.cpu is not None:
            out["cpu_worker_main"], out["cpu_worker_children"] = probes.workers_cpu_s(self.cpu)
        voluntary, involuntary = probes.workers_context_switches(self.llm)
        out[SWITCHES[0]], out[SWITCHES[1]] = float(voluntary), float(involuntary)
        out["redis_commands"] = float(probes.total_commands(self.stats))
        out["redis_reads"] = float(probes.total_reads(self.stats))
        return out

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: round(v, 3) for k, v in delta(before, after).items()}


# -- the load ----------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One progress sample of the load."""

    t: float
    submitted: int
    finished: int
    used_memory: int
    llm_rss_mb: float


class LoadBench:
    """Runs the load and its floor on one set of workers."""

    def __init__(
        self, cfg: Config, client: Client, url: str, redis_pid: int | None, record_dir: str, *, logs: Path
    ) -> None:
        self.cfg = cfg
        self.logs = logs
        self.client = client
        self.url = url
        self.redis_pid = redis_pid
        self.record_dir = record_dir
        self.stats = redis.Redis.from_url(url, decode_responses=True)
        self.records = RecordReader(record_dir)
        self.spec = pipeline_spec()
        self.latency_s = step_latency_s(self.spec)
        self.llm_steps = sum(1 for s in self.spec.steps if s.uses.value == "llm")
        self.cpu_steps = len(self.spec.steps) - self.llm_steps
        self.log = Progress()
        self.worker_errors: dict[str, int] = {}
        self.llm_requests: list[dict[str, Any]] = []  # the LLM calls of one run, for the llm floor
        self.polled = 0  # commands this benchmark sent to follow the runs, taken out of the per-step count
        # Of which those commandstats counts (it leaves INFO out), by name.
        self.polled_by_name: collections.Counter[str] = collections.Counter()
        self.commands: dict[str, int] = {}  # commandstats over the load (commands inside Lua included)

    @contextmanager
    def workers(self) -> Iterator[tuple[LocalWorkers, LocalWorkers]]:
        env = worker_env(self.url, IMPORTS, record_dir=self.record_dir, **self.cfg.worker_env)
        cfg = self.cfg
        llm = LocalWorkers(
            self.client.app,
            count=cfg.llm_workers,
            env=env if cfg.llm_cpus is None else {**env, "ORCH_WORKER_CPUS": cfg.llm_cpus},
            pool=cfg.llm_pool,
            concurrency=cfg.llm_concurrency,
            queues=(LLM_QUEUE,),
            log_dir=self.logs,
            loglevel=cfg.loglevel,
        )
        cpu = LocalWorkers(
            self.client.app,
            count=1,
            env=env,
            pool="prefork",
            concurrency=cfg.cpu_concurrency,
            queues=(CPU_QUEUE,),
            log_dir=self.logs,
            loglevel=cfg.loglevel,
        )
        with running(llm, grace=30, timeout=300), running(cpu, grace=30, timeout=300):
            yield llm, cpu

    def warm_up(self) -> None:
        """A few runs and raw tasks, so imports, connections and script loading are paid before measuring."""
        ids = [self.client.submit(self.spec, {"topic": f"warm-up {i}"}) for i in range(4)]
        self._wait_runs(ids, timeout=300, samples=None)
        self.llm_requests = llm_requests(self.spec, self.client.status(ids[0]))
        for kind in self.cfg.floors:
            self._floor_pass(f"warm-up-{kind}", 8, kind)

    # -- ours --

    def ours(self, llm: LocalWorkers, cpu: LocalWorkers) -> dict[str, Any]:
        cfg = self.cfg
        meter = Probes(llm, cpu, self.redis_pid, self.stats)
        base_memory = probes.used_memory(self.stats)
        samples: list[Sample] = []
        progress = Submitted()
        sections = self._sections() if cfg.cpu_sections else None
        self.stats.config_resetstat()  # commandstats from here (total_commands_processed too: read just after)
        cpu_before = meter.snapshot()
        self.polled = 0
        self.polled_by_name.clear()
        ends = RunEnds(self.stats, self.client.settings.shards)  # before the first submit: only these runs' ends
        self._polled(ends.commands, "xrevrange")
        self.log(f"ours: submitting {cfg.runs} runs from {cfg.submit_threads} threads")

        def submit(i: int) -> str:
            return self.client.submit(self.spec, {"topic": f"load topic {i}"})

        done = threading.Event()
        errors: list[BaseException] = []

        def submitter() -> None:
            try:
                burst(cfg.runs, cfg.submit_threads, submit, progress)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=submitter, name="bench-submitter", daemon=True)
        thread.start()
        finished = self._wait_runs(
            progress.ids, timeout=cfg.timeout_s, samples=samples, llm=llm, submitting=done, ends=ends
        )
        thread.join()
        if errors:
            raise errors[0]
        cpu_used = Probes.delta(cpu_before, meter.snapshot())
        sections_used = cpu_sections.per_llm_call(sections, self._sections()) if sections is not None else None
        self.commands = probes.commandstats(self.stats)
        for name, count in self.polled_by_name.items():
            self.commands[name] = self.commands.get(name, 0) - count
        after_memory = probes.used_memory(self.stats)
        self.log(f"ours: all {len(finished)} runs ended; reading their status")
        summary = self._summarise_ours(
            progress=progress,
            finished=finished,
            samples=samples,
            base_memory=base_memory,
            after_memory=after_memory,
            cpu_used=cpu_used,
            llm=llm,
            cpu=cpu,
        )
        if sections_used is not None:
            summary["cpu_sections"] = sections_used
        return summary

    def _sections(self) -> dict[str, Any]:
        """The llm workers' CPU by section so far (``--cpu-sections``), written after this call began."""
        return cpu_sections.read_totals(ARTIFACTS / SECTIONS, LLM_QUEUE, newer_than=time.time())

    def _wait_runs(
        self,
        ids: list[str],
        *,
        timeout: float,
        samples: list[Sample] | None,
        llm: LocalWorkers | None = None,
        submitting: threading.Event | None = None,
        ends: RunEnds | None = None,
    ) -> dict[str, dict[str, str]]:
        """Wait until every run has ended (and submission is over), sampling progress meanwhile; returns each run's
        summary.

        With ``ends`` the runs' end announcements tell which have ended, and the summaries are read once, when all
        have (the measured pass: polling each pending run's status would load Redis and this process, and so the
        machine the workers share, as the floor's pass is not). They are read too after :data:`ENDS_SILENT_S` without
        an announcement while runs remain; should they find more runs ended than were announced (a trimmed stream),
        or a run still going once all were announced, it polls each pending run's summary from then on.
        """
        deadline = time.monotonic() + timeout
        finished: dict[str, dict[str, str]] = {}
        last_log = last_end = 0.0
        while True:
            seen = len(ids)
            over = submitting is None or submitting.is_set()
            if ends is None:
                ended = self._read_summaries(ids, finished)
            else:
                before = ends.commands
                if ends.poll() or not last_end:
                    last_end = time.monotonic()
                self._polled(ends.commands - before, "xread")
                ended = len(ends.ended)
                if (over and ended >= len(ids)) or time.monotonic() - last_end > ENDS_SILENT_S:
                    last_end = time.monotonic()
                    ended = self._read_summaries(ids, finished)
                    if ended > len(ends.ended) or (over and ended < len(ids)):
                        ends = None  # announcements missed: poll the pending runs from now on
            if samples is not None:
                self._polled(1, "")  # INFO memory
                rss = probes.workers_memory_mb(llm)["main_rss_mb"] if llm is not None else 0.0
                samples.append(Sample(time.time(), seen, ended, probes.used_memory(self.stats), rss))
            if over and len(finished) >= len(ids):
                return finished
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(ids) - ended} runs still going after {timeout}s (logs: {self.logs})")
            if samples is not None and time.monotonic() - last_log > 15:
                last_log = time.monotonic()
                self.log(f"ours: {seen} submitted, {ended} finished, Redis {samples[-1].used_memory / 2**20:.0f} MB")
            time.sleep(self.cfg.sample_s if samples is not None else 0.2)

    def _read_summaries(self, ids: list[str], finished: dict[str, dict[str, str]]) -> int:
        """Read the summary of each run not known to have finished into ``finished``; returns how many have."""
        pending = [r for r in ids if r not in finished]
        for row in self.client.store.run_summaries(pending):
            if row["status"] in FINISHED:
                finished[row["run_id"]] = row
        self._polled(len(pending), "hmget")
        return len(finished)

    def _polled(self, commands: int, name: str) -> None:
        """Count commands sent to follow the runs (``name`` as commandstats names them, ``""`` if it does not)."""
        self.polled += commands
        if name:
            self.polled_by_name[name] += commands

    def _summarise_ours(
        self,
        *,
        progress: Submitted,
        finished: dict[str, dict[str, str]],
        samples: list[Sample],
        base_memory: int,
        after_memory: int,
        cpu_used: dict[str, float],
        llm: LocalWorkers,
        cpu: LocalWorkers,
    ) -> dict[str, Any]:
        rows = list(finished.values())
        statuses = collections.Counter(row["status"] for row in rows)
        created = [float(row["created_at"]) for row in rows]
        ended = [float(row["finished_at"]) for row in rows if row["finished_at"]]
        latencies = [float(row["finished_at"]) - float(row["created_at"]) for row in rows if row["finished_at"]]
        steps = len(rows) * len(self.spec.steps)
        makespan = max(ended) - min(created)
        per_finished = (after_memory - base_memory) / len(rows)
        # The moment most runs were in flight; runs finished by then are charged at the per-finished figure.
        peak = max(samples, key=lambda s: (s.submitted - s.finished, -s.t))
        in_flight = peak.submitted - peak.finished
        per_in_flight = (peak.used_memory - base_memory - peak.finished * per_finished) / max(1, in_flight)
        # What the runs not yet finished hold (state, events, messages), at its largest: priorities move this peak.
        in_flight_peak = max(s.used_memory - base_memory - s.finished * per_finished for s in samples)
        detail = self._step_detail(list(finished)[:: max(1, len(finished) // 500)])
        footprint = finished_run_bytes(self.stats, list(finished)[:: max(1, len(finished) // 50)])
        return {
            "runs": len(rows),
            "statuses": dict(statuses),
            "steps": steps,
            "submit": {
                "rate_runs_per_s": round(progress.rate, 1),
                "seconds": round(progress.ended - progress.started, 2),
                "call_p50_ms": round(percentile(progress.latencies, 0.5) * 1000, 2),
                "call_p99_ms": round(percentile(progress.latencies, 0.99) * 1000, 2),
                "threads": self.cfg.submit_threads,
            },
            "makespan_s": round(makespan, 2),
            "steps_per_s": round(steps / makespan, 1),
            "run_latency_p50_s": round(percentile(latencies, 0.5), 2),
            "run_latency_p99_s": round(percentile(latencies, 0.99), 2),
            "run_latency_max_s": round(max(latencies), 2),
            "redis": {
                "base_used_memory_mb": round(base_memory / 2**20, 1),
                "peak_in_flight_runs": in_flight,
                "finished_at_peak": peak.finished,
                "used_memory_at_peak_mb": round(peak.used_memory / 2**20, 1),
                "bytes_per_in_flight_run": round(per_in_flight),
                "bytes_per_finished_run": round(per_finished),
                "used_memory_after_mb": round(after_memory / 2**20, 1),
                "max_used_memory_mb": round(max(s.used_memory for s in samples) / 2**20, 1),
                "in_flight_memory_peak_mb": round(in_flight_peak / 2**20, 1),
                "commands_per_step": round((cpu_used.pop("redis_commands") - self.polled) / steps, 1),
                "reads_per_step": round(cpu_used.pop("redis_reads") / steps, 2),
                "commands_by_name_per_step": {
                    name: round(n / steps, 2) for name, n in sorted(self.commands.items(), key=lambda kv: -kv[1])
                },
                "finished_run": footprint,
            },
            "llm_worker_switches_per_call": _switches(cpu_used, len(rows) * self.llm_steps),
            "llm_worker_cpus_busy": _busy(cpu_used, makespan),
            "cpu_s": cpu_used,
            "cpu_ms_per_step": round(sum(v for k, v in cpu_used.items() if k != "bench_client") / steps * 1000, 3),
            "llm_worker_memory": probes.workers_memory_mb(llm),
            "cpu_worker_memory": probes.workers_memory_mb(cpu),
            "steps_detail": detail,
            "timeline": [_timeline_point(s, samples[0].t) for s in samples],
        }

    def _step_detail(self, run_ids: list[str]) -> dict[str, Any]:
        """Step latencies from the status JSON of a sample of runs: execution (started → finished) and queueing."""
        by_kind: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        attempts = 0
        for run_id in run_ids:
            view = self.client.status(run_id)
            for step in view["steps"].values():
                queued = step["queued_at"] or view["created_at"]
                series_of = by_kind[step["kind"]]
                series_of["run_s"].append(ts(step["finished_at"]) - ts(step["started_at"]))
                series_of["wait_s"].append(ts(step["started_at"]) - ts(queued))
                attempts += step["attempts"] - 1
        out: dict[str, Any] = {"sampled_runs": len(run_ids), "extra_attempts": attempts}
        for kind, series in by_kind.items():
            for name, values in series.items():
                out[f"{kind}_{name}_p50"] = round(percentile(values, 0.5), 3)
                out[f"{kind}_{name}_p99"] = round(percentile(values, 0.99), 3)
        return out

    # -- the floor --

    def _floor_pass(self, tag: str, runs: int, kind: str) -> dict[str, Any]:
        """Publish ``runs`` x (one raw LLM call or sleep per llm step, one raw no-op per cpu step) and wait for all of
        them."""
        send = self.client.app.send_task  # explicit app: a shared task in a thread would use Celery's default app
        per_run = self.llm_steps + self.cpu_steps
        total = runs * per_run

        def publish(i: int) -> str:
            k = i % per_run
            if k < self.llm_steps and kind == "llm":
                send("bench.raw_llm", (tag, i, self.llm_requests[k]), queue=LLM_QUEUE)
            elif k < self.llm_steps:
                send("bench.raw_sleep", (tag, i, self.latency_s), queue=LLM_QUEUE)
            else:
                send("bench.raw_noop", (tag, i), queue=CPU_QUEUE)
            return ""

        sent = burst(total, self.cfg.submit_threads, publish)
        records = self.records.wait(tag, total, timeout=self.cfg.timeout_s, poll_s=0.5)
        makespan = max(r.end for r in records) - sent.started
        return {
            "tasks": total,
            "publish_rate_per_s": round(sent.rate, 1),
            "makespan_s": round(makespan, 2),
            "tasks_per_s": round(total / makespan, 1),
        }

    def floor(self, llm: LocalWorkers, cpu: LocalWorkers, kind: str, half: str, runs: int) -> dict[str, Any]:
        meter = Probes(llm, cpu, self.redis_pid, self.stats)
        before = meter.snapshot()
        sections = self._sections() if self.cfg.cpu_sections else None
        self.log(f"{kind} floor ({half}): {runs * (self.llm_steps + self.cpu_steps)} raw tasks")
        result = self._floor_pass(f"floor-{kind}-{half}-{uuid.uuid4().hex[:8]}", runs, kind)
        used = Probes.delta(before, meter.snapshot())
        if sections is not None:
            result["cpu_sections"] = cpu_sections.per_llm_call(sections, self._sections())
        result["commands_per_task"] = round(used.pop("redis_commands") / result["tasks"], 1)
        result["reads_per_task"] = round(used.pop("redis_reads") / result["tasks"], 2)
        calls = result["tasks"] * self.llm_steps // (self.llm_steps + self.cpu_steps)
        result["llm_worker_switches_per_call"] = _switches(used, calls)
        result["llm_worker_cpus_busy"] = _busy(used, result["makespan_s"])
        result["cpu_s"] = used
        result["cpu_ms_per_task"] = round(
            sum(v for k, v in used.items() if k != "bench_client") / result["tasks"] * 1000, 3
        )
        self.log(f"{kind} floor ({half}): {result['tasks_per_s']} tasks/s")
        return result

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        with self.workers() as (llm, cpu):
            self.log(
                f"workers up: llm {cfg.llm_workers}x -P {cfg.llm_pool} -c {cfg.llm_concurrency}{_pinned(cfg)}, "
                f"cpu -P prefork -c {cfg.cpu_concurrency}"
            )
            self.warm_up()
            floors: dict[str, list[dict[str, Any]]] = {kind: [] for kind in cfg.floors}
            first_half = cfg.runs // 2
            for kind in cfg.floors:
                floors[kind].append(self.floor(llm, cpu, kind, "before", first_half))
            ours = self.ours(llm, cpu)
            for kind in reversed(cfg.floors):  # the floors surround ours in mirror order: each shares its drift
                floors[kind].append(self.floor(llm, cpu, kind, "after", cfg.runs - first_half))
        self.worker_errors = scan_logs(self.logs)
        result: dict[str, Any] = {"ours": ours, "floors": {}}
        for kind, passes in floors.items():
            tasks = sum(f["tasks"] for f in passes)
            seconds = sum(f["makespan_s"] for f in passes)
            cpu_ms = sum(f["cpu_ms_per_task"] * f["tasks"] for f in passes) / tasks
            result["floors"][kind] = {
                "passes": passes,
                "tasks": tasks,
                "tasks_per_s": round(tasks / seconds, 1),
                "cpu_ms_per_task": round(cpu_ms, 3),
                "throughput_ours_over_floor": round(ours["steps_per_s"] / (tasks / seconds), 3),
                "cpu_per_step_ours_over_floor": round(ours["cpu_ms_per_step"] / cpu_ms, 2),
            }
        result["worker_log_problems"] = self.worker_errors
        return result


def available_cpus() -> int:
    """How many CPUs this process may run on (its affinity set: a container's cpuset, a ``taskset``), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _pinned(cfg: Config) -> str:
    return "" if cfg.llm_cpus is None else f" on CPU {cfg.llm_cpus}"


def _switches(used: dict[str, float], calls: int) -> dict[str, float]:
    """The llm worker's context switches per LLM call, voluntary and involuntary, taken out of ``used``."""
    return {
        name.removeprefix("llm_").removesuffix("_switches"): round(used.pop(name) / max(1, calls), 1)
        for name in SWITCHES
    }


def _busy(used: dict[str, float], seconds: float) -> float:
    """How many CPUs the llm worker kept busy on average over ``seconds`` (1.0: one CPU all the time; its processes
    summed). One threads process near 1.0 is bound by its own CPU: its throughput then follows its CPU per step."""
    return round(used.get("llm_worker", 0.0) / max(seconds, 1e-9), 2)


def _timeline_point(sample: Sample, t0: float) -> dict[str, Any]:
    return {
        "t": round(sample.t - t0, 1),
        "submitted": sample.submitted,
        "finished": sample.finished,
        "used_memory_mb": round(sample.used_memory / 2**20, 1),
        "llm_rss_mb": sample.llm_rss_mb,
    }


def scan_logs(directory: Path) -> dict[str, int]:
    """Error lines in the worker logs of this benchmark, by file (``Too many connections``, tracebacks …)."""
    out: dict[str, int] = {}
    for path in sorted(directory.glob("*.log")):
        text = path.read_text(errors="replace")
        count = sum(1 for line in text.splitlines() if "ERROR" in line or "Traceback" in line or "CRITICAL" in line)
        if count:
            out[path.name] = count
    return out


# -- the pools -----------------------------------------------------------------------------------------------------


class PoolBench:
    """One ``llm`` worker per pool: our single-LLM-step runs and raw sleeps of the same latency, interleaved."""

    def __init__(
        self, cfg: Config, client: Client, url: str, redis_pid: int | None, record_dir: str, *, logs: Path
    ) -> None:
        self.cfg = cfg
        self.logs = logs
        self.client = client
        self.url = url
        self.redis_pid = redis_pid
        self.record_dir = record_dir
        self.stats = redis.Redis.from_url(url, decode_responses=True)
        self.records = RecordReader(record_dir)
        self.spec = single_llm_spec(1.0)
        self.log = Progress()

    def one(self, pool: str, rep: int) -> dict[str, Any]:
        cfg = self.cfg
        env = worker_env(self.url, IMPORTS, record_dir=self.record_dir, **cfg.worker_env)
        workers = LocalWorkers(
            self.client.app,
            count=1,
            env=env,
            pool=pool,
            concurrency=cfg.concurrency,
            queues=(LLM_QUEUE,),
            log_dir=self.logs,
            loglevel=cfg.loglevel,
        )
        started = time.monotonic()
        workers.start(timeout=300)
        out: dict[str, Any] = {"pool": pool, "rep": rep, "start_s": round(time.monotonic() - started, 2)}
        try:  # not `running`: how long the pool takes to stop is one of the figures
            meter = Probes(workers, None, self.redis_pid, self.stats)
            self._ours(8, meter)  # warm-up: imports, connections, scripts
            self._raw(8, meter)
            order = [self._ours, self._raw] if rep % 2 == 0 else [self._raw, self._ours]
            for measure in order:
                out.update(measure(cfg.steps, meter))
            out["memory"] = probes.workers_memory_mb(workers)
        finally:
            stopping = time.monotonic()
            workers.stop(grace=60)
            out["stop_s"] = round(time.monotonic() - stopping, 2)
        self.log(f"{pool} rep {rep}: ours {out['ours_steps_per_s']} steps/s, raw {out['raw_tasks_per_s']} tasks/s")
        return out

    def _ours(self, count: int, meter: Probes) -> dict[str, Any]:
        before = meter.snapshot()
        sent = burst(count, self.cfg.submit_threads, lambda i: self.client.submit(self.spec, {"topic": f"t{i}"}))
        views = []
        for run_id in sent.ids:
            views.append(self._wait(run_id))
        used = Probes.delta(before, meter.snapshot())
        steps = [v["steps"]["ask"] for v in views]
        run_s = [ts(s["finished_at"]) - ts(s["started_at"]) for s in steps]
        total_s = [ts(s["finished_at"]) - ts(v["created_at"]) for s, v in zip(steps, views, strict=True)]
        makespan = max(ts(s["finished_at"]) for s in steps) - sent.started
        return {
            "ours_ok": sum(v["status"] == "succeeded" for v in views),
            "ours_steps": count,
            "ours_steps_per_s": round(count / makespan, 1),
            "ours_run_p50_s": round(percentile(run_s, 0.5), 3),
            "ours_run_p99_s": round(percentile(run_s, 0.99), 3),
            "ours_total_p50_s": round(percentile(total_s, 0.5), 3),
            "ours_total_p99_s": round(percentile(total_s, 0.99), 3),
            "ours_worker_cpu_s": used["llm_worker"],
            "ours_cpu_ms_per_step": round(used["llm_worker"] / count * 1000, 2),
            "ours_redis_cpu_s": used["redis"],
        }

    def _wait(self, run_id: str) -> RunView:
        key = keys.run_key(run_id)
        wait_until(
            lambda: self.stats.hget(key, "status") in FINISHED,
            timeout=self.cfg.timeout_s,
            poll_s=0.05,
            what=f"run {run_id} ended",
        )
        return self.client.status(run_id)

    def _raw(self, count: int, meter: Probes) -> dict[str, Any]:
        send = self.client.app.send_task
        tag = f"pool-{uuid.uuid4().hex[:8]}"
        before = meter.snapshot()
        sent = burst(
            count, self.cfg.submit_threads, lambda i: str(send("bench.raw_sleep", (tag, i, 1.0), queue=LLM_QUEUE).id)
        )
        records = self.records.wait(tag, count, timeout=self.cfg.timeout_s, poll_s=0.05)
        used = Probes.delta(before, meter.snapshot())
        run_s = [r.end - r.start for r in records]
        makespan = max(r.end for r in records) - sent.started
        return {
            "raw_tasks_per_s": round(count / makespan, 1),
            "raw_run_p50_s": round(percentile(run_s, 0.5), 3),
            "raw_run_p99_s": round(percentile(run_s, 0.99), 3),
            "raw_total_p99_s": round(max(r.end for r in records) - sent.started, 3),
            "raw_worker_cpu_s": used["llm_worker"],
            "raw_cpu_ms_per_task": round(used["llm_worker"] / count * 1000, 2),
        }

    def run(self) -> dict[str, Any]:
        reps: list[dict[str, Any]] = []
        pools = list(self.cfg.pools)
        for rep in range(self.cfg.reps):
            rotated = pools[rep % len(pools) :] + pools[: rep % len(pools)]
            for pool in rotated:
                reps.append(self.one(pool, rep))
        medians: dict[str, dict[str, Any]] = {}
        for pool in pools:
            mine = [r for r in reps if r["pool"] == pool]
            flat = [{**r, **{f"mem_{k}": v for k, v in r["memory"].items()}} for r in mine]
            medians[pool] = {
                k: statistics.median(r[k] for r in flat)
                for k in flat[0]
                if isinstance(flat[0][k], int | float) and k != "rep"
            }
            medians[pool]["ratio_ours_over_raw"] = round(
                medians[pool]["ours_steps_per_s"] / medians[pool]["raw_tasks_per_s"], 3
            )
        return {"reps": reps, "medians": medians}


# -- report ------------------------------------------------------------------------------------------------------------


def print_load(cfg: Config, results: dict[str, Any]) -> None:
    ours = results["ours"]
    redis_ = ours["redis"]
    print(
        f"\n{ours['runs']} content-pipeline runs ({ours['steps']} steps, 1 s simulated LLM latency): "
        f"llm worker {cfg.llm_workers}x -P {cfg.llm_pool} -c {cfg.llm_concurrency}{_pinned(cfg)}, "
        f"cpu worker -P prefork -c {cfg.cpu_concurrency}, "
        f"priorities {cfg.worker_env['ORCH_PRIORITIES']}"
    )
    print(f"  statuses: {ours['statuses']}")
    sub = ours["submit"]
    print(
        f"  submit: {sub['rate_runs_per_s']} runs/s from {sub['threads']} threads "
        f"(Client.submit p50 {sub['call_p50_ms']} ms, p99 {sub['call_p99_ms']} ms)"
    )
    print(
        f"  throughput: {ours['steps_per_s']} steps/s (makespan {ours['makespan_s']} s); run latency p50 "
        f"{ours['run_latency_p50_s']} s, p99 {ours['run_latency_p99_s']} s"
    )
    d = ours["steps_detail"]
    print(
        f"  llm step execution p50/p99 {fmt(d.get('llm_run_s_p50'), 3)}/{fmt(d.get('llm_run_s_p99'), 3)} s; "
        f"extra attempts in {d['sampled_runs']} sampled runs: {d['extra_attempts']}"
    )
    print(
        f"  Redis: {redis_['bytes_per_in_flight_run']} B per in-flight run ({redis_['peak_in_flight_runs']} in "
        f"flight, {redis_['used_memory_at_peak_mb']} MB), {redis_['bytes_per_finished_run']} B per finished run "
        f"({redis_['used_memory_after_mb']} MB after); {redis_['commands_per_step']} commands and "
        f"{redis_['reads_per_step']} socket reads (about one a round trip) per step"
    )
    peak_mb, in_flight_mb = redis_["max_used_memory_mb"], redis_["in_flight_memory_peak_mb"]
    print(
        f"  Redis peak: {peak_mb} MB; runs in flight {in_flight_mb} MB at most (finished runs at the per-finished "
        "figure taken off)"
    )
    print_footprint(redis_["finished_run"], redis_["commands_by_name_per_step"])
    llm_mem, cpu_mem = ours["llm_worker_memory"], ours["cpu_worker_memory"]
    print(
        f"  worker RSS: llm {llm_mem['main_rss_mb']} MB (peak {llm_mem['main_peak_mb']} MB, "
        f"{llm_mem['threads']} threads); cpu main {cpu_mem['main_rss_mb']} MB + children "
        f"{cpu_mem['children_rss_mb']} MB"
    )
    print(f"  CPU s: {ours['cpu_s']}; {ours['cpu_ms_per_step']} ms per step (workers + Redis)")
    switches = ours["llm_worker_switches_per_call"]
    print(
        f"  llm worker context switches per LLM call: {switches['voluntary']} voluntary, {switches['involuntary']} "
        f"involuntary; busy {ours['llm_worker_cpus_busy']} CPUs over the makespan"
    )
    for kind, total in results.get("floors", {}).items():
        for half in total["passes"]:
            print(
                f"  {kind} floor pass: {half['tasks']} raw tasks, {half['tasks_per_s']} tasks/s, "
                f"{half['cpu_ms_per_task']} ms CPU per task, {half['commands_per_task']} commands and "
                f"{half['reads_per_task']} socket reads per task" + _switches_line(half)
            )
        print(
            f"  {kind} floor: {total['tasks_per_s']} tasks/s, {total['cpu_ms_per_task']} ms CPU per task; ours / "
            f"floor: throughput {total['throughput_ours_over_floor']}x, CPU per step "
            f"{total['cpu_per_step_ours_over_floor']}x"
        )
    if "cpu_sections" in ours:
        print_sections(
            ours["cpu_sections"],
            [p.get("cpu_sections", {}) for p in results["floors"].get("llm", {}).get("passes", [])],
        )
    if results.get("worker_log_problems"):
        print(f"  worker log error lines: {results['worker_log_problems']}")


def _switches_line(floor_pass: dict[str, Any]) -> str:
    switches = floor_pass.get("llm_worker_switches_per_call")
    if not switches:
        return ""
    return (
        f"; llm worker switches per call {switches['voluntary']} + {switches['involuntary']}, busy "
        f"{floor_pass.get('llm_worker_cpus_busy', '-')} CPUs"
    )


def print_sections(ours: dict[str, Any], floor_passes: list[dict[str, Any]]) -> None:
    """The llm worker's thread CPU by section per LLM call, ours beside the ``llm`` floor (its passes pooled)."""
    floor = pool_sections([p for p in floor_passes if p.get("llm_calls")])
    print(
        f"  llm worker CPU per LLM call (--cpu-sections; thread CPU, sections inclusive, ms and calls per LLM call): "
        f"process ours {ours.get('process_ms')} ms, floor {floor.get('process_ms', '-')} ms"
    )
    labels = sorted(set(ours.get("sections", {})) | set(floor.get("sections", {})))
    for label in labels:
        mine, raw = ours.get("sections", {}).get(label), floor.get("sections", {}).get(label)
        cells = [f"{s['ms']:.3f} ms ({s['calls']:.2f})" if s else "-" for s in (mine, raw)]
        print(f"    {label:14s} ours {cells[0]:>18s}   floor {cells[1]:>18s}")


def pool_sections(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Several :func:`cpu_sections.per_llm_call` figures as one, weighted by their LLM calls."""
    calls = sum(p["llm_calls"] for p in passes)
    if not calls:
        return {}
    out: dict[str, Any] = {"llm_calls": calls, "process_ms": 0.0, "sections": {}}
    for p in passes:
        weight = p["llm_calls"] / calls
        out["process_ms"] += p["process_ms"] * weight
        for label, s in p["sections"].items():
            entry = out["sections"].setdefault(label, {"ms": 0.0, "calls": 0.0})
            entry["ms"] += s["ms"] * weight
            entry["calls"] += s["calls"] * weight
    out["process_ms"] = round(out["process_ms"], 3)
    for s in out["sections"].values():
        s["ms"], s["calls"] = round(s["ms"], 3), round(s["calls"], 2)
    return out


def print_pools(cfg: Config, results: dict[str, Any]) -> None:
    print(
        f"\n{cfg.steps} LLM steps (1 s simulated latency) per pool, 1 worker -c {cfg.concurrency}, "
        f"median of {cfg.reps}:"
    )
    head = (
        "pool",
        "ours steps/s",
        "raw tasks/s",
        "ours/raw",
        "step run p50",
        "p99",
        "queued→done p50",
        "p99",
        "CPU ms/step ours",
        "raw",
        "peak RSS MB",
        "threads",
        "stop s",
    )
    print(" | ".join(head))
    for pool, m in results["medians"].items():
        row = (
            pool,
            m["ours_steps_per_s"],
            m["raw_tasks_per_s"],
            m["ratio_ours_over_raw"],
            m["ours_run_p50_s"],
            m["ours_run_p99_s"],
            m["ours_total_p50_s"],
            m["ours_total_p99_s"],
            m["ours_cpu_ms_per_step"],
            m["raw_cpu_ms_per_task"],
            m["mem_main_peak_mb"],
            m["mem_threads"],
            m["stop_s"],
        )
        print(" | ".join(str(v) for v in row))


# -- main ------------------------------------------------------------------------------------------------------------


def measure(cfg: Config) -> dict[str, Any]:
    """Start Redis, run the load (or the pools) with its workers, stop everything."""
    load_before = os.getloadavg()
    logs = log_dir(LOGS, fresh=True)  # scanned for errors afterwards: this run's logs only
    if cfg.cpu_sections:
        log_dir(SECTIONS, fresh=True)  # this run's workers' totals only
    with record_dir("orchestrator-bench-load-") as records, private_redis() as server:
        settings = Settings.from_env(
            {"REDIS_URL": server.url, "ORCH_IMPORTS": IMPORTS, "ORCH_PRIORITIES": cfg.worker_env["ORCH_PRIORITIES"]}
        )
        client = Client(settings)
        bench = (PoolBench if cfg.pools else LoadBench)(cfg, client, server.url, server.pid, records, logs=logs)
        results = bench.run()
        results["environment"] = {
            **versions(server.url),
            "loadavg_1_5_15_before": load_before,
            "loadavg_1_5_15_after": os.getloadavg(),
        }
    return results


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)

    def measure_and_report() -> int:
        started = time.monotonic()
        results = measure(cfg)
        results["runtime_s"] = round(time.monotonic() - started, 1)
        results["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()}
        results["command"] = cli.command("scripts.bench_load", argv)
        if cfg.pools:
            print_pools(cfg, results)
            ok = all(r["ours_ok"] == cfg.steps for r in results["reps"])
        else:
            print_load(cfg, results)
            ok = results["ours"]["statuses"] == {"succeeded": cfg.runs}
        env = results["environment"]
        print(
            f"\nload average before {env['loadavg_1_5_15_before'][0]:.2f}, after {env['loadavg_1_5_15_after'][0]:.2f}"
        )
        write_results(cfg.out, results)
        return 0 if ok else 1

    return run_main(measure_and_report)


if __name__ == "__main__":
    sys.exit(main())
