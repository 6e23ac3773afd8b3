"""Hostile input against the state store (issue 12, items 6, 8, 11, 12, 13 and 16), end to end.

Stale approval timers, an unbounded audit, an idempotency key bound to a run never created (and two submits racing
on one key), a dispatch failure without a final event, deadlines outliving their runs, and attempt numbers that
disagree after a resume. The store-level rules are in the contract suite (``tests/unit/test_state_contract.py``);
these tests go through the client, the API's body model and real workers.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from pydantic import ValidationError

from orchestrator import Client
from orchestrator.api.schemas import DecideStep
from orchestrator.definition.spec import MAX_WORKFLOW_TIMEOUT_S, parse_workflow
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.domain import MAX_DECISION_COMMENT_CHARS
from orchestrator.errors import InputValidationError, StoreUnavailableError, WorkflowDefinitionError
from orchestrator.state import keys
from tests.integration.helpers import llm, py, wait_for, workflow
from tests.unit.round_trips import record_round_trips

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# An approval's timeout long enough to cancel and resume the run inside it, short enough for a test.
APPROVAL_TIMEOUT_S = 6.0


def approval(name: str, *deps: str, **params: Any) -> dict[str, Any]:
    return {"name": name, "uses": "approval", "depends_on": list(deps), "with": {"approvers": ["alice"], **params}}


def step_status(client: Client, run_id: str, step: str) -> str:
    return str(client.status(run_id)["steps"][step]["status"])


# -- definitions ---------------------------------------------------------------------------------------------------


def test_an_unknown_step_type_is_named_in_the_error() -> None:
    with pytest.raises(WorkflowDefinitionError) as refused:
        parse_workflow({"name": "w", "steps": [{"name": "a", "uses": "teleport"}]})

    message = str(refused.value)
    assert "unknown step type 'teleport'" in message
    assert "\n" not in message


def test_a_workflow_timeout_beyond_the_run_s_own_life_is_refused() -> None:
    with pytest.raises(WorkflowDefinitionError, match="timeout_s"):
        parse_workflow({"name": "w", "timeout_s": 1e15, "steps": [{"name": "a", "uses": "noop"}]})

    assert parse_workflow({"name": "w", "timeout_s": MAX_WORKFLOW_TIMEOUT_S, "steps": [{"name": "a", "uses": "noop"}]})


# -- decisions -----------------------------------------------------------------------------------------------------


def test_a_decision_comment_over_the_limit_is_refused_by_the_api_body() -> None:
    DecideStep(decision="approve", comment="x" * MAX_DECISION_COMMENT_CHARS)
    with pytest.raises(ValidationError, match=str(MAX_DECISION_COMMENT_CHARS)):
        DecideStep(decision="approve", comment="x" * (MAX_DECISION_COMMENT_CHARS + 1))


def test_a_decision_comment_over_the_limit_is_refused_by_the_client_before_anything_is_read_or_written(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every command this process sends is recorded: the shared Redis's key count moves with other tests' runs.
    sent = record_round_trips(monkeypatch)
    with pytest.raises(InputValidationError) as refused:
        client.approve("no-such-run", "review", by="alice", comment="x" * (MAX_DECISION_COMMENT_CHARS + 1))

    assert (
        str(refused.value) == f"the comment is {MAX_DECISION_COMMENT_CHARS + 1} characters; the limit is "
        f"{MAX_DECISION_COMMENT_CHARS}"
    )
    assert sent.trips == [], "nothing read or written"


def test_an_approval_timeout_set_before_a_cancel_does_not_decide_the_resumed_run_s_wait(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    spec = workflow(f"stale_timer_{unique}", approval("review", timeout_s=APPROVAL_TIMEOUT_S, on_timeout="approve"))
    run_id = client.submit(spec)
    wait_for(lambda: step_status(client, run_id, "review") == "waiting", what="the first wait")
    first_due = time.monotonic() + APPROVAL_TIMEOUT_S
    assert client.cancel(run_id)["cancelled"]
    # Resume half way through the first wait: its timer would fire well before the new wait's.
    wait_for(lambda: time.monotonic() >= first_due - APPROVAL_TIMEOUT_S / 2, what="half the first wait")
    assert client.resume(run_id) == "2"
    wait_for(lambda: step_status(client, run_id, "review") == "waiting", what="the second wait")
    second_due = time.monotonic() + APPROVAL_TIMEOUT_S

    # Past the first timer's due time (and a few sweeps more), the new wait is still undecided.
    quiet_until = first_due + 1.5
    while time.monotonic() < quiet_until:
        assert step_status(client, run_id, "review") == "waiting", "decided by the earlier generation's timer"
        time.sleep(0.1)
    view = client.wait(run_id, timeout=30)

    assert view["status"] == "succeeded"
    assert view["steps"]["review"]["output"]["by"] == "timeout"
    assert time.monotonic() >= second_due - 1.0


# -- submit and dispatch failures -----------------------------------------------------------------------------------


def test_a_submit_cut_off_by_redis_leaves_its_key_to_the_retry_which_creates_that_run(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    spec = workflow(f"idem_{unique}", py("a", "tests.count_calls"))
    key = f"order-{unique}"

    def redis_fails(*args: Any, **kwargs: Any) -> bool:
        raise redis.ConnectionError("Redis went away")

    with monkeypatch.context() as patch:
        # Redis goes away after the key is bound and before the run is made; it is still away for any clean-up.
        for name in ("create_run", "run_summaries", "release_idempotency_key"):
            patch.setattr(client.store, name, redis_fails)
        with pytest.raises(StoreUnavailableError):
            client.submit(spec, idempotency_key=key)
    bound = redis_client.get(keys.idempotency_key(key))
    assert isinstance(bound, str)
    assert not redis_client.exists(keys.run_key(bound))

    run_id = client.submit(spec, idempotency_key=key)

    assert run_id == bound, "the retry makes the run its key names rather than answer with a run that does not exist"
    assert client.submit(spec, idempotency_key=key) == run_id
    view = client.wait(run_id, timeout=30)
    assert view["status"] == "succeeded"
    assert view["steps"]["a"]["output"]["calls"] == 1


def test_two_submits_racing_on_one_key_make_one_run_and_start_it_once(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    spec = workflow(f"idem_race_{unique}", py("a", "tests.count_calls"))
    key = f"order-{unique}"
    create, publish = client.store.create_run, client.publisher.publish
    published: list[str] = []
    second: list[str] = []
    calls = iter(range(2))

    def other_submit_first(*args: Any, **kwargs: Any) -> bool:
        # The first submit has bound the key and not yet made the run when the second one arrives and makes it.
        if next(calls) == 0:
            second.append(client.submit(spec, idempotency_key=key))
        return create(*args, **kwargs)

    def counted(*args: Any, **kwargs: Any) -> None:
        published.append(kwargs["run_id"])
        publish(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(client.store, "create_run", other_submit_first)
        patch.setattr(client.publisher, "publish", counted)
        first = client.submit(spec, idempotency_key=key)

    assert second == [first]
    assert published == [first], "only the submit that made the run publishes its first steps"
    view = client.wait(first, timeout=30)
    assert view["status"] == "succeeded"
    assert view["steps"]["a"]["output"]["calls"] == 1


def test_a_run_whose_dispatch_failed_ends_its_event_stream_with_run_failed(
    client: Client, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    name = f"no_broker_{unique}"

    def broker_down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionRefusedError("broker down")

    with monkeypatch.context() as patch:
        patch.setattr(client.publisher, "publish", broker_down)
        with pytest.raises(StoreUnavailableError, match="broker"):
            client.submit(workflow(name, py("a", "tests.count_calls")))
    summaries = client.store.run_summaries(client.store.list_run_ids(limit=1000))
    (run_id,) = [s["run_id"] for s in summaries if s["workflow"] == name]

    events = list(client.stream(run_id, poll_s=1.0))  # ends: the run's final event is there

    assert events[-1].type == "run_failed"
    view = client.status(run_id)
    assert (view["status"], view["finished_at"] is not None) == ("failed", True)


# -- attempts ------------------------------------------------------------------------------------------------------


def test_a_resumed_step_gets_the_next_attempt_number_everywhere(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    # The offline provider fails the first attempt only (errors[0]); with no retries the run fails, and its resume
    # is attempt 2, which must not meet errors[0] again.
    flaky = llm("flaky", errors=("server_error",), retry={"max_attempts": 1})
    run_id = client.submit(workflow(f"attempts_{unique}", flaky))
    assert client.wait(run_id, timeout=30)["status"] == "failed"

    assert client.resume(run_id) == "2"
    view = client.wait(run_id, timeout=30)

    step = view["steps"]["flaky"]
    assert (view["status"], step["attempts"]) == ("succeeded", 2)
    assert [e["attempt"] for e in step["errors"]] == [1]
    started = [e.attempt for e in client.store.events(run_id) if e.type == "step_started"]
    ended = [e.attempt for e in client.store.events(run_id) if e.type in ("step_failed", "step_succeeded")]
    assert (started, ended) == ([1, 2], [1, 2])
