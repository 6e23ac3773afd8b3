"""``stream: true``: live ``llm_delta`` events over SSE and WebSocket, from real workers through the real API."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosedOK
from websockets.sync.client import connect as ws_connect

from orchestrator import Client
from orchestrator.api.streams import EventHubs, Subscription
from orchestrator.definition.files import load_workflow_file
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.engine.delta_sink import RedisDeltaSink
from orchestrator.engine.deltas import Delta
from orchestrator.state import keys
from tests.integration.helpers import wait_for, workflow
from tests.integration.test_api import ADMIN, READ, ApiServer, bearer, finished
from tests.integration.test_cli import orchestrator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def server(client: Client) -> Iterator[ApiServer]:
    with ApiServer(client) as running:
        yield running


@pytest.fixture
def api(server: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", headers=bearer(ADMIN), timeout=30) as http:
        yield http


def streaming(name: str, *, latency: float = 2.0, max_tokens: int = 200, **simulate: Any) -> dict[str, Any]:
    """A run of one streamed offline LLM step lasting about ``latency`` seconds (one delta per ~50 ms)."""
    step = {
        "name": "write",
        "uses": "llm",
        "retry": {"max_attempts": 3, "backoff_s": 0.1, "jitter": False},
        "with": {
            "prompt": "Write about {{ inputs.topic }}",
            "max_tokens": max_tokens,
            "stream": True,
            "reply_cache": "off",
            "simulate": {"latency_s": latency, **simulate},
        },
    }
    return workflow(name, step)


def frames(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Each SSE frame as ``{"event", "id" (or None), "data"}``, until the stream ends."""
    frame: dict[str, str] = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(": ")
            frame[name] = value
            continue
        if frame:
            yield {"event": frame.get("event"), "id": frame.get("id"), "data": json.loads(frame["data"])}
            frame = {}


def shown_text(deltas: list[tuple[str, dict[str, Any]]]) -> str:
    """What a client shows for one step: the text since its last ``llm_reset``."""
    text = ""
    for kind, data in deltas:
        text = "" if kind == "llm_reset" else text + data["text"]
    return text


def deltas_of(received: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f["event"], f["data"]) for f in received if f["event"] in {"llm_delta", "llm_reset"}]


def test_an_sse_client_gets_deltas_without_ids_that_concatenate_to_the_output_text(
    api: httpx.Client, workers: LocalWorkers, unique: str
) -> None:
    run_id = api.post("/runs", json={"definition": streaming(f"stream_sse_{unique}")}).json()["run_id"]
    with api.stream("GET", f"/runs/{run_id}/events") as response:
        received = list(frames(response))
    view = finished(api, run_id)

    deltas = deltas_of(received)
    assert view["status"] == "succeeded"
    assert len(deltas) >= 5, "the text arrived in pieces, while the step ran"
    assert all(kind == "llm_delta" for kind, _ in deltas)
    assert "".join(data["text"] for _, data in deltas) == view["steps"]["write"]["output"]["text"]
    assert all(data.keys() == {"step", "index", "attempt", "text"} for _, data in deltas)
    assert {(data["step"], data["index"], data["attempt"]) for _, data in deltas} == {("write", None, 1)}
    assert all(f["id"] is None for f in received if f["event"] == "llm_delta"), "deltas have no id:"
    assert all(f["id"] == str(f["data"]["seq"]) for f in received if f["event"] != "llm_delta")
    started = next(i for i, f in enumerate(received) if f["event"] == "step_started")
    succeeded = next(i for i, f in enumerate(received) if f["event"] == "step_succeeded")
    assert all(started < i < succeeded for i, f in enumerate(received) if f["event"] == "llm_delta")


