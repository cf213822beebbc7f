"""Text-to-image end to end: config checks, embeddings cached by `rayflow.prepare` read back exactly, a NaN in
cached embeddings stopped with the shard named, and `python -m rayflow.train experiment=text_demo` (guided
distillation from the shipped text teacher, caption-consistency evaluation) and teacher training on a real Ray head.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data.extensions import ArrowTensorArray

from rayflow.config import ConfigError, DataConfig, JobConfig
from rayflow.resolve import resolve
from rayflow.weights import read_state_dict

ROOT = Path(__file__).resolve().parents[1]


def _job(**data) -> JobConfig:
    return resolve(JobConfig.from_dict({"data": data, "teacher": {"checkpoint": None}}))


@pytest.mark.parametrize("data,key", [
    ({"source": "mnist", "text_encoder": "minilm"}, "data.text_encoder"),
    ({"source": "shapes", "channels": 3}, "data.text_encoder"),
    ({"source": "parquet", "path": "x", "text_encoder": "precomputed"}, "data.text_dim"),
    ({"source": "webdataset", "path": "x", "text_encoder": "precomputed", "text_dim": 8}, "data.text_encoder"),
    ({"source": "parquet", "path": "x", "text_encoder": "hf"}, "data.text_encoder_path"),
    ({"source": "shapes", "channels": 3, "text_encoder": "minilm", "text_max_tokens": 0}, "data.text_max_tokens"),
    ({"source": "shapes", "channels": 3, "text_encoder": "t5"}, "data.text_encoder"),
])
def test_bad_text_configs_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _job(**data)


def test_text_config_reads_the_encoder_dim_and_uses_the_all_zero_null_condition():
    job = _job(source="shapes", channels=3, text_encoder="minilm", text_dim=0)
    assert job.data.text_dim == 384 and job.data.null_condition == 0
    assert _job().data.null_condition == 10  # class data: the null class index


def _shard(path: Path, emb: np.ndarray, mask: np.ndarray) -> None:
    n = len(emb)
    pq.write_table(pa.table({
        "image": ArrowTensorArray.from_numpy(np.zeros((n, 16, 16, 3), np.uint8)),
        "label": pa.array(np.arange(n), pa.int64()),
        "text_emb": ArrowTensorArray.from_numpy(emb.astype(np.float32)),
        "text_mask": ArrowTensorArray.from_numpy(mask.astype(np.int8)),
    }), path)


def test_nan_in_precomputed_embeddings_stops_with_the_row_named(ray_cluster, tmp_path):
    from rayflow.orchestrate.datasets import source_dataset

    emb, mask = np.random.default_rng(0).normal(size=(6, 4, 8)), np.ones((6, 4))
    emb[3, 1, 2] = np.nan
    _shard(tmp_path / "a.parquet", emb, mask)
    data = DataConfig(source="parquet", path=str(tmp_path), resolution=16, channels=3, text_encoder="precomputed",
                      text_dim=8, text_max_tokens=4)
    data.validate()
    with pytest.raises(Exception, match=r"(?s)a\.parquet: text_emb column: row 3 .*NaN.*FIX THIS"):
        source_dataset(data).take_all()
    # the same shard without the NaN trains: cond = embeddings and mask, packed
    emb[3, 1, 2] = 0.5
    _shard(tmp_path / "a.parquet", emb, mask)
    rows = sorted(source_dataset(data).take_all(), key=lambda r: r["label"])
    np.testing.assert_allclose(np.stack([r["cond"][..., :-1] for r in rows]), emb, rtol=1e-6)
    assert all((r["cond"][..., -1] == 1).all() for r in rows)


@pytest.mark.slow  # MiniLM loads in two actors (prepare, then the online stage): ~1 min
def test_prepared_embeddings_equal_the_online_encoder(ray_cluster, tmp_path):
    from rayflow.data.sources import shapes
    from rayflow.data.text import encode_text
    from rayflow.orchestrate.datasets import source_dataset
    from rayflow.prepare import prepare_text

    out = tmp_path / "shards"
    manifest = prepare_text("shapes", "shapes", str(out), 16, encoder="minilm", num_images=48, shard_size=20)
    assert manifest["num_images"] == 48 and manifest["text_dim"] == 384 and len(manifest["shards"]) >= 2
    assert "data.text_encoder=precomputed" in manifest["train_with"]
    cached = DataConfig(source="parquet", path=str(out), resolution=16, channels=3, text_encoder="precomputed",
                        text_dim=384, text_max_tokens=16)
    a = source_dataset(cached).take_all()
    # the same 48 renders (shapes_arrays depends on n), encoded by the online actor stage
    b = encode_text(shapes(16, n=48), encoder="minilm", path=None, max_tokens=16, dim=384,
                    cpus_per_worker=0.5).take_all()

    def by_image(rows):
        return {r["image"].tobytes(): r["cond"] for r in rows}

    a, b = by_image(a), by_image(b)
    assert len(a) == 48 and set(a) == set(b)
    for key, cond in a.items():
        np.testing.assert_allclose(cond, b[key], rtol=0, atol=1e-6)


def _train(tmp: Path, env: dict, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "rayflow.train", "experiment=text_demo", f"run.storage_path={tmp / 'runs'}",
           f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "data.batch_size=16", "run.report_every_images=32",
           "run.checkpoint_every_images=64", "run.eval_samples=32", "run.eval_batch=32", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    start = proc.stdout.index("{\n")
    return json.loads(proc.stdout[start : proc.stdout.index("\n}\n", start) + 2])


@pytest.mark.slow  # a guided distillation run plus evaluation on a real Ray head: minutes
def test_text_demo_distils_the_guided_teacher_and_scores_caption_consistency(ray_cluster, tmp_path):
    from evaluation.tiny_clip import save_tiny_clip  # tests/evaluation: a random CLIP saved offline
    from mlflow import MlflowClient

    save_tiny_clip(str(tmp_path / "clip"))
    out = _train(tmp_path, ray_cluster["env"], "distill.train_images=64", "distill.steps=2",
                 "teacher.sample_steps=4", "run.eval_every_images=32", "run.eval_proxy_samples=16",
                 f"eval.clip_model={tmp_path / 'clip'}")
    assert out["distill_train"]["images_seen"] == 64
    m = out["metrics"]
    for name in ("teacher_ancestral", "teacher_ddim", "student"):
        assert 0.0 <= m[f"eval.{name}.caption_consistency"] <= 1.0
        assert m[f"eval.{name}.caption_consistency"] == m[f"eval.{name}.accuracy"]
        assert 0.0 <= m[f"eval.{name}.clip_score"] <= 100.0  # wired through; a random CLIP's value means nothing
    assert m["eval.student.nfe"] == 2
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(out["run_id"])
    assert run.data.params["data.text_encoder"] == "minilm" and run.data.params["teacher.guidance_scale"] == "2.0"
    assert "eval.proxy_caption_consistency" in run.data.metrics  # in-training evaluation on captions
    # the student samples with one network call per step: the exported weights are an unguided text UNet
    state = read_state_dict(out["student_path"])
    assert any(".kv." in k for k in state) and "net.text.null_token" in state


@pytest.mark.slow  # teacher training with null-caption dropout through the encoder stage on Ray Train
def test_text_teacher_trains_from_captions(ray_cluster, tmp_path):
    out = _train(tmp_path, ray_cluster["env"], "task=teacher", "teacher.checkpoint=null", "teacher.sha256=null",
                 "teacher.train_images=64", "model=unet_tiny", "run.name=text_teacher")
    assert out["teacher_train"]["images_seen"] == 64
    state = read_state_dict(out["teacher_path"])
    assert state["net.text.proj.1.weight"].shape[1] == 384


def test_eval_text_keys_are_checked(tmp_path):
    text = {"source": "shapes", "channels": 3, "text_encoder": "minilm"}
    with pytest.raises(ConfigError, match=r"eval\.clip_model.*this data has\s+none"):
        JobConfig.from_dict({"data": {}, "teacher": {"checkpoint": None}, "eval": {"clip_model": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"eval\.clip_model.*local CLIP folder"):
        resolve(JobConfig.from_dict({"data": text, "teacher": {"checkpoint": None},
                                     "eval": {"clip_model": str(tmp_path)}}))
    with pytest.raises(ConfigError, match=r"eval\.captions"):
        JobConfig.from_dict({"data": text, "teacher": {"checkpoint": None}, "eval": {"captions": []}})
    job = JobConfig.from_dict({"data": text, "teacher": {"checkpoint": None}, "eval": {"captions": "a red circle"}})
    assert job.eval.captions == ["a red circle"]


def test_caption_data_rayflow_cannot_score_refuses_in_training_evaluation_and_sweeps():
    from rayflow.config import SweepConfig

    wds = {"source": "webdataset", "path": "/shards", "channels": 3, "text_encoder": "minilm"}
    with pytest.raises(ConfigError, match=r"run\.eval_every_images.*data\.source=shapes"):
        JobConfig.from_dict({"data": wds, "teacher": {"checkpoint": None}, "run": {"eval_every_images": 512}})
    job = JobConfig.from_dict({"data": wds, "teacher": {"checkpoint": None}})
    assert not job.data.scorable and _job(source="shapes", channels=3, text_encoder="minilm").data.scorable
    with pytest.raises(ConfigError, match=r"'data\.source' = 'webdataset'.*score"):
        SweepConfig.from_dict({"name": "g", "space": {"teacher.guidance_scale": {"grid": [1.0, 2.0]}}}, job)
