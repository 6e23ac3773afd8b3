"""Map steps over child runs (``uses: workflow`` with ``for_each``), end to end on the in-memory backend: a child
run per item, the items waiting without a worker, the step's output the children's outputs in item order."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator import Client
from orchestrator.definition.registry import functions
from orchestrator.engine.steps import StepContext
from tests.unit.test_memory_backend import poll
from tests.unit.test_subflow import SETTINGS, name


@pytest.fixture
def client() -> Iterator[Client]:
    with Client(SETTINGS) as c:
        yield c


def _post(ctx: StepContext) -> dict[str, Any]:
    if ctx.inputs["channel"] == "broken":
        raise ValueError("this channel is broken on purpose")
    return {"posted": ctx.inputs["channel"], "topic": ctx.inputs["topic"]}


_poster = f"map_subflow_test.post_{uuid.uuid4().hex[:8]}"
functions.register(_post, _poster)


def _channel_post(function: str = _poster) -> dict[str, Any]:
    return {
        "name": "channel_post",
        "inputs": {"channel": {"type": "string"}, "topic": {"type": "string"}},
        "steps": [{"name": "post", "uses": "python", "with": {"function": function}}],
    }


def _parent(for_each: str, child: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {
        "name": name("p"),
        "inputs": {"topic": {"type": "string", "default": "maps"}},
        "steps": [
            {
                "name": "per_channel",
                "uses": "workflow",
                "for_each": for_each,
                "with": {"definition": child, "inputs": {"channel": "{{ item }}", "topic": "{{ inputs.topic }}"}},
                **more,
            }
        ],
    }


def test_a_workflow_map_runs_a_child_per_item_and_outputs_their_outputs_in_order(client: Client) -> None:
    run_id = client.submit(_parent("['blog', 'email', 'social']", _channel_post(), max_parallel=2))

    view = client.wait(run_id, timeout=15)

    assert view["status"] == "succeeded", view
    step = view["steps"]["per_channel"]
    assert step["output"] == [{"post": {"posted": c, "topic": "maps"}} for c in ("blog", "email", "social")]
    records = client.items(run_id, "per_channel")["items"]
    assert [r["status"] for r in records] == ["succeeded"] * 3
    children = [r["child_run_id"] for r in records]
    assert len(set(children)) == 3
    for index, child_id in enumerate(children):
        assert child_id is not None
        child = client.status(child_id)
        assert child["status"] == "succeeded"
        assert child["parent"] == {"run_id": run_id, "step": "per_channel", "index": index}


def test_a_failing_child_fails_its_item_and_the_step_after_the_others_end(client: Client) -> None:
    run_id = client.submit(_parent("['blog', 'broken', 'email']", _channel_post()))

    view = client.wait(run_id, timeout=15)

    assert view["status"] == "failed", view
    records = client.items(run_id, "per_channel")["items"]
    assert [r["status"] for r in records] == ["succeeded", "failed", "succeeded"]
    broken = records[1]
    assert broken["error"] is not None
    assert broken["error"]["child_run_id"] == broken["child_run_id"]
    assert f"child run {broken['child_run_id']} (channel_post) failed" in broken["error"]["message"]
    error = view["steps"]["per_channel"]["error"]
    assert error is not None
    assert "1 of 3 items did not succeed; item 1 failed" in error["message"]


def test_cancelling_the_parent_cancels_the_children_its_items_wait_for(client: Client) -> None:
    entered, release = threading.Event(), threading.Event()
    fn = f"map_subflow_test.block_{uuid.uuid4().hex[:8]}"

    def block(ctx: StepContext) -> None:
        entered.set()
        release.wait(15)

    functions.register(block, fn)
    run_id = client.submit(_parent("['blog', 'email']", _channel_post(fn)))
    assert entered.wait(15)
    poll(lambda: client.status(run_id)["steps"]["per_channel"]["items"]["waiting"] == 2, "both items to wait")
    children = [r["child_run_id"] for r in client.items(run_id, "per_channel")["items"]]

    client.cancel(run_id)
    release.set()

    assert [client.status(c)["status"] for c in children if c] == ["cancelled", "cancelled"]
    assert client.status(run_id)["status"] == "cancelled"
