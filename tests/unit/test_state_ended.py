"""The store contract for an ended run, against both stores: it keeps what its readers need and nothing more.

A run that ends (succeeded, failed, cancelled, or failed at dispatch) drops its steps' per-attempt scratch fields;
its status JSON, events and resume are as before. In Redis its event stream is rewritten at its exact size, and its
values longer than 64 bytes move beside its hash (``keys.large_values_key``), which becomes a listpack again.
"""

from __future__ import annotations

import re
import threading
from importlib import resources

import pytest

from orchestrator.domain import ClaimOutcome, ResumeOutcome, RunStatus, StepOutcome
from orchestrator.engine.events import Event
from orchestrator.engine.status import run_summary, run_view
from orchestrator.state import keys
from orchestrator.state.base import (
    ENDED_IF_EMPTY_FIELDS,
    ENDED_RUN_IF_EMPTY_FIELDS,
    ENDED_SCRATCH_FIELDS,
    SUMMARY_FIELDS,
)
from orchestrator.state.redis.core import ENDED_PACKED_FIELDS
from tests.unit import test_state_contract as contract
from tests.unit.test_state_contract import (
    CHAIN,
    RETENTION_S,
    Backend,
    attempt,
    claim,
    finish,
    resume_plan,
    run_step,
    start,
    step_fields,
    succeed,
)

backend = contract.backend
contract_redis = contract.contract_redis

pytestmark = pytest.mark.timeout(30)


def scratch_left(backend: Backend) -> list[str]:
    fields = backend.store.run_fields("run1")
    return sorted(
        name
        for name, value in fields.items()
        if (name.startswith("s:") and name.rsplit(":", 1)[1] in ENDED_SCRATCH_FIELDS)
        or (name in ENDED_RUN_IF_EMPTY_FIELDS and value == "")
    )


def gapless(events: list[Event]) -> bool:
    return [e.seq for e in events] == list(range(1, len(events) + 1))


def test_a_succeeded_run_drops_its_scratch_but_keeps_results_cache_keys_and_events(backend: Backend) -> None:
    start(backend, CHAIN)
    succeed(backend, CHAIN, "a", {"x": 1}, "ka")
    assert "task" in step_fields(backend, "a")  # scratch is kept while the run runs
    before = backend.store.events("run1")
    succeed(backend, CHAIN, "b", {"y": 2}, "")

    assert scratch_left(backend) == []
    a, b = step_fields(backend, "a"), step_fields(backend, "b")
    assert (a["status"], a["output"], a["cache_key"], a["attempts"]) == ("succeeded", '{"x":1}', "ka", "1")
    assert "cache_key" not in b
    assert "cached" not in b
    events = backend.store.events("run1")
    assert events[: len(before)] == before
    assert gapless(events)
    assert [e.type for e in events[-2:]] == ["step_succeeded", "run_succeeded"]
    view = run_view(backend.store.run_fields("run1"), CHAIN)
    assert view["status"] == "succeeded"
    assert view["steps"]["b"]["output"] == {"y": 2}
    assert not view["steps"]["a"]["cached"]
    backend.assert_events_expire_with_run("run1", RETENTION_S)


def test_a_failed_run_resumes_after_its_scratch_is_dropped(backend: Backend) -> None:
    start(backend, CHAIN)
    succeed(backend, CHAIN, "a", {"x": 1}, "ka")
    run_step(backend, CHAIN, "b", StepOutcome.FAILED)
    assert backend.store.run_fields("run1")["status"] == "failed"
    assert scratch_left(backend) == []

    assert backend.store.resume("run1", resume_plan(("b", "queued", 0))).outcome == ResumeOutcome.OK
    got = claim(backend, CHAIN, attempt("b", "b2", generation="2"))

    assert (got.outcome, got.attempt, got.generation_attempt, got.force) == (ClaimOutcome.OK, 2, 1, False)
    assert finish(backend, CHAIN, attempt("b", "b2", generation="2"), output={"y": 2}).recorded
    assert backend.store.run_fields("run1")["status"] == "succeeded"
    assert gapless(backend.store.events("run1"))


