"""Benchmark: live event delivery through the HTTP API's Server-Sent Events, at fan-out and at many runs.

Usage::

    .venv/bin/python scripts/bench_stream.py [--quick] [--clients 200] [--runs 1000] [--reps 3] [--runs-reps 1]
                                             [--workers 2] [--pool threads] [--concurrency 16] [--profile]
                                             [--api-redis-pool N] [--api-pythonpath DIR]

It starts a private ``redis-server`` (random port), ``--workers`` real ``celery -A workers worker`` processes and the
API as its own process (``python -m orchestrator.cli api`` on a random loopback port, no tokens), then measures:

(1) ``--clients`` SSE clients on one run. The run's first step is a gate (``bench_stream.gate`` in
    ``scripts/bench_stream_tasks.py``) that holds it until every client has connected and received the events so
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
``scripts/bench_stream_app.py`` (the same ``serve``, with ``max_connections=N`` on the asyncio Redis pool whose
default of 100 the installed redis-py applies), and ``--api-pythonpath DIR`` puts DIR first on the API's
``PYTHONPATH`` only (e.g. ``pip install --target DIR hiredis`` for redis-py's C reply parser).

It prints a table, writes ``test-artifacts/bench_stream.json`` (worker and API logs in
``test-artifacts/bench-stream-logs/``) and exits 0 unless the benchmark itself fails or a client saw wrong events
(exit 1). The API, workers and Redis are stopped on exit, Ctrl-C, SIGTERM and SIGHUP.
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
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterable, Sequence
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

from bench_stream_tasks import gate_key  # noqa: E402
from benchkit import json_safe  # noqa: E402

from orchestrator import Client, Settings  # noqa: E402
from orchestrator.dev.local_workers import LocalWorkers  # noqa: E402
from orchestrator.dev.redis_server import RedisServer, stop_on_signals  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "test-artifacts" / "bench_stream.json"
LOG_DIR = REPO_ROOT / "test-artifacts" / "bench-stream-logs"
IMPORTS = "tests.workflows,bench_stream_tasks"
RUN_ENDS = frozenset({"run_succeeded", "run_failed", "run_cancelled", "run_timed_out"})
WIRE_KEYS = frozenset({"run_id", "seq", "type", "step", "attempt", "ts", "data"})
MAX_RECONNECTS = 10_000  # in practice: until the scenario's deadline
RECONNECT_MAX_S = 3.0
STREAMS_PER_HTTP_CLIENT = 50  # httpx pools scan their connections per request: many small pools stay cheap
SAMPLE_S = 0.25
# What the API logs when streams are in trouble (counted in its log over each window).
LOG_MARKERS = {
    "redis_too_many_connections": "Too many connections",
    "hub_cannot_read": "cannot read its stream",
    "sse_redis_error": "SSE stream of run",
    "redis_error_503": "orchestrator.api.app: Redis error",
    "client_fell_behind": "fell behind and was disconnected",
    "send_timeout": "accepted nothing for",
    "errors": "ERROR:",
}

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
    connect_timeout_s: float
    api_redis_pool: int
    api_pythonpath: str
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
    parser.add_argument("--reps", type=int, default=None, help="repetitions of (1) (default 5, quick 1)")
    parser.add_argument("--runs-reps", type=int, default=None, help="repetitions of (2) (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--pool", default="threads", help="Celery pool: threads, prefork … (default threads)")
    parser.add_argument("--concurrency", type=int, default=16, help="pool slots per worker (default 16)")
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
        help="what-if: serve the API through scripts/bench_stream_app.py with max_connections=N on its "
        "asyncio Redis pool (default 0: `orchestrator api` as shipped)",
    )
    parser.add_argument(
        "--api-pythonpath",
        default="",
        metavar="DIR",
        help="what-if: put DIR first on the API process's PYTHONPATH only (e.g. a `pip install --target DIR hiredis`)",
    )
    parser.add_argument("--profile", action="store_true", help="run the API under cProfile (inflates its figures)")
    parser.add_argument("--loglevel", default="WARNING", help="worker log level (default WARNING)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
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
        out=ns.out,
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
    """``python -m orchestrator.cli api`` on a random loopback port, in its own session (Ctrl-C reaches us only).

    With ``redis_pool`` it is ``scripts/bench_stream_app.py`` instead: the same ``serve`` with a larger asyncio pool.
    """

    def __init__(self, env: dict[str, str], log_path: Path, profile_path: Path | None, redis_pool: int = 0) -> None:
        self.env = env
        self.log_path = log_path
        self.profile_path = profile_path
        self.redis_pool = redis_pool
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.command = ""

    def command_for(self, port: int) -> list[str]:
        if self.redis_pool:
            serve = [str(SCRIPTS_DIR / "bench_stream_app.py"), "--max-connections", str(self.redis_pool)]
        else:
            serve = ["-m", "orchestrator.cli", "api"]
        prefix = ["-m", "cProfile", "-o", str(self.profile_path)] if self.profile_path is not None else []
        return [sys.executable, *prefix, *serve, "--host", "127.0.0.1", "--port", str(port)]

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_counts(self, since: int) -> dict[str, int]:
        """How often the API logged each kind of stream trouble since byte ``since`` of its log."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(since)
                text = handle.read().decode(errors="replace")
        except OSError:
            return {}
        return {name: text.count(marker) for name, marker in LOG_MARKERS.items()}

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
            argv = self.command_for(self.port)
            self.command = " ".join(argv)
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    argv,
                    env=self.env,
                    cwd=REPO_ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
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
        """SIGINT, SIGKILL after ``grace``: uvicorn shuts down gracefully, then re-raises the signal; SIGINT then ends
        in a ``KeyboardInterrupt``, which lets cProfile write its file (the default SIGTERM action would not)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
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
        out = {
            "api": proc_cpu(self.api.pid),
            "workers": 0.0,
            "redis": proc_cpu(self.redis_pid),
            "bench_clients": proc_cpu(os.getpid()),
        }
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
    stopping: bool = False  # the scenario is over: no more reconnects

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


async def _read_frames(response: httpx.Response, record: StreamRecord, stopping: Callable[[], bool]) -> None:
    """Parse SSE frames (``field: value`` lines, a blank line ends a frame) as chunks arrive; stamp each frame with
    the arrival time of the chunk that completed it."""
    buffer = b""
    frame: dict[bytes, bytes] = {}
    async for chunk in response.aiter_raw():
        now = time.time()
        if stopping():
            return
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
    backoff = 0.1
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
                    await _read_frames(response, record, lambda: streams.stopping)
                    if record.final_seen:
                        record.t_eof = time.time()
                        return
                    record.drops.append("stream ended before the run's final event")
        except httpx.HTTPError as exc:
            task = asyncio.current_task()
            if streams.stopping or (task is not None and task.cancelling()):
                raise asyncio.CancelledError from exc  # a cancel that the HTTP stack turned into an I/O error
            if record.final_seen:
                record.drops.append(f"{type(exc).__name__} after the final event: {exc}")
                return
            record.drops.append(f"{type(exc).__name__}: {exc}")
        finally:
            if opened:
                streams.closed()
        if streams.stopping:
            return
        if time.monotonic() > deadline or record.reconnects >= MAX_RECONNECTS or record.final_seen:
            record.error = f"gave up after {record.reconnects} reconnects: {record.drops[-1:]}"
            return
        record.reconnects += 1
        # Like a browser's EventSource (reconnection time ~3 s), with exponential steps up to it and some jitter.
        await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
        backoff = min(backoff * 2, RECONNECT_MAX_S)


async def cancel_all(tasks: Sequence[asyncio.Task[None]], timeout: float = 15.0) -> None:
    """Cancel the client tasks and wait for them, cancelling again those still running: anyio's shielded sections
    inside httpcore can absorb a cancel, after which such a task would carry on reading its stream."""
    pending = [t for t in tasks if not t.done()]
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.5)
        pending = [t for t in pending if not t.done()]
    if pending:
        print(f"warning: {len(pending)} client tasks did not stop", file=sys.stderr)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" noise


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
            self._clients.append(
                httpx.AsyncClient(
                    base_url=self.base_url,
                    timeout=httpx.Timeout(connect=30.0, read=60.0, write=30.0, pool=30.0),
                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=STREAMS_PER_HTTP_CLIENT),
                )
            )
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
        self.log_start = 0

    def mark(self, name: str) -> None:
        self.marks[name] = (time.monotonic(), self.roles.snapshot())

    def start(self) -> None:
        self.log_start = self.roles.api.log_offset()
        api = self.roles.api.pid
        self.peak_rss_reset = reset_peak_rss(api)
        self.rss_start_kb = proc_status(api).get("VmRSS", 0)
        self.load_start = os.getloadavg()
        self.mark("start")
        self._tasks = [asyncio.create_task(self._lag_monitor()), asyncio.create_task(self._sampler())]

    async def stop(self) -> dict[str, Any]:
        if "start" not in self.marks:
            return {}
        self.mark("end")
        self._stop.set()
        await asyncio.gather(*self._tasks)
        status = proc_status(self.roles.api.pid)
        return {
            "api_rss_start_mb": self.rss_start_kb / 1024,
            "api_rss_peak_mb": (
                status.get("VmHWM", 0) if self.peak_rss_reset else max([s["api_rss_kb"] for s in self.samples] or [0])
            )
            / 1024,
            "api_rss_peak_sampled_mb": max([s["api_rss_kb"] for s in self.samples] or [0]) / 1024,
            "api_rss_end_mb": status.get("VmRSS", 0) / 1024,
            "api_rss_peak_from": "VmHWM after clear_refs" if self.peak_rss_reset else "sampled VmRSS",
            "api_threads_peak": max([s["api_threads"] for s in self.samples] or [0]),
            "api_fds_peak": max([s["api_fds"] for s in self.samples] or [0]),
            "redis_clients_peak": max([s["redis_clients"] for s in self.samples] or [0]),
            "open_streams_peak": self.streams.peak,
            "loop_lag_ms": summary_ms(self.lag),
            "api_log": self.roles.api.log_counts(self.log_start),
            "loadavg_start": self.load_start,
            "loadavg_end": os.getloadavg(),
        }

    def cpu(self, start: str = "start", end: str = "end") -> dict[str, Any]:
        """CPU seconds by role between two marks, and the API's as % of one core."""
        (t0, c0), (t1, c1) = self.marks[start], self.marks[end]
        wall = max(t1 - t0, 1e-9)
        used = {role: c1[role] - c0.get(role, 0.0) for role in c1}
        return {
            "wall_s": wall,
            "cpu_s": used,
            "api_cpu_s": used["api"],
            "api_core_pct": 100 * used["api"] / wall,
            "all_cpu_pct_of_machine": 100 * sum(used.values()) / wall / (os.cpu_count() or 1),
        }

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
            self.samples.append(
                {
                    "t": time.monotonic() - t0,
                    "api_rss_kb": status.get("VmRSS", 0),
                    "api_threads": status.get("Threads", 0),
                    "api_fds": proc_fds(api),
                    "redis_clients": clients,
                    "open_streams": self.streams.now,
                    "api_cpu_s": proc_cpu(api),
                    "wall": time.time(),
                }
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SAMPLE_S):  # not wait_for: before 3.12 it can swallow a cancel
                    await self._stop.wait()


