#!/usr/bin/env python3
"""Streamed tokens: deltas published and delivered, and what ``stream: true`` costs the workers.

One run of ``--steps`` parallel offline ``llm`` steps (distinct prompts, reply cache off, ``--latency`` seconds each,
``--max-tokens``), all in flight at once on ``--workers`` x ``--concurrency`` threads, is run twice on a private Redis
with real workers and the API as its own process: ``plain`` (no streaming) and ``stream`` (``stream: true``). The
offline provider answers a streamed call with a real ``text/event-stream`` (one ``content_block_delta`` per word,
the latency spread over them), parsed by the SDK in the worker, coalesced there and published on Redis pub/sub.

Reported per mode: seconds from submit to the run's end; worker CPU seconds (main processes and pool children,
``/proc``) in all and per step; Redis CPU (``INFO cpu``); and for ``stream``: deltas published (a ``PSUBSCRIBE``
in this process counts them), deltas/s over the streaming window, and deltas delivered to one SSE client of
``GET /runs/{id}/events``, whose concatenated text per step must equal the step's output text (exit 1 otherwise).

    python -m scripts.bench_stream_tokens            # 200 steps
    python -m scripts.bench_stream_tokens --quick    # 40 steps
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # `python scripts/bench_stream_tokens.py`: run as `-m`
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, [sys.executable, "-m", "scripts.bench_stream_tokens", *sys.argv[1:]])

import argparse
import json
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import httpx
import redis

from orchestrator import Client, Settings
from scripts.harness import cli
from scripts.harness.lifecycle import log_dir, pool_workers, private_redis, run_main, running, worker_env
from scripts.harness.probes import workers_cpu_s
from scripts.harness.report import versions, write_results
from scripts.stream.api import ApiProcess

QUICK_STEPS = 40


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.parser(__doc__, name="bench_stream_tokens", quick=f"{QUICK_STEPS} steps")
    cli.add_workers(parser, workers=2, concurrency=100, pool="threads")
    parser.add_argument("--steps", type=int, default=None, help="parallel LLM steps in the run (default 200)")
    parser.add_argument("--latency", type=float, default=5.0, help="seconds each LLM call streams (default 5)")
    parser.add_argument("--max-tokens", type=int, default=400, help="max_tokens of each step (default 400)")
    parser.add_argument("--modes", default="plain,stream", help="plain, stream or both (default both)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a run may take")
    args = parser.parse_args(argv)
    args.steps = args.steps or (QUICK_STEPS if args.quick else 200)
    return args


def spec(name: str, steps: int, latency: float, max_tokens: int, *, stream: bool) -> dict[str, Any]:
    return {
        "name": name,
        "steps": [
            {
                "name": f"s{i}",
                "uses": "llm",
                "with": {
                    "prompt": f"Question {i}: write about streams of tokens",
                    "max_tokens": max_tokens,
                    "stream": stream,
                    "reply_cache": "off",
                    "simulate": {"latency_s": latency},
                },
            }
            for i in range(steps)
        ],
    }


class DeltaCounter(threading.Thread):
    """Counts every delta published on any run's channel (``PSUBSCRIBE orch:*:deltas``), with first and last times."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]  # redis-py leaves it unannotated
        self.pubsub.psubscribe("orch:*:deltas")
        self.count = 0
        self.first = self.last = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if message and message.get("type") == "pmessage":
                self.last = time.monotonic()
                self.first = self.first or self.last
                self.count += 1

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
        self.pubsub.close()


class SseReader(threading.Thread):
    """One SSE client of the run: counts ``llm_delta`` frames and joins each step's text.

    A client the API drops for falling behind reconnects with ``Last-Event-ID`` (counted); the text so far that comes
    first on every connect then replaces what it had of each step still running.
    """

    def __init__(self, url: str, run_id: str) -> None:
        super().__init__(daemon=True)
        self.url, self.run_id = url, run_id
        self.deltas = self.reconnects = 0
        self.texts: dict[str, str] = defaultdict(str)
        self.error: str | None = None
        self._last_id = ""
        self._done: set[str] = set()

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=60) as http:
                while self._connect(http):
                    self.reconnects += 1
                    for step in set(self.texts) - self._done:
                        self.texts[step] = ""
        except httpx.HTTPError as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def _connect(self, http: httpx.Client) -> bool:
        """Read one connection; ``True`` when it dropped before the run's end."""
        headers = {"Last-Event-ID": self._last_id} if self._last_id else {}
        with http.stream("GET", f"/runs/{self.run_id}/events", headers=headers) as response:
            if response.status_code == 204:
                return False
            event = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("id: "):
                    self._last_id = line[4:]
                elif line.startswith("data: "):
                    self._frame(event, json.loads(line[6:]))
                    if event.startswith("run_") and event != "run_started":
                        return False
        return True

    def _frame(self, event: str, data: dict[str, Any]) -> None:
        if event == "llm_reset":
            self.texts[data["step"]] = ""
        elif event == "llm_delta":
            self.deltas += 1
            self.texts[data["step"]] += data["text"]
        elif event.startswith("step_") and event in {"step_succeeded", "step_failed"}:
            self._done.add(data["step"])


