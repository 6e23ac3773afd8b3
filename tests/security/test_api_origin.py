"""Without tokens the API serves loopback, and a web page in a browser on this machine is on loopback too: such a page
must not drive it. A foreign ``Origin`` (a form or a fetch from another site, a cross-origin WebSocket), a foreign
``Host`` (DNS rebinding) and a body that is not JSON (what an HTML form sends) are refused; loopback JSON works.

The API runs under real uvicorn against the test Redis. Runs go to a queue no worker serves, so they stay running.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect
from websockets.typing import Origin

from orchestrator import Client
from orchestrator.api import ApiAuth, StreamLimits, create_app
from orchestrator.api.auth import Principal, Scope
from orchestrator.state import keys
from tests.integration.helpers import py, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EVIL = "https://evil.example"
NOBODY = "sec_origin_nobody"  # a queue no worker serves
TOKEN = "sec-origin-token"
TOKENS = ApiAuth(((TOKEN, Principal("ops", frozenset(Scope))),))


class Served:
    """An app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, auth: ApiAuth, client: Client) -> None:
        app = create_app(client.settings, client, auth=auth, streams=StreamLimits(block_ms=200))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), timeout=20, what="uvicorn to start")
        assert self.server.started, "uvicorn did not start"
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def open_api(client: Client) -> Iterator[Served]:
    """The API without tokens: loopback clients only."""
    with Served(ApiAuth(), client) as served:
        yield served


@pytest.fixture(scope="module")
def token_api(client: Client) -> Iterator[Served]:
    with Served(TOKENS, client) as served:
        yield served


@pytest.fixture
def http(open_api: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=open_api.base, timeout=15) as session:
        yield session


def definition() -> dict[str, Any]:
    return workflow(f"sec_origin_{uuid.uuid4().hex[:8]}", py("a", "tests.count_calls", queue=NOBODY))


def footprint(r: redis.Redis) -> tuple[int, set[str]]:
    """What a submit writes first: the runs index, stored definitions and idempotency keys."""
    names = {str(k) for pattern in (keys.definition_key("*"), keys.idempotency_key("*")) for k in r.scan_iter(pattern)}
    return r.zcard(keys.RUNS_INDEX), names


def assert_refused(response: httpx.Response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert "\n" not in detail
    for needle in needles:
        assert needle in detail, detail


@pytest.fixture
def running(client: Client) -> str:
    return client.submit(definition())


# -- foreign Origin ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", [EVIL, "null", "http://127.0.0.1.evil.example", "http://localhost.evil.example:80"])
def test_a_cancel_sent_from_a_foreign_origin_is_refused_and_the_run_goes_on(
    http: httpx.Client, client: Client, running: str, origin: str
) -> None:
    answer = http.post(f"/runs/{running}/cancel", headers={"Origin": origin})

    assert_refused(answer, 403, f"Origin {origin!r}", "loopback")
    assert client.status(running)["status"] == "running"


def test_a_submit_from_a_foreign_origin_is_refused_and_writes_nothing(
    http: httpx.Client, redis_client: redis.Redis
) -> None:
    before = footprint(redis_client)

    answer = http.post("/runs", json={"definition": definition()}, headers={"Origin": EVIL})

    assert_refused(answer, 403, "Origin")
    assert footprint(redis_client) == before


def test_a_huge_foreign_origin_is_named_in_a_short_detail(http: httpx.Client, running: str) -> None:
    origin = "https://" + "e" * 10_000 + ".example"

    answer = http.post(f"/runs/{running}/cancel", headers={"Origin": origin})

    assert_refused(answer, 403, "Origin 'https://eeee")
    assert len(answer.json()["detail"]) < 300


# -- DNS rebinding -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "rebind.attacker.example",
        "rebind.attacker.example:8000",
        "127.0.0.1.nip.io",
        "localhost.attacker.example",
        "10.0.0.1",
        "127.0.0.1:x",
        "",
    ],
)
def test_a_submit_under_a_rebound_host_name_is_refused_and_writes_nothing(
    http: httpx.Client, redis_client: redis.Redis, host: str
) -> None:
    before = footprint(redis_client)

    answer = http.post("/runs", json={"definition": definition()}, headers={"Host": host})

    assert_refused(answer, 403, "Host", "loopback")
    assert footprint(redis_client) == before


