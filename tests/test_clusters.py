"""clusters/: launcher YAMLs against Ray's own cluster schema, KubeRay manifests against the KubeRay v1 CRD
fields they use, images and pins against what this checkout installs, entrypoints against real config keys.
No cloud, no Kubernetes: files only, except one slow test that starts a local head with token authentication on
and submits the README's job to it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
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
    # The working tree goes to ~/rayflow and is installed from there as a wheel (configs ship inside it).
    (target, source), *_ = config["file_mounts"].items()
    assert target == "~/rayflow" and (ROOT / source / "pyproject.toml").is_file()
    setup = config["setup_commands"]
    assert any(re.search(rf'pip install "torch{re.escape(_pins()["torch"])}"', c) for c in setup), setup
    assert setup[-1] == "pip install ~/rayflow"
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


def project_wheel_name() -> str:
    """The file name `python -m pip wheel --no-deps .` gives this checkout (tests/test_wheel.py builds it)."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return f"rayflow-{version}-py3-none-any.whl"


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-sweep.yaml"])
def test_rayjob_installs_the_project_wheel_and_the_pinned_torch(name: str) -> None:
    manifest = _load(f"kuberay/{name}")
    spec = manifest["spec"]
    assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
    env = _runtime_env(manifest)
    assert "working_dir" not in env and "py_modules" not in env  # the code is the wheel, not a checkout
    reqs = {r.name.lower(): r for r in map(Requirement, env["pip"]["packages"])}
    assert set(reqs) == {"torch", "rayflow"}
    assert str(reqs["torch"].specifier) == _pins()["torch"]  # the CUDA build of the pinned version
    assert reqs["rayflow"].url.endswith("/" + project_wheel_name()), reqs["rayflow"].url  # it pins the rest


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


# ------------------------------------------------------------------ a live head with token authentication on

# Passed through to the token head: the rest of RAY_* (RAY_AUTH_MODE=disabled of the session fixture above all)
# must not leak into a cluster whose point is its own authentication settings.
_TOKEN_HEAD_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
_NOT_UP_YET = ("No available agent", "Failed to connect", "Connection refused", "Cannot connect")


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # `python` in a job's entrypoint is the one on the head's PATH at `ray start`: this environment's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **_TOKEN_HEAD_RAY_ENV, "HOME": str(home), **extra}


def _readme_submit_command() -> tuple[dict[str, str], list[str]]:
    """README's one-line submission of the smoke job to a token-auth head: (its env assignments, the command)."""
    lines = {line.strip() for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith("RAY_AUTH_MODE=token ray job submit") and line.rstrip().endswith("experiment=smoke")}
    assert len(lines) == 1, f"README.md must show one submit line for the smoke job, found {sorted(lines)}"
    words = shlex.split(lines.pop())
    env = dict(w.split("=", 1) for w in words[: words.index("ray")])
    return env, words[words.index("ray") :]


def _submit(cmd: list[str], env: dict[str, str], deadline: float) -> subprocess.CompletedProcess:
    """Run a `ray job ...` command, again while the head's dashboard or job agent is still coming up."""
    while True:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        out = proc.stdout + proc.stderr
        if not any(s in out for s in _NOT_UP_YET) or time.time() > deadline:
            return proc
        time.sleep(3)


