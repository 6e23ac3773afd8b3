"""Every panel of the Grafana dashboard, asked of a real Prometheus scraping a real worker and the API.

A private ``prometheus`` (Debian's package; ``.ci/run`` installs it) scrapes both every second. One run of a
workflow nobody has run before fails one step for good, retries two, defers one, serves one reply from the cache
and pays for the rest; then each panel's query is evaluated as Grafana would, over a window holding the whole run,
and must show exactly what happened: the failure, the retries, the cost of a workflow's very first run. Without a
``prometheus`` binary the module skips, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator import Client
from orchestrator.dev.local_workers import LocalWorkers
from tests.conftest import ARTIFACTS, IN_CI
from tests.integration.helpers import llm, py, wait_for, workflow
from tests.integration.metrics_fixtures import free_port, metrics_client, metrics_env, one_worker, serve_api

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DATABASE = 14
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "orchestrator-dashboard.json"
SONNET = "claude-sonnet-4-5"
HAIKU = "claude-haiku-4-5"
Series = dict[tuple[str, ...], float]


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if found is None:
        reason = "no prometheus binary (apt-get install prometheus)"
        if IN_CI:
            pytest.fail(f"{reason}; CI=true: the dashboard test must run")
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def env(redis_url: str) -> dict[str, str]:
    return metrics_env(redis_url, DATABASE)


@pytest.fixture(scope="module")
def client(env: dict[str, str]) -> Client:
    return metrics_client(env)


@pytest.fixture(scope="module")
def worker(client: Client, env: dict[str, str]) -> Iterator[LocalWorkers]:
    with one_worker(client, env) as pool:
        yield pool


@pytest.fixture(scope="module")
def api_port(client: Client) -> Iterator[int]:
    """The API, where the cluster gauges come from."""
    with serve_api(client, "dashboard-api") as port:
        yield port


@pytest.fixture(scope="module")
def prometheus(
    env: dict[str, str], worker: LocalWorkers, api_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    """A private Prometheus scraping the worker and the API every second; ready once both are up."""
    binary = prometheus_binary()
    home = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "worker", "static_configs": [{"targets": [f"127.0.0.1:{env['ORCH_METRICS_PORT']}"]}]},
            {"job_name": "api", "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}]},
        ],
    }
    (home / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    argv = [
        binary,
        f"--config.file={home / 'prometheus.yml'}",
        f"--storage.tsdb.path={home / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    log_dir = ARTIFACTS / "worker-logs"
    with (log_dir / "prometheus.log").open("ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            def both_up() -> bool:
                assert process.poll() is None, "prometheus exited; see test-artifacts/worker-logs/prometheus.log"
                try:
                    return len(instant(http, "up == 1")) == 2
                except (httpx.TransportError, AssertionError, ValueError):  # ValueError: a 503 while it starts
                    return False

            wait_for(both_up, timeout=30, interval=0.2, what="Prometheus to scrape the worker and the API")
            yield http
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query(http: httpx.Client, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """An instant query; a query Prometheus cannot parse or run fails the test with its error."""
    params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
    reply = http.get("/api/v1/query", params=params).json()
    assert reply["status"] == "success", f"{expr}: {reply.get('errorType')}: {reply.get('error')}"
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def instant(http: httpx.Client, expr: str, at: float | None = None) -> Series:
    """The query's vector as {label values in name order: value}."""
    return {tuple(v for _, v in sorted(r["metric"].items())): float(r["value"][1]) for r in query(http, expr, at)}


def panel_queries() -> dict[str, list[str]]:
    def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for panel in node.get("panels", []):
            yield panel
            yield from walk(panel)

    loaded = json.loads(DASHBOARD.read_text())
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in walk(loaded) if p.get("targets")}


def as_grafana_would(expr: str, workflow_name: str, window_s: int) -> str:
    """The panel's query with the dashboard's variables filled in: one workflow, a window holding the whole run."""
    for variable, value in (
        ("$workflow", workflow_name),
        ("$__rate_interval", f"{window_s}s"),
        ("$__range", f"{window_s}s"),
    ):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a variable this test does not know: {expr}"
    return expr