def run_mode(args: argparse.Namespace, mode: str, client: Client, api: ApiProcess, workers: Any) -> dict[str, Any]:
    stream = mode == "stream"
    r = redis.Redis.from_url(client.settings.redis_url)
    counter = DeltaCounter(client.settings.redis_url)
    counter.start()
    cpu_before, redis_before = sum(workers_cpu_s(workers)), _redis_cpu(r)
    started = time.monotonic()
    run_id = client.submit(spec(f"bench_tokens_{mode}", args.steps, args.latency, args.max_tokens, stream=stream))
    reader = SseReader(api.url, run_id)
    reader.start()
    view = client.wait(run_id, timeout=args.timeout)
    elapsed = time.monotonic() - started
    cpu = sum(workers_cpu_s(workers)) - cpu_before
    redis_cpu = _redis_cpu(r) - redis_before
    reader.join(timeout=30)
    counter.stop()
    outputs = {name: step["output"]["text"] for name, step in view["steps"].items() if step.get("output")}
    window = counter.last - counter.first
    result: dict[str, Any] = {
        "mode": mode,
        "steps": args.steps,
        "status": view["status"],
        "seconds": round(elapsed, 2),
        "worker_cpu_s": round(cpu, 2),
        "worker_cpu_ms_per_step": round(1000 * cpu / args.steps, 2),
        "redis_cpu_s": round(redis_cpu, 2),
        "deltas_published": counter.count,
        "deltas_per_s": round(counter.count / window, 1) if window > 0 else 0.0,
        "deltas_delivered_sse": reader.deltas,
        "sse_reconnects": reader.reconnects,
        "sse_error": reader.error,
    }
    if stream:
        result["texts_match"] = sum(reader.texts.get(name) == text for name, text in outputs.items())
    return result


def _redis_cpu(r: redis.Redis) -> float:
    info: dict[str, Any] = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def print_report(results: list[dict[str, Any]]) -> None:
    print(
        f"{'mode':<7} {'steps':>5} {'time s':>7} {'worker cpu s':>12} {'ms/step':>8} {'redis cpu s':>11} "
        f"{'published':>9} {'deltas/s':>9} {'to 1 SSE':>8} {'texts ok':>8} {'reconnects':>10}"
    )
    for r in results:
        print(
            f"{r['mode']:<7} {r['steps']:>5} {r['seconds']:>7.2f} {r['worker_cpu_s']:>12.2f} "
            f"{r['worker_cpu_ms_per_step']:>8.2f} {r['redis_cpu_s']:>11.2f} {r['deltas_published']:>9} "
            f"{r['deltas_per_s']:>9.1f} {r['deltas_delivered_sse']:>8} {r.get('texts_match', '-'):>8} "
            f"{r['sse_reconnects']:>10}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def measure() -> int:
        started = time.monotonic()
        logs = log_dir("bench-stream-tokens-logs", fresh=True)
        with private_redis() as server, ExitStack() as stack:
            client = Client(Settings.from_env({"REDIS_URL": server.url}))
            workers = stack.enter_context(
                running(pool_workers(client.app, args, worker_env(server.url, ""), logs), grace=15)
            )
            api = ApiProcess({**os.environ, "REDIS_URL": server.url}, logs / "api.log", None)
            api.start()
            stack.callback(api.stop)
            results = [run_mode(args, mode, client, api, workers) for mode in args.modes.split(",")]
            meta = versions(server.url)
        print_report(results)
        write_results(
            args.json,
            {
                "results": results,
                "versions": meta,
                "args": vars(args),
                "command": cli.command("scripts.bench_stream_tokens", argv),
                "runtime_s": time.monotonic() - started,
            },
        )
        ok = all(r["status"] == "succeeded" and r.get("texts_match", r["steps"]) == r["steps"] for r in results)
        return 0 if ok else 1

    return run_main(measure)


if __name__ == "__main__":
    sys.exit(main())
