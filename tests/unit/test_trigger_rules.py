"""Every trigger rule against every pair of parent states, from Airflow's documentation (the table in
docs/workflow-files.md), and the validation of rules and ``cancel_others``.

Each grid reads: row = one parent's state, column = the other's. ``S`` succeeded, ``F`` failed, ``U`` upstream_failed,
``K`` skipped, ``C`` cancelled (counted as failed), ``R`` still running. Verdicts: ``r`` run, ``w`` wait, ``s`` the step
becomes skipped, ``u`` it becomes upstream_failed.
"""

from __future__ import annotations

import itertools

import pytest

from orchestrator.definition.spec import TriggerRule, parse_workflow
from orchestrator.definition.workflow import NoopStep, Workflow
from orchestrator.engine.triggers import Verdict, decide, early_release
from orchestrator.errors import WorkflowDefinitionError

STATES = {"S": "succeeded", "F": "failed", "U": "upstream_failed", "K": "skipped", "C": "cancelled", "R": "running"}
VERDICTS = {"r": Verdict.RUN, "w": Verdict.WAIT, "s": Verdict.SKIPPED, "u": Verdict.UPSTREAM_FAILED}

WAIT_FOR_ALL_THEN_RUN = """
   S F U K C R
S  r r r r r w
F  r r r r r w
U  r r r r r w
K  r r r r r w
C  r r r r r w
R  w w w w w w
"""

EXPECTED = {
    # All parents succeeded; a failure wins over a skip.
    TriggerRule.ALL_SUCCESS: """
       S F U K C R
    S  r u u s u w
    F  u u u u u w
    U  u u u u u w
    K  s u u s u w
    C  u u u u u w
    R  w w w w w w
    """,
    # All parents failed or upstream_failed.
    TriggerRule.ALL_FAILED: """
       S F U K C R
    S  s s s s s w
    F  s r r s r w
    U  s r r s r w
    K  s s s s s w
    C  s r r s r w
    R  w w w w w w
    """,
    # All parents done, whatever happened.
    TriggerRule.ALL_DONE: WAIT_FOR_ALL_THEN_RUN,
    # All parents skipped.
    TriggerRule.ALL_SKIPPED: """
       S F U K C R
    S  s s s s s w
    F  s s s s s w
    U  s s s s s w
    K  s s s r s w
    C  s s s s s w
    R  w w w w w w
    """,
    # All parents done and at least one succeeded.
    TriggerRule.ALL_DONE_MIN_ONE_SUCCESS: """
       S F U K C R
    S  r r r r r w
    F  r u u u u w
    U  r u u u u w
    K  r u u s u w
    C  r u u u u w
    R  w w w w w w
    """,
    # No parent failed or upstream_failed: all succeeded or were skipped.
    TriggerRule.NONE_FAILED: """
       S F U K C R
    S  r u u r u w
    F  u u u u u w
    U  u u u u u w
    K  r u u r u w
    C  u u u u u w
    R  w w w w w w
    """,
    # No parent failed or upstream_failed, and at least one succeeded.
    TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS: """
       S F U K C R
    S  r u u r u w
    F  u u u u u w
    U  u u u u u w
    K  r u u s u w
    C  u u u u u w
    R  w w w w w w
    """,
    # No parent skipped: all succeeded, failed or upstream_failed.
    TriggerRule.NONE_SKIPPED: """
       S F U K C R
    S  r r r s r w
    F  r r r s r w
    U  r r r s r w
    K  s s s s s w
    C  r r r s r w
    R  w w w w w w
    """,
    # Fires as soon as one parent succeeded, without waiting for the others.
    TriggerRule.ONE_SUCCESS: """
       S F U K C R
    S  r r r r r r
    F  r u u u u w
    U  r u u u u w
    K  r u u s u w
    C  r u u u u w
    R  r w w w w w
    """,
    # Fires as soon as one parent failed (or is upstream_failed), without waiting for the others.
    TriggerRule.ONE_FAILED: """
       S F U K C R
    S  s r r s r w
    F  r r r r r r
    U  r r r r r r
    K  s r r s r w
    C  r r r r r r
    R  w r r w r w
    """,
    # Fires as soon as one parent succeeded or failed.
    TriggerRule.ONE_DONE: """
       S F U K C R
    S  r r r r r r
    F  r r r r r r
    U  r r s s r w
    K  r r s s r w
    C  r r r r r r
    R  r r w w r w
    """,
    # No dependencies at all: runs at any time.
    TriggerRule.ALWAYS: """
       S F U K C R
    S  r r r r r r
    F  r r r r r r
    U  r r r r r r
    K  r r r r r r
    C  r r r r r r
    R  r r r r r r
    """,
}