def _gcs_rpc(address: str, token: str | None) -> Any:
    """One GCS RPC (GetClusterId), with or without the token; returns the gRPC status code."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        metadata = [("authorization", f"Bearer {token}")] if token else None
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=20)
        except grpc.RpcError as err:
            return err.code()
        return grpc.StatusCode.OK


@pytest.mark.slow  # its own Ray head and the smoke job (~2-4 min on 2 cores)
def test_token_auth_head_refuses_plain_clients_and_runs_the_readme_submission(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A head started as README says (a token, then `ray start --head`) in its own process group, with a private
    HOME (its ~/.ray/auth_token) and RAY_TMPDIR on free loopback ports; the client has another HOME holding a copy
    of the token file. Without RAY_AUTH_MODE=token the jobs API refuses the client; README's line runs the job."""
    import grpc

    from tests.conftest import free_port, stop_process_group
    from tests.test_safety import _non_loopback_ipv4

    tmp = tmp_path_factory.mktemp("tok")  # short: Ray's socket paths must stay < 108 bytes
    head_home, client_home, bare_home = tmp / "head-home", tmp / "client-home", tmp / "bare-home"
    for d in (head_home, client_home, bare_home):
        d.mkdir()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head_env = _env(head_home, RAY_TMPDIR=str(tmp / "r"))
    gen = subprocess.run([ray_bin, "get-auth-token", "--generate"], env=head_env, capture_output=True, text=True,
                         timeout=120)
    token_file = head_home / ".ray" / "auth_token"
    assert gen.returncode == 0 and token_file.is_file(), gen.stderr
    token = token_file.read_text().strip()
    (client_home / ".ray").mkdir()
    shutil.copyfile(token_file, client_home / ".ray" / "auth_token")  # "~/.ray/auth_token copied from the head"

    port, dash = free_port(), free_port()
    log = tmp / "head.log"
    with open(log, "w") as out:
        head = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--temp-dir={tmp / 'r'}", "--disable-usage-stats",
             *(f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                      "runtime-env-agent-port", "metrics-export-port",
                                                      "ray-client-server-port"))],
            env=head_env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        env_words, cmd = _readme_submit_command()
        assert env_words == {"RAY_AUTH_MODE": "token"} and cmd[:5] == ["ray", "job", "submit", "--address",
                                                                          "http://HEAD:8265"], cmd
        cmd = [ray_bin, *cmd[1:4], f"http://127.0.0.1:{dash}", *cmd[5:]]
        deadline = time.time() + 180

        # 1. The plain client (no RAY_AUTH_MODE; the token file is there all the same) is refused.
        refused = _submit(cmd, _env(client_home), deadline)
        said = refused.stdout + refused.stderr
        assert head.poll() is None, log.read_text()[-3000:]
        assert "Token authentication is enabled" in log.read_text(), log.read_text()[-3000:]
        assert refused.returncode != 0 and "Authentication required" in said, said[-3000:]
        assert "RAY_AUTH_MODE is currently 'disabled'" in said, said[-3000:]

        # 2. README's line: RAY_AUTH_MODE=token, the token from ~/.ray/auth_token. It runs the smoke job.
        t0 = time.perf_counter()
        done = _submit(cmd, _env(client_home, **env_words), time.time() + 120)
        wall = time.perf_counter() - t0
        out = done.stdout
        assert done.returncode == 0 and "succeeded" in out.lower(), out[-4000:] + done.stderr[-4000:]
        summary = json.loads(out[out.index("{\n") : out.index("\n}\n", out.index("{\n")) + 2])
        assert summary["run_id"] and "eval.student.fd" in summary["metrics"], summary
        (job_id,) = set(re.findall(r"Job '(raysubmit_\w+)' succeeded", out))
        print(f"smoke job on the token-auth head: {wall:.0f} s")

        # 3. RAY_AUTH_TOKEN instead of a token file; a wrong token is refused.
        status = [ray_bin, "job", "status", "--address", f"http://127.0.0.1:{dash}", job_id]
        by_env = subprocess.run(status, env=_env(bare_home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
                                capture_output=True, text=True, timeout=120)
        assert by_env.returncode == 0 and f"Job '{job_id}' succeeded" in by_env.stdout, by_env.stderr[-3000:]
        wrong = subprocess.run(status, env=_env(bare_home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * len(token)),
                               capture_output=True, text=True, timeout=120)
        assert wrong.returncode != 0 and "Authentication" in wrong.stdout + wrong.stderr, wrong.stdout[-3000:]

        # 4. The GCS answers on every interface (see the xfail in test_safety.py), but with token authentication on
        # it serves no RPC without the token, on loopback or on the machine's outward address.
        hosts = ["127.0.0.1", *filter(None, [_non_loopback_ipv4()])]
        for host in hosts:
            assert _gcs_rpc(f"{host}:{port}", None) == grpc.StatusCode.UNAUTHENTICATED, host
            assert _gcs_rpc(f"{host}:{port}", token) == grpc.StatusCode.OK, host
    finally:
        stop_process_group(head)
