"""Provider failures become the right step errors, through the offline provider and through the real SDK.

The same matrix runs twice: (a) the offline provider scripts each failure inside the process; (b) the real SDK talks
HTTP to a local fake server (``tests/fake_anthropic.py``) that answers with the status, body and headers asked for.
Either way the SDK's own exception mapping runs, then :func:`~orchestrator.llm.anthropic.classify_error`.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from orchestrator.errors import NonRetryableStepError, RetryableStepError, StepError
from orchestrator.llm import AnthropicClient, LLMRequest, OfflineClient, classify_error
from tests.fake_anthropic import FakeAnthropicServer, FakeReply, closed_port_url, error_body

pytestmark = pytest.mark.timeout(30)

MODEL = "claude-haiku-4-5"


@dataclass(frozen=True)
class Expected:
    """The step error a failure must become."""

    error: type[StepError]
    kind: str
    status_code: int | None
    retry_after: float | None = None


def assert_classified(error: StepError, expected: Expected) -> None:
    assert type(error) is expected.error
    assert error.kind == expected.kind
    assert error.status_code == expected.status_code
    assert getattr(error, "retry_after", None) == expected.retry_after


def failing_call(client: AnthropicClient, request: LLMRequest) -> StepError:
    with pytest.raises(StepError) as caught:
        client.complete(request)
    return caught.value


# --- (a) through the offline provider -------------------------------------------------------------------------------

OFFLINE_MATRIX = [
    pytest.param(
        "bad_request", Expected(NonRetryableStepError, "bad_request", 400), id="400-bad-request-fails-at-once"
    ),
    pytest.param(
        "authentication", Expected(NonRetryableStepError, "authentication", 401), id="401-authentication-fails-at-once"
    ),
    pytest.param("permission", Expected(NonRetryableStepError, "permission", 403), id="403-permission-fails-at-once"),
    pytest.param("not_found", Expected(NonRetryableStepError, "not_found", 404), id="404-not-found-fails-at-once"),
    pytest.param(
        "request_timeout", Expected(RetryableStepError, "request_timeout", 408), id="408-request-timeout-is-retried"
    ),
    pytest.param("conflict", Expected(RetryableStepError, "conflict", 409), id="409-conflict-is-retried"),
    pytest.param(
        "request_too_large",
        Expected(NonRetryableStepError, "request_too_large", 413),
        id="413-request-too-large-fails-at-once",
    ),
    pytest.param(
        "rate_limit", Expected(RetryableStepError, "rate_limit", 429, 1.0), id="429-rate-limit-is-retried-after-1s"
    ),
    pytest.param("server_error", Expected(RetryableStepError, "server_error", 500), id="500-server-error-is-retried"),
    pytest.param("bad_gateway", Expected(RetryableStepError, "server_error", 502), id="502-bad-gateway-is-retried"),
    pytest.param("unavailable", Expected(RetryableStepError, "server_error", 503), id="503-unavailable-is-retried"),
    pytest.param("overloaded", Expected(RetryableStepError, "overloaded", 529), id="529-overloaded-is-retried"),
    pytest.param("connection", Expected(RetryableStepError, "connection", None), id="connection-error-is-retried"),
    pytest.param("timeout", Expected(RetryableStepError, "timeout", None), id="timeout-is-retried"),
]


@pytest.mark.parametrize(("error_name", "expected"), OFFLINE_MATRIX)
def test_an_offline_scripted_failure_becomes_the_matching_step_error(error_name: str, expected: Expected) -> None:
    with OfflineClient() as client:
        error = failing_call(client, LLMRequest(model=MODEL, prompt="hello", simulate={"errors": [error_name]}))
    assert_classified(error, expected)
    assert isinstance(error.__cause__, Exception)
    assert type(error.__cause__).__module__.startswith("anthropic")


def test_an_offline_rate_limit_carries_the_scripted_retry_after() -> None:
    with OfflineClient() as client:
        simulate = {"errors": ["rate_limit"], "retry_after_s": 2.5}
        error = failing_call(client, LLMRequest(model=MODEL, prompt="hello", simulate=simulate))
    assert_classified(error, Expected(RetryableStepError, "rate_limit", 429, 2.5))


def test_an_offline_http_error_message_names_the_provider_message_and_request_id() -> None:
    with OfflineClient() as client:
        error = failing_call(client, LLMRequest(model=MODEL, prompt="hello", simulate={"errors": ["overloaded"]}))
    assert "overloaded_error" in str(error)
    assert "Overloaded (simulated)." in str(error)
    assert "(request req_offline_" in str(error)


@pytest.mark.parametrize("error_name", ["rate_limit", "overloaded", "server_error", "request_timeout", "timeout"])
def test_the_offline_provider_receives_exactly_one_request_per_failed_call(error_name: str) -> None:
    with OfflineClient() as client:
        with pytest.raises(RetryableStepError):
            client.complete(LLMRequest(model=MODEL, prompt="hello", simulate={"errors": [error_name]}))
        assert client.api.total_calls == 1


# --- (b) through the real SDK against a local HTTP server -----------------------------------------------------------


@dataclass(frozen=True)
class HttpFailure:
    """What the fake server answers with."""

    status: int
    error_type: str
    headers: Mapping[str, str] = field(default_factory=dict)


SDK_MATRIX = [
    pytest.param(
        HttpFailure(400, "invalid_request_error"),
        Expected(NonRetryableStepError, "bad_request", 400),
        id="400-bad-request-fails-at-once",
    ),
    pytest.param(
        HttpFailure(401, "authentication_error"),
        Expected(NonRetryableStepError, "authentication", 401),
        id="401-authentication-fails-at-once",
    ),
    pytest.param(
        HttpFailure(403, "permission_error"),
        Expected(NonRetryableStepError, "permission", 403),
        id="403-permission-fails-at-once",
    ),
    pytest.param(
        HttpFailure(404, "not_found_error"),
        Expected(NonRetryableStepError, "not_found", 404),
        id="404-not-found-fails-at-once",
    ),
    pytest.param(
        HttpFailure(408, "timeout_error"),
        Expected(RetryableStepError, "request_timeout", 408),
        id="408-request-timeout-is-retried",
    ),
    pytest.param(
        HttpFailure(409, "conflict_error"), Expected(RetryableStepError, "conflict", 409), id="409-conflict-is-retried"
    ),
    pytest.param(
        HttpFailure(413, "request_too_large"),
        Expected(NonRetryableStepError, "request_too_large", 413),
        id="413-request-too-large-fails-at-once",
    ),
    pytest.param(
        HttpFailure(422, "invalid_request_error"),
        Expected(NonRetryableStepError, "client_error", 422),
        id="422-other-client-error-fails-at-once",
    ),
    pytest.param(
        HttpFailure(429, "rate_limit_error", {"retry-after": "7"}),
        Expected(RetryableStepError, "rate_limit", 429, 7.0),
        id="429-rate-limit-is-retried-after-retry-after-seconds",
    ),
    pytest.param(
        HttpFailure(429, "rate_limit_error", {"retry-after-ms": "1500", "retry-after": "9"}),
        Expected(RetryableStepError, "rate_limit", 429, 1.5),
        id="429-rate-limit-prefers-retry-after-ms",
    ),
    pytest.param(
        HttpFailure(429, "rate_limit_error", {"retry-after": "Thu, 01 Jan 2015 00:00:00 GMT"}),
        Expected(RetryableStepError, "rate_limit", 429, 0.0),
        id="429-rate-limit-with-a-past-date-waits-zero-never-negative",
    ),
    pytest.param(
        HttpFailure(429, "rate_limit_error", {"retry-after": "soon", "retry-after-ms": "nan"}),
        Expected(RetryableStepError, "rate_limit", 429, None),
        id="429-rate-limit-with-unreadable-headers-has-no-retry-after",
    ),
    pytest.param(
        HttpFailure(429, "rate_limit_error"),
        Expected(RetryableStepError, "rate_limit", 429, None),
        id="429-rate-limit-without-headers-has-no-retry-after",
    ),
    pytest.param(
        HttpFailure(500, "api_error"),
        Expected(RetryableStepError, "server_error", 500),
        id="500-server-error-is-retried",
    ),
    pytest.param(
        HttpFailure(502, "api_error"),
        Expected(RetryableStepError, "server_error", 502),
        id="502-bad-gateway-is-retried",
    ),
    pytest.param(
        HttpFailure(503, "api_error"),
        Expected(RetryableStepError, "server_error", 503),
        id="503-unavailable-is-retried",
    ),
    pytest.param(
        HttpFailure(504, "timeout_error"),
        Expected(RetryableStepError, "server_error", 504),
        id="504-gateway-timeout-is-retried",
    ),
    pytest.param(
        HttpFailure(529, "overloaded_error", {"retry-after-ms": "250"}),
        Expected(RetryableStepError, "overloaded", 529, 0.25),
        id="529-overloaded-is-retried-after-retry-after-ms",
    ),
]


@pytest.mark.parametrize(("failure", "expected"), SDK_MATRIX)
def test_an_http_error_from_the_service_becomes_the_matching_step_error(
    anthropic_server: FakeAnthropicServer, sdk_client: AnthropicClient, failure: HttpFailure, expected: Expected
) -> None:
    body = error_body(failure.error_type, "the provider says no", request_id="req_body")
    anthropic_server.reply(FakeReply(failure.status, body, {"request-id": "req_header", **failure.headers}))

    error = failing_call(sdk_client, LLMRequest(model=MODEL, prompt="hello"))

    assert_classified(error, expected)
    assert "the provider says no" in str(error)
    assert "req_header" in str(error)


def test_a_retry_after_http_date_becomes_the_seconds_until_then(
    anthropic_server: FakeAnthropicServer, sdk_client: AnthropicClient
) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    anthropic_server.reply(FakeReply(429, error_body("rate_limit_error"), {"retry-after": when}))

    error = failing_call(sdk_client, LLMRequest(model=MODEL, prompt="hello"))

    assert isinstance(error, RetryableStepError)
    assert error.kind == "rate_limit"
    assert error.status_code == 429
    assert error.retry_after is not None
    # HTTP dates have whole-second precision, and a moment passes between sending and reading.
    assert 27.0 <= error.retry_after <= 30.0


def test_an_error_without_a_request_id_header_names_the_one_in_its_body(
    anthropic_server: FakeAnthropicServer, sdk_client: AnthropicClient
) -> None:
    anthropic_server.reply(
        FakeReply(400, error_body("invalid_request_error", "max_tokens: too large", request_id="req_b"))
    )

    error = failing_call(sdk_client, LLMRequest(model=MODEL, prompt="hello"))

    assert_classified(error, Expected(NonRetryableStepError, "bad_request", 400))
    assert "max_tokens: too large" in str(error)
    assert "req_b" in str(error)


def test_a_plain_text_error_page_keeps_its_text_in_the_message(
    anthropic_server: FakeAnthropicServer, sdk_client: AnthropicClient
) -> None:
    anthropic_server.reply(FakeReply(502, "upstream connect error"))

    error = failing_call(sdk_client, LLMRequest(model=MODEL, prompt="hello"))

    assert_classified(error, Expected(RetryableStepError, "server_error", 502))
    assert "upstream connect error" in str(error)


def test_a_refused_connection_is_a_retryable_connection_error() -> None:
    with AnthropicClient(api_key="test-key", base_url=closed_port_url(), timeout_s=5) as client:
        error = failing_call(client, LLMRequest(model=MODEL, prompt="hello"))
    assert_classified(error, Expected(RetryableStepError, "connection", None))


def test_a_server_slower_than_the_request_timeout_is_a_retryable_timeout(anthropic_server: FakeAnthropicServer) -> None:
    anthropic_server.reply(FakeReply(delay_s=10))
    with AnthropicClient(api_key="test-key", base_url=anthropic_server.base_url, timeout_s=10) as client:
        error = failing_call(client, LLMRequest(model=MODEL, prompt="hello", timeout_s=0.3))
    assert_classified(error, Expected(RetryableStepError, "timeout", None))
    assert len(anthropic_server.requests) == 1


@pytest.mark.parametrize("status", [408, 409, 429, 500, 503, 529])
def test_the_sdk_sends_exactly_one_request_per_call_even_when_it_would_retry(
    anthropic_server: FakeAnthropicServer, sdk_client: AnthropicClient, status: int
) -> None:
    anthropic_server.reply(FakeReply(status, error_body("api_error"), {"retry-after": "0"}))

    with pytest.raises(RetryableStepError):
        sdk_client.complete(LLMRequest(model=MODEL, prompt="hello"))

    assert len(anthropic_server.requests) == 1


def test_an_exception_the_sdk_did_not_raise_is_non_retryable() -> None:
    error = classify_error(ValueError("bad state"))
    assert_classified(error, Expected(NonRetryableStepError, "unexpected", None))
    assert "ValueError: bad state" in str(error)


# --- what the real client sends and reads back ----------------------------------------------------------------------


def test_a_request_is_sent_as_one_user_message_with_the_system_prompt(
    anthropic_server: FakeAnthropicServer, sdk_client: AnthropicClient
) -> None:
    sdk_client.complete(LLMRequest(model=MODEL, prompt="Write a haiku", max_tokens=50, system="Be terse."))

    (sent,) = anthropic_server.requests
    assert sent.path == "/v1/messages"
    assert sent.body == {
        "model": MODEL,
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "Write a haiku"}],
        "system": "Be terse.",
    }
    assert "x-orch-simulate" not in sent.headers
    assert "x-orch-attempt" not in sent.headers


def test_a_temperature_is_sent_only_when_the_request_sets_one(
    anthropic_server: FakeAnthropicServer, sdk_client: AnthropicClient
) -> None:
    sdk_client.complete(LLMRequest(model=MODEL, prompt="a"))
    sdk_client.complete(LLMRequest(model=MODEL, prompt="b", temperature=0.2))

    without, with_temperature = anthropic_server.requests
    assert "temperature" not in without.body
    assert "system" not in without.body
    assert with_temperature.body["temperature"] == 0.2


def test_simulation_directives_travel_as_headers_only_when_present(
    anthropic_server: FakeAnthropicServer, sdk_client: AnthropicClient
) -> None:
    simulate = {"latency_s": 0, "errors": ["rate_limit", None], "note": "café"}
    sdk_client.complete(LLMRequest(model=MODEL, prompt="hello", attempt=3, simulate=simulate))

    (sent,) = anthropic_server.requests
    assert json.loads(sent.headers["x-orch-simulate"]) == simulate
    assert " " not in sent.headers["x-orch-simulate"]
    assert sent.headers["x-orch-attempt"] == "3"


def test_the_reply_is_read_into_an_llm_response(
    anthropic_server: FakeAnthropicServer, sdk_client: AnthropicClient
) -> None:
    body = {
        "id": "msg_42",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5-20251001",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Hello, "},
            {"type": "text", "text": "world."},
        ],
        "stop_reason": "max_tokens",
        "stop_sequence": None,
        "usage": {"input_tokens": 21, "output_tokens": 4},
    }
    anthropic_server.reply(FakeReply(200, body, {"request-id": "req_ok"}))

    response = sdk_client.complete(LLMRequest(model=MODEL, prompt="hello"))

    assert response.text == "Hello, world."
    assert response.model == "claude-haiku-4-5-20251001"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (21, 4)
    assert response.stop_reason == "max_tokens"
    assert response.request_id == "req_ok"
    assert response.extra == {"message_id": "msg_42"}
