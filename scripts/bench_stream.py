"""Benchmark: live event delivery through the HTTP API's Server-Sent Events, at fan-out and at many runs.

Usage::

    python -m scripts.bench_stream [--quick] [--clients 200] [--runs 1000] [--reps 3] [--runs-reps 1]
                                   [--workers 2] [--pool threads] [--concurrency 16] [--profile]
                                   [--api-redis-pool N] [--api-pythonpath DIR] [--json PATH]

It starts a private ``redis-server`` (random port), ``--workers`` real ``celery -A workers worker`` processes and the
API as its own process (``python -m orchestrator.cli api`` on a random loopback port, no tokens), then measures:

(1) ``--clients`` SSE clients on one run. The run's first step is a gate (``bench_stream.gate`` in
    ``scripts.steps.stream``) that holds it until every client has connected and received the events so
    far; then ``--width`` x ``--depth`` ``tests.sleep`` steps (each level depends on all of the previous one) run,
    and every event after the gate is delivered live to all clients through the run's one hub. Repeated ``--reps``
    times (medians).
(2) ``--runs`` concurrent runs, each with one SSE client. The workers stop consuming (Celery ``cancel_consumer``)
    while a separate submitter process (its CPU and GIL stay out of the clients' event loop) submits ``--steps``-step
    chains of ``tests.sleep`` as fast as it can, and a client connects to each run as soon as it is submitted. Once
    every client has its run's first events (``run_started``, ``step_queued``; or after ``--connect-timeout-s``),
    the workers resume (``add_consumer``): all runs are in flight with their streams open, and every event from then
    on is live. Repeated ``--runs-reps`` times.

Delivery latency is the event's ``ts`` (Redis ``TIME`` in the transition's Lua script) to the client's
``time.time()`` when the chunk holding the frame arrived; both clocks are this machine's (the offset between them is
measured once and reported, not subtracted). The clients run in one asyncio loop (uvloop when installed) of this
process, with a loop-lag monitor: lag there adds to the measured latency and is reported beside it.

The API process's CPU (``utime + stime`` from ``/proc/PID/stat``, as seconds and as % of one core over the window) and
peak RSS (``VmHWM`` of ``/proc/PID/status``, reset through ``/proc/PID/clear_refs`` at each window's start, and
sampled ``VmRSS``) are read around each window, together with the CPU of the workers, redis-server and this process.

Correctness: every client's events must equal ``client.store.events(run_id)``, exactly once and in order, with
``id:`` = ``seq`` and ``event:`` = ``type``. A stream that drops is reconnected with ``Last-Event-ID`` and counted.
``--profile`` runs the API under cProfile (main thread, i.e. the event loop) and prints where its time goes; latency
and CPU figures of such a run are inflated by the profiler and are marked as profiled.

What-ifs, leaving the product code alone: ``--api-redis-pool N`` serves the API through
``scripts.stream.app`` (the same ``serve``, with ``max_connections=N`` on the asyncio Redis pool whose
default of 100 the installed redis-py applies), and ``--api-pythonpath DIR`` puts DIR first on the API's
``PYTHONPATH`` only (e.g. ``pip install --target DIR hiredis`` for redis-py's C reply parser).

It prints a table, writes ``test-artifacts/bench_stream.json`` (``--json PATH``; worker and API logs in
``test-artifacts/bench-stream-logs/``) and exits 0 unless the benchmark itself fails or a client saw wrong events
(exit 1). The API, workers and Redis are stopped on exit, Ctrl-C, SIGTERM and SIGHUP.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # `python scripts/bench_stream.py`: run as `-m scripts.bench_stream`
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, [sys.executable, "-m", "scripts.bench_stream", *sys.argv[1:]])

import asyncio
import contextlib
import json
import math
import signal
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

import scripts.steps.stream  # noqa: F401  (registers bench_stream.gate, for the client's validation)
from orchestrator import Client, Settings
from scripts.harness import cli
from scripts.harness.lifecycle import (
    log_dir,
    pool_workers,
    private_redis,
    run_loop,
    run_main,
    running,
    until_signalled,
    worker_env,
)
from scripts.harness.report import REPO_ROOT, versions, write_results
from scripts.harness.stats import median, summary_ms
from scripts.steps.stream import gate_key
from scripts.stream.api import ApiProcess, hiredis_in, profile_summary
from scripts.stream.checks import (
    by_second_ms,
    by_type_ms,
    check_streams,
    expected_events,
    per_frame_us,
    stream_timings,
)
from scripts.stream.clients import RUN_ENDS, HttpClients, OpenStreams, StreamRecord, cancel_all, sse_client
from scripts.stream.report import aggregate, print_report
from scripts.stream.window import CpuRoles, Window

LOGS = "bench-stream-logs"
IMPORTS = "tests.workflows,scripts.steps.stream"  # tests.sleep and the gate; the client imports them too
PACKAGES = ("httpx", "uvicorn", "sse-starlette", "starlette", "fastapi", "redis", "celery", "uvloop", "httptools")


# -- configuration -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """What to run, after ``--quick`` and the explicit flags are applied."""

    clients: int
    runs: int
    reps: int
    runs_reps: int
    workers: int
    pool: str
    concurrency: int
    steps: int
    step_s: float
    width: int
    depth: int
    timeout_s: float
    connect_timeout_s: float
    api_redis_pool: int
    api_pythonpath: str
    profile: bool
    quick: bool
    loglevel: str
    out: Path


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = cli.parser(__doc__, name="bench_stream", quick="50 clients, 100 runs, one repetition (< ~1 minute)")
    parser.add_argument("--clients", type=int, default=None, help="SSE clients on one run in (1) (default 200)")
    parser.add_argument(
        "--runs", type=int, default=None, help="concurrent runs, one client each, in (2) (default 1000)"
    )
    parser.add_argument("--reps", type=int, default=None, help="repetitions of (1) (default 5, quick 1)")
    parser.add_argument("--runs-reps", type=int, default=None, help="repetitions of (2) (default 1)")
    cli.add_workers(parser, workers=2, concurrency=16, pool="threads")
    parser.add_argument("--steps", type=int, default=3, help="chain length of the runs in (2) (default 3)")
    parser.add_argument("--step-s", type=float, default=0.1, help="tests.sleep seconds per step (default 0.1)")
    parser.add_argument("--width", type=int, default=4, help="parallel steps per level of the run in (1) (default 4)")
    parser.add_argument("--depth", type=int, default=4, help="levels of the run in (1) (default 4)")
    parser.add_argument("--timeout-s", type=float, default=None, help="deadline per scenario (default: scaled)")
    parser.add_argument(
        "--connect-timeout-s",
        type=float,
        default=30.0,
        help="in (2), resume the workers after this long even if not every client is connected (default 30)",
    )
    parser.add_argument(
        "--api-redis-pool",
        type=int,
        default=0,
        metavar="N",
        help="what-if: serve the API through scripts.stream.app with max_connections=N on its "
        "asyncio Redis pool (default 0: `orchestrator api` as shipped)",
    )
    parser.add_argument(
        "--api-pythonpath",
        default="",
        metavar="DIR",
        help="what-if: put DIR first on the API process's PYTHONPATH only (e.g. a `pip install --target DIR hiredis`)",
    )
    parser.add_argument("--profile", action="store_true", help="run the API under cProfile (inflates its figures)")
    ns = parser.parse_args(argv)
    quick = bool(ns.quick)
    cfg = Config(
        clients=ns.clients or (50 if quick else 200),
        runs=ns.runs or (100 if quick else 1000),
        reps=ns.reps or (1 if quick else 5),
        runs_reps=ns.runs_reps or 1,
        workers=ns.workers,
        pool=ns.pool,
        concurrency=ns.concurrency,
        steps=ns.steps,
        step_s=ns.step_s,
        width=ns.width,
        depth=ns.depth,
        timeout_s=ns.timeout_s or 0.0,
        connect_timeout_s=ns.connect_timeout_s,
        api_redis_pool=max(0, ns.api_redis_pool),
        api_pythonpath=ns.api_pythonpath,
        profile=bool(ns.profile),
        quick=quick,
        loglevel=ns.loglevel,
        out=ns.json,
    )
    if min(cfg.clients, cfg.runs, cfg.reps, cfg.runs_reps, cfg.workers, cfg.concurrency, cfg.steps) < 1:
        parser.error("--clients, --runs, --reps, --runs-reps, --workers, --concurrency and --steps must be ≥ 1")
    if cfg.width < 1 or cfg.depth < 1 or cfg.step_s < 0:
        parser.error("--width and --depth must be ≥ 1, --step-s ≥ 0")
    return cfg


# -- workflows -------------------------------------------------------------------------------------------------------


def _sleep_step(name: str, seconds: float, deps: Sequence[str]) -> dict[str, Any]:
    return {
        "name": name,
        "uses": "python",
        "depends_on": list(deps),
        "with": {"function": "tests.sleep", "args": {"seconds": seconds}},
    }


def chain_workflow(steps: int, step_s: float) -> dict[str, Any]:
    """``s0 → s1 → …`` of ``tests.sleep`` steps: 2 + 3 x ``steps`` events per run."""
    return {
        "name": f"bench_stream_chain_{steps}",
        "steps": [_sleep_step(f"s{i}", step_s, [f"s{i - 1}"] if i else []) for i in range(steps)],
    }


def gated_workflow(width: int, depth: int, step_s: float) -> dict[str, Any]:
    """``gate``, then ``depth`` levels of ``width`` sleeping steps, each level depending on all of the previous."""
    steps: list[dict[str, Any]] = [{"name": "gate", "uses": "python", "with": {"function": "bench_stream.gate"}}]
    previous = ["gate"]
    for level in range(depth):
        names = [f"l{level}_{i}" for i in range(width)]
        steps += [_sleep_step(name, step_s, previous) for name in names]
        previous = names
    return {"name": f"bench_stream_gated_{width}x{depth}", "steps": steps}


# -- the benchmark ---------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, cfg: Config, client: Client, api: ApiProcess, roles: CpuRoles, redis_url: str) -> None:
        self.cfg = cfg
        self.client = client
        self.api = api
        self.roles = roles
        self.redis_url = redis_url
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.submitter: asyncio.subprocess.Process | None = None
        self.paused = False

    def window(self, streams: OpenStreams) -> Window:
        return Window(self.roles, self.redis, streams)

    async def _until(self, condition: Callable[[], bool], deadline: float, what: str, poll_s: float = 0.005) -> None:
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            dead = [name for name, p in self.roles.workers.processes.items() if p.poll() is not None]
            if dead or self.api.process is None or self.api.process.poll() is not None:
                raise RuntimeError(f"while waiting for {what}: exited: {dead or 'the API'}")
            await asyncio.sleep(poll_s)

    async def _gate_started(self, run_id: str, deadline: float) -> int:
        """The ``seq`` of the gate step's ``step_started`` event, once it exists."""
        while True:
            for event in self.client.store.events(run_id):
                if event.type == "step_started" and event.step == "gate":
                    return event.seq
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gate step of run {run_id} did not start")
            await asyncio.sleep(0.01)

    # (1) many clients on one run ------------------------------------------------------------------------------------

    async def one_run(self, clients: int) -> dict[str, Any]:
        cfg = self.cfg
        workflow = gated_workflow(cfg.width, cfg.depth, cfg.step_s)
        deadline = time.monotonic() + (cfg.timeout_s or 60.0 + clients * 0.05)
        run_id = await asyncio.to_thread(self.client.submit, workflow)
        streams = OpenStreams()
        records = [StreamRecord(run_id) for _ in range(clients)]
        http = HttpClients(self.api.url)
        window = self.window(streams)
        window.start()
        tasks = [asyncio.create_task(sse_client(http.next(), r, deadline, streams)) for r in records]
        try:
            gate_seq = await self._gate_started(run_id, deadline)
            await self._until(
                lambda: all(r.last_seq >= gate_seq or r.error for r in records),
                deadline,
                f"{clients} clients to connect and catch up",
            )
            window.mark("connected")
            t_open_gate = time.time()
            self.redis.set(gate_key(run_id), "1")
            await self._until(lambda: all(t.done() for t in tasks), deadline, "the run's streams to end", 0.02)
        finally:
            streams.stopping = True
            await cancel_all(tasks)
            await http.aclose()
            resources = await window.stop()
        self.redis.delete(gate_key(run_id))
        expected = expected_events(self.client, [run_id])
        live = [(e[1], e[5] - e[4]) for r in records for e in r.events if e[0] > gate_seq]
        first_last = self._fan_out_spread(records, gate_seq)
        return {
            "run_id": run_id,
            "clients": clients,
            "events_per_run": len(expected[run_id]),
            "backlog_events_per_client": gate_seq,
            "connect_phase_s": window.marks["connected"][0] - window.marks["start"][0],
            "gate_open_to_last_event_s": max((e[5] for r in records for e in r.events), default=t_open_gate)
            - t_open_gate,
            "latency_ms": summary_ms([lat for _, lat in live]),
            "latency_by_type_ms": by_type_ms(live),
            "fan_out_ms": first_last,
            "cpu_total": window.cpu(),
            "cpu_live": window.cpu("connected", "end"),
            "cpu_connect": window.cpu("start", "connected"),
            "cpu_us_per_frame": per_frame_us(window.cpu(), sum(len(r.events) for r in records)),
            "resources": resources,
            "streams": stream_timings(records),
            "check": check_streams(records, expected),
        }

    @staticmethod
    def _fan_out_spread(records: Sequence[StreamRecord], after_seq: int) -> dict[str, Any]:
        """Per live event: latency to the first and to the last client, and the spread between them."""
        arrivals: dict[int, list[float]] = defaultdict(list)
        ts_of: dict[int, float] = {}
        for record in records:
            for seq, _, _, _, ts, recv in record.events:
                if seq > after_seq:
                    arrivals[seq].append(recv)
                    ts_of[seq] = ts
        first = [min(v) - ts_of[s] for s, v in arrivals.items()]
        last = [max(v) - ts_of[s] for s, v in arrivals.items()]
        spread = [max(v) - min(v) for v in arrivals.values()]
        return {
            "events": len(arrivals),
            "first_client_ms": summary_ms(first),
            "last_client_ms": summary_ms(last),
            "spread_ms": summary_ms(spread),
        }

    # (2) many runs, one client each ---------------------------------------------------------------------------------

    async def _start_submitter(self, runs: int, spec_path: Path) -> asyncio.subprocess.Process:
        env = {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "ORCH_IMPORTS": IMPORTS,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "scripts.bench_stream",
            "--submitter",
            str(spec_path),
            str(runs),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
            limit=1 << 20,
        )
        self.submitter = process
        assert process.stdout is not None
        async with asyncio.timeout(60):
            line = await process.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"the submitter did not start: {line!r}")
        return process

    async def _consume(self, on: bool) -> None:
        """Make every worker stop (``on=False``) or resume consuming its queues, and wait for their replies."""
        workers = self.roles.workers
        names = list(workers.processes)
        control = self.client.app.control
        for queue in workers.queues:
            call = control.add_consumer if on else control.cancel_consumer
            replies = await asyncio.to_thread(call, queue, reply=True, destination=names, timeout=5)
            answered = {name for reply in replies or [] for name in reply}
            if answered != set(names):
                raise RuntimeError(
                    f"{'add' if on else 'cancel'}_consumer({queue}): no reply from {sorted(set(names) - answered)}"
                )
        self.paused = not on

    async def _submit_all(self, runs: int, spec_path: Path, start: Callable[[str], None]) -> tuple[list[float], float]:
        """Have the submitter process submit ``runs`` runs; ``start(run_id)`` each at once; returns the submit times
        and the submitter's CPU seconds."""
        process = await self._start_submitter(runs, spec_path)
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(b"go\n")
        await process.stdin.drain()
        submit_s: list[float] = []
        while True:
            async with asyncio.timeout(120):
                line = await process.stdout.readline()
            parts = line.decode().split()
            if not parts or parts[0] != "run":
                await process.wait()
                if len(submit_s) != runs:
                    raise RuntimeError(f"the submitter submitted {len(submit_s)} of {runs} runs ({line!r})")
                return submit_s, float(parts[1]) if parts and parts[0] == "done" else math.nan
            submit_s.append(float(parts[2]))
            start(parts[1])

    async def many_runs(self, runs: int) -> dict[str, Any]:
        """``runs`` runs submitted while the workers do not consume, one client each; once every client has its
        run's first events (or after ``--connect-timeout-s``) the workers resume and everything after is live."""
        cfg = self.cfg
        deadline = time.monotonic() + (cfg.timeout_s or 60.0 + runs * 0.2)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(chain_workflow(cfg.steps, cfg.step_s), handle)
            spec_path = Path(handle.name)
        streams = OpenStreams()
        http = HttpClients(self.api.url)
        records: list[StreamRecord] = []
        tasks: list[asyncio.Task[None]] = []
        window = self.window(streams)

        def start(run_id: str) -> None:
            records.append(StreamRecord(run_id))
            tasks.append(asyncio.create_task(sse_client(http.next(), records[-1], deadline, streams)))

        try:
            await self._consume(on=False)
            window.start()
            t_first_submit = time.time()
            submit_s, submitter_cpu = await self._submit_all(runs, spec_path, start)
            window.mark("submitted")
            backlog = 2  # run_started and the first step's step_queued, written by the submit
            connect_until = min(deadline, time.monotonic() + cfg.connect_timeout_s)
            with contextlib.suppress(TimeoutError):
                await self._until(
                    lambda: all(r.last_seq >= backlog or r.error for r in records),
                    connect_until,
                    "every client to connect",
                    0.02,
                )
            caught_up = sum(1 for r in records if r.last_seq >= backlog)
            window.mark("connected")
            t_release = time.time()
            await self._consume(on=True)
            await self._until(lambda: all(t.done() for t in tasks), deadline, "every run's stream to end", 0.05)
        finally:
            streams.stopping = True
            if self.paused:
                try:
                    await self._consume(on=True)
                except RuntimeError as exc:
                    print(f"warning: workers left paused: {exc}", file=sys.stderr)
            await cancel_all(tasks)
            await http.aclose()
            resources = await window.stop()
            spec_path.unlink(missing_ok=True)
        expected = await asyncio.to_thread(expected_events, self.client, [r.run_id for r in records])
        live = [
            (e[1], e[5] - e[4])
            for r in records
            for e in r.events
            if r.t_open is not None and e[4] >= max(r.t_open, t_release)
        ]
        finals = [e[4] for r in records for e in r.events if e[1] in RUN_ENDS]
        per_second = by_second_ms(
            (e[4] - t_release, e[5] - e[4])
            for r in records
            for e in r.events
            if r.t_open is not None and e[4] >= max(r.t_open, t_release)
        )
        return {
            "runs": runs,
            "events_per_run": median(len(v) for v in expected.values()),
            "frames": sum(len(r.events) for r in records),
            "not_live_events": sum(len(r.events) for r in records) - len(live),
            "submit_phase_s": window.marks["submitted"][0] - window.marks["start"][0],
            "submit_ms": summary_ms(submit_s),
            "submitter_cpu_s": submitter_cpu,
            "connect_phase_s": window.marks["connected"][0] - window.marks["start"][0],
            "clients_caught_up_at_release": caught_up,
            "release_to_last_run_end_s": (max(finals) - t_release) if finals else math.nan,
            "first_submit_to_release_s": t_release - t_first_submit,
            "latency_ms": summary_ms([lat for _, lat in live]),
            "latency_by_type_ms": by_type_ms(live),
            "latency_by_second_after_release_ms": per_second,
            "cpu_total": window.cpu(),
            "cpu_connect": window.cpu("start", "connected"),
            "cpu_live": window.cpu("connected", "end"),
            "cpu_us_per_frame": per_frame_us(window.cpu(), sum(len(r.events) for r in records)),
            "resources": resources,
            "streams": stream_timings(records),
            "check": check_streams(records, expected),
            "timeline": [{k: round(v, 3) for k, v in sample.items()} for sample in window.samples],
        }

    def kill_submitter(self) -> None:
        """SIGKILL the submitter if it still runs (it has its own session: nothing else reaches it)."""
        process, self.submitter = self.submitter, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)

    async def stop_submitter(self) -> None:
        process, self.submitter = self.submitter, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    # warm-up and the whole run --------------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        results: dict[str, Any] = {"one_run": [], "many_runs": []}
        try:
            print("warm-up: 1 run x 5 clients, 10 runs x 1 client", file=sys.stderr)
            await self.one_run(5)
            await self.many_runs(10)
            for rep in range(cfg.reps):
                print(f"(1) {cfg.clients} clients on one run, rep {rep + 1}/{cfg.reps}", file=sys.stderr)
                results["one_run"].append(await self.one_run(cfg.clients))
                _progress(results["one_run"][-1])
            for rep in range(cfg.runs_reps):
                print(f"(2) {cfg.runs} runs x 1 client, rep {rep + 1}/{cfg.runs_reps}", file=sys.stderr)
                results["many_runs"].append(await self.many_runs(cfg.runs))
                _progress(results["many_runs"][-1])
        finally:
            await self.stop_submitter()
        return results


