"""Shared building blocks: time embedding and condition embedding."""

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
