"""Repeated steps (``repeat:``): validation of files, and the loop against the in-memory store, without Celery.

The engine helpers of ``test_engine_attempt`` stand in for the broker: what the engine publishes is delivered one
message at a time, the way workers would take them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.definition.registry import FunctionRegistry
from orchestrator.definition.repeat import RepeatSpec
from orchestrator.definition.spec import parse_workflow
from orchestrator.definition.validation import check_workflow
from orchestrator.definition.workflow import NoopStep, PythonStep, Workflow
from orchestrator.domain import Attempt, IterationCheckpoint, RunStatus
from orchestrator.engine.control import resume_run, stop_run
from orchestrator.engine.repeat import continued_from
from orchestrator.engine.runtime import Runtime
from orchestrator.engine.status import RunView, run_view
from orchestrator.engine.steps import StepContext
from orchestrator.engine.sweep import sweep_once
from orchestrator.errors import NonRetryableStepError, RetryableStepError, WorkflowDefinitionError
from orchestrator.llm.base import LLMRequest
from orchestrator.llm.cache import request_digest
from orchestrator.state import MemoryStateStore
from tests.unit.test_engine_attempt import SETTINGS, deliver, drive, make_runtime, start, workflow
from tests.unit.test_state_contract import FakeClock

pytestmark = pytest.mark.timeout(30)


# -- validation (files) --------------------------------------------------------------------------------------------

LOOP_FILE = """
name: loop
steps:
  - name: research
    uses: noop
  - name: refine
    uses: llm
    depends_on: [research]
    repeat: {REPEAT}
    with: {{prompt: "Revise {{{{ previous.text if previous else '' }}}} ({{{{ iteration }}}})"}}
"""


def validate(tmp_path: Path, repeat: str) -> tuple[int, str]:
    path = tmp_path / "loop.yaml"
    path.write_text(LOOP_FILE.format(REPEAT=repeat))
    result = CliRunner().invoke(main, ["validate", str(path)])
    return result.exit_code, result.output


def test_a_loop_in_a_file_that_reads_previous_and_iteration_and_stops_on_output_validates(tmp_path: Path) -> None:
    code, output = validate(tmp_path, '{until: "output.word_count > 3 and iteration >= 2", max_iterations: 4}')

    assert code == 0, output
    assert output.startswith("ok: loop")


@pytest.mark.parametrize(
    ("repeat", "expected"),
    [
        ('{until: "output.text"}', "repeat.max_iterations: Field required"),
        ('{until: "output.text", max_iterations: 0}', "greater than or equal to 1"),
        ('{until: "output.text", max_iterations: 100000}', "less than or equal to 100"),
        ("{max_iterations: 3}", "give until (an expression) or until_function"),
        ('{until: "output.text", max_iterations: 3, on_exhausted: retry}', "'succeed' or 'fail'"),
        ('{until: "config.items", max_iterations: 3}', "repeat.until refers to 'config'"),
        ('{until: "steps.later.output", max_iterations: 3}', "repeat.until reads steps.later"),
        ('{until: "output.text.upper()", max_iterations: 3}', "repeat.until may not call functions"),
        ('{until: "output.__class__", max_iterations: 3}', "private attribute"),
        ('{until: "output.text ==", max_iterations: 3}', "repeat.until does not parse"),
    ],
)
def test_a_bad_repeat_in_a_file_is_one_error_line_naming_the_step(tmp_path: Path, repeat: str, expected: str) -> None:
    code, output = validate(tmp_path, repeat)

    assert code != 0
    assert expected in output
    assert "'refine'" in output
    assert len(output.strip().splitlines()) == 1, output


def test_repeat_is_refused_on_an_approval_step() -> None:
    with pytest.raises(WorkflowDefinitionError, match="step 'gate': repeat is not supported on approval steps"):
        parse_workflow(
            workflow(
                {
                    "name": "gate",
                    "uses": "approval",
                    "with": {"approvers": ["alice"]},
                    "repeat": {"until": "output", "max_iterations": 2},
                }
            )
        )


def test_only_a_repeated_step_may_read_previous_and_iteration_in_its_templates() -> None:
    prompt = {"prompt": "Revise {{ previous.text }} ({{ iteration }})"}
    plain = parse_workflow(workflow({"name": "once", "uses": "llm", "with": prompt}))
    looped = parse_workflow(
        workflow({"name": "loop", "uses": "llm", "with": prompt, "repeat": {"until": "true", "max_iterations": 2}})
    )

    with pytest.raises(WorkflowDefinitionError, match="template refers to 'iteration'"):
        check_workflow(plain)
    check_workflow(looped)


# -- the loop ------------------------------------------------------------------------------------------------------


class WorkerDied(BaseException):
    """Stands in for a worker process killed mid-iteration: nothing of the attempt's own handling runs."""


