"""Workflow and step specifications: the one validated shape behind workflow files and Python workflows.

A :class:`WorkflowSpec` is frozen and JSON-serialisable; workers execute exactly the spec stored with a run
(by its :attr:`WorkflowSpec.definition_hash`), so a run never changes definition under its feet.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.definition.agent import AgentParams
from orchestrator.definition.dag import Graph, find_cycle
from orchestrator.definition.jsonschemas import SchemaError, check_schema
from orchestrator.definition.mapping import MAX_PARALLEL_LIMIT, check_map_shape
from orchestrator.definition.repeat import RepeatSpec
from orchestrator.definition.subflow import WorkflowParams
from orchestrator.errors import CycleError, UnknownDependencyError, WorkflowDefinitionError

STEP_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
WORKFLOW_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,99}$"
MAX_STEPS = 2000
MAX_NESTING = 100
MAX_WORKFLOW_TIMEOUT_S = 28 * 24 * 3600
"""The longest workflow ``timeout_s`` (28 days): as long as a running run is kept with the default retention
(``ORCH_RETENTION_S`` 7 days, times 4), so a deadline never outlives its run in the deadline index."""
TOP_LEVEL = 3
"""The highest queue priority level a step can have (:mod:`orchestrator.engine.priorities`): depth 3 or more."""
DEFAULT_MODEL = "claude-haiku-4-5"
SIMULATED_ERRORS = frozenset(
    {
        "rate_limit",
        "overloaded",
        "server_error",
        "bad_gateway",
        "unavailable",
        "request_timeout",
        "conflict",
        "timeout",
        "connection",
        "bad_request",
        "authentication",
        "permission",
        "not_found",
        "request_too_large",
        "invalid_json",
    }
)


class StepKind(StrEnum):
    """What a step does."""

    LLM = "llm"
    PYTHON = "python"
    NOOP = "noop"
    APPROVAL = "approval"
    AGENT = "agent"
    WORKFLOW = "workflow"


class TriggerRule(StrEnum):
    """When a step runs, by its parents' outcomes, with Airflow's semantics (the table is in docs/workflow-files.md).

    The ``one_*`` rules fire at the first qualifying parent without waiting for the others; ``always`` runs at
    once, as a root does; the rest decide when the last parent ends. The pure decision is
    :func:`orchestrator.engine.triggers.decide`.
    """

    ALL_SUCCESS = "all_success"
    ALL_FAILED = "all_failed"
    ALL_DONE = "all_done"
    ALL_SKIPPED = "all_skipped"
    ALL_DONE_MIN_ONE_SUCCESS = "all_done_min_one_success"
    NONE_FAILED = "none_failed"
    NONE_FAILED_MIN_ONE_SUCCESS = "none_failed_min_one_success"
    NONE_SKIPPED = "none_skipped"
    ONE_SUCCESS = "one_success"
    ONE_FAILED = "one_failed"
    ONE_DONE = "one_done"
    ALWAYS = "always"


# The rules that release a step before all of its parents have ended: the only ones ``cancel_others`` fits.
EARLY_RULES = frozenset({TriggerRule.ONE_SUCCESS, TriggerRule.ONE_FAILED, TriggerRule.ONE_DONE})


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RetryPolicy(_Frozen):
    """How often and how patiently a step is retried after retryable errors.

    Attributes:
        max_attempts: Attempts in all, the first included (1 = never retry).
        backoff_s: Base of the exponential backoff: attempt n waits up to ``backoff_s * 2**(n-1)``.
        backoff_max_s: Cap on one wait before jitter.
        jitter: Full jitter (a uniform draw in ``[0, backoff]``), so retries of many steps spread out.
        retry_timeouts: Whether an attempt that hit the step's ``timeout_s`` is retried.
    """

    max_attempts: int = Field(default=5, ge=1, le=100)
    backoff_s: float = Field(default=1.0, ge=0, le=3600)
    backoff_max_s: float = Field(default=60.0, ge=0, le=3600)
    jitter: bool = True
    retry_timeouts: bool = True


class SimulateSpec(_Frozen):
    """Offline-provider directives: latency per call and failures scripted by attempt number."""

    latency_s: float = Field(default=0.0, ge=0, le=300)
    errors: tuple[str, ...] = ()
    retry_after_s: float | None = Field(default=None, ge=0, le=3600)
    output: str | None = None
    error_mid_stream: bool = False
    """A streamed call's scripted error arrives after half the text (an SSE ``error`` event), not as the status."""

    @field_validator("errors")
    @classmethod
    def _known_errors(cls, errors: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [e for e in errors if e not in SIMULATED_ERRORS]
        if unknown:
            raise ValueError(f"unknown simulated error {unknown[0]!r}; known: {', '.join(sorted(SIMULATED_ERRORS))}")
        return errors


class LLMParams(_Frozen):
    """The ``with:`` of an ``llm`` step. ``prompt`` and ``system`` are sandboxed Jinja templates.

    ``reply_cache`` decides where an identical request (model, system, prompt, max_tokens, temperature) is answered
    from a stored reply instead of paid for again: ``run`` (the default: within the run, so a redelivered or resumed
    step never pays twice), ``shared`` (across runs too, opt-in), or ``off``. A step with ``cache: false`` never
    reuses a reply.

    ``stream: true`` sends the text as it is generated, as ``llm_delta`` events (see :mod:`orchestrator.engine.deltas`).
    """

    prompt: str = Field(min_length=1, max_length=200_000)
    model: str = Field(default=DEFAULT_MODEL, min_length=1, max_length=100)
    max_tokens: int = Field(default=1024, ge=1, le=64_000)
    system: str | None = Field(default=None, max_length=100_000)
    temperature: float | None = Field(default=None, ge=0, le=1)
    output_schema: dict[str, Any] | None = None
    simulate: SimulateSpec | None = None
    reply_cache: Literal["run", "shared", "off"] = "run"
    stream: bool = False

    @field_validator("output_schema")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            try:
                check_schema(schema)
            except SchemaError as exc:
                raise ValueError(f"output_schema is not a valid JSON Schema: {exc.message}") from None
        return schema


class PythonParams(_Frozen):
    """The ``with:`` of a ``python`` step: a function registered by name, and keyword arguments for it."""

    function: str = Field(min_length=1, max_length=200)
    args: dict[str, Any] = Field(default_factory=dict)


class NoopParams(_Frozen):
    """A ``noop`` step takes no parameters: it joins branches and stands in for real work in tests."""


class ApprovalParams(_Frozen):
    """The ``with:`` of an ``approval`` step: who may decide, what they see, and what happens if nobody does.

    Attributes:
        approvers: Principals allowed to decide (API token principals, or the ``--as`` name on the CLI).
        message: A template over ``inputs`` and ``steps``, shown to the approvers.
        timeout_s: How long to wait for a decision; ``None`` waits as long as the run lives.
        on_timeout: What a timeout decides: ``approve``, ``reject`` or ``fail`` (fail the step).
    """

    approvers: tuple[Annotated[str, Field(min_length=1, max_length=200)], ...] = Field(min_length=1, max_length=100)
    message: str | None = Field(default=None, max_length=20_000)
    timeout_s: float | None = Field(default=None, gt=0, le=365 * 24 * 3600)
    on_timeout: Literal["approve", "reject", "fail"] = "fail"


StepParams = LLMParams | PythonParams | NoopParams | ApprovalParams | AgentParams | WorkflowParams
_PARAMS_BY_KIND: dict[StepKind, type[BaseModel]] = {
    StepKind.LLM: LLMParams,
    StepKind.PYTHON: PythonParams,
    StepKind.NOOP: NoopParams,
    StepKind.APPROVAL: ApprovalParams,
    StepKind.AGENT: AgentParams,
    StepKind.WORKFLOW: WorkflowParams,
}


class StepSpec(_Frozen):
    """One step of a workflow, in the workflow-file shape (``uses`` + ``with``).

    ``condition`` is a safe expression (see :mod:`orchestrator.definition.conditions`); ``condition_function`` names a
    registered callable taking the step context (Python workflows' ``condition=`` lambdas end up here). ``cache: false``
    marks a non-deterministic step: it always re-runs when invalidated instead of reusing a result whose inputs match.
    ``priority`` (0 taken last … 3 first) overrides the step's depth as its queue priority (see
    :mod:`orchestrator.engine.priorities`). ``repeat`` runs the step as a bounded loop (see :class:`RepeatSpec`).
    ``for_each`` runs it once per item of a list (see :mod:`orchestrator.definition.mapping`).
    """

    name: Annotated[str, Field(pattern=STEP_NAME_PATTERN)]
    uses: StepKind
    depends_on: tuple[str, ...] = ()
    params: StepParams = Field(default_factory=NoopParams, alias="with")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    queue: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    priority: int | None = Field(default=None, ge=0, le=TOP_LEVEL)
    condition: str | None = Field(default=None, min_length=1, max_length=2000)
    condition_function: str | None = Field(default=None, min_length=1, max_length=200)
    trigger_rule: TriggerRule = TriggerRule.ALL_SUCCESS
    cancel_others: bool = False
    cache: bool = True
    repeat: RepeatSpec | None = None
    for_each: str | None = Field(default=None, min_length=1, max_length=2000)
    for_each_function: str | None = Field(default=None, min_length=1, max_length=200)
    max_parallel: int | None = Field(default=None, ge=1, le=MAX_PARALLEL_LIMIT)

    @model_validator(mode="before")
    @classmethod
    def _params_for_kind(cls, data: Any) -> Any:
        # Parse ``with`` by the step's own kind so errors name the right fields (a union would try all three).
        if not isinstance(data, dict):
            return data
        uses = data.get("uses")
        raw = data.get("with", data.get("params"))
        if isinstance(raw, BaseModel):
            return data
        data = {k: v for k, v in data.items() if k not in {"with", "params"}}
        if isinstance(uses, str) and uses in {k.value for k in _PARAMS_BY_KIND}:
            try:
                data["with"] = _PARAMS_BY_KIND[StepKind(uses)].model_validate(raw if raw is not None else {})
            except ValidationError as exc:
                raise ValueError("; ".join(_plain_errors(exc, prefix="with"))) from None
        return data

    @field_validator("uses", mode="before")
    @classmethod
    def _known_kind(cls, uses: Any) -> Any:
        # pydantic's own message lists the choices but not what was given: name it.
        if isinstance(uses, str) and uses not in {k.value for k in StepKind}:
            choices = ", ".join(k.value for k in StepKind)
            raise ValueError(f"unknown step type {uses[:100]!r} (expected one of {choices})")
        return uses

    @model_validator(mode="after")
    def _one_condition(self) -> StepSpec:
        if self.condition is not None and self.condition_function is not None:
            raise ValueError("give either condition (an expression) or condition_function, not both")
        return self

    @field_validator("trigger_rule", mode="before")
    @classmethod
    def _known_rule(cls, rule: Any) -> Any:
        if isinstance(rule, str) and rule not in {r.value for r in TriggerRule}:
            choices = ", ".join(r.value for r in TriggerRule)
            raise ValueError(f"unknown trigger rule {rule[:100]!r} (expected one of {choices})")
        return rule

    @model_validator(mode="after")
    def _cancel_only_when_early(self) -> StepSpec:
        if self.cancel_others and self.trigger_rule not in EARLY_RULES:
            early = ", ".join(sorted(EARLY_RULES))
            raise WorkflowDefinitionError(
                f"step {self.name!r}: cancel_others needs a rule that fires before every parent ends ({early}), "
                f"not {self.trigger_rule.value}",
                step=self.name,
            )
        return self

    @model_validator(mode="after")
    def _repeatable(self) -> StepSpec:
        if self.repeat is not None and self.uses in {StepKind.APPROVAL, StepKind.AGENT}:
            # An approval ends its attempt to wait for a human: a loop would have to park between iterations. An
            # agent is a loop already, with its own journal. (A workflow step's iterations are child runs.)
            raise ValueError(f"repeat is not supported on {self.uses.value} steps")
        return self

    @model_validator(mode="after")
    def _mappable(self) -> StepSpec:
        check_map_shape(self)
        return self

    @field_validator("depends_on")
    @classmethod
    def _no_repeats(cls, deps: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for dep in deps:
            if dep in seen:
                raise ValueError(f"lists dependency {dep!r} twice")
            seen.add(dep)
        return deps

    @cached_property
    def definition_hash(self) -> str:
        """A hash of this step's own definition (not of its inputs)."""
        return _hash(self.model_dump(mode="json", by_alias=True, exclude_defaults=True))


class WorkflowSpec(_Frozen):
    """A whole workflow, as in a workflow file."""

    name: Annotated[str, Field(pattern=WORKFLOW_NAME_PATTERN)]
    version: int = Field(default=1, ge=1)
    description: str | None = Field(default=None, max_length=10_000)
    inputs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_WORKFLOW_TIMEOUT_S)
    budget_usd: float | None = Field(default=None, ge=0)
    steps: tuple[StepSpec, ...] = Field(min_length=1, max_length=MAX_STEPS)

    @field_validator("inputs")
    @classmethod
    def _valid_input_schema(cls, inputs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key, schema in inputs.items():
            try:
                check_schema(schema)
            except SchemaError as exc:
                raise ValueError(f"input {key!r} has an invalid schema: {exc.message}") from None
        return inputs

    @model_validator(mode="after")
    def _valid_graph(self) -> WorkflowSpec:
        names: set[str] = set()
        for step in self.steps:
            if step.name in names:
                raise WorkflowDefinitionError(f"duplicate step name {step.name!r}", step=step.name)
            names.add(step.name)
        for step in self.steps:
            for dep in step.depends_on:
                if dep == step.name:
                    raise CycleError([step.name, step.name])
                if dep not in names:
                    raise UnknownDependencyError(step.name, dep)
        cycle = find_cycle({s.name: list(s.depends_on) for s in self.steps})
        if cycle is not None:
            raise CycleError(cycle)
        return self

    @cached_property
    def graph(self) -> Graph:
        """The dependency graph."""
        return Graph.from_dependencies({s.name: s.depends_on for s in self.steps})

    @cached_property
    def start_steps(self) -> tuple[str, ...]:
        """The steps queued when a run starts: the roots, and steps whose rule is ``always``."""
        return tuple(s.name for s in self.steps if not s.depends_on or s.trigger_rule == TriggerRule.ALWAYS)

    @cached_property
    def steps_by_name(self) -> dict[str, StepSpec]:
        """Steps keyed by name."""
        return {s.name: s for s in self.steps}

    @cached_property
    def definition_hash(self) -> str:
        """Hash of the canonical JSON form: the run pins it, workers load the spec by it."""
        return _hash(self.to_json_dict())

    def to_json_dict(self) -> dict[str, Any]:
        """The workflow-file shape as plain JSON data."""
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True)


def _hash(data: Any) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def parse_workflow(data: Any) -> WorkflowSpec:
    """Validate workflow data (a parsed file or an API body).

    Raises:
        WorkflowDefinitionError: With a message naming the offending step and field.
    """
    if not isinstance(data, dict):
        raise WorkflowDefinitionError(f"a workflow must be a mapping, got {type(data).__name__}")
    steps = data.get("steps")
    if steps == [] or steps is None:
        raise WorkflowDefinitionError("workflow has no steps: it needs at least one")
    if isinstance(steps, list) and len(steps) > MAX_STEPS:
        raise WorkflowDefinitionError(f"workflow has {len(steps)} steps; the limit is {MAX_STEPS}")
    if _nested_deeper_than(data, MAX_NESTING):
        raise WorkflowDefinitionError(f"workflow is nested more than {MAX_NESTING} levels deep")
    try:
        return WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        raise WorkflowDefinitionError(_describe(exc, data), step=_step_of(exc, data)) from None
    except WorkflowDefinitionError:
        raise


def _nested_deeper_than(data: Any, limit: int) -> bool:
    # Iterative: validating, hashing or printing a structure thousands of levels deep would hit the recursion limit.
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list | tuple):
            stack.extend((item, depth + 1) for item in value)
    return False