def test_reads_under_a_rebound_host_name_are_refused_too(http: httpx.Client, running: str) -> None:
    for path in ("/runs", f"/runs/{running}", "/metrics"):
        assert_refused(http.get(path, headers={"Host": "rebind.attacker.example"}), 403, "Host")


# -- JSON bodies only --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/plain",
        "text/plain;charset=UTF-8",
        None,
    ],
)
def test_a_cancel_with_a_body_that_is_not_json_is_refused_with_415(
    http: httpx.Client, client: Client, running: str, content_type: str | None
) -> None:
    # What an HTML form (or a no-cors fetch of a blob, which sends no type at all) would post.
    headers = {"Content-Type": content_type} if content_type else {}

    answer = http.post(f"/runs/{running}/cancel", content=b"confirm=yes", headers=headers)

    assert_refused(answer, 415, "application/json")
    assert client.status(running)["status"] == "running"


def test_a_submit_whose_json_is_declared_text_plain_is_refused_and_writes_nothing(
    http: httpx.Client, redis_client: redis.Redis
) -> None:
    before = footprint(redis_client)

    answer = http.post(
        "/runs", content=json.dumps({"definition": definition()}), headers={"Content-Type": "text/plain"}
    )

    assert_refused(answer, 415, "'text/plain'")
    assert footprint(redis_client) == before


# -- what still works --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST", "[::1]:{port}", "127.0.0.2"])
def test_loopback_json_requests_under_a_loopback_host_and_origin_work(
    open_api: Served, http: httpx.Client, client: Client, host: str
) -> None:
    loopback = host.format(port=open_api.port)
    headers = {"Host": loopback, "Origin": f"http://{loopback}"}

    submitted = http.post("/runs", json={"definition": definition()}, headers=headers)
    listed = http.get("/runs", headers={"Host": loopback})
    cancelled = http.post(f"/runs/{submitted.json()['run_id']}/cancel", headers=headers)  # no body: no type needed

    assert submitted.status_code == 201, submitted.text
    assert listed.status_code == 200
    assert (cancelled.status_code, cancelled.json()["cancelled"]) == (200, True)
    assert client.status(submitted.json()["run_id"])["status"] == "cancelled"


def test_requests_without_an_origin_header_work_as_before(http: httpx.Client, running: str) -> None:
    assert http.get(f"/runs/{running}").status_code == 200
    assert http.post("/runs", json={"definition": definition()}).status_code == 201
    assert http.post(f"/runs/{running}/cancel", json=None).status_code == 200


# -- WebSocket ---------------------------------------------------------------------------------------------------------


def test_a_cross_origin_websocket_is_refused_before_it_streams_anything(open_api: Served, running: str) -> None:
    url = f"ws://127.0.0.1:{open_api.port}/runs/{running}/ws"

    with pytest.raises(InvalidStatus) as refused:
        ws_connect(url, origin=Origin(EVIL), open_timeout=10).close()

    assert refused.value.response.status_code == 403
    assert b"Origin" in refused.value.response.body


def test_a_loopback_origin_websocket_streams_the_run_s_events(open_api: Served, running: str) -> None:
    url = f"ws://127.0.0.1:{open_api.port}/runs/{running}/ws"

    with ws_connect(url, origin=Origin(f"http://localhost:{open_api.port}"), open_timeout=10) as socket_:
        first = json.loads(socket_.recv(timeout=15))

    assert first["run_id"] == running


# -- with tokens -------------------------------------------------------------------------------------------------------


def test_with_tokens_a_bearer_request_from_any_origin_and_host_works_but_a_form_body_does_not(
    token_api: Served, client: Client
) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Origin": EVIL, "Host": "api.example.com"}
    with httpx.Client(base_url=token_api.base, timeout=15) as session:
        submitted = session.post("/runs", json={"definition": definition()}, headers=headers)
        run_id = submitted.json()["run_id"]
        form = session.post(
            f"/runs/{run_id}/cancel",
            content=b"a=1",
            headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
        )
        cancelled = session.post(f"/runs/{run_id}/cancel", headers=headers)
        anonymous = session.post(f"/runs/{run_id}/cancel", headers={"Origin": EVIL})

    assert submitted.status_code == 201, submitted.text
    assert_refused(form, 415, "application/json")
    assert cancelled.status_code == 200
    assert anonymous.status_code == 401
    assert client.status(run_id)["status"] == "cancelled"
