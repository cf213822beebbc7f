"""clusters/: launcher YAMLs against Ray's own cluster schema, KubeRay manifests against the KubeRay v1 CRD
fields they use, images and pins against what this checkout installs, entrypoints against real config keys.
No cloud, no Kubernetes, no Ray cluster: files only.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
LAUNCHERS = {"aws-gpu.yaml": "gpu", "cpu.yaml": "cpu"}
MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob-train.yaml": "RayJob", "rayjob-sweep.yaml": "RayJob"}
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTERS / name).read_text())


def _pins() -> dict[str, str]:
    """pyproject's dependencies: normalised name -> '==version' (all of them are pinned)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return {r.name.lower(): str(r.specifier) for r in reqs}


def _image(kind: str) -> str:
    # The images must run the Ray the tests (and the driver you submit from) run.
    return f"rayproject/ray:{ray.__version__}-py311" + ("-gpu" if kind == "gpu" else "")


# -------------------------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_yaml_matches_the_schema_inside_ray(name: str) -> None:
    schema = json.loads(RAY_SCHEMA.read_text())
    config = _load(name)
    errors = sorted(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(config)
    )
    assert not errors, f"{name} breaks {RAY_SCHEMA}:\n" + "\n".join(errors)
    # Ray's own pipeline too (`ray up` runs these: defaults merged per provider, then validated). Private API:
    # if a Ray upgrade moves it, the schema check above still stands.
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_is_consistent_with_this_checkout(name: str) -> None:
    config, kind = _load(name), LAUNCHERS[name]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {t: v for t, v in types.items() if t != config["head_node_type"]}
    for node_type, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= config["max_workers"], node_type
        assert ("GPU" in spec["resources"]) == (kind == "gpu"), node_type
    docker = config["docker"]
    assert docker["image"] == _image(kind)
    assert docker.get("head_image", docker["image"]) in (_image("cpu"), _image(kind))
    # The working tree goes to ~/rayflow and is installed there, editable (conf/ sits next to the package).
    (target, source), *_ = config["file_mounts"].items()
    assert target == "~/rayflow" and (ROOT / source / "pyproject.toml").is_file()
    setup = config["setup_commands"]
    assert any(re.search(rf'pip install "torch{re.escape(_pins()["torch"])}"', c) for c in setup), setup
    assert setup[-1] == "pip install -e ~/rayflow"
    # Servers listen on loopback unless told otherwise (README: `ray dashboard` tunnels to it).
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in json.dumps(config)


# ----------------------------------------------------------------------------- KubeRay manifests