def _progress(result: dict[str, Any]) -> None:
    lat, cpu, check = result["latency_ms"], result["cpu_total"], result["check"]
    print(
        f"    latency p50 {lat['p50']:.1f} ms p99 {lat['p99']:.1f} ms (n={lat['n']}); API CPU {cpu['api_cpu_s']:.2f}s "
        f"({cpu['api_core_pct']:.0f}% of a core over {cpu['wall_s']:.1f}s); exact {check['exact']}/"
        f"{check['clients']}, reconnects {check['reconnects']}",
        file=sys.stderr,
    )


# -- the submitter process -------------------------------------------------------------------------------------------


def submitter_main(spec_path: str, runs: int) -> int:
    """Submit ``runs`` runs of the workflow in ``spec_path`` as fast as possible after a ``go`` line on stdin; print
    ``run RUN_ID SUBMIT_SECONDS`` per run, then ``done CPU_SECONDS``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark stops us
    client = Client(Settings.from_env())
    client.store.ping()
    workflow = json.loads(Path(spec_path).read_text())
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    for _ in range(runs):
        t0 = time.perf_counter()
        run_id = client.submit(workflow)
        print(f"run {run_id} {time.perf_counter() - t0:.6f}", flush=True)
    times = os.times()
    print(f"done {times.user + times.system:.3f}", flush=True)
    return 0


# -- main ------------------------------------------------------------------------------------------------------------


def clock_offset(client: redis.Redis, samples: int = 200) -> dict[str, float]:
    """Redis ``TIME`` minus this process's ``time.time()`` at the round trip's midpoint, from the fastest round trip
    (the offset is known to ± half that round trip)."""
    best: tuple[float, float] | None = None
    for _ in range(samples):
        t0 = time.time()
        seconds, micros = client.time()
        t1 = time.time()
        rtt, offset = t1 - t0, seconds + micros / 1e6 - (t0 + t1) / 2
        if best is None or rtt < best[0]:
            best = (rtt, offset)
    assert best is not None
    return {"offset_us": best[1] * 1e6, "rtt_us": best[0] * 1e6}


def _fresh_profile_path(logs: Path) -> Path:
    path = logs / "api.prof"
    path.unlink(missing_ok=True)  # a stale file must not pass for this run's profile
    return path


def measure(cfg: Config, logs: Path, profile_path: Path | None) -> dict[str, Any]:
    """Start Redis, the workers and the API; run both scenarios in one event loop; stop everything."""
    load_before = os.getloadavg()
    with private_redis() as server:
        env = {k: v for k, v in os.environ.items() if k != "ORCH_API_TOKENS"}  # no tokens: loopback only
        env |= worker_env(server.url, IMPORTS)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        client = Client(Settings.from_env({"REDIS_URL": server.url, "ORCH_IMPORTS": IMPORTS}))
        workers = pool_workers(client.app, cfg, worker_env(server.url, IMPORTS), logs)
        (logs / "api.log").write_bytes(b"")
        api_env = dict(env)
        if cfg.api_pythonpath:
            api_env["PYTHONPATH"] = os.pathsep.join([cfg.api_pythonpath, env["PYTHONPATH"]])
        api = ApiProcess(api_env, logs / "api.log", profile_path, cfg.api_redis_pool)
        print(f"redis {server.url}; starting {cfg.workers} workers and the API (logs in {logs})", file=sys.stderr)
        bench: Bench | None = None
        with running(workers, grace=10):
            try:
                api.start()
                clock = clock_offset(redis.Redis.from_url(server.url))
                bench = Bench(cfg, client, api, CpuRoles(api, workers, server.pid), server.url)
                api_pid = api.pid
                runs = run_loop(lambda: until_signalled(bench.run()))
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
                print("stopping the API and the workers", file=sys.stderr)
                if bench is not None:
                    bench.kill_submitter()
                api.stop()
        results: dict[str, Any] = {"config": dict(cfg.__dict__), "clock": clock, **runs}
        results["environment"] = {
            **versions(server.url, PACKAGES),
            "api_pid": api_pid,
            "api_command": api.command,
            "api_hiredis": hiredis_in(api_env),
            "loadavg_1_5_15_before": load_before,
        }
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--submitter"]:
        return submitter_main(args[1], int(args[2]))
    cfg = parse_args(args)

    def measure_and_report() -> int:
        started = time.monotonic()
        logs = log_dir(LOGS)
        profile_path = _fresh_profile_path(logs) if cfg.profile else None
        try:
            results = measure(cfg, logs, profile_path)
        except SystemExit:
            print("terminated by a signal: API, workers and Redis stopped", file=sys.stderr)
            raise
        results["command"] = cli.command("scripts.bench_stream", argv)
        return finish(cfg, results, profile_path, started)

    return run_main(measure_and_report, stopped="API, workers and Redis")


def finish(cfg: Config, results: dict[str, Any], profile_path: Path | None, started: float) -> int:
    """Summarize, print and write the results; 0 when every client saw exactly its run's events."""
    results["environment"]["loadavg_1_5_15_after"] = os.getloadavg()
    results["summary"] = {key: aggregate(results[key]) for key in ("one_run", "many_runs")}
    if profile_path is not None and profile_path.exists():
        results["profile"] = profile_summary(profile_path)
    results["runtime_s"] = time.monotonic() - started
    print_report(results)
    write_results(cfg.out, results)
    ok = all(results["summary"][key]["all_exact"] for key in ("one_run", "many_runs"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
