"""Benchmark: approval steps. Many runs park at an approval holding no worker, then each approval releases its run.

Usage::

    python -m scripts.bench_approval [--runs 200] [--quick] [--pace-ms 0] [--workers 2] [--concurrency 2]

It starts a private ``redis-server`` (random port) and ``--workers`` real ``celery -A workers worker`` processes
(prefork, 2 slots each, ``ORCH_IMPORTS=tests.workflows``, as the integration tests run them), then:

1. submits ``--runs`` runs (default 200, ``--quick`` 50) of ``review (approval) → publish (python tests.count_calls)``
   and waits until every ``review`` is ``waiting``;
2. checks that the waiting runs hold no worker: Celery reports no active or reserved task, the broker holds no
   message for them, and one probe run per pool slot (each a 0.5 s ``tests.sleep``) runs, all of them at the same
   time, while the runs still wait;
3. approves the runs one by one through ``Client.approve`` (each call timed on the client) and waits for them all;
4. reads every run's status JSON and reports, as p50/p99/max over the runs, the release latency: the ``review``
   step's ``finished_at`` (the decision recorded, Redis ``TIME`` inside the Lua script) → ``publish.started_at``
   (also Redis ``TIME``), and, for information, from the decision's own timestamp (``approval.decision.at``, written
   by the decide script just before) to ``publish.started_at``; the approve-call latency p50/p99; the end-to-end
   time from the first approve call to the last ``publish`` finished.

The approvals go back to back by default. On a small machine that can be faster than the CPUs release runs
(client, Redis and workers share them): the releases then queue behind each other and the latency tail measures that
queue. The report says so, from the CPU time the processes used during the approvals (``/proc``), and ``--pace-ms``
spaces the approvals to measure the release path unloaded.

A warm-up run per pool slot comes first, so the figures do not include loading the Lua scripts or importing code.
It prints a table, writes ``test-artifacts/bench_approval.json`` (``--json PATH``) and exits 0 (it is a measurement,
not a test) unless the benchmark itself could not complete (a run did not succeed, a deadline passed). Workers and Redis
are stopped on exit, Ctrl-C, SIGTERM and SIGHUP.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # `python scripts/bench_approval.py`: as `-m scripts.bench_approval`
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, [sys.executable, "-m", "scripts.bench_approval", *sys.argv[1:]])

import math
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from orchestrator import Client, Settings, WorkflowSpec, parse_workflow
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.engine.priorities import redis_queue_lists
from orchestrator.engine.status import RunView
from orchestrator.state import keys
from scripts.harness import cli, probes
from scripts.harness.lifecycle import log_dir, pool_workers, private_redis, run_main, running, worker_env
from scripts.harness.report import Progress, fmt, print_table, ts, versions, write_results
from scripts.harness.runs import FINISHED, wait_until
from scripts.harness.stats import summary_ms

IMPORTS = "tests.workflows"  # the functions the steps call; the client imports them too
PROBE_SLEEP_S = 0.5
APPROVER = "alice"


@dataclass(frozen=True)
class Config:
    """What to run, after ``--quick`` and the explicit flags are applied."""

    runs: int
    workers: int
    concurrency: int
    pool: str
    poll_s: float
    pace_s: float
    loglevel: str
    quick: bool
    out: Path


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = cli.parser(__doc__, name="bench_approval", quick="50 runs instead of 200")
    cli.add_workers(parser, workers=2, concurrency=2, pool="prefork")
    parser.add_argument("--runs", type=int, default=None, help="waiting runs to approve (default 200, quick 50)")
    parser.add_argument("--poll-s", type=float, default=0.01, help="completion poll interval (default 0.01)")
    parser.add_argument(
        "--pace-ms", type=float, default=0.0, help="pause between approve calls (default 0: back to back)"
    )
    ns = parser.parse_args(argv)
    runs = ns.runs if ns.runs is not None else (50 if ns.quick else 200)
    if runs < 1 or ns.workers < 1 or ns.concurrency < 1 or ns.pace_ms < 0:
        parser.error("--runs, --workers and --concurrency must be ≥ 1, --pace-ms ≥ 0")
    return Config(
        runs=runs,
        workers=ns.workers,
        concurrency=ns.concurrency,
        pool=ns.pool,
        poll_s=ns.poll_s,
        pace_s=ns.pace_ms / 1e3,
        loglevel=ns.loglevel,
        quick=bool(ns.quick),
        out=ns.json,
    )


# -- workflows and statistics ----------------------------------------------------------------------------------------


def approval_spec() -> WorkflowSpec:
    return parse_workflow(
        {
            "name": "bench_approval",
            "steps": [
                {"name": "review", "uses": "approval", "with": {"approvers": [APPROVER], "message": "Publish this?"}},
                {
                    "name": "publish",
                    "uses": "python",
                    "depends_on": ["review"],
                    "with": {"function": "tests.count_calls"},
                },
            ],
        }
    )


def probe_spec() -> WorkflowSpec:
    return parse_workflow(
        {
            "name": "bench_approval_probe",
            "steps": [
                {
                    "name": "probe",
                    "uses": "python",
                    "with": {"function": "tests.sleep", "args": {"seconds": PROBE_SLEEP_S}},
                },
            ],
        }
    )


def bursts(values_ms: Sequence[float], threshold_ms: float) -> list[tuple[int, int]]:
    """Maximal stretches of consecutive runs (in approval order) whose latency exceeds ``threshold_ms``."""
    out: list[tuple[int, int]] = []
    start = None
    for i, value in enumerate([*values_ms, -math.inf]):
        if value > threshold_ms and start is None:
            start = i
        elif value <= threshold_ms and start is not None:
            out.append((start, i - 1))
            start = None
    return out


class CpuProbe:
    """CPU seconds used so far: by our processes (workers with their pool children, redis-server, this client) and
    by the whole machine (``/proc/stat``), so a latency tail can be told apart from other load on the CPUs."""

    def __init__(self, workers: LocalWorkers, redis_pid: int | None) -> None:
        self.workers = workers
        self.redis_pid = redis_pid

    def snapshot(self) -> dict[str, float]:
        busy, total = probes.machine_cpu_s()
        if not total:
            return {}
        return {
            "workers": sum(probes.workers_cpu_s(self.workers)),
            "redis": probes.cpu_s(self.redis_pid),
            "bench_client": probes.cpu_s(os.getpid()),
            "machine_busy": busy,
            "machine_total": total,
        }

    @staticmethod
    def usage(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
        """CPU seconds per role over a window, the machine's busy share, and what other processes used."""
        if not before or not after:
            return {}
        used = {k: after[k] - before[k] for k in ("workers", "redis", "bench_client")}
        busy = after["machine_busy"] - before["machine_busy"]
        total = after["machine_total"] - before["machine_total"]
        return {
            **{f"{k}_cpu_s": v for k, v in used.items()},
            "ours_cpu_s": sum(used.values()),
            "others_cpu_s": max(0.0, busy - sum(used.values())),
            "machine_busy_share": busy / total if total > 0 else math.nan,
            "wall_s": wall_s,
        }


