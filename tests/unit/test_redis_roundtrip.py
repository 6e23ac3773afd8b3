"""The hot paths' lean round trip (``orchestrator.infra.redis_roundtrip``): the replies redis-py would give, an error
reply kept to its command, scripts Redis forgot loaded again, and a connection that failed never reused dirty."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from orchestrator.definition.spec import parse_workflow
from orchestrator.engine.outage import OUTAGE_ERRORS
from orchestrator.infra import redis_pool
from orchestrator.infra.redis_roundtrip import execute, run_command, run_script
from orchestrator.infra.redis_url import blocking_pool
from orchestrator.llm.governor import RedisGovernor, Settlement
from orchestrator.state import RedisStateStore, keys
from tests.conftest import private_redis

SCRIPT = "redis.call('SET', KEYS[1], ARGV[1]); return {ARGV[1], tonumber(ARGV[2]) + 1}"


def _client(url: str, *, decode: bool = False, socket_timeout: float = 5) -> redis.Redis:
    """A client on a one-connection pool of the kind the store uses: every round trip reuses one connection."""
    pool = blocking_pool(url, max_connections=1, timeout=5, socket_timeout=socket_timeout, decode_responses=decode)
    return redis.Redis(connection_pool=pool)


@pytest.fixture
def prefix() -> str:
    return f"test:roundtrip:{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(redis_url: str, prefix: str) -> Iterator[redis.Redis]:
    c = _client(redis_url)
    yield c
    for key in c.scan_iter(f"{prefix}*"):
        c.delete(key)
    c.connection_pool.disconnect()


def _queue_mixed(pipe: Any, prefix: str, sha: str) -> None:
    pipe.set(f"{prefix}:s", "v")
    pipe.execute_command("EVALSHA", sha, 1, f"{prefix}:e", "x", 41)
    pipe.zadd(f"{prefix}:z", {"m": 1.5})
    pipe.hset(f"{prefix}:h", mapping={"f": "1"})
    pipe.hget(f"{prefix}:h", "f")
    pipe.get(f"{prefix}:missing")
    pipe.zrange(f"{prefix}:z", 0, -1, withscores=True)


@pytest.mark.parametrize("decode", [False, True])
def test_a_pipeline_gets_the_replies_redis_py_gives_in_order(redis_url: str, prefix: str, decode: bool) -> None:
    c = _client(redis_url, decode=decode)
    sha = c.script_load(SCRIPT)
    theirs = c.pipeline(transaction=False)
    _queue_mixed(theirs, f"{prefix}:a", sha)
    ours = c.pipeline(transaction=False)
    _queue_mixed(ours, f"{prefix}:b", sha)

    expected = theirs.execute()
    got = execute(ours)

    assert got == expected
    assert got[0] is True  # SET's response callback applied
    assert got[6] == [(b"m" if not decode else "m", 1.5)]  # and ZRANGE's, with its option
    assert len(ours) == 0  # emptied, as after ``execute``
    c.delete(*(f"{prefix}:{run}:{key}" for run in "ab" for key in "sezh"))
    c.connection_pool.disconnect()


def test_an_error_reply_in_the_middle_is_that_commands_and_the_others_are_applied(
    client: redis.Redis, prefix: str
) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.set(f"{prefix}:a", "1").hset(f"{prefix}:a", "f", "x").set(f"{prefix}:b", "2").echo("last")

    replies = execute(pipe, raise_on_error=False)

    assert replies[::2] == [True, True]
    assert replies[3] == b"last"
    assert isinstance(replies[1], redis.ResponseError)
    assert "WRONGTYPE" in str(replies[1])
    assert client.echo("next") == b"next"  # no reply left behind on the one connection


def test_with_raise_on_error_the_first_error_is_raised_once_every_reply_was_read(
    client: redis.Redis, prefix: str
) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.set(f"{prefix}:a", "1").incr(f"{prefix}:a", 1).hset(f"{prefix}:a", "f", "x").set(f"{prefix}:b", "2")

    with pytest.raises(redis.ResponseError, match=r"^Command # 3 \(HSET .*WRONGTYPE"):
        execute(pipe)

    assert client.get(f"{prefix}:b") == b"2"  # applied: Redis runs every command of a pipeline
    assert client.echo("next") == b"next"


def test_a_single_command_and_its_error_reply(client: redis.Redis, prefix: str) -> None:
    assert run_command(client, "SET", f"{prefix}:a", "1") is True  # SET's response callback
    assert run_command(client, "HGET", f"{prefix}:none", "f") is None
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        run_command(client, "HGET", f"{prefix}:a", "f")
    assert client.echo("next") == b"next"


def test_a_script_redis_forgot_is_loaded_and_run_once() -> None:
    with private_redis() as server:
        c = _client(server.url)
        script = c.register_script(SCRIPT)
        assert run_script(c, script, ["k"], ["a", 1]) == [b"a", 2]  # never loaded: NOSCRIPT, then loaded
        c.script_flush()
        assert run_script(c, script, ["k"], ["b", 2]) == [b"b", 3]
        assert c.get("k") == b"b"
        c.connection_pool.disconnect()


def test_a_pipeline_holding_a_script_redis_forgot_answers_noscript_in_its_place() -> None:
    with private_redis() as server:
        c = _client(server.url)
        sha = c.script_load(SCRIPT)
        c.script_flush()
        pipe = c.pipeline(transaction=False)
        pipe.set("before", "1").execute_command("EVALSHA", sha, 1, "k", "x", 1).set("after", "1")

        replies = execute(pipe, raise_on_error=False)

        assert replies[::2] == [True, True]
        assert isinstance(replies[1], redis.exceptions.NoScriptError)
        pipe.execute_command("EVALSHA", sha, 1, "k", "x", 1)
        with pytest.raises(redis.exceptions.NoScriptError):
            execute(pipe)
        c.connection_pool.disconnect()


def test_the_store_runs_its_transitions_after_script_flush() -> None:
    with private_redis() as server:
        store = RedisStateStore(_client(server.url))
        spec = parse_workflow({"name": "flushed", "steps": [{"name": "a", "uses": "llm", "with": {"prompt": "hi"}}]})
        store.save_definition(spec)  # a pipeline holding a script Redis never saw
        store.client.script_flush()
        store.save_definition(spec)
        run_id = uuid.uuid4().hex
        assert store.create_run(run_id, spec, {}, None)
        store.client.script_flush()
        store.announce(run_id, "run_started", spec.name)
        assert store.run_parent(run_id) is None
        assert store.load_definition(spec.definition_hash).name == spec.name
        store.client.connection_pool.disconnect()


def _client_id(c: redis.Redis) -> int:
    return int(run_command(c, "CLIENT", "ID"))


def _kill_when_blocked(url: str, victim_id: int) -> threading.Thread:
    """Kill connection ``victim_id`` from another connection once Redis lists it blocked in BLPOP."""

    def kill() -> None:
        admin = redis.Redis.from_url(url, decode_responses=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(c["id"] == str(victim_id) and c["cmd"] == "blpop" for c in admin.client_list()):
                admin.client_kill_filter(_id=victim_id)
                break
        admin.close()

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


def test_a_connection_killed_mid_pipeline_fails_it_as_an_outage_and_is_not_reused(
    client: redis.Redis, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_pool, "QUICK_REUSE_S", 60.0)  # not polled on reuse: the lean path alone must not reuse it
    victim = _client_id(client)
    pipe = client.pipeline(transaction=False)
    pipe.set(f"{prefix}:a", "1").blpop([f"{prefix}:never"], timeout=4).echo("late")
    killer = _kill_when_blocked(redis_url, victim)

    with pytest.raises(OUTAGE_ERRORS) as raised:
        execute(pipe)
    killer.join()

    assert isinstance(raised.value, redis.ConnectionError)
    assert _client_id(client) != victim  # a new connection, and it reads its own replies
    assert run_command(client, "ECHO", "next") == b"next"


def test_a_timeout_mid_pipeline_disconnects_the_connection(redis_url: str, prefix: str) -> None:
    c = _client(redis_url, socket_timeout=0.2)
    victim = _client_id(c)
    pipe = c.pipeline(transaction=False)
    pipe.blpop([f"{prefix}:never"], timeout=2).echo("late")

    with pytest.raises(redis.TimeoutError):
        execute(pipe)

    assert _client_id(c) != victim
    assert run_command(c, "ECHO", "next") == b"next"  # not BLPOP's nil nor "late"
    c.connection_pool.disconnect()


def test_an_error_raised_while_reading_disconnects_the_connection_so_no_reply_is_left_for_the_next(
    client: redis.Redis, prefix: str
) -> None:
    def refuse(response: Any, **options: Any) -> Any:
        raise RuntimeError("a callback failed")

    client.set_response_callback("GET", refuse)
    victim = _client_id(client)
    pipe = client.pipeline(transaction=False)
    pipe.get(f"{prefix}:a").echo("left unread")

    with pytest.raises(RuntimeError):
        execute(pipe)

    assert _client_id(client) != victim
    assert run_command(client, "ECHO", "next") == b"next"


def test_a_redis_that_is_down_fails_as_an_outage() -> None:
    with private_redis() as server:
        c = _client(server.url)
        script = c.register_script(SCRIPT)
    with pytest.raises(redis.ConnectionError):
        run_script(c, script, ["k"], ["a", 1])
    with pytest.raises(redis.ConnectionError):
        execute(c.pipeline(transaction=False).echo("x"))


def test_a_connection_whose_retry_allows_it_is_tried_again_as_redis_py_does(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_pool, "QUICK_REUSE_S", 60.0)
    c = redis.Redis(
        connection_pool=blocking_pool(
            redis_url, max_connections=1, timeout=5, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 1)
        )
    )
    victim = _client_id(c)
    admin = redis.Redis.from_url(redis_url)
    admin.client_kill_filter(_id=victim)
    admin.close()

    assert run_command(c, "ECHO", "again") == b"again"  # the first send met the closed connection; the retry did not
    c.connection_pool.disconnect()


def test_transactions_and_cluster_style_pipelines_take_redis_pys_path(client: redis.Redis, prefix: str) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.set(f"{prefix}:t", "1").incr(f"{prefix}:t")
    assert execute(pipe) == [True, 2]


def test_the_hot_paths_take_the_lean_round_trip_on_a_plain_client(
    client: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStateStore(client)
    governor = RedisGovernor(client)
    spec = parse_workflow({"name": "lean", "steps": [{"name": "a", "uses": "llm", "with": {"prompt": "hi"}}]})
    for script in (*store._scripts.values(), governor._open, governor._close):
        client.script_load(script.script)
    run_id = f"{prefix}-run"
    client.hset(keys.run_key(run_id), "status", "running")

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("redis-py's own round trip")

    monkeypatch.setattr(redis.client.Pipeline, "execute", refused)
    monkeypatch.setattr(redis.Redis, "execute_command", refused)
    store.save_definition(spec)
    store.announce(run_id, "run_started", spec.name)
    assert store.run_parent(run_id) is None
    admission, cached = governor.open_call(
        run_id=run_id, model="claude-x", tokens=10, worst_case_usd=0.01, budget_usd=None, caller="t"
    )
    assert (admission.outcome, cached) == ("ok", None)
    call = Settlement(run_id, "claude-x", 10, 8, 0.01, 0.001, billed=True)
    governor.close_call(call)
    governor.pending_close(call).send()
    monkeypatch.undo()
    assert client.hget(keys.run_key(run_id), "llm_calls") == b"2"
    client.delete(keys.run_key(run_id), keys.definition_key(spec.definition_hash))
