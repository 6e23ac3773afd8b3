"""The HTTP API served by real uvicorn, against real Redis and real worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
import uvicorn
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.sync.client import connect as ws_connect

from orchestrator import Client
from orchestrator.api import ApiAuth, StreamLimits, create_app
from orchestrator.api.auth import Principal, Scope
from orchestrator.api.streams import EventHubs, follow
from orchestrator.dev.local_workers import REPO_ROOT, LocalWorkers
from orchestrator.state import keys
from tests.integration.helpers import py, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

READ, WRITE, ADMIN, EDITOR = "read-token-0123", "write-token-4567", "admin-token-89ab", "editor-token-cdef"
TOKENS = ApiAuth(
    (
        (READ, Principal("reader", frozenset({Scope.READ}))),
        (WRITE, Principal("producer", frozenset({Scope.READ, Scope.WRITE}))),
        (ADMIN, Principal("admin", frozenset(Scope))),
        (EDITOR, Principal("editor", frozenset({Scope.READ, Scope.APPROVE}))),
    )
)
# Short keep-alives and XREAD blocks so streams and shutdown are quick in tests.
LIMITS = StreamLimits(keepalive_s=1.0, send_timeout_s=5.0, block_ms=500)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class ApiServer:
    """The API under uvicorn in a thread, on a random free loopback port."""

    def __init__(self, client: Client) -> None:
        app = create_app(client.settings, client, auth=TOKENS, streams=LIMITS)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="api-server", daemon=True)

    def __enter__(self) -> ApiServer:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), timeout=20, what="uvicorn to start")
        assert self.server.started, "uvicorn did not start"
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])


@pytest.fixture(scope="module")
def server(client: Client) -> Iterator[ApiServer]:
    with ApiServer(client) as running:
        yield running


@pytest.fixture
def api(server: ApiServer) -> Iterator[httpx.Client]:
    """An HTTP client holding the admin token (read, write, approve)."""
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", headers=bearer(ADMIN), timeout=15) as http:
        yield http


def finished(api: httpx.Client, run_id: str, timeout: float = 30) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        view: dict[str, Any] = api.get(f"/runs/{run_id}").json()
        return view if view["status"] in {"succeeded", "failed", "cancelled", "timed_out"} else None

    return wait_for(ended, timeout=timeout, what=f"run {run_id} to end")


def stream_of(client: Client, run_id: str) -> list[tuple[int, str, str | None, int]]:
    return [(e.seq, e.type, e.step, e.attempt) for e in client.store.events(run_id)]


def as_tuple(event: dict[str, Any]) -> tuple[int, str, str | None, int]:
    return (event["seq"], event["type"], event["step"], event["attempt"])


def read_sse(response: httpx.Response, limit: int | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Parse SSE frames until ``limit`` events or the end of the stream; returns them and whether the stream ended."""
    events: list[dict[str, Any]] = []
    frame: dict[str, str] = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(": ")
            frame[name] = value
            continue
        if frame:
            data = json.loads(frame["data"])
            assert frame["id"] == str(data["seq"]), "id: is the event's seq"
            assert frame["event"] == data["type"], "event: is its type"
            events.append(data)
            frame = {}
            if limit is not None and len(events) >= limit:
                return events, False
    return events, True


def steady_chain(name: str) -> dict[str, Any]:
    """A run lasting about two seconds with a few dozen events."""
    return workflow(
        name,
        py("a", "tests.sleep", seconds=0.3),
        *(py(f"b{i}", "tests.sleep", "a", seconds=0.3) for i in range(3)),
        py("c", "tests.sleep", "b0", "b1", "b2", seconds=0.3),
        py("d", "tests.sleep", "c", seconds=0.3),
    )


# -- submitting and reading runs ------------------------------------------------------------------------------------


def test_a_registered_workflow_submitted_by_name_runs_and_reads_exactly_like_status_json(
    api: httpx.Client, client: Client, workers: LocalWorkers
) -> None:
    created = api.post("/runs", json={"workflow": "content_pipeline", "inputs": {"topic": "SSE"}})

    assert created.status_code == 201, created.text
    run_id = created.json()["run_id"]
    view = finished(api, run_id)
    assert view["status"] == "succeeded"
    assert view["workflow"] == "content_pipeline"
    assert view == client.status(run_id)


