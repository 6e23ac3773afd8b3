"""A successful reply through the real SDK: read from its bytes by pydantic, the SDK's own parse where that fails.

The real SDK talks HTTP to a local fake server (``tests/fake_anthropic.py``).
"""

from __future__ import annotations

from typing import Any, NoReturn

import anthropic
import pytest

from orchestrator.errors import NonRetryableStepError
from orchestrator.llm import AnthropicClient, LLMRequest
from orchestrator.llm.anthropic import _to_response
from tests.fake_anthropic import FakeAnthropicServer, FakeReply, message_body

pytestmark = pytest.mark.timeout(30)

MODEL = "claude-haiku-4-5"
REQUEST = LLMRequest(model=MODEL, prompt="hello", max_tokens=50)


def _reply(**fields: Any) -> FakeReply:
    return FakeReply(body={**message_body(), **fields}, headers={"request-id": "req_42"})


@pytest.mark.parametrize(
    "fields",
    [
        {"usage": {"input_tokens": 12, "output_tokens": 7, "cache_read_input_tokens": 5}},
        {
            "content": [
                {"type": "text", "text": "Let me add."},
                {"type": "tool_use", "id": "toolu_1", "name": "calculator", "input": {"expression": "1+1"}},
            ],
            "stop_reason": "tool_use",
        },
    ],
    ids=["text", "tool_use"],
)
def test_a_reply_reads_as_the_sdks_own_parse_reads_it(
    anthropic_server: FakeAnthropicServer, sdk_client: AnthropicClient, fields: dict[str, Any]
) -> None:
    anthropic_server.queue(_reply(**fields), _reply(**fields))
    ours = sdk_client.complete(REQUEST)
    sdk = anthropic.Anthropic(api_key="test-key", base_url=anthropic_server.base_url, max_retries=0)
    message = sdk.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hello"}])
    assert ours == _to_response(message, message._request_id)
    assert ours.request_id == "req_42"


def test_a_valid_reply_is_not_parsed_by_the_sdk(
    anthropic_server: FakeAnthropicServer, sdk_client: AnthropicClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: Any, **__: Any) -> NoReturn:
        raise AssertionError("the SDK's parse was called")

    monkeypatch.setattr(anthropic.APIResponse, "parse", refuse)
    anthropic_server.reply(_reply())
    assert sdk_client.complete(REQUEST).text == "Hello"


def test_a_reply_newer_than_the_sdk_takes_the_sdks_lenient_parse(
    anthropic_server: FakeAnthropicServer, sdk_client: AnthropicClient
) -> None:
    anthropic_server.reply(
        _reply(content=[{"type": "future_block", "data": 1}, {"type": "text", "text": "Hi"}], stop_reason="future")
    )
    response = sdk_client.complete(REQUEST)
    assert (response.text, response.stop_reason, response.request_id) == ("Hi", "future", "req_42")
    assert response.content[0] == {"type": "future_block", "data": 1}


@pytest.mark.parametrize("body", ["<html>bad gateway</html>", {"type": "message"}], ids=["text", "no_fields"])
def test_a_reply_that_is_not_a_message_is_one_clear_error(
    anthropic_server: FakeAnthropicServer, sdk_client: AnthropicClient, body: object
) -> None:
    anthropic_server.reply(FakeReply(body=body))
    with pytest.raises(NonRetryableStepError) as caught:
        sdk_client.complete(REQUEST)
    assert caught.value.kind == "unexpected"
    assert str(caught.value).startswith("Anthropic API 200: the reply is not a message: ")
    assert ("bad gateway" if isinstance(body, str) else '"type": "message"') in str(caught.value)
