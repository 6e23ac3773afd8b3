"""The offline provider over HTTP: the real SDK over a socket, the service's 429s, and what it billed."""

from __future__ import annotations

import pytest

from orchestrator.dev.offline_server import serve_offline_api
from orchestrator.errors import RetryableStepError
from orchestrator.llm.anthropic import AnthropicClient
from orchestrator.llm.base import LLMRequest


def test_it_answers_through_the_sdk_and_rate_limits_like_the_service() -> None:
    with serve_offline_api(rpm=2) as server, AnthropicClient(api_key="k", base_url=server.base_url) as client:
        replies = [client.complete(LLMRequest(model="claude-haiku-4-5", prompt=f"q{i}", max_tokens=40)) for i in (1, 2)]
        with pytest.raises(RetryableStepError) as limited:
            client.complete(LLMRequest(model="claude-haiku-4-5", prompt="q3", max_tokens=40))
        stats = server.stats()

    assert all(r.text and r.usage.output_tokens > 0 for r in replies)
    assert limited.value.kind == "rate_limit"
    assert limited.value.retry_after is not None
    assert 1 <= limited.value.retry_after <= 30
    assert (stats["requests"], stats["billed"], stats["rate_limited"], stats["undelivered"]) == (3, 2, 1, 0)
    assert sorted(stats["billed_by_request"].values()) == [1, 1]


def test_replies_match_the_in_process_provider() -> None:
    from orchestrator.llm.offline import OfflineClient

    request = LLMRequest(model="claude-haiku-4-5", prompt="same question", max_tokens=60)
    with serve_offline_api() as server, AnthropicClient(api_key="k", base_url=server.base_url) as client:
        over_http = client.complete(request)
    assert over_http.text == OfflineClient().complete(request).text


def test_a_caller_that_resets_its_connection_prints_no_traceback_but_a_real_error_does(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with serve_offline_api() as server:
        httpd = server._httpd
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError:
            httpd.handle_error(None, ("127.0.0.1", 1))
        assert capsys.readouterr().err == ""
        try:
            raise ValueError("a bug in the handler")
        except ValueError:
            httpd.handle_error(None, ("127.0.0.1", 1))
        assert "ValueError: a bug in the handler" in capsys.readouterr().err
