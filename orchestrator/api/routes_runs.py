"""Runs: submit, read, list, cancel, resume, decide.

These routes are plain functions: FastAPI runs them in its thread pool, where the (blocking) client belongs.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, HTTPException, Path, Query, Request, Response

from orchestrator.api.context import api_context
from orchestrator.api.deps import Approver, Reader, Writer
from orchestrator.api.schemas import (
    Cancelled,
    DecideStep,
    Problem,
    Resumed,
    ResumeRun,
    RunCreated,
    RunList,
    RunSummary,
    SubmitRun,
)
from orchestrator.domain import RunStatus
from orchestrator.engine.status import MAX_LIST_OFFSET, RunView
from orchestrator.errors import DecisionRefusedError, InputValidationError, WorkflowDefinitionError
from orchestrator.state import keys
from orchestrator.state.items import MAX_ITEM_PAGE, ItemPage

MAX_ITEMS_OFFSET = 1_000_000

router = APIRouter(tags=["runs"])

RunId = Annotated[str, Path(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")]
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Problem} for code in (401, 403, 404, 409, 422, 503)}


@router.post("/runs", status_code=201, response_model=RunCreated, responses={200: {"model": RunCreated}, **_ERRORS})
def submit_run(
    body: SubmitRun,
    request: Request,
    response: Response,
    _: Writer,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)] = None,
) -> RunCreated:
    """Validate and start a run; 201 with its id, or 200 with the earlier run's id for a repeated idempotency key."""
    ctx = api_context(request)
    earlier = ctx.redis.get(keys.idempotency_key(idempotency_key)) if idempotency_key else None
    field = "workflow" if body.workflow is not None else "definition"
    try:
        run_id = ctx.client.submit(
            body.workflow if body.workflow is not None else body.definition or {},
            body.inputs,
            version=body.version,
            idempotency_key=idempotency_key,
        )
    except InputValidationError as exc:
        raise HTTPException(422, f"inputs: {exc}") from None
    except WorkflowDefinitionError as exc:
        raise HTTPException(422, f"{field}: {exc}") from None
    if earlier is not None and earlier == run_id:
        response.status_code = 200
    return RunCreated(run_id=run_id)


# Served as built (response_model=None): validating it would drop a field the type does not name; the schema documents
# it, and tests/unit/test_status_view.py checks that the type names every field run_view builds.
@router.get("/runs/{run_id}", response_model=None, responses={200: {"model": RunView}, **_ERRORS})
def get_run(run_id: RunId, request: Request, _: Reader) -> RunView:
    """The run's status JSON (the same as ``orchestrator status RUN_ID --json``)."""
    return api_context(request).client.status(run_id)


StepName = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


@router.get("/runs/{run_id}/steps/{step}/items", response_model=None, responses={200: {"model": ItemPage}, **_ERRORS})
def list_items(
    run_id: RunId,
    step: StepName,
    request: Request,
    _: Reader,
    *,
    offset: Annotated[int, Query(ge=0, le=MAX_ITEMS_OFFSET, description="Skip this many items.")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_ITEM_PAGE, description="At most this many items.")] = 100,
) -> ItemPage:
    """One page of a map step's item records ``{index, item, status, attempts, started_at, finished_at, output,
    error}``, in index order."""
    try:
        return api_context(request).client.items(run_id, step, offset=offset, limit=limit)
    except WorkflowDefinitionError as exc:
        raise HTTPException(404, str(exc)) from None


@router.get("/runs", response_model=RunList, responses=_ERRORS)
def list_runs(
    request: Request,
    response: Response,
    _: Reader,
    *,
    status: Annotated[RunStatus | None, Query(description="Only runs with this status.")] = None,
    workflow: Annotated[str | None, Query(max_length=200, description="Only runs of this workflow.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many runs.")] = 50,
    offset: Annotated[
        int, Query(ge=0, le=MAX_LIST_OFFSET, description="Skip this many (of those that pass the filters).")
    ] = 0,
) -> RunList:
    """Runs, newest first, a page at a time; filters look through the newest runs only (``StreamLimits.list_scan``).

    ``next_offset`` and the ``Link`` header (``rel="next"``, ``rel="prev"``) say where the neighbouring pages start.
    """
    ctx = api_context(request)
    page = ctx.client.runs_page(
        status=status, workflow=workflow, limit=limit, offset=offset, scan=max(ctx.streams.list_scan, limit)
    )
    links = [
        f'<{_page_link(request, at)}>; rel="{rel}"'
        for rel, at in (("next", page["next_offset"]), ("prev", max(offset - limit, 0) if offset else None))
        if at is not None
    ]
    if links:
        response.headers["Link"] = ", ".join(links)
    return RunList(
        runs=[RunSummary.model_validate(summary) for summary in page["runs"]],
        offset=page["offset"],
        limit=page["limit"],
        next_offset=page["next_offset"],
    )


def _page_link(request: Request, offset: int) -> str:
    """This listing's path and query with another ``offset`` (relative: the Host header is not trusted)."""
    url = request.url.include_query_params(offset=offset)
    return f"{url.path}?{url.query}"


@router.post("/runs/{run_id}/cancel", response_model=Cancelled, responses=_ERRORS)
def cancel_run(run_id: RunId, request: Request, _: Writer) -> Cancelled:
    """Cancel a run: no step starts afterwards, running ones are interrupted; harmless when it already ended."""
    return Cancelled(**api_context(request).client.cancel(run_id))


@router.post("/runs/{run_id}/resume", response_model=Resumed, responses=_ERRORS)
def resume_run(run_id: RunId, request: Request, _: Writer, body: Annotated[ResumeRun | None, Body()] = None) -> Resumed:
    """Re-run a failed, cancelled or timed-out run from its checkpoint (409 while it runs or when nothing is left)."""
    from_step = body.from_step if body is not None else None
    allow = body.allow_definition_change if body is not None else False
    try:
        generation = api_context(request).client.resume(run_id, from_step=from_step, allow_definition_change=allow)
    except WorkflowDefinitionError as exc:
        raise HTTPException(422, f"from_step: {exc}") from None
    return Resumed(run_id=run_id, generation=int(generation))


@router.post("/runs/{run_id}/steps/{step}/decision", responses=_ERRORS)
def decide_step(
    run_id: RunId, step: Annotated[str, Path(max_length=200)], body: DecideStep, request: Request, principal: Approver
) -> dict[str, Any]:
    """Approve or reject a step waiting for a human decision, as the token's principal (never a name in the body).

    403 when the principal is not one of the step's approvers, 409 when the step is not waiting (decided already,
    not reached yet, or the run ended); every attempt is audited either way. An approval map step is decided one
    item at a time: ``item`` names it (422 when missing there or given elsewhere).
    """
    client = api_context(request).client
    try:
        decide = client.approve if body.decision == "approve" else client.reject
        return decide(run_id, step, by=principal.name, comment=body.comment or "", item=body.item)
    except WorkflowDefinitionError as exc:
        raise HTTPException(404, str(exc)) from None
    except DecisionRefusedError as exc:
        raise HTTPException(403 if exc.reason == "not_an_approver" else 409, str(exc)) from None
