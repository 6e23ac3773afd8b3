"""The pure core: graph functions and the coordinator's decisions, without Redis or Celery."""

from __future__ import annotations

import itertools
import random
import sys
from typing import Any

import pytest

from orchestrator.definition.dag import Graph, find_cycle
from orchestrator.definition.spec import RetryPolicy, StepSpec, WorkflowSpec, parse_workflow
from orchestrator.domain import StepOutcome
from orchestrator.engine.coordinator import (
    decide_start,
    failure_summary,
    queue_for,
    retry_delay,
    should_retry,
    upstream_reads,
)

pytestmark = pytest.mark.timeout(30)

# A→C, B→C, B→D: the smallest DAG that is not series-parallel.
NON_SP = Graph.from_dependencies({"a": [], "b": [], "c": ["a", "b"], "d": ["b"]})


def test_find_cycle_returns_none_for_a_dag() -> None:
    assert find_cycle({"a": [], "b": ["a"], "c": ["a", "b"], "d": ["c"]}) is None
    assert find_cycle({}) is None


def test_find_cycle_returns_the_loop_dependency_first_with_the_first_step_repeated() -> None:
    # b needs a, c needs b, a needs c.
    assert find_cycle({"a": ["c"], "b": ["a"], "c": ["b"]}) == ["a", "b", "c", "a"]


def test_find_cycle_finds_a_self_loop() -> None:
    assert find_cycle({"a": [], "b": ["a", "b"]}) == ["b", "b"]


def test_find_cycle_reports_only_steps_on_the_loop_and_every_arrow_is_a_real_dependency() -> None:
    deps = {"root": [], "x": ["root", "z"], "y": ["x"], "z": ["y"], "leaf": ["z"], "other": ["root"]}

    cycle = find_cycle(deps)

    assert cycle is not None
    assert cycle[0] == cycle[-1]
    assert sorted(cycle[:-1]) == ["x", "y", "z"]
    for before, after in itertools.pairwise(cycle):
        assert before in deps[after], f"{after} does not depend on {before}"


def test_graph_children_follow_declaration_order() -> None:
    graph = Graph.from_dependencies({"r": [], "z": ["r"], "a": ["r"], "m": ["a", "r"]})

    assert graph.children == {"r": ("z", "a", "m"), "z": (), "a": ("m",), "m": ()}


def test_graph_roots_are_the_steps_without_dependencies_in_declaration_order() -> None:
    assert NON_SP.roots == ("a", "b")
    assert Graph.from_dependencies({"z": [], "y": ["z"], "a": []}).roots == ("z", "a")


def test_topological_order_puts_every_step_after_its_dependencies() -> None:
    order = NON_SP.topological_order

    assert sorted(order) == ["a", "b", "c", "d"]
    for step, deps in NON_SP.parents.items():
        assert all(order.index(dep) < order.index(step) for dep in deps)


def test_topological_order_is_stable_in_declaration_order() -> None:
    graph = Graph.from_dependencies({"late": ["z"], "z": [], "a": [], "m": ["z"], "b": ["a"], "q": []})

    assert graph.topological_order == ("z", "a", "q", "late", "m", "b")
    assert Graph.from_dependencies(dict(graph.parents)).topological_order == graph.topological_order


def test_descendants_and_ancestors_are_transitive_and_exclude_the_step_itself() -> None:
    graph = Graph.from_dependencies({"a": [], "b": ["a"], "c": ["b"], "d": ["a"], "e": ["c", "d"], "f": []})

    assert graph.descendants("a") == {"b", "c", "d", "e"}
    assert graph.descendants("c") == {"e"}
    assert graph.descendants("e") == set()
    assert graph.ancestors("e") == {"a", "b", "c", "d"}
    assert graph.ancestors("c") == {"a", "b"}
    assert graph.ancestors("a") == set()
    assert graph.ancestors("f") == graph.descendants("f") == set()


def test_critical_path_length_takes_the_longest_chain_on_a_non_series_parallel_dag() -> None:
    # a→c = 2+1, b→c = 1+1, b→d = 1+5: the b→d chain is the critical path.
    assert NON_SP.critical_path_length({"a": 2.0, "b": 1.0, "c": 1.0, "d": 5.0}) == 6.0
    # Make a slow: a→c = 10+1 wins.
    assert NON_SP.critical_path_length({"a": 10.0, "b": 1.0, "c": 1.0, "d": 5.0}) == 11.0


def test_critical_path_length_of_independent_steps_is_the_slowest_one() -> None:
    graph = Graph.from_dependencies({"a": [], "b": [], "c": []})

    assert graph.critical_path_length({"a": 1.0, "b": 3.0, "c": 2.0}) == 3.0


