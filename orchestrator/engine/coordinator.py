"""The coordinator's decisions: plain functions of (workflow spec, run state) → what to do next.

No I/O here. ``workers.tasks`` loads state, asks these functions, and applies the answers through the state store
and Celery canvas, so every decision can be tested without Redis or workers.

How the DAG becomes Celery canvas: the steps that become ready together (the roots at submit, the children a
finishing step releases) are sent as one ``group``, so independent steps fan out across worker processes. Joins are
released by per-step pending-parent counters that the finishing parent decrements atomically in Redis: a step starts
the moment its own last dependency is done, with no barrier from siblings, on any DAG shape (see README, "Why
counters and not chords").
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any

from orchestrator.definition.agent import AgentParams
from orchestrator.definition.spec import LLMParams, RetryPolicy, StepKind, StepSpec, WorkflowSpec
from orchestrator.definition.templates import referenced_steps
from orchestrator.domain import ResumePlan, RunStatus, StepOutcome, StepStatus
from orchestrator.engine.triggers import Verdict, decide
from orchestrator.errors import WorkflowDefinitionError
from orchestrator.infra.digests import sha256


def decide_start(step: StepSpec, parent_status: Mapping[str, str]) -> StepOutcome | None:
    """Whether a released step runs, by its trigger rule and its parents' statuses (see :mod:`.triggers`).

    Returns:
        ``None`` to run it (its condition, if any, is checked next), else the outcome to record without running:
        ``upstream_failed`` or ``skipped``.
    """
    verdict = decide(step.trigger_rule, [parent_status.get(p, "") for p in step.depends_on])
    if verdict == Verdict.SKIPPED:
        return StepOutcome.SKIPPED
    if verdict == Verdict.UPSTREAM_FAILED:
        return StepOutcome.UPSTREAM_FAILED
    # WAIT cannot reach a claim: a step is released only once its rule has decided (by a qualifying parent, or
    # its last one). Should it ever, running is the answer that loses no work.
    return None


_READS: dict[tuple[str, str], tuple[str, ...]] = {}


def upstream_reads(spec: WorkflowSpec, step: str) -> tuple[str, ...]:
    """The steps whose status and output a step's attempt loads: its parents, plus every ancestor for ``python``
    steps and condition or until functions, else the ancestors its templates, condition and until name (a long
    chain of ``llm`` steps then stays linear in cost)."""
    key = (spec.definition_hash, step)
    cached = _READS.get(key)
    if cached is not None:
        return cached
    step_spec = spec.steps_by_name[step]
    wanted = set(step_spec.depends_on)
    repeat = step_spec.repeat
    if step_spec.uses == StepKind.PYTHON or step_spec.condition_function or (repeat and repeat.until_function):
        wanted |= spec.graph.ancestors(step)
    else:
        sources = [step_spec.condition or "", repeat.until or "" if repeat else ""]
        if isinstance(step_spec.params, LLMParams | AgentParams):
            sources += [step_spec.params.prompt, step_spec.params.system or ""]
        for source in sources:
            wanted |= referenced_steps(source)
    reads = tuple(s.name for s in spec.steps if s.name in wanted)
    _READS[key] = reads
    return reads


def retry_delay(
    policy: RetryPolicy,
    attempt: int,
    retry_after: float | None,
    cap_s: float,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before the next attempt after attempt number ``attempt`` failed.

    Exponential backoff with full jitter (``uniform(0, min(max, base * 2**(attempt-1)))``), never shorter than the
    provider's ``retry_after``, never longer than ``cap_s``.
    """
    ceiling = min(policy.backoff_max_s, policy.backoff_s * 2 ** max(0, attempt - 1))
    delay = (rng or random).uniform(0, ceiling) if policy.jitter else ceiling
    if retry_after is not None:
        delay = max(delay, retry_after)
    return max(0.0, min(delay, cap_s))


