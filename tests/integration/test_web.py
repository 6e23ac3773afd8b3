"""The web page in headless Chromium (Playwright), against the real HTTP API, real Redis and real workers.

Chromium is Debian's (``/usr/bin/chromium``, or ``ORCH_TEST_CHROMIUM``); Playwright never downloads a browser here.
Without Chromium or the Playwright package the tests skip, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import uvicorn
import yaml
from fastapi import FastAPI

from orchestrator import Client, Settings
from orchestrator.api import ApiAuth, create_app
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.web import router as web_router
from tests.conftest import ARTIFACTS, IN_CI
from tests.integration.helpers import llm, py, workflow

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CHROMIUM = os.environ.get("ORCH_TEST_CHROMIUM", "/usr/bin/chromium")
# Playwright gives every launch a fresh, empty profile (its own --user-data-dir); the rest keeps Chromium from
# reaching for the network, which is closed here.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "web-test-token"
WAIT_MS = 30_000


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the browser tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Debian Chromium driven by Playwright, for the whole module."""
    if not Path(CHROMIUM).is_file():
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set ORCH_TEST_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[dev]')")
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        playwright.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page (its own session storage); fails the test if the page's script throws."""
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"the page's script failed: {errors}"


def _with_web_page(app: FastAPI) -> FastAPI:
    # Until the API includes the web router itself.
    if not any(getattr(route, "path", None) == "/" for route in app.routes):
        app.include_router(web_router)
    return app


