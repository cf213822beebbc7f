"""Bring your own teacher: the module, EDM and diffusers adapters end to end from a config, safe loading,
recorded file digests, student/aux built through the adapter, and distillation through an adapter on a mixture."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from torch import nn

from rayflow import lab
from rayflow.config import ConfigError, JobConfig, TeacherConfig
from rayflow.core.adapters import EDMAdapter, VPAdapter
from rayflow.core.diffusion import to_x_hat
from rayflow.core.gaussian_mixture import GaussianMixture, MixtureDenoiser
from rayflow.core.metrics import mixture_metrics
from rayflow.core.moment_matching import gradient_preconditioner
from rayflow.core.samplers import sample
from rayflow.core.schedule import LinearBetaSchedule, TableSchedule
from rayflow.files import sha256_file
from rayflow.models import load_teacher
from rayflow.resolve import resolve
from rayflow.weights import read_state_dict
from rayflow.worker.state import build_state

SPEC = {  # a 4-D mixture: images of 1 x 2 x 2 pixels for the network-shaped tests
    "weights": [0.5, 0.3, 0.2],
    "means": [[-1.0, 0.0, 0.5, 0.2], [1.0, 0.5, -0.5, 0.0], [0.0, -1.0, 0.0, -0.3]],
    "stds": [[0.1, 0.3, 0.2, 0.2], [0.3, 0.1, 0.2, 0.1], [0.15, 0.15, 0.4, 0.2]],
}
T = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
TOL = 1e-6

# Networks a user's package would define: the exact mixture denoiser, dressed as an eps/v/x network on its own
# schedule or as EDM's D / raw F. Written into a temporary module so `_target_` imports it like a user's code.
FACTORIES = textwrap.dedent('''
    import torch
    from torch import nn
    from rayflow.core.adapters import edm_precond
    from rayflow.core.gaussian_mixture import GaussianMixture
    from rayflow.core.schedule import CosineSchedule, LinearBetaSchedule, ddpm_alphas_cumprod

    class _Mixture(nn.Module):
        """Weights in a state_dict like a real network's: the component means (K, D), stds and weights."""

        def __init__(self, spec):
            super().__init__()
            self.means = nn.Parameter(torch.tensor(spec["means"], dtype=torch.float64))
            self.register_buffer("stds", torch.tensor(spec["stds"], dtype=torch.float64))
            self.register_buffer("weights", torch.tensor(spec["weights"], dtype=torch.float64))

        def denoise(self, x, a, s):
            gm = GaussianMixture(self.weights, self.means.detach(), torch.diag_embed(self.stds**2))
            return gm.denoise(x.flatten(1), a, s).reshape(x.shape)

    class MixtureNet(_Mixture):
        def __init__(self, spec, prediction, schedule, num_steps=1000, shift=0.0, time_scale=1.0):
            super().__init__(spec)
            self.prediction, self.schedule, self.time_scale = prediction, schedule, time_scale
            if schedule == "ddpm":
                self.register_buffer("ac", ddpm_alphas_cumprod(num_steps), persistent=False)
            else:
                cosine = schedule == "cosine"
                self.sch = CosineSchedule(shift=shift) if cosine else LinearBetaSchedule(num_steps=num_steps)

        def forward(self, x_in, time, y=None):
            time = time.double()
            if self.schedule == "ddpm":  # a discrete-time network: integer steps only (fractional in between)
                i = time.floor().long().clamp(max=len(self.ac) - 2)
                f = time - i
                lam_tab = torch.log(self.ac / (1 - self.ac))
                lam = lam_tab[i] * (1 - f) + lam_tab[i + 1] * f
                a, s = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
            else:
                a, s = self.sch.alpha_sigma(time / self.time_scale)
            shape = (-1,) + (1,) * (x_in.ndim - 1)
            x_hat = self.denoise(x_in, a, s)
            eps = (x_in - a.reshape(shape) * x_hat) / s.reshape(shape)
            out = {"eps": eps, "x": x_hat, "v": a.reshape(shape) * eps - s.reshape(shape) * x_hat}[self.prediction]
            return (out,)  # a tuple, as networks with return_dict=False give

    class MixtureEDM(_Mixture):
        def __init__(self, spec, sigma_data=None, label_dim=0):
            super().__init__(spec)
            self.sigma_data, self.label_dim = sigma_data, label_dim

        def forward(self, x, sigma, class_labels=None):
            if self.label_dim:
                assert class_labels is not None and class_labels.shape == (x.shape[0], self.label_dim)
            sigma = sigma.double()
            shape = (-1,) + (1,) * (x.ndim - 1)
            if self.sigma_data is None:
                return self.denoise(x, torch.ones_like(sigma), sigma)
            sigma = torch.exp(4.0 * sigma)  # the raw F gets c_noise = log(sigma) / 4
            c_skip, c_out, c_in, _ = edm_precond(sigma, self.sigma_data)
            x = x / c_in.reshape(shape)
            return (self.denoise(x, torch.ones_like(sigma), sigma) - c_skip.reshape(shape) * x) / c_out.reshape(shape)

    class WithUnusedHead(nn.Module):
        """A network with a parameter its denoising forward never touches (like EDM2's logvar head)."""

        def __init__(self, **unet):
            super().__init__()
            from rayflow.nets import build_net

            self.unet = build_net("unet", **unet)
            self.logvar = nn.Linear(4, 1)

        def forward(self, x, t, y=None):
            return self.unet(x, t, y)

    def make_edm(spec, **kw):
        return MixtureEDM(spec, **kw)

    def not_a_module():
        return 3