# KubeRay v1 CRD fields (apiVersion ray.io/v1; KubeRay 1.5-1.7 API reference and apis/ray/v1/*_types.go),
# plus the Kubernetes core/v1 fields the pod templates use. Values: a Python type, a nested object's name,
# [element] for lists, {str: type} for string maps, or a tuple of allowed strings (an enum).
FIELDS: dict[str, dict[str, Any]] = {
    "RayCluster": {"apiVersion": str, "kind": str, "metadata": "ObjectMeta", "spec": "RayClusterSpec"},
    "RayJob": {"apiVersion": str, "kind": str, "metadata": "ObjectMeta", "spec": "RayJobSpec"},
    "RayClusterSpec": {
        "headGroupSpec": "HeadGroupSpec",
        "workerGroupSpecs": ["WorkerGroupSpec"],
        "rayVersion": str,
        "enableInTreeAutoscaling": bool,
        "autoscalerOptions": "AutoscalerOptions",
        "headServiceAnnotations": {str: str},
        "suspend": bool,
        "authOptions": "AuthOptions",  # KubeRay >= 1.5.1
    },
    "AuthOptions": {"mode": ("disabled", "token")},
    "AutoscalerOptions": {
        "resources": "ResourceRequirements",
        "image": str,
        "imagePullPolicy": ("Always", "IfNotPresent", "Never"),
        "env": list,
        "envFrom": list,
        "volumeMounts": list,
        "securityContext": dict,
        "idleTimeoutSeconds": int,
        "upscalingMode": ("Default", "Aggressive", "Conservative"),
    },
    "HeadGroupSpec": {
        "serviceType": ("ClusterIP", "NodePort", "LoadBalancer"),
        "headService": dict,
        "enableIngress": bool,
        "rayStartParams": {str: str},
        "template": "PodTemplateSpec",
    },
    "WorkerGroupSpec": {
        "groupName": str,
        "replicas": int,
        "minReplicas": int,
        "maxReplicas": int,
        "numOfHosts": int,
        "rayStartParams": {str: str},
        "template": "PodTemplateSpec",
        "scaleStrategy": dict,
    },
    "RayJobSpec": {
        "entrypoint": str,
        "runtimeEnvYAML": str,
        "submissionMode": ("K8sJobMode", "HTTPMode", "InteractiveMode"),
        "shutdownAfterJobFinishes": bool,
        "ttlSecondsAfterFinished": int,
        "activeDeadlineSeconds": int,
        "backoffLimit": int,
        "rayClusterSpec": "RayClusterSpec",
        "clusterSelector": {str: str},
        "submitterPodTemplate": "PodTemplateSpec",
        "submitterConfig": {str: int},
        "jobId": str,
        "metadata": {str: str},
        "entrypointNumCpus": (int, float),
        "entrypointNumGpus": (int, float),
        "entrypointResources": str,
        "suspend": bool,
    },
    # Kubernetes core/v1 (the subset these manifests use)
    "ObjectMeta": {"name": str, "namespace": str, "labels": {str: str}, "annotations": {str: str}},
    "PodTemplateSpec": {"metadata": "ObjectMeta", "spec": "PodSpec"},
    "PodSpec": {
        "containers": ["Container"],
        "volumes": ["Volume"],
        "tolerations": ["Toleration"],
        "nodeSelector": {str: str},
        "serviceAccountName": str,
    },
    "Container": {
        "name": str,
        "image": str,
        "imagePullPolicy": ("Always", "IfNotPresent", "Never"),
        "resources": "ResourceRequirements",
        "ports": ["ContainerPort"],
        "volumeMounts": ["VolumeMount"],
        "env": list,
        "lifecycle": dict,
    },
    "ResourceRequirements": {"requests": {str: str}, "limits": {str: str}},
    "ContainerPort": {"containerPort": int, "name": str, "protocol": ("TCP", "UDP", "SCTP")},
    "VolumeMount": {"name": str, "mountPath": str, "readOnly": bool},
    "Volume": {"name": str, "emptyDir": "EmptyDirVolumeSource"},
    "EmptyDirVolumeSource": {"medium": ("", "Memory"), "sizeLimit": str},
    "Toleration": {
        "key": str,
        "operator": ("Exists", "Equal"),
        "value": str,
        "effect": ("NoSchedule", "PreferNoSchedule", "NoExecute"),
    },
}
# Required by the CRDs of every KubeRay 1.x (rayStartParams lost `required` only in later releases).
REQUIRED = {
    "RayCluster": {"apiVersion", "kind", "metadata", "spec"},
    "RayJob": {"apiVersion", "kind", "metadata", "spec"},
    "RayClusterSpec": {"headGroupSpec"},
    "HeadGroupSpec": {"rayStartParams", "template"},
    "WorkerGroupSpec": {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"},
    "PodSpec": {"containers"},
    "Container": {"name", "image"},
    "Volume": {"name"},
}


def _field_errors(value: Any, spec: Any, path: str) -> list[str]:
    if isinstance(spec, str):  # a named object
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping ({spec}), got {value!r}"]
        known = FIELDS[spec]
        errors = [f"{path}.{k}: not a field of {spec}" for k in value if k not in known]
        errors += [f"{path}.{k}: required in {spec}" for k in REQUIRED.get(spec, ()) if k not in value]
        for k, v in value.items():
            if k in known:
                errors += _field_errors(v, known[k], f"{path}.{k}")
        return errors
    if isinstance(spec, list):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        return [e for i, v in enumerate(value) for e in _field_errors(v, spec[0], f"{path}[{i}]")]
    if isinstance(spec, dict):  # {str: type}: e.g. rayStartParams is map[string]string, so "0" not 0
        (vtype,) = spec.values()
        if not isinstance(value, dict):
            return [f"{path}: expected a string map, got {value!r}"]
        return [f"{path}.{k}: {v!r} must be a {vtype.__name__}" for k, v in value.items() if not isinstance(v, vtype)]
    if isinstance(spec, tuple) and all(isinstance(s, str) for s in spec):
        return [] if value in spec else [f"{path}: {value!r} is not one of {list(spec)}"]
    if spec in (int, float, (int, float)) and isinstance(value, bool):
        return [f"{path}: {value!r} must be a number"]
    return [] if isinstance(value, spec) else [f"{path}: {value!r} is not a {spec}"]


def _cluster_specs(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_uses_only_kuberay_v1_fields(name: str) -> None:
    manifest = _load(f"kuberay/{name}")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == MANIFESTS[name]
    errors = _field_errors(manifest, manifest["kind"], manifest["kind"])
    assert not errors, f"{name}:\n" + "\n".join(errors)


def test_field_checker_catches_the_usual_mistakes() -> None:
    # Guard for the checker itself: a typo, an int rayStartParams value, a bad enum, a missing group name.
    spec = {
        "headGroupSpec": {"rayStartParams": {"num-cpus": 0}, "template": {"spec": {"containers": [{"name": "h"}]}}},
        "workerGroupSpecs": [{"replicas": 1, "minReplica": 0, "maxReplicas": 1, "rayStartParams": {}, "template": {}}],
        "authOptions": {"mode": "on"},
    }
    errors = "\n".join(_field_errors(spec, "RayClusterSpec", "spec"))
    for needle in (
        "num-cpus: 0 must be a str",
        "minReplica: not a field",
        "groupName: required",
        "'on' is not one of",
        "containers[0].image: required",
    ):
        assert needle in errors, errors


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_cluster_matches_this_ray_and_stays_private(name: str) -> None:
    manifest = _load(f"kuberay/{name}")
    cluster = _cluster_specs(manifest)
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # in-cluster only; README: kubectl port-forward
    assert head["rayStartParams"].get("num-cpus") == "0"
    (head_container,) = head["template"]["spec"]["containers"]
    assert head_container["image"] == _image("cpu")
    assert cluster["workerGroupSpecs"] and len({g["groupName"] for g in cluster["workerGroupSpecs"]}) == len(
        cluster["workerGroupSpecs"]
    )
    for group in cluster["workerGroupSpecs"]:
        lo, hi = group["minReplicas"], group["maxReplicas"]
        assert 0 <= lo <= group.get("replicas", lo) <= hi, group["groupName"]
        for container in group["template"]["spec"]["containers"]:
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            gpu = "nvidia.com/gpu" in limits
            assert container["image"] == _image("gpu" if gpu else "cpu"), container["image"]
            # Kubernetes demands GPU requests == limits; Ray reads its CPU/GPU counts from limits.
            assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu") and "cpu" in limits


# ----------------------------------------------------------------------------- RayJob entrypoints

RUNTIME_ENV_FIELDS = {"working_dir", "py_modules", "pip", "uv", "conda", "env_vars", "excludes", "config"}


def _runtime_env(manifest: dict[str, Any]) -> dict[str, Any]:
    env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])
    unknown = set(env) - RUNTIME_ENV_FIELDS
    assert not unknown, f"runtimeEnvYAML has unknown fields {unknown}"
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own validation: working_dir must be a .zip/.tar.gz URI, pip fields known
    return env