def counting_registry(script: dict[int, list[BaseException]] | None = None) -> tuple[FunctionRegistry, Counter[int]]:
    """A ``grow`` function that appends its iteration to ``previous``; ``script[i]`` are failures of iteration i."""
    registry = FunctionRegistry()
    calls: Counter[int] = Counter()
    pending = {i: list(errors) for i, errors in (script or {}).items()}

    def grow(ctx: StepContext) -> dict[str, Any]:
        assert ctx.iteration is not None
        calls[ctx.iteration] += 1
        if pending.get(ctx.iteration):
            raise pending[ctx.iteration].pop(0)
        seen = (ctx.previous or {"seen": []})["seen"]
        return {"seen": [*seen, ctx.iteration], "n": ctx.iteration}

    registry.register(grow, "grow")
    return registry, calls


def looping(until: str = "output.n >= 3", max_iterations: int = 5, **repeat: Any) -> dict[str, Any]:
    return workflow(
        {
            "name": "loop",
            "uses": "python",
            "with": {"function": "grow"},
            "retry": {"max_attempts": 3, "backoff_s": 0},
            "repeat": {"until": until, "max_iterations": max_iterations, **repeat},
        },
        {"name": "after", "uses": "noop", "depends_on": ["loop"]},
    )


def test_a_loop_runs_until_its_condition_holds_each_iteration_seeing_the_previous_output() -> None:
    registry, calls = counting_registry()
    runtime, publisher = make_runtime()
    runtime.executor.functions = registry
    run_id = start(runtime, publisher, looping())

    assert drive(runtime, publisher) == ["succeeded", "succeeded"]

    view = view_of(runtime, run_id)
    step = view["steps"]["loop"]
    assert view["status"] == RunStatus.SUCCEEDED
    assert step["output"] == {"seen": [1, 2, 3], "n": 3}
    assert (step["iterations"], step["until_met"], step["attempts"]) == (3, True, 1)
    assert calls == Counter({1: 1, 2: 1, 3: 1})


def test_each_finished_iteration_is_told_by_an_event_before_the_step_succeeds() -> None:
    registry, _ = counting_registry()
    runtime, publisher = make_runtime()
    runtime.executor.functions = registry
    run_id = start(runtime, publisher, looping())
    drive(runtime, publisher)

    told = [(e.type, e.data) for e in runtime.store.events(run_id) if e.step == "loop"]

    assert told[-4:] == [
        ("step_iteration", {"iteration": 1, "until_met": False}),
        ("step_iteration", {"iteration": 2, "until_met": False}),
        ("step_iteration", {"iteration": 3, "until_met": True}),
        ("step_succeeded", {}),
    ]


def test_a_loop_that_runs_out_of_iterations_succeeds_with_until_not_met() -> None:
    registry, calls = counting_registry()
    runtime, publisher = make_runtime()
    runtime.executor.functions = registry
    run_id = start(runtime, publisher, looping(until="output.n > 10", max_iterations=4))

    drive(runtime, publisher)

    step = view_of(runtime, run_id)["steps"]["loop"]
    assert step["status"] == "succeeded"
    assert (step["iterations"], step["until_met"], step["output"]["n"]) == (4, False, 4)
    assert sum(calls.values()) == 4


def test_a_loop_that_runs_out_with_on_exhausted_fail_fails_at_once_as_max_iterations() -> None:
    registry, calls = counting_registry()
    runtime, publisher = make_runtime()
    runtime.executor.functions = registry
    run_id = start(runtime, publisher, looping(until="output.n > 10", max_iterations=2, on_exhausted="fail"))

    assert drive(runtime, publisher) == ["failed", "upstream_failed"]

    view = view_of(runtime, run_id)
    step = view["steps"]["loop"]
    assert step["error"] is not None
    assert (step["error"]["type"], step["error"]["retryable"]) == ("max_iterations", False)
    assert (step["attempts"], step["iterations"], step["until_met"]) == (1, 2, False)
    assert "max_iterations" in (view["error"] or "")
    assert sum(calls.values()) == 2


