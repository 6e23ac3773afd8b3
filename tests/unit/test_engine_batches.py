"""Batched messages: a wide fan-out sent as fewer messages, the receiving slot running each carried step in turn.

The engine runs against the in-memory store with the recording publisher and :class:`LocalSteps` of
``test_engine_local``; the Celery side (the ``batch`` argument, sizing by the workers' slots) is covered by
``tests/integration/test_batches.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.domain import Attempt, RunStatus
from orchestrator.engine.attempt import execute_batch
from orchestrator.engine.batches import MAX_BATCH, batch_size, passengers_of, plan_batches
from orchestrator.engine.local import Delivery
from orchestrator.errors import RetryableStepError
from orchestrator.state import keys
from tests.unit.test_engine_attempt import Message, RecordingPublisher, drive, run_status, start, step_status, workflow
from tests.unit.test_engine_local import QUEUE, local_runtime


def test_a_fan_out_no_wider_than_two_messages_a_slot_goes_one_step_a_message() -> None:
    assert batch_size(8, 4) == 1
    assert batch_size(500, 0) == 1, "no slot known: nothing is batched"


def test_a_wider_fan_out_is_cut_so_every_slot_gets_two_batches_and_none_exceeds_the_cap() -> None:
    assert batch_size(200, 4) == 25
    assert batch_size(9, 4) == 2
    assert batch_size(100_000, 4) == MAX_BATCH


def test_batches_keep_release_order_share_a_group_and_a_step_without_one_goes_alone() -> None:
    groups = {"a": "cpu", "b": "cpu", "t": None, "l": "llm", "c": "cpu", "d": "cpu"}

    planned = plan_batches(list(groups), 2, groups.__getitem__)

    assert planned == [("a", "b"), ("t",), ("l",), ("c", "d")]


def test_a_batch_argument_that_is_not_a_list_of_step_and_task_id_pairs_is_refused() -> None:
    assert passengers_of([["x", "t1"], ["y", "t2"]]) == (("x", "t1"), ("y", "t2"))
    for bad in ("x", [["x"]], [["x", ""]], [["x", 1]], [["x", "t"]] * (MAX_BATCH + 1)):
        with pytest.raises(ValueError, match="batch"):
            passengers_of(bad)


def fan_out(width: int, **leaf: Any) -> dict[str, Any]:
    leaves = [{"name": f"leaf{i}", "uses": "noop", "depends_on": ["root"], **leaf} for i in range(width)]
    return workflow({"name": "root", "uses": "noop"}, *leaves)


def released(runtime: Any, publisher: RecordingPublisher, definition: dict[str, Any]) -> tuple[str, list[Message]]:
    """Start the run and finish its root with nothing kept here: the released leaves' messages, as published."""
    local = runtime.local
    allowed, local.allowed = local.allowed, set()
    run_id = start(runtime, publisher, definition)
    root = publisher.sent.pop(0)
    execute_batch(
        runtime,
        Attempt(run_id, root.step, root.generation, root.task_id),
        root.definition_hash,
        Delivery(queue=QUEUE),
        (),
    )
    local.allowed = allowed
    messages, publisher.sent[:] = list(publisher.sent), []
    return run_id, messages


def deliver_batch(runtime: Any, messages: list[Message], *, raise_failure: bool = False) -> str:
    first, *rest = messages
    attempt = Attempt(first.run_id, first.step, first.generation, first.task_id)
    passengers = [(m.step, m.task_id) for m in rest]
    return execute_batch(
        runtime, attempt, first.definition_hash, Delivery(queue=QUEUE), passengers, raise_failure=raise_failure
    )


def test_each_step_of_a_batch_is_claimed_under_its_own_task_id_carried_by_the_message_and_announced() -> None:
    runtime, publisher, local = local_runtime()
    run_id, messages = released(runtime, publisher, fan_out(4))
    claims: list[tuple[str, str, str]] = []
    real_claim = runtime.store.claim

    def claim(attempt: Attempt, *args: Any, **kwargs: Any) -> Any:
        claims.append((attempt.step, attempt.task_id, kwargs.get("carrier", "")))
        return real_claim(attempt, *args, **kwargs)

    runtime.store.claim = claim  # type: ignore[method-assign]

    assert deliver_batch(runtime, messages) == "succeeded"

    carrier = messages[0].task_id
    assert claims == [(m.step, m.task_id, "" if i == 0 else carrier) for i, m in enumerate(messages)]
    assert publisher.sent == [], "no step of the batch went out as a message of its own"
    assert local.announced == [
        *((kind, m.step, m.task_id) for m in messages[1:] for kind in ("started", "ended")),
        ("flushed", "", ""),
    ], "each carried step is announced (the message's own step is Celery's to announce), all sent once it ends"
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED
    seqs = [event.seq for event in runtime.store.events(run_id)]
    assert seqs == list(range(1, len(seqs) + 1)), "the run's events stay gapless"


