"""Config-aware model construction and safe teacher loading (shared by workers and the driver)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from rayflow.config import DataConfig, ModelConfig, TeacherConfig
from rayflow.core.diffusion import Denoiser, GuidedDenoiser
from rayflow.core.schedule import CosineSchedule, Schedule, resolution_shift
from rayflow.files import sha256_file
from rayflow.nets import build_net
from rayflow.teachers import load_adapted_teacher, verify_digests
from rayflow.weights import check_state_dict, read_state_dict

__all__ = ["build_denoiser", "build_schedule", "guided", "load_teacher", "save_state_dict", "sha256_file"]


def build_schedule(model: ModelConfig, data: DataConfig) -> Schedule:
    """The VP cosine schedule, logSNR-shifted for resolutions above model.base_resolution."""
    return CosineSchedule(shift=resolution_shift(data.resolution, model.base_resolution))


def build_denoiser(model: ModelConfig, data: DataConfig) -> Denoiser:
    """A fresh (randomly initialised) denoiser g(z_t, t, cond) for the configured data: cond is the class label, or
    with a text encoder the packed text condition (rayflow.data.text)."""
    net = build_net(
        model.net,
        in_channels=data.channels,
        channels=model.channels,
        channel_mult=model.channel_mult,
        num_res_blocks=model.num_res_blocks,
        attn_levels=model.attn_levels,
        num_classes=0 if data.text else data.num_classes,
        dropout=model.dropout,
        **({"text_dim": data.text_dim} if data.text else {}),
    )
    return Denoiser(net, build_schedule(model, data), model.prediction)


def guided(denoiser: torch.nn.Module, scale: float, data: DataConfig) -> torch.nn.Module:
    """Classifier-free guidance against the data's null condition (the null class, or the all-zero text
    condition); scale 0 returns the denoiser itself."""
    return GuidedDenoiser(denoiser, scale, null_cond=data.null_condition) if scale > 0 else denoiser


def save_state_dict(state: dict, path: str | os.PathLike) -> str:
    """Write a torch state dict atomically (temp file + rename); returns its SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a crash mid-write leaves the previous file, and no half-written one
        raise
    return sha256_file(path)


def load_teacher(
    path: str,
    model: ModelConfig,
    data: DataConfig,
    *,
    sha256: str | None = None,
    device="cpu",
    teacher: TeacherConfig | None = None,
) -> nn.Module:
    """Load a teacher (or a student exported from it) frozen, in eval mode: weights only, checked key by key.

    Without `teacher` (or with teacher.adapter=native) the file is a state_dict of rayflow's own denoiser built
    from model.*; otherwise `teacher` says how to build and call the network (rayflow.teachers).
    """
    if teacher is not None and teacher.adapter != "native":
        return load_adapted_teacher(path, teacher, model, data, sha256=sha256, device=device)
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
    if teacher is not None and teacher.files_sha256 and os.path.abspath(path) == os.path.abspath(teacher.checkpoint):
        verify_digests(teacher)
    own = teacher is not None and os.path.abspath(path) == os.path.abspath(teacher.checkpoint or "")
    state = read_state_dict(path, state_key=teacher.state_key if own else None)  # exported students are flat
    den = build_denoiser(model, data)
    check_state_dict(
        den.state_dict(),
        state,
        f"teacher checkpoint {path} does not match the model config (model.*, data.channels, data.num_classes)",
        "using the model config the teacher was trained with, or teacher.adapter for a network of your own",
    )
    den.load_state_dict(state)
    return den.to(device).eval().requires_grad_(False)
