"""Bring your own teacher: build and safely load foreign diffusion networks behind rayflow's denoiser interface.

`teacher.adapter` picks how (README "Distill your own model"):
  native     rayflow's own UNet from model.* (a state_dict written by task=teacher)
  module     any nn.Module from `teacher.net = {_target_: pkg.module.factory, **kwargs}`, predicting eps, v or x
             on its own schedule (cosine, linear_beta, DDPM's N discrete steps, an alpha/sigma table)
  edm        an EDM-style network D(x; sigma, class) (or a raw F with teacher.sigma_data), also via `_target_`
  diffusers  a diffusers UNet2DModel / UNet2DConditionModel directory with its DDPM-family scheduler config
All become g(z_t, t, cond) -> x_hat on rayflow's VP time axis (`rayflow.core.adapters`); the student and the
aux are clones of that module, so they share the teacher's architecture, weights and calling convention.

Weights are read safely: `.safetensors`, or a torch state_dict with `weights_only=True`; keys and shapes must
match the built architecture exactly. Every file the teacher is read from has its SHA-256 recorded in the
config (`teacher.files_sha256`, logged to MLflow as params) and re-checked where it is loaded.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rayflow.core.adapters import EDMAdapter, NetCall, VPAdapter, edm_logsnr_range, vp_axis
from rayflow.core.schedule import (
    LOGSNR_MIN,
    CosineSchedule,
    LinearBetaSchedule,
    Schedule,
    TableSchedule,
    ddpm_alphas_cumprod,
    resolution_shift,
)
from rayflow.files import sha256_file
from rayflow.weights import check_state_dict, index_shards, read_state_dict

if TYPE_CHECKING:
    from rayflow.config import DataConfig, ModelConfig, TeacherConfig

DIFFUSERS_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
PRECOND_NAME = "teacher_precond.pt"  # beside a native teacher: 1 / (sqrt(Adam v) + eps) by parameter name


# ---------------------------------------------------------------------------------------------------
# Files: hashing, safe reading, key and shape checks
# ---------------------------------------------------------------------------------------------------


@dataclass
class DiffusersLayout:
    """Where a diffusers teacher's files lie: a model directory (config.json + weights), or a pipeline
    directory with unet/ and scheduler/ subfolders."""

    root: str
    model_dir: str
    config: str
    weights: list[str]  # one file, or the shards listed by an index (the index first)
    scheduler: str | None

    @classmethod
    def find(cls, root: str, scheduler_config: str | None = None) -> DiffusersLayout:
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"diffusers teacher {root!r} is not a directory. FIX THIS by pointing teacher.checkpoint at a "
                "folder written by save_pretrained (config.json + diffusion_pytorch_model.safetensors) or at a "
                "pipeline folder with unet/ and scheduler/"
            )
        model_dir = os.path.join(root, "unet") if os.path.isdir(os.path.join(root, "unet")) else root
        config = os.path.join(model_dir, "config.json")
        if not os.path.isfile(config):
            raise FileNotFoundError(f"diffusers teacher has no {config}. FIX THIS by saving the model with "
                                    "save_pretrained, or pointing teacher.checkpoint at the pipeline folder")
        weights = []
        for name in (SAFETENSORS_NAME, SAFETENSORS_NAME + ".index.json", BIN_NAME, BIN_NAME + ".index.json"):
            path = os.path.join(model_dir, name)
            if os.path.isfile(path):
                weights = [path] + index_shards(path) if name.endswith(".index.json") else [path]
                break
        if not weights:
            raise FileNotFoundError(f"no {SAFETENSORS_NAME} (or .bin, or a sharded index) in {model_dir}. "
                                    "FIX THIS by saving the model with save_pretrained(safe_serialization=True)")
        candidates = [scheduler_config] if scheduler_config else [
            os.path.join(root, "scheduler", "scheduler_config.json"), os.path.join(model_dir, "scheduler_config.json")
        ]
        scheduler = next((c for c in candidates if c and os.path.isfile(c)), None)
        if scheduler_config and scheduler is None:
            raise FileNotFoundError(f"teacher.scheduler_config {scheduler_config!r} does not exist. FIX THIS by "
                                    "pointing it at the scheduler_config.json the teacher was trained with")
        return cls(root, model_dir, config, weights, scheduler)


def teacher_files(t: TeacherConfig) -> dict[str, str]:
    """Name -> local path of every file the teacher is read from (empty when it is not on this machine).

    Names are relative to the checkpoint's folder, with characters MLflow param keys refuse replaced by '_'.
    """
    ckpt = t.checkpoint
    if not ckpt or "://" in ckpt or not os.path.exists(ckpt):
        return {}
    if t.adapter == "diffusers":
        lay = DiffusersLayout.find(ckpt, t.scheduler_config)
        paths = [lay.config, *lay.weights] + ([lay.scheduler] if lay.scheduler else [])
        base = ckpt
    else:
        paths = [ckpt]
        if t.adapter == "native" and os.path.isfile(os.path.join(os.path.dirname(ckpt), PRECOND_NAME)):
            paths.append(os.path.join(os.path.dirname(ckpt), PRECOND_NAME))
        if t.adapter == "module" and t.schedule == "table" and t.schedule_table:
            paths.append(t.schedule_table)
        base = os.path.dirname(ckpt)
    out = {}
    for p in paths:
        rel = os.path.relpath(p, base)
        name = os.path.basename(p) if rel.startswith("..") else rel
        out[re.sub(r"[^\w./ -]", "_", name)] = p
    return out


def file_digests(t: TeacherConfig) -> dict[str, str]:
    """SHA-256 of every teacher file (see `teacher_files`), by name."""
    return {name: sha256_file(p) for name, p in teacher_files(t).items()}


def verify_digests(t: TeacherConfig) -> None:
    """The teacher files must still be the ones recorded in teacher.files_sha256 (on the driver, at config time)."""
    for name, path in teacher_files(t).items():
        want = t.files_sha256.get(name)
        if want and sha256_file(path) != want:
            raise ValueError(
                f"teacher file {path} changed since the run was configured: SHA-256 {sha256_file(path)}, recorded "
                f"{want} (teacher.files_sha256.{name}). FIX THIS by restoring the file, or starting a new run "
                "(another run.name) for the new teacher"
            )


def _strip_net_prefix(state: dict, expected: Mapping) -> dict:
    # A student exported by rayflow holds the adapter's state_dict ("net." + the network's keys).
    if state and all(k.startswith("net.") for k in state) and not all(k.startswith("net.") for k in expected):
        return {k[len("net.") :]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------------
# Building the adapter
# ---------------------------------------------------------------------------------------------------


def instantiate(spec: Mapping[str, Any]) -> nn.Module:
    """`{_target_: "pkg.module.factory", **kwargs}` -> factory(**kwargs), which must return an nn.Module."""
    spec = dict(spec)
    target = spec.pop("_target_", None)
    if not isinstance(target, str) or "." not in target:
        raise ValueError(f"teacher.net needs _target_: 'package.module.factory', got {target!r}. FIX THIS by "
                         "naming the function or class that builds your network")
    module_name, _, attr = target.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ImportError(
            f"cannot import teacher.net._target_ {target!r} ({type(e).__name__}: {e}). FIX THIS by installing the "
            "package that defines it on every node (pip install, or PYTHONPATH / Ray runtime_env py_modules)"
        ) from e
    net = factory(**spec)
    if not isinstance(net, nn.Module):
        raise TypeError(f"teacher.net._target_ {target!r} returned {type(net).__name__}, not a torch.nn.Module. "
                        "FIX THIS by pointing _target_ at a function or class that builds the network")
    return net


def net_schedule(t: TeacherConfig) -> Schedule:
    """The schedule a `module` teacher was trained on."""
    if t.schedule == "cosine":
        return CosineSchedule(shift=t.schedule_shift)
    if t.schedule == "linear_beta":
        return LinearBetaSchedule(t.beta_start, t.beta_end, t.num_train_steps)
    if t.schedule == "ddpm":
        return TableSchedule.from_alphas_cumprod(ddpm_alphas_cumprod(t.num_train_steps, t.beta_start, t.beta_end))
    if t.schedule == "table":
        with open(t.schedule_table) as f:
            table = json.load(f)
        if not {"alpha", "sigma"} <= set(table):
            raise ValueError(f"teacher.schedule_table {t.schedule_table} needs lists 'alpha' and 'sigma' (index i = "
                             "the network's timestep i). FIX THIS by writing {\"alpha\": [...], \"sigma\": [...]}")
        return TableSchedule(table["alpha"], table["sigma"])
    raise ValueError(f"unknown teacher.schedule {t.schedule!r}")


def _range(sch: Schedule) -> tuple[float, float]:
    ends = sch.logsnr(torch.tensor([1.0, 0.0], dtype=torch.float64))
    return ends[0].item(), ends[1].item()


def _call(t: TeacherConfig, data: DataConfig) -> NetCall:
    label_format = t.label_format or ("one_hot" if t.adapter == "edm" else "index")
    one_hot = data.num_classes if label_format == "one_hot" else 0
    out = data.channels if t.learned_sigma else None
    return NetCall(t.cond_arg, one_hot=one_hot, out_channels=out, drop_cond=label_format == "none")


def build_adapter(t: TeacherConfig, model: ModelConfig, data: DataConfig) -> nn.Module:
    """The teacher's network (weights as its constructor leaves them) wrapped as g(z_t, t, cond) -> x_hat."""
    shift = resolution_shift(data.resolution, model.base_resolution)
    if t.adapter == "module":
        sch = net_schedule(t)
        time_scale = 1.0 if isinstance(sch, TableSchedule) else t.time_scale
        return VPAdapter(instantiate(t.net), vp_axis(shift, _range(sch)), sch, t.prediction,
                         time_scale=time_scale, call=_call(t, data))
    if t.adapter == "edm":
        vp = vp_axis(shift, edm_logsnr_range(t.sigma_min, t.sigma_max))
        return EDMAdapter(instantiate(t.net), vp, sigma_data=t.sigma_data, call=_call(t, data))
    if t.adapter == "diffusers":
        return _diffusers_adapter(t, shift)
    raise ValueError(f"teacher.adapter={t.adapter!r} has no adapter to build (native teachers use build_denoiser)")