def test_a_streaming_agent_step_sends_its_final_turns_text_over_sse_after_its_tool_turns(
    api: httpx.Client, workers: LocalWorkers, unique: str
) -> None:
    script = [
        [{"name": "calculator", "input": {"expression": "6*7"}}],
        [{"name": "calculator", "input": {"expression": "2+2"}}],
    ]
    step = {
        "name": "agent",
        "uses": "agent",
        "with": {
            "prompt": "Research {{ inputs.topic }}",
            "tools": ["calculator"],
            "max_tokens": 200,
            "stream": True,
            "simulate": {"latency_s": 1.0, "tool_calls": script},
        },
    }
    run_id = api.post("/runs", json={"definition": workflow(f"stream_agent_{unique}", step)}).json()["run_id"]
    with api.stream("GET", f"/runs/{run_id}/events") as response:
        received = list(frames(response))
    view = finished(api, run_id)

    deltas = deltas_of(received)
    output = view["steps"]["agent"]["output"]
    assert view["status"] == "succeeded"
    assert output["turns"] == 3
    assert len(deltas) >= 3, "the last turn's text arrived in pieces, while the step ran"
    assert shown_text(deltas) == output["text"]
    assert {(data["step"], data["index"], data["attempt"]) for _, data in deltas} == {("agent", None, 1)}
    turns = [i for i, f in enumerate(received) if f["event"] == "agent_turn"]
    first_delta = next(i for i, f in enumerate(received) if f["event"] == "llm_delta")
    succeeded = next(i for i, f in enumerate(received) if f["event"] == "step_succeeded")
    assert turns[1] < first_delta < succeeded, "the text is the third turn's, streamed before the step ended"


def test_a_client_that_connects_midway_gets_the_text_so_far_then_the_rest(
    api: httpx.Client, workers: LocalWorkers, unique: str
) -> None:
    run_id = api.post("/runs", json={"definition": streaming(f"stream_late_{unique}", latency=3.0)}).json()["run_id"]
    early: list[dict[str, Any]] = []
    late: list[dict[str, Any]] = []
    joined = threading.Event()

    def read_late() -> None:
        with api.stream("GET", f"/runs/{run_id}/events") as response:
            late.extend(frames(response))

    latecomer = threading.Thread(target=read_late)
    with api.stream("GET", f"/runs/{run_id}/events") as response:
        for frame in frames(response):
            early.append(frame)
            if len(deltas_of(early)) == 10 and not joined.is_set():
                joined.set()
                latecomer.start()
    latecomer.join(timeout=30)
    text = finished(api, run_id)["steps"]["write"]["output"]["text"]

    seen_before_joining = "".join(data["text"] for _, data in deltas_of(early)[:10])
    late_deltas = deltas_of(late)
    assert shown_text(deltas_of(early)) == text
    assert late_deltas, "the latecomer got deltas"
    assert late_deltas[0][1]["text"].startswith(seen_before_joining), "its first delta is the text so far"
    assert len(late_deltas) < len(deltas_of(early)), "it did not get the earlier deltas one by one"
    assert shown_text(late_deltas) == text, "the text so far and the live deltas concatenate to the output"
    step_events = [f["data"]["seq"] for f in late if f["id"] is not None]
    assert step_events == list(range(1, len(step_events) + 1)), "the step events were replayed in full"


@pytest.mark.parametrize("mid_stream", [False, True], ids=["error-before-the-stream", "error-mid-stream"])
def test_a_retried_streamed_attempt_says_llm_reset_and_streams_the_text_again(
    api: httpx.Client, workers: LocalWorkers, unique: str, mid_stream: bool
) -> None:
    definition = streaming(f"stream_retry_{unique}", latency=1.0, errors=["server_error"], error_mid_stream=mid_stream)
    run_id = api.post("/runs", json={"definition": definition}).json()["run_id"]
    with api.stream("GET", f"/runs/{run_id}/events") as response:
        received = list(frames(response))
    view = finished(api, run_id)

    deltas = deltas_of(received)
    first = [data for kind, data in deltas if data["attempt"] == 1]
    reset = [i for i, (kind, _) in enumerate(deltas) if kind == "llm_reset"]
    assert view["steps"]["write"]["attempts"] == 2
    assert bool(first) is mid_stream, "attempt 1 streamed part of its text only when the error came mid-stream"
    assert len(reset) == 1
    assert deltas[reset[0]][1] == {"step": "write", "index": None, "attempt": 2}
    assert all(data["attempt"] == 2 for _, data in deltas[reset[0] :])
    assert "".join(data["text"] for _, data in deltas[reset[0] + 1 :]) == view["steps"]["write"]["output"]["text"]
    assert shown_text(deltas) == view["steps"]["write"]["output"]["text"]


def test_a_websocket_client_gets_the_same_deltas_as_json_messages(
    api: httpx.Client, server: ApiServer, workers: LocalWorkers, unique: str
) -> None:
    run_id = api.post("/runs", json={"definition": streaming(f"stream_ws_{unique}")}).json()["run_id"]
    messages: list[dict[str, Any]] = []
    url = f"ws://127.0.0.1:{server.port}/runs/{run_id}/ws"
    with ws_connect(url, additional_headers=bearer(READ), open_timeout=10) as socket_:
        try:
            while True:
                messages.append(json.loads(socket_.recv(timeout=30)))
        except ConnectionClosedOK:
            pass
    view = finished(api, run_id)

    deltas = [m for m in messages if m["type"] == "llm_delta"]
    assert len(deltas) >= 5
    assert all(m.keys() == {"type", "step", "index", "attempt", "text"} for m in deltas)
    assert "".join(m["text"] for m in deltas) == view["steps"]["write"]["output"]["text"]
    assert [m["seq"] for m in messages if "seq" in m] == list(range(1, len(messages) - len(deltas) + 1))


