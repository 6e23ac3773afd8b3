"""End to end on real Redis and real worker processes: fan-out, joins, retries, failures."""

from __future__ import annotations

import pytest

from orchestrator import Client
from orchestrator.dev.local_workers import LocalWorkers
from tests.integration.helpers import llm, py, ts, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def test_the_content_pipeline_succeeds_with_every_output(client: Client, workers: LocalWorkers) -> None:
    import examples.content_pipeline as example

    run_id = client.submit(example.pipeline, {"topic": "Redis streams"})
    view = client.wait(run_id, timeout=60)

    assert view["status"] == "succeeded", view["error"]
    steps = view["steps"]
    assert set(steps) == {"research", "blog_post", "social_posts", "email_newsletter", "seo_metadata", "final_review"}
    for name in ("research", "blog_post", "social_posts", "email_newsletter"):
        out = steps[name]["output"]
        assert out["text"]
        assert out["word_count"] == len(out["text"].split())
        assert out["usage"]["input_tokens"] > 0
        assert out["usage"]["output_tokens"] > 0
    assert set(steps["seo_metadata"]["output"]["data"]) == {"title", "description", "keywords"}
    assert steps["final_review"]["output"]["approved"] is True
    assert view["usage"]["output_tokens"] == sum(
        s["output"]["usage"]["output_tokens"] for s in steps.values() if s["kind"] == "llm"
    )


def test_independent_steps_run_in_parallel_across_workers(client: Client, workers: LocalWorkers, unique: str) -> None:
    spec = workflow(
        f"fanout_{unique}",
        llm("root"),
        *(py(f"branch{i}", "tests.sleep", "root", seconds=2.0) for i in range(4)),
        llm("join", *(f"branch{i}" for i in range(4))),
    )
    view = client.wait(client.submit(spec), timeout=60)

    assert view["status"] == "succeeded"
    branches = [view["steps"][f"branch{i}"] for i in range(4)]
    latest_start = max(ts(b["started_at"]) for b in branches)
    earliest_end = min(ts(b["finished_at"]) for b in branches)
    assert latest_start < earliest_end, "all four 2 s branches must overlap in time"
    assert len({b["output"]["pid"] for b in branches}) == 4, "four slots on two workers ran them"
    assert ts(view["steps"]["join"]["started_at"]) >= max(ts(b["finished_at"]) for b in branches)


def test_a_step_starts_when_its_own_dependencies_are_done_with_no_false_barrier(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    # A→C, B→C, B→D: not series-parallel. With A slow, D must not wait for A.
    spec = workflow(
        f"nonsp_{unique}",
        py("a", "tests.sleep", seconds=2.0),
        py("b", "tests.sleep", seconds=0.1),
        py("c", "tests.sleep", "a", "b"),
        py("d", "tests.sleep", "b"),
    )
    view = client.wait(client.submit(spec), timeout=60)

    steps = view["steps"]
    assert view["status"] == "succeeded"
    assert ts(steps["d"]["finished_at"]) < ts(steps["a"]["finished_at"]) - 1.0
    assert ts(steps["d"]["started_at"]) - ts(steps["b"]["finished_at"]) < 0.5
    assert ts(steps["c"]["started_at"]) >= ts(steps["a"]["finished_at"])


def test_retryable_errors_are_retried_and_every_attempt_is_recorded(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    spec = workflow(
        f"retry_{unique}",
        llm(
            "flaky",
            errors=("rate_limit", "overloaded"),
            retry_after_s=1.0,
            retry={"max_attempts": 4, "backoff_s": 0.1, "backoff_max_s": 0.2},
        ),
    )
    view = client.wait(client.submit(spec), timeout=60)

    step = view["steps"]["flaky"]
    assert view["status"] == "succeeded"
    assert step["attempts"] == 3
    assert [(e["type"], e["status"], e["attempt"]) for e in step["errors"]] == [
        ("rate_limit", 429, 1),
        ("overloaded", 529, 2),
    ]
    assert step["errors"][0]["retry_after"] == 1.0
    # The countdown is never below retry-after, whatever the (tiny) backoff says.
    assert ts(step["finished_at"]) - ts(step["started_at"]) >= 1.0


def test_a_non_retryable_error_fails_at_once_and_dependents_are_upstream_failed(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    spec = workflow(
        f"fail_{unique}",
        llm("root"),
        llm("broken", "root", errors=("bad_request",)),
        llm("after_broken", "broken"),
        llm("last", "after_broken"),
        py("sibling", "tests.sleep", "root", seconds=0.5),
        llm("after_sibling", "sibling"),
    )
    view = client.wait(client.submit(spec), timeout=60)

    steps = view["steps"]
    assert view["status"] == "failed"
    assert steps["broken"]["status"] == "failed"
    assert steps["broken"]["attempts"] == 1
    assert steps["broken"]["error"]["status"] == 400
    assert steps["broken"]["error"]["type"] == "bad_request"
    assert steps["after_broken"]["status"] == "upstream_failed"
    assert steps["last"]["status"] == "upstream_failed"
    assert steps["after_broken"]["output"] is None
    assert steps["sibling"]["status"] == "succeeded"
    assert steps["after_sibling"]["status"] == "succeeded"
    assert "broken" in view["error"]
    assert "bad_request" in view["error"]


def test_retries_stop_at_the_step_max_attempts(client: Client, workers: LocalWorkers, unique: str) -> None:
    spec = workflow(
        f"exhaust_{unique}",
        llm("doomed", errors=("server_error",) * 5, retry={"max_attempts": 3, "backoff_s": 0.05}),
    )
    view = client.wait(client.submit(spec), timeout=60)

    step = view["steps"]["doomed"]
    assert view["status"] == "failed"
    assert step["attempts"] == 3
    assert [e["status"] for e in step["errors"]] == [500, 500, 500]


def test_a_python_exception_fails_the_step_with_its_message(client: Client, workers: LocalWorkers, unique: str) -> None:
    view = client.wait(client.submit(workflow(f"pyfail_{unique}", py("bad", "tests.fail"))), timeout=60)

    assert view["status"] == "failed"
    assert view["steps"]["bad"]["error"]["message"] == "ValueError: bad is broken on purpose"
    assert view["steps"]["bad"]["attempts"] == 1


def test_an_output_over_the_size_cap_fails_the_step_clearly(client: Client, workers: LocalWorkers, unique: str) -> None:
    view = client.wait(client.submit(workflow(f"big_{unique}", py("big", "tests.big_output", size=2_000_000))), 60)

    error = view["steps"]["big"]["error"]
    assert view["status"] == "failed"
    assert error["type"] == "output_too_large"
    assert "limit is 1048576" in error["message"]
