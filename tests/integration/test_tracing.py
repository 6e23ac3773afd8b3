"""One run, one trace: spans written by real worker processes join the run's trace under the right parents.

Also what tracing must never do to a producer: spoil ``--json`` output, or make a command wait on a collector.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from orchestrator import Client
from orchestrator.definition.spec import DEFAULT_MODEL
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.telemetry import trace_provider, tracing
from tests.conftest import ARTIFACTS, WORKER_ENV
from tests.integration.helpers import llm, py, ts, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BRANCHES = 4
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def span_file(tmp_path: Path) -> Iterator[Path]:
    """A file every process appends its finished spans to; this process (the client) traces into it too."""
    path = tmp_path / "spans.jsonl"
    trace_provider.configure(SimpleSpanProcessor(trace_provider.SpanFileExporter(path)))
    try:
        yield path
    finally:
        trace_provider.reset()


@pytest.fixture
def traced_workers(client: Client, redis_url: str, span_file: Path, unique: str) -> Iterator[str]:
    """Two worker processes of one slot each on a private queue, tracing into ``span_file``; yields the queue."""
    queue = f"trace_{unique}"
    log_dir = ARTIFACTS / "worker-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {"REDIS_URL": redis_url, **WORKER_ENV, "ORCH_TRACE_FILE": str(span_file), "OTEL_TRACES_EXPORTER": "none"}
    with LocalWorkers(client.app, count=2, concurrency=1, queues=(queue,), env=env, log_dir=log_dir):
        yield queue


def _spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_one_runs_spans_from_two_worker_processes_share_its_trace_with_the_right_parents(
    client: Client, traced_workers: str, span_file: Path, unique: str
) -> None:
    queue = traced_workers
    branches = [f"branch{i}" for i in range(BRANCHES)]
    spec = workflow(
        f"traced_{unique}",
        llm("root", queue=queue),
        *(py(name, "tests.sleep", "root", seconds=0.5, queue=queue) for name in branches),
        llm("join", *branches, queue=queue),
    )
    run_id = client.submit(spec)
    view = client.wait(run_id, timeout=60)
    assert view["status"] == "succeeded", view["error"]

    steps = ["root", *branches, "join"]
    # A step's span ends just after it records its outcome, so the last one may land after the run has ended.
    wait_for(
        lambda: {s["attributes"].get("orchestrator.step") for s in _spans(span_file)} >= set(steps),
        timeout=20,
        what="every step's span",
    )
    spans = _spans(span_file)
    attempt = {s["attributes"]["orchestrator.step"]: s for s in spans if s["kind"] == "CONSUMER"}
    root_span_id = f"{tracing.run_root(run_id).span_id:016x}"

    assert {s["trace_id"] for s in spans} == {run_id}, "one trace, whose id is the run's"
    assert len([s for s in spans if s["kind"] == "CONSUMER"]) == len(steps), "one span per attempt"
    # The worker that ends the run records its root; the traced producer its submission, under that root.
    run = wait_for(
        lambda: next((s for s in _spans(span_file) if s["name"] == f"run traced_{unique}"), None), what="the root"
    )
    (submit,) = (s for s in spans if s["name"] == f"submit traced_{unique}")
    assert (run["span_id"], run["parent_span_id"]) == (root_span_id, None)
    assert run["pid"] in {s["pid"] for s in attempt.values()}
    assert (submit["parent_span_id"], submit["pid"]) == (root_span_id, os.getpid())
    assert attempt["root"]["parent_span_id"] == submit["span_id"]
    for name in branches:
        assert attempt[name]["parent_span_id"] == attempt["root"]["span_id"], f"{name} hangs under what released it"
        assert attempt[name]["pid"] == view["steps"][name]["output"]["pid"]
    assert attempt["join"]["parent_span_id"] in {attempt[name]["span_id"] for name in branches}
    assert len({s["pid"] for s in attempt.values()}) >= 2, "two worker processes wrote into the one trace"
    assert os.getpid() not in {s["pid"] for s in attempt.values()}

    for name in ("root", "join"):
        attributes, output = attempt[name]["attributes"], view["steps"][name]["output"]
        assert attributes["orchestrator.run_id"] == run_id
        assert (attributes["orchestrator.step"], attributes["orchestrator.attempt"]) == (name, 1)
        assert attributes["orchestrator.outcome"] == "succeeded"
        assert attributes["gen_ai.system"] == "anthropic"
        assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == DEFAULT_MODEL
        assert attributes["gen_ai.usage.input_tokens"] == output["usage"]["input_tokens"] > 0
        assert attributes["gen_ai.usage.output_tokens"] == output["usage"]["output_tokens"] > 0
        assert attributes["orchestrator.cost_usd"] == pytest.approx(output["cost_usd"])
        assert attributes["orchestrator.cost_usd"] > 0
        (chat,) = (s for s in spans if s["kind"] == "CLIENT" and s["parent_span_id"] == attempt[name]["span_id"])
        assert chat["name"] == f"chat {DEFAULT_MODEL}"


# --- an untraced producer, workers exporting OTLP/HTTP to a collector ------------------------------------------------


class _Collector(ThreadingHTTPServer):
    """An OTLP/HTTP receiver on loopback: decodes each ``/v1/traces`` export request and keeps its spans."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ExportHandler)
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.spans)


