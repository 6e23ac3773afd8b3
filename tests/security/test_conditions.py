"""Hostile step conditions: a total allocation and time budget per evaluation, nesting refused with one line
(issue 12, items 3, 4 and 10)."""

from __future__ import annotations

import sys
import time

import pytest

from orchestrator.definition.conditions import check_condition, evaluate_condition
from orchestrator.definition.templates import TEMPLATE_BUDGET_BYTES
from orchestrator.errors import NonRetryableStepError, WorkflowDefinitionError

pytestmark = pytest.mark.timeout(60)

# Six 16 MB strings (96 MB), each within the per-value limit, and a split into millions of words.
KEPT = "(" + " + ".join(["[inputs.x * 16000000]"] * 6) + ")|length > 0"
SPLIT = "((inputs.x ~ ' ') * 8000000)|wordcount > 0"
# A few milliseconds of work each, allocating almost nothing: only the clock can stop it.
SLOW = "[" + ", ".join(["(inputs.x * 500000)|max"] * 100) + "]|length > 0"


@pytest.mark.parametrize("source", [KEPT, SPLIT])
def test_a_condition_allocating_past_its_total_budget_fails_as_template_limit(source: str) -> None:
    check_condition(source, step="gate", upstream=set())  # reads an input: only the run can tell

    with pytest.raises(NonRetryableStepError) as refused:
        evaluate_condition(source, inputs={"x": "x"}, outputs={})

    assert refused.value.kind == "template_limit"
    assert str(TEMPLATE_BUDGET_BYTES) in str(refused.value)


def test_a_condition_running_past_its_time_limit_fails_as_template_limit_soon_after() -> None:
    started = time.monotonic()

    with pytest.raises(NonRetryableStepError) as refused:
        evaluate_condition(SLOW, inputs={"x": "x"}, outputs={}, timeout_s=0.3)

    assert refused.value.kind == "template_limit"
    assert time.monotonic() - started < 3


def test_a_condition_reading_nothing_that_passes_the_budget_is_refused_at_validation() -> None:
    static = KEPT.replace("inputs.x", "'x'")

    with pytest.raises(WorkflowDefinitionError) as refused:
        check_condition(static, step="gate", upstream=set())

    assert refused.value.step == "gate"
    assert "budget" in str(refused.value)


def test_an_ordinary_condition_still_evaluates() -> None:
    outputs = {"draft": {"word_count": 600, "text": "a b c"}}

    assert evaluate_condition(
        "steps.draft.output.word_count > 500 and steps.draft.output.text|wordcount == 3", inputs={}, outputs=outputs
    )


DEEP = ["-" * 1990 + "1", "(" * 3000 + "1" + ")" * 3000, "-" * 400 + "1", "not " * 900 + "true"]


@pytest.mark.parametrize("source", DEEP)
def test_a_condition_nested_too_deeply_is_one_error_line_at_validation(source: str) -> None:
    with pytest.raises(WorkflowDefinitionError) as refused:
        check_condition(source, step="gate", upstream=set())

    assert str(refused.value) == "step 'gate': condition nests too deeply"


@pytest.mark.parametrize("source", DEEP)
def test_a_condition_nested_too_deeply_is_a_short_condition_error_when_evaluated(source: str) -> None:
    with pytest.raises(NonRetryableStepError) as refused:
        evaluate_condition(source, inputs={}, outputs={})

    assert refused.value.kind == "condition_error"
    assert "nests too deeply" in str(refused.value)
    assert len(str(refused.value)) < 300


# Parentheses alone make no node: once parsed, 3,000 of them around ``1`` are just ``1``.
@pytest.mark.parametrize("source", [source for source in DEEP if not source.startswith("(")])
def test_nesting_is_refused_whatever_recursion_limit_the_process_runs_with(source: str) -> None:
    # Libraries raise the limit (hypothesis does, while it runs): the bound must be ours, not the interpreter's.
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)
    try:
        with pytest.raises(WorkflowDefinitionError, match="nests too deeply"):
            check_condition(source, step="gate", upstream=set())
    finally:
        sys.setrecursionlimit(before)
