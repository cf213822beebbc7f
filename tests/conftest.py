"""Shared pytest fixtures.

`ray_cluster`: ONE real Ray head node per test session, started with `ray start --head` on 127.0.0.1 in
its own process group (starting Ray costs seconds, and mixing session and per-test `ray.init` fails).
The test process joins it as a driver; subprocesses (`python -m rayflow.train`, `ray job submit`) join
the same cluster through RAY_ADDRESS / the dashboard address. Tests that don't need Ray never start it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tiers by what a test does (its own code and its fixtures' code), so nobody has to remember to mark it:
    `ray` if it uses the session's Ray cluster or starts a head of its own, `e2e` if it runs a rayflow command
    (or a driver script) in a subprocess."""
    import inspect

    def source(fn) -> str:
        try:
            return inspect.getsource(fn)
        except (OSError, TypeError):
            return ""

    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        code = source(getattr(item, "function", None)) + "".join(
            source(d.func) for name in names for d in defs.get(name, ()) if name != "ray_cluster")
        if names & {"ray_cluster", "mlflow_server"} or any(
                h in code for h in ("_start_head(", "ray start --head", "ray.init(", "run_scenarios(")):
            item.add_marker(pytest.mark.ray)
        cli = ("_train_cmd", "_tune_cmd", "rayflow.", "ray job submit", "run_scenarios(")
        if "subprocess" in code and any(h in code for h in cli) or "run_scenarios(" in code:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _fast_tier_never_starts_ray(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test outside the `ray` tier must not start Ray (Ray Data and Train would start a local cluster quietly)."""
    yield
    if request.node.get_closest_marker("ray") is None and "ray" in sys.modules:
        import ray

        if ray.is_initialized() and not _RAY_FIXTURE_UP:
            ray.shutdown()
            pytest.fail("this test started Ray without the ray_cluster fixture; FIX THIS by requesting ray_cluster "
                        "(it is then in the `ray` tier)")


_RAY_FIXTURE_UP = False


# Logical CPUs for the test cluster. More than this 2-core box has on purpose: Ray Train workers and
# Ray Data read/map tasks then both get slots, instead of the data side starving silently.
TEST_CLUSTER_CPUS = 4

_TEST_ENV = {
    # ray.train.report blocks ~2 s per call at the default controller poll interval.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # A loopback-only test cluster: token auth only gets in the way of `ray status`/job APIs.
    "RAY_AUTH_MODE": "disabled",
    # Ray Data's per-operator progress output floods captured logs without telling a test anything.
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A head node with 4 logical CPUs and the dashboard (jobs API) on 127.0.0.1; yields
    {"address", "dashboard", "resources", "env"} and stops the whole process group at the end."""
    tmp = tmp_path_factory.mktemp("ray")  # short path: Ray's socket paths must stay < 108 bytes
    env = dict(_TEST_ENV, RAY_TMPDIR=str(tmp))
    saved = {k: os.environ.get(k) for k in [*env, "PATH"]}
    for key, value in env.items():
        os.environ.setdefault(key, value)

    import ray

    if ray.is_initialized():
        raise RuntimeError(
            "Ray was already initialised before the ray_cluster fixture; FIX THIS by requesting the "
            "ray_cluster fixture instead of calling ray.init() in tests"
        )
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # `python` in a submitted job's entrypoint must be this environment's interpreter, as on a cluster
    # whose image has rayflow installed.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    head = None
    try:
        # A loaded machine can fail a head's start (GCS health-check timeouts): try again on fresh ports.
        for attempt in range(3):
            head, address, dash = _start_head(ray_bin, tmp / f"a{attempt}")
            if _connect(ray, head, address, deadline=time.time() + 180):
                break
            stop_process_group(head)
        else:
            raise RuntimeError(f"the test Ray head did not come up in 3 attempts (logs under {tmp})")
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        info = {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "resources": ray.cluster_resources(),
                "env": dict(os.environ, RAY_ADDRESS=address)}
        global _RAY_FIXTURE_UP
        _RAY_FIXTURE_UP = True
        yield info
    finally:
        ray.shutdown()
        if head is not None:
            stop_process_group(head)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _start_head(ray_bin: str, temp_dir: Path) -> tuple[subprocess.Popen, str, int]:
    temp_dir.mkdir(parents=True, exist_ok=True)
    port, dash = free_port(), free_port()
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--num-cpus={TEST_CLUSTER_CPUS}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # fixed defaults would collide with any other Ray on this machine (the job agent then never starts)
         *(f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                  "runtime-env-agent-port", "metrics-export-port",
                                                  "ray-client-server-port"))],
        env=os.environ.copy(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return head, f"127.0.0.1:{port}", dash


def _connect(ray: Any, head: subprocess.Popen, address: str, deadline: float) -> bool:
    while True:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
            return True
        except Exception:
            if time.time() > deadline or head.poll() is not None:
                return False
            time.sleep(1)


def start_mlflow_server(tmp: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port with a sqlite backend under tmp, in its own process group; returns
    once /health answers. Restarting it on the same tmp and port brings the same store back."""
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job-runner pool (~3 GB)
    with open(tmp / "server.log", "a") as log:
        proc = subprocess.Popen(
            [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
             "--default-artifact-root", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_process_group(proc)
            raise RuntimeError(f"mlflow server did not start: {(tmp / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            return
        except ProcessLookupError:  # already gone
            proc.poll()
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend) for the module; yields its URI."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)
