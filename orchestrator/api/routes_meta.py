"""Registered workflows, health and metrics."""

from __future__ import annotations

import logging

import redis
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from orchestrator.api.context import api_context
from orchestrator.api.deps import Reader
from orchestrator.api.schemas import SubmittedWorkflow, WorkflowInfo, WorkflowList, WorkflowStep
from orchestrator.definition.registry import workflows
from orchestrator.errors import StoreUnavailableError
from orchestrator.infra.timestamps import iso

log = logging.getLogger(__name__)

router = APIRouter(tags=["service"])


@router.get("/workflows", response_model=WorkflowList)
def list_workflows(request: Request, _: Reader) -> WorkflowList:
    """Every registered workflow (those of the modules in ``ORCH_IMPORTS``), by name and version; ``submitted``:
    the definitions submitted lately (files and registered alike), most recent first."""
    try:
        submitted = api_context(request).client.store.submitted_definitions()
    except redis.RedisError as exc:
        raise StoreUnavailableError(f"cannot reach Redis: {exc}") from exc
    return WorkflowList(
        submitted=[
            SubmittedWorkflow(
                name=entry["name"],
                version=entry["version"],
                definition_hash=entry["definition_hash"],
                first_submitted=iso(entry["first_submitted"]) or "",
                last_submitted=iso(entry["last_submitted"]) or "",
            )
            for entry in submitted
        ],
        workflows=[
            WorkflowInfo(
                name=spec.name,
                version=spec.version,
                definition_hash=spec.definition_hash,
                inputs=spec.inputs,
                steps=[WorkflowStep(name=s.name, uses=s.uses.value, depends_on=list(s.depends_on)) for s in spec.steps],
            )
            for spec in workflows.all()
        ],
    )


@router.get("/healthz", responses={503: {"description": "Redis does not answer."}})
def healthz(request: Request) -> JSONResponse:
    """Whether the API can reach Redis (no token needed, so probes can ask)."""
    try:
        api_context(request).client.store.ping()
    except StoreUnavailableError as exc:
        log.warning("health check: %s", exc)
        return JSONResponse({"status": "unavailable", "redis": "does not answer"}, status_code=503)
    return JSONResponse({"status": "ok", "redis": "ok"})


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request, _: Reader) -> Response:
    """The API's metrics and the cluster's queue depth and runs in flight, in the Prometheus text format."""
    context = api_context(request)
    context.metrics.watch_cluster(context.settings)
    return Response(context.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
