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
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import httpx2

from orchestrator.llm.anthropic import ATTEMPT_HEADER, SIMULATE_HEADER, AnthropicClient
from orchestrator.llm.structured import STRUCTURED_OUTPUT_MARKER, structured_output_instruction

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
_VOCABULARY: Final = tuple(
    """
    analysis approach argument audience balance careful change clear company context customer data decision
    design detail development evidence example experience factor feature focus framework goal growth idea impact
    insight issue key language market measure method model need note option outcome pattern people perspective
    plan point practice priority process product progress project quality question reader reason research result
    review risk role scope section signal source strategy strength structure summary support system team theme
    time topic trade trend value view work clearly often also usually carefully directly quickly broadly
    important useful practical strong simple recent common specific new early overall central relevant reliable
    and the of to with for in on by across because while therefore however which this that these each every many
    most some our their its
    """.split()  # noqa: SIM905
)


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
        prompt = "\n\n".join(_text_of(message.get("content")) for message in messages if isinstance(message, dict))
        simulate_header = request.headers.get(SIMULATE_HEADER)
        try:
            simulate = json.loads(simulate_header) if simulate_header else {}
            attempt = int(request.headers.get(ATTEMPT_HEADER, "1"))
        except ValueError as exc:
            raise ValueError(f"malformed {SIMULATE_HEADER} or {ATTEMPT_HEADER} header: {exc}") from exc
        if not isinstance(simulate, dict):
            raise ValueError(f"{SIMULATE_HEADER} must be a JSON object")
        return cls(model, _text_of(body.get("system")), prompt, max_tokens, simulate, attempt)

    @property
    def digest(self) -> bytes:
        key = json.dumps([self.model, self.system, self.prompt, self.max_tokens], ensure_ascii=False)
        return hashlib.sha256(key.encode()).digest()

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

    def _reply(self, *, broken_json: bool) -> httpx2.Response:
        rng = random.Random(int.from_bytes(self.digest[:8], "big"))
        schema = _requested_schema(self.system)
        fixed = self.simulate.get("output")
        if isinstance(fixed, str):
            text, output_tokens = fixed, _prose_tokens(fixed)
        elif schema is not None:
            text = json.dumps(_example(schema, schema, rng, depth=0), ensure_ascii=False)
            if broken_json:
                # A cut-off document after a chatty preamble: unparseable however the reader looks for JSON.
                text = "Here is the JSON you asked for:\n" + text[: len(text) // 2]
            output_tokens = math.ceil(len(text) / 4)
        else:
            text = _compose_prose(rng, self.prompt, self.max_tokens)
            output_tokens = _prose_tokens(text)
        body = {
            "id": f"msg_offline_{self.digest.hex()[:24]}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": math.ceil(len(self.system + self.prompt) / 4) + 8,
                "output_tokens": max(1, min(output_tokens, self.max_tokens)),
            },
        }
        return httpx2.Response(200, json=body, headers={"request-id": self.request_id})


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


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


def _prose_tokens(text: str) -> int:
    return math.ceil(len(text.split()) * 1.3)


def _compose_prose(rng: random.Random, prompt: str, max_tokens: int) -> str:
    """Sentences of vocabulary words, opening on the prompt's first words quoted, 0.6-0.75 x max_tokens words long."""
    # At most 0.75 words per token keeps ceil(words * 1.3) within max_tokens, as a real reply's would be.
    count = max(1, min(math.floor(rng.uniform(0.6, 0.9) * max_tokens), math.floor(0.75 * max_tokens)))
    topic = prompt.replace('"', "").split()[: min(6, count - 1)]
    words = ["Regarding", f'"{topic[0]}', *topic[1:]] if topic else ["Overall"]
    words[-1] += '",' if topic else ","
    sentence_left, capitalize = rng.randint(6, 14), False
    while len(words) < count:
        word = rng.choice(_VOCABULARY)
        word = word.capitalize() if capitalize else word
        sentence_left -= 1
        capitalize = sentence_left == 0
        if capitalize:
            word += "."
            sentence_left = rng.randint(6, 14)
        words.append(word)
    words[-1] = words[-1].rstrip(",.") + "."
    return " ".join(words)


def _requested_schema(system: str) -> Any:
    if STRUCTURED_OUTPUT_MARKER not in system:
        return None
    schema_text = system.split(STRUCTURED_OUTPUT_MARKER, 1)[1]
    try:
        return json.loads(schema_text)
    except ValueError:
        return None