@contextmanager
def _serve(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", ws="none", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="web-test-api", daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started or not thread.is_alive():
                break
            thread.join(0.05)
        assert server.started, "the API server did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def base_url(settings: Settings, client: Client) -> Iterator[str]:
    """The API with the web page, without tokens (loopback only)."""
    with _serve(_with_web_page(create_app(settings, client, auth=ApiAuth()))) as url:
        yield url


def _left(page: Page, step: str) -> float:
    box = page.locator(f'[data-step="{step}"]').bounding_box()
    assert box is not None, f"step {step} is not drawn"
    return box["x"]


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


def test_the_run_page_draws_the_dag_and_colours_each_step_live_until_all_succeed(
    page: Page, base_url: str, client: Client, workers: LocalWorkers, unique: str
) -> None:
    expect = _expect()
    steps = {"fetch": (), "outline": ("fetch",), "facts": ("fetch",), "write": ("outline", "facts")}
    spec = workflow(f"web_{unique}", *(py(name, "tests.sleep", *deps, seconds=1.0) for name, deps in steps.items()))
    run_id = client.submit(spec)
    page.goto(f"{base_url}/ui/runs/{run_id}")

    boxes = page.locator("[data-step]")
    expect(boxes).to_have_count(4)
    expect(page.locator("path.edge")).to_have_count(4)
    expect(page.locator('[data-step][data-status="running"]').first).to_be_attached(timeout=WAIT_MS)
    expect(page.locator("#live")).to_have_text("● live")
    for name in steps:
        expect(page.locator(f'[data-step="{name}"]')).to_have_attribute("data-status", "succeeded", timeout=WAIT_MS)
    expect(page.locator("#run-status")).to_have_text("succeeded", timeout=WAIT_MS)
    expect(page.locator("#progress-text")).to_have_text("4 succeeded")

    # Layers by longest path, left to right: fetch | outline, facts | write.
    x = {name: _left(page, name) for name in steps}
    assert x["fetch"] < x["outline"] == x["facts"] < x["write"]

    page.locator('[data-step="facts"]').click()
    output = client.status(run_id)["steps"]["facts"]["output"]
    expect(page.locator("#panel-title")).to_have_text("facts")
    expect(page.locator("#panel-output")).to_contain_text('"step": "facts"')
    expect(page.locator("#panel-output")).to_contain_text(f'"pid": {output["pid"]}')
    expect(page.locator("#resume-from")).to_have_text("Resume from facts")
    expect(page.locator("#resume-from")).to_be_enabled()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-run.png"), full_page=True)


def test_the_runs_list_shows_cost_duration_and_a_failed_runs_error_filters_by_status_and_pages(
    page: Page, base_url: str, client: Client, workers: LocalWorkers, unique: str
) -> None:
    expect = _expect()
    name = f"web_list_{unique}"
    paid = [client.submit(workflow(name, llm("draft"))) for _ in range(2)]
    broken = client.submit(workflow(name, py("a", "tests.fail")))
    for run_id in [*paid, broken]:
        client.wait(run_id, timeout=60)
    cost = client.status(paid[1])["cost"]
    error = client.status(broken)["error"]

    page.goto(f"{base_url}/?workflow={name}&limit=2")

    rows = page.locator("#runs tbody tr")
    expect(rows).to_have_count(2, timeout=WAIT_MS)
    expect(rows.nth(0)).to_have_attribute("data-run-id", broken)
    expect(rows.nth(0).locator(".run-error")).to_have_text(error)
    expect(rows.nth(1)).to_have_attribute("data-run-id", paid[1])
    expect(rows.nth(1).locator(".cost")).to_have_text(f"${cost:.4f}")
    expect(rows.nth(1)).to_contain_text(" s")
    expect(rows.nth(1)).to_contain_text(" in / ")
    expect(page.locator("#page-prev")).to_be_disabled()

    page.locator("#page-next").click()
    expect(rows).to_have_count(1, timeout=WAIT_MS)
    expect(rows.nth(0)).to_have_attribute("data-run-id", paid[0])
    assert "offset=2" in page.url
    expect(page.locator("#page-next")).to_be_disabled()
    page.locator("#page-prev").click()
    expect(rows).to_have_count(2, timeout=WAIT_MS)

    page.locator("#filter-status").select_option("failed")
    expect(rows).to_have_count(1, timeout=WAIT_MS)
    expect(rows.nth(0)).to_have_attribute("data-run-id", broken)
    assert "status=failed" in page.url
    assert "offset" not in page.url
    page.reload()
    expect(page.locator("#filter-status")).to_have_value("failed")
    expect(rows).to_have_count(1, timeout=WAIT_MS)


def test_cancel_and_resume_on_the_run_page_control_a_long_run(
    page: Page, base_url: str, client: Client, workers: LocalWorkers, unique: str
) -> None:
    expect = _expect()
    spec = workflow(f"web_cancel_{unique}", py("long", "tests.sleep", seconds=60.0), py("after", "tests.sleep", "long"))
    run_id = client.submit(spec)
    page.goto(f"{base_url}/ui/runs/{run_id}")
    expect(page.locator('[data-step="long"]')).to_have_attribute("data-status", "running", timeout=WAIT_MS)
    expect(page.locator("#resume")).to_be_disabled()

    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#cancel").click()

    expect(page.locator("#message")).to_contain_text(f"cancelled run {run_id}")
    expect(page.locator("#run-status")).to_have_text("cancelled", timeout=WAIT_MS)
    expect(page.locator('[data-step="long"]')).to_have_attribute("data-status", "cancelled")
    expect(page.locator('[data-step="after"]')).to_have_attribute("data-status", "cancelled")
    expect(page.locator("#cancel")).to_be_disabled()
    assert client.status(run_id)["status"] == "cancelled"

    # Resume from the page: the ended run's stream was closed; the page follows the new generation live again.
    page.locator("#resume").click()
    expect(page.locator("#message")).to_have_text("resumed (generation 2)")
    expect(page.locator('[data-step="long"]')).to_have_attribute("data-status", "running", timeout=WAIT_MS)
    expect(page.locator("#run-status")).to_have_text("running")
    expect(page.locator("#live")).to_have_text("● live")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#cancel").click()
    expect(page.locator("#run-status")).to_have_text("cancelled", timeout=WAIT_MS)
    assert client.status(run_id)["generation"] == 2


def test_with_tokens_configured_the_page_works_once_a_token_is_entered(
    page: Page, settings: Settings, client: Client, workers: LocalWorkers, unique: str
) -> None:
    expect = _expect()
    auth = ApiAuth.parse(json.dumps({TOKEN: {"principal": "web-test", "scopes": ["read", "write"]}}))
    run_id = client.submit(workflow(f"web_token_{unique}", py("only", "tests.sleep", seconds=0.5)))
    with _serve(_with_web_page(create_app(settings, client, auth=auth))) as url:
        page.goto(f"{url}/")
        expect(page.locator("#message")).to_contain_text("bearer token")

        page.locator("#token-form input").fill(TOKEN)
        page.locator("#token-form button[type=submit]").click()
        expect(page.locator("#token-form .token-state")).to_have_text("token set")
        row = page.locator(f'tr[data-run-id="{run_id}"]')
        expect(row).to_be_visible(timeout=WAIT_MS)
        expect(page.locator("#message")).to_be_hidden()
        page.screenshot(path=str(ARTIFACTS / "web-runs.png"), full_page=True)

        row.get_by_role("link").click()
        expect(page).to_have_url(f"{url}/ui/runs/{run_id}")
        expect(page.locator('[data-step="only"]')).to_have_attribute("data-status", "succeeded", timeout=WAIT_MS)
        expect(page.locator("#run-status")).to_have_text("succeeded", timeout=WAIT_MS)
        assert page.evaluate("sessionStorage.getItem('orchestrator.token')") == TOKEN


def _enter_token(page: Page, token: str) -> None:
    page.locator("#token-form input").fill(token)
    page.locator("#token-form button[type=submit]").click()
    _expect()(page.locator("#token-form .token-state")).to_have_text("token set")


def test_an_approval_step_waits_on_the_run_page_until_an_approver_decides_there(
    page: Page, settings: Settings, client: Client, workers: LocalWorkers, unique: str
) -> None:
    expect = _expect()
    editor, other = "web-editor-token", "web-other-token"
    auth = ApiAuth.parse(
        json.dumps(
            {
                editor: {"principal": "editor", "scopes": ["read", "approve"]},
                other: {"principal": "mallory", "scopes": ["read", "approve"]},
            }
        )
    )
    review = {
        "name": "review",
        "uses": "approval",
        "depends_on": ["draft"],
        "with": {"approvers": ["editor"], "message": "Publish it?"},
    }
    spec = workflow(
        f"web_approval_{unique}",
        py("draft", "tests.sleep", seconds=0.5),
        review,
        py("publish", "tests.sleep", "review", seconds=0.5),
    )
    run_id = client.submit(spec)
    with _serve(_with_web_page(create_app(settings, client, auth=auth))) as url:
        page.goto(f"{url}/ui/runs/{run_id}")
        _enter_token(page, other)
        box = page.locator('[data-step="review"]')
        expect(box).to_have_attribute("data-status", "waiting", timeout=WAIT_MS)
        expect(page.locator("#run-status")).to_have_text("waiting", timeout=WAIT_MS)
        expect(page.locator('[data-step="publish"]')).to_have_attribute("data-status", "pending")

        box.click()
        expect(page.locator("#approval-message")).to_have_text("Publish it?")
        expect(page.locator("#approval-facts")).to_contain_text("Approvers")
        expect(page.locator("#approval-facts")).to_contain_text("editor")
        expect(page.locator("#audit-empty")).to_be_visible()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-approval-waiting.png"), full_page=True)

        # Not an approver: the API's 403 is shown, the attempt audited, the step still waits.
        page.locator("#decision-comment").fill("let me in")
        page.locator("#approve").click()
        expect(page.locator("#decision-result")).to_contain_text("'mallory' may not decide step 'review'")
        expect(page.locator("#audit li")).to_have_count(1)
        expect(page.locator("#audit li").first).to_contain_text("mallory approve · refused: not an approver")
        expect(box).to_have_attribute("data-status", "waiting")

        _enter_token(page, editor)
        page.locator("#decision-comment").fill("Looks good")
        page.locator("#approve").click()
        expect(page.locator("#decision-result")).to_have_text("review approved by editor")
        for name in ("draft", "review", "publish"):
            expect(page.locator(f'[data-step="{name}"]')).to_have_attribute("data-status", "succeeded", timeout=WAIT_MS)
        expect(page.locator("#run-status")).to_have_text("succeeded", timeout=WAIT_MS)
        expect(page.locator("#decision-form")).to_be_hidden()
        audit = page.locator("#audit li")
        expect(audit).to_have_count(2)
        expect(audit.nth(1)).to_contain_text("editor approve · accepted")
        expect(audit.nth(1)).to_contain_text("Looks good")
        expect(page.locator("#approval-facts")).to_contain_text("approve by editor")
        expect(page.locator("#panel-output")).to_contain_text('"approved": true')
        page.screenshot(path=str(ARTIFACTS / "web-approval.png"), full_page=True)
    output = client.status(run_id)["steps"]["review"]["output"]
    assert output == {"approved": True, "decision": "approve", "by": "editor", "comment": "Looks good"}


def test_the_run_page_shows_cost_tokens_budget_left_and_duration_per_run_and_per_step(
    page: Page, base_url: str, client: Client, workers: LocalWorkers, unique: str
) -> None:
    expect = _expect()
    spec = workflow(f"web_cost_{unique}", llm("research"), llm("draft", "research", latency=0.3), budget_usd=0.5)
    run_id = client.submit(spec)
    page.goto(f"{base_url}/ui/runs/{run_id}")
    expect(page.locator("#run-status")).to_have_text("succeeded", timeout=WAIT_MS)
    status = client.status(run_id)
    cost, usage = status["cost"], status["usage"]
    assert cost > 0, status
    assert usage["input_tokens"] > 0, status

    # The figures follow the run's events (the status JSON is fetched again as steps finish); both sides print the
    # shortest decimal that round-trips, so the attribute is the status JSON's float.
    expect(page.locator("#run-cost")).to_have_attribute("data-usd", repr(cost), timeout=WAIT_MS)
    expect(page.locator("#run-cost")).to_have_text(re.compile(r"^Cost \$0\.\d+$"))
    expect(page.locator("#run-tokens")).to_have_text(
        f"Tokens {usage['input_tokens']:,} in / {usage['output_tokens']:,} out"
    )
    expect(page.locator("#budget-left")).to_have_attribute("data-usd", repr(0.5 - cost))
    expect(page.locator("#budget-left")).to_contain_text("of $0.5000")
    expect(page.locator("#duration")).to_have_text(re.compile(r"^Duration \d+\.\d s$"))

    # Per step: duration and cost on the box, cost and tokens in the panel.
    draft = status["steps"]["draft"]
    expect(page.locator('[data-step="draft"] .step-facts')).to_have_text(
        re.compile(r"^\d+\.\d s · \$0\.\d+ · \d+ tok$")
    )
    page.locator('[data-step="draft"]').click()
    facts = page.locator("#panel-facts")
    expect(facts).to_contain_text(f"{draft['usage']['input_tokens']:,} in / {draft['usage']['output_tokens']:,} out")
    expect(facts).to_contain_text("Cost$0.")
    expect(facts).to_contain_text(re.compile(r"Duration\d+\.\d s"))


def test_the_timeline_draws_a_bar_per_attempt_with_its_queue_wait_and_the_critical_path(
    page: Page, base_url: str, client: Client, workers: LocalWorkers, unique: str
) -> None:
    expect = _expect()
    retry = {"max_attempts": 3, "backoff_s": 0.2, "jitter": False}
    spec = workflow(
        f"web_gantt_{unique}",
        llm("research", latency=0.2),
        llm("draft", "research", errors=("server_error",), latency=0.2, retry=retry),
        py("aside", "tests.sleep", seconds=0.0),
    )
    run_id = client.submit(spec)
    page.goto(f"{base_url}/ui/runs/{run_id}")
    expect(page.locator("#run-status")).to_have_text("succeeded", timeout=WAIT_MS)
    assert client.status(run_id)["steps"]["draft"]["attempts"] == 2

    runs = page.locator('#gantt .gantt-run[data-name="draft"]')
    expect(runs).to_have_count(2)
    assert [runs.nth(i).get_attribute("data-attempt") for i in range(2)] == ["1", "2"]
    assert [runs.nth(i).get_attribute("data-outcome") for i in range(2)] == ["retry", "succeeded"]
    # Each attempt waited in the queue first (the retry's wait includes its back-off), then ran.
    queued = page.locator('#gantt .gantt-queue[data-name="draft"]')
    expect(queued).to_have_count(2)
    # Read in one go: the timeline is redrawn (its bars replaced) whenever the page learns something new.
    boxes = page.evaluate(
        """() => {
             const box = (sel, i) => {
               const r = document.querySelectorAll(sel)[i].getBoundingClientRect();
               return {x: r.x, width: r.width};
             };
             const runs = '#gantt .gantt-run[data-name="draft"]', queued = '#gantt .gantt-queue[data-name="draft"]';
             return [box(runs, 0), box(queued, 1), box(runs, 1)];
           }"""
    )
    first_run, retry_wait, second_run = boxes
    edge = 3  # px: bars have outlines
    assert first_run["x"] + first_run["width"] <= retry_wait["x"] + edge
    assert retry_wait["x"] + retry_wait["width"] <= second_run["x"] + edge
    expect(page.locator('#gantt .gantt-run[data-name="research"]')).to_have_count(1)
    # The chain that decided the run's end: research → draft, not the step on the side.
    expect(page.locator("#gantt .gantt-row.critical")).to_have_count(2)
    for name in ("research", "draft"):
        expect(page.locator(f'#gantt .gantt-row.critical[data-name="{name}"]')).to_have_count(1)
    expect(page.locator('#dag [data-step="draft"].critical')).to_have_count(1)
    page.screenshot(path=str(ARTIFACTS / "web-timeline.png"), full_page=True)


def test_a_failed_run_shows_its_progress_by_outcome(
    page: Page, base_url: str, client: Client, workers: LocalWorkers, unique: str
) -> None:
    expect = _expect()
    fine = [py(name, "tests.sleep", seconds=0.0) for name in ("a", "b", "c", "d")]
    spec = workflow(f"web_failed_{unique}", *fine, py("bad", "tests.fail"), py("after", "tests.sleep", "bad"))
    run_id = client.submit(spec)
    page.goto(f"{base_url}/ui/runs/{run_id}")
    expect(page.locator("#run-status")).to_have_text("failed", timeout=WAIT_MS)
    expect(page.locator("#progress-text")).to_have_text("4 succeeded, 1 failed, 1 upstream failed")
    segments = page.locator("#progress .segment")
    expect(segments).to_have_count(3)
    # Read in one go: the page redraws the bar when the status JSON is fetched again, detaching old segments.
    shares = page.evaluate(
        """() => [...document.querySelectorAll("#progress .segment")].map(
             (s) => [s.dataset.status, s.dataset.count, s.getBoundingClientRect().width])"""
    )
    assert [(status, count) for status, count, _ in shares] == [
        ("succeeded", "4"),
        ("failed", "1"),
        ("upstream_failed", "1"),
    ]
    widths = [width for _, _, width in shares]
    assert widths[0] == pytest.approx(4 * widths[1], rel=0.1)
    assert widths[1] == pytest.approx(widths[2], rel=0.1)


# Counts the page's fetches until what each answered has been read (its JSON or text): when none is left, every
# answer has been applied, since the page applies one in the same turn as it finishes reading it.
_TRACK_FETCHES = """(() => {
  const fetch = window.fetch;
  window.__pending = new Set();
  const track = (promise) => {
    window.__pending.add(promise);
    promise.finally(() => window.__pending.delete(promise)).catch(() => {});
    return promise;
  };
  window.fetch = (...args) => track(fetch(...args).then((response) => {
    for (const read of ["json", "text"]) {
      const original = response[read].bind(response);
      response[read] = () => track(original());
    }
    return response;
  }));
})();"""


def test_a_status_answer_older_than_the_one_shown_is_dropped(
    page: Page, base_url: str, client: Client, workers: LocalWorkers, unique: str
) -> None:
    # The page's first load, its reloads on events and its polls overlap: an answer to an earlier request arriving
    # after a later one's put the run back as it was (steps queued again) until the next poll, 15 s later.
    expect = _expect()
    run_id = client.submit(
        workflow(f"web_order_{unique}", py("a", "tests.sleep", seconds=0.0), py("b", "tests.sleep", "a"))
    )
    assert client.wait(run_id, timeout=60)["status"] == "succeeded"
    held: list[Any] = []

    def hold_the_first(route: Any) -> None:
        if held:
            route.continue_()
        else:
            held.append(route)

    page.add_init_script(_TRACK_FETCHES)
    page.route(re.compile(rf"^{re.escape(base_url)}/runs/{run_id}$"), hold_the_first)
    page.goto(f"{base_url}/ui/runs/{run_id}")
    expect(page.locator("#run-status")).to_have_text("succeeded", timeout=WAIT_MS)
    expect(page.locator("#progress-text")).to_have_text("2 succeeded")
    assert len(held) == 1, "the page answered its first load from a later request"

    first = held[0]
    earlier = first.fetch().json()
    earlier["status"] = "running"
    for step in earlier["steps"].values():
        step["status"] = "queued"
    first.fulfill(status=200, content_type="application/json", body=json.dumps(earlier))
    page.wait_for_function("() => window.__pending.size === 0", timeout=WAIT_MS)

    # Read once, not awaited: a poll would put a wrong page right within seconds.
    shown = page.evaluate("""() => [document.querySelector("#run-status").textContent,
                                    document.querySelector("#progress-text").textContent]""")
    assert shown == ["succeeded", "2 succeeded"]


# Every edge's path, sampled every 2 px: the points inside a box other than its own two ends.
_EDGES_THROUGH_BOXES = """() => {
  const boxes = [...document.querySelectorAll("#dag [data-step]")].map((g) => {
    const m = g.transform.baseVal.consolidate().matrix;
    const r = g.querySelector("rect").getBBox();
    return { name: g.dataset.step, x: m.e + r.x, y: m.f + r.y, w: r.width, h: r.height };
  });
  const hits = [];
  for (const path of document.querySelectorAll("#dag path.edge")) {
    const length = path.getTotalLength();
    for (let at = 0; at <= length; at += 2) {
      const p = path.getPointAtLength(at);
      for (const b of boxes) {
        if (b.name === path.dataset.from || b.name === path.dataset.to) continue;
        if (p.x > b.x + 1 && p.x < b.x + b.w - 1 && p.y > b.y + 1 && p.y < b.y + b.h - 1) {
          hits.push(`${path.dataset.from} → ${path.dataset.to} crosses ${b.name}`);
        }
      }
    }
  }
  return [...new Set(hits)];
}"""


def _overlapping(page: Page) -> list[tuple[str, str]]:
    boxes = {}
    for node in page.locator("#dag [data-step]").all():
        box = node.locator("rect").bounding_box()
        assert box is not None
        boxes[node.get_attribute("data-step") or ""] = box
    names = sorted(boxes)
    return [
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if boxes[a]["x"] < boxes[b]["x"] + boxes[b]["width"]
        and boxes[b]["x"] < boxes[a]["x"] + boxes[a]["width"]
        and boxes[a]["y"] < boxes[b]["y"] + boxes[b]["height"]
        and boxes[b]["y"] < boxes[a]["y"] + boxes[a]["height"]
    ]


def test_no_edge_runs_behind_a_box_it_does_not_join(page: Page, base_url: str, client: Client, unique: str) -> None:
    expect = _expect()
    example = yaml.safe_load((Path(__file__).parents[2] / "examples" / "content_pipeline.yaml").read_text())
    # A variant with edges that skip layers: translate → publish passes the column of tweet.
    variant = workflow(
        "web_edges",
        py("research", "tests.sleep"),
        py("draft", "tests.sleep", "research"),
        py("translate", "tests.sleep", "draft"),
        py("summary", "tests.sleep", "draft"),
        py("tweet", "tests.sleep", "summary"),
        py("thread", "tests.sleep", "tweet"),
        py("publish", "tests.sleep", "translate", "tweet"),
        py("archive", "tests.sleep", "research", "thread"),
    )
    for spec, inputs in ((example, {"topic": "Redis"}), (variant, {})):
        run_id = client.submit({**spec, "name": f"{spec['name']}_{unique}"}, inputs)
        page.goto(f"{base_url}/ui/runs/{run_id}")
        expect(page.locator("#dag [data-step]")).to_have_count(len(spec["steps"]))
        expect(page.locator("#dag path.edge")).to_have_count(sum(len(s.get("depends_on", [])) for s in spec["steps"]))
        assert page.evaluate(_EDGES_THROUGH_BOXES) == [], spec["name"]
        assert _overlapping(page) == []
    page.screenshot(path=str(ARTIFACTS / "web-edges.png"), full_page=True)


def test_a_twenty_way_fan_out_stays_a_few_rows_high_without_overlaps(
    page: Page, base_url: str, client: Client, unique: str
) -> None:
    expect = _expect()
    writers = [py(f"writer_{i:02}", "tests.sleep", "plan") for i in range(20)]
    join = py("merge", "tests.sleep", *(w["name"] for w in writers))
    run_id = client.submit(workflow(f"web_fan_{unique}", py("plan", "tests.sleep"), *writers, join))
    page.goto(f"{base_url}/ui/runs/{run_id}")
    nodes = page.locator("#dag [data-step]")
    expect(nodes).to_have_count(22)
    boxes = [box for box in (node.locator("rect").bounding_box() for node in nodes.all()) if box]
    height = boxes[0]["height"]
    top = min(b["y"] for b in boxes)
    bottom = max(b["y"] + b["height"] for b in boxes)
    assert bottom - top <= 7 * height, f"the fan-out is {(bottom - top) / height:.1f} boxes tall"
    assert _overlapping(page) == []
    assert page.evaluate(_EDGES_THROUGH_BOXES) == []
    page.screenshot(path=str(ARTIFACTS / "web-fan-out.png"), full_page=True)


def test_the_web_routes_serve_only_the_page_files_under_a_strict_content_policy() -> None:
    from fastapi.testclient import TestClient

    app = FastAPI()
    app.include_router(web_router)
    with TestClient(app) as http:
        for path in ("/", "/ui/runs/some-run"):
            page = http.get(path)
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            assert "script-src 'self'" in page.headers["content-security-policy"]
            for asset in re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', page.text):
                assert http.get(asset).status_code == 200, f"{path} refers to {asset}, which is not served"
        assert http.get("/ui/static/run.js").headers["content-type"].startswith("text/javascript")
        # Every module a script imports is served too.
        for script in ("run.js", "runs.js"):
            pending, seen = [script], set()
            while pending:
                name = pending.pop()
                source = http.get(f"/ui/static/{name}")
                assert source.status_code == 200, f"{name} is imported but not served"
                seen.add(name)
                pending += [m for m in re.findall(r'from "\./([\w.]+)"', source.text) if m not in seen]
        assert http.get("/ui/static/__init__.py").status_code == 404
        assert http.get("/ui/static/..%2F__init__.py").status_code == 404
    assert app.openapi()["paths"] == {}, "pages stay out of the API's schema"


def test_each_item_of_an_approval_map_step_is_approved_or_rejected_on_the_run_page(
    page: Page, settings: Settings, client: Client, workers: LocalWorkers, unique: str
) -> None:
    expect = _expect()
    editor = "web-item-editor-token"
    auth = ApiAuth.parse(json.dumps({editor: {"principal": "editor", "scopes": ["read", "approve"]}}))
    review = {
        "name": "review",
        "uses": "approval",
        "for_each": "inputs.posts",
        "with": {"approvers": ["editor"], "message": "Publish {{ item }} ({{ index + 1 }} of {{ count }})?"},
    }
    spec = workflow(f"web_item_approval_{unique}", review, inputs={"posts": {"type": "array"}})
    run_id = client.submit(spec, {"posts": ["apples", "boats", "clouds"]})
    with _serve(_with_web_page(create_app(settings, client, auth=auth))) as url:
        page.goto(f"{url}/ui/runs/{run_id}")
        _enter_token(page, editor)
        page.locator('[data-step="review"]').click()
        rows = page.locator("#item-decisions li")
        expect(rows).to_have_count(3, timeout=WAIT_MS)
        expect(page.locator("#approval-facts")).to_contain_text("3 waiting, 0 of 3 decided")
        expect(page.locator("#approval-facts")).to_contain_text("editor")
        expect(rows.nth(1)).to_contain_text('Item 1 "boats"')
        expect(rows.nth(1)).to_contain_text("Publish boats (2 of 3)?")
        expect(page.locator("#decision-buttons")).to_be_hidden()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-item-approval-waiting.png"), full_page=True)

        page.locator("#decision-comment").fill("not this one")
        page.locator('#item-decisions li[data-item="1"] button[value="reject"]').click()
        expect(page.locator("#decision-result")).to_have_text("review item 1 rejected by editor")
        expect(rows).to_have_count(2, timeout=WAIT_MS)
        expect(page.locator('#item-decisions li[data-item="1"]')).to_have_count(0)
        for index in (0, 2):
            page.locator(f'#item-decisions li[data-item="{index}"] button[value="approve"]').click()
            expect(page.locator("#decision-result")).to_have_text(f"review item {index} approved by editor")
        expect(page.locator('[data-step="review"]')).to_have_attribute("data-status", "failed", timeout=WAIT_MS)
        expect(page.locator("#decision-form")).to_be_hidden()
        page.screenshot(path=str(ARTIFACTS / "web-item-approval.png"), full_page=True)
    output = client.status(run_id)["steps"]["review"]["output"]
    assert [(o["approved"], o["decision"], o["by"], o["comment"]) for o in output] == [
        (True, "approve", "editor", ""),
        (False, "reject", "editor", "not this one"),
        (True, "approve", "editor", ""),
    ]