def _step_of(exc: ValidationError, data: dict[str, Any]) -> str | None:
    for error in exc.errors():
        loc = error["loc"]
        steps = data.get("steps")  # may be anything: a set from YAML's !!set, a string …
        if len(loc) < 2 or loc[0] != "steps" or not isinstance(loc[1], int) or not isinstance(steps, list | tuple):
            continue
        if loc[1] < len(steps) and isinstance(steps[loc[1]], dict):
            name = steps[loc[1]].get("name")
            return name if isinstance(name, str) else f"#{loc[1] + 1}"
    return None


def _plain_errors(exc: ValidationError, prefix: str) -> list[str]:
    out = []
    for error in exc.errors(include_url=False):
        where = ".".join([prefix, *(_printable(p) for p in error["loc"])])
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
        out.append(f"{where}: {message}")
    return out


def _printable(part: Any) -> str:
    # A key is the author's text: shown raw, a control character could end the one-line message or drive the terminal.
    text = str(part)
    return text if text.isprintable() and text else repr(text)


def _describe(exc: ValidationError, data: dict[str, Any]) -> str:
    """One line per problem, locations spelled with step names instead of list indexes."""
    lines = []
    steps = data.get("steps") if isinstance(data.get("steps"), list) else []
    errors = exc.errors(include_url=False)
    for error in errors:
        # pydantic also reports the steps tuple as too short when any item failed; the item's error says it all.
        if error["type"] == "too_short" and error["loc"] == ("steps",) and len(errors) > 1:
            continue
        parts: list[str] = []
        loc = list(error["loc"])
        if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
            index = loc[1]
            raw = steps[index] if steps and index < len(steps) else None
            name = raw.get("name") if isinstance(raw, dict) else None
            parts.append(f"step {name!r}" if isinstance(name, str) else f"step #{index + 1}")
            loc = loc[2:]
        # pydantic puts the discriminating model's name in the location; it means nothing to a file's author.
        loc = [p for p in loc if not (isinstance(p, str) and p.endswith("Params"))]
        if loc:
            parts.append(".".join(_printable(p) for p in loc))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{': '.join(parts)}: {message}" if parts else message)
    return "invalid workflow: " + "; ".join(lines)
