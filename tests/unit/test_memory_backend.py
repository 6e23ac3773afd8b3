"""``REDIS_URL=memory://``: one process runs whole workflows (store, step threads, sweeper) with no Redis or broker.

Each test drives a real :class:`~orchestrator.client.Client` end to end; steps run on the client's own threads, the
LLM steps on the offline provider. Waiting is by ``Client.wait`` or polling with a deadline, never a bare sleep.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from orchestrator import Client, Settings
from orchestrator.cli import main
from orchestrator.definition.registry import functions
from orchestrator.definition.spec import parse_workflow
from orchestrator.engine.steps import StepContext
from orchestrator.infra.redis_url import RedisUrlError, is_memory_url, require_shared_store
from orchestrator.state import MemoryStateStore

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = replace(Settings.from_env({}), redis_url="memory://", sweep_interval_s=0.05, retry_cap_s=1.0)
WAIT_S = 15.0


@pytest.fixture
def client() -> Iterator[Client]:
    with Client(SETTINGS) as c:
        yield c


def poll(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Return once ``condition()`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def register(body: Callable[[StepContext], Any]) -> str:
    """Register ``body`` as a python step function under a fresh name; returns the name."""
    name = f"memtest.{body.__name__}_{uuid.uuid4().hex[:8]}"
    functions.register(body, name)
    return name


def name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def step_status(client: Client, run_id: str, step: str) -> str:
    return str(client.status(run_id)["steps"][step]["status"])


class Gate:
    """A python step that blocks until the test opens it, counting its calls."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.calls = 0
        self.function = register(self.run)

    def run(self, ctx: StepContext) -> dict[str, Any]:
        self.calls += 1
        self.entered.set()
        if not self.opened.wait(WAIT_S):
            raise RuntimeError("the test never opened the gate")
        return {"call": self.calls}


def test_a_content_pipeline_runs_to_the_end_in_one_process_with_a_retry_a_condition_and_an_approval(
    client: Client,
) -> None:
    def review(ctx: StepContext) -> dict[str, Any]:
        return {"words": ctx["blog_post"]["word_count"], "social": bool(ctx["social_posts"]["text"])}

    definition = {
        "name": name("pipeline"),
        "inputs": {"topic": {"type": "string"}, "translate": {"type": "boolean", "default": False}},
        "steps": [
            {"name": "research", "uses": "llm", "with": {"prompt": "Research {{ inputs.topic }}", "max_tokens": 200}},
            {
                "name": "blog_post",
                "uses": "llm",
                "depends_on": ["research"],
                "with": {
                    "prompt": "Write about {{ steps.research.output.text }}",
                    "max_tokens": 600,
                    "simulate": {"errors": ["overloaded", "overloaded"]},
                },
                "retry": {"max_attempts": 3, "backoff_s": 0.05, "jitter": False},
            },
            {
                "name": "social_posts",
                "uses": "llm",
                "depends_on": ["blog_post"],
                "with": {"prompt": "Promote {{ steps.blog_post.output.text }}", "max_tokens": 100},
            },
            {
                "name": "translation",
                "uses": "llm",
                "depends_on": ["blog_post"],
                "condition": "inputs.translate",
                "with": {"prompt": "Translate {{ steps.blog_post.output.text }}", "max_tokens": 100},
            },
            {
                "name": "review",
                "uses": "python",
                "depends_on": ["social_posts", "translation"],
                "trigger_rule": "all_done",
                "with": {"function": register(review)},
            },
            {"name": "sign_off", "uses": "approval", "depends_on": ["review"], "with": {"approvers": ["editor"]}},
        ],
    }
    run_id = client.submit(definition, {"topic": "Redis"})
    approvals: list[dict[str, Any]] = []

    def approve_when_asked() -> None:
        for event in client.stream(run_id):
            if event.type == "step_waiting" and event.step == "sign_off":
                approvals.append(client.approve(run_id, "sign_off", by="editor", comment="ship it"))

    approver = threading.Thread(target=approve_when_asked, daemon=True)
    approver.start()
    view = client.wait(run_id, timeout=WAIT_S)
    approver.join(WAIT_S)

    steps = view["steps"]
    assert view["status"] == "succeeded"
    assert {s: steps[s]["status"] for s in steps} == {
        "research": "succeeded",
        "blog_post": "succeeded",
        "social_posts": "succeeded",
        "translation": "skipped",
        "review": "succeeded",
        "sign_off": "succeeded",
    }
    assert steps["blog_post"]["attempts"] == 3
    assert [e["type"] for e in steps["blog_post"]["errors"]] == ["overloaded", "overloaded"]
    assert steps["review"]["output"]["words"] > 0
    assert steps["sign_off"]["output"]["approved"] is True
    assert approvals == [steps["sign_off"]["output"]]