def test_a_cancelled_run_drops_its_scratch_and_resumes(backend: Backend) -> None:
    start(backend, CHAIN)
    assert claim(backend, CHAIN, attempt("a")).outcome == ClaimOutcome.OK
    backend.store.stop("run1", RunStatus.CANCELLED, "cancelled by alice", ("a", "b"))
    assert scratch_left(backend) == []
    assert not finish(backend, CHAIN, attempt("a"), output=1).recorded  # the interrupted attempt records nothing

    plan = resume_plan(("a", "queued", 0), ("b", "pending", 1))
    assert backend.store.resume("run1", plan).outcome == ResumeOutcome.OK
    assert claim(backend, CHAIN, attempt("a", "a2", generation="2")).outcome == ClaimOutcome.OK
    assert claim(backend, CHAIN, attempt("b", "b2", generation="2")).outcome == ClaimOutcome.BUSY
    backend.assert_expires_in("run1", RETENTION_S * 4)


def test_a_run_whose_dispatch_failed_drops_its_scratch(backend: Backend) -> None:
    start(backend, CHAIN)
    backend.store.mark_dispatch_failed("run1", "broker down")
    assert scratch_left(backend) == []
    assert backend.store.resume("run1", resume_plan(("a", "queued", 0), ("b", "pending", 1))).outcome == (
        ResumeOutcome.OK
    )
    assert claim(backend, CHAIN, attempt("a", "a2", generation="2")).outcome == ClaimOutcome.OK


def test_a_reader_waiting_when_the_run_ends_gets_its_last_events(backend: Backend) -> None:
    start(backend, CHAIN)
    succeed(backend, CHAIN, "a", {"x": 1}, "")
    at = attempt("b")
    assert claim(backend, CHAIN, at).outcome == ClaimOutcome.OK
    seen = backend.store.events("run1")[-1].seq
    got: list[list[Event]] = []
    reader = threading.Thread(target=lambda: got.append(backend.store.wait_events("run1", seen, 10.0)), daemon=True)
    reader.start()
    try:
        assert contract.eventually(lambda: backend.blocked_readers() == 1), "the reader never blocked"
        assert finish(backend, CHAIN, at, output={"y": 2}).recorded
    finally:
        reader.join(10.0)
    assert [e.type for e in got[0]] == ["step_succeeded", "run_succeeded"]


def test_an_ended_runs_event_stream_is_rewritten_at_its_size(backend: Backend) -> None:
    client = backend.client
    if client is None:
        pytest.skip("Redis only: the memory store's events take no preallocated space")
    start(backend, CHAIN)
    succeed(backend, CHAIN, "a", {"x": 1}, "")
    running = int(client.memory_usage(keys.events_key("run1"), samples=0) or 0)
    succeed(backend, CHAIN, "b", {"y": 2}, "")

    after = int(client.memory_usage(keys.events_key("run1"), samples=0) or 0)
    assert after < running / 2, (running, after)
    assert gapless(backend.store.events("run1"))
    backend.assert_events_expire_with_run("run1", RETENTION_S)


def test_the_lua_compaction_drops_what_the_memory_store_drops() -> None:
    lua = resources.files("orchestrator.state").joinpath("lua", "_ended.lua").read_text()

    def table(name: str) -> set[str]:
        body = re.search(rf"local {name} = \{{(.*?)\}}", lua, re.S)
        assert body is not None, name
        return set(re.findall(r"(\w+) = true", body.group(1)))

    assert table("ENDED_SCRATCH") == set(ENDED_SCRATCH_FIELDS)
    assert table("ENDED_IF_EMPTY") == set(ENDED_IF_EMPTY_FIELDS)
    assert table("ENDED_RUN_IF_EMPTY") == set(ENDED_RUN_IF_EMPTY_FIELDS)
    assert table("ENDED_KEEP") == set(SUMMARY_FIELDS)  # a listing reads them from the hash alone
    body = re.search(r"local ENDED_PACKED = \{(.*?)\}", lua, re.S)
    assert body is not None
    packed = dict(re.findall(r"(\w+) = (\d)", body.group(1)))
    assert tuple(sorted(packed, key=lambda name: packed[name])) == ENDED_PACKED_FIELDS


# Longer than a listpack's values (64 bytes), with a character UTF-8 spells in two bytes and the packing's own marks.
BIG_A = {"text": "é:1\n" * 40, "n": 1}
BIG_B = {"text": "b" * 300}
LONG_ERROR = {"type": "error", "message": "broken: " + "x" * 200}


def encoding(backend: Backend, key: str) -> str:
    assert backend.client is not None
    return str(backend.client.object("encoding", key), "ascii")


