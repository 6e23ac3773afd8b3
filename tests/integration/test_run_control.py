"""Resume, conditions and trigger rules, timeouts and cancellation: real workers, real Redis."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis

from orchestrator import Client
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.errors import RunStateError, WorkflowDefinitionError
from orchestrator.state import keys
from tests.integration.helpers import held_by_workers, llm, py, ts, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def calls(r: redis.Redis, run_id: str, step: str) -> int:
    return int(r.get(f"test:calls:{run_id}:{step}") or 0)


def _drained(client: Client, r: redis.Redis, run_id: str) -> bool:
    # Every message of the run was consumed and acknowledged (late acks: only after its task returned): none queued,
    # none held by a worker.
    queued = r.lrange("cpu", 0, -1) + r.lrange("llm", 0, -1)
    return not any(run_id in message for message in queued) and not held_by_workers(client.app, run_id)


# -- resume -----------------------------------------------------------------------------------------------------


def test_resume_after_a_permanent_failure_reruns_only_what_did_not_succeed(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    spec = workflow(
        f"resume_{unique}",
        py("a", "tests.count_calls"),
        py("b", "tests.count_calls", "a"),
        py("c", "tests.gate", "b"),
        py("d", "tests.count_calls", "c"),
    )
    run_id = client.submit(spec)
    failed = client.wait(run_id, timeout=30)
    assert failed["status"] == "failed"
    assert failed["steps"]["d"]["status"] == "upstream_failed"

    redis_client.set(f"test:fixed:{run_id}", 1)
    assert client.resume(run_id) == "2"
    view = client.wait(run_id, timeout=30)

    assert view["status"] == "succeeded"
    assert view["generation"] == 2
    assert (calls(redis_client, run_id, "a"), calls(redis_client, run_id, "b")) == (1, 1)
    assert calls(redis_client, run_id, "c") == 2
    assert calls(redis_client, run_id, "d") == 1
    assert view["steps"]["a"]["output"] == failed["steps"]["a"]["output"]


def test_resume_from_a_middle_step_reruns_it_and_only_its_descendants(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    # Diamond a → (b, c) → d. b's output changes on every call (a counter), so d must run again.
    spec = workflow(
        f"from_{unique}",
        py("a", "tests.count_calls"),
        py("b", "tests.count_calls", "a"),
        py("c", "tests.count_calls", "a"),
        py("d", "tests.count_calls", "b", "c"),
    )
    run_id = client.submit(spec)
    assert client.wait(run_id, timeout=30)["status"] == "succeeded"

    client.resume(run_id, from_step="b")
    view = client.wait(run_id, timeout=30)

    assert view["status"] == "succeeded"
    counts = {s: calls(redis_client, run_id, s) for s in "abcd"}
    assert counts == {"a": 1, "b": 2, "c": 1, "d": 2}
    assert view["steps"]["d"]["output"]["calls"] == 2


def test_a_reexecuted_step_with_unchanged_output_does_not_invalidate_its_dependents(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    spec = workflow(
        f"cutoff_{unique}",
        py("a", "tests.count_calls"),
        py("b", "tests.count_constant", "a"),
        py("c", "tests.count_calls", "b"),
        llm("summary", "b"),
    )
    run_id = client.submit(spec)
    before = client.wait(run_id, timeout=30)

    client.resume(run_id, from_step="b")
    view = client.wait(run_id, timeout=30)

    assert view["status"] == "succeeded"
    assert calls(redis_client, run_id, "b") == 2
    assert calls(redis_client, run_id, "c") == 1, "c's inputs did not change: its stored result is reused"
    assert view["steps"]["c"]["cached"] is True
    assert view["steps"]["summary"]["cached"] is True
    assert view["steps"]["summary"]["output"] == before["steps"]["summary"]["output"]
    assert view["steps"]["b"]["cached"] is False


def test_a_non_deterministic_step_always_reruns_when_invalidated(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    b = {**py("b", "tests.count_constant", "a"), "cache": False}
    spec = workflow(f"nocache_{unique}", py("a", "tests.count_constant"), b, py("c", "tests.count_calls", "b"))
    run_id = client.submit(spec)
    client.wait(run_id, timeout=30)

    client.resume(run_id, from_step="a")
    view = client.wait(run_id, timeout=30)

    assert view["status"] == "succeeded"
    assert calls(redis_client, run_id, "a") == 2
    assert calls(redis_client, run_id, "b") == 2, "cache: false always re-runs"
    assert calls(redis_client, run_id, "c") == 1, "b's output did not change"


def test_resume_is_refused_while_running_and_when_there_is_nothing_to_do(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    run_id = client.submit(workflow(f"refuse_{unique}", py("slow", "tests.sleep", seconds=1.0)))
    with pytest.raises(RunStateError, match="running"):
        client.resume(run_id)
    client.wait(run_id, timeout=30)
    with pytest.raises(RunStateError, match="nothing to resume"):
        client.resume(run_id)
    with pytest.raises(WorkflowDefinitionError, match="no step 'nope'"):
        client.resume(run_id, from_step="nope")


def test_of_two_concurrent_resumes_exactly_one_wins(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    run_id = client.submit(workflow(f"race_{unique}", py("a", "tests.count_calls"), py("g", "tests.gate", "a")))
    client.wait(run_id, timeout=30)
    redis_client.set(f"test:fixed:{run_id}", 1)
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def resume() -> None:
        barrier.wait()
        try:
            outcomes.append(client.resume(run_id))
        except RunStateError as exc:
            outcomes.append(f"refused: {exc}")

    threads = [threading.Thread(target=resume) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(o[:8] for o in outcomes) == ["2", "refused:"]
    assert client.wait(run_id, timeout=30)["status"] == "succeeded"
    assert calls(redis_client, run_id, "g") == 2


def test_a_late_message_from_the_previous_generation_changes_nothing(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    spec = client.resolve(workflow(f"late_{unique}", py("a", "tests.count_calls"), py("g", "tests.gate", "a")))
    run_id = client.submit(spec)
    client.wait(run_id, timeout=30)
    redis_client.set(f"test:fixed:{run_id}", 1)
    client.resume(run_id)
    client.wait(run_id, timeout=30)

    client.publisher.publish(spec, run_id=run_id, steps=["a", "g"], generation="1")
    wait_for(lambda: _drained(client, redis_client, run_id), what="the late messages to be consumed")

    view = client.status(run_id)
    assert view["status"] == "succeeded"
    assert calls(redis_client, run_id, "a") == 1
    assert calls(redis_client, run_id, "g") == 2


# -- conditions and trigger rules ---------------------------------------------------------------------------------


def test_a_python_condition_on_the_context_decides_whether_a_step_runs(client: Client, workers: LocalWorkers) -> None:
    view = client.wait(client.submit("tests_conditional"), timeout=30)

    steps = view["steps"]
    assert view["status"] == "succeeded"
    assert steps["quality_check"]["status"] == "succeeded"
    assert steps["quality_check_short"]["status"] == "skipped"
    assert steps["quality_check_short"]["attempts"] == 1
    assert steps["publish_short"]["status"] == "skipped"
    assert steps["publish_anyway"]["status"] == "succeeded"


def _rules_workflow(name: str) -> dict[str, Any]:
    def noop(step: str, *deps: str, rule: str = "all_success", **extra: Any) -> dict[str, Any]:
        return {"name": step, "uses": "noop", "depends_on": list(deps), "trigger_rule": rule, **extra}

    return workflow(
        name,
        py("ok", "tests.count_calls"),
        noop("skip_me", "ok", condition="steps.ok.output.calls > 5"),
        noop("run_me", "ok", condition="steps.ok.output.calls == 1 and inputs.topic == 'tests'"),
        py("broken", "tests.fail", "ok"),
        noop("skip_all_success", "skip_me"),
        noop("skip_none_failed", "skip_me", rule="none_failed"),
        noop("skip_all_done", "skip_me", rule="all_done"),
        noop("skip_one_success", "skip_me", "run_me", rule="one_success"),
        noop("fail_all_success", "broken"),
        noop("fail_all_done", "broken", rule="all_done"),
        noop("fail_none_failed", "broken", rule="none_failed"),
        noop("fail_one_success", "broken", "skip_me", rule="one_success"),
        noop("bad_condition", "ok", condition="steps.ok.output.missing > 1"),
    )


def test_conditions_and_trigger_rules_decide_every_dependent(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    view = client.wait(client.submit(_rules_workflow(f"rules_{unique}")), timeout=30)

    status = {name: step["status"] for name, step in view["steps"].items()}
    assert status == {
        "ok": "succeeded",
        "skip_me": "skipped",
        "run_me": "succeeded",
        "broken": "failed",
        "skip_all_success": "skipped",
        "skip_none_failed": "succeeded",
        "skip_all_done": "succeeded",
        "skip_one_success": "succeeded",
        "fail_all_success": "upstream_failed",
        "fail_all_done": "succeeded",
        "fail_none_failed": "upstream_failed",
        "fail_one_success": "upstream_failed",
        "bad_condition": "failed",
    }
    error = view["steps"]["bad_condition"]["error"]
    assert error["type"] == "condition_error"
    assert "missing" in error["message"]
    assert view["status"] == "failed"


# -- cancellation and timeouts ------------------------------------------------------------------------------------


def test_cancel_during_a_fan_out_starts_nothing_afterwards_and_keeps_finished_outputs(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    spec = workflow(
        f"cancel_{unique}",
        py("root", "tests.count_calls"),
        *(py(f"branch{i}", "tests.sleep", "root", seconds=1.5) for i in range(8)),
        py("join", "tests.count_calls", *(f"branch{i}" for i in range(8))),
    )
    run_id = client.submit(spec)
    wait_for(
        lambda: any(s["status"] == "running" for n, s in client.status(run_id)["steps"].items() if n != "root"),
        what="the fan-out to start",
    )

    outcome = client.cancel(run_id)
    wait_for(lambda: _drained(client, redis_client, run_id), timeout=60, what="every message to be consumed")

    view = client.status(run_id)
    stopped = ts(view["stopped_at"])
    assert outcome["cancelled"] is True
    assert view["status"] == "cancelled"
    assert view["steps"]["root"]["status"] == "succeeded"
    assert view["steps"]["root"]["output"]["calls"] == 1
    for name, step in view["steps"].items():
        assert step["started_at"] is None or ts(step["started_at"]) < stopped, f"{name} started after cancel"
        assert step["status"] in {"succeeded", "cancelled"}, name
    assert view["steps"]["join"]["status"] == "cancelled"
    assert calls(redis_client, run_id, "join") == 0
    assert any(s["started_at"] is None for s in view["steps"].values()), "8 branches > 4 slots: some never started"


def test_cancelling_twice_is_harmless_and_a_finished_run_says_so(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    run_id = client.submit(workflow(f"cancel2_{unique}", py("slow", "tests.sleep", seconds=3.0)))
    assert client.cancel(run_id)["cancelled"] is True
    again = client.cancel(run_id)
    assert again["cancelled"] is False
    assert "already ended (cancelled)" in again["message"]

    done = client.submit(workflow(f"cancel3_{unique}", py("quick", "tests.sleep")))
    client.wait(done, timeout=30)
    assert "already ended (succeeded)" in client.cancel(done)["message"]


def test_a_cancelled_run_can_be_resumed_and_keeps_what_finished(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    spec = workflow(
        f"cancel_resume_{unique}",
        py("a", "tests.count_calls"),
        py("slow", "tests.report_pid_then_sleep", "a", seconds=2.0),
        py("c", "tests.count_calls", "slow"),
    )
    run_id = client.submit(spec)
    wait_for(lambda: redis_client.llen(f"test:pids:{run_id}:slow") > 0, what="slow to start")
    client.cancel(run_id)

    client.resume(run_id)
    view = client.wait(run_id, timeout=60)

    assert view["status"] == "succeeded"
    assert calls(redis_client, run_id, "a") == 1
    assert calls(redis_client, run_id, "c") == 1


def test_a_workflow_deadline_interrupts_a_long_step_and_times_the_run_out(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    spec = workflow(
        f"deadline_{unique}",
        py("long", "tests.report_pid_then_sleep", seconds=30.0),
        py("after", "tests.count_calls", "long"),
        timeout_s=1.5,
    )
    run_id = client.submit(spec)
    view = client.wait(run_id, timeout=30)

    assert view["status"] == "timed_out"
    assert view["steps"]["long"]["status"] == "cancelled"
    assert view["steps"]["after"]["status"] == "cancelled"
    assert ts(view["finished_at"]) - ts(view["created_at"]) < 10
    assert calls(redis_client, run_id, "after") == 0


def test_a_step_timeout_is_retried_unless_the_step_says_otherwise(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    retried = {
        **py("slow", "tests.sleep", seconds=5.0),
        "timeout_s": 0.5,
        "retry": {"max_attempts": 2, "backoff_s": 0.1},
    }
    once = {
        **py("slow_once", "tests.sleep", seconds=5.0),
        "timeout_s": 0.5,
        "retry": {"max_attempts": 3, "retry_timeouts": False},
    }
    view = client.wait(client.submit(workflow(f"steptimeout_{unique}", retried, once)), timeout=60)

    assert view["steps"]["slow"]["status"] == "failed"
    assert [e["type"] for e in view["steps"]["slow"]["errors"]] == ["timeout", "timeout"]
    assert view["steps"]["slow_once"]["attempts"] == 1
    assert view["steps"]["slow_once"]["error"]["type"] == "timeout"


def test_a_deadline_that_passed_while_no_worker_ran_fires_when_one_starts(unique: str) -> None:
    from orchestrator import Settings
    from orchestrator.dev.redis_server import RedisServer
    from tests.conftest import WORKER_ENV

    with RedisServer() as server:
        settings = Settings.from_env({"REDIS_URL": server.url, **WORKER_ENV})
        client = Client(settings)
        run_id = client.submit(workflow(f"nobody_{unique}", py("work", "tests.sleep"), timeout_s=0.5))
        deadline = ts(client.status(run_id)["created_at"]) + 0.5
        raw = redis.Redis.from_url(server.url)
        wait_for(lambda: float(raw.time()[0]) > deadline + 1, what="the deadline to pass")
        assert client.status(run_id)["status"] == "running", "no worker ran: nothing could fire it"

        with LocalWorkers(client.app, count=1, env={"REDIS_URL": server.url, **WORKER_ENV}):
            view = client.wait(run_id, timeout=30)

    assert view["status"] == "timed_out"
    assert view["steps"]["work"]["status"] == "cancelled"
    assert view["steps"]["work"]["started_at"] is None


def test_cancel_while_steps_are_being_released_leaves_no_step_behind(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    # A wide, fast DAG: cancellation lands while finishing steps release their children.
    layers = [[py(f"l0_{i}", "tests.count_calls") for i in range(6)]]
    for depth in range(1, 5):
        layers.append(
            [
                py(f"l{depth}_{i}", "tests.count_calls", f"l{depth - 1}_{i}", f"l{depth - 1}_{(i + 1) % 6}")
                for i in range(6)
            ]
        )
    run_id = client.submit(workflow(f"release_race_{unique}", *(s for layer in layers for s in layer)))
    wait_for(lambda: any(s["status"] == "succeeded" for s in client.status(run_id)["steps"].values()), what="progress")
    client.cancel(run_id)
    wait_for(lambda: _drained(client, redis_client, run_id), timeout=60, what="every message to be consumed")

    view = client.status(run_id)
    stopped = ts(view["stopped_at"])
    assert view["status"] == "cancelled"
    for name, step in view["steps"].items():
        assert step["status"] in {"succeeded", "cancelled"}, f"{name} left {step['status']}"
        assert step["started_at"] is None or ts(step["started_at"]) < stopped, f"{name} started after cancel"
        if step["status"] == "cancelled":
            assert calls(redis_client, run_id, name) <= 1
    # No attempt's lease is left behind. Dispatch holds of steps no worker claimed may be (the cancel cannot know the
    # task ids their messages carried): the sweeper drops each once it falls due, without sending anything.
    left = [m for m in redis_client.zrange("orch:leases", 0, -1) if m.startswith(run_id)]
    for member in left:
        _, step, _ = keys.parse_lease_member(member)
        assert view["steps"][step]["status"] == "cancelled", member
        assert client.store.reclaim(member, "t-sweep", {"type": "worker_lost"}, grace_s=60) is None
    assert not [m for m in redis_client.zrange("orch:leases", 0, -1) if m.startswith(run_id)]


# -- progress ---------------------------------------------------------------------------------------------------


def test_a_progress_listener_sees_the_whole_run_in_order_and_its_bugs_never_harm_it(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    from orchestrator.engine.events import Event, ProgressListener

    class Listener(ProgressListener):
        def __init__(self) -> None:
            self.seen: list[tuple[int, str, str | None]] = []

        def on_event(self, event: Event) -> None:
            self.seen.append((event.seq, event.type, event.step))

        def on_step_start(self, event: Event) -> None:
            raise RuntimeError("a bug in the listener")

    spec = workflow(
        f"listen_{unique}",
        py("a", "tests.count_calls"),
        llm("b", "a", errors=("overloaded",), retry={"backoff_s": 0.05}),
        py("c", "tests.count_calls", "a"),
    )
    run_id = client.submit(spec)
    listener = Listener()
    final = client.watch(run_id, listener)

    assert final["status"] == "succeeded"
    assert [seq for seq, _, _ in listener.seen] == list(range(1, len(listener.seen) + 1))
    assert listener.seen[0][1:] == ("run_started", None)
    assert listener.seen[-1][1:] == ("run_succeeded", None)
    assert ("step_retry", "b") in [(t, s) for _, t, s in listener.seen]
    assert [(t, s) for _, t, s in listener.seen].count(("step_started", "b")) == 2
    # Reconnecting after any seq yields exactly the rest.
    middle = listener.seen[len(listener.seen) // 2][0]
    assert [e.seq for e in client.stream(run_id, after=middle)] == [s for s, _, _ in listener.seen if s > middle]
