"""Running one attempt of one step: pure of Redis and Celery, given the step's context and an LLM client."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator.definition.conditions import evaluate_condition
from orchestrator.definition.registry import FunctionRegistry
from orchestrator.definition.spec import ApprovalParams, LLMParams, PythonParams, StepSpec
from orchestrator.definition.templates import TEMPLATE_TIMEOUT_S, render
from orchestrator.engine.delta_sink import DeltaSink
from orchestrator.engine.deltas import AttemptStream
from orchestrator.errors import NonRetryableStepError, RetryableStepError, StepError, WorkflowDefinitionError
from orchestrator.infra.json_text import compact
from orchestrator.llm import LLMRequest, parse_structured, structured_output_instruction
from orchestrator.llm.gateway import CallContext, LLMGateway
from orchestrator.llm.preopen import PreOpen

MAX_APPROVAL_MESSAGE_CHARS = 20_000
"""The longest rendered approval message: it is stored with the run and shown to people, not sent to a model."""


@dataclass(frozen=True)
class StepContext(Mapping[str, Any]):
    """What a step sees: the run's inputs and its dependencies' outputs.

    It reads as a mapping of dependency name → output, so the seed's ``context["blog_post"]["word_count"]`` works.

    Attributes:
        run_id: The run.
        step: This step's name.
        attempt: 1-based attempt number.
        inputs: The run's inputs.
        outputs: Each dependency's output.
        params: The ``args`` of a ``python`` step.
        iteration: A repeated step's 1-based iteration, else ``None``.
        previous: A repeated step's previous iteration's output (``None`` in the first).
        output: This iteration's output, for a repeated step's ``until`` callable (``None`` elsewhere).
        item: A map step's item (``for_each``), else ``None``.
        index: A map step's item's 0-based index, else ``None``.
        count: How many items the map step has, else ``None``.
    """

    run_id: str
    step: str
    attempt: int
    inputs: Mapping[str, Any]
    outputs: Mapping[str, Any]
    params: Mapping[str, Any] = field(default_factory=dict)
    iteration: int | None = None
    previous: Any = None
    output: Any = None
    item: Any = None
    index: int | None = None
    count: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self.outputs[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.outputs)

    def __len__(self) -> int:
        return len(self.outputs)

    def template_context(self) -> dict[str, Any]:
        """The variables a template sees: ``inputs``, ``steps.NAME.output``, ``run_id``, ``attempt``; a repeated
        step's also ``iteration`` and ``previous``; a map step's item also ``item``, ``index`` and ``count``."""
        variables = {
            "inputs": dict(self.inputs),
            "steps": {name: {"output": out} for name, out in self.outputs.items()},
            "run_id": self.run_id,
            "attempt": self.attempt,
        }
        if self.iteration is not None:
            variables.update(iteration=self.iteration, previous=self.previous)
        if self.index is not None:
            variables.update(item=self.item, index=self.index, count=self.count)
        return variables


class StepExecutor:
    """Runs step attempts.

    Args:
        llm: The gateway ``llm`` steps call through (cache, limits, budget, cost).
        functions: The registry ``python`` steps call into.
        max_output_bytes: Outputs larger than this fail the step.
        max_prompt_bytes: A rendered prompt and system prompt larger than this (UTF-8, together) fail the step
            before any LLM call.
        llm_timeout_s: Default per-call LLM timeout (a step's ``timeout_s`` wins).
        interrupts: Exceptions that interrupt a step from outside (Celery's soft time limit) and must reach the
            worker as they are, never be mistaken for an error of the step's own code.
        template_timeout_s: Seconds one render or condition may take (a step's ``timeout_s`` can shorten it).
        deltas: Where a ``stream: true`` step's text goes as it is generated; ``None`` streams nothing.
    """

    def __init__(
        self,
        llm: LLMGateway,
        functions: FunctionRegistry,
        *,
        max_output_bytes: int,
        llm_timeout_s: float,
        interrupts: tuple[type[BaseException], ...] = (),
        max_prompt_bytes: int = 4 * 1024 * 1024,
        template_timeout_s: float = TEMPLATE_TIMEOUT_S,
        deltas: DeltaSink | None = None,
    ):
        self.llm = llm
        self.deltas = deltas
        self.template_timeout_s = template_timeout_s
        self.interrupts = interrupts
        self.functions = functions
        self.max_output_bytes = max_output_bytes
        self.max_prompt_bytes = max_prompt_bytes
        self.llm_timeout_s = llm_timeout_s

    def should_run(self, step: StepSpec, ctx: StepContext) -> bool:
        """Evaluate the step's condition (``True`` when it has none).

        Raises:
            NonRetryableStepError: When the condition raises; the step then fails with the cause.
        """
        if step.condition is not None:
            return evaluate_condition(
                step.condition,
                inputs=dict(ctx.inputs),
                outputs=dict(ctx.outputs),
                timeout_s=self._template_timeout(step),
            )
        if step.condition_function is not None:
            return self._predicate(step.condition_function, ctx, "condition")
        return True

    def until_met(self, step: StepSpec, ctx: StepContext, output: Any) -> bool:
        """Whether a repeated step's ``until`` holds after the iteration ``ctx`` names returned ``output``.

        Raises:
            NonRetryableStepError: When ``until`` raises; the step then fails with the cause.
        """
        repeat = step.repeat
        assert repeat is not None, f"step {step.name!r} does not repeat"
        if repeat.until_function is not None:
            return self._predicate(repeat.until_function, replace(ctx, output=output), "until")
        assert repeat.until is not None
        return evaluate_condition(
            repeat.until,
            inputs=dict(ctx.inputs),
            outputs=dict(ctx.outputs),
            timeout_s=self._template_timeout(step),
            extra={"output": output, "previous": ctx.previous, "iteration": ctx.iteration},
            what="repeat.until",
        )

    def _predicate(self, name: str, ctx: StepContext, what: str) -> bool:
        try:
            fn = self.functions.get(name)
            return bool(fn(ctx))
        except Exception as exc:
            raise NonRetryableStepError(
                f"{what} {name!r} raised {type(exc).__name__}: {exc}", kind="condition_error"
            ) from None

    def approval_message(self, params: ApprovalParams, ctx: StepContext) -> str | None:
        """Render an approval step's message (``None`` when it has none).

        Raises:
            NonRetryableStepError: ``message_too_large`` past :data:`MAX_APPROVAL_MESSAGE_CHARS`; ``template_limit``
                or ``template_error`` as for a prompt.
        """
        if params.message is None:
            return None
        try:
            return render(
                params.message,
                ctx.template_context(),
                max_chars=MAX_APPROVAL_MESSAGE_CHARS,
                timeout_s=self.template_timeout_s,
            )
        except NonRetryableStepError as exc:
            if exc.kind == "prompt_too_large":
                raise NonRetryableStepError(
                    f"the approval message passes {MAX_APPROVAL_MESSAGE_CHARS} characters, the limit",
                    kind="message_too_large",
                ) from None
            raise

    def _template_timeout(self, step: StepSpec) -> float:
        return min(self.template_timeout_s, step.timeout_s) if step.timeout_s else self.template_timeout_s

    def run(self, step: StepSpec, ctx: StepContext, call: CallContext, deadline: float | None = None) -> Any:
        """Run one attempt (or one iteration of a repeated step) and return its JSON-serialisable output.

        Args:
            step: The step.
            ctx: What it sees.
            call: The run's LLM budget and workflow name, for ``llm`` steps.
            deadline: When the attempt's ``timeout_s`` runs out (``time.monotonic()``), for an ``llm`` step whose
                attempt began earlier (a repeated step's later iterations); by default it starts now.

        Raises:
            StepDeferred: An LLM step must wait for a shared rate limit or a cool-down.
            RetryableStepError: A transient failure.
            NonRetryableStepError: A permanent one (including an output over the size cap, or a spent budget).
        """
        if isinstance(step.params, LLMParams):
            call = self.llm_call(step, step.params, call)
            stream = self.attempt_stream(ctx) if step.params.stream else None
            if stream is None:
                output = self._run_llm(step, step.params, ctx, call, deadline)
            else:
                with stream:
                    output = self._run_llm(step, step.params, ctx, call, deadline, stream=stream)
        elif isinstance(step.params, PythonParams):
            output = self._run_python(step.params, ctx)
        else:
            output = None
        self.check_output(output)
        return output

    @staticmethod
    def llm_call(step: StepSpec, params: LLMParams, call: CallContext) -> CallContext:
        """The context an ``llm`` step's calls go with: the run's, with the step's reply cache."""
        return replace(call, reply_cache=params.reply_cache if step.cache else "off")

    def pre_open(self, step: StepSpec, ctx: StepContext, call: CallContext, task_id: str) -> PreOpen | None:
        """The first LLM call of an ``llm`` step's attempt seeing ``ctx``, opened ahead in the finish that claims it
        under ``task_id`` (see :mod:`orchestrator.llm.preopen`), rendered as :meth:`run` renders it; ``None`` for
        another step, a prompt that does not render, or a gateway that opens no call ahead."""
        if not isinstance(step.params, LLMParams):
            return None
        try:
            request = self.llm_request(step, step.params, ctx, None)
        except StepError:
            return None  # the attempt meets it itself, and fails or retries as it should
        return self.llm.pre_open(request, self.llm_call(step, step.params, call), task_id, basis=ctx)

    def attempt_stream(self, ctx: StepContext, index: int | None = None) -> AttemptStream | None:
        """The stream an attempt's LLM calls send their text into (``None`` when this executor streams nowhere).

        Pass its ``on_text`` to :meth:`LLMGateway.complete`, and call ``reset()`` before a later call of the same
        attempt whose text replaces the earlier one's.
        """
        if self.deltas is None:
            return None
        starts_over = ctx.attempt > 1 or (ctx.iteration or 1) > 1
        return AttemptStream(self.deltas, ctx.run_id, ctx.step, index, ctx.attempt, starts_over=starts_over)

    def _run_llm(
        self,
        step: StepSpec,
        params: LLMParams,
        ctx: StepContext,
        call: CallContext,
        deadline: float | None,
        *,
        stream: AttemptStream | None = None,
    ) -> dict[str, Any]:
        # Celery's soft time limit cannot interrupt a thread (LLM steps run on the threads pool), so the step's
        # timeout is one deadline for the whole attempt: rendering stops at it, each LLM call gets what is left.
        if deadline is None and step.timeout_s:
            deadline = time.monotonic() + step.timeout_s
        request = self._request_ahead(step, ctx, call, deadline) or self.llm_request(step, params, ctx, deadline)
        prompt = request.prompt
        # Passed only when streaming: gateways written before streaming take no ``on_text``.
        streaming = {"on_text": stream.on_text} if stream is not None else {}
        reply = self.llm.complete(request, call, **streaming)
        response = reply.response
        usage = {"input_tokens": response.usage.input_tokens, "output_tokens": response.usage.output_tokens}
        output: dict[str, Any] = {
            "text": response.text,
            "word_count": len(response.text.split()),
            "model": response.model,
            "usage": usage,
            "cost_usd": reply.cost_usd,
        }
        if reply.cached:
            output["reply_cached"] = True
        if params.output_schema is not None:
            try:
                output["data"] = parse_structured(response.text, params.output_schema)
            except NonRetryableStepError as first:
                # One bounded repair: show the model its reply and the validation error, once.
                repair = LLMRequest(
                    model=request.model,
                    prompt=(
                        f"{prompt}\n\nYour previous reply was not valid: {first}\n"
                        f"Previous reply:\n{response.text[:4000]}\n\nReply again with only the corrected JSON."
                    ),
                    max_tokens=request.max_tokens,
                    system=request.system,
                    temperature=request.temperature,
                    attempt=request.attempt,
                    simulate=_without_errors(request.simulate),
                    timeout_s=_time_left(step, deadline) if deadline is not None else request.timeout_s,
                )
                if stream is not None:
                    stream.reset()
                second = self.llm.complete(repair, call, **streaming)
                repaired = second.response
                usage["input_tokens"] += repaired.usage.input_tokens
                usage["output_tokens"] += repaired.usage.output_tokens
                if output["cost_usd"] is not None and second.cost_usd is not None:
                    output["cost_usd"] += second.cost_usd
                output.update(text=repaired.text, word_count=len(repaired.text.split()), repaired=True)
                output["data"] = parse_structured(repaired.text, params.output_schema)
        return output

    def llm_request(self, step: StepSpec, params: LLMParams, ctx: StepContext, deadline: float | None) -> LLMRequest:
        """An ``llm`` step's request as its attempt seeing ``ctx`` sends it: the one way it is built, for the call
        and for the call opened ahead (:meth:`pre_open`).

        Raises:
            NonRetryableStepError: As :meth:`render_prompt`.
            RetryableStepError: ``timeout`` when ``deadline`` has passed.
        """
        prompt, system = self.render_prompt(params.prompt, params.system, ctx, deadline)
        if params.output_schema is not None:
            instruction = structured_output_instruction(params.output_schema)
            system = f"{system}\n\n{instruction}" if system else instruction
        return LLMRequest(
            model=params.model,
            prompt=prompt,
            max_tokens=params.max_tokens,
            system=system,
            temperature=params.temperature,
            attempt=ctx.attempt,
            simulate=params.simulate.model_dump(exclude_none=True) if params.simulate else None,
            timeout_s=_time_left(step, deadline) if deadline is not None else self.llm_timeout_s,
        )

    def _request_ahead(
        self, step: StepSpec, ctx: StepContext, call: CallContext, deadline: float | None
    ) -> LLMRequest | None:
        """The request its parent's finish rendered for this attempt, when the attempt sees what it foresaw."""
        foretold = call.opened.foretold if call.opened is not None else None
        if foretold is None or foretold.basis != ctx:
            return None
        if deadline is None:
            return foretold.request
        return replace(foretold.request, timeout_s=_time_left(step, deadline))

    def render_prompt(
        self, prompt_template: str, system_template: str | None, ctx: StepContext, deadline: float | None
    ) -> tuple[str, str | None]:
        """Render a prompt and system prompt within the prompt size limit and the templates' time budget.

        Raises:
            NonRetryableStepError: ``prompt_too_large``, ``template_limit`` or ``template_error``.
        """
        variables = ctx.template_context()
        limits: dict[str, Any] = {
            "max_chars": self.max_prompt_bytes,
            "timeout_s": self.template_timeout_s,
            "deadline": deadline,
        }
        # Inputs and upstream outputs can make a small template render huge: refuse before paying for it.
        try:
            prompt = render(prompt_template, variables, **limits)
            system = render(system_template, variables, **limits) if system_template else None
        except NonRetryableStepError as exc:
            if exc.kind == "prompt_too_large":
                raise NonRetryableStepError(f"{exc} (ORCH_MAX_PROMPT_BYTES)", kind=exc.kind) from None
            raise
        size = len(prompt.encode()) + (len(system.encode()) if system else 0)
        if size > self.max_prompt_bytes:
            raise NonRetryableStepError(
                f"the rendered prompt is {size} bytes; the limit is {self.max_prompt_bytes} (ORCH_MAX_PROMPT_BYTES)",
                kind="prompt_too_large",
            )
        return prompt, system

    def _run_python(self, params: PythonParams, ctx: StepContext) -> Any:
        try:
            fn = self.functions.get(params.function)
        except WorkflowDefinitionError as exc:
            raise NonRetryableStepError(str(exc), kind="unknown_function") from None
        call_ctx = replace(ctx, params=params.args)
        passthrough: tuple[type[BaseException], ...] = (StepError, *self.interrupts)
        try:
            return fn(call_ctx, **params.args)
        except passthrough:
            raise
        except (TimeoutError, ConnectionError) as exc:
            raise RetryableStepError(
                f"{type(exc).__name__}: {exc}", kind="timeout" if isinstance(exc, TimeoutError) else "connection"
            ) from exc
        except Exception as exc:
            # A bug in user code does not get better by repeating it; raise RetryableStepError to ask for retries.
            raise NonRetryableStepError(f"{type(exc).__name__}: {exc}", kind="exception") from exc

    def check_output(self, output: Any) -> None:
        """Refuse an output that is not JSON or passes the size cap.

        Raises:
            NonRetryableStepError: ``invalid_output`` or ``output_too_large``.
        """
        try:
            size = len(compact(output).encode())
        except (TypeError, ValueError) as exc:
            raise NonRetryableStepError(f"output is not JSON-serialisable: {exc}", kind="invalid_output") from None
        if size > self.max_output_bytes:
            raise NonRetryableStepError(
                f"output is {size} bytes; the limit is {self.max_output_bytes} (ORCH_MAX_OUTPUT_BYTES)",
                kind="output_too_large",
            )


def _time_left(step: StepSpec, deadline: float) -> float:
    """Seconds left before the attempt's deadline.

    Raises:
        RetryableStepError: ``timeout`` when none are, as when Celery's soft time limit ends a step.
    """
    left = deadline - time.monotonic()
    if left <= 0:
        raise RetryableStepError(f"step exceeded its timeout of {step.timeout_s}s", kind="timeout")
    return left


def _without_errors(simulate: dict[str, Any] | None) -> dict[str, Any] | None:
    # The repair call is part of the same attempt: scripted failures must not fire twice.
    if simulate is None:
        return None
    return {k: v for k, v in simulate.items() if k != "errors"}