# -- checks ----------------------------------------------------------------------------------------------------------


def check_streams(
    records: Sequence[StreamRecord], expected: dict[str, list[tuple[int, str, str | None, int]]]
) -> dict[str, Any]:
    """Whether every client got exactly its run's events, once each, in order; and what went wrong otherwise."""
    out: dict[str, Any] = {
        "clients": len(records),
        "exact": 0,
        "missing": 0,
        "duplicated": 0,
        "out_of_order": 0,
        "unexpected": 0,
        "frame_errors": 0,
        "incomplete": 0,
        "runs_not_succeeded": 0,
        "reconnects": 0,
        "drops": 0,
        "http_204": 0,
        "examples": [],
    }
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
            out["examples"].append(
                {
                    "run_id": record.run_id,
                    "got_seqs": [s for s, *_ in got],
                    "want_seqs": [s for s, *_ in want],
                    "drops": record.drops[:5],
                    "frame_errors": record.frame_errors[:3],
                    "error": record.error,
                }
            )
    out["all_exact"] = out["exact"] == len(records)
    return out


def expected_events(client: Client, run_ids: Iterable[str]) -> dict[str, list[tuple[int, str, str | None, int]]]:
    return {rid: [(e.seq, e.type, e.step, e.attempt) for e in client.store.events(rid)] for rid in set(run_ids)}