def _example(schema: Any, root: Any, rng: random.Random, depth: int) -> Any:
    """A deterministic instance of a JSON Schema: all properties, 1-3 array items, first enum value, ``const``."""
    if not isinstance(schema, dict) or depth > 16:
        return "value"
    if "$ref" in schema:
        return _example(_resolve(schema["$ref"], root), root, rng, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for keyword in ("anyOf", "oneOf"):
        options = schema.get(keyword)
        if isinstance(options, list) and options:
            # Optional[X] in pydantic's schemas is anyOf [X, null]: prefer the informative branch.
            chosen = next((option for option in options if _type_of(option) != "null"), options[0])
            return _example(chosen, root, rng, depth + 1)
    if isinstance(schema.get("allOf"), list):
        merged = {key: value for key, value in schema.items() if key != "allOf"}
        for part in schema["allOf"]:
            resolved = _resolve(part["$ref"], root) if isinstance(part, dict) and "$ref" in part else part
            merged.update(resolved if isinstance(resolved, dict) else {})
        return _example(merged, root, rng, depth + 1)
    kind = _type_of(schema)
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: _example(sub, root, rng, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        return _example_array(schema, root, rng, depth)
    if kind == "integer":
        return _example_integer(schema, rng)
    if kind == "number":
        return _example_number(schema, rng)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return _example_string(schema, rng)


def _type_of(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "string"
    declared = schema.get("type")
    if isinstance(declared, list):
        declared = next((name for name in declared if name != "null"), "null")
    if isinstance(declared, str):
        return declared
    if "properties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "string"


def _resolve(reference: Any, root: Any) -> Any:
    """Follow a local ``#/...`` JSON pointer; anything else resolves to an empty (any-value) schema."""
    if not isinstance(reference, str) or not reference.startswith("#"):
        return {}
    target = root
    for escaped in reference.lstrip("#").split("/")[1:]:
        part = escaped.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            return {}
    return target


def _example_array(schema: dict[str, Any], root: Any, rng: random.Random, depth: int) -> list[Any]:
    prefix = schema.get("prefixItems", [])
    low = max(int(schema.get("minItems", 1)), 1)
    high = max(low, min(int(schema.get("maxItems", 3)), 3))
    count = max(rng.randint(low, high), len(prefix))
    items = [_example(prefix[index], root, rng, depth + 1) for index in range(len(prefix))]
    while len(items) < count:
        items.append(_example(schema.get("items", {}), root, rng, depth + 1))
    if schema.get("uniqueItems"):
        unique: list[Any] = []
        for item in items:
            if item not in unique:
                unique.append(item)
        items = unique
    return items


def _example_integer(schema: dict[str, Any], rng: random.Random) -> int:
    low = schema.get("minimum", schema["exclusiveMinimum"] + 1 if "exclusiveMinimum" in schema else None)
    high = schema.get("maximum", schema["exclusiveMaximum"] - 1 if "exclusiveMaximum" in schema else None)
    low = math.ceil(low) if low is not None else (math.floor(high) - 100 if high is not None else 0)
    high = math.floor(high) if high is not None else low + 100
    value = rng.randint(low, max(low, high))
    step = schema.get("multipleOf")
    if isinstance(step, int) and step > 0:
        value = math.ceil(low / step) * step
    return value


def _example_number(schema: dict[str, Any], rng: random.Random) -> float:
    low = float(schema.get("minimum", schema.get("exclusiveMinimum", 0.0)))
    high = float(schema.get("maximum", schema.get("exclusiveMaximum", low + 100.0)))
    # Stay strictly inside so exclusive bounds hold too.
    value = low + (high - low) * rng.uniform(0.1, 0.9)
    rounded = round(value, 2)
    return rounded if low < rounded < high else value


_STRING_FORMATS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "date": "2026-01-15",
        "date-time": "2026-01-15T09:30:00Z",
        "time": "09:30:00Z",
        "email": "author@example.com",
        "uri": "https://example.com/offline",
        "hostname": "example.com",
        "ipv4": "192.0.2.1",
        "ipv6": "2001:db8::1",
    }
)


def _example_string(schema: dict[str, Any], rng: random.Random) -> str:
    text_format = schema.get("format")
    if text_format == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if isinstance(text_format, str) and text_format in _STRING_FORMATS:
        return _STRING_FORMATS[text_format]
    text = " ".join(rng.choice(_VOCABULARY) for _ in range(rng.randint(1, 4)))
    min_length, max_length = int(schema.get("minLength", 0)), schema.get("maxLength")
    while len(text) < min_length:
        text += " " + rng.choice(_VOCABULARY)
    if isinstance(max_length, int):
        text = text[:max_length].rstrip() or text[:max_length]
    return text
