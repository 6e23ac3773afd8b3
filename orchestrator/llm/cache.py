"""Replies stored by the content hash of their request, so an identical call is never paid for twice.

Within a run (the default) replies live in a hash next to the run's own (same Redis Cluster slot), kept as long as
finished runs are; across runs (opt-in, ``reply_cache: shared``) in a key per request with their own time to live.
A reply is stored before the step records its result, at the latest in the same round trip, ahead of the record
(:mod:`orchestrator.llm.outbox`): a worker killed once the record is sent leaves the reply for whoever needs it
again.
"""

from __future__ import annotations

import json
from typing import Any

import redis
from redis.client import Pipeline

from orchestrator.infra.digests import sha256
from orchestrator.infra.json_text import compact
from orchestrator.llm.base import LLMRequest, LLMResponse, LLMUsage
from orchestrator.state import keys

__all__ = ["ReplyCache", "decode_reply", "encode_reply", "request_digest"]


def request_digest(request: LLMRequest, iteration: int | None = None) -> str:
    """The content hash of what decides a reply: model, system, prompt, max_tokens and temperature.

    A repeated step's ``iteration`` is part of it: two iterations asking the same thing each get their own reply
    (a loop sampling until a reply passes must not be answered its first reply again), while the same iteration
    asked again after a lost worker is answered from the cache. An agent's turn adds its conversation so far and its
    tools: a replayed turn (the same conversation) is answered from the cache, the next one is not.
    """
    body: list[Any] = [request.model, request.system, request.prompt, request.max_tokens, request.temperature]
    if iteration is not None:
        body.append(iteration)
    if request.messages is not None or request.tools is not None:
        body.append({"messages": request.messages, "tools": request.tools})
    return sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()


class ReplyCache:
    """LLM replies in Redis, by request digest.

    Args:
        client: A redis-py client.
        run_ttl_s: How long a run's replies are kept after the last one was stored.
        shared_ttl_s: How long a reply shared across runs is kept.
    """

    def __init__(self, client: redis.Redis, *, run_ttl_s: int, shared_ttl_s: int) -> None:
        self.client = client
        self.run_ttl_s = run_ttl_s
        self.shared_ttl_s = shared_ttl_s

    def get(self, run_id: str, digest: str, *, shared: bool) -> LLMResponse | None:
        """The stored reply, from the run's replies first, then (when ``shared``) from other runs'."""
        raw = self.client.hget(keys.llm_run_cache_key(run_id), digest)
        if raw is None and shared:
            raw = self.client.get(keys.llm_shared_cache_key(digest))
        return None if raw is None else decode_reply(raw)

    def put(
        self, run_id: str, digest: str, response: LLMResponse, *, shared: bool, pipe: Pipeline | None = None
    ) -> None:
        """Store a reply for the run (and for every run, when ``shared``).

        Args:
            pipe: Queue the commands on this pipeline for the caller to run; by default they run at once.
        """
        body = encode_reply(response)
        queue = self.client.pipeline(transaction=False) if pipe is None else pipe
        queue.hset(keys.llm_run_cache_key(run_id), digest, body)
        queue.expire(keys.llm_run_cache_key(run_id), self.run_ttl_s)
        if shared:
            queue.set(keys.llm_shared_cache_key(digest), body, ex=self.shared_ttl_s)
        if pipe is None:
            queue.execute()


def encode_reply(response: LLMResponse) -> str:
    """A reply as the JSON the cache stores (``dataclasses.asdict``'s, without its deep copy of every block)."""
    usage = response.usage
    return compact(
        {
            "text": response.text,
            "model": response.model,
            "usage": {
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cache_creation_input_tokens": usage.cache_creation_input_tokens,
                "cache_read_input_tokens": usage.cache_read_input_tokens,
            },
            "stop_reason": response.stop_reason,
            "request_id": response.request_id,
            "extra": response.extra,
            "content": response.content,
        }
    )


def decode_reply(raw: Any) -> LLMResponse:
    """A reply from the JSON the cache stored."""
    data = json.loads(raw)
    return LLMResponse(
        text=data["text"],
        model=data["model"],
        usage=LLMUsage(**data["usage"]),
        stop_reason=data.get("stop_reason"),
        request_id=data.get("request_id"),
        extra=data.get("extra") or {},
        content=tuple(data.get("content") or ()),
    )
