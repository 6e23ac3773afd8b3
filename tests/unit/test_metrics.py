"""Step and LLM metrics: what each recording counts, the cluster gauges, and the sum over pool processes."""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import fakeredis
import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import telemetry
from orchestrator.infra.settings import Settings
from orchestrator.state import keys
from orchestrator.telemetry import AttemptInfo, AttemptScope, LLMCallRecord, metrics
from orchestrator.telemetry.cluster import ClusterCollector
from orchestrator.telemetry.exposition import serving
from workers.metrics import MULTIPROC_DIR_ENV, WorkerMetricsEndpoint

RUN_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def in_process_metrics(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fresh in-process families per test; multiprocess mode (env and value store) undone afterwards."""
    saved_env = os.environ.get(MULTIPROC_DIR_ENV)
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    os.environ.pop(MULTIPROC_DIR_ENV, None)
    metrics.reset()
    yield
    if saved_env is None:
        os.environ.pop(MULTIPROC_DIR_ENV, None)
    else:
        os.environ[MULTIPROC_DIR_ENV] = saved_env
    metrics.reset()


def value(name: str, **labels: str) -> float | None:
    return metrics.registry().get_sample_value(name, labels)


def attempt(**changes: Any) -> AttemptInfo:
    info = AttemptInfo(RUN_ID, "digest", "summarise", "llm", 1, "task-1", "llm", queued_at=100.0, started_at=103.5)
    return replace(info, **changes)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def closed_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


# -- steps ---------------------------------------------------------------------------------------------------------


def test_an_attempt_counts_its_outcome_and_error_type_by_workflow_and_step() -> None:
    metrics.record_attempt(AttemptScope(attempt(), outcome="retry", error_kind="rate_limit"))
    metrics.record_attempt(AttemptScope(attempt(attempt=2), outcome="succeeded"))
    metrics.record_attempt(AttemptScope(attempt(attempt=3), outcome="succeeded"))

    common = {"workflow": "digest", "step": "summarise", "kind": "llm"}
    assert value("orchestrator_step_attempts_total", **common, outcome="retry", error_type="rate_limit") == 1
    assert value("orchestrator_step_attempts_total", **common, outcome="succeeded", error_type="") == 2


def test_an_attempt_observes_its_duration_from_entering_the_scope() -> None:
    scope = AttemptScope(attempt(), outcome="succeeded", entered_monotonic=time.monotonic() - 2.0)

    metrics.record_attempt(scope)

    labels = {"workflow": "digest", "step": "summarise", "kind": "llm", "outcome": "succeeded"}
    assert value("orchestrator_step_duration_seconds_count", **labels) == 1
    assert value("orchestrator_step_duration_seconds_bucket", **labels, le="1.0") == 0
    assert value("orchestrator_step_duration_seconds_bucket", **labels, le="2.5") == 1
    assert 2.0 <= (value("orchestrator_step_duration_seconds_sum", **labels) or 0) < 2.5


def test_the_queue_wait_runs_from_queued_to_started_on_the_redis_clock() -> None:
    metrics.record_attempt(AttemptScope(attempt(queued_at=100.0, started_at=103.5), outcome="succeeded"))
    metrics.record_attempt(AttemptScope(attempt(step="unqueued", queued_at=None), outcome="succeeded"))

    labels = {"workflow": "digest", "step": "summarise", "queue": "llm"}
    assert value("orchestrator_step_queue_wait_seconds_sum", **labels) == 3.5
    assert value("orchestrator_step_queue_wait_seconds_bucket", **labels, le="2.5") == 0
    assert value("orchestrator_step_queue_wait_seconds_bucket", **labels, le="5.0") == 1
    assert value("orchestrator_step_queue_wait_seconds_count", workflow="digest", step="unqueued", queue="llm") is None


def test_the_step_attempt_scope_records_its_outcome_and_unknown_when_an_exception_escapes() -> None:
    with telemetry.step_attempt(attempt()) as scope:
        scope.finish("failed", "exception")
    with pytest.raises(RuntimeError), telemetry.step_attempt(attempt(attempt=2)):
        raise RuntimeError("a bug")

    common = {"workflow": "digest", "step": "summarise", "kind": "llm"}
    assert value("orchestrator_step_attempts_total", **common, outcome="failed", error_type="exception") == 1
    assert value("orchestrator_step_attempts_total", **common, outcome="unknown", error_type="") == 1


# -- LLM calls -----------------------------------------------------------------------------------------------------


def test_an_llm_call_counts_tokens_cost_and_duration_by_model_and_workflow() -> None:
    telemetry.llm_call(LLMCallRecord("digest", "claude-haiku-4-5", 1200, 300, 0.0027, duration_s=1.5))
    telemetry.llm_call(LLMCallRecord("digest", "claude-haiku-4-5", 800, 100, 0.0013, duration_s=0.5))

    labels = {"workflow": "digest", "model": "claude-haiku-4-5"}
    assert value("orchestrator_llm_tokens_total", **labels, token_type="input") == 2000
    assert value("orchestrator_llm_tokens_total", **labels, token_type="output") == 400
    assert value("orchestrator_llm_cost_usd_total", **labels) == pytest.approx(0.004)
    assert value("orchestrator_llm_calls_total", **labels, outcome="ok", error_type="") == 2
    assert value("orchestrator_llm_call_duration_seconds_sum", **labels) == 2.0


def test_a_cached_reply_counts_as_a_cache_hit_and_bills_nothing() -> None:
    telemetry.llm_call(LLMCallRecord("digest", "claude-haiku-4-5", 1200, 300, 0.0, cached=True))

    labels = {"workflow": "digest", "model": "claude-haiku-4-5"}
    assert value("orchestrator_llm_reply_cache_hits_total", **labels) == 1
    assert value("orchestrator_llm_tokens_total", **labels, token_type="input") is None
    assert value("orchestrator_llm_calls_total", **labels, outcome="ok", error_type="") is None


def test_a_failed_call_counts_its_error_type_and_an_unpriced_model_adds_no_cost() -> None:
    telemetry.llm_call(LLMCallRecord("digest", "claude-haiku-4-5", duration_s=0.2, error_kind="overloaded"))
    telemetry.llm_call(LLMCallRecord("digest", "house-model", 50, 10, None, duration_s=0.1))

    haiku = {"workflow": "digest", "model": "claude-haiku-4-5"}
    assert value("orchestrator_llm_calls_total", **haiku, outcome="error", error_type="overloaded") == 1
    assert value("orchestrator_llm_tokens_total", **haiku, token_type="input") is None
    assert value("orchestrator_llm_tokens_total", workflow="digest", model="house-model", token_type="input") == 50
    assert value("orchestrator_llm_cost_usd_total", workflow="digest", model="house-model") is None


def test_deferrals_are_counted_by_model_and_reason() -> None:
    telemetry.step_deferred("digest", "claude-haiku-4-5", "rate_limit")
    telemetry.step_deferred("digest", "claude-haiku-4-5", "rate_limit")
    telemetry.step_deferred("digest", "claude-haiku-4-5", "cooldown")

    labels = {"workflow": "digest", "model": "claude-haiku-4-5"}
    assert value("orchestrator_step_deferrals_total", **labels, reason="rate_limit") == 2
    assert value("orchestrator_step_deferrals_total", **labels, reason="cooldown") == 1


def test_a_familys_child_is_built_once_per_label_values_and_counts_what_every_use_adds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    family = metrics._metrics().llm_tokens
    built: list[tuple[str, ...]] = []
    labels = family.labels
    monkeypatch.setattr(family, "labels", lambda *values: built.append(values) or labels(*values))

    for _ in range(3):
        telemetry.llm_call(LLMCallRecord("digest", "claude-haiku-4-5", 10, 5, 0.01))
    telemetry.llm_call(LLMCallRecord("digest", "claude-sonnet-4-5", 7, 0, 0.01))

    assert built == [
        ("digest", "claude-haiku-4-5", "input"),
        ("digest", "claude-haiku-4-5", "output"),
        ("digest", "claude-sonnet-4-5", "input"),
    ]
    tokens = {"workflow": "digest", "model": "claude-haiku-4-5"}
    assert value("orchestrator_llm_tokens_total", **tokens, token_type="input") == 30
    assert value("orchestrator_llm_tokens_total", **tokens, token_type="output") == 15
    assert value("orchestrator_llm_tokens_total", workflow="digest", model="claude-sonnet-4-5", token_type="input") == 7


def test_no_label_carries_a_run_id_and_label_values_are_capped() -> None:
    metrics.record_attempt(AttemptScope(attempt(workflow="w" * 500), outcome="failed", error_kind="exception"))
    telemetry.llm_call(LLMCallRecord("digest", "claude-haiku-4-5", 10, 5, 0.01))

    samples = [s for family in metrics.registry().collect() for s in family.samples]
    assert samples
    assert not [s for s in samples if RUN_ID in s.labels.values()]
    assert max(len(v) for s in samples for v in s.labels.values()) == 100


# -- cluster gauges ------------------------------------------------------------------------------------------------


def cluster_values(collector: ClusterCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in collector.collect() for s in f.samples}


def test_queue_depth_counts_each_queue_with_its_priority_lists() -> None:
    broker = fakeredis.FakeRedis()
    broker.rpush("llm", "m1", "m2", "m3")
    broker.rpush("llm\x06\x166", "m4")
    broker.rpush("cpu", "m5")
    broker.rpush("unrelated", "m6")

    found = cluster_values(ClusterCollector(fakeredis.FakeRedis(), broker, ("llm", "cpu")))

    assert found[("orchestrator_queue_depth", (("queue", "llm"),))] == 4
    assert found[("orchestrator_queue_depth", (("queue", "cpu"),))] == 1
    assert found[("orchestrator_cluster_scrape_ok", ())] == 1


def test_runs_in_flight_are_counted_among_the_newest_runs_only() -> None:
    store = fakeredis.FakeRedis()
    statuses = ["running", "waiting", "running", "succeeded", "pending"]  # oldest last
    for age, status in enumerate(statuses):
        store.zadd(keys.RUNS_INDEX, {f"run{age}": 1000 - age})
        store.hset(keys.run_key(f"run{age}"), "status", status)
    store.zadd(keys.RUNS_INDEX, {"expired": 999.5})  # in the index, hash gone

    found = cluster_values(ClusterCollector(store, None, ("llm", "cpu"), run_scan=5))

    assert found[("orchestrator_runs_in_flight", (("status", "running"),))] == 2
    assert found[("orchestrator_runs_in_flight", (("status", "waiting"),))] == 1
    assert found[("orchestrator_runs_in_flight", (("status", "pending"),))] == 0, "the oldest run is beyond the scan"
    assert not [key for key in found if key[0] == "orchestrator_queue_depth"], "no broker, no queue depth"


def test_a_broker_that_is_not_redis_has_no_queue_depth() -> None:
    settings = replace(Settings(), redis_url=closed_redis_url(), broker_url="amqp://guest:guest@rabbit:5672//")

    assert ClusterCollector.from_settings(settings).broker is None


def test_redis_not_answering_makes_the_scrape_say_so_instead_of_failing(caplog: pytest.LogCaptureFixture) -> None:
    collector = ClusterCollector.from_settings(replace(Settings(), redis_url=closed_redis_url()))

    with caplog.at_level(logging.WARNING):
        found = cluster_values(collector)

    assert found == {("orchestrator_cluster_scrape_ok", ()): 0}
    assert "could not read queue depth" in caplog.text


# -- the worker endpoint -------------------------------------------------------------------------------------------


def _pool_process(index: int) -> None:
    for n in range(3):
        metrics.record_attempt(AttemptScope(attempt(attempt=n + 1, task_id=f"t{index}{n}"), outcome="succeeded"))
    telemetry.llm_call(LLMCallRecord("digest", "claude-haiku-4-5", 100, 10, 0.5))


def _close_inherited_socket(endpoint: WorkerMetricsEndpoint, fd: int, result: Any) -> None:
    endpoint.after_fork()
    try:
        os.fstat(fd)
    except OSError:
        result.put("closed")
    else:
        result.put("open")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def in_fresh_process(scenario: Callable[[], Any]) -> Any:
    """Run ``scenario`` in a fresh interpreter and return what it returns.

    The scenarios fork, which is only safe from a process with no other threads: a thread holding a lock at the fork
    (pytest-xdist's execnet threads, a sink or keeper thread an earlier test started) leaves the child waiting on it
    for ever. A spawned process runs the scenario on its only thread.
    """
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    process = spawn.Process(target=_report, args=(scenario, results))
    process.start()
    try:
        outcome, value = results.get(timeout=120)
    finally:
        process.join(timeout=30)
    if outcome == "raised":
        raise AssertionError(f"the scenario raised in its own process: {value}")
    return value


def _report(scenario: Callable[[], Any], results: Any) -> None:
    try:
        results.put(("returned", scenario()))
    except Exception as exc:  # reported to the test, which fails with it
        results.put(("raised", repr(exc)))


def _endpoint_adds_up_pool_processes() -> tuple[int, int | None, list[int | None], Samples, bool]:
    port = free_port()
    settings = replace(Settings(), metrics_port=port, metrics_addr="127.0.0.1", redis_url=closed_redis_url())
    endpoint = WorkerMetricsEndpoint(settings)
    fork = multiprocessing.get_context("fork")

    endpoint.prepare()
    directory = os.environ[MULTIPROC_DIR_ENV]
    children = [fork.Process(target=_pool_process, args=(i,)) for i in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    endpoint.start()
    try:
        found = scrape(port)
        served_on = endpoint.port
    finally:
        endpoint.stop()
    return port, served_on, [child.exitcode for child in children], found, os.path.exists(directory)


def test_the_worker_endpoint_adds_up_the_metrics_of_every_pool_process() -> None:
    port, served_on, exitcodes, found, directory_left = in_fresh_process(_endpoint_adds_up_pool_processes)

    assert served_on == port
    assert exitcodes == [0, 0]
    labels = (("error_type", ""), ("kind", "llm"), ("outcome", "succeeded"), ("step", "summarise"))
    assert found[("orchestrator_step_attempts_total", (*labels, ("workflow", "digest")))] == 6
    llm = (("model", "claude-haiku-4-5"), ("workflow", "digest"))
    assert found[("orchestrator_llm_tokens_total", (llm[0], ("token_type", "input"), llm[1]))] == 200
    assert found[("orchestrator_llm_cost_usd_total", llm)] == 1.0
    assert not [name for name, _ in found if name.startswith("orchestrator_cluster")], "the API exports those"
    assert not directory_left, "the private directory goes with the worker"


def test_a_worker_asked_to_exports_the_cluster_gauges_too() -> None:
    settings = replace(Settings(), metrics_port=free_port(), redis_url=closed_redis_url())
    with_cluster = WorkerMetricsEndpoint(replace(settings, metrics_cluster=True))
    plain = WorkerMetricsEndpoint(settings)
    try:
        with_cluster.prepare()
        assert with_cluster.registry().get_sample_value("orchestrator_cluster_scrape_ok") == 0, "no Redis here"
        assert plain.registry().get_sample_value("orchestrator_cluster_scrape_ok") is None
    finally:
        with_cluster.stop()


def _forked_child_closes_the_socket() -> tuple[str, int]:
    port = free_port()
    endpoint = WorkerMetricsEndpoint(
        replace(Settings(), metrics_port=port, metrics_addr="127.0.0.1", redis_url=closed_redis_url())
    )
    fork = multiprocessing.get_context("fork")
    endpoint.prepare()
    endpoint.start()
    try:
        assert endpoint._server is not None
        result = fork.Queue()
        child = fork.Process(target=_close_inherited_socket, args=(endpoint, endpoint._server.socket.fileno(), result))
        child.start()
        child.join(timeout=60)
        return result.get(timeout=10), httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code
    finally:
        endpoint.stop()


def test_a_pool_process_forked_after_the_endpoint_started_closes_its_copy_of_the_socket() -> None:
    in_child, parent_status = in_fresh_process(_forked_child_closes_the_socket)

    assert in_child == "closed"
    assert parent_status == 200, "the parent still serves"


def test_a_taken_port_leaves_the_worker_running_without_metrics(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint = WorkerMetricsEndpoint(replace(Settings(), metrics_port=port, metrics_addr="127.0.0.1"))
        endpoint.prepare()
        with caplog.at_level(logging.ERROR):
            endpoint.start()
        endpoint.stop()

    assert endpoint.port is None
    assert f"cannot serve on 127.0.0.1:{port}" in caplog.text


def test_without_a_port_the_worker_stays_out_of_multiprocess_mode() -> None:
    endpoint = WorkerMetricsEndpoint(Settings())

    endpoint.prepare()
    endpoint.start()

    assert MULTIPROC_DIR_ENV not in os.environ
    assert endpoint.port is None


def test_a_counter_or_histogram_series_new_since_the_last_scrape_reads_zero_once_and_gauges_are_left_alone() -> None:
    source = CollectorRegistry()
    failures = Counter("failures", "Failures.", ["step"], registry=source)
    latency = Histogram("latency_seconds", "Latency.", ["step"], buckets=(1.0,), registry=source)
    depth = Gauge("depth", "Depth.", ["queue"], registry=source)
    served = serving(source)

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = generate_latest(served).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    failures.labels("old").inc(3)
    assert scrape()[("failures_total", (("step", "old"),))] == 3, "the first scrape shows values as they are"

    failures.labels("old").inc()
    failures.labels("new").inc()
    latency.labels("new").observe(0.5)
    depth.labels("cpu").set(7)
    second = scrape()
    assert second[("failures_total", (("step", "old"),))] == 4
    assert second[("failures_total", (("step", "new"),))] == 0
    assert second[("latency_seconds_count", (("step", "new"),))] == 0
    assert second[("latency_seconds_bucket", (("le", "1.0"), ("step", "new")))] == 0
    assert second[("depth", (("queue", "cpu"),))] == 7

    third = scrape()
    assert third[("failures_total", (("step", "new"),))] == 1
    assert third[("latency_seconds_count", (("step", "new"),))] == 1
    assert third[("latency_seconds_sum", (("step", "new"),))] == 0.5
