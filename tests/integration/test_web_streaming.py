"""The run page shows a streaming step's text as it grows (headless Chromium; fixtures from ``test_web``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from orchestrator import Client
from orchestrator.dev.local_workers import LocalWorkers
from tests.integration import test_web
from tests.integration.test_streaming import streaming
from tests.integration.test_web import WAIT_MS, _expect

# The browser, page and server fixtures of the web tests, shared.
browser, page, base_url = test_web.browser, test_web.page, test_web.base_url

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_the_step_panel_shows_the_streamed_text_while_the_step_runs_then_its_output(
    page: Page, base_url: str, client: Client, workers: LocalWorkers, unique: str
) -> None:
    expect = _expect()
    run_id = client.submit(streaming(f"web_stream_{unique}", latency=6.0, max_tokens=300))
    page.goto(f"{base_url}/ui/runs/{run_id}")
    expect(page.locator('[data-step="write"][data-status="running"]')).to_be_attached(timeout=WAIT_MS)
    page.locator('[data-step="write"]').click()

    output = page.locator("#panel-output")
    expect(output).to_have_class("streaming", timeout=WAIT_MS)
    expect(output).to_contain_text("Regarding", timeout=WAIT_MS)
    partial = output.text_content() or ""
    assert client.status(run_id)["steps"]["write"]["status"] == "running", "the text showed before the step ended"

    expect(page.locator('[data-step="write"]')).to_have_attribute("data-status", "succeeded", timeout=WAIT_MS)
    text = client.status(run_id)["steps"]["write"]["output"]["text"]
    assert text.startswith(partial), "what streamed is the start of the final text"
    assert len(partial) < len(text)
    expect(output).to_contain_text(text[-40:], timeout=WAIT_MS)
    expect(output).not_to_have_class("streaming")
