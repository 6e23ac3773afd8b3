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
    expect(page.locator("#progress-text")).to_have_text("4 of 4 steps done")

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
        assert http.get("/ui/static/__init__.py").status_code == 404
        assert http.get("/ui/static/..%2F__init__.py").status_code == 404
    assert app.openapi()["paths"] == {}, "pages stay out of the API's schema"