class DiffusersCall(NetCall):
    """diffusers' UNet calling convention: class labels as `class_labels` (dropped for a model without a class
    embedding); for UNet2DConditionModel a float condition (B, L, D) is `encoder_hidden_states` (text), and
    class labels come with an all-zero context."""

    def __init__(
        self, conditional_model: bool, takes_class: bool, context_dim: int = 0, out_channels: int | None = None
    ):
        super().__init__("class_labels", out_channels=out_channels)
        self.conditional_model, self.takes_class, self.context_dim = conditional_model, takes_class, int(context_dim)

    def __call__(self, net, x, time, cond):
        text = cond is not None and cond.is_floating_point()
        labels = {"class_labels": cond} if cond is not None and not text and self.takes_class else {}
        if not self.conditional_model:
            return self.unwrap(net(x, time, **labels))
        if text:
            return self.unwrap(net(x, time, encoder_hidden_states=cond.to(x.dtype)))
        context = torch.zeros(x.shape[0], 1, self.context_dim, device=x.device, dtype=x.dtype)  # (B, 1, D)
        return self.unwrap(net(x, time, encoder_hidden_states=context, **labels))


def _diffusers_adapter(t: TeacherConfig, shift: float) -> VPAdapter:
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("teacher.adapter=diffusers needs the optional extra. FIX THIS by "
                          "pip install 'rayflow[diffusers]' (diffusers==0.42.1)") from e
    lay = DiffusersLayout.find(t.checkpoint, t.scheduler_config)
    with open(lay.config) as f:
        config = json.load(f)
    cls_name = config.get("_class_name")
    if cls_name not in DIFFUSERS_CLASSES:
        raise ValueError(f"{lay.config} describes a {cls_name!r}; the diffusers adapter takes {DIFFUSERS_CLASSES}. "
                         "FIX THIS by pointing teacher.checkpoint at a UNet (the pipeline's unet/ folder)")
    if lay.scheduler is None:
        raise FileNotFoundError(f"no scheduler config beside the diffusers teacher {t.checkpoint}. FIX THIS by "
                                "setting teacher.scheduler_config to the scheduler_config.json it was trained with")
    with open(lay.scheduler) as f:
        sched_cfg = json.load(f)
    sched = getattr(diffusers, sched_cfg.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler)
    scheduler = sched.from_config(sched_cfg)
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise ValueError(f"scheduler {type(scheduler).__name__} in {lay.scheduler} has no alphas_cumprod (not a "
                         "DDPM-family schedule). FIX THIS by using the module or edm adapter for this teacher")
    # zero-terminal-SNR schedules end at alphas_cumprod = 0: stop at rayflow's logSNR floor instead
    ac = torch.as_tensor(ac, dtype=torch.float64).clamp(min=torch.sigmoid(torch.tensor(LOGSNR_MIN)).item())
    table = TableSchedule.from_alphas_cumprod(ac)
    prediction = t.prediction or DIFFUSERS_PREDICTIONS.get(sched_cfg.get("prediction_type", "epsilon"))
    if prediction is None:
        raise ValueError(f"unknown prediction_type {sched_cfg.get('prediction_type')!r} in {lay.scheduler}. "
                         f"FIX THIS by setting teacher.prediction to eps, v or x")
    net = getattr(diffusers, cls_name).from_config(config)
    learned = sched_cfg.get("variance_type") in ("learned", "learned_range") or t.learned_sigma
    in_ch = config.get("in_channels", 3)
    takes_class = bool(config.get("num_class_embeds") or config.get("class_embed_type")) and t.label_format != "none"
    call = DiffusersCall(cls_name == "UNet2DConditionModel", takes_class, config.get("cross_attention_dim") or 0,
                         out_channels=in_ch if learned else None)
    return VPAdapter(net, vp_axis(shift, (table.logsnr_min, table.logsnr_max)), table, prediction, call=call)


