"""``bench_load``'s llm deployment: one threads process per CPU by default, the slots shared out between them."""

from __future__ import annotations

import pytest

from scripts import bench_load

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_load, "available_cpus", lambda: 3)


@pytest.mark.usefixtures("cpus")
def test_the_llm_worker_is_a_process_per_cpu_sharing_500_slots() -> None:
    cfg = bench_load.parse_args([])
    assert (cfg.llm_workers, cfg.llm_concurrency) == (3, 167)  # 501 slots: no process is left a slot short


@pytest.mark.usefixtures("cpus")
def test_quick_shares_200_slots() -> None:
    cfg = bench_load.parse_args(["--quick"])
    assert (cfg.llm_workers, cfg.llm_concurrency) == (3, 67)


@pytest.mark.usefixtures("cpus")
@pytest.mark.parametrize(
    ("argv", "deployment"),
    [
        (["--llm-workers", "1"], (1, 500)),  # the one process of 500 threads, as before
        (["--llm-workers", "2", "--llm-concurrency", "250"], (2, 250)),  # --llm-concurrency is each process's
        (["--llm-concurrency", "100"], (3, 100)),
    ],
)
def test_explicit_flags_keep_their_meaning(argv: list[str], deployment: tuple[int, int]) -> None:
    cfg = bench_load.parse_args(argv)
    assert (cfg.llm_workers, cfg.llm_concurrency) == deployment


@pytest.mark.parametrize(("flag", "value"), [("--llm-workers", "0"), ("--llm-concurrency", "0")])
def test_no_process_or_slot_is_refused_in_one_line(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_load.parse_args([flag, value])
    assert f"{flag} must be at least 1, not 0" in capsys.readouterr().err


def test_available_cpus_is_this_process_s_affinity() -> None:
    import os

    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert bench_load.available_cpus() == expected