def test_a_definition_submitted_as_json_runs_with_the_given_version_and_inputs(
    api: httpx.Client, workers: LocalWorkers, unique: str
) -> None:
    definition = {**workflow(f"api_def_{unique}", py("a", "tests.count_calls")), "version": 3}

    created = api.post("/runs", json={"definition": definition, "inputs": {"topic": "json"}})

    assert created.status_code == 201, created.text
    view = finished(api, created.json()["run_id"])
    assert (view["status"], view["version"], view["inputs"]) == ("succeeded", 3, {"topic": "json"})


def test_a_repeated_idempotency_key_answers_200_with_the_first_run(
    api: httpx.Client, workers: LocalWorkers, unique: str
) -> None:
    body = {"definition": workflow(f"api_idem_{unique}", py("a", "tests.count_calls"))}
    headers = {"Idempotency-Key": f"key-{unique}"}

    first = api.post("/runs", json=body, headers=headers)
    again = api.post("/runs", json=body, headers=headers)
    other = api.post("/runs", json=body, headers={"Idempotency-Key": f"other-{unique}"})

    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
    assert again.json()["run_id"] == first.json()["run_id"]
    assert other.json()["run_id"] != first.json()["run_id"]


def test_concurrent_submits_each_create_their_own_run(api: httpx.Client, workers: LocalWorkers, unique: str) -> None:
    body = {"definition": workflow(f"api_burst_{unique}", py("a", "tests.count_calls"))}

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: api.post("/runs", json=body), range(16)))

    assert [a.status_code for a in answers] == [201] * 16
    run_ids = {a.json()["run_id"] for a in answers}
    assert len(run_ids) == 16
    assert {finished(api, run_id)["status"] for run_id in run_ids} == {"succeeded"}


def test_listing_filters_by_workflow_and_status_newest_first(
    api: httpx.Client, client: Client, workers: LocalWorkers, unique: str
) -> None:
    name = f"api_list_{unique}"
    ok = [client.submit(workflow(name, py("a", "tests.count_calls"))) for _ in range(3)]
    broken = client.submit(workflow(name, py("a", "tests.fail")))
    for run_id in [*ok, broken]:
        client.wait(run_id, timeout=30)

    everything = api.get("/runs", params={"workflow": name}).json()["runs"]
    failed = api.get("/runs", params={"workflow": name, "status": "failed"}).json()["runs"]
    newest = api.get("/runs", params={"workflow": name, "limit": 2}).json()["runs"]

    assert [r["run_id"] for r in everything] == [broken, *reversed(ok)]
    assert [(r["run_id"], r["status"]) for r in failed] == [(broken, "failed")]
    assert [r["run_id"] for r in newest] == [broken, ok[-1]]
    assert all(r["workflow"] == name and r["created_at"] for r in everything)


def test_listing_pages_by_offset_with_a_next_link_and_carries_duration_and_a_failed_runs_error(
    api: httpx.Client, client: Client, workers: LocalWorkers, unique: str
) -> None:
    name = f"api_page_{unique}"
    ok = [client.submit(workflow(name, py("a", "tests.count_calls"))) for _ in range(2)]
    broken = client.submit(workflow(name, py("a", "tests.fail")))
    for run_id in [*ok, broken]:
        client.wait(run_id, timeout=30)

    first = api.get("/runs", params={"workflow": name, "limit": 2})
    second = api.get(first.links["next"]["url"])
    failed = api.get("/runs", params={"workflow": name, "status": "failed"}).json()
    bad = api.get("/runs", params={"offset": -1})
    too_deep = api.get("/runs", params={"offset": 10**9})

    assert first.status_code == 200, first.text
    page = first.json()
    assert [r["run_id"] for r in page["runs"]] == [broken, ok[1]]
    assert (page["offset"], page["limit"], page["next_offset"]) == (0, 2, 2)
    assert "prev" not in first.links
    assert second.status_code == 200, second.text
    assert [r["run_id"] for r in second.json()["runs"]] == [ok[0]]
    assert second.json()["next_offset"] is None
    assert "next" not in second.links
    assert "offset=0" in second.links["prev"]["url"]
    (row,) = failed["runs"]
    assert row["run_id"] == broken
    assert row["error"] == client.status(broken)["error"]
    assert row["error"].startswith("step 'a' failed")
    assert row["duration_s"] >= 0
    assert row["started_at"]
    assert row["cost"] is None
    assert all(r["error"] is None for r in page["runs"][1:])
    for answer in (bad, too_deep):
        assert answer.status_code == 422
        assert "offset" in answer.json()["detail"]


