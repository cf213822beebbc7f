"""Worker state without Ray: building each role, checkpoint round trips, teacher export and the preconditioner."""

import pytest
import torch

from rayflow.config import JobConfig
from rayflow.exports import read_meta
from rayflow.models import build_denoiser, save_state_dict
from rayflow.orchestrate.precondition import teacher_preconditioner
from rayflow.orchestrate.training import export_student, export_teacher
from rayflow.teachers import PRECOND_NAME as TEACHER_PRECOND
from rayflow.weights import read_state_dict
from rayflow.worker.loop import STATE_FILE
from rayflow.worker.state import ROLES, build_state

TINY = {"data": {"source": "digits", "resolution": 8, "batch_size": 8},
        "model": {"channels": 8, "channel_mult": [1, 2], "attn_levels": []}}


def _job(**over) -> JobConfig:
    d = {k: dict(v) for k, v in TINY.items()}
    for key, value in over.items():
        section, name = key.split("__")
        d.setdefault(section, {})[name] = value
    return JobConfig.from_dict(d)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


@pytest.fixture()
def exported_teacher(tmp_path):
    state = build_state(_job(), "teacher", torch.device("cpu"))
    x, y = _batch()
    for n in range(3):
        state.step(n, x, y)
    ckpt = tmp_path / "ckpt"
    save_state_dict(state.state_dict(), ckpt / STATE_FILE)
    path, digest = export_teacher(_job(), str(ckpt), str(tmp_path / "export"))
    return state, path, digest


def test_teacher_export_holds_ema_weights_and_preconditioner(exported_teacher, tmp_path):
    state, path, digest = exported_teacher
    weights = read_state_dict(path)
    meta = read_meta(path)
    assert meta["kind"] == "teacher" and meta["model"]["channels"] == 8 and meta["data"]["resolution"] == 8
    for k, v in state.ema.module.state_dict().items():
        assert torch.equal(weights[k], v)
    pre = torch.load(tmp_path / "export" / TEACHER_PRECOND, weights_only=True)
    opt = state.optimizers["teacher"]
    for name, p in state.trainables["teacher"].named_parameters():
        torch.testing.assert_close(pre[name], 1.0 / (opt.state[p]["exp_avg_sq"].sqrt() + 1e-8))
    assert len(digest) == 64


@pytest.mark.parametrize("algorithm", ["alternating", "parameter_space"])
def test_distill_state_round_trips_through_a_checkpoint(exported_teacher, tmp_path, algorithm):
    _, path, digest = exported_teacher
    job = _job(teacher__checkpoint=path, teacher__sha256=digest, distill__algorithm=algorithm, distill__steps=2)
    precond = teacher_preconditioner(job)  # parameter_space: read from teacher_precond.pt beside the teacher
    assert (precond is not None) == (algorithm == "parameter_space")
    a = build_state(job, "distill", torch.device("cpu"), precond=precond)
    if algorithm == "parameter_space":
        assert a.step.method.precond is not None
    x, y = _batch()
    for n in range(4):
        a.step(n, x, y)
        a.counters.updates += 1
        a.step_schedules()
    save_state_dict(a.state_dict(), tmp_path / "s.pt")
    b = build_state(job, "distill", torch.device("cpu"), precond=precond)
    assert b.lr == job.distill.lr_student  # cosine: update 0 runs at the base rate
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert b.counters == a.counters
    assert b.lr == a.lr < job.distill.lr_student  # the schedule resumes at update 4, not at 0
    for name in a.trainables:
        for (k, p), (_, q) in zip(a.trainables[name].state_dict().items(), b.trainables[name].state_dict().items()):
            assert torch.equal(p, q), k
    # the next update is identical after the round trip (optimizer state and RNG restored)
    torch.manual_seed(1)
    g1 = torch.Generator().manual_seed(7)
    m1 = a.step(4, x, y, g1)
    torch.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["torch_rng"])
    torch.manual_seed(1)
    m2 = b.step(4, x, y, torch.Generator().manual_seed(7))
    assert m1 == m2
    out, _ = export_student_from(a, job, tmp_path)
    assert set(read_state_dict(out)) == set(a.ema.module.state_dict())
    meta = read_meta(out)
    assert meta["kind"] == "student" and meta["steps"] == 2 and meta["teacher"]["sha256"] == digest