def stream_timings(records: Sequence[StreamRecord]) -> dict[str, Any]:
    connect = [r.t_open - r.t_request for r in records if r.t_open is not None and r.t_request is not None]
    eof = [r.t_eof - r.t_final for r in records if r.t_eof is not None and r.t_final is not None]
    frames = sum(len(r.events) for r in records)
    statuses = Counter(code for r in records for code in r.statuses)
    drops = Counter(reason.split(":", 1)[0] for r in records for reason in r.drops)
    return {
        "connect_ms": summary_ms(connect),
        "final_event_to_eof_ms": summary_ms(eof),
        "frames": frames,
        "pings": sum(r.pings for r in records),
        "http_statuses": {str(k): v for k, v in sorted(statuses.items())},
        "drop_reasons": dict(drops.most_common()),
        "drop_examples": list(dict.fromkeys(reason[:300] for r in records for reason in r.drops))[:8],
        "gave_up": sum(1 for r in records if r.error),
    }


def per_frame_us(cpu: dict[str, Any], frames: int) -> dict[str, float]:
    """CPU microseconds per delivered frame: the API's (serving) and this process's (receiving)."""
    if not frames:
        return {}
    return {"api": cpu["cpu_s"]["api"] / frames * 1e6, "bench_clients": cpu["cpu_s"]["bench_clients"] / frames * 1e6}


