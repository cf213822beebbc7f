"""Config-aware model construction and safe teacher loading (shared by workers and the driver)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from rayflow.config import DataConfig, ModelConfig
from rayflow.core.diffusion import Denoiser, GuidedDenoiser
from rayflow.core.schedule import CosineSchedule, Schedule, resolution_shift
from rayflow.nets import build_net


def build_schedule(model: ModelConfig, data: DataConfig) -> Schedule:
    """The VP cosine schedule, logSNR-shifted for resolutions above model.base_resolution."""
    return CosineSchedule(shift=resolution_shift(data.resolution, model.base_resolution))


def build_denoiser(model: ModelConfig, data: DataConfig) -> Denoiser:
    """A fresh (randomly initialised) class-conditional denoiser g(z_t, t, class) for the configured data."""
    net = build_net(
        model.net,
        in_channels=data.channels,
        channels=model.channels,
        channel_mult=model.channel_mult,
        num_res_blocks=model.num_res_blocks,
        attn_levels=model.attn_levels,
        num_classes=data.num_classes,
        dropout=model.dropout,
    )
    return Denoiser(net, build_schedule(model, data), model.prediction)


def guided(denoiser: torch.nn.Module, scale: float, num_classes: int) -> torch.nn.Module:
    """Classifier-free guidance with the null class `num_classes`; scale 0 returns the denoiser itself."""
    return GuidedDenoiser(denoiser, scale, null_cond=num_classes) if scale > 0 else denoiser


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state_dict(state: dict, path: str | os.PathLike) -> str:
    """Write a torch state dict atomically (temp file + rename); returns its SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return sha256_file(path)


def load_teacher(
    path: str, model: ModelConfig, data: DataConfig, *, sha256: str | None = None, device="cpu"
) -> Denoiser:
    """Load a teacher state_dict (weights only) into the configured architecture, frozen, in eval mode."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"teacher checkpoint {path!r} does not exist. FIX THIS by setting teacher.checkpoint to a file "
            "written by `python -m rayflow.train task=teacher` (see README)"
        )
    if sha256 and sha256_file(path) != sha256:
        raise ValueError(
            f"teacher checkpoint {path} has SHA-256 {sha256_file(path)}, expected {sha256} "
            "(teacher.sha256). FIX THIS by pointing at the right file or updating teacher.sha256"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    den = build_denoiser(model, data)
    expected = den.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"teacher checkpoint {path} does not match the model config (model.*, data.channels, "
            f"data.num_classes): missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}. "
            "FIX THIS by using the model config the teacher was trained with"
        )
    den.load_state_dict(state)
    return den.to(device).eval().requires_grad_(False)