def export_student_from(state, job, tmp_path):
    ckpt = tmp_path / "student-ckpt"
    save_state_dict(state.state_dict(), ckpt / STATE_FILE)
    return export_student(job, str(ckpt), str(tmp_path / "student-export"))


def test_teacher_checkpoint_errors_are_clear(exported_teacher, tmp_path):
    _, path, _ = exported_teacher
    with pytest.raises(ValueError, match="SHA-256"):
        build_state(_job(teacher__checkpoint=path, teacher__sha256="0" * 64), "distill", torch.device("cpu"))
    wrong = _job(teacher__checkpoint=path)
    wrong.model.channels = 16
    with pytest.raises(ValueError, match="does not match the model config"):
        build_state(wrong, "distill", torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="task=teacher"):
        build_state(_job(teacher__checkpoint=str(tmp_path / "nope.pt")), "distill", torch.device("cpu"))



def test_precision_bf16_autocasts_only_the_forwards_on_cpu(exported_teacher):
    _, path, digest = exported_teacher
    job = _job(teacher__checkpoint=path, teacher__sha256=digest, distill__steps=2, resources__precision="bf16")
    state = build_state(job, "distill", torch.device("cpu"))
    assert state.step.method.forward_dtype == torch.bfloat16
    x, y = _batch()
    for n in range(3):  # two aux updates (distill.aux_per_student), then a student update: both optimizers step
        m = state.step(n, x, y, torch.Generator().manual_seed(n))
        assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
    for opt in state.optimizers.values():
        assert opt.state and all(s["exp_avg_sq"].dtype == torch.float32 for s in opt.state.values())
    fp32 = build_state(_job(teacher__checkpoint=path, resources__precision="auto"), "distill", torch.device("cpu"))
    assert fp32.step.method.forward_dtype is None  # auto: full precision on CPU, bf16 on GPU
    assert job.resources.forward_dtype("cuda") == torch.bfloat16


def test_parameter_space_without_a_preconditioner_is_an_error_unless_identity(exported_teacher):
    _, path, _ = exported_teacher
    with pytest.raises(ValueError, match="distill.precondition=identity"):
        build_state(_job(teacher__checkpoint=path, distill__algorithm="parameter_space"), "distill",
                    torch.device("cpu"))
    job = _job(teacher__checkpoint=path, distill__algorithm="parameter_space", distill__precondition="identity")
    assert teacher_preconditioner(job) is None
    assert build_state(job, "distill", torch.device("cpu")).step.method.precond is None


def test_adam_preconditioner_requested_for_a_teacher_without_one_is_an_error(exported_teacher, tmp_path):
    _, path, _ = exported_teacher
    bare = tmp_path / "bare" / "teacher.safetensors"
    bare.parent.mkdir()
    bare.write_bytes(open(path, "rb").read())
    job = _job(teacher__checkpoint=str(bare), distill__algorithm="parameter_space", distill__precondition="adam")
    with pytest.raises(ValueError, match="distill.precondition=gradient"):
        teacher_preconditioner(job)


# resources.channels_last: RGB batches, so that NCHW and NHWC differ in memory (with one channel they coincide)
RGB = {"data": {**TINY["data"], "channels": 3}, "model": TINY["model"]}


@pytest.fixture()
def rgb_teacher(tmp_path):
    job = JobConfig.from_dict(RGB)
    torch.manual_seed(0)
    path = tmp_path / "rgb-teacher.pt"
    save_state_dict(build_denoiser(job.model, job.data).state_dict(), path)
    return str(path)


def _rgb_state(role: str, teacher: str, channels_last: bool):
    d = {**RGB, "resources": {"channels_last": channels_last}}
    if role == "distill":
        d["teacher"], d["distill"] = {"checkpoint": teacher}, {"steps": 2}
    torch.manual_seed(1)
    return build_state(JobConfig.from_dict(d), role, torch.device("cpu"))


def _rgb_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


