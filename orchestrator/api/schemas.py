"""Request and response bodies: pydantic at the trust boundary, unknown fields refused."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.definition.spec import WORKFLOW_NAME_PATTERN
from orchestrator.domain import MAX_DECISION_COMMENT_CHARS


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubmitRun(_Body):
    """Start a run of a registered workflow (``workflow``, optional ``version``) or of a ``definition``."""

    workflow: str | None = Field(
        default=None, pattern=WORKFLOW_NAME_PATTERN, description="A registered workflow's name."
    )
    version: int | None = Field(default=None, ge=1, description="Its version (default: the latest).")
    definition: dict[str, Any] | None = Field(default=None, description="A workflow file's content as JSON.")
    inputs: dict[str, Any] = Field(default_factory=dict, description="The run's inputs.")

    @model_validator(mode="after")
    def _one_workflow(self) -> SubmitRun:
        if (self.workflow is None) == (self.definition is None):
            raise ValueError("give exactly one of 'workflow' (a registered name) or 'definition' (a workflow)")
        if self.version is not None and self.workflow is None:
            raise ValueError("'version' only goes with 'workflow'")
        return self


class RunCreated(BaseModel):
    """The id of the run a submit created (201) or found by its idempotency key (200)."""

    run_id: str


class ResumeRun(_Body):
    """Resume from the checkpoint; ``from_step`` also re-runs that step and its dependents."""

    from_step: str | None = Field(default=None, min_length=1, max_length=200)
    allow_definition_change: bool = False


class Resumed(BaseModel):
    """The run and the generation the resume started."""

    run_id: str
    generation: int


class Cancelled(BaseModel):
    """The outcome of a cancel (``cancelled`` is false when the run had already ended)."""

    run_id: str
    status: str
    cancelled: bool
    message: str


class DecideStep(_Body):
    """A human decision on a step waiting for approval (``orchestrator.domain.Decision`` is what gets recorded)."""

    decision: Literal["approve", "reject"]
    comment: str | None = Field(default=None, max_length=MAX_DECISION_COMMENT_CHARS)
    item: int | None = Field(default=None, ge=0, le=1_000_000)
    """The item decided, on an approval map step (``for_each``): one decision per item."""


class TokenCounts(BaseModel):
    """Tokens billed over a run's LLM calls."""

    input_tokens: int
    output_tokens: int


class RunSummary(BaseModel):
    """One run in a listing (``orchestrator.engine.status.RunSummary``)."""

    run_id: str
    workflow: str
    version: int
    status: str = Field(description="pending running waiting succeeded failed cancelled timed_out")
    generation: int
    created_at: str | None
    started_at: str | None = None
    finished_at: str | None
    duration_s: float | None = Field(
        default=None, description="Seconds from started_at to finished_at, or to now while finished_at is null."
    )
    error: str | None = Field(default=None, description="Why it failed, was cancelled or timed out (one line).")
    cost: float | None = Field(default=None, description="US dollars billed over its LLM calls; null: no paid call.")
    usage: TokenCounts | None = None
    llm_calls: int | None = None


class RunList(BaseModel):
    """Runs, newest first, one page: ``next_offset`` (also the ``Link: rel="next"`` header) fetches the next."""

    runs: list[RunSummary]
    offset: int = 0
    limit: int = 50
    next_offset: int | None = Field(default=None, description="The next page's offset; null on the last page.")


class WorkflowStep(BaseModel):
    """A step of a registered workflow."""

    name: str
    uses: str
    depends_on: list[str]


class WorkflowInfo(BaseModel):
    """A registered workflow."""

    name: str
    version: int
    definition_hash: str
    inputs: dict[str, dict[str, Any]]
    steps: list[WorkflowStep]


class SubmittedWorkflow(BaseModel):
    """A definition submitted lately (as a file or a registered workflow), by its hash."""

    name: str
    version: int
    definition_hash: str
    first_submitted: str
    last_submitted: str


class WorkflowList(BaseModel):
    """Every registered workflow, by name and version, and the definitions submitted lately."""

    workflows: list[WorkflowInfo]
    submitted: list[SubmittedWorkflow] = Field(
        default_factory=list, description="Definitions submitted lately, most recent first (at most 1000)."
    )


class Problem(BaseModel):
    """An error: ``detail`` is one line naming the problem (and the field, for a bad request)."""

    detail: str
    errors: list[dict[str, Any]] | None = None
