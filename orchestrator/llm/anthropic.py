"""The LLM client over the official Anthropic SDK, and the one map from its exceptions to ours.

The SDK's own retries are switched off (``max_retries=0``): Celery's autoretry owns retrying so that every attempt
shows in Redis and Flower. :func:`classify_error` is the single place where a provider failure becomes a
:class:`~orchestrator.errors.RetryableStepError` or :class:`~orchestrator.errors.NonRetryableStepError`.
"""

from __future__ import annotations

import email.utils
import inspect
import json
import math
import time
from collections.abc import Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Final, Self, cast

import anthropic
import httpx2
import pydantic
from anthropic import APIResponse
from anthropic.types import Message
from opentelemetry import trace

from orchestrator.errors import NonRetryableStepError, RetryableStepError, StepError
from orchestrator.infra.ids import new_id
from orchestrator.llm.base import LLMRequest, LLMResponse, LLMUsage, TextCallback
from orchestrator.telemetry import trace_provider

__all__ = ["AnthropicClient", "classify_error"]

SIMULATE_HEADER: Final = "x-orch-simulate"
"""Request header carrying ``LLMRequest.simulate`` as compact JSON (read by the offline provider)."""

ATTEMPT_HEADER: Final = "x-orch-attempt"
"""Request header carrying ``LLMRequest.attempt`` whenever ``simulate`` is sent."""

_RETRYABLE_STATUS_KINDS: Final[Mapping[int, str]] = MappingProxyType(
    {408: "request_timeout", 409: "conflict", 429: "rate_limit", 529: "overloaded"}
)
_NON_RETRYABLE_STATUS_KINDS: Final[Mapping[int, str]] = MappingProxyType(
    {400: "bad_request", 401: "authentication", 403: "permission", 404: "not_found", 413: "request_too_large"}
)
# An error that arrives inside a streamed 200 response (an SSE ``error`` event) has no status of its own: its
# ``error.type`` says what it would have been. Anything else that breaks a stream midway counts as a server error.
_STREAM_ERROR_STATUS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "overloaded_error": 529,
        "rate_limit_error": 429,
        "api_error": 500,
        "timeout_error": 408,
        "invalid_request_error": 400,
        "authentication_error": 401,
        "permission_error": 403,
        "not_found_error": 404,
        "request_too_large": 413,
    }
)


_MAX_URLS: Final = 16
"""API paths whose full URL a client keeps (the client calls one or two)."""


class _SDK(anthropic.Anthropic):
    """The SDK's client, drawing the key it keeps per request for its own retries without a system call, and
    joining its base URL and an API path once rather than on every request."""

    _urls: tuple[httpx2.URL, dict[str, httpx2.URL]] | None = None

    def _idempotency_key(self) -> str:
        # The SDK's is a uuid4 (an os.urandom system call, so a GIL hand-off in a threads worker) for every request,
        # though the Messages API takes no idempotency header and the SDK sends none: it only has to be unique.
        return f"stainless-python-retry-{new_id()}"

    def _prepare_url(self, url: str) -> httpx2.URL:
        # The SDK parses the path and then the joined URL again for every request: some 40 us of an offline call's
        # 600. A URL is immutable; the kept ones are dropped when the client's base URL is replaced.
        base = self.base_url
        if self._urls is None or self._urls[0] is not base:
            self._urls = (base, {})
        known = self._urls[1]
        prepared = known.get(url)
        if prepared is None:
            prepared = super()._prepare_url(url)
            if len(known) < _MAX_URLS:
                known[url] = prepared
        return prepared


_SDK_PARAMETERS: Final = frozenset(inspect.signature(anthropic.Anthropic.__init__).parameters)


