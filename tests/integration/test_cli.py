"""The ``orchestrator`` command as users run it: a subprocess against real Redis and real worker processes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator import Client, Settings
from orchestrator.definition.files import load_workflow_file
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.state import keys
from tests.integration.helpers import queue_length, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "content_pipeline.yaml"
IMPORTS = "tests.workflows,examples.content_pipeline"
ISO_UTC_MICROS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}\+00:00$")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
STEP_FIELDS = {"status", "attempts", "started_at", "finished_at", "output", "error"}
# Keys that come and go on their own while workers idle: the sweeper's turn and the (possibly empty) lease index.
TRANSIENT_KEYS = {keys.SWEEPER_LOCK, keys.LEASES}


def orchestrator(*args: str, redis_url: str, timeout: float = 90, **settings: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m orchestrator.cli ARGS`` as a user would, with REDIS_URL, ORCH_IMPORTS and ``settings`` set."""
    env = {**os.environ, "REDIS_URL": redis_url, "ORCH_IMPORTS": IMPORTS, **settings}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_clean_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A non-zero exit with one ``error:`` line on stderr holding every needle, and no traceback anywhere."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def footprint(r: redis.Redis) -> tuple[set[str], int, dict[str, int]]:
    """Everything a submit would write: orchestrator keys, the runs index, the step queues."""
    names = {str(k) for k in r.keys(f"{keys.PREFIX}:*") if k not in TRANSIENT_KEYS}
    return names, r.zcard(keys.RUNS_INDEX), {q: queue_length(r, q) for q in ("llm", "cpu")}


def run_hashes(r: redis.Redis) -> set[str]:
    return {str(k) for k in r.keys(f"{keys.PREFIX}:{{*}}")}


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def tiny_file(tmp_path: Path, unique: str) -> str:
    return write(tmp_path / "tiny.yaml", f"name: tiny_{unique}\nsteps:\n  - {{name: only, uses: noop}}\n")


@pytest.fixture
def typed_inputs_file(tmp_path: Path, unique: str) -> str:
    return write(
        tmp_path / "typed.yaml",
        f"name: typed_{unique}\n"
        "inputs:\n  topic: {type: string}\n  n: {type: integer, default: 1}\n"
        "steps:\n  - {name: only, uses: noop}\n",
    )


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- validate ------------------------------------------------------------------------------------------------------


def test_validate_accepts_the_example_file(redis_url: str) -> None:
    proc = orchestrator("validate", str(EXAMPLE), redis_url=redis_url)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: content_pipeline_file version 1, 6 steps")


def test_validate_refuses_a_cycle_and_names_it(redis_url: str, tmp_path: Path) -> None:
    path = write(
        tmp_path / "cycle.yaml",
        "name: cyclic\nsteps:\n"
        "  - {name: a, uses: noop, depends_on: [c]}\n"
        "  - {name: b, uses: noop, depends_on: [a]}\n"
        "  - {name: c, uses: noop, depends_on: [b]}\n",
    )

    assert_clean_failure(orchestrator("validate", path, redis_url=redis_url), "dependency cycle: a -> b -> c -> a")


def test_validate_refuses_malformed_yaml_naming_the_line(redis_url: str, tmp_path: Path) -> None:
    path = write(tmp_path / "broken.yaml", "name: broken\nsteps:\n  - name: a\n    uses: noop\n   oops: 1\n")

    assert_clean_failure(orchestrator("validate", path, redis_url=redis_url), "malformed YAML", "line 5")


def test_validate_refuses_an_unknown_key_naming_it(redis_url: str, tmp_path: Path) -> None:
    path = write(tmp_path / "typo.yaml", "name: typo\nsteps:\n  - {name: a, uses: noop, depnds_on: [b]}\n")

    assert_clean_failure(orchestrator("validate", path, redis_url=redis_url), "step 'a'", "depnds_on: unknown key")


# -- submit and status ---------------------------------------------------------------------------------------------


