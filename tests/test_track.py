"""rayflow.track against a real MLflow sqlite store (one per module: creating the schema costs ~5 s)."""

from __future__ import annotations

import logging
import os
import pickle
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

mlflow = pytest.importorskip("mlflow")

from rayflow import track  # noqa: E402
from rayflow.config import TrackingConfig  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mlflow")
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield SimpleNamespace(uri=f"sqlite:///{root / 'mlflow.db'}", root=root)
    mlflow.set_tracking_uri(saved)  # start_run sets the global URI; other modules must not inherit ours


@pytest.fixture
def experiment(request: pytest.FixtureRequest) -> str:
    return re.sub(r"\W", "_", request.node.name)  # one experiment per test keeps runs apart


def _client(store) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=store.uri)


def test_start_run_logs_params_in_batches_and_provenance_tags(store, experiment):
    assert store.uri.startswith("sqlite:////")
    params = {f"p{i:03d}": i for i in range(150)}  # > 100: needs two log_batch calls
    params["long"] = "x" * 7000
    params["list"] = [1, 2, 2]
    tracking = TrackingConfig(uri=store.uri, experiment=experiment)
    run_id = track.start_run(tracking, "demo", params, {"team": "vision"})

    run = _client(store).get_run(run_id)
    assert run.info.run_name == "demo" and run.info.status == "RUNNING"
    assert len(run.data.params) == 152
    assert run.data.params["p149"] == "149" and run.data.params["list"] == "[1, 2, 2]"
    assert len(run.data.params["long"]) == 6000 and run.data.params["long"].endswith("...")
    tags = run.data.tags
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["rayflow.git_commit"])
    assert tags["rayflow.version"] == "0.1.0"
    assert tags["rayflow.torch_version"].startswith("2.")
    assert tags["rayflow.ray_version"] == "2.60.0" and tags["rayflow.mlflow_version"] == "3.17.2"
    assert tags["team"] == "vision" and tags[track.RUN_KEY_TAG] == "demo"
    # Artifacts sit next to the database, not in ./mlruns of whatever directory the driver ran in.
    exp = _client(store).get_experiment(run.info.experiment_id)
    assert exp.artifact_location == str(store.root / "mlartifacts" / experiment)


def test_rerun_reuses_interrupted_run_but_not_finished_one(store, experiment):
    start = lambda name="job", key=None: track.start_run(  # noqa: E731
        store.uri, name, {"lr": 0.1}, experiment=experiment, run_key=key)
    first = start()
    assert start() == first  # still RUNNING: the driver died without ending it
    track.end_run(store.uri, first, "FAILED")
    assert start() == first
    assert _client(store).get_run(first).info.status == "RUNNING"
    track.end_run(store.uri, first, "KILLED")
    assert start() == first
    track.end_run(store.uri, first, "FINISHED")
    second = start()
    assert second != first  # a finished run is history, not something to resume into
    assert start(key="other-config") not in (first, second)
    assert start(name="other-name") not in (first, second)
    assert len(_client(store).search_runs([_client(store).get_experiment_by_name(experiment).experiment_id])) == 4


def test_find_run(store, experiment):
    run_id = track.start_run(store.uri, "a", {}, {track.RUN_KEY_TAG: "k'1"}, experiment=experiment)
    exp_id = _client(store).get_experiment_by_name(experiment).experiment_id
    assert track.find_run(store.uri, exp_id, "a", "k'1") == run_id  # a quote in the key still matches
    assert track.find_run(store.uri, exp_id, "a", "k2") is None
    assert track.find_run(store.uri, exp_id, "b", "k'1") is None
    track.end_run(store.uri, run_id)
    assert track.find_run(store.uri, exp_id, "a", "k'1") is None
    assert track.find_run(store.uri, exp_id, "a", "k'1", statuses=["FINISHED"]) == run_id


def test_resumed_run_keeps_first_params_and_tags_changed_ones(store, experiment):
    run_id = track.start_run(store.uri, "r", {"images": 100, "lr": 1}, experiment=experiment)
    assert track.start_run(store.uri, "r", {"images": 200, "lr": 1, "new": "x"}, experiment=experiment) == run_id
    data = _client(store).get_run(run_id).data
    assert data.params == {"images": "100", "lr": "1", "new": "x"}
    assert data.tags["rayflow.resumed_param.images"] == "200"
    assert "rayflow.resumed_param.lr" not in data.tags


