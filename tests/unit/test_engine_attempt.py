"""The attempt lifecycle (claim → decide → run → record → release) against the in-memory store, without Celery.

A recording publisher stands in for the broker: what the engine publishes is delivered by :func:`drive`, one
message at a time, the way workers would take them.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import redis

from orchestrator.definition.registry import FunctionRegistry
from orchestrator.definition.spec import WorkflowSpec, parse_workflow
from orchestrator.domain import Attempt, FinishResult, RunStatus, StepStatus
from orchestrator.engine.attempt import execute_attempt
from orchestrator.engine.control import resume_run
from orchestrator.engine.items import execute_item
from orchestrator.engine.runtime import Runtime, build_runtime
from orchestrator.engine.steps import StepContext
from orchestrator.errors import NonRetryableStepError, RetryableStepError, StepDeferred, StepFailed
from orchestrator.infra.settings import Settings
from orchestrator.state import MemoryStateStore, keys

SETTINGS = replace(Settings.from_env({}), outage_patience_s=2.0, retry_cap_s=0.0)


@dataclass
class Message:
    run_id: str
    step: str
    generation: str
    task_id: str
    definition_hash: str
    index: int | None = None


@dataclass
class RecordingPublisher:
    """The broker, as a list: every publish appends a message; revokes are remembered."""

    sent: list[Message] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)

    def publish(
        self,
        spec: WorkflowSpec,
        *,
        run_id: str,
        steps: Sequence[str],
        generation: str,
        task_ids: Mapping[str, str] | None = None,
    ) -> None:
        for step in steps:
            task_id = (task_ids or {}).get(step) or uuid.uuid4().hex
            self.sent.append(Message(run_id, step, generation, task_id, spec.definition_hash))

    def publish_items(
        self,
        spec: WorkflowSpec,
        *,
        run_id: str,
        step: str,
        generation: str,
        items: Sequence[tuple[int, str]],
        sent_at: float | None = None,
    ) -> None:
        for index, task_id in items:
            self.sent.append(Message(run_id, step, generation, task_id, spec.definition_hash, index))

    def revoke(self, task_ids: Sequence[str]) -> None:
        self.revoked.extend(task_ids)


def make_runtime(store: MemoryStateStore | None = None, **executor: Any) -> tuple[Runtime, RecordingPublisher]:
    publisher = RecordingPublisher()
    runtime = build_runtime(SETTINGS, publisher, store=store or MemoryStateStore(), **executor)
    return runtime, publisher


def start(runtime: Runtime, publisher: RecordingPublisher, definition: dict[str, Any], **inputs: Any) -> str:
    """Create a run as a producer would and publish its roots."""
    spec = parse_workflow(definition)
    run_id = uuid.uuid4().hex
    runtime.store.save_definition(spec)
    assert runtime.store.create_run(run_id, spec, dict(inputs), None)
    publisher.publish(spec, run_id=run_id, steps=spec.graph.roots, generation="1")
    return run_id


def deliver(runtime: Runtime, message: Message) -> str:
    attempt = Attempt(message.run_id, message.step, message.generation, message.task_id, message.index)
    execute = execute_attempt if message.index is None else execute_item
    return execute(runtime, attempt, message.definition_hash)


def drive(runtime: Runtime, publisher: RecordingPublisher, limit: int = 100) -> list[str]:
    """Deliver every published message, redelivering retried ones (their countdown is not waited for)."""
    results = []
    while publisher.sent and limit:
        limit -= 1
        message = publisher.sent.pop(0)
        try:
            results.append(deliver(runtime, message))
        except RetryableStepError:
            publisher.sent.append(message)  # Celery's retry: the same task id, delivered again later
            results.append("retry")
    return results


def step_status(runtime: Runtime, run_id: str, step: str) -> str:
    return runtime.store.run_fields(run_id)[keys.step_field(step, "status")]


def run_status(runtime: Runtime, run_id: str) -> str:
    return runtime.store.run_fields(run_id)["status"]


def workflow(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": f"engine_{uuid.uuid4().hex[:6]}", "steps": list(steps)}


def test_a_claimed_step_runs_records_and_publishes_the_children_it_released() -> None:
    runtime, publisher = make_runtime()
    run_id = start(
        runtime, publisher, workflow({"name": "a", "uses": "noop"}, {"name": "b", "uses": "noop", "depends_on": ["a"]})
    )

    assert deliver(runtime, publisher.sent.pop(0)) == "succeeded"

    assert [m.step for m in publisher.sent] == ["b"]
    assert drive(runtime, publisher) == ["succeeded"]
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED


def test_a_second_delivery_of_a_finished_step_runs_nothing_and_republishes_unclaimed_children() -> None:
    runtime, publisher = make_runtime()
    start(
        runtime, publisher, workflow({"name": "a", "uses": "noop"}, {"name": "b", "uses": "noop", "depends_on": ["a"]})
    )
    first = publisher.sent.pop(0)
    deliver(runtime, first)
    lost_child = publisher.sent.pop(0)  # as if the finishing worker died before the child's message left

    outcome = deliver(runtime, first)

    assert outcome.startswith("duplicate delivery of finished step")
    assert [(m.step, m.task_id) for m in publisher.sent] != []
    assert publisher.sent[0].step == lost_child.step


def test_a_message_of_an_older_generation_is_dropped() -> None:
    runtime, publisher = make_runtime()
    start(runtime, publisher, workflow({"name": "a", "uses": "noop"}))
    message = publisher.sent.pop(0)

    assert deliver(runtime, replace(message, generation="0")) == "dropped: stale"


def test_a_message_naming_an_unknown_definition_or_step_is_dropped() -> None:
    runtime, publisher = make_runtime()
    start(runtime, publisher, workflow({"name": "a", "uses": "noop"}))
    message = publisher.sent.pop(0)

    assert deliver(runtime, replace(message, definition_hash="0" * 32)) == "dropped: unknown definition"
    assert deliver(runtime, replace(message, step="nope")) == "dropped: unknown step"


def test_a_retryable_error_is_recorded_and_raised_with_its_countdown_then_the_next_attempt_succeeds() -> None:
    runtime, publisher = make_runtime()
    run_id = start(
        runtime,
        publisher,
        workflow({"name": "a", "uses": "llm", "with": {"prompt": "hi", "simulate": {"errors": ["overloaded"]}}}),
    )
    message = publisher.sent.pop(0)

    with pytest.raises(RetryableStepError) as raised:
        deliver(runtime, message)

    assert raised.value.countdown is not None
    assert step_status(runtime, run_id, "a") == StepStatus.QUEUED
    assert deliver(runtime, message) == "succeeded"
    view_errors = runtime.store.run_fields(run_id)["s:a:errors"]
    assert "overloaded" in view_errors


def test_a_non_retryable_error_fails_the_step_and_the_run_at_once() -> None:
    runtime, publisher = make_runtime()
    run_id = start(
        runtime,
        publisher,
        workflow({"name": "a", "uses": "llm", "with": {"prompt": "hi", "simulate": {"errors": ["bad_request"]}}}),
    )

    assert drive(runtime, publisher) == ["failed"]
    assert run_status(runtime, run_id) == RunStatus.FAILED


def test_asked_to_raise_a_final_failure_the_attempt_records_it_first_then_raises_step_failed() -> None:
    runtime, publisher = make_runtime()
    run_id = start(
        runtime,
        publisher,
        workflow({"name": "a", "uses": "llm", "with": {"prompt": "hi", "simulate": {"errors": ["bad_request"]}}}),
    )
    message = publisher.sent.pop(0)
    attempt = Attempt(message.run_id, message.step, message.generation, message.task_id)

    with pytest.raises(StepFailed, match=r"step 'a' failed: bad_request \(HTTP 400\)") as raised:
        execute_attempt(runtime, attempt, message.definition_hash, raise_failure=True)

    assert raised.value.step == "a"
    assert step_status(runtime, run_id, "a") == StepStatus.FAILED
    assert run_status(runtime, run_id) == RunStatus.FAILED
    # A redelivery of the same message finds the step finished and raises nothing.
    assert execute_attempt(runtime, attempt, message.definition_hash, raise_failure=True).startswith("duplicate")


def test_a_step_out_of_attempts_gives_up_naming_the_last_error() -> None:
    runtime, publisher = make_runtime()
    run_id = start(
        runtime,
        publisher,
        workflow(
            {
                "name": "a",
                "uses": "llm",
                "retry": {"max_attempts": 2},
                "with": {"prompt": "hi", "simulate": {"errors": ["overloaded"] * 5}},
            }
        ),
    )

    assert drive(runtime, publisher) == ["retry", "failed"]
    assert step_status(runtime, run_id, "a") == StepStatus.FAILED


def test_a_false_condition_skips_the_step_and_its_dependents_follow_their_trigger_rule() -> None:
    runtime, publisher = make_runtime()
    run_id = start(
        runtime,
        publisher,
        workflow(
            {"name": "a", "uses": "noop", "condition": "inputs.go"},
            {"name": "b", "uses": "noop", "depends_on": ["a"]},
            {"name": "c", "uses": "noop", "depends_on": ["a"], "trigger_rule": "all_done"},
        ),
        go=False,
    )

    drive(runtime, publisher)

    assert [step_status(runtime, run_id, s) for s in "abc"] == ["skipped", "skipped", "succeeded"]
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED


def test_a_failed_parent_makes_its_child_upstream_failed_without_running_it() -> None:
    runtime, publisher = make_runtime()
    run_id = start(
        runtime,
        publisher,
        workflow(
            {"name": "a", "uses": "llm", "with": {"prompt": "x", "simulate": {"errors": ["bad_request"]}}},
            {"name": "b", "uses": "noop", "depends_on": ["a"]},
        ),
    )

    drive(runtime, publisher)

    assert step_status(runtime, run_id, "b") == StepStatus.UPSTREAM_FAILED


def test_an_approval_step_parks_the_attempt_holding_nothing() -> None:
    runtime, publisher = make_runtime()
    run_id = start(runtime, publisher, workflow({"name": "a", "uses": "approval", "with": {"approvers": ["ann"]}}))

    assert drive(runtime, publisher) == ["waiting for a decision"]
    assert step_status(runtime, run_id, "a") == StepStatus.WAITING
    assert not publisher.sent


def test_a_step_deferred_by_a_shared_limit_is_given_back_without_counting_an_attempt() -> None:
    class Deferring:
        def __init__(self, real: Any) -> None:
            self.real = real

        def should_run(self, step: Any, ctx: StepContext) -> bool:
            return True

        def run(self, step: Any, ctx: StepContext, call: Any) -> Any:
            raise StepDeferred("wait", reason="rate_limit", model="m", countdown=1.5)

    runtime, publisher = make_runtime()
    runtime.executor = Deferring(runtime.executor)  # type: ignore[assignment]
    run_id = start(runtime, publisher, workflow({"name": "a", "uses": "noop"}))

    with pytest.raises(StepDeferred):
        deliver(runtime, publisher.sent.pop(0))

    fields = runtime.store.run_fields(run_id)
    assert fields["s:a:status"] == StepStatus.QUEUED
    assert fields["s:a:attempts"] == "0"


def test_a_bug_in_the_step_code_fails_the_step_as_an_internal_error_instead_of_stranding_it() -> None:
    class Broken:
        def should_run(self, step: Any, ctx: StepContext) -> bool:
            return True

        def run(self, step: Any, ctx: StepContext, call: Any) -> Any:
            raise KeyError("oops")

    runtime, publisher = make_runtime()
    runtime.executor = Broken()  # type: ignore[assignment]
    run_id = start(runtime, publisher, workflow({"name": "a", "uses": "noop"}))

    assert drive(runtime, publisher) == ["failed"]
    assert "internal_error" in runtime.store.run_fields(run_id)["s:a:error"]


def test_an_interrupt_from_the_pool_is_a_timeout_and_retried() -> None:
    class Interrupted(Exception):
        pass

    class Slow:
        def should_run(self, step: Any, ctx: StepContext) -> bool:
            return True

        def run(self, step: Any, ctx: StepContext, call: Any) -> Any:
            raise Interrupted

    runtime, publisher = make_runtime()
    runtime.executor = Slow()  # type: ignore[assignment]
    runtime.interrupts = (Interrupted,)
    run_id = start(runtime, publisher, workflow({"name": "a", "uses": "noop", "timeout_s": 1}))

    with pytest.raises(RetryableStepError) as raised:
        deliver(runtime, publisher.sent.pop(0))

    assert raised.value.kind == "timeout"
    assert "timeout" in runtime.store.run_fields(run_id)["s:a:errors"]


def test_a_resumed_step_whose_inputs_match_its_stored_result_reuses_it() -> None:
    runtime, publisher = make_runtime()
    run_id = start(
        runtime,
        publisher,
        workflow(
            {"name": "a", "uses": "llm", "with": {"prompt": "x"}},
            {"name": "b", "uses": "llm", "depends_on": ["a"], "with": {"prompt": "{{ steps.a.output.text }}"}},
        ),
    )
    drive(runtime, publisher)
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED

    resume_run(publisher, SETTINGS, runtime.store, run_id, from_step="a")
    drive(runtime, publisher)

    fields = runtime.store.run_fields(run_id)
    assert (fields.get("s:a:cached", ""), fields["s:b:cached"]) == ("", "1")


def test_an_outage_while_recording_is_waited_out_and_the_finish_lands_once(caplog: pytest.LogCaptureFixture) -> None:
    runtime, publisher = make_runtime()
    store = runtime.store
    real_finish = store.finish
    calls = {"n": 0}

    def flaky_finish(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise redis.exceptions.ConnectionError("Redis went away")
        return real_finish(*args, **kwargs)

    store.finish = flaky_finish  # type: ignore[method-assign]
    run_id = start(runtime, publisher, workflow({"name": "a", "uses": "noop"}))

    assert drive(runtime, publisher) == ["succeeded"]
    assert calls["n"] == 2
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED
    # The log line names the attempt and what it was doing.
    [line] = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
    assert run_id in line
    assert "step='a'" in line
    assert ": record succeeded: Redis does not answer (Redis went away); trying again in 0.1s" in line


def test_a_finish_refused_after_it_was_applied_unseen_still_publishes_the_children_it_released() -> None:
    # The reply of an applied finish lost on a dropped connection, the finish sent again and refused as stale, with
    # no error to tell: the children it released must still go out.
    runtime, publisher = make_runtime()
    store = runtime.store
    real_finish = store.finish

    def applied_unseen(*args: Any, **kwargs: Any) -> FinishResult:
        real_finish(*args, **kwargs)
        return FinishResult(recorded=False)

    store.finish = applied_unseen  # type: ignore[method-assign]
    run_id = start(
        runtime,
        publisher,
        workflow({"name": "a", "uses": "noop"}, {"name": "b", "uses": "noop", "depends_on": ["a"]}),
    )
    deliver(runtime, publisher.sent.pop(0))

    assert [m.step for m in publisher.sent] == ["b"]
    store.finish = real_finish  # type: ignore[method-assign]
    assert drive(runtime, publisher) == ["succeeded"]
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED


def test_a_python_step_raising_a_non_retryable_error_fails_with_its_kind() -> None:
    registry = FunctionRegistry()

    def refuse(ctx: StepContext) -> None:
        raise NonRetryableStepError("no", kind="refused")

    registry.register(refuse, "refuse")
    runtime, publisher = make_runtime()
    runtime.executor.functions = registry
    run_id = start(runtime, publisher, workflow({"name": "a", "uses": "python", "with": {"function": "refuse"}}))

    assert drive(runtime, publisher) == ["failed"]
    assert "refused" in runtime.store.run_fields(run_id)["s:a:error"]
