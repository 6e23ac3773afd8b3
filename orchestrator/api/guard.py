"""What a web page in the caller's browser must not make the API do: the checks run before any route.

Without tokens the API trusts loopback clients, and a browser on loopback is one for every page it shows. So in that
mode :meth:`ApiAuth.check_browser` refuses a non-loopback ``Host`` (DNS rebinding) and a foreign ``Origin`` (a page's
form, fetch or WebSocket), on HTTP and WebSocket alike, with 403.

In both modes a request body must be JSON (``Content-Type: application/json``), answered 415 otherwise: an HTML form
can only send ``application/x-www-form-urlencoded``, ``multipart/form-data`` or ``text/plain``, and a page's ``fetch``
can send no other type without a CORS preflight, which this API never grants. A request without a body (a cancel)
needs no type.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from orchestrator.api.auth import ApiAuth, AuthError, shown
from orchestrator.api.ws import refuse_handshake

JSON_MEDIA_TYPE = "application/json"

# Methods that carry no body by definition: everything else is checked for a JSON body.
_BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def body_problem(method: str, headers: Headers) -> str | None:
    """Why a request's body is refused (it is not declared JSON), or ``None``."""
    if method.upper() in _BODILESS_METHODS:
        return None
    content_type = headers.get("content-type", "")
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type == JSON_MEDIA_TYPE:
        return None
    if not media_type and headers.get("content-length", "0").strip() == "0" and "transfer-encoding" not in headers:
        return None
    return f"Content-Type {shown(content_type)} is not {JSON_MEDIA_TYPE}: request bodies must be JSON"


class BrowserGuardMiddleware:
    """Answers 403 (foreign ``Host`` or ``Origin`` without tokens) or 415 (a body that is not JSON) before routing.

    Args:
        app: The app to guard.
        auth: The configured tokens; the ``Host`` and ``Origin`` checks apply only without any.
    """

    def __init__(self, app: ASGIApp, auth: ApiAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in {"http", "websocket"}:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            self.auth.check_browser(headers.get("host"), headers.get("origin"))
        except AuthError as exc:
            if scope["type"] == "websocket":
                await refuse_handshake(WebSocket(scope, receive, send), exc.status_code, str(exc))
            else:
                await JSONResponse({"detail": str(exc)}, status_code=exc.status_code)(scope, receive, send)
            return
        problem = body_problem(scope["method"], headers) if scope["type"] == "http" else None
        if problem is not None:
            await JSONResponse({"detail": problem}, status_code=415)(scope, receive, send)
            return
        await self.app(scope, receive, send)
