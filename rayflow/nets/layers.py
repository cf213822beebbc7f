"""Shared building blocks: time embedding and condition embeddings (class labels, text tokens)."""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierTime(nn.Module):
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DDPM), then a 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 64):
        super().__init__()
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10_000.0) * torch.arange(half) / half), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = 1000.0 * t.float()[:, None] * self.freqs[None]  # (B, half)
        return self.mlp(torch.cat([arg.sin(), arg.cos()], dim=1))  # (B, dim)


class ClassEmbedding(nn.Module):
    """Class labels 0..num_classes-1 plus a learned null class (index num_classes) for guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, cond: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if cond is None:
            cond = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return self.table(cond.long())  # (B, dim)


class TextContext(nn.Module):
    """The packed text condition (B, L, D + 1) -> cross-attention context and a pooled embedding.

    cond[..., :D] are token embeddings, cond[..., D] the token mask; an all-zero cond (or None) is the null
    condition of classifier-free guidance. Tokens are projected to the model width; a learned null token is
    appended to every context (always visible), so attention is defined for the null condition too. The pooled
    embedding is the masked mean of the projected tokens, or a learned null embedding when no token is set.
    """

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.text_dim = text_dim
        self.proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim))
        self.null_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.null_pooled = nn.Parameter(torch.zeros(1, dim))
        self.pooled = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, cond: torch.Tensor | None, batch: int, device, dtype: torch.dtype):
        if cond is None:
            cond = torch.zeros(batch, 1, self.text_dim + 1, device=device, dtype=dtype)
        if cond.ndim != 3 or cond.shape[-1] != self.text_dim + 1:
            raise ValueError(
                f"text condition of shape {tuple(cond.shape)}; expected (B, L, {self.text_dim + 1}) = token "
                f"embeddings of size {self.text_dim} plus the mask channel. FIX THIS by matching data.text_dim to "
                "the text encoder"
            )
        mask = cond[..., -1] > 0.5  # (B, L)
        tokens = self.proj(cond[..., :-1].to(dtype)) * mask[..., None]  # (B, L, E)
        count = mask.sum(1, keepdim=True)  # (B, 1)
        mean = tokens.sum(1) / count.clamp(min=1)  # (B, E)
        pooled = self.pooled(torch.where(count > 0, mean, self.null_pooled.to(mean.dtype)))  # (B, E)
        ctx = torch.cat([tokens, self.null_token.to(tokens.dtype).expand(tokens.shape[0], 1, -1)], dim=1)
        keep = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (B, L + 1)
        return (ctx, keep), pooled
