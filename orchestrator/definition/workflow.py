"""Workflows written in Python: step classes in the seed's style, compiled to the same spec as workflow files.

::

    class ResearchStep(LLMStep):
        prompt: str = "Research {{ inputs.topic }}"

    pipeline = Workflow(
        "content_pipeline",
        version=1,
        inputs={"topic": {"type": "string"}},
        steps=[ResearchStep(name="research"), BlogPostStep(name="blog_post", depends_on=["research"])],
    )

Constructing a :class:`Workflow` registers it (by name and version), so a module listed in ``ORCH_IMPORTS`` makes
its workflows known to producers and workers alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.definition.registry import WorkflowRegistry, functions, workflows
from orchestrator.definition.spec import (
    DEFAULT_MODEL,
    RetryPolicy,
    SimulateSpec,
    StepKind,
    StepSpec,
    WorkflowSpec,
    parse_workflow,
)


class Step(BaseModel):
    """Fields every step has. Subclass :class:`LLMStep`, :class:`PythonStep` or :class:`NoopStep`.

    ``condition`` is a callable on the step context (``lambda ctx: ctx["blog_post"]["word_count"] > 500``) or a
    safe expression string; ``trigger_rule`` one of :class:`~orchestrator.definition.spec.TriggerRule` (Airflow's
    rules: ``all_success``, ``all_done``, ``one_success``, ...); ``cancel_others=True`` on a ``one_*`` rule cancels
    the parents still running once it fires; ``cache=False`` marks a non-deterministic step; ``priority`` (0 taken
    last … 3 first) overrides its depth as its queue priority. ``repeat={"until": ..., "max_iterations": N}`` runs it
    as a bounded loop; ``until`` is a safe expression or, like ``condition``, a callable on the step context
    (``ctx.output`` is this iteration's output, ``ctx.previous`` and ``ctx.iteration`` as in the step itself).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    kind: ClassVar[StepKind]

    name: str
    depends_on: Sequence[str] = ()
    retry: RetryPolicy | int | None = None
    timeout_s: float | None = None
    queue: str | None = None
    priority: int | None = None
    condition: Callable[..., Any] | str | None = None
    trigger_rule: str = "all_success"
    cancel_others: bool = False
    cache: bool = True
    repeat: dict[str, Any] | None = None
    for_each: Callable[..., Any] | str | None = None
    max_parallel: int | None = None

    def params(self) -> dict[str, Any]:
        """The step's ``with:`` parameters in the workflow-file shape."""
        return {}

    def to_spec_data(self, workflow: str = "") -> dict[str, Any]:
        """The step in the workflow-file shape; a callable condition is registered as ``WORKFLOW.STEP.condition``."""
        data: dict[str, Any] = {
            "name": self.name,
            "uses": self.kind.value,
            "depends_on": list(self.depends_on),
            "trigger_rule": self.trigger_rule,
            "cache": self.cache,
        }
        if self.cancel_others:
            data["cancel_others"] = True
        if isinstance(self.condition, str):
            data["condition"] = self.condition
        elif self.condition is not None:
            # Workers import the same module, so the same name maps to the same callable there: nothing is pickled.
            name = f"{workflow}.{self.name}.condition"
            functions.register(self.condition, name, replace=True)
            data["condition_function"] = name
        if self.repeat is not None:
            data["repeat"] = self._repeat_data(workflow)
        if isinstance(self.for_each, str):
            data["for_each"] = self.for_each
        elif self.for_each is not None:
            name = f"{workflow}.{self.name}.for_each"
            functions.register(self.for_each, name, replace=True)
            data["for_each_function"] = name
        if self.max_parallel is not None:
            data["max_parallel"] = self.max_parallel
        if isinstance(self.retry, int):
            data["retry"] = {"max_attempts": self.retry}
        elif self.retry is not None:
            data["retry"] = self.retry.model_dump()
        if self.timeout_s is not None:
            data["timeout_s"] = self.timeout_s
        if self.queue is not None:
            data["queue"] = self.queue
        if self.priority is not None:
            data["priority"] = self.priority
        data["with"] = self.params()
        return data

    def _repeat_data(self, workflow: str) -> dict[str, Any]:
        """``repeat`` in the workflow-file shape; a callable ``until`` is registered as ``WORKFLOW.STEP.until``."""
        repeat = dict(self.repeat or {})
        until = repeat.get("until")
        if callable(until):
            name = f"{workflow}.{self.name}.until"
            functions.register(until, name, replace=True)
            del repeat["until"]
            repeat["until_function"] = name
        return repeat


class LLMStep(Step):
    """A call to a model. ``prompt`` and ``system`` are templates over ``inputs`` and ``steps``.

    ``output_schema`` (a pydantic model class or a JSON Schema) asks for structured output: the reply is parsed and
    validated, and lands in the output's ``data``.
    """

    kind: ClassVar[StepKind] = StepKind.LLM

    prompt: str
    model: str = DEFAULT_MODEL
    max_tokens: int = 1024
    system: str | None = None
    temperature: float | None = None
    output_schema: type[BaseModel] | dict[str, Any] | None = None
    simulate: SimulateSpec | dict[str, Any] | None = None

    def params(self) -> dict[str, Any]:
        """The step's ``with:`` parameters in the workflow-file shape."""
        data: dict[str, Any] = {"prompt": self.prompt, "model": self.model, "max_tokens": self.max_tokens}
        if self.system is not None:
            data["system"] = self.system
        if self.temperature is not None:
            data["temperature"] = self.temperature
        if isinstance(self.output_schema, type):
            data["output_schema"] = self.output_schema.model_json_schema()
        elif self.output_schema is not None:
            data["output_schema"] = self.output_schema
        if isinstance(self.simulate, SimulateSpec):
            data["simulate"] = self.simulate.model_dump(exclude_none=True)
        elif self.simulate is not None:
            data["simulate"] = self.simulate
        return data


class PythonStep(Step):
    """A call to a registered Python function ``fn(ctx, **args)``; a callable is registered on the spot."""

    kind: ClassVar[StepKind] = StepKind.PYTHON

    fn: Callable[..., Any] | str
    args: dict[str, Any] = Field(default_factory=dict)

    def params(self) -> dict[str, Any]:
        """The step's ``with:`` parameters in the workflow-file shape."""
        if isinstance(self.fn, str):
            name = self.fn
        else:
            if self.fn.__name__ == "<lambda>":
                raise ValueError(f"step {self.name!r}: give the function a name (def), lambdas cannot be registered")
            name = functions.name_of(self.fn) or ""
            if not name:
                name = f"{self.fn.__module__}.{self.fn.__qualname__}"
                functions.register(self.fn, name)
        return {"function": name, "args": self.args}


class ApprovalStep(Step):
    """Wait for a human: one of ``approvers`` approves or rejects (CLI, API or web page); holds no worker meanwhile.

    ``message`` is a template shown to the approvers; after ``decision_timeout_s`` the step takes ``on_timeout``
    (``approve``, ``reject`` or ``fail``). Approve → the step succeeds with the decision as its output; reject → it
    fails with ``output.approved == False`` (dependents can route around it with conditions and trigger rules).
    """

    kind: ClassVar[StepKind] = StepKind.APPROVAL

    approvers: Sequence[str]
    message: str | None = None
    decision_timeout_s: float | None = None
    on_timeout: str = "fail"

    def params(self) -> dict[str, Any]:
        """The step's ``with:`` parameters in the workflow-file shape."""
        data: dict[str, Any] = {"approvers": list(self.approvers), "on_timeout": self.on_timeout}
        if self.message is not None:
            data["message"] = self.message
        if self.decision_timeout_s is not None:
            data["timeout_s"] = self.decision_timeout_s
        return data


class NoopStep(Step):
    """Does nothing: joins branches, stands in for work in tests."""

    kind: ClassVar[StepKind] = StepKind.NOOP


class WorkflowStep(Step):
    """Run another workflow as a child run and wait for it, holding no worker meanwhile.

    ``workflow`` is a :class:`Workflow` (or a registered name, ``version`` pinning one); every string in ``inputs`` is a
    template over ``inputs`` and ``steps`` (and ``item``/``index`` in a map step). The step's output is the child's
    step outputs by name; a child that fails, is cancelled or times out fails the step, naming the child run.
    """

    kind: ClassVar[StepKind] = StepKind.WORKFLOW

    workflow: Workflow | str
    version: int | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)

    def params(self) -> dict[str, Any]:
        """The step's ``with:`` parameters in the workflow-file shape."""
        version: int | None
        if isinstance(self.workflow, Workflow):
            name, version = self.workflow.spec.name, self.workflow.spec.version
        else:
            name, version = self.workflow, self.version
        data: dict[str, Any] = {"workflow": name, "inputs": self.inputs}
        if version is not None:
            data["version"] = version
        return data


