"""Map steps (``for_each``) on real workers: items fan out as their own tasks, refill up to ``max_parallel``, fail,
resume, cancel and survive a worker killed with SIGKILL; their records page through the API."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from orchestrator import Client
from orchestrator.dev.local_workers import LocalWorkers
from tests.conftest import ARTIFACTS, WORKER_ENV
from tests.integration.helpers import llm, py, ts, wait_for, workflow
from tests.integration.test_api import ADMIN, ApiServer, bearer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def _map_py(name: str, for_each: str, **args: Any) -> dict[str, Any]:
    extra = {k: args.pop(k) for k in ("max_parallel", "queue", "retry") if k in args}
    return {**py(name, "tests.map_item", **args), "for_each": for_each, **extra}


XS = {"xs": {"type": "array"}}
PROMPT = "{{ item }} {{ index + 1 }} of {{ count }}"
RECORD_FIELDS = {"index", "item", "status", "attempts", "started_at", "finished_at", "output", "error"}


def _records(client: Client, run_id: str, step: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < client.status(run_id)["steps"][step]["items"]["total"]:
        out += client.items(run_id, step, offset=len(out), limit=1000)["items"]
    return out


def _executions(redis_client: redis.Redis, run_id: str, step: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in redis_client.hgetall(f"test:map:{run_id}:{step}").items()}


def test_a_map_of_llm_items_outputs_the_ordered_list_that_downstream_steps_see(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    topics = ["apples", "boats", "clouds", "dunes", "embers"]
    spec = workflow(
        f"map_llm_{unique}",
        {
            **llm("sections"),
            "for_each": "inputs.topics",
            "with": {"prompt": "{{ item }} {{ index + 1 }} of {{ count }}"},
        },
        py("joined", "tests.collect", "sections"),
        inputs={"topics": {"type": "array", "items": {"type": "string"}}},
    )
    run_id = client.submit(spec, {"topics": topics})
    view = client.wait(run_id, timeout=60)

    assert view["status"] == "succeeded"
    sections = view["steps"]["sections"]
    texts = [section["text"] for section in sections["output"]]
    for position, (topic, text) in enumerate(zip(topics, texts, strict=True)):
        assert f"{topic} {position + 1} of 5" in text  # the offline reply opens on its prompt's first words
    assert sections["items"] == {
        "total": 5,
        "pending": 0,
        "queued": 0,
        "running": 0,
        "waiting": 0,
        "succeeded": 5,
        "failed": 0,
        "skipped": 0,
        "cancelled": 0,
    }
    assert sections["usage"]["input_tokens"] > 0
    assert view["steps"]["joined"]["output"] == {"sections": sections["output"]}


def test_max_parallel_two_never_has_more_than_two_items_running(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    spec = workflow(f"map_parallel_{unique}", _map_py("m", "inputs.xs", seconds=0.3, max_parallel=2), inputs=XS)
    run_id = client.submit(spec, {"xs": list(range(8))})
    assert client.wait(run_id, timeout=60)["status"] == "succeeded"

    records = _records(client, run_id, "m")
    edges = sorted([(ts(r["started_at"]), 1) for r in records] + [(ts(r["finished_at"]), -1) for r in records])
    running = peak = 0
    for _, change in edges:
        running += change
        peak = max(peak, running)
    assert peak == 2  # two at once (four worker slots are free), never three
    assert [r["output"]["index"] for r in records] == list(range(8))


def test_one_failing_item_fails_the_step_after_the_others_end_and_resume_reruns_only_it(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    spec = workflow(
        f"map_fail_{unique}",
        _map_py("m", "['a', 'bad', 'c', 'd']", seconds=0.4, fail_on="bad"),
        py("after", "tests.count_calls", "m"),
    )
    run_id = client.submit(spec)
    view = client.wait(run_id, timeout=60)

    step = view["steps"]["m"]
    assert view["status"] == "failed"
    assert step["status"] == "failed"
    assert "1 of 4 items did not succeed; item 1 failed" in step["error"]["message"]
    assert step["items"]["succeeded"] == 3
    assert step["items"]["failed"] == 1
    records = _records(client, run_id, "m")
    assert ts(step["finished_at"]) >= max(ts(r["finished_at"]) for r in records)
    assert view["steps"]["after"]["status"] == "upstream_failed"

    redis_client.set(f"test:fixed:{run_id}", "1")
    client.resume(run_id)
    view = client.wait(run_id, timeout=60)

    assert view["status"] == "succeeded"
    assert _executions(redis_client, run_id, "m") == {0: 1, 1: 2, 2: 1, 3: 1}
    assert [item["item"] for item in view["steps"]["m"]["output"]] == ["a", "bad", "c", "d"]


def test_cancel_stops_every_item_of_a_running_map(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    spec = workflow(f"map_cancel_{unique}", _map_py("m", "inputs.xs", seconds=0.5, max_parallel=2), inputs=XS)
    run_id = client.submit(spec, {"xs": list(range(30))})
    wait_for(lambda: client.status(run_id)["steps"]["m"].get("items", {}).get("running"), what="items to run")

    client.cancel(run_id)

    def settled() -> dict[str, int] | None:
        counts = client.status(run_id)["steps"]["m"]["items"]
        return counts if counts["running"] == counts["queued"] == counts["pending"] == 0 else None

    counts = wait_for(settled, what="every item to end")
    assert counts["cancelled"] >= 26
    assert client.status(run_id)["status"] == "cancelled"
    ran = sum(_executions(redis_client, run_id, "m").values())
    assert ran <= 4


def test_a_worker_killed_mid_map_loses_no_item_and_reruns_none_that_succeeded(
    client: Client, redis_url: str, redis_client: redis.Redis, unique: str
) -> None:
    queue = f"map_kill_{unique}"
    count = 400  # hundreds of items still to run when the kill lands
    log_dir = ARTIFACTS / "worker-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {"REDIS_URL": redis_url, **WORKER_ENV, "ORCH_QUEUED_GRACE_S": "1"}
    with LocalWorkers(client.app, count=2, concurrency=2, queues=(queue,), env=env, log_dir=log_dir) as pool:
        spec = workflow(f"map_kill_{unique}", _map_py("m", "inputs.xs", seconds=0.003, queue=queue), inputs=XS)
        run_id = client.submit(spec, {"xs": list(range(count))})
        wait_for(
            lambda: client.status(run_id)["steps"]["m"].get("items", {}).get("succeeded", 0) >= count // 4,
            what="a share of the items to succeed",
        )
        pool.kill(next(iter(pool.processes)))
        view = client.wait(run_id, timeout=80)

    assert view["status"] == "succeeded"
    assert [item["index"] for item in view["steps"]["m"]["output"]] == list(range(count))
    runs = _executions(redis_client, run_id, "m")
    assert sorted(runs) == list(range(count))
    twice = {index for index, n in runs.items() if n > 1}
    records = {r["index"]: r for r in _records(client, run_id, "m")}
    # An item runs again only when its worker died before recording it: then its first attempt was lost.
    assert all(records[index]["attempts"] >= 2 for index in twice)
    assert len(twice) <= 2


@pytest.fixture(scope="module")
def api(client: Client) -> Iterator[httpx.Client]:
    with ApiServer(client) as server:
        base = f"http://127.0.0.1:{server.port}"
        with httpx.Client(base_url=base, headers=bearer(ADMIN), timeout=15) as http:
            yield http


def test_the_items_endpoint_pages_item_records_and_bounds_its_limit(
    client: Client, workers: LocalWorkers, api: httpx.Client, unique: str
) -> None:
    spec = workflow(f"map_page_{unique}", _map_py("m", "inputs.xs | map('string') | list"), inputs=XS)
    run_id = client.submit(spec, {"xs": list(range(25))})
    assert client.wait(run_id, timeout=60)["status"] == "succeeded"

    page = api.get(f"/runs/{run_id}/steps/m/items", params={"offset": 20, "limit": 10}).json()
    assert page["total"] == 25
    assert [(r["index"], r["item"], r["status"], r["attempts"]) for r in page["items"]] == [
        (i, str(i), "succeeded", 1) for i in range(20, 25)
    ]
    assert set(page["items"][0]) == {
        "index",
        "item",
        "status",
        "attempts",
        "started_at",
        "finished_at",
        "output",
        "error",
    }
    assert api.get(f"/runs/{run_id}/steps/m/items", params={"limit": 100_000}).status_code == 422
    assert api.get(f"/runs/{run_id}/steps/nope/items").status_code == 404