def by_second_ms(samples: Iterable[tuple[float, float]]) -> list[dict[str, float]]:
    """Latency summaries of (seconds since a start, latency) samples, per whole second: shows whether a tail is one
    stall or spread out."""
    groups: dict[int, list[float]] = defaultdict(list)
    for since, latency in samples:
        groups[int(since)].append(latency)
    return [{"second": sec, **{k: round(v, 2) for k, v in summary_ms(vals).items() if k in {"n", "p50", "p99", "max"}}}
            for sec, vals in sorted(groups.items())]  # fmt: skip


def by_type_ms(samples: Iterable[tuple[str, float]]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for kind, latency in samples:
        groups[kind].append(latency)
    return {
        kind: {k: v for k, v in summary_ms(vals).items() if k in {"n", "p50", "p99"}}
        for kind, vals in sorted(groups.items())
    }


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
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(SCRIPTS_DIR)]),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).resolve()),
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
                await self._until(lambda: all(r.last_seq >= backlog or r.error for r in records), connect_until,
                                  "every client to connect", 0.02)  # fmt: skip
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
        live = [(e[1], e[5] - e[4]) for r in records for e in r.events
                if r.t_open is not None and e[4] >= max(r.t_open, t_release)]  # fmt: skip
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
    pool = cfg["api_redis_pool"]
    what_if = f" (WHAT-IF: the API's asyncio Redis pool has max_connections={pool})" if pool else ""
    if cfg["api_pythonpath"]:
        what_if += f" (WHAT-IF: API PYTHONPATH starts with {cfg['api_pythonpath']})"
    what_if += f"; hiredis in the API: {env.get('api_hiredis')}"
    print()
    print(
        f"SSE delivery benchmark: {cfg['workers']} workers x {cfg['pool']} c{cfg['concurrency']}; API pid "
        f"{env['api_pid']}{' (under cProfile: figures inflated)' if cfg['profile'] else ''}{what_if}; Redis TIME - "
        f"time.time() = {clock['offset_us']:+.0f} µs (± {clock['rtt_us'] / 2:.0f} µs)"
    )
    rows = [
        (
            "scenario",
            "reps",
            "clients",
            "live ev",
            "p50 ms",
            "p99 ms",
            "max ms",
            "API CPU s",
            "% core",
            "window s",
            "RSS MB",
            "lag p99",
            "exact",
            "reconn",
        )
    ]
    labels = {"one_run": f"(1) {cfg['clients']} clients, 1 run", "many_runs": f"(2) {cfg['runs']} runs x 1 client"}
    for key, label in labels.items():
        a = results["summary"][key]
        rows.append(
            (
                label,
                str(a["reps"]),
                str(a["clients"]),
                str(a["latency_samples"]),
                _fmt(a["latency_p50_ms"]),
                _fmt(a["latency_p99_ms"]),
                _fmt(a["latency_max_ms"]),
                _fmt(a["api_cpu_s"], 2),
                _fmt(a["api_core_pct"], 0),
                _fmt(a["window_s"]),
                f"{_fmt(a['api_rss_start_mb'], 0)}→{_fmt(a['api_rss_peak_mb'], 0)}",
                _fmt(a["loop_lag_p99_ms"]),
                f"{a['exact']}/{a['clients']}",
                str(a["reconnects"]),
            )
        )
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
        print(
            f"  (1) {r['clients']} clients: {r['events_per_run']} events/run ({r['backlog_events_per_client']} "
            f"before the gate, replayed); connect p50/p99 {_fmt(conn['p50'])}/{_fmt(conn['p99'])} ms, all caught up "
            f"in {r['connect_phase_s']:.2f}s; live part {live['wall_s']:.2f}s: API {live['api_cpu_s']:.2f}s CPU "
            f"({live['api_core_pct']:.0f}% core); per event first client p50 {_fmt(fo['first_client_ms']['p50'])} ms,"
            f" last client p50 {_fmt(fo['last_client_ms']['p50'])} / p99 {_fmt(fo['last_client_ms']['p99'])} ms"
        )
    for r in results["many_runs"]:
        res, conn, live = r["resources"], r["streams"]["connect_ms"], r["cpu_live"]
        print(
            f"  (2) {r['runs']} runs: submitted in {r['submit_phase_s']:.1f}s (workers paused); "
            f"{r['clients_caught_up_at_release']} clients connected and caught up after {r['connect_phase_s']:.1f}s "
            f"(connect p50/p99 {_fmt(conn['p50'])}/{_fmt(conn['p99'])} ms; API {r['cpu_connect']['api_cpu_s']:.2f}s "
            f"CPU); released: last run ended {r['release_to_last_run_end_s']:.1f}s later; live part API "
            f"{live['api_cpu_s']:.2f}s CPU ({live['api_core_pct']:.0f}% core); peak {res['open_streams_peak']} open "
            f"streams, {res['redis_clients_peak']} Redis clients, {res['api_fds_peak']} API fds; "
            f"{r['not_live_events']} of {r['frames']} frames not live (before release or connect)"
        )
    for key, label in labels.items():
        for i, r in enumerate(results[key]):
            print(f"  {label} rep {i + 1}: {_trouble_line(r)}")
    print("CPU seconds by process over each window (medians):")
    for key, label in labels.items():
        reps = results[key]
        roles = reps[0]["cpu_total"]["cpu_s"].keys() if reps else []
        parts = ", ".join(f"{role} {median(r['cpu_total']['cpu_s'][role] for r in reps):.2f}" for role in roles)
        machine = median(r["cpu_total"]["all_cpu_pct_of_machine"] for r in reps)
        print(f"  {label:<28} {parts}  (= {machine:.0f}% of the machine's {env['cpus']} CPUs)")
    load = env["loadavg_1_5_15_before"], env["loadavg_1_5_15_after"]
    print(
        f"Machine: {env['cpus']} CPUs, load average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in load[0])} before, "
        f"{'/'.join(f'{x:.2f}' for x in load[1])} after (shared with other work)"
    )
    for key, label in labels.items():
        for r in results[key]:
            check = r["check"]
            if not check["all_exact"]:
                print(
                    f"  {label}: {check['clients'] - check['exact']} clients saw wrong events: missing "
                    f"{check['missing']}, duplicated {check['duplicated']}, unexpected {check['unexpected']}, "
                    f"out of order {check['out_of_order']}, frame errors {check['frame_errors']}, incomplete "
                    f"{check['incomplete']}; e.g. {check['examples'][:1]}"
                )
    if results.get("profile"):
        print("API event-loop thread under cProfile, top functions by own time (s):")
        for line in results["profile"]["top_tottime"][:20]:
            print(f"  {line}")