def test_a_cancelled_run_starts_nothing_more_and_resumes_from_its_checkpoint(client: Client) -> None:
    gate = Gate()
    after = Gate()
    after.opened.set()
    definition = {
        "name": name("cancel"),
        "steps": [
            {"name": "first", "uses": "noop"},
            {"name": "slow", "uses": "python", "depends_on": ["first"], "with": {"function": gate.function}},
            {"name": "last", "uses": "python", "depends_on": ["slow"], "with": {"function": after.function}},
        ],
    }
    run_id = client.submit(definition)
    assert gate.entered.wait(WAIT_S)

    outcome = client.cancel(run_id)
    gate.opened.set()  # the interrupted attempt now ends; the store refuses to record it

    assert outcome["cancelled"] is True
    cancelled = client.wait(run_id, timeout=WAIT_S)
    assert cancelled["status"] == "cancelled"
    assert cancelled["steps"]["first"]["status"] == "succeeded"
    assert cancelled["steps"]["slow"]["status"] == "cancelled"
    assert cancelled["steps"]["last"]["status"] == "cancelled"
    assert client.cancel(run_id)["cancelled"] is False

    generation = client.resume(run_id)
    resumed = client.wait(run_id, timeout=WAIT_S)

    assert generation == "2"
    assert resumed["status"] == "succeeded"
    assert {s: resumed["steps"][s]["status"] for s in ("first", "slow", "last")} == dict.fromkeys(
        ("first", "slow", "last"), "succeeded"
    )
    assert gate.calls == 2  # interrupted once, then run again by the resume
    assert after.calls == 1  # never started before the resume


def test_the_sweeper_thread_times_out_a_run_past_its_workflow_deadline(client: Client) -> None:
    gate = Gate()
    definition = {
        "name": name("deadline"),
        "timeout_s": 0.3,
        "steps": [
            {"name": "slow", "uses": "python", "with": {"function": gate.function}},
            {"name": "never", "uses": "noop", "depends_on": ["slow"]},
        ],
    }
    run_id = client.submit(definition)
    try:
        view = client.wait(run_id, timeout=WAIT_S)
    finally:
        gate.opened.set()

    assert gate.entered.is_set()
    assert view["status"] == "timed_out"
    assert "deadline" in str(view["error"])
    assert view["steps"]["never"]["status"] == "cancelled"


def test_an_approval_nobody_answers_is_decided_by_its_timeout(client: Client) -> None:
    definition = {
        "name": name("approval_timeout"),
        "steps": [
            {
                "name": "ask",
                "uses": "approval",
                "with": {"approvers": ["ann"], "timeout_s": 0.2, "on_timeout": "reject"},
            },
            {"name": "after", "uses": "noop", "depends_on": ["ask"]},
        ],
    }
    run_id = client.submit(definition)

    view = client.wait(run_id, timeout=WAIT_S)

    assert view["status"] == "failed"
    assert view["steps"]["ask"]["output"]["decision"] == "timeout:reject"
    assert view["steps"]["after"]["status"] == "upstream_failed"