def test_workflows_also_lists_the_definitions_submitted_lately(
    api: httpx.Client, client: Client, workers: LocalWorkers, unique: str
) -> None:
    definition = {**workflow(f"api_sub_{unique}", py("a", "tests.count_calls")), "version": 4}
    run_id = api.post("/runs", json={"definition": definition}).json()["run_id"]
    finished(api, run_id)

    submitted = api.get("/workflows").json()["submitted"]

    entry = next(e for e in submitted if e["name"] == f"api_sub_{unique}")
    assert entry["version"] == 4
    assert entry["definition_hash"] == client.status(run_id)["definition_hash"]
    assert entry["first_submitted"] <= entry["last_submitted"]


def test_workflows_lists_the_registered_ones_with_hash_and_steps(api: httpx.Client, client: Client) -> None:
    listed = {(w["name"], w["version"]): w for w in api.get("/workflows").json()["workflows"]}

    pipeline = listed[("content_pipeline", 1)]
    assert pipeline["definition_hash"] == client.resolve("content_pipeline").definition_hash
    assert [s["name"] for s in pipeline["steps"]][:2] == ["research", "blog_post"]
    assert pipeline["steps"][1]["depends_on"] == ["research"]


# -- controlling runs -------------------------------------------------------------------------------------------------


def test_cancel_stops_a_running_run_and_cancelling_again_is_harmless(
    api: httpx.Client, workers: LocalWorkers, unique: str
) -> None:
    run_id = api.post(
        "/runs", json={"definition": workflow(f"api_cancel_{unique}", py("slow", "tests.sleep", seconds=5))}
    ).json()["run_id"]

    first = api.post(f"/runs/{run_id}/cancel")
    again = api.post(f"/runs/{run_id}/cancel")

    assert (first.status_code, first.json()["cancelled"]) == (200, True)
    assert (again.status_code, again.json()["cancelled"]) == (200, False)
    assert "already ended (cancelled)" in again.json()["message"]
    assert api.get(f"/runs/{run_id}").json()["status"] == "cancelled"


def test_resume_is_refused_while_running_and_reruns_a_failed_run_from_its_checkpoint(
    api: httpx.Client, redis_client: redis.Redis, workers: LocalWorkers, unique: str
) -> None:
    slow = api.post("/runs", json={"definition": workflow(f"api_busy_{unique}", py("s", "tests.sleep", seconds=5))})
    while_running = api.post(f"/runs/{slow.json()['run_id']}/resume")
    api.post(f"/runs/{slow.json()['run_id']}/cancel")
    spec = workflow(f"api_resume_{unique}", py("a", "tests.count_calls"), py("g", "tests.gate", "a"))
    run_id = api.post("/runs", json={"definition": spec}).json()["run_id"]
    assert finished(api, run_id)["status"] == "failed"
    unknown_step = api.post(f"/runs/{run_id}/resume", json={"from_step": "nope"})

    redis_client.set(f"test:fixed:{run_id}", 1)
    resumed = api.post(f"/runs/{run_id}/resume", json={})

    assert while_running.status_code == 409
    assert "is running" in while_running.json()["detail"]
    assert unknown_step.status_code == 422
    assert unknown_step.json()["detail"].startswith("from_step: ")
    assert "no step 'nope'" in unknown_step.json()["detail"]
    assert resumed.status_code == 200, resumed.text
    assert resumed.json() == {"run_id": run_id, "generation": 2}
    assert finished(api, run_id)["status"] == "succeeded"


