"""Trigger rules: whether a step runs, by its parents' statuses, with Airflow's semantics. Pure functions.

:func:`decide` is the whole rule table (docs/workflow-files.md shows it): given the statuses of a step's parents, some
of which may still be unfinished, it says ``run``, ``wait``, ``skipped`` or ``upstream_failed``. The engine asks it
twice:

- when a parent ends, :func:`fires_on` (derived from the same rules) tells the finish script in Redis which parent
  outcomes release a ``one_*`` step at once, so the decision to queue it is atomic there and happens exactly once;
- when the released step is claimed, :func:`decide` says whether it runs or what it becomes without running.

How parents count, as in Airflow: ``cancelled`` counts as ``failed``; ``upstream_failed`` counts as failed for every
rule except ``one_done`` (which asks for a parent that itself succeeded or failed). Rules other than ``one_*`` and
``always`` decide when the last parent ends (Airflow may mark a step that can no longer run sooner; the outcome is the
same).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from orchestrator.definition.spec import TriggerRule, WorkflowSpec
from orchestrator.domain import ReleaseRules, StepStatus


class Verdict(StrEnum):
    """What a trigger rule says about a step, given its parents' statuses now."""

    RUN = "run"
    WAIT = "wait"
    SKIPPED = "skipped"
    UPSTREAM_FAILED = "upstream_failed"


_FINAL = frozenset(
    {
        StepStatus.SUCCEEDED.value,
        StepStatus.FAILED.value,
        StepStatus.UPSTREAM_FAILED.value,
        StepStatus.SKIPPED.value,
        StepStatus.CANCELLED.value,
    }
)


@dataclass(frozen=True)
class _Counts:
    """Parents by outcome; ``failed`` includes ``cancelled``, ``done`` every finished parent."""

    total: int
    succeeded: int
    failed: int
    upstream_failed: int
    skipped: int

    @classmethod
    def of(cls, statuses: Sequence[str]) -> _Counts:
        def count(*names: str) -> int:
            return sum(1 for s in statuses if s in names)

        return cls(
            total=len(statuses),
            succeeded=count(StepStatus.SUCCEEDED.value),
            failed=count(StepStatus.FAILED.value, StepStatus.CANCELLED.value),
            upstream_failed=count(StepStatus.UPSTREAM_FAILED.value),
            skipped=count(StepStatus.SKIPPED.value),
        )

    @property
    def all_done(self) -> bool:
        return self.succeeded + self.failed + self.upstream_failed + self.skipped == self.total

    @property
    def any_failed(self) -> bool:
        return self.failed + self.upstream_failed > 0


def _when_done(counts: _Counts, rule: TriggerRule) -> Verdict:
    """The verdict of a rule once every parent has ended (the ``one_*`` rules having found no qualifying parent)."""
    c = counts
    if rule in (TriggerRule.ALL_DONE, TriggerRule.ALWAYS):
        return Verdict.RUN
    if rule == TriggerRule.ALL_SUCCESS:
        return Verdict.UPSTREAM_FAILED if c.any_failed else Verdict.SKIPPED if c.skipped else Verdict.RUN
    if rule == TriggerRule.NONE_FAILED:
        return Verdict.UPSTREAM_FAILED if c.any_failed else Verdict.RUN
    if rule == TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS:
        if c.any_failed:
            return Verdict.UPSTREAM_FAILED
        return Verdict.SKIPPED if c.skipped == c.total else Verdict.RUN
    if rule == TriggerRule.ALL_FAILED:
        return Verdict.SKIPPED if c.succeeded or c.skipped else Verdict.RUN
    if rule == TriggerRule.ALL_SKIPPED:
        return Verdict.SKIPPED if c.skipped < c.total else Verdict.RUN
    if rule == TriggerRule.NONE_SKIPPED:
        return Verdict.SKIPPED if c.skipped else Verdict.RUN
    if rule in (TriggerRule.ONE_SUCCESS, TriggerRule.ALL_DONE_MIN_ONE_SUCCESS):
        if c.succeeded:
            return Verdict.RUN
        return Verdict.SKIPPED if c.skipped == c.total else Verdict.UPSTREAM_FAILED
    # one_failed and one_done found no qualifying parent: the rule can never be met.
    return Verdict.SKIPPED


def decide(rule: TriggerRule, statuses: Sequence[str]) -> Verdict:
    """What ``rule`` says about a step whose parents have ``statuses`` (unfinished ones included).

    A step without parents always runs. ``always`` runs at once; the ``one_*`` rules run as soon as one parent
    qualifies; every rule waits while a parent is unfinished and nothing has decided it yet.
    """
    if not statuses or rule == TriggerRule.ALWAYS:
        return Verdict.RUN
    if any(s in fires_on(rule) for s in statuses):
        return Verdict.RUN
    counts = _Counts.of([s if s in _FINAL else "" for s in statuses])
    if not counts.all_done:
        return Verdict.WAIT
    return _when_done(counts, rule)


_FIRES_ON: dict[TriggerRule, frozenset[str]] = {
    TriggerRule.ONE_SUCCESS: frozenset({StepStatus.SUCCEEDED.value}),
    TriggerRule.ONE_FAILED: frozenset(
        {StepStatus.FAILED.value, StepStatus.UPSTREAM_FAILED.value, StepStatus.CANCELLED.value}
    ),
    TriggerRule.ONE_DONE: frozenset({StepStatus.SUCCEEDED.value, StepStatus.FAILED.value, StepStatus.CANCELLED.value}),
}


def fires_on(rule: TriggerRule) -> frozenset[str]:
    """The parent outcomes that release a step with ``rule`` at once, whatever its other parents are doing."""
    return _FIRES_ON.get(rule, frozenset())


def early_release(rules: Iterable[tuple[str, TriggerRule]]) -> dict[str, tuple[str, ...]]:
    """For the children of a finishing step (name, rule): the parent outcomes that release each one at once.

    Children released only by their last parent are left out.
    """
    return {name: tuple(sorted(fires_on(rule))) for name, rule in rules if fires_on(rule)}


_RULES: dict[tuple[str, str], ReleaseRules] = {}


def release_rules(spec: WorkflowSpec, step: str) -> ReleaseRules:
    """What ``step``'s finish must know of its children's rules (see :class:`~orchestrator.domain.ReleaseRules`)."""
    key = (spec.definition_hash, step)
    cached = _RULES.get(key)
    if cached is not None:
        return cached
    graph, by_name = spec.graph, spec.steps_by_name
    children = graph.children[step]
    early = early_release((c, by_name[c].trigger_rule) for c in children)
    cancel = {
        c: tuple(p for p in graph.parents[c] if p != step) for c in children if by_name[c].cancel_others and c in early
    }
    after = {
        p: tuple((g, tuple(sorted(fires_on(by_name[g].trigger_rule)))) for g in graph.children[p])
        for parents in cancel.values()
        for p in parents
    }
    rules = ReleaseRules(early=early, cancel=cancel, after=after)
    _RULES[key] = rules
    return rules
