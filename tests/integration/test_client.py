"""The Python client producers use, against real Redis and real worker processes."""

from __future__ import annotations

import pytest
import redis

from orchestrator import (
    Client,
    InputValidationError,
    NoopStep,
    PythonStep,
    RunNotFoundError,
    UnknownWorkflowError,
    Workflow,
)
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.state import keys
from tests.integration.helpers import py, ts, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def run_hashes(r: redis.Redis) -> set[str]:
    return {str(k) for k in r.keys(f"{keys.PREFIX}:{{*}}")}


def test_submit_returns_the_run_id_before_the_run_has_finished(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    run_id = client.submit(workflow(f"quick_return_{unique}", py("slow", "tests.sleep", seconds=1.0)))

    view = client.status(run_id)

    assert view["run_id"] == run_id
    assert view["status"] == "running"
    assert view["steps"]["slow"]["status"] in {"queued", "running"}
    assert view["finished_at"] is None
    done = client.wait(run_id, timeout=30)
    assert done["status"] == "succeeded"
    assert ts(done["steps"]["slow"]["finished_at"]) - ts(done["steps"]["slow"]["started_at"]) >= 1.0


def test_wait_raises_timeout_error_while_the_run_is_still_going(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    run_id = client.submit(workflow(f"long_{unique}", py("long", "tests.sleep", seconds=3.0)))

    with pytest.raises(TimeoutError) as info:
        client.wait(run_id, timeout=0.3)

    assert run_id in str(info.value)
    assert client.status(run_id)["status"] == "running", "wait gave up before the run ended"
    # Leave nothing running for the tests after this one.
    assert client.wait(run_id, timeout=30)["status"] == "succeeded"


def test_status_and_wait_of_an_unknown_run_raise_run_not_found(client: Client, unique: str) -> None:
    missing = f"no-such-run-{unique}"

    with pytest.raises(RunNotFoundError) as info:
        client.status(missing)
    assert info.value.run_id == missing
    assert missing in str(info.value)

    with pytest.raises(RunNotFoundError):
        client.wait(missing, timeout=1)


def test_a_repeated_idempotency_key_returns_the_first_run_and_creates_no_other(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    spec = workflow(f"idem_{unique}", py("only", "tests.count_calls"))
    before = run_hashes(redis_client)

    first = client.submit(spec, {"topic": "one"}, idempotency_key=f"k-{unique}")
    second = client.submit(spec, {"topic": "two"}, idempotency_key=f"k-{unique}")
    other = client.submit(spec, {"topic": "two"}, idempotency_key=f"k2-{unique}")

    assert second == first
    assert other != first
    assert run_hashes(redis_client) - before == {keys.run_key(first), keys.run_key(other)}
    view = client.wait(first, timeout=30)
    assert view["inputs"] == {"topic": "one"}
    assert view["steps"]["only"]["output"]["calls"] == 1
    assert client.wait(other, timeout=30)["status"] == "succeeded"


def test_a_registered_workflow_is_submitted_by_name(client: Client, workers: LocalWorkers) -> None:
    import examples.content_pipeline as example

    view = client.wait(client.submit("content_pipeline", {"topic": "Celery chords"}), timeout=60)

    assert view["status"] == "succeeded", view["error"]
    assert view["workflow"] == "content_pipeline"
    assert view["version"] == example.pipeline.version
    assert view["definition_hash"] == example.pipeline.spec.definition_hash
    assert view["inputs"] == {"topic": "Celery chords", "audience": "developers"}
    assert view["steps"]["final_review"]["output"]["approved"] is True


def test_an_unknown_workflow_name_or_version_is_refused_and_nothing_is_written(
    client: Client, redis_client: redis.Redis, unique: str
) -> None:
    before = run_hashes(redis_client)

    with pytest.raises(UnknownWorkflowError) as by_name:
        client.submit(f"nothing_called_{unique}")
    with pytest.raises(UnknownWorkflowError) as by_version:
        client.submit("content_pipeline", {"topic": "x"}, version=999)

    assert by_name.value.name == f"nothing_called_{unique}"
    assert by_version.value.version == 999
    assert run_hashes(redis_client) == before


def test_a_workflow_object_is_submitted_as_it_is(client: Client, workers: LocalWorkers, unique: str) -> None:
    flow = Workflow(
        f"object_{unique}",
        version=2,
        inputs={"n": {"type": "integer"}},
        steps=[
            PythonStep(name="nap", fn="tests.sleep", args={"seconds": 0.05}),
            NoopStep(name="done", depends_on=["nap"]),
        ],
        registry=None,
    )

    view = client.wait(client.submit(flow, {"n": 3}), timeout=30)

    assert view["status"] == "succeeded"
    assert view["workflow"] == f"object_{unique}"
    assert view["version"] == 2
    assert view["definition_hash"] == flow.spec.definition_hash
    assert view["inputs"] == {"n": 3}
    assert view["steps"]["nap"]["output"]["slept"] == 0.05
    assert view["steps"]["done"]["status"] == "succeeded"


def test_a_workflow_given_as_a_dict_is_validated_and_run(client: Client, workers: LocalWorkers, unique: str) -> None:
    spec = workflow(f"dict_{unique}", py("a", "tests.sleep"), py("b", "tests.count_calls", "a"))

    view = client.wait(client.submit(spec, {"topic": "dicts"}), timeout=30)

    assert view["status"] == "succeeded"
    assert view["workflow"] == f"dict_{unique}"
    assert view["steps"]["b"]["output"] == {"calls": 1, "upstream": ["a"]}


def test_inputs_that_do_not_fit_are_refused_by_the_client_and_nothing_is_written(
    client: Client, redis_client: redis.Redis, unique: str
) -> None:
    flow = {"name": f"typed_{unique}", "inputs": {"n": {"type": "integer"}}, "steps": [{"name": "a", "uses": "noop"}]}
    before = run_hashes(redis_client)

    with pytest.raises(InputValidationError, match="'n'"):
        client.submit(flow, {"n": "three"})
    with pytest.raises(InputValidationError, match="required"):
        client.submit(flow)

    assert run_hashes(redis_client) == before
    assert redis_client.exists(f"{keys.PREFIX}:def:{client.resolve(flow).definition_hash}") == 0


def test_a_run_is_listed_in_the_runs_index_once_created(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    run_id = client.submit(workflow(f"indexed_{unique}", py("a", "tests.sleep")))

    assert run_id in client.store.list_run_ids(limit=10)
    assert redis_client.zscore(keys.RUNS_INDEX, run_id) is not None
    assert client.wait(run_id, timeout=30)["status"] == "succeeded"
