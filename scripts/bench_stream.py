"""Benchmark: live event delivery through the HTTP API's Server-Sent Events, at fan-out and at many runs.

Usage::

    .venv/bin/python scripts/bench_stream.py [--quick] [--clients 200] [--runs 1000] [--reps 3] [--runs-reps 1]
                                             [--workers 2] [--pool threads] [--concurrency 16] [--profile]

It starts a private ``redis-server`` (random port), ``--workers`` real ``celery -A workers worker`` processes and the
API as its own process (``python -m orchestrator.cli api`` on a random loopback port, no tokens), then measures:

(1) ``--clients`` SSE clients on one run. The run's first step is a gate (``bench_stream.gate`` in
    ``scripts/bench_stream_tasks.py``) that holds it until every client has connected and received the events so
    far; then ``--width`` × ``--depth`` ``tests.sleep`` steps (each level depends on all of the previous one) run,
    and every event after the gate is delivered live to all clients through the run's one hub. Repeated ``--reps``
    times (medians).
(2) ``--runs`` concurrent runs, each with one SSE client: a separate submitter process (so its CPU and GIL stay out
    of the clients' event loop) submits ``--steps``-step chains of ``tests.sleep`` as fast as it can; a client
    connects to each run as soon as it is submitted. Events that happened before a client had its response
    headers (``run_started``, the first ``step_queued``) are replayed, checked, and left out of the latency.

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

It prints a table, writes ``test-artifacts/bench_stream.json`` and exits 0 unless the benchmark itself fails or a
client saw wrong events (exit 1). The API, workers and Redis are stopped on exit, Ctrl-C, SIGTERM and SIGHUP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis

SCRIPTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS_DIR.parent
for _path in (str(REPO_ROOT), str(SCRIPTS_DIR)):  # tests.workflows and bench_stream_tasks, in this process too
    if _path not in sys.path:
        sys.path.insert(0, _path)

from orchestrator import Client, Settings  # noqa: E402
from orchestrator.local_workers import LocalWorkers  # noqa: E402
from orchestrator.redis_server import RedisServer, stop_on_signals  # noqa: E402

from bench_stream_tasks import gate_key  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "test-artifacts" / "bench_stream.json"
LOG_DIR = REPO_ROOT / "test-artifacts" / "bench-stream-logs"
IMPORTS = "tests.workflows,bench_stream_tasks"
RUN_ENDS = frozenset({"run_succeeded", "run_failed", "run_cancelled", "run_timed_out"})
WIRE_KEYS = frozenset({"run_id", "seq", "type", "step", "attempt", "ts", "data"})
MAX_RECONNECTS = 20
STREAMS_PER_HTTP_CLIENT = 50  # httpx pools scan their connections per request: many small pools stay cheap
SAMPLE_S = 0.25

T = TypeVar("T")


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
    profile: bool
    quick: bool
    loglevel: str
    out: Path


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="50 clients, 100 runs, one repetition (< ~1 minute)")
    parser.add_argument("--clients", type=int, default=None, help="SSE clients on one run in (1) (default 200)")
    parser.add_argument(
        "--runs", type=int, default=None, help="concurrent runs, one client each, in (2) (default 1000)"
    )
    parser.add_argument("--reps", type=int, default=None, help="repetitions of (1) (default 3, quick 1)")
    parser.add_argument("--runs-reps", type=int, default=None, help="repetitions of (2) (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--pool", default="threads", help="Celery pool: threads, prefork … (default threads)")
    parser.add_argument("--concurrency", type=int, default=16, help="pool slots per worker (default 16)")
    parser.add_argument("--steps", type=int, default=3, help="chain length of the runs in (2) (default 3)")
    parser.add_argument("--step-s", type=float, default=0.1, help="tests.sleep seconds per step (default 0.1)")
    parser.add_argument("--width", type=int, default=4, help="parallel steps per level of the run in (1) (default 4)")
    parser.add_argument("--depth", type=int, default=4, help="levels of the run in (1) (default 4)")
    parser.add_argument("--timeout-s", type=float, default=None, help="deadline per scenario (default: scaled)")
    parser.add_argument("--profile", action="store_true", help="run the API under cProfile (inflates its figures)")
    parser.add_argument("--loglevel", default="WARNING", help="worker log level (default WARNING)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    ns = parser.parse_args(argv)
    quick = bool(ns.quick)
    cfg = Config(
        clients=ns.clients or (50 if quick else 200),
        runs=ns.runs or (100 if quick else 1000),
        reps=ns.reps or (1 if quick else 3),
        runs_reps=ns.runs_reps or 1,
        workers=ns.workers,
        pool=ns.pool,
        concurrency=ns.concurrency,
        steps=ns.steps,
        step_s=ns.step_s,
        width=ns.width,
        depth=ns.depth,
        timeout_s=ns.timeout_s or 0.0,
        profile=bool(ns.profile),
        quick=quick,
        loglevel=ns.loglevel,
        out=ns.out,
    )
    if min(cfg.clients, cfg.runs, cfg.reps, cfg.runs_reps, cfg.workers, cfg.concurrency, cfg.steps) < 1:
        parser.error("--clients, --runs, --reps, --runs-reps, --workers, --concurrency and --steps must be ≥ 1")
    if cfg.width < 1 or cfg.depth < 1 or cfg.step_s < 0:
        parser.error("--width and --depth must be ≥ 1, --step-s ≥ 0")
    return cfg


# -- workflows -------------------------------------------------------------------------------------------------------


def _sleep_step(name: str, seconds: float, deps: Sequence[str]) -> dict[str, Any]:
    return {"name": name, "uses": "python", "depends_on": list(deps),
            "with": {"function": "tests.sleep", "args": {"seconds": seconds}}}  # fmt: skip


def chain_workflow(steps: int, step_s: float) -> dict[str, Any]:
    """``s0 → s1 → …`` of ``tests.sleep`` steps: 2 + 3 × ``steps`` events per run."""
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


# -- statistics ------------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    """Count, p50/p90/p99/max and mean of ``values`` (seconds), in milliseconds."""
    if not values:
        return {"n": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan, "mean": math.nan}
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 0.50) * 1e3,
        "p90": percentile(ordered, 0.90) * 1e3,
        "p99": percentile(ordered, 0.99) * 1e3,
        "max": ordered[-1] * 1e3,
        "mean": statistics.fmean(ordered) * 1e3,
    }


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


# -- processes -------------------------------------------------------------------------------------------------------


TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) the process has used so far; 0 when it is gone."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` (kB) and ``Threads`` of ``/proc/PID/status``."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in {"VmRSS", "VmHWM", "Threads"}:
                out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


def proc_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's ``VmHWM`` to its current RSS (``echo 5 > /proc/PID/clear_refs``, Linux ≥ 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ApiProcess:
    """``python -m orchestrator.cli api`` on a random loopback port, in its own session (Ctrl-C reaches us only)."""

    def __init__(self, env: dict[str, str], log_path: Path, profile_path: Path | None) -> None:
        self.env = env
        self.log_path = log_path
        self.profile_path = profile_path
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start the API and wait until ``/healthz`` answers (a few attempts, in case the free port was taken).

        Raises:
            RuntimeError: When it does not come up.
        """
        failure = ""
        for _ in range(3):
            self.port = _free_port()
            prefix = [sys.executable]
            if self.profile_path is not None:
                prefix += ["-m", "cProfile", "-o", str(self.profile_path)]
            argv = [*prefix, "-m", "orchestrator.cli", "api", "--host", "127.0.0.1", "--port", str(self.port)]
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(argv, env=self.env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            failure = self._wait_ready(timeout)
            if not failure:
                return
            self.stop(grace=2)
        raise RuntimeError(f"the API did not start: {failure} (log: {self.log_path})")

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"exited with code {self.process.returncode}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return ""
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return f"no answer from /healthz within {timeout}s"

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (uvicorn shuts down gracefully; cProfile then writes its file), SIGKILL after ``grace``."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class CpuRoles:
    """Whose CPU to read: the API, the workers (main processes and pool children), redis-server, this process."""

    api: ApiProcess
    workers: LocalWorkers
    redis_pid: int | None

    def snapshot(self) -> dict[str, float]:
        out = {"api": proc_cpu(self.api.pid), "workers": 0.0, "redis": proc_cpu(self.redis_pid),
               "bench_clients": proc_cpu(os.getpid())}  # fmt: skip
        for name, process in list(self.workers.processes.items()):
            out["workers"] += proc_cpu(process.pid)
            out["workers"] += sum(proc_cpu(child) for child in self.workers.pool_children(name))
        return out


# -- SSE clients -----------------------------------------------------------------------------------------------------


@dataclass
class OpenStreams:
    """Streams with response headers received and not ended yet, and the most at once."""

    now: int = 0
    peak: int = 0

    def opened(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def closed(self) -> None:
        self.now -= 1


@dataclass
class StreamRecord:
    """What one SSE client saw of its run."""

    run_id: str
    # (seq, type, step, attempt, ts epoch, receive time.time()) in arrival order
    events: list[tuple[int, str, str | None, int, float, float]] = field(default_factory=list)
    last_seq: int = 0
    final_seen: bool = False
    t_request: float | None = None
    t_open: float | None = None
    t_final: float | None = None
    t_eof: float | None = None
    connections: int = 0
    reconnects: int = 0
    drops: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    frame_errors: list[str] = field(default_factory=list)
    pings: int = 0
    got_204: bool = False
    error: str | None = None

    def on_frame(self, frame: dict[bytes, bytes], now: float) -> None:
        try:
            data = json.loads(frame.get(b"data", b""))
            seq, kind = int(data["seq"]), str(data["type"])
            ts = datetime.fromisoformat(data["ts"]).timestamp()
        except (ValueError, KeyError, TypeError) as exc:
            self.frame_errors.append(f"unparseable frame {frame!r}: {exc}")
            return
        if frame.get(b"id") != str(seq).encode() or frame.get(b"event") != kind.encode():
            self.frame_errors.append(f"id/event {frame.get(b'id')!r}/{frame.get(b'event')!r} ≠ seq/type {seq}/{kind}")
        if set(data) != WIRE_KEYS or data["run_id"] != self.run_id:
            self.frame_errors.append(f"data keys {sorted(data)} / run_id {data.get('run_id')!r}")
        self.events.append((seq, kind, data.get("step"), int(data.get("attempt") or 0), ts, now))
        self.last_seq = seq
        if kind in RUN_ENDS:
            self.final_seen = True
            self.t_final = now


async def _read_frames(response: httpx.Response, record: StreamRecord) -> None:
    """Parse SSE frames (``field: value`` lines, a blank line ends a frame) as chunks arrive; stamp each frame with
    the arrival time of the chunk that completed it."""
    buffer = b""
    frame: dict[bytes, bytes] = {}
    async for chunk in response.aiter_raw():
        now = time.time()
        buffer += chunk
        if b"\n" not in chunk:
            continue
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line:
                if frame:
                    record.on_frame(frame, now)
                    frame = {}
            elif line.startswith(b":"):
                record.pings += 1
            else:
                name, _, value = line.partition(b":")
                value = value.removeprefix(b" ")
                frame[name] = frame[name] + b"\n" + value if name == b"data" and name in frame else value


async def sse_client(http: httpx.AsyncClient, record: StreamRecord, deadline: float, streams: OpenStreams) -> None:
    """Follow the run's events until its final event; reconnect with ``Last-Event-ID`` when the stream drops."""
    backoff = 0.05
    while True:
        headers = {"Accept": "text/event-stream"}
        if record.connections:
            headers["Last-Event-ID"] = str(record.last_seq)
        record.connections += 1
        t_request = time.time()
        opened = False
        try:
            async with http.stream("GET", f"/runs/{record.run_id}/events", headers=headers) as response:
                record.statuses.append(response.status_code)
                if response.status_code == 204:
                    record.got_204 = True  # the run ended and we have seen all of it
                    return
                if response.status_code != 200:
                    await response.aread()
                    record.drops.append(f"HTTP {response.status_code}: {response.text[:200]}")
                else:
                    if record.t_open is None:
                        record.t_request, record.t_open = t_request, time.time()
                    opened = True
                    streams.opened()
                    await _read_frames(response, record)
                    if record.final_seen:
                        record.t_eof = time.time()
                        return
                    record.drops.append("stream ended before the run's final event")
        except httpx.HTTPError as exc:
            if record.final_seen:
                record.drops.append(f"{type(exc).__name__} after the final event: {exc}")
                return
            record.drops.append(f"{type(exc).__name__}: {exc}")
        finally:
            if opened:
                streams.closed()
        if time.monotonic() > deadline or record.reconnects >= MAX_RECONNECTS:
            record.error = f"gave up after {record.reconnects} reconnects: {record.drops[-1:]}"
            return
        record.reconnects += 1
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 1.0)


class HttpClients:
    """Several httpx clients, ``STREAMS_PER_HTTP_CLIENT`` streams each (httpx's pool scans its connections on every
    request, so one pool of 1,000 streaming connections costs the client loop quadratic time)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._clients: list[httpx.AsyncClient] = []
        self._used = 0

    def next(self) -> httpx.AsyncClient:
        index = self._used // STREAMS_PER_HTTP_CLIENT
        self._used += 1
        while len(self._clients) <= index:
            self._clients.append(httpx.AsyncClient(
                base_url=self.base_url,
                timeout=httpx.Timeout(connect=30.0, read=60.0, write=30.0, pool=30.0),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=STREAMS_PER_HTTP_CLIENT),
            ))  # fmt: skip
        return self._clients[index]

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._clients), return_exceptions=True)
        self._clients.clear()
        self._used = 0


# -- measurement windows ---------------------------------------------------------------------------------------------


class Window:
    """CPU by role, the API's peak RSS and open fds, Redis's client count and this loop's lag, over one window."""

    def __init__(self, roles: CpuRoles, redis_client: redis.Redis, streams: OpenStreams) -> None:
        self.roles = roles
        self.redis = redis_client
        self.streams = streams
        self.lag: list[float] = []
        self.samples: list[dict[str, float]] = []
        self.marks: dict[str, tuple[float, dict[str, float]]] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.peak_rss_reset = False
        self.rss_start_kb = 0
        self.load_start = os.getloadavg()

    def mark(self, name: str) -> None:
        self.marks[name] = (time.monotonic(), self.roles.snapshot())

    def start(self) -> None:
        api = self.roles.api.pid
        self.peak_rss_reset = reset_peak_rss(api)
        self.rss_start_kb = proc_status(api).get("VmRSS", 0)
        self.load_start = os.getloadavg()
        self.mark("start")
        self._tasks = [asyncio.create_task(self._lag_monitor()), asyncio.create_task(self._sampler())]

    async def stop(self) -> dict[str, Any]:
        self.mark("end")
        self._stop.set()
        await asyncio.gather(*self._tasks)
        status = proc_status(self.roles.api.pid)
        return {
            "api_rss_start_mb": self.rss_start_kb / 1024,
            "api_rss_peak_mb": (
                status.get("VmHWM", 0) if self.peak_rss_reset else max([s["api_rss_kb"] for s in self.samples] or [0])
            )
            / 1024,  # fmt: skip
            "api_rss_peak_sampled_mb": max([s["api_rss_kb"] for s in self.samples] or [0]) / 1024,
            "api_rss_end_mb": status.get("VmRSS", 0) / 1024,
            "api_rss_peak_from": "VmHWM after clear_refs" if self.peak_rss_reset else "sampled VmRSS",
            "api_threads_peak": max([s["api_threads"] for s in self.samples] or [0]),
            "api_fds_peak": max([s["api_fds"] for s in self.samples] or [0]),
            "redis_clients_peak": max([s["redis_clients"] for s in self.samples] or [0]),
            "open_streams_peak": self.streams.peak,
            "loop_lag_ms": summary_ms(self.lag),
            "loadavg_start": self.load_start,
            "loadavg_end": os.getloadavg(),
        }

    def cpu(self, start: str = "start", end: str = "end") -> dict[str, Any]:
        """CPU seconds by role between two marks, and the API's as % of one core."""
        (t0, c0), (t1, c1) = self.marks[start], self.marks[end]
        wall = max(t1 - t0, 1e-9)
        used = {role: c1[role] - c0.get(role, 0.0) for role in c1}
        return {"wall_s": wall, "cpu_s": used, "api_cpu_s": used["api"], "api_core_pct": 100 * used["api"] / wall,
                "all_cpu_pct_of_machine": 100 * sum(used.values()) / wall / (os.cpu_count() or 1)}  # fmt: skip

    async def _lag_monitor(self, interval: float = 0.005) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            before = loop.time()
            await asyncio.sleep(interval)
            self.lag.append(max(0.0, loop.time() - before - interval))

    async def _sampler(self) -> None:
        api = self.roles.api.pid
        t0 = time.monotonic()
        while not self._stop.is_set():
            status = proc_status(api)
            try:
                clients = int(self.redis.info("clients").get("connected_clients", 0))
            except redis.RedisError:
                clients = -1
            self.samples.append({"t": time.monotonic() - t0, "api_rss_kb": status.get("VmRSS", 0),
                                 "api_threads": status.get("Threads", 0), "api_fds": proc_fds(api),
                                 "redis_clients": clients, "open_streams": self.streams.now})  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), SAMPLE_S)