def test_a_step_retried_with_a_countdown_is_delivered_again_under_the_same_task_id(client: Client) -> None:
    seen: list[str] = []

    def flaky(ctx: StepContext) -> str:
        seen.append(ctx.run_id)
        if ctx.attempt == 1:
            from orchestrator.errors import RetryableStepError

            raise RetryableStepError("not yet", kind="busy")
        return "done"

    definition = {
        "name": name("retry"),
        "steps": [
            {
                "name": "flaky",
                "uses": "python",
                "with": {"function": register(flaky)},
                "retry": {"max_attempts": 2, "backoff_s": 0.05, "jitter": False},
            }
        ],
    }
    run_id = client.submit(definition)

    view = client.wait(run_id, timeout=WAIT_S)

    assert view["status"] == "succeeded"
    assert view["steps"]["flaky"]["attempts"] == 2
    assert view["steps"]["flaky"]["output"] == "done"
    assert len(seen) == 2


def test_a_run_whose_first_message_was_never_sent_is_started_by_the_sweeper_thread() -> None:
    spec = parse_workflow({"name": name("lost"), "steps": [{"name": "a", "uses": "noop"}]})
    run_id = uuid.uuid4().hex
    with Client(replace(SETTINGS, queued_grace_s=0.1)) as client:
        # What a producer that died between creating the run and publishing its roots leaves behind.
        client.store.save_definition(spec)
        client.store.hold_dispatch(run_id, {"a": uuid.uuid4().hex}, 0.1)
        assert client.store.create_run(run_id, spec, {}, None)

        view = client.wait(run_id, timeout=WAIT_S)

    assert view["status"] == "succeeded"
    assert view["steps"]["a"]["attempts"] == 1


def test_closing_the_client_stops_its_threads_and_keeps_its_runs_readable() -> None:
    client = Client(SETTINGS)
    run_id = client.submit({"name": name("close"), "steps": [{"name": "a", "uses": "noop"}]})
    client.wait(run_id, timeout=WAIT_S)
    engine_threads = [t for t in threading.enumerate() if t.name.startswith(("orchestrator-step", "orchestrator-sw"))]

    client.close()

    assert engine_threads
    assert all(t.daemon for t in engine_threads)
    assert not any(t.is_alive() for t in engine_threads if t.name.startswith("orchestrator-step"))
    assert client.status(run_id)["status"] == "succeeded"
    client.close()  # twice is harmless


