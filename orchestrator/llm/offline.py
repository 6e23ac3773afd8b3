"""The offline provider: the real Anthropic SDK over an in-process HTTP transport that synthesises replies.

:class:`OfflineMessagesAPI` answers ``POST /v1/messages`` the way the service does: a Messages API JSON body, or an
error status with an Anthropic error body, or a transport failure. Because :class:`OfflineClient` is an
:class:`~orchestrator.llm.anthropic.AnthropicClient` over it, the SDK's own parsing and exception mapping, and our
:func:`~orchestrator.llm.anthropic.classify_error`, run exactly as they do against the real service.

Replies are deterministic: they depend only on (model, system, prompt, max_tokens). A request's ``simulate`` (sent as
the ``x-orch-simulate`` header, with the attempt number in ``x-orch-attempt``) scripts latency and failures:

- ``latency_s``: wait this long before answering (at most 300 s; beyond the request's read timeout the call times
  out, as it would against the service).
- ``errors``: ``errors[attempt - 1]`` happens on that attempt; later attempts (and ``null`` entries) succeed.
  Names: see :data:`SIMULATED_ERRORS`, plus ``timeout`` and ``connection`` (transport failures, raised at once
  rather than after a real timeout) and ``invalid_json`` (a structured-output request gets a reply that is not JSON).
- ``retry_after_s``: the ``retry-after`` value sent with ``rate_limit`` (default 1).
- ``output``: a fixed reply text.
- ``error_mid_stream``: a streamed call's scripted error arrives after half the text, as an SSE ``error`` event
  (``timeout`` and ``connection`` as a read failure), instead of as the response's status.

A request with ``"stream": true`` (the SDK's ``messages.stream``) is answered with a real ``text/event-stream`` body:
``message_start``, one ``content_block_delta`` per word, ``message_delta`` with the usage, ``message_stop``, the
latency spread over the deltas, so the SDK's own stream parser runs and yields the same text as an unstreamed reply.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import httpx2

from orchestrator.infra.digests import sha256
from orchestrator.llm.anthropic import ATTEMPT_HEADER, SIMULATE_HEADER, AnthropicClient
from orchestrator.llm.offline_agent import agent_tool_uses, conversation_text
from orchestrator.llm.structured import structured_output_instruction
from orchestrator.llm.synthetic import compose_prose, example, prose_tokens, requested_schema

# structured_output_instruction is re-exported: prompts meant for this provider are built with it, and keeping it
# importable from here spares callers knowing that the marker lives in .structured.
__all__ = [
    "SIMULATED_ERRORS",
    "OfflineClient",
    "OfflineMessagesAPI",
    "SimulatedError",
    "structured_output_instruction",
]

OFFLINE_BASE_URL: Final = "http://offline.invalid"
"""Where the SDK believes it is sending requests; ``.invalid`` can never resolve, should anything leak out."""

MAX_LATENCY_S: Final = 300.0
"""Upper bound on a simulated ``latency_s``, so a typo cannot park a worker thread for hours."""


@dataclass(frozen=True)
class SimulatedError:
    """An error status the offline service can answer with.

    Attributes:
        status: HTTP status code.
        error_type: The Anthropic ``error.type`` in the body.
        message: The Anthropic ``error.message`` in the body.
    """

    status: int
    error_type: str
    message: str


SIMULATED_ERRORS: Final[Mapping[str, SimulatedError]] = MappingProxyType(
    {
        "rate_limit": SimulatedError(429, "rate_limit_error", "This request would exceed the rate limit (simulated)."),
        "overloaded": SimulatedError(529, "overloaded_error", "Overloaded (simulated)."),
        "server_error": SimulatedError(500, "api_error", "Internal server error (simulated)."),
        "bad_gateway": SimulatedError(502, "api_error", "Bad gateway (simulated)."),
        "unavailable": SimulatedError(503, "api_error", "Service unavailable (simulated)."),
        "request_timeout": SimulatedError(408, "timeout_error", "Request timeout (simulated)."),
        "conflict": SimulatedError(409, "conflict_error", "Conflict (simulated)."),
        "bad_request": SimulatedError(400, "invalid_request_error", "Invalid request (simulated)."),
        "authentication": SimulatedError(401, "authentication_error", "Invalid API key (simulated)."),
        "permission": SimulatedError(403, "permission_error", "Not permitted to use this resource (simulated)."),
        "not_found": SimulatedError(404, "not_found_error", "Not found (simulated)."),
        "request_too_large": SimulatedError(413, "request_too_large", "Request exceeds the maximum size (simulated)."),
    }
)
"""Scripted error names answered with an HTTP error status; ``timeout`` and ``connection`` fail in the transport."""

_TRANSPORT_ERRORS: Final = frozenset({"timeout", "connection"})
_INVALID_JSON: Final = "invalid_json"


# Prose reads better than 130 quoted items.
class OfflineMessagesAPI:
    """An in-process stand-in for the Messages API, to mount as an ``httpx2.MockTransport`` handler.

    Counts every request it receives, per (model, prompt) and in total, so tests can assert how many calls were
    paid for. Safe to call from many threads at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: Counter[tuple[str, str]] = Counter()
        self._total_calls = 0

    @property
    def total_calls(self) -> int:
        """Requests received so far, whatever their outcome."""
        with self._lock:
            return self._total_calls

    @property
    def calls(self) -> dict[tuple[str, str], int]:
        """A snapshot of requests received per (model, SHA-256 hex digest of the prompt)."""
        with self._lock:
            return dict(self._calls)

    def calls_for(self, model: str, prompt: str) -> int:
        """Requests received so far for this model and prompt, whatever their outcome."""
        with self._lock:
            return self._calls[(model, _sha256(prompt))]

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        """Answer one HTTP request as the Messages API would.

        Args:
            request: The request the SDK sent.

        Returns:
            A Messages API response, or an Anthropic error response.

        Raises:
            httpx2.ReadTimeout: On a scripted ``timeout``, or when the latency exceeds the read timeout.
            httpx2.ConnectError: On a scripted ``connection`` error.
        """
        with self._lock:
            self._total_calls += 1
        if request.method != "POST" or request.url.path != "/v1/messages":
            return _error_response(
                SimulatedError(404, "not_found_error", f"no route {request.url.path}"), "req_offline_unrouted"
            )
        try:
            call = _MessagesCall.from_request(request)
        except ValueError as exc:
            return _error_response(SimulatedError(400, "invalid_request_error", str(exc)), "req_offline_invalid")
        with self._lock:
            self._calls[(call.model, _sha256(call.prompt))] += 1
        return call.answer(request)


