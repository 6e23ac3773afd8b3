"""A run's end costs the worker of its last step no round trip of its own on a single Redis.

The finish script that ends the run also drops its workflow deadline, announces its end on the global stream and
answers its parent run: the end is in the finish's round trip. Against a real Redis (the scripts are Lua), every
command the worker sends is recorded with its arguments.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis

from orchestrator.definition.registry import functions
from orchestrator.engine.runtime import Runtime, build_runtime
from orchestrator.engine.steps import StepContext
from orchestrator.errors import NonRetryableStepError
from orchestrator.state import RedisStateStore, keys
from tests.unit.round_trips import RoundTrips, record_round_trips, text
from tests.unit.test_engine_attempt import SETTINGS, RecordingPublisher, deliver, drive, run_status, start, workflow

pytestmark = pytest.mark.timeout(60)


def _fail(ctx: StepContext) -> None:
    raise NonRetryableStepError("this step fails on purpose")


FAILING = f"run_end_test.fail_{uuid.uuid4().hex[:8]}"
functions.register(_fail, FAILING)


def reading(trips: list[list[tuple[Any, ...]]], field: str) -> list[tuple[Any, ...]]:
    """The ``HGET`` and ``HMGET`` commands of ``trips`` that read ``field``."""
    reads = (c for trip in trips for c in trip if c[0] in ("HGET", "HMGET"))
    return [c for c in reads if field in (text(a) for a in c[2:])]


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> RoundTrips:
    return record_round_trips(monkeypatch)


@pytest.fixture
def runtime(redis_url: str) -> tuple[Runtime, RecordingPublisher]:
    store = RedisStateStore(redis.Redis.from_url(redis_url), retention_s=60)
    publisher = RecordingPublisher()
    built = build_runtime(SETTINGS, publisher, store=store)
    # Known already, as in a worker that has run steps before (a script Redis forgot costs round trips of its own).
    for script in store._scripts.values():
        store.client.script_load(script.script)
    return built, publisher


def _store(rt: Runtime) -> RedisStateStore:
    assert isinstance(rt.store, RedisStateStore)
    return rt.store


def announced(rt: Runtime, run_id: str) -> list[dict[str, str]]:
    """The global stream's entries for ``run_id``, oldest first."""
    rows: Any = _store(rt).client.xrange(keys.global_events_key(None))
    entries = [{text(k): text(v) for k, v in fields.items()} for _, fields in rows]
    return [entry for entry in entries if entry["run_id"] == run_id]


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_a_runs_last_step_ends_it_in_the_round_trip_of_its_finish(
    runtime: tuple[Runtime, RecordingPublisher], commands: RoundTrips, outcome: str
) -> None:
    rt, publisher = runtime
    store = _store(rt)
    step: dict[str, Any] = {"name": "a", "uses": "noop"}
    if outcome == "failed":
        step = {"name": "a", "uses": "python", "with": {"function": FAILING}}
    run_id = start(rt, publisher, {**workflow(step), "name": f"ends_{outcome}", "timeout_s": 600})
    deadline = keys.deadline_member(run_id, "1")
    assert store.client.zscore(keys.deadlines_key(None), deadline) is not None
    commands.trips.clear()

    drive(rt, publisher)
    after_finish = commands.after(store._scripts["finish"].sha)

    assert run_status(rt, run_id) == outcome
    assert after_finish == [], "nothing goes to Redis after the finish"
    assert store.client.zscore(keys.deadlines_key(None), deadline) is None, "the deadline left with the run"
    assert announced(rt, run_id) == [{"run_id": run_id, "type": f"run_{outcome}", "workflow": f"ends_{outcome}"}]


def test_a_child_runs_end_still_finishes_its_parents_step_and_each_run_is_announced_once(
    runtime: tuple[Runtime, RecordingPublisher], commands: RoundTrips
) -> None:
    rt, publisher = runtime
    child = {"name": f"child_{uuid.uuid4().hex[:8]}", "steps": [{"name": "inner", "uses": "noop"}]}
    parent = {
        "name": "parent",
        "steps": [
            {"name": "call", "uses": "workflow", "with": {"definition": child}},
            {"name": "after", "uses": "noop", "depends_on": ["call"]},
        ],
    }
    run_id = start(rt, publisher, parent)

    drive(rt, publisher)

    assert run_status(rt, run_id) == "succeeded"
    child_id = rt.store.run_fields(run_id)[keys.step_field("call", "child_run_id")]
    assert rt.store.run_fields(child_id)["status"] == "succeeded"
    child_end = commands.after(_store(rt)._scripts["finish"].sha, keys.run_key(child_id))
    assert reading(child_end, "parent_run") == [], "the child's finish answered its parent run: nobody asks for it"
    assert [e["type"] for e in announced(rt, child_id)] == ["run_started", "run_succeeded"]
    assert {e["workflow"] for e in announced(rt, child_id)} == {child["name"]}
    assert announced(rt, run_id) == [{"run_id": run_id, "type": "run_succeeded", "workflow": "parent"}]


def test_a_step_that_does_not_end_its_run_announces_nothing(runtime: tuple[Runtime, RecordingPublisher]) -> None:
    rt, publisher = runtime
    chain = workflow({"name": "a", "uses": "noop"}, {"name": "b", "uses": "noop", "depends_on": ["a"]})
    run_id = start(rt, publisher, chain)
    deliver(rt, publisher.sent.pop(0))

    assert run_status(rt, run_id) == "running"
    assert announced(rt, run_id) == []