def test_parent_run(store, experiment):
    parent = track.start_run(store.uri, "sweep", {}, experiment=experiment)
    child = track.start_run(store.uri, "trial-0", {"k": 4}, experiment=experiment, parent_run_id=parent)
    assert _client(store).get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_metrics_image_grid_and_end_run(store, experiment, tmp_path):
    run_id = track.start_run(store.uri, "m", {}, experiment=experiment)
    track.log_metrics(store.uri, run_id, {"loss": 0.5, "fd": np.float32(2.0), "note": "skip", "n": 3}, step=10)
    track.log_metrics(store.uri, run_id, {"loss": 0.25}, step=20)
    c = _client(store)
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "loss")] == [(10, 0.5), (20, 0.25)]
    assert set(c.get_run(run_id).data.metrics) == {"loss", "fd", "n"}

    images = np.linspace(-1, 1, 10 * 8 * 8).reshape(10, 1, 8, 8)
    assert track.log_image_grid(store.uri, run_id, images, "samples_k8") == "images/samples_k8.png"
    assert [a.path for a in c.list_artifacts(run_id, "images")] == ["images/samples_k8.png"]
    local = c.download_artifacts(run_id, "images/samples_k8.png", str(tmp_path))
    with Image.open(local) as im:
        im.verify()  # a real, complete PNG
    with Image.open(local) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (4 * 10 + 2, 3 * 10 + 2)

    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    track.log_artifact_file(store.uri, run_id, str(notes), "reports")
    assert [a.path for a in c.list_artifacts(run_id, "reports")] == ["reports/notes.txt"]
    with pytest.raises(FileNotFoundError, match="FIX THIS"):
        track.log_artifact_file(store.uri, run_id, str(tmp_path / "missing.txt"))

    with pytest.raises(ValueError, match="FIX THIS"):
        track.end_run(store.uri, run_id, "DONE")
    track.end_run(store.uri, run_id, "KILLED")
    assert c.get_run(run_id).info.status == "KILLED"


def test_save_image_grid_pixels(tmp_path):
    images = np.full((3, 3, 2, 2), -1.0)  # black
    images[1] = 1.0  # white
    images[2, 0] = 1.0  # red
    path = tmp_path / "sub" / "grid.png"
    track.save_image_grid(images, str(path), nrow=3, pad_value=7)
    px = np.asarray(Image.open(path))
    assert px.shape == (2 + 2 + 2, 3 * 4 + 2, 3)
    assert (px[2, 2] == 0).all() and (px[2, 6] == 255).all() and list(px[2, 10]) == [255, 0, 0]
    assert (px[0] == 7).all() and (px[:, 0] == 7).all() and (px[:, 4:6] == 7).all()  # 2-px padding
    with pytest.raises(ValueError, match="channel-first"):
        track.save_image_grid(np.zeros((2, 8, 8, 3)), str(path))


def test_uri_checks_say_how_to_fix():
    for bad in ("sqlite:///relative.db", "file:///tmp/mlruns", "/tmp/mlruns"):
        with pytest.raises(ValueError, match="FIX THIS"):
            track.client(bad)


def test_report_callback_pickles_and_logs_rank0(store, experiment, tmp_path):
    run_id = track.start_run(store.uri, "cb", {}, experiment=experiment)
    cb = track.MLflowReportCallback(store.uri, run_id, prefix="distill/")
    cb = pickle.loads(pickle.dumps(cb))  # what Ray does to ship it to the controller actor

    rank1 = {"loss": 99.0, "images_seen": 128.0}
    cb.after_report(run_context=None, metrics=[{"loss": 0.5, "images_seen": 128.0, "phase": "aux"}, rank1],
                    checkpoint=None)
    from ray.train import Checkpoint

    ckpt_dir = tmp_path / "checkpoint_000001"
    track.save_image_grid(np.zeros((4, 1, 8, 8)), str(ckpt_dir / "samples.png"))  # an evaluation's grid
    ckpt = Checkpoint.from_directory(str(ckpt_dir))
    cb.after_report(run_context=None, metrics=[{"loss": 0.25, "images_seen": 256}, rank1], checkpoint=ckpt)
    pickle.dumps(cb)  # still picklable with a live client (Ray may re-ship it)

    c = _client(store)
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "distill/loss")] == [(128, 0.5), (256, 0.25)]
    assert "distill/phase" not in c.get_run(run_id).data.metrics
    assert c.get_run(run_id).data.tags[track.CHECKPOINT_TAG] == ckpt.path
    logged = [a.path for a in c.list_artifacts(run_id, "images/progress")]
    assert logged == ["images/progress/distill_step_0000000256.png"]


def test_report_callback_survives_tracking_errors(store, caplog):
    cb = track.MLflowReportCallback(store.uri, "0" * 32)  # no such run
    with caplog.at_level(logging.WARNING, logger="rayflow.track.callback"):
        cb.after_report(run_context=None, metrics=[{"loss": 1.0, "images_seen": 1}], checkpoint=None)
    assert "training continues" in caplog.text