def sdk_span_options() -> dict[str, Any]:
    """The SDK's ``open_telemetry`` option for a new client: no spans of its own when nobody would receive them.

    The SDK starts an OpenTelemetry span for every API call, through OpenTelemetry's global tracer provider, and works
    out its attributes (the model, ``max_tokens``, a dozen request headers) before it knows whether the span records.
    With no global provider set (OpenTelemetry's default proxy) and the orchestrator's own tracing off
    (:mod:`orchestrator.telemetry.trace_provider`), the span is dropped unread: about 3% of an offline call's CPU. The
    SDK is then told to trace nothing (``open_telemetry=False``). Otherwise, and with an SDK too old to have the
    option, the SDK keeps its default. Decided when the client is built: a global provider set later is not seen.
    """
    if "open_telemetry" not in _SDK_PARAMETERS or trace_provider.tracer() is not None:
        return {}
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return {"open_telemetry": False}
    return {}


class AnthropicClient:
    """An :class:`~orchestrator.llm.base.LLMClient` that calls the Messages API through the official SDK.

    The client is safe to share between threads, as the SDK's is.

    Args:
        api_key: The API key; ``None`` lets the SDK find credentials itself (``ANTHROPIC_API_KEY``, profiles).
        base_url: The API root; ``None`` means ``ANTHROPIC_BASE_URL`` or the public endpoint.
        http_client: An ``httpx2.Client`` to send requests through (a proxy, or an in-process transport).
        timeout_s: Default timeout in seconds; each request overrides it with its own ``timeout_s``.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        http_client: httpx2.Client | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self._sdk = _SDK(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,
            timeout=timeout_s,
            http_client=http_client,
            **sdk_span_options(),
        )

    def complete(self, request: LLMRequest, on_text: TextCallback | None = None) -> LLMResponse:
        """Make exactly one Messages API call, streamed when ``on_text`` is given.

        Args:
            request: What to ask which model.
            on_text: Receives each text delta as the SDK parses it from the stream (``stream=True``); the text is
                the deltas joined, usage and stop reason come from ``message_start`` and ``message_delta``, so the
                response is the same as an unstreamed call's.

        Returns:
            The reply's text blocks joined, with the model, usage, stop reason and request id.

        Raises:
            RetryableStepError: 408, 409, 429, 5xx, 529, connection errors and timeouts.
            NonRetryableStepError: 400, 401, 403, 404, 413, any other client error, or an unexpected failure.
        """
        extra_headers: dict[str, str] | None = None
        if request.simulate is not None:
            # ensure_ascii because httpx2 encodes header values as ASCII.
            extra_headers = {
                SIMULATE_HEADER: json.dumps(request.simulate, separators=(",", ":"), ensure_ascii=True),
                ATTEMPT_HEADER: str(request.attempt),
            }
        # SDK 2.x removed `temperature` from the signature (current models take no sampling parameters);
        # `extra_body` still sends it, for the older models that honour it.
        extra_body = None if request.temperature is None else {"temperature": request.temperature}
        messages: Any = (
            list(request.messages) if request.messages is not None else [{"role": "user", "content": request.prompt}]
        )
        arguments: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": messages,
            "tools": anthropic.omit if request.tools is None else cast(Any, list(request.tools)),
            "system": anthropic.omit if request.system is None else request.system,
            "extra_headers": extra_headers,
            "extra_body": extra_body,
            "timeout": request.timeout_s,
        }
        try:
            if on_text is None:
                raw = self._sdk.messages.with_raw_response.create(**arguments)
                message = _parsed(raw)
            else:
                return _streamed(self._sdk, arguments, on_text)
        except StepError:
            raise
        except Exception as exc:
            raise classify_error(exc) from exc
        return _to_response(message, raw.request_id)

    def close(self) -> None:
        """Close the underlying HTTP connections."""
        self._sdk.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def classify_error(exc: Exception) -> StepError:
    """Map an exception raised by the Anthropic SDK to the orchestrator's retryable or non-retryable error.

    Retryable: 408, 409, 429 (``rate_limit``), 529 (``overloaded``), other 5xx (``server_error``), timeouts
    (``timeout``) and connection errors (``connection``), with ``retry_after`` taken from the response's
    ``retry-after-ms`` or ``retry-after`` header, uncapped but never negative. Non-retryable: 400 (``bad_request``),
    401 (``authentication``), 403 (``permission``), 404 (``not_found``), 413 (``request_too_large``), other 4xx
    (``client_error``) and anything the SDK did not raise as an API error (``unexpected``).

    Args:
        exc: The exception ``messages.create`` raised.

    Returns:
        The error to raise in its place (chain it with ``from exc``).
    """
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        if status < 400:
            # An error event inside a streamed reply (the response itself said 200).
            status = _STREAM_ERROR_STATUS.get(exc.type or "", 500)
        message = _describe_status_error(exc)
        if status in _NON_RETRYABLE_STATUS_KINDS:
            return NonRetryableStepError(message, kind=_NON_RETRYABLE_STATUS_KINDS[status], status_code=status)
        if status in _RETRYABLE_STATUS_KINDS or status >= 500:
            kind = _RETRYABLE_STATUS_KINDS.get(status, "server_error")
            retry_after = _parse_retry_after(exc.response.headers)
            return RetryableStepError(message, kind=kind, status_code=status, retry_after=retry_after)
        return NonRetryableStepError(message, kind="client_error", status_code=status)
    # APITimeoutError subclasses APIConnectionError, so it must be tested first.
    if isinstance(exc, anthropic.APITimeoutError):
        return RetryableStepError(f"Anthropic API call timed out{_cause(exc)}", kind="timeout")
    if isinstance(exc, anthropic.APIConnectionError):
        return RetryableStepError(f"could not reach the Anthropic API{_cause(exc)}", kind="connection")
    # A stream that breaks while its body is read raises the transport's own error, not the SDK's.
    if isinstance(exc, httpx2.TimeoutException):
        return RetryableStepError(f"Anthropic API stream timed out: {exc}", kind="timeout")
    if isinstance(exc, httpx2.TransportError):
        return RetryableStepError(f"Anthropic API stream broke: {type(exc).__name__}: {exc}", kind="connection")
    return NonRetryableStepError(f"Anthropic API call failed: {type(exc).__name__}: {exc}", kind="unexpected")


def _parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Read the wait a response asks for, in seconds, the way the SDK reads it.

    ``retry-after-ms`` (milliseconds) wins over ``retry-after`` (seconds, or an HTTP date). Values that do not
    parse, or are not finite, count as absent; a wait in the past is 0.

    Args:
        headers: The response headers (case-insensitive, as ``httpx2.Headers`` are).

    Returns:
        Seconds to wait, at least 0, or ``None`` when the response named no wait.
    """
    milliseconds = _finite_float(headers.get("retry-after-ms"))
    if milliseconds is not None:
        return max(0.0, milliseconds / 1000)
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _finite_float(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def _cause(exc: Exception) -> str:
    # The SDK's own message is generic; the transport error it chains names what actually happened.
    return f": {type(exc.__cause__).__name__}: {exc.__cause__}" if exc.__cause__ is not None else f": {exc}"


def _finite_float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _describe_status_error(exc: anthropic.APIStatusError) -> str:
    what = exc.api_message or _body_text(exc.body) or exc.message
    error_type = f" {exc.type}" if exc.type else ""
    request_id = exc.request_id or _body_request_id(exc.body)
    suffix = f" (request {request_id})" if request_id else ""
    return f"Anthropic API {exc.status_code}{error_type}: {what}{suffix}"


def _body_text(body: object) -> str | None:
    # A proxy or load balancer may answer with plain text or HTML; keep the message readable.
    if isinstance(body, str) and body:
        return body[:500]
    return None


def _body_request_id(body: object) -> str | None:
    # The SDK reads the id from the `request-id` header only; error bodies carry it too.
    if isinstance(body, Mapping):
        request_id = body.get("request_id")
        if isinstance(request_id, str):
            return request_id
    return None


def _streamed(sdk: anthropic.Anthropic, arguments: dict[str, Any], on_text: TextCallback) -> LLMResponse:
    """One streamed call, read from the SDK's raw event stream.

    The raw stream (``messages.create(stream=True)``), not the ``messages.stream`` helper: the helper rebuilds a
    snapshot of the whole message and a second event object at every delta, which cost four times the CPU per call
    (58 ms against 14 ms of CPU for a 300-word reply, measured with the offline provider).

    Raises:
        RetryableStepError: ``connection`` when the stream ends before the message does.
    """
    blocks: list[dict[str, Any]] = []
    partial_json: dict[int, list[str]] = {}
    start: Message | None = None
    final: Any = None
    stop_reason: str | None = None
    with sdk.messages.create(**arguments, stream=True) as events:
        for event in events:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                blocks[event.index]["text"] += event.delta.text
                on_text(event.delta.text)
            elif event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                partial_json.setdefault(event.index, []).append(event.delta.partial_json)
            elif event.type == "content_block_start":
                blocks.append(event.content_block.model_dump(exclude_none=True))
            elif event.type == "message_start":
                start = event.message
            elif event.type == "message_delta":
                final, stop_reason = event.usage, event.delta.stop_reason
        request_id = events.response.headers.get("request-id")
    if start is None or final is None:
        raise RetryableStepError("the Anthropic API stream ended before its message did", kind="connection")
    for index, pieces in partial_json.items():
        # A tool call's input arrives as pieces of one JSON document.
        blocks[index]["input"] = json.loads("".join(pieces) or "{}")
    usage = start.usage
    return LLMResponse(
        text="".join(block["text"] for block in blocks if block["type"] == "text"),
        model=start.model,
        usage=LLMUsage(
            # message_delta carries the final counts; fields it leaves out keep message_start's.
            input_tokens=final.input_tokens if final.input_tokens is not None else usage.input_tokens,
            output_tokens=final.output_tokens,
            cache_creation_input_tokens=_first(final.cache_creation_input_tokens, usage.cache_creation_input_tokens),
            cache_read_input_tokens=_first(final.cache_read_input_tokens, usage.cache_read_input_tokens),
        ),
        stop_reason=stop_reason,
        request_id=request_id,
        extra={"message_id": start.id},
        # As for an unstreamed reply: the blocks are kept only when there is more than text (tool calls).
        content=() if all(block["type"] == "text" for block in blocks) else tuple(blocks),
    )


def _first(*counts: int | None) -> int:
    return next((count for count in counts if count is not None), 0)


def _parsed(raw: APIResponse[Message]) -> Message:
    """The reply as the SDK's ``Message``, validated from its bytes by pydantic's core.

    The SDK's own parse (``raw.parse()``, what ``messages.create`` returns) decodes the JSON and then builds the model
    field by field in Python, leniently; that was a sixth of the CPU of an offline call (about 180 us against 16 us on
    this machine). A body pydantic does not validate as a ``Message`` (a content block or a stop reason newer than this
    SDK knows) takes the SDK's parse, as before.

    Raises:
        NonRetryableStepError: ``unexpected``: the body is not a message at all (a proxy's page, a truncated reply).
    """
    try:
        return Message.model_validate_json(raw.http_response.content)
    except pydantic.ValidationError:
        message: object = raw.parse()
    if not isinstance(message, Message) or not isinstance(message.content, list) or message.usage is None:
        body = raw.http_response.text[:200]
        raise NonRetryableStepError(
            f"Anthropic API {raw.status_code}: the reply is not a message: {body!r}", kind="unexpected"
        )
    return message


def _to_response(message: Message, request_id: str | None) -> LLMResponse:
    text = "".join(block.text for block in message.content if block.type == "text")
    # Plain replies keep only their text; a reply with tool calls keeps its blocks, which the next turn sends back.
    blocks = message.content
    content = () if all(b.type == "text" for b in blocks) else tuple(b.model_dump(exclude_none=True) for b in blocks)
    return LLMResponse(
        text=text,
        model=message.model,
        usage=LLMUsage(
            input_tokens=message.usage.input_tokens,
            output_tokens=message.usage.output_tokens,
            cache_creation_input_tokens=message.usage.cache_creation_input_tokens or 0,
            cache_read_input_tokens=message.usage.cache_read_input_tokens or 0,
        ),
        stop_reason=message.stop_reason,
        request_id=request_id,
        extra={"message_id": message.id},
        content=content,
    )
