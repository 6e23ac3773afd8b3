"""Human approval steps: they hold no worker while waiting, only listed approvers decide, the first decision wins."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from orchestrator import Client, DecisionRefusedError
from orchestrator.dev.local_workers import LocalWorkers
from tests.integration.helpers import py, ts, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def approval(name: str, *deps: str, **params: Any) -> dict[str, Any]:
    extra = {k: params.pop(k) for k in ("trigger_rule", "condition") if k in params}
    with_ = {"approvers": ["alice", "carol"], "message": "Publish {{ inputs.topic }}?", **params}
    return {"name": name, "uses": "approval", "depends_on": list(deps), "with": with_, **extra}


def _waiting(client: Client, run_id: str, step: str) -> bool:
    return bool(client.status(run_id)["steps"][step]["status"] == "waiting")


def calls(r: redis.Redis, run_id: str, step: str) -> int:
    return int(r.get(f"test:calls:{run_id}:{step}") or 0)


def test_an_approved_step_releases_its_dependents_and_only_approvers_may_decide(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    spec = workflow(
        f"approve_{unique}",
        py("draft", "tests.count_calls"),
        approval("review", "draft"),
        py("publish", "tests.count_calls", "review"),
    )
    run_id = client.submit(spec)
    wait_for(lambda: _waiting(client, run_id, "review"), what="the review to wait")

    view = client.status(run_id)
    assert view["status"] == "waiting", "nothing else can move: the run waits, holding no worker"
    assert view["steps"]["review"]["approval"]["waiting_since"] is not None
    assert any(e.type == "step_waiting" and e.data["message"] == "Publish tests?" for e in client.store.events(run_id))
    with pytest.raises(DecisionRefusedError, match="may not decide") as refused:
        client.approve(run_id, "review", by="mallory", comment="let me in")
    assert refused.value.reason == "not_an_approver"

    record = client.approve(run_id, "review", by="alice", comment="ship it")
    view = client.wait(run_id, timeout=30)

    assert record == {"approved": True, "decision": "approve", "by": "alice", "comment": "ship it"}
    assert view["status"] == "succeeded"
    assert view["steps"]["review"]["output"]["by"] == "alice"
    assert calls(redis_client, run_id, "publish") == 1
    # Released within a second of the decision (Redis timestamps: decision time → publish started).
    decided = ts(view["steps"]["review"]["finished_at"])
    assert ts(view["steps"]["publish"]["started_at"]) - decided < 1.0
    with pytest.raises(DecisionRefusedError, match="not waiting") as late:
        client.reject(run_id, "review", by="carol")
    assert late.value.reason == "not_waiting"
    audit = client.status(run_id)["steps"]["review"]["approval"]["audit"]
    # Carol's late decision came after the run ended: refused, and no longer audited (the trail is bounded).
    assert [(a["by"], a["decision"], a["outcome"]) for a in audit] == [
        ("mallory", "approve", "refused: not an approver"),
        ("alice", "approve", "accepted"),
    ]


def test_a_rejection_fails_the_step_and_dependents_can_route_around_it(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    revise = {
        **py("revise", "tests.count_calls", "review"),
        "trigger_rule": "all_done",
        "condition": "steps.review.output.approved == false",
    }
    spec = workflow(f"reject_{unique}", approval("review"), py("publish", "tests.count_calls", "review"), revise)
    run_id = client.submit(spec)
    wait_for(lambda: _waiting(client, run_id, "review"), what="the review to wait")

    client.reject(run_id, "review", by="carol", comment="too long")
    view = client.wait(run_id, timeout=30)

    steps = view["steps"]
    assert steps["review"]["status"] == "failed"
    assert steps["review"]["error"]["type"] == "rejected"
    assert steps["review"]["error"]["message"] == "rejected by carol: too long"
    assert steps["review"]["output"]["approved"] is False
    assert steps["publish"]["status"] == "upstream_failed"
    assert steps["revise"]["status"] == "succeeded"


def test_an_approval_timeout_takes_the_configured_default(client: Client, workers: LocalWorkers, unique: str) -> None:
    spec = workflow(
        f"approval_timeout_{unique}",
        approval("review", timeout_s=0.5, on_timeout="approve"),
        py("publish", "tests.count_calls", "review"),
    )
    view = client.wait(client.submit(spec), timeout=30)

    assert view["status"] == "succeeded"
    assert view["steps"]["review"]["output"]["decision"] == "timeout:approve"
    assert view["steps"]["review"]["output"]["by"] == "timeout"


def test_two_hundred_waiting_runs_hold_no_worker_and_all_finish_when_approved(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    spec = client.resolve(workflow(f"many_{unique}", approval("review"), py("after", "tests.count_calls", "review")))
    run_ids = [client.submit(spec) for _ in range(200)]
    wait_for(lambda: all(_waiting(client, r, "review") for r in run_ids), timeout=120, what="200 runs to wait")

    # Other work flows through the same 4 slots while 200 runs wait.
    other = client.wait(client.submit(workflow(f"other_{unique}", py("quick", "tests.sleep", seconds=0.1))), 30)
    assert other["status"] == "succeeded"

    for run_id in run_ids:
        client.approve(run_id, "review", by="alice")
    finished = [client.wait(run_id, timeout=120) for run_id in run_ids]

    assert {view["status"] for view in finished} == {"succeeded"}
    assert all(calls(redis_client, run_id, "after") == 1 for run_id in run_ids)


# -- versions ------------------------------------------------------------------------------------------------------


def test_a_run_stays_on_its_version_and_a_changed_definition_is_resumed_only_when_allowed(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    from orchestrator import workflows
    from orchestrator.errors import RunStateError

    name = f"versioned_{unique}"
    v1 = client.resolve(
        workflow(name, py("a", "tests.count_calls"), py("b", "tests.gate", "a"), py("c", "tests.count_calls", "b"))
    )
    workflows.register(v1)
    run_id = client.submit(name)
    assert client.wait(run_id, timeout=30)["status"] == "failed"

    # v2 deployed: the v1 run is untouched and a new submit takes the latest.
    v2 = client.resolve(
        {
            **workflow(
                name,
                py("a", "tests.count_calls"),
                py("b", "tests.count_constant", "a"),
                py("c", "tests.count_calls", "b"),
            ),
            "version": 2,
        }
    )
    workflows.register(v2)
    assert client.status(run_id)["version"] == 1
    assert client.status(client.submit(name))["version"] == 2

    # v1's code changed without a version bump: resuming the pinned run is refused unless allowed.
    changed = client.resolve(
        workflow(
            name, py("a", "tests.count_calls"), py("b", "tests.count_constant", "a"), py("c", "tests.count_calls", "b")
        )
    )
    workflows.register(changed, replace=True)
    with pytest.raises(RunStateError, match="allow-definition-change"):
        client.resume(run_id)

    client.resume(run_id, allow_definition_change=True)
    view = client.wait(run_id, timeout=30)

    assert view["status"] == "succeeded"
    assert view["definition_hash"] == changed.definition_hash
    assert calls(redis_client, run_id, "a") == 1, "a's definition is unchanged: its result is kept"
    assert calls(redis_client, run_id, "b") == 2
    assert calls(redis_client, run_id, "c") == 1