def test_tracking_outage_queues_retries_and_spools(tmp_path):
    """A real server stopped mid-run: reports are queued (not raised), spooled, logged in order once it is
    back, the run is tagged; a spool left by a controller that died during the outage is replayed."""
    import json
    import time

    from mlflow import MlflowClient

    from tests.conftest import free_port, start_mlflow_server, stop_process_group

    port, store, spool = free_port(), tmp_path / "server", tmp_path / "spool.jsonl"
    store.mkdir()
    proc = start_mlflow_server(store, port)
    uri = f"http://127.0.0.1:{port}"
    run_id = track.start_run(uri, "outage", {"a": 1}, experiment="rayflow")
    cb = track.MLflowReportCallback(uri, run_id, spool=str(spool))
    cb.after_report(None, [{"images_seen": 64, "loss": 1.0}], None)
    stop_process_group(proc)
    t0 = time.perf_counter()
    for step, loss in ((128, 0.5), (192, 0.25)):
        cb.after_report(None, [{"images_seen": step, "loss": loss}], None)  # must neither raise nor hang
    assert time.perf_counter() - t0 < 90
    assert [json.loads(line)["step"] for line in spool.read_text().splitlines()] == [128, 192]

    proc = start_mlflow_server(store, port)
    try:
        cb.after_report(None, [{"images_seen": 256, "loss": 0.125}], None)
        c = MlflowClient(tracking_uri=uri)
        history = c.get_metric_history(run_id, "loss")
        assert [(h.step, h.value) for h in history] == [(64, 1.0), (128, 0.5), (192, 0.25), (256, 0.125)]
        assert track.RETRIED_TAG in c.get_run(run_id).data.tags
        assert spool.read_text() == ""  # nothing left for the driver
        assert track.replay_spool(uri, run_id, str(spool)) == 0 and not spool.exists()

        spool.write_text(json.dumps({"metrics": {"loss": 0.0625}, "step": 320}) + "\n")
        assert track.replay_spool(uri, run_id, str(spool)) == 1 and not spool.exists()
        assert [h.step for h in c.get_metric_history(run_id, "loss")][-1] == 320
    finally:
        stop_process_group(proc)


def test_ui_urls_point_at_the_runs_table_and_the_compare_view():
    from urllib.parse import parse_qs, unquote, urlsplit

    urls = track.ui_urls("sqlite:////abs/mlflow.db", "7", ["a1", "b2"])
    # A database has no UI of its own: `mlflow ui --backend-store-uri sqlite:////abs/mlflow.db` serves it here.
    assert urls["runs"] == "http://127.0.0.1:5000/#/experiments/7/runs"
    # The route MLflow 3.17's own Compare button builds (JSON.stringify of both id lists), percent-encoded.
    assert unquote(urls["compare"]) == 'http://127.0.0.1:5000/#/compare-runs?runs=["a1","b2"]&experiments=["7"]'
    query = parse_qs(urlsplit(urlsplit(urls["compare"]).fragment).query)
    assert query == {"runs": ['["a1","b2"]'], "experiments": ['["7"]']}
    assert not re.search(r'[\s"\[\]]', urls["compare"])  # nothing a terminal or a Markdown link would cut at

    # A server is its own UI: path prefix kept, credentials never printed.
    assert track.ui_urls("http://user:secret@mlflow:5000/", "1") == {"runs": "http://mlflow:5000/#/experiments/1/runs"}
    assert track.ui_urls("https://example.org/mlflow", "1", [])["runs"] == "https://example.org/mlflow/#/experiments/1/runs"
    assert track.ui_urls("http://[::1]:5000", "1")["runs"] == "http://[::1]:5000/#/experiments/1/runs"
    assert track.ui_urls("postgresql+psycopg2://db/mlflow", 3)["runs"] == "http://127.0.0.1:5000/#/experiments/3/runs"
    tunnel = track.ui_urls("http://10.0.0.5:5000", "2", ["c"], ui_base="http://127.0.0.1:15000/")
    assert tunnel["runs"] == "http://127.0.0.1:15000/#/experiments/2/runs" and tunnel["compare"].startswith(
        "http://127.0.0.1:15000/#/compare-runs?runs=%5B%22c%22%5D&")
    for bad in ("databricks", "file:///tmp/mlruns"):
        with pytest.raises(ValueError, match="FIX THIS"):
            track.ui_urls(bad, "1")
    with pytest.raises(ValueError, match="experiment id"):
        track.ui_urls("sqlite:////abs/mlflow.db", "")
