"""Step functions of ``scripts.chaos``'s workflow: its workers import them (``ORCH_IMPORTS=scripts.steps.chaos``)."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from orchestrator import StepContext, function


@function("chaos.facts")
def facts(ctx: StepContext, seconds: float = 0.0, **_: Any) -> dict[str, Any]:
    """Some CPU-side work: a digest of the topic, after ``seconds`` of work."""
    time.sleep(seconds)
    topic = str(ctx.inputs["topic"])
    return {"topic": topic, "digest": hashlib.sha256(topic.encode()).hexdigest()[:16]}


@function("chaos.score")
def score(ctx: StepContext, seconds: float = 0.0, **_: Any) -> dict[str, Any]:
    """Join the two drafts and the facts."""
    time.sleep(seconds)
    return {"words": ctx["draft_a"]["word_count"] + ctx["draft_b"]["word_count"], "facts": ctx["facts"]["digest"]}