def test_a_decision_on_a_step_that_is_not_waiting_is_409_and_on_an_unknown_step_404(
    api: httpx.Client, client: Client, workers: LocalWorkers, unique: str
) -> None:
    run_id = client.submit(workflow(f"api_decide_{unique}", py("a", "tests.count_calls")))
    client.wait(run_id, timeout=30)

    not_waiting = api.post(f"/runs/{run_id}/steps/a/decision", json={"decision": "approve"})
    unknown = api.post(f"/runs/{run_id}/steps/zzz/decision", json={"decision": "reject", "comment": "no"})
    bad = api.post(f"/runs/{run_id}/steps/a/decision", json={"decision": "maybe"})

    assert not_waiting.status_code == 409
    assert "not waiting for a decision" in not_waiting.json()["detail"]
    assert unknown.status_code == 404
    assert "no step 'zzz'" in unknown.json()["detail"]
    assert bad.status_code == 422
    assert bad.json()["detail"].startswith("decision: ")


def test_the_token_s_principal_decides_an_approval_and_anyone_else_gets_403(
    server: ApiServer, client: Client, workers: LocalWorkers, unique: str
) -> None:
    spec = workflow(
        f"api_approval_{unique}",
        {"name": "review", "uses": "approval", "with": {"approvers": ["editor"]}},
        py("publish", "tests.count_calls", "review"),
    )
    run_id = client.submit(spec)
    wait_for(lambda: client.status(run_id)["steps"]["review"]["status"] == "waiting", what="the review to wait")
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as http:
        url = f"/runs/{run_id}/steps/review/decision"
        # The body cannot claim an identity: the admin token's principal is "admin", not an approver.
        forbidden = http.post(url, json={"decision": "approve", "comment": "as editor?"}, headers=bearer(ADMIN))
        no_scope = http.post(url, json={"decision": "approve"}, headers=bearer(WRITE))
        approved = http.post(url, json={"decision": "approve", "comment": "lgtm"}, headers=bearer(EDITOR))
        again = http.post(url, json={"decision": "reject"}, headers=bearer(EDITOR))

    assert forbidden.status_code == 403
    assert "approvers are editor" in forbidden.json()["detail"]
    assert no_scope.status_code == 403
    assert approved.status_code == 200
    assert approved.json() == {"approved": True, "decision": "approve", "by": "editor", "comment": "lgtm"}
    assert again.status_code == 409
    view = client.wait(run_id, timeout=30)
    assert view["status"] == "succeeded"
    # The late "reject" is audited only if it came before the run ended (publish may have finished first).
    audit = [a["by"] for a in view["steps"]["review"]["approval"]["audit"]]
    assert audit in (["admin", "editor"], ["admin", "editor", "editor"])


# -- client mistakes ------------------------------------------------------------------------------------------------


def test_unknown_runs_are_404_everywhere(api: httpx.Client, server: ApiServer, unique: str) -> None:
    missing = f"missing-{unique}"
    answers = [
        api.get(f"/runs/{missing}"),
        api.post(f"/runs/{missing}/cancel"),
        api.post(f"/runs/{missing}/resume"),
        api.get(f"/runs/{missing}/events"),
        api.post(f"/runs/{missing}/steps/a/decision", json={"decision": "approve"}),
    ]

    with pytest.raises(InvalidStatus) as refused:
        ws_connect(f"ws://127.0.0.1:{server.port}/runs/{missing}/ws", additional_headers=bearer(READ), open_timeout=10)

    assert [a.status_code for a in answers] == [404] * len(answers)
    assert all(f"unknown run '{missing}'" in a.json()["detail"] for a in answers)
    assert refused.value.response.status_code == 404


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"inputs": {}}, "give exactly one of 'workflow'"),
        ({"workflow": "content_pipeline", "definition": {"name": "x"}}, "give exactly one of 'workflow'"),
        ({"workflow": "content_pipeline", "inputs": []}, "inputs: Input should be a valid dictionary"),
        ({"workflow": "content_pipeline", "inputs": {"topic": 42}}, "inputs: "),
        (
            {"workflow": "content_pipeline", "inputs": {"topc": "x"}},
            "inputs: input 'topc' is not an input of workflow 'content_pipeline'; did you mean 'topic'?",
        ),
        ({"workflow": "no_such_workflow"}, "workflow: no registered workflow 'no_such_workflow'"),
        ({"workflow": "content_pipeline", "version": 0}, "version: Input should be greater than or equal to 1"),
        ({"workflow": "content_pipeline", "colour": "red"}, "colour: Extra inputs are not permitted"),
        (
            {"definition": {"name": "loop", "steps": [{"name": "a", "uses": "noop", "depends_on": ["a"]}]}},
            "definition: dependency cycle: a -> a",
        ),
    ],
)
def test_a_bad_submit_is_422_with_a_message_naming_the_field(
    api: httpx.Client, body: dict[str, Any], named: str
) -> None:
    answer = api.post("/runs", json=body)

    assert answer.status_code == 422, answer.text
    assert named in answer.json()["detail"]


