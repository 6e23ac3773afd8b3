"""Continuing locally: a finishing step runs a child it released in its own slot, skipping the broker for that hop.

The engine runs against the in-memory store with a recording publisher (see ``test_engine_attempt``) and a
recording :class:`LocalSteps` standing in for the worker's side; the carrier's revoke path runs on Redis.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from orchestrator.definition.spec import WorkflowSpec, parse_workflow
from orchestrator.domain import Attempt, ClaimOutcome, FinishResult, RunStatus, StepOutcome
from orchestrator.engine.attempt import execute_attempt
from orchestrator.engine.local import MAX_CANDIDATES, Delivery
from orchestrator.engine.runtime import Runtime
from orchestrator.errors import StepFailed
from orchestrator.state import RedisStateStore
from tests.unit.test_engine_attempt import (
    Message,
    RecordingPublisher,
    drive,
    make_runtime,
    run_status,
    start,
    step_status,
    workflow,
)

QUEUE = "cpu"


@dataclass
class RecordingLocalSteps:
    """The worker's side, as lists: which steps it lets run here, what it announced, and the jobs handed to its other
    threads (``threads`` of them; run by the test, as a thread of the pool would)."""

    allowed: set[str] | None = None
    announced: list[tuple[str, str, str]] = field(default_factory=list)
    resent: list[tuple[str, str, float]] = field(default_factory=list)
    threads: int = 0
    jobs: list[Callable[[], None]] = field(default_factory=list)
    refuse_spawn: bool = False

    def spare(self, queue: str) -> int:
        return max(0, self.threads - len(self.jobs))

    def spawn(self, job: Callable[[], None]) -> bool:
        if self.refuse_spawn:
            return False
        self.jobs.append(job)
        return True

    def run_jobs(self) -> None:
        while self.jobs:
            self.jobs.pop(0)()

    def accepts(self, spec: WorkflowSpec, step: str, delivery: Delivery) -> bool:
        return self.allowed is None or step in self.allowed

    def started(self, spec: WorkflowSpec, attempt: Attempt, delivery: Delivery) -> None:
        assert delivery.carrier, "a local step names the message whose slot runs it"
        self.announced.append(("started", attempt.step, attempt.task_id))

    def ended(self, attempt: Attempt, result: str, failure: str | None, *, more: bool = False) -> None:
        self.announced.append(("failed" if failure else "ended", attempt.step, attempt.task_id))

    def resend(self, spec: WorkflowSpec, attempt: Attempt, countdown_s: float, reason: str) -> None:
        self.resent.append((attempt.step, attempt.task_id, countdown_s))

    def flush(self) -> None:
        self.announced.append(("flushed", "", ""))


def local_runtime(
    allowed: set[str] | None = None, threads: int = 0
) -> tuple[Runtime, RecordingPublisher, RecordingLocalSteps]:
    runtime, publisher = make_runtime()
    local = RecordingLocalSteps(allowed, threads=threads)
    runtime.local = local
    return runtime, publisher, local


def deliver(runtime: Runtime, message: Message, *, raise_failure: bool = False) -> str:
    attempt = Attempt(message.run_id, message.step, message.generation, message.task_id)
    delivery = Delivery(queue=QUEUE)
    return execute_attempt(runtime, attempt, message.definition_hash, delivery, raise_failure=raise_failure)


def chain(*names: str) -> dict[str, object]:
    steps = [{"name": n, "uses": "noop", **({"depends_on": [names[i - 1]]} if i else {})} for i, n in enumerate(names)]
    return workflow(*steps)


def test_a_chain_runs_in_the_slot_of_its_first_message_and_each_step_is_announced_under_its_held_task_id() -> None:
    runtime, publisher, local = local_runtime()
    run_id = start(runtime, publisher, chain("a", "b", "c"))
    # The task ids each finish claimed its kept child under, read as they happen (an ended run drops each step's task
    # field), and the separate claims made: none for a kept child, which its parent's finish claims.
    claimed: dict[str, str] = {}
    separately: list[str] = []
    real_claim, real_finish = runtime.store.claim, runtime.store.finish

    def claim(attempt: Attempt, *args: object, **kwargs: object) -> object:
        separately.append(attempt.step)
        return real_claim(attempt, *args, **kwargs)  # type: ignore[arg-type]

    def finish(attempt: Attempt, *args: object, **kwargs: object) -> FinishResult:
        result = real_finish(attempt, *args, **kwargs)  # type: ignore[arg-type]
        if result.kept is not None:
            assert result.kept_claim is not None
            assert result.kept_claim.outcome == ClaimOutcome.OK
            claimed[result.kept] = result.task_ids[result.kept]
        return result

    runtime.store.claim = claim  # type: ignore[method-assign]
    runtime.store.finish = finish  # type: ignore[method-assign]

    assert deliver(runtime, publisher.sent.pop(0)) == "succeeded"

    assert separately == ["a"], "b and c were claimed by their parents' finishes"
    assert publisher.sent == [], "no message was published for b or c"
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED
    assert [(kind, step) for kind, step, _ in local.announced] == [
        ("started", "b"),
        ("ended", "b"),
        ("started", "c"),
        ("ended", "c"),
    ]
    assert {task for _, _, task in local.announced} == {claimed["b"], claimed["c"]}
    seqs = [event.seq for event in runtime.store.events(run_id)]
    assert seqs == list(range(1, len(seqs) + 1)), "the run's events stay gapless"


def test_of_several_released_children_one_runs_here_and_the_others_are_published() -> None:
    runtime, publisher, _ = local_runtime()
    run_id = start(
        runtime,
        publisher,
        workflow(
            {"name": "a", "uses": "noop"},
            *({"name": n, "uses": "noop", "depends_on": ["a"]} for n in ("x", "y", "z")),
        ),
    )

    deliver(runtime, publisher.sent.pop(0))

    assert [m.step for m in publisher.sent] == ["y", "z"]
    assert step_status(runtime, run_id, "x") == "succeeded"
    drive(runtime, publisher)
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED


def test_a_child_the_worker_refuses_here_is_published_as_a_message() -> None:
    runtime, publisher, local = local_runtime(allowed=set())
    start(runtime, publisher, chain("a", "b"))

    deliver(runtime, publisher.sent.pop(0))

    assert [m.step for m in publisher.sent] == ["b"]
    assert local.announced == []


def test_a_local_step_that_must_retry_is_recorded_and_resent_with_its_countdown_not_raised() -> None:
    runtime, publisher, local = local_runtime()
    run_id = start(
        runtime,
        publisher,
        workflow(
            {"name": "a", "uses": "noop"},
            {
                "name": "b",
                "uses": "llm",
                "depends_on": ["a"],
                "with": {"prompt": "hi", "simulate": {"errors": ["overloaded"]}},
            },
        ),
    )

    assert deliver(runtime, publisher.sent.pop(0)) == "succeeded"

    [(step, task_id, countdown)] = local.resent
    assert step == "b"
    assert countdown >= 0
    assert task_id == runtime.store.run_fields(run_id)["s:b:task"]
    assert step_status(runtime, run_id, "b") == "queued"


def test_a_carrier_whose_step_failed_for_good_runs_the_kept_child_first_then_raises_step_failed() -> None:
    runtime, publisher, _ = local_runtime()
    run_id = start(
        runtime,
        publisher,
        workflow(
            {"name": "a", "uses": "llm", "with": {"prompt": "hi", "simulate": {"errors": ["bad_request"]}}},
            {"name": "cleanup", "uses": "noop", "depends_on": ["a"], "trigger_rule": "all_done"},
        ),
    )

    with pytest.raises(StepFailed):
        deliver(runtime, publisher.sent.pop(0), raise_failure=True)

    assert step_status(runtime, run_id, "cleanup") == "succeeded"
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED


def test_stopping_a_run_interrupts_a_local_step_through_the_message_that_carries_it(redis_client: redis.Redis) -> None:
    store = RedisStateStore(redis_client, retention_s=60)
    spec = parse_workflow(chain("a", "b"))
    run_id = uuid.uuid4().hex
    store.save_definition(spec)
    assert store.create_run(run_id, spec, {}, None)
    root = Attempt(run_id, "a", "1", "carrier-task")
    store.claim(root, lease_s=30, upstream=(), children=("b",))
    finished = store.finish(root, StepOutcome.SUCCEEDED, output=None, children=("b",))
    child = Attempt(run_id, "b", "1", finished.task_ids["b"])
    store.claim(child, lease_s=30, upstream=("a",), children=(), carrier="carrier-task")

    result = store.stop(run_id, RunStatus.CANCELLED, "test", tuple(spec.steps_by_name))

    assert {task for _, task in result.interrupted} == {child.task_id, "carrier-task"}


def test_a_wide_fan_out_offers_its_finish_only_the_first_few_children_to_keep() -> None:
    runtime, publisher, _ = local_runtime()
    names = [f"x{i}" for i in range(MAX_CANDIDATES + 5)]
    start(
        runtime,
        publisher,
        workflow({"name": "a", "uses": "noop"}, *({"name": n, "uses": "noop", "depends_on": ["a"]} for n in names)),
    )
    offered: list[tuple[str, ...]] = []
    real_finish = runtime.store.finish

    def finish(attempt: Attempt, *args: object, **kwargs: Any) -> FinishResult:
        keep = kwargs.get("keep")
        offered.append(tuple(c.step for c in keep.candidates) if keep is not None else ())
        return real_finish(attempt, *args, **kwargs)  # type: ignore[arg-type]

    runtime.store.finish = finish  # type: ignore[method-assign]

    deliver(runtime, publisher.sent.pop(0))

    assert offered[0] == tuple(names[:MAX_CANDIDATES])
    assert [m.step for m in publisher.sent] == names[1:], "the first is kept, the others are published"


# -- several kept children: the first in the slot, the others in the worker's other threads --------------------------


def fan_out(*children: dict[str, Any]) -> dict[str, object]:
    return workflow({"name": "a", "uses": "noop"}, *({"depends_on": ["a"], **c} for c in children))


NOOPS = tuple({"name": n, "uses": "noop"} for n in ("x", "y", "z"))


def test_a_finish_keeps_as_many_children_as_the_worker_has_spare_threads_and_hands_them_over_claimed() -> None:
    runtime, publisher, local = local_runtime(threads=2)
    run_id = start(runtime, publisher, fan_out(*NOOPS))
    separately: list[str] = []
    real_claim = runtime.store.claim

    def claim(attempt: Attempt, *args: object, **kwargs: object) -> object:
        separately.append(attempt.step)
        return real_claim(attempt, *args, **kwargs)  # type: ignore[arg-type]

    runtime.store.claim = claim  # type: ignore[method-assign]

    deliver(runtime, publisher.sent.pop(0))

    assert publisher.sent == [], "no message for any of the three"
    assert step_status(runtime, run_id, "x") == "succeeded", "the first ran in the slot"
    assert len(local.jobs) == 2
    assert [step_status(runtime, run_id, s) for s in ("y", "z")] == ["running", "running"], "claimed by the finish"
    local.run_jobs()
    assert separately == ["a"], "the finish claimed every child"
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED
    assert sorted(step for kind, step, _ in local.announced if kind == "started") == ["x", "y", "z"]
    assert sorted(step for kind, step, _ in local.announced if kind == "ended") == ["x", "y", "z"]
    seqs = [event.seq for event in runtime.store.events(run_id)]
    assert seqs == list(range(1, len(seqs) + 1)), "the run's events stay gapless"


def test_a_worker_with_fewer_spare_threads_than_children_keeps_that_many_and_publishes_the_rest() -> None:
    runtime, publisher, local = local_runtime(threads=1)
    run_id = start(runtime, publisher, fan_out(*NOOPS))

    deliver(runtime, publisher.sent.pop(0))

    assert [m.step for m in publisher.sent] == ["z"]
    assert len(local.jobs) == 1
    local.run_jobs()
    drive(runtime, publisher)
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED


def test_a_worker_with_no_spare_thread_keeps_one_child_as_before() -> None:
    runtime, publisher, local = local_runtime(threads=0)
    start(runtime, publisher, fan_out(*NOOPS))

    deliver(runtime, publisher.sent.pop(0))

    assert [m.step for m in publisher.sent] == ["y", "z"]
    assert local.jobs == []


def test_a_handed_over_child_is_held_in_the_lease_keeper_from_its_claim_until_it_has_run() -> None:
    runtime, publisher, local = local_runtime(threads=1)
    run_id = start(runtime, publisher, fan_out(*NOOPS[:2]))
    before = time.monotonic()

    deliver(runtime, publisher.sent.pop(0))

    [(held, since)] = [(a, t) for a, t in runtime.leases._active.items() if a.step == "y"]
    assert held.task_id == runtime.store.run_fields(run_id)["s:y:task"]
    assert before <= since <= time.monotonic(), "its lease is counted from the finish that claimed it"
    local.run_jobs()
    assert runtime.leases._active == {}, "released once it ran"
    assert step_status(runtime, run_id, "y") == "succeeded"


def test_a_handed_over_child_keeps_its_own_children_and_hands_on_more() -> None:
    runtime, publisher, local = local_runtime(threads=4)
    run_id = start(
        runtime,
        publisher,
        workflow(
            {"name": "a", "uses": "noop"},
            {"name": "x", "uses": "noop", "depends_on": ["a"]},
            {"name": "y", "uses": "noop", "depends_on": ["a"]},
            *({"name": n, "uses": "noop", "depends_on": ["y"]} for n in ("y1", "y2")),
        ),
    )

    deliver(runtime, publisher.sent.pop(0))
    local.run_jobs()

    assert publisher.sent == []
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED
    assert sorted(step for kind, step, _ in local.announced if kind == "ended") == ["x", "y", "y1", "y2"]


def test_a_child_the_worker_cannot_hand_over_runs_in_the_slot_instead() -> None:
    runtime, publisher, local = local_runtime(threads=2)
    local.refuse_spawn = True
    run_id = start(runtime, publisher, fan_out(*NOOPS))

    deliver(runtime, publisher.sent.pop(0))

    assert publisher.sent == []
    assert run_status(runtime, run_id) == RunStatus.SUCCEEDED


def test_a_handed_over_child_that_must_retry_is_resent_as_its_own_message() -> None:
    runtime, publisher, local = local_runtime(threads=1)
    overloaded = {"prompt": "hi", "simulate": {"errors": ["overloaded"]}}
    run_id = start(
        runtime, publisher, fan_out({"name": "x", "uses": "noop"}, {"name": "y", "uses": "llm", "with": overloaded})
    )

    deliver(runtime, publisher.sent.pop(0))
    local.run_jobs()

    [(step, task_id, _)] = local.resent
    assert (step, task_id) == ("y", runtime.store.run_fields(run_id)["s:y:task"])
    assert step_status(runtime, run_id, "y") == "queued"
    assert runtime.leases._active == {}


def test_a_handed_over_child_that_breaks_its_thread_is_logged_and_left_to_its_lease(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime, publisher, local = local_runtime(threads=1)
    run_id = start(runtime, publisher, fan_out(*NOOPS[:2]))
    deliver(runtime, publisher.sent.pop(0))
    real_started = local.started

    def broken(spec: WorkflowSpec, attempt: Attempt, delivery: Delivery) -> None:
        if attempt.step == "y":
            raise RuntimeError("events lost")
        real_started(spec, attempt, delivery)

    local.started = broken  # type: ignore[method-assign]

    with caplog.at_level(logging.ERROR):
        local.run_jobs()  # a pool thread's job: it must not raise

    assert "events lost" in caplog.text
    assert step_status(runtime, run_id, "y") == "running", "left to its lease: the sweeper sends it again"
    assert runtime.leases._active == {}