@pytest.mark.parametrize("role", ROLES)
def test_channels_last_trains_as_the_default_layout_does(rgb_teacher, role):
    x, y = _rgb_batch()
    runs = []
    for channels_last in (False, True):
        state = _rgb_state(role, rgb_teacher, channels_last)
        metrics = [state.step(n, x, y, torch.Generator().manual_seed(n)) for n in range(4)]  # aux, student, ...
        runs.append((metrics, state))
    (m0, a), (m1, b) = runs
    for r0, r1 in zip(m0, m1):
        assert r0.keys() == r1.keys()
        for k in r0:
            assert r1[k] == pytest.approx(r0[k], rel=1e-4, abs=1e-6), k
    for name in a.trainables:
        _assert_nearly_all_close(b.trainables[name].state_dict(), a.trainables[name].state_dict())
    _assert_nearly_all_close(b.ema.module.state_dict(), a.ema.module.state_dict())


def _assert_nearly_all_close(got: dict, want: dict, share: float = 0.01) -> None:
    """Adam with beta1 = 0 and eps = 1e-12 moves every weight by ~lr per update whatever its gradient's size, so a
    gradient within float rounding of 0 can take either sign in the two layouts (a weight 1e-5 apart seen after 4
    updates); a layout bug moves most weights. At most `share` of each tensor's elements outside assert_close's
    float32 tolerance."""
    assert got.keys() == want.keys()
    for k in want:
        far = ~torch.isclose(got[k], want[k], rtol=1.3e-6, atol=1e-5)
        assert far.float().mean().item() <= share, (k, int(far.sum()), far.numel())


def _nhwc(t: torch.Tensor) -> bool:
    # channels_last and not also plain contiguous (a 1-channel or 1x1 tensor is both)
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize("role", ROLES)
def test_channels_last_puts_every_network_and_batch_in_nhwc(rgb_teacher, role):
    state = _rgb_state(role, rgb_teacher, True)
    networks = dict(state.trainables, ema=state.ema.module)
    if role == "distill":
        networks["teacher"] = state.step.step.teacher
    for name, net in networks.items():
        convs = [p for p in net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2:] != (1, 1)]
        assert convs and all(_nhwc(p) for p in convs), name
    seen = []
    first = state.trainables["teacher" if role == "teacher" else "student"]
    first.register_forward_pre_hook(lambda module, args: seen.append(_nhwc(args[0])))
    x, y = _rgb_batch()
    state.step(1, x, y, torch.Generator().manual_seed(0))  # distill: update 1 moves the student
    assert seen and all(seen)
    assert not _nhwc(x)  # the caller's batch is left as it was


def test_channels_last_breaks_the_parameter_space_jvp(rgb_teacher):
    # why JobConfig refuses resources.channels_last with distill.algorithm=parameter_space; when torch's forward-mode
    # group_norm accepts channels_last activations this fails: lift the refusal in rayflow/config/job.py then
    job = JobConfig.from_dict({**RGB, "teacher": {"checkpoint": rgb_teacher}, "resources": {"channels_last": True},
                               "distill": {"steps": 2, "precondition": "identity"}})
    job.distill.algorithm = "parameter_space"
    state = build_state(job, "distill", torch.device("cpu"))
    x, y = _rgb_batch()
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        state.step(0, x, y, torch.Generator().manual_seed(0))


def test_distill_warmup_images_ramps_both_learning_rates(exported_teacher):
    _, path, digest = exported_teacher
    # batch 8: 80 images = 10 updates, the first 4 (32 images) a linear warm-up, then a linear decay to 0
    job = _job(teacher__checkpoint=path, teacher__sha256=digest, distill__train_images=80,
               distill__warmup_images=32, distill__lr_decay="linear", distill__lr_ratio=2.0)
    state = build_state(job, "distill", torch.device("cpu"))
    lr = {k: opt.param_groups[0]["lr"] for k, opt in state.optimizers.items()}
    assert lr == {"student": pytest.approx(1e-4 / 4), "aux": pytest.approx(2e-4 / 4)}
    for s in state.schedulers.values():
        s.seek(4)
    assert state.optimizers["student"].param_groups[0]["lr"] == pytest.approx(1e-4)
    for s in state.schedulers.values():
        s.seek(7)
    assert state.optimizers["aux"].param_groups[0]["lr"] == pytest.approx(2e-4 * 0.5)
    for bad in (-8, 80, 1.5):
        with pytest.raises(ValueError, match="distill.warmup_images"):
            _job(distill__train_images=80, distill__warmup_images=bad)
