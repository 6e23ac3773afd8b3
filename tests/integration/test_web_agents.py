"""The run page shows an agent's conversation as it grows (headless Chromium; fixtures from ``test_web``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from orchestrator import Client
from orchestrator.dev.local_workers import LocalWorkers
from tests.integration import test_web
from tests.integration.helpers import workflow
from tests.integration.test_web import WAIT_MS, _expect

# The browser, page and server fixtures of the web tests, shared.
browser, page, base_url = test_web.browser, test_web.page, test_web.base_url

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_the_step_panel_shows_an_agents_turns_and_tool_calls_as_they_happen(
    page: Page, base_url: str, client: Client, workers: LocalWorkers, unique: str
) -> None:
    expect = _expect()
    script = [
        [{"name": "calculator", "input": {"expression": "6*7"}}],
        [{"name": "notes.write", "input": {"key": "answer", "value": 42}}],
    ]
    step = {
        "name": "agent",
        "uses": "agent",
        "with": {
            "prompt": "Research tides",
            "max_tokens": 120,
            "tools": ["calculator", "notes.write"],
            "stream": True,
            "simulate": {"latency_s": 2.0, "tool_calls": script},
        },
    }
    run_id = client.submit(workflow(f"web_agent_{unique}", step))
    page.goto(f"{base_url}/ui/runs/{run_id}")
    expect(page.locator('[data-step="agent"][data-status="running"]')).to_be_attached(timeout=WAIT_MS)
    page.locator('[data-step="agent"]').click()

    turns = page.locator("#conversation-turns")
    calculator = turns.locator('[data-turn="1"] [data-tool="calculator"]')
    expect(calculator).to_contain_text('{"expression":"6*7"}', timeout=WAIT_MS)
    expect(calculator).to_contain_text('→ {"result":42}', timeout=WAIT_MS)
    expect(turns.locator(".writing")).to_be_attached(timeout=WAIT_MS)
    assert client.status(run_id)["steps"]["agent"]["status"] == "running", "the conversation showed mid-loop"

    expect(page.locator('[data-step="agent"]')).to_have_attribute("data-status", "succeeded", timeout=WAIT_MS)
    output = client.status(run_id)["steps"]["agent"]["output"]
    expect(turns.locator('[data-turn="2"] [data-tool="notes.write"]')).to_contain_text('→ {"ok":true}')
    last = turns.locator(f'[data-turn="{output["turns"]}"]')
    expect(last).to_contain_text(output["text"][-40:], timeout=WAIT_MS)
    expect(turns.locator(".writing")).to_have_count(0)
