"""``docker-compose.yml``, its Prometheus, Grafana and collector files and the ``Dockerfile``, checked offline.

The compose spec's JSON schema catches malformed files. What it cannot see is checked here against the repository:
services named in ``depends_on``, commands and modules named on command lines, the variables the file requires, the
ports Prometheus scrapes, the files Grafana provisions, and the files the image copies (by building a wheel from
exactly those). Variables are substituted the way Compose does (``${VAR:-default}``, ``${VAR:?error}``, ``$$``) before
anything is compared, so the checks see what ``docker compose config`` would.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from orchestrator.api.auth import ApiAuth, ApiConfigError, check_bind
from orchestrator.cli import main as cli
from orchestrator.infra.settings import Settings

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
PYPROJECT = REPO_ROOT / "pyproject.toml"
PROMETHEUS_FILE = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"

ORCHESTRATOR_SERVICES = {"worker-llm", "worker-cpu", "sweeper", "api", "flower"}
WORKERS = {"worker-llm", "worker-cpu"}
SCALABLE = {*WORKERS, "sweeper"}
MONITORING = {"prometheus", "grafana", "otel-collector"}
COLLECTOR_FILE = REPO_ROOT / "deploy" / "otel-collector" / "config.yaml"
# Images with nothing but their program inside (no shell, no HTTP client): no healthcheck can run in them.
UNPROBEABLE = {"otel-collector"}

# The variables without which `docker compose up` must refuse to start, with stand-in values.
REQUIRED_ENV = {
    "REDIS_PASSWORD": "redis-secret",
    "FLOWER_PASSWORD": "flower-secret",
    "ORCH_API_TOKENS": json.dumps(
        {
            "tok-ops": {"principal": "ops", "scopes": ["read", "write", "approve"]},
            "tok-prometheus": {"principal": "prometheus", "scopes": ["read"]},
        }
    ),
}

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariableError(Exception):
    """A ``${VAR:?…}`` whose variable is unset, as Compose reports it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"required variable {name} is missing a value")
        self.name = name


