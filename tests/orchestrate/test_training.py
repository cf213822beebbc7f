"""Parameter-space distillation on Ray Train with two DDP workers and a teacher that has no Adam state."""

import torch

from rayflow.config import JobConfig
from rayflow.models import build_denoiser, save_state_dict
from rayflow.orchestrate.training import run_training


def test_two_worker_parameter_space_run_gets_the_gradient_preconditioner(ray_cluster, tmp_path):
    path = tmp_path / "teacher" / "teacher.pt"  # a bare state_dict: no teacher_precond.pt beside it
    job = JobConfig.from_dict({
        "task": "distill",
        "teacher": {"checkpoint": str(path)},
        "data": {"source": "digits", "resolution": 8, "batch_size": 16},
        "model": {"channels": 8, "channel_mult": [1, 2], "attn_levels": []},
        "distill": {"algorithm": "parameter_space", "steps": 2, "train_images": 64, "precond_batches": 2},
        "resources": {"num_workers": 2, "cpus_per_worker": 0.45, "torch_threads": 1},
        "run": {"storage_path": str(tmp_path / "runs"), "report_every_images": 32, "checkpoint_every_images": 64,
                "eval_every_images": 0},
    })
    torch.manual_seed(0)
    save_state_dict(build_denoiser(job.model, job.data).state_dict(), path)
    out = run_training(job, "distill", "ps2")
    assert out.return_value["updates"] == 64 // 16 and out.return_value["images_seen"] == 64
    assert len(list((tmp_path / "runs" / "cache" / "precond").glob("gradient-*.pt"))) == 1
