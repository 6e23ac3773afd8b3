"""The status JSON built from a run's Redis hash: shapes, timestamps, decoded outputs, error summary, usage."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from orchestrator.api import create_app
from orchestrator.definition.spec import WorkflowSpec, parse_workflow
from orchestrator.domain import RunStatus, StepStatus
from orchestrator.engine.status import RunView, StepView, run_view
from orchestrator.infra.settings import Settings
from orchestrator.infra.timestamps import iso
from orchestrator.state import keys

pytestmark = pytest.mark.timeout(30)

ISO_UTC_MICROS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}\+00:00$")
T0 = 1_700_000_000.25


@pytest.fixture
def spec() -> WorkflowSpec:
    def llm(name: str, *deps: str) -> dict[str, Any]:
        return {"name": name, "uses": "llm", "depends_on": list(deps), "with": {"prompt": f"{name}"}}

    return parse_workflow(
        {
            "name": "view_demo",
            "version": 3,
            "inputs": {"topic": {"type": "string"}},
            "steps": [
                llm("research"),
                llm("blog", "research"),
                {"name": "tally", "uses": "python", "depends_on": ["research"], "with": {"function": "x.tally"}},
                llm("social", "blog"),
                {"name": "join", "uses": "noop", "depends_on": ["social", "tally"]},
            ],
        }
    )


def usage(inp: int, out: int) -> dict[str, int]:
    return {"input_tokens": inp, "output_tokens": out}


def step_fields(
    name: str,
    status: str,
    attempts: int,
    *,
    start: float | None = None,
    end: float | None = None,
    output: Any = None,
    error: dict[str, Any] | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> dict[str, str]:
    p = keys.step_prefix(name)
    fields = {p + "status": status, p + "attempts": str(attempts), p + "pending": "0"}
    if start is not None:
        fields[p + "queued_at"] = repr(start - 0.01)
        fields[p + "started_at"] = repr(start)
    if end is not None:
        fields[p + "finished_at"] = repr(end)
    if output is not None:
        fields[p + "output"] = json.dumps(output)
    if error is not None:
        fields[p + "error"] = json.dumps(error)
    if errors:
        fields[p + "errors"] = json.dumps(errors)
    return fields


def run_fields(spec: WorkflowSpec, status: str, **extra: str) -> dict[str, str]:
    return {
        "run_id": "r1",
        "workflow": spec.name,
        "version": str(spec.version),
        "def_hash": spec.definition_hash,
        "status": status,
        "gen": "1",
        "inputs": json.dumps({"topic": "Redis"}),
        "created_at": repr(T0 - 1),
        "started_at": repr(T0 - 1),
        **extra,
    }


BAD_REQUEST = {"type": "bad_request", "status": 400, "message": "prompt is too long", "attempt": 1}


@pytest.fixture
def failed_run(spec: WorkflowSpec) -> dict[str, str]:
    return {
        **run_fields(spec, "failed", finished_at=repr(T0 + 9), first_failure="blog"),
        **step_fields(
            "research",
            "succeeded",
            2,
            start=T0,
            end=T0 + 1.5,
            output={"text": "facts", "word_count": 1, "model": "m", "usage": usage(100, 40)},
            errors=[{"type": "rate_limit", "status": 429, "message": "slow down", "attempt": 1}],
        ),
        **step_fields("blog", "failed", 1, start=T0 + 2, end=T0 + 3, error=BAD_REQUEST, errors=[BAD_REQUEST]),
        **step_fields(
            "tally", "succeeded", 1, start=T0 + 2, end=T0 + 2.5, output={"count": 3, "usage": usage(1000, 1000)}
        ),
        **step_fields("social", "upstream_failed", 0, end=T0 + 3),
        **step_fields("join", "upstream_failed", 0, end=T0 + 3),
    }


def test_iso_gives_microseconds_and_an_explicit_utc_offset() -> None:
    assert iso("1700000000.123456") == "2023-11-14T22:13:20.123456+00:00"
    assert iso("1700000000") == "2023-11-14T22:13:20.000000+00:00"
    assert iso(None) is None
    assert iso("") is None


def test_the_run_fields_are_typed_and_named_as_the_interface_says(
    spec: WorkflowSpec, failed_run: dict[str, str]
) -> None:
    view = run_view(failed_run, spec)

    assert view["run_id"] == "r1"
    assert view["workflow"] == "view_demo"
    assert view["version"] == 3
    assert isinstance(view["version"], int)
    assert view["definition_hash"] == spec.definition_hash
    assert view["status"] == "failed"
    assert view["inputs"] == {"topic": "Redis"}
    assert json.loads(json.dumps(view)) == view


def test_every_timestamp_is_iso_8601_with_microseconds_in_utc(spec: WorkflowSpec, failed_run: dict[str, str]) -> None:
    view = run_view(failed_run, spec)

    stamps = [view["created_at"], view["started_at"], view["finished_at"]]
    for step in view["steps"].values():
        stamps += [s for s in (step["queued_at"], step["started_at"], step["finished_at"]) if s is not None]
    assert len(stamps) == 3 + 3 * 3 + 2
    for stamp in stamps:
        assert ISO_UTC_MICROS.match(stamp), stamp
    assert datetime.fromisoformat(view["steps"]["research"]["started_at"]) == datetime.fromtimestamp(T0, tz=UTC)
    assert view["steps"]["research"]["finished_at"] == "2023-11-14T22:13:21.750000+00:00"


def test_steps_appear_in_declaration_order_with_status_and_integer_attempts(
    spec: WorkflowSpec, failed_run: dict[str, str]
) -> None:
    steps = run_view(failed_run, spec)["steps"]

    assert list(steps) == ["research", "blog", "tally", "social", "join"]
    assert {name: s["status"] for name, s in steps.items()} == {
        "research": "succeeded",
        "blog": "failed",
        "tally": "succeeded",
        "social": "upstream_failed",
        "join": "upstream_failed",
    }
    assert {name: s["attempts"] for name, s in steps.items()} == {
        "research": 2,
        "blog": 1,
        "tally": 1,
        "social": 0,
        "join": 0,
    }
    assert all(type(s["attempts"]) is int for s in steps.values())
    assert steps["social"]["started_at"] is None
    assert steps["join"]["depends_on"] == ["social", "tally"]
    assert steps["tally"]["kind"] == "python"


def test_a_step_missing_from_the_hash_reads_as_pending_with_nothing_recorded(spec: WorkflowSpec) -> None:
    fields = {**run_fields(spec, "running"), **step_fields("research", "running", 1, start=T0)}

    steps = run_view(fields, spec)["steps"]

    assert steps["research"]["status"] == "running"
    assert steps["research"]["finished_at"] is None
    assert steps["join"] == {
        **steps["join"],
        "status": "pending",
        "attempts": 0,
        "started_at": None,
        "finished_at": None,
        "output": None,
        "error": None,
        "errors": [],
    }


def test_outputs_and_attempt_errors_are_decoded_from_json(spec: WorkflowSpec, failed_run: dict[str, str]) -> None:
    steps = run_view(failed_run, spec)["steps"]

    assert steps["research"]["output"] == {"text": "facts", "word_count": 1, "model": "m", "usage": usage(100, 40)}
    assert steps["tally"]["output"] == {"count": 3, "usage": usage(1000, 1000)}
    assert steps["research"]["errors"] == [{"type": "rate_limit", "status": 429, "message": "slow down", "attempt": 1}]
    assert steps["blog"]["output"] is None


def test_only_a_failed_step_shows_an_error(spec: WorkflowSpec, failed_run: dict[str, str]) -> None:
    fields = {**failed_run, "s:research:error": json.dumps({"type": "rate_limit", "message": "old"})}

    steps = run_view(fields, spec)["steps"]

    assert steps["blog"]["error"] == BAD_REQUEST
    assert steps["research"]["error"] is None
    assert steps["social"]["error"] is None


def test_a_failed_runs_error_names_the_first_failed_step_and_its_error(
    spec: WorkflowSpec, failed_run: dict[str, str]
) -> None:
    error = run_view(failed_run, spec)["error"]

    assert error == "step 'blog' failed: bad_request (HTTP 400): prompt is too long"


def test_a_recorded_run_error_is_kept_as_it_is(spec: WorkflowSpec, failed_run: dict[str, str]) -> None:
    fields = {**failed_run, "error": "could not publish the first steps: broker down"}

    assert run_view(fields, spec)["error"] == "could not publish the first steps: broker down"


def test_a_run_that_did_not_fail_has_no_error(spec: WorkflowSpec, failed_run: dict[str, str]) -> None:
    fields = {**failed_run, "status": "running"}

    assert run_view(fields, spec)["error"] is None


def test_usage_is_summed_over_llm_steps_only(spec: WorkflowSpec, failed_run: dict[str, str]) -> None:
    fields = {
        **failed_run,
        **step_fields(
            "social", "succeeded", 1, start=T0 + 4, end=T0 + 5, output={"text": "post", "usage": usage(7, 3)}
        ),
    }

    view = run_view(fields, spec)

    assert view["usage"] == {"input_tokens": 107, "output_tokens": 43}
    assert view["steps"]["research"]["usage"] == usage(100, 40)
    assert "usage" not in view["steps"]["tally"]


def test_a_run_without_llm_usage_has_no_usage_field(spec: WorkflowSpec) -> None:
    fields = {**run_fields(spec, "running"), **step_fields("tally", "succeeded", 1, output={"usage": usage(5, 5)})}

    assert "usage" not in run_view(fields, spec)


# The status JSON is a stable interface: a field may be added, never renamed or removed (docs/status-json.md).
RUN_FIELDS = {
    "run_id",
    "workflow",
    "version",
    "definition_hash",
    "status",
    "generation",
    "created_at",
    "started_at",
    "finished_at",
    "stopped_at",
    "inputs",
    "error",
    "steps",
    "usage",
    "cost",
    "llm_calls",
    "budget",
    "parent",
}
STEP_FIELDS = {
    "status",
    "attempts",
    "queued_at",
    "started_at",
    "finished_at",
    "output",
    "error",
    "errors",
    "cached",
    "depends_on",
    "kind",
    "approval",
    "usage",
    "cost",
    "deferrals",
    "deferred",
    "iterations",
    "until_met",
    "items",
    "child_run_id",
}


def _names(typed: Any) -> set[str]:
    return set(typed.__required_keys__ | typed.__optional_keys__)


def test_the_run_view_types_name_every_field_of_the_status_json_and_no_other() -> None:
    assert _names(RunView) == RUN_FIELDS
    assert _names(StepView) == STEP_FIELDS


def test_a_run_using_every_feature_builds_only_fields_its_type_names() -> None:
    spec = parse_workflow(
        {
            "name": "everything",
            "version": 1,
            "budget_usd": 2.0,
            "steps": [
                {"name": "draft", "uses": "llm", "with": {"prompt": "hi"}},
                {"name": "gate", "uses": "approval", "depends_on": ["draft"], "with": {"approvers": ["alice"]}},
                {"name": "polish", "uses": "noop", "repeat": {"until": "iteration > 1", "max_iterations": 3}},
            ],
        }
    )
    decision = {"decision": "approve", "by": "alice", "comment": "", "at": repr(T0 + 3)}
    audit = [{**decision, "outcome": "accepted"}]
    fields = {
        **run_fields(spec, "running", llm_spent_nusd="1500", llm_calls="1", llm_held_nusd="0"),
        **step_fields("draft", "queued", 1, output={"text": "x", "usage": usage(3, 4), "cost_usd": 0.0015}),
        keys.step_field("draft", "deferrals"): "2",
        keys.step_field("draft", "deferral"): json.dumps({"reason": "rate_limit", "model": "m", "message": "wait"}),
        keys.step_field("draft", "deferred_until"): repr(T0 + 5),
        **step_fields("gate", "waiting", 1, start=T0 + 2),
        keys.step_field("gate", "waiting_since"): repr(T0 + 2),
        keys.step_field("gate", "decision"): json.dumps(decision),
        keys.step_field("gate", "audit"): json.dumps(audit),
        **step_fields("polish", "succeeded", 1),
        keys.step_field("polish", "iterations"): "2",
        keys.step_field("polish", "until_met"): "1",
    }

    view = run_view(fields, spec)

    assert RunView.__required_keys__ <= set(view) <= _names(RunView)
    for step in view["steps"].values():
        assert StepView.__required_keys__ <= set(step) <= _names(StepView)
    assert {"usage", "cost", "llm_calls", "budget"} <= set(view)
    assert {"approval"} <= set(view["steps"]["gate"])
    assert {"usage", "cost", "deferrals", "deferred"} <= set(view["steps"]["draft"])
    assert (view["steps"]["polish"]["iterations"], view["steps"]["polish"]["until_met"]) == (2, True)
    assert "iterations" not in view["steps"]["draft"]


def test_statuses_are_the_enums_and_serialise_as_their_plain_values(spec: WorkflowSpec) -> None:
    view = run_view(run_fields(spec, "running"), spec)

    assert view["status"] is RunStatus.RUNNING
    assert view["steps"]["research"]["status"] is StepStatus.PENDING
    assert json.loads(json.dumps(view))["status"] == "running"


def test_the_api_documents_the_run_response_with_the_status_json_type() -> None:
    schema = create_app(Settings()).openapi()

    response = schema["paths"]["/runs/{run_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert response == {"$ref": "#/components/schemas/RunView"}
    assert set(schema["components"]["schemas"]["RunView"]["properties"]) == RUN_FIELDS
    assert set(schema["components"]["schemas"]["StepView"]["properties"]) == STEP_FIELDS
