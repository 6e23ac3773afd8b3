"""Approval map steps (``for_each`` on ``approval``) on real workers: one decision per item, each waiting on its
own, decided by name of item, timed out on its own; the step's output is the ordered list of decisions."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import Client, DecisionRefusedError
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.errors import InputValidationError
from tests.integration.helpers import py, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def _review(**params: Any) -> dict[str, Any]:
    with_ = {"approvers": ["alice", "carol"], "message": "Publish {{ item }} ({{ index + 1 }} of {{ count }})?"}
    return {"name": "review", "uses": "approval", "for_each": "inputs.posts", "with": {**with_, **params}}


def _waiting(client: Client, run_id: str) -> list[int]:
    page = client.items(run_id, "review", limit=100)["items"]
    return [record["index"] for record in page if record["status"] == "waiting"]


def test_each_item_waits_for_its_own_decision_and_the_output_is_the_ordered_decisions(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    posts = ["launch", "recap", "teaser"]
    spec = workflow(f"map_approve_{unique}", _review(), py("publish", "tests.collect", "review"), inputs={"posts": {}})
    run_id = client.submit(spec, {"posts": posts})
    wait_for(lambda: _waiting(client, run_id) == [0, 1, 2], what="three items waiting")

    assert client.status(run_id)["steps"]["review"]["items"]["waiting"] == 3, "nothing holds a worker"
    messages = {e.data["index"]: e.data["message"] for e in client.store.events(run_id) if e.type == "item_waiting"}
    assert messages == {0: "Publish launch (1 of 3)?", 1: "Publish recap (2 of 3)?", 2: "Publish teaser (3 of 3)?"}
    with pytest.raises(InputValidationError, match="name the item"):
        client.approve(run_id, "review", by="alice")
    with pytest.raises(DecisionRefusedError, match="may not decide") as refused:
        client.approve(run_id, "review", by="mallory", item=1)
    assert refused.value.reason == "not_an_approver"

    client.approve(run_id, "review", by="carol", comment="good", item=2)
    wait_for(lambda: _waiting(client, run_id) == [0, 1], what="item 2 decided, the others still waiting")
    with pytest.raises(DecisionRefusedError, match="not waiting"):
        client.reject(run_id, "review", by="alice", item=2)
    client.approve(run_id, "review", by="alice", item=0)
    assert client.status(run_id)["steps"]["publish"]["status"] == "pending", "one item still waits"
    client.approve(run_id, "review", by="alice", comment="fine", item=1)
    view = client.wait(run_id, timeout=30)

    assert view["status"] == "succeeded"
    decisions = view["steps"]["review"]["output"]
    assert [(d["by"], d["comment"], d["approved"]) for d in decisions] == [
        ("alice", "", True),
        ("alice", "fine", True),
        ("carol", "good", True),
    ]
    assert view["steps"]["publish"]["output"] == {"review": decisions}


def test_a_rejected_item_fails_the_step_with_every_decision_and_a_timeout_decides_an_item_alone(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    spec = workflow(f"map_reject_{unique}", _review(timeout_s=1.0, on_timeout="approve"), inputs={"posts": {}})
    run_id = client.submit(spec, {"posts": ["a", "b"]})
    wait_for(lambda: _waiting(client, run_id) == [0, 1], what="two items waiting")

    client.reject(run_id, "review", by="carol", comment="off-brand", item=0)
    view = client.wait(run_id, timeout=30)

    assert view["status"] == "failed"
    step = view["steps"]["review"]
    assert step["error"]["type"] == "item_failed"
    assert "item 0 failed: rejected by carol: off-brand" in step["error"]["message"]
    assert [(d["decision"], d["by"]) for d in step["output"]] == [("reject", "carol"), ("timeout:approve", "timeout")]
    records = client.items(run_id, "review")["items"]
    assert [r["status"] for r in records] == ["failed", "succeeded"]