def test_a_5000_step_chain_does_not_hit_the_recursion_limit() -> None:
    n = 5000
    assert n > sys.getrecursionlimit()
    chain = {f"s{i}": ([f"s{i - 1}"] if i else []) for i in range(n)}

    assert find_cycle(chain) is None
    graph = Graph.from_dependencies(chain)
    assert graph.topological_order == tuple(chain)
    assert len(graph.descendants("s0")) == n - 1
    assert len(graph.ancestors(f"s{n - 1}")) == n - 1
    assert graph.critical_path_length(dict.fromkeys(chain, 1.0)) == n


def test_a_5000_step_loop_is_found_without_hitting_the_recursion_limit() -> None:
    n = 5000
    loop = {f"s{i}": [f"s{(i - 1) % n}"] for i in range(n)}

    cycle = find_cycle(loop)

    assert cycle is not None
    assert len(cycle) == n + 1
    assert cycle[0] == cycle[-1]


# -- decide_start --------------------------------------------------------------------------------------------------


def step(name: str = "child", *deps: str, uses: str = "noop", **extra: Any) -> StepSpec:
    return StepSpec.model_validate({"name": name, "uses": uses, "depends_on": list(deps), **extra})


def test_a_step_whose_parents_all_succeeded_runs() -> None:
    assert decide_start(step("c", "a", "b"), {"a": "succeeded", "b": "succeeded"}) is None


def test_a_root_step_runs() -> None:
    assert decide_start(step("root"), {}) is None


@pytest.mark.parametrize("bad", ["failed", "upstream_failed", "cancelled"])
def test_a_step_with_a_failed_parent_is_upstream_failed(bad: str) -> None:
    assert decide_start(step("c", "a", "b"), {"a": "succeeded", "b": bad}) == StepOutcome.UPSTREAM_FAILED


def test_a_step_with_a_skipped_parent_is_skipped() -> None:
    assert decide_start(step("c", "a", "b"), {"a": "skipped", "b": "succeeded"}) == StepOutcome.SKIPPED


def test_failure_outweighs_a_skip_among_the_parents() -> None:
    assert decide_start(step("c", "a", "b"), {"a": "skipped", "b": "failed"}) == StepOutcome.UPSTREAM_FAILED


def test_only_the_steps_own_parents_decide() -> None:
    assert decide_start(step("c", "a"), {"a": "succeeded", "unrelated": "failed"}) is None


# -- retries -------------------------------------------------------------------------------------------------------


def test_full_jitter_stays_within_zero_and_the_exponential_ceiling() -> None:
    policy = RetryPolicy(backoff_s=0.5, backoff_max_s=6.0, jitter=True)
    rng = random.Random(1234)
    for attempt in range(1, 9):
        ceiling = min(6.0, 0.5 * 2 ** (attempt - 1))
        delays = [retry_delay(policy, attempt, None, cap_s=1000.0, rng=rng) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in delays), (attempt, ceiling, max(delays))
        # Full jitter spreads over the whole range, not a sliver of it.
        assert min(delays) < 0.1 * ceiling
        assert max(delays) > 0.9 * ceiling


def test_jittered_delays_are_reproducible_from_the_seed() -> None:
    policy = RetryPolicy(backoff_s=1.0, backoff_max_s=60.0)
    first = [retry_delay(policy, 4, None, 300.0, random.Random(7)) for _ in range(3)]
    second = [retry_delay(policy, 4, None, 300.0, random.Random(7)) for _ in range(3)]

    assert first == second
    assert len({retry_delay(policy, 4, None, 300.0, random.Random(seed)) for seed in range(20)}) > 1


def test_a_delay_is_never_below_retry_after() -> None:
    policy = RetryPolicy(backoff_s=0.1, backoff_max_s=0.2, jitter=True)
    rng = random.Random(99)

    delays = [retry_delay(policy, attempt, 3.0, cap_s=300.0, rng=rng) for attempt in range(1, 6) for _ in range(50)]

    assert min(delays) == 3.0


def test_a_long_backoff_wins_over_a_shorter_retry_after() -> None:
    policy = RetryPolicy(backoff_s=10.0, backoff_max_s=60.0, jitter=False)

    assert retry_delay(policy, 2, 1.0, cap_s=300.0) == 20.0


