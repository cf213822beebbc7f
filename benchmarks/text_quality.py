"""Guided text-to-image teacher (256 ancestral steps) versus its 8-step moment-matching student on rayflow's
captioned shapes set: caption consistency (the attribute classifier agrees with the caption), its per-attribute
parts, Frechet distance in the classifier's feature space, precision/recall, and a PNG grid of captions with
teacher and student samples side by side.

Single process (`rayflow.lab`: the same core steps the Ray workers run), so it also runs on a GPU machine without
Ray; the model is `conf/model/unet_text.yaml` on `conf/data/shapes.yaml`, so the teacher it trains (--export-teacher)
loads in `python -m rayflow.train experiment=text_demo`.

    python benchmarks/text_quality.py                          # CPU: small budgets (--quick), minutes
    python benchmarks/text_quality.py --teacher-images 800000 --teacher-batch 256 --distill-images 150000 \
        --distill-batch 128 --export-teacher teacher.pt --device cuda     # the README numbers (one H200)

Captions are encoded once with the data config's encoder (all-MiniLM-L6-v2) into --captions-cache (an .npz of the
few hundred distinct captions); a machine without the encoder package can reuse that file.
Prints one JSON line per evaluated sampler and writes rows.jsonl, table.md and grid.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayflow.config import DataConfig, ModelConfig  # noqa: E402
from rayflow.core.diffusion import GuidedDenoiser  # noqa: E402
from rayflow.core.steps import freeze  # noqa: E402
from rayflow.data import shapes  # noqa: E402
from rayflow.data.transforms import to_model_input  # noqa: E402
from rayflow.evaluation.classifier import train_classifier  # noqa: E402
from rayflow.evaluation.generate import generate_samples  # noqa: E402
from rayflow.evaluation.metrics import features_and_logits, image_metrics  # noqa: E402
from rayflow.lab import TeacherResult, distill, fit_teacher  # noqa: E402
from rayflow.models import build_denoiser, save_state_dict  # noqa: E402


def _yaml(path: Path) -> dict:
    """The flat `key: value` YAML of conf/model and conf/data (PyYAML need not be installed on a GPU box)."""
    import ast

    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, value = (part.strip() for part in line.split(":", 1))
            value = {"null": "None", "true": "True", "false": "False"}.get(value, value)
            try:
                out[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key] = value
    return out


def configs() -> tuple[ModelConfig, DataConfig]:
    model = ModelConfig(**_yaml(ROOT / "conf/model/unet_text.yaml"))
    data = DataConfig(**_yaml(ROOT / "conf/data/shapes.yaml"))
    return model, data


def caption_table(data: DataConfig, cache: Path) -> dict[str, np.ndarray]:
    """{caption: packed condition (L, D + 1)} for every caption the shapes set can produce."""
    captions = [shapes.caption(label, t) for label in range(shapes.NUM_CLASSES) for t in range(shapes.NUM_TEMPLATES)]
    if cache.is_file():
        saved = np.load(cache)
        table = dict(zip(saved["captions"].tolist(), saved["cond"], strict=True))
        if set(captions) <= set(table):
            return table
    from rayflow.data.text import make_encoder, pack_text

    encoder = make_encoder(data.text_encoder, path=data.text_encoder_path, max_tokens=data.text_max_tokens)
    emb, mask = encoder.encode(captions)
    cond = pack_text(emb, mask, where="shapes captions")
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, captions=np.array(captions), cond=cond)
    return dict(zip(captions, cond, strict=True))


def conds(table: dict[str, np.ndarray], captions: list[str]) -> torch.Tensor:
    return torch.from_numpy(np.stack([table[c] for c in captions]))


def save_grid(path: Path, captions: list[str], columns: dict[str, torch.Tensor], per: int) -> None:
    """One row per caption: the caption, then `per` samples of each column (teacher, student). The samples also go
    to grid_samples.pt beside it (`--render-grid` redraws the PNG where matplotlib is installed)."""
    torch.save({"captions": captions, "columns": columns, "per": per}, path.with_name("grid_samples.pt"))
    try:
        import matplotlib
    except ImportError:
        print(json.dumps({"grid": "matplotlib missing: rerun with --render-grid on grid_samples.pt"}), flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    fig, axes = plt.subplots(len(captions), 1 + per * len(names), figsize=(2.6 + 0.9 * per * len(names),
                                                                         0.95 * len(captions)))
    for r, cap in enumerate(captions):
        axes[r, 0].text(1.0, 0.5, cap, ha="right", va="center", fontsize=8)
        for c, name in enumerate(names):
            for j in range(per):
                ax = axes[r, 1 + c * per + j]
                img = columns[name][r * per + j].permute(1, 2, 0).clamp(-1, 1).add(1).div(2).numpy()
                ax.imshow(img, interpolation="nearest")
                if r == 0 and j == 0:
                    ax.set_title(name, fontsize=8, loc="left")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train-size", type=int, default=20000, help="rendered training images")
    p.add_argument("--teacher", help="a trained text teacher (state_dict) instead of training one")
    p.add_argument("--teacher-images", type=int, default=200_000)
    p.add_argument("--teacher-batch", type=int, default=128)
    p.add_argument("--teacher-lr", type=float, default=4e-4)
    p.add_argument("--export-teacher", help="write the trained teacher's EMA weights here")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale w of the teacher")
    p.add_argument("--student-steps", type=int, default=8)
    p.add_argument("--teacher-steps", type=int, default=256)
    p.add_argument("--distill-images", type=int, default=60_000)
    p.add_argument("--distill-batch", type=int, default=64)
    p.add_argument("--lr-student", type=float, default=1e-4)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--captions-cache", default=str(ROOT / "benchmarks/results/text_quality/captions-minilm.npz"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/text_quality"))
    p.add_argument("--export-student", help="write the student's EMA weights here")
    p.add_argument("--student", help="a distilled student (state_dict) instead of distilling one")
    p.add_argument("--grid-only", action="store_true", help="draw grid.png only (no metrics)")
    p.add_argument("--render-grid", help="only redraw grid.png from a grid_samples.pt")
    a = p.parse_args()
    if a.render_grid:
        saved = torch.load(a.render_grid, weights_only=True)
        save_grid(Path(a.render_grid).with_name("grid.png"), saved["captions"], saved["columns"], saved["per"])
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, data = configs()
    table = caption_table(data, Path(a.captions_cache))
    images, labels, captions = shapes.shapes_arrays(a.train_size, data.resolution, seed=a.seed)
    x = torch.from_numpy(to_model_input(images))  # (N, 3, 16, 16) in [-1, 1]
    cond = conds(table, captions)  # (N, L, D + 1)
    den = build_denoiser(model, data)
    common = {"device": a.device, "guidance": a.guidance, "train_size": a.train_size, "seed": a.seed}

    t0 = time.perf_counter()
    if a.teacher:
        den.load_state_dict(torch.load(a.teacher, map_location="cpu", weights_only=True))
        teacher = TeacherResult(freeze(den.to(a.device).eval()), {}, [])
        teacher_s = 0.0
    else:
        steps = max(1, a.teacher_images // a.teacher_batch)
        teacher = fit_teacher(x, den.schedule, denoiser=den, cond=cond, cond_drop_prob=0.1, null_cond=0,
                              steps=steps, batch=a.teacher_batch, lr=a.teacher_lr, seed=a.seed, device=a.device)
        teacher_s = time.perf_counter() - t0
        if a.export_teacher:
            digest = save_state_dict({k: v.cpu() for k, v in teacher.denoiser.state_dict().items()}, a.export_teacher)
            print(json.dumps({"exported_teacher": a.export_teacher, "sha256": digest}), flush=True)
    guided = GuidedDenoiser(teacher.denoiser, a.guidance, null_cond=0)

    t0 = time.perf_counter()
    if a.student:
        student = freeze(build_denoiser(model, data))
        student.load_state_dict(torch.load(a.student, map_location="cpu", weights_only=True))
        student = student.to(a.device)
    else:
        student = distill(teacher, x, den.schedule, student_steps=a.student_steps,
                          train_steps=max(1, a.distill_images // a.distill_batch), batch=a.distill_batch,
                          lr_student=a.lr_student, seed=a.seed, cond=cond, guided_teacher=guided, device=a.device)
    distill_s = time.perf_counter() - t0
    if a.export_student:
        save_state_dict({k: v.cpu() for k, v in student.state_dict().items()}, a.export_student)

    shape = (data.channels, data.resolution, data.resolution)
    runs = [("teacher_ancestral", guided, "ancestral", a.teacher_steps),
            ("teacher_ddim", guided, "ddim", a.student_steps),
            ("student", student, "student", a.student_steps)]
    # grid: 8 captions, 3 samples each
    per, shown = 3, shapes.eval_prompts(8, seed=a.seed)[1]
    grid_cond = conds(table, [c for c in shown for _ in range(per)])
    cols = {}
    for name, net, sampler, steps in (runs[0], runs[2]):
        cols[f"{name} ({steps} steps)"], _ = generate_samples(net, sampler, steps, grid_cond, shape, batch=250,
                                                              seed=a.seed + 5, device=a.device)
    save_grid(out / "grid.png", shown, cols, per)
    if a.grid_only:
        return
    # the attribute classifier: trained on real renders, checked on held-out ones
    real_x, real_y, _ = shapes.shapes_arrays(12000, data.resolution, seed=a.seed + 101)
    real_x, real_y = torch.from_numpy(to_model_input(real_x)), torch.from_numpy(real_y)
    classifier = train_classifier(real_x[:10000], real_y[:10000], epochs=6, seed=a.seed,
                                  num_classes=shapes.NUM_CLASSES).to(a.device)
    _, logits = features_and_logits(classifier, real_x[10000:])
    held_out = float((logits.argmax(1) == real_y[10000:]).float().mean())
    eval_labels, eval_caps = shapes.eval_prompts(a.samples, seed=a.seed)
    eval_cond = conds(table, eval_caps)
    eval_labels = torch.from_numpy(eval_labels)
    rows = []
    for name, net, sampler, steps in runs:
        xs, secs = generate_samples(net, sampler, steps, eval_cond, shape, batch=250, seed=a.seed + 17,
                                    device=a.device)
        m = image_metrics(classifier, xs, eval_labels, real_x[:10000], real_y[:10000])
        _, lg = features_and_logits(classifier, xs)
        parts = shapes.attribute_agreement(lg.argmax(1).numpy(), eval_labels.numpy())
        row = {"method": name, "sampler": sampler, "nfe": steps * (2 if name.startswith("teacher") else 1),
               "steps": steps, "caption_consistency": round(parts["all"], 4),
               **{f"match_{k}": round(v, 4) for k, v in parts.items() if k != "all"},
               "fd": round(float(m["fd"]), 3), "precision": round(float(m["precision"]), 4),
               "recall": round(float(m["recall"]), 4), "s_per_1k": round(secs * 1000.0 / a.samples, 2),
               "classifier_held_out": round(held_out, 4), "teacher_train_s": round(teacher_s, 1),
               "distill_s": round(distill_s, 1), **common}
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(out / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    keys = ["method", "steps", "nfe", "caption_consistency", "match_top_color", "match_top_shape",
            "match_bottom_color", "match_bottom_shape", "fd", "precision", "recall", "s_per_1k"]
    with open(out / "table.md", "w") as f:
        f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        f.writelines("| " + " | ".join(str(r[k]) for k in keys) + " |\n" for r in rows)
    print(json.dumps({"wrote": str(out), "classifier_held_out": held_out}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