def test_submit_wait_json_prints_the_finished_runs_status_and_status_json_prints_the_same(
    redis_url: str, workers: LocalWorkers
) -> None:
    proc = orchestrator(
        "submit", str(EXAMPLE), "--input", "topic=Redis streams", "--wait", "--json", redis_url=redis_url
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1, "exactly one JSON object"
    view = json.loads(proc.stdout)
    assert RUN_ID.match(view["run_id"])
    assert view["workflow"] == "content_pipeline_file"
    assert view["version"] == 1
    assert view["status"] == "succeeded", view.get("error")
    assert view["inputs"] == {"topic": "Redis streams", "audience": "developers"}
    steps: dict[str, Any] = view["steps"]
    assert list(steps) == ["research", "blog_post", "social_posts", "email_newsletter", "seo_metadata", "final_review"]
    for name, step in steps.items():
        assert set(step) >= STEP_FIELDS, name
        assert step["status"] == "succeeded", name
        assert step["error"] is None
        assert ISO_UTC_MICROS.match(step["started_at"]), step
        assert ISO_UTC_MICROS.match(step["finished_at"]), step
        assert step["finished_at"] >= step["started_at"]
    assert steps["social_posts"]["attempts"] == 2, "one scripted rate limit, then success"
    assert all(s["attempts"] == 1 for n, s in steps.items() if n != "social_posts")
    research = steps["research"]["output"]
    assert research["word_count"] == len(research["text"].split()) > 0
    assert set(steps["seo_metadata"]["output"]["data"]) == {"title", "description", "keywords"}
    assert steps["final_review"]["output"]["approved"] is True
    assert view["usage"]["input_tokens"] > 0
    assert view["usage"]["output_tokens"] > 0

    status = orchestrator("status", view["run_id"], "--json", redis_url=redis_url)

    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == view


def test_submit_json_prints_only_the_run_id(
    redis_url: str, workers: LocalWorkers, client: Client, tiny_file: str
) -> None:
    proc = orchestrator("submit", tiny_file, "--json", redis_url=redis_url)

    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert set(printed) == {"run_id"}
    assert client.wait(printed["run_id"], timeout=30)["status"] == "succeeded"


def test_plain_submit_prints_the_run_id_alone(
    redis_url: str, workers: LocalWorkers, client: Client, tiny_file: str
) -> None:
    proc = orchestrator("submit", tiny_file, redis_url=redis_url)

    assert proc.returncode == 0, proc.stderr
    assert RUN_ID.match(proc.stdout.strip()), proc.stdout
    assert proc.stdout.count("\n") == 1
    assert client.wait(proc.stdout.strip(), timeout=30)["status"] == "succeeded"


def test_status_of_an_unknown_run_fails_with_one_clear_line(redis_url: str) -> None:
    assert_clean_failure(
        orchestrator("status", "unknown-id", "--json", redis_url=redis_url), "unknown run 'unknown-id'"
    )


def test_submit_wait_exits_non_zero_when_the_run_fails(
    redis_url: str, workers: LocalWorkers, tmp_path: Path, unique: str
) -> None:
    path = write(
        tmp_path / "fails.yaml",
        f"name: fails_{unique}\nsteps:\n"
        "  - {name: first, uses: noop}\n"
        "  - {name: broken, uses: python, depends_on: [first], with: {function: tests.fail}}\n",
    )

    proc = orchestrator("submit", path, "--wait", "--json", redis_url=redis_url)

    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    view = json.loads(proc.stdout)
    assert view["status"] == "failed"
    assert view["steps"]["broken"]["status"] == "failed"
    assert "broken" in view["error"]
    assert "broken on purpose" in view["error"]


# -- nothing written when a submit is refused ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "needles"),
    [
        ((), ("'topic'", "required")),
        (("--input", "topic=x", "--input", "n=abc"), ("n", "'abc'", "integer")),
        (("--input", "topic"), ("'topic'", "KEY=VALUE")),
    ],
    ids=["missing-required", "wrong-type", "no-equals"],
)
def test_bad_inputs_are_refused_clearly_and_nothing_is_written_to_redis(
    *,
    redis_url: str,
    workers: LocalWorkers,
    redis_client: redis.Redis,
    typed_inputs_file: str,
    inputs: tuple[str, ...],
    needles: tuple[str, ...],
) -> None:
    before = footprint(redis_client)

    proc = orchestrator("submit", typed_inputs_file, *inputs, redis_url=redis_url)

    assert_clean_failure(proc, *needles)
    assert footprint(redis_client) == before


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        (
            "  - {name: a, uses: noop, depends_on: [b]}\n  - {name: b, uses: noop, depends_on: [a]}\n",
            ("dependency cycle",),
        ),
        ("  - {name: a, uses: python, with: {function: os.system}}\n", ("step 'a'", "'os.system'")),
    ],
    ids=["cycle", "unregistered-function"],
)
def test_an_invalid_workflow_file_is_refused_and_nothing_is_written_to_redis(
    *,
    redis_url: str,
    workers: LocalWorkers,
    redis_client: redis.Redis,
    tmp_path: Path,
    unique: str,
    body: str,
    needles: tuple[str, ...],
) -> None:
    path = write(tmp_path / "invalid.yaml", f"name: invalid_{unique}\nsteps:\n{body}")
    before = footprint(redis_client)

    proc = orchestrator("submit", path, redis_url=redis_url)

    assert_clean_failure(proc, *needles)
    assert footprint(redis_client) == before