def test_an_ended_runs_long_values_read_back_whole_and_its_hash_is_compact(backend: Backend) -> None:
    start(backend, CHAIN, inputs={"topic": "t" * 100})
    succeed(backend, CHAIN, "a", BIG_A, "ka")
    succeed(backend, CHAIN, "b", BIG_B, "")

    view = run_view(backend.store.run_fields("run1"), CHAIN)
    assert (view["steps"]["a"]["output"], view["steps"]["b"]["output"]) == (BIG_A, BIG_B)
    assert view["inputs"] == {"topic": "t" * 100}
    assert "large" not in backend.store.run_fields("run1")
    assert scratch_left(backend) == []
    assert (step_fields(backend, "a")["attempts"], step_fields(backend, "b")["attempts"]) == ("1", "1")
    assert float(step_fields(backend, "b")["started_at"]) <= float(step_fields(backend, "b")["finished_at"])
    if backend.client is not None:
        assert encoding(backend, keys.run_key("run1")) == "listpack"
        stored = backend.client.hgetall(keys.run_key("run1"))
        assert b"s:a:" in stored  # one field for an ended step's count and times
        assert b"s:a:attempts" not in stored
        # The long values expire with the run.
        pipe = backend.client.pipeline(transaction=True)
        pipe.pttl(keys.run_key("run1"))
        pipe.pttl(keys.large_values_key("run1"))
        run_ttl, large_ttl = pipe.execute()
        assert abs(run_ttl - large_ttl) <= 5, (run_ttl, large_ttl)
    backend.assert_events_expire_with_run("run1", RETENTION_S)


def test_a_failed_run_with_long_values_lists_its_error_and_resumes_with_its_outputs(backend: Backend) -> None:
    start(backend, CHAIN)
    succeed(backend, CHAIN, "a", BIG_A, "ka")
    b = attempt("b")
    assert claim(backend, CHAIN, b).outcome == ClaimOutcome.OK
    assert finish(backend, CHAIN, b, StepOutcome.FAILED, error=LONG_ERROR).run_status == "failed"

    row = backend.store.run_summaries(["run1"])[0]
    assert set(row) == {*SUMMARY_FIELDS, "failure_error"}
    assert run_summary(row)["error"] == run_view(backend.store.run_fields("run1"), CHAIN)["error"]
    assert "broken: xxx" in str(run_summary(row)["error"])
    if backend.client is not None:
        assert backend.client.exists(keys.large_values_key("run1"))

    assert backend.store.resume("run1", resume_plan(("b", "queued", 0))).outcome == ResumeOutcome.OK
    if backend.client is not None:
        assert not backend.client.exists(keys.large_values_key("run1"))
    got = claim(backend, CHAIN, attempt("b", "b2", generation="2"))
    assert got.outcome == ClaimOutcome.OK
    assert got.parent_output == {"a": BIG_A}
    assert [e["message"] for e in got.errors] == [LONG_ERROR["message"]]
    assert finish(backend, CHAIN, attempt("b", "b2", generation="2"), output=BIG_B).run_status == "succeeded"
    view = run_view(backend.store.run_fields("run1"), CHAIN)
    assert (view["status"], view["steps"]["a"]["output"], view["steps"]["b"]["output"]) == ("succeeded", BIG_A, BIG_B)
    assert gapless(backend.store.events("run1"))


def test_a_field_written_after_the_run_ended_wins_over_its_packed_value(backend: Backend) -> None:
    client = backend.client
    if client is None:
        pytest.skip("Redis only: the memory store keeps one map")
    start(backend, CHAIN)
    succeed(backend, CHAIN, "a", BIG_A, "")
    succeed(backend, CHAIN, "b", BIG_B, "")
    client.hset(keys.run_key("run1"), mapping={keys.step_field("b", "output"): '{"text":"newer"}', "s:b:attempts": 7})
    view = run_view(backend.store.run_fields("run1"), CHAIN)
    assert (view["steps"]["b"]["output"], view["steps"]["b"]["attempts"]) == ({"text": "newer"}, 7)


def test_the_packed_values_keep_any_bytes_of_names_and_values() -> None:
    from orchestrator.state.redis.core import unpack_large

    fields = {"s:a:output": "é:1\n\n:x", "": "", "inputs": "1:"}
    blob = b"7\n" + b"".join(
        b"%d:%s%d:%s" % (len(n.encode()), n.encode(), len(v.encode()), v.encode()) for n, v in fields.items()
    )
    assert unpack_large(blob) == ("7", fields)
    assert unpack_large(blob.decode()) == ("7", fields)  # a client with decode_responses on