def test_a_failed_iteration_is_retried_as_an_attempt_and_continues_from_the_last_checkpoint() -> None:
    registry, calls = counting_registry({3: [RetryableStepError("flaky", kind="server_error")]})
    runtime, publisher = make_runtime()
    runtime.executor.functions = registry
    run_id = start(runtime, publisher, looping(until="output.n >= 4"))

    assert drive(runtime, publisher) == ["retry", "succeeded", "succeeded"]

    step = view_of(runtime, run_id)["steps"]["loop"]
    assert (step["attempts"], step["iterations"], step["output"]["seen"]) == (2, 4, [1, 2, 3, 4])
    assert calls == Counter({1: 1, 2: 1, 3: 2, 4: 1})


def test_a_worker_lost_mid_iteration_is_replaced_by_one_that_continues_after_the_last_checkpoint() -> None:
    clock = FakeClock()
    registry, calls = counting_registry({3: [WorkerDied()]})
    runtime, publisher = make_runtime(MemoryStateStore(clock=clock))
    runtime.executor.functions = registry
    run_id = start(runtime, publisher, looping(until="output.n >= 4"))

    with pytest.raises(WorkerDied):
        deliver(runtime, publisher.sent.pop(0))
    clock.advance(SETTINGS.lease_s + 1)
    assert sweep_once(runtime, "sweeper") == 1
    drive(runtime, publisher)

    step = view_of(runtime, run_id)["steps"]["loop"]
    assert step["status"] == "succeeded"
    assert step["output"]["seen"] == [1, 2, 3, 4]
    assert calls == Counter({1: 1, 2: 1, 3: 2, 4: 1})


def test_resuming_a_failed_loop_continues_from_its_last_checkpoint() -> None:
    registry, calls = counting_registry({3: [NonRetryableStepError("bad draft", kind="refused")]})
    runtime, publisher = make_runtime()
    runtime.executor.functions = registry
    run_id = start(runtime, publisher, looping(until="output.n >= 4"))
    drive(runtime, publisher)
    assert view_of(runtime, run_id)["steps"]["loop"]["iterations"] == 2

    resume_run(publisher, SETTINGS, runtime.store, run_id)
    drive(runtime, publisher)

    step = view_of(runtime, run_id)["steps"]["loop"]
    assert (step["status"], step["output"]["seen"], step["iterations"]) == ("succeeded", [1, 2, 3, 4], 4)
    assert calls == Counter({1: 1, 2: 1, 3: 2, 4: 1})


def test_resuming_from_the_repeated_step_runs_its_loop_afresh() -> None:
    registry, calls = counting_registry()
    runtime, publisher = make_runtime()
    runtime.executor.functions = registry
    run_id = start(runtime, publisher, looping())
    drive(runtime, publisher)

    resume_run(publisher, SETTINGS, runtime.store, run_id, from_step="loop")
    drive(runtime, publisher)

    step = view_of(runtime, run_id)["steps"]["loop"]
    assert (step["status"], step["output"]["seen"], step["iterations"]) == ("succeeded", [1, 2, 3], 3)
    assert calls == Counter({1: 2, 2: 2, 3: 2})


def test_a_noop_step_can_repeat_on_its_iteration_number() -> None:
    runtime, publisher = make_runtime()
    spec = workflow({"name": "tick", "uses": "noop", "repeat": {"until": "iteration == 2", "max_iterations": 9}})
    run_id = start(runtime, publisher, spec)

    drive(runtime, publisher)

    step = view_of(runtime, run_id)["steps"]["tick"]
    assert (step["status"], step["iterations"], step["until_met"]) == ("succeeded", 2, True)


def test_an_llm_loop_renders_each_iteration_from_the_previous_reply() -> None:
    runtime, publisher = make_runtime()
    spec = workflow(
        {
            "name": "draft",
            "uses": "llm",
            "with": {
                "prompt": "{% if previous %}CRITIQUE {{ previous.text }}{% else %}Draft about tides{% endif %}",
                "max_tokens": 40,
            },
            "repeat": {"until": "'CRITIQUE' in output.text", "max_iterations": 3},
        }
    )
    run_id = start(runtime, publisher, spec)

    drive(runtime, publisher)

    step = view_of(runtime, run_id)["steps"]["draft"]
    assert (step["status"], step["iterations"], step["until_met"]) == ("succeeded", 2, True)
    assert step["output"]["text"].startswith('Regarding "CRITIQUE Regarding')


