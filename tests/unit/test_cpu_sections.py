"""The benchmark's CPU accounting by section (``bench_load --cpu-sections``): wrapping, totals, the per-call figures."""

from __future__ import annotations

import sys
import threading
import time
import types
from pathlib import Path

import pytest

from scripts.harness.cpu_sections import Section, install, parse_sections, per_llm_call, read_totals

pytestmark = pytest.mark.timeout(30)


class _Client:
    def complete(self, rounds: int) -> int:
        return sum(i * i for i in range(rounds))

    @staticmethod
    def plain(value: int) -> int:
        return value + 1

    @classmethod
    def named(cls, value: int) -> str:
        return f"{cls.__name__}:{value}"


def _spin(rounds: int) -> int:
    return sum(i for i in range(rounds))


@pytest.fixture
def target(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("sections_target")
    module.Client = type("Client", (_Client,), {})  # type: ignore[attr-defined]
    module.spin = _spin  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


SECTIONS = (
    Section("sdk_call", "sections_target", "Client.complete"),
    Section("spin", "sections_target", "spin"),
    Section("threads_only", "sections_target", "spin", threads_only=True),
)


def test_each_thread_s_calls_and_cpu_add_up_and_reach_the_file(target: types.ModuleType, tmp_path: Path) -> None:
    accounting = install(tmp_path, SECTIONS, argv=["celery", "worker", "--pool=prefork", "--queues=llm,other"])
    try:

        def work() -> None:
            client = target.Client()
            for _ in range(5):
                client.complete(20_000)
            target.spin(1)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        totals = accounting.totals()
        assert totals["sdk_call"][1] == 20
        assert totals["spin"][1] == 4
        assert "threads_only" not in totals  # a prefork worker: the function is left as it was
        assert totals["sdk_call"][0] > totals["spin"][0] > 0
        written = read_totals(tmp_path, "llm", newer_than=time.time())
        assert written["sections"]["sdk_call"][1] == 20
        assert written["process_cpu_s"] > 0
    finally:
        accounting.stop()


def test_a_threads_worker_also_gets_the_threads_only_sections(target: types.ModuleType, tmp_path: Path) -> None:
    accounting = install(tmp_path, SECTIONS, argv=["--pool=threads", "--queues=llm"])
    try:
        target.spin(10)
        assert accounting.totals()["threads_only"][1] == 1
        assert accounting.totals()["spin"][1] == 1  # the wrapper inside the other wrapper
    finally:
        accounting.stop()


def test_waiting_for_a_queue_no_worker_serves_times_out(target: types.ModuleType, tmp_path: Path) -> None:
    accounting = install(tmp_path, SECTIONS, argv=["--queues=cpu"])
    try:
        with pytest.raises(TimeoutError, match="'llm'"):
            read_totals(tmp_path, "llm", newer_than=time.time(), timeout_s=0.3)
    finally:
        accounting.stop()


def test_figures_are_per_llm_call_between_two_readings() -> None:
    before = {"process_cpu_s": 10.0, "sections": {"sdk_call": [1.0, 100], "finish": [0.5, 100], "idle": [1.0, 3]}}
    after = {
        "process_cpu_s": 12.5,
        "sections": {"sdk_call": [2.2, 1100], "finish": [0.85, 1100], "publish": [0.1, 250], "idle": [1.0, 3]},
    }
    figures = per_llm_call(before, after)
    assert figures["llm_calls"] == 1000
    assert figures["process_ms"] == 2.5
    assert figures["sections"] == {
        "sdk_call": {"ms": 1.2, "calls": 1.0},
        "finish": {"ms": 0.35, "calls": 1.0},
        "publish": {"ms": 0.1, "calls": 0.25},
    }
    assert per_llm_call(after, after) == {"llm_calls": 0}


def test_more_sections_are_read_from_label_module_attr() -> None:
    assert parse_sections(" pack=orchestrator.infra.redis_roundtrip:_pack, open=a.b:C.d ,") == (
        Section("pack", "orchestrator.infra.redis_roundtrip", "_pack"),
        Section("open", "a.b", "C.d"),
    )
    assert parse_sections("") == ()
    with pytest.raises(ValueError, match=r"'pack=orchestrator\.infra'"):
        parse_sections("pack=orchestrator.infra")


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--section", "pack=a:b"], "--section goes with --cpu-sections"),
        (["--cpu-sections", "--section", "pack=a"], "a section is LABEL=MODULE:ATTR, not 'pack=a'"),
        (["--cpu-sections", "--pools", "threads"], "--cpu-sections measures the load, not --pools"),
    ],
)
def test_the_load_benchmark_refuses_sections_it_cannot_measure(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from scripts.bench_load import parse_args

    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(error)


def test_the_load_benchmark_passes_its_sections_to_the_workers() -> None:
    from scripts.bench_load import IMPORTS, parse_args

    cfg = parse_args(["--cpu-sections", "--section", "pack=orchestrator.infra.redis_roundtrip:_pack"])
    assert cfg.cpu_sections
    assert cfg.worker_env["ORCH_IMPORTS"] == f"{IMPORTS},scripts.harness.cpu_sections"
    assert cfg.worker_env["ORCH_BENCH_SECTIONS_MORE"] == "pack=orchestrator.infra.redis_roundtrip:_pack"
    assert cfg.worker_env["ORCH_BENCH_SECTIONS"].endswith("bench-load-sections")


def test_static_and_class_methods_stay_what_they_were(target: types.ModuleType, tmp_path: Path) -> None:
    sections = (
        Section("plain", "sections_target", "Client.plain"),
        Section("named", "sections_target", "Client.named"),
    )
    accounting = install(tmp_path, sections, argv=[])
    try:
        client = target.Client()
        assert client.plain(1) == target.Client.plain(1) == 2
        assert client.named(3) == target.Client.named(3) == "Client:3"
        assert accounting.totals()["plain"][1] == 2
        assert accounting.totals()["named"][1] == 2
    finally:
        accounting.stop()