def _substitute(text: str, env: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        value, op = env.get(name), match["op"]
        if op is None:
            return value or ""
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return match["arg"] if unset else str(value)
        if unset:
            raise MissingVariableError(name)
        return str(value)

    return _VARIABLE.sub(one, text)


def _interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """``node`` with every string value substituted (Compose leaves keys alone)."""
    if isinstance(node, str):
        return _substitute(node, env)
    if isinstance(node, dict):
        return {key: _interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate(value, env) for value in node]
    return node


def _raw_compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    """The services as ``docker compose config`` would print them with only the required variables set."""
    resolved = _interpolate(_raw_compose(), REQUIRED_ENV)
    found = resolved["services"]
    assert isinstance(found, dict)
    return found


def _argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    # Compose splits a string command like a POSIX shell would, without running one.
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def _option(argv: list[str], *names: str) -> str | None:
    """The value of a command-line option given as ``--name value``, ``--name=value`` or ``-n value``."""
    for index, arg in enumerate(argv):
        for name in names:
            if arg == name and index + 1 < len(argv):
                return argv[index + 1]
            if name.startswith("--") and arg.startswith(f"{name}="):
                return arg.split("=", 1)[1]
    return None


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def _container_ports(service: dict[str, Any]) -> set[int]:
    """Ports the service listens on: published container ports, ``--port`` and the metrics port."""
    ports = {int(str(mapping).rsplit(":", 1)[-1].split("/")[0]) for mapping in service.get("ports", [])}
    if (port := _option(_argv(service), "--port")) is not None:
        ports.add(int(port))
    if metrics := _environment(service).get("ORCH_METRICS_PORT"):
        ports.add(int(metrics))
    return ports


def _bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path → host path (relative to the repository) of each bind mount."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if source.startswith((".", "/")):
            mounts[target] = source
    return mounts


def _module_exists(dotted: str) -> bool:
    path = REPO_ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _celery_app_module(argv: list[str]) -> str | None:
    """The module named by ``-A``/``--app`` when ``argv`` runs celery, else ``None``."""
    if not argv or argv[0] != "celery":
        return None
    app = _option(argv, "-A", "--app")
    return app.split(":")[0] if app else None


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    # ["CMD", arg, …] or ["CMD-SHELL", "a shell command"]: the command, without the marker.
    return test if isinstance(test, str) else " ".join(str(part) for part in test[1:])


# The compose file as a whole


def test_the_compose_file_matches_the_compose_spec() -> None:
    if importlib.util.find_spec("check_jsonschema") is None:
        message = "check-jsonschema is not installed (it is in the dev extra)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
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


def test_every_service_of_the_deployment_exists(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", *ORCHESTRATOR_SERVICES, *MONITORING} <= services.keys()


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    values = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return [text for value in values for text in _strings(value)]


def test_the_required_variables_are_exactly_the_core_secrets() -> None:
    matches = [match for text in _strings(_raw_compose()) for match in _VARIABLE.finditer(text)]
    required = {match["braced"] for match in matches if (match["op"] or "").endswith("?")}
    assert required == REQUIRED_ENV.keys()
    for name in REQUIRED_ENV:
        without = {key: value for key, value in REQUIRED_ENV.items() if key != name}
        with pytest.raises(MissingVariableError) as missing:
            _interpolate(_raw_compose(), without)
        assert missing.value.name == name


def test_the_core_secrets_alone_let_compose_load_every_profile() -> None:
    # Compose substitutes variables in every service before it applies profiles: a `${VAR:?}` that only a profiled
    # service uses would stop a plain `docker compose up`. So the profiled services' variables must have defaults.
    resolved = _interpolate(_raw_compose(), REQUIRED_ENV)
    profiled = {name for name, service in resolved["services"].items() if service.get("profiles")}
    assert profiled >= MONITORING


def test_secrets_have_no_default_values(services: dict[str, dict[str, Any]]) -> None:
    redis_argv = _argv(services["redis"])
    assert redis_argv[redis_argv.index("--requirepass") + 1] == REQUIRED_ENV["REDIS_PASSWORD"]
    for name in ORCHESTRATOR_SERVICES:
        assert urlsplit(_environment(services[name])["REDIS_URL"]).password == REQUIRED_ENV["REDIS_PASSWORD"]


# Redis, workers and the sweeper


def test_redis_keeps_an_append_only_file_on_a_volume(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    argv = _argv(redis)
    assert argv[0] == "redis-server"
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert any(str(volume).endswith(":/data") for volume in redis.get("volumes", []))


def test_llm_steps_run_on_a_threads_pool_and_the_rest_on_prefork(services: dict[str, dict[str, Any]]) -> None:
    llm_argv, cpu_argv = _argv(services["worker-llm"]), _argv(services["worker-cpu"])
    settings = Settings.from_env(_environment(services["worker-llm"]))
    assert llm_argv[:2] == cpu_argv[:2] == ["orchestrator", "worker"]
    assert _option(llm_argv, "-Q", "--queues") == settings.llm_queue
    assert _option(cpu_argv, "-Q", "--queues") == settings.cpu_queue
    assert _option(llm_argv, "-P", "--pool") == "threads"
    assert _option(cpu_argv, "-P", "--pool") == "prefork"
    # LLM calls wait on the network, so one process holds many of them at once.
    assert int(_option(llm_argv, "-c", "--concurrency") or 0) >= 20


def test_workers_and_the_sweeper_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    for name in SCALABLE:
        assert "container_name" not in services[name], f"a fixed container name makes --scale {name}=N fail"
        assert not services[name].get("ports"), f"a fixed host port makes --scale {name}=N fail"


def test_the_sweeper_runs_the_sweeper_command_and_its_healthcheck_reads_its_heartbeat(
    services: dict[str, dict[str, Any]],
) -> None:
    argv = _argv(services["sweeper"])
    assert argv[:2] == ["orchestrator", "sweeper"]
    heartbeat = _option(argv, "--heartbeat-file")
    assert heartbeat
    assert heartbeat in _healthcheck_text(services["sweeper"])


def test_every_service_running_orchestrator_code_shares_the_image_and_the_environment(
    services: dict[str, dict[str, Any]],
) -> None:
    shared = _interpolate(_raw_compose()["x-orchestrator-env"], REQUIRED_ENV)
    runs_our_code = {name for name, service in services.items() if _argv(service)[:1] in (["orchestrator"], ["celery"])}
    assert runs_our_code == ORCHESTRATOR_SERVICES
    for name in runs_our_code:
        env = _environment(services[name])
        assert {key: env.get(key) for key in shared} == shared, f"{name} does not use the shared environment"
        assert services[name]["build"] == "."
        assert services[name]["image"] == services["worker-llm"]["image"]
    # An empty ORCH_BROKER_URL means the Redis of REDIS_URL, not a broker at "".
    settings = Settings.from_env(shared)
    assert settings.effective_broker_url == settings.redis_url


def test_services_reach_redis_through_its_service_name(services: dict[str, dict[str, Any]]) -> None:
    for name in ORCHESTRATOR_SERVICES:
        url = _environment(services[name])["REDIS_URL"]
        assert urlsplit(url).hostname in services, f"{name}'s REDIS_URL points outside the compose project"


def test_every_depends_on_names_a_service_and_waits_for_redis(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency!r}"
    for name in ORCHESTRATOR_SERVICES:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_an_always_on_service_needs_a_profiled_one_only_when_that_profile_is_on(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        if service.get("profiles"):
            continue
        depends_on = service.get("depends_on", {})
        for dependency in depends_on:
            if services[dependency].get("profiles"):
                assert isinstance(depends_on, dict)
                assert depends_on[dependency].get("required") is False, f"{name} needs profiled {dependency}"


def test_monitoring_runs_only_under_its_profile(services: dict[str, dict[str, Any]]) -> None:
    in_profile = {name for name, service in services.items() if "monitoring" in service.get("profiles", [])}
    assert in_profile == MONITORING


# Commands, modules and health


def test_every_orchestrator_subcommand_named_exists(services: dict[str, dict[str, Any]]) -> None:
    scripts = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["orchestrator"] == "orchestrator.cli:main"
    for name, service in services.items():
        argv = _argv(service)
        if argv[:1] == ["orchestrator"]:
            assert argv[1] in cli.commands, f"{name} runs `orchestrator {argv[1]}`, which the CLI does not have"


def test_every_celery_app_named_on_a_command_line_exists(services: dict[str, dict[str, Any]]) -> None:
    named = {name: module for name, service in services.items() if (module := _celery_app_module(_argv(service)))}
    named |= {
        f"{name} healthcheck": module
        for name, service in services.items()
        if "healthcheck" in service and (module := _celery_app_module(shlex.split(_healthcheck_text(service))))
    }
    assert {"flower", "worker-llm healthcheck", "worker-cpu healthcheck"} <= named.keys()
    for name, module in named.items():
        assert _module_exists(module), f"{name} runs celery -A {module}, which is not a module in the repository"


def test_imported_workflow_modules_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for module in filter(None, _environment(service).get("ORCH_IMPORTS", "").split(",")):
            assert _module_exists(module.strip()), f"{name} imports {module}, which is not in the repository"


def test_every_long_running_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in UNPROBEABLE:
            assert "healthcheck" not in service, f"{name}'s image cannot run a healthcheck"
            continue
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert not check.get("disable")
        assert check["test"][0] in {"CMD", "CMD-SHELL"}


def test_healthchecks_ask_the_service_itself(services: dict[str, dict[str, Any]]) -> None:
    for name in WORKERS:
        # $$ reaches the container's shell as $: each replica pings its own node, celery@<container hostname>.
        assert services[name]["healthcheck"]["test"][0] == "CMD-SHELL"
        assert re.search(r"ping --destination \"?celery@\$HOSTNAME\b", _healthcheck_text(services[name]))
    for name, path in (("api", "/healthz"), ("flower", "/healthcheck")):
        port = int(_option(_argv(services[name]), "--port") or 0)
        assert f"http://127.0.0.1:{port}{path}" in _healthcheck_text(services[name])


def test_the_api_listens_beyond_loopback_with_tokens_and_would_refuse_without(
    services: dict[str, dict[str, Any]],
) -> None:
    host = _option(_argv(services["api"]), "--host")
    assert host == "0.0.0.0"
    auth = ApiAuth.from_env(_environment(services["api"]))
    check_bind(host, auth)
    with pytest.raises(ApiConfigError):
        check_bind(host, ApiAuth())


def test_flower_demands_basic_auth(services: dict[str, dict[str, Any]]) -> None:
    auth = _option(_argv(services["flower"]), "--basic-auth")
    assert auth, "Flower's API would be open to anyone who reaches the port"
    user, _, password = auth.partition(":")
    assert user
    assert password == REQUIRED_ENV["FLOWER_PASSWORD"]
    assert services["flower"].get("ports")


def test_every_bind_mounted_file_exists(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for source in _bind_mounts(service).values():
            assert (REPO_ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


# Prometheus and Grafana


def _prometheus_config() -> dict[str, Any]:
    loaded = yaml.safe_load(PROMETHEUS_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _jobs() -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in _prometheus_config()["scrape_configs"]}


def test_prometheus_loads_the_repository_config(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    script = " ".join(_argv(prometheus))
    config_path = re.search(r"--config\.file=(\S+)", script)
    assert config_path
    assert _bind_mounts(prometheus)[config_path[1]] == "./deploy/prometheus/prometheus.yml"


def test_prometheus_scrapes_targets_that_exist_on_ports_they_serve(services: dict[str, dict[str, Any]]) -> None:
    for name, job in _jobs().items():
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                service = "prometheus" if host == "localhost" else host
                assert service in services, f"job {name} scrapes {host}, which is not a service"
                assert int(port) in _container_ports(services[service]), f"job {name}: {service} serves no {port}"
        for dns in job.get("dns_sd_configs", []):
            assert dns["type"] == "A"
            for host in dns["names"]:
                assert host in services, f"job {name} looks up {host}, which is not a service"
                assert int(dns["port"]) in _container_ports(services[host]), f"job {name}: {host} serves no port"


def test_prometheus_finds_every_replica_of_every_worker_by_dns(services: dict[str, dict[str, Any]]) -> None:
    looked_up = {host for job in _jobs().values() for dns in job.get("dns_sd_configs", []) for host in dns["names"]}
    assert looked_up == WORKERS
    for name in WORKERS:
        assert _environment(services[name]).get("ORCH_METRICS_PORT"), f"{name} serves no metrics"


def test_prometheus_sends_the_api_a_token_it_writes_itself(services: dict[str, dict[str, Any]]) -> None:
    api_jobs = [
        job
        for job in _jobs().values()
        for static in job.get("static_configs", [])
        if any(target.startswith("api:") for target in static["targets"])
    ]
    assert len(api_jobs) == 1
    authorization = api_jobs[0]["authorization"]
    assert authorization.get("type", "Bearer") == "Bearer"
    token_file = authorization["credentials_file"]
    prometheus = services["prometheus"]
    script = " ".join(_argv(prometheus))
    written = re.search(r'printf %s "\$(\w+)" > (\S+)', script)
    assert written, "the prometheus service does not write the token file"
    assert written[2] == token_file
    assert str(PurePosixPath(token_file).parent) in prometheus["tmpfs"], "the token would be written to the image"
    # The token comes from PROMETHEUS_API_TOKEN, which must be a read token of the API.
    raw_env = _raw_compose()["services"]["prometheus"]["environment"]
    assert re.fullmatch(r"\$\{PROMETHEUS_API_TOKEN:-\}", raw_env[written[1]])


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard_file(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    mounts = _bind_mounts(grafana)
    provisioning = REPO_ROOT / mounts["/etc/grafana/provisioning"]

    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    (source,) = datasources
    url = urlsplit(source["url"])
    assert source["type"] == "prometheus"
    assert source["isDefault"] is True
    assert url.hostname in services
    assert url.port in _container_ports(services[str(url.hostname)])

    (provider,) = yaml.safe_load((provisioning / "dashboards" / "orchestrator.yml").read_text())["providers"]
    folder = PurePosixPath(provider["options"]["path"])
    dashboards = {target: host for target, host in mounts.items() if PurePosixPath(target).parent == folder}
    assert dashboards == {str(folder / "orchestrator-dashboard.json"): "./deploy/grafana/orchestrator-dashboard.json"}
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "orchestrator-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == source["type"]
    assert _environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] in dashboards


def test_the_monitoring_services_refuse_to_start_without_their_secrets(services: dict[str, dict[str, Any]]) -> None:
    # Their variables cannot be required by Compose (see above), so each checks its own before starting.
    for name, variable in (("prometheus", "ORCH_PROMETHEUS_TOKEN"), ("grafana", "GF_SECURITY_ADMIN_PASSWORD")):
        service = services[name]
        script = " ".join(_argv(service))
        assert service["entrypoint"] == ["/bin/sh", "-c"]
        assert re.match(rf'test -n "\${variable}" \|\| {{ echo .*; exit 1; }};', script), name
        assert variable in _environment(service)


# The OpenTelemetry Collector


def _collector_config() -> dict[str, Any]:
    loaded = yaml.safe_load(COLLECTOR_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def test_the_collector_loads_the_repository_config(services: dict[str, dict[str, Any]]) -> None:
    collector = services["otel-collector"]
    assert str(collector["image"]).startswith("otel/opentelemetry-collector")
    config_path = _option(_argv(collector), "--config")
    assert config_path
    assert _bind_mounts(collector)[config_path] == "./deploy/otel-collector/config.yaml"


def test_the_collector_receives_otlp_over_http_on_4318_and_grpc_on_4317_into_a_complete_pipeline(
    services: dict[str, dict[str, Any]],
) -> None:
    config = _collector_config()
    protocols = config["receivers"]["otlp"]["protocols"]
    assert _port(protocols["http"]["endpoint"]) == 4318
    assert _port(protocols["grpc"]["endpoint"]) == 4317
    assert {4317, 4318} <= _container_ports(services["otel-collector"])
    pipeline = config["service"]["pipelines"]["traces"]
    assert "otlp" in pipeline["receivers"]
    for kind in ("receivers", "processors", "exporters"):
        for component in pipeline.get(kind, []):
            assert component in config[kind], f"the traces pipeline names undefined {kind[:-1]} {component!r}"
    assert pipeline["exporters"], "received spans must go somewhere"
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"]


def test_orchestrator_services_send_spans_to_the_collector_over_http_unless_told_otherwise(
    services: dict[str, dict[str, Any]],
) -> None:
    http_port = _port(_collector_config()["receivers"]["otlp"]["protocols"]["http"]["endpoint"])
    for name in ORCHESTRATOR_SERVICES:
        endpoint = urlsplit(_environment(services[name])["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert (endpoint.scheme, endpoint.hostname, endpoint.port) == ("http", "otel-collector", http_port), name
        # Exports are best effort: nothing may wait for a collector that only runs under a profile.
        assert "otel-collector" not in services[name].get("depends_on", {})
    # An empty value (set on purpose) must reach the services, turning tracing off, not fall back to the collector.
    raw = _raw_compose()["x-orchestrator-env"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    off = _interpolate({"endpoint": raw}, {**REQUIRED_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    assert off == {"endpoint": ""}


# The Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            instructions.append((keyword.upper(), " ".join(rest.split())))
    return instructions


def _copies() -> list[tuple[list[str], str]]:
    copies = []
    for keyword, rest in _dockerfile_instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, destination = [arg for arg in shlex.split(rest) if not arg.startswith("--")]
            copies.append((sources, destination))
    return copies


def test_the_image_runs_as_a_non_root_user_and_starts_a_worker() -> None:
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users
    assert users[-1] not in {"root", "0"}
    cmds = [rest for keyword, rest in instructions if keyword == "CMD"]
    assert cmds[-1] == '["orchestrator", "worker"]'


def test_every_file_the_image_copies_exists() -> None:
    for sources, _ in _copies():
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"


def _declared_files() -> set[str]:
    """Every file pyproject says the package contains: its packages' modules, package data and py-modules."""
    from setuptools import find_packages

    tool = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["setuptools"]
    files = {f"{module}.py" for module in tool.get("py-modules", [])}
    for package in find_packages(str(REPO_ROOT), include=tool["packages"]["find"]["include"]):
        directory = REPO_ROOT.joinpath(*package.split("."))
        files |= {path.relative_to(REPO_ROOT).as_posix() for path in directory.glob("*.py")}
        for pattern in tool.get("package-data", {}).get(package, []):
            files |= {path.relative_to(REPO_ROOT).as_posix() for path in directory.glob(pattern) if path.is_file()}
    return files


@pytest.mark.timeout(240)
def test_the_files_the_image_copies_build_a_package_with_every_declared_module(tmp_path: Path) -> None:
    instructions = _dockerfile_instructions()
    workdir = next(rest for keyword, rest in reversed(instructions) if keyword == "WORKDIR")
    assert any(keyword == "RUN" and re.search(r"\bpip install \.(\s|$)", rest) for keyword, rest in instructions)
    context = tmp_path / "app"
    context.mkdir()
    for sources, destination in _copies():
        target = (
            context / PurePosixPath(destination).relative_to(".")
            if destination.startswith(".")
            else (context / PurePosixPath(destination).relative_to(workdir))
        )
        for source in sources:
            origin = REPO_ROOT / source
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    missing = sorted(_declared_files() - names)
    assert not missing, f"the image would lack {missing}: the Dockerfile does not copy them"
    assert "orchestrator = orchestrator.cli:main" in entry_points


def test_declared_files_cover_the_modules_the_workers_import() -> None:
    # Guards the check above: it must look for what a worker imports first, not an empty set.
    declared = _declared_files()
    assert {
        "workers/__init__.py",
        "orchestrator/celery_app.py",
        "orchestrator/cli.py",
        "orchestrator/engine/sweep_service.py",
    } <= declared
    assert any(fnmatch.fnmatch(name, "orchestrator/state/lua/*.lua") for name in declared)