def should_retry(policy: RetryPolicy, attempt: int, kind: str = "error") -> bool:
    """Whether attempt number ``attempt``, which failed with a retryable error of ``kind``, is followed by another."""
    if kind == "timeout" and not policy.retry_timeouts:
        return False
    return attempt < policy.max_attempts


def queue_for(step: StepSpec, llm_queue: str, cpu_queue: str) -> str:
    """LLM calls (and agents, whose turns are LLM calls) go to the I/O queue (a high-concurrency pool), everything
    else to the CPU queue."""
    if step.queue:
        return step.queue
    return llm_queue if step.uses in {StepKind.LLM, StepKind.AGENT} else cpu_queue


def failure_summary(step: str, error: Mapping[str, object] | None) -> str:
    """One line naming the failed step and its error, for the run's ``error``."""
    if not error:
        return f"step {step!r} failed"
    kind = error.get("type") or "error"
    status = error.get("status")
    where = f" (HTTP {status})" if status else ""
    message = error.get("message")
    return f"step {step!r} failed: {kind}{where}" + (f": {message}" if message else "")


def result_key(step: StepSpec, inputs: Mapping[str, Any], upstream_outputs: Mapping[str, Any]) -> str:
    """The key a step's result is stored under: its own definition and everything it reads.

    When a resumed step's key matches its stored result, that result is reused instead of paying for the step again;
    so a re-executed parent whose output did not change leaves its dependents' keys, and results, as they were.
    """
    material = {"step": step.definition_hash, "inputs": inputs, "upstream": upstream_outputs}
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return sha256(canonical.encode()).hexdigest()[:32]


RESUMABLE = (RunStatus.FAILED.value, RunStatus.CANCELLED.value, RunStatus.TIMED_OUT.value)


def plan_resume(
    spec: WorkflowSpec,
    step_status: Mapping[str, str],
    generation: str,
    from_step: str | None = None,
    *,
    changed: frozenset[str] = frozenset(),
    new_definition: WorkflowSpec | None = None,
) -> ResumePlan:
    """Which steps a resume resets, from the run's current step statuses.

    Without ``from_step``: every step that did not succeed. With it: that step, its transitive dependents, and
    every step that did not succeed; its ancestors and siblings keep their results. ``changed`` steps (under a new
    definition, which ``spec`` then is) are reset with their dependents, and result keys decide what really runs.
    A reset step is ``queued`` when all of its parents keep their results or its trigger rule is met already (a
    ``one_success`` step with a kept parent, an ``always`` step), else ``pending`` on the reset parents.

    Raises:
        WorkflowDefinitionError: When ``from_step`` is not a step of the workflow.
    """
    graph = spec.graph
    reset = {name for name in graph.parents if step_status.get(name) != StepStatus.SUCCEEDED.value}
    allowed: tuple[str, ...] = RESUMABLE
    for name in changed:
        reset |= {name} | graph.descendants(name)
    if changed:
        allowed = (*RESUMABLE, RunStatus.SUCCEEDED.value)
    if from_step is not None:
        if from_step not in graph.parents:
            raise WorkflowDefinitionError(f"resume --from: no step {from_step!r} in workflow {spec.name!r}")
        reset |= {from_step} | graph.descendants(from_step)
        allowed = (*RESUMABLE, RunStatus.SUCCEEDED.value)
    resets = []
    for name in graph.topological_order:
        if name in reset:
            parents = graph.parents[name]
            pending = sum(1 for parent in parents if parent in reset)
            # Kept parents succeeded; reset ones are unfinished again. A one_* or always rule may be met already.
            kept = ["" if parent in reset else StepStatus.SUCCEEDED.value for parent in parents]
            ready = pending == 0 or decide(spec.steps_by_name[name].trigger_rule, kept) == Verdict.RUN
            resets.append((name, StepStatus.QUEUED.value if ready else StepStatus.PENDING.value, pending))
    return ResumePlan(
        expected_generation=generation,
        allowed_statuses=allowed,
        resets=tuple(resets),
        forced_step=from_step,
        definition=new_definition,
    )