def _pinned(packages: list[str]) -> dict[str, str]:
    reqs = [Requirement(p) for p in packages]
    return {r.name.lower(): str(r.specifier) for r in reqs}


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-sweep.yaml"])
def test_rayjob_runtime_env_pins_match_pyproject(name: str) -> None:
    manifest = _load(f"kuberay/{name}")
    spec = manifest["spec"]
    assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
    env = _runtime_env(manifest)
    expected = {k: v for k, v in _pins().items() if k != "ray"}  # the image brings Ray
    assert _pinned(env["pip"]["packages"]) == expected


def test_readme_runtime_env_pins_match_pyproject() -> None:
    text = (CLUSTERS / "README.md").read_text()
    (raw,) = re.findall(r"--runtime-env-json '([^']+)'", text)
    assert _pinned(json.loads(raw)["pip"]) == {k: v for k, v in _pins().items() if k != "ray"}


def _rayflow_commands(text: str, module: str) -> list[list[str]]:
    """The overrides of every `python -m rayflow.<module> ...` in text (shell continuations joined)."""
    text = text.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        for match in re.finditer(rf"python -m rayflow\.{module}\b(.*)", line):
            args = shlex.split(match.group(1).split("#")[0])
            commands.append([a for a in args if "=" in a])
    return commands


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (CLUSTERS / "README.md").read_text(), flags=re.DOTALL)


def _compose(config_name: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    import rayflow.train  # noqa: F401  registers the ${rayflow_asset:...} resolver the config uses

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def test_train_entrypoint_is_a_real_command_with_real_config_keys() -> None:
    from rayflow.cli import job_from_hydra

    spec = _load("kuberay/rayjob-train.yaml")["spec"]
    assert spec["entrypoint"].startswith("python -m rayflow.train ")
    assert importlib.util.find_spec("rayflow.train") is not None
    (overrides,) = _rayflow_commands(spec["entrypoint"], "train")
    job = job_from_hydra(_compose("config", overrides))  # unknown keys and bad values raise here
    assert job.run.absolute_storage().startswith("s3://") and job.tracking.uri == "http://mlflow:5000"
    assert job.resources.use_gpu and job.resources.num_workers >= 1


def test_train_commands_in_the_readme_compose() -> None:
    from rayflow.cli import job_from_hydra

    commands = [c for block in _bash_blocks() for c in _rayflow_commands(block, "train")]
    assert len(commands) >= 2
    for overrides in commands:
        job = job_from_hydra(_compose("config", overrides))
        assert "://" in job.run.storage_path and job.tracking.uri.startswith("http://"), overrides


def test_sweep_entrypoint_runs_the_tune_module() -> None:
    spec = _load("kuberay/rayjob-sweep.yaml")["spec"]
    assert spec["entrypoint"].startswith("python -m rayflow.tune ")
    if importlib.util.find_spec("rayflow.tune") is None:
        pytest.skip("rayflow.tune is not in this checkout yet")
    if not (ROOT / "conf" / "tune.yaml").is_file():
        pytest.skip("conf/tune.yaml is not in this checkout yet")
    # Hydra rejects keys the tune config does not have (full validation is rayflow.tune's business).
    commands = _rayflow_commands(spec["entrypoint"], "tune") + [
        c for block in _bash_blocks() for c in _rayflow_commands(block, "tune")
    ]
    assert len(commands) >= 2
    for overrides in commands:
        cfg = _compose("tune", overrides)
        assert "://" in cfg.run.storage_path and cfg.tracking.uri.startswith("http://"), overrides
