"""Residual MLP denoiser for low-dimensional data (Gaussian mixtures, toy problems)."""

from __future__ import annotations

import torch
from torch import nn

from rayflow.nets.layers import ClassEmbedding, FourierTime


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.film = nn.Linear(width, 2 * width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb).chunk(2, dim=1)  # (B, W) each
        y = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(nn.functional.silu(self.fc1(nn.functional.silu(y))))


class MLPDenoiserNet(nn.Module):
    """F(x_in, t, cond): (B, D) -> (B, D); time (and optional class) modulate every block."""

    def __init__(self, dim: int, width: int = 256, depth: int = 4, num_classes: int = 0):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.inp = nn.Linear(dim, width)
        self.time = FourierTime(width)
        self.cls = ClassEmbedding(num_classes, width) if num_classes > 0 else None
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time(t)  # (B, W)
        if self.cls is not None:
            emb = emb + self.cls(cond, x_in.shape[0], x_in.device)
        h = self.inp(x_in)  # (B, W)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)  # (B, D)
