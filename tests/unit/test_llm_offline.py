"""The offline provider: deterministic, realistic replies; scripted latency and failures; structured output."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import jsonschema
import pytest
from pydantic import BaseModel

from orchestrator.errors import NonRetryableStepError, RetryableStepError, StepError
from orchestrator.llm import (
    AnthropicClient,
    LLMRequest,
    LLMResponse,
    OfflineClient,
    OfflineMessagesAPI,
    make_llm_client,
    parse_structured,
    structured_output_instruction,
)

pytestmark = pytest.mark.timeout(30)

MODEL = "claude-haiku-4-5"


@pytest.fixture
def client() -> Iterator[OfflineClient]:
    with OfflineClient() as offline:
        yield offline


def ask(client: AnthropicClient, prompt: str = "Write about lighthouses", **fields: Any) -> LLMResponse:
    return client.complete(LLMRequest(model=fields.pop("model", MODEL), prompt=prompt, **fields))


# --- determinism and realism ----------------------------------------------------------------------------------------


def test_the_same_request_gets_the_same_reply_from_any_client() -> None:
    with OfflineClient() as first, OfflineClient() as second:
        one = ask(first, system="Be vivid.", max_tokens=120)
        two = ask(second, system="Be vivid.", max_tokens=120)
    assert one.text == two.text
    assert one.usage == two.usage
    assert one.extra == two.extra


@pytest.mark.parametrize(
    "change",
    [{"prompt": "Write about windmills"}, {"model": "claude-opus-4-6"}, {"system": "Be dry."}, {"max_tokens": 121}],
    ids=["prompt", "model", "system", "max-tokens"],
)
def test_a_reply_changes_when_any_input_that_defines_it_changes(client: OfflineClient, change: dict[str, Any]) -> None:
    base: dict[str, Any] = {"prompt": "Write about lighthouses", "system": "Be vivid.", "max_tokens": 120}
    assert ask(client, **base).text != ask(client, **{**base, **change}).text


def test_the_attempt_number_alone_does_not_change_a_successful_reply(client: OfflineClient) -> None:
    assert ask(client, attempt=1).text == ask(client, attempt=4).text


@pytest.mark.parametrize("max_tokens", [1, 8, 60, 400, 1024])
def test_reply_length_and_usage_are_realistic_for_the_token_budget(client: OfflineClient, max_tokens: int) -> None:
    system, prompt = "You are a careful writer.", "Write a report on coastal erosion in Norfolk."

    response = ask(client, prompt, system=system, max_tokens=max_tokens)

    words = len(response.text.split())
    assert words <= max(1, math.floor(0.75 * max_tokens))
    assert words >= min(0.6 * max_tokens, 0.75 * max_tokens) - 1
    assert response.usage.input_tokens == math.ceil(len(system + prompt) / 4) + 8
    assert response.usage.output_tokens == min(math.ceil(words * 1.3), max_tokens)
    assert response.usage.output_tokens <= max_tokens
    assert response.stop_reason == "end_turn"
    assert response.model == MODEL


def test_a_reply_reads_as_sentences_that_mention_the_prompt(client: OfflineClient) -> None:
    response = ask(client, "Quantum computing for bankers: a primer", max_tokens=200)

    assert response.text.startswith('Regarding "Quantum computing for bankers: a primer",')
    assert response.text.endswith(".")
    assert response.text.count(". ") >= 3


def test_a_reply_carries_deterministic_message_and_request_ids(client: OfflineClient) -> None:
    response = ask(client)
    assert response.request_id is not None
    assert response.request_id.startswith("req_")
    assert response.extra["message_id"].startswith("msg_")


def test_a_fixed_output_is_returned_as_given(client: OfflineClient) -> None:
    response = ask(client, simulate={"output": "exactly this"}, max_tokens=100)
    assert response.text == "exactly this"
    assert response.usage.output_tokens == math.ceil(2 * 1.3)


# --- latency --------------------------------------------------------------------------------------------------------


def test_simulated_latency_delays_the_reply(client: OfflineClient) -> None:
    started = time.monotonic()
    ask(client, simulate={"latency_s": 0.3})
    assert time.monotonic() - started >= 0.3


def test_latency_beyond_the_request_timeout_is_a_retryable_timeout(client: OfflineClient) -> None:
    started = time.monotonic()
    with pytest.raises(RetryableStepError) as caught:
        ask(client, simulate={"latency_s": 60}, timeout_s=0.2)
    assert caught.value.kind == "timeout"
    assert time.monotonic() - started >= 0.2


# --- scripted failures ----------------------------------------------------------------------------------------------


def test_scripted_errors_happen_on_their_attempt_and_later_attempts_succeed(client: OfflineClient) -> None:
    simulate = {"errors": ["rate_limit", "overloaded", None, "server_error"]}
    outcomes: list[str] = []
    for attempt in range(1, 6):
        try:
            ask(client, attempt=attempt, simulate=simulate)
            outcomes.append("ok")
        except StepError as error:
            outcomes.append(error.kind)
    assert outcomes == ["rate_limit", "overloaded", "ok", "server_error", "ok"]


def test_a_scripted_error_depends_on_the_attempt_not_on_the_client() -> None:
    simulate = {"errors": ["overloaded"]}
    with OfflineClient() as first, OfflineClient() as second:
        with pytest.raises(RetryableStepError):
            ask(first, attempt=1, simulate=simulate)
        assert ask(second, attempt=2, simulate=simulate).text == ask(first, attempt=2, simulate=simulate).text


def test_an_unknown_error_name_is_a_bad_request_naming_it(client: OfflineClient) -> None:
    with pytest.raises(NonRetryableStepError) as caught:
        ask(client, simulate={"errors": ["gremlins"]})
    assert caught.value.kind == "bad_request"
    assert "gremlins" in str(caught.value)


@pytest.mark.parametrize(
    "simulate",
    [{"latency_s": "slow"}, {"latency_s": -1}, {"errors": "rate_limit"}, {"retry_after_s": True}],
    ids=["latency-not-a-number", "negative-latency", "errors-not-a-list", "retry-after-not-a-number"],
)
def test_malformed_simulation_directives_are_a_bad_request(client: OfflineClient, simulate: dict[str, Any]) -> None:
    with pytest.raises(NonRetryableStepError) as caught:
        ask(client, simulate=simulate)
    assert caught.value.kind == "bad_request"
    assert "simulate." in str(caught.value)


# --- structured output ----------------------------------------------------------------------------------------------


class Source(BaseModel):
    title: str
    url: str | None = None
    year: int


class Report(BaseModel):
    headline: str
    tone: Literal["neutral", "upbeat"]
    confidence: float
    published: bool
    sources: list[Source]
    summary: Source | None = None


SCHEMAS = [
    pytest.param(
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "minLength": 12, "maxLength": 40},
                "score": {"type": "integer", "minimum": 1, "maximum": 5},
                "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "uniqueItems": True},
                "kind": {"enum": ["review", "summary"]},
                "version": {"const": 2},
                "nothing": {"type": "null"},
                "when": {"type": "string", "format": "date"},
                "contact": {"type": "string", "format": "email"},
                "id": {"type": "string", "format": "uuid"},
                "nested": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
            },
            "required": ["title", "score", "ratio", "tags", "kind", "version", "nested"],
            "additionalProperties": False,
        },
        id="hand-written-schema",
    ),
    pytest.param(Report.model_json_schema(), id="pydantic-schema-with-refs-and-optionals"),
    pytest.param({"type": "array", "items": {"type": "integer"}, "maxItems": 2}, id="top-level-array"),
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_a_structured_request_gets_json_that_matches_its_schema(client: OfflineClient, schema: dict[str, Any]) -> None:
    system = "You are a research assistant.\n\n" + structured_output_instruction(schema)

    response = ask(client, system=system, max_tokens=800)

    document = parse_structured(response.text, schema)
    jsonschema.validate(document, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    assert response.usage.output_tokens <= 800


def test_a_pydantic_schema_reply_loads_into_its_model(client: OfflineClient) -> None:
    schema = Report.model_json_schema()
    response = ask(client, system=structured_output_instruction(schema), max_tokens=800)
    report = Report.model_validate(parse_structured(response.text, schema))
    assert report.tone == "neutral"
    assert 1 <= len(report.sources) <= 3


def test_a_structured_reply_is_deterministic(client: OfflineClient) -> None:
    system = structured_output_instruction(Report.model_json_schema())
    assert ask(client, system=system).text == ask(client, system=system).text


def test_invalid_json_on_an_attempt_breaks_only_that_attempts_structured_reply(client: OfflineClient) -> None:
    schema = Report.model_json_schema()
    system = structured_output_instruction(schema)
    simulate = {"errors": ["invalid_json"]}

    broken = ask(client, system=system, attempt=1, simulate=simulate)
    repaired = ask(client, system=system, attempt=2, simulate=simulate)

    with pytest.raises(NonRetryableStepError) as caught:
        parse_structured(broken.text, schema)
    assert caught.value.kind == "invalid_output"
    assert Report.model_validate(parse_structured(repaired.text, schema))


def test_invalid_json_leaves_a_plain_text_reply_alone(client: OfflineClient) -> None:
    assert ask(client, simulate={"errors": ["invalid_json"]}).text == ask(client).text


# --- counting calls -------------------------------------------------------------------------------------------------


def test_calls_are_counted_per_model_and_prompt_and_in_total() -> None:
    api = OfflineMessagesAPI()
    with OfflineClient(api) as client:
        ask(client, "one")
        ask(client, "one")
        ask(client, "two")
        ask(client, "one", model="claude-opus-4-6")
        with pytest.raises(RetryableStepError):
            ask(client, "two", simulate={"errors": ["overloaded"]})

    assert api.total_calls == 5
    assert api.calls_for(MODEL, "one") == 2
    assert api.calls_for(MODEL, "two") == 2
    assert api.calls_for("claude-opus-4-6", "one") == 1
    assert api.calls_for(MODEL, "three") == 0
    assert sum(api.calls.values()) == 5


def test_concurrent_calls_are_all_counted() -> None:
    api = OfflineMessagesAPI()
    with OfflineClient(api) as client, ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda index: ask(client, f"prompt {index % 4}", max_tokens=20), range(200)))
    assert api.total_calls == 200
    assert [api.calls_for(MODEL, f"prompt {index}") for index in range(4)] == [50, 50, 50, 50]


# --- choosing a provider --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("api_key", [None, ""])
def test_without_an_api_key_the_offline_provider_answers(api_key: str | None) -> None:
    client = make_llm_client(api_key)
    assert isinstance(client, OfflineClient)
    assert client.complete(LLMRequest(model=MODEL, prompt="hi", max_tokens=10)).text
    client.close()


def test_with_an_api_key_the_real_service_is_called() -> None:
    client = make_llm_client("sk-ant-test", base_url="http://127.0.0.1:9", timeout_s=5)
    assert isinstance(client, AnthropicClient)
    assert not isinstance(client, OfflineClient)
    client.close()
