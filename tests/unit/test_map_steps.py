"""Map steps (``for_each``) against the in-memory store, without Celery: the list, the items, the refills, the
ordered output, failures, cancel and resume (the same rules the Redis scripts keep; see test_state_contract)."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.definition.registry import functions
from orchestrator.definition.spec import parse_workflow
from orchestrator.definition.validation import check_workflow
from orchestrator.domain import Attempt, RunStatus, StepOutcome
from orchestrator.engine.control import resume_run, stop_run
from orchestrator.engine.steps import StepContext
from orchestrator.engine.sweep import sweep_once
from orchestrator.errors import NonRetryableStepError, WorkflowDefinitionError
from orchestrator.state import MemoryStateStore, keys
from tests.unit.test_engine_attempt import (
    SETTINGS,
    deliver,
    drive,
    make_runtime,
    run_status,
    start,
    step_status,
    workflow,
)

CALLS: list[Any] = []


def map_echo(ctx: StepContext) -> Any:
    """Returns its item, index and count; counts its calls; fails for good on the item "boom"."""
    CALLS.append(ctx.item)
    if ctx.item == "boom" and not ctx.inputs.get("fixed"):
        raise NonRetryableStepError("boom", kind="exception")
    return {"item": ctx.item, "index": ctx.index, "count": ctx.count}


functions.register(map_echo, "map_echo", replace=True)


def _map(for_each: str, **more: Any) -> dict[str, Any]:
    return {"name": "m", "uses": "python", "for_each": for_each, "with": {"function": "map_echo"}, **more}


def _items(runtime: Any, run_id: str) -> dict[str, str]:
    fields = runtime.store.run_fields(run_id)
    prefix = keys.step_prefix("m") + "items_"
    return {k.removeprefix(prefix): v for k, v in fields.items() if k.startswith(prefix)}


def test_a_map_step_runs_each_item_and_outputs_their_results_in_item_order() -> None:
    CALLS.clear()
    runtime, publisher = make_runtime()
    definition = workflow(
        _map("inputs.xs"),
        {"name": "after", "uses": "llm", "depends_on": ["m"], "with": {"prompt": "{{ steps.m.output[2].item }}"}},
    )
    run_id = start(runtime, publisher, definition, xs=["a", "b", "c"])

    drive(runtime, publisher)

    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED
    output = runtime.store.run_fields(run_id)[keys.step_field("m", "output")]
    assert output == (
        '[{"item":"a","index":0,"count":3},{"item":"b","index":1,"count":3},{"item":"c","index":2,"count":3}]'
    )
    assert _items(runtime, run_id)["succeeded"] == "3"
    records = runtime.store.item_records(run_id, "m", 1, 5)
    assert [(r["index"], r["item"], r["status"], r["attempts"]) for r in records] == [
        (1, "b", "succeeded", 1),
        (2, "c", "succeeded", 1),
    ]


def test_an_empty_list_succeeds_with_an_empty_output() -> None:
    runtime, publisher = make_runtime()
    run_id = start(runtime, publisher, workflow(_map("[]")))
    drive(runtime, publisher)
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED
    assert runtime.store.run_fields(run_id)[keys.step_field("m", "output")] == "[]"


@pytest.mark.parametrize(
    ("for_each", "message"),
    [("inputs.xs", "for_each gave str, not a list"), ("[1, 2, 3]", "for_each gave 3 items; the limit is 2")],
)
def test_a_list_that_is_not_one_or_too_long_fails_the_step_without_retries(for_each: str, message: str) -> None:
    runtime, publisher = make_runtime()
    runtime.settings = SETTINGS.__class__(**{**SETTINGS.__dict__, "map_max_items": 2})
    run_id = start(runtime, publisher, workflow(_map(for_each)), xs="abc")
    drive(runtime, publisher)
    fields = runtime.store.run_fields(run_id)
    assert fields[keys.step_field("m", "status")] == "failed"
    assert message in fields[keys.step_field("m", "error")]
    assert "'m'" in fields[keys.step_field("m", "error")]
    assert fields[keys.step_field("m", "attempts")] == "1"


def test_max_parallel_keeps_at_most_that_many_items_queued_or_running() -> None:
    runtime, publisher = make_runtime()
    run_id = start(runtime, publisher, workflow(_map("range(7) | list", max_parallel=2)))
    deliver(runtime, publisher.sent.pop(0))  # the step itself: expands and queues two items
    peak = 0
    while publisher.sent:
        counts = _items(runtime, run_id)
        peak = max(peak, int(counts["queued"]) + int(counts["running"]))
        assert len(publisher.sent) <= 2
        deliver(runtime, publisher.sent.pop(0))
    assert peak == 2
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED


def test_one_item_failing_fails_the_step_after_the_others_end_and_resume_reruns_only_it() -> None:
    CALLS.clear()
    runtime, publisher = make_runtime()
    run_id = start(runtime, publisher, workflow(_map("inputs.xs")), xs=["a", "boom", "c"])
    drive(runtime, publisher)
    fields = runtime.store.run_fields(run_id)
    assert fields[keys.step_field("m", "status")] == "failed"
    assert "1 of 3 items did not succeed; item 1 failed: boom" in fields[keys.step_field("m", "error")]
    assert _items(runtime, run_id) | {} == {
        **_items(runtime, run_id),
        "succeeded": "2",
        "failed": "1",
        "running": "0",
        "queued": "0",
    }
    assert sorted(CALLS) == ["a", "boom", "c"]

    CALLS.clear()
    fields_inputs = runtime.store.run_fields(run_id)["inputs"]
    assert "boom" in fields_inputs
    functions.register(_fixed, "map_echo", replace=True)
    try:
        resume_run(publisher, SETTINGS, runtime.store, run_id)
        drive(runtime, publisher)
    finally:
        functions.register(map_echo, "map_echo", replace=True)
    assert CALLS == ["boom"]
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED


def _fixed(ctx: StepContext) -> Any:
    CALLS.append(ctx.item)
    return {"item": ctx.item, "index": ctx.index, "count": ctx.count}


def test_cancel_stops_every_unfinished_item() -> None:
    runtime, publisher = make_runtime()
    run_id = start(runtime, publisher, workflow(_map("range(5) | list", max_parallel=2)))
    deliver(runtime, publisher.sent.pop(0))
    deliver(runtime, publisher.sent.pop(0))
    stop_run(publisher, runtime.store, run_id, RunStatus.CANCELLED, "test")
    assert set(drive(runtime, publisher)) == {"dropped item: done cancelled"}
    counts = _items(runtime, run_id)
    assert (counts["succeeded"], counts["cancelled"], counts["pending"], counts["queued"]) == ("1", "4", "0", "0")
    assert step_status(runtime, run_id, "m") == "cancelled"


def test_validation_rejects_a_bad_for_each_naming_the_step() -> None:
    with pytest.raises(WorkflowDefinitionError, match="step 'm': for_each refers to 'os'"):
        check_workflow(parse_workflow(workflow(_map("os.environ"))))
    with pytest.raises(WorkflowDefinitionError, match=r"step 'm'.*for_each is not supported on agent steps"):
        parse_workflow(workflow({"name": "m", "uses": "agent", "for_each": "[1]", "with": {"prompt": "hi"}}))
    parse_workflow(workflow({"name": "m", "uses": "approval", "for_each": "[1]", "with": {"approvers": ["a"]}}))
    with pytest.raises(WorkflowDefinitionError, match=r"step 'm'.*max_parallel needs for_each"):
        parse_workflow(workflow({"name": "m", "uses": "noop", "max_parallel": 2}))
    with pytest.raises(WorkflowDefinitionError, match="max_parallel"):
        parse_workflow(workflow({"name": "m", "uses": "noop", "for_each": "[1]", "max_parallel": 0}))
    with pytest.raises(WorkflowDefinitionError, match=r"template refers to .item."):
        check_workflow(parse_workflow(workflow({"name": "m", "uses": "llm", "with": {"prompt": "{{ item }}"}})))
    check_workflow(
        parse_workflow(workflow({"name": "m", "uses": "llm", "for_each": "[1]", "with": {"prompt": "{{ item }}"}}))
    )


class _Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_the_sweeper_requeues_an_item_whose_worker_died_and_it_runs_once_more() -> None:
    CALLS.clear()
    clock = _Clock()
    runtime, publisher = make_runtime(MemoryStateStore(clock=clock))
    run_id = start(runtime, publisher, workflow(_map("inputs.xs")), xs=["a", "b"])
    deliver(runtime, publisher.sent.pop(0))
    lost = publisher.sent.pop(0)
    assert (
        runtime.store.claim_item(
            Attempt(run_id, "m", "1", lost.task_id, lost.index), lease_s=SETTINGS.lease_s, upstream=()
        ).outcome
        == "ok"
    )  # ... and its worker dies here
    drive(runtime, publisher)
    clock.now += SETTINGS.lease_s + 1

    assert sweep_once(runtime, "test") == 1
    assert publisher.sent[0].index == lost.index
    assert publisher.sent[0].task_id != lost.task_id
    drive(runtime, publisher)
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED
    assert sorted(CALLS) == ["a", "b"]
    record = runtime.store.item_records(run_id, "m", lost.index or 0, 1)[0]
    assert record["attempts"] == 2


def test_a_map_step_whose_last_item_was_recorded_by_a_worker_that_died_is_finished_by_the_sweeper() -> None:
    clock = _Clock()
    runtime, publisher = make_runtime(MemoryStateStore(clock=clock))
    run_id = start(runtime, publisher, workflow(_map("inputs.xs")), xs=["a"])
    deliver(runtime, publisher.sent.pop(0))
    only = publisher.sent.pop(0)
    at = Attempt(run_id, "m", "1", only.task_id, only.index)
    runtime.store.claim_item(at, lease_s=SETTINGS.lease_s, upstream=())
    assert runtime.store.finish_item(at, StepOutcome.SUCCEEDED, output={"ok": 1}).all_ended  # ... then it dies
    clock.now += SETTINGS.queued_grace_s + 1

    assert sweep_once(runtime, "test") == 1
    drive(runtime, publisher)
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED
    assert runtime.store.run_fields(run_id)[keys.step_field("m", "output")] == '[{"ok":1}]'
