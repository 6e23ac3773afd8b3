"""Step priorities: depth in the DAG, its level, the broker's message priority, and the Celery options they become."""

from __future__ import annotations

import sys

import pytest
from celery import Celery

from orchestrator import Settings, parse_workflow
from orchestrator.celery_app import CeleryPublisher
from orchestrator.celery_app import celery_config as from_settings
from orchestrator.definition.dag import Graph
from orchestrator.definition.spec import WorkflowSpec
from orchestrator.definition.workflow import NoopStep, Workflow
from orchestrator.engine.priorities import REDIS_PRIORITY_STEPS, message_priority, redis_queue_lists, step_level
from orchestrator.errors import WorkflowDefinitionError

REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def pipeline(**overrides: object) -> WorkflowSpec:
    """The content pipeline's shape: a chain, a fan-out of three, a join; plus an unrelated root."""
    steps: list[dict[str, object]] = [
        {"name": "research", "uses": "noop"},
        {"name": "blog", "uses": "noop", "depends_on": ["research"]},
        {"name": "social", "uses": "noop", "depends_on": ["blog"]},
        {"name": "email", "uses": "noop", "depends_on": ["blog"]},
        {"name": "seo", "uses": "noop", "depends_on": ["blog"]},
        {"name": "review", "uses": "noop", "depends_on": ["social", "email", "seo"]},
        {"name": "tail", "uses": "noop", "depends_on": ["review"]},
        {"name": "alone", "uses": "noop"},
    ]
    for step in steps:
        step.update(overrides.get(str(step["name"]), {}))  # type: ignore[call-overload]
    return parse_workflow({"name": "wf", "steps": steps})


def test_depth_is_the_longest_path_from_a_root_so_a_join_sits_below_its_deepest_parent() -> None:
    graph = Graph.from_dependencies({"a": [], "b": ["a"], "c": ["b"], "j": ["a", "c"], "x": []})

    assert graph.depths == {"a": 0, "b": 1, "c": 2, "j": 3, "x": 0}


def test_every_root_is_at_depth_zero_and_every_other_step_deeper_than_each_parent() -> None:
    spec = pipeline()

    for name, parents in spec.graph.parents.items():
        depth = spec.graph.depths[name]
        assert depth == 0 if not parents else all(depth > spec.graph.depths[p] for p in parents)


def test_the_depth_of_a_5000_step_chain_does_not_hit_the_recursion_limit() -> None:
    n = 5000
    assert n > sys.getrecursionlimit()
    graph = Graph.from_dependencies({f"s{i}": ([f"s{i - 1}"] if i else []) for i in range(n)})

    assert graph.depths[f"s{n - 1}"] == n - 1


def test_a_steps_level_is_its_depth_capped_at_the_top_level() -> None:
    spec = pipeline()

    levels = {name: step_level(spec, name) for name in spec.steps_by_name}

    assert levels == {"research": 0, "blog": 1, "social": 2, "email": 2, "seo": 2, "review": 3, "tail": 3, "alone": 0}


def test_a_steps_own_priority_overrides_its_depth() -> None:
    spec = pipeline(research={"priority": 3}, tail={"priority": 0})

    assert step_level(spec, "research") == 3
    assert step_level(spec, "tail") == 0
    assert step_level(spec, "blog") == 1


@pytest.mark.parametrize("priority", [-1, 4, "high"])
def test_a_priority_outside_zero_to_three_is_refused_naming_the_step(priority: object) -> None:
    with pytest.raises(WorkflowDefinitionError) as caught:
        pipeline(blog={"priority": priority})

    assert caught.value.step == "blog"
    assert "priority" in str(caught.value)


def test_a_python_step_sets_its_priority_in_the_same_field() -> None:
    flow = Workflow("wf", steps=[NoopStep(name="a"), NoopStep(name="b", depends_on=["a"], priority=0)])

    assert flow.spec.steps_by_name["b"].priority == 0
    assert step_level(flow.spec, "b") == 0


def test_a_workflow_without_priorities_keeps_its_definition_hash() -> None:
    # exclude_defaults: runs created before the field existed still find their definition by the same hash.
    spec = pipeline()

    assert "priority" not in str(spec.to_json_dict())
    assert pipeline(blog={"priority": 1}).definition_hash != spec.definition_hash


@pytest.mark.parametrize(
    "url", [REDIS, "rediss://h:6380/1", "unix:///tmp/redis.sock", "redis+sentinel://s1:26379/mymaster", "sentinel://s1"]
)
def test_on_redis_the_deepest_level_is_sent_as_priority_zero_the_list_taken_first(url: str) -> None:
    # kombu's BRPOP names QUEUE, QUEUE\x06\x163, \x06\x166, \x06\x169 in that order: lower numbers are taken first.
    assert [message_priority(level, url) for level in range(4)] == [9, 6, 3, 0]


def test_on_amqp_a_deeper_level_is_sent_as_a_higher_priority() -> None:
    assert [message_priority(level, AMQP) for level in range(4)] == [0, 1, 2, 3]


def test_levels_out_of_range_are_clamped_not_refused() -> None:
    assert message_priority(-5, REDIS) == 9
    assert message_priority(12, REDIS) == 0
    assert message_priority(12, AMQP) == 3


def test_every_level_lands_on_one_of_the_lists_a_redis_worker_reads() -> None:
    lists = redis_queue_lists("llm")

    assert lists == ("llm", "llm\x06\x163", "llm\x06\x166", "llm\x06\x169")
    assert {message_priority(level, REDIS) for level in range(4)} == set(REDIS_PRIORITY_STEPS)


def signature_priority(settings: Settings, step: str, spec: WorkflowSpec | None = None) -> object:
    app = Celery("t", set_as_current=False)
    signature = CeleryPublisher(app, settings).signature(spec or pipeline(), run_id="r", step=step, generation="1")
    return signature.options.get("priority")


def test_a_step_signature_carries_its_levels_priority_for_the_broker() -> None:
    on_redis = Settings.from_env({"REDIS_URL": REDIS})
    on_rabbitmq = Settings.from_env({"REDIS_URL": REDIS, "ORCH_BROKER_URL": AMQP})

    assert [signature_priority(on_redis, s) for s in ("research", "blog", "seo", "review")] == [9, 6, 3, 0]
    assert [signature_priority(on_rabbitmq, s) for s in ("research", "blog", "seo", "review")] == [0, 1, 2, 3]


def test_with_priorities_off_a_step_signature_carries_no_priority() -> None:
    settings = Settings.from_env({"REDIS_URL": REDIS, "ORCH_PRIORITIES": "off"})

    assert all(signature_priority(settings, s) is None for s in ("research", "review"))


def test_priorities_default_to_depth_and_an_unknown_mode_is_refused() -> None:
    assert Settings.from_env({}).priorities == "depth"
    with pytest.raises(ValueError, match="ORCH_PRIORITIES"):
        Settings.from_env({"ORCH_PRIORITIES": "fifo"})


def test_the_celery_config_pins_kombus_priority_lists_and_declares_rabbitmq_priority_queues_only_when_asked() -> None:
    plain = from_settings(Settings.from_env({"REDIS_URL": REDIS}))
    opted = from_settings(Settings.from_env({"ORCH_BROKER_URL": AMQP, "ORCH_RABBITMQ_PRIORITY_QUEUES": "true"}))

    assert plain["broker_transport_options"]["priority_steps"] == list(REDIS_PRIORITY_STEPS)
    assert plain["broker_transport_options"]["sep"] == "\x06\x16"
    assert "task_queue_max_priority" not in plain
    assert opted["task_queue_max_priority"] == 3
