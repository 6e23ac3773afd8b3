"""Reading and validating ``deploy/kubernetes/`` offline, for the Kubernetes tests.

Core kinds are validated by ``kubernetes-validate`` (the dev extra) against its bundled, strict schemas of
:data:`K8S_VERSION`, never fetched; KEDA's kinds, which those schemas lack, against
``tests/unit/schemas/keda-v1alpha1.schema.json``, whose Kubernetes types come from the same bundled definitions
through a :class:`referencing.Registry` that never retrieves anything.
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "kubernetes"
BASE_DIR = K8S_DIR / "base"
SECRETS_EXAMPLE = BASE_DIR / "secrets.env.example"
KEDA_SCHEMA = Path(__file__).parent / "schemas" / "keda-v1alpha1.schema.json"

K8S_VERSION = "1.30"
"""The oldest Kubernetes the manifests promise to fit (autoscaling/v2 HPA behavior, current probe fields)."""

NOT_MANIFESTS = frozenset({"kustomization.yaml", "prometheus-adapter-values.yaml"})
"""YAML files under ``deploy/kubernetes/`` that are not Kubernetes objects (kustomize's and a Helm chart's input)."""

WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet"})


class ManifestError(Exception):
    """A manifest that the API server (or KEDA's admission webhook) would refuse."""


def require_kubernetes_validate() -> None:
    """Skip without ``kubernetes-validate`` locally; fail in CI, where the dev extra installs it."""
    if importlib.util.find_spec("kubernetes_validate") is None:
        message = "kubernetes-validate is not installed (it is in the dev extra)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message)
        pytest.skip(message)


@cache
def _parsed(path: Path) -> tuple[dict[str, Any], ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    loaded = [doc for doc in yaml.load_all(path.read_text(encoding="utf-8"), Loader=loader) if doc]
    assert all(isinstance(doc, dict) for doc in loaded), f"{path} has a document that is not a mapping"
    return tuple(loaded)


def documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of ``path`` (a fresh copy: callers may change them)."""
    return copy.deepcopy(list(_parsed(path)))


def manifest_files() -> list[Path]:
    """Every file under ``deploy/kubernetes/`` holding Kubernetes objects."""
    return sorted(p for p in K8S_DIR.rglob("*.yaml") if p.name not in NOT_MANIFESTS)


def manifests(directory: Path = K8S_DIR) -> list[tuple[Path, dict[str, Any]]]:
    """``(file, object)`` for every object in the manifest files under ``directory``."""
    return [(path, doc) for path in manifest_files() if path.is_relative_to(directory) for doc in documents(path)]


def objects(kind: str, directory: Path = K8S_DIR) -> dict[str, dict[str, Any]]:
    """The objects of ``kind`` under ``directory`` by name (names are unique per kind there)."""
    found: dict[str, dict[str, Any]] = {}
    for path, doc in manifests(directory):
        if doc.get("kind") == kind:
            name = doc["metadata"]["name"]
            assert name not in found, f"two {kind} objects named {name} under {directory} ({path})"
            found[name] = doc
    return found


def workloads() -> dict[str, dict[str, Any]]:
    """The base's Deployments and StatefulSets by name."""
    return {name: doc for kind in WORKLOAD_KINDS for name, doc in objects(kind, BASE_DIR).items()}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    """The one container of a workload's pod (each pod here runs exactly one)."""
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    assert isinstance(only, dict)
    return only


def argv(workload: dict[str, Any]) -> list[str]:
    """The container's command line (``command`` then ``args``)."""
    spec = container(workload)
    return [str(arg) for arg in [*spec.get("command", []), *spec.get("args", [])]]


def env_names(workload: dict[str, Any]) -> set[str]:
    """Every variable the container gets: its ``env`` and the keys of the ConfigMaps and Secrets it takes whole."""
    spec = container(workload)
    names = {item["name"] for item in spec.get("env", [])}
    config_maps = objects("ConfigMap", BASE_DIR)
    for source in spec.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        assert ref, f"unexpected envFrom source {source}"
        if "configMapRef" in source:
            names |= set(config_maps[ref["name"]]["data"])
        else:
            names |= set(secrets_example())
    return names


def secrets_example() -> dict[str, str]:
    """``secrets.env.example`` as the Secret kustomize would generate from it (``KEY=VALUE`` lines, ``#`` comments)."""
    pairs = {}
    for line in SECRETS_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"secrets.env.example: {line!r} is not KEY=VALUE"
            pairs[key] = value
    return pairs


def resolved_env(workload: dict[str, Any]) -> dict[str, str]:
    """The container's environment with the ConfigMap and the example Secret filled in."""
    spec = container(workload)
    env: dict[str, str] = {}
    config_maps = objects("ConfigMap", BASE_DIR)
    for source in spec.get("envFrom", []):
        env |= config_maps[source["configMapRef"]["name"]]["data"] if "configMapRef" in source else secrets_example()
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]
        if "secretKeyRef" in ref:
            env[item["name"]] = secrets_example()[ref["secretKeyRef"]["key"]]
        else:
            env[item["name"]] = config_maps[ref["configMapKeyRef"]["name"]]["data"][ref["configMapKeyRef"]["key"]]
    return env


def option(args: list[str], *names: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in ``args``."""
    for index, arg in enumerate(args):
        for name in names:
            if arg == name and index + 1 < len(args):
                return args[index + 1]
            if arg.startswith(f"{name}="):
                return arg.split("=", 1)[1]
    return None


# Validation


def _k8s_schema_dir() -> Path:
    schemas = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return Path(str(schemas / f"v{K8S_VERSION}.0-local-strict"))


@cache
def _keda_registry() -> tuple[dict[str, Any], Registry[Any]]:
    keda = json.loads(KEDA_SCHEMA.read_text(encoding="utf-8"))
    definitions = json.loads((_k8s_schema_dir() / "_definitions.json").read_text(encoding="utf-8"))
    registry: Registry[Any] = Registry().with_resources(
        [(keda["$id"], Resource.from_contents(keda)), (definitions["$id"], Resource.from_contents(definitions))]
    )
    return keda, registry


def validate(resource: dict[str, Any]) -> None:
    """Raise :class:`ManifestError` unless ``resource`` fits its kind's schema; an unknown kind is an error too.

    Raises:
        ManifestError: The first schema violation, or no schema for the kind.
    """
    import kubernetes_validate

    kind, api_version = resource.get("kind"), str(resource.get("apiVersion", ""))
    if api_version.startswith("keda.sh/"):
        keda, registry = _keda_registry()
        if api_version != "keda.sh/v1alpha1" or kind not in keda["$defs"]:
            raise ManifestError(f"no KEDA schema for {kind} {api_version}")
        validator = jsonschema.Draft202012Validator({"$ref": f"{keda['$id']}#/$defs/{kind}"}, registry=registry)
        errors = sorted(validator.iter_errors(resource), key=lambda e: list(e.absolute_path))
        if errors:
            path = ".".join(str(part) for part in errors[0].absolute_path)
            raise ManifestError(f"{kind}: {path}: {errors[0].message}")
        return
    try:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(part) for part in exc.path)
        raise ManifestError(f"{kind}: {path}: {exc.message}") from exc
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise ManifestError(exc.message) from exc
