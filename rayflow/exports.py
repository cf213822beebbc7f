"""Self-describing exports: weights as safetensors with what it takes to sample them in the file's metadata.

A student exported at k = 4 says so; `rayflow.sample` / `rayflow.evaluate` build the network, the schedule and the
step count from the file, and a command-line value that contradicts the file is an error naming both (like
nanoGPT's checkpoints carrying `model_args`). Bare state_dicts of older runs still load, with a warning, from the
command line's config as before.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from rayflow import __version__
from rayflow.config import ConfigError, JobConfig, ModelConfig
from rayflow.core.schedule import resolution_shift
from rayflow.files import sha256_file

logger = logging.getLogger(__name__)

FORMAT = "rayflow-export/1"
META_KEY = "rayflow"
SUFFIX = ".safetensors"
# data keys a network's shape depends on
DATA_KEYS = ("channels", "resolution", "num_classes", "text_encoder", "text_dim", "text_max_tokens")


def describe(job: JobConfig, kind: str) -> dict[str, Any]:
    """The metadata of a `kind` ('teacher' | 'student') export of this job's network."""
    d, t = job.data, job.teacher
    return {
        "format": FORMAT,
        "kind": kind,
        "steps": job.distill.steps if kind == "student" else None,
        "model": dataclasses.asdict(job.model),
        "data": {k: getattr(d, k) for k in DATA_KEYS},
        "schedule": {"name": job.model.schedule,
                     "logsnr_shift": resolution_shift(d.resolution, job.model.base_resolution)},
        "prediction": job.model.prediction,
        "guidance_scale": t.guidance_scale,
        "teacher": {"adapter": t.adapter, "sha256": _teacher_sha256(job) if kind == "student" else None},
        "rayflow_version": __version__,
    }


def _teacher_sha256(job: JobConfig) -> str | None:
    t = job.teacher
    if t.sha256:
        return t.sha256
    return sha256_file(t.checkpoint) if t.checkpoint and os.path.isfile(t.checkpoint) else None


def write_export(state: dict[str, torch.Tensor], path: str | os.PathLike, meta: dict[str, Any]) -> str:
    """Write weights + metadata atomically (temp file + rename); returns the file's SHA-256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp),
                  metadata={META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha256_file(path)


def read_meta(path: str) -> dict[str, Any] | None:
    """The export metadata of a file, or None for a bare state_dict (any other format)."""
    if not str(path).endswith(SUFFIX) or not os.path.isfile(path):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    meta = json.loads(raw) if raw else None
    return meta if meta and meta.get("format") == FORMAT else None


# Command-line keys each metadata entry fixes; typing one of them (or selecting its config group) with another value
# than the file's is a contradiction.
def _file_values(meta: dict[str, Any]) -> dict[str, Any]:
    out = {f"model.{k}": v for k, v in meta["model"].items()}
    out |= {f"data.{k}": v for k, v in meta["data"].items()}
    out["teacher.guidance_scale"] = meta["guidance_scale"]
    out["eval.model"] = meta["kind"]
    if meta["kind"] == "student":
        out["distill.steps"] = out["eval.steps"] = meta["steps"]
    return out


def apply_meta(job: JobConfig, meta: dict[str, Any], path: str, typed: list[str]) -> JobConfig:
    """A new JobConfig whose network, data shape and step count are the file's. `typed` are the command line's
    overrides (Hydra's `key=value` strings): one that sets a described key, or selects a `model=`/`data=` group,
    to a value other than the file's raises ConfigError naming both."""
    want = _file_values(meta)
    flat = job.flat()
    for override in typed:
        key = override.split("=", 1)[0].lstrip("+~")
        keys = [k for k in want if k == key or (key in ("model", "data") and k.startswith(key + "."))]
        for k in keys:
            if _norm(flat.get(k)) != _norm(want[k]):
                raise ConfigError(
                    f"{override} contradicts the checkpoint {path}: it holds a {meta['kind']} with {k}={want[k]}"
                    f"{_k(meta)}; FIX THIS by dropping {key} from the command line (the file says what it is), or "
                    "pointing eval.checkpoint at another file"
                )
    data = dataclasses.replace(job.data, **meta["data"])
    model = ModelConfig(**meta["model"])
    teacher = dataclasses.replace(job.teacher, guidance_scale=meta["guidance_scale"])
    distill = dataclasses.replace(job.distill, steps=meta["steps"]) if meta["kind"] == "student" else job.distill
    model.validate(data)
    evaluation = dataclasses.replace(job.eval, model=meta["kind"])
    return dataclasses.replace(job, data=data, model=model, teacher=teacher, distill=distill, eval=evaluation)


def _k(meta: dict[str, Any]) -> str:
    return f" (k = {meta['steps']})" if meta["kind"] == "student" else ""


def _norm(v: Any) -> Any:
    return [_norm(x) for x in v] if isinstance(v, list | tuple) else (float(v) if isinstance(v, int | float)
                                                                         and not isinstance(v, bool) else v)


def warn_bare(path: str) -> None:
    logger.warning("%s holds no rayflow metadata (a bare state_dict of an older run): the network, schedule and "
                   "step count come from the command line's config, as before", path)