class _ExportHandler(BaseHTTPRequestHandler):
    server: _Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        spans = [
            {
                "trace_id": span.trace_id.hex(),
                "span_id": span.span_id.hex(),
                "parent_span_id": span.parent_span_id.hex() or None,
                "name": span.name,
                "start_ns": span.start_time_unix_nano,
                "end_ns": span.end_time_unix_nano,
            }
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]
        with self.server.lock:
            self.server.spans.extend(spans)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads what was received, not an access log."""


@pytest.fixture
def collector() -> Iterator[_Collector]:
    server = _Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def untraced_producer() -> Iterator[None]:
    """This process (the client) does not trace."""
    trace_provider.configure()
    try:
        yield
    finally:
        trace_provider.reset()


def test_with_an_untraced_producer_every_exported_span_has_its_parent_and_the_root_spans_the_run(
    client: Client, redis_url: str, collector: _Collector, untraced_producer: None, unique: str
) -> None:
    queue = f"otlp_{unique}"
    env = {
        "REDIS_URL": redis_url,
        **WORKER_ENV,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    log_dir = ARTIFACTS / "worker-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    name = f"otlp_{unique}"
    spec = workflow(
        name,
        llm("first", queue=queue),
        py("left", "tests.sleep", "first", seconds=0.3, queue=queue),
        py("right", "tests.sleep", "first", seconds=0.3, queue=queue),
        llm("last", "left", "right", queue=queue),
    )
    with LocalWorkers(client.app, count=2, concurrency=1, queues=(queue,), env=env, log_dir=log_dir):
        run_id = client.submit(spec)
        view = client.wait(run_id, timeout=60)
        assert view["status"] == "succeeded", view["error"]

        def complete() -> list[dict[str, Any]]:
            spans = collector.received()
            names = {s["name"] for s in spans}
            wanted = {f"run {name}", *(f"{name}.{step}" for step in ("first", "left", "right", "last"))}
            return spans if wanted <= names else []

        spans = wait_for(complete, timeout=30, what="the run's spans at the collector")

    ids = {s["span_id"] for s in spans}
    orphans = [s for s in spans if s["parent_span_id"] is not None and s["parent_span_id"] not in ids]
    assert not orphans, f"spans whose parent never reached the collector: {orphans}"
    assert {s["trace_id"] for s in spans} == {run_id}
    (root,) = (s for s in spans if s["parent_span_id"] is None)
    assert (root["name"], root["span_id"]) == (f"run {name}", f"{tracing.run_root(run_id).span_id:016x}")
    assert root["start_ns"] / 1e9 == pytest.approx(ts(str(view["created_at"])), abs=1e-3)
    assert root["end_ns"] / 1e9 == pytest.approx(ts(str(view["finished_at"])), abs=1e-3)
    steps = [s for s in spans if s is not root]
    assert root["start_ns"] <= min(s["start_ns"] for s in steps)
    assert root["end_ns"] >= max(s["start_ns"] for s in steps)


# --- what tracing must not do to a command ---------------------------------------------------------------------------


def _cli(*args: str, redis_url: str, **tracing_env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``orchestrator ARGS`` with only the given tracing variables; returns the process and its wall time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ORCH_TRACE"))}
    env.update(REDIS_URL=redis_url, PYTHONPATH=str(REPO), **tracing_env)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc, time.monotonic() - started


@pytest.fixture
def tiny_file(tmp_path: Path, unique: str) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(f"name: tiny_{unique}\nsteps:\n  - {{name: only, uses: noop}}\n", encoding="utf-8")
    return str(path)


def test_submit_json_stays_json_with_the_console_exporter_and_the_spans_go_to_stderr(
    redis_url: str, tiny_file: str, unique: str
) -> None:
    proc, _ = _cli("submit", tiny_file, "--json", redis_url=redis_url, OTEL_TRACES_EXPORTER="console")

    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    span = json.loads(proc.stderr)
    assert span["name"] == f"submit tiny_{unique}"
    assert span["context"]["trace_id"] == f"0x{run_id}"


def test_an_unreachable_collector_adds_at_most_a_bounded_flush_and_one_line_to_a_command(
    redis_url: str, tiny_file: str
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    plain, traced = [], []
    for _ in range(2):  # interleaved, the fastest of each: a busy machine slows both alike
        proc, elapsed = _cli("submit", tiny_file, "--json", redis_url=redis_url)
        assert proc.returncode == 0, proc.stderr
        plain.append(elapsed)
        proc, elapsed = _cli("submit", tiny_file, "--json", redis_url=redis_url, OTEL_EXPORTER_OTLP_ENDPOINT=closed)
        assert proc.returncode == 0, proc.stderr
        traced.append(elapsed)
        json.loads(proc.stdout)
        assert len(proc.stderr.splitlines()) <= 1, proc.stderr
        assert "Traceback" not in proc.stderr

    extra = min(traced) - min(plain)
    assert extra < 2.0, f"an unreachable collector added {extra:.1f}s to a {min(plain):.1f}s command"
