"""Every LLM call a step makes goes through here: reply cache, shared limits, budget, the call, its cost.

In order: a stored reply for the same request is used if there is one (cost 0); otherwise the governor admits the
call (cool-down, rate limits, budget) or says how long to wait; the provider is called once; the call is settled
with its real usage and cost; the reply is stored before anything else can fail.

On a single Redis the lookup and the admission are one script and the settlement and the storing another
(``RedisGovernor.open_call`` and ``close_call``): two round trips per call. A call whose context carries an outbox
(a step attempt's: :mod:`orchestrator.llm.outbox`) leaves its close there, for the attempt's next write to Redis to
carry ahead of its own commands (the step's finish, or the next call's open): one round trip of its own per call.
A child continued locally after its parent may find its call opened already, in its parent's finish
(:mod:`orchestrator.llm.preopen`): none.
On a Redis Cluster, whose slots keep a run's keys and a model's limiter apart, they are the separate commands they
were: four.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from orchestrator import telemetry
from orchestrator.errors import NonRetryableStepError, StepDeferred, StepError
from orchestrator.llm.base import LLMClient, LLMRequest, LLMResponse, TextCallback
from orchestrator.llm.cache import ReplyCache, decode_reply, encode_reply, request_digest
from orchestrator.llm.governor import Admission, RedisGovernor, ReplyStore, Settlement
from orchestrator.llm.outbox import CallOutbox
from orchestrator.llm.preopen import Foretold, PreOpen
from orchestrator.llm.pricing import PriceTable, estimate_input_tokens

__all__ = ["CallContext", "GatewayReply", "LLMGateway"]

log = logging.getLogger(__name__)

_COOLDOWN_KINDS = frozenset({"rate_limit", "overloaded"})


@dataclass(frozen=True)
class CallContext:
    """Who is calling.

    Attributes:
        run_id: The run paying.
        workflow: The workflow's name (a metrics label).
        budget_usd: The run's budget, or ``None``.
        reply_cache: ``run``, ``shared`` or ``off`` (see :class:`~orchestrator.definition.spec.LLMParams`).
        fresh: Ask the provider even if a reply is stored (``resume --from`` names the step: the user wants a new
            answer); the new reply is stored as usual.
        step: The step calling (with the run and the request, it names the caller's booking in a rate limit).
        iteration: A repeated step's iteration: part of the reply cache's key (see
            :func:`~orchestrator.llm.cache.request_digest`).
        outbox: Where a call's close waits for the attempt's next write to Redis (single Redis only; see
            :mod:`orchestrator.llm.outbox`); ``None`` sends each close at once. Whoever gives one flushes it when
            the attempt ends.
        opened: The attempt's first call, opened ahead in its parent's finish (:mod:`orchestrator.llm.preopen`):
            the call takes its answer when it is that very open. Whoever gives one gives back what it still holds
            when the attempt ends.
    """

    run_id: str
    workflow: str
    budget_usd: float | None = None
    reply_cache: str = "run"
    fresh: bool = False
    step: str = ""
    iteration: int | None = None
    outbox: CallOutbox | None = None
    opened: PreOpen | None = None


@dataclass(frozen=True)
class GatewayReply:
    """A reply and what it cost.

    Attributes:
        response: The reply.
        cost_usd: Dollars paid for it: 0 when it came from the cache, ``None`` when the model has no price.
        cached: Served from the reply cache.
    """

    response: LLMResponse
    cost_usd: float | None
    cached: bool


class LLMGateway:
    """Governs and prices the calls of one worker process.

    Args:
        client: The provider.
        prices: The price table.
        governor: Limits and budgets in Redis; ``None`` governs nothing (a client without Redis).
        cache: The reply cache; ``None`` caches nothing.
        shared_cooldown: A provider's ``retry-after`` pauses every worker's calls to the model (else only the
            failed task waits, by its own retry).
    """

    def __init__(
        self,
        client: LLMClient,
        *,
        prices: PriceTable | None = None,
        governor: RedisGovernor | None = None,
        cache: ReplyCache | None = None,
        shared_cooldown: bool = True,
    ) -> None:
        self.client = client
        self.shared_cooldown = shared_cooldown
        self.prices = prices or PriceTable()
        self.governor = governor
        self.cache = cache

    def complete(self, request: LLMRequest, ctx: CallContext, on_text: TextCallback | None = None) -> GatewayReply:
        """Answer ``request`` for ``ctx``'s run; with ``on_text``, stream the reply's text into it as it arrives.

        A stored reply is streamed as one piece (its whole text), so the pieces always concatenate to the reply's
        text; limits, budget and cost are the same for a streamed call (usage comes from the final message).

        Raises:
            StepDeferred: The model is cooling down or at its rate limit; the step should wait ``countdown``.
            NonRetryableStepError: ``budget_exceeded``, or the provider's permanent errors.
            RetryableStepError: The provider's transient errors (a ``retry-after`` also cools the model down).
        """
        folded = self.governor is not None and self.governor.folds
        if folded:
            # One round trip opens the call (cache, cool-down, rate limit, budget) and one closes it.
            return self._complete_folded(request, ctx, on_text)
        digest = request_digest(request, ctx.iteration)
        shared = ctx.reply_cache == "shared"
        if self.cache is not None and ctx.reply_cache != "off" and not ctx.fresh:
            stored = self.cache.get(ctx.run_id, digest, shared=shared)
            if stored is not None:
                return self._cached(request, ctx, stored, on_text)
        estimated_input = estimate_input_tokens(request.input_text, request.system)
        tokens = estimated_input + request.max_tokens
        worst_case = self.prices.worst_case(request.model, estimated_input, request.max_tokens)
        if self.governor is not None:
            admission = self.governor.admit(
                run_id=ctx.run_id,
                model=request.model,
                tokens=tokens,
                worst_case_usd=worst_case,
                budget_usd=ctx.budget_usd,
                caller=_caller(ctx, digest),
            )
            self._check(request, ctx, admission, worst_case)
        return self._call(request, ctx, on_text, tokens, worst_case, digest=digest, reply=None)

    def pre_open(self, request: LLMRequest, ctx: CallContext, task_id: str, basis: Any = None) -> PreOpen | None:
        """The open :meth:`complete` would send for ``request``, not sent, guarded by the claim of ``ctx.step``
        under ``task_id``: for the finish that claims it to carry (:mod:`orchestrator.llm.preopen`). ``None`` where
        calls are not opened in one script (no governor, a Redis Cluster). ``basis``: what the request was built
        from (:attr:`~orchestrator.llm.preopen.Foretold.basis`)."""
        if self.governor is None or not self.governor.folds:
            return None
        digest = request_digest(request, ctx.iteration)
        reply, tokens, worst_case = self._plan(request, ctx, digest)
        foretold = Foretold(request, _fits(request, ctx), digest, (reply, tokens, worst_case), basis)
        return self.governor.pre_open(
            run_id=ctx.run_id,
            model=request.model,
            tokens=tokens,
            worst_case_usd=worst_case,
            budget_usd=ctx.budget_usd,
            caller=_caller(ctx, digest),
            reply=reply,
            step=ctx.step,
            task_id=task_id,
            foretold=foretold,
        )

    def _plan(self, request: LLMRequest, ctx: CallContext, digest: str) -> tuple[ReplyStore | None, int, float]:
        """Where a folded call's reply is looked up and stored, its tokens counted and its worst case held."""
        reply: ReplyStore | None = None
        if self.cache is not None and ctx.reply_cache != "off":
            reply = ReplyStore(
                digest,
                lookup=not ctx.fresh,
                shared=ctx.reply_cache == "shared",
                run_ttl_s=self.cache.run_ttl_s,
                shared_ttl_s=self.cache.shared_ttl_s,
            )
        estimated_input = estimate_input_tokens(request.input_text, request.system)
        tokens = estimated_input + request.max_tokens
        worst_case = self.prices.worst_case(request.model, estimated_input, request.max_tokens)
        return reply, tokens, worst_case

    def _complete_folded(self, request: LLMRequest, ctx: CallContext, on_text: TextCallback | None) -> GatewayReply:
        assert self.governor is not None
        opened, ahead = ctx.opened, None
        fits = _fits(request, ctx) if opened is not None else ()
        if opened is not None and fits == opened.foretold.fits:
            # Opened ahead in the parent's finish for this very call: worked out there, answered there (as a rule).
            digest, (reply, tokens, worst_case) = opened.foretold.digest, opened.foretold.plan
            ahead = opened.take(fits)
        else:
            digest = request_digest(request, ctx.iteration)
            reply, tokens, worst_case = self._plan(request, ctx, digest)
        # What was opened ahead and not taken is given back first, in this open's round trip.
        back = opened.give_back() if opened is not None and ahead is None else None
        owed = ctx.outbox.take(self.governor.client) if ctx.outbox is not None and ahead is None else []
        admission, stored = self.governor.open_call(
            run_id=ctx.run_id,
            model=request.model,
            tokens=tokens,
            worst_case_usd=worst_case,
            budget_usd=ctx.budget_usd,
            caller=_caller(ctx, digest),
            reply=reply,
            # An earlier call of the attempt is settled first, in the same round trip: this one sees its spend.
            owed=[back, *owed] if back is not None else owed,
            ahead=ahead,
        )
        if stored is not None:
            return self._cached(request, ctx, decode_reply(stored), on_text)
        self._check(request, ctx, admission, worst_case)
        return self._call(request, ctx, on_text, tokens, worst_case, digest=digest, reply=reply)

    def _cached(
        self, request: LLMRequest, ctx: CallContext, stored: LLMResponse, on_text: TextCallback | None
    ) -> GatewayReply:
        usage = stored.usage
        telemetry.llm_call(
            telemetry.LLMCallRecord(
                ctx.workflow, request.model, usage.input_tokens, usage.output_tokens, 0.0, cached=True
            )
        )
        if on_text is not None and stored.text:
            on_text(stored.text)
        return GatewayReply(stored, 0.0, cached=True)

    def _call(
        self,
        request: LLMRequest,
        ctx: CallContext,
        on_text: TextCallback | None,
        tokens: int,
        worst_case: float,
        *,
        digest: str,
        reply: ReplyStore | None,
    ) -> GatewayReply:
        """Make the admitted call, then settle it and store its reply whatever happened."""
        started = time.monotonic()
        billed = False
        used = cost = 0.0
        priced: float | None = None
        cooldown = 0.0
        response: LLMResponse | None = None
        try:
            # Clients written before streaming take no ``on_text``: pass it only when streaming.
            response = (
                self.client.complete(request) if on_text is None else self.client.complete(request, on_text=on_text)
            )
            billed = True
            counts = response.usage.as_dict()
            used = sum(counts.values())
            priced = self.prices.cost(response.model, counts)
            # An unpriced model is charged to the budget at the dearest known price, so the budget still holds.
            cost = (
                priced
                if priced is not None
                else self.prices.worst_case(response.model, response.usage.input_tokens, response.usage.output_tokens)
            )
        except StepError as exc:
            retry_after = getattr(exc, "retry_after", None)
            if self.shared_cooldown and exc.kind in _COOLDOWN_KINDS and retry_after:
                cooldown = float(retry_after)
            self._record(ctx, request, None, duration_s=time.monotonic() - started, error_kind=exc.kind)
            raise
        finally:
            # Settling the call and storing its reply take one round trip together.
            in_out = (response.usage.input_tokens, response.usage.output_tokens) if response is not None else (0, 0)
            call = Settlement(
                run_id=ctx.run_id,
                model=request.model,
                tokens_estimated=tokens,
                tokens_used=int(used),
                worst_case_usd=worst_case,
                cost_usd=cost,
                billed=billed,
                cooldown_s=cooldown,
                tokens_in_out=in_out,
            )
            if self.governor is not None and self.governor.folds:
                self._close_folded(call, reply=reply, response=response, outbox=ctx.outbox)
            else:
                self._close(ctx, call, digest=digest, response=response, shared=ctx.reply_cache == "shared")
        assert response is not None
        self._record(ctx, request, response, duration_s=time.monotonic() - started, cost=priced)
        return GatewayReply(response, priced, cached=False)

    def _close_folded(
        self,
        call: Settlement,
        *,
        reply: ReplyStore | None,
        response: LLMResponse | None,
        outbox: CallOutbox | None,
    ) -> None:
        """Settle an opened call and store its reply (if any) in one script: now, or with the attempt's next write
        when there is an ``outbox``."""
        assert self.governor is not None
        try:
            body = encode_reply(response) if response is not None and reply is not None else None
            if outbox is not None:
                outbox.put(self.governor.pending_close(call, reply=reply, body=body))
            else:
                self.governor.close_call(call, reply=reply, body=body)
        except Exception:
            # The call has happened; losing its accounting or its stored reply must not lose the reply itself.
            log.warning("could not settle or store an LLM call of run %s", call.run_id, exc_info=True)

    def _check(self, request: LLMRequest, ctx: CallContext, admission: Admission, worst_case: float) -> None:
        """Raise what an admission other than ``ok`` means for the step."""
        if admission.outcome == "budget_exceeded":
            raise NonRetryableStepError(
                f"the run's LLM budget of {_dollars(ctx.budget_usd)} is spent: "
                f"${admission.spent_usd:.4f} spent or held, "
                f"and this call to {request.model} could cost up to ${worst_case:.4f}",
                kind="budget_exceeded",
            )
        if admission.outcome != "ok":
            telemetry.step_deferred(ctx.workflow, request.model, admission.outcome)
            # A booked place comes back when its turn comes; a cool-down ends for every waiting step at once, so those
            # spread out a little.
            spread = (
                0.0 if admission.outcome == "rate_limit" else random.uniform(0, min(1.0, 0.1 + admission.wait_s / 5))
            )
            countdown = admission.wait_s + spread
            what = "a provider's retry-after" if admission.outcome == "cooldown" else "the cluster-wide rate limit"
            raise StepDeferred(
                f"{request.model}: waiting {admission.wait_s:.2f}s for {what}",
                reason=admission.outcome,
                model=request.model,
                countdown=countdown,
            )

    def _close(
        self,
        ctx: CallContext,
        call: Settlement,
        *,
        digest: str,
        response: LLMResponse | None,
        shared: bool,
    ) -> None:
        """Settle an admitted call with the governor and store its reply (if any), in one pipeline."""
        cache = self.cache if ctx.reply_cache != "off" and response is not None else None
        owner = self.governor or cache
        if owner is None:
            return
        pipe = owner.client.pipeline(transaction=False)
        if self.governor is not None:
            self.governor.settle(call, pipe=pipe)
        if cache is not None and response is not None:
            cache.put(ctx.run_id, digest, response, shared=shared, pipe=pipe)
        try:
            if self.governor is not None:
                self.governor.execute(pipe)
            else:
                pipe.execute()
        except Exception:
            # The call has happened; losing its accounting or its stored reply must not lose the reply itself.
            log.warning("could not settle or store an LLM call of run %s", ctx.run_id, exc_info=True)

    def _record(
        self,
        ctx: CallContext,
        request: LLMRequest,
        response: LLMResponse | None,
        *,
        duration_s: float,
        error_kind: str | None = None,
        cost: float | None = 0.0,
    ) -> None:
        usage = response.usage if response is not None else None
        telemetry.llm_call(
            telemetry.LLMCallRecord(
                ctx.workflow,
                request.model,
                usage.input_tokens if usage else 0,
                usage.output_tokens if usage else 0,
                cost,
                cached=False,
                duration_s=duration_s,
                error_kind=error_kind,
                response_model=response.model if response is not None else None,
            )
        )


def _fits(request: LLMRequest, ctx: CallContext) -> tuple[Any, ...]:
    """What decides a call's open: the request's digested fields, and who calls with what budget and cache."""
    return (
        *(request.model, request.system, request.prompt, request.max_tokens, request.temperature),
        *(request.messages, request.tools),
        *(ctx.run_id, ctx.step, ctx.iteration, ctx.budget_usd, ctx.reply_cache, ctx.fresh),
    )


def _caller(ctx: CallContext, digest: str) -> str:
    """The caller's name in a rate limit's bookings: the run, the step and the request."""
    return f"{ctx.run_id}:{ctx.step}:{digest[:16]}"


def _dollars(budget_usd: float | None) -> str:
    # A child run without a budget of its own is capped by what its parent had left (budget_cap_nusd).
    return f"${budget_usd:.4f}" if budget_usd is not None else "its parent run (what it had left)"
