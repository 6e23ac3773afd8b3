"""Prometheus metrics end to end: a real prefork worker's endpoint and the API's ``/metrics``, on real Redis.

The module runs its own worker on a Redis database of its own, so the counts it reads are its runs' alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import Client
from orchestrator.dev.local_workers import LocalWorkers
from tests.integration.helpers import llm, py, wait_for, workflow
from tests.integration.metrics_fixtures import free_port, metrics_client, metrics_env, one_worker, serve_api

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DATABASE = 11
SONNET = "claude-sonnet-4-5"
HAIKU = "claude-haiku-4-5"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


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
def api(client: Client) -> Iterator[str]:
    """The API, on this module's database."""
    with serve_api(client, "metrics-api") as port:
        yield f"http://127.0.0.1:{port}"


def scrape_worker(env: dict[str, str]) -> Samples:
    return parse(httpx.get(f"http://127.0.0.1:{env['ORCH_METRICS_PORT']}/metrics", timeout=10).text)


def same_prompt(name: str, *deps: str) -> dict[str, object]:
    return {"name": name, "uses": "llm", "depends_on": list(deps), "with": {"prompt": "One line on {{ inputs.topic }}"}}


def test_the_worker_endpoint_counts_steps_retries_deferrals_tokens_cost_and_cache_hits(
    client: Client, worker: LocalWorkers, env: dict[str, str], unique: str
) -> None:
    name = f"metrics_{unique}"
    # A 429 with retry-after 2 s cools Sonnet down cluster-wide; "blocked" asks during it and is deferred.
    limited = llm(
        "limited",
        errors=("rate_limit",),
        retry_after_s=2.0,
        retry={"max_attempts": 3, "backoff_s": 0.1, "backoff_max_s": 0.2},
    )
    blocked = llm("blocked", "later")
    for step in (limited, blocked):
        step["with"]["model"] = SONNET
    spec = workflow(
        name,
        same_prompt("draft"),
        same_prompt("again", "draft"),  # the same request again: the reply cache answers
        limited,
        py("later", "tests.sleep", seconds=0.5),
        blocked,
    )
    view = client.wait(client.submit(spec), timeout=60)
    assert view["status"] == "succeeded", view["error"]

    def attempts(step: str, outcome: str, error_type: str = "") -> float | None:
        kind = "python" if step == "later" else "llm"
        return get(
            found,
            "orchestrator_step_attempts_total",
            workflow=name,
            step=step,
            kind=kind,
            outcome=outcome,
            error_type=error_type,
        )

    found: Samples = {}

    def complete() -> bool:
        # An attempt's metrics are written as its scope closes, just after its outcome: poll until the last is in.
        nonlocal found
        found = scrape_worker(env)
        return all(attempts(s, "succeeded") == 1 for s in ("draft", "again", "limited", "later", "blocked"))

    wait_for(complete, timeout=20, what="every step's success in the worker's metrics")

    assert attempts("limited", "retry", "rate_limit") == 1
    assert (attempts("blocked", "deferred", "cooldown") or 0) >= 1
    assert (get(found, "orchestrator_step_deferrals_total", workflow=name, model=SONNET, reason="cooldown") or 0) >= 1

    sleep_labels = {"workflow": name, "step": "later", "kind": "python", "outcome": "succeeded"}
    assert get(found, "orchestrator_step_duration_seconds_count", **sleep_labels) == 1
    assert get(found, "orchestrator_step_duration_seconds_bucket", **sleep_labels, le="0.25") == 0, "it slept 0.5 s"
    assert get(found, "orchestrator_step_duration_seconds_bucket", **sleep_labels, le="1.0") == 1
    assert get(found, "orchestrator_step_queue_wait_seconds_count", workflow=name, step="later", queue="cpu") == 1
    assert get(found, "orchestrator_step_queue_wait_seconds_count", workflow=name, step="draft", queue="llm") == 1

    for model in (HAIKU, SONNET):
        for token_type in ("input", "output"):
            tokens = get(found, "orchestrator_llm_tokens_total", workflow=name, model=model, token_type=token_type)
            assert (tokens or 0) > 0, (model, token_type)
        assert (get(found, "orchestrator_llm_cost_usd_total", workflow=name, model=model) or 0) > 0, model
    assert get(found, "orchestrator_llm_reply_cache_hits_total", workflow=name, model=HAIKU) == 1
    assert get(found, "orchestrator_llm_calls_total", workflow=name, model=HAIKU, outcome="ok", error_type="") == 1
    assert (
        get(
            found, "orchestrator_llm_calls_total", workflow=name, model=SONNET, outcome="error", error_type="rate_limit"
        )
        == 1
    )

    cluster = {"orchestrator_queue_depth", "orchestrator_runs_in_flight", "orchestrator_cluster_scrape_ok"}
    assert not [n for n, _ in found if n in cluster], "the cluster gauges come from the API alone"
    assert not [labels for _, labels in found if any(v == view["run_id"] for _, v in labels)], "no run id label"


def test_queue_depth_and_runs_in_flight_come_from_the_api_alone_and_show_work_waiting_for_busy_workers(
    client: Client, worker: LocalWorkers, env: dict[str, str], api: str, unique: str
) -> None:
    # Two slots and a prefetch of one per slot: of four 2 s steps two run and two wait in the broker's cpu list.
    spec = workflow(f"backlog_{unique}", *(py(f"s{i}", "tests.sleep", seconds=2.0) for i in range(4)))
    run_id = client.submit(spec)

    def backlog(samples: Samples) -> bool:
        return (
            get(samples, "orchestrator_queue_depth", queue="cpu") == 2
            and get(samples, "orchestrator_queue_depth", queue="llm") == 0
            and get(samples, "orchestrator_runs_in_flight", status="running") == 1
            and get(samples, "orchestrator_cluster_scrape_ok") == 1
        )

    def scrape_api() -> Samples:
        return parse(httpx.get(f"{api}/metrics", timeout=10).text)

    wait_for(lambda: backlog(scrape_api()), timeout=20, what="the API to show two steps waiting and one run running")
    # Every worker reads the same Redis: were they all to export it, a sum over instances would count it twice.
    assert get(scrape_worker(env), "orchestrator_queue_depth", queue="cpu") is None
    assert client.wait(run_id, timeout=60)["status"] == "succeeded"
    drained = scrape_api()

    assert get(drained, "orchestrator_queue_depth", queue="cpu") == 0
    assert get(drained, "orchestrator_runs_in_flight", status="running") == 0


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_the_worker_removes_its_private_metrics_directory_when_it_stops(
    client: Client, env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    with LocalWorkers(
        client.app,
        count=1,
        concurrency=1,
        env={**env, "ORCH_METRICS_PORT": str(port), "TMPDIR": str(tmp_path)},
        queues=("unused",),
    ):
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/metrics"), timeout=20, what="the metrics endpoint")
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("orchestrator-metrics-")]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("orchestrator-metrics-")]
