"""Microbenchmarks of a worker's CPU for three things issue 17 trimmed: publishing step messages, a run's end, and
reading an LLM reply.

``publish``: CPU per published message, Celery canvas (``Signature.apply_async`` / ``group.apply_async``, what the
publisher did before) against the direct path (``CeleryPublisher._send``), alternated in one process, as a worker
sends them: its step task registered, a step running. Messages go to a private Redis (the broker), emptied between
rounds.

``run-end``: CPU per single-step run, start excluded: claim, the step, its finish and the run's end, on a private Redis
through the engine (``execute_attempt``) with the run's deadline set. Run once per code version (``PYTHONPATH`` picks
the tree) and compare; round trips per run are counted too.

``llm-reply``: CPU per LLM call through the offline provider (the real Anthropic SDK over an in-process transport, no
simulated latency), the reply read by the SDK's own parse (``messages.create``, what the client did before) against
the client's (``AnthropicClient.complete``: pydantic validates the reply's bytes), alternated in one process.

    python -m scripts.bench_micro publish [--rounds 15] [--n 400]
    python -m scripts.bench_micro run-end [--rounds 15] [--n 200]
    python -m scripts.bench_micro llm-reply [--rounds 15] [--n 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import redis
from redis.client import Pipeline

from orchestrator.dev.redis_server import RedisServer


def _cpu(work: Callable[[], None]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


class _Buffered:
    """A worker's buffering task-event dispatcher, dropping what it is given."""

    enabled = True
    buffer_group = ("task",)

    def send(self, type: str, **fields: Any) -> None:
        pass


def bench_publish(rounds: int, n: int) -> dict[str, Any]:
    from celery import _state

    from orchestrator.celery_app import STEP_TASK, CeleryPublisher, create_app
    from orchestrator.definition.spec import parse_workflow
    from orchestrator.infra.settings import Settings
    from workers.tasks import StepTask

    with RedisServer() as server:
        settings = Settings.from_env({"REDIS_URL": server.url})
        app = create_app(settings)

        def run_step(self: StepTask, *args: Any, **kwargs: Any) -> str:
            return ""

        app.task(bind=True, base=StepTask, name=STEP_TASK, shared=False)(run_step)
        # A worker's task-sent events go out with its own buffered ones (workers/consumer.py): buffered for nothing.
        buffered = _Buffered()
        app.amqp.buffered_events = lambda: buffered  # type: ignore[attr-defined]
        task = app.tasks[STEP_TASK]
        task.push_request(id="running", root_id="root", delivery_info={}, called_directly=False)
        cast(Any, _state)._task_stack.push(task)  # a step running: what it sends has it for root and parent
        spec = parse_workflow(
            {
                "name": "bench",
                "steps": [
                    {"name": "draft", "uses": "noop"},
                    *({"name": f"s{i}", "uses": "noop", "depends_on": ["draft"]} for i in range(4)),
                ],
            }
        )
        publisher = CeleryPublisher(app, settings)
        broker = redis.Redis.from_url(server.url)
        paths = {"canvas": publisher._send_canvas, "direct": publisher._send}
        shapes = {"one": ("s0",), "group4": ("s0", "s1", "s2", "s3")}
        per_message: dict[str, list[float]] = {f"{p}/{s}": [] for p in paths for s in shapes}
        for _ in range(rounds):
            for shape, steps in shapes.items():
                for name, send in paths.items():
                    publisher._send = send  # type: ignore[method-assign]

                    def work(steps: tuple[str, ...] = steps) -> None:
                        for _ in range(n):
                            ids = {step: uuid.uuid4().hex for step in steps}
                            publisher.publish(spec, run_id="r", steps=steps, generation="1", task_ids=ids)

                    per_message[f"{name}/{shape}"].append(_cpu(work) / (n * len(steps)) * 1e6)
                    broker.flushdb()
        return {
            "us_cpu_per_message_median": {k: round(statistics.median(v), 1) for k, v in per_message.items()},
            "rounds": rounds,
            "publishes_per_round": n,
        }