def spec_of(name: str) -> dict[str, Any]:
    def haiku(step: str, *deps: str) -> dict[str, Any]:
        return {
            "name": step,
            "uses": "llm",
            "depends_on": list(deps),
            "with": {"prompt": "One line on {{ inputs.topic }}"},
        }

    quick = {"max_attempts": 3, "backoff_s": 0.1, "backoff_max_s": 0.2}
    # A 429 with retry-after 2 s cools Sonnet down cluster-wide; "blocked" asks during it and is deferred.
    limited = llm("limited", errors=("rate_limit",), retry_after_s=2.0, retry=quick)
    blocked = llm("blocked", "later")
    for step in (limited, blocked):
        step["with"]["model"] = SONNET
    return workflow(
        name,
        haiku("draft"),
        haiku("again", "draft"),  # the same request again: the reply cache answers
        llm("doomed", errors=("bad_request",)),  # fails for good
        llm("flaky", errors=("server_error",), retry=quick),  # retried once, then succeeds
        limited,
        py("later", "tests.sleep", seconds=0.5),
        blocked,
    )


@dataclass(frozen=True)
class Dashboard:
    """The panels of one workflow as Grafana shows them at ``at``, over a window of ``window`` seconds."""

    http: httpx.Client
    workflow: str
    window: int
    at: float
    queries: dict[str, list[str]]

    def panel(self, title: str, index: int = 0) -> Series:
        return instant(self.http, as_grafana_would(self.queries[title][index], self.workflow, self.window), self.at)

    def per_window(self, title: str, seconds: float = 1.0) -> Series:
        """A rate panel times the window: the events in it (exact, as each series starts at 0 inside the window)."""
        return {k: round(v * self.window / seconds, 6) for k, v in self.panel(title).items()}

    def total(self, expr: str) -> Series:
        """What the exporter's counters say at the end: each panel must add up to these over the window."""
        return instant(self.http, expr.replace("WORKFLOW", f'workflow="{self.workflow}"'), self.at)


def test_every_dashboard_panel_shows_exactly_what_one_run_of_a_new_workflow_did(
    prometheus: httpx.Client, client: Client, unique: str
) -> None:
    name = f"dash_{unique}"
    started = time.time()
    view = client.wait(client.submit(spec_of(name)), timeout=60)
    assert view["status"] == "failed"
    assert view["steps"]["doomed"]["status"] == "failed"

    def settled() -> bool:
        # Prometheus holds the worker's final counts (a new series shows 0 in its first scrape, its value next).
        outcomes = instant(prometheus, f'sum by (outcome) (orchestrator_step_attempts_total{{workflow="{name}"}})')
        return outcomes.get(("succeeded",)) == 6 and outcomes.get(("failed",)) == 1 and outcomes.get(("retry",)) == 2

    wait_for(settled, timeout=30, interval=0.2, what="Prometheus to scrape every attempt of the run")
    [at] = instant(prometheus, 'timestamp(up{job="worker"})').values()
    board = Dashboard(prometheus, name, math.ceil(at - started) + 15, at, panel_queries())

    # Every query of every panel parses and runs.
    for exprs in board.queries.values():
        for expr in exprs:
            query(prometheus, as_grafana_would(expr, name, board.window), at)
    step_panels_show_each_outcome_once(board)
    llm_panels_show_the_first_run_s_tokens_and_cost(board)
    cluster_panels_come_from_one_exporter(board)

    values = prometheus.get("/api/v1/label/workflow/values", params={"match[]": "orchestrator_step_attempts_total"})
    assert name in values.json()["data"], "the dashboard's workflow variable lists the new workflow"


