"""Route dependencies: the caller's principal for a scope (``Authorization: Bearer TOKEN``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from orchestrator.api.auth import Principal, Scope
from orchestrator.api.context import api_context

bearer = HTTPBearer(auto_error=False, description="A token from ORCH_API_TOKENS.")


def require(scope: Scope) -> Callable[..., Principal]:
    """A dependency answering 401/403 unless the caller holds ``scope``."""

    def principal(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> Principal:
        return api_context(request).auth.authorize(
            credentials.credentials if credentials else None, scope, request.client.host if request.client else None
        )

    return principal


def require_for_stream(scope: Scope) -> Callable[..., Principal]:
    """Like :func:`require`, also accepting ``?token=``: a browser's ``EventSource`` cannot send headers.

    The server's access log never shows query strings (see ``server.serve``), so the token is not written there.
    """

    def principal(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> Principal:
        token = credentials.credentials if credentials else request.query_params.get("token")
        return api_context(request).auth.authorize(token, scope, request.client.host if request.client else None)

    return principal


Reader = Annotated[Principal, Depends(require(Scope.READ))]
StreamReader = Annotated[Principal, Depends(require_for_stream(Scope.READ))]
Writer = Annotated[Principal, Depends(require(Scope.WRITE))]
Approver = Annotated[Principal, Depends(require(Scope.APPROVE))]
