"""Measurement windows: CPU by process role, the API's memory, descriptors and Redis clients, the client loop's lag."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

import redis

from orchestrator.dev.local_workers import LocalWorkers
from scripts.harness import probes
from scripts.harness.stats import summary_ms
from scripts.stream.api import ApiProcess
from scripts.stream.clients import OpenStreams

SAMPLE_S = 0.25


@dataclass
class CpuRoles:
    """Whose CPU to read: the API, the workers (main processes and pool children), redis-server, this process."""

    api: ApiProcess
    workers: LocalWorkers
    redis_pid: int | None

    def snapshot(self) -> dict[str, float]:
        return {
            "api": probes.cpu_s(self.api.pid),
            "workers": sum(probes.workers_cpu_s(self.workers)),
            "redis": probes.cpu_s(self.redis_pid),
            "bench_clients": probes.cpu_s(os.getpid()),
        }


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
        self.peak_rss_reset = probes.reset_peak_rss(api)
        self.rss_start_kb = probes.proc_status(api).get("VmRSS", 0)
        self.load_start = os.getloadavg()
        self.mark("start")
        self._tasks = [asyncio.create_task(self._lag_monitor()), asyncio.create_task(self._sampler())]

    async def stop(self) -> dict[str, Any]:
        if "start" not in self.marks:
            return {}
        self.mark("end")
        self._stop.set()
        await asyncio.gather(*self._tasks)
        status = probes.proc_status(self.roles.api.pid)
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
            status = probes.proc_status(api)
            clients = probes.connected_clients(self.redis)
            self.samples.append(
                {
                    "t": time.monotonic() - t0,
                    "api_rss_kb": status.get("VmRSS", 0),
                    "api_threads": status.get("Threads", 0),
                    "api_fds": probes.open_fds(api),
                    "redis_clients": clients,
                    "open_streams": self.streams.now,
                    "api_cpu_s": probes.cpu_s(api),
                    "wall": time.time(),
                }
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SAMPLE_S):  # not wait_for: before 3.12 it can swallow a cancel
                    await self._stop.wait()