# -- checks ----------------------------------------------------------------------------------------------------------


def check_streams(records: Sequence[StreamRecord], expected: dict[str, list[tuple[int, str, str | None, int]]]
                  ) -> dict[str, Any]:  # fmt: skip
    """Whether every client got exactly its run's events, once each, in order; and what went wrong otherwise."""
    out: dict[str, Any] = {"clients": len(records), "exact": 0, "missing": 0, "duplicated": 0, "out_of_order": 0,
                           "unexpected": 0, "frame_errors": 0, "incomplete": 0, "runs_not_succeeded": 0,
                           "reconnects": 0, "drops": 0, "http_204": 0, "examples": []}  # fmt: skip
    for record in records:
        want = expected.get(record.run_id, [])
        got = [e[:4] for e in record.events]
        out["reconnects"] += record.reconnects
        out["drops"] += len(record.drops)
        out["http_204"] += int(record.got_204)
        out["frame_errors"] += len(record.frame_errors)
        if not want or want[-1][1] != "run_succeeded":
            out["runs_not_succeeded"] += 1
        if got == want and not record.frame_errors:
            out["exact"] += 1
            continue
        seen = set(got)
        missing = [e for e in want if e not in seen]
        out["missing"] += len(missing)
        out["duplicated"] += len(got) - len(seen)
        out["unexpected"] += len(seen - set(want))
        out["out_of_order"] += int([s for s, *_ in got] != sorted(s for s, *_ in got))
        out["incomplete"] += int(not record.final_seen)
        if len(out["examples"]) < 5:
            out["examples"].append({"run_id": record.run_id, "got_seqs": [s for s, *_ in got],
                                    "want_seqs": [s for s, *_ in want], "drops": record.drops[:5],
                                    "frame_errors": record.frame_errors[:3], "error": record.error})  # fmt: skip
    out["all_exact"] = out["exact"] == len(records)
    return out