def _trouble_line(result: dict[str, Any]) -> str:
    streams, per_frame = result["streams"], result.get("cpu_us_per_frame", {})
    log = {k: v for k, v in result["resources"].get("api_log", {}).items() if v}
    return (
        f"HTTP {streams['http_statuses']}, drops {streams['drop_reasons'] or 0}, gave up {streams['gave_up']}; "
        f"API log {log or 'clean'}; CPU per frame: API {_fmt(per_frame.get('api'), 0)} µs, clients "
        f"{_fmt(per_frame.get('bench_clients'), 0)} µs"
    )


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
    return {
        "python": platform.python_version(),
        **versions,
        "redis_server": server.get("redis_version"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def _hiredis_in(env: dict[str, str]) -> bool | None:
    """Whether redis-py finds hiredis (its C reply parser) with the API process's environment."""
    probe = "import redis.utils, sys; sys.stdout.write(str(redis.utils.HIREDIS_AVAILABLE))"
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], check=False, env=env, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"True": True, "False": False}.get(out.stdout.strip())


# -- main ------------------------------------------------------------------------------------------------------------


def _run_loop(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


async def _until_signalled(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; on SIGINT, SIGTERM or SIGHUP cancel it (its ``finally`` blocks stop what it started) and raise
    ``KeyboardInterrupt`` or ``SystemExit(128 + signum)``.

    ``stop_on_signals``'s handler raises ``SystemExit`` from a plain signal handler, and asyncio's own Ctrl-C handling
    cancels the main task once; a single cancel can be lost (``asyncio.wait_for`` before Python 3.12 swallows one
    that races with its result), so the work is cancelled until it has really stopped. The previous handlers come
    back afterwards, for the cleanup that follows outside the loop.
    """
    loop = asyncio.get_running_loop()
    received: list[int] = []
    signalled = asyncio.Event()

    def on_signal(signum: int) -> None:
        received.append(signum)
        signalled.set()

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for signum in previous:
        loop.add_signal_handler(signum, on_signal, signum)
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(signalled.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        print(f"signal {received[0]}: stopping", file=sys.stderr)
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if not task.cancelled() and task.exception() is not None:
            print(f"error while stopping: {task.exception()!r}", file=sys.stderr)
        if received[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + received[0])
    finally:
        waiter.cancel()
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _fresh_profile_path() -> Path:
    path = LOG_DIR / "api.prof"
    path.unlink(missing_ok=True)  # a stale file must not pass for this run's profile
    return path


def _bench_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ORCH_API_TOKENS"}  # no tokens: loopback only
    env.update(
        {
            "REDIS_URL": redis_url,
            "ORCH_IMPORTS": IMPORTS,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(SCRIPTS_DIR)]),
        }
    )
    return env


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--submitter"]:
        return submitter_main(args[1], int(args[2]))
    cfg = parse_args(args)
    started = time.monotonic()
    load_before = os.getloadavg()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    profile_path = _fresh_profile_path() if cfg.profile else None
    server = RedisServer()
    previous_sigint = signal.getsignal(signal.SIGINT)
    bench: Bench | None = None
    try:
        with stop_on_signals(server):  # SIGTERM/SIGHUP unwind through the finally blocks; Redis is stopped last
            server.start()
            env = _bench_env(server.url)
            settings = Settings.from_env({"REDIS_URL": server.url, "ORCH_IMPORTS": IMPORTS})
            client = Client(settings)
            workers = LocalWorkers(
                client.app,
                count=cfg.workers,
                env={k: env[k] for k in ("REDIS_URL", "ORCH_IMPORTS", "PYTHONPATH")},
                pool=cfg.pool,
                concurrency=cfg.concurrency,
                log_dir=LOG_DIR,
                loglevel=cfg.loglevel,
            )
            (LOG_DIR / "api.log").write_bytes(b"")
            api_env = dict(env)
            if cfg.api_pythonpath:
                api_env["PYTHONPATH"] = os.pathsep.join([cfg.api_pythonpath, env["PYTHONPATH"]])
            api = ApiProcess(api_env, LOG_DIR / "api.log", profile_path, cfg.api_redis_pool)
            try:
                print(
                    f"redis {server.url}; starting {cfg.workers} workers and the API (logs in {LOG_DIR})",
                    file=sys.stderr,
                )
                workers.start()
                api.start()
                clock = clock_offset(redis.Redis.from_url(server.url))
                bench = Bench(cfg, client, api, CpuRoles(api, workers, server.pid), server.url)
                api_pid = api.pid
                runs = _run_loop(lambda: _until_signalled(bench.run()))
                results: dict[str, Any] = {
                    "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
                    "clock": clock,
                    **runs,
                }
                results["environment"] = {
                    **_versions(server.url),
                    "api_pid": api_pid,
                    "api_command": api.command,
                    "api_hiredis": _hiredis_in(api_env),
                }
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
                print("stopping the API and the workers", file=sys.stderr)
                if bench is not None:
                    bench.kill_submitter()
                api.stop()
                workers.stop(grace=10)
    except KeyboardInterrupt:
        print("interrupted: API, workers and Redis stopped", file=sys.stderr)
        return 130
    except SystemExit:
        print("terminated by a signal: API, workers and Redis stopped", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    results["environment"]["loadavg_1_5_15_before"] = load_before
    return finish(cfg, results, profile_path, started)


def finish(cfg: Config, results: dict[str, Any], profile_path: Path | None, started: float) -> int:
    """Summarize, print and write the results; 0 when every client saw exactly its run's events."""
    results["environment"]["loadavg_1_5_15_after"] = os.getloadavg()
    results["summary"] = {key: aggregate(results[key]) for key in ("one_run", "many_runs")}
    if profile_path is not None and profile_path.exists():
        results["profile"] = profile_summary(profile_path)
    results["runtime_s"] = time.monotonic() - started
    print_report(results)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(json_safe(results), indent=2, ensure_ascii=False) + "\n")
    print(f"\nresults: {cfg.out}  (total {results['runtime_s']:.0f}s)")
    ok = all(results["summary"][key]["all_exact"] for key in ("one_run", "many_runs"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