class Workflow:
    """A workflow defined in Python.

    Raises:
        WorkflowDefinitionError: When the steps do not form a valid workflow (cycles, unknown dependencies …).
    """

    def __init__(
        self,
        name: str,
        *,
        steps: Sequence[Step],
        version: int = 1,
        inputs: dict[str, dict[str, Any]] | None = None,
        timeout_s: float | None = None,
        budget_usd: float | None = None,
        description: str | None = None,
        registry: WorkflowRegistry | None = workflows,
    ) -> None:
        data: dict[str, Any] = {
            "name": name,
            "version": version,
            "inputs": inputs or {},
            "steps": [step.to_spec_data(f"{name}.v{version}") for step in steps],
        }
        for key, value in (("timeout_s", timeout_s), ("budget_usd", budget_usd), ("description", description)):
            if value is not None:
                data[key] = value
        self.spec: WorkflowSpec = parse_workflow(data)
        if registry is not None:
            registry.register(self.spec)

    @property
    def name(self) -> str:
        """The workflow's name."""
        return self.spec.name

    @property
    def version(self) -> int:
        """The workflow's version."""
        return self.spec.version

    def step(self, name: str) -> StepSpec:
        """The compiled spec of one step."""
        return self.spec.steps_by_name[name]


WorkflowStep.model_rebuild()  # its ``workflow`` field names :class:`Workflow`, defined after it