def step_panels_show_each_outcome_once(board: Dashboard) -> None:
    attempts = board.total("sum by (outcome) (orchestrator_step_attempts_total{WORKFLOW})")
    assert board.per_window("Step attempts by outcome") == pytest.approx(attempts)
    assert attempts[("failed",)] == 1
    assert attempts[("deferred",)] >= 1
    # One failure for good shows as one failure: not 0 because its series is new.
    assert board.per_window("Step failures by error type") == {("bad_request", "doomed", board.workflow): 1}
    assert board.per_window("Retries by error type") == {
        ("rate_limit", "limited", board.workflow): 1,
        ("server_error", "flaky", board.workflow): 1,
    }
    deferrals = board.total("sum by (model, reason) (orchestrator_step_deferrals_total{WORKFLOW})")
    assert set(deferrals) == {(SONNET, "cooldown")}
    assert board.per_window("Deferrals by model and reason") == pytest.approx(deferrals)

    for title in ("Step duration p50 / p95 / p99", "Queue wait p50 / p95 / p99"):
        for index in range(3):
            [value] = board.panel(title, index).values()
            assert 0 <= value < 60, (title, index, value)
    by_step = board.panel("Step duration p95 by step")
    assert {k[0] for k in by_step} == {"draft", "again", "doomed", "flaky", "limited", "later", "blocked"}
    assert all(0 <= v < 60 for v in by_step.values())
    assert set(board.panel("Queue wait p95 by queue")) == {("cpu",), ("llm",)}


def llm_panels_show_the_first_run_s_tokens_and_cost(board: Dashboard) -> None:
    tokens = board.total("sum by (model, token_type) (orchestrator_llm_tokens_total{WORKFLOW})")
    assert set(tokens) == {(m, t) for m in (HAIKU, SONNET) for t in ("input", "output")}
    assert board.per_window("Tokens per second by model") == pytest.approx(tokens)

    cost = board.total("sum by (model) (orchestrator_llm_cost_usd_total{WORKFLOW})")
    assert set(cost) == {(HAIKU,), (SONNET,)}
    assert all(v > 0 for v in cost.values())
    # The very first run of a workflow: its whole cost, not $0.
    assert board.panel("Cost in the time range by model") == pytest.approx(cost)
    assert board.per_window("Cost by model (USD per hour)", 3600) == pytest.approx(cost)

    assert board.per_window("Reply cache hits by model") == {(HAIKU,): 1}
    assert board.per_window("LLM call errors by type") == {
        ("bad_request", HAIKU): 1,
        ("rate_limit", SONNET): 1,
        ("server_error", HAIKU): 1,
    }
    for index in range(3):
        [latency] = board.panel("LLM call latency p50 / p95 / p99", index).values()
        assert 0 <= latency < 60


def cluster_panels_come_from_one_exporter(board: Dashboard) -> None:
    assert board.panel("Queue depth") == {("cpu",): 0, ("llm",): 0}
    assert board.panel("Runs in flight by status") == {("pending",): 0, ("running",): 0, ("waiting",): 0}
    # The worker is scraped too, yet each gauge has one series: a sum over instances counts the cluster once.
    assert board.total("count by (queue) (orchestrator_queue_depth)") == {("cpu",): 1, ("llm",): 1}
    assert board.total("count by (status) (orchestrator_runs_in_flight)") == {
        ("pending",): 1,
        ("running",): 1,
        ("waiting",): 1,
    }
    requests = board.panel("API requests by route and status")
    assert requests.get(("/metrics", "200"), 0) > 0, requests


def test_the_dashboard_queries_all_parse_with_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("no promtool binary (apt-get install prometheus); CI=true: the dashboard test must run")
        pytest.skip("no promtool binary (apt-get install prometheus)")
    rules = [
        {"record": f"dashboard:panel_{i}", "expr": as_grafana_would(expr, "wf", 300)}
        for i, expr in enumerate(e for exprs in panel_queries().values() for e in exprs)
    ]
    assert len(rules) >= 20
    checked = subprocess.run(
        [promtool, "check", "rules", "/dev/stdin"],
        input=json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert re.search(rf"SUCCESS: {len(rules)} rules found", checked.stdout), checked.stdout