class OfflineClient(AnthropicClient):
    """An :class:`~orchestrator.llm.anthropic.AnthropicClient` whose HTTP requests never leave the process.

    Args:
        api: The service to answer requests; a new one by default. Pass one in to count calls.
        timeout_s: Default timeout in seconds (requests override it with their own).
    """

    def __init__(self, api: OfflineMessagesAPI | None = None, *, timeout_s: float = 120.0) -> None:
        self.api = api if api is not None else OfflineMessagesAPI()
        super().__init__(
            api_key="offline",
            base_url=OFFLINE_BASE_URL,
            http_client=httpx2.Client(transport=httpx2.MockTransport(self.api)),
            timeout_s=timeout_s,
        )


@dataclass(frozen=True)
class _MessagesCall:
    """One parsed ``POST /v1/messages`` request."""

    model: str
    system: str
    prompt: str
    max_tokens: int
    simulate: Mapping[str, Any]
    attempt: int
    messages: tuple[Any, ...] = ()
    tools: tuple[Any, ...] = ()
    stream: bool = False

    @classmethod
    def from_request(cls, request: httpx2.Request) -> _MessagesCall:
        try:
            body = json.loads(request.content)
        except ValueError as exc:
            raise ValueError(f"request body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ValueError("request body must be a JSON object")
        model, max_tokens = body.get("model"), body.get("max_tokens")
        if not isinstance(model, str) or not model:
            raise ValueError("model: field required")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError("max_tokens: must be a positive integer")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages: at least one message is required")
        prompt = conversation_text(messages)
        tools = body.get("tools") or []
        if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools
        ):
            raise ValueError("tools: a list of {name, description, input_schema}")
        simulate_header = request.headers.get(SIMULATE_HEADER)
        try:
            simulate = json.loads(simulate_header) if simulate_header else {}
            attempt = int(request.headers.get(ATTEMPT_HEADER, "1"))
        except ValueError as exc:
            raise ValueError(f"malformed {SIMULATE_HEADER} or {ATTEMPT_HEADER} header: {exc}") from exc
        if not isinstance(simulate, dict):
            raise ValueError(f"{SIMULATE_HEADER} must be a JSON object")
        system = _text_of(body.get("system"))
        stream = body.get("stream") is True
        return cls(model, system, prompt, max_tokens, simulate, attempt, tuple(messages), tuple(tools), stream)

    @property
    def digest(self) -> bytes:
        # Kept in the instance by hand: Python 3.11's functools.cached_property computes under one lock shared by
        # every instance, which the threads of a threads worker then queue on.
        digest: bytes | None = self.__dict__.get("_digest")
        if digest is None:
            key = json.dumps([self.model, self.system, self.prompt, self.max_tokens], ensure_ascii=False)
            digest = self.__dict__["_digest"] = sha256(key.encode()).digest()
        return digest

    @property
    def request_id(self) -> str:
        return f"req_offline_{hashlib.sha256(self.digest + str(self.attempt).encode()).hexdigest()[:24]}"

    def answer(self, request: httpx2.Request) -> httpx2.Response:
        try:
            latency_s, scripted, retry_after = self._directives()
        except ValueError as exc:
            return _error_response(SimulatedError(400, "invalid_request_error", str(exc)), self.request_id)
        if latency_s > 0:
            read_timeout = _read_timeout(request)
            if read_timeout is not None and latency_s > read_timeout:
                time.sleep(read_timeout)
                raise httpx2.ReadTimeout("simulated latency exceeds the read timeout", request=request)
        if self.stream and (scripted is None or self.simulate.get("error_mid_stream") is True):
            # Latency is spread over the stream; a scripted error, if any, breaks it halfway.
            return self._reply(broken_json=False, latency_s=latency_s, fail=scripted, request=request)
        time.sleep(latency_s)
        if scripted == "timeout":
            raise httpx2.ReadTimeout("simulated timeout", request=request)
        if scripted == "connection":
            raise httpx2.ConnectError("simulated connection failure", request=request)
        error = SIMULATED_ERRORS.get(scripted or "")
        if error is not None:
            headers = {"retry-after": retry_after} if scripted == "rate_limit" else {}
            return _error_response(error, self.request_id, headers)
        return self._reply(broken_json=scripted == _INVALID_JSON)

    def _directives(self) -> tuple[float, str | None, str]:
        latency_s = self.simulate.get("latency_s", 0)
        if not isinstance(latency_s, int | float) or isinstance(latency_s, bool) or latency_s < 0:
            raise ValueError(f"simulate.latency_s must be a non-negative number, not {latency_s!r}")
        errors = self.simulate.get("errors", [])
        if not isinstance(errors, list):
            raise ValueError(f"simulate.errors must be a list of error names, not {errors!r}")
        scripted = errors[self.attempt - 1] if 0 < self.attempt <= len(errors) else None
        known = {*SIMULATED_ERRORS, *_TRANSPORT_ERRORS, _INVALID_JSON}
        if scripted is not None and (not isinstance(scripted, str) or scripted not in known):
            raise ValueError(f"unknown simulated error {scripted!r}; known: {', '.join(sorted(known))}")
        retry_after = self.simulate.get("retry_after_s", 1)
        if not isinstance(retry_after, int | float) or isinstance(retry_after, bool) or retry_after < 0:
            raise ValueError(f"simulate.retry_after_s must be a non-negative number, not {retry_after!r}")
        return min(float(latency_s), MAX_LATENCY_S), scripted, str(retry_after)

    def _reply(
        self,
        *,
        broken_json: bool,
        latency_s: float = 0.0,
        fail: str | None = None,
        request: httpx2.Request | None = None,
    ) -> httpx2.Response:
        rng = random.Random(int.from_bytes(self.digest[:8], "big"))
        schema = requested_schema(self.system)
        fixed = self.simulate.get("output")
        try:
            tool_uses = agent_tool_uses(self.tools, self.messages, self.simulate, self.digest) if self.tools else []
        except ValueError as exc:
            return _error_response(SimulatedError(400, "invalid_request_error", str(exc)), self.request_id)
        stream: dict[str, Any] = {"latency_s": latency_s, "fail": fail, "request": request}
        if tool_uses:
            tokens = sum(prose_tokens(json.dumps(use["input"])) + 8 for use in tool_uses)
            return self._message(tool_uses, "tool_use", min(tokens, self.max_tokens), **stream)
        if isinstance(fixed, str):
            text, output_tokens = fixed, prose_tokens(fixed)
        elif schema is not None:
            text = json.dumps(example(schema, schema, rng, depth=0), ensure_ascii=False)
            if broken_json:
                # A cut-off document after a chatty preamble: unparseable however the reader looks for JSON.
                text = "Here is the JSON you asked for:\n" + text[: len(text) // 2]
            output_tokens = math.ceil(len(text) / 4)
        else:
            text = compose_prose(rng, self.prompt, self.max_tokens)
            output_tokens = prose_tokens(text)
        return self._message([{"type": "text", "text": text}], "end_turn", output_tokens, **stream)

    def _message(
        self,
        content: list[dict[str, Any]],
        stop_reason: str,
        output_tokens: int,
        *,
        latency_s: float = 0.0,
        fail: str | None = None,
        request: httpx2.Request | None = None,
    ) -> httpx2.Response:
        body = {
            "id": f"msg_offline_{self.digest.hex()[:24]}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": math.ceil(len(self.system + self.prompt) / 4) + 8,
                "output_tokens": max(1, min(output_tokens, self.max_tokens)),
            },
        }
        if not self.stream:
            return httpx2.Response(200, json=body, headers={"request-id": self.request_id})
        return httpx2.Response(
            200,
            content=_event_stream(body, latency_s, fail, request),
            headers={"request-id": self.request_id, "content-type": "text/event-stream", "cache-control": "no-cache"},
        )


