"""Imported by the workers of ``scripts.bench_llm``'s chaos phases (``ORCH_IMPORTS``); never by the product.

- After a reply has been stored in the reply cache, the pool process SIGKILLs itself with probability
  ``BENCH_KILL_AFTER_REPLY``: the worst moment to die, the call paid for and the step not yet recorded.
- ``bench.fail_once`` fails the first time it runs in a run and succeeds after, so every run needs a resume.
"""

from __future__ import annotations

import os
import random
import signal
from typing import Any

import redis

from orchestrator.definition.registry import function
from orchestrator.engine.steps import StepContext
from orchestrator.errors import NonRetryableStepError
from orchestrator.llm.cache import ReplyCache

KILLS_KEY = "bench:chaos:kills"
_probability = float(os.environ.get("BENCH_KILL_AFTER_REPLY", "0"))
_redis = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
_put = ReplyCache.put


def _put_then_maybe_die(self: ReplyCache, *args: Any, **kwargs: Any) -> None:
    _put(self, *args, **kwargs)
    if random.random() < _probability:
        _redis.incr(KILLS_KEY)
        os.kill(os.getpid(), signal.SIGKILL)


if _probability > 0:
    ReplyCache.put = _put_then_maybe_die  # type: ignore[method-assign]


@function("bench.fail_once")
def fail_once(ctx: StepContext, **_: Any) -> dict[str, Any]:
    """Fail on the run's first try, succeed on every later one."""
    if _redis.set(f"bench:failed-once:{ctx.run_id}", 1, nx=True):
        raise NonRetryableStepError("failing once, so the run needs a resume", kind="bench")
    return {"ok": True}