def test_the_cap_wins_even_over_a_larger_retry_after() -> None:
    policy = RetryPolicy(backoff_s=1.0, backoff_max_s=60.0, jitter=True)

    assert retry_delay(policy, 1, 900.0, cap_s=5.0, rng=random.Random(0)) == 5.0
    assert retry_delay(policy.model_copy(update={"jitter": False}), 1, 900.0, cap_s=5.0) == 5.0


def test_the_cap_bounds_the_backoff_too() -> None:
    policy = RetryPolicy(backoff_s=1.0, backoff_max_s=3600.0, jitter=False)

    assert retry_delay(policy, 12, None, cap_s=30.0) == 30.0


@pytest.mark.parametrize(("attempt", "expected"), [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0), (30, 5.0)])
def test_without_jitter_the_delay_is_exactly_the_ceiling(attempt: int, expected: float) -> None:
    policy = RetryPolicy(backoff_s=0.5, backoff_max_s=5.0, jitter=False)

    assert retry_delay(policy, attempt, None, cap_s=300.0) == expected


def test_should_retry_allows_attempts_up_to_max_attempts_in_all() -> None:
    policy = RetryPolicy(max_attempts=3)

    assert [should_retry(policy, n) for n in (1, 2, 3, 4)] == [True, True, False, False]
    assert should_retry(RetryPolicy(max_attempts=1), 1) is False


# -- queues --------------------------------------------------------------------------------------------------------


def test_llm_steps_go_to_the_llm_queue_and_other_kinds_to_the_cpu_queue() -> None:
    llm_step = step("w", uses="llm", **{"with": {"prompt": "hi"}})
    python_step = step("p", uses="python", **{"with": {"function": "x.y"}})

    assert queue_for(llm_step, "io", "cpu") == "io"
    assert queue_for(python_step, "io", "cpu") == "cpu"
    assert queue_for(step("n"), "io", "cpu") == "cpu"


def test_an_explicit_queue_wins_over_the_step_kind() -> None:
    assert queue_for(step("w", uses="llm", queue="gpu", **{"with": {"prompt": "hi"}}), "io", "cpu") == "gpu"
    assert queue_for(step("n", queue="special"), "io", "cpu") == "special"


# -- what an attempt reads -----------------------------------------------------------------------------------------


def chain_spec(*, templated: str = "") -> WorkflowSpec:
    def llm(name: str, prompt: str, *deps: str, system: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"prompt": prompt}
        if system:
            params["system"] = system
        return {"name": name, "uses": "llm", "depends_on": list(deps), "with": params}

    return parse_workflow(
        {
            "name": "reads",
            "steps": [
                llm("a", "start"),
                llm("side", "unrelated"),
                llm("b", "x", "a"),
                llm("c", "y", "b"),
                {"name": "py", "uses": "python", "depends_on": ["c"], "with": {"function": "x.y"}},
                llm("plain", "only my parent", "c"),
                llm("templ", templated or "{{ steps.a.output.text }}", "py", system="{{ steps.b.output.text }}"),
            ],
        }
    )


def test_a_python_step_reads_every_ancestor_in_declaration_order() -> None:
    assert upstream_reads(chain_spec(), "py") == ("a", "b", "c")


def test_an_llm_step_reads_only_its_parents_when_its_templates_name_no_other_step() -> None:
    assert upstream_reads(chain_spec(), "plain") == ("c",)
    assert upstream_reads(chain_spec(), "a") == ()


def test_an_llm_step_reads_its_parents_and_the_ancestors_its_templates_name() -> None:
    # prompt reads a, system reads b, parent is py; c is an ancestor but no template reads it.
    assert upstream_reads(chain_spec(), "templ") == ("a", "b", "py")


def test_an_llm_step_reads_an_ancestor_named_by_subscript_in_a_template() -> None:
    spec = chain_spec(templated="{{ steps['c'].output.text }}")

    assert "c" in upstream_reads(spec, "templ")


# -- failure summaries ---------------------------------------------------------------------------------------------


def test_the_failure_summary_names_the_step_the_error_type_the_http_status_and_the_message() -> None:
    summary = failure_summary("blog_post", {"type": "bad_request", "status": 400, "message": "prompt is too long"})

    assert summary == "step 'blog_post' failed: bad_request (HTTP 400): prompt is too long"


def test_the_failure_summary_leaves_out_a_missing_status() -> None:
    summary = failure_summary("review", {"type": "error", "status": None, "message": "ValueError: broken"})

    assert summary == "step 'review' failed: error: ValueError: broken"


def test_the_failure_summary_without_an_error_record_still_names_the_step() -> None:
    assert failure_summary("review", None) == "step 'review' failed"
    assert failure_summary("review", {}) == "step 'review' failed"
