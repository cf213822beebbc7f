"""CLIP score of text-to-image samples, from a local CLIP checkpoint (Hugging Face layout), fully offline.

The score is CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
Captioning") with w = 100, exactly as torchmetrics' `CLIPScore` defines it: for each (image, caption) pair

    clip_score_i = 100 * max(cos(E_image(image_i), E_text(caption_i)), 0)

where E_image / E_text are the model's *projected* image and text embeddings; `score` returns the mean over
the samples (torchmetrics' number) and the population standard deviation. It lies in [0, 100]; with
openai/clip-vit-base-patch32, real captioned photos score roughly 30.

Preprocessing is done in torch rather than with the Hugging Face image processor because our samples are
float tensors (N, C, H, W) in [-1, 1] that may live on the GPU: the HF processor expects PIL/uint8 images
(its `rescale_factor` is 1/255), round-trips through the CPU and numpy, and its default torch backend needs
torchvision, which rayflow does not depend on. The steps reproduce CLIP's preprocessing on float data:
[-1, 1] -> [0, 1], gray repeated to RGB, bicubic resize with antialiasing so that the shorter side equals
`config.vision_config.image_size`, a center crop to a square (a no-op for square images), a clamp to
[0, 1] (what PIL's uint8 bicubic does implicitly), and normalisation with the checkpoint's `image_mean` /
`image_std` (from `preprocessor_config.json`, or the `image_processor` entry of transformers 5's
`processor_config.json`), falling back to CLIP's ImageNet-style constants.

Nothing is ever downloaded: `HF_HUB_OFFLINE=1` is set before transformers is imported and every load uses
`local_files_only=True`. The user points `eval.clip_model` at a folder made by `save_pretrained` of a CLIP
model and its tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

CONFIG_KEY = "eval.clip_model"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_FIX_FOLDER = f"FIX THIS by pointing {CONFIG_KEY} at a local CLIP folder (save_pretrained of a CLIP model)"


def _bad_folder(path: str, why: str) -> ValueError:
    why = " ".join(str(why).split())  # one line, whatever the underlying error printed
    if len(why) > 300:
        why = why[:297] + "..."
    return ValueError(f"CLIP model folder {path!r} is not usable ({why}); {_FIX_FOLDER}")


def _mean_std(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The checkpoint's image_mean/image_std if it saved an image processor, else CLIP's constants."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            with open(file, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise _bad_folder(path, f"{name} is not valid JSON: {e}") from e
        if key is not None:
            cfg = cfg.get(key) if isinstance(cfg, dict) else None
        if not isinstance(cfg, dict) or "image_mean" not in cfg or "image_std" not in cfg:
            continue
        mean, std = cfg["image_mean"], cfg["image_std"]
        mean = [float(mean)] * 3 if isinstance(mean, int | float) else [float(v) for v in mean]
        std = [float(std)] * 3 if isinstance(std, int | float) else [float(v) for v in std]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise _bad_folder(path, f"{name} has image_mean={mean}, image_std={std}; expected 3 values each, std > 0")
        return tuple(mean), tuple(std)
    return CLIP_MEAN, CLIP_STD


def preprocess(images: torch.Tensor, size: int, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """(N, 1 or 3, H, W) float in [-1, 1] -> (N, 3, size, size) CLIP pixel values (float32, same device)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"CLIP score takes (N, 1 or 3, H, W) images, got shape {tuple(images.shape)}; FIX THIS by "
                         "passing image batches with 1 (gray) or 3 (RGB) channels")
    x = (images.float() + 1.0) / 2.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)  # shorter side -> size, as CLIP's processor; square images: straight to size
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    x = x.clamp(0.0, 1.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def _pooled(out: object) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4.x, a BaseModelOutputWithPooling (projected
    embedding in `pooler_output`) in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """A frozen CLIP model and tokenizer loaded from a local folder; `score` gives the CLIP score."""

    def __init__(self, path: str, device: str | torch.device = "cpu"):
        path = os.fspath(path) if path else ""
        if not path or not os.path.isdir(path):
            raise _bad_folder(path or "(unset)", "no such directory")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise _bad_folder(path, "no config.json in it")
        os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers (and huggingface_hub) are first imported
        import transformers

        try:
            model, info = transformers.CLIPModel.from_pretrained(
                path, local_files_only=True, dtype=torch.float32, output_loading_info=True)
        except Exception as e:  # any loading failure is the same user error
            raise _bad_folder(path, f"CLIPModel.from_pretrained failed: {type(e).__name__}: {e}") from e
        missing = list(info.get("missing_keys") or [])
        if missing:  # randomly initialised weights would give a meaningless score
            raise _bad_folder(path, f"{len(missing)} weights missing from the checkpoint, e.g. {missing[0]}")
        # transformers 5 silently builds an empty CLIPTokenizer (special tokens only) from a folder without
        # tokenizer files, so their presence is checked first, and the result after loading.
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
            raise _bad_folder(path, "no tokenizer in it (tokenizer.json or vocab.json + merges.txt); save the "
                                    "tokenizer with save_pretrained into the same folder")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise _bad_folder(path, f"no usable tokenizer: {type(e).__name__}: {e}") from e
        text_cfg = model.config.text_config
        n_tokens, n_special = len(tokenizer), len(set(tokenizer.all_special_ids))
        if n_tokens <= n_special:
            raise _bad_folder(path, f"its tokenizer has only {n_tokens} tokens, all special")
        if n_tokens > text_cfg.vocab_size:
            raise _bad_folder(path, f"its tokenizer has {n_tokens} tokens but the text model's vocab_size is "
                                    f"{text_cfg.vocab_size}; tokenizer and model do not belong together")
        # The text model pools at the first eos token (configs from before transformers PR #24773 have
        # eos_token_id == 2 and pool at the highest token id instead, which is CLIP's eos).
        if text_cfg.eos_token_id != 2 and tokenizer.eos_token_id != text_cfg.eos_token_id:
            raise _bad_folder(path, f"its tokenizer's eos id is {tokenizer.eos_token_id} but the text model pools "
                                    f"at eos_token_id={text_cfg.eos_token_id}; tokenizer and model do not match")

        self.path = path
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.mean, self.std = _mean_std(path)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, D) unit-norm projected image embeddings (float32)."""
        pixels = preprocess(images.to(self.device), self.image_size, self.mean, self.std)
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> (N, D) unit-norm projected text embeddings, truncated to the model's max positions."""
        tok = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device))
        return F.normalize(_pooled(out).float(), dim=-1)

    @torch.no_grad()
    def per_sample(self, images: torch.Tensor, captions: Sequence[str], batch: int = 64) -> torch.Tensor:
        """(N,) float64 CPU tensor of 100 * max(cos, 0), one per (image, caption) pair."""
        if isinstance(captions, str):
            raise ValueError("CLIP score got a single string as captions; FIX THIS by passing a list with one "
                             "caption per image")
        if len(images) != len(captions):
            raise ValueError(f"CLIP score got {len(images)} images but {len(captions)} captions; FIX THIS by "
                             "passing exactly one caption per image, in the same order")
        if len(images) == 0:
            raise ValueError("CLIP score got no images; FIX THIS by evaluating at least one sample")
        if batch < 1:
            raise ValueError(f"CLIP score batch must be >= 1, got {batch}; FIX THIS by passing a positive batch")
        scores = []
        for i in range(0, len(images), batch):
            img = self.image_embeddings(images[i:i + batch])
            txt = self.text_embeddings(captions[i:i + batch])
            scores.append((100.0 * (img * txt).sum(dim=-1)).clamp(min=0.0).double().cpu())
        return torch.cat(scores)

    def score(self, images: torch.Tensor, captions: list[str], batch: int = 64) -> dict[str, float]:
        """{"clip_score": mean, "clip_score_std": population std} over the (image, caption) pairs."""
        s = self.per_sample(images, captions, batch)
        return {"clip_score": float(s.mean()), "clip_score_std": float(s.std(correction=0))}
