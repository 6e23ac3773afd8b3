"""SHA-256 fed in pieces that keep the GIL: the digest is hashlib's, whatever the length."""

from __future__ import annotations

import hashlib
import json

import pytest

from orchestrator.infra import digests
from orchestrator.infra.digests import sha256
from orchestrator.llm.base import LLMRequest
from orchestrator.llm.cache import request_digest


@pytest.mark.parametrize("length", [0, 1, 2046, 2047, 2048, 4094, 4095, 10_000])
def test_the_digest_is_hashlibs_on_either_side_of_every_piece_boundary(length: int) -> None:
    data = bytes(i % 251 for i in range(length))

    assert sha256(data).hexdigest() == hashlib.sha256(data).hexdigest()
    assert sha256(data).digest() == hashlib.sha256(data).digest()


def test_a_long_requests_reply_cache_digest_is_fed_in_pieces_and_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    fed: list[int] = []
    real = hashlib.sha256

    class Recording:
        def __init__(self) -> None:
            self.inner = real()

        def update(self, data: memoryview) -> None:
            fed.append(len(data))
            self.inner.update(data)

        def hexdigest(self) -> str:
            return self.inner.hexdigest()

    monkeypatch.setattr(digests.hashlib, "sha256", Recording)
    request = LLMRequest(model="claude-haiku-4-5", prompt="x" * 10_000, max_tokens=100)

    digest = request_digest(request, 2)

    monkeypatch.undo()
    body = ["claude-haiku-4-5", None, "x" * 10_000, 100, request.temperature, 2]
    assert digest == hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()
    assert len(fed) > 1
    assert max(fed) <= 2047