''')


@pytest.fixture()
def user_pkg(tmp_path, monkeypatch):
    (tmp_path / "user_nets.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    sys.modules.pop("user_nets", None)
    return importlib.import_module("user_nets")


def _gm() -> GaussianMixture:
    return GaussianMixture.from_spec(SPEC)


def _image_zt(vp) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, _ = _gm().sample(len(T), generator=g)
    alpha, sigma = vp.alpha_sigma(T)
    z = alpha[:, None] * x + sigma[:, None] * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return z.reshape(-1, 1, 2, 2), T


def _reference(adapter: nn.Module, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return MixtureDenoiser(_gm(), adapter.schedule)(z.flatten(1), t).reshape(z.shape)


def _job(teacher: dict, **sections) -> JobConfig:
    d = {"data": {"source": "digits", "resolution": 2, "channels": 1, "num_classes": 3, "batch_size": 8},
         "model": {"channels": 8, "channel_mult": [1], "attn_levels": []},
         "task": "distill" if teacher.get("checkpoint") else "demo",
         "teacher": teacher, **sections}
    return resolve(JobConfig.from_dict(d))  # as the driver does: the teacher files' digests recorded


def _save(module: nn.Module, path, fmt: str = "safetensors") -> str:
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return str(path)


MODULE_CASES = {
    "eps/ddpm1000": dict(prediction="eps", schedule="ddpm"),
    "v/cosine-shifted-t1000": dict(prediction="v", schedule="cosine", schedule_shift=-1.0, time_scale=1000.0),
    "x/linear_beta": dict(prediction="x", schedule="linear_beta"),
}


# ----- 1. the adapters, built from a config, against the exact reference -----


@pytest.mark.parametrize("case", sorted(MODULE_CASES))
def test_module_adapter_from_a_target_is_exact(user_pkg, tmp_path, case):
    c = MODULE_CASES[case]
    kw = {"shift": c["schedule_shift"], "time_scale": c["time_scale"]} if "time_scale" in c else {}
    net = user_pkg.MixtureNet(SPEC, c["prediction"], c["schedule"], **kw)
    path = _save(net, tmp_path / "teacher.safetensors")
    net_cfg = {"_target_": "user_nets.MixtureNet", "spec": SPEC, "prediction": c["prediction"],
               "schedule": c["schedule"], **kw}
    job = _job({"adapter": "module", "checkpoint": path, "net": net_cfg, **c})
    teacher = load_teacher(path, job.model, job.data, teacher=job.teacher).double()
    assert isinstance(teacher, VPAdapter) and not any(p.requires_grad for p in teacher.parameters())
    z, t = _image_zt(teacher.schedule)
    err = (teacher(z, t) - _reference(teacher, z, t)).abs().max().item()
    print(f"module adapter {case}: max |x_hat - reference| = {err:.3e}")
    assert err < TOL


@pytest.mark.parametrize("sigma_data", [None, 0.5])
def test_edm_adapter_from_a_target_is_exact_with_one_hot_labels(user_pkg, tmp_path, sigma_data):
    path = _save(user_pkg.make_edm(SPEC), tmp_path / "edm.pt", fmt="pt")
    net_cfg = {"_target_": "user_nets.make_edm", "spec": SPEC, "sigma_data": sigma_data, "label_dim": 3}
    job = _job({"adapter": "edm", "checkpoint": path, "net": net_cfg, "sigma_data": sigma_data})
    teacher = load_teacher(path, job.model, job.data, teacher=job.teacher).double()
    assert isinstance(teacher, EDMAdapter)
    # the VP axis is clipped to the trained sigma range [0.002, 80]
    assert teacher.schedule.logsnr_max == pytest.approx(-2 * math.log(0.002))
    z, t = _image_zt(teacher.schedule)
    y = torch.arange(len(t)) % 3
    err = (teacher(z, t, y) - _reference(teacher, z, t)).abs().max().item()
    print(f"edm adapter ({'D' if sigma_data is None else 'F + precond'}): max |x_hat - reference| = {err:.3e}")
    assert err < TOL


# ----- diffusers (the optional extra) -----

try:
    import diffusers
except ImportError:  # pragma: no cover - the extra is not installed
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="pip install 'rayflow[diffusers]'")


def _tiny_unet2d(num_classes: int | None = 4):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=num_classes, add_attention=False,
    )


def _save_diffusers(unet, root, *, prediction_type="epsilon", pipeline=False, **sched_kw) -> str:
    unet_dir = root / "unet" if pipeline else root
    unet.save_pretrained(unet_dir, safe_serialization=True)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, **sched_kw)
    sched.save_config(root / "scheduler" if pipeline else root)
    return str(root)


class MixtureUNet(nn.Module):
    """The exact denoiser behind diffusers' UNet2DModel interface, reading its DDPM scheduler's alphas_cumprod."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str):
        super().__init__()
        self.ac, self.prediction = alphas_cumprod.double(), prediction

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        u = timestep.double()
        lam_tab = torch.log(self.ac / (1 - self.ac))
        i = u.floor().long().clamp(max=len(self.ac) - 2)
        lam = lam_tab[i] * (1 - (u - i)) + lam_tab[i + 1] * (u - i)
        a, s = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        x_hat = _gm().denoise(sample.flatten(1), a, s).reshape(sample.shape)
        eps = (sample - a[:, None, None, None] * x_hat) / s[:, None, None, None]
        v = a[:, None, None, None] * eps - s[:, None, None, None] * x_hat
        return diffusers.models.unets.unet_2d.UNet2DOutput(sample={"epsilon": eps, "v_prediction": v}[self.prediction])


@needs_diffusers
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusers_adapter_maps_time_and_prediction_exactly(tmp_path, prediction_type):
    root = _save_diffusers(_tiny_unet2d(), tmp_path, prediction_type=prediction_type)
    job = _job({"adapter": "diffusers", "checkpoint": root})
    teacher = load_teacher(root, job.model, job.data, teacher=job.teacher)
    ac = diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    teacher.net = MixtureUNet(ac, prediction_type)  # the adapter's time mapping and conversion around the truth
    teacher.double()
    z, t = _image_zt(teacher.schedule)
    err = (teacher(z, t) - _reference(teacher, z, t)).abs().max().item()
    print(f"diffusers adapter ({prediction_type}): max |x_hat - reference| = {err:.3e}")
    assert err < TOL


@needs_diffusers
def test_diffusers_unet2d_runs_at_its_own_integer_timesteps(tmp_path):
    unet = _tiny_unet2d()
    root = _save_diffusers(unet, tmp_path, prediction_type="v_prediction", pipeline=True)
    job = _job({"adapter": "diffusers", "checkpoint": root}, data={"source": "digits", "resolution": 8,
                                                                   "channels": 3, "num_classes": 4, "batch_size": 8})
    teacher = load_teacher(root, job.model, job.data, teacher=job.teacher)
    assert set(job.teacher.files_sha256) == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                                             "scheduler/scheduler_config.json"}
    ac = torch.as_tensor(diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod, dtype=torch.float64)
    steps = torch.tensor([10, 300, 700, 950])
    t = teacher.schedule.time_of_logsnr(torch.log(ac[steps] / (1 - ac[steps]))).float()
    z, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        want = to_x_hat(unet.eval()(z, steps, class_labels=y).sample, z, t, teacher.schedule, "v")
        got = teacher(z, t, y)
    assert (got - want).abs().max() < 1e-4


@needs_diffusers
def test_an_unconditional_diffusers_model_ignores_the_class_labels(tmp_path):
    root = _save_diffusers(_tiny_unet2d(num_classes=None), tmp_path)
    job = _job({"adapter": "diffusers", "checkpoint": root}, data={"source": "digits", "resolution": 8,
                                                                   "channels": 3, "num_classes": 4, "batch_size": 8})
    teacher = load_teacher(root, job.model, job.data, teacher=job.teacher)
    z, t = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.equal(teacher(z, t, torch.tensor([1, 2])), teacher(z, t))


@needs_diffusers
def test_diffusers_unet2d_condition_takes_text_embeddings(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4,
    )
    root = _save_diffusers(unet, tmp_path)
    job = _job({"adapter": "diffusers", "checkpoint": root}, data={"source": "digits", "resolution": 8,
                                                                   "channels": 3, "num_classes": 4, "batch_size": 8})
    teacher = load_teacher(root, job.model, job.data, teacher=job.teacher)
    z, t, text = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.8]), torch.randn(2, 5, 12)
    ac = diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    u = TableSchedule.from_alphas_cumprod(ac).index_of_logsnr(teacher.schedule.logsnr(t.double())).float()
    with torch.no_grad():
        want = to_x_hat(unet.eval()(z, u, encoder_hidden_states=text).sample, z, t, teacher.schedule, "eps")
        assert (teacher(z, t, text) - want).abs().max() < 1e-4


@needs_diffusers
def test_diffusers_wrong_config_lists_the_mismatches(tmp_path):
    root = _save_diffusers(_tiny_unet2d(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["block_out_channels"] = [8, 32]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    job = _job({"adapter": "diffusers", "checkpoint": root})
    with pytest.raises(ValueError, match=r"shape mismatches \[.*file \(16.*vs config \(32") as e:
        load_teacher(root, job.model, job.data, teacher=job.teacher)
    assert "FIX THIS" in str(e.value)


# ----- 2. safe loading -----


def test_mismatched_keys_and_shapes_are_listed(user_pkg, tmp_path):
    net = user_pkg.MixtureNet(SPEC, "eps", "ddpm")
    state = {k: v for k, v in net.state_dict().items() if k != "stds"}
    state["means"] = torch.zeros(5, 4)
    state["extra.weight"] = torch.zeros(1)
    path = str(tmp_path / "bad.safetensors")
    from safetensors.torch import save_file

    save_file(state, path)
    job = _job({"adapter": "module", "checkpoint": path, "prediction": "eps", "schedule": "ddpm",
                "net": {"_target_": "user_nets.MixtureNet", "spec": SPEC, "prediction": "eps", "schedule": "ddpm"}})
    with pytest.raises(ValueError) as e:
        load_teacher(path, job.model, job.data, teacher=job.teacher)
    msg = str(e.value)
    assert "1 missing ['stds']" in msg and "1 unexpected ['extra.weight']" in msg
    assert "means: file (5, 4) vs config (3, 4)" in msg and "FIX THIS" in msg


def test_pickled_objects_are_refused_and_nested_state_dicts_are_selected(user_pkg, tmp_path):
    net = user_pkg.MixtureNet(SPEC, "eps", "ddpm")
    torch.save(net, tmp_path / "pickled.pt")  # a whole pickled module: code, not weights
    with pytest.raises(ValueError, match="weights_only=True.*FIX THIS"):
        read_state_dict(str(tmp_path / "pickled.pt"))
    torch.save({"ema": net.state_dict(), "step": torch.tensor(3)}, tmp_path / "nested.pt")
    assert set(read_state_dict(str(tmp_path / "nested.pt"), state_key="ema")) == set(net.state_dict())
    with pytest.raises(ValueError, match="state_key"):
        read_state_dict(str(tmp_path / "nested.pt"))
    with pytest.raises(ValueError, match="no entry 'model'"):
        read_state_dict(str(tmp_path / "nested.pt"), state_key="model")


def test_config_errors_name_the_key_and_the_fix(user_pkg, tmp_path):
    bad = [
        ({"adapter": "module", "prediction": "eps", "schedule": "ddpm"}, "teacher.net._target_"),
        ({"adapter": "module", "net": {"_target_": "a.b"}, "schedule": "ddpm"}, "teacher.prediction"),
        ({"adapter": "module", "net": {"_target_": "a.b"}, "prediction": "eps"}, "teacher.schedule"),
        ({"adapter": "module", "net": {"_target_": "a.b"}, "prediction": "v", "schedule": "table"},
         "teacher.schedule_table"),
        ({"net": {"_target_": "a.b"}}, "teacher.net"),
        ({"adapter": "edm", "net": {"_target_": "a.b"}, "sigma_max": 0.001}, "teacher.sigma_max"),
        ({"adapter": "onnx"}, "teacher.adapter"),
        ({"adapter": "diffusers", "checkpoint": str(tmp_path)}, "teacher.checkpoint"),  # no config.json there
    ]
    for teacher, needle in bad:
        with pytest.raises(ConfigError, match=needle) as e:
            resolve(JobConfig.from_dict({"teacher": teacher}))
        assert "FIX THIS" in str(e.value), teacher
    from rayflow.teachers import build_adapter

    job = _job({"adapter": "module", "prediction": "eps", "schedule": "ddpm",
                "net": {"_target_": "user_nets.not_a_module"}})
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        build_adapter(job.teacher, job.model, job.data)
    job.teacher.net = {"_target_": "no_such_pkg.make"}
    with pytest.raises(ImportError, match="FIX THIS by installing"):
        build_adapter(job.teacher, job.model, job.data)


# ----- SHA-256 of every teacher file: recorded at config time (-> MLflow params), checked at load -----


def test_teacher_file_digests_are_recorded_and_checked(user_pkg, tmp_path):
    net = user_pkg.MixtureNet(SPEC, "eps", "ddpm")
    path = _save(net, tmp_path / "teacher.safetensors")
    ac = torch.linspace(0.999, 0.01, 20, dtype=torch.float64)
    (tmp_path / "table.json").write_text(json.dumps({"alpha": ac.sqrt().tolist(), "sigma": (1 - ac).sqrt().tolist()}))
    teacher = {"adapter": "module", "checkpoint": path, "prediction": "eps", "schedule": "table",
               "schedule_table": str(tmp_path / "table.json"),
               "net": {"_target_": "user_nets.MixtureNet", "spec": SPEC, "prediction": "eps", "schedule": "ddpm"}}
    job = _job(teacher)
    assert job.teacher.files_sha256 == {"teacher.safetensors": sha256_file(path),
                                        "table.json": sha256_file(tmp_path / "table.json")}
    flat = job.flat()  # what the job logs to MLflow as params
    assert flat["teacher.files_sha256.teacher.safetensors"] == sha256_file(path)
    # the workers get the recorded digests with the config, and refuse a teacher file that changed since
    worker_job = JobConfig.from_dict(job.to_dict())
    assert worker_job.teacher.files_sha256 == job.teacher.files_sha256
    _save(user_pkg.MixtureNet({**SPEC, "means": [[0.0] * 4] * 3}, "eps", "ddpm"), path)
    with pytest.raises(ValueError, match="changed since the run was configured"):
        build_state(worker_job, "distill", torch.device("cpu"))
    with pytest.raises(ValueError, match="teacher.sha256"):
        load_teacher(path, job.model, job.data, teacher=TeacherConfig(**teacher), sha256="0" * 64)


# ----- student and aux through the adapter, on the worker state -----


TINY_UNET = {"_target_": "rayflow.nets.registry.build_net", "name": "unet", "in_channels": 1, "channels": 8,
             "channel_mult": [1], "attn_levels": [], "num_classes": 4}


@pytest.mark.parametrize("adapter,algorithm", [
    ("module", "alternating"), ("edm", "alternating"), ("module", "parameter_space"),
    pytest.param("diffusers", "alternating", marks=needs_diffusers),
])
def test_student_and_aux_are_built_through_the_adapter(tmp_path, adapter, algorithm):
    data = {"source": "digits", "resolution": 8, "channels": 1, "num_classes": 3, "batch_size": 8}
    if adapter == "diffusers":
        unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                                     layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                     num_class_embeds=4, add_attention=False)
        teacher = {"adapter": "diffusers", "checkpoint": _save_diffusers(unet, tmp_path)}
    else:
        from rayflow.teachers import instantiate

        path = _save(instantiate(TINY_UNET), tmp_path / "teacher.safetensors")
        extra = ({"prediction": "v", "schedule": "cosine"} if adapter == "module"
                 else {"sigma_data": 0.5, "label_format": "index"})
        teacher = {"adapter": adapter, "checkpoint": path, "net": TINY_UNET, **extra}
    job = _job(teacher, data=data, distill={"algorithm": algorithm, "steps": 2})
    precond = None
    if algorithm == "parameter_space":  # a foreign teacher has no Adam state: the gradient preconditioner
        net = load_teacher(job.teacher.checkpoint, job.model, job.data, teacher=job.teacher)
        xy = (torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,)))
        precond = gradient_preconditioner(net, [xy], net.schedule)
    state = build_state(job, "distill", torch.device("cpu"), precond=precond)
    if algorithm == "parameter_space":
        assert state.step.method.precond is not None
    base = state.step.teacher
    names = ["student", "aux"] if algorithm == "alternating" else ["student"]
    for name in names:
        m = state.trainables[name]
        assert type(m) is type(base) and m.schedule is not None
        for (k, p), (_, q) in zip(m.state_dict().items(), base.state_dict().items()):
            assert torch.equal(p, q), k
        assert all(p.requires_grad for p in m.parameters())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
    for n in range(3):  # distill.aux_per_student (2) aux updates, then a student update
        metrics = state.step(n, x, y, g)
        assert all(math.isfinite(v) for v in metrics.values()), metrics
    before = dict(base.state_dict())
    assert any(not torch.equal(p, before[k]) for k, p in state.trainables["student"].state_dict().items())
    # an exported student (the adapter's state_dict) reloads through the same adapter
    torch.save(state.trainables["student"].state_dict(), tmp_path / "student.pt")
    student = load_teacher(str(tmp_path / "student.pt"), job.model, job.data, teacher=job.teacher)
    for (k, p), (_, q) in zip(student.state_dict().items(), state.trainables["student"].state_dict().items()):
        assert torch.equal(p, q), k


def test_parameters_the_network_never_uses_stay_frozen_in_student_and_aux(user_pkg, tmp_path):
    """DDP would wait forever for their gradients (EDM2's Precond has such an uncertainty head)."""
    kwargs = {k: v for k, v in TINY_UNET.items() if k not in ("_target_", "name")}
    net_cfg = {"_target_": "user_nets.WithUnusedHead", **kwargs}
    path = _save(user_pkg.WithUnusedHead(**kwargs), tmp_path / "teacher.safetensors")
    data = {"source": "digits", "resolution": 8, "channels": 1, "num_classes": 3, "batch_size": 8}
    job = _job({"adapter": "module", "checkpoint": path, "net": net_cfg, "prediction": "v", "schedule": "cosine"},
               data=data, distill={"steps": 2})
    state = build_state(job, "distill", torch.device("cpu"))
    for name in ("student", "aux"):
        frozen = sorted(n for n, p in state.trainables[name].named_parameters() if not p.requires_grad)
        assert frozen == ["net.logvar.bias", "net.logvar.weight"], frozen
        assert not state.trainables[name].training  # dropout off while distilling (clone_trainable)


def test_task_teacher_refuses_a_foreign_adapter(tmp_path):
    job = _job({"adapter": "module", "prediction": "v", "schedule": "cosine", "net": TINY_UNET})
    with pytest.raises(ValueError, match="task=teacher trains rayflow's own UNet"):
        build_state(job, "teacher", torch.device("cpu"))


# ----- 3. distilling through an adapter gives the native path's student -----


class AsEDM(nn.Module):
    """The native x-denoiser g(z_t, t) re-expressed as EDM's D(x; sigma): the same function."""

    def __init__(self, den: nn.Module, schedule):
        super().__init__()
        self.den, self.sch = den, schedule

    def forward(self, x, sigma, cond=None):
        lam = -2.0 * torch.log(sigma.double())
        t = self.sch.time_of_logsnr(lam)
        alpha = torch.sigmoid(lam).sqrt()
        return self.den(x * alpha[:, None].to(x.dtype), t.to(x.dtype), cond)


def test_distilling_through_adapters_matches_the_native_student():
    """The native teacher's network through the module adapter (and re-expressed as an EDM network through the
    EDM adapter) distils, with the same seed, to the native student: the adapters add nothing but float noise.

    A schedule whose logSNR is never clipped in training keeps t -> logSNR -> t one to one (at a clipped end,
    cosine's t = 1, every t maps to the same logSNR, and an adapter rightly calls the network at the one time
    with that logSNR, which is not t)."""
    torch.set_num_threads(1)
    spec = {"weights": [0.5, 0.3, 0.2], "means": [[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]],
            "stds": [[0.1, 0.3], [0.3, 0.1], [0.15, 0.15]]}
    gm = GaussianMixture.from_spec(spec)
    sch = LinearBetaSchedule(logsnr_max=40.0)  # logSNR in [-10.1, 40]: no clipping at t = 1 or t >= 1e-17
    data, _ = gm.sample(10_000, generator=torch.Generator().manual_seed(0))
    native = lab.fit_teacher(data, sch, width=64, depth=2, steps=400, batch=256, lr=2e-3)
    mlp = native.denoiser.net
    adapters = {
        "native": native.denoiser,
        "module (v, linear_beta)": VPAdapter(mlp, sch, LinearBetaSchedule(logsnr_max=40.0), "v"),
        "edm (D)": EDMAdapter(AsEDM(native.denoiser, sch), sch),
    }
    ref, _ = gm.sample(4000, generator=torch.Generator().manual_seed(2))
    scores, params = {}, {}
    for name, den in adapters.items():
        teacher = lab.TeacherResult(den, native.optimizer_state, native.param_names)
        student = lab.distill(teacher, data, sch, student_steps=2, train_steps=150, batch=256, lr_student=3e-4,
                              ema_decay=0.98)
        x = sample("student", student, (4000, 2), 2, sch, generator=torch.Generator().manual_seed(1))
        scores[name] = mixture_metrics(gm, x.double(), ref)
        params[name] = torch.cat([p.flatten() for p in student.parameters()])
    print({k: {m: round(v, 5) for m, v in s.items()} for k, s in scores.items()})
    for name in adapters:
        diff = (params[name] - params["native"]).abs().max().item()
        print(f"{name}: max |student param - native student param| = {diff:.2e}")
        assert diff < 1e-4, name
        for metric in ("loglik", "sw2", "mode_mass_tv"):
            assert scores[name][metric] == pytest.approx(scores["native"][metric], abs=2e-3), (name, metric)


@pytest.mark.usefixtures("ray_cluster")
def test_gradient_preconditioner_for_a_foreign_teacher_is_computed_once_and_cached(tmp_path):
    from rayflow.orchestrate.precondition import gradient_precond_from_data, teacher_preconditioner
    from rayflow.teachers import instantiate

    spec = {**TINY_UNET, "num_classes": 11}  # digits: 10 classes and the null class
    path = _save(instantiate(spec), tmp_path / "teacher.safetensors")
    teacher = {"adapter": "module", "checkpoint": path, "net": spec, "prediction": "v", "schedule": "cosine"}
    job = _job(teacher, data={"source": "digits", "resolution": 8, "channels": 1, "num_classes": 10, "batch_size": 8},
               distill={"algorithm": "parameter_space", "steps": 2, "precond_batches": 2},
               run={"storage_path": str(tmp_path / "runs")})
    first = teacher_preconditioner(job)
    cached = list((tmp_path / "runs" / "cache" / "precond").glob("gradient-*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = teacher_preconditioner(job)
    assert cached[0].stat().st_mtime_ns == stamp  # read back, not recomputed
    fresh = gradient_precond_from_data(job)
    net = load_teacher(path, job.model, job.data, teacher=job.teacher)
    assert set(first) == {k for k, _ in net.named_parameters()}
    for k in first:
        assert torch.equal(first[k], again[k])
        torch.testing.assert_close(first[k], fresh[k])
    assert all(torch.isfinite(v).all() and (v > 0).all() for v in first.values())

