"""The examples run as the README and their docstrings say, offline, in one process (``REDIS_URL=memory://``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import Client, Settings, parse_workflow

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = replace(Settings.from_env({}), redis_url="memory://", sweep_interval_s=0.05, retry_cap_s=1.0)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def client() -> Iterator[Client]:
    with Client(SETTINGS) as c:
        yield c


def _python_twin() -> Any:
    from examples.long_form_article import long_form_article

    return long_form_article


def _file() -> Any:
    return parse_workflow(yaml.safe_load((ROOT / "examples" / "long_form_article.yaml").read_text()))


@pytest.mark.parametrize("load", [_file, _python_twin], ids=["yaml", "python"])
def test_the_long_form_article_maps_its_outline_loops_its_editor_and_publishes_through_child_runs(
    client: Client, load: Any
) -> None:
    run_id = client.submit(load(), {"topic": "Redis streams"})
    view = client.wait(run_id, timeout=45)

    assert view["status"] == "succeeded", view["error"]
    steps = view["steps"]
    outline = steps["outline"]["output"]["data"]["sections"]
    assert steps["sections"]["items"]["total"] == len(outline) == 4
    assert steps["sections"]["items"]["succeeded"] == 4
    assert len(steps["sections"]["output"]) == 4
    assert all(section["word_count"] > 0 for section in steps["sections"]["output"])
    edit = steps["edit"]
    assert 1 <= edit["iterations"] <= 3
    assert edit["until_met"] == edit["output"]["data"]["approved"] or edit["iterations"] == 3
    for channel in ("blog", "email"):
        step = steps[f"publish_{channel}"]
        child = client.status(step["child_run_id"])
        assert child["status"] == "succeeded"
        assert child["parent"]["run_id"] == run_id
        assert child["parent"]["step"] == f"publish_{channel}"
        assert channel in child["inputs"]["channel"]
        assert set(step["output"]) == {"adapt", "post"}


def _example(name: str) -> Any:
    return parse_workflow(yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text()))


def test_the_research_team_delegates_the_fact_check_to_a_child_run_and_streams_its_brief(client: Client) -> None:
    checked = client.wait(client.submit(_example("fact_check"), {"claim": "two tides a day"}), timeout=30)
    assert checked["status"] == "succeeded", checked["error"]

    run_id = client.submit(_example("research_team"), {"topic": "tides"})
    view = client.wait(run_id, timeout=45)

    assert view["status"] == "succeeded", view["error"]
    supervisor = view["steps"]["supervisor"]["output"]
    calls = {call["name"]: call for call in supervisor["tool_calls"]}
    assert set(calls) == {"notes.read", "workflow:fact_check", "calculator", "notes.write"}
    fact_check = calls["workflow:fact_check"]
    assert "error" not in fact_check, fact_check
    children = [client.status(r["run_id"]) for r in client.runs(workflow="fact_check")]
    (child,) = [c for c in children if c.get("parent", {}).get("run_id") == run_id]
    assert child["status"] == "succeeded"
    assert child["parent"]["step"] == "supervisor"
    assert fact_check["output"] == {"verdict": child["steps"]["verdict"]["output"]}
    assert view["steps"]["publish"]["output"]["text"]