def test_a_definition_naming_a_module_on_the_server_s_disk_is_422_and_imports_nothing(
    api: httpx.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    package = f"probe_{unique}"
    marker = tmp_path / "imported"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / package / "flows.py").write_text("")
    monkeypatch.chdir(tmp_path)
    step = {"name": "a", "uses": "python", "with": {"function": f"{package}.flows.run"}}

    answer = api.post("/runs", json={"definition": {"name": f"probe_{unique}", "steps": [step]}})

    assert answer.status_code == 422, answer.text
    assert f"no registered function '{package}.flows.run'; set ORCH_IMPORTS={package}.flows" in answer.json()["detail"]
    assert not marker.exists()
    assert package not in sys.modules


def test_malformed_json_bad_query_and_bad_headers_are_422_not_500(api: httpx.Client, unique: str) -> None:
    run_id = f"any-{unique}"
    answers = {
        "json": api.post("/runs", content=b"{not json", headers={"Content-Type": "application/json"}),
        "status": api.get("/runs", params={"status": "sleeping"}),
        "limit": api.get("/runs", params={"limit": 0}),
        "last-event-id": api.get(f"/runs/{run_id}/events", headers={"Last-Event-ID": "seven"}),
    }

    too_big = api.post("/runs", content=b"x" * (8 * 1024 * 1024), headers={"Content-Type": "application/json"})

    assert {k: a.status_code for k, a in answers.items()} == dict.fromkeys(answers, 422)
    assert too_big.status_code == 413
    assert "query parameter status" in answers["status"].json()["detail"]
    assert "query parameter limit" in answers["limit"].json()["detail"]
    assert "Last-Event-ID" in answers["last-event-id"].json()["detail"]


# -- auth --------------------------------------------------------------------------------------------------------------


def test_tokens_and_scopes_decide_who_may_do_what(server: ApiServer, workers: LocalWorkers, unique: str) -> None:
    base = f"http://127.0.0.1:{server.port}"
    body = {"definition": workflow(f"api_auth_{unique}", py("slow", "tests.sleep", seconds=3))}
    with httpx.Client(base_url=base, timeout=15) as http:
        anonymous = http.get("/runs")
        forged = http.get("/runs", headers=bearer("not-a-token"))
        reader_submits = http.post("/runs", json=body, headers=bearer(READ))
        run_id = http.post("/runs", json=body, headers=bearer(WRITE)).json()["run_id"]
        reader_reads = http.get(f"/runs/{run_id}", headers=bearer(READ))
        reader_cancels = http.post(f"/runs/{run_id}/cancel", headers=bearer(READ))
        writer_decides = http.post(
            f"/runs/{run_id}/steps/slow/decision", json={"decision": "approve"}, headers=bearer(WRITE)
        )
        writer_cancels = http.post(f"/runs/{run_id}/cancel", headers=bearer(WRITE))
        health = http.get("/healthz")

    assert (anonymous.status_code, anonymous.headers["WWW-Authenticate"]) == (401, "Bearer")
    assert "missing bearer token" in anonymous.json()["detail"]
    assert forged.status_code == 401
    assert reader_submits.status_code == 403
    assert "'reader' lacks the 'write' scope" in reader_submits.json()["detail"]
    assert reader_reads.status_code == 200
    assert reader_cancels.status_code == 403
    assert writer_decides.status_code == 403
    assert (writer_cancels.status_code, writer_cancels.json()["cancelled"]) == (200, True)
    assert health.status_code == 200