def freeze_unused(module: nn.Module, data: DataConfig) -> list[str]:
    """Freeze the parameters the adapted network never uses (EDM2's uncertainty head, say); returns their names.

    A student or aux wrapped in DistributedDataParallel would otherwise wait forever for their gradients. Found
    with one eval-mode forward and backward on two random images of the configured size.
    """
    params = dict(module.named_parameters())
    if not params:
        return []
    device = next(iter(params.values())).device
    training = module.training
    module.eval()  # no dropout, and no in-place weight updates some networks make in training mode
    g = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG (seeded training) untouched
    z = torch.randn(2, data.channels, data.resolution, data.resolution, device=device, generator=g)  # (2, C, H, W)
    t = torch.tensor([0.3, 0.7], device=device)
    cond = torch.zeros(2, dtype=torch.long, device=device)
    module.zero_grad(set_to_none=True)
    module(z, t, cond).float().square().mean().backward()
    unused = [name for name, p in params.items() if p.requires_grad and p.grad is None]
    for name in unused:
        params[name].requires_grad_(False)
    module.zero_grad(set_to_none=True)
    module.train(training)
    return unused


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def load_adapted_teacher(
    path: str, t: TeacherConfig, model: ModelConfig, data: DataConfig, *, sha256: str | None = None, device="cpu"
) -> nn.Module:
    """The teacher (or a student exported from it) at `path`, through teacher.adapter: frozen, eval mode.

    The architecture comes from `t` (its _target_, or the diffusers config under t.checkpoint); the weights
    from `path`: a state_dict file, or a diffusers folder.
    """
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} does not exist. FIX THIS by setting teacher.checkpoint "
                                "to your teacher's weights (README: Distill your own model)")
    if os.path.isdir(path) and t.adapter == "diffusers":
        weights = DiffusersLayout.find(path, t.scheduler_config).weights[0]
    elif os.path.isdir(path):
        raise IsADirectoryError(f"teacher checkpoint {path} is a folder; teacher.adapter={t.adapter} reads one "
                                "state_dict file. FIX THIS by pointing teacher.checkpoint at the weights file")
    else:
        weights = path
    if sha256 and sha256_file(weights) != sha256:
        raise ValueError(f"teacher checkpoint {weights} has SHA-256 {sha256_file(weights)}, expected {sha256} "
                         "(teacher.sha256). FIX THIS by pointing at the right file or updating teacher.sha256")
    if t.files_sha256 and os.path.abspath(path) == os.path.abspath(t.checkpoint or ""):
        verify_digests(t)
    adapter = build_adapter(t, model, data)
    net = adapter.net
    expected = net.state_dict()
    # state_key digs into the user's checkpoint; files rayflow exported (students) are flat state_dicts
    own = os.path.abspath(path) == os.path.abspath(t.checkpoint or "")
    state = _strip_net_prefix(read_state_dict(weights, state_key=t.state_key if own else None), expected)
    check_state_dict(
        expected, state, f"teacher weights {weights} do not match the network built from the teacher config "
        f"(adapter={t.adapter})", "building the architecture the weights were trained with (teacher.net kwargs, or "
        "the diffusers config.json), or teacher.state_key for checkpoints that nest their weights"
    )
    net.load_state_dict(state)
    return adapter.to(device).eval().requires_grad_(False)
