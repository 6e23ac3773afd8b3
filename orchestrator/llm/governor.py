"""Cluster-wide LLM governance in Redis: per-run budgets, per-model rate limits and provider cool-downs.

Every worker process asks the same Redis, so the limits hold for the whole cluster:

- **Rate limits** (``ORCH_LLM_LIMITS``): requests and tokens per minute per model, as two token buckets in one hash
  per model. A call is admitted with its token estimate and settled with the real usage after.
- **Cool-downs**: a 429 or 529 that names a ``retry-after`` stops every worker's calls to that model until it
  passes, not only the failed task's.
- **Budgets**: a run's ``budget_usd``. Each call's worst-case cost is held in the run's hash before the call and
  settled with the real cost after; a call that could pass the budget is refused, and so is every later one.

A call that must wait is refused with the wait (:class:`Admission`); the step task then defers the step, holding
no worker slot. Each check is one Lua script: atomic, whichever worker asks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.client import Pipeline

from orchestrator.errors import OrchestratorError
from orchestrator.infra.redis_cluster import is_cluster_client, queue_evalsha, script_args
from orchestrator.infra.redis_roundtrip import execute, run_script
from orchestrator.llm.outbox import PendingClose
from orchestrator.llm.preopen import RESERVE_ARG, Foretold, PreOpen
from orchestrator.state import keys
from orchestrator.state.owed import OwedWrite, sent_again

__all__ = [
    "Admission",
    "Limit",
    "RateLimits",
    "RedisGovernor",
    "ReplyStore",
    "Settlement",
    "from_nano_usd",
    "to_nano_usd",
]

NANO = 1_000_000_000


def to_nano_usd(usd: float) -> int:
    """Dollars as whole nano-dollars, rounded up (so a budget is never under-counted)."""
    return math.ceil(usd * NANO - 1e-6)


def from_nano_usd(nano: int) -> float:
    """Nano-dollars as dollars."""
    return nano / NANO


@dataclass(frozen=True)
class Limit:
    """A model's cluster-wide limits; 0 means none.

    Attributes:
        rpm: Requests per minute.
        tpm: Tokens (input + output) per minute.
        burst: Requests that may go at once after a quiet spell (the request bucket's size); ``rpm`` when 0, as
            the provider counts. Lower it to smooth bursts.
    """

    rpm: int = 0
    tpm: int = 0
    burst: int = 0

    @property
    def capacity(self) -> int:
        """The request bucket's size."""
        return self.burst or self.rpm


class RateLimits:
    """Limits by model id, matched by longest prefix, ``*`` for every other model.

    Args:
        limits: Model id (or prefix, or ``*``) to its limit.
    """

    def __init__(self, limits: Mapping[str, Limit] | None = None) -> None:
        self._limits = dict(sorted((limits or {}).items(), key=lambda item: -len(item[0])))

    @classmethod
    def from_json(cls, raw: str | None) -> RateLimits:
        """Parse ``ORCH_LLM_LIMITS``: ``{"MODEL": {"rpm": N, "tpm": N}, "*": {...}}``.

        Raises:
            OrchestratorError: Not such an object, or a negative limit.
        """
        if not raw:
            return cls()
        try:
            parsed = json.loads(raw)
            if not isinstance(parsed, dict):
                raise TypeError("expected a JSON object")
            limits = {}
            for model, entry in parsed.items():
                if not isinstance(entry, dict) or not set(entry) <= {"rpm", "tpm", "burst"}:
                    raise TypeError(f"entry for {model!r} must be an object of 'rpm', 'tpm' and 'burst'")
                limit = Limit(
                    rpm=int(entry.get("rpm", 0)), tpm=int(entry.get("tpm", 0)), burst=int(entry.get("burst", 0))
                )
                if min(limit.rpm, limit.tpm, limit.burst) < 0:
                    raise ValueError(f"entry for {model!r} has a negative limit")
                limits[str(model)] = limit
        except (TypeError, ValueError) as exc:
            raise OrchestratorError(
                f'ORCH_LLM_LIMITS: {exc}; expected {{"MODEL": {{"rpm": N, "tpm": N, "burst": N}}}}'
            ) from None
        return cls(limits)

    def for_model(self, model: str) -> Limit:
        """The limit that applies to ``model`` (no limit when nothing matches)."""
        for prefix, limit in self._limits.items():
            if prefix != "*" and (model == prefix or model.startswith(prefix + "-")):
                return limit
        return self._limits.get("*", Limit())


@dataclass(frozen=True)
class Admission:
    """The answer to "may this call go now?".

    Attributes:
        outcome: ``ok``; ``rate_limit`` or ``cooldown`` (wait ``wait_s`` and ask again); ``budget_exceeded``.
        wait_s: Seconds to wait, for the two waiting outcomes.
        spent_usd: For ``budget_exceeded``: what the run had spent and held.
    """

    outcome: str
    wait_s: float = 0.0
    spent_usd: float = 0.0


@dataclass(frozen=True)
class ReplyStore:
    """Where :meth:`RedisGovernor.open_call` looks a reply up and :meth:`RedisGovernor.close_call` stores it.

    Attributes:
        digest: The request's digest (:func:`~orchestrator.llm.cache.request_digest`).
        lookup: Look the reply up first (else only store it).
        shared: Across runs too (``reply_cache: shared``).
        run_ttl_s: How long the run's replies are kept after the last one was stored.
        shared_ttl_s: How long a reply shared across runs is kept.
    """

    digest: str
    lookup: bool
    shared: bool
    run_ttl_s: int
    shared_ttl_s: int


@dataclass(frozen=True)
class Settlement:
    """What an admitted call used, to charge to the model's rate limit and the run's budget.

    Attributes:
        run_id: The run paying.
        model: The model called.
        tokens_estimated: The tokens counted when the call was admitted.
        tokens_used: The tokens the reply used (0 when the call failed).
        worst_case_usd: The cost held against the budget when the call was admitted.
        cost_usd: The call's real cost.
        billed: The provider answered, so the call counts towards the run's calls and tokens.
        cooldown_s: A provider's ``retry-after`` that pauses every worker's calls to the model; 0 for none.
        tokens_in_out: The reply's input and output tokens, added to the run's totals when ``billed``.
    """

    run_id: str
    model: str
    tokens_estimated: int
    tokens_used: int
    worst_case_usd: float
    cost_usd: float
    billed: bool
    cooldown_s: float = 0.0
    tokens_in_out: tuple[int, int] = (0, 0)


class RedisGovernor:
    """Admission and settlement of LLM calls against Redis.

    Args:
        client: A redis-py client.
        limits: The cluster-wide limits per model.
    """

    def __init__(self, client: redis.Redis, limits: RateLimits | None = None) -> None:
        self.client = client
        self.limits = limits or RateLimits()
        lua = resources.files("orchestrator.llm").joinpath("lua")
        sources = {name: lua.joinpath(f"{name}.lua").read_text() for name in ("admit", "settle", "budget")}
        self._admit = client.register_script(sources["admit"])
        self._settle = client.register_script(sources["settle"])
        self._budget = client.register_script(sources["budget"])
        # A call's cache lookup, admission and hold in one script, its settlement and stored reply in another: the
        # three scripts above become functions of both, so the rules stay theirs. Their keys span the run's slot and
        # the model's, so a Redis Cluster keeps the unfolded path (several round trips).
        self.folds = not is_cluster_client(client)
        library = "".join(f"local function {name}(KEYS, ARGV)\n{source}\nend\n" for name, source in sources.items())
        self._open = client.register_script(library + lua.joinpath("open.lua").read_text())
        self._close = client.register_script(library + lua.joinpath("close.lua").read_text())

    def admit(
        self,
        *,
        run_id: str,
        model: str,
        tokens: int,
        worst_case_usd: float,
        budget_usd: float | None,
        caller: str | None = None,
    ) -> Admission:
        """Ask to make one call: the model's cool-down and rate limits first, then the run's budget.

        On ``ok`` the call's tokens and one request are counted and its worst case is held against the budget:
        :meth:`settle` must follow, whatever the call does. A ``caller`` told to wait for the rate limit is booked
        a place (first come, first served): asking again with the same ``caller`` after the wait goes through.
        """
        limit = self.limits.for_model(model)
        limiter = keys.llm_limiter_key(model)
        # One script for every model: cool-downs hold for any model, limits only where configured.
        booking = keys.llm_booking_key(model, caller or "")
        args = [limit.rpm, limit.tpm, tokens, limit.capacity, "1" if caller else "0"]
        reply = self._admit(keys=[limiter, booking], args=args)
        outcome = _text(reply[0])
        if outcome != "ok":
            return Admission(outcome, wait_s=float(_text(reply[1])))
        held = to_nano_usd(worst_case_usd)
        budget = -1 if budget_usd is None else to_nano_usd(budget_usd)
        reply = self._budget(keys=[keys.run_key(run_id)], args=["reserve", held, budget])
        if int(reply[0]) != 1:
            self._settle(keys=[limiter], args=[limit.tpm, tokens, 0, 1, 0])
            spent = from_nano_usd(int(_text(reply[1])) + int(_text(reply[2])))
            return Admission("budget_exceeded", spent_usd=spent)
        return Admission("ok")

    def open_call(
        self,
        *,
        run_id: str,
        model: str,
        tokens: int,
        worst_case_usd: float,
        budget_usd: float | None,
        caller: str,
        reply: ReplyStore | None = None,
        owed: Sequence[OwedWrite] = (),
        ahead: Sequence[Any] | None = None,
    ) -> tuple[Admission, str | bytes | None]:
        """:meth:`admit`, after looking the reply up in the cache, in one round trip (single Redis only: see
        :attr:`folds`).

        ``owed`` writes (an earlier call's close, :mod:`orchestrator.llm.outbox`) go first in the same round trip, so
        Redis settles that call before it admits this one. ``ahead`` is this very open's answer, opened ahead in the
        parent's finish (:mod:`orchestrator.llm.preopen`): nothing is then sent.

        Returns:
            The admission and ``None``; or, when ``reply`` is looked up and stored, ``ok`` and the stored reply's JSON
            (nothing is then counted or held, and no :meth:`close_call` follows).
        """
        answer = ahead
        if answer is None:
            names, args = self._open_plan(
                run_id=run_id,
                model=model,
                tokens=tokens,
                worst_case_usd=worst_case_usd,
                budget_usd=budget_usd,
                caller=caller,
                reply=reply,
            )
            if owed:
                unused = Settlement(run_id, model, tokens, 0, worst_case_usd, 0.0, billed=False)
                answer = self._open_after(owed, names, args, unused)
            else:
                answer = self._run_open(names, args)
        outcome = _text(answer[0])
        if outcome == "cached":
            return Admission("ok"), answer[1]
        if outcome == "budget_exceeded":
            spent = from_nano_usd(int(_text(answer[1])) + int(_text(answer[2])))
            return Admission(outcome, spent_usd=spent), None
        if outcome != "ok":
            return Admission(outcome, wait_s=float(_text(answer[1]))), None
        return Admission("ok"), None

    def pre_open(
        self,
        *,
        run_id: str,
        model: str,
        tokens: int,
        worst_case_usd: float,
        budget_usd: float | None,
        caller: str,
        reply: ReplyStore | None,
        step: str,
        task_id: str,
        foretold: Foretold,
    ) -> PreOpen:
        """:meth:`open_call`'s script for a child ``step`` a finish is to claim under ``task_id``, not sent: for the
        finish's pipeline to carry after its own script (see :mod:`orchestrator.llm.preopen`)."""
        names, args = self._open_plan(
            run_id=run_id,
            model=model,
            tokens=tokens,
            worst_case_usd=worst_case_usd,
            budget_usd=budget_usd,
            caller=caller,
            reply=reply,
        )
        args[RESERVE_ARG] = "0"  # a child told to wait opens again itself, and books its place then
        unused = Settlement(run_id, model, tokens, 0, worst_case_usd, 0.0, billed=False)
        return PreOpen(
            self.client,
            self._open,
            keys=names,
            args=args,
            guard=(keys.step_field(step, "status"), keys.step_field(step, "task"), task_id),
            give_back=lambda: self.pending_close(unused, refund=True),
            run_id=run_id,
            foretold=foretold,
        )

    def _open_plan(
        self,
        *,
        run_id: str,
        model: str,
        tokens: int,
        worst_case_usd: float,
        budget_usd: float | None,
        caller: str,
        reply: ReplyStore | None,
    ) -> tuple[list[str], list[Any]]:
        """``open.lua``'s keys and arguments for a call."""
        limit = self.limits.for_model(model)
        lookup = "0" if reply is None or not reply.lookup else ("2" if reply.shared else "1")
        digest = reply.digest if reply is not None else ""
        budget = -1 if budget_usd is None else to_nano_usd(budget_usd)
        names = [
            keys.run_key(run_id),
            keys.llm_run_cache_key(run_id),
            keys.llm_shared_cache_key(digest),
            keys.llm_limiter_key(model),
            keys.llm_booking_key(model, caller),
        ]
        args = [
            *(lookup, digest, limit.rpm, limit.tpm, tokens, limit.capacity, "1" if caller else "0"),
            *(to_nano_usd(worst_case_usd), budget),
        ]
        return names, args

    def _open_after(self, owed: Sequence[OwedWrite], names: list[str], args: list[Any], unused: Settlement) -> Any:
        """Run the open script after ``owed``, in one pipeline; each owed write takes its own reply.

        An owed close Redis did not know went after the open (:func:`~orchestrator.state.owed.sent_again`), which did
        not see that call settled nor its reply stored: an admission is given back (``unused``) and the open run
        again, now after it. A wait stands (the step asks again once it is over), and so does a budget's refusal,
        which is for good; loading the close with the open (:meth:`_run_open`) leaves that only to a ``SCRIPT FLUSH``
        or restart landing between the two loads.
        """
        pipe = self.client.pipeline(transaction=False)
        for write in owed:
            write.queue(pipe)
        queue_evalsha(pipe, self._open.sha, len(names), *names, *args)
        replies = execute(pipe, raise_on_error=False)
        for write, reply in zip(owed, replies, strict=False):
            write.answered(reply)
        answer = replies[-1]
        if isinstance(answer, redis.exceptions.NoScriptError):
            return self._run_open(names, args)  # not applied: loaded and run again
        if isinstance(answer, Exception):
            raise answer
        outcome = _text(answer[0])
        if sent_again(replies[:-1]) and outcome == "ok":
            self.pending_close(unused, refund=True).send()
            return self._run_open(names, args)
        return answer

    def _run_open(self, names: list[str], args: list[Any]) -> Any:
        # Whoever loads the open loads the close first: an open never runs where Redis would refuse the close owed
        # ahead of it in the same round trip, and so apply the open first (see _open_after).
        return run_script(self.client, self._open, names, args, load_first=(self._close,))

    def close_call(self, call: Settlement, *, reply: ReplyStore | None = None, body: str | None = None) -> None:
        """:meth:`settle` an opened call and store its reply ``body`` (JSON) where ``reply`` says, in one round trip
        (single Redis only: see :attr:`folds`)."""
        pending = self.pending_close(call, reply=reply, body=body)
        run_script(self.client, self._close, pending.keys, pending.args)

    def pending_close(
        self, call: Settlement, *, reply: ReplyStore | None = None, body: str | None = None, refund: bool = False
    ) -> PendingClose:
        """:meth:`close_call`'s script, not sent: for an attempt's next write to carry
        (:mod:`orchestrator.llm.outbox`). With ``refund``, the call was opened but never made: its request goes
        back to the rate limit too, as when the budget refuses a call."""
        limit = self.limits.for_model(call.model)
        settles = limit.tpm or call.cooldown_s > 0 or (refund and limit.rpm)
        store = "0" if reply is None or body is None else ("2" if reply.shared else "1")
        digest = reply.digest if reply is not None else ""
        return PendingClose(
            self.client,
            self._close,
            keys=(
                keys.run_key(call.run_id),
                keys.llm_limiter_key(call.model),
                keys.llm_run_cache_key(call.run_id),
                keys.llm_shared_cache_key(digest),
            ),
            args=(
                "1" if settles else "0",
                limit.tpm,
                call.tokens_estimated,
                call.tokens_used,
                call.cooldown_s,
                to_nano_usd(call.worst_case_usd),
                to_nano_usd(call.cost_usd),
                "1" if call.billed else "0",
                *call.tokens_in_out,
                store,
                digest,
                body if body is not None and store != "0" else "",
                reply.run_ttl_s if reply is not None else 0,
                reply.shared_ttl_s if reply is not None else 0,
                1 if refund else 0,
            ),
            run_id=call.run_id,
        )

    def settle(self, call: Settlement, *, pipe: Pipeline | None = None) -> None:
        """Close an admitted call: charge its real tokens and cost, and start a cool-down if the provider asked.

        Args:
            call: What the call used.
            pipe: Queue the commands on this pipeline, for the caller to run with :meth:`execute` (so the reply can
                be stored in the same round trip); by default they run at once.
        """
        limit = self.limits.for_model(call.model)
        queue = self.client.pipeline(transaction=False) if pipe is None else pipe
        if limit.tpm or call.cooldown_s > 0:
            args: list[Any] = [limit.tpm, call.tokens_estimated, call.tokens_used, 0, call.cooldown_s]
            queue_evalsha(queue, self._settle.sha, 1, keys.llm_limiter_key(call.model), *args)
        held, cost = to_nano_usd(call.worst_case_usd), to_nano_usd(call.cost_usd)
        args = ["settle", held, cost, "1" if call.billed else "0", *call.tokens_in_out]
        queue_evalsha(queue, self._budget.sha, 1, keys.run_key(call.run_id), *args)
        if pipe is None:
            self.execute(queue)

    def execute(self, pipe: Pipeline) -> list[Any]:
        """Run a pipeline holding this governor's scripts by EVALSHA, in one round trip.

        redis-py's script objects would add a ``SCRIPT EXISTS`` round trip to every such pipeline. Instead, a script
        Redis does not know (first use since a restart or ``SCRIPT FLUSH``) is loaded and its command alone run
        again: the others have been applied, and a settle must not be counted twice.
        """
        commands = [script_args(command) for command in pipe.command_stack]
        replies = execute(pipe, raise_on_error=False)
        for index, reply in enumerate(replies):
            if isinstance(reply, redis.exceptions.NoScriptError):
                args = commands[index]
                self._load(str(args[1]))
                replies[index] = self.client.evalsha(*args[1:])
            elif isinstance(reply, Exception):
                raise reply
        return list(replies)

    def _load(self, sha: str) -> None:
        for script in (self._admit, self._settle, self._budget):
            if script.sha == sha:
                self.client.script_load(script.script)

    def cool_down(self, model: str, seconds: float) -> None:
        """Stop every worker's calls to ``model`` for ``seconds`` (a provider's ``retry-after``)."""
        limit = self.limits.for_model(model)
        self._settle(keys=[keys.llm_limiter_key(model)], args=[limit.tpm, 0, 0, 0, seconds])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
