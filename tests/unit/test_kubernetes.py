"""``deploy/kubernetes/``: every manifest valid offline, and the same deployment as ``docker-compose.yml``.

Schemas catch malformed objects (``tests/unit/k8s_manifests.py`` says which); what they cannot see is checked here
against the repository: each compose service has its workload, running the same command of the real CLI, with the
settings the code reads, the secrets it needs and nothing it does not, probes that ask the process itself, a grace
period that lets Celery's warm shutdown finish, and Services and kustomizations that point at what exists.
Autoscaling (KEDA and the HPA) is in ``test_kubernetes_scaling.py``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from orchestrator.api.auth import ApiAuth, check_bind
from orchestrator.cli import main as cli
from orchestrator.infra.settings import Settings
from tests.unit.k8s_manifests import (
    BASE_DIR,
    K8S_DIR,
    KEDA_SCHEMA,
    REPO_ROOT,
    ManifestError,
    argv,
    container,
    documents,
    env_names,
    manifest_files,
    manifests,
    objects,
    option,
    require_kubernetes_validate,
    resolved_env,
    secrets_example,
    validate,
    workloads,
)
from tests.unit.test_compose import REQUIRED_ENV, _argv, _interpolate, _raw_compose

pytestmark = pytest.mark.timeout(60)

ORCHESTRATOR = {"worker-llm", "worker-cpu", "sweeper", "api", "flower"}
WORKERS = {"worker-llm", "worker-cpu"}
# Variables read outside Settings (docs/configuration.md, "Read outside Settings") or by other programs.
OTHER_VARIABLES = {
    "ORCH_API_TOKENS",  # the API
    "FLOWER_BASIC_AUTH",  # Flower's --basic-auth option, as Flower reads FLOWER_* variables
    "REDIS_PASSWORD",  # redis-server's --requirepass and KEDA
    "REDISCLI_AUTH",  # redis-cli in Redis's probe
    "BROKER_REDIS_ADDRESS",  # KEDA's redis scaler
    "ANTHROPIC_API_KEY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, dict[str, Any]]:
    services = _interpolate(_raw_compose(), REQUIRED_ENV)["services"]
    assert isinstance(services, dict)
    return services


def _settings_variables() -> set[str]:
    asked: list[str] = []

    class Recording(dict[str, str]):
        def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
            asked.append(key)
            return super().get(key, default)

    Settings.from_env(Recording())
    return set(asked)


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"unexpected compose duration {duration!r}"
    return float(match[1])


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    pod = workload["spec"]["template"]["spec"]
    assert isinstance(pod, dict)
    return pod


# Every manifest is valid, and the validator can tell


@pytest.mark.parametrize(
    ("path", "index"),
    [(path, index) for path in manifest_files() for index in range(len(documents(path)))],
    ids=lambda value: str(value.relative_to(K8S_DIR)) if isinstance(value, Path) else str(value),
)
def test_every_manifest_is_valid_against_its_schema(path: Path, index: int) -> None:
    require_kubernetes_validate()
    validate(documents(path)[index])


def _mutations() -> list[tuple[str, dict[str, Any]]]:
    deployment = workloads()["worker-llm"]
    scaled = objects("ScaledObject")["worker-llm"]
    cases = []
    typo = copy.deepcopy(deployment)
    container(typo)["commands"] = container(typo).pop("command")
    cases.append(("unknown container field", typo))
    port = copy.deepcopy(deployment)
    container(port)["ports"][0]["containerPort"] = "9100"
    cases.append(("port as a string", port))
    grace = copy.deepcopy(deployment)
    _pod(grace)["terminationGracePeriodSeconds"] = "150s"
    cases.append(("grace period as a duration", grace))
    number = copy.deepcopy(scaled)
    number["spec"]["triggers"][0]["metadata"]["listLength"] = 600
    cases.append(("KEDA metadata value not a string", number))
    field = copy.deepcopy(scaled)
    field["spec"]["cooldown"] = 300
    cases.append(("unknown ScaledObject field", field))
    behavior = copy.deepcopy(scaled)
    behavior["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["window"] = 1
    cases.append(("unknown HPA behavior field inside KEDA", behavior))
    cases.append(("unknown kind", {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}))
    return cases


@pytest.mark.parametrize(("case", "resource"), _mutations(), ids=[case for case, _ in _mutations()])
def test_the_validator_refuses_an_invalid_manifest(case: str, resource: dict[str, Any]) -> None:
    require_kubernetes_validate()
    with pytest.raises(ManifestError):
        validate(resource)


def test_the_keda_schema_is_a_valid_json_schema_that_describes_both_kinds() -> None:
    keda = json.loads(KEDA_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(keda)
    assert {"ScaledObject", "TriggerAuthentication"} <= keda["$defs"].keys()
    assert {doc["kind"] for _, doc in manifests() if doc["apiVersion"].startswith("keda.sh/")} <= keda["$defs"].keys()


def test_every_manifest_belongs_to_exactly_one_kustomization_and_each_names_what_exists() -> None:
    listed: list[Path] = []
    for kustomization in sorted(K8S_DIR.rglob("kustomization.yaml")):
        (config,) = documents(kustomization)
        for entry in config["resources"]:
            target = (kustomization.parent / entry).resolve()
            assert target.exists(), f"{kustomization} lists {entry}, which does not exist"
            if target.is_file():
                listed.append(target)
            else:
                assert (target / "kustomization.yaml").is_file(), f"{kustomization}: {entry} is no kustomization"
    assert sorted(listed) == manifest_files(), "a manifest is in no kustomization, or in two"


def test_the_secret_comes_from_an_ignored_file_whose_example_has_every_key_the_manifests_read() -> None:
    (config,) = documents(BASE_DIR / "kustomization.yaml")
    (generator,) = config["secretGenerator"]
    assert generator["name"] == "orchestrator-secrets"
    assert config["generatorOptions"]["disableNameSuffixHash"] is True, "KEDA refers to the Secret by name"
    (env_file,) = generator["envs"]
    assert (BASE_DIR / f"{env_file}.example").is_file()
    ignored = (REPO_ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert str((BASE_DIR / env_file).relative_to(REPO_ROOT)) in ignored, "real secrets would be committed"
    keys = secrets_example()
    referenced = re.findall(r"name: orchestrator-secrets\s+key: (\w+)", _all_text())
    assert referenced
    assert set(referenced) <= keys.keys()
    assert set(keys) <= set(referenced), "secrets.env.example has a key nothing reads"


def _all_text() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in manifest_files())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overlay", ["base", "keda", "hpa"])
def test_kustomize_builds_each_overlay_into_valid_objects(overlay: str, tmp_path: Path) -> None:
    # kubectl is not in the dev extra: the build is checked where the machine has it.
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (kustomize runs inside it)")
    require_kubernetes_validate()
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S_DIR, tree)
    (config,) = documents(BASE_DIR / "kustomization.yaml")
    (env_file,) = config["secretGenerator"][0]["envs"]
    shutil.copy(BASE_DIR / f"{env_file}.example", tree / "base" / env_file)
    result = subprocess.run(
        [kubectl, "kustomize", str(tree / overlay)], capture_output=True, text=True, timeout=100, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for resource in rendered:
        validate(resource)
    expected = {(doc["kind"], doc["metadata"]["name"]) for _, doc in manifests(BASE_DIR)}
    expected |= {(doc["kind"], doc["metadata"]["name"]) for _, doc in manifests(K8S_DIR / overlay)}
    expected.add(("Secret", "orchestrator-secrets"))
    assert {(doc["kind"], doc["metadata"]["name"]) for doc in rendered} == expected
    (secret,) = [doc for doc in rendered if doc["kind"] == "Secret"]
    assert set(secret["data"]) == set(secrets_example())


# The same services as compose, running the same commands


def test_every_compose_service_outside_a_profile_has_its_workload(compose: dict[str, dict[str, Any]]) -> None:
    always_on = {name for name, service in compose.items() if not service.get("profiles")}
    assert set(workloads()) == always_on


def test_workers_consume_the_same_queue_on_the_same_pool_with_explicit_concurrency(
    compose: dict[str, dict[str, Any]],
) -> None:
    settings = Settings.from_env(resolved_env(workloads()["worker-llm"]))
    queues = {"worker-llm": settings.llm_queue, "worker-cpu": settings.cpu_queue}
    for name in WORKERS:
        ours, theirs = argv(workloads()[name]), _argv(compose[name])
        assert ours[:2] == theirs[:2] == ["orchestrator", "worker"]
        for names in (("-Q", "--queues"), ("-P", "--pool"), ("-l", "--loglevel")):
            assert option(ours, *names) == option(theirs, *names), f"{name}: {names[-1]} differs from compose"
        assert option(ours, "-Q", "--queues") == queues[name]
        # Compose's 0 means one process per CPU: inside a pod that would be the node's CPUs, not the pod's.
        assert int(option(ours, "-c", "--concurrency") or 0) > 0, f"{name} must set its concurrency"
    llm = int(option(argv(workloads()["worker-llm"]), "--concurrency") or 0)
    assert llm >= int(option(_argv(compose["worker-llm"]), "--concurrency") or 0)
    prefork = int(option(argv(workloads()["worker-cpu"]), "--concurrency") or 0)
    assert float(container(workloads()["worker-cpu"])["resources"]["requests"]["cpu"]) == prefork, "a process a CPU"


def test_the_sweeper_api_and_flower_run_what_compose_runs(
    compose: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("sweeper", "api"):
        assert argv(workloads()[name]) == _argv(compose[name])
    # Flower takes its basic auth from FLOWER_BASIC_AUTH instead of the command line; the rest is the same.
    theirs = [arg for arg in _argv(compose["flower"]) if not arg.startswith("--basic-auth")]
    assert argv(workloads()["flower"]) == theirs
    from flower.command import apply_env_options
    from flower.options import options as flower_options

    credentials = resolved_env(workloads()["flower"])["FLOWER_BASIC_AUTH"]
    user, _, password = credentials.partition(":")
    assert user
    assert password
    for variable in [name for name in os.environ if name.startswith("FLOWER_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("FLOWER_BASIC_AUTH", credentials)
    before = flower_options.basic_auth
    try:
        apply_env_options()
        assert flower_options.basic_auth == [credentials]
    finally:
        flower_options.basic_auth = before


def test_every_command_names_a_real_subcommand_module_and_workflow_import() -> None:
    for name, workload in workloads().items():
        args = argv(workload)
        if args[0] == "orchestrator":
            assert args[1] in cli.commands, f"{name} runs `orchestrator {args[1]}`, which the CLI does not have"
        if args[0] == "celery":
            module = option(args, "-A", "--app")
            assert module
            assert (REPO_ROOT / module / "__init__.py").is_file()
        for module in filter(None, resolved_env(workload).get("ORCH_IMPORTS", "").split(",")):
            path = REPO_ROOT.joinpath(*module.strip().split("."))
            assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), module


def test_every_variable_set_is_one_the_code_reads_and_each_service_gets_the_shared_ones() -> None:
    known = _settings_variables() | OTHER_VARIABLES
    for name, workload in workloads().items():
        unknown = env_names(workload) - known
        assert not unknown, f"{name} sets {sorted(unknown)}, which nothing reads"
    shared = set(_raw_compose()["x-orchestrator-env"])
    for name in ORCHESTRATOR:
        # Only LLM steps call the provider: its key goes to worker-llm alone.
        expected = shared if name == "worker-llm" else shared - {"ANTHROPIC_API_KEY"}
        names = env_names(workloads()[name])
        assert expected <= names, f"{name} lacks {sorted(expected - names)}"
        assert "ANTHROPIC_API_KEY" not in names or name == "worker-llm"
        assert "ORCH_API_TOKENS" not in names or name == "api"


def test_the_settings_parse_and_the_urls_reach_the_redis_service() -> None:
    redis_service = objects("Service", BASE_DIR)["redis"]
    for name in ORCHESTRATOR:
        settings = Settings.from_env(resolved_env(workloads()[name]))
        url = urlsplit(settings.redis_url)
        assert url.hostname == "redis"
        assert url.port == redis_service["spec"]["ports"][0]["port"]
        assert url.password == secrets_example()["REDIS_PASSWORD"]
        # An empty ORCH_BROKER_URL means the Redis of REDIS_URL, as in compose.
        assert settings.effective_broker_url == settings.redis_url
    redis_args = argv(workloads()["redis"])
    assert redis_args[redis_args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert "REDIS_PASSWORD" in env_names(workloads()["redis"])
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    claims = workloads()["redis"]["spec"]["volumeClaimTemplates"]
    assert [mount["mountPath"] for mount in container(workloads()["redis"])["volumeMounts"]] == ["/data"]
    assert [claim["metadata"]["name"] for claim in claims] == ["data"]


def test_the_api_listens_beyond_loopback_with_the_example_tokens() -> None:
    args = argv(workloads()["api"])
    host = option(args, "--host")
    assert host == "0.0.0.0"
    check_bind(host, ApiAuth.from_env(resolved_env(workloads()["api"])))


# Probes, shutdown, resources, Services


def test_probes_ask_each_process_itself(compose: dict[str, dict[str, Any]]) -> None:
    for name in WORKERS:
        spec = container(workloads()[name])
        for probe in ("startupProbe", "livenessProbe"):
            command = " ".join(spec[probe]["exec"]["command"])
            assert re.search(r'ping --destination \\?"?celery@\$HOSTNAME\b', command), f"{name} {probe}"
            assert option(command.split(), "-A") == "workers"
    for name in ("api", "flower"):
        spec = container(workloads()[name])
        port = int(option(argv(workloads()[name]), "--port") or 0)
        (named,) = spec["ports"]
        assert named["containerPort"] == port
        path = {"api": "/healthz", "flower": "/healthcheck"}[name]
        assert spec["readinessProbe"]["httpGet"] == {"path": path, "port": named["name"]}
        assert f"http://127.0.0.1:{port}{path}" in " ".join(_argv({"command": compose[name]["healthcheck"]["test"]}))
    heartbeat = option(argv(workloads()["sweeper"]), "--heartbeat-file")
    assert heartbeat
    assert heartbeat in " ".join(container(workloads()["sweeper"])["livenessProbe"]["exec"]["command"])
    assert "grep -q PONG" in " ".join(container(workloads()["redis"])["readinessProbe"]["exec"]["command"])


def test_a_broker_outage_the_workers_wait_out_does_not_restart_them() -> None:
    patience = Settings().outage_patience_s
    for name in WORKERS:
        liveness = container(workloads()[name])["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] > patience, name
    # The API leaves the Service while Redis is down (readiness) but is not restarted for it (liveness).
    assert "tcpSocket" in container(workloads()["api"])["livenessProbe"]


def test_warm_shutdown_has_at_least_compose_grace_and_outlasts_an_llm_call(compose: dict[str, dict[str, Any]]) -> None:
    for name in ORCHESTRATOR:
        grace = _pod(workloads()[name])["terminationGracePeriodSeconds"]
        if "stop_grace_period" in compose[name]:
            assert grace >= _seconds(compose[name]["stop_grace_period"]), name
    llm_timeout = Settings.from_env(resolved_env(workloads()["worker-llm"])).llm_timeout_s
    assert _pod(workloads()["worker-llm"])["terminationGracePeriodSeconds"] > llm_timeout
    for name in ORCHESTRATOR:
        # Exec form, no shell: SIGTERM reaches the process (`orchestrator worker` execs Celery in its place).
        assert argv(workloads()[name])[0] in {"orchestrator", "celery"}


def test_every_container_requests_cpu_and_memory_and_caps_memory_without_running_as_root() -> None:
    for name, workload in workloads().items():
        resources = container(workload)["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), name
        assert "memory" in resources["limits"], name
        assert "cpu" not in resources.get("limits", {}), f"{name}: a CPU limit throttles a busy pod, lease renewals too"
        assert _pod(workload)["securityContext"]["runAsNonRoot"] is True, name
        assert container(workload)["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_every_service_selects_a_workload_and_targets_a_port_it_declares(compose: dict[str, dict[str, Any]]) -> None:
    services = objects("Service", BASE_DIR)
    assert set(services) == {"redis", "api", "flower"}
    for name, service in services.items():
        selector = service["spec"]["selector"]
        pods = {name: w["spec"]["template"]["metadata"]["labels"] for name, w in workloads().items()}
        (target,) = [workloads()[name] for name, labels in pods.items() if selector.items() <= labels.items()]
        assert selector.items() <= target["spec"]["selector"]["matchLabels"].items()
        declared = {port["name"]: port["containerPort"] for port in container(target).get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in declared, f"Service {name} targets undeclared port {port['targetPort']}"
            assert port["port"] == declared[port["targetPort"]]
        published = {int(str(mapping).rsplit(":", 1)[-1]) for mapping in compose[name].get("ports", [])}
        assert published <= set(declared.values()), f"{name} serves other ports than compose publishes"


def test_every_workload_runs_the_image_compose_builds(compose: dict[str, dict[str, Any]]) -> None:
    (config,) = documents(BASE_DIR / "kustomization.yaml")
    images = {image["name"]: image for image in config["images"]}
    repository, _, tag = str(compose["worker-llm"]["image"]).partition(":")
    assert images[repository]["newTag"] == tag
    for name in ORCHESTRATOR:
        assert container(workloads()[name])["image"] == repository, name