def test_a_websocket_without_a_token_is_refused_with_401(server: ApiServer, unique: str) -> None:
    run_id = f"any-{unique}"

    with pytest.raises(InvalidStatus) as refused:
        ws_connect(f"ws://127.0.0.1:{server.port}/runs/{run_id}/ws", open_timeout=10)

    assert refused.value.response.status_code == 401


# -- service endpoints ------------------------------------------------------------------------------------------------


def test_docs_openapi_health_and_metrics_answer(api: httpx.Client) -> None:
    api.get("/runs")
    docs = api.get("/docs")
    schema = api.get("/openapi.json").json()
    health = api.get("/healthz").json()
    metrics = api.get("/metrics")

    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    assert {"/runs", "/runs/{run_id}", "/runs/{run_id}/events", "/workflows", "/healthz"} <= set(schema["paths"])
    assert health == {"status": "ok", "redis": "ok"}
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'orchestrator_api_requests_total{method="GET",route="/runs",status="200"}' in metrics.text
    assert "orchestrator_api_stream_clients" in metrics.text


# -- live events ---------------------------------------------------------------------------------------------------


def test_an_sse_client_that_reconnects_with_last_event_id_gets_every_event_exactly_once(
    api: httpx.Client, client: Client, workers: LocalWorkers, unique: str
) -> None:
    run_id = api.post("/runs", json={"definition": steady_chain(f"api_sse_{unique}")}).json()["run_id"]
    received: list[dict[str, Any]] = []
    connections = 0
    while connections < 50:
        connections += 1
        headers = {"Last-Event-ID": str(received[-1]["seq"])} if received else {}
        with api.stream("GET", f"/runs/{run_id}/events", headers=headers) as response:
            if response.status_code == 204:
                break  # the last connection got the final event just before we dropped it
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            # Drop the connection after a few events, mid-run, and come back.
            events, ended = read_sse(response, limit=4)
        received += events
        if ended:
            break

    assert connections >= 3, "the run outlasted several connections"
    assert [as_tuple(e) for e in received] == stream_of(client, run_id)
    assert received[-1]["type"] == "run_succeeded"
    assert received[-1]["run_id"] == run_id
    after_the_end = api.get(f"/runs/{run_id}/events", headers={"Last-Event-ID": str(received[-1]["seq"])})
    assert after_the_end.status_code == 204


def test_a_websocket_client_that_reconnects_with_after_gets_every_event_exactly_once(
    api: httpx.Client, server: ApiServer, client: Client, workers: LocalWorkers, unique: str
) -> None:
    run_id = api.post("/runs", json={"definition": steady_chain(f"api_ws_{unique}")}).json()["run_id"]
    received: list[dict[str, Any]] = []
    close_code = None
    for _ in range(50):
        after = received[-1]["seq"] if received else 0
        url = f"ws://127.0.0.1:{server.port}/runs/{run_id}/ws?after={after}"
        with ws_connect(url, additional_headers=bearer(READ), open_timeout=10) as socket_:
            try:
                for _ in range(4):
                    received.append(json.loads(socket_.recv(timeout=15)))
            except ConnectionClosedOK as closed:
                close_code = closed.rcvd.code if closed.rcvd else None
                break
    assert close_code == 1000, "the socket closes normally after the run's final event"
    assert [as_tuple(e) for e in received] == stream_of(client, run_id)
    assert received[-1]["type"] == "run_succeeded"


def test_a_client_that_never_reads_holds_up_neither_the_run_nor_other_clients(
    api: httpx.Client, server: ApiServer, client: Client, workers: LocalWorkers, unique: str
) -> None:
    run_id = api.post("/runs", json={"definition": steady_chain(f"api_stuck_{unique}")}).json()["run_id"]
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stuck.connect(("127.0.0.1", server.port))
    request = f"GET /runs/{run_id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READ}\r\n\r\n"
    stuck.sendall(request.encode())
    try:
        with api.stream("GET", f"/runs/{run_id}/events") as response:
            events, ended = read_sse(response)
        view = finished(api, run_id)
    finally:
        stuck.close()

    assert ended
    assert view["status"] == "succeeded"
    assert [as_tuple(e) for e in events] == stream_of(client, run_id)