def expected_events(client: Client, run_ids: Iterable[str]) -> dict[str, list[tuple[int, str, str | None, int]]]:
    return {rid: [(e.seq, e.type, e.step, e.attempt) for e in client.store.events(rid)] for rid in set(run_ids)}


def stream_timings(records: Sequence[StreamRecord]) -> dict[str, Any]:
    connect = [r.t_open - r.t_request for r in records if r.t_open is not None and r.t_request is not None]
    eof = [r.t_eof - r.t_final for r in records if r.t_eof is not None and r.t_final is not None]
    return {"connect_ms": summary_ms(connect), "final_event_to_eof_ms": summary_ms(eof),
            "pings": sum(r.pings for r in records)}  # fmt: skip


def by_type_ms(samples: Iterable[tuple[str, float]]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for kind, latency in samples:
        groups[kind].append(latency)
    return {kind: {k: v for k, v in summary_ms(vals).items() if k in {"n", "p50", "p99"}}
            for kind, vals in sorted(groups.items())}  # fmt: skip


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

    def window(self, streams: OpenStreams) -> Window:
        return Window(self.roles, self.redis, streams)

    async def _until(self, condition: Callable[[], bool], deadline: float, what: str, poll_s: float = 0.005) -> None:
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
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
            await self._until(lambda: all(r.last_seq >= gate_seq or r.error for r in records), deadline,
                              f"{clients} clients to connect and catch up")  # fmt: skip
            window.mark("connected")
            t_open_gate = time.time()
            self.redis.set(gate_key(run_id), "1")
            await self._until(lambda: all(t.done() for t in tasks), deadline, "the run's streams to end", 0.02)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
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
        return {"events": len(arrivals), "first_client_ms": summary_ms(first), "last_client_ms": summary_ms(last),
                "spread_ms": summary_ms(spread)}  # fmt: skip

    # (2) many runs, one client each ---------------------------------------------------------------------------------

    async def _start_submitter(self, runs: int, spec_path: Path) -> asyncio.subprocess.Process:
        env = {**os.environ, "REDIS_URL": self.redis_url, "ORCH_IMPORTS": IMPORTS,
               "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(SCRIPTS_DIR)])}  # fmt: skip
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--submitter", str(spec_path), str(runs),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, cwd=REPO_ROOT,
            start_new_session=True, limit=1 << 20,
        )  # fmt: skip
        self.submitter = process
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"the submitter did not start: {line!r}")
        return process

    async def many_runs(self, runs: int) -> dict[str, Any]:
        cfg = self.cfg
        deadline = time.monotonic() + (cfg.timeout_s or 60.0 + runs * 0.3)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(chain_workflow(cfg.steps, cfg.step_s), handle)
            spec_path = Path(handle.name)
        streams = OpenStreams()
        http = HttpClients(self.api.url)
        records: list[StreamRecord] = []
        tasks: list[asyncio.Task[None]] = []
        submit_s: list[float] = []
        submitter_cpu = math.nan
        try:
            process = await self._start_submitter(runs, spec_path)
            assert process.stdin is not None and process.stdout is not None
            window = self.window(streams)
            window.start()
            process.stdin.write(b"go\n")
            await process.stdin.drain()
            t_first_submit = time.time()
            while True:
                line = await asyncio.wait_for(process.stdout.readline(), max(1.0, deadline - time.monotonic()))
                parts = line.decode().split()
                if not parts or parts[0] != "run":
                    submitter_cpu = float(parts[1]) if parts and parts[0] == "done" else math.nan
                    break
                record = StreamRecord(parts[1])
                submit_s.append(float(parts[2]))
                records.append(record)
                tasks.append(asyncio.create_task(sse_client(http.next(), record, deadline, streams)))
            t_last_submit = time.time()
            window.mark("submitted")
            await process.wait()
            await self._until(lambda: all(t.done() for t in tasks), deadline, "every run's stream to end", 0.05)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await http.aclose()
            resources = await window.stop() if "window" in locals() else {}
            spec_path.unlink(missing_ok=True)
        if len(records) != runs:
            raise RuntimeError(f"the submitter submitted {len(records)} of {runs} runs")
        expected = await asyncio.to_thread(expected_events, self.client, [r.run_id for r in records])
        live = [(e[1], e[5] - e[4]) for r in records for e in r.events if r.t_open is not None and e[4] >= r.t_open]
        during = [e[5] - e[4] for r in records for e in r.events
                  if r.t_open is not None and r.t_open <= e[4] <= t_last_submit]  # fmt: skip
        after = [e[5] - e[4] for r in records for e in r.events if r.t_open is not None and e[4] > t_last_submit]
        replayed = sum(1 for r in records for e in r.events if r.t_open is None or e[4] < r.t_open)
        finals = [e[4] for r in records for e in r.events if e[1] in RUN_ENDS]
        makespan = (max(finals) - t_first_submit) if finals else math.nan
        return {
            "runs": runs,
            "events_per_run": median(len(v) for v in expected.values()),
            "events_total": sum(len(r.events) for r in records),
            "replayed_events": replayed,
            "submit_phase_s": t_last_submit - t_first_submit,
            "submit_ms": summary_ms(submit_s),
            "submitter_cpu_s": submitter_cpu,
            "makespan_s": makespan,
            "runs_per_s": runs / makespan if makespan else math.nan,
            "latency_ms": summary_ms([lat for _, lat in live]),
            "latency_during_submits_ms": summary_ms(during),
            "latency_after_submits_ms": summary_ms(after),
            "latency_by_type_ms": by_type_ms(live),
            "cpu_total": window.cpu(),
            "cpu_submitting": window.cpu("start", "submitted"),
            "cpu_after_submits": window.cpu("submitted", "end"),
            "resources": resources,
            "streams": stream_timings(records),
            "check": check_streams(records, expected),
            "rss_timeline": [
                {k: round(v, 3) for k, v in s.items()} for s in window.samples[:: max(1, int(1 / SAMPLE_S))]
            ],
        }

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
    print(f"    latency p50 {lat['p50']:.1f} ms p99 {lat['p99']:.1f} ms (n={lat['n']}); API CPU {cpu['api_cpu_s']:.2f}s "
          f"({cpu['api_core_pct']:.0f}% of a core over {cpu['wall_s']:.1f}s); exact {check['exact']}/"
          f"{check['clients']}, reconnects {check['reconnects']}", file=sys.stderr)  # fmt: skip


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