# -- Redis that does not answer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "submit"])
def test_a_redis_that_does_not_answer_is_reported_without_a_traceback(
    closed_port: int, tiny_file: str, command: str
) -> None:
    args = ("status", "some-run") if command == "status" else ("submit", tiny_file)

    proc = orchestrator(*args, redis_url=f"redis://127.0.0.1:{closed_port}/0", timeout=60)

    assert_clean_failure(proc, "does not answer", f"127.0.0.1:{closed_port}")


@pytest.mark.parametrize("command", ["status", "submit"])
def test_a_redis_cluster_with_no_seed_node_answering_is_reported_as_a_plain_redis_is(
    closed_port: int, redis_url: str, tiny_file: str, command: str
) -> None:
    # A cluster client fails when it is built (it reads the slot map), a plain one at its first command: one line each.
    args = ("status", "some-run") if command == "status" else ("submit", tiny_file)

    proc = orchestrator(
        *args, redis_url=f"redis+cluster://127.0.0.1:{closed_port}", timeout=60, ORCH_BROKER_URL=redis_url
    )

    assert_clean_failure(proc, "does not answer", f"127.0.0.1:{closed_port}")


# -- idempotency and retention -------------------------------------------------------------------------------------


def test_submitting_twice_with_one_idempotency_key_gives_one_run(
    *, redis_url: str, workers: LocalWorkers, client: Client, redis_client: redis.Redis, tiny_file: str, unique: str
) -> None:
    before = run_hashes(redis_client)
    key = f"order-{unique}"

    first = orchestrator("submit", tiny_file, "--idempotency-key", key, redis_url=redis_url)
    second = orchestrator("submit", tiny_file, "--idempotency-key", key, "--json", redis_url=redis_url)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    run_id = first.stdout.strip()
    assert json.loads(second.stdout) == {"run_id": run_id}
    assert run_hashes(redis_client) - before == {keys.run_key(run_id)}
    assert client.wait(run_id, timeout=30)["status"] == "succeeded"


def test_a_finished_runs_hash_expires_after_the_retention(
    redis_url: str, workers: LocalWorkers, settings: Settings, redis_client: redis.Redis, tiny_file: str
) -> None:
    proc = orchestrator("submit", tiny_file, "--wait", "--json", redis_url=redis_url)
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]

    ttl = redis_client.ttl(keys.run_key(run_id))

    assert 0 < ttl <= settings.retention_s


# -- run control from the command line -----------------------------------------------------------------------------


def test_watch_cancel_and_resume_work_from_the_command_line(
    redis_url: str, workers: LocalWorkers, redis_client: redis.Redis, tmp_path: Path, unique: str
) -> None:
    path = write(
        tmp_path / "gate.yaml",
        f"name: cli_control_{unique}\nsteps:\n"
        "  - {name: first, uses: python, with: {function: tests.count_calls}}\n"
        "  - {name: gated, uses: python, depends_on: [first], with: {function: tests.gate}}\n",
    )
    run_id = orchestrator("submit", path, redis_url=redis_url).stdout.strip()

    watched = orchestrator("watch", run_id, redis_url=redis_url)
    assert watched.returncode == 1, "watch exits non-zero when the run fails"
    assert "gated" in watched.stdout
    assert "run failed" in watched.stdout

    redis_client.set(f"test:fixed:{run_id}", 1)
    resumed = orchestrator("resume", run_id, "--wait", "--json", redis_url=redis_url)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "succeeded"
    assert redis_client.get(f"test:calls:{run_id}:first") == "1"

    again = orchestrator("cancel", run_id, redis_url=redis_url)
    assert again.returncode == 0
    assert "already ended (succeeded)" in again.stdout
    refused = orchestrator("resume", run_id, redis_url=redis_url)
    assert_clean_failure(refused, "nothing to resume")


