"""Autoscaling in ``deploy/kubernetes/``: KEDA on the queues' Redis lists, or the HPA on ``orchestrator_queue_depth``.

The schemas (``test_kubernetes.py``) say each object is well formed; these say it measures the right thing: the lists
KEDA reads are exactly those kombu keeps for the queue the target consumes (the engine's own
:func:`~orchestrator.engine.priorities.redis_queue_lists`), summed rather than maxed, on the broker's Redis with the
pods' own secret; and the HPA asks for the gauge the API exports, for that queue. A real Redis then holds messages
published by the orchestrator's own Celery app in those lists, so the names are the ones a broker really uses.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
import redis

from orchestrator.celery_app import create_app
from orchestrator.engine.priorities import redis_queue_lists
from orchestrator.infra.settings import Settings
from orchestrator.telemetry.cluster import ClusterCollector
from tests.unit.k8s_manifests import (
    K8S_DIR,
    argv,
    documents,
    objects,
    option,
    resolved_env,
    secrets_example,
    workloads,
)

pytestmark = pytest.mark.timeout(60)

KEDA_DIR = K8S_DIR / "keda"
HPA_DIR = K8S_DIR / "hpa"
SCALED = ("worker-llm", "worker-cpu")


def _queue(deployment: str) -> str:
    queue = option(argv(workloads()[deployment]), "-Q", "--queues")
    assert queue
    assert "," not in queue, f"{deployment} consumes several queues: one backlog cannot size it"
    return queue


def _scaled_objects() -> dict[str, dict[str, Any]]:
    return objects("ScaledObject", KEDA_DIR)


def test_each_worker_deployment_has_one_scaled_object_and_one_hpa_and_nothing_else_is_scaled() -> None:
    keda = {so["spec"]["scaleTargetRef"]["name"]: so for so in _scaled_objects().values()}
    hpa = {h["spec"]["scaleTargetRef"]["name"]: h for h in objects("HorizontalPodAutoscaler", HPA_DIR).values()}
    assert sorted(keda) == sorted(hpa) == sorted(SCALED)
    for name in SCALED:
        assert workloads()[name]["kind"] == "Deployment"
        assert keda[name]["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert hpa[name]["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}


def test_keda_reads_every_priority_list_of_the_queue_its_target_consumes() -> None:
    for scaled in _scaled_objects().values():
        target = scaled["spec"]["scaleTargetRef"]["name"]
        triggers = scaled["spec"]["triggers"]
        assert {trigger["type"] for trigger in triggers} == {"redis"}
        lists = [trigger["metadata"]["listName"] for trigger in triggers]
        assert sorted(lists) == sorted(redis_queue_lists(_queue(target))), f"{target} watches other lists"


def test_the_formula_sums_every_trigger_once_and_sizes_pods_by_average_backlog() -> None:
    for name, scaled in _scaled_objects().items():
        modifiers = scaled["spec"]["advanced"]["scalingModifiers"]
        names = [trigger["name"] for trigger in scaled["spec"]["triggers"]]
        terms = [term.strip() for term in modifiers["formula"].split("+")]
        # Several triggers without a formula would give the HPA one metric each, and it takes the largest: the backlog
        # spread over four priority lists would read as its biggest list alone.
        assert sorted(terms) == sorted(names), f"{name}: the formula must add up every list, each once"
        assert all(re.fullmatch(r"[A-Za-z_]\w*", term) for term in terms)
        assert modifiers["metricType"] == "AverageValue"
        assert float(modifiers["activationTarget"]) == 0, "one waiting message must wake a deployment at zero"
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["metadata"]["listLength"] == modifiers["target"]


def test_keda_reaches_the_broker_redis_with_the_pods_secret() -> None:
    (auth,) = objects("TriggerAuthentication", KEDA_DIR).values()
    refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"address", "password"}
    secrets = secrets_example()
    for ref in refs.values():
        assert ref["name"] == "orchestrator-secrets"
        assert ref["key"] in secrets
    settings = Settings.from_env(resolved_env(workloads()["worker-llm"]))
    broker = urlsplit(settings.effective_broker_url)
    assert secrets[refs["address"]["key"]] == f"{broker.hostname}:{broker.port}"
    assert secrets[refs["password"]["key"]] == broker.password
    database = (broker.path or "/0").strip("/") or "0"
    for scaled in _scaled_objects().values():
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
            assert trigger["metadata"]["databaseIndex"] == database
            assert not {"address", "host", "password"} & trigger["metadata"].keys(), "secrets belong in the auth"


def test_scaling_down_waits_out_busy_pods_and_never_outruns_their_grace_period() -> None:
    for name, scaled in _scaled_objects().items():
        spec = scaled["spec"]
        assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        grace = workloads()[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        # The lists empty while every pod is still running the calls it took: a short window would cut them off.
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= grace
        assert spec["cooldownPeriod"] >= grace
        assert spec["pollingInterval"] <= 30
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0


def test_the_hpa_asks_for_the_gauge_the_api_exports_for_the_same_queue_with_kedas_numbers() -> None:
    collector = ClusterCollector(cast(redis.Redis, None), None, ["llm", "cpu"])
    gauges = {family.name for family in collector.describe()}
    for hpa in objects("HorizontalPodAutoscaler", HPA_DIR).values():
        target = hpa["spec"]["scaleTargetRef"]["name"]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "External"
        assert metric["external"]["metric"]["name"] in gauges
        assert metric["external"]["metric"]["selector"] == {"matchLabels": {"queue": _queue(target)}}
        keda = next(so for so in _scaled_objects().values() if so["spec"]["scaleTargetRef"]["name"] == target)
        assert metric["external"]["target"] == {
            "type": "AverageValue",
            "averageValue": keda["spec"]["advanced"]["scalingModifiers"]["target"],
        }
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
            keda["spec"]["minReplicaCount"],
            keda["spec"]["maxReplicaCount"],
        )
        assert hpa["spec"]["behavior"] == keda["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]


def test_the_adapter_rule_serves_that_gauge_taking_max_over_api_replicas() -> None:
    (values,) = documents(HPA_DIR / "prometheus-adapter-values.yaml")
    (rule,) = values["rules"]["external"]
    names = {h["spec"]["metrics"][0]["external"]["metric"]["name"] for h in objects("HorizontalPodAutoscaler").values()}
    (metric,) = names
    assert rule["seriesQuery"].startswith(f"{metric}{{")
    assert rule["name"]["as"] == metric
    # Every API replica exports the same cluster-wide depth: a sum would multiply it by the replica count.
    assert re.match(r"max by \(queue\) \(<<\.Series>>", rule["metricsQuery"])


@pytest.mark.integration
def test_messages_the_orchestrator_publishes_land_in_the_lists_keda_reads(redis_url: str) -> None:
    # A queue of its own, so that no worker of another test takes the messages: KEDA's list names, renamed.
    settings = Settings.from_env({"REDIS_URL": redis_url})
    app = create_app(settings)
    client = redis.Redis.from_url(redis_url)
    queue, probe = _queue("worker-llm"), f"k8s-probe-{uuid.uuid4().hex}"
    watched = [t["metadata"]["listName"] for t in _scaled_objects()["worker-llm"]["spec"]["triggers"]]
    renamed = [probe + name.removeprefix(queue) for name in watched]
    try:
        for priority in (0, 3, 6, 9):
            app.send_task("orchestrator.run_step", args=("run", "hash", "step", "gen"), queue=probe, priority=priority)
        lengths = [int(client.llen(name)) for name in renamed]
        assert lengths == [1, 1, 1, 1], "each priority has its own list, and KEDA watches all four"
    finally:
        client.delete(*renamed)
        client.close()