def _event_stream(
    body: dict[str, Any], latency_s: float, fail: str | None, request: httpx2.Request | None
) -> Iterator[bytes]:
    """The Messages API's SSE events for ``body``: one text delta per word (a tool call's input in one
    ``input_json_delta``), ``latency_s`` spread over the deltas.

    ``fail`` (a scripted error name) ends the stream halfway through its deltas: an ``error`` event, or a read failure
    for ``timeout`` and ``connection``.
    """
    deltas: list[tuple[int, dict[str, Any]]] = []
    for index, block in enumerate(body["content"]):
        if block["type"] == "text":
            pieces = re.findall(r"\s*\S+|\s+$", block["text"]) or [block["text"]]
            deltas += [(index, {"type": "text_delta", "text": piece}) for piece in pieces]
        else:
            deltas.append((index, {"type": "input_json_delta", "partial_json": json.dumps(block.get("input", {}))}))
    pause = latency_s / (len(deltas) + 1)
    usage = body["usage"]
    start = {**body, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    yield _sse("message_start", {"type": "message_start", "message": start})
    opened = -1
    for number, (index, delta) in enumerate(deltas):
        if fail is not None and number == len(deltas) // 2:
            yield from _stream_failure(fail, request)
            return
        if index != opened:
            if opened >= 0:
                yield _sse("content_block_stop", {"type": "content_block_stop", "index": opened})
            block = body["content"][index]
            empty = {"type": "text", "text": ""} if block["type"] == "text" else {**block, "input": {}}
            yield _sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": empty})
            opened = index
        if pause:
            time.sleep(pause)
        yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
    if pause:
        time.sleep(pause)
    if opened >= 0:
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": opened})
    end = {"stop_reason": body["stop_reason"], "stop_sequence": None}
    final_usage = {"output_tokens": usage["output_tokens"]}
    yield _sse("message_delta", {"type": "message_delta", "delta": end, "usage": final_usage})
    yield _sse("message_stop", {"type": "message_stop"})


def _stream_failure(fail: str, request: httpx2.Request | None) -> Iterator[bytes]:
    if fail == "timeout":
        raise httpx2.ReadTimeout("simulated timeout mid-stream", request=request)
    if fail == "connection":
        raise httpx2.RemoteProtocolError("simulated connection failure mid-stream", request=request)
    error = SIMULATED_ERRORS.get(fail, SIMULATED_ERRORS["server_error"])
    yield _sse("error", {"type": "error", "error": {"type": error.error_type, "message": error.message}})


def _sse(event: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


def _sha256(text: str) -> str:
    return sha256(text.encode()).hexdigest()


def _text_of(content: object) -> str:
    """The text of a ``system`` or message ``content`` field: a string or a list of text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(block["text"] for block in content if isinstance(block, dict) and "text" in block)
    return ""


def _read_timeout(request: httpx2.Request) -> float | None:
    timeout = request.extensions.get("timeout", {}).get("read")
    return float(timeout) if isinstance(timeout, int | float) else None


def _error_response(
    error: SimulatedError, request_id: str, headers: Mapping[str, str] | None = None
) -> httpx2.Response:
    body = {"type": "error", "error": {"type": error.error_type, "message": error.message}, "request_id": request_id}
    return httpx2.Response(error.status, json=body, headers={"request-id": request_id, **(headers or {})})