def test_the_durable_event_stream_keeps_step_events_only(
    api: httpx.Client, client: Client, workers: LocalWorkers, unique: str
) -> None:
    run_id = api.post("/runs", json={"definition": streaming(f"stream_durable_{unique}", latency=0.5)}).json()["run_id"]
    finished(api, run_id)
    wait_for(lambda: not client.store.client.exists(f"orch:{{{run_id}}}:texts"), what="the text so far to go")

    with api.stream("GET", f"/runs/{run_id}/events") as response:
        replayed = list(frames(response))

    assert replayed, "the finished run's events replay"
    assert all(f["id"] is not None for f in replayed)
    assert not [f for f in replayed if f["event"] in {"llm_delta", "llm_reset"}]
    assert not [e for e in client.store.events(run_id) if e.type.startswith("llm_")]
    assert not client.store.client.keys(f"orch:{{{run_id}}}:text:*")


def test_watch_shows_the_streamed_text(
    redis_url: str, client: Client, workers: LocalWorkers, tmp_path: Path, unique: str
) -> None:
    # An approval gate holds the streaming step until the watch follows the run's deltas (a CLI can take seconds to
    # start on a loaded machine; a step that ended before it joined has no text so far to show).
    definition = streaming(f"stream_watch_{unique}", latency=4.0)
    gate = {"name": "gate", "uses": "approval", "with": {"approvers": ["alice"]}}
    definition["steps"] = [gate, {**definition["steps"][0], "depends_on": ["gate"]}]
    path = tmp_path / "stream.json"
    path.write_text(json.dumps(definition))
    run_id = client.submit(load_workflow_file(path))
    finished: dict[str, Any] = {}
    watcher = threading.Thread(
        target=lambda: finished.update(proc=orchestrator("watch", run_id, redis_url=redis_url)), daemon=True
    )
    watcher.start()
    channel = keys.deltas_channel(run_id)
    wait_for(lambda: client.store.client.pubsub_numsub(channel)[0][1] > 0, timeout=60, what="watch to follow deltas")
    client.approve(run_id, "gate", by="alice")
    watcher.join(timeout=120)

    watched = finished["proc"]
    text = client.status(run_id)["steps"]["write"]["output"]["text"]
    shown = " ".join(watched.stdout.split())
    assert watched.returncode == 0, watched.stderr
    assert "write ▸" in shown
    assert " ".join(text.split()[-8:]) in shown, "the end of the streamed text is on screen"


def test_a_client_that_falls_behind_the_hub_gets_the_text_coalesced_not_dropped(redis_url: str, unique: str) -> None:
    run_id = f"slow_{unique}"
    sink = RedisDeltaSink(redis.Redis.from_url(redis_url))
    sink.client.hset(keys.run_key(run_id), "status", "running")
    pieces = [f"token{n} " for n in range(3000)]

    async def scenario() -> tuple[Subscription, list[Delta]]:
        aredis = aioredis.Redis.from_url(redis_url)
        hubs = EventHubs(aredis, block_ms=200)
        hub = await hubs.open(run_id)
        subscription = hub.subscribe(limit=200)
        offset = 0
        for piece in pieces:  # the publisher far ahead of a client that reads nothing meanwhile
            sink.publish(run_id, Delta("llm_delta", "write", None, 1, piece, offset))
            offset += len(piece)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while subscription.coalesced + subscription.pending < len(pieces) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        received = []
        while subscription.pending:
            item = await subscription.next()
            assert isinstance(item, Delta)
            received.append(item)
        hubs.release(hub)
        await hubs.close()
        await aredis.aclose()
        return subscription, received

    subscription, received = asyncio.run(scenario())

    assert not subscription.dropped, "deltas never drop a client"
    assert "".join(d.text for d in received) == "".join(pieces), "no text lost"
    assert len(received) < len(pieces) / 10, "what it fell behind on came in a few pieces"
    sink.finish(run_id, "write", None, 1)
    sink.client.delete(keys.run_key(run_id))
