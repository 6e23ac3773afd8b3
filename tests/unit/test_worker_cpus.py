"""``ORCH_WORKER_CPUS``: a Linux CPU list parsed with errors that name the value, checked against the CPUs the process
may use, and applied to the threads a process already has as well as those it starts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from orchestrator import Settings
from orchestrator.infra.cpus import MAX_CPU, parse_cpus, worker_cpus

linux_only = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("1", {1}), ("0,2", {0, 2}), ("1-3,6", {1, 2, 3, 6}), (" 2 - 3 ", {2, 3}), ("4,4", {4}), ("0-0", {0})],
)
def test_a_cpu_list_names_numbers_and_ranges(text: str, cpus: set[int]) -> None:
    assert parse_cpus(text) == cpus


@pytest.mark.parametrize("text", ["", "a", "1,,2", "-1", "1-", "3-1", "1.5", "0x1", f"{MAX_CPU + 1}", "99999"])
def test_anything_else_is_refused_in_one_line_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="ORCH_WORKER_CPUS") as caught:
        parse_cpus(text)
    assert "\n" not in str(caught.value)
    assert repr(text.strip()) in str(caught.value) or text.replace(" ", "") in str(caught.value)


def test_a_list_longer_than_a_cpu_list_is_refused_before_it_is_read() -> None:
    with pytest.raises(ValueError, match="ORCH_WORKER_CPUS is 300 characters"):
        parse_cpus("1," * 150)


def test_settings_refuse_a_list_that_does_not_parse_and_leave_workers_unpinned_unless_told() -> None:
    assert Settings.from_env({}).worker_cpus is None
    assert Settings.from_env({"ORCH_WORKER_CPUS": "0"}).worker_cpus == "0"
    with pytest.raises(ValueError, match="ORCH_WORKER_CPUS='one' is not a CPU list"):
        Settings.from_env({"ORCH_WORKER_CPUS": "one"})


@linux_only
def test_a_worker_may_only_be_pinned_to_cpus_it_may_use() -> None:
    allowed = os.sched_getaffinity(0)
    assert worker_cpus(None) is None
    assert worker_cpus(str(min(allowed))) == {min(allowed)}
    missing = max(allowed) + 1
    with pytest.raises(ValueError, match=f"names CPU {missing}, which this worker may not use"):
        worker_cpus(f"{min(allowed)},{missing}")


@linux_only
@pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2, reason="needs two CPUs to tell")
def test_pinning_moves_the_threads_already_running_and_those_started_later() -> None:
    cpu = min(os.sched_getaffinity(0))
    # In a process of its own: affinity is per thread and process-wide once applied.
    script = textwrap.dedent(
        f"""
        import os, threading
        from orchestrator.infra.cpus import apply_cpus, worker_cpus
        ready, done = threading.Event(), threading.Event()
        seen = {{}}
        def early():
            seen["tid"] = threading.get_native_id()
            ready.set()
            done.wait(30)
            seen["early"] = os.sched_getaffinity(0)
        thread = threading.Thread(target=early)
        thread.start()
        ready.wait(30)
        assert len(os.sched_getaffinity(seen["tid"])) == {len(os.sched_getaffinity(0))}
        apply_cpus(worker_cpus("{cpu}"))
        later = threading.Thread(target=lambda: seen.update(later=os.sched_getaffinity(0)))
        later.start()
        later.join()
        done.set()
        thread.join()
        print(sorted(os.sched_getaffinity(0)), sorted(seen["early"]), sorted(seen["later"]))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split("\n")[0] == f"[{cpu}] [{cpu}] [{cpu}]"
