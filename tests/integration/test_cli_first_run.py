"""What a newcomer meets first: URLs without a scheme, modules not imported, misspelled inputs, no worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from orchestrator import Client, Settings
from orchestrator.consumers import NO_WORKER_WARNING_S, queues_without_consumers
from orchestrator.definition.files import load_workflow_file
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.errors import InputValidationError
from tests.integration.helpers import wait_for
from tests.integration.test_cli import EXAMPLE, REPO, assert_clean_failure, footprint, orchestrator, write

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def cli(*args: str, env: dict[str, str], cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m orchestrator.cli ARGS`` in ``cwd`` with ``env`` over a bare environment (no ORCH_IMPORTS)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_") and k != "REDIS_URL"}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env={**base, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# -- URLs ----------------------------------------------------------------------------------------------------------

COMMANDS = {
    "submit": ("submit", str(EXAMPLE), "--input", "topic=x"),
    "validate": ("validate", str(EXAMPLE)),
    "worker": ("worker", "--pool=solo"),
    "api": ("api", "--port", "0"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"REDIS_URL": "127.0.0.1:6379"}, ("REDIS_URL='127.0.0.1:6379' has no scheme", "redis://127.0.0.1:6379?")),
        ({"REDIS_URL": "redis:/h:6379"}, ("REDIS_URL='redis:/h:6379' has no scheme",)),
        ({"REDIS_URL": "http://h:6379"}, ("unknown scheme http://", "rediss://", "unix://", "redis+sentinel://")),
        ({"ORCH_BROKER_URL": "127.0.0.1:5672"}, ("ORCH_BROKER_URL='127.0.0.1:5672' has no scheme", "amqp://")),
        ({"ORCH_BROKER_URL": "amqp://h//;bogus://h"}, ("ORCH_BROKER_URL='bogus://h': unknown scheme bogus://",)),
    ],
    ids=["redis-no-scheme", "redis-one-slash", "redis-unknown-scheme", "broker-no-scheme", "broker-unknown-scheme"],
)
def test_a_url_without_a_known_scheme_is_one_line_naming_it_and_the_accepted_forms(
    command: str, env: dict[str, str], needles: tuple[str, ...]
) -> None:
    proc = cli(*COMMANDS[command], env=env)

    assert_clean_failure(proc, *needles, "redis://[:PASSWORD@]HOST:6379/DB")


def test_a_password_in_a_url_without_a_scheme_is_not_printed() -> None:
    proc = cli("validate", str(EXAMPLE), env={"REDIS_URL": ":hunter2@db:6379"})

    line = assert_clean_failure(proc, "has no scheme", ":***@db:6379")
    assert "hunter2" not in line


# -- a module not imported ---------------------------------------------------------------------------------------

FLOWS = """
from orchestrator import function


@function("{package}.flows.shout")
def shout(ctx):
    return {{"text": "hi"}}
"""


@pytest.fixture
def project(tmp_path: Path, unique: str) -> tuple[Path, str]:
    """A user's project directory holding a package that registers ``PACKAGE.flows.shout``."""
    package = f"proj_{unique}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "flows.py").write_text(FLOWS.format(package=package))
    return tmp_path, package


def flow_file(directory: Path, function: str) -> str:
    return write(
        directory / "flow.yaml",
        f"name: flow\nsteps:\n  - {{name: speak, uses: python, with: {{function: {function}}}}}\n",
    )


def test_the_readme_s_validate_works_without_orch_imports_and_says_what_workers_need() -> None:
    proc = cli("validate", "examples/content_pipeline.yaml", env={})

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: content_pipeline_file version 1, 6 steps")
    assert "workers need ORCH_IMPORTS=examples.content_pipeline" in proc.stderr


def test_validate_imports_the_module_of_the_current_directory_that_registers_the_function(
    project: tuple[Path, str],
) -> None:
    root, package = project

    proc = cli("validate", flow_file(root, f"{package}.flows.shout"), env={}, cwd=root)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: flow version 1, 1 steps")


