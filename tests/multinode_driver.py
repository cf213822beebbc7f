"""Multi-node and failure scenarios on a local multi-node Ray cluster, for tests/test_multinode.py and
tests/test_failures.py. A multi-node cluster cannot share the pytest process's `ray.init`, so the tests call
`run_scenarios`, which runs

    python tests/multinode_driver.py scenarios OUT_DIR NAME [NAME ...]

That starts a `ray.cluster_utils.Cluster` (a head with 1 CPU plus two 1-CPU nodes, all on this machine), runs
each scenario and prints one JSON line per scenario (prefixed with RESULT). Training itself runs in a child
process (`python tests/multinode_driver.py train ...`), so a scenario can kill the driver like a user would.

Workers ask for 1 CPU each and no node has 2, so two workers always land on two different nodes, and one CPU
stays free for Ray Data's tasks (two 1-CPU workers on a 2-CPU node would starve the data side silently).

Scenarios (`single` is one worker, the others two; "NAME:tag" runs NAME again as another run):
  single, spread   uninterrupted runs (references)
  worker_kill      SIGKILL one Train worker process after the checkpoint at GATE_IMAGES
  node_removal     remove a (non-head) node hosting a worker at that point, then add a fresh node
  driver_kill      SIGKILL the training driver at that point, then run the same command again
A scenario's run stops at the gate (a callback on the Train controller waits there) until the failure is
injected, so the failure always lands after the same checkpoint, whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GLOBAL_BATCH = 32
IMAGES_PER_EPOCH = 1792  # digits: 1,797 rows; the global batch 32 uses 56 batches an epoch with 1 or 2 workers
TRAIN_IMAGES = 4608  # 144 updates, 2.6 epochs
CHECKPOINT_EVERY = 1024
# The failure comes after this checkpoint: in epoch 1, where the data order differs from epoch 0's, and at batch
# 40 of 56, where each of two ranks is past the first block (450 rows) of its shard.
GATE_IMAGES = 3072
SCENARIOS = ("single", "spread", "worker_kill", "node_removal", "driver_kill")
_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # ray.train.report blocks ~2 s at the default
    "RAY_AUTH_MODE": "disabled",  # loopback-only test cluster
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "OMP_NUM_THREADS": "1",
}


def job_dict(out: Path, workers: int) -> dict:
    """A tiny teacher job (8 px digits, 2-level UNet, global batch 32) on `workers` 1-CPU workers."""
    return {
        "task": "teacher",
        "data": {"source": "digits", "resolution": 8, "batch_size": GLOBAL_BATCH},
        "model": {"channels": 8, "channel_mult": [1, 2], "attn_levels": []},
        "teacher": {"checkpoint": None, "sha256": None, "train_images": TRAIN_IMAGES},
        "resources": {"num_workers": workers, "cpus_per_worker": 1.0, "torch_threads": 1, "max_failures": 2},
        "run": {"storage_path": str(out / "runs"), "report_every_images": CHECKPOINT_EVERY,
                "checkpoint_every_images": CHECKPOINT_EVERY},
    }


# ------------------------------------------------------------------------------------------------------
# The training driver (child process)
# ------------------------------------------------------------------------------------------------------


def _gate_class():
    from ray.train import UserCallback

    class Gate(UserCallback):
        """On the Train controller: at the first checkpoint with images_seen >= `at`, write `reached` and wait
        (at most `timeout` s) until `release` exists, so the scenario injects its failure at a known point."""

        def __init__(self, at: int, reached: str, release: str, timeout: float = 180.0) -> None:
            self.at, self.reached, self.release, self.timeout = at, reached, release, timeout

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if checkpoint is None or os.path.exists(self.release):
                return
            if metrics and metrics[0].get("images_seen", 0) >= self.at:
                Path(self.reached).write_text(json.dumps(metrics[0]))
                deadline = time.time() + self.timeout
                while not os.path.exists(self.release) and time.time() < deadline:
                    time.sleep(0.1)

    return Gate


def train_main(address: str, job_json: str, name: str, gate_dir: str) -> None:
    import ray
    import ray.train

    from rayflow.config import JobConfig
    from rayflow.orchestrate.training import run_training

    ray.init(address=address, log_to_driver=False)
    job = JobConfig.from_dict(json.loads(job_json))
    gate = _gate_class()(GATE_IMAGES, os.path.join(gate_dir, "reached"), os.path.join(gate_dir, "release"))
    out = run_training(job, "teacher", name, callbacks=[gate] if gate_dir else [])
    metrics = ray.train.Result.from_path(out.run_dir).metrics  # the latest checkpoint's report
    print("TRAINED " + json.dumps({"return_value": out.return_value, "checkpoint": out.checkpoint_dir,
                                   "metrics": metrics}), flush=True)
    ray.shutdown()


# ------------------------------------------------------------------------------------------------------
# The scenarios (parent process: owns the cluster)
# ------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scenarios:
    def __init__(self, out: Path) -> None:
        from ray.cluster_utils import Cluster

        self.out = out
        self.children: list[tuple[subprocess.Popen, Path]] = []
        # Ray's socket paths must stay < 108 bytes: a short private temp dir, also keeping this cluster's
        # address file away from any other Ray on the machine.
        self.tmp = tempfile.mkdtemp(prefix="rfmn", dir="/tmp")
        os.environ["RAY_TMPDIR"] = self.tmp
        os.makedirs(os.path.join(self.tmp, "ray"))  # Ray writes the cluster's address file there
        self.common = {"num_cpus": 1, "temp_dir": os.path.join(self.tmp, "ray")}
        self.cluster = Cluster()
        self.add_node(head=True)
        for _ in range(2):
            self.add_node()
        self.cluster.wait_for_nodes()
        self.dashboard = f"http://{self.cluster.webui_url}"

    def add_node(self, head: bool = False):
        # Ray gives a starting node a fixed 30 s to register, which a busy CI machine can miss: try again, on fresh
        # ports (what a failed try started goes when this process exits).
        for attempt in range(3):
            # the head's dashboard serves the State API (list_actors); fixed default ports could collide with
            # another Ray on this machine
            ports = ("dashboard_port", "dashboard_agent_listen_port", "ray_client_server_port")
            extra = {"include_dashboard": True, "dashboard_host": "127.0.0.1", **{p: _free_port() for p in ports}}
            extra = extra if head else {}
            try:
                return self.cluster.add_node(**self.common, **extra)
            except Exception:
                if attempt == 2:
                    raise

    def close(self) -> None:
        for proc, _ in self.children:  # a driver left behind by a failed scenario
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.cluster.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _start(self, run_name: str, workers: int, gate_dir: str = "") -> subprocess.Popen:
        cmd = [sys.executable, __file__, "train", self.cluster.address, json.dumps(job_dict(self.out, workers)),
               run_name, gate_dir]
        log = self.out / f"{run_name}-{len(self.children)}.log"
        with open(log, "w") as f:  # a file, not a pipe: nobody reads a pipe while a scenario waits at its gate
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        self.children.append((proc, log))
        return proc

    def _finish(self, proc: subprocess.Popen, timeout: float = 600) -> dict:
        try:
            proc.wait(timeout=timeout)
        finally:
            stdout = next(log for p, log in self.children if p is proc).read_text()
        lines = [ln for ln in stdout.splitlines() if ln.startswith("TRAINED ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"training driver failed (rc={proc.returncode}):\n{stdout[-6000:]}")
        return json.loads(lines[-1][len("TRAINED "):])

    def _workers(self) -> list[dict]:
        from ray.util.state import list_actors

        actors = list_actors(address=self.dashboard, filters=[("class_name", "=", "RayTrainWorker"),
                                                              ("state", "=", "ALIVE")])
        return [{"pid": a.pid, "node_id": a.node_id} for a in actors]

    def _gated(self, run_name: str, inject) -> dict:
        """Run `run_name` on two workers; at the gate, inject(proc, run_name) -> (info, the driver to wait for)."""
        gate = Path(tempfile.mkdtemp(prefix=f"{run_name}-gate-", dir=self.out))
        proc = self._start(run_name, 2, str(gate))
        deadline = time.time() + 600
        while not (gate / "reached").exists():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{run_name}: the run never reached the gate; {self._finish(proc, 60)}")
            time.sleep(0.1)
        at = json.loads((gate / "reached").read_text())
        info, proc = inject(proc, run_name, gate)
        (gate / "release").touch()
        return {"injected": info | {"gate_images_seen": at["images_seen"]}, **self._finish(proc)}

    def run(self, name: str) -> dict:
        """Run scenario `name` ("kind" or "kind:tag" to run a kind again under another run name)."""
        kind, run_name = name.split(":")[0], name.replace(":", "-")
        t0 = time.perf_counter()
        if kind in ("single", "spread"):
            res = self._finish(self._start(run_name, 1 if kind == "single" else 2))
        elif kind in ("worker_kill", "node_removal", "driver_kill"):
            res = self._gated(run_name, getattr(self, f"_{kind}"))
        else:
            raise ValueError(f"unknown scenario {kind!r}; FIX THIS by using one of {SCENARIOS}")
        head = self.cluster.head_node.node_id
        return {"scenario": name, "wall_s": round(time.perf_counter() - t0, 1), "head_node_id": head, **res}

    def _worker_kill(self, proc, run_name, gate):
        victim = self._workers()[-1]
        os.kill(victim["pid"], signal.SIGKILL)
        return {"killed_pid": victim["pid"], "node_id": victim["node_id"]}, proc

    def _node_removal(self, proc, run_name, gate):
        hosting = {w["node_id"] for w in self._workers()}
        node = next(n for n in self.cluster.worker_nodes if n.node_id in hosting)
        self.cluster.remove_node(node)
        # like an autoscaler replacing a lost machine: without it 2 CPUs remain for 2 workers and no data task
        fresh = self.add_node()
        return {"removed_node_id": node.node_id, "added_node_id": fresh.node_id}, proc

    def _driver_kill(self, proc, run_name, gate):
        proc.kill()  # SIGKILL: no Python cleanup, no ray.shutdown()
        proc.wait()
        time.sleep(5)
        # for the report: Train actors the dead driver may have left (the rerun must cope with them)
        from ray.util.state import list_actors

        left = list_actors(address=self.dashboard, filters=[("state", "=", "ALIVE")])
        left = sorted(a.class_name for a in left if a.class_name in ("TrainController", "RayTrainWorker"))
        (gate / "release").touch()
        # the same command again (the gate is released, so the rerun does not stop there)
        return {"killed_driver_pid": proc.pid, "train_actors_alive_5s_later": left}, self._start(run_name, 2, str(gate))


def run_scenarios(out: Path, names: list[str], timeout: float = 1500) -> dict[str, dict]:
    """Run the scenarios `names` in a child process with its own cluster; returns {name: result}.
    On a timeout the child's whole process group (cluster nodes, training drivers) is killed."""
    env = {**os.environ, **_ENV}
    env.pop("RAY_ADDRESS", None)  # never another cluster
    log = out / "scenarios.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, __file__, "scenarios", str(out), *names], stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    results = {r["scenario"]: r for r in (json.loads(ln[len("RESULT "):]) for ln in text.splitlines()
                                          if ln.startswith("RESULT "))}
    if proc.returncode != 0 or set(results) != set(names):
        raise AssertionError(f"scenarios {names} failed (rc={proc.returncode}); log {log}:\n{text[-8000:]}")
    return results


def scenarios_main(out: str, names: list[str]) -> None:
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    s = Scenarios(Path(out))
    try:
        for name in names:
            print("RESULT " + json.dumps(s.run(name)), flush=True)
    finally:
        s.close()


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train_main(*sys.argv[2:6])
    else:
        scenarios_main(sys.argv[2], sys.argv[3:])
