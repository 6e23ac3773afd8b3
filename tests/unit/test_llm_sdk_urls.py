"""The Messages API's URL, joined once per client (``_SDK._prepare_url`` in ``orchestrator/llm/anthropic.py``).

The real SDK talks HTTP to a local fake server (``tests/fake_anthropic.py``) mounted under a path, as behind a proxy.
"""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from orchestrator.llm import AnthropicClient, LLMRequest
from tests.fake_anthropic import FakeAnthropicServer, FakeReply

pytestmark = pytest.mark.timeout(30)

REQUEST = LLMRequest(model="claude-haiku-4-5", prompt="hello", max_tokens=50)


@pytest.fixture
def joins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the SDK's own URL join is asked for, from now on."""
    asked: list[str] = []
    real = anthropic.Anthropic._prepare_url

    def prepare_url(self: anthropic.Anthropic, url: str) -> Any:
        asked.append(url)
        return real(self, url)

    monkeypatch.setattr(anthropic.Anthropic, "_prepare_url", prepare_url)
    return asked


def test_calls_go_to_the_base_urls_path_which_is_joined_once(
    anthropic_server: FakeAnthropicServer, joins: list[str]
) -> None:
    anthropic_server.queue(*(FakeReply() for _ in range(3)))
    with AnthropicClient(api_key="test-key", base_url=f"{anthropic_server.base_url}/proxy", timeout_s=10) as client:
        for _ in range(3):
            assert client.complete(REQUEST).text == "Hello"
    assert [r.path for r in anthropic_server.requests] == ["/proxy/v1/messages"] * 3
    assert joins == ["/v1/messages"]


def test_a_replaced_base_url_is_joined_afresh(anthropic_server: FakeAnthropicServer, joins: list[str]) -> None:
    anthropic_server.queue(*(FakeReply() for _ in range(2)))
    with AnthropicClient(api_key="test-key", base_url=f"{anthropic_server.base_url}/one", timeout_s=10) as client:
        client.complete(REQUEST)
        client._sdk.base_url = f"{anthropic_server.base_url}/two"
        client.complete(REQUEST)
    assert [r.path for r in anthropic_server.requests] == ["/one/v1/messages", "/two/v1/messages"]
    assert joins == ["/v1/messages", "/v1/messages"]
