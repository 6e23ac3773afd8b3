"""``docker-compose.yml`` and the ``Dockerfile``, checked without a container engine.

The compose spec's JSON schema catches malformed files; the cross-references it cannot see (services named in
``depends_on``, modules named on command lines, files the image copies) are checked here against the repository.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
PYPROJECT = REPO_ROOT / "pyproject.toml"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(compose, dict)
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def _argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    # Compose splits a string command like a POSIX shell would, without running one.
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def _module_exists(dotted: str) -> bool:
    path = REPO_ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _celery_app_module(argv: list[str]) -> str | None:
    """The module named by ``-A``/``--app`` when ``argv`` runs celery, else ``None``."""
    if not argv or argv[0] != "celery":
        return None
    for index, arg in enumerate(argv[1:], start=1):
        if arg in {"-A", "--app"} and index + 1 < len(argv):
            return argv[index + 1].split(":")[0]
        if arg.startswith("--app="):
            return arg.split("=", 1)[1].split(":")[0]
    return None


def test_the_redis_worker_and_flower_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "worker", "flower"} <= services.keys()


def test_redis_keeps_an_append_only_file_on_a_volume(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    argv = _argv(redis)
    assert argv[0] == "redis-server"
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert "--requirepass" in argv
    assert any(str(volume).endswith(":/data") for volume in redis.get("volumes", []))
    assert "healthcheck" in redis


def test_the_worker_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed container name makes --scale worker=N fail"
    assert not worker.get("ports"), "a fixed host port makes --scale worker=N fail"


def test_every_depends_on_names_an_existing_service(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency!r}"
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_workers_and_flower_reach_redis_through_its_service_name(services: dict[str, dict[str, Any]]) -> None:
    for name in ("worker", "flower"):
        url = _environment(services[name])["REDIS_URL"]
        assert urlsplit(url).hostname in services, f"{name}'s REDIS_URL points outside the compose project"


def test_every_celery_app_named_on_a_command_line_exists(services: dict[str, dict[str, Any]]) -> None:
    named = {name: module for name, service in services.items() if (module := _celery_app_module(_argv(service)))}
    assert named, "flower, at least, runs celery -A"
    for name, module in named.items():
        assert _module_exists(module), f"{name} runs celery -A {module}, which is not a module in the repository"


def test_the_orchestrator_command_is_the_declared_console_script(services: dict[str, dict[str, Any]]) -> None:
    users = [name for name, service in services.items() if _argv(service)[:1] == ["orchestrator"]]
    assert "worker" in users
    if not PYPROJECT.exists():
        pytest.skip("pyproject.toml does not exist yet, so the console script cannot be checked")
    scripts = tomllib.loads(PYPROJECT.read_text(encoding="utf-8")).get("project", {}).get("scripts", {})
    assert "orchestrator" in scripts, "docker-compose.yml runs `orchestrator`, which pyproject does not declare"
    target_module = scripts["orchestrator"].split(":")[0]
    assert _module_exists(target_module), f"the orchestrator script points at missing module {target_module}"


def test_imported_workflow_modules_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for module in filter(None, _environment(service).get("ORCH_IMPORTS", "").split(",")):
            assert _module_exists(module.strip()), f"{name} imports {module}, which is not in the repository"


def test_flower_demands_basic_auth(services: dict[str, dict[str, Any]]) -> None:
    argv = _argv(services["flower"])
    auth = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--basic-auth=")]
    assert auth, "Flower's API would be open to anyone who reaches the port"
    user, _, password = auth[0].partition(":")
    assert user
    assert password
    assert services["flower"].get("ports")


def test_the_compose_file_matches_the_compose_spec() -> None:
    if importlib.util.find_spec("check_jsonschema") is None:
        message = "check-jsonschema is not installed (it is in the dev extra)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_the_image_runs_as_a_non_root_user_and_starts_a_worker() -> None:
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users
    assert users[-1] not in {"root", "0"}
    cmds = [rest for keyword, rest in instructions if keyword == "CMD"]
    assert cmds[-1] == '["orchestrator", "worker"]'


def test_every_file_the_image_copies_exists() -> None:
    if not PYPROJECT.exists():
        pytest.skip("pyproject.toml does not exist yet; the image cannot be built before it does")
    for keyword, rest in _dockerfile_instructions():
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        sources = [arg for arg in shlex.split(rest) if not arg.startswith("--")][:-1]
        for source in sources:
            if re.search(r"[*?\[]", source):
                continue
            assert (REPO_ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
