"""An ``llm`` step's ``timeout_s`` bounds its whole attempt on real workers, rendering included (issue 12, item 4)."""

from __future__ import annotations

import time

import pytest

from orchestrator import Client
from orchestrator.dev.local_workers import LocalWorkers
from tests.integration.helpers import llm, ts, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_an_llm_step_whose_prompt_renders_past_its_timeout_fails_as_template_limit_instead_of_succeeding(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    # Each iteration takes a tenth of a second and allocates next to nothing: unbounded, some 40 s of CPU.
    step = llm("writer", timeout_s=2)
    step["with"]["prompt"] = "{% set s = inputs.topic * 100000 %}{% for i in range(300) %}{{ s|max }}{% endfor %}"
    submitted = time.monotonic()
    run_id = client.submit(workflow(f"sec_slow_prompt_{unique}", step))

    view = client.wait(run_id, timeout=20)

    writer = view["steps"]["writer"]
    assert view["status"] == "failed"
    assert writer["error"]["type"] == "template_limit"
    assert "time limit of 2s" in writer["error"]["message"]
    assert writer["attempts"] == 1, "not retried"
    assert ts(writer["finished_at"]) - ts(writer["started_at"]) < 2 + 2
    assert time.monotonic() - submitted < 15
    assert not view.get("usage"), "the LLM was never called"