def test_approve_and_reject_from_the_command_line_name_who_decides(
    redis_url: str, workers: LocalWorkers, client: Client, tmp_path: Path, unique: str
) -> None:
    path = write(
        tmp_path / "review.yaml",
        f"name: cli_review_{unique}\nsteps:\n"
        "  - {name: review, uses: approval, with: {approvers: [alice]}}\n"
        "  - {name: publish, uses: noop, depends_on: [review]}\n",
    )
    run_id = orchestrator("submit", path, redis_url=redis_url).stdout.strip()

    def waiting() -> bool:
        return bool(client.status(run_id)["steps"]["review"]["status"] == "waiting")

    wait_for(waiting, what="the review to wait")
    assert_clean_failure(
        orchestrator("reject", run_id, "review", "--as", "mallory", redis_url=redis_url), "may not decide"
    )
    approved = orchestrator("approve", run_id, "review", "--as", "alice", "--comment", "ok", redis_url=redis_url)
    assert approved.returncode == 0, approved.stderr
    assert "approved by alice" in approved.stdout
    assert client.wait(run_id, timeout=30)["status"] == "succeeded"


def test_runs_lists_recent_runs_newest_first_filtered_by_workflow_and_status(
    redis_url: str, workers: LocalWorkers, client: Client, tmp_path: Path, unique: str
) -> None:
    good = write(tmp_path / "good.yaml", f"name: listed_{unique}\nsteps:\n  - {{name: only, uses: noop}}\n")
    bad = write(
        tmp_path / "bad.yaml",
        f"name: listed_{unique}\nversion: 2\nsteps:\n"
        "  - {name: broken, uses: python, with: {function: tests.fail}}\n",
    )
    first = client.submit(load_workflow_file(good))
    second = client.submit(load_workflow_file(bad))
    client.wait(first, timeout=60)
    client.wait(second, timeout=60)

    listed = json.loads(orchestrator("runs", "--workflow", f"listed_{unique}", "--json", redis_url=redis_url).stdout)
    failed = json.loads(
        orchestrator(
            "runs", "--workflow", f"listed_{unique}", "--status", "failed", "--json", redis_url=redis_url
        ).stdout
    )
    table = orchestrator("runs", "--limit", "5", redis_url=redis_url)

    assert [r["run_id"] for r in listed] == [second, first]
    assert [(r["run_id"], r["version"], r["status"]) for r in failed] == [(second, 2, "failed")]
    assert table.returncode == 0
    assert second[:8] in table.stdout


def _llm_file(tmp_path: Path, name: str, *, version: int = 1, budget: str = "") -> str:
    """A one-step LLM workflow (the offline provider answers it, with token usage and a list price)."""
    return write(
        tmp_path / f"{name}_{version}.yaml",
        f"name: {name}\nversion: {version}\n{budget}steps:\n"
        "  - {name: draft, uses: llm, with: {prompt: 'Write about queues', model: claude-haiku-4-5, max_tokens: 80}}\n",
    )