def bench_run_end(rounds: int, n: int) -> dict[str, Any]:
    from orchestrator.domain import Attempt
    from orchestrator.engine.attempt import execute_attempt
    from orchestrator.engine.runtime import build_runtime
    from orchestrator.state import RedisStateStore
    from tests.unit.test_engine_attempt import SETTINGS, RecordingPublisher, start, workflow

    trips = [0]
    execute: Any = Pipeline.execute
    command: Any = redis.Redis.execute_command

    def counted_execute(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        trips[0] += 1
        return execute(self, *args, **kwargs)

    def counted_command(self: redis.Redis, *args: Any, **kwargs: Any) -> Any:
        trips[0] += 1
        return command(self, *args, **kwargs)

    Pipeline.execute = counted_execute  # type: ignore[method-assign]
    redis.Redis.execute_command = counted_command  # type: ignore[method-assign]
    with RedisServer() as server:
        store = RedisStateStore(redis.Redis.from_url(server.url), retention_s=600)
        publisher = RecordingPublisher()
        runtime = build_runtime(SETTINGS, publisher, store=store)
        definition = {**workflow({"name": "only", "uses": "noop"}), "timeout_s": 3600}
        per_run: list[float] = []
        trips_per_run: list[float] = []
        for _ in range(rounds):
            for _ in range(n):
                start(runtime, publisher, definition)
            messages, publisher.sent = publisher.sent, []
            trips[0] = 0

            def work(messages: list[Any] = messages) -> None:
                for m in messages:
                    execute_attempt(runtime, Attempt(m.run_id, m.step, m.generation, m.task_id), m.definition_hash)

            per_run.append(_cpu(work) / n * 1e6)
            trips_per_run.append(trips[0] / n)
        return {
            "us_cpu_per_run_median": round(statistics.median(per_run), 1),
            "round_trips_per_run": round(statistics.median(trips_per_run), 2),
            "rounds": rounds,
            "runs_per_round": n,
            "tree": os.environ.get("PYTHONPATH", ""),
        }


def bench_llm_reply(rounds: int, n: int) -> dict[str, Any]:
    from orchestrator.llm.anthropic import _to_response
    from orchestrator.llm.base import LLMRequest
    from orchestrator.llm.offline import OfflineClient

    client = OfflineClient()
    # A blog post step's call: a prompt of some 2 KB, a reply of up to 900 tokens.
    prompt = "Write a blog post from:\n" + "a fact " * 300
    request = LLMRequest(model="claude-sonnet-4-5", prompt=prompt, max_tokens=900)
    sdk: Any = client._sdk
    arguments = {"model": request.model, "max_tokens": request.max_tokens}
    messages = [{"role": "user", "content": request.prompt}]

    def sdk_parse() -> None:
        message = sdk.messages.create(**arguments, messages=messages)
        _to_response(message, message._request_id)

    def ours() -> None:
        client.complete(request)

    paths: dict[str, Callable[[], None]] = {"sdk_parse": sdk_parse, "ours": ours}
    per_call: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, call in paths.items():

            def work(call: Callable[[], None] = call) -> None:
                for _ in range(n):
                    call()

            per_call[name].append(_cpu(work) / n * 1e6)
    return {
        "us_cpu_per_call_median": {k: round(statistics.median(v), 1) for k, v in per_call.items()},
        "rounds": rounds,
        "calls_per_round": n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=["publish", "run-end", "llm-reply"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--n", type=int, default=0, help="publishes, runs or calls per round (default 400 / 200 / 300)")
    args = parser.parse_args()
    if args.scenario == "publish":
        result = bench_publish(args.rounds, args.n or 400)
    elif args.scenario == "llm-reply":
        result = bench_llm_reply(args.rounds, args.n or 300)
    else:
        result = bench_run_end(args.rounds, args.n or 200)
    result["load_average"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