# -- output ----------------------------------------------------------------------------------------------------------


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


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def aggregate(reps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repetitions of the headline figures, and the correctness totals."""
    checks = [r["check"] for r in reps]
    return {
        "reps": len(reps),
        "latency_p50_ms": median(r["latency_ms"]["p50"] for r in reps),
        "latency_p99_ms": median(r["latency_ms"]["p99"] for r in reps),
        "latency_max_ms": max((r["latency_ms"]["max"] for r in reps), default=math.nan),
        "latency_samples": sum(r["latency_ms"]["n"] for r in reps),
        "api_cpu_s": median(r["cpu_total"]["api_cpu_s"] for r in reps),
        "api_core_pct": median(r["cpu_total"]["api_core_pct"] for r in reps),
        "window_s": median(r["cpu_total"]["wall_s"] for r in reps),
        "api_rss_peak_mb": max((r["resources"]["api_rss_peak_mb"] for r in reps), default=math.nan),
        "api_rss_start_mb": median(r["resources"]["api_rss_start_mb"] for r in reps),
        "loop_lag_p99_ms": median(r["resources"]["loop_lag_ms"]["p99"] for r in reps),
        "clients": sum(c["clients"] for c in checks),
        "exact": sum(c["exact"] for c in checks),
        "reconnects": sum(c["reconnects"] for c in checks),
        "drops": sum(c["drops"] for c in checks),
        "all_exact": all(c["all_exact"] for c in checks),
    }


def print_report(results: dict[str, Any]) -> None:
    cfg, env = results["config"], results["environment"]
    clock = results["clock"]
    print()
    print(f"SSE delivery benchmark: {cfg['workers']} workers x {cfg['pool']} c{cfg['concurrency']}; API pid "
          f"{env['api_pid']}{' (under cProfile: figures inflated)' if cfg['profile'] else ''}; Redis TIME - "
          f"time.time() = {clock['offset_us']:+.0f} µs (± {clock['rtt_us'] / 2:.0f} µs)")  # fmt: skip
    rows = [("scenario", "reps", "clients", "live ev", "p50 ms", "p99 ms", "max ms", "API CPU s", "% core",
             "window s", "RSS MB", "lag p99", "exact", "reconn")]  # fmt: skip
    labels = {"one_run": f"(1) {cfg['clients']} clients, 1 run", "many_runs": f"(2) {cfg['runs']} runs x 1 client"}
    for key, label in labels.items():
        a = results["summary"][key]
        rows.append((label, str(a["reps"]), str(a["clients"]), str(a["latency_samples"]), _fmt(a["latency_p50_ms"]),
                     _fmt(a["latency_p99_ms"]), _fmt(a["latency_max_ms"]), _fmt(a["api_cpu_s"], 2),
                     _fmt(a["api_core_pct"], 0), _fmt(a["window_s"]),
                     f"{_fmt(a['api_rss_start_mb'], 0)}→{_fmt(a['api_rss_peak_mb'], 0)}",
                     _fmt(a["loop_lag_p99_ms"]), f"{a['exact']}/{a['clients']}", str(a["reconnects"])))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(row)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(
        "(latency: event ts → client receive, medians over reps of each rep's p50/p99; max over all; API CPU and "
        "% of one core over the whole window; RSS: at window start → peak; lag: the clients' own loop lag p99)"
    )
    for r in results["one_run"]:
        fo, live, conn = r["fan_out_ms"], r["cpu_live"], r["streams"]["connect_ms"]
        print(f"  (1) {r['clients']} clients: {r['events_per_run']} events/run ({r['backlog_events_per_client']} "
              f"before the gate, replayed); connect p50/p99 {_fmt(conn['p50'])}/{_fmt(conn['p99'])} ms, all caught up "
              f"in {r['connect_phase_s']:.2f}s; live part {live['wall_s']:.2f}s: API {live['api_cpu_s']:.2f}s CPU "
              f"({live['api_core_pct']:.0f}% core); per event first client p50 {_fmt(fo['first_client_ms']['p50'])} ms,"
              f" last client p50 {_fmt(fo['last_client_ms']['p50'])} / p99 {_fmt(fo['last_client_ms']['p99'])} ms")  # fmt: skip
    for r in results["many_runs"]:
        res, conn = r["resources"], r["streams"]["connect_ms"]
        print(f"  (2) {r['runs']} runs: submitted in {r['submit_phase_s']:.1f}s, last run ended after "
              f"{r['makespan_s']:.1f}s ({r['runs_per_s']:.0f} runs/s); peak {res['open_streams_peak']} open streams, "
              f"{res['redis_clients_peak']} Redis clients, {res['api_fds_peak']} API fds; connect p50/p99 "
              f"{_fmt(conn['p50'])}/{_fmt(conn['p99'])} ms; latency p50/p99 while submitting "
              f"{_fmt(r['latency_during_submits_ms']['p50'])}/{_fmt(r['latency_during_submits_ms']['p99'])} ms, after "
              f"{_fmt(r['latency_after_submits_ms']['p50'])}/{_fmt(r['latency_after_submits_ms']['p99'])} ms; "
              f"{r['replayed_events']} events replayed on connect (not in latency)")  # fmt: skip
    print("CPU seconds by process over each window (medians):")
    for key, label in labels.items():
        reps = results[key]
        roles = reps[0]["cpu_total"]["cpu_s"].keys() if reps else []
        parts = ", ".join(f"{role} {median(r['cpu_total']['cpu_s'][role] for r in reps):.2f}" for role in roles)
        machine = median(r["cpu_total"]["all_cpu_pct_of_machine"] for r in reps)
        print(f"  {label:<28} {parts}  (= {machine:.0f}% of the machine's {env['cpus']} CPUs)")
    load = env["loadavg_1_5_15_before"], env["loadavg_1_5_15_after"]
    print(f"Machine: {env['cpus']} CPUs, load average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in load[0])} before, "
          f"{'/'.join(f'{x:.2f}' for x in load[1])} after (shared with other work)")  # fmt: skip
    for key, label in labels.items():
        for r in results[key]:
            check = r["check"]
            if not check["all_exact"]:
                print(f"  {label}: {check['clients'] - check['exact']} clients saw wrong events: missing "
                      f"{check['missing']}, duplicated {check['duplicated']}, unexpected {check['unexpected']}, "
                      f"out of order {check['out_of_order']}, frame errors {check['frame_errors']}, incomplete "
                      f"{check['incomplete']}; e.g. {check['examples'][:1]}")  # fmt: skip
    if results.get("profile"):
        print("API event-loop thread under cProfile, top functions by own time (s):")
        for line in results["profile"]["top_tottime"][:20]:
            print(f"  {line}")


def profile_summary(path: Path, top: int = 40) -> dict[str, Any]:
    """The cProfile file's top functions by own time and by cumulative time, as text lines."""
    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = stats.stats  # type: ignore[attr-defined]

    def lines(index: int) -> list[str]:
        ordered = sorted(rows.items(), key=lambda kv: kv[1][index], reverse=True)[:top]
        return [f"{v[2]:8.2f} own {v[3]:8.2f} cum {v[1]:>9} calls  {_where(k)}" for k, v in ordered]

    return {"total_s": total, "file": str(path), "top_tottime": lines(2), "top_cumtime": lines(3)}


def _where(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    for marker in ("site-packages/", "/work/main/"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
    return f"{filename}:{line}({name})"


def _versions(url: str) -> dict[str, Any]:
    server = redis.Redis.from_url(url).info("server")
    names = ("httpx", "uvicorn", "sse-starlette", "starlette", "fastapi", "redis", "celery", "uvloop", "httptools")
    versions: dict[str, Any] = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return {"python": platform.python_version(), **versions, "redis_server": server.get("redis_version"),
            "cpus": os.cpu_count(), "platform": platform.platform()}  # fmt: skip


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# -- main ------------------------------------------------------------------------------------------------------------


def _run_loop(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def _bench_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ORCH_API_TOKENS"}  # no tokens: loopback only
    env.update({"REDIS_URL": redis_url, "ORCH_IMPORTS": IMPORTS,
                "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(SCRIPTS_DIR)])})  # fmt: skip
    return env


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--submitter"]:
        return submitter_main(args[1], int(args[2]))
    cfg = parse_args(args)
    started = time.monotonic()
    load_before = os.getloadavg()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    profile_path = LOG_DIR / "api.prof" if cfg.profile else None
    server = RedisServer()
    previous_sigint = signal.getsignal(signal.SIGINT)
    api: ApiProcess | None = None
    try:
        with stop_on_signals(server):  # SIGTERM/SIGHUP unwind through the finally blocks; Redis is stopped last
            server.start()
            env = _bench_env(server.url)
            settings = Settings.from_env({"REDIS_URL": server.url, "ORCH_IMPORTS": IMPORTS})
            client = Client(settings)
            workers = LocalWorkers(client.app, count=cfg.workers, env={k: env[k] for k in ("REDIS_URL", "ORCH_IMPORTS",
                                   "PYTHONPATH")}, pool=cfg.pool, concurrency=cfg.concurrency, log_dir=LOG_DIR,
                                   loglevel=cfg.loglevel)  # fmt: skip
            api = ApiProcess(env, LOG_DIR / "api.log", profile_path)
            try:
                print(f"redis {server.url}; starting {cfg.workers} workers and the API (logs in {LOG_DIR})",
                      file=sys.stderr)  # fmt: skip
                workers.start()
                api.start()
                clock = clock_offset(redis.Redis.from_url(server.url))
                bench = Bench(cfg, client, api, CpuRoles(api, workers, server.pid), server.url)
                api_pid = api.pid
                runs = _run_loop(bench.run)
                results: dict[str, Any] = {
                    "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
                    "clock": clock,
                    **runs,
                }
                results["environment"] = {**_versions(server.url), "api_pid": api_pid,
                                          "api_command": "python -m orchestrator.cli api --host 127.0.0.1 --port N"}  # fmt: skip
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
                print("stopping the API and the workers", file=sys.stderr)
                api.stop()
                workers.stop(grace=10)
    except KeyboardInterrupt:
        print("interrupted: API, workers and Redis stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    results["environment"]["loadavg_1_5_15_before"] = load_before
    results["environment"]["loadavg_1_5_15_after"] = os.getloadavg()
    results["summary"] = {key: aggregate(results[key]) for key in ("one_run", "many_runs")}
    if profile_path is not None and profile_path.exists():
        results["profile"] = profile_summary(profile_path)
    results["runtime_s"] = time.monotonic() - started
    print_report(results)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(_json_safe(results), indent=2, ensure_ascii=False) + "\n")
    print(f"\nresults: {cfg.out}  (total {results['runtime_s']:.0f}s)")
    ok = all(results["summary"][key]["all_exact"] for key in ("one_run", "many_runs"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