def test_a_carried_step_that_must_retry_is_resent_as_its_own_message_and_the_rest_still_run() -> None:
    runtime, publisher, local = local_runtime()
    definition = fan_out(2)
    definition["steps"].append(
        {
            "name": "flaky",
            "uses": "llm",
            "depends_on": ["root"],
            "with": {"prompt": "hi", "simulate": {"errors": ["overloaded"]}},
        }
    )
    definition["steps"].append({"name": "last", "uses": "noop", "depends_on": ["root"]})
    run_id, messages = released(runtime, publisher, definition)
    assert [m.step for m in messages] == ["leaf0", "leaf1", "flaky", "last"]

    deliver_batch(runtime, messages)

    [(step, task_id, _)] = local.resent
    assert (step, task_id) == ("flaky", messages[2].task_id), "resent under its own task id"
    assert step_status(runtime, run_id, "flaky") == "queued"
    assert step_status(runtime, run_id, "last") == "succeeded"


def test_the_message_s_own_step_retrying_still_runs_the_others_then_raises_for_celery_s_retry() -> None:
    runtime, publisher, _ = local_runtime()
    definition = workflow(
        {"name": "root", "uses": "noop"},
        {
            "name": "flaky",
            "uses": "llm",
            "depends_on": ["root"],
            "with": {"prompt": "hi", "simulate": {"errors": ["overloaded"]}},
        },
        *({"name": f"leaf{i}", "uses": "noop", "depends_on": ["root"]} for i in range(2)),
    )
    run_id, messages = released(runtime, publisher, definition)

    with pytest.raises(RetryableStepError):
        deliver_batch(runtime, messages)

    assert [step_status(runtime, run_id, s) for s in ("leaf0", "leaf1")] == ["succeeded", "succeeded"]


def test_a_slot_that_may_run_no_more_sends_the_rest_of_its_batch_as_messages_under_their_task_ids() -> None:
    runtime, publisher, local = local_runtime()
    run_id, messages = released(runtime, publisher, fan_out(4))
    local.allowed = {"leaf1"}  # the worker starts stopping after leaf1

    deliver_batch(runtime, messages)

    assert [(m.step, m.task_id) for m in publisher.sent] == [(m.step, m.task_id) for m in messages[2:]]
    drive(runtime, publisher)
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED


def test_a_run_cancelled_mid_batch_starts_none_of_the_batch_s_remaining_steps() -> None:
    runtime, publisher, local = local_runtime()
    run_id, messages = released(runtime, publisher, fan_out(4))
    real_ended = local.ended

    def ended(attempt: Attempt, *args: Any, **kwargs: Any) -> None:
        real_ended(attempt, *args, **kwargs)
        if attempt.step == "leaf1":
            runtime.store.stop(run_id, RunStatus.CANCELLED, "test", ())

    local.ended = ended  # type: ignore[method-assign]

    deliver_batch(runtime, messages)

    fields = runtime.store.run_fields(run_id)
    assert fields["status"] == RunStatus.CANCELLED
    assert [fields.get(keys.step_field(f"leaf{i}", "started_at")) is not None for i in range(4)] == [
        True,
        True,
        False,
        False,
    ]
    assert publisher.sent == []


def test_a_batch_delivered_again_after_its_worker_died_runs_only_the_steps_not_yet_run() -> None:
    runtime, publisher, _ = local_runtime()
    run_id, messages = released(runtime, publisher, fan_out(4))
    # The worker died after two steps of the batch: they ran, the others never started.
    deliver_batch(runtime, messages[:2])
    attempts = {m.step: runtime.store.run_fields(run_id)[keys.step_field(m.step, "attempts")] for m in messages[:2]}

    deliver_batch(runtime, messages)

    fields = runtime.store.run_fields(run_id)
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED
    assert {s: fields[keys.step_field(s, "attempts")] for s in attempts} == attempts, "none ran twice"