def test_runs_shows_duration_cost_tokens_and_a_failed_runs_error_and_pages_newest_first(
    redis_url: str, workers: LocalWorkers, client: Client, tmp_path: Path, unique: str
) -> None:
    name = f"costed_{unique}"
    paid = client.submit(load_workflow_file(_llm_file(tmp_path, name)))
    client.wait(paid, timeout=60)
    broken = write(
        tmp_path / "broken.yaml",
        f"name: {name}\nversion: 2\nsteps:\n  - {{name: broken, uses: python, with: {{function: tests.fail}}}}\n",
    )
    failed = client.submit(load_workflow_file(broken))
    view = client.wait(failed, timeout=60)

    listed = json.loads(orchestrator("runs", "--workflow", name, "--json", redis_url=redis_url).stdout)
    first_page = json.loads(
        orchestrator("runs", "--workflow", name, "--limit", "1", "--json", redis_url=redis_url).stdout
    )
    second_page = orchestrator(
        "runs", "--workflow", name, "--limit", "1", "--offset", "1", "--json", redis_url=redis_url
    )
    only_failed = orchestrator("runs", "--workflow", name, "--status", "failed", redis_url=redis_url)
    table = orchestrator("runs", "--workflow", name, "--limit", "1", redis_url=redis_url)

    assert [r["run_id"] for r in listed] == [failed, paid]
    newest, oldest = listed
    assert newest["error"] == view["error"]
    assert "broken" in newest["error"]
    assert newest["cost"] is None
    paid_view = client.status(paid)
    assert oldest["cost"] == paid_view["cost"] > 0
    assert oldest["llm_calls"] == 1
    assert oldest["usage"]["input_tokens"] > 0
    assert oldest["usage"]["output_tokens"] > 0
    assert oldest["error"] is None
    assert ISO_UTC_MICROS.match(oldest["started_at"])
    assert 0 <= oldest["duration_s"] < 60
    assert [r["run_id"] for r in first_page] == [failed]
    assert second_page.returncode == 0, second_page.stderr
    assert [r["run_id"] for r in json.loads(second_page.stdout)] == [paid]
    assert only_failed.returncode == 0, only_failed.stderr
    assert failed in only_failed.stdout
    assert paid not in only_failed.stdout
    assert "broken" in only_failed.stdout, "the failed run's error is a column"
    for column in ("started", "duration", "cost", "tokens", "error"):
        assert column in table.stdout
    assert "orchestrator runs --offset 1 --limit 1" in table.stdout, "the table says how to see the next page"


def test_runs_refuses_a_negative_offset_naming_it(redis_url: str) -> None:
    proc = orchestrator("runs", "--offset", "-1", redis_url=redis_url)
    assert proc.returncode != 0
    assert "--offset" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_version_prints_the_installed_package_version(redis_url: str) -> None:
    proc = orchestrator("--version", redis_url=redis_url)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"orchestrator {importlib.metadata.version('llm-orchestrator')}"


def test_workflows_lists_a_workflow_submitted_as_a_file_once_no_run_is_in_flight(
    redis_url: str, workers: LocalWorkers, client: Client, tiny_file: str, unique: str
) -> None:
    run_id = orchestrator("submit", tiny_file, redis_url=redis_url).stdout.strip()
    assert client.wait(run_id, timeout=30)["status"] == "succeeded"

    rows = json.loads(orchestrator("workflows", "--json", redis_url=redis_url).stdout)
    table = orchestrator("workflows", redis_url=redis_url)

    (row,) = [r for r in rows if r["name"] == f"tiny_{unique}"]
    spec = load_workflow_file(tiny_file)
    assert (row["version"], row["definition_hash"], row["source"], row["in_flight"]) == (
        1,
        spec.definition_hash,
        "submitted",
        0,
    )
    assert row["last_submitted"] > 0
    assert f"tiny_{unique}" in table.stdout
    assert spec.definition_hash[:12] in table.stdout


def test_status_and_watch_show_each_steps_cost_and_tokens_and_the_budget_left(
    redis_url: str, workers: LocalWorkers, client: Client, tmp_path: Path, unique: str
) -> None:
    path = _llm_file(tmp_path, f"budgeted_{unique}", budget="budget_usd: 0.5\n")
    run_id = client.submit(load_workflow_file(path))
    view = client.wait(run_id, timeout=60)
    assert view["status"] == "succeeded"
    cost, usage = view["steps"]["draft"]["cost"], view["steps"]["draft"]["usage"]

    shown = orchestrator("status", run_id, redis_url=redis_url)
    watched = orchestrator("watch", run_id, redis_url=redis_url)

    assert shown.returncode == 0, shown.stderr
    tokens = f"{usage['input_tokens']} in / {usage['output_tokens']} out"
    for output in (shown.stdout, watched.stdout):
        assert f"${cost:.4f}" in output
        assert tokens in output
        assert f"budget left ${0.5 - view['cost']:.4f} of $0.5000" in output
        assert "duration" in output
    assert watched.returncode == 0, watched.stderr