def test_an_interpreter_exits_with_a_run_still_in_progress_and_never_imported_celery() -> None:
    script = textwrap.dedent(
        """
        import threading
        from orchestrator import Client, Settings, function

        entered = threading.Event()

        @function("memtest.forever")
        def forever(ctx):
            entered.set()
            threading.Event().wait()

        client = Client(Settings(redis_url="memory://"))
        step = {"name": "a", "uses": "python", "with": {"function": "memtest.forever"}}
        client.submit({"name": "forever", "steps": [step]})
        assert entered.wait(30)
        import sys
        print(" ".join(sorted({m.split(".")[0] for m in sys.modules} & {"celery", "kombu"})) or "leaving")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "leaving"


def test_a_client_on_memory_uses_the_memory_store_it_is_given_and_has_no_celery_app() -> None:
    store = MemoryStateStore()
    with Client(SETTINGS, store=store) as client:
        run_id = client.submit({"name": name("given"), "steps": [{"name": "a", "uses": "noop"}]})
        client.wait(run_id, timeout=WAIT_S)

        assert store.run_fields(run_id)["status"] == "succeeded"
        with pytest.raises(RedisUrlError, match="memory://"):
            _ = client.app


@pytest.mark.parametrize("url", ["memory://", "MEMORY://", " memory:// "])
def test_memory_urls_name_the_single_process_backend(url: str) -> None:
    assert is_memory_url(url)
    assert Settings(redis_url=url).redis_url == url


@pytest.mark.parametrize("url", ["memory://host", "memory:///db", "memory:"])
def test_a_memory_url_with_anything_after_the_scheme_is_refused_naming_the_url(url: str) -> None:
    with pytest.raises(RedisUrlError, match="exactly 'memory://'"):
        Settings(redis_url=url)


def test_a_broker_url_next_to_memory_is_refused() -> None:
    with pytest.raises(ValueError, match="ORCH_BROKER_URL cannot be used with REDIS_URL=memory://"):
        Settings.from_env({"REDIS_URL": "memory://", "ORCH_BROKER_URL": "amqp://localhost"})


def test_the_in_process_thread_count_is_a_setting_of_at_least_one() -> None:
    assert Settings.from_env({"ORCH_INPROCESS_THREADS": "3"}).inprocess_threads == 3
    with pytest.raises(ValueError, match="ORCH_INPROCESS_THREADS must be at least 1, not 0"):
        Settings.from_env({"ORCH_INPROCESS_THREADS": "0"})


def test_a_process_that_must_share_its_runs_refuses_memory_in_one_line() -> None:
    with pytest.raises(RedisUrlError) as refused:
        require_shared_store("memory://", "the API server")

    assert "\n" not in str(refused.value)
    assert "the API server cannot share them" in str(refused.value)
    require_shared_store("redis://127.0.0.1:6379/0", "the API server")  # a server is fine


@pytest.mark.parametrize(
    "build",
    [
        pytest.param("orchestrator.celery_app:create_app", id="a Celery producer app"),
        pytest.param("workers.app:create_app", id="a worker"),
        pytest.param("orchestrator.engine.sweep_service:SweepService", id="the sweeper service"),
        pytest.param("orchestrator.api.app:create_app", id="the API server"),
    ],
)
def test_every_process_of_its_own_refuses_memory(build: str) -> None:
    module, _, attr = build.partition(":")
    factory = getattr(__import__(module, fromlist=[attr]), attr)

    with pytest.raises(RedisUrlError, match="REDIS_URL=memory://"):
        factory(SETTINGS)


@pytest.mark.parametrize(
    "args",
    [["worker"], ["sweeper"], ["api"], ["demo"], ["status", "some-run"], ["submit", "examples/content_pipeline.yaml"]],
    ids=" ".join,
)
def test_the_cli_refuses_memory_where_a_run_would_outlive_the_command_in_one_line(args: list[str]) -> None:
    done = CliRunner().invoke(main, args, env={"REDIS_URL": "memory://", "ORCH_IMPORTS": ""})

    assert done.exit_code != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    assert "memory://" in lines[0]


def test_the_cli_runs_a_workflow_file_in_its_own_process_with_wait(tmp_path: Path) -> None:
    file = tmp_path / "hello.yaml"
    file.write_text(
        "name: hello_memory\n"
        "inputs: {topic: {type: string}}\n"
        "steps:\n"
        "  - {name: draft, uses: llm, with: {prompt: 'About {{ inputs.topic }}', max_tokens: 50}}\n"
        "  - {name: done, uses: noop, depends_on: [draft]}\n"
    )
    args = ["submit", str(file), "--input", "topic=Redis", "--wait", "--json", "--timeout", str(WAIT_S)]

    done = CliRunner().invoke(main, args, env={"REDIS_URL": "memory://", "ORCH_IMPORTS": ""})

    assert done.exit_code == 0, done.output
    view = json.loads(done.stdout)
    assert view["status"] == "succeeded"
    assert view["steps"]["draft"]["output"]["text"]


def test_celery_a_workers_refuses_memory_in_one_line() -> None:
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": "memory://"}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers", "worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: REDIS_URL=memory:// keeps runs inside the one process that uses it, so a worker cannot share them: "
        "set REDIS_URL to a Redis server"
    ]