def count_up(ctx: StepContext) -> dict[str, Any]:
    """A registered function for the Python workflow below: its output counts the iterations."""
    return {"n": ctx.iteration}


def test_a_python_workflow_can_stop_its_loop_with_a_callable_over_the_context() -> None:
    flow = Workflow(
        "callable_until",
        steps=[
            PythonStep(
                name="loop", fn=count_up, repeat={"until": lambda ctx: ctx.output["n"] >= 2, "max_iterations": 5}
            ),
            NoopStep(name="after", depends_on=["loop"]),
        ],
        registry=None,
    )
    runtime, publisher = make_runtime()
    run_id = start(runtime, publisher, flow.spec.to_json_dict())

    drive(runtime, publisher)

    step = view_of(runtime, run_id)["steps"]["loop"]
    assert flow.step("loop").repeat == RepeatSpec(until_function="callable_until.v1.loop.until", max_iterations=5)
    assert (step["iterations"], step["until_met"], step["output"]) == (2, True, {"n": 2})


# -- the rules, directly -------------------------------------------------------------------------------------------

REPEAT = RepeatSpec(until="output", max_iterations=4)


def checkpoint(iteration: int, *, key: str = "k", generation: str = "1", met: bool = False) -> IterationCheckpoint:
    return IterationCheckpoint(
        iteration=iteration, output={"n": iteration}, until_met=met, key=key, generation=generation
    )


@pytest.mark.parametrize(
    ("found", "force", "continues"),
    [
        (checkpoint(2), False, True),  # a retry or a lost worker in the same generation
        (checkpoint(2), True, True),  # … even in a generation a resume --from started
        (checkpoint(2, generation="0"), False, True),  # a resumed failed run
        (checkpoint(2, generation="0"), True, False),  # resume --from this step: afresh
        (checkpoint(2, key="other"), False, False),  # the step, its inputs or its parents' outputs changed
        (checkpoint(4, generation="0"), False, False),  # an earlier generation's finished loop is not reused
        (checkpoint(2, generation="0", met=True), False, False),
        (checkpoint(4), False, True),  # finished in this generation: the worker died before recording it
    ],
)
def test_a_new_attempt_continues_only_from_a_checkpoint_of_the_same_key_and_an_unfinished_or_own_loop(
    found: IterationCheckpoint, force: bool, continues: bool
) -> None:
    assert (continued_from(found, REPEAT, key="k", generation="1", force=force) is found) is continues


def test_each_iteration_has_its_own_reply_cache_key_and_a_plain_step_keeps_its_own() -> None:
    request = LLMRequest(model="m", prompt="same prompt")

    digests = {request_digest(request), request_digest(request, 1), request_digest(request, 2)}

    assert len(digests) == 3
    assert request_digest(request, 2) == request_digest(LLMRequest(model="m", prompt="same prompt"), 2)


def test_an_attempt_whose_run_was_cancelled_mid_loop_cannot_checkpoint_and_stops_looping() -> None:
    registry = FunctionRegistry()
    calls: Counter[int] = Counter()
    runtime, publisher = make_runtime()

    def cancel_in_second(ctx: StepContext) -> dict[str, Any]:
        assert ctx.iteration is not None
        calls[ctx.iteration] += 1
        if ctx.iteration == 2:
            stop_run(publisher, runtime.store, ctx.run_id, RunStatus.CANCELLED, "cancelled by a test")
        return {"n": ctx.iteration}

    registry.register(cancel_in_second, "grow")
    runtime.executor.functions = registry
    run_id = start(runtime, publisher, looping(until="output.n > 10", max_iterations=5))

    assert deliver(runtime, publisher.sent.pop(0)) == "stale attempt: not recorded"

    assert calls == Counter({1: 1, 2: 1})
    found = runtime.store.iteration_checkpoint(run_id, "loop")
    assert found is not None
    assert found.iteration == 1
    assert not runtime.store.record_iteration(Attempt(run_id, "loop", "1", "someone-else"), checkpoint(3))


def view_of(runtime: Runtime, run_id: str) -> RunView:
    fields = runtime.store.run_fields(run_id)
    return run_view(fields, runtime.store.load_definition(fields["def_hash"]))