def _cases() -> list[tuple[TriggerRule, str, str, Verdict]]:
    cases = []
    for rule, grid in EXPECTED.items():
        lines = [line.split() for line in grid.strip().splitlines()]
        columns = lines[0]
        for row in lines[1:]:
            for column, verdict in zip(columns, row[1:], strict=True):
                cases.append((rule, STATES[row[0]], STATES[column], VERDICTS[verdict]))
    return cases


def test_the_table_covers_every_rule_and_every_pair_of_parent_states() -> None:
    assert set(EXPECTED) == set(TriggerRule)
    assert len(_cases()) == len(TriggerRule) * len(STATES) ** 2


@pytest.mark.parametrize(("rule", "first", "second", "verdict"), _cases())
def test_each_rule_decides_each_pair_of_parent_states_as_airflow_documents(
    rule: TriggerRule, first: str, second: str, verdict: Verdict
) -> None:
    assert decide(rule, [first, second]) == verdict


@pytest.mark.parametrize("rule", list(TriggerRule))
def test_a_step_without_parents_runs_whatever_its_rule(rule: TriggerRule) -> None:
    assert decide(rule, []) == Verdict.RUN


@pytest.mark.parametrize("rule", list(TriggerRule))
def test_the_order_of_three_parents_never_changes_the_verdict(rule: TriggerRule) -> None:
    for combo in itertools.combinations_with_replacement(STATES.values(), 3):
        verdicts = {decide(rule, list(order)) for order in itertools.permutations(combo)}
        assert len(verdicts) == 1, (rule, combo, verdicts)


def test_only_the_one_rules_release_a_step_before_its_last_parent_ends() -> None:
    early = early_release((rule.value, rule) for rule in TriggerRule)
    assert early == {
        "one_success": ("succeeded",),
        "one_failed": ("cancelled", "failed", "upstream_failed"),
        "one_done": ("cancelled", "failed", "succeeded"),
    }


def _join(rule: str, **extra: object) -> dict[str, object]:
    return {
        "name": "w",
        "steps": [
            {"name": "a", "uses": "noop"},
            {"name": "b", "uses": "noop"},
            {"name": "join", "uses": "noop", "depends_on": ["a", "b"], "trigger_rule": rule, **extra},
        ],
    }


@pytest.mark.parametrize("rule", [r.value for r in TriggerRule])
def test_every_rule_is_accepted_in_files(rule: str) -> None:
    assert parse_workflow(_join(rule)).steps_by_name["join"].trigger_rule == rule


def test_an_unknown_rule_is_refused_naming_the_value_and_the_choices() -> None:
    with pytest.raises(
        WorkflowDefinitionError, match=r"unknown trigger rule 'one_sucess'.*none_failed_min_one_success"
    ):
        parse_workflow(_join("one_sucess"))


@pytest.mark.parametrize("rule", ["all_success", "all_done", "none_failed_min_one_success", "always"])
def test_cancel_others_on_a_rule_that_does_not_fire_early_is_refused_naming_the_step(rule: str) -> None:
    with pytest.raises(WorkflowDefinitionError, match=rf"step 'join': cancel_others .*not {rule}"):
        parse_workflow(_join(rule, cancel_others=True))


@pytest.mark.parametrize("rule", ["one_success", "one_failed", "one_done"])
def test_cancel_others_is_accepted_on_the_rules_that_fire_early(rule: str) -> None:
    assert parse_workflow(_join(rule, cancel_others=True)).steps_by_name["join"].cancel_others


def test_python_workflows_take_the_new_rules_and_cancel_others() -> None:
    flow = Workflow(
        "hedge_rules",
        registry=None,
        steps=[
            NoopStep(name="a"),
            NoopStep(name="b"),
            NoopStep(name="join", depends_on=["a", "b"], trigger_rule="one_success", cancel_others=True),
            NoopStep(name="tidy", depends_on=["join"], trigger_rule="none_failed_min_one_success"),
        ],
    )
    spec = flow.spec
    assert spec.steps_by_name["join"].cancel_others
    assert spec.steps_by_name["tidy"].trigger_rule == TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS


def test_an_always_step_starts_with_the_roots() -> None:
    spec = parse_workflow(_join("always"))
    assert spec.start_steps == ("a", "b", "join")
