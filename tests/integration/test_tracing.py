"""One run, one trace: spans written by two real worker processes join the run's trace under the right parents."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from orchestrator import Client
from orchestrator.definition.spec import DEFAULT_MODEL
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.telemetry import trace_provider, tracing
from tests.conftest import ARTIFACTS, WORKER_ENV
from tests.integration.helpers import llm, py, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BRANCHES = 4


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
    (run,) = (s for s in spans if s["name"] == f"run traced_{unique}")
    assert (run["span_id"], run["parent_span_id"], run["pid"]) == (root_span_id, None, os.getpid())
    assert attempt["root"]["parent_span_id"] == root_span_id
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
