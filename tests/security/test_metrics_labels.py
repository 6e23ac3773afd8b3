"""Workflow, step and model names come from submitted definitions, so the metrics they label are bounded: each process
reports at most ``ORCH_METRICS_MAX_SERIES`` pairs by name and the rest under ``workflow="_other"``. The API's request
counter takes no label from what a client may invent either."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import values
from starlette.applications import Starlette
from starlette.testclient import TestClient

from orchestrator.api.metrics import ApiMetrics, RequestMetricsMiddleware
from orchestrator.infra.settings import Settings
from orchestrator.telemetry import AttemptInfo, AttemptScope, LLMCallRecord, metrics
from workers.metrics import MULTIPROC_DIR_ENV, WorkerMetricsEndpoint

pytestmark = pytest.mark.timeout(60)

OTHER = {"workflow": "_other", "step": "_other"}


@pytest.fixture(autouse=True)
def in_process_metrics(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fresh in-process families per test, with the default budget restored afterwards."""
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.delenv(MULTIPROC_DIR_ENV, raising=False)
    metrics.reset()
    yield
    metrics.configure(max_series=Settings().metrics_max_series)


def attempts(workflow: str, step: str = "draft") -> float | None:
    labels = {"workflow": workflow, "step": step, "kind": "python", "outcome": "succeeded", "error_type": ""}
    return metrics.registry().get_sample_value("orchestrator_step_attempts_total", labels)


def record(workflow: str, step: str = "draft", **changes: Any) -> None:
    info = AttemptInfo("0" * 32, workflow, step, "python", 1, "task-1", "cpu", queued_at=1.0, started_at=2.0)
    metrics.record_attempt(AttemptScope(replace(info, **changes), outcome="succeeded"))


def series(name: str) -> set[tuple[str, str]]:
    return {
        (s.labels["workflow"], s.labels.get("step", s.labels.get("model", "")))
        for family in metrics.registry().collect()
        for s in family.samples
        if s.name == name
    }


def test_the_workflow_past_the_default_budget_is_reported_under_the_overflow_label() -> None:
    limit = Settings().metrics_max_series
    for index in range(limit + 1):
        record(f"wf{index}")

    assert limit == 2000
    assert attempts(f"wf{limit - 1}") == 1
    assert attempts(f"wf{limit}") is None
    assert attempts(**OTHER) == 1
    assert len(series("orchestrator_step_attempts_total")) == limit + 1


def test_pairs_past_a_configured_budget_share_one_overflow_series_and_admitted_ones_keep_their_names() -> None:
    metrics.configure(max_series=3)

    for workflow, step in [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y"), ("c", "x"), ("a", "x"), ("c", "z")]:
        record(workflow, step)

    assert (attempts("a", "x"), attempts("a", "y"), attempts("b", "x")) == (2, 1, 1)
    assert attempts("b", "y") is None
    assert attempts(**OTHER) == 3
    assert series("orchestrator_step_attempts_total") == {("a", "x"), ("a", "y"), ("b", "x"), ("_other", "_other")}
    assert series("orchestrator_step_queue_wait_seconds_count") == series("orchestrator_step_attempts_total")


def test_llm_and_deferral_metrics_bound_their_workflow_and_model_pairs_too() -> None:
    metrics.configure(max_series=2)

    for model in ("m1", "m2", "m3", "m4"):
        metrics.record_llm_call(LLMCallRecord("wf", model, 10, 5, 0.01, duration_s=0.1))
        metrics.record_deferral("wf", model, "rate_limit")

    assert series("orchestrator_llm_tokens_total") == {("wf", "m1"), ("wf", "m2"), ("_other", "_other")}
    assert series("orchestrator_step_deferrals_total") == {("wf", "m1"), ("wf", "m2"), ("_other", "_other")}
    labels = {"workflow": "_other", "model": "_other", "token_type": "input"}
    assert metrics.registry().get_sample_value("orchestrator_llm_tokens_total", labels) == 20


def test_the_worker_applies_orch_metrics_max_series_even_without_an_endpoint() -> None:
    settings = Settings.from_env({"ORCH_METRICS_MAX_SERIES": "1"})

    WorkerMetricsEndpoint(settings).prepare()
    record("first")
    record("second")

    assert MULTIPROC_DIR_ENV not in os.environ
    assert (attempts("first"), attempts("second"), attempts(**OTHER)) == (1, None, 1)


@pytest.mark.parametrize("raw", ["0", "-5"])
def test_a_budget_below_one_is_refused_with_one_line_naming_the_setting(raw: str) -> None:
    with pytest.raises(ValueError, match=f"ORCH_METRICS_MAX_SERIES must be at least 1, not {raw}"):
        Settings.from_env({"ORCH_METRICS_MAX_SERIES": raw})


def test_the_api_counts_invented_methods_under_one_label() -> None:
    api = ApiMetrics()
    app = Starlette()
    app.add_middleware(RequestMetricsMiddleware, metrics=api)

    with TestClient(app) as http:
        for index in range(20):
            http.request(f"BREW{index}", "/anything")
        http.get("/anything")

    methods = {
        s.labels["method"]
        for family in api.registry.collect()
        for s in family.samples
        if s.name == "orchestrator_api_requests_total"
    }
    assert methods == {"OTHER", "GET"}
