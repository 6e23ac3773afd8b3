"""The web page: a runs list and a live DAG view of one run, served next to the HTTP API.

Static HTML, CSS and plain JavaScript modules (no build step, nothing from a CDN); the page talks to the API it is
served with (``GET /runs``, ``GET /runs/{id}``, ``GET /runs/{id}/events``, cancel and resume). Include it in the API
app with ``app.include_router(orchestrator.web.router)``:

- ``GET /`` — the runs list.
- ``GET /ui/runs/{run_id}`` — one run: its DAG coloured live from the SSE stream, a timeline of its attempts, cost,
  tokens and budget, step details, cancel and resume.
- ``GET /ui/static/{name}`` — the page's scripts and stylesheet.

The routes stay out of the OpenAPI schema: they are pages, not API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

__all__ = ["router"]

STATIC_DIR = Path(__file__).resolve().parent / "static"

# The only files served, with their types: a name that is not listed is a 404, so no path ever leaves STATIC_DIR.
_ASSETS = {
    "app.css": "text/css; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "conversation.js": "text/javascript; charset=utf-8",
    "dag.js": "text/javascript; charset=utf-8",
    "gantt.js": "text/javascript; charset=utf-8",
    "layout.js": "text/javascript; charset=utf-8",
    "run.js": "text/javascript; charset=utf-8",
    "runs.js": "text/javascript; charset=utf-8",
    "summary.js": "text/javascript; charset=utf-8",
}

# Scripts and styles only from this origin, no inline script, no frames: data shown on the page can never run.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


@router.get("/")
def runs_page() -> FileResponse:
    """The runs list: every run with its workflow, status and creation time, refreshed every few seconds."""
    return _page("runs.html")


@router.get("/ui/runs/{run_id}")
def run_page(run_id: str) -> FileResponse:
    """One run's page; its script reads the run id from the address and loads the rest from the API."""
    return _page("run.html")


@router.get("/ui/static/{name}")
def asset(name: str) -> FileResponse:
    """A script or the stylesheet of the page.

    Raises:
        HTTPException: 404 for any name that is not one of the page's files.
    """
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail=f"no such file: {name}")
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=headers)
