"""The Grafana dashboard asks only for metrics, and labels, that the code defines: it cannot drift silently."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from prometheus_client.metrics_core import Metric

from orchestrator.api.metrics import ApiMetrics
from orchestrator.telemetry import AttemptInfo, AttemptScope, LLMCallRecord, metrics
from orchestrator.telemetry.cluster import ClusterCollector

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "orchestrator-dashboard.json"

# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}

METRIC = re.compile(r"\b(orchestrator_[a-z0-9_]+)")
SELECTOR = re.compile(r"\b(orchestrator_[a-z0-9_]+)\{([^}]*)\}")
SELECTOR_LABEL = re.compile(r"([a-z_][a-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", []):
        yield panel
        yield from panels(panel)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def expressions() -> list[tuple[str, str]]:
    found = [(p["title"], t["expr"]) for p in panels(dashboard()) for t in p.get("targets", [])]
    found += [(v["name"], v["query"]["query"]) for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    return found


@pytest.fixture(scope="module")
def series() -> dict[str, set[str]]:
    """Every sample name the code exports, with its labels, from one observation through each recording path."""
    found: dict[str, set[str]] = {}
    for family in _exercised():
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def _exercised() -> list[Metric]:
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
        return _record_one_of_each()


def _record_one_of_each() -> list[Metric]:
    metrics.reset()
    info = AttemptInfo("r" * 32, "wf", "step", "llm", 1, "task", "llm", queued_at=1.0, started_at=2.0)
    metrics.record_attempt(AttemptScope(info, outcome="retry", error_kind="rate_limit"))
    metrics.record_llm_call(LLMCallRecord("wf", "model", 10, 5, 0.01, duration_s=0.5))
    metrics.record_llm_call(LLMCallRecord("wf", "model", 10, 5, 0.0, cached=True))
    metrics.record_deferral("wf", "model", "cooldown")
    api = ApiMetrics()
    api.requests.labels("GET", "/runs/{run_id}", "200").inc()
    store = fakeredis.FakeRedis()
    cluster = ClusterCollector(store, store, ("llm", "cpu"))
    families = [*metrics.registry().collect(), *cluster.collect(), *api.registry.collect()]
    metrics.reset()
    return families


def test_every_panel_has_a_query() -> None:
    graphs = [p for p in panels(dashboard()) if p["type"] != "row"]

    assert graphs
    for panel in graphs:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        assert all(t.get("expr", "").strip() for t in panel["targets"]), panel["title"]


@pytest.mark.parametrize(("where", "expr"), expressions(), ids=[w for w, _ in expressions()])
def test_every_query_names_only_metrics_and_labels_the_code_defines(
    where: str, expr: str, series: dict[str, set[str]]
) -> None:
    names = set(METRIC.findall(expr))
    assert names, f"{where}: no orchestrator metric in {expr!r}"
    unknown = names - set(series)
    assert not unknown, f"{where}: {sorted(unknown)} not defined by the code"
    allowed = set().union(*(series[n] for n in names)) | TARGET_LABELS
    used = {label for _, body in SELECTOR.findall(expr) for label in SELECTOR_LABEL.findall(body)}
    used |= {label.strip() for group in GROUPING.findall(expr) for label in group.split(",") if label.strip()}
    assert used <= allowed, f"{where}: labels {sorted(used - allowed)} are not on {sorted(names)}"


def test_quantile_panels_read_histogram_buckets_by_le() -> None:
    for where, expr in expressions():
        if "histogram_quantile" in expr:
            assert "_bucket" in expr, where
            assert re.search(r"by \((?:[^)]*\b)?le\b", expr), f"{where}: quantiles need the le label"


def test_the_dashboard_covers_steps_queues_runs_and_llm_spend() -> None:
    used = {name for _, expr in expressions() for name in METRIC.findall(expr)}

    assert {
        "orchestrator_step_attempts_total",
        "orchestrator_step_duration_seconds_bucket",
        "orchestrator_step_queue_wait_seconds_bucket",
        "orchestrator_step_deferrals_total",
        "orchestrator_queue_depth",
        "orchestrator_runs_in_flight",
        "orchestrator_llm_tokens_total",
        "orchestrator_llm_cost_usd_total",
        "orchestrator_llm_reply_cache_hits_total",
    } <= used