def test_a_function_missing_from_an_imported_module_is_named_with_the_closest_registered_one(
    project: tuple[Path, str],
) -> None:
    root, package = project

    proc = cli("validate", flow_file(root, f"{package}.flows.shuot"), env={}, cwd=root)

    assert_clean_failure(
        proc,
        f"step 'speak': no registered function '{package}.flows.shuot'",
        f"module {package}.flows is imported but registers no function by that name",
        f"did you mean '{package}.flows.shout'?",
    )


def test_a_module_outside_the_current_directory_is_never_imported_and_the_error_says_how_to_register(
    project: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    root, package = project
    elsewhere = tmp_path_factory.mktemp("elsewhere")

    proc = cli("validate", flow_file(root, f"{package}.flows.shout"), env={}, cwd=elsewhere)

    assert_clean_failure(proc, "register it with @orchestrator.function and list its module in ORCH_IMPORTS")


# -- a misspelled input --------------------------------------------------------------------------------------------

MISSPELLED = "input 'topc' is not an input of workflow 'typed_{unique}'; did you mean 'topic'?"


@pytest.fixture
def typed_file(tmp_path: Path, unique: str) -> str:
    return write(
        tmp_path / "typed.yaml",
        f"name: typed_{unique}\ninputs:\n  topic: {{type: string}}\nsteps:\n  - {{name: only, uses: noop}}\n",
    )


def test_a_misspelled_input_on_the_command_line_is_named_with_the_close_match(
    redis_url: str, redis_client: redis.Redis, typed_file: str, unique: str
) -> None:
    before = footprint(redis_client)

    proc = orchestrator("submit", typed_file, "--input", "topc=x", redis_url=redis_url)

    assert_clean_failure(proc, MISSPELLED.format(unique=unique), "(the workflow declares: topic)")
    assert footprint(redis_client) == before


def test_client_submit_names_a_misspelled_input_with_the_close_match(
    client: Client, typed_file: str, unique: str
) -> None:
    with pytest.raises(InputValidationError) as info:
        client.submit(load_workflow_file(typed_file), {"topc": "x"})

    assert str(info.value).startswith(MISSPELLED.format(unique=unique))


# -- nobody reads the queue ----------------------------------------------------------------------------------------


def test_submit_wait_on_a_queue_no_worker_reads_says_so_once_and_keeps_waiting(
    redis_url: str, workers: LocalWorkers, tmp_path: Path, unique: str
) -> None:
    queue = f"nobody_{unique}"
    path = write(
        tmp_path / "idle.yaml", f"name: idle_{unique}\nsteps:\n  - {{name: only, uses: noop, queue: {queue}}}\n"
    )
    env = {"REDIS_URL": redis_url, "PYTHONPATH": str(REPO)}
    stderr = tmp_path / "stderr"
    with stderr.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "submit", path, "--wait"],
            env={**os.environ, **env},
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            text=True,
        )
    try:
        started = time.monotonic()
        line = wait_for(
            lambda: next((x for x in stderr.read_text().splitlines() if x.startswith("warning:")), None),
            timeout=NO_WORKER_WARNING_S + 20,
            what="the no-worker warning",
        )
        assert time.monotonic() - started >= NO_WORKER_WARNING_S - 0.5
        assert f"no worker consumes queue '{queue}'" in line
        assert f"orchestrator worker -Q {queue}" in line
        assert proc.poll() is None, "it keeps waiting"
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert len(stderr.read_text().splitlines()) == 1, stderr.read_text()


def test_busy_workers_still_count_as_consuming_their_queues(
    workers: LocalWorkers, client: Client, settings: Settings, unique: str
) -> None:
    steps = [
        {"name": f"s{i}", "uses": "python", "with": {"function": "tests.sleep", "args": {"seconds": 3}}}
        for i in range(4)
    ]
    run_id = client.submit({"name": f"busy_{unique}", "steps": steps})
    wait_for(lambda: all(s["started_at"] for s in client.status(run_id)["steps"].values()), what="4 busy slots")

    assert queues_without_consumers(client.app, [settings.cpu_queue, settings.llm_queue, f"nobody_{unique}"]) == [
        f"nobody_{unique}"
    ]
    client.wait(run_id, timeout=30)