def epoch(value: str | float) -> float:
    """A decision's ``at``: epoch seconds (as the decide script writes it) or ISO 8601 (as a view may render it)."""
    try:
        return float(value)
    except ValueError:
        return ts(str(value))


# -- the benchmark ---------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, cfg: Config, client: Client, url: str, cpu: CpuProbe) -> None:
        self.cfg = cfg
        self.cpu = cpu
        self.client = client
        self.r = redis.Redis.from_url(url, decode_responses=True)
        self.spec = approval_spec()
        self.probe = probe_spec()
        self.log = Progress()
        self.anomalies: list[str] = []

    def fields(self, run_ids: Sequence[str], field: str) -> list[str | None]:
        """One hash field of many runs, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hget(keys.run_key(run_id), field)
        return list(pipe.execute())

    def poll(self, what: str, check: Callable[[], bool], timeout: float) -> float:
        """Poll ``check`` until true; returns the seconds it took. Raises after ``timeout``."""
        return wait_until(check, timeout=timeout, poll_s=self.cfg.poll_s, what=f"{what} (worker logs in {LOGS})")

    def all_in(self, run_ids: Sequence[str], field: str, wanted: Set[str]) -> bool:
        return all(value in wanted for value in self.fields(run_ids, field))

    def all_finished(self, run_ids: Sequence[str]) -> bool:
        return self.all_in(run_ids, "status", FINISHED)

    def check_succeeded(self, run_ids: Sequence[str]) -> list[RunView]:
        views = [self.client.status(run_id) for run_id in run_ids]
        bad = [v for v in views if v["status"] != "succeeded"]
        if bad:
            raise RuntimeError(
                f"{len(bad)} of {len(views)} runs did not succeed, e.g. {bad[0]['run_id']}: "
                f"{bad[0]['status']} {bad[0].get('error')}"
            )
        return views

    # -- phases --------------------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        slots = self.cfg.workers * self.cfg.concurrency
        self.log(f"warm-up: {slots} approval runs and {slots} probe runs")
        run_ids = [self.client.submit(self.spec) for _ in range(slots)]
        self.poll("warm-up runs waiting", lambda: self.all_in(run_ids, "s:review:status", {"waiting"}), 60)
        for run_id in run_ids:
            self.client.approve(run_id, "review", by=APPROVER)
        probes = [self.client.submit(self.probe) for _ in range(slots)]
        self.poll("warm-up runs finished", lambda: self.all_finished(run_ids + probes), 60)
        self.check_succeeded(run_ids + probes)

    def park(self) -> tuple[list[str], dict[str, float]]:
        self.log(f"submitting {self.cfg.runs} runs")
        start = time.monotonic()
        run_ids = [self.client.submit(self.spec) for _ in range(self.cfg.runs)]
        submitted = time.monotonic() - start
        waited = self.poll(
            f"{self.cfg.runs} runs waiting", lambda: self.all_in(run_ids, "s:review:status", {"waiting"}), 120
        )
        self.log(f"all {self.cfg.runs} runs waiting")
        return run_ids, {
            "submit_all_s": submitted,
            "submitted_to_all_waiting_s": waited,
            "submit_to_all_waiting_s": submitted + waited,
        }

    def slot_check(self, run_ids: Sequence[str]) -> dict[str, Any]:
        """While the runs wait: nothing runs, nothing is queued, and every pool slot takes a probe at once."""
        settings = self.client.settings
        inspect = self.client.app.control.inspect(timeout=1.0)
        active = inspect.active() or {}
        reserved = inspect.reserved() or {}
        queued = sum(
            int(self.r.llen(name)) for q in {settings.cpu_queue, settings.llm_queue} for name in redis_queue_lists(q)
        )
        unacked = int(self.r.hlen("unacked"))
        slots = self.cfg.workers * self.cfg.concurrency
        self.log(f"probe: {slots} runs of a {PROBE_SLEEP_S}s step while {len(run_ids)} runs wait")
        start = time.monotonic()
        probes = [self.client.submit(self.probe) for _ in range(slots)]
        self.poll("probe runs finished", lambda: self.all_finished(probes), 60)
        probe_s = time.monotonic() - start
        views = self.check_succeeded(probes)
        steps = [v["steps"]["probe"] for v in views]
        last_start = max(ts(s["started_at"]) for s in steps)
        first_end = min(ts(s["finished_at"]) for s in steps)
        pids = {s["output"]["pid"] for s in steps}
        still_waiting = sum(v == "waiting" for v in self.fields(run_ids, "s:review:status"))
        result = {
            "celery_active_tasks": sum(len(v) for v in active.values()),
            "celery_reserved_tasks": sum(len(v) for v in reserved.values()),
            "workers_answering_inspect": len(active),
            "broker_queued_messages": queued,
            "broker_unacked_messages": unacked,
            "probe_runs": slots,
            "probe_step_s": PROBE_SLEEP_S,
            "probe_submit_to_all_finished_s": probe_s,
            "probe_all_ran_at_once": last_start < first_end,
            "probe_distinct_pool_processes": len(pids),
            "runs_still_waiting_after_probe": still_waiting,
        }
        result["pass"] = (
            result["celery_active_tasks"] == 0
            and result["celery_reserved_tasks"] == 0
            and result["workers_answering_inspect"] == self.cfg.workers
            and queued == 0
            and unacked == 0
            and result["probe_all_ran_at_once"]
            and still_waiting == len(run_ids)
        )
        return result

    def approve_all(self, run_ids: Sequence[str]) -> tuple[list[float], dict[str, Any]]:
        self.log(f"approving {len(run_ids)} runs one by one")
        calls: list[float] = []
        cpu_before = self.cpu.snapshot()
        first_call = time.time()
        start = time.monotonic()
        for i, run_id in enumerate(run_ids):
            if i and self.cfg.pace_s:
                time.sleep(self.cfg.pace_s)
            t = time.perf_counter()
            self.client.approve(run_id, "review", by=APPROVER, comment="bench")
            calls.append(time.perf_counter() - t)
        approving = time.monotonic() - start
        waited = self.poll(f"{len(run_ids)} runs finished", lambda: self.all_finished(run_ids), 120)
        cpu = CpuProbe.usage(cpu_before, self.cpu.snapshot(), time.monotonic() - start)
        self.log("all approved runs finished")
        return calls, {
            "first_approve_epoch": first_call,
            "approve_all_s": approving,
            "last_approve_to_all_finished_seen_s": waited,
            "cpu": cpu,
        }

    def release_latencies(self, run_ids: Sequence[str]) -> dict[str, Any]:
        views = self.check_succeeded(run_ids)
        counts = [int(c or 0) for c in self._counts(run_ids)]
        if any(c != 1 for c in counts):
            self.anomalies.append(f"publish ran {sorted(set(counts))} times per run, expected exactly once")
        retried = [v["run_id"] for v in views if any(s["attempts"] != 1 or s["errors"] for s in v["steps"].values())]
        if retried:
            self.anomalies.append(f"{len(retried)} runs had a step needing more than one attempt")
        finished_to_start, decision_to_start, decision_to_finished = [], [], []
        for view in views:
            review, publish = view["steps"]["review"], view["steps"]["publish"]
            decision = review["approval"]["decision"]
            if decision is None:
                raise RuntimeError(f"run {view['run_id']}: review succeeded without a recorded decision")
            decided_at = epoch(decision["at"])
            started = ts(publish["started_at"])
            finished_to_start.append(started - ts(review["finished_at"]))
            decision_to_start.append(started - decided_at)
            decision_to_finished.append(ts(review["finished_at"]) - decided_at)
        raw_ms = [v * 1e3 for v in finished_to_start]
        tail = bursts(raw_ms, 50.0)
        return {
            "views": views,
            "review_finished_to_publish_started": summary_ms(finished_to_start),
            "over_50ms": {
                "runs": sum(v > 50.0 for v in raw_ms),
                "bursts_of_consecutive_runs": [{"first": a, "last": b} for a, b in tail],
            },
            "decision_at_to_publish_started": summary_ms(decision_to_start),
            "decision_at_to_review_finished": summary_ms(decision_to_finished),
            "raw_review_finished_to_publish_started_ms": raw_ms,
        }

    @staticmethod
    def load(runs: int, approve: dict[str, Any]) -> dict[str, float]:
        """How close the approvals came to what this machine's CPUs can release: back-to-back approvals on a small
        machine make releases queue behind each other, and then the latency tail measures that queue."""
        cpu = approve.get("cpu") or {}
        rate = runs / approve["approve_all_s"] if approve["approve_all_s"] > 0 else math.nan
        if not cpu or not cpu.get("ours_cpu_s"):
            return {"approvals_per_s": rate}
        per_run = cpu["ours_cpu_s"] / runs
        capacity = (os.cpu_count() or 1) / per_run
        return {
            "approvals_per_s": rate,
            "ours_cpu_ms_per_run": per_run * 1e3,
            "capacity_runs_per_s_estimate": capacity,
            "utilisation_estimate": rate / capacity,
        }

    def _counts(self, run_ids: Sequence[str]) -> list[str | None]:
        pipe = self.r.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.get(f"test:calls:{run_id}:publish")
        return list(pipe.execute())

    def run(self) -> dict[str, Any]:
        self.warm_up()
        run_ids, park = self.park()
        slots = self.slot_check(run_ids)
        calls, approve = self.approve_all(run_ids)
        latencies = self.release_latencies(run_ids)
        views = latencies.pop("views")
        last_finished = max(ts(v["steps"]["publish"]["finished_at"]) for v in views)
        e2e = last_finished - approve["first_approve_epoch"]
        return {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in self.cfg.__dict__.items()},
            "park": park,
            "no_worker_held": slots,
            "approve_call": {**summary_ms(calls), "raw_ms": [c * 1e3 for c in calls]},
            "approve": approve,
            "release": latencies,
            "end_to_end": {
                "first_approve_to_last_publish_finished_s": e2e,
                "runs_per_s": len(run_ids) / e2e if e2e > 0 else math.nan,
            },
            "load": self.load(len(run_ids), approve),
            "anomalies": self.anomalies,
        }


# -- output ----------------------------------------------------------------------------------------------------------


def print_report(results: dict[str, Any]) -> None:
    cfg = results["config"]
    rel = results["release"]
    call = results["approve_call"]
    slots = results["no_worker_held"]
    print()
    print(
        f"Approval benchmark: {cfg['runs']} runs of review (approval) → publish (python), "
        f"{cfg['workers']} workers x {cfg['pool']} c{cfg['concurrency']}"
        + (f", approvals paced {cfg['pace_s'] * 1e3:g} ms apart" if cfg["pace_s"] else "")
    )
    rows = [("measure", "p50 ms", "p99 ms", "max ms")]
    for label, s in (
        ("review finished_at → publish started_at", rel["review_finished_to_publish_started"]),
        ("  (info) decision at → publish started_at", rel["decision_at_to_publish_started"]),
        ("  (info) decision at → review finished_at", rel["decision_at_to_review_finished"]),
        ("Client.approve call (client clock)", call),
    ):
        rows.append((label, fmt(s["p50"]), fmt(s["p99"]), fmt(s["max"])))
    print_table(rows)
    park, approve, e2e = results["park"], results["approve"], results["end_to_end"]
    print()
    print(
        f"Submit {cfg['runs']} runs: {park['submit_all_s']:.2f}s; submit → all waiting "
        f"{park['submit_to_all_waiting_s']:.2f}s"
    )
    print(
        f"Approve {cfg['runs']} runs one by one: {approve['approve_all_s']:.2f}s; "
        f"first approve call → last publish finished: {e2e['first_approve_to_last_publish_finished_s']:.2f}s "
        f"({e2e['runs_per_s']:.0f} runs/s)"
    )
    over = rel["over_50ms"]
    if over["runs"]:
        stretches = ", ".join(f"#{b['first']}..#{b['last']}" for b in over["bursts_of_consecutive_runs"])
        print(
            f"Release latency over 50 ms: {over['runs']} runs, in {len(over['bursts_of_consecutive_runs'])} "
            f"stretch(es) of consecutive approvals (in approval order: {stretches})"
        )
    cpu = approve.get("cpu") or {}
    if cpu:
        print(
            f"CPU during the approvals ({cpu['wall_s']:.2f}s wall): ours {cpu['ours_cpu_s']:.2f}s (workers "
            f"{cpu['workers_cpu_s']:.2f}, redis {cpu['redis_cpu_s']:.2f}, this client "
            f"{cpu['bench_client_cpu_s']:.2f}), other processes {cpu['others_cpu_s']:.2f}s; "
            f"machine busy {cpu['machine_busy_share']:.0%}"
        )
    load = results["load"]
    if "utilisation_estimate" in load:
        print(
            f"Approvals arrived at {load['approvals_per_s']:.0f}/s; ours used {load['ours_cpu_ms_per_run']:.1f} ms CPU "
            f"per approved run, so {env_cpus(results)} CPUs release at most ~{load['capacity_runs_per_s_estimate']:.0f}"
            f" runs/s (utilisation ~{load['utilisation_estimate']:.0%})"
        )
        if load["utilisation_estimate"] > 0.8:
            print(
                "  -> near saturation: releases queue behind earlier ones and the p99/max measure that queue; "
                "--pace-ms 10 measures the release path unloaded"
            )
    verdict = "PASS" if slots["pass"] else "FAIL"
    print(
        f"No worker held while waiting: {verdict}: Celery active {slots['celery_active_tasks']}, reserved "
        f"{slots['celery_reserved_tasks']} ({slots['workers_answering_inspect']} workers answered); broker queued "
        f"{slots['broker_queued_messages']}, unacked {slots['broker_unacked_messages']}; {slots['probe_runs']} probe "
        f"runs of {slots['probe_step_s']}s ran at once: {slots['probe_all_ran_at_once']} "
        f"({slots['probe_distinct_pool_processes']} pool processes, {slots['probe_submit_to_all_finished_s']:.2f}s "
        f"submit → all done); runs still waiting after the probe: {slots['runs_still_waiting_after_probe']}"
        f"/{cfg['runs']}"
    )
    env = results["environment"]
    print(
        f"Machine: {env['cpus']} CPUs; 1-min load average {env['loadavg_1_5_15_before'][0]:.2f} before, "
        f"{env['loadavg_1_5_15_after'][0]:.2f} after; redis {env['redis_server']}"
    )


def env_cpus(results: dict[str, Any]) -> int:
    return int(results.get("environment", {}).get("cpus") or os.cpu_count() or 1)


# -- main ------------------------------------------------------------------------------------------------------------

LOGS = "bench-approval-worker-logs"


def measure(cfg: Config) -> dict[str, Any]:
    """Start Redis and the workers, run the benchmark, stop them."""
    started = time.monotonic()
    load_before = os.getloadavg()
    logs = log_dir(LOGS)
    with private_redis() as server:
        env = worker_env(server.url, IMPORTS)
        client = Client(Settings.from_env(env))
        workers = pool_workers(client.app, cfg, env, logs)
        print(f"redis {server.url}; starting {cfg.workers} workers (logs in {logs})", file=sys.stderr)
        with running(workers, grace=10):
            results = Bench(cfg, client, server.url, CpuProbe(workers, server.pid)).run()
            results["environment"] = {
                **versions(server.url),
                "loadavg_1_5_15_before": load_before,
                "loadavg_1_5_15_after": os.getloadavg(),
            }
            print("stopping workers", file=sys.stderr)
    results["runtime_s"] = time.monotonic() - started
    return results


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)

    def measure_and_report() -> int:
        results = measure(cfg)
        results["command"] = cli.command("scripts.bench_approval", argv)
        print_report(results)
        for anomaly in results["anomalies"]:
            print(f"WARNING: {anomaly}")
        write_results(cfg.out, results)
        return 0

    return run_main(measure_and_report)


if __name__ == "__main__":
    sys.exit(main())