def test_a_hub_drops_a_subscriber_that_falls_behind_and_keeps_feeding_the_others(redis_url: str, unique: str) -> None:
    run_id = f"hub-{unique}"

    async def scenario() -> tuple[list[int], bool, bool]:
        r = aioredis.Redis.from_url(redis_url)
        await r.hset(keys.run_key(run_id), mapping={"status": "running"})
        hubs = EventHubs(r, block_ms=200, batch=2)
        hub = await hubs.open(run_id)
        # Room for every event for the reader that keeps up, so only the one that never reads can fall behind,
        # however the event loop happens to interleave the hub and the consumer on a loaded machine.
        keeps_up, falls_behind = hub.subscribe(limit=40), hub.subscribe(limit=4)
        seen: list[int] = []

        async def consume() -> None:
            async for event in follow(r, run_id, 0, keeps_up):
                seen.append(event.seq)

        consumer = asyncio.ensure_future(consume())
        for seq in range(1, 21):
            kind = "run_succeeded" if seq == 20 else "step_started"
            await r.xadd(keys.events_key(run_id), {"type": kind, "step": "s", "attempt": "1", "ts": "1"}, id=f"0-{seq}")
        await asyncio.wait_for(consumer, timeout=10)
        hubs.release(hub)
        await hubs.close()
        await r.delete(keys.run_key(run_id), keys.events_key(run_id))
        await r.aclose()
        return seen, falls_behind.dropped, keeps_up.dropped

    seen, slow_dropped, fast_dropped = asyncio.run(scenario())

    assert seen == list(range(1, 21))
    assert slow_dropped
    assert not fast_dropped


# -- the command --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ORCH_API_TOKENS"}
    return {**env, "REDIS_URL": redis_url, "ORCH_IMPORTS": "tests.workflows", **extra}


def _run_api(redis_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "orchestrator.cli", "api", "--port", str(_free_port()), *args]
    return subprocess.run(
        command, check=False, env=_api_env(redis_url, **env), cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
    )


def test_the_api_command_refuses_a_public_address_without_tokens_and_a_malformed_token_list(redis_url: str) -> None:
    public = _run_api(redis_url, "--host", "0.0.0.0")
    malformed = _run_api(redis_url, ORCH_API_TOKENS='{"secret-token": {"scopes": []}}')

    assert public.returncode != 0
    assert "refusing to listen on 0.0.0.0" in public.stderr
    assert malformed.returncode != 0
    assert "ORCH_API_TOKENS entry 1" in malformed.stderr
    assert "secret-token" not in malformed.stderr


def test_the_api_command_serves_on_loopback_and_says_it_has_no_authentication(redis_url: str) -> None:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "api", "--port", str(port)],
        env=_api_env(redis_url),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return process.poll() is None and False

        wait_for(healthy, timeout=30, what="orchestrator api to answer")
        listed = httpx.get(f"http://127.0.0.1:{port}/workflows", timeout=5)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=15)

    assert listed.status_code == 200, "no tokens: loopback clients may do everything"
    assert "ORCH_API_TOKENS is not set" in output


def test_a_browser_stream_may_carry_its_read_token_in_the_query(
    server: ApiServer, client: Client, workers: LocalWorkers, unique: str
) -> None:
    # EventSource and browser WebSockets cannot set headers: ?token= is accepted on the two stream endpoints only.
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as http:
        run_id = http.post(
            "/runs", json={"definition": steady_chain(f"api_qtoken_{unique}")}, headers=bearer(WRITE)
        ).json()["run_id"]
        assert http.get(f"/runs/{run_id}/events").status_code == 401
        assert http.get(f"/runs/{run_id}?token={READ}").status_code == 401, "only stream endpoints read ?token="
        with http.stream("GET", f"/runs/{run_id}/events?token={READ}") as response:
            assert response.status_code == 200
            events, ended = read_sse(response)
    assert ended
    assert [as_tuple(e) for e in events] == stream_of(client, run_id)
